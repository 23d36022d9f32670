//! The one error type of the kernel, carrying the MACP registry code.
//!
//! Clients branch on `code` (stable, from the spec's `error-codes.md`), humans
//! read `message`. Keeping both in one value means every rejection path must
//! pick a registry code: there is no "generic" error to fall back on.

use std::fmt;

use crate::policy::{details_json, Denial};

/// Error codes of the MACP error-code registry that this runtime emits.
///
/// `UNAUTHORIZED` (a deprecated alias of FORBIDDEN) and `DUPLICATE_MESSAGE`
/// (duplicates are acknowledged, DECISIONS 5) are deliberately absent. The
/// last five are the control-plane codes `macp-sdk-python` 0.22 knows; each
/// variant says where it applies, so a transport maps them to gRPC statuses
/// without matching strings.
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
    /// GetDecisionReceipt: the session has no binding Commitment yet, or no
    /// receipt can be issued for it (gRPC FAILED_PRECONDITION).
    ReceiptUnavailable,
    /// WhatIfReplay: the session's accepted history is no longer complete
    /// (retention or compaction removed it) (gRPC FAILED_PRECONDITION).
    HistoryUnavailable,
    /// A registry change on a registry that is read-only here, e.g. loaded
    /// from files (gRPC FAILED_PRECONDITION).
    RegistryReadOnly,
    /// A stream subscriber fell too far behind and was closed; resubscribe
    /// (gRPC RESOURCE_EXHAUSTED).
    StreamLagged,
    /// A malformed request that is not an envelope, e.g. a page token this
    /// runtime never issued (gRPC INVALID_ARGUMENT).
    InvalidRequest,
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
            ErrorCode::ReceiptUnavailable => "RECEIPT_UNAVAILABLE",
            ErrorCode::HistoryUnavailable => "HISTORY_UNAVAILABLE",
            ErrorCode::RegistryReadOnly => "REGISTRY_READ_ONLY",
            ErrorCode::StreamLagged => "STREAM_LAGGED",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection: a registry code, a message a human can act on, and optional
/// structured details (JSON, e.g. the reasons of a POLICY_DENIED). A
/// POLICY_DENIED also keeps its denials as values, so a caller that replays
/// history under another policy can collect them without parsing details.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct KernelError {
    /// The registry code.
    pub code: ErrorCode,
    /// What went wrong, in words that say what to change.
    pub message: String,
    /// Structured details (`MACPError.details`), empty when there are none.
    pub details: Vec<u8>,
    /// For POLICY_DENIED: every unmet rule, in evaluation order (the same
    /// content as `details`). Empty for every other code.
    pub denials: Vec<Denial>,
}

impl KernelError {
    /// An error with a code and a message and no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        KernelError { code, message: message.into(), details: Vec::new(), denials: Vec::new() }
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

    /// POLICY_DENIED carrying every unmet rule: in the message for humans,
    /// as `{"reasons": […], "denials": [{code, message, participants}]}` in
    /// the details for clients (see [`crate::policy::Denial`]), and as values
    /// in [`KernelError::denials`].
    pub fn policy_denied(denials: Vec<Denial>) -> Self {
        let text: Vec<&str> = denials.iter().map(|d| d.message.as_str()).collect();
        let message = format!("governance policy denied this message: {}", text.join("; "));
        let mut e = Self::new(ErrorCode::PolicyDenied, message).with_details(details_json(&denials));
        e.denials = denials;
        e
    }

    /// INVALID_POLICY_DEFINITION.
    pub fn invalid_policy(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidPolicyDefinition, message)
    }
}

/// Shorthand for kernel results.
pub type KResult<T> = Result<T, KernelError>;
