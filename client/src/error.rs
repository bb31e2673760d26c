//! The error of every fallible call of [`crate::TierCache`].

use std::sync::Arc;
use std::time::Duration;

/// Why a call failed. Redis problems never surface here from `get_or_load`: it falls back to the loader.
///
/// `#[non_exhaustive]`: match with a `_` arm. Cheap to clone: a loader's error is shared (`Arc<E>`) by
/// every caller coalesced on that load, which all receive the same error rather than retrying in turn.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E> {
    /// The loader failed and no stale value could be served. Shared by the callers coalesced on it.
    Load(Arc<E>),
    /// The loader did not answer within its timeout ([`crate::Opts::load_timeout`] or
    /// [`crate::Builder::load_timeout`]); it was dropped, and its fill lease given back.
    LoadTimeout(Duration),
    /// The value could not be encoded or decoded.
    Codec(String),
    /// A direct Redis call (`set`, `delete`, `invalidate_tags`, `get_many`, `set_many`) failed. Boxed:
    /// the error is large, and every result of a hit carries this enum (an unboxed one made each hit
    /// copy it through a misaligned, store-forwarding-stalled move, about 3 ns).
    Redis(Box<redis::RedisError>),
}

impl<E> Clone for Error<E> {
    fn clone(&self) -> Self {
        match self {
            Error::Load(e) => Error::Load(e.clone()),
            Error::LoadTimeout(d) => Error::LoadTimeout(*d),
            Error::Codec(s) => Error::Codec(s.clone()),
            Error::Redis(e) => Error::Redis(e.clone()),
        }
    }
}

impl<E: std::fmt::Display> std::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Load(e) => write!(f, "loader failed: {e}"),
            Error::LoadTimeout(d) => write!(f, "loader timed out after {d:?}"),
            Error::Codec(e) => write!(f, "codec: {e}"),
            Error::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

/// `source()` is the loader's error (`Load`) or the Redis error (`Redis`), so error reporters
/// (`anyhow`, `eyre`, `tracing`) show the whole chain.
impl<E: std::error::Error + 'static> std::error::Error for Error<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Load(e) => Some(&**e),
            Error::Redis(e) => Some(&**e),
            Error::LoadTimeout(_) | Error::Codec(_) => None,
        }
    }
}

impl<E> From<redis::RedisError> for Error<E> {
    fn from(e: redis::RedisError) -> Self {
        Error::Redis(Box::new(e))
    }
}

impl<E> Error<E> {
    /// The loader's error, when the loader failed.
    pub fn load_error(&self) -> Option<&E> {
        match self {
            Error::Load(e) => Some(e),
            _ => None,
        }
    }
}
