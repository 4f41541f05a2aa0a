//! Sharded aggregation: a hub started with `--aggregate-shards N` hands each closing round to
//! `tessera aggregate-worker` processes (any number, on any machines, sharing its PostgreSQL
//! database and its store) instead of aggregating it itself.
//!
//! The replica that finishes a round writes the round's plan (its accepted submissions and
//! their weights, the model's table, the rule) and one job per stage and tensor range
//! ([`tessera_aggregate::shard`]). A worker takes a job (`FOR UPDATE SKIP LOCKED`, the row
//! locked until the job's outcome commits), range-reads its tensors' slice of every submission
//! from the store a piece at a time ([`crate::pieces`]: the plan says how much a job may hold
//! at once), and either reports the per-tensor sums the next stage needs or, at the last
//! stage, takes the outer step on its slice of θ, momentum and residual and stores its part.
//! The replica then writes the checkpoint, the update and the outer state from the parts,
//! a tensor at a time, and publishes as usual.
//!
//! Exactly once: a job's outcome and its release are one commit, and what a job stores is a
//! function of the plan alone (same key, same bytes), so a worker killed mid-job leaves
//! nothing but a lock its dead connection gives up; the next worker does the job again. A job
//! that cannot be done (a stored submission no longer decodes, a step that would leave
//! non-finite weights) makes the replica aggregate the round itself, as without workers: one
//! process can leave a submission out or hold the weights; shards could not agree to.
//!
//! Cost: each worker holds what [`tessera_aggregate::shard`] says for its shard; the finishing
//! replica holds one tensor at a time (plus a part of the checkpoint upload) and reads every
//! part twice (once to name the checkpoint by its hash, once to write it). Each stage reads
//! every submission's slice once: the bytes read per round are (stages × N × message size), in
//! N ranged reads per piece (more, smaller reads as N grows under a fixed memory budget).

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tessera_aggregate::OuterConfig;
use tessera_aggregate::round::{Input, outer_table};
use tessera_aggregate::shard::{self, Part, Previous, Stage};
use tessera_protocol::api::OuterSpec;
use tessera_protocol::{Aggregation, Codec, TensorSpec, WeightsLayout, header_bytes_for};

use crate::HubError;
use crate::db::{Db, JobLease};
use crate::pieces::Submissions;
use crate::store::{Store, checkpoint_key, outer_key, submission_key};

/// What every job of a round works from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub round: u64,
    pub rule: Aggregation,
    pub tensors: Vec<TensorSpec>,
    pub broadcast_codec: Codec,
    /// The submissions' codec: pieces are read in whole blocks of it.
    pub codec: Codec,
    /// The bytes of decoded submissions a robust rule's job holds at once at most.
    pub piece_bytes: usize,
    pub outer: OuterSpec,
    /// The round's checkpoint (BLAKE3, hex), whose θ the step starts from.
    pub base: String,
    /// Whether momentum and residual were saved going into the round (not before round 1).
    pub saved_outer: bool,
    pub inputs: Vec<PlanInput>,
    /// The tensor ranges, one job per stage each.
    pub shards: Vec<Range<usize>>,
    pub stages: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInput {
    pub blob: String,
    pub weight: f32,
    pub carries: Option<Vec<usize>>,
}

impl RoundPlan {
    fn lengths(&self) -> Vec<usize> {
        self.tensors.iter().map(|t| t.numel() as usize).collect()
    }

    fn inputs(&self) -> Vec<Input> {
        self.inputs.iter().map(|i| Input { weight: i.weight, carries: i.carries.clone() }).collect()
    }
}

/// What a job left for the round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Outcome {
    /// Per submission, per tensor of the shard: the sum the next stage needs (f64 bits).
    Sums(Vec<Vec<u64>>),
    /// The shard's part is stored.
    Part,
    /// The step would leave something non-finite.
    Held,
    /// The job cannot be done (not a worker's failure: the data's).
    Failed(String),
}

/// A plan's name: the start of the BLAKE3 of its text. What a job stores is under it, so a
/// worker still finishing a job of a replaced plan cannot overwrite the new plan's parts.
pub fn plan_id(plan: &str) -> String {
    blake3::hash(plan.as_bytes()).to_hex()[..16].to_owned()
}

/// Where a shard's part of the round's result is stored.
pub fn part_key(round: u64, plan: &str, shard: usize) -> String {
    format!("shards/{round:08}/{plan}/part-{shard:05}")
}

/// Where centred clipping's centre after `stage` is kept for a shard.
fn centre_key(round: u64, plan: &str, stage: u32, shard: usize) -> String {
    format!("shards/{round:08}/{plan}/centre-{stage:03}-{shard:05}")
}

/// Everything a round's jobs stored.
pub fn round_prefix(round: u64) -> String {
    format!("shards/{round:08}/")
}

/// Takes jobs until `shutdown` resolves: one at a time, waiting on the jobs channel (or a
/// second) when there is none. A failure to reach the database or the store drops the job (the
/// next taker does it) and waits a second. Returns how many jobs it did, and how many of those
/// could not be done (the round's publisher then aggregates it itself).
pub async fn work(db: &Db, store: &Store, name: &str, shutdown: impl std::future::Future<Output = ()>) -> (u64, u64) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut listener = None;
    let (mut done, mut failed) = (0u64, 0u64);
    loop {
        let next = async {
            match db.take_job().await {
                Ok(Some(lease)) => {
                    let (round, stage, shard) = (lease.round, lease.stage, lease.shard);
                    let started = std::time::Instant::now();
                    match run(db, store, lease, name).await {
                        Ok((outcome, bytes)) => {
                            done += 1;
                            failed += u64::from(outcome == "failed");
                            let seconds = started.elapsed().as_secs_f64();
                            let memcpy = *MEMCPY.get_or_init(memcpy_gb_per_s);
                            tracing::info!(
                                round,
                                stage,
                                shard,
                                outcome,
                                seconds,
                                bytes,
                                gb_per_s = bytes as f64 / seconds / 1e9,
                                memcpy_gb_per_s = memcpy,
                                "aggregation job done"
                            )
                        }
                        Err(e) => {
                            tracing::warn!(round, stage, shard, error = %e, "aggregation job dropped; it will be taken again");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                Ok(None) => {
                    if listener.is_none() {
                        listener = listen(db).await.ok();
                    }
                    match listener.as_mut() {
                        Some(l) => {
                            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), l.recv()).await {
                                listener = None;
                            }
                        }
                        None => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take a job; again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        tokio::select! {
            () = &mut shutdown => return (done, failed),
            () = next => {}
        }
    }
}

/// This machine's memcpy bandwidth (GB/s, best of three copies of 256 MiB): the baseline a
/// worker's throughput is reported against.
static MEMCPY: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

fn memcpy_gb_per_s() -> f64 {
    let n = 64 << 20;
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (4 * n) as f64 / best / 1e9
}

async fn listen(db: &Db) -> Result<sqlx::postgres::PgListener, HubError> {
    let mut l = sqlx::postgres::PgListener::connect(db.url()).await?;
    l.listen(crate::db::JOBS_CHANNEL).await?;
    Ok(l)
}

/// Does the job `lease` holds and commits its outcome; says which, and how many bytes of
/// submissions it read.
pub async fn run(db: &Db, store: &Store, lease: JobLease, name: &str) -> Result<(&'static str, u64), HubError> {
    let text = db
        .job_plan(lease.round)
        .await?
        .ok_or_else(|| HubError::Corrupt(format!("round {} has jobs but no plan", lease.round)))?;
    let plan: RoundPlan = serde_json::from_str(&text).map_err(|e| HubError::Corrupt(format!("round plan: {e}")))?;
    let (outcome, bytes) = compute(db, store, (&plan, &plan_id(&text)), lease.stage, lease.shard).await?;
    let said = match &outcome {
        Outcome::Sums(_) => "sums",
        Outcome::Part => "part stored",
        Outcome::Held => "held (non-finite)",
        Outcome::Failed(e) => {
            tracing::error!(round = plan.round, error = %e, "aggregation job failed: the hub will aggregate this round itself");
            "failed"
        }
    };
    let json = serde_json::to_string(&outcome).map_err(|e| HubError::Corrupt(e.to_string()))?;
    lease.done(&json, name).await?;
    Ok((said, bytes))
}

/// The job's outcome, and how many bytes of submissions it read.
async fn compute(
    db: &Db,
    store: &Store,
    (plan, id): (&RoundPlan, &str),
    stage: u32,
    shard: usize,
) -> Result<(Outcome, u64), HubError> {
    let lengths = plan.lengths();
    let range = plan
        .shards
        .get(shard)
        .filter(|r| r.start <= r.end && r.end <= lengths.len())
        .cloned()
        .ok_or_else(|| HubError::Corrupt(format!("no shard {shard} of the model's {} tensors", lengths.len())))?;
    let inputs = plan.inputs();
    // No submission kept (every one scored out): the mean of nothing is nothing, and it is
    // taken at the last stage; the stages before pass on no sums.
    if inputs.is_empty() && stage + 1 < plan.stages {
        return Ok((Outcome::Sums(Vec::new()), 0));
    }
    let previous = if stage == 0 {
        Previous::default()
    } else {
        match previous(db, store, (plan, id), stage, shard).await? {
            Some(p) => p,
            // An earlier stage could not be done: neither can this one; the replica
            // aggregates the round itself once the last stage says so.
            None => return Ok((Outcome::Failed(format!("stage {} failed", stage - 1)), 0)),
        }
    };
    // Every submission's pieces of the shard, read a few ahead of the arithmetic.
    let pieces = shard::pieces(&plan.rule, &inputs, &lengths, &range, plan.codec.unit() as usize, plan.piece_bytes);
    let keys: Vec<String> = plan.inputs.iter().map(|i| submission_key(&i.blob)).collect();
    let submissions = std::sync::Arc::new(Submissions::open(store, keys, inputs.clone()).await);
    let reads = std::sync::Arc::new(submissions.read(store, pieces.clone(), (0..inputs.len()).collect(), 1));
    let (rule, job_range, counted) = (plan.rule, range.clone(), reads.clone());
    let result = tokio::task::spawn_blocking(move || {
        let load = |k: usize, p: &shard::Piece| reads.next(k, p);
        shard::stage(&rule, stage, &inputs, &lengths, job_range, &previous, &pieces, load)
    })
    .await
    .map_err(|e| HubError::Corrupt(format!("aggregation task failed: {e}")));
    let bytes = counted.bytes();
    let computed = match result? {
        Ok(s) => s,
        // The store failed for a while: the job is dropped and taken again, not failed.
        Err(e) if submissions.transient_failure() => return Err(HubError::Unavailable(e.to_string())),
        Err(e) => return Ok((Outcome::Failed(e.to_string()), bytes)),
    };
    let outcome = match computed {
        Stage::Partial { sums, centre } => {
            if let Some(centre) = centre {
                store.put(&centre_key(plan.round, id, stage, shard), Bytes::from(f32_bytes(&centre))).await?;
            }
            Outcome::Sums(sums.iter().map(|s| s.iter().map(|v| v.to_bits()).collect()).collect())
        }
        Stage::Mean { mean, robust } => {
            if let Some(r) = robust {
                tracing::debug!(round = plan.round, shard, clipped = r.clipped, radius = ?r.radius, "robust rule");
            }
            let (theta, momentum, residual) = state_slice(store, plan, &range).await?;
            let config =
                OuterConfig { lr: plan.outer.lr, momentum: plan.outer.momentum, nesterov: plan.outer.nesterov };
            let codec = plan.broadcast_codec;
            let part =
                tokio::task::spawn_blocking(move || shard::step(&config, &codec, theta, momentum, residual, &mean))
                    .await
                    .map_err(|e| HubError::Corrupt(format!("step task failed: {e}")))?;
            match part {
                Ok(Some(part)) => {
                    store.put(&part_key(plan.round, id, shard), Bytes::from(part.to_bytes())).await?;
                    Outcome::Part
                }
                Ok(None) => Outcome::Held,
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
    };
    Ok((outcome, bytes))
}

/// What stage `stage` of `shard` starts from: every shard's sums of the stage before (per
/// submission, in tensor order) and, for centred clipping, this shard's centre. `None` when a
/// job of the stage before failed.
async fn previous(
    db: &Db,
    store: &Store,
    (plan, id): (&RoundPlan, &str),
    stage: u32,
    shard: usize,
) -> Result<Option<Previous>, HubError> {
    let jobs = db.jobs(plan.round, Some(stage - 1)).await?;
    let mut sums: Vec<Vec<f64>> = vec![Vec::new(); plan.inputs.len()];
    for (_, s, outcome) in &jobs {
        let part = match outcome.as_deref().map(serde_json::from_str::<Outcome>) {
            Some(Ok(Outcome::Sums(part))) => part,
            Some(Ok(Outcome::Failed(_) | Outcome::Held)) => return Ok(None),
            _ => return Err(HubError::Corrupt(format!("stage {} of shard {s} left no sums", stage - 1))),
        };
        if part.len() != sums.len() {
            return Err(HubError::Corrupt(format!("shard {s}'s sums cover {} submissions", part.len())));
        }
        for (whole, mine) in sums.iter_mut().zip(part) {
            whole.extend(mine.into_iter().map(f64::from_bits));
        }
    }
    let centre = match plan.rule {
        Aggregation::CenteredClip { .. } => {
            let range = &plan.shards[shard];
            let bytes = store.get(&centre_key(plan.round, id, stage - 1, shard)).await?;
            Some(f32_tensors(&bytes, &plan.lengths()[range.clone()])?)
        }
        _ => None,
    };
    Ok(Some(Previous { sums, centre }))
}

/// θ, momentum and residual of the tensors in `range`, read a tensor at a time.
async fn state_slice(
    store: &Store,
    plan: &RoundPlan,
    range: &Range<usize>,
) -> Result<(Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>), HubError> {
    let layout = WeightsLayout::of(&plan.tensors).map_err(|e| HubError::Corrupt(e.to_string()))?;
    let key = checkpoint_key(&plan.base);
    let mut theta = Vec::new();
    for i in range.clone() {
        theta.push(f32_values(&store.get_range(&key, layout.file_range(i)).await?)?);
    }
    let n = plan.tensors.len();
    let (mut momentum, mut residual) = (Vec::new(), Vec::new());
    if plan.saved_outer {
        let layout = WeightsLayout::of(&outer_table(&plan.tensors)).map_err(|e| HubError::Corrupt(e.to_string()))?;
        let key = outer_key(plan.round);
        for i in range.clone() {
            momentum.push(f32_values(&store.get_range(&key, layout.file_range(i)).await?)?);
            residual.push(f32_values(&store.get_range(&key, layout.file_range(n + i)).await?)?);
        }
    } else {
        momentum = range.clone().map(|i| vec![0.0; plan.tensors[i].numel() as usize]).collect();
        residual = momentum.clone();
    }
    Ok((theta, momentum, residual))
}

fn f32_bytes(tensors: &[Vec<f32>]) -> Vec<u8> {
    tensors.iter().flat_map(|t| t.iter().flat_map(|v| v.to_le_bytes())).collect()
}

fn f32_values(bytes: &[u8]) -> Result<Vec<f32>, HubError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(HubError::Corrupt(format!("{} bytes are not whole f32 values", bytes.len())));
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn f32_tensors(bytes: &[u8], lengths: &[usize]) -> Result<Vec<Vec<f32>>, HubError> {
    let values = f32_values(bytes)?;
    if values.len() != lengths.iter().sum::<usize>() {
        return Err(HubError::Corrupt(format!(
            "{} values stored for {} expected",
            values.len(),
            lengths.iter().sum::<usize>()
        )));
    }
    let mut at = 0;
    Ok(lengths
        .iter()
        .map(|&n| {
            at += n;
            values[at - n..at].to_vec()
        })
        .collect())
}

/// A round the workers aggregated, as its publisher needs it.
pub(crate) struct ByWorkers {
    pub hash: String,
    pub used: u64,
    pub weight: f64,
}

/// A round whose jobs have not moved for this long is said to wait for workers loudly.
const STALLED: Duration = Duration::from_secs(300);

/// Reads pieces of stored objects at most this many bytes at a time.
const POUR_BYTES: u64 = 64 << 20;

impl crate::Hub {
    /// Has the workers aggregate the closed round `plan` describes and writes what it
    /// publishes from their parts. `None`: a job could not be done, and the caller aggregates
    /// the round itself.
    pub(crate) async fn aggregate_by_workers(
        &self,
        live: &crate::hub::Live,
        plan: &tessera_round::Plan,
    ) -> Result<Option<ByWorkers>, HubError> {
        let spec = live.run.current();
        let round = plan.round;
        let inputs: Vec<PlanInput> = plan
            .rows
            .iter()
            .zip(plan.weights.iter().copied())
            .filter(|(_, w)| *w > 0.0)
            .map(|(row, w)| PlanInput {
                blob: row.blob.clone(),
                weight: w as f32,
                carries: (self.spec().fragments > 1).then(|| live.run.carried(row.contributor)),
            })
            .collect();
        // The workers start from the round's checkpoint: rebuilt first if its blob was lost.
        if self.store.size(&checkpoint_key(live.run.checkpoint())).await.is_err() {
            crate::recover::checkpoint(&self.db, &self.store, &live.run, live.run.checkpoint()).await?;
        }
        let lengths: Vec<usize> = spec.tensors.iter().map(|t| t.numel() as usize).collect();
        let fragments = inputs.iter().any(|i| i.carries.is_some());
        let ours = RoundPlan {
            round,
            rule: spec.aggregation,
            tensors: spec.tensors.clone(),
            broadcast_codec: spec.broadcast_codec,
            codec: spec.codec,
            piece_bytes: self.aggregate_memory,
            outer: spec.outer,
            base: live.run.checkpoint().to_owned(),
            saved_outer: round > 0,
            shards: shard::plan(&lengths, self.aggregate_shards),
            stages: shard::stages(&spec.aggregation, fragments),
            inputs,
        };
        let json = serde_json::to_string(&ours).map_err(|e| HubError::Corrupt(format!("round plan: {e}")))?;
        self.db.create_jobs(round, &json, ours.stages, ours.shards.len()).await?;
        let (plan, id) = (ours, plan_id(&json));
        let started = std::time::Instant::now();
        let (mut said, mut moved, mut last) = (started, started, None);
        loop {
            let pending = self.db.pending_jobs(round).await?;
            metrics::gauge!("tessera_hub_aggregation_jobs_pending").set(pending as f64);
            if pending == 0 {
                break;
            }
            if last != Some(pending) {
                (last, moved) = (Some(pending), std::time::Instant::now());
            }
            if said.elapsed() > Duration::from_secs(30) {
                let idle = moved.elapsed().as_secs();
                if idle >= STALLED.as_secs() {
                    tracing::warn!(
                        round,
                        pending,
                        idle_seconds = idle,
                        "no aggregation job finished for a while: is a `tessera aggregate-worker` running against this \
                         database and store? (the round waits for one)"
                    );
                } else {
                    tracing::info!(round, pending, "waiting for aggregation workers (tessera aggregate-worker)");
                }
                said = std::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (_, shard, outcome) in self.db.jobs(round, Some(plan.stages - 1)).await? {
            match outcome.as_deref().map(serde_json::from_str::<Outcome>) {
                Some(Ok(Outcome::Part)) => {}
                other => {
                    tracing::warn!(round, shard, outcome = ?other, "a shard has no part: aggregating the round here");
                    return Ok(None);
                }
            }
        }
        let mut base = [0u8; 32];
        hex::decode_to_slice(&plan.base, &mut base).map_err(|e| HubError::Corrupt(format!("base checkpoint: {e}")))?;
        let hash = self.assemble((&plan, &id), live.run.run_id(), base).await?;
        metrics::histogram!("tessera_hub_aggregation_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(
            round,
            shards = plan.shards.len(),
            stages = plan.stages,
            seconds = started.elapsed().as_secs_f64(),
            "aggregated by workers"
        );
        Ok(Some(ByWorkers {
            hash,
            used: plan.inputs.len() as u64,
            weight: plan.inputs.iter().map(|i| f64::from(i.weight)).sum(),
        }))
    }

    /// Writes the checkpoint, the update into the next round and the outer state from the
    /// shards' parts, a piece at a time; returns the checkpoint's hash.
    async fn assemble(
        &self,
        (plan, id): (&RoundPlan, &str),
        run_id: [u8; 16],
        base: [u8; 32],
    ) -> Result<String, HubError> {
        let lengths = plan.lengths();
        let codec = plan.broadcast_codec;
        let parts: Vec<shard::PartRanges> =
            plan.shards.iter().map(|r| Part::ranges(&lengths[r.clone()], &codec)).collect();
        let piece = |group: usize, i: usize| -> (String, Range<u64>) {
            let s = plan.shards.iter().position(|r| r.contains(&i)).unwrap_or(0);
            let at = parts[s][group].get(i - plan.shards[s].start).cloned().unwrap_or(0..0);
            (part_key(plan.round, id, s), at)
        };
        let corrupt = |e: tessera_protocol::WeightsError| HubError::Corrupt(e.to_string());
        // The checkpoint is named by its hash: hashed first, then written.
        let layout = WeightsLayout::of(&plan.tensors).map_err(corrupt)?;
        let pieces: Vec<_> = layout.file_order().into_iter().map(|i| piece(0, i)).collect();
        let mut hasher = blake3::Hasher::new();
        hasher.update(&layout.header);
        self.pour(&pieces, &mut hasher, None).await?;
        let hash = hasher.finalize().to_hex().to_string();
        self.write_pieces(&checkpoint_key(&hash), &layout.header, &pieces, None).await?;
        // The update, with its trailing hash.
        let header = header_bytes_for(&codec, run_id, plan.round + 1, base, &plan.tensors);
        let pieces: Vec<_> = (0..plan.tensors.len()).map(|i| piece(3, i)).collect();
        self.write_pieces(&crate::store::update_key(plan.round + 1), &header, &pieces, Some(())).await?;
        // Momentum and residual.
        let n = plan.tensors.len();
        let layout = WeightsLayout::of(&outer_table(&plan.tensors)).map_err(corrupt)?;
        let pieces: Vec<_> =
            layout.file_order().into_iter().map(|i| if i < n { piece(1, i) } else { piece(2, i - n) }).collect();
        self.write_pieces(&outer_key(plan.round + 1), &layout.header, &pieces, None).await?;
        Ok(hash)
    }

    /// `header` then the pieces to `key`; with `digest`, the BLAKE3 of all of it after them.
    async fn write_pieces(
        &self,
        key: &str,
        header: &[u8],
        pieces: &[(String, Range<u64>)],
        digest: Option<()>,
    ) -> Result<(), HubError> {
        let mut writer = self.store.writer(key).await?;
        let mut hasher = blake3::Hasher::new();
        let written = async {
            hasher.update(header);
            writer.write(header).await?;
            self.pour(pieces, &mut hasher, Some(&mut writer)).await?;
            if digest.is_some() {
                writer.write(hasher.finalize().as_bytes()).await?;
            }
            Ok::<_, HubError>(())
        }
        .await;
        match written {
            Ok(()) => writer.finish().await,
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Reads the pieces in order, at most [`POUR_BYTES`] at a time, into `hasher` and `writer`.
    async fn pour(
        &self,
        pieces: &[(String, Range<u64>)],
        hasher: &mut blake3::Hasher,
        mut writer: Option<&mut crate::store::Writer>,
    ) -> Result<(), HubError> {
        for (key, range) in pieces {
            let mut at = range.start;
            while at < range.end {
                let end = (at + POUR_BYTES).min(range.end);
                let bytes = self.store.get_range(key, at..end).await?;
                hasher.update(&bytes);
                if let Some(w) = writer.as_deref_mut() {
                    w.write(&bytes).await?;
                }
                at = end;
            }
        }
        Ok(())
    }

    /// Forgets the jobs and parts of rounds before `round`.
    pub(crate) async fn clear_shards(&self, round: u64) {
        match self.db.clear_jobs(round).await {
            Ok(rounds) => {
                for r in rounds {
                    if let Err(e) = self.store.delete_prefix(&round_prefix(r)).await {
                        tracing::warn!(round = r, error = %e, "could not delete a round's aggregation parts");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not forget old aggregation jobs"),
        }
    }
}
