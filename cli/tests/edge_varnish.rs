//! End to end: a page cached by a real Varnish (monitoring/varnish.vcl, vmod xkey) under the xkey
//! headers `tiercache_client::edge` builds, `TIERCACHE.INVALIDATE` on a real module-enabled
//! redis-server, and `tiercache purge --backend varnish` making Varnish fetch the new page.

#[path = "../../tests/common/mod.rs"]
mod common;
mod harness;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{wait_subscribers, TempDir, Varnish};
use tiercache_client::edge;

const NS: &str = "ns:site:v1";

/// The origin: `/page/{id}` is "page {id} v{version}", tagged `page:{id}` (plus `shared` for pages
/// 1 and 2) and the namespace key, cacheable for an hour.
async fn origin(version: Arc<AtomicU64>, fetches: Arc<AtomicU64>) -> (u16, tokio::task::JoinHandle<()>) {
    use axum::extract::Path;
    let app = axum::Router::new().route(
        "/page/{id}",
        axum::routing::get(move |Path(id): Path<u32>| {
            let version = version.clone();
            let fetches = fetches.clone();
            async move {
                fetches.fetch_add(1, SeqCst);
                let mut tags = vec![format!("page:{id}"), NS.to_string()];
                if id <= 2 {
                    tags.push("shared".into());
                }
                let xkey = edge::xkey(&tags).expect("short header");
                (
                    [("xkey", xkey), ("cache-control", "public, max-age=3600".to_string())],
                    format!("page {id} v{}", version.load(SeqCst)),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}

async fn get(http: &reqwest::Client, url: &str) -> (String, String) {
    let r = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    let cache = r.headers().get("x-cache").map(|v| v.to_str().unwrap_or("").to_string()).unwrap_or_default();
    assert!(r.headers().get("xkey").is_none(), "the VCL strips xkey");
    (r.text().await.unwrap(), cache)
}

/// Polls Varnish until `url` serves `want`; returns how long that took.
async fn until_serves(http: &reqwest::Client, url: &str, want: &str, purger: &mut harness::Proc) -> Duration {
    let t0 = Instant::now();
    let ok = harness::wait_until(Duration::from_secs(20), || async { get(http, url).await.0 == want }).await;
    purger.assert_running();
    assert!(ok, "{url} never served {want:?}; purger log:\n{}", purger.log_text());
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_purges_varnish() {
    let dir = TempDir::new("edge-varnish");
    let server = common::Server::start();
    let mut conn = server.conn();
    let version = Arc::new(AtomicU64::new(1));
    let fetches = Arc::new(AtomicU64::new(0));
    let (origin_port, _origin) = origin(version.clone(), fetches.clone()).await;
    let varnish = Varnish::start(&dir, origin_port).await;
    let http = reqwest::Client::new();

    let redis_url = format!("redis://127.0.0.1:{}/", server.port);
    let varnish_url = varnish.url("/");
    let metrics_listen = format!("127.0.0.1:{}", harness::free_port());
    let mut purger = harness::tiercache(
        &dir,
        "purge-varnish",
        &[
            "purge",
            "--redis",
            &redis_url,
            "--backend",
            "varnish",
            "--varnish-url",
            &varnish_url,
            "--namespace-key",
            NS,
            "--metrics-listen",
            &metrics_listen,
        ],
    );
    wait_subscribers(&mut conn, 1, &mut purger).await;
    // A purger starts with a full purge (invalidations made while none ran are covered).
    let started = harness::wait_until(Duration::from_secs(20), || {
        let log = purger.log_text();
        async move { log.contains("full purge (start)") }
    })
    .await;
    assert!(started, "{}", purger.log_text());

    // Cache pages 1..=3 at Varnish: a miss, then a hit.
    for id in 1..=3 {
        let url = varnish.url(&format!("/page/{id}"));
        assert_eq!(get(&http, &url).await, (format!("page {id} v1"), "MISS".into()));
        assert_eq!(get(&http, &url).await, (format!("page {id} v1"), "HIT".into()));
    }
    assert_eq!(fetches.load(SeqCst), 3);

    // The application changes page 1 and invalidates its tag (entries in Redis carry it too).
    conn.set("page:1:data", "x", &["EX", "60", "TAGS", "1", "page:1"]);
    version.store(2, SeqCst);
    let t0 = Instant::now();
    assert_eq!(conn.int(&cmd!("TIERCACHE.INVALIDATE", "page:1")), 1);
    let _ = until_serves(&http, &varnish.url("/page/1"), "page 1 v2", &mut purger).await;
    let delay = t0.elapsed();
    eprintln!("INVALIDATE -> Varnish serving the new page: {delay:?}");
    // Only page 1 was purged: pages 2 and 3 are still the cached v1.
    assert_eq!(get(&http, &varnish.url("/page/2")).await, ("page 2 v1".into(), "HIT".into()));
    assert_eq!(get(&http, &varnish.url("/page/3")).await, ("page 3 v1".into(), "HIT".into()));

    // Several tags in one message, and a tag shared by two pages.
    version.store(3, SeqCst);
    conn.int(&cmd!("TIERCACHE.INVALIDATE", "shared", "page:nothing"));
    until_serves(&http, &varnish.url("/page/2"), "page 2 v3", &mut purger).await;
    until_serves(&http, &varnish.url("/page/1"), "page 1 v3", &mut purger).await;
    assert_eq!(get(&http, &varnish.url("/page/3")).await, ("page 3 v1".into(), "HIT".into()));

    // A reset message (FLUSHALL) purges the namespace: page 3 too.
    version.store(4, SeqCst);
    conn.ok(&cmd!("FLUSHALL"));
    until_serves(&http, &varnish.url("/page/3"), "page 3 v4", &mut purger).await;

    // A gap in seq (a message lost on the way, forged here with core's encoder) purges the namespace.
    for id in 1..=3 {
        get(&http, &varnish.url(&format!("/page/{id}"))).await;
    }
    version.store(5, SeqCst);
    let info = conn.info("server");
    let run_id = common::info_field(&info, "run_id").expect("run_id");
    let last: u64 = common::info_field(&conn.info("tiercache"), "tiercache_invalidation_messages").unwrap().parse().unwrap();
    let forged = tiercache_core::message::invalidation(run_id.as_bytes(), last + 5, 0, &[b"page:unrelated"]);
    conn.run(&cmd!("PUBLISH", "tiercache:invalidations", forged));
    for id in 1..=3 {
        until_serves(&http, &varnish.url(&format!("/page/{id}")), &format!("page {id} v5"), &mut purger).await;
    }
    let log = purger.log_text();
    assert!(log.contains("full purge (reset message)"), "{log}");
    assert!(log.contains("missed messages"), "{log}");

    // The purger's own metrics.
    let text = reqwest::get(format!("http://{metrics_listen}/metrics")).await.unwrap().text().await.unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(value("tiercache_purger_subscribed"), 1.0);
    assert_eq!(value("tiercache_purger_resets_total"), 1.0);
    assert_eq!(value("tiercache_purger_gaps_total"), 1.0);
    assert!(value("tiercache_purger_full_purges_total") >= 2.0);
    assert!(value("tiercache_purger_purged_keys_total") >= 3.0);
    assert_eq!(value("tiercache_purger_requests_total{result=\"error\"}"), 0.0);
    assert_eq!(value("tiercache_purger_pending_keys"), 0.0);
    assert_eq!(value("tiercache_purger_lag_seconds"), 0.0);
    assert!(value("tiercache_purger_purge_delay_seconds_count") >= 4.0);
    drop(purger);
    drop(varnish);
}

/// The figures of BENCHMARKS.md ("Edge purge delay"): time from `TIERCACHE.INVALIDATE` returning to
/// Varnish serving the new page, polled every millisecond, for the default batch window and none.
/// Run by hand: `cargo test -p tiercache-cli --test edge_varnish -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand"]
async fn purge_delay_figures() {
    const ROUNDS: u64 = 100;
    let dir = TempDir::new("edge-delay");
    let server = common::Server::start();
    let mut conn = server.conn();
    let version = Arc::new(AtomicU64::new(0));
    let fetches = Arc::new(AtomicU64::new(0));
    let (origin_port, _origin) = origin(version.clone(), fetches.clone()).await;
    let varnish = Varnish::start(&dir, origin_port).await;
    let http = reqwest::Client::new();
    let redis_url = format!("redis://127.0.0.1:{}/", server.port);
    let varnish_url = varnish.url("/");
    let url = varnish.url("/page/1");
    for window in ["20", "0"] {
        let mut purger = harness::tiercache(
            &dir,
            &format!("purge-delay-{window}"),
            &[
                "purge",
                "--no-full-purge-on-start",
                "--redis",
                &redis_url,
                "--backend",
                "varnish",
                "--varnish-url",
                &varnish_url,
                "--batch-window-ms",
                window,
                "--rate",
                "1000",
            ],
        );
        wait_subscribers(&mut conn, 1, &mut purger).await;
        let mut delays = Vec::new();
        for _ in 0..ROUNDS {
            let v = version.fetch_add(1, SeqCst) + 1;
            let want = format!("page 1 v{v}");
            get(&http, &url).await; // cached (old version) before the invalidation
            let t0 = Instant::now();
            conn.int(&cmd!("TIERCACHE.INVALIDATE", "page:1"));
            let end = t0 + Duration::from_secs(20);
            loop {
                if get(&http, &url).await.0 == want {
                    break;
                }
                assert!(Instant::now() < end, "{url} never served {want}:\n{}", purger.log_text());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            delays.push(t0.elapsed());
        }
        delays.sort();
        let pct = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize];
        eprintln!(
            "batch window {window} ms, {ROUNDS} rounds: INVALIDATE -> Varnish fresh: p50 {:.1?}, p90 {:.1?}, p99 {:.1?}, max {:.1?}",
            pct(0.5),
            pct(0.9),
            pct(0.99),
            delays[delays.len() - 1]
        );
        drop(purger);
        // The next purger must be the only subscriber.
        let ok = harness::wait_until(Duration::from_secs(10), || {
            let n = {
                let mut c = redis::cmd("PUBSUB");
                c.arg("NUMSUB").arg("tiercache:invalidations");
                let v = conn.run(&c);
                common::as_list(&v).and_then(|l| l.get(1)).and_then(common::as_int).unwrap_or(0)
            };
            async move { n == 0 }
        })
        .await;
        assert!(ok);
    }
}

/// Without --namespace-key a full purge (here the one at start) bans everything at Varnish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_purge_without_namespace_key_bans_everything() {
    let dir = TempDir::new("edge-varnish-all");
    let server = common::Server::start();
    let mut conn = server.conn();
    let version = Arc::new(AtomicU64::new(1));
    let fetches = Arc::new(AtomicU64::new(0));
    let (origin_port, _origin) = origin(version.clone(), fetches.clone()).await;
    let varnish = Varnish::start(&dir, origin_port).await;
    let http = reqwest::Client::new();
    for id in [1, 7] {
        let url = varnish.url(&format!("/page/{id}"));
        get(&http, &url).await;
        assert_eq!(get(&http, &url).await, (format!("page {id} v1"), "HIT".into()));
    }
    version.store(2, SeqCst);
    let redis_url = format!("redis://127.0.0.1:{}/", server.port);
    let varnish_url = varnish.url("/");
    let mut purger = harness::tiercache(
        &dir,
        "purge-varnish-all",
        &["purge", "--redis", &redis_url, "--backend", "varnish", "--varnish-url", &varnish_url],
    );
    wait_subscribers(&mut conn, 1, &mut purger).await;
    for id in [1, 7] {
        until_serves(&http, &varnish.url(&format!("/page/{id}")), &format!("page {id} v2"), &mut purger).await;
    }
    assert!(purger.log_text().contains("full purge (start) of everything done"), "{}", purger.log_text());
}
