//! Stampede protection with fill leases (spec: /work/spec/LEASES.md) against real servers:
//! `TIERCACHE.GET key [ENCODED] LEASE ms [WAIT ms] [BETA b]`, `TIERCACHE.SET ... LEASE token`,
//! `TIERCACHE.RELEASE key token [PASS]`: one FILL for a stampede from several processes, hand-off on
//! holder disconnect / lease expiry / RELEASE, PASS, fencing, stale-while-revalidate, XFetch, MULTI and
//! Lua (never blocking), replicas, WAIT deadlines, ENCODED, no leak after thousands of cycles, errors.
//!
//! A lease ends when its holder's connection closes, so holders keep their connection open for as long as
//! they hold it. Parked readers each have their own connection: a `Raw` socket, written to without waiting
//! for the reply (the reply is read later, with a bound), which can also be closed while parked.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use common::*;

proto_tests!(
    errors,
    reply_shapes,
    encoded_with_lease,
    wake_in_the_deadline_iteration_still_replies,
    lease_and_wait_caps,
    client_unblock_of_a_parked_read
);

const NOT_HELD: &str = "FENCED the lease is not held by this token (expired, released or re-granted)";
const KEY_CHANGED: &str = "FENCED the key was written or deleted after the lease was granted";
const TAG_INVALIDATED: &str = "FENCED a tag of this entry was invalidated after the lease was granted";
const REPLICA_REFUSED: &str = "ERR leases are granted by the master: send TIERCACHE.GET ... LEASE to the master";
const E_LEASE: &str = "ERR LEASE must be a positive number of milliseconds";
const E_WAIT: &str = "ERR WAIT must be a positive number of milliseconds";
const E_BETA: &str = "ERR BETA must be a positive number";
const E_SYNTAX: &str = "ERR syntax error";
const E_NOT_INT: &str = "ERR value is not an integer or out of range";
const E_TOKEN: &str = "ERR invalid lease token";
const E_RELEASE_ARITY: &str = "ERR wrong number of arguments for 'tiercache.release' command";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// =============================================================================================
// Lease replies

/// A parsed `[status, value, token(, encoding)]` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lr {
    status: String,
    value: Option<Vec<u8>>,
    token: Option<String>,
    /// The 4th element (only with ENCODED).
    encoding: Option<Option<String>>,
}

fn bulk_or_nil(v: &Value, what: &str, whole: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::Nil => None,
        other => panic!("lease reply {what} must be a bulk string or nil, got {other:?} in {whole:?}"),
    }
}

/// Parses a lease reply strictly: an array (RESP2 and RESP3) of 3 elements (4 with ENCODED), bulk
/// strings or nil, status one of the five, token a positive decimal u64.
#[track_caller]
fn parse_lr(v: &Value, encoded: bool) -> Lr {
    let items = match v {
        Value::Array(items) => items,
        other => panic!("a lease reply must be an array, got {other:?}"),
    };
    assert_eq!(items.len(), if encoded { 4 } else { 3 }, "lease reply length (encoded={encoded}): {v:?}");
    let status = match &items[0] {
        Value::BulkString(b) => String::from_utf8(b.clone()).expect("utf8 status"),
        other => panic!("lease reply status must be a bulk string, got {other:?} in {v:?}"),
    };
    assert!(["HIT", "STALE", "FILL", "BUSY", "PASS"].contains(&status.as_str()), "unknown status in {v:?}");
    let value = bulk_or_nil(&items[1], "value", v);
    let token = bulk_or_nil(&items[2], "token", v).map(|b| {
        let t = String::from_utf8(b).expect("utf8 token");
        assert!(
            !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) && t.parse::<u64>().is_ok_and(|n| n > 0),
            "token must be a positive decimal u64, got {t:?} in {v:?}"
        );
        t
    });
    let encoding = encoded.then(|| bulk_or_nil(&items[3], "encoding", v).map(|b| String::from_utf8(b).unwrap()));
    Lr { status, value, token, encoding }
}

impl Lr {
    /// Asserts status, value and whether there is a token; returns the token (if any).
    #[track_caller]
    fn expect(&self, status: &str, value: Option<&str>, token: bool) -> Option<String> {
        assert_eq!(self.status, status, "status of {self:?}");
        assert_eq!(self.value.as_deref(), value.map(str::as_bytes), "value of {self:?}");
        assert_eq!(self.token.is_some(), token, "token present? {self:?}");
        self.token.clone()
    }

    /// `[FILL, nil, token]`: returns the token.
    #[track_caller]
    fn fill(&self) -> String {
        self.expect("FILL", None, true).unwrap()
    }

    #[track_caller]
    fn hit(&self, value: &str) {
        self.expect("HIT", Some(value), false);
    }

    #[track_caller]
    fn busy(&self) {
        self.expect("BUSY", None, false);
    }

    #[track_caller]
    fn pass(&self) {
        self.expect("PASS", None, false);
    }
}

/// `TIERCACHE.GET key LEASE ms [WAIT w]`.
fn lget(key: &str, lease_ms: u64, wait_ms: Option<u64>) -> redis::Cmd {
    let mut c = cmd!("TIERCACHE.GET", key, "LEASE", lease_ms);
    if let Some(w) = wait_ms {
        c.arg("WAIT").arg(w);
    }
    c
}

/// `TIERCACHE.SET key value [opts...] LEASE token`.
fn lset(key: &str, value: &str, token: &str, opts: &[&str]) -> redis::Cmd {
    let mut c = cmd!("TIERCACHE.SET", key, value);
    for o in opts {
        c.arg(*o);
    }
    c.arg("LEASE").arg(token);
    c
}

#[track_caller]
fn lease_get(c: &mut Conn, cm: &redis::Cmd) -> Lr {
    let v = c.run(cm);
    parse_lr(&v, false)
}

/// Takes the lease on a key without a usable value; returns the token.
#[track_caller]
fn take_lease(c: &mut Conn, key: &str, lease_ms: u64) -> String {
    lease_get(c, &lget(key, lease_ms, None)).fill()
}

fn blocked_clients(c: &mut Conn) -> i64 {
    let info = c.info("clients");
    info_field(&info, "blocked_clients").expect("blocked_clients in INFO clients").trim().parse().unwrap()
}

/// Polls STATS until `field` == `want` (bounded), panics with the last STATS otherwise.
#[track_caller]
fn wait_stat(c: &mut Conn, field: &str, want: i64, timeout: Duration) {
    let mut last = None;
    let ok = wait_until(timeout, || {
        let st = c.stats();
        let v = st.get(field);
        last = Some(st);
        v == want
    });
    assert!(ok, "STATS {field} did not reach {want} within {timeout:?}: {:?}", last);
}

/// Asserts nothing is held or parked, and Redis has no blocked client.
#[track_caller]
fn assert_settled(c: &mut Conn) {
    let st = c.stats();
    assert_eq!(st.get("leases"), 0, "leases gauge: {st:?}");
    assert_eq!(st.get("lease_waiters"), 0, "lease_waiters gauge: {st:?}");
    assert_eq!(st.get("lease_timers"), 0, "lease_timers gauge (a timer outlived its lease or parked read): {st:?}");
    assert_eq!(blocked_clients(c), 0, "INFO blocked_clients");
}

// =============================================================================================
// A raw connection for parked readers

/// One client connection as a plain socket: `send` a command without waiting, read the reply later
/// (`has_reply` / `recv` with a bound). Dropping it closes the connection at once.
struct Raw {
    s: TcpStream,
    parser: redis::Parser,
}

impl Raw {
    fn open(srv: &Server, p: Proto) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap_or_else(|e| panic!("connect :{}: {e}", srv.port));
        s.set_nodelay(true).unwrap();
        s.set_write_timeout(Some(secs(10))).unwrap();
        let mut r = Raw { s, parser: redis::Parser::new() };
        if p == Proto::Resp3 {
            let v = r.call(&cmd!("HELLO", 3));
            assert!(matches!(v, Value::Map(_)), "HELLO 3: {v:?}");
        }
        r
    }

    fn send(&mut self, c: &redis::Cmd) {
        self.s.write_all(&c.get_packed_command()).unwrap_or_else(|e| panic!("write {:?}: {e}", cmd_text(c)));
    }

    /// True when reply bytes (or EOF) arrive within `within`.
    fn has_reply(&mut self, within: Duration) -> bool {
        self.s.set_read_timeout(Some(within.max(ms(1)))).unwrap();
        let mut b = [0u8; 1];
        match self.s.peek(&mut b) {
            Ok(_) => true,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
            Err(e) => panic!("peek: {e}"),
        }
    }

    /// The next reply; panics when none arrives within `within`.
    #[track_caller]
    fn recv(&mut self, within: Duration) -> Value {
        assert!(self.has_reply(within), "no reply within {within:?}");
        self.s.set_read_timeout(Some(secs(10))).unwrap();
        self.parser.parse_value(&self.s).unwrap_or_else(|e| panic!("reading a reply: {e}"))
    }

    #[track_caller]
    fn call(&mut self, c: &redis::Cmd) -> Value {
        self.send(c);
        self.recv(secs(10))
    }

    #[track_caller]
    fn lease(&mut self, within: Duration, encoded: bool) -> Lr {
        let v = self.recv(within);
        parse_lr(&v, encoded)
    }
}

/// Waits (bounded) until one of `conns` has a reply; returns its index.
#[track_caller]
fn first_ready(conns: &mut [Raw], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        for (i, c) in conns.iter_mut().enumerate() {
            if c.has_reply(ms(1)) {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "none of {} connections got a reply within {timeout:?}", conns.len());
    }
}

/// Opens a connection, sends a parking `GET ... LEASE WAIT` on it, and waits until the lease has
/// `parked_after` waiters (so the parking order is known).
#[track_caller]
fn park(s: &Server, c: &mut Conn, cm: &redis::Cmd, parked_after: i64) -> Raw {
    let mut w = Raw::open(s, Proto::Resp2);
    w.send(cm);
    wait_stat(c, "lease_waiters", parked_after, secs(5));
    w
}

// =============================================================================================
// 1. One FILL for 200 concurrent callers from 4 processes

const WORKER_ENV: &str = "TIERCACHE_LEASE_WORKER";
const WORKER_TEST: &str = "stampede_worker_process";
const STAMPEDE_VALUE: &str = "v-stampede";

/// Worker mode of this test binary (no-op unless `TIERCACHE_LEASE_WORKER="port count key"` is set):
/// opens `count` connections in threads, prints `LW READY`, waits for `GO` on stdin, then every thread
/// sends one `TIERCACHE.GET key LEASE 5000 WAIT 5000` at the same instant; the one that gets FILL sleeps
/// 200 ms and SETs with LEASE. Prints `LW RESULT status value token` per call, `LW SET reply`, `LW DONE`.
#[test]
fn stampede_worker_process() {
    let Ok(spec) = std::env::var(WORKER_ENV) else { return };
    let parts: Vec<String> = spec.split_whitespace().map(str::to_string).collect();
    let port: u16 = parts[0].parse().unwrap();
    let n: usize = parts[1].parse().unwrap();
    let key = parts[2].clone();
    let connected = Arc::new(Barrier::new(n + 1));
    let go = Arc::new(Barrier::new(n + 1));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (connected, go, key) = (connected.clone(), go.clone(), key.clone());
            thread::spawn(move || {
                use redis::ConnectionLike;
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                let mut con = client.get_connection_with_timeout(secs(10)).unwrap();
                con.set_read_timeout(Some(secs(20))).unwrap();
                connected.wait();
                go.wait();
                let reply = con.req_command(&lget(&key, 5000, Some(5000))).unwrap();
                let mut set_reply = None;
                if let Value::Array(items) = &reply {
                    if items.first() == Some(&Value::BulkString(b"FILL".to_vec())) {
                        if let Some(Value::BulkString(tok)) = items.get(2) {
                            sleep(ms(200));
                            let tok = String::from_utf8(tok.clone()).unwrap();
                            set_reply = Some(con.req_command(&lset(&key, STAMPEDE_VALUE, &tok, &[])).unwrap());
                        }
                    }
                }
                (reply, set_reply)
            })
        })
        .collect();
    connected.wait();
    println!("LW READY");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "GO");
    go.wait();
    let show = |v: &Option<Vec<u8>>| v.as_ref().map_or("-".to_string(), |b| String::from_utf8_lossy(b).into_owned());
    for h in handles {
        let (reply, set_reply) = h.join().expect("worker thread");
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse_lr(&reply, false))) {
            Ok(lr) => {
                let tok = lr.token.clone().unwrap_or_else(|| "-".into());
                println!("LW RESULT {} {} {}", lr.status, show(&lr.value), tok);
            }
            Err(_) => println!("LW BAD {reply:?}"),
        }
        if let Some(sr) = set_reply {
            let text = match sr {
                Value::ServerError(e) => error_text(&e),
                v if is_ok(&v) => "OK".to_string(),
                v => format!("{v:?}"),
            };
            println!("LW SET {text}");
        }
    }
    println!("LW DONE");
    std::io::stdout().flush().unwrap();
}

/// Kills a worker process left running (on a failure path).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stampede_one_fill_from_four_processes() {
    const PROCS: usize = 4;
    const PER: usize = 50;
    let s = Server::start();
    let mut c = s.conn();
    let exe = std::env::current_exe().unwrap();
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    let mut stderrs = Vec::new();
    for id in 0..PROCS {
        let mut child = Command::new(&exe)
            .args(["--exact", WORKER_TEST, "--nocapture", "--test-threads", "1"])
            .env(WORKER_ENV, format!("{} {} stampede", s.port, PER))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a worker process");
        let out = child.stdout.take().unwrap();
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(l) = line else { break };
                // libtest prints "test NAME ... " without a newline before the test's own output.
                let l = match l.find("LW ") {
                    Some(at) => l[at..].to_string(),
                    None => l,
                };
                if tx.send((id, l)).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        stderrs.push(thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        }));
        children.push(ChildGuard(child));
    }
    drop(tx);
    let mut lines: Vec<(usize, String)> = Vec::new();
    let collect_until = |prefix: &str, lines: &mut Vec<(usize, String)>, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        let mut seen = [false; PROCS];
        while !seen.iter().all(|&b| b) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((id, l)) => {
                    if l == prefix {
                        seen[id] = true;
                    }
                    lines.push((id, l));
                }
                Err(e) => panic!("workers: waiting for {prefix:?} from all of them ({seen:?}): {e}; lines so far: {lines:?}"),
            }
        }
    };
    collect_until("LW READY", &mut lines, secs(60));
    // Every connection of every worker is open: release them all at once.
    for ch in children.iter_mut() {
        let stdin = ch.0.stdin.as_mut().unwrap();
        stdin.write_all(b"GO\n").unwrap();
        stdin.flush().unwrap();
    }
    collect_until("LW DONE", &mut lines, secs(60));
    for (i, (mut ch, err)) in children.into_iter().zip(stderrs).enumerate() {
        let status = ch.0.wait().unwrap();
        let err = err.join().unwrap();
        assert!(status.success(), "worker {i} exited with {status}; stderr:\n{err}");
    }

    for id in 0..PROCS {
        let n = lines.iter().filter(|(i, l)| *i == id && l.starts_with("LW RESULT ")).count();
        assert_eq!(n, PER, "worker process {id}: one result per connection");
    }
    let results: Vec<Vec<&str>> =
        lines.iter().filter_map(|(_, l)| l.strip_prefix("LW RESULT ")).map(|r| r.split(' ').collect()).collect();
    let bad: Vec<&(usize, String)> = lines.iter().filter(|(_, l)| l.starts_with("LW BAD")).collect();
    assert!(bad.is_empty(), "malformed lease replies: {bad:?}");
    assert_eq!(results.len(), PROCS * PER, "one result per call: {lines:?}");
    let fills: Vec<&Vec<&str>> = results.iter().filter(|r| r[0] == "FILL").collect();
    let hits: Vec<&Vec<&str>> = results.iter().filter(|r| r[0] == "HIT").collect();
    assert_eq!(fills.len(), 1, "exactly one FILL among {} callers: {results:?}", PROCS * PER);
    assert_eq!(fills[0][1], "-", "FILL carries no value");
    assert_ne!(fills[0][2], "-", "FILL carries a token");
    assert_eq!(hits.len(), PROCS * PER - 1, "every other caller gets HIT: {results:?}");
    for h in &hits {
        assert_eq!(h[1..], [STAMPEDE_VALUE, "-"], "HIT with the filled value and no token: {h:?}");
    }
    let sets: Vec<&str> = lines.iter().filter_map(|(_, l)| l.strip_prefix("LW SET ")).collect();
    assert_eq!(sets, vec!["OK"], "the one holder's SET ... LEASE");

    // One request per caller: 200 TIERCACHE.GET calls in all.
    let cs = c.info("commandstats");
    let calls: i64 = info_field(&cs, "cmdstat_tiercache.get")
        .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")).map(str::to_string))
        .expect("cmdstat_tiercache.get")
        .parse()
        .unwrap();
    assert_eq!(calls, (PROCS * PER) as i64, "TIERCACHE.GET calls");
    let st = c.stats();
    assert_eq!(st.get("leases_granted"), 1, "{st:?}");
    assert_eq!(st.get("handoffs"), 0, "{st:?}");
    assert_eq!(st.get("wait_timeouts"), 0, "{st:?}");
    assert_eq!(st.get("fenced"), 0, "{st:?}");
    assert_eq!(st.get("waiters_woken"), st.get("waiters_parked"), "every parked caller was woken: {st:?}");
    assert!(st.get("waiters_parked") <= (PROCS * PER - 1) as i64, "{st:?}");
    // The calls really overlapped (the holder sleeps 200 ms before its SET): many were parked on the lease.
    assert!(
        st.get("waiters_parked") >= 50,
        "only {} callers parked: the stampede was not concurrent: {st:?}",
        st.get("waiters_parked")
    );
    assert_settled(&mut c);
    assert_eq!(c.get("stampede").as_deref(), Some(STAMPEDE_VALUE.as_bytes()));
}

// =============================================================================================
// 2. Holder's connection closes -> hand-off to the first waiter at once

#[test]
fn holder_disconnect_hands_off_at_once() {
    let s = Server::start();
    let mut c = s.conn();
    let mut holder = s.conn();
    let tok = take_lease(&mut holder, "k", 10_000);
    let mut ws: Vec<Raw> = (1..=3).map(|i| park(&s, &mut c, &lget("k", 10_000, Some(8_000)), i)).collect();
    for w in ws.iter_mut() {
        assert!(!w.has_reply(ms(30)), "a waiter was answered while the lease is held");
    }
    let st = c.stats();
    assert_eq!((st.get("leases"), st.get("lease_waiters"), st.get("waiters_parked")), (1, 3, 3), "{st:?}");

    let t0 = Instant::now();
    drop(holder);
    let r = ws[0].lease(secs(5), false);
    let took = t0.elapsed();
    let tok2 = r.fill();
    assert_ne!(tok2, tok, "the hand-off is a new lease with a new token");
    assert!(took < ms(200), "FILL after the holder's disconnect took {took:?} (lease time is 10 s)");
    assert!(!ws[1].has_reply(ms(300)), "the second waiter must keep waiting");
    assert!(!ws[2].has_reply(ms(1)), "the third waiter must keep waiting");
    let st = c.stats();
    assert_eq!(st.get("leases"), 1, "{st:?}");
    assert_eq!(st.get("lease_waiters"), 2, "{st:?}");
    assert_eq!(st.get("handoffs"), 1, "{st:?}");
    assert_eq!(st.get("leases_granted"), 2, "{st:?}");

    // The new holder fills: the rest get HIT.
    let v = ws[0].call(&lset("k", "fresh", &tok2, &["PX", "60000"]));
    assert!(is_ok(&v), "SET LEASE by the new holder: {v:?}");
    for w in ws[1..].iter_mut() {
        w.lease(secs(5), false).hit("fresh");
    }
    assert_eq!(c.get("k").as_deref(), Some(&b"fresh"[..]));
    assert_settled(&mut c);
    let st = c.stats();
    assert_eq!(st.get("waiters_woken"), 3, "{st:?}");
    // The old token is dead.
    c.expect_err(&lset("k", "late", &tok, &[]), NOT_HELD);
}

// =============================================================================================
// 3. Lease expiry

#[test]
fn lease_expiry_hands_off_or_frees() {
    let s = Server::start();
    let mut c = s.conn();
    // (a) With waiters: the first waiter gets FILL after ~300 ms, with a lease of its own ms.
    let mut holder = s.conn();
    let t0 = Instant::now();
    let tok = take_lease(&mut holder, "k", 300);
    let mut w1 = park(&s, &mut c, &lget("k", 600, Some(5_000)), 1);
    let mut w2 = park(&s, &mut c, &lget("k", 5_000, Some(5_000)), 2);
    let tok1 = w1.lease(secs(3), false).fill();
    let t1 = t0.elapsed();
    assert!(t1 >= ms(280) && t1 < ms(1500), "hand-off on expiry after {t1:?}, want ~300 ms");
    assert!(!w2.has_reply(ms(1)), "the second waiter keeps waiting");
    let st = c.stats();
    assert_eq!(st.get("lease_timeouts"), 1, "{st:?}");
    assert_eq!(st.get("handoffs"), 1, "{st:?}");
    assert_eq!(st.get("leases"), 1, "{st:?}");
    assert_eq!(st.get("lease_waiters"), 1, "{st:?}");
    // w1's lease is 600 ms (what w1 asked for): w2 gets FILL when it expires in turn.
    let t1i = Instant::now();
    let tok2 = w2.lease(secs(3), false).fill();
    let t2 = t1i.elapsed();
    assert!(t2 >= ms(550) && t2 < ms(1800), "second hand-off {t2:?} after the first, want ~600 ms (w1's LEASE)");
    assert_eq!(c.stats().get("lease_timeouts"), 2);
    // Expired tokens are fenced; the current one fills.
    holder.expect_err(&lset("k", "h", &tok, &[]), NOT_HELD);
    c.expect_err(&lset("k", "w1", &tok1, &[]), NOT_HELD);
    assert_eq!(c.get("k"), None, "fenced fills store nothing");
    assert!(is_ok(&w2.call(&lset("k", "w2", &tok2, &[]))));
    assert_eq!(c.get("k").as_deref(), Some(&b"w2"[..]));
    assert_settled(&mut c);

    // (b) Without waiters: the lease just ends; the next GET gets FILL.
    let _tokb = take_lease(&mut holder, "k2", 300);
    lease_get(&mut c, &lget("k2", 300, None)).busy();
    wait_stat(&mut c, "leases", 0, secs(3));
    let st = c.stats();
    assert_eq!(st.get("lease_timeouts"), 3, "{st:?}");
    take_lease(&mut c, "k2", 5_000);
    assert_eq!(c.stats().get("leases"), 1);
    drop(holder);
}

// =============================================================================================
// 4. Stale window: everyone gets the old value, exactly one refreshes

#[test]
fn stale_window_serves_old_value_one_refresher() {
    let s = Server::start();
    let mut c = s.conn();
    c.set("k", "old", &["PX", "100", "STALE", "10"]);
    sleep(ms(150));
    let before = c.stats();
    let mut conns: Vec<Raw> = (0..20).map(|_| Raw::open(&s, Proto::Resp2)).collect();
    let t0 = Instant::now();
    for (i, r) in conns.iter_mut().enumerate() {
        // Half of them ask to WAIT: a usable stale value is served at once anyway.
        r.send(&lget("k", 5_000, (i % 2 == 1).then_some(5_000)));
    }
    let replies: Vec<Lr> = conns.iter_mut().map(|r| r.lease(secs(5), false)).collect();
    assert!(t0.elapsed() < secs(2), "STALE replies must not wait");
    for r in &replies {
        assert_eq!(r.status, "STALE", "{replies:?}");
        assert_eq!(r.value.as_deref(), Some(&b"old"[..]), "{replies:?}");
    }
    let holders: Vec<usize> = (0..replies.len()).filter(|&i| replies[i].token.is_some()).collect();
    assert_eq!(holders.len(), 1, "exactly one STALE reply carries a token: {replies:?}");
    let st = c.stats();
    assert_eq!(st.get("stale_served") - before.get("stale_served"), 20, "{st:?}");
    assert_eq!(st.get("leases"), 1, "{st:?}");
    assert_eq!(st.get("leases_granted"), 1, "{st:?}");

    let h = holders[0];
    let tok = replies[h].token.clone().unwrap();
    let v = conns[h].call(&lset("k", "new", &tok, &["PX", "10000", "STALE", "10"]));
    assert!(is_ok(&v), "SET LEASE of the stale refresher: {v:?}");
    for r in conns.iter_mut() {
        let v = r.call(&lget("k", 5_000, None));
        parse_lr(&v, false).hit("new");
    }
    assert_eq!(c.meta("k").unwrap().state, "fresh");
    assert_settled(&mut c);
}

// =============================================================================================
// 5. Fencing

#[test]
fn fencing() {
    let s = Server::start();
    let mut c = s.conn();
    let mut h = s.conn();

    // (a) A tag the fill carries was invalidated after the grant; a parked waiter takes over.
    let tok = take_lease(&mut h, "fa", 5_000);
    let mut w = park(&s, &mut c, &lget("fa", 5_000, Some(5_000)), 1);
    assert_eq!(c.int(&cmd!("TIERCACHE.INVALIDATE", "t2")), 0);
    h.expect_err(&lset("fa", "v", &tok, &["TAGS", "2", "t1", "t2"]), TAG_INVALIDATED);
    assert_eq!(c.get("fa"), None, "a fenced fill stores nothing");
    assert!(!c.exists("fa"));
    assert_eq!(c.int(&cmd!("TIERCACHE.TAGCOUNT", "t1")), 0);
    let tok2 = w.lease(secs(2), false).fill();
    // The invalidation was before this grant: this fill is fine.
    assert!(is_ok(&w.call(&lset("fa", "v2", &tok2, &["TAGS", "2", "t1", "t2"]))));
    assert_eq!(c.get("fa").as_deref(), Some(&b"v2"[..]));
    assert_eq!(c.stats().get("fenced"), 1);
    // Not fenced: another tag, the same tag in another db, or a fill without TAGS.
    let tok = take_lease(&mut h, "fb", 5_000);
    assert_eq!(c.int(&cmd!("TIERCACHE.INVALIDATE", "unrelated")), 0);
    c.select(1);
    assert_eq!(c.int(&cmd!("TIERCACHE.INVALIDATE", "t1")), 0);
    c.select(0);
    h.ok(&lset("fb", "vb", &tok, &["TAGS", "1", "t1"]));
    let tok = take_lease(&mut h, "fc", 5_000);
    assert_eq!(c.int(&cmd!("TIERCACHE.INVALIDATE", "t1")), 2, "fa and fb carry t1");
    h.ok(&lset("fc", "vc", &tok, &[]));
    assert_eq!(c.get("fc").as_deref(), Some(&b"vc"[..]));

    // (b) Another client TIERCACHE.SETs the key: waiters get that value, the holder is fenced.
    let tok = take_lease(&mut h, "fk", 5_000);
    let mut w = park(&s, &mut c, &lget("fk", 5_000, Some(5_000)), 1);
    c.set("fk", "other", &[]);
    w.lease(secs(2), false).hit("other");
    h.expect_err(&lset("fk", "mine", &tok, &[]), KEY_CHANGED);
    assert_eq!(c.get("fk").as_deref(), Some(&b"other"[..]), "the other client's value stays");
    assert_eq!(c.stats().get("fenced"), 2);

    // (c) DEL / UNLINK of the key after a (stale) lease was granted, and RENAME / COPY / MOVE / RESTORE
    // onto it after a FILL lease was granted.
    for (i, how) in ["DEL", "UNLINK", "RENAME", "COPY", "MOVE", "RESTORE"].iter().enumerate() {
        let key = format!("fd{i}");
        let tok = match *how {
            "DEL" | "UNLINK" => {
                c.set(&key, "old", &["PX", "50", "STALE", "10"]);
                sleep(ms(80));
                lease_get(&mut h, &lget(&key, 5_000, None)).expect("STALE", Some("old"), true).unwrap()
            }
            _ => take_lease(&mut h, &key, 5_000),
        };
        let src = format!("src{i}");
        // A reader parked on the FILL lease before the RENAME: the fenced fill hands the lease to it.
        let mut waiter = (*how == "RENAME").then(|| park(&s, &mut c, &lget(&key, 5_000, Some(5_000)), 1));
        match *how {
            "DEL" | "UNLINK" => assert_eq!(c.int(&cmd!(*how, &key)), 1),
            "RENAME" => {
                c.set(&src, "arrived", &[]);
                c.ok(&cmd!("RENAME", &src, &key));
            }
            "COPY" => {
                c.set(&src, "arrived", &[]);
                assert_eq!(c.int(&cmd!("COPY", &src, &key)), 1);
            }
            "MOVE" => {
                // MOVE keeps the name: the same key name, from db 1 into db 0.
                c.select(1);
                c.set(&key, "arrived", &[]);
                assert_eq!(c.int(&cmd!("MOVE", &key, 0)), 1);
                c.select(0);
            }
            _ => {
                c.set(&src, "arrived", &[]);
                let dump = c.bytes(&cmd!("DUMP", &src)).expect("DUMP");
                c.ok(&cmd!("RESTORE", &key, 0, dump));
            }
        }
        if let Some(w) = waiter.as_mut() {
            assert!(!w.has_reply(ms(50)), "RENAME onto the key does not answer parked readers");
        }
        h.expect_err(&lset(&key, "mine", &tok, &[]), KEY_CHANGED);
        if let Some(mut w) = waiter {
            let wt = w.lease(secs(2), false).fill();
            assert_eq!(w.call(&cmd!("TIERCACHE.RELEASE", &key, &wt)), Value::Int(1));
        }
        match *how {
            "DEL" | "UNLINK" => assert!(!c.exists(&key), "{how}: a fenced fill stores nothing"),
            _ => assert_eq!(c.get(&key).as_deref(), Some(&b"arrived"[..]), "{how}: the value that arrived stays"),
        }
        assert_eq!(c.stats().get("fenced"), 3 + i as i64, "after {how}");
    }

    // (d) An expired lease.
    let tok = take_lease(&mut h, "fx", 100);
    sleep(ms(250));
    h.expect_err(&lset("fx", "late", &tok, &[]), NOT_HELD);
    assert_eq!(c.get("fx"), None);
    assert!(!c.exists("fx"));
    // A released one.
    let tok = take_lease(&mut h, "fr", 5_000);
    assert_eq!(h.int(&cmd!("TIERCACHE.RELEASE", "fr", &tok)), 1);
    h.expect_err(&lset("fr", "late", &tok, &[]), NOT_HELD);
    assert!(!c.exists("fr"));

    // (e) A wrong token: refused, and the real holder keeps its lease.
    let tok = take_lease(&mut h, "fw", 5_000);
    let n: u64 = tok.parse().unwrap();
    let wrong = if n > 1 { n - 1 } else { 2 }.to_string();
    c.expect_err(&lset("fw", "intruder", &wrong, &[]), NOT_HELD);
    assert!(!c.exists("fw"));
    // No lease at all on the key.
    c.expect_err(&lset("nolease", "x", &tok, &[]), NOT_HELD);
    assert!(!c.exists("nolease"));
    h.ok(&lset("fw", "real", &tok, &[]));
    assert_eq!(c.get("fw").as_deref(), Some(&b"real"[..]));

    let st = c.stats();
    assert_eq!(st.get("fenced"), 12, "one per FENCED refusal: {st:?}");
    assert_settled(&mut c);
}

/// LEASES.md: expiry does NOT fence a lease: a stale entry that runs out while its refresh is loading must
/// not refuse the refresh. Three expiry paths, each with a lease granted on the stale entry: active expiry,
/// lazy expiry by another command, lazy expiry inside the SET ... LEASE itself; each fill is stored.
#[test]
fn expiry_does_not_fence() {
    let s = Server::start();
    let mut c = s.conn();
    let mut h = s.conn();
    let expired_keys = |c: &mut Conn| -> i64 { info_field(&c.info("stats"), "expired_keys").unwrap().trim().parse().unwrap() };
    let stale_lease = |c: &mut Conn, h: &mut Conn, key: &str| -> String {
        c.set(key, "old", &["PX", "50", "STALE", "1"]);
        sleep(ms(80));
        lease_get(h, &lget(key, 5_000, None)).expect("STALE", Some("old"), true).unwrap()
    };
    let mut got: Vec<(&str, Result<Value, String>, bool)> = Vec::new();
    // Active expiry (nobody touches the key).
    let base = expired_keys(&mut c);
    let tok = stale_lease(&mut c, &mut h, "active");
    assert!(wait_until(secs(4), || expired_keys(&mut c) > base), "the key did not expire");
    let r = h.try_run(&lset("active", "mine", &tok, &[]));
    got.push(("active expiry", r, c.exists("active")));
    // Lazy expiry: by EXISTS, and inside the SET ... LEASE.
    c.ok(&cmd!("DEBUG", "SET-ACTIVE-EXPIRE", 0));
    let tok_a = stale_lease(&mut c, &mut h, "lazy");
    let tok_b = stale_lease(&mut c, &mut h, "atset");
    sleep(ms(1200));
    assert!(!c.exists("lazy"));
    let r = h.try_run(&lset("lazy", "mine", &tok_a, &[]));
    got.push(("lazy expiry (EXISTS)", r, c.exists("lazy")));
    let r = h.try_run(&lset("atset", "mine", &tok_b, &[]));
    got.push(("lazy expiry (in the SET)", r, c.exists("atset")));
    c.ok(&cmd!("DEBUG", "SET-ACTIVE-EXPIRE", 1));
    let wrong: Vec<String> = got
        .iter()
        .filter(|(_, r, stored)| r.is_err() || !*stored)
        .map(|(what, r, stored)| format!("{what}: SET ... LEASE replied {r:?}, key exists afterwards: {stored}"))
        .collect();
    assert!(wrong.is_empty(), "expected OK and the fill stored:\n{}", wrong.join("\n"));
}

// =============================================================================================
// 6. RELEASE

#[test]
fn release_and_pass() {
    let s = Server::start();
    let mut c = s.conn();
    let mut h = s.conn();
    // Nothing held.
    assert_eq!(c.int(&cmd!("TIERCACHE.RELEASE", "k", "12345")), 0);
    // Without PASS: the first waiter gets FILL, the other keeps waiting.
    let tok = take_lease(&mut h, "k", 5_000);
    let mut w1 = park(&s, &mut c, &lget("k", 5_000, Some(5_000)), 1);
    let mut w2 = park(&s, &mut c, &lget("k", 5_000, Some(5_000)), 2);
    let n: u64 = tok.parse().unwrap();
    let wrong = if n > 1 { n - 1 } else { 2 }.to_string();
    assert_eq!(c.int(&cmd!("TIERCACHE.RELEASE", "k", &wrong)), 0, "a wrong token releases nothing");
    assert!(!w1.has_reply(ms(50)));
    assert_eq!(h.int(&cmd!("TIERCACHE.RELEASE", "k", &tok)), 1);
    let tok1 = w1.lease(secs(2), false).fill();
    assert!(!w2.has_reply(ms(200)), "the second waiter keeps waiting");
    assert_eq!(h.int(&cmd!("TIERCACHE.RELEASE", "k", &tok)), 0, "released twice");
    // With PASS: every waiter gets PASS.
    assert_eq!(w1.call(&cmd!("TIERCACHE.RELEASE", "k", &tok1, "PASS")), Value::Int(1));
    w2.lease(secs(2), false).pass();
    let st = c.stats();
    assert_eq!(st.get("passes"), 1, "{st:?}");
    assert_eq!(st.get("handoffs"), 1, "{st:?}");
    assert_settled(&mut c);
    assert!(!c.exists("k"));

    let tok = take_lease(&mut h, "k2", 5_000);
    let mut ws: Vec<Raw> = (1..=3).map(|i| park(&s, &mut c, &lget("k2", 5_000, Some(5_000)), i)).collect();
    assert_eq!(h.int(&cmd!("TIERCACHE.RELEASE", "k2", &tok, "PASS")), 1);
    for w in ws.iter_mut() {
        w.lease(secs(2), false).pass();
    }
    let st = c.stats();
    assert!(st.get("passes") >= 2, "passes counts RELEASE ... PASS: {st:?}");
    assert_settled(&mut c);
    // The key is free again: the next GET gets FILL.
    take_lease(&mut c, "k2", 5_000);
    assert_eq!(c.int(&cmd!("TIERCACHE.RELEASE", "k2", &tok, "PASS")), 0, "old token");

    // FLUSHALL / FLUSHDB: waiters get PASS.
    for flush in ["FLUSHALL", "FLUSHDB"] {
        let _tok = take_lease(&mut h, "kf", 5_000);
        let mut w = park(&s, &mut c, &lget("kf", 5_000, Some(5_000)), 1);
        c.ok(&cmd!(flush));
        w.lease(secs(2), false).pass();
        assert_eq!(c.stats().get("lease_waiters"), 0, "{flush}");
    }
    drop(h);
    wait_stat(&mut c, "leases", 0, secs(2));
    assert_settled(&mut c);
}

// =============================================================================================
// 7. MULTI/EXEC and Lua never block

#[test]
fn multi_and_lua_never_block() {
    let s = Server::start();
    let mut c = s.conn();
    let mut h = s.conn();
    let _tok = take_lease(&mut h, "k", 10_000);

    let t0 = Instant::now();
    c.ok(&cmd!("MULTI"));
    for cm in [lget("k", 1000, Some(1000)), lget("free", 1000, Some(1000))] {
        assert_eq!(c.run(&cm), Value::SimpleString("QUEUED".into()));
    }
    let replies = match c.run(&cmd!("EXEC")) {
        Value::Array(items) => items,
        other => panic!("EXEC: {other:?}"),
    };
    assert!(t0.elapsed() < ms(500), "MULTI must not block: {:?}", t0.elapsed());
    assert_eq!(replies.len(), 2);
    parse_lr(&replies[0], false).busy();
    let tok_free = parse_lr(&replies[1], false).fill();

    let script = "return redis.call('TIERCACHE.GET', KEYS[1], 'LEASE', '1000', 'WAIT', '1000')";
    let t0 = Instant::now();
    let v = c.run(&cmd!("EVAL", script, 1, "k"));
    assert!(t0.elapsed() < ms(500), "Lua must not block: {:?}", t0.elapsed());
    parse_lr(&v, false).busy();
    let v = c.run(&cmd!("EVAL", script, 1, "lua"));
    let tok_lua = parse_lr(&v, false).fill();

    assert_eq!(c.run(&cmd!("PING")), Value::SimpleString("PONG".into()));
    let st = c.stats();
    assert_eq!(st.get("lease_waiters"), 0, "{st:?}");
    assert_eq!(st.get("wait_timeouts"), 0, "{st:?}");
    assert_eq!(st.get("leases"), 3, "{st:?}");
    assert_eq!(blocked_clients(&mut c), 0);
    // Leases granted inside MULTI / Lua are real ones.
    c.ok(&lset("free", "f", &tok_free, &[]));
    c.ok(&lset("lua", "l", &tok_lua, &[]));
    let v = c.run(&cmd!("EVAL", script, 1, "lua"));
    parse_lr(&v, false).hit("l");
    drop(h);
    wait_stat(&mut c, "leases", 0, secs(2));
    assert_settled(&mut c);
}

// =============================================================================================
// 8. Replica

#[test]
fn replica_refuses_leases() {
    let m = Server::start();
    let r = m.start_replica(Server::builder());
    let mut mc = m.conn();
    mc.set("k", "v", &[]);
    let mut h = m.conn();
    let tok = take_lease(&mut h, "filled", 5_000);
    h.ok(&lset("filled", "via-lease", &tok, &["TAGS", "1", "t"]));
    assert_eq!(mc.int(&cmd!("WAIT", 1, 5000)), 1);
    for p in [Proto::Resp2, Proto::Resp3] {
        let mut rc = r.conn_proto(p);
        for cm in [
            lget("k", 1000, None),
            lget("missing", 1000, None),
            lget("missing", 1000, Some(1000)),
            cmd!("TIERCACHE.GET", "k", "LEASE", 1000, "BETA", 1),
            cmd!("TIERCACHE.GET", "k", "ENCODED", "LEASE", 1000),
        ] {
            rc.expect_err(&cm, REPLICA_REFUSED);
        }
        assert_eq!(rc.get("k").as_deref(), Some(&b"v"[..]), "plain GET on the replica ({p:?})");
        assert_eq!(rc.get("filled").as_deref(), Some(&b"via-lease"[..]), "a lease fill replicates ({p:?})");
        assert_eq!(rc.get("missing"), None);
        let st = rc.stats();
        assert_eq!(st.get("leases"), 0, "{st:?}");
        assert_eq!(st.get("leases_granted"), 0, "{st:?}");
    }
    assert_eq!(r.conn().int(&cmd!("TIERCACHE.TAGCOUNT", "t")), 1);
}

// =============================================================================================
// 9. WAIT deadline

#[test]
fn wait_deadline_answers_busy() {
    let s = Server::start();
    let mut c = s.conn();
    let mut h = s.conn();
    let tok = take_lease(&mut h, "k", 5_000);
    let mut w = Raw::open(&s, Proto::Resp2);
    let t0 = Instant::now();
    w.send(&lget("k", 5_000, Some(300)));
    wait_stat(&mut c, "lease_waiters", 1, secs(2));
    w.lease(secs(3), false).busy();
    let took = t0.elapsed();
    assert!(took >= ms(280) && took < ms(1500), "BUSY after {took:?}, want ~300 ms");
    let st = c.stats();
    assert_eq!(st.get("wait_timeouts"), 1, "{st:?}");
    assert_eq!(st.get("lease_waiters"), 0, "{st:?}");
    assert_eq!(st.get("leases"), 1, "the holder still holds: {st:?}");
    assert_eq!(blocked_clients(&mut c), 0);
    // The same connection can park again; the holder's fill still works.
    w.send(&lget("k", 5_000, Some(3_000)));
    wait_stat(&mut c, "lease_waiters", 1, secs(2));
    h.ok(&lset("k", "v", &tok, &[]));
    w.lease(secs(2), false).hit("v");
    assert_eq!(c.stats().get("wait_timeouts"), 1);
    assert_settled(&mut c);
}

// =============================================================================================
// 10. BETA / XFetch

/// Fills `key` through a lease that takes ~`fill_ms`.
fn slow_fill(c: &mut Conn, key: &str, value: &str, fill_ms: u64, opts: &[&str]) {
    let tok = take_lease(c, key, 5_000);
    sleep(ms(fill_ms));
    c.ok(&lset(key, value, &tok, opts));
}

#[test]
fn beta_refreshes_early_once() {
    let s = Server::start();
    let mut c = s.conn();
    let mut polls = [s.conn(), s.conn()];
    // delta ~100 ms; fresh for 400 ms, then a stale window (so the key is still there for the refresh).
    slow_fill(&mut c, "k", "v1", 100, &["PX", "400", "STALE", "10"]);
    let start = Instant::now();
    let mut tokens: Vec<(usize, String, Duration)> = Vec::new();
    let mut n = 0usize;
    loop {
        let i = n % 2;
        n += 1;
        let r = lease_get(&mut polls[i], &cmd!("TIERCACHE.GET", "k", "LEASE", 1000, "BETA", 1));
        if r.status != "HIT" {
            assert_eq!(r.status, "STALE", "{r:?}");
            assert_eq!(r.token, None, "the early refresher still holds the lease: {r:?}");
            break;
        }
        assert_eq!(r.value.as_deref(), Some(&b"v1"[..]));
        if let Some(t) = r.token {
            tokens.push((i, t, start.elapsed()));
        }
        assert!(start.elapsed() < secs(3), "entry still fresh after 3 s");
        sleep(ms(1));
    }
    assert_eq!(tokens.len(), 1, "one early-refresh token while its lease is held ({n} polls): {tokens:?}");
    let (who, tok, at) = tokens.pop().unwrap();
    assert!(at < ms(450), "the token came while the entry was fresh ({at:?})");
    let st = c.stats();
    assert_eq!(st.get("early_refreshes"), 1, "{st:?}");
    assert_eq!(st.get("leases"), 1, "{st:?}");
    polls[who].ok(&lset("k", "v2", &tok, &["PX", "60000"]));
    lease_get(&mut c, &lget("k", 1000, None)).hit("v2");

    // Far from the deadline with a tiny BETA: never a token.
    slow_fill(&mut c, "far", "f", 100, &["PX", "10000"]);
    for _ in 0..300 {
        let r = lease_get(&mut polls[0], &cmd!("TIERCACHE.GET", "far", "LEASE", 1000, "BETA", "0.0001"));
        r.hit("f");
    }
    // An entry not written through a lease fill never refreshes early, even with a huge BETA.
    c.set("plain", "p", &["PX", "300", "STALE", "10"]);
    let start = Instant::now();
    loop {
        let r = lease_get(&mut polls[1], &cmd!("TIERCACHE.GET", "plain", "LEASE", 1000, "BETA", 1000));
        if r.status != "HIT" {
            break;
        }
        assert_eq!(r.token, None, "no fill duration known: never early ({:?} in)", start.elapsed());
        assert!(start.elapsed() < secs(3));
        sleep(ms(2));
    }
    let st = c.stats();
    assert_eq!(st.get("early_refreshes"), 1, "{st:?}");
}

// =============================================================================================
// 11. ENCODED with LEASE

fn encoded_with_lease(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let mut h = s.conn_proto(p);
    let eget = |key: &str, wait: Option<u64>| {
        let mut cm = cmd!("TIERCACHE.GET", key, "ENCODED", "LEASE", 5_000);
        if let Some(w) = wait {
            cm.arg("WAIT").arg(w);
        }
        cm
    };
    // FILL / BUSY: 4 elements, encoding nil.
    let r = parse_lr(&h.run(&eget("big", None)), true);
    let tok = r.token.clone().expect("FILL token");
    assert_eq!((r.status.as_str(), r.value.as_ref(), r.encoding.clone()), ("FILL", None, Some(None)), "{r:?}");
    let r = parse_lr(&c.run(&eget("big", None)), true);
    assert_eq!(r, Lr { status: "BUSY".into(), value: None, token: None, encoding: Some(None) });
    // A parked ENCODED reader woken by the fill: the stored lz4 bytes.
    let mut w = Raw::open(&s, p);
    w.send(&eget("big", Some(5_000)));
    wait_stat(&mut c, "lease_waiters", 1, secs(2));
    let big = compressible(5000);
    h.ok(&cmd!("TIERCACHE.SET", "big", &big[..], "LEASE", &tok));
    let r = w.lease(secs(2), true);
    assert_eq!(r.status, "HIT");
    assert_eq!(r.token, None);
    assert_eq!(r.encoding, Some(Some("lz4".to_string())), "{:?}", r.encoding);
    assert_eq!(lz4_unframe(r.value.as_ref().unwrap()), big, "ENCODED value: the stored frame");
    // Fresh HIT, raw and lz4.
    let r = parse_lr(&c.run(&eget("big", None)), true);
    assert_eq!(r.encoding, Some(Some("lz4".to_string())));
    assert_eq!(lz4_unframe(r.value.as_ref().unwrap()), big);
    c.set("small", "v", &["PX", "100", "STALE", "10"]);
    let r = parse_lr(&c.run(&eget("small", None)), true);
    assert_eq!(r, Lr { status: "HIT".into(), value: Some(b"v".to_vec()), token: None, encoding: Some(Some("raw".into())) });
    // Without ENCODED the same call is 3 elements.
    parse_lr(&c.run(&lget("small", 5_000, None)), false).hit("v");
    // STALE with a token.
    sleep(ms(150));
    let r = parse_lr(&c.run(&eget("small", None)), true);
    assert_eq!((r.status.as_str(), r.value.as_deref(), r.encoding.clone()), ("STALE", Some(&b"v"[..]), Some(Some("raw".into()))));
    let stok = r.token.expect("first STALE reader gets the token");
    assert_eq!(c.run(&cmd!("TIERCACHE.RELEASE", "small", &stok)), Value::Int(1));
    // Hand-off, PASS and WAIT deadline replies of ENCODED readers.
    let tok = take_lease(&mut h, "e2", 5_000);
    let mut w1 = Raw::open(&s, p);
    w1.send(&eget("e2", Some(5_000)));
    wait_stat(&mut c, "lease_waiters", 1, secs(2));
    let mut w2 = Raw::open(&s, p);
    w2.send(&eget("e2", Some(5_000)));
    wait_stat(&mut c, "lease_waiters", 2, secs(2));
    assert_eq!(h.int(&cmd!("TIERCACHE.RELEASE", "e2", &tok)), 1);
    let r = w1.lease(secs(2), true);
    assert_eq!((r.status.as_str(), r.value.as_ref(), r.encoding.clone()), ("FILL", None, Some(None)), "{r:?}");
    assert_eq!(w1.call(&cmd!("TIERCACHE.RELEASE", "e2", r.token.as_ref().unwrap(), "PASS")), Value::Int(1));
    let r = w2.lease(secs(2), true);
    assert_eq!(r, Lr { status: "PASS".into(), value: None, token: None, encoding: Some(None) });
    let _tok = take_lease(&mut h, "e3", 5_000);
    let mut w3 = Raw::open(&s, p);
    w3.send(&cmd!("TIERCACHE.GET", "e3", "ENCODED", "LEASE", 5_000, "WAIT", 100));
    let r = w3.lease(secs(2), true);
    assert_eq!(r, Lr { status: "BUSY".into(), value: None, token: None, encoding: Some(None) });
}

// =============================================================================================
// 12. No leak after thousands of lease cycles

#[test]
fn no_leak_after_thousands_of_cycles() {
    const ROUNDS: usize = 25;
    const PER: usize = 20; // keys per scenario per round; 5 scenarios -> 100 lease cycles a round
    let s = Server::start();
    let mut c = s.conn();
    let started = Instant::now();
    let mut pool: Vec<Raw> = Vec::new();
    let take = |pool: &mut Vec<Raw>| pool.pop().unwrap_or_else(|| Raw::open(&s, Proto::Resp2));
    let mut cycles = 0usize;
    let mut waiters_total: i64 = 0;
    for round in 0..ROUNDS {
        // Phase 1: scenarios needing parked waiters first (leases of 5 s, resolved at once).
        //   0 fill, 1 holder disconnects, 3 RELEASE PASS, 4 waiters disconnect then RELEASE / fill.
        let scen = [0usize, 1, 3, 4];
        let keys: Vec<(usize, String)> = (0..4 * PER).map(|i| (scen[i % 4], format!("leak:{round}:{i}"))).collect();
        let mut holders: Vec<Option<Raw>> = keys.iter().map(|_| Some(take(&mut pool))).collect();
        for (h, (_, k)) in holders.iter_mut().zip(&keys) {
            h.as_mut().unwrap().send(&lget(k, 5_000, None));
        }
        let toks: Vec<String> = holders.iter_mut().map(|h| h.as_mut().unwrap().lease(secs(10), false).fill()).collect();
        let mut waiters: Vec<Vec<Raw>> = keys.iter().map(|_| vec![take(&mut pool), take(&mut pool)]).collect();
        for (ws, (_, k)) in waiters.iter_mut().zip(&keys) {
            for w in ws.iter_mut() {
                w.send(&lget(k, 5_000, Some(5_000)));
            }
        }
        waiters_total += 2 * keys.len() as i64;
        wait_stat(&mut c, "lease_waiters", 2 * keys.len() as i64, secs(10));
        for (i, (sc, k)) in keys.iter().enumerate() {
            match sc {
                0 => holders[i].as_mut().unwrap().send(&lset(k, "v", &toks[i], &[])),
                1 => holders[i] = None,
                3 => holders[i].as_mut().unwrap().send(&cmd!("TIERCACHE.RELEASE", k, &toks[i], "PASS")),
                _ => {
                    waiters[i].clear();
                    if i % 8 < 4 {
                        holders[i].as_mut().unwrap().send(&cmd!("TIERCACHE.RELEASE", k, &toks[i]));
                    } else {
                        holders[i].as_mut().unwrap().send(&lset(k, "v", &toks[i], &[]));
                    }
                }
            }
        }
        for (i, (sc, k)) in keys.iter().enumerate() {
            cycles += 1;
            match sc {
                0 => {
                    assert!(is_ok(&holders[i].as_mut().unwrap().recv(secs(10))), "{k}: fill");
                    for w in waiters[i].iter_mut() {
                        w.lease(secs(10), false).hit("v");
                    }
                }
                1 => {
                    let first = first_ready(&mut waiters[i], secs(10));
                    let tok = waiters[i][first].lease(secs(1), false).fill();
                    cycles += 1;
                    let v = waiters[i][first].call(&lset(k, "v", &tok, &[]));
                    assert!(is_ok(&v), "{k}: fill after hand-off: {v:?}");
                    waiters[i][1 - first].lease(secs(10), false).hit("v");
                }
                3 => {
                    assert_eq!(holders[i].as_mut().unwrap().recv(secs(10)), Value::Int(1), "{k}: RELEASE PASS");
                    for w in waiters[i].iter_mut() {
                        w.lease(secs(10), false).pass();
                    }
                }
                _ => {
                    let v = holders[i].as_mut().unwrap().recv(secs(10));
                    assert!(v == Value::Int(1) || is_ok(&v), "{k}: RELEASE / fill with the waiters gone: {v:?}");
                }
            }
        }
        pool.extend(holders.into_iter().flatten());
        pool.extend(waiters.into_iter().flatten());

        // Phase 2: short leases (20 ms) expiring with WAIT 50 waiters; nobody fills.
        let keys: Vec<String> = (0..PER).map(|i| format!("leak2:{round}:{i}")).collect();
        let mut holders: Vec<Raw> = keys.iter().map(|_| take(&mut pool)).collect();
        for (h, k) in holders.iter_mut().zip(&keys) {
            h.send(&lget(k, 20, None));
        }
        for h in holders.iter_mut() {
            h.lease(secs(10), false).fill();
        }
        let mut waiters: Vec<Raw> = keys.iter().flat_map(|_| [take(&mut pool), take(&mut pool)]).collect();
        for (j, w) in waiters.iter_mut().enumerate() {
            w.send(&lget(&keys[j / 2], 20, Some(50)));
        }
        for w in waiters.iter_mut() {
            let r = w.lease(secs(10), false);
            assert!(
                (r.status == "FILL" && r.token.is_some() && r.value.is_none())
                    || r == Lr { status: "BUSY".into(), value: None, token: None, encoding: None },
                "short lease waiter: {r:?}"
            );
            cycles += 1;
        }
        pool.extend(holders);
        pool.extend(waiters);
    }
    assert!(cycles >= 2000, "{cycles} lease cycles");
    let run = started.elapsed();
    sleep(secs(1));
    assert!(
        wait_until(secs(3), || {
            let st = c.stats();
            st.get("leases") == 0 && st.get("lease_waiters") == 0
        }),
        "leases did not settle: {:?}",
        c.stats()
    );
    assert_settled(&mut c);
    assert_eq!(c.run(&cmd!("PING")), Value::SimpleString("PONG".into()));
    let st = c.stats();
    assert!(st.get("leases_granted") >= (ROUNDS * PER * 6) as i64, "{st:?}");
    assert!(st.get("handoffs") >= (ROUNDS * PER) as i64, "{st:?}");
    assert!(st.get("lease_timeouts") > 0, "{st:?}");
    assert!(st.get("passes") >= (ROUNDS * PER) as i64, "{st:?}");
    assert!(st.get("waiters_parked") >= waiters_total, "{st:?}");
    // Closing every connection changes nothing.
    drop(pool);
    sleep(ms(200));
    assert_settled(&mut c);
    eprintln!("no_leak: {cycles} lease cycles in {run:?}; {st:?}");
}

// =============================================================================================
// 13. Errors and reply shapes

fn errors(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "v", &[]);
    let get = |extra: &[&str]| {
        let mut cm = cmd!("TIERCACHE.GET", "k");
        for a in extra {
            cm.arg(*a);
        }
        cm
    };
    let cases: &[(&[&str], &str)] = &[
        (&["LEASE", "0"], E_LEASE),
        (&["LEASE", "-1"], E_LEASE),
        (&["LEASE", "-100", "WAIT", "10"], E_LEASE),
        (&["LEASE", "abc"], E_NOT_INT),
        (&["LEASE", "1.5"], E_NOT_INT),
        (&["LEASE", ""], E_NOT_INT),
        (&["LEASE", "99999999999999999999"], E_NOT_INT),
        (&["LEASE", "100", "WAIT", "0"], E_WAIT),
        (&["LEASE", "100", "WAIT", "-5"], E_WAIT),
        (&["LEASE", "100", "WAIT", "abc"], E_NOT_INT),
        (&["LEASE", "100", "WAIT", "2.5"], E_NOT_INT),
        (&["LEASE", "100", "BETA", "0"], E_BETA),
        (&["LEASE", "100", "BETA", "0.0"], E_BETA),
        (&["LEASE", "100", "BETA", "-1"], E_BETA),
        (&["LEASE", "100", "BETA", "nan"], E_BETA),
        (&["LEASE", "100", "BETA", "NaN"], E_BETA),
        (&["LEASE", "100", "BETA", "abc"], E_BETA),
        (&["LEASE", "100", "BETA", ""], E_BETA),
        (&["WAIT", "100"], E_SYNTAX),
        (&["BETA", "1"], E_SYNTAX),
        (&["WAIT", "100", "BETA", "1"], E_SYNTAX),
        (&["ENCODED", "WAIT", "100"], E_SYNTAX),
        (&["LEASE", "100", "LEASE", "100"], E_SYNTAX),
        (&["LEASE", "100", "WAIT", "10", "WAIT", "10"], E_SYNTAX),
        (&["LEASE", "100", "BETA", "1", "BETA", "1"], E_SYNTAX),
        (&["ENCODED", "ENCODED", "LEASE", "100"], E_SYNTAX),
        (&["LEASE", "100", "FOO"], E_SYNTAX),
        (&["LEASE", "100", "FOO", "1"], E_SYNTAX),
    ];
    for (args, want) in cases {
        c.expect_err(&get(args), want);
    }
    // Wrong type.
    c.ok(&cmd!("SET", "native", "x"));
    c.expect_err(&lget("native", 100, None), WRONGTYPE);
    c.expect_err(&lget("native", 100, Some(100)), WRONGTYPE);

    // SET ... LEASE with bad token text: nothing stored.
    for bad in ["abc", "", "-1", "1.5", "0", "12x", "18446744073709551616"] {
        c.expect_err(&lset("sk", "v", bad, &[]), E_TOKEN);
    }
    c.expect_err(&cmd!("TIERCACHE.SET", "sk", "v", "LEASE"), E_SYNTAX);
    c.expect_err(&cmd!("TIERCACHE.SET", "sk", "v", "LEASE", 5, "LEASE", 5), E_SYNTAX);
    assert!(!c.exists("sk"), "refused SETs store nothing");

    // RELEASE.
    for bad in ["abc", "", "-1", "0", "1.5"] {
        c.expect_err(&cmd!("TIERCACHE.RELEASE", "k", bad), E_TOKEN);
        c.expect_err(&cmd!("TIERCACHE.RELEASE", "k", bad, "PASS"), E_TOKEN);
    }
    c.expect_err(&cmd!("TIERCACHE.RELEASE", "k", 5, "FOO"), E_SYNTAX);
    c.expect_err(&cmd!("TIERCACHE.RELEASE", "k", 5, "PASSX"), E_SYNTAX);
    c.expect_err(&cmd!("TIERCACHE.RELEASE", "k"), E_RELEASE_ARITY);
    c.expect_err(&cmd!("TIERCACHE.RELEASE"), E_RELEASE_ARITY);
    c.expect_err(&cmd!("TIERCACHE.RELEASE", "k", 5, "PASS", "x"), E_RELEASE_ARITY);

    // TIERCACHE.GET stays flagged readonly.
    let v = c.run(&cmd!("COMMAND", "INFO", "tiercache.get"));
    let entry = as_list(&v).and_then(|l| l.first()).and_then(as_list).unwrap_or_else(|| panic!("COMMAND INFO: {v:?}"));
    let flags: Vec<String> = as_list(&entry[2]).unwrap_or_else(|| panic!("flags: {v:?}")).iter().filter_map(as_string).collect();
    assert!(flags.iter().any(|f| f == "readonly"), "TIERCACHE.GET flags: {flags:?}");

    let st = c.stats();
    assert_eq!(st.get("leases_granted"), 0, "refused commands grant nothing: {st:?}");
    assert_eq!(st.get("fenced"), 0, "{st:?}");

    // The FENCED texts (also under RESP3).
    let mut h = s.conn_proto(p);
    let tok = take_lease(&mut h, "f1", 5_000);
    let n: u64 = tok.parse().unwrap();
    let wrong = if n > 1 { n - 1 } else { 2 }.to_string();
    c.expect_err(&lset("f1", "x", &wrong, &[]), NOT_HELD);
    assert_eq!(c.int(&cmd!("TIERCACHE.INVALIDATE", "tg")), 0);
    h.expect_err(&lset("f1", "x", &tok, &["TAGS", "1", "tg"]), TAG_INVALIDATED);
    let tok = take_lease(&mut h, "f2", 5_000);
    c.set("f2", "other", &[]);
    h.expect_err(&lset("f2", "x", &tok, &[]), KEY_CHANGED);
    assert_eq!(c.stats().get("fenced"), 3);
    assert_settled(&mut c);
}

fn reply_shapes(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let mut h = s.conn_proto(p);
    let st0 = c.stats();
    // FILL, then BUSY for another client; both misses.
    let tok = take_lease(&mut h, "k", 5_000);
    lease_get(&mut c, &lget("k", 5_000, None)).busy();
    let st = c.stats();
    assert_eq!(st.get("misses") - st0.get("misses"), 2, "FILL and BUSY count as misses: {st:?}");
    assert_eq!(st.get("hits"), st0.get("hits"));
    // A parked reader counts as a miss once parked.
    let mut w = Raw::open(&s, p);
    w.send(&lget("k", 5_000, Some(5_000)));
    wait_stat(&mut c, "lease_waiters", 1, secs(2));
    assert_eq!(c.stats().get("misses") - st0.get("misses"), 3);
    // The gauges are in INFO too.
    let info = c.info("tiercache");
    assert_eq!(info_field(&info, "tiercache_leases").as_deref().map(str::trim), Some("1"), "{info}");
    assert_eq!(info_field(&info, "tiercache_lease_waiters").as_deref().map(str::trim), Some("1"), "{info}");
    assert_eq!(blocked_clients(&mut c), 1, "the parked reader is a blocked client");
    // SET ... LEASE replies OK; the waiter gets [HIT, value, nil].
    let v = h.run(&lset("k", "val", &tok, &["PX", "100", "STALE", "10"]));
    assert!(is_ok(&v), "SET LEASE reply: {v:?}");
    let r = w.lease(secs(2), false);
    r.hit("val");
    // Fresh: HIT (a hit).
    let hits = c.stats().get("hits");
    lease_get(&mut c, &lget("k", 5_000, None)).hit("val");
    assert_eq!(c.stats().get("hits"), hits + 1);
    // Stale: first caller gets the token, others nil; stale_served counts both.
    sleep(ms(150));
    let stale0 = c.stats().get("stale_served");
    let stok = lease_get(&mut h, &lget("k", 5_000, None)).expect("STALE", Some("val"), true).unwrap();
    lease_get(&mut c, &lget("k", 5_000, Some(1000))).expect("STALE", Some("val"), false);
    assert_eq!(c.stats().get("stale_served"), stale0 + 2);
    // RELEASE replies an integer; PASS reaches a parked reader.
    assert_eq!(h.run(&cmd!("TIERCACHE.RELEASE", "k", &stok)), Value::Int(1));
    assert_eq!(h.run(&cmd!("TIERCACHE.RELEASE", "k", &stok)), Value::Int(0));
    let tok = take_lease(&mut h, "p", 5_000);
    let mut w = Raw::open(&s, p);
    w.send(&lget("p", 5_000, Some(5_000)));
    wait_stat(&mut c, "lease_waiters", 1, secs(2));
    assert_eq!(h.run(&cmd!("TIERCACHE.RELEASE", "p", &tok, "PASS")), Value::Int(1));
    let v = w.recv(secs(2));
    assert!(matches!(&v, Value::Array(a) if a.len() == 3), "PASS reply shape ({p:?}): {v:?}");
    parse_lr(&v, false).pass();
    // Hand-off reply on a parked reader.
    let tok = take_lease(&mut h, "q", 5_000);
    let mut w = Raw::open(&s, p);
    w.send(&lget("q", 5_000, Some(5_000)));
    wait_stat(&mut c, "lease_waiters", 1, secs(2));
    assert_eq!(h.run(&cmd!("TIERCACHE.RELEASE", "q", &tok)), Value::Int(1));
    let wt = w.lease(secs(2), false).fill();
    assert_eq!(w.call(&cmd!("TIERCACHE.RELEASE", "q", &wt)), Value::Int(1));
    // Plain GET is unchanged.
    assert_eq!(c.run(&cmd!("TIERCACHE.GET", "q")), Value::Nil);
    assert_settled(&mut c);
}

/// TIERCACHE.DEL: deletes like DEL (count, replication) and fences fills even of keys that do not exist,
/// which plain DEL cannot (no key, no event): the cache-aside "write the database, then delete" race.
#[test]
fn tiercache_del_fences_fills_of_missing_keys() {
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let mut c = master.conn();
    let mut h = master.conn();
    // Plain DEL of a missing key does not fence the fill.
    let tok = lease_get(&mut h, &lget("plain", 5_000, None)).expect("FILL", None, true).unwrap();
    assert_eq!(c.int(&cmd!("DEL", "plain")), 0);
    h.ok(&lset("plain", "old", &tok, &[]));
    // TIERCACHE.DEL of a missing key does.
    let tok = lease_get(&mut h, &lget("k", 5_000, None)).expect("FILL", None, true).unwrap();
    assert_eq!(c.int(&cmd!("TIERCACHE.DEL", "k")), 0);
    h.expect_err(&lset("k", "old", &tok, &[]), KEY_CHANGED);
    assert!(!c.exists("k"), "a fenced fill stores nothing");
    // It deletes like DEL, any type, and counts.
    c.set("a", "1", &["TAGS", "1", "t"]);
    c.ok(&cmd!("SET", "native", "x"));
    assert_eq!(c.int(&cmd!("TIERCACHE.DEL", "a", "native", "missing")), 2);
    assert!(!c.exists("a") && !c.exists("native"));
    assert_eq!(c.int(&cmd!("TIERCACHE.TAGCOUNT", "t")), 0, "the tag index follows");
    assert_eq!(c.int(&cmd!("WAIT", 1, 2000)), 1);
    let mut r = replica.conn();
    assert!(!r.exists("a") && !r.exists("native"), "replicated as DEL");
    assert!(r.exists("plain"), "the unfenced fill after a plain DEL was stored (and replicated)");
    assert_eq!(c.err(&cmd!("TIERCACHE.DEL")), "ERR wrong number of arguments for 'tiercache.del' command");
}

// =============================================================================================
// Hardening (issue 9): every parked read gets exactly one reply; a dying holder's own read never
// inherits its lease; timers end with what they guard; caps; unpredictable tokens.

/// A Lua busy loop of `ms` milliseconds: the event loop stands still, so WAIT deadlines pass while the
/// commands pipelined behind it wait.
fn busy_lua(ms: u64) -> redis::Cmd {
    cmd!(
        "EVAL",
        "local t = redis.call('TIME'); local s = t[1] * 1000000 + t[2]; \
         repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - s >= tonumber(ARGV[1]) * 1000; return 1",
        0,
        ms
    )
}

/// Redis 7.0 runs block timeouts before it replies to clients a module unblocked in the same event-loop
/// iteration, and drops that reply. The holder pipelines a 300 ms busy loop and then its fill (or
/// RELEASE, or PASS) against a reader whose WAIT deadline (100 ms) passes during the loop: the reader
/// must still get exactly one reply, and nothing may stay held, parked or armed.
fn wake_in_the_deadline_iteration_still_replies(p: Proto) {
    let s = Server::start();
    let mut c = s.conn();
    for how in ["fill", "release", "pass"] {
        let key = format!("race:{how}");
        let mut holder = s.conn_proto(p);
        let tok = take_lease(&mut holder, &key, 10_000);
        let mut reader = Raw::open(&s, p);
        reader.send(&lget(&key, 10_000, Some(100)));
        wait_stat(&mut c, "lease_waiters", 1, secs(5));
        // One write, so that Redis reads and runs both commands in one event-loop iteration.
        let end = match how {
            "fill" => lset(&key, "v", &tok, &[]),
            "release" => cmd!("TIERCACHE.RELEASE", &key, &tok),
            _ => cmd!("TIERCACHE.RELEASE", &key, &tok, "PASS"),
        };
        let replies = holder.pipeline(&[busy_lua(300), end]);
        assert_eq!(replies.len(), 2, "{how}: {replies:?}");
        let r = reader.lease(secs(10), false);
        match how {
            "fill" => r.hit("v"),
            "release" => {
                // The hand-off reached a live reader: it holds the lease now and can fill.
                let t2 = r.fill();
                assert!(is_ok(&reader.call(&lset(&key, "v2", &t2, &[]))), "the new holder fills");
            }
            _ => r.pass(),
        }
        assert!(!reader.has_reply(ms(50)), "{how}: a second reply to one read");
        drop(holder);
        drop(reader);
    }
    wait_until(secs(5), || c.stats().get("lease_timers") == 0);
    assert_settled(&mut c);
    let st = c.stats();
    assert_eq!(st.get("waiters_parked"), 3, "{st:?}");
    assert_eq!(st.get("waiters_woken") + st.get("wait_timeouts"), 3, "each parked read answered once: {st:?}");
}

/// Thousands of fills landing around the WAIT deadline (WAIT 2 ms, fill ~2 ms later): every read
/// gets exactly one reply, and the gauges return to zero.
#[test]
fn thousands_of_fills_racing_wait_deadlines_lose_no_reply() {
    let s = Server::start();
    let mut c = s.conn();
    let rounds = 1500;
    let mut holder = s.conn();
    let mut reader = Raw::open(&s, Proto::Resp2);
    let (mut hits, mut busy) = (0, 0);
    for i in 0..rounds {
        let key = format!("r{i}");
        let tok = take_lease(&mut holder, &key, 10_000);
        reader.send(&lget(&key, 10_000, Some(2)));
        // Spread the fills over both sides of the deadline.
        if i % 3 != 0 {
            sleep(Duration::from_micros(1500 + (i % 7) * 150));
        }
        let v = holder.run(&lset(&key, "v", &tok, &[]));
        assert!(is_ok(&v), "fill {i}: {v:?}");
        let r = reader.lease(secs(5), false);
        match r.status.as_str() {
            "HIT" => hits += 1,
            "BUSY" => busy += 1,
            other => panic!("round {i}: unexpected {other}: {r:?}"),
        }
    }
    assert!(!reader.has_reply(ms(50)), "an extra reply");
    assert_eq!(hits + busy, rounds);
    assert_settled(&mut c);
    let st = c.stats();
    assert_eq!(st.get("waiters_parked"), st.get("waiters_woken") + st.get("wait_timeouts"), "{st:?}");
    eprintln!("{rounds} rounds: {hits} HIT, {busy} BUSY, parked {}", st.get("waiters_parked"));
}

/// A holder parks on the key it holds (its read is the first waiter), then disconnects: the lease must
/// go to a live waiter at once, never to the dying read.
#[test]
fn holder_parked_on_its_own_key_hands_off_to_a_live_waiter() {
    let s = Server::start();
    let mut c = s.conn();
    // With a live waiter behind it.
    let mut holder = Raw::open(&s, Proto::Resp2);
    let _tok = parse_lr(&holder.call(&lget("own", 10_000, None)), false).fill();
    holder.send(&lget("own", 10_000, Some(8_000)));
    wait_stat(&mut c, "lease_waiters", 1, secs(5));
    let mut w = park(&s, &mut c, &lget("own", 10_000, Some(8_000)), 2);
    let t0 = Instant::now();
    drop(holder);
    let t2 = w.lease(secs(5), false).fill();
    assert!(t0.elapsed() < secs(3), "the live waiter got the lease only after {:?}", t0.elapsed());
    assert!(is_ok(&w.call(&lset("own", "v", &t2, &[]))));
    assert_eq!(c.get("own").as_deref(), Some(&b"v"[..]));
    drop(w);
    assert_settled(&mut c);

    // Alone: the key is free at once for the next reader.
    let mut holder = Raw::open(&s, Proto::Resp2);
    let _tok = parse_lr(&holder.call(&lget("alone", 10_000, None)), false).fill();
    holder.send(&lget("alone", 10_000, Some(8_000)));
    wait_stat(&mut c, "lease_waiters", 1, secs(5));
    drop(holder);
    wait_stat(&mut c, "leases", 0, secs(5));
    take_lease(&mut c, "alone", 10_000);
    let st = c.stats();
    assert_eq!(st.get("handoffs"), 1, "only the live waiter was handed a lease: {st:?}");
}

/// Lease and WAIT timers end with what they guard: 2,000 grants with a long LEASE and WAIT, each ended
/// by a fill, RELEASE, PASS or FLUSHALL, leave no timer armed (before, each kept its timer and key copy
/// for the whole LEASE).
#[test]
fn timers_end_with_their_lease() {
    let s = Server::start();
    let mut c = s.conn();
    let mut h = s.conn();
    for i in 0..2000 {
        let key = format!("t{i}");
        let tok = take_lease(&mut h, &key, 50_000);
        match i % 4 {
            0 => h.ok(&lset(&key, "v", &tok, &[])),
            1 => assert_eq!(h.int(&cmd!("TIERCACHE.RELEASE", &key, &tok)), 1),
            2 => assert_eq!(h.int(&cmd!("TIERCACHE.RELEASE", &key, &tok, "PASS")), 1),
            _ => h.ok(&cmd!("FLUSHALL")),
        }
    }
    // A parked read woken by the fill takes its WAIT timer with it.
    let tok = take_lease(&mut h, "p", 50_000);
    let mut w = park(&s, &mut c, &lget("p", 50_000, Some(50_000)), 1);
    assert_eq!(c.stats().get("lease_timers"), 2, "the lease's and the parked read's");
    h.ok(&lset("p", "v", &tok, &[]));
    w.lease(secs(5), false).hit("v");
    assert_settled(&mut c);
    assert_eq!(c.stats().get("leases_granted"), 2001);
}

fn lease_and_wait_caps(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    assert_eq!(c.config_get("tiercache.max-lease-ms"), "60000");
    assert_eq!(c.config_get("tiercache.max-wait-ms"), "60000");
    c.expect_err(&lget("k", 60_001, None), "ERR LEASE is above tiercache.max-lease-ms (60000)");
    c.expect_err(&lget("k", 1_000, Some(60_001)), "ERR WAIT is above tiercache.max-wait-ms (60000)");
    c.ok(&cmd!("CONFIG", "SET", "tiercache.max-lease-ms", "100"));
    c.ok(&cmd!("CONFIG", "SET", "tiercache.max-wait-ms", "50"));
    c.expect_err(&lget("k", 101, None), "ERR LEASE is above tiercache.max-lease-ms (100)");
    c.expect_err(&lget("k", 100, Some(51)), "ERR WAIT is above tiercache.max-wait-ms (50)");
    assert_eq!(c.stats().get("leases"), 0, "a refused read takes no lease");
    take_lease(&mut c, "k", 100);
    let e = c.err(&cmd!("CONFIG", "SET", "tiercache.max-lease-ms", "0"));
    assert!(e.contains("between 1 and"), "CONFIG SET below the bound: {e}");
}

/// Lease tokens are drawn from Redis's random bytes: the old ones were a splitmix64 mix of a Weyl
/// sequence, so unmixing two consecutive tokens showed the constant step and predicted the next.
#[test]
fn lease_tokens_are_not_a_sequence() {
    fn unxorshift(y: u64, s: u32) -> u64 {
        let mut x = y;
        for _ in 0..64 / s + 1 {
            x = y ^ (x >> s);
        }
        x
    }
    fn inverse(c: u64) -> u64 {
        let mut inv = c;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(c.wrapping_mul(inv)));
        }
        inv
    }
    fn unmix(z: u64) -> u64 {
        let z = unxorshift(z, 31).wrapping_mul(inverse(0x94D0_49BB_1331_11EB));
        let z = unxorshift(z, 27).wrapping_mul(inverse(0xBF58_476D_1CE4_E5B9));
        unxorshift(z, 30)
    }
    let s = Server::start();
    let mut c = s.conn();
    let tokens: Vec<u64> = (0..64)
        .map(|i| {
            let key = format!("tok{i}");
            let t = take_lease(&mut c, &key, 1_000);
            assert_eq!(c.int(&cmd!("TIERCACHE.RELEASE", &key, &t)), 1);
            t.parse().unwrap()
        })
        .collect();
    let steps: std::collections::HashSet<u64> = tokens.windows(2).map(|w| unmix(w[1]).wrapping_sub(unmix(w[0]))).collect();
    assert!(steps.len() > 60, "consecutive tokens unmix to a constant step: {steps:x?}");
    let distinct: std::collections::HashSet<u64> = tokens.iter().copied().collect();
    assert_eq!(distinct.len(), tokens.len());
    let high = tokens.iter().filter(|t| **t >> 63 == 1).count();
    assert!((8..=56).contains(&high), "the top bit is set in {high} of 64 tokens");
}

/// `CLIENT UNBLOCK` answers a parked read BUSY (or the UNBLOCKED error with ERROR), once, and takes its
/// WAIT timer with it.
fn client_unblock_of_a_parked_read(p: Proto) {
    let s = Server::start();
    let mut c = s.conn();
    let mut h = s.conn();
    let tok = take_lease(&mut h, "k", 50_000);
    for error in [false, true] {
        let mut w = Raw::open(&s, p);
        let id = as_int(&w.call(&cmd!("CLIENT", "ID"))).expect("client id");
        w.send(&lget("k", 50_000, Some(50_000)));
        wait_stat(&mut c, "lease_waiters", 1, secs(5));
        let mut unblock = cmd!("CLIENT", "UNBLOCK", id);
        if error {
            unblock.arg("ERROR");
        }
        assert_eq!(c.int(&unblock), 1, "CLIENT UNBLOCK of a parked read");
        let v = w.recv(secs(5));
        if error {
            assert!(matches!(&v, Value::ServerError(e) if e.code() == "UNBLOCKED"), "{v:?}");
        } else {
            parse_lr(&v, false).busy();
        }
        assert!(!w.has_reply(ms(50)), "one reply only");
        let st = c.stats();
        assert_eq!((st.get("lease_waiters"), st.get("lease_timers")), (0, 1), "only the lease's timer is left: {st:?}");
    }
    h.ok(&lset("k", "v", &tok, &[]));
    assert_settled(&mut c);
}
