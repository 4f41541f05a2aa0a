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
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Number of updates applied so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> AdamW {
        let exp_avg = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| p.zeros_like()).collect();
        AdamW { config, params, exp_avg, exp_avg_sq, step: 0 }
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

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        tch::no_grad(|| {
            for (((_, p), m), v) in self.params.iter_mut().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                if weight_decay != 0.0 && p.dim() >= 2 {
                    let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let _ = m.lerp_(&g, 1.0 - beta1);
                let _ = v.g_mul_scalar_(beta2).addcmul_(&(&g * (1.0 - beta2)), &g);
                let denom = (v.sqrt() / bias2_sqrt).g_add_scalar_(eps);
                let _ = p.addcdiv_(&(&*m * (-lr / bias1)), &denom);
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
