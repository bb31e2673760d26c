//! Harness of the cli tests: processes killed on drop (varnishd, prometheus, the `tiercache` binary),
//! temporary directories, free loopback ports, bounded waits, and small HTTP servers (an origin, a
//! recording fake CDN API) on 127.0.0.1.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port()
}

/// A fresh directory, removed on drop (kept with TIERCACHE_KEEP_DIRS=1).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tiercache-{what}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TIERCACHE_KEEP_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed (and reaped) on drop. Its output goes to `log`.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name: name.to_string(), child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.log_text());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tiercache")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// `tiercache <args>` with its log in `dir`.
pub fn tiercache(dir: &TempDir, name: &str, args: &[&str]) -> Proc {
    Proc::spawn(name, Command::new(bin()).args(args), dir.path().join(format!("{name}.log")))
}

/// varnishd in the foreground on a free loopback port, with monitoring/varnish.vcl pointed at
/// `origin_port`, its working directory (-n) in `dir`.
pub struct Varnish {
    pub port: u16,
    pub proc: Proc,
}

impl Varnish {
    pub async fn start(dir: &TempDir, origin_port: u16) -> Varnish {
        let vcl = std::fs::read_to_string(repo_root().join("monitoring/varnish.vcl")).expect("read varnish.vcl");
        let block = "backend default {\n    .host = \"127.0.0.1\";\n    .port = \"8080\";\n}";
        assert!(vcl.contains(block), "varnish.vcl lost its backend block");
        let vcl =
            vcl.replace(block, &format!("backend default {{\n    .host = \"127.0.0.1\";\n    .port = \"{origin_port}\";\n}}"));
        let vcl_path = dir.path().join("varnish.vcl");
        std::fs::write(&vcl_path, vcl).expect("write vcl");
        let varnishd = std::env::var("VARNISHD").unwrap_or_else(|_| "varnishd".into());
        for _ in 0..5 {
            let port = free_port();
            let proc = Proc::spawn(
                "varnishd",
                Command::new(&varnishd).args([
                    "-F",
                    "-n",
                    &dir.path().join("varnish-n").display().to_string(),
                    "-a",
                    &format!("127.0.0.1:{port}"),
                    "-T",
                    "none",
                    "-f",
                    &vcl_path.display().to_string(),
                    "-s",
                    "malloc,32m",
                ]),
                dir.path().join(format!("varnishd-{port}.log")),
            );
            let http = reqwest::Client::new();
            let url = format!("http://127.0.0.1:{port}/");
            // Ready once it answers anything (a PURGE without headers is a 400 from the VCL).
            let ready = wait_until(Duration::from_secs(30), || {
                let req = http.request(reqwest::Method::from_bytes(b"PURGE").unwrap(), &url);
                async move { req.send().await.is_ok() }
            })
            .await;
            if ready {
                return Varnish { port, proc };
            }
            let log = proc.log_text();
            drop(proc);
            if !log.contains("Address already in use") {
                panic!("varnishd did not start:\n{log}");
            }
        }
        panic!("varnishd: no free port after 5 tries");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// One request as a fake API saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A loopback HTTP server that records every request and answers with `respond`.
pub struct Recorder {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    /// `respond(request, index)` gives the status and body of the `index`-th request (from 0).
    pub async fn start<F>(respond: F) -> Recorder
    where
        F: Fn(&Seen, usize) -> (u16, String) + Send + Sync + 'static,
    {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let respond = Arc::new(respond);
        let s = seen.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let s = s.clone();
            let respond = respond.clone();
            async move {
                let req = Seen {
                    method: method.to_string(),
                    path: uri.path().to_string(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                        .collect(),
                    body: body.to_vec(),
                };
                let n = {
                    let mut g = s.lock().unwrap();
                    g.push(req.clone());
                    g.len() - 1
                };
                let (status, body) = respond(&req, n);
                (StatusCode::from_u16(status).unwrap(), body)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Recorder { port, seen, task }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Waits until the module's invalidation channel has `n` subscribers.
pub async fn wait_subscribers(conn: &mut crate::common::Conn, n: i64, purger: &mut Proc) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = redis::cmd("PUBSUB");
        c.arg("NUMSUB").arg("tiercache:invalidations");
        let v = conn.run(&c);
        let count = crate::common::as_list(&v).and_then(|l| l.get(1)).and_then(crate::common::as_int).unwrap_or(0);
        if count >= n {
            return;
        }
        purger.assert_running();
        assert!(Instant::now() < end, "purger did not subscribe:\n{}", purger.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `tiercache exporter` on a free loopback port; `args` come before `--listen`.
pub async fn exporter(dir: &TempDir, args: &[&str]) -> (Proc, u16) {
    for attempt in 0..5 {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all: Vec<&str> = vec!["exporter"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--listen", &listen]);
        let mut proc = tiercache(dir, &format!("exporter-{attempt}"), &all);
        let url = format!("http://{listen}/metrics");
        let http = reqwest::Client::new();
        let up = wait_until(Duration::from_secs(20), || {
            let req = http.get(&url);
            async move { req.send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        if up {
            return (proc, port);
        }
        let log = proc.log_text();
        if !log.contains("cannot listen") {
            proc.assert_running();
            panic!("exporter did not serve /metrics:\n{log}");
        }
    }
    panic!("exporter: no free port after 5 tries");
}

/// A real Prometheus (`prometheus` from PATH, or $PROMETHEUS) on a free loopback port, with its
/// config `config_yaml` and its TSDB in `dir`.
pub struct Prometheus {
    pub port: u16,
    pub proc: Proc,
}

impl Prometheus {
    pub async fn start(dir: &TempDir, config_yaml: &str) -> Prometheus {
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml).expect("write prometheus.yml");
        let bin = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        for attempt in 0..5 {
            let port = free_port();
            let proc = Proc::spawn(
                "prometheus",
                Command::new(&bin).args([
                    &format!("--config.file={}", config.display()),
                    &format!("--web.listen-address=127.0.0.1:{port}"),
                    &format!("--storage.tsdb.path={}", dir.path().join(format!("tsdb-{attempt}")).display()),
                    "--log.level=warn",
                ]),
                dir.path().join(format!("prometheus-{attempt}.log")),
            );
            let url = format!("http://127.0.0.1:{port}/-/ready");
            let http = reqwest::Client::new();
            let ready = wait_until(Duration::from_secs(60), || {
                let req = http.get(&url);
                async move { req.send().await.is_ok_and(|r| r.status().is_success()) }
            })
            .await;
            if ready {
                return Prometheus { port, proc };
            }
            let log = proc.log_text();
            if !log.contains("address already in use") {
                panic!("prometheus did not become ready:\n{log}");
            }
        }
        panic!("prometheus: no free port after 5 tries");
    }

    /// GET /api/v1/{path} and its `data` (panics unless status is success).
    pub async fn api(&self, path_and_query: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}/api/v1/{path_and_query}", self.port);
        let body: serde_json::Value = reqwest::get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"));
        assert_eq!(body["status"], "success", "GET {url}: {body}");
        body["data"].clone()
    }

    /// An instant query's result vector.
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let q: String = promql
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        self.api(&format!("query?query={q}")).await["result"].as_array().cloned().unwrap_or_default()
    }
}
