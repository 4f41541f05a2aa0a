//! The model's own thread: continuous batching over a fixed set of decoding slots.
//!
//! Requests arrive on a channel. Those admitted in one step are prefilled together (their prompts
//! right-padded in one forward pass), then each moved into a free slot of a [`BatchCache`]; every step after that advances all occupied
//! slots by one token in one forward pass, so concurrent requests share the model instead of
//! queueing behind one another. A request leaves its slot when it ends (end of text, its token
//! limit, the context is full) or when whoever asked stops listening, and a waiting request
//! takes the slot at the next step.
//!
//! libtorch runs on this one thread; the HTTP side never touches a tensor.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};
use tessera_model::{BatchCache, KvCache, Llama, SamplingParams, sample};
use tokio::sync::mpsc::UnboundedSender;

use crate::ServeError;

/// One generation request, tokenized and checked.
pub struct Job {
    pub prompt: Vec<u32>,
    /// At most this many new tokens (at least one).
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Keep going past the end-of-text token (benchmarks: a fixed number of tokens).
    pub ignore_eos: bool,
    /// What changes the logits before sampling: OpenAI's penalties and `logit_bias`.
    pub adjust: Adjust,
    /// Report each token's log probability and this many of the likeliest alternatives.
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

/// A generated token's log probability under the model's distribution at that step (after
/// `logit_bias` and the penalties, before temperature and `top_p`: what the model thinks, not
/// how it was sampled), and the likeliest tokens there, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// Log-softmax of `logits` at `token`, and the `k` likeliest tokens: O(vocabulary).
    pub fn of(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let norm = f64::from(max) + total.ln();
        let lp = |l: f32| (f64::from(l) - norm) as f32;
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(ids.len());
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if k > 0 && k < ids.len() {
            ids.select_nth_unstable_by(k - 1, by_logit);
        }
        ids.truncate(k);
        ids.sort_by(by_logit);
        TokenLogprobs {
            logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)),
            top: ids.into_iter().map(|i| (i, lp(logits[i as usize]))).collect(),
        }
    }
}

/// OpenAI's changes to the logits before each token is sampled: `logit_bias` added to the
/// tokens it names, and for each token generated so far (`count` times) the logit lowered by
/// `count × frequency + presence`. Cost per token: O(biased + distinct generated tokens).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Adjust {
    pub presence: f32,
    pub frequency: f32,
    /// (token id, bias), token ids below the vocabulary (checked by the caller).
    pub bias: Vec<(u32, f32)>,
}

impl Adjust {
    fn is_none(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0 && self.bias.is_empty()
    }

    /// `logits` with the bias and penalties applied, given the counts of the tokens generated.
    pub fn apply(&self, logits: &mut [f32], counts: &std::collections::HashMap<u32, u32>) {
        for &(id, b) in &self.bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        if self.presence != 0.0 || self.frequency != 0.0 {
            for (&id, &n) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= n as f32 * self.frequency + self.presence;
                }
            }
        }
    }
}

/// What the engine tells a request's owner, in order: tokens, then one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token, with its log probabilities when the job asked for them.
    Token(u32, Option<Box<TokenLogprobs>>),
    Done(Finish),
    Failed(String),
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model produced its end-of-text token (not sent as a `Token`).
    EndOfText,
    /// The request's `max_tokens`, or the context, is used up.
    Length,
}

/// A handle on the engine thread: cheap to clone, send jobs through it.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    stats: std::sync::Arc<Stats>,
}

/// What the engine has done so far.
#[derive(Default, Debug)]
pub struct Stats {
    /// Decoding steps (forward passes after prefill).
    pub steps: AtomicU64,
    /// Tokens those steps produced, summed over the slots in each.
    pub step_tokens: AtomicU64,
    /// The most slots one step advanced together.
    pub widest_step: AtomicU64,
    /// Requests prefilled, and the forward passes that did it (several requests admitted in
    /// one step share one).
    pub prefills: AtomicU64,
    pub prefill_passes: AtomicU64,
}

struct Running {
    events: UnboundedSender<Event>,
    /// How to sample, how many tokens at most, and the token that ends it (`None`: ignore EOS).
    params: SamplingParams,
    rng: ChaCha8Rng,
    adjust: Adjust,
    logprobs: Option<usize>,
    /// How often each token was generated so far (for the penalties).
    counts: std::collections::HashMap<u32, u32>,
    produced: usize,
    /// The token the next step feeds in.
    next: u32,
}

impl Engine {
    /// Starts the engine thread on `model` with `slots` decoding slots. `eos` ends a sequence.
    pub fn start(mut model: Llama, slots: usize, eos: u32) -> Result<Engine, ServeError> {
        model.fuse_for_decoding();
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(Stats::default());
        let shared = stats.clone();
        std::thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || run(model, slots.max(1), eos, rx, &shared))
            .map_err(|e| ServeError::Invalid(format!("could not start the engine thread: {e}")))?;
        Ok(Engine { jobs: tx, stats })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn submit(&self, job: Job) -> Result<(), ServeError> {
        self.jobs.send(job).map_err(|_| ServeError::EngineStopped)
    }
}

fn run(model: Llama, slots: usize, eos: u32, jobs: mpsc::Receiver<Job>, stats: &Stats) {
    let _guard = tch::no_grad_guard();
    let mut cache = BatchCache::new(&model, slots);
    let mut running: Vec<Option<Running>> = (0..slots).map(|_| None).collect();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        // Block only when there is nothing to do.
        if waiting.is_empty() && running.iter().all(Option::is_none) {
            metrics::gauge!("tessera_serve_active_sequences").set(0.0);
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        // Requests whose owner left give their slot up.
        for slot in running.iter_mut() {
            if slot.as_ref().is_some_and(|r| r.events.is_closed()) {
                *slot = None;
            }
        }
        // Waiting requests take the free slots, prefilled together.
        let free: Vec<usize> = (0..slots).filter(|&s| running[s].is_none()).collect();
        let mut admitted = Vec::new();
        while admitted.len() < free.len() {
            let Some(job) = waiting.pop_front() else { break };
            if job.events.is_closed() {
                continue;
            }
            // One padded pass holds at most a context's worth of positions (what one long
            // prompt alone needs): larger groups wait for the next step.
            let longest = admitted.iter().chain([&job]).map(|j: &Job| j.prompt.len().max(1)).max().unwrap_or(1);
            if !admitted.is_empty() && (admitted.len() + 1) * longest > cache.context() as usize {
                waiting.push_front(job);
                break;
            }
            admitted.push(job);
        }
        if !admitted.is_empty() {
            stats.prefills.fetch_add(admitted.len() as u64, Ordering::Relaxed);
            stats.prefill_passes.fetch_add(1, Ordering::Relaxed);
            let slots_for: Vec<usize> = free[..admitted.len()].to_vec();
            for (slot, admitted) in slots_for.iter().zip(admit(&model, &mut cache, &slots_for, eos, admitted)) {
                match admitted {
                    Ok(Some(r)) => running[*slot] = Some(r),
                    Ok(None) => {}
                    Err((events, e)) => {
                        tracing::warn!(error = %e, "prefill failed");
                        let _ = events.send(Event::Failed(e.to_string()));
                    }
                }
            }
        }
        let active: Vec<usize> = (0..slots).filter(|&s| running[s].is_some()).collect();
        if active.is_empty() {
            continue;
        }
        let tokens: Vec<i64> = active.iter().filter_map(|&s| running[s].as_ref().map(|r| i64::from(r.next))).collect();
        let logits = model
            .decode_step(&active, &tokens, &mut cache)
            .and_then(|l| Ok(Vec::<f32>::try_from(l.to_kind(Kind::Float).to_device(tch::Device::Cpu).view([-1]))?));
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "decoding step failed");
                for &s in &active {
                    if let Some(r) = running[s].take() {
                        let _ = r.events.send(Event::Failed(e.to_string()));
                    }
                }
                continue;
            }
        };
        stats.steps.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tessera_serve_decode_steps_total").increment(1);
        metrics::gauge!("tessera_serve_active_sequences").set(active.len() as f64);
        stats.step_tokens.fetch_add(active.len() as u64, Ordering::Relaxed);
        stats.widest_step.fetch_max(active.len() as u64, Ordering::Relaxed);
        let vocab = logits.len() / active.len();
        for (i, &s) in active.iter().enumerate() {
            let Some(r) = running[s].as_mut() else { continue };
            let token = pick(&logits[i * vocab..(i + 1) * vocab], r);
            if step(r, token, cache.has_room(s)) {
                running[s] = None;
            }
        }
    }
}

/// Prefills `jobs` into `slots` (one each) in one forward pass — their prompts right-padded to
/// the longest — and samples each one's first token; `None` for a job that already ended.
#[allow(clippy::type_complexity)]
fn admit(
    model: &Llama,
    cache: &mut BatchCache,
    slots: &[usize],
    eos: u32,
    jobs: Vec<Job>,
) -> Vec<Result<Option<Running>, (UnboundedSender<Event>, ServeError)>> {
    let prompts: Vec<Vec<i64>> =
        jobs.iter()
            .map(|j| {
                if j.prompt.is_empty() {
                    vec![i64::from(eos)]
                } else {
                    j.prompt.iter().map(|&t| i64::from(t)).collect()
                }
            })
            .collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let padded: Vec<i64> = prompts
        .iter()
        .flat_map(|p| p.iter().copied().chain(std::iter::repeat_n(i64::from(eos), longest - p.len())))
        .collect();
    let mut kv = KvCache::new();
    let lasts = model
        .forward(
            &Tensor::from_slice(&padded).view([jobs.len() as i64, longest as i64]).to_device(model.device()),
            Some(&mut kv),
        )
        .and_then(|logits| {
            let mut lasts = Vec::with_capacity(jobs.len());
            for (row, (p, &slot)) in prompts.iter().zip(slots).enumerate() {
                cache.load_row(slot, &kv, row as i64, p.len() as i64)?;
                let last =
                    logits.get(row as i64).get(p.len() as i64 - 1).to_kind(Kind::Float).to_device(tch::Device::Cpu);
                lasts.push(Vec::<f32>::try_from(last)?);
            }
            Ok(lasts)
        });
    match lasts {
        Err(e) => {
            let message = e.to_string();
            jobs.into_iter().map(|j| Err((j.events, ServeError::Invalid(format!("prefill: {message}"))))).collect()
        }
        Ok(lasts) => jobs
            .into_iter()
            .zip(lasts)
            .zip(slots)
            .map(|((job, last), &slot)| {
                let params = SamplingParams {
                    max_new_tokens: job.max_tokens.max(1),
                    temperature: job.temperature,
                    top_p: job.top_p,
                    seed: job.seed,
                    stop_token: (!job.ignore_eos).then_some(eos),
                };
                let mut r = Running {
                    events: job.events,
                    params,
                    rng: ChaCha8Rng::seed_from_u64(job.seed),
                    adjust: job.adjust,
                    logprobs: job.logprobs,
                    counts: std::collections::HashMap::new(),
                    produced: 0,
                    next: eos,
                };
                let token = pick(&last, &mut r);
                Ok((!step(&mut r, token, cache.has_room(slot))).then_some(r))
            })
            .collect(),
    }
}

/// Samples the request's next token from its logits, after its bias and penalties, with its
/// log probabilities if asked for.
fn pick(logits: &[f32], r: &mut Running) -> (u32, Option<Box<TokenLogprobs>>) {
    let adjusted;
    let logits = if r.adjust.is_none() {
        logits
    } else {
        let mut a = logits.to_vec();
        r.adjust.apply(&mut a, &r.counts);
        adjusted = a;
        &adjusted
    };
    let token = sample(logits, &r.params, &mut r.rng);
    *r.counts.entry(token).or_default() += 1;
    (token, r.logprobs.map(|k| Box::new(TokenLogprobs::of(logits, token, k))))
}

/// Hands `token` to the request; true when the request has ended.
fn step(r: &mut Running, (token, logprobs): (u32, Option<Box<TokenLogprobs>>), room: bool) -> bool {
    if Some(token) == r.params.stop_token {
        let _ = r.events.send(Event::Done(Finish::EndOfText));
        return true;
    }
    r.produced += 1;
    if r.events.send(Event::Token(token, logprobs)).is_err() {
        return true;
    }
    if r.produced >= r.params.max_new_tokens || !room {
        let _ = r.events.send(Event::Done(Finish::Length));
        return true;
    }
    r.next = token;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_and_penalties_move_the_logits_as_openai_documents() {
        let adjust = Adjust { presence: 0.5, frequency: 0.25, bias: vec![(1, 3.0), (9, -100.0)] };
        let mut logits = vec![1.0f32; 4];
        let counts = std::collections::HashMap::from([(0u32, 2u32), (2, 1)]);
        adjust.apply(&mut logits, &counts);
        // Token 0: seen twice (1 − 2×0.25 − 0.5); 1: biased; 2: seen once; 3 alone; 9 is past the end.
        assert_eq!(logits, vec![0.0, 4.0, 0.25, 1.0]);
        assert!(Adjust::default().is_none());
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_tokens_are_the_likeliest() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let lp = TokenLogprobs::of(&logits, 2, 3);
        let norm = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((f64::from(lp.logprob) - (2.0 - norm)).abs() < 1e-6);
        // Ties go to the lower id; exactly k, most likely first.
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let p: f64 = (0..5).map(|t| f64::from(TokenLogprobs::of(&logits, t, 0).logprob).exp()).sum();
        assert!((p - 1.0).abs() < 1e-6, "{p}");
        assert!(TokenLogprobs::of(&logits, 0, 0).top.is_empty());
        assert_eq!(TokenLogprobs::of(&logits, 0, 20).top.len(), 5);
    }
}
