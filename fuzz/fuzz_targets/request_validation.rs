//! Request parsing and validation on arbitrary bodies: never panic, and whatever validation
//! accepts must satisfy what the engine assumes (finite, in-range sampling values, ids below the
//! vocabulary, bounded lists, a max_tokens that fits the context).

#![no_main]

use libfuzzer_sys::fuzz_target;
use spindle_server::protocol::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
};
use spindle_server::template::normalize_messages;
use spindle_server::validation::{
    build_request, chat_params, completion_params, detokenize_ids, parse_json, parse_prompt,
    ModelLimits, PromptInput, Validated, MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MAX_N, MAX_PROMPTS,
    MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES, MAX_STOP_TOKEN_IDS,
};

const LIMITS: ModelLimits = ModelLimits {
    vocab_size: 49152,
    max_model_len: 2048,
};

fn check(v: &Validated) {
    let p = &v.params;
    assert!((1..=MAX_N).contains(&p.n), "n {}", p.n);
    assert!(
        p.temperature.is_finite() && p.temperature >= 0.0,
        "temperature {}",
        p.temperature
    );
    assert!(p.top_p > 0.0 && p.top_p <= 1.0, "top_p {}", p.top_p);
    assert!((0.0..=1.0).contains(&p.min_p), "min_p {}", p.min_p);
    assert!(
        p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0,
        "repetition_penalty {}",
        p.repetition_penalty
    );
    assert!(
        (-2.0..=2.0).contains(&p.frequency_penalty) && (-2.0..=2.0).contains(&p.presence_penalty)
    );
    assert!(p.logprobs.is_none_or(|k| k <= MAX_LOGPROBS));
    assert!(p.stop.len() <= MAX_STOP_STRINGS);
    assert!(p
        .stop
        .iter()
        .all(|s| !s.is_empty() && s.len() <= MAX_STOP_STRING_BYTES));
    assert!(p.stop_token_ids.len() <= MAX_STOP_TOKEN_IDS);
    assert!(p
        .stop_token_ids
        .iter()
        .all(|&t| (t as usize) < LIMITS.vocab_size));
    assert!(p.logit_bias.len() <= MAX_LOGIT_BIAS_ENTRIES);
    assert!(p
        .logit_bias
        .iter()
        .all(|&(t, b)| (t as usize) < LIMITS.vocab_size
            && b.is_finite()
            && (-100.0..=100.0).contains(&b)));
    if let Some(m) = p.max_tokens {
        assert!(m >= 1);
        assert!(p.min_tokens <= m);
    }
}

/// The engine's request built from the validated parameters fits the context.
fn check_max_tokens(prompt_len: usize, v: &Validated) {
    let ids = vec![1; prompt_len];
    if let Ok(r) = build_request("fuzz".into(), ids, &v.params, LIMITS, "prompt") {
        let m = r.max_tokens();
        assert!(
            m >= 1 && prompt_len + m <= LIMITS.max_model_len,
            "prompt {prompt_len} + max_tokens {m}"
        );
        assert!(r.params().min_tokens <= m);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_json::<ChatCompletionRequest>(data) {
        if let Ok(v) = chat_params(&req, LIMITS, None) {
            check(&v);
            check_max_tokens(data.len() % 4096, &v);
        }
        if let Ok(messages) = normalize_messages(req.messages.as_ref()) {
            assert!(!messages.is_empty());
            for m in &messages {
                assert!(
                    m["content"].is_string() || m["content"].is_null(),
                    "content not flattened: {m}"
                );
            }
        }
    }
    if let Ok(req) = parse_json::<CompletionRequest>(data) {
        let validated = completion_params(&req, LIMITS);
        if let Ok(v) = &validated {
            check(v);
        }
        if let Ok(prompts) = parse_prompt(req.prompt.as_ref(), LIMITS.vocab_size) {
            assert!(!prompts.is_empty() && prompts.len() <= MAX_PROMPTS);
            for p in &prompts {
                if let PromptInput::Tokens(ids) = p {
                    assert!(!ids.is_empty());
                    assert!(ids.iter().all(|&t| (t as usize) < LIMITS.vocab_size));
                    if let Ok(v) = &validated {
                        check_max_tokens(ids.len(), v);
                    }
                }
            }
        }
    }
    if let Ok(req) = parse_json::<TokenizeRequest>(data) {
        let _ = normalize_messages(req.messages.as_ref());
    }
    if let Ok(req) = parse_json::<DetokenizeRequest>(data) {
        if let Ok(ids) = detokenize_ids(req.tokens.as_deref(), LIMITS.vocab_size) {
            assert!(ids.iter().all(|&t| (t as usize) < LIMITS.vocab_size));
        }
    }
});
