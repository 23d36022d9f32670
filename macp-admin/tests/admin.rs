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
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use support::*;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("macp-admin-{tag}-{}-{}", std::process::id(), sid()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A server with a file-backed data directory that checkpoints every few
/// records, so the directory has both a checkpoint and a tail after it.
async fn server_on(dir: &Path) -> Server {
    server_with(&["--data-dir", dir.to_str().expect("utf-8 path")]).await
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

    let streamed = streamed(&server, &w).await;
    server.stop().await;
    let before = files(&dir);

    // (b) export equals passive subscribe; (c) history and sessions.
    let out_file = dir.with_extension("jsonl");
    check_reads(&[d], &w, &streamed, &out_file);

    // inspect: counts by group, mode and state, and the files.
    let v = inspect_json(&[d]);
    assert_eq!(v["format"], "macp-rs-data 2");
    assert_eq!(v["checkpoint"]["present"], true);
    assert!(v["segments"]["count"].as_u64().unwrap() >= 1);
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
