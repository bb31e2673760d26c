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
pub(crate) struct Decoded {
    type_id: TypeId,
    value: Arc<dyn Any + Send + Sync>,
}

pub(crate) struct L1Data {
    pub(crate) bytes: Arc<[u8]>,
    /// The first type this entry was read as (a key read as two types decodes the second each time).
    pub(crate) decoded: OnceLock<Decoded>,
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
        L1Data { bytes, decoded, until, tags }
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
