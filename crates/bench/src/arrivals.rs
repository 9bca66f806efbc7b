//! Request arrival times. A finite `--request-rate` gives a renewal process whose gaps are
//! gamma-distributed with shape = burstiness and mean 1/rate: burstiness 1 is a Poisson process
//! (exponential gaps, coefficient of variation 1), smaller values are burstier (CV = 1/√b), larger
//! ones more regular. An infinite rate sends everything at time 0.
//!
//! The gamma sampler is Marsaglia & Tsang's squeeze method (2000), with the usual
//! `Gamma(a) = Gamma(a + 1) · U^(1/a)` boost for shapes below 1; normals come from Box–Muller.
//! Written here so the client needs nothing beyond `rand`.

use rand::Rng;

use crate::error::{BenchError, Result};

/// When each request of a run is sent, relative to the start of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArrivalProcess {
    rate: f64,
    burstiness: f64,
}

impl ArrivalProcess {
    /// `rate` in requests per second (`f64::INFINITY`: all at once); `burstiness` > 0.
    pub fn new(rate: f64, burstiness: f64) -> Result<Self> {
        if rate.is_nan() || rate <= 0.0 {
            return Err(BenchError::InvalidArgument(format!(
                "request rate must be > 0 (or inf), got {rate}"
            )));
        }
        if !burstiness.is_finite() || burstiness <= 0.0 {
            return Err(BenchError::InvalidArgument(format!(
                "burstiness must be a finite value > 0, got {burstiness}"
            )));
        }
        Ok(Self { rate, burstiness })
    }

    /// Whether every request is sent at time 0.
    pub fn is_instant(&self) -> bool {
        self.rate.is_infinite()
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Gamma shape of the gaps.
    pub fn burstiness(&self) -> f64 {
        self.burstiness
    }

    /// One gap between consecutive requests, in seconds.
    pub fn sample_gap<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        if self.is_instant() {
            return 0.0;
        }
        let scale = 1.0 / (self.rate * self.burstiness);
        sample_gamma(rng, self.burstiness, scale)
    }

    /// Send times of `n` requests in seconds from the start: the first at 0, each next one a
    /// sampled gap later.
    pub fn arrival_times<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Vec<f64> {
        let mut t = 0.0;
        (0..n)
            .map(|i| {
                if i > 0 {
                    t += self.sample_gap(rng);
                }
                t
            })
            .collect()
    }
}

/// A uniform draw in (0, 1], safe to take the logarithm of.
fn open_uniform<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    1.0 - rng.random::<f64>()
}

/// A standard normal draw (Box–Muller; one of the pair is discarded for simplicity).
pub fn sample_standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1 = open_uniform(rng);
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Gamma(`shape`, `scale`) draw (mean `shape · scale`). Non-positive or non-finite parameters
/// yield 0 rather than looping.
pub fn sample_gamma<R: Rng + ?Sized>(rng: &mut R, shape: f64, scale: f64) -> f64 {
    if !(shape > 0.0 && shape.is_finite() && scale > 0.0 && scale.is_finite()) {
        return 0.0;
    }
    if shape < 1.0 {
        // Boost: if X ~ Gamma(a + 1) and U ~ U(0, 1), then X · U^(1/a) ~ Gamma(a).
        let x = sample_gamma(rng, shape + 1.0, 1.0);
        return x * open_uniform(rng).powf(1.0 / shape) * scale;
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = sample_standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = open_uniform(rng);
        let x2 = x * x;
        // Cheap squeeze first, then the exact log test.
        if u < 1.0 - 0.0331 * x2 * x2 || u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
            return d * v * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn mean_cv(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt() / mean)
    }

    fn gaps(rate: f64, burstiness: f64, n: usize, seed: u64) -> Vec<f64> {
        let p = ArrivalProcess::new(rate, burstiness).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| p.sample_gap(&mut rng)).collect()
    }

    #[test]
    fn poisson_has_the_requested_rate_and_cv_one() {
        let g = gaps(20.0, 1.0, 200_000, 1);
        let (mean, cv) = mean_cv(&g);
        assert!((1.0 / mean - 20.0).abs() < 0.2, "rate {}", 1.0 / mean);
        assert!((cv - 1.0).abs() < 0.02, "cv {cv}");
        assert!(g.iter().all(|&x| x >= 0.0 && x.is_finite()));
    }

    #[test]
    fn burstiness_sets_the_coefficient_of_variation() {
        for &(b, seed) in &[(0.25, 2u64), (0.5, 3), (2.0, 4), (4.0, 5), (9.0, 6)] {
            let g = gaps(5.0, b, 200_000, seed);
            let (mean, cv) = mean_cv(&g);
            assert!((1.0 / mean - 5.0).abs() < 0.1, "b={b}: rate {}", 1.0 / mean);
            let want = 1.0 / b.sqrt();
            assert!(
                (cv - want).abs() < 0.04 * want.max(1.0),
                "b={b}: cv {cv}, want {want}"
            );
        }
    }

    #[test]
    fn arrival_times_accumulate_gaps() {
        let p = ArrivalProcess::new(100.0, 1.0).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let t = p.arrival_times(10_000, &mut rng);
        assert_eq!(t[0], 0.0);
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
        // 9 999 gaps of mean 10 ms: about 100 s, within 3 %.
        assert!((t[9_999] - 99.99).abs() < 3.0, "{}", t[9_999]);
    }

    #[test]
    fn infinite_rate_sends_everything_at_once() {
        let p = ArrivalProcess::new(f64::INFINITY, 1.0).unwrap();
        assert!(p.is_instant());
        let mut rng = StdRng::seed_from_u64(0);
        assert!(p.arrival_times(50, &mut rng).iter().all(|&t| t == 0.0));
    }

    #[test]
    fn same_seed_same_arrivals() {
        let p = ArrivalProcess::new(3.0, 0.5).unwrap();
        let a = p.arrival_times(100, &mut StdRng::seed_from_u64(42));
        let b = p.arrival_times(100, &mut StdRng::seed_from_u64(42));
        assert_eq!(a, b);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(ArrivalProcess::new(0.0, 1.0).is_err());
        assert!(ArrivalProcess::new(-1.0, 1.0).is_err());
        assert!(ArrivalProcess::new(f64::NAN, 1.0).is_err());
        assert!(ArrivalProcess::new(1.0, 0.0).is_err());
        assert!(ArrivalProcess::new(1.0, f64::INFINITY).is_err());
        assert_eq!(sample_gamma(&mut StdRng::seed_from_u64(0), -1.0, 1.0), 0.0);
    }

    #[test]
    fn standard_normal_moments() {
        let mut rng = StdRng::seed_from_u64(11);
        let xs: Vec<f64> = (0..200_000)
            .map(|_| sample_standard_normal(&mut rng))
            .collect();
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "mean {mean} var {var}"
        );
    }
}
