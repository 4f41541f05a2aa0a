//! Sampling with a KV cache: the prompt is run once, then one token per step. Sampling happens
//! on the CPU with a seeded ChaCha RNG, so a seed gives the same text on any device.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::{KvCache, Llama, ModelError};

#[derive(Debug, Clone, Copy)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    pub seed: u64,
    pub stop_token: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { max_new_tokens: 200, temperature: 0.8, top_p: 0.95, seed: 0, stop_token: None }
    }
}

/// Continues `prompt`, calling `on_token` with each new token; returns the new tokens. Stops at
/// `max_new_tokens` or the stop token. When the context fills up, the cache is rebuilt from the
/// last half-context of tokens, so generation can run past the model's context length.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, ModelError> {
    let vocab = model.config.vocab_size;
    if let Some(&bad) = prompt.iter().find(|&&t| i64::from(t) >= vocab) {
        return Err(ModelError::TokenOutOfRange { token: i64::from(bad), vocab });
    }
    let ctx = model.config.max_position_embeddings as usize;
    let prompt: Vec<i64> = match prompt.len() {
        0 => vec![i64::from(params.stop_token.unwrap_or(0))],
        n if n >= ctx => prompt[n - ctx + 1..].iter().map(|&t| i64::from(t)).collect(),
        _ => prompt.iter().map(|&t| i64::from(t)).collect(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    let mut history = prompt.clone();
    let mut input = Tensor::from_slice(&prompt).view([1, -1]).to_device(model.device());
    tch::no_grad(|| -> Result<(), ModelError> {
        while out.len() < params.max_new_tokens {
            let logits = model.forward(&input, Some(&mut cache))?;
            let last = logits.get(0).get(-1).to_kind(Kind::Float).to_device(tch::Device::Cpu);
            let last = Vec::<f32>::try_from(last)?;
            let next = sample(&last, params, &mut rng);
            out.push(next);
            on_token(next);
            history.push(i64::from(next));
            if Some(next) == params.stop_token {
                break;
            }
            if cache.len() as usize >= ctx {
                cache = KvCache::new();
                let keep = (ctx / 2).max(1);
                input = Tensor::from_slice(&history[history.len() - keep..]).view([1, -1]).to_device(model.device());
            } else {
                input = Tensor::from_slice(&[i64::from(next)]).view([1, 1]).to_device(model.device());
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// One token from next-token `logits` under `params` (greedy at temperature 0, else
/// temperature and nucleus sampling drawn from `rng`).
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
    if params.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((f64::from(l - max)) / params.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if !total.is_finite() || total <= 0.0 {
        return argmax();
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, (_, p)) in probs.iter().enumerate() {
        kept += p / total;
        if kept >= params.top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * mass;
    for (id, p) in &probs {
        if u < *p {
            return *id;
        }
        u -= p;
    }
    probs.last().map_or(0, |p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset;

    #[test]
    fn seeded_sampling_is_reproducible_and_greedy_is_argmax() {
        let model = Llama::new(&preset("tiny").unwrap(), tch::Device::Cpu, 3).unwrap();
        let p = SamplingParams { max_new_tokens: 10, seed: 42, ..Default::default() };
        let a = generate(&model, &[1, 2, 3], &p, |_| {}).unwrap();
        let b = generate(&model, &[1, 2, 3], &p, |_| {}).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 10);
        let greedy = SamplingParams { temperature: 0.0, ..p };
        let g = generate(&model, &[1, 2, 3], &greedy, |_| {}).unwrap();
        // Greedy must pick the argmax of a full (uncached) forward at each step.
        let mut seq: Vec<i64> = vec![1, 2, 3];
        for &tok in &g {
            let logits = model.forward(&Tensor::from_slice(&seq).view([1, -1]), None).unwrap();
            let best = logits.get(0).get(-1).argmax(0, false).int64_value(&[]);
            assert_eq!(best, i64::from(tok));
            seq.push(i64::from(tok));
        }
    }

    #[test]
    fn generation_runs_past_the_context_length() {
        let model = Llama::new(&preset("tiny").unwrap(), tch::Device::Cpu, 3).unwrap();
        let p = SamplingParams { max_new_tokens: 100, seed: 1, ..Default::default() };
        let out = generate(&model, &[1, 2, 3], &p, |_| {}).unwrap();
        assert_eq!(out.len(), 100);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = [10.0f32, 9.0, -10.0, -10.0];
        let p = SamplingParams { top_p: 0.5, temperature: 1.0, ..Default::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..100 {
            assert_eq!(sample(&logits, &p, &mut rng), 0);
        }
    }

    #[test]
    fn out_of_vocabulary_prompt_is_an_error() {
        let model = Llama::new(&preset("tiny").unwrap(), tch::Device::Cpu, 3).unwrap();
        assert!(matches!(
            generate(&model, &[64], &SamplingParams::default(), |_| {}),
            Err(ModelError::TokenOutOfRange { token: 64, vocab: 64 })
        ));
    }
}
