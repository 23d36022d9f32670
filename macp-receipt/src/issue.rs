//! Issuing a receipt from a session's stored history.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use macp_kernel::commitment_hash::{canonical_json, commitment_hash, commitment_hash_of_payload};
use macp_kernel::{ErrorCode, KernelError};
use macp_wire::storage::{record::Fact, Record};
use macp_wire::v1::CommitmentPayload;
use prost::Message as _;
use serde_json::{json, Map, Value};

use crate::keys::SigningKey;
use crate::{b64url, jcs, time, transcript};

/// The only receipt format this crate issues and verifies.
pub const RECEIPT_FORMAT: &str = "macp-receipt/1";

/// Why no receipt can be issued from a history. Each kind maps to one
/// registry code ([`ReceiptError::code`]), so the transport never looks at
/// messages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// The session has no binding Commitment: it is still open, or it
    /// expired or was cancelled.
    #[error("session {session_id} has no binding Commitment: {why}")]
    NotResolved {
        /// The session.
        session_id: String,
        /// What its history ends with instead.
        why: String,
    },
    /// The history handed in is not the whole history from the
    /// SessionStart on (retention deleted part of it, or the caller passed
    /// a slice).
    #[error("session {session_id}'s accepted history is incomplete: {why}")]
    IncompleteHistory {
        /// The session.
        session_id: String,
        /// What is missing.
        why: String,
    },
    /// A stored record cannot be what the kernel accepted (an undecodable
    /// Commitment, an impossible time): a storage fault or a bug.
    #[error("session {session_id}'s stored history cannot be read: {why}")]
    Unreadable {
        /// The session.
        session_id: String,
        /// What is wrong.
        why: String,
    },
}

impl ReceiptError {
    /// The registry code a client sees: RECEIPT_UNAVAILABLE,
    /// HISTORY_UNAVAILABLE or INTERNAL_ERROR.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReceiptError::NotResolved { .. } => ErrorCode::ReceiptUnavailable,
            ReceiptError::IncompleteHistory { .. } => ErrorCode::HistoryUnavailable,
            ReceiptError::Unreadable { .. } => ErrorCode::InternalError,
        }
    }
}

impl From<ReceiptError> for KernelError {
    fn from(e: ReceiptError) -> Self {
        KernelError::new(e.code(), e.to_string())
    }
}

/// Issues the `macp-receipt/1` receipt of a resolved session from its
/// accepted history: `records` must be the session's records with sequence
/// numbers 1, 2, … in order, the last being the resolving Commitment (what
/// storage returns for an ended session). With `signer`, the receipt
/// carries one EdDSA JWS attestation; without, none.
///
/// A pure function: the same records, issuer and key give the same bytes,
/// today and after any restart. `issued_at` is the Commitment's recorded
/// acceptance time, everything else is read from the records. The result is
/// the receipt's JCS text, ready to serve.
pub fn issue(records: &[Record], issuer: &str, signer: Option<&SigningKey>) -> Result<String, ReceiptError> {
    let session_id = records.first().map_or("", |r| r.session_id.as_str());
    let incomplete = |why: String| ReceiptError::IncompleteHistory { session_id: session_id.to_string(), why };
    let unreadable = |why: String| ReceiptError::Unreadable { session_id: session_id.to_string(), why };
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Err(incomplete("no records".into()));
    };
    for (expected, r) in (1u64..).zip(records) {
        if r.seq != expected || r.session_id != session_id {
            return Err(incomplete(format!("record {expected} is missing (found seq {} of {})", r.seq, r.session_id)));
        }
    }
    let Some(Fact::Started(started)) = &first.fact else {
        return Err(incomplete("it does not begin with its SessionStart".into()));
    };
    let commitment_env = match &last.fact {
        Some(Fact::Accepted(e)) if e.message_type == "Commitment" => e,
        other => {
            let why = match other {
                Some(Fact::Expired(_)) => "it expired",
                Some(Fact::Cancelled(_)) => "it was cancelled",
                _ => "it has not resolved yet",
            };
            return Err(ReceiptError::NotResolved { session_id: session_id.to_string(), why: why.into() });
        }
    };
    let mode = match started.canonical_mode.as_str() {
        "" => started.envelope.as_ref().map_or("", |e| e.mode.as_str()),
        m => m,
    };
    let payload = &commitment_env.payload;
    let c = CommitmentPayload::decode(payload.as_slice())
        .map_err(|e| unreadable(format!("the resolving Commitment does not decode: {e}")))?;
    let hash = commitment_hash(&c).map_err(|e| unreadable(e.to_string()))?;
    let projection: Value = canonical_json(&c)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| unreadable("the Commitment's projection is not JSON".into()))?;
    let issued_at = time::rfc3339_utc_ms(last.at_unix_ms)
        .ok_or_else(|| unreadable(format!("resolution time {} ms is outside years 0000-9999", last.at_unix_ms)))?;
    let mut envelopes = Vec::with_capacity(records.len());
    for r in records {
        envelopes.push(
            macp_kernel::record::history_envelope(r)
                .ok_or_else(|| unreadable(format!("record {} carries no envelope", r.seq)))?,
        );
    }
    let (digest, message_count) = transcript::history_digest(envelopes);

    let mut body = Map::new();
    body.insert("receipt_format".into(), json!(RECEIPT_FORMAT));
    body.insert("session_id".into(), json!(session_id));
    body.insert("mode".into(), json!(mode));
    body.insert("commitment".into(), projection);
    // The wire bytes go in only when a verifier can re-derive the hash from
    // them: bytes carrying a field the hash label does not cover would make
    // the SDK report cannot-verify for an otherwise sound receipt.
    if commitment_hash_of_payload(payload).as_ref() == Ok(&hash) {
        body.insert("commitment_wire_b64".into(), json!(STANDARD.encode(payload)));
    }
    body.insert("commitment_hash".into(), json!(hash));
    body.insert("issuer".into(), json!(issuer));
    body.insert("issued_at".into(), json!(issued_at));
    body.insert(
        "transcript".into(),
        json!({"digest_alg": transcript::DIGEST_ALG, "digest": digest, "message_count": message_count}),
    );
    let mut receipt = Value::Object(body);
    let attestations = match signer {
        Some(key) => vec![jws_attestation(&receipt, key).map_err(unreadable)?],
        None => Vec::new(),
    };
    if let Value::Object(m) = &mut receipt {
        m.insert("attestations".into(), Value::Array(attestations));
    }
    jcs(&receipt).map_err(unreadable)
}

/// The detached-payload JWS over `body` (the receipt without
/// `attestations`): `b64url(header) ".." b64url(signature)`.
fn jws_attestation(body: &Value, key: &SigningKey) -> Result<Value, String> {
    let header = jcs(&json!({"alg": "EdDSA", "kid": key.kid()}))?;
    let header = b64url(header.as_bytes());
    let signing_input = format!("{header}.{}", b64url(jcs(body)?.as_bytes()));
    let signature = key.sign(signing_input.as_bytes());
    Ok(json!({"type": "jws", "jws": format!("{header}..{}", b64url(signature.as_ref()))}))
}
