//! The `policy_definition` target: whole RegisterPolicy inputs.
//!
//! A policy descriptor comes from any registry admin and is then evaluated,
//! possibly years later, for every Commitment of every session bound to it.
//! So admission must be total (refuse with INVALID_POLICY_DEFINITION, never
//! panic) and what it admits must be safe to store and to evaluate. After
//! every input this checks:
//!
//! * a refused descriptor leaves the kernel byte-for-byte unchanged and is
//!   refused with INVALID_POLICY_DEFINITION;
//! * an admitted one has a supported schema version (1–3), a description, a
//!   JSON-object `rules`, is not `policy.default`, and under `policy.std.*`
//!   is an assigned profile;
//! * admission ignores the annotation namespace: the same rules with an
//!   `_`/`$` key added at the top level are admitted too;
//! * a `*` policy is admissible for every standard mode on its own;
//! * the registration record replays onto a fresh kernel (storage is never
//!   stricter than admission) and reaches the same state;
//! * the id cannot be registered twice;
//! * sessions of the policy's mode start under it, take a few votes, and
//!   evaluate a Commitment of each polarity; a POLICY_DENIED carries JSON
//!   details whose `denials` have known codes and match `reasons`.
//!
//! Input: a selector byte, then either a protobuf `PolicyDescriptor` (odd
//! selector) or a compact form that keeps ids, modes and versions in the
//! interesting ranges and gives the rest of the bytes to `rules` (even).

use macp_kernel::macp_wire::modes::decision::{ObjectionPayload, ProposalPayload, VotePayload};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::macp_wire::v1::{CommitmentPayload, Envelope, PolicyDescriptor, SessionStartPayload};
use macp_kernel::policy::{canonical_profile, STD_PREFIX, SUPPORTED_SCHEMA_VERSIONS};
use macp_kernel::{Effect, ErrorCode, Identity, Input, Kernel, KernelConfig, Reply};
use prost::Message as _;

/// Modes a compact input can name; the standard ones first.
pub const MODES: [&str; 8] = [
    "macp.mode.decision.v1",
    "macp.mode.proposal.v1",
    "macp.mode.task.v1",
    "macp.mode.handoff.v1",
    "macp.mode.quorum.v1",
    "*",
    "ext.multi_round.v1",
    "macp.mode.unknown.v1",
];

/// Policy ids a compact input can name: ordinary, reserved and odd ones.
pub const IDS: [&str; 7] = [
    "policy.fuzz.a",
    "policy.std.majority",
    "policy.std.supermajority",
    "policy.std.unanimous",
    "policy.std.other",
    "policy.default",
    "",
];

const ADMIN: &str = "admin";
const NOW: i64 = 1_700_000_000_000;

/// Decodes the fuzzer's bytes into a descriptor (see the module docs).
pub fn descriptor(data: &[u8]) -> Option<PolicyDescriptor> {
    let (&sel, rest) = data.split_first()?;
    if sel & 1 == 1 {
        return PolicyDescriptor::decode(rest).ok();
    }
    let (&shape, rules) = rest.split_first()?;
    Some(PolicyDescriptor {
        policy_id: IDS[usize::from(sel >> 1) % IDS.len()].to_string(),
        mode: MODES[usize::from(shape) % MODES.len()].to_string(),
        description: if shape & 0x80 == 0 { "fuzz".into() } else { String::new() },
        rules: String::from_utf8_lossy(rules).into_owned(),
        schema_version: u32::from((shape >> 3) & 0x7),
        registered_at_unix_ms: 0,
    })
}

/// The target's entry point; returns whether the input was admitted.
pub fn run(data: &[u8]) -> bool {
    descriptor(data).is_some_and(check)
}

fn register(k: &mut Kernel, d: &PolicyDescriptor) -> Result<Vec<Record>, macp_kernel::KernelError> {
    let effects =
        k.handle(NOW, Input::RegisterPolicy { request: 1, identity: Identity::new(ADMIN), descriptor: d.clone() });
    let mut records = Vec::new();
    let mut reply = None;
    for e in effects {
        match e {
            Effect::Persist(r) => records.push(r),
            Effect::Reply { reply: r, .. } => reply = Some(r),
            Effect::Broadcast(_) | Effect::Ended(_) => {}
        }
    }
    match reply.expect("RegisterPolicy gets a reply") {
        Reply::Registry(Ok(_)) => Ok(records),
        Reply::Registry(Err(e)) => {
            assert!(records.is_empty(), "a refused registration persisted a record");
            Err(e)
        }
        other => panic!("RegisterPolicy answered {other:?}"),
    }
}

/// Runs every check on one descriptor; returns whether it was admitted.
pub fn check(d: PolicyDescriptor) -> bool {
    let mut k = Kernel::new(KernelConfig::default());
    let before = k.snapshot();
    let records = match register(&mut k, &d) {
        Err(e) => {
            assert_eq!(e.code, ErrorCode::InvalidPolicyDefinition, "{e}");
            assert!(!e.message.is_empty());
            assert!(k.snapshot() == before, "a refused policy changed the kernel");
            return false;
        }
        Ok(r) => r,
    };
    assert!(SUPPORTED_SCHEMA_VERSIONS.contains(&d.schema_version), "admitted schema_version {}", d.schema_version);
    assert!(!d.description.is_empty(), "admitted without a description");
    assert_ne!(d.policy_id, "policy.default");
    if d.policy_id.starts_with(STD_PREFIX) {
        assert!(canonical_profile(&d.policy_id).is_some(), "admitted unassigned reserved id {}", d.policy_id);
    }
    let rules: serde_json::Value = if d.rules.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(&d.rules).expect("admitted rules are JSON")
    };
    assert!(rules.is_object(), "admitted non-object rules");

    // Annotations are inert at admission.
    if !d.policy_id.starts_with(STD_PREFIX) {
        let mut annotated = rules.clone();
        annotated["_fuzz"] = serde_json::json!({"note": [1, 2]});
        annotated["$comment"] = serde_json::json!("x");
        let again =
            PolicyDescriptor { policy_id: "policy.fuzz.annotated".into(), rules: annotated.to_string(), ..d.clone() };
        if let Err(e) = register(&mut k, &again) {
            panic!("adding annotation keys made admitted rules inadmissible: {e}");
        }
    }
    // A '*' policy satisfies each standard mode on its own.
    if d.mode == "*" && !d.policy_id.starts_with(STD_PREFIX) {
        for (i, m) in MODES[..5].iter().enumerate() {
            let per_mode =
                PolicyDescriptor { policy_id: format!("policy.fuzz.mode{i}"), mode: (*m).into(), ..d.clone() };
            if let Err(e) = register(&mut k, &per_mode) {
                panic!("'*' rules admitted but refused for {m}: {e}");
            }
        }
    }
    // Ids are never reused.
    let dup = register(&mut k, &d).expect_err("the same id registered twice");
    assert_eq!(dup.code, ErrorCode::InvalidPolicyDefinition);

    // The recorded registration replays onto a fresh kernel.
    let mut fresh = Kernel::new(KernelConfig::default());
    for r in &records {
        fresh.apply_record(r).unwrap_or_else(|e| panic!("an admitted registration does not replay: {e}"));
    }
    assert!(fresh.policies().get(&d.policy_id) == k.policies().get(&d.policy_id), "replay registered another policy");

    // Evaluate it.
    let modes: Vec<&str> = if d.mode == "*" { MODES[..5].to_vec() } else { vec![d.mode.as_str()] };
    for (n, mode) in modes.iter().enumerate() {
        for positive in [true, false] {
            evaluate(&mut k, &d.policy_id, mode, n * 2 + usize::from(positive), positive);
        }
    }
    let snap = k.snapshot();
    let restored = Kernel::restore(KernelConfig::default(), &snap).expect("a live checkpoint restores");
    assert!(restored.snapshot() == snap, "a restored checkpoint differs");
    true
}

fn envelope(sid: &str, mode: &str, t: &str, mid: &str, sender: &str, payload: Vec<u8>) -> Envelope {
    Envelope {
        macp_version: "1.0".into(),
        mode: mode.into(),
        message_type: t.into(),
        message_id: mid.into(),
        session_id: sid.into(),
        sender: sender.into(),
        timestamp_unix_ms: 0,
        payload,
    }
}

fn send(k: &mut Kernel, env: Envelope) -> Result<macp_kernel::Accepted, macp_kernel::KernelError> {
    let identity = Identity::new(env.sender.clone());
    let effects = k.handle(NOW, Input::Envelope { request: 7, identity, envelope: env });
    effects
        .into_iter()
        .find_map(|e| match e {
            Effect::Reply { reply: Reply::Session { result, .. }, .. } => Some(result),
            _ => None,
        })
        .expect("a session reply")
}

/// Starts a session of `mode` under the policy, feeds Decision sessions a
/// proposal, a critical objection and a split vote, and sends a Commitment.
fn evaluate(k: &mut Kernel, policy: &str, mode: &str, n: usize, positive: bool) {
    let sid = format!("00000000-0000-4000-8000-{n:012x}");
    let start = SessionStartPayload {
        participants: vec!["I".into(), "A".into(), "B".into()],
        mode_version: "1.0.0".into(),
        configuration_version: "cfg-1".into(),
        policy_version: policy.into(),
        ttl_ms: 60_000,
        ..Default::default()
    };
    let ack = send(k, envelope(&sid, mode, "SessionStart", "s", "I", start.encode_to_vec()));
    if ack.is_err() {
        return; // e.g. an extension mode's own start rules
    }
    if mode == "macp.mode.decision.v1" {
        let p = ProposalPayload { proposal_id: "p1".into(), option: "o".into(), ..Default::default() };
        let _ = send(k, envelope(&sid, mode, "Proposal", "p", "A", p.encode_to_vec()));
        let o = ObjectionPayload { proposal_id: "p1".into(), reason: "r".into(), severity: "critical".into() };
        let _ = send(k, envelope(&sid, mode, "Objection", "o", "B", o.encode_to_vec()));
        for (who, v) in [("A", "APPROVE"), ("B", "REJECT")] {
            let vote = VotePayload { proposal_id: "p1".into(), vote: v.into(), reason: String::new() };
            let _ = send(k, envelope(&sid, mode, "Vote", &format!("v{who}"), who, vote.encode_to_vec()));
        }
    }
    let c = CommitmentPayload {
        commitment_id: "c".into(),
        action: if positive { "fuzz.selected" } else { "fuzz.rejected" }.into(),
        authority_scope: "fuzz".into(),
        reason: "fuzz".into(),
        mode_version: "1.0.0".into(),
        policy_version: policy.into(),
        configuration_version: "cfg-1".into(),
        outcome_positive: positive,
        supersedes: None,
    };
    let ack = send(k, envelope(&sid, mode, "Commitment", "c", "I", c.encode_to_vec()));
    if let Some(e) = ack.err().filter(|e| e.code == macp_kernel::ErrorCode::PolicyDenied) {
        let details: serde_json::Value = serde_json::from_slice(&e.details).expect("POLICY_DENIED details are JSON");
        let reasons = details["reasons"].as_array().expect("reasons");
        let denials = details["denials"].as_array().expect("denials");
        assert!(!denials.is_empty(), "POLICY_DENIED without a denial");
        assert_eq!(reasons.len(), denials.len());
        for d in denials {
            let code = d["code"].as_str().expect("a code");
            assert!(KNOWN.contains(&code), "unknown denial code {code}");
            assert!(d["participants"].is_array());
        }
    }
}

/// The denial codes `macp-sdk-python` 0.22 knows.
const KNOWN: [&str; 15] = [
    "veto",
    "veto_hold",
    "quorum_not_met",
    "threshold_not_met",
    "confidence_below_minimum",
    "evaluation_required",
    "no_votes",
    "decline_over_approval",
    "decline_not_backed",
    "criterion_not_met",
    "output_required",
    "reassignment_not_allowed",
    "unsupported_schema_version",
    "invalid_rules",
    "unspecified",
];

#[cfg(test)]
mod tests {
    /// Every seed, and cheap deterministic mutations of each, pass the
    /// checks: the checker itself must not cry wolf before CI fuzzes it.
    #[test]
    fn seeds_and_mutations_pass() {
        let seeds = crate::seeds::policy_definition();
        assert!(seeds.len() >= 10, "{} seeds", seeds.len());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for (name, bytes) in &seeds {
            assert!(super::run(bytes), "seed {name} is not admitted");
            for _ in 0..40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut m = bytes.clone();
                let i = (x as usize) % m.len();
                m[i] = (x >> 32) as u8;
                if x & 1 == 0 {
                    m.truncate(((x >> 8) as usize) % (m.len() + 1));
                }
                let _ = super::run(&m);
            }
        }
    }
}
