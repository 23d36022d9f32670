//! Connection-level hardening, through the real server: the metadata limit
//! refuses one call without hurting the others on its connection, the
//! connection cap closes connections beyond it at once, and silent or idle
//! connections are closed while streaming ones stay.

mod common;

use std::time::{Duration, Instant};

use common::*;
use macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient;
use macp_wire::v1::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::Code;

/// Hostile-client finding (main 724c279): 64 KB of request metadata made
/// h2 close the whole connection (GOAWAY, COMPRESSION_ERROR), failing every
/// other call multiplexed on it. Now that call alone is refused
/// (RESOURCE_EXHAUSTED) and a stream opened before it on the same channel
/// keeps working, as do later calls.
#[tokio::test]
async fn oversized_metadata_fails_only_its_own_call() {
    let srv = Server::start(&[]).await;
    let channel = srv.channel().await;
    let client = |headers: Vec<(&'static str, String)>| {
        MacpRuntimeServiceClient::with_interceptor(channel.clone(), Auth::Headers(headers))
    };
    let mut i = client(vec![("x-macp-agent-id", "I".into())]);
    let mut watch = i.watch_sessions(WatchSessionsRequest {}).await.unwrap().into_inner();

    for big in [vec![("x-padding", "x".repeat(64 * 1024))], (0..64).map(|_| ("x-padding", "y".repeat(1024))).collect()]
    {
        let mut headers = vec![("x-macp-agent-id", "I".to_string())];
        headers.extend(big);
        let mut fat = client(headers);
        let err = fat.list_modes(ListModesRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    }

    // The stream opened before is alive: it sees a session started after.
    let s = start_session(&mut i).await;
    let ev = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch stream stalled")
        .expect("the watch stream failed: the connection was torn down")
        .expect("the watch stream ended");
    assert_eq!(ev.event.unwrap().session.unwrap().session_id, s);
    assert!(i.list_modes(ListModesRequest {}).await.is_ok());
}

/// Whether a new connection can complete a call within a second.
async fn can_call(srv: &Server) -> bool {
    let attempt = async {
        let ch = Channel::from_shared(format!("http://{}", srv.addr)).unwrap().connect().await.ok()?;
        MacpRuntimeServiceClient::new(ch).list_modes(ListModesRequest {}).await.ok()
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), attempt).await, Ok(Some(_)))
}

/// Reads until the server closes the connection; how long that took.
async fn closed_within(mut s: TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    r.ok().map(|()| t.elapsed())
}

/// Hostile-client finding (main 724c279): 2,000 idle connections were all
/// accepted and kept. With `--max-connections 3`, a fourth is closed at
/// once, and a slot freed by a closing client is usable again.
#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let srv = Server::start(&["--max-connections", "3"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let extra = TcpStream::connect(srv.addr).await.unwrap();
    let t = closed_within(extra, Duration::from_secs(2)).await.expect("the connection over the cap stayed open");
    assert!(t < Duration::from_secs(1), "closed only after {t:?}");
    assert!(!can_call(&srv).await, "a call got through over the cap");
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(can_call(&srv).await, "the freed slot is not reusable");
}

/// A connection that never starts a request is closed after the handshake
/// timeout; one whose requests are done is closed after the idle timeout
/// (freeing its slot); one with an open stream stays however quiet it is.
#[tokio::test]
async fn silent_and_idle_connections_are_closed_streaming_ones_stay() {
    let srv =
        Server::start(&["--max-connections", "1", "--handshake-timeout-secs", "1", "--idle-timeout-secs", "1"]).await;
    // Silent: no TLS/HTTP2 preface, no request.
    let silent = TcpStream::connect(srv.addr).await.unwrap();
    let t = closed_within(silent, Duration::from_secs(4)).await.expect("a silent connection was kept");
    assert!(t >= Duration::from_millis(900), "closed before the handshake timeout: {t:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Idle after a call: holds the only slot until the idle timeout.
    let mut a = srv.client("A").await;
    a.list_modes(ListModesRequest {}).await.unwrap();
    assert!(!can_call(&srv).await, "the cap of one let a second connection in");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(can_call(&srv).await, "the idle connection was not closed");

    // Streaming: a quiet stream keeps its connection past the idle timeout.
    let mut i = srv.client("I").await;
    let mut watch = i.watch_sessions(WatchSessionsRequest {}).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!can_call(&srv).await, "the streaming connection was closed (its slot is free)");
    let s = start_session(&mut i).await;
    let ev = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(ev.event.unwrap().session.unwrap().session_id, s);
}
