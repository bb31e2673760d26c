//! Benchmarks of the in-process cache (L1) of tiercache-client.
//!
//! - `l1_hit/*`: the cost of an L1 hit through `TierCache::get_or_load` on a hot key, next to a raw
//!   `quick_cache::sync::Cache::get` of the same value (and of the same encoded bytes plus the
//!   MessagePack decode `get_or_load` does, and of the same bytes from a `RwLock<HashMap<String,
//!   Arc<[u8]>>>` as a process-wide map would hold them), in the same run. Needs a redis-server with
//!   the module: the bench starts its own on a free port, with `TIERCACHE_MODULE` or the
//!   `libtiercache.so` of target/debug or target/release (`cargo build` first), and is skipped with a
//!   message when redis-server (`REDIS_SERVER`, else PATH) or the module is missing. After the
//!   timings it prints
//!   the hit-cost ratios from a timing loop of its own (criterion does not hand its estimates back);
//!   `L1_BENCH_RATIOS_ONLY=1` prints only those (no criterion timings), `L1_BENCH_HITS_ONLY=1` skips
//!   the Zipf part.
//! - `zipf/*`: replaying seeded Zipf traces (s = 0.8 and 1.0 over 100,000 keys of 64 to 2,000 bytes,
//!   cache = 1 % of all the keys' bytes), each also with scan traffic (half of the requests one-off
//!   keys, interleaved), through quick_cache, a plain byte-weighted LRU and the best static choice.
//!   The hit ratios (of the Zipf requests and overall) are printed once (println!); criterion times
//!   the replay of s = 1.0 without scan.
//!
//! `cargo bench -p tiercache-client --bench l1` (add `-- --quick` for a shorter run).

use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tiercache_client::{Opts, TierCache};

// ---------------------------------------------------------------------------------------------
// (a) L1 hit cost
// ---------------------------------------------------------------------------------------------

/// A typical cached row set: a user profile with a few orders (about 200 bytes as MessagePack).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    id: u64,
    name: String,
    email: String,
    roles: Vec<String>,
    score: f64,
    order_ids: Vec<u64>,
}

impl Profile {
    fn sample() -> Profile {
        Profile {
            id: 42,
            name: "Ada Lovelace".into(),
            email: "ada@example.com".into(),
            roles: vec!["admin".into(), "billing".into()],
            score: 0.97,
            order_ids: (1000..1012).collect(),
        }
    }
}

/// The loader of the hot key: never called once the key is in L1 (a call would be a miss).
fn no_load<T>() -> std::future::Ready<Result<T, Infallible>> {
    panic!("the loader ran: the hot key was not an L1 hit")
}

/// A redis-server with the module on a free port, killed (and its directory removed) on drop.
struct Server {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Server {
    fn start() -> Result<Server, String> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let module = std::env::var_os("TIERCACHE_MODULE")
            .map(PathBuf::from)
            .into_iter()
            .chain(["target/debug/libtiercache.so", "target/release/libtiercache.so"].map(|p| root.join(p)))
            .find(|p| p.exists())
            .ok_or("no libtiercache.so under target/debug or target/release (run `cargo build`), nor TIERCACHE_MODULE")?;
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| format!("no free port: {e}"))?.port();
        let dir = std::env::temp_dir().join(format!("tiercache-bench-l1-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .arg("--loadmodule")
            .arg(&module)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                if e.kind() == std::io::ErrorKind::NotFound {
                    format!("`{bin}` not found (install Redis >= 7.0 or set REDIS_SERVER)")
                } else {
                    format!("cannot start `{bin}`: {e}")
                }
            })?;
        let mut server = Server { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(server.dir.join("redis.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(format!("redis-server exited ({status}) with {}: {}", module.display(), tail.join(" | ")));
            }
            if server.ping() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Best per-call time of `rounds` runs of `n` calls.
fn best_ns(rounds: usize, n: u64, mut run: impl FnMut(u64) -> Duration) -> f64 {
    (0..rounds).map(|_| run(n).as_nanos() as f64 / n as f64).fold(f64::INFINITY, f64::min)
}

/// One value type: criterion timings of the three ways to read it, then the ratio from our own loop.
fn hit_group<T>(c: &mut Criterion, rt: &tokio::runtime::Runtime, cache: &TierCache, name: &str, value: T)
where
    T: Clone + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let key = format!("hot-{name}");
    let opts = Opts::default().ttl(Duration::from_secs(3600)).tag("bench");
    let loaded: T = rt
        .block_on(cache.get_or_load(&key, &opts, {
            let v = value.clone();
            move || async move { Ok::<_, Infallible>(v) }
        }))
        .expect("first load");
    assert_eq!(loaded, value);
    // The same data in raw quick_cache, under the same (full) key: the decoded value, and the bytes.
    let full = cache.redis_key(&key);
    let raw: quick_cache::sync::Cache<String, T> = quick_cache::sync::Cache::new(1024);
    raw.insert(full.clone(), value.clone());
    let encoded: Arc<[u8]> = rmp_serde::to_vec_named(&value).unwrap().into();
    let raw_bytes: quick_cache::sync::Cache<String, Arc<[u8]>> = quick_cache::sync::Cache::new(1024);
    raw_bytes.insert(full.clone(), encoded.clone());
    // The same bytes in a process-wide std HashMap behind an RwLock (a read lock per get).
    let map: RwLock<HashMap<String, Arc<[u8]>>> = RwLock::new(HashMap::from([(full.clone(), encoded.clone())]));

    let tiercache_loop = |n: u64| {
        rt.block_on(async {
            let t = Instant::now();
            for _ in 0..n {
                let v: T = cache.get_or_load(black_box(&key), &opts, no_load::<T>).await.unwrap();
                black_box(v);
            }
            t.elapsed()
        })
    };
    // The decoded value L1 keeps since issue 14, read through the `Arc` API, next to a raw quick_cache
    // of `Arc<T>` (what an application caching decoded values would hold).
    let raw_arc: quick_cache::sync::Cache<String, Arc<T>> = quick_cache::sync::Cache::new(1024);
    raw_arc.insert(full.clone(), Arc::new(value.clone()));
    let arc_loop = |n: u64| {
        rt.block_on(async {
            let t = Instant::now();
            for _ in 0..n {
                let v: Arc<T> = cache.get_or_load_arc(black_box(&key), &opts, no_load::<T>).await.unwrap();
                black_box(v);
            }
            t.elapsed()
        })
    };
    let get_arc_loop = |n: u64| {
        rt.block_on(async {
            let t = Instant::now();
            for _ in 0..n {
                let v: Arc<T> = cache.get_arc(black_box(&key)).await.unwrap().unwrap();
                black_box(v);
            }
            t.elapsed()
        })
    };
    let cached_loop = |n: u64| {
        rt.block_on(async {
            let t = Instant::now();
            for _ in 0..n {
                let v: tiercache_client::Cached<T> =
                    cache.get_or_load_cached(black_box(&key), &opts, no_load::<T>).await.unwrap();
                black_box(v);
            }
            t.elapsed()
        })
    };
    // The same hit without a future around it (`get_l1`, a plain call).
    let l1_loop = |n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            let v: tiercache_client::Cached<T> = cache.get_l1(black_box(&key)).unwrap().unwrap();
            black_box(v);
        }
        t.elapsed()
    };
    let raw_arc_loop = |n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            black_box(raw_arc.get(black_box(full.as_str())).unwrap());
        }
        t.elapsed()
    };
    let raw_loop = |n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            black_box(raw.get(black_box(full.as_str())).unwrap());
        }
        t.elapsed()
    };
    let raw_bytes_loop = |n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            black_box(raw_bytes.get(black_box(full.as_str())).unwrap());
        }
        t.elapsed()
    };
    let map_loop = |n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            black_box(map.read().unwrap().get(black_box(full.as_str())).cloned().unwrap());
        }
        t.elapsed()
    };
    let raw_decode_loop = |n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            let b = raw_bytes.get(black_box(full.as_str())).unwrap();
            black_box(rmp_serde::from_slice::<T>(&b).unwrap());
        }
        t.elapsed()
    };

    let before = cache.metrics();
    // L1_BENCH_RATIOS_ONLY=1: the ratio lines only (our own timing loops), without criterion's timings.
    let criterion_timings = std::env::var_os("L1_BENCH_RATIOS_ONLY").is_none();
    let mut g = c.benchmark_group(format!("l1_hit/{name}"));
    g.throughput(Throughput::Elements(1));
    if criterion_timings {
        g.bench_function("tiercache_get_or_load", |b| b.iter_custom(tiercache_loop));
        g.bench_function("quick_cache_get", |b| b.iter_custom(raw_loop));
        g.bench_function("tiercache_get_or_load_arc", |b| b.iter_custom(arc_loop));
        g.bench_function("tiercache_get_arc", |b| b.iter_custom(get_arc_loop));
        g.bench_function("tiercache_get_or_load_cached", |b| b.iter_custom(cached_loop));
        g.bench_function("quick_cache_get_arc", |b| b.iter_custom(raw_arc_loop));
        g.bench_function("quick_cache_get_bytes_and_decode", |b| b.iter_custom(raw_decode_loop));
        g.bench_function("quick_cache_get_bytes", |b| b.iter_custom(raw_bytes_loop));
        g.bench_function("rwlock_hashmap_get_bytes", |b| b.iter_custom(map_loop));
    }
    g.finish();

    let n = 200_000;
    let t = best_ns(5, n, tiercache_loop);
    let r = best_ns(5, n, raw_loop);
    let d = best_ns(5, n, raw_decode_loop);
    println!(
        "l1_hit/{name} ({} bytes encoded), best of 5 x {n}: get_or_load {t:.0} ns, quick_cache get {r:.0} ns \
         => {:.2}x (goal <= 1.2x); quick_cache get of the bytes + decode {d:.0} ns => {:.2}x of that",
        encoded.len(),
        t / r,
        t / d,
    );
    // Interleaved rounds, so that the machine's load (other processes) falls on every variant alike.
    let (mut ta, mut tg, mut tc, mut tl, mut ra) = (f64::INFINITY, f64::INFINITY, f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for _ in 0..25 {
        ra = ra.min(best_ns(1, n / 4, raw_arc_loop));
        ta = ta.min(best_ns(1, n / 4, arc_loop));
        tg = tg.min(best_ns(1, n / 4, get_arc_loop));
        tc = tc.min(best_ns(1, n / 4, cached_loop));
        tl = tl.min(best_ns(1, n / 4, l1_loop));
    }
    println!(
        "l1_hit/{name} decoded, best of 25 interleaved rounds x {}: get_or_load_arc {ta:.0} ns, get_arc {tg:.0} ns, get_or_load_cached \
         {tc:.0} ns, get_l1 {tl:.0} ns, quick_cache get of an Arc<T> {ra:.0} ns => {:.2}x / {:.2}x / {:.2}x / {:.2}x (goal <= 1.2x)",
        n / 4,
        ta / ra,
        tg / ra,
        tc / ra,
        tl / ra,
    );
    let rb = best_ns(5, n, raw_bytes_loop);
    let m = best_ns(5, n, map_loop);
    println!(
        "l1_hit/{name} ({} bytes encoded), best of 5 x {n}: quick_cache get of the bytes {rb:.0} ns, \
         RwLock<HashMap<String, Arc<[u8]>>> read + get of the bytes {m:.0} ns => {:.2}x (map / quick_cache); \
         get_or_load {t:.0} ns => {:.2}x of the map get",
        encoded.len(),
        m / rb,
        t / m,
    );
    let after = cache.metrics();
    assert_eq!(after.l1_misses, before.l1_misses, "every timed read was an L1 hit");
}

fn l1_hit(c: &mut Criterion) {
    let server = match Server::start() {
        Ok(s) => s,
        Err(e) => {
            println!("l1_hit: skipped: {e}");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let cache = rt
        .block_on(TierCache::builder(url).namespace("bench").l1_ttl(Duration::from_secs(3600)).build())
        .expect("TierCache::build");
    hit_group(c, &rt, &cache, "string", "a small value of 32 bytes......".to_string());
    hit_group(c, &rt, &cache, "profile", Profile::sample());
    drop(cache);
    drop(rt);
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// (b) hit ratio on a Zipf trace
// ---------------------------------------------------------------------------------------------

const KEYS: u64 = 100_000;
/// The skews replayed; the replay is timed on the last, without scan traffic.
const ZIPF_S: [f64; 2] = [0.8, 1.0];
/// Shares of the requests that are a scan (one-off keys never seen again), interleaved at random.
const SCAN: [f64; 2] = [0.0, 0.5];
/// Zipf requests of the warm-up (not counted) and of the counted part (scan requests come on top).
const WARMUP: usize = 200_000;
const TRACE: usize = 1_000_000;
/// Requests per timed iteration of the replay.
const CHUNK: usize = 10_000;

#[path = "support/zipf.rs"]
mod zipf;
use zipf::{XorShift, Zipf};

/// splitmix64's finalizer: spreads ranks over the key space and gives each key its size.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn key_of(rank: u64) -> u64 {
    mix(rank.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

/// Bytes of a key's value: 64 to 2,000, independent of its popularity.
fn size_of(key: u64) -> u32 {
    64 + (mix(key) % 1937) as u32
}

struct Trace {
    /// (key, size, is a scan request) per request; the first `warmup` are not counted.
    reqs: Vec<(u64, u32, bool)>,
    warmup: usize,
    capacity: u64,
    /// The best static choice: the most popular keys (by rank) that fit the capacity.
    static_keys: Vec<u64>,
    /// Its expected hit ratio on the Zipf requests.
    static_top: f64,
}

/// `WARMUP + TRACE` Zipf(s) requests, with scan requests interleaved at random so that they are
/// `scan` of all requests. The Zipf requests (and the sizes) do not depend on `scan`.
fn trace(s: f64, scan: f64) -> Trace {
    let zipf = Zipf::new(KEYS, s);
    let mut rng = XorShift(0x00c0_ffee_1234_5678);
    let mut coin = XorShift(0x5ca7_7e12_dead_beef);
    // Scan keys: ranks past the key space, each used once (key_of is a bijection).
    let mut next_scan = KEYS;
    let (mut reqs, mut zipf_seen, mut warmup) = (Vec::new(), 0, 0);
    while zipf_seen < WARMUP + TRACE {
        let k = if coin.unit() < scan {
            next_scan += 1;
            (key_of(next_scan - 1), true)
        } else {
            if zipf_seen == WARMUP {
                warmup = reqs.len();
            }
            zipf_seen += 1;
            (key_of(zipf.sample(&mut rng)), false)
        };
        reqs.push((k.0, size_of(k.0), k.1));
    }
    let total: u64 = (0..KEYS).map(|r| u64::from(size_of(key_of(r)))).sum();
    let capacity = total / 100;
    let (mut used, mut static_top, mut static_keys) = (0u64, 0.0, Vec::new());
    for r in 0..KEYS {
        let s = u64::from(size_of(key_of(r)));
        if used + s > capacity {
            break;
        }
        used += s;
        static_top += zipf.pmf(r as usize);
        static_keys.push(key_of(r));
    }
    Trace { reqs, warmup, capacity, static_keys, static_top }
}

trait Sim {
    /// A read of `key`: true on a hit; on a miss the value is inserted.
    fn access(&mut self, key: u64, size: u32) -> bool;
}

#[derive(Clone)]
struct SizeWeighter;

impl quick_cache::Weighter<u64, u32> for SizeWeighter {
    fn weight(&self, _key: &u64, size: &u32) -> u64 {
        u64::from(*size)
    }
}

/// What the client's L1 is: the sharded, thread-safe quick_cache.
struct QuickSync(quick_cache::sync::Cache<u64, u32, SizeWeighter>);

impl Sim for QuickSync {
    fn access(&mut self, key: u64, size: u32) -> bool {
        if self.0.get(&key).is_some() {
            return true;
        }
        self.0.insert(key, size);
        false
    }
}

/// The single-shard quick_cache: the same policy without the split of the capacity over shards.
struct QuickUnsync(quick_cache::unsync::Cache<u64, u32, SizeWeighter>);

impl Sim for QuickUnsync {
    fn access(&mut self, key: u64, size: u32) -> bool {
        if self.0.get(&key).is_some() {
            return true;
        }
        self.0.insert(key, size);
        false
    }
}

const NIL: usize = usize::MAX;

struct Node {
    key: u64,
    size: u32,
    prev: usize,
    next: usize,
}

/// A plain LRU weighted by bytes: a hash map into a doubly linked list kept in a slab.
struct Lru {
    map: HashMap<u64, usize>,
    nodes: Vec<Node>,
    free: Vec<usize>,
    head: usize,
    tail: usize,
    used: u64,
    capacity: u64,
}

impl Lru {
    fn new(capacity: u64) -> Lru {
        Lru { map: HashMap::new(), nodes: Vec::new(), free: Vec::new(), head: NIL, tail: NIL, used: 0, capacity }
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        self.nodes[i].prev = NIL;
        self.nodes[i].next = self.head;
        if self.head != NIL {
            self.nodes[self.head].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }
}

impl Sim for Lru {
    fn access(&mut self, key: u64, size: u32) -> bool {
        if let Some(&i) = self.map.get(&key) {
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return true;
        }
        if u64::from(size) > self.capacity {
            return false;
        }
        while self.used + u64::from(size) > self.capacity {
            let t = self.tail;
            self.unlink(t);
            self.map.remove(&self.nodes[t].key);
            self.used -= u64::from(self.nodes[t].size);
            self.free.push(t);
        }
        let node = Node { key, size, prev: NIL, next: NIL };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.push_front(i);
        self.map.insert(key, i);
        self.used += u64::from(size);
        false
    }
}

/// The best static choice: a fixed set of the most popular keys, never changed.
struct Static(std::collections::HashSet<u64>);

impl Sim for Static {
    fn access(&mut self, key: u64, _size: u32) -> bool {
        self.0.contains(&key)
    }
}

fn caches(capacity: u64) -> Vec<(&'static str, Box<dyn Sim>)> {
    // About 1,000 values of ~1 KB fit; quick_cache sizes its tables and shards from this estimate.
    let items = (capacity / 1032) as usize;
    vec![
        ("quick_cache_sync", Box::new(QuickSync(quick_cache::sync::Cache::with_weighter(items, capacity, SizeWeighter)))),
        ("quick_cache_unsync", Box::new(QuickUnsync(quick_cache::unsync::Cache::with_weighter(items, capacity, SizeWeighter)))),
        ("lru", Box::new(Lru::new(capacity))),
    ]
}

/// Hit ratios of one trace, printed one line per cache (and one for the static choice).
fn hit_ratios(t: &Trace, s: f64, scan: f64) {
    let (warm, counted) = t.reqs.split_at(t.warmup);
    let zipf_reqs = counted.iter().filter(|r| !r.2).count();
    println!(
        "zipf: s = {s}, scan {:.0} %, {KEYS} keys of 64..2000 bytes, cache {} bytes (1 % of all keys' bytes); \
         {} warm-up then {} counted requests ({zipf_reqs} Zipf); best static choice (top keys by popularity) \
         {:.2} % expected",
        100.0 * scan,
        t.capacity,
        warm.len(),
        counted.len(),
        100.0 * t.static_top
    );
    let mut all = caches(t.capacity);
    all.push(("static_top", Box::new(Static(t.static_keys.iter().copied().collect()))));
    for (name, mut cache) in all {
        for &(k, s, _) in warm {
            cache.access(k, s);
        }
        // [Zipf requests, all requests]: (hits, hit bytes, bytes)
        let mut n = [(0u64, 0u64, 0u64); 2];
        for &(k, s, is_scan) in counted {
            let hit = cache.access(k, s);
            for (i, acc) in n.iter_mut().enumerate() {
                if i == 1 || !is_scan {
                    acc.0 += u64::from(hit);
                    acc.1 += if hit { u64::from(s) } else { 0 };
                    acc.2 += u64::from(s);
                }
            }
        }
        let [z, o] = n;
        let pct = |a: u64, b: u64| 100.0 * a as f64 / b as f64;
        if scan == 0.0 {
            println!(
                "zipf: s = {s}, no scan: {name:<18} hit ratio {:.2} % of requests, {:.2} % of bytes",
                pct(o.0, counted.len() as u64),
                pct(o.1, o.2)
            );
        } else {
            println!(
                "zipf: s = {s}, scan {:.0} %: {name:<18} hit ratio of the Zipf requests {:.2} % of requests, \
                 {:.2} % of bytes; overall {:.2} % of requests, {:.2} % of bytes",
                100.0 * scan,
                pct(z.0, zipf_reqs as u64),
                pct(z.1, z.2),
                pct(o.0, counted.len() as u64),
                pct(o.1, o.2)
            );
        }
    }
}

fn zipf(c: &mut Criterion) {
    if std::env::var_os("L1_BENCH_HITS_ONLY").is_some() {
        return;
    }
    for s in ZIPF_S {
        for scan in SCAN {
            hit_ratios(&trace(s, scan), s, scan);
        }
    }
    let t = trace(ZIPF_S[ZIPF_S.len() - 1], 0.0);
    let counted: Vec<(u64, u32)> = t.reqs[t.warmup..].iter().map(|&(k, s, _)| (k, s)).collect();
    let warm = &t.reqs[..t.warmup];

    // Timing: each iteration replays the next CHUNK requests on a warmed cache.
    let mut g = c.benchmark_group("zipf");
    g.throughput(Throughput::Elements(CHUNK as u64));
    for (name, mut cache) in caches(t.capacity) {
        for &(k, s, _) in warm {
            cache.access(k, s);
        }
        let mut at = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                if at + CHUNK > counted.len() {
                    at = 0;
                }
                let mut hits = 0u32;
                for &(k, s) in &counted[at..at + CHUNK] {
                    hits += u32::from(cache.access(black_box(k), s));
                }
                at += CHUNK;
                hits
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = l1_hit, zipf
}
criterion_main!(benches);
