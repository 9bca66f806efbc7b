//! The router's decision for each token: softmax over the experts in f32, the top `k`, and
//! (per family) their weights renormalized to sum to one; or, for gpt-oss, the top `k` logits
//! and a softmax over those. Exact ties are rare but real (an
//! untrained router, duplicated experts); they are broken the way transformers breaks them on a
//! CPU, whose `torch.topk` selects with C++'s `std::nth_element` (libstdc++'s introselect) over
//! `(probability, index)` pairs (or `std::partial_sort`'s heap selection when `64 k <= n`):
//! [`select_top_k`] runs the same steps, so the chosen set is the one transformers chooses.

/// One token's chosen experts, ascending by expert index, with their weights.
pub type Choice = Vec<(usize, f32)>;

/// Route every token: `logits` is `[tokens, num_experts]` row-major.
pub fn route(logits: &[f32], num_experts: usize, top_k: usize, renormalize: bool) -> Vec<Choice> {
    logits
        .chunks_exact(num_experts)
        .map(|row| route_one(row, top_k, renormalize))
        .collect()
}

/// gpt-oss's routing: the top `k` logits, then a softmax over just those (in topk's
/// descending order, as transformers sums them).
pub fn route_top_k_softmax(logits: &[f32], num_experts: usize, top_k: usize) -> Vec<Choice> {
    logits
        .chunks_exact(num_experts)
        .map(|row| {
            let mut chosen = select_top_k(row, top_k);
            chosen.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let values: Vec<f32> = chosen.iter().map(|&e| row[e]).collect();
            let weights = softmax(&values);
            let mut choice: Choice = chosen.into_iter().zip(weights).collect();
            choice.sort_by_key(|&(e, _)| e);
            choice
        })
        .collect()
}

fn route_one(logits: &[f32], top_k: usize, renormalize: bool) -> Choice {
    let probs = softmax(logits);
    let chosen = select_top_k(&probs, top_k);
    // transformers sums the weights in topk's (descending) order before dividing.
    let mut ranked: Vec<usize> = chosen.clone();
    ranked.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let sum: f32 = ranked.iter().map(|&e| probs[e]).sum();
    let mut choice: Choice = chosen
        .into_iter()
        .map(|e| {
            (
                e,
                if renormalize {
                    probs[e] / sum
                } else {
                    probs[e]
                },
            )
        })
        .collect();
    choice.sort_by_key(|&(e, _)| e);
    choice
}

/// Softmax in f32: `exp(x - max) / sum`.
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The indices of the `k` largest `values` (NaN counts as largest), as torch's CPU `topk`
/// selects them: `std::nth_element(begin, begin + k - 1, end, greater)` over pairs in index
/// order, then the first `k` pairs. Returned in selection order.
pub fn select_top_k(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut q: Vec<(f32, usize)> = values.iter().copied().zip(0..).collect();
    if k * 64 <= n {
        // torch's `std::partial_sort` path: its heap selection decides the set.
        heap_select(&mut q, 0, k, n);
    } else {
        introselect(&mut q, k - 1);
    }
    q.truncate(k);
    q.into_iter().map(|(_, i)| i).collect()
}

/// torch's comparator for `largest`: NaN first, then descending values.
fn greater(x: &(f32, usize), y: &(f32, usize)) -> bool {
    (x.0.is_nan() && !y.0.is_nan()) || x.0 > y.0
}

/// libstdc++'s `__introselect` with depth limit `2 * floor(log2(n))`.
fn introselect(q: &mut [(f32, usize)], nth: usize) {
    let (mut first, mut last) = (0usize, q.len());
    let mut depth = 2 * (usize::BITS - 1 - q.len().leading_zeros()) as usize;
    while last - first > 3 {
        if depth == 0 {
            heap_select(q, first, nth + 1, last);
            q.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(q, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(q, first, last);
}

/// `__unguarded_partition_pivot`: median of (first + 1, mid, last - 1) moved to `first`, then
/// an unguarded Hoare partition of `first + 1 .. last` around it.
fn partition_pivot(q: &mut [(f32, usize)], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    let (a, b, c) = (first + 1, mid, last - 1);
    let median = if greater(&q[a], &q[b]) {
        if greater(&q[b], &q[c]) {
            b
        } else if greater(&q[a], &q[c]) {
            c
        } else {
            a
        }
    } else if greater(&q[a], &q[c]) {
        a
    } else if greater(&q[b], &q[c]) {
        c
    } else {
        b
    };
    q.swap(first, median);
    let (mut lo, mut hi) = (first + 1, last);
    loop {
        while greater(&q[lo], &q[first]) {
            lo += 1;
        }
        hi -= 1;
        while greater(&q[first], &q[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        q.swap(lo, hi);
        lo += 1;
    }
}

/// `__insertion_sort` on `first .. last`.
fn insertion_sort(q: &mut [(f32, usize)], first: usize, last: usize) {
    for i in first + 1..last.max(first + 1) {
        let val = q[i];
        if greater(&val, &q[first]) {
            q.copy_within(first..i, first + 1);
            q[first] = val;
        } else {
            let mut j = i;
            while greater(&val, &q[j - 1]) {
                q[j] = q[j - 1];
                j -= 1;
            }
            q[j] = val;
        }
    }
}

/// `__heap_select(first, middle, last)`: a heap of the first `middle - first` (top = smallest
/// under `greater`), each later element that beats the top replacing it.
fn heap_select(q: &mut [(f32, usize)], first: usize, middle: usize, last: usize) {
    let len = middle - first;
    make_heap(&mut q[first..middle]);
    for i in middle..last {
        if greater(&q[i], &q[first]) {
            // __pop_heap(first, middle, i): the top goes to i, i's value sifts in from the top.
            let val = q[i];
            q[i] = q[first];
            adjust_heap(&mut q[first..middle], 0, len, val);
        }
    }
}

fn make_heap(h: &mut [(f32, usize)]) {
    let len = h.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let val = h[parent];
        adjust_heap(h, parent, len, val);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// libstdc++'s `__adjust_heap` (sift the hole down to a leaf, then `__push_heap` back up).
fn adjust_heap(h: &mut [(f32, usize)], mut hole: usize, len: usize, val: (f32, usize)) {
    let top = hole;
    let mut child = hole;
    while child < (len.saturating_sub(1)) / 2 {
        child = 2 * (child + 1);
        if greater(&h[child], &h[child - 1]) {
            child -= 1;
        }
        h[hole] = h[child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        h[hole] = h[child - 1];
        hole = child - 1;
    }
    let mut parent = hole.wrapping_sub(1) / 2;
    while hole > top && greater(&h[parent], &val) {
        h[hole] = h[parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    h[hole] = val;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(mut v: Vec<usize>) -> Vec<usize> {
        v.sort();
        v
    }

    #[test]
    fn ties_are_broken_as_torch_topk_breaks_them_on_a_cpu() {
        // Sets torch 2.15's CPU topk returned for these inputs.
        assert_eq!(set(select_top_k(&[0.1, 0.3, 0.3, 0.3], 2)), vec![2, 3]);
        assert_eq!(set(select_top_k(&[0.25; 8], 2)), vec![5, 6]);
        assert_eq!(
            set(select_top_k(&[0.25; 64], 8)),
            (40..48).collect::<Vec<_>>()
        );
        let pattern: Vec<f32> = (0..65).map(|i| [0.2, 0.1, 0.2, 0.2, 0.1][i % 5]).collect();
        assert_eq!(
            set(select_top_k(&pattern, 8)),
            vec![22, 25, 28, 30, 32, 33, 52, 53]
        );
        // torch's partial_sort path (64 k <= n).
        let mut v = vec![0.5; 3];
        v.extend([0.25; 130]);
        assert_eq!(set(select_top_k(&v, 2)), vec![0, 1]);
        assert_eq!(set(select_top_k(&[0.25; 130], 2)), vec![0, 1]);
        let mut v = vec![0.1; 200];
        v.extend([0.3; 5]);
        assert_eq!(set(select_top_k(&v, 3)), vec![200, 201, 202]);
    }

    #[test]
    fn distinct_values_pick_the_largest() {
        let v: Vec<f32> = (0..60).map(|i| ((i * 37) % 60) as f32).collect();
        let top = set(select_top_k(&v, 4));
        let mut want: Vec<usize> = (0..60).collect();
        want.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        assert_eq!(top, set(want[..4].to_vec()));
        assert_eq!(select_top_k(&v, 0), Vec::<usize>::new());
    }

    #[test]
    fn routing_renormalizes_when_the_family_does() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let plain = route(&logits, 4, 2, false);
        let norm = route(&logits, 4, 2, true);
        assert_eq!(plain[0].iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
        let s: f32 = norm[0].iter().map(|c| c.1).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(plain[0].iter().map(|c| c.1).sum::<f32>() < 0.95);
        // gpt-oss: softmax over the chosen logits only.
        let oss = route_top_k_softmax(&logits, 4, 2);
        let (e1, e2) = ((3.0f32 - 3.0).exp(), (2.0f32 - 3.0).exp());
        assert_eq!(oss[0][0].0, 1);
        assert!((oss[0][0].1 - e1 / (e1 + e2)).abs() < 1e-7);
        assert!((oss[0][1].1 - e2 / (e1 + e2)).abs() < 1e-7);
    }
}
