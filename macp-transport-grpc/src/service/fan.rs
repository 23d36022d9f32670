//! Cluster-wide reads: a node a client asks for ListSessions,
//! WatchSessions or WatchSignals asks every other live node too, as a
//! forwarded request (answered from that node's shards only), and merges
//! the answers with its own.
//!
//! ```text
//!  client ─► n1: own shards' answer ─┐
//!            ├─ forwarded ─► n2 ─────┼─► merged (ListSessions: pages merged in id order;
//!            └─ forwarded ─► n3 ─────┘            watches: one stream, a task pumping each)
//! ```
//!
//! A listing needs every node's part: a node that does not answer fails
//! the call (UNAVAILABLE naming it), as a partial list would look whole.
//! A watch cannot wait for every node: it starts with the nodes live now,
//! opens a stream to each node that joins (looked for at every membership
//! round), and reopens a peer's stream that ended or failed while the peer
//! is still a member, at the next round.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use macp_kernel::{ErrorCode, Identity, SessionPage};
use macp_wire::v1::*;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};
use tracing::{debug, warn};

use super::RpcStream;
use crate::cluster::forward::PeerClient;
use crate::cluster::{Fan, Peer};
use crate::status::ERROR_CODE_KEY;

/// How long another node gets to answer its part of a listing (a node
/// that is paused, not dead, still accepts connections: it would hold the
/// call until its lease is taken over), or to open a watch's stream before
/// the wait is logged.
const PEER_ANSWERS_WITHIN: Duration = Duration::from_secs(10);

/// Items of a merged watch in flight to the client; beyond them the merge
/// waits, the sources' own buffers fill, and whichever falls behind first
/// ends the watch with STREAM_LAGGED, as a single node's watch does.
const MERGED_BUFFER: usize = 64;

/// The ListSessions pages of every other live node for `req`, asked
/// concurrently. Any node failing fails the whole: UNAVAILABLE, naming it.
pub(super) async fn peer_pages(
    fan: &Fan,
    identity: &Identity,
    req: &ListSessionsRequest,
) -> Result<Vec<SessionPage>, Status> {
    let calls: Vec<(String, JoinHandle<Result<ListSessionsResponse, Status>>)> = fan
        .peers()
        .into_iter()
        .map(|(node, peer)| {
            let (identity, req) = (identity.clone(), req.clone());
            let call = tokio::spawn(async move {
                let peer = peer?;
                let mut client = peer.client.clone();
                let call = client.list_sessions(peer.request(req, &identity));
                match tokio::time::timeout(PEER_ANSWERS_WITHIN, call).await {
                    Ok(r) => r.map(tonic::Response::into_inner),
                    Err(_) => Err(Status::deadline_exceeded(format!("no answer within {PEER_ANSWERS_WITHIN:?}"))),
                }
            });
            (node, call)
        })
        .collect();
    let mut pages = Vec::with_capacity(calls.len());
    for (node, call) in calls {
        let failed = |why: String| {
            Status::unavailable(format!(
                "cluster node {node} did not give its part of the session list ({why}); \
                 a list without it would look complete, so none is returned: retry"
            ))
        };
        match call.await {
            Ok(Ok(r)) => pages.push(SessionPage { sessions: r.sessions, next_page_token: r.next_page_token }),
            Ok(Err(e)) => return Err(failed(format!("{:?}: {}", e.code(), e.message()))),
            Err(e) => return Err(failed(format!("the call's task failed: {e}"))),
        }
    }
    Ok(pages)
}

/// Opens a forwarded watch on another node.
type Open<T> = Box<dyn Fn(Peer) -> Pin<Box<dyn Future<Output = Result<Streaming<T>, Status>> + Send>> + Send + Sync>;

/// A watch RPC of `identity`: `local` alone without a `fan`; with one,
/// merged (see [`merge`]) with `call` of `message` on every other live
/// node, forwarded on `identity`'s behalf.
pub(super) fn watch<M, T, C, F, K>(
    fan: Option<Fan>,
    local: RpcStream<T>,
    identity: Identity,
    message: M,
    call: C,
    keep: K,
) -> RpcStream<T>
where
    M: Clone + Send + Sync + 'static,
    T: Send + 'static,
    C: Fn(PeerClient, tonic::Request<M>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<tonic::Response<Streaming<T>>, Status>> + Send + 'static,
    K: FnMut(&T) -> bool + Send + 'static,
{
    let Some(fan) = fan else { return local };
    let open: Open<T> = Box::new(move |peer| {
        let call = call(peer.client.clone(), peer.request(message.clone(), &identity));
        Box::pin(async move { call.await.map(tonic::Response::into_inner) })
    });
    merge(fan, local, open, keep)
}

/// `local` (this node's watch) merged with the same watch, forwarded, on
/// every other live node, each item passing `keep` first. The merged
/// stream ends when `local` does or fails (its STREAM_LAGGED included),
/// or a peer's stream reports it fell behind (STREAM_LAGGED, passed on: the
/// client missed items and resubscribes); a peer's stream that ends or
/// fails otherwise is reopened at the next membership round while the
/// peer is a member (what it would have sent meanwhile is not recovered).
fn merge<T, K>(fan: Fan, local: RpcStream<T>, open: Open<T>, keep: K) -> RpcStream<T>
where
    T: Send + 'static,
    K: FnMut(&T) -> bool + Send + 'static,
{
    let (out, rx) = mpsc::channel(MERGED_BUFFER);
    tokio::spawn(Merge { fan, open, streams: HashMap::new(), opened: 0 }.run(local, keep, out));
    Box::pin(ReceiverStream::new(rx))
}

/// What a peer's pump reports: its node, which of that node's streams,
/// and an item (`None`: the stream ended).
type FromPeer<T> = (String, u64, Option<Result<T, Status>>);

/// A merged watch at work.
struct Merge<T> {
    fan: Fan,
    open: Open<T>,
    /// The pump of each node a stream is open to (or being opened), and
    /// which of its streams that is.
    streams: HashMap<String, (u64, JoinHandle<()>)>,
    opened: u64,
}

impl<T: Send + 'static> Merge<T> {
    async fn run(
        mut self,
        mut local: RpcStream<T>,
        mut keep: impl FnMut(&T) -> bool,
        out: mpsc::Sender<Result<T, Status>>,
    ) {
        let mut rounds = self.fan.rounds();
        let (peer_tx, mut peer_rx) = mpsc::channel::<FromPeer<T>>(MERGED_BUFFER);
        self.reconcile(&peer_tx);
        loop {
            let (item, last) = tokio::select! {
                item = local.next() => match item {
                    Some(Ok(x)) => (Ok(x), false),
                    Some(Err(e)) => (Err(e), true),
                    None => break,
                },
                Some((node, n, item)) = peer_rx.recv() => match item {
                    Some(Ok(x)) => (Ok(x), false),
                    Some(Err(e)) if is_lagged(&e) => (Err(e), true),
                    Some(Err(e)) => {
                        let why = format!("the stream from cluster node {node} failed ({e}); reopened at the next round");
                        // A refused identity is a misconfiguration (secrets or
                        // clocks differ), not a node restarting: say so loudly.
                        if e.code() == tonic::Code::Unauthenticated {
                            warn!("watch: {why}");
                        } else {
                            debug!("watch: {why}");
                        }
                        self.ended(&node, n);
                        continue;
                    }
                    None => {
                        self.ended(&node, n);
                        continue;
                    }
                },
                changed = rounds.changed() => {
                    if changed.is_ok() {
                        self.reconcile(&peer_tx);
                    }
                    continue;
                }
                _ = out.closed() => break,
            };
            if item.as_ref().is_ok_and(|x| !keep(x)) {
                continue;
            }
            if out.send(item).await.is_err() || last {
                break;
            }
        }
        for (_, (_, pump)) in self.streams.drain() {
            pump.abort();
        }
    }

    /// Opens a stream to every live peer without one, and stops the
    /// streams of nodes no longer members.
    fn reconcile(&mut self, peer_tx: &mpsc::Sender<FromPeer<T>>) {
        let peers = self.fan.watch_peers();
        let live: HashSet<&str> = peers.iter().map(|(node, _)| node.as_str()).collect();
        self.streams.retain(|node, (_, pump)| {
            let keep = live.contains(node.as_str());
            if !keep {
                pump.abort();
            }
            keep
        });
        for (node, peer) in peers {
            if self.streams.contains_key(&node) {
                continue;
            }
            let peer = match peer {
                Ok(p) => p,
                Err(e) => {
                    warn!("watch: cannot reach cluster node {node}: {}", e.message());
                    continue;
                }
            };
            self.opened += 1;
            let n = self.opened;
            let pump = tokio::spawn(pump(node.clone(), n, (self.open)(peer), peer_tx.clone()));
            self.streams.insert(node, (n, pump));
        }
    }

    /// Stream `n` of `node` ended: the next round opens another.
    fn ended(&mut self, node: &str, n: u64) {
        if self.streams.get(node).is_some_and(|(current, _)| *current == n) {
            self.streams.remove(node);
        }
    }
}

/// Moves one peer stream's items to the merge, then says it ended.
async fn pump<T>(
    node: String,
    n: u64,
    opening: impl Future<Output = Result<Streaming<T>, Status>>,
    to: mpsc::Sender<FromPeer<T>>,
) {
    let mut opening = std::pin::pin!(opening);
    let opened = match tokio::time::timeout(PEER_ANSWERS_WITHIN, &mut opening).await {
        Ok(r) => r,
        Err(_) => {
            warn!(
                "watch: the stream to cluster node {node} has not opened in {PEER_ANSWERS_WITHIN:?} (the node is \
                 paused, or watches hold all the streams it allows a connection: MACP_MAX_CONCURRENT_STREAMS); \
                 the watch misses that node's events until it opens"
            );
            opening.await
        }
    };
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = to.send((node, n, Some(Err(e)))).await;
            return;
        }
    };
    loop {
        let item = match stream.message().await {
            Ok(Some(x)) => Some(Ok(x)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        };
        let last = !matches!(item, Some(Ok(_)));
        if to.send((node.clone(), n, item)).await.is_err() || last {
            return;
        }
    }
}

/// Whether a peer's stream ended because its watcher fell behind.
fn is_lagged(e: &Status) -> bool {
    e.metadata().get(ERROR_CODE_KEY).is_some_and(|c| c.as_bytes() == ErrorCode::StreamLagged.as_str().as_bytes())
}

/// WatchSessions' `keep` for a merged watch: each session's CREATED
/// passes once, whichever node's snapshot or live feed brings it (a
/// session whose shard moved between nodes, or a peer's stream reopened
/// with a fresh snapshot, would bring it again). A session is forgotten
/// when it ends, so the set holds the sessions open now.
pub(super) fn created_once() -> impl FnMut(&WatchSessionsResponse) -> bool + Send + 'static {
    use session_lifecycle_event::EventType;
    let mut announced: HashSet<String> = HashSet::new();
    move |r| {
        let Some((ev, m)) = r.event.as_ref().and_then(|ev| Some((ev, ev.session.as_ref()?))) else { return true };
        match EventType::try_from(ev.event_type) {
            Ok(EventType::Created) => announced.insert(m.session_id.clone()),
            Ok(EventType::Resolved | EventType::Expired | EventType::Cancelled) => {
                announced.remove(&m.session_id);
                true
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, t: session_lifecycle_event::EventType) -> WatchSessionsResponse {
        WatchSessionsResponse {
            event: Some(SessionLifecycleEvent {
                event_type: t as i32,
                session: Some(SessionMetadata { session_id: id.into(), ..Default::default() }),
                observed_at_unix_ms: 0,
            }),
        }
    }

    /// A peer's STREAM_LAGGED ends the merged watch (the client missed
    /// items); its other failures are retried.
    #[test]
    fn only_a_lagged_peer_ends_the_watch() {
        assert!(is_lagged(&crate::status::lagged("fell behind")));
        assert!(!is_lagged(&Status::resource_exhausted("another limit")));
        assert!(!is_lagged(&Status::unavailable("gone")));
    }

    #[test]
    fn a_session_is_created_once_until_it_ends() {
        use session_lifecycle_event::EventType::*;
        let mut keep = created_once();
        assert!(keep(&event("a", Created)));
        assert!(!keep(&event("a", Created)), "a second node's snapshot of a");
        assert!(keep(&event("a", Suspended)));
        assert!(keep(&event("b", Created)));
        assert!(keep(&event("a", Cancelled)));
        assert!(keep(&event("a", Created)), "forgotten once ended");
        assert!(keep(&WatchSessionsResponse { event: None }));
    }
}
