//! `tiercache`: the edge purger and the Prometheus exporter of the tiercache Redis module.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tiercache_cli::backend::Backend;
use tiercache_cli::{exporter, log, purge, serve};

#[derive(Parser)]
#[command(name = "tiercache", version, about = "tiercache tools: edge purger and Prometheus exporter")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Purge invalidated tags at the edge (Varnish xkey, Fastly, Cloudflare) as the module publishes them.
    Purge(Box<PurgeArgs>),
    /// Serve every `INFO tiercache` field (and used_memory, maxmemory, evicted_keys) as Prometheus metrics.
    Exporter(ExporterArgs),
    /// Invalidation driven by PostgreSQL commits: install triggers, run the outbox bridge.
    #[command(subcommand)]
    Pg(tiercache_cli::pg::PgCmd),
    /// Load hot rows into the cache from annotated SQL (PostgreSQL or SQLite), never over a fresher entry.
    Warm(Box<tiercache_cli::warm::WarmArgs>),
    /// Write-behind: apply the writes clients queued on Redis Streams to PostgreSQL (cli/src/write_behind.rs).
    #[command(subcommand)]
    WriteBehind(tiercache_cli::write_behind::Command),
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    Varnish,
    Fastly,
    Cloudflare,
}

#[derive(Args)]
struct PurgeArgs {
    /// The Redis server whose invalidation messages to follow.
    #[arg(long, env = "TIERCACHE_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    /// The module's tiercache.invalidation-channel.
    #[arg(long, default_value = "tiercache:invalidations")]
    channel: String,
    /// Only purge invalidations of this database (default: every database).
    #[arg(long)]
    db: Option<u64>,
    #[arg(long, value_enum)]
    backend: BackendKind,
    /// The key every page of the site carries (e.g. the client's namespace tag `ns:app:v1`): a full
    /// purge (reset message, missed messages, resubscription) purges it. Without it a full purge
    /// purges everything the backend caches.
    #[arg(long)]
    namespace_key: Option<String>,
    /// Varnish: a URL of each Varnish to purge (repeat the flag for several).
    #[arg(long = "varnish-url")]
    varnish_urls: Vec<String>,
    #[arg(long, default_value = "https://api.fastly.com")]
    fastly_api: String,
    #[arg(long)]
    fastly_service_id: Option<String>,
    #[arg(long, env = "FASTLY_API_TOKEN", hide_env_values = true)]
    fastly_token: Option<String>,
    /// Fastly: mark purged content stale instead of removing it (Fastly-Soft-Purge: 1).
    #[arg(long)]
    fastly_soft: bool,
    #[arg(long, default_value = "https://api.cloudflare.com/client/v4")]
    cloudflare_api: String,
    #[arg(long)]
    cloudflare_zone_id: Option<String>,
    #[arg(long, env = "CLOUDFLARE_API_TOKEN", hide_env_values = true)]
    cloudflare_token: Option<String>,
    /// How long to gather messages into one request, in milliseconds.
    #[arg(long, default_value_t = 20)]
    batch_window_ms: u64,
    /// Requests per second at most (default: 100 for Varnish, 10 for Fastly, 5 for Cloudflare).
    #[arg(long)]
    rate: Option<f64>,
    /// First retry delay after a failed request, doubling up to --backoff-max-ms.
    #[arg(long, default_value_t = 100)]
    backoff_min_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    backoff_max_ms: u64,
    /// Waiting keys beyond which one full purge replaces them.
    #[arg(long, default_value_t = 100_000)]
    max_pending: usize,
    /// Skip the full purge made once subscribed at start. Invalidations published while no purger
    /// ran are then never purged at the edge: use only when another purger was running meanwhile.
    #[arg(long)]
    no_full_purge_on_start: bool,
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Check the subscription with PING this often (milliseconds)...
    #[arg(long, default_value_t = 5_000)]
    ping_interval_ms: u64,
    /// ...and reconnect (then purge the namespace) when no reply comes within this.
    #[arg(long, default_value_t = 5_000)]
    ping_timeout_ms: u64,
    /// Serve the purger's own metrics (tiercache_purger_*) on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Args)]
struct ExporterArgs {
    /// A Redis node to scrape (repeat the flag for several).
    #[arg(long = "redis", required = true)]
    redis: Vec<String>,
    /// Address of the /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9187")]
    listen: SocketAddr,
    /// How long one node may take to answer INFO.
    #[arg(long, default_value_t = 2_000)]
    timeout_ms: u64,
}

fn need(v: Option<String>, flag: &str) -> Result<String, String> {
    v.filter(|s| !s.is_empty()).ok_or_else(|| format!("--{flag} is required for this backend"))
}

async fn run_purge(a: PurgeArgs) -> Result<(), String> {
    let backend = match a.backend {
        BackendKind::Varnish => {
            if a.varnish_urls.is_empty() {
                return Err("--varnish-url is required for --backend varnish".into());
            }
            Backend::Varnish { urls: a.varnish_urls }
        }
        BackendKind::Fastly => Backend::Fastly {
            api: a.fastly_api,
            service_id: need(a.fastly_service_id, "fastly-service-id")?,
            token: need(a.fastly_token, "fastly-token")?,
            soft: a.fastly_soft,
        },
        BackendKind::Cloudflare => Backend::Cloudflare {
            api: a.cloudflare_api,
            zone_id: need(a.cloudflare_zone_id, "cloudflare-zone-id")?,
            token: need(a.cloudflare_token, "cloudflare-token")?,
        },
    };
    let rate = a.rate.unwrap_or(match a.backend {
        BackendKind::Varnish => 100.0,
        BackendKind::Fastly => 10.0,
        BackendKind::Cloudflare => 5.0,
    });
    if !(rate > 0.0 && rate.is_finite()) {
        return Err("--rate must be a positive number".into());
    }
    let cfg = purge::Config {
        redis_url: a.redis,
        channel: a.channel,
        db: a.db,
        namespace_key: a.namespace_key,
        batch_window: Duration::from_millis(a.batch_window_ms),
        rate,
        backoff_min: Duration::from_millis(a.backoff_min_ms.max(1)),
        backoff_max: Duration::from_millis(a.backoff_max_ms.max(a.backoff_min_ms.max(1))),
        max_pending: a.max_pending.max(1),
        full_purge_on_start: !a.no_full_purge_on_start,
        request_timeout: Duration::from_millis(a.request_timeout_ms.max(1)),
        ping_interval: Duration::from_millis(a.ping_interval_ms.max(10)),
        ping_timeout: Duration::from_millis(a.ping_timeout_ms.max(10)),
    };
    let metrics = Arc::new(purge::Metrics::new());
    if let Some(addr) = a.metrics_listen {
        let lag: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry, &lag);
        let m = metrics.clone();
        serve::spawn_registry(addr, registry, "purge", move || {
            lag.set(m.lag_seconds());
        })
        .await?;
    }
    log(&format!(
        "purge: backend {}, namespace key {}, batch window {:?}, {} requests/s at most",
        backend.name(),
        cfg.namespace_key.as_deref().unwrap_or("(none: full purges purge everything)"),
        cfg.batch_window,
        cfg.rate
    ));
    purge::run(cfg, backend, metrics).await
}

async fn run_exporter(a: ExporterArgs) -> Result<(), String> {
    let timeout = Duration::from_millis(a.timeout_ms.max(1));
    let nodes = a.redis.iter().map(|u| exporter::Node::new(u, timeout).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
    let listener = serve::bind(a.listen).await?;
    log(&format!(
        "exporter: {} node(s): {}; metrics on http://{}/metrics",
        nodes.len(),
        nodes.iter().map(|n| n.label.as_str()).collect::<Vec<_>>().join(", "),
        a.listen
    ));
    let nodes = Arc::new(nodes);
    let render: serve::Render = Arc::new(move || {
        let nodes = nodes.clone();
        Box::pin(async move { exporter::scrape_all(&nodes).await })
    });
    serve::serve(listener, render).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log(&format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let work = async {
            match cli.cmd {
                Cmd::Purge(a) => run_purge(*a).await,
                Cmd::Exporter(a) => run_exporter(a).await,
                Cmd::Pg(c) => tiercache_cli::pg::run(c).await,
                Cmd::Warm(a) => tiercache_cli::warm::cli(*a).await,
                Cmd::WriteBehind(c) => tiercache_cli::write_behind::main(c).await,
            }
        };
        tokio::select! {
            r = work => r,
            _ = shutdown() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
