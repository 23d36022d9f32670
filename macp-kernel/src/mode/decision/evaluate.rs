//! Decision governance evaluation (RFC-MACP-0012 §4.1, RFC-MACP-0007 §6.2).
//!
//! [`evaluate`] is a pure function of the bound policy, the declared
//! participants, the accepted history (as [`DecisionState`]) and the
//! Commitment's polarity. It returns **every** unmet rule as a [`Denial`], so
//! a rejection lists them all and a what-if replay can collect them. The
//! order of checks is fixed:
//!
//! 1. **Critical-objection veto.** With `critical_severity_vetoes` and at
//!    least `veto_threshold` critical Objections: under `finalize_decline` a
//!    *negative* Commitment is objection-authorized and nothing below applies
//!    to it (not the tally, not the decline guard and its quorum, not the
//!    evaluation prerequisites); otherwise the Commitment is vetoed (`deny` and
//!    `hold` give identical denials: the RFC forbids telling them apart).
//! 2. **Evaluation prerequisites** (`evaluation.required_before_voting`,
//!    `minimum_confidence`): a non-REVIEW Evaluation must reach the minimum.
//! 3. **Voting quorum**, when `commitment.require_vote_quorum`: voters
//!    (anyone who cast any ballot, ABSTAIN and weight 0 included) against a
//!    count or a percentage of the declared participants. A floor of 0 is
//!    always met, which is the 1.6.0-draft reading under version 3.
//! 4. **The vote** (any algorithm but `none`), as the tri-state
//!    Passed / Failed / NoVotes over the *decisive* tally — APPROVE and
//!    REJECT ballots, under `weighted` only those of voters with weight > 0
//!    (the `weights` map is the electorate at every schema version):
//!    * positive: Passed allows; Failed denies; NoVotes denies under schema
//!      version ≥ 3, and under 1–2 only with `require_vote_quorum` (the legacy
//!      fail-open rule, kept so recorded sessions replay identically);
//!    * negative: Passed needs `allow_decline_over_approval`; every result
//!      needs the decline guard, at least one decisive REJECT.
//!
//!    Under `none` the outcome is taken at face value.
//!
//! Ratios compare inclusively in IEEE-754 binary64 (`approve / decisive >=
//! threshold`), never computing 0/0: an empty decisive tally is NoVotes
//! before any ratio is formed. `plurality` needs more approvals than
//! rejections; `unanimous` needs an APPROVE from every declared participant
//! and no REJECT.

use std::collections::BTreeSet;

use super::rules::{Algorithm, DecisionRules, QuorumKind, VetoAction};
use super::{Ballot, DecisionState, Recommendation, Severity};
use crate::policy::{empty_tally_fails_closed, BoundPolicy, Denial, DenialCode, SUPPORTED_SCHEMA_VERSIONS};

/// The computed voting result of RFC-MACP-0007 §6.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// The algorithm's predicate holds over a non-empty decisive tally.
    Passed,
    /// It does not.
    Failed,
    /// The decisive tally is empty (no APPROVE/REJECT, or under `weighted`
    /// zero decisive weight).
    NoVotes,
}

/// Ballots aggregated across every proposal (the Commitment names none, so
/// a vote on any proposal counts — as in the reference runtime). Voters
/// are borrowed from the state: evaluating copies no names.
#[derive(Debug, Default)]
struct Tally<'a> {
    /// Decisive APPROVE ballots.
    approve: u64,
    /// Decisive REJECT ballots.
    reject: u64,
    approve_weight: f64,
    reject_weight: f64,
    /// Everyone who cast any ballot (the quorum's participation count).
    voters: BTreeSet<&'a str>,
    /// Senders of decisive APPROVE / REJECT ballots.
    approvers: BTreeSet<&'a str>,
    rejecters: BTreeSet<&'a str>,
}

impl<'a> Tally<'a> {
    fn of(state: &'a DecisionState, rules: &DecisionRules) -> Self {
        let mut t = Tally::default();
        for by in state.votes.values() {
            for (who, v) in by {
                t.voters.insert(who);
                let weight = if rules.algorithm == Algorithm::Weighted {
                    rules.weights.get(who).copied().filter(|w| w.is_finite() && *w > 0.0).unwrap_or(0.0)
                } else {
                    1.0
                };
                if weight == 0.0 {
                    continue; // non-decisive: counted as a voter only
                }
                match v.vote {
                    Ballot::Approve => {
                        t.approve += 1;
                        t.approve_weight += weight;
                        t.approvers.insert(who);
                    }
                    Ballot::Reject => {
                        t.reject += 1;
                        t.reject_weight += weight;
                        t.rejecters.insert(who);
                    }
                    Ballot::Abstain => {}
                }
            }
        }
        t
    }

    fn decisive(&self) -> u64 {
        self.approve + self.reject
    }

    fn result(&self, rules: &DecisionRules, participants: &[String]) -> VoteResult {
        if self.decisive() == 0 {
            return VoteResult::NoVotes;
        }
        let ratio = self.approve as f64 / self.decisive() as f64;
        let passed = match rules.algorithm {
            Algorithm::None => true,
            Algorithm::Majority => ratio >= rules.threshold.unwrap_or(0.5),
            Algorithm::Supermajority => match rules.threshold {
                Some(t) => ratio >= t,
                // Only a stored legacy descriptor can omit it: exactly two
                // thirds, as this runtime always evaluated it.
                None => 3 * self.approve >= 2 * self.decisive(),
            },
            Algorithm::Unanimous => {
                self.reject == 0 && participants.iter().all(|p| self.approvers.contains(p.as_str()))
            }
            Algorithm::Weighted => {
                let total = self.approve_weight + self.reject_weight;
                total > 0.0 && self.approve_weight / total >= rules.threshold.unwrap_or(0.5)
            }
            Algorithm::Plurality => self.approve > self.reject,
        };
        if passed {
            VoteResult::Passed
        } else {
            VoteResult::Failed
        }
    }

    fn describe(&self, rules: &DecisionRules) -> String {
        if rules.algorithm == Algorithm::Weighted {
            format!(
                "weighted APPROVE {} vs REJECT {} under 'weighted' (threshold {})",
                self.approve_weight,
                self.reject_weight,
                rules.threshold.unwrap_or(0.5)
            )
        } else {
            let bar = match (rules.algorithm, rules.threshold) {
                (Algorithm::Majority, t) => format!(", threshold {}", t.unwrap_or(0.5)),
                (Algorithm::Supermajority, Some(t)) => format!(", threshold {t}"),
                (Algorithm::Supermajority, None) => ", threshold 2/3".to_string(),
                _ => String::new(),
            };
            format!("{} APPROVE, {} REJECT under '{}'{bar}", self.approve, self.reject, rules.algorithm.name())
        }
    }
}

/// Evaluates the bound policy for a Commitment of the given polarity and
/// returns every unmet rule; empty means the Commitment may resolve the
/// session. Depends only on the policy, the declared participants and the
/// accepted history, never on the sender or the clock (RFC-MACP-0012 §6.3).
pub fn evaluate(policy: &BoundPolicy, participants: &[String], state: &DecisionState, positive: bool) -> Vec<Denial> {
    let version = policy.schema_version();
    if !SUPPORTED_SCHEMA_VERSIONS.contains(&version) {
        return vec![Denial::new(
            DenialCode::UnsupportedSchemaVersion,
            format!(
                "policy '{}' declares rule schema_version {version}, which this runtime does not evaluate \
                 (supported: 1, 2, 3)",
                policy.id()
            ),
        )];
    }
    let rules = DecisionRules::of_policy(policy);
    let rules = match &*rules {
        Ok(r) => r,
        Err(e) => {
            return vec![Denial::new(
                DenialCode::InvalidRules,
                format!("policy '{}' has decision rules this runtime cannot evaluate: {e}", policy.id()),
            )]
        }
    };
    let mut denials = Vec::new();

    // 1. Critical-objection veto.
    if rules.critical_severity_vetoes {
        let objectors: Vec<&str> =
            state.objections.iter().filter(|o| o.severity == Severity::Critical).map(|o| o.sender.as_str()).collect();
        if objectors.len() >= rules.veto_threshold as usize {
            if rules.veto_action == VetoAction::FinalizeDecline && !positive {
                // Objection-authorized decline: the objection is the authority.
                return Vec::new();
            }
            let what = format!(
                "{} critical Objection(s) reach objection_handling.veto_threshold {}",
                objectors.len(),
                rules.veto_threshold
            );
            let message = if rules.veto_action == VetoAction::FinalizeDecline {
                format!("{what}: the positive commitment is vetoed; critical_objection_action 'finalize_decline' allows only a negative commitment")
            } else {
                format!("{what}: the commitment is vetoed")
            };
            denials.push(Denial::new(DenialCode::Veto, message).with_participants(objectors));
        }
    }

    // 2. Evaluation prerequisites.
    if rules.required_before_voting {
        let substantive: Vec<_> =
            state.evaluations.iter().filter(|e| e.recommendation != Recommendation::Review).collect();
        if substantive.is_empty() {
            denials.push(Denial::new(
                DenialCode::EvaluationRequired,
                "evaluation.required_before_voting: no Evaluation other than REVIEW exists",
            ));
        } else if !substantive.iter().any(|e| e.confidence >= rules.minimum_confidence) {
            denials.push(
                Denial::new(
                    DenialCode::ConfidenceBelowMinimum,
                    format!(
                        "evaluation.minimum_confidence: no non-REVIEW Evaluation reaches confidence {}",
                        rules.minimum_confidence
                    ),
                )
                .with_participants(substantive.iter().map(|e| e.sender.clone())),
            );
        }
    }

    // 3. Voting quorum.
    let tally = Tally::of(state, rules);
    if rules.require_vote_quorum {
        let voters = tally.voters.len();
        let n = participants.len();
        let met = match rules.quorum_kind {
            QuorumKind::Count => voters as f64 >= rules.quorum_value,
            QuorumKind::Percentage => voters as f64 * 100.0 >= rules.quorum_value * n as f64,
        };
        if !met {
            let message = match rules.quorum_kind {
                QuorumKind::Count => {
                    format!(
                        "vote quorum not met: {} voted, {} required",
                        crate::text::Count::of(voters, "participant"),
                        rules.quorum_value
                    )
                }
                QuorumKind::Percentage => {
                    format!(
                        "vote quorum not met: {voters} of {} voted, {}% required",
                        crate::text::Count::of(n, "participant"),
                        rules.quorum_value
                    )
                }
            };
            let missing = participants.iter().filter(|p| !tally.voters.contains(p.as_str())).cloned();
            denials.push(Denial::new(DenialCode::QuorumNotMet, message).with_participants(missing));
        }
    }

    // 4. The vote.
    if rules.algorithm == Algorithm::None {
        return denials; // face value
    }
    let result = tally.result(rules, participants);
    let how = tally.describe(rules);
    if positive {
        match result {
            VoteResult::Passed => {}
            VoteResult::Failed => {
                let mut concerned: BTreeSet<&str> = tally.rejecters.clone();
                if rules.algorithm == Algorithm::Unanimous {
                    concerned.extend(participants.iter().map(String::as_str).filter(|p| !tally.approvers.contains(p)));
                }
                denials.push(
                    Denial::new(
                        DenialCode::ThresholdNotMet,
                        format!("the vote failed ({how}); a positive commitment is denied"),
                    )
                    .with_participants(concerned),
                );
            }
            VoteResult::NoVotes if empty_tally_fails_closed(policy.schema_version()) => denials.push(Denial::new(
                DenialCode::NoVotes,
                format!(
                    "no decisive vote has been cast ({}); under schema_version {} an empty tally authorizes \
                     no commitment",
                    voting_phrase(rules),
                    policy.schema_version()
                ),
            )),
            VoteResult::NoVotes if rules.require_vote_quorum => denials.push(Denial::new(
                DenialCode::NoVotes,
                format!(
                    "no decisive vote has been cast ({}) and commitment.require_vote_quorum is set",
                    voting_phrase(rules)
                ),
            )),
            VoteResult::NoVotes => {}
        }
    } else {
        match result {
            VoteResult::NoVotes => denials.push(Denial::new(
                DenialCode::NoVotes,
                format!(
                    "no decisive vote has been cast ({}); a vote-authorized negative commitment needs at least \
                     one decisive REJECT",
                    voting_phrase(rules)
                ),
            )),
            VoteResult::Passed | VoteResult::Failed => {
                if result == VoteResult::Passed && !rules.allow_decline_over_approval {
                    denials.push(
                        Denial::new(
                            DenialCode::DeclineOverApproval,
                            format!(
                                "the vote passed ({how}); a negative commitment needs \
                                 commitment.allow_decline_over_approval"
                            ),
                        )
                        .with_participants(tally.approvers.iter().copied()),
                    );
                }
                if tally.reject == 0 {
                    denials.push(Denial::new(
                        DenialCode::DeclineNotBacked,
                        format!("decline guard: a negative commitment needs at least one decisive REJECT ({how})"),
                    ));
                }
            }
        }
    }
    denials
}

fn voting_phrase(rules: &DecisionRules) -> String {
    if rules.algorithm == Algorithm::Weighted {
        "'weighted': only ballots of voters listed in voting.weights count".to_string()
    } else {
        format!("'{}': ABSTAIN is not decisive", rules.algorithm.name())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{EvaluationRecord, ObjectionRecord, ProposalRecord, VoteRecord};
    use super::*;
    use macp_wire::v1::PolicyDescriptor;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    const PARTICIPANTS: [&str; 3] = ["I", "A", "B"];

    fn policy(version: u32, rules: Value) -> BoundPolicy {
        BoundPolicy::from_descriptor(PolicyDescriptor {
            policy_id: "policy.test".into(),
            mode: "macp.mode.decision.v1".into(),
            description: "t".into(),
            rules: rules.to_string(),
            schema_version: version,
            registered_at_unix_ms: 0,
        })
        .unwrap()
    }

    #[derive(Clone, Debug, Default)]
    struct History {
        votes: Vec<(u8, &'static str, Ballot)>,
        critical: Vec<&'static str>,
        evaluations: Vec<(Recommendation, f64)>,
    }

    fn state(h: &History) -> DecisionState {
        let mut s = DecisionState::default();
        for p in 0..2u8 {
            let id = format!("p{p}");
            s.proposals.insert(
                id.clone(),
                ProposalRecord { proposal_id: id, option: "o".into(), rationale: String::new(), sender: "I".into() },
            );
        }
        for (p, who, b) in &h.votes {
            s.votes
                .entry(format!("p{p}"))
                .or_default()
                .insert(who.to_string(), VoteRecord { vote: *b, reason: String::new() });
        }
        for who in &h.critical {
            s.objections.push(ObjectionRecord {
                proposal_id: "p0".into(),
                reason: String::new(),
                severity: Severity::Critical,
                sender: who.to_string(),
            });
        }
        for (r, c) in &h.evaluations {
            s.evaluations.push(EvaluationRecord {
                proposal_id: "p0".into(),
                recommendation: *r,
                confidence: *c,
                reason: String::new(),
                sender: "A".into(),
            });
        }
        s
    }

    fn codes(version: u32, rules: Value, h: &History, positive: bool) -> Vec<&'static str> {
        let participants: Vec<String> = PARTICIPANTS.iter().map(|p| p.to_string()).collect();
        evaluate(&policy(version, rules), &participants, &state(h), positive).iter().map(|d| d.code.as_str()).collect()
    }

    fn votes(v: &[(&'static str, Ballot)]) -> History {
        History { votes: v.iter().map(|(w, b)| (0, *w, *b)).collect(), ..Default::default() }
    }

    use Ballot::{Abstain, Approve, Reject};

    #[test]
    fn thresholds_are_inclusive_and_plurality_is_strict() {
        let split = votes(&[("A", Approve), ("B", Reject)]);
        assert!(codes(3, json!({"voting": {"algorithm": "majority"}}), &split, true).is_empty());
        assert_eq!(codes(3, json!({"voting": {"algorithm": "plurality"}}), &split, true), ["threshold_not_met"]);
        // IEEE-754 two thirds: 2 of 3 passes, and so do 4 of 6; 66 of 100 would not.
        let sup = json!({"voting": {"algorithm": "supermajority", "threshold": 0.6666666666666666}});
        let two_of_three = votes(&[("I", Approve), ("A", Approve), ("B", Reject)]);
        assert!(codes(3, sup.clone(), &two_of_three, true).is_empty());
        let rules = DecisionRules::from_stored(&json!({"voting": {"algorithm": "supermajority",
                                                          "threshold": 0.6666666666666666}}))
        .unwrap();
        for (approve, reject, passes) in [(2, 1, true), (4, 2, true), (20, 10, true), (67, 33, true), (66, 34, false)] {
            let t = Tally { approve, reject, ..Tally::default() };
            assert_eq!(t.result(&rules, &[]) == VoteResult::Passed, passes, "{approve} of {}", approve + reject);
        }
        assert_eq!(codes(3, sup, &split, true), ["threshold_not_met"]);
    }

    #[test]
    fn empty_tally_depends_on_the_declared_schema_version() {
        let abstain_only = votes(&[("A", Abstain)]);
        for algorithm in ["majority", "supermajority", "unanimous", "weighted", "plurality"] {
            let rules = json!({"voting": {"algorithm": algorithm, "threshold": 0.6, "weights": {"A": 1}}});
            // v3: fail closed, and it is NoVotes, never Failed.
            assert_eq!(codes(3, rules.clone(), &abstain_only, true), ["no_votes"], "{algorithm}");
            // v1/v2: no result; only require_vote_quorum blocks.
            for v in [1, 2] {
                assert!(codes(v, rules.clone(), &abstain_only, true).is_empty(), "{algorithm} v{v}");
                let mut strict = rules.clone();
                strict["commitment"] = json!({"require_vote_quorum": true});
                assert_eq!(codes(v, strict, &abstain_only, true), ["no_votes"], "{algorithm} v{v}");
            }
            // A vote-authorized decline is blocked at every version.
            for v in [1, 2, 3] {
                assert_eq!(codes(v, rules.clone(), &abstain_only, false), ["no_votes"], "{algorithm} v{v}");
            }
        }
        // `none` is face value at every version.
        for v in [1, 2, 3] {
            for positive in [true, false] {
                assert!(codes(v, json!({"voting": {"algorithm": "none"}}), &History::default(), positive).is_empty());
            }
        }
    }

    #[test]
    fn the_weights_map_is_the_electorate() {
        let rules = json!({"voting": {"algorithm": "weighted", "threshold": 0.5, "weights": {"A": 1}}});
        let only_unlisted_reject = votes(&[("B", Reject)]);
        for v in [1, 2, 3] {
            assert_eq!(codes(v, rules.clone(), &only_unlisted_reject, false), ["no_votes"], "v{v}: not decisive");
        }
        assert!(codes(1, rules.clone(), &only_unlisted_reject, true).is_empty());
        assert_eq!(codes(3, rules.clone(), &only_unlisted_reject, true), ["no_votes"]);
        let both = votes(&[("A", Approve), ("B", Reject)]);
        assert!(codes(3, rules.clone(), &both, true).is_empty(), "B weighs nothing");
        // The weight-0 voter still counts toward the participation quorum.
        let mut q = rules;
        q["voting"]["quorum"] = json!({"type": "count", "value": 2});
        q["commitment"] = json!({"require_vote_quorum": true});
        assert!(codes(3, q, &both, true).is_empty());
    }

    #[test]
    fn vetoes_and_objection_authorized_declines() {
        let vetoing = json!({"voting": {"algorithm": "majority", "quorum": {"type": "count", "value": 2}},
                             "objection_handling": {"critical_severity_vetoes": true},
                             "commitment": {"require_vote_quorum": true}});
        let h =
            History { votes: vec![(0, "A", Approve), (0, "I", Approve)], critical: vec!["B"], ..Default::default() };
        assert_eq!(codes(2, vetoing.clone(), &h, true), ["veto"]);
        // `hold` is indistinguishable from `deny` on the wire.
        let mut hold = vetoing.clone();
        hold["objection_handling"]["critical_objection_action"] = json!("hold");
        let participants: Vec<String> = PARTICIPANTS.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            evaluate(&policy(2, hold), &participants, &state(&h), true),
            evaluate(&policy(2, vetoing.clone()), &participants, &state(&h), true)
        );
        // finalize_decline: a decline needs nothing else, not even the
        // quorum or a REJECT, at an empty tally under v3.
        let mut fd = vetoing;
        fd["objection_handling"]["critical_objection_action"] = json!("finalize_decline");
        fd["evaluation"] = json!({"required_before_voting": true});
        let objection_only = History { critical: vec!["B"], ..Default::default() };
        for v in [2, 3] {
            assert!(codes(v, fd.clone(), &objection_only, false).is_empty(), "v{v}");
            let c = codes(v, fd.clone(), &objection_only, true);
            assert_eq!(c[0], "veto", "v{v}: {c:?}");
        }
    }

    #[test]
    fn every_unmet_rule_is_reported_with_the_agents_it_concerns() {
        let rules = json!({"voting": {"algorithm": "unanimous", "quorum": {"type": "percentage", "value": 100}},
                           "objection_handling": {"critical_severity_vetoes": true, "veto_threshold": 1},
                           "evaluation": {"required_before_voting": true, "minimum_confidence": 0.8},
                           "commitment": {"require_vote_quorum": true}});
        let h = History {
            votes: vec![(0, "A", Approve), (1, "B", Reject)],
            critical: vec!["B", "A"],
            evaluations: vec![(Recommendation::Approve, 0.5), (Recommendation::Review, 0.99)],
        };
        let participants: Vec<String> = PARTICIPANTS.iter().map(|p| p.to_string()).collect();
        let d = evaluate(&policy(3, rules), &participants, &state(&h), true);
        let got: Vec<(&str, Vec<String>)> = d.iter().map(|d| (d.code.as_str(), d.participants.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("veto", vec!["A".to_string(), "B".to_string()]),
                ("confidence_below_minimum", vec!["A".to_string()]),
                ("quorum_not_met", vec!["I".to_string()]),
                ("threshold_not_met", vec!["B".to_string(), "I".to_string()]),
            ]
        );
    }

    #[test]
    fn stored_descriptors_evaluate_without_admission_floors() {
        // Admission refuses all of these today; a descriptor stored earlier
        // still evaluates (legacy supermajority = exactly two thirds).
        let legacy = json!({"voting": {"algorithm": "supermajority"}});
        assert!(DecisionRules::admit(&legacy).is_err());
        let two_of_three = votes(&[("I", Approve), ("A", Approve), ("B", Reject)]);
        assert!(codes(1, legacy.clone(), &two_of_three, true).is_empty());
        assert_eq!(codes(1, legacy, &votes(&[("A", Approve), ("B", Reject)]), true), ["threshold_not_met"]);
        let zero_weight = json!({"voting": {"algorithm": "weighted", "weights": {"A": 0, "B": 1}}, "other": 1});
        assert!(DecisionRules::admit(&zero_weight).is_err());
        assert_eq!(
            codes(2, zero_weight, &votes(&[("A", Reject), ("B", Approve)]), false),
            ["decline_over_approval", "decline_not_backed"]
        );
        assert_eq!(codes(4, json!({}), &History::default(), true), ["unsupported_schema_version"]);
        assert_eq!(codes(2, json!({"voting": {"algorithm": "dice"}}), &History::default(), true), ["invalid_rules"]);
    }

    // ----- properties -----------------------------------------------------------

    fn arb_rules() -> impl Strategy<Value = Value> {
        let algorithm =
            prop::sample::select(vec!["none", "majority", "supermajority", "unanimous", "weighted", "plurality"]);
        let threshold = prop::sample::select(vec![0.5, 0.6, 0.6666666666666666, 0.75, 1.0]);
        let quorum = prop::option::of((prop::sample::select(vec!["count", "percentage"]), 0u32..4));
        let action = prop::sample::select(vec!["deny", "hold", "finalize_decline"]);
        (algorithm, threshold, quorum, any::<bool>(), action, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(algorithm, threshold, quorum, vetoes, action, rvq, allow, evals)| {
                let mut voting = json!({"algorithm": algorithm, "threshold": threshold,
                                        "weights": {"I": 1, "A": 2}});
                if let Some((kind, v)) = quorum {
                    voting["quorum"] = json!({"type": kind, "value": if kind == "percentage" { v * 30 } else { v }});
                }
                json!({"voting": voting,
                       "objection_handling": {"critical_severity_vetoes": vetoes, "critical_objection_action": action},
                       "evaluation": {"required_before_voting": evals, "minimum_confidence": 0.5},
                       "commitment": {"require_vote_quorum": rvq, "allow_decline_over_approval": allow}})
            },
        )
    }

    fn arb_history() -> impl Strategy<Value = History> {
        let who = || prop::sample::select(vec!["I", "A", "B"]);
        let ballot = prop::sample::select(vec![Approve, Reject, Abstain]);
        (
            prop::collection::btree_map((0u8..2, who()), ballot, 0..6),
            prop::collection::vec(who(), 0..3),
            prop::collection::vec(
                (prop::sample::select(vec![Recommendation::Approve, Recommendation::Review]), 0.0..1.0f64),
                0..3,
            ),
        )
            .prop_map(|(votes, critical, evaluations)| History {
                votes: votes.into_iter().map(|((p, w), b)| (p, w, b)).collect(),
                critical,
                evaluations,
            })
    }

    fn decisive_tally_is_empty(rules: &Value, h: &History) -> bool {
        let r = DecisionRules::from_stored(rules).unwrap();
        Tally::of(&state(h), &r).decisive() == 0
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Versions 2 and 3 disagree only where v3 changed the rule: a
        /// positive commitment on an empty decisive tally under a real
        /// algorithm, without require_vote_quorum, where v2 allows it and v3
        /// denies it as NoVotes. Versions 1 and 2 always agree.
        #[test]
        fn versions_differ_only_on_the_empty_tally(rules in arb_rules(), h in arb_history(), positive in any::<bool>()) {
            let v1 = codes(1, rules.clone(), &h, positive);
            let v2 = codes(2, rules.clone(), &h, positive);
            let v3 = codes(3, rules.clone(), &h, positive);
            prop_assert_eq!(&v1, &v2);
            if v2 != v3 {
                prop_assert!(positive);
                prop_assert!(decisive_tally_is_empty(&rules, &h));
                prop_assert_eq!(rules["voting"]["algorithm"].as_str() == Some("none"), false);
                prop_assert!(!rules["commitment"]["require_vote_quorum"].as_bool().unwrap());
                let mut with_no_votes = v2.clone();
                with_no_votes.push("no_votes");
                prop_assert_eq!(v3, with_no_votes);
            }
        }

        /// Under v3 a vote-authorized positive commitment is never allowed
        /// on an empty decisive tally, and adding an APPROVE from a voter who
        /// has not voted never turns an allowed positive commitment into a
        /// denied one (the monotonicity v3 restores).
        #[test]
        fn v3_is_fail_closed_and_monotone(rules in arb_rules(), h in arb_history(), who in prop::sample::select(vec!["I", "A", "B"])) {
            let allowed = codes(3, rules.clone(), &h, true).is_empty();
            if allowed && rules["voting"]["algorithm"] != "none" {
                prop_assert!(!decisive_tally_is_empty(&rules, &h));
            }
            if allowed && !h.votes.iter().any(|(p, w, _)| *p == 0 && *w == who) {
                let mut more = h.clone();
                more.votes.push((0, who, Approve));
                prop_assert!(codes(3, rules, &more, true).is_empty(), "an APPROVE from {} denied it", who);
            }
        }

        /// Evaluation is a pure function: same inputs, same denials; no code
        /// appears twice; NoVotes only on an empty decisive tally.
        #[test]
        fn evaluation_is_pure_and_consistent(rules in arb_rules(), h in arb_history(), version in 1u32..=3, positive in any::<bool>()) {
            let a = codes(version, rules.clone(), &h, positive);
            prop_assert_eq!(&a, &codes(version, rules.clone(), &h, positive));
            let mut dedup = a.clone();
            dedup.sort();
            dedup.dedup();
            prop_assert_eq!(dedup.len(), a.len());
            if a.contains(&"no_votes") {
                prop_assert!(decisive_tally_is_empty(&rules, &h));
            }
        }
    }
}
