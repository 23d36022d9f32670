//! The `MACPRuntimeService` implementation: turns RPCs into kernel inputs,
//! queries and subscriptions, and kernel answers back into wire messages.
//!
//! Authentication happens first (every RPC except discovery), then rate
//! limits; every decision that depends on session state is the kernel's.
//! One file per group of RPCs: [`sessions`] (Send, GetSession, control,
//! listings and watches of sessions), [`streams`] (StreamSession and
//! WatchSignals), [`registries`] (modes and policies), [`what_if`]
//! (WhatIfReplay), [`discovery`] (Initialize, manifest, roots), [`receipts`]
//! (decision receipts and their keys), and [`fan`] (a cluster node's
//! listings and watches that cover the other nodes). Errors become wire
//! answers only in [`crate::status`].

mod discovery;
mod fan;
mod history;
mod receipts;
mod registries;
mod sessions;
mod streams;
mod what_if;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use macp_kernel::{Answer, Identity, Input, KernelConfig, Query, Reply};
use macp_receipt::ReceiptKeys;
use macp_wire::v1::*;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Authenticator;
use crate::cluster::Router;
use crate::driver::Command;
use crate::hub::RegistryEvent;
use crate::limits::{Budget, RateLimits};
use crate::metrics::{Metrics, Rpc};
use crate::pb::macp_runtime_service_server::MacpRuntimeService;
use crate::status::shutting_down;

/// Re-exported for clients and tests that read the registry code of a status.
pub use crate::status::ERROR_CODE_KEY;

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Channels to the watchers' broadcast sources.
#[derive(Clone)]
pub struct Watch {
    /// Session lifecycle events.
    pub lifecycle: broadcast::Sender<Arc<SessionLifecycleEvent>>,
    /// Signals and progress.
    pub signals: broadcast::Sender<Arc<WatchSignalsResponse>>,
    /// Registry changes.
    pub registry: broadcast::Sender<RegistryEvent>,
}

/// The service state shared by all RPC handlers.
#[derive(Clone)]
pub struct Runtime {
    /// Which driver serves which session (one, or a cluster node's shards).
    router: Router,
    auth: Arc<Authenticator>,
    limits: Arc<RateLimits>,
    watch: Watch,
    kernel_config: Arc<KernelConfig>,
    /// The largest reply the transport will encode; listings stay below it.
    max_reply_bytes: usize,
    /// The policy registry comes from `MACP_POLICIES_DIR`: RegisterPolicy
    /// and UnregisterPolicy are refused with REGISTRY_READ_ONLY.
    policies_read_only: bool,
    /// What decision receipts are signed with and GetReceiptKeys publishes.
    receipts: Arc<ReceiptKeys>,
    /// Request counts, Send latency and rate-limit refusals, when metrics
    /// are on.
    metrics: Option<Arc<Metrics>>,
}

impl Runtime {
    /// Builds the service.
    pub fn new(
        router: impl Into<Router>,
        auth: Authenticator,
        limits: RateLimits,
        watch: Watch,
        kernel_config: KernelConfig,
    ) -> Self {
        Runtime {
            router: router.into(),
            auth: Arc::new(auth),
            limits: Arc::new(limits),
            watch,
            kernel_config: Arc::new(kernel_config),
            max_reply_bytes: 4 * 1024 * 1024,
            policies_read_only: false,
            receipts: Arc::new(ReceiptKeys::unsigned()),
            metrics: None,
        }
    }

    /// Makes the policy registry read-only for clients (it was loaded from
    /// `MACP_POLICIES_DIR`): Initialize advertises `register_policy = false`
    /// and the mutating policy RPCs answer REGISTRY_READ_ONLY.
    pub fn with_read_only_policies(mut self, read_only: bool) -> Self {
        self.policies_read_only = read_only;
        self
    }

    /// Sets the keys decision receipts are signed with (unsigned, and an
    /// empty published key set, until this is called).
    pub fn with_receipt_keys(mut self, keys: ReceiptKeys) -> Self {
        self.receipts = Arc::new(keys);
        self
    }

    /// Sets the largest reply the transport encodes (its
    /// `max_encoding_message_size`), so ListSessions pages stay below it.
    pub fn with_max_reply_bytes(mut self, bytes: usize) -> Self {
        self.max_reply_bytes = bytes;
        self
    }

    /// Updates `metrics` (none until this is called).
    pub fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Counts an RPC's outcome, when metrics are on.
    fn observe<T>(&self, rpc: Rpc, r: Result<T, Status>) -> Result<T, Status> {
        if let Some(m) = &self.metrics {
            m.request(rpc, r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok));
        }
        r
    }

    /// Takes one unit from `sender`'s budget; false (and counted) when
    /// exhausted. A request another cluster node forwarded was charged
    /// there, at the node the client talks to, and is not charged again.
    fn within_limit(&self, sender: &str, budget: Budget, forwarded: bool) -> bool {
        if forwarded {
            return true;
        }
        let ok = self.limits.check(sender, budget);
        if let (false, Some(m)) = (ok, &self.metrics) {
            m.rate_limited(budget);
        }
        ok
    }

    /// The rate limiters, so the server can prune them periodically.
    pub fn limits(&self) -> Arc<RateLimits> {
        self.limits.clone()
    }

    /// Whether another node of the cluster forwarded `req` (it is then
    /// never forwarded again).
    fn forwarded<T>(req: &Request<T>) -> bool {
        req.metadata().contains_key(&*crate::cluster::forward::IDENTITY_KEY)
    }

    /// Borrows only the metadata, so the future stays `Send` for requests
    /// whose body is not `Sync` (streams).
    fn identity<'a, T>(&'a self, req: &'a Request<T>) -> impl Future<Output = Result<Identity, Status>> + Send + 'a {
        self.auth.authenticate(req.metadata())
    }

    /// The driver an input goes to: its session's, or for a registry
    /// change the one driver.
    fn route_input(&self, input: &Input) -> Result<mpsc::Sender<Command>, Status> {
        match input {
            Input::Envelope { envelope, .. } => self.router.session(&envelope.session_id),
            Input::Control { session_id, .. } => self.router.session(session_id),
            _ => self.router.any(),
        }
    }

    /// The driver a question goes to: its session's, or any (registries).
    fn route_query(&self, query: &Query) -> Result<mpsc::Sender<Command>, Status> {
        match query {
            Query::GetSession { session_id, .. } | Query::Subscribe { session_id, .. } => {
                self.router.session(session_id)
            }
            _ => self.router.any(),
        }
    }

    /// Runs an input through its driver and waits for its durable reply.
    async fn submit(&self, input: Input) -> Result<Reply, Status> {
        if let Router::Cluster(table) = &self.router {
            if !matches!(input, Input::Envelope { .. } | Input::Control { .. }) {
                // A registry change: made cluster-wide through the table.
                return table.change_registry(input).await;
            }
        }
        let driver = self.route_input(&input)?;
        let (reply, rx) = oneshot::channel();
        driver.send(Command::Submit { input, reply, bind: None }).await.map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }

    /// Asks the kernel a read-only question (answered after the batch in
    /// flight is durable, so it never reveals undurable state).
    async fn ask(&self, query: Query) -> Result<Answer, Status> {
        let driver = self.route_query(&query)?;
        Self::ask_of(&driver, query).await.map_err(|()| self.gone())
    }

    /// Asks one driver.
    async fn ask_of(driver: &mpsc::Sender<Command>, query: Query) -> Result<Answer, ()> {
        let (tx, rx) = oneshot::channel();
        driver.send(Command::Query(query, tx)).await.map_err(|_| ())?;
        rx.await.map_err(|_| ())
    }

    /// A driver stopped before answering: the runtime is stopping, or (on
    /// a cluster node) the session's shard just moved to another node.
    /// Nothing of the request was stored either way; retrying is safe.
    fn gone(&self) -> Status {
        if self.router.is_cluster() {
            Status::unavailable(
                "the session's shard moved to another cluster node while the request waited; nothing was recorded, retry",
            )
        } else {
            shutting_down()
        }
    }
}

/// The answer had another shape than its query asks for: a driver bug, never
/// the caller's fault.
fn unexpected(what: &str) -> Status {
    Status::internal(format!("the runtime answered {what} with an unexpected shape"))
}

#[tonic::async_trait]
impl MacpRuntimeService for Runtime {
    async fn initialize(&self, req: Request<InitializeRequest>) -> Result<Response<InitializeResponse>, Status> {
        self.observe(Rpc::Initialize, discovery::initialize(self, req).await)
    }

    async fn send(&self, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        self.observe(Rpc::Send, sessions::send(self, req).await)
    }

    type StreamSessionStream = RpcStream<StreamSessionResponse>;

    async fn stream_session(
        &self,
        req: Request<Streaming<StreamSessionRequest>>,
    ) -> Result<Response<Self::StreamSessionStream>, Status> {
        self.observe(Rpc::StreamSession, streams::stream_session(self, req).await)
    }

    async fn get_session(&self, req: Request<GetSessionRequest>) -> Result<Response<GetSessionResponse>, Status> {
        self.observe(Rpc::GetSession, sessions::get_session(self, req).await)
    }

    async fn cancel_session(
        &self,
        req: Request<CancelSessionRequest>,
    ) -> Result<Response<CancelSessionResponse>, Status> {
        let req = req.map(|r| (r.session_id, r.reason));
        let r = sessions::control(self, req, macp_kernel::ControlOp::Cancel).await;
        self.observe(Rpc::CancelSession, r.map(|ack| Response::new(CancelSessionResponse { ack: Some(ack) })))
    }

    async fn suspend_session(
        &self,
        req: Request<SuspendSessionRequest>,
    ) -> Result<Response<SuspendSessionResponse>, Status> {
        let req = req.map(|r| (r.session_id, r.reason));
        let r = sessions::control(self, req, macp_kernel::ControlOp::Suspend).await;
        self.observe(Rpc::SuspendSession, r.map(|ack| Response::new(SuspendSessionResponse { ack: Some(ack) })))
    }

    async fn resume_session(
        &self,
        req: Request<ResumeSessionRequest>,
    ) -> Result<Response<ResumeSessionResponse>, Status> {
        let req = req.map(|r| (r.session_id, r.reason));
        let r = sessions::control(self, req, macp_kernel::ControlOp::Resume).await;
        self.observe(Rpc::ResumeSession, r.map(|ack| Response::new(ResumeSessionResponse { ack: Some(ack) })))
    }

    async fn get_manifest(&self, req: Request<GetManifestRequest>) -> Result<Response<GetManifestResponse>, Status> {
        self.observe(Rpc::GetManifest, discovery::get_manifest(self, req).await)
    }

    async fn list_modes(&self, req: Request<ListModesRequest>) -> Result<Response<ListModesResponse>, Status> {
        self.observe(Rpc::ListModes, registries::list_modes(self, req).await)
    }

    type WatchModeRegistryStream = RpcStream<WatchModeRegistryResponse>;

    async fn watch_mode_registry(
        &self,
        req: Request<WatchModeRegistryRequest>,
    ) -> Result<Response<Self::WatchModeRegistryStream>, Status> {
        self.observe(Rpc::WatchModeRegistry, registries::watch_mode_registry(self, req).await)
    }

    async fn list_roots(&self, req: Request<ListRootsRequest>) -> Result<Response<ListRootsResponse>, Status> {
        self.observe(Rpc::ListRoots, discovery::list_roots(self, req).await)
    }

    type WatchRootsStream = RpcStream<WatchRootsResponse>;

    async fn watch_roots(&self, req: Request<WatchRootsRequest>) -> Result<Response<Self::WatchRootsStream>, Status> {
        self.observe(Rpc::WatchRoots, discovery::watch_roots(self, req).await)
    }

    async fn list_ext_modes(
        &self,
        req: Request<ListExtModesRequest>,
    ) -> Result<Response<ListExtModesResponse>, Status> {
        self.observe(Rpc::ListExtModes, registries::list_ext_modes(self, req).await)
    }

    async fn register_ext_mode(
        &self,
        req: Request<RegisterExtModeRequest>,
    ) -> Result<Response<RegisterExtModeResponse>, Status> {
        self.observe(Rpc::RegisterExtMode, registries::register_ext_mode(self, req).await)
    }

    async fn unregister_ext_mode(
        &self,
        req: Request<UnregisterExtModeRequest>,
    ) -> Result<Response<UnregisterExtModeResponse>, Status> {
        self.observe(Rpc::UnregisterExtMode, registries::unregister_ext_mode(self, req).await)
    }

    async fn promote_mode(&self, req: Request<PromoteModeRequest>) -> Result<Response<PromoteModeResponse>, Status> {
        self.observe(Rpc::PromoteMode, registries::promote_mode(self, req).await)
    }

    type WatchSignalsStream = RpcStream<WatchSignalsResponse>;

    async fn watch_signals(
        &self,
        req: Request<WatchSignalsRequest>,
    ) -> Result<Response<Self::WatchSignalsStream>, Status> {
        self.observe(Rpc::WatchSignals, streams::watch_signals(self, req).await)
    }

    async fn list_sessions(&self, req: Request<ListSessionsRequest>) -> Result<Response<ListSessionsResponse>, Status> {
        self.observe(Rpc::ListSessions, sessions::list_sessions(self, req).await)
    }

    type WatchSessionsStream = RpcStream<WatchSessionsResponse>;

    async fn watch_sessions(
        &self,
        req: Request<WatchSessionsRequest>,
    ) -> Result<Response<Self::WatchSessionsStream>, Status> {
        self.observe(Rpc::WatchSessions, sessions::watch_sessions(self, req).await)
    }

    async fn register_policy(
        &self,
        req: Request<RegisterPolicyRequest>,
    ) -> Result<Response<RegisterPolicyResponse>, Status> {
        self.observe(Rpc::RegisterPolicy, registries::register_policy(self, req).await)
    }

    async fn unregister_policy(
        &self,
        req: Request<UnregisterPolicyRequest>,
    ) -> Result<Response<UnregisterPolicyResponse>, Status> {
        self.observe(Rpc::UnregisterPolicy, registries::unregister_policy(self, req).await)
    }

    async fn get_policy(&self, req: Request<GetPolicyRequest>) -> Result<Response<GetPolicyResponse>, Status> {
        self.observe(Rpc::GetPolicy, registries::get_policy(self, req).await)
    }

    async fn list_policies(&self, req: Request<ListPoliciesRequest>) -> Result<Response<ListPoliciesResponse>, Status> {
        self.observe(Rpc::ListPolicies, registries::list_policies(self, req).await)
    }

    type WatchPoliciesStream = RpcStream<WatchPoliciesResponse>;

    async fn watch_policies(
        &self,
        req: Request<WatchPoliciesRequest>,
    ) -> Result<Response<Self::WatchPoliciesStream>, Status> {
        self.observe(Rpc::WatchPolicies, registries::watch_policies(self, req).await)
    }

    async fn what_if_replay(
        &self,
        req: Request<WhatIfReplayRequest>,
    ) -> Result<Response<WhatIfReplayResponse>, Status> {
        self.observe(Rpc::WhatIfReplay, what_if::what_if_replay(self, req).await)
    }

    async fn get_decision_receipt(
        &self,
        req: Request<GetDecisionReceiptRequest>,
    ) -> Result<Response<GetDecisionReceiptResponse>, Status> {
        self.observe(Rpc::GetDecisionReceipt, receipts::get_decision_receipt(self, req).await)
    }

    async fn get_receipt_keys(
        &self,
        req: Request<GetReceiptKeysRequest>,
    ) -> Result<Response<GetReceiptKeysResponse>, Status> {
        self.observe(Rpc::GetReceiptKeys, receipts::get_receipt_keys(self, req).await)
    }
}
