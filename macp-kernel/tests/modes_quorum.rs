//! Quorum mode (`macp.mode.quorum.v1`): DIGEST §3.5, §6.3 and checklist
//! rows 96–100.

mod common;

use std::collections::BTreeMap;

use common::*;
use macp_kernel::macp_wire::modes::quorum::{AbstainPayload, ApprovalRequestPayload, ApprovePayload, RejectPayload};
use macp_kernel::macp_wire::v1::{Ack, SessionState};
use macp_kernel::macp_wire::Message;
use proptest::prelude::*;
use serde_json::json;

const QUORUM: &str = "macp.mode.quorum.v1";

fn request(id: &str, required: u32) -> Vec<u8> {
    ApprovalRequestPayload {
        request_id: id.into(),
        action: "deploy".into(),
        summary: "Deploy v2".into(),
        details: Vec::new(),
        required_approvals: required,
    }
    .encode_to_vec()
}

fn approve(id: &str) -> Vec<u8> {
    ApprovePayload { request_id: id.into(), reason: "lgtm".into() }.encode_to_vec()
}

fn reject(id: &str) -> Vec<u8> {
    RejectPayload { request_id: id.into(), reason: "no".into() }.encode_to_vec()
}

fn abstain(id: &str) -> Vec<u8> {
    AbstainPayload { request_id: id.into(), reason: "conflict".into() }.encode_to_vec()
}

fn ballot(kind: &str, id: &str) -> Vec<u8> {
    match kind {
        "Approve" => approve(id),
        "Reject" => reject(id),
        _ => abstain(id),
    }
}

/// Coordinator `C` (listed) with voters A, B, D: four participants.
fn start(h: &mut H, policy: &str) -> String {
    h.start_mode(QUORUM, "C", &["C", "A", "B", "D"], policy)
}

fn ok(a: &Ack) {
    assert!(a.ok && !a.duplicate, "expected accept, got {:?}", a.error);
}

fn rejected(a: &Ack, expected: &str) {
    assert!(!a.ok, "expected {expected}, but it was accepted");
    assert_eq!(code(a), expected, "{:?}", a.error);
}

// ----- conformance vectors --------------------------------------------------

const COORD: &str = "agent://coordinator";
const VOTERS: [&str; 4] = ["agent://coordinator", "agent://alice", "agent://bob", "agent://carol"];

#[test]
fn vector_quorum_happy_path() {
    let mut h = H::new();
    let sid = h.start_mode(QUORUM, COORD, &VOTERS, "");
    ok(&h.send_mode(COORD, &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    ok(&h.send_mode("agent://alice", &sid, QUORUM, "Approve", approve("r1")));
    ok(&h.send_mode("agent://bob", &sid, QUORUM, "Approve", approve("r1")));
    assert_eq!(h.state(&sid), SessionState::Open, "reaching the threshold must not resolve (row 43)");
    assert_eq!(h.projection(&sid)["eligible"], true);
    ok(&h.commit_mode(COORD, &sid, QUORUM, "quorum.approved", true));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_eq!(h.projection(&sid)["phase"], "Committed");
    h.assert_replay_matches();
}

#[test]
fn vector_quorum_reject_paths() {
    let mut h = H::new();
    let sid = h.start_mode(QUORUM, COORD, &VOTERS, "");
    rejected(&h.send_mode("agent://alice", &sid, QUORUM, "Approve", approve("r1")), "INVALID_ENVELOPE");
    ok(&h.send_mode(COORD, &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    ok(&h.send_mode("agent://alice", &sid, QUORUM, "Approve", approve("r1")));
    rejected(&h.commit_mode(COORD, &sid, QUORUM, "quorum.approved", true), "INVALID_ENVELOPE");
    assert_eq!(h.state(&sid), SessionState::Open);
}

// ----- checklist rows 96–100 ----------------------------------------------

#[test]
fn row_96_approval_request_only_from_initiator_and_at_most_one() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("A", &sid, QUORUM, "ApprovalRequest", request("r1", 2)), "FORBIDDEN");
    rejected(&h.send_mode("X", &sid, QUORUM, "ApprovalRequest", request("r1", 2)), "FORBIDDEN");
    assert_eq!(h.projection(&sid)["phase"], "AwaitingRequest");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    rejected(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r2", 2)), "INVALID_ENVELOPE");
    rejected(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 2)), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["request"]["request_id"], "r1");
}

#[test]
fn row_97_required_approvals_bounds() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 0)), "INVALID_ENVELOPE");
    rejected(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 5)), "INVALID_ENVELOPE");
    rejected(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("", 2)), "INVALID_ENVELOPE");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 4)));
}

#[test]
fn row_98_one_ballot_per_participant() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    ok(&h.send_mode("A", &sid, QUORUM, "Approve", approve("r1")));
    rejected(&h.send_mode("A", &sid, QUORUM, "Abstain", abstain("r1")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, QUORUM, "Reject", reject("r1")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, QUORUM, "Approve", approve("r1")), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["tally"]["approvals"], 1);
    assert_eq!(h.projection(&sid)["ballots"]["A"]["ballot"], "Approve");
}

#[test]
fn row_99_ballots_need_the_request() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    for kind in ["Approve", "Reject", "Abstain"] {
        rejected(&h.send_mode("A", &sid, QUORUM, kind, ballot(kind, "r1")), "INVALID_ENVELOPE");
    }
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    rejected(&h.send_mode("A", &sid, QUORUM, "Approve", approve("r2")), "INVALID_ENVELOPE");
    ok(&h.send_mode("A", &sid, QUORUM, "Approve", approve("r1")));
}

#[test]
fn row_100_not_eligible_before_threshold_or_unreachability() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true), "INVALID_ENVELOPE");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    ok(&h.send_mode("A", &sid, QUORUM, "Approve", approve("r1")));
    // 1 of 2 approvals with 3 still to vote: undecided either way.
    rejected(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true), "INVALID_ENVELOPE");
    rejected(&h.commit_mode("C", &sid, QUORUM, "quorum.rejected", false), "INVALID_ENVELOPE");
    ok(&h.send_mode("B", &sid, QUORUM, "Approve", approve("r1")));
    ok(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true));
}

#[test]
fn row_100_unreachable_threshold_allows_rejected_commit() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 3)));
    ok(&h.send_mode("A", &sid, QUORUM, "Reject", reject("r1")));
    // 0 approvals + 3 remaining >= 3: still reachable.
    rejected(&h.commit_mode("C", &sid, QUORUM, "quorum.rejected", false), "INVALID_ENVELOPE");
    ok(&h.send_mode("B", &sid, QUORUM, "Abstain", abstain("r1")));
    // 0 + 2 < 3: unreachable; abstaining only took B out of the pool.
    assert_eq!(h.projection(&sid)["tally"]["unreachable"], true);
    ok(&h.commit_mode("C", &sid, QUORUM, "quorum.rejected", false));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    h.assert_replay_matches();
}

// ----- negative outcome, authority -------------------------------------------

#[test]
fn negative_outcome_quorum_rejected_with_initiator_not_a_participant() {
    let mut h = H::new();
    let sid = h.start_mode(QUORUM, "C", &["A", "B", "D"], "");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    // The coordinator is not listed, so it cannot vote.
    rejected(&h.send_mode("C", &sid, QUORUM, "Approve", approve("r1")), "FORBIDDEN");
    ok(&h.send_mode("A", &sid, QUORUM, "Reject", reject("r1")));
    ok(&h.send_mode("B", &sid, QUORUM, "Abstain", abstain("r1")));
    // 0 approvals + 1 remaining < 2.
    rejected(&h.commit_mode("C", &sid, QUORUM, "quorum.rejected", true), "INVALID_ENVELOPE");
    ok(&h.commit_mode("C", &sid, QUORUM, "quorum.rejected", false));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_eq!(h.projection(&sid)["commitment"]["action"], "quorum.rejected");
    h.assert_replay_matches();
}

#[test]
fn outsiders_cannot_vote() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    rejected(&h.send_mode("X", &sid, QUORUM, "Approve", approve("r1")), "FORBIDDEN");
    rejected(&h.send_mode("X", &sid, QUORUM, "Approve", vec![0xff]), "FORBIDDEN");
    rejected(&h.send_mode("A", &sid, QUORUM, "Approve", vec![0xff, 0xff]), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, QUORUM, "Vote", approve("r1")), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["tally"]["remaining"], 4);
}

#[test]
fn no_direction_check_without_threshold_policy() {
    // The runtime does not check which condition made the session eligible.
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 4)));
    ok(&h.send_mode("A", &sid, QUORUM, "Reject", reject("r1")));
    ok(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true));
}

// ----- policy rules ----------------------------------------------------------

#[test]
fn policy_threshold_n_of_m_replaces_required_approvals() {
    let mut h = H::new();
    h.register_rules("policy.quorum.three", QUORUM, json!({"threshold": {"type": "n_of_m", "value": 3}})).unwrap();
    let sid = start(&mut h, "policy.quorum.three");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 1)));
    ok(&h.send_mode("A", &sid, QUORUM, "Approve", approve("r1")));
    // required_approvals = 1 would be met, but the policy needs 3.
    rejected(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true), "INVALID_ENVELOPE");
    ok(&h.send_mode("B", &sid, QUORUM, "Approve", approve("r1")));
    ok(&h.send_mode("D", &sid, QUORUM, "Approve", approve("r1")));
    assert_eq!(h.projection(&sid)["tally"]["required"], 3);
    ok(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true));
}

#[test]
fn policy_threshold_gates_positive_commit_but_not_negative() {
    let mut h = H::new();
    h.register_rules("policy.quorum.three", QUORUM, json!({"threshold": {"type": "n_of_m", "value": 3}})).unwrap();
    let sid = start(&mut h, "policy.quorum.three");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 2)));
    ok(&h.send_mode("A", &sid, QUORUM, "Reject", reject("r1")));
    ok(&h.send_mode("B", &sid, QUORUM, "Reject", reject("r1")));
    // 0 + 2 < 3: eligible, but a positive outcome needs 3 approvals.
    let a = h.commit_mode("C", &sid, QUORUM, "quorum.approved", true);
    rejected(&a, "POLICY_DENIED");
    assert!(!a.error.unwrap().details.is_empty());
    ok(&h.commit_mode("C", &sid, QUORUM, "quorum.rejected", false));
}

#[test]
fn policy_threshold_percentage_rounds_up() {
    let mut h = H::new();
    // 50 % of 4 participants = 2; 60 % of 4 = 2.4, rounded up to 3.
    h.register_rules("policy.quorum.p60", QUORUM, json!({"threshold": {"type": "percentage", "value": 60}})).unwrap();
    let sid = start(&mut h, "policy.quorum.p60");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 1)));
    assert_eq!(h.projection(&sid)["tally"]["required"], 3);
    ok(&h.send_mode("A", &sid, QUORUM, "Approve", approve("r1")));
    ok(&h.send_mode("B", &sid, QUORUM, "Approve", approve("r1")));
    rejected(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true), "INVALID_ENVELOPE");
    ok(&h.send_mode("C", &sid, QUORUM, "Approve", approve("r1")));
    ok(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true));

    h.register_rules("policy.quorum.p50", QUORUM, json!({"threshold": {"type": "percentage", "value": 50}})).unwrap();
    let sid = start(&mut h, "policy.quorum.p50");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 4)));
    assert_eq!(h.projection(&sid)["tally"]["required"], 2);

    // RFC-MACP-0012 §4.2's example: 50 % of 3 declared participants needs 2,
    // and the base stays 3 however many abstain.
    let sid = h.start_mode(QUORUM, "C", &["A", "B", "D"], "policy.quorum.p50");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 1)));
    ok(&h.send_mode("A", &sid, QUORUM, "Abstain", abstain("r1")));
    assert_eq!(h.projection(&sid)["tally"]["required"], 2);
    ok(&h.send_mode("B", &sid, QUORUM, "Approve", approve("r1")));
    rejected(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true), "INVALID_ENVELOPE");
}

#[test]
fn stored_legacy_threshold_zero_keeps_required_approvals() {
    // Admission refuses both the `weighted` type and a zero value today
    // (RFC-MACP-0012 1.2.0); a descriptor recorded before that still
    // evaluates as it did: a zero threshold overrides nothing.
    let mut h = H::new();
    let rules = json!({"threshold": {"type": "weighted", "value": 0}}).to_string();
    assert!(h.register_rules("policy.quorum.zero", QUORUM, serde_json::from_str(&rules).unwrap()).is_err());
    h.register_stored("policy.quorum.zero", QUORUM, 1, &rules).unwrap();
    let sid = start(&mut h, "policy.quorum.zero");
    ok(&h.send_mode("C", &sid, QUORUM, "ApprovalRequest", request("r1", 1)));
    ok(&h.send_mode("A", &sid, QUORUM, "Approve", approve("r1")));
    ok(&h.commit_mode("C", &sid, QUORUM, "quorum.approved", true));
}

#[test]
fn policy_rules_are_type_checked_at_registration() {
    let mut h = H::new();
    for bad in [
        json!({"threshold": 2}),
        json!({"threshold": {"type": "supermajority", "value": 2}}),
        json!({"threshold": {"type": "n_of_m", "value": "2"}}),
        json!({"threshold": {"type": "n_of_m", "value": -1}}),
        json!({"threshold": {"type": "percentage", "value": 150}}),
        // RFC-MACP-0012 1.2.0: `weighted` is reserved, `count` is no alias,
        // the value is a whole number > 0.
        json!({"threshold": {"type": "weighted", "value": 2}}),
        json!({"threshold": {"type": "count", "value": 2}}),
        json!({"threshold": {"type": "n_of_m", "value": 0}}),
        json!({"threshold": {"type": "n_of_m", "value": 2.5}}),
        json!({"threshold": {"type": "n_of_m"}}),
        // Closed objects (1.4.0) and satisfiable authority (1.3.0).
        json!({"threshold": {"type": "n_of_m", "value": 2, "weights": {"A": 2}}}),
        json!({"voting": {"algorithm": "majority"}}),
        json!({"commitment": {"authority": "designated_role"}}),
        json!({"commitment": {"require_vote_quorum": true}}),
        json!({"x-com.example.q": {}}),
        json!({"abstention": {"counts_toward_quorum": "no"}}),
        json!({"abstention": {"interpretation": "veto"}}),
        json!({"abstention": []}),
    ] {
        let e = h.register_rules("policy.quorum.bad", QUORUM, bad.clone()).unwrap_err();
        assert_eq!(e.code.as_str(), "INVALID_POLICY_DEFINITION", "{bad}: {e}");
    }
    h.register_rules(
        "policy.quorum.good",
        QUORUM,
        json!({
            "threshold": {"type": "percentage", "value": 50, "_note": "half, rounded up"},
            "abstention": {"counts_toward_quorum": false, "interpretation": "neutral"},
            "commitment": {"authority": "designated_role", "designated_roles": ["C"]},
        }),
    )
    .unwrap();
}

#[test]
fn descriptor_is_listed_as_standards_track() {
    let h = H::new();
    let d = h.k.modes().standards_track().into_iter().find(|d| d.mode == QUORUM).expect("quorum listed");
    assert_eq!(d.mode_version, "1.0.0");
    assert_eq!(d.determinism_class, "semantic-deterministic");
    assert_eq!(d.participant_model, "quorum");
    assert_eq!(d.message_types.first().map(String::as_str), Some("SessionStart"));
    assert_eq!(d.message_types.last().map(String::as_str), Some("Commitment"));
    assert_eq!(d.terminal_message_types, vec!["Commitment".to_string()]);
    assert_eq!(d.schema_uris["protobuf"], "buf.build/multiagentcoordinationprotocol/macp");
}

// ----- properties ------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    /// (sender index, kind, request id choice, required approvals)
    Send(usize, usize, usize, u32),
    Garbage(usize, usize),
    Commit(usize, bool),
    Tick(i64),
}

const SENDERS: [&str; 6] = ["C", "A", "B", "D", "E", "X"]; // C coordinates; X is an outsider
const KINDS: [&str; 5] = ["ApprovalRequest", "Approve", "Reject", "Abstain", "Bogus"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..SENDERS.len(), 0..KINDS.len(), 0..5usize, 0..7u32).prop_map(|(s, k, r, n)| Step::Send(s, k, r, n)),
        1 => (0..SENDERS.len(), 0..KINDS.len()).prop_map(|(s, k)| Step::Garbage(s, k)),
        2 => (0..4usize, any::<bool>()).prop_map(|(s, p)| Step::Commit(s, p)),
        1 => (1..1_500i64).prop_map(Step::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_quorum_sessions_stay_consistent(
        threshold in prop_oneof![Just(0u32), Just(2u32), Just(4u32)],
        coordinator_listed in any::<bool>(),
        prefix in 0..5u32,
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let mut h = H::new();
        // A zero threshold (no override) is no longer admissible; it is
        // still how recorded policies of older runtimes evaluate.
        let rules = json!({"threshold": {"type": "n_of_m", "value": threshold}});
        if threshold > 0 {
            h.register_rules("policy.quorum.prop", QUORUM, rules).unwrap();
        } else {
            h.register_stored("policy.quorum.prop", QUORUM, 1, &rules.to_string()).unwrap();
        }
        let participants: &[&str] = if coordinator_listed { &["C", "A", "B", "D", "E"] } else { &["A", "B", "D", "E"] };
        let sid = h.start_mode(QUORUM, "C", participants, "policy.quorum.prop");
        let mut resolved = false;
        // Oracle from accepted acks only.
        let mut required: Option<u32> = None;
        let mut ballots: BTreeMap<String, &str> = BTreeMap::new();
        // Most runs start with a valid request so that deep states are hit.
        if prefix > 0 {
            prop_assert!(h.send_mode_checked("C", &sid, QUORUM, "ApprovalRequest", request("r1", prefix)).ok);
            required = Some(prefix);
        }
        for s in steps {
            match s {
                Step::Send(si, ki, ri, n) => {
                    let (who, kind) = (SENDERS[si], KINDS[ki]);
                    let id = ["r1", "r1", "r1", "r2", ""][ri];
                    let payload = match kind {
                        "ApprovalRequest" => request(id, n),
                        "Bogus" => Vec::new(),
                        _ => ballot(kind, id),
                    };
                    let a = h.send_mode_checked(who, &sid, QUORUM, kind, payload);
                    prop_assert!(!(resolved && a.ok), "accepted after RESOLVED");
                    if a.ok {
                        if kind == "ApprovalRequest" {
                            prop_assert!(required.is_none(), "second request accepted");
                            prop_assert!(n >= 1 && n as usize <= participants.len());
                            required = Some(n);
                        } else {
                            prop_assert!(participants.contains(&who), "ballot from a non-participant");
                            prop_assert!(ballots.insert(who.to_string(), kind).is_none(), "second ballot");
                        }
                    }
                }
                Step::Garbage(si, ki) => {
                    let a = h.send_mode_checked(SENDERS[si], &sid, QUORUM, KINDS[ki], vec![0xff, 0x01, 0x02]);
                    prop_assert!(!a.ok, "garbage accepted");
                }
                Step::Commit(si, positive) => {
                    let who = ["C", "C", "C", "A"][si];
                    let action = if positive { "quorum.approved" } else { "quorum.rejected" };
                    let a = h.commit_mode_checked(who, &sid, QUORUM, action, positive);
                    prop_assert!(!(resolved && a.ok), "commitment accepted after RESOLVED");
                    if a.ok {
                        prop_assert_eq!(who, "C");
                        let Some(req) = required else {
                            return Err(TestCaseError::fail("commitment accepted without a request"));
                        };
                        let need = if threshold > 0 { threshold } else { req };
                        let approvals = ballots.values().filter(|k| **k == "Approve").count() as u32;
                        let remaining = (participants.len() - ballots.len()) as u32;
                        prop_assert!(approvals >= need || approvals + remaining < need, "not eligible");
                        if positive && threshold > 0 {
                            prop_assert!(approvals >= threshold, "threshold gate not enforced");
                        }
                        resolved = true;
                    }
                }
                Step::Tick(ms) => {
                    h.now += ms;
                    h.tick();
                }
            }
        }
        prop_assert_eq!(resolved, h.state(&sid) == SessionState::Resolved);
        if std::env::var("MACP_PROP_STATS").is_ok() {
            eprintln!("STAT resolved={resolved} phase={}", h.projection(&sid)["phase"]);
        }
        h.assert_replay_matches();
    }
}
