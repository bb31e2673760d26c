//! Coherence between instances (in one process and across processes), and one load per miss across a
//! fleet of processes.
//!
//! The cross-process tests re-run this test binary as a child (`worker_main`, selected with the
//! `TIERCACHE_CLIENT_TEST_WORKER` environment variable) and talk to it over stdin/stdout: the parent
//! writes one command per line, the child answers with lines starting with `@@`.
//!
//! Run with `--nocapture` to see the measured propagation delays.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use tiercache_client::{Opts, TierCache};

const WORKER_ENV: &str = "TIERCACHE_CLIENT_TEST_WORKER";
const URL_ENV: &str = "TIERCACHE_CLIENT_TEST_URL";

/// The cached item of the coherence tests, its tag, and the "database" row it is loaded from (a plain
/// Redis string outside the cache's namespace, so every process's loader reads the same truth).
const ITEM: &str = "item";
const TAG: &str = "grp";
const DB_KEY: &str = "db:item";
const NS: &str = "coh";

/// Polling period of the reader while it waits for a change.
const POLL: Duration = Duration::from_micros(100);
/// Repetitions per scenario.
const REPS: usize = 50;
/// Longest a reader waits for a change before the iteration counts as failed.
const SEEN_TIMEOUT: Duration = Duration::from_secs(5);

fn unix_nanos() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
}

fn item_opts() -> Opts {
    Opts::default().ttl(Duration::from_secs(60)).tag(TAG)
}

async fn plain_conn(url: &str) -> MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Reads the item through the cache; on a miss the loader reads the "database" row.
async fn read_item(c: &TierCache, db: &MultiplexedConnection) -> String {
    let db = db.clone();
    c.get_or_load(ITEM, &item_opts(), move || async move {
        let mut db = db;
        let v: Option<String> = redis::cmd("GET").arg(DB_KEY).query_async(&mut db).await?;
        Ok::<_, redis::RedisError>(v.unwrap_or_else(|| "none".to_string()))
    })
    .await
    .expect("get_or_load of the item")
}

async fn set_db(db: &MultiplexedConnection, v: &str) {
    let mut db = db.clone();
    redis::cmd("SET").arg(DB_KEY).arg(v).query_async::<()>(&mut db).await.unwrap();
}

/// What B does to the item, and what A must then read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// The row changes, B invalidates the item's tag: A reads the new row (through its loader).
    InvalidateTag,
    /// B writes the new value into the cache: A reads it (from Redis).
    SetKey,
    /// B deletes the item: A's `get` answers None.
    DeleteKey,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::InvalidateTag => "invalidate tag",
            Change::SetKey => "set key",
            Change::DeleteKey => "delete key",
        }
    }
}

/// B's command; returns when B has the reply.
async fn apply_change(b: &TierCache, change: Change, v: &str) {
    match change {
        Change::InvalidateTag => {
            b.invalidate_tags(&[TAG]).await.expect("B: invalidate_tags");
        }
        Change::SetKey => b.set(ITEM, &v.to_string(), &item_opts()).await.expect("B: set"),
        Change::DeleteKey => b.delete(ITEM).await.expect("B: delete"),
    }
}

/// Has A seen the change yet?
async fn a_sees(a: &TierCache, db: &MultiplexedConnection, change: Change, v: &str) -> bool {
    match change {
        Change::DeleteKey => a.get::<String>(ITEM).await.expect("A: get").is_none(),
        _ => read_item(a, db).await == v,
    }
}

/// Makes sure A holds the current value `v` in L1: reads until a read is an L1 hit (l1_hits grows).
/// A few attempts are allowed: a late key-tracking push (the reclaim timer deleting the entry that an
/// earlier tag invalidation killed) may drop a fresh L1 copy once, which is harmless.
async fn prime(a: &TierCache, db: &MultiplexedConnection, v: &str) -> Result<(), String> {
    let got = read_item(a, db).await;
    if got != v {
        return Err(format!("prime: first read {got:?}, expected {v:?}"));
    }
    for _ in 0..20 {
        let before = a.metrics().l1_hits;
        let got = read_item(a, db).await;
        let after = a.metrics().l1_hits;
        if got != v {
            return Err(format!("prime: read {got:?}, expected {v:?}"));
        }
        if after == before + 1 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(format!("prime: 20 reads of {v:?}, none an L1 hit: {:?}", a.metrics()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Prints p50/p99/max and returns p99.
fn report(what: &str, mut delays: Vec<Duration>) -> Duration {
    delays.sort();
    let (p50, p99, max) = (percentile(&delays, 0.50), percentile(&delays, 0.99), *delays.last().unwrap());
    println!(
        "propagation delay [{what}] n={} p50={}us p99={}us max={}us",
        delays.len(),
        p50.as_micros(),
        p99.as_micros(),
        max.as_micros()
    );
    p99
}

const SCENARIOS: [Change; 3] = [Change::InvalidateTag, Change::SetKey, Change::DeleteKey];

// ---------------------------------------------------------------------------------------------------
// 1a. Two instances in one process.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coherence_between_two_instances_in_one_process() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url).namespace(NS).build().await.unwrap();
    let b = TierCache::builder(&url).namespace(NS).build().await.unwrap();
    let db = plain_conn(&url).await;

    let mut version = 0u32;
    set_db(&db, "v0").await;
    let mut all = Vec::new();
    let mut failures = Vec::new();
    for change in SCENARIOS {
        let mut delays = Vec::new();
        for rep in 0..REPS {
            let cur = format!("v{version}");
            prime(&a, &db, &cur).await.unwrap_or_else(|e| panic!("{} rep {rep}: {e}", change.name()));
            version += 1;
            let new = format!("v{version}");
            set_db(&db, &new).await;
            apply_change(&b, change, &new).await;
            let t0 = Instant::now();
            loop {
                if a_sees(&a, &db, change, &new).await {
                    delays.push(t0.elapsed());
                    break;
                }
                if t0.elapsed() > SEEN_TIMEOUT {
                    failures.push(format!("{} rep {rep}: A still serves the old state after {SEEN_TIMEOUT:?}", change.name()));
                    break;
                }
                // A plain thread sleep: tokio's timer cannot sleep 100 µs (1 ms resolution).
                std::thread::sleep(POLL);
            }
        }
        if !delays.is_empty() {
            let p99 = report(&format!("in-process, {}", change.name()), delays.clone());
            if p99 >= Duration::from_millis(200) {
                failures.push(format!("{}: p99 {p99:?} >= 200 ms", change.name()));
            }
            all.extend(delays);
        }
    }
    report("in-process, all", all);
    let m = a.metrics();
    println!("A metrics: {m:?}");
    assert!(failures.is_empty(), "coherence failures:\n{}", failures.join("\n"));
    assert!(m.invalidations_received >= (2 * REPS) as u64, "A applied the pushes/messages: {m:?}");
}

// ---------------------------------------------------------------------------------------------------
// 1b. Two instances in two processes.

#[test]
fn coherence_between_two_processes() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let b = TierCache::builder(&url).namespace(NS).build().await.unwrap();
        let db = plain_conn(&url).await;
        set_db(&db, "v0").await;
        let mut a = Worker::spawn("coherence", &url, &[]);
        a.expect("ready");

        let mut version = 0u32;
        let mut all = Vec::new();
        let mut failures = Vec::new();
        for change in SCENARIOS {
            let mut delays = Vec::new();
            for rep in 0..REPS {
                a.send(&format!("prime v{version}"));
                let r = a.recv();
                assert_eq!(r, "primed", "{} rep {rep}: child A could not prime its L1", change.name());
                version += 1;
                let new = format!("v{version}");
                set_db(&db, &new).await;
                let mode = if change == Change::DeleteKey { "absent" } else { "value" };
                a.send(&format!("watch {mode} {new}"));
                a.expect("watching");
                apply_change(&b, change, &new).await;
                let t_reply = unix_nanos();
                let r = a.recv();
                match r.strip_prefix("seen ") {
                    Some(t) => {
                        let t_seen: i128 = t.parse().unwrap();
                        delays.push(Duration::from_nanos((t_seen - t_reply).max(0) as u64));
                    }
                    None => failures.push(format!("{} rep {rep}: child A answered {r:?}", change.name())),
                }
            }
            if !delays.is_empty() {
                let p99 = report(&format!("two processes, {}", change.name()), delays.clone());
                if p99 >= Duration::from_millis(200) {
                    failures.push(format!("{}: p99 {p99:?} >= 200 ms", change.name()));
                }
                all.extend(delays);
            }
        }
        report("two processes, all", all);
        a.send("metrics");
        println!("child A {}", a.recv());
        a.send("quit");
        a.wait_exit();
        assert!(failures.is_empty(), "coherence failures:\n{}", failures.join("\n"));
    });
}

// ---------------------------------------------------------------------------------------------------
// 2. 4 processes x 50 tasks, one missing key: one load in total.

const PROCS: usize = 4;
const TASKS: usize = 50;
const HOT: &str = "hot";
const COUNTER: &str = "stampede:loads";

#[test]
fn one_load_across_four_processes_of_fifty_tasks() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let mut workers: Vec<Worker> = (0..PROCS).map(|_| Worker::spawn("stampede", &url, &[])).collect();
    for w in &mut workers {
        w.expect("ready");
    }
    for w in &mut workers {
        w.send("go");
    }
    let mut values = Vec::new();
    let mut errors = Vec::new();
    let mut loads_metric = 0u64;
    for w in &mut workers {
        loop {
            let line = w.recv();
            if let Some(v) = line.strip_prefix("ok ") {
                values.push(v.to_string());
            } else if let Some(e) = line.strip_prefix("err ") {
                errors.push(format!("{}: {e}", w.name));
            } else if let Some(m) = line.strip_prefix("metrics ") {
                println!("{}: {m}", w.name);
                let loads = m.split(' ').find_map(|kv| kv.strip_prefix("loads=")).unwrap();
                loads_metric += loads.parse::<u64>().unwrap();
            } else if line == "done" {
                break;
            } else {
                panic!("{}: unexpected line {line:?}", w.name);
            }
        }
        w.wait_exit();
    }
    let mut c = server.conn();
    let loads = c.int(&common_cmd("GET", COUNTER));
    assert_eq!(loads, 1, "loader runs across {PROCS} processes x {TASKS} tasks (INCR in the loader)");
    assert_eq!(loads_metric, 1, "sum of metrics().loads over the processes");
    assert!(errors.is_empty(), "tasks failed: {errors:?}");
    assert_eq!(values.len(), PROCS * TASKS, "every task got an answer");
    let first = values[0].clone();
    assert!(first.starts_with("loaded-by-"), "value {first:?}");
    assert!(values.iter().all(|v| *v == first), "every task got the one loaded value: {values:?}");
}

fn common_cmd(name: &str, arg: &str) -> redis::Cmd {
    let mut c = redis::cmd(name);
    c.arg(arg);
    c
}

// ---------------------------------------------------------------------------------------------------
// Child-process plumbing.

struct Worker {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(mode: &str, url: &str, env: &[(&str, &str)]) -> Worker {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(exe);
        cmd.args(["worker_main", "--exact", "--nocapture", "--test-threads=1"])
            .env(WORKER_ENV, mode)
            .env(URL_ENV, url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the test binary as a worker");
        let name = format!("worker {mode} pid {}", child.id());
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have printed "test worker_main ... " on the same line.
                if let Some(at) = line.find("@@") {
                    if tx.send(line[at + 2..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Worker { name, child, stdin, lines: rx }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next `@@` line (blocking; 60 s at most).
    fn recv(&mut self) -> String {
        // Blocking in a runtime thread: tell tokio, when there is one.
        let rx = &self.lines;
        let get = || rx.recv_timeout(Duration::from_secs(60));
        let r = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(get),
            Err(_) => get(),
        };
        r.unwrap_or_else(|e| panic!("{}: no answer ({e})", self.name))
    }

    fn expect(&mut self, what: &str) {
        let got = self.recv();
        assert_eq!(got, what, "{}", self.name);
    }

    fn wait_exit(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn say(msg: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "@@{}", msg.as_ref()).unwrap();
    out.flush().unwrap();
}

/// Lines of stdin, read by a thread.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Not a test: the entry point of the child processes (does nothing unless started as a worker).
#[test]
fn worker_main() {
    let Ok(mode) = std::env::var(WORKER_ENV) else { return };
    let url = std::env::var(URL_ENV).expect("worker URL");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        match mode.as_str() {
            "coherence" => coherence_worker(&url).await,
            "stampede" => stampede_worker(&url).await,
            other => panic!("unknown worker mode {other}"),
        }
    });
}

/// Instance A of the two-process coherence test.
async fn coherence_worker(url: &str) {
    let a = TierCache::builder(url).namespace(NS).build().await.unwrap();
    let db = plain_conn(url).await;
    let mut lines = stdin_lines();
    say("ready");
    while let Some(line) = lines.recv().await {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["prime", v] => match prime(&a, &db, v).await {
                Ok(()) => say("primed"),
                Err(e) => say(format!("error {e}")),
            },
            ["watch", mode, v] => {
                let change = if *mode == "absent" { Change::DeleteKey } else { Change::SetKey };
                say("watching");
                let t0 = Instant::now();
                loop {
                    if a_sees(&a, &db, change, v).await {
                        say(format!("seen {}", unix_nanos()));
                        break;
                    }
                    if t0.elapsed() > SEEN_TIMEOUT {
                        say(format!("timeout: still the old state after {SEEN_TIMEOUT:?}"));
                        break;
                    }
                    std::thread::sleep(POLL);
                }
            }
            ["metrics"] => say(format!("metrics {:?}", a.metrics())),
            ["quit"] => break,
            other => panic!("coherence worker: unknown command {other:?}"),
        }
    }
}

/// One process of the stampede test: waits for "go", then 50 tasks read the missing key at once.
async fn stampede_worker(url: &str) {
    let c = TierCache::builder(url).namespace("stampede").build().await.unwrap();
    let conn = plain_conn(url).await;
    let mut lines = stdin_lines();
    say("ready");
    assert_eq!(lines.recv().await.as_deref(), Some("go"));
    let runs = Arc::new(AtomicU32::new(0));
    let pid = std::process::id();
    let handles: Vec<_> = (0..TASKS)
        .map(|_| {
            let c = c.clone();
            let conn = conn.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                let opts = Opts::default().ttl(Duration::from_secs(60));
                c.get_or_load(HOT, &opts, move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let mut conn = conn;
                    redis::cmd("INCR").arg(COUNTER).query_async::<i64>(&mut conn).await?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, redis::RedisError>(format!("loaded-by-{pid}"))
                })
                .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.expect("task panicked"));
    }
    for r in results {
        match r {
            Ok(v) => say(format!("ok {v}")),
            Err(e) => say(format!("err {e}")),
        }
    }
    let m = c.metrics();
    say(format!(
        "metrics loads={} runs={} coalesced_local={} l2_hits={} l2_misses={} l1_hits={}",
        m.loads,
        runs.load(Ordering::SeqCst),
        m.coalesced_local,
        m.l2_hits,
        m.l2_misses,
        m.l1_hits
    ));
    say("done");
}
