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
use crate::{Candidate, Scored, revealed_seed};

/// How far a recomputed number may lie from the published one: `absolute + relative × |published|`
/// (scores are differences of mean losses; another machine's floating point differs a little).
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub absolute: f64,
    pub relative: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance { absolute: 1e-4, relative: 1e-2 }
    }
}

impl Tolerance {
    fn agrees(&self, published: Option<f64>, recomputed: Option<f64>) -> bool {
        match (published, recomputed) {
            (Some(p), Some(r)) => (p - r).abs() <= self.absolute + self.relative * p.abs(),
            (None, None) => true,
            _ => false,
        }
    }
}

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
    let measured = scorer.score(&theta, &candidates, &seed)?;
    let submissions = audit
        .scores
        .iter()
        .zip(measured.scored)
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
