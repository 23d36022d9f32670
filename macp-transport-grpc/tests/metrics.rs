//! The metrics endpoint: a scripted workload moves every counter and
//! histogram it touches by exactly the expected amount, and `/readyz` is
//! 503 while storage is recovered and 200 once the server serves.
//!
//! The scrapes are real HTTP/1.0 requests to the endpoint, parsed here with
//! a minimal reader of the Prometheus text format.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use common::*;
use macp_transport_grpc::config::Config;
use macp_wire::v1::{
    CancelSessionRequest, GetSessionRequest, SendRequest, SessionState, StreamSessionRequest, SuspendSessionRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;

/// A server with its metrics endpoint; dropping it stops both.
struct Running {
    grpc: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(args: &[&str]) -> Running {
        let cfg = Config::parse_from(args).resolve().expect("config");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc, metrics) = (listener.local_addr().unwrap(), metrics_listener.local_addr().unwrap());
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            macp_transport_grpc::server::serve_with(cfg, listener, Some(metrics_listener), async {
                let _ = rx.await;
            })
            .await
            .expect("server");
        });
        Running { grpc, metrics, stop: Some(stop), task }
    }

    async fn client(&self, who: &str) -> Client {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", self.grpc)).unwrap().connect().await.unwrap();
        macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient::with_interceptor(
            channel,
            Auth::Agent(who.to_string()),
        )
    }

    /// Polls `/readyz` until it answers 200; returns every status seen.
    async fn wait_ready(&self) -> Vec<u16> {
        let mut seen = Vec::new();
        loop {
            let (status, _) = get(self.metrics, "/readyz").await;
            seen.push(status);
            if status == 200 {
                return seen;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn scrape(&self) -> Scrape {
        let (status, body) = get(self.metrics, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        Scrape::parse(&body)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// One HTTP/1.0 GET: the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect to the metrics endpoint");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (status, body.to_string())
}

/// Samples of one scrape: `name{labels}` → value (labels as written).
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (key, value) = line.rsplit_once(' ').expect("name and value");
            samples.insert(key.to_string(), value.parse().expect("a number"));
        }
        Scrape(samples)
    }

    /// A sample's value; 0 when the series does not exist (yet).
    fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    /// How much `key` moved since `before`.
    fn delta(&self, before: &Scrape, key: &str) -> f64 {
        self.get(key) - before.get(key)
    }
}

fn envelopes(mode: &str, message_type: &str) -> String {
    format!("macp_envelopes_accepted_total{{mode=\"{mode}\",message_type=\"{message_type}\"}}")
}

fn requests(rpc: &str, code: &str) -> String {
    format!("macp_grpc_requests_total{{rpc=\"{rpc}\",code=\"{code}\"}}")
}

#[tokio::test]
async fn a_scripted_workload_moves_each_metric_by_the_expected_amount() {
    let srv =
        Running::start(&["macp-runtime", "--dev", "--memory-only", "--session-start-limit-per-minute", "3"]).await;
    let seen = srv.wait_ready().await;
    assert_eq!(seen.last(), Some(&200));
    let (health, _) = get(srv.metrics, "/healthz").await;
    assert_eq!(health, 200);
    assert_eq!(get(srv.metrics, "/nothing").await.0, 404);
    let before = srv.scrape().await;
    assert_eq!(before.get(&held("macp.mode.decision.v1", "open")), 0.0);

    let mut i = srv.client("I").await;
    let mut a = srv.client("A").await;
    let mut b = srv.client("B").await;
    let mut sends = 0.0;

    // Three sessions: the start budget of I.
    let s1 = start_session(&mut i).await;
    let s2 = start_session(&mut i).await;
    let s3 = start_session(&mut i).await;
    sends += 3.0;
    // A fourth start is refused by the rate limit.
    let refused = send(&mut i, start_env(&sid(), &["I", "A"])).await;
    assert_eq!(code(&refused), "RATE_LIMITED");
    sends += 1.0;

    // s1: proposal, two votes, commitment: resolved.
    for (mut c, e) in [
        (a.clone(), env(&s1, DECISION, "Proposal", proposal("p1"))),
        (a.clone(), env(&s1, DECISION, "Vote", vote("p1", "APPROVE"))),
        (b.clone(), env(&s1, DECISION, "Vote", vote("p1", "APPROVE"))),
        (i.clone(), env(&s1, DECISION, "Commitment", commitment())),
    ] {
        let ack = send(&mut c, e).await;
        assert!(ack.ok, "{:?}", ack.error);
        sends += 1.0;
    }

    // A passive subscriber on s2, present until s2 is cancelled.
    let req = StreamSessionRequest { subscribe_session_id: s2.clone(), ..Default::default() };
    let mut sub = b.stream_session(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    sub.next().await.expect("the SessionStart is replayed").expect("a frame");
    let subscribed = srv.scrape().await;
    assert_eq!(subscribed.delta(&before, "macp_stream_subscribers"), 1.0);

    // s2 cancelled: its subscriber's stream ends.
    let cancel = i.cancel_session(CancelSessionRequest { session_id: s2.clone(), reason: "test".into() }).await;
    assert!(cancel.unwrap().into_inner().ack.unwrap().ok);
    while let Some(Ok(_)) = sub.next().await {}

    // Refusals: an invalid envelope (an Ack), a Send without an envelope and
    // a GetSession of an unknown session (whole-RPC errors).
    let mut bad = env(&s3, DECISION, "Proposal", proposal("p1"));
    bad.message_id.clear();
    assert_eq!(code(&send(&mut a, bad).await), "INVALID_ENVELOPE");
    sends += 1.0;
    let e = a.send(SendRequest { envelope: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = a.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let md = a.get_session(GetSessionRequest { session_id: s3.clone() }).await.unwrap().into_inner();
    assert_eq!(md.metadata.unwrap().state, SessionState::Open as i32);

    let after = srv.scrape().await;
    let d = |key: &str| after.delta(&before, key);
    const DEC: &str = "macp.mode.decision.v1";
    // Requests by RPC and code.
    assert_eq!(d(&requests("Send", "OK")), sends);
    assert_eq!(d(&requests("Send", "INVALID_ARGUMENT")), 1.0);
    assert_eq!(d(&requests("GetSession", "NOT_FOUND")), 1.0);
    assert_eq!(d(&requests("GetSession", "OK")), 1.0);
    assert_eq!(d(&requests("CancelSession", "OK")), 1.0);
    assert_eq!(d(&requests("StreamSession", "OK")), 1.0);
    // Accepted envelopes by mode and message type (durable ones only).
    assert_eq!(d(&envelopes(DEC, "SessionStart")), 3.0);
    assert_eq!(d(&envelopes(DEC, "Proposal")), 1.0);
    assert_eq!(d(&envelopes(DEC, "Vote")), 2.0);
    assert_eq!(d(&envelopes(DEC, "Commitment")), 1.0);
    assert_eq!(d(&envelopes(DEC, "SessionCancel")), 1.0);
    // Session lifecycle.
    assert_eq!(d("macp_sessions_started_total"), 3.0);
    assert_eq!(d("macp_sessions_resolved_total"), 1.0);
    assert_eq!(d("macp_sessions_cancelled_total"), 1.0);
    assert_eq!(d("macp_sessions_expired_total"), 0.0);
    assert_eq!(after.get(&held(DEC, "open")), 1.0, "s3 is still open");
    assert_eq!(after.get(&held(DEC, "suspended")), 0.0);
    // Rate limits.
    assert_eq!(d("macp_rate_limited_total{budget=\"session_start\"}"), 1.0);
    assert_eq!(d("macp_rate_limited_total{budget=\"message\"}"), 0.0);
    // Group commits: 3 starts + 4 in s1 + the cancel = 8 records made
    // durable, one sync per commit, however they were batched.
    assert_eq!(d("macp_commit_batch_records_sum"), 8.0);
    let commits = d("macp_commit_batch_records_count");
    assert!((1.0..=8.0).contains(&commits), "{commits} commits");
    assert_eq!(d("macp_storage_sync_seconds_count"), commits);
    assert_eq!(d("macp_storage_sync_seconds_bucket{le=\"+Inf\"}"), commits);
    // Send latency: one observation per envelope Send (refusals included).
    assert_eq!(d("macp_send_duration_seconds_count"), sends);
    assert_eq!(d("macp_send_duration_seconds_bucket{le=\"+Inf\"}"), sends);
    assert!(d("macp_send_duration_seconds_sum") > 0.0);
    // The subscriber left with its session, neither lagged nor closed.
    assert_eq!(d("macp_stream_subscribers"), 0.0);
    assert_eq!(d("macp_stream_subscribers_dropped_total{reason=\"lagged\"}"), 0.0);
    assert_eq!(d("macp_stream_subscribers_dropped_total{reason=\"closed\"}"), 0.0);

    // s3 suspended: it moves from open to suspended; cancelled while
    // suspended, it leaves the suspended count.
    i.suspend_session(SuspendSessionRequest { session_id: s3.clone(), reason: "pause".into() }).await.unwrap();
    let suspended = srv.scrape().await;
    assert_eq!(suspended.get(&held(DEC, "open")), 0.0);
    assert_eq!(suspended.get(&held(DEC, "suspended")), 1.0);
    let cancel = i.cancel_session(CancelSessionRequest { session_id: s3.clone(), reason: "done".into() }).await;
    assert!(cancel.unwrap().into_inner().ack.unwrap().ok);
    let ended = srv.scrape().await;
    assert_eq!(ended.get(&held(DEC, "open")), 0.0);
    assert_eq!(ended.get(&held(DEC, "suspended")), 0.0);
    assert_eq!(ended.delta(&before, "macp_sessions_cancelled_total"), 2.0);
    srv.stop().await;
}

/// The `macp_sessions_open` series of one mode and state.
fn held(mode: &str, state: &str) -> String {
    format!("macp_sessions_open{{mode=\"{mode}\",state=\"{state}\"}}")
}

/// Scrapes until `key` reads `want` (a connection's end reaches the server
/// a moment after the client closes it); panics after 10 s.
async fn scrape_until(srv: &Running, key: &str, want: f64) -> Scrape {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let m = srv.scrape().await;
        if m.get(key) == want {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "{key} stayed at {} (want {want})", m.get(key));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn open_and_refused_connections_are_counted() {
    let srv = Running::start(&["macp-runtime", "--dev", "--memory-only", "--max-connections", "1"]).await;
    srv.wait_ready().await;
    // The scrapes go to the metrics port, which is not under the cap.
    scrape_until(&srv, "macp_connections_open", 0.0).await;
    let first = TcpStream::connect(srv.grpc).await.unwrap();
    scrape_until(&srv, "macp_connections_open", 1.0).await;
    // The cap is reached: a second connection is closed at once.
    let mut second = TcpStream::connect(srv.grpc).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), second.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the second connection is closed by the server: {read:?}");
    let m = srv.scrape().await;
    assert_eq!(m.get("macp_connections_refused_total"), 1.0);
    assert_eq!(m.get("macp_connections_open"), 1.0);
    // The first one closes: its slot is free and no longer counted.
    drop(first);
    scrape_until(&srv, "macp_connections_open", 0.0).await;
    assert_eq!(srv.scrape().await.get("macp_connections_refused_total"), 1.0);
    srv.stop().await;
}

/// Removes the data directory however the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Open sessions in the generated data directory, all replayed at start:
/// enough that recovery takes far longer than one request to `/readyz`.
const SESSIONS: usize = 40_000;

/// The id of generated session `n`.
fn session_id(n: usize) -> String {
    format!("3e7a1c50-0000-4000-8000-{n:012x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_during_recovery_and_200_once_serving() {
    let dir = TempDir(std::env::temp_dir().join(format!("macp-metrics-readyz-{}-{}", std::process::id(), sid())));
    write_open_sessions(&dir.0, SESSIONS, session_id);
    let data_dir = dir.0.to_str().unwrap().to_string();
    let srv = Running::start(&["macp-runtime", "--dev", "--data-dir", &data_dir]).await;
    // Liveness from the start; readiness only after recovery.
    assert_eq!(get(srv.metrics, "/healthz").await.0, 200);
    let seen = srv.wait_ready().await;
    assert_eq!(seen[0], 503, "the first /readyz comes during the recovery of {SESSIONS} sessions: {seen:?}");
    assert!(seen[..seen.len() - 1].iter().all(|s| *s == 503), "{seen:?}");
    // Ready means serving: a recovered session is there at once.
    let mut i = srv.client("I").await;
    let md = i
        .get_session(GetSessionRequest { session_id: session_id(0) })
        .await
        .expect("served after /readyz said 200")
        .into_inner();
    assert_eq!(md.metadata.unwrap().state, SessionState::Open as i32);
    let m = srv.scrape().await;
    eprintln!(
        "recovery of {SESSIONS} sessions took {} s; /readyz answered 503 {} time(s) first",
        m.get("macp_recovery_duration_seconds"),
        seen.len() - 1
    );
    assert_eq!(m.get(&held("macp.mode.decision.v1", "open")), SESSIONS as f64);
    assert!(m.get("macp_recovery_duration_seconds") > 0.0);
    srv.stop().await;
}
