//! A round scored by many validators: which task a validator gets next, which results a task
//! still needs, who was wrong when two disagree, and the round's report once every task is
//! settled. Pure: the shell passes the round's tasks (`tessera_contest::tasks::split`), the
//! leases and results it stored, the number of validators it serves and the time.
//!
//! A task needs one result, or two when it is checked; when two disagree beyond the tolerance,
//! a third. The two that agree settle it, and the one they contradict is at fault. A validator
//! never scores a task twice, so the results on a task come from different validators. Leases
//! only spread the work: a task whose holder vanished is free again once its lease ends, and a
//! result is taken from any validator that has not scored the task yet, leased or not.
//!
//! A check or a third opinion that no validator delivers within two leases of the moment it
//! became needed (the first results of every task in, or the disagreement seen) is given up:
//! the task is settled by what it has (logged), so one missing validator never holds a round.
//!
//! Cost: O(tasks + leases + results) per decision; the report reads every result's scores and
//! copy samples once and compares every pair of the round's samples (O(N² × 4096)).

use tessera_contest::copies::find_copies;
use tessera_contest::tasks::{Measured, Task, Tolerance, disagreement};
use tessera_protocol::api::{ApiError, ErrorCode, ScoreReport, SubmissionScore};

use crate::refusal;

/// A task given to a validator until `until_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub task: u32,
    pub validator: String,
    pub until_ms: i64,
}

/// One validator's result on one task: its measurements in the task's order.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    pub task: u32,
    pub validator: String,
    pub at_ms: i64,
    pub measured: Vec<Measured>,
    pub held_out_loss: Option<f64>,
}

/// A validator whose result on a task the others contradicted: a ledger entry against it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub task: u32,
    pub validator: String,
    /// The validators whose agreeing results settled the task.
    pub agreed: Vec<String>,
    /// Where its result differed, in words.
    pub detail: String,
}

/// A round's scoring: its tasks and what the shell stored about them.
#[derive(Debug, Clone, Copy)]
pub struct Board<'a> {
    pub tasks: &'a [Task],
    pub leases: &'a [Lease],
    pub results: &'a [TaskResult],
    /// Validators the hub serves: a task never waits for more results than there are of them.
    pub validators: usize,
    pub lease_ms: i64,
    pub tolerance: Tolerance,
}

/// Where one task stands.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// It needs this many results in all.
    Open {
        needs: usize,
    },
    Settled(Settled),
}

#[derive(Debug, Clone, PartialEq)]
struct Settled {
    measured: Vec<Measured>,
    held_out_loss: Option<f64>,
    faults: Vec<Fault>,
    /// What the log should say about how it was settled, if anything unusual.
    note: Option<String>,
}

/// A round whose every task is settled.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The round's scores in arrival order, copies found across tasks, as one report.
    pub report: ScoreReport,
    pub faults: Vec<Fault>,
    pub notes: Vec<String>,
}

impl Board<'_> {
    fn results_of(&self, task: u32) -> Vec<&TaskResult> {
        let mut r: Vec<&TaskResult> = self.results.iter().filter(|r| r.task == task).collect();
        r.sort_by(|a, b| (a.at_ms, &a.validator).cmp(&(b.at_ms, &b.validator)));
        r
    }

    /// When the first results of every task were all in.
    fn primaries_done(&self) -> Option<i64> {
        self.tasks
            .iter()
            .map(|t| self.results_of(t.id).first().map(|r| r.at_ms))
            .try_fold(i64::MIN, |m, at| Some(m.max(at?)))
    }

    /// Where `task` stands at `now_ms`; `primaries_done` is [`Board::primaries_done`], computed
    /// once by the caller for all the tasks it asks about.
    fn state(&self, task: &Task, now_ms: i64, primaries_done: Option<i64>) -> State {
        let results = self.results_of(task.id);
        let settle = |r: &TaskResult, faults: Vec<Fault>, note: Option<String>| {
            State::Settled(Settled { measured: r.measured.clone(), held_out_loss: r.held_out_loss, faults, note })
        };
        let wanted = if task.checked { 2 } else { 1 };
        let Some(first) = results.first() else { return State::Open { needs: 1 } };
        let overdue = |since: i64| {
            let since = primaries_done.map_or(since, |p| p.max(since));
            now_ms >= since.saturating_add(self.lease_ms.saturating_mul(2))
        };
        if results.len() == 1 {
            if wanted.min(self.validators) <= 1 {
                return settle(first, Vec::new(), None);
            }
            if overdue(first.at_ms) {
                return settle(first, Vec::new(), Some(format!("task {}: its check never came", task.id)));
            }
            return State::Open { needs: 2 };
        }
        let second = results[1];
        let Some(why) = disagreement(view(first), view(second), self.tolerance) else {
            return settle(first, Vec::new(), None);
        };
        let Some(third) = results.get(2) else {
            if self.validators >= 3 && !overdue(second.at_ms) {
                return State::Open { needs: 3 };
            }
            // Nobody to break the tie: the mean of the two, nobody blamed.
            let mean = mean_of(first, second);
            let note = format!(
                "task {}: {} and {} disagree ({why}) and no third validator settled it; their mean is used",
                task.id, first.validator, second.validator
            );
            return State::Settled(Settled { note: Some(note), ..mean });
        };
        for (winner, other, loser) in [(*first, *third, second), (second, *third, *first)] {
            if disagreement(view(winner), view(other), self.tolerance).is_none() {
                let detail = disagreement(view(winner), view(loser), self.tolerance).unwrap_or(why);
                let fault = Fault {
                    task: task.id,
                    validator: loser.validator.clone(),
                    agreed: vec![winner.validator.clone(), other.validator.clone()],
                    detail,
                };
                return settle(winner, vec![fault], None);
            }
        }
        let mean = mean_of(first, second);
        let note = format!("task {}: three validators disagree; the first two's mean is used, nobody blamed", task.id);
        State::Settled(Settled { note: Some(note), ..mean })
    }

    /// The task `validator` should score next, if any: one it holds a live lease on and has not
    /// reported, else the open task with the fewest results (first results before checks) that
    /// it has not scored, whose lease it did not let lapse (when there are other validators) and
    /// that others' live leases do not already cover.
    pub fn next_for(&self, validator: &str, now_ms: i64) -> Option<u32> {
        let live = |l: &&Lease| l.until_ms > now_ms && !scored_by(self.results, l.task, &l.validator);
        let primaries_done = self.primaries_done();
        let mut best: Option<(usize, u32)> = None;
        for task in self.tasks {
            let State::Open { needs } = self.state(task, now_ms, primaries_done) else { continue };
            if scored_by(self.results, task.id, validator) {
                continue;
            }
            let leases: Vec<&Lease> = self.leases.iter().filter(|l| l.task == task.id).filter(live).collect();
            if leases.iter().any(|l| l.validator == validator) {
                return Some(task.id);
            }
            // A lease it let lapse went to someone else, unless nobody else exists.
            let lapsed =
                self.leases.iter().any(|l| l.task == task.id && l.validator == validator && l.until_ms <= now_ms);
            if lapsed && self.validators > 1 {
                continue;
            }
            let have = self.results.iter().filter(|r| r.task == task.id).count();
            if have + leases.len() < needs && best.is_none_or(|(h, _)| have < h) {
                best = Some((have, task.id));
            }
        }
        best.map(|(_, t)| t)
    }

    /// Checks a result before the shell stores it: a task of the round, still open, not scored
    /// by this validator, with one measurement per submission.
    pub fn check(&self, result: &TaskResult, now_ms: i64) -> Result<&Task, ApiError> {
        let Some(task) = self.tasks.iter().find(|t| t.id == result.task) else {
            return Err(refusal(ErrorCode::BadRequest, format!("the round has no task {}", result.task)));
        };
        if scored_by(self.results, task.id, &result.validator) {
            return Err(refusal(ErrorCode::Duplicate, format!("you already scored task {}", task.id)));
        }
        if !matches!(self.state(task, now_ms, self.primaries_done()), State::Open { .. }) {
            return Err(refusal(ErrorCode::NotScoring, format!("task {} is already settled", task.id)));
        }
        if result.measured.len() != task.positions.len() {
            return Err(refusal(
                ErrorCode::NotScoring,
                format!(
                    "task {} has {} submissions; {} were scored",
                    task.id,
                    task.positions.len(),
                    result.measured.len()
                ),
            ));
        }
        let finite = result.measured.iter().all(|m| {
            m.score.is_finite()
                && m.data_fit.is_none_or(f64::is_finite)
                && m.norm_bound.is_none_or(|b| b.is_finite() && b >= 0.0)
                && m.sample.iter().all(|v| v.is_finite())
        });
        if !finite || result.held_out_loss.is_some_and(|l| !l.is_finite()) {
            return Err(refusal(
                ErrorCode::BadRequest,
                "scores, data fits, norm bounds, samples and the loss must be finite (norm bounds not negative)",
            ));
        }
        Ok(task)
    }

    /// The round's report once every task is settled; `contributors` are the round's
    /// submissions' contributors in arrival order.
    pub fn outcome(&self, round: u64, contributors: &[u64], now_ms: i64) -> Option<Outcome> {
        let n = contributors.len();
        let mut measured: Vec<Option<Measured>> = vec![None; n];
        let (mut losses, mut faults, mut notes) = (Vec::new(), Vec::new(), Vec::new());
        let primaries_done = self.primaries_done();
        for task in self.tasks {
            let State::Settled(s) = self.state(task, now_ms, primaries_done) else { return None };
            for (&p, m) in task.positions.iter().zip(s.measured) {
                *measured.get_mut(p as usize)? = Some(m);
            }
            losses.extend(s.held_out_loss);
            faults.extend(s.faults);
            notes.extend(s.note);
        }
        let measured: Vec<Measured> = measured.into_iter().collect::<Option<_>>()?;
        let samples: Vec<Vec<f32>> = measured.iter().map(|m| m.sample.clone()).collect();
        let (copy_of, _) = find_copies(&samples);
        losses.sort_by(f64::total_cmp);
        let scores = measured
            .iter()
            .zip(contributors)
            .zip(copy_of)
            .map(|((m, &contributor), copy)| SubmissionScore {
                contributor,
                score: m.score,
                data_fit: m.data_fit,
                copy_of: copy.map(|j| j as u32),
                score_se: m.score_se,
                norm_bound: m.norm_bound,
            })
            .collect();
        let report = ScoreReport {
            round,
            scores,
            held_out_loss: losses.get(losses.len() / 2).copied(),
            task: None,
            samples: Vec::new(),
        };
        Some(Outcome { report, faults, notes })
    }
}

fn view(r: &TaskResult) -> (&[Measured], Option<f64>) {
    (r.measured.as_slice(), r.held_out_loss)
}

fn scored_by(results: &[TaskResult], task: u32, validator: &str) -> bool {
    results.iter().any(|r| r.task == task && r.validator == validator)
}

/// Two results averaged, number by number (the first's copy samples kept).
fn mean_of(a: &TaskResult, b: &TaskResult) -> Settled {
    let mean = |x: f64, y: f64| 0.5 * (x + y);
    let measured = a
        .measured
        .iter()
        .zip(&b.measured)
        .map(|(x, y)| Measured {
            score: mean(x.score, y.score),
            data_fit: x.data_fit.zip(y.data_fit).map(|(x, y)| mean(x, y)),
            score_se: x.score_se.zip(y.score_se).map(|(x, y)| mean(x, y)),
            norm_bound: x.norm_bound.zip(y.norm_bound).map(|(x, y)| mean(x, y)),
            sample: x.sample.clone(),
        })
        .collect();
    let held_out_loss = match (a.held_out_loss, b.held_out_loss) {
        (Some(x), Some(y)) => Some(mean(x, y)),
        (x, y) => x.or(y),
    };
    Settled { measured, held_out_loss, faults: Vec::new(), note: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_contest::tasks::split;

    const LEASE: i64 = 1000;

    fn honest(task: &Task) -> Vec<Measured> {
        task.positions
            .iter()
            .map(|&p| Measured {
                score: 0.01 * f64::from(p + 1),
                data_fit: Some(0.001),
                score_se: Some(0.001),
                norm_bound: Some(0.2),
                sample: (0..64).map(|i| ((i * 7 + p as usize * 13) % 17) as f32 - 8.0).collect(),
            })
            .collect()
    }

    fn result(task: &Task, validator: &str, at_ms: i64, measured: Vec<Measured>) -> TaskResult {
        TaskResult { task: task.id, validator: validator.into(), at_ms, measured, held_out_loss: Some(2.0) }
    }

    fn board<'a>(tasks: &'a [Task], leases: &'a [Lease], results: &'a [TaskResult], validators: usize) -> Board<'a> {
        Board { tasks, leases, results, validators, lease_ms: LEASE, tolerance: Tolerance::default() }
    }

    /// Runs a round to its end: each validator in turn asks for a task and reports it at once,
    /// `lie` inflating the scores, `gone` taking tasks and never reporting.
    fn play(tasks: &[Task], validators: &[&str], lie: &str, gone: &str) -> (Outcome, Vec<TaskResult>, i64) {
        let (mut leases, mut results) = (Vec::new(), Vec::new());
        let mut now = 0;
        let contributors: Vec<u64> = (0..tasks.iter().map(|t| t.positions.len()).sum::<usize>() as u64).collect();
        for _ in 0..10_000 {
            let b = board(tasks, &leases, &results, validators.len());
            if let Some(o) = b.outcome(3, &contributors, now) {
                return (o, results, now);
            }
            for v in validators {
                let Some(t) = board(tasks, &leases, &results, validators.len()).next_for(v, now) else { continue };
                // Asking again for a task it holds does not renew its lease.
                if !leases.iter().any(|l| l.task == t && l.validator == *v && l.until_ms > now) {
                    leases.push(Lease { task: t, validator: (*v).into(), until_ms: now + LEASE });
                }
                if *v == gone {
                    continue;
                }
                let task = &tasks[t as usize];
                let mut m = honest(task);
                if *v == lie {
                    m.iter_mut().for_each(|m| m.score += 0.5);
                }
                let r = result(task, v, now, m);
                board(tasks, &leases, &results, validators.len()).check(&r, now).unwrap();
                results.push(r);
            }
            now += 100;
        }
        panic!("the round never settled");
    }

    #[test]
    fn one_validator_scores_every_task_and_the_report_is_in_arrival_order() {
        let tasks = split(40, 5, 8, 0.5);
        let (o, results, _) = play(&tasks, &["solo"], "", "");
        assert_eq!(results.len(), tasks.len(), "checks need a second validator, so none is asked");
        assert_eq!(o.report.scores.len(), 40);
        for (i, s) in o.report.scores.iter().enumerate() {
            assert_eq!((s.contributor, s.score), (i as u64, 0.01 * (i + 1) as f64));
        }
        assert!(o.faults.is_empty() && o.notes.is_empty());
        assert_eq!(o.report.held_out_loss, Some(2.0));
    }

    #[test]
    fn a_lying_validator_is_outvoted_and_blamed_on_every_checked_task_it_scored() {
        let tasks = split(64, 9, 8, 1.0);
        let (o, results, _) = play(&tasks, &["a", "liar", "c"], "liar", "");
        let by_liar: Vec<u32> = results.iter().filter(|r| r.validator == "liar").map(|r| r.task).collect();
        assert!(!by_liar.is_empty());
        let mut blamed: Vec<u32> = o.faults.iter().map(|f| f.task).collect();
        blamed.sort_unstable();
        let mut expected = by_liar.clone();
        expected.sort_unstable();
        assert_eq!(blamed, expected);
        assert!(o.faults.iter().all(|f| f.validator == "liar" && f.agreed.len() == 2 && f.detail.contains("score")));
        // Its numbers never reach the report.
        for (i, s) in o.report.scores.iter().enumerate() {
            assert_eq!(s.score, 0.01 * (i + 1) as f64);
        }
    }

    #[test]
    fn a_validator_that_vanishes_has_its_tasks_reassigned_and_the_round_closes() {
        let tasks = split(48, 2, 8, 0.0);
        let (o, results, now) = play(&tasks, &["gone", "b"], "", "gone");
        assert_eq!(o.report.scores.len(), 48);
        assert!(results.iter().all(|r| r.validator == "b"));
        assert!(now >= LEASE, "its tasks waited for their leases to end: {now}");
    }

    #[test]
    fn an_unchecked_task_is_settled_when_no_second_validator_comes() {
        let tasks = split(16, 4, 8, 1.0);
        let (o, _, now) = play(&tasks, &["a", "gone"], "", "gone");
        assert_eq!(o.notes.len(), tasks.len(), "{:?}", o.notes);
        assert!(o.notes[0].contains("check never came"));
        assert!(now >= 2 * LEASE);
    }

    #[test]
    fn copies_are_found_across_tasks() {
        let tasks = split(16, 4, 8, 0.0);
        let leases = Vec::new();
        let mut results: Vec<TaskResult> = tasks.iter().map(|t| result(t, "v", 0, honest(t))).collect();
        // Position 9 copies position 2, whichever tasks they fell in.
        let sample_of = |p: u32| honest(&Task { id: 0, positions: vec![p], checked: false })[0].sample.clone();
        for (t, r) in tasks.iter().zip(&mut results) {
            if let Some(i) = t.positions.iter().position(|&p| p == 9) {
                r.measured[i].sample = sample_of(2);
            }
        }
        let contributors: Vec<u64> = (0..16).collect();
        let o = board(&tasks, &leases, &results, 1).outcome(0, &contributors, 0).unwrap();
        let flagged: Vec<(usize, u32)> =
            o.report.scores.iter().enumerate().filter_map(|(i, s)| s.copy_of.map(|j| (i, j))).collect();
        assert_eq!(flagged, vec![(9, 2)]);
    }

    #[test]
    fn results_are_refused_for_unknown_settled_or_repeated_tasks() {
        let tasks = split(16, 4, 8, 0.0);
        let ok = result(&tasks[0], "a", 0, honest(&tasks[0]));
        let results = vec![ok.clone()];
        let b = board(&tasks, &[], &results, 2);
        assert_eq!(b.check(&ok, 0).unwrap_err().code, ErrorCode::Duplicate);
        let other = TaskResult { validator: "b".into(), ..ok.clone() };
        assert_eq!(b.check(&other, 0).unwrap_err().code, ErrorCode::NotScoring, "settled");
        let unknown = TaskResult { task: 9, ..other.clone() };
        assert_eq!(b.check(&unknown, 0).unwrap_err().code, ErrorCode::BadRequest);
        let short = TaskResult { task: 1, measured: honest(&tasks[1])[1..].to_vec(), ..other.clone() };
        assert!(b.check(&short, 0).is_err());
        let mut nan = TaskResult { task: 1, measured: honest(&tasks[1]), ..other };
        nan.measured[0].score = f64::NAN;
        assert_eq!(b.check(&nan, 0).unwrap_err().code, ErrorCode::BadRequest);
    }
}
