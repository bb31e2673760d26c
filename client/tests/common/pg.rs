//! A throwaway PostgreSQL for the write-path tests: one server per test binary, started on first use
//! (Debian's binaries under /usr/lib/postgresql/<major>/bin; initdb runs as the `postgres` user when
//! the tests run as root, since initdb refuses root), on a free loopback port, durability off. A
//! watchdog shell stops it (`pg_ctl stop -m immediate`) and removes its directory when the test
//! process exits, however it exits. Each test takes a database of its own with [`database`].
//!
//! Include with `#[path = "common/pg.rs"] mod pg;` (client/tests) or
//! `#[path = "../../client/tests/common/pg.rs"] mod pg;` (cli/tests).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub struct Pg {
    pub port: u16,
    pub dir: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|b| b.join("initdb").is_file()).collect())
        .unwrap_or_default();
    found.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    found.pop().expect(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): scripts/test installs it \
         (apt-get install postgresql)",
    )
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Runs `bin args...` as the postgres user when root, else as ourselves.
fn as_pg(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start() -> Pg {
    let bin = pg_bin();
    let dir = std::env::temp_dir().join(format!("tiercache-pg-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("sock")).unwrap();
    if is_root() {
        let ok = Command::new("chown").arg("-R").arg("postgres:").arg(&dir).status().unwrap().success();
        assert!(ok, "chown postgres {}", dir.display());
    }
    Command::new("chmod").arg("755").arg(&dir).status().unwrap();
    let data = dir.join("data");
    let out = as_pg(
        &bin.join("initdb"),
        &["-D", data.to_str().unwrap(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
    )
    .current_dir(&dir)
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
        dir.join("sock").display()
    );
    let log = dir.join("data/server.log");
    let out = as_pg(
        &bin.join("pg_ctl"),
        &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "-o", &opts, "start"],
    )
    .current_dir(&dir)
    .stdout(Stdio::null())
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "PostgreSQL did not start: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The watchdog: stops the server and removes the directory once this process is gone.
    let stop = if is_root() {
        format!("runuser -u postgres -- {}/pg_ctl -D {} -m immediate -w stop", bin.display(), data.display())
    } else {
        format!("{}/pg_ctl -D {} -m immediate -w stop", bin.display(), data.display())
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.3; done; cd /; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display()
    );
    // It outlives this process on purpose (it cleans up after it), so it is never waited for.
    #[allow(clippy::zombie_processes)]
    let _watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("watchdog");
    Pg { port, dir }
}

/// The test binary's server, started on first use.
pub fn server() -> &'static Pg {
    static PG: OnceLock<Pg> = OnceLock::new();
    PG.get_or_init(start)
}

/// The DSN of database `name` (created on first use) on the test binary's server.
pub async fn database(name: &str) -> String {
    let pg = server();
    let admin = connect(&format!("host=127.0.0.1 port={} user=postgres dbname=postgres", pg.port)).await;
    let exists = admin.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await.unwrap().is_some();
    if !exists {
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.unwrap();
    }
    format!("host=127.0.0.1 port={} user=postgres dbname={name}", pg.port)
}

/// Connects to `dsn`, driving the connection on the current runtime.
pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.expect("connect to the test PostgreSQL");
    tokio::spawn(conn);
    client
}
