//! Session RPCs: Send, GetSession, Cancel/Suspend/ResumeSession,
//! ListSessions and WatchSessions.

use std::collections::BTreeSet;
use std::sync::Arc;

use macp_kernel::{
    may_read_metadata, Answer, ControlOp, ErrorCode, Identity, Input, Kernel, KernelError, Query, Reply,
};
use macp_wire::v1::*;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{unexpected, RpcStream, Runtime};
use crate::driver::{now_ms, Binding, Command};
use crate::limits::Budget;
use crate::status::{ack, error_status, lagged, status};

/// Room left in a ListSessions reply for everything but the sessions.
const LIST_REPLY_SLACK: usize = 64 * 1024;

pub(super) async fn send(rt: &Runtime, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
    let identity = rt.identity(&req).await;
    let forwarded = Runtime::forwarded(&req);
    let envelope =
        req.into_inner().envelope.ok_or_else(|| Status::invalid_argument("SendRequest needs an envelope"))?;
    let ack = send_envelope(rt, identity, envelope, None, forwarded).await?;
    Ok(Response::new(SendResponse { ack: Some(ack) }))
}

/// The Send path shared by `Send` and StreamSession envelope frames: shape
/// checks, authentication, rate limits, then the kernel. Refusals are
/// answers (an Ack), not transport errors; the one error is UNAVAILABLE
/// when no driver here serves the session (a cluster node that does not
/// hold its shard, or one whose shard moved while the request waited):
/// nothing was recorded and the client retries. Timed when metrics are on.
pub(super) async fn send_envelope(
    rt: &Runtime,
    identity: Result<Identity, Status>,
    envelope: Envelope,
    bind: Option<oneshot::Sender<Option<Binding>>>,
    forwarded: bool,
) -> Result<Ack, Status> {
    match rt.metrics.as_deref() {
        None => admit(rt, identity, envelope, bind, forwarded).await,
        Some(m) => {
            let started = std::time::Instant::now();
            let ack = admit(rt, identity, envelope, bind, forwarded).await;
            m.send_seconds.observe_duration(started.elapsed());
            ack
        }
    }
}

async fn admit(
    rt: &Runtime,
    identity: Result<Identity, Status>,
    mut envelope: Envelope,
    mut bind: Option<oneshot::Sender<Option<Binding>>>,
    forwarded: bool,
) -> Result<Ack, Status> {
    let now = now_ms();
    let (session_id, message_id) = (envelope.session_id.clone(), envelope.message_id.clone());
    let answer = |result: Result<macp_kernel::Accepted, KernelError>| Ok(ack(&session_id, &message_id, now, result));
    if let Err(e) = macp_kernel::validate::envelope_shape(&envelope, &rt.kernel_config) {
        return answer(Err(e));
    }
    let mut identity = match identity {
        Ok(i) => i,
        Err(_) => return answer(Err(KernelError::new(ErrorCode::Unauthenticated, "missing or invalid credentials"))),
    };
    let budget = if envelope.message_type == "SessionStart" { Budget::SessionStart } else { Budget::Message };
    if !rt.within_limit(&identity.sender, budget, forwarded) {
        let what = match budget {
            Budget::SessionStart => "SessionStart",
            Budget::Message => "message",
        };
        return answer(Err(KernelError::new(
            ErrorCode::RateLimited,
            format!("{} exceeded its per-minute {what} limit", identity.sender),
        )));
    }
    // Ambient envelopes touch no session and are never persisted: the
    // kernel's own admission function answers them here, on the request's
    // task, and they are broadcast directly instead of queueing behind
    // session traffic in the driver. (A StreamSession frame may bind its
    // stream, which only the driver can do.)
    if bind.is_none() && macp_kernel::is_ambient(&envelope.message_type) {
        return match Kernel::admit_ambient(&rt.kernel_config, &identity, envelope) {
            Ok(envelope) => {
                crate::hub::publish(&rt.watch.signals, || WatchSignalsResponse {
                    envelope: Some(envelope),
                    sender_authenticated: true,
                });
                answer(Ok(macp_kernel::Accepted { state: SessionState::Open, duplicate: false }))
            }
            Err(e) => answer(Err(e)),
        };
    }
    if let Some(peer) = rt.router.peer(&session_id, forwarded) {
        let req = peer.request(SendRequest { envelope: Some(envelope) }, &identity);
        // Boxed: the client call's future (about 1.5 KB) would otherwise
        // sit in the state of every Send, forwarded or not.
        let ack = Box::pin(peer.client.clone().send(req)).await?.into_inner().ack;
        return ack.ok_or_else(|| unexpected("a forwarded Send"));
    }
    // A cluster node may not have synced a policy or mode registered on
    // another node a moment ago: a SessionStart refused for naming one
    // gets one more try after the registries are read again (not for a
    // StreamSession frame, whose binding is spent on the first try).
    let mut retry = (bind.is_none() && rt.router.is_cluster() && envelope.message_type == "SessionStart")
        .then(|| (identity.clone(), envelope.clone()));
    // One call site for the submission, so the request's state holds one
    // submission future, not two.
    let reply = loop {
        let reply = submit_envelope(rt, &session_id, identity, envelope, bind.take()).await?;
        if let (Some((i, e)), Reply::Session { result: Err(err), .. }) = (retry.take(), &reply) {
            // Boxed: a cluster-only path whose future would otherwise be
            // most of every Send's state (3 KB), allocated and moved on
            // every request.
            if crate::cluster::registries::may_be_unsynced(err) && Box::pin(rt.router.refresh_registries()).await {
                (identity, envelope) = (i, e);
                continue;
            }
        }
        break reply;
    };
    match reply {
        Reply::Session { at_unix_ms, result } => Ok(ack(&session_id, &message_id, at_unix_ms, result)),
        Reply::Registry(_) => answer(Err(KernelError::new(ErrorCode::InternalError, "unexpected reply kind"))),
    }
}

/// Hands an envelope to its session's driver and waits for the durable reply.
async fn submit_envelope(
    rt: &Runtime,
    session_id: &str,
    identity: macp_kernel::Identity,
    envelope: Envelope,
    bind: Option<oneshot::Sender<Option<crate::driver::Binding>>>,
) -> Result<Reply, Status> {
    let driver = rt.router.session(session_id)?;
    let (reply, rx) = oneshot::channel();
    let bind = bind.map(|tx| (identity.clone(), tx));
    let input = Input::Envelope { request: 0, identity, envelope };
    if driver.send(Command::Submit { input, reply, bind }).await.is_err() {
        return Err(rt.gone());
    }
    rx.await.map_err(|_| rt.gone())
}

/// Cancel/Suspend/ResumeSession. An unknown session and a caller without
/// authority are whole-RPC errors; every other refusal is an Ack.
pub(super) async fn control(rt: &Runtime, req: Request<(String, String)>, op: ControlOp) -> Result<Ack, Status> {
    let identity = rt.identity(&req).await?;
    let forwarded = Runtime::forwarded(&req);
    if !rt.within_limit(&identity.sender, Budget::Message, forwarded) {
        return Err(error_status(
            ErrorCode::RateLimited,
            format!("{} exceeded its per-minute message limit", identity.sender),
        ));
    }
    let (session_id, reason) = req.into_inner();
    if let Some(peer) = rt.router.peer(&session_id, forwarded) {
        let mut c = peer.client.clone();
        let ack = match op {
            ControlOp::Cancel => {
                let req = peer.request(CancelSessionRequest { session_id, reason }, &identity);
                c.cancel_session(req).await?.into_inner().ack
            }
            ControlOp::Suspend => {
                let req = peer.request(SuspendSessionRequest { session_id, reason }, &identity);
                c.suspend_session(req).await?.into_inner().ack
            }
            ControlOp::Resume => {
                let req = peer.request(ResumeSessionRequest { session_id, reason }, &identity);
                c.resume_session(req).await?.into_inner().ack
            }
        };
        return ack.ok_or_else(|| unexpected("a forwarded control request"));
    }
    let input = Input::Control { request: 0, identity, op, session_id: session_id.clone(), reason };
    match rt.submit(input).await? {
        Reply::Session { result: Err(e), .. }
            if matches!(e.code, ErrorCode::SessionNotFound | ErrorCode::Forbidden) =>
        {
            Err(status(e))
        }
        Reply::Session { at_unix_ms, result } => Ok(ack(&session_id, "", at_unix_ms, result)),
        Reply::Registry(_) => Err(unexpected("a control request")),
    }
}

pub(super) async fn get_session(
    rt: &Runtime,
    req: Request<GetSessionRequest>,
) -> Result<Response<GetSessionResponse>, Status> {
    let identity = rt.identity(&req).await?;
    let forwarded = Runtime::forwarded(&req);
    let session_id = req.into_inner().session_id;
    if let Some(peer) = rt.router.peer(&session_id, forwarded) {
        return peer.client.clone().get_session(peer.request(GetSessionRequest { session_id }, &identity)).await;
    }
    match rt.ask(Query::GetSession { identity, session_id }).await? {
        Answer::Session(Ok(md)) => Ok(Response::new(GetSessionResponse { metadata: Some(md) })),
        Answer::Session(Err(e)) => Err(status(e)),
        _ => Err(unexpected("GetSession")),
    }
}

/// ListSessions: this node's shards, and on a cluster node that forwards,
/// every other live node's too (see [`super::fan`]), merged into one page.
pub(super) async fn list_sessions(
    rt: &Runtime,
    req: Request<ListSessionsRequest>,
) -> Result<Response<ListSessionsResponse>, Status> {
    let identity = rt.identity(&req).await?;
    let fan = rt.router.fan(Runtime::forwarded(&req));
    let r = req.into_inner();
    let byte_budget = rt.max_reply_bytes.saturating_sub(LIST_REPLY_SLACK).max(1);
    let peers = async {
        match &fan {
            Some(fan) => super::fan::peer_pages(fan, &identity, &r).await,
            None => Ok(Vec::new()),
        }
    };
    let query = Query::ListSessions {
        identity: identity.clone(),
        page_size: r.page_size,
        page_token: r.page_token.clone(),
        byte_budget,
    };
    let drivers = rt.router.all();
    // One driver's page as it is. (Not `rt.ask`: on a cluster node that
    // routes to the registry driver, which holds no session.)
    if let ([driver], None) = (drivers.as_slice(), &fan) {
        return match Runtime::ask_of(driver, query).await.map_err(|()| rt.gone())? {
            Answer::Page(Ok(p)) => {
                Ok(Response::new(ListSessionsResponse { sessions: p.sessions, next_page_token: p.next_page_token }))
            }
            Answer::Page(Err(e)) => Err(status(e)),
            _ => Err(unexpected("ListSessions")),
        };
    }
    let local = async {
        let mut pages = Vec::with_capacity(drivers.len());
        for d in &drivers {
            match Runtime::ask_of(d, query.clone()).await.map_err(|()| rt.gone())? {
                Answer::Page(Ok(p)) => pages.push(p),
                Answer::Page(Err(e)) => return Err(status(e)),
                _ => return Err(unexpected("ListSessions")),
            }
        }
        Ok(pages)
    };
    let (local, peers) = tokio::join!(local, peers);
    let mut pages = local?;
    pages.extend(peers?);
    let (sessions, next_page_token) = merge_pages(pages, byte_budget);
    Ok(Response::new(ListSessionsResponse { sessions, next_page_token }))
}

/// One ListSessions page out of the pages of several drivers (a cluster
/// node's shards, and other nodes' merged pages), each in session-id order
/// over its own open sessions and the ended ones all shards share. A
/// driver with more to say stopped at the id its token names, so the
/// merged page is complete only up to the least of those ids; it is also no longer than the longest page and
/// within the byte budget. The token is the last id returned, in the
/// kernel's format (hex of the id's bytes).
fn merge_pages(pages: Vec<macp_kernel::SessionPage>, byte_budget: usize) -> (Vec<SessionMetadata>, String) {
    let hex = |id: &str| id.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let unhex = |t: &str| -> Option<String> {
        let bytes: Option<Vec<u8>> =
            (0..t.len()).step_by(2).map(|i| t.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
        String::from_utf8(bytes?).ok()
    };
    let longest = pages.iter().map(|p| p.sessions.len()).max().unwrap_or(0);
    let cut: Option<String> =
        pages.iter().filter(|p| !p.next_page_token.is_empty()).filter_map(|p| unhex(&p.next_page_token)).min();
    let mut all: Vec<SessionMetadata> = pages.into_iter().flat_map(|p| p.sessions).collect();
    all.sort_by(|a, b| a.session_id.cmp(&b.session_id));
    all.dedup_by(|a, b| a.session_id == b.session_id);
    let complete = all.len();
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for m in all {
        if cut.as_deref().is_some_and(|c| m.session_id.as_str() > c) || out.len() == longest {
            break;
        }
        let len = prost::Message::encoded_len(&m) + 8;
        if !out.is_empty() && bytes + len > byte_budget {
            break;
        }
        bytes += len;
        out.push(m);
    }
    let more = cut.is_some() || out.len() < complete;
    // A page that looked at many sessions it may not list can end early,
    // empty, with a token: go on from there.
    let token = match (out.last(), cut) {
        (Some(m), _) if more => hex(&m.session_id),
        (None, Some(c)) => hex(&c),
        _ => String::new(),
    };
    (out, token)
}

/// WatchSessions: a snapshot of the visible open sessions as CREATED
/// events, then live events. On a cluster node that forwards, merged with
/// the same watch of every other live node (see [`super::fan::watch`]):
/// each node's snapshot-then-live, interleaved, every session's CREATED
/// once and before its other events (they come from the node serving it).
pub(super) async fn watch_sessions(
    rt: &Runtime,
    req: Request<WatchSessionsRequest>,
) -> Result<Response<RpcStream<WatchSessionsResponse>>, Status> {
    let identity = rt.identity(&req).await?;
    let fan = rt.router.fan(Runtime::forwarded(&req));
    // Subscribe before the snapshot so nothing falls between them; live
    // CREATED events for sessions already in the snapshot are dropped.
    let rx = rt.watch.lifecycle.subscribe();
    let mut initial = Vec::new();
    for d in rt.router.all() {
        match Runtime::ask_of(&d, Query::VisibleSessions { identity: identity.clone() })
            .await
            .map_err(|()| rt.gone())?
        {
            Answer::Sessions(v) => initial.extend(v),
            _ => return Err(unexpected("WatchSessions")),
        }
    }
    let synced: BTreeSet<String> = initial.iter().map(|m| m.session_id.clone()).collect();
    let first = tokio_stream::iter(initial.into_iter().map(|m| {
        Ok(WatchSessionsResponse {
            event: Some(SessionLifecycleEvent {
                event_type: session_lifecycle_event::EventType::Created as i32,
                observed_at_unix_ms: m.started_at_unix_ms,
                session: Some(m),
            }),
        })
    }));
    let reader = identity.clone();
    let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| match e {
        Ok(ev) => {
            let m = ev.session.as_ref()?;
            let dup =
                ev.event_type == session_lifecycle_event::EventType::Created as i32 && synced.contains(&m.session_id);
            (may_read_metadata(&reader, m) && !dup)
                .then(|| Ok(WatchSessionsResponse { event: Some(Arc::unwrap_or_clone(ev)) }))
        }
        Err(_) => Some(Err(lagged("session watcher fell behind; reconnect to resync"))),
    });
    let local: RpcStream<WatchSessionsResponse> = Box::pin(first.chain(live));
    let call = |mut c: crate::cluster::forward::PeerClient, req| async move { c.watch_sessions(req).await };
    let keep = super::fan::created_once();
    Ok(Response::new(super::fan::watch(fan, local, identity, WatchSessionsRequest {}, call, keep)))
}

#[cfg(test)]
mod tests {
    use macp_kernel::SessionPage;

    use super::*;

    fn page(ids: &[&str], token_after: Option<&str>) -> SessionPage {
        SessionPage {
            sessions: ids
                .iter()
                .map(|id| SessionMetadata { session_id: id.to_string(), ..Default::default() })
                .collect(),
            next_page_token: token_after.map(|id| id.bytes().map(|b| format!("{b:02x}")).collect()).unwrap_or_default(),
        }
    }

    fn ids(v: &[SessionMetadata]) -> Vec<&str> {
        v.iter().map(|m| m.session_id.as_str()).collect()
    }

    /// Ended sessions every shard sees come once; a shard with more to say
    /// bounds the page at the id its token names.
    #[test]
    fn pages_of_several_shards_merge_in_id_order() {
        // Shard 1 holds a and d open, shard 2 holds c; b and e ended.
        let one = page(&["a", "b", "d"], Some("d"));
        let two = page(&["b", "c", "e"], None);
        let (merged, token) = merge_pages(vec![one, two], usize::MAX);
        assert_eq!(ids(&merged), ["a", "b", "c"], "no longer than the longest page (and e lies beyond d)");
        assert_eq!(token, "63");
        let one = page(&["a", "b", "d"], Some("d"));
        let two = page(&["b", "e"], None);
        let (merged, token) = merge_pages(vec![one, two], usize::MAX);
        assert_eq!(ids(&merged), ["a", "b", "d"], "e lies beyond what shard 1 has said");
        assert_eq!(token, "64");
        let (merged, token) = merge_pages(vec![page(&["a", "b"], None), page(&["b"], None)], usize::MAX);
        assert_eq!((ids(&merged), token.as_str()), (vec!["a", "b"], ""), "complete: no token");
        // Never longer than the longest page, then a token to go on.
        let (merged, token) = merge_pages(vec![page(&["a", "c"], None), page(&["b", "d"], None)], usize::MAX);
        assert_eq!((ids(&merged), token.as_str()), (vec!["a", "b"], "62"));
        // A driver that stopped early with nothing to list yet: go on after
        // where it stopped, not end the listing.
        let (merged, token) = merge_pages(vec![page(&[], Some("c")), page(&["d"], None)], usize::MAX);
        assert_eq!((ids(&merged), token.as_str()), (vec![], "63"));
    }
}
