//! Recomputing a published round's scores (`tessera audit`): anyone with the hub's URL takes the
//! round's job as the hub signed it (base checkpoint, revealed seed, each submission's
//! assignment), checks the seed against the commitment the round opened with, downloads the
//! base checkpoint and the submissions (a run that publishes them), scores them with the same
//! [`Scorer`] a validator runs, and compares every score, data fit and copy flag with what the
//! round published. The reward split is recomputed from the published rows too.
//!
//! Cost: one validator's round — the checkpoint, every submission of the round, and
//! `eval_windows + fit_windows × (1 + controls)` forward windows per submission.

use tch::Device;
use tessera_client::HubClient;
use tessera_contest::{Recorded, recompute};
use tessera_protocol::api::PublishedScore;
use tessera_protocol::decode_weights;

use crate::client::{DataConfig, ValidatorError, attach_assigned, scorer_for};
use crate::{Candidate, Scored, Scorer, revealed_seed};
use tessera_contest::copies::find_copies;
use tessera_contest::tasks::split_round;
use tessera_protocol::api::TaskSpec;

pub use tessera_contest::tasks::Tolerance;

/// One submission: what the round published, what this audit measured, and where they differ.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checked {
    pub published: PublishedScore,
    pub recomputed: Scored,
    /// Each disagreement in words (empty: it agrees).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditReport {
    pub round: u64,
    pub submissions: Vec<Checked>,
    /// The published rewards are what the rule gives on the published rows.
    pub rewards_reproduced: bool,
}

impl AuditReport {
    pub fn agrees(&self) -> bool {
        self.rewards_reproduced && self.submissions.iter().all(|c| c.problems.is_empty())
    }
}

/// Audits published round `round` of the run behind `hub` (its key pinned by the caller).
pub fn audit(
    hub: &HubClient,
    round: u64,
    data: &DataConfig,
    device: Device,
    tolerance: Tolerance,
) -> Result<AuditReport, ValidatorError> {
    let bad = |message: String| ValidatorError::Bad { round, message };
    let run = hub.run()?;
    let contest = run.spec.contest.clone().ok_or(ValidatorError::NotScored)?;
    let audit = hub.round_audit(round)?;
    let job = &audit.job;
    if !audit.submissions_published {
        return Err(bad(
            "this run does not publish its submissions (tessera hub --publish-submissions), so its scores cannot \
             be recomputed from outside"
                .into(),
        ));
    }
    if job.phase != run.phase {
        return Err(bad(format!(
            "the round is in phase {} and the run is now in phase {}: only the current phase's rounds can be audited",
            job.phase, run.phase
        )));
    }
    if !audit.scores.is_empty() && audit.scores.iter().all(|s| s.flag.as_deref() == Some("unscored")) {
        return Err(bad("the round was not scored (its scores never arrived): there is nothing to recompute".into()));
    }
    if audit.scores.len() != job.submissions.len() {
        return Err(bad("the hub published a score for some submissions only".into()));
    }
    let seed = revealed_seed(job).map_err(bad)?;
    let (mut scorer, shards) = scorer_for(&run, data, device)?;
    let theta = decode_weights(&hub.checkpoint(&job.base_checkpoint, None)?, &run.spec.tensors)?;
    let lengths: Vec<usize> = run.spec.tensors.iter().map(|t| t.numel() as usize).collect();
    let mut candidates = Vec::with_capacity(job.submissions.len());
    for s in &job.submissions {
        let bytes = hub.published_submission(round, &s.blob)?;
        candidates.push(Candidate::from_job(s, &bytes, &lengths)?);
    }
    attach_assigned(&scorer, shards.as_ref(), &run, &mut candidates, &seed)?;
    let measured =
        score_round(&mut scorer, &theta, candidates, &seed, contest.tasks.as_ref()).map_err(|e| match e {
            ValidatorError::Bad { message, .. } => bad(message),
            e => e,
        })?;
    let submissions = audit
        .scores
        .iter()
        .zip(measured)
        .map(|(published, recomputed)| {
            let mut problems = Vec::new();
            let copy = published.flag.as_deref() == Some("copy");
            if published.contributor != recomputed.contributor {
                problems.push(format!("published for contributor {}", published.contributor));
            }
            let num = |x: Option<f64>| x.map_or("none".to_owned(), |v| format!("{v:.6}"));
            if !tolerance.agrees(published.score, Some(recomputed.score)) {
                problems.push(format!("score {} published, {:.6} recomputed", num(published.score), recomputed.score));
            }
            if !tolerance.agrees(published.data_fit, recomputed.data_fit) {
                problems.push(format!(
                    "data fit {} published, {} recomputed",
                    num(published.data_fit),
                    num(recomputed.data_fit)
                ));
            }
            if copy != recomputed.copy_of.is_some() {
                problems.push(format!(
                    "{} published, {} recomputed",
                    if copy { "a copy" } else { "not a copy" },
                    recomputed.copy_of.map_or("not a copy".into(), |j| format!("a copy of submission {j}"))
                ));
            }
            Checked { published: published.clone(), recomputed, problems }
        })
        .collect();
    let rows: Vec<Recorded> = audit
        .scores
        .iter()
        .map(|s| Recorded { score: s.score, fit_factor: s.fit_factor, flagged: s.flag.is_some() })
        .collect();
    let (_, split) = recompute(&rows, contest.reward_power, contest.reward_units);
    let rewards_reproduced = audit.scores.iter().map(|s| s.reward).eq(split);
    Ok(AuditReport { round, submissions, rewards_reproduced })
}

/// A round's scores as its validators measured them: whole, or (a run scored in tasks) task by
/// task, each task a round of its own, with copies looked for across the round on the tasks'
/// copy samples, as the hub combines them.
fn score_round(
    scorer: &mut Scorer,
    theta: &[Vec<f32>],
    candidates: Vec<Candidate>,
    seed: &[u8; 32],
    tasks: Option<&TaskSpec>,
) -> Result<Vec<Scored>, ValidatorError> {
    let Some(spec) = tasks else { return Ok(scorer.score(theta, &candidates, seed)?.scored) };
    let n = candidates.len();
    let mut left: Vec<Option<Candidate>> = candidates.into_iter().map(Some).collect();
    let mut scored: Vec<Option<Scored>> = vec![None; n];
    let mut samples: Vec<Vec<f32>> = vec![Vec::new(); n];
    for task in split_round(seed, n, spec.size as usize, spec.double_share) {
        let mine: Vec<Candidate> = task.positions.iter().filter_map(|&p| left[p as usize].take()).collect();
        let r = scorer.score(theta, &mine, seed)?;
        for ((&p, s), sample) in task.positions.iter().zip(r.scored).zip(r.samples) {
            scored[p as usize] = Some(s);
            samples[p as usize] = sample;
        }
    }
    let (copy_of, _) = find_copies(&samples);
    scored
        .into_iter()
        .zip(copy_of)
        .map(|(s, copy)| s.map(|s| Scored { copy_of: copy, ..s }))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ValidatorError::Bad { round: 0, message: "a task left a submission unscored".into() })
}
