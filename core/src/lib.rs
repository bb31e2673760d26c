//! tiercache-core: the engine behind the `tiercache` Redis module, with no Redis dependency.
//!
//! - [`entry`]: the cache entry (stored bytes, codec, fresh deadline, tags) and its fresh/stale logic.
//! - [`persist`]: the entry's versioned persistence layout over an abstract field sink/source, which the
//!   module maps onto Redis's own RDB primitives.
//! - [`lz4`]: the lz4 frame shared by the module and the clients.
//! - [`tags`]: a compact, binary-safe tag list.
//! - [`index`]: the tag index, built on [`lintable`] and [`keyset`]: containers whose every operation does
//!   bounded work.
//! - [`args`] and [`num`]: command argument parsing with Redis's error texts.
//! - [`clock`]: a clock that tests can move by hand.
//! - [`cluster`]: the cluster-bus messages and the record of recent invalidations (Redis Cluster).

pub mod args;
pub mod clock;
pub mod cluster;
pub mod entry;
pub mod index;
pub mod keyset;
pub mod lease;
pub mod lintable;
pub mod lz4;
pub mod message;
pub mod num;
pub mod persist;
pub mod tags;

pub use entry::{Encoding, Entry, NO_DEADLINE};
