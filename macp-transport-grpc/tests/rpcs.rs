//! Every RPC over loopback with a tonic client, with its error paths,
//! including DIGEST §9 rows 1–3, 8, 12, 15 and 107–117.

mod common;

use std::time::Duration;

use common::*;
use macp_wire::v1::*;
use tokio_stream::StreamExt;
use tonic::Code;

const T: Duration = Duration::from_secs(5);

async fn next<S, T>(s: &mut S) -> T
where
    S: tokio_stream::Stream<Item = Result<T, tonic::Status>> + Unpin,
{
    tokio::time::timeout(T, s.next()).await.expect("stream item in time").expect("stream open").expect("ok item")
}

async fn nothing_within<S, T: std::fmt::Debug>(s: &mut S, ms: u64)
where
    S: tokio_stream::Stream<Item = Result<T, tonic::Status>> + Unpin,
{
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(ms), s.next()).await {
        panic!("unexpected stream item: {item:?}");
    }
}

fn init(versions: &[&str]) -> InitializeRequest {
    InitializeRequest {
        supported_protocol_versions: versions.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn row_01_initialize_selects_version() {
    let srv = Server::start(&[]).await;
    let mut c = srv.anonymous().await;
    let r = c.initialize(init(&["1.0"])).await.unwrap().into_inner();
    assert_eq!(r.selected_protocol_version, "1.0");
    assert!(r.supported_modes.contains(&DECISION.to_string()));
    let caps = r.capabilities.unwrap();
    assert!(caps.sessions.unwrap().stream);
    assert!(caps.policy_registry.unwrap().what_if_replay, "WhatIfReplay is implemented (tests/what_if_replay.rs)");
    // --dev signs receipts with an ephemeral key (tests/receipts.rs).
    assert_eq!(caps.decision_receipt, Some(DecisionReceiptCapability { get_decision_receipt: true, signed: true }));
}

#[tokio::test]
async fn row_02_no_common_version_fails() {
    let srv = Server::start(&[]).await;
    let mut c = srv.anonymous().await;
    let e = c.initialize(init(&["9.9"])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // The registry code travels once, in metadata; the message says what to do.
    let code = e.metadata().get(macp_transport_grpc::status::ERROR_CODE_KEY).and_then(|v| v.to_str().ok());
    assert_eq!(code, Some("UNSUPPORTED_PROTOCOL_VERSION"));
    assert!(!e.message().contains("UNSUPPORTED_PROTOCOL_VERSION"), "{}", e.message());
    assert!(e.message().contains("9.9") && e.message().contains("1.0"), "{}", e.message());
    assert_eq!(c.initialize(init(&[])).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn row_03_unknown_client_capabilities_ignored() {
    let srv = Server::start(&[]).await;
    let mut c = srv.anonymous().await;
    let mut req = init(&["2.0", "1.0"]);
    req.capabilities = Some(Capabilities {
        sessions: Some(SessionsCapability { stream: true, list_sessions: true, watch_sessions: true }),
        experimental: Some(ExperimentalCapabilities { features: [("zz".to_string(), "1".to_string())].into() }),
        ..Default::default()
    });
    assert_eq!(c.initialize(req).await.unwrap().into_inner().selected_protocol_version, "1.0");
}

#[tokio::test]
async fn row_08_signal_broadcast_to_watchers() {
    let srv = Server::start(&[]).await;
    let mut w = srv.client("W").await;
    let mut stream = w.watch_signals(WatchSignalsRequest {}).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut a = srv.client("A").await;
    let payload = SignalPayload { signal_type: "heartbeat".into(), ..Default::default() };
    let mut e = env("", "", "Signal", prost::Message::encode_to_vec(&payload));
    let ack = send(&mut a, e.clone()).await;
    assert!(ack.ok, "{:?}", ack.error);
    let got = next(&mut stream).await;
    e.sender = "A".into();
    assert_eq!(got.envelope.unwrap(), e);
    assert!(got.sender_authenticated);
}

/// Signals are admitted on the request's task (no driver hop); the checks
/// must be the kernel's: bad payloads and forged senders are refused with
/// the kernel's codes and never reach watchers.
#[tokio::test]
async fn row_08_refused_signals_are_not_broadcast() {
    let srv = Server::start(&[]).await;
    let mut w = srv.client("W").await;
    let mut stream = w.watch_signals(WatchSignalsRequest {}).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut a = srv.client("A").await;
    let blank = SignalPayload { signal_type: " ".into(), ..Default::default() };
    let ack = send(&mut a, env("", "", "Signal", prost::Message::encode_to_vec(&blank))).await;
    assert_eq!(code(&ack), "INVALID_ENVELOPE", "{:?}", ack.error);
    let ack = send(&mut a, env("", "", "Progress", vec![0xff, 0xff])).await;
    assert_eq!(code(&ack), "INVALID_ENVELOPE", "{:?}", ack.error);
    let good = SignalPayload { signal_type: "heartbeat".into(), ..Default::default() };
    let mut forged = env("", "", "Signal", prost::Message::encode_to_vec(&good));
    forged.sender = "B".into();
    let ack = send(&mut a, forged).await;
    assert_eq!(code(&ack), "UNAUTHENTICATED", "{:?}", ack.error);
    // The first signal a watcher sees is the next accepted one.
    let ok = env("", "", "Signal", prost::Message::encode_to_vec(&good));
    assert!(send(&mut a, ok.clone()).await.ok);
    let got = next(&mut stream).await.envelope.unwrap();
    assert_eq!(got.message_id, ok.message_id);
}

#[tokio::test]
async fn row_12_unauthenticated_requests_rejected() {
    let srv = Server::start(&[]).await;
    let mut c = srv.anonymous().await;
    let ack = send(&mut c, start_env(&sid(), &["I"])).await;
    assert!(!ack.ok);
    assert_eq!(code(&ack), "UNAUTHENTICATED");
    let e = c.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(c.list_sessions(ListSessionsRequest::default()).await.unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test]
async fn row_15_rate_limit_on_session_starts() {
    let srv = Server::start(&["--session-start-limit-per-minute", "2"]).await;
    let mut c = srv.client("I").await;
    for _ in 0..2 {
        assert!(send(&mut c, start_env(&sid(), &["I"])).await.ok);
    }
    let ack = send(&mut c, start_env(&sid(), &["I"])).await;
    assert_eq!(code(&ack), "RATE_LIMITED");
    let mut other = srv.client("J").await;
    assert!(send(&mut other, start_env(&sid(), &["J"])).await.ok, "limits are per sender");
}

#[tokio::test]
async fn row_14_payload_limit_through_the_server() {
    let srv = Server::start(&["--max-payload-bytes", "100"]).await;
    let mut c = srv.client("I").await;
    let s = start_session(&mut c).await;
    let ack = send(&mut c, env(&s, DECISION, "Proposal", vec![0; 101])).await;
    assert_eq!(code(&ack), "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn send_without_envelope_is_invalid_argument() {
    let srv = Server::start(&[]).await;
    let mut c = srv.client("I").await;
    assert_eq!(c.send(SendRequest { envelope: None }).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn row_107_stream_echoes_accepted_envelopes_in_order() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let s = sid();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut out = i.stream_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let start = start_env(&s, &["I", "A", "B"]);
    tx.send(StreamSessionRequest { envelope: Some(start.clone()), ..Default::default() }).await.unwrap();
    let got = next(&mut out).await;
    assert_eq!(
        got.response,
        Some(stream_session_response::Response::Envelope(Envelope { sender: "I".into(), ..start }))
    );
    // A rejected envelope is never echoed: it comes back as an inline error.
    let bad = env(&s, DECISION, "Vote", vote("p9", "APPROVE"));
    tx.send(StreamSessionRequest { envelope: Some(bad), ..Default::default() }).await.unwrap();
    match next(&mut out).await.response {
        Some(stream_session_response::Response::Error(e)) => assert_eq!(e.code, "INVALID_ENVELOPE"),
        other => panic!("expected an error frame, got {other:?}"),
    }
    // Another participant's accepted message reaches this stream too.
    let mut a = srv.client("A").await;
    let p = env(&s, DECISION, "Proposal", proposal("p1"));
    assert!(send(&mut a, p.clone()).await.ok);
    match next(&mut out).await.response {
        Some(stream_session_response::Response::Envelope(e)) => assert_eq!(e.message_id, p.message_id),
        other => panic!("expected the proposal, got {other:?}"),
    }
}

#[tokio::test]
async fn row_108_stream_bound_to_one_session() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let s1 = start_session(&mut i).await;
    let s2 = start_session(&mut i).await;
    // An outsider's envelope is rejected inline and binds nothing.
    let mut z = srv.client("Z").await;
    let (ztx, zrx) = tokio::sync::mpsc::channel(8);
    let mut zout = z.stream_session(tokio_stream::wrappers::ReceiverStream::new(zrx)).await.unwrap().into_inner();
    ztx.send(StreamSessionRequest {
        envelope: Some(env(&s1, DECISION, "Proposal", proposal("p0"))),
        ..Default::default()
    })
    .await
    .unwrap();
    match next(&mut zout).await.response {
        Some(stream_session_response::Response::Error(e)) => assert_eq!(e.code, "FORBIDDEN"),
        other => panic!("expected an error frame, got {other:?}"),
    }
    let mut b = srv.client("B").await;
    assert!(send(&mut b, env(&s1, DECISION, "Proposal", proposal("p9"))).await.ok);
    nothing_within(&mut zout, 100).await;
    let mut a = srv.client("A").await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut out = a.stream_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(StreamSessionRequest {
        envelope: Some(env(&s1, DECISION, "Proposal", proposal("p1"))),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(matches!(next(&mut out).await.response, Some(stream_session_response::Response::Envelope(_))));
    tx.send(StreamSessionRequest {
        envelope: Some(env(&s2, DECISION, "Proposal", proposal("p1"))),
        ..Default::default()
    })
    .await
    .unwrap();
    match next(&mut out).await.response {
        Some(stream_session_response::Response::Error(e)) => assert_eq!(e.code, "INVALID_ENVELOPE"),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn row_109_envelope_and_subscribe_together_invalid() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let s = start_session(&mut i).await;
    let req = StreamSessionRequest {
        envelope: Some(env(&s, DECISION, "Proposal", proposal("p1"))),
        subscribe_session_id: s.clone(),
        after_sequence: 0,
    };
    let mut out = i.stream_session(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let e = tokio::time::timeout(T, out.next()).await.unwrap().unwrap().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

async fn subscribe(c: &mut Client, s: &str, after: u64) -> tonic::Streaming<StreamSessionResponse> {
    let req = StreamSessionRequest { subscribe_session_id: s.to_string(), after_sequence: after, envelope: None };
    // Keep the request stream open (pending) so only the server ends the call.
    let reqs = tokio_stream::iter(vec![req]).chain(tokio_stream::pending());
    c.stream_session(reqs).await.unwrap().into_inner()
}

fn msg_id(r: StreamSessionResponse) -> String {
    match r.response {
        Some(stream_session_response::Response::Envelope(e)) => e.message_id,
        other => panic!("expected an envelope, got {other:?}"),
    }
}

#[tokio::test]
async fn row_110_passive_subscribe_replays_then_goes_live() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let mut a = srv.client("A").await;
    let s = start_session(&mut i).await;
    let p = env(&s, DECISION, "Proposal", proposal("p1"));
    let v = env(&s, DECISION, "Vote", vote("p1", "APPROVE"));
    assert!(send(&mut a, p.clone()).await.ok);
    assert!(send(&mut a, v.clone()).await.ok);
    let mut sub = subscribe(&mut a, &s, 0).await;
    let first = msg_id(next(&mut sub).await);
    assert!(first.starts_with('m'), "SessionStart first");
    assert_eq!(msg_id(next(&mut sub).await), p.message_id);
    assert_eq!(msg_id(next(&mut sub).await), v.message_id);
    let mut b = srv.client("B").await;
    let v2 = env(&s, DECISION, "Vote", vote("p1", "REJECT"));
    assert!(send(&mut b, v2.clone()).await.ok);
    assert_eq!(msg_id(next(&mut sub).await), v2.message_id);
    nothing_within(&mut sub, 100).await;
    // after_sequence = 2 skips the SessionStart and the proposal.
    let mut sub2 = subscribe(&mut b, &s, 2).await;
    assert_eq!(msg_id(next(&mut sub2).await), v.message_id);
    assert_eq!(msg_id(next(&mut sub2).await), v2.message_id);
    nothing_within(&mut sub2, 100).await;
}

#[tokio::test]
async fn passive_subscribe_to_a_resolved_session_replays_and_ends() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let mut a = srv.client("A").await;
    let s = start_session(&mut i).await;
    assert!(send(&mut a, env(&s, DECISION, "Proposal", proposal("p1"))).await.ok);
    assert!(send(&mut i, env(&s, DECISION, "Commitment", commitment())).await.ok);
    let mut sub = subscribe(&mut a, &s, 0).await;
    for _ in 0..3 {
        next(&mut sub).await;
    }
    assert!(tokio::time::timeout(T, sub.next()).await.unwrap().is_none(), "the stream ends after a terminal history");
}

#[tokio::test]
async fn row_111_subscribe_requires_participant_or_observer() {
    let srv =
        Server::start(&["--auth-tokens-json", r#"[{"token":"obs","sender":"auditor","is_observer":true}]"#]).await;
    let mut i = srv.client("I").await;
    let s = start_session(&mut i).await;
    let mut outsider = srv.client("Z").await;
    let req = StreamSessionRequest { subscribe_session_id: s.clone(), ..Default::default() };
    let mut out = outsider.stream_session(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let e = tokio::time::timeout(T, out.next()).await.unwrap().unwrap().unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let req = StreamSessionRequest { subscribe_session_id: sid(), ..Default::default() };
    let mut out = outsider.stream_session(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    assert_eq!(tokio::time::timeout(T, out.next()).await.unwrap().unwrap().unwrap_err().code(), Code::NotFound);
    let mut obs = srv.bearer("obs").await;
    let mut sub = subscribe(&mut obs, &s, 0).await;
    next(&mut sub).await;
}

#[tokio::test]
async fn row_112_inline_errors_keep_the_stream_open() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let s = start_session(&mut i).await;
    let mut a = srv.client("A").await;
    assert!(send(&mut a, env(&s, DECISION, "Proposal", proposal("p1"))).await.ok);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut out = a.stream_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(StreamSessionRequest {
        envelope: Some(env(&s, DECISION, "Vote", vote("p1", "maybe"))),
        ..Default::default()
    })
    .await
    .unwrap();
    match next(&mut out).await.response {
        Some(stream_session_response::Response::Error(e)) => assert_eq!(e.code, "INVALID_ENVELOPE"),
        other => panic!("expected an error frame, got {other:?}"),
    }
    let good = env(&s, DECISION, "Vote", vote("p1", "APPROVE"));
    tx.send(StreamSessionRequest { envelope: Some(good.clone()), ..Default::default() }).await.unwrap();
    // The first valid envelope binds the stream; its echo follows.
    assert_eq!(msg_id(next(&mut out).await), good.message_id);
}

#[tokio::test]
async fn row_113_list_modes_standards_track_only() {
    let srv = Server::start(&[]).await;
    let mut c = srv.anonymous().await;
    let modes = c.list_modes(ListModesRequest {}).await.unwrap().into_inner().modes;
    assert!(modes.iter().all(|m| m.mode.starts_with("macp.mode.")));
    assert!(modes.iter().all(|m| m.terminal_message_types == vec!["Commitment".to_string()]));
    assert!(modes.iter().any(|m| m.mode == DECISION));
    let ext = c.list_ext_modes(ListExtModesRequest {}).await.unwrap().into_inner().modes;
    assert!(ext.iter().all(|m| !m.mode.starts_with("macp.mode.")));
}

fn descriptor(mode: &str) -> ModeDescriptor {
    ModeDescriptor {
        mode: mode.into(),
        mode_version: "1.0.0".into(),
        message_types: vec!["SessionStart".into(), "Note".into(), "Commitment".into()],
        terminal_message_types: vec!["Commitment".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn row_114_ext_mode_lifecycle_and_reserved_namespace() {
    let srv = Server::start(&["--auth-tokens-json", r#"[{"token":"user","sender":"u"}]"#]).await;
    let mut admin = srv.client("admin").await;
    let mut watch = admin.watch_mode_registry(WatchModeRegistryRequest {}).await.unwrap().into_inner();
    assert_eq!(next(&mut watch).await.change.unwrap().registry, "modes");
    let r = admin
        .register_ext_mode(RegisterExtModeRequest { mode_descriptor: Some(descriptor("macp.mode.foo.v1")) })
        .await
        .unwrap();
    assert!(!r.get_ref().ok && !r.get_ref().error.is_empty());
    let r = admin
        .register_ext_mode(RegisterExtModeRequest { mode_descriptor: Some(descriptor("ext.notes.v1")) })
        .await
        .unwrap();
    assert!(r.get_ref().ok, "{}", r.get_ref().error);
    next(&mut watch).await;
    let ext = admin.list_ext_modes(ListExtModesRequest {}).await.unwrap().into_inner().modes;
    assert!(ext.iter().any(|m| m.mode == "ext.notes.v1"));
    let r = admin
        .promote_mode(PromoteModeRequest {
            mode: "ext.notes.v1".into(),
            promoted_mode_name: "macp.mode.notes.v1".into(),
        })
        .await
        .unwrap();
    assert!(!r.get_ref().ok);
    let r = admin
        .promote_mode(PromoteModeRequest { mode: "ext.notes.v1".into(), promoted_mode_name: String::new() })
        .await
        .unwrap();
    assert!(r.get_ref().ok);
    assert_eq!(r.get_ref().mode, "ext.notes.v1");
    let modes = admin.list_modes(ListModesRequest {}).await.unwrap().into_inner().modes;
    assert!(modes.iter().any(|m| m.mode == "ext.notes.v1"));
    let r = admin.unregister_ext_mode(UnregisterExtModeRequest { mode: DECISION.into() }).await.unwrap();
    assert!(!r.get_ref().ok);
    // Registry changes need can_manage_mode_registry.
    let mut user = srv.bearer("user").await;
    let e = user
        .register_ext_mode(RegisterExtModeRequest { mode_descriptor: Some(descriptor("ext.other.v1")) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn row_115_get_manifest() {
    let srv = Server::start(&[]).await;
    let mut c = srv.anonymous().await;
    let m =
        c.get_manifest(GetManifestRequest { agent_id: String::new() }).await.unwrap().into_inner().manifest.unwrap();
    assert!(!m.agent_id.is_empty() && !m.description.is_empty());
    assert!(!m.supported_modes.is_empty() && !m.input_content_types.is_empty() && !m.output_content_types.is_empty());
    let e = c.get_manifest(GetManifestRequest { agent_id: "nobody".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn row_116_get_session_access_control() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let s = start_session(&mut i).await;
    let md = i.get_session(GetSessionRequest { session_id: s.clone() }).await.unwrap().into_inner().metadata.unwrap();
    assert_eq!(md.state, SessionState::Open as i32);
    assert_eq!(md.initiator, "I");
    let mut z = srv.client("Z").await;
    assert_eq!(z.get_session(GetSessionRequest { session_id: s }).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(i.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn row_117_watch_sessions_lifecycle_events() {
    use session_lifecycle_event::EventType;
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let existing = start_session(&mut i).await;
    let mut w = i.watch_sessions(WatchSessionsRequest {}).await.unwrap().into_inner();
    let sync = next(&mut w).await.event.unwrap();
    assert_eq!(sync.event_type, EventType::Created as i32);
    assert_eq!(sync.session.unwrap().session_id, existing);
    let s = start_session(&mut i).await;
    let ev = next(&mut w).await.event.unwrap();
    assert_eq!((ev.event_type, ev.session.unwrap().session_id), (EventType::Created as i32, s.clone()));
    let mut a = srv.client("A").await;
    send(&mut a, env(&s, DECISION, "Proposal", proposal("p1"))).await;
    assert!(send(&mut i, env(&s, DECISION, "Commitment", commitment())).await.ok);
    assert_eq!(next(&mut w).await.event.unwrap().event_type, EventType::Resolved as i32);
    i.suspend_session(SuspendSessionRequest { session_id: existing.clone(), reason: "r".into() }).await.unwrap();
    assert_eq!(next(&mut w).await.event.unwrap().event_type, EventType::Suspended as i32);
    i.resume_session(ResumeSessionRequest { session_id: existing.clone(), reason: "r".into() }).await.unwrap();
    assert_eq!(next(&mut w).await.event.unwrap().event_type, EventType::Resumed as i32);
    i.cancel_session(CancelSessionRequest { session_id: existing, reason: "r".into() }).await.unwrap();
    assert_eq!(next(&mut w).await.event.unwrap().event_type, EventType::Cancelled as i32);
}

#[tokio::test]
async fn cancel_suspend_resume_statuses() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let s = start_session(&mut i).await;
    let mut a = srv.client("A").await;
    let e = a.cancel_session(CancelSessionRequest { session_id: s.clone(), reason: "r".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = a.suspend_session(SuspendSessionRequest { session_id: s.clone(), reason: "r".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = i.cancel_session(CancelSessionRequest { session_id: sid(), reason: "r".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let ack = i
        .resume_session(ResumeSessionRequest { session_id: s.clone(), reason: "r".into() })
        .await
        .unwrap()
        .into_inner()
        .ack
        .unwrap();
    assert_eq!(code(&ack), "SESSION_NOT_OPEN");
    let ack = i
        .suspend_session(SuspendSessionRequest { session_id: s.clone(), reason: "r".into() })
        .await
        .unwrap()
        .into_inner()
        .ack
        .unwrap();
    assert_eq!(ack.session_state, SessionState::Suspended as i32);
    let ack = i
        .cancel_session(CancelSessionRequest { session_id: s.clone(), reason: "r".into() })
        .await
        .unwrap()
        .into_inner()
        .ack
        .unwrap();
    assert_eq!(ack.session_state, SessionState::Cancelled as i32);
    assert!(
        i.cancel_session(CancelSessionRequest { session_id: s, reason: "r".into() })
            .await
            .unwrap()
            .into_inner()
            .ack
            .unwrap()
            .ok
    );
}

#[tokio::test]
async fn list_sessions_pages_and_filters() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(start_session(&mut i).await);
    }
    let mut z = srv.client("Z").await;
    let mine = send(&mut z, start_env(&sid(), &["Z"])).await;
    assert!(mine.ok);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = i
            .list_sessions(ListSessionsRequest { page_size: 2, page_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(r.sessions.len() <= 2);
        seen.extend(r.sessions.into_iter().map(|m| m.session_id));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    ids.sort();
    assert_eq!(seen, ids, "every readable session once, none of Z's");
    let e = i.list_sessions(ListSessionsRequest { page_size: 2, page_token: "zz".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn policy_rpcs() {
    let srv = Server::start(&[]).await;
    let mut c = srv.client("admin").await;
    let mut watch = c.watch_policies(WatchPoliciesRequest {}).await.unwrap().into_inner();
    let initial = next(&mut watch).await.descriptors;
    assert!(initial.iter().any(|d| d.policy_id == "policy.default"));
    let d = get_policy(&mut c, "policy.default").await;
    assert_eq!(d.mode, "*");
    let p = PolicyDescriptor {
        policy_id: "policy.team.majority".into(),
        mode: DECISION.into(),
        description: "majority".into(),
        rules: r#"{"voting":{"algorithm":"majority"}}"#.into(),
        schema_version: 1,
        registered_at_unix_ms: 0,
    };
    let r = c.register_policy(RegisterPolicyRequest { policy_descriptor: Some(p.clone()) }).await.unwrap().into_inner();
    assert!(r.ok, "{}", r.error);
    assert!(next(&mut watch).await.descriptors.iter().any(|d| d.policy_id == p.policy_id));
    let r = c.register_policy(RegisterPolicyRequest { policy_descriptor: Some(p.clone()) }).await.unwrap().into_inner();
    assert!(!r.ok && r.error.starts_with("INVALID_POLICY_DEFINITION"));
    let list = c
        .list_policies(ListPoliciesRequest { mode: "macp.mode.task.v1".into() })
        .await
        .unwrap()
        .into_inner()
        .descriptors;
    assert!(list.iter().all(|d| d.mode == "*" || d.mode == "macp.mode.task.v1"));
    let r =
        c.unregister_policy(UnregisterPolicyRequest { policy_id: "policy.default".into() }).await.unwrap().into_inner();
    assert!(!r.ok);
    let r = c.unregister_policy(UnregisterPolicyRequest { policy_id: p.policy_id.clone() }).await.unwrap().into_inner();
    assert!(r.ok);
    let e = c.get_policy(GetPolicyRequest { policy_id: p.policy_id }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn roots_and_unimplemented_rpcs() {
    let srv = Server::start(&[]).await;
    let mut c = srv.client("I").await;
    assert!(c.list_roots(ListRootsRequest {}).await.unwrap().into_inner().roots.is_empty());
    let mut w = c.watch_roots(WatchRootsRequest {}).await.unwrap().into_inner();
    assert!(next(&mut w).await.change.is_some());
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let srv = Server::start(&[]).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(srv.channel().await);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "macp.v1.MACPRuntimeService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(srv.channel().await);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut out = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = next(&mut out).await;
    let names = format!("{:?}", resp.message_response);
    assert!(names.contains("macp.v1.MACPRuntimeService"), "{names}");
}
