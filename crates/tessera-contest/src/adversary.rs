//! The attacks Tessera is tested against. A testing tool: `tessera contribute --adversary` and
//! `tessera bench arena` use these to show that no lazy, copied or malicious submission hurts
//! the model or earns a reward. Nothing in a normal run ever constructs one.
//!
//! Attacks on the pseudo-gradient itself are applied by [`Adversary::tamper`]; the others change
//! how the contributor behaves (trains less, on other data, from an old base, resends bytes) and
//! are carried out by whoever drives the training.

use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Adversary {
    /// NaN in the encoded pseudo-gradient (written into the bytes after encoding, since the
    /// codecs refuse to encode it).
    Nan,
    /// Gaussian noise 100× the size of an honest Δ in place of it.
    Noise,
    /// −Δ.
    SignFlip,
    /// 100 × Δ.
    Scale,
    /// "A little is enough" (Baruch et al. 2019): μ − z·σ per coordinate, from the colluders'
    /// honest pseudo-gradients, z from the number of contributors and attackers.
    Alie,
    /// Inner-product manipulation (Xie et al. 2020): −ε·μ of the colluders' honest Δ, ε = 0.5.
    Ipm,
    /// Free rider: Δ = 0, no training.
    Zero,
    /// Trains a tenth of the inner steps.
    Lazy,
    /// Submits work based on a round older than the run accepts.
    Stale,
    /// Resends an earlier message byte for byte.
    Replay,
    /// Trains on windows other than the assigned ones.
    WrongData,
    /// Resubmits another contributor's Δ.
    Copy,
    /// Resubmits another contributor's Δ plus noise of 5% of its size.
    CopyNoise,
    /// Resubmits another contributor's sparse Δ as it was sent — the same support — with each
    /// kept value rescaled by a random factor in [0.1, 1.9], which takes its cosine to the
    /// victim below the copy threshold (a sparse codec's disguise; only the support gives it
    /// away).
    CopySupport,
    /// Adapts to the checks: trains a tenth of the inner steps on its own assigned windows (so
    /// the data-fit check sees its data) and adds the last published round's update, rescaled
    /// to a pseudo-gradient by the run's outer learning rate — the direction the held-out score
    /// rewards, at the size of the round's mean, well inside the robust rule's norm bound — for
    /// a tenth of the work.
    Adaptive,
}

impl Adversary {
    pub const ALL: [Adversary; 15] = [
        Adversary::Nan,
        Adversary::Noise,
        Adversary::SignFlip,
        Adversary::Scale,
        Adversary::Alie,
        Adversary::Ipm,
        Adversary::Zero,
        Adversary::Lazy,
        Adversary::Stale,
        Adversary::Replay,
        Adversary::WrongData,
        Adversary::Copy,
        Adversary::CopyNoise,
        Adversary::CopySupport,
        Adversary::Adaptive,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Adversary::Nan => "nan",
            Adversary::Noise => "noise",
            Adversary::SignFlip => "sign-flip",
            Adversary::Scale => "scale",
            Adversary::Alie => "alie",
            Adversary::Ipm => "ipm",
            Adversary::Zero => "zero",
            Adversary::Lazy => "lazy",
            Adversary::Stale => "stale",
            Adversary::Replay => "replay",
            Adversary::WrongData => "wrong-data",
            Adversary::Copy => "copy",
            Adversary::CopyNoise => "copy-noise",
            Adversary::CopySupport => "copy-support",
            Adversary::Adaptive => "adaptive",
        }
    }

    /// Inner steps this adversary trains of the `h` it is asked for.
    pub fn inner_steps(&self, h: u64) -> u64 {
        match self {
            Adversary::Zero => 0,
            Adversary::Lazy | Adversary::Adaptive => (h / 10).max(1),
            _ => h,
        }
    }

    /// Whether the attack needs other contributors' honest pseudo-gradients (colluders' for
    /// ALIE and IPM, a victim's for the copies).
    pub fn needs_others(&self) -> bool {
        matches!(
            self,
            Adversary::Alie
                | Adversary::Ipm
                | Adversary::Copy
                | Adversary::CopyNoise
                | Adversary::CopySupport
                | Adversary::Adaptive
        )
    }

    /// Rewrites an honest pseudo-gradient `delta` (tensors in the model's order). `others` are
    /// the honest pseudo-gradients this attacker can see: its colluders' (ALIE, IPM: the
    /// attacker's own Δ is among them) or its victim's first (copies). With none, ALIE and IPM
    /// fall back to the attacker's own Δ as the estimate of the mean (and its RMS as the
    /// spread), and the copies to no change. `n`/`attackers` size ALIE's z. Behavioural kinds
    /// (lazy, stale, replay, wrong-data) leave Δ as it is.
    pub fn tamper(&self, delta: &mut [Vec<f32>], others: &[&[Vec<f32>]], n: usize, attackers: usize, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        match self {
            // Codecs refuse to encode NaN, so the driver writes it into the encoded bytes.
            Adversary::Nan => {}
            Adversary::Noise => {
                for t in delta.iter_mut() {
                    let std = 100.0 * rms(t);
                    if let Ok(normal) = Normal::new(0.0f32, std.max(f32::MIN_POSITIVE)) {
                        t.iter_mut().for_each(|v| *v = normal.sample(&mut rng));
                    }
                }
            }
            Adversary::SignFlip => delta.iter_mut().flatten().for_each(|v| *v = -*v),
            Adversary::Scale => delta.iter_mut().flatten().for_each(|v| *v *= 100.0),
            Adversary::Zero => delta.iter_mut().flatten().for_each(|v| *v = 0.0),
            Adversary::Alie | Adversary::Ipm => {
                let z = alie_z(n, attackers);
                for (i, t) in delta.iter_mut().enumerate() {
                    let own_rms = rms(t);
                    for (j, v) in t.iter_mut().enumerate() {
                        let (mean, std) = if others.is_empty() {
                            (*v, own_rms)
                        } else {
                            let k = others.len() as f32;
                            let m = others.iter().map(|o| o[i][j]).sum::<f32>() / k;
                            let var = others.iter().map(|o| (o[i][j] - m) * (o[i][j] - m)).sum::<f32>() / k;
                            (m, var.sqrt())
                        };
                        *v = if *self == Adversary::Alie { mean - z * std } else { -0.5 * mean };
                    }
                }
            }
            Adversary::Copy | Adversary::CopyNoise => {
                let Some(victim) = others.first() else { return };
                for (t, src) in delta.iter_mut().zip(victim.iter()) {
                    t.copy_from_slice(src);
                    if *self == Adversary::CopyNoise {
                        let std = 0.05 * rms(t);
                        if let Ok(normal) = Normal::new(0.0f32, std.max(f32::MIN_POSITIVE)) {
                            t.iter_mut().for_each(|v| *v += normal.sample(&mut rng));
                        }
                    }
                }
            }
            Adversary::CopySupport => {
                let Some(victim) = others.first() else { return };
                for (t, src) in delta.iter_mut().zip(victim.iter()) {
                    for (v, &s) in t.iter_mut().zip(src) {
                        *v = s * rand::Rng::random_range(&mut rng, 0.1f32..1.9);
                    }
                }
            }
            Adversary::Adaptive => {
                let Some(public) = others.first() else { return };
                for (t, p) in delta.iter_mut().zip(public.iter()) {
                    t.iter_mut().zip(p).for_each(|(v, p)| *v += p);
                }
            }
            Adversary::Lazy | Adversary::Stale | Adversary::Replay | Adversary::WrongData => {}
        }
    }
}

fn rms(t: &[f32]) -> f32 {
    if t.is_empty() {
        return 0.0;
    }
    (t.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / t.len() as f64).sqrt() as f32
}

/// ALIE's z: with n contributors of which m attack, s = ⌊n/2 + 1⌋ − m honest ones must be
/// swayed; z = Φ⁻¹((n − s)/n), found by bisection on the normal CDF.
pub fn alie_z(n: usize, attackers: usize) -> f32 {
    let s = (n / 2 + 1).saturating_sub(attackers);
    let p = ((n.saturating_sub(s)) as f64 / n.max(1) as f64).clamp(0.5, 0.999);
    let (mut lo, mut hi) = (0.0f64, 4.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if normal_cdf(mid) < p { lo = mid } else { hi = mid }
    }
    lo as f32
}

fn normal_cdf(x: f64) -> f64 {
    // Abramowitz–Stegun 7.1.26 for erf; 1.5e-7 absolute error is plenty for choosing z.
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs() / std::f64::consts::SQRT_2);
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-(x * x) / 2.0).exp();
    0.5 * (1.0 + if x >= 0.0 { erf } else { -erf })
}

impl fmt::Display for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Adversary {
    type Err = String;

    fn from_str(s: &str) -> Result<Adversary, String> {
        Adversary::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Adversary::ALL.iter().map(Adversary::name).collect();
            format!("unknown adversary {s:?}: one of {}", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Adversary::ALL {
            assert_eq!(a.name().parse::<Adversary>().unwrap(), a);
        }
        assert!("nice".parse::<Adversary>().is_err());
    }

    #[test]
    fn alie_z_matches_the_paper() {
        // n = 50, m = 12 (Baruch et al.): s = 14, z = Φ⁻¹(36/50) ≈ 0.583.
        assert!((alie_z(50, 12) - 0.583).abs() < 0.01, "{}", alie_z(50, 12));
        // n = 20, m = 5: s = 6, Φ⁻¹(0.7) ≈ 0.524.
        assert!((alie_z(20, 5) - 0.524).abs() < 0.01);
    }

    #[test]
    fn tampering() {
        let honest = vec![vec![1.0f32, -2.0, 3.0]];
        let other = vec![vec![3.0f32, -2.0, 1.0]];
        let run = |a: Adversary, others: &[&[Vec<f32>]]| {
            let mut d = honest.clone();
            a.tamper(&mut d, others, 20, 5, 1);
            d
        };
        assert_eq!(run(Adversary::SignFlip, &[]), vec![vec![-1.0, 2.0, -3.0]]);
        assert_eq!(run(Adversary::Scale, &[]), vec![vec![100.0, -200.0, 300.0]]);
        assert_eq!(run(Adversary::Zero, &[]), vec![vec![0.0; 3]]);
        assert_eq!(run(Adversary::Copy, &[&other]), other);
        assert_eq!(run(Adversary::Ipm, &[&honest, &other]), vec![vec![-1.0, 1.0, -1.0]]);
        let alie = run(Adversary::Alie, &[&honest, &other]);
        assert!((alie[0][0] - (2.0 - alie_z(20, 5))).abs() < 1e-5 && alie[0][1] == -2.0);
        let noisy = run(Adversary::CopyNoise, &[&other]);
        assert!(noisy[0].iter().zip(&other[0]).all(|(a, b)| (a - b).abs() < 1.0 && a != b));
        assert_eq!(run(Adversary::Lazy, &[]), honest);
        let sparse = vec![vec![0.0f32, 2.0, -1.0]];
        let kept = run(Adversary::CopySupport, &[&sparse]);
        assert!(kept[0][0] == 0.0 && kept[0][1] > 0.0 && kept[0][2] < 0.0 && kept != sparse, "{kept:?}");
        assert_eq!(Adversary::Lazy.inner_steps(50), 5);
        assert_eq!(
            (Adversary::Adaptive.inner_steps(50), run(Adversary::Adaptive, &[&other])),
            (5, vec![vec![4.0, -4.0, 4.0]])
        );
    }
}
