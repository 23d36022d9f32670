//! Server configuration: the seed runtime's environment variables (same names,
//! same defaults, so existing deployments keep working) with command-line
//! flags that override them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::Parser;

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

    /// Records between checkpoints (0 disables automatic checkpoints).
    #[arg(long, env = "MACP_CHECKPOINT_EVERY", default_value_t = 100_000)]
    pub checkpoint_every: u64,
}

impl Config {
    /// Applies `--dev` (plaintext + dev identities) and checks combinations
    /// that would otherwise fail confusingly later.
    pub fn resolve(mut self) -> Result<Self, String> {
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
