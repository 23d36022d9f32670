//! Test harness: an in-process server on a free loopback port, and clients
//! that authenticate as dev agents or with bearer tokens.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use clap::Parser;
use macp_kernel::{Effect, Identity, Input, Kernel, KernelConfig, NoEnded};
use macp_storage::Storage;
use macp_storage_fs::{FsConfig, FsStorage};
use macp_transport_grpc::config::Config;
use macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient;
use macp_wire::v1::{
    Ack, CommitmentPayload, Envelope, GetPolicyRequest, PolicyDescriptor, SendRequest, SessionStartPayload,
};
use macp_wire::Message;
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

pub const DECISION: &str = "macp.mode.decision.v1";

/// A running server; dropping it shuts the server down.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Starts a server with `--dev --memory-only` plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Server {
        let mut args = vec!["macp-runtime", "--dev", "--memory-only", "--bind-addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Self::start_with(Config::parse_from(args).resolve().expect("config")).await
    }

    /// Starts a plaintext `--memory-only` server without dev identities,
    /// authenticating as `extra` configures.
    pub async fn start_insecure(extra: &[&str]) -> Server {
        let mut args = vec!["macp-runtime", "--memory-only", "--allow-insecure", "--bind-addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Self::start_with(Config::parse_from(args).resolve().expect("config")).await
    }

    /// Starts a server with a full configuration.
    pub async fn start_with(cfg: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            macp_transport_grpc::server::serve(cfg, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("server");
        });
        Server { addr, stop: Some(stop), task: Some(task) }
    }

    /// Stops the server and waits for its shutdown to complete.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    /// A client authenticating as dev agent `who` (`x-macp-agent-id`).
    pub async fn client(&self, who: &str) -> Client {
        MacpRuntimeServiceClient::with_interceptor(self.channel().await, Auth::Agent(who.to_string()))
    }

    /// A client sending `Authorization: Bearer <token>`.
    pub async fn bearer(&self, token: &str) -> Client {
        MacpRuntimeServiceClient::with_interceptor(self.channel().await, Auth::Bearer(token.to_string()))
    }

    /// A client sending exactly `headers`.
    pub async fn with_headers(&self, headers: &[(&'static str, &str)]) -> Client {
        let h = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
        MacpRuntimeServiceClient::with_interceptor(self.channel().await, Auth::Headers(h))
    }

    /// A client with no credentials.
    pub async fn anonymous(&self) -> Client {
        MacpRuntimeServiceClient::with_interceptor(self.channel().await, Auth::None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[derive(Clone)]
pub enum Auth {
    Agent(String),
    Bearer(String),
    /// Exactly these headers, appended in order (repeats allowed).
    Headers(Vec<(&'static str, String)>),
    None,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        match self {
            Auth::Agent(a) => {
                req.metadata_mut().insert("x-macp-agent-id", MetadataValue::try_from(a.as_str()).unwrap());
            }
            Auth::Bearer(t) => {
                req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {t}")).unwrap());
            }
            Auth::Headers(h) => {
                for (k, v) in h {
                    req.metadata_mut().append(*k, MetadataValue::try_from(v.as_str()).unwrap());
                }
            }
            Auth::None => {}
        }
        Ok(req)
    }
}

pub type Client = MacpRuntimeServiceClient<InterceptedService<Channel, Auth>>;

/// A client of a server (a spawned binary) on local `port`, as dev agent
/// `who`, once the server accepts connections (within a minute).
pub async fn connect_port(port: u16, who: &str) -> Client {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await {
            return MacpRuntimeServiceClient::with_interceptor(ch, Auth::Agent(who.to_string()));
        }
        assert!(std::time::Instant::now() < deadline, "the server on port {port} did not come up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A client of local `port` that connects at its first call (and whose
/// calls fail while nothing listens there).
pub fn lazy_port(port: u16, who: &str) -> Client {
    let ch = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
    MacpRuntimeServiceClient::with_interceptor(ch, Auth::Agent(who.to_string()))
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub fn sid() -> String {
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("00000000-0000-4000-8000-{n:012x}")
}

pub fn mid() -> String {
    format!("m{}", COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

pub fn env(sid: &str, mode: &str, message_type: &str, payload: Vec<u8>) -> Envelope {
    Envelope {
        macp_version: "1.0".into(),
        mode: mode.into(),
        message_type: message_type.into(),
        message_id: mid(),
        session_id: sid.into(),
        sender: String::new(),
        timestamp_unix_ms: 0,
        payload,
    }
}

pub fn start_payload(participants: &[&str]) -> SessionStartPayload {
    SessionStartPayload {
        intent: "test".into(),
        participants: participants.iter().map(|s| s.to_string()).collect(),
        mode_version: "1.0.0".into(),
        configuration_version: "cfg-1".into(),
        ttl_ms: 60_000,
        ..Default::default()
    }
}

pub fn start_env(sid: &str, participants: &[&str]) -> Envelope {
    env(sid, DECISION, "SessionStart", start_payload(participants).encode_to_vec())
}

pub async fn send(c: &mut Client, e: Envelope) -> Ack {
    c.send(SendRequest { envelope: Some(e) })
        .await
        .expect("Send never fails at the transport level")
        .into_inner()
        .ack
        .unwrap()
}

pub fn code(a: &Ack) -> &str {
    a.error.as_ref().map(|e| e.code.as_str()).unwrap_or("")
}

pub fn proposal(id: &str) -> Vec<u8> {
    macp_wire::modes::decision::ProposalPayload {
        proposal_id: id.into(),
        option: "deploy".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

pub fn vote(id: &str, v: &str) -> Vec<u8> {
    macp_wire::modes::decision::VotePayload { proposal_id: id.into(), vote: v.into(), reason: String::new() }
        .encode_to_vec()
}

pub fn commitment() -> Vec<u8> {
    CommitmentPayload {
        commitment_id: "c1".into(),
        action: "decision.selected".into(),
        authority_scope: "test".into(),
        reason: "because".into(),
        mode_version: "1.0.0".into(),
        configuration_version: "cfg-1".into(),
        outcome_positive: true,
        ..Default::default()
    }
    .encode_to_vec()
}

/// Starts a decision session I/A/B as `I`; returns its id.
pub async fn start_session(i: &mut Client) -> String {
    let s = sid();
    let ack = send(i, start_env(&s, &["I", "A", "B"])).await;
    assert!(ack.ok, "{:?}", ack.error);
    s
}

/// GetPolicy of a policy that must exist.
pub async fn get_policy(c: &mut Client, policy_id: &str) -> PolicyDescriptor {
    let r = c.get_policy(GetPolicyRequest { policy_id: policy_id.into() }).await.expect("GetPolicy");
    r.into_inner().policy_descriptor.expect("a descriptor")
}

/// Records per append when writing a data directory (a batch of the
/// driver's size).
const OPEN_SESSIONS_BATCH: usize = 4096;
/// Long enough that no written session expires while a test runs.
const OPEN_SESSIONS_TTL_MS: i64 = 3_600_000;

/// Writes `n` open decision sessions (ids from `session_id`) to a fresh
/// data directory through the kernel and the file backend directly (no
/// server, no gRPC), synced and without a checkpoint, so a start must
/// replay every one of them.
///
/// A SessionStart's record depends on its session alone, so a fresh kernel
/// per batch writes the same log as one kernel for all, in a fraction of
/// the memory.
pub fn write_open_sessions(dir: &Path, n: usize, session_id: impl Fn(usize) -> String) {
    let mut kernel = Kernel::new(KernelConfig::default());
    let mut storage = FsStorage::open(dir, FsConfig::default()).expect("open the data directory");
    storage.load(&|| false, &mut |_| Ok(())).expect("load the empty directory");
    let identity = Identity::new("I");
    let now = macp_transport_grpc::driver::now_ms();
    let mut effects = Vec::new();
    let mut batch = Vec::with_capacity(OPEN_SESSIONS_BATCH);
    let mut written = 0;
    for i in 0..n {
        let sid = session_id(i);
        let mut payload = start_payload(&["I", "A", "B"]);
        payload.ttl_ms = OPEN_SESSIONS_TTL_MS;
        let mut envelope = env(&sid, DECISION, "SessionStart", payload.encode_to_vec());
        envelope.sender = "I".into();
        let input = Input::Envelope { request: i as u64, identity: identity.clone(), envelope };
        kernel.handle_with(now, input, &NoEnded, &mut effects);
        for effect in effects.drain(..) {
            match effect {
                Effect::Persist(record) => batch.push(record),
                Effect::Reply { reply, .. } => assert!(reply.error().is_none(), "{sid} refused: {reply:?}"),
                Effect::Ended(_) => panic!("{sid} ended at its start"),
                Effect::Broadcast(_) => {}
            }
        }
        if batch.len() >= OPEN_SESSIONS_BATCH {
            written += batch.len();
            storage.append(&batch, &[]).expect("append");
            batch.clear();
            kernel = Kernel::new(KernelConfig::default());
        }
    }
    written += batch.len();
    storage.append(&batch, &[]).expect("append");
    storage.sync().expect("sync");
    assert_eq!(written, n, "one record per session");
    // Dropped without a checkpoint: recovery replays the whole log.
}
