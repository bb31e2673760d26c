//! The one place that opens keys. A key handle closes itself on drop; entries are read through
//! [`Slot`] and replaced through [`WriteKey::store`].

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, Ordering};

use redis_module::raw;
use tiercache_core::{Entry, NO_DEADLINE};

use crate::ffi::{api, hot, Ctx, RStr};

/// The registered `tiercache` data type (set once during load).
static TYPE: AtomicPtr<raw::RedisModuleType> = AtomicPtr::new(std::ptr::null_mut());

pub fn set_type(t: *mut raw::RedisModuleType) {
    TYPE.store(t, Ordering::Release);
}

pub fn data_type() -> *mut raw::RedisModuleType {
    TYPE.load(Ordering::Relaxed)
}

/// What a key holds.
pub enum Slot<'a> {
    Empty,
    Entry(&'a Entry),
    WrongType,
}

/// What a key holds, before it is borrowed as a [`Slot`] or an `&mut Entry`.
#[derive(Clone, Copy)]
enum Raw {
    Empty,
    Entry(*mut u8),
    WrongType,
}

struct Handle(*mut raw::RedisModuleKey);

impl Handle {
    fn open(ctx: Ctx, name: RStr, mode: c_int) -> Self {
        // SAFETY: ctx and name are live for the current command; OpenKey returns a handle we close on drop.
        Handle(unsafe { hot!(RedisModule_OpenKey)(ctx, name, mode).cast() })
    }

    /// The entry behind an open key, for updating its tag epochs (module memory only: the keyspace is not
    /// modified).
    fn entry_mut(&mut self) -> Option<&mut Entry> {
        match self.raw() {
            // SAFETY: our type's values are always pointers made by Entry::into_raw; nothing else
            // references the entry while this handle is borrowed mutably.
            Raw::Entry(p) => Some(unsafe { Entry::from_raw_mut(p) }),
            Raw::Empty | Raw::WrongType => None,
        }
    }

    fn slot(&self) -> Slot<'_> {
        match self.raw() {
            Raw::Empty => Slot::Empty,
            // SAFETY: our type's values are always pointers made by Entry::into_raw, valid while the key
            // is open and unmodified (the borrow of self enforces that).
            Raw::Entry(p) => Slot::Entry(unsafe { Entry::from_raw(p) }),
            Raw::WrongType => Slot::WrongType,
        }
    }

    /// What the key holds, with one call each of KeyType, ModuleTypeGetType and ModuleTypeGetValue.
    fn raw(&self) -> Raw {
        if self.0.is_null() {
            return Raw::Empty;
        }
        // SAFETY: self.0 is an open key handle.
        let kind = unsafe { hot!(RedisModule_KeyType)(self.0) };
        if kind == raw::REDISMODULE_KEYTYPE_EMPTY as c_int {
            return Raw::Empty;
        }
        // SAFETY: as above; ModuleTypeGetType returns null for non-module keys.
        if kind != raw::REDISMODULE_KEYTYPE_MODULE as c_int
            || unsafe { hot!(RedisModule_ModuleTypeGetType)(self.0) } != data_type()
        {
            return Raw::WrongType;
        }
        // SAFETY: open key handle holding our type.
        let v = unsafe { hot!(RedisModule_ModuleTypeGetValue)(self.0) }.cast::<u8>();
        if v.is_null() {
            Raw::Empty
        } else {
            Raw::Entry(v)
        }
    }

    /// Absolute expiry of the key in unix ms, or NO_DEADLINE.
    fn expire_at(&self) -> i64 {
        if self.0.is_null() {
            return NO_DEADLINE;
        }
        // SAFETY: open key handle; GetAbsExpire exists since Redis 6.2.
        let at = unsafe { hot!(RedisModule_GetAbsExpire)(self.0) };
        if at == raw::REDISMODULE_NO_EXPIRE as i64 {
            NO_DEADLINE
        } else {
            at
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the handle is open and closed exactly once, here. Closing a write handle signals
            // the key as modified (WATCH, client tracking).
            unsafe { hot!(RedisModule_CloseKey)(self.0) };
        }
    }
}

/// A key opened for reading.
pub struct ReadKey(Handle);

impl ReadKey {
    #[inline]
    pub fn open(ctx: Ctx, name: RStr) -> Self {
        ReadKey(Handle::open(ctx, name, raw::REDISMODULE_READ as c_int))
    }

    #[inline]
    pub fn slot(&self) -> Slot<'_> {
        self.0.slot()
    }

    pub fn expire_at(&self) -> i64 {
        self.0.expire_at()
    }
}

/// Runs `f` on the entry stored at `name` without touching its LRU/LFU data (keyspace events,
/// index rebuilds). Nothing in the keyspace changes.
pub fn with_entry_mut<R>(ctx: Ctx, name: RStr, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
    let mut h = Handle::open(ctx, name, (raw::REDISMODULE_READ | raw::REDISMODULE_OPEN_KEY_NOTOUCH) as c_int);
    h.entry_mut().map(f)
}

/// Like [`with_entry_mut`] for a key handle Redis already opened (RM_Scan callbacks).
///
/// # Safety
/// `key` must be an open key handle valid for this call; it is not closed here.
pub unsafe fn with_open_entry_mut<R>(key: *mut raw::RedisModuleKey, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
    let mut h = Handle(key);
    let r = h.entry_mut().map(f);
    std::mem::forget(h);
    r
}

/// A key opened for writing. What it holds is inspected once, at open (three calls into Redis), and
/// kept up to date by this handle's own changes: nothing else changes the key while it is open.
pub struct WriteKey(Handle, Raw);

impl WriteKey {
    pub fn open(ctx: Ctx, name: RStr) -> Self {
        let h = Handle::open(ctx, name, (raw::REDISMODULE_READ | raw::REDISMODULE_WRITE) as c_int);
        let held = h.raw();
        WriteKey(h, held)
    }

    pub fn slot(&self) -> Slot<'_> {
        match self.1 {
            Raw::Empty => Slot::Empty,
            // SAFETY: the value the open key holds (see open), made by Entry::into_raw; the borrow of
            // self keeps the key unmodified while the slot lives.
            Raw::Entry(p) => Slot::Entry(unsafe { Entry::from_raw(p) }),
            Raw::WrongType => Slot::WrongType,
        }
    }

    pub fn expire_at(&self) -> i64 {
        self.0.expire_at()
    }

    /// The entry the key holds (before [`WriteKey::store`] replaces it).
    pub fn entry_mut(&mut self) -> Option<&mut Entry> {
        match self.1 {
            // SAFETY: as in slot; the mutable borrow of self makes this the only reference.
            Raw::Entry(p) => Some(unsafe { Entry::from_raw_mut(p) }),
            Raw::Empty | Raw::WrongType => None,
        }
    }

    /// Deletes the key (the type's unlink and free callbacks run).
    pub fn delete(&mut self) -> bool {
        // SAFETY: open write handle.
        let deleted = !self.0 .0.is_null() && unsafe { api!(RedisModule_DeleteKey)(self.0 .0) } == raw::REDISMODULE_OK as c_int;
        if deleted {
            self.1 = Raw::Empty;
        }
        deleted
    }

    /// Makes the key hold `entry` with absolute expiry `expire_at` (NO_DEADLINE: none), and hands it
    /// back as the key now holds it (to attach it to the tag index). An entry already there is replaced
    /// in place, which keeps the key's dictionary slot (the caller detaches its tags first); an empty key
    /// gets a new value.
    pub fn store(&mut self, entry: Box<Entry>, expire_at: i64) -> Result<&mut Entry, &'static str> {
        let ptr = Entry::into_raw(entry);
        self.store_raw(ptr, expire_at)?;
        // SAFETY: `ptr` is the value the open key now holds (Redis owns it until our free callback);
        // nothing else references it while this handle is borrowed mutably.
        Ok(unsafe { Entry::from_raw_mut(ptr) })
    }

    fn store_raw(&mut self, ptr: *mut u8, expire_at: i64) -> Result<(), &'static str> {
        let ptr = ptr.cast::<c_void>();
        if let Raw::Entry(_) = self.1 {
            let mut old: *mut c_void = std::ptr::null_mut();
            // SAFETY: open write handle holding our type; Redis swaps in `ptr` (which it now owns) and hands
            // the old value back to us without calling any callback.
            let rc = unsafe { hot!(RedisModule_ModuleTypeReplaceValue)(self.0 .0, data_type(), ptr, &mut old) };
            if rc == raw::REDISMODULE_OK as c_int {
                // SAFETY: `ptr` was made by Entry::into_raw; the key holds it and nothing else references it.
                let new = unsafe { Entry::from_raw(ptr.cast()) };
                if old.is_null() {
                    crate::stats::entry_added(new);
                } else {
                    // SAFETY: the old value was made by Entry::into_raw and Redis no longer holds it.
                    let old = unsafe { Entry::box_from_raw(old.cast()) };
                    crate::stats::entry_replaced(&old, new);
                }
                self.1 = Raw::Entry(ptr.cast());
                return self.set_expire(expire_at);
            }
            // SAFETY: Redis did not take `ptr`; reclaim it so it is freed exactly once.
            drop(unsafe { Entry::box_from_raw(ptr.cast()) });
            return Err("ERR tiercache could not store the entry");
        }
        // SAFETY: open write handle; on success Redis owns `ptr` and will hand it to our free callback.
        let rc = unsafe { hot!(RedisModule_ModuleTypeSetValue)(self.0 .0, data_type(), ptr) };
        if rc != raw::REDISMODULE_OK as c_int {
            // SAFETY: Redis did not take ownership; reclaim the entry so it is freed exactly once.
            drop(unsafe { Entry::box_from_raw(ptr.cast()) });
            return Err("ERR tiercache could not store the entry");
        }
        // SAFETY: as above: the key holds `ptr` now.
        crate::stats::entry_added(unsafe { Entry::from_raw(ptr.cast()) });
        self.1 = Raw::Entry(ptr.cast());
        self.set_expire(expire_at)
    }

    fn set_expire(&mut self, expire_at: i64) -> Result<(), &'static str> {
        if expire_at != NO_DEADLINE {
            // SAFETY: open write handle holding a value; SetAbsExpire exists since Redis 6.2.
            unsafe { hot!(RedisModule_SetAbsExpire)(self.0 .0, expire_at) };
        } else if self.0.expire_at() != NO_DEADLINE {
            // SAFETY: as above; NO_EXPIRE removes the TTL.
            unsafe { hot!(RedisModule_SetExpire)(self.0 .0, raw::REDISMODULE_NO_EXPIRE as i64) };
        }
        Ok(())
    }
}
