//! Connection-level limits, so that neither many idle connections nor one
//! oversized call can hurt other clients.
//!
//! - **A cap on open connections** (`MACP_MAX_CONNECTIONS`, default
//!   10,000): each accepted TCP connection holds a semaphore permit until it
//!   closes; one accepted while none is free is closed at once (the client
//!   sees the connection end, instead of hanging in the listen backlog), and
//!   the refusals are logged at warn at most every few seconds.
//! - **A handshake deadline** (`MACP_HANDSHAKE_TIMEOUT_SECS`, default 10):
//!   a connection that has not started its first request by then — whether
//!   it stalls in TCP, TLS or the HTTP/2 preface — is closed. (tonic's own
//!   TLS handshake timeout is set to the same value.)
//! - **An idle timeout** (`MACP_IDLE_TIMEOUT_SECS`, default 300, 0 for
//!   none): a connection with no open request or stream for that long is
//!   closed; gRPC clients reconnect on their next call. Long-lived streams
//!   keep their connection open however quiet they are.
//! - **HTTP/2 keepalive** (set in [`crate::server`]): a PING every 30 s; a
//!   peer that does not answer within 20 s is disconnected.
//! - **A metadata limit per call** (`MACP_MAX_METADATA_BYTES`, default
//!   16 KiB, counted like HTTP/2's header list size: name + value + 32 per
//!   entry): a larger call alone is answered RESOURCE_EXHAUSTED.
//!
//! # Why the metadata limit is enforced here and not only by HTTP/2
//! HTTP/2 headers are compressed with HPACK, whose state is shared by the
//! whole connection, so the h2 crate must decode every header block in
//! full. When a block exceeds the advertised `SETTINGS_MAX_HEADER_LIST_SIZE`
//! it refuses just that stream if it can (431 and `REFUSED_STREAM`), but a
//! single header value larger than the limit, or a block over four times
//! it, makes it close the connection (GOAWAY `COMPRESSION_ERROR` or
//! `ENHANCE_YOUR_CALM`), failing every call multiplexed on it. So the
//! transport limit is set well above the per-call limit
//! ([`ConnectionLimits::transport_header_list_size`]: 4 × the per-call
//! limit, at least 256 KiB), h2 decodes such a call normally, and the layer
//! below refuses it as one gRPC call. Only metadata beyond the transport
//! limit still costs the connection, which is then the sender's own.
//!
//! # How the deadlines work
//! [`LimitedConn`] wraps the accepted TCP stream. A request-tracking layer
//! ([`ConnLayer`]) finds the connection's [`Activity`] through the connect
//! info tonic attaches to every request, and counts requests whose response
//! (body included) is still open. The wrapper's `poll_read`, which the
//! connection's task calls whenever it waits for the client, also polls a
//! timer; when it fires with no request open past a deadline, the read
//! fails and the connection is dropped. This is an abrupt close (no
//! GOAWAY), which is why it only ever happens to a connection with nothing
//! in flight.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::{debug, warn};

use crate::config::Config;
use crate::metrics::Metrics;

/// The limits of [`crate::connections`], from the configuration.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Most open connections.
    pub max_connections: usize,
    /// Time to the first request of a connection.
    pub handshake_timeout: Duration,
    /// Time without an open request before a connection is closed.
    pub idle_timeout: Option<Duration>,
    /// Largest metadata of one call.
    pub max_metadata_bytes: usize,
}

impl ConnectionLimits {
    /// The limits `cfg` asks for.
    pub fn from_config(cfg: &Config) -> Self {
        ConnectionLimits {
            max_connections: cfg.max_connections.max(1),
            handshake_timeout: Duration::from_secs(cfg.handshake_timeout_secs.max(1)),
            idle_timeout: (cfg.idle_timeout_secs > 0).then(|| Duration::from_secs(cfg.idle_timeout_secs)),
            max_metadata_bytes: cfg.max_metadata_bytes,
        }
    }

    /// The header list size HTTP/2 advertises and enforces: far enough above
    /// the per-call limit that calls between the two are refused one by one
    /// (see the module docs).
    pub fn transport_header_list_size(&self) -> u32 {
        let size = self.max_metadata_bytes.saturating_mul(4).max(256 * 1024);
        u32::try_from(size).unwrap_or(u32::MAX)
    }
}

/// Applies the connection cap to accepted TCP connections and wraps each
/// in a [`LimitedConn`]; accept errors pass through (tonic decides which
/// are fatal).
///
/// With `metrics`, open connections and refusals are counted
/// (`macp_connections_open`, `macp_connections_refused_total`).
pub fn limit_incoming<S>(
    incoming: S,
    limits: &ConnectionLimits,
    metrics: Option<Arc<Metrics>>,
) -> impl Stream<Item = io::Result<LimitedConn>>
where
    S: Stream<Item = io::Result<TcpStream>>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let refusals = RefusalLog::new(limits.max_connections);
    let limits = limits.clone();
    incoming.filter_map(move |accepted| match accepted {
        Err(e) => Some(Err(e)),
        Ok(tcp) => match permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Ok(LimitedConn::new(tcp, Slot::taken(permit, metrics.clone()), &limits))),
            Err(_) => {
                if let Some(m) = &metrics {
                    m.connection_refused();
                }
                refusals.note(tcp.peer_addr().ok());
                drop(tcp);
                None
            }
        },
    })
}

/// Logs refused connections at warn, at most once per interval, with a
/// count of the ones in between.
struct RefusalLog {
    cap: usize,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn new(cap: usize) -> Self {
        RefusalLog { cap, state: Mutex::new((None, 0)) }
    }

    fn note(&self, peer: Option<SocketAddr>) {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        st.1 += 1;
        if st.0.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            warn!(
                cap = self.cap,
                refused = st.1,
                last_peer = ?peer,
                "connection limit (MACP_MAX_CONNECTIONS) reached; closing new connections"
            );
            *st = (Some(Instant::now()), 0);
        } else {
            debug!(?peer, "connection refused: connection limit reached");
        }
    }
}

/// What the request layer tells the connection: requests open now, and
/// since when none has been.
#[derive(Debug)]
pub struct Activity {
    accepted: Instant,
    open: AtomicUsize,
    started: AtomicBool,
    /// Milliseconds after `accepted` when the last open request ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            accepted: Instant::now(),
            open: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// When the connection should be closed unless a request starts:
    /// `None` while requests are open (or forever idle-tolerant).
    fn deadline(&self, handshake: Duration, idle: Option<Duration>) -> Option<Instant> {
        if !self.started.load(Ordering::Acquire) {
            return Some(self.accepted + handshake);
        }
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        idle.map(|t| self.accepted + since + t)
    }
}

/// Marks one request open on its connection until dropped (with the
/// response body, or with the response future if that is abandoned).
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn open(activity: Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.started.store(true, Ordering::Release);
        RequestGuard(activity)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::Release);
        a.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's place under the cap: its semaphore permit, and its
/// count in `macp_connections_open` while it lives.
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Option<Arc<Metrics>>,
}

impl Slot {
    fn taken(permit: OwnedSemaphorePermit, metrics: Option<Arc<Metrics>>) -> Self {
        if let Some(m) = &metrics {
            m.connection_opened();
        }
        Slot { _permit: permit, metrics }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.connection_closed();
        }
    }
}

/// An accepted TCP connection under the limits: holds its slot of the
/// connection cap, and fails its reads once it passes a deadline with no
/// request open (see the module docs).
pub struct LimitedConn {
    tcp: TcpStream,
    _slot: Slot,
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
    handshake_timeout: Duration,
    idle_timeout: Option<Duration>,
}

impl LimitedConn {
    fn new(tcp: TcpStream, slot: Slot, limits: &ConnectionLimits) -> Self {
        let activity = Arc::new(Activity::new());
        let timer = Box::pin(tokio::time::sleep_until(activity.accepted + limits.handshake_timeout));
        LimitedConn {
            tcp,
            _slot: slot,
            activity,
            timer,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
        }
    }

    /// `Ready(error)` once past a deadline; otherwise re-arms the timer
    /// (registering the task's waker) and returns `Pending`.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            match self.activity.deadline(self.handshake_timeout, self.idle_timeout) {
                Some(at) if at <= now => {
                    let started = self.activity.started.load(Ordering::Acquire);
                    let why = if started { "idle timeout" } else { "handshake timeout: no request" };
                    debug!(peer = ?self.tcp.peer_addr().ok(), why, "closing connection");
                    return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                Some(at) => self.timer.as_mut().reset(at),
                // Requests are open: look again later.
                None => {
                    let again = self.idle_timeout.unwrap_or(Duration::from_secs(3600)).min(Duration::from_secs(3600));
                    self.timer.as_mut().reset(now + again)
                }
            }
        }
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Poll::Ready(r) = Pin::new(&mut this.tcp).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        this.poll_deadline(cx).map(Err)
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The connect info tonic attaches to each request of a [`LimitedConn`]
/// (inside a [`TlsConnectInfo`] with TLS). It replaces tonic's
/// `TcpConnectInfo`, so `tonic::Request::remote_addr` returns `None`: use
/// [`peer_addr`] instead.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The TCP addresses.
    pub tcp: TcpConnectInfo,
    activity: Arc<Activity>,
}

impl Connected for LimitedConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo { tcp: self.tcp.connect_info(), activity: self.activity.clone() }
    }
}

fn conn_info(ext: &http::Extensions) -> Option<&ConnInfo> {
    ext.get::<ConnInfo>().or_else(|| ext.get::<TlsConnectInfo<ConnInfo>>().map(|t| t.get_ref()))
}

/// The client's address of a request received through [`limit_incoming`].
pub fn peer_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    conn_info(req.extensions()).and_then(|c| c.tcp.remote_addr())
}

/// The size of a header list as HTTP/2 counts it (RFC 7541 §4.1).
fn header_list_size(headers: &http::HeaderMap) -> usize {
    headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum()
}

/// Tower layer: per-call metadata limit and request tracking for the idle
/// and handshake deadlines.
#[derive(Clone, Debug)]
pub struct ConnLayer {
    max_metadata_bytes: usize,
}

impl ConnLayer {
    /// The layer for `limits`.
    pub fn new(limits: &ConnectionLimits) -> Self {
        ConnLayer { max_metadata_bytes: limits.max_metadata_bytes }
    }
}

impl<S> tower_layer::Layer<S> for ConnLayer {
    type Service = ConnService<S>;

    fn layer(&self, inner: S) -> ConnService<S> {
        ConnService { inner, max_metadata_bytes: self.max_metadata_bytes }
    }
}

/// The service of [`ConnLayer`].
#[derive(Clone, Debug)]
pub struct ConnService<S> {
    inner: S,
    max_metadata_bytes: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for ConnService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = conn_info(req.extensions()).map(|c| RequestGuard::open(c.activity.clone()));
        let size = header_list_size(req.headers());
        if size > self.max_metadata_bytes {
            let peer = conn_info(req.extensions()).and_then(|c| c.tcp.remote_addr());
            warn!(
                ?peer,
                path = req.uri().path(),
                size,
                limit = self.max_metadata_bytes,
                "call refused: metadata too large"
            );
            let status = tonic::Status::resource_exhausted(format!(
                "request metadata is {size} bytes; the limit is {} (MACP_MAX_METADATA_BYTES)",
                self.max_metadata_bytes
            ));
            let response = status.into_http::<ResBody>().map(|b| TrackedBody { inner: b, _guard: guard });
            return Box::pin(std::future::ready(Ok(response)));
        }
        let span = crate::trace_context::request_span(req.headers(), req.uri().path());
        let call = self.inner.call(req);
        let respond = async move {
            let response = call.await?;
            Ok(response.map(|b| TrackedBody { inner: b, _guard: guard }))
        };
        match span {
            Some(span) => Box::pin(tracing::Instrument::instrument(respond, span)),
            None => Box::pin(respond),
        }
    }
}

/// A response body that keeps its request counted as open until the body
/// is finished or dropped.
pub struct TrackedBody<B> {
    inner: B,
    _guard: Option<RequestGuard>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_limit_is_well_above_the_call_limit() {
        let mut l = ConnectionLimits {
            max_connections: 1,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: None,
            max_metadata_bytes: 16 * 1024,
        };
        assert_eq!(l.transport_header_list_size(), 256 * 1024);
        l.max_metadata_bytes = 1 << 20;
        assert_eq!(l.transport_header_list_size(), 4 << 20);
        l.max_metadata_bytes = usize::MAX;
        assert_eq!(l.transport_header_list_size(), u32::MAX);
    }

    #[test]
    fn deadlines_follow_requests() {
        let (h, i) = (Duration::from_secs(10), Some(Duration::from_secs(60)));
        let a = Arc::new(Activity::new());
        assert_eq!(a.deadline(h, i), Some(a.accepted + h), "no request yet: the handshake deadline");
        let g = RequestGuard::open(a.clone());
        assert_eq!(a.deadline(h, i), None, "a request is open");
        std::thread::sleep(Duration::from_millis(20));
        let before = Instant::now();
        drop(g);
        let idle = a.deadline(h, i).expect("idle deadline");
        assert!(
            idle > before + Duration::from_secs(59) && idle <= Instant::now() + Duration::from_secs(60),
            "idle since the request ended"
        );
        assert_eq!(a.deadline(h, None), None, "no idle timeout");
    }
}
