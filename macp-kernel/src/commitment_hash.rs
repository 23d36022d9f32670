//! The canonical commitment hash of RFC-MACP-0013 (`macp-commitment-hash/1`).
//!
//! A `commitment_hash` names a Commitment by its content, so that a later
//! session can supersede it (`CommitmentPayload.supersedes`) and a decision
//! receipt can prove what was decided. Every place this runtime writes or
//! checks one goes through this module, so the value is computed identically
//! everywhere:
//!
//! 1. project the `CommitmentPayload` onto a JSON object with exactly its
//!    nine fields under their snake_case names — the seven strings (unset is
//!    `""`), `outcome_positive` (always present), and `supersedes` as
//!    `{session_id, commitment_hash}` only when the field is set (set but
//!    empty is present, and hashes differently from absent);
//! 2. canonicalize it with JCS (RFC 8785);
//! 3. hash `"macp-commitment-hash/1:" ‖ JCS` with SHA-256;
//! 4. write `"sha256:"` and 64 lowercase hex digits.
//!
//! Hashing never depends on whether the Commitment is otherwise valid. A
//! payload carrying a field outside the nine (a future field 10) **cannot be
//! verified** under this label — distinct from a mismatch — and
//! [`commitment_hash_of_payload`] says so instead of silently dropping it.
//! `commitment_hash` is a content digest, never the opaque `commitment_id`.

use macp_wire::v1::CommitmentPayload;
use prost::Message as _;
use serde::Serialize;

/// The label of the one algorithm this protocol version uses; it is part of
/// the preimage, never of the output.
pub const LABEL: &str = "macp-commitment-hash/1";

/// The output prefix naming the digest.
pub const PREFIX: &str = "sha256:";

/// Highest field number of `CommitmentPayload` the label covers.
const LAST_FIELD: u32 = 9;
/// Fields of `CommitmentRef` (`session_id`, `commitment_hash`).
const REF_FIELDS: u32 = 2;

/// Why a payload could not be hashed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// The bytes are not a `CommitmentPayload`.
    #[error("the payload is not a CommitmentPayload: {0}")]
    Undecodable(String),
    /// The payload carries a field `macp-commitment-hash/1` does not cover,
    /// so no hash under this label can vouch for it (cannot-verify, not a
    /// mismatch).
    #[error(
        "the payload carries field {field}{}, which {LABEL} does not cover; it cannot be verified under this label",
        if *.nested { " inside supersedes" } else { "" }
    )]
    UnknownField {
        /// The protobuf field number.
        field: u32,
        /// Whether it sits inside `supersedes` rather than at the top level.
        nested: bool,
    },
    /// JCS refused the projection (cannot happen for strings and booleans;
    /// kept as an error rather than a panic).
    #[error("the projection could not be canonicalized: {0}")]
    Canonicalization(String),
}

/// The RFC-MACP-0013 projection; field names are the JSON keys.
#[derive(Serialize)]
struct Projection<'a> {
    commitment_id: &'a str,
    action: &'a str,
    authority_scope: &'a str,
    reason: &'a str,
    mode_version: &'a str,
    policy_version: &'a str,
    configuration_version: &'a str,
    outcome_positive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    supersedes: Option<RefProjection<'a>>,
}

#[derive(Serialize)]
struct RefProjection<'a> {
    session_id: &'a str,
    commitment_hash: &'a str,
}

/// The canonical (JCS) bytes of a Commitment's projection: what the label is
/// prepended to. Exposed for receipts, which carry the projection itself.
pub fn canonical_json(c: &CommitmentPayload) -> Result<Vec<u8>, HashError> {
    let p = Projection {
        commitment_id: &c.commitment_id,
        action: &c.action,
        authority_scope: &c.authority_scope,
        reason: &c.reason,
        mode_version: &c.mode_version,
        policy_version: &c.policy_version,
        configuration_version: &c.configuration_version,
        outcome_positive: c.outcome_positive,
        supersedes: c
            .supersedes
            .as_ref()
            .map(|r| RefProjection { session_id: &r.session_id, commitment_hash: &r.commitment_hash }),
    };
    serde_json_canonicalizer::to_vec(&p).map_err(|e| HashError::Canonicalization(e.to_string()))
}

/// The bytes SHA-256 is computed over: `LABEL ":"` followed by the JCS bytes.
pub fn preimage(c: &CommitmentPayload) -> Result<Vec<u8>, HashError> {
    let jcs = canonical_json(c)?;
    let mut out = Vec::with_capacity(LABEL.len() + 1 + jcs.len());
    out.extend_from_slice(LABEL.as_bytes());
    out.push(b':');
    out.extend_from_slice(&jcs);
    Ok(out)
}

/// The canonical hash of a decoded Commitment, `sha256:<64 lowercase hex>`.
/// Use [`commitment_hash_of_payload`] for wire bytes, which also refuses
/// fields the label does not cover.
pub fn commitment_hash(c: &CommitmentPayload) -> Result<String, HashError> {
    let digest = ring::digest::digest(&ring::digest::SHA256, &preimage(c)?);
    let mut out = String::with_capacity(PREFIX.len() + 64);
    out.push_str(PREFIX);
    for b in digest.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The canonical hash of a Commitment as it travelled (the payload bytes of
/// the accepted envelope). Refuses bytes that carry a field outside the nine
/// (or outside `supersedes`' two), since decoding would silently drop it.
pub fn commitment_hash_of_payload(payload: &[u8]) -> Result<String, HashError> {
    check_fields(payload, LAST_FIELD, false)?;
    let c = CommitmentPayload::decode(payload).map_err(|e| HashError::Undecodable(e.to_string()))?;
    commitment_hash(&c)
}

/// Whether `s` has the shape of a canonical commitment hash,
/// `^sha256:[0-9a-f]{64}$` (RFC-MACP-0013 §9). Uppercase hex, a missing
/// prefix or another length are refused: a hash is compared as a string.
pub fn is_well_formed(s: &str) -> bool {
    s.strip_prefix(PREFIX)
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Walks protobuf wire data and fails on a field number above `last`;
/// recurses into `supersedes` (field 9) at the top level.
fn check_fields(mut buf: &[u8], last: u32, nested: bool) -> Result<(), HashError> {
    let bad = |what: &str| HashError::Undecodable(what.to_string());
    while !buf.is_empty() {
        let key = varint(&mut buf).ok_or_else(|| bad("truncated field key"))?;
        let field = u32::try_from(key >> 3).map_err(|_| bad("field number out of range"))?;
        if field == 0 {
            return Err(bad("field number 0"));
        }
        if field > last {
            return Err(HashError::UnknownField { field, nested });
        }
        match key & 7 {
            0 => {
                varint(&mut buf).ok_or_else(|| bad("truncated varint"))?;
            }
            1 => buf = buf.get(8..).ok_or_else(|| bad("truncated 64-bit field"))?,
            5 => buf = buf.get(4..).ok_or_else(|| bad("truncated 32-bit field"))?,
            2 => {
                let len = varint(&mut buf).ok_or_else(|| bad("truncated length"))?;
                let len = usize::try_from(len).map_err(|_| bad("length out of range"))?;
                let body = buf.get(..len).ok_or_else(|| bad("truncated length-delimited field"))?;
                if !nested && field == LAST_FIELD {
                    check_fields(body, REF_FIELDS, true)?;
                }
                buf = &buf[len..];
            }
            _ => return Err(bad("unsupported wire type (groups)")),
        }
    }
    Ok(())
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use macp_wire::v1::CommitmentRef;

    fn base() -> CommitmentPayload {
        CommitmentPayload {
            commitment_id: "c1".into(),
            action: "decision.approved".into(),
            authority_scope: "seam".into(),
            reason: "r".into(),
            mode_version: "1.0.0".into(),
            policy_version: "policy.default".into(),
            configuration_version: "cfg".into(),
            outcome_positive: false,
            supersedes: None,
        }
    }

    #[test]
    fn the_projection_keeps_false_and_empty_and_distinguishes_empty_supersedes() {
        let jcs = String::from_utf8(canonical_json(&CommitmentPayload::default()).unwrap()).unwrap();
        assert_eq!(
            jcs,
            r#"{"action":"","authority_scope":"","commitment_id":"","configuration_version":"","mode_version":"","outcome_positive":false,"policy_version":"","reason":""}"#
        );
        let with_empty = CommitmentPayload { supersedes: Some(CommitmentRef::default()), ..Default::default() };
        let jcs2 = String::from_utf8(canonical_json(&with_empty).unwrap()).unwrap();
        assert!(jcs2.ends_with(r#""supersedes":{"commitment_hash":"","session_id":""}}"#), "{jcs2}");
        assert_ne!(commitment_hash(&CommitmentPayload::default()), commitment_hash(&with_empty));
    }

    #[test]
    fn hashes_are_well_formed_and_the_shape_check_is_strict() {
        let h = commitment_hash(&base()).unwrap();
        assert!(is_well_formed(&h), "{h}");
        assert!(!is_well_formed(&h.to_uppercase()));
        assert!(!is_well_formed(&h[..h.len() - 1]));
        assert!(!is_well_formed(&format!("{h}0")));
        assert!(!is_well_formed(h.trim_start_matches(PREFIX)));
        assert!(!is_well_formed("sha256:"));
        assert!(!is_well_formed("not-a-valid-hash"));
        assert!(!is_well_formed(&h.replace("sha256", "sha512")));
    }

    #[test]
    fn wire_bytes_hash_like_the_decoded_payload_and_unknown_fields_cannot_verify() {
        let mut c = base();
        c.supersedes = Some(CommitmentRef { session_id: "s".into(), commitment_hash: "x".into() });
        let bytes = c.encode_to_vec();
        assert_eq!(commitment_hash_of_payload(&bytes), commitment_hash(&c));
        // Field 10, varint 1: a future field.
        let mut future = bytes.clone();
        future.extend_from_slice(&[10 << 3, 1]);
        assert_eq!(commitment_hash_of_payload(&future), Err(HashError::UnknownField { field: 10, nested: false }));
        // Field 3 inside supersedes.
        let r = CommitmentRef { session_id: "s".into(), commitment_hash: "x".into() }.encode_to_vec();
        let mut inner = r.clone();
        inner.extend_from_slice(&[3 << 3, 0]);
        let mut nested = base().encode_to_vec();
        nested.push((9 << 3) | 2);
        nested.push(inner.len() as u8);
        nested.extend_from_slice(&inner);
        assert_eq!(commitment_hash_of_payload(&nested), Err(HashError::UnknownField { field: 3, nested: true }));
        assert!(matches!(commitment_hash_of_payload(&[0x0a, 5, b'a']), Err(HashError::Undecodable(_))));
        assert!(matches!(commitment_hash_of_payload(&[0xff]), Err(HashError::Undecodable(_))));
    }
}
