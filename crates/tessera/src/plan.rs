//! The phase plan (`phases.toml`, embedded) and what each phase implies, computed from its
//! model configuration rather than typed by hand: memory per contributor, bytes per round,
//! compute. A leaf: `tessera phases` prints it, `tessera doctor` checks a machine against it and
//! `tessera hub --phase N` serves one of its phases.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tessera_model::{LlamaConfig, TrainingMemory};
use tessera_protocol::Codec;

/// The plan Tessera ships with (the repository's `phases.toml`).
pub const DEFAULT_PLAN: &str = include_str!("../../../phases.toml");

#[derive(Debug, Deserialize)]
struct Plan {
    phase: Vec<Phase>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Phase {
    name: String,
    model: String,
    tokens: f64,
    #[serde(default)]
    loss_target: Option<f64>,
    seq_len: i64,
    micro_batch: i64,
    inner_steps: u64,
    contributor_gib: f64,
    qualify_top: u32,
    /// The run this phase starts as (`tessera hub --phase N`): `tessera hub` flags as TOML keys,
    /// beside the model, sequence length, micro-batch and H above. Only a phase that starts a
    /// run has one; later phases grow from it within the same run.
    #[serde(default)]
    run: Option<toml::Table>,
}

/// Phase `n` (1-based) of a plan as the settings of the run it starts: its `run` table, with
/// the phase's model, sequence length, micro-batch and H, and as many rounds as its token
/// budget takes at its quorum (`tokens / (quorum × H × micro_batch × seq_len)`, rounded up).
pub fn phase_run(text: &str, n: usize) -> Result<toml::Table> {
    plan_rows(text)?; // The whole plan checked first.
    let plan: Plan = toml::from_str(text).context("phase plan")?;
    let count = plan.phase.len();
    let p = n
        .checked_sub(1)
        .and_then(|i| plan.phase.get(i))
        .with_context(|| format!("--phase {n}: the plan has phases 1 to {count}"))?;
    let Some(mut run) = p.run.clone() else {
        bail!(
            "{} does not start a run: it grows from the phase before within the same run (`tessera hub \
             --phase 1 --grow-to …`); phases that start a run: {}",
            p.name,
            plan.phase.iter().filter(|q| q.run.is_some()).map(|q| q.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    };
    for key in ["model", "seq_len", "batch_size", "inner_steps"] {
        if run.contains_key(key) {
            bail!("{}: `{key}` belongs to the phase itself, not its run table", p.name);
        }
    }
    let quorum = run.get("quorum").and_then(toml::Value::as_integer).unwrap_or(4).max(1) as f64;
    let per_round = quorum * p.inner_steps as f64 * (p.micro_batch * p.seq_len) as f64;
    run.insert("model".into(), p.model.clone().into());
    run.insert("seq_len".into(), p.seq_len.into());
    run.insert("batch_size".into(), p.micro_batch.into());
    run.insert("inner_steps".into(), (p.inner_steps as i64).into());
    if !run.contains_key("rounds") {
        run.insert("rounds".into(), ((p.tokens / per_round).ceil() as i64).into());
    }
    Ok(run)
}

/// What a phase implies.
#[derive(Debug, Serialize)]
pub struct PhaseRow {
    pub name: String,
    pub model: String,
    pub params: u64,
    pub layers: i64,
    pub hidden: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub tokens: f64,
    pub tokens_per_param: f64,
    pub loss_target: Option<f64>,
    /// f32 weights, gradients and AdamW moments.
    pub optimizer_bytes: u64,
    /// The round's base weights and the error-feedback residual DiLoCo keeps.
    pub diloco_bytes: u64,
    /// Activations of one micro-batch (bf16, memory-efficient attention) and its f32 logits.
    pub activation_bytes: u64,
    pub total_bytes: u64,
    pub contributor_bytes: u64,
    pub fits: bool,
    /// Bytes one contributor uploads per round, by codec; and synchronous data parallel's
    /// traffic over the same H steps (f32 gradient up and average down each step).
    pub upload: Vec<(String, u64)>,
    pub sync_dp_bytes: u64,
    pub qualify: String,
    /// Training FLOPs of the phase's token budget (6N + attention, per token at its sequence
    /// length), H100-hours at 40% of its dense bf16 peak, and H100s to finish in 90 days.
    pub train_flops: f64,
    pub h100_hours: f64,
    pub h100s_for_90_days: f64,
    /// Accelerators of this phase's size that must share one model replica (1: a contributor
    /// holds it alone).
    pub contributors_per_replica: u64,
}

/// NVIDIA H100 SXM dense bf16 peak, FLOP/s, and the utilisation the plan assumes.
pub const H100_BF16: f64 = 989.4e12;
pub const PLANNED_MFU: f64 = 0.4;

/// Activation memory of one micro-batch during the backward pass: 34·s·b·h bytes per layer
/// (Korthikanti et al. 2022, bf16, without the s² attention-score term that memory-efficient
/// attention never stores), plus f32 logits and their gradient.
pub fn activation_bytes(c: &LlamaConfig, seq: i64, batch: i64) -> u64 {
    let per_layer = 34 * seq * batch * c.hidden_size;
    (c.num_hidden_layers * per_layer + 2 * 4 * seq * batch * c.vocab_size) as u64
}

fn row(p: &Phase, previous: Option<&Phase>) -> Result<PhaseRow> {
    let c = LlamaConfig::from_preset_or_path(&p.model).with_context(|| format!("{}: model {}", p.name, p.model))?;
    if !(p.tokens.is_finite() && p.tokens > 0.0) || p.seq_len <= 0 || p.micro_batch <= 0 || p.inner_steps == 0 {
        bail!("{}: tokens, seq_len, micro_batch and inner_steps must be positive", p.name);
    }
    if !(p.contributor_gib.is_finite() && p.contributor_gib > 0.0) {
        bail!("{}: contributor_gib must be positive", p.name);
    }
    let n = c.num_params();
    let optimizer = TrainingMemory::f32(&c).total();
    let diloco = 8 * n;
    let activations = activation_bytes(&c, p.seq_len, p.micro_batch);
    let total = optimizer + diloco + activations;
    let contributor = (p.contributor_gib * (1u64 << 30) as f64) as u64;
    let shapes = c.parameter_shapes();
    let codecs = ["f32", "bf16", "int8:64", "int4:64", "topk:4096:16"];
    let upload = codecs
        .iter()
        .map(|s| {
            let codec: Codec = s.parse().map_err(anyhow::Error::msg)?;
            let bytes = shapes.iter().map(|(_, shape)| codec.encoded_len(shape.iter().product::<i64>() as u64)).sum();
            Ok((s.to_string(), bytes))
        })
        .collect::<Result<Vec<_>>>()?;
    let qualify = match (p.qualify_top, previous) {
        (0, _) => "anyone".to_owned(),
        (k, Some(prev)) => format!("top {k} of {}", prev.name),
        (k, None) => bail!("{}: qualify_top {k} but there is no previous phase to qualify in", p.name),
    };
    let train_flops = p.tokens * c.train_flops_per_token(p.seq_len) as f64;
    let h100_hours = train_flops / (H100_BF16 * PLANNED_MFU) / 3600.0;
    Ok(PhaseRow {
        train_flops,
        h100_hours,
        h100s_for_90_days: h100_hours / (90.0 * 24.0),
        contributors_per_replica: total.div_ceil(contributor),
        name: p.name.clone(),
        model: p.model.clone(),
        params: n,
        layers: c.num_hidden_layers,
        hidden: c.hidden_size,
        heads: c.num_attention_heads,
        kv_heads: c.kv_heads(),
        tokens: p.tokens,
        tokens_per_param: p.tokens / n as f64,
        loss_target: p.loss_target,
        optimizer_bytes: optimizer,
        diloco_bytes: diloco,
        activation_bytes: activations,
        total_bytes: total,
        contributor_bytes: contributor,
        fits: total <= contributor,
        upload,
        sync_dp_bytes: p.inner_steps * 2 * 4 * n,
        qualify,
    })
}

/// Every phase of a plan file's text, computed.
pub fn plan_rows(text: &str) -> Result<Vec<PhaseRow>> {
    let plan: Plan = toml::from_str(text).context("phase plan")?;
    if plan.phase.is_empty() {
        bail!("the phase plan has no [[phase]]");
    }
    let mut rows = Vec::new();
    for (i, p) in plan.phase.iter().enumerate() {
        rows.push(row(p, i.checked_sub(1).map(|j| &plan.phase[j]))?);
    }
    for w in rows.windows(2) {
        if w[1].params < w[0].params {
            bail!("{} is smaller than {}: each phase grows the previous one", w[1].name, w[0].name);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_plan_has_seven_growing_phases_computed_from_their_configs() {
        let rows = plan_rows(DEFAULT_PLAN).unwrap();
        assert_eq!(rows.len(), 7);
        assert!(rows.windows(2).all(|w| w[1].params > w[0].params));
        let first = &rows[0];
        assert_eq!(first.params, tessera_model::preset("phase1").unwrap().num_params());
        assert_eq!(first.optimizer_bytes, 16 * first.params);
        assert_eq!(first.qualify, "anyone");
        assert!(first.fits, "the prototype fits a 24 GiB GPU: {first:?}");
        assert!(!rows[6].fits, "no contributor holds 1.4T parameters and their optimizer");
        let int8 = first.upload.iter().find(|(n, _)| n == "int8:64").unwrap().1;
        assert!(int8 > first.params && int8 < first.params + first.params / 10);
        assert!(rows[1].qualify.starts_with("top 1000 of phase 1"));
        assert_eq!(first.contributors_per_replica, 1);
        assert!(rows[6].contributors_per_replica > 1);
        let c = tessera_model::preset("phase1").unwrap();
        assert_eq!(first.train_flops, 10e9 * c.train_flops_per_token(2048) as f64);
    }

    #[test]
    fn bad_plans_are_refused_with_the_phase_named() {
        let shrink = DEFAULT_PLAN.replacen("model = \"phase2\"", "model = \"nano\"", 1);
        assert!(plan_rows(&shrink).unwrap_err().to_string().contains("smaller"));
        let typo = DEFAULT_PLAN.replacen("seq_len = 2048", "seqlen = 2048", 1);
        assert!(plan_rows(&typo).is_err());
        let zero = DEFAULT_PLAN.replacen("micro_batch = 4", "micro_batch = 0", 1);
        assert!(format!("{:#}", plan_rows(&zero).unwrap_err()).contains("phase 1"));
    }
}
