//! The one place where kernel answers become wire answers: a typed
//! [`KernelError`] becomes an `Ack` with a `MACPError`, or a gRPC [`Status`]
//! carrying the registry code in [`ERROR_CODE_KEY`] metadata.
//!
//! Nothing else in the transport builds an error `Ack` or picks a gRPC code
//! for a registry code, and nothing matches error-code strings: decisions are
//! made on [`ErrorCode`] values. Messages say what went wrong once; the code
//! travels beside them (in `MACPError.code` or the metadata), so a client
//! that prints "CODE: message" shows each once.

use macp_kernel::{Accepted, ErrorCode, KernelError};
use macp_wire::v1::{Ack, MacpError, SessionState};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key that names the MACP registry code of an error status.
///
/// Several registry codes share one gRPC status (NOT_FOUND is an unknown
/// session or an unknown policy; RESOURCE_EXHAUSTED is a rate limit or a
/// lagging stream), so clients branch on this key rather than on the status:
/// `macp-sdk-python` reads it into `MacpTransportError.macp_code` and
/// `macp_error_code()`, and without it reports `None`.
pub const ERROR_CODE_KEY: &str = "macp-error-code";

/// The gRPC status code for a registry code, for RPCs whose errors are
/// statuses rather than Acks. Exhaustive, so a new code cannot slip through
/// unmapped; the control-plane codes follow `macp-sdk-python` 0.22's table.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::SessionNotFound | ErrorCode::UnknownPolicyVersion => Code::NotFound,
        ErrorCode::Forbidden | ErrorCode::PolicyDenied => Code::PermissionDenied,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PayloadTooLarge | ErrorCode::RateLimited | ErrorCode::StreamLagged => Code::ResourceExhausted,
        ErrorCode::InternalError => Code::Internal,
        ErrorCode::InvalidEnvelope
        | ErrorCode::InvalidSessionId
        | ErrorCode::InvalidPolicyDefinition
        | ErrorCode::InvalidRequest => Code::InvalidArgument,
        ErrorCode::SessionAlreadyExists => Code::AlreadyExists,
        ErrorCode::SessionNotOpen
        | ErrorCode::UnsupportedProtocolVersion
        | ErrorCode::ModeNotSupported
        | ErrorCode::ReceiptUnavailable
        | ErrorCode::HistoryUnavailable
        | ErrorCode::RegistryReadOnly => Code::FailedPrecondition,
    }
}

/// A kernel error as a gRPC status with its registry code in metadata.
pub fn status(e: KernelError) -> Status {
    let mut md = MetadataMap::new();
    md.insert(ERROR_CODE_KEY, MetadataValue::from_static(e.code.as_str()));
    Status::with_metadata(grpc_code(e.code), e.message, md)
}

/// Shorthand for [`status`] of a fresh error.
pub fn error_status(code: ErrorCode, message: impl Into<String>) -> Status {
    status(KernelError::new(code, message))
}

/// The `Ack` for an envelope or control request: `ok` with the session's
/// state, or the error with state UNSPECIFIED.
pub fn ack(session_id: &str, message_id: &str, at_unix_ms: i64, result: Result<Accepted, KernelError>) -> Ack {
    match result {
        Ok(a) => Ack {
            ok: true,
            duplicate: a.duplicate,
            message_id: message_id.to_string(),
            session_id: session_id.to_string(),
            accepted_at_unix_ms: at_unix_ms,
            session_state: a.state as i32,
            error: None,
        },
        Err(e) => Ack {
            ok: false,
            duplicate: false,
            message_id: message_id.to_string(),
            session_id: session_id.to_string(),
            accepted_at_unix_ms: at_unix_ms,
            session_state: SessionState::Unspecified as i32,
            error: Some(macp_error(session_id, message_id, e)),
        },
    }
}

/// A kernel error as the wire `MACPError` (Acks, inline stream frames).
pub fn macp_error(session_id: &str, message_id: &str, e: KernelError) -> MacpError {
    MacpError {
        code: e.code.as_str().to_string(),
        message: e.message,
        session_id: session_id.to_string(),
        message_id: message_id.to_string(),
        details: e.details,
    }
}

/// A registry RPC's `error` string (its responses have no code field).
pub fn registry_error(e: &KernelError) -> String {
    format!("{}: {}", e.code, e.message)
}

/// RESOURCE_EXHAUSTED tagged STREAM_LAGGED: a subscriber fell behind and
/// was closed; the client resubscribes.
pub fn lagged(message: impl Into<String>) -> Status {
    error_status(ErrorCode::StreamLagged, message)
}

/// The runtime is stopping: retryable.
pub fn shutting_down() -> Status {
    Status::unavailable("the runtime is shutting down; retry against another instance or after restart")
}
