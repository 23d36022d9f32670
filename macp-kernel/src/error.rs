//! The one error type of the kernel, carrying the MACP registry code.
//!
//! Clients branch on `code` (stable, from the spec's `error-codes.md`), humans
//! read `message`. Keeping both in one value means every rejection path must
//! pick a registry code: there is no "generic" error to fall back on.

use std::fmt;

/// Error codes of the MACP error-code registry that this runtime emits.
///
/// `UNAUTHORIZED` (a deprecated alias of FORBIDDEN) and `DUPLICATE_MESSAGE`
/// (duplicates are acknowledged, DECISIONS 5) are deliberately absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorCode {
    /// Missing or invalid credentials, or a sender that is not the caller.
    Unauthenticated,
    /// Authenticated, but not allowed for this session or message type.
    Forbidden,
    /// No session with that id.
    SessionNotFound,
    /// The session is not OPEN (terminal, suspended, or just expired).
    SessionNotOpen,
    /// A SessionStart for a session id that already has one.
    SessionAlreadyExists,
    /// The envelope or its payload breaks the structural or mode contract.
    InvalidEnvelope,
    /// `macp_version` is not one the runtime speaks.
    UnsupportedProtocolVersion,
    /// The mode (or its version) is not available for new sessions.
    ModeNotSupported,
    /// The payload is larger than the configured limit.
    PayloadTooLarge,
    /// Too many requests, or too many open sessions for this identity.
    RateLimited,
    /// The session id does not meet the deployment's format.
    InvalidSessionId,
    /// The runtime failed internally (for example, a failed durable append).
    InternalError,
    /// `policy_version` names no registered policy.
    UnknownPolicyVersion,
    /// The governance policy's rules are not met by a Commitment.
    PolicyDenied,
    /// A policy descriptor is invalid, or bound to another mode.
    InvalidPolicyDefinition,
}

impl ErrorCode {
    /// The registry string carried in `MACPError.code`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::SessionNotFound => "SESSION_NOT_FOUND",
            ErrorCode::SessionNotOpen => "SESSION_NOT_OPEN",
            ErrorCode::SessionAlreadyExists => "SESSION_ALREADY_EXISTS",
            ErrorCode::InvalidEnvelope => "INVALID_ENVELOPE",
            ErrorCode::UnsupportedProtocolVersion => "UNSUPPORTED_PROTOCOL_VERSION",
            ErrorCode::ModeNotSupported => "MODE_NOT_SUPPORTED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::InvalidSessionId => "INVALID_SESSION_ID",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::UnknownPolicyVersion => "UNKNOWN_POLICY_VERSION",
            ErrorCode::PolicyDenied => "POLICY_DENIED",
            ErrorCode::InvalidPolicyDefinition => "INVALID_POLICY_DEFINITION",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection: a registry code, a message a human can act on, and optional
/// structured details (JSON, e.g. the reasons of a POLICY_DENIED).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct KernelError {
    /// The registry code.
    pub code: ErrorCode,
    /// What went wrong, in words that say what to change.
    pub message: String,
    /// Structured details (`MACPError.details`), empty when there are none.
    pub details: Vec<u8>,
}

impl KernelError {
    /// An error with a code and a message and no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        KernelError { code, message: message.into(), details: Vec::new() }
    }

    /// Attaches structured details.
    pub fn with_details(mut self, details: Vec<u8>) -> Self {
        self.details = details;
        self
    }

    /// INVALID_ENVELOPE: the most common rejection, so it gets a shorthand.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidEnvelope, message)
    }

    /// FORBIDDEN.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// POLICY_DENIED with the structured `{"reasons":[…]}` details the spec
    /// asks for, so clients can show every unmet rule at once.
    pub fn policy_denied(reasons: Vec<String>) -> Self {
        let details = serde_json::to_vec(&serde_json::json!({ "reasons": reasons })).unwrap_or_default();
        Self::new(ErrorCode::PolicyDenied, format!("governance policy denied this message: {}", reasons.join("; ")))
            .with_details(details)
    }
}

/// Shorthand for kernel results.
pub type KResult<T> = Result<T, KernelError>;
