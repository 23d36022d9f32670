//! Structured `POLICY_DENIED` reasons.
//!
//! A governance denial is data before it is text: the evaluator returns every
//! unmet rule as a [`Denial`] with a stable [`DenialCode`] and the agents the
//! reason concerns, and only the error built from them is rendered. That lets
//! a client branch on codes instead of parsing prose (`macp-sdk-python`
//! ≥ 0.22 reads `details.denials[]`), and lets a later WhatIfReplay collect the
//! denials a candidate policy would have produced as values.
//!
//! Wire form, in `MACPError.details` (JSON):
//!
//! ```json
//! {"reasons": ["…", "…"],
//!  "denials": [{"code": "threshold_not_met", "message": "…", "participants": ["agent://b"]}]}
//! ```
//!
//! `reasons` repeats the messages for clients that predate `denials`.

use std::fmt;

/// Why a governance rule denied a Commitment: the code set `macp-sdk-python`
/// knows (`errors.KNOWN_DENY_CODES`), minus `veto_hold`, which this runtime
/// never sends because RFC-MACP-0012 §4.1 forbids telling `hold` from `deny`
/// on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DenialCode {
    /// Critical objections reached `objection_handling.veto_threshold`.
    Veto,
    /// `commitment.require_vote_quorum` is set and the voting quorum is not met.
    QuorumNotMet,
    /// The vote (or a mode's approval threshold) did not pass.
    ThresholdNotMet,
    /// No qualifying Evaluation reaches `evaluation.minimum_confidence`.
    ConfidenceBelowMinimum,
    /// `evaluation.required_before_voting` and no qualifying Evaluation exists.
    EvaluationRequired,
    /// The decisive tally is empty (RFC-MACP-0012 §4.1 "NoVotes").
    NoVotes,
    /// The vote passed and the policy does not allow declining over it.
    DeclineOverApproval,
    /// A vote-authorized decline has no decisive REJECT (the decline guard).
    DeclineNotBacked,
    /// A mode's acceptance criterion is not met.
    CriterionNotMet,
    /// Task `completion.require_output` is not met.
    OutputRequired,
    /// Task `assignment.allow_reassignment_on_reject` forbids this.
    ReassignmentNotAllowed,
    /// The stored policy declares a schema version this runtime cannot evaluate.
    UnsupportedSchemaVersion,
    /// The stored policy's rules cannot be evaluated.
    InvalidRules,
    /// None of the above.
    Unspecified,
}

impl DenialCode {
    /// The wire spelling (lowercase snake case).
    pub const fn as_str(self) -> &'static str {
        match self {
            DenialCode::Veto => "veto",
            DenialCode::QuorumNotMet => "quorum_not_met",
            DenialCode::ThresholdNotMet => "threshold_not_met",
            DenialCode::ConfidenceBelowMinimum => "confidence_below_minimum",
            DenialCode::EvaluationRequired => "evaluation_required",
            DenialCode::NoVotes => "no_votes",
            DenialCode::DeclineOverApproval => "decline_over_approval",
            DenialCode::DeclineNotBacked => "decline_not_backed",
            DenialCode::CriterionNotMet => "criterion_not_met",
            DenialCode::OutputRequired => "output_required",
            DenialCode::ReassignmentNotAllowed => "reassignment_not_allowed",
            DenialCode::UnsupportedSchemaVersion => "unsupported_schema_version",
            DenialCode::InvalidRules => "invalid_rules",
            DenialCode::Unspecified => "unspecified",
        }
    }
}

impl fmt::Display for DenialCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One unmet governance rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// Stable code clients branch on.
    pub code: DenialCode,
    /// What is unmet and what would meet it, for humans.
    pub message: String,
    /// The agents the reason concerns (a veto's objectors, a task's
    /// rejecters), sorted and without duplicates; empty when none.
    pub participants: Vec<String>,
}

impl Denial {
    /// A denial that concerns no particular agent.
    pub fn new(code: DenialCode, message: impl Into<String>) -> Self {
        Denial { code, message: message.into(), participants: Vec::new() }
    }

    /// Names the agents the reason concerns (sorted, deduplicated, so equal
    /// histories give equal details).
    pub fn with_participants<I, S>(mut self, who: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut p: Vec<String> = who.into_iter().map(Into::into).collect();
        p.sort();
        p.dedup();
        self.participants = p;
        self
    }
}

/// The `MACPError.details` bytes for a list of denials (see the module docs).
pub fn details_json(denials: &[Denial]) -> Vec<u8> {
    let reasons: Vec<&str> = denials.iter().map(|d| d.message.as_str()).collect();
    let structured: Vec<serde_json::Value> = denials
        .iter()
        .map(|d| {
            serde_json::json!({
                "code": d.code.as_str(),
                "message": d.message,
                "participants": d.participants,
            })
        })
        .collect();
    // Serializing a Value of strings cannot fail.
    serde_json::to_vec(&serde_json::json!({ "reasons": reasons, "denials": structured })).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_carry_reasons_and_structured_denials() {
        let d = vec![
            Denial::new(DenialCode::NoVotes, "no decisive vote"),
            Denial::new(DenialCode::Veto, "vetoed").with_participants(["b", "a", "b"]),
        ];
        let v: serde_json::Value = serde_json::from_slice(&details_json(&d)).unwrap();
        assert_eq!(v["reasons"], serde_json::json!(["no decisive vote", "vetoed"]));
        assert_eq!(
            v["denials"][0],
            serde_json::json!({"code": "no_votes", "message": "no decisive vote", "participants": []})
        );
        assert_eq!(v["denials"][1]["participants"], serde_json::json!(["a", "b"]));
        assert_eq!(v["denials"][1]["code"], "veto");
    }
}
