//! Small measuring tools for the scripts in `scripts/`:
//!
//! - `probe PORT MILLIS`: sends PING on one connection back to back for MILLIS ms and prints the number of
//!   round trips, the median, p99.9 and the longest one in microseconds — the longest stall another client
//!   saw while something else ran on the server.
//! - `time PORT REPEAT CMD [ARG...]`: runs a command REPEAT times and prints the median and max latency in
//!   microseconds.
//! - `fill PORT N PREFIX TAG [TAG...]`: writes N entries `PREFIX<i>` with a 100-byte value and the given tags,
//!   pipelined 1000 at a time (use `-` as the only tag for untagged entries; `@set` writes native SET plus
//!   SADD into a set named by the second argument, the peers' tag index).
//! - `wait-reclaim PORT`: waits until TIERCACHE.STATS shows reclaim_pending 0 and prints how long it took.

use std::time::{Duration, Instant};

fn conn(port: &str) -> redis::Connection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("client");
    client.get_connection().expect("connect")
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("probe") => {
            let mut c = conn(&args[2]);
            let until = Instant::now() + Duration::from_millis(args[3].parse().expect("millis"));
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let _: String = redis::cmd("PING").query(&mut c).expect("ping");
                lat.push(t.elapsed().as_micros());
            }
            lat.sort_unstable();
            println!(
                "round_trips={} p50_us={} p999_us={} max_us={} over_1ms={} over_2ms={}",
                lat.len(),
                percentile(&lat, 0.5),
                percentile(&lat, 0.999),
                lat.last().copied().unwrap_or(0),
                lat.iter().filter(|&&l| l > 1000).count(),
                lat.iter().filter(|&&l| l > 2000).count()
            );
        }
        Some("time") => {
            let mut c = conn(&args[2]);
            let repeat: usize = args[3].parse().expect("repeat");
            let mut lat = Vec::new();
            for _ in 0..repeat {
                let mut cmd = redis::cmd(&args[4]);
                for a in &args[5..] {
                    cmd.arg(a);
                }
                let t = Instant::now();
                let _: redis::Value = cmd.query(&mut c).expect("command");
                lat.push(t.elapsed().as_micros());
            }
            lat.sort_unstable();
            println!("median_us={} max_us={}", percentile(&lat, 0.5), lat.last().copied().unwrap_or(0));
        }
        Some("fill") => {
            let mut c = conn(&args[2]);
            let n: usize = args[3].parse().expect("n");
            let prefix = &args[4];
            let tags = &args[5..];
            let value = vec![b'v'; 100];
            let mut i = 0;
            while i < n {
                let mut p = redis::pipe();
                for j in i..(i + 1000).min(n) {
                    let key = format!("{prefix}{j}");
                    if tags.first().map(String::as_str) == Some("@set") {
                        p.cmd("SET").arg(&key).arg(&value[..]).ignore();
                        p.cmd("SADD").arg(&tags[1]).arg(&key).ignore();
                    } else {
                        let mut cmd = redis::cmd("TIERCACHE.SET");
                        cmd.arg(&key).arg(&value[..]);
                        if tags.first().map(String::as_str) != Some("-") {
                            cmd.arg("TAGS").arg(tags.len()).arg(tags);
                        }
                        p.add_command(cmd).ignore();
                    }
                }
                p.query::<()>(&mut c).expect("fill");
                i += 1000;
            }
        }
        Some("wait-reclaim") => {
            // Polls over one connection (spawning redis-cli would disturb a probe on the same core).
            let mut c = conn(&args[2]);
            let t = Instant::now();
            loop {
                let stats: Vec<redis::Value> = redis::cmd("TIERCACHE.STATS").query(&mut c).expect("stats");
                let pending = stats
                    .chunks(2)
                    .find(|kv| matches!(&kv[0], redis::Value::BulkString(k) if k == b"reclaim_pending"))
                    .and_then(|kv| if let redis::Value::Int(n) = kv[1] { Some(n) } else { None });
                if pending == Some(0) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!("reclaim_ms={}", t.elapsed().as_millis());
        }
        _ => {
            eprintln!("usage: tiercache-bench probe PORT MILLIS | time PORT REPEAT CMD [ARG...] | fill PORT N PREFIX TAG...");
            std::process::exit(2);
        }
    }
}
