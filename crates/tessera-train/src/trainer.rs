//! The training loop. One step = `batch_size × grad_accum` windows of `seq_len` tokens, drawn
//! by `tessera_data::train_windows(seed, worker, step)` and run `batch_size` at a time; then
//! clipping, the scheduled learning rate and one AdamW update.
//!
//! Exact resume: the data a step sees is a pure function of the step number, there is no
//! dropout, and a checkpoint holds the f32 weights, both AdamW moments and the step count, so a
//! resumed run repeats an uninterrupted one bit for bit on the same device and thread count.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind, Tensor};
use tessera_data::{Dataset, eval_window_count, eval_windows, train_windows};
use tessera_model::checkpoint::{read_safetensors, write_safetensors};
use tessera_model::{Llama, LlamaConfig, load_checkpoint, save_checkpoint};

use crate::TrainError;
use crate::optim::{AdamW, AdamWConfig, lr_at};

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FORMAT: &str = "tessera-trainer-state/1";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub grad_clip: f64,
    pub adamw: AdamWConfig,
    /// Evaluate every this many steps (and always after the last).
    pub eval_interval: u64,
    /// At most this many validation windows per evaluation.
    pub eval_windows: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_interval: u64,
    pub seed: u64,
    pub worker: u64,
    /// One of several replicas of one worker (a contributor with several devices): each step's
    /// windows are drawn for all `replicas` at once and replica `replica` trains its share, so
    /// together they train what one device with `replicas` × the batch would, and replica 0
    /// exactly what a lone worker would. 0 or 1: alone.
    #[serde(default)]
    pub replicas: usize,
    #[serde(default)]
    pub replica: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 2000,
            batch_size: 12,
            seq_len: 64,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            grad_clip: 1.0,
            adamw: AdamWConfig::default(),
            eval_interval: 250,
            eval_windows: 200,
            checkpoint_interval: 0,
            seed: 1337,
            worker: 0,
            replicas: 1,
            replica: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self, model: &LlamaConfig) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.batch_size == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return bad("batch size, sequence length and gradient accumulation must be positive".into());
        }
        if self.replica >= self.replicas.max(1) {
            return bad(format!("replica {} of {}", self.replica, self.replicas));
        }
        if self.seq_len as i64 > model.max_position_embeddings {
            return bad(format!(
                "sequence length {} exceeds the model's context of {}",
                self.seq_len, model.max_position_embeddings
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!("learning rates must satisfy 0 ≤ min_lr ({}) ≤ lr ({}), lr > 0", self.min_lr, self.lr));
        }
        if self.eval_interval == 0 {
            return bad("eval interval must be positive".into());
        }
        Ok(())
    }

    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.seq_len * self.grad_accum
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EvalStats {
    pub step: u64,
    /// Mean loss over every position of the validation windows (nats per token).
    pub val_loss: f64,
    /// Mean loss over the second half of each window, where the model has a full context: the
    /// fair comparison with an entropy rate.
    pub val_loss_warm: f64,
    /// `val_loss_warm` minus the source's true entropy rate, when it is known.
    pub floor_gap: Option<f64>,
    /// Windows evaluated, out of the validation split's non-overlapping windows: all of them, or
    /// an evenly spaced sample over the whole split.
    pub windows: usize,
    pub split_windows: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub final_eval: EvalStats,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub checkpoint: Option<PathBuf>,
}

pub struct Trainer {
    pub config: TrainConfig,
    pub model: Llama,
    pub opt: AdamW,
    pub dataset: Dataset,
    /// Added to the optimizer step to index the learning-rate schedule: a DiLoCo contributor
    /// follows the run's global inner-step count, not its own.
    pub schedule_shift: i64,
    /// When set, [`Trainer::train_step`] adds the time of each of its stages here (on a GPU it
    /// then waits for the device at every stage, which a plain step never does).
    pub profile: Option<StepProfile>,
}

/// Where training steps' time went, summed over the steps profiled.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StepProfile {
    pub steps: u64,
    /// Drawing the windows and building the batch on the device.
    pub data_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    /// The gradients' global norm, reading it with the loss (the step's one host sync) and
    /// clipping.
    pub clip_s: f64,
    /// The AdamW update and zeroing the gradients.
    pub optimizer_s: f64,
}

/// Marks the end of each stage of a profiled step.
struct Stages {
    device: tch::Device,
    at: std::time::Instant,
}

impl Stages {
    fn new(device: tch::Device) -> Stages {
        Stages { device, at: std::time::Instant::now() }
    }

    /// Seconds since the last mark, once the device has finished the work queued so far.
    fn lap(&mut self) -> f64 {
        if let tch::Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        let now = std::time::Instant::now();
        let s = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        s
    }
}

/// How a grown parameter's new entries start their AdamW second moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NewMoments {
    /// The mean of the carried entries of the same kind of tensor (the default; see
    /// `tessera_model::Growth::second_moments`).
    #[default]
    KindMean,
    /// Zero, like the first moment: under the model-wide bias correction a new entry's first
    /// updates are then several times the learning rate.
    Zero,
}

impl Trainer {
    /// A fresh model of `model_config` (vocabulary set to the tokenizer's), initialised from `config.seed`.
    pub fn new(
        config: TrainConfig,
        model_config: &LlamaConfig,
        dataset: Dataset,
        device: Device,
    ) -> Result<Trainer, TrainError> {
        let mut model_config = model_config.clone();
        model_config.vocab_size = dataset.tokenizer.vocab_size() as i64;
        let model = Llama::new(&model_config, device, config.seed)?;
        Trainer::from_model(config, model, dataset)
    }

    pub fn from_model(config: TrainConfig, model: Llama, dataset: Dataset) -> Result<Trainer, TrainError> {
        config.validate(&model.config)?;
        let vocab = dataset.tokenizer.vocab_size() as i64;
        if vocab > model.config.vocab_size {
            return Err(TrainError::Invalid(format!(
                "tokenizer has {vocab} tokens but the model's vocabulary is {}",
                model.config.vocab_size
            )));
        }
        for (name, split) in [("training", &dataset.train), ("validation", &dataset.validation)] {
            if split.len() <= config.seq_len + 1 {
                return Err(TrainError::Invalid(format!(
                    "{name} split has {} tokens, fewer than one window of {}",
                    split.len(),
                    config.seq_len + 1
                )));
            }
        }
        let opt = AdamW::new(model.named_parameters(), config.adamw);
        Ok(Trainer { config, model, opt, dataset, schedule_shift: 0, profile: None })
    }

    /// This trainer grown to `to`'s sizes (`tessera_model::grow`: the same function, more room),
    /// its AdamW moments carried over by the same map (`Growth::moments`: copied where the
    /// weights were, rescaled where a norm gain was; new first moments zero, new second moments
    /// the mean of their kind, `Growth::second_moments`), its step and learning-rate schedule
    /// kept. Vocabulary and head tying are the model's own.
    pub fn grow(self, to: &LlamaConfig, seed: u64) -> Result<Trainer, TrainError> {
        self.grow_with(to, seed, NewMoments::KindMean)
    }

    /// [`Trainer::grow`] with a choice of how new entries' second moments start.
    pub fn grow_with(self, to: &LlamaConfig, seed: u64, new_moments: NewMoments) -> Result<Trainer, TrainError> {
        let to = LlamaConfig {
            vocab_size: self.model.config.vocab_size,
            tie_word_embeddings: self.model.config.tie_word_embeddings,
            ..to.clone()
        };
        let (model, growth) = tessera_model::grow(&self.model, &to, seed)?;
        let state = self.opt.state();
        let moments = |prefix: &str| -> std::collections::HashMap<String, Tensor> {
            state
                .iter()
                .filter_map(|(n, t)| n.strip_prefix(prefix).map(|k| (k.to_owned(), t.shallow_clone())))
                .collect()
        };
        let m = growth.moments(&moments("exp_avg."), -1)?;
        let v = match new_moments {
            NewMoments::KindMean => growth.second_moments(&moments("exp_avg_sq."))?,
            NewMoments::Zero => growth.moments(&moments("exp_avg_sq."), -2)?,
        };
        let (step, shift) = (self.opt.step, self.schedule_shift);
        let mut grown = Trainer::from_model(self.config, model, self.dataset)?;
        grown
            .opt
            .load_state(step, |key| {
                let (table, name) = match key.strip_prefix("exp_avg_sq.") {
                    Some(name) => (&v, name),
                    None => (&m, key.strip_prefix("exp_avg.").unwrap_or(key)),
                };
                table.get(name).map(Tensor::shallow_clone)
            })
            .map_err(TrainError::Invalid)?;
        grown.schedule_shift = shift;
        Ok(grown)
    }

    /// The step the next call to [`Trainer::train_step`] performs (0-based).
    pub fn step(&self) -> u64 {
        self.opt.step
    }

    fn batch(&self, tokens: &[u32], starts: &[usize]) -> (Tensor, Tensor) {
        let t = self.config.seq_len;
        let mut inputs = Vec::with_capacity(starts.len() * t);
        let mut targets = Vec::with_capacity(starts.len() * t);
        for &s in starts {
            inputs.extend(tokens[s..s + t].iter().map(|&x| i64::from(x)));
            targets.extend(tokens[s + 1..s + t + 1].iter().map(|&x| i64::from(x)));
        }
        let shape = [starts.len() as i64, t as i64];
        let device = self.model.device();
        (
            Tensor::from_slice(&inputs).view(shape).to_device(device),
            Tensor::from_slice(&targets).view(shape).to_device(device),
        )
    }

    pub fn train_step(&mut self) -> Result<StepStats, TrainError> {
        let c = &self.config;
        let step = self.opt.step;
        // The schedule's step: the run's global inner-step count for a DiLoCo contributor, the
        // optimizer's own step otherwise.
        let schedule_step = (step as i64).saturating_add(self.schedule_shift).max(0) as u64;
        // The step's windows depend only on (seed, worker, schedule step), so a validator can
        // replay which data an assignment trained on; accumulation only decides how many go
        // through the model at once, so a small-memory worker computes the same update.
        let per_replica = c.batch_size * c.grad_accum;
        let all = train_windows(
            c.seed,
            c.worker,
            schedule_step,
            per_replica * c.replicas.max(1),
            c.seq_len,
            self.dataset.train.len(),
        );
        let starts = &all[c.replica * per_replica..(c.replica + 1) * per_replica];
        let mut stages = self.profile.is_some().then(|| Stages::new(self.model.device()));
        let lap = |stages: &mut Option<Stages>| stages.as_mut().map_or(0.0, Stages::lap);
        let mut took = StepProfile { steps: 1, ..StepProfile::default() };
        // The loss stays on the device until the step's one host sync, below.
        let mut loss_sum: Option<Tensor> = None;
        for micro in starts.chunks(c.batch_size) {
            let (x, y) = self.batch(&self.dataset.train, micro);
            took.data_s += lap(&mut stages);
            let loss = self.model.loss(&x, &y)?;
            took.forward_s += lap(&mut stages);
            (&loss / c.grad_accum as f64).f_backward()?;
            took.backward_s += lap(&mut stages);
            let loss = loss.detach();
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + loss,
                None => loss,
            });
        }
        let loss_sum = loss_sum.ok_or_else(|| TrainError::Invalid("a step with no batch".into()))?;
        // Loss and gradient norm come to the host together: the step's only sync.
        let norm = self.opt.grad_norm().unwrap_or_else(|| loss_sum.zeros_like());
        let both = Vec::<f64>::try_from(Tensor::stack(&[loss_sum.to_kind(Kind::Float), norm.to_kind(Kind::Float)], 0))?;
        let (loss, grad_norm) = (both[0] / c.grad_accum as f64, both[1]);
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step, loss });
        }
        self.opt.scale_grads(AdamW::clip_factor(grad_norm, c.grad_clip));
        took.clip_s += lap(&mut stages);
        let lr = lr_at(schedule_step, c.lr, c.min_lr, c.warmup_steps, c.steps);
        self.opt.step(lr);
        self.opt.zero_grad();
        took.optimizer_s += lap(&mut stages);
        if let Some(p) = self.profile.as_mut() {
            p.steps += took.steps;
            p.data_s += took.data_s;
            p.forward_s += took.forward_s;
            p.backward_s += took.backward_s;
            p.clip_s += took.clip_s;
            p.optimizer_s += took.optimizer_s;
        }
        Ok(StepStats { step, loss, lr, grad_norm })
    }

    /// Mean loss per token of the current model on the windows of `tokens` starting at `starts`
    /// (each `seq_len + 1` tokens), `batch_size` at a time, without gradients.
    pub fn window_loss(&self, tokens: &[u32], starts: &[usize]) -> Result<f64, TrainError> {
        let per_window = self.window_losses(tokens, starts)?;
        Ok(per_window.iter().sum::<f64>() / per_window.len().max(1) as f64)
    }

    /// The mean loss per token of each window, in `starts` order.
    pub fn window_losses(&self, tokens: &[u32], starts: &[usize]) -> Result<Vec<f64>, TrainError> {
        let c = &self.config;
        if let Some(&s) = starts.iter().find(|&&s| s.saturating_add(c.seq_len + 1) > tokens.len()) {
            return Err(TrainError::Invalid(format!(
                "window at {s} of {} tokens runs past the end of {} tokens",
                c.seq_len + 1,
                tokens.len()
            )));
        }
        let mut out = Vec::with_capacity(starts.len());
        tch::no_grad(|| -> Result<(), TrainError> {
            for chunk in starts.chunks(c.batch_size.max(1)) {
                let (x, y) = self.batch(tokens, chunk);
                let losses = self.model.token_losses(&x, &y)?.to_kind(Kind::Double).mean_dim(1, false, Kind::Double);
                out.extend(Vec::<f64>::try_from(losses.to_device(tch::Device::Cpu))?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    pub fn evaluate(&self) -> Result<EvalStats, TrainError> {
        let c = &self.config;
        let starts = eval_windows(c.seq_len, self.dataset.validation.len(), c.eval_windows);
        let split_windows = eval_window_count(c.seq_len, self.dataset.validation.len());
        let half = c.seq_len / 2;
        let (mut total, mut warm) = (0.0, 0.0);
        tch::no_grad(|| -> Result<(), TrainError> {
            for chunk in starts.chunks(c.batch_size) {
                let (x, y) = self.batch(&self.dataset.validation, chunk);
                let losses = self.model.token_losses(&x, &y)?.to_kind(Kind::Double);
                total += f64::try_from(losses.sum(Kind::Double))?;
                warm += f64::try_from(losses.narrow(1, half as i64, (c.seq_len - half) as i64).sum(Kind::Double))?;
            }
            Ok(())
        })?;
        let n = starts.len() as f64;
        let val_loss = total / (n * c.seq_len as f64);
        let val_loss_warm = warm / (n * (c.seq_len - half) as f64);
        Ok(EvalStats {
            step: self.opt.step,
            val_loss,
            val_loss_warm,
            floor_gap: self.dataset.info.loss_floor.map(|f| val_loss_warm - f),
            windows: starts.len(),
            split_windows,
        })
    }

    /// Writes a resumable checkpoint: a Hugging Face model directory plus the optimizer state.
    /// The directory is written beside `dir` and renamed into place, so a crash mid-write
    /// leaves the previous checkpoint intact.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let io = |p: &Path, e: std::io::Error| TrainError::Io { path: p.display().to_string(), message: e.to_string() };
        let tmp = dir.with_extension("partial");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        save_checkpoint(&self.model, Some(&self.dataset.tokenizer), &tmp)?;
        write_safetensors(&tmp.join(OPTIMIZER_FILE), &self.opt.state())?;
        let state = json!({
            "format": STATE_FORMAT,
            "step": self.opt.step,
            "train_config": self.config,
            "dataset": self.dataset.info,
        });
        let state_path = tmp.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| TrainError::Io { path: state_path.display().to_string(), message: e.to_string() })?;
        std::fs::write(&state_path, text).map_err(|e| io(&state_path, e))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
        tracing::info!(step = self.opt.step, path = %dir.display(), "checkpoint written");
        Ok(())
    }

    /// Finishes a [`Trainer::save`] that was killed between removing the old checkpoint and
    /// renaming the new one into place: the complete new one (its state file is written last)
    /// takes its place. Returns whether a checkpoint is now at `dir`.
    pub fn recover(dir: &Path) -> Result<bool, TrainError> {
        let tmp = dir.with_extension("partial");
        if !dir.exists() && tmp.join(STATE_FILE).exists() {
            std::fs::rename(&tmp, dir)
                .map_err(|e| TrainError::Io { path: dir.display().to_string(), message: e.to_string() })?;
            tracing::warn!(path = %dir.display(), "finished a checkpoint save that was interrupted");
        }
        Ok(dir.join(STATE_FILE).exists())
    }

    /// Continues a run from a checkpoint written by [`Trainer::save`]. The dataset must be the
    /// one the run trained on; `steps` may extend the run.
    pub fn resume(dir: &Path, dataset: Dataset, device: Device, steps: Option<u64>) -> Result<Trainer, TrainError> {
        let err = |m: String| TrainError::Resume { path: dir.display().to_string(), message: m };
        Trainer::recover(dir)?;
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| err(format!("{STATE_FILE}: {e}")))?;
        let state: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(format!("{STATE_FILE}: {e}")))?;
        if state.get("format").and_then(|f| f.as_str()) != Some(STATE_FORMAT) {
            return Err(err(format!("{STATE_FILE} is not a {STATE_FORMAT} file")));
        }
        let step = state.get("step").and_then(|s| s.as_u64()).ok_or_else(|| err(format!("{STATE_FILE}: no step")))?;
        let mut config: TrainConfig = serde_json::from_value(state["train_config"].clone())
            .map_err(|e| err(format!("{STATE_FILE}: train_config: {e}")))?;
        if let Some(info) = state.get("dataset") {
            let saved: tessera_data::corpus::DatasetInfo =
                serde_json::from_value(info.clone()).map_err(|e| err(format!("{STATE_FILE}: dataset: {e}")))?;
            if saved.fingerprint != dataset.info.fingerprint {
                return Err(err(format!(
                    "checkpoint was trained on {:?} (fingerprint {}), not on this data {:?} (fingerprint {})",
                    saved.name, saved.fingerprint, dataset.info.name, dataset.info.fingerprint
                )));
            }
        }
        if let Some(steps) = steps {
            config.steps = steps;
        }
        let (model, _) = load_checkpoint(dir, device)?;
        let mut trainer = Trainer::from_model(config, model, dataset)?;
        let mut moments = read_safetensors(&dir.join(OPTIMIZER_FILE))?;
        trainer.opt.load_state(step, |name| moments.remove(name)).map_err(err)?;
        tracing::info!(step, path = %dir.display(), "resumed");
        Ok(trainer)
    }

    /// Trains until `config.steps` (or `stop_at`, if earlier), evaluating, logging and
    /// checkpointing along the way. `out_dir` receives `metrics.jsonl` and `checkpoint/`.
    pub fn run(
        &mut self,
        out_dir: Option<&Path>,
        stop_at: Option<u64>,
        show_progress: bool,
    ) -> Result<RunSummary, TrainError> {
        let end = stop_at.map_or(self.config.steps, |s| s.min(self.config.steps));
        let mut metrics = match out_dir {
            Some(dir) => Some(MetricsLog::open(dir)?),
            None => None,
        };
        if let Some(m) = metrics.as_mut() {
            m.write(&json!({"event": "start", "step": self.step(), "dataset": self.dataset.info,
                            "model": self.model.config, "params": self.model.config.num_params(),
                            "train": self.config}))?;
        }
        let bar = progress_bar(end, self.step(), show_progress);
        let started = Instant::now();
        let start_step = self.step();
        let mut last_eval = None;
        while self.step() < end {
            let stats = self.train_step()?;
            let done = self.step();
            let elapsed = started.elapsed().as_secs_f64();
            let tokens_per_s =
                ((done - start_step) as usize * self.config.tokens_per_step()) as f64 / elapsed.max(1e-9);
            bar.set_position(done);
            bar.set_message(format!("loss {:.4} | {:.1}k tok/s", stats.loss, tokens_per_s / 1e3));
            if let Some(m) = metrics.as_mut() {
                m.write(&json!({"event": "train", "step": done, "loss": stats.loss, "lr": stats.lr,
                                "grad_norm": stats.grad_norm, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed}))?;
            }
            if done.is_multiple_of(self.config.eval_interval) || done == end {
                let eval = self.evaluate()?;
                print_above(&bar, describe_eval(&eval));
                if let Some(m) = metrics.as_mut() {
                    m.write(&json!({"event": "eval", "step": done, "val_loss": eval.val_loss,
                                    "val_loss_warm": eval.val_loss_warm, "floor_gap": eval.floor_gap}))?;
                }
                last_eval = Some(eval);
            }
            let interval = self.config.checkpoint_interval;
            if let Some(dir) = out_dir
                && interval > 0
                && done.is_multiple_of(interval)
                && done != end
            {
                self.save(&dir.join("checkpoint"))?;
            }
        }
        bar.finish_and_clear();
        let final_eval = match last_eval {
            Some(e) => e,
            None => self.evaluate()?,
        };
        let checkpoint = match out_dir {
            Some(dir) => {
                let path = dir.join("checkpoint");
                self.save(&path)?;
                Some(path)
            }
            None => None,
        };
        let elapsed_s = started.elapsed().as_secs_f64();
        let tokens = (self.step() - start_step) as usize * self.config.tokens_per_step();
        Ok(RunSummary {
            steps: self.step(),
            final_eval,
            tokens_per_s: tokens as f64 / elapsed_s.max(1e-9),
            elapsed_s,
            checkpoint,
        })
    }
}

pub fn describe_eval(e: &EvalStats) -> String {
    let mut s =
        format!("step {:>6} | val loss {:.4} | warm-context val loss {:.4}", e.step, e.val_loss, e.val_loss_warm);
    if let Some(gap) = e.floor_gap {
        s.push_str(&format!(" | {gap:+.4} nats from the entropy floor"));
    }
    s.push_str(&describe_coverage(e));
    s
}

/// Which part of the validation split an evaluation covered.
pub fn describe_coverage(e: &EvalStats) -> String {
    if e.windows >= e.split_windows {
        format!(" | whole validation split ({} windows)", e.windows)
    } else {
        format!(" | {} of {} validation windows, evenly spaced over the split", e.windows, e.split_windows)
    }
}

/// Prints a line above `bar`, or plainly when the bar is hidden (not a terminal), where
/// indicatif would drop it.
pub fn print_above(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

fn progress_bar(len: u64, pos: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} steps | {msg} | {elapsed_precise} < {eta_precise}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(pos);
    bar
}

/// Appends one JSON object per line to `metrics.jsonl`.
struct MetricsLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl MetricsLog {
    fn open(dir: &Path) -> Result<MetricsLog, TrainError> {
        let io = |p: &Path, e: std::io::Error| TrainError::Io { path: p.display().to_string(), message: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io(&path, e))?;
        Ok(MetricsLog { path, file: std::io::BufWriter::new(file) })
    }

    fn write(&mut self, value: &serde_json::Value) -> Result<(), TrainError> {
        let io = |e: std::io::Error| TrainError::Io { path: self.path.display().to_string(), message: e.to_string() };
        writeln!(self.file, "{value}").map_err(io)?;
        self.file.flush().map_err(|e| TrainError::Io { path: self.path.display().to_string(), message: e.to_string() })
    }
}
