//! Receipts issued from hand-built histories: what they contain, that they
//! verify (and stop verifying when touched), and which histories get none.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use macp_kernel::ErrorCode;
use macp_receipt::{issue, verify, ReceiptError, ReceiptKeys, SigningKey, Verdict, VerifyError};
use macp_wire::storage::record::Fact;
use macp_wire::storage::{Record, SessionExpired, SessionStarted};
use macp_wire::v1::{CommitmentPayload, Envelope};
use prost::Message as _;
use serde_json::Value;

const SID: &str = "00000000-0000-4000-8000-000000000001";
const MODE: &str = "macp.mode.decision.v1";
const RESOLVED_AT: i64 = 1_700_000_000_123;

fn env(message_type: &str, sender: &str, id: &str, payload: Vec<u8>) -> Envelope {
    Envelope {
        macp_version: "1.0".into(),
        mode: MODE.into(),
        message_type: message_type.into(),
        message_id: id.into(),
        session_id: SID.into(),
        sender: sender.into(),
        timestamp_unix_ms: 0,
        payload,
    }
}

fn record(seq: u64, at: i64, fact: Fact) -> Record {
    Record { session_id: SID.into(), seq, at_unix_ms: at, fact: Some(fact) }
}

fn commitment() -> CommitmentPayload {
    CommitmentPayload {
        commitment_id: "c1".into(),
        action: "decision.selected".into(),
        authority_scope: "team".into(),
        reason: "because \"p1\" won\n".into(),
        mode_version: "1.0.0".into(),
        policy_version: "policy.default".into(),
        configuration_version: "cfg-1".into(),
        outcome_positive: true,
        supersedes: None,
    }
}

/// SessionStart, a Proposal, and the Commitment with `payload`.
fn history_with(payload: Vec<u8>) -> Vec<Record> {
    let started = SessionStarted {
        envelope: Some(env("SessionStart", "I", "m1", vec![1, 2, 3])),
        canonical_mode: MODE.into(),
        ..Default::default()
    };
    vec![
        record(1, RESOLVED_AT - 2000, Fact::Started(started)),
        record(2, RESOLVED_AT - 1000, Fact::Accepted(env("Proposal", "A", "m2", vec![4]))),
        record(3, RESOLVED_AT, Fact::Accepted(env("Commitment", "I", "m3", payload))),
    ]
}

fn history() -> Vec<Record> {
    history_with(commitment().encode_to_vec())
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_seed(&[n; 32], Some(format!("key-{n}"))).unwrap()
}

fn jwks(n: u8) -> String {
    ReceiptKeys::signed_by(key(n)).jwks_json()
}

#[test]
fn a_signed_receipt_carries_the_decision_and_verifies() {
    let k = key(1);
    let r = issue(&history(), "macp-runtime", Some(&k)).unwrap();
    assert_eq!(verify(&r, &jwks(1)), Ok(Verdict::Attested { kid: "key-1".into() }));
    let v: Value = serde_json::from_str(&r).unwrap();
    assert_eq!(v["receipt_format"], "macp-receipt/1");
    assert_eq!(v["session_id"], SID);
    assert_eq!(v["mode"], MODE);
    assert_eq!(v["issuer"], "macp-runtime");
    assert_eq!(v["issued_at"], "2023-11-14T22:13:20.123Z", "the Commitment's recorded time");
    assert_eq!(v["commitment"]["reason"], "because \"p1\" won\n");
    assert_eq!(v["commitment"]["outcome_positive"], true);
    assert!(v["commitment"].get("supersedes").is_none());
    let hash = macp_kernel::commitment_hash::commitment_hash(&commitment()).unwrap();
    assert_eq!(v["commitment_hash"], hash.as_str());
    assert!(v["commitment_wire_b64"].is_string());
    assert_eq!(v["transcript"]["digest_alg"], "macp-rs-history-sha256/1");
    assert_eq!(v["transcript"]["message_count"], 3);
    // The served text is the JCS form of itself.
    assert_eq!(serde_json_canonicalizer::to_string(&v).unwrap(), r);
    // The protected header is exactly {"alg":"EdDSA","kid":…}.
    let jws = v["attestations"][0]["jws"].as_str().unwrap();
    let header = URL_SAFE_NO_PAD.decode(jws.split('.').next().unwrap()).unwrap();
    assert_eq!(header, br#"{"alg":"EdDSA","kid":"key-1"}"#);
    assert_eq!(jws.split('.').nth(1), Some(""), "detached payload");
}

#[test]
fn the_transcript_digest_covers_every_accepted_envelope() {
    let h = history();
    let r: Value = serde_json::from_str(&issue(&h, "i", None).unwrap()).unwrap();
    let (digest, n) =
        macp_receipt::transcript::history_digest(h.iter().filter_map(macp_kernel::record::history_envelope));
    assert_eq!((r["transcript"]["digest"].as_str().unwrap(), n), (digest.as_str(), 3));
    let mut other = history();
    if let Some(Fact::Accepted(e)) = &mut other[1].fact {
        e.payload = vec![5];
    }
    let r2: Value = serde_json::from_str(&issue(&other, "i", None).unwrap()).unwrap();
    assert_ne!(r["transcript"], r2["transcript"], "another history, another digest");
    assert_eq!(r["commitment_hash"], r2["commitment_hash"], "same Commitment");
}

#[test]
fn issuing_is_a_pure_function() {
    let k = key(1);
    let a = issue(&history(), "macp-runtime", Some(&k)).unwrap();
    let b = issue(&history(), "macp-runtime", Some(&key(1))).unwrap();
    assert_eq!(a, b, "same history and key, same bytes");
    let c = issue(&history(), "macp-runtime", Some(&key(2))).unwrap();
    assert_ne!(a, c);
}

#[test]
fn a_changed_byte_or_another_key_does_not_verify() {
    let r = issue(&history(), "macp-runtime", Some(&key(1))).unwrap();
    // The commitment no longer matches its hash.
    let touched = r.replacen("because", "becausf", 1);
    assert!(matches!(verify(&touched, &jwks(1)), Err(VerifyError::Unverified(_))));
    // Consistent, but no longer what was signed.
    let touched = r.replacen("2023-11-14T22:13:20.123Z", "2023-11-14T22:13:21.123Z", 1);
    assert_eq!(verify(&touched, &jwks(1)), Ok(Verdict::IntegrityOnly));
    assert_eq!(verify(&r, &jwks(2)), Ok(Verdict::IntegrityOnly), "a key the verifier does not trust");
    assert!(matches!(verify(&r.replace("macp-receipt/1", "macp-receipt/2"), &jwks(1)), Err(VerifyError::Refused(_))));
}

#[test]
fn unsigned_receipts_have_integrity_only() {
    let r = issue(&history(), "macp-runtime", None).unwrap();
    let v: Value = serde_json::from_str(&r).unwrap();
    assert_eq!(v["attestations"], serde_json::json!([]));
    assert_eq!(verify(&r, &jwks(1)), Ok(Verdict::IntegrityOnly));
}

#[test]
fn wire_bytes_the_hash_does_not_cover_are_left_out() {
    let mut payload = commitment().encode_to_vec();
    payload.extend_from_slice(&[10 << 3, 1]); // a future field 10
    let r = issue(&history_with(payload), "macp-runtime", Some(&key(1))).unwrap();
    let v: Value = serde_json::from_str(&r).unwrap();
    assert!(v.get("commitment_wire_b64").is_none());
    assert_eq!(verify(&r, &jwks(1)), Ok(Verdict::Attested { kid: "key-1".into() }));
}

#[test]
fn histories_without_a_binding_commitment_get_no_receipt() {
    let mut open = history();
    open.pop();
    let e = issue(&open, "i", None).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ReceiptUnavailable);
    assert!(e.to_string().contains("has not resolved"), "{e}");
    open.push(record(3, RESOLVED_AT, Fact::Expired(SessionExpired { reason: "ttl".into() })));
    let e = issue(&open, "i", None).unwrap_err();
    assert!(matches!(&e, ReceiptError::NotResolved { why, .. } if why.contains("expired")), "{e}");
}

#[test]
fn incomplete_histories_are_history_unavailable() {
    let mut gap = history();
    gap.remove(1);
    assert_eq!(issue(&gap, "i", None).unwrap_err().code(), ErrorCode::HistoryUnavailable);
    let tail = history()[1..].to_vec();
    assert_eq!(issue(&tail, "i", None).unwrap_err().code(), ErrorCode::HistoryUnavailable);
    assert_eq!(issue(&[], "i", None).unwrap_err().code(), ErrorCode::HistoryUnavailable);
}
