//! Small measuring tools for the scripts in `scripts/`:
//!
//! - `probe PORT MILLIS [STOPFILE]`: sends PING on one connection back to back for MILLIS ms (or until
//!   STOPFILE exists) and prints the number of round trips, the median, p99.9 and the longest one in
//!   microseconds — the longest stall another client saw while something else ran on the server.
//! - `time PORT REPEAT CMD [ARG...]`: runs a command REPEAT times and prints the median and max latency in
//!   microseconds.
//! - `fill PORT N PREFIX TAG [TAG...]`: writes N entries `PREFIX<i>` with a 100-byte value and the given tags,
//!   pipelined 1000 at a time (use `-` as the only tag for untagged entries; `@set` writes native SET plus
//!   SADD into a set named by the second argument, the peers' tag index). A tag `NAME{K%M}` is written as
//!   NAME followed by (i + K) mod M for entry i: `t{0%1024} t{1%1024}` puts entry i under two neighbouring
//!   tags of 1024.
//! - `wait-reclaim PORT`: waits until TIERCACHE.STATS shows reclaim_pending 0 and prints how long it took.
//! - `stampede PORT MODE N KEY LOAD_MS`: N threads miss KEY at the same moment; each must end with the
//!   value, loading it from a simulated database (LOAD_MS of work, counted in Redis with INCR on
//!   `db:loads:KEY`) only when its protocol says so. MODE: `none` (everyone loads), `lock` (SET NX PX
//!   lock + polling every 10 ms, the peers' way), `lease` (TIERCACHE.GET LEASE + WAIT). Prints the round
//!   trips per caller (mean and max). Run it from several processes at once against one key.

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

/// The simulated database: LOAD_MS of latency, and one INCR so loads can be counted across processes.
fn load(c: &mut redis::Connection, key: &str, load_ms: u64) -> Vec<u8> {
    std::thread::sleep(Duration::from_millis(load_ms));
    let _: i64 = redis::cmd("INCR").arg(format!("db:loads:{key}")).query(c).expect("incr");
    b"value from the database".to_vec()
}

/// One caller of the stampede test; returns its round trips (the database load is not counted).
fn stampede_one(c: &mut redis::Connection, mode: &str, key: &str, load_ms: u64) -> u64 {
    let mut trips = 0;
    match mode {
        "none" => {
            trips += 1;
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query(c).expect("get");
            if v.is_none() {
                let v = load(c, key, load_ms);
                trips += 1;
                let _: () = redis::cmd("SET").arg(key).arg(v).arg("EX").arg(60).query(c).expect("set");
            }
        }
        "lock" => loop {
            trips += 1;
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query(c).expect("get");
            if v.is_some() {
                break;
            }
            trips += 1;
            let got: Option<String> =
                redis::cmd("SET").arg(format!("lock:{key}")).arg("1").arg("NX").arg("PX").arg(5000).query(c).expect("lock");
            if got.is_some() {
                let v = load(c, key, load_ms);
                trips += 2;
                let _: () = redis::cmd("SET").arg(key).arg(v).arg("EX").arg(60).query(c).expect("set");
                let _: i64 = redis::cmd("DEL").arg(format!("lock:{key}")).query(c).expect("unlock");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        },
        _ => loop {
            trips += 1;
            let r: Vec<redis::Value> =
                redis::cmd("TIERCACHE.GET").arg(key).arg("LEASE").arg(5000).arg("WAIT").arg(5000).query(c).expect("lease get");
            let status = match r.first() {
                Some(redis::Value::BulkString(s)) => s.clone(),
                _ => Vec::new(),
            };
            match &status[..] {
                b"HIT" | b"STALE" | b"PASS" => break,
                b"FILL" => {
                    let token = match r.get(2) {
                        Some(redis::Value::BulkString(t)) => t.clone(),
                        _ => Vec::new(),
                    };
                    let v = load(c, key, load_ms);
                    trips += 1;
                    let _: () = redis::cmd("TIERCACHE.SET")
                        .arg(key)
                        .arg(v)
                        .arg("EX")
                        .arg(60)
                        .arg("LEASE")
                        .arg(token)
                        .query(c)
                        .expect("fill");
                    break;
                }
                _ => {} // BUSY at the WAIT deadline: ask again
            }
        },
    }
    trips
}

/// The tag `t` of entry `i`: `NAME{K%M}` becomes NAME followed by (i + K) mod M; anything else is as is.
fn tag_of(t: &str, i: usize) -> String {
    let Some(open) = t.find('{').filter(|_| t.ends_with('}')) else { return t.to_string() };
    let spec = &t[open + 1..t.len() - 1];
    let Some((k, m)) = spec.split_once('%') else { return t.to_string() };
    let (k, m): (usize, usize) = (k.parse().expect("tag offset"), m.parse().expect("tag modulus"));
    format!("{}{}", &t[..open], (i + k) % m.max(1))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("probe") => {
            let mut c = conn(&args[2]);
            let until = Instant::now() + Duration::from_millis(args[3].parse().expect("millis"));
            let stop = args.get(4).map(std::path::PathBuf::from);
            let mut lat = Vec::new();
            let mut n = 0u32;
            while Instant::now() < until {
                n = n.wrapping_add(1);
                if n.is_multiple_of(256) && stop.as_ref().is_some_and(|f| f.exists()) {
                    break;
                }
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
            let value = [b'v'; 100];
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
                            let tags: Vec<String> = tags.iter().map(|t| tag_of(t, j)).collect();
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
        Some("stampede") => {
            let port = args[2].clone();
            let mode = args[3].clone();
            let n: usize = args[4].parse().expect("n");
            let key = args[5].clone();
            let load_ms: u64 = args[6].parse().expect("load ms");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let (port, mode, key, barrier) = (port.clone(), mode.clone(), key.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let mut c = conn(&port);
                        barrier.wait();
                        stampede_one(&mut c, &mode, &key, load_ms)
                    })
                })
                .collect();
            let trips: Vec<u64> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
            let mean = trips.iter().sum::<u64>() as f64 / trips.len().max(1) as f64;
            println!(
                "callers={} round_trips_mean={:.2} round_trips_max={}",
                trips.len(),
                mean,
                trips.iter().max().copied().unwrap_or(0)
            );
        }
        _ => {
            eprintln!("usage: tiercache-bench probe PORT MILLIS [STOPFILE] | time PORT REPEAT CMD [ARG...] | fill PORT N PREFIX TAG... | wait-reclaim PORT | stampede PORT none|lock|lease N KEY LOAD_MS");
            std::process::exit(2);
        }
    }
}
