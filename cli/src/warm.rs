//! `tiercache warm`: loads hot rows into the cache before traffic hits, from PostgreSQL or SQLite.
//!
//! # The file
//!
//! Plain SQL; each query is preceded by one annotation comment and ends with `;` at the end of a line:
//!
//! ```sql
//! -- tiercache: name=hot_users key=user:{id} tags=user:{id},org:{org_id} ttl=3600 stale=60
//! SELECT u.id, u.org_id, u.name FROM users u JOIN ... ;
//! ```
//!
//! - `key` (required): the cache key template, `{column}` being a column of the query's result. The
//!   Redis key is the client's: `<namespace>:v<schema-version>:<key>`.
//! - `tags`: comma-separated tag templates (no spaces). Every entry also gets the namespace tag
//!   `ns:<namespace>:v<schema-version>`, as the clients' entries do.
//! - `ttl`, `stale` (seconds): default `--ttl` and 0.
//! - `name`: the query's name in logs and in the resume state (default `query<N>`).
//!
//! Each row is stored as a MessagePack map of its columns (what `rmp-serde` makes of a struct with
//! those fields, and what Python's msgpack makes of a dict), lz4-framed above `--compress-min-size`
//! like the Rust client does, so `TierCache::get::<YourStruct>` and the Python client read it. Columns of
//! types other than booleans, integers, floats, text and bytea must be cast (`created_at::text`).
//!
//! # Never overwriting a fresher entry
//!
//! For each batch of keys the warmer first takes fill leases (`TIERCACHE.GET key LEASE ms`): a key that
//! has a live entry is skipped (the entry is at least as fresh as our read could be). Only then does it
//! read the rows of the keys it holds leases for, a second time (the query, filtered on the key), and
//! fills with `TIERCACHE.SET ... LEASE token`. A write of the key, or an invalidation of one of its tags
//! (the pg bridge's, after a commit), between the grant and the fill fences the fill: the fresher value
//! wins and the key counts as skipped.
//!
//! # Resume
//!
//! After each batch the number of keys done per query (keys sorted) goes to the state file
//! (`--state`, default `<file>.state.json`, written atomically). A run that is interrupted resumes
//! where the state says, if the SQL file is unchanged; the state file is removed once a run completes.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::Value;
use serde::{Deserialize, Serialize};
use tiercache_core::lz4;

use crate::log;
use crate::pg::mapping::{ident, literal, parse_template, Part};

/// One annotated query of the file.
#[derive(Debug, Clone)]
pub struct Query {
    pub name: String,
    pub sql: String,
    pub key: Vec<Part>,
    pub tags: Vec<Vec<Part>>,
    pub ttl: Option<u64>,
    pub stale: u64,
}

const ANNOTATION: &str = "-- tiercache:";

/// Parses a warming file (see the module doc).
pub fn parse_file(text: &str) -> Result<Vec<Query>, String> {
    let mut out = Vec::new();
    let mut pending: Option<Query> = None;
    let mut sql = String::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix(ANNOTATION) {
            if pending.is_some() {
                return Err(format!("line {}: annotation before the previous query ended with ';'", n + 1));
            }
            pending = Some(parse_annotation(rest, out.len()).map_err(|e| format!("line {}: {e}", n + 1))?);
            continue;
        }
        if pending.is_none() {
            if t.is_empty() || t.starts_with("--") {
                continue;
            }
            return Err(format!("line {}: a query without a `{ANNOTATION}` annotation before it", n + 1));
        }
        sql.push_str(line);
        sql.push('\n');
        if t.ends_with(';') {
            let mut q = pending.take().unwrap_or_else(|| unreachable!());
            q.sql = std::mem::take(&mut sql).trim().trim_end_matches(';').trim().to_string();
            if q.sql.is_empty() {
                return Err(format!("query {}: empty", q.name));
            }
            out.push(q);
        }
    }
    if let Some(q) = pending {
        return Err(format!("query {}: no ';' at the end", q.name));
    }
    if out.is_empty() {
        return Err("no annotated query in the file".into());
    }
    let mut names: Vec<&str> = out.iter().map(|q| q.name.as_str()).collect();
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err("two queries have the same name".into());
    }
    Ok(out)
}

fn parse_annotation(rest: &str, index: usize) -> Result<Query, String> {
    let mut q = Query { name: format!("query{}", index + 1), sql: String::new(), key: vec![], tags: vec![], ttl: None, stale: 0 };
    for tok in rest.split_whitespace() {
        let (k, v) = tok.split_once('=').ok_or_else(|| format!("expected name=value, got {tok:?}"))?;
        match k {
            "key" => q.key = parse_template(v)?,
            "tags" => q.tags = v.split(',').filter(|s| !s.is_empty()).map(parse_template).collect::<Result<_, _>>()?,
            "ttl" => q.ttl = Some(v.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| format!("bad ttl {v:?}"))?),
            "stale" => q.stale = v.parse().map_err(|_| format!("bad stale {v:?}"))?,
            "name" => q.name = v.to_string(),
            _ => return Err(format!("unknown annotation {k:?} (key, tags, ttl, stale, name)")),
        }
    }
    if q.key.is_empty() {
        return Err("the annotation needs key=<template>".into());
    }
    Ok(q)
}

/// Which database the rows come from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// The SQL text of a template over the subquery `q`.
fn template_expr(parts: &[Part], d: Dialect) -> String {
    let pieces: Vec<String> = parts
        .iter()
        .map(|p| match (p, d) {
            (Part::Lit(s), _) => literal(s),
            (Part::Col(c), Dialect::Postgres) => format!("q.{}::text", ident(c)),
            (Part::Col(c), Dialect::Sqlite) => format!("CAST(q.{} AS TEXT)", ident(c)),
        })
        .collect();
    format!("({})", pieces.join(" || "))
}

/// The query wrapped to compute key and tags in SQL (the database renders the values the same way in
/// both passes); `filtered` adds the key filter of the second pass (parameter 1: the keys).
pub fn wrapped_sql(q: &Query, d: Dialect, filtered: bool) -> String {
    let key = template_expr(&q.key, d);
    let mut cols = vec![format!("{key} AS __tc_key")];
    for (i, t) in q.tags.iter().enumerate() {
        cols.push(format!("{} AS __tc_tag{i}", template_expr(t, d)));
    }
    let mut s = format!("SELECT {}, q.* FROM ({}) AS q", cols.join(", "), q.sql);
    if filtered {
        s.push_str(&match d {
            Dialect::Postgres => format!(" WHERE {key} = ANY($1::text[])"),
            Dialect::Sqlite => format!(" WHERE {key} IN (SELECT value FROM json_each(?1))"),
        });
    }
    s
}

/// A row ready to store: key (without the namespace), tags, MessagePack value.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: String,
    pub tags: Vec<String>,
    pub value: Vec<u8>,
}

fn finish_row(key: Option<String>, tags: Vec<Option<String>>, fields: Vec<(String, rmpv::Value)>) -> Result<Option<Row>, String> {
    let Some(key) = key.filter(|k| !k.is_empty()) else { return Ok(None) };
    let map = rmpv::Value::Map(fields.into_iter().map(|(k, v)| (rmpv::Value::from(k), v)).collect());
    let mut value = Vec::new();
    rmpv::encode::write_value(&mut value, &map).map_err(|e| e.to_string())?;
    Ok(Some(Row { key, tags: tags.into_iter().flatten().filter(|t| !t.is_empty()).collect(), value }))
}

/// The rows source.
#[derive(Clone)]
pub enum Source {
    Postgres(Arc<tokio_postgres::Client>),
    Sqlite(String),
}

impl Source {
    fn dialect(&self) -> Dialect {
        match self {
            Source::Postgres(_) => Dialect::Postgres,
            Source::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// Runs the query (with `keys`: only those keys' rows).
    pub async fn fetch(&self, q: &Query, keys: Option<&[String]>) -> Result<Vec<Row>, String> {
        let sql = wrapped_sql(q, self.dialect(), keys.is_some());
        let ntags = q.tags.len();
        match self {
            Source::Postgres(c) => {
                let rows = match keys {
                    Some(k) => c.query(&sql, &[&k]).await,
                    None => c.query(&sql, &[]).await,
                }
                .map_err(|e| format!("query {}: {}", q.name, crate::pg::pg_err(&e)))?;
                rows.iter().map(|r| pg_row(r, ntags)).filter_map(Result::transpose).collect()
            }
            Source::Sqlite(path) => {
                let path = path.clone();
                let keys_json = keys.map(|k| serde_json::to_string(k).unwrap_or_default());
                let name = q.name.clone();
                tokio::task::spawn_blocking(move || sqlite_rows(&path, &sql, keys_json.as_deref(), ntags))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("query {name}: {e}"))
            }
        }
    }
}

fn pg_row(r: &tokio_postgres::Row, ntags: usize) -> Result<Option<Row>, String> {
    use tokio_postgres::types::Type;
    let key: Option<String> = r.try_get(0).map_err(|e| e.to_string())?;
    let tags =
        (0..ntags).map(|i| r.try_get::<_, Option<String>>(1 + i)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let mut fields = Vec::new();
    for (i, col) in r.columns().iter().enumerate().skip(1 + ntags) {
        let err = |e: tokio_postgres::Error| e.to_string();
        let v = match *col.type_() {
            Type::BOOL => r.try_get::<_, Option<bool>>(i).map_err(err)?.map(rmpv::Value::from),
            Type::INT2 => r.try_get::<_, Option<i16>>(i).map_err(err)?.map(rmpv::Value::from),
            Type::INT4 => r.try_get::<_, Option<i32>>(i).map_err(err)?.map(rmpv::Value::from),
            Type::INT8 => r.try_get::<_, Option<i64>>(i).map_err(err)?.map(rmpv::Value::from),
            Type::FLOAT4 => r.try_get::<_, Option<f32>>(i).map_err(err)?.map(rmpv::Value::from),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i).map_err(err)?.map(rmpv::Value::from),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                r.try_get::<_, Option<String>>(i).map_err(err)?.map(rmpv::Value::from)
            }
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i).map_err(err)?.map(rmpv::Value::from),
            ref t => return Err(format!("column {} has type {t}: cast it in the query (e.g. {}::text)", col.name(), col.name())),
        };
        fields.push((col.name().to_string(), v.unwrap_or(rmpv::Value::Nil)));
    }
    finish_row(key, tags, fields)
}

fn sqlite_rows(path: &str, sql: &str, keys_json: Option<&str>, ntags: usize) -> Result<Vec<Row>, String> {
    use rusqlite::types::ValueRef;
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| e.to_string())?;
    let mut st = conn.prepare(sql).map_err(|e| e.to_string())?;
    let names: Vec<String> = st.column_names().iter().map(|s| s.to_string()).collect();
    let params: Vec<&dyn rusqlite::ToSql> = match &keys_json {
        Some(k) => vec![k as &dyn rusqlite::ToSql],
        None => vec![],
    };
    let mut rows = st.query(params.as_slice()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(|e| e.to_string())? {
        let text = |i: usize| -> Result<Option<String>, String> {
            Ok(match r.get_ref(i).map_err(|e| e.to_string())? {
                ValueRef::Null => None,
                ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                other => Some(format!("{other:?}")),
            })
        };
        let key = text(0)?;
        let tags = (0..ntags).map(|i| text(1 + i)).collect::<Result<Vec<_>, _>>()?;
        let mut fields = Vec::new();
        for (i, name) in names.iter().enumerate().skip(1 + ntags) {
            let v = match r.get_ref(i).map_err(|e| e.to_string())? {
                ValueRef::Null => rmpv::Value::Nil,
                ValueRef::Integer(n) => rmpv::Value::from(n),
                ValueRef::Real(f) => rmpv::Value::from(f),
                ValueRef::Text(t) => rmpv::Value::from(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => rmpv::Value::from(b.to_vec()),
            };
            fields.push((name.clone(), v));
        }
        if let Some(row) = finish_row(key, tags, fields)? {
            out.push(row);
        }
    }
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct Config {
    pub redis_url: String,
    pub namespace: String,
    pub schema_version: u32,
    pub default_ttl: u64,
    pub compress_min_size: usize,
    pub concurrency: usize,
    pub batch: usize,
    /// Keys per second at most.
    pub rate: Option<f64>,
    pub lease_ms: u64,
    pub state_path: String,
    pub fresh_start: bool,
    /// A progress bar (terminal) or log lines.
    pub progress_bar: bool,
}

/// Counts of a run.
#[derive(Default, Debug)]
pub struct Summary {
    pub loaded: AtomicU64,
    pub skipped: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Serialize, Deserialize, Default)]
struct State {
    file_hash: String,
    /// Keys done (in sorted order) per query; usize::MAX when the query is done.
    done: BTreeMap<String, usize>,
}

fn file_hash(text: &str) -> String {
    // FNV-1a: only compares this file with the one the state was written for.
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

fn save_state(path: &str, s: &State) -> Result<(), String> {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, serde_json::to_vec(s).map_err(|e| e.to_string())?).map_err(|e| format!("{tmp}: {e}"))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}"))
}

/// Spaces out batches to `rate` keys per second across all concurrent batches.
struct Limiter {
    rate: Option<f64>,
    next: Mutex<Instant>,
}

impl Limiter {
    async fn take(&self, n: usize) {
        let Some(rate) = self.rate else { return };
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(n as f64 / rate);
            start - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Warms every query of `file_text`; returns the summary (also when some keys failed).
pub async fn run(cfg: Config, file_text: &str, source: Source) -> Result<(Summary, f64), String> {
    let queries = parse_file(file_text)?;
    let started = Instant::now();
    let hash = file_hash(file_text);
    let mut state: State = match std::fs::read(&cfg.state_path) {
        Ok(b) if !cfg.fresh_start => serde_json::from_slice(&b).unwrap_or_default(),
        _ => State::default(),
    };
    if state.file_hash != hash {
        if !state.done.is_empty() {
            log(&format!("warm: {} was written for another version of the file: starting over", cfg.state_path));
        }
        state = State { file_hash: hash, done: BTreeMap::new() };
    }
    let client = redis::Client::open(cfg.redis_url.as_str()).map_err(|e| format!("--redis: {e}"))?;
    let conn = client.get_multiplexed_async_connection().await.map_err(|e| format!("Redis: {e}"))?;
    let summary = Arc::new(Summary::default());
    let limiter = Arc::new(Limiter { rate: cfg.rate, next: Mutex::new(Instant::now()) });
    let prefix = format!("{}:v{}:", cfg.namespace, cfg.schema_version);
    let ns_tag = format!("ns:{}:v{}", cfg.namespace, cfg.schema_version);
    for q in &queries {
        let from = state.done.get(&q.name).copied().unwrap_or(0);
        if from == usize::MAX {
            log(&format!("warm: {}: done in an earlier run", q.name));
            continue;
        }
        let mut keys: Vec<String> = source.fetch(q, None).await?.into_iter().map(|r| r.key).collect();
        keys.sort();
        keys.dedup();
        let total = keys.len();
        if from > 0 {
            log(&format!("warm: {}: resuming after {from} of {total} keys", q.name));
        }
        let keys = keys.into_iter().skip(from).collect::<Vec<_>>();
        let bar = cfg.progress_bar.then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} keys, {per_sec}, eta {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_message(q.name.clone());
            b.set_position(from as u64);
            b
        });
        let chunks: Vec<Vec<String>> = keys.chunks(cfg.batch.max(1)).map(|c| c.to_vec()).collect();
        let nchunks = chunks.len();
        let ctx = Arc::new(BatchCtx {
            q: q.clone(),
            source: source.clone(),
            conn: conn.clone(),
            prefix: prefix.clone(),
            ns_tag: ns_tag.clone(),
            cfg: cfg.clone(),
            summary: summary.clone(),
        });
        let mut results = futures_util::stream::iter(chunks.into_iter().enumerate())
            .map(|(i, keys)| {
                let (ctx, limiter) = (ctx.clone(), limiter.clone());
                async move {
                    limiter.take(keys.len()).await;
                    let n = keys.len();
                    let r = ctx.batch(keys).await;
                    (i, n, r)
                }
            })
            .buffer_unordered(cfg.concurrency.max(1));
        // Batches finish out of order: the state advances over the finished prefix only.
        let mut finished: HashMap<usize, usize> = HashMap::new();
        let (mut next_chunk, mut done_keys) = (0usize, from);
        let mut last_log = Instant::now();
        while let Some((i, n, r)) = results.next().await {
            if let Err(e) = r {
                // Redis unreachable (the per-key errors are counted inside): stop, keep the state.
                if let Some(b) = &bar {
                    b.abandon();
                }
                save_state(&cfg.state_path, &state)?;
                return Err(format!("{}: {e} (the next run resumes)", q.name));
            }
            finished.insert(i, n);
            while let Some(n) = finished.remove(&next_chunk) {
                done_keys += n;
                next_chunk += 1;
            }
            state.done.insert(q.name.clone(), done_keys);
            save_state(&cfg.state_path, &state)?;
            if let Some(b) = &bar {
                b.set_position(done_keys as u64);
            } else if last_log.elapsed() >= Duration::from_secs(1) || next_chunk == nchunks {
                last_log = Instant::now();
                log(&format!(
                    "warm: {}: {done_keys}/{total} keys (loaded {}, skipped {}, errors {})",
                    q.name,
                    summary.loaded.load(Ordering::Relaxed),
                    summary.skipped.load(Ordering::Relaxed),
                    summary.errors.load(Ordering::Relaxed)
                ));
            }
        }
        if let Some(b) = &bar {
            b.finish();
        }
        state.done.insert(q.name.clone(), usize::MAX);
        save_state(&cfg.state_path, &state)?;
    }
    let _ = std::fs::remove_file(&cfg.state_path);
    let summary = Arc::try_unwrap(summary).unwrap_or_default();
    Ok((summary, started.elapsed().as_secs_f64()))
}

struct BatchCtx {
    q: Query,
    source: Source,
    conn: MultiplexedConnection,
    prefix: String,
    ns_tag: String,
    cfg: Config,
    summary: Arc<Summary>,
}

fn bulk_str(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(Value::SimpleString(s)) => Some(s.clone()),
        Some(Value::Okay) => Some("OK".into()),
        _ => None,
    }
}

impl BatchCtx {
    /// One batch: leases, then the rows read again, then fenced fills. `Err` only when Redis fails.
    async fn batch(&self, keys: Vec<String>) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let s = &self.summary;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for k in &keys {
            pipe.cmd("TIERCACHE.GET").arg(format!("{}{k}", self.prefix)).arg("LEASE").arg(self.cfg.lease_ms);
        }
        let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(|e| format!("Redis: {e}"))?;
        let mut held: Vec<(String, String)> = Vec::new();
        for (k, r) in keys.iter().zip(replies) {
            match r {
                Value::Array(v) => match bulk_str(v.get(2)) {
                    Some(token) => held.push((k.clone(), token)),
                    None => {
                        s.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                },
                other => {
                    log(&format!("warm: {}: lease read of {k}: {other:?}", self.q.name));
                    s.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if held.is_empty() {
            return Ok(());
        }
        // Read only after the leases are granted: a change committed later fences the fill.
        let wanted: Vec<String> = held.iter().map(|(k, _)| k.clone()).collect();
        let rows = match self.source.fetch(&self.q, Some(&wanted)).await {
            Ok(r) => r,
            Err(e) => {
                log(&format!("warm: {e}"));
                s.errors.fetch_add(held.len() as u64, Ordering::Relaxed);
                self.release(&mut conn, &held).await;
                return Ok(());
            }
        };
        let by_key: HashMap<&str, &Row> = rows.iter().map(|r| (r.key.as_str(), r)).collect();
        let ttl_ms = self.q.ttl.unwrap_or(self.cfg.default_ttl).saturating_mul(1000).max(1);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut filled = Vec::new();
        let mut gone = Vec::new();
        for (k, token) in &held {
            let Some(row) = by_key.get(k.as_str()) else {
                gone.push((k.clone(), token.clone()));
                continue;
            };
            let full = format!("{}{k}", self.prefix);
            let cmd = pipe.cmd("TIERCACHE.SET").arg(&full);
            match lz4::compress_if_worth(&row.value, self.cfg.compress_min_size) {
                Some(frame) => cmd.arg(frame).arg("ENCODING").arg("lz4"),
                None => cmd.arg(&row.value).arg("NOCOMPRESS"),
            };
            cmd.arg("PX").arg(ttl_ms);
            if self.q.stale > 0 {
                cmd.arg("STALE").arg(self.q.stale);
            }
            cmd.arg("TAGS").arg(row.tags.len() + 1).arg(&self.ns_tag);
            for t in &row.tags {
                cmd.arg(t);
            }
            cmd.arg("LEASE").arg(token);
            filled.push(k.clone());
        }
        if !gone.is_empty() {
            // The row disappeared between the two reads: nothing to store.
            s.skipped.fetch_add(gone.len() as u64, Ordering::Relaxed);
            self.release(&mut conn, &gone).await;
        }
        if filled.is_empty() {
            return Ok(());
        }
        let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(|e| format!("Redis: {e}"))?;
        for (k, r) in filled.iter().zip(replies) {
            match r {
                Value::Okay => {
                    s.loaded.fetch_add(1, Ordering::Relaxed);
                }
                Value::ServerError(e) if e.code() == "FENCED" => {
                    // A fresher write or an invalidation came in between: it wins.
                    s.skipped.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    log(&format!("warm: {}: fill of {k}: {other:?}", self.q.name));
                    s.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    async fn release(&self, conn: &mut MultiplexedConnection, held: &[(String, String)]) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (k, token) in held {
            pipe.cmd("TIERCACHE.RELEASE").arg(format!("{}{k}", self.prefix)).arg(token);
        }
        let _ = pipe.query_async::<Vec<Value>>(conn).await;
    }
}

/// Whether stderr is a terminal (progress bar) or not (log lines).
pub fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_parses() {
        let f = "-- a comment\n-- tiercache: name=u key=user:{id} tags=user:{id},org:{org_id} ttl=60 stale=5\nSELECT id,\n org_id FROM users;\n\n-- tiercache: key=p:{id}\nSELECT id FROM p;\n";
        let q = parse_file(f).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].name, "u");
        assert_eq!(q[0].sql, "SELECT id,\n org_id FROM users");
        assert_eq!(q[0].tags.len(), 2);
        assert_eq!((q[0].ttl, q[0].stale), (Some(60), 5));
        assert_eq!(q[1].name, "query2");
        assert!(parse_file("SELECT 1;").is_err());
        assert!(parse_file("-- tiercache: tags=a\nSELECT 1;").is_err());
        assert!(parse_file("-- tiercache: key=a bogus=1\nSELECT 1;").is_err());
        assert!(parse_file("-- tiercache: key=a\nSELECT 1").is_err());
        assert!(parse_file("-- tiercache: key=a name=x\nSELECT 1;\n-- tiercache: key=b name=x\nSELECT 2;").is_err());
    }

    #[test]
    fn sql_wraps() {
        let q = parse_file("-- tiercache: key=user:{id} tags=org:{org_id}\nSELECT id, org_id FROM users;").unwrap();
        assert_eq!(
            wrapped_sql(&q[0], Dialect::Postgres, true),
            "SELECT ('user:' || q.\"id\"::text) AS __tc_key, ('org:' || q.\"org_id\"::text) AS __tc_tag0, q.* FROM (SELECT id, org_id FROM users) AS q WHERE ('user:' || q.\"id\"::text) = ANY($1::text[])"
        );
        assert!(wrapped_sql(&q[0], Dialect::Sqlite, true).ends_with("IN (SELECT value FROM json_each(?1))"));
    }
}

/// `tiercache warm` arguments.
#[derive(clap::Args)]
pub struct WarmArgs {
    /// PostgreSQL connection string (or use --sqlite).
    #[arg(long, env = "TIERCACHE_PG_DSN", conflicts_with = "sqlite")]
    dsn: Option<String>,
    /// An SQLite database file to read instead of PostgreSQL.
    #[arg(long)]
    sqlite: Option<String>,
    /// The annotated SQL file (see cli/README.md, "Warming").
    #[arg(long, default_value = "cache_warming.sql")]
    file: String,
    #[arg(long, env = "TIERCACHE_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    /// The clients' namespace and schema version: keys become `<namespace>:v<version>:<key>`.
    #[arg(long, default_value = "app")]
    namespace: String,
    #[arg(long, default_value_t = 1)]
    schema_version: u32,
    /// Fresh period in seconds of queries without ttl=.
    #[arg(long, default_value_t = 300)]
    ttl: u64,
    /// Values of at least this many bytes are lz4-framed (the Rust client's default).
    #[arg(long, default_value_t = 1024)]
    compress_min_size: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Keys per batch (one lease pipeline, one filtered query, one fill pipeline).
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Keys per second at most (default: no limit).
    #[arg(long)]
    rate: Option<f64>,
    /// How long a batch's leases last, in milliseconds (the filtered query must finish within it).
    #[arg(long, default_value_t = 30_000)]
    lease_ms: u64,
    /// The resume state (default: <file>.state.json).
    #[arg(long)]
    state: Option<String>,
    /// Ignore the resume state and start over.
    #[arg(long)]
    restart: bool,
    /// Log lines instead of a progress bar even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

pub async fn cli(a: WarmArgs) -> Result<(), String> {
    if let Some(r) = a.rate {
        if !(r > 0.0 && r.is_finite()) {
            return Err("--rate must be a positive number".into());
        }
    }
    let text = std::fs::read_to_string(&a.file).map_err(|e| format!("cannot read {}: {e}", a.file))?;
    let source = match (a.dsn, a.sqlite) {
        (Some(dsn), None) => {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("PostgreSQL: {}", crate::pg::pg_err(&e)))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    log(&format!("PostgreSQL connection: {e}"));
                }
            });
            Source::Postgres(Arc::new(c))
        }
        (None, Some(path)) => {
            if !std::path::Path::new(&path).exists() {
                return Err(format!("{path}: no such file"));
            }
            Source::Sqlite(path)
        }
        _ => return Err("give --dsn (PostgreSQL) or --sqlite (a database file)".into()),
    };
    let cfg = Config {
        redis_url: a.redis,
        namespace: a.namespace,
        schema_version: a.schema_version,
        default_ttl: a.ttl.max(1),
        compress_min_size: a.compress_min_size,
        concurrency: a.concurrency.max(1),
        batch: a.batch.max(1),
        rate: a.rate,
        lease_ms: a.lease_ms.max(1),
        state_path: a.state.unwrap_or_else(|| format!("{}.state.json", a.file)),
        fresh_start: a.restart,
        progress_bar: !a.no_progress && stderr_is_tty(),
    };
    let (s, secs) = run(cfg, &text, source).await?;
    let (loaded, skipped, errors) =
        (s.loaded.load(Ordering::Relaxed), s.skipped.load(Ordering::Relaxed), s.errors.load(Ordering::Relaxed));
    println!("warm: loaded {loaded}, skipped {skipped}, errors {errors}, {secs:.2} seconds");
    if errors > 0 {
        return Err(format!("{errors} key(s) failed"));
    }
    Ok(())
}
