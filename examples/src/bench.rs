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
//!
//! Two helpers serve the memory and restart measurements (`bench/compare.sh`):
//! [`open_sessions`] opens exactly N sessions and leaves them open (so the
//! server's RSS can be read with N live sessions, and a restart has N sessions
//! to recover), and [`probe`] waits until a server answers and has recovered
//! given sessions, reporting how long that took (restart time).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use hdrhistogram::Histogram;
use macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient;
use macp_wire::modes::decision;
use macp_wire::v1::{Envelope, GetSessionRequest, InitializeRequest, SendRequest, SessionState};
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
/// Longest run accepted, so a typo cannot start an endless load test; a
/// week, so soaks fit (latency is a fixed-size histogram whatever the
/// length).
pub const MAX_RUN: Duration = Duration::from_secs(7 * 24 * 3600);
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
    /// The server's process id, when it runs on this machine: its CPU time
    /// during the measured window is then reported (per Send, too).
    pub server_pid: Option<u32>,
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
    /// CPU seconds (user + system) the server process used in the measured
    /// window, when its pid was given.
    pub server_cpu_secs: Option<f64>,
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

    /// Server CPU per successful Send, in microseconds: the figure that
    /// carries over to a bigger machine, where throughput on two shared
    /// cores is bounded by the load generator too.
    pub fn server_cpu_us_per_op(&self) -> Option<f64> {
        self.server_cpu_secs.filter(|_| self.ops > 0).map(|c| c * 1e6 / self.ops as f64)
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
        if let (Some(cpu), Some(per_op)) = (self.server_cpu_secs, self.server_cpu_us_per_op()) {
            let _ = writeln!(s, "server CPU    {cpu:.2} s ({per_op:.1} µs per op)");
        }
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
            "server_cpu_s": self.server_cpu_secs.map(|c| (c * 1000.0).round() / 1000.0),
            "server_cpu_us_per_op": self.server_cpu_us_per_op().map(|c| (c * 10.0).round() / 10.0),
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
        let failure = send_outcome(r);
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
    let cpu = cfg.server_pid.map(|pid| tokio::spawn(server_cpu_in(pid, window)));
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
    let latency = latency_of(&total.hist);
    let server_cpu_secs = match cpu {
        Some(t) => Some(t.await.map_err(|e| format!("reading the server's CPU time: {e}"))??),
        None => None,
    };
    Ok(BenchReport {
        server_cpu_secs,
        measured_secs: cfg.duration.as_secs_f64(),
        config: cfg,
        ops: total.ops,
        sessions: total.sessions,
        errors: total.errors,
        error_codes: total.codes,
        latency,
    })
}

/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/PID/stat`, fixed
/// at 100 by the kernel's user-space ABI whatever the kernel's own tick.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system, all threads) process `pid` has used so far.
pub fn process_cpu_secs(pid: u32) -> crate::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat (is --server-pid a process on this machine?): {e}"))?;
    // The command name (field 2) may contain spaces and parentheses: the
    // fields after it start after the last ')'. utime and stime are fields
    // 14 and 15, so the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("malformed /proc/PID/stat")?;
    let mut fields = rest.split_whitespace().skip(11);
    let mut tick = || -> crate::Result<f64> {
        Ok(fields.next().ok_or("malformed /proc/PID/stat")?.parse::<u64>().map_err(|e| e.to_string())? as f64)
    };
    let (utime, stime) = (tick()?, tick()?);
    Ok((utime + stime) / USER_HZ)
}

/// The server's CPU seconds between the window's start and its end.
async fn server_cpu_in(pid: u32, window: Window) -> crate::Result<f64> {
    tokio::time::sleep_until(window.from.into()).await;
    let before = process_cpu_secs(pid)?;
    tokio::time::sleep_until(window.until.into()).await;
    Ok(process_cpu_secs(pid)? - before)
}

/// Longest [`open_sessions`] run: opening 100,000 sessions on a slow,
/// file-backed server can take minutes, but never this long.
pub const MAX_OPEN_RUN: Duration = Duration::from_secs(3600);
/// TTL of the sessions [`open_sessions`] opens: long enough that none expires
/// during the memory reading or a restart that follows it.
pub const OPEN_SESSION_TTL_MS: i64 = 3_600_000;
/// Failed SessionStarts after which [`open_sessions`] gives up (a server that
/// refuses this many is not going to reach N).
pub const MAX_OPEN_ERRORS: u64 = 1000;

/// The initiator of a session opened by [`open_sessions`], derived from its
/// id so that [`probe`] can read the session back (GetSession is allowed to
/// the initiator) knowing only the id. One fresh sender per session keeps
/// every sender far below the per-sender rate limits.
pub fn open_initiator(session_id: &str) -> String {
    format!("bench-open-{session_id}")
}

/// Opening exactly `sessions` sessions and leaving them open.
#[derive(Clone, Debug)]
pub struct OpenConfig {
    /// Server address (`host:port`), loopback only.
    pub addr: String,
    /// Sessions to open.
    pub sessions: u64,
    /// Concurrent workers, each sending one SessionStart at a time.
    pub concurrency: usize,
    /// HTTP/2 connections the workers are spread over.
    pub connections: usize,
    /// How identities are presented.
    pub auth: AuthMode,
}

/// What [`open_sessions`] did.
#[derive(Clone, Debug)]
pub struct OpenReport {
    /// The configuration that produced it.
    pub config: OpenConfig,
    /// Sessions the server accepted (and that are still open).
    pub opened: u64,
    /// SessionStarts that failed (refused Ack, gRPC error, or timeout).
    pub errors: u64,
    /// Failures by code, as in [`BenchReport::error_codes`].
    pub error_codes: BTreeMap<String, u64>,
    /// Wall time from the first SessionStart to the last Ack.
    pub elapsed_secs: f64,
    /// Per-SessionStart latency.
    pub latency: Latency,
    /// Ids of the first and the last session opened: what a restart must
    /// recover ([`probe`]'s `expect_sessions`). The last one is the most
    /// likely to be lost by a faulty shutdown or recovery.
    pub check_sessions: Vec<String>,
}

impl OpenReport {
    /// Sessions opened per second.
    pub fn sessions_per_sec(&self) -> f64 {
        self.opened as f64 / self.elapsed_secs.max(1e-9)
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let c = &self.config;
        let l = &self.latency;
        let mut s = String::new();
        let _ =
            writeln!(s, "workload      open-sessions ({} requested, TTL {} s)", c.sessions, OPEN_SESSION_TTL_MS / 1000);
        let _ = writeln!(s, "target        {}", c.addr);
        let _ = writeln!(
            s,
            "concurrency   {} over {} connection(s), auth {}",
            c.concurrency,
            c.connections,
            c.auth.as_str()
        );
        let _ = writeln!(
            s,
            "opened        {} in {:.1} s ({:.0} sessions/s)",
            self.opened,
            self.elapsed_secs,
            self.sessions_per_sec()
        );
        let _ = writeln!(s, "errors        {}", self.errors);
        for (k, v) in &self.error_codes {
            let _ = writeln!(s, "  {k:<30} {v}");
        }
        let _ = writeln!(s, "latency (µs)  p50 {}  p99 {}  max {}", l.p50, l.p99, l.max);
        let _ = writeln!(s, "check with    {}", self.check_sessions.join(" "));
        s
    }

    /// The same as one JSON line, for scripts.
    pub fn json(&self) -> String {
        let c = &self.config;
        let l = &self.latency;
        serde_json::json!({
            "workload": "open-sessions",
            "addr": c.addr,
            "requested": c.sessions,
            "concurrency": c.concurrency,
            "connections": c.connections,
            "auth": c.auth.as_str(),
            "ttl_ms": OPEN_SESSION_TTL_MS,
            "opened": self.opened,
            "elapsed_s": (self.elapsed_secs * 1000.0).round() / 1000.0,
            "sessions_per_s": (self.sessions_per_sec() * 10.0).round() / 10.0,
            "errors": self.errors,
            "error_codes": self.error_codes,
            "latency_us": { "p50": l.p50, "p99": l.p99, "max": l.max },
            "check_sessions": self.check_sessions,
        })
        .to_string()
    }
}

/// A session id with the time its SessionStart was acknowledged.
type Stamped = Option<(Instant, String)>;

/// One [`open_sessions`] worker's result: its tally and its first and last
/// opened session.
type OpenTally = (Tally, Stamped, Stamped);

/// Opens `cfg.sessions` decision sessions (one fresh initiator, see
/// [`open_initiator`], and one fresh participant each; TTL
/// [`OPEN_SESSION_TTL_MS`]) with `cfg.concurrency` closed-loop workers, and
/// leaves them open. A failed SessionStart is retried with a new session id,
/// so exactly `sessions` are opened unless more than [`MAX_OPEN_ERRORS`]
/// fail or the run exceeds [`MAX_OPEN_RUN`]; the report then says how many
/// were opened.
pub async fn open_sessions(cfg: OpenConfig) -> crate::Result<OpenReport> {
    require_loopback(&cfg.addr)?;
    if cfg.concurrency == 0 || cfg.connections == 0 || cfg.sessions == 0 {
        return Err("--sessions, --concurrency and --connections must be at least 1".into());
    }
    let mut channels = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        channels.push(connect(&cfg.addr).await?);
    }
    Raw::new(channels[0].clone())
        .initialize(InitializeRequest { supported_protocol_versions: vec![MACP_VERSION.into()], ..Default::default() })
        .await
        .map_err(|s| format!("Initialize failed: {s}"))?;

    // `claimed` counts sessions being opened or opened; a failure gives its
    // claim back so that another attempt takes its place.
    let claimed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + MAX_OPEN_RUN;
    let mut tasks = Vec::with_capacity(cfg.concurrency);
    for w in 0..cfg.concurrency {
        let mut client = Raw::new(channels[w % cfg.connections].clone());
        let (claimed, failed, auth, target) = (claimed.clone(), failed.clone(), cfg.auth, cfg.sessions);
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let (mut first, mut last) = (None, None);
            while Instant::now() < until && failed.load(Ordering::Relaxed) <= MAX_OPEN_ERRORS {
                if claimed.fetch_add(1, Ordering::Relaxed) >= target {
                    claimed.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
                let sid = ids::session_id();
                let initiator = open_initiator(&sid);
                let peer = format!("{initiator}-p");
                let mut payload = start_payload("bench.open", &[&peer]);
                payload.ttl_ms = OPEN_SESSION_TTL_MS;
                let env = envelope(&sid, "macp.mode.decision.v1", "SessionStart", &initiator, payload.encode_to_vec());
                let mut req = Request::new(SendRequest { envelope: Some(env) });
                authorize(&mut req, auth, &initiator)?;
                let t = Instant::now();
                let r = tokio::time::timeout(REQUEST_TIMEOUT, client.send(req)).await;
                let done = Instant::now();
                tally.hist.saturating_record((done - t).as_micros() as u64);
                match send_outcome(r) {
                    None => {
                        tally.ops += 1;
                        if first.is_none() {
                            first = Some((done, sid.clone()));
                        }
                        last = Some((done, sid));
                    }
                    Some(code) => {
                        claimed.fetch_sub(1, Ordering::Relaxed);
                        failed.fetch_add(1, Ordering::Relaxed);
                        tally.errors += 1;
                        *tally.codes.entry(code).or_default() += 1;
                    }
                }
            }
            Ok::<OpenTally, tonic::Status>((tally, first, last))
        }));
    }
    let mut total = Tally::new();
    let (mut first, mut last): (Stamped, Stamped) = (None, None);
    for t in tasks {
        let (tally, f, l) = t.await.map_err(|e| format!("a worker panicked: {e}"))??;
        total.hist.add(&tally.hist).map_err(|e| format!("merging histograms: {e}"))?;
        total.ops += tally.ops;
        total.errors += tally.errors;
        for (k, v) in tally.codes {
            *total.codes.entry(k).or_default() += v;
        }
        if f.as_ref().is_some_and(|f| first.as_ref().is_none_or(|x| f.0 < x.0)) {
            first = f;
        }
        if l.as_ref().is_some_and(|l| last.as_ref().is_none_or(|x| l.0 > x.0)) {
            last = l;
        }
    }
    let elapsed_secs = start.elapsed().as_secs_f64();
    let mut check_sessions: Vec<String> = first.into_iter().chain(last).map(|(_, s)| s).collect();
    check_sessions.dedup();
    Ok(OpenReport {
        config: cfg,
        opened: total.ops,
        errors: total.errors,
        error_codes: total.codes,
        elapsed_secs,
        latency: latency_of(&total.hist),
        check_sessions,
    })
}

/// Waiting for a server to be ready.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Server address (`host:port`), loopback only.
    pub addr: String,
    /// Give up after this long.
    pub timeout: Duration,
    /// How identities are presented (for GetSession).
    pub auth: AuthMode,
    /// Sessions (opened by [`open_sessions`]) that must be readable and OPEN
    /// before the server counts as ready; empty: Initialize alone suffices.
    pub expect_sessions: Vec<String>,
}

/// What [`probe`] saw.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// The configuration that produced it.
    pub config: ProbeConfig,
    /// Whether the server became ready before the timeout.
    pub ready: bool,
    /// Seconds from the probe's start to the first successful Initialize
    /// (the server answers RPCs), if it happened.
    pub answered_secs: Option<f64>,
    /// Seconds from the probe's start to readiness (Initialize and every
    /// expected session OPEN), or to giving up.
    pub elapsed_secs: f64,
    /// Attempts made (connect + Initialize + GetSessions).
    pub attempts: u64,
    /// Why the last failed attempt failed.
    pub last_error: Option<String>,
}

impl ProbeReport {
    /// A line for people.
    pub fn table(&self) -> String {
        let answered = self.answered_secs.map(|s| format!("{s:.3} s")).unwrap_or_else(|| "never".into());
        if self.ready {
            format!(
                "ready after {:.3} s (answering after {answered}; {} session(s) checked OPEN; {} attempt(s))\n",
                self.elapsed_secs,
                self.config.expect_sessions.len(),
                self.attempts
            )
        } else {
            format!(
                "NOT ready after {:.3} s (answering after {answered}; {} attempt(s)); last error: {}\n",
                self.elapsed_secs,
                self.attempts,
                self.last_error.as_deref().unwrap_or("-")
            )
        }
    }

    /// The same as one JSON line, for scripts.
    pub fn json(&self) -> String {
        let r3 = |s: f64| (s * 1000.0).round() / 1000.0;
        serde_json::json!({
            "workload": "probe",
            "addr": self.config.addr,
            "ready": self.ready,
            "answered_s": self.answered_secs.map(r3),
            "ready_s": r3(self.elapsed_secs),
            "attempts": self.attempts,
            "expect_sessions": self.config.expect_sessions,
            "last_error": self.last_error,
        })
        .to_string()
    }
}

/// Pause between failed probe attempts: short, so the measured restart time
/// overstates the real one by at most this much.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Retries connect + Initialize (+ GetSession of every expected session, as
/// its initiator, which must report OPEN) until all succeed or
/// `cfg.timeout` passes, and reports the time since the probe started. Run
/// at the same moment as a server start, that is the server's time to ready,
/// recovery included; checking the sessions makes sure "ready" means
/// "recovered", not merely "listening".
pub async fn probe(cfg: ProbeConfig) -> crate::Result<ProbeReport> {
    let target = require_loopback(&cfg.addr)?;
    let start = Instant::now();
    let deadline = start + cfg.timeout;
    let mut report = ProbeReport {
        config: cfg.clone(),
        ready: false,
        answered_secs: None,
        elapsed_secs: 0.0,
        attempts: 0,
        last_error: None,
    };
    loop {
        report.attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt =
            tokio::time::timeout(left.min(REQUEST_TIMEOUT), probe_once(&cfg, target, start, &mut report.answered_secs));
        match attempt.await {
            Ok(Ok(())) => {
                report.ready = true;
                break;
            }
            Ok(Err(e)) => report.last_error = Some(e.to_string()),
            // An attempt the probe's own deadline cut short says nothing
            // new: keep the error an earlier attempt got to the end of.
            Err(_) if left < REQUEST_TIMEOUT && report.last_error.is_some() => {}
            Err(_) => report.last_error = Some("attempt timed out".into()),
        }
        if Instant::now() + PROBE_INTERVAL >= deadline {
            break;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
    report.elapsed_secs = start.elapsed().as_secs_f64();
    Ok(report)
}

/// One probe attempt; records when Initialize first succeeded.
async fn probe_once(
    cfg: &ProbeConfig,
    target: std::net::SocketAddr,
    start: Instant,
    answered: &mut Option<f64>,
) -> crate::Result<()> {
    listener_present(target).await?;
    let mut client = Raw::new(connect(&cfg.addr).await?);
    client
        .initialize(InitializeRequest { supported_protocol_versions: vec![MACP_VERSION.into()], ..Default::default() })
        .await
        .map_err(|s| format!("Initialize: {s}"))?;
    answered.get_or_insert_with(|| start.elapsed().as_secs_f64());
    for sid in &cfg.expect_sessions {
        let mut req = Request::new(GetSessionRequest { session_id: sid.clone() });
        authorize(&mut req, cfg.auth, &open_initiator(sid))?;
        let md = client.get_session(req).await.map_err(|s| format!("GetSession {sid}: {s}"))?.into_inner();
        let state = md.metadata.map(|m| m.state).unwrap_or_default();
        if state != SessionState::Open as i32 {
            return Err(format!("session {sid} is in state {state}, not OPEN").into());
        }
    }
    Ok(())
}

/// Succeeds when a plain TCP connection to `target` reaches a listener.
///
/// A probe dials a port nobody listens on yet thousands of times. When that
/// port lies in the ephemeral range, a connect can pick the very same port as
/// its source and, by TCP simultaneous open, connect to itself; the socket
/// then holds the port the restarting server is about to bind (seen once: the
/// reference runtime failed with AddrInUse after its 166 s recovery). So a
/// self-connected socket is dropped at once, and the gRPC connection is only
/// dialled while a listener holds the port (the kernel then never hands the
/// port out as a source port).
async fn listener_present(target: std::net::SocketAddr) -> crate::Result<()> {
    let s = tokio::net::TcpStream::connect(target).await.map_err(|e| format!("cannot connect to {target}: {e}"))?;
    if s.local_addr()? == s.peer_addr()? {
        return Err(format!("connected to itself on {target} (nothing listens yet)").into());
    }
    Ok(())
}

/// Percentiles of a histogram (zeros when it is empty).
fn latency_of(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        mean: h.mean(),
    }
}

/// The failure code of a Send (`None`: accepted).
fn send_outcome(
    r: Result<Result<tonic::Response<macp_wire::v1::SendResponse>, tonic::Status>, tokio::time::error::Elapsed>,
) -> Option<String> {
    match r {
        Err(_) => Some("timeout".to_string()),
        Ok(Err(status)) => Some(format!("status:{:?}", status.code())),
        Ok(Ok(resp)) => match resp.into_inner().ack {
            Some(a) if a.ok => None,
            Some(a) => Some(format!("ack:{}", a.error.map(|e| e.code).unwrap_or_default())),
            None => Some("status:no-ack".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use macp_transport_grpc::config::Config;

    /// An in-process dev server on a free loopback port: its address, the
    /// sender that stops it, and its task (which ends once it has shut down).
    async fn server(storage: &[&str]) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let mut args = vec!["macp-runtime", "--dev", "--bind-addr", "127.0.0.1:0"];
        args.extend_from_slice(storage);
        let cfg = Config::parse_from(args).resolve().expect("config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            macp_transport_grpc::server::serve(cfg, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("server");
        });
        (addr, stop, task)
    }

    fn open_cfg(addr: &str, sessions: u64) -> OpenConfig {
        OpenConfig { addr: addr.into(), sessions, concurrency: 4, connections: 2, auth: AuthMode::Bearer }
    }

    fn probe_cfg(addr: &str, timeout: Duration, expect_sessions: Vec<String>) -> ProbeConfig {
        ProbeConfig { addr: addr.into(), timeout, auth: AuthMode::Bearer, expect_sessions }
    }

    #[tokio::test]
    async fn opens_exactly_n_sessions_and_the_probe_finds_them() {
        let (addr, _stop, _task) = server(&["--memory-only"]).await;
        let r = open_sessions(open_cfg(&addr, 37)).await.unwrap();
        assert_eq!((r.opened, r.errors), (37, 0), "{}", r.table());
        assert_eq!(r.check_sessions.len(), 2, "{}", r.table());
        let json: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(json["opened"], 37);

        let p = probe(probe_cfg(&addr, Duration::from_secs(30), r.check_sessions.clone())).await.unwrap();
        assert!(p.ready, "{}", p.table());
        // A session that does not exist is never "recovered".
        let missing = vec![ids::session_id()];
        // Long enough for a whole attempt on a busy machine (a 300 ms bound
        // ended the only attempt mid-way during a CI run).
        let p = probe(probe_cfg(&addr, Duration::from_secs(3), missing)).await.unwrap();
        assert!(!p.ready && p.answered_secs.is_some(), "{}", p.table());
        assert!(p.last_error.as_deref().is_some_and(|e| e.contains("GetSession")), "{}", p.table());
    }

    #[tokio::test]
    async fn probe_reports_a_server_that_is_not_there() {
        // Bind and release a port, so nothing listens on it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let p = probe(probe_cfg(&addr, Duration::from_millis(200), Vec::new())).await.unwrap();
        assert!(!p.ready && p.answered_secs.is_none(), "{}", p.table());
        let json: serde_json::Value = serde_json::from_str(&p.json()).unwrap();
        assert_eq!(json["ready"], false);
    }

    #[tokio::test]
    async fn sessions_survive_a_file_backed_restart() {
        let dir = std::env::temp_dir().join(format!("macp-bench-test-{}", ids::session_id()));
        let dir_arg = dir.to_str().unwrap().to_string();
        let (addr, stop, task) = server(&["--data-dir", &dir_arg]).await;
        let r = open_sessions(open_cfg(&addr, 20)).await.unwrap();
        assert_eq!(r.opened, 20, "{}", r.table());
        stop.send(()).unwrap();
        task.await.unwrap();

        let (addr, _stop, _task) = server(&["--data-dir", &dir_arg]).await;
        let p = probe(probe_cfg(&addr, Duration::from_secs(30), r.check_sessions)).await.unwrap();
        assert!(p.ready, "{}", p.table());
        let _ = std::fs::remove_dir_all(&dir);
    }

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
