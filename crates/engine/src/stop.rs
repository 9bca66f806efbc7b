//! Stop strings matched on the detokenized output, across token boundaries.
//!
//! Text is fed as it is detokenized. The checker holds back the shortest tail that could still
//! be the beginning of a stop string (at most the longest stop string minus one byte, always at
//! a char boundary) and emits everything before it, so streamed text never contains a stop
//! string or anything after one.
//!
//! Match priority: the first stop string to *complete* wins. Among matches that complete within
//! the same push, the one starting earliest in the text wins; at equal start positions the
//! longer one wins (then the earlier-listed one, for duplicates). A longer stop string that
//! started earlier but is still incomplete when a shorter one completes does not win: like vLLM,
//! generation stops as soon as a stop string is seen.
//!
//! `min_tokens`: while a sequence has not generated more than `min_tokens` tokens its text goes
//! through [`StopChecker::push_unmatched`]: no stop string may end there (vLLM checks stop
//! strings only past `min_tokens`), but a stop string that starts there and completes later
//! still matches, since the possible prefix is held back as usual.
//!
//! Engine usage per new token: `let (text, hit) = stop.push(&detok.push(..)?)`; emit `text`; on
//! `Some(s)` finish with `FinishReason::Stop` / `StopReason::Text(s)`. At EOS or length:
//! `stop.push(&detok.finish(..)?)` (a stop string may still complete there) and then, if that did
//! not match, `stop.finish()` for the held-back tail.

/// Streaming stop-string matcher for one sequence, so stop strings spanning several tokens are
/// caught and never leak into the output.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stops: Vec<String>,
    include_stop_str_in_output: bool,
    /// Text received but not yet emitted (a possible stop-string prefix).
    held: String,
    /// Matches must end after this byte of `held` (text pushed before `min_tokens` was reached).
    match_after: usize,
    stopped: bool,
}

impl StopChecker {
    /// A checker for `stop` (empty strings are ignored); with `include_stop_str_in_output` the
    /// matched stop string is emitted, otherwise output ends right before it.
    pub fn new(stop: &[String], include_stop_str_in_output: bool) -> Self {
        Self {
            stops: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            include_stop_str_in_output,
            held: String::new(),
            match_after: 0,
            stopped: false,
        }
    }

    /// Whether a stop string matched; afterwards all input is ignored.
    #[cfg(test)]
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feed newly detokenized text. Returns the text that is safe to emit now and, if a stop
    /// string matched, that string (the output is then final: truncated before the stop string,
    /// or right after it with `include_stop_str_in_output`).
    pub fn push(&mut self, new_text: &str) -> (String, Option<String>) {
        if self.stopped {
            return (String::new(), None);
        }
        if self.stops.is_empty() {
            return (new_text.to_owned(), None);
        }
        self.held.push_str(new_text);

        // Earliest start, then longest, then earliest listed.
        let mut best: Option<(usize, usize)> = None; // (position, index into stops)
        for (i, stop) in self.stops.iter().enumerate() {
            // Only matches ending after `match_after`, i.e. starting at or after `from`.
            let mut from = (self.match_after + 1).saturating_sub(stop.len());
            while !self.held.is_char_boundary(from) {
                from += 1;
            }
            if let Some(pos) = self.held[from..].find(stop.as_str()).map(|p| p + from) {
                let better = match best {
                    None => true,
                    Some((bp, bi)) => pos < bp || (pos == bp && stop.len() > self.stops[bi].len()),
                };
                if better {
                    best = Some((pos, i));
                }
            }
        }
        if let Some((pos, i)) = best {
            let stop = self.stops[i].clone();
            let end = if self.include_stop_str_in_output {
                pos + stop.len()
            } else {
                pos
            };
            let mut out = std::mem::take(&mut self.held);
            out.truncate(end);
            self.stopped = true;
            return (out, Some(stop));
        }

        (self.emit_safe_prefix(), None)
    }

    /// Feed text generated before `min_tokens` was passed: no stop string may end in it, but
    /// one may start in it and complete in a later [`Self::push`].
    pub fn push_unmatched(&mut self, new_text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        if self.stops.is_empty() {
            return new_text.to_owned();
        }
        self.held.push_str(new_text);
        self.match_after = self.held.len();
        self.emit_safe_prefix()
    }

    /// Emit everything but the longest tail that could still begin a stop string.
    fn emit_safe_prefix(&mut self) -> String {
        let keep = self.partial_match_len();
        let cut = self.held.len() - keep;
        let rest = self.held.split_off(cut);
        self.match_after = self.match_after.saturating_sub(cut);
        std::mem::replace(&mut self.held, rest)
    }

    /// [`Self::push`] once `min_tokens` is passed (`may_match`), else [`Self::push_unmatched`].
    pub fn feed(&mut self, new_text: &str, may_match: bool) -> (String, Option<String>) {
        if may_match {
            self.push(new_text)
        } else {
            (self.push_unmatched(new_text), None)
        }
    }

    /// Release the held-back text at the end of the sequence (EOS or length).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        self.match_after = 0;
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string (it
    /// always starts at a char boundary because it starts like a stop string does).
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_bytes();
        let mut keep = 0;
        for stop in &self.stops {
            let stop = stop.as_bytes();
            let max = (stop.len() - 1).min(held.len());
            // Longest first; stop early once shorter than what is already kept.
            for k in (keep + 1..=max).rev() {
                if held[held.len() - k..] == stop[..k] {
                    keep = k;
                    break;
                }
            }
        }
        // Defensive: a match always starts at a char boundary, but never split a char anyway.
        let mut cut = self.held.len() - keep;
        while !self.held.is_char_boundary(cut) {
            cut -= 1;
        }
        self.held.len() - cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(stops: &[&str], include: bool) -> StopChecker {
        StopChecker::new(
            &stops.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            include,
        )
    }

    /// Feed `chunks`; return (all emitted text, matched stop).
    fn run(c: &mut StopChecker, chunks: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        for chunk in chunks {
            let (t, hit) = c.push(chunk);
            out.push_str(&t);
            if hit.is_some() {
                // Nothing after a match, ever.
                assert_eq!(c.push("more text"), (String::new(), None));
                assert_eq!(c.finish(), "");
                return (out, hit);
            }
        }
        out.push_str(&c.finish());
        (out, None)
    }

    #[test]
    fn no_stops_passes_through() {
        let mut c = checker(&[], false);
        assert_eq!(c.push("hello"), ("hello".into(), None));
        let mut c = checker(&[""], false);
        assert_eq!(c.push("hello"), ("hello".into(), None));
        assert_eq!(c.finish(), "");
    }

    #[test]
    fn match_within_one_push_with_text_before() {
        let mut c = checker(&["STOP"], false);
        assert_eq!(c.push("abc STOP def"), ("abc ".into(), Some("STOP".into())));
        let mut c = checker(&["STOP"], true);
        assert_eq!(
            c.push("abc STOP def"),
            ("abc STOP".into(), Some("STOP".into()))
        );
    }

    #[test]
    fn match_spanning_three_pushes() {
        let mut c = checker(&["<end>"], false);
        let (t, hit) = c.push("hello <");
        assert_eq!((t.as_str(), hit), ("hello ", None));
        assert_eq!(c.push("en"), (String::new(), None));
        assert_eq!(c.push("d> tail"), (String::new(), Some("<end>".into())));

        let mut c = checker(&["<end>"], true);
        assert_eq!(
            run(&mut c, &["x<", "e", "nd", ">y"]),
            ("x<end>".into(), Some("<end>".into()))
        );
    }

    #[test]
    fn false_start_is_released() {
        let mut c = checker(&["abc"], false);
        assert_eq!(c.push("xab"), ("x".into(), None));
        assert_eq!(c.push("d"), ("abd".into(), None));
        assert_eq!(c.push("ab"), (String::new(), None));
        assert_eq!(c.finish(), "ab");
        // Overlapping candidate: "aab" + "c" must match "abc".
        let mut c = checker(&["abc"], false);
        assert_eq!(
            run(&mut c, &["aa", "b", "c"]),
            ("a".into(), Some("abc".into()))
        );
    }

    #[test]
    fn earliest_then_longest_wins() {
        let mut c = checker(&["world", "o w"], false);
        assert_eq!(c.push("hello world"), ("hell".into(), Some("o w".into())));
        let mut c = checker(&["ab", "abcd"], true);
        assert_eq!(c.push("xabcdx"), ("xabcd".into(), Some("abcd".into())));
        // A stop that completes first wins over a longer one still in progress.
        let mut c = checker(&["abcd", "c"], false);
        assert_eq!(
            run(&mut c, &["ab", "c", "d"]),
            ("ab".into(), Some("c".into()))
        );
    }

    #[test]
    fn multibyte_chars_near_the_boundary() {
        // The stop string starts with a multi-byte char; text ends with a different char that
        // shares no prefix: nothing may be held back in the middle of a char.
        let mut c = checker(&["é!"], false);
        assert_eq!(c.push("caf"), ("caf".into(), None));
        assert_eq!(
            c.push("é"),
            (String::new(), None),
            "é could start the stop string"
        );
        assert_eq!(c.push("!"), (String::new(), Some("é!".into())));

        let mut c = checker(&["👋 bye"], false);
        assert_eq!(
            run(&mut c, &["hi 你好", "👋", " b", "ye"]),
            ("hi 你好".into(), Some("👋 bye".into()))
        );
        let mut c = checker(&["👋 bye"], false);
        assert_eq!(
            run(&mut c, &["hi 👋", " b", "🚀"]),
            ("hi 👋 b🚀".into(), None)
        );
        // Held-back bytes never split a char even when the stop is long and text is multi-byte.
        let mut c = checker(&["xxxxxxxxxxxx"], false);
        let mut out = String::new();
        for (chunk, expect) in [
            ("世", "世"),
            ("界", "界"),
            ("x", ""),
            ("世x", "x世"),
            ("xx", ""),
        ] {
            let (t, hit) = c.push(chunk);
            assert!(hit.is_none());
            assert_eq!(t, expect);
            out.push_str(&t);
        }
        out.push_str(&c.finish());
        assert_eq!(out, "世界x世xxx");
        // Stop string with a multibyte char in the middle, spanning pushes.
        let mut c = checker(&["a€b"], true);
        assert_eq!(
            run(&mut c, &["za", "€", "b"]),
            ("za€b".into(), Some("a€b".into()))
        );
    }

    #[test]
    fn emitted_plus_finish_is_the_input_without_a_match() {
        let text = "the quick brown fox jumps over the lazy dog; 你好，世界 👋🏽🚀";
        let chars: Vec<char> = text.chars().collect();
        for split in 1..6 {
            let chunks: Vec<String> = chars.chunks(split).map(|c| c.iter().collect()).collect();
            let refs: Vec<&str> = chunks.iter().map(|s| s.as_str()).collect();
            let mut c = checker(&["the lazy cat", "世界!", "🚀🚀"], false);
            assert_eq!(run(&mut c, &refs), (text.to_string(), None));
            let mut c = checker(&["lazy dog"], false);
            let (out, hit) = run(&mut c, &refs);
            assert_eq!(out, "the quick brown fox jumps over the ");
            assert_eq!(hit.as_deref(), Some("lazy dog"));
        }
    }

    #[test]
    fn text_before_min_tokens_never_ends_a_match() {
        let mut c = checker(&["END"], false);
        // "END" complete before min_tokens: emitted as text, no match.
        let mut out = c.push_unmatched("a END b");
        assert!(!c.is_stopped());
        let (t, hit) = c.push(" c END");
        out.push_str(&t);
        assert_eq!((out.as_str(), hit.as_deref()), ("a END b c ", Some("END")));
    }

    #[test]
    fn a_stop_string_started_before_min_tokens_and_completed_after_matches() {
        let mut c = checker(&["STOP"], false);
        let out = c.push_unmatched("xx ST");
        assert_eq!(out, "xx ", "the possible prefix is held back");
        let (t, hit) = c.push("OP yy");
        assert_eq!((t.as_str(), hit.as_deref()), ("", Some("STOP")));
    }

    #[test]
    fn an_old_full_match_in_held_text_is_not_found_later() {
        // "ab" completes before min_tokens inside text held back for "abc".
        let mut c = checker(&["ab", "abc"], false);
        assert_eq!(c.push_unmatched("x ab"), "x ");
        let (t, hit) = c.push("d");
        assert_eq!((t.as_str(), hit), ("abd", None));
        assert_eq!(c.finish(), "");
    }
}
