//! `tiercache pg bridge`: moves the outbox's committed rows to `TIERCACHE.INVALIDATE`, then deletes them.
//!
//! Delivery is at-least-once: a row is deleted only after Redis acknowledged every `INVALIDATE` carrying
//! its tags, in a separate statement, so a crash anywhere in between sends it again (invalidating twice
//! is harmless). Rows of a rolled-back transaction never become visible, so they invalidate nothing.
//!
//! # Commit order, and why there is no "last id" cursor
//!
//! The outbox id is assigned at INSERT time, not at COMMIT: transaction A may insert id 10, B id 11, and
//! B commit first. A reader that remembered "done up to 11" would skip 10 for ever once A commits. So the
//! bridge keeps no cursor at all: every pass reads *all* rows visible in its snapshot (committed ones
//! only), and a row leaves the table only by being delivered. A row that commits late with a small id is
//! simply visible to the next pass. This also gives commit order at batch granularity: every row of
//! pass N committed before pass N's snapshot was taken, every row first seen by pass N+1 committed after
//! it, and all the tags of one pass go out before any of the next pass. Within a pass the order does not
//! matter: the tags are deduplicated and sent together, and INVALIDATE is idempotent and commutative.
//! (The alternative, a `pg_snapshot_xmin` fence over the rows' `xid8`, would also be safe but makes every
//! invalidation wait for the oldest running writer, however long it runs; a lock that serialises the
//! writers' commits would slow the application down.) A pass is capped at `batch_rows` rows read in id
//! order; the next pass then reads the rest, which is still everything committed before its snapshot.
//!
//! Only one bridge per outbox delivers at a time: each holds a session advisory lock
//! (`pg_try_advisory_lock`) while it works, and a second bridge stands by until the first one's session
//! ends. Two bridges deleting the same rows would be harmless but wasteful.
//!
//! # Failures
//!
//! - PostgreSQL down or restarted: the LISTEN connection ends, the bridge reconnects with backoff,
//!   LISTENs again and then drains the whole outbox (notifications sent while it was away are lost;
//!   the rows are not).
//! - Redis down: the batch is retried with backoff until Redis acknowledges it; the rows stay in the
//!   outbox meanwhile. After reconnecting, the tags acknowledged in the last `replay_window` are sent
//!   again first, in case the restarted Redis lost them (AOF `appendfsync everysec` may lose about a
//!   second of writes).
//! - The bridge killed: the next bridge delivers whatever is in the outbox.
//! - A notification lost for any other reason: a safety pass runs every `recheck` anyway.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::mapping::ident;
use super::pg_err;
use crate::log;

/// At most this many tags per INVALIDATE (the module's limit).
pub const MAX_TAGS_PER_COMMAND: usize = 1024;

#[derive(Clone, Debug)]
pub struct Config {
    pub dsn: String,
    pub redis_url: String,
    pub schema: String,
    pub channel: String,
    /// Rows read per pass.
    pub batch_rows: i64,
    /// Safety pass interval when no notification comes.
    pub recheck: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Tags acknowledged this recently are sent again after a Redis reconnection.
    pub replay_window: Duration,
    pub redis_timeout: Duration,
}

/// The bridge's metrics (`tiercache_bridge_*`), and exact lag quantiles for the shutdown summary.
pub struct Metrics {
    pub rows: Counter,
    pub tags: Counter,
    pub commands: Counter,
    pub passes: Counter,
    pub errors: Family<Vec<(String, String)>, Counter>,
    pub lag: Histogram,
    pub last_lag: Gauge<f64, AtomicU64>,
    samples: Mutex<Vec<f64>>,
}

const MAX_SAMPLES: usize = 1_000_000;

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            rows: Counter::default(),
            tags: Counter::default(),
            commands: Counter::default(),
            passes: Counter::default(),
            errors: Family::default(),
            lag: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            last_lag: Gauge::default(),
            samples: Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    pub fn register(self: &Arc<Self>, r: &mut Registry) {
        r.register("tiercache_bridge_rows", "Outbox rows delivered to Redis and deleted", self.rows.clone());
        r.register("tiercache_bridge_tags", "Tags invalidated (after deduplication within a pass)", self.tags.clone());
        r.register("tiercache_bridge_invalidate_commands", "TIERCACHE.INVALIDATE commands acknowledged", self.commands.clone());
        r.register("tiercache_bridge_passes", "Passes over the outbox", self.passes.clone());
        r.register("tiercache_bridge_errors", "Errors by kind (postgres, redis), each followed by a retry", self.errors.clone());
        r.register(
            "tiercache_bridge_lag_seconds",
            "Commit of an outbox row to Redis's acknowledgement of its invalidation",
            self.lag.clone(),
        );
        r.register("tiercache_bridge_last_lag_seconds", "Lag of the last row delivered", self.last_lag.clone());
    }

    fn error(&self, kind: &str) {
        self.errors.get_or_create(&vec![("kind".to_string(), kind.to_string())]).inc();
    }

    fn observe(&self, lag: f64) {
        let lag = lag.max(0.0);
        self.lag.observe(lag);
        self.last_lag.set(lag);
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < MAX_SAMPLES {
            s.push(lag);
        }
    }

    /// (rows, p50, p99, max) of the lag in seconds, over the first million rows.
    pub fn lag_summary(&self) -> Option<(usize, f64, f64, f64)> {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if s.is_empty() {
            return None;
        }
        s.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| s[((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1];
        Some((s.len(), q(0.5), q(0.99), s[s.len() - 1]))
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The Redis side: one multiplexed connection, re-made on failure.
struct RedisSide {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    timeout: Duration,
    /// (acknowledged at, tags) of the last `replay_window`.
    recent: VecDeque<(Instant, Vec<String>)>,
    replay_window: Duration,
    had_connection: bool,
}

impl RedisSide {
    async fn connection(&mut self) -> Result<MultiplexedConnection, String> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let cfg =
            AsyncConnectionConfig::new().set_connection_timeout(Some(self.timeout)).set_response_timeout(Some(self.timeout));
        let mut c = self.client.get_multiplexed_async_connection_with_config(&cfg).await.map_err(|e| e.to_string())?;
        if self.had_connection {
            // A reconnection: Redis may have restarted and lost the last acknowledged invalidations.
            let cutoff = Instant::now().checked_sub(self.replay_window);
            let replay: Vec<String> = self
                .recent
                .iter()
                .filter(|(at, _)| cutoff.is_none_or(|c| *at >= c))
                .flat_map(|(_, t)| t.iter().cloned())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            if !replay.is_empty() {
                log(&format!("pg bridge: Redis reconnected, replaying {} recent tag(s)", replay.len()));
                send(&mut c, &replay).await?;
            }
        }
        self.had_connection = true;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Sends `tags` until Redis acknowledges them, reconnecting with backoff.
    async fn invalidate(&mut self, tags: &[String], cfg: &Config, metrics: &Metrics) -> usize {
        let mut backoff = cfg.backoff_min;
        loop {
            let r = match self.connection().await {
                Ok(mut c) => send(&mut c, tags).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(n) => {
                    let now = Instant::now();
                    self.recent.push_back((now, tags.to_vec()));
                    while self.recent.front().is_some_and(|(at, _)| now.duration_since(*at) > self.replay_window) {
                        self.recent.pop_front();
                    }
                    return n;
                }
                Err(e) => {
                    metrics.error("redis");
                    log(&format!("pg bridge: Redis: {e}; retrying in {backoff:?}"));
                    self.conn = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
            }
        }
    }
}

/// One pipeline of INVALIDATEs of at most 1024 tags each; the number of commands.
async fn send(c: &mut MultiplexedConnection, tags: &[String]) -> Result<usize, String> {
    if tags.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    let mut n = 0;
    for chunk in tags.chunks(MAX_TAGS_PER_COMMAND) {
        pipe.cmd("TIERCACHE.INVALIDATE").arg(chunk);
        n += 1;
    }
    pipe.query_async::<Vec<redis::Value>>(c).await.map_err(|e| e.to_string())?;
    Ok(n)
}

/// Runs until the process ends: reconnects to PostgreSQL with backoff after any failure.
pub async fn run(cfg: Config, metrics: Arc<Metrics>) -> Result<(), String> {
    let client = redis::Client::open(cfg.redis_url.as_str()).map_err(|e| format!("--redis: {e}"))?;
    let mut redis = RedisSide {
        client,
        conn: None,
        timeout: cfg.redis_timeout,
        recent: VecDeque::new(),
        replay_window: cfg.replay_window,
        had_connection: false,
    };
    let mut backoff = cfg.backoff_min;
    loop {
        let started = Instant::now();
        let e = session(&cfg, &mut redis, &metrics).await;
        metrics.error("postgres");
        if started.elapsed() > cfg.backoff_max {
            backoff = cfg.backoff_min;
        }
        log(&format!("pg bridge: PostgreSQL: {e}; reconnecting in {backoff:?}"));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

/// Aborts the connection task when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One PostgreSQL connection's life: LISTEN, take the bridge lock, then drain on every notification
/// (and every `recheck`). Returns the error that ended it.
async fn session(cfg: &Config, redis: &mut RedisSide, metrics: &Metrics) -> String {
    let (client, mut connection) = match tokio_postgres::connect(&cfg.dsn, NoTls).await {
        Ok(c) => c,
        Err(e) => return pg_err(&e),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    log(&format!("pg bridge: connection: {}", pg_err(&e)));
                    break;
                }
            }
        }
        // Dropping `tx` tells the session the connection is gone.
    }));
    let s = ident(&cfg.schema);
    if let Err(e) = client.batch_execute(&format!("LISTEN {}", ident(&cfg.channel))).await {
        return pg_err(&e);
    }
    // Only one bridge delivers at a time (see the module doc); the others wait here.
    let lock_key = format!("tiercache pg bridge {}", cfg.schema);
    let mut waiting_logged = false;
    loop {
        match client.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&lock_key]).await {
            Ok(r) if r.get::<_, bool>(0) => break,
            Ok(_) => {
                if !waiting_logged {
                    log("pg bridge: another bridge holds the lock on this outbox; standing by");
                    waiting_logged = true;
                }
                tokio::time::sleep(cfg.recheck).await;
            }
            Err(e) => return pg_err(&e),
        }
    }
    let commit_ts = match client.query_one("SELECT current_setting('track_commit_timestamp') = 'on'", &[]).await {
        Ok(r) => r.get::<_, bool>(0),
        Err(e) => return pg_err(&e),
    };
    // The commit time of a row when PostgreSQL records it, otherwise the row's write time (a lag that
    // then also counts the rest of the writing transaction).
    let time_expr = if commit_ts { "coalesce(pg_xact_commit_timestamp(xid::xid), at)" } else { "at" };
    let select = match client
        .prepare(&format!(
            "SELECT id, tags, extract(epoch FROM {time_expr})::float8 FROM {s}.outbox ORDER BY id LIMIT {}",
            cfg.batch_rows.max(1)
        ))
        .await
    {
        Ok(st) => st,
        Err(e) => return format!("{} (is `tiercache pg install` done on this database?)", pg_err(&e)),
    };
    let delete = match client.prepare(&format!("DELETE FROM {s}.outbox WHERE id = ANY($1)")).await {
        Ok(st) => st,
        Err(e) => return pg_err(&e),
    };
    log(&format!(
        "pg bridge: listening on {} (outbox {s}.outbox, lag from {})",
        cfg.channel,
        if commit_ts { "commit timestamps" } else { "row write times (track_commit_timestamp is off)" }
    ));
    loop {
        // Coalesce the notifications that came meanwhile: one pass covers them all.
        while rx.try_recv().is_ok() {}
        // Drain: passes until one comes back short.
        loop {
            metrics.passes.inc();
            let rows = match client.query(&select, &[]).await {
                Ok(r) => r,
                Err(e) => return pg_err(&e),
            };
            if rows.is_empty() {
                break;
            }
            let mut ids = Vec::with_capacity(rows.len());
            let mut times = Vec::with_capacity(rows.len());
            let mut seen = HashSet::new();
            let mut tags = Vec::new();
            for r in &rows {
                ids.push(r.get::<_, i64>(0));
                times.push(r.get::<_, Option<f64>>(2));
                for t in r.get::<_, Vec<String>>(1) {
                    if !t.is_empty() && seen.insert(t.clone()) {
                        tags.push(t);
                    }
                }
            }
            let n = redis.invalidate(&tags, cfg, metrics).await;
            let acked = now_secs();
            for t in times.into_iter().flatten() {
                metrics.observe(acked - t);
            }
            if let Err(e) = client.execute(&delete, &[&ids]).await {
                // Delivered but not deleted: sent again by the next pass (at-least-once).
                return pg_err(&e);
            }
            metrics.rows.inc_by(ids.len() as u64);
            metrics.tags.inc_by(tags.len() as u64);
            metrics.commands.inc_by(n as u64);
            if (rows.len() as i64) < cfg.batch_rows {
                break;
            }
        }
        tokio::select! {
            r = rx.recv() => if r.is_none() {
                return "connection closed".into();
            },
            _ = tokio::time::sleep(cfg.recheck) => {}
        }
    }
}
