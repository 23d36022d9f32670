//! A data-driven harness for the MACP spec's conformance vectors
//! (`conformance/vectors/*.json`, DIGEST §7).
//!
//! The vectors are the spec's executable statement of mode behaviour, and
//! macp-rs must pass them twice: against the kernel directly and against the
//! running gRPC server. Both runs share everything here — parsing and linting
//! the files, turning payload JSON into protobuf bytes, building envelopes and
//! judging the answers — so they can never disagree about what a vector means.
//! Only the way a message reaches the runtime differs, and that is behind the
//! [`Target`] trait.
//!
//! The module lives in `macp-wire` (behind the `conformance` feature) rather
//! than in a test crate because it depends only on the wire types, and both the
//! kernel crate and the transport crate already depend on `macp-wire`.
//!
//! Malformed vector files are reported as errors naming the file and the
//! offending field, never as panics, and typos (unknown keys, unknown payload
//! types, unknown payload fields) are errors rather than silently ignored, so
//! a broken vector cannot quietly test less than it claims.
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message as _;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::modes::{decision, handoff, multi_round, proposal, quorum, task};
use crate::v1::{Ack, CommitmentPayload, CommitmentRef, Envelope, PolicyDescriptor, SessionStartPayload, SessionState};

/// The protocol version every envelope of a run carries (DIGEST §7.2 step 3).
pub const MACP_VERSION: &str = "1.0";

// ----- vector types ------------------------------------------------------------------

/// One conformance vector: a scripted session with its expected outcome.
///
/// Field names follow the JSON keys exactly. Keys beginning with `_` (such as
/// `_comment`) are annotations for human readers and are kept in
/// [`Vector::annotations`]; any other unknown key is rejected by
/// [`Vector::check`], so a misspelt expectation cannot silently go unchecked.
#[derive(Clone, Debug, Deserialize)]
pub struct Vector {
    /// What the vector is about, for humans (optional in `schema.json`).
    #[serde(default)]
    pub description: Option<String>,
    /// Mode id of the session, e.g. `macp.mode.decision.v1`.
    pub mode: String,
    /// Sender of the SessionStart. Not necessarily a participant: initiator
    /// authority is role-based (SPEC-DELTA §1.4).
    pub initiator: String,
    /// `SessionStartPayload.participants`; may be empty (SPEC-DELTA §1.3).
    pub participants: Vec<String>,
    /// `SessionStartPayload.mode_version`.
    pub mode_version: String,
    /// `SessionStartPayload.configuration_version`.
    pub configuration_version: String,
    /// `SessionStartPayload.policy_version`; must name the inline policy when
    /// one is given. Absent means the empty string (the default policy).
    #[serde(default)]
    pub policy_version: String,
    /// `SessionStartPayload.ttl_ms`.
    pub ttl_ms: i64,
    /// A policy to register before the SessionStart.
    #[serde(default)]
    pub policy: Option<InlinePolicy>,
    /// The scripted messages, sent in order after the SessionStart.
    pub messages: Vec<Step>,
    /// The session state after the last message.
    pub expected_final_state: FinalState,
    /// Whether the session must (or must not) have a resolution.
    #[serde(default)]
    pub expect_resolution_present: Option<bool>,
    /// A JSON object that must be a subset of the resolving
    /// `CommitmentPayload` (see [`commitment_json`] for its shape).
    #[serde(default)]
    pub expected_resolution: Option<Value>,
    /// A JSON object that must be a subset of the mode state projection.
    #[serde(default)]
    pub expected_mode_state: Option<Value>,
    /// Whether the vector asks for a replay-equivalence check. The kernel
    /// suite replays every vector's records whatever this says, so the flag
    /// is only carried.
    #[serde(default)]
    pub verify_replay_equivalence: Option<bool>,
    /// Every other key: `_`-prefixed annotations, or typos that
    /// [`Vector::check`] reports.
    #[serde(flatten)]
    pub annotations: BTreeMap<String, Value>,
}

/// The inline policy of a vector, registered before its SessionStart so the
/// session can bind it through `policy_version`.
#[derive(Clone, Debug, Deserialize)]
pub struct InlinePolicy {
    /// The policy id; the vector's `policy_version` must equal it.
    pub policy_id: String,
    /// The mode the policy applies to, or `*`.
    pub mode: String,
    /// Rule schema version, 1, 2 or 3.
    pub schema_version: u32,
    /// Free text; RegisterPolicy requires it (RFC-MACP-0012 1.5.0), so the
    /// harness passes an absent one on as empty and lets the runtime refuse.
    #[serde(default)]
    pub description: String,
    /// The rules object; sent JSON-stringified, as RegisterPolicy expects.
    pub rules: Value,
    /// Annotations and typos, as for [`Vector::annotations`].
    #[serde(flatten)]
    pub annotations: BTreeMap<String, Value>,
}

/// One scripted message.
#[derive(Clone, Debug, Deserialize)]
pub struct Step {
    /// The sending identity (the runner authenticates as it).
    pub sender: String,
    /// Envelope `message_type`.
    pub message_type: String,
    /// Which protobuf message `payload` is, by fully-qualified name
    /// (`macp.modes.decision.v1.ProposalPayload`, `macp.v1.CommitmentPayload`).
    pub payload_type: String,
    /// The payload as JSON with proto field names; see [`encode_payload`].
    pub payload: Value,
    /// Whether the runtime must accept or reject the message.
    pub expect: Expectation,
    /// For rejections: the `Ack.error.code` the runtime must give.
    #[serde(default)]
    pub expected_error_code: Option<String>,
    /// Annotations and typos, as for [`Vector::annotations`].
    #[serde(flatten)]
    pub annotations: BTreeMap<String, Value>,
}

/// What a step expects of the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expectation {
    /// `Ack.ok && !Ack.duplicate`.
    Accept,
    /// `!Ack.ok`.
    Reject,
}

/// The session state a vector expects at the end, in the spelling the files
/// use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum FinalState {
    /// `SESSION_STATE_OPEN`.
    Open,
    /// `SESSION_STATE_RESOLVED`: a Commitment was accepted.
    Resolved,
    /// `SESSION_STATE_SUSPENDED`.
    Suspended,
    /// `SESSION_STATE_CANCELLED`.
    Cancelled,
    /// `SESSION_STATE_EXPIRED`.
    Expired,
}

impl FinalState {
    /// The wire state this corresponds to (DIGEST §7.2 step 6).
    pub fn session_state(self) -> SessionState {
        match self {
            FinalState::Open => SessionState::Open,
            FinalState::Resolved => SessionState::Resolved,
            FinalState::Suspended => SessionState::Suspended,
            FinalState::Cancelled => SessionState::Cancelled,
            FinalState::Expired => SessionState::Expired,
        }
    }
}

impl Vector {
    /// Parses one vector file's text and lints it with [`Vector::check`],
    /// so every structural problem surfaces before anything is sent.
    pub fn parse(text: &str) -> Result<Vector, String> {
        let v: Vector = serde_json::from_str(text).map_err(|e| format!("not a valid vector: {e}"))?;
        v.check()?;
        Ok(v)
    }

    /// Lints the vector the way the spec's `lint_fixtures.py` does, and also
    /// encodes every payload, so a vector that cannot mean what it says is an
    /// error here rather than a confusing failure later (or worse, a pass).
    ///
    /// Checks: no unknown keys (other than `_`-prefixed annotations); every
    /// accepted sender is a participant or the initiator (whose authority is
    /// role-based, so it need not be listed); the inline policy's id equals
    /// `policy_version`, its schema version is 1, 2 or 3, its mode is `*` or
    /// the vector's mode and its rules are an object; `expected_error_code`
    /// only on rejections; expectations are objects; every payload encodes
    /// under its fully-qualified type name.
    pub fn check(&self) -> Result<(), String> {
        unknown_keys("", &self.annotations)?;
        if let Some(p) = &self.policy {
            unknown_keys("policy.", &p.annotations)?;
            if p.policy_id != self.policy_version {
                return Err(format!(
                    "policy.policy_id {:?} differs from policy_version {:?}; the session would not bind it",
                    p.policy_id, self.policy_version
                ));
            }
            if !matches!(p.schema_version, 1..=3) {
                return Err(format!("policy.schema_version must be 1, 2 or 3, not {}", p.schema_version));
            }
            if p.mode != "*" && p.mode != self.mode {
                return Err(format!("policy.mode {:?} is neither \"*\" nor the vector's mode {:?}", p.mode, self.mode));
            }
            if !p.rules.is_object() {
                return Err("policy.rules must be a JSON object".to_string());
            }
        }
        for (i, s) in self.messages.iter().enumerate() {
            let at = format!("messages[{i}]");
            unknown_keys(&format!("{at}."), &s.annotations)?;
            if s.expect == Expectation::Accept && !self.participants.contains(&s.sender) && s.sender != self.initiator {
                return Err(format!(
                    "{at}: sender {} is expected to be accepted but is neither a participant nor the initiator",
                    s.sender
                ));
            }
            if s.expect == Expectation::Accept && s.expected_error_code.is_some() {
                return Err(format!("{at}: expected_error_code is only meaningful with \"expect\": \"reject\""));
            }
            encode_payload(&s.payload_type, &s.payload).map_err(|e| format!("{at}.payload: {e}"))?;
        }
        if self.expected_resolution.as_ref().is_some_and(|r| !r.is_object()) {
            return Err("expected_resolution must be a JSON object".to_string());
        }
        if self.expected_resolution.is_some() && self.expect_resolution_present == Some(false) {
            return Err("expected_resolution contradicts \"expect_resolution_present\": false".to_string());
        }
        if self.expected_mode_state.as_ref().is_some_and(|r| !r.is_object()) {
            return Err("expected_mode_state must be a JSON object".to_string());
        }
        Ok(())
    }
}

fn unknown_keys(prefix: &str, extra: &BTreeMap<String, Value>) -> Result<(), String> {
    match extra.keys().find(|k| !k.starts_with('_')) {
        Some(k) => Err(format!(
            "unknown key \"{prefix}{k}\" (annotations must start with '_'; anything else is probably a typo)"
        )),
        None => Ok(()),
    }
}

// ----- loading -----------------------------------------------------------------------

/// One vector file as loaded: its file name and either the vector or why it
/// could not be used. Keeping broken files in the list (instead of failing
/// the whole load) lets a test report every problem in one run.
#[derive(Clone, Debug)]
pub struct VectorFile {
    /// The file name, e.g. `decision_happy_path.json`: how failures are named.
    pub name: String,
    /// The parsed and linted vector, or the reason it is unusable.
    pub vector: Result<Vector, String>,
}

/// Loads and lints one vector file.
pub fn load_file(path: &Path) -> Result<Vector, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Vector::parse(&text)
}

/// The JSON Schema of the fixture format, which the spec ships beside the
/// fixtures themselves; it describes vectors and is not one.
pub const FIXTURE_SCHEMA_FILE: &str = "schema.json";

/// Loads every `*.json` file of `dir` except [`FIXTURE_SCHEMA_FILE`], sorted
/// by file name so runs and reports are reproducible. Subdirectories (such as
/// `cmt-hash/`, whose vectors are not session transcripts) are not entered.
/// The outer error is for a directory that cannot be listed; a file that
/// cannot be read, parsed or linted becomes a [`VectorFile`] carrying its
/// error.
pub fn load_dir(dir: &Path) -> Result<Vec<VectorFile>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?.path();
        let is_schema = path.file_name().is_some_and(|n| n == FIXTURE_SCHEMA_FILE);
        if path.is_file() && !is_schema && path.extension().is_some_and(|x| x == "json") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|p| VectorFile {
            name: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            vector: load_file(&p),
        })
        .collect())
}

// ----- payload encoding --------------------------------------------------------------

/// Encodes one payload type from JSON; `&str` is the name used in errors.
type Encoder = fn(&Value, &str) -> Result<Vec<u8>, String>;

/// Builds a prost message from a JSON object field by field. Listing every
/// field (no `..Default::default()`) makes the compiler flag a schema change,
/// and [`Fields::finish`] rejects keys the message does not have.
macro_rules! encoder {
    ($($ty:ident)::+ { $($field:ident: $kind:ident),* $(,)? }) => {
        |json: &Value, name: &str| -> Result<Vec<u8>, String> {
            let mut f = Fields::new(name, json)?;
            let msg = $($ty)::+ { $($field: f.$kind(stringify!($field))?),* };
            f.finish()?;
            Ok(msg.encode_to_vec())
        }
    };
}

/// Every payload type the vectors may name, by its fully-qualified protobuf
/// name (the only form the spec's `schema.json` allows since the vectors were
/// renamed), with its encoder. Six modes plus the core Commitment.
const PAYLOAD_TYPES: &[(&str, Encoder)] = &[
    // decision (RFC-MACP-0007)
    (
        "macp.modes.decision.v1.ProposalPayload",
        encoder!(decision::ProposalPayload {
            proposal_id: string,
            option: string,
            rationale: string,
            supporting_data: bytes
        }),
    ),
    (
        "macp.modes.decision.v1.EvaluationPayload",
        encoder!(decision::EvaluationPayload {
            proposal_id: string,
            recommendation: string,
            confidence: double,
            reason: string
        }),
    ),
    (
        "macp.modes.decision.v1.ObjectionPayload",
        encoder!(decision::ObjectionPayload { proposal_id: string, reason: string, severity: string }),
    ),
    (
        "macp.modes.decision.v1.VotePayload",
        encoder!(decision::VotePayload { proposal_id: string, vote: string, reason: string }),
    ),
    // proposal (RFC-MACP-0008)
    (
        "macp.modes.proposal.v1.ProposalPayload",
        encoder!(proposal::ProposalPayload {
            proposal_id: string,
            title: string,
            summary: string,
            details: bytes,
            tags: strings
        }),
    ),
    (
        "macp.modes.proposal.v1.CounterProposalPayload",
        encoder!(proposal::CounterProposalPayload {
            proposal_id: string,
            supersedes_proposal_id: string,
            title: string,
            summary: string,
            details: bytes
        }),
    ),
    ("macp.modes.proposal.v1.AcceptPayload", encoder!(proposal::AcceptPayload { proposal_id: string, reason: string })),
    (
        "macp.modes.proposal.v1.RejectPayload",
        encoder!(proposal::RejectPayload { proposal_id: string, terminal: boolean, reason: string }),
    ),
    (
        "macp.modes.proposal.v1.WithdrawPayload",
        encoder!(proposal::WithdrawPayload { proposal_id: string, reason: string }),
    ),
    // task (RFC-MACP-0009)
    (
        "macp.modes.task.v1.TaskRequestPayload",
        encoder!(task::TaskRequestPayload {
            task_id: string,
            title: string,
            instructions: string,
            requested_assignee: string,
            input: bytes,
            deadline_unix_ms: int64
        }),
    ),
    (
        "macp.modes.task.v1.TaskAcceptPayload",
        encoder!(task::TaskAcceptPayload { task_id: string, assignee: string, reason: string }),
    ),
    (
        "macp.modes.task.v1.TaskRejectPayload",
        encoder!(task::TaskRejectPayload { task_id: string, assignee: string, reason: string }),
    ),
    (
        "macp.modes.task.v1.TaskUpdatePayload",
        encoder!(task::TaskUpdatePayload {
            task_id: string,
            status: string,
            progress: double,
            message: string,
            partial_output: bytes
        }),
    ),
    (
        "macp.modes.task.v1.TaskCompletePayload",
        encoder!(task::TaskCompletePayload { task_id: string, assignee: string, output: bytes, summary: string }),
    ),
    (
        "macp.modes.task.v1.TaskFailPayload",
        encoder!(task::TaskFailPayload {
            task_id: string,
            assignee: string,
            error_code: string,
            reason: string,
            retryable: boolean
        }),
    ),
    // handoff (RFC-MACP-0010)
    (
        "macp.modes.handoff.v1.HandoffOfferPayload",
        encoder!(handoff::HandoffOfferPayload {
            handoff_id: string,
            target_participant: string,
            scope: string,
            reason: string
        }),
    ),
    (
        "macp.modes.handoff.v1.HandoffContextPayload",
        encoder!(handoff::HandoffContextPayload { handoff_id: string, content_type: string, context: bytes }),
    ),
    (
        "macp.modes.handoff.v1.HandoffAcceptPayload",
        encoder!(handoff::HandoffAcceptPayload {
            handoff_id: string,
            accepted_by: string,
            reason: string,
            implicit: boolean
        }),
    ),
    (
        "macp.modes.handoff.v1.HandoffDeclinePayload",
        encoder!(handoff::HandoffDeclinePayload { handoff_id: string, declined_by: string, reason: string }),
    ),
    // quorum (RFC-MACP-0011)
    (
        "macp.modes.quorum.v1.ApprovalRequestPayload",
        encoder!(quorum::ApprovalRequestPayload {
            request_id: string,
            action: string,
            summary: string,
            details: bytes,
            required_approvals: uint32
        }),
    ),
    ("macp.modes.quorum.v1.ApprovePayload", encoder!(quorum::ApprovePayload { request_id: string, reason: string })),
    ("macp.modes.quorum.v1.RejectPayload", encoder!(quorum::RejectPayload { request_id: string, reason: string })),
    ("macp.modes.quorum.v1.AbstainPayload", encoder!(quorum::AbstainPayload { request_id: string, reason: string })),
    // multi_round (ext.multi_round.v1)
    ("macp.modes.multi_round.v1.ContributePayload", encoder!(multi_round::ContributePayload { value: string })),
    // core
    (
        "macp.v1.CommitmentPayload",
        encoder!(CommitmentPayload {
            commitment_id: string,
            action: string,
            authority_scope: string,
            reason: string,
            mode_version: string,
            policy_version: string,
            configuration_version: string,
            outcome_positive: boolean,
            supersedes: commitment_ref
        }),
    ),
];

/// Every payload type [`encode_payload`] understands, by full protobuf name:
/// for tests that want to prove coverage and for error messages.
pub fn payload_types() -> impl Iterator<Item = &'static str> {
    PAYLOAD_TYPES.iter().map(|(f, _)| *f)
}

/// Encodes a vector's payload JSON as the protobuf message named by
/// `payload_type`, its fully-qualified protobuf name
/// (`macp.modes.decision.v1.ProposalPayload`, `macp.v1.CommitmentPayload`),
/// following DIGEST §7.2 step 4 and SPEC-DELTA §1:
///
/// * keys are proto field names; a key the message lacks is an error, as is
///   an unknown payload type — both are almost always vector typos;
/// * strings go into string fields, JSON numbers into numeric fields
///   (integers must be whole and in range), booleans into bool fields;
/// * a `bytes` field takes a JSON string (its UTF-8 bytes) or an array of
///   integers 0–255;
/// * a missing key or `null` takes the proto default (note: some SDKs default
///   a missing `outcome_positive` to true; here it is proto's false, and every
///   vector sets it explicitly).
pub fn encode_payload(payload_type: &str, payload: &Value) -> Result<Vec<u8>, String> {
    let (name, encode) = PAYLOAD_TYPES.iter().find(|(f, _)| *f == payload_type).ok_or_else(|| {
        let known: Vec<&str> = payload_types().collect();
        format!("unknown payload_type {payload_type:?}; known (fully-qualified protobuf names): {}", known.join(", "))
    })?;
    encode(payload, name)
}

/// A JSON object being consumed as the fields of one protobuf message.
struct Fields<'a> {
    name: String,
    obj: &'a Map<String, Value>,
    used: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(name: &str, json: &'a Value) -> Result<Self, String> {
        match json {
            Value::Object(obj) => Ok(Fields { name: name.to_string(), obj, used: Vec::new() }),
            other => Err(format!("{name}: the payload must be a JSON object, not {}", kind(other))),
        }
    }

    /// The value of `field`, or `None` when absent or null (proto default).
    fn get(&mut self, field: &'static str) -> Option<&'a Value> {
        self.used.push(field);
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn wrong(&self, field: &str, want: &str, got: &Value) -> String {
        format!("{}.{field}: expected {want}, got {}", self.name, kind(got))
    }

    fn string(&mut self, field: &'static str) -> Result<String, String> {
        match self.get(field) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.wrong(field, "a string", v)),
        }
    }

    fn strings(&mut self, field: &'static str) -> Result<Vec<String>, String> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(self.wrong(&format!("{field}[{i}]"), "a string", v)),
                })
                .collect(),
            Some(v) => Err(self.wrong(field, "an array of strings", v)),
        }
    }

    fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, String> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(s.as_bytes().to_vec()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64()
                        .and_then(|n| u8::try_from(n).ok())
                        .ok_or_else(|| self.wrong(&format!("{field}[{i}]"), "an integer 0-255", v))
                })
                .collect(),
            Some(v) => Err(self.wrong(field, "bytes (a UTF-8 string or an array of integers 0-255)", v)),
        }
    }

    fn uint32(&mut self, field: &'static str) -> Result<u32, String> {
        match self.get(field) {
            None => Ok(0),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.wrong(field, "an integer 0..=4294967295 (uint32)", v)),
        }
    }

    fn int64(&mut self, field: &'static str) -> Result<i64, String> {
        match self.get(field) {
            None => Ok(0),
            Some(v) => v.as_i64().ok_or_else(|| self.wrong(field, "an integer in int64 range", v)),
        }
    }

    fn double(&mut self, field: &'static str) -> Result<f64, String> {
        match self.get(field) {
            None => Ok(0.0),
            Some(v) => v.as_f64().ok_or_else(|| self.wrong(field, "a number", v)),
        }
    }

    fn boolean(&mut self, field: &'static str) -> Result<bool, String> {
        match self.get(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong(field, "true or false", v)),
        }
    }

    /// `CommitmentPayload.supersedes`, the only nested message any vector
    /// payload can carry.
    fn commitment_ref(&mut self, field: &'static str) -> Result<Option<CommitmentRef>, String> {
        let Some(v) = self.get(field) else { return Ok(None) };
        let mut f = Fields::new(&format!("{}.{field}", self.name), v)?;
        let r = CommitmentRef { session_id: f.string("session_id")?, commitment_hash: f.string("commitment_hash")? };
        f.finish()?;
        Ok(Some(r))
    }

    /// Rejects keys the message does not have.
    fn finish(self) -> Result<(), String> {
        match self.obj.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(k) => Err(format!("{}: unknown field {k:?}; the message has: {}", self.name, self.used.join(", "))),
            None => Ok(()),
        }
    }
}

/// A short description of a JSON value for error messages.
fn kind(v: &Value) -> String {
    let text = v.to_string();
    let shown =
        if text.chars().count() > 40 { format!("{}…", text.chars().take(40).collect::<String>()) } else { text };
    let what = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{what} ({shown})")
}

// ----- building requests -------------------------------------------------------------

/// The SessionStart payload a vector opens its session with (DIGEST §7.2
/// step 3): its participants, version fields and ttl, with an empty intent.
pub fn session_start_payload(v: &Vector) -> SessionStartPayload {
    SessionStartPayload {
        intent: String::new(),
        participants: v.participants.clone(),
        mode_version: v.mode_version.clone(),
        configuration_version: v.configuration_version.clone(),
        policy_version: v.policy_version.clone(),
        ttl_ms: v.ttl_ms,
        ..Default::default()
    }
}

/// The RegisterPolicy descriptor for a vector's inline policy, with the rules
/// JSON-stringified as the RPC carries them.
pub fn policy_descriptor(p: &InlinePolicy) -> Result<PolicyDescriptor, String> {
    let rules = serde_json::to_string(&p.rules).map_err(|e| format!("policy.rules cannot be serialized: {e}"))?;
    Ok(PolicyDescriptor {
        policy_id: p.policy_id.clone(),
        mode: p.mode.clone(),
        description: p.description.clone(),
        rules,
        schema_version: p.schema_version,
        registered_at_unix_ms: 0,
    })
}

/// The envelope for one message of a run: the session's mode and id, the
/// step's sender (which the target must authenticate as) and type, and the
/// encoded payload.
pub fn step_envelope(
    v: &Vector,
    step: &Step,
    session_id: &str,
    message_id: &str,
    now_unix_ms: i64,
) -> Result<Envelope, String> {
    Ok(Envelope {
        macp_version: MACP_VERSION.to_string(),
        mode: v.mode.clone(),
        message_type: step.message_type.clone(),
        message_id: message_id.to_string(),
        session_id: session_id.to_string(),
        sender: step.sender.clone(),
        timestamp_unix_ms: now_unix_ms,
        payload: encode_payload(&step.payload_type, &step.payload)?,
    })
}

/// The SessionStart envelope of a run, sent by the vector's initiator.
pub fn start_envelope(v: &Vector, session_id: &str, message_id: &str, now_unix_ms: i64) -> Envelope {
    Envelope {
        macp_version: MACP_VERSION.to_string(),
        mode: v.mode.clone(),
        message_type: "SessionStart".to_string(),
        message_id: message_id.to_string(),
        session_id: session_id.to_string(),
        sender: v.initiator.clone(),
        timestamp_unix_ms: now_unix_ms,
        payload: session_start_payload(v).encode_to_vec(),
    }
}

/// A fresh session id in lowercase UUIDv4 shape, which strict session-id
/// validation accepts. Unique across processes (clock, process id and a
/// counter are mixed in) so runs against a long-lived server never collide;
/// not cryptographically random, which conformance does not need.
pub fn fresh_session_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hi = splitmix64(nanos ^ (u64::from(std::process::id()) << 32));
    let lo = splitmix64(hi ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ nanos.rotate_left(17));
    uuid_v4_shape(hi, lo)
}

/// Formats 128 bits as a UUIDv4 (version nibble 4, variant 10xx), for
/// targets that want deterministic ids (e.g. from a counter).
pub fn uuid_v4_shape(hi: u64, lo: u64) -> String {
    let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// A deterministic UUIDv4-shaped id for counter value `n`: distinct `n` give
/// distinct ids that, like random UUIDs, differ from their first characters
/// (a formatted counter shares a long prefix, which makes ordered-map lookups
/// unrealistically slow in benchmarks).
pub fn counter_uuid_v4(n: u64) -> String {
    uuid_v4_shape(splitmix64(n), splitmix64(n ^ 0x5555_5555_5555_5555))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ----- comparing ---------------------------------------------------------------------

/// The JSON view of a CommitmentPayload that `expected_resolution` is
/// matched against: every field under its proto name, `supersedes` as an
/// object or null.
pub fn commitment_json(c: &CommitmentPayload) -> Value {
    serde_json::json!({
        "commitment_id": c.commitment_id,
        "action": c.action,
        "authority_scope": c.authority_scope,
        "reason": c.reason,
        "mode_version": c.mode_version,
        "policy_version": c.policy_version,
        "configuration_version": c.configuration_version,
        "outcome_positive": c.outcome_positive,
        "supersedes": c.supersedes.as_ref().map(|r| serde_json::json!({
            "session_id": r.session_id,
            "commitment_hash": r.commitment_hash,
        })),
    })
}

/// Whether `expected` is a subset of `actual`, the comparison the vectors use
/// for `expected_resolution` and `expected_mode_state`: objects match when
/// every expected key is present and matches (extra actual keys are fine);
/// arrays need equal length and element-wise matches; numbers compare by
/// value (`1` equals `1.0`); anything else must be equal.
///
/// Returns `None` on a match, else a description of the first mismatch with
/// its path, e.g. `$.votes.p1["agent://a"].vote: expected "APPROVE", got "REJECT"`.
pub fn subset_mismatch(actual: &Value, expected: &Value) -> Option<String> {
    let mut path = String::from("$");
    walk(actual, expected, &mut path)
}

fn walk(actual: &Value, expected: &Value, path: &mut String) -> Option<String> {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            for (k, ev) in e {
                let len = path.len();
                push_key(path, k);
                let r = match a.get(k) {
                    None => {
                        let have: Vec<&str> = a.keys().map(String::as_str).collect();
                        Some(format!("{path}: missing (present keys: {})", have.join(", ")))
                    }
                    Some(av) => walk(av, ev, path),
                };
                path.truncate(len);
                if r.is_some() {
                    return r;
                }
            }
            None
        }
        (Value::Array(a), Value::Array(e)) => {
            if a.len() != e.len() {
                return Some(format!("{path}: expected {} elements, got {}: {}", e.len(), a.len(), actual));
            }
            for (i, (av, ev)) in a.iter().zip(e).enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                let r = walk(av, ev, path);
                path.truncate(len);
                if r.is_some() {
                    return r;
                }
            }
            None
        }
        (Value::Number(a), Value::Number(e)) if numbers_equal(a, e) => None,
        _ if actual == expected => None,
        _ => Some(format!("{path}: expected {expected}, got {actual}")),
    }
}

fn numbers_equal(a: &serde_json::Number, e: &serde_json::Number) -> bool {
    match (a.as_i64(), e.as_i64(), a.as_u64(), e.as_u64()) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Some(x), Some(y)) => x == y,
        _ => a.as_f64().is_some_and(|x| e.as_f64() == Some(x)),
    }
}

fn push_key(path: &mut String, k: &str) {
    let plain = !k.is_empty()
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        let _ = write!(path, ".{k}");
    } else {
        let _ = write!(path, "[{}]", Value::String(k.to_string()));
    }
}

// ----- running -----------------------------------------------------------------------

/// The answer to a question a target may be unable to answer: the gRPC API,
/// for instance, exposes neither mode state nor resolution bytes.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation<T> {
    /// The target observed this.
    Observed(T),
    /// The target has no way to observe it; the runner falls back or skips
    /// the check and lists it in [`Outcome::unobserved`].
    Unobservable,
}

/// A runtime under test, however it is reached. The kernel test drives a
/// `Kernel` in-process; a gRPC test drives a server over the network. Errors
/// (`Err`) are for harness or transport failures, not protocol rejections,
/// which come back as `Ack`s.
pub trait Target {
    /// Registers a vector's inline policy (RegisterPolicy) with an identity
    /// allowed to manage the registry.
    fn register_policy(&mut self, descriptor: PolicyDescriptor) -> Result<(), String>;

    /// Sends one envelope authenticated as `envelope.sender` (a dev bearer
    /// token equal to the sender, for a server) and returns the Ack.
    fn send(&mut self, envelope: Envelope) -> Result<Ack, String>;

    /// The session's current state (GetSession).
    fn session_state(&mut self, session_id: &str) -> Result<SessionState, String>;

    /// The resolving Commitment's payload bytes, `None` if unresolved. The
    /// default is [`Observation::Unobservable`]: the runner then uses the
    /// Commitment it saw accepted.
    fn resolution(&mut self, session_id: &str) -> Result<Observation<Option<Vec<u8>>>, String> {
        let _ = session_id;
        Ok(Observation::Unobservable)
    }

    /// The session's mode state projection as JSON. The default is
    /// [`Observation::Unobservable`]: `expected_mode_state` is then skipped.
    fn mode_projection(&mut self, session_id: &str) -> Result<Observation<Value>, String> {
        let _ = session_id;
        Ok(Observation::Unobservable)
    }

    /// The clock envelope timestamps are taken from; must be close to the
    /// target's own clock, since SessionStart timestamps are skew-checked.
    fn now_unix_ms(&mut self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }

    /// A session id that has never been used on this target.
    fn fresh_session_id(&mut self) -> String {
        fresh_session_id()
    }
}

/// What a passing run did, for callers that want to follow up (inspect or
/// clean up the session) or report checks the target could not make.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The session the run opened.
    pub session_id: String,
    /// Expectations that were not checked because the target could not
    /// observe them (`"expected_mode_state"`), or were checked against the
    /// runner's own record instead of the target (`"resolution"`).
    pub unobserved: Vec<&'static str>,
}

/// Runs one vector against a target (DIGEST §7.2): registers the inline
/// policy, opens a fresh session from the initiator, sends every message from
/// its sender checking accept/reject and error codes, then checks the final
/// state, the resolution and the mode state.
///
/// Stops at the first failure, because later steps depend on earlier ones;
/// the error names the vector (`name`, normally its file name), the step
/// (`messages[i]` with sender and type) and what differed.
pub fn run_vector(name: &str, v: &Vector, target: &mut impl Target) -> Result<Outcome, String> {
    let fail = |msg: String| format!("{name}: {msg}");
    if let Some(p) = &v.policy {
        let d = policy_descriptor(p).map_err(fail)?;
        target.register_policy(d).map_err(|e| fail(format!("registering policy {:?} failed: {e}", p.policy_id)))?;
    }
    let sid = target.fresh_session_id();
    let now = target.now_unix_ms();
    let start = start_envelope(v, &sid, &format!("{sid}-start"), now);
    let ack = target.send(start).map_err(|e| fail(format!("SessionStart could not be sent: {e}")))?;
    if !ack.ok || ack.duplicate {
        return Err(fail(format!(
            "SessionStart (mode {}) from {} was not accepted: {}",
            v.mode,
            v.initiator,
            describe(&ack)
        )));
    }

    let mut accepted_commitment: Option<Vec<u8>> = None;
    for (i, step) in v.messages.iter().enumerate() {
        let at = format!("messages[{i}] ({} {} from {})", step.payload_type, step.message_type, step.sender);
        let now = target.now_unix_ms();
        let env = step_envelope(v, step, &sid, &format!("{sid}-m{i}"), now).map_err(|e| fail(format!("{at}: {e}")))?;
        let payload = env.payload.clone();
        let ack = target.send(env).map_err(|e| fail(format!("{at}: could not be sent: {e}")))?;
        match step.expect {
            Expectation::Accept => {
                if !ack.ok || ack.duplicate {
                    return Err(fail(format!("{at}: expected accept, got {}", describe(&ack))));
                }
                if step.message_type == "Commitment" && accepted_commitment.is_none() {
                    accepted_commitment = Some(payload);
                }
            }
            Expectation::Reject => {
                if ack.ok {
                    return Err(fail(format!("{at}: expected reject, got {}", describe(&ack))));
                }
                if let Some(want) = &step.expected_error_code {
                    let got = ack.error.as_ref().map(|e| e.code.as_str()).unwrap_or("");
                    if got != want {
                        return Err(fail(format!("{at}: expected reject with {want}, got {}", describe(&ack))));
                    }
                }
            }
        }
    }

    let mut unobserved = Vec::new();
    let state = target.session_state(&sid).map_err(|e| fail(format!("reading the session state failed: {e}")))?;
    let want = v.expected_final_state.session_state();
    if state != want {
        return Err(fail(format!("final state: expected {}, got {}", want.as_str_name(), state.as_str_name())));
    }

    if v.expect_resolution_present.is_some() || v.expected_resolution.is_some() {
        let resolution =
            match target.resolution(&sid).map_err(|e| fail(format!("reading the resolution failed: {e}")))? {
                Observation::Observed(r) => r,
                Observation::Unobservable => {
                    unobserved.push("resolution");
                    accepted_commitment
                }
            };
        if let Some(present) = v.expect_resolution_present {
            if resolution.is_some() != present {
                return Err(fail(format!(
                    "expect_resolution_present is {present}, but the session {} a resolution",
                    if resolution.is_some() { "has" } else { "has no" }
                )));
            }
        }
        if let Some(expected) = &v.expected_resolution {
            let bytes =
                resolution.ok_or_else(|| fail("expected_resolution is given, but there is no resolution".into()))?;
            let c = CommitmentPayload::decode(bytes.as_slice())
                .map_err(|e| fail(format!("the resolution is not a CommitmentPayload: {e}")))?;
            if let Some(m) = subset_mismatch(&commitment_json(&c), expected) {
                return Err(fail(format!("expected_resolution: {m}")));
            }
        }
    }

    if let Some(expected) = &v.expected_mode_state {
        match target.mode_projection(&sid).map_err(|e| fail(format!("reading the mode state failed: {e}")))? {
            Observation::Observed(actual) => {
                if let Some(m) = subset_mismatch(&actual, expected) {
                    return Err(fail(format!("expected_mode_state: {m}; the projection is {actual}")));
                }
            }
            Observation::Unobservable => unobserved.push("expected_mode_state"),
        }
    }
    Ok(Outcome { session_id: sid, unobserved })
}

/// An Ack in one line: `accepted`, `duplicate` or `rejected CODE: message`.
pub fn describe(ack: &Ack) -> String {
    match (&ack.error, ack.ok, ack.duplicate) {
        (_, true, true) => "duplicate (ok but not newly accepted)".to_string(),
        (_, true, false) => "accepted".to_string(),
        (Some(e), false, _) => format!("rejected {}: {}", e.code, e.message),
        (None, false, _) => "rejected without an error".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode<M: prost::Message + Default>(b: &[u8]) -> M {
        M::decode(b).expect("decodes")
    }

    #[test]
    fn every_payload_type_encodes_an_empty_object_by_its_full_name_only() {
        let mut n = 0;
        for full in payload_types() {
            assert_eq!(encode_payload(full, &json!({})), Ok(Vec::new()), "{full}");
            // The short names of the old corpus are gone (SPEC-DELTA §1.1).
            let short = full.rsplit('.').next().unwrap().trim_end_matches("Payload");
            assert!(encode_payload(short, &json!({})).is_err(), "{short}");
            n += 1;
        }
        // 4 decision + 5 proposal + 6 task + 4 handoff + 4 quorum + 1 multi_round + Commitment.
        assert_eq!(n, 25);
    }

    #[test]
    fn fields_map_to_their_proto_types() {
        let b = encode_payload(
            "macp.modes.decision.v1.ProposalPayload",
            &json!({"proposal_id": "p1", "option": "deploy", "supporting_data": "hé"}),
        )
        .unwrap();
        let p: decision::ProposalPayload = decode(&b);
        assert_eq!((p.proposal_id.as_str(), p.option.as_str()), ("p1", "deploy"));
        assert_eq!(p.supporting_data, "hé".as_bytes());

        let b = encode_payload(
            "macp.modes.proposal.v1.ProposalPayload",
            &json!({"details": [1, 2, 255], "tags": ["a", "b"]}),
        )
        .unwrap();
        let p: proposal::ProposalPayload = decode(&b);
        assert_eq!(p.details, vec![1, 2, 255]);
        assert_eq!(p.tags, vec!["a", "b"]);

        let b =
            encode_payload("macp.modes.quorum.v1.ApprovalRequestPayload", &json!({"required_approvals": 2})).unwrap();
        assert_eq!(decode::<quorum::ApprovalRequestPayload>(&b).required_approvals, 2);

        let b = encode_payload("macp.modes.task.v1.TaskRequestPayload", &json!({"deadline_unix_ms": -5, "input": []}))
            .unwrap();
        assert_eq!(decode::<task::TaskRequestPayload>(&b).deadline_unix_ms, -5);

        let b = encode_payload("macp.modes.decision.v1.EvaluationPayload", &json!({"confidence": 0.7})).unwrap();
        assert_eq!(decode::<decision::EvaluationPayload>(&b).confidence, 0.7);

        let b =
            encode_payload("macp.modes.proposal.v1.RejectPayload", &json!({"terminal": true, "reason": null})).unwrap();
        assert!(decode::<proposal::RejectPayload>(&b).terminal);

        let b = encode_payload("macp.modes.multi_round.v1.ContributePayload", &json!({"value": "option_a"})).unwrap();
        assert_eq!(decode::<multi_round::ContributePayload>(&b).value, "option_a");

        let b = encode_payload(
            "macp.v1.CommitmentPayload",
            &json!({"action": "decision.selected", "outcome_positive": true,
                    "supersedes": {"session_id": "s", "commitment_hash": "sha256:00"}}),
        )
        .unwrap();
        let c: CommitmentPayload = decode(&b);
        assert!(c.outcome_positive);
        assert_eq!(c.supersedes.unwrap().commitment_hash, "sha256:00");
    }

    #[test]
    fn typos_and_wrong_types_are_errors() {
        let e = encode_payload("decision.Proposl", &json!({})).unwrap_err();
        assert!(e.contains("unknown payload_type \"decision.Proposl\""), "{e}");
        let e = encode_payload("macp.modes.decision.v1.ProposalPayload", &json!({"optoin": "x"})).unwrap_err();
        assert!(e.contains("macp.modes.decision.v1.ProposalPayload: unknown field \"optoin\""), "{e}");
        let e = encode_payload("macp.v1.CommitmentPayload", &json!({"supersedes": {"hash": "x"}})).unwrap_err();
        assert!(e.contains("macp.v1.CommitmentPayload.supersedes: unknown field \"hash\""), "{e}");
        let e = encode_payload("macp.modes.quorum.v1.ApprovalRequestPayload", &json!({"required_approvals": -1}))
            .unwrap_err();
        assert!(
            e.contains("macp.modes.quorum.v1.ApprovalRequestPayload.required_approvals: expected an integer"),
            "{e}"
        );
        let e = encode_payload("macp.modes.quorum.v1.ApprovalRequestPayload", &json!({"required_approvals": 2.5}))
            .unwrap_err();
        assert!(e.contains("required_approvals"), "{e}");
        let e = encode_payload(
            "macp.modes.quorum.v1.ApprovalRequestPayload",
            &json!({"required_approvals": 4294967296u64}),
        )
        .unwrap_err();
        assert!(e.contains("uint32"), "{e}");
        let e = encode_payload("macp.modes.proposal.v1.ProposalPayload", &json!({"details": [256]})).unwrap_err();
        assert!(e.contains("macp.modes.proposal.v1.ProposalPayload.details[0]: expected an integer 0-255"), "{e}");
        let e = encode_payload("macp.modes.proposal.v1.ProposalPayload", &json!({"tags": "a"})).unwrap_err();
        assert!(e.contains("an array of strings"), "{e}");
        let e = encode_payload("macp.modes.proposal.v1.RejectPayload", &json!({"terminal": "yes"})).unwrap_err();
        assert!(e.contains("expected true or false"), "{e}");
        let e = encode_payload("macp.modes.decision.v1.VotePayload", &json!({"vote": 1})).unwrap_err();
        assert!(e.contains("macp.modes.decision.v1.VotePayload.vote: expected a string, got a number (1)"), "{e}");
        let e = encode_payload("macp.modes.decision.v1.VotePayload", &json!(["p1"])).unwrap_err();
        assert!(e.contains("must be a JSON object"), "{e}");
    }

    const MINIMAL: &str = r#"{
        "mode": "macp.mode.decision.v1", "initiator": "i", "participants": ["i", "a"],
        "mode_version": "1.0.0", "configuration_version": "cfg-1", "policy_version": "", "ttl_ms": 60000,
        "messages": [{"sender": "a", "message_type": "Vote", "payload_type": "macp.modes.decision.v1.VotePayload",
                      "payload": {"proposal_id": "p1"}, "expect": "reject", "_comment": "fine"}],
        "expected_final_state": "Open", "_note": "fine too"
    }"#;

    fn edit(f: impl FnOnce(&mut Value)) -> Result<Vector, String> {
        let mut v: Value = serde_json::from_str(MINIMAL).unwrap();
        f(&mut v);
        Vector::parse(&v.to_string())
    }

    #[test]
    fn vectors_parse_and_lint() {
        let v = Vector::parse(MINIMAL).unwrap();
        assert_eq!(v.messages[0].expect, Expectation::Reject);
        assert_eq!(v.expected_final_state.session_state(), SessionState::Open);
        assert!(v.annotations.contains_key("_note"));

        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|v| v["expected_final_state"] = json!("Closed")), "unknown variant `Closed`"),
            (Box::new(|v| v["expect_resolution"] = json!(true)), "unknown key \"expect_resolution\""),
            (Box::new(|v| v["messages"][0]["expectt"] = json!(1)), "unknown key \"messages[0].expectt\""),
            (Box::new(|v| v["messages"][0]["expect"] = json!("accepted")), "unknown variant `accepted`"),
            (
                Box::new(|v| {
                    v["messages"][0]["sender"] = json!("z");
                    v["messages"][0]["expect"] = json!("accept");
                }),
                "sender z is expected to be accepted",
            ),
            (
                Box::new(|v| v["messages"][0]["payload_type"] = json!("decision.Vote")),
                "unknown payload_type \"decision.Vote\"",
            ),
            (
                Box::new(|v| v["messages"][0]["payload"]["vote_"] = json!("")),
                "messages[0].payload: macp.modes.decision.v1.VotePayload",
            ),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("mode");
                }),
                "missing field `mode`",
            ),
            (
                Box::new(|v| {
                    v["participants"] = json!(["i", "a"]);
                    v["messages"][0]["expect"] = json!("accept");
                    v["messages"][0]["expected_error_code"] = json!("FORBIDDEN");
                }),
                "only meaningful",
            ),
            (
                Box::new(|v| {
                    v["policy"] = json!({"policy_id": "p", "mode": "*", "schema_version": 2, "rules": {}});
                }),
                "differs from policy_version",
            ),
            (
                Box::new(|v| {
                    v["policy_version"] = json!("p");
                    v["policy"] = json!({"policy_id": "p", "mode": "*", "schema_version": 4, "rules": {}});
                }),
                "schema_version must be 1, 2 or 3",
            ),
            (
                Box::new(|v| {
                    v["policy_version"] = json!("p");
                    v["policy"] =
                        json!({"policy_id": "p", "mode": "macp.mode.task.v1", "schema_version": 1, "rules": {}});
                }),
                "is neither",
            ),
            (Box::new(|v| v["expected_mode_state"] = json!("Voting")), "must be a JSON object"),
        ];
        for (f, want) in cases {
            let e = edit(f).unwrap_err();
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        }
        // The current corpus's shapes (SPEC-DELTA §1): an empty roster, an
        // initiator outside it whose own messages are accepted, a
        // `description`, an Expired final state, and a schema_version 3 policy.
        let v = edit(|v| {
            v["participants"] = json!([]);
            v["messages"][0]["sender"] = json!("i");
            v["messages"][0]["expect"] = json!("accept");
            v["description"] = json!("what this pins");
            v["expected_final_state"] = json!("Expired");
            v["policy_version"] = json!("p");
            v["policy"] = json!({"policy_id": "p", "mode": "*", "schema_version": 3, "description": "d",
                                 "rules": {"_note": "kept"}, "_comment": "ignored"});
        })
        .unwrap();
        assert_eq!(v.expected_final_state.session_state(), SessionState::Expired);
        assert_eq!(v.description.as_deref(), Some("what this pins"));
        assert_eq!(policy_descriptor(v.policy.as_ref().unwrap()).unwrap().rules, r#"{"_note":"kept"}"#);
        assert!(Vector::parse("{").unwrap_err().starts_with("not a valid vector"));
        assert!(Vector::parse("[]").is_err());
    }

    #[test]
    fn subset_matching_reports_the_first_mismatch_path() {
        let actual = json!({"phase": "Voting", "votes": {"p1": {"agent://a": {"vote": "APPROVE", "at": 3}}},
                            "list": [1, {"x": 2}], "n": 1});
        assert_eq!(subset_mismatch(&actual, &json!({})), None);
        assert_eq!(subset_mismatch(&actual, &json!({"votes": {"p1": {"agent://a": {"vote": "APPROVE"}}}})), None);
        assert_eq!(subset_mismatch(&actual, &json!({"list": [1, {}], "n": 1.0})), None);
        assert_eq!(
            subset_mismatch(&actual, &json!({"votes": {"p1": {"agent://a": {"vote": "REJECT"}}}})).unwrap(),
            "$.votes.p1[\"agent://a\"].vote: expected \"REJECT\", got \"APPROVE\""
        );
        assert!(subset_mismatch(&actual, &json!({"phase": "Voting", "offers": {}}))
            .unwrap()
            .starts_with("$.offers: missing"));
        assert!(subset_mismatch(&actual, &json!({"list": [1]})).unwrap().contains("expected 1 elements, got 2"));
        assert_eq!(
            subset_mismatch(&actual, &json!({"list": [1, {"x": 3}]})).unwrap(),
            "$.list[1].x: expected 3, got 2"
        );
        assert_eq!(subset_mismatch(&json!(null), &json!({"a": 1})).unwrap(), "$: expected {\"a\":1}, got null");
    }

    #[test]
    fn session_ids_have_uuid_v4_shape_and_differ() {
        let a = fresh_session_id();
        let b = fresh_session_id();
        assert_ne!(a, b);
        for id in [a, b, uuid_v4_shape(0, 0), uuid_v4_shape(u64::MAX, u64::MAX)] {
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12], "{id}");
            assert!(id.bytes().all(|c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{id}");
            assert!(parts[2].starts_with('4'), "{id}");
            assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'), "{id}");
        }
    }

    /// A scripted target: answers from a list, records what was sent.
    struct Scripted {
        acks: Vec<Ack>,
        sent: Vec<Envelope>,
        policies: Vec<PolicyDescriptor>,
        state: SessionState,
    }

    impl Target for Scripted {
        fn register_policy(&mut self, d: PolicyDescriptor) -> Result<(), String> {
            self.policies.push(d);
            Ok(())
        }
        fn send(&mut self, e: Envelope) -> Result<Ack, String> {
            self.sent.push(e);
            if self.acks.is_empty() {
                Err("no more scripted acks".into())
            } else {
                Ok(self.acks.remove(0))
            }
        }
        fn session_state(&mut self, _: &str) -> Result<SessionState, String> {
            Ok(self.state)
        }
    }

    fn ok() -> Ack {
        Ack { ok: true, ..Default::default() }
    }

    fn rejected(code: &str) -> Ack {
        Ack {
            ok: false,
            error: Some(crate::v1::MacpError { code: code.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn the_runner_sends_the_script_and_names_failures() {
        let mut v = Vector::parse(MINIMAL).unwrap();
        let mut t =
            Scripted { acks: vec![ok(), rejected("X")], sent: vec![], policies: vec![], state: SessionState::Open };
        let out = run_vector("min.json", &v, &mut t).unwrap();
        assert_eq!(t.sent.len(), 2);
        assert_eq!(t.sent[0].message_type, "SessionStart");
        assert_eq!(t.sent[0].sender, "i");
        assert_eq!(decode::<SessionStartPayload>(&t.sent[0].payload).participants, vec!["i", "a"]);
        assert_eq!(t.sent[1].sender, "a");
        assert_eq!(t.sent[1].session_id, out.session_id);
        assert_ne!(t.sent[0].message_id, t.sent[1].message_id);
        assert!(out.unobserved.is_empty());

        v.messages[0].expected_error_code = Some("FORBIDDEN".into());
        let mut t =
            Scripted { acks: vec![ok(), rejected("X")], sent: vec![], policies: vec![], state: SessionState::Open };
        let e = run_vector("min.json", &v, &mut t).unwrap_err();
        assert_eq!(
            e,
            "min.json: messages[0] (macp.modes.decision.v1.VotePayload Vote from a): expected reject with FORBIDDEN, got rejected X: "
        );

        let mut t = Scripted {
            acks: vec![rejected("MODE_NOT_SUPPORTED")],
            sent: vec![],
            policies: vec![],
            state: SessionState::Open,
        };
        let e = run_vector("min.json", &v, &mut t).unwrap_err();
        assert!(e.starts_with("min.json: SessionStart (mode macp.mode.decision.v1) from i was not accepted: rejected MODE_NOT_SUPPORTED"), "{e}");

        let mut t = Scripted {
            acks: vec![ok(), rejected("FORBIDDEN")],
            sent: vec![],
            policies: vec![],
            state: SessionState::Resolved,
        };
        let e = run_vector("min.json", &v, &mut t).unwrap_err();
        assert_eq!(e, "min.json: final state: expected SESSION_STATE_OPEN, got SESSION_STATE_RESOLVED");

        // Unobservable resolution falls back to the accepted Commitment; mode state is skipped.
        let mut v = Vector::parse(MINIMAL).unwrap();
        v.messages[0] = Step {
            sender: "i".into(),
            message_type: "Commitment".into(),
            payload_type: "macp.v1.CommitmentPayload".into(),
            payload: json!({"action": "decision.selected", "outcome_positive": true}),
            expect: Expectation::Accept,
            expected_error_code: None,
            annotations: BTreeMap::new(),
        };
        v.expected_final_state = FinalState::Resolved;
        v.expect_resolution_present = Some(true);
        v.expected_resolution = Some(json!({"action": "decision.selected", "outcome_positive": true}));
        v.expected_mode_state = Some(json!({"phase": "Committed"}));
        let mut t = Scripted { acks: vec![ok(), ok()], sent: vec![], policies: vec![], state: SessionState::Resolved };
        let out = run_vector("c.json", &v, &mut t).unwrap();
        assert_eq!(out.unobserved, vec!["resolution", "expected_mode_state"]);
        v.expected_resolution = Some(json!({"action": "decision.rejected"}));
        let mut t = Scripted { acks: vec![ok(), ok()], sent: vec![], policies: vec![], state: SessionState::Resolved };
        let e = run_vector("c.json", &v, &mut t).unwrap_err();
        assert_eq!(
            e,
            "c.json: expected_resolution: $.action: expected \"decision.rejected\", got \"decision.selected\""
        );
    }
}
