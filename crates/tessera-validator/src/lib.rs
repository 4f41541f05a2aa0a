//! `tessera-validator`: the validator role. For every accepted submission of a round it
//! measures, on data the contributor could not know in advance (windows drawn from the round's
//! evaluation seed, committed before the round and revealed after its submissions closed):
//!
//! - **score**: held-out loss before minus after applying that submission alone (θ − Δ);
//! - **data fit**: the loss gain on windows its assignment trained on minus the gain on random
//!   training windows — near zero for a Δ trained on other data;
//! - **copies**: cosine similarity with every earlier submission on seeded sample coordinates.
//!
//! The hub turns these into weights, ratings and rewards (`tessera-contest`). [`client`] runs
//! the role against a hub over HTTP; [`Scorer`] is the measurement, also used in-process by
//! `tessera bench arena`.

pub mod client;

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
    /// Assigned windows, and random training windows, for the data-fit check.
    pub fit_windows: usize,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig { eval_windows: 32, fit_windows: 16 }
    }
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
    pub delta: Vec<Vec<f32>>,
    /// The hub's staleness weight, passed through.
    pub weight: f64,
}

/// What scoring one round cost, for the validator-cost figure.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ScoreCost {
    /// Windows run forward (no gradients), all submissions together.
    pub windows_forward: u64,
    pub seconds: f64,
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

    /// Scores `candidates` (in arrival order) against the round's weights `theta`, with the
    /// round's revealed evaluation `seed`.
    pub fn score(
        &mut self,
        theta: &[Vec<f32>],
        candidates: &[Candidate],
        seed: &[u8; 32],
    ) -> Result<(Vec<Scored>, ScoreCost), TrainError> {
        let started = std::time::Instant::now();
        let c = self.trainer.config.clone();
        let (train_len, val_len) = (self.trainer.dataset.train.len(), self.trainer.dataset.validation.len());
        let span = |n: usize| n.saturating_sub(c.seq_len + 1).max(1);
        let draw = |what: &str, n: usize, len: usize| -> Vec<usize> {
            let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, what));
            (0..n).map(|_| rng.random_range(0..span(len))).collect()
        };
        let eval = draw("held-out evaluation windows", self.config.eval_windows, val_len);
        let random = draw("random training windows", self.config.fit_windows, train_len);

        let views: Vec<Vec<&[f32]>> = candidates.iter().map(|k| k.delta.iter().map(Vec::as_slice).collect()).collect();
        let copy_seed = derive(seed, "copy detection coordinates");
        let samples: Vec<Vec<f32>> = views.iter().map(|v| sample(v, copy_seed)).collect();
        let (copy_of, _) = find_copies(&samples);

        write_params(&self.trainer.model, theta)?;
        let val = &self.trainer.dataset.validation;
        let train = &self.trainer.dataset.train;
        let before_eval = self.trainer.window_loss(val, &eval)?;
        let before_random = self.trainer.window_loss(train, &random)?;
        let mut forward = (eval.len() + random.len()) as u64;
        let mut befores = Vec::with_capacity(candidates.len());
        let mut assigned_all = Vec::with_capacity(candidates.len());
        for k in candidates {
            let assigned = self.assigned_windows(k, seed);
            befores.push(self.trainer.window_loss(train, &assigned)?);
            forward += assigned.len() as u64;
            assigned_all.push(assigned);
        }
        let mut out = Vec::with_capacity(candidates.len());
        for ((k, assigned), (before_assigned, copy)) in
            candidates.iter().zip(&assigned_all).zip(befores.into_iter().zip(&copy_of))
        {
            let applied: Vec<Vec<f32>> =
                theta.iter().zip(&k.delta).map(|(t, d)| t.iter().zip(d).map(|(t, d)| t - d).collect()).collect();
            write_params(&self.trainer.model, &applied)?;
            let after_eval = self.trainer.window_loss(val, &eval)?;
            let after_assigned = self.trainer.window_loss(train, assigned)?;
            let after_random = self.trainer.window_loss(train, &random)?;
            forward += (eval.len() + assigned.len() + random.len()) as u64;
            out.push(Scored {
                contributor: k.contributor,
                score: before_eval - after_eval,
                data_fit: (before_assigned - after_assigned) - (before_random - after_random),
                copy_of: *copy,
                weight: k.weight,
            });
        }
        write_params(&self.trainer.model, theta)?;
        Ok((out, ScoreCost { windows_forward: forward, seconds: started.elapsed().as_secs_f64() }))
    }

    /// A seeded sample of the windows `k`'s assignment trained on: random (step, position)
    /// pairs within its inner steps, through the same window function the trainer uses.
    fn assigned_windows(&self, k: &Candidate, seed: &[u8; 32]) -> Vec<usize> {
        let c = &self.trainer.config;
        let per_step = c.batch_size * c.grad_accum;
        let n = self.trainer.dataset.train.len();
        let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, "assigned windows") ^ k.contributor);
        (0..self.config.fit_windows)
            .map(|_| {
                let step = k.schedule_step + rng.random_range(0..k.inner_steps.max(1));
                let i = rng.random_range(0..per_step.max(1));
                train_windows(c.seed, k.slot, step, per_step, c.seq_len, n)[i]
            })
            .collect()
    }
}
