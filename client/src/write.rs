//! The write paths: write-through ([`TierCache::write_through`]), invalidations applied after a database
//! commit ([`TierCache::tx_invalidations`]) and write-behind ([`TierCache::write_behind`], applied by
//! `tiercache write-behind run`).
//!
//! ## Write-through and concurrent writers
//!
//! `write_through` takes a fill lease on the key *before* the database write (`TIERCACHE.DEL key` and
//! `TIERCACHE.GET key LEASE ms` in one `MULTI`), runs the write, then fills with `TIERCACHE.SET ...
//! LEASE token`. The `DEL` fences every lease already out on the key (a `get_or_load` loader that read
//! the old row), and the fill only lands if nothing touched the key (another writer's `DEL`, `SET`,
//! an invalidation of one of its tags) between the grant, which came before the database write, and
//! the fill, which comes after the commit. When it does not land, or another client held the key's
//! lease, the key is deleted (`TIERCACHE.DEL`, which fences again) instead of set: the next reader
//! loads the committed row. So two writers of one key racing each other leave either the last
//! committed value or no entry, never the older value.
//!
//! ## Write-behind
//!
//! A write is accepted by one Lua script on the main connection: `XADD` to the key's stream
//! `tiercache:wb:{<namespace>:<shard>}` (shard = FNV-1a of the caller's key mod [`WRITE_BEHIND_SHARDS`],
//! so each key has one stream and its writes one order), the idempotency record, and the cache update
//! (`TIERCACHE.SET`, or `TIERCACHE.DEL` for a delete) — atomically, so two accepts of one key can't
//! leave the cache and the queue in different orders. The message fields are `k` (the caller's key),
//! `op` (`set` or `del`), `v` (the value as JSON text; empty for `del`), `id` (the idempotency id) and
//! `ts` (accept time, Unix ms). See cli/README.md for the worker.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use redis::Value;
use serde::{de::DeserializeOwned, Serialize};

use crate::{bulk, encode, metrics, CacheValue, Conn, Error, Inner, Lease, Opts, TierCache};

/// Streams per namespace for write-behind. Fixed, so that every client and worker agree on which
/// stream a key's writes go to (a key's order is its stream's order).
pub const WRITE_BEHIND_SHARDS: u32 = 16;

/// How long an idempotency id is remembered by default (a retried accept within it is not queued
/// twice).
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The stream of write-behind shard `shard` of `namespace`. The hash tag keeps a stream and its
/// idempotency records in one Redis Cluster slot.
pub fn write_behind_stream(namespace: &str, shard: u32) -> String {
    format!("tiercache:wb:{{{namespace}:{shard}}}")
}

/// The write-behind shard of a caller's key (FNV-1a, stable across processes and languages).
pub fn write_behind_shard(key: &str) -> u32 {
    let mut x: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        x = (x ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    (x % u64::from(WRITE_BEHIND_SHARDS)) as u32
}

/// The outcome of [`TierCache::write_behind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The stream entry id of the write (of the first accept, for a repeated idempotency id).
    pub stream_id: String,
    /// False when the idempotency id had been accepted already: nothing was queued or cached again.
    pub new: bool,
}

/// What a write-behind message asks the worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    /// Store the message's value at its key.
    Set,
    /// Delete the key.
    Delete,
}

/// XADD + idempotency record + the key's latest entry id (`<stream>:latest`, a hash the worker clears
/// when it has applied that entry) + cache update, atomically. KEYS: stream, idempotency key (or the
/// stream again when there is no id), cache key, latest hash. ARGV: idempotency TTL ms (0: no id), k,
/// op, v, id, ts, then the cache command's name and arguments.
const ACCEPT_SCRIPT: &str = r#"
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  local prev = redis.call('GET', KEYS[2])
  if prev then return {0, prev} end
end
local id = redis.call('XADD', KEYS[1], '*', 'k', ARGV[2], 'op', ARGV[3], 'v', ARGV[4], 'id', ARGV[5], 'ts', ARGV[6])
if ttl > 0 then redis.call('SET', KEYS[2], id, 'PX', ttl) end
redis.call('HSET', KEYS[4], ARGV[2], id)
redis.call(unpack(ARGV, 7))
return {1, id}
"#;

impl TierCache {
    /// Write-through: runs `db_write` (the database write, committed when its future resolves `Ok`),
    /// then updates the cache so that every reader sees `value`, and returns `db_write`'s output.
    ///
    /// - A `get_or_load` loader that read the old row before the write cannot store it afterwards:
    ///   its lease is fenced (its fill gets `FENCED`), so the old value is never served.
    /// - On a database error nothing is cached: the error comes back as [`Error::Load`], the lease is
    ///   given back, and the key (deleted before the write) is loaded from the database by the next
    ///   reader.
    /// - Concurrent writers of one key: see the module docs; the cache ends with the last committed
    ///   value or no entry.
    /// - A Redis failure after the commit is logged, not returned (the database write stands); the
    ///   entry the key held was already deleted before the write when Redis answered then.
    ///
    /// Readers of the key during the write wait for it inside Redis (up to the builder's
    /// `wait_timeout`) and receive `value`.
    pub async fn write_through<T, R, E, F, Fut>(&self, key: &str, value: &T, opts: &Opts, db_write: F) -> Result<R, Error<E>>
    where
        T: CacheValue,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        let i = &self.inner;
        let raw = encode(value).map_err(Error::Codec)?;
        let full = self.redis_key(key);
        i.drop_key(&full);
        let lease = i.writer_lease(&full).await;
        let out = match db_write().await {
            Ok(out) => out,
            Err(e) => {
                if let Some(mut lease) = lease {
                    let cmd = redis::cmd("TIERCACHE.RELEASE").arg(&full).arg(&lease.token).clone();
                    if i.lease_call::<i64>(&mut lease.conn, &cmd).await.is_ok() {
                        i.pool_put(lease.conn);
                    }
                }
                return Err(Error::Load(std::sync::Arc::new(e)));
            }
        };
        i.drop_key(&full);
        if let Some(lease) = lease {
            // The fill goes on the main connection (NOLOOP: no push for our own write, as in a
            // get_or_load fill); the lease's connection stays open until the reply.
            let ticket = i.ticket(&full, opts);
            let cmd = i.set_cmd(&full, &raw, opts, Some(&lease.token));
            match i.call::<()>(&cmd).await {
                Ok(()) => {
                    i.pool_put(lease.conn);
                    i.l1_put_own_write(&full, raw, opts, ticket);
                    return Ok(out);
                }
                Err(e) => {
                    if e.code() == Some("FENCED") {
                        metrics::bump(&i.metrics.fenced);
                        i.pool_put(lease.conn);
                    }
                    tracing::debug!(key = full, error = %e, "tiercache: write-through fill not stored; deleting the key");
                }
            }
        }
        // Someone else touched the key or held its lease meanwhile: delete (and fence) rather than
        // risk storing a value older than theirs; the next reader loads the committed row.
        if let Err(e) = i.call::<i64>(redis::cmd("TIERCACHE.DEL").arg(&full)).await {
            tracing::warn!(key = full, error = %e, "tiercache: write-through committed but the cache could not be updated");
        }
        i.drop_key(&full);
        Ok(out)
    }

    /// Collects cache invalidations (keys and tags) for a database transaction `tx` and applies them
    /// only after it commits: see [`TxInvalidations`].
    pub fn tx_invalidations<X>(&self, tx: X) -> TxInvalidations<X> {
        TxInvalidations { cache: self.clone(), tx, keys: Vec::new(), tags: Vec::new() }
    }

    /// Write-behind: queues the write durably on the key's Redis stream and updates the cache at once
    /// (readers see `value` now); `tiercache write-behind run` applies it to the database later, in
    /// order per key. With `idempotency_id`, a repeated call with the same id (a retry after a
    /// timeout) is accepted once: the second answers `new: false` and changes nothing.
    pub async fn write_behind<T>(
        &self,
        key: &str,
        value: &T,
        opts: &Opts,
        idempotency_id: Option<&str>,
    ) -> Result<Accepted, Error<std::convert::Infallible>>
    where
        T: Serialize + DeserializeOwned,
    {
        let raw = encode(value).map_err(Error::Codec)?;
        let json = serde_json::to_string(value).map_err(|e| Error::Codec(e.to_string()))?;
        let full = self.redis_key(key);
        let cache_cmd = self.inner.set_cmd(&full, &raw, opts, None);
        let accepted = self.accept(key, WriteOp::Set, &json, idempotency_id, &full, &cache_cmd).await?;
        if accepted.new {
            // As in `set`: void a racing read, then keep the new value in L1.
            self.inner.drop_key(&full);
            let ticket = self.inner.ticket(&full, opts);
            self.inner.l1_put_own_write(&full, raw, opts, ticket);
        }
        Ok(accepted)
    }

    /// Write-behind delete: queues `op = del` for `key` and deletes it from the cache at once.
    pub async fn write_behind_delete(
        &self,
        key: &str,
        idempotency_id: Option<&str>,
    ) -> Result<Accepted, Error<std::convert::Infallible>> {
        let full = self.redis_key(key);
        let cache_cmd = redis::cmd("TIERCACHE.DEL").arg(&full).clone();
        self.inner.drop_key(&full);
        let accepted = self.accept(key, WriteOp::Delete, "", idempotency_id, &full, &cache_cmd).await?;
        self.inner.drop_key(&full);
        Ok(accepted)
    }

    async fn accept(
        &self,
        key: &str,
        op: WriteOp,
        json: &str,
        idempotency_id: Option<&str>,
        full: &str,
        cache_cmd: &redis::Cmd,
    ) -> Result<Accepted, Error<std::convert::Infallible>> {
        let ns = &self.inner.cfg.namespace;
        let stream = write_behind_stream(ns, write_behind_shard(key));
        let idem_key = match idempotency_id {
            Some(id) => format!("{stream}:idem:{id}"),
            None => stream.clone(),
        };
        let ttl = if idempotency_id.is_some() { DEFAULT_IDEMPOTENCY_TTL.as_millis() as u64 } else { 0 };
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ACCEPT_SCRIPT).arg(4).arg(&stream).arg(&idem_key).arg(full).arg(format!("{stream}:latest"));
        cmd.arg(ttl).arg(key).arg(match op {
            WriteOp::Set => "set",
            WriteOp::Delete => "del",
        });
        cmd.arg(json).arg(idempotency_id.unwrap_or("")).arg(ts);
        for a in cache_cmd.args_iter() {
            if let redis::Arg::Simple(b) = a {
                cmd.arg(b);
            }
        }
        let reply: Vec<Value> = self.inner.call(&cmd).await.map_err(Error::from)?;
        let new = matches!(reply.first(), Some(Value::Int(1)));
        let stream_id = bulk(reply.get(1)).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        Ok(Accepted { stream_id, new })
    }
}

impl Inner {
    /// A connection for a lease of our own: an idle pooled one, or a new one.
    async fn lease_conn(&self) -> Option<Conn> {
        let pooled = self.blocking.lock().pop();
        if let Some(c) = pooled {
            return Some(c);
        }
        match self.remote.blocking().await {
            Ok(c) => Some(c),
            Err(_) => {
                self.record(false);
                None
            }
        }
    }

    /// Before a write-through's database write: `TIERCACHE.DEL key` (fencing every lease out on it)
    /// and a lease read, in one `MULTI` (where lease reads never wait). `None` when another client
    /// holds the key's lease (`BUSY`) or Redis fails.
    async fn writer_lease(&self, full: &str) -> Option<Lease> {
        if self.circuit_open() {
            return None;
        }
        let mut conn = self.lease_conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("TIERCACHE.DEL")
            .arg(full)
            .ignore()
            .cmd("TIERCACHE.GET")
            .arg(full)
            .arg("LEASE")
            .arg(self.cfg.lease_timeout.as_millis().max(1) as u64);
        let r = match tokio::time::timeout(self.cfg.op_timeout, pipe.query_async::<(Vec<Value>,)>(&mut conn)).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "tiercache: Redis timed out"))),
        };
        let (reply,) = match r {
            Ok(r) => {
                self.record(true);
                r
            }
            Err(e) => {
                let io = e.is_io_error() || e.is_timeout() || e.is_connection_dropped();
                self.record(!io);
                if !io {
                    self.pool_put(conn);
                }
                return None;
            }
        };
        match (bulk(reply.first()).as_deref(), bulk(reply.get(2))) {
            (Some(b"FILL"), Some(token)) => Some(Lease { conn, token }),
            _ => {
                self.pool_put(conn);
                None
            }
        }
    }
}

/// Invalidations collected during a database transaction, applied only after it commits.
///
/// It owns the transaction, so the only way to commit it is [`TxInvalidations::commit_with`], which
/// commits and then invalidates: forgetting the invalidations is not possible. Dropping it (an early
/// return, `?`) drops the transaction (which rolls back, for `tokio-postgres` and `sqlx`) and the
/// invalidations with it; [`TxInvalidations::rollback_with`] rolls back explicitly. The transaction
/// is reached through `Deref`/`DerefMut` (or [`TxInvalidations::tx`]).
///
/// With `tokio-postgres`:
///
/// ```ignore
/// let mut tx = cache.tx_invalidations(client.transaction().await?);
/// tx.execute("UPDATE users SET name = $1 WHERE id = $2", &[&name, &id]).await?;
/// tx.key(format!("user:{id}")).tag(format!("team:{team}"));
/// tx.commit_with(|t| t.commit()).await?; // commit, then TIERCACHE.DEL / TIERCACHE.INVALIDATE
/// ```
///
/// With `sqlx` (the same API; the transaction is `sqlx::Transaction`):
///
/// ```ignore
/// let mut tx = cache.tx_invalidations(pool.begin().await?);
/// sqlx::query("UPDATE users SET name = $1 WHERE id = $2").bind(&name).bind(id).execute(&mut **tx.tx()).await?;
/// tx.tag(format!("user:{id}"));
/// tx.commit_with(|t| t.commit()).await?;
/// ```
#[must_use = "dropping it rolls the transaction back; commit with .commit_with(|t| t.commit())"]
pub struct TxInvalidations<X> {
    cache: TierCache,
    tx: X,
    keys: Vec<String>,
    tags: Vec<String>,
}

/// Why [`TxInvalidations::commit_with`] failed.
#[derive(Debug)]
pub enum TxError<E> {
    /// The commit failed: nothing was invalidated.
    Commit(E),
    /// The commit succeeded, but Redis refused or failed the invalidations (after retries): the
    /// cache may serve the old values until their TTL.
    Invalidate(redis::RedisError),
}

impl<E: std::fmt::Display> std::fmt::Display for TxError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxError::Commit(e) => write!(f, "commit failed: {e}"),
            TxError::Invalidate(e) => write!(f, "committed, but the cache invalidation failed: {e}"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for TxError<E> {}

impl<X> Deref for TxInvalidations<X> {
    type Target = X;
    fn deref(&self) -> &X {
        &self.tx
    }
}

impl<X> DerefMut for TxInvalidations<X> {
    fn deref_mut(&mut self) -> &mut X {
        &mut self.tx
    }
}

impl<X> TxInvalidations<X> {
    /// The transaction.
    pub fn tx(&mut self) -> &mut X {
        &mut self.tx
    }

    /// Deletes the caller's `key` (as [`TierCache::delete`]) after the commit.
    pub fn key(&mut self, key: impl Into<String>) -> &mut Self {
        self.keys.push(key.into());
        self
    }

    /// Invalidates `tag` (as [`TierCache::invalidate_tags`]) after the commit.
    pub fn tag(&mut self, tag: impl Into<String>) -> &mut Self {
        self.tags.push(tag.into());
        self
    }

    /// The keys and tags collected so far.
    pub fn pending(&self) -> (&[String], &[String]) {
        (&self.keys, &self.tags)
    }

    /// Commits with `commit` (e.g. `|t| t.commit()`), then applies the invalidations: keys with
    /// `TIERCACHE.DEL` (which also fences loads in flight), tags with one `TIERCACHE.INVALIDATE`,
    /// retried 3 times with backoff when Redis fails. A failed commit invalidates nothing.
    pub async fn commit_with<T, E, F, Fut>(self, commit: F) -> Result<T, TxError<E>>
    where
        F: FnOnce(X) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let TxInvalidations { cache, tx, keys, tags } = self;
        let out = commit(tx).await.map_err(TxError::Commit)?;
        let mut delay = Duration::from_millis(20);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match apply_invalidations(&cache, &keys, &tags).await {
                Ok(()) => return Ok(out),
                Err(e) if attempt >= 3 || !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) => {
                    tracing::warn!(error = %e, keys = keys.len(), tags = tags.len(), "tiercache: committed, but invalidation failed");
                    return Err(TxError::Invalidate(e));
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
    }

    /// Rolls back with `rollback` (e.g. `|t| t.rollback()`); the invalidations are dropped.
    pub async fn rollback_with<T, E, F, Fut>(self, rollback: F) -> Result<T, E>
    where
        F: FnOnce(X) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        rollback(self.tx).await
    }
}

async fn apply_invalidations(cache: &TierCache, keys: &[String], tags: &[String]) -> redis::RedisResult<()> {
    for k in keys {
        cache.delete(k).await.map_err(redis_error)?;
    }
    if !tags.is_empty() {
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        cache.invalidate_tags(&tags).await.map_err(redis_error)?;
    }
    Ok(())
}

fn redis_error(e: Error<std::convert::Infallible>) -> redis::RedisError {
    match e {
        Error::Redis(e) => *e,
        Error::Codec(s) => redis::RedisError::from((redis::ErrorKind::Client, "codec", s)),
        Error::Load(never) => match *never {},
        other => redis::RedisError::from((redis::ErrorKind::Client, "tiercache", other.to_string())),
    }
}
