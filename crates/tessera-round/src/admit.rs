//! Intake: assignments, a submission's header (run, phase, codec, table) and its admission
//! into the current round (finished, scoring, future, base, phase, membership, staleness,
//! replays and duplicates), which closes the round at quorum.

use tessera_protocol::Codec;
use tessera_protocol::api::{ApiError, Assignment, DataAssignment, ErrorCode, Receipt};

use crate::{Accepted, Closed, Event, Run, refusal};

/// What the hub checks of a submission's message before it looks at the round.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageHeader {
    pub run_id: [u8; 16],
    /// The round it was trained from.
    pub round: u64,
    pub codec: Codec,
    /// (name, shape) of each tensor, in order.
    pub table: Vec<(String, Vec<u64>)>,
}

/// A stored submission, ready to be admitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub contributor: u64,
    pub base_round: u64,
    /// Hex BLAKE3 of the base checkpoint it names.
    pub base_hash: String,
    pub blob: String,
    pub bytes: u64,
    /// The mean loss of its inner steps, as its (signed) request said.
    pub inner_loss: Option<f64>,
    /// The data its (signed) request says it trained on: in a manifest run, the round must
    /// have assigned exactly this.
    pub data: Option<DataAssignment>,
}

/// What only the shell's store knows about a submission.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Facts {
    /// The contributor whose accepted submission these exact bytes already are.
    pub blob_owner: Option<u64>,
    /// The contributor already has an accepted submission for this base round.
    pub submitted_for_base: bool,
}

/// An admitted submission: the events to persist together and the receipt to answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// `Accepted`, then `Closed` when it completes the quorum.
    pub events: Vec<Event>,
    pub receipt: Receipt,
}

impl Run {
    /// Refuses a submission whose claimed data is not what its round assigned its sender: in a
    /// manifest run it must name the data slot, epoch and shard of `data::data_assignment` for
    /// its base round; elsewhere it must name none.
    pub fn check_data(&self, s: &Submission) -> Result<(), ApiError> {
        let assigned = tessera_protocol::data::data_assignment(&self.spec, s.base_round, s.contributor);
        if s.data == assigned {
            return Ok(());
        }
        let show = |d: Option<DataAssignment>| match d {
            Some(d) if d.source != 0 => {
                format!("data slot {}, epoch {}, shard {} of mixed dataset {}", d.slot, d.epoch, d.shard, d.source)
            }
            Some(d) => format!("data slot {}, epoch {}, shard {}", d.slot, d.epoch, d.shard),
            None => "no data".to_owned(),
        };
        Err(refusal(
            ErrorCode::WrongData,
            format!(
                "the submission claims {} but round {} assigned contributor {} {}",
                show(s.data),
                s.base_round,
                s.contributor,
                show(assigned)
            ),
        ))
    }

    /// Refuses a contributor the current phase does not admit.
    pub fn check_member(&self, contributor: u64) -> Result<(), ApiError> {
        match &self.members {
            Some(m) if !m.contains(&contributor) => Err(refusal(
                ErrorCode::NotQualified,
                format!(
                    "phase {} admits only the {} contributors who led the leaderboard when it began; contributor \
                     {contributor} did not qualify",
                    self.phase() + 1,
                    m.len()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether `contributor` has an accepted submission trained from the current round.
    pub fn has_submitted(&self, contributor: u64) -> bool {
        self.pending.iter().any(|a| a.contributor == contributor && a.base_round == self.round)
    }

    /// The contributor's assignment for the current round.
    pub fn assignment(&self, contributor: u64) -> Result<Assignment, ApiError> {
        self.check_member(contributor)?;
        let spec = &self.spec;
        let h = spec.inner_steps;
        Ok(Assignment {
            run_id: self.run_id_hex.clone(),
            finished: self.finished,
            round: self.round,
            base_checkpoint: self.checkpoint().to_owned(),
            slot: contributor,
            seed: spec.seed,
            inner_steps: h,
            schedule_step: self.round.min(spec.rounds) * h,
            schedule_total: spec.rounds * h,
            eval_commitment: spec.contest.as_ref().map(|_| self.commitment.clone()),
            phase: self.phase() as u32,
            fragment: (spec.fragments > 1).then(|| spec.fragment_of(contributor)),
            data: tessera_protocol::data::data_assignment(spec, self.round, contributor),
            revision: 0,
        })
    }

    /// Checks a (clear) submission's header against the run: work on an earlier phase's model
    /// is stale (its table is that model's), then run, codec and the tensors the contributor
    /// must carry.
    pub fn check_message(&self, contributor: u64, h: &MessageHeader) -> Result<(), ApiError> {
        if h.run_id == self.run_id && self.phase_at(h.round) < self.phase() {
            return Err(earlier_phase(h.round));
        }
        if h.run_id != self.run_id {
            return Err(refusal(
                ErrorCode::WrongRun,
                format!("message is for run {}, this is {}", hex::encode(h.run_id), self.run_id_hex),
            ));
        }
        if h.codec != self.spec.codec {
            return Err(refusal(
                ErrorCode::CodecMismatch,
                format!("message uses codec {}, the run uses {}", h.codec, self.spec.codec),
            ));
        }
        let tensors = self.expected_table(contributor);
        if h.table.len() != tensors.len() {
            return Err(refusal(
                ErrorCode::TensorMismatch,
                format!("message has {} tensors, the model {}", h.table.len(), tensors.len()),
            ));
        }
        for ((name, shape), s) in h.table.iter().zip(&tensors) {
            if *name != s.name || *shape != s.shape {
                return Err(refusal(
                    ErrorCode::TensorMismatch,
                    format!("tensor {name} {shape:?} where the model has {} {:?}", s.name, s.shape),
                ));
            }
        }
        Ok(())
    }

    /// Admits a stored submission into the current round, or refuses it with its reason.
    pub fn admit(&self, s: &Submission, facts: Facts, now_ms: i64) -> Result<Admission, ApiError> {
        if self.finished {
            return Err(refusal(ErrorCode::RunFinished, "the run has finished"));
        }
        let round = self.round;
        if self.closed.is_some() {
            return Err(refusal(
                ErrorCode::Busy,
                format!("round {round} is being scored; retry when it is published (this submission is kept for you)"),
            ));
        }
        if self.spec.trust.is_some() && self.commitment.is_empty() {
            return Err(refusal(
                ErrorCode::Busy,
                format!(
                    "the validator has not committed round {round}'s evaluation seed yet; retry in a moment (this \
                     submission is kept for you)"
                ),
            ));
        }
        if s.base_round > round {
            return Err(refusal(
                ErrorCode::FutureRound,
                format!("round {} has not opened; the run is at {round}", s.base_round),
            ));
        }
        let staleness = round - s.base_round;
        let stale = || {
            refusal(
                ErrorCode::Stale,
                format!(
                    "trained from round {} but the run is at round {round}: {staleness} rounds stale, at most {} \
                     accepted; fetch a new assignment",
                    s.base_round, self.spec.max_staleness
                ),
            )
        };
        let Some(base) = self.base(s.base_round) else {
            return Err(stale());
        };
        if base != s.base_hash {
            return Err(refusal(
                ErrorCode::BaseMismatch,
                format!("round {} started from checkpoint {base}, not {}", s.base_round, s.base_hash),
            ));
        }
        // Late work from an earlier phase is stale whoever sent it: its sender learns that the
        // new phase did not admit it from its next assignment, and stops there without an error.
        if self.phase_at(s.base_round) != self.phase() {
            return Err(earlier_phase(s.base_round));
        }
        self.check_member(s.contributor)?;
        if staleness > self.spec.max_staleness {
            return Err(stale());
        }
        self.check_data(s)?;
        match facts.blob_owner {
            // Its own accepted submission again: a retry after a lost answer (or a hub restart).
            Some(owner) if owner == s.contributor => {
                return Err(refusal(
                    ErrorCode::Duplicate,
                    format!(
                        "these exact bytes are contributor {owner}'s accepted submission for round {}",
                        s.base_round
                    ),
                ));
            }
            Some(owner) => {
                return Err(refusal(
                    ErrorCode::Replay,
                    format!(
                        "these exact bytes were already submitted by contributor {owner}; a submission is new work"
                    ),
                ));
            }
            None => {}
        }
        if facts.submitted_for_base
            || self.pending.iter().any(|a| (a.contributor, a.base_round) == (s.contributor, s.base_round))
        {
            return Err(refusal(
                ErrorCode::Duplicate,
                format!("contributor {} already submitted for round {}", s.contributor, s.base_round),
            ));
        }
        let weight = self.spec.staleness_decay.powi(staleness.min(i32::MAX as u64) as i32);
        // Strictly later than the round's last admission, even within one millisecond or if the
        // clock steps back: arrival order is admission order, so a sum taken as submissions
        // arrive is the sum taken again in arrival order after a restart, bit for bit.
        let received_ms =
            self.pending.iter().map(|a| a.received_ms.saturating_add(1)).max().map_or(now_ms, |m| m.max(now_ms));
        let accepted = Accepted {
            contributor: s.contributor,
            base_round: s.base_round,
            round,
            weight,
            bytes: s.bytes,
            inner_loss: s.inner_loss.filter(|l| l.is_finite()),
            blob: s.blob.clone(),
            received_ms,
        };
        let mut events = vec![Event::Accepted(accepted)];
        if self.pending.len() as u64 + 1 >= u64::from(self.spec.quorum) {
            events.push(Event::Closed { round, closed: Closed { closed_by: "quorum".into(), at_ms: now_ms } });
        }
        let receipt = Receipt { round, base_round: s.base_round, staleness, weight, bytes: s.bytes };
        Ok(Admission { events, receipt })
    }

    /// The record of a refusal, to persist (every one is, with its reason, except `busy`: being
    /// told to retry while a round is scored is not a refusal).
    pub fn refused(&self, contributor: u64, e: &ApiError, now_ms: i64) -> Option<Event> {
        (e.code != ErrorCode::Busy).then(|| Event::Refused {
            contributor,
            round: self.round,
            code: e.code,
            message: e.message.clone(),
            at_ms: now_ms,
        })
    }

    /// Whether a refusal of this contributor this round places it last in the round's rating.
    pub fn refused_this_round(&self, contributor: u64) -> bool {
        self.refused.contains(&contributor)
    }
}

fn earlier_phase(round: u64) -> ApiError {
    refusal(
        ErrorCode::Stale,
        format!("trained on an earlier phase's model (round {round}); the run has grown: fetch a new assignment"),
    )
}
