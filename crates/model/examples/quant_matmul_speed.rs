//! Throughput of the quantized linear-layer kernels per GGUF type and CPU arithmetic, on a
//! weight set bigger than the caches (as in decode, where every step streams all weights).
//! `cargo run --release -p spindle-model --example quant_matmul_speed -- [TYPE] [M...]`
//! (TYPE: q4_0 q4_1 q5_0 q5_1 q8_0 q2k q3k q4k q5k q6k; default q5_0, m = 1 4 16 64;
//! `ARITHMETIC=f32|bf16|int8` runs one arithmetic only)
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use spindle_model::quant::{matmul_xwt_quant_new, QuantMatrix};
use spindle_model::CpuArithmetic;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = match args.first().map(String::as_str).unwrap_or("q5_0") {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2k" => GgmlDType::Q2K,
        "q3k" => GgmlDType::Q3K,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        other => panic!("unknown type {other}"),
    };
    let ms: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ms = if ms.is_empty() {
        vec![1, 4, 16, 64]
    } else {
        ms
    };
    // Qwen2.5-0.5B's gate/up shape; 12 copies (~0.3 GB as f32 source) so nothing stays cached.
    let (rows, cols, copies) = (4864usize, 1024usize, 12usize);
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let bytes = q.data().unwrap().into_owned();
    let only = std::env::var("ARITHMETIC").ok();
    for arithmetic in [CpuArithmetic::F32, CpuArithmetic::Bf16, CpuArithmetic::Int8] {
        if only
            .as_deref()
            .is_some_and(|a| !format!("{arithmetic:?}").eq_ignore_ascii_case(a))
        {
            continue;
        }
        let mats: Vec<QuantMatrix> = (0..copies)
            .map(|_| {
                QuantMatrix::new(dtype, rows, cols, bytes.clone())
                    .unwrap()
                    .with_arithmetic(arithmetic)
            })
            .collect();
        if mats[0].arithmetic() != arithmetic {
            println!("{dtype:?} {arithmetic:?}: not available here");
            continue;
        }
        for &m in &ms {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let iters = (40 / m).max(3);
            for w in &mats {
                matmul_xwt_quant_new(&x, m, cols, w);
            }
            // The best of 5 rounds (the machine is shared; the minimum is the steadiest).
            let s = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for w in &mats {
                            std::hint::black_box(matmul_xwt_quant_new(&x, m, cols, w));
                        }
                    }
                    start.elapsed().as_secs_f64() / (iters * copies) as f64
                })
                .fold(f64::INFINITY, f64::min);
            println!(
                "{dtype:?} {arithmetic:?} m={m:3}: {:8.1} us/matrix  {:6.1} GB/s of weights  {:6.1} G weight-rows/s",
                s * 1e6,
                bytes.len() as f64 / s / 1e9,
                (m * rows * cols) as f64 / s / 1e9
            );
        }
    }
}
