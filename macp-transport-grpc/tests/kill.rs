//! Crash safety end to end: the real binary on a file data directory takes
//! concurrent sessions, is SIGKILLed mid-load, and restarts. Everything
//! acknowledged before the kill must be there afterwards — in GetSession, in
//! stream replay — and re-sending an acknowledged message id must be a
//! duplicate.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use macp_wire::v1::*;
use tokio_stream::StreamExt;

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(dir: &std::path::Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_macp-runtime"))
        .args(["--dev", "--bind-addr", &format!("127.0.0.1:{port}"), "--data-dir", dir.to_str().unwrap()])
        .env("MACP_SESSION_START_LIMIT_PER_MINUTE", "0")
        .env("MACP_MESSAGE_LIMIT_PER_MINUTE", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start macp-runtime")
}

/// What a worker saw acknowledged: session → message ids in ack order
/// (SessionStart first).
type Acked = Arc<Mutex<BTreeMap<String, Vec<Envelope>>>>;

async fn worker(port: u16, w: usize, acked: Acked) {
    let initiator = format!("w{w}");
    let mut i = connect_port(port, &initiator).await;
    let mut a = connect_port(port, "A").await;
    loop {
        let s = sid();
        let mut start = start_env(&s, &[&initiator, "A", "B"]);
        start.sender = initiator.clone();
        let Ok(r) = i.send(SendRequest { envelope: Some(start.clone()) }).await else { return };
        if !r.into_inner().ack.is_some_and(|a| a.ok) {
            return;
        }
        acked.lock().unwrap().entry(s.clone()).or_default().push(start);
        for n in 0..3 {
            let mut p = env(&s, DECISION, "Proposal", proposal(&format!("p{n}")));
            p.sender = "A".into();
            let Ok(r) = a.send(SendRequest { envelope: Some(p.clone()) }).await else { return };
            if r.into_inner().ack.is_some_and(|a| a.ok) {
                acked.lock().unwrap().entry(s.clone()).or_default().push(p);
            } else {
                return;
            }
        }
    }
}

#[test]
fn sigkill_mid_load_loses_nothing_acknowledged() {
    let dir = std::env::temp_dir().join(format!("macp-kill-{}-{}", std::process::id(), sid()));
    let port = free_port();
    let mut child = spawn(&dir, port);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let acked: Acked = Arc::default();
    rt.block_on(async {
        connect_port(port, "probe").await;
        eprintln!("server up; starting load");
        let workers: Vec<_> = (0..8).map(|w| tokio::spawn(worker(port, w, acked.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        eprintln!("killing the server");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        for w in workers {
            let _ = w.await;
        }
    });
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total > 50, "the load should have acknowledged plenty before the kill (got {total})");

    eprintln!("{} sessions, {total} acknowledged envelopes; restarting", acked.len());
    let port2 = free_port();
    let mut child = spawn(&dir, port2);
    rt.block_on(async {
        let mut a = connect_port(port2, "A").await;
        let mut clients: BTreeMap<String, Client> = BTreeMap::new();
        for (n, (s, envs)) in acked.iter().enumerate() {
            if n % 200 == 0 {
                eprintln!("verified {n} sessions");
            }
            // GetSession: the session exists, A's activity counts every acked proposal.
            let md = tokio::time::timeout(
                Duration::from_secs(5),
                a.get_session(GetSessionRequest { session_id: s.clone() }),
            )
            .await
            .expect("GetSession answered")
            .expect("session survives")
            .into_inner()
            .metadata
            .unwrap();
            let proposals = envs.len() as u32 - 1;
            let count =
                md.participant_activity.iter().find(|p| p.participant_id == "A").map(|p| p.message_count).unwrap_or(0);
            assert!(
                count >= proposals,
                "session {s}: {count} of A's messages recovered, {proposals} were acknowledged"
            );
            // Stream replay has every acknowledged envelope, in order.
            let req = StreamSessionRequest { subscribe_session_id: s.clone(), after_sequence: 0, envelope: None };
            let mut out = tokio::time::timeout(Duration::from_secs(5), a.stream_session(tokio_stream::iter(vec![req])))
                .await
                .expect("StreamSession answered")
                .unwrap()
                .into_inner();
            for e in envs {
                let got = tokio::time::timeout(Duration::from_secs(5), out.next()).await.unwrap().unwrap().unwrap();
                match got.response {
                    Some(stream_session_response::Response::Envelope(g)) => assert_eq!(g.message_id, e.message_id),
                    other => panic!("expected {}, got {other:?}", e.message_id),
                }
            }
            // Re-sending an acknowledged id is a duplicate.
            let last = envs.last().unwrap().clone();
            if !clients.contains_key(&last.sender) {
                clients.insert(last.sender.clone(), connect_port(port2, &last.sender).await);
            }
            let c = clients.get_mut(&last.sender).unwrap();
            let ack = tokio::time::timeout(Duration::from_secs(5), send(c, last)).await.expect("resend answered");
            assert!(ack.ok && ack.duplicate, "session {s}: {ack:?}");
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = std::env::temp_dir().join(format!("macp-term-{}-{}", std::process::id(), sid()));
    let port = free_port();
    let mut child = spawn(&dir, port);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(async {
        let mut i = connect_port(port, "I").await;
        start_session(&mut i).await
    });
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill(1)");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    // What was acknowledged is there after the restart.
    let port2 = free_port();
    let mut child = spawn(&dir, port2);
    rt.block_on(async {
        let mut i = connect_port(port2, "I").await;
        let md = i.get_session(GetSessionRequest { session_id: s }).await.unwrap().into_inner().metadata.unwrap();
        assert_eq!(md.state, SessionState::Open as i32);
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
