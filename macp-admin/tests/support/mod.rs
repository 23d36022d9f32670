//! What the tests of both backends share: running the binary, the known
//! workload, passive subscribe, and the checks of `export`, `history`,
//! `sessions` and `inspect`, which must answer alike whichever backend the
//! server ran on (`src` is a data directory, or `--database-url URL`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use clap::Parser as _;
use macp_transport_grpc::config::Config;
use macp_wire::v1::{stream_session_response, CancelSessionRequest, Envelope, StreamSessionRequest};
use serde_json::Value;
use tokio_stream::StreamExt as _;

use crate::common::*;

/// A dev server that checkpoints every few records, so its storage has a
/// checkpoint and records after it, with the storage flags `storage`.
pub async fn server_with(storage: &[&str]) -> Server {
    let mut args = vec!["macp-runtime", "--dev", "--bind-addr", "127.0.0.1:0", "--checkpoint-every", "4"];
    args.extend_from_slice(storage);
    Server::start_with(Config::parse_from(args).resolve().expect("config")).await
}

/// Runs the binary with `args`, without a MACP_DATABASE_URL the test run
/// may have inherited.
pub fn admin(args: &[&str]) -> Output {
    admin_with(args, &[])
}

/// Runs the binary with `args` and the environment variables `env`.
pub fn admin_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_macp-admin"));
    cmd.args(args).env_remove("MACP_DATABASE_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run macp-admin")
}

/// `command`, then where to read (`src`: a data directory, or
/// `--database-url URL`), then `rest`.
pub fn admin_on(command: &str, src: &[&str], rest: &[&str]) -> Output {
    admin(&[&[command][..], src, rest].concat())
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn lines(out: &Output) -> Vec<Value> {
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// The known workload: `resolved` sessions (Proposal, Commitment), one
/// left open after a Proposal, one cancelled.
pub struct Workload {
    pub resolved: Vec<String>,
    pub open: String,
    pub cancelled: String,
}

pub async fn workload(server: &Server) -> Workload {
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
pub async fn subscribed(server: &Server, session_id: &str) -> Vec<Envelope> {
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
pub fn envelope_of(v: &Value) -> Envelope {
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

impl Workload {
    /// Every session of the workload.
    pub fn all(&self) -> Vec<String> {
        let mut all = self.resolved.clone();
        all.push(self.open.clone());
        all.push(self.cancelled.clone());
        all
    }
}

/// Every session's history as passive subscribe returns it.
pub async fn streamed(server: &Server, w: &Workload) -> BTreeMap<String, Vec<Envelope>> {
    let mut out = BTreeMap::new();
    for s in w.all() {
        let envelopes = subscribed(server, &s).await;
        out.insert(s, envelopes);
    }
    out
}

/// `export` to `out_file` equals what passive subscribe returned
/// (`streamed`), envelope by envelope, session by session; `history`
/// shows the records in sequence order with payloads decoded; `sessions`
/// lists all with their states and filters.
pub fn check_reads(src: &[&str], w: &Workload, streamed: &BTreeMap<String, Vec<Envelope>>, out_file: &Path) {
    let out = admin_on("export", src, &["--out", out_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "no progress output when not on a terminal: {}", text(&out.stderr));
    let exported = std::fs::read_to_string(out_file).expect("export file");
    let mut by_session: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
    for line in exported.lines() {
        let v: Value = serde_json::from_str(line).expect("JSON line");
        if let Some(e) = v.get("envelope") {
            by_session.entry(v["session_id"].as_str().unwrap().to_string()).or_default().push(envelope_of(e));
        }
    }
    assert_eq!(&by_session, streamed, "export equals passive subscribe, session by session");
    assert_eq!(streamed[&w.resolved[0]].len(), 3, "SessionStart, Proposal, Commitment");

    // history: the records in sequence order, payloads decoded.
    let out = admin_on("history", src, &[&w.resolved[0]]);
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
    let out = admin_on("history", src, &[&w.cancelled]);
    let kinds: Vec<String> = lines(&out).iter().map(|r| r["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["started", "cancelled"]);
    let out = admin_on("history", src, &["no-such-session"]);
    assert_eq!(out.status.code(), Some(2));

    // sessions: all five with their states; filters.
    let out = admin_on("sessions", src, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed: BTreeMap<String, String> = lines(&out)
        .iter()
        .map(|s| (s["session_id"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string()))
        .collect();
    let mut want: BTreeMap<String, String> = w.resolved.iter().map(|s| (s.clone(), "resolved".to_string())).collect();
    want.insert(w.open.clone(), "open".into());
    want.insert(w.cancelled.clone(), "cancelled".into());
    assert_eq!(listed, want);
    let out = admin_on("sessions", src, &["--state", "open"]);
    assert_eq!(text(&out.stdout).lines().count(), 1);
    assert!(text(&out.stdout).starts_with(&format!("{} {DECISION} open started=", w.open)), "{}", text(&out.stdout));
    let out = admin_on("sessions", src, &["--mode", "macp.mode.task.v1"]);
    assert_eq!(text(&out.stdout), "");
    let out = admin_on("sessions", src, &["--state", "resolved", "--mode", DECISION]);
    assert_eq!(text(&out.stdout).lines().count(), 3);
}

/// `inspect --json`, whose session counts by group, mode and state are
/// the workload's.
pub fn inspect_json(src: &[&str]) -> Value {
    let out = admin_on("inspect", src, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = lines(&out).remove(0);
    let count = |group: &str, state: &str| {
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == group && g["state"] == state && g["mode"] == DECISION)
            .map_or(0, |g| g["count"].as_u64().unwrap())
    };
    assert_eq!((count("ended", "resolved"), count("ended", "cancelled"), count("open", "open")), (3, 1, 1), "{v}");
    v
}
