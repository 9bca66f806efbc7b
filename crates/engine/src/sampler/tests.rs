//! The sampler on synthetic logits rows: every processing step against its definition,
//! seeded reproducibility, odd rows, and the fast paths against plain implementations.

use super::*;

fn rng(seed: u64) -> SequenceRng {
    SequenceRng::new(Some(seed), 0, 0)
}

fn sample(logits: &[f32], params: &SamplingParams, output: &[u32]) -> u32 {
    sample_token(logits, params, &[], output, &[], &mut rng(1))
        .unwrap()
        .0
}

fn random_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random::<f32>() * 10.0 - 5.0).collect()
}

/// Apply steps 1-4 and return the processed row (for penalty math checks).
fn processed(
    logits: &[f32],
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    eos: &[u32],
) -> Vec<f32> {
    let mut w = logits.to_vec();
    apply_processing(&mut w, params, prompt, output, eos);
    w
}

#[test]
fn greedy_is_argmax() {
    let logits = random_logits(1000, 3);
    let expected = logits
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0;
    assert_eq!(
        sample(&logits, &SamplingParams::greedy(1), &[]),
        expected as u32
    );
    // Ties go to the lowest id.
    assert_eq!(
        sample(&[1.0, 3.0, 3.0, 0.0], &SamplingParams::greedy(1), &[]),
        1
    );
}

#[test]
fn logit_bias_forces_a_token() {
    let logits = random_logits(100, 4);
    let params = SamplingParams {
        logit_bias: vec![(42, 100.0), (1_000_000, 5.0)],
        ..SamplingParams::greedy(1)
    };
    assert_eq!(sample(&logits, &params, &[]), 42);
    let params = SamplingParams {
        temperature: 1.0,
        ..params
    };
    for seed in 0..20 {
        let (t, _) = sample_token(&logits, &params, &[], &[], &[], &mut rng(seed)).unwrap();
        assert_eq!(t, 42);
    }
}

#[test]
fn allowed_token_ids_restrict_the_choice() {
    let logits = random_logits(100, 3);
    let params = SamplingParams {
        allowed_token_ids: vec![7, 9, 1_000_000],
        ..SamplingParams::default()
    };
    for seed in 0..20 {
        let t = sample_token(&logits, &params, &[], &[], &[], &mut rng(seed))
            .unwrap()
            .0;
        assert!(t == 7 || t == 9, "{t}");
    }
    let greedy = SamplingParams {
        temperature: 0.0,
        ..params
    };
    let want = if logits[7] >= logits[9] { 7 } else { 9 };
    assert_eq!(sample(&logits, &greedy, &[]), want);
}

#[test]
fn bad_words_mask_the_last_token_after_their_prefix() {
    let mut logits = vec![0.0f32; 10];
    logits[5] = 10.0;
    logits[6] = 5.0;
    let params = SamplingParams {
        temperature: 0.0,
        bad_words: vec![vec![5], vec![1, 2, 6], vec![]],
        ..SamplingParams::default()
    };
    // A one-token bad word is always masked; a longer one only after its prefix.
    assert_eq!(sample(&logits, &params, &[]), 6);
    assert_eq!(sample(&logits, &params, &[1, 2]), 0);
    assert_eq!(sample(&logits, &params, &[2]), 6);
}

#[test]
fn prompt_logprob_reports_rank_and_top() {
    let logits = vec![1.0f32, 3.0, 2.0, f32::NAN];
    let p = prompt_logprob(&logits, 2, 2);
    let lse = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
    assert!((p.token.logprob as f64 - (2.0 - lse)).abs() < 1e-5);
    assert_eq!(p.rank, 2);
    assert_eq!(
        p.top.iter().map(|t| t.token_id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(prompt_logprob(&logits, 1, 0).rank, 1);
    assert_eq!(prompt_logprob(&logits, 3, 0).rank, 4);
}

#[test]
fn min_tokens_blocks_eos_and_stop_ids() {
    let logits = vec![0.0, 10.0, 9.0, 1.0];
    let params = SamplingParams {
        min_tokens: 2,
        stop_token_ids: vec![2],
        ignore_eos: true,
        ..SamplingParams::greedy(5)
    };
    let eos = [1];
    let t = sample_token(&logits, &params, &[], &[7], &eos, &mut rng(0))
        .unwrap()
        .0;
    assert_eq!(t, 3, "EOS (1) and stop id (2) masked");
    let t = sample_token(&logits, &params, &[], &[7, 7], &eos, &mut rng(0))
        .unwrap()
        .0;
    assert_eq!(t, 1, "min_tokens reached");
    // Everything masked: fall back to the raw argmax rather than fail.
    let params = SamplingParams {
        min_tokens: 1,
        ..SamplingParams::greedy(5)
    };
    assert_eq!(
        sample_token(&[1.0, 2.0], &params, &[], &[], &[0, 1], &mut rng(0))
            .unwrap()
            .0,
        1
    );
}

#[test]
fn repetition_penalty_math() {
    let logits = [2.0, -2.0, 2.0, -2.0, 0.5];
    let params = SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::greedy(1)
    };
    // Token 0 in prompt and output (penalized once), 1 in prompt, 4 out of nothing.
    let w = processed(&logits, &params, &[0, 1, 0], &[0, 99], &[]);
    assert_eq!(w, vec![1.0, -4.0, 2.0, -2.0, 0.5]);
}

#[test]
fn frequency_and_presence_penalty_math() {
    let logits = [2.0, 2.0, 2.0, 2.0];
    let params = SamplingParams {
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..SamplingParams::greedy(1)
    };
    // Prompt tokens are not penalized by these; output counts: 0 x3, 2 x1.
    let w = processed(&logits, &params, &[1, 1], &[0, 2, 0, 0], &[]);
    assert_eq!(w, vec![2.0 - 1.5 - 0.25, 2.0, 2.0 - 0.5 - 0.25, 2.0]);
    // Negative penalties encourage.
    let params = SamplingParams {
        frequency_penalty: -1.0,
        ..SamplingParams::greedy(1)
    };
    assert_eq!(sample(&[1.0, 1.5], &params, &[0]), 0);
}

#[test]
fn top_k_one_is_greedy() {
    for seed in 0..10 {
        let logits = random_logits(5000, seed);
        let g = sample(&logits, &SamplingParams::greedy(1), &[]);
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 1,
            ..Default::default()
        };
        let t = sample_token(&logits, &params, &[], &[], &[], &mut rng(seed))
            .unwrap()
            .0;
        assert_eq!(t, g);
    }
}

#[test]
fn top_k_restricts_to_the_k_best() {
    let logits = random_logits(1000, 9);
    let mut sorted: Vec<usize> = (0..1000).collect();
    sorted.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for k in [3usize, 100] {
        let allowed = &sorted[..k];
        let params = SamplingParams {
            temperature: 5.0,
            top_k: k,
            ..Default::default()
        };
        let mut r = rng(5);
        for _ in 0..300 {
            let t = sample_token(&logits, &params, &[], &[], &[], &mut r)
                .unwrap()
                .0;
            assert!(allowed.contains(&(t as usize)));
        }
    }
    // top_k beyond the vocabulary is off, not a panic.
    let params = SamplingParams {
        top_k: 1_000_000,
        ..Default::default()
    };
    assert!(sample_token(&logits, &params, &[], &[], &[], &mut rng(0)).is_ok());
}

#[test]
fn tiny_top_p_is_greedy() {
    for seed in 0..10 {
        let logits = random_logits(5000, 100 + seed);
        let g = sample(&logits, &SamplingParams::greedy(1), &[]);
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            ..Default::default()
        };
        let t = sample_token(&logits, &params, &[], &[], &[], &mut rng(seed))
            .unwrap()
            .0;
        assert_eq!(t, g);
    }
}

#[test]
fn top_p_keeps_the_nucleus() {
    // probs 0.5, 0.25, 0.125, 0.125 -> top_p 0.7 keeps tokens {0, 1}.
    let l = |p: f64| p.ln() as f32;
    let logits = [l(0.125), l(0.5), l(0.125), l(0.25)];
    let params = SamplingParams {
        top_p: 0.7,
        ..Default::default()
    };
    let mut r = rng(11);
    let mut counts = [0usize; 4];
    for _ in 0..3000 {
        counts[sample_token(&logits, &params, &[], &[], &[], &mut r)
            .unwrap()
            .0 as usize] += 1;
    }
    assert_eq!(counts[0] + counts[2], 0);
    let frac = counts[1] as f64 / 3000.0;
    assert!((frac - 2.0 / 3.0).abs() < 0.04, "{frac}");
    // A large vocabulary forces several rounds of partial selection.
    let logits: Vec<f32> = (0..10_000).map(|i| -(i as f32) * 1e-3).collect();
    let params = SamplingParams {
        top_p: 0.5,
        ..Default::default()
    };
    let mut r = rng(12);
    for _ in 0..200 {
        let t = sample_token(&logits, &params, &[], &[], &[], &mut r)
            .unwrap()
            .0;
        // Mass of the first n tokens is ~(1 - e^{-n/1000}) / (1 - e^{-10}): half at ~n=693.
        assert!(t < 700, "{t}");
    }
}

#[test]
fn min_p_drops_unlikely_tokens() {
    // probs proportional to 1, 0.5, 0.05: min_p 0.1 drops token 2.
    let l = |p: f64| p.ln() as f32;
    let logits = [l(1.0), l(0.5), l(0.05)];
    let params = SamplingParams {
        min_p: 0.1,
        ..Default::default()
    };
    let mut r = rng(3);
    let mut seen = [0usize; 3];
    for _ in 0..5000 {
        seen[sample_token(&logits, &params, &[], &[], &[], &mut r)
            .unwrap()
            .0 as usize] += 1;
    }
    assert_eq!(seen[2], 0);
    assert!(seen[1] > 1000);
    // Same with top_k active (the candidate path).
    let params = SamplingParams {
        min_p: 0.6,
        top_k: 2,
        ..Default::default()
    };
    for _ in 0..500 {
        assert_eq!(
            sample_token(&logits, &params, &[], &[], &[], &mut r)
                .unwrap()
                .0,
            0
        );
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let logits = random_logits(2000, 77);
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(1234),
        ..Default::default()
    };
    let run = |seed: u64, choice: usize| {
        let mut r = SequenceRng::new(Some(seed), choice, 999);
        (0..50)
            .map(|_| {
                sample_token(&logits, &params, &[], &[], &[], &mut r)
                    .unwrap()
                    .0
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1234, 0), run(1234, 0));
    assert_ne!(run(1234, 0), run(4321, 0));
    assert_ne!(run(1234, 0), run(1234, 1), "choices of one request differ");
    // Greedy steps advance the stream too, so step k depends only on (seed, k).
    let mut a = SequenceRng::new(Some(5), 0, 0);
    let mut b = SequenceRng::new(Some(5), 0, 0);
    sample_token(&logits, &SamplingParams::greedy(1), &[], &[], &[], &mut a).unwrap();
    sample_token(&logits, &params, &[], &[], &[], &mut b).unwrap();
    let ta = sample_token(&logits, &params, &[], &[], &[], &mut a)
        .unwrap()
        .0;
    let tb = sample_token(&logits, &params, &[], &[], &[], &mut b)
        .unwrap()
        .0;
    assert_eq!(ta, tb);
}

#[test]
fn temperature_one_matches_softmax() {
    let logits = [0.0, 3f32.ln()];
    let params = SamplingParams::default();
    let mut r = rng(2024);
    let n = 20_000;
    let ones = (0..n)
        .filter(|_| {
            sample_token(&logits, &params, &[], &[], &[], &mut r)
                .unwrap()
                .0
                == 1
        })
        .count();
    let frac = ones as f64 / n as f64;
    assert!((frac - 0.75).abs() < 0.02, "{frac}");
}

#[test]
fn logprobs_are_raw_and_normalized() {
    let logits = random_logits(500, 8);
    let params = SamplingParams {
        temperature: 0.7,
        logit_bias: vec![(10, 50.0)],
        repetition_penalty: 1.3,
        logprobs: Some(5),
        ..Default::default()
    };
    let (t, lp) = sample_token(&logits, &params, &[1, 2], &[3], &[], &mut rng(0)).unwrap();
    assert_eq!(t, 10);
    let lp = lp.unwrap();
    let full = raw_logprobs(&logits, t, 500);
    let total: f64 = full.top.iter().map(|x| (x.logprob as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
    assert_eq!(lp.chosen.token_id, 10);
    assert_eq!(
        lp.chosen.logprob,
        full.top.iter().find(|x| x.token_id == 10).unwrap().logprob
    );
    assert_eq!(lp.top.len(), 5);
    assert_eq!(lp.top, full.top[..5].to_vec());
    assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    // k = 0: chosen only. Ties: lower id first.
    let (_, lp) = sample_token(
        &[1.0, 1.0, 1.0],
        &SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::greedy(1)
        },
        &[],
        &[],
        &[],
        &mut rng(0),
    )
    .unwrap();
    assert!(lp.unwrap().top.is_empty());
    let (_, lp) = sample_token(
        &[1.0, 2.0, 2.0],
        &SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy(1)
        },
        &[],
        &[],
        &[],
        &mut rng(0),
    )
    .unwrap();
    let ids: Vec<u32> = lp.unwrap().top.iter().map(|x| x.token_id).collect();
    assert_eq!(ids, vec![1, 2]);
    // Large k goes through the selection path and is clamped to the vocabulary.
    let big = raw_logprobs(&logits, 0, 100_000);
    assert_eq!(big.top.len(), 500);
    let small = raw_logprobs(&logits, 0, 64);
    assert_eq!(big.top[..64], small.top[..]);
}

#[test]
fn odd_rows_do_not_panic() {
    let params = SamplingParams {
        logprobs: Some(3),
        top_p: 0.9,
        top_k: 2,
        ..Default::default()
    };
    let nan = [f32::NAN; 8];
    assert_eq!(
        sample_token(&nan, &params, &[], &[], &[], &mut rng(0)),
        Err(SamplerError::NoUsableLogits)
    );
    assert_eq!(
        sample_token(&[], &params, &[], &[], &[], &mut rng(0)),
        Err(SamplerError::EmptyLogits)
    );
    let mixed = [f32::NAN, 1.0, f32::NEG_INFINITY, f32::NAN, 0.5];
    for p in [
        params.clone(),
        SamplingParams::default(),
        SamplingParams::greedy(1),
    ] {
        let (t, _) = sample_token(&mixed, &p, &[0, 9, 1], &[3, 1], &[2], &mut rng(1)).unwrap();
        assert!(t == 1 || t == 4);
    }
    let inf = [1.0, f32::INFINITY, f32::INFINITY, 2.0];
    let (t, lp) = sample_token(&inf, &params, &[], &[], &[], &mut rng(1)).unwrap();
    assert!(t == 1 || t == 2);
    assert!(lp.unwrap().chosen.logprob.is_finite());
    let weird = SamplingParams {
        temperature: f32::NAN,
        top_p: f32::NAN,
        min_p: 7.0,
        repetition_penalty: -1.0,
        frequency_penalty: f32::INFINITY,
        logit_bias: vec![(0, f32::NAN), (1, f32::INFINITY), (2, f32::NEG_INFINITY)],
        ..Default::default()
    };
    sample_token(&[1.0, 2.0, 3.0], &weird, &[1], &[1], &[], &mut rng(0)).unwrap();
    let weird = SamplingParams {
        temperature: f32::INFINITY,
        top_p: -1.0,
        min_p: f32::NAN,
        ..weird
    };
    sample_token(&[1.0, 2.0, 3.0], &weird, &[1], &[1], &[], &mut rng(0)).unwrap();
    let all_banned = SamplingParams {
        logit_bias: vec![(0, f32::NEG_INFINITY), (1, f32::NEG_INFINITY)],
        ..Default::default()
    };
    assert_eq!(
        sample_token(&[1.0, 2.0], &all_banned, &[], &[], &[], &mut rng(0))
            .unwrap()
            .0,
        1
    );
}

#[test]
fn fast_exp_is_accurate() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 0.0 {
        let rel = ((exp_nonpos(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
        worst = worst.max(rel);
        x += 0.0007;
    }
    assert!(worst < 1e-6, "{worst}");
    assert_eq!(exp_nonpos(0.0), 1.0);
    assert_eq!(exp_nonpos(-88.0), 0.0);
    assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_nonpos(f32::NAN), 0.0);
}

#[test]
fn vectorized_reductions_match_naive_ones() {
    let mut r = StdRng::seed_from_u64(42);
    for len in [1usize, 3, 7, 8, 9, 16, 17, 100, 1001] {
        for _ in 0..20 {
            // Few distinct values so ties are common; some NaN and infinities.
            let row: Vec<f32> = (0..len)
                .map(|_| match r.random_range(0..12) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 if len > 50 => f32::INFINITY,
                    v => v as f32,
                })
                .collect();
            let naive = row
                .iter()
                .enumerate()
                .fold(None, |best: Option<(usize, f32)>, (i, &v)| {
                    let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
                    match best {
                        Some((_, b)) if v <= b => best,
                        _ if v == f32::NEG_INFINITY => best,
                        _ => Some((i, v)),
                    }
                });
            assert_eq!(argmax(&row), naive.map(|(i, _)| i as u32), "{row:?}");
            let naive_max = row
                .iter()
                .map(|&v| sanitize(v))
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_value(&row), naive_max);
        }
    }
}

#[test]
fn bucketed_nucleus_matches_a_full_sort() {
    let mut r = StdRng::seed_from_u64(7);
    for case in 0..300 {
        let n = r.random_range(1..400);
        let levels = r.random_range(1..20);
        let mut cand: Vec<(u32, f32)> = (0..n)
            .map(|i| {
                (
                    i as u32,
                    exp_nonpos(-(r.random_range(0..levels) as f32) * 0.37),
                )
            })
            .collect();
        // The top token has weight 1 as in the sampler.
        cand[r.random_range(0..n)].1 = 1.0;
        let top_p = [1e-6f32, 0.1, 0.5, 0.9, 0.99][case % 5];
        let mut sorted = cand.clone();
        sorted.sort_by(better_first);
        let total: f64 = sorted.iter().map(|c| c.1 as f64).sum();
        let mut cum = 0.0;
        let mut keep = sorted.len();
        for (i, c) in sorted.iter().enumerate() {
            cum += c.1 as f64;
            if cum >= top_p as f64 * total {
                keep = i + 1;
                break;
            }
        }
        let mut expected: Vec<u32> = sorted[..keep].iter().map(|c| c.0).collect();
        nucleus(&mut cand, top_p);
        let mut got: Vec<u32> = cand.iter().map(|c| c.0).collect();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected, "case {case}, top_p {top_p}");
    }
}

#[test]
fn chunked_scan_matches_a_plain_inverse_cdf() {
    let logits = random_logits(5000, 31);
    let mut r = StdRng::seed_from_u64(1);
    for _ in 0..200 {
        let u: f64 = r.random();
        let m = max_value(&logits);
        let mut w = logits.clone();
        let got = sample_full(&mut w, m, 0.0, u).unwrap();
        let weights: Vec<f64> = logits.iter().map(|&x| exp_nonpos(x - m) as f64).collect();
        let target = u * weights.iter().sum::<f64>();
        let mut cum = 0.0;
        let expected = weights.iter().position(|&p| {
            cum += p;
            cum > target
        });
        assert_eq!(Some(got as usize), expected);
    }
}

/// Timing check on Qwen's vocabulary size: `cargo test --release -p spindle-engine
/// sampling_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn sampling_speed_on_a_large_vocabulary() {
    let logits: Vec<f32> = random_logits(151_936, 1).iter().map(|x| x * 3.0).collect();
    let prompt: Vec<u32> = (0..2000).map(|i| (i * 37) % 151_936).collect();
    let output: Vec<u32> = (0..500).map(|i| (i * 91) % 151_936).collect();
    let cases = [
        ("greedy", SamplingParams::greedy(1)),
        (
            "greedy+logprobs5",
            SamplingParams {
                logprobs: Some(5),
                ..SamplingParams::greedy(1)
            },
        ),
        ("temp1", SamplingParams::default()),
        (
            "top_k50",
            SamplingParams {
                top_k: 50,
                ..Default::default()
            },
        ),
        (
            "top_p0.9",
            SamplingParams {
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "top_k50+top_p0.9+min_p",
            SamplingParams {
                top_k: 50,
                top_p: 0.9,
                min_p: 0.05,
                ..Default::default()
            },
        ),
        (
            "penalties",
            SamplingParams {
                repetition_penalty: 1.1,
                frequency_penalty: 0.5,
                presence_penalty: 0.5,
                ..Default::default()
            },
        ),
    ];
    for (name, params) in cases {
        let mut r = rng(0);
        let n = 200;
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(
                sample_token(&logits, &params, &prompt, &output, &[0], &mut r).unwrap(),
            );
        }
        eprintln!(
            "{name:>24}: {:>8.1} us/token",
            start.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}

#[test]
fn batch_matches_single_rows() {
    let rows: Vec<Vec<f32>> = (0..16).map(|i| random_logits(3000, 500 + i)).collect();
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        ..Default::default()
    };
    let mut rngs: Vec<SequenceRng> = (0..16).map(|i| SequenceRng::new(Some(i), 0, 0)).collect();
    let mut inputs: Vec<SampleInput<'_>> = rows
        .iter()
        .zip(rngs.iter_mut())
        .map(|(l, rng)| SampleInput {
            logits: l,
            params: &params,
            prompt_ids: &[],
            output_ids: &[],
            eos_ids: &[],
            rng,
        })
        .collect();
    let batch = sample_batch(&mut inputs);
    for (i, (l, res)) in rows.iter().zip(batch).enumerate() {
        let single = sample_token(
            l,
            &params,
            &[],
            &[],
            &[],
            &mut SequenceRng::new(Some(i as u64), 0, 0),
        );
        assert_eq!(res, single);
    }
}
