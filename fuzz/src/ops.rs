//! The structured input language of the `kernel_ops` target.
//!
//! Raw protobuf mutation rarely produces a well-formed Vote for an existing
//! proposal from a declared participant. This language does: every operation
//! names a small session slot, a small set of agents and a small id space,
//! and payloads are built typed for every mode, so most inputs are *valid or
//! nearly valid*, which is where state-machine bugs live. `arbitrary` derives
//! the decoder, and libFuzzer's coverage feedback explores the sequences.

use arbitrary::Arbitrary;
use macp_kernel::macp_wire::modes::{decision, handoff, multi_round, proposal, quorum, task};
use macp_kernel::macp_wire::v1::{
    CommitmentPayload, CommitmentRef, Envelope, ModeDescriptor, PolicyDescriptor, ProgressPayload, SessionStartPayload,
    SignalPayload,
};
use macp_kernel::{ControlOp, Grants, Identity, Input};
use prost::Message as _;

/// The agents of the language.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// The usual initiator.
    I,
    /// A participant.
    A,
    /// A participant.
    B,
    /// A participant in some sessions only.
    C,
    /// Never a participant.
    Outsider,
    /// The runtime's reserved id.
    Runtime,
    /// `A` with narrow grants (task mode only, one open session, no
    /// registry changes).
    Limited,
}

impl Who {
    /// Its agent name.
    pub fn name(self) -> &'static str {
        match self {
            Who::I => "I",
            Who::A | Who::Limited => "A",
            Who::B => "B",
            Who::C => "C",
            Who::Outsider => "X",
            Who::Runtime => "macp-runtime",
        }
    }

    /// The identity it authenticates as.
    pub fn identity(self) -> Identity {
        match self {
            Who::Limited => Identity {
                sender: "A".into(),
                grants: Grants {
                    can_start_sessions: true,
                    allowed_modes: Some(["macp.mode.task.v1".to_string()].into_iter().collect()),
                    max_open_sessions: Some(1),
                    can_manage_mode_registry: false,
                    is_observer: false,
                },
            },
            w => Identity::new(w.name()),
        }
    }
}

/// Mode ids, including an alias, extension modes and nonsense.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeSel {
    /// `macp.mode.decision.v1`.
    Decision,
    /// `macp.mode.proposal.v1`.
    Proposal,
    /// `macp.mode.task.v1`.
    Task,
    /// `macp.mode.handoff.v1`.
    Handoff,
    /// `macp.mode.quorum.v1`.
    Quorum,
    /// `ext.multi_round.v1`.
    MultiRound,
    /// `macp.mode.multi_round.v1`, the alias.
    MultiRoundAlias,
    /// `ext.fuzz.a.v1`, registered by [`Op::RegisterMode`].
    ExtA,
    /// `ext.fuzz.b.v1`, a promotion target.
    ExtB,
    /// `macp.mode.nope.v1`, never registered.
    Unknown,
}

impl ModeSel {
    /// The mode id.
    pub fn id(self) -> &'static str {
        match self {
            ModeSel::Decision => "macp.mode.decision.v1",
            ModeSel::Proposal => "macp.mode.proposal.v1",
            ModeSel::Task => "macp.mode.task.v1",
            ModeSel::Handoff => "macp.mode.handoff.v1",
            ModeSel::Quorum => "macp.mode.quorum.v1",
            ModeSel::MultiRound => "ext.multi_round.v1",
            ModeSel::MultiRoundAlias => "macp.mode.multi_round.v1",
            ModeSel::ExtA => "ext.fuzz.a.v1",
            ModeSel::ExtB => "ext.fuzz.b.v1",
            ModeSel::Unknown => "macp.mode.nope.v1",
        }
    }
}

/// A small id space (`x0`..`x2`), so ids collide often.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Id(u8);

impl Id {
    fn s(self) -> String {
        format!("x{}", self.0 % 3)
    }
}

/// One of a few strings for an enumerated payload field, or junk.
fn pick(options: &[&str], i: u8) -> String {
    options.get(usize::from(i) % (options.len() + 1)).map_or_else(|| "JUNK".to_string(), |s| s.to_string())
}

/// A typed message of some mode (sent in whatever session the op names, so
/// cross-mode messages are tried too). Fields pick the payload fields of
/// the same names from small value sets (see [`Msg::encode`]).
#[allow(missing_docs)]
#[derive(Arbitrary, Clone, Debug)]
pub enum Msg {
    /// decision Proposal.
    DProposal { id: Id },
    /// decision Evaluation.
    DEvaluation { id: Id, rec: u8, confidence: u8 },
    /// decision Objection.
    DObjection { id: Id, severity: u8 },
    /// decision Vote.
    DVote { id: Id, vote: u8 },
    /// proposal Proposal.
    PProposal { id: Id },
    /// proposal CounterProposal.
    PCounter { id: Id, supersedes: Id },
    /// proposal Accept.
    PAccept { id: Id },
    /// proposal Reject.
    PReject { id: Id, terminal: bool },
    /// proposal Withdraw.
    PWithdraw { id: Id },
    /// task TaskRequest.
    TRequest { id: Id, assignee: Option<Who>, deadline: u8 },
    /// task TaskAccept.
    TAccept { id: Id, assignee: Who },
    /// task TaskReject.
    TReject { id: Id, assignee: Who },
    /// task TaskUpdate.
    TUpdate { id: Id, status: u8, progress: u8 },
    /// task TaskComplete.
    TComplete { id: Id, assignee: Who, output: bool },
    /// task TaskFail.
    TFail { id: Id, assignee: Who, retryable: bool },
    /// handoff HandoffOffer.
    HOffer { id: Id, target: Who },
    /// handoff HandoffContext.
    HContext { id: Id },
    /// handoff HandoffAccept.
    HAccept { id: Id, by: Who, implicit: bool },
    /// handoff HandoffDecline.
    HDecline { id: Id, by: Who },
    /// quorum ApprovalRequest.
    QRequest { id: Id, required: u8 },
    /// quorum Approve.
    QApprove { id: Id },
    /// quorum Reject.
    QReject { id: Id },
    /// quorum Abstain.
    QAbstain { id: Id },
    /// multi_round Contribute.
    Contribute { value: u8 },
    /// An extension mode's free-form Note.
    Note,
    /// A Commitment; `fields` picks which common field is wrong, if any.
    Commitment { positive: bool, action: u8, fields: u8, id: Id, supersedes: bool },
}

impl Msg {
    /// Its message type and encoded payload.
    pub fn encode(&self, now: i64) -> (&'static str, Vec<u8>) {
        match self.clone() {
            Msg::DProposal { id } => (
                "Proposal",
                decision::ProposalPayload {
                    proposal_id: id.s(),
                    option: "o".into(),
                    rationale: "r".into(),
                    supporting_data: vec![],
                }
                .encode_to_vec(),
            ),
            Msg::DEvaluation { id, rec, confidence } => (
                "Evaluation",
                decision::EvaluationPayload {
                    proposal_id: id.s(),
                    recommendation: pick(&["APPROVE", "REVIEW", "BLOCK", "REJECT"], rec),
                    confidence: f64::from(confidence) / 200.0,
                    reason: "r".into(),
                }
                .encode_to_vec(),
            ),
            Msg::DObjection { id, severity } => (
                "Objection",
                decision::ObjectionPayload {
                    proposal_id: id.s(),
                    reason: "r".into(),
                    severity: pick(&["low", "medium", "high", "critical", ""], severity),
                }
                .encode_to_vec(),
            ),
            Msg::DVote { id, vote } => (
                "Vote",
                decision::VotePayload {
                    proposal_id: id.s(),
                    vote: pick(&["APPROVE", "REJECT", "ABSTAIN"], vote),
                    reason: String::new(),
                }
                .encode_to_vec(),
            ),
            Msg::PProposal { id } => (
                "Proposal",
                proposal::ProposalPayload {
                    proposal_id: id.s(),
                    title: "t".into(),
                    summary: "s".into(),
                    details: vec![],
                    tags: vec![],
                }
                .encode_to_vec(),
            ),
            Msg::PCounter { id, supersedes } => (
                "CounterProposal",
                proposal::CounterProposalPayload {
                    proposal_id: id.s(),
                    supersedes_proposal_id: supersedes.s(),
                    title: "t".into(),
                    summary: "s".into(),
                    details: vec![],
                }
                .encode_to_vec(),
            ),
            Msg::PAccept { id } => {
                ("Accept", proposal::AcceptPayload { proposal_id: id.s(), reason: String::new() }.encode_to_vec())
            }
            Msg::PReject { id, terminal } => (
                "Reject",
                proposal::RejectPayload { proposal_id: id.s(), terminal, reason: String::new() }.encode_to_vec(),
            ),
            Msg::PWithdraw { id } => {
                ("Withdraw", proposal::WithdrawPayload { proposal_id: id.s(), reason: String::new() }.encode_to_vec())
            }
            Msg::TRequest { id, assignee, deadline } => (
                "TaskRequest",
                task::TaskRequestPayload {
                    task_id: id.s(),
                    title: "t".into(),
                    instructions: "i".into(),
                    requested_assignee: assignee.map(|w| w.name().to_string()).unwrap_or_default(),
                    input: vec![],
                    deadline_unix_ms: match deadline % 4 {
                        0 => 0,
                        1 => now + 1_000,
                        2 => now - 1_000,
                        _ => i64::MAX,
                    },
                }
                .encode_to_vec(),
            ),
            Msg::TAccept { id, assignee } => (
                "TaskAccept",
                task::TaskAcceptPayload { task_id: id.s(), assignee: assignee.name().into(), reason: String::new() }
                    .encode_to_vec(),
            ),
            Msg::TReject { id, assignee } => (
                "TaskReject",
                task::TaskRejectPayload { task_id: id.s(), assignee: assignee.name().into(), reason: String::new() }
                    .encode_to_vec(),
            ),
            Msg::TUpdate { id, status, progress } => (
                "TaskUpdate",
                task::TaskUpdatePayload {
                    task_id: id.s(),
                    status: pick(&["in_progress", "blocked", "completed"], status),
                    progress: f64::from(progress) / 100.0,
                    message: String::new(),
                    partial_output: vec![],
                }
                .encode_to_vec(),
            ),
            Msg::TComplete { id, assignee, output } => (
                "TaskComplete",
                task::TaskCompletePayload {
                    task_id: id.s(),
                    assignee: assignee.name().into(),
                    output: if output { b"out".to_vec() } else { vec![] },
                    summary: "s".into(),
                }
                .encode_to_vec(),
            ),
            Msg::TFail { id, assignee, retryable } => (
                "TaskFail",
                task::TaskFailPayload {
                    task_id: id.s(),
                    assignee: assignee.name().into(),
                    error_code: "E".into(),
                    reason: String::new(),
                    retryable,
                }
                .encode_to_vec(),
            ),
            Msg::HOffer { id, target } => (
                "HandoffOffer",
                handoff::HandoffOfferPayload {
                    handoff_id: id.s(),
                    target_participant: target.name().into(),
                    scope: "s".into(),
                    reason: String::new(),
                }
                .encode_to_vec(),
            ),
            Msg::HContext { id } => (
                "HandoffContext",
                handoff::HandoffContextPayload {
                    handoff_id: id.s(),
                    content_type: "text/plain".into(),
                    context: b"c".to_vec(),
                }
                .encode_to_vec(),
            ),
            Msg::HAccept { id, by, implicit } => (
                "HandoffAccept",
                handoff::HandoffAcceptPayload {
                    handoff_id: id.s(),
                    accepted_by: by.name().into(),
                    reason: String::new(),
                    implicit,
                }
                .encode_to_vec(),
            ),
            Msg::HDecline { id, by } => (
                "HandoffDecline",
                handoff::HandoffDeclinePayload {
                    handoff_id: id.s(),
                    declined_by: by.name().into(),
                    reason: String::new(),
                }
                .encode_to_vec(),
            ),
            Msg::QRequest { id, required } => (
                "ApprovalRequest",
                quorum::ApprovalRequestPayload {
                    request_id: id.s(),
                    action: "a".into(),
                    summary: "s".into(),
                    details: vec![],
                    required_approvals: u32::from(required % 6),
                }
                .encode_to_vec(),
            ),
            Msg::QApprove { id } => {
                ("Approve", quorum::ApprovePayload { request_id: id.s(), reason: String::new() }.encode_to_vec())
            }
            Msg::QReject { id } => {
                ("Reject", quorum::RejectPayload { request_id: id.s(), reason: String::new() }.encode_to_vec())
            }
            Msg::QAbstain { id } => {
                ("Abstain", quorum::AbstainPayload { request_id: id.s(), reason: String::new() }.encode_to_vec())
            }
            Msg::Contribute { value } => {
                ("Contribute", multi_round::ContributePayload { value: format!("v{}", value % 3) }.encode_to_vec())
            }
            Msg::Note => ("Note", b"note".to_vec()),
            Msg::Commitment { positive, action, fields, id, supersedes } => {
                let wrong = fields % 8;
                let c = CommitmentPayload {
                    commitment_id: format!("c{}", id.s()),
                    action: pick(
                        &[
                            "decision.selected",
                            "decision.rejected",
                            "proposal.accepted",
                            "task.completed",
                            "handoff.accepted",
                            "quorum.approved",
                            "multi_round.converged",
                        ],
                        action,
                    ),
                    authority_scope: "fuzz".into(),
                    reason: "r".into(),
                    mode_version: if wrong == 1 { "9.9.9".into() } else { "1.0.0".into() },
                    policy_version: match wrong {
                        2 => "policy.nope".into(),
                        3 => format!("policy.fuzz.{}", id.0 % 5),
                        5 => "policy.default".into(),
                        _ => String::new(),
                    },
                    configuration_version: if wrong == 4 { "cfg-2".into() } else { "cfg-1".into() },
                    outcome_positive: positive,
                    supersedes: supersedes
                        .then(|| CommitmentRef { session_id: slot_id(0), commitment_hash: "h".into() }),
                };
                ("Commitment", c.encode_to_vec())
            }
        }
    }
}

/// A control-plane message type sent as an envelope (forbidden to clients),
/// or another type name the modes do not define.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum RawType {
    /// A mode type picked by index.
    Named(u8),
    /// SessionCancel / SessionSuspend / SessionResume.
    RuntimeOnly(u8),
    /// `Signal` with a session (invalid) or garbage payload.
    Signal,
    /// `Progress`.
    Progress,
    /// Empty type.
    Empty,
}

impl RawType {
    fn name(self) -> String {
        match self {
            RawType::Named(i) => pick(
                &[
                    "Proposal",
                    "Vote",
                    "Evaluation",
                    "Objection",
                    "Accept",
                    "Reject",
                    "TaskRequest",
                    "TaskComplete",
                    "HandoffOffer",
                    "HandoffAccept",
                    "ApprovalRequest",
                    "Approve",
                    "Contribute",
                    "Commitment",
                    "SessionStart",
                    "Note",
                ],
                i,
            ),
            RawType::RuntimeOnly(i) => pick(&["SessionCancel", "SessionSuspend", "SessionResume"], i),
            RawType::Signal => "Signal".into(),
            RawType::Progress => "Progress".into(),
            RawType::Empty => String::new(),
        }
    }
}

/// Policy rule templates: one or more per mode schema, the shared
/// commitment section, and free text. Fields pick the rule values of the
/// same names (see [`Rules::text`]).
#[allow(missing_docs)]
#[derive(Arbitrary, Clone, Debug)]
pub enum Rules {
    /// `{}`.
    Empty,
    /// `commitment.authority` any_participant / designated_role / junk.
    Authority(u8),
    /// decision voting with an algorithm, threshold and quorum.
    Voting { algorithm: u8, threshold: u8, quorum: u8 },
    /// decision objection handling.
    Objections { vetoes: bool, veto_threshold: u8, action: u8 },
    /// decision evaluation gates.
    Evaluation { min_confidence: u8, required: bool },
    /// proposal acceptance criterion.
    Acceptance(u8),
    /// task assignment / completion rules.
    Task { reassign: bool, require_output: bool },
    /// handoff implicit-accept timeout.
    Implicit(u16),
    /// quorum threshold.
    Threshold { kind: u8, value: u8 },
    /// quorum abstention handling.
    Abstention { counts: bool, interpretation: u8 },
    /// Anything.
    Text(String),
}

impl Rules {
    /// The JSON text.
    pub fn text(&self) -> String {
        match self {
            Rules::Empty => "{}".into(),
            Rules::Authority(i) => match i % 4 {
                0 => r#"{"commitment":{"authority":"any_participant"}}"#.into(),
                1 => r#"{"commitment":{"authority":"designated_role","designated_roles":["B"]}}"#.into(),
                2 => r#"{"commitment":{"authority":"initiator_only"}}"#.into(),
                _ => r#"{"commitment":{"authority":"designated_role","designated_roles":[]}}"#.into(),
            },
            Rules::Voting { algorithm, threshold, quorum } => format!(
                r#"{{"voting":{{"algorithm":"{}","threshold":{},"quorum":{{"type":"count","value":{}}}}}}}"#,
                pick(&["none", "majority", "supermajority", "unanimous", "plurality"], *algorithm),
                f64::from(*threshold) / 200.0,
                quorum % 5
            ),
            Rules::Objections { vetoes, veto_threshold, action } => format!(
                r#"{{"objection_handling":{{"critical_severity_vetoes":{vetoes},"veto_threshold":{},"critical_objection_action":"{}"}}}}"#,
                veto_threshold % 4,
                pick(&["deny", "hold", "finalize_decline"], *action)
            ),
            Rules::Evaluation { min_confidence, required } => format!(
                r#"{{"evaluation":{{"minimum_confidence":{},"required_before_voting":{required}}}}}"#,
                f64::from(*min_confidence) / 200.0
            ),
            Rules::Acceptance(i) => {
                format!(
                    r#"{{"acceptance":{{"criterion":"{}"}}}}"#,
                    pick(&["all_parties", "counterparty", "initiator"], *i)
                )
            }
            Rules::Task { reassign, require_output } => format!(
                r#"{{"assignment":{{"allow_reassignment_on_reject":{reassign}}},"completion":{{"require_output":{require_output}}}}}"#
            ),
            Rules::Implicit(ms) => format!(r#"{{"acceptance":{{"implicit_accept_timeout_ms":{}}}}}"#, ms % 200),
            Rules::Threshold { kind, value } => format!(
                r#"{{"threshold":{{"type":"{}","value":{}}}}}"#,
                pick(&["n_of_m", "count", "percentage", "weighted"], *kind),
                value % 120
            ),
            Rules::Abstention { counts, interpretation } => format!(
                r#"{{"abstention":{{"counts_toward_quorum":{counts},"interpretation":"{}"}}}}"#,
                pick(&["neutral", "implicit_reject", "ignored"], *interpretation)
            ),
            Rules::Text(t) => t.clone(),
        }
    }
}

/// One operation.
#[derive(Arbitrary, Clone, Debug)]
pub enum Op {
    /// A SessionStart.
    Start {
        /// Which session slot.
        slot: u8,
        /// Its mode.
        mode: ModeSel,
        /// The sender.
        who: Who,
        /// Participants: bit i adds `I A B C X` (i = 0..5); bit 5 duplicates one; bit 6 adds an empty name.
        participants: u8,
        /// `ttl_ms` choice.
        ttl: u8,
        /// `max_suspend_ms` choice.
        max_suspend: u8,
        /// `policy_version`: 0 default, 1..=4 `policy.fuzz.N`, 5 unknown.
        policy: u8,
        /// Timestamp: 0 (server clock) or skewed.
        timestamp: u8,
        /// Whether the mode version is right.
        version_ok: bool,
    },
    /// A typed mode message.
    Send {
        /// Which session slot.
        slot: u8,
        /// The sender.
        who: Who,
        /// Another mode id on the envelope than the session's.
        mode: Option<ModeSel>,
        /// The message.
        msg: Msg,
        /// Its message id, from a small space (collisions = duplicates).
        mid: u8,
    },
    /// Any type, any payload bytes.
    Raw {
        /// Which session slot.
        slot: u8,
        /// The sender.
        who: Who,
        /// The type.
        message_type: RawType,
        /// The payload.
        payload: Vec<u8>,
        /// Its message id.
        mid: u8,
    },
    /// An ambient Signal or Progress.
    Ambient {
        /// The sender.
        who: Who,
        /// Signal (true) or Progress.
        signal: bool,
        /// An empty signal type (invalid).
        empty_type: bool,
    },
    /// Cancel / Suspend / Resume.
    Control {
        /// Which session slot.
        slot: u8,
        /// Who asks.
        who: Who,
        /// Which operation (mod 3).
        op: u8,
    },
    /// RegisterPolicy `policy.fuzz.N`.
    RegisterPolicy {
        /// N (mod 5).
        id: u8,
        /// Its mode; `None` is `*`.
        mode: Option<ModeSel>,
        /// Its rules.
        rules: Rules,
        /// Its schema version (mod 4).
        schema: u8,
        /// As a non-admin.
        unprivileged: bool,
    },
    /// UnregisterPolicy.
    UnregisterPolicy {
        /// N (mod 5); 5 is `policy.default`.
        id: u8,
    },
    /// RegisterExtMode.
    RegisterMode {
        /// Which extension.
        mode: ModeSel,
        /// Bit 0 drops Commitment from the terminal types, bit 1 adds a
        /// second message type.
        variant: u8,
    },
    /// UnregisterExtMode.
    UnregisterMode {
        /// Which one.
        mode: ModeSel,
    },
    /// PromoteMode.
    PromoteMode {
        /// Which one.
        mode: ModeSel,
        /// The new name; `None` keeps the name.
        to: Option<ModeSel>,
    },
    /// The clock moves (see [`Op::advance_ms`]).
    Advance(u8),
    /// A tick at the current clock.
    Tick,
    /// The n-th previous envelope again (a retry / network duplicate).
    Resend(u8),
    /// A scripted step of a conformance vector, in the base kernel's session
    /// for that vector, optionally sent by someone else.
    Vector {
        /// Which base session (mod the number with steps).
        session: u8,
        /// Which of its steps (mod its length).
        step: u8,
        /// Another sender than the step's.
        who: Option<Who>,
    },
    /// The kernel restarts from its own checkpoint.
    Restart,
}

/// The session ids behind the slots: four strict UUIDs, a base64url token,
/// and one invalid id.
pub fn slot_id(slot: u8) -> String {
    match slot % 6 {
        0..=3 => format!("00000000-0000-4000-8000-00000000000{}", slot % 6),
        4 => "fuzz_session_token_abcdefghij".into(),
        _ => "Not A Valid Id".into(),
    }
}

impl Op {
    /// The clock step of [`Op::Advance`], in ms.
    pub fn advance_ms(step: u8) -> i64 {
        const STEPS: [i64; 16] =
            [1, 10, 49, 50, 51, 100, 1_000, 5_000, 30_000, 59_999, 60_001, 120_000, 86_400_001, -1, -500, -60_000];
        STEPS[usize::from(step % 16)]
    }
}

/// Turns ops into kernel inputs, remembering sent envelopes for resends and
/// the mode each slot was last started with.
#[derive(Default)]
pub struct Interpreter {
    sent: Vec<(Identity, Envelope)>,
    slot_mode: [Option<ModeSel>; 6],
    request: u64,
}

/// What an op asks the driver to do.
// A transient value, moved once per op: boxing the input would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Run this input.
    Input(Input),
    /// Move the clock.
    Advance(i64),
    /// Restart from a checkpoint.
    Restart,
    /// Nothing.
    Nothing,
}

impl Interpreter {
    fn next(&mut self) -> u64 {
        self.request += 1;
        self.request
    }

    fn envelope(&mut self, who: Who, env: Envelope) -> Step {
        let identity = who.identity();
        self.sent.push((identity.clone(), env.clone()));
        Step::Input(Input::Envelope { request: self.next(), identity, envelope: env })
    }

    /// The input (or other step) for one op at clock `now`.
    pub fn step(&mut self, op: &Op, now: i64) -> Step {
        match op {
            Op::Start { slot, mode, who, participants, ttl, max_suspend, policy, timestamp, version_ok } => {
                let mut ps: Vec<String> = [Who::I, Who::A, Who::B, Who::C, Who::Outsider]
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| participants & (1 << i) != 0)
                    .map(|(_, w)| w.name().to_string())
                    .collect();
                if participants & 0x20 != 0 {
                    if let Some(first) = ps.first().cloned() {
                        ps.push(first);
                    }
                }
                if participants & 0x40 != 0 {
                    ps.push(String::new());
                }
                let payload = SessionStartPayload {
                    intent: "fuzz".into(),
                    participants: ps,
                    mode_version: if *version_ok { "1.0.0".into() } else { "2.0.0".into() },
                    configuration_version: "cfg-1".into(),
                    policy_version: match policy % 7 {
                        0 => String::new(),
                        n @ 1..=5 => format!("policy.fuzz.{}", n - 1),
                        _ => "policy.default".into(),
                    },
                    ttl_ms: [0, 1, 100, 1_000, 60_000, 86_400_000, 86_400_001, -5][usize::from(ttl % 8)],
                    max_suspend_ms: [0, 50, 5_000, -1][usize::from(max_suspend % 4)],
                    ..Default::default()
                };
                let sid = slot_id(*slot);
                self.slot_mode[usize::from(slot % 6)] = Some(*mode);
                let env = Envelope {
                    macp_version: "1.0".into(),
                    mode: mode.id().into(),
                    message_type: "SessionStart".into(),
                    message_id: format!("start-{}-{}", slot % 6, timestamp % 2),
                    session_id: sid,
                    sender: who.name().into(),
                    timestamp_unix_ms: match timestamp % 5 {
                        0 | 1 => 0,
                        2 => now - 100,
                        3 => now + 400_000,
                        _ => now - 86_400_000,
                    },
                    payload: payload.encode_to_vec(),
                };
                self.envelope(*who, env)
            }
            Op::Send { slot, who, mode, msg, mid } => {
                let (t, payload) = msg.encode(now);
                let m = mode.or(self.slot_mode[usize::from(slot % 6)]).unwrap_or(ModeSel::Decision);
                let env = Envelope {
                    macp_version: "1.0".into(),
                    mode: m.id().into(),
                    message_type: t.into(),
                    message_id: format!("m{}", mid % 16),
                    session_id: slot_id(*slot),
                    sender: if mid & 0x80 != 0 { String::new() } else { who.name().into() },
                    timestamp_unix_ms: now,
                    payload,
                };
                self.envelope(*who, env)
            }
            Op::Raw { slot, who, message_type, payload, mid } => {
                let m = self.slot_mode[usize::from(slot % 6)].unwrap_or(ModeSel::Decision);
                let env = Envelope {
                    macp_version: if mid & 0x40 != 0 { "0.9".into() } else { "1.0".into() },
                    mode: m.id().into(),
                    message_type: message_type.name(),
                    message_id: if mid & 0x20 != 0 { "macp-runtime:x".into() } else { format!("m{}", mid % 16) },
                    session_id: slot_id(*slot),
                    sender: who.name().into(),
                    timestamp_unix_ms: now,
                    payload: payload.clone(),
                };
                self.envelope(*who, env)
            }
            Op::Ambient { who, signal, empty_type } => {
                let (t, payload) = if *signal {
                    let p = SignalPayload {
                        signal_type: if *empty_type { " ".into() } else { "heartbeat".into() },
                        ..Default::default()
                    };
                    ("Signal", p.encode_to_vec())
                } else {
                    ("Progress", ProgressPayload::default().encode_to_vec())
                };
                let env = Envelope {
                    macp_version: "1.0".into(),
                    mode: String::new(),
                    message_type: t.into(),
                    message_id: format!("amb-{}", self.request),
                    session_id: String::new(),
                    sender: who.name().into(),
                    timestamp_unix_ms: now,
                    payload,
                };
                self.envelope(*who, env)
            }
            Op::Control { slot, who, op } => Step::Input(Input::Control {
                request: self.next(),
                identity: who.identity(),
                op: [ControlOp::Cancel, ControlOp::Suspend, ControlOp::Resume][usize::from(op % 3)],
                session_id: slot_id(*slot),
                reason: "fuzz".into(),
            }),
            Op::RegisterPolicy { id, mode, rules, schema, unprivileged } => {
                let identity = if *unprivileged { Who::Limited.identity() } else { Identity::new("admin") };
                Step::Input(Input::RegisterPolicy {
                    request: self.next(),
                    identity,
                    descriptor: PolicyDescriptor {
                        policy_id: format!("policy.fuzz.{}", id % 5),
                        mode: mode.map_or("*", |m| m.id()).into(),
                        description: "fuzz".into(),
                        rules: rules.text(),
                        schema_version: u32::from(schema % 4),
                        registered_at_unix_ms: 0,
                    },
                })
            }
            Op::UnregisterPolicy { id } => Step::Input(Input::UnregisterPolicy {
                request: self.next(),
                identity: Identity::new("admin"),
                policy_id: if id % 6 == 5 { "policy.default".into() } else { format!("policy.fuzz.{}", id % 6) },
            }),
            Op::RegisterMode { mode, variant } => {
                let mut types = vec!["SessionStart".to_string(), "Note".to_string(), "Commitment".to_string()];
                if variant & 2 != 0 {
                    types.push("Vote".into());
                }
                Step::Input(Input::RegisterExtMode {
                    request: self.next(),
                    identity: Identity::new("admin"),
                    descriptor: ModeDescriptor {
                        mode: mode.id().into(),
                        mode_version: "1.0.0".into(),
                        message_types: types,
                        terminal_message_types: if variant & 1 != 0 {
                            vec!["Note".into()]
                        } else {
                            vec!["Commitment".into()]
                        },
                        ..Default::default()
                    },
                })
            }
            Op::UnregisterMode { mode } => Step::Input(Input::UnregisterExtMode {
                request: self.next(),
                identity: Identity::new("admin"),
                mode: mode.id().into(),
            }),
            Op::PromoteMode { mode, to } => Step::Input(Input::PromoteMode {
                request: self.next(),
                identity: Identity::new("admin"),
                mode: mode.id().into(),
                promoted_mode_name: to.map(|m| m.id().to_string()).unwrap_or_default(),
            }),
            Op::Advance(step) => Step::Advance(Op::advance_ms(*step)),
            Op::Tick => Step::Input(Input::Tick),
            Op::Resend(back) => {
                if self.sent.is_empty() {
                    return Step::Nothing;
                }
                let i = self.sent.len() - 1 - usize::from(*back) % self.sent.len();
                let (identity, envelope) = self.sent[i].clone();
                Step::Input(Input::Envelope { request: self.next(), identity, envelope })
            }
            Op::Restart => Step::Restart,
            Op::Vector { session, step, who } => {
                let scripted: Vec<_> = crate::base::base().sessions.iter().filter(|s| !s.steps.is_empty()).collect();
                if scripted.is_empty() {
                    return Step::Nothing;
                }
                let s = scripted[usize::from(*session) % scripted.len()];
                let mut env = s.steps[usize::from(*step) % s.steps.len()].clone();
                env.timestamp_unix_ms = now;
                let identity = match who {
                    Some(w) => {
                        env.sender = w.name().into();
                        w.identity()
                    }
                    None => Identity::new(env.sender.clone()),
                };
                self.sent.push((identity.clone(), env.clone()));
                Step::Input(Input::Envelope { request: self.next(), identity, envelope: env })
            }
        }
    }
}
