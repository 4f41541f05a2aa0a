//! Closing and publishing rounds: the clock's tick (deadlines, overdue scores, a closed round
//! left over from a restart), and `finish`: the core's plan, the aggregation arithmetic
//! (`tessera_aggregate::round`) off the async workers, growth at a phase boundary, the
//! round's outputs in the store, then one transaction, then the core applies it.
//!
//! Cost per round for N submissions of P parameters: under the plain mean (unscored,
//! unsealed) nothing is read back, the sum was taken as they arrived (`running`); otherwise N
//! blob reads, one at a time for the mean-family rules (see `tessera_aggregate::round`); then
//! three writes of O(P) bytes and one transaction of O(N) rows.

use std::sync::Arc;

use bytes::Bytes;
use tessera_aggregate::AggregateError;
use tessera_aggregate::round::{Input, Mean, OuterState, grow, mean, step};
use tessera_aggregate::shard;
use tessera_protocol::{Aggregation, weights_hash};
use tessera_round::{Event, Judgement, Outcome, Plan, Tick};
use tessera_trust::ledger::Ledger;

use crate::HubError;
use crate::db::{Seed, Written};
use crate::governance::Steer;
use crate::hub::{Hub, Live, now_ms};
use crate::pieces::Submissions;
use crate::store::{ReadAhead, checkpoint_key, outer_key, submission_key, update_key};

/// What a sealed round's verdict brings besides its judgement.
#[derive(Default)]
pub(crate) struct Sealed {
    /// The validator's aggregate Δ̄.
    pub mean: Option<Vec<Vec<f32>>>,
    /// Its ledger entries (`(seq, hex)`) and the ledger with them.
    pub ledger: Vec<(u64, String)>,
    pub next: Option<Ledger>,
}

impl Hub {
    /// Whether the current round's mean is summed as its submissions arrive: an unscored,
    /// unsealed, unsharded run under the plain mean, whose weights are known on arrival.
    pub(crate) fn sums_on_arrival(&self, live: &Live) -> bool {
        let spec = self.spec();
        self.aggregate_shards == 0
            && spec.contest.is_none()
            && spec.trust.is_none()
            && spec.fragments <= 1
            && live.run.current().aggregation == tessera_protocol::Aggregation::Mean
    }

    /// What the clock asks for: closes a round whose deadline passed, aggregates unscored a
    /// round whose scores are overdue (or an unscored round left closed), after catching up
    /// with other replicas. Called periodically by [`crate::serve`].
    pub async fn tick(&self) -> Result<(), HubError> {
        let mut live = self.live.lock().await;
        let scored = self.spec().contest.is_some();
        // A close is applied before the round is finished, so at most two steps (and a retry
        // whenever another replica decided meanwhile).
        let mut steps = 0;
        while steps < 2 {
            steps += 1;
            self.sync(&mut live).await?;
            // A round scored in tasks may settle by waiting (a check nobody delivered).
            if scored && live.run.closed().is_some() && self.settle_tasks(&mut live).await? {
                break;
            }
            match live.run.tick(now_ms()) {
                Some(Tick::Close(event)) => {
                    let Event::Closed { round, closed } = &event else {
                        return Err(HubError::Corrupt("the clock closed nothing".into()));
                    };
                    match self.db.close_round(*round, closed, scored, live.seq).await? {
                        Written::At(seq) => {
                            live.run.apply(&event)?;
                            live.seq = seq;
                            tracing::info!(round, closed_by = %closed.closed_by, "submissions closed");
                        }
                        _ => steps -= 1,
                    }
                }
                Some(Tick::Finish { closed_by }) => {
                    if scored {
                        tracing::warn!(round = live.run.round(), "no scores arrived in time; aggregating unscored");
                    }
                    self.finish(&mut live, Judgement::Unscored, &closed_by, Sealed::default()).await?;
                    break;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Judges, aggregates and publishes the closed round.
    pub(crate) async fn finish(
        &self,
        live: &mut Live,
        judgement: Judgement<'_>,
        closed_by: &str,
        sealed: Sealed,
    ) -> Result<(), HubError> {
        let plan = live.run.plan(judgement, closed_by).map_err(|e| HubError::Corrupt(e.message))?;
        let round = plan.round;
        // One replica aggregates a round; should it die, its claim goes with its connection
        // and the next replica's clock takes the round over.
        let Some(_claim) = self.db.claim_round(round).await? else {
            tracing::debug!(round, "another replica is aggregating this round");
            return Ok(());
        };
        // With aggregation workers, they do the round (unless it is given whole, or grows).
        let workers = self.aggregate_shards > 0
            && sealed.mean.is_none()
            && self.spec().trust.is_none()
            && plan.next_phase.is_none();
        let by_workers = if workers { self.aggregate_by_workers(live, &plan).await? } else { None };
        let (hash, used, weight, state) = match by_workers {
            Some(done) => (done.hash, done.used, done.weight, None),
            None => {
                let (hash, used, weight, state) = self.aggregate_here(live, &plan, sealed.mean).await?;
                (hash, used, weight, Some(state))
            }
        };
        let seed = match (plan.finished, self.spec().trust.is_some()) {
            (true, _) => None,
            // A sealed run's next round waits for its validator's commitment.
            (false, true) => Some(Seed::from_validator()),
            (false, false) => Some(Seed::fresh()?),
        };
        let outcome = Outcome { result_checkpoint: hash.clone(), used, weight };
        let next_phase = plan.next_phase;
        let (event, steer) = loop {
            let event =
                live.run.publish(plan.clone(), outcome.clone(), now_ms(), seed.as_ref().map(|s| s.commitment.clone()));
            let Event::Published(publication) = &event else {
                return Err(HubError::Corrupt("publishing gave no publication".into()));
            };
            // A steered run's proposals, votes, tallies and changes due at this boundary, on
            // top of the round's own ledger entries.
            // Once the run is over no vote can apply: nothing is written for it.
            let steer = match &sealed.next {
                _ if plan.finished => Steer::default(),
                Some(base) => self.steer(live, base, round + 1, &hash).await?,
                None => {
                    let base = self.trust.read().map(|t| t.ledger.clone());
                    let base = base.map_err(|_| HubError::Corrupt("trust poisoned".into()))?;
                    self.steer(live, &base, round + 1, &hash).await?
                }
            };
            let rows: Vec<(u64, String)> = sealed.ledger.iter().chain(&steer.rows).cloned().collect();
            match self.db.publish(publication, seed.as_ref(), &rows, &steer.steered, live.seq).await? {
                Written::At(seq) => {
                    live.seq = seq;
                    break (event, steer);
                }
                _ => {
                    // Another replica decided meanwhile: publish on the newer state, unless the
                    // round is no longer this one to publish.
                    self.sync(live).await?;
                    if live.run.round() != round || live.run.closed().is_none() {
                        tracing::info!(round, "another replica published this round");
                        return Ok(());
                    }
                }
            }
        };
        // Committed: now the state moves.
        if let Some(next) = steer.next.or(sealed.next)
            && let Ok(mut t) = self.trust.write()
        {
            t.ledger = next;
        }
        live.run.apply(&event)?;
        if let Some(spec) = steer.spec {
            live.run.steer(spec)?;
            self.set_spec(live.run.spec());
            tracing::info!(round = round + 1, "the run's spec changed by its holders' vote");
        }
        live.outer = state.map(Arc::new);
        if self.aggregate_shards > 0 {
            self.clear_shards(round + 1).await;
        }
        live.sealed_mean = None;
        if let Some(next) = next_phase {
            tracing::info!(
                phase = next,
                name = %self.spec().phases[next - 1].name,
                params = live.run.current().num_params(),
                members = ?live.run.members(),
                "the run grew into its next phase"
            );
        }
        self.round_tx.send_replace(round + 1);
        tracing::info!(round, closed_by, submissions = used, checkpoint = %hash, finished = live.run.finished(), "round published");
        metrics::counter!("tessera_hub_rounds_published_total").increment(1);
        metrics::gauge!("tessera_hub_round").set((round + 1) as f64);
        Ok(())
    }

    /// Aggregates the closed round in this process (its mean, the outer step, growth at a
    /// phase's end) and stores what publishing it names; returns the checkpoint's hash, the
    /// submissions used, their weight and the new outer state.
    async fn aggregate_here(
        &self,
        live: &mut Live,
        plan: &Plan,
        given: Option<Vec<Vec<f32>>>,
    ) -> Result<(String, u64, f64, OuterState), HubError> {
        let (round, current) = (plan.round, live.run.current().clone());
        let mean = self.round_mean(live, plan, given).await?;
        let started = std::time::Instant::now();
        let mut base = [0u8; 32];
        hex::decode_to_slice(live.run.checkpoint(), &mut base)
            .map_err(|e| HubError::Corrupt(format!("base checkpoint: {e}")))?;
        let (run_id, state) = (live.run.run_id(), self.outer(live).await?);
        let spec_now = current.clone();
        let delta = mean.mean;
        let mut agg = tokio::task::spawn_blocking(move || step(&spec_now, run_id, round, base, &state, &delta))
            .await
            .map_err(|e| HubError::Corrupt(format!("aggregation task failed: {e}")))??;
        if agg.held {
            tracing::error!(round, "the outer step would leave non-finite weights: the round holds them instead");
        }
        metrics::histogram!("tessera_hub_aggregation_seconds").record(started.elapsed().as_secs_f64());
        // The last round of a phase publishes the next phase's model: grown, the same function.
        if let Some(next) = plan.next_phase {
            if plan.early {
                tracing::info!(round, loss = ?plan.target_loss, "the phase reached its loss target: growing early");
            }
            let grower = self.grower.clone().ok_or_else(|| {
                HubError::Config(format!("the run grows into phase {next} but this hub has no grower"))
            })?;
            let (from, to) = (current.clone(), self.spec().at_phase(next));
            let seed = self.spec().phases[next - 1].seed;
            agg = tokio::task::spawn_blocking(move || grow(agg, grower.as_ref(), &from, &to, seed))
                .await
                .map_err(|e| HubError::Corrupt(format!("growth task failed: {e}")))??;
        }
        let hash = hex::encode(weights_hash(&agg.weights_bytes));
        self.store.put(&checkpoint_key(&hash), Bytes::from(std::mem::take(&mut agg.weights_bytes))).await?;
        self.store.put(&update_key(round + 1), Bytes::from(std::mem::take(&mut agg.update_bytes))).await?;
        self.store.put(&outer_key(round + 1), Bytes::from(std::mem::take(&mut agg.outer_bytes))).await?;
        Ok((hash, mean.used, mean.weight, agg.state))
    }

    /// The round's Δ̄: a sealed run's from its validator (zeros if nobody settled it: the hub
    /// cannot read it), the sum taken as the submissions arrived where there is one, else the
    /// run's rule over the stored submissions with a weight: the mean read back one at a time,
    /// a robust rule a piece of each at a time (never all of them whole).
    async fn round_mean(&self, live: &Live, plan: &Plan, given: Option<Vec<Vec<f32>>>) -> Result<Mean, HubError> {
        let lengths = live.run.lengths();
        let used = plan.weights.iter().filter(|&&w| w > 0.0).count() as u64;
        let weight = plan.weights.iter().sum();
        if let Some(m) = given {
            return Ok(Mean::given(m, weight, used));
        }
        if self.spec().trust.is_some() {
            return Ok(Mean::given(lengths.iter().map(|&n| vec![0.0; n]).collect(), weight, used));
        }
        let rows: Vec<(&tessera_round::Accepted, f64)> =
            plan.rows.iter().zip(plan.weights.iter().copied()).filter(|(_, w)| *w > 0.0).collect();
        let rule = live.run.current().aggregation;
        if self.sums_on_arrival(live) {
            if let Some(running) = self.summer.take(plan.round, rows.len()).await {
                tracing::debug!(
                    round = plan.round,
                    submissions = rows.len(),
                    "the mean was summed as submissions arrived"
                );
                return Ok(running.finish()?);
            }
            tracing::info!(round = plan.round, "no sum taken on arrival (a restart mid-round): reading the round back");
        }
        let inputs: Vec<Input> = rows
            .iter()
            .map(|(row, w)| Input {
                weight: *w as f32,
                carries: (self.spec().fragments > 1).then(|| live.run.carried(row.contributor)),
            })
            .collect();
        let keys: Vec<String> = rows.iter().map(|(row, _)| submission_key(&row.blob)).collect();
        let mean = if rule == Aggregation::Mean || self.spec().fragments > 1 {
            self.read_back(&rule, lengths, inputs, keys, rows.iter().map(|(row, _)| row.bytes).max()).await?
        } else {
            let unit = live.run.current().codec.unit() as usize;
            self.pieced(&rule, lengths, inputs, keys, unit).await?
        };
        for (k, e) in &mean.left_out {
            tracing::error!(submission = k, error = %e, "a stored submission cannot be read or decoded; aggregated without it");
        }
        if let Some(r) = &mean.robust {
            tracing::info!(rule = %rule, clipped = r.clipped, radius = ?r.radius, "robust aggregation");
        }
        Ok(mean)
    }

    /// The weighted mean of the stored submissions (`keys`), read back whole one at a time, a
    /// few ahead of the sum (each at most `largest` bytes).
    async fn read_back(
        &self,
        rule: &Aggregation,
        lengths: Vec<usize>,
        inputs: Vec<Input>,
        keys: Vec<String>,
        largest: Option<u64>,
    ) -> Result<Mean, HubError> {
        let (store, runtime, rule) = (self.store.clone(), tokio::runtime::Handle::current(), *rule);
        // The blobs are read in order, a few ahead of the rule on a blocking thread; a rule
        // that starts over (a blob left out) reads again directly.
        let largest = largest.unwrap_or(1);
        let reads = keys.clone().into_iter().map({
            let store = store.clone();
            move |key| {
                let store = store.clone();
                async move { store.get(&key).await.map_err(|e| format!("{key}: {e}")) }
            }
        });
        let ahead = ReadAhead::start(reads, largest);
        let mean = tokio::task::spawn_blocking(move || {
            let next = std::cell::Cell::new(0usize);
            let load = |k: usize| {
                let read = if k == next.get() {
                    next.set(k + 1);
                    ahead.blocking_next()
                } else {
                    next.set(usize::MAX);
                    runtime.block_on(store.get(&keys[k])).map_err(|e| format!("{}: {e}", keys[k]))
                };
                read.map_err(AggregateError::Unreadable)
            };
            mean(&rule, &lengths, &inputs, load)
        })
        .await
        .map_err(|e| HubError::Corrupt(format!("aggregation task failed: {e}")))??;
        Ok(mean)
    }

    /// A robust rule over the stored submissions (`keys`), a piece of each at a time, every
    /// stage of the rule reading them again ([`shard::whole`]).
    async fn pieced(
        &self,
        rule: &Aggregation,
        lengths: Vec<usize>,
        inputs: Vec<Input>,
        keys: Vec<String>,
        unit: usize,
    ) -> Result<Mean, HubError> {
        let submissions = Arc::new(Submissions::open(&self.store, keys, inputs.clone()).await);
        let (store, rule, budget) = (self.store.clone(), *rule, self.aggregate_memory);
        let stages = shard::stages(&rule, false);
        let reading = submissions.clone();
        let mean = tokio::task::spawn_blocking(move || {
            let start = |active: &[usize], pieces: &[shard::Piece]| {
                let reads = reading.read(&store, pieces.to_vec(), active.to_vec(), stages);
                move |k: usize, p: &shard::Piece| reads.next(k, p)
            };
            shard::whole(&rule, &lengths, &inputs, (unit, budget), start)
        })
        .await
        .map_err(|e| HubError::Corrupt(format!("aggregation task failed: {e}")))?;
        // A submission left out because the store failed for a while is not left out: the
        // round is aggregated again once the store answers.
        if submissions.transient_failure() {
            return Err(HubError::Unavailable("the store failed while the round was read".into()));
        }
        mean.map_err(HubError::from)
    }
}
