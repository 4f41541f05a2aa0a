//! Governance: what a run's token holders may change by vote ([`Change`]), within the bounds the
//! run declares ([`GovernanceSpec`]), and the messages a holder signs to propose and to vote.
//! The rules that count the votes live with the ledger (`tessera_trust::ledger`), which records
//! every proposal, vote, outcome and applied change; this module is what both the hub and the
//! ledger's verifier call to apply a change to a spec, so they cannot disagree on the result.

use serde::{Deserialize, Serialize};

use super::{DataSource, RunSpec};
use crate::Codec;

/// The rules of a steered run: how long a vote stays open, how much of the power must vote, how
/// much of it must say yes, and what may be changed at all. Fixed when the run is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernanceSpec {
    /// Rounds a proposal stays open after the round it is recorded in: votes recorded in rounds
    /// `p ..= p + voting_rounds − 1` count, and the tally is recorded when round
    /// `p + voting_rounds` begins.
    pub voting_rounds: u64,
    /// Power that must vote (yes, no or abstain), in parts per million of all the power at the
    /// proposal's snapshot.
    pub quorum_ppm: u32,
    /// Yes votes needed, in parts per million of yes + no (abstentions count for the quorum only).
    pub threshold_ppm: u32,
    /// Least balance (at the moment the proposal is recorded) that may make a proposal.
    #[serde(default)]
    pub min_proposer_balance: u64,
    /// What may be proposed, and within which ranges.
    #[serde(default)]
    pub bounds: Bounds,
}

impl Default for GovernanceSpec {
    fn default() -> Self {
        GovernanceSpec {
            voting_rounds: 3,
            quorum_ppm: 200_000,
            threshold_ppm: 500_001,
            min_proposer_balance: 1,
            bounds: Bounds::default(),
        }
    }
}

/// The ranges a proposal must stay within (inclusive); a field left empty cannot be proposed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// H, the inner steps per round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_steps: Option<[u64; 2]>,
    /// Submissions that close a round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<[u32; 2]>,
    /// The outer (Nesterov) learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<[f32; 2]>,
    /// Codecs the submissions may be switched to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codecs: Vec<Codec>,
    /// Rounds the next phase may be moved to start at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_start: Option<[u64; 2]>,
    /// The loss at which the current phase ends early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_loss: Option<[f64; 2]>,
    /// How many contributors at the top of the leaderboard qualify for the next phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_top: Option<[u32; 2]>,
    /// Whether checkpoints may be released as named versions by vote.
    #[serde(default)]
    pub releases: bool,
    /// Whether the weights of the run's data mixture (its datasets, fixed when it is created)
    /// may be changed by vote.
    #[serde(default)]
    pub mixture: bool,
}

/// What a proposal changes, at the round boundary it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// H, the inner steps per round.
    InnerSteps { value: u64 },
    /// Submissions that close a round.
    Quorum { value: u32 },
    /// The outer learning rate.
    OuterLr { value: f32 },
    /// The codec of submitted pseudo-gradients.
    Codec { value: Codec },
    /// The round the next phase starts at (the phases after it keep their lengths).
    PhaseStart { round: u64 },
    /// The loss at which the current phase ends early.
    PhaseLoss { loss: f64 },
    /// How many contributors at the top of the leaderboard qualify for the next phase.
    PromoteTop { value: u32 },
    /// Release the checkpoint the run holds at the boundary as a named version.
    Release { version: String },
    /// The weights of the run's data mixture: one per dataset, the run's own first.
    Mixture { weights: Vec<u32> },
}

/// Longest version name a release may take.
pub const MAX_VERSION_CHARS: usize = 64;

fn within<T: PartialOrd + std::fmt::Display + Copy>(what: &str, v: T, bound: Option<[T; 2]>) -> Result<(), String> {
    match bound {
        None => Err(format!("{what} is not something this run lets its holders change")),
        Some([lo, hi]) if v < lo || v > hi => Err(format!("{what} {v} is outside the run's bound [{lo}, {hi}]")),
        Some(_) => Ok(()),
    }
}

impl Change {
    /// A short description, for listings and logs.
    pub fn describe(&self) -> String {
        match self {
            Change::InnerSteps { value } => format!("inner steps per round (H) → {value}"),
            Change::Quorum { value } => format!("round quorum → {value} submissions"),
            Change::OuterLr { value } => format!("outer learning rate → {value}"),
            Change::Codec { value } => format!("submission codec → {value}"),
            Change::PhaseStart { round } => format!("next phase starts at round {round}"),
            Change::PhaseLoss { loss } => format!("current phase ends at loss {loss}"),
            Change::PromoteTop { value } => format!("top {value} qualify for the next phase"),
            Change::Release { version } => format!("release the checkpoint as version {version:?}"),
            Change::Mixture { weights } => format!("data mixture weights → {weights:?}"),
        }
    }

    /// Whether it changes the run's spec (a release does not).
    pub fn changes_spec(&self) -> bool {
        !matches!(self, Change::Release { .. })
    }

    /// `spec` with this change applied at the start of round `at`, or the bound it breaks.
    /// The one function both the hub (applying it) and the ledger's verifier (checking what the
    /// hub recorded) call.
    pub fn apply(&self, spec: &RunSpec, at: u64) -> Result<RunSpec, String> {
        let Some(g) = &spec.governance else { return Err("this run is not steered by its holders".into()) };
        let b = &g.bounds;
        let mut next = spec.clone();
        match self {
            Change::InnerSteps { value } => {
                within("inner steps per round", *value, b.inner_steps)?;
                next.inner_steps = *value;
            }
            Change::Quorum { value } => {
                within("the round quorum", *value, b.quorum)?;
                next.quorum = *value;
            }
            Change::OuterLr { value } => {
                within("the outer learning rate", *value, b.outer_lr)?;
                next.outer.lr = *value;
            }
            Change::Codec { value } => {
                if !b.codecs.contains(value) {
                    let allowed: Vec<String> = b.codecs.iter().map(|c| c.to_string()).collect();
                    return Err(format!("codec {value} is not among the run's allowed codecs {allowed:?}"));
                }
                next.codec = *value;
            }
            Change::PhaseStart { round } => {
                within("the next phase's start round", *round, b.phase_start)?;
                let k = spec.phase_of(at) + 1;
                if k > spec.phases.len() {
                    return Err(format!("round {at} is in the run's last phase: there is no next phase to move"));
                }
                if *round <= at {
                    return Err(format!(
                        "the next phase cannot start at round {round}, before the change applies ({at})"
                    ));
                }
                // Phase k−1 (the one running at `at`) grows or shrinks; the later phases keep
                // their lengths, so the whole run's length moves by the same amount.
                let old = spec.phase_start(k);
                let prev_start = spec.phase_start(k - 1);
                if *round <= prev_start {
                    return Err(format!("the next phase must start after the current one's start {prev_start}"));
                }
                next.rounds = (spec.rounds + round).checked_sub(old).ok_or("the run's length underflows")?;
                if k >= 2 {
                    let p = &mut next.phases[k - 2];
                    p.rounds = (p.rounds + round).checked_sub(old).ok_or("a phase's length underflows")?;
                }
                if let Some(c) = next.contest.as_mut()
                    && c.promote_at == Some(old)
                {
                    c.promote_at = Some(*round);
                }
            }
            Change::PhaseLoss { loss } => {
                within("the phase's loss target", *loss, b.phase_loss)?;
                let k = spec.phase_of(at);
                if k >= spec.phases.len() {
                    return Err("a loss target ends a phase early: the current phase is the run's last".into());
                }
                match k.checked_sub(1) {
                    None => next.until_loss = Some(*loss),
                    Some(i) => next.phases[i].until_loss = Some(*loss),
                }
            }
            Change::PromoteTop { value } => {
                within("the number promoted", *value, b.promote_top)?;
                let Some(c) = next.contest.as_mut() else { return Err("promotion needs a scored run".into()) };
                c.promote_top = *value;
            }
            Change::Mixture { weights } => {
                if !b.mixture {
                    return Err("the data mixture is not something this run lets its holders change".into());
                }
                let DataSource::Manifest { weights: history, .. } = &mut next.data.source else {
                    return Err("only a run on published datasets has a data mixture".into());
                };
                // From `at` on; an entry already for `at` is replaced.
                history.retain(|(from, _)| *from < at);
                history.push((at, weights.clone()));
            }
            Change::Release { version } => {
                if !b.releases {
                    return Err("this run does not release checkpoints by vote".into());
                }
                check_version(version)?;
            }
        }
        next.validate().map_err(|e| format!("the changed spec is not valid: {e}"))?;
        Ok(next)
    }
}

/// A release's version name: 1 to 64 characters of letters, digits, `.`, `-` and `_`.
pub fn check_version(version: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if version.is_empty() || version.chars().count() > MAX_VERSION_CHARS || !version.chars().all(ok) {
        return Err(format!("version {version:?}: 1 to {MAX_VERSION_CHARS} letters, digits, '.', '-' or '_'"));
    }
    Ok(())
}

impl GovernanceSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.voting_rounds == 0 {
            return Err("a vote must stay open at least one round".into());
        }
        if self.quorum_ppm > 1_000_000 || self.threshold_ppm > 1_000_000 || self.threshold_ppm == 0 {
            return Err("quorum and threshold are parts per million: threshold in (0, 10⁶], quorum at most 10⁶".into());
        }
        let b = &self.bounds;
        let ordered = |lo: f64, hi: f64| lo.is_finite() && hi.is_finite() && lo <= hi;
        let pairs = [
            b.inner_steps.map(|[l, h]| (l as f64, h as f64)),
            b.quorum.map(|[l, h]| (f64::from(l), f64::from(h))),
            b.outer_lr.map(|[l, h]| (f64::from(l), f64::from(h))),
            b.phase_start.map(|[l, h]| (l as f64, h as f64)),
            b.phase_loss.map(|[l, h]| (l, h)),
            b.promote_top.map(|[l, h]| (f64::from(l), f64::from(h))),
        ];
        if pairs.into_iter().flatten().any(|(l, h)| !ordered(l, h)) {
            return Err("every bound is [low, high] with low ≤ high, finite".into());
        }
        Ok(())
    }
}

/// How a holder votes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    Yes,
    No,
    Abstain,
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "yes" => Ok(Choice::Yes),
            "no" => Ok(Choice::No),
            "abstain" => Ok(Choice::Abstain),
            _ => Err(format!("{s:?}: vote yes, no or abstain")),
        }
    }
}

/// What a holder signs to propose a change. Its id is the BLAKE3 of the signed message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalMessage {
    pub run_id: String,
    pub title: String,
    pub change: Change,
    /// The round at whose start a passed proposal is applied; at least the round its vote
    /// closes (`None`: that round).
    #[serde(default)]
    pub apply_at: Option<u64>,
    /// When the holder signed it (Unix ms): two proposals of the same change differ by it.
    pub time_ms: i64,
}

/// What a holder signs to vote. A later vote (greater `time_ms`) on the same proposal replaces
/// the holder's earlier one until the vote closes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoteMessage {
    pub run_id: String,
    /// The proposal's id (hex BLAKE3 of its signed message).
    pub proposal: String,
    pub choice: Choice,
    pub time_ms: i64,
}

/// A signed governance message as it travels to the hub and into the ledger: the holder's key,
/// the message's JSON bytes exactly as signed, and the signature (hex each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub holder: String,
    pub message: String,
    pub signature: String,
}

/// The count of a proposal's votes, by power at its snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub yes: u64,
    pub no: u64,
    pub abstain: u64,
    /// All the power at the snapshot (the balances' sum).
    pub power: u64,
    pub passed: bool,
}

impl Tally {
    /// Whether these votes pass under `g`: enough of the power voted, and enough of yes + no
    /// said yes. Integer arithmetic in u128, so no rounding decides a vote.
    pub fn passes(yes: u64, no: u64, abstain: u64, power: u64, g: &GovernanceSpec) -> bool {
        let cast = u128::from(yes) + u128::from(no) + u128::from(abstain);
        let quorum = cast * 1_000_000 >= u128::from(power) * u128::from(g.quorum_ppm) && cast > 0;
        let decided = u128::from(yes) + u128::from(no);
        let threshold = decided > 0 && u128::from(yes) * 1_000_000 >= decided * u128::from(g.threshold_ppm);
        quorum && threshold
    }
}

/// One proposal as the hub lists it (`GET /v1/governance/proposals`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalView {
    pub id: String,
    pub proposer: String,
    pub title: String,
    pub change: Change,
    pub description: String,
    /// The round it was recorded in (its snapshot), or `None` while it waits for the next round
    /// boundary to be recorded.
    pub recorded_round: Option<u64>,
    /// The ledger entry that records it (its snapshot), once recorded.
    pub seq: Option<u64>,
    /// The round at whose start the vote closes, and the change applies.
    pub closes: u64,
    pub apply_at: u64,
    /// `pending` (not yet in the ledger), `open`, `passed`, `rejected`, `applied`.
    pub state: String,
    /// The votes recorded so far (and, while open, those waiting for the next boundary).
    pub tally: Tally,
    pub voters: u64,
    /// The ledger entry of the outcome and of the applied change, once written.
    #[serde(default)]
    pub outcome_seq: Option<u64>,
    #[serde(default)]
    pub applied_seq: Option<u64>,
}

/// `GET /v1/governance/proposals`: the run's rules and every proposal, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposals {
    pub round: u64,
    pub governance: Option<GovernanceSpec>,
    pub proposals: Vec<ProposalView>,
}

/// What the hub answers a proposal or a vote with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernanceReceipt {
    /// The proposal's id.
    pub proposal: String,
    /// The round at whose boundary it (or the vote) is written to the ledger.
    pub recorded_at_boundary_of: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ContestSpec, DataSource, DataSpec, InnerSpec, OuterSpec, PhaseSpec, TensorSpec};

    /// 30 rounds: the first phase 10, then phases of 8 and 12; scored; every bound set.
    fn phased() -> RunSpec {
        let tensors = vec![TensorSpec { name: "w".into(), shape: vec![2, 2] }];
        let phase = |name: &str, rounds| PhaseSpec {
            name: name.into(),
            model: serde_json::json!({}),
            tensors: tensors.clone(),
            rounds,
            seed: 1,
            qualify_top: None,
            until_loss: None,
        };
        RunSpec {
            name: "p".into(),
            model: serde_json::json!({}),
            tensors: tensors.clone(),
            data: DataSpec {
                name: "e".into(),
                fingerprint: "f".into(),
                source: DataSource::Embedded { seed: 1, train_chars: 10, val_chars: 10 },
                loss_floor: None,
            },
            inner: InnerSpec {
                batch_size: 1,
                seq_len: 8,
                lr: 1e-3,
                min_lr: 1e-4,
                warmup_steps: 0,
                grad_clip: 1.0,
                weight_decay: 0.1,
            },
            inner_steps: 5,
            rounds: 30,
            outer: OuterSpec { lr: 0.7, momentum: 0.9, nesterov: true },
            codec: Codec::F32,
            feedback_decay: 1.0,
            broadcast_codec: Codec::F32,
            quorum: 2,
            round_deadline_ms: 1000,
            max_staleness: 1,
            staleness_decay: 0.5,
            seed: 1,
            aggregation: crate::Aggregation::Mean,
            contest: Some(ContestSpec { promote_at: Some(10), ..ContestSpec::default() }),
            trust: None,
            phases: vec![phase("two", 8), phase("three", 12)],
            fragments: 0,
            until_loss: None,
            economy: None,
            governance: Some(GovernanceSpec {
                bounds: Bounds {
                    inner_steps: Some([1, 100]),
                    quorum: Some([1, 10]),
                    outer_lr: Some([0.1, 1.0]),
                    codecs: vec![Codec::Int8 { block: 64 }],
                    phase_start: Some([1, 100]),
                    phase_loss: Some([0.5, 5.0]),
                    promote_top: Some([1, 20]),
                    releases: true,
                    mixture: true,
                },
                ..GovernanceSpec::default()
            }),
        }
    }

    #[test]
    fn moving_the_next_phase_keeps_the_later_phases_lengths() {
        let s = phased();
        assert_eq!((s.phase_start(1), s.phase_start(2)), (10, 18));
        // In the first phase: it lasts 4 rounds more, and so does the run.
        let later = Change::PhaseStart { round: 14 }.apply(&s, 3).unwrap();
        assert_eq!((later.phase_start(1), later.phase_start(2), later.rounds), (14, 22, 34));
        assert_eq!(later.contest.as_ref().unwrap().promote_at, Some(14), "the promotion boundary moves with it");
        // In the second phase: it ends early, the third keeps its 12 rounds.
        let earlier = Change::PhaseStart { round: 15 }.apply(&s, 12).unwrap();
        assert_eq!((earlier.phase_start(1), earlier.phase_start(2), earlier.rounds), (10, 15, 27));
        assert_eq!(earlier.phases.iter().map(|p| p.rounds).collect::<Vec<_>>(), vec![5, 12]);
        // Not into the past, not before the current phase began, not after the last phase.
        assert!(Change::PhaseStart { round: 12 }.apply(&s, 12).unwrap_err().contains("before the change applies"));
        assert!(Change::PhaseStart { round: 40 }.apply(&s, 20).unwrap_err().contains("no next phase"));
        assert!(Change::PhaseStart { round: 200 }.apply(&s, 3).unwrap_err().contains("bound [1, 100]"));
    }

    #[test]
    fn each_change_sets_its_field_and_nothing_else() {
        let s = phased();
        type Field = fn(&RunSpec) -> String;
        let cases: [(Change, Field); 6] = [
            (Change::InnerSteps { value: 9 }, |r| r.inner_steps.to_string()),
            (Change::Quorum { value: 7 }, |r| r.quorum.to_string()),
            (Change::OuterLr { value: 0.3 }, |r| r.outer.lr.to_string()),
            (Change::Codec { value: Codec::Int8 { block: 64 } }, |r| r.codec.to_string()),
            (Change::PhaseLoss { loss: 2.5 }, |r| format!("{:?}", r.until_loss)),
            (Change::PromoteTop { value: 4 }, |r| r.contest.as_ref().unwrap().promote_top.to_string()),
        ];
        let wants = ["9", "7", "0.3", "int8:64", "Some(2.5)", "4"];
        for ((change, get), want) in cases.into_iter().zip(wants) {
            let next = change.apply(&s, 2).unwrap();
            assert_eq!(get(&next), want, "{}", change.describe());
            let undo = RunSpec {
                inner_steps: 5,
                quorum: 2,
                outer: s.outer,
                codec: s.codec,
                until_loss: None,
                contest: s.contest.clone(),
                ..next
            };
            assert_eq!(undo, s, "{} changed something else", change.describe());
        }
        // In the second phase the loss target is that phase's own.
        let p = Change::PhaseLoss { loss: 1.5 }.apply(&s, 12).unwrap();
        assert_eq!((p.until_loss, p.phases[0].until_loss), (None, Some(1.5)));
        // A release changes nothing; an unsteered run changes nothing by vote.
        assert_eq!(Change::Release { version: "v1".into() }.apply(&s, 2).unwrap(), s);
        let unsteered = RunSpec { governance: None, ..s };
        assert!(Change::Quorum { value: 3 }.apply(&unsteered, 2).unwrap_err().contains("not steered"));
    }

    #[test]
    fn mixture_weights_change_from_the_round_they_apply() {
        let mut s = phased();
        let e = Change::Mixture { weights: vec![1, 1] }.apply(&s, 3).unwrap_err();
        assert!(e.contains("only a run on published datasets"), "{e}");
        s.data.source = DataSource::Manifest {
            urls: vec!["u".into()],
            train_shards: 4,
            slots_per_round: 4,
            mixture: vec![crate::api::MixedData {
                name: "b".into(),
                fingerprint: "g".into(),
                urls: vec!["v".into()],
                train_shards: 2,
            }],
            weights: Vec::new(),
        };
        let next = Change::Mixture { weights: vec![1, 3] }.apply(&s, 3).unwrap();
        assert_eq!((next.data.source.weights_at(2), next.data.source.weights_at(3)), (vec![1, 1], vec![1, 3]));
        let e = Change::Mixture { weights: vec![1, 3, 5] }.apply(&s, 3).unwrap_err();
        assert!(e.contains("one per dataset"), "{e}");
        let e = Change::Mixture { weights: vec![0, 0] }.apply(&s, 3).unwrap_err();
        assert!(e.contains("not all zero"), "{e}");
    }

    #[test]
    fn a_vote_passes_on_quorum_and_threshold_in_exact_arithmetic() {
        let g = GovernanceSpec { quorum_ppm: 250_000, threshold_ppm: 500_001, ..GovernanceSpec::default() };
        assert!(Tally::passes(3, 2, 0, 20, &g), "5 of 20 voted, 3 of 5 said yes");
        assert!(!Tally::passes(3, 1, 0, 20, &g), "4 of 20 is under the quorum");
        assert!(!Tally::passes(2, 2, 6, 20, &g), "a tie is not a majority");
        assert!(!Tally::passes(0, 0, 20, 20, &g), "only abstentions decide nothing");
        assert!(Tally::passes(u64::MAX, 0, 0, u64::MAX, &g), "no overflow");
    }
}
