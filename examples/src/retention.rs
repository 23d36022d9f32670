//! Checking what the runtime promises about ended sessions, end to end:
//! the `macp-bench retention-check` subcommand, run after a soak.
//!
//! One decision session is run to resolution. While it is within retention
//! it must read back RESOLVED through GetSession, replay every accepted
//! envelope through a passive subscribe (in order, byte for byte), and
//! answer a resent message id with `duplicate = true` and no side effect.
//! When a retention is given, the checker then waits until the session is
//! past it and requires the documented codes: SESSION_NOT_FOUND for
//! GetSession, SESSION_NOT_FOUND or HISTORY_UNAVAILABLE for a subscribe.
//! Finally it opens one session and leaves it open, so a restart can be
//! timed with `probe --expect-session`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use macp_wire::v1::{stream_session_response, GetSessionRequest, SessionState, StreamSessionRequest};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::client::{self, Agents, AuthMode};
use crate::modes::{run_session, Mode};
use crate::{envelopes, ids};

/// The metadata key carrying the MACP error code on a failed RPC.
const ERROR_CODE_KEY: &str = "macp-error-code";

/// What to check.
#[derive(Clone, Debug)]
pub struct RetentionConfig {
    /// Runtime address (loopback).
    pub addr: String,
    /// How dev identities are sent.
    pub auth: AuthMode,
    /// The server's history retention; `None` (forever) skips the
    /// past-retention checks.
    pub retention: Option<Duration>,
    /// How long past `retention` the deletion may take (background
    /// maintenance runs periodically).
    pub grace: Duration,
}

/// What was observed. Every field is a fact; [`RetentionReport::ok`] says
/// whether they are the promised ones.
#[derive(Clone, Debug, Default)]
pub struct RetentionReport {
    /// The resolved session checked.
    pub session_id: String,
    /// GetSession right after resolution.
    pub state_after_end: String,
    /// Envelopes sent and accepted.
    pub sent: usize,
    /// Envelopes a passive subscribe from sequence 0 replayed, and whether
    /// they equal the accepted ones in order.
    pub replayed: usize,
    /// Whether the replay matched what was sent.
    pub replay_matches: bool,
    /// Whether resending an accepted message id answered `duplicate`.
    pub duplicate: bool,
    /// After retention: how long after the end GetSession stopped finding
    /// the session, and the code it answered.
    pub gone_after: Option<Duration>,
    /// GetSession's code once gone.
    pub gone_code: String,
    /// A passive subscribe's code once gone.
    pub subscribe_code: String,
    /// A session left open for restart probes.
    pub open_session: String,
}

impl RetentionReport {
    /// Whether every promise held.
    pub fn ok(&self, retention: Option<Duration>) -> bool {
        let within = self.state_after_end == "SESSION_STATE_RESOLVED"
            && self.replay_matches
            && self.duplicate
            && !self.open_session.is_empty();
        let past = retention.is_none()
            || (self.gone_after.is_some()
                && self.gone_code == "SESSION_NOT_FOUND"
                && matches!(self.subscribe_code.as_str(), "SESSION_NOT_FOUND" | "HISTORY_UNAVAILABLE"));
        within && past
    }

    /// A human-readable summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "session {}", self.session_id);
        let _ = writeln!(s, "  GetSession after end      {}", self.state_after_end);
        let _ = writeln!(
            s,
            "  passive subscribe replay  {} of {} envelopes, identical: {}",
            self.replayed, self.sent, self.replay_matches
        );
        let _ = writeln!(s, "  resend of a message id    duplicate={}", self.duplicate);
        match self.gone_after {
            Some(d) => {
                let _ = writeln!(
                    s,
                    "  past retention            gone {:.1} s after the end: GetSession {}, subscribe {}",
                    d.as_secs_f64(),
                    self.gone_code,
                    self.subscribe_code
                );
            }
            None if self.gone_code.is_empty() => {
                let _ = writeln!(s, "  past retention            not checked (retention forever)");
            }
            None => {
                let _ = writeln!(s, "  past retention            STILL READABLE ({})", self.gone_code);
            }
        }
        let _ = writeln!(s, "  left open for probes      {}", self.open_session);
        s
    }

    /// One JSON line.
    pub fn json(&self) -> String {
        serde_json::json!({
            "kind": "retention-check",
            "session_id": self.session_id,
            "state_after_end": self.state_after_end,
            "sent": self.sent,
            "replayed": self.replayed,
            "replay_matches": self.replay_matches,
            "duplicate": self.duplicate,
            "gone_after_s": self.gone_after.map(|d| d.as_secs_f64()),
            "gone_code": self.gone_code,
            "subscribe_code": self.subscribe_code,
            "open_session": self.open_session,
        })
        .to_string()
    }
}

/// The MACP code of a failed RPC (the metadata the runtime attaches), or
/// the gRPC code's name when there is none.
fn macp_code(status: &Status) -> String {
    match status.metadata().get(ERROR_CODE_KEY).and_then(|v| v.to_str().ok()) {
        Some(c) => c.to_string(),
        None => format!("grpc:{:?}", status.code()),
    }
}

/// Runs the check; see the module docs.
pub async fn check(cfg: RetentionConfig) -> crate::Result<RetentionReport> {
    client::require_loopback(&cfg.addr)?;
    let agents = Agents::connect(&cfg.addr, cfg.auth).await?;
    let run = run_session(&agents, Mode::Decision, |_| {}).await?;
    let ended_at = Instant::now();
    let initiator = run.steps[0].envelope.sender.clone();
    let mut report =
        RetentionReport { session_id: run.session_id.clone(), sent: run.steps.len(), ..RetentionReport::default() };
    let mut c = agents.client(&initiator);

    let md = c.get_session(GetSessionRequest { session_id: run.session_id.clone() }).await?.into_inner();
    let state = md.metadata.map_or(0, |m| m.state);
    report.state_after_end = SessionState::try_from(state).map_or("unknown".into(), |s| s.as_str_name().to_string());

    let replay = subscribe(&mut c, &run.session_id).await?;
    report.replayed = replay.len();
    report.replay_matches = replay.len() == run.steps.len()
        && replay.iter().zip(&run.steps).all(|(got, step)| {
            got.message_id == step.envelope.message_id
                && got.message_type == step.envelope.message_type
                && got.payload == step.envelope.payload
        });

    // Resend a vote (not the Commitment: a duplicate must be recognised
    // for any accepted id).
    let vote = run.steps.iter().find(|s| s.envelope.message_type == "Vote").ok_or("the script sent no Vote")?;
    let mut voter = agents.client(&vote.envelope.sender);
    let ack = client::send(&mut voter, vote.envelope.clone()).await?;
    report.duplicate = ack.ok && ack.duplicate;

    if let Some(retention) = cfg.retention {
        let deadline = ended_at + retention + cfg.grace;
        loop {
            match c.get_session(GetSessionRequest { session_id: run.session_id.clone() }).await {
                Ok(_) => report.gone_code = "still readable".into(),
                Err(s) => {
                    report.gone_code = macp_code(&s);
                    report.gone_after = Some(ended_at.elapsed());
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if report.gone_after.is_some() {
            report.subscribe_code = match subscribe(&mut c, &run.session_id).await {
                Ok(items) => format!("replayed {} envelopes", items.len()),
                Err(s) => macp_code(&s),
            };
        }
    }

    let open = ids::session_id();
    let opener = crate::bench::open_initiator(&open);
    let start = envelopes::envelope(
        &open,
        Mode::Decision.id(),
        "SessionStart",
        &opener,
        prost::Message::encode_to_vec(&macp_wire::v1::SessionStartPayload {
            ttl_ms: crate::bench::OPEN_SESSION_TTL_MS,
            ..envelopes::start_payload("left open for a restart probe", &[&opener])
        }),
    );
    let ack = client::send(&mut agents.client(&opener), start).await?;
    if ack.ok {
        report.open_session = open;
    }
    Ok(report)
}

/// A passive subscribe from the beginning, collected until the stream ends
/// (an ended session's stream ends after its history).
async fn subscribe(c: &mut client::Client, session_id: &str) -> Result<Vec<macp_wire::v1::Envelope>, Status> {
    let req = StreamSessionRequest { subscribe_session_id: session_id.into(), after_sequence: 0, envelope: None };
    let requests = tokio_stream::iter(vec![req]).chain(tokio_stream::pending());
    let mut stream = c.stream_session(requests).await?.into_inner();
    let mut out = Vec::new();
    let collect = async {
        while let Some(frame) = stream.next().await {
            match frame?.response {
                Some(stream_session_response::Response::Envelope(e)) => out.push(e),
                Some(stream_session_response::Response::Error(e)) => {
                    return Err(Status::new(Code::FailedPrecondition, e.message).with_code_key(&e.code));
                }
                None => {}
            }
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(30), collect).await {
        Ok(r) => r.map(|()| out),
        Err(_) => Err(Status::deadline_exceeded("the passive subscribe of an ended session did not end")),
    }
}

/// Puts a MACP code on a locally built status, so inline error frames and
/// RPC failures are reported alike.
trait WithCodeKey {
    fn with_code_key(self, code: &str) -> Self;
}

impl WithCodeKey for Status {
    fn with_code_key(mut self, code: &str) -> Self {
        if let Ok(v) = code.parse() {
            self.metadata_mut().insert(ERROR_CODE_KEY, v);
        }
        self
    }
}
