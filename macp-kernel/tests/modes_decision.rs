//! `macp.mode.decision.v1`: DIGEST §9 rows 63–73 and the decision-policy
//! rows 101–106, the three decision conformance vectors, and property tests.

mod common;

use common::*;
use macp_kernel::macp_wire::modes::decision::{EvaluationPayload, ObjectionPayload, ProposalPayload, VotePayload};
use macp_kernel::macp_wire::v1::{CommitmentRef, SessionState};
use macp_kernel::macp_wire::Message;
use macp_kernel::ErrorCode;
use serde_json::json;

fn proposal(id: &str, option: &str) -> Vec<u8> {
    ProposalPayload { proposal_id: id.into(), option: option.into(), rationale: "r".into(), supporting_data: vec![] }
        .encode_to_vec()
}

fn vote(pid: &str, v: &str) -> Vec<u8> {
    VotePayload { proposal_id: pid.into(), vote: v.into(), reason: "because".into() }.encode_to_vec()
}

fn evaluation(pid: &str, rec: &str, confidence: f64) -> Vec<u8> {
    EvaluationPayload { proposal_id: pid.into(), recommendation: rec.into(), confidence, reason: "e".into() }
        .encode_to_vec()
}

fn objection(pid: &str, severity: &str) -> Vec<u8> {
    ObjectionPayload { proposal_id: pid.into(), reason: "o".into(), severity: severity.into() }.encode_to_vec()
}

fn selected() -> macp_kernel::macp_wire::v1::CommitmentPayload {
    commitment("decision.selected", true)
}

fn rejected() -> macp_kernel::macp_wire::v1::CommitmentPayload {
    commitment("decision.rejected", false)
}

/// Sends and asserts acceptance.
fn ok(h: &mut H, who: &str, sid: &str, t: &str, payload: Vec<u8>) {
    let ack = h.msg(who, sid, t, payload);
    assert!(ack.ok, "{t} from {who} rejected: {:?}", ack.error);
}

/// Sends and asserts a rejection with `expected` code.
fn rejected_with(h: &mut H, who: &str, sid: &str, t: &str, payload: Vec<u8>, expected: &str) {
    let before = h.k.snapshot();
    let ack = h.msg(who, sid, t, payload);
    assert!(!ack.ok, "{t} from {who} was accepted");
    assert_eq!(code(&ack), expected, "{t} from {who}: {:?}", ack.error);
    assert!(h.k.snapshot() == before, "a rejected {t} changed the kernel state");
}

fn commit_code(h: &mut H, who: &str, sid: &str, c: &macp_kernel::macp_wire::v1::CommitmentPayload) -> String {
    let ack = h.commit_in(DECISION, who, sid, c);
    if ack.ok {
        assert_eq!(ack.session_state, SessionState::Resolved as i32);
    }
    code(&ack).to_string()
}

/// Sends a Commitment that must be POLICY_DENIED and returns the parsed
/// error details (`{"reasons": [...], "denials": [...]}`), checking that the
/// denial left the kernel untouched.
fn commit_err(h: &mut H, who: &str, sid: &str, c: &macp_kernel::macp_wire::v1::CommitmentPayload) -> serde_json::Value {
    let before = h.k.snapshot();
    let ack = h.commit_in(DECISION, who, sid, c);
    assert_eq!(code(&ack), "POLICY_DENIED", "{:?}", ack.error);
    assert!(h.k.snapshot() == before, "a denied commitment changes nothing");
    let details: serde_json::Value = serde_json::from_slice(&ack.error.unwrap().details).expect("details are JSON");
    let reasons = details["reasons"].as_array().expect("reasons");
    let denials = details["denials"].as_array().expect("denials");
    assert_eq!(reasons.len(), denials.len(), "one reason per denial: {details}");
    for (r, d) in reasons.iter().zip(denials) {
        assert_eq!(r, &d["message"], "reasons repeat the denial messages");
    }
    details
}

/// The denial codes of [`commit_err`] details, in order.
fn denial_codes(details: &serde_json::Value) -> Vec<&str> {
    details["denials"].as_array().unwrap().iter().map(|d| d["code"].as_str().unwrap()).collect()
}

/// A default session ([I, A, B], policy.default) with proposal p1 from I.
fn with_p1(h: &mut H) -> String {
    let sid = h.start_default();
    ok(h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    sid
}

/// Registers a decision policy and starts an [I, A, B] session bound to it.
fn policy_session(h: &mut H, id: &str, rules: serde_json::Value) -> String {
    h.register_policy(id, DECISION, 2, &rules.to_string()).expect("policy registers");
    h.start_ok(DECISION, "I", &["I", "A", "B"], id)
}

// ----- §9 rows 63–73 -----------------------------------------------------------

#[test]
fn row_63_only_declared_participants_send_decision_messages() {
    let mut h = H::new();
    let sid = h.start_default();
    rejected_with(&mut h, "X", &sid, "Proposal", proposal("p1", "deploy"), "FORBIDDEN");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1", "deploy"));
    rejected_with(&mut h, "X", &sid, "Evaluation", evaluation("p1", "APPROVE", 0.9), "FORBIDDEN");
    rejected_with(&mut h, "X", &sid, "Objection", objection("p1", "low"), "FORBIDDEN");
    rejected_with(&mut h, "X", &sid, "Vote", vote("p1", "APPROVE"), "FORBIDDEN");
    // An undefined message type fails authorization in Decision (DIGEST §3.0).
    rejected_with(&mut h, "A", &sid, "Contribute", vec![], "FORBIDDEN");

    // An initiator who is not listed may commit but not propose (RFC §2).
    let sid = h.start_ok(DECISION, "I", &["A", "B"], "");
    rejected_with(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"), "FORBIDDEN");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");
    h.assert_replay_matches();
}

#[test]
fn row_64_commitment_only_from_the_authority() {
    let mut h = H::new();
    let sid = with_p1(&mut h);
    assert_eq!(commit_code(&mut h, "A", &sid, &selected()), "FORBIDDEN");
    assert_eq!(commit_code(&mut h, "X", &sid, &selected()), "FORBIDDEN");
    assert_eq!(h.state(&sid), SessionState::Open);
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");
    assert_eq!(h.state(&sid), SessionState::Resolved);
}

#[test]
fn row_65_duplicate_proposal_id_rejected() {
    let mut h = H::new();
    let sid = with_p1(&mut h);
    rejected_with(&mut h, "A", &sid, "Proposal", proposal("p1", "other"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "Proposal", proposal("  ", "x"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "Proposal", proposal("p2", " "), "INVALID_ENVELOPE");
    ok(&mut h, "A", &sid, "Proposal", proposal("p2", "other"));
    assert_eq!(h.projection(&sid)["proposals"].as_object().unwrap().len(), 2);
}

#[test]
fn row_66_references_must_exist() {
    let mut h = H::new();
    let sid = with_p1(&mut h);
    rejected_with(&mut h, "A", &sid, "Evaluation", evaluation("p9", "APPROVE", 0.5), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "Objection", objection("p9", "high"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "Vote", vote("p9", "APPROVE"), "INVALID_ENVELOPE");
    ok(&mut h, "A", &sid, "Evaluation", evaluation("p1", "APPROVE", 0.5));
    ok(&mut h, "A", &sid, "Objection", objection("p1", "high"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
}

#[test]
fn row_67_one_vote_per_participant_per_proposal() {
    let mut h = H::new();
    let sid = with_p1(&mut h);
    ok(&mut h, "A", &sid, "Proposal", proposal("p2", "other"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    rejected_with(&mut h, "A", &sid, "Vote", vote("p1", "REJECT"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"), "INVALID_ENVELOPE");
    ok(&mut h, "A", &sid, "Vote", vote("p2", "REJECT"));
    ok(&mut h, "B", &sid, "Vote", vote("p1", "REJECT"));
    let p = h.projection(&sid);
    assert_eq!(p["votes"]["p1"]["A"]["vote"], "APPROVE");
    assert_eq!(p["votes"]["p1"]["B"]["vote"], "REJECT");
    assert_eq!(p["votes"]["p2"]["A"]["vote"], "REJECT");
}

#[test]
fn row_68_no_resolution_without_a_proposal() {
    let mut h = H::new();
    let sid = h.start_default();
    let before = h.k.snapshot();
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "INVALID_ENVELOPE");
    assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), "INVALID_ENVELOPE");
    assert!(h.k.snapshot() == before);
    ok(&mut h, "B", &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), "", "policy.default takes the outcome at face value");
}

#[test]
fn row_69_enumerated_values_are_case_sensitive() {
    let mut h = H::new();
    let sid = with_p1(&mut h);
    for bad in ["GOOD", "approve", "Approve", "", "APPROVE "] {
        rejected_with(&mut h, "A", &sid, "Evaluation", evaluation("p1", bad, 0.5), "INVALID_ENVELOPE");
    }
    for c in [-0.01, 1.01, f64::NAN, f64::INFINITY] {
        rejected_with(&mut h, "A", &sid, "Evaluation", evaluation("p1", "APPROVE", c), "INVALID_ENVELOPE");
    }
    for good in ["APPROVE", "REVIEW", "BLOCK", "REJECT"] {
        ok(&mut h, "A", &sid, "Evaluation", evaluation("p1", good, 1.0));
    }
    // Severity is required and lowercase (decision.proto 0.1.13: "any other
    // value, including the empty string, is rejected").
    for bad in ["CRITICAL", "Critical", "severe", ""] {
        rejected_with(&mut h, "A", &sid, "Objection", objection("p1", bad), "INVALID_ENVELOPE");
    }
    for good in ["low", "medium", "high", "critical"] {
        ok(&mut h, "B", &sid, "Objection", objection("p1", good));
    }
    assert_eq!(h.projection(&sid)["objections"][3]["severity"], "critical");
    for bad in ["MAYBE", "approve", "Reject", ""] {
        rejected_with(&mut h, "A", &sid, "Vote", vote("p1", bad), "INVALID_ENVELOPE");
    }
    ok(&mut h, "A", &sid, "Vote", vote("p1", "ABSTAIN"));
    // Undecodable payloads are INVALID_ENVELOPE too.
    rejected_with(&mut h, "B", &sid, "Vote", vec![0xff, 0xff], "INVALID_ENVELOPE");
}

#[test]
fn row_70_phase_gating() {
    let mut h = H::new();
    let sid = h.start_default();
    assert_eq!(h.projection(&sid)["phase"], "Proposal");
    // Nothing can reference a proposal before there is one.
    rejected_with(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "Evaluation", evaluation("p1", "APPROVE", 0.5), "INVALID_ENVELOPE");
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(h.projection(&sid)["phase"], "Evaluation");
    ok(&mut h, "B", &sid, "Evaluation", evaluation("p1", "APPROVE", 0.7));
    ok(&mut h, "A", &sid, "Proposal", proposal("p2", "other"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    assert_eq!(h.projection(&sid)["phase"], "Voting");
    // decision_reject_paths: a late Evaluation is refused (wrong phase).
    rejected_with(&mut h, "B", &sid, "Evaluation", evaluation("p1", "APPROVE", 0.7), "INVALID_ENVELOPE");
    rejected_with(&mut h, "B", &sid, "Objection", objection("p1", "critical"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "B", &sid, "Proposal", proposal("p3", "late"), "INVALID_ENVELOPE");
    ok(&mut h, "B", &sid, "Vote", vote("p2", "REJECT"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");
    assert_eq!(h.projection(&sid)["phase"], "Committed");
    h.assert_replay_matches();
}

#[test]
fn row_71_commitment_carries_the_bound_versions() {
    let mut h = H::new();
    let sid = with_p1(&mut h);
    let mut c = selected();
    c.mode_version = "2.0.0".into();
    assert_eq!(commit_code(&mut h, "I", &sid, &c), "INVALID_ENVELOPE");
    let mut c = selected();
    c.configuration_version = "cfg-2".into();
    assert_eq!(commit_code(&mut h, "I", &sid, &c), "INVALID_ENVELOPE");
    let mut c = selected();
    c.policy_version = "policy.other".into();
    assert_eq!(commit_code(&mut h, "I", &sid, &c), "INVALID_ENVELOPE");
    let mut c = selected();
    c.policy_version = "policy.default".into();
    assert_eq!(commit_code(&mut h, "I", &sid, &c), "");
}

#[test]
fn row_72_outcome_positive_matches_the_action() {
    let mut h = H::new();
    let sid = with_p1(&mut h);
    assert_eq!(commit_code(&mut h, "I", &sid, &commitment("decision.selected", false)), "INVALID_ENVELOPE");
    assert_eq!(commit_code(&mut h, "I", &sid, &commitment("decision.rejected", true)), "INVALID_ENVELOPE");
    assert_eq!(commit_code(&mut h, "I", &sid, &commitment("decision.approved", true)), "");
}

#[test]
fn row_73_malformed_supersedes_rejected() {
    let mut h = H::new();
    let sid = with_p1(&mut h);
    let mut c = selected();
    let good_hash = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let other = "00000000-0000-4000-8000-ffffffffffff".to_string();
    c.supersedes = Some(CommitmentRef { session_id: String::new(), commitment_hash: good_hash.clone() });
    assert_eq!(commit_code(&mut h, "I", &sid, &c), "INVALID_ENVELOPE", "empty session_id");
    // RFC-MACP-0013 §9: the hash must be canonical, ^sha256:[0-9a-f]{64}$.
    for bad in [
        "h".to_string(),
        "not-a-valid-hash".to_string(),
        good_hash.to_uppercase(),
        good_hash.replace("sha256:", "SHA256:"),
        good_hash[..good_hash.len() - 1].to_string(),
        format!("{good_hash}0"),
        good_hash.trim_start_matches("sha256:").to_string(),
        good_hash.replace('a', "g"),
    ] {
        c.supersedes = Some(CommitmentRef { session_id: other.clone(), commitment_hash: bad.clone() });
        let ack = h.commit_in(DECISION, "I", &sid, &c);
        assert_eq!(code(&ack), "INVALID_ENVELOPE", "{bad}");
        assert!(ack.error.unwrap().message.contains("sha256:"), "the message says what shape is expected");
    }
    c.supersedes = Some(CommitmentRef { session_id: other, commitment_hash: good_hash });
    assert_eq!(commit_code(&mut h, "I", &sid, &c), "", "a well-formed reference to an unknown session is fine");
}

// ----- conformance vectors -------------------------------------------------------

const ORCH: &str = "agent://orchestrator";
const AA: &str = "agent://a";
const AB: &str = "agent://b";

#[test]
fn vector_decision_happy_path() {
    let mut h = H::new();
    let sid = h.start_ok(DECISION, ORCH, &[ORCH, AA, AB], "");
    ok(&mut h, ORCH, &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, AA, &sid, "Vote", vote("p1", "APPROVE"));
    let mut c = selected();
    c.reason = "done".into();
    assert_eq!(commit_code(&mut h, ORCH, &sid, &c), "");
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_subset(
        &h.projection(&sid),
        &json!({
            "phase": "Committed",
            "proposals": {"p1": {"proposal_id": "p1", "sender": ORCH}},
            "votes": {"p1": {AA: {"vote": "APPROVE"}}}
        }),
    );
    h.assert_replay_matches();
}

#[test]
fn vector_decision_reject_paths() {
    let mut h = H::new();
    let sid = h.start_ok(DECISION, ORCH, &[ORCH, AA, AB], "");
    rejected_with(&mut h, "agent://outsider", &sid, "Proposal", proposal("p1", "deploy"), "FORBIDDEN");
    ok(&mut h, ORCH, &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(commit_code(&mut h, AA, &sid, &selected()), "FORBIDDEN");
    ok(&mut h, AA, &sid, "Vote", vote("p1", "APPROVE"));
    rejected_with(&mut h, AB, &sid, "Evaluation", evaluation("p1", "approve", 0.7), "INVALID_ENVELOPE");
    assert_eq!(h.state(&sid), SessionState::Open);
    assert!(h.k.resolution(&sid).is_none());
    assert_subset(&h.projection(&sid), &json!({"phase": "Voting", "votes": {"p1": {AA: {"vote": "APPROVE"}}}}));
    h.assert_replay_matches();
}

// ----- rows 101–106 (decision policies) --------------------------------------------

#[test]
fn row_103_decision_rules_are_validated_at_admission() {
    // RFC-MACP-0012 §4.1 as of 1.5.0: every floor, closed objects,
    // annotations, and no unimplemented vendor extension.
    let mut h = H::new();
    let bad = [
        (r#"{"voting":{"algorithm":"weighted"}}"#, "needs a voting.weights map"),
        (r#"{"voting":{"algorithm":"weighted","weights":{}}}"#, "must not be empty"),
        (r#"{"voting":{"weights":{"A":0}}}"#, "must be a number > 0"),
        (r#"{"voting":{"weights":{"A":-1}}}"#, "must be a number > 0"),
        (r#"{"voting":{"algorithm":"majority","threshold":"x"}}"#, "decision schema"),
        (r#"{"voting":{"threshold":1.2}}"#, "greater than 0 and at most 1"),
        (r#"{"voting":{"algorithm":"unanimous","threshold":0}}"#, "greater than 0"),
        (r#"{"voting":{"algorithm":"majority","threshold":0.4}}"#, "no majority"),
        (r#"{"voting":{"algorithm":"supermajority","threshold":0.5}}"#, "above 0.5"),
        (r#"{"voting":{"algorithm":"supermajority"}}"#, "needs an explicit voting.threshold"),
        (r#"{"voting":{"algorithm":"coin_flip"}}"#, "is not one of"),
        (r#"{"voting":{"algorithm":"MAJORITY"}}"#, "is not one of"),
        (r#"{"voting":{"quorum":{"type":"percentage","value":150}}}"#, "must not exceed 100"),
        (r#"{"voting":{"quorum":{"type":"seats","value":1}}}"#, "is not one of count, percentage"),
        (r#"{"objection_handling":{"veto_threshold":0}}"#, "at least 1"),
        (r#"{"objection_handling":{"veto_threshhold":3}}"#, "veto_threshhold is not defined"),
        (r#"{"objection_handling":{"critical_objection_action":"ignore"}}"#, "is not one of"),
        (r#"{"evaluation":{"minimum_confidence":2}}"#, "[0, 1]"),
        (r#"{"evaluation":{"required_before_voting":"yes"}}"#, "decision schema"),
        (r#"{"commitment":{"allow_decline_over_approval":1}}"#, "decision schema"),
        (r#"{"commitment":{"authority":"designated_role"}}"#, "designated_roles"),
        (r#"{"commitment":{"authority":"designated_role","designated_roles":[]}}"#, "designated_roles"),
        (r#"{"acceptance":{"criterion":"counterparty"}}"#, "rules.acceptance is not defined by the decision"),
        (r#"{"x-com.example.audit":{"on":true}}"#, "vendor extension"),
        (r#"{"voting":{"algorithm":"majority","x-acme.k":1}}"#, "vendor extension"),
        (r#"{"voting":5}"#, "must be an object"),
        (r#"[1,2]"#, "JSON object"),
    ];
    for (i, (rules, why)) in bad.iter().enumerate() {
        for version in [1, 2, 3] {
            let err =
                h.register_policy(&format!("policy.bad.d{i}v{version}"), DECISION, version, rules).expect_err(rules);
            assert_eq!(err.code, ErrorCode::InvalidPolicyDefinition, "{rules}");
            assert!(err.message.contains(why), "{rules}: {:?} should say {why:?}", err.message);
        }
        // Mode-agnostic policies must satisfy every mode's schema.
        let err = h.register_policy(&format!("policy.bad.s{i}"), "*", 1, rules).expect_err(rules);
        assert_eq!(err.code, ErrorCode::InvalidPolicyDefinition, "{rules}");
    }
    let good = [
        r#"{}"#,
        r#"{"voting":{"algorithm":"weighted","weights":{"A":2.5,"_B":1},"threshold":0.6}}"#,
        r#"{"voting":{"algorithm":"supermajority","threshold":0.67,"quorum":{"type":"count","value":2}}}"#,
        r#"{"voting":{"algorithm":"unanimous"},"commitment":{"require_vote_quorum":true}}"#,
        r#"{"objection_handling":{"critical_severity_vetoes":true,"veto_threshold":2,"critical_objection_action":"hold"}}"#,
        r#"{"_note":"annotations anywhere","$comment":1,"voting":{"_why":"x","algorithm":"plurality"},
            "commitment":{"$ref":"audit","authority":"designated_role","designated_roles":["A"]}}"#,
        // What macp-sdk-python 0.22's build_decision_policy writes by default.
        r#"{"voting":{"algorithm":"none","threshold":0.5},"objection_handling":{"critical_severity_vetoes":false,
            "veto_threshold":1,"critical_objection_action":"deny"},"evaluation":{"minimum_confidence":0.0,
            "required_before_voting":false},"commitment":{"authority":"initiator_only","designated_roles":[],
            "require_vote_quorum":false,"allow_decline_over_approval":false}}"#,
    ];
    for (i, rules) in good.iter().enumerate() {
        for version in [1, 2, 3] {
            h.register_policy(&format!("policy.good.d{i}v{version}"), DECISION, version, rules).expect(rules);
        }
    }
    // A '*' policy may carry only what every mode defines.
    h.register_policy("policy.good.any", "*", 3, r#"{"commitment":{"authority":"any_participant"},"_n":1}"#)
        .expect("shared sections only");
    h.assert_replay_matches();
}

#[test]
fn row_104_decision_negative_outcome_vector() {
    let mut h = H::new();
    let pid = "policy.decision.majority-decline";
    h.register_policy(
        pid,
        DECISION,
        2,
        r#"{"voting":{"algorithm":"majority"},"commitment":{"authority":"initiator_only"}}"#,
    )
    .unwrap();
    let sid = h.start_ok(DECISION, ORCH, &[ORCH, AA, AB], pid);
    ok(&mut h, ORCH, &sid, "Proposal", proposal("p1", "deploy"));
    let mut c = rejected();
    c.policy_version = pid.into();
    let before = h.k.snapshot();
    let ack = h.commit_in(DECISION, ORCH, &sid, &c);
    assert_eq!(code(&ack), "POLICY_DENIED");
    let details: serde_json::Value = serde_json::from_slice(&ack.error.as_ref().unwrap().details).unwrap();
    assert!(!details["reasons"].as_array().unwrap().is_empty());
    assert!(h.k.snapshot() == before, "a denied commitment changes nothing");
    ok(&mut h, AA, &sid, "Vote", vote("p1", "REJECT"));
    ok(&mut h, AB, &sid, "Vote", vote("p1", "REJECT"));
    assert_eq!(commit_code(&mut h, ORCH, &sid, &c), "");
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_subset(
        &h.projection(&sid),
        &json!({
            "phase": "Committed",
            "proposals": {"p1": {"proposal_id": "p1", "sender": ORCH}},
            "votes": {"p1": {AA: {"vote": "REJECT"}, AB: {"vote": "REJECT"}}}
        }),
    );
    h.assert_replay_matches();
}

#[test]
fn row_105_policy_is_frozen_for_the_session() {
    let mut h = H::new();
    let sid = policy_session(&mut h, "policy.frozen", json!({"voting": {"algorithm": "unanimous"}}));
    h.unregister_policy("policy.frozen").unwrap();
    let (_, ack) = h.start_session(DECISION, "I", &["I", "A", "B"], "policy.frozen");
    assert_eq!(code(&ack), "UNKNOWN_POLICY_VERSION");
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    ok(&mut h, "B", &sid, "Vote", vote("p1", "REJECT"));
    // Still evaluated under the unregistered policy: one REJECT fails unanimity.
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "POLICY_DENIED");
    assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), "");
    h.assert_replay_matches();
}

#[test]
fn row_106_commitment_authority_follows_the_policy() {
    let mut h = H::new();
    let sid = policy_session(&mut h, "policy.any", json!({"commitment": {"authority": "any_participant"}}));
    ok(&mut h, "B", &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(commit_code(&mut h, "X", &sid, &selected()), "FORBIDDEN");
    assert_eq!(commit_code(&mut h, "A", &sid, &selected()), "");

    let sid = policy_session(
        &mut h,
        "policy.designated",
        json!({"commitment": {"authority": "designated_role", "designated_roles": ["agent://x"]}}),
    );
    ok(&mut h, "A", &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "FORBIDDEN");
    assert_eq!(commit_code(&mut h, "A", &sid, &selected()), "FORBIDDEN");
    assert_eq!(commit_code(&mut h, "agent://x", &sid, &selected()), "");
    h.assert_replay_matches();
}

// ----- policy evaluation in detail (DIGEST §6.3) -------------------------------------

#[test]
fn majority_is_inclusive_and_plurality_is_strict() {
    // DECISIONS 12 (current RFC-MACP-0012 §4.1): an even split is a majority
    // (ratio >= 0.5); "strictly more" is plurality.
    let mut h = H::new();
    let sid = policy_session(&mut h, "policy.majority", json!({"voting": {"algorithm": "majority"}}));
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    ok(&mut h, "B", &sid, "Vote", vote("p1", "REJECT"));
    ok(&mut h, "I", &sid, "Vote", vote("p1", "ABSTAIN"));
    // The vote passed, so a decline needs allow_decline_over_approval.
    let e = commit_err(&mut h, "I", &sid, &rejected());
    assert_eq!(denial_codes(&e), vec!["decline_over_approval"]);
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");

    let sid = policy_session(&mut h, "policy.plurality", json!({"voting": {"algorithm": "plurality"}}));
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    ok(&mut h, "B", &sid, "Vote", vote("p1", "REJECT"));
    let e = commit_err(&mut h, "I", &sid, &selected());
    assert_eq!(denial_codes(&e), vec!["threshold_not_met"]);
    assert_eq!(e["denials"][0]["participants"], json!(["B"]), "the rejecter is named");
    // The vote failed and there is a REJECT, so the decline guard is met.
    assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), "");
}

#[test]
fn passed_vote_denies_decline_unless_allowed() {
    let mut h = H::new();
    for (id, allow) in [("policy.p1", false), ("policy.p2", true)] {
        let sid = policy_session(
            &mut h,
            id,
            json!({"voting": {"algorithm": "majority"}, "commitment": {"allow_decline_over_approval": allow}}),
        );
        ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
        ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
        ok(&mut h, "I", &sid, "Vote", vote("p1", "APPROVE"));
        ok(&mut h, "B", &sid, "Vote", vote("p1", "REJECT"));
        let expected = if allow { "" } else { "POLICY_DENIED" };
        assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), expected, "allow_decline_over_approval={allow}");
        if !allow {
            assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");
        }
    }
    // Even when allowed, the decline guard needs an explicit REJECT.
    let sid = policy_session(
        &mut h,
        "policy.p3",
        json!({"voting": {"algorithm": "majority"}, "commitment": {"allow_decline_over_approval": true}}),
    );
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), "POLICY_DENIED");
}

#[test]
fn no_votes_allows_positive_unless_quorum_required() {
    let mut h = H::new();
    let sid = policy_session(&mut h, "policy.nv1", json!({"voting": {"algorithm": "plurality"}}));
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), "POLICY_DENIED");
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");

    let sid = policy_session(
        &mut h,
        "policy.nv2",
        json!({"voting": {"algorithm": "plurality"}, "commitment": {"require_vote_quorum": true}}),
    );
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "POLICY_DENIED");
}

#[test]
fn vote_quorum_count_and_percentage() {
    let mut h = H::new();
    let sid = policy_session(
        &mut h,
        "policy.q1",
        json!({"voting": {"quorum": {"type": "count", "value": 2}}, "commitment": {"require_vote_quorum": true}}),
    );
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Proposal", proposal("p2", "other"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    ok(&mut h, "A", &sid, "Vote", vote("p2", "APPROVE"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "POLICY_DENIED", "one unique voter only");
    ok(&mut h, "B", &sid, "Vote", vote("p1", "ABSTAIN"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "", "abstainers count toward the quorum");

    let sid = policy_session(
        &mut h,
        "policy.q2",
        json!({"voting": {"quorum": {"type": "percentage", "value": 66}}, "commitment": {"require_vote_quorum": true}}),
    );
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "POLICY_DENIED", "1 of 3 is 33 %");
    ok(&mut h, "B", &sid, "Vote", vote("p1", "APPROVE"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");
}

#[test]
fn critical_objection_veto_actions() {
    let mut h = H::new();
    for (id, action, positive, negative) in [
        ("policy.v1", "deny", "POLICY_DENIED", "POLICY_DENIED"),
        ("policy.v2", "hold", "POLICY_DENIED", "POLICY_DENIED"),
        ("policy.v3", "finalize_decline", "POLICY_DENIED", ""),
    ] {
        let sid = policy_session(
            &mut h,
            id,
            json!({
                "voting": {"algorithm": "majority"},
                "objection_handling": {"critical_severity_vetoes": true, "critical_objection_action": action}
            }),
        );
        ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
        ok(&mut h, "A", &sid, "Objection", objection("p1", "critical"));
        ok(&mut h, "B", &sid, "Vote", vote("p1", "APPROVE"));
        assert_eq!(commit_code(&mut h, "I", &sid, &selected()), positive, "{action}: positive");
        // finalize_decline authorises the decline without any REJECT vote.
        assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), negative, "{action}: negative");
        assert_eq!(h.state(&sid) == SessionState::Resolved, negative.is_empty());
    }
    // Below veto_threshold, and BLOCK evaluations, never veto.
    let sid = policy_session(
        &mut h,
        "policy.v4",
        json!({"objection_handling": {"critical_severity_vetoes": true, "veto_threshold": 2}}),
    );
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Objection", objection("p1", "critical"));
    ok(&mut h, "B", &sid, "Objection", objection("p1", "high"));
    ok(&mut h, "B", &sid, "Evaluation", evaluation("p1", "BLOCK", 1.0));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");
}

#[test]
fn evaluations_required_before_voting() {
    let mut h = H::new();
    let sid = policy_session(
        &mut h,
        "policy.e1",
        json!({"evaluation": {"required_before_voting": true, "minimum_confidence": 0.8}}),
    );
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "POLICY_DENIED");
    ok(&mut h, "A", &sid, "Evaluation", evaluation("p1", "REVIEW", 1.0));
    ok(&mut h, "B", &sid, "Evaluation", evaluation("p1", "APPROVE", 0.5));
    assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), "POLICY_DENIED", "applies to both outcomes");
    ok(&mut h, "B", &sid, "Evaluation", evaluation("p1", "REJECT", 0.8));
    assert_eq!(commit_code(&mut h, "I", &sid, &rejected()), "");
}

#[test]
fn weighted_supermajority_and_unanimous() {
    let mut h = H::new();
    let sid = policy_session(
        &mut h,
        "policy.w",
        json!({"voting": {"algorithm": "weighted", "weights": {"A": 3, "B": 1}, "threshold": 0.75}}),
    );
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    ok(&mut h, "B", &sid, "Vote", vote("p1", "REJECT"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "", "3 of 4 weight is exactly 0.75");

    // policy.std.supermajority's binary64 two thirds: 2 of 3 passes.
    let sid = policy_session(
        &mut h,
        "policy.s",
        json!({"voting": {"algorithm": "supermajority", "threshold": 0.6666666666666666}}),
    );
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    ok(&mut h, "B", &sid, "Vote", vote("p1", "REJECT"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "POLICY_DENIED");
    ok(&mut h, "I", &sid, "Vote", vote("p1", "APPROVE"));
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "", "2 of 3 reaches 0.6666666666666666");

    // Unanimous: every declared participant must approve; an abstainer or a
    // non-voter blocks it.
    let sid = policy_session(&mut h, "policy.u", json!({"voting": {"algorithm": "unanimous"}}));
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    ok(&mut h, "B", &sid, "Vote", vote("p1", "ABSTAIN"));
    let e = commit_err(&mut h, "I", &sid, &selected());
    assert_eq!(denial_codes(&e), vec!["threshold_not_met"]);
    assert_eq!(e["denials"][0]["participants"], json!(["B", "I"]), "those who did not approve");
    let sid = policy_session(&mut h, "policy.u2", json!({"voting": {"algorithm": "unanimous"}}));
    ok(&mut h, "I", &sid, "Proposal", proposal("p1", "deploy"));
    for who in ["I", "A", "B"] {
        ok(&mut h, who, &sid, "Vote", vote("p1", "APPROVE"));
    }
    assert_eq!(commit_code(&mut h, "I", &sid, &selected()), "");
    h.assert_replay_matches();
}

#[test]
fn descriptor_and_projection_shape() {
    let h = H::new();
    let d = h.k.modes().standards_track().into_iter().find(|d| d.mode == DECISION).expect("decision is listed");
    assert_eq!(d.mode_version, "1.0.0");
    assert_eq!(d.message_types, ["SessionStart", "Proposal", "Evaluation", "Objection", "Vote", "Commitment"]);
    assert_eq!(d.terminal_message_types, ["Commitment"]);
    assert_eq!(d.participant_model, "declared");
    assert_eq!(d.determinism_class, "semantic-deterministic");
    assert_eq!(d.schema_uris["protobuf"], "buf.build/multiagentcoordinationprotocol/macp");

    let mut h = H::new();
    let sid = with_p1(&mut h);
    ok(&mut h, "A", &sid, "Evaluation", evaluation("p1", "APPROVE", 0.25));
    ok(&mut h, "B", &sid, "Objection", objection("p1", "low"));
    ok(&mut h, "A", &sid, "Vote", vote("p1", "APPROVE"));
    assert_eq!(
        h.projection(&sid),
        json!({
            "phase": "Voting",
            "proposals": {"p1": {"proposal_id": "p1", "option": "deploy", "rationale": "r", "sender": "I"}},
            "votes": {"p1": {"A": {"vote": "APPROVE", "reason": "because"}}},
            "evaluations": [{"proposal_id": "p1", "recommendation": "APPROVE", "confidence": 0.25, "reason": "e", "sender": "A"}],
            "objections": [{"proposal_id": "p1", "reason": "o", "severity": "low", "sender": "B"}],
        })
    );
}

// ----- properties ------------------------------------------------------------------

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Proposal(u8, bool),
        Evaluation(u8, &'static str, f64),
        Objection(u8, &'static str),
        Vote(u8, &'static str),
        Garbage(&'static str, Vec<u8>),
        Commit(bool),
    }

    const SENDERS: [&str; 4] = ["I", "A", "B", "X"];
    const POLICIES: [(&str, &str); 4] = [
        ("", ""),
        ("policy.prop.majority", r#"{"voting":{"algorithm":"majority"}}"#),
        (
            "policy.prop.veto",
            r#"{"voting":{"algorithm":"plurality"},"objection_handling":{"critical_severity_vetoes":true,"critical_objection_action":"finalize_decline"}}"#,
        ),
        (
            "policy.prop.quorum",
            r#"{"voting":{"algorithm":"unanimous","quorum":{"type":"count","value":2}},"commitment":{"require_vote_quorum":true,"authority":"any_participant"},"evaluation":{"required_before_voting":true}}"#,
        ),
    ];

    fn step() -> impl Strategy<Value = Step> {
        let pid = 0u8..3;
        prop_oneof![
            3 => (pid.clone(), any::<bool>()).prop_map(|(p, empty)| Step::Proposal(p, empty)),
            2 => (pid.clone(), prop::sample::select(vec!["APPROVE", "REVIEW", "BLOCK", "REJECT", "approve", "GOOD"]),
                  prop::sample::select(vec![0.0, 0.5, 0.9, 1.0, -0.1, 1.5]))
                .prop_map(|(p, r, c)| Step::Evaluation(p, r, c)),
            2 => (pid.clone(), prop::sample::select(vec!["", "low", "critical", "CRITICAL", "nope"]))
                .prop_map(|(p, s)| Step::Objection(p, s)),
            4 => (pid, prop::sample::select(vec!["APPROVE", "REJECT", "ABSTAIN", "maybe"]))
                .prop_map(|(p, v)| Step::Vote(p, v)),
            1 => (prop::sample::select(vec!["Proposal", "Vote", "Evaluation", "Foo"]),
                  prop::collection::vec(any::<u8>(), 0..12))
                .prop_map(|(t, b)| Step::Garbage(t, b)),
            2 => any::<bool>().prop_map(Step::Commit),
        ]
    }

    fn pid(p: u8) -> String {
        format!("p{p}")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn random_sessions_are_safe_and_replayable(
            policy in 0usize..POLICIES.len(),
            schema_version in 1u32..=3,
            steps in prop::collection::vec((0usize..SENDERS.len(), step()), 1..40),
        ) {
            let mut h = H::new();
            let (policy_id, rules) = POLICIES[policy];
            if !policy_id.is_empty() {
                h.register_policy(policy_id, DECISION, schema_version, rules).unwrap();
            }
            let sid = h.start_ok(DECISION, "I", &["I", "A", "B"], policy_id);
            let mut resolved = false;
            for (who, s) in steps {
                let who = SENDERS[who];
                let before = h.k.snapshot();
                let had_proposal = !h.projection(&sid)["proposals"].as_object().unwrap().is_empty();
                let (is_commit, ack) = match s {
                    Step::Proposal(p, empty) => {
                        (false, h.msg(who, &sid, "Proposal", proposal(&pid(p), if empty { "" } else { "opt" })))
                    }
                    Step::Evaluation(p, r, c) => (false, h.msg(who, &sid, "Evaluation", evaluation(&pid(p), r, c))),
                    Step::Objection(p, sev) => (false, h.msg(who, &sid, "Objection", objection(&pid(p), sev))),
                    Step::Vote(p, v) => (false, h.msg(who, &sid, "Vote", vote(&pid(p), v))),
                    Step::Garbage(t, b) => (false, h.msg(who, &sid, t, b)),
                    Step::Commit(positive) => {
                        let mut c = if positive { selected() } else { rejected() };
                        c.policy_version = policy_id.into();
                        (true, h.commit_in(DECISION, who, &sid, &c))
                    }
                };
                if resolved {
                    prop_assert!(!ack.ok, "accepted after RESOLVED");
                    prop_assert_eq!(code(&ack), "SESSION_NOT_OPEN");
                }
                if ack.ok {
                    prop_assert!(!ack.duplicate);
                    if is_commit {
                        prop_assert!(had_proposal, "a Commitment resolved a session without a proposal");
                        prop_assert_eq!(ack.session_state, SessionState::Resolved as i32);
                        prop_assert_eq!(&h.projection(&sid)["phase"], "Committed");
                        resolved = true;
                    } else {
                        prop_assert!(who != "X", "an outsider's message was accepted");
                    }
                } else {
                    prop_assert!(h.k.snapshot() == before, "a rejected message changed the state");
                }
            }
            prop_assert_eq!(h.state(&sid) == SessionState::Resolved, resolved);
            h.assert_replay_matches();
        }
    }
}
