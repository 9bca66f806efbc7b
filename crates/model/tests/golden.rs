//! The default model against an independent reference: HF transformers in fp32 on the same
//! GGUF weights (tests/golden/*.json, made by scripts/golden/make_golden.py). Greedy tokens must
//! be identical and the top-1 logprob within 1e-3 at every step; tokenizer ids must equal HF's.

mod common;

use common::*;
use serde::Deserialize;
use spindle_model::{LoadOptions, TokenizerBundle};

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
    let path = repo_root().join("tests/golden/smollm2-135m-instruct.json");
    let text = std::fs::read_to_string(&path).expect("golden file");
    serde_json::from_str(&text).expect("golden json")
}

fn load() -> spindle_model::LoadedModel {
    let path = default_model_path();
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    spindle_model::load(&LoadOptions {
        model: path.display().to_string(),
        ..Default::default()
    })
    .expect("load default model")
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
    let g = golden();
    let sha = std::process::Command::new("sha256sum")
        .arg(default_model_path())
        .output();
    if let Ok(out) = sha {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with(&g.model_sha256),
            "golden data was made from another file"
        );
    }
    let loaded = load();
    check_tokenizer(&loaded.tokenizer, &g);

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

#[test]
fn batched_paged_forward_matches_the_golden_reference() {
    // All cases in one batch, mixing long prefills with other sequences' decodes, must give the
    // same greedy tokens as the reference.
    let g = golden();
    let loaded = load();
    let max_len = g
        .cases
        .iter()
        .map(|c| c.prompt_ids.len() + c.greedy_ids.len() + 1)
        .max()
        .unwrap_or(0);
    let mut runner = PagedRunner::new(&loaded.model, g.cases.len(), max_len, 16);
    // Step 0: half the cases prefill; the other half start one step later, so prefill and
    // decode share batches.
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
    for (i, c) in g.cases.iter().enumerate() {
        assert_eq!(
            generated[i], c.greedy_ids,
            "case {} differs in a mixed batch",
            c.name
        );
    }
}
