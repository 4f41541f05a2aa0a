//! `tessera-round`: every decision a hub makes about a run, as plain functions over plain state
//! (after Psyche's coordinator). No `async`, no SQL, no object store, no clock and no RNG: the
//! time (`now_ms`), the randomness (the next round's seed commitment) and what only storage
//! knows (who owns a blob, whether a contributor already submitted for a base round) come in
//! as arguments.
//!
//! The shape is decide → persist → apply:
//! - a decision ([`Run::admit`], [`Run::tick`], [`Run::plan`], [`Run::publish`], …) reads a
//!   [`Run`] and returns [`Event`]s, or a refusal that names its reason;
//! - the shell persists the events in one transaction ([`Snapshot::record`] says what each one
//!   changes in what is persisted);
//! - then applies them ([`Run::apply`]).
//!
//! [`Run::restore`] rebuilds the state from what was persisted, so a shell that stops between
//! any two steps continues exactly as if it had not (property-tested in `tests/`).
//!
//! Cost: a [`Run`] holds O(contributors + the current round's submissions + phases) — ratings,
//! data-fit records and who earned anything per contributor, the base checkpoints of the rounds
//! still accepted — and nothing that grows with the run's history. Every decision is
//! O(current round) except [`Run::publish`] at a phase boundary, which ranks every contributor
//! (O(N log N)).

mod admit;
mod close;
pub mod scoring;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tessera_contest::{Conduct, Flag, Rating, Ratings};
use tessera_protocol::api::{ApiError, ErrorCode, RunSpec, TensorSpec};

pub use admit::{Admission, Facts, MessageHeader, Submission};
pub use close::{Judgement, Outcome, Plan, Tick};
pub use snapshot::Snapshot;

/// A submission the run accepted (a row of the shell's `submissions` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub contributor: u64,
    /// The round whose checkpoint it was trained from.
    pub base_round: u64,
    /// The round whose aggregate includes it.
    pub round: u64,
    /// Its staleness weight.
    pub weight: f64,
    pub bytes: u64,
    pub inner_loss: Option<f64>,
    /// Hex BLAKE3 naming the stored blob.
    pub blob: String,
    pub received_ms: i64,
}

/// One submission's score, flag, aggregation weight and reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub contributor: u64,
    pub base_round: u64,
    pub round: u64,
    pub score: Option<f64>,
    pub data_fit: Option<f64>,
    /// The factor its score was discounted by, from its contributor's data-fit record
    /// (`None`: not scored).
    #[serde(default)]
    pub fit_factor: Option<f64>,
    /// The score's standard error over the held-out windows, where measured.
    #[serde(default)]
    pub score_se: Option<f64>,
    /// The norm bound it was scored against, where reported.
    #[serde(default)]
    pub norm_bound: Option<f64>,
    /// The part of `fit_factor` that is its contributor's conduct record (earlier rounds in
    /// which it was caught cheating; 1: none), where the hub settled the round.
    #[serde(default)]
    pub conduct: Option<f64>,
    pub flag: Option<String>,
    pub weight: f64,
    pub reward: u64,
}

/// Why and when the current round's submissions closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Closed {
    pub closed_by: String,
    pub at_ms: i64,
}

/// What a decision produced, for the shell to persist and then apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A contributor registered (the shell's store hands out dense ids).
    Registered { contributor: u64 },
    /// A submission was accepted into the current round.
    Accepted(Accepted),
    /// A submission was refused (every refusal is recorded with its reason, except `busy`).
    Refused { contributor: u64, round: u64, code: ErrorCode, message: String, at_ms: i64 },
    /// The current round's submissions closed (quorum or deadline): a scored run now waits
    /// for its scores, an unscored one is aggregated.
    Closed { round: u64, closed: Closed },
    /// The round was published and, unless the run finished, the next one opened.
    Published(Box<Publication>),
    /// A sealed run's attested validator committed the current round's evaluation seed (which
    /// it drew and keeps; the hub never sees it before the round's verdict).
    Committed { round: u64, commitment: String },
}

/// Everything publishing a round writes, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    pub round: u64,
    /// The new weights' content address (hex BLAKE3).
    pub result_checkpoint: String,
    pub closed_by: String,
    pub closed_ms: i64,
    /// Submissions aggregated (weight above zero, decodable) and their total weight.
    pub used: u64,
    pub weight: f64,
    pub mean_inner_loss: Option<f64>,
    pub bytes_up: u64,
    /// The run is over after this round.
    pub finished: bool,
    /// Scores and rewards of the round's submissions, in arrival order (scored runs).
    pub scores: Vec<ScoreRow>,
    /// Ratings this round changed.
    pub ratings: Vec<(u64, Rating)>,
    /// Conduct records this round changed (scored runs): everyone who took part in it.
    pub conduct: Vec<(u64, Conduct)>,
    /// Who qualified, best first, when this round is the promotion boundary.
    pub qualified: Vec<u64>,
    /// When this round ends a phase whose successor admits only the top of the leaderboard:
    /// that phase and who may train in it, best first.
    pub members: Option<(u64, Vec<u64>)>,
    /// When this round ends a phase: the next phase and the round it starts at.
    pub phase_start: Option<(u64, u64)>,
    /// The next round's evaluation-seed commitment (hex); `None` once the run finished.
    pub next_commitment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoundError {
    /// Persisted state, or an event, that contradicts the run (a shell bug or a damaged store).
    #[error("inconsistent run state: {0}")]
    Inconsistent(String),
    #[error("the run's spec: {0}")]
    Spec(String),
}

/// A typed refusal.
pub fn refusal(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError { code, message: message.into() }
}

/// Whether a refusal with `code` places its sender last in the round's rating: not for a
/// repeat of an accepted submission, a replayed request, a finished run or the hub's own
/// trouble.
pub fn counts_against_sender(code: ErrorCode) -> bool {
    !matches!(
        code,
        ErrorCode::Duplicate
            | ErrorCode::Internal
            | ErrorCode::RunFinished
            | ErrorCode::Busy
            | ErrorCode::RateLimited
            | ErrorCode::ReplayedRequest
    )
}

/// The state of a run: what every decision reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    spec: RunSpec,
    /// The spec at the current phase (its model and tensor table); derived from `spec`.
    current: RunSpec,
    run_id: [u8; 16],
    run_id_hex: String,
    round: u64,
    finished: bool,
    /// Base checkpoint of each round that can still receive work (the current one, the
    /// `max_staleness` before it and, once finished, the final checkpoint at `round`).
    bases: BTreeMap<u64, String>,
    /// The current round's evaluation-seed commitment (hex; empty once finished).
    commitment: String,
    closed: Option<Closed>,
    /// The round each phase began at (`starts[0] == 0`).
    starts: Vec<u64>,
    /// Who may train in the current phase (`None`: everyone).
    members: Option<BTreeSet<u64>>,
    contributors: BTreeSet<u64>,
    /// The current round's accepted submissions, in the order they were accepted.
    pending: Vec<Accepted>,
    /// Contributors refused this round for a reason that places them last in its rating.
    refused: BTreeSet<u64>,
    ratings: Ratings,
    /// Each contributor's measured data fits so far: (sum, count).
    fit: BTreeMap<u64, (f64, u64)>,
    /// Each contributor's conduct record over the published rounds.
    conduct: BTreeMap<u64, Conduct>,
    /// Contributors refused this round as cheats (`caught_by_refusal`).
    caught: BTreeSet<u64>,
    /// Contributors who ever earned reward units (only they can qualify).
    earned: BTreeSet<u64>,
}

impl Run {
    /// Rebuilds a run from what its shell persisted.
    pub fn restore(s: Snapshot) -> Result<Run, RoundError> {
        s.spec.validate().map_err(RoundError::Spec)?;
        let mut run_id = [0u8; 16];
        hex::decode_to_slice(&s.run_id, &mut run_id)
            .map_err(|e| RoundError::Inconsistent(format!("run id {:?}: {e}", s.run_id)))?;
        let mut starts = vec![0];
        starts.extend(&s.starts);
        if starts.windows(2).any(|w| w[0] >= w[1]) || starts.len() > s.spec.phases.len() + 1 {
            return Err(RoundError::Inconsistent(format!("phase starts {:?}", s.starts)));
        }
        let phase = starts.len() - 1;
        let bases: BTreeMap<u64, String> = s.bases.into_iter().collect();
        if !bases.contains_key(&s.round) {
            return Err(RoundError::Inconsistent(format!("no base checkpoint for round {}", s.round)));
        }
        if s.pending.iter().any(|a| a.round != s.round) {
            return Err(RoundError::Inconsistent("a pending submission belongs to another round".into()));
        }
        let mut run = Run {
            current: s.spec.at_phase(phase),
            spec: s.spec,
            run_id,
            run_id_hex: s.run_id,
            round: s.round,
            finished: s.finished,
            bases,
            commitment: s.commitment,
            closed: s.closed,
            starts,
            members: s.members.map(|m| m.into_iter().collect()),
            contributors: s.contributors.into_iter().collect(),
            pending: s.pending,
            refused: s.refused.into_iter().collect(),
            ratings: s.ratings,
            fit: s.fit.into_iter().map(|(c, sum, n)| (c, (sum, n))).collect(),
            conduct: s.conduct.into_iter().collect(),
            caught: s.caught.into_iter().collect(),
            earned: s.earned.into_iter().collect(),
        };
        run.prune_bases();
        Ok(run)
    }

    /// Applies events a decision returned (after the shell persisted them).
    pub fn apply(&mut self, event: &Event) -> Result<(), RoundError> {
        let wrong = |what: &str| Err(RoundError::Inconsistent(format!("{what} at round {}", self.round)));
        match event {
            Event::Registered { contributor } => {
                self.contributors.insert(*contributor);
            }
            Event::Accepted(a) => {
                if a.round != self.round || self.finished || self.closed.is_some() {
                    return wrong("a submission accepted into a closed round");
                }
                self.pending.push(a.clone());
            }
            Event::Refused { contributor, round, code, .. } => {
                if *round == self.round && counts_against_sender(*code) {
                    self.refused.insert(*contributor);
                }
                if *round == self.round && caught_by_refusal(*code) {
                    self.caught.insert(*contributor);
                }
            }
            Event::Closed { round, closed } => {
                if *round != self.round || self.finished {
                    return wrong("a close of another round");
                }
                self.closed = Some(closed.clone());
            }
            Event::Published(p) => self.apply_publication(p)?,
            Event::Committed { round, commitment } => {
                if *round != self.round || self.finished || !self.commitment.is_empty() {
                    return wrong("a seed commitment for a round that has one, or is not open");
                }
                self.commitment = commitment.clone();
            }
        }
        Ok(())
    }

    /// Replaces the spec at a round boundary with one its holders voted (the shell checked the
    /// vote in its ledger). What a vote may change leaves the models alone: a spec whose phases
    /// or tensor tables differ is refused.
    pub fn steer(&mut self, spec: RunSpec) -> Result<(), RoundError> {
        spec.validate().map_err(RoundError::Spec)?;
        let models = |s: &RunSpec| {
            let mut m: Vec<_> = s.phases.iter().map(|p| (&p.model, &p.tensors)).collect();
            m.push((&s.model, &s.tensors));
            m.into_iter().map(|(a, b)| (a.clone(), b.clone())).collect::<Vec<_>>()
        };
        if models(&spec) != models(&self.spec) {
            return Err(RoundError::Spec("a change of the run's spec may not change its models".into()));
        }
        self.current = spec.at_phase(self.phase());
        self.spec = spec;
        Ok(())
    }

    /// A sealed run: takes the attested validator's commitment to the current round's
    /// evaluation seed. Nothing to do when it is the one already held; refused when another is,
    /// or the round's submissions have closed.
    pub fn commit_seed(&self, round: u64, commitment: &str) -> Result<Option<Event>, ApiError> {
        if self.spec.trust.is_none() {
            return Err(refusal(ErrorCode::BadRequest, "only a sealed run's validator commits the evaluation seed"));
        }
        if commitment.len() != 64 || !commitment.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(refusal(ErrorCode::BadRequest, "a seed commitment is 64 hex digits"));
        }
        if self.finished || round != self.round || self.closed.is_some() {
            return Err(refusal(
                ErrorCode::NotScoring,
                format!("round {round} is not open for a seed commitment (the run is at round {})", self.round),
            ));
        }
        if self.commitment == commitment {
            return Ok(None);
        }
        if !self.commitment.is_empty() {
            return Err(refusal(ErrorCode::Conflict, format!("round {round}'s evaluation seed is already committed")));
        }
        Ok(Some(Event::Committed { round, commitment: commitment.to_owned() }))
    }

    fn apply_publication(&mut self, p: &Publication) -> Result<(), RoundError> {
        if p.round != self.round || self.finished {
            return Err(RoundError::Inconsistent(format!("round {} published at round {}", p.round, self.round)));
        }
        for (id, rating) in &p.ratings {
            self.ratings.0.insert(*id, *rating);
        }
        for row in &p.scores {
            note_fit(&mut self.fit, row);
            if row.reward > 0 {
                self.earned.insert(row.contributor);
            }
        }
        self.conduct.extend(p.conduct.iter().copied());
        self.round += 1;
        self.finished = p.finished;
        self.bases.insert(self.round, p.result_checkpoint.clone());
        self.commitment = p.next_commitment.clone().unwrap_or_default();
        self.closed = None;
        self.pending.clear();
        self.refused.clear();
        self.caught.clear();
        if let Some((phase, start)) = p.phase_start {
            if phase as usize != self.starts.len() || phase as usize > self.spec.phases.len() {
                return Err(RoundError::Inconsistent(format!("phase {phase} starts at round {start}")));
            }
            self.starts.push(start);
            self.members = p.members.as_ref().map(|(_, m)| m.iter().copied().collect());
            self.current = self.spec.at_phase(phase as usize);
        }
        self.prune_bases();
        Ok(())
    }

    /// Keeps the bases of the rounds that can still receive work.
    fn prune_bases(&mut self) {
        let oldest = self.round.saturating_sub(self.spec.max_staleness);
        self.bases = self.bases.split_off(&oldest);
    }

    /// The run as created: every phase.
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The spec at the current phase: its model and tensor table.
    pub fn current(&self) -> &RunSpec {
        &self.current
    }

    pub fn run_id(&self) -> [u8; 16] {
        self.run_id
    }

    pub fn run_id_hex(&self) -> &str {
        &self.run_id_hex
    }

    /// The current round (once finished: how many rounds the run had).
    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    pub fn phase(&self) -> usize {
        self.starts.len() - 1
    }

    /// The phase round `round` belongs to.
    pub fn phase_at(&self, round: u64) -> usize {
        self.starts.iter().rposition(|&s| s <= round).unwrap_or(0)
    }

    /// The current checkpoint: the current round's base, or the final weights once finished.
    pub fn checkpoint(&self) -> &str {
        self.bases.get(&self.round).map_or("", String::as_str)
    }

    /// The base checkpoint of `round`, if it can still receive work.
    pub fn base(&self, round: u64) -> Option<&str> {
        self.bases.get(&round).map(String::as_str)
    }

    pub fn commitment(&self) -> &str {
        &self.commitment
    }

    /// Why and when the current round's submissions closed, if they did.
    pub fn closed(&self) -> Option<&Closed> {
        self.closed.as_ref()
    }

    /// The current round's accepted submissions, in the order they were accepted.
    pub fn pending(&self) -> &[Accepted] {
        &self.pending
    }

    pub fn ratings(&self) -> &Ratings {
        &self.ratings
    }

    pub fn contributors(&self) -> &BTreeSet<u64> {
        &self.contributors
    }

    /// Who may train in the current phase (`None`: everyone).
    pub fn members(&self) -> Option<&BTreeSet<u64>> {
        self.members.as_ref()
    }

    /// The current phase's tensors' lengths.
    pub fn lengths(&self) -> Vec<usize> {
        self.current.tensors.iter().map(|t| t.numel() as usize).collect()
    }

    /// The tensors (indices into the current table) a contributor's submission carries: its
    /// fragment's in a layer-sharded run, else all.
    pub fn carried(&self, contributor: u64) -> Vec<usize> {
        if self.spec.fragments > 1 {
            self.current.fragment_tensors(self.current.fragment_of(contributor))
        } else {
            (0..self.current.tensors.len()).collect()
        }
    }

    /// The table a contributor's submission must have (fragment-aware).
    pub fn expected_table(&self, contributor: u64) -> Vec<TensorSpec> {
        self.carried(contributor).into_iter().map(|i| self.current.tensors[i].clone()).collect()
    }

    /// Whether round `round`'s evaluation seed may be shown (`Ok(true)`: revealed, its
    /// submissions have closed; `Ok(false)`: only its commitment), or the round never opened.
    pub fn seed_revealed(&self, round: u64) -> Result<bool, ApiError> {
        // A finished run's `round` counts the rounds it had; none of that number ever opened.
        if round > self.round || (self.finished && round == self.round) {
            return Err(refusal(ErrorCode::NotFound, format!("round {round} has not opened")));
        }
        Ok(round < self.round || self.closed.is_some())
    }
}

/// Whether a refusal says its sender was caught cheating: bytes that are not a valid message,
/// the exact bytes of an earlier submission, or a claim of data its round did not assign.
pub fn caught_by_refusal(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::MalformedMessage | ErrorCode::Replay | ErrorCode::WrongData)
}

/// Who took part in a judged round, and whether each was caught: every contributor with a
/// scored row or refused for a reason that counts against it; caught if a row of its was
/// flagged as misconduct or it was refused as a cheat. Cost: O(rows + refused).
pub(crate) fn took_part(rows: &[ScoreRow], refused: &BTreeSet<u64>, caught: &BTreeSet<u64>) -> BTreeMap<u64, bool> {
    let mut out: BTreeMap<u64, bool> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.score.is_some()) {
        let flagged = r.flag.as_deref().is_some_and(|f| f == Flag::Copy.as_str() || f == Flag::WrongData.as_str());
        *out.entry(r.contributor).or_default() |= flagged;
    }
    for &c in refused.iter().chain(caught) {
        *out.entry(c).or_default() |= caught.contains(&c);
    }
    out
}

/// Adds a scored submission's data fit, if measured, to its contributor's record.
fn note_fit(record: &mut BTreeMap<u64, (f64, u64)>, row: &ScoreRow) {
    if let Some(f) = row.data_fit.filter(|f| f.is_finite()) {
        let e = record.entry(row.contributor).or_default();
        *e = (e.0 + f, e.1 + 1);
    }
}
