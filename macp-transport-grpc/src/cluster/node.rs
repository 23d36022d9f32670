//! The node task: keeps this node's membership and runs one [`Driver`] per
//! shard it holds (see the module docs of [`crate::cluster`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use macp_kernel::KernelConfig;
use macp_pipeline::{CheckpointPolicy, RecoveryError};
use macp_storage::{Storage, StorageError};
use macp_storage_pg::{
    ClusterConfig, ClusterError, ClusterRegistry, Membership, PgConfig, PgHost, PgUrl, ShardLease, Tick,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::registries::REGISTRY_POLL;
use super::{ClusterRegistries, ShardTable};
use crate::driver::{Command, Driver, DriverError, Reopen};
use crate::hub::Hub;
use crate::policies_dir::FilePolicy;
use crate::service::Watch;

/// How long a shard's driver gets to finish its batch and checkpoint when
/// the shard is handed over or the node stops.
const DRAIN_WITHIN: Duration = Duration::from_secs(10);
/// Writer connections the node's shards share.
const WRITERS: usize = 4;

/// What a cluster node needs to run.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// The cluster's database.
    pub url: PgUrl,
    /// Its schema, retention and timeouts.
    pub pg: PgConfig,
    /// This node's id, address, the shard count and the lease TTL.
    pub cluster: ClusterConfig,
    /// The kernel of every shard.
    pub kernel: KernelConfig,
    /// Checkpoints of every shard.
    pub checkpoint: CheckpointPolicy,
    /// The policies directory's policies, registered into every shard.
    pub policies: Option<Vec<FilePolicy>>,
    /// Forwarding of other nodes' sessions (none: clients are told where
    /// to go instead).
    pub forwarder: Option<Arc<super::forward::Forwarder>>,
}

/// Why the node could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Joining the cluster or a membership round failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The shared connections could not be opened.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A shard could not be loaded.
    #[error("shard {shard}: {reason}")]
    Shard {
        /// The shard.
        shard: u32,
        /// Why (recovery's error, or a policy file the kernel refused).
        reason: String,
    },
}

/// A shard's driver at work.
struct Running {
    tx: mpsc::Sender<Command>,
    task: JoinHandle<Result<(), DriverError>>,
}

/// This node: its membership, the connections its shards share, and the
/// shards it serves. [`Node::start`] joins and loads the first shards;
/// [`Node::run`] keeps it up to date until told to stop.
pub struct Node {
    settings: NodeSettings,
    membership: Membership,
    host: Arc<PgHost>,
    table: Arc<ShardTable>,
    /// The watch channels every shard's hub sends into.
    hub: Hub,
    running: HashMap<u32, Running>,
    /// The driver of no shard answering registry questions.
    registry: Running,
    /// The cluster's registries, synced into every driver here.
    registries: Arc<ClusterRegistries>,
}

impl Node {
    /// Joins the cluster (creating it if this is its first node), opens
    /// the shared connections and takes and loads this node's first
    /// shards, so the node serves from its first request. Returns the node
    /// task's state, the routing table request handlers read, and the
    /// node-wide watch channels.
    pub async fn start(settings: NodeSettings) -> Result<(Node, Arc<ShardTable>, Watch), NodeError> {
        let membership = Membership::join(&settings.url, &settings.pg, settings.cluster.clone()).await?;
        let (url, pg) = (settings.url.clone(), settings.pg.clone());
        let host = tokio::task::spawn_blocking(move || PgHost::open(&url, pg, WRITERS)).await.map_err(|e| {
            StorageError::Misuse(if e.is_panic() { "opening panicked" } else { "opening was cancelled" })
        })??;
        let hub = Hub::default();
        let files = settings.policies.as_ref().map(|p| p.iter().map(|f| f.descriptor.clone()).collect());
        let registries = Arc::new(ClusterRegistries::new(
            ClusterRegistry::new(&settings.url, &settings.pg),
            files,
            &settings.kernel.runtime_id,
        ));
        registries.refresh(&[]).await?;
        let registry = Self::registry_driver(&settings, hub.sharing(), registries.clone()).await?;
        let table = Arc::new(ShardTable::new(
            &settings.cluster.node_id,
            settings.cluster.shards,
            settings.forwarder.clone(),
            registry.tx.clone(),
            registries.clone(),
        ));
        let watch =
            Watch { lifecycle: hub.lifecycle.clone(), signals: hub.signals.clone(), registry: hub.registry.clone() };
        let mut node = Node {
            settings,
            membership,
            host: Arc::new(host),
            table: table.clone(),
            hub,
            running: HashMap::new(),
            registry,
            registries,
        };
        let tick = node.membership.tick().await?;
        node.apply(tick, true).await?;
        info!(
            "cluster node {} joined: {} of {} shards served here",
            node.settings.cluster.node_id,
            node.running.len(),
            node.settings.cluster.shards
        );
        Ok((node, table, watch))
    }

    /// Membership rounds every quarter of the lease TTL until `stop` turns
    /// true; then every shard is drained and released, and the node
    /// leaves the cluster so the others take its shards at once.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(self.settings.cluster.lease_ttl / 4);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut registries = tokio::time::interval(REGISTRY_POLL);
        registries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.round().await,
                _ = registries.tick() => { self.table.refresh_registries().await; }
                _ = stopped(&mut stop) => break,
            }
        }
        let shards: Vec<u32> = self.running.keys().copied().collect();
        for shard in shards {
            self.stop_shard(shard, true).await;
        }
        let _ = self.registry.tx.send(Command::Shutdown).await;
        let _ = tokio::time::timeout(DRAIN_WITHIN, &mut self.registry.task).await;
        let node = self.settings.cluster.node_id.clone();
        match self.membership.leave().await {
            Ok(()) => info!("cluster node {node} left the cluster"),
            Err(e) => warn!("cluster node {node} could not leave cleanly (its leases lapse instead): {e}"),
        }
    }

    /// One membership round; a failed one changes nothing (the leases run
    /// out at their own pace, and the routing table stops serving them).
    async fn round(&mut self) {
        self.reap().await;
        match self.membership.tick().await {
            Ok(tick) => {
                if let Err(e) = self.apply(tick, false).await {
                    warn!("cluster membership round: {e}");
                }
            }
            Err(e) => warn!("cluster membership round failed (serving held shards until their leases end): {e}"),
        }
    }

    /// Shards whose driver stopped on its own (its lease was fenced, or
    /// storage failed beyond repair) are unrouted and their leases given
    /// up, so another node (or this one, later) loads them afresh.
    async fn reap(&mut self) {
        let done: Vec<u32> = self.running.iter().filter(|(_, r)| r.task.is_finished()).map(|(s, _)| *s).collect();
        for shard in done {
            self.table.unserve(shard);
            if let Some(r) = self.running.remove(&shard) {
                match r.task.await {
                    Ok(Ok(())) => info!("shard {shard}: driver stopped"),
                    Ok(Err(e)) => warn!("shard {shard}: driver stopped: {e}"),
                    Err(e) => warn!("shard {shard}: driver task failed: {e}"),
                }
            }
            if let Err(e) = self.membership.release(&[shard]).await {
                warn!("shard {shard}: could not release the lease (it lapses instead): {e}");
            }
        }
    }

    async fn apply(&mut self, tick: Tick, starting: bool) -> Result<(), NodeError> {
        let addrs: HashMap<String, String> =
            tick.members.iter().map(|m| (m.node_id.clone(), m.advertise_addr.clone())).collect();
        let owners: BTreeMap<u32, String> = tick.owners.clone();
        self.table.membership(owners, addrs);
        for shard in tick.lost {
            warn!("shard {shard}: lease lost (taken over after it lapsed); no longer served here");
            self.stop_shard(shard, false).await;
        }
        for shard in tick.hand_over {
            info!("shard {shard}: handing over to its preferred node");
            self.stop_shard(shard, true).await;
            self.membership.release(&[shard]).await?;
        }
        for lease in tick.acquired {
            let shard = lease.shard;
            match self.load(lease).await {
                Ok(()) => {}
                Err(e) if starting => return Err(e),
                Err(e) => {
                    warn!("{e}; giving the lease up");
                    self.membership.release(&[shard]).await?;
                }
            }
        }
        self.table.renewed(self.membership.held().iter().map(|(s, l)| (*s, l.valid_until)));
        Ok(())
    }

    /// A driver over memory storage holding only the registries (the
    /// cluster's, as every shard holds them).
    async fn registry_driver(
        settings: &NodeSettings,
        hub: Hub,
        registries: Arc<ClusterRegistries>,
    ) -> Result<Running, NodeError> {
        let s = settings.clone();
        let built = tokio::task::spawn_blocking(move || {
            let storage: Box<dyn Storage> = Box::new(macp_storage::MemoryStorage::default());
            let reopen: Reopen = Box::new(|| Err(StorageError::Misuse("the registry driver has no storage to reopen")));
            let (mut driver, tx, _) = Driver::recover(s.kernel.clone(), storage, reopen, hub, s.checkpoint, &|| false)
                .map_err(|e: RecoveryError| e.to_string())?;
            sync_before_serving(&mut driver, &registries)?;
            Ok::<_, String>((driver, tx))
        })
        .await
        .map_err(|e| NodeError::Shard { shard: u32::MAX, reason: format!("the registry task failed: {e}") })?;
        let (driver, tx) = built.map_err(|reason| NodeError::Shard { shard: u32::MAX, reason })?;
        Ok(Running { tx, task: tokio::spawn(driver.run()) })
    }

    /// Recovers `lease`'s shard into a driver of its own and routes to it.
    async fn load(&mut self, lease: ShardLease) -> Result<(), NodeError> {
        let shard = lease.shard;
        let started = Instant::now();
        let (host, hub, s) = (self.host.clone(), self.hub.sharing_sessions(), self.settings.clone());
        let registries = self.registries.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let storage: Box<dyn Storage> = Box::new(host.shard(lease.clone()));
            let reopen: Reopen = Box::new(move || Ok(Box::new(host.shard(lease.clone())) as Box<dyn Storage>));
            let never = AtomicBool::new(false);
            let (mut driver, tx, report) =
                Driver::recover(s.kernel.clone(), storage, reopen, hub, s.checkpoint, &|| {
                    never.load(std::sync::atomic::Ordering::Relaxed)
                })
                .map_err(|e: RecoveryError| e.to_string())?;
            let synced = sync_before_serving(&mut driver, &registries)?;
            Ok::<_, String>((driver, tx, report, synced))
        })
        .await
        .map_err(|e| NodeError::Shard { shard, reason: format!("the loading task failed: {e}") })?;
        let (driver, tx, report, synced) = loaded.map_err(|reason| NodeError::Shard { shard, reason })?;
        if report.is_clean() {
            info!("shard {shard}: loaded in {:.2?}: {report}", started.elapsed());
        } else {
            warn!("shard {shard}: loaded in {:.2?} WITH DAMAGE: {report}", started.elapsed());
        }
        let task = tokio::spawn(driver.waiting_off_the_workers().run());
        let valid_until = self.membership.held().get(&shard).map_or_else(Instant::now, |l| l.valid_until);
        self.table.serve(shard, tx.clone(), valid_until);
        self.running.insert(shard, Running { tx: tx.clone(), task });
        if self.registries.wanted().version != synced {
            // The registries changed while the shard loaded; the poll that
            // noticed could not reach it yet.
            self.table.resync(&tx).await;
        }
        Ok(())
    }

    /// Stops serving `shard`: unrouted first (new requests are told to
    /// retry), then its driver finishes what it holds and stops. With
    /// `drain`, waits for that (the lease is about to be released, and
    /// the next holder must find everything committed); without (the lease
    /// is already lost), lets it finish on its own: its writes are refused.
    async fn stop_shard(&mut self, shard: u32, drain: bool) {
        self.table.unserve(shard);
        let Some(r) = self.running.remove(&shard) else { return };
        let _ = r.tx.send(Command::Shutdown).await;
        drop(r.tx);
        if !drain {
            return;
        }
        match tokio::time::timeout(DRAIN_WITHIN, r.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!("shard {shard}: driver stopped with an error: {e}"),
            Ok(Err(e)) => warn!("shard {shard}: driver task failed: {e}"),
            Err(_) => warn!("shard {shard}: driver did not stop within {DRAIN_WITHIN:?}"),
        }
    }
}

/// Brings a driver not yet serving to the cluster's registries; the
/// version synced to.
fn sync_before_serving(driver: &mut Driver, registries: &ClusterRegistries) -> Result<i64, String> {
    let wanted = registries.wanted();
    let inputs = driver.registry_plan(&wanted, registries.operator());
    if inputs.is_empty() {
        return Ok(wanted.version);
    }
    let n = inputs.len();
    let replies = driver.apply_before_serving(inputs).map_err(|e| format!("syncing the registries: {e}"))?;
    for reply in &replies {
        if let Some(e) = reply.error() {
            warn!("cluster registry sync: a kernel refused a change: {e}");
        }
    }
    info!("cluster registries synced into a loaded kernel: {n} change(s) recorded");
    Ok(wanted.version)
}

/// Resolves once `stop` is true (or its sender is gone); the borrowed
/// value is released at once, so the future stays `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
