//! Handoff mode (`macp.mode.handoff.v1`): DIGEST §3.4, §6.3 and checklist
//! rows 89–95, plus the implicit accept driven by the mode timer.

mod common;

use std::collections::BTreeMap;

use common::*;
use macp_kernel::macp_wire::modes::handoff::{
    HandoffAcceptPayload, HandoffContextPayload, HandoffDeclinePayload, HandoffOfferPayload,
};
use macp_kernel::macp_wire::storage::record::Fact;
use macp_kernel::macp_wire::v1::{Ack, Envelope, SessionState};
use macp_kernel::macp_wire::Message;
use macp_kernel::{ControlOp, Effect};
use proptest::prelude::*;
use serde_json::json;

const HANDOFF: &str = "macp.mode.handoff.v1";

fn offer(id: &str, target: &str) -> Vec<u8> {
    HandoffOfferPayload {
        handoff_id: id.into(),
        target_participant: target.into(),
        scope: "support".into(),
        reason: "escalate".into(),
    }
    .encode_to_vec()
}

fn context(id: &str) -> Vec<u8> {
    HandoffContextPayload { handoff_id: id.into(), content_type: "text/plain".into(), context: b"notes".to_vec() }
        .encode_to_vec()
}

fn accept(id: &str, by: &str) -> Vec<u8> {
    HandoffAcceptPayload { handoff_id: id.into(), accepted_by: by.into(), reason: "ready".into(), implicit: false }
        .encode_to_vec()
}

fn implicit_accept(id: &str, by: &str) -> Vec<u8> {
    HandoffAcceptPayload { handoff_id: id.into(), accepted_by: by.into(), reason: "sneaky".into(), implicit: true }
        .encode_to_vec()
}

fn decline(id: &str, by: &str) -> Vec<u8> {
    HandoffDeclinePayload { handoff_id: id.into(), declined_by: by.into(), reason: "busy".into() }.encode_to_vec()
}

fn start(h: &mut H, policy: &str) -> String {
    h.start_mode(HANDOFF, "I", &["I", "A", "B"], policy)
}

fn ok(a: &Ack) {
    assert!(a.ok && !a.duplicate, "expected accept, got {:?}", a.error);
}

fn rejected(a: &Ack, expected: &str) {
    assert!(!a.ok, "expected {expected}, but it was accepted");
    assert_eq!(code(a), expected, "{:?}", a.error);
}

fn disposition(h: &H, sid: &str, id: &str) -> String {
    h.projection(sid)["offers"][id]["disposition"].as_str().unwrap_or("").to_string()
}

/// Accepted envelopes among `effects` (from Persist records).
fn persisted_envelopes(effects: &[Effect]) -> Vec<Envelope> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Persist(r) => match &r.fact {
                Some(Fact::Accepted(env)) => Some(env.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn implicit_policy(h: &mut H, id: &str, timeout_ms: i64) {
    h.register_rules(id, HANDOFF, json!({"acceptance": {"implicit_accept_timeout_ms": timeout_ms}})).unwrap();
}

// ----- conformance vectors --------------------------------------------------

#[test]
fn vector_handoff_happy_path() {
    let mut h = H::new();
    let sid = h.start_mode(HANDOFF, "agent://owner", &["agent://owner", "agent://target"], "");
    ok(&h.send_mode("agent://owner", &sid, HANDOFF, "HandoffOffer", offer("h1", "agent://target")));
    ok(&h.send_mode("agent://target", &sid, HANDOFF, "HandoffAccept", accept("h1", "agent://target")));
    assert_eq!(h.state(&sid), SessionState::Open, "HandoffAccept alone must not resolve (row 43)");
    ok(&h.commit_mode("agent://owner", &sid, HANDOFF, "handoff.accepted", true));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_eq!(h.projection(&sid)["phase"], "Committed");
    h.assert_replay_matches();
}

#[test]
fn vector_handoff_reject_paths() {
    let mut h = H::new();
    let sid = h.start_mode(HANDOFF, "agent://owner", &["agent://owner", "agent://target"], "");
    rejected(
        &h.send_mode("agent://target", &sid, HANDOFF, "HandoffAccept", accept("h1", "agent://target")),
        "INVALID_ENVELOPE",
    );
    ok(&h.send_mode("agent://owner", &sid, HANDOFF, "HandoffOffer", offer("h1", "agent://target")));
    ok(&h.send_mode("agent://target", &sid, HANDOFF, "HandoffAccept", accept("h1", "agent://target")));
    ok(&h.send_mode("agent://owner", &sid, HANDOFF, "HandoffContext", context("h1")));
    assert_eq!(h.state(&sid), SessionState::Open);
    assert_eq!(disposition(&h, &sid, "h1"), "Accepted");
    assert!(h.k.resolution(&sid).is_none());
}

// ----- checklist rows 89–95 -----------------------------------------------

#[test]
fn row_89_offer_only_from_owner() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffOffer", offer("h1", "B")), "FORBIDDEN");
    rejected(&h.send_mode("X", &sid, HANDOFF, "HandoffOffer", offer("h1", "B")), "FORBIDDEN");
    assert_eq!(h.projection(&sid)["phase"], "AwaitingOffer");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "B")));
}

#[test]
fn row_90_references_must_exist() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h1", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffContext", context("h1")), "INVALID_ENVELOPE");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h2", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("", "A")), "INVALID_ENVELOPE");
}

#[test]
fn row_91_accept_decline_only_from_target() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    rejected(&h.send_mode("B", &sid, HANDOFF, "HandoffAccept", accept("h1", "")), "FORBIDDEN");
    rejected(&h.send_mode("B", &sid, HANDOFF, "HandoffDecline", decline("h1", "B")), "FORBIDDEN");
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffAccept", accept("h1", "")), "FORBIDDEN");
    rejected(&h.send_mode("X", &sid, HANDOFF, "HandoffAccept", accept("h1", "")), "FORBIDDEN");
    assert_eq!(disposition(&h, &sid, "h1"), "Offered");
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h1", "")));
}

#[test]
fn row_92_second_offer_while_pending_rejected() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h2", "B")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h2", "A")), "INVALID_ENVELOPE");
    // After a decline, a new offer with a new id is fine.
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "A")));
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "B")), "INVALID_ENVELOPE");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h2", "B")));
}

#[test]
fn row_92_offer_after_accept_rejected() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h1", "A")));
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h2", "B")), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["offers"].as_object().unwrap().len(), 1);
}

#[test]
fn row_93_no_competing_accept() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h1", "A")));
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h1", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "A")), "INVALID_ENVELOPE");
    assert_eq!(disposition(&h, &sid, "h1"), "Accepted");
}

#[test]
fn row_93_no_accept_after_decline() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "A")));
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h1", "A")), "INVALID_ENVELOPE");
    assert_eq!(disposition(&h, &sid, "h1"), "Declined");
}

#[test]
fn row_94_commitment_needs_accept_or_decline() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.commit_mode("I", &sid, HANDOFF, "handoff.accepted", true), "INVALID_ENVELOPE");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffContext", context("h1")));
    rejected(&h.commit_mode("I", &sid, HANDOFF, "handoff.accepted", true), "INVALID_ENVELOPE");
    assert_eq!(h.state(&sid), SessionState::Open);
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h1", "A")));
    ok(&h.commit_mode("I", &sid, HANDOFF, "handoff.accepted", true));
}

#[test]
fn row_95_late_context_accepted() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffContext", context("h1")));
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "A")));
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffContext", context("h1")));
    assert_eq!(h.projection(&sid)["contexts"]["h1"].as_array().unwrap().len(), 2);
    // Context comes only from the offer's author.
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffContext", context("h1")), "FORBIDDEN");
    rejected(&h.send_mode("X", &sid, HANDOFF, "HandoffContext", context("h1")), "FORBIDDEN");
}

// ----- negative outcome, start rules, validation ---------------------------

#[test]
fn negative_outcome_handoff_declined() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "A")));
    rejected(&h.commit_mode("I", &sid, HANDOFF, "handoff.declined", true), "INVALID_ENVELOPE");
    ok(&h.commit_mode("I", &sid, HANDOFF, "handoff.declined", false));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    let p = h.projection(&sid);
    assert_eq!(p["offers"]["h1"]["declined_by"], "A");
    assert_eq!(p["commitment"]["outcome_positive"], false);
    h.assert_replay_matches();
}

#[test]
fn start_needs_two_participants_including_the_owner() {
    let mut h = H::new();
    rejected(&h.try_start(HANDOFF, "I", &["I"], "").1, "INVALID_ENVELOPE");
    rejected(&h.try_start(HANDOFF, "I", &["A", "B"], "").1, "INVALID_ENVELOPE");
    ok(&h.try_start(HANDOFF, "I", &["A", "I"], "").1);
}

#[test]
fn offer_validation() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("", "A")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "Z")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "I")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", vec![0xff, 0xff]), "INVALID_ENVELOPE");
    rejected(&h.send_mode("I", &sid, HANDOFF, "Proposal", Vec::new()), "INVALID_ENVELOPE");
    assert_eq!(h.projection(&sid)["phase"], "AwaitingOffer");
}

#[test]
fn answer_must_name_the_sender() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", accept("h1", "B")), "INVALID_ENVELOPE");
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "B")), "INVALID_ENVELOPE");
    assert_eq!(disposition(&h, &sid, "h1"), "Offered");
}

// ----- implicit accept ---------------------------------------------------------

#[test]
fn implicit_accept_fires_on_tick_and_enables_commitment() {
    let mut h = H::new();
    implicit_policy(&mut h, "policy.handoff.implicit", 5_000);
    let sid = start(&mut h, "policy.handoff.implicit");
    let offered_at = h.now;
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    assert_eq!(h.k.next_deadline(), Some(offered_at + 5_000));

    h.now = offered_at + 4_999;
    assert!(persisted_envelopes(&h.tick()).is_empty(), "nothing is due yet");
    assert_eq!(disposition(&h, &sid, "h1"), "Offered");

    h.now = offered_at + 5_000;
    let fired = persisted_envelopes(&h.tick());
    assert_eq!(fired.len(), 1, "exactly one implicit accept is recorded");
    let env = &fired[0];
    assert_eq!(env.message_type, "HandoffAccept");
    assert_eq!(env.sender, "macp-runtime");
    assert_eq!(env.message_id, "macp-runtime:implicit-accept:h1");
    let p = HandoffAcceptPayload::decode(env.payload.as_slice()).unwrap();
    assert!(p.implicit);
    assert_eq!(p.accepted_by, "A");
    assert_eq!(p.handoff_id, "h1");

    let proj = h.projection(&sid);
    assert_eq!(proj["offers"]["h1"]["disposition"], "Accepted");
    assert_eq!(proj["offers"]["h1"]["implicit"], true);
    assert_eq!(proj["offers"]["h1"]["accepted_by"], "A");
    assert_eq!(h.state(&sid), SessionState::Open, "an implicit accept does not resolve");
    // A later tick has nothing more to do, and the target can no longer answer.
    h.now += 10;
    assert!(persisted_envelopes(&h.tick()).is_empty());
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "A")), "INVALID_ENVELOPE");

    ok(&h.commit_mode("I", &sid, HANDOFF, "handoff.accepted", true));
    assert_eq!(h.state(&sid), SessionState::Resolved);
    h.assert_replay_matches();
}

#[test]
fn implicit_accept_does_not_fire_for_answered_offers() {
    let mut h = H::new();
    implicit_policy(&mut h, "policy.handoff.implicit", 1_000);
    let sid = start(&mut h, "policy.handoff.implicit");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    h.now += 500;
    ok(&h.send_mode("A", &sid, HANDOFF, "HandoffDecline", decline("h1", "A")));
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h2", "B")));
    // Only h2 is pending; it is due 1 000 ms after its own offer.
    assert_eq!(h.k.next_deadline(), Some(h.now + 1_000));
    h.now += 1_000;
    let fired = persisted_envelopes(&h.tick());
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].message_id, "macp-runtime:implicit-accept:h2");
    assert_eq!(disposition(&h, &sid, "h1"), "Declined");
    assert_eq!(disposition(&h, &sid, "h2"), "Accepted");
    h.assert_replay_matches();
}

#[test]
fn implicit_accept_applies_at_commit_time_when_no_tick_came() {
    let mut h = H::new();
    implicit_policy(&mut h, "policy.handoff.implicit", 2_000);
    let sid = start(&mut h, "policy.handoff.implicit");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    h.now += 1_999;
    rejected(&h.commit_mode("I", &sid, HANDOFF, "handoff.accepted", true), "INVALID_ENVELOPE");
    h.now += 1;
    ok(&h.commit_mode("I", &sid, HANDOFF, "handoff.accepted", true));
    let p = h.projection(&sid);
    assert_eq!(p["offers"]["h1"]["disposition"], "Accepted");
    assert_eq!(p["offers"]["h1"]["implicit"], true);
    h.assert_replay_matches();
}

#[test]
fn implicit_accept_waits_while_suspended_and_fires_after_resume() {
    let mut h = H::new();
    implicit_policy(&mut h, "policy.handoff.implicit", 1_000);
    let sid = start(&mut h, "policy.handoff.implicit");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    h.now += 100;
    ok(&h.control("I", ControlOp::Suspend, &sid));
    h.now += 5_000;
    assert!(persisted_envelopes(&h.tick()).is_empty(), "a suspended session emits nothing");
    assert_eq!(disposition(&h, &sid, "h1"), "Offered");
    ok(&h.control("I", ControlOp::Resume, &sid));
    // The offer is overdue on the acceptance clock, so the next tick fires.
    assert!(h.k.next_deadline().is_some_and(|d| d <= h.now));
    let fired = persisted_envelopes(&h.tick());
    assert_eq!(fired.len(), 1);
    assert_eq!(disposition(&h, &sid, "h1"), "Accepted");
    ok(&h.commit_mode("I", &sid, HANDOFF, "handoff.accepted", true));
    h.assert_replay_matches();
}

#[test]
fn no_timer_without_implicit_accept_policy() {
    let mut h = H::new();
    let sid = start(&mut h, "");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    // Only the TTL timer (deadline + 1) remains.
    let ttl = h.k.session(&sid).unwrap().deadline_ms;
    assert_eq!(h.k.next_deadline(), Some(ttl + 1));
    h.now += 30_000;
    assert!(persisted_envelopes(&h.tick()).is_empty());
    assert_eq!(disposition(&h, &sid, "h1"), "Offered");
}

#[test]
fn client_implicit_accept_is_invalid() {
    let mut h = H::new();
    implicit_policy(&mut h, "policy.handoff.implicit", 1_000);
    let sid = start(&mut h, "policy.handoff.implicit");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", implicit_accept("h1", "A")), "INVALID_ENVELOPE");
    h.now += 5_000;
    rejected(&h.send_mode("A", &sid, HANDOFF, "HandoffAccept", implicit_accept("h1", "A")), "INVALID_ENVELOPE");
}

#[test]
fn client_cannot_take_the_runtime_implicit_accept_id() {
    let mut h = H::new();
    implicit_policy(&mut h, "policy.handoff.implicit", 1_000);
    let sid = start(&mut h, "policy.handoff.implicit");
    ok(&h.send_mode("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")));
    let e = env(&sid, HANDOFF, "HandoffContext", "macp-runtime:implicit-accept:h1", "I", context("h1"));
    rejected(&h.send("I", e), "INVALID_ENVELOPE");
    h.now += 1_000;
    assert_eq!(persisted_envelopes(&h.tick()).len(), 1);
    assert_eq!(disposition(&h, &sid, "h1"), "Accepted");
}

#[test]
fn policy_rules_are_type_checked_at_registration() {
    let mut h = H::new();
    for bad in [
        json!({"acceptance": 5}),
        json!({"acceptance": {"implicit_accept_timeout_ms": -1}}),
        json!({"acceptance": {"implicit_accept_timeout_ms": 1.5}}),
        json!({"acceptance": {"implicit_accept_timeout_ms": "1000"}}),
    ] {
        let e = h.register_rules("policy.handoff.bad", HANDOFF, bad.clone()).unwrap_err();
        assert_eq!(e.code.as_str(), "INVALID_POLICY_DEFINITION", "{bad}: {e}");
    }
    h.register_rules("policy.handoff.off", HANDOFF, json!({"acceptance": {"implicit_accept_timeout_ms": 0}})).unwrap();
}

#[test]
fn descriptor_is_listed_as_standards_track() {
    let h = H::new();
    let d = h.k.modes().standards_track().into_iter().find(|d| d.mode == HANDOFF).expect("handoff listed");
    assert_eq!(d.mode_version, "1.0.0");
    assert_eq!(d.determinism_class, "context-frozen");
    assert_eq!(d.participant_model, "delegated");
    assert_eq!(d.message_types.first().map(String::as_str), Some("SessionStart"));
    assert_eq!(d.message_types.last().map(String::as_str), Some("Commitment"));
    assert_eq!(d.terminal_message_types, vec!["Commitment".to_string()]);
    assert_eq!(d.schema_uris["protobuf"], "buf.build/multiagentcoordinationprotocol/macp");
}

// ----- properties ------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    /// (sender pick, kind, handoff id choice, target/by choice, implicit flag)
    Send(usize, usize, usize, usize, bool),
    Garbage(usize, usize),
    Commit(usize, bool),
    Tick(i64),
}

const SENDERS: [&str; 4] = ["I", "A", "B", "X"]; // X is an outsider
const KINDS: [&str; 5] = ["HandoffOffer", "HandoffContext", "HandoffAccept", "HandoffDecline", "Bogus"];
const IDS: [&str; 4] = ["h1", "h2", "h3", ""];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..8usize, 0..KINDS.len(), 0..IDS.len(), 0..4usize, proptest::bool::weighted(0.1))
            .prop_map(|(s, k, i, t, imp)| Step::Send(s, k, i, t, imp)),
        1 => (0..SENDERS.len(), 0..KINDS.len()).prop_map(|(s, k)| Step::Garbage(s, k)),
        2 => (0..8usize, any::<bool>()).prop_map(|(s, p)| Step::Commit(s, p)),
        3 => (1..2_500i64).prop_map(Step::Tick),
    ]
}

/// The sender for a step: `pick < 6` means the one the state suggests (the
/// owner for offers, context and commitments; the pending offer's target
/// for answers).
fn sender(h: &H, sid: &str, pick: usize, kind: &str) -> String {
    if pick >= 6 {
        return SENDERS[pick % SENDERS.len()].to_string();
    }
    match kind {
        "HandoffAccept" | "HandoffDecline" => {
            let p = h.projection(sid);
            p["offers"]
                .as_object()
                .and_then(|m| m.values().find(|o| o["disposition"] == "Offered"))
                .and_then(|o| o["target_participant"].as_str())
                .unwrap_or("A")
                .to_string()
        }
        _ => "I".to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_handoff_sessions_stay_consistent(
        timeout in prop_oneof![Just(0i64), Just(1_000i64), Just(4_000i64)],
        prefix in proptest::bool::weighted(0.75),
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let mut h = H::new();
        h.register_rules(
            "policy.handoff.prop",
            HANDOFF,
            json!({"acceptance": {"implicit_accept_timeout_ms": timeout}}),
        ).unwrap();
        let sid = h.start_mode(HANDOFF, "I", &["I", "A", "B"], "policy.handoff.prop");
        let mut resolved = false;
        // Oracle from accepted acks and recorded runtime messages only:
        // handoff id -> (offered at, answered).
        let mut offers: BTreeMap<String, (i64, bool)> = BTreeMap::new();
        // Most runs start with an offer so that deep states are hit.
        if prefix {
            prop_assert!(h.send_mode_checked("I", &sid, HANDOFF, "HandoffOffer", offer("h1", "A")).ok);
            offers.insert("h1".into(), (h.now, false));
        }
        for s in steps {
            match s {
                Step::Send(pick, ki, ii, ti, imp) => {
                    let kind = KINDS[ki];
                    let who = sender(&h, &sid, pick, kind);
                    let id = IDS[ii];
                    let other = ["", "A", "B", who.as_str()][ti];
                    let payload = match kind {
                        "HandoffOffer" => offer(id, if other.is_empty() { "A" } else { other }),
                        "HandoffContext" => context(id),
                        "HandoffAccept" if imp => implicit_accept(id, other),
                        "HandoffAccept" => accept(id, other),
                        "HandoffDecline" => decline(id, other),
                        _ => Vec::new(),
                    };
                    let a = h.send_mode_checked(&who, &sid, HANDOFF, kind, payload);
                    prop_assert!(!(resolved && a.ok), "accepted after RESOLVED");
                    prop_assert!(!(a.ok && imp && kind == "HandoffAccept"), "client implicit accept accepted");
                    if a.ok {
                        match kind {
                            "HandoffOffer" => {
                                prop_assert!(!offers.values().any(|(_, answered)| !answered), "second pending offer");
                                offers.insert(id.to_string(), (h.now, false));
                            }
                            "HandoffAccept" | "HandoffDecline" => {
                                let o = offers.get_mut(id).expect("answer to a known offer");
                                prop_assert!(!o.1, "offer answered twice");
                                o.1 = true;
                            }
                            _ => {}
                        }
                    }
                }
                Step::Garbage(si, ki) => {
                    let a = h.send_mode_checked(SENDERS[si], &sid, HANDOFF, KINDS[ki], vec![0xff, 0x01, 0x02]);
                    prop_assert!(!a.ok, "garbage accepted");
                }
                Step::Commit(pick, positive) => {
                    let who = sender(&h, &sid, pick, "Commitment");
                    let action = if positive { "handoff.accepted" } else { "handoff.declined" };
                    let a = h.commit_mode_checked(&who, &sid, HANDOFF, action, positive);
                    prop_assert!(!(resolved && a.ok), "commitment accepted after RESOLVED");
                    if a.ok {
                        prop_assert_eq!(who.as_str(), "I");
                        let now = h.now;
                        let eligible = offers.values().any(|(at, answered)| {
                            *answered || (timeout > 0 && now >= at + timeout)
                        });
                        prop_assert!(eligible, "commitment accepted without an answered offer");
                        resolved = true;
                    }
                }
                Step::Tick(ms) => {
                    h.now += ms;
                    let now = h.now;
                    for env in persisted_envelopes(&h.tick()) {
                        prop_assert_eq!(env.sender.as_str(), "macp-runtime");
                        let p = HandoffAcceptPayload::decode(env.payload.as_slice()).unwrap();
                        prop_assert!(p.implicit);
                        prop_assert!(timeout > 0, "implicit accept without a timeout policy");
                        let o = offers.get_mut(&p.handoff_id).expect("implicit accept of a known offer");
                        prop_assert!(!o.1, "implicit accept of an answered offer");
                        prop_assert!(now >= o.0 + timeout, "implicit accept before it was due");
                        o.1 = true;
                    }
                }
            }
        }
        prop_assert_eq!(resolved, h.state(&sid) == SessionState::Resolved);
        if std::env::var("MACP_PROP_STATS").is_ok() {
            eprintln!("STAT resolved={resolved} phase={} state={:?}", h.projection(&sid)["phase"], h.state(&sid));
        }
        h.assert_replay_matches();
    }
}
