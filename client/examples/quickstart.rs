//! Cache-aside in front of a SQL database with tiercache-client.
//!
//! An embedded SQLite database (users and orders) stands in for the real one. Two `TierCache`
//! instances stand in for two app servers sharing one Redis: each has its own in-process L1, and
//! Redis (the tiercache module) is the shared L2, so a user loaded by one server is an L2 hit for
//! the other. The example then:
//!
//! 1. reads "orders of user N with totals" in a skewed (Zipf) loop, cached per user with the tag
//!    `user:<id>`, and counts the database queries that actually ran;
//! 2. updates one of a user's orders, commits, then calls `invalidate_tags(&["user:<id>"])`, and
//!    shows that the next read sees the new total (on both servers);
//! 3. prints hit rates from `metrics()` and an excerpt of the Prometheus text.
//!
//! Needs a Redis (>= 7.0) with the module loaded:
//!
//! ```text
//! cargo build                       # builds target/debug/libtiercache.so
//! redis-server --port 6379 --save "" --loadmodule target/debug/libtiercache.so
//! TIERCACHE_URL=redis://127.0.0.1:6379/ cargo run -p tiercache-client --example quickstart
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use tiercache_client::{Error, Opts, Snapshot, TierCache};

const USERS: u64 = 300;
const READS: usize = 20_000;
const ITEMS: [(&str, i64); 8] = [
    ("keyboard", 4_999),
    ("monitor", 18_900),
    ("usb-c cable", 1_299),
    ("desk lamp", 3_450),
    ("headphones", 8_999),
    ("webcam", 6_500),
    ("mouse", 2_499),
    ("laptop stand", 3_999),
];

/// What the cache holds per user: the result of the join, ready to render.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserOrders {
    user_id: u64,
    name: String,
    orders: Vec<OrderLine>,
    total_cents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderLine {
    order_id: u64,
    item: String,
    qty: i64,
    line_total_cents: i64,
}

/// The database: one connection behind a mutex (a real service would use a pool), plus a counter of
/// the queries that reached it.
#[derive(Clone)]
struct Db {
    conn: Arc<Mutex<Connection>>,
    queries: Arc<AtomicU64>,
}

impl Db {
    /// A fresh in-memory database: `USERS` users with 0 to 9 orders each.
    fn create() -> rusqlite::Result<Db> {
        let mut conn = Connection::open_in_memory()?;
        conn.execute_batch(
            "CREATE TABLE users (
                 id    INTEGER PRIMARY KEY,
                 name  TEXT NOT NULL,
                 email TEXT NOT NULL
             );
             CREATE TABLE orders (
                 id               INTEGER PRIMARY KEY,
                 user_id          INTEGER NOT NULL REFERENCES users(id),
                 item             TEXT NOT NULL,
                 qty              INTEGER NOT NULL,
                 unit_price_cents INTEGER NOT NULL
             );
             CREATE INDEX orders_by_user ON orders(user_id);",
        )?;
        let tx = conn.transaction()?;
        let mut rng = XorShift(0x5eed_cafe);
        for id in 1..=USERS {
            tx.execute(
                "INSERT INTO users (id, name, email) VALUES (?1, ?2, ?3)",
                params![id, format!("User {id}"), format!("user{id}@example.com")],
            )?;
            for _ in 0..rng.next() % 10 {
                let (item, price) = ITEMS[(rng.next() % ITEMS.len() as u64) as usize];
                tx.execute(
                    "INSERT INTO orders (user_id, item, qty, unit_price_cents) VALUES (?1, ?2, ?3, ?4)",
                    params![id, item, 1 + rng.next() % 3, price],
                )?;
            }
        }
        tx.commit()?;
        Ok(Db { conn: Arc::new(Mutex::new(conn)), queries: Arc::new(AtomicU64::new(0)) })
    }

    /// The query behind the cache: a user and their orders, with line totals and a grand total.
    fn user_orders(&self, user_id: u64) -> rusqlite::Result<UserOrders> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(
            "SELECT u.name, o.id, o.item, o.qty, o.qty * o.unit_price_cents
               FROM users u LEFT JOIN orders o ON o.user_id = u.id
              WHERE u.id = ?1
              ORDER BY o.id",
        )?;
        let mut out = UserOrders { user_id, name: String::new(), orders: Vec::new(), total_cents: 0 };
        let mut rows = stmt.query(params![user_id])?;
        while let Some(row) = rows.next()? {
            out.name = row.get(0)?;
            // LEFT JOIN: a user without orders gives one row of NULLs.
            if let Some(order_id) = row.get::<_, Option<u64>>(1)? {
                let line = OrderLine { order_id, item: row.get(2)?, qty: row.get(3)?, line_total_cents: row.get(4)? };
                out.total_cents += line.line_total_cents;
                out.orders.push(line);
            }
        }
        if out.name.is_empty() {
            return Err(rusqlite::Error::QueryReturnedNoRows);
        }
        Ok(out)
    }

    /// Adds `extra` to the quantity of the user's first order, in a committed transaction.
    fn bump_first_order(&self, user_id: u64, extra: i64) -> rusqlite::Result<u64> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        let order_id: u64 = tx.query_row("SELECT MIN(id) FROM orders WHERE user_id = ?1", params![user_id], |r| r.get(0))?;
        tx.execute("UPDATE orders SET qty = qty + ?1 WHERE id = ?2", params![extra, order_id])?;
        tx.commit()?;
        Ok(order_id)
    }
}

/// Reads done through the cache, for the hit rates.
static READS_DONE: AtomicU64 = AtomicU64::new(0);

/// The cache-aside read: L1, then Redis, then (once for the whole fleet) the database.
async fn user_orders(cache: &TierCache, db: &Db, user_id: u64) -> Result<UserOrders, Error<rusqlite::Error>> {
    READS_DONE.fetch_add(1, Ordering::Relaxed);
    let opts = Opts::default().ttl(Duration::from_secs(300)).tag(format!("user:{user_id}"));
    let db = db.clone();
    cache
        .get_or_load(&format!("user-orders:{user_id}"), &opts, move || async move {
            // rusqlite blocks: keep it off the async worker threads.
            tokio::task::spawn_blocking(move || db.user_orders(user_id)).await.expect("database task panicked")
        })
        .await
}

#[path = "../benches/support/zipf.rs"]
mod zipf;
use zipf::{XorShift, Zipf};

fn print_lines(v: &UserOrders) {
    for o in &v.orders {
        println!("    order {:>4}  {:<12} x{}  {:>9}", o.order_id, o.item, o.qty, dollars(o.line_total_cents));
    }
}

fn dollars(cents: i64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// `build()` never fails on a down Redis (the cache starts degraded and bypasses it), so ask it once:
/// invalidating a tag no entry carries is a harmless round trip that needs the module.
async fn check_redis(cache: &TierCache, url: &str) -> Result<(), String> {
    match cache.invalidate_tags(&["quickstart:probe"]).await {
        Ok(_) => Ok(()),
        Err(Error::Redis(e)) if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() => {
            Err(format!("Redis is not reachable at {url} ({e})"))
        }
        Err(e) => Err(format!("Redis at {url} answered, but not as the tiercache module would: is the module loaded? ({e})")),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("TIERCACHE_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_string());
    // Two "app servers". A small L1 (32 KiB, about a quarter of the users) so that the tail of the
    // distribution is served by Redis and the head by L1.
    let mut servers = Vec::new();
    for _ in 0..2 {
        let cache = TierCache::builder(url.as_str())
            .namespace("quickstart")
            .schema_version(1)
            .l1_max_bytes(32 << 10)
            .build()
            .await
            .map_err(|e| format!("TIERCACHE_URL={url}: {e}"))?;
        servers.push(cache);
    }
    if let Err(msg) = check_redis(&servers[0], &url).await {
        eprintln!("error: {msg}");
        eprintln!("Start one with the module, e.g.:");
        eprintln!("  cargo build && redis-server --port 6379 --save \"\" --loadmodule target/debug/libtiercache.so");
        eprintln!("then set TIERCACHE_URL=redis://127.0.0.1:6379/ (the default).");
        std::process::exit(2);
    }
    // The database is created anew on each run: anything an earlier run cached is not its data.
    servers[0].flush_namespace().await?;

    let db = Db::create()?;
    let orders: u64 = db.conn.lock().unwrap().query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?;
    println!("SQLite: {USERS} users, {orders} orders; Redis: {url}");

    // 1. A skewed read loop spread over both servers.
    let zipf = Zipf::new(USERS, 1.0);
    let mut rng = XorShift(42);
    let started = Instant::now();
    for _ in 0..READS {
        let user = zipf.sample(&mut rng) + 1; // user ids start at 1
        let server = &servers[(rng.next() % 2) as usize];
        let v = user_orders(server, &db, user).await?;
        assert_eq!(v.user_id, user);
    }
    let elapsed = started.elapsed();
    let queries = db.queries.load(Ordering::Relaxed);
    println!(
        "\n{READS} reads (Zipf s=1 over {USERS} users, 2 app servers) in {:.0} ms: {queries} database queries",
        elapsed.as_secs_f64() * 1e3
    );
    report("after the read loop", &servers, queries);

    // 2. A write: UPDATE + COMMIT, then invalidate the user's tag.
    // The most read user that has orders.
    let user: u64 = db.conn.lock().unwrap().query_row("SELECT MIN(user_id) FROM orders", [], |r| r.get(0))?;
    let before = user_orders(&servers[0], &db, user).await?;
    // Warm server B too, so that it holds the old value in its own L1.
    user_orders(&servers[1], &db, user).await?;
    println!("\nuser {user} ({}): {} order(s), total {}", before.name, before.orders.len(), dollars(before.total_cents));
    print_lines(&before);
    let order_id = db.bump_first_order(user, 2)?;
    println!("UPDATE orders SET qty = qty + 2 WHERE id = {order_id}; COMMIT");
    let cached = user_orders(&servers[0], &db, user).await?;
    println!("  read before invalidating: total {} (cached copy, not yet told)", dollars(cached.total_cents));
    // Invalidate after the commit: a reload that starts now can only see the new rows.
    servers[0].invalidate_tags(&[format!("user:{user}").as_str()]).await?;
    let after = user_orders(&servers[0], &db, user).await?;
    println!("  invalidate_tags([\"user:{user}\"]) on server A, then read on A: total {}", dollars(after.total_cents));
    print_lines(&after);
    // Server B hears of it through the module's invalidation message (asynchronous, usually < 1 ms).
    let t = Instant::now();
    let seen_on_b = loop {
        let v = user_orders(&servers[1], &db, user).await?;
        if v.total_cents == after.total_cents || t.elapsed() > Duration::from_secs(2) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    println!("  read on server B: total {} (after {:.1} ms)", dollars(seen_on_b.total_cents), t.elapsed().as_secs_f64() * 1e3);
    if after.total_cents == before.total_cents || seen_on_b.total_cents != after.total_cents {
        return Err("the update was not seen after the invalidation".into());
    }

    // 3. Metrics.
    report("at the end", &servers, db.queries.load(Ordering::Relaxed));
    println!("\nPrometheus text of server A (excerpt):");
    let text = servers[0].metrics().to_prometheus();
    let wanted = ["_l1_hits_total", "_l2_hits_total", "_l2_misses_total", "_loads_total", "_l1_entries", "_l1_bytes"];
    for line in text.lines().filter(|l| wanted.iter().any(|w| l.contains(&format!("tiercache_client{w}")))) {
        println!("  {line}");
    }
    Ok(())
}

/// Hit rates summed over the servers. Here a read is an L1 hit, an L2 hit (Redis) or a load (a
/// database query); stale serves and coalesced waits, which this example does not provoke, are the rest.
fn report(when: &str, servers: &[TierCache], queries: u64) {
    let reads = READS_DONE.load(Ordering::Relaxed);
    let m: Vec<Snapshot> = servers.iter().map(TierCache::metrics).collect();
    let sum = |f: fn(&Snapshot) -> u64| m.iter().map(f).sum::<u64>();
    let (l1, l2, loads) = (sum(|s| s.l1_hits), sum(|s| s.l2_hits), sum(|s| s.loads));
    println!("hit rates {when} ({reads} reads):");
    println!("  L1 hits        {l1:>6}  ({:.1} % of reads)", pct(l1, reads));
    println!("  L2 hits        {l2:>6}  ({:.1} % of reads)", pct(l2, reads));
    println!("  loads          {loads:>6}  (database queries: {queries})");
    println!("  queries avoided {:.1} %", 100.0 - pct(queries, reads));
    for (name, s) in ["A", "B"].iter().zip(&m) {
        println!("  server {name}: L1 {} entries / {} bytes", s.l1_entries, s.l1_bytes);
    }
}
