//! Per-sequence token sampling with vLLM semantics.
//!
//! [`sample_token`] turns one row of raw logits into a token. Processing happens on a working
//! copy, in this order:
//!
//! 1. `logit_bias` (ids outside the vocabulary and NaN biases are skipped), then
//!    `allowed_token_ids` (every other id to −inf) and `bad_words` (the last token of a banned
//!    sequence to −inf when the output ends with the rest of it);
//! 2. `min_tokens`: while fewer than `min_tokens` tokens were generated, every id in `eos_ids`
//!    and `stop_token_ids` is masked to −inf (also with `ignore_eos`);
//! 3. `repetition_penalty` over the distinct tokens of prompt ∪ output (positive logits are
//!    divided, the others multiplied);
//! 4. `frequency_penalty × count` and `presence_penalty` (once) over the output tokens,
//!    subtracted;
//! 5. temperature `< 1e-5` (or NaN): greedy argmax, ties to the lowest id; otherwise divide by
//!    the temperature, then
//! 6. `top_k` (exactly k tokens, ties to the lowest id; 0 or ≥ vocab disables it),
//! 7. `top_p` (the smallest most-likely set with mass ≥ `top_p`; the top token is always kept),
//! 8. `min_p` (drop tokens whose probability is below `min_p` × the top probability),
//! 9. inverse-CDF sampling from the renormalized distribution with the sequence's RNG.
//!
//! Odd values never panic: NaN logits count as −inf and +inf as `f32::MAX`. If processing masks
//! every token (e.g. a −inf bias on all of them), the token is the argmax of the raw row; a row
//! with no usable value at all (empty, or all NaN/−inf) is a [`SamplerError`].
//!
//! Softmax weights use a branch-free `exp` (relative error ≈ 2e-7) so a 150k-entry row
//! vectorizes; sums are accumulated in f64.
//!
//! Logprobs, when requested, come from the *raw* row (log-softmax of the unmodified logits, as
//! vLLM reports by default), whatever processing chose the token.
//!
//! # RNG contract
//!
//! Every call to [`sample_token`] draws exactly one `f64` from the sequence's [`SequenceRng`],
//! greedy or not and before anything can fail. The k-th token of a sequence therefore only
//! depends on the seed and that step's logits, never on batch composition or on how earlier
//! steps were sampled.

use std::cell::RefCell;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::api::{PromptTokenLogprob, SamplerError, SamplingParams, StepLogprobs, TokenLogprob};

/// Temperatures below this are greedy (as in vLLM).
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// A sequence's private random stream, so seeded requests reproduce whatever else is batched
/// with them.
#[derive(Debug, Clone)]
pub struct SequenceRng(StdRng);

impl SequenceRng {
    /// Seeded requests use `seed + choice_index` (so the `n` choices differ but each is
    /// reproducible, like vLLM's per-child seeds); unseeded ones use
    /// `fallback_seed + choice_index`, where the engine supplies a fresh random `fallback_seed`
    /// per request.
    pub fn new(seed: Option<u64>, choice_index: usize, fallback_seed: u64) -> Self {
        let base = seed.unwrap_or(fallback_seed);
        Self(StdRng::seed_from_u64(
            base.wrapping_add(choice_index as u64),
        ))
    }

    /// One uniform draw in [0, 1).
    fn next_uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }
}

/// One row of a batch for [`sample_batch`]: the same inputs as [`sample_token`].
#[derive(Debug)]
pub struct SampleInput<'a> {
    /// The row's raw logits (one vocabulary-wide row of the model output).
    pub logits: &'a [f32],
    /// The sequence's request settings.
    pub params: &'a SamplingParams,
    /// Prompt tokens, for the repetition penalty.
    pub prompt_ids: &'a [u32],
    /// Tokens generated so far, for penalties and `min_tokens`.
    pub output_ids: &'a [u32],
    /// The model's EOS ids, masked while `min_tokens` is not reached.
    pub eos_ids: &'a [u32],
    /// The sequence's private random stream (advanced exactly once).
    pub rng: &'a mut SequenceRng,
}

/// What [`sample_token`] returns: the token and, when requested, its logprobs.
pub type SampleResult = Result<(u32, Option<StepLogprobs>), SamplerError>;

/// Sample every row of a batch in parallel (rows are independent; each uses its own RNG), so a
/// large batch over a 150k vocabulary does not serialize on one core. Results are in row order.
pub fn sample_batch(rows: &mut [SampleInput<'_>]) -> Vec<SampleResult> {
    if rows.len() <= 1 {
        return rows.iter_mut().map(sample_row).collect();
    }
    rows.par_iter_mut().map(sample_row).collect()
}

fn sample_row(r: &mut SampleInput<'_>) -> SampleResult {
    sample_token(
        r.logits,
        r.params,
        r.prompt_ids,
        r.output_ids,
        r.eos_ids,
        r.rng,
    )
}

/// Sample one token from a row of raw logits (see the module docs for the exact semantics).
pub fn sample_token(
    logits: &[f32],
    params: &SamplingParams,
    prompt_ids: &[u32],
    output_ids: &[u32],
    eos_ids: &[u32],
    rng: &mut SequenceRng,
) -> SampleResult {
    let u = rng.next_uniform();
    if logits.is_empty() {
        return Err(SamplerError::EmptyLogits);
    }
    let greedy = params.temperature.is_nan() || params.temperature < GREEDY_TEMPERATURE;
    let process = needs_processing(params, prompt_ids, output_ids, eos_ids);

    let token = if greedy && !process {
        argmax(logits)
    } else {
        with_scratch(|w| {
            w.clear();
            w.extend(logits.iter().map(|&x| sanitize(x)));
            if process {
                apply_processing(w, params, prompt_ids, output_ids, eos_ids);
            }
            if greedy {
                argmax(w)
            } else {
                sample_processed(w, params, u)
            }
        })
        .or_else(|| argmax(logits))
    };
    let token = token.ok_or(SamplerError::NoUsableLogits)?;

    let logprobs = params.logprobs.map(|k| raw_logprobs(logits, token, k));
    Ok((token, logprobs))
}

/// The greedy token of a raw row (the largest logit, ties to the lowest id; NaN counts as
/// −inf): what a draft model proposes. `None` if no value is above −inf.
pub(crate) fn greedy_token(logits: &[f32]) -> Option<u32> {
    argmax(logits)
}

/// NaN counts as −inf, +inf as the largest finite value (so softmax stays finite).
#[inline]
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::MAX
    } else {
        x
    }
}

/// Width of the hand-unrolled reductions below: fixed-size lane arrays let LLVM use SIMD
/// without reassociating floating-point math (results do not depend on the target).
const LANES: usize = 8;

/// Index of the largest value, ties to the lowest index; NaN counts as −inf. `None` if no value
/// is above −inf. One vectorized pass.
fn argmax(values: &[f32]) -> Option<u32> {
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut idx = [u32::MAX; LANES];
    let chunks = values.chunks_exact(LANES);
    let rem = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let base = (c * LANES) as u32;
        for l in 0..LANES {
            let v = chunk[l];
            let better = v > best[l];
            best[l] = if better { v } else { best[l] };
            idx[l] = if better { base + l as u32 } else { idx[l] };
        }
    }
    let mut result: Option<(f32, u32)> = None;
    for l in 0..LANES {
        if idx[l] == u32::MAX {
            continue;
        }
        let wins = match result {
            None => true,
            Some((v, i)) => best[l] > v || (best[l] == v && idx[l] < i),
        };
        if wins {
            result = Some((best[l], idx[l]));
        }
    }
    let base = values.len() - rem.len();
    for (j, &v) in rem.iter().enumerate() {
        if v > result.map_or(f32::NEG_INFINITY, |r| r.0) {
            result = Some((v, (base + j) as u32));
        }
    }
    result.map(|r| r.1)
}

/// Largest sanitized value (−inf if none). One vectorized pass.
fn max_value(values: &[f32]) -> f32 {
    let mut best = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rem = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            let v = sanitize(chunk[l]);
            best[l] = if v > best[l] { v } else { best[l] };
        }
    }
    rem.iter()
        .map(|&v| sanitize(v))
        .chain(best)
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// Sum in f64 with independent lane accumulators (vectorizes; no long dependency chain).
fn sum_f64(values: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rem = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += chunk[l] as f64;
        }
    }
    acc.iter().sum::<f64>() + rem.iter().map(|&v| v as f64).sum::<f64>()
}

/// `e^x` for `x ≤ 0`, the only range softmax weights need; 0 below −87 (and for −inf/NaN).
/// Branch-free so loops over a vocabulary vectorize; relative error ≈ 2e-7 (a few ulp),
/// far below what sampling can notice.
#[inline]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x.is_nan() || x < -87.0;
    let xc = x.clamp(-87.0, 0.0);
    let t = xc * LOG2_E + ROUND;
    let n = t - ROUND;
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Taylor series of e^r on |r| ≤ ln2/2 (truncation error < 1.3e-7).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        p * scale
    }
}

fn repetition_active(p: f32) -> bool {
    p.is_finite() && p > 0.0 && p != 1.0
}

fn penalty_active(p: f32) -> bool {
    p.is_finite() && p != 0.0
}

/// Whether any step before temperature would change the row (greedy fast path otherwise).
fn needs_processing(
    params: &SamplingParams,
    prompt_ids: &[u32],
    output_ids: &[u32],
    eos_ids: &[u32],
) -> bool {
    !params.logit_bias.is_empty()
        || !params.allowed_token_ids.is_empty()
        || !params.bad_words.is_empty()
        || (output_ids.len() < params.min_tokens
            && (!eos_ids.is_empty() || !params.stop_token_ids.is_empty()))
        || (repetition_active(params.repetition_penalty)
            && (!prompt_ids.is_empty() || !output_ids.is_empty()))
        || ((penalty_active(params.frequency_penalty) || penalty_active(params.presence_penalty))
            && !output_ids.is_empty())
}

/// Steps 1–4 of the module docs, in place on a sanitized copy of the row.
fn apply_processing(
    w: &mut [f32],
    params: &SamplingParams,
    prompt_ids: &[u32],
    output_ids: &[u32],
    eos_ids: &[u32],
) {
    let vocab = w.len();
    for &(id, bias) in &params.logit_bias {
        if let Some(x) = w.get_mut(id as usize) {
            if !bias.is_nan() {
                *x = sanitize(*x + bias);
            }
        }
    }
    if !params.allowed_token_ids.is_empty() {
        let mut allowed = vec![false; vocab];
        for &id in &params.allowed_token_ids {
            if let Some(a) = allowed.get_mut(id as usize) {
                *a = true;
            }
        }
        for (x, ok) in w.iter_mut().zip(allowed) {
            if !ok {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    for word in &params.bad_words {
        let Some((&last, prefix)) = word.split_last() else {
            continue;
        };
        if output_ids.ends_with(prefix) {
            if let Some(x) = w.get_mut(last as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    if output_ids.len() < params.min_tokens {
        for &id in eos_ids.iter().chain(&params.stop_token_ids) {
            if let Some(x) = w.get_mut(id as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    let rp = params.repetition_penalty;
    if repetition_active(rp) {
        let mut seen = vec![0u64; vocab.div_ceil(64)];
        for &id in prompt_ids.iter().chain(output_ids) {
            let i = id as usize;
            if i >= vocab || seen[i / 64] & (1 << (i % 64)) != 0 {
                continue;
            }
            seen[i / 64] |= 1 << (i % 64);
            let x = &mut w[i];
            *x = sanitize(if *x > 0.0 { *x / rp } else { *x * rp });
        }
    }
    let freq = if penalty_active(params.frequency_penalty) {
        params.frequency_penalty
    } else {
        0.0
    };
    let pres = if penalty_active(params.presence_penalty) {
        params.presence_penalty
    } else {
        0.0
    };
    if (freq != 0.0 || pres != 0.0) && !output_ids.is_empty() {
        let mut ids: Vec<u32> = output_ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab)
            .collect();
        ids.sort_unstable();
        for run in ids.chunk_by(|a, b| a == b) {
            let x = &mut w[run[0] as usize];
            *x = sanitize(*x - (freq * run.len() as f32 + pres));
        }
    }
}

thread_local! {
    /// Per-thread working row and candidate list, so sampling a 150k vocabulary does not
    /// allocate every step.
    static SCRATCH_ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_CANDIDATES: RefCell<Vec<(u32, f32)>> = const { RefCell::new(Vec::new()) };
}

fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    SCRATCH_ROW.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Vec::new()),
    })
}

fn with_candidates<R>(f: impl FnOnce(&mut Vec<(u32, f32)>) -> R) -> R {
    SCRATCH_CANDIDATES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Vec::new()),
    })
}

/// Total order "more likely first, then lower id".
fn better_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Steps 5–9 on a processed row: temperature, top-k, top-p, min-p, then draw with `u`.
/// `None` when nothing is left to sample (the caller falls back to the raw argmax).
fn sample_processed(w: &mut [f32], params: &SamplingParams, u: f64) -> Option<u32> {
    let t = params.temperature.min(f32::MAX);
    if t != 1.0 {
        for x in w.iter_mut() {
            *x = sanitize(*x / t);
        }
    }
    let vocab = w.len();
    let top_k = if params.top_k == 0 || params.top_k >= vocab {
        None
    } else {
        Some(params.top_k)
    };
    let top_p = params.top_p;
    let top_p_active = !top_p.is_nan() && top_p < 1.0;
    let min_p = if params.min_p.is_nan() {
        0.0
    } else {
        params.min_p.clamp(0.0, 1.0)
    };

    let m = max_value(w);
    if m == f32::NEG_INFINITY {
        return None;
    }
    if top_k.is_none() && !top_p_active {
        return sample_full(w, m, min_p, u);
    }
    with_candidates(|cand| {
        cand.clear();
        match top_k {
            Some(k) => cand.extend(top_k_entries(w, k)),
            None => cand.extend(
                w.iter()
                    .enumerate()
                    .filter(|(_, &x)| x > f32::NEG_INFINITY)
                    .map(|(i, &x)| (i as u32, x)),
            ),
        }
        // Values become unnormalized probabilities relative to the top token (weight 1).
        for c in cand.iter_mut() {
            c.1 = exp_nonpos(c.1 - m);
        }
        cand.retain(|&(_, p)| p > 0.0);
        if top_p_active {
            nucleus(cand, top_p);
        }
        if min_p > 0.0 {
            cand.retain(|&(_, p)| p >= min_p);
        }
        draw(cand, u)
    })
}

/// Sampling without top-k/top-p: softmax weights in place, then an inverse-CDF scan in id order
/// (by chunks, so the scan skips most of the row).
fn sample_full(w: &mut [f32], m: f32, min_p: f32, u: f64) -> Option<u32> {
    for x in w.iter_mut() {
        let p = exp_nonpos(*x - m);
        *x = if p >= min_p { p } else { 0.0 };
    }
    let total = sum_f64(w);
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let target = u * total;
    const CHUNK: usize = 512;
    let mut cum = 0.0f64;
    for (c, chunk) in w.chunks(CHUNK).enumerate() {
        let s = sum_f64(chunk);
        if cum + s <= target {
            cum += s;
            continue;
        }
        for (j, &p) in chunk.iter().enumerate() {
            if p > 0.0 {
                cum += p as f64;
                if cum > target {
                    return Some((c * CHUNK + j) as u32);
                }
            }
        }
    }
    // Rounding left the target just out of reach: the last token with any mass.
    w.iter().rposition(|&p| p > 0.0).map(|i| i as u32)
}

/// Inverse-CDF draw over candidates `(id, weight)`; the last one absorbs rounding.
fn draw(cand: &[(u32, f32)], u: f64) -> Option<u32> {
    let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
    if total.is_nan() || total <= 0.0 {
        return cand.first().map(|c| c.0);
    }
    let target = u * total;
    let mut cum = 0.0f64;
    for c in cand {
        cum += c.1 as f64;
        if cum > target {
            return Some(c.0);
        }
    }
    cand.last().map(|c| c.0)
}

/// Keep the nucleus: the smallest set of most likely candidates (weights in (0, 1], ties to the
/// lower id) whose mass reaches `top_p` of the total, at least the top one. Instead of sorting
/// the vocabulary, weights are bucketed by their float bits (1/16-octave buckets, monotonic in
/// the weight); only the bucket where the mass crosses `top_p` is sorted.
fn nucleus(cand: &mut Vec<(u32, f32)>, top_p: f32) {
    const SHIFT: u32 = 19;
    const ONE: u32 = 0x3F80_0000; // 1.0f32
    const BUCKETS: usize = (ONE >> SHIFT) as usize + 1;
    let bucket = |p: f32| (ONE.saturating_sub(p.to_bits()) >> SHIFT) as usize;
    let mut mass = vec![0f64; BUCKETS];
    let mut total = 0.0f64;
    for c in cand.iter() {
        mass[bucket(c.1)] += c.1 as f64;
        total += c.1 as f64;
    }
    let target = top_p.max(0.0) as f64 * total;
    let mut cum = 0.0f64;
    let mut crossing = None;
    for (b, &m) in mass.iter().enumerate() {
        if m <= 0.0 {
            continue;
        }
        if cum + m >= target {
            crossing = Some(b);
            break;
        }
        cum += m;
    }
    let Some(crossing) = crossing else { return };
    let mut boundary: Vec<(u32, f32)> = cand
        .iter()
        .copied()
        .filter(|c| bucket(c.1) == crossing)
        .collect();
    boundary.sort_unstable_by(better_first);
    let mut take = 0;
    for c in &boundary {
        take += 1;
        cum += c.1 as f64;
        if cum >= target {
            break;
        }
    }
    boundary.truncate(take.max(1));
    cand.retain(|c| bucket(c.1) < crossing);
    cand.extend(boundary);
}

/// The `k` largest entries of `values` as `(id, value)`, most likely first, ties to the lower id.
/// NaN counts as −inf. Small `k` uses a bounded insertion list (one pass, no big allocation).
fn top_k_entries(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k <= 64 {
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        let mut worst = f32::NEG_INFINITY;
        for (i, &v) in values.iter().enumerate() {
            // Ids arrive in increasing order, so an equal value never beats the last entry.
            if best.len() == k && (v.is_nan() || v <= worst) {
                continue;
            }
            let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
            if best.len() == k {
                best.pop();
            }
            let pos = best.partition_point(|&(_, x)| x >= v);
            best.insert(pos, (i as u32, v));
            if best.len() == k {
                worst = best[k - 1].1;
            }
        }
        return best;
    }
    let mut all: Vec<(u32, f32)> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, if v.is_nan() { f32::NEG_INFINITY } else { v }))
        .collect();
    if k < all.len() {
        all.select_nth_unstable_by(k - 1, better_first);
        all.truncate(k);
    }
    all.sort_unstable_by(better_first);
    all
}

/// A prompt token's logprob at the position before it: the raw row's log-softmax for `target`,
/// its rank (1 + the tokens with a strictly larger logit) and the top `k`.
pub fn prompt_logprob(logits: &[f32], target: u32, k: usize) -> PromptTokenLogprob {
    let step = raw_logprobs(logits, target, k);
    let x = logits
        .get(target as usize)
        .map_or(f32::NEG_INFINITY, |&x| sanitize(x));
    let rank = 1 + logits.iter().filter(|&&y| sanitize(y) > x).count();
    PromptTokenLogprob {
        token: step.chosen,
        rank,
        top: step.top,
    }
}

/// Log-softmax of the raw row for the chosen token and the top `k` (NaN counts as −inf).
fn raw_logprobs(logits: &[f32], chosen: u32, k: usize) -> StepLogprobs {
    let m = max_value(logits);
    let lse = if m == f32::NEG_INFINITY {
        f64::INFINITY
    } else {
        // Blocks of weights on the stack: the exp loop and the sum each vectorize.
        let mut weights = [0f32; 256];
        let mut sum = 0.0f64;
        for chunk in logits.chunks(weights.len()) {
            let out = &mut weights[..chunk.len()];
            for (w, &x) in out.iter_mut().zip(chunk) {
                // +inf counts as f32::MAX; NaN (and −inf) get weight 0 from exp_nonpos.
                let x = if x > f32::MAX { f32::MAX } else { x };
                *w = exp_nonpos(x - m);
            }
            sum += sum_f64(out);
        }
        m as f64 + sum.ln()
    };
    let lp = |x: f32| -> f32 {
        let x = sanitize(x);
        if x > f32::NEG_INFINITY {
            (x as f64 - lse) as f32
        } else {
            f32::NEG_INFINITY
        }
    };
    let chosen_lp = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |&x| lp(x));
    let top = top_k_entries(logits, k)
        .into_iter()
        .map(|(id, x)| TokenLogprob {
            token_id: id,
            logprob: lp(x),
        })
        .collect();
    StepLogprobs {
        chosen: TokenLogprob {
            token_id: chosen,
            logprob: chosen_lp,
        },
        top,
    }
}

#[cfg(test)]
mod tests;
