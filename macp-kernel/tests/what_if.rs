//! WhatIfReplay's core (`macp_kernel::what_if::replay`): a stricter
//! candidate diverges where its rules bite, each error has its code, and —
//! the property — replaying any accepted Decision history under the policy
//! it was recorded under never diverges and changes nothing.

mod common;

use common::*;
use macp_kernel::macp_wire::modes::decision::{EvaluationPayload, ObjectionPayload, ProposalPayload, VotePayload};
use macp_kernel::macp_wire::storage::{record::Fact, Record, SessionStarted};
use macp_kernel::macp_wire::v1::{
    what_if_entry_outcome::Kind, PolicyDescriptor, SessionState, WhatIfEntryOutcome, WhatIfReplayResponse,
};
use macp_kernel::macp_wire::Message;
use macp_kernel::policy::{default_policy, DEFAULT_POLICY_ID};
use macp_kernel::{what_if, ControlOp, ErrorCode, KResult};
use proptest::prelude::*;

fn proposal(pid: &str) -> Vec<u8> {
    ProposalPayload { proposal_id: pid.into(), option: format!("option {pid}"), ..Default::default() }.encode_to_vec()
}

fn vote(pid: &str, v: &str) -> Vec<u8> {
    VotePayload { proposal_id: pid.into(), vote: v.into(), reason: String::new() }.encode_to_vec()
}

fn unanimous(id: &str) -> PolicyDescriptor {
    PolicyDescriptor {
        policy_id: id.into(),
        mode: DECISION.into(),
        description: "every decisive vote must approve".into(),
        rules: r#"{"voting":{"algorithm":"unanimous"}}"#.into(),
        schema_version: 3,
        registered_at_unix_ms: 0,
    }
}

/// The stored records of one session, in order.
fn history(h: &H, sid: &str) -> Vec<Record> {
    h.records().into_iter().filter(|r| r.session_id == sid).collect()
}

/// The stored records of one session with its SessionStart record edited.
fn history_with_start(h: &H, sid: &str, edit: impl FnOnce(&mut SessionStarted)) -> Vec<Record> {
    let mut records = history(h, sid);
    match &mut records[0].fact {
        Some(Fact::Started(st)) => edit(st),
        other => panic!("first record is not a SessionStart: {other:?}"),
    }
    records
}

fn replay(h: &H, sid: &str, candidate: &PolicyDescriptor) -> KResult<WhatIfReplayResponse> {
    let records = history(h, sid);
    let last = records.last().map_or(0, |r| r.seq);
    what_if::replay(&records, last, candidate, h.k.modes(), &h.k.config().runtime_id)
}

/// I proposes, A approves, B rejects, I commits: accepted under
/// `policy.default` (the initiator decides).
fn split_vote_session(h: &mut H) -> String {
    let sid = h.start_default();
    assert!(h.msg("I", &sid, "Proposal", proposal("p1")).ok);
    assert!(h.msg("A", &sid, "Vote", vote("p1", "APPROVE")).ok);
    assert!(h.msg("B", &sid, "Vote", vote("p1", "REJECT")).ok);
    let ack = h.msg("I", &sid, "Commitment", commitment("decision.selected", true).encode_to_vec());
    assert!(ack.ok, "{:?}", ack.error);
    sid
}

fn kind(o: &Option<WhatIfEntryOutcome>) -> Kind {
    Kind::try_from(o.as_ref().expect("outcome").kind).expect("known kind")
}

#[test]
fn a_stricter_candidate_diverges_at_the_commitment() {
    let mut h = H::new();
    let sid = split_vote_session(&mut h);
    let before = h.k.snapshot();
    let r = replay(&h, &sid, &unanimous("policy.team.unanimous")).unwrap();
    assert_eq!(h.k.snapshot(), before, "a replay changes no kernel state");
    assert_eq!(r.candidate_policy_id, "policy.team.unanimous");
    assert_eq!(r.recorded_policy_id, DEFAULT_POLICY_ID);
    assert_eq!(r.first_divergence, Some(4), "SessionStart 0, Proposal 1, two Votes, the Commitment 4");
    assert_eq!(r.entries.len(), 5);
    for e in &r.entries {
        assert_eq!(kind(&e.recorded), Kind::Applied, "the recorded run applies every entry: {e:?}");
    }
    let commit = &r.entries[4];
    assert_eq!(commit.message_type, "Commitment");
    let c = commit.candidate.as_ref().unwrap();
    assert_eq!((kind(&commit.candidate), c.error_code.as_str()), (Kind::Refused, "POLICY_DENIED"));
    assert_eq!(c.state, SessionState::Open as i32, "the refused Commitment leaves the session open");
    let details: serde_json::Value = serde_json::from_slice(&c.details).unwrap();
    assert_eq!(details["denials"][0]["code"], "threshold_not_met", "{details}");
    assert_eq!(r.denials.len(), 1);
    assert_eq!((r.denials[0].history_index, &r.denials[0].message_id), (4, &commit.message_id));
    assert_eq!(r.denials[0].details, c.details);
    let (rec, cand) = (r.recorded.unwrap(), r.candidate.unwrap());
    assert_eq!(rec.state, SessionState::Resolved as i32);
    assert_eq!((rec.resolved_by_history_index, rec.resolved_by_message_type.as_str()), (4, "Commitment"));
    assert_eq!(rec.resolution, h.k.resolution(&sid).unwrap());
    assert_eq!(cand.state, SessionState::Open as i32);
    assert!(cand.resolution.is_empty() && cand.resolved_by_message_id.is_empty());
}

#[test]
fn the_recorded_policy_as_candidate_shows_no_divergence() {
    let mut h = H::new();
    let sid = split_vote_session(&mut h);
    let r = replay(&h, &sid, &default_policy()).unwrap();
    assert_eq!(r.first_divergence, None);
    assert!(r.denials.is_empty());
    assert_eq!(r.recorded, r.candidate);
    assert!(r.entries.iter().all(|e| e.recorded == e.candidate));

    // Same for a registered policy, offered under its own (taken) id.
    let mut h = H::new();
    h.register_policy_descriptor(unanimous("policy.team.unanimous")).unwrap();
    let sid = h.start_mode(DECISION, "I", &["I", "A", "B"], "policy.team.unanimous");
    assert!(h.msg("I", &sid, "Proposal", proposal("p1")).ok);
    assert!(h.msg("A", &sid, "Vote", vote("p1", "APPROVE")).ok);
    assert!(h.msg("B", &sid, "Vote", vote("p1", "APPROVE")).ok);
    assert!(h.msg("I", &sid, "Vote", vote("p1", "APPROVE")).ok);
    let mut c = commitment("decision.selected", true);
    c.policy_version = "policy.team.unanimous".into();
    let ack = h.msg("I", &sid, "Commitment", c.encode_to_vec());
    assert!(ack.ok, "{:?}", ack.error);
    let registered = h.k.policies().get("policy.team.unanimous").unwrap().clone();
    let r = replay(&h, &sid, &registered).unwrap();
    assert_eq!((r.first_divergence, r.recorded_policy_id.as_str()), (None, "policy.team.unanimous"));
    assert_eq!(r.candidate.unwrap().state, SessionState::Resolved as i32);
    // A differently named candidate with the same rules agrees too: the
    // Commitment's echo of the bound id is not what a candidate is about.
    let r = replay(&h, &sid, &unanimous("policy.other")).unwrap();
    assert_eq!(r.first_divergence, None);
}

#[test]
fn candidate_admission_and_history_errors() {
    let mut h = H::new();
    let sid = split_vote_session(&mut h);
    let code = |r: KResult<WhatIfReplayResponse>| r.unwrap_err().code;
    let no_description = PolicyDescriptor { description: String::new(), ..unanimous("p") };
    assert_eq!(code(replay(&h, &sid, &no_description)), ErrorCode::InvalidPolicyDefinition);
    let bad_rules = PolicyDescriptor { rules: r#"{"voting":{"algorithm":"loudest"}}"#.into(), ..unanimous("p") };
    assert_eq!(code(replay(&h, &sid, &bad_rules)), ErrorCode::InvalidPolicyDefinition);
    let other_mode = PolicyDescriptor { mode: "macp.mode.task.v1".into(), rules: "{}".into(), ..unanimous("p") };
    let e = replay(&h, &sid, &other_mode).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidPolicyDefinition);
    assert!(e.message.contains("macp.mode.task.v1"), "{e}");
    assert_eq!(code(replay(&h, &sid, &PolicyDescriptor { policy_id: " ".into(), ..unanimous("p") })), {
        ErrorCode::InvalidPolicyDefinition
    });

    let records = history(&h, &sid);
    let modes = h.k.modes();
    let rid = h.k.config().runtime_id.clone();
    let cand = default_policy();
    let r = what_if::replay(&records[1..], 5, &cand, modes, &rid);
    assert_eq!(code(r), ErrorCode::HistoryUnavailable, "the SessionStart is gone");
    let r = what_if::replay(&records[..3], 5, &cand, modes, &rid);
    assert_eq!(code(r), ErrorCode::HistoryUnavailable, "the tail is gone");
    let r = what_if::replay(&[], 5, &cand, modes, &rid);
    assert_eq!(code(r), ErrorCode::HistoryUnavailable, "everything is gone");
    let mut gap = records.clone();
    gap.remove(2);
    let r = what_if::replay(&gap, 4, &cand, modes, &rid);
    assert_eq!(code(r), ErrorCode::HistoryUnavailable, "a record in the middle is gone");
}

#[test]
fn a_candidate_that_refuses_the_start_leaves_no_session() {
    let mut h = H::new();
    let sid = split_vote_session(&mut h);
    // A recorded SessionStart that no policy can replay (its mode left the
    // registry): after the refused SessionStart every entry is NO_SESSION,
    // in both runs.
    let records = history_with_start(&h, &sid, |st| st.canonical_mode = "ext.gone.v1".into());
    let cand = PolicyDescriptor { mode: "*".into(), ..default_policy() };
    let r = what_if::replay(&records, 5, &cand, h.k.modes(), "macp-runtime").unwrap();
    assert_eq!(kind(&r.entries[0].candidate), Kind::Refused);
    assert_eq!(r.entries[0].candidate.as_ref().unwrap().error_code, "MODE_NOT_SUPPORTED");
    assert!(r.entries[1..]
        .iter()
        .all(|e| kind(&e.candidate) == Kind::NoSession && kind(&e.recorded) == Kind::NoSession));
    assert_eq!(r.candidate.unwrap().state, SessionState::Unspecified as i32);
    assert_eq!(r.first_divergence, None, "both runs refused alike");
}

// ----- the property ----------------------------------------------------------

const WHO: [&str; 4] = ["I", "A", "B", "X"];

#[derive(Clone, Debug)]
enum Op {
    Proposal { who: usize, pid: u8 },
    Vote { who: usize, pid: u8, v: u8 },
    Evaluation { who: usize, pid: u8, approve: bool },
    Objection { who: usize, pid: u8, critical: bool },
    Commit { who: usize, positive: bool },
    Control { op: u8 },
    Advance { ms: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    let w = 0..WHO.len();
    prop_oneof![
        2 => (w.clone(), 0..3u8).prop_map(|(who, pid)| Op::Proposal { who, pid }),
        6 => (w.clone(), 0..3u8, 0..3u8).prop_map(|(who, pid, v)| Op::Vote { who, pid, v }),
        1 => (w.clone(), 0..3u8, any::<bool>()).prop_map(|(who, pid, approve)| Op::Evaluation { who, pid, approve }),
        1 => (w.clone(), 0..3u8, any::<bool>()).prop_map(|(who, pid, critical)| Op::Objection { who, pid, critical }),
        2 => (w, any::<bool>()).prop_map(|(who, positive)| Op::Commit { who, positive }),
        1 => (0..3u8).prop_map(|op| Op::Control { op }),
        1 => (0i64..15_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// The policies a generated session may be bound to: the default, and
/// registered ones under each schema version and voting algorithm.
fn policies() -> Vec<PolicyDescriptor> {
    let p = |id: &str, v: u32, rules: &str| PolicyDescriptor {
        policy_id: id.into(),
        mode: DECISION.into(),
        description: format!("generated policy {id}"),
        rules: rules.into(),
        schema_version: v,
        registered_at_unix_ms: 0,
    };
    vec![
        p("policy.gen.majority", 3, r#"{"voting":{"algorithm":"majority"}}"#),
        p("policy.gen.unanimous-v1", 1, r#"{"voting":{"algorithm":"unanimous"}}"#),
        p(
            "policy.gen.veto",
            2,
            r#"{"voting":{"algorithm":"plurality"},"objection_handling":{"critical_objection_action":"deny"},"commitment":{"authority":"any_participant"}}"#,
        ),
        p("policy.gen.eval", 3, r#"{"voting":{"algorithm":"none"},"evaluation":{"minimum_confidence":0.5}}"#),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// For any accepted Decision history, under any of the policies above,
    /// replaying under the policy it was recorded under agrees with the
    /// recording on every entry (all APPLIED, the same final state and
    /// resolution) and changes neither the kernel nor the stored records.
    #[test]
    fn replay_under_the_recorded_policy_never_diverges(
        which in 0..5usize,
        ops in proptest::collection::vec(op(), 0..40),
    ) {
        let mut h = H::new();
        let registered = policies();
        for p in &registered {
            h.register_policy_descriptor(p.clone()).unwrap();
        }
        let bound = if which == 0 { String::new() } else { registered[which - 1].policy_id.clone() };
        let sid = h.start_mode(DECISION, "I", &["I", "A", "B"], &bound);
        for op in &ops {
            match op {
                Op::Proposal { who, pid } => {
                    h.msg(WHO[*who], &sid, "Proposal", proposal(&format!("p{pid}")));
                }
                Op::Vote { who, pid, v } => {
                    let v = ["APPROVE", "REJECT", "ABSTAIN"][*v as usize];
                    h.msg(WHO[*who], &sid, "Vote", vote(&format!("p{pid}"), v));
                }
                Op::Evaluation { who, pid, approve } => {
                    let e = EvaluationPayload {
                        proposal_id: format!("p{pid}"),
                        recommendation: if *approve { "APPROVE" } else { "REJECT" }.into(),
                        confidence: 0.7,
                        reason: "e".into(),
                    };
                    h.msg(WHO[*who], &sid, "Evaluation", e.encode_to_vec());
                }
                Op::Objection { who, pid, critical } => {
                    let o = ObjectionPayload {
                        proposal_id: format!("p{pid}"),
                        reason: "o".into(),
                        severity: if *critical { "critical" } else { "low" }.into(),
                    };
                    h.msg(WHO[*who], &sid, "Objection", o.encode_to_vec());
                }
                Op::Commit { who, positive } => {
                    let action = if *positive { "decision.selected" } else { "decision.rejected" };
                    let mut c = commitment(action, *positive);
                    c.commitment_id = h.mid();
                    c.policy_version = bound.clone();
                    h.msg(WHO[*who], &sid, "Commitment", c.encode_to_vec());
                }
                Op::Control { op } => {
                    let op = [ControlOp::Cancel, ControlOp::Suspend, ControlOp::Resume][*op as usize];
                    h.control("I", op, &sid);
                }
                Op::Advance { ms } => {
                    h.now += ms;
                    h.tick();
                }
            }
        }
        let records = history(&h, &sid);
        let recorded_policy = match &records[0].fact {
            Some(Fact::Started(st)) => st.policy.clone().unwrap(),
            other => panic!("first record is not a SessionStart: {other:?}"),
        };
        let kernel_before = h.k.snapshot();
        let log_before = h.records();
        let last = records.last().unwrap().seq;
        let r = what_if::replay(&records, last, &recorded_policy, h.k.modes(), &h.k.config().runtime_id).unwrap();
        prop_assert_eq!(r.first_divergence, None);
        prop_assert!(r.denials.is_empty());
        prop_assert_eq!(&r.recorded, &r.candidate);
        let entries = records.iter().filter(|r| macp_kernel::record::history_envelope(r).is_some()).count();
        prop_assert_eq!(r.entries.len(), entries);
        for e in &r.entries {
            prop_assert_eq!(kind(&e.recorded), Kind::Applied, "entry {:?}", e);
        }
        let outcome = r.candidate.unwrap();
        prop_assert_eq!(outcome.state, h.k.session_state(&sid).unwrap() as i32);
        if let Some(resolution) = h.k.resolution(&sid) {
            prop_assert_eq!(outcome.resolution.as_slice(), resolution);
        }
        prop_assert!(h.k.snapshot() == kernel_before, "the kernel changed");
        prop_assert!(h.records() == log_before, "the stored records changed");
    }
}

#[test]
fn default_policy_id_is_reported_for_an_unbound_start() {
    // A SessionStart recorded without a policy (older logs) reports the
    // default policy id.
    let mut h = H::new();
    let sid = split_vote_session(&mut h);
    let records = history_with_start(&h, &sid, |st| st.policy = None);
    let r = what_if::replay(&records, 5, &default_policy(), h.k.modes(), "macp-runtime").unwrap();
    assert_eq!(r.recorded_policy_id, DEFAULT_POLICY_ID);
}
