//! The closed-loop load generator behind `macp-bench`.
//!
//! `concurrency` workers share `connections` HTTP/2 connections; each worker
//! sends one request, waits for its Ack, and sends the next (closed loop:
//! offered load adapts to the server, so latency numbers are honest rather
//! than a queue measuring itself). The first `warmup` is discarded; every
//! Send completed in the following `duration` is counted and its round-trip
//! time recorded in an HDR histogram (microseconds, 3 significant digits).
//!
//! Rate limits: the runtime limits each *sender* (60 SessionStarts and 600
//! other messages per minute by default). Rather than require a specially
//! configured server, every session gets fresh agent ids, and the signal
//! workload moves to a new sender every [`SIGNALS_PER_SENDER`] signals, so
//! no sender comes near its budget. (Alternatively run the server with
//! `MACP_SESSION_START_LIMIT_PER_MINUTE=0 MACP_MESSAGE_LIMIT_PER_MINUTE=0`;
//! 0 disables a limit.)
//!
//! Safety: the target must resolve to loopback only, and the run ends by
//! itself: no new request starts after the deadline, every request has a
//! timeout, and the whole run is bounded by a hard stop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use hdrhistogram::Histogram;
use macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient;
use macp_wire::modes::decision;
use macp_wire::v1::{Envelope, InitializeRequest, SendRequest};
use macp_wire::Message;
use tonic::transport::Channel;
use tonic::Request;

use crate::client::{authorize, connect, require_loopback, AuthMode};
use crate::envelopes::{commitment, envelope, signal, start_payload, MACP_VERSION};
use crate::ids;

/// What each worker does in a loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// A full decision session: SessionStart, Proposal, two Votes,
    /// Commitment (5 Sends); the realistic mix of starts, mode messages and
    /// a resolution.
    Decision,
    /// Ambient Signals: the cheapest accepted envelope (no session, nothing
    /// persisted), so this is close to the transport's own ceiling.
    Signals,
    /// SessionStart only: the most expensive single message (id checks,
    /// payload validation, policy binding, a new session).
    Starts,
}

impl Workload {
    /// The flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Decision => "decision",
            Workload::Signals => "signals",
            Workload::Starts => "starts",
        }
    }
}

/// How many signals one generated sender emits before the worker moves on
/// to a fresh one (below the default 600/min message budget).
pub const SIGNALS_PER_SENDER: u64 = 500;
/// Longest run accepted, so a typo cannot start an endless load test.
pub const MAX_RUN: Duration = Duration::from_secs(600);
/// Per-request timeout; a request that exceeds it counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A load test.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Server address (`host:port`), loopback only.
    pub addr: String,
    /// Concurrent closed-loop workers.
    pub concurrency: usize,
    /// HTTP/2 connections the workers are spread over.
    pub connections: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// How identities are presented.
    pub auth: AuthMode,
    /// What to send.
    pub workload: Workload,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// The result of a load test.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// The configuration that produced it.
    pub config: BenchConfig,
    /// Seconds actually measured.
    pub measured_secs: f64,
    /// Sends completed successfully in the window.
    pub ops: u64,
    /// Sessions completed (decision: Commitment accepted; starts: start accepted).
    pub sessions: u64,
    /// Sends that failed (refused Ack, gRPC error, or timeout).
    pub errors: u64,
    /// Failures by code (`ack:CODE`, `status:Code`, `timeout`).
    pub error_codes: BTreeMap<String, u64>,
    /// Per-Send latency of successful and failed Sends alike.
    pub latency: Latency,
}

impl BenchReport {
    /// Successful Sends per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.measured_secs.max(1e-9)
    }

    /// Completed sessions per second.
    pub fn sessions_per_sec(&self) -> f64 {
        self.sessions as f64 / self.measured_secs.max(1e-9)
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let c = &self.config;
        let l = &self.latency;
        let mut s = String::new();
        let _ = writeln!(s, "workload      {}", c.workload.as_str());
        let _ = writeln!(s, "target        {}", c.addr);
        let _ = writeln!(
            s,
            "concurrency   {} over {} connection(s), auth {}",
            c.concurrency,
            c.connections,
            c.auth.as_str()
        );
        let _ =
            writeln!(s, "measured      {:.1} s (after {:.1} s warm-up)", self.measured_secs, c.warmup.as_secs_f64());
        let _ = writeln!(s, "ops           {} ({:.0} ops/s)", self.ops, self.ops_per_sec());
        let _ = writeln!(s, "sessions      {} ({:.0} sessions/s)", self.sessions, self.sessions_per_sec());
        let _ = writeln!(s, "errors        {}", self.errors);
        for (k, v) in &self.error_codes {
            let _ = writeln!(s, "  {k:<30} {v}");
        }
        let _ = writeln!(
            s,
            "latency (µs)  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.0}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        s
    }

    /// The same as one JSON line, for scripts.
    pub fn json(&self) -> String {
        let c = &self.config;
        let l = &self.latency;
        serde_json::json!({
            "workload": c.workload.as_str(),
            "addr": c.addr,
            "concurrency": c.concurrency,
            "connections": c.connections,
            "auth": c.auth.as_str(),
            "warmup_s": c.warmup.as_secs_f64(),
            "measured_s": self.measured_secs,
            "ops": self.ops,
            "ops_per_s": (self.ops_per_sec() * 10.0).round() / 10.0,
            "sessions": self.sessions,
            "sessions_per_s": (self.sessions_per_sec() * 10.0).round() / 10.0,
            "errors": self.errors,
            "error_codes": self.error_codes,
            "latency_us": {
                "p50": l.p50, "p90": l.p90, "p99": l.p99, "p99_9": l.p999, "max": l.max,
                "mean": (l.mean * 10.0).round() / 10.0,
            },
        })
        .to_string()
    }
}

/// Parses `10s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (try 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit in '{s}' (use ms, s or m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("'{s}' is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

type Raw = MacpRuntimeServiceClient<Channel>;

/// What one worker measured.
struct Tally {
    hist: Histogram<u64>,
    ops: u64,
    sessions: u64,
    errors: u64,
    codes: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            ops: 0,
            sessions: 0,
            errors: 0,
            codes: BTreeMap::new(),
        }
    }
}

/// The measurement window shared by every worker.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

struct Worker {
    client: Raw,
    auth: AuthMode,
    window: Window,
    tally: Tally,
    /// Distinguishes this run's and this worker's generated agent ids.
    tag: String,
    n: u64,
}

impl Worker {
    /// Sends one envelope as `agent`; records it if it completed inside the
    /// window; returns whether it was accepted.
    async fn send(&mut self, agent: &str, env: Envelope) -> bool {
        let mut req = Request::new(SendRequest { envelope: Some(env) });
        if authorize(&mut req, self.auth, agent).is_err() {
            return false;
        }
        let t = Instant::now();
        let r = tokio::time::timeout(REQUEST_TIMEOUT, self.client.send(req)).await;
        let done = Instant::now();
        let failure = match r {
            Err(_) => Some("timeout".to_string()),
            Ok(Err(status)) => Some(format!("status:{:?}", status.code())),
            Ok(Ok(resp)) => match resp.into_inner().ack {
                Some(a) if a.ok => None,
                Some(a) => Some(format!("ack:{}", a.error.map(|e| e.code).unwrap_or_default())),
                None => Some("status:no-ack".into()),
            },
        };
        if done >= self.window.from && done <= self.window.until {
            self.tally.hist.saturating_record((done - t).as_micros() as u64);
            match &failure {
                None => self.tally.ops += 1,
                Some(code) => {
                    self.tally.errors += 1;
                    *self.tally.codes.entry(code.clone()).or_default() += 1;
                }
            }
        }
        failure.is_none()
    }

    fn in_window(&self) -> bool {
        let now = Instant::now();
        now >= self.window.from && now <= self.window.until
    }

    async fn run(mut self, workload: Workload) -> Tally {
        while Instant::now() < self.window.until {
            self.n += 1;
            match workload {
                Workload::Decision => self.decision().await,
                Workload::Starts => self.start().await,
                Workload::Signals => self.signal().await,
            }
        }
        self.tally
    }

    /// SessionStart, Proposal, Vote, Vote, Commitment with fresh agents.
    async fn decision(&mut self) {
        const MODE: &str = "macp.mode.decision.v1";
        let (i, a, b) = (
            format!("{}-s{}-i", self.tag, self.n),
            format!("{}-s{}-a", self.tag, self.n),
            format!("{}-s{}-b", self.tag, self.n),
        );
        let sid = ids::session_id();
        let start = start_payload("bench", &[&a, &b]).encode_to_vec();
        let proposal =
            decision::ProposalPayload { proposal_id: "p1".into(), option: "go".into(), ..Default::default() }
                .encode_to_vec();
        let vote = decision::VotePayload { proposal_id: "p1".into(), vote: "APPROVE".into(), reason: String::new() }
            .encode_to_vec();
        let steps = [
            (&i, "SessionStart", start),
            (&a, "Proposal", proposal),
            (&a, "Vote", vote.clone()),
            (&b, "Vote", vote),
            (&i, "Commitment", commitment("decision.selected", true, "bench").encode_to_vec()),
        ];
        for (who, ty, payload) in steps {
            if Instant::now() >= self.window.until {
                return;
            }
            if !self.send(who, envelope(&sid, MODE, ty, who, payload)).await {
                return;
            }
        }
        if self.in_window() {
            self.tally.sessions += 1;
        }
    }

    async fn start(&mut self) {
        let i = format!("{}-s{}-i", self.tag, self.n);
        let peer = format!("{}-s{}-p", self.tag, self.n);
        let sid = ids::session_id();
        let env = envelope(
            &sid,
            "macp.mode.decision.v1",
            "SessionStart",
            &i,
            start_payload("bench", &[&peer]).encode_to_vec(),
        );
        if self.send(&i, env).await && self.in_window() {
            self.tally.sessions += 1;
        }
    }

    async fn signal(&mut self) {
        let who = format!("{}-g{}", self.tag, self.n / SIGNALS_PER_SENDER);
        let env = signal(&who, "bench.heartbeat", Vec::new());
        self.send(&who, env).await;
    }
}

/// Runs a load test and returns its report. Refuses non-loopback targets,
/// runs longer than [`MAX_RUN`], and zero workers or connections.
pub async fn run(cfg: BenchConfig) -> crate::Result<BenchReport> {
    require_loopback(&cfg.addr)?;
    if cfg.concurrency == 0 || cfg.connections == 0 {
        return Err("--concurrency and --connections must be at least 1".into());
    }
    if cfg.duration.is_zero() || cfg.duration + cfg.warmup > MAX_RUN {
        return Err(format!("--duration must be positive and duration + warmup at most {} s", MAX_RUN.as_secs()).into());
    }
    let mut channels = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        channels.push(connect(&cfg.addr).await?);
    }
    // Fail fast, with a readable error, if this is not a MACP runtime.
    let mut probe = Raw::new(channels[0].clone());
    probe
        .initialize(InitializeRequest { supported_protocol_versions: vec![MACP_VERSION.into()], ..Default::default() })
        .await
        .map_err(|s| format!("Initialize failed: {s}"))?;

    let run_tag = &ids::session_id()[..8];
    let start = Instant::now();
    let window = Window { from: start + cfg.warmup, until: start + cfg.warmup + cfg.duration };
    let mut tasks = Vec::with_capacity(cfg.concurrency);
    for w in 0..cfg.concurrency {
        let worker = Worker {
            client: Raw::new(channels[w % cfg.connections].clone()),
            auth: cfg.auth,
            window,
            tally: Tally::new(),
            tag: format!("bench-{run_tag}-w{w}"),
            n: 0,
        };
        tasks.push(tokio::spawn(worker.run(cfg.workload)));
    }
    let hard_stop = cfg.warmup + cfg.duration + REQUEST_TIMEOUT + Duration::from_secs(5);
    let mut total = Tally::new();
    let deadline = tokio::time::Instant::now() + hard_stop;
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(tally)) => {
                total.hist.add(&tally.hist).map_err(|e| format!("merging histograms: {e}"))?;
                total.ops += tally.ops;
                total.sessions += tally.sessions;
                total.errors += tally.errors;
                for (k, v) in tally.codes {
                    *total.codes.entry(k).or_default() += v;
                }
            }
            Ok(Err(e)) => return Err(format!("a worker panicked: {e}").into()),
            Err(_) => return Err("workers did not stop in time; the server is not answering".into()),
        }
    }
    let h = &total.hist;
    let latency = if h.is_empty() {
        Latency::default()
    } else {
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    };
    Ok(BenchReport {
        measured_secs: cfg.duration.as_secs_f64(),
        config: cfg,
        ops: total.ops,
        sessions: total.sessions,
        errors: total.errors,
        error_codes: total.codes,
        latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
