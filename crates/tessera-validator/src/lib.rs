//! `tessera-validator`: the validator role. For every accepted submission of a round it
//! measures, on data the contributor could not know in advance (windows drawn from the round's
//! evaluation seed, committed before the round and revealed after its submissions closed):
//!
//! - **score**: held-out loss before minus after applying that submission alone at the run's
//!   score step ε, over ε (θ − εΔ: to first order what it adds to the round's mean; a Δ longer
//!   than twice the round's median norm at that length, its score shrunk to match, and no
//!   more than it does applied whole);
//! - **data fit**: the loss gain on windows its assignment trained on minus the median gain of
//!   the other submissions on those windows — near zero for a Δ trained on other data;
//! - **copies**: cosine similarity with every earlier submission on seeded sample coordinates.
//!
//! The hub turns these into weights, ratings and rewards (`tessera-contest`). [`client`] runs
//! the role against a hub over HTTP; [`Scorer`] is the measurement, also used in-process by
//! `tessera bench arena`.

pub mod audit;
pub mod client;
pub use tessera_trust::tee;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Device;
use tessera_contest::Scored;
use tessera_contest::commit::derive;
use tessera_contest::copies::{find_copies, sample};
use tessera_data::{Dataset, train_windows};
use tessera_model::LlamaConfig;
use tessera_train::diloco::write_params;
use tessera_train::{TrainConfig, TrainError, Trainer};

/// How much evaluation each submission gets.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreConfig {
    /// Held-out validation windows for the score (the same for every submission of a round).
    pub eval_windows: usize,
    /// Assigned windows per submission in the data-fit check.
    pub fit_windows: usize,
    /// The step a submission is scored at (the run's `score_step`): its held-out gain from
    /// θ − step·Δ, over step.
    pub step: f64,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig { eval_windows: 32, fit_windows: 16, step: tessera_protocol::api::DEFAULT_SCORE_STEP }
    }
}

/// Other submissions evaluated on each submission's assigned windows, as its control.
pub const FIT_CONTROLS: usize = 4;

fn norm(delta: &[Vec<f32>]) -> f64 {
    delta.iter().flatten().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 { values[n / 2] } else { 0.5 * (values[n / 2 - 1] + values[n / 2]) }
}

/// One submission to score, decoded.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub contributor: u64,
    /// The assignment's data slot and the run's inner step its round started at, and how many
    /// inner steps it covered: together they say which windows it trained on.
    pub slot: u64,
    pub schedule_step: u64,
    pub inner_steps: u64,
    /// The round whose assignment it trained for (a manifest run's shard depends on it).
    pub base_round: u64,
    pub delta: Vec<Vec<f32>>,
    /// The hub's staleness weight, passed through.
    pub weight: f64,
    /// A run on a published dataset: the tokens of its data-fit windows, cut from the shard its
    /// assignment named ([`Scorer::assigned_tokens`]), one window after another. `None`: the
    /// windows lie in the scorer's own training split.
    pub assigned: Option<Vec<u32>>,
}

impl Candidate {
    /// A job's submission from its message bytes, decoded and checked against `lengths`.
    pub fn from_job(
        s: &tessera_protocol::api::JobSubmission,
        bytes: &[u8],
        lengths: &[usize],
    ) -> Result<Candidate, TrainError> {
        let view = tessera_protocol::MessageView::parse(bytes)?;
        Ok(Candidate {
            contributor: s.contributor,
            slot: s.slot,
            schedule_step: s.schedule_step,
            inner_steps: s.inner_steps,
            base_round: s.base_round,
            delta: tessera_aggregate::decode_view(lengths, &view)?,
            weight: s.weight,
            assigned: None,
        })
    }
}

/// A job's revealed evaluation seed, checked against the commitment the round opened with.
pub fn revealed_seed(job: &tessera_protocol::api::ScoringJob) -> Result<[u8; 32], String> {
    tessera_contest::commit::verify_hex(&job.eval_commitment, &job.eval_seed)
}

/// The hub's report of a round's scores, in the job's order, with the held-out loss of the
/// round's weights that a loss target is judged on.
pub fn report(round: u64, scores: &[Scored], held_out_loss: Option<f64>) -> tessera_protocol::api::ScoreReport {
    tessera_protocol::api::ScoreReport {
        round,
        task: None,
        samples: Vec::new(),
        held_out_loss: held_out_loss.filter(|l| l.is_finite()),
        scores: scores
            .iter()
            .map(|s| tessera_protocol::api::SubmissionScore {
                contributor: s.contributor,
                score: s.score,
                data_fit: s.data_fit,
                copy_of: s.copy_of.map(|j| j as u32),
                score_se: s.score_se,
                norm_bound: s.norm_bound,
            })
            .collect(),
    }
}

/// What scoring one round cost, for the validator-cost figure.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ScoreCost {
    /// Windows run forward (no gradients), all submissions together.
    pub windows_forward: u64,
    pub seconds: f64,
}

/// A round's scores, in the candidates' order, and what measuring them cost.
#[derive(Debug, Clone)]
pub struct RoundScores {
    pub scored: Vec<Scored>,
    /// The held-out loss of the round's weights θ on the evaluation windows (before any
    /// submission is applied).
    pub held_out_loss: f64,
    pub cost: ScoreCost,
    /// Each candidate's copy sample as a task's report carries it
    /// (`tessera_contest::tasks::cross_sample`), for finding copies across tasks.
    pub samples: Vec<Vec<f32>>,
}

pub struct Scorer {
    trainer: Trainer,
    config: ScoreConfig,
}

impl Scorer {
    /// `inner` is the run's inner training configuration (seed, batch, sequence length): the
    /// validator replays which windows an assignment used with it.
    pub fn new(
        inner: TrainConfig,
        model_config: &LlamaConfig,
        dataset: Dataset,
        device: Device,
        config: ScoreConfig,
    ) -> Result<Scorer, TrainError> {
        if config.eval_windows == 0 || config.fit_windows == 0 {
            return Err(TrainError::Invalid("evaluation and data-fit windows must be positive".into()));
        }
        Ok(Scorer { trainer: Trainer::new(inner, model_config, dataset, device)?, config })
    }

    /// The same scorer for another model (a run that grew into its next phase).
    pub fn with_model(&self, model_config: &LlamaConfig) -> Result<Scorer, TrainError> {
        let t = &self.trainer;
        let trainer = Trainer::new(t.config.clone(), model_config, t.dataset.clone(), t.model.device())?;
        Ok(Scorer { trainer, config: self.config })
    }

    /// Scores `candidates` (in arrival order) against the round's weights `theta`, with the
    /// round's revealed evaluation `seed`.
    ///
    /// The data-fit check is a difference of differences: a submission's excess gain over
    /// [`FIT_CONTROLS`] other submissions (seeded) on `fit_windows` of its own assigned windows —
    /// they never trained on them, so what a window's content does to any update cancels — less
    /// its excess over the controls on other contributors' windows, so an update that is simply
    /// better everywhere gains nothing. What is left is what training on its own windows did.
    pub fn score(
        &mut self,
        theta: &[Vec<f32>],
        candidates: &[Candidate],
        seed: &[u8; 32],
    ) -> Result<RoundScores, TrainError> {
        // Long on purpose: the measurement's steps share the sampled windows and the losses
        // before and after each submission; split, they would pass them all around.
        let started = std::time::Instant::now();
        let c = self.trainer.config.clone();
        let eval = self.eval_windows(seed);

        let views: Vec<Vec<&[f32]>> = candidates.iter().map(|k| k.delta.iter().map(Vec::as_slice).collect()).collect();
        let copy_seed = derive(seed, "copy detection coordinates");
        let samples: Vec<Vec<f32>> = views.iter().map(|v| sample(v, copy_seed)).collect();
        let (copy_of, _) = find_copies(&samples);

        // The data-fit check: each submission's own assigned windows, and a seeded few other
        // submissions (the controls) evaluated on the same windows.
        let n = candidates.len();
        let mut pick = ChaCha8Rng::seed_from_u64(derive(seed, "data fit controls"));
        let controls: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                let mut others: Vec<usize> = (0..n).filter(|&j| j != i).collect();
                others.shuffle(&mut pick);
                others.truncate(FIT_CONTROLS);
                others
            })
            .collect();
        // Each submission's windows: in the scorer's training split, or (a published dataset)
        // the tokens it brought, cut from its assigned shard one window after another.
        let train = &self.trainer.dataset.train;
        let stride = c.seq_len + 1;
        let own: Vec<(&[u32], Vec<usize>)> = candidates
            .iter()
            .map(|k| match &k.assigned {
                Some(tokens) => (tokens.as_slice(), (0..tokens.len() / stride).map(|w| w * stride).collect()),
                None => (train.as_slice(), self.assigned_windows(k, seed, train.len())),
            })
            .collect();
        // Which windows each submission is evaluated on: its own, and those it controls for.
        let mut duties: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
        for (i, cs) in controls.iter().enumerate() {
            for &j in cs {
                duties[j].push(i);
            }
        }

        write_params(&self.trainer.model, theta)?;
        // Per window, so each score comes with its standard error over the windows.
        let before_windows = self.trainer.window_losses(&self.trainer.dataset.validation, &eval)?;
        let before_eval = before_windows.iter().sum::<f64>() / before_windows.len().max(1) as f64;
        let mut forward = eval.len() as u64;
        let mut before_own = Vec::with_capacity(n);
        for (tokens, w) in &own {
            before_own.push(self.trainer.window_losses(tokens, w)?);
            forward += w.len() as u64;
        }
        // The norm bound: twice the round's median norm, as the robust rules bound a Δ
        // ([`Scorer::bounded_gain`]).
        let radius = 2.0 * median(&mut candidates.iter().map(|k| norm(&k.delta)).collect::<Vec<_>>());
        let mut scores: Vec<(f64, f64)> = Vec::with_capacity(n);
        // gain[j][i]: submission j's gain per window on submission i's windows (where evaluated).
        let mut gain: Vec<Vec<Option<Vec<f64>>>> = vec![vec![None; n]; n];
        for (j, k) in candidates.iter().enumerate() {
            // Its data-fit gains are measured at the length its score is clipped to.
            let (score, windows) = self.bounded_gain(theta, &k.delta, &eval, &before_windows, radius, |scorer| {
                for &i in &duties[j] {
                    let after = scorer.trainer.window_losses(own[i].0, &own[i].1)?;
                    forward += after.len() as u64;
                    gain[j][i] = Some(before_own[i].iter().zip(&after).map(|(b, a)| b - a).collect());
                }
                Ok(())
            })?;
            forward += windows;
            scores.push(score);
        }
        write_params(&self.trainer.model, theta)?;

        // Submission i's excess gain over the controls on windows of set k.
        let excess = |i: usize, k: usize| -> Option<f64> {
            let mine = gain[i][k].as_ref()?;
            let ctrl: Vec<&Vec<f64>> =
                controls[k].iter().filter(|&&j| j != i).filter_map(|&j| gain[j][k].as_ref()).collect();
            if ctrl.is_empty() || mine.is_empty() {
                return None;
            }
            let sum: f64 = (0..mine.len())
                .map(|w| {
                    let mut others: Vec<f64> = ctrl.iter().map(|g| g[w]).collect();
                    mine[w] - median(&mut others)
                })
                .sum();
            Some(sum / mine.len() as f64)
        };
        // Its excess on its own windows, less its excess on the windows of those it controls
        // for: an update that is better everywhere (pooled from several assignments, say) gains
        // nothing here; only what training on its own windows did remains.
        let fit = |i: usize| -> Option<f64> {
            let own = excess(i, i)?;
            let elsewhere: Vec<f64> = duties[i].iter().filter(|&&k| k != i).filter_map(|&k| excess(i, k)).collect();
            if elsewhere.is_empty() {
                return Some(own);
            }
            Some(own - elsewhere.iter().sum::<f64>() / elsewhere.len() as f64)
        };
        let out = candidates
            .iter()
            .enumerate()
            .map(|(i, k)| Scored {
                contributor: k.contributor,
                score: scores[i].0,
                score_se: Some(scores[i].1).filter(|se| se.is_finite()),
                norm_bound: Some(radius).filter(|r| r.is_finite()),
                data_fit: fit(i).filter(|f| f.is_finite()),
                copy_of: copy_of[i],
                weight: k.weight,
                // The hub knows each contributor's record; the validator reports this round's.
                fit_factor: 1.0,
            })
            .collect();
        let cost = ScoreCost { windows_forward: forward, seconds: started.elapsed().as_secs_f64() };
        let samples = samples.iter().map(|s| tessera_contest::tasks::cross_sample(s)).collect();
        Ok(RoundScores { scored: out, held_out_loss: before_eval, cost, samples })
    }

    /// The held-out windows a round's seed draws (the same for every submission of the round).
    fn eval_windows(&self, seed: &[u8; 32]) -> Vec<usize> {
        let span = self.trainer.dataset.validation.len().saturating_sub(self.trainer.config.seq_len + 1).max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, "held-out evaluation windows"));
        (0..self.config.eval_windows).map(|_| rng.random_range(0..span)).collect()
    }

    /// One Δ's score against the norm bound `radius`, with its standard error, and the windows
    /// run forward: its held-out gain at the run's step (at the bounded length), over the step.
    /// A Δ longer than `radius` scores the lesser of that shrunk by the same factor and what it
    /// does applied whole (step 1): size alone earns nothing, however far from converged the
    /// model is, and an oversized Δ that hurts at full length is still scored as hurting.
    /// `at_bound` runs while the model holds θ − Δ at the bounded length. Leaves the model at an
    /// applied Δ: the caller writes θ back.
    fn bounded_gain(
        &self,
        theta: &[Vec<f32>],
        delta: &[Vec<f32>],
        eval: &[usize],
        before: &[f64],
        radius: f64,
        at_bound: impl FnOnce(&Self) -> Result<(), TrainError>,
    ) -> Result<((f64, f64), u64), TrainError> {
        let length = norm(delta);
        let shrink = if length > radius && length > 0.0 { radius / length } else { 1.0 };
        // θ − s·Δ: the weights with the Δ applied at `s` of its length.
        let applied = |s: f32| -> Vec<Vec<f32>> {
            theta.iter().zip(delta).map(|(t, d)| t.iter().zip(d).map(|(t, d)| t - s * d).collect()).collect()
        };
        // Mean gain over the windows at `scale`, and its standard error.
        let gain = |after: &[f64], scale: f64| -> (f64, f64) {
            let d: Vec<f64> = before.iter().zip(after).map(|(b, a)| (b - a) * scale).collect();
            let n = d.len().max(1) as f64;
            let mean = d.iter().sum::<f64>() / n;
            let var = d.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0).max(1.0);
            (mean, (var / n).sqrt())
        };
        let step = self.config.step;
        let val = &self.trainer.dataset.validation;
        write_params(&self.trainer.model, &applied(shrink as f32))?;
        at_bound(self)?;
        let mut forward = 0;
        // The gain from θ − `length`·Δ, over `per` (the step it was taken at), times `scale`.
        let mut at = |length: f64, per: f64, scale: f64| -> Result<(f64, f64), TrainError> {
            if length != shrink {
                write_params(&self.trainer.model, &applied(length as f32))?;
            }
            forward += eval.len() as u64;
            let (mean, se) = gain(&self.trainer.window_losses(val, eval)?, scale / per);
            Ok((mean, se))
        };
        // Within the bound: its first-order gain at the small step.
        let clipped = at(shrink * step, step, shrink)?;
        if shrink >= 1.0 {
            return Ok((clipped, forward));
        }
        // Beyond it, also what it does applied whole: an oversized Δ that hurts is scored as
        // hurting, however small the step (a ×100 Δ at step 0.05 is still a ×5 one).
        let full = at(1.0, 1.0, 1.0)?;
        Ok((if full.0 < clipped.0 { full } else { clipped }, forward))
    }

    /// One submission's score and its standard error as its round measured it, from the
    /// round's base weights `theta`, its revealed `seed` and the norm bound it published: what
    /// a contributor recomputes of its own submission without anyone else's (`tessera audit
    /// --identity`). Costs 2–3 × `eval_windows` forward windows.
    pub fn score_own(
        &self,
        theta: &[Vec<f32>],
        delta: &[Vec<f32>],
        seed: &[u8; 32],
        norm_bound: f64,
    ) -> Result<(f64, f64), TrainError> {
        let eval = self.eval_windows(seed);
        write_params(&self.trainer.model, theta)?;
        let before = self.trainer.window_losses(&self.trainer.dataset.validation, &eval)?;
        let (score, _) = self.bounded_gain(theta, delta, &eval, &before, norm_bound, |_| Ok(()))?;
        write_params(&self.trainer.model, theta)?;
        Ok(score)
    }

    /// A seeded sample of the windows `k`'s assignment trained on: random (step, position)
    /// pairs within its inner steps, through the same window function the trainer uses, over
    /// the `n` tokens it drew from (the training split, or its assigned shard).
    fn assigned_windows(&self, k: &Candidate, seed: &[u8; 32], n: usize) -> Vec<usize> {
        let c = &self.trainer.config;
        let per_step = c.batch_size * c.grad_accum;
        let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, "assigned windows") ^ k.contributor);
        (0..self.config.fit_windows)
            .map(|_| {
                let step = k.schedule_step + rng.random_range(0..k.inner_steps.max(1));
                let i = rng.random_range(0..per_step.max(1));
                train_windows(c.seed, k.slot, step, per_step, c.seq_len, n)[i]
            })
            .collect()
    }

    /// A run on a published dataset: the tokens of `k`'s data-fit windows in `shard`, the
    /// tokens of the shard its assignment named, one window after another (`Candidate::assigned`).
    /// Costs `fit_windows × (seq_len + 1)` tokens, whatever the shard's size.
    pub fn assigned_tokens(&self, k: &Candidate, seed: &[u8; 32], shard: &[u32]) -> Result<Vec<u32>, TrainError> {
        let stride = self.trainer.config.seq_len + 1;
        if shard.len() < stride {
            return Err(TrainError::Invalid(format!(
                "contributor {}'s assigned shard holds {} tokens, fewer than one window of {stride}",
                k.contributor,
                shard.len()
            )));
        }
        let mut tokens = Vec::with_capacity(self.config.fit_windows * stride);
        for w in self.assigned_windows(k, seed, shard.len()) {
            tokens.extend_from_slice(&shard[w..w + stride]);
        }
        Ok(tokens)
    }
}
