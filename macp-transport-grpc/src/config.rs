//! Server configuration: the seed runtime's environment variables (same names,
//! same defaults, so existing deployments keep working) with command-line
//! flags that override them. Where the reference runtime names a setting
//! differently, its name is accepted as an alias (today only
//! `MACP_CONCURRENCY_LIMIT_PER_CONNECTION`; resolved in [`Config::resolve`],
//! since clap reads one variable per flag).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::Parser;
use macp_storage::Retention;
use macp_storage_pg::PgUrl;

/// `macp-runtime` configuration.
#[derive(Clone, Debug, Parser)]
#[command(name = "macp-runtime", version, about = "MACP coordination runtime (gRPC)")]
pub struct Config {
    /// Development mode: plaintext, dev identities (`x-macp-agent-id`, or
    /// `Authorization: Bearer <agent-id>`) and, unless a receipt keys file is
    /// given, an ephemeral receipt signing key. Never use in production.
    #[arg(long)]
    pub dev: bool,

    /// Address to listen on.
    #[arg(long, env = "MACP_BIND_ADDR", default_value = "127.0.0.1:50051")]
    pub bind_addr: SocketAddr,

    /// Address of the Prometheus metrics endpoint (HTTP: `/metrics`,
    /// `/healthz`, `/readyz`); off when unset.
    #[arg(long, env = "MACP_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Data directory for the write-ahead log and checkpoints.
    #[arg(long, env = "MACP_DATA_DIR", default_value = ".macp-data")]
    pub data_dir: PathBuf,

    /// Keep everything in memory (nothing survives a restart); the same as
    /// `--storage memory`.
    #[arg(long, env = "MACP_MEMORY_ONLY", value_parser = BoolishValueParser::new(), default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub memory_only: bool,

    /// Where the log, checkpoints and ended sessions are kept: `file` (the
    /// data directory), `memory` (nothing survives a restart) or `postgres`
    /// (the database of --database-url) [default: file, or memory with
    /// --memory-only].
    #[arg(long, env = "MACP_STORAGE", value_enum)]
    pub storage: Option<StorageKind>,

    /// The PostgreSQL database of `--storage postgres`:
    /// `postgres://user:password@host:port/database` (or libpq's
    /// `host=... dbname=...`). Its tables go in schema `macp`, created if
    /// missing. Never logged with its password.
    #[arg(long, env = "MACP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,

    /// Allow plaintext (no TLS).
    #[arg(long, env = "MACP_ALLOW_INSECURE", value_parser = BoolishValueParser::new(), default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub allow_insecure: bool,

    /// Allow dev identities (`x-macp-agent-id`, or a bearer that is not a configured token).
    #[arg(long, env = "MACP_ALLOW_DEV_SENDER_HEADER", value_parser = BoolishValueParser::new(), default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub allow_dev_sender_header: bool,

    /// PEM certificate chain for TLS.
    #[arg(long, env = "MACP_TLS_CERT_PATH")]
    pub tls_cert_path: Option<PathBuf>,

    /// PEM private key for TLS.
    #[arg(long, env = "MACP_TLS_KEY_PATH")]
    pub tls_key_path: Option<PathBuf>,

    /// Static tokens, inline JSON (a list, or an object with `tokens`).
    #[arg(long, env = "MACP_AUTH_TOKENS_JSON")]
    pub auth_tokens_json: Option<String>,

    /// Static tokens, path to a JSON file (same format; an entry may give
    /// `token_sha256`, the hex SHA-256 of the token, instead of `token`).
    #[arg(long, env = "MACP_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Accept JWT bearer tokens issued by this issuer (the `iss` claim);
    /// needs MACP_AUTH_JWKS_JSON or MACP_AUTH_JWKS_URL.
    #[arg(long, env = "MACP_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,

    /// The audience JWTs must be issued for (the `aud` claim).
    #[arg(long, env = "MACP_AUTH_AUDIENCE", default_value = "macp-runtime")]
    pub auth_audience: String,

    /// JWT verification keys, an inline JSON Web Key Set.
    #[arg(long, env = "MACP_AUTH_JWKS_JSON")]
    pub auth_jwks_json: Option<String>,

    /// JWT verification keys, fetched from this https:// URL and cached.
    #[arg(long, env = "MACP_AUTH_JWKS_URL")]
    pub auth_jwks_url: Option<String>,

    /// Seconds a fetched JWKS is used before it is fetched again (a token
    /// with an unknown `kid` also triggers a rate-limited refresh).
    #[arg(long, env = "MACP_AUTH_JWKS_TTL_SECS", default_value_t = 300)]
    pub auth_jwks_ttl_secs: u64,

    /// PEM file of the CA certificates that may sign the JWKS endpoint's
    /// certificate (replaces the system's trust store for that fetch).
    #[arg(long, env = "MACP_AUTH_JWKS_CA_FILE")]
    pub auth_jwks_ca_file: Option<PathBuf>,

    /// Accepted JWT algorithms, comma-separated (HS256/384/512 only when
    /// listed; `none` never).
    #[arg(long, env = "MACP_AUTH_JWT_ALGS", value_delimiter = ',', default_value = "RS256,ES256,EdDSA", value_parser = parse_jwt_alg)]
    pub auth_jwt_algs: Vec<jsonwebtoken::Algorithm>,

    /// Clock skew tolerated on JWT `exp` and `nbf`, in seconds.
    #[arg(long, env = "MACP_AUTH_LEEWAY_SECS", default_value_t = 30)]
    pub auth_leeway_secs: u64,

    /// Decision receipt signing keys: a JWK Set of Ed25519 keys (the first,
    /// with its private `d`, signs; all are published by GetReceiptKeys, so
    /// an old key can stay behind a new one) or a PEM file of PKCS#8 Ed25519
    /// private keys as `openssl genpkey -algorithm ed25519` writes them.
    /// Without it receipts are served unsigned (integrity only), except
    /// under --dev, which signs with a key that lives as long as the process.
    #[arg(long, env = "MACP_RECEIPT_KEYS_FILE")]
    pub receipt_keys_file: Option<PathBuf>,

    /// Largest envelope payload in bytes.
    #[arg(long, env = "MACP_MAX_PAYLOAD_BYTES", default_value_t = 1_048_576)]
    pub max_payload_bytes: usize,

    /// SessionStarts per sender per minute.
    #[arg(long, env = "MACP_SESSION_START_LIMIT_PER_MINUTE", default_value_t = 60)]
    pub session_start_limit_per_minute: u32,

    /// Other messages per sender per minute.
    #[arg(long, env = "MACP_MESSAGE_LIMIT_PER_MINUTE", default_value_t = 600)]
    pub message_limit_per_minute: u32,

    /// Session id format: `strict` (UUID v4/v7 or ≥22 base64url chars) or
    /// `lax` (any printable id up to 128 chars, for the seed's clients).
    #[arg(long, env = "MACP_SESSION_ID_POLICY", default_value = "strict", value_parser = ["strict", "lax"])]
    pub session_id_policy: String,

    /// Largest gRPC message, in bytes (decoding and encoding).
    #[arg(long, env = "MACP_MAX_GRPC_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_grpc_message_bytes: usize,

    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, env = "MACP_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Concurrent in-flight requests per connection [default: 1024; also
    /// read from the reference runtime's MACP_CONCURRENCY_LIMIT_PER_CONNECTION].
    #[arg(long, env = "MACP_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,

    /// The reference runtime's name for `--max-concurrent-requests`, read
    /// when neither that flag nor MACP_MAX_CONCURRENT_REQUESTS is set.
    #[arg(long, env = "MACP_CONCURRENCY_LIMIT_PER_CONNECTION", hide = true)]
    pub concurrency_limit_per_connection: Option<usize>,

    /// Most open client connections; more are closed as soon as they are
    /// accepted. Keep it below the open-file limit (`ulimit -n`).
    #[arg(long, env = "MACP_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Seconds a new connection has to complete TLS and HTTP/2 and start
    /// its first request before it is closed.
    #[arg(long, env = "MACP_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,

    /// Seconds a connection may stay without any open request or stream
    /// before it is closed (0: never).
    #[arg(long, env = "MACP_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub idle_timeout_secs: u64,

    /// Largest request metadata (HTTP/2 header list, in HPACK-decoded bytes)
    /// of one call; a larger call alone is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MACP_MAX_METADATA_BYTES", default_value_t = 16 * 1024)]
    pub max_metadata_bytes: usize,

    /// Records between checkpoints (0: no record bound) [default: 100000;
    /// also read from the reference runtime's MACP_CHECKPOINT_INTERVAL]. A
    /// checkpoint holds open sessions only, so restart replays at most this
    /// many records.
    #[arg(long, env = "MACP_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<u64>,

    /// The reference runtime's name for `--checkpoint-every` (log entries
    /// between checkpoints, 0 = none), read when neither that flag nor
    /// MACP_CHECKPOINT_EVERY is set.
    #[arg(long, env = "MACP_CHECKPOINT_INTERVAL", hide = true)]
    pub checkpoint_interval: Option<u64>,

    /// Most seconds between checkpoints while records arrive (0: no time
    /// bound). Retention deletes an ended session only after a checkpoint
    /// that follows its end, so this also bounds how late deletion can be.
    #[arg(long, env = "MACP_CHECKPOINT_INTERVAL_SECS", default_value_t = 30)]
    pub checkpoint_interval_secs: u64,

    /// How long an ended session's history stays readable: `forever`, or a
    /// duration such as `7d`, `12h`, `10m`, `30s`. The accepted history is
    /// an audit trail, so deleting it must be a choice.
    #[arg(long, env = "MACP_HISTORY_RETENTION")]
    pub history_retention: Option<Retention>,

    /// The reference runtime's name for the same setting, in seconds (0 =
    /// forever); accepted so its configurations keep working.
    #[arg(long, env = "MACP_SESSION_DISK_RETENTION_SECS", hide = true)]
    pub session_disk_retention_secs: Option<u64>,

    /// Memory-only mode: most bytes the ended sessions' history may hold
    /// (`256MiB`, `1GiB`, or bytes). Past it the oldest ended sessions are
    /// dropped early, which is logged.
    #[arg(long, env = "MACP_MEMORY_HISTORY_LIMIT", default_value = "256MiB")]
    pub memory_history_limit: ByteSize,

    /// Directory of governance policies, one `*.json` PolicyDescriptor per
    /// file, loaded at start; the policy registry is then read-only
    /// (RegisterPolicy and UnregisterPolicy are refused), so policies are
    /// changed by changing the files and restarting.
    #[arg(long, env = "MACP_POLICIES_DIR")]
    pub policies_dir: Option<PathBuf>,

    /// Run as a node of a cluster with this id (unique in the cluster;
    /// needs `--storage postgres` and `--advertise-addr`): the node serves
    /// the shards it holds a lease on (docs/cluster.md).
    #[arg(long, env = "MACP_NODE_ID")]
    pub node_id: Option<String>,

    /// The address (host:port) other nodes and clients reach this cluster
    /// node at.
    #[arg(long, env = "MACP_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// Shards of the cluster: fixed when its first node creates it, and
    /// every node must be started with the same count.
    #[arg(long, env = "MACP_SHARDS", default_value_t = 64)]
    pub shards: u32,

    /// How long a cluster node's lease on a shard lasts without renewal
    /// (milliseconds): how long a dead node's sessions wait for another
    /// node to serve them. Renewed every quarter of it.
    #[arg(long, env = "MACP_LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,

    /// The cluster's shared secret (at least 16 bytes, the same on every
    /// node): a node forwards requests for sessions it does not serve to
    /// the node that does, vouching for the caller with it. Without one, a
    /// node answers such requests UNAVAILABLE, naming the node to ask.
    #[arg(long, env = "MACP_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,

    /// A file holding the cluster's shared secret (instead of
    /// MACP_CLUSTER_SECRET; trailing whitespace is ignored).
    #[arg(long, env = "MACP_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// The CA certificate (PEM) a node checks its peers' TLS certificates
    /// against when it forwards [default: its own MACP_TLS_CERT_PATH].
    #[arg(long, env = "MACP_CLUSTER_CA_FILE")]
    pub cluster_ca_file: Option<PathBuf>,

    /// The retention in effect (resolved from the two retention settings).
    #[arg(skip)]
    pub retention: Retention,

    /// The database of `--storage postgres`, parsed (resolved from
    /// `database_url`).
    #[arg(skip)]
    pub database: Option<PgUrl>,
}

/// The storage backends the server can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageKind {
    /// The data directory: a group-committed write-ahead log and an index
    /// of ended sessions (`macp-storage-fs`).
    File,
    /// Memory only: nothing survives a restart.
    Memory,
    /// A PostgreSQL database (`macp-storage-pg`).
    Postgres,
}

impl std::fmt::Display for StorageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageKind::File => "file",
            StorageKind::Memory => "memory",
            StorageKind::Postgres => "postgres",
        })
    }
}

/// `MACP_DATABASE_URL` as given. Parsed in [`Config::resolve`] rather than
/// by the argument parser, whose error would repeat the value, password
/// and all; its `Debug` form shows no password either, so a logged
/// configuration never holds one.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(s.to_string()))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match PgUrl::parse(&self.0) {
            Ok(u) => write!(f, "DatabaseUrl({u})"),
            Err(_) => f.write_str("DatabaseUrl(<unparsable, not shown>)"),
        }
    }
}

/// A size in bytes, written as a number with an optional binary unit
/// (`KiB`, `MiB`, `GiB`; `K`, `M`, `G` mean the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 =
            num.parse().map_err(|_| format!("'{s}' is not a size: use bytes, or a number with KiB, MiB or GiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" | "k" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            other => return Err(format!("'{other}' is not a size unit: use KiB, MiB or GiB")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("'{s}' is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b % (1 << 30) == 0 {
            write!(f, "{}GiB", b >> 30)
        } else if b >= 1 << 20 && b % (1 << 20) == 0 {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b % (1 << 10) == 0 {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

/// A configuration the server refuses to start with, found before anything
/// is opened. Each variant names the setting to change; the binary prints it
/// and exits 2. Typed so that callers (tests, the fuzz oracle) can tell a
/// refusal that `--dev` must never produce from one it legitimately can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Both retention settings are set, to different values.
    #[error(
        "MACP_HISTORY_RETENTION ({retention}) and MACP_SESSION_DISK_RETENTION_SECS ({secs}) disagree; set one of them"
    )]
    RetentionDisagrees {
        /// The value of `MACP_HISTORY_RETENTION`.
        retention: Retention,
        /// The value of `MACP_SESSION_DISK_RETENTION_SECS`.
        secs: u64,
    },
    /// Only one of the TLS certificate and key is set.
    #[error("MACP_TLS_CERT_PATH and MACP_TLS_KEY_PATH must be set together")]
    HalfTls,
    /// Neither TLS nor plaintext is configured.
    #[error("no TLS configured: set MACP_TLS_CERT_PATH and MACP_TLS_KEY_PATH, or allow plaintext with MACP_ALLOW_INSECURE=1 (or --dev for local development)")]
    NoTls,
    /// Inline and fetched JWKS are both set.
    #[error("set one of MACP_AUTH_JWKS_JSON and MACP_AUTH_JWKS_URL, not both")]
    TwoJwksSources,
    /// A JWT issuer without keys to verify its tokens.
    #[error("MACP_AUTH_ISSUER needs JWT keys: set MACP_AUTH_JWKS_JSON or MACP_AUTH_JWKS_URL")]
    IssuerWithoutKeys,
    /// JWT keys without the issuer tokens must name.
    #[error("MACP_AUTH_JWKS_JSON/MACP_AUTH_JWKS_URL need MACP_AUTH_ISSUER (the issuer JWTs must name)")]
    KeysWithoutIssuer,
    /// An empty issuer or audience would match tokens that name none.
    #[error("MACP_AUTH_ISSUER and MACP_AUTH_AUDIENCE must not be empty")]
    EmptyIssuerOrAudience,
    /// No way for any request to authenticate.
    #[error("no authentication configured: set MACP_AUTH_TOKENS_JSON or MACP_AUTH_TOKENS_FILE, or MACP_AUTH_ISSUER with JWT keys, or allow dev identities with MACP_ALLOW_DEV_SENDER_HEADER=1 (or --dev)")]
    NoAuthentication,
    /// A connection cap of zero would refuse every client.
    #[error("MACP_MAX_CONNECTIONS must be at least 1")]
    ZeroMaxConnections,
    /// A handshake timeout of zero would drop every connection.
    #[error("MACP_HANDSHAKE_TIMEOUT_SECS must be at least 1")]
    ZeroHandshakeTimeout,
    /// Memory-only mode together with another storage backend.
    #[error("MACP_MEMORY_ONLY asks for memory storage but MACP_STORAGE is {0}; set one of them")]
    StorageConflict(StorageKind),
    /// PostgreSQL storage without a database to use.
    #[error("MACP_STORAGE=postgres needs MACP_DATABASE_URL (postgres://user:password@host:port/database)")]
    PostgresWithoutUrl,
    /// A database URL no storage backend uses: the operator may believe
    /// the data goes to PostgreSQL while it goes elsewhere.
    #[error("MACP_DATABASE_URL is set but the storage is {0}; set MACP_STORAGE=postgres to use the database, or unset MACP_DATABASE_URL")]
    UrlWithoutPostgres(StorageKind),
    /// Cluster settings that do not fit together (which, and how to fix it).
    #[error("cluster mode: {0}")]
    Cluster(&'static str),
    /// The database URL does not parse (the reason never repeats the URL,
    /// which may hold a password).
    #[error("MACP_DATABASE_URL: {reason}")]
    BadDatabaseUrl {
        /// Why it was refused.
        reason: String,
    },
}

impl Config {
    /// Applies `--dev` (plaintext + dev identities) and checks combinations
    /// that would otherwise fail confusingly later.
    pub fn resolve(mut self) -> Result<Self, ConfigError> {
        self.retention = match (self.history_retention, self.session_disk_retention_secs) {
            (Some(r), Some(secs)) if r != Retention::from_secs(secs) => {
                return Err(ConfigError::RetentionDisagrees { retention: r, secs })
            }
            (Some(r), _) => r,
            (None, Some(secs)) => Retention::from_secs(secs),
            (None, None) => Retention::Forever,
        };
        if self.dev {
            self.allow_insecure = true;
            self.allow_dev_sender_header = true;
        }
        match (&self.tls_cert_path, &self.tls_key_path) {
            (Some(_), None) | (None, Some(_)) => return Err(ConfigError::HalfTls),
            (None, None) if !self.allow_insecure => return Err(ConfigError::NoTls),
            _ => {}
        }
        match (&self.auth_issuer, &self.auth_jwks_json, &self.auth_jwks_url) {
            (Some(_), Some(_), Some(_)) => return Err(ConfigError::TwoJwksSources),
            (Some(_), None, None) => return Err(ConfigError::IssuerWithoutKeys),
            (None, Some(_), _) | (None, _, Some(_)) => return Err(ConfigError::KeysWithoutIssuer),
            _ => {}
        }
        if self.auth_issuer.as_deref().is_some_and(str::is_empty) || self.auth_audience.is_empty() {
            return Err(ConfigError::EmptyIssuerOrAudience);
        }
        if self.auth_tokens_json.is_none()
            && self.auth_tokens_file.is_none()
            && self.auth_issuer.is_none()
            && !self.allow_dev_sender_header
        {
            return Err(ConfigError::NoAuthentication);
        }
        if self.max_connections == 0 {
            return Err(ConfigError::ZeroMaxConnections);
        }
        if self.handshake_timeout_secs == 0 {
            return Err(ConfigError::ZeroHandshakeTimeout);
        }
        let storage = match (self.storage, self.memory_only) {
            (Some(kind), true) if kind != StorageKind::Memory => return Err(ConfigError::StorageConflict(kind)),
            (Some(kind), _) => kind,
            (None, true) => StorageKind::Memory,
            (None, false) => StorageKind::File,
        };
        self.database = match (&self.database_url, storage) {
            (Some(url), StorageKind::Postgres) => {
                Some(PgUrl::parse(&url.0).map_err(|e| ConfigError::BadDatabaseUrl { reason: e.to_string() })?)
            }
            (None, StorageKind::Postgres) => return Err(ConfigError::PostgresWithoutUrl),
            (Some(_), other) => return Err(ConfigError::UrlWithoutPostgres(other)),
            (None, _) => None,
        };
        match (&self.node_id, &self.advertise_addr) {
            (Some(_), _) if storage != StorageKind::Postgres => {
                return Err(ConfigError::Cluster("MACP_NODE_ID needs MACP_STORAGE=postgres (the cluster's database)"))
            }
            (Some(_), None) => {
                return Err(ConfigError::Cluster(
                    "MACP_NODE_ID needs MACP_ADVERTISE_ADDR (where peers reach this node)",
                ))
            }
            (None, Some(_)) => return Err(ConfigError::Cluster("MACP_ADVERTISE_ADDR is set without MACP_NODE_ID")),
            _ => {}
        }
        if self.node_id.as_deref().is_some_and(|n| n.is_empty() || n.len() > 128) {
            return Err(ConfigError::Cluster("MACP_NODE_ID must be 1 to 128 bytes"));
        }
        let secret = self.cluster_secret.is_some() || self.cluster_secret_file.is_some();
        if (secret || self.cluster_ca_file.is_some()) && self.node_id.is_none() {
            return Err(ConfigError::Cluster("a cluster secret or CA file is set without MACP_NODE_ID"));
        }
        if self.cluster_secret.is_some() && self.cluster_secret_file.is_some() {
            return Err(ConfigError::Cluster("set MACP_CLUSTER_SECRET or MACP_CLUSTER_SECRET_FILE, not both"));
        }
        if self.cluster_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::Cluster("MACP_CLUSTER_SECRET must be at least 16 bytes"));
        }
        if self.shards == 0 || self.shards > macp_storage_pg::MAX_SHARDS {
            return Err(ConfigError::Cluster("MACP_SHARDS must be 1 to 65536"));
        }
        if (self.lease_ttl_ms as u128) < macp_storage_pg::MIN_LEASE_TTL.as_millis() {
            return Err(ConfigError::Cluster("MACP_LEASE_TTL_MS must be at least 200"));
        }
        self.storage = Some(storage);
        self.memory_only = storage == StorageKind::Memory;
        self.max_concurrent_requests =
            Some(self.max_concurrent_requests.or(self.concurrency_limit_per_connection).unwrap_or(1024));
        Ok(self)
    }

    /// Concurrent in-flight requests per connection: the flag, then
    /// MACP_MAX_CONCURRENT_REQUESTS, then MACP_CONCURRENCY_LIMIT_PER_CONNECTION,
    /// then 1024.
    pub fn max_concurrent_requests(&self) -> usize {
        self.max_concurrent_requests.or(self.concurrency_limit_per_connection).unwrap_or(1024)
    }

    /// Records between checkpoints: the flag, then MACP_CHECKPOINT_EVERY,
    /// then MACP_CHECKPOINT_INTERVAL, then 100,000.
    pub fn checkpoint_every(&self) -> u64 {
        self.checkpoint_every.or(self.checkpoint_interval).unwrap_or(100_000)
    }

    /// The storage backend: `--storage`, else memory under
    /// `--memory-only`, else files.
    pub fn storage(&self) -> StorageKind {
        match (self.storage, self.memory_only) {
            (Some(kind), _) => kind,
            (None, true) => StorageKind::Memory,
            (None, false) => StorageKind::File,
        }
    }

    /// Whether JWT bearer tokens are accepted.
    pub fn jwt(&self) -> bool {
        self.auth_issuer.is_some()
    }

    /// Whether TLS is configured.
    pub fn tls(&self) -> bool {
        self.tls_cert_path.is_some()
    }
}

fn parse_jwt_alg(name: &str) -> Result<jsonwebtoken::Algorithm, crate::auth::jwt::AlgorithmError> {
    crate::auth::jwt::parse_algorithm(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference runtime's names (`MACP_CONCURRENCY_LIMIT_PER_CONNECTION`,
    /// `MACP_CHECKPOINT_INTERVAL`) are read when neither our flag nor our
    /// variable is set. (The only test of this binary touching these
    /// variables.)
    #[test]
    fn reference_alias_for_the_per_connection_limit() {
        let base = ["macp-runtime", "--dev"];
        std::env::remove_var("MACP_MAX_CONCURRENT_REQUESTS");
        std::env::set_var("MACP_CONCURRENCY_LIMIT_PER_CONNECTION", "7");
        assert_eq!(Config::parse_from(base).resolve().unwrap().max_concurrent_requests(), 7);
        let flag = Config::parse_from(["macp-runtime", "--dev", "--max-concurrent-requests", "9"]);
        assert_eq!(flag.resolve().unwrap().max_concurrent_requests(), 9, "the flag wins");
        std::env::set_var("MACP_MAX_CONCURRENT_REQUESTS", "8");
        assert_eq!(Config::parse_from(base).resolve().unwrap().max_concurrent_requests(), 8, "our name wins");
        std::env::remove_var("MACP_MAX_CONCURRENT_REQUESTS");
        std::env::remove_var("MACP_CONCURRENCY_LIMIT_PER_CONNECTION");
        assert_eq!(Config::parse_from(base).resolve().unwrap().max_concurrent_requests(), 1024, "the default");

        // The reference runtime's MACP_CHECKPOINT_INTERVAL is our
        // MACP_CHECKPOINT_EVERY (log entries between checkpoints).
        std::env::remove_var("MACP_CHECKPOINT_EVERY");
        std::env::set_var("MACP_CHECKPOINT_INTERVAL", "500");
        assert_eq!(Config::parse_from(base).checkpoint_every(), 500);
        std::env::set_var("MACP_CHECKPOINT_EVERY", "600");
        assert_eq!(Config::parse_from(base).checkpoint_every(), 600, "our name wins");
        let flag = Config::parse_from(["macp-runtime", "--dev", "--checkpoint-every", "0"]);
        assert_eq!(flag.checkpoint_every(), 0, "the flag wins");
        std::env::remove_var("MACP_CHECKPOINT_EVERY");
        std::env::remove_var("MACP_CHECKPOINT_INTERVAL");
        assert_eq!(Config::parse_from(base).checkpoint_every(), 100_000, "the default");
    }

    /// `--storage` picks the backend; `--memory-only` still means memory;
    /// combinations that contradict each other, or leave PostgreSQL without
    /// a database, are refused, and a refused URL is never repeated.
    #[test]
    fn storage_selection_is_checked() {
        let with = |extra: &[&str]| {
            let mut args = vec!["macp-runtime", "--dev"];
            args.extend_from_slice(extra);
            Config::parse_from(args).resolve()
        };
        let url = "postgres://macp:s3cret@db.internal:5433/macp";
        let c = with(&[]).unwrap();
        assert_eq!((c.storage(), c.memory_only, c.database.is_none()), (StorageKind::File, false, true), "the default");
        let c = with(&["--memory-only"]).unwrap();
        assert_eq!((c.storage(), c.memory_only), (StorageKind::Memory, true));
        let c = with(&["--storage", "memory"]).unwrap();
        assert_eq!((c.storage(), c.memory_only), (StorageKind::Memory, true), "--storage memory is --memory-only");
        assert_eq!(with(&["--storage", "memory", "--memory-only"]).unwrap().storage(), StorageKind::Memory);
        let c = with(&["--storage", "postgres", "--database-url", url]).unwrap();
        assert_eq!((c.storage(), c.memory_only), (StorageKind::Postgres, false));
        assert_eq!(
            c.database.as_ref().map(|u| u.to_string()).as_deref(),
            Some("postgres://macp@db.internal:5433/macp")
        );
        assert!(!format!("{c:?}").contains("s3cret"), "the configuration's Debug form shows no password");
        assert_eq!(with(&["--storage", "postgres"]).unwrap_err(), ConfigError::PostgresWithoutUrl);
        assert_eq!(
            with(&["--memory-only", "--storage", "postgres", "--database-url", url]).unwrap_err(),
            ConfigError::StorageConflict(StorageKind::Postgres)
        );
        assert_eq!(
            with(&["--memory-only", "--storage", "file"]).unwrap_err(),
            ConfigError::StorageConflict(StorageKind::File)
        );
        assert_eq!(with(&["--database-url", url]).unwrap_err(), ConfigError::UrlWithoutPostgres(StorageKind::File));
        assert_eq!(
            with(&["--storage", "memory", "--database-url", url]).unwrap_err(),
            ConfigError::UrlWithoutPostgres(StorageKind::Memory)
        );
        let bad = with(&["--storage", "postgres", "--database-url", "postgres://macp:s3cret@h:port/db"]).unwrap_err();
        assert!(matches!(bad, ConfigError::BadDatabaseUrl { .. }), "{bad:?}");
        assert!(!bad.to_string().contains("s3cret"), "{bad}");
        assert!(Config::try_parse_from(["macp-runtime", "--storage", "redis"]).is_err(), "only the three backends");
    }

    #[test]
    fn jwt_configuration_is_checked() {
        let jwt = |extra: &[&str]| {
            let mut args = vec!["macp-runtime", "--allow-insecure"];
            args.extend_from_slice(extra);
            Config::parse_from(args).resolve()
        };
        assert!(jwt(&["--auth-issuer", "https://i", "--auth-jwks-json", "{}"]).is_ok(), "JWT alone is authentication");
        assert_eq!(jwt(&["--auth-issuer", "https://i"]).unwrap_err(), ConfigError::IssuerWithoutKeys);
        assert_eq!(jwt(&["--auth-jwks-url", "https://k"]).unwrap_err(), ConfigError::KeysWithoutIssuer);
        let both = jwt(&["--auth-issuer", "https://i", "--auth-jwks-json", "{}", "--auth-jwks-url", "https://k"]);
        assert_eq!(both.unwrap_err(), ConfigError::TwoJwksSources);
        let c = jwt(&["--auth-issuer", "https://i", "--auth-jwks-json", "{}"]).unwrap();
        assert_eq!(c.auth_jwt_algs, crate::auth::jwt::DEFAULT_ALGORITHMS);
        assert_eq!((c.auth_audience.as_str(), c.auth_jwks_ttl_secs, c.auth_leeway_secs), ("macp-runtime", 300, 30));
    }
}
