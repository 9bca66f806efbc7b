//! The default model against an independent reference: HF transformers in fp32 on the same
//! GGUF weights (tests/golden/*.json, made by scripts/golden/make_golden.py). Greedy tokens must
//! be identical and the top-1 logprob within 1e-3 at every step; tokenizer ids must equal HF's.

mod common;

use common::*;
use serde::Deserialize;
use spindle_model::{CpuArithmeticChoice, DTypeChoice, KvDtype, LoadOptions, TokenizerBundle};

#[derive(Deserialize)]
struct TopLogprob {
    id: u32,
    logprob: f64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    add_special_tokens: bool,
    prompt_text: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    top_logprobs: Vec<Vec<TopLogprob>>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct Golden {
    model_sha256: String,
    bos_token_id: u32,
    eos_token_ids: Vec<u32>,
    cases: Vec<Case>,
    tokenizer_cases: Vec<TokenizerCase>,
}

fn golden() -> Golden {
    golden_file("smollm2-135m-instruct.json")
}

fn golden_file(name: &str) -> Golden {
    let path = repo_root().join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path).expect("golden file");
    serde_json::from_str(&text).expect("golden json")
}

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M (scripts/fetch-qwen.sh): Q5_0, Q8_0, Q4_K and Q6_K
/// tensors, all kept quantized.
fn qwen_path() -> std::path::PathBuf {
    repo_root().join("models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
}

fn load() -> spindle_model::LoadedModel {
    load_with(DTypeChoice::Float32)
}

fn load_with(dtype: DTypeChoice) -> spindle_model::LoadedModel {
    load_with_arithmetic(dtype, CpuArithmeticChoice::Auto)
}

fn load_with_arithmetic(
    dtype: DTypeChoice,
    cpu_arithmetic: CpuArithmeticChoice,
) -> spindle_model::LoadedModel {
    load_model(&default_model_path(), dtype, cpu_arithmetic)
}

fn load_model(
    path: &std::path::Path,
    dtype: DTypeChoice,
    cpu_arithmetic: CpuArithmeticChoice,
) -> spindle_model::LoadedModel {
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh (or fetch-qwen.sh)",
        path.display()
    );
    spindle_model::load(&LoadOptions {
        model: path.display().to_string(),
        dtype,
        cpu_arithmetic,
        ..Default::default()
    })
    .expect("load model")
}

fn check_tokenizer(tok: &TokenizerBundle, g: &Golden) {
    assert_eq!(tok.bos_token_id, Some(g.bos_token_id));
    assert_eq!(tok.eos_token_ids, g.eos_token_ids);
    for case in &g.tokenizer_cases {
        let ids = tok.encode(&case.text, false).expect("encode");
        assert_eq!(ids, case.ids, "token ids differ for {:?}", case.text);
        let decoded = tok.decode(&ids, false).expect("decode");
        assert_eq!(decoded, case.decoded, "decode differs for {:?}", case.text);
    }
    for case in &g.cases {
        let ids = tok
            .encode(&case.prompt_text, case.add_special_tokens)
            .expect("encode");
        assert_eq!(
            ids, case.prompt_ids,
            "prompt ids differ for case {}",
            case.name
        );
    }
}

#[test]
fn greedy_tokens_and_logprobs_match_transformers() {
    check_matches_transformers(&load(), &golden(), &default_model_path());
}

/// Tokenizer ids, greedy tokens and top-1 logprobs (within 1e-3) equal to the reference's.
fn check_matches_transformers(
    loaded: &spindle_model::LoadedModel,
    g: &Golden,
    path: &std::path::Path,
) {
    let sha = std::process::Command::new("sha256sum").arg(path).output();
    if let Ok(out) = sha {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with(&g.model_sha256),
            "golden data was made from another file"
        );
    }
    check_tokenizer(&loaded.tokenizer, g);

    let mut worst = 0f64;
    for case in &g.cases {
        let mut runner = PagedRunner::new(
            &loaded.model,
            1,
            case.prompt_ids.len() + case.greedy_ids.len() + 1,
            16,
        );
        let mut logits = runner.step(&loaded.model, &[(0, 0, case.prompt_ids.clone())]);
        let mut len = case.prompt_ids.len();
        for (step, (&want, top)) in case.greedy_ids.iter().zip(&case.top_logprobs).enumerate() {
            let row = &log_softmax_rows(&logits)[0];
            let got = argmax(row);
            assert_eq!(
                got, want,
                "case {} step {step}: greedy token differs",
                case.name
            );
            let diff = (row[want as usize] as f64 - top[0].logprob).abs();
            assert_eq!(top[0].id, want);
            assert!(
                diff < 1e-3,
                "case {} step {step}: top-1 logprob off by {diff}",
                case.name
            );
            worst = worst.max(diff);
            logits = runner.step(&loaded.model, &[(0, len, vec![got])]);
            len += 1;
        }
    }
    println!(
        "{} cases, worst top-1 logprob difference {worst:.2e}",
        g.cases.len()
    );
}

/// The Qwen GGUF on the quantized path (every linear layer kept in its GGUF blocks): tokenizer
/// ids, greedy tokens and top-1 logprobs as HF transformers computes them in fp32 from the same
/// file.
#[test]
fn qwen_quantized_path_matches_transformers() {
    let g = golden_file("qwen2.5-coder-0.5b-instruct.json");
    let loaded = load_model(
        &qwen_path(),
        DTypeChoice::Float32,
        CpuArithmeticChoice::Auto,
    );
    check_matches_transformers(&loaded, &g, &qwen_path());
}

/// The faster modes on the Qwen GGUF meet the accuracy contract too.
#[test]
fn qwen_faster_modes_pass_check_logprobs_close() {
    let g = golden_file("qwen2.5-coder-0.5b-instruct.json");
    for (arithmetic, name, available) in [
        (
            CpuArithmeticChoice::BFloat16,
            "qwen bfloat16",
            spindle_model::cpu_bf16::supported(),
        ),
        (
            CpuArithmeticChoice::Int8,
            "qwen int8",
            spindle_model::quant::int8::available(),
        ),
    ] {
        if !available {
            println!("{name}: skipped (this CPU lacks the instructions)");
            continue;
        }
        let loaded = load_model(&qwen_path(), DTypeChoice::Auto, arithmetic);
        let share = check_logprobs_close(&loaded, &g, name);
        assert!(share > 0.5, "{name}: only {:.1} % exact", 100.0 * share);
    }
}

#[test]
fn batched_paged_forward_matches_the_golden_reference() {
    // All cases in one batch, mixing long prefills with other sequences' decodes, must give the
    // same greedy tokens as the reference.
    let g = golden();
    let generated = batched_greedy(&load(), &g);
    for (i, c) in g.cases.iter().enumerate() {
        assert_eq!(
            generated[i], c.greedy_ids,
            "case {} differs in a mixed batch",
            c.name
        );
    }
}

/// Every case's greedy tokens (as many as the reference has), all cases in one batch: half
/// start with a prefill in step 0, the others one step later, so prefills and decodes share
/// batches.
fn batched_greedy(loaded: &spindle_model::LoadedModel, g: &Golden) -> Vec<Vec<u32>> {
    let max_len = g
        .cases
        .iter()
        .map(|c| c.prompt_ids.len() + c.greedy_ids.len() + 1)
        .max()
        .unwrap_or(0);
    let mut runner = PagedRunner::new(&loaded.model, g.cases.len(), max_len, 16);
    let (first, second): (Vec<usize>, Vec<usize>) = (0..g.cases.len()).partition(|i| i % 2 == 0);
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); g.cases.len()];
    let mut pending: Vec<usize> = first.clone();
    let mut waiting = second;
    loop {
        let mut chunks = Vec::new();
        for &i in &pending {
            let c = &g.cases[i];
            if generated[i].len() >= c.greedy_ids.len() {
                continue;
            }
            if generated[i].is_empty() {
                chunks.push((i, 0, c.prompt_ids.clone()));
            } else {
                let cached = c.prompt_ids.len() + generated[i].len() - 1;
                chunks.push((i, cached, vec![*generated[i].last().unwrap()]));
            }
        }
        if chunks.is_empty() && waiting.is_empty() {
            break;
        }
        if !chunks.is_empty() {
            let logits = runner.step(&loaded.model, &chunks);
            for (row, (i, _, _)) in log_softmax_rows(&logits).iter().zip(&chunks) {
                generated[*i].push(argmax(row));
            }
        }
        pending.append(&mut waiting);
    }
    generated
}

/// One case's greedy tokens, the sequence alone in every step.
fn greedy_alone(loaded: &spindle_model::LoadedModel, case: &Case) -> Vec<u32> {
    let n = case.greedy_ids.len();
    let mut runner = PagedRunner::new(&loaded.model, 1, case.prompt_ids.len() + n + 1, 16);
    let mut logits = runner.step(&loaded.model, &[(0, 0, case.prompt_ids.clone())]);
    let mut out = Vec::new();
    for _ in 0..n {
        let got = argmax(&log_softmax_rows(&logits)[0]);
        out.push(got);
        let len = case.prompt_ids.len() + out.len() - 1;
        logits = runner.step(&loaded.model, &[(0, len, vec![got])]);
    }
    out
}

/// The bf16 kernels are batch-invariant too: a sequence generates the same tokens alone as in
/// a batch mixing prefills and decodes (fused and panel paths, every batch size on the way).
#[test]
fn bfloat16_mode_is_batch_invariant() {
    if !spindle_model::cpu_bf16::supported() {
        println!("skipped: this CPU has no bf16 kernels (no AVX2)");
        return;
    }
    let g = golden();
    let loaded = load_with(DTypeChoice::BFloat16);
    let batched = batched_greedy(&loaded, &g);
    for (case, tokens) in g.cases.iter().zip(&batched) {
        assert_eq!(&greedy_alone(&loaded, case), tokens, "case {}", case.name);
    }
}

/// The `k` most likely token ids of a log-probability row, best first.
fn top_k(row: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    ids.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    ids.truncate(k);
    ids
}

/// vLLM's accuracy check for quantized and lower-precision models (`check_logprobs_close`),
/// against the fp32 reference: greedy tokens equal up to the first divergence, and there each
/// side's token is among the other's top 5. Returns the share of reference steps generated
/// before any divergence.
fn check_logprobs_close(loaded: &spindle_model::LoadedModel, g: &Golden, mode: &str) -> f64 {
    check_logprobs_close_kv(loaded, g, mode, KvDtype::F32)
}

/// [`check_logprobs_close`] with a KV cache holding `kv`.
fn check_logprobs_close_kv(
    loaded: &spindle_model::LoadedModel,
    g: &Golden,
    mode: &str,
    kv: KvDtype,
) -> f64 {
    let (mut matched, mut total) = (0usize, 0usize);
    for case in &g.cases {
        let mut runner = PagedRunner::with_kv_dtype(
            &loaded.model,
            1,
            case.prompt_ids.len() + case.greedy_ids.len() + 1,
            16,
            kv,
        );
        let mut logits = runner.step(&loaded.model, &[(0, 0, case.prompt_ids.clone())]);
        let mut len = case.prompt_ids.len();
        total += case.greedy_ids.len();
        for (step, (&want, reference_top)) in
            case.greedy_ids.iter().zip(&case.top_logprobs).enumerate()
        {
            let row = &log_softmax_rows(&logits)[0];
            let got = argmax(row);
            if got != want {
                let ours = top_k(row, 5);
                let theirs: Vec<u32> = reference_top.iter().map(|t| t.id).collect();
                assert!(
                    theirs.contains(&got) && ours.contains(&want),
                    "{mode}, case {} step {step}: ours {got} (top-5 {ours:?}) vs reference {want} \
                     (top-5 {theirs:?})",
                    case.name
                );
                println!(
                    "{mode}: case {} diverges at step {step} (within top-5)",
                    case.name
                );
                break;
            }
            matched += 1;
            logits = runner.step(&loaded.model, &[(0, len, vec![got])]);
            len += 1;
        }
    }
    let share = matched as f64 / total as f64;
    println!(
        "{mode}: {matched}/{total} reference tokens matched before divergence ({:.1} %)",
        100.0 * share
    );
    share
}

/// `--dtype bfloat16` on the CPU (bf16 products in the linear layers) meets the accuracy
/// contract on the golden prompts.
#[test]
fn bfloat16_mode_passes_check_logprobs_close() {
    if !spindle_model::cpu_bf16::supported() {
        println!("skipped: this CPU has no bf16 kernels (no AVX2; the mode falls back to float32)");
        return;
    }
    let g = golden();
    let loaded = load_with(DTypeChoice::BFloat16);
    assert_eq!(loaded.info.dtype, "bfloat16");
    let share = check_logprobs_close(&loaded, &g, "bfloat16");
    // Not a tolerance on the check itself (that is the top-5 rule above): a guard that the
    // mode is not silently serving another model's worth of different text.
    assert!(share > 0.5, "only {:.1} % exact", 100.0 * share);
}

/// The float32 path meets the same contract trivially (every token equal): the check itself
/// is sound.
#[test]
fn float32_mode_matches_every_reference_token() {
    let g = golden();
    let share = check_logprobs_close(&load(), &g, "float32");
    assert_eq!(share, 1.0);
}

/// `--cpu-arithmetic int8` (activations quantized per 32 values, integer dot products with the
/// GGUF blocks) meets the accuracy contract on the golden prompts.
#[test]
fn int8_mode_passes_check_logprobs_close() {
    if !spindle_model::quant::int8::available() {
        println!("skipped: this CPU has no int8 kernels (no AVX2; the mode falls back to float32)");
        return;
    }
    let g = golden();
    let loaded = load_with_arithmetic(DTypeChoice::Auto, CpuArithmeticChoice::Int8);
    assert_eq!(loaded.info.dtype, "int8");
    let share = check_logprobs_close(&loaded, &g, "int8");
    assert!(share > 0.5, "only {:.1} % exact", 100.0 * share);
}

/// The integer kernels are batch-invariant: the same tokens alone as in a mixed batch.
#[test]
fn int8_mode_is_batch_invariant() {
    if !spindle_model::quant::int8::available() {
        println!("skipped: this CPU has no int8 kernels (no AVX2)");
        return;
    }
    let g = golden();
    let loaded = load_with_arithmetic(DTypeChoice::Auto, CpuArithmeticChoice::Int8);
    let batched = batched_greedy(&loaded, &g);
    for (case, tokens) in g.cases.iter().zip(&batched) {
        assert_eq!(&greedy_alone(&loaded, case), tokens, "case {}", case.name);
    }
}

/// A 16-bit KV cache (`--kv-cache-dtype bfloat16|float16`) with exact f32 arithmetic meets the
/// accuracy contract too.
#[test]
fn half_precision_kv_caches_pass_check_logprobs_close() {
    let g = golden();
    let loaded = load();
    for (kv, name) in [(KvDtype::Bf16, "kv bfloat16"), (KvDtype::F16, "kv float16")] {
        let share = check_logprobs_close_kv(&loaded, &g, name, kv);
        assert!(share > 0.5, "{name}: only {:.1} % exact", 100.0 * share);
    }
}

/// A digest of every logit bit of the golden cases fed through one mixed batch: a prefill
/// step of all prompts, then eight decode steps of each case's reference tokens (so fused,
/// panel and attention paths all run), in float32 and bfloat16 arithmetic and with a bf16 KV
/// cache.
fn logits_digest() -> Vec<String> {
    let g = golden();
    let mut lines = Vec::new();
    for (name, dtype, kv) in [
        ("float32", DTypeChoice::Float32, KvDtype::F32),
        ("float32+bf16-kv", DTypeChoice::Float32, KvDtype::Bf16),
        ("bfloat16", DTypeChoice::BFloat16, KvDtype::Bf16),
    ] {
        let loaded = load_with(dtype);
        let max_len = g
            .cases
            .iter()
            .map(|c| c.prompt_ids.len() + 9)
            .max()
            .unwrap_or(0);
        let mut runner = PagedRunner::with_kv_dtype(&loaded.model, g.cases.len(), max_len, 16, kv);
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut feed = |logits: candle_core::Tensor| {
            for v in logits.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                hash = (hash ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
            }
        };
        let prompts: Vec<_> = g
            .cases
            .iter()
            .enumerate()
            .map(|(i, c)| (i, 0, c.prompt_ids.clone()))
            .collect();
        feed(runner.step(&loaded.model, &prompts));
        for step in 0..8 {
            let chunks: Vec<_> = g
                .cases
                .iter()
                .enumerate()
                .map(|(i, c)| (i, c.prompt_ids.len() + step, vec![c.greedy_ids[step]]))
                .collect();
            feed(runner.step(&loaded.model, &chunks));
        }
        lines.push(format!("DIGEST {name} {hash:016x} ({})", loaded.info.dtype));
    }
    lines
}

/// Prints [`logits_digest`] when run as the child of
/// [`avx2_path_gives_the_avx512_path_logits_bit_for_bit`] (a no-op otherwise).
#[test]
fn logits_digest_child() {
    if std::env::var_os("SPINDLE_DIGEST_CHILD").is_some() {
        for line in logits_digest() {
            println!("{line}");
        }
    }
}

/// The AVX2 kernels compute what the AVX-512 ones compute, in the same order (they are the
/// same source, `cpu_emu512`): the whole model's logits are bit-identical under
/// `SPINDLE_CPU_ISA=avx2`, in every arithmetic the AVX2 path shares with AVX-512. Each level
/// runs in a child process (the level is fixed per process).
#[test]
fn avx2_path_gives_the_avx512_path_logits_bit_for_bit() {
    if !std::is_x86_feature_detected!("avx512bf16") || !std::is_x86_feature_detected!("avx2") {
        println!("skipped: this CPU has no AVX-512 BF16 to compare the AVX2 path with");
        return;
    }
    if std::env::var_os("SPINDLE_CPU_ISA").is_some() {
        println!("skipped: runs once, where the level is not forced");
        return;
    }
    let run = |isa: &str| -> Vec<String> {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "logits_digest_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SPINDLE_DIGEST_CHILD", "1")
            .env("SPINDLE_CPU_ISA", isa)
            .output()
            .expect("run the test binary");
        assert!(
            out.status.success(),
            "{isa}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // libtest's "test ... " prefix may share the first line.
        text.lines()
            .filter_map(|l| l.find("DIGEST").map(|at| l[at..].to_owned()))
            .collect()
    };
    let (wide, narrow) = (run("avx512"), run("avx2"));
    assert_eq!(wide.len(), 3, "{wide:?}");
    assert_eq!(wide, narrow);
}
