//! One complete, valid session per coordination mode.
//!
//! Each script plays every agent of a small, realistic exchange through dev
//! identities and ends with the Commitment that resolves the session. They
//! double as executable documentation of each mode's rules (DIGEST §3): who
//! may send what, in which order, and what makes a session eligible to
//! commit. The integration test runs all of them and asserts RESOLVED.

use std::fmt::Debug;
use std::time::Instant;

use macp_wire::modes::{decision, handoff, multi_round, proposal, quorum, task};
use macp_wire::v1::{GetSessionRequest, SessionMetadata};
use macp_wire::Message;

use crate::client::{self, Agents};
use crate::envelopes;
use crate::ids;
use crate::transcript::Step;

/// The coordination modes the runtime ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `macp.mode.decision.v1`: proposals, evaluations, votes, a decision.
    Decision,
    /// `macp.mode.proposal.v1`: offers and counter-offers until all accept.
    Proposal,
    /// `macp.mode.task.v1`: one task delegated to one assignee.
    Task,
    /// `macp.mode.handoff.v1`: ownership handed to another participant.
    Handoff,
    /// `macp.mode.quorum.v1`: k-of-n approval of one action.
    Quorum,
    /// `ext.multi_round.v1`: contributions until everyone agrees.
    MultiRound,
}

impl Mode {
    /// Every mode, in the order the examples list them.
    pub const ALL: [Mode; 6] =
        [Mode::Decision, Mode::Proposal, Mode::Task, Mode::Handoff, Mode::Quorum, Mode::MultiRound];

    /// The mode identifier envelopes carry.
    pub fn id(self) -> &'static str {
        match self {
            Mode::Decision => "macp.mode.decision.v1",
            Mode::Proposal => "macp.mode.proposal.v1",
            Mode::Task => "macp.mode.task.v1",
            Mode::Handoff => "macp.mode.handoff.v1",
            Mode::Quorum => "macp.mode.quorum.v1",
            Mode::MultiRound => "ext.multi_round.v1",
        }
    }

    /// The short name used for example programs and flags.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Decision => "decision",
            Mode::Proposal => "proposal",
            Mode::Task => "task",
            Mode::Handoff => "handoff",
            Mode::Quorum => "quorum",
            Mode::MultiRound => "multi_round",
        }
    }

    /// Parses a short name.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == name || m.id() == name)
    }
}

/// The outcome of one scripted session.
#[derive(Clone, Debug)]
pub struct SessionRun {
    /// Which mode ran.
    pub mode: Mode,
    /// The session's id.
    pub session_id: String,
    /// Every envelope sent, with its Ack, in order.
    pub steps: Vec<Step>,
    /// GetSession after the Commitment.
    pub final_state: SessionMetadata,
}

/// A session under construction: sends envelopes as any agent and records
/// each step; any refusal aborts the script, since these are happy paths.
struct Script<'a, F: FnMut(&Step)> {
    agents: &'a Agents,
    mode: Mode,
    session_id: String,
    steps: Vec<Step>,
    on_step: F,
}

impl<F: FnMut(&Step)> Script<'_, F> {
    async fn send<P: Message + Debug>(&mut self, agent: &str, message_type: &str, payload: P) -> crate::Result<()> {
        let env = envelopes::envelope(&self.session_id, self.mode.id(), message_type, agent, payload.encode_to_vec());
        let mut c = self.agents.client(agent);
        let t = Instant::now();
        let ack = client::send(&mut c, env.clone()).await?;
        let step = Step { envelope: env, payload: format!("{payload:?}"), ack, latency: t.elapsed() };
        (self.on_step)(&step);
        let refused = step.ack.error.clone();
        self.steps.push(step);
        match refused {
            None => Ok(()),
            Some(e) => {
                Err(format!("{} {message_type} from {agent} refused: {}: {}", self.mode.id(), e.code, e.message).into())
            }
        }
    }

    async fn start(&mut self, initiator: &str, intent: &str, participants: &[&str]) -> crate::Result<()> {
        self.send(initiator, "SessionStart", envelopes::start_payload(intent, participants)).await
    }

    async fn commit(&mut self, initiator: &str, action: &str, reason: &str) -> crate::Result<()> {
        // Every action the examples commit is a positive outcome.
        self.send(initiator, "Commitment", envelopes::commitment(action, true, reason)).await
    }

    async fn finish(self, initiator: &str) -> crate::Result<SessionRun> {
        let mut c = self.agents.client(initiator);
        let md = c.get_session(GetSessionRequest { session_id: self.session_id.clone() }).await?.into_inner();
        let final_state = md.metadata.ok_or("GetSession returned no metadata")?;
        Ok(SessionRun { mode: self.mode, session_id: self.session_id, steps: self.steps, final_state })
    }
}

/// Runs one complete session of `mode` on a fresh session id, calling
/// `on_step` after every Send (the examples print there), and returns the
/// transcript and the final GetSession.
pub async fn run_session(agents: &Agents, mode: Mode, on_step: impl FnMut(&Step)) -> crate::Result<SessionRun> {
    run_session_with_id(agents, mode, ids::session_id(), on_step).await
}

/// Like [`run_session`] on a session id chosen by the caller, so a watcher
/// can know which session to look for before it starts.
pub async fn run_session_with_id(
    agents: &Agents,
    mode: Mode,
    session_id: String,
    on_step: impl FnMut(&Step),
) -> crate::Result<SessionRun> {
    let mut s = Script { agents, mode, session_id, steps: Vec::new(), on_step };
    let initiator = match mode {
        Mode::Decision => decision_script(&mut s).await?,
        Mode::Proposal => proposal_script(&mut s).await?,
        Mode::Task => task_script(&mut s).await?,
        Mode::Handoff => handoff_script(&mut s).await?,
        Mode::Quorum => quorum_script(&mut s).await?,
        Mode::MultiRound => multi_round_script(&mut s).await?,
    };
    s.finish(initiator).await
}

const COORDINATOR: &str = "agent://coordinator";
const ALICE: &str = "agent://alice";
const BOB: &str = "agent://bob";
const CAROL: &str = "agent://carol";

/// Decision: the coordinator convenes Alice and Bob (it is not listed, so it
/// may not propose or vote, but as initiator it holds commitment authority).
/// Alice proposes, both vote, the coordinator records the decision.
async fn decision_script<F: FnMut(&Step)>(s: &mut Script<'_, F>) -> crate::Result<&'static str> {
    s.start(COORDINATOR, "choose a deployment window", &[ALICE, BOB]).await?;
    s.send(
        ALICE,
        "Proposal",
        decision::ProposalPayload {
            proposal_id: "p1".into(),
            option: "deploy tuesday 10:00".into(),
            rationale: "lowest traffic of the week".into(),
            supporting_data: Vec::new(),
        },
    )
    .await?;
    s.send(
        BOB,
        "Evaluation",
        decision::EvaluationPayload {
            proposal_id: "p1".into(),
            recommendation: "APPROVE".into(),
            confidence: 0.9,
            reason: "no conflicting releases".into(),
        },
    )
    .await?;
    for voter in [ALICE, BOB] {
        let vote = decision::VotePayload { proposal_id: "p1".into(), vote: "APPROVE".into(), reason: "agreed".into() };
        s.send(voter, "Vote", vote).await?;
    }
    s.commit(COORDINATOR, "decision.selected", "p1 approved unanimously").await?;
    Ok(COORDINATOR)
}

/// Proposal: a buyer and a seller negotiate. The seller offers, the buyer
/// counters, both accept the counter (all parties), the buyer commits.
async fn proposal_script<F: FnMut(&Step)>(s: &mut Script<'_, F>) -> crate::Result<&'static str> {
    const BUYER: &str = "agent://buyer";
    const SELLER: &str = "agent://seller";
    s.start(BUYER, "agree on a price", &[BUYER, SELLER]).await?;
    s.send(
        SELLER,
        "Proposal",
        proposal::ProposalPayload {
            proposal_id: "offer-1".into(),
            title: "100 units at 10".into(),
            summary: "list price".into(),
            details: Vec::new(),
            tags: vec!["price".into()],
        },
    )
    .await?;
    s.send(
        BUYER,
        "CounterProposal",
        proposal::CounterProposalPayload {
            proposal_id: "offer-2".into(),
            supersedes_proposal_id: "offer-1".into(),
            title: "100 units at 9".into(),
            summary: "volume discount".into(),
            details: Vec::new(),
        },
    )
    .await?;
    for who in [SELLER, BUYER] {
        s.send(who, "Accept", proposal::AcceptPayload { proposal_id: "offer-2".into(), reason: "deal".into() }).await?;
    }
    s.commit(BUYER, "proposal.accepted", "offer-2 accepted by both parties").await?;
    Ok(BUYER)
}

/// Task: a planner delegates to a worker, who accepts, reports progress and
/// completes; the planner commits the result.
async fn task_script<F: FnMut(&Step)>(s: &mut Script<'_, F>) -> crate::Result<&'static str> {
    const PLANNER: &str = "agent://planner";
    const WORKER: &str = "agent://worker";
    s.start(PLANNER, "summarise the incident report", &[PLANNER, WORKER]).await?;
    s.send(
        PLANNER,
        "TaskRequest",
        task::TaskRequestPayload {
            task_id: "t1".into(),
            title: "summarise".into(),
            instructions: "one paragraph, plain words".into(),
            requested_assignee: WORKER.into(),
            input: b"incident #42".to_vec(),
            deadline_unix_ms: 0,
        },
    )
    .await?;
    s.send(
        WORKER,
        "TaskAccept",
        task::TaskAcceptPayload { task_id: "t1".into(), assignee: WORKER.into(), reason: "on it".into() },
    )
    .await?;
    s.send(
        WORKER,
        "TaskUpdate",
        task::TaskUpdatePayload {
            task_id: "t1".into(),
            status: "drafting".into(),
            progress: 0.5,
            message: "half way".into(),
            partial_output: Vec::new(),
        },
    )
    .await?;
    s.send(
        WORKER,
        "TaskComplete",
        task::TaskCompletePayload {
            task_id: "t1".into(),
            assignee: WORKER.into(),
            output: b"The cache expired early; fixed by extending the TTL.".to_vec(),
            summary: "done".into(),
        },
    )
    .await?;
    s.commit(PLANNER, "task.completed", "t1 completed with output").await?;
    Ok(PLANNER)
}

/// Handoff: the current owner offers a ticket to a target, sends context,
/// the target accepts, the owner commits the handoff.
async fn handoff_script<F: FnMut(&Step)>(s: &mut Script<'_, F>) -> crate::Result<&'static str> {
    const OWNER: &str = "agent://owner";
    const TARGET: &str = "agent://target";
    s.start(OWNER, "hand ticket 7 to tier 2", &[OWNER, TARGET]).await?;
    s.send(
        OWNER,
        "HandoffOffer",
        handoff::HandoffOfferPayload {
            handoff_id: "h1".into(),
            target_participant: TARGET.into(),
            scope: "ticket-7".into(),
            reason: "needs tier 2".into(),
        },
    )
    .await?;
    s.send(
        OWNER,
        "HandoffContext",
        handoff::HandoffContextPayload {
            handoff_id: "h1".into(),
            content_type: "text/plain".into(),
            context: b"customer reports intermittent 502s".to_vec(),
        },
    )
    .await?;
    s.send(
        TARGET,
        "HandoffAccept",
        handoff::HandoffAcceptPayload {
            handoff_id: "h1".into(),
            accepted_by: TARGET.into(),
            reason: "taking it".into(),
            implicit: false,
        },
    )
    .await?;
    s.commit(OWNER, "handoff.accepted", "h1 accepted by the target").await?;
    Ok(OWNER)
}

/// Quorum: the coordinator asks three approvers for two approvals; Carol
/// abstains, Alice and Bob approve, the coordinator commits.
async fn quorum_script<F: FnMut(&Step)>(s: &mut Script<'_, F>) -> crate::Result<&'static str> {
    s.start(COORDINATOR, "approve the production deploy", &[ALICE, BOB, CAROL]).await?;
    s.send(
        COORDINATOR,
        "ApprovalRequest",
        quorum::ApprovalRequestPayload {
            request_id: "r1".into(),
            action: "deploy v2".into(),
            summary: "roll out v2 to production".into(),
            details: Vec::new(),
            required_approvals: 2,
        },
    )
    .await?;
    s.send(CAROL, "Abstain", quorum::AbstainPayload { request_id: "r1".into(), reason: "on leave".into() }).await?;
    for who in [ALICE, BOB] {
        s.send(who, "Approve", quorum::ApprovePayload { request_id: "r1".into(), reason: "lgtm".into() }).await?;
    }
    s.commit(COORDINATOR, "quorum.approved", "2 of 3 approved").await?;
    Ok(COORDINATOR)
}

/// Multi-round: Alice and Bob contribute until their values are equal (the
/// coordinator is outside the convergence set), then the coordinator
/// commits the converged value.
async fn multi_round_script<F: FnMut(&Step)>(s: &mut Script<'_, F>) -> crate::Result<&'static str> {
    s.start(COORDINATOR, "pick a team name", &[ALICE, BOB]).await?;
    for (who, value) in [(ALICE, "heron"), (BOB, "kestrel"), (BOB, "heron")] {
        s.send(who, "Contribute", multi_round::ContributePayload { value: value.into() }).await?;
    }
    s.commit(COORDINATOR, "multi_round.converged", "both contributed 'heron'").await?;
    Ok(COORDINATOR)
}
