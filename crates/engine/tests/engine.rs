//! Engine behaviour on the default model (fetched by scripts/fetch-model.sh): continuous
//! batching, batch invariance, preemption, prefix caching, sampling, stops, n > 1, abort.

mod common;

use common::*;

#[test]
fn continuous_batching_batches_and_admits_late_arrivals() {
    let recorder = Arc::new(Recorder::default());
    let mut cfg = config(256 << 20);
    cfg.observer = Some(recorder.clone());
    let engine = spawn(cfg);
    let early: Vec<RequestStream> = prompts(16)
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let params = SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(24)
            };
            request(&engine, &format!("early-{i}"), p, params)
        })
        .collect();
    // Let the early batch get going, then add one more request.
    std::thread::sleep(Duration::from_millis(300));
    let late_params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(8)
    };
    let late = request(&engine, "late", "The ocean is", late_params);
    let late_out = collect(late);
    let early_outs: Vec<Output> = early.into_iter().map(collect).collect();
    assert_eq!(late_out.tokens[0].len(), 8);
    for o in &early_outs {
        assert_eq!(o.usage.completion_tokens, 24);
    }
    let traces = recorder.0.lock().unwrap();
    let max_batch = traces
        .iter()
        .map(|t| t.request_ids.len())
        .max()
        .unwrap_or(0);
    assert!(max_batch > 1, "no step batched more than one sequence");
    let joined = traces.iter().any(|t| {
        t.request_ids.iter().any(|r| r == "late")
            && t.request_ids.iter().any(|r| r.starts_with("early-"))
    });
    assert!(
        joined,
        "the late request never ran in the same step as the early ones"
    );
    drop(traces); // the engine's observer takes this lock after every step
    wait_idle(&engine);
}

#[test]
fn batched_greedy_equals_alone_and_preemption_keeps_outputs() {
    let texts = prompts(32);
    let engine = spawn(config(256 << 20));
    let alone: Vec<Output> = texts
        .iter()
        .map(|p| collect(request(&engine, "alone", p, SamplingParams::greedy(16))))
        .collect();
    let streams: Vec<RequestStream> = texts
        .iter()
        .map(|p| request(&engine, "batched", p, SamplingParams::greedy(16)))
        .collect();
    let batched: Vec<Output> = streams.into_iter().map(collect).collect();
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a.tokens, b.tokens, "prompt {i} differs when batched");
        assert_eq!(a.texts, b.texts, "prompt {i} text differs when batched");
    }
    drop(engine);

    // A cache of 40 blocks (640 tokens) cannot hold 32 sequences of ~26 tokens: preemption.
    let mut cfg = config(0);
    cfg.num_blocks_override = Some(40);
    cfg.model.max_model_len = Some(512);
    let small = spawn(cfg);
    let streams: Vec<RequestStream> = texts
        .iter()
        .map(|p| request(&small, "tight", p, SamplingParams::greedy(16)))
        .collect();
    let tight: Vec<Output> = streams.into_iter().map(collect).collect();
    let preemptions = small
        .stats()
        .preemptions_total
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(preemptions > 0, "the small cache forced no preemption");
    for (i, (a, b)) in alone.iter().zip(&tight).enumerate() {
        assert_eq!(a.tokens, b.tokens, "prompt {i} differs after preemption");
        assert_eq!(a.texts, b.texts, "prompt {i} text differs after preemption");
    }
    wait_idle(&small);
}

#[test]
fn prefix_cache_hits_and_keeps_output() {
    let shared: String = (0..40)
        .map(|i| format!("Fact {i}: the sky is blue. "))
        .collect();
    let run = |caching: bool| {
        let mut cfg = config(128 << 20);
        cfg.enable_prefix_caching = caching;
        let engine = spawn(cfg);
        let first = collect(request(
            &engine,
            "a",
            &format!("{shared} Question one:"),
            SamplingParams::greedy(12),
        ));
        let second = collect(request(
            &engine,
            "b",
            &format!("{shared} Question two:"),
            SamplingParams::greedy(12),
        ));
        (first, second)
    };
    let (on_a, on_b) = run(true);
    let (off_a, off_b) = run(false);
    assert!(
        on_a.usage.prompt_tokens >= 200,
        "shared prefix is {} tokens",
        on_a.usage.prompt_tokens
    );
    assert_eq!(on_a.usage.cached_tokens, 0);
    assert!(
        on_b.usage.cached_tokens >= 192,
        "cached tokens: {}",
        on_b.usage.cached_tokens
    );
    assert_eq!(off_b.usage.cached_tokens, 0);
    assert_eq!(on_a.tokens, off_a.tokens);
    assert_eq!(on_b.tokens, off_b.tokens);
}

#[test]
fn seeded_sampling_is_reproducible_alone_and_batched() {
    let engine = spawn(config(128 << 20));
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(1234),
        max_tokens: Some(20),
        ..SamplingParams::default()
    };
    let a = collect(request(
        &engine,
        "s1",
        "Write a poem about the sea:",
        params.clone(),
    ));
    let b = collect(request(
        &engine,
        "s2",
        "Write a poem about the sea:",
        params.clone(),
    ));
    assert_eq!(a.tokens, b.tokens);
    // The same request in a batch with unrelated traffic.
    let noise: Vec<RequestStream> = prompts(6)
        .iter()
        .map(|p| {
            request(
                &engine,
                "noise",
                p,
                SamplingParams {
                    temperature: 1.0,
                    max_tokens: Some(20),
                    ..SamplingParams::default()
                },
            )
        })
        .collect();
    let c = collect(request(
        &engine,
        "s3",
        "Write a poem about the sea:",
        params.clone(),
    ));
    noise.into_iter().for_each(|s| drop(collect(s)));
    assert_eq!(a.tokens, c.tokens);
    let other = collect(request(
        &engine,
        "s4",
        "Write a poem about the sea:",
        SamplingParams {
            seed: Some(99),
            ..params
        },
    ));
    assert_ne!(
        a.tokens, other.tokens,
        "different seeds gave the same 20 tokens"
    );
}

#[test]
fn n_choices_stops_and_detokenization() {
    let engine = spawn(config(128 << 20));
    // n = 3 with sampling: three choices, usage counts the prompt once.
    let params = SamplingParams {
        n: 3,
        temperature: 1.0,
        seed: Some(7),
        max_tokens: Some(10),
        ..SamplingParams::default()
    };
    let out = collect(request(&engine, "n3", "List three fruits:", params));
    assert_eq!(out.tokens.len(), 3);
    assert!(out.finish.iter().all(|f| f.is_some()));
    assert_eq!(
        out.usage.completion_tokens,
        out.tokens.iter().map(Vec::len).sum::<usize>()
    );
    assert_eq!(
        out.usage.prompt_tokens,
        engine
            .tokenizer()
            .encode("List three fruits:", true)
            .unwrap()
            .len()
    );

    // Stop string spanning tokens: first find the greedy text, then stop in its middle.
    let full = collect(request(
        &engine,
        "full",
        "The capital of France is",
        SamplingParams::greedy(16),
    ));
    let text = full.texts[0].clone();
    assert!(text.len() > 8, "greedy text too short: {text:?}");
    let stop: String = text.chars().skip(3).take(6).collect();
    let params = SamplingParams {
        stop: vec![stop.clone()],
        ..SamplingParams::greedy(16)
    };
    let stopped = collect(request(&engine, "stop", "The capital of France is", params));
    let cut = text.find(&stop).unwrap();
    assert_eq!(stopped.texts[0], text[..cut]);
    assert_eq!(stopped.finish[0], Some(FinishReason::Stop));
    assert_eq!(
        stopped.stop_reasons[0],
        Some(StopReason::Text(stop.clone()))
    );
    let params = SamplingParams {
        stop: vec![stop.clone()],
        include_stop_str_in_output: true,
        ..SamplingParams::greedy(16)
    };
    let kept = collect(request(
        &engine,
        "stop2",
        "The capital of France is",
        params,
    ));
    assert_eq!(kept.texts[0], text[..cut + stop.len()]);

    // Length finish and the streamed text equals the full decode (emoji and CJK prompt).
    let out = collect(request(
        &engine,
        "utf8",
        "Translate to Chinese and add emoji: I love 🍕 and 北京 🎉!",
        SamplingParams::greedy(32),
    ));
    let decoded = engine.tokenizer().decode(&out.tokens[0], true).unwrap();
    let eos = engine.tokenizer().eos_token_ids.clone();
    let visible: Vec<u32> = out.tokens[0]
        .iter()
        .copied()
        .filter(|t| !eos.contains(t))
        .collect();
    assert_eq!(
        out.texts[0],
        engine.tokenizer().decode(&visible, true).unwrap()
    );
    assert!(!out.texts[0].contains('\u{FFFD}') || decoded.contains('\u{FFFD}'));
}

#[test]
fn abort_frees_blocks_and_dead_receivers_are_dropped() {
    let engine = spawn(config(128 << 20));
    let mut streams: Vec<RequestStream> = prompts(8)
        .iter()
        .map(|p| {
            request(
                &engine,
                "abort",
                p,
                SamplingParams {
                    ignore_eos: true,
                    ..SamplingParams::greedy(500)
                },
            )
        })
        .collect();
    // Wait for the first token of each, then drop half and abort the rest explicitly.
    for s in streams.iter_mut() {
        match s.blocking_recv() {
            Some(EngineEvent::Delta(_)) => {}
            other => panic!("expected a delta, got {other:?}"),
        }
    }
    assert!(engine.stats().kv_cache_usage() > 0.0);
    let rest = streams.split_off(4);
    drop(streams);
    for mut s in rest {
        s.abort();
    }
    wait_idle(&engine);
    // The engine still serves.
    let out = collect(request(
        &engine,
        "after",
        "Hello",
        SamplingParams::greedy(4),
    ));
    assert_eq!(out.tokens[0].len(), 4);
}

#[test]
fn invalid_requests_are_refused_before_the_engine() {
    let engine = spawn(config(128 << 20));
    let limits = engine.limits();
    let bad = |ids: Vec<u32>, params: SamplingParams| {
        GenerateRequest::new("bad", ids, params, limits).expect_err("must be refused")
    };
    assert_eq!(
        bad(vec![], SamplingParams::greedy(4)),
        RequestError::EmptyPrompt
    );
    assert!(matches!(
        bad(vec![1, 999_999], SamplingParams::greedy(4)),
        RequestError::TokenOutOfRange { id: 999_999, .. }
    ));
    assert_eq!(
        bad(vec![1; 4096], SamplingParams::greedy(4)),
        RequestError::ContextExceeded {
            prompt_tokens: 4096,
            max_tokens: 4,
            max_model_len: 2048
        }
    );
    assert!(matches!(
        bad(
            vec![1; 2048],
            SamplingParams {
                max_tokens: None,
                ..SamplingParams::default()
            }
        ),
        RequestError::PromptTooLong { .. }
    ));
    assert_eq!(
        bad(
            vec![1, 2],
            SamplingParams {
                n: 0,
                ..SamplingParams::greedy(4)
            }
        ),
        RequestError::ZeroChoices
    );
    let out = collect(request(&engine, "ok", "Hi", SamplingParams::greedy(2)));
    assert_eq!(out.tokens[0].len(), 2);
}

/// vLLM semantics: a stop string cannot end a sequence before `min_tokens` tokens, like EOS.
#[test]
fn min_tokens_holds_off_stop_strings() {
    let engine = spawn(config(128 << 20));
    let prompt = "The capital of France is";
    let greedy = |max: usize| SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max)
    };
    let full = collect(request(&engine, "full", prompt, greedy(24)));
    // A stop string that the greedy output reaches within its first few tokens.
    let mut prefix = String::new();
    let mut stop = None;
    for (i, &t) in full.tokens[0].iter().enumerate().take(6) {
        let piece = engine
            .tokenizer()
            .decode(&full.tokens[0][..=i], true)
            .unwrap();
        let new = piece[prefix.len().min(piece.len())..].trim().to_string();
        if new.len() >= 2 && i >= 1 {
            stop = Some((i, new));
            break;
        }
        prefix = piece;
        let _ = t;
    }
    let (at, stop) = stop.expect("an early word in the greedy output");
    let stop_params = |min_tokens: usize| SamplingParams {
        stop: vec![stop.clone()],
        min_tokens,
        ..greedy(24)
    };
    // Without min_tokens it stops right there.
    let early = collect(request(&engine, "early", prompt, stop_params(0)));
    assert_eq!(early.stop_reasons[0], Some(StopReason::Text(stop.clone())));
    assert!(early.tokens[0].len() <= at + 1, "{early:?}");
    // With min_tokens past that point the early occurrence is plain text and generation goes on.
    let min_tokens = at + 4;
    let held = collect(request(&engine, "held", prompt, stop_params(min_tokens)));
    assert!(held.tokens[0].len() > min_tokens, "{held:?}");
    assert_eq!(held.tokens[0][..min_tokens], full.tokens[0][..min_tokens]);
    assert!(held.texts[0].contains(&stop), "{held:?}");
    match &held.stop_reasons[0] {
        // A later occurrence may stop it: the output then ends right before that one.
        Some(StopReason::Text(s)) => {
            assert_eq!(s, &stop);
            assert!(full.texts[0].starts_with(&held.texts[0]));
        }
        None => assert_eq!(held.finish[0], Some(FinishReason::Length)),
        other => panic!("unexpected stop reason {other:?}"),
    }
}

/// Text held back as a possible stop-string prefix is released when a stop token id ends the
/// sequence (as at EOS and at the length limit), not dropped.
#[test]
fn a_stop_token_id_releases_held_back_text() {
    let engine = spawn(config(128 << 20));
    let prompt = "The capital of France is";
    let full = collect(request(&engine, "full", prompt, SamplingParams::greedy(8)));
    let (t1, t2) = (full.tokens[0][0], full.tokens[0][1]);
    let first = engine.tokenizer().decode(&[t1], true).unwrap();
    assert!(!first.is_empty());
    let params = SamplingParams {
        // The first token's text starts this stop string, so it is held back...
        stop: vec![format!("{first} zzz never produced")],
        // ...and the second token ends the sequence.
        stop_token_ids: vec![t2],
        ..SamplingParams::greedy(8)
    };
    let out = collect(request(&engine, "held", prompt, params));
    assert_eq!(out.tokens[0], vec![t1, t2]);
    assert_eq!(out.stop_reasons[0], Some(StopReason::TokenId(t2)));
    assert_eq!(out.texts[0], first);
}

#[test]
fn an_interactive_request_starts_in_the_next_step_while_background_work_fills_the_engine() {
    let recorder = Arc::new(Recorder::default());
    let mut cfg = config(256 << 20);
    cfg.max_num_seqs = 8;
    cfg.observer = Some(recorder.clone());
    let engine = spawn(cfg);
    let long = SamplingParams {
        max_tokens: Some(160),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    // Twice as many background requests as there are slots: the engine is full and more wait.
    let background: Vec<(String, RequestStream)> = prompts(16)
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let id = format!("bg-{i}");
            let ids = engine.tokenizer().encode(text, true).expect("encode");
            let request = GenerateRequest::new(&id, ids, long.clone(), engine.limits())
                .expect("valid")
                .in_background();
            (id, engine.generate(request).expect("submit"))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine
        .stats()
        .num_running
        .load(std::sync::atomic::Ordering::Relaxed)
        < 8
    {
        assert!(
            Instant::now() < deadline,
            "background work never filled the engine"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let steps_before = recorder.0.lock().unwrap().last().map_or(0, |t| t.step);
    let short = SamplingParams {
        max_tokens: Some(8),
        ..SamplingParams::default()
    };
    let interactive = collect(request(
        &engine,
        "interactive",
        "The capital of France is",
        short,
    ));
    assert_eq!(interactive.usage.completion_tokens, 8);
    let first = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .find(|t| t.request_ids.iter().any(|r| r == "interactive"))
        .cloned()
        .expect("the interactive request ran");
    // Submitted while step `steps_before + 1` may have been running: it is scheduled by the
    // next one, taking a slot from background work.
    assert!(
        first.step <= steps_before + 2,
        "interactive request first ran in step {}, submitted after step {steps_before}",
        first.step
    );
    assert!(
        first.num_preempted >= 1,
        "a background sequence yields its slot"
    );
    // Every background request still completes in full (preempted ones are recomputed).
    for (id, stream) in background {
        let out = collect(stream);
        assert_eq!(out.usage.completion_tokens, 160, "{id}");
    }
    wait_idle(&engine);
}

#[test]
fn background_work_does_not_count_against_max_waiting_requests() {
    let mut cfg = config(128 << 20);
    cfg.max_num_seqs = 1;
    cfg.max_waiting_requests = 2;
    let engine = spawn(cfg);
    let params = SamplingParams {
        max_tokens: Some(32),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let ids = engine
        .tokenizer()
        .encode("Background", true)
        .expect("encode");
    let background: Vec<RequestStream> = (0..8)
        .map(|i| {
            let r = GenerateRequest::new(
                format!("bg-{i}"),
                ids.clone(),
                params.clone(),
                engine.limits(),
            )
            .expect("valid")
            .in_background();
            engine
                .generate(r)
                .expect("background work is never refused for the queue")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // Eight background requests wait, yet interactive ones are admitted (one runs, two wait)...
    // Long enough that the running one cannot finish while the others arrive, however fast
    // the machine (with 32 tokens a fast engine finished the first before the fourth came).
    let interactive_params = SamplingParams {
        max_tokens: Some(1000),
        ..params
    };
    let mut interactive = Vec::new();
    for i in 0..3 {
        interactive.push(request(
            &engine,
            &format!("interactive-{i}"),
            "Hello",
            interactive_params.clone(),
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...until interactive requests themselves fill the queue.
    let ids = engine.tokenizer().encode("Hello", true).expect("encode");
    let fourth = GenerateRequest::new("interactive-3", ids, interactive_params, engine.limits())
        .expect("valid");
    assert!(matches!(
        engine.generate(fourth),
        Err(EngineError::QueueFull(2))
    ));
    // The first interactive request runs ahead of the background work; the rest are not
    // needed further (dropping a stream aborts its request).
    let mut first = interactive.remove(0);
    assert!(matches!(first.blocking_recv(), Some(EngineEvent::Delta(_))));
    drop(first);
    drop(interactive);
    drop(background);
    wait_idle(&engine);
}

/// Prompt logprobs score a prompt the way generation scored the same tokens: a greedy
/// continuation fed back as prompt gets the logprobs its tokens had when generated (the kernels
/// are batch-invariant, so a prefill row equals the decode row), whatever the prefix cache holds
/// and however the prompt is chunked.
#[test]
fn prompt_logprobs_match_the_generated_tokens_logprobs() {
    let engine = spawn(config(64 << 20));
    let tok = engine.tokenizer().clone();
    // Over PROMPT_LOGITS_CHUNK tokens, so the scored prompt runs in several chunks.
    let text =
        "The old lighthouse on the northern cape had not been lit for forty years. ".repeat(20);
    let prompt = tok.encode(&text, true).expect("encode");
    assert!(prompt.len() > spindle_engine::scheduler::PROMPT_LOGITS_CHUNK);
    let gen = SamplingParams {
        logprobs: Some(3),
        ..SamplingParams::greedy(12)
    };
    let first = collect(
        engine
            .generate(GenerateRequest::new("g", prompt.clone(), gen, engine.limits()).unwrap())
            .unwrap(),
    );
    let mut scored = prompt.clone();
    scored.extend(&first.tokens[0]);
    let params = SamplingParams {
        prompt_logprobs: Some(3),
        ..SamplingParams::greedy(1)
    };
    for run in 0..2 {
        // The second run finds the whole prompt in the prefix cache and must not use it.
        let out = collect(
            engine
                .generate(
                    GenerateRequest::new(
                        format!("s{run}"),
                        scored.clone(),
                        params.clone(),
                        engine.limits(),
                    )
                    .unwrap(),
                )
                .unwrap(),
        );
        let lp = out.prompt_logprobs.expect("prompt logprobs");
        assert_eq!(lp.len(), scored.len());
        assert!(lp[0].is_none());
        for (i, entry) in lp.iter().enumerate().skip(1) {
            let e = entry.as_ref().expect("every later position has a logprob");
            assert_eq!(e.token.token_id, scored[i]);
            assert_eq!(e.top.len(), 3);
            assert!(e.rank >= 1 && e.token.logprob <= 0.0);
        }
        for (k, step) in first.logprobs[0].iter().enumerate() {
            let e = lp[prompt.len() + k].as_ref().unwrap();
            assert_eq!(e.token.token_id, step.chosen.token_id);
            assert!(
                (e.token.logprob - step.chosen.logprob).abs() < 1e-4,
                "position {k}: {} vs {}",
                e.token.logprob,
                step.chosen.logprob
            );
            // Greedy tokens are the most likely ones.
            assert_eq!(e.rank, 1);
            assert_eq!(e.top[0].token_id, step.top[0].token_id);
        }
        assert_eq!(out.usage.cached_tokens, 0);
    }
    // A one-token prompt has only the null entry.
    let out = collect(
        engine
            .generate(
                GenerateRequest::new("one", vec![prompt[0]], params, engine.limits()).unwrap(),
            )
            .unwrap(),
    );
    assert_eq!(out.prompt_logprobs, Some(vec![None]));
}

/// `allowed_token_ids` and `bad_words` hold on the real model.
#[test]
fn allowed_token_ids_and_bad_words_constrain_sampling() {
    let engine = spawn(config(64 << 20));
    let free = collect(request(
        &engine,
        "f",
        "The capital of France is",
        SamplingParams::greedy(8),
    ));
    let banned = free.tokens[0][0];
    let out = collect(request(
        &engine,
        "b",
        "The capital of France is",
        SamplingParams {
            bad_words: vec![vec![banned]],
            ..SamplingParams::greedy(8)
        },
    ));
    assert!(!out.tokens[0].contains(&banned), "{:?}", out.tokens);
    let allowed = vec![28, 29, 30];
    let out = collect(request(
        &engine,
        "a",
        "The capital of France is",
        SamplingParams {
            allowed_token_ids: allowed.clone(),
            temperature: 1.0,
            seed: Some(3),
            max_tokens: Some(8),
            ..SamplingParams::default()
        },
    ));
    assert!(
        out.tokens[0].iter().all(|t| allowed.contains(t)),
        "{:?}",
        out.tokens
    );
}
