//! Speculative decoding (n-gram drafts) on the default model: outputs are the target's own.
//! Greedy tokens, texts, logprobs and finish reasons equal a run without speculation on the
//! golden prompts and on grounded prompts (text the output repeats, where drafts are accepted);
//! seeded sampling and `n > 1` choices are token-identical too (one RNG draw per kept token);
//! preemption with drafts in flight and prefix-cache hits change nothing; the counters move.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use spindle_engine::spec::SpeculativeConfig;

fn golden_prompts() -> Vec<Vec<u32>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/smollm2-135m-instruct.json");
    let text = std::fs::read_to_string(path).expect("golden file");
    let golden: serde_json::Value = serde_json::from_str(&text).expect("golden json");
    golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            c["prompt_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

/// Prompts whose continuation repeats what they contain.
fn grounded_prompts(engine: &EngineHandle) -> Vec<Vec<u32>> {
    let code = "def area(width, height):\n    \"\"\"Return the area of a rectangle.\"\"\"\n    return width * height\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n";
    [
        format!(
            "{code}\n# The same two functions again, unchanged:\n{}",
            &code[..12]
        ),
        "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,".to_string(),
        "Copy the list.\nList: apples, pears, plums, figs, dates, limes.\nCopy: apples, pears,"
            .to_string(),
    ]
    .iter()
    .map(|t| engine.tokenizer().encode(t, true).expect("encode"))
    .collect()
}

fn ngram(k: usize) -> SpeculativeConfig {
    let mut spec = SpeculativeConfig::from_json(&format!(
        r#"{{"method":"ngram","num_speculative_tokens":{k},"prompt_lookup_max":3,"prompt_lookup_min":1}}"#
    ))
    .expect("config");
    // Speculate in every batch here, so drafts meet batching, preemption and forks.
    spec.disable_by_batch_size = 256;
    spec
}

/// Settings every prompt runs with: greedy with logprobs, seeded sampling, and two seeded
/// choices that stop at a blank line.
fn variants() -> Vec<SamplingParams> {
    vec![
        SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy(40)
        },
        SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(11),
            max_tokens: Some(40),
            ..SamplingParams::default()
        },
        SamplingParams {
            n: 2,
            temperature: 0.7,
            seed: Some(5),
            stop: vec!["\n\n".into()],
            max_tokens: Some(40),
            ..SamplingParams::default()
        },
    ]
}

/// Submit every prompt under every variant at once and collect the outputs in order.
fn run_all(engine: &EngineHandle, prompts: &[Vec<u32>]) -> Vec<Output> {
    let streams: Vec<RequestStream> = prompts
        .iter()
        .flat_map(|p| variants().into_iter().map(move |v| (p.clone(), v)))
        .map(|(p, v)| {
            let r = GenerateRequest::new("spec", p, v, engine.limits()).expect("valid");
            engine.generate(r).expect("submit")
        })
        .collect();
    streams.into_iter().map(collect).collect()
}

/// One at a time, without speculation: the reference.
fn run_alone(engine: &EngineHandle, prompts: &[Vec<u32>]) -> Vec<Output> {
    prompts
        .iter()
        .flat_map(|p| variants().into_iter().map(move |v| (p.clone(), v)))
        .map(|(p, v)| {
            let r = GenerateRequest::new("plain", p, v, engine.limits()).expect("valid");
            collect(engine.generate(r).expect("submit"))
        })
        .collect()
}

/// The grounded prompts and the first `num_golden` golden ones, with their reference outputs
/// (one at a time, without speculation).
fn prompts_and_reference(num_golden: usize) -> (Vec<Vec<u32>>, Vec<Output>) {
    let plain = spawn(config(256 << 20));
    let mut prompts = grounded_prompts(&plain);
    prompts.extend(golden_prompts().into_iter().take(num_golden));
    let reference = run_alone(&plain, &prompts);
    (prompts, reference)
}

/// Run `prompts` batched on an engine with `cfg` and require `reference`'s outputs; returns the
/// engine (for its counters) and the outputs.
fn same_as(
    reference: &[Output],
    prompts: &[Vec<u32>],
    cfg: EngineConfig,
    what: &str,
) -> (EngineHandle, Vec<Output>) {
    let engine = spawn(cfg);
    let got = run_all(&engine, prompts);
    assert_same(reference, &got, what);
    (engine, got)
}

fn assert_same(reference: &[Output], got: &[Output], what: &str) {
    assert_eq!(reference.len(), got.len());
    for (i, (a, b)) in reference.iter().zip(got).enumerate() {
        assert_eq!(a.tokens, b.tokens, "{what}: output {i} tokens differ");
        assert_eq!(a.texts, b.texts, "{what}: output {i} text differs");
        assert_eq!(a.finish, b.finish, "{what}: output {i} finish differs");
        assert_eq!(
            a.stop_reasons, b.stop_reasons,
            "{what}: output {i} stop differs"
        );
        assert_eq!(a.logprobs, b.logprobs, "{what}: output {i} logprobs differ");
        assert_eq!(
            a.usage.completion_tokens, b.usage.completion_tokens,
            "{what}: {i} usage"
        );
    }
}

#[test]
fn speculation_changes_no_output_and_drafts_are_accepted() {
    let (prompts, reference) = prompts_and_reference(usize::MAX);
    let mut cfg = config(256 << 20);
    cfg.speculative = Some(ngram(4));
    let (spec, got) = same_as(&reference, &prompts, cfg, "batched with speculation");
    let stats = spec.stats();
    let drafts = stats.spec_drafts.load(Ordering::Relaxed);
    let draft_tokens = stats.spec_draft_tokens.load(Ordering::Relaxed);
    let accepted = stats.spec_accepted_tokens.load(Ordering::Relaxed);
    let per_pos: Vec<u64> = stats.spec_accepted_per_pos[..4]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    assert!(
        drafts > 0 && accepted > 0,
        "drafts {drafts}, accepted {accepted}"
    );
    assert!(accepted <= draft_tokens && draft_tokens <= 4 * drafts);
    assert_eq!(per_pos.iter().sum::<u64>(), accepted);
    assert!(per_pos.windows(2).all(|w| w[0] >= w[1]), "{per_pos:?}");
    // Every emitted token is counted once, whatever came from drafts.
    let emitted: usize = got.iter().map(|o| o.usage.completion_tokens).sum();
    assert_eq!(
        stats.generation_tokens_total.load(Ordering::Relaxed),
        emitted as u64
    );
    // The grounded prompts' greedy outputs took fewer steps than tokens.
    wait_idle(&spec);
    let steps_before = stats.iterations_total.load(Ordering::Relaxed);
    let grounded = grounded_prompts(&spec);
    let first = GenerateRequest::new(
        "g",
        grounded[1].clone(),
        SamplingParams::greedy(40),
        spec.limits(),
    )
    .expect("valid");
    let out = collect(spec.generate(first).expect("submit"));
    let steps = stats.iterations_total.load(Ordering::Relaxed) - steps_before;
    assert!(
        (steps as usize) < out.tokens[0].len() / 2,
        "{steps} steps for {} tokens of a repeated list",
        out.tokens[0].len()
    );
}

/// 48 blocks of 16 tokens cannot hold every sequence with its drafts: preemption.
fn small_cache(spec: SpeculativeConfig) -> EngineConfig {
    let mut cfg = config(0);
    cfg.num_blocks_override = Some(48);
    cfg.model.max_model_len = Some(640);
    cfg.speculative = Some(spec);
    cfg
}

#[test]
fn drafts_survive_preemption_and_prefix_cache_hits() {
    let (prompts, reference) = prompts_and_reference(6);
    let (small, _) = same_as(
        &reference,
        &prompts,
        small_cache(ngram(5)),
        "preempted with drafts in flight",
    );
    let stats = small.stats();
    assert!(
        stats.preemptions_total.load(Ordering::Relaxed) > 0,
        "no preemption"
    );
    assert!(stats.spec_accepted_tokens.load(Ordering::Relaxed) > 0);
    // Again: the prompts now hit the prefix cache.
    let hits_before = stats.prefix_cache_hits_total.load(Ordering::Relaxed);
    let again = run_all(&small, &prompts);
    assert_same(&reference, &again, "prefix-cache hits with drafts");
    assert!(stats.prefix_cache_hits_total.load(Ordering::Relaxed) > hits_before);
    wait_idle(&small);
}

fn draft_model(k: usize) -> SpeculativeConfig {
    let mut spec = SpeculativeConfig::from_json(&format!(
        r#"{{"model":{:?},"num_speculative_tokens":{k}}}"#,
        model_path()
    ))
    .expect("config");
    spec.disable_by_batch_size = 256;
    spec
}

/// The default model drafting for itself: every draft the target agrees with is kept, so the
/// output is unchanged, drafts are (nearly) all accepted, and a small cache that preempts
/// sequences with drafts and lookahead slots in flight changes nothing.
#[test]
fn a_draft_model_changes_no_output() {
    let (prompts, reference) = prompts_and_reference(5);
    let mut cfg = config(256 << 20);
    cfg.speculative = Some(draft_model(3));
    let (spec, _) = same_as(&reference, &prompts, cfg, "drafted by a draft model");
    let stats = spec.stats();
    let drafted = stats.spec_draft_tokens.load(Ordering::Relaxed);
    let accepted = stats.spec_accepted_tokens.load(Ordering::Relaxed);
    assert!(
        drafted > 0 && accepted > 0,
        "{accepted} of {drafted} accepted"
    );
    // Greedy, the target agrees with every draft of its own greedy copy.
    let greedy: Vec<RequestStream> = prompts
        .iter()
        .map(|p| {
            let r = GenerateRequest::new("g", p.clone(), SamplingParams::greedy(40), spec.limits())
                .expect("valid");
            spec.generate(r).expect("submit")
        })
        .collect();
    greedy.into_iter().for_each(|s| drop(collect(s)));
    let drafted = stats.spec_draft_tokens.load(Ordering::Relaxed) - drafted;
    let accepted = stats.spec_accepted_tokens.load(Ordering::Relaxed) - accepted;
    assert!(
        drafted > 0 && accepted as f64 >= 0.95 * drafted as f64,
        "a model drafting for itself, greedy: {accepted} of {drafted} accepted"
    );
    wait_idle(&spec);
    drop(spec);

    let (small, _) = same_as(
        &reference,
        &prompts,
        small_cache(draft_model(4)),
        "preempted with a draft model",
    );
    assert!(small.stats().preemptions_total.load(Ordering::Relaxed) > 0);
    wait_idle(&small);
}
