//! Throughput of `TIERCACHE.GET` through redis-rs's cluster client (what the cache's cluster mode sends
//! its commands on) against native `GET` through the same client, side by side on one local 3-master +
//! 3-replica cluster with the module (started here, `client/tests/common/cluster.rs`).
//!
//! Seeded: 10,000 keys of 100 bytes under each command's own prefix (both spread over the three
//! masters the same way), read by 64 concurrent tasks picking keys with a seeded xorshift; the two
//! commands alternate, ROUNDS rounds of REQUESTS each; prints each round and the median ratio.
//!
//! `cargo bench -p tiercache-client --bench cluster [-- --quick]` (`TIERCACHE_MODULE` picks the build;
//! use the release one: `cargo build --release` first).

#[path = "../tests/common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use redis::cluster_async::ClusterConnection;

const KEYS: u64 = 10_000;
const TASKS: u64 = 64;

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Requests per second of `cmd key` over `requests` requests.
async fn run(conn: &ClusterConnection, cmd: &'static str, prefix: &'static str, requests: u64, seed: u64) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let mut conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for _ in 0..requests / TASKS {
                x = xorshift(x);
                let v: Option<Vec<u8>> =
                    redis::cmd(cmd).arg(format!("{prefix}{}", x % KEYS)).query_async(&mut conn).await.expect(cmd);
                assert!(v.is_some_and(|v| v.len() == 100), "{cmd}: missing value");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    requests as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // cargo bench passes --bench; ignore every other argument.
    let (rounds, requests) = if quick { (3, 20_000) } else { (7, 100_000) };
    let cl = cluster::Cluster::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = redis::cluster::ClusterClient::new(cl.urls()).expect("cluster client");
        let mut conn = client.get_async_connection().await.expect("cluster connection");
        let value = vec![b'x'; 100];
        for i in 0..KEYS {
            redis::cmd("TIERCACHE.SET").arg(format!("tc:{i}")).arg(&value).arg("NOCOMPRESS").query_async::<()>(&mut conn).await.expect("seed");
            redis::cmd("SET").arg(format!("nat:{i}")).arg(&value).query_async::<()>(&mut conn).await.expect("seed");
        }
        // Warm-up of both paths.
        run(&conn, "TIERCACHE.GET", "tc:", requests / 4, 1).await;
        run(&conn, "GET", "nat:", requests / 4, 1).await;
        let mut ratios = Vec::new();
        println!("| round | native GET rps | TIERCACHE.GET rps | ratio |");
        println!("|---|---|---|---|");
        for r in 0..rounds {
            let seed = 42 + r as u64;
            let native = run(&conn, "GET", "nat:", requests, seed).await;
            let tc = run(&conn, "TIERCACHE.GET", "tc:", requests, seed).await;
            ratios.push(tc / native);
            println!("| {} | {native:.0} | {tc:.0} | {:.3} |", r + 1, tc / native);
        }
        ratios.sort_by(|a, b| a.total_cmp(b));
        println!(
            "cluster client, {TASKS} tasks, {rounds} x {requests} requests: TIERCACHE.GET / GET median {:.3} (min {:.3}, max {:.3})",
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    });
}
