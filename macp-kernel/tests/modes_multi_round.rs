//! Multi-round convergence (`ext.multi_round.v1`): DIGEST §3.6 and
//! DECISIONS 8 (the initiator is outside the convergence set).

mod common;

use std::collections::BTreeMap;

use common::*;
use macp_kernel::macp_wire::modes::multi_round::ContributePayload;
use macp_kernel::macp_wire::v1::{Ack, SessionState};
use macp_kernel::macp_wire::Message;
use proptest::prelude::*;
use serde_json::json;

const MR: &str = "ext.multi_round.v1";
const SEED_ALIAS: &str = "macp.mode.multi_round.v1";

/// The legacy JSON form the spec vectors use.
fn json_value(v: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({ "value": v })).unwrap()
}

fn proto_value(v: &str) -> Vec<u8> {
    ContributePayload { value: v.into() }.encode_to_vec()
}

fn start(h: &mut H) -> String {
    h.start_mode(MR, "I", &["I", "A", "B"], "")
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
const PARTS: [&str; 3] = ["agent://coordinator", "agent://alice", "agent://bob"];

#[test]
fn vector_multi_round_happy_path() {
    // The coordinator is listed and never contributes (DECISIONS 8).
    let mut h = H::new();
    let sid = h.start_mode(MR, COORD, &PARTS, "");
    ok(&h.send_mode("agent://alice", &sid, MR, "Contribute", json_value("option_a")));
    ok(&h.send_mode("agent://bob", &sid, MR, "Contribute", json_value("option_b")));
    ok(&h.send_mode("agent://bob", &sid, MR, "Contribute", json_value("option_a")));
    assert_eq!(h.state(&sid), SessionState::Open, "convergence alone must not resolve");
    ok(&h.commit_mode(COORD, &sid, MR, "multi_round.converged", true));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    let p = h.projection(&sid);
    assert_eq!(p["phase"], "Committed");
    assert_eq!(p["resolution"]["converged_value"], "option_a");
    assert_eq!(p["resolution"]["round"], 3);
    assert_eq!(p["resolution"]["final"], json!({"agent://alice": "option_a", "agent://bob": "option_a"}));
    h.assert_replay_matches();
}

#[test]
fn vector_multi_round_reject_paths() {
    let mut h = H::new();
    let sid = h.start_mode(MR, COORD, &PARTS, "");
    rejected(&h.commit_mode(COORD, &sid, MR, "multi_round.converged", true), "INVALID_ENVELOPE");
    ok(&h.send_mode("agent://alice", &sid, MR, "Contribute", json_value("option_a")));
    ok(&h.send_mode("agent://bob", &sid, MR, "Contribute", json_value("option_a")));
    rejected(&h.commit_mode("agent://alice", &sid, MR, "multi_round.converged", true), "FORBIDDEN");
    assert_eq!(h.state(&sid), SessionState::Open);
    assert_eq!(h.projection(&sid)["converged"], true);
}

// ----- convergence -------------------------------------------------------------

#[test]
fn convergence_excludes_the_initiator() {
    let mut h = H::new();
    let sid = start(&mut h);
    ok(&h.send_mode("I", &sid, MR, "Contribute", proto_value("z")));
    ok(&h.send_mode("A", &sid, MR, "Contribute", proto_value("x")));
    assert_eq!(h.projection(&sid)["converged"], false);
    ok(&h.send_mode("B", &sid, MR, "Contribute", proto_value("x")));
    let p = h.projection(&sid);
    assert_eq!(p["converged"], true, "the initiator's differing value does not block convergence");
    assert_eq!(p["converged_value"], "x");
    assert_eq!(p["contributions"]["I"], "z");
    ok(&h.commit_mode("I", &sid, MR, "multi_round.converged", true));
}

#[test]
fn convergence_needs_every_other_participant() {
    let mut h = H::new();
    let sid = h.start_mode(MR, "I", &["I", "A", "B", "C"], "");
    ok(&h.send_mode("A", &sid, MR, "Contribute", proto_value("x")));
    ok(&h.send_mode("B", &sid, MR, "Contribute", proto_value("x")));
    let a = h.commit_mode("I", &sid, MR, "multi_round.converged", true);
    rejected(&a, "INVALID_ENVELOPE");
    assert!(a.error.unwrap().message.contains('C'), "the error names who is missing");
    ok(&h.send_mode("C", &sid, MR, "Contribute", proto_value("y")));
    rejected(&h.commit_mode("I", &sid, MR, "multi_round.converged", true), "INVALID_ENVELOPE");
    ok(&h.send_mode("C", &sid, MR, "Contribute", proto_value("x")));
    ok(&h.commit_mode("I", &sid, MR, "multi_round.converged", true));
}

#[test]
fn unlisted_initiator_coordinates() {
    let mut h = H::new();
    let sid = h.start_mode(MR, "I", &["A", "B"], "");
    rejected(&h.send_mode("I", &sid, MR, "Contribute", proto_value("x")), "FORBIDDEN");
    ok(&h.send_mode("A", &sid, MR, "Contribute", proto_value("x")));
    ok(&h.send_mode("B", &sid, MR, "Contribute", proto_value("x")));
    ok(&h.commit_mode("I", &sid, MR, "multi_round.converged", true));
}

#[test]
fn rounds_count_changed_values_only() {
    let mut h = H::new();
    let sid = h.start_mode(MR, "I", &["I", "A", "B", "C"], "");
    ok(&h.send_mode("A", &sid, MR, "Contribute", proto_value("x")));
    ok(&h.send_mode("A", &sid, MR, "Contribute", proto_value("x")));
    assert_eq!(h.projection(&sid)["round"], 1, "restating a value is not a new round");
    ok(&h.send_mode("A", &sid, MR, "Contribute", proto_value("y")));
    ok(&h.send_mode("B", &sid, MR, "Contribute", proto_value("y")));
    assert_eq!(h.projection(&sid)["round"], 3);
    assert_eq!(h.projection(&sid)["contributions"]["A"], "y");
}

#[test]
fn no_contribution_after_convergence() {
    let mut h = H::new();
    let sid = start(&mut h);
    ok(&h.send_mode("A", &sid, MR, "Contribute", proto_value("x")));
    ok(&h.send_mode("B", &sid, MR, "Contribute", proto_value("x")));
    rejected(&h.send_mode("A", &sid, MR, "Contribute", proto_value("y")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, MR, "Contribute", proto_value("x")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, MR, "Contribute", proto_value("x")), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["phase"], "Converged");
}

// ----- payloads, authority, start ------------------------------------------

#[test]
fn contribute_payload_forms() {
    let mut h = H::new();
    let sid = h.start_mode(MR, "I", &["I", "A", "B", "C"], "");
    rejected(&h.send_mode("A", &sid, MR, "Contribute", Vec::new()), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, MR, "Contribute", vec![0xff, 0xff]), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, MR, "Contribute", json_value("")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, MR, "Contribute", br#"{"val": "x"}"#.to_vec()), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["round"], 0);
    // JSON and protobuf carry the same value.
    ok(&h.send_mode("A", &sid, MR, "Contribute", json_value("same")));
    ok(&h.send_mode("B", &sid, MR, "Contribute", proto_value("same")));
    ok(&h.send_mode("C", &sid, MR, "Contribute", br#"{"value": "same", "note": 1}"#.to_vec()));
    assert_eq!(h.projection(&sid)["converged_value"], "same");
    h.assert_replay_matches();
}

#[test]
fn contribute_only_from_participants_and_other_types_invalid() {
    let mut h = H::new();
    let sid = start(&mut h);
    rejected(&h.send_mode("X", &sid, MR, "Contribute", proto_value("x")), "FORBIDDEN");
    rejected(&h.send_mode("A", &sid, MR, "Proposal", proto_value("x")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("X", &sid, MR, "Vote", proto_value("x")), "INVALID_ENVELOPE");
}

#[test]
fn commitment_only_from_initiator_whatever_the_policy() {
    let mut h = H::new();
    h.register_rules("policy.mr.any", MR, json!({"commitment": {"authority": "any_participant"}})).unwrap();
    let sid = h.start_mode(MR, "I", &["I", "A", "B"], "policy.mr.any");
    ok(&h.send_mode("A", &sid, MR, "Contribute", proto_value("x")));
    ok(&h.send_mode("B", &sid, MR, "Contribute", proto_value("x")));
    rejected(&h.commit_mode("A", &sid, MR, "multi_round.converged", true), "FORBIDDEN");
    ok(&h.commit_mode("I", &sid, MR, "multi_round.converged", true));
}

#[test]
fn start_needs_a_participant_other_than_the_initiator() {
    let mut h = H::new();
    rejected(&h.try_start(MR, "I", &["I"], "").1, "INVALID_ENVELOPE");
    ok(&h.try_start(MR, "I", &["A"], "").1);
}

#[test]
fn any_rules_object_is_accepted() {
    let mut h = H::new();
    h.register_rules("policy.mr.free", MR, json!({"anything": [1, 2, 3], "nested": {"x": true}})).unwrap();
    h.start_mode(MR, "I", &["I", "A"], "policy.mr.free");
}

#[test]
fn seed_alias_runs_the_same_mode() {
    let mut h = H::new();
    let sid = h.start_mode(SEED_ALIAS, "I", &["I", "A", "B"], "");
    assert_eq!(h.k.session(&sid).unwrap().binding.mode, MR);
    ok(&h.send_mode("A", &sid, SEED_ALIAS, "Contribute", json_value("x")));
    ok(&h.send_mode("B", &sid, MR, "Contribute", json_value("x")));
    ok(&h.commit_mode("I", &sid, SEED_ALIAS, "multi_round.converged", true));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    h.assert_replay_matches();
}

#[test]
fn row_113_listed_by_list_ext_modes_not_list_modes() {
    let h = H::new();
    let standard: Vec<String> = h.k.modes().standards_track().into_iter().map(|d| d.mode).collect();
    assert!(!standard.iter().any(|m| m == MR || m == SEED_ALIAS));
    for m in ["macp.mode.task.v1", "macp.mode.handoff.v1", "macp.mode.quorum.v1"] {
        assert!(standard.iter().any(|s| s == m), "{m} missing from ListModes");
    }
    let ext = h.k.modes().extensions();
    let d = ext.iter().find(|d| d.mode == MR).expect("ext.multi_round.v1 listed by ListExtModes");
    assert!(!ext.iter().any(|d| d.mode == SEED_ALIAS), "the seed alias is never advertised");
    assert_eq!(d.mode_version, "1.0.0");
    assert_eq!(d.determinism_class, "semantic-deterministic");
    assert_eq!(d.participant_model, "peer");
    assert_eq!(d.message_types, vec!["SessionStart".to_string(), "Contribute".into(), "Commitment".into()]);
    assert_eq!(d.terminal_message_types, vec!["Commitment".to_string()]);
    assert_eq!(d.schema_uris["protobuf"], "buf.build/multiagentcoordinationprotocol/macp");
}

// ----- properties ------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    /// (sender index, value index, JSON form, message kind)
    Send(usize, usize, bool, usize),
    Garbage(usize),
    Commit(usize),
    Tick(i64),
}

const SENDERS: [&str; 5] = ["I", "A", "B", "C", "X"]; // X is an outsider
const VALUES: [&str; 4] = ["x", "x", "y", ""];
const KINDS: [&str; 2] = ["Contribute", "Bogus"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (0..SENDERS.len(), 0..VALUES.len(), any::<bool>(), proptest::sample::select(vec![0usize, 0, 0, 0, 1]))
            .prop_map(|(s, v, j, k)| Step::Send(s, v, j, k)),
        1 => (0..SENDERS.len()).prop_map(Step::Garbage),
        2 => (0..4usize).prop_map(Step::Commit),
        1 => (1..1_500i64).prop_map(Step::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_multi_round_sessions_stay_consistent(
        initiator_listed in any::<bool>(),
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let mut h = H::new();
        let participants: &[&str] = if initiator_listed { &["I", "A", "B", "C"] } else { &["A", "B", "C"] };
        let sid = h.start_mode(MR, "I", participants, "");
        let mut resolved = false;
        // Oracle from accepted acks only: each sender's latest value.
        let mut latest: BTreeMap<&str, &str> = BTreeMap::new();
        let converged = |latest: &BTreeMap<&str, &str>| {
            let first = latest.get("A");
            first.is_some() && ["A", "B", "C"].iter().all(|p| latest.get(p) == first)
        };
        for s in steps {
            match s {
                Step::Send(si, vi, as_json, ki) => {
                    let (who, value) = (SENDERS[si], VALUES[vi]);
                    let payload = if as_json { json_value(value) } else { proto_value(value) };
                    let was_converged = converged(&latest);
                    let a = h.send_mode_checked(who, &sid, MR, KINDS[ki], payload);
                    prop_assert!(!(resolved && a.ok), "accepted after RESOLVED");
                    if a.ok {
                        prop_assert!(!was_converged, "contribution accepted after convergence");
                        prop_assert!(participants.contains(&who) && !value.is_empty() && ki == 0);
                        latest.insert(who, value);
                    }
                }
                Step::Garbage(si) => {
                    let a = h.send_mode_checked(SENDERS[si], &sid, MR, "Contribute", vec![0xff, 0x01, 0x02]);
                    prop_assert!(!a.ok, "garbage accepted");
                }
                Step::Commit(si) => {
                    let who = ["I", "I", "I", "A"][si];
                    let a = h.commit_mode_checked(who, &sid, MR, "multi_round.converged", true);
                    prop_assert!(!(resolved && a.ok), "commitment accepted after RESOLVED");
                    if a.ok {
                        prop_assert_eq!(who, "I");
                        prop_assert!(converged(&latest), "commitment accepted before convergence");
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
