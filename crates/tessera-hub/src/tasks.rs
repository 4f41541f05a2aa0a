//! A round scored by many validators (`ContestSpec::tasks`): the round's tasks drawn from its
//! revealed seed (`tessera_contest::tasks::split`), a task leased to each validator that asks,
//! results stored as they come, and the round published once the core's
//! [`tessera_round::scoring::Board`] says every task is settled, with a hub-signed ledger entry
//! against each validator the others contradicted.
//!
//! Cost per request, for N submissions in T tasks: one read of the round's leases (O(T ×
//! validators) rows) and of which results exist; each result's report (its scores and
//! 16 KiB of copy samples per submission) is read from the database once per replica. Settling
//! compares every pair of the round's copy samples: O(N² × 4096) multiply-adds, about 4 × 10⁹
//! at N = 1,000 (seconds, once per round).

use tessera_contest::tasks::{Measured, Task, Tolerance, sample_from_hex, split_round};
use tessera_protocol::api::{ScoreReport, ScoringJob, TaskJob, TaskSpec};
use tessera_protocol::{ApiError, ErrorCode};
use tessera_round::scoring::{Board, TaskResult};
use tessera_round::{Accepted, Judgement};
use tessera_trust::ledger::Body as LedgerBody;

use crate::HubError;
use crate::hub::{Hub, Live, api, internal, now_ms};
use crate::rounds::Sealed;

/// The round being scored, as its tasks see it.
struct Round {
    round: u64,
    rows: Vec<Accepted>,
    tasks: Vec<Task>,
    seed: String,
    commitment: String,
}

impl Hub {
    pub(crate) fn task_spec(&self) -> Option<TaskSpec> {
        self.spec().contest.as_ref()?.tasks.clone()
    }

    /// The round waiting for scores, split into its tasks; `None` when no round is.
    async fn scoring_round(&self, live: &Live, spec: &TaskSpec) -> Result<Option<Round>, HubError> {
        let run = &live.run;
        if run.closed().is_none() || run.finished() {
            return Ok(None);
        }
        let round = run.round();
        let (seed, commitment) = self.db.eval_seed(round).await?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&seed, &mut bytes).map_err(|e| HubError::Corrupt(format!("round {round}'s seed: {e}")))?;
        let rows = run.arrival_order();
        let tasks = split_round(&bytes, rows.len(), spec.size as usize, spec.double_share);
        Ok(Some(Round { round, rows, tasks, seed, commitment }))
    }

    /// Brings the cached results of the round up to date with the database.
    async fn refresh_results(&self, live: &mut Live, round: u64) -> Result<(), HubError> {
        if live.task_results.0 != round {
            live.task_results = (round, Vec::new());
        }
        for (task, validator) in self.db.result_keys(round).await? {
            if live.task_results.1.iter().any(|r| r.task == task && r.validator == validator) {
                continue;
            }
            let (at_ms, json) = self.db.task_result(round, task, &validator).await?;
            let report: ScoreReport = serde_json::from_str(&json)
                .map_err(|e| HubError::Corrupt(format!("round {round}, task {task}'s stored result: {e}")))?;
            let result = task_result(&validator, at_ms, task, &report)
                .map_err(|e| HubError::Corrupt(format!("stored result: {e}")))?;
            live.task_results.1.push(result);
        }
        Ok(())
    }

    /// The next task for `validator`, leased to it, as its job.
    pub(crate) async fn task_job(
        &self,
        live: &mut Live,
        validator: &str,
        spec: &TaskSpec,
    ) -> Result<Option<ScoringJob>, HubError> {
        let Some(r) = self.scoring_round(live, spec).await? else { return Ok(None) };
        self.refresh_results(live, r.round).await?;
        let leases = self.db.leases(r.round).await?;
        let now = now_ms();
        let board = self.board(spec, &r.tasks, &leases, &live.task_results.1);
        let Some(id) = board.next_for(validator, now) else { return Ok(None) };
        // Asking again for a task it holds does not extend its lease.
        let held = leases.iter().find(|l| l.task == id && l.validator == validator && l.until_ms > now);
        let until = match held {
            Some(l) => l.until_ms,
            None => {
                let until = now.saturating_add(i64::try_from(spec.lease_ms).unwrap_or(i64::MAX));
                self.db.lease(r.round, id, validator, until).await?;
                until
            }
        };
        let task = &r.tasks[id as usize];
        tracing::info!(round = r.round, task = id, validator, submissions = task.positions.len(), "task leased");
        Ok(Some(ScoringJob {
            revision: self.spec_revision(),
            round: r.round,
            phase: live.run.phase() as u32,
            base_checkpoint: live.run.checkpoint().to_owned(),
            eval_seed: r.seed,
            eval_commitment: r.commitment,
            submissions: task.positions.iter().map(|&p| self.job_submission(r.rows[p as usize].clone())).collect(),
            task: Some(TaskJob {
                id,
                tasks: r.tasks.len() as u32,
                positions: task.positions.clone(),
                lease_until_ms: until,
            }),
        }))
    }

    fn board<'a>(
        &self,
        spec: &TaskSpec,
        tasks: &'a [Task],
        leases: &'a [tessera_round::scoring::Lease],
        results: &'a [TaskResult],
    ) -> Board<'a> {
        Board {
            tasks,
            leases,
            results,
            validators: self.validator_count(),
            lease_ms: i64::try_from(spec.lease_ms).unwrap_or(i64::MAX),
            tolerance: Tolerance { absolute: spec.tolerance_abs, relative: spec.tolerance_rel },
        }
    }

    /// Takes `validator`'s result on a task of the round being scored; publishes the round if
    /// that settled its last task.
    pub(crate) async fn post_task_scores(&self, validator: &str, report: ScoreReport) -> Result<(), ApiError> {
        let Some(spec) = self.task_spec() else {
            return Err(api(ErrorCode::BadRequest, "this run is scored whole: post the round's scores without a task"));
        };
        let Some(id) = report.task else {
            return Err(api(ErrorCode::BadRequest, "this run is scored in tasks: say which task these scores are for"));
        };
        let mut live = self.live.lock().await;
        self.sync(&mut live).await.map_err(internal)?;
        let not_scoring = || {
            api(
                ErrorCode::NotScoring,
                format!("round {} is not waiting for scores (the run is at round {})", report.round, live.run.round()),
            )
        };
        let r = self.scoring_round(&live, &spec).await.map_err(internal)?.ok_or_else(not_scoring)?;
        if r.round != report.round {
            return Err(not_scoring());
        }
        let now = now_ms();
        let result = task_result(validator, now, id, &report).map_err(|e| api(ErrorCode::BadRequest, e))?;
        self.refresh_results(&mut live, r.round).await.map_err(internal)?;
        let leases = self.db.leases(r.round).await.map_err(internal)?;
        let board = self.board(&spec, &r.tasks, &leases, &live.task_results.1);
        let task = board.check(&result, now)?;
        let mismatch =
            task.positions.iter().zip(&report.scores).any(|(&p, s)| r.rows[p as usize].contributor != s.contributor);
        if mismatch {
            return Err(api(
                ErrorCode::NotScoring,
                format!("the scores do not list task {id}'s submissions in its order"),
            ));
        }
        let json = serde_json::to_string(&report).map_err(|e| api(ErrorCode::Internal, e.to_string()))?;
        if !self.db.put_result(r.round, id, validator, now, &json).await.map_err(internal)? {
            return Err(api(ErrorCode::Duplicate, format!("you already scored task {id}")));
        }
        tracing::info!(round = r.round, task = id, validator, "task scored");
        live.task_results.1.push(result);
        self.settle_tasks(&mut live).await.map_err(internal)?;
        Ok(())
    }

    /// `validator` cannot score: its leases end now, so its tasks go to the others. With no
    /// other validator, the round is aggregated unscored at once instead (`post_failure`).
    pub(crate) async fn release_tasks(&self, live: &Live, validator: &str) -> Result<(), HubError> {
        self.db.release(live.run.round(), validator, now_ms()).await
    }

    /// Publishes the round being scored if every task is settled (a check or third opinion
    /// given up counts: see `tessera_round::scoring`). Called after each result, and by the
    /// clock for the tasks that settle by waiting. True when it published.
    pub(crate) async fn settle_tasks(&self, live: &mut Live) -> Result<bool, HubError> {
        let Some(spec) = self.task_spec() else { return Ok(false) };
        let Some(r) = self.scoring_round(live, &spec).await? else { return Ok(false) };
        self.refresh_results(live, r.round).await?;
        let leases = self.db.leases(r.round).await?;
        let contributors: Vec<u64> = r.rows.iter().map(|a| a.contributor).collect();
        let board = self.board(&spec, &r.tasks, &leases, &live.task_results.1);
        let Some(outcome) = board.outcome(r.round, &contributors, now_ms()) else { return Ok(false) };
        for note in &outcome.notes {
            tracing::warn!(round = r.round, "{note}");
        }
        let mut sealed = Sealed::default();
        if !outcome.faults.is_empty() {
            let mut next = self.trust.read().map_err(|_| HubError::Corrupt("trust poisoned".into()))?.ledger.clone();
            let from = next.len();
            let refused = |e: tessera_trust::ledger::LedgerError| HubError::Corrupt(format!("a fault entry: {e}"));
            for f in &outcome.faults {
                tracing::warn!(round = r.round, task = f.task, validator = %f.validator, agreed = ?f.agreed, detail = %f.detail, "a validator's result was contradicted");
                let body = LedgerBody::ValidatorFault {
                    validator: f.validator.clone(),
                    task: f.task,
                    agreed: f.agreed.clone(),
                    detail: f.detail.chars().take(300).collect(),
                };
                next.append(r.round, now_ms(), false, body, &self.identity).map_err(refused)?;
            }
            let root = LedgerBody::Root { size: next.len(), root: next.root() };
            next.append(r.round, now_ms(), false, root, &self.identity).map_err(refused)?;
            sealed.ledger =
                (from..next.len()).filter_map(|s| next.entry_bytes(s).map(|b| (s, hex::encode(b)))).collect();
            sealed.next = Some(next);
        }
        let closed_by = live.run.closed().map(|c| c.closed_by.clone()).unwrap_or_default();
        self.finish(live, Judgement::Scored(&outcome.report), &closed_by, sealed).await?;
        Ok(true)
    }
}

/// A posted task report as the core compares it: its scores with their copy samples.
fn task_result(validator: &str, at_ms: i64, task: u32, report: &ScoreReport) -> Result<TaskResult, String> {
    if report.samples.len() != report.scores.len() {
        return Err(format!(
            "{} copy samples for {} scores: one per submission",
            report.samples.len(),
            report.scores.len()
        ));
    }
    let measured = report
        .scores
        .iter()
        .zip(&report.samples)
        .map(|(s, hex)| {
            Ok(Measured {
                score: s.score,
                data_fit: s.data_fit,
                score_se: s.score_se,
                norm_bound: s.norm_bound,
                sample: sample_from_hex(hex)?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(TaskResult { task, validator: validator.to_owned(), at_ms, measured, held_out_loss: report.held_out_loss })
}
