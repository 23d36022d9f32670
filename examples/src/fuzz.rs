//! The fuzz client: malformed and random envelopes over the real wire.
//!
//! In-process fuzzing (`fuzz/`) finds kernel panics; this client checks the
//! other half of the contract, end to end through tonic: every bad request
//! gets a *clean* refusal — an Ack carrying a registry error code and a
//! message, or, where the protocol documents one, a gRPC status — and the
//! server is still serving afterwards. It also notes refusals whose code
//! differs from the one this client expected ("surprises"): those are not
//! failures, but they are where rule-ordering bugs show up first.
//!
//! Everything is driven by a seeded [`Rng`]: a run prints its seed and
//! `--seed` replays it exactly.

use std::collections::BTreeMap;

use macp_kernel::ErrorCode;
use macp_wire::modes::decision;
use macp_wire::v1::{Envelope, GetSessionRequest, InitializeRequest, SendRequest, SessionState};
use macp_wire::Message;
use tonic::Code;

use crate::client::{Agents, Client};
use crate::envelopes::{self, commitment, envelope, start_payload};
use crate::ids;
use crate::modes::Mode;
use crate::rng::Rng;

/// Every registry code the runtime may legitimately answer a bad envelope
/// with. `INTERNAL_ERROR` is deliberately absent: the runtime failing
/// internally on bad input is exactly what this client hunts for.
const CLEAN_CODES: [ErrorCode; 14] = [
    ErrorCode::Unauthenticated,
    ErrorCode::Forbidden,
    ErrorCode::SessionNotFound,
    ErrorCode::SessionNotOpen,
    ErrorCode::SessionAlreadyExists,
    ErrorCode::InvalidEnvelope,
    ErrorCode::UnsupportedProtocolVersion,
    ErrorCode::ModeNotSupported,
    ErrorCode::PayloadTooLarge,
    ErrorCode::RateLimited,
    ErrorCode::InvalidSessionId,
    ErrorCode::UnknownPolicyVersion,
    ErrorCode::PolicyDenied,
    ErrorCode::InvalidPolicyDefinition,
];

/// The largest gRPC message the runtime decodes by default
/// (`MACP_MAX_GRPC_MESSAGE_BYTES`); bigger requests are refused by tonic
/// with a status before any handler runs.
pub const GRPC_LIMIT_BYTES: usize = 4 * 1024 * 1024;

/// What to send.
#[derive(Clone, Debug)]
pub struct FuzzConfig {
    /// How many malformed requests to send.
    pub iterations: u64,
    /// The generator seed; the same seed replays the same run.
    pub seed: u64,
    /// The server's `MACP_MAX_PAYLOAD_BYTES`, to size oversized payloads.
    pub max_payload_bytes: usize,
    /// Also send a few requests above the gRPC message limit (several MiB each).
    pub huge: bool,
}

impl Default for FuzzConfig {
    fn default() -> Self {
        FuzzConfig { iterations: 2000, seed: 1, max_payload_bytes: 1_048_576, huge: false }
    }
}

/// How the runtime answered one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ack with `ok == true` (possibly a duplicate).
    Accepted,
    /// Ack with `ok == false` and this error code.
    Refused(String),
    /// The call failed with a gRPC status.
    Status(Code),
}

impl Outcome {
    /// `accepted`, `ack:CODE` or `status:Code`, for counting.
    pub fn label(&self) -> String {
        match self {
            Outcome::Accepted => "accepted".into(),
            Outcome::Refused(c) => format!("ack:{c}"),
            Outcome::Status(c) => format!("status:{c:?}"),
        }
    }
}

/// One request the fuzzer sent and what became of it.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Position in the run.
    pub index: u64,
    /// Which generator made it.
    pub kind: &'static str,
    /// What was wrong with it.
    pub detail: String,
    /// The runtime's answer.
    pub outcome: Outcome,
    /// Why the answer is not a clean refusal, if it is not.
    pub violation: Option<String>,
    /// Whether the answer was one of the expected ones.
    pub expected: bool,
}

/// The end-of-run summary.
#[derive(Clone, Debug, Default)]
pub struct FuzzReport {
    /// The seed that replays this run.
    pub seed: u64,
    /// Requests sent.
    pub cases: u64,
    /// Count per outcome label (`ack:INVALID_ENVELOPE`, `status:InvalidArgument`, …).
    pub by_outcome: BTreeMap<String, u64>,
    /// Count per generator.
    pub by_kind: BTreeMap<&'static str, u64>,
    /// Answers that were not clean refusals: each one is a runtime bug.
    pub violations: Vec<String>,
    /// Clean refusals with an unexpected code (first 50).
    pub surprises: Vec<String>,
    /// A final Initialize succeeded and the target session is still OPEN.
    pub server_up: bool,
}

impl FuzzReport {
    /// Whether the run passed: nothing unclean, and the server survived.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.server_up
    }

    /// A human-readable summary.
    pub fn render(&self) -> String {
        let mut s = format!("fuzz seed {}: {} request(s)\n\noutcomes:\n", self.seed, self.cases);
        for (k, v) in &self.by_outcome {
            s.push_str(&format!("  {k:<40} {v:>7}\n"));
        }
        s.push_str("\ngenerators:\n");
        for (k, v) in &self.by_kind {
            s.push_str(&format!("  {k:<40} {v:>7}\n"));
        }
        if !self.surprises.is_empty() {
            s.push_str(&format!("\nunexpected (but clean) refusals, first {}:\n", self.surprises.len()));
            for x in &self.surprises {
                s.push_str(&format!("  {x}\n"));
            }
        }
        s.push_str(&format!("\nviolations: {}\n", self.violations.len()));
        for v in self.violations.iter().take(50) {
            s.push_str(&format!("  {v}\n"));
        }
        s.push_str(&format!(
            "server stayed up: {}\nresult: {}\n",
            if self.server_up { "yes (final Initialize ok, target session still OPEN)" } else { "NO" },
            if self.passed() { "PASS" } else { "FAIL" }
        ));
        s
    }
}

/// A request to send.
struct Case {
    kind: &'static str,
    detail: String,
    /// `None` sends a SendRequest without an envelope.
    envelope: Option<Envelope>,
    /// Who sends it; `None` sends no credentials.
    agent: Option<String>,
    /// Acceptable answers (labels as in [`Outcome::label`]).
    expect: Vec<String>,
    /// Whether an Ack with ok is acceptable (random bytes can decode into
    /// something valid; duplicates are acknowledged).
    may_accept: bool,
}

/// The fixed sessions the generators aim at.
struct Targets {
    /// An OPEN decision session with proposal `p1`, whose participants are
    /// the fuzz agents; the initiator is [`INITIATOR`].
    open: String,
    /// The accepted proposal envelope (resent as a duplicate).
    proposal: Envelope,
    /// A RESOLVED decision session.
    closed: String,
}

const INITIATOR: &str = "fuzz/initiator";
const AGENTS: usize = 16;

fn agent(i: usize) -> String {
    format!("fuzz/agent-{i}")
}

fn acks(codes: &[&str]) -> Vec<String> {
    codes.iter().map(|c| format!("ack:{c}")).collect()
}

const DECISION: &str = "macp.mode.decision.v1";
const DECISION_TYPES: [&str; 5] = ["Proposal", "Evaluation", "Objection", "Vote", "Commitment"];
const PRINTABLE: &[u8] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/ !@#$%^&*()[]{}<>?~`'\"\\|";
const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

async fn setup(agents: &Agents) -> crate::Result<Targets> {
    let mut init = agents.client(INITIATOR);
    let names: Vec<String> = (0..AGENTS).map(agent).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let open = ids::session_id();
    let mut p = start_payload("fuzz target", &refs);
    p.ttl_ms = 3_600_000;
    expect_ok(&mut init, envelope(&open, DECISION, "SessionStart", INITIATOR, p.encode_to_vec())).await?;
    let proposal = decision::ProposalPayload { proposal_id: "p1".into(), option: "o".into(), ..Default::default() };
    let proposal = envelope(&open, DECISION, "Proposal", &names[0], proposal.encode_to_vec());
    expect_ok(&mut agents.client(&names[0]), proposal.clone()).await?;

    let closed = ids::session_id();
    let p = start_payload("fuzz closed", &refs[..1]);
    expect_ok(&mut init, envelope(&closed, DECISION, "SessionStart", INITIATOR, p.encode_to_vec())).await?;
    let pr = decision::ProposalPayload { proposal_id: "p1".into(), option: "o".into(), ..Default::default() };
    expect_ok(&mut agents.client(&names[0]), envelope(&closed, DECISION, "Proposal", &names[0], pr.encode_to_vec()))
        .await?;
    let c = commitment("decision.selected", true, "fuzz setup");
    expect_ok(&mut init, envelope(&closed, DECISION, "Commitment", INITIATOR, c.encode_to_vec())).await?;
    Ok(Targets { open, proposal, closed })
}

async fn expect_ok(c: &mut Client, e: Envelope) -> crate::Result<()> {
    let what = format!("{} {}", e.message_type, e.session_id);
    let ack = crate::client::send(c, e).await?;
    match ack.error {
        None => Ok(()),
        Some(err) => Err(format!("fuzz setup: {what} refused: {}: {}", err.code, err.message).into()),
    }
}

/// A plausible envelope into the open target (a Vote on p1 by a fuzz agent),
/// which the generators then damage in one way.
fn plausible(rng: &mut Rng, t: &Targets) -> (usize, String, Envelope) {
    let i = rng.below(AGENTS as u64) as usize;
    let who = agent(i);
    let vote = decision::VotePayload { proposal_id: "p1".into(), vote: "APPROVE".into(), reason: String::new() };
    let e = envelope(&t.open, DECISION, "Vote", &who, vote.encode_to_vec());
    (i, who, e)
}

fn case(
    kind: &'static str,
    detail: String,
    envelope: Option<Envelope>,
    agent: Option<String>,
    expect: Vec<String>,
    may_accept: bool,
) -> Case {
    Case { kind, detail, envelope, agent, expect, may_accept }
}

fn generate(rng: &mut Rng, cfg: &FuzzConfig, t: &Targets, huge_left: &mut u32) -> Case {
    let (idx, who, mut e) = plausible(rng, t);
    match rng.below(16) {
        0 => {
            let v = match rng.below(8) {
                0 => String::new(),
                1 => "0.9".into(),
                2 => "1".into(),
                3 => "1.0.0".into(),
                4 => "2.0".into(),
                5 => " 1.0".into(),
                6 => "1.0\n".into(),
                _ => rng.string_between(1, 12, PRINTABLE),
            };
            e.macp_version = v.clone();
            case(
                "bad_version",
                format!("macp_version {v:?}"),
                Some(e),
                Some(who),
                acks(&["UNSUPPORTED_PROTOCOL_VERSION"]),
                false,
            )
        }
        1 => {
            let field = *rng.pick(&["message_type", "message_id", "session_id", "mode"]);
            match field {
                "message_type" => e.message_type.clear(),
                "message_id" => e.message_id.clear(),
                "session_id" => e.session_id.clear(),
                _ => e.mode.clear(),
            }
            case("empty_field", format!("empty {field}"), Some(e), Some(who), acks(&["INVALID_ENVELOPE"]), false)
        }
        2 => {
            let len = rng.below(257) as usize;
            e.message_type = rng.pick(&DECISION_TYPES).to_string();
            e.payload = rng.bytes(len);
            let detail = format!("{} with {len} random payload bytes", e.message_type);
            case("random_payload", detail, Some(e), Some(who), acks(&["INVALID_ENVELOPE", "FORBIDDEN"]), true)
        }
        3 => {
            let mut modes: Vec<&str> = Mode::ALL.iter().map(|m| m.id()).filter(|m| *m != DECISION).collect();
            modes.extend(["ext.nope.v1", "macp.mode.decision.v2", "", "MACP.MODE.DECISION.V1"]);
            let m = rng.pick(&modes).to_string();
            if m.is_empty() || rng.one_in(3) {
                // A SessionStart of a mode nobody registered.
                let unknown = if m.is_empty() { "ext.nope.v1".to_string() } else { format!("{m}.nope") };
                let p = start_payload("fuzz", &[&who]);
                let s = envelope(&ids::session_id(), &unknown, "SessionStart", &who, p.encode_to_vec());
                case(
                    "wrong_mode",
                    format!("SessionStart of mode {unknown:?}"),
                    Some(s),
                    Some(who),
                    acks(&["MODE_NOT_SUPPORTED"]),
                    false,
                )
            } else {
                e.mode = m.clone();
                case(
                    "wrong_mode",
                    format!("Vote with mode {m:?} into a decision session"),
                    Some(e),
                    Some(who),
                    acks(&["INVALID_ENVELOPE"]),
                    false,
                )
            }
        }
        4 => {
            if cfg.huge && *huge_left > 0 && rng.one_in(8) {
                *huge_left -= 1;
                let len = GRPC_LIMIT_BYTES + 1 + rng.below(256 * 1024) as usize;
                e.payload = vec![0x5a; len];
                let expect = vec!["status:OutOfRange".into(), "status:ResourceExhausted".into()];
                case(
                    "oversized",
                    format!("{len}-byte payload, above the gRPC limit"),
                    Some(e),
                    Some(who),
                    expect,
                    false,
                )
            } else {
                let len = cfg.max_payload_bytes + 1 + rng.below(64 * 1024) as usize;
                // Content is irrelevant: the size check comes before decoding.
                e.payload = vec![0xa5; len];
                case(
                    "oversized",
                    format!("{len}-byte payload"),
                    Some(e),
                    Some(who),
                    acks(&["PAYLOAD_TOO_LARGE"]),
                    false,
                )
            }
        }
        5 => {
            let t = rng.string_between(1, 24, ALNUM);
            e.message_type = t.clone();
            // Decision refuses an unknown type at authorization (FORBIDDEN).
            case(
                "random_type",
                format!("message_type {t:?}"),
                Some(e),
                Some(who),
                acks(&["FORBIDDEN", "INVALID_ENVELOPE"]),
                false,
            )
        }
        6 => {
            let sid = if rng.one_in(2) {
                rng.string_between(1, 64, PRINTABLE)
            } else {
                ids::uuid_v4(rng.next_u64(), rng.next_u64())
            };
            e.session_id = sid.clone();
            let start = rng.one_in(3);
            if start {
                e.message_type = "SessionStart".into();
                e.payload = start_payload("fuzz", &[&who]).encode_to_vec();
            }
            let expect = if start {
                // A well-formed id makes this a valid start: allowed.
                acks(&["INVALID_SESSION_ID"]).into_iter().chain(["accepted".to_string()]).collect()
            } else {
                acks(&["INVALID_SESSION_ID", "SESSION_NOT_FOUND"])
            };
            let detail = format!("{} into session id {sid:?}", e.message_type);
            case("random_session", detail, Some(e), Some(who), expect, start)
        }
        7 => {
            let mut p = start_payload("fuzz", &[&who]);
            let mut raw = None;
            let mut expect = acks(&["INVALID_ENVELOPE"]);
            let detail = match rng.below(10) {
                0 => {
                    p.ttl_ms = 0;
                    "ttl_ms 0"
                }
                1 => {
                    p.ttl_ms = -(1 + rng.below(1 << 40) as i64);
                    "negative ttl_ms"
                }
                2 => {
                    p.ttl_ms = 86_400_001 + rng.below(1 << 40) as i64;
                    "ttl_ms above 24 h"
                }
                3 => {
                    // An empty roster is valid since SPEC-DELTA §1.3; a
                    // duplicated participant is not.
                    let dup = p.participants.first().cloned().unwrap_or_else(|| "agent://dup".into());
                    p.participants.extend([dup.clone(), dup]);
                    "duplicate participant"
                }
                4 => {
                    p.mode_version = "2.0.0".into();
                    expect = acks(&["MODE_NOT_SUPPORTED"]);
                    "mode_version 2.0.0"
                }
                5 => {
                    p.configuration_version.clear();
                    "empty configuration_version"
                }
                6 => {
                    p.participants.push(String::new());
                    "an empty participant id"
                }
                7 => {
                    p.policy_version = "policy.does-not-exist".into();
                    expect = acks(&["UNKNOWN_POLICY_VERSION"]);
                    "unknown policy_version"
                }
                8 => {
                    raw = Some(rng.bytes_between(1, 200));
                    expect = acks(&["INVALID_ENVELOPE", "MODE_NOT_SUPPORTED", "UNKNOWN_POLICY_VERSION"]);
                    "random payload bytes"
                }
                _ => {
                    raw = Some(Vec::new());
                    "empty payload"
                }
            };
            let payload = raw.unwrap_or_else(|| p.encode_to_vec());
            let s = envelope(&ids::session_id(), DECISION, "SessionStart", &who, payload);
            case("bad_start", detail.to_string(), Some(s), Some(who), expect, false)
        }
        8 => {
            let other = agent((idx + 1 + rng.below(AGENTS as u64 - 1) as usize) % AGENTS);
            let detail = format!("sender {other} over {who}'s credentials");
            e.sender = other;
            case("spoofed_sender", detail, Some(e), Some(who), acks(&["UNAUTHENTICATED"]), false)
        }
        9 => case("anonymous", "no credentials".into(), Some(e), None, acks(&["UNAUTHENTICATED"]), false),
        10 => case(
            "missing_envelope",
            "SendRequest without an envelope".into(),
            None,
            Some(who),
            vec!["status:InvalidArgument".into()],
            false,
        ),
        11 => {
            let mut c = commitment("decision.selected", true, "fuzz");
            let detail = match rng.below(7) {
                0 => {
                    c.commitment_id.clear();
                    "empty commitment_id"
                }
                1 => {
                    c.action = "   ".into();
                    "blank action"
                }
                2 => {
                    c.authority_scope.clear();
                    "empty authority_scope"
                }
                3 => {
                    c.reason.clear();
                    "empty reason"
                }
                4 => {
                    c.mode_version = "9.9.9".into();
                    "mode_version differs from the session's"
                }
                5 => {
                    c.configuration_version = "other".into();
                    "configuration_version differs from the session's"
                }
                _ => {
                    c.outcome_positive = false;
                    "positive action with outcome_positive false"
                }
            };
            let env = envelope(&t.open, DECISION, "Commitment", INITIATOR, c.encode_to_vec());
            case("bad_commitment", detail.into(), Some(env), Some(INITIATOR.into()), acks(&["INVALID_ENVELOPE"]), false)
        }
        12 => {
            let ty = *rng.pick(&macp_kernel::validate::RUNTIME_ONLY_TYPES);
            e.message_type = ty.into();
            case("runtime_only", format!("client-sent {ty}"), Some(e), Some(who), acks(&["FORBIDDEN"]), false)
        }
        13 => {
            e.session_id = t.closed.clone();
            e.sender = agent(0);
            case(
                "closed_session",
                "Vote into a RESOLVED session".into(),
                Some(e),
                Some(agent(0)),
                acks(&["SESSION_NOT_OPEN"]),
                false,
            )
        }
        14 => {
            let (detail, env, may) = match rng.below(4) {
                0 => ("Signal with a session_id", envelopes::signal(&who, "x", Vec::new()), false),
                1 => ("Signal with random payload bytes", envelopes::signal(&who, "x", Vec::new()), true),
                2 => ("Signal with an empty signal_type", envelopes::signal(&who, "", vec![1]), false),
                _ => {
                    ("Progress with session_id but no mode", envelope(&t.open, "", "Progress", &who, Vec::new()), false)
                }
            };
            let mut env = env;
            match detail {
                "Signal with a session_id" => env.session_id = t.open.clone(),
                "Signal with random payload bytes" => env.payload = rng.bytes_between(1, 64),
                _ => {}
            }
            let mut expect = acks(&["INVALID_ENVELOPE"]);
            if may {
                expect.push("accepted".into());
            }
            case("ambient", detail.into(), Some(env), Some(who), expect, may)
        }
        _ => {
            let dup = t.proposal.clone();
            let sender = dup.sender.clone();
            case(
                "duplicate",
                "resend of an accepted message_id".into(),
                Some(dup),
                Some(sender),
                vec!["accepted".into()],
                true,
            )
        }
    }
}

/// Classifies an answer: `Some(reason)` when it is not a clean refusal.
fn judge(case: &Case, outcome: &Outcome, message_empty: bool) -> Option<String> {
    match outcome {
        Outcome::Accepted if !case.may_accept => Some("a malformed envelope was accepted".into()),
        Outcome::Accepted => None,
        Outcome::Refused(code) => {
            if !CLEAN_CODES.iter().any(|c| c.as_str() == code) {
                Some(format!("refused with {code:?}, which is not a clean registry code"))
            } else if message_empty {
                Some(format!("{code} without a message"))
            } else {
                None
            }
        }
        Outcome::Status(code) => {
            let label = outcome.label();
            if case.expect.contains(&label) {
                None
            } else {
                Some(format!("gRPC status {code:?} where an Ack was due"))
            }
        }
    }
}

/// Sets up two target sessions, sends `cfg.iterations` malformed requests
/// (calling `on_case` after each), then checks that the server still
/// answers Initialize and still holds the target session OPEN.
pub async fn run(agents: &Agents, cfg: &FuzzConfig, mut on_case: impl FnMut(&CaseResult)) -> crate::Result<FuzzReport> {
    let targets = setup(agents).await?;
    let mut rng = Rng::new(cfg.seed);
    let mut report = FuzzReport { seed: cfg.seed, ..Default::default() };
    let mut huge_left = 3;
    for index in 0..cfg.iterations {
        let case = generate(&mut rng, cfg, &targets, &mut huge_left);
        let mut client = match &case.agent {
            Some(a) => agents.client(a),
            None => agents.anonymous(),
        };
        let answer = client.send(SendRequest { envelope: case.envelope.clone() }).await;
        let (outcome, message_empty) = match answer {
            Ok(r) => match r.into_inner().ack {
                Some(a) if a.ok => (Outcome::Accepted, false),
                Some(a) => match a.error {
                    Some(err) => (Outcome::Refused(err.code), err.message.is_empty()),
                    None => (Outcome::Refused("<ok=false without error>".into()), true),
                },
                None => (Outcome::Refused("<no ack>".into()), true),
            },
            Err(status) => (Outcome::Status(status.code()), false),
        };
        let violation = judge(&case, &outcome, message_empty);
        let expected = case.expect.contains(&outcome.label());
        let result = CaseResult { index, kind: case.kind, detail: case.detail, outcome, violation, expected };
        report.cases += 1;
        *report.by_outcome.entry(result.outcome.label()).or_default() += 1;
        *report.by_kind.entry(result.kind).or_default() += 1;
        if let Some(v) = &result.violation {
            report.violations.push(format!("#{index} {} ({}): {v}", result.kind, result.detail));
        } else if !result.expected && report.surprises.len() < 50 {
            report.surprises.push(format!(
                "#{index} {} ({}): got {}, expected one of {:?}",
                result.kind,
                result.detail,
                result.outcome.label(),
                case.expect
            ));
        }
        on_case(&result);
    }
    report.server_up = server_alive(agents, &targets.open).await;
    Ok(report)
}

/// A final Initialize succeeds and the open target is still OPEN (no fuzz
/// request resolved or broke it).
async fn server_alive(agents: &Agents, open: &str) -> bool {
    let mut c = agents.client(INITIATOR);
    let init =
        InitializeRequest { supported_protocol_versions: vec![envelopes::MACP_VERSION.into()], ..Default::default() };
    if c.initialize(init).await.is_err() {
        return false;
    }
    match c.get_session(GetSessionRequest { session_id: open.into() }).await {
        Ok(r) => r.into_inner().metadata.is_some_and(|m| m.state == SessionState::Open as i32),
        Err(_) => false,
    }
}
