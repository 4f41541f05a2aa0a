//! Closing a round: the deadline and the score timeout, checking what the validator reports,
//! judging (weights, scores, rewards, ratings), deciding whether the run grows, and the
//! publication that moves the run to its next round.

use tessera_contest::rating::Standing;
use tessera_contest::{Conduct, Policy, Ratings, Scored, Settlement, settle};
use tessera_protocol::api::{ApiError, ErrorCode, ScoreReport, Verdict};

use crate::{Accepted, Closed, Event, Publication, Run, ScoreRow, refusal};

/// How a round's submissions were judged.
#[derive(Debug, Clone, Copy)]
pub enum Judgement<'a> {
    /// Staleness weights only (no validator, or its scores timed out).
    Unscored,
    /// A validator's scores, judged here.
    Scored(&'a ScoreReport),
    /// A sealed run: the validator judged what only it can read.
    Sealed(&'a Verdict),
}

/// What the clock asks of the run.
#[derive(Debug, Clone, PartialEq)]
pub enum Tick {
    /// The deadline passed: close the round's submissions (persist, apply, then finish an
    /// unscored round).
    Close(Event),
    /// Aggregate and publish the closed round now, judged unscored: an unscored run's closed
    /// round (after a restart, or a failed attempt), or a scored one whose scores are overdue.
    Finish { closed_by: String },
}

/// A closed round, judged: what to aggregate and what publishing it will record.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub round: u64,
    pub closed_by: String,
    /// The round's submissions in arrival order (which is admission order: no two share a
    /// `received_ms`).
    pub rows: Vec<Accepted>,
    /// Each row's aggregation weight; 0 leaves it out.
    pub weights: Vec<f64>,
    /// Scores, flags and rewards (scored runs), in the rows' order.
    pub scores: Vec<ScoreRow>,
    /// The ratings after this round (scored runs).
    pub ratings: Option<Ratings>,
    /// The phase the run grows into after this round, if it does.
    pub next_phase: Option<usize>,
    /// The run ends with this round.
    pub finished: bool,
    pub mean_inner_loss: Option<f64>,
    /// The loss the phase's target was judged on: the validator's held-out loss in a scored
    /// run, the submissions' (signed) mean inner loss in an unscored one.
    pub target_loss: Option<f64>,
    /// The phase ends early: its loss target was met before its planned last round.
    pub early: bool,
}

/// What aggregating a plan gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The new weights' content address (hex BLAKE3).
    pub result_checkpoint: String,
    /// Submissions aggregated, and their total weight.
    pub used: u64,
    pub weight: f64,
}

impl Run {
    /// What the clock asks for at `now_ms`, if anything.
    pub fn tick(&self, now_ms: i64) -> Option<Tick> {
        if self.finished {
            return None;
        }
        match (&self.closed, &self.spec.contest) {
            (Some(c), Some(contest)) => {
                let due = c.at_ms.saturating_add(i64::try_from(contest.score_timeout_ms).unwrap_or(i64::MAX));
                (now_ms >= due).then(|| Tick::Finish { closed_by: format!("{} (scores timed out)", c.closed_by) })
            }
            (Some(c), None) => Some(Tick::Finish { closed_by: c.closed_by.clone() }),
            (None, _) => {
                let first = self.pending.iter().map(|a| a.received_ms).min()?;
                let deadline = i64::try_from(self.spec.round_deadline_ms).unwrap_or(i64::MAX);
                (now_ms >= first.saturating_add(deadline)).then(|| {
                    Tick::Close(Event::Closed {
                        round: self.round,
                        closed: Closed { closed_by: "deadline".into(), at_ms: now_ms },
                    })
                })
            }
        }
    }

    /// The current round's submissions in arrival order, which is the order they were admitted
    /// in (`admit` gives each a `received_ms` later than the last): the order the validator
    /// scores them in, a round is aggregated in, and a hub sums them in as they arrive. Sorted
    /// all the same, so a snapshot read back in any order gives the same rows.
    pub fn arrival_order(&self) -> Vec<Accepted> {
        let mut rows = self.pending.clone();
        rows.sort_by_key(|r| (r.received_ms, r.contributor, r.base_round));
        rows
    }

    /// Checks a score report against the round waiting for scores; returns its submissions.
    pub fn check_report(&self, report: &ScoreReport) -> Result<Vec<Accepted>, ApiError> {
        if self.closed.is_none() || self.spec.contest.is_none() || self.finished || report.round != self.round {
            return Err(refusal(
                ErrorCode::NotScoring,
                format!("round {} is not waiting for scores (the run is at round {})", report.round, self.round),
            ));
        }
        let rows = self.arrival_order();
        if rows.len() != report.scores.len()
            || rows.iter().zip(&report.scores).any(|(r, s)| r.contributor != s.contributor)
        {
            return Err(refusal(
                ErrorCode::NotScoring,
                "the scores do not list the round's submissions in the job's order",
            ));
        }
        for (i, s) in report.scores.iter().enumerate() {
            if !s.score.is_finite()
                || s.data_fit.is_some_and(|f| !f.is_finite())
                || s.norm_bound.is_some_and(|b| !(b.is_finite() && b >= 0.0))
                || s.copy_of.is_some_and(|j| j as usize >= i)
            {
                return Err(refusal(
                    ErrorCode::BadRequest,
                    format!("score {i} is not finite, has a negative norm bound or copies a later one"),
                ));
            }
        }
        if report.held_out_loss.is_some_and(|l| !l.is_finite()) {
            return Err(refusal(ErrorCode::BadRequest, "the held-out loss is not finite"));
        }
        Ok(rows)
    }

    /// Checks a sealed run's verdict against the round waiting for it (its ledger entries are
    /// the shell's to check); returns the round's submissions.
    pub fn check_verdict(&self, verdict: &Verdict) -> Result<Vec<Accepted>, ApiError> {
        let rows = self.check_report(&verdict.report)?;
        if verdict.settled.len() != rows.len() {
            return Err(refusal(ErrorCode::BadRequest, "the verdict does not settle every submission of the round"));
        }
        if verdict.settled.iter().any(|s| !(s.weight.is_finite() && s.weight >= 0.0)) {
            return Err(refusal(ErrorCode::BadRequest, "aggregation weights must be finite and non-negative"));
        }
        Ok(rows)
    }

    /// Judges the closed round and decides what publishing it does to the run.
    pub fn plan(&self, judgement: Judgement<'_>, closed_by: &str) -> Result<Plan, ApiError> {
        if self.finished || self.closed.is_none() {
            return Err(refusal(ErrorCode::NotScoring, format!("round {} has not closed", self.round)));
        }
        let rows = match judgement {
            Judgement::Unscored => self.arrival_order(),
            Judgement::Scored(report) => self.check_report(report)?,
            Judgement::Sealed(verdict) => self.check_verdict(verdict)?,
        };
        let (weights, scores, ratings) = self.judge(&rows, judgement);
        let round = self.round;
        let finished = round + 1 >= self.spec.rounds;
        let losses: Vec<f64> = rows.iter().filter_map(|r| r.inner_loss).collect();
        let mean_inner_loss = (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
        // Whatever decides a phase change is signed: in a scored run that is the validator's
        // held-out loss (a run whose scores timed out does not grow early); contributors' own
        // losses, signed with their submissions, only where no validator exists.
        let target_loss = match judgement {
            _ if self.spec.contest.is_none() => mean_inner_loss,
            Judgement::Scored(r) => r.held_out_loss,
            Judgement::Sealed(v) => v.report.held_out_loss,
            Judgement::Unscored => None,
        };
        let phase = self.phase();
        let planned = self.spec.phase_of(round + 1) > phase;
        let target_met = self.spec.until_loss(phase).zip(target_loss).is_some_and(|(t, l)| l <= t);
        let next_phase = (!finished && phase < self.spec.phases.len() && (planned || target_met)).then_some(phase + 1);
        Ok(Plan {
            round,
            closed_by: closed_by.to_owned(),
            rows,
            weights,
            scores,
            ratings,
            next_phase,
            finished,
            mean_inner_loss,
            target_loss,
            early: target_met && !planned && next_phase.is_some(),
        })
    }

    /// Weights for `rows` (arrival order); with scores, also their rows (flags, rewards) and the
    /// ratings after this round.
    fn judge(&self, rows: &[Accepted], judgement: Judgement<'_>) -> (Vec<f64>, Vec<ScoreRow>, Option<Ratings>) {
        let row_of = |r: &Accepted,
                      (score, score_se, norm_bound): (Option<f64>, Option<f64>, Option<f64>),
                      data_fit: Option<f64>,
                      (fit_factor, conduct): (Option<f64>, Option<f64>),
                      flag: Option<&str>,
                      weight,
                      reward| {
            ScoreRow {
                contributor: r.contributor,
                base_round: r.base_round,
                round: r.round,
                score,
                data_fit,
                fit_factor,
                score_se,
                norm_bound,
                conduct,
                flag: flag.map(str::to_owned),
                weight,
                reward,
            }
        };
        match (judgement, &self.spec.contest) {
            (Judgement::Sealed(verdict), _) => {
                let ratings = self.rated(
                    rows.iter()
                        .zip(&verdict.settled)
                        .map(|(r, s)| Standing { contributor: r.contributor, score: s.effective }),
                );
                let scores = rows
                    .iter()
                    .zip(&verdict.report.scores)
                    .zip(&verdict.settled)
                    .map(|((r, sc), st)| {
                        // The validator settled it: its fit factor is what discounted the score.
                        let fit = st.effective.filter(|_| sc.score > 0.0).map(|e| e / sc.score);
                        row_of(
                            r,
                            (Some(sc.score), sc.score_se, sc.norm_bound),
                            sc.data_fit,
                            (fit, None),
                            st.flag.as_deref(),
                            st.weight,
                            st.reward,
                        )
                    })
                    .collect();
                (verdict.settled.iter().map(|s| s.weight).collect(), scores, Some(ratings))
            }
            (Judgement::Scored(report), Some(contest)) => {
                let history: Vec<(f64, u64)> =
                    rows.iter().map(|r| self.fit.get(&r.contributor).copied().unwrap_or_default()).collect();
                let scored: Vec<Scored> = rows
                    .iter()
                    .zip(&report.scores)
                    .map(|(r, s)| Scored {
                        contributor: r.contributor,
                        score: s.score,
                        data_fit: s.data_fit,
                        copy_of: s.copy_of.map(|j| j as usize),
                        weight: r.weight,
                        fit_factor: 1.0,
                        score_se: s.score_se,
                        norm_bound: s.norm_bound,
                    })
                    .collect();
                let policy = Policy { reward_power: contest.reward_power, top: contest.top.map(|t| t as usize) };
                let conduct: Vec<Conduct> =
                    rows.iter().map(|r| self.conduct.get(&r.contributor).copied().unwrap_or_default()).collect();
                let Settlement { scored, judged, rewards } =
                    settle(scored, &history, &conduct, &policy, contest.reward_units);
                let ratings = self.rated(
                    scored
                        .iter()
                        .zip(&judged)
                        .map(|(s, j)| Standing { contributor: s.contributor, score: j.effective }),
                );
                let scores = rows
                    .iter()
                    .zip(&scored)
                    .zip(judged.iter().zip(&rewards))
                    .zip(&conduct)
                    .map(|(((r, s), (j, &reward)), c)| {
                        let factors = (Some(s.fit_factor), Some(c.factor()));
                        let flag = j.flag.map(|f| f.as_str());
                        row_of(
                            r,
                            (Some(s.score), s.score_se, s.norm_bound),
                            s.data_fit,
                            factors,
                            flag,
                            j.weight,
                            reward,
                        )
                    })
                    .collect();
                (judged.iter().map(|j| j.weight).collect(), scores, Some(ratings))
            }
            _ => {
                let weights = rows.iter().map(|r| r.weight).collect();
                let scores = match self.spec.contest {
                    Some(_) => rows
                        .iter()
                        .map(|r| row_of(r, (None, None, None), None, (None, None), Some("unscored"), r.weight, 0))
                        .collect(),
                    None => Vec::new(),
                };
                (weights, scores, None)
            }
        }
    }

    /// The ratings after a round with these standings; a contributor refused this round takes
    /// part too, in last place.
    fn rated(&self, standings: impl Iterator<Item = Standing>) -> Ratings {
        let refused = self.refused.iter().map(|&contributor| Standing { contributor, score: None });
        let standings: Vec<Standing> = standings.chain(refused).collect();
        let mut ratings = self.ratings.clone();
        ratings.update(&standings);
        ratings
    }

    /// The publication of a planned round whose aggregate is `outcome`: it closes the round,
    /// records scores and ratings, who qualified at the promotion boundary and who may train in
    /// a phase that admits only the top, and opens the next round with `next_commitment`.
    pub fn publish(&self, plan: Plan, outcome: Outcome, now_ms: i64, next_commitment: Option<String>) -> Event {
        let ratings = plan.ratings.as_ref().unwrap_or(&self.ratings);
        // The promotion boundary: the leaderboard after this round decides who moves on, among
        // those who ever earned something (a contributor whose every submission was refused or
        // worthless never qualifies, however few others there are).
        let qualified: Vec<u64> = match &self.spec.contest {
            Some(c) if plan.round + 1 == c.boundary(self.spec.rounds) => {
                let earned = |id: &u64| {
                    self.earned.contains(id) || plan.scores.iter().any(|s| s.contributor == *id && s.reward > 0)
                };
                let ids = self.contributors.iter().copied().filter(earned);
                ratings.leaderboard(ids).into_iter().take(c.promote_top as usize).map(|(id, _)| id).collect()
            }
            _ => Vec::new(),
        };
        // A phase that admits only the top of the leaderboard: who that is now, among those the
        // ending phase admitted (the best of each phase move up; nobody comes back).
        let members = plan.next_phase.and_then(|k| {
            let top = self.spec.phases[k - 1].qualify_top?;
            let admitted =
                self.contributors.iter().copied().filter(|id| self.members.as_ref().is_none_or(|m| m.contains(id)));
            let best = ratings.leaderboard(admitted).into_iter().take(top as usize).map(|(id, _)| id).collect();
            Some((k as u64, best))
        });
        // Everyone who took part in a judged round has one more round on their conduct record;
        // a round left unscored (the validators' failure) counts for nobody, as for ratings.
        let conduct = if plan.ratings.is_some() {
            crate::took_part(&plan.scores, &self.refused, &self.caught)
                .into_iter()
                .map(|(id, caught)| {
                    let before = self.conduct.get(&id).copied().unwrap_or_default();
                    (id, Conduct { rounds: before.rounds + 1, caught: before.caught + u64::from(caught) })
                })
                .collect()
        } else {
            Vec::new()
        };
        let changed = plan.ratings.as_ref().map_or_else(Vec::new, |r| {
            r.0.iter().filter(|(id, v)| self.ratings.0.get(id) != Some(v)).map(|(id, v)| (*id, *v)).collect()
        });
        Event::Published(Box::new(Publication {
            round: plan.round,
            result_checkpoint: outcome.result_checkpoint,
            closed_by: plan.closed_by,
            closed_ms: now_ms,
            used: outcome.used,
            weight: outcome.weight,
            mean_inner_loss: plan.mean_inner_loss,
            bytes_up: plan.rows.iter().map(|r| r.bytes).sum(),
            finished: plan.finished,
            scores: plan.scores,
            ratings: changed,
            conduct,
            qualified,
            members,
            phase_start: plan.next_phase.map(|k| (k as u64, plan.round + 1)),
            next_commitment: if plan.finished { None } else { next_commitment },
        }))
    }
}
