//! Overlapped rounds: the contributor trains round r+1 while round r's pseudo-gradient uploads
//! and round r+1's base checkpoint downloads, so that in steady state the accelerator never
//! waits on the network.
//!
//! The algorithm is a one-round-delayed outer update with an eager local estimate and a
//! correction on arrival, after streaming and eager-update DiLoCo. Write C_r for the hub's base
//! checkpoint of round r and E_r for the weights round r's inner steps end with. Every round
//! submits Δ_r = C_r − E_r, which the hub averages with the others' and applies to C_r with its
//! outer Nesterov step:
//!
//! ```text
//! v_{r+1} = μ·v_r + Δ̄_r          C_{r+1} = C_r − lr·(Δ̄_r + μ·v_{r+1})
//! ```
//!
//! A plain contributor waits for C_{r+1} before round r+1. An overlapped one cannot: the hub
//! publishes C_{r+1} only once round r's submissions are in. So round r+1 starts from an
//! estimate, the same step taken with this contributor's own Δ_r in place of the mean Δ̄_r,
//!
//! ```text
//! S_{r+1} = C_r − lr·(Δ_r + μ·(μ·v_r + Δ_r))
//! ```
//!
//! and as soon as C_{r+1} has arrived (between two inner steps, typically a fifth of the way
//! into the round when a transfer takes a tenth of a round's compute) the weights are moved by
//! the estimate's error, θ ← θ + (C_{r+1} − S_{r+1}); the round's Δ is then measured from
//! C_{r+1}, like a plain contributor's. Only the inner steps before the base arrives see the
//! others' work of round r late. The hub's momentum v_r is not sent anywhere: the contributor
//! reconstructs it from the steps the hub published (each C_{r+1} − C_r gives Δ̄_r once v_r is
//! known, starting from v = 0), so a lone contributor's estimate is exact up to compression.
//! `docs/benchmarks.md` measures what overlap costs in loss over several seeds: alone, nothing
//! beyond the noise; among four contributors on short runs, several percent, all of it from
//! the inner steps trained before the base arrives (each contributor's Δ strays from the mean,
//! so its estimate does too; the strays cancel in the hub's mean only to first order).
//!
//! Round r+1 is trained before the hub has opened it, on the assignment the hub will give: the
//! same slot, inner steps and phase, the next round number and schedule step. When the real
//! assignment arrives and differs (the run grew or finished, or the hub moved on without this
//! contributor), the speculative round's work is dropped and the contributor starts over from
//! the real one, as a non-overlapped contributor would.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tessera_protocol::api::Assignment;
use tessera_protocol::{ErrorCode, TensorSpec};

use tessera_protocol::api::OuterSpec;
use tessera_train::diloco::{read_params, write_params};

use crate::net::{Base, Net};
use crate::{Contributor, ContributorError, Outcome, Packaged, Result, RoundReport, not_admitted};

/// The hub's outer optimizer as this contributor reconstructs it from the bases it receives.
struct OuterTrack {
    spec: OuterSpec,
    /// The hub's momentum after the last step observed (`None`: taken as zero, as at the start
    /// of a run).
    momentum: Option<Vec<Vec<f32>>>,
}

impl OuterTrack {
    fn new(spec: OuterSpec) -> OuterTrack {
        OuterTrack { spec, momentum: None }
    }

    /// Observes the hub's step from `old` to `new`, one round apart: recovers that round's mean
    /// pseudo-gradient and advances the momentum with it.
    fn observe(&mut self, old: &[Vec<f32>], new: &[Vec<f32>]) {
        let OuterSpec { lr, momentum: mu, nesterov } = self.spec;
        let mut v = self.momentum.take().unwrap_or_else(|| old.iter().map(|t| vec![0.0; t.len()]).collect());
        for ((v, o), n) in v.iter_mut().zip(old).zip(new) {
            for ((v, o), n) in v.iter_mut().zip(o).zip(n) {
                let g = (o - n) / lr; // = Δ̄ + μ·v' (Nesterov) or v' (plain), with v' = μ·v + Δ̄
                let mean = if nesterov { (g - mu * mu * *v) / (1.0 + mu) } else { g - mu * *v };
                *v = mu * *v + mean;
            }
        }
        self.momentum = Some(v);
    }

    /// Where the hub's next step takes `base` if the round's mean pseudo-gradient is `delta`.
    fn step(&self, base: &[Vec<f32>], delta: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let OuterSpec { lr, momentum: mu, nesterov } = self.spec;
        base.iter()
            .zip(delta)
            .enumerate()
            .map(|(k, (c, d))| {
                let v = self.momentum.as_ref().map(|v| v[k].as_slice());
                c.iter()
                    .zip(d)
                    .enumerate()
                    .map(|(i, (c, d))| {
                        let v = mu * v.map_or(0.0, |v| v[i]) + d;
                        c - lr * if nesterov { d + mu * v } else { v }
                    })
                    .collect()
            })
            .collect()
    }
}

/// What the transfer thread did for one round.
struct Transfers {
    /// Sending the round's submission.
    sent: Result<Outcome>,
    /// The assignment the hub opened after it (not asked for when sending failed).
    next: Option<Result<Assignment>>,
    /// The cached base, brought to `next`'s checkpoint when that is in the same phase.
    base: Option<Base>,
    bytes_down: u64,
    track: OuterTrack,
    /// ‖C_{r+1} − C_r‖, the hub's step observed, for the debug log (0 when none was, or when
    /// that log is off).
    step_norm: f64,
}

/// The Euclidean distance between two sets of tensors.
fn distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>().sqrt()
}

/// A round whose submission is on its way while the next one trains.
struct InFlight {
    handle: JoinHandle<Transfers>,
    assignment: Assignment,
    /// The unsealed message, in case it must be sealed again.
    plain: Vec<u8>,
    inner_loss: f64,
    train_s: f64,
    bytes_up: u64,
    bytes_down: u64,
}

/// The assignment the hub gives after round `a` when nothing changes: the next round, its
/// schedule step, the same slot, steps, phase and fragment. Its base is not known yet.
/// `data`: the next round's shard, for a run on a published dataset
/// (`data::data_assignment`, a pure function of the spec, the round and the contributor).
fn predict(a: &Assignment, data: Option<tessera_protocol::api::DataAssignment>) -> Assignment {
    let round = a.round + 1;
    let total = a.schedule_total / a.inner_steps.max(1);
    Assignment {
        round,
        base_checkpoint: String::new(),
        schedule_step: round.min(total) * a.inner_steps,
        eval_commitment: None,
        data,
        ..a.clone()
    }
}

/// Whether `real` asks for exactly the work trained for the prediction `p`.
fn as_predicted(p: &Assignment, real: &Assignment) -> bool {
    !real.finished
        && p.run_id == real.run_id
        && p.revision == real.revision
        && (p.round, p.slot, p.seed, p.inner_steps, p.schedule_step, p.schedule_total, p.phase, p.fragment, p.data)
            == (
                real.round,
                real.slot,
                real.seed,
                real.inner_steps,
                real.schedule_step,
                real.schedule_total,
                real.phase,
                real.fragment,
                real.data,
            )
}

/// The first assignment the hub opens after round `submitted` (the hub holds each answer until
/// the round it names closes, or for 20 s).
fn following(net: &Net, submitted: u64) -> Result<Assignment> {
    loop {
        let a = net.assignment()?;
        if a.finished || a.round > submitted {
            return Ok(a);
        }
    }
}

/// What the transfer thread is given: a submission to send and the state to bring forward.
struct Outgoing {
    body: Vec<u8>,
    inner_loss: f64,
    /// The data the submission claims (its assignment's).
    data: Option<tessera_protocol::api::DataAssignment>,
    busy: Option<Duration>,
    round: u64,
    phase: u32,
    base: Option<Base>,
    tensors: Vec<TensorSpec>,
    track: OuterTrack,
}

/// The transfer thread: send round `round`'s submission, wait for the next round, fetch its
/// base and observe the hub's step to it.
fn transfer(net: Net, o: Outgoing) -> Transfers {
    let Outgoing { body, inner_loss, data, busy, round, phase, base, tensors, mut track } = o;
    let sent = net.upload(body, inner_loss, data, busy, false);
    if sent.is_err() {
        return Transfers { sent, next: None, base, bytes_down: 0, track, step_norm: 0.0 };
    }
    match following(&net, round) {
        Ok(a) if !a.finished && a.phase == phase => {
            let old = base.as_ref().filter(|b| b.round + 1 == a.round).map(|b| b.weights.clone());
            match net.ensure_base(base, a.round, &a.base_checkpoint, &tensors) {
                Ok((b, n)) => {
                    let step_norm = match old {
                        Some(old) => {
                            track.observe(&old, &b.weights);
                            if tracing::enabled!(tracing::Level::DEBUG) { distance(&b.weights, &old) } else { 0.0 }
                        }
                        // A gap: the momentum cannot be followed; start again from zero.
                        None => {
                            track.momentum = None;
                            0.0
                        }
                    };
                    Transfers { sent, next: Some(Ok(a)), base: Some(b), bytes_down: n, track, step_norm }
                }
                Err(e) => Transfers { sent, next: Some(Err(e)), base: None, bytes_down: 0, track, step_norm: 0.0 },
            }
        }
        other => Transfers { sent, next: Some(other), base, bytes_down: 0, track, step_norm: 0.0 },
    }
}

/// What became of a round in flight once its transfers were settled.
enum Settled {
    /// The hub opened the round being trained: carry on.
    Confirmed,
    /// It opened another (or none): drop the round being trained and start from this one.
    Restart(Option<Assignment>),
}

/// The round being trained, as far as settling its predecessor's transfers can change it.
struct Training {
    /// Its assignment (predicted until confirmed).
    assignment: Assignment,
    /// The weights it started from: an estimate of its base until the base is in, then the
    /// base, which its Δ is measured from.
    start: Vec<Vec<f32>>,
}

impl Contributor {
    /// [`Contributor::run`] with overlapped rounds (see the module's documentation).
    pub(crate) fn run_overlapped(&mut self, on_round: &mut dyn FnMut(&RoundReport)) -> Result<u64> {
        // Long on purpose: the overlapped loop's states (training, waiting, switching) in one
        // place, so what happens to the transfer thread's results is visible at once.
        if self.config.adversary.is_some() {
            return Err(ContributorError::Data("an adversary's rounds are not overlapped".into()));
        }
        let mut done = 0;
        // An assignment in hand to start from, instead of asking the hub.
        let mut ready: Option<Assignment> = None;
        'start: while self.config.max_rounds.is_none_or(|m| done < m) {
            let a = match ready.take() {
                Some(a) => a,
                None => match self.next_assignment()? {
                    Some(a) => a,
                    None => break,
                },
            };
            let (base, mut bytes_down) =
                self.net.ensure_base(self.base.take(), a.round, &a.base_checkpoint, &self.run.spec.tensors)?;
            let mut now = Training { assignment: a, start: base.weights.clone() };
            self.base = Some(base);
            let mut track = OuterTrack::new(self.run.spec.outer);
            let mut in_flight: Option<InFlight> = None;
            loop {
                let (keep, steps) = self.begin_round(&now.assignment, &now.start)?;
                let (mut loss_sum, mut train_s) = (0.0, 0.0);
                for step in 0..steps {
                    // The round before has landed: settle it now, so that the rest of this
                    // round trains from the hub's real base.
                    if in_flight.as_ref().is_some_and(|f| f.handle.is_finished())
                        && let Some(f) = in_flight.take()
                    {
                        match self.settle(f, &mut now, &mut track, &mut bytes_down, None, &mut done, on_round)? {
                            Settled::Confirmed => tracing::debug!(step, steps, "the base arrived mid-round"),
                            Settled::Restart(next) => {
                                ready = next;
                                continue 'start;
                            }
                        }
                    }
                    let began = Instant::now();
                    loss_sum += self.inner_step(step)?;
                    train_s += began.elapsed().as_secs_f64();
                }
                let inner_loss = loss_sum / steps.max(1) as f64;
                if let Some(f) = in_flight.take() {
                    let waiting = Instant::now();
                    match self.settle(f, &mut now, &mut track, &mut bytes_down, Some(waiting), &mut done, on_round)? {
                        Settled::Confirmed => {}
                        Settled::Restart(next) => {
                            ready = next;
                            continue 'start;
                        }
                    }
                }
                if self.config.max_rounds.is_some_and(|m| done >= m) {
                    break 'start;
                }
                // `now` is the hub's own round, `self.base` holds its base C_r and `now.start`
                // is C_r too: Δ_r is measured from the base the hub applies it to.
                let current = now.assignment.clone();
                let base = self.base.take().ok_or_else(|| ContributorError::Data("no base weights".into()))?;
                let packaged = self.package(&current, &keep, &now.start);
                let Packaged { plain, body, deltas } = match packaged {
                    Ok(p) => p,
                    Err(e) => {
                        self.base = Some(base);
                        return Err(e);
                    }
                };
                // S_{r+1}: the hub's next step from C_r, estimated with this contributor's Δ_r.
                let next_start = track.step(&base.weights, &deltas);
                self.base = Some(base);
                self.save_state()?;
                let bytes_up = body.len() as u64;
                let total = current.schedule_total / current.inner_steps.max(1);
                let last = current.round + 1 >= total || self.config.max_rounds.is_some_and(|m| done + 1 >= m);
                if last {
                    // Nothing left to train ahead: send it and finish as usual.
                    let sent = self.upload(&current, body, inner_loss);
                    let outcome = self.resend_if_resealed(&current, &plain, inner_loss, sent)?;
                    self.mark_submitted(current.round)?;
                    done += 1;
                    on_round(&RoundReport {
                        round: current.round,
                        inner_loss,
                        bytes_up,
                        bytes_down,
                        outcome,
                        train_s,
                        waited_s: None,
                    });
                    continue 'start;
                }
                // Uploads from the transfer thread report progress too: beside the training's.
                let net = self.net.clone();
                let outgoing = Outgoing {
                    body,
                    inner_loss,
                    data: current.data,
                    busy: self.busy_patience(),
                    round: current.round,
                    phase: current.phase,
                    base: self.base.take(),
                    tensors: self.run.spec.tensors.clone(),
                    // Back with the transfers, having observed the hub's next step.
                    track: std::mem::replace(&mut track, OuterTrack::new(self.run.spec.outer)),
                };
                let handle = std::thread::Builder::new()
                    .name("transfers".into())
                    .spawn(move || transfer(net, outgoing))
                    .map_err(|e| ContributorError::Data(format!("could not start the transfer thread: {e}")))?;
                in_flight = Some(InFlight {
                    handle,
                    assignment: current.clone(),
                    plain,
                    inner_loss,
                    train_s,
                    bytes_up,
                    bytes_down,
                });
                bytes_down = 0;
                now = Training {
                    assignment: predict(
                        &current,
                        tessera_protocol::data::data_assignment(
                            &self.run.spec,
                            current.round + 1,
                            self.identity.contributor_id,
                        ),
                    ),
                    start: next_start,
                };
            }
        }
        Ok(done)
    }

    /// Takes in the transfers of the round before `now`: reports that round, then checks that
    /// the hub opened the round `now` trains. If so, moves the weights by the estimate's error
    /// (the hub's base minus the estimated start), so that the rest of the round trains from
    /// the real base and its Δ is measured from it. `waiting`: when training began to wait for
    /// them (at the round's end), if it did.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        f: InFlight,
        now: &mut Training,
        track: &mut OuterTrack,
        bytes_down: &mut u64,
        waiting: Option<Instant>,
        done: &mut u64,
        on_round: &mut dyn FnMut(&RoundReport),
    ) -> Result<Settled> {
        let t = f.handle.join().map_err(|_| ContributorError::Data("the transfer thread panicked".into()))?;
        self.base = t.base;
        *track = t.track;
        let outcome = self.resend_if_resealed(&f.assignment, &f.plain, f.inner_loss, t.sent)?;
        self.mark_submitted(f.assignment.round)?;
        let next = match t.next {
            Some(n) => n,
            None => following(&self.net, f.assignment.round),
        };
        let next = match next {
            Err(ContributorError::Hub(tessera_client::ClientError::Refused { error: e, .. }))
                if e.code == ErrorCode::NotQualified =>
            {
                not_admitted(&e);
                None
            }
            other => Some(other?),
        };
        let confirmed = next.as_ref().is_some_and(|n| as_predicted(&now.assignment, n));
        *bytes_down += t.bytes_down;
        if let Some(n) = next.as_ref().filter(|_| confirmed) {
            now.assignment.base_checkpoint.clone_from(&n.base_checkpoint);
            now.assignment.eval_commitment.clone_from(&n.eval_commitment);
            let (base, got) =
                self.net.ensure_base(self.base.take(), n.round, &n.base_checkpoint, &self.run.spec.tensors)?;
            *bytes_down += got;
            if tracing::enabled!(tracing::Level::DEBUG) && t.step_norm > 0.0 {
                tracing::debug!(
                    round = n.round,
                    relative_error = distance(&base.weights, &now.start) / t.step_norm,
                    "the base arrived; the estimate was off by ‖C − S‖ / ‖C − C_prev‖"
                );
            }
            // θ ← θ + (C_r − S_r), and Δ_r will be measured from C_r.
            let mut weights = read_params(&self.trainer.model)?;
            for ((w, c), s) in weights.iter_mut().zip(&base.weights).zip(&now.start) {
                for ((w, c), s) in w.iter_mut().zip(c).zip(s) {
                    *w += c - s;
                }
            }
            write_params(&self.trainer.model, &weights)?;
            now.start.clone_from(&base.weights);
            self.base = Some(base);
        }
        *done += 1;
        on_round(&RoundReport {
            round: f.assignment.round,
            inner_loss: f.inner_loss,
            bytes_up: f.bytes_up,
            bytes_down: f.bytes_down,
            outcome,
            train_s: f.train_s,
            waited_s: Some(waiting.map_or(0.0, |w| w.elapsed().as_secs_f64())),
        });
        match next {
            Some(_) if confirmed => Ok(Settled::Confirmed),
            Some(n) if n.finished => {
                tracing::info!("the run has finished");
                Ok(Settled::Restart(None))
            }
            Some(n) => {
                tracing::warn!(
                    trained_round = now.assignment.round,
                    trained_phase = now.assignment.phase,
                    opened_round = n.round,
                    opened_phase = n.phase,
                    "the hub opened another round than the one trained ahead: that work is dropped"
                );
                if n.phase != self.run.phase {
                    self.switch_phase()?;
                }
                Ok(Settled::Restart(Some(n)))
            }
            None => Ok(Settled::Restart(None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(round: u64) -> Assignment {
        Assignment {
            run_id: "run".into(),
            finished: false,
            round,
            base_checkpoint: format!("base{round}"),
            slot: 3,
            seed: 7,
            inner_steps: 10,
            schedule_step: round * 10,
            schedule_total: 50,
            eval_commitment: Some(format!("c{round}")),
            phase: 0,
            fragment: None,
            data: None,
            revision: 0,
        }
    }

    /// The prediction is what the hub assigns next when nothing changes, and anything else the
    /// hub might say (finished, another round, phase or fragment) is told apart.
    #[test]
    fn predictions_match_the_next_assignment_and_nothing_else() {
        let p = predict(&assignment(2), None);
        assert!(as_predicted(&p, &assignment(3)));
        assert!(!as_predicted(&p, &assignment(4)), "the hub moved past the round trained ahead");
        assert!(!as_predicted(&p, &Assignment { finished: true, ..assignment(3) }));
        assert!(!as_predicted(&p, &Assignment { phase: 1, ..assignment(3) }));
        assert!(!as_predicted(&p, &Assignment { fragment: Some(1), ..assignment(3) }));
        assert!(!as_predicted(&p, &Assignment { slot: 4, ..assignment(3) }));
        assert!(!as_predicted(&p, &Assignment { revision: 1, ..assignment(3) }));
        let shard = tessera_protocol::api::DataAssignment { slot: 2, epoch: 0, shard: 5, source: 0 };
        assert!(!as_predicted(&p, &Assignment { data: Some(shard), ..assignment(3) }));
        assert!(as_predicted(
            &predict(&assignment(2), Some(shard)),
            &Assignment { data: Some(shard), ..assignment(3) }
        ));
        // The schedule step stops at the run's end, as the hub's does.
        assert_eq!(predict(&assignment(5), None).schedule_step, 50);
    }

    /// Following the hub's published steps, the contributor's copy of the outer optimizer
    /// predicts the hub's next weights exactly when its Δ is the round's mean, with Nesterov
    /// or plain momentum, from the run's start.
    #[test]
    fn the_reconstructed_outer_step_is_the_hubs() {
        use tessera_aggregate::{OuterConfig, OuterOptimizer};
        for nesterov in [true, false] {
            let spec = OuterSpec { lr: 0.7, momentum: 0.9, nesterov };
            let mut hub = OuterOptimizer::new(OuterConfig { lr: 0.7, momentum: 0.9, nesterov }, &[3, 2]);
            let mut track = OuterTrack::new(spec);
            let mut weights = vec![vec![0.5f32, -1.0, 2.0], vec![0.25, 1.5]];
            for round in 0..8 {
                let mean: Vec<Vec<f32>> = weights
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        t.iter().enumerate().map(|(j, _)| ((round * 7 + i * 3 + j) % 5) as f32 * 0.01 - 0.02).collect()
                    })
                    .collect();
                let predicted = track.step(&weights, &mean);
                let old = weights.clone();
                hub.step_to(&mut weights, &mean).unwrap();
                for (p, w) in predicted.iter().flatten().zip(weights.iter().flatten()) {
                    assert!((p - w).abs() < 1e-5, "round {round}, nesterov {nesterov}: predicted {p}, hub {w}");
                }
                track.observe(&old, &weights);
            }
        }
    }
}
