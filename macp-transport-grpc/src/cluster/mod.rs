//! Cluster mode: several runtime nodes on one PostgreSQL schema, each
//! serving the shards it holds a lease on.
//!
//! ```text
//!  request ─► Router::session(id) ─ shard_of(id) ─┬─ held here ─► that shard's Driver (own kernel, own log)
//!                                                  └─ elsewhere ─► forwarded to the owner (cluster secret)
//!                                                                 or UNAVAILABLE naming it (retry there)
//!
//!  Node (one task): every TTL/4 Membership::tick ─► acquired: recover a Driver from the shard's log, route to it
//!                                                   lost:      unroute, stop (its writes are refused anyway)
//!                                                   hand over: unroute, drain, stop, release the lease
//! ```
//!
//! A shard is the unit everything moves in: each held shard runs the same
//! [`Driver`](crate::driver::Driver) a single-node runtime runs (its own kernel and commit
//! pipeline), over a [`macp_storage_pg::PgStorage`] of that shard whose
//! every write the database fences with the lease's epoch. Taking a shard
//! over is therefore exactly a restart's recovery, run on one shard: the
//! checkpoint, the log after it, the timers that fell due meanwhile firing
//! at once. Why one driver per shard rather than one kernel per node: a
//! shard then moves alone (its checkpoint covers its sessions only), a
//! lost lease stops exactly the sessions it covers, and the kernel needs
//! no notion of shards at all.
//!
//! What is node-wide: the watch channels (one [`Hub`](crate::hub::Hub)'s
//! broadcast senders shared by every shard's hub), authentication and rate
//! limits.
//!
//! What is cluster-wide: the registries ([`registries`]: a table every
//! node syncs each kernel it runs to), and, with the cluster secret, a
//! request about another node's session is forwarded there
//! ([`Router::peer`], [`forward`]), and
//! ListSessions, WatchSessions and WatchSignals ask every other live node
//! too ([`Router::fan`]), as forwarded requests each node answers from its
//! own shards, and merge the answers (a listing fails UNAVAILABLE when a
//! node does not answer; a watch opens a stream to each node that joins
//! and reopens a failed one at the next membership round). One hop only:
//! a forwarded request is never forwarded or fanned out again. Without the
//! secret, a node answers requests for its own shards only (and tells
//! clients where the others are), and its listings and watches see its own
//! shards and every ended session, and the Signals sent to it.

pub mod forward;
mod node;
pub mod registries;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use macp_storage_pg::shard_of;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::driver::Command;
use forward::{Forwarder, PeerClient};

pub use node::{Node, NodeError, NodeSettings};
pub use registries::ClusterRegistries;

/// Another node to forward a request to, and how to vouch for its caller.
#[derive(Debug)]
pub struct Peer {
    /// A client of the node serving the session.
    pub client: PeerClient,
    forwarder: Arc<Forwarder>,
}

impl Peer {
    /// `message` as a request to the peer on behalf of `identity`.
    pub fn request<T>(&self, message: T, identity: &macp_kernel::Identity) -> tonic::Request<T> {
        self.forwarder.request(message, identity)
    }
}

/// Where a session's requests go.
#[derive(Clone, Debug)]
pub enum Router {
    /// A single-node runtime: one driver serves every session.
    Single(mpsc::Sender<Command>),
    /// A cluster node: the driver of the session's shard, if held here.
    Cluster(Arc<ShardTable>),
}

impl Router {
    /// The driver serving `session_id`, or UNAVAILABLE (naming the node
    /// that holds it, when known) if no driver here does.
    pub fn session(&self, session_id: &str) -> Result<mpsc::Sender<Command>, Status> {
        match self {
            Router::Single(tx) => Ok(tx.clone()),
            Router::Cluster(table) => table.local(session_id),
        }
    }

    /// A driver for questions every driver answers alike (the registries,
    /// which every shard loads from the same files): a cluster node's
    /// registry driver.
    pub fn any(&self) -> Result<mpsc::Sender<Command>, Status> {
        match self {
            Router::Single(tx) => Ok(tx.clone()),
            Router::Cluster(table) => Ok(table.registry.clone()),
        }
    }

    /// Every driver here (listings).
    pub fn all(&self) -> Vec<mpsc::Sender<Command>> {
        match self {
            Router::Single(tx) => vec![tx.clone()],
            Router::Cluster(table) => table.locals(),
        }
    }

    /// The node to forward a request about `session_id` to: another node
    /// that holds its shard, when this node does not and forwarding is on.
    /// Never for a request that was itself forwarded (`forwarded`): one hop
    /// only, so two nodes whose views of the shards briefly disagree cannot
    /// bounce a request between them; it gets UNAVAILABLE instead.
    pub fn peer(&self, session_id: &str, forwarded: bool) -> Option<Peer> {
        match self {
            Router::Cluster(table) if !forwarded => table.peer(session_id),
            _ => None,
        }
    }

    /// The other nodes a cluster-wide read (ListSessions, WatchSessions,
    /// WatchSignals) asks too: on a cluster node that forwards (it has the
    /// cluster secret), for a request a client sent it. A forwarded
    /// request is answered from this node's shards only, so every node is
    /// asked once; a single-node runtime, or a node without the secret,
    /// answers from what it serves.
    pub fn fan(&self, forwarded: bool) -> Option<Fan> {
        match self {
            Router::Cluster(table) if !forwarded && table.forwarder.is_some() => Some(Fan(table.clone())),
            _ => None,
        }
    }

    /// On a cluster node, reads the cluster's registries again if another
    /// node changed them; true when they had changed (a request refused
    /// for an unknown policy or mode is then worth one more try).
    pub async fn refresh_registries(&self) -> bool {
        match self {
            Router::Single(_) => false,
            Router::Cluster(table) => table.refresh_registries().await,
        }
    }

    /// Whether this is a cluster node.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Router::Cluster(_))
    }
}

impl From<mpsc::Sender<Command>> for Router {
    fn from(tx: mpsc::Sender<Command>) -> Self {
        Router::Single(tx)
    }
}

/// The other live nodes of a cluster-wide read, as of each membership
/// round (see [`Router::fan`]).
#[derive(Clone, Debug)]
pub struct Fan(Arc<ShardTable>);

impl Fan {
    /// Every other node live at the last membership round, in node-id
    /// order, with a client of it (or why none can be made: an address
    /// that is no address).
    pub fn peers(&self) -> Vec<(String, Result<Peer, Status>)> {
        self.peers_by(Forwarder::client)
    }

    /// [`Fan::peers`], with clients for the long-lived streams of watches
    /// (on connections of their own: [`Forwarder::watch_client`]).
    pub fn watch_peers(&self) -> Vec<(String, Result<Peer, Status>)> {
        self.peers_by(Forwarder::watch_client)
    }

    fn peers_by(
        &self,
        client: fn(&Forwarder, &str) -> Result<PeerClient, Status>,
    ) -> Vec<(String, Result<Peer, Status>)> {
        let Some(forwarder) = &self.0.forwarder else { return Vec::new() };
        let t = self.0.read();
        let mut v: Vec<(String, Result<Peer, Status>)> = t
            .addrs
            .iter()
            .filter(|(node, _)| **node != self.0.node_id)
            .map(|(node, addr)| {
                let peer = client(forwarder, addr).map(|client| Peer { client, forwarder: forwarder.clone() });
                (node.clone(), peer)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Marked changed at every membership round: when a watch looks for
    /// nodes that joined, and reopens the streams of members that failed.
    pub fn rounds(&self) -> watch::Receiver<()> {
        self.0.rounds.subscribe()
    }
}

/// A shard this node serves.
#[derive(Clone, Debug)]
struct Served {
    tx: mpsc::Sender<Command>,
    /// The lease's end as this node counts it: after it, nothing of the
    /// shard is served until a renewal says otherwise.
    valid_until: Instant,
}

#[derive(Debug, Default)]
struct Table {
    served: HashMap<u32, Served>,
    /// Every shard with a valid lease, by holder (as of the last tick).
    owners: BTreeMap<u32, String>,
    /// Live nodes' advertised addresses.
    addrs: HashMap<String, String>,
}

/// Which shards this node serves, and who holds the others: the node task
/// writes it at every membership tick, request handlers read it.
#[derive(Debug)]
pub struct ShardTable {
    shards: u32,
    node_id: String,
    table: RwLock<Table>,
    /// Forwarding to the node that serves a session (when the cluster has
    /// a shared secret).
    forwarder: Option<Arc<Forwarder>>,
    /// A driver of no shard that holds the registries (synced to the
    /// cluster's registry table, as every shard is): it answers discovery
    /// and registry questions also while the node serves no shard, and
    /// validates registry changes.
    registry: mpsc::Sender<Command>,
    /// The cluster's registries, and the one path that changes them.
    registries: Arc<ClusterRegistries>,
    /// Told of every membership round (see [`Fan::rounds`]).
    rounds: watch::Sender<()>,
}

impl ShardTable {
    /// An empty table for a cluster of `shards` shards.
    pub fn new(
        node_id: &str,
        shards: u32,
        forwarder: Option<Arc<Forwarder>>,
        registry: mpsc::Sender<Command>,
        registries: Arc<ClusterRegistries>,
    ) -> Self {
        ShardTable {
            shards,
            node_id: node_id.to_string(),
            table: RwLock::new(Table::default()),
            forwarder,
            registry,
            registries,
            rounds: watch::Sender::new(()),
        }
    }

    /// Makes a registry change (RegisterPolicy, RegisterExtMode, ...)
    /// cluster-wide; see [`ClusterRegistries::change`].
    pub async fn change_registry(&self, input: macp_kernel::Input) -> Result<macp_kernel::Reply, Status> {
        self.registries.change(input, &self.registry, &self.sync_targets()).await
    }

    /// Reads the cluster's registries again if another node changed them
    /// (after a request was refused for a policy or mode this node may not
    /// have synced yet): true when every driver here now holds the table's
    /// current registries, so one retry of the refused request is worth
    /// making. True also when this call found nothing new: the twice-a-
    /// second poll may have been syncing the change while the request was
    /// refused, and the refresh waited for it to finish.
    pub async fn refresh_registries(&self) -> bool {
        match self.registries.refresh(&self.sync_targets()).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("cluster registry refresh failed: {e}");
                false
            }
        }
    }

    /// Syncs one driver (a shard loaded while the registries changed).
    async fn resync(&self, driver: &mpsc::Sender<Command>) {
        self.registries.sync_one(driver).await;
    }

    /// Every driver here that holds registries: the registry driver and
    /// the served shards'.
    fn sync_targets(&self) -> Vec<mpsc::Sender<Command>> {
        let mut v = vec![self.registry.clone()];
        v.extend(self.read().served.values().map(|s| s.tx.clone()));
        v
    }

    fn peer(&self, session_id: &str) -> Option<Peer> {
        let forwarder = self.forwarder.as_ref()?;
        let shard = shard_of(session_id, self.shards);
        let t = self.read();
        if t.served.get(&shard).is_some_and(|s| Instant::now() < s.valid_until) {
            return None;
        }
        let owner = t.owners.get(&shard).filter(|o| **o != self.node_id)?;
        let client = forwarder.client(t.addrs.get(owner)?).ok()?;
        Some(Peer { client, forwarder: forwarder.clone() })
    }

    /// The cluster's shard count.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // A panic while the lock was held leaves plain data behind: go on.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The driver of `session_id`'s shard if it is served here and its
    /// lease is still good; else UNAVAILABLE saying where to go.
    fn local(&self, session_id: &str) -> Result<mpsc::Sender<Command>, Status> {
        let shard = shard_of(session_id, self.shards);
        let t = self.read();
        if let Some(s) = t.served.get(&shard) {
            if Instant::now() < s.valid_until {
                return Ok(s.tx.clone());
            }
        }
        let msg = match t.owners.get(&shard) {
            Some(node) if *node != self.node_id => {
                let addr = t.addrs.get(node).map_or("an unknown address", String::as_str);
                format!(
                    "session {session_id} is in shard {shard}, served by cluster node {node} at {addr}; \
                     send it there (this node does not forward: no cluster secret, or the request was forwarded already)"
                )
            }
            _ => format!(
                "session {session_id} is in shard {shard}, which is changing hands between cluster nodes; \
                 nothing was recorded, retry in a moment"
            ),
        };
        Err(Status::unavailable(msg))
    }

    /// The drivers of the shards served here, in shard order.
    fn locals(&self) -> Vec<mpsc::Sender<Command>> {
        let t = self.read();
        let now = Instant::now();
        let mut v: Vec<(&u32, &Served)> = t.served.iter().filter(|(_, s)| now < s.valid_until).collect();
        v.sort_by_key(|(shard, _)| **shard);
        v.into_iter().map(|(_, s)| s.tx.clone()).collect()
    }

    fn serve(&self, shard: u32, tx: mpsc::Sender<Command>, valid_until: Instant) {
        self.write().served.insert(shard, Served { tx, valid_until });
    }

    fn unserve(&self, shard: u32) -> Option<mpsc::Sender<Command>> {
        self.write().served.remove(&shard).map(|s| s.tx)
    }

    fn renewed(&self, leases: impl Iterator<Item = (u32, Instant)>) {
        let mut t = self.write();
        for (shard, until) in leases {
            if let Some(s) = t.served.get_mut(&shard) {
                s.valid_until = until;
            }
        }
    }

    fn membership(&self, owners: BTreeMap<u32, String>, addrs: HashMap<String, String>) {
        let mut t = self.write();
        t.owners = owners;
        t.addrs = addrs;
        drop(t);
        self.rounds.send_replace(());
    }

    /// The shards served here (for logs and tests).
    pub fn served(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.read().served.keys().copied().collect();
        v.sort_unstable();
        v
    }
}
