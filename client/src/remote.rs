//! Where the cache's connections come from: one Redis (a URL), the master a set of Sentinels name, or a
//! Redis Cluster; and the connections that carry invalidations (the "feeds") in each case.
//!
//! - **Standalone / Sentinel**: the main connection is one RESP3 [`MultiplexedConnection`] that also
//!   tracks keys and subscribes to the invalidation channel (one feed). With Sentinel, every (re)connect
//!   asks the Sentinels for the current master, so a failover (which closes the clients of the old
//!   master) leads to the new one.
//! - **Cluster**: the main connection is redis-rs's [`ClusterConnection`] (commands route by key, MOVED
//!   and ASK are followed); each master gets a feed of its own (a RESP3 connection tracking the prefix
//!   and subscribed to the channel), which keeps only the messages of that master (by `run_id`: Redis
//!   Cluster forwards every PUBLISH to every node), so gap detection is per node. The slots of each
//!   master are kept (and refreshed by [`watch_topology`]) so that a gap on one node drops only the L1
//!   entries of its slots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Arg, AsyncConnectionConfig, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisFuture, Value};

/// A connection commands are sent on: one server's, or the cluster's (routing by key). The main
/// cluster connection also has the feeds' [`Routes`]: a `TIERCACHE.*` command goes on the feed of the
/// key's master when known, so that the feed's `NOLOOP` keeps this process's own writes from coming
/// back as invalidations of what it just put in L1; a MOVED or ASK answer sends it on through the
/// cluster connection (which follows redirections and refreshes its slots).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection, Option<Arc<Mutex<Routes>>>),
}

/// Masters' slots and the feed connection of each (cluster).
#[derive(Default)]
pub(crate) struct Routes {
    /// Masters by node id: (address, slot ranges).
    topology: Topology,
    feeds: HashMap<String, MultiplexedConnection>,
}

impl Routes {
    fn feed_for(&self, slot: u16) -> Option<MultiplexedConnection> {
        let (id, _) = self.topology.iter().find(|(_, (_, ranges))| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot)))?;
        self.feeds.get(id).cloned()
    }
}

fn redirected(r: &redis::RedisResult<Value>) -> bool {
    match r {
        Ok(Value::ServerError(e)) => matches!(e.code(), "MOVED" | "ASK"),
        Err(e) => e.redirect_node().is_some(),
        Ok(_) => false,
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, routes) => {
                let mut args = cmd.args_iter();
                let tiercache = matches!(args.next(), Some(Arg::Simple(name)) if name.len() > 10 && name[..10].eq_ignore_ascii_case(b"TIERCACHE."));
                let feed = match (tiercache, args.next(), routes.as_ref()) {
                    (true, Some(Arg::Simple(key)), Some(routes)) => routes.lock().feed_for(key_slot(key)),
                    _ => None,
                };
                let Some(mut feed) = feed else { return c.req_packed_command(cmd) };
                Box::pin(async move {
                    let r = feed.req_packed_command(cmd).await;
                    if redirected(&r) {
                        return c.req_packed_command(cmd).await;
                    }
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c, _) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c, _) => c.get_db(),
        }
    }
}

/// What the cache connects to.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Standalone(String),
    /// A `redis::Client` the application built (its address, database, credentials, TLS settings):
    /// connected like a standalone server (`TierCache::builder_with_client`).
    Client(redis::Client),
    Cluster(Vec<String>),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

/// Connection settings shared by every kind of target.
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    pub op_timeout: Duration,
    /// Response timeout of a blocking lease read (wait timeout + op timeout).
    pub blocking_timeout: Duration,
    /// How the feeds track keys (standalone / Sentinel; the cluster builder refuses `ReadKeys`).
    pub tracking: crate::Tracking,
    /// PEM root certificate(s) to trust for `rediss://` instead of the system's (feature `tls`).
    #[cfg(feature = "tls")]
    pub tls_root_cert: Option<Vec<u8>>,
}

/// One invalidation feed: the pushes of one connection, and the node it comes from (cluster only).
pub(crate) struct Feed {
    pub rx: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    pub node: Option<NodeTag>,
    /// The link generation this feed belongs to (see [`Remote::generation`]).
    pub generation: u64,
}

/// A cluster master a feed listens to.
#[derive(Debug, Clone)]
pub(crate) struct NodeTag {
    /// Its cluster node id (stable across restarts; keys [`Remote::slots_of`]).
    pub id: String,
    /// Its `run_id`: the feed keeps only messages that carry it.
    pub run_id: String,
}

/// Masters by node id: (address, slot ranges).
type Topology = HashMap<String, (String, Vec<(u16, u16)>)>;

pub(crate) struct Remote {
    target: Target,
    settings: Settings,
    sentinel: tokio::sync::Mutex<Option<redis::sentinel::SentinelClient>>,
    /// The server of the current link (standalone, or the master Sentinel named at the last connect).
    server: Mutex<Option<redis::Client>>,
    cluster: Option<(redis::cluster::ClusterClient, redis::cluster::ClusterClient)>,
    /// The feed connection of the current link (standalone / Sentinel): dropping it ends the feed.
    feed: Mutex<Option<MultiplexedConnection>>,
    /// Masters, their slots and feeds, as last seen (cluster); replaced at every connect.
    routes: Mutex<Arc<Mutex<Routes>>>,
    /// Bumped at every connect: a feed of an older link is ignored.
    generation: AtomicU64,
}

impl Remote {
    pub fn new(target: Target, settings: Settings) -> redis::RedisResult<Remote> {
        let mut remote = Remote {
            target: target.clone(),
            settings,
            sentinel: tokio::sync::Mutex::new(None),
            server: Mutex::new(None),
            cluster: None,
            feed: Mutex::new(None),
            routes: Mutex::new(Arc::default()),
            generation: AtomicU64::new(0),
        };
        match target {
            Target::Standalone(url) => *remote.server.lock() = Some(remote.open(url.as_str())?),
            Target::Client(client) => *remote.server.lock() = Some(client),
            Target::Cluster(nodes) => {
                let main = remote.cluster_client(&nodes, remote.settings.op_timeout)?;
                let blocking = remote.cluster_client(&nodes, remote.settings.blocking_timeout)?;
                remote.cluster = Some((main, blocking));
            }
            Target::Sentinel { sentinels, master } => {
                let info = redis::sentinel::SentinelNodeConnectionInfo::default();
                #[cfg(feature = "tls")]
                let info = match &remote.settings.tls_root_cert {
                    Some(_) => info.set_tls_mode(redis::TlsMode::Secure),
                    None => info,
                };
                let client = redis::sentinel::SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    master,
                    Some(info),
                    redis::sentinel::SentinelServerType::Master,
                )?;
                *remote.sentinel.get_mut() = Some(client);
            }
        }
        Ok(remote)
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The generation of the current link.
    pub fn generation(&self) -> u64 {
        self.generation.load(SeqCst)
    }

    /// A client for one server (with the configured trust roots for `rediss://`).
    fn open<T: IntoConnectionInfo>(&self, info: T) -> redis::RedisResult<redis::Client> {
        #[cfg(feature = "tls")]
        if let Some(root) = &self.settings.tls_root_cert {
            let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(root.clone()) };
            return redis::Client::build_with_tls(info, certs);
        }
        redis::Client::open(info)
    }

    fn cluster_client(&self, nodes: &[String], response: Duration) -> redis::RedisResult<redis::cluster::ClusterClient> {
        let b = redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
            .connection_timeout(self.settings.op_timeout)
            .response_timeout(response);
        #[cfg(feature = "tls")]
        let b = match &self.settings.tls_root_cert {
            Some(root) => b.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(root.clone()) }),
            None => b,
        };
        b.build()
    }

    /// The server of standalone or Sentinel mode; with Sentinel, asks the Sentinels when `fresh`.
    async fn server(&self, fresh: bool) -> redis::RedisResult<redis::Client> {
        if !fresh {
            if let Some(c) = self.server.lock().clone() {
                return Ok(c);
            }
        }
        let mut sentinel = self.sentinel.lock().await;
        let Some(s) = sentinel.as_mut() else {
            return self.server.lock().clone().ok_or_else(|| (redis::ErrorKind::InvalidClientConfig, "no server").into());
        };
        // Rebuilt through `open`, so that `rediss://` masters get the configured trust roots.
        let master = self.open(s.async_get_client().await?.get_connection_info().clone())?;
        *self.server.lock() = Some(master.clone());
        Ok(master)
    }

    /// A connection for blocking lease reads (one read at a time).
    pub async fn blocking(&self) -> redis::RedisResult<Conn> {
        if let Some((_, blocking)) = &self.cluster {
            return Ok(Conn::Cluster(blocking.get_async_connection().await?, None));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.op_timeout))
            .set_response_timeout(Some(self.settings.blocking_timeout));
        Ok(Conn::Single(self.server(false).await?.get_multiplexed_async_connection_with_config(&config).await?))
    }

    /// A RESP3 feed connection to `info`: tracks `prefix` (BCAST, NOLOOP) or, with
    /// [`crate::Tracking::ReadKeys`], the keys read on it; and subscribes to `channel`.
    async fn feed(
        &self,
        info: ConnectionInfo,
        prefix: &str,
        channel: &str,
    ) -> redis::RedisResult<(MultiplexedConnection, tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>)> {
        let resp3 = info.clone().set_redis_settings(info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let config = AsyncConnectionConfig::new()
            .set_push_sender(tx)
            .set_connection_timeout(Some(self.settings.op_timeout))
            .set_response_timeout(Some(self.settings.op_timeout));
        let mut conn = self.open(resp3)?.get_multiplexed_async_connection_with_config(&config).await?;
        let mut tracking = redis::cmd("CLIENT");
        tracking.arg("TRACKING").arg("ON");
        match self.settings.tracking {
            // Our own writes go to L1 directly; hearing of them would only evict what we just stored.
            crate::Tracking::Broadcast => tracking.arg("BCAST").arg("PREFIX").arg(prefix).arg("NOLOOP"),
            // No NOLOOP: the server forgets a key's readers when it is written, NOLOOP or not, so our own
            // write must evict our copy too (nothing would tell us of the next change).
            crate::Tracking::ReadKeys => &mut tracking,
        };
        tracking.query_async::<()>(&mut conn).await?;
        conn.subscribe(channel).await?;
        Ok((conn, rx))
    }

    /// Connects the main connection and the feeds (a new link generation; the old feeds end).
    pub async fn connect(&self, prefix: &str, channel: &str) -> redis::RedisResult<(Conn, Vec<Feed>)> {
        let generation = self.generation.fetch_add(1, SeqCst) + 1;
        *self.feed.lock() = None;
        *self.routes.lock() = Arc::default();
        let Some((main, _)) = &self.cluster else {
            let server = self.server(true).await?;
            let (conn, rx) = self.feed(server.get_connection_info().clone(), prefix, channel).await?;
            *self.feed.lock() = Some(conn.clone());
            return Ok((Conn::Single(conn), vec![Feed { rx, node: None, generation }]));
        };
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(self.settings.op_timeout)
            .set_response_timeout(self.settings.op_timeout);
        let cluster = main.get_async_connection_with_config(config).await?;
        let mut conn = Conn::Cluster(cluster.clone(), None);
        let topology = cluster_topology(&mut conn).await?;
        let base = match &self.target {
            Target::Cluster(nodes) => nodes.first().map(|n| n.as_str()).unwrap_or_default().into_connection_info()?,
            _ => unreachable!("cluster clients exist only for a cluster target"),
        };
        let mut conns = HashMap::new();
        let mut feeds = Vec::new();
        for (id, (addr, _)) in &topology {
            let info = with_addr(&base, addr)?;
            let (mut feed_conn, rx) = self.feed(info, prefix, channel).await?;
            let info: String = redis::cmd("INFO").arg("server").query_async(&mut feed_conn).await?;
            // The feed keeps only messages carrying this run_id: without it, it could not tell them apart.
            let run_id = info_field(&info, "run_id").ok_or((redis::ErrorKind::Parse, "no run_id in INFO server"))?.to_owned();
            conns.insert(id.clone(), feed_conn);
            feeds.push(Feed { rx, node: Some(NodeTag { id: id.clone(), run_id }), generation });
        }
        let routes = Arc::new(Mutex::new(Routes { topology, feeds: conns }));
        *self.routes.lock() = routes.clone();
        Ok((Conn::Cluster(cluster, Some(routes)), feeds))
    }

    /// The slot ranges of a master as last seen (empty when unknown).
    pub fn slots_of(&self, node_id: &str) -> Vec<(u16, u16)> {
        self.routes.lock().lock().topology.get(node_id).map(|(_, s)| s.clone()).unwrap_or_default()
    }

    /// Reads the cluster's slots on `conn`: true when the set of masters changed since the last connect
    /// (a failover, a master added or removed). Slot moves between known masters only update the slots
    /// kept for scoping gap drops (migrated keys are invalidated by key tracking on both sides).
    pub async fn masters_changed(&self, conn: &mut Conn) -> redis::RedisResult<bool> {
        let now = cluster_topology(conn).await?;
        let routes = self.routes.lock().clone();
        let mut routes = routes.lock();
        let known = &mut routes.topology;
        let same = now.len() == known.len() && now.iter().all(|(id, (addr, _))| known.get(id).is_some_and(|k| &k.0 == addr));
        if same {
            *known = now;
        }
        Ok(!same)
    }
}

/// `base` (credentials, TLS settings) pointed at `host:port`.
fn with_addr(base: &ConnectionInfo, addr: &str) -> redis::RedisResult<ConnectionInfo> {
    let (host, port) = addr.rsplit_once(':').ok_or((redis::ErrorKind::Parse, "bad node address"))?;
    let port: u16 = port.parse().map_err(|_| redis::RedisError::from((redis::ErrorKind::Parse, "bad node port")))?;
    let addr = match base.addr() {
        #[cfg(feature = "tls")]
        redis::ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
            redis::ConnectionAddr::TcpTls { host: host.to_owned(), port, insecure: *insecure, tls_params: tls_params.clone() }
        }
        _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    Ok(base.clone().set_addr(addr))
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

/// Masters by node id, from `CLUSTER SLOTS`.
async fn cluster_topology(conn: &mut Conn) -> redis::RedisResult<Topology> {
    let slots: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let mut out: Topology = HashMap::new();
    for range in slots {
        let Value::Array(parts) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let text = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(Value::SimpleString(s)) => Some(s.clone()),
            Some(Value::Int(n)) => Some(n.to_string()),
            _ => None,
        };
        let (Some(ip), Some(port), Some(id)) = (text(master.first()), text(master.get(1)), text(master.get(2))) else { continue };
        let e = out.entry(id).or_insert_with(|| (format!("{ip}:{port}"), Vec::new()));
        e.1.push((*start as u16, *end as u16));
    }
    Ok(out)
}

/// The cluster slot of a key (CRC16 of the key or of its `{hash tag}`).
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| key[open + 1..].iter().position(|&b| b == b'}').map(|len| &key[open + 1..open + 1 + len]))
        .filter(|t| !t.is_empty());
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % 16384
}
