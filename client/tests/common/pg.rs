//! A throwaway PostgreSQL for the tests that need one (client/tests/write_paths.rs, cli/tests: the
//! bridge, the warmer, write-behind): ONE cluster per test binary (initdb is slow), started on first
//! use, a database per test. Debian's binaries (/usr/lib/postgresql/<major>/bin); initdb refuses root,
//! so as root the cluster belongs to the `postgres` user and every pg_ctl/initdb runs through
//! `runuser`, like scripts/bench-e2e. Durability is off (`fsync`), commits stay synchronous so that an
//! immediate stop (the crash tests) loses no committed transaction. A watchdog shell stops the cluster
//! and removes its directory when the test process ends, however it ends (statics are never dropped).
//!
//! Include with `#[path = "common/pg.rs"] mod pg;` (client/tests) or
//! `#[path = "../../client/tests/common/pg.rs"] mod pg;` (cli/tests).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

pub struct Pg {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    found.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    found.pop().expect("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): scripts/test installs it")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local address").port()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

impl Pg {
    fn cmd(&self, prog: &str) -> Command {
        let p = self.bin.join(prog);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(p);
            c
        } else {
            Command::new(p)
        }
    }

    fn run(&self, mut c: Command, what: &str) {
        let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            panic!(
                "{what} failed: {}\n{}\n{}\nserver.log:\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn new() -> Pg {
        let bin = pg_bin();
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!("tiercache-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("create pg dir");
        std::fs::create_dir_all(dir.join("sock")).expect("create pg dir");
        if as_postgres {
            let ok = Command::new("chown").args(["-R", "postgres:"]).arg(&dir).status().map(|s| s.success()).unwrap_or(false);
            assert!(ok, "chown {} to postgres", dir.display());
        }
        let port = free_port();
        let pg = Pg { port, dir, bin, as_postgres };
        let mut init = pg.cmd("initdb");
        init.arg("-D").arg(pg.dir.join("data")).args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
        pg.run(init, "initdb");
        pg.start();
        // The watchdog: when this process is gone, stop the cluster and remove its directory.
        let stop = format!(
            "{}'{}' -D '{}' -m immediate -w stop",
            if as_postgres { "runuser -u postgres -- " } else { "" },
            pg.bin.join("pg_ctl").display(),
            pg.dir.join("data").display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = pg.dir.display()
        );
        // Outlives this process on purpose (that is its job); never waited for.
        #[allow(clippy::zombie_processes)]
        let _watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the watchdog");
        pg
    }

    pub fn start(&self) {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D").arg(self.dir.join("data")).arg("-l").arg(self.dir.join("server.log")).args(["-w", "-t", "60", "-o"]).arg(
            format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c track_commit_timestamp=on -c max_connections=200",
                self.port,
                self.dir.join("sock").display()
            ),
        );
        c.arg("start");
        self.run(c, "pg_ctl start");
    }

    /// A crash: immediate shutdown (no checkpoint; recovery at the next start).
    pub fn stop_immediate(&self) {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D").arg(self.dir.join("data")).args(["-m", "immediate", "-w", "stop"]);
        self.run(c, "pg_ctl stop");
    }

    pub fn dsn(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

static PG: OnceLock<Pg> = OnceLock::new();
/// Tests hold it shared; the one that restarts PostgreSQL holds it exclusively.
static RESTART: OnceLock<RwLock<()>> = OnceLock::new();

pub fn shared() -> &'static Pg {
    PG.get_or_init(Pg::new)
}

/// A fresh database in the shared cluster; keep the guard for the whole test.
pub async fn fresh_db(what: &str) -> (String, RwLockReadGuard<'static, ()>) {
    let guard = RESTART.get_or_init(|| RwLock::new(())).read().await;
    let db = new_db(what).await;
    (db, guard)
}

/// Same, for the test that restarts the cluster (runs alone).
pub async fn fresh_db_exclusive(what: &str) -> (String, RwLockWriteGuard<'static, ()>) {
    let guard = RESTART.get_or_init(|| RwLock::new(())).write().await;
    let db = new_db(what).await;
    (db, guard)
}

/// The DSN of database `name` on the shared cluster, created on first use (tests that share one
/// database by name).
pub async fn database(name: &str) -> String {
    let pg = shared();
    let admin = connect(&pg.dsn("postgres")).await;
    let exists =
        admin.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await.expect("query pg_database").is_some();
    if !exists {
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.expect("create database");
    }
    pg.dsn(name)
}

async fn new_db(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let pg = shared();
    let name = format!("t_{what}_{}", N.fetch_add(1, Ordering::SeqCst));
    let c = connect(&pg.dsn("postgres")).await;
    c.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
    pg.dsn(&name)
}

pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("connect {dsn}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// Connects, retrying for up to 30 s (while the cluster restarts).
pub async fn connect_retry(dsn: &str) -> tokio_postgres::Client {
    for _ in 0..300 {
        if let Ok((c, conn)) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("cannot connect to {dsn}");
}
