//! Streaming RPCs: StreamSession (envelope frames and passive subscribe)
//! and WatchSignals.

use std::sync::Arc;

use macp_kernel::{ErrorCode, KernelError};
use macp_wire::v1::*;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::history::read_records;
use super::sessions::send_envelope;
use super::{RpcStream, Runtime};
use crate::driver::{Command, Subscription};
use crate::hub::{Sequenced, SessionFeed};
use crate::status::{lagged, status};

fn error_frame(e: MacpError) -> StreamSessionResponse {
    StreamSessionResponse { response: Some(stream_session_response::Response::Error(e)) }
}

fn envelope_frame(env: &Envelope) -> StreamSessionResponse {
    StreamSessionResponse { response: Some(stream_session_response::Response::Envelope(env.clone())) }
}

fn inline(code: ErrorCode, msg: impl Into<String>, env: Option<&Envelope>) -> StreamSessionResponse {
    error_frame(MacpError {
        code: code.as_str().to_string(),
        message: msg.into(),
        session_id: env.map(|e| e.session_id.clone()).unwrap_or_default(),
        message_id: env.map(|e| e.message_id.clone()).unwrap_or_default(),
        details: Vec::new(),
    })
}

/// Frames of a StreamSession response; `None` ends the response stream even
/// while the request side is still open (the session reached a terminal
/// state, so nothing more will ever be streamed).
type Frame = Option<Result<StreamSessionResponse, Status>>;

/// Forwards a session feed to a stream: replayed history first (if any),
/// then live items newer than `skip_upto`. When the feed ends because the
/// session is terminal, the stream ends; when the hub dropped the feed for
/// falling behind, the stream ends with RESOURCE_EXHAUSTED.
async fn forward(out: mpsc::Sender<Frame>, mut feed: SessionFeed, replay: Vec<Sequenced>, skip_upto: u64) {
    let mut last = skip_upto;
    for item in replay {
        last = item.seq;
        if out.send(Some(Ok(envelope_frame(&item.envelope)))).await.is_err() {
            return;
        }
    }
    loop {
        // Leave as soon as the client goes away, not at the next broadcast:
        // an idle session would otherwise keep this task and its hub slot.
        let item = tokio::select! {
            item = feed.rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
            _ = out.closed() => return,
        };
        if item.seq <= last {
            continue;
        }
        last = item.seq;
        if out.send(Some(Ok(envelope_frame(&item.envelope)))).await.is_err() {
            return;
        }
    }
    if feed.overflowed.load(std::sync::atomic::Ordering::Acquire) {
        let _ = out
            .send(Some(Err(lagged(format!(
                "subscriber fell behind the live stream; resubscribe with after_sequence={last}"
            )))))
            .await;
    }
    let _ = out.send(None).await;
}

/// A session's accepted history `(after, upto]` as the envelopes a passive
/// subscriber replays (see [`read_records`] for completeness).
async fn read_history(
    reader: std::sync::Arc<dyn macp_storage::StorageRead>,
    session_id: String,
    after: u64,
    upto: u64,
) -> Result<Vec<Sequenced>, KernelError> {
    let records = read_records(reader, session_id, after, upto).await.map_err(|mut e| {
        if e.code == ErrorCode::HistoryUnavailable {
            e.message.push_str("; subscribe without history or from a later after_sequence");
        }
        e
    })?;
    Ok(records
        .into_iter()
        .filter_map(|r| {
            let seq = r.seq;
            macp_kernel::record::into_history_envelope(r).map(|e| Sequenced { seq, envelope: std::sync::Arc::new(e) })
        })
        .collect())
}

pub(super) async fn stream_session(
    rt: &Runtime,
    req: Request<Streaming<StreamSessionRequest>>,
) -> Result<Response<RpcStream<StreamSessionResponse>>, Status> {
    let identity = rt.identity(&req).await?;
    let forwarded = Runtime::forwarded(&req);
    let mut inbound = req.into_inner();
    let (out, rx) = mpsc::channel::<Frame>(64);
    let rt = rt.clone();
    tokio::spawn(async move {
        let mut bound: Option<String> = None;
        let mut first = true;
        while let Ok(Some(frame)) = inbound.message().await {
            // A stream about another node's session (its first frame says
            // which) is proxied to that node whole: its live feed is there.
            if std::mem::take(&mut first) {
                let sid = match &frame.envelope {
                    Some(e) if !macp_kernel::is_ambient(&e.message_type) => e.session_id.as_str(),
                    Some(_) => "",
                    None => frame.subscribe_session_id.as_str(),
                };
                if let Some(peer) = (!sid.is_empty()).then(|| rt.router.peer(sid, forwarded)).flatten() {
                    proxy(peer, identity, frame, inbound, out).await;
                    return;
                }
            }
            let has_sub = !frame.subscribe_session_id.is_empty();
            match (frame.envelope, has_sub) {
                (Some(_), true) => {
                    let _ = out
                        .send(Some(Err(Status::invalid_argument(
                            "a StreamSessionRequest sets either envelope or subscribe_session_id, not both",
                        ))))
                        .await;
                    return;
                }
                (None, false) => {
                    let _ = out
                        .send(Some(Ok(inline(
                            ErrorCode::InvalidEnvelope,
                            "empty StreamSessionRequest: set envelope or subscribe_session_id",
                            None,
                        ))))
                        .await;
                }
                (None, true) => {
                    let sid = frame.subscribe_session_id;
                    if bound.as_ref().is_some_and(|b| *b != sid) {
                        let _ = out
                            .send(Some(Err(Status::invalid_argument("this stream is bound to another session"))))
                            .await;
                        return;
                    }
                    let (tx, rx) = oneshot::channel();
                    let cmd = Command::Subscribe { identity: identity.clone(), session_id: sid.clone(), reply: tx };
                    let driver = match rt.router.session(&sid) {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = out.send(Some(Err(e))).await;
                            return;
                        }
                    };
                    if driver.send(cmd).await.is_err() {
                        let _ = out.send(Some(Err(rt.gone()))).await;
                        return;
                    }
                    let sub: Subscription = match rx.await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            let _ = out.send(Some(Err(status(e)))).await;
                            return;
                        }
                        Err(_) => return,
                    };
                    let after = frame.after_sequence;
                    let history = match read_history(sub.history.clone(), sid.clone(), after, sub.upto).await {
                        Ok(h) => h,
                        Err(e) => {
                            let _ = out.send(Some(Err(status(e)))).await;
                            return;
                        }
                    };
                    bound = Some(sid);
                    tokio::spawn(forward(out.clone(), sub.feed, history, sub.upto.max(after)));
                }
                (Some(env), false) => {
                    if env.session_id.is_empty() || env.mode.is_empty() {
                        let _ = out
                            .send(Some(Ok(inline(
                                ErrorCode::InvalidEnvelope,
                                "stream envelopes are session-scoped: session_id and mode are required (send Signals with Send)",
                                Some(&env),
                            ))))
                            .await;
                        continue;
                    }
                    if let Some(b) = &bound {
                        if *b != env.session_id {
                            let _ = out
                                .send(Some(Ok(inline(
                                    ErrorCode::InvalidEnvelope,
                                    format!(
                                        "this stream is bound to session {b}; open another stream for {}",
                                        env.session_id
                                    ),
                                    Some(&env),
                                ))))
                                .await;
                            continue;
                        }
                    }
                    let (btx, brx) = oneshot::channel();
                    let want_bind = bound.is_none();
                    let ack = match send_envelope(
                        &rt,
                        Ok(identity.clone()),
                        env.clone(),
                        want_bind.then_some(btx),
                        forwarded,
                    )
                    .await
                    {
                        Ok(ack) => ack,
                        Err(e) => {
                            let _ = out.send(Some(Err(e))).await;
                            return;
                        }
                    };
                    if want_bind {
                        if let Ok(Some(b)) = brx.await {
                            bound = Some(env.session_id.clone());
                            tokio::spawn(forward(out.clone(), b.feed, Vec::new(), b.from));
                        }
                    }
                    if !ack.ok {
                        if let Some(e) = ack.error {
                            if out.send(Some(Ok(error_frame(e)))).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    });
    let frames = ReceiverStream::new(rx).take_while(|f| f.is_some()).filter_map(|f| f);
    Ok(Response::new(Box::pin(frames)))
}

/// WatchSignals: the Signals and progress sent to this node (ambient
/// envelopes are broadcast where they arrive), and on a cluster node that
/// forwards, those sent to every other live node (see
/// [`super::fan::watch`]). Signals have no backlog: a subscriber sees those
/// sent while it (and, for another node's, its stream to that node) is
/// subscribed.
pub(super) async fn watch_signals(
    rt: &Runtime,
    req: Request<WatchSignalsRequest>,
) -> Result<Response<RpcStream<WatchSignalsResponse>>, Status> {
    let identity = rt.identity(&req).await?;
    let fan = rt.router.fan(Runtime::forwarded(&req));
    let rx = rt.watch.signals.subscribe();
    // tonic ends the stream after yielding an error status.
    let local: RpcStream<WatchSignalsResponse> = Box::pin(tokio_stream::wrappers::BroadcastStream::new(rx).map(|e| {
        e.map(Arc::unwrap_or_clone)
            .map_err(|_| lagged("signal watcher fell behind; signals have no backlog, reconnect"))
    }));
    let call = |mut c: crate::cluster::forward::PeerClient, req| async move { c.watch_signals(req).await };
    Ok(Response::new(super::fan::watch(fan, local, identity, WatchSignalsRequest {}, call, |_| true)))
}

/// Proxies a whole StreamSession to the node serving its session: `first`
/// and every later frame go there, every answer comes back, and either
/// side ending ends the other.
async fn proxy(
    peer: crate::cluster::Peer,
    identity: macp_kernel::Identity,
    first: StreamSessionRequest,
    mut inbound: Streaming<StreamSessionRequest>,
    out: mpsc::Sender<Frame>,
) {
    let (up, up_rx) = mpsc::channel::<StreamSessionRequest>(64);
    if up.send(first).await.is_err() {
        return;
    }
    let pump = tokio::spawn(async move {
        while let Ok(Some(frame)) = inbound.message().await {
            if up.send(frame).await.is_err() {
                return;
            }
        }
    });
    let req = peer.request(tokio_stream::wrappers::ReceiverStream::new(up_rx), &identity);
    match peer.client.clone().stream_session(req).await {
        Ok(resp) => {
            let mut answers = resp.into_inner();
            loop {
                tokio::select! {
                    item = answers.message() => match item {
                        Ok(Some(frame)) => {
                            if out.send(Some(Ok(frame))).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => {
                            let _ = out.send(None).await;
                            break;
                        }
                        Err(e) => {
                            let _ = out.send(Some(Err(e))).await;
                            break;
                        }
                    },
                    _ = out.closed() => break,
                }
            }
        }
        Err(e) => {
            let _ = out.send(Some(Err(e))).await;
        }
    }
    pump.abort();
}
