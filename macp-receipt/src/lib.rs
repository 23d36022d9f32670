//! # macp-receipt
//!
//! Decision receipts, `macp-receipt/1` (RFC-MACP-0013 §13 and Appendix A, in
//! the form `macp-sdk-python` 0.22's `verify_receipt` checks): a small JSON
//! document a holder keeps to prove, offline and without trusting whoever
//! hands it over, that a session was resolved by one particular Commitment.
//!
//! ## Why a crate of its own
//!
//! A receipt is a pure function of a session's stored history and a signing
//! key ([`issue`]). Nothing else goes in — no clock, no kernel state, no
//! stored copy of the receipt — so the same bytes come out on every call and
//! after every restart (Ed25519 signatures are deterministic), and a session
//! that left the kernel's working set long ago gets the same receipt as one
//! that just resolved. Keeping it out of the transport lets the server
//! (GetDecisionReceipt) and the simulator's oracle (which checks receipts
//! across crashes) call the very same function; keeping it out of the kernel
//! keeps signing keys out of the deterministic core. The key file formats
//! ([`keys`]) and an offline verifier ([`verify()`]) live beside it.
//!
//! ## The document
//!
//! | member | value |
//! |---|---|
//! | `receipt_format` | `"macp-receipt/1"` |
//! | `session_id`, `mode` | the session and the mode it was bound to |
//! | `commitment` | the RFC-MACP-0013 projection of the resolving Commitment (its seven strings, `outcome_positive`, and `supersedes` only when set) |
//! | `commitment_hash` | its canonical hash, `sha256:<hex>` (`macp_kernel::commitment_hash`) |
//! | `commitment_wire_b64` | the Commitment's payload bytes as accepted (padded base64), when they hash to `commitment_hash` |
//! | `issuer` | the runtime's id |
//! | `issued_at` | the recorded acceptance time of the Commitment (RFC 3339, UTC, milliseconds), never the time of the request |
//! | `transcript` | a digest over the whole accepted history ([`transcript`]) |
//! | `attestations` | one detached-payload JWS (`EdDSA`) when a key is configured, else empty |
//!
//! ## Signing
//!
//! The body is the receipt without `attestations`, canonicalized with
//! RFC 8785 (JCS). The protected header is exactly
//! `{"alg":"EdDSA","kid":"<kid>"}`; the signing input is
//! `b64url(header) "." b64url(body)`; the signature is pure Ed25519 over it;
//! the attestation is `{"type":"jws","jws":"<b64url(header)>..<b64url(sig)>"}`.
//! The served text is the JCS form of the whole receipt, so a verifier that
//! re-canonicalizes what it parsed checks the signature over exactly the
//! bytes that were signed.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod issue;
pub mod keys;
mod time;
pub mod transcript;
mod verify;

pub use issue::{issue, ReceiptError, RECEIPT_FORMAT};
pub use keys::{KeyFileError, ReceiptKeys, SigningKey};
pub use verify::{verify, Verdict, VerifyError};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Unpadded base64url, the encoding JWS and JWK use throughout.
fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `sha256:` and the 64 lowercase hex digits of a SHA-256 digest: the shape
/// every digest in a receipt has.
fn sha256_prefixed(digest: ring::digest::Digest) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The JCS text of a JSON value. Receipts hold strings, booleans, objects,
/// arrays and small integers only, all of which have a JCS form; an error
/// here means a bug, reported rather than panicking.
fn jcs(value: &serde_json::Value) -> Result<String, String> {
    serde_json_canonicalizer::to_string(value).map_err(|e| format!("JCS refused the receipt: {e}"))
}
