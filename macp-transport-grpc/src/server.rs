//! Assembles and runs the server: storage, kernel, driver task, tonic
//! service with TLS, health and reflection, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use macp_kernel::text::Count;
use macp_kernel::{KernelConfig, SessionIdPolicy};
use macp_pipeline::{CheckpointPolicy, RecoveryError};
use macp_receipt::{KeyFileError, ReceiptKeys};
use macp_storage::{MemoryConfig, MemoryStorage, Storage, StorageError};
use macp_storage_fs::{FsConfig, FsStorage};
use macp_storage_pg::{ClusterConfig, PgConfig, PgStorage};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::auth::jwks::{Jwks, JwksError, RemoteJwks};
use crate::auth::{parse_tokens, Authenticator, JwtSettings, JwtVerifier, TokenFileError};
use crate::cluster::forward::{ClusterKey, Forwarder};
use crate::cluster::{Node, NodeSettings, Router};
use crate::config::{Config, StorageKind};
use crate::connections::{limit_incoming, ConnLayer, ConnectionLimits};
use crate::driver::{Driver, Reopen};
use crate::hub::Hub;
use crate::limits::RateLimits;
use crate::metrics::Metrics;
use crate::pb::macp_runtime_service_server::MacpRuntimeServiceServer;
use crate::service::{Runtime, Watch};

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The static token configuration was refused.
    #[error("{source_var}: {error}")]
    Tokens {
        /// Which variable held the tokens.
        source_var: &'static str,
        /// What is wrong with them.
        error: TokenFileError,
    },
    /// The JWT key configuration was refused.
    #[error("JWT keys: {0}")]
    Jwks(#[from] JwksError),
    /// A file of the policies directory was refused (its path and why).
    #[error("MACP_POLICIES_DIR: {0}")]
    Policies(#[from] crate::policies_dir::PolicyFileError),
    /// The receipt key file was refused (file name and reason).
    #[error("MACP_RECEIPT_KEYS_FILE {0}")]
    ReceiptKeys(#[from] KeyFileError),
    /// Storage could not be opened or recovered.
    #[error("storage: {0}")]
    Storage(String),
    /// The listener or TLS setup failed.
    #[error("transport: {0}")]
    Transport(String),
}

/// The kernel configuration implied by the server configuration.
pub fn kernel_config(cfg: &Config) -> KernelConfig {
    KernelConfig {
        session_id_policy: if cfg.session_id_policy == "lax" { SessionIdPolicy::Lax } else { SessionIdPolicy::Strict },
        max_payload_bytes: cfg.max_payload_bytes,
        ..KernelConfig::default()
    }
}

/// Builds the authenticator: static tokens from both sources, and JWT
/// verification when `MACP_AUTH_ISSUER` is set (which, for a JWKS URL,
/// starts the key refresh task).
async fn load_auth(cfg: &Config) -> Result<Authenticator, StartError> {
    let mut entries = Vec::new();
    if let Some(json) = &cfg.auth_tokens_json {
        entries.extend(
            parse_tokens(json).map_err(|error| StartError::Tokens { source_var: "MACP_AUTH_TOKENS_JSON", error })?,
        );
    }
    if let Some(path) = &cfg.auth_tokens_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StartError::Config(format!("cannot read MACP_AUTH_TOKENS_FILE {}: {e}", path.display())))?;
        entries.extend(
            parse_tokens(&text).map_err(|error| StartError::Tokens { source_var: "MACP_AUTH_TOKENS_FILE", error })?,
        );
    }
    let auth = Authenticator::new(entries, cfg.allow_dev_sender_header)
        .map_err(|error| StartError::Tokens { source_var: "MACP_AUTH_TOKENS_JSON + MACP_AUTH_TOKENS_FILE", error })?;
    let Some(issuer) = &cfg.auth_issuer else { return Ok(auth) };
    let jwks = match (&cfg.auth_jwks_json, &cfg.auth_jwks_url) {
        (Some(json), _) => Jwks::inline(json, &cfg.auth_jwt_algs)?,
        (None, Some(url)) => {
            let remote = RemoteJwks {
                url: url.clone(),
                ttl: Duration::from_secs(cfg.auth_jwks_ttl_secs),
                ca_file: cfg.auth_jwks_ca_file.clone(),
            };
            Jwks::remote(remote, &cfg.auth_jwt_algs).await?
        }
        (None, None) => {
            return Err(StartError::Config("MACP_AUTH_ISSUER needs MACP_AUTH_JWKS_JSON or MACP_AUTH_JWKS_URL".into()))
        }
    };
    let settings = JwtSettings {
        issuer: issuer.clone(),
        audience: cfg.auth_audience.clone(),
        algorithms: cfg.auth_jwt_algs.clone(),
        leeway: Duration::from_secs(cfg.auth_leeway_secs),
    };
    Ok(auth.with_jwt(JwtVerifier::new(settings, jwks)))
}

/// The receipt keys the configuration asks for: the key file; else, under
/// `--dev`, a key generated now; else none (receipts served unsigned).
pub fn receipt_keys(cfg: &Config) -> Result<ReceiptKeys, StartError> {
    match &cfg.receipt_keys_file {
        Some(path) => Ok(ReceiptKeys::load(path)?),
        None if cfg.dev => ReceiptKeys::ephemeral()
            .map_err(|e| StartError::Config(format!("cannot generate the --dev receipt signing key: {e}"))),
        None => Ok(ReceiptKeys::unsigned()),
    }
}

/// How receipts are signed, as the start-up line says it.
fn receipts_label(keys: &ReceiptKeys) -> String {
    match keys.signer() {
        Some(k) if keys.is_ephemeral() => format!(
            "signed with EPHEMERAL key {} (--dev: generated at start, so receipts stop verifying after a restart; set MACP_RECEIPT_KEYS_FILE to keep one)",
            k.kid()
        ),
        Some(k) => format!("signed with key {} ({} published)", k.kid(), Count::of(keys.published_count(), "key")),
        None => "unsigned, integrity only (set MACP_RECEIPT_KEYS_FILE to sign them)".into(),
    }
}

/// Opens the configured storage backend (not yet loaded).
pub fn open_storage(cfg: &Config) -> Result<Box<dyn Storage>, StorageError> {
    match cfg.storage() {
        StorageKind::Memory => Ok(Box::new(MemoryStorage::new(MemoryConfig {
            retention: cfg.retention,
            history_limit_bytes: cfg.memory_history_limit.bytes(),
            // Nothing outlives a memory-only process: no restart will read
            // a checkpoint, so none keeps a copy of the open sessions.
            restartable: false,
        }))),
        StorageKind::File => {
            let fs = FsConfig { retention: cfg.retention, ..FsConfig::default() };
            Ok(Box::new(FsStorage::open(&cfg.data_dir, fs)?))
        }
        StorageKind::Postgres => {
            // `Config::resolve` sets it whenever the storage is postgres.
            let url = cfg.database.as_ref().ok_or(StorageError::Misuse("postgres storage without a database URL"))?;
            let pg = PgConfig { retention: cfg.retention, ..PgConfig::default() };
            Ok(Box::new(PgStorage::open(url, pg)?))
        }
    }
}

/// The storage backend as the logs name it (a database URL without its
/// password).
fn storage_label(cfg: &Config) -> String {
    match (cfg.storage(), &cfg.database) {
        (StorageKind::Memory, _) => format!(
            "memory only (nothing survives a restart; ended sessions' history capped at {})",
            cfg.memory_history_limit
        ),
        (StorageKind::File, _) => cfg.data_dir.display().to_string(),
        (StorageKind::Postgres, Some(url)) => format!("PostgreSQL {url} schema {}", PgConfig::default().schema),
        (StorageKind::Postgres, None) => "PostgreSQL (no database URL)".into(),
    }
}

/// How the driver reopens storage after a failed write.
fn reopen(cfg: &Config) -> Reopen {
    let cfg = cfg.clone();
    Box::new(move || {
        if cfg.storage() == StorageKind::Memory {
            // In memory there is nothing to reopen: what was lost is lost.
            return Err(StorageError::Misuse("memory-only storage cannot be reopened after a failure"));
        }
        open_storage(&cfg)
    })
}

/// The checkpoint policy implied by the configuration.
pub fn checkpoint_policy(cfg: &Config) -> CheckpointPolicy {
    CheckpointPolicy {
        every_records: cfg.checkpoint_every(),
        every_ms: (cfg.checkpoint_interval_secs as i64).saturating_mul(1000),
    }
}

/// Runs the server on an already-bound listener until `shutdown` resolves.
/// Returns after the driver has synced and checkpointed. A shutdown that
/// arrives before serving — while JWT keys are fetched or storage is still
/// being recovered — stops the start promptly and returns `Ok` (nothing
/// was changed yet, nothing is lost).
pub async fn serve(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    serve_with(cfg, listener, None, shutdown).await
}

/// [`serve`], with the metrics endpoint on an already-bound listener
/// (tests bind port 0 and read the port back). Without one, the endpoint
/// listens on `cfg.metrics_addr` if that is set, and metrics are off if
/// neither is given.
pub async fn serve_with(
    cfg: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let kcfg = kernel_config(&cfg);
    // A bad key file stops the start before anything else is touched.
    let receipts = receipt_keys(&cfg)?;
    // The metrics endpoint comes up first: during a long recovery it
    // answers /healthz, and /readyz with 503.
    let metrics_listener = match (metrics_listener, cfg.metrics_addr) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Transport(format!("cannot listen on the metrics address {addr}: {e}")))?,
        ),
        (None, None) => None,
    };
    let metrics = metrics_listener.as_ref().map(|_| Arc::new(Metrics::new()));
    let _metrics_task = match (metrics_listener, &metrics) {
        (Some(l), Some(m)) => {
            if let Ok(a) = l.local_addr() {
                info!("metrics on http://{a}/metrics (and /healthz, /readyz)");
            }
            Some(AbortOnDrop(tokio::spawn(crate::metrics::http::serve(l, m.clone()))))
        }
        _ => None,
    };
    // The shutdown signal may come at any time, the start included.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // A JWKS fetch may take up to its timeout; do not make a shutdown wait.
    // Biased: a configuration error found at once is reported, not
    // swallowed by a shutdown that is already pending.
    let auth = tokio::select! {
        biased;
        auth = load_auth(&cfg) => auth?,
        _ = stopped(&mut stop_rx) => {
            info!("shutdown requested while loading the authentication configuration; stopping");
            return Ok(());
        }
    };
    // Before storage is touched: a bad policy file changes nothing.
    let file_policies = cfg.policies_dir.as_deref().map(crate::policies_dir::load).transpose()?;
    if cfg.node_id.is_some() {
        let (auth, forwarder) = match cluster_key(&cfg)? {
            Some(key) => {
                let node = cfg.node_id.as_deref().unwrap_or_default();
                let forwarder = Forwarder::new(key.clone(), node, cluster_tls(&cfg)?);
                (auth.with_cluster_key(key), Some(Arc::new(forwarder)))
            }
            None => (auth, None),
        };
        let worker = start_node(&cfg, &kcfg, file_policies, forwarder, stop_rx.clone()).await?;
        return serve_on(cfg, listener, metrics, stop_rx, auth, receipts, kcfg, worker).await;
    }
    let started = Instant::now();
    info!("recovering storage: {}", storage_label(&cfg));
    let cancelled = Arc::new(AtomicBool::new(false));
    let recovery = {
        let (cfg, kcfg, cancelled) = (cfg.clone(), kcfg.clone(), cancelled.clone());
        tokio::task::spawn_blocking(move || {
            let storage = open_storage(&cfg).map_err(RecoveryError::Storage)?;
            let hub = Hub::default();
            Driver::recover(kcfg, storage, reopen(&cfg), hub, checkpoint_policy(&cfg), &|| {
                cancelled.load(Ordering::Relaxed)
            })
        })
    };
    tokio::pin!(recovery);
    let recovered = tokio::select! {
        r = &mut recovery => r,
        _ = stopped(&mut stop_rx) => {
            cancelled.store(true, Ordering::Relaxed);
            info!("shutdown requested during recovery; stopping it");
            // Recovery polls the flag while it replays the log and returns
            // promptly, releasing the data directory; nothing was written.
            // (Restoring a checkpoint does not poll: it runs to its end.)
            match (&mut recovery).await {
                Ok(Err(RecoveryError::Storage(StorageError::Cancelled))) => {
                    info!("recovery stopped after {:.2?}; nothing was changed", started.elapsed())
                }
                // It finished (or failed) before it saw the flag: what it
                // wrote, it synced; stop without serving either way.
                Ok(Ok(_)) => info!("recovery had just finished; stopping without serving"),
                Ok(Err(e)) => warn!("recovery failed while stopping: {e}"),
                Err(e) => warn!("the recovery task failed while stopping: {e}"),
            }
            return Ok(());
        }
    };
    let (driver, tx, report) = match recovered {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(StartError::Storage(e.to_string())),
        Err(e) => return Err(StartError::Storage(format!("the recovery task failed: {e}"))),
    };
    if let Some(m) = &metrics {
        m.recovered_in(started.elapsed());
    }
    let mut driver = driver.with_metrics(metrics.clone());
    if report.is_clean() {
        info!("recovered in {:.2?}: {report}", started.elapsed());
    } else {
        warn!("recovered in {:.2?} WITH DAMAGE: {report}", started.elapsed());
    }
    if let (Some(policies), Some(dir)) = (&file_policies, &cfg.policies_dir) {
        sync_policies(&mut driver, policies, &kcfg.runtime_id)?;
        info!("policy registry: read-only, {} from {}", Count::of(policies.len(), "policy file"), dir.display());
    }
    let open = format!("{} open", Count::of(driver.open_sessions(), "session"));
    let hub = driver.hub();
    let watch =
        Watch { lifecycle: hub.lifecycle.clone(), signals: hub.signals.clone(), registry: hub.registry.clone() };
    let driver_done = driver
        .spawn_on_own_thread()
        .map_err(|e| StartError::Storage(format!("cannot start the driver thread: {e}")))?;
    let task = tokio::spawn(async move { driver_done.await.map_err(|e| StartError::Storage(e.to_string())) });
    let worker = Worker { router: Router::Single(tx.clone()), watch, task, stop: Some(tx), open };
    serve_on(cfg, listener, metrics, stop_rx, auth, receipts, kcfg, worker).await
}

/// The per-connection request limit when it is below the stream limit
/// (and so can bind), else `None`.
fn request_limit_that_binds(cfg: &Config) -> Option<usize> {
    let limit = cfg.max_concurrent_requests();
    (limit < cfg.max_concurrent_streams as usize).then_some(limit)
}

/// How many worker threads the network runtime should have on a machine
/// with `cores` cores, for this configuration.
///
/// A single-node runtime's driver runs on a thread of its own
/// ([`Driver::spawn_on_own_thread`]) and keeps a core busy under load, so
/// the network gets one core fewer (at least one). With as many workers as
/// cores the workers and the driver thread overlapped: on 2 cores, one
/// worker instead of two served 13–18 % more memory-only Sends at 1 to 64
/// clients for 16–22 % less server CPU per Send, and Signals for 26 % less
/// (BENCHMARKS.md, "Seventh rerun"). A cluster node's shard drivers are tasks
/// on the workers, so a cluster node gets every core. `macp-runtime` uses
/// this unless `TOKIO_WORKER_THREADS` is set.
pub fn network_worker_threads(cfg: &Config, cores: usize) -> usize {
    if cfg.node_id.is_some() {
        cores.max(1)
    } else {
        cores.saturating_sub(1).max(1)
    }
}

/// What serves the requests behind the gRPC service: the driver of a
/// single-node runtime, or a cluster node's task with a driver per shard.
struct Worker {
    /// Which driver serves which session.
    router: Router,
    /// The watch channels.
    watch: Watch,
    /// Ends on its own only when storage failed beyond repair (single
    /// node); a cluster node's ends after the shutdown signal.
    task: tokio::task::JoinHandle<Result<(), StartError>>,
    /// The single driver, told to stop after the gRPC server has.
    stop: Option<tokio::sync::mpsc::Sender<crate::driver::Command>>,
    /// What it holds at start (open sessions, or shards), for the start-up line.
    open: String,
}

/// Joins the cluster and loads this node's first shards; the node task
/// then runs until the shutdown signal, when it drains its shards and
/// leaves.
async fn start_node(
    cfg: &Config,
    kcfg: &KernelConfig,
    policies: Option<Vec<crate::policies_dir::FilePolicy>>,
    forwarder: Option<Arc<Forwarder>>,
    stop: watch::Receiver<bool>,
) -> Result<Worker, StartError> {
    let url = cfg.database.clone().ok_or_else(|| StartError::Config("cluster mode needs a database URL".into()))?;
    let settings = NodeSettings {
        url,
        pg: PgConfig { retention: cfg.retention, ..PgConfig::default() },
        cluster: ClusterConfig {
            node_id: cfg.node_id.clone().unwrap_or_default(),
            advertise_addr: cfg.advertise_addr.clone().unwrap_or_default(),
            shards: cfg.shards,
            lease_ttl: Duration::from_millis(cfg.lease_ttl_ms),
        },
        kernel: kcfg.clone(),
        checkpoint: checkpoint_policy(cfg),
        policies,
        forwarder,
    };
    info!("joining the cluster as node {}: {}", cfg.node_id.as_deref().unwrap_or_default(), storage_label(cfg));
    let (node, table, watch) = Node::start(settings).await.map_err(|e| StartError::Storage(e.to_string()))?;
    let open = format!("{} of {} shards served here", table.served().len(), table.shards());
    let task = tokio::spawn(async move {
        node.run(stop).await;
        Ok(())
    });
    Ok(Worker { router: Router::Cluster(table), watch, task, stop: None, open })
}

/// The cluster's shared secret, from MACP_CLUSTER_SECRET or its file.
fn cluster_key(cfg: &Config) -> Result<Option<ClusterKey>, StartError> {
    let secret = match (&cfg.cluster_secret, &cfg.cluster_secret_file) {
        (Some(s), _) => s.as_bytes().to_vec(),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                StartError::Config(format!("cannot read MACP_CLUSTER_SECRET_FILE {}: {e}", path.display()))
            })?;
            let secret = text.trim_end().as_bytes().to_vec();
            if secret.len() < 16 {
                let msg = format!("MACP_CLUSTER_SECRET_FILE {}: the secret must be at least 16 bytes", path.display());
                return Err(StartError::Config(msg));
            }
            secret
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(ClusterKey::new(&secret)))
}

/// TLS for forwarding, when this node serves TLS: peers' certificates are
/// checked against MACP_CLUSTER_CA_FILE, or this node's own certificate.
fn cluster_tls(cfg: &Config) -> Result<Option<tonic::transport::ClientTlsConfig>, StartError> {
    let Some(own) = &cfg.tls_cert_path else { return Ok(None) };
    let path = cfg.cluster_ca_file.as_ref().unwrap_or(own);
    let pem = std::fs::read(path)
        .map_err(|e| StartError::Config(format!("cannot read the cluster CA file {}: {e}", path.display())))?;
    let ca = tonic::transport::Certificate::from_pem(pem);
    Ok(Some(tonic::transport::ClientTlsConfig::new().ca_certificate(ca)))
}

/// Serves the gRPC service over `worker` until the shutdown signal (or
/// until the worker fails), then stops the worker.
#[allow(clippy::too_many_arguments)]
async fn serve_on(
    cfg: Config,
    listener: TcpListener,
    metrics: Option<Arc<Metrics>>,
    mut stop_rx: watch::Receiver<bool>,
    auth: Authenticator,
    receipts: ReceiptKeys,
    kcfg: KernelConfig,
    worker: Worker,
) -> Result<(), StartError> {
    let addr: SocketAddr = listener.local_addr().map_err(|e| StartError::Transport(e.to_string()))?;
    info!(
        "macp-runtime listening on {addr}; TLS {}; auth: {}{}{}; storage: {}; history retention: {}; decision receipts: {}; {}",
        if cfg.tls() { "on" } else { "OFF (plaintext)" },
        Count::of(auth.token_count(), "static token"),
        auth.jwt().map(|j| format!(" + JWTs from {}", j.settings().issuer)).unwrap_or_default(),
        if auth.dev() { " + dev identities" } else { "" },
        storage_label(&cfg),
        cfg.retention,
        receipts_label(&receipts),
        worker.open,
    );
    let Worker { router, watch, task: mut driver_task, stop: driver_tx, .. } = worker;
    let limits = RateLimits::new(cfg.session_start_limit_per_minute, cfg.message_limit_per_minute);
    let runtime = Runtime::new(router, auth, limits, watch, kcfg)
        .with_max_reply_bytes(cfg.max_grpc_message_bytes)
        .with_read_only_policies(cfg.policies_dir.is_some())
        .with_receipt_keys(receipts)
        .with_metrics(metrics.clone());
    // Forget senders whose budgets refilled, so the limiter's memory stays
    // bounded by the senders active in the last few seconds. A budget
    // refills within seconds of a sender's last message (a cell is a
    // minute over the quota), and a fleet that uses fresh agent ids per
    // session would otherwise pile up a minute of senders between prunes
    // (a 36 MB sawtooth at 2,400 sessions/s in the soak).
    let limits = runtime.limits();
    let pruner = tokio::spawn(async move {
        let mut every = tokio::time::interval(LIMITER_PRUNE_EVERY);
        loop {
            every.tick().await;
            limits.prune();
        }
    });

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<MacpRuntimeServiceServer<Runtime>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(macp_wire::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Transport(e.to_string()))?;

    let limits = ConnectionLimits::from_config(&cfg);
    let mut builder = Server::builder()
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(limits.transport_header_list_size());
    // A request holds its HTTP/2 stream until its response ends, so a
    // per-connection request limit at or above the stream limit never
    // binds (the defaults: 1024 requests, 256 streams). tonic's limit costs
    // a semaphore permit and a wrapped future on every request: only a
    // limit below the stream limit is worth that.
    if let Some(limit) = request_limit_that_binds(&cfg) {
        builder = builder.concurrency_limit_per_connection(limit);
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_path, &cfg.tls_key_path) {
        let cert = std::fs::read(cert).map_err(|e| StartError::Config(format!("cannot read TLS certificate: {e}")))?;
        let key = std::fs::read(key).map_err(|e| StartError::Config(format!("cannot read TLS key: {e}")))?;
        let tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(cert, key)).timeout(limits.handshake_timeout);
        builder = builder.tls_config(tls).map_err(|e| StartError::Transport(format!("TLS setup: {e}")))?;
    }
    let service = MacpRuntimeServiceServer::new(runtime)
        .max_decoding_message_size(cfg.max_grpc_message_bytes)
        .max_encoding_message_size(cfg.max_grpc_message_bytes);
    // The builder's tcp_nodelay and tcp_keepalive do not apply to a
    // caller-supplied listener: set them here, or small replies wait ~40 ms
    // for Nagle's algorithm.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let incoming = limit_incoming(incoming, &limits, metrics.clone());
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        stopped(&mut stop_rx).await;
        let _ = fired_tx.send(());
    };
    let server = builder
        .layer(ConnLayer::new(&limits))
        .add_service(health)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(server);
    // Recovered, and the gRPC server runs from the first poll just below
    // (its listener has been accepting into the backlog since before the
    // start).
    if let Some(m) = &metrics {
        m.set_ready();
    }
    // Graceful shutdown waits for open connections; an idle client that
    // never closes would hold us forever, so give them a bounded grace.
    let grace = async {
        match fired_rx.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = &mut server => r.map_err(|e| StartError::Transport(e.to_string()))?,
        _ = grace => tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after the shutdown signal; closing them"),
        // The driver only ends on its own when storage failed beyond repair:
        // nothing more can be served, so stop and let the binary report it.
        r = &mut driver_task => {
            pruner.abort();
            return match r {
                Ok(r) => r,
                Err(e) => Err(StartError::Storage(format!("the driver task failed: {e}"))),
            };
        }
    }
    info!("stopped accepting; draining");
    pruner.abort();
    if let Some(tx) = driver_tx {
        let _ = tx.send(crate::driver::Command::Shutdown).await;
    }
    match driver_task.await {
        Ok(r) => r?,
        Err(e) => return Err(StartError::Storage(format!("the driver task failed: {e}"))),
    }
    info!("shutdown complete");
    Ok(())
}

/// Records the registry changes that make the recovered policy registry
/// equal the policies directory (see [`crate::policies_dir`]); nothing when
/// they already agree. A change the kernel refuses (for example a policy
/// whose mode is an extension with its own rule schema) stops the start
/// with the file it came from.
pub(crate) fn sync_policies(
    driver: &mut Driver,
    policies: &[crate::policies_dir::FilePolicy],
    operator: &str,
) -> Result<(), StartError> {
    let inputs = crate::policies_dir::plan(&driver.policies(), policies, &macp_kernel::Identity::new(operator));
    if inputs.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = inputs
        .iter()
        .map(|i| match i {
            macp_kernel::Input::RegisterPolicy { descriptor, .. } => descriptor.policy_id.clone(),
            macp_kernel::Input::UnregisterPolicy { policy_id, .. } => policy_id.clone(),
            _ => String::new(),
        })
        .collect();
    let replies = driver.apply_before_serving(inputs).map_err(|e| StartError::Storage(e.to_string()))?;
    for (id, reply) in ids.iter().zip(&replies) {
        if let Some(e) = reply.error() {
            let path = policies.iter().find(|p| p.descriptor.policy_id == *id).map(|p| p.path.clone());
            return Err(match path {
                Some(path) => {
                    StartError::Policies(crate::policies_dir::PolicyFileError { path, reason: e.to_string() })
                }
                None => {
                    StartError::Storage(format!("unregistering policy '{id}' (not in the policies directory): {e}"))
                }
            });
        }
    }
    info!("policy registry synced with the policies directory: {} change(s) recorded", replies.len());
    Ok(())
}

/// Aborts a background task when dropped (the metrics endpoint stops with
/// the server, whichever way `serve` returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the rate limiter forgets senders whose budgets are full again.
const LIMITER_PRUNE_EVERY: Duration = Duration::from_secs(5);

/// Interval of HTTP/2 PINGs to every client (also while idle).
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A client that does not answer a PING within this is disconnected.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keepalive probes, for peers that vanished without a FIN.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Resolves once the shutdown flag is set (or its sender is gone). The
/// borrowed value is released at once, so the future stays `Send`.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// How long in-flight connections get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Resolves on SIGINT or SIGTERM.
///
/// On Unix the handlers are installed when this is called, not when the
/// future is first polled: from then on either signal is seen, however
/// long it takes until something awaits the future (the JWKS fetch,
/// storage recovery), instead of killing the process with the default
/// action (exit 130/143, no clean shutdown). Call it first thing; it needs
/// a tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).ok();
        let mut term = signal(SignalKind::terminate()).ok();
        async move {
            tokio::select! { _ = recv(&mut int) => {}, _ = recv(&mut term) => {} }
        }
    };
    #[cfg(not(unix))]
    let signals = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    async move {
        signals.await;
        info!("shutdown signal received");
    }
}

/// The next delivery of `s`; never, if it could not be installed.
#[cfg(unix)]
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A single node leaves a core to its driver thread, never going below
    /// one worker; a cluster node, whose drivers are tasks, uses them all.
    #[test]
    fn the_network_leaves_a_core_to_the_single_node_driver() {
        let single = Config::parse_from(["macp-runtime", "--dev"]);
        let node = Config::parse_from(["macp-runtime", "--dev", "--node-id", "n1"]);
        let counts = |cfg: &Config| [1, 2, 8].map(|cores| network_worker_threads(cfg, cores));
        assert_eq!(counts(&single), [1, 1, 7]);
        assert_eq!(counts(&node), [1, 2, 8]);
    }

    /// The request limit is applied only where it can bind: below the
    /// stream limit. At or above it, every request already holds a stream.
    #[test]
    fn the_request_limit_applies_only_below_the_stream_limit() {
        let with = |args: &[&str]| {
            let mut all = vec!["macp-runtime", "--dev"];
            all.extend_from_slice(args);
            request_limit_that_binds(&Config::parse_from(all))
        };
        assert_eq!(with(&[]), None, "defaults: 1024 requests, 256 streams");
        assert_eq!(with(&["--max-concurrent-requests", "256"]), None);
        assert_eq!(with(&["--max-concurrent-requests", "255"]), Some(255));
        assert_eq!(with(&["--max-concurrent-streams", "2048"]), Some(1024));
    }
}
