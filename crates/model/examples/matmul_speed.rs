//! Throughput of the CPU linear-layer kernel at decode-like batch sizes.
//! `cargo run --release -p spindle-model --example matmul_speed`
use std::time::Instant;

fn main() {
    let (k, n) = (576usize, 3072usize); // SmolLM2's fused gate/up projection
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    for &m in &[1usize, 4, 8, 16, 32, 64, 256] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0)
            .collect();
        let mut out = vec![0f32; m * n];
        let iters = (2000 / m).max(20);
        spindle_model::cpu_matmul::matmul_xwt(&x, m, k, &w, n, &mut out);
        let t = Instant::now();
        for _ in 0..iters {
            spindle_model::cpu_matmul::matmul_xwt(&x, m, k, &w, n, &mut out);
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "m={m:4}: {:7.1} us  {:6.1} GFLOP/s  {:5.1} GB/s of weights",
            s * 1e6,
            2.0 * (m * n * k) as f64 / s / 1e9,
            (n * k * 4) as f64 / s / 1e9
        );
    }
}
