//! `tiercache pg ...`: invalidation driven by PostgreSQL commits (issue 12). `install` puts triggers
//! generated from a mapping file on the mapped tables, writing tags into a transactional outbox;
//! `bridge` moves committed outbox rows to `TIERCACHE.INVALIDATE`. See README "Put it in front of
//! PostgreSQL".

pub mod bridge;
pub mod install;
pub mod mapping;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use prometheus_client::registry::Registry;

use crate::{log, serve};

#[derive(Subcommand)]
pub enum PgCmd {
    /// Create (or update) the outbox and the triggers of the mapping file. Safe to run again.
    Install(InstallArgs),
    /// Remove the triggers, their functions and the outbox (refused while the outbox holds rows).
    Uninstall(UninstallArgs),
    /// Deliver committed outbox rows to TIERCACHE.INVALIDATE, woken by LISTEN/NOTIFY.
    Bridge(BridgeArgs),
}

#[derive(Args)]
pub struct InstallArgs {
    /// PostgreSQL connection string (`host=... user=... dbname=...` or a postgres:// URL).
    #[arg(long, env = "TIERCACHE_PG_DSN")]
    dsn: String,
    /// The mapping file (TOML): tables and their tag templates.
    #[arg(long = "map", default_value = "tiercache.toml")]
    map: String,
}

#[derive(Args)]
pub struct UninstallArgs {
    #[arg(long, env = "TIERCACHE_PG_DSN")]
    dsn: String,
    #[arg(long = "map", default_value = "tiercache.toml")]
    map: String,
    /// Drop the outbox even if it still holds undelivered rows.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct BridgeArgs {
    #[arg(long, env = "TIERCACHE_PG_DSN")]
    dsn: String,
    /// The mapping file: its schema and channel say where the outbox is.
    #[arg(long = "map", default_value = "tiercache.toml")]
    map: String,
    /// The Redis server (with the module) to invalidate in; the URL's database number selects the database.
    #[arg(long, env = "TIERCACHE_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    /// Outbox rows read per pass.
    #[arg(long, default_value_t = 1000)]
    batch_rows: i64,
    /// A safety pass runs this often even without notifications (milliseconds).
    #[arg(long, default_value_t = 1000)]
    recheck_ms: u64,
    #[arg(long, default_value_t = 100)]
    backoff_min_ms: u64,
    #[arg(long, default_value_t = 5000)]
    backoff_max_ms: u64,
    /// After a Redis reconnection, tags acknowledged this recently are sent again (milliseconds).
    #[arg(long, default_value_t = 3000)]
    replay_window_ms: u64,
    #[arg(long, default_value_t = 5000)]
    redis_timeout_ms: u64,
    /// Serve tiercache_bridge_* metrics (lag histogram included) on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// A PostgreSQL error with the server's message, detail and hint (the error's own Display is terse).
pub fn pg_err(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!(" hint: {h}"));
        }
        return s;
    }
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) =
        tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.map_err(|e| format!("PostgreSQL: {}", pg_err(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            log(&format!("PostgreSQL connection: {}", pg_err(&e)));
        }
    });
    Ok(client)
}

pub async fn run(cmd: PgCmd) -> Result<(), String> {
    match cmd {
        PgCmd::Install(a) => {
            let m = mapping::Mapping::load(&a.map)?;
            let mut client = connect(&a.dsn).await?;
            let r = install::install(&mut client, &m).await?;
            log(&format!(
                "pg install: outbox {}.outbox; triggers on: {}; removed from: {}",
                m.schema,
                if r.installed.is_empty() { "(none)".into() } else { r.installed.join(", ") },
                if r.removed.is_empty() { "(none)".into() } else { r.removed.join(", ") }
            ));
            Ok(())
        }
        PgCmd::Uninstall(a) => {
            let m = mapping::Mapping::load(&a.map)?;
            let mut client = connect(&a.dsn).await?;
            let r = install::uninstall(&mut client, &m, a.force).await?;
            log(&format!("pg uninstall: triggers removed from: {}", r.removed.join(", ")));
            Ok(())
        }
        PgCmd::Bridge(a) => run_bridge(a).await,
    }
}

async fn run_bridge(a: BridgeArgs) -> Result<(), String> {
    let m = mapping::Mapping::load(&a.map)?;
    let backoff_min = Duration::from_millis(a.backoff_min_ms.max(1));
    let cfg = bridge::Config {
        dsn: a.dsn,
        redis_url: a.redis,
        schema: m.schema,
        channel: m.channel,
        batch_rows: a.batch_rows.max(1),
        recheck: Duration::from_millis(a.recheck_ms.max(10)),
        backoff_min,
        backoff_max: Duration::from_millis(a.backoff_max_ms).max(backoff_min),
        replay_window: Duration::from_millis(a.replay_window_ms),
        redis_timeout: Duration::from_millis(a.redis_timeout_ms.max(10)),
    };
    let metrics = Arc::new(bridge::Metrics::default());
    if let Some(addr) = a.metrics_listen {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        serve::spawn_registry(addr, registry, "pg bridge", || {}).await?;
    }
    let _summary = Summary(metrics.clone());
    bridge::run(cfg, metrics).await
}

/// Logs the lag quantiles when the bridge stops (the future is dropped on SIGTERM/SIGINT).
struct Summary(Arc<bridge::Metrics>);

impl Drop for Summary {
    fn drop(&mut self) {
        if let Some((n, p50, p99, max)) = self.0.lag_summary() {
            log(&format!(
                "pg bridge: lag over {n} rows: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                p50 * 1e3,
                p99 * 1e3,
                max * 1e3
            ));
        }
    }
}
