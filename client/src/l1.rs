//! L1 entries: the stored bytes (what Redis and the Python client share) plus, once read, the decoded
//! value as an `Arc<T>` keyed by its `TypeId`, so a hit of [`crate::TierCache::get_arc`] or
//! [`crate::TierCache::get_or_load_arc`] clones an `Arc` instead of decoding MessagePack again.

use std::any::{Any, TypeId};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use crate::CacheValue;

/// One L1 entry; cloned out of the cache on every hit, so it is one `Arc`.
pub(crate) type L1Entry = Arc<L1Data>;

/// A decoded value of some type, with the type it was decoded as.
#[repr(C)]
pub(crate) struct Decoded {
    type_id: TypeId,
    value: Arc<dyn Any + Send + Sync>,
}

/// `repr(C)`, hot fields first: a hit reads `decoded`'s type (16 bytes, kept 16-aligned so that the load
/// never spans two cache lines), `checked` and `until`, all in the first line after `Arc`'s counts.
#[repr(C)]
pub(crate) struct L1Data {
    /// The first type this entry was read as (a key read as two types decodes the second each time).
    pub(crate) decoded: OnceLock<Decoded>,
    /// The tag epoch ([`crate::Inner`]'s, bumped by every tag invalidation) at which `tags` were last
    /// found current: while it is still the epoch, a hit skips the per-tag checks.
    pub(crate) checked: AtomicU64,
    pub(crate) bytes: Arc<[u8]>,
    /// Deadline on the coarse clock ([`crate::coarse_ms`]).
    pub(crate) until: u64,
    pub(crate) tags: Box<[(Arc<AtomicU64>, u64)]>,
}

impl L1Data {
    pub(crate) fn new(loaded: Option<Decoded>, bytes: Arc<[u8]>, until: u64, tags: Box<[(Arc<AtomicU64>, u64)]>) -> L1Data {
        let decoded = OnceLock::new();
        if let Some(d) = loaded {
            let _ = decoded.set(d);
        }
        L1Data { checked: AtomicU64::new(u64::MAX), bytes, decoded, until, tags }
    }

    /// The value as `T`: the decoded copy when it is a `T`, else decoded now (and kept when the entry
    /// has no decoded copy yet).
    #[inline]
    pub(crate) fn value<T: CacheValue + Send + Sync + 'static>(&self) -> Result<Arc<T>, String> {
        if let Some(d) = self.decoded.get() {
            if d.type_id == TypeId::of::<T>() {
                if let Ok(v) = d.value.clone().downcast::<T>() {
                    return Ok(v);
                }
            }
            return T::from_bytes(&self.bytes).map(Arc::new);
        }
        let v = Arc::new(T::from_bytes(&self.bytes)?);
        let _ = self.decoded.set(Decoded::of(v.clone()));
        Ok(v)
    }
}

impl Decoded {
    pub(crate) fn of<T: Send + Sync + 'static>(v: Arc<T>) -> Decoded {
        Decoded { type_id: TypeId::of::<T>(), value: v }
    }
}

/// A value read or loaded, with its stored bytes (MessagePack, before any lz4 framing).
pub(crate) struct Loaded<T> {
    pub(crate) value: Arc<T>,
    pub(crate) bytes: Arc<[u8]>,
}

impl<T> Clone for Loaded<T> {
    fn clone(&self) -> Self {
        Loaded { value: self.value.clone(), bytes: self.bytes.clone() }
    }
}

impl<T: CacheValue> Loaded<T> {
    /// The value by itself: moved out when nobody else holds it, else decoded from the bytes (no
    /// `Clone` bound on `T`).
    pub(crate) fn into_owned(self) -> Result<T, String> {
        match Arc::try_unwrap(self.value) {
            Ok(v) => Ok(v),
            Err(_) => T::from_bytes(&self.bytes),
        }
    }
}

/// A value shared with L1: the entry itself, whose decoded copy it derefs to. A hit of
/// [`crate::TierCache::get_cached`] costs one reference count, like a raw `quick_cache` get of an
/// `Arc<T>` (an `Arc<T>` from [`crate::TierCache::get_arc`] costs two more: its own count, and the
/// entry's taken and dropped). It keeps the whole entry (bytes and tags) alive while held.
pub struct Cached<T> {
    entry: L1Entry,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Send + Sync + 'static> Cached<T> {
    /// Over an entry whose decoded copy is a `T` (checked), else the entry back.
    #[inline]
    pub(crate) fn over(entry: L1Entry) -> Result<Cached<T>, L1Entry> {
        if entry.decoded.get().is_some_and(|d| d.type_id == TypeId::of::<T>()) {
            Ok(Cached { entry, _t: std::marker::PhantomData })
        } else {
            Err(entry)
        }
    }

    /// A value outside L1 (a load, a read from Redis).
    pub(crate) fn detached(value: Arc<T>, bytes: Arc<[u8]>) -> Cached<T> {
        Cached { entry: Arc::new(L1Data::new(Some(Decoded::of(value)), bytes, 0, Box::new([]))), _t: std::marker::PhantomData }
    }

    /// The value as an `Arc<T>` of its own.
    pub fn to_arc(&self) -> Arc<T> {
        match self.entry.decoded.get().map(|d| d.value.clone().downcast::<T>()) {
            Some(Ok(v)) => v,
            // `over` and `detached` only build a `Cached<T>` over a decoded `T`, which never changes.
            _ => unreachable!("Cached<T> over a value that is not a T"),
        }
    }
}

impl<T: Send + Sync + 'static> std::ops::Deref for Cached<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        match self.entry.decoded.get().and_then(|d| d.value.downcast_ref::<T>()) {
            Some(v) => v,
            // `over` and `detached` only build a `Cached<T>` over a decoded `T`, which never changes.
            None => unreachable!("Cached<T> over a value that is not a T"),
        }
    }
}

impl<T> Clone for Cached<T> {
    fn clone(&self) -> Self {
        Cached { entry: self.entry.clone(), _t: std::marker::PhantomData }
    }
}

impl<T: Send + Sync + std::fmt::Debug + 'static> std::fmt::Debug for Cached<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::ops::Deref::deref(self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoded type sits 16-aligned in the `Arc`'s allocation (16 bytes of counts, then the entry),
    /// so the hit's 16-byte load of it never spans two cache lines.
    #[test]
    fn the_decoded_type_is_16_aligned() {
        let e = Arc::new(L1Data::new(Some(Decoded::of(Arc::new(7u32))), Arc::from(&b""[..]), 0, Box::new([])));
        let d = e.decoded.get().unwrap();
        let at = std::ptr::addr_of!(d.type_id) as usize - Arc::as_ptr(&e) as usize;
        assert_eq!((at + 16) % 16, 0, "type id at {at} bytes into the entry");
    }
}
