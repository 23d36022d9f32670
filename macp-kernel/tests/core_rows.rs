//! Kernel-level rows of the DIGEST §9 acceptance checklist for the core
//! session rules (envelopes, SessionStart, dedup, TTL, cancel/suspend/resume,
//! commitment, signals). Each test name carries its row number.

mod common;

use common::*;
use macp_kernel::macp_wire::modes::decision::{ProposalPayload, VotePayload};
use macp_kernel::macp_wire::storage::record::Fact;
use macp_kernel::macp_wire::v1::{
    ModeDescriptor, SessionCancelPayload, SessionStartPayload, SessionState, SignalPayload,
};
use macp_kernel::macp_wire::Message;
use macp_kernel::{Broadcast, ControlOp, Effect, Grants, Identity, Input, Kernel, KernelConfig};

fn proposal(id: &str) -> Vec<u8> {
    ProposalPayload { proposal_id: id.into(), option: "deploy".into(), rationale: "ready".into(), ..Default::default() }
        .encode_to_vec()
}

fn vote(id: &str, v: &str) -> Vec<u8> {
    VotePayload { proposal_id: id.into(), vote: v.into(), reason: "r".into() }.encode_to_vec()
}

fn commit_payload() -> Vec<u8> {
    commitment("decision.selected", true).encode_to_vec()
}

fn start_with(h: &mut H, p: &SessionStartPayload) -> (String, macp_kernel::macp_wire::v1::Ack) {
    let sid = h.sid();
    let ack = h.send("I", start_env(&sid, DECISION, "I", p));
    (sid, ack)
}

fn persisted(effects: &[Effect]) -> Vec<&macp_kernel::macp_wire::storage::Record> {
    effects.iter().filter_map(|e| if let Effect::Persist(r) = e { Some(r) } else { None }).collect()
}

fn session_broadcasts(effects: &[Effect]) -> usize {
    effects.iter().filter(|e| matches!(e, Effect::Broadcast(Broadcast::SessionEnvelope { .. }))).count()
}

fn records_of(h: &H) -> Vec<macp_kernel::macp_wire::storage::Record> {
    h.log.iter().filter_map(|e| if let Effect::Persist(r) = e { Some(r.clone()) } else { None }).collect()
}

#[test]
fn row_04_unsupported_macp_version() {
    let mut h = H::new();
    let sid = h.start_default();
    let mut e = env(&sid, DECISION, "Proposal", "m1", "I", proposal("p1"));
    e.macp_version = "2.0".into();
    let ack = h.send("I", e);
    assert!(!ack.ok);
    assert_eq!(code(&ack), "UNSUPPORTED_PROTOCOL_VERSION");
}

#[test]
fn row_05_message_type_and_id_required() {
    let mut h = H::new();
    let sid = h.start_default();
    let ack = h.send("I", env(&sid, DECISION, "", "m1", "I", proposal("p1")));
    assert_eq!(code(&ack), "INVALID_ENVELOPE");
    let ack = h.send("I", env(&sid, DECISION, "Proposal", "", "I", proposal("p1")));
    assert_eq!(code(&ack), "INVALID_ENVELOPE");
}

#[test]
fn row_06_session_scoped_needs_session_and_mode() {
    let mut h = H::new();
    let sid = h.start_default();
    let ack = h.send("I", env("", DECISION, "Proposal", "m1", "I", proposal("p1")));
    assert_eq!(code(&ack), "INVALID_ENVELOPE");
    let ack = h.send("I", env(&sid, "", "Proposal", "m2", "I", proposal("p1")));
    assert_eq!(code(&ack), "INVALID_ENVELOPE");
}

#[test]
fn row_07_signals_are_ambient_only() {
    let mut h = H::new();
    let sid = h.start_default();
    let sig = SignalPayload { signal_type: "heartbeat".into(), ..Default::default() }.encode_to_vec();
    let ack = h.send("I", env(&sid, "", "Signal", "s1", "I", sig.clone()));
    assert_eq!(code(&ack), "INVALID_ENVELOPE");
    let ack = h.send("I", env("", DECISION, "Signal", "s2", "I", sig.clone()));
    assert_eq!(code(&ack), "INVALID_ENVELOPE");
    let ack = h.send("I", env("", "", "Signal", "s3", "I", sig));
    assert!(ack.ok);
}

#[test]
fn row_08_ambient_signal_is_broadcast_byte_identical() {
    let mut h = H::new();
    let sig = SignalPayload { signal_type: "heartbeat".into(), confidence: 0.5, ..Default::default() }.encode_to_vec();
    let sent = env("", "", "Signal", "s1", "I", sig);
    let effects = h.run(Input::Envelope { request: 9, identity: Identity::new("I"), envelope: sent.clone() });
    assert!(ack_of(&effects, 9).ok);
    let got: Vec<_> = effects
        .iter()
        .filter_map(|e| {
            if let Effect::Broadcast(Broadcast::Signal { envelope }) = e {
                Some(envelope.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].encode_to_vec(), sent.encode_to_vec());
    assert!(persisted(&effects).is_empty(), "signals have no history");
}

#[test]
fn row_09_signals_never_change_session_state() {
    let mut h = H::new();
    let sid = h.start_default();
    let before = h.k.snapshot();
    let sig = SignalPayload { signal_type: "x".into(), correlation_session_id: sid.clone(), ..Default::default() }
        .encode_to_vec();
    assert!(h.send("A", env("", "", "Signal", "s1", "A", sig)).ok);
    assert_eq!(h.k.snapshot(), before);
}

#[test]
fn row_10_sender_derived_from_identity() {
    let mut h = H::new();
    let sid = h.sid();
    let e = start_env(&sid, DECISION, "", &default_start());
    assert!(h.send("I", e).ok);
    assert_eq!(&*h.k.session(&sid).unwrap().initiator, "I");
}

/// The initiator's name is stored once per session: its activity entry
/// holds the same allocation, after a checkpoint restore too.
#[test]
fn the_initiator_name_is_shared_with_its_activity_entry() {
    let mut h = H::new();
    let sid = h.sid();
    assert!(h.send("I", start_env(&sid, DECISION, "", &default_start())).ok);
    let shared = |k: &Kernel| {
        let s = k.session(&sid).unwrap();
        let (who, a) = &s.activity[0];
        (who.to_string(), a.message_count, std::sync::Arc::ptr_eq(who, &s.initiator))
    };
    assert_eq!(shared(&h.k), ("I".to_string(), 1, true));
    let restored = Kernel::restore(KernelConfig::default(), &h.k.snapshot()).expect("restores");
    assert_eq!(shared(&restored), ("I".to_string(), 1, true));
}

#[test]
fn row_11_spoofed_sender_unauthenticated() {
    let mut h = H::new();
    let sid = h.start_default();
    let ack = h.send("I", env(&sid, DECISION, "Proposal", "m1", "B", proposal("p1")));
    assert_eq!(code(&ack), "UNAUTHENTICATED");
}

#[test]
fn row_13_unknown_protobuf_fields_ignored() {
    let mut h = H::new();
    let sid = h.sid();
    let mut payload = default_start().encode_to_vec();
    // field 99, wire type 2 (length-delimited), 3 bytes.
    payload.extend_from_slice(&[0x9a, 0x06, 3, b'a', b'b', b'c']);
    let mut e = start_env(&sid, DECISION, "I", &default_start());
    e.payload = payload;
    assert!(h.send("I", e).ok);
}

#[test]
fn row_14_payload_limit_is_exact() {
    let mut h = H::with(KernelConfig { max_payload_bytes: 64, ..Default::default() });
    let sid = h.start_default();
    let ack = h.send("I", env(&sid, DECISION, "Proposal", "m1", "I", vec![0u8; 65]));
    assert_eq!(code(&ack), "PAYLOAD_TOO_LARGE");
    let ack = h.send("I", env(&sid, DECISION, "Proposal", "m2", "I", vec![0u8; 64]));
    assert_ne!(code(&ack), "PAYLOAD_TOO_LARGE");
}

#[test]
fn row_16_max_open_sessions_quota() {
    let mut h = H::new();
    let id = Identity { sender: "I".into(), grants: Grants { max_open_sessions: Some(1), ..Grants::full() } };
    let s1 = h.sid();
    assert!(h.send_as(id.clone(), start_env(&s1, DECISION, "I", &default_start())).ok);
    let s2 = h.sid();
    let ack = h.send_as(id.clone(), start_env(&s2, DECISION, "I", &default_start()));
    assert_eq!(code(&ack), "RATE_LIMITED");
    // Closing the first frees the slot.
    assert!(h.control("I", ControlOp::Cancel, &s1).ok);
    assert!(h.send_as(id, start_env(&s2, DECISION, "I", &default_start())).ok);
}

#[test]
fn row_16_can_start_sessions_and_allowed_modes_forbidden() {
    let mut h = H::new();
    let no_start = Identity { sender: "I".into(), grants: Grants { can_start_sessions: false, ..Grants::full() } };
    let sid = h.sid();
    assert_eq!(code(&h.send_as(no_start, start_env(&sid, DECISION, "I", &default_start()))), "FORBIDDEN");
    let only_task = Identity {
        sender: "I".into(),
        grants: Grants { allowed_modes: Some(["macp.mode.task.v1".to_string()].into()), ..Grants::full() },
    };
    assert_eq!(code(&h.send_as(only_task, start_env(&sid, DECISION, "I", &default_start()))), "FORBIDDEN");
}

#[test]
fn row_17_valid_start_creates_open_session() {
    let mut h = H::new();
    let (sid, ack) = start_with(&mut h, &default_start());
    assert!(ack.ok && !ack.duplicate);
    assert_eq!(ack.session_state, SessionState::Open as i32);
    let md = h.k.get_session(&Identity::new("A"), &sid).unwrap();
    assert_eq!(md.state, SessionState::Open as i32);
    assert_eq!(md.mode, DECISION);
    assert_eq!(md.mode_version, "1.0.0");
    assert_eq!(md.configuration_version, "cfg-1");
    assert_eq!(md.participants, vec!["I", "A", "B"]);
}

#[test]
fn row_18_ttl_bounds() {
    let mut h = H::new();
    for ttl in [0, -1, 86_400_001] {
        let (_, ack) = start_with(&mut h, &SessionStartPayload { ttl_ms: ttl, ..default_start() });
        assert_eq!(code(&ack), "INVALID_ENVELOPE", "ttl {ttl}");
    }
    let (_, ack) = start_with(&mut h, &SessionStartPayload { ttl_ms: 86_400_000, ..default_start() });
    assert!(ack.ok);
}

#[test]
fn row_19_versions_required() {
    let mut h = H::new();
    for (mv, cv) in [("", "cfg-1"), ("  ", "cfg-1"), ("1.0.0", ""), ("1.0.0", " \t")] {
        let p = SessionStartPayload { mode_version: mv.into(), configuration_version: cv.into(), ..default_start() };
        let (_, ack) = start_with(&mut h, &p);
        assert_eq!(code(&ack), "INVALID_ENVELOPE", "{mv:?}/{cv:?}");
    }
}

#[test]
fn row_20_participants_unique_and_non_blank() {
    let mut h = H::new();
    for ps in [vec!["a", "a"], vec![""]] {
        let p = SessionStartPayload { participants: ps.iter().map(|s| s.to_string()).collect(), ..default_start() };
        let (_, ack) = start_with(&mut h, &p);
        assert_eq!(code(&ack), "INVALID_ENVELOPE", "{ps:?}");
    }
    // An empty roster is structurally valid (SPEC-DELTA §1.3): a Decision
    // session starts, but nobody, the initiator included, may propose in it.
    let p = SessionStartPayload { participants: vec![], ..default_start() };
    let (_, ack) = start_with(&mut h, &p);
    assert!(ack.ok, "{ack:?}");
}

#[test]
fn row_21_empty_or_undecodable_start_payload() {
    let mut h = H::new();
    for payload in [vec![], vec![0xFF, 0xFF]] {
        let sid = h.sid();
        let mut e = start_env(&sid, DECISION, "I", &default_start());
        e.payload = payload;
        assert_eq!(code(&h.send("I", e)), "INVALID_ENVELOPE");
    }
}

#[test]
fn row_22_empty_mode_on_start() {
    let mut h = H::new();
    let sid = h.sid();
    assert_eq!(code(&h.send("I", start_env(&sid, "", "I", &default_start()))), "INVALID_ENVELOPE");
}

#[test]
fn row_23_unsupported_mode() {
    let mut h = H::new();
    let sid = h.sid();
    assert_eq!(code(&h.send("I", start_env(&sid, "com.example.nope.v1", "I", &default_start()))), "MODE_NOT_SUPPORTED");
}

#[test]
fn row_23_mode_version_mismatch_is_mode_not_supported() {
    let mut h = H::new();
    let (_, ack) = start_with(&mut h, &SessionStartPayload { mode_version: "2.0.0".into(), ..default_start() });
    assert_eq!(code(&ack), "MODE_NOT_SUPPORTED");
}

#[test]
fn row_24_strict_session_ids() {
    let mut h = H::new();
    assert_eq!(code(&h.send("I", start_env("s1", DECISION, "I", &default_start()))), "INVALID_SESSION_ID");
    assert!(h.send("I", start_env("9b2f3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d", DECISION, "I", &default_start())).ok);
    assert!(h.send("I", start_env("01J9ZQ8X3K4M5N6P7Q8R9S0T1V", DECISION, "I", &default_start())).ok);
    let mut lax = H::with(KernelConfig { session_id_policy: macp_kernel::SessionIdPolicy::Lax, ..Default::default() });
    assert!(lax.send("I", start_env("s1", DECISION, "I", &default_start())).ok);
}

#[test]
fn row_25_restart_with_new_message_id_rejected() {
    let mut h = H::new();
    let sid = h.start_default();
    let before = h.k.snapshot();
    let mut e = start_env(&sid, DECISION, "I", &default_start());
    e.message_id = "another".into();
    assert_eq!(code(&h.send("I", e)), "SESSION_ALREADY_EXISTS");
    assert_eq!(h.k.snapshot(), before);
}

#[test]
fn row_26_same_start_is_idempotent() {
    let mut h = H::new();
    let sid = h.start_default();
    let effects = h.run(Input::Envelope {
        request: 77,
        identity: Identity::new("I"),
        envelope: start_env(&sid, DECISION, "I", &default_start()),
    });
    let ack = ack_of(&effects, 77);
    assert!(ack.ok && ack.duplicate);
    assert!(persisted(&effects).is_empty());
    assert_eq!(h.k.session_count(), 1);
}

#[test]
fn row_30_initiator_recorded() {
    let mut h = H::new();
    let sid = h.start_default();
    assert_eq!(h.k.get_session(&Identity::new("I"), &sid).unwrap().initiator, "I");
}

#[test]
fn row_31_context_id_verbatim() {
    let mut h = H::new();
    let ctx = "¯\\_(ツ)_/¯";
    let (sid, ack) = start_with(&mut h, &SessionStartPayload { context_id: ctx.into(), ..default_start() });
    assert!(ack.ok);
    assert_eq!(h.k.get_session(&Identity::new("I"), &sid).unwrap().context_id, ctx);
}

#[test]
fn row_32_extensions_kept() {
    let mut h = H::new();
    let p = SessionStartPayload { extensions: [("x-foo".to_string(), vec![1u8])].into(), ..default_start() };
    let (sid, ack) = start_with(&mut h, &p);
    assert!(ack.ok);
    assert_eq!(h.k.get_session(&Identity::new("I"), &sid).unwrap().extension_keys, vec!["x-foo"]);
}

#[test]
fn row_33_lifecycle_ignores_context_and_extensions() {
    let run = |p: SessionStartPayload| {
        let mut h = H::new();
        let (sid, a0) = start_with(&mut h, &p);
        let a1 = h.msg("A", &sid, "Proposal", proposal("p1"));
        let a2 = h.msg("B", &sid, "Vote", vote("p1", "APPROVE"));
        let a3 = h.msg("I", &sid, "Commitment", commit_payload());
        ([a0, a1, a2, a3].map(|a| (a.ok, a.duplicate, a.session_state, code(&a).to_string())), h.state(&sid))
    };
    let plain = run(default_start());
    let rich = run(SessionStartPayload {
        context_id: "ctx:1".into(),
        extensions: [("x-a".to_string(), b"{}".to_vec())].into(),
        ..default_start()
    });
    assert_eq!(plain, rich);
    assert_eq!(plain.1, SessionState::Resolved);
}

#[test]
fn row_34_bound_versions_fixed() {
    let mut h = H::new();
    let sid = h.start_default();
    let md = |h: &H| {
        let m = h.k.get_session(&Identity::new("I"), &sid).unwrap();
        (m.mode_version, m.configuration_version, m.policy_version)
    };
    let before = md(&h);
    h.msg("A", &sid, "Proposal", proposal("p1"));
    h.msg("B", &sid, "Vote", vote("p1", "APPROVE"));
    assert_eq!(md(&h), before);
    assert_eq!(before.2, "policy.default");
}

#[test]
fn row_35_unknown_session() {
    let mut h = H::new();
    let ack = h.msg("A", "9b2f3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d", "Proposal", proposal("p1"));
    assert_eq!(code(&ack), "SESSION_NOT_FOUND");
}

#[test]
fn row_36_no_cross_mode_injection() {
    let mut h = H::new();
    let sid = h.start_default();
    let ack = h.send("A", env(&sid, "macp.mode.task.v1", "Proposal", "m1", "A", proposal("p1")));
    assert_eq!(code(&ack), "INVALID_ENVELOPE");
}

#[test]
fn row_37_first_commitment_resolves() {
    let mut h = H::new();
    let sid = h.start_default();
    assert!(h.msg("A", &sid, "Proposal", proposal("p1")).ok);
    let ack = h.msg("I", &sid, "Commitment", commit_payload());
    assert!(ack.ok);
    assert_eq!(ack.session_state, SessionState::Resolved as i32);
    assert_eq!(h.state(&sid), SessionState::Resolved);
    assert_eq!(h.k.resolution(&sid).unwrap(), commit_payload().as_slice());
}

#[test]
fn row_38_terminal_sessions_reject_new_messages() {
    let mut h = H::new();
    // RESOLVED
    let s1 = h.start_default();
    h.msg("A", &s1, "Proposal", proposal("p1"));
    assert!(h.msg("I", &s1, "Commitment", commit_payload()).ok);
    assert_eq!(code(&h.msg("A", &s1, "Vote", vote("p1", "APPROVE"))), "SESSION_NOT_OPEN");
    // CANCELLED
    let s2 = h.start_default();
    assert!(h.control("I", ControlOp::Cancel, &s2).ok);
    assert_eq!(code(&h.msg("A", &s2, "Proposal", proposal("p1"))), "SESSION_NOT_OPEN");
    // EXPIRED
    let s3 = h.start_default();
    h.now += 60_001;
    assert_eq!(code(&h.msg("A", &s3, "Proposal", proposal("p1"))), "SESSION_NOT_OPEN");
    assert_eq!(code(&h.msg("A", &s3, "Proposal", proposal("p2"))), "SESSION_NOT_OPEN");
}

#[test]
fn row_39_terminal_race_has_one_winner() {
    let mut h = H::new();
    let sid = h.start_default();
    h.msg("A", &sid, "Proposal", proposal("p1"));
    let a = h.msg("I", &sid, "Commitment", commit_payload());
    let b = h.msg("I", &sid, "Commitment", commit_payload());
    assert!(a.ok);
    assert!(!b.ok);
    assert_eq!(code(&b), "SESSION_NOT_OPEN");
}

#[test]
fn row_40_acceptance_is_serialized() {
    let mut h = H::new();
    let voters: Vec<String> = (0..100).map(|i| format!("v{i:03}")).collect();
    let mut ps = vec!["I".to_string()];
    ps.extend(voters.iter().cloned());
    let (sid, ack) = start_with(&mut h, &SessionStartPayload { participants: ps, ..default_start() });
    assert!(ack.ok);
    assert!(h.msg("I", &sid, "Proposal", proposal("p1")).ok);
    let mark = h.log.len();
    let mut acked = Vec::new();
    for v in &voters {
        let a = h.msg(v, &sid, "Vote", vote("p1", "APPROVE"));
        assert!(a.ok);
        acked.push(a.message_id);
    }
    let streamed: Vec<(u64, String)> = h.log[mark..]
        .iter()
        .filter_map(|e| match e {
            Effect::Broadcast(Broadcast::SessionEnvelope { seq, envelope, .. }) => {
                Some((*seq, envelope.message_id.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(streamed.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(), acked);
    assert!(streamed.windows(2).all(|w| w[1].0 == w[0].0 + 1), "sequence numbers are contiguous");
    let proj = h.k.mode_projection(&sid).unwrap();
    assert_eq!(proj["votes"]["p1"].as_object().unwrap().len(), 100);
}

#[test]
fn row_41_ttl_expiry() {
    let mut h = H::new();
    let (sid, _) = start_with(&mut h, &SessionStartPayload { ttl_ms: 50, ..default_start() });
    h.now += 100;
    assert_eq!(code(&h.msg("A", &sid, "Proposal", proposal("p1"))), "SESSION_NOT_OPEN");
    assert_eq!(h.state(&sid), SessionState::Expired);
    // And by tick, with no message.
    let (s2, _) = start_with(&mut h, &SessionStartPayload { ttl_ms: 50, ..default_start() });
    assert_eq!(h.k.session(&s2).unwrap().deadline_ms, h.now + 50);
    assert_eq!(h.k.next_deadline(), Some(h.now + 51));
    h.now += 51;
    let effects = h.tick();
    assert_eq!(h.state(&s2), SessionState::Expired);
    assert!(persisted(&effects).iter().any(|r| matches!(r.fact, Some(Fact::Expired(_)))));
}

#[test]
fn row_41_message_exactly_at_deadline_accepted() {
    let mut h = H::new();
    let (sid, _) = start_with(&mut h, &SessionStartPayload { ttl_ms: 50, ..default_start() });
    h.now = T0 + 50;
    assert!(h.msg("A", &sid, "Proposal", proposal("p1")).ok);
    h.now = T0 + 51;
    assert_eq!(code(&h.msg("A", &sid, "Proposal", proposal("p2"))), "SESSION_NOT_OPEN");
}

#[test]
fn row_42_deadline_from_start_timestamp() {
    let mut h = H::new();
    let sid = h.sid();
    let mut e = start_env(&sid, DECISION, "I", &default_start());
    e.timestamp_unix_ms = T0 - 1234;
    assert!(h.send("I", e).ok);
    let md = h.k.get_session(&Identity::new("I"), &sid).unwrap();
    assert_eq!(md.expires_at_unix_ms, T0 - 1234 + 60_000);
    // Timestamp 0 falls back to acceptance time.
    let s2 = h.sid();
    let mut e = start_env(&s2, DECISION, "I", &default_start());
    e.timestamp_unix_ms = 0;
    assert!(h.send("I", e).ok);
    assert_eq!(h.k.get_session(&Identity::new("I"), &s2).unwrap().expires_at_unix_ms, h.now + 60_000);
}

#[test]
fn row_42_start_timestamp_skew_bounded() {
    let mut h = H::new();
    let sid = h.sid();
    let mut e = start_env(&sid, DECISION, "I", &default_start());
    e.timestamp_unix_ms = T0 + 24 * 3_600_000;
    assert_eq!(code(&h.send("I", e)), "INVALID_ENVELOPE");
}

#[test]
fn row_44_cancel_by_initiator() {
    let mut h = H::new();
    let sid = h.start_default();
    let ack = h.control("I", ControlOp::Cancel, &sid);
    assert!(ack.ok);
    assert_eq!(ack.session_state, SessionState::Cancelled as i32);
    assert_eq!(h.state(&sid), SessionState::Cancelled);
}

#[test]
fn row_45_only_initiator_cancels() {
    let mut h = H::new();
    let sid = h.start_default();
    assert_eq!(code(&h.control("A", ControlOp::Cancel, &sid)), "FORBIDDEN");
    assert_eq!(h.state(&sid), SessionState::Open);
    assert_eq!(code(&h.control("I", ControlOp::Cancel, "9b2f3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d")), "SESSION_NOT_FOUND");
}

#[test]
fn row_46_cancel_records_session_cancel() {
    let mut h = H::new();
    let sid = h.start_default();
    h.control("I", ControlOp::Cancel, &sid);
    let rec = records_of(&h).into_iter().find(|r| matches!(r.fact, Some(Fact::Cancelled(_)))).expect("cancel record");
    let Some(Fact::Cancelled(env)) = rec.fact else { unreachable!() };
    assert_eq!(env.message_type, "SessionCancel");
    let p = SessionCancelPayload::decode(env.payload.as_slice()).unwrap();
    assert_eq!(p.cancelled_by, "I");
    assert_eq!(p.reason, "test");
    // And it replays.
    let mut k = Kernel::new(KernelConfig::default());
    for r in records_of(&h) {
        k.apply_record(&r).unwrap();
    }
    assert_eq!(k.session_state(&sid), Some(SessionState::Cancelled));
}

#[test]
fn row_47_clients_cannot_send_runtime_types() {
    let mut h = H::new();
    let sid = h.start_default();
    let before = h.k.snapshot();
    for t in ["SessionCancel", "SessionSuspend", "SessionResume"] {
        let ack = h.msg("I", &sid, t, vec![]);
        assert!(!ack.ok, "{t}");
        assert_eq!(code(&ack), "FORBIDDEN");
    }
    assert_eq!(h.k.snapshot(), before);
}

#[test]
fn row_48_cancel_idempotent_on_terminal() {
    let mut h = H::new();
    let sid = h.start_default();
    h.control("I", ControlOp::Cancel, &sid);
    let effects_before = h.log.len();
    let ack = h.control("I", ControlOp::Cancel, &sid);
    assert!(ack.ok);
    assert_eq!(ack.session_state, SessionState::Cancelled as i32);
    assert!(persisted(&h.log[effects_before..]).is_empty());
    let s2 = h.start_default();
    h.msg("A", &s2, "Proposal", proposal("p1"));
    h.msg("I", &s2, "Commitment", commit_payload());
    let ack = h.control("I", ControlOp::Cancel, &s2);
    assert!(ack.ok);
    assert_eq!(ack.session_state, SessionState::Resolved as i32);
}

#[test]
fn row_49_suspend_open_session() {
    let mut h = H::new();
    let sid = h.start_default();
    let ack = h.control("I", ControlOp::Suspend, &sid);
    assert!(ack.ok);
    assert_eq!(ack.session_state, SessionState::Suspended as i32);
}

#[test]
fn row_50_suspended_rejects_messages() {
    let mut h = H::new();
    let sid = h.start_default();
    h.msg("A", &sid, "Proposal", proposal("p1"));
    h.control("I", ControlOp::Suspend, &sid);
    assert_eq!(code(&h.msg("A", &sid, "Vote", vote("p1", "APPROVE"))), "SESSION_NOT_OPEN");
    assert_eq!(code(&h.msg("I", &sid, "Commitment", commit_payload())), "SESSION_NOT_OPEN");
}

#[test]
fn row_51_resume_reopens() {
    let mut h = H::new();
    let sid = h.start_default();
    h.control("I", ControlOp::Suspend, &sid);
    let ack = h.control("I", ControlOp::Resume, &sid);
    assert!(ack.ok);
    assert_eq!(ack.session_state, SessionState::Open as i32);
    assert!(h.msg("A", &sid, "Proposal", proposal("p1")).ok);
}

#[test]
fn row_52_suspend_resume_state_rules() {
    let mut h = H::new();
    let sid = h.start_default();
    assert_eq!(code(&h.control("I", ControlOp::Resume, &sid)), "SESSION_NOT_OPEN");
    h.control("I", ControlOp::Suspend, &sid);
    assert_eq!(code(&h.control("I", ControlOp::Suspend, &sid)), "SESSION_NOT_OPEN");
}

#[test]
fn row_53_ttl_banked_while_suspended() {
    let mut h = H::new();
    let (sid, _) = start_with(&mut h, &SessionStartPayload { ttl_ms: 300, ..default_start() });
    let before = h.k.session(&sid).unwrap().deadline_ms;
    h.now += 100;
    assert!(h.control("I", ControlOp::Suspend, &sid).ok);
    h.now += 500;
    h.tick();
    assert_eq!(h.state(&sid), SessionState::Suspended, "the pre-suspension deadline must not expire it");
    let ack = h.control("I", ControlOp::Resume, &sid);
    assert!(ack.ok, "{:?}", ack.error);
    assert_eq!(h.k.session(&sid).unwrap().deadline_ms, before + 500);
    assert!(h.msg("A", &sid, "Proposal", proposal("p1")).ok);
}

#[test]
fn row_54_suspension_cap_expires() {
    let mut h = H::new();
    let (sid, _) = start_with(&mut h, &SessionStartPayload { max_suspend_ms: 50, ..default_start() });
    assert!(h.control("I", ControlOp::Suspend, &sid).ok);
    h.now += 100;
    let ack = h.control("I", ControlOp::Resume, &sid);
    assert!(!ack.ok);
    assert_eq!(code(&ack), "SESSION_NOT_OPEN");
    assert_eq!(h.state(&sid), SessionState::Expired);
    // And by tick.
    let (s2, _) = start_with(&mut h, &SessionStartPayload { max_suspend_ms: 50, ..default_start() });
    h.control("I", ControlOp::Suspend, &s2);
    h.now += 51;
    h.tick();
    assert_eq!(h.state(&s2), SessionState::Expired);
}

#[test]
fn row_55_cancel_from_suspended() {
    let mut h = H::new();
    let sid = h.start_default();
    h.control("I", ControlOp::Suspend, &sid);
    assert!(h.control("I", ControlOp::Cancel, &sid).ok);
    assert_eq!(h.state(&sid), SessionState::Cancelled);
}

#[test]
fn row_56_suspend_authority_matches_cancel() {
    let mut h = H::new();
    let sid = h.start_default();
    assert_eq!(code(&h.control("A", ControlOp::Suspend, &sid)), "FORBIDDEN");
    h.control("I", ControlOp::Suspend, &sid);
    assert_eq!(code(&h.control("A", ControlOp::Resume, &sid)), "FORBIDDEN");
}

#[test]
fn row_57_terminal_states_are_final() {
    let mut h = H::new();
    let sid = h.start_default();
    h.msg("A", &sid, "Proposal", proposal("p1"));
    h.msg("I", &sid, "Commitment", commit_payload());
    assert_eq!(code(&h.control("I", ControlOp::Suspend, &sid)), "SESSION_NOT_OPEN");
    assert_eq!(code(&h.control("I", ControlOp::Resume, &sid)), "SESSION_NOT_OPEN");
    assert_eq!(h.state(&sid), SessionState::Resolved);
}

#[test]
fn row_58_duplicate_has_no_side_effects() {
    let mut h = H::new();
    let sid = h.start_default();
    h.msg("A", &sid, "Proposal", proposal("p1"));
    let v = env(&sid, DECISION, "Vote", "vote-1", "B", vote("p1", "APPROVE"));
    assert!(h.send("B", v.clone()).ok);
    let before = h.k.snapshot();
    let effects = h.run(Input::Envelope { request: 5, identity: Identity::new("B"), envelope: v });
    let ack = ack_of(&effects, 5);
    assert!(ack.ok && ack.duplicate);
    assert_eq!(session_broadcasts(&effects), 0);
    assert!(persisted(&effects).is_empty());
    assert_eq!(h.k.snapshot(), before);
}

#[test]
fn row_58_duplicate_acked_even_after_resolution() {
    let mut h = H::new();
    let sid = h.start_default();
    let p = env(&sid, DECISION, "Proposal", "prop-1", "A", proposal("p1"));
    assert!(h.send("A", p.clone()).ok);
    h.msg("I", &sid, "Commitment", commit_payload());
    let ack = h.send("A", p);
    assert!(ack.ok && ack.duplicate);
    assert_eq!(ack.session_state, SessionState::Resolved as i32);
}

#[test]
fn row_59_rejected_envelope_takes_no_slot() {
    let mut h = H::new();
    let sid = h.start_default();
    let bad = env(&sid, DECISION, "Proposal", "m2", "A", vec![0xFF, 0xFF]);
    assert!(!h.send("A", bad).ok);
    let ack = h.send("A", env(&sid, DECISION, "Proposal", "m2", "A", proposal("p1")));
    assert!(ack.ok && !ack.duplicate);
}

#[test]
fn row_60_dedup_is_per_session() {
    let mut h = H::new();
    let s1 = h.start_default();
    let s2 = h.start_default();
    assert!(!h.send("A", env(&s1, DECISION, "Proposal", "same", "A", proposal("p1"))).duplicate);
    let ack = h.send("A", env(&s2, DECISION, "Proposal", "same", "A", proposal("p1")));
    assert!(ack.ok && !ack.duplicate);
}

#[test]
fn row_61_dedup_survives_restart() {
    let mut h = H::new();
    let sid = h.start_default();
    let p = env(&sid, DECISION, "Proposal", "m5", "A", proposal("p1"));
    assert!(h.send("A", p.clone()).ok);
    let mut restarted = H::new();
    for r in records_of(&h) {
        restarted.k.apply_record(&r).unwrap();
    }
    restarted.now = h.now;
    let ack = restarted.send("A", p);
    assert!(ack.ok && ack.duplicate);
    // From a checkpoint too.
    let mut k = Kernel::restore(KernelConfig::default(), &h.k.snapshot()).unwrap();
    let e = k.handle(
        h.now,
        Input::Envelope {
            request: 1,
            identity: Identity::new("A"),
            envelope: env(&sid, DECISION, "Proposal", "m5", "A", proposal("p1")),
        },
    );
    assert!(ack_of(&e, 1).duplicate);
}

#[test]
fn row_62_ack_reports_post_state() {
    let mut h = H::new();
    let sid = h.start_default();
    let a = h.msg("A", &sid, "Proposal", proposal("p1"));
    assert_eq!(a.session_state, SessionState::Open as i32);
    let bad = h.msg("A", &sid, "Vote", vec![0xFF]);
    assert_eq!(bad.session_state, SessionState::Unspecified as i32);
    assert!(bad.error.is_some());
    let c = h.msg("I", &sid, "Commitment", commit_payload());
    assert_eq!(c.session_state, SessionState::Resolved as i32);
}

#[test]
fn registry_records_replay_and_reserved_namespace() {
    let mut h = H::new();
    let reg = |h: &mut H, mode: &str| {
        let e = h.run(Input::RegisterExtMode {
            request: 1,
            identity: Identity::new("admin"),
            descriptor: ModeDescriptor {
                mode: mode.into(),
                mode_version: "1.0.0".into(),
                message_types: vec!["SessionStart".into(), "Note".into(), "Commitment".into()],
                terminal_message_types: vec!["Commitment".into()],
                ..Default::default()
            },
        });
        e.iter()
            .find_map(|x| {
                if let Effect::Reply { reply: macp_kernel::Reply::Registry(r), .. } = x {
                    Some(r.clone())
                } else {
                    None
                }
            })
            .unwrap()
    };
    assert!(reg(&mut h, "ext.notes.v1").is_ok());
    assert!(reg(&mut h, "macp.mode.foo.v1").is_err());
    assert!(reg(&mut h, "ext.notes.v1").is_err());
    let mut k = Kernel::new(KernelConfig::default());
    for r in records_of(&h) {
        k.apply_record(&r).unwrap();
    }
    assert_eq!(k.snapshot(), h.k.snapshot());
}

#[test]
fn runtime_identity_and_reserved_ids_are_not_for_clients() {
    let mut h = H::new();
    let sid = h.sid();
    assert_eq!(code(&h.send("macp-runtime", start_env(&sid, DECISION, "", &default_start()))), "FORBIDDEN");
    let sid = h.start_default();
    let ack = h.send("A", env(&sid, DECISION, "Proposal", "macp-runtime:x", "A", proposal("p1")));
    assert_eq!(code(&ack), "INVALID_ENVELOPE");
    assert_eq!(code(&h.control("macp-runtime", ControlOp::Cancel, &sid)), "FORBIDDEN");
}
