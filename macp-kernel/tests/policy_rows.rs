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
