//! The server on PostgreSQL storage (`--storage postgres --database-url`,
//! or MACP_STORAGE / MACP_DATABASE_URL): a decision session run through
//! one server is read back by the next one on the same database —
//! GetSession, passive subscribe replay, duplicate detection — and an open
//! session goes on; the binary refuses inconsistent settings and never
//! prints the database password. The PostgreSQL is a throwaway one
//! (macp-pg-test), shared by this binary's tests.

mod common;

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use common::*;
use macp_pg_test::{unique_name, PgServer};
use macp_transport_grpc::config::Config;
use macp_wire::v1::*;
use tokio_stream::StreamExt;

const T: Duration = Duration::from_secs(10);

fn config(url: &str) -> Config {
    let args = ["macp-runtime", "--dev", "--bind-addr", "127.0.0.1:0", "--storage", "postgres", "--database-url", url];
    Config::parse_from(args).resolve().expect("config")
}

async fn get_session(c: &mut Client, s: &str) -> SessionMetadata {
    let r = tokio::time::timeout(T, c.get_session(GetSessionRequest { session_id: s.into() })).await.unwrap();
    r.expect("GetSession").into_inner().metadata.expect("metadata")
}

/// The message ids a passive subscribe replays, until the server ends the
/// stream (it does after a terminal history).
async fn replay(c: &mut Client, s: &str) -> Vec<String> {
    let req = StreamSessionRequest { subscribe_session_id: s.into(), after_sequence: 0, envelope: None };
    let reqs = tokio_stream::iter(vec![req]);
    let mut out = tokio::time::timeout(T, c.stream_session(reqs)).await.unwrap().expect("StreamSession").into_inner();
    let mut ids = Vec::new();
    while let Some(item) = tokio::time::timeout(T, out.next()).await.expect("the replay ends in time") {
        match item.expect("a replayed item").response {
            Some(stream_session_response::Response::Envelope(e)) => ids.push(e.message_id),
            other => panic!("expected an envelope, got {other:?}"),
        }
    }
    ids
}

#[tokio::test]
async fn sessions_survive_a_restart_on_postgres() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("server");
    let url = pg.create_database(&db).expect("a database");

    let srv = Server::start_with(config(&url)).await;
    let (mut i, mut a, mut b) = (srv.client("I").await, srv.client("A").await, srv.client("B").await);
    let s = start_session(&mut i).await;
    let p = env(&s, DECISION, "Proposal", proposal("p1"));
    let v = env(&s, DECISION, "Vote", vote("p1", "APPROVE"));
    let c = env(&s, DECISION, "Commitment", commitment());
    assert!(send(&mut a, p.clone()).await.ok);
    assert!(send(&mut b, v.clone()).await.ok);
    let ack = send(&mut i, c.clone()).await;
    assert!(ack.ok && !ack.duplicate, "{ack:?}");
    let open = start_session(&mut i).await;
    let resolved = get_session(&mut a, &s).await;
    assert_eq!(resolved.state, SessionState::Resolved as i32);
    let history = replay(&mut a, &s).await;
    assert_eq!(history.len(), 4, "{history:?}");
    assert_eq!(history[1..], [p.message_id.clone(), v.message_id.clone(), c.message_id.clone()]);
    // Closed clients let the server stop without its grace period.
    drop((i, a, b));
    srv.stop().await;
    // What the database holds: the log and the ended session.
    let count = |table: &str| pg.psql(&db, &format!("SELECT count(*) FROM macp.{table}")).expect("psql");
    assert_eq!(count("macp_ended"), "1");
    assert_eq!(count("macp_checkpoint"), "1", "the final checkpoint");

    let srv = Server::start_with(config(&url)).await;
    let (mut i, mut a) = (srv.client("I").await, srv.client("A").await);
    assert_eq!(get_session(&mut a, &s).await, resolved, "GetSession reads the ended session back");
    assert_eq!(replay(&mut a, &s).await, history, "passive subscribe replays the same history");
    let again = send(&mut i, c).await;
    assert!(again.ok && again.duplicate, "a resent message is a duplicate after the restart: {again:?}");
    assert_eq!(get_session(&mut a, &open).await.state, SessionState::Open as i32);
    assert!(send(&mut a, env(&open, DECISION, "Proposal", proposal("p2"))).await.ok, "the open session goes on");
    drop((i, a));
    srv.stop().await;
}

/// The binary reads MACP_STORAGE and MACP_DATABASE_URL, refuses
/// PostgreSQL storage without a database (exit 2, before anything opens),
/// and when the database cannot be reached says where it tried, without
/// the password (exit 1).
#[test]
fn the_binary_takes_the_storage_from_the_environment() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_macp-runtime"));
        cmd.args(["--dev", "--bind-addr", "127.0.0.1:0"]).env("NO_COLOR", "1").env("RUST_LOG", "info");
        for var in ["MACP_STORAGE", "MACP_DATABASE_URL", "MACP_MEMORY_ONLY"] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run macp-runtime");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = run(&[("MACP_STORAGE", "postgres")]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("MACP_STORAGE=postgres needs MACP_DATABASE_URL"), "{text}");

    let (code, text) = run(&[("MACP_MEMORY_ONLY", "1"), ("MACP_STORAGE", "file")]);
    assert_eq!(code, Some(2), "{text}");

    // Nothing listens on this port: the start fails at the connection.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://macp:s3cret@127.0.0.1:{port}/macp");
    let (code, text) = run(&[("MACP_STORAGE", "postgres"), ("MACP_DATABASE_URL", &url)]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&format!("PostgreSQL postgres://macp@127.0.0.1:{port}/macp schema macp")), "{text}");
    assert!(text.contains("connect"), "{text}");
    assert!(!text.contains("s3cret"), "the password was printed: {text}");
}
