//! Policy binding at SessionStart and the policy registry's own rules
//! (DIGEST §9 rows 27–29, 101–102), and intermediate outcomes (row 43).

mod common;

use common::*;
use macp_kernel::macp_wire::modes::{handoff, quorum, task};
use macp_kernel::macp_wire::v1::SessionState;
use macp_kernel::macp_wire::Message;
use macp_kernel::{ErrorCode, Identity};

#[test]
fn row_27_empty_policy_version_binds_default() {
    let mut h = H::new();
    let sid = h.start_default();
    let md = h.k.get_session(&Identity::new("I"), &sid).unwrap();
    assert_eq!(md.policy_version, "policy.default");
}

#[test]
fn row_28_unknown_policy_rejected() {
    let mut h = H::new();
    let (_, ack) = h.try_start(DECISION, "I", &["I", "A"], "policy.nope");
    assert_eq!(code(&ack), "UNKNOWN_POLICY_VERSION");
}

#[test]
fn row_29_policy_of_another_mode_rejected() {
    let mut h = H::new();
    h.register_policy("policy.q", "macp.mode.quorum.v1", 1, "{}").unwrap();
    let (_, ack) = h.try_start(DECISION, "I", &["I", "A"], "policy.q");
    assert_eq!(code(&ack), "INVALID_POLICY_DEFINITION");
}

#[test]
fn row_101_default_policy_is_reserved() {
    let mut h = H::new();
    let d = h.k.policies().get("policy.default").unwrap().clone();
    assert_eq!(d.mode, "*");
    let err = h.register_policy("policy.default", "*", 1, "{}").unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidPolicyDefinition);
    assert!(h.unregister_policy("policy.default").is_err());
    assert!(h.k.policies().get("policy.default").is_some());
}

#[test]
fn row_102_policy_ids_are_unique() {
    let mut h = H::new();
    h.register_policy("policy.team.a", DECISION, 1, "{}").unwrap();
    let err = h.register_policy("policy.team.a", DECISION, 1, r#"{"voting":{"algorithm":"majority"}}"#).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidPolicyDefinition);
    // Unknown schema versions and non-object rules are refused too.
    assert!(h.register_policy("policy.team.b", DECISION, 9, "{}").is_err());
    assert!(h.register_policy("policy.team.c", DECISION, 1, "[1,2]").is_err());
    assert!(h.register_policy("policy.team.d", DECISION, 1, "{not json").is_err());
}

#[test]
fn row_43_intermediate_outcomes_do_not_resolve() {
    let mut h = H::new();
    // Task: TaskComplete leaves the session OPEN.
    let t = h.start_mode("macp.mode.task.v1", "P", &["P", "W"], "");
    let req = task::TaskRequestPayload { task_id: "t1".into(), requested_assignee: "W".into(), ..Default::default() };
    assert!(h.send_mode("P", &t, "macp.mode.task.v1", "TaskRequest", req.encode_to_vec()).ok);
    let acc = task::TaskAcceptPayload { task_id: "t1".into(), ..Default::default() };
    assert!(h.send_mode("W", &t, "macp.mode.task.v1", "TaskAccept", acc.encode_to_vec()).ok);
    let done = task::TaskCompletePayload { task_id: "t1".into(), output: b"ok".to_vec(), ..Default::default() };
    let ack = h.send_mode("W", &t, "macp.mode.task.v1", "TaskComplete", done.encode_to_vec());
    assert_eq!(ack.session_state, SessionState::Open as i32);
    // Handoff: HandoffAccept leaves it OPEN.
    let s = h.start_mode("macp.mode.handoff.v1", "O", &["O", "T"], "");
    let offer =
        handoff::HandoffOfferPayload { handoff_id: "h1".into(), target_participant: "T".into(), ..Default::default() };
    assert!(h.send_mode("O", &s, "macp.mode.handoff.v1", "HandoffOffer", offer.encode_to_vec()).ok);
    let acc = handoff::HandoffAcceptPayload { handoff_id: "h1".into(), ..Default::default() };
    let ack = h.send_mode("T", &s, "macp.mode.handoff.v1", "HandoffAccept", acc.encode_to_vec());
    assert!(ack.ok, "{:?}", ack.error);
    assert_eq!(ack.session_state, SessionState::Open as i32);
    // Quorum: reaching the threshold leaves it OPEN.
    let q = h.start_mode("macp.mode.quorum.v1", "C", &["C", "A", "B"], "");
    let r = quorum::ApprovalRequestPayload { request_id: "r1".into(), required_approvals: 1, ..Default::default() };
    assert!(h.send_mode("C", &q, "macp.mode.quorum.v1", "ApprovalRequest", r.encode_to_vec()).ok);
    let a = quorum::ApprovePayload { request_id: "r1".into(), ..Default::default() };
    let ack = h.send_mode("A", &q, "macp.mode.quorum.v1", "Approve", a.encode_to_vec());
    assert_eq!(ack.session_state, SessionState::Open as i32);
    for sid in [t, s, q] {
        assert_eq!(h.state(&sid), SessionState::Open);
    }
}

/// RegisterPolicy admission as of RFC-MACP-0012 1.5.0: schema versions 1–3,
/// a required description, and the reserved `policy.std.*` namespace.
#[test]
fn admission_follows_rfc_0012_1_5() {
    use macp_kernel::policy::canonical_profile;
    let mut h = H::new();
    for v in [1, 2, 3] {
        h.register_policy(&format!("policy.team.v{v}"), DECISION, v, r#"{"voting":{"algorithm":"majority"}}"#)
            .unwrap_or_else(|e| panic!("schema_version {v}: {e}"));
    }
    for v in [0, 4] {
        let e = h.register_policy("policy.team.bad", DECISION, v, "{}").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidPolicyDefinition);
        assert!(e.message.contains("supported: 1, 2, 3"), "{e}");
    }

    // description is required.
    let mut d = canonical_profile("policy.std.majority").unwrap();
    d.policy_id = "policy.team.nodesc".into();
    d.description = String::new();
    let e = register(&mut h, d).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidPolicyDefinition);
    assert!(e.message.starts_with("description is required"), "{e}");

    // policy.std.*: unprovided ids do not resolve; only canonical profiles
    // register, whatever defaults or annotations they spell out.
    let (_, ack) = h.try_start(DECISION, "I", &["I", "A"], "policy.std.unanimous");
    assert_eq!(code(&ack), "UNKNOWN_POLICY_VERSION");
    let e = h.register_policy("policy.std.other", DECISION, 1, "{}").unwrap_err();
    assert!(e.message.contains("not an assigned profile"), "{e}");
    let mut wrong = canonical_profile("policy.std.majority").unwrap();
    wrong.rules = r#"{"voting":{"algorithm":"majority","threshold":0.6,"quorum":{"type":"count","value":1}},"commitment":{"require_vote_quorum":true}}"#.into();
    assert!(register(&mut h, wrong).unwrap_err().message.contains("may only be registered exactly"));
    let mut wrong_version = canonical_profile("policy.std.unanimous").unwrap();
    wrong_version.schema_version = 3;
    assert!(register(&mut h, wrong_version).is_err());
    let mut spelled_out = canonical_profile("policy.std.majority").unwrap();
    spelled_out.rules = r#"{"_why":"canonical","voting":{"algorithm":"majority","quorum":{"type":"count","value":1}},
        "objection_handling":{"veto_threshold":1,"critical_severity_vetoes":false},
        "commitment":{"require_vote_quorum":true,"authority":"initiator_only"}}"#
        .into();
    register(&mut h, spelled_out).expect("semantically canonical");
    for id in ["policy.std.supermajority", "policy.std.unanimous"] {
        register(&mut h, canonical_profile(id).unwrap()).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let sid = h.start_ok(DECISION, "I", &["I", "A"], "policy.std.unanimous");
    assert_eq!(h.k.get_session(&Identity::new("I"), &sid).unwrap().policy_version, "policy.std.unanimous");
    h.assert_replay_matches();
}

/// A registration recorded before today's admission rules (no description,
/// a supermajority without threshold, an explicit weight 0, a `*` policy with
/// Decision sections) still replays and binds sessions: admission-time
/// schemas are never re-applied to a stored descriptor (RFC-MACP-0012 §8).
#[test]
fn stored_registrations_replay_without_todays_admission_rules() {
    let mut h = H::new();
    let rules = r#"{"voting":{"algorithm":"supermajority","weights":{"A":0}},"unknown":{"x":1}}"#;
    assert!(h.register_policy("policy.old.a", "*", 1, rules).is_err(), "admission refuses it today");
    h.register_stored("policy.old.a", "*", 1, rules).expect("a stored registration applies");
    let sid = h.start_ok(DECISION, "I", &["I", "A", "B"], "policy.old.a");
    assert_eq!(h.state(&sid), SessionState::Open);
    // Even storage refuses what could never be evaluated.
    assert!(h.register_stored("policy.old.b", DECISION, 7, "{}").is_err());
    assert!(h.register_stored("policy.old.c", DECISION, 1, "[]").is_err());
    h.assert_replay_matches();
}

fn register(h: &mut H, d: macp_kernel::macp_wire::v1::PolicyDescriptor) -> Result<String, macp_kernel::KernelError> {
    h.register_policy_descriptor(d)
}
