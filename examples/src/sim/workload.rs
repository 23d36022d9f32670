//! What the simulated clients send: one script per session, for every mode.
//!
//! Each script is the mode's normal course (the conformance vectors' happy
//! paths, with random participants, choices and outcomes) so that most
//! sessions really resolve, salted with the mistakes real clients make:
//! messages from outsiders, undecodable payloads, a Commitment sent too
//! early, a reused message id with other content, control operations
//! (suspend/resume/cancel) at random points. Whatever the kernel decides
//! about each message, the simulator's invariants must hold.

use macp_kernel::macp_wire::modes::{decision, handoff, multi_round, proposal, quorum, task};
use macp_kernel::macp_wire::v1::{CommitmentPayload, Envelope, PolicyDescriptor, SessionStartPayload};
use macp_kernel::macp_wire::Message as _;
use macp_kernel::{ControlOp, Identity};

use super::rng::Rng;

/// The mode ids the simulator runs, in the order stats report them.
pub const MODES: [&str; 6] = [
    "macp.mode.decision.v1",
    "macp.mode.proposal.v1",
    "macp.mode.task.v1",
    "macp.mode.handoff.v1",
    "macp.mode.quorum.v1",
    "ext.multi_round.v1",
];

/// The identity that registers the run's policies.
pub const ADMIN: &str = "agent://sim-admin";
/// Never a participant of anything.
pub const OUTSIDER: &str = "agent://outsider";

/// Policies every run registers first (id, mode, schema version, rules).
/// The handoff timeout is drawn per run.
pub fn policies(rng: &mut Rng) -> Vec<PolicyDescriptor> {
    let implicit = rng.range(20, 400);
    [
        (
            "policy.sim.handoff-implicit",
            "macp.mode.handoff.v1",
            1,
            format!(r#"{{"acceptance":{{"implicit_accept_timeout_ms":{implicit}}}}}"#),
        ),
        ("policy.sim.quorum-two", "macp.mode.quorum.v1", 1, r#"{"threshold":{"type":"n_of_m","value":2}}"#.to_string()),
        ("policy.sim.any", "*", 1, r#"{"commitment":{"authority":"any_participant"}}"#.to_string()),
        (
            "policy.sim.majority",
            "macp.mode.decision.v1",
            2,
            r#"{"voting":{"algorithm":"majority"},"commitment":{"authority":"initiator_only"}}"#.to_string(),
        ),
    ]
    .into_iter()
    .map(|(id, mode, schema_version, rules)| PolicyDescriptor {
        policy_id: id.into(),
        mode: mode.into(),
        description: "simulator policy".into(),
        rules,
        schema_version,
        registered_at_unix_ms: 0,
    })
    .collect()
}

/// One thing a client asks of the server.
#[derive(Clone, Debug)]
pub enum Action {
    /// Send an envelope as `identity`.
    Envelope {
        /// Who sends it.
        identity: Identity,
        /// What is sent.
        envelope: Envelope,
    },
    /// Cancel / suspend / resume a session.
    Control {
        /// Who asks.
        identity: Identity,
        /// Which operation.
        op: ControlOp,
        /// Which session.
        session_id: String,
    },
    /// Register a policy.
    RegisterPolicy(PolicyDescriptor),
}

/// A session's client program.
#[derive(Clone, Debug)]
pub struct Script {
    /// The session id (empty for the admin script).
    pub session_id: String,
    /// The mode id (empty for the admin script).
    pub mode: String,
    /// What to send, in order.
    pub items: Vec<Action>,
    /// How many items may be in flight at once (more = more reordering).
    pub window: usize,
    /// Simulated time at which the client starts.
    pub start_at: i64,
}

/// The admin's script: register the run's policies.
pub fn admin_script(policies: Vec<PolicyDescriptor>) -> Script {
    Script {
        session_id: String::new(),
        mode: String::new(),
        items: policies.into_iter().map(Action::RegisterPolicy).collect(),
        window: 1,
        start_at: 0,
    }
}

/// Builds envelopes for one session.
struct Builder<'a> {
    rng: &'a mut Rng,
    sid: String,
    mode: &'static str,
    policy: String,
    next_mid: u32,
    items: Vec<Action>,
}

impl Builder<'_> {
    fn mid(&mut self) -> String {
        self.next_mid += 1;
        format!("{}-m{}", &self.sid[..8], self.next_mid)
    }

    fn env(&mut self, sender: &str, message_type: &str, payload: Vec<u8>) -> Action {
        let message_id = self.mid();
        Action::Envelope {
            identity: Identity::new(sender),
            envelope: Envelope {
                macp_version: "1.0".into(),
                mode: self.mode.into(),
                message_type: message_type.into(),
                message_id,
                session_id: self.sid.clone(),
                // Half the clients leave the sender for the server to fill in.
                sender: if self.rng.chance(0.5) { sender.into() } else { String::new() },
                timestamp_unix_ms: 0,
                payload,
            },
        }
    }

    fn send(&mut self, sender: &str, message_type: &str, payload: Vec<u8>) {
        let a = self.env(sender, message_type, payload);
        self.items.push(a);
    }

    fn commit(&mut self, sender: &str, action: &str, positive: bool) {
        let c = CommitmentPayload {
            commitment_id: format!("c{}", self.next_mid),
            action: action.into(),
            authority_scope: "sim".into(),
            reason: "simulated outcome".into(),
            mode_version: "1.0.0".into(),
            policy_version: self.policy.clone(),
            configuration_version: "cfg-1".into(),
            outcome_positive: positive,
            supersedes: None,
        };
        self.send(sender, "Commitment", c.encode_to_vec());
    }

    fn control(&mut self, who: &str, op: ControlOp) {
        self.items.push(Action::Control { identity: Identity::new(who), op, session_id: self.sid.clone() });
    }
}

/// A random session: mode, participants, policy, TTL, the mode's course and
/// some noise. `n` makes the session id unique within the run.
pub fn session_script(rng: &mut Rng, n: u64) -> Script {
    let mode = *rng.pick(&MODES);
    let sid = crate::ids::uuid_v4(rng.next_u64(), n);
    let lead = "agent://lead";
    let workers: Vec<String> = (1..=rng.range(1, 3)).map(|i| format!("agent://w{i}")).collect();
    let mut participants = vec![lead.to_string()];
    participants.extend(workers.iter().cloned());
    let policy = match mode {
        "macp.mode.handoff.v1" if rng.chance(0.5) => "policy.sim.handoff-implicit",
        "macp.mode.quorum.v1" if rng.chance(0.4) => "policy.sim.quorum-two",
        "macp.mode.decision.v1" if rng.chance(0.3) => "policy.sim.majority",
        "macp.mode.decision.v1" | "macp.mode.task.v1" if rng.chance(0.2) => "policy.sim.any",
        _ => "",
    }
    .to_string();
    // Mostly a minute; sometimes short enough to expire mid-course.
    let ttl_ms = if rng.chance(0.15) { rng.range(50, 3_000) } else { 60_000 };
    let start = SessionStartPayload {
        intent: "simulated".into(),
        participants: participants.clone(),
        mode_version: "1.0.0".into(),
        configuration_version: "cfg-1".into(),
        policy_version: policy.clone(),
        ttl_ms,
        max_suspend_ms: if rng.chance(0.3) { rng.range(10, 2_000) } else { 0 },
        ..Default::default()
    };
    let mut b = Builder { rng, sid: sid.clone(), mode, policy, next_mid: 0, items: Vec::new() };
    let start_env = Action::Envelope {
        identity: Identity::new(lead),
        envelope: Envelope {
            macp_version: "1.0".into(),
            mode: mode.into(),
            message_type: "SessionStart".into(),
            message_id: format!("{sid}-start"),
            session_id: sid.clone(),
            sender: lead.into(),
            timestamp_unix_ms: 0,
            payload: start.encode_to_vec(),
        },
    };
    b.items.push(start_env);
    match mode {
        "macp.mode.decision.v1" => decision_course(&mut b, lead, &workers),
        "macp.mode.proposal.v1" => proposal_course(&mut b, lead, &workers),
        "macp.mode.task.v1" => task_course(&mut b, lead, &workers),
        "macp.mode.handoff.v1" => handoff_course(&mut b, lead, &workers),
        "macp.mode.quorum.v1" => quorum_course(&mut b, lead, &workers),
        _ => multi_round_course(&mut b, lead, &workers),
    }
    add_noise(&mut b, lead);
    let window = if b.rng.chance(0.7) { 1 } else { b.rng.range(2, 3) as usize };
    let start_at = b.rng.range(0, 2_000);
    Script { session_id: sid, mode: mode.into(), items: b.items, window, start_at }
}

fn decision_course(b: &mut Builder<'_>, lead: &str, workers: &[String]) {
    let proposer = if b.rng.chance(0.7) { lead.to_string() } else { b.rng.pick(workers).clone() };
    let p = decision::ProposalPayload {
        proposal_id: "p1".into(),
        option: "deploy".into(),
        rationale: "ready".into(),
        supporting_data: vec![],
    };
    b.send(&proposer, "Proposal", p.encode_to_vec());
    if b.rng.chance(0.3) {
        let w = b.rng.pick(workers).clone();
        let e = decision::EvaluationPayload {
            proposal_id: "p1".into(),
            recommendation: b.rng.pick(&["APPROVE", "REVIEW", "BLOCK", "REJECT"]).to_string(),
            confidence: 0.8,
            reason: "checked".into(),
        };
        b.send(&w, "Evaluation", e.encode_to_vec());
    }
    let approve = b.rng.chance(0.7);
    for w in workers {
        let vote = if b.rng.chance(0.85) == approve { "APPROVE" } else { "REJECT" };
        let v = decision::VotePayload { proposal_id: "p1".into(), vote: vote.into(), reason: String::new() };
        b.send(w, "Vote", v.encode_to_vec());
    }
    let committer =
        if b.policy == "policy.sim.any" && b.rng.chance(0.5) { workers[0].clone() } else { lead.to_string() };
    if approve {
        b.commit(&committer, "decision.selected", true);
    } else {
        b.commit(&committer, "decision.rejected", false);
    }
}

fn proposal_course(b: &mut Builder<'_>, lead: &str, workers: &[String]) {
    let seller = workers[0].clone();
    let mut current = "p1".to_string();
    let p = proposal::ProposalPayload {
        proposal_id: current.clone(),
        title: "offer".into(),
        summary: "terms".into(),
        details: vec![],
        tags: vec![],
    };
    b.send(&seller, "Proposal", p.encode_to_vec());
    if b.rng.chance(0.4) {
        let c = proposal::CounterProposalPayload {
            proposal_id: "p2".into(),
            supersedes_proposal_id: current.clone(),
            title: "counter".into(),
            summary: "better terms".into(),
            details: vec![],
        };
        b.send(lead, "CounterProposal", c.encode_to_vec());
        current = "p2".into();
    }
    if b.rng.chance(0.8) {
        let mut everyone = vec![lead.to_string()];
        everyone.extend(workers.iter().cloned());
        for who in everyone {
            let a = proposal::AcceptPayload { proposal_id: current.clone(), reason: String::new() };
            b.send(&who, "Accept", a.encode_to_vec());
        }
        b.commit(lead, "proposal.accepted", true);
    } else {
        let r = proposal::RejectPayload { proposal_id: current.clone(), terminal: true, reason: "no".into() };
        b.send(lead, "Reject", r.encode_to_vec());
        b.commit(lead, "proposal.rejected", false);
    }
}

fn task_course(b: &mut Builder<'_>, lead: &str, workers: &[String]) {
    let worker = workers[0].clone();
    let r = task::TaskRequestPayload {
        task_id: "t1".into(),
        title: "build".into(),
        instructions: "do it".into(),
        requested_assignee: worker.clone(),
        input: vec![],
        deadline_unix_ms: 0,
    };
    b.send(lead, "TaskRequest", r.encode_to_vec());
    let a = task::TaskAcceptPayload { task_id: "t1".into(), assignee: worker.clone(), reason: String::new() };
    b.send(&worker, "TaskAccept", a.encode_to_vec());
    for i in 0..b.rng.range(0, 2) {
        let u = task::TaskUpdatePayload {
            task_id: "t1".into(),
            status: "in_progress".into(),
            progress: 0.3 * (i + 1) as f64,
            message: String::new(),
            partial_output: vec![],
        };
        b.send(&worker, "TaskUpdate", u.encode_to_vec());
    }
    if b.rng.chance(0.8) {
        let c = task::TaskCompletePayload {
            task_id: "t1".into(),
            assignee: worker.clone(),
            output: b"result".to_vec(),
            summary: "done".into(),
        };
        b.send(&worker, "TaskComplete", c.encode_to_vec());
        b.commit(lead, "task.completed", true);
    } else {
        let f = task::TaskFailPayload {
            task_id: "t1".into(),
            assignee: worker.clone(),
            error_code: "E_SIM".into(),
            reason: "failed".into(),
            retryable: false,
        };
        b.send(&worker, "TaskFail", f.encode_to_vec());
        b.commit(lead, "task.failed", false);
    }
}

fn handoff_course(b: &mut Builder<'_>, lead: &str, workers: &[String]) {
    let target = workers[0].clone();
    let o = handoff::HandoffOfferPayload {
        handoff_id: "h1".into(),
        target_participant: target.clone(),
        scope: "support".into(),
        reason: "escalate".into(),
    };
    b.send(lead, "HandoffOffer", o.encode_to_vec());
    if b.rng.chance(0.4) {
        let c = handoff::HandoffContextPayload {
            handoff_id: "h1".into(),
            content_type: "text/plain".into(),
            context: b"notes".to_vec(),
        };
        b.send(lead, "HandoffContext", c.encode_to_vec());
    }
    let implicit = b.policy == "policy.sim.handoff-implicit";
    let answer = b.rng.below(if implicit { 3 } else { 2 });
    match answer {
        0 => {
            let a = handoff::HandoffAcceptPayload {
                handoff_id: "h1".into(),
                accepted_by: target.clone(),
                reason: "ready".into(),
                implicit: false,
            };
            b.send(&target, "HandoffAccept", a.encode_to_vec());
            b.commit(lead, "handoff.accepted", true);
        }
        1 => {
            let d = handoff::HandoffDeclinePayload {
                handoff_id: "h1".into(),
                declined_by: target.clone(),
                reason: "busy".into(),
            };
            b.send(&target, "HandoffDecline", d.encode_to_vec());
            b.commit(lead, "handoff.declined", false);
        }
        // Silence: the runtime's implicit accept (a timer) answers; the
        // owner commits once the clock has moved on.
        _ => b.commit(lead, "handoff.accepted", true),
    }
}

fn quorum_course(b: &mut Builder<'_>, lead: &str, workers: &[String]) {
    let required = b.rng.range(1, workers.len() as i64) as u32;
    let r = quorum::ApprovalRequestPayload {
        request_id: "r1".into(),
        action: "deploy".into(),
        summary: "ship v2".into(),
        details: vec![],
        required_approvals: required,
    };
    b.send(lead, "ApprovalRequest", r.encode_to_vec());
    let mut approvals = 0;
    for w in workers {
        match b.rng.below(4) {
            0 => b.send(
                w,
                "Reject",
                quorum::RejectPayload { request_id: "r1".into(), reason: "no".into() }.encode_to_vec(),
            ),
            1 => b.send(
                w,
                "Abstain",
                quorum::AbstainPayload { request_id: "r1".into(), reason: String::new() }.encode_to_vec(),
            ),
            _ => {
                approvals += 1;
                b.send(
                    w,
                    "Approve",
                    quorum::ApprovePayload { request_id: "r1".into(), reason: "ok".into() }.encode_to_vec(),
                )
            }
        }
    }
    let positive = approvals >= required;
    if !positive {
        // The coordinator is a participant too: its ballot makes the
        // missing approvals unreachable, so the negative outcome is decided.
        b.send(
            lead,
            "Reject",
            quorum::RejectPayload { request_id: "r1".into(), reason: "short".into() }.encode_to_vec(),
        );
    }
    b.commit(lead, if positive { "quorum.approved" } else { "quorum.rejected" }, positive);
}

fn multi_round_course(b: &mut Builder<'_>, lead: &str, workers: &[String]) {
    for _ in 0..b.rng.range(1, 2) {
        for w in workers {
            let value = b.rng.pick(&["option_a", "option_b"]).to_string();
            b.send(w, "Contribute", multi_round::ContributePayload { value }.encode_to_vec());
        }
    }
    for w in workers {
        b.send(w, "Contribute", multi_round::ContributePayload { value: "option_a".into() }.encode_to_vec());
    }
    b.commit(lead, "multi_round.converged", true);
}

/// Mistakes and interruptions at random positions after the SessionStart.
fn add_noise(b: &mut Builder<'_>, lead: &str) {
    let slots = |b: &mut Builder<'_>| 1 + b.rng.index(b.items.len());
    if b.rng.chance(0.15) {
        let at = slots(b);
        let a = b.env(OUTSIDER, "Commitment", b"not a commitment".to_vec());
        b.items.insert(at, a);
    }
    if b.rng.chance(0.1) {
        let at = slots(b);
        let t = b.rng.pick(&["Vote", "Proposal", "TaskAccept", "HandoffAccept", "Approve", "Contribute"]).to_string();
        let a = b.env(lead, &t, vec![0xff, 0x01, 0x02]);
        b.items.insert(at, a);
    }
    if b.rng.chance(0.1) {
        // The same message id as an earlier message, other content: the
        // runtime must treat it as a duplicate of the first.
        let at = slots(b);
        if let Some(Action::Envelope { identity, envelope }) = b.items.get(at - 1).cloned() {
            let mut e = envelope;
            e.payload = b"other content".to_vec();
            b.items.insert(at, Action::Envelope { identity, envelope: e });
        }
    }
    if b.rng.chance(0.08) {
        let at = slots(b);
        let before = b.items.len();
        b.commit(lead, "early", true);
        let c = b.items.remove(before);
        b.items.insert(at, c);
    }
    if b.rng.chance(0.12) {
        let at = slots(b);
        b.items.insert(
            at,
            Action::Control { identity: Identity::new(lead), op: ControlOp::Suspend, session_id: b.sid.clone() },
        );
        let resume_at = (at + 1 + b.rng.index(2)).min(b.items.len());
        b.items.insert(
            resume_at,
            Action::Control { identity: Identity::new(lead), op: ControlOp::Resume, session_id: b.sid.clone() },
        );
    }
    if b.rng.chance(0.05) {
        let at = slots(b);
        b.items.insert(
            at,
            Action::Control { identity: Identity::new(lead), op: ControlOp::Cancel, session_id: b.sid.clone() },
        );
    }
    if b.rng.chance(0.05) {
        // Someone other than the initiator tries to cancel.
        b.control(OUTSIDER, ControlOp::Cancel);
    }
}
