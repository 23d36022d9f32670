//! Task mode, `macp.mode.task.v1` (RFC-MACP-0009; DIGEST §3.3).
//!
//! One orchestrator (the session initiator) delegates exactly one task. A
//! participant takes it with `TaskAccept` (the first accept wins), may report
//! progress with `TaskUpdate`, and ends its work with exactly one terminal
//! report, `TaskComplete` or `TaskFail`. A report only makes the session
//! *eligible*; the Commitment (`task.completed` / `task.failed`) resolves it.
//!
//! Policy rules read from the bound policy (DIGEST §6.3):
//! * `assignment.allow_reassignment_on_reject`: without it, any recorded
//!   `TaskReject` closes the task to further accepts and the active assignee
//!   may not reject (both POLICY_DENIED); with it, the assignee may hand the
//!   task back and a later accept is allowed.
//! * `completion.require_output`: a *positive* Commitment needs a
//!   `TaskComplete` with non-empty `output`.

use macp_wire::modes::task::{
    TaskAcceptPayload, TaskCompletePayload, TaskFailPayload, TaskRejectPayload, TaskRequestPayload, TaskUpdatePayload,
};
use macp_wire::v1::{CommitmentPayload, ModeDescriptor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{util, Message, Mode, ModeState, SessionView};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::policy::rules::{admit_common, Level, Shape, SHARED_COMMITMENT};
use crate::policy::{Denial, DenialCode, InvalidRules};

/// The canonical mode id.
pub const MODE_ID: &str = "macp.mode.task.v1";

/// The task mode. Stateless: everything per session lives in its state.
#[derive(Debug, Default, Clone, Copy)]
pub struct TaskMode;

/// The closed shape of a Task `rules` object (RFC-MACP-0012 §4.4).
const SHAPE: Shape = Shape {
    keys: &[
        ("assignment", Level::Object(&Shape { keys: &[("allow_reassignment_on_reject", Level::Leaf)] })),
        ("completion", Level::Object(&Shape { keys: &[("require_output", Level::Leaf)] })),
        ("commitment", Level::Object(&SHARED_COMMITMENT)),
    ],
};

/// The task rules of a bound policy, with their defaults (both off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct TaskRules {
    allow_reassignment_on_reject: bool,
    require_output: bool,
}

/// Reads the task rules out of a policy's `rules` object. Type-level only:
/// unknown keys are ignored so that rules written for a newer schema (or
/// shared sections such as `commitment`) do not break older sessions.
fn parse_rules(rules: &Value) -> Result<TaskRules, String> {
    if !rules.is_object() {
        return Err("task policy rules must be a JSON object".into());
    }
    let mut r = TaskRules::default();
    if let Some(a) = section(rules, "assignment")? {
        r.allow_reassignment_on_reject = flag(a, "assignment", "allow_reassignment_on_reject")?;
    }
    if let Some(c) = section(rules, "completion")? {
        r.require_output = flag(c, "completion", "require_output")?;
    }
    Ok(r)
}

fn section<'a>(rules: &'a Value, name: &str) -> Result<Option<&'a serde_json::Map<String, Value>>, String> {
    match rules.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(format!("rules.{name} must be an object, got {other}")),
    }
}

fn flag(m: &serde_json::Map<String, Value>, section: &str, key: &str) -> Result<bool, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("rules.{section}.{key} must be true or false, got {other}")),
    }
}

/// The one task of the session, as requested.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Task {
    task_id: String,
    title: String,
    instructions: String,
    requested_assignee: String,
    input: Vec<u8>,
    deadline_unix_ms: i64,
    requested_at_ms: i64,
}

/// One accepted `TaskReject`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Rejection {
    participant: String,
    reason: String,
    /// True when the active assignee handed the task back (reassignment).
    while_assigned: bool,
    at_ms: i64,
}

/// One accepted `TaskUpdate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Update {
    sender: String,
    status: String,
    progress: f64,
    message: String,
    partial_output: Vec<u8>,
    at_ms: i64,
}

/// The single terminal report of the assignee.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Report {
    Complete { assignee: String, output: Vec<u8>, summary: String, at_ms: i64 },
    Fail { assignee: String, error_code: String, reason: String, retryable: bool, at_ms: i64 },
}

/// The resolving Commitment, kept for the projection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Outcome {
    commitment_id: String,
    action: String,
    outcome_positive: bool,
}

/// Per-session task state. Plain `Vec`s and `Option`s only, so the postcard
/// snapshot is deterministic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TaskState {
    rules: TaskRules,
    task: Option<Task>,
    active_assignee: Option<String>,
    /// Every participant that has ever been the active assignee, in order.
    assignment_history: Vec<String>,
    rejections: Vec<Rejection>,
    updates: Vec<Update>,
    terminal_report: Option<Report>,
    commitment: Option<Outcome>,
}

fn descriptor() -> ModeDescriptor {
    util::builtin_descriptor(util::BuiltinDescriptor {
        mode: MODE_ID,
        title: "Task",
        description: "Delegates one task from an orchestrator to one participant, which accepts it, reports \
                      progress and completes or fails it; the orchestrator commits the outcome.",
        determinism_class: "structural-only",
        participant_model: "orchestrated",
        message_types: &[
            "SessionStart",
            "TaskRequest",
            "TaskAccept",
            "TaskReject",
            "TaskUpdate",
            "TaskComplete",
            "TaskFail",
            "Commitment",
        ],
    })
}

impl Mode for TaskMode {
    fn descriptor(&self) -> ModeDescriptor {
        descriptor()
    }

    fn validate_rules(&self, rules: &Value, _schema_version: u32) -> Result<(), InvalidRules> {
        admit_common(rules, &SHAPE, "task")?;
        parse_rules(rules).map(|_| ()).map_err(InvalidRules)
    }

    /// Needs someone other than the initiator to delegate to; the initiator
    /// itself need not be listed (an external orchestrator is allowed).
    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>> {
        if !session.participants.iter().any(|p| p != session.initiator) {
            return Err(KernelError::invalid(
                "a task session needs at least one participant other than the initiator to delegate to",
            ));
        }
        // A `*` policy is only checked against the Decision schema when it is
        // registered, so its task sections are checked here.
        let rules =
            parse_rules(&session.policy.rules).map_err(|e| KernelError::new(ErrorCode::InvalidPolicyDefinition, e))?;
        Ok(Box::new(TaskState {
            rules,
            task: None,
            active_assignee: None,
            assignment_history: Vec::new(),
            rejections: Vec::new(),
            updates: Vec::new(),
            terminal_report: None,
            commitment: None,
        }))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<Box<dyn ModeState>, String> {
        Ok(Box::new(util::restore::<TaskState>(snapshot)?))
    }
}

impl TaskState {
    fn phase(&self) -> &'static str {
        if self.commitment.is_some() {
            "Committed"
        } else if self.terminal_report.is_some() {
            "Reported"
        } else if self.active_assignee.is_some() {
            "Assigned"
        } else if self.task.is_some() {
            "Requested"
        } else {
            "AwaitingRequest"
        }
    }

    /// The task every later message must refer to, by `task_id`.
    fn task_for(&self, message_type: &str, task_id: &str) -> KResult<&Task> {
        let task = self.require_task(message_type)?;
        if task.task_id != task_id {
            return Err(KernelError::invalid(format!(
                "{message_type} refers to task '{task_id}', but this session's task is '{}'",
                task.task_id
            )));
        }
        Ok(task)
    }

    fn require_task(&self, message_type: &str) -> KResult<&Task> {
        self.task
            .as_ref()
            .ok_or_else(|| KernelError::invalid(format!("{message_type} before any TaskRequest: there is no task yet")))
    }

    /// TaskAccept/TaskReject authority: the requested assignee if one was
    /// named, otherwise any declared participant other than the initiator.
    fn may_respond(&self, msg: &Message<'_>, task: &Task) -> KResult<()> {
        if !task.requested_assignee.is_empty() {
            if msg.sender != task.requested_assignee {
                return Err(KernelError::forbidden(format!(
                    "task '{}' was requested of {}; only it may send {}",
                    task.task_id, task.requested_assignee, msg.message_type
                )));
            }
        } else if msg.sender == msg.session.initiator {
            return Err(KernelError::forbidden(format!(
                "the initiator {} requested the task and cannot send {} for it",
                msg.sender, msg.message_type
            )));
        }
        Ok(())
    }

    fn on_request(&mut self, msg: &Message<'_>) -> KResult<()> {
        if msg.sender != msg.session.initiator {
            return Err(KernelError::forbidden(format!(
                "only the initiator {} may send TaskRequest",
                msg.session.initiator
            )));
        }
        let p: TaskRequestPayload = util::decode(msg.message_type, msg.payload)?;
        if let Some(t) = &self.task {
            return Err(KernelError::invalid(format!(
                "this session already carries task '{}'; a task session has exactly one TaskRequest",
                t.task_id
            )));
        }
        util::require("task_id", &p.task_id, "TaskRequest")?;
        if !p.requested_assignee.is_empty() && !msg.session.is_participant(&p.requested_assignee) {
            return Err(KernelError::invalid(format!(
                "requested_assignee {} is not a declared participant",
                p.requested_assignee
            )));
        }
        self.task = Some(Task {
            task_id: p.task_id,
            title: p.title,
            instructions: p.instructions,
            requested_assignee: p.requested_assignee,
            input: p.input,
            deadline_unix_ms: p.deadline_unix_ms,
            requested_at_ms: msg.accepted_at_ms,
        });
        Ok(())
    }

    fn on_accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        let task = self.require_task(msg.message_type)?;
        self.may_respond(msg, task)?;
        let p: TaskAcceptPayload = util::decode(msg.message_type, msg.payload)?;
        self.task_for(msg.message_type, &p.task_id)?;
        check_named_sender("assignee", &p.assignee, msg)?;
        if self.terminal_report.is_some() {
            return Err(KernelError::invalid("the task has already been reported complete or failed"));
        }
        if let Some(a) = &self.active_assignee {
            return Err(KernelError::invalid(format!("the task was already accepted by {a}; the first accept wins")));
        }
        if !self.rejections.is_empty() && !self.rules.allow_reassignment_on_reject {
            let rejecters: Vec<&str> = self.rejections.iter().map(|r| r.participant.as_str()).collect();
            return Err(KernelError::policy_denied(vec![Denial::new(
                DenialCode::ReassignmentNotAllowed,
                format!(
                    "the task was rejected by {} and the policy does not set assignment.allow_reassignment_on_reject",
                    rejecters.join(", ")
                ),
            )
            .with_participants(rejecters)]));
        }
        self.active_assignee = Some(msg.sender.to_string());
        self.assignment_history.push(msg.sender.to_string());
        Ok(())
    }

    fn on_reject(&mut self, msg: &Message<'_>) -> KResult<()> {
        let task = self.require_task(msg.message_type)?;
        self.may_respond(msg, task)?;
        let p: TaskRejectPayload = util::decode(msg.message_type, msg.payload)?;
        self.task_for(msg.message_type, &p.task_id)?;
        check_named_sender("assignee", &p.assignee, msg)?;
        if self.terminal_report.is_some() {
            return Err(KernelError::invalid("the task has already been reported complete or failed"));
        }
        if self.rejections.iter().any(|r| r.participant == msg.sender) {
            return Err(KernelError::invalid(format!("{} has already rejected this task", msg.sender)));
        }
        let while_assigned = match &self.active_assignee {
            Some(a) if a == msg.sender => {
                if !self.rules.allow_reassignment_on_reject {
                    return Err(KernelError::policy_denied(vec![Denial::new(
                        DenialCode::ReassignmentNotAllowed,
                        format!(
                            "{} is the active assignee; handing the task back needs \
                             assignment.allow_reassignment_on_reject in the policy",
                            msg.sender
                        ),
                    )
                    .with_participants([msg.sender])]));
                }
                true
            }
            Some(a) => {
                return Err(KernelError::invalid(format!(
                    "the task is assigned to {a}; only the active assignee may reject it now"
                )))
            }
            None => false,
        };
        if while_assigned {
            self.active_assignee = None;
        }
        self.rejections.push(Rejection {
            participant: msg.sender.to_string(),
            reason: p.reason,
            while_assigned,
            at_ms: msg.accepted_at_ms,
        });
        Ok(())
    }

    /// Authority shared by TaskUpdate/TaskComplete/TaskFail: the active
    /// assignee, and only until it has sent its terminal report.
    fn require_assignee(&self, msg: &Message<'_>) -> KResult<()> {
        self.require_task(msg.message_type)?;
        if self.active_assignee.as_deref() != Some(msg.sender) {
            return Err(KernelError::forbidden(match &self.active_assignee {
                Some(a) => format!("only the active assignee {a} may send {}", msg.message_type),
                None => format!("the task has no active assignee, so nobody may send {} yet", msg.message_type),
            }));
        }
        if self.terminal_report.is_some() {
            return Err(KernelError::forbidden(format!(
                "{} already sent its terminal report; no further {} is allowed",
                msg.sender, msg.message_type
            )));
        }
        Ok(())
    }

    fn on_update(&mut self, msg: &Message<'_>) -> KResult<()> {
        self.require_assignee(msg)?;
        let p: TaskUpdatePayload = util::decode(msg.message_type, msg.payload)?;
        self.task_for(msg.message_type, &p.task_id)?;
        self.updates.push(Update {
            sender: msg.sender.to_string(),
            status: p.status,
            progress: p.progress,
            message: p.message,
            partial_output: p.partial_output,
            at_ms: msg.accepted_at_ms,
        });
        Ok(())
    }

    fn on_complete(&mut self, msg: &Message<'_>) -> KResult<()> {
        self.require_assignee(msg)?;
        let p: TaskCompletePayload = util::decode(msg.message_type, msg.payload)?;
        self.task_for(msg.message_type, &p.task_id)?;
        check_named_sender("assignee", &p.assignee, msg)?;
        self.terminal_report = Some(Report::Complete {
            assignee: msg.sender.to_string(),
            output: p.output,
            summary: p.summary,
            at_ms: msg.accepted_at_ms,
        });
        Ok(())
    }

    fn on_fail(&mut self, msg: &Message<'_>) -> KResult<()> {
        self.require_assignee(msg)?;
        let p: TaskFailPayload = util::decode(msg.message_type, msg.payload)?;
        self.task_for(msg.message_type, &p.task_id)?;
        check_named_sender("assignee", &p.assignee, msg)?;
        self.terminal_report = Some(Report::Fail {
            assignee: msg.sender.to_string(),
            error_code: p.error_code,
            reason: p.reason,
            retryable: p.retryable,
            at_ms: msg.accepted_at_ms,
        });
        Ok(())
    }
}

/// A non-empty `assignee`-style field must name the sender: an agent speaks
/// only for itself.
fn check_named_sender(field: &str, value: &str, msg: &Message<'_>) -> KResult<()> {
    if !value.is_empty() && value != msg.sender {
        return Err(KernelError::invalid(format!(
            "{} {field} is {value}, but it was sent by {}; an agent may only speak for itself",
            msg.message_type, msg.sender
        )));
    }
    Ok(())
}

impl ModeState for TaskState {
    fn accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        if self.commitment.is_some() {
            return Err(KernelError::invalid("the task session has already been committed"));
        }
        let known = matches!(
            msg.message_type,
            "TaskRequest" | "TaskAccept" | "TaskReject" | "TaskUpdate" | "TaskComplete" | "TaskFail"
        );
        if !known {
            return Err(super::unknown_message_type(msg.session.mode, msg.message_type));
        }
        // TaskRequest needs no list membership (an external orchestrator);
        // everything else comes from declared participants only.
        if msg.message_type != "TaskRequest" && !msg.session.is_participant(msg.sender) {
            return Err(KernelError::forbidden(format!("{} is not a declared participant", msg.sender)));
        }
        // Every handler runs all of its checks before its first mutation, so
        // an `Err` leaves the state untouched.
        match msg.message_type {
            "TaskRequest" => self.on_request(msg),
            "TaskAccept" => self.on_accept(msg),
            "TaskReject" => self.on_reject(msg),
            "TaskUpdate" => self.on_update(msg),
            "TaskComplete" => self.on_complete(msg),
            _ => self.on_fail(msg),
        }
    }

    fn commit(&mut self, _msg: &Message<'_>, c: &CommitmentPayload) -> KResult<()> {
        if self.commitment.is_some() {
            return Err(KernelError::invalid("the task session has already been committed"));
        }
        let report = self.terminal_report.as_ref().ok_or_else(|| {
            KernelError::invalid("a task Commitment needs the assignee's TaskComplete or TaskFail first")
        })?;
        if c.outcome_positive && self.rules.require_output {
            match report {
                Report::Complete { output, .. } if !output.is_empty() => {}
                Report::Complete { .. } => {
                    return Err(KernelError::policy_denied(vec![Denial::new(
                        DenialCode::OutputRequired,
                        "completion.require_output: the TaskComplete carried no output",
                    )]))
                }
                Report::Fail { .. } => {
                    return Err(KernelError::policy_denied(vec![Denial::new(
                        DenialCode::OutputRequired,
                        "completion.require_output: a positive Commitment needs a TaskComplete with output, \
                         but the assignee reported TaskFail",
                    )]))
                }
            }
        }
        self.commitment = Some(Outcome {
            commitment_id: c.commitment_id.clone(),
            action: c.action.clone(),
            outcome_positive: c.outcome_positive,
        });
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        util::snapshot(self)
    }

    fn project(&self) -> Value {
        let task = self.task.as_ref().map(|t| {
            json!({
                "task_id": t.task_id,
                "title": t.title,
                "instructions": t.instructions,
                "requested_assignee": t.requested_assignee,
                "input_bytes": t.input.len(),
                "deadline_unix_ms": t.deadline_unix_ms,
                "requested_at_ms": t.requested_at_ms,
            })
        });
        let report = self.terminal_report.as_ref().map(|r| match r {
            Report::Complete { assignee, output, summary, at_ms } => json!({
                "type": "TaskComplete",
                "assignee": assignee,
                "output_bytes": output.len(),
                "summary": summary,
                "at_ms": at_ms,
            }),
            Report::Fail { assignee, error_code, reason, retryable, at_ms } => json!({
                "type": "TaskFail",
                "assignee": assignee,
                "error_code": error_code,
                "reason": reason,
                "retryable": retryable,
                "at_ms": at_ms,
            }),
        });
        json!({
            "phase": self.phase(),
            "task": task,
            "active_assignee": self.active_assignee,
            "assignment_history": self.assignment_history,
            "rejections": self.rejections.iter().map(|r| json!({
                "participant": r.participant,
                "reason": r.reason,
                "while_assigned": r.while_assigned,
                "at_ms": r.at_ms,
            })).collect::<Vec<_>>(),
            "updates": self.updates.iter().map(|u| json!({
                "sender": u.sender,
                "status": u.status,
                "progress": u.progress,
                "message": u.message,
                "partial_output_bytes": u.partial_output.len(),
                "at_ms": u.at_ms,
            })).collect::<Vec<_>>(),
            "terminal_report": report,
            "rules": {
                "assignment": { "allow_reassignment_on_reject": self.rules.allow_reassignment_on_reject },
                "completion": { "require_output": self.rules.require_output },
            },
            "commitment": self.commitment.as_ref().map(|o| json!({
                "commitment_id": o.commitment_id,
                "action": o.action,
                "outcome_positive": o.outcome_positive,
            })),
        })
    }
}
