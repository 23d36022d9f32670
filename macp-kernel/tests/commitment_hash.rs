//! RFC-MACP-0013 commitment hashes: the spec's `cmt-hash/` vectors
//! (`conformance/vectors/cmt-hash/*.json`, each pinning the JCS bytes, the
//! preimage and the hash) and properties of the canonicalisation.
//!
//! The vectors are not session transcripts, so they are read here directly
//! rather than through the session harness.

use std::collections::BTreeMap;
use std::path::PathBuf;

use macp_kernel::commitment_hash::{
    canonical_json, commitment_hash, commitment_hash_of_payload, is_well_formed, preimage, LABEL,
};
use macp_kernel::macp_wire::v1::{CommitmentPayload, CommitmentRef};
use proptest::prelude::*;
use prost::Message as _;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors/cmt-hash")
}

/// Builds the payload a vector describes, refusing keys the projection does
/// not know (a typo must not silently test less).
fn payload_of(v: &Value) -> Result<CommitmentPayload, String> {
    let obj = v.as_object().ok_or("payload is not an object")?;
    let s = |k: &str| -> Result<String, String> {
        match obj.get(k) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(o) => Err(format!("{k} is not a string: {o}")),
        }
    };
    let known = [
        "commitment_id",
        "action",
        "authority_scope",
        "reason",
        "mode_version",
        "policy_version",
        "configuration_version",
        "outcome_positive",
        "supersedes",
    ];
    if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown payload key {k}"));
    }
    let supersedes = match obj.get("supersedes") {
        None => None,
        Some(r) => Some(CommitmentRef {
            session_id: r["session_id"].as_str().ok_or("supersedes.session_id")?.to_string(),
            commitment_hash: r["commitment_hash"].as_str().ok_or("supersedes.commitment_hash")?.to_string(),
        }),
    };
    Ok(CommitmentPayload {
        commitment_id: s("commitment_id")?,
        action: s("action")?,
        authority_scope: s("authority_scope")?,
        reason: s("reason")?,
        mode_version: s("mode_version")?,
        policy_version: s("policy_version")?,
        configuration_version: s("configuration_version")?,
        outcome_positive: obj.get("outcome_positive").and_then(Value::as_bool).ok_or("outcome_positive")?,
        supersedes,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn vectors() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(dir())
        .expect("cmt-hash vectors directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("cmt_hash_")))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), serde_json::from_str(&text).unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn all_five_spec_vectors_pass_byte_for_byte() {
    let vs = vectors();
    assert_eq!(
        vs.len(),
        5,
        "the spec ships 5 commitment-hash vectors: {:?}",
        vs.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    let mut hashes = BTreeMap::new();
    for (name, v) in &vs {
        assert_eq!(v["label"], LABEL, "{name}");
        let c = payload_of(&v["payload"]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(hex(&canonical_json(&c).unwrap()), v["jcs_utf8_hex"].as_str().unwrap(), "{name}: JCS bytes");
        assert_eq!(hex(&preimage(&c).unwrap()), v["preimage_utf8_hex"].as_str().unwrap(), "{name}: preimage");
        let h = commitment_hash(&c).unwrap();
        assert_eq!(h, v["hash"].as_str().unwrap(), "{name}: hash");
        // The same value from the wire bytes.
        assert_eq!(commitment_hash_of_payload(&c.encode_to_vec()).unwrap(), h, "{name}: from wire bytes");
        hashes.insert(name.clone(), h);
    }
    // 002 chains 001; 003 (absent supersedes) and 004 (present but empty) differ.
    let second = payload_of(&vs[1].1["payload"]).unwrap();
    assert_eq!(second.supersedes.unwrap().commitment_hash, hashes["cmt_hash_001_minimal.json"]);
    assert_ne!(hashes["cmt_hash_003_all_empty.json"], hashes["cmt_hash_004_empty_supersedes.json"]);
}

fn arb_payload() -> impl Strategy<Value = CommitmentPayload> {
    // Any Unicode, controls and astral characters included.
    let s = || any::<String>();
    ((s(), s(), s(), s()), (s(), s(), s()), any::<bool>(), proptest::option::of((s(), s()))).prop_map(
        |((id, action, scope, reason), (mv, pv, cv), positive, sup)| CommitmentPayload {
            commitment_id: id,
            action,
            authority_scope: scope,
            reason,
            mode_version: mv,
            policy_version: pv,
            configuration_version: cv,
            outcome_positive: positive,
            supersedes: sup.map(|(session_id, commitment_hash)| CommitmentRef { session_id, commitment_hash }),
        },
    )
}

proptest! {
    /// The canonical bytes are JSON that means exactly the projection, with
    /// keys in sorted order and no whitespace outside strings; re-encoding
    /// the parsed value canonically gives the same bytes (JCS is idempotent).
    #[test]
    fn canonical_json_is_the_sorted_projection(c in arb_payload()) {
        let bytes = canonical_json(&c).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let obj = v.as_object().unwrap();
        let keys: Vec<&String> = obj.keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        prop_assert_eq!(&keys, &sorted);
        prop_assert_eq!(obj.len(), if c.supersedes.is_some() { 9 } else { 8 });
        prop_assert_eq!(obj["reason"].as_str().unwrap(), c.reason.as_str());
        prop_assert_eq!(obj["outcome_positive"].as_bool().unwrap(), c.outcome_positive);
        prop_assert_eq!(serde_json_canonicalizer::to_vec(&v).unwrap(), bytes);
    }

    /// Hashes are well formed, deterministic, equal for the decoded payload
    /// and its wire bytes, and change when any one field changes.
    #[test]
    fn hashes_identify_the_content(c in arb_payload(), flip in 0usize..9) {
        let h = commitment_hash(&c).unwrap();
        prop_assert!(is_well_formed(&h));
        prop_assert_eq!(&commitment_hash_of_payload(&c.encode_to_vec()).unwrap(), &h);
        let mut d = c.clone();
        match flip {
            0 => d.commitment_id.push('x'),
            1 => d.action.push('x'),
            2 => d.authority_scope.push('x'),
            3 => d.reason.push('x'),
            4 => d.mode_version.push('x'),
            5 => d.policy_version.push('x'),
            6 => d.configuration_version.push('x'),
            7 => d.outcome_positive = !d.outcome_positive,
            _ => d.supersedes = match d.supersedes { Some(_) => None, None => Some(CommitmentRef::default()) },
        }
        prop_assert_ne!(commitment_hash(&d).unwrap(), h);
    }
}
