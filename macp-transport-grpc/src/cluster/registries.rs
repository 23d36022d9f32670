//! Cluster-wide registries: a policy or extension mode registered on any
//! node is enforced and watched on all of them.
//!
//! ```text
//!  RegisterPolicy ─► validate on this node's registry driver (its kernel, synced to the table)
//!                 ─► write macp_registry only if its version is still the one validated against
//!                    (else: another node changed it first; sync, validate again, retry)
//!                 ─► sync every driver here (registry driver and served shards) to the table
//!  other nodes     ─► notice the version moved (a one-row read every REGISTRY_POLL) and sync theirs
//!  SessionStart refused UNKNOWN_POLICY_VERSION / MODE_NOT_SUPPORTED on a node that has not synced yet
//!                 ─► refresh from the table, and if it moved, handle the request once more
//! ```
//!
//! The table holds the *wanted* state ([`WantedRegistries`]); each shard's
//! kernel still records every registry change in its own log, so a shard
//! replays the same wherever it is loaded, and a shard loaded later is
//! synced before it serves. Registration is read-your-writes cluster-wide
//! (the refresh on a miss); an unregistration reaches the other nodes
//! within one poll, so for that long a session may still start there with
//! the policy just removed, as it could have a moment before.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use macp_kernel::{ErrorCode, Identity, Input, KernelError, ModeList, Query, Reply};
use macp_storage_pg::{ClusterError, ClusterRegistry, RegistryEntry, RegistryKind, RegistryOp, RegistrySnapshot};
use macp_wire::v1::{ModeDescriptor, PolicyDescriptor};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, Mutex};
use tonic::Status;
use tracing::{info, warn};

use crate::driver::Command;
use crate::registry_sync::WantedRegistries;

/// How often a node checks whether another node changed the registries.
pub const REGISTRY_POLL: Duration = Duration::from_millis(500);
/// How many times a change is validated again after another node's change
/// came first.
const CHANGE_ATTEMPTS: usize = 4;

/// This node's view of the cluster's registries, and the one path that
/// changes them. See the module docs.
#[derive(Debug)]
pub struct ClusterRegistries {
    store: ClusterRegistry,
    /// What every kernel here should hold, as of the last read.
    wanted: RwLock<Arc<WantedRegistries>>,
    /// With `MACP_POLICIES_DIR`: the directory's policies, which replace
    /// the table's (policy changes are then refused before they get here).
    file_policies: Option<Vec<PolicyDescriptor>>,
    /// Who the recorded sync changes are from (the runtime id).
    operator: Identity,
    /// One sync or change at a time on this node.
    serial: Mutex<()>,
}

impl ClusterRegistries {
    /// The registries in `store`; `file_policies` from the policies
    /// directory, if any. Nothing is read until [`Self::refresh`].
    pub fn new(store: ClusterRegistry, file_policies: Option<Vec<PolicyDescriptor>>, operator: &str) -> Self {
        let wanted =
            WantedRegistries { version: -1, policies: file_policies.clone().unwrap_or_default(), modes: Vec::new() };
        ClusterRegistries {
            store,
            wanted: RwLock::new(Arc::new(wanted)),
            file_policies,
            operator: Identity::new(operator),
            serial: Mutex::new(()),
        }
    }

    /// What every kernel here should hold now.
    pub fn wanted(&self) -> Arc<WantedRegistries> {
        self.wanted.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who sync changes are recorded from.
    pub fn operator(&self) -> &Identity {
        &self.operator
    }

    /// Reads the table if its version moved since the last read and, if
    /// so, syncs `drivers` to it. True when it had moved.
    pub async fn refresh(&self, drivers: &[mpsc::Sender<Command>]) -> Result<bool, ClusterError> {
        let _one = self.serial.lock().await;
        self.refresh_locked(drivers).await
    }

    async fn refresh_locked(&self, drivers: &[mpsc::Sender<Command>]) -> Result<bool, ClusterError> {
        if self.store.version().await? == self.wanted().version {
            return Ok(false);
        }
        let snapshot = self.store.load().await?;
        self.adopt(&snapshot);
        self.sync(drivers).await;
        Ok(true)
    }

    /// Takes `snapshot` as what every kernel here should hold.
    fn adopt(&self, snapshot: &RegistrySnapshot) {
        let mut wanted = WantedRegistries { version: snapshot.version, ..WantedRegistries::default() };
        for e in &snapshot.entries {
            match e.kind {
                RegistryKind::Policy => match PolicyDescriptor::decode(e.body.as_slice()) {
                    Ok(d) => wanted.policies.push(d),
                    Err(err) => warn!("cluster registry: policy '{}' cannot be decoded, skipped: {err}", e.id),
                },
                RegistryKind::Mode => match ModeDescriptor::decode(e.body.as_slice()) {
                    Ok(d) => wanted.modes.push((d, e.standards_track)),
                    Err(err) => warn!("cluster registry: mode '{}' cannot be decoded, skipped: {err}", e.id),
                },
            }
        }
        if let Some(files) = &self.file_policies {
            wanted.policies = files.clone();
        }
        info!(
            "cluster registries at version {}: {} policies, {} extension modes",
            wanted.version,
            wanted.policies.len(),
            wanted.modes.len()
        );
        *self.wanted.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(wanted);
    }

    /// Syncs each of `drivers` to the wanted state and waits until the
    /// changes are durable. A driver that stopped meanwhile (its shard
    /// moved) is skipped: whoever loads the shard syncs it.
    async fn sync(&self, drivers: &[mpsc::Sender<Command>]) {
        let wanted = self.wanted();
        for d in drivers {
            let (reply, rx) = oneshot::channel();
            let cmd = Command::SyncRegistries { wanted: wanted.clone(), operator: self.operator.clone(), reply };
            if d.send(cmd).await.is_err() {
                continue;
            }
            let Ok(waiting) = rx.await else { continue };
            for r in waiting {
                if let Ok(Reply::Registry(Err(e))) = r.await {
                    warn!("cluster registry sync: a kernel refused a change: {e}");
                }
            }
        }
    }

    /// Syncs one more driver to the wanted state (one loaded while the
    /// wanted state moved).
    pub async fn sync_one(&self, driver: &mpsc::Sender<Command>) {
        let _one = self.serial.lock().await;
        self.sync(std::slice::from_ref(driver)).await;
    }

    /// Makes a registry change cluster-wide: validated by `registry` (this
    /// node's registry driver, synced to the table first), written to the
    /// table if nobody changed it meanwhile, then synced to every driver
    /// of `drivers` (which include `registry`). Returns the kernel's reply.
    pub async fn change(
        &self,
        input: Input,
        registry: &mpsc::Sender<Command>,
        drivers: &[mpsc::Sender<Command>],
    ) -> Result<Reply, Status> {
        let _one = self.serial.lock().await;
        for _ in 0..CHANGE_ATTEMPTS {
            self.refresh_locked(drivers).await.map_err(unavailable)?;
            let reply = submit(registry, input.clone()).await?;
            let accepted = match &reply {
                Reply::Registry(Ok(id)) => id.clone(),
                _ => return Ok(reply),
            };
            let ops = match self.ops_for(&input, &accepted, registry).await {
                Ok(ops) => ops,
                Err(e) => {
                    self.sync(drivers).await; // undo it on the registry driver
                    return Err(e);
                }
            };
            match self.store.change(self.wanted().version, &ops).await {
                Ok(Some(_)) => {
                    let snapshot = self.store.load().await.map_err(unavailable)?;
                    self.adopt(&snapshot);
                    self.sync(drivers).await;
                    return Ok(reply);
                }
                // Another node changed the registries since this node last
                // read them: the next round syncs to that (undoing this
                // change on the registry driver) and validates again.
                Ok(None) => continue,
                Err(e) => {
                    self.sync(drivers).await;
                    return Err(unavailable(e));
                }
            }
        }
        Err(Status::unavailable(
            "the cluster's registries kept changing under this request; nothing was registered, retry",
        ))
    }

    /// The table changes that record an accepted `input` (`accepted`: the
    /// kernel's reply, the final id of a promoted mode).
    async fn ops_for(
        &self,
        input: &Input,
        accepted: &str,
        registry: &mpsc::Sender<Command>,
    ) -> Result<Vec<RegistryOp>, Status> {
        let mode_entry = |d: &ModeDescriptor, standards_track: bool| {
            RegistryOp::Put(RegistryEntry {
                kind: RegistryKind::Mode,
                id: d.mode.clone(),
                body: d.encode_to_vec(),
                standards_track,
            })
        };
        Ok(match input {
            Input::RegisterPolicy { descriptor, .. } => {
                let registered =
                    match ask(registry, Query::GetPolicy { policy_id: descriptor.policy_id.clone() }).await? {
                        macp_kernel::Answer::Policy(Some(d)) => d,
                        _ => descriptor.clone(),
                    };
                vec![RegistryOp::Put(RegistryEntry {
                    kind: RegistryKind::Policy,
                    id: registered.policy_id.clone(),
                    body: registered.encode_to_vec(),
                    standards_track: false,
                })]
            }
            Input::UnregisterPolicy { policy_id, .. } => {
                vec![RegistryOp::Delete { kind: RegistryKind::Policy, id: policy_id.clone() }]
            }
            Input::RegisterExtMode { descriptor, .. } => vec![mode_entry(descriptor, false)],
            Input::UnregisterExtMode { mode, .. } => {
                vec![RegistryOp::Delete { kind: RegistryKind::Mode, id: mode.clone() }]
            }
            Input::PromoteMode { mode, .. } => {
                let promoted = match ask(registry, Query::Modes(ModeList::StandardsTrack)).await? {
                    macp_kernel::Answer::Modes(all) => all.into_iter().find(|d| d.mode == accepted),
                    _ => None,
                };
                let Some(promoted) = promoted else {
                    return Err(Status::internal(format!("promoted mode '{accepted}' is not listed after promotion")));
                };
                vec![RegistryOp::Delete { kind: RegistryKind::Mode, id: mode.clone() }, mode_entry(&promoted, true)]
            }
            _ => Vec::new(),
        })
    }
}

/// Whether a SessionStart refusal may be this node not having synced a
/// registration made on another node yet.
pub fn may_be_unsynced(e: &KernelError) -> bool {
    matches!(e.code, ErrorCode::UnknownPolicyVersion | ErrorCode::ModeNotSupported)
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the cluster's registry table could not be reached: {e}; retry"))
}

async fn submit(driver: &mpsc::Sender<Command>, input: Input) -> Result<Reply, Status> {
    let (reply, rx) = oneshot::channel();
    let gone = || Status::unavailable("the registry driver stopped (the node is shutting down)");
    driver.send(Command::Submit { input, reply, bind: None }).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

async fn ask(driver: &mpsc::Sender<Command>, query: Query) -> Result<macp_kernel::Answer, Status> {
    let (tx, rx) = oneshot::channel();
    let gone = || Status::unavailable("the registry driver stopped (the node is shutting down)");
    driver.send(Command::Query(query, tx)).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}
