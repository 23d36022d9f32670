//! The examples against an in-process `--dev --memory-only` server: every
//! mode script resolves its session, the watcher sees it, the fuzz client
//! finds only clean refusals and leaves the server up, and a short load run
//! completes without errors. These call the library functions the example
//! programs are thin wrappers around, so the programs cannot silently rot.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::time::Duration;

use clap::Parser;
use macp_examples::bench::{self, BenchConfig, Workload};
use macp_examples::client::{Agents, AuthMode};
use macp_examples::fuzz::{self, FuzzConfig};
use macp_examples::modes::{run_session, Mode};
use macp_examples::watch::{follow_session, SessionItem};
use macp_transport_grpc::config::Config;
use macp_wire::v1::SessionState;
use tokio::sync::oneshot;

/// An in-process server on a free loopback port; stops when dropped.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    async fn start(extra: &[&str]) -> Server {
        let mut args = vec!["macp-runtime", "--dev", "--memory-only", "--bind-addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let cfg = Config::parse_from(args).resolve().expect("config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            macp_transport_grpc::server::serve(cfg, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("server");
        });
        Server { addr, stop: Some(stop) }
    }

    async fn agents(&self, auth: AuthMode) -> Agents {
        Agents::connect(&self.addr.to_string(), auth).await.expect("connect")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[tokio::test]
async fn every_mode_example_resolves_its_session() {
    let srv = Server::start(&[]).await;
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        // Alternate the two dev-identity forms.
        let auth = if i % 2 == 0 { AuthMode::AgentHeader } else { AuthMode::Bearer };
        let agents = srv.agents(auth).await;
        let mut printed = 0;
        let run = run_session(&agents, mode, |_| printed += 1).await.unwrap_or_else(|e| panic!("{}: {e}", mode.name()));
        assert_eq!(run.final_state.state, SessionState::Resolved as i32, "{}", mode.name());
        assert_eq!(run.final_state.mode, mode.id());
        assert_eq!(printed, run.steps.len());
        assert!(run.steps.iter().all(|s| s.ack.ok && !s.ack.duplicate));
        assert_eq!(run.steps.first().unwrap().envelope.message_type, "SessionStart");
        assert_eq!(run.steps.last().unwrap().envelope.message_type, "Commitment");
        assert_eq!(Mode::from_name(mode.name()), Some(mode));
    }
}

#[tokio::test]
async fn watcher_replays_a_resolved_session_then_ends() {
    let srv = Server::start(&[]).await;
    let agents = srv.agents(AuthMode::AgentHeader).await;
    let run = run_session(&agents, Mode::Decision, |_| {}).await.unwrap();
    let mut alice = agents.client("agent://alice");
    let mut seen = Vec::new();
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        follow_session(&mut alice, &run.session_id, 0, |item| {
            if let SessionItem::Envelope(e) = item {
                seen.push(e.message_id.clone());
            }
            ControlFlow::Continue(())
        }),
    )
    .await
    .expect("the stream of a resolved session ends by itself")
    .unwrap();
    let sent: Vec<String> = run.steps.iter().map(|s| s.envelope.message_id.clone()).collect();
    assert_eq!(seen, sent, "the whole accepted history, in order");
    assert_eq!(n as usize, sent.len());
    // after_sequence skips the beginning.
    let mut tail = Vec::new();
    follow_session(&mut alice, &run.session_id, 3, |item| {
        if let SessionItem::Envelope(e) = item {
            tail.push(e.message_id.clone());
        }
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(tail, sent[3..]);
}

#[tokio::test]
async fn fuzz_client_finds_only_clean_refusals_and_the_server_survives() {
    let srv = Server::start(&[]).await;
    let agents = srv.agents(AuthMode::AgentHeader).await;
    let cfg = FuzzConfig { iterations: 400, seed: 0x5eed, huge: true, ..Default::default() };
    let report = fuzz::run(&agents, &cfg, |_| {}).await.unwrap();
    assert_eq!(report.cases, 400);
    assert!(report.passed(), "{}", report.render());
    assert!(report.by_kind.len() >= 12, "most generators ran: {:?}", report.by_kind);
    // The server is still fully usable afterwards.
    run_session(&agents, Mode::Quorum, |_| {}).await.unwrap();
}

#[tokio::test]
async fn short_load_run_completes_without_errors() {
    let srv = Server::start(&[]).await;
    for workload in [Workload::Decision, Workload::Signals, Workload::Starts] {
        let cfg = BenchConfig {
            addr: srv.addr.to_string(),
            concurrency: 4,
            connections: 2,
            duration: Duration::from_millis(400),
            warmup: Duration::from_millis(100),
            auth: AuthMode::Bearer,
            workload,
            // The server runs in this process: its CPU time is this
            // process's, load generator included (an upper bound).
            server_pid: Some(std::process::id()),
        };
        let r = bench::run(cfg).await.unwrap();
        assert!(r.ops > 0, "{}", r.table());
        assert_eq!(r.errors, 0, "{}", r.table());
        let cpu = r.server_cpu_secs.expect("CPU time read from /proc");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        assert!(cpu > 0.0 && cpu <= 0.4 * cores + 0.05, "CPU {cpu} s in a 0.4 s window on {cores} cores");
        let per_op = r.server_cpu_us_per_op().unwrap();
        assert!((per_op - cpu * 1e6 / r.ops as f64).abs() < 1e-6);
        if workload != Workload::Signals {
            assert!(r.sessions > 0, "{}", r.table());
        }
        let json: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(json["workload"], workload.as_str());
    }
}

#[tokio::test]
async fn load_generator_refuses_remote_targets() {
    let cfg = BenchConfig {
        addr: "192.0.2.1:50051".into(),
        concurrency: 1,
        connections: 1,
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        auth: AuthMode::AgentHeader,
        workload: Workload::Signals,
        server_pid: None,
    };
    let e = bench::run(cfg).await.unwrap_err().to_string();
    assert!(e.contains("loopback"), "{e}");
}
