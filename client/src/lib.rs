//! tiercache-client: an in-process cache (L1) in front of the tiercache Redis module (L2).
//!
//! - **L1** is a [`quick_cache`] cache weighted by bytes; an entry lives until the server's fresh deadline
//!   or `l1_ttl`, whichever comes first.
//! - **Coherence**: one RESP3 connection tracks every key of the namespace (`CLIENT TRACKING ON BCAST
//!   PREFIX`) and subscribes to the module's invalidation messages. A key push drops the key, a tag message
//!   drops every entry carrying the tag (tag generations, checked on each L1 hit), and a gap in the
//!   message sequence, a reset message or a lost connection drops L1 whole. A fill that started before
//!   an invalidation never lands in L1 (global invalidation epoch checked at insert).
//! - **Misses** go through local single-flight (one load per key per process), then `TIERCACHE.GET ...
//!   LEASE ... WAIT` on a connection of its own (blocking reads never share the multiplexed connection),
//!   so one database load serves the whole fleet; the fill is `TIERCACHE.SET ... LEASE` and a `-FENCED`
//!   answer is respected (the value is returned, not cached).
//! - **Failures**: a failing loader falls back to a stale value when there is one (fail-safe); a failing
//!   Redis is bypassed (the loader runs directly, L1 keeps serving) and a circuit breaker stops calling it
//!   for a while after repeated errors.
//!
//! - **Deployments**: one server, the master a set of Sentinels name, or a Redis Cluster (one feed of
//!   tracking + messages per master, gap detection per node); TLS with the `tls` feature (`remote.rs`).
//!
//! Values are MessagePack (`rmp-serde`), so Rust and Python share entries; values of at least
//! `compress_min_size` bytes are lz4-framed by the client and read back undecoded (`ENCODED`), so Redis
//! never decompresses for this client.

#![warn(missing_docs)]

pub mod edge;
mod error;
mod flight;
mod l1;
mod metrics;
mod remote;
// The write paths (write-through, invalidations after commit, write-behind): client/src/write.rs.
mod write;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{PushKind, Value};
use remote::Conn;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tiercache_core::lz4;
use tracing::field::Empty;
use tracing::Instrument;

use l1::{Decoded, L1Data, L1Entry, Loaded};

pub use error::Error;
pub use l1::Cached;
pub use metrics::{Metrics, Snapshot, OPENMETRICS_CONTENT_TYPE};
/// The `prometheus-client` this crate encodes its metrics with (for [`TierCache::register_metrics`]).
pub use prometheus_client;
pub use write::{
    write_behind_shard, write_behind_stream, Accepted, TxError, TxInvalidations, WriteOp, DEFAULT_IDEMPOTENCY_TTL,
    WRITE_BEHIND_SHARDS,
};

/// Per-call options of [`TierCache::get_or_load`] and [`TierCache::set`].
#[derive(Debug, Clone, Default)]
pub struct Opts {
    /// Fresh period (default: the builder's `default_ttl`).
    pub ttl: Option<Duration>,
    /// Stale window after it (default: the builder's `stale`).
    pub stale: Option<Duration>,
    /// Tags to invalidate the entry by.
    pub tags: Vec<String>,
    /// Neither read nor write this process's L1 on this call (Redis and the loader only).
    pub skip_l1: bool,
    /// Neither read nor write Redis on this call (L1 and the loader only, no lease).
    pub skip_l2: bool,
    /// Early refresh (XFetch) weight sent as the lease read's `BETA` (default: the builder's `beta`,
    /// none). 1 is the usual value; a fresh entry is then refreshed by one caller, in the background,
    /// with a probability that grows as its deadline nears.
    pub beta: Option<f64>,
    /// Longest the loader may run (default: the builder's `load_timeout`, none). Past it the loader is
    /// dropped, its lease given back, and the call answers a stale copy or [`Error::LoadTimeout`].
    pub load_timeout: Option<Duration>,
}

impl Opts {
    /// Sets [`Opts::ttl`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
    /// Sets [`Opts::stale`].
    pub fn stale(mut self, stale: Duration) -> Self {
        self.stale = Some(stale);
        self
    }
    /// Adds a tag to [`Opts::tags`].
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
    /// Sets [`Opts::skip_l1`].
    pub fn skip_l1(mut self) -> Self {
        self.skip_l1 = true;
        self
    }
    /// Sets [`Opts::skip_l2`].
    pub fn skip_l2(mut self) -> Self {
        self.skip_l2 = true;
        self
    }
    /// Sets [`Opts::beta`].
    pub fn beta(mut self, beta: f64) -> Self {
        self.beta = Some(beta);
        self
    }
    /// Sets [`Opts::load_timeout`].
    pub fn load_timeout(mut self, d: Duration) -> Self {
        self.load_timeout = Some(d);
        self
    }
}

/// How this client hears of changed keys (see [`Builder::tracking`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Tracking {
    /// `CLIENT TRACKING ON BCAST PREFIX <namespace>`: a message for every write of the namespace, read
    /// here or not; no server memory per key. Every read path fills L1.
    #[default]
    Broadcast,
    /// `CLIENT TRACKING ON` without `BCAST`: messages only for keys this client read on its tracking
    /// connection; the server remembers each (key, client) pair until the key changes. L1 takes only
    /// values read on that connection (a plain `TIERCACHE.GET` first on each L1 miss), never a value
    /// this client just wrote or loaded (its own write untracks the key, so the next read fetches it).
    ReadKeys,
}

/// Configuration; see [`TierCache::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    target: remote::Target,
    topology_check: Duration,
    #[cfg(feature = "tls")]
    tls_root_cert: Option<Vec<u8>>,
    namespace: String,
    schema_version: u32,
    l1_max_bytes: u64,
    l1_ttl: Duration,
    default_ttl: Duration,
    stale: Duration,
    lease_timeout: Duration,
    wait_timeout: Duration,
    compress_min_size: usize,
    ttl_jitter: f64,
    op_timeout: Duration,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    channel: String,
    tracking_mode: Tracking,
    beta: Option<f64>,
    load_timeout: Option<Duration>,
}

impl Builder {
    /// The namespace every key of this cache lives under (`<namespace>:v<version>:<key>`; default
    /// `"app"`), also the prefix its invalidation tracking covers.
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }
    /// Keys become `<namespace>:v<version>:<key>`; bumping the version abandons every old entry at once.
    pub fn schema_version(mut self, v: u32) -> Self {
        self.schema_version = v;
        self
    }
    /// Size of L1 in bytes of keys and encoded values (default 64 MiB).
    pub fn l1_max_bytes(mut self, n: u64) -> Self {
        self.l1_max_bytes = n;
        self
    }
    /// Longest an entry stays in L1 (also capped by its fresh deadline).
    pub fn l1_ttl(mut self, d: Duration) -> Self {
        self.l1_ttl = d;
        self
    }
    /// Fresh period of an entry written without [`Opts::ttl`] (default 5 minutes).
    pub fn default_ttl(mut self, d: Duration) -> Self {
        self.default_ttl = d;
        self
    }
    /// Stale window after the fresh period of an entry written without [`Opts::stale`] (default none):
    /// Redis serves the old value while one caller refreshes it, and a failing loader falls back to it.
    pub fn stale(mut self, d: Duration) -> Self {
        self.stale = d;
        self
    }
    /// How long a fill lease this client takes may stay unfilled before Redis gives it to the next
    /// reader (default 5 s).
    pub fn lease_timeout(mut self, d: Duration) -> Self {
        self.lease_timeout = d;
        self
    }
    /// How long a read waits in Redis for another client's fill before loading itself (default 2 s).
    pub fn wait_timeout(mut self, d: Duration) -> Self {
        self.wait_timeout = d;
        self
    }
    /// Values of at least this many encoded bytes are lz4-framed by the client (default 1024).
    pub fn compress_min_size(mut self, n: usize) -> Self {
        self.compress_min_size = n;
        self
    }
    /// Spreads expiries: each write's TTL is shortened by a random fraction up to `fraction` (0..=0.5),
    /// so entries written together do not all expire together.
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.ttl_jitter = fraction.clamp(0.0, 0.5);
        self
    }
    /// Timeout of a non-blocking Redis call; past it Redis counts as failing.
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }
    /// Consecutive Redis failures that open the circuit, and how long it stays open before a probe.
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = failures.max(1);
        self.breaker_cooldown = cooldown;
        self
    }
    /// The module's `tiercache.invalidation-channel`.
    pub fn invalidation_channel(mut self, c: impl Into<String>) -> Self {
        self.channel = c.into();
        self
    }

    /// How invalidations reach this client: [`Tracking::Broadcast`] (default) or [`Tracking::ReadKeys`].
    pub fn tracking(mut self, mode: Tracking) -> Self {
        self.tracking_mode = mode;
        self
    }
    /// Default early-refresh weight of every lease read (see [`Opts::beta`]).
    pub fn beta(mut self, beta: f64) -> Self {
        self.beta = Some(beta);
        self
    }
    /// Default loader timeout (see [`Opts::load_timeout`]).
    pub fn load_timeout(mut self, d: Duration) -> Self {
        self.load_timeout = Some(d);
        self
    }
    /// Talks to a Redis Cluster through any of its `nodes` (`redis://host:port` URLs): commands route by
    /// key, and each master's invalidations are listened to on a connection of its own.
    pub fn cluster<S: Into<String>>(mut self, nodes: impl IntoIterator<Item = S>) -> Self {
        self.target = remote::Target::Cluster(nodes.into_iter().map(Into::into).collect());
        self
    }
    /// Talks to the master that the Sentinels at `sentinels` (`redis://host:port` URLs) name
    /// `master_name`, asking them again at every reconnect (so a failover leads to the new master).
    pub fn sentinel<S: Into<String>>(mut self, sentinels: impl IntoIterator<Item = S>, master_name: impl Into<String>) -> Self {
        self.target =
            remote::Target::Sentinel { sentinels: sentinels.into_iter().map(Into::into).collect(), master: master_name.into() };
        self
    }
    /// Cluster mode: how often the masters and their slots are polled; a change of masters (a failover,
    /// a master added or removed) drops L1 and reconnects every node's invalidation feed.
    pub fn topology_check(mut self, d: Duration) -> Self {
        self.topology_check = d.max(Duration::from_millis(10));
        self
    }
    /// Trusts these PEM root certificates for `rediss://` URLs instead of the system's (feature `tls`).
    #[cfg(feature = "tls")]
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }

    /// Connects (lazily if Redis is down: the cache then starts degraded and keeps trying).
    pub async fn build(self) -> Result<TierCache, redis::RedisError> {
        if self.tracking_mode == Tracking::ReadKeys && matches!(self.target, remote::Target::Cluster(_)) {
            // A read-key tracked value must be read on the feed that tracks it; a cluster read that is
            // redirected (MOVED/ASK) lands on another connection, untracked. Refused rather than risked.
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "tiercache: Tracking::ReadKeys is not supported with Redis Cluster (use Tracking::Broadcast)",
            )));
        }
        let settings = remote::Settings {
            op_timeout: self.op_timeout,
            blocking_timeout: self.wait_timeout + self.op_timeout,
            tracking: self.tracking_mode,
            #[cfg(feature = "tls")]
            tls_root_cert: self.tls_root_cert.clone(),
        };
        let remote = remote::Remote::new(self.target.clone(), settings)?;
        let l1 = quick_cache::sync::Cache::with_weighter(1024, self.l1_max_bytes, L1Weigher);
        let inner = Arc::new(Inner {
            prefix: format!("{}:v{}:", self.namespace, self.schema_version),
            ns_tag: format!("ns:{}:v{}", self.namespace, self.schema_version),
            cfg: self,
            remote,
            main: tokio::sync::Mutex::new(None),
            blocking: Mutex::new(Vec::new()),
            l1,
            epoch: AtomicU64::new(0),
            tag_epoch: AtomicU64::new(0),
            key_gens: (0..KEY_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            tags: Mutex::new(HashMap::new()),
            flights: flight::Flights::default(),
            metrics: Metrics::default(),
            failures: AtomicU64::new(0),
            open_until: Mutex::new(None),
            closed: AtomicBool::new(false),
            tracking: AtomicBool::new(false),
        });
        let _ = inner.main_conn().await;
        Ok(TierCache { inner })
    }
}

/// The cache. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct TierCache {
    inner: Arc<Inner>,
}

/// Milliseconds since the first call, from a clock a background thread advances every millisecond:
/// an L1 hit reads one atomic instead of the system clock (about 25 ns).
fn coarse_ms() -> u64 {
    static NOW: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::Once = std::sync::Once::new();
    START.call_once(|| {
        let origin = Instant::now();
        let _ = std::thread::Builder::new().name("tiercache-clock".into()).spawn(move || loop {
            NOW.store(origin.elapsed().as_millis() as u64, Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        });
    });
    NOW.load(Relaxed)
}

/// What an L1 insert must still match to land: taken before the read or load it follows, so that any
/// invalidation of the key, one of its tags, or the whole cache in between keeps it out.
struct Ticket {
    /// Whether invalidations were flowing: an entry loaded while Redis is away may land (L1 keeps
    /// serving during an outage) but is dropped when coherence resumes; a change in between voids it.
    tracking: bool,
    epoch: u64,
    key_bucket: usize,
    key_gen: u64,
    tags: Vec<(Arc<AtomicU64>, u64)>,
}

/// A fill lease and the connection that took it. The server ends a lease when its holder's connection
/// closes, so this connection stays out of the pool (whose connections are dropped past its size, or
/// all at once when the main connection fails) until the lease's fill or release has been answered;
/// only then does it go back. Dropping a `Lease` instead closes the connection, which ends the lease
/// on the server at once (the next parked reader takes it over) rather than at its milliseconds.
struct Lease {
    conn: Conn,
    token: Vec<u8>,
}

/// Idle lease-read connections kept for reuse.
const BLOCKING_POOL_SIZE: usize = 16;

/// Tag generations kept before they are all dropped (with L1).
const MAX_TRACKED_TAGS: usize = 100_000;

/// Generations of keys, hashed into buckets (a collision only costs a skipped L1 insert).
const KEY_BUCKETS: usize = 4096;

#[derive(Clone)]
struct L1Weigher;

impl quick_cache::Weighter<String, L1Entry> for L1Weigher {
    fn weight(&self, key: &String, val: &L1Entry) -> u64 {
        // The bytes, and about as much again for the decoded copy most entries get.
        (key.len() + 2 * val.bytes.len() + 96) as u64
    }
}

struct Inner {
    cfg: Builder,
    prefix: String,
    ns_tag: String,
    /// Where connections come from (one server, Sentinel or Cluster).
    remote: remote::Remote,
    /// Standalone: the RESP3 connection of ordinary commands, key tracking and the invalidation
    /// subscription. Cluster: the cluster connection (the feeds are per master, in `remote`).
    main: tokio::sync::Mutex<Option<Conn>>,
    /// Idle connections for blocking lease reads (one read at a time each). None of them holds a
    /// lease: a connection that took one is kept by its [`Lease`] until the fill or release is done.
    blocking: Mutex<Vec<Conn>>,
    /// Keyed by the caller's key (without the namespace prefix), so a hit allocates nothing.
    l1: quick_cache::sync::Cache<String, L1Entry, L1Weigher>,
    /// Bumped when L1 is dropped whole (gap, reset, lost connection).
    epoch: AtomicU64,
    /// Bumped after every tag generation bump: an L1 entry checked at this epoch needs no tag check.
    tag_epoch: AtomicU64,
    /// Bumped when a key of the bucket is invalidated.
    key_gens: Box<[AtomicU64]>,
    /// Tag -> generation, bumped when the tag is invalidated; L1 entries remember the generations.
    tags: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Keys being loaded by this process.
    flights: flight::Flights,
    metrics: Metrics,
    failures: AtomicU64,
    open_until: Mutex<Option<Instant>>,
    closed: AtomicBool,
    /// The tracking + subscription connection is up: only then may L1 take new entries.
    tracking: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.store(true, SeqCst);
    }
}

/// The invalidation message (see the module's COMMANDS.md).
#[derive(Deserialize)]
struct Message {
    v: u64,
    run_id: String,
    seq: u64,
    #[serde(default)]
    reset: bool,
    #[serde(default)]
    tags: Vec<serde_bytes_compat::Bytes>,
}

mod serde_bytes_compat {
    /// A MessagePack bin (or str) decoded as bytes.
    #[derive(Debug)]
    pub struct Bytes(pub Vec<u8>);

    impl<'de> serde::Deserialize<'de> for Bytes {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
                fn visit_str<E>(self, v: &str) -> Result<Bytes, E> {
                    Ok(Bytes(v.as_bytes().to_vec()))
                }
            }
            d.deserialize_bytes(V)
        }
    }
}

/// A number in [0, 1) from a per-thread xorshift (jitter needs no quality, only spread).
fn jitter_unit() -> f64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// How a value is stored: MessagePack (named fields, `rmp-serde`) for every `Serialize +
/// DeserializeOwned` type, so Rust and Python read the same entries; [`Raw`] stores bytes as they are.
pub trait CacheValue: Sized {
    /// The bytes stored for the value.
    fn to_bytes(&self) -> Result<Vec<u8>, String>;
    /// The value of stored bytes; `Err` with a message when they are not one.
    fn from_bytes(b: &[u8]) -> Result<Self, String>;
}

impl<T: Serialize + DeserializeOwned> CacheValue for T {
    fn to_bytes(&self) -> Result<Vec<u8>, String> {
        rmp_serde::to_vec_named(self).map_err(|e| e.to_string())
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        rmp_serde::from_slice(b).map_err(|e| e.to_string())
    }
}

/// Bytes stored verbatim (no MessagePack): for values that are already encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw(pub Vec<u8>);

impl CacheValue for Raw {
    fn to_bytes(&self) -> Result<Vec<u8>, String> {
        Ok(self.0.clone())
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        Ok(Raw(b.to_vec()))
    }
}

fn encode<T: CacheValue>(v: &T) -> Result<Vec<u8>, String> {
    v.to_bytes()
}

fn decode<T: CacheValue>(b: &[u8]) -> Result<T, String> {
    T::from_bytes(b)
}

fn bulk(v: Option<&Value>) -> Option<Vec<u8>> {
    match v {
        Some(Value::BulkString(b)) => Some(b.clone()),
        Some(Value::SimpleString(s)) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

impl TierCache {
    /// Starts a configuration for the Redis at `redis_url` (`redis://host:port/db`).
    pub fn builder(redis_url: impl Into<String>) -> Builder {
        Builder {
            target: remote::Target::Standalone(redis_url.into()),
            topology_check: Duration::from_secs(1),
            #[cfg(feature = "tls")]
            tls_root_cert: None,
            namespace: "app".into(),
            schema_version: 1,
            l1_max_bytes: 64 << 20,
            l1_ttl: Duration::from_secs(10),
            default_ttl: Duration::from_secs(300),
            stale: Duration::from_secs(0),
            lease_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(2),
            compress_min_size: 1024,
            ttl_jitter: 0.0,
            op_timeout: Duration::from_millis(500),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(2),
            channel: "tiercache:invalidations".into(),
            tracking_mode: Tracking::Broadcast,
            beta: None,
            load_timeout: None,
        }
    }

    /// Starts a configuration over an existing `redis::Client` (its address, database, credentials and
    /// TLS settings). The cache opens its own connections from it: the tracking connection speaks RESP3
    /// whatever the client's protocol, and each parked lease read needs a connection of its own, so a
    /// shared `ConnectionManager` or multiplexed connection cannot serve in their place.
    pub fn builder_with_client(client: redis::Client) -> Builder {
        let mut b = Self::builder(String::new());
        b.target = remote::Target::Client(client);
        b
    }

    /// Starts a configuration for a Redis Cluster reached through any of `nodes` (`redis://host:port`);
    /// see [`Builder::cluster`].
    pub fn builder_cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Builder {
        Self::builder("").cluster(nodes)
    }

    /// Starts a configuration for the master the Sentinels at `sentinels` name `master_name`; see
    /// [`Builder::sentinel`].
    pub fn builder_sentinel<S: Into<String>>(sentinels: impl IntoIterator<Item = S>, master_name: impl Into<String>) -> Builder {
        Self::builder("").sentinel(sentinels, master_name)
    }

    /// Counters and gauges now.
    pub fn metrics(&self) -> Snapshot {
        let i = &self.inner;
        i.metrics.snapshot(i.l1.len() as u64, i.l1.weight(), i.circuit_open())
    }

    /// OpenMetrics text ([`OPENMETRICS_CONTENT_TYPE`]) of every metric of this cache now: the counters
    /// and gauges of [`TierCache::metrics`], and the histograms `tiercache_client_load_duration_seconds`
    /// and `tiercache_client_l2_latency_seconds`.
    pub fn render_prometheus(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        self.register_metrics(&mut registry);
        metrics::render(&registry)
    }

    /// Adds this cache's metrics (those of [`TierCache::render_prometheus`]) to an application's
    /// registry, read at each scrape. Several caches in one registry need a label each:
    /// `cache.register_metrics(registry.sub_registry_with_label(("cache".into(), "users".into())))`.
    /// The registry holds no strong reference: a dropped cache's metrics disappear.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(Exposition(Arc::downgrade(&self.inner))));
    }

    /// The Redis key of `key` in this namespace and schema version.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{}", self.inner.prefix, key)
    }

    /// Reads `key` from L1, then Redis (no lease, no load). `None` on a miss or when Redis fails.
    pub async fn get<T: CacheValue>(&self, key: &str) -> Result<Option<T>, Error<std::convert::Infallible>> {
        self.get_with(key, &Opts::default()).await
    }

    /// [`TierCache::get`] with per-call options ([`Opts::skip_l1`], [`Opts::skip_l2`]).
    pub async fn get_with<T: CacheValue>(&self, key: &str, opts: &Opts) -> Result<Option<T>, Error<std::convert::Infallible>> {
        if !self.inner.tracking.load(Relaxed) {
            self.inner.resume_coherence().await;
        }
        if !opts.skip_l1 {
            if let Some(e) = self.inner.l1_get(key) {
                return decode(&e.bytes).map(Some).map_err(Error::Codec);
            }
        }
        match self.get_l2(key, opts).await? {
            Some(raw) => decode(&raw).map(Some).map_err(Error::Codec),
            None => Ok(None),
        }
    }

    /// Like [`TierCache::get`], as a shared `Arc<T>`: an L1 hit hands out the decoded value L1 keeps
    /// (no MessagePack decode, no copy). The value's type must be the same on every read of the key for
    /// that (a key read as two types decodes the second type on each hit).
    #[inline]
    pub async fn get_arc<T: CacheValue + Send + Sync + 'static>(
        &self,
        key: &str,
    ) -> Result<Option<Arc<T>>, Error<std::convert::Infallible>> {
        if !self.inner.tracking.load(Relaxed) {
            self.inner.resume_coherence().await;
        }
        if let Some(e) = self.inner.l1_get(key) {
            return e.value::<T>().map(Some).map_err(Error::Codec);
        }
        match self.get_l2(key, &Opts::default()).await? {
            Some(raw) => decode(&raw).map(|v| Some(Arc::new(v))).map_err(Error::Codec),
            None => Ok(None),
        }
    }

    /// Like [`TierCache::get_arc`], as a [`Cached`] handle on L1's entry: the cheapest hit (one
    /// reference count, as a raw `quick_cache` get of an `Arc<T>`).
    #[inline]
    pub async fn get_cached<T: CacheValue + Send + Sync + 'static>(
        &self,
        key: &str,
    ) -> Result<Option<Cached<T>>, Error<std::convert::Infallible>> {
        if !self.inner.tracking.load(Relaxed) {
            self.inner.resume_coherence().await;
        }
        if let Some(e) = self.inner.l1_get(key) {
            return Ok(Some(Self::cached_of(e)?));
        }
        match self.get_l2(key, &Opts::default()).await? {
            Some(raw) => decode(&raw).map(|v| Some(Cached::detached(Arc::new(v), raw.into()))).map_err(Error::Codec),
            None => Ok(None),
        }
    }

    /// The L1 read alone, as a plain call (no future): `Some` on an L1 hit, as [`TierCache::get_cached`]
    /// would answer it (the same tag, deadline and type checks, counted as an L1 hit), `None` on an L1
    /// miss. It never calls Redis, and answers `None` while invalidations are not flowing (Redis away or
    /// reconnecting): the async reads then try to resume coherence first and serve L1 through an
    /// outage, this one does not trust L1 unchecked. `Err` when the entry cannot be decoded as `T`.
    ///
    /// For sync code, and for hot loops that fall back to an async read on `None`: it is the cheapest
    /// read, the same hit without an `async` call around it (measured in BENCHMARKS.md).
    ///
    /// ```no_run
    /// # use tiercache_client::{Cached, Opts, TierCache};
    /// # async fn f(cache: &TierCache, opts: &Opts) -> Result<(), Box<dyn std::error::Error>> {
    /// let user: Cached<String> = match cache.get_l1("user:42")? {
    ///     Some(hit) => hit,
    ///     None => cache.get_or_load_cached("user:42", opts, || async { Ok::<_, std::io::Error>("Ada".to_string()) }).await?,
    /// };
    /// # Ok(()) }
    /// ```
    #[inline]
    pub fn get_l1<T: CacheValue + Send + Sync + 'static>(
        &self,
        key: &str,
    ) -> Result<Option<Cached<T>>, Error<std::convert::Infallible>> {
        let i = &self.inner;
        if !i.tracking.load(Relaxed) {
            metrics::bump(&i.metrics.l1_misses);
            return Ok(None);
        }
        match i.l1_get(key) {
            Some(e) => Self::cached_of(e).map(Some),
            None => Ok(None),
        }
    }

    /// A hit as a [`Cached`]: over the entry when its decoded copy is a `T` (decoding it first if the
    /// entry has none yet), else over a copy decoded for this call.
    #[inline(always)]
    fn cached_of<T: CacheValue + Send + Sync + 'static, X>(e: L1Entry) -> Result<Cached<T>, Error<X>> {
        // Moved in, not cloned: a hit costs the one reference count quick_cache's get took.
        match Cached::over(e) {
            Ok(c) => Ok(c),
            Err(e) => Self::cached_decoding(e),
        }
    }

    /// `cached_of` of an entry not yet decoded as a `T`.
    #[inline(never)]
    fn cached_decoding<T: CacheValue + Send + Sync + 'static, X>(e: L1Entry) -> Result<Cached<T>, Error<X>> {
        let e = if e.decoded.get().is_none() {
            e.value::<T>().map_err(Error::Codec)?;
            match Cached::over(e) {
                Ok(c) => return Ok(c),
                Err(e) => e,
            }
        } else {
            e
        };
        Ok(Cached::detached(e.value::<T>().map_err(Error::Codec)?, e.bytes.clone()))
    }

    /// `TIERCACHE.GET key ENCODED` on the main connection: the value's bytes, `None` on a miss, when
    /// Redis fails or with `skip_l2`.
    async fn get_l2(&self, key: &str, opts: &Opts) -> Result<Option<Vec<u8>>, Error<std::convert::Infallible>> {
        if opts.skip_l2 {
            return Ok(None);
        }
        let full = self.redis_key(key);
        let reply: Option<Value> = self.inner.call(redis::cmd("TIERCACHE.GET").arg(&full).arg("ENCODED")).await.ok();
        match reply {
            Some(Value::Array(v)) => self.inner.read_encoded(bulk(v.first()).as_deref(), bulk(v.get(1))).map(Some),
            _ => Ok(None),
        }
    }

    /// Stores `value` (Redis, then L1).
    pub async fn set<T: CacheValue>(&self, key: &str, value: &T, opts: &Opts) -> Result<(), Error<std::convert::Infallible>> {
        let full = self.redis_key(key);
        let raw = encode(value).map_err(Error::Codec)?;
        if !opts.skip_l2 {
            let cmd = self.inner.set_cmd(&full, &raw, opts, None);
            self.inner.call::<()>(&cmd).await.map_err(Error::from)?;
        }
        self.after_write(&full, raw, opts);
        Ok(())
    }

    /// After a write of `full` on the main connection: L1 takes the new value.
    fn after_write(&self, full: &str, raw: Vec<u8>, opts: &Opts) {
        // A read that reached Redis before this write may be about to put the old value in L1 (and
        // NOLOOP means no push for our own write): void it, then store the new value.
        self.inner.drop_key(full);
        let ticket = self.inner.ticket(full, opts);
        if opts.skip_l2 {
            // Nothing was written to Redis: nothing untracked either.
            self.inner.l1_put(full, None, raw.into(), opts, ticket);
        } else {
            self.inner.l1_put_own_write(full, raw, opts, ticket);
        }
    }

    /// Reads many keys: L1 first, then every miss in one pipelined round trip (`TIERCACHE.GET key
    /// ENCODED` each). `None` for a miss; all the misses stay `None` when Redis fails.
    pub async fn get_many<T: CacheValue>(&self, keys: &[&str]) -> Result<Vec<Option<T>>, Error<std::convert::Infallible>> {
        let i = &self.inner;
        if !i.tracking.load(Relaxed) {
            i.resume_coherence().await;
        }
        let mut out: Vec<Option<T>> = keys.iter().map(|_| None).collect();
        let mut misses = Vec::new();
        for (n, k) in keys.iter().enumerate() {
            match i.l1_get(k) {
                Some(e) => out[n] = Some(decode(&e.bytes).map_err(Error::Codec)?),
                None => misses.push((n, self.redis_key(k))),
            }
        }
        if misses.is_empty() || i.circuit_open() {
            return Ok(out);
        }
        let fulls: Vec<&str> = misses.iter().map(|(_, f)| f.as_str()).collect();
        for batch in pipeline_batches(&fulls, i.remote.is_cluster()) {
            let mut pipe = redis::pipe();
            for &b in &batch {
                pipe.cmd("TIERCACHE.GET").arg(fulls[b]).arg("ENCODED");
            }
            let Ok(replies) = i.call_pipe(&pipe).await else { continue };
            for (&b, reply) in batch.iter().zip(replies) {
                if let Value::Array(v) = reply {
                    let raw = i.read_encoded(bulk(v.first()).as_deref(), bulk(v.get(1)))?;
                    out[misses[b].0] = Some(decode(&raw).map_err(Error::Codec)?);
                }
            }
        }
        Ok(out)
    }

    /// Stores many values with the same options in one pipelined round trip, then in L1. On an error
    /// (the first one Redis answered) some of the values may be stored; none is left in L1.
    pub async fn set_many<T: CacheValue>(
        &self,
        items: &[(&str, &T)],
        opts: &Opts,
    ) -> Result<(), Error<std::convert::Infallible>> {
        let i = &self.inner;
        let mut encoded = Vec::with_capacity(items.len());
        for (k, v) in items {
            encoded.push((self.redis_key(k), encode(*v).map_err(Error::Codec)?));
        }
        if !opts.skip_l2 && !encoded.is_empty() {
            let fulls: Vec<&str> = encoded.iter().map(|(f, _)| f.as_str()).collect();
            for batch in pipeline_batches(&fulls, i.remote.is_cluster()) {
                let mut pipe = redis::pipe();
                for &b in &batch {
                    let (full, raw) = &encoded[b];
                    pipe.add_command(i.set_cmd(full, raw, opts, None)).ignore();
                }
                if let Err(e) = i.call_pipe(&pipe).await {
                    for (full, _) in &encoded {
                        i.drop_key(full);
                    }
                    return Err(Error::from(e));
                }
            }
        }
        for (full, raw) in encoded {
            self.after_write(&full, raw, opts);
        }
        Ok(())
    }

    /// Deletes `key` everywhere (other processes hear of it through key tracking). It is
    /// `TIERCACHE.DEL`, which also fences a fill in flight, even of a key not cached yet: call it after
    /// the database commit, and no loader that read the old row can store it afterwards.
    pub async fn delete(&self, key: &str) -> Result<(), Error<std::convert::Infallible>> {
        let full = self.redis_key(key);
        self.inner.drop_key(&full);
        let r = self.inner.call::<i64>(redis::cmd("TIERCACHE.DEL").arg(&full)).await;
        // Again after the reply: a read that began between the first drop and the delete reached Redis
        // before it and may have put the old value back (NOLOOP: no push will come for our own write).
        self.inner.drop_key(&full);
        r.map_err(Error::from)?;
        Ok(())
    }

    /// Invalidates tags on the server (every process hears of it) and drops them here, before the
    /// command and again after its reply, so that a read racing the command cannot leave the old value
    /// in this process's L1 (read-your-writes within a process; other processes follow within the
    /// message's delivery time, about a millisecond).
    pub async fn invalidate_tags(&self, tags: &[&str]) -> Result<u64, Error<std::convert::Infallible>> {
        for t in tags {
            self.inner.drop_tag(t.as_bytes());
        }
        let mut cmd = redis::cmd("TIERCACHE.INVALIDATE");
        for t in tags {
            cmd.arg(*t);
        }
        let r = self.inner.call::<u64>(&cmd).await;
        for t in tags {
            self.inner.drop_tag(t.as_bytes());
        }
        r.map_err(Error::from)
    }

    /// Drops every entry of this namespace and schema version (O(1) on the server: the namespace tag).
    pub async fn flush_namespace(&self) -> Result<u64, Error<std::convert::Infallible>> {
        let tag = self.inner.ns_tag.clone();
        self.invalidate_tags(&[tag.as_str()]).await
    }

    /// Returns the cached value of `key`, or loads it once for the whole fleet: L1, then this process's
    /// in-flight load of the same key (whose outcome, value or error, every caller that joined it
    /// shares), then Redis with a fill lease (waiting in Redis while another client loads), then
    /// `loader`, whose value is stored in Redis and L1.
    ///
    /// A stale value (inside the entry's stale window) or an early-refresh election (XFetch, with
    /// [`Opts::beta`]) is returned at once while this call refreshes the entry in the background, hence
    /// the `Send + 'static` bounds. Dropping the returned future (or [`Opts::load_timeout`]) drops the
    /// loader and ends its lease at once: the next reader in the fleet takes it over.
    pub async fn get_or_load<T, E, F, Fut>(&self, key: &str, opts: &Opts, loader: F) -> Result<T, Error<E>>
    where
        T: CacheValue + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let i = &self.inner;
        if !i.tracking.load(Relaxed) {
            i.resume_coherence().await;
        }
        if !opts.skip_l1 {
            if let Some(e) = i.l1_get(key) {
                return decode(&e.bytes).map_err(Error::Codec);
            }
        }
        self.load_shared(key, opts, loader).await?.into_owned().map_err(Error::Codec)
    }

    /// [`TierCache::get_or_load`] as a shared `Arc<T>`: an L1 hit hands out the decoded value L1 keeps,
    /// with no MessagePack decode and no copy (see [`TierCache::get_arc`]).
    #[inline]
    pub async fn get_or_load_arc<T, E, F, Fut>(&self, key: &str, opts: &Opts, loader: F) -> Result<Arc<T>, Error<E>>
    where
        T: CacheValue + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let i = &self.inner;
        if !i.tracking.load(Relaxed) {
            i.resume_coherence().await;
        }
        if !opts.skip_l1 {
            if let Some(e) = i.l1_get(key) {
                return e.value::<T>().map_err(Error::Codec);
            }
        }
        Ok(self.load_shared(key, opts, loader).await?.value)
    }

    /// [`TierCache::get_or_load`] as a [`Cached`] handle on L1's entry: the cheapest hit (one reference
    /// count, as a raw `quick_cache` get of an `Arc<T>`).
    #[inline]
    pub async fn get_or_load_cached<T, E, F, Fut>(&self, key: &str, opts: &Opts, loader: F) -> Result<Cached<T>, Error<E>>
    where
        T: CacheValue + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let i = &self.inner;
        if !i.tracking.load(Relaxed) {
            i.resume_coherence().await;
        }
        if !opts.skip_l1 {
            if let Some(e) = i.l1_get(key) {
                return Self::cached_of(e);
            }
        }
        let loaded = self.load_shared(key, opts, loader).await?;
        Ok(Cached::detached(loaded.value, loaded.bytes))
    }

    /// Local single-flight ([`flight`]): the first caller loads, the others share its outcome.
    async fn load_shared<T, E, F, Fut>(&self, key: &str, opts: &Opts, loader: F) -> Result<Loaded<T>, Error<E>>
    where
        T: CacheValue + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let i = &self.inner;
        let full = self.redis_key(key);
        loop {
            match i.flights.join(&full) {
                flight::Role::Wait(slot) => {
                    metrics::bump(&i.metrics.coalesced_local);
                    match flight::wait(slot).await {
                        Some(outcome) => match outcome.downcast_ref::<Result<Loaded<T>, Error<E>>>() {
                            Some(r) => return r.clone(),
                            // The same key loaded as another type: load for ourselves.
                            None => return self.load_through_redis(&full, opts, loader).await,
                        },
                        // The leader was dropped (its caller went away): one of us leads now.
                        None => continue,
                    }
                }
                flight::Role::Lead(leader) => {
                    let out = self.load_through_redis(&full, opts, loader).await;
                    leader.publish(Arc::new(out.clone()));
                    return out;
                }
            }
        }
    }

    async fn load_through_redis<T, E, F, Fut>(&self, full: &str, opts: &Opts, loader: F) -> Result<Loaded<T>, Error<E>>
    where
        T: CacheValue + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let i = &self.inner;
        let epoch = i.ticket(full, opts);
        if opts.skip_l2 {
            return self.run_loader(full, opts, loader, None, epoch).await;
        }
        if i.cfg.tracking_mode == Tracking::ReadKeys && !opts.skip_l1 && !i.circuit_open() {
            // Only a value read on the tracking connection may enter L1: read it there first.
            let cmd = redis::cmd("TIERCACHE.GET").arg(full).arg("ENCODED").clone();
            if let Ok(Value::Array(v)) = i.call::<Value>(&cmd).await {
                if let Ok(raw) = i.read_encoded(bulk(v.first()).as_deref(), bulk(v.get(1))) {
                    metrics::bump(&i.metrics.l2_hits);
                    let value = Arc::new(decode::<T>(&raw).map_err(Error::Codec)?);
                    let bytes: Arc<[u8]> = raw.into();
                    i.l1_put(full, Some(Decoded::of(value.clone())), bytes.clone(), opts, epoch);
                    return Ok(Loaded { value, bytes });
                }
            }
        }
        // Reconnect the tracking connection first if it was lost: L2 values are only worth caching
        // in L1 with invalidations flowing.
        let beta = opts.beta.or(i.cfg.beta);
        let reply = if i.circuit_open() || i.main_conn().await.is_none() { None } else { i.lease_get(full, beta).await };
        let Some(reply) = reply else {
            // Redis is down or failing: load directly; L1 still serves what it has.
            metrics::bump(&i.metrics.degraded_loads);
            return self.run_loader(full, opts, loader, None, epoch).await;
        };
        let (reply, conn) = reply;
        let status = bulk(reply.first()).unwrap_or_default();
        let value = i.read_encoded(bulk(reply.get(3)).as_deref(), bulk(reply.get(1))).ok();
        // A token means this caller holds the lease: its connection goes with it (see `Lease`).
        let lease = match bulk(reply.get(2)) {
            Some(token) => Some(Lease { conn, token }),
            None => {
                i.pool_put(conn);
                None
            }
        };
        match (&status[..], value, lease) {
            (b"HIT", Some(raw), lease) => {
                metrics::bump(&i.metrics.l2_hits);
                let value = Arc::new(decode::<T>(&raw).map_err(Error::Codec)?);
                if let Some(lease) = lease {
                    // Elected to refresh early (XFetch): serve now, refresh in the background.
                    self.refresh_in_background(full, opts, loader, lease);
                }
                // The server's own fresh time left bounds the L1 copy (another writer's TTL may be shorter).
                let server_ttl = match reply.get(4) {
                    Some(Value::Int(ms)) if *ms >= 0 => Some(Duration::from_millis(*ms as u64)),
                    _ => None,
                };
                let bytes: Arc<[u8]> = raw.into();
                if i.lease_reads_fill_l1() {
                    i.l1_put_for(full, Some(Decoded::of(value.clone())), bytes.clone(), opts, epoch, server_ttl);
                }
                Ok(Loaded { value, bytes })
            }
            (b"STALE", Some(raw), lease) => {
                // Served stale (never put in L1); the one caller holding the token refreshes behind.
                metrics::bump(&i.metrics.l2_stale);
                let value = Arc::new(decode::<T>(&raw).map_err(Error::Codec)?);
                if let Some(lease) = lease {
                    self.refresh_in_background(full, opts, loader, lease);
                }
                Ok(Loaded { value, bytes: raw.into() })
            }
            (b"FILL", _, Some(lease)) => {
                metrics::bump(&i.metrics.l2_misses);
                self.run_loader(full, opts, loader, Some(lease), epoch).await
            }
            (b"HIT", None, _) | (b"STALE", None, _) => Err(Error::Codec("unreadable value from Redis".into())),
            (b"PASS", _, _) => {
                // The loader that held the lease said the value is not to be cached: load, keep nothing.
                metrics::bump(&i.metrics.l2_misses);
                self.run_loader_inner(full, opts, loader, None, epoch, LoadFor::Passed).await
            }
            _ => {
                // BUSY at the wait deadline: load without caching rather than fail.
                metrics::bump(&i.metrics.l2_misses);
                self.run_loader(full, opts, loader, None, epoch).await
            }
        }
    }

    fn refresh_in_background<T, E, F, Fut>(&self, full: &str, opts: &Opts, loader: F, lease: Lease)
    where
        T: CacheValue + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let (me, full, opts) = (self.clone(), full.to_owned(), opts.clone());
        tokio::spawn(
            async move {
                let ticket = me.inner.ticket(&full, &opts);
                // A failure counts as a fail-safe serve: the stale value already served stands in for it.
                let _ = me.run_loader_inner(&full, &opts, loader, Some(lease), ticket, LoadFor::BackgroundRefresh).await;
            }
            // The refresh's spans belong to the caller's trace, though it ends before them.
            .in_current_span(),
        );
    }

    async fn run_loader<T, E, F, Fut>(
        &self,
        full: &str,
        opts: &Opts,
        loader: F,
        lease: Option<Lease>,
        epoch: Ticket,
    ) -> Result<Loaded<T>, Error<E>>
    where
        T: CacheValue + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_loader_inner(full, opts, loader, lease, epoch, LoadFor::Caller).await
    }

    /// Runs `loader` (within its timeout, if any); with a lease, then stores its value in Redis
    /// (`SET ... LEASE`) and L1, or gives the lease back (on the lease's own connection) if it failed or
    /// timed out. Without one (Redis down, `BUSY`, `skip_l2`), the value goes to L1 only, and after
    /// `PASS` ([`LoadFor::Passed`]) nowhere.
    async fn run_loader_inner<T, E, F, Fut>(
        &self,
        full: &str,
        opts: &Opts,
        loader: F,
        lease: Option<Lease>,
        epoch: Ticket,
        load_for: LoadFor,
    ) -> Result<Loaded<T>, Error<E>>
    where
        T: CacheValue + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let i = &self.inner;
        metrics::bump(&i.metrics.loads);
        // The loader runs inside this span (its own spans nest under it), and the fill's is its child.
        let span = tracing::debug_span!(
            "tiercache.load",
            key = full,
            lease = lease.is_some(),
            refresh = load_for == LoadFor::BackgroundRefresh,
            outcome = Empty,
        );
        let started = Instant::now();
        let fut = span.in_scope(loader).instrument(span.clone());
        let loaded = match opts.load_timeout.or(i.cfg.load_timeout) {
            Some(limit) => match tokio::time::timeout(limit, fut).await {
                Ok(r) => r.map_err(|e| Error::Load(Arc::new(e))),
                Err(_) => Err(Error::LoadTimeout(limit)),
            },
            None => fut.await.map_err(|e| Error::Load(Arc::new(e))),
        };
        i.metrics.load_duration.observe(started.elapsed().as_secs_f64());
        let v = match loaded {
            Ok(v) => {
                span.record("outcome", "ok");
                Arc::new(v)
            }
            Err(err) => {
                span.record("outcome", if matches!(err, Error::LoadTimeout(_)) { "timeout" } else { "error" });
                metrics::bump(&i.metrics.load_errors);
                if let Some(mut lease) = lease {
                    let cmd = redis::cmd("TIERCACHE.RELEASE").arg(full).arg(&lease.token).clone();
                    if i.lease_call::<i64>(&mut lease.conn, &cmd).await.is_ok() {
                        i.pool_put(lease.conn);
                    }
                }
                if load_for == LoadFor::BackgroundRefresh {
                    // A background refresh: the caller already has the stale value, which is the one
                    // fail-safe serve; nobody receives a value from here, so count nothing more.
                    metrics::bump(&i.metrics.fail_safe);
                    return Err(err);
                }
                // Fail-safe: a copy past its L1 deadline, but never one a tag or key invalidation killed.
                if let Some(stale) = i.l1_stale(full) {
                    if let Ok(value) = stale.value::<T>() {
                        span.record("outcome", "fail_safe");
                        metrics::bump(&i.metrics.fail_safe);
                        return Ok(Loaded { value, bytes: stale.bytes.clone() });
                    }
                }
                return Err(err);
            }
        };
        let bytes: Arc<[u8]> = encode(&*v).map_err(Error::Codec)?.into();
        let out = Loaded { value: v, bytes };
        let Some(mut lease) = lease else {
            // Degraded or BUSY: keep L1 useful, but never past an invalidation seen meanwhile.
            if load_for != LoadFor::Passed {
                i.l1_put(full, Some(Decoded::of(out.value.clone())), out.bytes.clone(), opts, epoch);
            }
            return Ok(out);
        };
        if i.circuit_open() {
            // Redis is failing: no fill. Dropping the lease's connection ends the lease.
            return Ok(out);
        }
        // The fill goes on the main connection, whose tracking is NOLOOP: sent on the lease's own
        // connection, it would come back as an invalidation of the key and evict what L1 just took.
        // The lease's connection is kept open until the reply, so the lease cannot end first.
        let cmd = i.set_cmd(full, &out.bytes, opts, Some(&lease.token));
        let fill = tracing::debug_span!(parent: &span, "tiercache.fill", key = full, outcome = Empty);
        match i.call_timed::<()>(&cmd, Some(&i.metrics.l2_fill)).instrument(fill.clone()).await {
            Ok(()) => {
                fill.record("outcome", "stored");
                i.pool_put(lease.conn);
                if i.lease_reads_fill_l1() {
                    i.l1_put(full, Some(Decoded::of(out.value.clone())), out.bytes.clone(), opts, epoch);
                }
            }
            Err(e) if e.code() == Some("FENCED") => {
                // The lease is over (handed off or gone): the connection is free again.
                fill.record("outcome", "fenced");
                metrics::bump(&i.metrics.fenced);
                i.pool_put(lease.conn);
            }
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                // Redis failed (counted in redis_errors): the connection is dropped, which ends the
                // lease if it is still held.
                fill.record("outcome", "redis_error");
                fill.in_scope(|| tracing::debug!(key = full, error = %e, "tiercache: fill not stored: Redis failed"));
            }
            Err(e) => {
                // Refused before the lease check (OOM, too many tags, a read-only replica...): nothing
                // is stored, the caller still gets its value, and the lease is still held. Give it back
                // with PASS, so that the readers parked on it load for themselves now rather than each
                // in turn being handed a lease whose fill is refused the same way.
                fill.record("outcome", "refused");
                metrics::bump(&i.metrics.fill_errors);
                fill.in_scope(
                    || tracing::warn!(key = full, error = %e, "tiercache: fill refused by Redis; value returned but not cached"),
                );
                let cmd = redis::cmd("TIERCACHE.RELEASE").arg(full).arg(&lease.token).arg("PASS").clone();
                if i.lease_call::<i64>(&mut lease.conn, &cmd).await.is_ok() {
                    i.pool_put(lease.conn);
                }
            }
        }
        Ok(out)
    }
}

impl Inner {
    fn circuit_open(&self) -> bool {
        matches!(*self.open_until.lock(), Some(t) if Instant::now() < t)
    }

    fn record(&self, ok: bool) {
        if ok {
            self.failures.store(0, Relaxed);
            if self.open_until.lock().take().is_some() {
                tracing::info!(name: "tiercache.resumed", "tiercache: Redis answers again; circuit closed");
            }
        } else {
            metrics::bump(&self.metrics.redis_errors);
            if self.failures.fetch_add(1, Relaxed) + 1 >= u64::from(self.cfg.breaker_threshold) {
                let was = self.open_until.lock().replace(Instant::now() + self.cfg.breaker_cooldown);
                self.failures.store(0, Relaxed);
                let cooldown_ms = self.cfg.breaker_cooldown.as_millis() as u64;
                if was.is_none() {
                    // Once per outage: a probe failing after a cooldown reopens it at debug level.
                    tracing::warn!(
                        name: "tiercache.degraded",
                        failures = self.cfg.breaker_threshold,
                        cooldown_ms,
                        "tiercache: Redis failing; circuit open, loads bypass Redis"
                    );
                } else {
                    tracing::debug!(name: "tiercache.degraded", cooldown_ms, "tiercache: Redis still failing; circuit open again");
                }
            }
        }
    }

    /// Runs a command on the main connection (reconnecting if needed), with the op timeout.
    async fn call<T: redis::FromRedisValue>(self: &Arc<Self>, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        self.call_timed(cmd, None).await
    }

    /// [`Inner::call`], observing the round trip (when the command was sent) in `latency`.
    async fn call_timed<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        cmd: &redis::Cmd,
        latency: Option<&prometheus_client::metrics::histogram::Histogram>,
    ) -> redis::RedisResult<T> {
        let Some(mut conn) = self.main_conn().await else {
            self.record(false);
            return Err(redis::RedisError::from((redis::ErrorKind::Io, "tiercache: Redis unreachable")));
        };
        let started = Instant::now();
        let r = match tokio::time::timeout(self.cfg.op_timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "tiercache: Redis timed out"))),
        };
        if let Some(h) = latency {
            h.observe(started.elapsed().as_secs_f64());
        }
        let failed = matches!(&r, Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped());
        self.record(!failed);
        if failed {
            self.lost_connection().await;
        }
        r
    }

    /// A pipeline on the main connection, in one round trip, with the op timeout (as [`Inner::call`]).
    async fn call_pipe(self: &Arc<Self>, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<Value>> {
        let Some(mut conn) = self.main_conn().await else {
            self.record(false);
            return Err(redis::RedisError::from((redis::ErrorKind::Io, "tiercache: Redis unreachable")));
        };
        let r = match tokio::time::timeout(self.cfg.op_timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "tiercache: Redis timed out"))),
        };
        let failed = matches!(&r, Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped());
        self.record(!failed);
        if failed {
            self.lost_connection().await;
        }
        r
    }

    /// L1 takes the value this client just wrote, except with [`Tracking::ReadKeys`]: the write untracked
    /// the key on the server, so nothing would tell of the next change (the next read fetches it).
    fn l1_put_own_write(&self, full: &str, raw: Vec<u8>, opts: &Opts, ticket: Ticket) {
        if self.cfg.tracking_mode == Tracking::ReadKeys {
            return;
        }
        self.l1_put(full, None, raw.into(), opts, ticket);
    }

    /// Whether values read or filled through a lease connection may enter L1: with
    /// [`Tracking::ReadKeys`] only the tracking connection's reads are tracked.
    fn lease_reads_fill_l1(&self) -> bool {
        self.cfg.tracking_mode == Tracking::Broadcast
    }

    /// The main connection, connecting (tracking + subscription + listener) when there is none.
    async fn main_conn(self: &Arc<Self>) -> Option<Conn> {
        let mut slot = self.main.lock().await;
        if let Some(c) = slot.as_ref() {
            return Some(c.clone());
        }
        if self.circuit_open() {
            return None;
        }
        let connect = self.remote.connect(&self.prefix, &self.cfg.channel);
        match connect.await {
            Ok(conn) => {
                self.record(true);
                // Coherence resumes now: everything cached before (including what was loaded while
                // Redis was away) may have missed invalidations.
                self.reset_l1();
                // Idle lease-read connections of the old link may point at a server that is no longer
                // the master (Sentinel, Cluster failover) or be dead: start the pool afresh.
                self.blocking.lock().clear();
                let (conn, feeds) = conn;
                *slot = Some(conn.clone());
                self.tracking.store(true, SeqCst);
                for feed in feeds {
                    spawn_listener(Arc::downgrade(self), feed);
                }
                if self.remote.is_cluster() {
                    spawn_topology_watch(Arc::downgrade(self), conn.clone());
                }
                Some(conn)
            }
            Err(_) => {
                self.record(false);
                None
            }
        }
    }

    /// While invalidations are not flowing (`tracking` false, checked inline by every read: one atomic
    /// load when all is well), every read first tries to reconnect (at most once per breaker cooldown
    /// while Redis stays down): a success drops L1, so nothing cached while Redis was away outlives the
    /// outage.
    async fn resume_coherence(self: &Arc<Self>) {
        let _ = self.main_conn().await;
    }

    /// The tracking connection is gone: L1 keeps serving what it has and what is loaded meanwhile
    /// (bounded by `l1_ttl`), and is dropped whole when coherence resumes.
    async fn lost_connection(&self) {
        self.tracking.store(false, SeqCst);
        *self.main.lock().await = None;
        self.blocking.lock().clear();
    }

    fn reset_l1(&self) {
        self.epoch.fetch_add(1, SeqCst);
        if !self.l1.is_empty() {
            metrics::bump(&self.metrics.l1_resets);
        }
        self.l1.clear();
    }

    /// A feed lost messages (gap, reset, flush): standalone drops L1 whole; a cluster master's feed drops
    /// only the entries of that master's slots (the whole L1 when they are not known). In-flight fills
    /// are voided everywhere (the epoch).
    fn reset_feed(&self, feed: &FeedState) {
        let slots = feed.node.as_ref().map(|n| self.remote.slots_of(&n.id)).unwrap_or_default();
        if slots.is_empty() {
            return self.reset_l1();
        }
        self.epoch.fetch_add(1, SeqCst);
        metrics::bump(&self.metrics.l1_resets);
        self.l1.retain(|key, _| {
            let slot = remote::key_slot(format!("{}{key}", self.prefix).as_bytes());
            !slots.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot))
        });
    }

    /// Gives an idle lease-read connection (one that holds no lease) back to the pool.
    fn pool_put(&self, conn: Conn) {
        let mut pool = self.blocking.lock();
        if pool.len() < BLOCKING_POOL_SIZE {
            pool.push(conn);
        }
    }

    /// A command on the connection that holds a lease (so that nothing that happens to the main
    /// connection or the pool can end the lease first), with the op timeout. After an `Err` that is
    /// not a server reply, drop the connection: its state is unknown.
    async fn lease_call<T: redis::FromRedisValue>(&self, conn: &mut Conn, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let r = match tokio::time::timeout(self.cfg.op_timeout, cmd.query_async::<T>(conn)).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "tiercache: Redis timed out"))),
        };
        self.record(!matches!(&r, Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped()));
        r
    }

    /// `TIERCACHE.GET key ENCODED LEASE ... WAIT ...` on a connection of its own, returned with the
    /// reply: the caller pools it, or keeps it in a [`Lease`] when the reply carries a token. Traced as
    /// `tiercache.lease_wait`, whose `status` is the reply's (`HIT`, `STALE`, `FILL`, `PASS`, `BUSY`)
    /// or `error`.
    async fn lease_get(&self, full: &str, beta: Option<f64>) -> Option<(Vec<Value>, Conn)> {
        let span = tracing::debug_span!("tiercache.lease_wait", key = full, status = Empty);
        let r = self.lease_get_untraced(full, beta).instrument(span.clone()).await;
        if !span.is_disabled() {
            match r.as_ref().and_then(|(v, _)| bulk(v.first())) {
                Some(status) => span.record("status", String::from_utf8_lossy(&status).as_ref()),
                None => span.record("status", "error"),
            };
        }
        r
    }

    async fn lease_get_untraced(&self, full: &str, beta: Option<f64>) -> Option<(Vec<Value>, Conn)> {
        // Take the pooled connection before any await: the pool lock must not live across one.
        let pooled = self.blocking.lock().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => match self.remote.blocking().await {
                Ok(c) => c,
                Err(_) => {
                    self.record(false);
                    return None;
                }
            },
        };
        let started = Instant::now();
        let mut cmd = redis::cmd("TIERCACHE.GET");
        cmd.arg(full)
            .arg("ENCODED")
            .arg("WITHTTL")
            .arg("LEASE")
            .arg(self.cfg.lease_timeout.as_millis() as u64)
            .arg("WAIT")
            .arg(self.cfg.wait_timeout.as_millis().max(1) as u64);
        if let Some(beta) = beta.filter(|b| b.is_finite() && *b > 0.0) {
            cmd.arg("BETA").arg(beta);
        }
        let r: redis::RedisResult<Vec<Value>> = cmd.query_async(&mut conn).await;
        self.metrics.l2_lease_read.observe(started.elapsed().as_secs_f64());
        match r {
            Ok(v) => {
                self.record(true);
                Some((v, conn))
            }
            Err(e) => {
                if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) {
                    // A server error (e.g. a replica refusing leases): not a Redis outage.
                    self.record(true);
                    return None;
                }
                self.record(false);
                None
            }
        }
    }

    fn read_encoded(&self, encoding: Option<&[u8]>, stored: Option<Vec<u8>>) -> Result<Vec<u8>, Error<std::convert::Infallible>> {
        let stored = stored.ok_or_else(|| Error::Codec("no value".into()))?;
        match encoding {
            Some(b"lz4") => lz4::decompress(&stored).map_err(|e| Error::Codec(e.to_string())),
            _ => Ok(stored),
        }
    }

    fn set_cmd(&self, full: &str, raw: &[u8], opts: &Opts, token: Option<&[u8]>) -> redis::Cmd {
        let mut ttl = opts.ttl.unwrap_or(self.cfg.default_ttl).as_millis().max(1) as u64;
        if self.cfg.ttl_jitter > 0.0 {
            ttl -= (ttl as f64 * self.cfg.ttl_jitter * jitter_unit()) as u64;
            ttl = ttl.max(1);
        }
        let stale = opts.stale.unwrap_or(self.cfg.stale).as_secs();
        let mut cmd = redis::cmd("TIERCACHE.SET");
        match lz4::compress_if_worth(raw, self.cfg.compress_min_size) {
            Some(frame) => cmd.arg(full).arg(frame).arg("ENCODING").arg("lz4"),
            None => cmd.arg(full).arg(raw).arg("NOCOMPRESS"),
        };
        cmd.arg("PX").arg(ttl);
        if stale > 0 {
            cmd.arg("STALE").arg(stale);
        }
        cmd.arg("TAGS").arg(opts.tags.len() + 1).arg(&self.ns_tag);
        for t in &opts.tags {
            cmd.arg(t);
        }
        if let Some(token) = token {
            cmd.arg("LEASE").arg(token);
        }
        cmd
    }

    fn tag_gen(&self, tag: &[u8]) -> Arc<AtomicU64> {
        let name = String::from_utf8_lossy(tag).into_owned();
        let mut tags = self.tags.lock();
        if tags.len() >= MAX_TRACKED_TAGS && !tags.contains_key(&name) {
            // Bounded memory with high-cardinality tags: forget every generation, and with them every
            // L1 entry that pointed at one (an entry must never outlive its tag's generation).
            tags.clear();
            drop(tags);
            self.reset_l1();
            tags = self.tags.lock();
        }
        tags.entry(name).or_default().clone()
    }

    fn drop_tag(&self, tag: &[u8]) {
        self.tag_gen(tag).fetch_add(1, SeqCst);
        // After the generation: a hit that still sees the old epoch is one racing this invalidation.
        self.tag_epoch.fetch_add(1, SeqCst);
    }

    /// The key's generation bucket: FNV-1a, a fixed hash so that every call agrees.
    fn bucket(full: &str) -> usize {
        let mut x: u64 = 0xcbf2_9ce4_8422_2325;
        for b in full.as_bytes() {
            x = (x ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        (x as usize) % KEY_BUCKETS
    }

    fn ticket(&self, full: &str, opts: &Opts) -> Ticket {
        let key_bucket = Self::bucket(full);
        let tags = std::iter::once(&self.ns_tag)
            .chain(opts.tags.iter())
            .map(|t| {
                let g = self.tag_gen(t.as_bytes());
                let v = g.load(SeqCst);
                (g, v)
            })
            .collect();
        Ticket {
            tracking: self.tracking.load(SeqCst),
            epoch: self.epoch.load(SeqCst),
            key_bucket,
            key_gen: self.key_gens[key_bucket].load(SeqCst),
            tags,
        }
    }

    fn ticket_valid(&self, t: &Ticket) -> bool {
        self.tracking.load(SeqCst) == t.tracking
            && self.epoch.load(SeqCst) == t.epoch
            && self.key_gens[t.key_bucket].load(SeqCst) == t.key_gen
            && t.tags.iter().all(|(g, v)| g.load(SeqCst) == *v)
    }

    /// The caller's key of a Redis key of this namespace.
    fn short<'a>(&self, full: &'a str) -> &'a str {
        full.strip_prefix(self.prefix.as_str()).unwrap_or(full)
    }

    fn drop_key(&self, full: &str) {
        self.key_gens[Self::bucket(full)].fetch_add(1, SeqCst);
        self.l1.remove(self.short(full));
    }

    /// L1 lookup by the caller's key: the whole hit path. The entry's tags are checked only when a tag
    /// was invalidated (anywhere) since they were last found current; then the deadline on the coarse
    /// clock, then the per-thread hit count.
    #[inline(always)]
    fn l1_get(&self, key: &str) -> Option<L1Entry> {
        if let Some(e) = self.l1.get(key) {
            let epoch = self.tag_epoch.load(Acquire);
            if (e.checked.load(Relaxed) == epoch || self.tags_current(key, &e, epoch)) && coarse_ms() < e.until {
                self.metrics.l1_hits_local.inc();
                return Some(e);
            }
        }
        // Missing, invalidated, or past its deadline (then kept only as a fail-safe copy).
        metrics::bump(&self.metrics.l1_misses);
        None
    }

    /// Whether the entry's tag generations are still those it was stored with (remembered for `epoch`,
    /// read before them); if not it was invalidated through a tag, and goes for good (not even kept
    /// for fail-safe).
    #[inline(never)]
    fn tags_current(&self, key: &str, e: &L1Data, epoch: u64) -> bool {
        if e.tags.iter().all(|(g, v)| g.load(SeqCst) == *v) {
            e.checked.store(epoch, Relaxed);
            return true;
        }
        self.l1.remove(key);
        false
    }

    /// A copy past its deadline but never invalidated, for fail-safe.
    fn l1_stale(&self, full: &str) -> Option<L1Entry> {
        self.l1.get(self.short(full)).filter(|e| e.tags.iter().all(|(g, v)| g.load(Relaxed) == *v))
    }

    /// Inserts unless the key, one of its tags or the whole cache was invalidated since `ticket`.
    fn l1_put(&self, full: &str, decoded: Option<Decoded>, bytes: Arc<[u8]>, opts: &Opts, ticket: Ticket) {
        self.l1_put_for(full, decoded, bytes, opts, ticket, None)
    }

    /// Like `l1_put`, bounded also by the server's fresh time left when known.
    fn l1_put_for(
        &self,
        full: &str,
        decoded: Option<Decoded>,
        bytes: Arc<[u8]>,
        opts: &Opts,
        ticket: Ticket,
        server_ttl: Option<Duration>,
    ) {
        if opts.skip_l1 {
            return;
        }
        let mut ttl = opts.ttl.unwrap_or(self.cfg.default_ttl).min(self.cfg.l1_ttl);
        if let Some(s) = server_ttl {
            ttl = ttl.min(s);
        }
        if !self.ticket_valid(&ticket) {
            return;
        }
        let key = self.short(full);
        let until = coarse_ms().saturating_add(ttl.as_millis() as u64);
        let entry = Arc::new(L1Data::new(decoded, bytes, until, ticket.tags.clone().into()));
        self.l1.insert(key.to_owned(), entry);
        // An invalidation racing with the insert: undo it (the entry's own tag check covers tags).
        if !self.ticket_valid(&ticket) {
            self.l1.remove(key);
        }
    }

    /// Applies one push from an invalidation feed (the main connection, or a cluster master's feed).
    fn on_push(&self, kind: PushKind, data: Vec<Value>, feed: &mut FeedState) {
        match kind {
            PushKind::Invalidate => {
                metrics::bump(&self.metrics.invalidations_received);
                match data.into_iter().next() {
                    Some(Value::Array(keys)) => {
                        tracing::debug!(name: "tiercache.invalidation", keys = keys.len(), reset = false, "tiercache: keys invalidated");
                        for k in keys {
                            if let Some(k) = bulk(Some(&k)) {
                                self.drop_key(String::from_utf8_lossy(&k).as_ref());
                            }
                        }
                    }
                    _ => {
                        // A null push: the tracked keys were flushed.
                        tracing::debug!(name: "tiercache.invalidation", keys = 0, reset = true, "tiercache: flush: L1 dropped");
                        self.reset_feed(feed);
                    }
                }
            }
            PushKind::Message => {
                let (Some(channel), Some(payload)) = (bulk(data.first()), bulk(data.get(1))) else { return };
                if channel != self.cfg.channel.as_bytes() {
                    return;
                }
                let Ok(msg) = rmp_serde::from_slice::<Message>(&payload) else {
                    metrics::bump(&self.metrics.invalidations_received);
                    tracing::debug!(name: "tiercache.invalidation", tags = 0, reset = true, "tiercache: unreadable message: L1 dropped");
                    self.reset_feed(feed);
                    return;
                };
                if feed.node.as_ref().is_some_and(|n| n.run_id != msg.run_id) {
                    // Another cluster node's message, forwarded by the cluster bus: its own feed has it.
                    return;
                }
                metrics::bump(&self.metrics.invalidations_received);
                let gap = {
                    let last = &mut feed.last;
                    let gap = msg.v != 1 || last.as_ref().is_some_and(|(run, seq)| *run != msg.run_id || *seq + 1 != msg.seq);
                    *last = Some((msg.run_id.clone(), msg.seq));
                    gap
                };
                tracing::debug!(
                    name: "tiercache.invalidation",
                    tags = msg.tags.len(),
                    seq = msg.seq,
                    reset = gap || msg.reset,
                    "tiercache: invalidation message"
                );
                if gap || msg.reset {
                    self.reset_feed(feed);
                } else {
                    for t in &msg.tags {
                        self.drop_tag(&t.0);
                    }
                }
            }
            PushKind::Disconnection => {
                // No more pushes: in-flight fills are void; the next call reconnects (which drops L1).
                // A feed of an older link (replaced by a reconnect) ending says nothing about this one.
                if feed.generation != self.remote.generation() {
                    return;
                }
                self.tracking.store(false, SeqCst);
                if let Ok(mut slot) = self.main.try_lock() {
                    *slot = None;
                }
            }
            _ => {}
        }
    }
}

/// What a feed's listener remembers: the last message of its node (gap detection is per feed, so per
/// node in a cluster), the node it listens to, and its link generation.
struct FeedState {
    last: Option<(String, u64)>,
    node: Option<remote::NodeTag>,
    generation: u64,
}

/// Applies a feed's pushes until its connection closes or the cache is dropped.
fn spawn_listener(inner: std::sync::Weak<Inner>, feed: remote::Feed) {
    let mut rx = feed.rx;
    let mut state = FeedState { last: None, node: feed.node, generation: feed.generation };
    tokio::spawn(async move {
        while let Some(push) = rx.recv().await {
            let Some(inner) = inner.upgrade() else { return };
            if inner.closed.load(SeqCst) {
                return;
            }
            let disconnected = push.kind == PushKind::Disconnection;
            inner.on_push(push.kind, push.data, &mut state);
            if disconnected {
                return;
            }
        }
    });
}

/// Cluster mode: polls the masters on the cluster connection; when they change (a failover, a master
/// added or removed), the link is dropped as if lost, so the next call reconnects every feed and drops
/// L1 (which entries were written where during the change cannot be told apart).
fn spawn_topology_watch(weak: std::sync::Weak<Inner>, mut conn: Conn) {
    let Some(inner) = weak.upgrade() else { return };
    let (generation, period, op_timeout) = (inner.remote.generation(), inner.cfg.topology_check, inner.cfg.op_timeout);
    drop(inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.closed.load(SeqCst) || inner.remote.generation() != generation {
                return;
            }
            if let Ok(Ok(true)) = tokio::time::timeout(op_timeout, inner.remote.masters_changed(&mut conn)).await {
                tracing::info!(name: "tiercache.topology", "tiercache: cluster masters changed; L1 dropped, feeds reconnect");
                inner.lost_connection().await;
                return;
            }
        }
    });
}

/// Every metric of a cache, read at each scrape.
#[derive(Debug)]
struct Exposition(std::sync::Weak<Inner>);

impl prometheus_client::collector::Collector for Exposition {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(i) = self.0.upgrade() else { return Ok(()) };
        i.metrics.snapshot(i.l1.len() as u64, i.l1.weight(), i.circuit_open()).encode_into(&mut enc)?;
        i.metrics.encode_histograms(&mut enc)
    }
}

/// Who a load is for, which decides what happens to its value and to a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadFor {
    /// A caller waiting for the value.
    Caller,
    /// A background refresh of a stale entry already served: a failure is that serve's fail-safe.
    BackgroundRefresh,
    /// A caller answered `PASS`: the value is uncacheable, so it is kept nowhere, not even in L1.
    Passed,
}

/// Groups the keys of one pipelined call into the batches sent as one pipeline each. One server: every
/// key in one batch (one round trip). Redis Cluster: one batch per hash slot (redis-rs refuses a
/// pipeline whose commands cross slots, and one slot is one master), in the order of first appearance.
fn pipeline_batches(fulls: &[&str], cluster: bool) -> Vec<Vec<usize>> {
    if fulls.is_empty() {
        return Vec::new();
    }
    if !cluster {
        return vec![(0..fulls.len()).collect()];
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut by_slot: HashMap<u16, usize> = HashMap::new();
    for (n, full) in fulls.iter().enumerate() {
        let slot = remote::key_slot(full.as_bytes());
        let b = *by_slot.entry(slot).or_insert_with(|| {
            batches.push(Vec::new());
            batches.len() - 1
        });
        batches[b].push(n);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_batches_one_per_slot_in_cluster_mode() {
        let keys = ["app:v1:a", "app:v1:b", "app:v1:{t}1", "app:v1:a", "app:v1:{t}2"];
        assert_eq!(pipeline_batches(&keys, false), vec![vec![0, 1, 2, 3, 4]]);
        let batches = pipeline_batches(&keys, true);
        // Every index once, each batch a single slot, and the hash-tagged keys together.
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        for b in &batches {
            assert!(b.iter().all(|&n| remote::key_slot(keys[n].as_bytes()) == remote::key_slot(keys[b[0]].as_bytes())));
        }
        assert!(batches.iter().any(|b| b == &vec![2, 4]));
        assert!(batches.iter().any(|b| b == &vec![0, 3]));
        assert!(pipeline_batches(&[], true).is_empty());
    }

    /// The hit path skips the per-tag checks while no tag was invalidated since the entry last passed
    /// them: a tag invalidated after the entry was served must still make the next read a miss (and an
    /// entry under another tag stays a hit). In-process only: no Redis (an unused port), so L1 is the
    /// only tier and nothing but the tag generations can drop the entries.
    #[tokio::test]
    async fn a_tag_invalidated_after_hits_drops_the_entry() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cache = TierCache::builder(format!("redis://127.0.0.1:{port}/")).namespace("u").build().await.unwrap();
        let i = &cache.inner;
        let put = |key: &str, tag: &str| {
            let opts = Opts::default().ttl(Duration::from_secs(60)).tag(tag);
            let full = cache.redis_key(key);
            i.l1_put(&full, None, Arc::from(&b"\x01"[..]), &opts, i.ticket(&full, &opts));
        };
        put("k", "grp");
        put("apart", "other");
        for _ in 0..3 {
            assert!(i.l1_get("k").is_some() && i.l1_get("apart").is_some(), "served from L1, tags checked once");
        }
        i.drop_tag(b"grp");
        assert!(i.l1_get("k").is_none(), "the entry of the invalidated tag is gone");
        assert!(i.l1_get("apart").is_some(), "the other tag's entry stays");
        put("k", "grp");
        assert!(i.l1_get("k").is_some(), "a new entry under the tag's new generation is a hit");
    }
}
