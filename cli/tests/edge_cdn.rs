//! `tiercache purge --backend fastly|cloudflare` against local servers that check the request shape
//! of the public purge APIs, with a real module-enabled redis-server publishing the messages:
//!
//! - Fastly: `POST /service/{id}/purge`, keys in a `Surrogate-Key` header, token in `Fastly-Key`
//!   (`POST /service/{id}/purge_all` without a namespace key);
//! - Cloudflare: `POST /client/v4/zones/{zone}/purge_cache`, `{"tags": [...]}` (at most 100), token in
//!   `Authorization: Bearer` (`{"purge_everything": true}` without a namespace key).
//!
//! Both servers fail the first request, so the purger must retry it.

#[path = "../../tests/common/mod.rs"]
mod common;
mod harness;

use std::time::Duration;

use harness::{wait_subscribers, Proc, Recorder, Seen, TempDir};

async fn wait_requests(rec: &Recorder, n: usize, purger: &mut harness::Proc) -> Vec<Seen> {
    let ok = harness::wait_until(Duration::from_secs(20), || async { rec.requests().len() >= n }).await;
    purger.assert_running();
    assert!(ok, "expected {n} requests, got {:#?}\npurger log:\n{}", rec.requests(), purger.log_text());
    rec.requests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastly_purge_by_surrogate_key() {
    let dir = TempDir::new("edge-fastly");
    let server = common::Server::start();
    let mut conn = server.conn();
    let rec =
        Recorder::start(
            |_, n| {
                if n == 0 {
                    (503, "try later".into())
                } else {
                    (200, r#"{"user:1":"108-1391560174-974124"}"#.into())
                }
            },
        )
        .await;
    let redis_url = format!("redis://127.0.0.1:{}/", server.port);
    let api = rec.url();
    let mut purger = fastly_purger(
        &dir,
        "purge-fastly",
        &redis_url,
        &api,
        "SU1Z0isxPaozGVKXdv0eY",
        "tok-fastly",
        &["--no-full-purge-on-start", "--namespace-key", "ns:site:v1", "--backoff-min-ms", "50"],
    );
    wait_subscribers(&mut conn, 1, &mut purger).await;

    conn.run(&cmd!("TIERCACHE.INVALIDATE", "user:1", "team 7"));
    let reqs = wait_requests(&rec, 2, &mut purger).await;
    for r in &reqs[..2] {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/service/SU1Z0isxPaozGVKXdv0eY/purge");
        assert_eq!(r.header("fastly-key"), Some("tok-fastly"));
        assert_eq!(r.header("surrogate-key"), Some("user:1 team%207"), "{r:?}");
        assert_eq!(r.header("fastly-soft-purge"), None);
    }

    // A reset message purges the namespace key.
    conn.ok(&cmd!("FLUSHALL"));
    let reqs = wait_requests(&rec, 3, &mut purger).await;
    assert_eq!(reqs[2].path, "/service/SU1Z0isxPaozGVKXdv0eY/purge");
    assert_eq!(reqs[2].header("surrogate-key"), Some("ns:site:v1"));
    assert!(purger.log_text().contains("retrying"), "{}", purger.log_text());

    // A restarted server: messages may have been missed while the purger was away, so resubscribing
    // purges the namespace key.
    let mut server = server;
    server.restart();
    let reqs = wait_requests(&rec, 4, &mut purger).await;
    assert_eq!(reqs[3].header("surrogate-key"), Some("ns:site:v1"));
    let log = purger.log_text();
    assert!(log.contains("full purge (resubscribed)"), "{log}");
    drop(purger);
    let mut conn = server.conn();

    // Without a namespace key, a full purge is purge_all (soft purges announced by header); a purger
    // starts with a full purge unless told not to.
    let mut purger = fastly_purger(&dir, "purge-fastly-all", &redis_url, &api, "svc", "tok2", &["--fastly-soft"]);
    let reqs = wait_requests(&rec, 5, &mut purger).await;
    assert_eq!(reqs[4].path, "/service/svc/purge_all");
    assert_eq!(reqs[4].header("fastly-key"), Some("tok2"));
    wait_subscribers(&mut conn, 1, &mut purger).await;
    conn.run(&cmd!("TIERCACHE.INVALIDATE", "a"));
    let reqs = wait_requests(&rec, 6, &mut purger).await;
    assert_eq!(reqs[5].path, "/service/svc/purge");
    assert_eq!(reqs[5].header("surrogate-key"), Some("a"));
    assert_eq!(reqs[5].header("fastly-soft-purge"), Some("1"));
    assert_eq!(reqs.len(), 6, "{reqs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_purge_by_cache_tag() {
    let dir = TempDir::new("edge-cloudflare");
    let server = common::Server::start();
    let mut conn = server.conn();
    let rec = Recorder::start(|_, n| {
        if n == 0 {
            // HTTP 200 with success false is a failure too.
            (
                200,
                r#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}],"messages":[],"result":null}"#
                    .into(),
            )
        } else {
            (200, r#"{"success":true,"errors":[],"messages":[],"result":{"id":"023e105f4ecef8ad9ca31a8372d0c353"}}"#.into())
        }
    })
    .await;
    let redis_url = format!("redis://127.0.0.1:{}/", server.port);
    let api = format!("{}/client/v4", rec.url());
    let mut purger = harness::tiercache(
        &dir,
        "purge-cloudflare",
        &[
            "purge",
            "--no-full-purge-on-start",
            "--redis",
            &redis_url,
            "--backend",
            "cloudflare",
            "--cloudflare-api",
            &api,
            "--cloudflare-zone-id",
            "023e105f4ecef8ad9ca31a8372d0c353",
            "--cloudflare-token",
            "cf-tok",
            "--backoff-min-ms",
            "50",
            "--rate",
            "50",
        ],
    );
    wait_subscribers(&mut conn, 1, &mut purger).await;

    // 150 tags in one message: more than the 100 Cloudflare takes per request.
    let tags: Vec<String> = (0..150).map(|i| format!("product:{i}")).collect();
    let mut c = redis::cmd("TIERCACHE.INVALIDATE");
    for t in &tags {
        c.arg(t);
    }
    conn.run(&c);
    // The failed first request, its retry, then the other 50.
    let reqs = wait_requests(&rec, 3, &mut purger).await;
    let mut purged = Vec::new();
    for (i, r) in reqs[..3].iter().enumerate() {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/client/v4/zones/023e105f4ecef8ad9ca31a8372d0c353/purge_cache");
        assert_eq!(r.header("authorization"), Some("Bearer cf-tok"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON body");
        let obj = body.as_object().expect("object");
        assert_eq!(obj.len(), 1, "{body}");
        let batch: Vec<String> = obj["tags"].as_array().expect("tags").iter().map(|t| t.as_str().unwrap().to_string()).collect();
        assert!(batch.len() <= 100);
        if i > 0 {
            purged.extend(batch);
        }
    }
    assert_eq!(purged, tags);

    // No namespace key: a reset message is purge_everything.
    conn.ok(&cmd!("FLUSHALL"));
    let reqs = wait_requests(&rec, 4, &mut purger).await;
    let body: serde_json::Value = serde_json::from_slice(&reqs[3].body).unwrap();
    assert_eq!(body, serde_json::json!({"purge_everything": true}));
}

/// A server that stops answering without closing the connection is noticed by PING, and the
/// resubscription purges the namespace (messages may have been lost meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_is_noticed() {
    let dir = TempDir::new("edge-frozen");
    let server = common::Server::start();
    let mut conn = server.conn();
    let rec = Recorder::start(|_, _| (200, "{}".into())).await;
    let redis_url = format!("redis://127.0.0.1:{}/", server.port);
    let api = rec.url();
    let mut purger = fastly_purger(
        &dir,
        "purge-frozen",
        &redis_url,
        &api,
        "svc",
        "tok",
        &["--no-full-purge-on-start", "--namespace-key", "ns:site:v1", "--ping-interval-ms", "100", "--ping-timeout-ms", "300"],
    );
    wait_subscribers(&mut conn, 1, &mut purger).await;
    // Freeze the server for 2 s (well over the 300 ms PING timeout) on a connection of its own.
    let port = server.port;
    tokio::task::spawn_blocking(move || {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let mut c = client.get_connection().unwrap();
        redis::cmd("DEBUG").arg("SLEEP").arg(2).query::<redis::Value>(&mut c).unwrap();
    })
    .await
    .unwrap();
    let reqs = wait_requests(&rec, 1, &mut purger).await;
    assert_eq!(reqs[0].path, "/service/svc/purge");
    assert_eq!(reqs[0].header("surrogate-key"), Some("ns:site:v1"));
    let log = purger.log_text();
    assert!(log.contains("no PING reply within"), "{log}");
    assert!(log.contains("full purge (resubscribed)"), "{log}");
    // And it follows the channel again.
    wait_subscribers(&mut conn, 1, &mut purger).await;
    conn.run(&cmd!("TIERCACHE.INVALIDATE", "after"));
    let reqs = wait_requests(&rec, 2, &mut purger).await;
    assert_eq!(reqs[1].header("surrogate-key"), Some("after"));
}

/// `--db 1` purges invalidations of database 1 only (messages are handled in order, so the one of
/// database 0, published first, would be in the first request if it were not filtered out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_filter() {
    let dir = TempDir::new("edge-db");
    let server = common::Server::start();
    let mut conn = server.conn();
    let rec = Recorder::start(|_, _| (200, "{}".into())).await;
    let redis_url = format!("redis://127.0.0.1:{}/", server.port);
    let api = rec.url();
    let mut purger = fastly_purger(&dir, "purge-db", &redis_url, &api, "svc", "tok", &["--no-full-purge-on-start", "--db", "1"]);
    wait_subscribers(&mut conn, 1, &mut purger).await;
    conn.run(&cmd!("TIERCACHE.INVALIDATE", "in-db0"));
    conn.select(1);
    conn.run(&cmd!("TIERCACHE.INVALIDATE", "in-db1"));
    let reqs = wait_requests(&rec, 1, &mut purger).await;
    assert_eq!(reqs[0].header("surrogate-key"), Some("in-db1"));
    conn.select(0);
    conn.run(&cmd!("TIERCACHE.INVALIDATE", "in-db0-again"));
    conn.select(1);
    conn.run(&cmd!("TIERCACHE.INVALIDATE", "in-db1-again"));
    let reqs = wait_requests(&rec, 2, &mut purger).await;
    assert_eq!(reqs[1].header("surrogate-key"), Some("in-db1-again"));
}

/// `tiercache purge --backend fastly` against the recording API at `api`, with `extra` arguments.
fn fastly_purger(dir: &TempDir, name: &str, redis_url: &str, api: &str, service: &str, token: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["purge", "--redis", redis_url, "--backend", "fastly", "--fastly-api", api];
    args.extend(["--fastly-service-id", service, "--fastly-token", token]);
    args.extend_from_slice(extra);
    harness::tiercache(dir, name, &args)
}
