//! AdamW with decoupled weight decay (Loshchilov & Hutter), warmup + cosine learning rate, and
//! global-norm gradient clipping. The optimizer state is plain named tensors so that it can be
//! checkpointed exactly and a resumed run continues bit for bit.

use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled: each step multiplies matrices by `1 - lr · weight_decay`. Vectors (the norm
    /// gains) are not decayed.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    /// Each parameter's moments: views of their group's flat moments, or its own tensors.
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// The parameters updated as flat tensors (matrices, which decay, and the rest).
    groups: Vec<Group>,
    /// Number of updates applied so far.
    pub step: u64,
}

/// Parameters of one kind on one device whose storage is one flat tensor (each parameter a
/// view of it), with flat moments beside it and, from the first step on, their gradients in one
/// flat tensor too (backward accumulates into them in place): a step is a dozen whole-tensor
/// operations instead of a dozen per parameter (a few thousand kernel launches on a GPU for
/// `phase1`), computing, element by element, exactly what the per-parameter update computes.
struct Group {
    /// Indices into `params`, in order, and each one's offset in the flat tensors.
    members: Vec<usize>,
    offsets: Vec<i64>,
    decay: bool,
    flat: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The members' gradients (undefined until the first step gathers them).
    grad: Tensor,
}

impl Group {
    /// The members' gradients as one flat tensor: the one they already live in, or (the first
    /// time, or if autograd replaced one) gathered into a new one that they then live in.
    /// `None` when a member has no gradient.
    fn flat_grad(&mut self, params: &[(String, Tensor)]) -> Option<Tensor> {
        let grads: Vec<Tensor> = self.members.iter().map(|&i| params[i].1.grad()).collect();
        if grads.iter().any(|g| !g.defined()) {
            return None;
        }
        let adopted = self.grad.defined()
            && grads.iter().zip(&self.offsets).all(|(g, &o)| g.data_ptr() == self.grad.narrow(0, o, 1).data_ptr());
        if !adopted {
            let parts: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
            self.grad = Tensor::cat(&parts, 0);
            for (mut g, &o) in grads.into_iter().zip(&self.offsets) {
                let shape = g.size();
                g.set_data(&self.grad.narrow(0, o, g.numel() as i64).view(shape.as_slice()));
            }
        }
        Some(self.grad.shallow_clone())
    }
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> AdamW {
        let mut exp_avg: Vec<Tensor> = params.iter().map(|_| Tensor::new()).collect();
        let mut exp_avg_sq: Vec<Tensor> = params.iter().map(|_| Tensor::new()).collect();
        let mut groups = Vec::new();
        for decay in [true, false] {
            let members: Vec<usize> = (0..params.len()).filter(|&i| (params[i].1.dim() >= 2) == decay).collect();
            let Some(&first) = members.first() else { continue };
            let (kind, device) = (params[first].1.kind(), params[first].1.device());
            if members.iter().any(|&i| params[i].1.kind() != kind || params[i].1.device() != device) {
                continue; // Mixed: each parameter on its own (below).
            }
            let total: i64 = members.iter().map(|&i| params[i].1.numel() as i64).sum();
            let flat = Tensor::empty([total], (kind, device));
            let (m, v) = (flat.zeros_like(), flat.zeros_like());
            let mut offset = 0;
            let mut offsets = Vec::with_capacity(members.len());
            tch::no_grad(|| {
                for &i in &members {
                    offsets.push(offset);
                    let p = &params[i].1;
                    let n = p.numel() as i64;
                    let shape = p.size();
                    flat.narrow(0, offset, n).copy_(&p.reshape([-1]));
                    // The parameter now lives in the flat tensor (every handle to it too).
                    let mut handle = p.shallow_clone();
                    handle.set_data(&flat.narrow(0, offset, n).view(shape.as_slice()));
                    exp_avg[i] = m.narrow(0, offset, n).view(shape.as_slice());
                    exp_avg_sq[i] = v.narrow(0, offset, n).view(shape.as_slice());
                    offset += n;
                }
            });
            groups.push(Group { members, offsets, decay, flat, exp_avg: m, exp_avg_sq: v, grad: Tensor::new() });
        }
        for (i, (_, p)) in params.iter().enumerate() {
            if !exp_avg[i].defined() {
                exp_avg[i] = p.zeros_like();
                exp_avg_sq[i] = p.zeros_like();
            }
        }
        AdamW { config, params, exp_avg, exp_avg_sq, groups, step: 0 }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// The global L2 norm of the gradients, left on the device (reading it is a host sync);
    /// `None` without gradients.
    pub fn grad_norm(&self) -> Option<Tensor> {
        tch::no_grad(|| {
            let norms: Vec<Tensor> =
                self.params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).map(|g| g.norm()).collect();
            (!norms.is_empty()).then(|| Tensor::stack(&norms, 0).norm())
        })
    }

    /// The factor that brings gradients of global norm `norm` to at most `max_norm` (1 when
    /// they are within it, or the norm is not finite).
    pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
        if norm.is_finite() && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 }
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale_grads(&mut self, factor: f64) {
        if factor == 1.0 {
            return;
        }
        tch::no_grad(|| {
            for (_, p) in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(factor);
                }
            }
        });
    }

    /// One AdamW update at learning rate `lr`: each group whose parameters all have gradients as
    /// flat tensors (their gradients gathered into one), everything else parameter by
    /// parameter (e.g. a layer-sharded contributor's frozen layers have none).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = Update::new(self.config, self.step, lr);
        tch::no_grad(|| {
            let mut done = vec![false; self.params.len()];
            for g in &mut self.groups {
                let Some(grad) = g.flat_grad(&self.params) else { continue };
                c.apply(&mut g.flat, &mut g.exp_avg, &mut g.exp_avg_sq, &grad, g.decay);
                g.members.iter().for_each(|&i| done[i] = true);
            }
            for (i, (((_, p), m), v)) in
                self.params.iter_mut().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq).enumerate()
            {
                let g = p.grad();
                if done[i] || !g.defined() {
                    continue;
                }
                let decay = p.dim() >= 2;
                c.apply(p, m, v, &g, decay);
            }
        });
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`), for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (((name, _), m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            out.push((format!("exp_avg.{name}"), m.shallow_clone()));
            out.push((format!("exp_avg_sq.{name}"), v.shallow_clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`]; `get` looks a tensor up by name.
    pub fn load_state(&mut self, step: u64, mut get: impl FnMut(&str) -> Option<Tensor>) -> Result<(), String> {
        for (((name, p), m), v) in self.params.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
            for (prefix, slot) in [("exp_avg", &mut *m), ("exp_avg_sq", &mut *v)] {
                let key = format!("{prefix}.{name}");
                let t = get(&key).ok_or_else(|| format!("missing optimizer tensor {key}"))?;
                if t.size() != p.size() {
                    return Err(format!("optimizer tensor {key} has shape {:?}, expected {:?}", t.size(), p.size()));
                }
                tch::no_grad(|| slot.copy_(&t.to_device(p.device())));
            }
        }
        self.step = step;
        Ok(())
    }
}

/// One AdamW update's constants, applied to a parameter (or a flat group of them) in place.
struct Update {
    lr: f64,
    decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    bias1: f64,
    bias2_sqrt: f64,
}

impl Update {
    fn new(config: AdamWConfig, step: u64, lr: f64) -> Update {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = config;
        Update {
            lr,
            decay: weight_decay,
            beta1,
            beta2,
            eps,
            bias1: 1.0 - beta1.powi(step as i32),
            bias2_sqrt: (1.0 - beta2.powi(step as i32)).sqrt(),
        }
    }

    fn apply(&self, p: &mut Tensor, m: &mut Tensor, v: &mut Tensor, g: &Tensor, decays: bool) {
        if self.decay != 0.0 && decays {
            let _ = p.g_mul_scalar_(1.0 - self.lr * self.decay);
        }
        let _ = m.lerp_(g, 1.0 - self.beta1);
        let _ = v.g_mul_scalar_(self.beta2).addcmul_(&(g * (1.0 - self.beta2)), g);
        let denom = (v.sqrt() / self.bias2_sqrt).g_add_scalar_(self.eps);
        let _ = p.addcdiv_(&(&*m * (-self.lr / self.bias1)), &denom);
    }
}

/// Learning rate at `step` (0-based): linear warmup over `warmup` steps to `max_lr`, then cosine
/// decay to `min_lr` at `total` steps, flat after.
pub fn lr_at(step: u64, max_lr: f64, min_lr: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return max_lr * (step + 1) as f64 / warmup as f64;
    }
    if step >= total || total <= warmup {
        return min_lr;
    }
    let progress = (step - warmup) as f64 / (total - warmup) as f64;
    min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (max_lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((lr_at(0, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 1.0, 0.1, 10, 100) - 0.55).abs() < 1e-12);
        assert!((lr_at(100, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        assert!(lr_at(30, 1.0, 0.1, 10, 100) > lr_at(31, 1.0, 0.1, 10, 100));
    }

    /// Matches the closed form of one AdamW step: p ← p(1 - lr·wd) - lr·sign(g) (first step,
    /// eps → 0, since m̂ = g and v̂ = g²).
    #[test]
    fn first_step_is_decayed_sign_descent() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0, 0.5]).view([2, 2]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[2.0f32, -3.0, 0.5, 4.0]).view([2, 2])).sum(Kind::Float);
        loss.backward();
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], AdamWConfig { eps: 0.0, ..Default::default() });
        opt.step(0.1);
        let want = Tensor::from_slice(&[1.0f32 * 0.99 - 0.1, -2.0 * 0.99 + 0.1, 3.0 * 0.99 - 0.1, 0.5 * 0.99 - 0.1])
            .view([2, 2]);
        assert!(p.allclose(&want, 1e-6, 1e-6, false), "{p:?}");
    }

    /// The flat update (parameters stored in one tensor per group) computes bit for bit what
    /// the update of each parameter alone computes, keeps each parameter's shape and identity,
    /// and falls back to parameter by parameter when one of a group has no gradient.
    #[test]
    fn the_flat_update_is_the_per_parameter_update() {
        let make = || -> Vec<(String, Tensor)> {
            tch::manual_seed(3);
            vec![
                ("a".into(), Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
                ("b".into(), Tensor::randn([5], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
                ("c".into(), Tensor::randn([2, 2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
                ("d".into(), Tensor::randn([7], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
            ]
        };
        let config = AdamWConfig::default();
        let params = make();
        let handles: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let mut opt = AdamW::new(params, config);
        assert_eq!(opt.groups.len(), 2);
        let reference: Vec<Tensor> = make().into_iter().map(|(_, p)| p.detach().copy()).collect();
        let mut m: Vec<Tensor> = reference.iter().map(Tensor::zeros_like).collect();
        let mut v: Vec<Tensor> = reference.iter().map(Tensor::zeros_like).collect();
        let mut reference = reference;
        for step in 1..=3u64 {
            // The same loss of both: Σ w·p², so every gradient differs from step to step.
            let loss = handles.iter().enumerate().map(|(k, p)| (p * p).sum(Kind::Float) * (k + 1) as f64);
            let loss = loss.reduce(|a, b| a + b).unwrap();
            loss.backward();
            let lr = 0.01 * step as f64;
            let grads: Vec<Tensor> = reference.iter().enumerate().map(|(k, p)| p * 2.0 * (k + 1) as f64).collect();
            opt.step(lr);
            opt.zero_grad();
            let c = Update::new(config, step, lr);
            tch::no_grad(|| {
                for k in 0..reference.len() {
                    let decays = reference[k].dim() >= 2;
                    c.apply(&mut reference[k], &mut m[k], &mut v[k], &grads[k], decays);
                }
            });
        }
        for (k, (p, r)) in handles.iter().zip(&reference).enumerate() {
            assert_eq!(p.size(), r.size());
            assert!(p.equal(r), "parameter {k} differs from the per-parameter update");
        }
        // Backward accumulated into the group's flat gradient in place (gathered only once).
        let flat_grad = opt.groups[0].grad.narrow(0, 0, 1).data_ptr();
        assert_eq!(handles[0].grad().data_ptr(), flat_grad, "the gradient lives in the group's flat tensor");
        // Moments as saved are the per-parameter moments.
        let state = opt.state();
        assert!(state[0].1.equal(&m[0]) && state[3].1.equal(&v[1]), "{:?}", state[0].0);
        // A parameter that never had a gradient (a frozen layer): its group goes parameter by
        // parameter, it does not move, and the others in its group still do.
        let params = make();
        let handles: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let mut opt = AdamW::new(params, config);
        let _ = handles[0].shallow_clone().set_requires_grad(false);
        let (frozen, before) = (handles[0].detach().copy(), handles[2].detach().copy());
        (&handles[2] * &handles[2]).sum(Kind::Float).backward();
        opt.step(0.01);
        assert!(handles[0].equal(&frozen));
        assert!(!handles[2].equal(&before));
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let p = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, 4.0, 0.0])).sum(Kind::Float).backward();
        let mut opt = AdamW::new(vec![("b".into(), p.shallow_clone())], AdamWConfig::default());
        // The pieces `Trainer::train_step` clips with: the norm stays on the device until read.
        let before = f64::try_from(opt.grad_norm().unwrap()).unwrap();
        opt.scale_grads(AdamW::clip_factor(before, 1.0));
        assert!((before - 5.0).abs() < 1e-6);
        let after = f64::try_from(p.grad().norm()).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
    }
}
