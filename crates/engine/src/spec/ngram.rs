//! Prompt-lookup (n-gram) drafting: the tokens that followed the latest earlier occurrence of
//! the sequence's last `n` tokens (longest `n` first) are proposed as its next tokens. Grounded
//! text (code edits, quoted sources, repeated JSON keys) repeats its context, so these drafts
//! are often right; a sequence with no match drafts nothing and costs nothing.

/// Up to `k` draft tokens for `history` (prompt + output), matching suffixes of length
/// `max_n` down to `min_n`; empty when no earlier occurrence has a continuation.
pub fn propose_ngram(history: &[u32], k: usize, min_n: usize, max_n: usize) -> Vec<u32> {
    let len = history.len();
    if k == 0 || min_n == 0 {
        return Vec::new();
    }
    for n in (min_n..=max_n.min(len.saturating_sub(1))).rev() {
        let pattern = &history[len - n..];
        // Latest start j < len - n whose n tokens equal the suffix and that has a next token.
        let found = (0..len - n).rev().find(|&j| &history[j..j + n] == pattern);
        if let Some(j) = found {
            let from = j + n;
            let to = (from + k).min(len);
            return history[from..to].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_what_followed_the_latest_match_of_the_longest_suffix() {
        // ... 1 2 3 [4 5 6] ... 9 2 3 [7 8] ... 1 2 3
        let h = [1, 2, 3, 4, 5, 6, 0, 9, 2, 3, 7, 8, 0, 1, 2, 3];
        assert_eq!(propose_ngram(&h, 3, 1, 3), vec![4, 5, 6], "3-gram wins");
        assert_eq!(propose_ngram(&h, 3, 1, 2), vec![7, 8, 0], "latest 2-gram");
        assert_eq!(propose_ngram(&h, 2, 1, 3), vec![4, 5]);
    }

    #[test]
    fn no_match_or_no_room_drafts_nothing() {
        assert!(propose_ngram(&[1, 2, 3, 4], 3, 1, 3).is_empty());
        assert!(propose_ngram(&[1], 3, 1, 3).is_empty());
        assert!(propose_ngram(&[], 3, 1, 3).is_empty());
        assert!(propose_ngram(&[5, 5], 0, 1, 3).is_empty());
        // A match right before the suffix continues into the suffix itself.
        assert_eq!(propose_ngram(&[5, 5, 5], 4, 1, 2), vec![5]);
        // Below min_n nothing counts.
        assert!(propose_ngram(&[1, 2, 9, 2], 3, 2, 3).is_empty());
    }
}
