//! DiLoCo simulated in one process: `workers` replicas each run `inner_steps` AdamW steps from
//! the global weights on their own data (worker id → their own windows), send the
//! pseudo-gradient Δ = θ − θ_worker through the real wire format and codec (with per-worker
//! error feedback), and the global weights take one outer Nesterov step on the average.
//!
//! This is the algorithm the hub and contributors run over the network, minus the network; it
//! serves the experiments (DiLoCo against synchronous data parallel) and pins the semantics:
//! one worker, one inner step, outer lr 1 and no momentum is exactly plain training (tested).
//!
//! Inner optimizer state (AdamW moments and step count) stays with each worker across rounds;
//! the inner learning-rate schedule runs over all `rounds × inner_steps` inner steps.

use tch::{Device, Tensor};
use tessera_aggregate::{Accumulator, OuterConfig, OuterOptimizer, broadcast_step};
use tessera_data::Dataset;
use tessera_model::{Llama, LlamaConfig};
use tessera_protocol::{Codec, ErrorFeedback, MessageView, PseudoGradient, TensorEntry};

use crate::{EvalStats, TrainConfig, TrainError, Trainer};

#[derive(Debug, Clone, Copy)]
pub struct DilocoConfig {
    pub workers: usize,
    pub inner_steps: u64,
    pub rounds: u64,
    pub outer: OuterConfig,
    pub codec: Codec,
    /// Codec of the weight update the hub publishes each round (with hub-side error feedback);
    /// workers apply it to their copy of the global weights.
    pub broadcast: Codec,
    /// Evaluate the global model every this many rounds (and after the last).
    pub eval_every: u64,
    /// Decay of each worker's error-feedback residual per round (1: plain error feedback).
    pub feedback_decay: f32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundStats {
    pub round: u64,
    /// Mean training loss over all workers' inner steps this round.
    pub inner_loss: f64,
    /// Pseudo-gradient bytes uploaded this round (whole messages, all workers).
    pub bytes_up: u64,
    pub eval: Option<EvalStats>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DilocoSummary {
    pub final_eval: EvalStats,
    pub rounds: u64,
    pub tokens: u64,
    /// Pseudo-gradient messages uploaded, all workers, all rounds.
    pub bytes_up: u64,
    /// Downloaded, all workers: the initial f32 checkpoint once, then each round's update.
    pub bytes_down: u64,
    /// What synchronous data parallel moves for the same tokens: every worker uploads its f32
    /// gradient and downloads the average at every step.
    pub data_parallel_bytes: u64,
}

/// Every weight tensor of `model` as flat f32, in `named_parameters` order.
pub fn read_params(model: &Llama) -> Result<Vec<Vec<f32>>, TrainError> {
    model
        .named_parameters()
        .iter()
        .map(|(_, t)| Ok(Vec::<f32>::try_from(t.detach().to_device(Device::Cpu).view([-1]))?))
        .collect()
}

/// Overwrites every weight tensor of `model` from flat f32 buffers in `named_parameters` order.
pub fn write_params(model: &Llama, values: &[Vec<f32>]) -> Result<(), TrainError> {
    for ((_, mut var), v) in model.named_parameters().into_iter().zip(values) {
        let t = Tensor::from_slice(v).view(var.size().as_slice()).to_device(var.device());
        tch::no_grad(|| var.f_copy_(&t))?;
    }
    Ok(())
}

/// Runs DiLoCo. `inner.steps` is replaced by `rounds × inner_steps`; `inner.worker` by each
/// worker's index. `on_round` sees every round's statistics as it finishes.
pub fn run_diloco(
    inner: &TrainConfig,
    model_config: &LlamaConfig,
    dataset: &Dataset,
    config: &DilocoConfig,
    device: Device,
    mut on_round: impl FnMut(&RoundStats),
) -> Result<DilocoSummary, TrainError> {
    // Long on purpose: the simulation's round, top to bottom, as the hub and contributors do it.
    if config.workers == 0 || config.inner_steps == 0 || config.rounds == 0 || config.eval_every == 0 {
        return Err(TrainError::Invalid("workers, inner steps, rounds and eval interval must be positive".into()));
    }
    ErrorFeedback::check_decay(config.feedback_decay)?;
    config.codec.validate()?;
    config.broadcast.validate()?;
    let total_inner = config.rounds * config.inner_steps;
    let worker_config = |w: usize| TrainConfig { steps: total_inner, worker: w as u64, ..inner.clone() };
    let global = Trainer::new(worker_config(0), model_config, dataset.clone(), device)?;
    let mut workers: Vec<Trainer> = (0..config.workers)
        .map(|w| Trainer::new(worker_config(w), model_config, dataset.clone(), device))
        .collect::<Result<_, _>>()?;

    let names: Vec<String> = global.model.named_parameters().into_iter().map(|(n, _)| n).collect();
    let shapes: Vec<Vec<u64>> =
        global.model.named_parameters().iter().map(|(_, t)| t.size().iter().map(|&d| d as u64).collect()).collect();
    let mut theta = read_params(&global.model)?;
    let lengths: Vec<usize> = theta.iter().map(Vec::len).collect();
    let n_params: u64 = lengths.iter().map(|&n| n as u64).sum();
    let mut outer = OuterOptimizer::new(config.outer, &lengths);
    let mut broadcast_residual: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
    let mut feedback: Vec<Vec<ErrorFeedback>> = (0..config.workers)
        .map(|_| lengths.iter().map(|&n| ErrorFeedback::new(n).with_decay(config.feedback_decay)).collect())
        .collect();
    let run_id = [0u8; 16];
    // Every worker downloads the initial checkpoint once, in f32.
    let (mut bytes_up, mut bytes_down) = (0u64, config.workers as u64 * 4 * n_params);
    let mut last_eval = None;

    for round in 0..config.rounds {
        let base = checkpoint_hash(&theta);
        let mut acc = Accumulator::new(&lengths);
        let (mut loss_sum, mut round_up) = (0.0, 0u64);
        let jobs = vec![(theta.as_slice(), config.inner_steps); workers.len()];
        for (w, trained) in train_workers(&mut workers, &jobs, device).into_iter().enumerate() {
            let (worker_loss, local) = trained?;
            loss_sum += worker_loss;
            let mut tensors = Vec::with_capacity(names.len());
            for (i, ((t, l), ef)) in theta.iter().zip(&local).zip(&mut feedback[w]).enumerate() {
                let delta: Vec<f32> = t.iter().zip(l).map(|(a, b)| a - b).collect();
                let encoded = ef.encode(&config.codec, &delta)?;
                tensors.push(TensorEntry { name: names[i].clone(), shape: shapes[i].clone(), encoded });
            }
            let message = PseudoGradient { codec: config.codec, run_id, round, base_checkpoint: base, tensors };
            let wire = message.to_bytes();
            round_up += wire.len() as u64;
            // The hub's side: verify the bytes it received, decode and aggregate in f32.
            let received = MessageView::parse(&wire)?;
            acc.add_view(1.0, &received)?;
        }
        // The hub's side: outer step, then publish the change in the broadcast codec.
        let mut target = theta.clone();
        outer.apply(&mut target, acc)?;
        let update = broadcast_step(&config.broadcast, &mut theta, &target, &mut broadcast_residual)?;
        let update = PseudoGradient {
            codec: config.broadcast,
            run_id,
            round: round + 1,
            base_checkpoint: base,
            tensors: names
                .iter()
                .zip(&shapes)
                .zip(update)
                .map(|((n, s), encoded)| TensorEntry { name: n.clone(), shape: s.clone(), encoded })
                .collect(),
        };
        if round + 1 < config.rounds {
            bytes_down += config.workers as u64 * update.wire_len() as u64;
        }
        write_params(&global.model, &theta)?;
        bytes_up += round_up;

        let done = round + 1;
        let eval = if done % config.eval_every == 0 || done == config.rounds {
            // The global model never steps itself: report the inner steps each worker has taken.
            Some(EvalStats { step: done * config.inner_steps, ..global.evaluate()? })
        } else {
            None
        };
        if eval.is_some() {
            last_eval = eval;
        }
        let inner_loss = loss_sum / (config.workers as u64 * config.inner_steps) as f64;
        on_round(&RoundStats { round: done, inner_loss, bytes_up: round_up, eval });
    }

    let tokens = total_inner * config.workers as u64 * inner.tokens_per_step() as u64;
    let dp_steps = total_inner * config.workers as u64;
    Ok(DilocoSummary {
        final_eval: match last_eval {
            Some(e) => e,
            None => global.evaluate()?,
        },
        rounds: config.rounds,
        tokens,
        bytes_up,
        bytes_down,
        data_parallel_bytes: dp_steps * 2 * 4 * n_params,
    })
}

/// A worker's round: the sum of its inner losses and its weights after them.
pub type Trained = (f64, Vec<Vec<f32>>);

/// Worker i starts from `jobs[i].0` and takes `jobs[i].1` inner steps; returns each worker's
/// loss sum and local weights, in worker order. On CUDA the workers run on their own threads, so
/// the host-side kernel launches of small models overlap; on the CPU they run one after another,
/// since libtorch already spreads each operation over every core.
pub fn train_workers(
    workers: &mut [Trainer],
    jobs: &[(&[Vec<f32>], u64)],
    device: Device,
) -> Vec<Result<Trained, TrainError>> {
    let train = |(worker, &(theta, steps)): (&mut Trainer, &(&[Vec<f32>], u64))| -> Result<Trained, TrainError> {
        write_params(&worker.model, theta)?;
        let mut loss = 0.0;
        for _ in 0..steps {
            loss += worker.train_step()?.loss;
        }
        Ok((loss, read_params(&worker.model)?))
    };
    if !device.is_cuda() || workers.len() < 2 {
        return workers.iter_mut().zip(jobs).map(train).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = workers.iter_mut().zip(jobs).map(|w| s.spawn(move || train(w))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// The global weights' content hash, standing in for the checkpoint hash the hub would publish.
fn checkpoint_hash(theta: &[Vec<f32>]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for t in theta {
        for v in t {
            h.update(&v.to_le_bytes());
        }
    }
    *h.finalize().as_bytes()
}
