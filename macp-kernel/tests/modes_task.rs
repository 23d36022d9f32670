//! Task mode (`macp.mode.task.v1`): DIGEST §3.3, §6.3 and checklist rows 82–88.

mod common;

use common::*;
use macp_kernel::macp_wire::modes::task::{
    TaskAcceptPayload, TaskCompletePayload, TaskFailPayload, TaskRejectPayload, TaskRequestPayload, TaskUpdatePayload,
};
use macp_kernel::macp_wire::v1::SessionState;
use macp_kernel::macp_wire::Message;
use proptest::prelude::*;
use serde_json::json;

const TASK: &str = "macp.mode.task.v1";

fn request(task_id: &str, assignee: &str) -> Vec<u8> {
    TaskRequestPayload {
        task_id: task_id.into(),
        title: "Build".into(),
        instructions: "Do it".into(),
        requested_assignee: assignee.into(),
        input: Vec::new(),
        deadline_unix_ms: 0,
    }
    .encode_to_vec()
}

fn accept(task_id: &str, assignee: &str) -> Vec<u8> {
    TaskAcceptPayload { task_id: task_id.into(), assignee: assignee.into(), reason: "ready".into() }.encode_to_vec()
}

fn reject(task_id: &str, assignee: &str) -> Vec<u8> {
    TaskRejectPayload { task_id: task_id.into(), assignee: assignee.into(), reason: "busy".into() }.encode_to_vec()
}

fn update(task_id: &str) -> Vec<u8> {
    TaskUpdatePayload {
        task_id: task_id.into(),
        status: "working".into(),
        progress: 0.5,
        message: "halfway".into(),
        partial_output: b"part".to_vec(),
    }
    .encode_to_vec()
}

fn complete(task_id: &str, assignee: &str, output: &[u8]) -> Vec<u8> {
    TaskCompletePayload {
        task_id: task_id.into(),
        assignee: assignee.into(),
        output: output.to_vec(),
        summary: "done".into(),
    }
    .encode_to_vec()
}

fn fail(task_id: &str, assignee: &str) -> Vec<u8> {
    TaskFailPayload {
        task_id: task_id.into(),
        assignee: assignee.into(),
        error_code: "E_BROKEN".into(),
        reason: "it broke".into(),
        retryable: true,
    }
    .encode_to_vec()
}

/// A task session `I` → `[I, A, B]` under `policy`.
fn start(h: &mut H, policy: &str) -> String {
    h.start_mode(TASK, "I", &["I", "A", "B"], policy)
}

/// Session with task t1 requested of `assignee` ("" for anyone).
fn requested(h: &mut H, assignee: &str) -> String {
    let sid = start(h, "");
    let a = h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", assignee));
    assert!(a.ok, "{:?}", a.error);
    sid
}

fn ok(a: &macp_kernel::macp_wire::v1::Ack) {
    assert!(a.ok && !a.duplicate, "expected accept, got {:?}", a.error);
}

fn rejected(a: &macp_kernel::macp_wire::v1::Ack, expected: &str) {
    assert!(!a.ok, "expected {expected}, but it was accepted");
    assert_eq!(code(a), expected, "{:?}", a.error);
}

// ----- conformance vectors --------------------------------------------------

#[test]
fn vector_task_happy_path() {
    let mut h = H::new();
    let sid = h.start_mode(TASK, "agent://planner", &["agent://planner", "agent://worker"], "");
    ok(&h.send_mode("agent://planner", &sid, TASK, "TaskRequest", request("t1", "agent://worker")));
    ok(&h.send_mode("agent://worker", &sid, TASK, "TaskAccept", accept("t1", "agent://worker")));
    ok(&h.send_mode("agent://worker", &sid, TASK, "TaskComplete", complete("t1", "agent://worker", b"")));
    assert_eq!(h.state(&sid), SessionState::Open, "TaskComplete alone must not resolve (row 43)");
    ok(&h.commit_mode("agent://planner", &sid, TASK, "task.completed", true));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_eq!(h.projection(&sid)["phase"], "Committed");
    h.assert_replay_matches();
}

#[test]
fn vector_task_reject_paths() {
    let mut h = H::new();
    let sid = h.start_mode(TASK, "agent://planner", &["agent://planner", "agent://worker"], "");
    rejected(&h.send_mode("agent://worker", &sid, TASK, "TaskRequest", request("t1", "agent://worker")), "FORBIDDEN");
    ok(&h.send_mode("agent://planner", &sid, TASK, "TaskRequest", request("t1", "agent://worker")));
    rejected(
        &h.send_mode("agent://planner", &sid, TASK, "TaskRequest", request("t2", "agent://worker")),
        "INVALID_ENVELOPE",
    );
    assert_eq!(h.state(&sid), SessionState::Open);
    assert_eq!(h.projection(&sid)["task"]["task_id"], "t1");
}

// ----- checklist rows 82–88 -----------------------------------------------

#[test]
fn row_82_task_request_only_from_initiator() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("A", &sid, TASK, "TaskRequest", request("t1", "A")), "FORBIDDEN");
    rejected(&h.send_mode("X", &sid, TASK, "TaskRequest", request("t1", "A")), "FORBIDDEN");
    assert_eq!(h.projection(&sid)["phase"], "AwaitingRequest");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "A")));
}

#[test]
fn row_82_external_orchestrator_may_request_without_being_listed() {
    let mut h = H::new();
    let sid = h.start_mode(TASK, "O", &["A"], "");
    ok(&h.send_mode("O", &sid, TASK, "TaskRequest", request("t1", "")));
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "")));
    ok(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t1", "A", b"out")));
    ok(&h.commit_mode("O", &sid, TASK, "task.completed", true));
}

#[test]
fn row_83_second_task_request_rejected() {
    let mut h = H::new();
    let sid = requested(&mut h, "A");
    rejected(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t2", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "A")), "INVALID_ENVELOPE");
}

#[test]
fn row_84_accept_reject_only_from_requested_assignee() {
    let mut h = H::new();
    let sid = requested(&mut h, "A");
    rejected(&h.send_mode("B", &sid, TASK, "TaskAccept", accept("t1", "")), "FORBIDDEN");
    rejected(&h.send_mode("B", &sid, TASK, "TaskAccept", accept("t1", "B")), "FORBIDDEN");
    rejected(&h.send_mode("B", &sid, TASK, "TaskReject", reject("t1", "B")), "FORBIDDEN");
    rejected(&h.send_mode("X", &sid, TASK, "TaskAccept", accept("t1", "X")), "FORBIDDEN");
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
}

#[test]
fn row_84_without_requested_assignee_anyone_but_the_initiator_may_respond() {
    let mut h = H::new();
    let sid = requested(&mut h, "");
    rejected(&h.send_mode("I", &sid, TASK, "TaskAccept", accept("t1", "")), "FORBIDDEN");
    ok(&h.send_mode("B", &sid, TASK, "TaskAccept", accept("t1", "")));
    assert_eq!(h.projection(&sid)["active_assignee"], "B");
}

#[test]
fn row_85_first_accept_wins() {
    let mut h = H::new();
    let sid = requested(&mut h, "");
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    rejected(&h.send_mode("B", &sid, TASK, "TaskAccept", accept("t1", "B")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["active_assignee"], "A");
    assert_eq!(h.projection(&sid)["phase"], "Assigned");
}

#[test]
fn row_86_update_complete_fail_only_from_active_assignee() {
    let mut h = H::new();
    let sid = requested(&mut h, "");
    // Nobody is assigned yet.
    rejected(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t1", "A", b"x")), "FORBIDDEN");
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    rejected(&h.send_mode("B", &sid, TASK, "TaskComplete", complete("t1", "", b"x")), "FORBIDDEN");
    rejected(&h.send_mode("B", &sid, TASK, "TaskUpdate", update("t1")), "FORBIDDEN");
    rejected(&h.send_mode("B", &sid, TASK, "TaskFail", fail("t1", "")), "FORBIDDEN");
    rejected(&h.send_mode("I", &sid, TASK, "TaskComplete", complete("t1", "", b"x")), "FORBIDDEN");
    ok(&h.send_mode("A", &sid, TASK, "TaskUpdate", update("t1")));
    ok(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t1", "A", b"x")));
    // Only one terminal report, and nothing after it.
    rejected(&h.send_mode("A", &sid, TASK, "TaskFail", fail("t1", "A")), "FORBIDDEN");
    rejected(&h.send_mode("A", &sid, TASK, "TaskUpdate", update("t1")), "FORBIDDEN");
    assert_eq!(h.projection(&sid)["phase"], "Reported");
    assert_eq!(h.projection(&sid)["updates"].as_array().unwrap().len(), 1);
}

#[test]
fn row_87_commitment_needs_terminal_report() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.commit_mode("I", &sid, TASK, "task.completed", true), "INVALID_ENVELOPE");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskUpdate", update("t1")));
    rejected(&h.commit_mode("I", &sid, TASK, "task.completed", true), "INVALID_ENVELOPE");
    assert_eq!(h.state(&sid), SessionState::Open);
    ok(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t1", "A", b"")));
    ok(&h.commit_mode("I", &sid, TASK, "task.completed", true));
    assert_eq!(h.state(&sid), SessionState::Resolved);
}

#[test]
fn row_88_negative_outcome_task_failed() {
    let mut h = H::new();
    let sid = requested(&mut h, "A");
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskFail", fail("t1", "A")));
    assert_eq!(h.state(&sid), SessionState::Open);
    // The kernel's polarity check still applies: task.failed must be negative.
    rejected(&h.commit_mode("I", &sid, TASK, "task.failed", true), "INVALID_ENVELOPE");
    ok(&h.commit_mode("I", &sid, TASK, "task.failed", false));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    let p = h.projection(&sid);
    assert_eq!(p["terminal_report"]["type"], "TaskFail");
    assert_eq!(p["commitment"]["action"], "task.failed");
    assert_eq!(p["commitment"]["outcome_positive"], false);
    h.assert_replay_matches();
}

// ----- start rules, validation ---------------------------------------------

#[test]
fn start_needs_a_participant_other_than_the_initiator() {
    let mut h = H::new();
    let (_, a) = h.try_start(TASK, "I", &["I"], "");
    rejected(&a, "INVALID_ENVELOPE");
    let (_, a) = h.try_start(TASK, "I", &["A"], "");
    ok(&a);
}

#[test]
fn unknown_message_type_is_invalid_envelope() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("A", &sid, TASK, "Vote", Vec::new()), "INVALID_ENVELOPE");
    rejected(&h.send_mode("X", &sid, TASK, "Vote", Vec::new()), "INVALID_ENVELOPE");
}

#[test]
fn request_validation() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("I", &sid, TASK, "TaskRequest", request("", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, TASK, "TaskRequest", request("  ", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "Z")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, TASK, "TaskRequest", vec![0xff, 0xff]), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["phase"], "AwaitingRequest");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "A")));
}

#[test]
fn later_messages_need_a_request_and_the_same_task_id() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, TASK, "TaskReject", reject("t1", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, TASK, "TaskUpdate", update("t1")), "INVALID_ENVELOPE");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "")));
    rejected(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t2", "A")), "INVALID_ENVELOPE");
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    rejected(&h.send_mode("A", &sid, TASK, "TaskUpdate", update("t2")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t2", "A", b"")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, TASK, "TaskFail", fail("", "A")), "INVALID_ENVELOPE");
}

#[test]
fn assignee_field_must_name_the_sender() {
    let mut h = H::new();
    let sid = requested(&mut h, "");
    rejected(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "B")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, TASK, "TaskReject", reject("t1", "B")), "INVALID_ENVELOPE");
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    rejected(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t1", "B", b"")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, TASK, "TaskFail", fail("t1", "B")), "INVALID_ENVELOPE");
}

#[test]
fn each_participant_rejects_only_once() {
    let mut h = H::new();
    let sid = requested(&mut h, "");
    ok(&h.send_mode("A", &sid, TASK, "TaskReject", reject("t1", "A")));
    rejected(&h.send_mode("A", &sid, TASK, "TaskReject", reject("t1", "A")), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["rejections"].as_array().unwrap().len(), 1);
}

#[test]
fn non_assignee_reject_after_assignment_is_invalid() {
    let mut h = H::new();
    let sid = requested(&mut h, "");
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    rejected(&h.send_mode("B", &sid, TASK, "TaskReject", reject("t1", "B")), "INVALID_ENVELOPE");
}

// ----- policy rules ----------------------------------------------------------

#[test]
fn policy_accept_after_reject_denied_without_reassignment() {
    let mut h = H::new();
    let sid = requested(&mut h, "");
    ok(&h.send_mode("A", &sid, TASK, "TaskReject", reject("t1", "A")));
    rejected(&h.send_mode("B", &sid, TASK, "TaskAccept", accept("t1", "B")), "POLICY_DENIED");
    assert_eq!(h.projection(&sid)["active_assignee"], serde_json::Value::Null);
}

#[test]
fn policy_assignee_reject_denied_without_reassignment() {
    let mut h = H::new();
    let sid = requested(&mut h, "A");
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    let a = h.send_mode("A", &sid, TASK, "TaskReject", reject("t1", "A"));
    rejected(&a, "POLICY_DENIED");
    let details: serde_json::Value = serde_json::from_slice(&a.error.unwrap().details).unwrap();
    assert_eq!(details["reasons"].as_array().unwrap().len(), 1);
    assert_eq!(h.projection(&sid)["active_assignee"], "A");
}

#[test]
fn policy_allow_reassignment_on_reject() {
    let mut h = H::new();
    h.register_rules("policy.task.reassign", TASK, json!({"assignment": {"allow_reassignment_on_reject": true}}))
        .unwrap();
    let sid = start(&mut h, "policy.task.reassign");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "")));
    ok(&h.send_mode("B", &sid, TASK, "TaskReject", reject("t1", "B")));
    // Another participant may still take the task.
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    // The active assignee hands it back: the task is unassigned again.
    ok(&h.send_mode("A", &sid, TASK, "TaskReject", reject("t1", "A")));
    let p = h.projection(&sid);
    assert_eq!(p["active_assignee"], serde_json::Value::Null);
    assert_eq!(p["phase"], "Requested");
    assert_eq!(p["rejections"][1]["while_assigned"], true);
    // Everyone rejected once; B may still accept after its earlier reject.
    ok(&h.send_mode("B", &sid, TASK, "TaskAccept", accept("t1", "B")));
    ok(&h.send_mode("B", &sid, TASK, "TaskComplete", complete("t1", "B", b"result")));
    ok(&h.commit_mode("I", &sid, TASK, "task.completed", true));
    h.assert_replay_matches();
}

#[test]
fn policy_require_output_denies_positive_commit_without_output() {
    let mut h = H::new();
    h.register_rules("policy.task.output", TASK, json!({"completion": {"require_output": true}})).unwrap();
    let sid = start(&mut h, "policy.task.output");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t1", "A", b"")));
    rejected(&h.commit_mode("I", &sid, TASK, "task.completed", true), "POLICY_DENIED");
    assert_eq!(h.state(&sid), SessionState::Open);
    // A negative commit is never gated by require_output.
    ok(&h.commit_mode("I", &sid, TASK, "task.failed", false));
}

#[test]
fn policy_require_output_allows_positive_commit_with_output() {
    let mut h = H::new();
    h.register_rules("policy.task.output", TASK, json!({"completion": {"require_output": true}})).unwrap();
    let sid = start(&mut h, "policy.task.output");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t1", "A", b"artifact")));
    ok(&h.commit_mode("I", &sid, TASK, "task.completed", true));
}

#[test]
fn policy_require_output_denies_positive_commit_after_fail() {
    let mut h = H::new();
    h.register_rules("policy.task.output", TASK, json!({"completion": {"require_output": true}})).unwrap();
    let sid = start(&mut h, "policy.task.output");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskFail", fail("t1", "A")));
    rejected(&h.commit_mode("I", &sid, TASK, "task.completed", true), "POLICY_DENIED");
}

#[test]
fn policy_any_participant_authority_applies_to_task_commitments() {
    let mut h = H::new();
    h.register_rules("policy.task.any", TASK, json!({"commitment": {"authority": "any_participant"}})).unwrap();
    let sid = start(&mut h, "policy.task.any");
    ok(&h.send_mode("I", &sid, TASK, "TaskRequest", request("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskAccept", accept("t1", "A")));
    ok(&h.send_mode("A", &sid, TASK, "TaskComplete", complete("t1", "A", b"")));
    rejected(&h.commit_mode("X", &sid, TASK, "task.completed", true), "FORBIDDEN");
    ok(&h.commit_mode("B", &sid, TASK, "task.completed", true));
}

#[test]
fn policy_rules_are_type_checked_at_registration() {
    let mut h = H::new();
    for bad in [
        json!({"assignment": true}),
        json!({"assignment": {"allow_reassignment_on_reject": "yes"}}),
        json!({"completion": {"require_output": 1}}),
        json!({"completion": []}),
    ] {
        let e = h.register_rules("policy.task.bad", TASK, bad.clone()).unwrap_err();
        assert_eq!(e.code.as_str(), "INVALID_POLICY_DEFINITION", "{bad}: {e}");
    }
    h.register_rules("policy.task.good", TASK, json!({"assignment": {}, "completion": {"require_output": false}}))
        .unwrap();
}

#[test]
fn policy_wildcard_rules_are_checked_at_start() {
    // A `*` policy is checked against the Decision schema when registered;
    // the task sections are checked when a task session binds it.
    let mut h = H::new();
    match h.register_rules("policy.star.bad", "*", json!({"completion": {"require_output": "yes"}})) {
        Err(e) => assert_eq!(e.code.as_str(), "INVALID_POLICY_DEFINITION"),
        Ok(_) => rejected(&h.try_start(TASK, "I", &["I", "A"], "policy.star.bad").1, "INVALID_POLICY_DEFINITION"),
    }
}

#[test]
fn descriptor_is_listed_as_standards_track() {
    let h = H::new();
    let d = h.k.modes().standards_track().into_iter().find(|d| d.mode == TASK).expect("task listed");
    assert_eq!(d.mode_version, "1.0.0");
    assert_eq!(d.determinism_class, "structural-only");
    assert_eq!(d.participant_model, "orchestrated");
    assert_eq!(d.message_types.first().map(String::as_str), Some("SessionStart"));
    assert_eq!(d.message_types.last().map(String::as_str), Some("Commitment"));
    assert_eq!(d.terminal_message_types, vec!["Commitment".to_string()]);
    assert_eq!(d.schema_uris["protobuf"], "buf.build/multiagentcoordinationprotocol/macp");
}

// ----- properties ------------------------------------------------------------

/// One step of a random task session. Senders are drawn either from the
/// fixed list (participants and an outsider) or, to reach deep states often,
/// as the "plausible" sender the current state suggests.
#[derive(Clone, Debug)]
enum Step {
    /// (sender pick, message kind, task id choice, assignee-field choice, output)
    Send(usize, usize, usize, usize, bool),
    Garbage(usize, usize),
    Commit(usize, bool),
    Tick(i64),
}

const SENDERS: [&str; 5] = ["I", "A", "B", "C", "X"]; // C is listed, X is an outsider
const KINDS: [&str; 7] = ["TaskRequest", "TaskAccept", "TaskReject", "TaskUpdate", "TaskComplete", "TaskFail", "Bogus"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..10usize, 0..KINDS.len(), 0..5usize, 0..4usize, any::<bool>())
            .prop_map(|(s, k, t, a, o)| Step::Send(s, k, t, a, o)),
        1 => (0..SENDERS.len(), 0..KINDS.len()).prop_map(|(s, k)| Step::Garbage(s, k)),
        2 => (0..8usize, any::<bool>()).prop_map(|(s, p)| Step::Commit(s, p)),
        1 => (1..1_500i64).prop_map(Step::Tick),
    ]
}

/// Picks a sender: `pick < 7` means the one the state makes plausible.
fn sender(h: &H, sid: &str, pick: usize, kind: &str, salt: usize) -> String {
    if pick >= 7 {
        return SENDERS[pick % SENDERS.len()].to_string();
    }
    let p = h.projection(sid);
    match kind {
        "TaskRequest" | "Commitment" => "I".into(),
        "TaskAccept" | "TaskReject" => match p["task"]["requested_assignee"].as_str() {
            Some(a) if !a.is_empty() => a.into(),
            _ => ["A", "B", "C"][salt % 3].into(),
        },
        _ => p["active_assignee"].as_str().unwrap_or("A").into(),
    }
}

fn payload(kind: &str, task: &str, assignee: &str, output: bool) -> Vec<u8> {
    let out: &[u8] = if output { b"out" } else { b"" };
    match kind {
        "TaskRequest" => request(task, assignee),
        "TaskAccept" => accept(task, assignee),
        "TaskReject" => reject(task, assignee),
        "TaskUpdate" => update(task),
        "TaskComplete" => complete(task, assignee, out),
        "TaskFail" => fail(task, assignee),
        _ => Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_task_sessions_stay_consistent(
        reassign in any::<bool>(),
        require_output in any::<bool>(),
        prefix in 0..4usize,
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let mut h = H::new();
        let rules = json!({
            "assignment": {"allow_reassignment_on_reject": reassign},
            "completion": {"require_output": require_output},
        });
        h.register_rules("policy.task.prop", TASK, rules).unwrap();
        let sid = h.start_mode(TASK, "I", &["I", "A", "B", "C"], "policy.task.prop");
        let mut resolved = false;
        // Oracle, from accepted acks only: the kind of terminal report and
        // whether it carried output.
        let mut report: Option<(&str, bool)> = None;
        // Most runs start from a valid request so that deep states are hit.
        if prefix > 0 {
            let assignee = ["", "", "A", "B"][prefix];
            prop_assert!(h.send_mode_checked("I", &sid, TASK, "TaskRequest", request("t1", assignee)).ok);
        }
        for s in steps {
            match s {
                Step::Send(pick, ki, ti, ai, o) => {
                    let kind = KINDS[ki];
                    let who = sender(&h, &sid, pick, kind, ti);
                    let task = ["t1", "t1", "t1", "t2", ""][ti];
                    // Requests name an assignee from the list, other kinds
                    // usually leave the field empty or name the sender.
                    let assignee = if kind == "TaskRequest" {
                        ["", "A", "B", "Z"][ai].to_string()
                    } else {
                        ["", "", who.as_str(), "A"][ai].to_string()
                    };
                    let a = h.send_mode_checked(&who, &sid, TASK, kind, payload(kind, task, &assignee, o));
                    prop_assert!(!(resolved && a.ok), "accepted after RESOLVED");
                    if a.ok && (kind == "TaskComplete" || kind == "TaskFail") {
                        prop_assert!(report.is_none(), "a second terminal report was accepted");
                        report = Some((kind, o));
                    }
                }
                Step::Garbage(si, ki) => {
                    let a = h.send_mode_checked(SENDERS[si], &sid, TASK, KINDS[ki], vec![0xff, 0x01, 0x02]);
                    prop_assert!(!a.ok, "garbage accepted");
                }
                Step::Commit(pick, positive) => {
                    let who = sender(&h, &sid, pick, "Commitment", 0);
                    let action = if positive { "task.completed" } else { "task.failed" };
                    let a = h.commit_mode_checked(&who, &sid, TASK, action, positive);
                    prop_assert!(!(resolved && a.ok), "commitment accepted after RESOLVED");
                    if a.ok {
                        prop_assert_eq!(who.as_str(), "I");
                        let Some((kind, output)) = report else {
                            return Err(TestCaseError::fail("commitment accepted without a terminal report"));
                        };
                        if positive && require_output {
                            prop_assert!(kind == "TaskComplete" && output, "require_output not enforced");
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
