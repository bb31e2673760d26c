//! The `tiercache` command-line tool: `tiercache purge` (invalidation messages to edge purges) and
//! `tiercache exporter` (the module's INFO fields as Prometheus metrics). See cli/README.md.

pub mod backend;
pub mod exporter;
pub mod message;
pub mod pg;
pub mod purge;
pub mod serve;
pub mod warm;
pub mod write_behind;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// One log line on stderr, with a UTC timestamp in seconds.
pub fn log(line: &str) {
    let ms = unix_ms();
    eprintln!("[{}.{:03}] {line}", ms / 1000, ms % 1000);
}
