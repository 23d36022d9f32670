//! `macp.mode.proposal.v1`: DIGEST §9 rows 74–81, the proposal conformance
//! vectors, policy rules (RFC-MACP-0012 §4.3) and property tests.

mod common;

use common::*;
use macp_kernel::macp_wire::modes::proposal::{
    AcceptPayload, CounterProposalPayload, ProposalPayload, RejectPayload, WithdrawPayload,
};
use macp_kernel::macp_wire::v1::{CommitmentPayload, SessionState};
use macp_kernel::macp_wire::Message;
use macp_kernel::ErrorCode;
use serde_json::json;

fn proposal(id: &str) -> Vec<u8> {
    ProposalPayload {
        proposal_id: id.into(),
        title: "offer".into(),
        summary: "terms".into(),
        details: vec![],
        tags: vec!["t".into()],
    }
    .encode_to_vec()
}

fn counter(id: &str, supersedes: &str) -> Vec<u8> {
    CounterProposalPayload {
        proposal_id: id.into(),
        supersedes_proposal_id: supersedes.into(),
        title: "counter".into(),
        summary: "better terms".into(),
        details: vec![],
    }
    .encode_to_vec()
}

fn accept(id: &str) -> Vec<u8> {
    AcceptPayload { proposal_id: id.into(), reason: String::new() }.encode_to_vec()
}

fn reject(id: &str, terminal: bool) -> Vec<u8> {
    RejectPayload { proposal_id: id.into(), terminal, reason: "no".into() }.encode_to_vec()
}

fn withdraw(id: &str) -> Vec<u8> {
    WithdrawPayload { proposal_id: id.into(), reason: "changed my mind".into() }.encode_to_vec()
}

fn accepted() -> CommitmentPayload {
    commitment("proposal.accepted", true)
}

fn declined() -> CommitmentPayload {
    commitment("proposal.rejected", false)
}

fn ok(h: &mut H, who: &str, sid: &str, t: &str, payload: Vec<u8>) {
    let ack = h.msg_in(PROPOSAL, who, sid, t, payload);
    assert!(ack.ok, "{t} from {who} rejected: {:?}", ack.error);
}

fn rejected_with(h: &mut H, who: &str, sid: &str, t: &str, payload: Vec<u8>, expected: &str) {
    let before = h.k.snapshot();
    let ack = h.msg_in(PROPOSAL, who, sid, t, payload);
    assert!(!ack.ok, "{t} from {who} was accepted");
    assert_eq!(code(&ack), expected, "{t} from {who}: {:?}", ack.error);
    assert!(h.k.snapshot() == before, "a rejected {t} changed the kernel state");
}

fn commit_code(h: &mut H, who: &str, sid: &str, c: &CommitmentPayload) -> String {
    let before = h.k.snapshot();
    let ack = h.commit_in(PROPOSAL, who, sid, c);
    if ack.ok {
        assert_eq!(ack.session_state, SessionState::Resolved as i32);
    } else {
        assert!(h.k.snapshot() == before, "a rejected Commitment changed the kernel state");
    }
    code(&ack).to_string()
}

fn phase(h: &H, sid: &str) -> String {
    h.projection(sid)["phase"].as_str().unwrap().to_string()
}

/// A session [I, A, B] (initiator I) under `policy` ("" = policy.default).
fn session(h: &mut H, policy: &str) -> String {
    h.start_ok(PROPOSAL, "I", &["I", "A", "B"], policy)
}

fn policy_session(h: &mut H, id: &str, rules: serde_json::Value) -> String {
    h.register_policy(id, PROPOSAL, 1, &rules.to_string()).expect("policy registers");
    session(h, id)
}

// ----- §9 rows 74–81 -----------------------------------------------------------

#[test]
fn row_74_no_commitment_before_convergence_or_terminal_reject() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "INVALID_ENVELOPE");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "I", &sid, "Accept", accept("p1"));
    ok(&mut h, "A", &sid, "Accept", accept("p1"));
    assert_eq!(phase(&h, &sid), "Negotiating", "B has not accepted");
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "INVALID_ENVELOPE");
    ok(&mut h, "B", &sid, "Reject", reject("p1", false));
    assert_eq!(commit_code(&mut h, "I", &sid, &declined()), "INVALID_ENVELOPE", "a non-terminal reject is not enough");
    assert_eq!(h.state(&sid), SessionState::Open);
}

#[test]
fn row_75_all_declared_participants_accepting_makes_it_eligible() {
    // proposal_happy_path.json
    let (buyer, seller) = ("agent://buyer", "agent://seller");
    let mut h = H::new();
    let sid = h.start_ok(PROPOSAL, buyer, &[buyer, seller], "");
    ok(&mut h, seller, &sid, "Proposal", proposal("p1"));
    ok(&mut h, buyer, &sid, "Accept", accept("p1"));
    assert_eq!(phase(&h, &sid), "Negotiating");
    ok(&mut h, seller, &sid, "Accept", accept("p1"));
    assert_eq!(phase(&h, &sid), "Converged");
    assert_eq!(commit_code(&mut h, seller, &sid, &accepted()), "FORBIDDEN", "the initiator commits by default");
    assert_eq!(commit_code(&mut h, buyer, &sid, &accepted()), "");
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_subset(
        &h.projection(&sid),
        &json!({
            "phase": "Committed",
            "accepts": {buyer: "p1", seller: "p1"},
            "proposals": {"p1": {"proposal_id": "p1", "proposer": seller, "disposition": "Live"}}
        }),
    );
    h.assert_replay_matches();
}

#[test]
fn row_76_counter_proposal_must_reference_an_existing_proposal() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    rejected_with(&mut h, "A", &sid, "CounterProposal", counter("p2", ""), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "CounterProposal", counter("p2", "p1"), "INVALID_ENVELOPE");
    ok(&mut h, "B", &sid, "Proposal", proposal("p1"));
    rejected_with(&mut h, "A", &sid, "CounterProposal", counter("p2", "p9"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "CounterProposal", counter("", "p1"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "CounterProposal", counter("p1", "p1"), "INVALID_ENVELOPE");
    ok(&mut h, "A", &sid, "CounterProposal", counter("p2", "p1"));
    // Ids are unique across proposals and counter-proposals.
    rejected_with(&mut h, "I", &sid, "Proposal", proposal("p2"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "I", &sid, "Proposal", proposal(" "), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["proposals"]["p2"]["supersedes_proposal_id"], "p1");
}

#[test]
fn row_77_withdraw_only_by_the_author() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "CounterProposal", counter("p2", "p1"));
    rejected_with(&mut h, "B", &sid, "Withdraw", withdraw("p1"), "FORBIDDEN");
    rejected_with(&mut h, "I", &sid, "Withdraw", withdraw("p1"), "FORBIDDEN");
    rejected_with(&mut h, "A", &sid, "Withdraw", withdraw("p2"), "FORBIDDEN");
    rejected_with(&mut h, "A", &sid, "Withdraw", withdraw("p9"), "INVALID_ENVELOPE");
    ok(&mut h, "A", &sid, "Withdraw", withdraw("p1"));
    rejected_with(&mut h, "A", &sid, "Withdraw", withdraw("p1"), "INVALID_ENVELOPE");
    ok(&mut h, "B", &sid, "Withdraw", withdraw("p2"));
    let p = h.projection(&sid);
    assert_eq!(p["proposals"]["p1"]["disposition"], "Withdrawn");
    assert_eq!(p["proposals"]["p2"]["disposition"], "Withdrawn");
}

#[test]
fn row_78_withdrawn_proposals_cannot_be_accepted() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "I", &sid, "Accept", accept("p1"));
    ok(&mut h, "B", &sid, "Accept", accept("p1"));
    ok(&mut h, "A", &sid, "Withdraw", withdraw("p1"));
    assert_eq!(h.projection(&sid)["accepts"], json!({}), "accepts of a withdrawn proposal are cleared");
    rejected_with(&mut h, "A", &sid, "Accept", accept("p1"), "INVALID_ENVELOPE");
    rejected_with(&mut h, "B", &sid, "Reject", reject("p1", true), "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "Accept", accept("p9"), "INVALID_ENVELOPE");
    assert_eq!(phase(&h, &sid), "Negotiating");
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "INVALID_ENVELOPE");
}

#[test]
fn row_79_counter_proposal_does_not_retire_the_original() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "CounterProposal", counter("p2", "p1"));
    assert_eq!(h.projection(&sid)["proposals"]["p1"]["disposition"], "Live");
    for who in ["I", "A", "B"] {
        ok(&mut h, who, &sid, "Accept", accept("p1"));
    }
    assert_eq!(phase(&h, &sid), "Converged");
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "");
    h.assert_replay_matches();
}

#[test]
fn row_80_a_later_accept_replaces_the_earlier_one() {
    let mut h = H::new();
    let sid = h.start_ok(PROPOSAL, "I", &["I", "A"], "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "I", &sid, "CounterProposal", counter("p2", "p1"));
    ok(&mut h, "A", &sid, "Accept", accept("p1"));
    ok(&mut h, "A", &sid, "Accept", accept("p2"));
    assert_eq!(h.projection(&sid)["accepts"], json!({"A": "p2"}));
    ok(&mut h, "I", &sid, "Accept", accept("p2"));
    assert_eq!(phase(&h, &sid), "Converged");
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "");
}

#[test]
fn row_81_terminal_reject_allows_a_negative_commitment() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "Reject", reject("p1", true));
    assert_eq!(phase(&h, &sid), "TerminalRejected");
    // Nothing was accepted, so there is nothing a positive outcome could bind.
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "INVALID_ENVELOPE");
    assert_eq!(commit_code(&mut h, "I", &sid, &declined()), "");
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_subset(
        &h.projection(&sid),
        &json!({"phase": "Committed", "terminal_rejections": [{"proposal_id": "p1", "sender": "B"}]}),
    );
    h.assert_replay_matches();
}

// ----- conformance vector and further behaviour ------------------------------------

#[test]
fn vector_proposal_reject_paths() {
    let (buyer, seller) = ("agent://buyer", "agent://seller");
    let mut h = H::new();
    let sid = h.start_ok(PROPOSAL, buyer, &[buyer, seller], "");
    assert_eq!(commit_code(&mut h, buyer, &sid, &accepted()), "INVALID_ENVELOPE");
    rejected_with(&mut h, seller, &sid, "CounterProposal", counter("p2", ""), "INVALID_ENVELOPE");
    assert_eq!(h.state(&sid), SessionState::Open);
    assert!(h.k.resolution(&sid).is_none());
    assert_subset(&h.projection(&sid), &json!({"phase": "Negotiating"}));
    h.assert_replay_matches();
}

#[test]
fn outsiders_are_forbidden_and_unknown_types_invalid() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    rejected_with(&mut h, "X", &sid, "Proposal", proposal("p1"), "FORBIDDEN");
    rejected_with(&mut h, "X", &sid, "Vote", vec![], "FORBIDDEN");
    rejected_with(&mut h, "A", &sid, "Vote", vec![], "INVALID_ENVELOPE");
    rejected_with(&mut h, "A", &sid, "Proposal", vec![0xff, 0xff], "INVALID_ENVELOPE");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    rejected_with(&mut h, "X", &sid, "Accept", accept("p1"), "FORBIDDEN");
    rejected_with(&mut h, "X", &sid, "Withdraw", withdraw("p1"), "FORBIDDEN");

    // An initiator who is not a participant may commit but not negotiate.
    let sid = h.start_ok(PROPOSAL, "I", &["A", "B"], "");
    rejected_with(&mut h, "I", &sid, "Proposal", proposal("p1"), "FORBIDDEN");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "A", &sid, "Accept", accept("p1"));
    ok(&mut h, "B", &sid, "Accept", accept("p1"));
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "");
}

#[test]
fn negotiation_may_continue_after_a_terminal_reject() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "Reject", reject("p1", true));
    ok(&mut h, "B", &sid, "CounterProposal", counter("p2", "p1"));
    for who in ["I", "A", "B"] {
        ok(&mut h, who, &sid, "Accept", accept("p2"));
    }
    assert_eq!(phase(&h, &sid), "TerminalRejected", "a standing terminal rejection wins over convergence");
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "", "p2 converged, so a positive outcome may bind it");
}

#[test]
fn withdrawing_clears_terminal_rejections() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "Reject", reject("p1", true));
    assert_eq!(phase(&h, &sid), "TerminalRejected");
    ok(&mut h, "A", &sid, "Withdraw", withdraw("p1"));
    assert_eq!(phase(&h, &sid), "Negotiating");
    assert_eq!(h.projection(&sid)["terminal_rejections"], json!([]));
    assert_eq!(commit_code(&mut h, "I", &sid, &declined()), "INVALID_ENVELOPE");
}

#[test]
fn a_reject_replaces_the_senders_accept_of_that_proposal() {
    let mut h = H::new();
    let sid = session(&mut h, "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    for who in ["I", "A", "B"] {
        ok(&mut h, who, &sid, "Accept", accept("p1"));
    }
    assert_eq!(phase(&h, &sid), "Converged");
    ok(&mut h, "B", &sid, "Reject", reject("p1", false));
    assert_eq!(phase(&h, &sid), "Negotiating");
    assert_eq!(h.projection(&sid)["accepts"], json!({"I": "p1", "A": "p1"}));
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "INVALID_ENVELOPE");
}

#[test]
fn policy_acceptance_criterion() {
    let mut h = H::new();
    let sid = policy_session(&mut h, "policy.cp", json!({"acceptance": {"criterion": "counterparty"}}));
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "I", &sid, "Accept", accept("p1"));
    assert_eq!(phase(&h, &sid), "Negotiating");
    ok(&mut h, "B", &sid, "Accept", accept("p1"));
    assert_eq!(phase(&h, &sid), "Converged", "the proposer need not accept its own proposal");
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "");

    let sid = policy_session(&mut h, "policy.init", json!({"acceptance": {"criterion": "initiator"}}));
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "Accept", accept("p1"));
    assert_eq!(phase(&h, &sid), "Negotiating");
    ok(&mut h, "I", &sid, "Accept", accept("p1"));
    assert_eq!(phase(&h, &sid), "Converged");
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "");

    // A lone proposer has no counterparty, so counterparty never converges.
    h.register_policy("policy.cp.solo", PROPOSAL, 1, r#"{"acceptance":{"criterion":"counterparty"}}"#).unwrap();
    let sid = h.start_ok(PROPOSAL, "I", &["I"], "policy.cp.solo");
    ok(&mut h, "I", &sid, "Proposal", proposal("p1"));
    assert_eq!(phase(&h, &sid), "Negotiating");
    h.assert_replay_matches();
}

#[test]
fn policy_counter_proposal_max_rounds() {
    let mut h = H::new();
    let sid = policy_session(&mut h, "policy.rounds", json!({"counter_proposal": {"max_rounds": 2}}));
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "CounterProposal", counter("p2", "p1"));
    ok(&mut h, "A", &sid, "CounterProposal", counter("p3", "p2"));
    rejected_with(&mut h, "B", &sid, "CounterProposal", counter("p4", "p3"), "INVALID_ENVELOPE");
    ok(&mut h, "B", &sid, "Proposal", proposal("p4"));
    assert_eq!(h.projection(&sid)["counter_proposals"], 2);
    for who in ["I", "A", "B"] {
        ok(&mut h, who, &sid, "Accept", accept("p3"));
    }
    assert_eq!(commit_code(&mut h, "I", &sid, &accepted()), "");
}

#[test]
fn policy_terminal_on_any_reject() {
    let mut h = H::new();
    let sid = policy_session(&mut h, "policy.tr", json!({"rejection": {"terminal_on_any_reject": true}}));
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "Reject", reject("p1", false));
    assert_eq!(phase(&h, &sid), "TerminalRejected");
    assert_eq!(commit_code(&mut h, "I", &sid, &declined()), "");
}

#[test]
fn policy_rules_are_validated() {
    let mut h = H::new();
    for (i, rules) in [
        r#"{"acceptance":{"criterion":"everyone"}}"#,
        r#"{"counter_proposal":{"max_rounds":-1}}"#,
        r#"{"rejection":{"terminal_on_any_reject":"yes"}}"#,
        r#"{"commitment":{"authority":"designated_role"}}"#,
    ]
    .iter()
    .enumerate()
    {
        let err = h.register_policy(&format!("policy.bad{i}"), PROPOSAL, 1, rules).expect_err(rules);
        assert_eq!(err.code, ErrorCode::InvalidPolicyDefinition, "{rules}");
    }
    // A mode-agnostic policy can bind to any mode, so every mode's schema
    // checks it at registration: a bad proposal section is refused there.
    let err = h.register_policy("policy.star", "*", 1, r#"{"acceptance":{"criterion":"everyone"}}"#).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidPolicyDefinition);
    // Authority from the policy applies to proposal sessions too.
    let sid = policy_session(&mut h, "policy.anyp", json!({"commitment": {"authority": "any_participant"}}));
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "Reject", reject("p1", true));
    assert_eq!(commit_code(&mut h, "B", &sid, &declined()), "");
    h.assert_replay_matches();
}

#[test]
fn descriptor_and_projection_shape() {
    let h = H::new();
    let d = h.k.modes().standards_track().into_iter().find(|d| d.mode == PROPOSAL).expect("proposal is listed");
    assert_eq!(d.mode_version, "1.0.0");
    assert_eq!(
        d.message_types,
        ["SessionStart", "Proposal", "CounterProposal", "Accept", "Reject", "Withdraw", "Commitment"]
    );
    assert_eq!(d.terminal_message_types, ["Commitment"]);
    assert_eq!(d.participant_model, "peer");
    assert_eq!(d.determinism_class, "semantic-deterministic");
    assert_eq!(d.schema_uris["protobuf"], "buf.build/multiagentcoordinationprotocol/macp");

    let mut h = H::new();
    let sid = session(&mut h, "");
    ok(&mut h, "A", &sid, "Proposal", proposal("p1"));
    ok(&mut h, "B", &sid, "CounterProposal", counter("p2", "p1"));
    ok(&mut h, "I", &sid, "Accept", accept("p2"));
    ok(&mut h, "A", &sid, "Reject", reject("p2", true));
    assert_eq!(
        h.projection(&sid),
        json!({
            "phase": "TerminalRejected",
            "accepts": {"I": "p2"},
            "proposals": {
                "p1": {"proposal_id": "p1", "proposer": "A", "disposition": "Live", "supersedes_proposal_id": "",
                       "title": "offer", "summary": "terms"},
                "p2": {"proposal_id": "p2", "proposer": "B", "disposition": "Live", "supersedes_proposal_id": "p1",
                       "title": "counter", "summary": "better terms"},
            },
            "terminal_rejections": [{"proposal_id": "p2", "sender": "A", "reason": "no"}],
            "counter_proposals": 1,
        })
    );
}

// ----- properties ------------------------------------------------------------------

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Proposal(u8),
        Counter(u8, u8),
        Accept(u8),
        Reject(u8, bool),
        Withdraw(u8),
        Garbage(&'static str, Vec<u8>),
        Commit(bool),
    }

    const SENDERS: [&str; 4] = ["I", "A", "B", "X"];
    const POLICIES: [(&str, &str); 4] = [
        ("", ""),
        ("policy.prop.cp", r#"{"acceptance":{"criterion":"counterparty"},"counter_proposal":{"max_rounds":1}}"#),
        ("policy.prop.init", r#"{"acceptance":{"criterion":"initiator"},"rejection":{"terminal_on_any_reject":true}}"#),
        ("policy.prop.any", r#"{"commitment":{"authority":"any_participant"}}"#),
    ];

    fn step() -> impl Strategy<Value = Step> {
        let id = 0u8..4;
        prop_oneof![
            3 => id.clone().prop_map(Step::Proposal),
            2 => (id.clone(), 0u8..5).prop_map(|(p, s)| Step::Counter(p, s)),
            5 => id.clone().prop_map(Step::Accept),
            2 => (id.clone(), any::<bool>()).prop_map(|(p, t)| Step::Reject(p, t)),
            1 => id.prop_map(Step::Withdraw),
            1 => (prop::sample::select(vec!["Proposal", "Accept", "Withdraw", "Vote"]),
                  prop::collection::vec(any::<u8>(), 0..12))
                .prop_map(|(t, b)| Step::Garbage(t, b)),
            2 => any::<bool>().prop_map(Step::Commit),
        ]
    }

    /// `p4` never exists, so counters that supersede it are always invalid;
    /// an empty id exercises the required-field check.
    fn id(p: u8) -> String {
        if p == 4 {
            String::new()
        } else {
            format!("p{p}")
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn random_negotiations_are_safe_and_replayable(
            policy in 0usize..POLICIES.len(),
            steps in prop::collection::vec((0usize..SENDERS.len(), step()), 1..48),
        ) {
            let mut h = H::new();
            let (policy_id, rules) = POLICIES[policy];
            if !policy_id.is_empty() {
                h.register_policy(policy_id, PROPOSAL, 1, rules).unwrap();
            }
            let sid = h.start_ok(PROPOSAL, "I", &["I", "A", "B"], policy_id);
            let mut resolved = false;
            for (who, s) in steps {
                let who = SENDERS[who];
                let before = h.k.snapshot();
                let phase_before = phase(&h, &sid);
                let (is_commit, ack) = match s {
                    Step::Proposal(p) => (false, h.msg_in(PROPOSAL, who, &sid, "Proposal", proposal(&id(p)))),
                    Step::Counter(p, s) => {
                        (false, h.msg_in(PROPOSAL, who, &sid, "CounterProposal", counter(&id(p), &id(s))))
                    }
                    Step::Accept(p) => (false, h.msg_in(PROPOSAL, who, &sid, "Accept", accept(&id(p)))),
                    Step::Reject(p, t) => (false, h.msg_in(PROPOSAL, who, &sid, "Reject", reject(&id(p), t))),
                    Step::Withdraw(p) => (false, h.msg_in(PROPOSAL, who, &sid, "Withdraw", withdraw(&id(p)))),
                    Step::Garbage(t, b) => (false, h.msg_in(PROPOSAL, who, &sid, t, b)),
                    Step::Commit(positive) => {
                        let mut c = if positive { accepted() } else { declined() };
                        c.policy_version = policy_id.into();
                        (true, h.commit_in(PROPOSAL, who, &sid, &c))
                    }
                };
                if resolved {
                    prop_assert!(!ack.ok, "accepted after RESOLVED");
                    prop_assert_eq!(code(&ack), "SESSION_NOT_OPEN");
                }
                if ack.ok {
                    prop_assert!(!ack.duplicate);
                    if is_commit {
                        prop_assert!(
                            phase_before == "Converged" || phase_before == "TerminalRejected",
                            "a Commitment was accepted in phase {}", phase_before
                        );
                        prop_assert_eq!(ack.session_state, SessionState::Resolved as i32);
                        resolved = true;
                    } else {
                        prop_assert!(who != "X", "an outsider's message was accepted");
                    }
                } else {
                    prop_assert!(h.k.snapshot() == before, "a rejected message changed the state");
                }
                // Invariant: every standing accept points at a live proposal.
                let p = h.projection(&sid);
                for (_, target) in p["accepts"].as_object().unwrap() {
                    let target = target.as_str().unwrap();
                    prop_assert_eq!(&p["proposals"][target]["disposition"], "Live");
                }
            }
            prop_assert_eq!(h.state(&sid) == SessionState::Resolved, resolved);
            h.assert_replay_matches();
        }
    }
}
