//! The `MACPRuntimeService` implementation: turns RPCs into kernel inputs,
//! queries and subscriptions, and kernel answers back into wire messages.
//!
//! Authentication happens here (every RPC except discovery), then rate
//! limits; every decision that depends on session state is the kernel's.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use macp_kernel::{ControlOp, ErrorCode, Identity, Input, Kernel, KernelConfig, KernelError, Reply};
use macp_wire::v1::*;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::Authenticator;
use crate::driver::{Binding, Command, Subscription};
use crate::hub::{RegistryEvent, Sequenced, SessionFeed};
use crate::limits::{Budget, RateLimits};
use crate::pb::macp_runtime_service_server::MacpRuntimeService;

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Channels to the watchers' broadcast sources.
#[derive(Clone)]
pub struct Watch {
    /// Session lifecycle events.
    pub lifecycle: broadcast::Sender<SessionLifecycleEvent>,
    /// Signals and progress.
    pub signals: broadcast::Sender<WatchSignalsResponse>,
    /// Registry changes.
    pub registry: broadcast::Sender<RegistryEvent>,
}

/// The service state shared by all RPC handlers.
#[derive(Clone)]
pub struct Runtime {
    tx: mpsc::Sender<Command>,
    auth: Arc<Authenticator>,
    limits: Arc<RateLimits>,
    watch: Watch,
    kernel_config: Arc<KernelConfig>,
}

impl Runtime {
    /// Builds the service.
    pub fn new(
        tx: mpsc::Sender<Command>,
        auth: Authenticator,
        limits: RateLimits,
        watch: Watch,
        kernel_config: KernelConfig,
    ) -> Self {
        Runtime { tx, auth: Arc::new(auth), limits: Arc::new(limits), watch, kernel_config: Arc::new(kernel_config) }
    }

    /// The rate limiters, so the server can prune them periodically.
    pub fn limits(&self) -> Arc<RateLimits> {
        self.limits.clone()
    }

    /// Borrows only the metadata, so the future stays `Send` for requests
    /// whose body is not `Sync` (streams).
    fn identity<'a, T>(&'a self, req: &'a Request<T>) -> impl Future<Output = Result<Identity, Status>> + Send + 'a {
        self.auth.authenticate(req.metadata())
    }

    async fn submit(&self, input: Input) -> Result<Reply, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Submit { input, reply, bind: None }).await.map_err(|_| shutting_down())?;
        rx.await.map_err(|_| shutting_down())
    }

    async fn query<T: Send + 'static>(&self, f: impl FnOnce(&Kernel) -> T + Send + 'static) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Query(Box::new(move |k| {
                let _ = tx.send(f(k));
            })))
            .await
            .map_err(|_| shutting_down())?;
        rx.await.map_err(|_| shutting_down())
    }

    /// The Send path shared by `Send` and StreamSession envelope frames:
    /// shape checks, authentication, rate limits, then the kernel.
    async fn send_envelope(
        &self,
        identity: Result<Identity, Status>,
        envelope: Envelope,
        bind: Option<oneshot::Sender<Option<Binding>>>,
    ) -> Ack {
        let now = crate::driver::now_ms();
        let reject = |e: KernelError| macp_kernel::error_ack(now, &envelope.session_id, &envelope.message_id, e);
        if let Err(e) = macp_kernel::validate::envelope_shape(&envelope, &self.kernel_config) {
            return reject(e);
        }
        let identity = match identity {
            Ok(i) => i,
            Err(_) => return reject(KernelError::new(ErrorCode::Unauthenticated, "missing or invalid credentials")),
        };
        let budget = if envelope.message_type == "SessionStart" { Budget::SessionStart } else { Budget::Message };
        if !self.limits.check(&identity.sender, budget) {
            return reject(KernelError::new(
                ErrorCode::RateLimited,
                format!(
                    "{} exceeded its per-minute {} limit",
                    identity.sender,
                    match budget {
                        Budget::SessionStart => "SessionStart",
                        Budget::Message => "message",
                    }
                ),
            ));
        }
        // Ambient envelopes touch no session and are never persisted: the
        // kernel's own admission function answers them here, on the
        // request's task, and they are broadcast directly instead of
        // queueing behind session traffic in the driver. (A StreamSession
        // frame may bind its stream, which only the driver can do.)
        if bind.is_none() && macp_kernel::is_ambient(&envelope.message_type) {
            let (ack, accepted) = Kernel::admit_ambient(now, &self.kernel_config, &identity, envelope);
            if let Some(envelope) = accepted {
                let _ = self
                    .watch
                    .signals
                    .send(WatchSignalsResponse { envelope: Some(envelope), sender_authenticated: true });
            }
            return ack;
        }
        // The envelope moves to the kernel; only its ids stay for the
        // shutdown answer.
        let (session_id, message_id) = (envelope.session_id.clone(), envelope.message_id.clone());
        let shutting_down = || {
            let e = KernelError::new(ErrorCode::InternalError, "the runtime is shutting down");
            macp_kernel::error_ack(now, &session_id, &message_id, e)
        };
        let (reply, rx) = oneshot::channel();
        let bind = bind.map(|tx| (identity.clone(), tx));
        let input = Input::Envelope { request: 0, identity, envelope };
        if self.tx.send(Command::Submit { input, reply, bind }).await.is_err() {
            return shutting_down();
        }
        match rx.await {
            Ok(Reply::Ack(a)) => a,
            _ => shutting_down(),
        }
    }

    async fn control(&self, req: Request<(String, String)>, op: ControlOp) -> Result<Ack, Status> {
        let identity = self.identity(&req).await?;
        if !self.limits.check(&identity.sender, Budget::Message) {
            return Err(macp_status(
                Code::ResourceExhausted,
                ErrorCode::RateLimited,
                "RATE_LIMITED: per-minute message limit exceeded",
            ));
        }
        let (session_id, reason) = req.into_inner();
        match self.submit(Input::Control { request: 0, identity, op, session_id, reason }).await? {
            Reply::Ack(a) => match a.error.as_ref().map(|e| e.code.as_str()) {
                Some("SESSION_NOT_FOUND") => {
                    Err(macp_status(Code::NotFound, ErrorCode::SessionNotFound, a.error.unwrap().message))
                }
                Some("FORBIDDEN") => {
                    Err(macp_status(Code::PermissionDenied, ErrorCode::Forbidden, a.error.unwrap().message))
                }
                _ => Ok(a),
            },
            Reply::Registry(_) => Err(Status::internal("unexpected reply")),
        }
    }

    async fn registry(&self, input: Input) -> Result<Result<String, KernelError>, Status> {
        match self.submit(input).await? {
            Reply::Registry(Err(e)) if e.code == ErrorCode::Forbidden => {
                Err(macp_status(Code::PermissionDenied, ErrorCode::Forbidden, e.message))
            }
            Reply::Registry(r) => Ok(r),
            Reply::Ack(_) => Err(Status::internal("unexpected reply")),
        }
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the runtime is shutting down")
}

fn registry_error(e: KernelError) -> String {
    format!("{}: {}", e.code, e.message)
}

/// Metadata key that names the MACP registry code of an error status.
///
/// Several registry codes share one gRPC status (NOT_FOUND is an unknown
/// session or an unknown policy; RESOURCE_EXHAUSTED is a rate limit or a
/// lagging stream), so clients branch on this key rather than on the status:
/// `macp-sdk-python` reads it into `MacpTransportError.macp_code` and
/// `macp_error_code()`, and without it reports `None`.
pub const ERROR_CODE_KEY: &str = "macp-error-code";

/// A gRPC status that also carries its registry code under [`ERROR_CODE_KEY`]
/// (sent as a trailer, or in the headers of a trailers-only response).
pub fn macp_status(status: Code, code: ErrorCode, message: impl Into<String>) -> Status {
    let mut md = MetadataMap::new();
    md.insert(ERROR_CODE_KEY, MetadataValue::from_static(code.as_str()));
    Status::with_metadata(status, message.into(), md)
}

/// Maps a kernel error to a gRPC status for RPCs that have no Ack.
pub fn status_of(e: KernelError) -> Status {
    let msg = format!("{}: {}", e.code, e.message);
    let status = match e.code {
        ErrorCode::SessionNotFound => Code::NotFound,
        ErrorCode::Forbidden => Code::PermissionDenied,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PayloadTooLarge | ErrorCode::RateLimited => Code::ResourceExhausted,
        ErrorCode::InternalError => Code::Internal,
        ErrorCode::InvalidEnvelope | ErrorCode::InvalidSessionId | ErrorCode::InvalidPolicyDefinition => {
            Code::InvalidArgument
        }
        ErrorCode::SessionAlreadyExists => Code::AlreadyExists,
        _ => Code::FailedPrecondition,
    };
    macp_status(status, e.code, msg)
}

fn capabilities() -> Capabilities {
    Capabilities {
        sessions: Some(SessionsCapability { stream: true, list_sessions: true, watch_sessions: true }),
        cancellation: Some(CancellationCapability { cancel_session: true }),
        progress: Some(ProgressCapability { progress: true }),
        manifest: Some(ManifestCapability { get_manifest: true }),
        mode_registry: Some(ModeRegistryCapability { list_modes: true, list_changed: true }),
        roots: Some(RootsCapability { list_roots: true, list_changed: false }),
        policy_registry: Some(PolicyRegistryCapability {
            register_policy: true,
            list_policies: true,
            list_changed: true,
            rule_extensions: Vec::new(),
            what_if_replay: false,
        }),
        decision_receipt: None,
        experimental: Some(ExperimentalCapabilities {
            features: BTreeMap::from([("ext_mode_lifecycle".to_string(), "true".to_string())]),
        }),
    }
}

fn error_frame(e: MacpError) -> StreamSessionResponse {
    StreamSessionResponse { response: Some(stream_session_response::Response::Error(e)) }
}

fn envelope_frame(env: &Envelope) -> StreamSessionResponse {
    StreamSessionResponse { response: Some(stream_session_response::Response::Envelope(env.clone())) }
}

fn inline(code: ErrorCode, msg: impl Into<String>, env: Option<&Envelope>) -> StreamSessionResponse {
    error_frame(MacpError {
        code: code.as_str().to_string(),
        message: msg.into(),
        session_id: env.map(|e| e.session_id.clone()).unwrap_or_default(),
        message_id: env.map(|e| e.message_id.clone()).unwrap_or_default(),
        details: Vec::new(),
    })
}

/// Frames of a StreamSession response; `None` ends the response stream even
/// while the request side is still open (the session reached a terminal
/// state, so nothing more will ever be streamed).
type Frame = Option<Result<StreamSessionResponse, Status>>;

/// Forwards a session feed to a stream: replayed history first (if any),
/// then live items newer than `skip_upto`. When the feed ends because the
/// session is terminal, the stream ends; when the hub dropped the feed for
/// falling behind, the stream ends with RESOURCE_EXHAUSTED.
async fn forward(out: mpsc::Sender<Frame>, mut feed: SessionFeed, replay: Vec<Sequenced>, skip_upto: u64) {
    let mut last = skip_upto;
    for item in replay {
        last = item.seq;
        if out.send(Some(Ok(envelope_frame(&item.envelope)))).await.is_err() {
            return;
        }
    }
    loop {
        // Leave as soon as the client goes away, not at the next broadcast:
        // an idle session would otherwise keep this task and its hub slot.
        let item = tokio::select! {
            item = feed.rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
            _ = out.closed() => return,
        };
        if item.seq <= last {
            continue;
        }
        last = item.seq;
        if out.send(Some(Ok(envelope_frame(&item.envelope)))).await.is_err() {
            return;
        }
    }
    if feed.overflowed.load(std::sync::atomic::Ordering::Acquire) {
        let _ = out
            .send(Some(Err(Status::resource_exhausted(format!(
                "subscriber fell behind the live stream; resubscribe with after_sequence={last}"
            )))))
            .await;
    }
    let _ = out.send(None).await;
}

#[tonic::async_trait]
impl MacpRuntimeService for Runtime {
    async fn initialize(&self, req: Request<InitializeRequest>) -> Result<Response<InitializeResponse>, Status> {
        let r = req.into_inner();
        if r.supported_protocol_versions.is_empty() {
            return Err(Status::invalid_argument("supported_protocol_versions must list at least one version"));
        }
        if !r.supported_protocol_versions.iter().any(|v| v == macp_kernel::config::PROTOCOL_VERSION) {
            return Err(macp_status(
                Code::FailedPrecondition,
                ErrorCode::UnsupportedProtocolVersion,
                format!(
                    "UNSUPPORTED_PROTOCOL_VERSION: this runtime speaks {}; the client offered {:?}",
                    macp_kernel::config::PROTOCOL_VERSION,
                    r.supported_protocol_versions
                ),
            ));
        }
        let supported_modes = self.query(|k| k.modes().all_ids()).await?;
        Ok(Response::new(InitializeResponse {
            selected_protocol_version: macp_kernel::config::PROTOCOL_VERSION.to_string(),
            runtime_info: Some(RuntimeInfo {
                name: "macp-rs".into(),
                title: "macp-rs runtime".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                description: "Rust runtime for the Multi-Agent Coordination Protocol".into(),
                website_url: String::new(),
            }),
            capabilities: Some(capabilities()),
            supported_modes,
            instructions: "Authenticate every call; use Send for per-message acks and StreamSession (or passive subscribe) to follow a session.".into(),
        }))
    }

    async fn send(&self, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let identity = self.identity(&req).await;
        let envelope =
            req.into_inner().envelope.ok_or_else(|| Status::invalid_argument("SendRequest needs an envelope"))?;
        let ack = self.send_envelope(identity, envelope, None).await;
        Ok(Response::new(SendResponse { ack: Some(ack) }))
    }

    type StreamSessionStream = RpcStream<StreamSessionResponse>;

    async fn stream_session(
        &self,
        req: Request<Streaming<StreamSessionRequest>>,
    ) -> Result<Response<Self::StreamSessionStream>, Status> {
        let identity = self.identity(&req).await?;
        let mut inbound = req.into_inner();
        let (out, rx) = mpsc::channel::<Frame>(64);
        let rt = self.clone();
        tokio::spawn(async move {
            let mut bound: Option<String> = None;
            while let Ok(Some(frame)) = inbound.message().await {
                let has_sub = !frame.subscribe_session_id.is_empty();
                match (frame.envelope, has_sub) {
                    (Some(_), true) => {
                        let _ = out
                            .send(Some(Err(Status::invalid_argument(
                                "a StreamSessionRequest sets either envelope or subscribe_session_id, not both",
                            ))))
                            .await;
                        return;
                    }
                    (None, false) => {
                        let _ = out
                            .send(Some(Ok(inline(
                                ErrorCode::InvalidEnvelope,
                                "empty StreamSessionRequest: set envelope or subscribe_session_id",
                                None,
                            ))))
                            .await;
                    }
                    (None, true) => {
                        let sid = frame.subscribe_session_id;
                        if bound.as_ref().is_some_and(|b| *b != sid) {
                            let _ = out
                                .send(Some(Err(Status::invalid_argument("this stream is bound to another session"))))
                                .await;
                            return;
                        }
                        let (tx, rx) = oneshot::channel();
                        let cmd = Command::Subscribe { identity: identity.clone(), session_id: sid.clone(), reply: tx };
                        if rt.tx.send(cmd).await.is_err() {
                            return;
                        }
                        let sub: Subscription = match rx.await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                let _ = out.send(Some(Err(status_of(e)))).await;
                                return;
                            }
                            Err(_) => return,
                        };
                        let after = frame.after_sequence;
                        let history = match sub.history.read(&sid, after, sub.upto) {
                            Ok(h) => h,
                            Err(e) => {
                                let _ = out
                                    .send(Some(Err(Status::failed_precondition(format!(
                                        "history is unavailable: {e}"
                                    )))))
                                    .await;
                                return;
                            }
                        };
                        bound = Some(sid);
                        tokio::spawn(forward(out.clone(), sub.feed, history, sub.upto.max(after)));
                    }
                    (Some(env), false) => {
                        if env.session_id.is_empty() || env.mode.is_empty() {
                            let _ = out
                                .send(Some(Ok(inline(
                                    ErrorCode::InvalidEnvelope,
                                    "stream envelopes are session-scoped: session_id and mode are required (send Signals with Send)",
                                    Some(&env),
                                ))))
                                .await;
                            continue;
                        }
                        if let Some(b) = &bound {
                            if *b != env.session_id {
                                let _ = out
                                    .send(Some(Ok(inline(
                                        ErrorCode::InvalidEnvelope,
                                        format!(
                                            "this stream is bound to session {b}; open another stream for {}",
                                            env.session_id
                                        ),
                                        Some(&env),
                                    ))))
                                    .await;
                                continue;
                            }
                        }
                        let (btx, brx) = oneshot::channel();
                        let want_bind = bound.is_none();
                        let ack = rt.send_envelope(Ok(identity.clone()), env.clone(), want_bind.then_some(btx)).await;
                        if want_bind {
                            if let Ok(Some(b)) = brx.await {
                                bound = Some(env.session_id.clone());
                                tokio::spawn(forward(out.clone(), b.feed, Vec::new(), b.from));
                            }
                        }
                        if !ack.ok {
                            if let Some(e) = ack.error {
                                if out.send(Some(Ok(error_frame(e)))).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        });
        let frames = ReceiverStream::new(rx).take_while(|f| f.is_some()).filter_map(|f| f);
        Ok(Response::new(Box::pin(frames)))
    }

    async fn get_session(&self, req: Request<GetSessionRequest>) -> Result<Response<GetSessionResponse>, Status> {
        let identity = self.identity(&req).await?;
        let sid = req.into_inner().session_id;
        let md = self.query(move |k| k.get_session(&identity, &sid)).await?.map_err(status_of)?;
        Ok(Response::new(GetSessionResponse { metadata: Some(md) }))
    }

    async fn cancel_session(
        &self,
        req: Request<CancelSessionRequest>,
    ) -> Result<Response<CancelSessionResponse>, Status> {
        let req = req.map(|r| (r.session_id, r.reason));
        let ack = self.control(req, ControlOp::Cancel).await?;
        Ok(Response::new(CancelSessionResponse { ack: Some(ack) }))
    }

    async fn suspend_session(
        &self,
        req: Request<SuspendSessionRequest>,
    ) -> Result<Response<SuspendSessionResponse>, Status> {
        let req = req.map(|r| (r.session_id, r.reason));
        let ack = self.control(req, ControlOp::Suspend).await?;
        Ok(Response::new(SuspendSessionResponse { ack: Some(ack) }))
    }

    async fn resume_session(
        &self,
        req: Request<ResumeSessionRequest>,
    ) -> Result<Response<ResumeSessionResponse>, Status> {
        let req = req.map(|r| (r.session_id, r.reason));
        let ack = self.control(req, ControlOp::Resume).await?;
        Ok(Response::new(ResumeSessionResponse { ack: Some(ack) }))
    }

    async fn get_manifest(&self, req: Request<GetManifestRequest>) -> Result<Response<GetManifestResponse>, Status> {
        let agent = req.into_inner().agent_id;
        let me = self.kernel_config.runtime_id.clone();
        if !agent.is_empty() && agent != me {
            return Err(Status::not_found(format!("no manifest is known for agent '{agent}'")));
        }
        let supported_modes = self.query(|k| k.modes().all_ids()).await?;
        Ok(Response::new(GetManifestResponse {
            manifest: Some(AgentManifest {
                agent_id: me,
                title: "macp-rs runtime".into(),
                description: "MACP coordination runtime: sessions, modes, governance policies, durable history".into(),
                supported_modes,
                input_content_types: vec!["application/macp-envelope+proto".into()],
                output_content_types: vec!["application/macp-envelope+proto".into()],
                metadata: BTreeMap::from([("implementation".to_string(), "macp-rs".to_string())]),
                transport_endpoints: Vec::new(),
            }),
        }))
    }

    async fn list_modes(&self, _req: Request<ListModesRequest>) -> Result<Response<ListModesResponse>, Status> {
        let modes = self.query(|k| k.modes().standards_track()).await?;
        Ok(Response::new(ListModesResponse { modes }))
    }

    type WatchModeRegistryStream = RpcStream<WatchModeRegistryResponse>;

    async fn watch_mode_registry(
        &self,
        _req: Request<WatchModeRegistryRequest>,
    ) -> Result<Response<Self::WatchModeRegistryStream>, Status> {
        let rx = self.watch.registry.subscribe();
        let hint = |_| WatchModeRegistryResponse {
            change: Some(RegistryChanged { registry: "modes".into(), observed_at_unix_ms: crate::driver::now_ms() }),
        };
        let first = tokio_stream::once(Ok(hint(())));
        let rest = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| match e {
            Ok(RegistryEvent::Modes) => Some(Ok(hint(()))),
            Ok(RegistryEvent::Policies) => None,
            // A lagging watcher only needs one more hint: it re-queries anyway.
            Err(_) => Some(Ok(hint(()))),
        });
        Ok(Response::new(Box::pin(first.chain(rest))))
    }

    async fn list_roots(&self, _req: Request<ListRootsRequest>) -> Result<Response<ListRootsResponse>, Status> {
        Ok(Response::new(ListRootsResponse { roots: Vec::new() }))
    }

    type WatchRootsStream = RpcStream<WatchRootsResponse>;

    async fn watch_roots(&self, _req: Request<WatchRootsRequest>) -> Result<Response<Self::WatchRootsStream>, Status> {
        let first = tokio_stream::once(Ok(WatchRootsResponse {
            change: Some(RootsChanged { observed_at_unix_ms: crate::driver::now_ms() }),
        }));
        Ok(Response::new(Box::pin(first.chain(tokio_stream::pending()))))
    }

    async fn list_ext_modes(
        &self,
        _req: Request<ListExtModesRequest>,
    ) -> Result<Response<ListExtModesResponse>, Status> {
        let modes = self.query(|k| k.modes().extensions()).await?;
        Ok(Response::new(ListExtModesResponse { modes }))
    }

    async fn register_ext_mode(
        &self,
        req: Request<RegisterExtModeRequest>,
    ) -> Result<Response<RegisterExtModeResponse>, Status> {
        let identity = self.identity(&req).await?;
        let descriptor =
            req.into_inner().mode_descriptor.ok_or_else(|| Status::invalid_argument("mode_descriptor is required"))?;
        let r = self.registry(Input::RegisterExtMode { request: 0, identity, descriptor }).await?;
        Ok(Response::new(match r {
            Ok(_) => RegisterExtModeResponse { ok: true, error: String::new() },
            Err(e) => RegisterExtModeResponse { ok: false, error: registry_error(e) },
        }))
    }

    async fn unregister_ext_mode(
        &self,
        req: Request<UnregisterExtModeRequest>,
    ) -> Result<Response<UnregisterExtModeResponse>, Status> {
        let identity = self.identity(&req).await?;
        let mode = req.into_inner().mode;
        let r = self.registry(Input::UnregisterExtMode { request: 0, identity, mode }).await?;
        Ok(Response::new(match r {
            Ok(_) => UnregisterExtModeResponse { ok: true, error: String::new() },
            Err(e) => UnregisterExtModeResponse { ok: false, error: registry_error(e) },
        }))
    }

    async fn promote_mode(&self, req: Request<PromoteModeRequest>) -> Result<Response<PromoteModeResponse>, Status> {
        let identity = self.identity(&req).await?;
        let r = req.into_inner();
        let res = self
            .registry(Input::PromoteMode {
                request: 0,
                identity,
                mode: r.mode.clone(),
                promoted_mode_name: r.promoted_mode_name,
            })
            .await?;
        Ok(Response::new(match res {
            Ok(mode) => PromoteModeResponse { ok: true, error: String::new(), mode },
            Err(e) => PromoteModeResponse { ok: false, error: registry_error(e), mode: r.mode },
        }))
    }

    type WatchSignalsStream = RpcStream<WatchSignalsResponse>;

    async fn watch_signals(
        &self,
        req: Request<WatchSignalsRequest>,
    ) -> Result<Response<Self::WatchSignalsStream>, Status> {
        self.identity(&req).await?;
        let rx = self.watch.signals.subscribe();
        let s = tokio_stream::wrappers::BroadcastStream::new(rx).map(|e| {
            e.map_err(|_| Status::resource_exhausted("signal watcher fell behind; signals have no backlog, reconnect"))
        });
        // tonic ends the stream after yielding an error status.
        Ok(Response::new(Box::pin(s)))
    }

    async fn list_sessions(&self, req: Request<ListSessionsRequest>) -> Result<Response<ListSessionsResponse>, Status> {
        let identity = self.identity(&req).await?;
        let r = req.into_inner();
        let (sessions, next_page_token) = self
            .query(move |k| k.list_sessions(&identity, r.page_size, &r.page_token))
            .await?
            .map_err(|e| Status::invalid_argument(e.message))?;
        Ok(Response::new(ListSessionsResponse { sessions, next_page_token }))
    }

    type WatchSessionsStream = RpcStream<WatchSessionsResponse>;

    async fn watch_sessions(
        &self,
        req: Request<WatchSessionsRequest>,
    ) -> Result<Response<Self::WatchSessionsStream>, Status> {
        let identity = self.identity(&req).await?;
        // Subscribe before the snapshot so nothing falls between them; live
        // CREATED events for sessions already in the snapshot are dropped.
        let rx = self.watch.lifecycle.subscribe();
        let who = identity.clone();
        let initial: Vec<SessionMetadata> = self
            .query(move |k| {
                k.all_sessions()
                    .filter(|m| {
                        who.grants.is_observer || m.initiator == who.sender || m.participants.contains(&who.sender)
                    })
                    .collect()
            })
            .await?;
        let synced: BTreeSet<String> = initial.iter().map(|m| m.session_id.clone()).collect();
        let first = tokio_stream::iter(initial.into_iter().map(|m| {
            Ok(WatchSessionsResponse {
                event: Some(SessionLifecycleEvent {
                    event_type: session_lifecycle_event::EventType::Created as i32,
                    observed_at_unix_ms: m.started_at_unix_ms,
                    session: Some(m),
                }),
            })
        }));
        let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| match e {
            Ok(ev) => {
                let m = ev.session.as_ref()?;
                let visible = identity.grants.is_observer
                    || m.initiator == identity.sender
                    || m.participants.contains(&identity.sender);
                let dup = ev.event_type == session_lifecycle_event::EventType::Created as i32
                    && synced.contains(&m.session_id);
                (visible && !dup).then_some(Ok(WatchSessionsResponse { event: Some(ev) }))
            }
            Err(_) => Some(Err(Status::resource_exhausted("session watcher fell behind; reconnect to resync"))),
        });
        Ok(Response::new(Box::pin(first.chain(live))))
    }

    async fn register_policy(
        &self,
        req: Request<RegisterPolicyRequest>,
    ) -> Result<Response<RegisterPolicyResponse>, Status> {
        let identity = self.identity(&req).await?;
        let descriptor = req
            .into_inner()
            .policy_descriptor
            .ok_or_else(|| Status::invalid_argument("policy_descriptor is required"))?;
        let r = self.registry(Input::RegisterPolicy { request: 0, identity, descriptor }).await?;
        Ok(Response::new(match r {
            Ok(_) => RegisterPolicyResponse { ok: true, error: String::new() },
            Err(e) => RegisterPolicyResponse { ok: false, error: registry_error(e) },
        }))
    }

    async fn unregister_policy(
        &self,
        req: Request<UnregisterPolicyRequest>,
    ) -> Result<Response<UnregisterPolicyResponse>, Status> {
        let identity = self.identity(&req).await?;
        let policy_id = req.into_inner().policy_id;
        let r = self.registry(Input::UnregisterPolicy { request: 0, identity, policy_id }).await?;
        Ok(Response::new(match r {
            Ok(_) => UnregisterPolicyResponse { ok: true, error: String::new() },
            Err(e) => UnregisterPolicyResponse { ok: false, error: registry_error(e) },
        }))
    }

    async fn get_policy(&self, req: Request<GetPolicyRequest>) -> Result<Response<GetPolicyResponse>, Status> {
        self.identity(&req).await?;
        let id = req.into_inner().policy_id;
        let lookup = id.clone();
        let d = self
            .query(move |k| k.policies().get(&lookup).cloned())
            .await?
            .ok_or_else(|| Status::not_found(format!("policy '{id}' is not registered")))?;
        Ok(Response::new(GetPolicyResponse { policy_descriptor: Some(d) }))
    }

    async fn list_policies(&self, req: Request<ListPoliciesRequest>) -> Result<Response<ListPoliciesResponse>, Status> {
        self.identity(&req).await?;
        let mode = req.into_inner().mode;
        let descriptors = self.query(move |k| k.policies().list(&mode)).await?;
        Ok(Response::new(ListPoliciesResponse { descriptors }))
    }

    type WatchPoliciesStream = RpcStream<WatchPoliciesResponse>;

    async fn watch_policies(
        &self,
        _req: Request<WatchPoliciesRequest>,
    ) -> Result<Response<Self::WatchPoliciesStream>, Status> {
        let mut rx = self.watch.registry.subscribe();
        let (out, orx) = mpsc::channel(16);
        let rt = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok(descriptors) = rt.query(|k| k.policies().list("")).await else { return };
                let msg = WatchPoliciesResponse { descriptors, observed_at_unix_ms: crate::driver::now_ms() };
                if out.send(Ok(msg)).await.is_err() {
                    return;
                }
                loop {
                    match rx.recv().await {
                        Ok(RegistryEvent::Policies) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Ok(RegistryEvent::Modes) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(orx))))
    }

    async fn what_if_replay(
        &self,
        _req: Request<WhatIfReplayRequest>,
    ) -> Result<Response<WhatIfReplayResponse>, Status> {
        Err(Status::unimplemented("WhatIfReplay is not implemented (policy_registry.what_if_replay = false)"))
    }

    async fn get_decision_receipt(
        &self,
        _req: Request<GetDecisionReceiptRequest>,
    ) -> Result<Response<GetDecisionReceiptResponse>, Status> {
        Err(Status::unimplemented("decision receipts are not implemented (no decision_receipt capability)"))
    }

    async fn get_receipt_keys(
        &self,
        _req: Request<GetReceiptKeysRequest>,
    ) -> Result<Response<GetReceiptKeysResponse>, Status> {
        Err(Status::unimplemented("decision receipts are not implemented (no decision_receipt capability)"))
    }
}
