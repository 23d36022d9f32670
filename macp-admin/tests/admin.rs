//! `macp-admin` against real data: a real server (in-process, on a
//! temporary data directory) runs a known workload, then the binary is run
//! on that directory. No mocks.
//!
//! - a locked directory (the server running) is refused, exit 2;
//! - `export` equals what passive subscribe returned from the server,
//!   envelope by envelope, for every session;
//! - `history` and `sessions` show the workload;
//! - nothing the tool does changes a byte of the directory;
//! - `verify` says healthy (exit 0), then, after one flipped byte in a
//!   segment record, damaged (exit 1) with the segment file and offset;
//! - `tail` shows the workload live, `receipt --verify` verifies a resolved
//!   session's receipt with the server's keys.

#[path = "../../macp-transport-grpc/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use clap::Parser as _;
use common::*;
use macp_transport_grpc::config::Config;
use macp_wire::v1::{stream_session_response, CancelSessionRequest, Envelope, StreamSessionRequest};
use serde_json::Value;
use tokio_stream::StreamExt as _;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("macp-admin-{tag}-{}-{}", std::process::id(), sid()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A server with a file-backed data directory that checkpoints every few
/// records, so the directory has both a checkpoint and a tail after it.
async fn server_on(dir: &Path) -> Server {
    let args = [
        "macp-runtime",
        "--dev",
        "--bind-addr",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
        "--checkpoint-every",
        "4",
    ];
    Server::start_with(Config::parse_from(args).resolve().expect("config")).await
}

fn admin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_macp-admin")).args(args).output().expect("run macp-admin")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn lines(out: &Output) -> Vec<Value> {
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// The known workload: `resolved` sessions (Proposal, Commitment), one
/// left open after a Proposal, one cancelled.
struct Workload {
    resolved: Vec<String>,
    open: String,
    cancelled: String,
}

async fn workload(server: &Server) -> Workload {
    let mut i = server.client("I").await;
    let mut a = server.client("A").await;
    let mut resolved = Vec::new();
    for n in 0..3 {
        let s = start_session(&mut i).await;
        let p = format!("p{n}");
        assert!(send(&mut a, env(&s, DECISION, "Proposal", proposal(&p))).await.ok);
        let ack = send(&mut i, env(&s, DECISION, "Commitment", commitment())).await;
        assert!(ack.ok, "{:?}", ack.error);
        resolved.push(s);
    }
    let open = start_session(&mut i).await;
    assert!(send(&mut a, env(&open, DECISION, "Proposal", proposal("po"))).await.ok);
    let cancelled = start_session(&mut i).await;
    i.cancel_session(CancelSessionRequest { session_id: cancelled.clone(), reason: "test".into() })
        .await
        .expect("CancelSession");
    Workload { resolved, open, cancelled }
}

/// A session's accepted history as passive subscribe (StreamSession from
/// `after_sequence` 0) returns it. An open session's stream never ends, so
/// its replay is taken as complete once nothing more comes for a while.
async fn subscribed(server: &Server, session_id: &str) -> Vec<Envelope> {
    let mut c = server.client("I").await;
    let req = StreamSessionRequest { subscribe_session_id: session_id.into(), after_sequence: 0, envelope: None };
    let requests = tokio_stream::iter(vec![req]).chain(tokio_stream::pending());
    let mut stream = c.stream_session(requests).await.expect("StreamSession").into_inner();
    let mut out = Vec::new();
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_millis(700), stream.next()).await {
        match frame.expect("frame").response {
            Some(stream_session_response::Response::Envelope(e)) => out.push(e),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    out
}

/// An exported envelope back as the wire type.
fn envelope_of(v: &Value) -> Envelope {
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}")).to_string();
    Envelope {
        macp_version: s("macp_version"),
        mode: s("mode"),
        message_type: s("message_type"),
        message_id: s("message_id"),
        session_id: s("session_id"),
        sender: s("sender"),
        timestamp_unix_ms: v["timestamp_unix_ms"].as_i64().expect("timestamp"),
        payload: base64::engine::general_purpose::STANDARD.decode(s("payload_base64")).expect("base64"),
    }
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_server_tails_then_its_data_exports_as_it_streams_without_a_write() {
    let dir = temp_dir("export");
    let server = server_on(&dir).await;
    let addr = server.addr.to_string();
    // tail follows the workload live: lifecycle events and envelopes.
    let tail = Command::new(env!("CARGO_BIN_EXE_macp-admin"))
        .args(["tail", "--addr", &addr, "--dev-sender", "I", "--limit", "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tail");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let w = workload(&server).await;
    let d = dir.to_str().unwrap();
    let tailed = tokio::task::spawn_blocking(move || tail.wait_with_output()).await.unwrap().expect("tail");
    assert_eq!(tailed.status.code(), Some(0), "{}", text(&tailed.stderr));
    let tailed = lines(&tailed);
    assert_eq!(tailed.len(), 8);
    assert!(tailed.iter().any(|l| l["event"] == "created" && l["session"]["session_id"] == w.resolved[0].as_str()));
    assert!(tailed.iter().any(|l| l["envelope"]["message_type"] == "SessionStart"), "{tailed:?}");

    // receipt --verify: the dev server signs with a key it generated.
    let out = admin(&["receipt", "--addr", &addr, "--dev-sender", "I", &w.resolved[0], "--verify"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    let receipt = &lines(&out)[0];
    assert_eq!(receipt["receipt_format"], "macp-receipt/1");
    assert!(text(&out.stderr).contains("verified: attested by key"), "{}", text(&out.stderr));
    let out = admin(&["receipt", "--addr", &addr, "--dev-sender", "I", &w.open]);
    assert_eq!(out.status.code(), Some(2), "an open session has no receipt yet");

    // (d) The server holds the directory: every data command refuses.
    for cmd in [vec!["verify", d], vec!["sessions", d], vec!["inspect", d]] {
        let out = admin(&cmd);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(err.contains("locked"), "{cmd:?} says why: {err}");
    }

    let mut all: Vec<String> = w.resolved.clone();
    all.push(w.open.clone());
    all.push(w.cancelled.clone());
    let mut streamed = BTreeMap::new();
    for s in &all {
        streamed.insert(s.clone(), subscribed(&server, s).await);
    }
    server.stop().await;
    let before = files(&dir);

    // (b) export: every accepted envelope of every session, in order.
    let out_file = dir.with_extension("jsonl");
    let out = admin(&["export", d, "--out", out_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "no progress output when not on a terminal: {}", text(&out.stderr));
    let exported = std::fs::read_to_string(&out_file).expect("export file");
    let mut by_session: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
    for line in exported.lines() {
        let v: Value = serde_json::from_str(line).expect("JSON line");
        if let Some(e) = v.get("envelope") {
            by_session.entry(v["session_id"].as_str().unwrap().to_string()).or_default().push(envelope_of(e));
        }
    }
    assert_eq!(by_session, streamed, "export equals passive subscribe, session by session");
    assert_eq!(streamed[&w.resolved[0]].len(), 3, "SessionStart, Proposal, Commitment");

    // (c) history: the records in sequence order, payloads decoded.
    let out = admin(&["history", d, &w.resolved[0]]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let h = lines(&out);
    let kinds: Vec<&str> = h.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["started", "accepted", "accepted"]);
    let seqs: Vec<u64> = h.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3]);
    let types: Vec<&str> = h.iter().map(|r| r["envelope"]["message_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["SessionStart", "Proposal", "Commitment"]);
    assert_eq!(h[0]["envelope"]["payload"]["participants"], serde_json::json!(["I", "A", "B"]));
    assert_eq!(h[0]["envelope"]["payload"]["ttlMs"], serde_json::json!("60000"));
    assert_eq!(h[1]["envelope"]["payload"]["proposalId"], "p0");
    assert_eq!(h[1]["envelope"]["payload"]["option"], "deploy");
    assert_eq!(h[2]["envelope"]["payload"]["action"], "decision.selected");
    assert_eq!(h[1]["envelope"]["sender"], "A");
    let out = admin(&["history", d, &w.cancelled]);
    let kinds: Vec<String> = lines(&out).iter().map(|r| r["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["started", "cancelled"]);
    let out = admin(&["history", d, "no-such-session"]);
    assert_eq!(out.status.code(), Some(2));

    // (c) sessions: all five with their states; filters.
    let out = admin(&["sessions", d, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed: BTreeMap<String, String> = lines(&out)
        .iter()
        .map(|s| (s["session_id"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string()))
        .collect();
    let mut want: BTreeMap<String, String> = w.resolved.iter().map(|s| (s.clone(), "resolved".to_string())).collect();
    want.insert(w.open.clone(), "open".into());
    want.insert(w.cancelled.clone(), "cancelled".into());
    assert_eq!(listed, want);
    let out = admin(&["sessions", d, "--state", "open"]);
    assert_eq!(text(&out.stdout).lines().count(), 1);
    assert!(text(&out.stdout).starts_with(&format!("{} {DECISION} open started=", w.open)), "{}", text(&out.stdout));
    let out = admin(&["sessions", d, "--mode", "macp.mode.task.v1"]);
    assert_eq!(text(&out.stdout), "");
    let out = admin(&["sessions", d, "--state", "resolved", "--mode", DECISION]);
    assert_eq!(text(&out.stdout).lines().count(), 3);

    // inspect: counts by group, mode and state.
    let out = admin(&["inspect", d, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = &lines(&out)[0];
    assert_eq!(v["format"], "macp-rs-data 2");
    assert_eq!(v["checkpoint"]["present"], true);
    assert!(v["segments"]["count"].as_u64().unwrap() >= 1);
    let count = |group: &str, state: &str| {
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == group && g["state"] == state && g["mode"] == DECISION)
            .map_or(0, |g| g["count"].as_u64().unwrap())
    };
    assert_eq!((count("ended", "resolved"), count("ended", "cancelled"), count("open", "open")), (3, 1, 1));
    let out = admin(&["inspect", d]);
    assert!(text(&out.stdout).contains("segments"), "{}", text(&out.stdout));

    let out = admin(&["verify", d]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));

    assert!(before == files(&dir), "the tool wrote to the data directory");
    let _ = std::fs::remove_file(&out_file);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_flipped_byte_with_its_segment_and_offset() {
    let dir = temp_dir("verify");
    let server = server_on(&dir).await;
    workload(&server).await;
    server.stop().await;
    let d = dir.to_str().unwrap();

    // (a) healthy: exit 0.
    let out = admin(&["verify", d]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("healthy") && report.contains("compared with a full replay"), "{report}");
    let out = admin(&["verify", d, "--json"]);
    let v = &lines(&out)[0];
    assert_eq!(v["healthy"], true);
    assert_eq!(v["checkpoint_compared"], true, "{v}");

    // One byte flipped inside the payload of the first record's frame:
    // segment header (16 bytes), frame header (16 bytes), then the payload.
    let seg = dir.join("wal").join("00000000000000000001.seg");
    let mut bytes = std::fs::read(&seg).expect("segment");
    bytes[16 + 16 + 5] ^= 0x40;
    std::fs::write(&seg, &bytes).expect("write segment");
    let out = admin(&["verify", d]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}{}", text(&out.stderr));
    assert!(report.contains("DAMAGE wal/00000000000000000001.seg offset 16: BadChecksum"), "{report}");
    let out = admin(&["verify", d, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = &lines(&out)[0];
    assert_eq!(v["healthy"], false);
    let first = &v["problems"][0];
    assert_eq!((first["file"].as_str(), first["offset"].as_u64()), (Some("wal/00000000000000000001.seg"), Some(16)));

    // An unreadable checkpoint is damage too, and is named.
    std::fs::write(dir.join("checkpoint"), b"not a checkpoint").expect("write checkpoint");
    let out = admin(&["verify", d]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}{}", text(&out.stderr));
    assert!(report.contains("DAMAGE checkpoint: unreadable"), "{report}");

    // A directory that is not one: exit 2.
    let out = admin(&["verify", dir.join("wal").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not a macp-rs data directory"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
