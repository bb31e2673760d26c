//! `tiercache write-behind run`: applies the writes that `TierCache::write_behind` queued on Redis
//! Streams to PostgreSQL.
//!
//! - One stream per shard (`tiercache:wb:{<namespace>:<shard>}`, 16 shards, a key always in the same
//!   one), read through the consumer group `--group`. Each shard is worked by one task, strictly in
//!   stream order, so a key's writes are applied in the order they were accepted.
//! - A shard is owned by one worker at a time (`tiercache:wb:{<namespace>:<shard>}:owner`, `SET` with
//!   a TTL renewed while working; the same `--consumer` name takes it back at once after a restart).
//!   On taking a shard the worker `XAUTOCLAIM`s every pending entry of the group (of dead consumers
//!   too) and applies its pending entries before reading new ones, so nothing is lost or reordered
//!   when a worker is killed.
//! - Each entry is applied in one PostgreSQL transaction together with the shard's offset
//!   (`tiercache_write_behind_offsets`: the last applied stream id per stream): an entry at or below
//!   the offset is a duplicate (a redelivery after a crash between `COMMIT` and `XACK`) and is skipped.
//!   So at-least-once delivery becomes exactly-once application. `XACK` follows the commit.
//! - A statement error is retried with exponential backoff (`--backoff-min-ms` doubling to
//!   `--backoff-max-ms`); after `--max-attempts` the entry is parked in the dead-letter stream
//!   `tiercache:wb:{<namespace>}:dead` (with the error) and acknowledged, and the shard moves on. Lost
//!   connections (Redis or PostgreSQL) are retried forever and never dead-letter anything.
//!
//! The mapping file (TOML) routes keys to SQL by longest prefix:
//!
//! ```toml
//! [[route]]
//! prefix = "user:"
//! set = "INSERT INTO users (id, doc) VALUES ($1::bigint, $2::jsonb) ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc"
//! delete = "DELETE FROM users WHERE id = $1::bigint"
//! ```
//!
//! Parameters, all `text`: `$1` the key without the prefix, `$2` the value as JSON (NULL for a delete),
//! `$3` the whole key, `$4` the stream entry id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use serde::Deserialize;
use tiercache_client::{write_behind_stream, WRITE_BEHIND_SHARDS};
use tokio_postgres::types::Type;

use crate::{log, serve};

#[derive(Subcommand)]
pub enum Command {
    /// Run the worker: apply queued writes to PostgreSQL, in order per key.
    Run(RunArgs),
}

#[derive(Args, Clone)]
pub struct RunArgs {
    #[arg(long, env = "TIERCACHE_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    pub redis: String,
    /// PostgreSQL connection string (`host=... user=... dbname=...` or a postgres:// URL).
    #[arg(long, env = "TIERCACHE_PG_DSN")]
    pub dsn: String,
    /// The mapping file: key prefixes to SQL statements.
    #[arg(long)]
    pub map: std::path::PathBuf,
    /// The clients' namespace (`TierCache::builder(...).namespace(...)`).
    #[arg(long, default_value = "app")]
    pub namespace: String,
    #[arg(long, default_value = "tiercache-write-behind")]
    pub group: String,
    /// This worker's consumer name; keep it across restarts (default: the host name and "-wb").
    #[arg(long)]
    pub consumer: Option<String>,
    /// Statement errors before an entry goes to the dead-letter stream.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
    #[arg(long, default_value_t = 100)]
    pub backoff_min_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    pub backoff_max_ms: u64,
    /// Entries read per XREADGROUP.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// How long a shard's ownership lasts without renewal.
    #[arg(long, default_value_t = 10_000)]
    pub lock_ttl_ms: u64,
    /// The clients' schema version (`TierCache::builder(...).schema_version(...)`): cache keys are
    /// `<namespace>:v<version>:<key>`.
    #[arg(long, default_value_t = 1)]
    pub schema_version: u32,
    /// Serve tiercache_write_behind_* metrics on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct MapFile {
    #[serde(default)]
    pub route: Vec<Route>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub set: Option<String>,
    pub delete: Option<String>,
}

/// The worker's metrics.
#[derive(Default)]
pub struct Metrics {
    pub applied: Counter,
    pub duplicates: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    /// Entries accepted but not yet acknowledged (not read yet + pending), over every shard.
    pub queue_depth: Gauge,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("tiercache_write_behind_applied", "Entries applied to the database", self.applied.clone());
        r.register(
            "tiercache_write_behind_duplicates",
            "Entries delivered again but already applied (skipped by the stream offset)",
            self.duplicates.clone(),
        );
        r.register("tiercache_write_behind_retried", "Statement failures retried with backoff", self.retried.clone());
        r.register(
            "tiercache_write_behind_dead_lettered",
            "Entries parked in the dead-letter stream after --max-attempts failures",
            self.dead_lettered.clone(),
        );
        r.register("tiercache_write_behind_queue_depth", "Entries accepted but not yet acknowledged", self.queue_depth.clone());
    }
}

pub async fn main(c: Command) -> Result<(), String> {
    match c {
        Command::Run(a) => run_cli(a).await,
    }
}

async fn run_cli(a: RunArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.map).map_err(|e| format!("cannot read {}: {e}", a.map.display()))?;
    let map: MapFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", a.map.display()))?;
    if map.route.is_empty() {
        return Err(format!("{}: no [[route]]", a.map.display()));
    }
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = a.metrics_listen {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        serve::spawn_registry(addr, registry, "write-behind", || {}).await?;
    }
    run(a, map.route, metrics).await
}

/// Where a shard stands; shared by its task and the depth sampler.
struct Worker {
    args: RunArgs,
    consumer: String,
    routes: Vec<Route>,
    metrics: Arc<Metrics>,
    redis: redis::Client,
}

pub async fn run(args: RunArgs, routes: Vec<Route>, metrics: Arc<Metrics>) -> Result<(), String> {
    let consumer = args.consumer.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-wb", host.trim())
    });
    let redis = redis::Client::open(args.redis.as_str()).map_err(|e| format!("--redis: {e}"))?;
    // The offsets table, once, before the shards start (concurrent CREATE IF NOT EXISTS can race).
    let mut delay = Duration::from_millis(args.backoff_min_ms.max(1));
    loop {
        match pg_connect(&args.dsn).await {
            Ok(pg) => match pg
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS tiercache_write_behind_offsets (
                        stream text PRIMARY KEY, ms bigint NOT NULL, seq bigint NOT NULL)",
                )
                .await
            {
                Ok(()) => break,
                Err(e) => log(&format!("write-behind: creating tiercache_write_behind_offsets: {e:?}")),
            },
            Err(e) => log(&format!("write-behind: PostgreSQL: {e}")),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(args.backoff_max_ms));
    }
    log(&format!(
        "write-behind: consumer {consumer}, group {}, namespace {}, {} shards, {} route(s)",
        args.group,
        args.namespace,
        WRITE_BEHIND_SHARDS,
        routes.len()
    ));
    let w = Arc::new(Worker { args, consumer, routes, metrics, redis });
    let mut tasks = Vec::new();
    for shard in 0..WRITE_BEHIND_SHARDS {
        let w = w.clone();
        tasks.push(tokio::spawn(async move { w.shard_loop(shard).await }));
    }
    let sampler = {
        let w = w.clone();
        tokio::spawn(async move { w.sample_depth().await })
    };
    for t in tasks {
        let _ = t.await;
    }
    sampler.abort();
    Ok(())
}

async fn pg_connect(dsn: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.map_err(|e| format!("{e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// One stream entry.
struct Entry {
    id: String,
    fields: HashMap<String, Vec<u8>>,
}

/// Why applying an entry failed.
enum ApplyError {
    /// The database answered with an error: retried, then dead-lettered.
    Statement(String),
    /// The entry can't be applied at all (no route, unreadable fields): dead-lettered at once.
    Poison(String),
    /// The connection failed: retried forever on a new connection.
    Connection(String),
}

/// After the last accepted write of a key is applied (or dead-lettered): forget it and delete the
/// cache entry (`TIERCACHE.DEL`, which also fences a load in flight), so that a value loaded from the
/// database while the write was queued (the entry expired meanwhile) can't outlive the queue. A newer
/// accept of the key leaves both alone. KEYS: latest hash, cache key. ARGV: key, entry id.
const SETTLED_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('TIERCACHE.DEL', KEYS[2])
  return 1
end
return 0
"#;

/// Take the shard when it is free or already ours (the same consumer after a restart).
const LOCK_SCRIPT: &str = r#"
local o = redis.call('GET', KEYS[1])
if (not o) or o == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"#;

fn parse_id(id: &str) -> Option<(i64, i64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn bulk(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

/// `[[id, [f, v, ...]], ...]` (XREADGROUP's per-stream entries, XAUTOCLAIM's second element).
fn parse_entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else { return Vec::new() };
    let mut out = Vec::new();
    for item in items {
        let Value::Array(pair) = item else { continue };
        let Some(id) = pair.first().and_then(bulk) else { continue };
        // An entry trimmed away while pending comes back as [id, nil]: no fields (dead-lettered).
        let kv: &[Value] = match pair.get(1) {
            Some(Value::Array(kv)) => kv,
            _ => &[],
        };
        let mut fields = HashMap::new();
        for c in kv.chunks(2) {
            if let (Some(k), Some(v)) = (c.first().and_then(bulk), c.get(1).and_then(bulk)) {
                fields.insert(String::from_utf8_lossy(&k).into_owned(), v);
            }
        }
        out.push(Entry { id: String::from_utf8_lossy(&id).into_owned(), fields });
    }
    out
}

impl Worker {
    fn stream(&self, shard: u32) -> String {
        write_behind_stream(&self.args.namespace, shard)
    }

    fn dead_stream(&self) -> String {
        format!("tiercache:wb:{{{}}}:dead", self.args.namespace)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let min = self.args.backoff_min_ms.max(1);
        let ms = min.saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        Duration::from_millis(ms.min(self.args.backoff_max_ms.max(min)))
    }

    async fn redis_conn(&self) -> Result<MultiplexedConnection, String> {
        // Blocking reads of up to a second share nothing with other commands: one connection per shard.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        self.redis.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| format!("{e}"))
    }

    /// Works shard `shard` forever, reconnecting with backoff after failures.
    async fn shard_loop(&self, shard: u32) {
        let mut failures = 0u32;
        loop {
            match self.work_shard(shard).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        log(&format!("write-behind: shard {shard}: {e}; retrying"));
                    }
                    tokio::time::sleep(self.backoff(failures)).await;
                }
            }
        }
    }

    async fn work_shard(&self, shard: u32) -> Result<(), String> {
        let stream = self.stream(shard);
        let owner = format!("{stream}:owner");
        let mut conn = self.redis_conn().await?;
        let mut pg = pg_connect(&self.args.dsn).await?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(&self.args.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(format!("XGROUP CREATE: {e}"));
            }
        }
        pg.execute("INSERT INTO tiercache_write_behind_offsets VALUES ($1, 0, 0) ON CONFLICT DO NOTHING", &[&stream])
            .await
            .map_err(|e| format!("PostgreSQL: {e:?}"))?;
        let mut held = false;
        loop {
            if !self.lock(&mut conn, &owner).await? {
                held = false;
                tokio::time::sleep(Duration::from_millis(self.args.lock_ttl_ms / 4 + 1)).await;
                continue;
            }
            if !held {
                self.claim_all(&mut conn, &stream).await?;
                held = true;
            }
            // Our pending entries first (claimed ones included), then new ones.
            let mut entries = self.read(&mut conn, &stream, "0", None).await?;
            if entries.is_empty() {
                entries = self.read(&mut conn, &stream, ">", Some(1000)).await?;
            }
            for e in entries {
                self.process(&mut conn, &mut pg, &stream, &owner, e).await?;
            }
        }
    }

    async fn lock(&self, conn: &mut MultiplexedConnection, owner: &str) -> Result<bool, String> {
        let got: i64 = redis::cmd("EVAL")
            .arg(LOCK_SCRIPT)
            .arg(1)
            .arg(owner)
            .arg(&self.consumer)
            .arg(self.args.lock_ttl_ms.max(100))
            .query_async(conn)
            .await
            .map_err(|e| format!("shard lock: {e}"))?;
        Ok(got == 1)
    }

    /// Claims every pending entry of the group on this stream (we own the shard: any other
    /// consumer's pending entries belong to a worker that died or lost the shard).
    async fn claim_all(&self, conn: &mut MultiplexedConnection, stream: &str) -> Result<(), String> {
        let mut cursor = "0-0".to_string();
        loop {
            let r: Value = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(&self.args.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000)
                .arg("JUSTID")
                .query_async(conn)
                .await
                .map_err(|e| format!("XAUTOCLAIM: {e}"))?;
            let next = match &r {
                Value::Array(parts) => parts.first().and_then(bulk).map(|b| String::from_utf8_lossy(&b).into_owned()),
                _ => None,
            };
            match next {
                Some(n) if n != "0-0" => cursor = n,
                _ => return Ok(()),
            }
        }
    }

    async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        stream: &str,
        from: &str,
        block: Option<u64>,
    ) -> Result<Vec<Entry>, String> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.args.group).arg(&self.consumer).arg("COUNT").arg(self.args.batch.max(1));
        if let Some(ms) = block {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(stream).arg(from);
        let r: Value = cmd.query_async(conn).await.map_err(|e| format!("XREADGROUP: {e}"))?;
        // [[stream, entries]] (RESP2) or {stream: entries} (RESP3); nil on a timeout.
        let entries = match &r {
            Value::Array(streams) => streams.first().and_then(|s| match s {
                Value::Array(kv) => kv.get(1).cloned(),
                _ => None,
            }),
            Value::Map(m) => m.first().map(|(_, v)| v.clone()),
            _ => None,
        };
        Ok(entries.map(|e| parse_entries(&e)).unwrap_or_default())
    }

    /// Applies one entry (retrying statement errors with backoff, dead-lettering after the last
    /// attempt), then acknowledges it. A connection error returns: the entry stays pending and is
    /// read again first on the new connection.
    async fn process(
        &self,
        conn: &mut MultiplexedConnection,
        pg: &mut tokio_postgres::Client,
        stream: &str,
        owner: &str,
        e: Entry,
    ) -> Result<(), String> {
        let mut attempt = 0u32;
        loop {
            match self.apply(pg, stream, &e).await {
                Ok(true) => {
                    self.metrics.applied.inc();
                    break;
                }
                Ok(false) => {
                    self.metrics.duplicates.inc();
                    break;
                }
                Err(ApplyError::Connection(msg)) => return Err(format!("PostgreSQL: {msg}")),
                Err(ApplyError::Poison(msg)) => {
                    self.dead_letter(conn, stream, &e, &msg, attempt + 1).await?;
                    break;
                }
                Err(ApplyError::Statement(msg)) => {
                    attempt += 1;
                    if attempt >= self.args.max_attempts.max(1) {
                        self.dead_letter(conn, stream, &e, &msg, attempt).await?;
                        break;
                    }
                    self.metrics.retried.inc();
                    let wait = self.backoff(attempt);
                    log(&format!("write-behind: {stream} {}: attempt {attempt} failed: {msg}; retrying in {wait:?}", e.id));
                    let until = Instant::now() + wait;
                    // Keep the shard while waiting.
                    while Instant::now() < until {
                        if !self.lock(conn, owner).await? {
                            return Err("lost the shard while retrying".into());
                        }
                        tokio::time::sleep((until - Instant::now()).min(Duration::from_millis(self.args.lock_ttl_ms / 4 + 1)))
                            .await;
                    }
                }
            }
        }
        if let Some(k) = e.fields.get("k") {
            let cache_key = [format!("{}:v{}:", self.args.namespace, self.args.schema_version).as_bytes(), k].concat();
            let _: i64 = redis::cmd("EVAL")
                .arg(SETTLED_SCRIPT)
                .arg(2)
                .arg(format!("{stream}:latest"))
                .arg(cache_key)
                .arg(k)
                .arg(&e.id)
                .query_async(conn)
                .await
                .map_err(|err| format!("settling the cache entry: {err}"))?;
        }
        let _: i64 = redis::cmd("XACK")
            .arg(stream)
            .arg(&self.args.group)
            .arg(&e.id)
            .query_async(conn)
            .await
            .map_err(|err| format!("XACK: {err}"))?;
        Ok(())
    }

    /// One transaction: the offset check (skip what was applied already), the mapped statement, the
    /// new offset. `Ok(false)` for a duplicate.
    async fn apply(&self, pg: &mut tokio_postgres::Client, stream: &str, e: &Entry) -> Result<bool, ApplyError> {
        let Some((ms, seq)) = parse_id(&e.id) else { return Err(ApplyError::Poison(format!("bad stream id {}", e.id))) };
        let field = |name: &str| e.fields.get(name).map(|v| String::from_utf8_lossy(v).into_owned());
        let (Some(key), Some(op)) = (field("k"), field("op")) else {
            return Err(ApplyError::Poison("entry without k or op".into()));
        };
        let route = self.routes.iter().filter(|r| key.starts_with(&r.prefix)).max_by_key(|r| r.prefix.len());
        let Some(route) = route else { return Err(ApplyError::Poison(format!("no route for key {key:?}"))) };
        let (sql, value) = match op.as_str() {
            "set" => (route.set.as_deref(), field("v")),
            "del" => (route.delete.as_deref(), None),
            other => return Err(ApplyError::Poison(format!("unknown op {other:?}"))),
        };
        let Some(sql) = sql else { return Err(ApplyError::Poison(format!("route {:?} has no {op} statement", route.prefix))) };
        let suffix = key[route.prefix.len()..].to_string();
        let classify = |err: tokio_postgres::Error| match err.as_db_error() {
            Some(db) => ApplyError::Statement(format!("{}: {}", db.code().code(), db.message())),
            None => ApplyError::Connection(format!("{err}")),
        };
        let tx = pg.transaction().await.map_err(classify)?;
        let row = tx
            .query_one("SELECT ms, seq FROM tiercache_write_behind_offsets WHERE stream = $1 FOR UPDATE", &[&stream])
            .await
            .map_err(classify)?;
        let (at_ms, at_seq): (i64, i64) = (row.get(0), row.get(1));
        if (ms, seq) <= (at_ms, at_seq) {
            tx.commit().await.map_err(classify)?;
            return Ok(false);
        }
        tx.execute_typed(sql, &[(&suffix, Type::TEXT), (&value, Type::TEXT), (&key, Type::TEXT), (&e.id, Type::TEXT)])
            .await
            .map_err(classify)?;
        tx.execute("UPDATE tiercache_write_behind_offsets SET ms = $2, seq = $3 WHERE stream = $1", &[&stream, &ms, &seq])
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    async fn dead_letter(
        &self,
        conn: &mut MultiplexedConnection,
        stream: &str,
        e: &Entry,
        error: &str,
        attempts: u32,
    ) -> Result<(), String> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.dead_stream()).arg("*").arg("stream").arg(stream).arg("entry_id").arg(&e.id);
        let mut names: Vec<&String> = e.fields.keys().collect();
        names.sort();
        for n in names {
            cmd.arg(n).arg(&e.fields[n]);
        }
        cmd.arg("error").arg(error).arg("attempts").arg(attempts);
        let _: String = cmd.query_async(conn).await.map_err(|err| format!("XADD dead-letter: {err}"))?;
        self.metrics.dead_lettered.inc();
        log(&format!("write-behind: {stream} {} dead-lettered after {attempts} attempt(s): {error}", e.id));
        Ok(())
    }

    /// Queue depth every second: per stream, the group's lag (entries not yet read) plus its pending.
    async fn sample_depth(&self) {
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            if conn.is_none() {
                conn = self.redis_conn().await.ok();
            }
            if let Some(c) = conn.as_mut() {
                let mut depth = 0i64;
                let mut ok = true;
                for shard in 0..WRITE_BEHIND_SHARDS {
                    match redis::cmd("XINFO").arg("GROUPS").arg(self.stream(shard)).query_async::<Value>(c).await {
                        Ok(v) => depth += group_depth(&v, &self.args.group),
                        Err(e) if e.code() == Some("ERR") => {}
                        Err(_) => {
                            ok = false;
                            break;
                        }
                    }
                }
                if ok {
                    self.metrics.queue_depth.set(depth);
                } else {
                    conn = None;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// `pending + lag` of `group` in an XINFO GROUPS reply (flat pairs in RESP2, maps in RESP3).
fn group_depth(v: &Value, group: &str) -> i64 {
    let Value::Array(groups) = v else { return 0 };
    for g in groups {
        let pairs: Vec<(String, &Value)> = match g {
            Value::Array(kv) => {
                kv.chunks(2).filter_map(|c| Some((String::from_utf8_lossy(&bulk(c.first()?)?).into_owned(), c.get(1)?))).collect()
            }
            Value::Map(m) => m.iter().filter_map(|(k, v)| Some((String::from_utf8_lossy(&bulk(k)?).into_owned(), v))).collect(),
            _ => continue,
        };
        let get = |n: &str| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        if get("name").and_then(bulk).as_deref() != Some(group.as_bytes()) {
            continue;
        }
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(i)) => *i,
            _ => 0,
        };
        return int(get("pending")) + int(get("lag"));
    }
    0
}
