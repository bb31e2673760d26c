//! The `tiercache` data type: RDB save/load through Redis's own primitives (layout and version in
//! `tiercache_core::persist`), AOF rewrite, DEBUG DIGEST, MEMORY USAGE, COPY, unlink (which keeps the
//! tag index exact on every delete path) and free.

use std::os::raw::{c_int, c_void};

use redis_module::raw;
use tiercache_core::persist::{self, LoadError, Sink, Source};
use tiercache_core::tags::{DEAD, PENDING};
use tiercache_core::Entry;

use crate::emit::SetArgv;
use crate::ffi::{api, bytes, guard, Ctx, RStr};
use crate::stats;
use crate::tagindex;

/// The name Redis stores in RDB files (exactly 9 characters).
pub const TYPE_NAME: &std::ffi::CStr = c"tiercache";

/// Registers the type; call from OnLoad only.
pub fn register(ctx: Ctx) -> bool {
    let mut methods = raw::RedisModuleTypeMethods {
        // Version 4 (unlink2/copy2 with key names and db ids) is what Redis 7.0 knows.
        version: 4,
        rdb_load: Some(rdb_load),
        rdb_save: Some(rdb_save),
        aof_rewrite: Some(aof_rewrite),
        mem_usage: Some(mem_usage),
        digest: Some(digest),
        free: Some(free),
        aux_load: None,
        aux_save: None,
        aux_save_triggers: 0,
        free_effort: Some(free_effort),
        unlink: None,
        copy: None,
        defrag: None,
        mem_usage2: None,
        free_effort2: None,
        unlink2: Some(unlink2),
        copy2: Some(copy2),
        aux_save2: None,
    };
    // SAFETY: called during OnLoad with the load context; Redis copies the methods struct.
    let t = unsafe { api!(RedisModule_CreateDataType)(ctx, TYPE_NAME.as_ptr(), persist::ENCODING_VERSION, &mut methods) };
    if t.is_null() {
        return false;
    }
    crate::keys::set_type(t);
    true
}

/// Borrows the entry behind a value pointer handed to a type callback.
///
/// # Safety
/// `v` must be a value of our type: a pointer made by `Entry::into_raw` that Redis still owns.
unsafe fn entry<'a>(v: *const c_void) -> Option<&'a Entry> {
    // SAFETY: guaranteed by the caller.
    (!v.is_null()).then(|| unsafe { Entry::from_raw(v.cast()) })
}

struct Rdb(*mut raw::RedisModuleIO);

impl Rdb {
    fn check<T>(&self, v: T) -> Result<T, LoadError> {
        // SAFETY: self.0 is the live IO handle of this load.
        if unsafe { api!(RedisModule_IsIOError)(self.0) } != 0 {
            Err(LoadError::Io)
        } else {
            Ok(v)
        }
    }
}

impl Sink for Rdb {
    fn put_unsigned(&mut self, v: u64) {
        // SAFETY: live IO handle of this save.
        unsafe { api!(RedisModule_SaveUnsigned)(self.0, v) }
    }
    fn put_signed(&mut self, v: i64) {
        // SAFETY: live IO handle of this save.
        unsafe { api!(RedisModule_SaveSigned)(self.0, v) }
    }
    fn put_bytes(&mut self, v: &[u8]) {
        // SAFETY: live IO handle; Redis copies `len` bytes.
        unsafe { api!(RedisModule_SaveStringBuffer)(self.0, v.as_ptr().cast(), v.len()) }
    }
}

impl Source for Rdb {
    fn get_unsigned(&mut self) -> Result<u64, LoadError> {
        // SAFETY: live IO handle of this load; errors are reported through IsIOError.
        let v = unsafe { api!(RedisModule_LoadUnsigned)(self.0) };
        self.check(v)
    }
    fn get_signed(&mut self) -> Result<i64, LoadError> {
        // SAFETY: as above.
        let v = unsafe { api!(RedisModule_LoadSigned)(self.0) };
        self.check(v)
    }
    fn get_bytes(&mut self) -> Result<Vec<u8>, LoadError> {
        let mut len = 0usize;
        // SAFETY: as above; a non-null result is a Redis allocation of `len` bytes we must free.
        let p = unsafe { api!(RedisModule_LoadStringBuffer)(self.0, &mut len) };
        if p.is_null() {
            return Err(LoadError::Io);
        }
        // SAFETY: p points to `len` readable bytes until freed just below.
        let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }.to_vec();
        // SAFETY: p came from the Redis allocator and is freed once.
        unsafe { api!(RedisModule_Free)(p.cast()) };
        self.check(v)
    }
}

unsafe extern "C" fn rdb_load(io: *mut raw::RedisModuleIO, encver: c_int) -> *mut c_void {
    guard(std::ptr::null_mut(), || match persist::load(&mut Rdb(io), encver) {
        Ok(e) => {
            stats::entry_added(&e);
            Entry::into_raw(e).cast()
        }
        Err(err) => {
            let msg = std::ffi::CString::new(format!("tiercache: cannot load entry: {err}")).unwrap_or_default();
            // SAFETY: live IO handle; one %s argument.
            unsafe { api!(RedisModule_LogIOError)(io, c"warning".as_ptr(), c"%s".as_ptr(), msg.as_ptr()) };
            std::ptr::null_mut()
        }
    })
}

unsafe extern "C" fn rdb_save(io: *mut raw::RedisModuleIO, value: *mut c_void) {
    guard((), || {
        // SAFETY: Redis passes a value of our type.
        if let Some(e) = unsafe { entry(value) } {
            persist::save(e, tagindex::is_dead(e.tags()), &mut Rdb(io));
        }
    })
}

unsafe extern "C" fn aof_rewrite(aof: *mut raw::RedisModuleIO, key: RStr, value: *mut c_void) {
    guard((), || {
        // SAFETY: Redis passes a value of our type.
        // An invalidated entry is left out: replaying the AOF recreates only what readers can see.
        if let Some(e) = unsafe { entry(value) }.filter(|e| !tagindex::is_dead(e.tags())) {
            // Redis appends its own PEXPIREAT for keys with a TTL after our output, so keep the TTL
            // out of the SET (KEEPTTL on a new key means none).
            SetArgv::for_aof(key, e).emit_aof(aof);
        }
    })
}

unsafe extern "C" fn mem_usage(value: *const c_void) -> usize {
    // SAFETY: Redis passes a value of our type.
    guard(0, || unsafe { entry(value) }.map_or(0, Entry::mem_usage))
}

unsafe extern "C" fn digest(md: *mut raw::RedisModuleDigest, value: *mut c_void) {
    guard((), || {
        // SAFETY: Redis passes a value of our type and a live digest.
        let Some(e) = (unsafe { entry(value) }) else { return };
        unsafe {
            let add = api!(RedisModule_DigestAddStringBuffer);
            let add_ll = api!(RedisModule_DigestAddLongLong);
            add_ll(md, e.encoding() as i64);
            add_ll(md, e.fresh_until());
            add_ll(md, e.created());
            add_ll(md, e.size() as i64);
            add(md, e.stored().as_ptr().cast_mut().cast(), e.stored().len());
            for t in e.tags().iter() {
                add(md, t.as_ptr().cast_mut().cast(), t.len());
            }
            api!(RedisModule_DigestEndSequence)(md);
        }
    })
}

unsafe extern "C" fn free(value: *mut c_void) {
    guard((), || {
        if !value.is_null() {
            // SAFETY: Redis hands back ownership of a pointer made by Entry::into_raw, once.
            let e = unsafe { Entry::box_from_raw(value.cast()) };
            stats::entry_removed(&e);
        }
    })
}

/// One allocation pair per entry: always cheap enough to free on the main thread.
unsafe extern "C" fn free_effort(_key: RStr, _value: *const c_void) -> usize {
    guard(1, || 1)
}

/// The key leaves the keyspace (DEL, UNLINK, overwrite, RENAME/MOVE source, expiry, eviction): drop it
/// from the tag index.
unsafe extern "C" fn unlink2(ctx: *mut raw::RedisModuleKeyOptCtx, value: *const c_void) {
    guard((), || {
        // SAFETY: Redis passes a live option context and a value of our type; nothing else references the
        // value during this callback, so updating its tag epochs in place is sound.
        unsafe {
            if value.is_null() {
                return;
            }
            let e = Entry::from_raw_mut(value.cast_mut().cast());
            if e.tags().is_empty() {
                return;
            }
            let key = api!(RedisModule_GetKeyNameFromOptCtx)(ctx);
            let db = api!(RedisModule_GetDbIdFromOptCtx)(ctx);
            if let (false, Ok(db)) = (key.is_null(), usize::try_from(db)) {
                tagindex::detach(db, bytes(key.cast_mut()), e);
            }
        }
    })
}

/// COPY: a clone whose tags are attached when the `copy_to` event names its key. A valid source gives
/// a PENDING copy (it takes the destination database's epochs); an invalidated one a dead copy.
unsafe extern "C" fn copy2(_ctx: *mut raw::RedisModuleKeyOptCtx, value: *const c_void) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        // SAFETY: Redis passes a value of our type and a live option context.
        let Some(src) = (unsafe { entry(value) }) else { return std::ptr::null_mut() };
        let mut copy = src.to_boxed();
        if !copy.tags().is_empty() {
            let dead = tagindex::is_dead(copy.tags());
            copy.tags_mut().set_epochs(|_, _| if dead { DEAD } else { PENDING });
        }
        stats::entry_added(&copy);
        Entry::into_raw(copy).cast()
    })
}
