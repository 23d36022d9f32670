//! Prometheus metrics: the registry, the typed handles the server updates,
//! and (in [`http`]) the endpoint that serves them with `/healthz` and
//! `/readyz`.
//!
//! Off unless `--metrics-addr` / `MACP_METRICS_ADDR` is set: then the
//! server builds one [`Metrics`] and hands an `Arc` of it to the RPC
//! handlers, the driver task and the hub; otherwise they hold `None` and a
//! disabled metric costs one branch.
//!
//! Why `prometheus-client`: it is the Prometheus project's own Rust client,
//! with no global registry (a server embedded twice in one test process
//! keeps two sets of numbers), typed label sets through derives, and three
//! small dependencies. The endpoint is served with the hyper already in the
//! tree through tonic (HTTP/1 only), not another web framework.
//!
//! Cost on the Send path (tens of thousands of messages a second): every
//! update is one to three relaxed atomic operations, without allocation and
//! without a lock. Label sets come from small fixed tables (the RPC, the
//! gRPC code, the built-in modes and their message types) whose counters are
//! looked up in the label family once and cached in a flat table, so later
//! updates skip the family's lock and hashing. Histograms are
//! [`AtomicHistogram`]s (fixed buckets, integer sums), because the crate's
//! own histogram takes a mutex per observation.
//!
//! # Metrics
//!
//! | name | type | labels | what |
//! | --- | --- | --- | --- |
//! | `macp_grpc_requests_total` | counter | `rpc`, `code` | RPC calls by method and gRPC status code (streams: the code of opening the stream) |
//! | `macp_envelopes_accepted_total` | counter | `mode`, `message_type` | envelopes entered into a session's accepted history (runtime-recorded SessionCancel/Suspend/Resume included), after they are durable |
//! | `macp_sessions_open` | gauge | `mode`, `state` = `open` / `suspended` | sessions held, by mode and state |
//! | `macp_sessions_started_total` | counter | | sessions created |
//! | `macp_sessions_resolved_total` | counter | | sessions resolved |
//! | `macp_sessions_expired_total` | counter | | sessions expired (TTL) |
//! | `macp_sessions_cancelled_total` | counter | | sessions cancelled |
//! | `macp_commit_batch_records` | histogram | | records per group commit |
//! | `macp_storage_sync_seconds` | histogram | | duration of a group commit's sync |
//! | `macp_send_duration_seconds` | histogram | | Send (and stream envelope frames) from arrival to Ack |
//! | `macp_stream_subscribers` | gauge | | live session subscribers (streams bound or subscribed to a session) |
//! | `macp_stream_subscribers_dropped_total` | counter | `reason` = `lagged` / `closed` | subscribers the hub dropped: fell behind, or their stream went away |
//! | `macp_connections_open` | gauge | | accepted TCP connections still open |
//! | `macp_connections_refused_total` | counter | | connections closed at once because `MACP_MAX_CONNECTIONS` were open |
//! | `macp_rate_limited_total` | counter | `budget` = `session_start` / `message` | requests refused by the per-sender rate limits |
//! | `macp_storage_bytes` | gauge | | bytes the storage backend holds (log plus index, or memory) |
//! | `macp_storage_segments` | gauge | | log segment files (file backend) |
//! | `macp_storage_retention_deleted_sessions_total` | counter | | ended sessions deleted past their retention |
//! | `macp_storage_evicted_sessions_total` | counter | | ended sessions dropped early by the memory history limit |
//! | `macp_storage_retired_segments_total` | counter | | log segments deleted |
//! | `macp_recovery_duration_seconds` | gauge | | how long the start-up recovery took |
//!
//! Mode and message type labels are bounded: a mode or message type outside
//! the built-in modes and the message types they define (an extension mode
//! registered at run time) is counted as `other`.

pub mod http;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use macp_kernel::Broadcast;
use macp_storage::Maintenance;
use macp_wire::v1::session_lifecycle_event::EventType;
use macp_wire::v1::SessionState;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::limits::Budget;

/// The RPCs of `MACPRuntimeService`, as the `rpc` label names them.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(missing_docs)]
pub enum Rpc {
    Initialize,
    Send,
    StreamSession,
    GetSession,
    CancelSession,
    SuspendSession,
    ResumeSession,
    GetManifest,
    ListModes,
    WatchModeRegistry,
    ListRoots,
    WatchRoots,
    ListExtModes,
    RegisterExtMode,
    UnregisterExtMode,
    PromoteMode,
    WatchSignals,
    ListSessions,
    WatchSessions,
    RegisterPolicy,
    UnregisterPolicy,
    GetPolicy,
    ListPolicies,
    WatchPolicies,
    WhatIfReplay,
    GetDecisionReceipt,
    GetReceiptKeys,
}

/// Number of [`Rpc`] variants.
const RPCS: usize = Rpc::GetReceiptKeys as usize + 1;

/// gRPC status codes, as the `code` label names them.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status code label (an index into [`CODES`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct GrpcCode(u8);

impl EncodeLabelValue for GrpcCode {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&CODES[self.0 as usize], encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    rpc: Rpc,
    code: GrpcCode,
}

/// The bounded label values of modes and message types: the kernel's
/// built-in modes and every message type they define, plus the
/// runtime-recorded control types, each table ending with `other`. Built
/// from the mode registry, so a new built-in mode is counted without a
/// change here.
struct Names {
    modes: Vec<Name>,
    message_types: Vec<Name>,
}

impl Names {
    fn builtin() -> Self {
        let descriptors: Vec<_> = macp_kernel::mode::builtin_modes().iter().map(|(m, _)| m.descriptor()).collect();
        let mut modes: Vec<Name> = descriptors.iter().map(|d| Name(d.mode.as_str().into())).collect();
        modes.push(Name(OTHER.into()));
        let mut message_types: Vec<Name> = Vec::new();
        let defined = descriptors.iter().flat_map(|d| d.message_types.iter().map(String::as_str));
        for t in defined.chain(macp_kernel::validate::RUNTIME_ONLY_TYPES) {
            if !message_types.iter().any(|n| &*n.0 == t) {
                message_types.push(Name(t.into()));
            }
        }
        message_types.push(Name(OTHER.into()));
        Names { modes, message_types }
    }

    /// The index of `name` in `table`, or of its last entry (`other`).
    fn index(table: &[Name], name: &str) -> usize {
        table[..table.len() - 1].iter().position(|n| &*n.0 == name).unwrap_or(table.len() - 1)
    }

    fn mode(&self, mode: &str) -> usize {
        Self::index(&self.modes, mode)
    }

    fn message_type(&self, t: &str) -> usize {
        Self::index(&self.message_types, t)
    }
}

/// The label value of anything outside the bounded tables.
const OTHER: &str = "other";

/// A label value shared by the tables and the label sets.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Name(Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// A label value out of a static table.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Static(&'static str);

impl EncodeLabelValue for Static {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvelopeLabels {
    mode: Name,
    message_type: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeStateLabels {
    mode: Name,
    state: Static,
}

/// The states a held session is in, as the `state` label of
/// `macp_sessions_open` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeldState {
    Open = 0,
    Suspended = 1,
}

impl HeldState {
    const ALL: [HeldState; 2] = [HeldState::Open, HeldState::Suspended];

    /// The held state `s` is, or `None` for a state no held session is in
    /// (ended, or not yet created).
    fn of(s: SessionState) -> Option<HeldState> {
        match s {
            SessionState::Open => Some(HeldState::Open),
            SessionState::Suspended => Some(HeldState::Suspended),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            HeldState::Open => "open",
            HeldState::Suspended => "suspended",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: Static,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    budget: Static,
}

/// Why the hub dropped a session subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Its queue was full: it fell behind the live stream.
    Lagged,
    /// Its stream had gone away.
    Closed,
}

/// A histogram with fixed buckets over integer observations, updated with
/// two relaxed atomic additions and no lock. Observations are in a raw
/// unit (nanoseconds, records); `scale` raw units make one exported base
/// unit (1e9 for seconds).
#[derive(Clone, Debug)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds (inclusive) in raw units, ascending.
    bounds: &'static [u64],
    scale: f64,
    /// One per bound, then the `+Inf` bucket; not cumulative.
    counts: Box<[AtomicU64]>,
    /// Sum of observations in raw units.
    sum: AtomicU64,
}

impl AtomicHistogram {
    fn new(bounds: &'static [u64], scale: f64) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        AtomicHistogram(Arc::new(HistogramInner { bounds, scale, counts, sum: AtomicU64::new(0) }))
    }

    /// Records one observation of `raw` units.
    pub fn observe(&self, raw: u64) {
        let h = &*self.0;
        let i = h.bounds.partition_point(|b| *b < raw);
        h.counts[i].fetch_add(1, Ordering::Relaxed);
        h.sum.fetch_add(raw, Ordering::Relaxed);
    }

    /// Records a duration (for histograms in seconds).
    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &*self.0;
        let mut buckets = Vec::with_capacity(h.counts.len());
        let mut count = 0;
        for (i, c) in h.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            let bound = h.bounds.get(i).map_or(f64::INFINITY, |b| *b as f64 / h.scale);
            buckets.push((bound, n));
        }
        let sum = h.sum.load(Ordering::Relaxed) as f64 / h.scale;
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Latency buckets in nanoseconds: 100 µs to 10 s.
const LATENCY_NS: &[u64] = &[
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Batch size buckets: powers of two up to the driver's largest batch.
const BATCH_RECORDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192];

/// Counters of a label family, looked up once each and then cached.
struct Cached<S> {
    family: Family<S, Counter>,
    slots: Box<[OnceLock<Counter>]>,
}

impl<S: Clone + std::hash::Hash + Eq> Cached<S> {
    fn new(family: Family<S, Counter>, n: usize) -> Self {
        Cached { family, slots: (0..n).map(|_| OnceLock::new()).collect() }
    }

    fn get(&self, i: usize, labels: impl FnOnce() -> S) -> &Counter {
        self.slots[i].get_or_init(|| self.family.get_or_create_owned(&labels()))
    }
}

/// The registry and every handle the server updates.
pub struct Metrics {
    registry: Registry,
    names: Names,
    requests: Cached<RequestLabels>,
    envelopes: Cached<EnvelopeLabels>,
    /// Per mode: `[open, suspended]`.
    sessions_open: Vec<[Gauge; 2]>,
    started: Counter,
    resolved: Counter,
    expired: Counter,
    cancelled: Counter,
    /// Records per group commit.
    pub batch_records: AtomicHistogram,
    /// Duration of a group commit's sync.
    pub sync_seconds: AtomicHistogram,
    /// Send, arrival to Ack.
    pub send_seconds: AtomicHistogram,
    subscribers: Gauge,
    dropped: [Counter; 2],
    rate_limited: [Counter; 2],
    connections: Gauge,
    connections_refused: Counter,
    storage_bytes: Gauge,
    storage_segments: Gauge,
    retention_deleted: Counter,
    evicted: Counter,
    retired_segments: Counter,
    recovery_seconds: Gauge<f64, AtomicU64>,
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("ready", &self.ready).finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered (at zero).
    pub fn new() -> Self {
        let mut r = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        r.register("macp_grpc_requests", "RPC calls by method and gRPC status code", requests.clone());
        let envelopes = Family::<EnvelopeLabels, Counter>::default();
        r.register(
            "macp_envelopes_accepted",
            "Envelopes entered into a session's accepted history, once durable",
            envelopes.clone(),
        );
        let open = Family::<ModeStateLabels, Gauge>::default();
        r.register("macp_sessions_open", "Sessions held (open or suspended), by mode and state", open.clone());
        let names = Names::builtin();
        let sessions_open = names
            .modes
            .iter()
            .map(|m| {
                HeldState::ALL.map(|state| {
                    open.get_or_create_owned(&ModeStateLabels { mode: m.clone(), state: Static(state.label()) })
                })
            })
            .collect();
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let started = counter(&mut r, "macp_sessions_started", "Sessions created");
        let resolved = counter(&mut r, "macp_sessions_resolved", "Sessions resolved");
        let expired = counter(&mut r, "macp_sessions_expired", "Sessions expired at their TTL");
        let cancelled = counter(&mut r, "macp_sessions_cancelled", "Sessions cancelled");
        let batch_records = AtomicHistogram::new(BATCH_RECORDS, 1.0);
        r.register("macp_commit_batch_records", "Records made durable per group commit", batch_records.clone());
        let sync_seconds = AtomicHistogram::new(LATENCY_NS, 1e9);
        r.register("macp_storage_sync_seconds", "Duration of a group commit's storage sync", sync_seconds.clone());
        let send_seconds = AtomicHistogram::new(LATENCY_NS, 1e9);
        r.register(
            "macp_send_duration_seconds",
            "Send and stream envelope frames, from arrival to the Ack",
            send_seconds.clone(),
        );
        let subscribers = Gauge::default();
        r.register("macp_stream_subscribers", "Live session subscribers of streams", subscribers.clone());
        let dropped_family = Family::<ReasonLabels, Counter>::default();
        r.register(
            "macp_stream_subscribers_dropped",
            "Session subscribers dropped: fell behind (lagged) or their stream went away (closed)",
            dropped_family.clone(),
        );
        let dropped =
            ["lagged", "closed"].map(|m| dropped_family.get_or_create_owned(&ReasonLabels { reason: Static(m) }));
        let limited_family = Family::<BudgetLabels, Counter>::default();
        r.register("macp_rate_limited", "Requests refused by the per-sender rate limits", limited_family.clone());
        let rate_limited = ["session_start", "message"]
            .map(|b| limited_family.get_or_create_owned(&BudgetLabels { budget: Static(b) }));
        let connections = Gauge::default();
        r.register("macp_connections_open", "Accepted TCP connections still open", connections.clone());
        let connections_refused = counter(
            &mut r,
            "macp_connections_refused",
            "Connections closed at once because the connection cap (MACP_MAX_CONNECTIONS) was reached",
        );
        let storage_bytes = Gauge::default();
        r.register(
            "macp_storage_bytes",
            "Bytes the storage backend holds (log plus index, or memory)",
            storage_bytes.clone(),
        );
        let storage_segments = Gauge::default();
        r.register("macp_storage_segments", "Log segment files (file backend)", storage_segments.clone());
        let retention_deleted = counter(
            &mut r,
            "macp_storage_retention_deleted_sessions",
            "Ended sessions deleted once past their history retention",
        );
        let evicted = counter(
            &mut r,
            "macp_storage_evicted_sessions",
            "Ended sessions dropped before their retention by the memory history limit",
        );
        let retired_segments = counter(&mut r, "macp_storage_retired_segments", "Log segments deleted");
        let recovery_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            "macp_recovery_duration_seconds",
            "How long the start-up recovery of storage took",
            recovery_seconds.clone(),
        );
        Metrics {
            registry: r,
            requests: Cached::new(requests, RPCS * CODES.len()),
            envelopes: Cached::new(envelopes, names.modes.len() * names.message_types.len()),
            names,
            sessions_open,
            started,
            resolved,
            expired,
            cancelled,
            batch_records,
            sync_seconds,
            send_seconds,
            subscribers,
            dropped,
            rate_limited,
            connections,
            connections_refused,
            storage_bytes,
            storage_segments,
            retention_deleted,
            evicted,
            retired_segments,
            recovery_seconds,
            ready: AtomicBool::new(false),
        }
    }

    /// The registry in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Counts one RPC call and its outcome.
    pub fn request(&self, rpc: Rpc, code: tonic::Code) {
        let code = (code as usize).min(CODES.len() - 1);
        let i = rpc as usize * CODES.len() + code;
        self.requests.get(i, || RequestLabels { rpc, code: GrpcCode(code as u8) }).inc();
    }

    /// Counts one request refused by a rate limit.
    pub fn rate_limited(&self, budget: Budget) {
        self.rate_limited[match budget {
            Budget::SessionStart => 0,
            Budget::Message => 1,
        }]
        .inc();
    }

    /// A connection was accepted under the cap.
    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    /// An accepted connection closed.
    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    /// A connection was refused: the cap was reached.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A session subscriber was added to the hub.
    pub fn subscriber_added(&self) {
        self.subscribers.inc();
    }

    /// `n` session subscribers left the hub (their session ended).
    pub fn subscribers_finished(&self, n: usize) {
        self.subscribers.dec_by(n as i64);
    }

    /// The hub dropped a subscriber.
    pub fn subscriber_dropped(&self, why: Dropped) {
        self.subscribers.dec();
        self.dropped[why as usize].inc();
    }

    /// Accounts for one durable broadcast (the driver calls it for each,
    /// before the hub delivers it): accepted envelopes and lifecycle events.
    pub fn broadcast(&self, b: &Broadcast) {
        match b {
            Broadcast::SessionEnvelope { envelope, .. } => {
                let names = &self.names;
                let (m, t) = (names.mode(&envelope.mode), names.message_type(&envelope.message_type));
                self.envelopes
                    .get(m * names.message_types.len() + t, || EnvelopeLabels {
                        mode: names.modes[m].clone(),
                        message_type: names.message_types[t].clone(),
                    })
                    .inc();
            }
            Broadcast::Lifecycle { event, session, previous, .. } => {
                let held = &self.sessions_open[self.names.mode(&session.mode)];
                let from = HeldState::of(*previous).map(|s| &held[s as usize]);
                let to = HeldState::of(session.state()).map(|s| &held[s as usize]);
                let counter = match event {
                    EventType::Created => Some(&self.started),
                    EventType::Resolved => Some(&self.resolved),
                    EventType::Expired => Some(&self.expired),
                    EventType::Cancelled => Some(&self.cancelled),
                    _ => None,
                };
                if let Some(c) = counter {
                    c.inc();
                }
                if let Some(g) = from {
                    g.dec();
                }
                if let Some(g) = to {
                    g.inc();
                }
            }
            _ => {}
        }
    }

    /// Sets the held-sessions gauges to what the kernel holds (after a
    /// recovery or a rebuild): the mode and state of every held session.
    pub fn set_open_sessions<S: AsRef<str>>(&self, sessions: impl IntoIterator<Item = (S, SessionState)>) {
        let mut counts = vec![[0i64; 2]; self.names.modes.len()];
        for (mode, state) in sessions {
            if let Some(s) = HeldState::of(state) {
                counts[self.names.mode(mode.as_ref())][s as usize] += 1;
            }
        }
        for (gauges, n) in self.sessions_open.iter().zip(counts) {
            for (g, n) in gauges.iter().zip(n) {
                g.set(n);
            }
        }
    }

    /// Accounts for one slice of storage upkeep.
    pub fn maintenance(&self, m: &Maintenance) {
        self.storage_bytes.set(i64::try_from(m.bytes).unwrap_or(i64::MAX));
        if let Some(s) = m.segments {
            self.storage_segments.set(i64::try_from(s).unwrap_or(i64::MAX));
        }
        self.retention_deleted.inc_by(m.expired_sessions);
        self.evicted.inc_by(m.evicted_sessions);
        self.retired_segments.inc_by(m.retired_segments);
    }

    /// Records how long the start-up recovery took.
    pub fn recovered_in(&self, d: Duration) {
        self.recovery_seconds.set(d.as_secs_f64());
    }

    /// Marks the server ready (`/readyz` answers 200 from now on).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether recovery finished and the gRPC server is serving.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_seconds() {
        let m = Metrics::new();
        m.send_seconds.observe_duration(Duration::from_micros(50));
        m.send_seconds.observe_duration(Duration::from_millis(3));
        m.send_seconds.observe_duration(Duration::from_secs(60));
        let text = m.encode();
        assert!(text.contains("macp_send_duration_seconds_bucket{le=\"0.0001\"} 1\n"), "{text}");
        assert!(text.contains("macp_send_duration_seconds_bucket{le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("macp_send_duration_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("macp_send_duration_seconds_count 3\n"), "{text}");
    }

    #[test]
    fn labels_are_bounded_and_cached() {
        let m = Metrics::new();
        m.request(Rpc::Send, tonic::Code::Ok);
        m.request(Rpc::Send, tonic::Code::Ok);
        m.request(Rpc::GetSession, tonic::Code::NotFound);
        let text = m.encode();
        assert!(text.contains("macp_grpc_requests_total{rpc=\"Send\",code=\"OK\"} 2\n"), "{text}");
        assert!(text.contains("macp_grpc_requests_total{rpc=\"GetSession\",code=\"NOT_FOUND\"} 1\n"), "{text}");
        let names = Names::builtin();
        assert_eq!(&*names.modes[names.mode("ext.custom.v1")].0, OTHER);
        assert_eq!(&*names.modes[names.mode("macp.mode.task.v1")].0, "macp.mode.task.v1");
        assert_eq!(&*names.message_types[names.message_type("Nope")].0, OTHER);
        assert_eq!(&*names.message_types[names.message_type("Vote")].0, "Vote");
        assert_eq!(&*names.message_types[names.message_type("SessionCancel")].0, "SessionCancel");
    }
}
