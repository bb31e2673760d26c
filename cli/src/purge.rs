//! `tiercache purge`: subscribes to the invalidation channel and purges the invalidated tags at the edge.
//!
//! Two tasks joined by a channel:
//!
//! - the *listener* keeps a pub/sub subscription (reconnecting with backoff), decodes each message and
//!   follows `(run_id, seq)`. An invalidation becomes its tags' edge keys; a reset message, a gap, a new
//!   run id, an undecodable message and every resubscription (messages may have been missed while
//!   disconnected) become a *full purge* of the namespace. Nothing is skipped silently.
//! - the *sender* batches what arrives for `batch_window`, spaces its requests to `rate` per second,
//!   and retries a failed request with exponential backoff (doubling from `backoff_min` to
//!   `backoff_max`) until it goes through, keeping and merging what arrives meanwhile. More than
//!   `max_pending` keys waiting turn into one full purge.
//!
//! So a tag reaches the edge within `batch_window + 1/rate + request time` of the message while the
//! edge answers, and never later than the first successful request after it recovers.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::backend::{Backend, PurgeError};
use crate::message::{self, Body, Follower};
use tiercache_client::edge::edge_key;

/// Everything `tiercache purge` is configured with.
#[derive(Clone, Debug)]
pub struct Config {
    pub redis_url: String,
    pub channel: String,
    /// Only invalidations of this database (None: every database).
    pub db: Option<u64>,
    /// The key every page of the site carries; a full purge purges it. None: purge everything.
    pub namespace_key: Option<String>,
    pub batch_window: Duration,
    /// Requests per second, at most.
    pub rate: f64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub max_pending: usize,
    /// Full purge once subscribed at start (resubscriptions always do one).
    pub full_purge_on_start: bool,
    pub request_timeout: Duration,
    /// How often the subscription connection is checked with PING, and how long a reply may take
    /// before the connection is dropped and made again (then a full purge).
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

/// The purger's own metrics (`--metrics-listen`).
#[derive(Debug)]
pub struct Metrics {
    pub messages: Counter,
    pub gaps: Counter,
    pub resets: Counter,
    pub full_purges: Counter,
    pub purged_keys: Counter,
    pub requests: Family<Vec<(String, String)>, Counter>,
    pub pending_keys: Gauge,
    pub subscribed: Gauge,
    pub delay: Histogram,
    /// Unix ms of the oldest message not purged yet, 0 when nothing waits.
    pub oldest_pending_ms: AtomicI64,
    pub last_success_ms: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            messages: Counter::default(),
            gaps: Counter::default(),
            resets: Counter::default(),
            full_purges: Counter::default(),
            purged_keys: Counter::default(),
            requests: Family::default(),
            pending_keys: Gauge::default(),
            subscribed: Gauge::default(),
            delay: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            oldest_pending_ms: AtomicI64::new(0),
            last_success_ms: AtomicU64::new(0),
        };
        // Both results exist from the start, so that rates over them are defined at 0.
        for result in ["ok", "error"] {
            drop(m.requests.get_or_create(&vec![("result".to_string(), result.to_string())]));
        }
        m
    }

    /// Registers everything under `tiercache_purger_`. `lag` is filled at scrape time.
    pub fn register(self: &Arc<Self>, r: &mut Registry, lag: &Gauge<f64, AtomicU64>) {
        let p = r.sub_registry_with_prefix("tiercache_purger");
        p.register("messages", "Invalidation and reset messages received.", self.messages.clone());
        p.register(
            "gaps",
            "Missed-message events (seq gap, new run id, undecodable message, resubscription), each a full purge.",
            self.gaps.clone(),
        );
        p.register("resets", "Reset messages received (flush, replica resync), each a full purge.", self.resets.clone());
        p.register("full_purges", "Full purges of the namespace that succeeded.", self.full_purges.clone());
        p.register("purged_keys", "Edge keys purged by successful requests.", self.purged_keys.clone());
        p.register("requests", "Purge requests sent, by result (ok, error).", self.requests.clone());
        p.register("pending_keys", "Edge keys received and not purged yet.", self.pending_keys.clone());
        p.register("subscribed", "1 while subscribed to the invalidation channel.", self.subscribed.clone());
        p.register(
            "purge_delay_seconds",
            "Time from receiving a message to the edge acknowledging its purge.",
            self.delay.clone(),
        );
        p.register(
            "lag_seconds",
            "Age of the oldest message whose purge has not succeeded yet (0 when none waits).",
            lag.clone(),
        );
    }

    /// Seconds the oldest waiting message has waited.
    pub fn lag_seconds(&self) -> f64 {
        let oldest = self.oldest_pending_ms.load(Relaxed);
        if oldest == 0 {
            0.0
        } else {
            (crate::unix_ms() - oldest).max(0) as f64 / 1000.0
        }
    }

    fn request(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.requests.get_or_create(&vec![("result".to_string(), result.to_string())]).inc();
    }
}

/// What the listener hands to the sender.
#[derive(Debug)]
enum Event {
    Keys(Vec<String>, Instant, i64),
    Full(&'static str, Instant, i64),
}

/// Runs until the process is stopped. Errors only for a configuration that cannot work.
pub async fn run(cfg: Config, backend: Backend, metrics: Arc<Metrics>) -> Result<(), String> {
    // Logs name the server by host:port, never by its URL, which may hold a password.
    let server = crate::exporter::node_label(&cfg.redis_url)?;
    let client = redis::Client::open(cfg.redis_url.as_str()).map_err(|e| format!("--redis {server}: {e}"))?;
    let http = crate::backend::http_client(cfg.request_timeout).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let sender = tokio::spawn(sender(cfg.clone(), backend, http, rx, metrics.clone()));
    listener(cfg, server, client, tx, metrics).await;
    // The listener returns only when the sender is gone.
    sender.await.map_err(|e| format!("sender task: {e}"))
}

async fn listener(cfg: Config, server: String, client: redis::Client, tx: mpsc::UnboundedSender<Event>, metrics: Arc<Metrics>) {
    let mut first = true;
    let mut backoff = cfg.backoff_min;
    let mut follower = Follower::default();
    loop {
        let mut pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                crate::log(&format!("purge: cannot connect to {server}: {e}; retrying in {backoff:?}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(cfg.backoff_max);
                continue;
            }
        };
        if let Err(e) = pubsub.subscribe(&cfg.channel).await {
            crate::log(&format!("purge: SUBSCRIBE {} failed: {e}; retrying in {backoff:?}", cfg.channel));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(cfg.backoff_max);
            continue;
        }
        backoff = cfg.backoff_min;
        metrics.subscribed.set(1);
        follower.forget();
        crate::log(&format!("purge: subscribed to {} on {server}", cfg.channel));
        if !first || cfg.full_purge_on_start {
            let why = if first { "start" } else { "resubscribed" };
            if !first {
                metrics.gaps.inc();
            }
            if tx.send(Event::Full(why, Instant::now(), crate::unix_ms())).is_err() {
                return;
            }
        }
        first = false;
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(cfg.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await; // the first tick is immediate
        let why = loop {
            let msg = tokio::select! {
                m = stream.next() => match m {
                    Some(m) => m,
                    None => break "connection closed".to_string(),
                },
                _ = ping.tick() => {
                    // A server that stopped answering without closing the connection (a partition, a
                    // frozen host) would otherwise leave the purger subscribed to nothing.
                    match tokio::time::timeout(cfg.ping_timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => break format!("PING failed: {e}"),
                        Err(_) => break format!("no PING reply within {:?}", cfg.ping_timeout),
                    }
                }
            };
            let now = Instant::now();
            let now_ms = crate::unix_ms();
            metrics.messages.inc();
            let event = match message::decode(msg.get_payload_bytes()) {
                Err(e) => {
                    crate::log(&format!("purge: {e}; full purge"));
                    follower.forget();
                    metrics.gaps.inc();
                    Event::Full("undecodable message", now, now_ms)
                }
                Ok(m) => {
                    let in_order = follower.in_order(&m);
                    match m.body {
                        Body::Reset => {
                            metrics.resets.inc();
                            Event::Full("reset message", now, now_ms)
                        }
                        _ if !in_order => {
                            crate::log(&format!("purge: missed messages before {} seq {}; full purge", m.run_id, m.seq));
                            metrics.gaps.inc();
                            Event::Full("missed messages", now, now_ms)
                        }
                        Body::Invalidation { db, .. } if cfg.db.is_some_and(|want| want != db) => continue,
                        Body::Invalidation { tags, .. } => {
                            let keys = tags.iter().map(|t| edge_key(t).into_owned()).collect();
                            Event::Keys(keys, now, now_ms)
                        }
                    }
                }
            };
            if tx.send(event).is_err() {
                return;
            }
        };
        drop((sink, stream));
        metrics.subscribed.set(0);
        crate::log(&format!("purge: subscription lost ({why}); reconnecting (then a full purge)"));
        tokio::time::sleep(backoff).await;
    }
}

/// Keys waiting for a purge, in arrival order, without repeats.
#[derive(Default)]
struct Pending {
    full: Option<(&'static str, Instant)>,
    keys: Vec<(String, Instant, i64)>,
    set: HashSet<String>,
    oldest_ms: i64,
}

impl Pending {
    fn add(&mut self, ev: Event, max_pending: usize) {
        let ms = match &ev {
            Event::Keys(_, _, ms) | Event::Full(_, _, ms) => *ms,
        };
        if self.oldest_ms == 0 {
            self.oldest_ms = ms;
        }
        match ev {
            Event::Full(why, at, _) => {
                if self.full.is_none() {
                    self.full = Some((why, at));
                }
            }
            // The full purge, not sent yet, covers keys that arrive before it is: nothing to keep.
            Event::Keys(..) if self.full.is_some() => {}
            Event::Keys(keys, at, ms) => {
                for k in keys {
                    if self.set.insert(k.clone()) {
                        self.keys.push((k, at, ms));
                    }
                }
                if self.keys.len() > max_pending {
                    crate::log(&format!("purge: more than {max_pending} keys waiting; one full purge instead"));
                    self.full = Some(("too many pending keys", self.keys[0].1));
                    self.keys.clear();
                    self.set.clear();
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.full.is_none() && self.keys.is_empty()
    }

    /// The next batch: as many keys as fit both limits (at least one).
    fn batch(&self, max_keys: usize, max_bytes: usize) -> usize {
        let mut bytes = 0;
        let mut n = 0;
        for (k, _, _) in &self.keys {
            let add = k.len() + usize::from(n > 0);
            if n > 0 && (n >= max_keys || bytes + add > max_bytes) {
                break;
            }
            bytes += add;
            n += 1;
        }
        n
    }
}

async fn sender(
    cfg: Config,
    backend: Backend,
    http: reqwest::Client,
    mut rx: mpsc::UnboundedReceiver<Event>,
    metrics: Arc<Metrics>,
) {
    let interval = if cfg.rate > 0.0 { Duration::from_secs_f64(1.0 / cfg.rate) } else { Duration::ZERO };
    let (max_keys, max_bytes) = backend.batch_limits();
    let mut pending = Pending::default();
    let mut next_allowed = tokio::time::Instant::now();
    let mut backoff = cfg.backoff_min;
    let mut closed = false;
    loop {
        if pending.is_empty() {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(ev) => pending.add(ev, cfg.max_pending),
                None => return,
            }
            let deadline = tokio::time::Instant::now() + cfg.batch_window;
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(ev)) => pending.add(ev, cfg.max_pending),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        tokio::time::sleep_until(next_allowed).await;
        while let Ok(ev) = rx.try_recv() {
            pending.add(ev, cfg.max_pending);
        }
        metrics.pending_keys.set(pending.keys.len() as i64);
        metrics.oldest_pending_ms.store(pending.oldest_ms, Relaxed);
        next_allowed = tokio::time::Instant::now() + interval;

        let result: Result<(), PurgeError>;
        if let Some((why, at)) = pending.full {
            result = backend.purge_all(&http, cfg.namespace_key.as_deref()).await;
            if result.is_ok() {
                crate::log(&format!(
                    "purge: full purge ({why}) of {} done",
                    cfg.namespace_key.as_deref().unwrap_or("everything")
                ));
                metrics.full_purges.inc();
                metrics.delay.observe(at.elapsed().as_secs_f64());
                for (_, at, _) in pending.keys.drain(..) {
                    metrics.delay.observe(at.elapsed().as_secs_f64());
                }
                pending = Pending::default();
            }
        } else {
            let n = pending.batch(max_keys, max_bytes);
            let keys: Vec<String> = pending.keys[..n].iter().map(|(k, _, _)| k.clone()).collect();
            result = backend.purge(&http, &keys).await;
            if result.is_ok() {
                for (k, at, _) in pending.keys.drain(..n) {
                    pending.set.remove(&k);
                    metrics.delay.observe(at.elapsed().as_secs_f64());
                }
                metrics.purged_keys.inc_by(n as u64);
                pending.oldest_ms = pending.keys.first().map_or(0, |k| k.2);
            }
        }
        metrics.request(result.is_ok());
        match result {
            Ok(()) => {
                backoff = cfg.backoff_min;
                metrics.last_success_ms.store(crate::unix_ms() as u64, Relaxed);
            }
            Err(e) => {
                crate::log(&format!("purge: {} request failed: {e}; retrying in {backoff:?}", backend.name()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(cfg.backoff_max);
            }
        }
        metrics.pending_keys.set(pending.keys.len() as i64);
        metrics.oldest_pending_ms.store(pending.oldest_ms, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_both_limits() {
        let mut p = Pending::default();
        let now = Instant::now();
        p.add(Event::Keys(vec!["aa".into(), "bb".into(), "aa".into(), "cc".into()], now, 1), 100);
        assert_eq!(p.keys.len(), 3, "repeats merged");
        assert_eq!(p.batch(2, 1000), 2);
        assert_eq!(p.batch(10, 5), 2, "aa bb = 5 bytes");
        assert_eq!(p.batch(10, 4), 1);
        assert_eq!(p.batch(10, 1), 1, "at least one key");
        assert!(p.full.is_none());
        p.add(Event::Keys((0..200).map(|i| i.to_string()).collect(), now, 2), 100);
        assert_eq!(p.full.map(|f| f.0), Some("too many pending keys"));
        assert_eq!(p.oldest_ms, 1);
        assert!(p.keys.is_empty() && p.set.is_empty(), "covered by the full purge");
        // While a full purge waits, new keys are covered by it.
        p.add(Event::Keys(vec!["x".into()], now, 3), 100);
        assert!(p.keys.is_empty());
        assert!(!p.is_empty());
    }
}
