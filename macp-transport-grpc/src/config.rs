//! Server configuration: the seed runtime's environment variables (same names,
//! same defaults, so existing deployments keep working) with command-line
//! flags that override them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::Parser;
use macp_storage::Retention;

/// `macp-runtime` configuration.
#[derive(Clone, Debug, Parser)]
#[command(name = "macp-runtime", version, about = "MACP coordination runtime (gRPC)")]
pub struct Config {
    /// Development mode: plaintext and dev identities (`x-macp-agent-id`, or
    /// `Authorization: Bearer <agent-id>`). Never use in production.
    #[arg(long)]
    pub dev: bool,

    /// Address to listen on.
    #[arg(long, env = "MACP_BIND_ADDR", default_value = "127.0.0.1:50051")]
    pub bind_addr: SocketAddr,

    /// Data directory for the write-ahead log and checkpoints.
    #[arg(long, env = "MACP_DATA_DIR", default_value = ".macp-data")]
    pub data_dir: PathBuf,

    /// Keep everything in memory (nothing survives a restart).
    #[arg(long, env = "MACP_MEMORY_ONLY", value_parser = BoolishValueParser::new(), default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub memory_only: bool,

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

    /// Static tokens, path to a JSON file (same format).
    #[arg(long, env = "MACP_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

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

    /// Concurrent in-flight requests per connection.
    #[arg(long, env = "MACP_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,

    /// Records between checkpoints (0: no record bound). A checkpoint holds
    /// open sessions only, so restart replays at most this many records.
    #[arg(long, env = "MACP_CHECKPOINT_EVERY", default_value_t = 100_000)]
    pub checkpoint_every: u64,

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

    /// The retention in effect (resolved from the two retention settings).
    #[arg(skip)]
    pub retention: Retention,
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
        let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size: use bytes, or a number with KiB, MiB or GiB"))?;
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

impl Config {
    /// Applies `--dev` (plaintext + dev identities) and checks combinations
    /// that would otherwise fail confusingly later.
    pub fn resolve(mut self) -> Result<Self, String> {
        self.retention = match (self.history_retention, self.session_disk_retention_secs) {
            (Some(r), Some(secs)) if r != Retention::from_secs(secs) => {
                return Err(format!(
                    "MACP_HISTORY_RETENTION ({r}) and MACP_SESSION_DISK_RETENTION_SECS ({secs}) disagree; set one of them"
                ))
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
            (Some(_), None) | (None, Some(_)) => {
                return Err("MACP_TLS_CERT_PATH and MACP_TLS_KEY_PATH must be set together".into())
            }
            (None, None) if !self.allow_insecure => {
                return Err("no TLS configured: set MACP_TLS_CERT_PATH and MACP_TLS_KEY_PATH, or allow plaintext with MACP_ALLOW_INSECURE=1 (or --dev for local development)".into())
            }
            _ => {}
        }
        if self.auth_tokens_json.is_none() && self.auth_tokens_file.is_none() && !self.allow_dev_sender_header {
            return Err("no authentication configured: set MACP_AUTH_TOKENS_JSON or MACP_AUTH_TOKENS_FILE, or allow dev identities with MACP_ALLOW_DEV_SENDER_HEADER=1 (or --dev)".into());
        }
        Ok(self)
    }

    /// Whether TLS is configured.
    pub fn tls(&self) -> bool {
        self.tls_cert_path.is_some()
    }
}
