//! Recomputing a published round's scores (`tessera audit`): anyone with the hub's URL takes the
//! round's job as the hub signed it (base checkpoint, revealed seed, each submission's
//! assignment), checks the seed against the commitment the round opened with, downloads the
//! base checkpoint and the submissions (a run that publishes them), scores them with the same
//! [`Scorer`] a validator runs, and compares every score, data fit and copy flag with what the
//! round published. The reward split is recomputed from the published rows too.
//!
//! A contributor audits its own submissions in any unsealed run ([`audit_own`]): it fetches
//! them with a request signed by its key and recomputes each score from the checkpoint, the
//! revealed seed and the norm bound the validator published with the score. Data fit and copy
//! flags need the other submissions, so only a run that publishes them can have those
//! rechecked.
//!
//! Cost: one validator's round — the checkpoint, every submission of the round, and
//! `eval_windows + fit_windows × (1 + controls)` forward windows per submission; a
//! contributor's own audit: the checkpoint, its own submissions, and 2–3 × `eval_windows`
//! forward windows each.

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
    /// Whether only the auditor's own submissions were recomputed, and only their scores.
    pub own_only: bool,
    pub submissions: Vec<Checked>,
    /// The published rewards are what the rule gives on the published rows.
    pub rewards_reproduced: bool,
}

impl AuditReport {
    pub fn agrees(&self) -> bool {
        self.rewards_reproduced && self.submissions.iter().all(|c| c.problems.is_empty())
    }
}

/// What every audit of a round starts from: the run's contest, the round as the hub signed it,
/// its revealed seed, a scorer on the run's data and the round's base weights.
struct Prepared {
    run: tessera_protocol::api::RunInfo,
    contest: tessera_protocol::api::ContestSpec,
    audit: tessera_protocol::api::RoundAudit,
    seed: [u8; 32],
    scorer: Scorer,
    shards: Vec<tessera_client::ShardCache>,
    theta: Vec<Vec<f32>>,
    lengths: Vec<usize>,
}

fn prepare(
    hub: &HubClient,
    (run, audit): (tessera_protocol::api::RunInfo, tessera_protocol::api::RoundAudit),
    data: &DataConfig,
    device: Device,
) -> Result<Prepared, ValidatorError> {
    let job = &audit.job;
    let bad = |message: String| ValidatorError::Bad { round: job.round, message };
    let contest = run.spec.contest.clone().ok_or(ValidatorError::NotScored)?;
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
    let (scorer, shards) = scorer_for(&run, data, device)?;
    let theta = decode_weights(&hub.checkpoint(&job.base_checkpoint, None)?, &run.spec.tensors)?;
    let lengths: Vec<usize> = run.spec.tensors.iter().map(|t| t.numel() as usize).collect();
    Ok(Prepared { run, contest, audit, seed, scorer, shards, theta, lengths })
}

/// The reward split the rule gives on the round's published rows is the one it published.
fn rewards_reproduced(scores: &[PublishedScore], contest: &tessera_protocol::api::ContestSpec) -> bool {
    let rows: Vec<Recorded> = scores
        .iter()
        .map(|s| Recorded { score: s.score, fit_factor: s.fit_factor, flagged: s.flag.is_some() })
        .collect();
    let (_, split) = recompute(&rows, contest.reward_power, contest.reward_units);
    scores.iter().map(|s| s.reward).eq(split)
}

fn number(x: Option<f64>) -> String {
    x.map_or("none".to_owned(), |v| format!("{v:.6}"))
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
    let published = hub.round_audit(round)?;
    if !published.submissions_published {
        return Err(bad(
            "this run does not publish its submissions (tessera hub --publish-submissions), so only their \
             contributors can recompute their scores (tessera audit --identity)"
                .into(),
        ));
    }
    let Prepared { run, contest, audit, seed, mut scorer, shards, theta, lengths } =
        prepare(hub, (hub.run()?, published), data, device)?;
    let job = &audit.job;
    let mut candidates = Vec::with_capacity(job.submissions.len());
    for s in &job.submissions {
        let bytes = hub.published_submission(round, &s.blob)?;
        candidates.push(Candidate::from_job(s, &bytes, &lengths)?);
    }
    attach_assigned(&scorer, &shards, &run, &mut candidates, &seed)?;
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
            if !tolerance.agrees(published.score, Some(recomputed.score)) {
                problems.push(format!(
                    "score {} published, {:.6} recomputed",
                    number(published.score),
                    recomputed.score
                ));
            }
            if !tolerance.agrees(published.data_fit, recomputed.data_fit) {
                problems.push(format!(
                    "data fit {} published, {} recomputed",
                    number(published.data_fit),
                    number(recomputed.data_fit)
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
    let rewards_reproduced = rewards_reproduced(&audit.scores, &contest);
    Ok(AuditReport { round, own_only: false, submissions, rewards_reproduced })
}

/// Audits the submissions to round `round` signed by `hub`'s own key (a contributor's client,
/// the hub's key pinned): each is fetched with a signed request, scored alone against the norm
/// bound published with its score, and compared with that score; the round's reward split is
/// recomputed from its published rows. Works whether or not the run publishes submissions; not
/// in a sealed run, whose submissions only the validator can open.
pub fn audit_own(
    hub: &HubClient,
    me: &tessera_trust::PublicKey,
    round: u64,
    data: &DataConfig,
    device: Device,
    tolerance: Tolerance,
) -> Result<AuditReport, ValidatorError> {
    let bad = |message: String| ValidatorError::Bad { round, message };
    let run = hub.run()?;
    if run.spec.trust.is_some() {
        return Err(bad(
            "this run is sealed: its submissions are encrypted to the attested validator, so neither the hub nor \
             their contributors can hand them to an audit"
                .into(),
        ));
    }
    let Prepared { run, contest, audit, seed, scorer, shards, theta, lengths } =
        prepare(hub, (run, hub.round_audit(round)?), data, device)?;
    let mine: Vec<usize> =
        (0..audit.job.submissions.len()).filter(|&i| audit.job.submissions[i].contributor_key == me.hex()).collect();
    if mine.is_empty() {
        return Err(bad(format!("round {round} holds no submission signed by {}", me.hex())));
    }
    let mut submissions = Vec::with_capacity(mine.len());
    for i in mine {
        let (s, published) = (&audit.job.submissions[i], &audit.scores[i]);
        let bytes = hub.own_submission(round, &s.blob)?;
        let mut candidate = Candidate::from_job(s, &bytes, &lengths)?;
        attach_assigned(&scorer, &shards, &run, std::slice::from_mut(&mut candidate), &seed)?;
        let Some(bound) = published.norm_bound else {
            return Err(bad(format!(
                "the round published no norm bound with contributor {}'s score (its validator did not report \
                 one), so the score cannot be recomputed from this submission alone",
                s.contributor
            )));
        };
        let (score, score_se) = scorer.score_own(&theta, &candidate.delta, &seed, bound)?;
        let mut problems = Vec::new();
        if published.contributor != s.contributor {
            problems.push(format!("published for contributor {}", published.contributor));
        }
        if !tolerance.agrees(published.score, Some(score)) {
            problems.push(format!("score {} published, {score:.6} recomputed", number(published.score)));
        }
        let recomputed = tessera_contest::Scored {
            contributor: s.contributor,
            score,
            data_fit: None,
            copy_of: None,
            weight: s.weight,
            fit_factor: published.fit_factor.unwrap_or(1.0),
            score_se: Some(score_se),
            norm_bound: Some(bound),
        };
        submissions.push(Checked { published: published.clone(), recomputed, problems });
    }
    let rewards_reproduced = rewards_reproduced(&audit.scores, &contest);
    Ok(AuditReport { round, own_only: true, submissions, rewards_reproduced })
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
