//! Which x86 instruction set the CPU kernels may use: the best this CPU has, or a lower one
//! when `SPINDLE_CPU_ISA=avx512|avx2|scalar` asks, so every path can be tested and measured on
//! one machine (an AVX-512 box runs what an AVX2-only or older CPU would). Every kernel asks
//! here (one dispatch point per kernel family), never the CPU directly. Every kernel family has
//! an AVX-512 and an AVX2 path (the same source, see `cpu_emu512`) and portable code; an
//! extension a kernel needs on top of a level (AVX-512 BF16, VNNI) is checked where it is used,
//! falling back to the AVX2 form (docs/cpu-arithmetic.md).

use std::sync::OnceLock;

/// Instruction-set levels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuIsa {
    /// Portable Rust (what the compiler makes of it for the baseline target).
    Scalar,
    /// AVX2 with FMA and F16C (Haswell and later, Zen).
    Avx2,
    /// AVX-512 F (and whatever extensions each kernel checks on top).
    Avx512,
}

impl CpuIsa {
    pub fn as_str(self) -> &'static str {
        match self {
            CpuIsa::Scalar => "scalar",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" => Some(CpuIsa::Scalar),
            "avx2" => Some(CpuIsa::Avx2),
            "avx512" | "avx-512" => Some(CpuIsa::Avx512),
            _ => None,
        }
    }
}

/// The best level this CPU supports.
pub fn detected() -> CpuIsa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return CpuIsa::Avx512;
        }
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return CpuIsa::Avx2;
        }
    }
    CpuIsa::Scalar
}

/// The level asked for by `value` (the environment variable's), capped at what the CPU has;
/// with the reason when the request was not followed.
pub fn choose(value: Option<&str>, detected: CpuIsa) -> (CpuIsa, Option<String>) {
    let Some(v) = value.filter(|v| !v.trim().is_empty()) else {
        return (detected, None);
    };
    match CpuIsa::parse(v) {
        None => (
            detected,
            Some(format!(
                "SPINDLE_CPU_ISA={v} is not one of avx512, avx2, scalar; using {}",
                detected.as_str()
            )),
        ),
        Some(asked) if asked > detected => (
            detected,
            Some(format!(
                "SPINDLE_CPU_ISA={v} asks for more than this CPU has; using {}",
                detected.as_str()
            )),
        ),
        Some(asked) => (asked, None),
    }
}

/// The level in force for this process (read once).
pub fn selected() -> CpuIsa {
    static CHOSEN: OnceLock<CpuIsa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let value = std::env::var("SPINDLE_CPU_ISA").ok();
        let (isa, warning) = choose(value.as_deref(), detected());
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        isa
    })
}

/// Whether AVX-512 F kernels may run.
pub fn avx512() -> bool {
    selected() >= CpuIsa::Avx512
}

/// Whether AVX2 kernels (with FMA and F16C, checked by [`detected`]) may run.
pub fn avx2() -> bool {
    selected() >= CpuIsa::Avx2
}

/// Helpers of the tests comparing each kernel's AVX2 instantiation with its AVX-512 one.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) mod isa_test_support {
    /// Whether this CPU has AVX-512 F (and the extension a test also needs, `extra`) and AVX2
    /// to compare; says so when it does not.
    pub(crate) fn both_here(extra: bool) -> bool {
        let here = extra
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma");
        if !here {
            eprintln!("skipped: no AVX-512 (or the extension) to compare the AVX2 path with");
        }
        here
    }

    /// `n` deterministic values in about [-1.2, 1.2], varied by `seed`.
    pub(crate) fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 997) as f32 / 415.0 - 1.2)
            .collect()
    }

    /// Whether two outputs are the same bit for bit.
    pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_capped_at_the_cpu() {
        use CpuIsa::*;
        assert_eq!(choose(None, Avx512), (Avx512, None));
        assert_eq!(choose(Some(""), Avx2), (Avx2, None));
        assert_eq!(choose(Some("scalar"), Avx512), (Scalar, None));
        assert_eq!(choose(Some("AVX2"), Avx512), (Avx2, None));
        let (isa, why) = choose(Some("avx512"), Avx2);
        assert_eq!(isa, Avx2);
        assert!(why.is_some_and(|w| w.contains("more than this CPU has")));
        let (isa, why) = choose(Some("sse9"), Avx512);
        assert_eq!(isa, Avx512);
        assert!(why.is_some_and(|w| w.contains("not one of")));
    }
}
