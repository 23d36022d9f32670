//! Offline verification of a `macp-receipt/1` receipt against a JWK Set:
//! the checks `macp-sdk-python` 0.22's `verify_receipt` makes, in Rust, for
//! our tests, the simulator's oracle and operators. The SDK stays the
//! acceptance test of the format (tests/interop); this is the same rule
//! where Python is not at hand.

use std::collections::BTreeMap;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use macp_kernel::commitment_hash::{canonical_json, commitment_hash, commitment_hash_of_payload};
use macp_wire::v1::{CommitmentPayload, CommitmentRef};
use prost::Message as _;
use serde_json::{Map, Value};

use crate::{jcs, RECEIPT_FORMAT};

/// A receipt whose integrity holds: the recorded Commitment has the
/// recorded hash (and wire bytes, when present).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An attestation verified with the trusted key `kid`.
    Attested {
        /// The key that signed it.
        kid: String,
    },
    /// No attestation verified with a trusted key (none, unknown keys, bad
    /// signatures): the receipt is consistent, but nobody vouches for it.
    IntegrityOnly,
}

/// A receipt that fails before any signature is looked at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a `macp-receipt/1` document (the SDK's `refused`).
    #[error("refused: {0}")]
    Refused(String),
    /// The commitment, its hash or its wire bytes disagree, or cannot be
    /// checked (the SDK's `unverified`).
    #[error("unverified: {0}")]
    Unverified(String),
}

const STRING_FIELDS: [&str; 7] =
    ["commitment_id", "action", "authority_scope", "reason", "mode_version", "policy_version", "configuration_version"];

/// Verifies `receipt_json` with the keys of `jwks_json` (GetReceiptKeys'
/// answer). See [`Verdict`] and [`VerifyError`].
pub fn verify(receipt_json: &str, jwks_json: &str) -> Result<Verdict, VerifyError> {
    let receipt: Value =
        serde_json::from_str(receipt_json).map_err(|e| VerifyError::Refused(format!("not JSON: {e}")))?;
    let Value::Object(receipt) = receipt else { return Err(VerifyError::Refused("not a JSON object".into())) };
    if receipt.get("receipt_format").and_then(Value::as_str) != Some(RECEIPT_FORMAT) {
        return Err(VerifyError::Refused(format!("receipt_format is not {RECEIPT_FORMAT}")));
    }
    check_integrity(&receipt)?;
    let mut body = receipt.clone();
    body.remove("attestations");
    let Ok(body) = jcs(&Value::Object(body)) else { return Ok(Verdict::IntegrityOnly) };
    let body = URL_SAFE_NO_PAD.encode(body.as_bytes());
    let keys = trusted_keys(jwks_json);
    let attestations = receipt.get("attestations").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    Ok(attestations
        .iter()
        .find_map(|a| valid_jws(a, &body, &keys))
        .map_or(Verdict::IntegrityOnly, |kid| Verdict::Attested { kid }))
}

fn check_integrity(receipt: &Map<String, Value>) -> Result<(), VerifyError> {
    let unverified = |why: &str| VerifyError::Unverified(why.to_string());
    let c = read_commitment(receipt.get("commitment"))
        .ok_or_else(|| unverified("commitment is not a complete RFC-MACP-0013 projection"))?;
    let claimed = receipt.get("commitment_hash").and_then(Value::as_str).unwrap_or_default();
    if commitment_hash(&c).ok().as_deref() != Some(claimed) {
        return Err(unverified("commitment_hash does not match the commitment"));
    }
    if let Some(wire) = receipt.get("commitment_wire_b64") {
        let wire = wire
            .as_str()
            .and_then(|w| STANDARD.decode(w).ok())
            .ok_or_else(|| unverified("commitment_wire_b64 is not padded base64"))?;
        if commitment_hash_of_payload(&wire).ok().as_deref() != Some(claimed) {
            return Err(unverified("commitment_wire_b64 does not hash to commitment_hash"));
        }
        let decoded = CommitmentPayload::decode(wire.as_slice()).map_err(|_| unverified("wire does not decode"))?;
        if canonical_json(&decoded).ok() != canonical_json(&c).ok() {
            return Err(unverified("commitment_wire_b64 decodes to another commitment"));
        }
    }
    Ok(())
}

/// A receipt's `commitment` as a payload, if it has exactly the projection's
/// members with the right types.
fn read_commitment(v: Option<&Value>) -> Option<CommitmentPayload> {
    let m = v?.as_object()?;
    let allowed = |k: &str| STRING_FIELDS.contains(&k) || k == "outcome_positive" || k == "supersedes";
    if !m.keys().all(|k| allowed(k)) {
        return None;
    }
    let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let supersedes = match m.get("supersedes") {
        None => None,
        Some(Value::Object(r)) if r.len() == 2 => Some(CommitmentRef {
            session_id: r.get("session_id")?.as_str()?.to_string(),
            commitment_hash: r.get("commitment_hash")?.as_str()?.to_string(),
        }),
        Some(_) => return None,
    };
    Some(CommitmentPayload {
        commitment_id: s("commitment_id")?,
        action: s("action")?,
        authority_scope: s("authority_scope")?,
        reason: s("reason")?,
        mode_version: s("mode_version")?,
        policy_version: s("policy_version")?,
        configuration_version: s("configuration_version")?,
        outcome_positive: m.get("outcome_positive")?.as_bool()?,
        supersedes,
    })
}

/// `kid` → public key of the usable keys of a JWK Set, as the SDK's
/// `trusted_keys_from_jwks` picks them: Ed25519, a non-empty kid and x, alg
/// EdDSA or absent, use sig or absent, no private member; a kid that occurs
/// twice names no single key and is dropped.
fn trusted_keys(jwks_json: &str) -> BTreeMap<String, Vec<u8>> {
    let set: Value = serde_json::from_str(jwks_json).unwrap_or_default();
    let keys = set.get("keys").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    let mut seen = BTreeMap::<&str, usize>::new();
    for k in keys {
        if let Some(kid) = k.get("kid").and_then(Value::as_str) {
            *seen.entry(kid).or_default() += 1;
        }
    }
    let private = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
    keys.iter()
        .filter_map(|k| {
            let get = |n: &str| k.get(n).and_then(Value::as_str);
            let kid = get("kid").filter(|s| !s.is_empty())?;
            let usable = get("kty") == Some("OKP")
                && get("crv") == Some("Ed25519")
                && k.get("alg").is_none_or(|a| a == "EdDSA")
                && k.get("use").is_none_or(|u| u == "sig")
                && !private.iter().any(|p| k.get(*p).is_some())
                && seen.get(kid) == Some(&1);
            let x = URL_SAFE_NO_PAD.decode(get("x")?).ok()?;
            usable.then(|| (kid.to_string(), x))
        })
        .collect()
}

/// The kid of `att` if it is a JWS whose signature over `body_b64` verifies
/// with a trusted key.
fn valid_jws(att: &Value, body_b64: &str, keys: &BTreeMap<String, Vec<u8>>) -> Option<String> {
    if att.get("type").and_then(Value::as_str) != Some("jws") {
        return None;
    }
    let mut parts = att.get("jws")?.as_str()?.split('.');
    let (header_b64, empty, sig_b64) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !empty.is_empty() {
        return None;
    }
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header_b64).ok()?).ok()?;
    if header.get("alg").and_then(Value::as_str) != Some("EdDSA") {
        return None;
    }
    let kid = header.get("kid")?.as_str()?;
    let x = keys.get(kid)?;
    let sig = URL_SAFE_NO_PAD.decode(sig_b64).ok()?;
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, x);
    key.verify(format!("{header_b64}.{body_b64}").as_bytes(), &sig).ok()?;
    Some(kid.to_string())
}
