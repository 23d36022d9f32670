//! Shutdown signals before the server serves. A long recovery: the real
//! binary starts on a data directory holding many open sessions and no
//! checkpoint (so it must replay every record), gets SIGINT (then, on a
//! second start, SIGTERM) while still replaying, and must exit 0 within two
//! seconds without having finished. The next start must then recover every
//! session. And a JWKS fetch that hangs: SIGINT must not wait for it.
//!
//! Its own test binary, so no heavy test (kill.rs's load) competes for the
//! CPU while it measures how promptly the server stops.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::*;
use macp_wire::v1::{GetSessionRequest, SessionState};

/// Open sessions in the generated data directory: one record each, all
/// replayed at start. Large enough that a test build recovers them in well
/// over the signal delays (1.3–2.4 s on a shared 2-core machine), small
/// enough to write in a few seconds. If recovery gets faster than the
/// delays, the test fails (the signal no longer lands in a recovery): raise
/// it then.
const SESSIONS: usize = 400_000;
/// The acceptance bound from the signal to the process's exit.
const EXIT_WITHIN: Duration = Duration::from_secs(2);

/// Log lines the test waits for or asserts on (see `server::serve`).
const RECOVERING: &str = "recovering storage";
const STOPPED: &str = "recovery stopped";
const RECOVERED: &str = "recovered in";
const LISTENING: &str = "listening on";
const SIGNALLED: &str = "shutdown signal received";

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The id of generated session `n` (a valid v4 UUID, distinct from
/// `common::sid`'s).
fn session_id(n: usize) -> String {
    format!("5e55a000-0000-4000-8000-{n:012x}")
}

/// Removes the data directory however the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server binary with its log lines (stdout) collected by a thread.
struct Server {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
    port: u16,
}

impl Server {
    /// Starts the binary on data directory `dir`.
    fn start(dir: &Path) -> Server {
        Self::start_with(&["--data-dir", dir.to_str().unwrap()])
    }

    /// Starts the binary with `--dev` and `args`.
    fn start_with(args: &[&str]) -> Server {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_macp-runtime"))
            .args(["--dev", "--bind-addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start macp-runtime");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Server { child, lines, log: Vec::new(), port }
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {needle:?} within {within:?}; log:\n{}", self.log()),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the server closed its output before {needle:?}; log:\n{}", self.log())
                }
            }
        }
    }

    fn log(&self) -> String {
        self.log.join("\n")
    }

    /// Sends `SIGINT` or `SIGTERM` ("INT", "TERM") through kill(1).
    fn signal(&self, sig: &str) {
        let status =
            Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().expect("kill(1)");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits up to `within` for the process to exit, then reads the rest of
    /// its log. Panics (after killing it) if it is still running.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.drain();
                panic!("still running {within:?} after the signal; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.drain();
        status
    }

    /// Collects the log lines left (the process has exited).
    fn drain(&mut self) {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.log.push(line);
        }
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.iter().any(|l| l.contains(needle))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts the server on `dir`, sends `sig` `delay` after recovery started
/// (into the replay), and checks that it stopped the recovery and exited 0
/// within [`EXIT_WITHIN`].
fn interrupt_recovery(dir: &Path, sig: &str, delay: Duration) {
    let mut server = Server::start(dir);
    server.wait_for(RECOVERING, Duration::from_secs(30));
    std::thread::sleep(delay);
    let sent = Instant::now();
    server.signal(sig);
    let status = server.wait_exit(EXIT_WITHIN);
    let took = sent.elapsed();
    eprintln!("SIG{sig}: exited {status} {took:.2?} after the signal");
    let log = server.log();
    assert!(server.logged(SIGNALLED), "SIG{sig} was not observed; log:\n{log}");
    // The path under test: the signal stopped a recovery in progress. If
    // recovery had finished first, this run proves nothing.
    assert!(server.logged(STOPPED), "SIG{sig} did not interrupt the recovery; log:\n{log}");
    assert!(!server.logged(RECOVERED), "recovery finished despite SIG{sig}; log:\n{log}");
    assert!(!server.logged(LISTENING), "the server started serving despite SIG{sig}; log:\n{log}");
    assert_eq!(status.code(), Some(0), "SIG{sig} during recovery: {status}; log:\n{log}");
    assert!(took <= EXIT_WITHIN, "SIG{sig}: exited {took:?} after the signal");
}

#[test]
fn a_signal_during_recovery_exits_zero_promptly_and_loses_nothing() {
    let dir = TempDir(std::env::temp_dir().join(format!("macp-recovery-signal-{}-{}", std::process::id(), sid())));
    let t = Instant::now();
    write_open_sessions(&dir.0, SESSIONS, session_id);
    eprintln!("wrote {SESSIONS} open sessions in {:.2?}", t.elapsed());

    // Interrupted starts change nothing, so both signals use the same
    // directory, and one full start checks what both left behind. Early and
    // deeper into the replay (a larger kernel to drop on the way out).
    interrupt_recovery(&dir.0, "INT", Duration::from_millis(200));
    interrupt_recovery(&dir.0, "TERM", Duration::from_millis(450));

    let mut server = Server::start(&dir.0);
    let recovered = server.wait_for(RECOVERED, Duration::from_secs(120));
    eprintln!("full recovery: {recovered}");
    // Nothing checkpointed or changed the log: every record replays again.
    let all = format!("no checkpoint, {SESSIONS} records replayed, {SESSIONS} sessions open");
    assert!(recovered.contains(&all), "expected {all:?} in {recovered:?}");
    let listening = server.wait_for(LISTENING, Duration::from_secs(10));
    assert!(listening.ends_with(&format!("; {SESSIONS} sessions open")), "{listening}");

    let port = server.port;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let mut client =
            macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient::with_interceptor(
                ch,
                Auth::Agent("I".into()),
            );
        // First, last, and a spread in between.
        let mut sample: Vec<usize> = (0..SESSIONS).step_by(SESSIONS / 97).collect();
        sample.extend([1, SESSIONS / 2, SESSIONS - 2, SESSIONS - 1]);
        for n in sample {
            let s = session_id(n);
            let md = client
                .get_session(GetSessionRequest { session_id: s.clone() })
                .await
                .unwrap_or_else(|e| panic!("session {n} ({s}) was not recovered: {e}"))
                .into_inner()
                .metadata
                .unwrap();
            assert_eq!(md.session_id, s);
            assert_eq!(md.state, SessionState::Open as i32, "session {n} ({s})");
        }
    });
    // Close the connection, or shutdown waits out its grace for it.
    drop(rt);
    let t = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(60));
    eprintln!("shutdown after serving (final checkpoint) took {:.2?}", t.elapsed());
    assert_eq!(status.code(), Some(0), "shutdown after serving: {status}; log:\n{}", server.log());
}

#[test]
fn a_signal_while_jwt_keys_are_fetched_exits_zero_promptly() {
    let dir = TempDir(std::env::temp_dir().join(format!("macp-jwks-signal-{}-{}", std::process::id(), sid())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, ck.cert.pem()).unwrap();
    // A JWKS endpoint that accepts and never answers: the fetch at start
    // hangs until its timeout (5 s), before storage is even opened.
    let endpoint = StdListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://localhost:{}/jwks.json", endpoint.local_addr().unwrap().port());
    let issuer = "https://issuer.test";
    let ca = ca_file.to_str().unwrap();
    let mut server = Server::start_with(&[
        "--memory-only",
        "--auth-issuer",
        issuer,
        "--auth-jwks-url",
        &url,
        "--auth-jwks-ca-file",
        ca,
    ]);
    // Once it connected, the server is waiting for the key set.
    endpoint.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let _conn = loop {
        match endpoint.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the server never fetched its JWT keys");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let sent = Instant::now();
    server.signal("INT");
    let status = server.wait_exit(EXIT_WITHIN);
    let took = sent.elapsed();
    let log = server.log();
    assert_eq!(status.code(), Some(0), "SIGINT during the JWKS fetch: {status}; log:\n{log}");
    assert!(server.logged(SIGNALLED), "SIGINT was not observed; log:\n{log}");
    assert!(server.logged("while loading the authentication"), "not stopped during the fetch; log:\n{log}");
    assert!(!server.logged(LISTENING), "the server started serving despite SIGINT; log:\n{log}");
    assert!(took <= EXIT_WITHIN, "exited {took:?} after the signal");
}
