//! Workloads for storage tests and benchmarks: real kernel records (and the
//! summaries of the sessions they end) produced by driving a kernel with an
//! extension mode (a passthrough mode, so no built-in mode has to exist),
//! plus recovery through the pipeline and a scratch-directory helper.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use macp_kernel::macp_wire::storage::{Record, SessionSummary};
use macp_kernel::macp_wire::v1::{CommitmentPayload, Envelope, ModeDescriptor, SessionStartPayload};
use macp_kernel::macp_wire::Message as _;
use macp_kernel::{ControlOp, Effect, Identity, Input, Kernel, KernelConfig};
use macp_pipeline::{recover, Pipeline, RecoverOptions, RecoveryError, RecoveryReport};
use macp_storage::Storage;
use macp_storage_fs::SplitMix;

pub const T0: i64 = 1_700_000_000_000;
pub const MODE: &str = "ext.test.v1";

/// A kernel driven with random but valid traffic; collects its records.
pub struct Gen {
    pub k: Kernel,
    pub now: i64,
    rng: SplitMix,
    counter: u64,
    req: u64,
    modes: u32,
    /// Session ids started so far.
    pub sessions: Vec<String>,
    /// Every persisted record, in order.
    pub records: Vec<Record>,
    /// `(records persisted before it, summary)` of every session that ended.
    pub ended: Vec<(usize, SessionSummary)>,
    /// Kernel time when each record was persisted.
    pub times: Vec<i64>,
}

pub fn descriptor(mode: &str) -> ModeDescriptor {
    ModeDescriptor {
        mode: mode.into(),
        mode_version: "1.0.0".into(),
        message_types: vec!["SessionStart".into(), "Note".into(), "Commitment".into()],
        terminal_message_types: vec!["Commitment".into()],
        ..Default::default()
    }
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        let mut g = Gen {
            k: Kernel::new(KernelConfig::default()),
            now: T0,
            rng: SplitMix::new(seed),
            counter: 0,
            req: 0,
            modes: 0,
            sessions: Vec::new(),
            records: Vec::new(),
            ended: Vec::new(),
            times: Vec::new(),
        };
        g.run(Input::RegisterExtMode { request: 0, identity: Identity::new("admin"), descriptor: descriptor(MODE) });
        g
    }

    fn run(&mut self, input: Input) {
        for e in self.k.handle(self.now, input) {
            match e {
                Effect::Persist(r) => {
                    self.records.push(r);
                    self.times.push(self.now);
                }
                Effect::Ended(s) => self.ended.push((self.records.len(), *s)),
                _ => {}
            }
        }
        self.k.settle_ended();
    }

    fn next_req(&mut self) -> u64 {
        self.req += 1;
        self.req
    }

    pub fn sid(&mut self) -> String {
        self.counter += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.counter)
    }

    /// Starts a session and returns its id.
    pub fn start(&mut self, ttl_ms: i64) -> String {
        let sid = self.sid();
        let p = SessionStartPayload {
            intent: "storage test".into(),
            participants: vec!["I".into(), "A".into()],
            mode_version: "1.0.0".into(),
            configuration_version: "cfg-1".into(),
            ttl_ms,
            ..Default::default()
        };
        let env = self.env(&sid, "SessionStart", "I", p.encode_to_vec());
        let request = self.next_req();
        self.run(Input::Envelope { request, identity: Identity::new("I"), envelope: env });
        self.sessions.push(sid.clone());
        sid
    }

    fn env(&mut self, sid: &str, message_type: &str, sender: &str, payload: Vec<u8>) -> Envelope {
        self.counter += 1;
        Envelope {
            macp_version: "1.0".into(),
            mode: MODE.into(),
            message_type: message_type.into(),
            message_id: format!("m{}", self.counter),
            session_id: sid.into(),
            sender: sender.into(),
            timestamp_unix_ms: 0,
            payload,
        }
    }

    /// A Note of `len` payload bytes.
    pub fn note(&mut self, sid: &str, sender: &str, len: usize) {
        let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31)).collect();
        let env = self.env(sid, "Note", sender, payload);
        let request = self.next_req();
        self.run(Input::Envelope { request, identity: Identity::new(sender), envelope: env });
    }

    pub fn commit(&mut self, sid: &str) {
        let c = CommitmentPayload {
            commitment_id: "c1".into(),
            action: "done".into(),
            authority_scope: "test".into(),
            reason: "because".into(),
            mode_version: "1.0.0".into(),
            configuration_version: "cfg-1".into(),
            outcome_positive: true,
            ..Default::default()
        };
        let env = self.env(sid, "Commitment", "I", c.encode_to_vec());
        let request = self.next_req();
        self.run(Input::Envelope { request, identity: Identity::new("I"), envelope: env });
    }

    /// Lets `ms` pass and runs the kernel's timers.
    pub fn advance(&mut self, ms: i64) {
        self.now += ms;
        self.run(Input::Tick);
    }

    /// What was generated so far.
    pub fn workload(&self) -> Workload {
        Workload { records: self.records.clone(), ended: self.ended.clone(), times: self.times.clone() }
    }

    pub fn control(&mut self, sid: &str, op: ControlOp) {
        let request = self.next_req();
        self.run(Input::Control {
            request,
            identity: Identity::new("I"),
            op,
            session_id: sid.into(),
            reason: "test".into(),
        });
    }

    /// One random step; most produce a record, some (rejections) do not.
    pub fn step(&mut self) {
        let pick = self.rng.below(100);
        let live = if self.sessions.is_empty() { None } else { Some(self.rng.below(self.sessions.len() as u64)) };
        match (pick, live) {
            (0..=14, _) | (_, None) => {
                let ttl = 1_000 + self.rng.below(60_000) as i64;
                self.start(ttl);
            }
            (15..=69, Some(i)) => {
                let sid = self.sessions[i as usize].clone();
                let sender = if self.rng.below(2) == 0 { "I" } else { "A" };
                let len = self.rng.below(80) as usize;
                self.note(&sid, sender, len);
            }
            (70..=77, Some(i)) => {
                let sid = self.sessions[i as usize].clone();
                self.commit(&sid);
            }
            (78..=81, Some(i)) => {
                let sid = self.sessions[i as usize].clone();
                self.control(&sid, ControlOp::Cancel);
            }
            (82..=86, Some(i)) => {
                let sid = self.sessions[i as usize].clone();
                self.control(&sid, ControlOp::Suspend);
            }
            (87..=91, Some(i)) => {
                let sid = self.sessions[i as usize].clone();
                self.control(&sid, ControlOp::Resume);
            }
            (92..=97, _) => {
                self.now += self.rng.below(20_000) as i64;
                self.run(Input::Tick);
            }
            _ => {
                self.modes += 1;
                let d = descriptor(&format!("ext.extra{}.v1", self.modes));
                let request = self.next_req();
                self.run(Input::RegisterExtMode { request, identity: Identity::new("admin"), descriptor: d });
            }
        }
    }
}

/// Exactly `n` records of random valid traffic (deterministic per seed),
/// with the summaries of the sessions they end and the time of each.
pub struct Workload {
    pub records: Vec<Record>,
    pub ended: Vec<(usize, SessionSummary)>,
    pub times: Vec<i64>,
}

impl Workload {
    /// Summaries of the sessions whose terminal record is in `records[a..b]`.
    pub fn ended_in(&self, a: usize, b: usize) -> Vec<SessionSummary> {
        self.ended.iter().filter(|(at, _)| *at > a && *at <= b).map(|(_, s)| s.clone()).collect()
    }

    /// Summaries of sessions that ended within `records[..m]`.
    pub fn ended_before(&self, m: usize) -> impl Iterator<Item = &SessionSummary> {
        self.ended.iter().filter(move |(at, _)| *at <= m).map(|(_, s)| s)
    }

    /// The records of one session within `records[..m]`.
    pub fn history(&self, sid: &str, m: usize) -> Vec<Record> {
        self.records[..m].iter().filter(|r| r.session_id == sid).cloned().collect()
    }
}

pub fn workload_with_summaries(seed: u64, n: usize) -> Workload {
    let mut g = Gen::new(seed);
    while g.records.len() < n {
        g.step();
    }
    g.records.truncate(n);
    g.times.truncate(n);
    g.ended.retain(|(at, _)| *at <= n);
    Workload { records: g.records, ended: g.ended, times: g.times }
}

/// At least `n` records of random valid traffic (deterministic per seed).
pub fn workload(seed: u64, n: usize) -> Vec<Record> {
    workload_with_summaries(seed, n).records
}

/// The pipeline as the server builds it, over any storage.
pub type Pipe = Pipeline<u64, u64>;

/// Recovers from `storage` through the pipeline, as the server does.
pub fn recover_from(storage: &mut dyn Storage) -> Result<(Pipe, RecoveryReport), RecoveryError> {
    recover(KernelConfig::default(), storage, RecoverOptions::default())
}

/// `snaps[i]` is the kernel snapshot after applying `records[..i]`.
pub fn prefix_snapshots(records: &[Record]) -> Vec<Vec<u8>> {
    let mut k = Kernel::new(KernelConfig::default());
    let mut out = vec![k.snapshot()];
    for r in records {
        k.apply_record(r).expect("workload record applies");
        k.settle_ended();
        out.push(k.snapshot());
    }
    out
}

/// A kernel after `records`, built by plain replay: the reference state.
pub fn replay(records: &[Record]) -> Kernel {
    let mut k = Kernel::new(KernelConfig::default());
    for r in records {
        k.apply_record(r).expect("workload record applies");
    }
    k
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("MACP_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!("macp-storage-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
