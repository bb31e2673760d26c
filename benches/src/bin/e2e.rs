//! End-to-end benchmark: a PostgreSQL origin read through no cache, cache-aside and tiercache.
//!
//! The same closed-loop workload runs once per mode: `--tasks` concurrent tasks pick users by a seeded
//! Zipf law (s = 1.0) over `--users` users for `--secs` seconds; each operation is a read of the user's
//! profile (a 4-table join: users, orders, order_items, products, one row per order) or, with probability
//! `--update-pct`, an update (one transaction: bump the user's row version and one order line's quantity,
//! commit, then invalidate the user's cache entries).
//!
//! Modes:
//! - `none`: every read queries PostgreSQL.
//! - `cacheaside`: `GET`; on a miss the query, then `SET key value EX ttl`; `DEL` after an update's commit
//!   (the common pattern, plain Redis commands through the `redis` crate).
//! - `tiercache`: `TierCache::get_or_load` with the tag `user:<id>`; `invalidate_tags(["user:<id>"])`
//!   after an update's commit.
//! - `tiercache-delete` (not run by default): tiercache read the same way, invalidated by
//!   `delete("profile:<id>")` instead of the tag.
//! - `tiercache-bridge`: tiercache read the same way, and the application invalidates nothing: the
//!   `tiercache pg bridge` (started by scripts/bench-e2e, triggers from `tiercache pg install`) turns the
//!   committed rows into invalidations. A read that misses a committed version is then stale only if it
//!   started later than the version's commit plus the bridge's lag: the age of each such read (read start
//!   minus the commit of the first version it missed) goes to `--stale-ages FILE`, and the script counts
//!   those older than the bridge's largest lag.
//!
//! Stale reads: after an update's invalidation returns, the updating task raises the user's "committed
//! version" (shared, per user). Every read notes that version before it starts and counts as stale when
//! it returns an older one: a read that begins after the update was committed and invalidated must see
//! it. (A read that overlaps the update may see either version and is never counted.)
//!
//! Usage (scripts/bench-e2e starts PostgreSQL and Redis and passes these):
//!
//! ```text
//! e2e --pg 'host=127.0.0.1 port=5432 user=postgres dbname=postgres' --redis redis://127.0.0.1:6379/
//!     [--modes none,cacheaside,tiercache] [--users 5000] [--tasks 16] [--secs 20] [--update-pct 1]
//!     [--ttl 60] [--seed 1] [--instances 1] [--no-setup | --setup-only] [--stale-ages FILE]
//! ```
//!
//! `--instances K` splits the tasks over K cache clients (K `TierCache`s, K Redis connections), as K
//! application servers would be; updates are then invalidated by one instance and read through another.
//! Prints a Markdown table, then a details table.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiercache_client::{CacheValue, Opts, TierCache};
use tokio_postgres::{Client, NoTls, Statement};

const ORDERS_PER_USER: i64 = 8;
const LINES_PER_ORDER: i32 = 4;
const PRODUCTS: i32 = 2000;

const SCHEMA: &str = "
DROP TABLE IF EXISTS order_items, orders, products, users;
CREATE TABLE users (
    id int PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    country text NOT NULL,
    created_at timestamptz NOT NULL,
    version bigint NOT NULL DEFAULT 1
);
CREATE TABLE products (
    id int PRIMARY KEY,
    name text NOT NULL,
    category text NOT NULL,
    price_cents int NOT NULL
);
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    user_id int NOT NULL REFERENCES users (id),
    status text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE TABLE order_items (
    order_id bigint NOT NULL REFERENCES orders (id),
    line int NOT NULL,
    product_id int NOT NULL REFERENCES products (id),
    qty int NOT NULL,
    PRIMARY KEY (order_id, line)
);
CREATE INDEX orders_user_id ON orders (user_id);
";

/// The read every mode serves: a user's profile with per-order totals.
const PROFILE_SQL: &str = "
SELECT u.name, u.email, u.country, u.version,
       o.id, o.status, extract(epoch FROM o.created_at)::bigint,
       count(*)::bigint, sum(oi.qty)::bigint, sum(oi.qty * p.price_cents)::bigint
FROM users u
JOIN orders o ON o.user_id = u.id
JOIN order_items oi ON oi.order_id = o.id
JOIN products p ON p.id = oi.product_id
WHERE u.id = $1
GROUP BY u.id, o.id
ORDER BY o.id";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderSummary {
    id: i64,
    status: String,
    created_at: i64,
    lines: i64,
    units: i64,
    total_cents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    user_id: i32,
    name: String,
    email: String,
    country: String,
    version: i64,
    orders: Vec<OrderSummary>,
    lifetime_cents: i64,
}

struct Args {
    pg: String,
    redis: String,
    modes: Vec<String>,
    users: usize,
    tasks: usize,
    secs: f64,
    update_pct: f64,
    ttl: u64,
    seed: u64,
    instances: usize,
    setup: bool,
    setup_only: bool,
    stale_ages: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        pg: "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into(),
        redis: "redis://127.0.0.1:6379/".into(),
        modes: vec!["none".into(), "cacheaside".into(), "tiercache".into()],
        users: 5000,
        tasks: 16,
        secs: 20.0,
        update_pct: 1.0,
        ttl: 60,
        seed: 1,
        instances: 1,
        setup: true,
        setup_only: false,
        stale_ages: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-setup" {
            a.setup = false;
            continue;
        }
        if flag == "--setup-only" {
            a.setup_only = true;
            continue;
        }
        let val = it.next().unwrap_or_else(|| die(&format!("{flag} needs a value")));
        let num = |v: &str| v.parse::<f64>().unwrap_or_else(|_| die(&format!("{flag}: not a number: {v}")));
        match flag.as_str() {
            "--pg" => a.pg = val,
            "--redis" => a.redis = val,
            "--modes" => a.modes = val.split(',').map(str::to_owned).collect(),
            "--users" => a.users = num(&val) as usize,
            "--tasks" => a.tasks = num(&val) as usize,
            "--secs" => a.secs = num(&val),
            "--update-pct" => a.update_pct = num(&val),
            "--ttl" => a.ttl = num(&val) as u64,
            "--seed" => a.seed = num(&val) as u64,
            "--instances" => a.instances = (num(&val) as usize).max(1),
            "--stale-ages" => a.stale_ages = Some(val),
            _ => die(&format!("unknown option {flag}")),
        }
    }
    for m in &a.modes {
        if !["none", "cacheaside", "tiercache", "tiercache-delete", "tiercache-bridge"].contains(&m.as_str()) {
            die(&format!("unknown mode {m} (none, cacheaside, tiercache, tiercache-delete, tiercache-bridge)"));
        }
    }
    if a.users < 1 || a.tasks < 1 {
        die("--users and --tasks must be >= 1");
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("e2e: {msg}");
    std::process::exit(2);
}

/// splitmix64: seeded, reproducible, and plenty for picking keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf over 1..=n with exponent s, by inverting the cumulative distribution (binary search).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }
    /// A user id in 1..=n (1 is the most popular).
    fn sample(&self, rng: &mut Rng) -> i32 {
        let u = rng.unit();
        (self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) + 1) as i32
    }
}

/// Log-linear latency histogram in nanoseconds: 32 sub-buckets per power of two (~3 % resolution).
#[derive(Clone)]
struct Hist {
    buckets: Vec<u64>,
    count: u64,
}

impl Hist {
    fn new() -> Hist {
        Hist { buckets: vec![0; 64 + 58 * 32], count: 0 }
    }
    fn index(v: u64) -> usize {
        if v < 64 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize; // >= 6
        64 + (e - 6) * 32 + ((v >> (e - 5)) & 31) as usize
    }
    /// The middle of a bucket.
    fn value(i: usize) -> f64 {
        if i < 64 {
            return i as f64;
        }
        let e = (i - 64) / 32 + 6;
        let sub = ((i - 64) % 32) as u64;
        let lo = (32 + sub) << (e - 5);
        lo as f64 + (1u64 << (e - 5)) as f64 / 2.0
    }
    fn record(&mut self, d: Duration) {
        let i = Self::index(d.as_nanos().min(u64::MAX as u128) as u64).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
    }
    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
    }
    /// Nanoseconds at quantile q.
    fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = ((self.count as f64 * q).ceil() as u64).max(1);
        let mut acc = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            acc += n;
            if acc >= target {
                return Self::value(i);
            }
        }
        Self::value(self.buckets.len() - 1)
    }
}

fn fmt_us(ns: f64) -> String {
    let us = ns / 1000.0;
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// What every mode counts.
#[derive(Default)]
struct Counters {
    db_queries: AtomicU64,
    db_updates: AtomicU64,
}

/// One PostgreSQL connection with its prepared statements (one per task, as a pool would hand out).
struct Db {
    client: Client,
    profile: Statement,
    bump_user: Statement,
    bump_line: Statement,
}

async fn connect_db(conn: &str) -> Result<Db, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("e2e: postgres connection: {e}");
        }
    });
    let profile = client.prepare(PROFILE_SQL).await?;
    let bump_user = client.prepare("UPDATE users SET version = version + 1 WHERE id = $1 RETURNING version").await?;
    let bump_line = client.prepare("UPDATE order_items SET qty = qty + 1 WHERE order_id = $1 AND line = $2").await?;
    Ok(Db { client, profile, bump_user, bump_line })
}

/// The origin read: one query, rows folded into a profile.
async fn load_profile(db: &Db, counters: &Counters, user: i32) -> Result<Profile, tokio_postgres::Error> {
    counters.db_queries.fetch_add(1, Relaxed);
    let rows = db.client.query(&db.profile, &[&user]).await?;
    let mut p = Profile {
        user_id: user,
        name: String::new(),
        email: String::new(),
        country: String::new(),
        version: 0,
        orders: Vec::with_capacity(rows.len()),
        lifetime_cents: 0,
    };
    for (i, r) in rows.iter().enumerate() {
        if i == 0 {
            p.name = r.get(0);
            p.email = r.get(1);
            p.country = r.get(2);
            p.version = r.get(3);
        }
        let o = OrderSummary {
            id: r.get(4),
            status: r.get(5),
            created_at: r.get(6),
            lines: r.get(7),
            units: r.get(8),
            total_cents: r.get(9),
        };
        p.lifetime_cents += o.total_cents;
        p.orders.push(o);
    }
    Ok(p)
}

/// The update: bump the user's version and one order line, in one transaction. Returns the new version.
/// (`BEGIN`/`COMMIT` as statements: `Client::transaction` needs `&mut`, and the loaders share the
/// connection through an `Arc`.)
async fn update_user(db: &Db, counters: &Counters, user: i32, rng: &mut Rng) -> Result<i64, tokio_postgres::Error> {
    counters.db_updates.fetch_add(1, Relaxed);
    let order = (i64::from(user) - 1) * ORDERS_PER_USER + 1 + (rng.next() % ORDERS_PER_USER as u64) as i64;
    let line = 1 + (rng.next() % LINES_PER_ORDER as u64) as i32;
    db.client.batch_execute("BEGIN").await?;
    let body = async {
        let version: i64 = db.client.query_one(&db.bump_user, &[&user]).await?.get(0);
        db.client.execute(&db.bump_line, &[&order, &line]).await?;
        db.client.batch_execute("COMMIT").await?;
        Ok(version)
    };
    let r = body.await;
    if r.is_err() {
        let _ = db.client.batch_execute("ROLLBACK").await;
    }
    r
}

async fn setup_schema(db: &Db, users: usize) -> Result<(), tokio_postgres::Error> {
    db.client.batch_execute(SCHEMA).await?;
    let fill = format!(
        "
INSERT INTO products
SELECT g, 'product ' || g, (ARRAY['books','games','garden','kitchen','toys'])[1 + g % 5], 199 + (g * 7919) % 20000
FROM generate_series(1, {PRODUCTS}) g;
INSERT INTO users
SELECT g, 'user ' || g, 'user' || g || '@example.com', (ARRAY['DE','FR','US','JP','BR'])[1 + g % 5],
       now() - make_interval(mins => g), 1
FROM generate_series(1, {users}) g;
INSERT INTO orders
SELECT (u - 1) * {ORDERS_PER_USER} + k, u, (ARRAY['paid','shipped','delivered'])[1 + (u + k) % 3],
       now() - make_interval(hours => (u * k) % 5000)
FROM generate_series(1, {users}) u, generate_series(1, {ORDERS_PER_USER}) k;
INSERT INTO order_items
SELECT o.id, l, 1 + ((o.id * 31 + l * 17) % {PRODUCTS}), 1 + (o.id + l) % 4
FROM orders o, generate_series(1, {LINES_PER_ORDER}) l;
ANALYZE;
"
    );
    db.client.batch_execute(&fill).await
}

/// The cache layer of one mode (one per instance).
#[derive(Clone)]
enum Layer {
    None,
    CacheAside(redis::aio::MultiplexedConnection),
    Tier(TierCache),
    /// tiercache read the same way, invalidated by `delete(key)` instead of the tag.
    TierDelete(TierCache),
    /// tiercache read the same way, invalidated by the pg bridge (nothing from the application).
    TierBridge(TierCache),
}

struct Shared {
    counters: Counters,
    /// Per user: the newest version whose update was committed and invalidated.
    committed: Vec<AtomicU64>,
    /// Per user: when `committed` was last raised, in nanoseconds since `origin`.
    committed_at: Vec<AtomicU64>,
    origin: Instant,
    stale: AtomicU64,
    /// The longest time between a commit + invalidation and a read that still missed it.
    max_stale_ns: AtomicU64,
    stale_users: Mutex<HashSet<i32>>,
    errors: AtomicU64,
    ttl: u64,
    /// Bridge mode: (user, version) -> when its commit returned, in nanoseconds since `origin`.
    commit_times: Mutex<std::collections::HashMap<(i32, i64), u64>>,
    /// Bridge mode: read start minus the commit of the first version the read missed, per stale read.
    stale_ages: Mutex<Vec<u64>>,
}

/// What a failed read or invalidation says (printed, counted as an error).
#[derive(Debug)]
enum ReadError {
    Db(tokio_postgres::Error),
    Redis(redis::RedisError),
    Cache(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Db(e) => write!(f, "postgres: {e}"),
            ReadError::Redis(e) => write!(f, "redis: {e}"),
            ReadError::Cache(e) => write!(f, "cache: {e}"),
        }
    }
}

async fn read(layer: &mut Layer, db: &Arc<Db>, shared: &Arc<Shared>, user: i32) -> Result<Profile, ReadError> {
    match layer {
        Layer::None => load_profile(db, &shared.counters, user).await.map_err(ReadError::Db),
        Layer::CacheAside(conn) => {
            let key = format!("ca:profile:{user}");
            let hit: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(conn).await.map_err(ReadError::Redis)?;
            if let Some(bytes) = hit {
                return Profile::from_bytes(&bytes).map_err(ReadError::Cache);
            }
            let p = load_profile(db, &shared.counters, user).await.map_err(ReadError::Db)?;
            let bytes = p.to_bytes().map_err(ReadError::Cache)?;
            redis::cmd("SET")
                .arg(&key)
                .arg(bytes)
                .arg("EX")
                .arg(shared.ttl)
                .query_async::<()>(conn)
                .await
                .map_err(ReadError::Redis)?;
            Ok(p)
        }
        Layer::Tier(cache) | Layer::TierDelete(cache) | Layer::TierBridge(cache) => {
            let opts = Opts::default().ttl(Duration::from_secs(shared.ttl)).tag(format!("user:{user}"));
            let (db, shared) = (db.clone(), shared.clone());
            cache
                .get_or_load(
                    &format!("profile:{user}"),
                    &opts,
                    move || async move { load_profile(&db, &shared.counters, user).await },
                )
                .await
                .map_err(|e| match e {
                    // Shared with the callers coalesced on the same load.
                    tiercache_client::Error::Load(e) => ReadError::Cache(format!("postgres: {e}")),
                    tiercache_client::Error::Codec(e) => ReadError::Cache(e),
                    tiercache_client::Error::Redis(e) => ReadError::Redis(*e),
                    e => ReadError::Cache(e.to_string()),
                })
        }
    }
}

async fn invalidate(layer: &mut Layer, user: i32) -> Result<(), ReadError> {
    match layer {
        Layer::None | Layer::TierBridge(_) => Ok(()),
        Layer::CacheAside(conn) => {
            redis::cmd("DEL").arg(format!("ca:profile:{user}")).query_async::<()>(conn).await.map_err(ReadError::Redis)
        }
        Layer::Tier(cache) => {
            cache.invalidate_tags(&[&format!("user:{user}")]).await.map(drop).map_err(|e| ReadError::Cache(e.to_string()))
        }
        Layer::TierDelete(cache) => cache.delete(&format!("profile:{user}")).await.map_err(|e| ReadError::Cache(e.to_string())),
    }
}

struct TaskResult {
    hist: Hist,
    reads: u64,
    updates: u64,
}

#[allow(clippy::too_many_arguments)]
async fn run_task(
    mut layer: Layer,
    db: Db,
    shared: Arc<Shared>,
    zipf: Arc<Zipf>,
    seed: u64,
    update_p: f64,
    start: Instant,
    deadline: Instant,
) -> TaskResult {
    let mut rng = Rng(seed);
    let db = Arc::new(db);
    let mut hist = Hist::new();
    let (mut reads, mut updates) = (0u64, 0u64);
    tokio::time::sleep_until(start.into()).await;
    while Instant::now() < deadline {
        let user = zipf.sample(&mut rng);
        if rng.unit() < update_p {
            match update_user(&db, &shared.counters, user, &mut rng).await {
                Ok(version) => {
                    if let Err(e) = invalidate(&mut layer, user).await {
                        eprintln!("e2e: invalidate: {e}");
                        shared.errors.fetch_add(1, Relaxed);
                    }
                    // Committed and invalidated: every read starting from now must see `version`.
                    // (Bridge mode: committed; invalidated within the bridge's lag.)
                    let now = shared.origin.elapsed().as_nanos() as u64;
                    if matches!(layer, Layer::TierBridge(_)) {
                        shared.commit_times.lock().unwrap_or_else(|e| e.into_inner()).insert((user, version), now);
                    }
                    shared.committed[user as usize].fetch_max(version as u64, SeqCst);
                    shared.committed_at[user as usize].store(now, SeqCst);
                    updates += 1;
                }
                Err(e) => {
                    eprintln!("e2e: update: {e}");
                    shared.errors.fetch_add(1, Relaxed);
                }
            }
            continue;
        }
        let floor = shared.committed[user as usize].load(SeqCst);
        let t0 = Instant::now();
        let t0_ns = shared.origin.elapsed().as_nanos() as u64;
        let r = read(&mut layer, &db, &shared, user).await;
        hist.record(t0.elapsed());
        match r {
            Ok(p) => {
                reads += 1;
                if (p.version as u64) < floor {
                    // Since the last commit of the user: a lower bound when a newer update came meanwhile.
                    let age = (shared.origin.elapsed().as_nanos() as u64)
                        .saturating_sub(shared.committed_at[user as usize].load(SeqCst));
                    shared.max_stale_ns.fetch_max(age, Relaxed);
                    if matches!(layer, Layer::TierBridge(_)) {
                        let missed =
                            shared.commit_times.lock().unwrap_or_else(|e| e.into_inner()).get(&(user, p.version + 1)).copied();
                        if let Some(c) = missed {
                            shared.stale_ages.lock().unwrap_or_else(|e| e.into_inner()).push(t0_ns.saturating_sub(c));
                        }
                    }
                    let quiet = matches!(layer, Layer::TierBridge(_));
                    if shared.stale.fetch_add(1, Relaxed) < 5 && !quiet {
                        eprintln!(
                            "e2e: stale read: user {user} returned version {} after version {floor} was committed and invalidated (read took {})",
                            p.version,
                            fmt_us(t0.elapsed().as_nanos() as f64)
                        );
                    }
                    shared.stale_users.lock().unwrap_or_else(|e| e.into_inner()).insert(user);
                }
            }
            Err(e) => {
                if shared.errors.fetch_add(1, Relaxed) < 5 {
                    eprintln!("e2e: read: {e}");
                }
            }
        }
    }
    TaskResult { hist, reads, updates }
}

struct ModeResult {
    mode: String,
    reads: u64,
    updates: u64,
    db_queries: u64,
    hist: Hist,
    stale: u64,
    stale_users: usize,
    max_stale_ns: u64,
    errors: u64,
    elapsed: f64,
    note: String,
}

async fn run_mode(a: &Args, mode: &str, zipf: Arc<Zipf>) -> Result<ModeResult, Box<dyn std::error::Error>> {
    let redis_client = redis::Client::open(a.redis.as_str())?;
    let mut admin = redis_client.get_multiplexed_async_connection().await?;
    redis::cmd("FLUSHALL").query_async::<()>(&mut admin).await?;

    let mut layers = Vec::new();
    for i in 0..a.instances {
        layers.push(match mode {
            "none" => Layer::None,
            "cacheaside" => Layer::CacheAside(redis_client.get_multiplexed_async_connection().await?),
            _ => {
                let cache = TierCache::builder(a.redis.as_str())
                    .namespace("e2e")
                    .l1_ttl(Duration::from_secs(a.ttl))
                    .default_ttl(Duration::from_secs(a.ttl))
                    .build()
                    .await
                    .map_err(|e| format!("tiercache instance {i}: {e}"))?;
                match mode {
                    "tiercache" => Layer::Tier(cache),
                    "tiercache-bridge" => Layer::TierBridge(cache),
                    _ => Layer::TierDelete(cache),
                }
            }
        });
    }
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        committed: (0..=a.users).map(|_| AtomicU64::new(0)).collect(),
        committed_at: (0..=a.users).map(|_| AtomicU64::new(0)).collect(),
        origin: Instant::now(),
        stale: AtomicU64::new(0),
        max_stale_ns: AtomicU64::new(0),
        stale_users: Mutex::new(HashSet::new()),
        errors: AtomicU64::new(0),
        ttl: a.ttl,
        commit_times: Mutex::new(std::collections::HashMap::new()),
        stale_ages: Mutex::new(Vec::new()),
    });
    let mut dbs = Vec::new();
    for _ in 0..a.tasks {
        dbs.push(connect_db(&a.pg).await?);
    }
    let start = Instant::now() + Duration::from_millis(100);
    let deadline = start + Duration::from_secs_f64(a.secs);
    let mut handles = Vec::new();
    for (t, db) in dbs.into_iter().enumerate() {
        let layer = layers[t % layers.len()].clone();
        let seed = a.seed.wrapping_mul(0x1000_0001).wrapping_add(t as u64);
        handles.push(tokio::spawn(run_task(
            layer,
            db,
            shared.clone(),
            zipf.clone(),
            seed,
            a.update_pct / 100.0,
            start,
            deadline,
        )));
    }
    let mut hist = Hist::new();
    let (mut reads, mut updates) = (0, 0);
    for h in handles {
        let r = h.await?;
        hist.merge(&r.hist);
        reads += r.reads;
        updates += r.updates;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let note = match &layers[0] {
        Layer::Tier(_) | Layer::TierDelete(_) | Layer::TierBridge(_) => {
            let mut l1_hits = 0;
            let mut l2_hits = 0;
            let mut loads = 0;
            let mut fenced = 0;
            let mut coalesced = 0;
            let mut redis_errors = 0;
            for l in &layers {
                if let Layer::Tier(c) | Layer::TierDelete(c) | Layer::TierBridge(c) = l {
                    let m = c.metrics();
                    l1_hits += m.l1_hits;
                    l2_hits += m.l2_hits;
                    loads += m.loads;
                    fenced += m.fenced;
                    coalesced += m.coalesced_local;
                    redis_errors += m.redis_errors;
                }
            }
            format!("L1 hits {l1_hits}, L2 hits {l2_hits}, loads {loads}, fenced fills {fenced}, coalesced {coalesced}, redis errors {redis_errors}")
        }
        _ => String::new(),
    };
    drop(layers);
    if let (Some(path), "tiercache-bridge") = (&a.stale_ages, mode) {
        let ages = shared.stale_ages.lock().unwrap_or_else(|e| e.into_inner());
        let text: String = ages.iter().map(|n| format!("{n}\n")).collect();
        std::fs::write(path, text)?;
    }
    let stale_users = shared.stale_users.lock().unwrap_or_else(|e| e.into_inner()).len();
    Ok(ModeResult {
        mode: mode.to_owned(),
        reads,
        updates,
        db_queries: shared.counters.db_queries.load(SeqCst),
        hist,
        stale: shared.stale.load(SeqCst),
        stale_users,
        max_stale_ns: shared.max_stale_ns.load(SeqCst),
        errors: shared.errors.load(SeqCst),
        elapsed,
        note,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args();
    if a.setup {
        let t = Instant::now();
        let db = connect_db_plain(&a.pg).await?;
        setup_schema(&db, a.users).await?;
        eprintln!(
            "e2e: schema ready: {} users, {} orders, {} order lines ({:.1} s)",
            a.users,
            a.users as i64 * ORDERS_PER_USER,
            a.users as i64 * ORDERS_PER_USER * i64::from(LINES_PER_ORDER),
            t.elapsed().as_secs_f64()
        );
    }
    if a.setup_only {
        return Ok(());
    }
    let zipf = Arc::new(Zipf::new(a.users, 1.0));
    let mut results = Vec::new();
    for mode in &a.modes {
        eprintln!("e2e: mode {mode}: {} tasks, {} s", a.tasks, a.secs);
        let r = run_mode(&a, mode, zipf.clone()).await?;
        eprintln!("e2e: mode {mode}: {} reads, {} updates, {} errors", r.reads, r.updates, r.errors);
        results.push(r);
    }

    println!(
        "{} tasks{}, {} users (Zipf s = 1.0, seed {}), {} % updates, {} s per mode, cache TTL {} s",
        a.tasks,
        if a.instances > 1 { format!(" over {} cache instances", a.instances) } else { String::new() },
        a.users,
        a.seed,
        a.update_pct,
        a.secs,
        a.ttl
    );
    println!();
    println!("| mode | reads | db queries | queries avoided | p50 | p99 | stale reads |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        let avoided = if r.reads == 0 { 0.0 } else { 100.0 * (1.0 - r.db_queries as f64 / r.reads as f64) };
        println!(
            "| {} | {} | {} | {:.1} % | {} | {} | {} |",
            r.mode,
            r.reads,
            r.db_queries,
            avoided.max(0.0),
            fmt_us(r.hist.quantile(0.50)),
            fmt_us(r.hist.quantile(0.99)),
            r.stale
        );
    }
    println!();
    println!("| mode | reads/s | updates (committed + invalidated) | users with a stale read | longest stale (after commit + invalidation) | errors | notes |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} |",
            r.mode,
            r.reads as f64 / r.elapsed,
            r.updates,
            r.stale_users,
            if r.stale == 0 { "-".to_owned() } else { fmt_us(r.max_stale_ns as f64) },
            r.errors,
            r.note
        );
    }
    Ok(())
}

/// A connection without prepared statements (the tables may not exist yet).
async fn connect_db_plain(conn: &str) -> Result<Db, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let one = client.prepare("SELECT 1").await?;
    Ok(Db { client, profile: one.clone(), bump_user: one.clone(), bump_line: one })
}
