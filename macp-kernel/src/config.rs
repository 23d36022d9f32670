//! Kernel configuration: the deployment choices that change what the kernel
//! accepts. Passed in once at construction, so the kernel itself never reads
//! environment variables or files.

/// How session ids are checked at SessionStart (DECISIONS 10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SessionIdPolicy {
    /// Lowercase hyphenated UUID v4/v7, or a base64url token of ≥ 22 chars.
    #[default]
    Strict,
    /// Any non-empty id of ≤ 128 printable ASCII chars (the seed's clients).
    Lax,
}

/// Kernel configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Session id format policy.
    pub session_id_policy: SessionIdPolicy,
    /// Largest accepted envelope payload, in bytes (`MACP_MAX_PAYLOAD_BYTES`).
    pub max_payload_bytes: usize,
    /// How far a SessionStart timestamp may be from the kernel clock before
    /// the start is refused; stops clients from buying endless sessions.
    pub max_start_skew_ms: i64,
    /// Suspension cap used when a SessionStart leaves `max_suspend_ms` at 0.
    pub default_max_suspend_ms: i64,
    /// Most participants a SessionStart may declare.
    pub max_participants: usize,
    /// The runtime's own agent id (manifest, runtime-emitted envelopes).
    pub runtime_id: String,
    /// How many recently ended sessions the kernel keeps in memory (whole,
    /// for a short linger) besides those that ended in the batch in flight.
    /// Older ones are read back from storage. Memory stays bounded by this,
    /// never by the number of ended sessions.
    pub ended_cache: usize,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            session_id_policy: SessionIdPolicy::Strict,
            max_payload_bytes: 1_048_576,
            max_start_skew_ms: 5 * 60 * 1000,
            default_max_suspend_ms: 7 * 24 * 60 * 60 * 1000,
            max_participants: 1000,
            runtime_id: "macp-runtime".to_string(),
            ended_cache: 1024,
        }
    }
}

/// The only protocol version this runtime speaks.
pub const PROTOCOL_VERSION: &str = "1.0";
/// Upper bound of `ttl_ms` (24 h), as both reference runtimes enforce.
pub const MAX_TTL_MS: i64 = 86_400_000;
