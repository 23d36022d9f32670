//! WhatIfReplay through the server: a stricter candidate diverges at the
//! Commitment, the recorded policy shows none, the replay changes nothing,
//! and every error has its registry code and gRPC status.

mod common;

use std::time::Duration;

use common::*;
use macp_transport_grpc::service::ERROR_CODE_KEY;
use macp_wire::v1::*;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

const T: Duration = Duration::from_secs(5);

#[track_caller]
fn check(s: Status, status: Code, registry: &str) {
    let code = s.metadata().get(ERROR_CODE_KEY).and_then(|v| v.to_str().ok()).unwrap_or("<none>").to_string();
    assert_eq!((s.code(), code.as_str()), (status, registry), "{s:?}");
}

fn unanimous() -> PolicyDescriptor {
    PolicyDescriptor {
        policy_id: "policy.candidate.unanimous".into(),
        mode: DECISION.into(),
        description: "every decisive vote must approve".into(),
        rules: r#"{"voting":{"algorithm":"unanimous"}}"#.into(),
        schema_version: 3,
        registered_at_unix_ms: 0,
    }
}

fn request(session_id: &str, candidate: PolicyDescriptor) -> WhatIfReplayRequest {
    WhatIfReplayRequest { session_id: session_id.into(), candidate: Some(candidate) }
}

/// A resolved session under `policy.default`: A proposes, A approves, B
/// rejects, I commits.
async fn split_vote(i: &mut Client, a: &mut Client, b: &mut Client) -> String {
    let s = start_session(i).await;
    assert!(send(a, env(&s, DECISION, "Proposal", proposal("p1"))).await.ok);
    assert!(send(a, env(&s, DECISION, "Vote", vote("p1", "APPROVE"))).await.ok);
    assert!(send(b, env(&s, DECISION, "Vote", vote("p1", "REJECT"))).await.ok);
    let ack = send(i, env(&s, DECISION, "Commitment", commitment())).await;
    assert!(ack.ok, "{:?}", ack.error);
    s
}

async fn history_len(c: &mut Client, s: &str) -> usize {
    let req = StreamSessionRequest { subscribe_session_id: s.to_string(), ..Default::default() };
    let reqs = tokio_stream::iter(vec![req]).chain(tokio_stream::pending());
    let mut out = c.stream_session(reqs).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(item) = tokio::time::timeout(T, out.next()).await.expect("in time") {
        item.expect("history item");
        n += 1;
    }
    n
}

#[tokio::test]
async fn initialize_advertises_what_if_replay() {
    let srv = Server::start(&[]).await;
    let mut c = srv.anonymous().await;
    let init = InitializeRequest { supported_protocol_versions: vec!["1.0".into()], ..Default::default() };
    let caps = c.initialize(init).await.unwrap().into_inner().capabilities.unwrap();
    let registry = caps.policy_registry.unwrap();
    assert!(registry.what_if_replay);
    assert!(registry.register_policy, "without MACP_POLICIES_DIR the registry takes registrations");
}

#[tokio::test]
async fn a_stricter_candidate_diverges_at_the_commitment_and_nothing_changes() {
    let srv = Server::start(&[]).await;
    let (mut i, mut a, mut b) = (srv.client("I").await, srv.client("A").await, srv.client("B").await);
    let s = split_vote(&mut i, &mut a, &mut b).await;
    let policies_before = i.list_policies(ListPoliciesRequest::default()).await.unwrap().into_inner();
    let session_before = i.get_session(GetSessionRequest { session_id: s.clone() }).await.unwrap().into_inner();
    let mut lifecycle = i.watch_sessions(WatchSessionsRequest {}).await.unwrap().into_inner();

    // A participant other than the initiator may ask too.
    let r = b.what_if_replay(request(&s, unanimous())).await.unwrap().into_inner();
    assert_eq!(r.candidate_policy_id, "policy.candidate.unanimous");
    assert_eq!(r.recorded_policy_id, "policy.default");
    assert_eq!(r.first_divergence, Some(4), "SessionStart, Proposal, two Votes, then the Commitment");
    assert_eq!(r.entries.len(), 5);
    let commit = &r.entries[4];
    assert_eq!(commit.message_type, "Commitment");
    let (rec, cand) = (commit.recorded.as_ref().unwrap(), commit.candidate.as_ref().unwrap());
    assert_eq!(rec.kind, what_if_entry_outcome::Kind::Applied as i32);
    assert_eq!(rec.state, SessionState::Resolved as i32);
    assert_eq!(cand.kind, what_if_entry_outcome::Kind::Refused as i32);
    assert_eq!(cand.error_code, "POLICY_DENIED");
    let details: serde_json::Value = serde_json::from_slice(&cand.details).unwrap();
    assert_eq!(details["denials"][0]["code"], "threshold_not_met", "{details}");
    assert_eq!(r.denials.len(), 1);
    assert_eq!((r.denials[0].history_index, &r.denials[0].message_id), (4, &commit.message_id));
    let (recorded, candidate) = (r.recorded.unwrap(), r.candidate.unwrap());
    assert_eq!(recorded.state, SessionState::Resolved as i32);
    assert_eq!(recorded.resolved_by_message_id, commit.message_id);
    assert_eq!(recorded.resolution, commitment());
    assert_eq!(candidate.state, SessionState::Open as i32);
    assert!(candidate.resolution.is_empty());

    // The recorded policy itself: no divergence.
    let default = get_policy(&mut i, "policy.default").await;
    let r = i.what_if_replay(request(&s, default)).await.unwrap().into_inner();
    assert_eq!(r.first_divergence, None);
    assert!(r.denials.is_empty());
    assert_eq!(r.recorded, r.candidate);

    // Read-only: nothing registered, the session and its history as they
    // were, no lifecycle event broadcast.
    let policies_after = i.list_policies(ListPoliciesRequest::default()).await.unwrap().into_inner();
    assert_eq!(policies_after, policies_before, "the candidate was not registered");
    let session_after = i.get_session(GetSessionRequest { session_id: s.clone() }).await.unwrap().into_inner();
    assert_eq!(session_after, session_before);
    assert_eq!(history_len(&mut a, &s).await, 5, "no record was added to the history");
    let event = tokio::time::timeout(Duration::from_millis(200), lifecycle.next()).await;
    assert!(event.is_err(), "a replay broadcasts nothing: {event:?}");
}

#[tokio::test]
async fn an_open_session_replays_its_history_so_far() {
    let srv = Server::start(&[]).await;
    let (mut i, mut a) = (srv.client("I").await, srv.client("A").await);
    let s = start_session(&mut i).await;
    assert!(send(&mut a, env(&s, DECISION, "Proposal", proposal("p1"))).await.ok);
    let r = a.what_if_replay(request(&s, unanimous())).await.unwrap().into_inner();
    assert_eq!((r.entries.len(), r.first_divergence), (2, None));
    assert_eq!(r.candidate.unwrap().state, SessionState::Open as i32);
}

#[tokio::test]
async fn errors_carry_their_registry_codes() {
    let srv = Server::start(&[]).await;
    let (mut i, mut a, mut b) = (srv.client("I").await, srv.client("A").await, srv.client("B").await);
    let s = split_vote(&mut i, &mut a, &mut b).await;
    let unknown = sid();
    let e = i.what_if_replay(request(&unknown, unanimous())).await.unwrap_err();
    check(e, Code::NotFound, "SESSION_NOT_FOUND");
    let mut outsider = srv.client("Z").await;
    let e = outsider.what_if_replay(request(&s, unanimous())).await.unwrap_err();
    check(e, Code::PermissionDenied, "FORBIDDEN");
    let no_description = PolicyDescriptor { description: String::new(), ..unanimous() };
    let e = i.what_if_replay(request(&s, no_description)).await.unwrap_err();
    check(e, Code::InvalidArgument, "INVALID_POLICY_DEFINITION");
    let other_mode = PolicyDescriptor { mode: "macp.mode.task.v1".into(), rules: "{}".into(), ..unanimous() };
    let e = i.what_if_replay(request(&s, other_mode)).await.unwrap_err();
    check(e, Code::InvalidArgument, "INVALID_POLICY_DEFINITION");
    let e = i.what_if_replay(WhatIfReplayRequest { session_id: s.clone(), candidate: None }).await.unwrap_err();
    check(e, Code::InvalidArgument, "INVALID_POLICY_DEFINITION");
    let e = srv.anonymous().await.what_if_replay(request(&s, unanimous())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn history_gone_is_history_unavailable() {
    // A history limit of one byte: every ended session's history is
    // dropped at the next upkeep after a checkpoint, while the runtime
    // still knows the session ended.
    let srv = Server::start(&["--memory-history-limit", "1", "--checkpoint-every", "1"]).await;
    let (mut i, mut a, mut b) = (srv.client("I").await, srv.client("A").await, srv.client("B").await);
    let s = split_vote(&mut i, &mut a, &mut b).await;
    // One more commit to make sure a checkpoint follows the session's end.
    start_session(&mut i).await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match i.what_if_replay(request(&s, unanimous())).await {
            Err(e) if e.code() == Code::FailedPrecondition => {
                check(e, Code::FailedPrecondition, "HISTORY_UNAVAILABLE");
                break;
            }
            other => {
                assert!(tokio::time::Instant::now() < deadline, "history still replayable: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let md = i.get_session(GetSessionRequest { session_id: s }).await.unwrap().into_inner().metadata.unwrap();
    assert_eq!(md.state, SessionState::Resolved as i32, "the session itself is still known");
}
