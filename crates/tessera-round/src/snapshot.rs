//! What a shell persists of a run, as [`Run::restore`](crate::Run::restore) reads it back, and
//! what persisting each event changes in it ([`Snapshot::record`]). A shell keeps the same
//! facts in its own store (the hub: SQL tables) and loads them into a `Snapshot` when it
//! starts; the property tests check that restoring from the recorded snapshot at any point
//! gives the very state the run had.

use serde::{Deserialize, Serialize};
use tessera_contest::Ratings;
use tessera_protocol::api::RunSpec;

use crate::{Accepted, Closed, Event, caught_by_refusal, counts_against_sender};
use tessera_contest::Conduct;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub spec: RunSpec,
    /// 32 hex digits.
    pub run_id: String,
    pub round: u64,
    pub finished: bool,
    /// (round, base checkpoint) of at least the rounds from `round − max_staleness` to `round`.
    pub bases: Vec<(u64, String)>,
    /// The current round's evaluation-seed commitment (empty once finished).
    pub commitment: String,
    /// Whether, why and when the current round's submissions closed.
    pub closed: Option<Closed>,
    /// The round each phase after the first began at.
    pub starts: Vec<u64>,
    /// Who may train in the current phase, if it restricts that.
    pub members: Option<Vec<u64>>,
    pub contributors: Vec<u64>,
    /// The current round's accepted submissions, in the order they were accepted.
    pub pending: Vec<Accepted>,
    /// Contributors refused this round for a reason that counts against them.
    pub refused: Vec<u64>,
    pub ratings: Ratings,
    /// (contributor, sum, count) of measured data fits.
    pub fit: Vec<(u64, f64, u64)>,
    /// Each contributor's conduct record over the published rounds.
    #[serde(default)]
    pub conduct: Vec<(u64, Conduct)>,
    /// Contributors refused this round as cheats.
    #[serde(default)]
    pub caught: Vec<u64>,
    /// Contributors who ever earned reward units.
    pub earned: Vec<u64>,
}

impl Snapshot {
    /// A new run's first snapshot: round 0 at `checkpoint`, with `commitment`.
    pub fn new(spec: RunSpec, run_id: String, checkpoint: String, commitment: String) -> Snapshot {
        Snapshot {
            spec,
            run_id,
            round: 0,
            finished: false,
            bases: vec![(0, checkpoint)],
            commitment,
            closed: None,
            starts: Vec::new(),
            members: None,
            contributors: Vec::new(),
            pending: Vec::new(),
            refused: Vec::new(),
            ratings: Ratings::default(),
            fit: Vec::new(),
            conduct: Vec::new(),
            caught: Vec::new(),
            earned: Vec::new(),
        }
    }

    /// What persisting `event` changes, table by table: the contract a shell's store keeps.
    pub fn record(&mut self, event: &Event) {
        match event {
            Event::Registered { contributor } => {
                if !self.contributors.contains(contributor) {
                    self.contributors.push(*contributor);
                }
            }
            // submissions: one row.
            Event::Accepted(a) => self.pending.push(a.clone()),
            // rejections: one row; the current round's that count are read back.
            Event::Refused { contributor, round, code, .. } => {
                if *round == self.round && counts_against_sender(*code) && !self.refused.contains(contributor) {
                    self.refused.push(*contributor);
                }
                if *round == self.round && caught_by_refusal(*code) && !self.caught.contains(contributor) {
                    self.caught.push(*contributor);
                }
            }
            // rounds: the current round's state, closed_by and closed_ms.
            Event::Closed { closed, .. } => self.closed = Some(closed.clone()),
            // rounds: the current round's commitment.
            Event::Committed { commitment, .. } => self.commitment = commitment.clone(),
            // rounds: this one published, the next opened; runs: round and checkpoint; scores,
            // ratings (changed ones), phase starts and members, qualified.
            Event::Published(p) => {
                self.round = p.round + 1;
                self.finished = p.finished;
                self.bases.push((self.round, p.result_checkpoint.clone()));
                self.commitment = p.next_commitment.clone().unwrap_or_default();
                self.closed = None;
                self.pending.clear();
                self.refused.clear();
                self.caught.clear();
                // conduct: the changed records replaced.
                for &(id, c) in &p.conduct {
                    match self.conduct.iter_mut().find(|e| e.0 == id) {
                        Some(e) => e.1 = c,
                        None => self.conduct.push((id, c)),
                    }
                }
                for (id, r) in &p.ratings {
                    self.ratings.0.insert(*id, *r);
                }
                for s in &p.scores {
                    if let Some(f) = s.data_fit.filter(|f| f.is_finite()) {
                        match self.fit.iter_mut().find(|e| e.0 == s.contributor) {
                            Some(e) => {
                                e.1 += f;
                                e.2 += 1;
                            }
                            None => self.fit.push((s.contributor, f, 1)),
                        }
                    }
                    if s.reward > 0 && !self.earned.contains(&s.contributor) {
                        self.earned.push(s.contributor);
                    }
                }
                if let Some((_, start)) = p.phase_start {
                    self.starts.push(start);
                    self.members = p.members.as_ref().map(|(_, m)| m.clone());
                }
            }
        }
    }
}
