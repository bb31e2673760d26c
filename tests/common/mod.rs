//! Shared harness for the tiercache integration tests: a `Server` guard that runs a real
//! `redis-server` with the module loaded (fresh port, fresh directory, killed and cleaned up on drop),
//! connection helpers for RESP2 and RESP3, and parsers for the module's replies.
//!
//! Every test starts its own server(s). The module is found through `TIERCACHE_MODULE`, else
//! `target/debug/libtiercache.so`, else `target/release/libtiercache.so` (run `cargo build` first).
//! Set `TIERCACHE_KEEP_DIRS=1` to keep the servers' directories (logs, RDB/AOF files) after a test.
#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use redis::Value;

/// Builds a `redis::Cmd` from a command name and arguments of any `ToRedisArgs` type
/// (`&str`, `&[u8]`, `Vec<u8>`, integers...): `cmd!("TIERCACHE.SET", "k", b"v", "PX", 100)`.
#[macro_export]
macro_rules! cmd {
    ($name:expr $(, $arg:expr)* $(,)?) => {{
        #[allow(unused_mut)]
        let mut c = ::redis::cmd($name);
        $( c.arg($arg); )*
        c
    }};
}

/// Generates `resp2::NAME` and `resp3::NAME` tests calling `NAME(Proto)` for each listed function.
#[macro_export]
macro_rules! proto_tests {
    ($($name:ident),* $(,)?) => {
        mod resp2 {
            $( #[test] fn $name() { super::$name($crate::common::Proto::Resp2) } )*
        }
        mod resp3 {
            $( #[test] fn $name() { super::$name($crate::common::Proto::Resp3) } )*
        }
    };
}

/// The server binary: `$REDIS_SERVER`, else `redis-server` from PATH (what scripts/test checked).
pub fn redis_server() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Field names of TIERCACHE.META, in the spec's order.
pub const META_FIELDS: [&str; 10] = [
    "state",
    "fresh_ttl_ms",
    "stale_ttl_ms",
    "fresh_until_ms",
    "expire_at_ms",
    "tags",
    "encoding",
    "size",
    "stored_size",
    "created_ms",
];

/// Field names of TIERCACHE.STATS (and of `INFO tiercache`), in the spec's order.
pub const STATS_FIELDS: [&str; 32] = [
    "entries",
    "compressed_entries",
    "bytes_original",
    "bytes_stored",
    "hits",
    "misses",
    "sets",
    "tags",
    "tag_index_entries",
    "index_longest_op_us",
    "index_longest_op_steps",
    "invalidations",
    "invalidation_messages",
    "reclaim_pending",
    "reclaimed",
    "reclaim_ticks",
    "reclaim_max_tick_us",
    "stale_served",
    "leases",
    "lease_waiters",
    "lease_timers",
    "leases_granted",
    "waiters_parked",
    "waiters_woken",
    "wait_timeouts",
    "handoffs",
    "lease_timeouts",
    "passes",
    "fenced",
    "early_refreshes",
    "cluster_pending",
    "cluster_timeouts",
];

pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Path of the module under test.
pub fn module_path() -> PathBuf {
    if let Ok(p) = std::env::var("TIERCACHE_MODULE") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "TIERCACHE_MODULE={} does not exist", p.display());
        return p;
    }
    // The workspace root: this file is also compiled into client/tests, one level down.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if manifest.join("core").is_dir() { manifest } else { manifest.parent().unwrap_or(manifest) };
    for profile in ["debug", "release"] {
        let p = root.join("target").join(profile).join("libtiercache.so");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "libtiercache.so not found under {}/target/{{debug,release}}: run cargo build first \
         (or set TIERCACHE_MODULE=/abs/path/libtiercache.so)",
        root.display()
    );
}

/// Which protocol a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Resp2,
    Resp3,
}

fn fresh_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    let dir = std::env::temp_dir().join(format!("tiercache-test-{}-{}-{}", std::process::id(), n, nanos));
    fs::create_dir_all(&dir).expect("create server dir");
    dir
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// How to start a server. `Server::builder()...start()`.
#[derive(Clone, Debug, Default)]
pub struct ServerBuilder {
    module_args: Vec<String>,
    args: Vec<String>,
    conf_lines: Vec<String>,
    no_loadmodule: bool,
    replica_of: Option<u16>,
    /// A fixed port instead of a free one (the cluster harness needs port + 10000 free too).
    port: Option<u16>,
}

impl ServerBuilder {
    /// Arguments after `--loadmodule <path>` (e.g. `["compress-min-size", "64"]`).
    pub fn module_args(mut self, a: &[&str]) -> Self {
        self.module_args.extend(a.iter().map(|s| s.to_string()));
        self
    }

    /// Extra redis-server command-line arguments, placed after `--loadmodule ...` (so
    /// `--tiercache.max-tags 3` works), e.g. `["--appendonly", "yes"]`. Later ones override the defaults.
    pub fn args(mut self, a: &[&str]) -> Self {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }

    /// Lines of a redis.conf written into the server's directory and passed as the config file.
    pub fn conf_lines(mut self, lines: &[&str]) -> Self {
        self.conf_lines.extend(lines.iter().map(|s| s.to_string()));
        self
    }

    /// Do not add `--loadmodule` on the command line (the config file does it).
    pub fn no_loadmodule(mut self) -> Self {
        self.no_loadmodule = true;
        self
    }

    /// Listen on `port` (no retry on another port if it is taken).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Start as a replica of `master`; `start()` then waits for `master_link_status:up`.
    pub fn replica_of(mut self, master: &Server) -> Self {
        self.replica_of = Some(master.port);
        self
    }

    pub fn start(self) -> Server {
        match self.try_start() {
            Ok(s) => s,
            Err(e) => panic!("redis-server did not start: {e}"),
        }
    }

    /// Starts the server; `Err(log)` when redis-server exits (or does not answer PING in time).
    pub fn try_start(self) -> Result<Server, String> {
        let module = if self.no_loadmodule && self.conf_lines.is_empty() { None } else { Some(module_path()) };
        let dir = fresh_dir();
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let mut server = Server {
                port: self.port.unwrap_or_else(free_port),
                dir: dir.clone(),
                child: None,
                builder: self.clone(),
                module: module.clone().unwrap_or_default(),
                keep_dir: std::env::var_os("TIERCACHE_KEEP_DIRS").is_some(),
            };
            match server.spawn_and_wait() {
                Ok(()) => {
                    if self.replica_of.is_some() {
                        server.wait_link_up();
                    }
                    return Ok(server);
                }
                Err(e) => {
                    let in_use = e.contains("Address already in use");
                    last_err = e;
                    // Drop removes the directory unless we retry; keep it for the retry.
                    server.keep_dir = true;
                    drop(server);
                    if !in_use || self.port.is_some() {
                        break;
                    }
                }
            }
        }
        if std::env::var_os("TIERCACHE_KEEP_DIRS").is_none() {
            let _ = fs::remove_dir_all(&dir);
        }
        Err(last_err)
    }
}

/// A running redis-server with the module loaded. Killed (and its directory removed) on drop.
pub struct Server {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    builder: ServerBuilder,
    module: PathBuf,
    keep_dir: bool,
}

impl Server {
    /// A server with the module loaded and no extra arguments.
    pub fn start() -> Server {
        Server::builder().start()
    }

    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// The server's log file so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn command_line(&self) -> Vec<String> {
        let b = &self.builder;
        let mut a: Vec<String> = Vec::new();
        if !b.conf_lines.is_empty() {
            let conf = self.dir.join("redis.conf");
            let mut text = String::new();
            if !b.no_loadmodule {
                text.push_str(&format!("loadmodule {}", self.module.display()));
                for m in &b.module_args {
                    text.push(' ');
                    text.push_str(m);
                }
                text.push('\n');
            }
            for l in &b.conf_lines {
                text.push_str(l);
                text.push('\n');
            }
            fs::write(&conf, text).expect("write redis.conf");
            a.push(conf.display().to_string());
        }
        let dir = self.dir.display().to_string();
        let log = self.log_path().display().to_string();
        let port = self.port.to_string();
        for s in [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
            "--logfile",
            &log,
            "--daemonize",
            "no",
            "--enable-debug-command",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ] {
            a.push(s.to_string());
        }
        if b.conf_lines.is_empty() && !b.no_loadmodule {
            a.push("--loadmodule".into());
            a.push(self.module.display().to_string());
            a.extend(b.module_args.iter().cloned());
        }
        if let Some(mp) = b.replica_of {
            a.extend(["--replicaof".to_string(), "127.0.0.1".to_string(), mp.to_string()]);
        }
        a.extend(b.args.iter().cloned());
        a
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let args = self.command_line();
        let child = Command::new(redis_server())
            .args(&args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", redis_server()))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("redis-server exited with {status} (args {args:?}); log:\n{}", self.log()));
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server did not answer PING within {READY_TIMEOUT:?}; log:\n{}", self.log()));
            }
            sleep(ms(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url(Proto::Resp2)) else { return false };
        let Ok(mut con) = client.get_connection_with_timeout(ms(500)) else { return false };
        let _ = con.set_read_timeout(Some(ms(1000)));
        matches!(redis::cmd("PING").query::<String>(&mut con), Ok(ref s) if s == "PONG")
    }

    pub fn url(&self, p: Proto) -> String {
        match p {
            Proto::Resp2 => format!("redis://127.0.0.1:{}/", self.port),
            Proto::Resp3 => format!("redis://127.0.0.1:{}/?protocol=resp3", self.port),
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// The process id (None once stopped or killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Writes `request` (raw RESP or inline commands) on a fresh TCP connection and returns every byte
    /// read until the reply ends with `until` (panics after 10 s): for checking replies byte for byte.
    pub fn raw_exchange(&self, request: &[u8], until: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
        s.write_all(request).expect("write");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.ends_with(until) {
            assert!(
                Instant::now() < deadline,
                "no {:?} within 10 s: {:?}",
                String::from_utf8_lossy(until),
                String::from_utf8_lossy(&out)
            );
            match s.read(&mut buf) {
                Ok(0) => panic!("connection closed: {:?}", String::from_utf8_lossy(&out)),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        out
    }

    /// A RESP2 connection.
    pub fn conn(&self) -> Conn {
        self.conn_proto(Proto::Resp2)
    }

    /// A RESP3 connection (HELLO 3).
    pub fn conn3(&self) -> Conn {
        self.conn_proto(Proto::Resp3)
    }

    pub fn conn_proto(&self, p: Proto) -> Conn {
        let client = redis::Client::open(self.url(p)).expect("client");
        let con = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{}: {e}", self.port));
        con.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        con.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn { con, proto: p }
    }

    /// Graceful stop: SHUTDOWN NOSAVE, then wait for the process (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Ok(client) = redis::Client::open(self.url(Proto::Resp2)) {
            if let Ok(mut con) = client.get_connection_with_timeout(ms(1000)) {
                let _ = con.set_read_timeout(Some(ms(5000)));
                let _ = redis::cmd("SHUTDOWN").arg("NOSAVE").query::<Value>(&mut con);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let child = self.child.as_mut().unwrap();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            sleep(ms(10));
        }
        self.child = None;
    }

    /// SIGKILL, no shutdown work at all.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server and starts it again on the same port and directory with the same arguments
    /// (so it loads dump.rdb / the AOF it left behind).
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!("restart failed: {e}");
        }
        if self.builder.replica_of.is_some() {
            self.wait_link_up();
        }
    }

    /// Like `restart`, adding command-line arguments (they override earlier ones).
    pub fn restart_with_args(&mut self, extra: &[&str]) {
        self.builder.args.extend(extra.iter().map(|s| s.to_string()));
        self.restart();
    }

    /// Starts a fresh replica of this server (own port and directory) and waits for the link, on both
    /// sides: after a diskless sync the master puts a replica online only on its first ACK (sent once a
    /// second), and until then WAIT cannot count it.
    pub fn start_replica(&self, builder: ServerBuilder) -> Server {
        let replica = builder.replica_of(self).start();
        self.wait_replica_online(replica.port);
        replica
    }

    /// Waits (bounded) until this master lists the replica on `port` as `state=online` and the
    /// replica has acknowledged the stream once (the master may hold the command stream back until
    /// the replica's first ACK, which can take up to a second; later WAITs are then immediate).
    pub fn wait_replica_online(&self, port: u16) {
        let mut c = self.conn();
        let needle = format!("port={port},state=online");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let info = c.info("replication");
            if info.contains(&needle) {
                break;
            }
            assert!(Instant::now() < deadline, "replica :{port} not online on the master:\n{info}");
            sleep(ms(20));
        }
        // WAIT needs a write of this client to wait for: a scratch key, set and deleted.
        c.ok(&cmd!("SET", "__harness_sync__", "1"));
        c.int(&cmd!("DEL", "__harness_sync__"));
        let acked = c.int(&cmd!("WAIT", 1, 5000));
        assert!(acked >= 1, "replica :{port} did not acknowledge the master within 5 s");
    }

    /// Waits (bounded) until `INFO replication` shows `master_link_status:up`.
    pub fn wait_link_up(&self) {
        let mut c = self.conn();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let info = c.info("replication");
            if info.contains("master_link_status:up") {
                // A replica that finished the sync but is still loading answers -LOADING.
                if !c.info("persistence").contains("loading:1") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "replica link not up after {READY_TIMEOUT:?}:\n{info}\nlog:\n{}", self.log());
            sleep(ms(20));
        }
    }

    /// Waits (bounded) until no BGSAVE / AOF rewrite is running.
    pub fn wait_no_background_job(&self) {
        let mut c = self.conn();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let info = c.info("persistence");
            let busy = info.contains("rdb_bgsave_in_progress:1")
                || info.contains("aof_rewrite_in_progress:1")
                || info.contains("aof_rewrite_scheduled:1");
            if !busy {
                return;
            }
            assert!(Instant::now() < deadline, "background job still running:\n{info}");
            sleep(ms(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- redis-server :{} log tail ({}) ---\n{}", self.port, self.dir.display(), tail.join("\n"));
        }
        self.kill();
        if !self.keep_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A connection plus helpers that panic with context on I/O errors and hand back server errors as text.
pub struct Conn {
    pub con: redis::Connection,
    pub proto: Proto,
}

/// Full text of a server error as Redis sent it (`CODE detail`).
pub fn error_text(e: &redis::ServerError) -> String {
    match e.details() {
        Some(d) => format!("{} {}", e.code(), d),
        None => e.code().to_string(),
    }
}

impl Conn {
    /// Sends a command; server errors come back as `Value::ServerError`.
    pub fn raw(&mut self, c: &redis::Cmd) -> Value {
        use redis::ConnectionLike;
        match self.con.req_command(c) {
            Ok(v) => v,
            Err(e) => panic!("I/O error on {:?}: {e}", cmd_text(c)),
        }
    }

    /// Sends a command and returns `Ok(reply)` or `Err(error text)`.
    pub fn try_run(&mut self, c: &redis::Cmd) -> Result<Value, String> {
        match self.raw(c) {
            Value::ServerError(e) => Err(error_text(&e)),
            v => Ok(v),
        }
    }

    /// Sends a command that must succeed.
    pub fn run(&mut self, c: &redis::Cmd) -> Value {
        match self.try_run(c) {
            Ok(v) => v,
            Err(e) => panic!("{:?} failed: {e}", cmd_text(c)),
        }
    }

    /// Sends a command that must reply +OK.
    pub fn ok(&mut self, c: &redis::Cmd) {
        let v = self.run(c);
        assert!(is_ok(&v), "{:?}: expected OK, got {v:?}", cmd_text(c));
    }

    /// Sends a command that must fail; returns the error text.
    pub fn err(&mut self, c: &redis::Cmd) -> String {
        match self.try_run(c) {
            Err(e) => e,
            Ok(v) => panic!("{:?}: expected an error, got {v:?}", cmd_text(c)),
        }
    }

    /// Sends a command that must fail with exactly `expected`.
    pub fn expect_err(&mut self, c: &redis::Cmd, expected: &str) {
        let got = self.err(c);
        assert_eq!(got, expected, "error text of {:?}", cmd_text(c));
    }

    pub fn int(&mut self, c: &redis::Cmd) -> i64 {
        let v = self.run(c);
        as_int(&v).unwrap_or_else(|| panic!("{:?}: expected an integer, got {v:?}", cmd_text(c)))
    }

    /// A bulk/simple string reply, `None` for nil.
    pub fn bytes(&mut self, c: &redis::Cmd) -> Option<Vec<u8>> {
        let v = self.run(c);
        match v {
            Value::Nil => None,
            ref other => Some(as_bytes(other).unwrap_or_else(|| panic!("{:?}: expected a string, got {v:?}", cmd_text(c)))),
        }
    }

    pub fn string(&mut self, c: &redis::Cmd) -> Option<String> {
        self.bytes(c).map(|b| String::from_utf8(b).expect("utf8 reply"))
    }

    /// TIERCACHE.GET key (plain), `None` for nil.
    pub fn get(&mut self, key: impl redis::ToRedisArgs) -> Option<Vec<u8>> {
        let c = cmd!("TIERCACHE.GET", key);
        let v = self.run(&c);
        match v {
            Value::Nil => None,
            Value::BulkString(b) => Some(b),
            other => panic!("TIERCACHE.GET: expected bulk string or nil, got {other:?}"),
        }
    }

    /// TIERCACHE.GET key ENCODED -> (encoding, stored bytes), `None` for nil.
    pub fn get_encoded(&mut self, key: impl redis::ToRedisArgs) -> Option<(String, Vec<u8>)> {
        let v = self.run(&cmd!("TIERCACHE.GET", key, "ENCODED"));
        match v {
            Value::Nil => None,
            Value::Array(ref items) if items.len() == 2 => {
                let enc = as_bytes(&items[0]).unwrap_or_else(|| panic!("GET ENCODED encoding: {v:?}"));
                let data = match &items[1] {
                    Value::BulkString(b) => b.clone(),
                    other => panic!("GET ENCODED bytes must be a bulk string, got {other:?}"),
                };
                Some((String::from_utf8(enc).unwrap(), data))
            }
            other => panic!("TIERCACHE.GET ENCODED: expected nil or a 2-element array, got {other:?}"),
        }
    }

    /// TIERCACHE.META key, checking the reply's shape for this connection's protocol.
    pub fn meta(&mut self, key: impl redis::ToRedisArgs) -> Option<Meta> {
        let v = self.run(&cmd!("TIERCACHE.META", key));
        if v == Value::Nil {
            return None;
        }
        let pairs = pairs(&v, &META_FIELDS, self.proto, "TIERCACHE.META");
        Some(Meta::from_pairs(&pairs))
    }

    /// TIERCACHE.STATS as (name, value) pairs, checking shape and field order.
    pub fn stats(&mut self) -> Stats {
        let v = self.run(&cmd!("TIERCACHE.STATS"));
        let pairs = pairs(&v, &STATS_FIELDS, self.proto, "TIERCACHE.STATS");
        Stats(
            pairs
                .into_iter()
                .map(|(k, v)| (k.clone(), as_int(&v).unwrap_or_else(|| panic!("STATS {k} not an integer: {v:?}"))))
                .collect(),
        )
    }

    /// INFO <section> as text.
    pub fn info(&mut self, section: &str) -> String {
        let v = self.run(&cmd!("INFO", section));
        match v {
            Value::BulkString(b) => String::from_utf8(b).unwrap(),
            Value::VerbatimString { text, .. } => text,
            Value::SimpleString(s) => s,
            other => panic!("INFO: unexpected reply {other:?}"),
        }
    }

    /// TIERCACHE.SET key value [opts...] that must reply OK.
    pub fn set(&mut self, key: impl redis::ToRedisArgs, value: impl redis::ToRedisArgs, opts: &[&str]) {
        let mut c = cmd!("TIERCACHE.SET", key, value);
        for o in opts {
            c.arg(*o);
        }
        self.ok(&c);
    }

    pub fn pttl(&mut self, key: impl redis::ToRedisArgs) -> i64 {
        self.int(&cmd!("PTTL", key))
    }

    pub fn exists(&mut self, key: impl redis::ToRedisArgs) -> bool {
        self.int(&cmd!("EXISTS", key)) == 1
    }

    pub fn config_get(&mut self, name: &str) -> String {
        let v = self.run(&cmd!("CONFIG", "GET", name));
        let items: Vec<Value> = match v {
            Value::Array(items) => items,
            Value::Map(kv) => kv.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            other => panic!("CONFIG GET {name}: {other:?}"),
        };
        assert_eq!(items.len(), 2, "CONFIG GET {name}: {items:?}");
        assert_eq!(as_string(&items[0]).as_deref(), Some(name));
        as_string(&items[1]).unwrap()
    }

    pub fn select(&mut self, db: i64) {
        self.ok(&cmd!("SELECT", db));
    }
}

pub fn cmd_text(c: &redis::Cmd) -> String {
    let mut parts = Vec::new();
    for a in c.args_iter() {
        if let redis::Arg::Simple(b) = a {
            if b.len() > 60 {
                // Cut the bytes, not the text: a lossy conversion of binary data has multi-byte characters.
                parts.push(format!("{}...({} bytes)", String::from_utf8_lossy(&b[..40]), b.len()));
            } else {
                parts.push(String::from_utf8_lossy(b).into_owned());
            }
        }
    }
    parts.join(" ")
}

pub fn is_ok(v: &Value) -> bool {
    matches!(v, Value::Okay) || matches!(v, Value::SimpleString(s) if s == "OK")
}

pub fn as_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub fn as_string(v: &Value) -> Option<String> {
    as_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// Elements of an array-like reply (Array or Set).
pub fn as_list(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// Name/value pairs of a reply that is a flat array (RESP2) or a map (RESP3), checked against the
/// expected field names and order.
pub fn pairs(v: &Value, fields: &[&str], proto: Proto, what: &str) -> Vec<(String, Value)> {
    let pairs: Vec<(String, Value)> = match (proto, v) {
        (Proto::Resp2, Value::Array(items)) => {
            assert!(items.len() % 2 == 0, "{what}: RESP2 flat array of odd length: {v:?}");
            items
                .chunks(2)
                .map(|kv| (as_string(&kv[0]).unwrap_or_else(|| panic!("{what}: name not a string: {v:?}")), kv[1].clone()))
                .collect()
        }
        (Proto::Resp3, Value::Map(kv)) => kv
            .iter()
            .map(|(k, v2)| (as_string(k).unwrap_or_else(|| panic!("{what}: name not a string: {v:?}")), v2.clone()))
            .collect(),
        (Proto::Resp2, _) => panic!("{what}: RESP2 reply must be a flat array, got {v:?}"),
        (Proto::Resp3, _) => panic!("{what}: RESP3 reply must be a map, got {v:?}"),
    };
    let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, fields, "{what}: field names and order");
    pairs
}

/// A parsed TIERCACHE.META reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub state: String,
    pub fresh_ttl_ms: i64,
    pub stale_ttl_ms: i64,
    pub fresh_until_ms: i64,
    pub expire_at_ms: i64,
    pub tags: Vec<Vec<u8>>,
    pub encoding: String,
    pub size: i64,
    pub stored_size: i64,
    pub created_ms: i64,
}

/// The META fields that do not count down with the clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StableMeta {
    pub state: String,
    pub fresh_until_ms: i64,
    pub expire_at_ms: i64,
    pub tags: Vec<Vec<u8>>,
    pub encoding: String,
    pub size: i64,
    pub stored_size: i64,
    pub created_ms: i64,
}

impl Meta {
    fn from_pairs(p: &[(String, Value)]) -> Meta {
        let int = |i: usize| as_int(&p[i].1).unwrap_or_else(|| panic!("META {} not an integer: {:?}", p[i].0, p[i].1));
        let s = |i: usize| as_string(&p[i].1).unwrap_or_else(|| panic!("META {} not a string: {:?}", p[i].0, p[i].1));
        let tags = match &p[5].1 {
            Value::Array(items) => items
                .iter()
                .map(|t| match t {
                    Value::BulkString(b) => b.clone(),
                    other => panic!("META tag not a bulk string: {other:?}"),
                })
                .collect(),
            other => panic!("META tags must be an array, got {other:?}"),
        };
        Meta {
            state: s(0),
            fresh_ttl_ms: int(1),
            stale_ttl_ms: int(2),
            fresh_until_ms: int(3),
            expire_at_ms: int(4),
            tags,
            encoding: s(6),
            size: int(7),
            stored_size: int(8),
            created_ms: int(9),
        }
    }

    pub fn stable(&self) -> StableMeta {
        StableMeta {
            state: self.state.clone(),
            fresh_until_ms: self.fresh_until_ms,
            expire_at_ms: self.expire_at_ms,
            tags: self.tags.clone(),
            encoding: self.encoding.clone(),
            size: self.size,
            stored_size: self.stored_size,
            created_ms: self.created_ms,
        }
    }

    pub fn tags_str(&self) -> Vec<String> {
        self.tags.iter().map(|t| String::from_utf8_lossy(t).into_owned()).collect()
    }
}

/// A parsed TIERCACHE.STATS reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats(pub Vec<(String, i64)>);

impl Stats {
    pub fn get(&self, name: &str) -> i64 {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {name} in {self:?}"))
    }
}

/// Fields of one INFO section (`# name` header), as (field, value) in order.
pub fn info_section_fields(info: &str, section: &str) -> Option<Vec<(String, String)>> {
    let mut in_section = false;
    let mut found = false;
    let mut out = Vec::new();
    for line in info.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(h) = line.strip_prefix("# ") {
            in_section = h.trim().eq_ignore_ascii_case(section);
            found |= in_section;
            continue;
        }
        if in_section && !line.is_empty() {
            if let Some((k, v)) = line.split_once(':') {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    found.then_some(out)
}

/// The value of `field:` anywhere in an INFO text.
pub fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix(&format!("{field}:")).map(str::to_string))
}

/// Text compressible by lz4 well beyond 10 %, `n` bytes long.
pub fn compressible(n: usize) -> Vec<u8> {
    let pat = b"{\"user\":1234,\"name\":\"tiercache\",\"tags\":[\"a\",\"b\"]},";
    pat.iter().cycle().take(n).copied().collect()
}

/// Pseudo-random bytes (xorshift), incompressible by lz4.
pub fn incompressible(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The tiercache lz4 frame of `v` (4-byte LE length + lz4 block).
pub fn lz4_frame(v: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress_prepend_size(v)
}

pub fn lz4_unframe(frame: &[u8]) -> Vec<u8> {
    lz4_flex::block::decompress_size_prepended(frame).expect("valid lz4 frame")
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        sleep(ms(20));
    }
}

/// Asserts `a` is within `tol` of `b`.
#[track_caller]
pub fn assert_near(a: i64, b: i64, tol: i64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: {a} not within {tol} of {b}");
}

// ---------------------------------------------------------------------------------------------
// A fixture of varied entries shared by the persistence and replication tests.

/// Keys written by `populate`, as (db, key).
pub fn fixture_keys() -> Vec<(i64, Vec<u8>)> {
    let mut v: Vec<(i64, Vec<u8>)> = [
        "plain",
        "ttl",
        "lz4",
        "client_lz4",
        "empty",
        "nocomp",
        "stale",
        "persisted",
        "kept",
        "natexp",
        "renamed",
        "over",
        "created0",
        "exat",
    ]
    .iter()
    .map(|k| (0, k.as_bytes().to_vec()))
    .collect();
    v.push((0, b"bin\0key\xff".to_vec()));
    v.push((3, b"other".to_vec()));
    v.push((3, b"moved".to_vec()));
    v
}

/// Keys that must not exist after `populate` (deleted, renamed away, moved away).
pub fn absent_keys() -> Vec<(i64, Vec<u8>)> {
    vec![(0, b"deleted".to_vec()), (0, b"rename_src".to_vec()), (0, b"moved".to_vec()), (0, b"expired".to_vec())]
}

/// Writes a mix of entries through the commands a client would use, including native TTL commands.
pub fn populate(c: &mut Conn) {
    c.set("plain", "hello", &[]);
    c.set("ttl", "v", &["PX", "100000", "STALE", "50", "TAGS", "2", "a", "b"]);
    c.ok(&cmd!("TIERCACHE.SET", "lz4", compressible(5000), "EX", 1000, "TAGS", 1, "big"));
    c.ok(&cmd!("TIERCACHE.SET", "client_lz4", lz4_frame(&compressible(2000)), "ENCODING", "lz4", "CREATED", 1234));
    c.ok(&cmd!("TIERCACHE.SET", &b"bin\0key\xff"[..], &b"\0\xff\0"[..], "TAGS", 2, &b"t\0"[..], &b"\xff"[..]));
    c.set("empty", "", &[]);
    c.ok(&cmd!("TIERCACHE.SET", "nocomp", compressible(3000), "NOCOMPRESS"));
    c.set("stale", "s", &["PX", "100", "STALE", "100", "TAGS", "1", "st"]);
    c.set("persisted", "p", &["PX", "100000", "STALE", "10"]);
    assert_eq!(c.int(&cmd!("PERSIST", "persisted")), 1);
    c.set("kept", "k1", &["PX", "100000", "STALE", "100"]);
    c.set("kept", "k2", &["PX", "50000", "KEEPTTL", "TAGS", "1", "kk"]);
    c.set("natexp", "n", &[]);
    assert_eq!(c.int(&cmd!("EXPIRE", "natexp", 300)), 1);
    c.set("rename_src", "r", &["PX", "90000", "TAGS", "1", "rn"]);
    c.ok(&cmd!("RENAME", "rename_src", "renamed"));
    c.ok(&cmd!("TIERCACHE.SET", "over", compressible(4000), "TAGS", 1, "old"));
    c.set("over", "new", &["EX", "500"]);
    c.set("deleted", "d", &[]);
    assert_eq!(c.int(&cmd!("DEL", "deleted")), 1);
    c.set("expired", "e", &["PX", "50"]);
    c.set("created0", "c", &["CREATED", "0"]);
    let exat = now_ms() / 1000 + 3600;
    c.set("exat", "x", &["EXAT", &exat.to_string(), "STALE", "60"]);
    c.ok(&cmd!("SET", "native", "string"));
    c.select(3);
    c.set("other", "in db 3", &["TAGS", "1", "x"]);
    c.select(0);
    c.set("moved", "m", &["PX", "80000", "STALE", "5"]);
    assert_eq!(c.int(&cmd!("MOVE", "moved", 3)), 1);
    // Let "stale" become stale and "expired" expire.
    sleep(ms(200));
    c.select(0);
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snap {
    pub db: i64,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub encoded: Option<(String, Vec<u8>)>,
    pub meta: StableMeta,
    pub pttl: i64,
}

pub fn snapshot(c: &mut Conn) -> Vec<Snap> {
    let mut out = Vec::new();
    for (db, key) in fixture_keys() {
        c.select(db);
        let meta = c.meta(&key[..]).unwrap_or_else(|| panic!("db {db} key {:?} missing", String::from_utf8_lossy(&key)));
        out.push(Snap {
            db,
            key: key.clone(),
            value: c.get(&key[..]),
            encoded: c.get_encoded(&key[..]),
            meta: meta.stable(),
            pttl: c.pttl(&key[..]),
        });
    }
    c.select(0);
    out
}

pub fn aggregate_stats(c: &mut Conn) -> Vec<i64> {
    let st = c.stats();
    ["entries", "compressed_entries", "bytes_original", "bytes_stored"].iter().map(|f| st.get(f)).collect()
}

/// Checks the fixture after a reload against the snapshot taken before it.
pub fn check_against(c: &mut Conn, before: &[Snap], stats_before: &[i64]) {
    let after = snapshot(c);
    let now = now_ms();
    for (b, a) in before.iter().zip(after.iter()) {
        let name = format!("db {} key {:?}", b.db, String::from_utf8_lossy(&b.key));
        assert_eq!(a.meta, b.meta, "{name}: META changed");
        assert_eq!(a.value, b.value, "{name}: value changed");
        assert_eq!(a.encoded, b.encoded, "{name}: stored bytes changed");
        if b.meta.expire_at_ms == -1 {
            assert_eq!(a.pttl, -1, "{name}: gained a TTL");
        } else {
            assert_near(a.pttl, b.meta.expire_at_ms - now, 250, &format!("{name}: PTTL after reload"));
        }
    }
    for (db, key) in absent_keys() {
        c.select(db);
        assert!(!c.exists(&key[..]), "db {db} key {:?} came back", String::from_utf8_lossy(&key));
    }
    c.select(0);
    assert_eq!(c.string(&cmd!("GET", "native")).as_deref(), Some("string"));
    assert_eq!(aggregate_stats(c), stats_before, "STATS entries/compressed/bytes after reload");
}

/// Sanity checks on the fixture itself (so a reload comparison is not vacuous).
pub fn check_fixture(snap: &[Snap]) {
    let get = |k: &str| snap.iter().find(|s| s.key == k.as_bytes()).unwrap();
    assert_eq!(get("lz4").meta.encoding, "lz4");
    assert_eq!(get("client_lz4").meta.encoding, "lz4");
    assert_eq!(get("client_lz4").meta.created_ms, 1234);
    assert_eq!(get("stale").meta.state, "stale");
    assert_eq!(get("stale").value, None);
    assert_eq!(get("ttl").meta.tags, vec![b"a".to_vec(), b"b".to_vec()]);
    assert!(get("persisted").meta.fresh_until_ms > 0);
    assert_eq!(get("persisted").meta.expire_at_ms, -1);
    assert!(get("kept").meta.expire_at_ms > get("kept").meta.fresh_until_ms + 50_000);
    assert!(get("natexp").meta.expire_at_ms > 0 && get("natexp").meta.fresh_until_ms == -1);
    assert_eq!(get("exat").meta.expire_at_ms, get("exat").meta.fresh_until_ms + 60_000);
    assert_eq!(get("created0").meta.created_ms, 0);
}

/// Compares two snapshots of the fixture taken at about the same time (e.g. master and replica).
pub fn compare_snapshots(a: &[Snap], b: &[Snap], what: &str) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b.iter()) {
        let name = format!("{what}: db {} key {:?}", x.db, String::from_utf8_lossy(&x.key));
        assert_eq!(y.meta, x.meta, "{name}: META differs");
        assert_eq!(y.value, x.value, "{name}: value differs");
        assert_eq!(y.encoded, x.encoded, "{name}: stored bytes differ");
        if x.pttl == -1 {
            assert_eq!(y.pttl, -1, "{name}: PTTL");
        } else {
            assert_near(y.pttl, x.pttl, 200, &format!("{name}: PTTL"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pipelining (added for tests/tags.rs).

impl Conn {
    /// Sends `cmds` in pipelines of at most 500 commands and returns every reply in order; server
    /// errors come back as `Value::ServerError` (never a panic), I/O errors panic.
    pub fn pipeline(&mut self, cmds: &[redis::Cmd]) -> Vec<Value> {
        use redis::ConnectionLike;
        let mut out = Vec::with_capacity(cmds.len());
        for chunk in cmds.chunks(500) {
            let mut packed = Vec::new();
            for c in chunk {
                c.write_packed_command(&mut packed);
            }
            match self.con.req_packed_commands(&packed, 0, chunk.len()) {
                Ok(v) => {
                    assert_eq!(v.len(), chunk.len(), "pipeline: reply count");
                    out.extend(v);
                }
                Err(e) => panic!("I/O error on a pipeline of {} commands (first {:?}): {e}", chunk.len(), cmd_text(&chunk[0])),
            }
        }
        out
    }

    /// Pipelines `cmds` and asserts none of them failed; returns the replies.
    pub fn pipeline_ok(&mut self, cmds: &[redis::Cmd]) -> Vec<Value> {
        let replies = self.pipeline(cmds);
        for (c, v) in cmds.iter().zip(&replies) {
            if let Value::ServerError(e) = v {
                panic!("{:?} failed in a pipeline: {}", cmd_text(c), error_text(e));
            }
        }
        replies
    }
}
