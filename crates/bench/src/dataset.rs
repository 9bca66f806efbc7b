//! Benchmark prompts. The client has no tokenizer of the server's model, so synthetic prompts are
//! made of common English words that most BPE vocabularies hold as one token each (with their
//! leading space): a prompt of N words is roughly N tokens. The report always uses the server's
//! own counts from `usage`; the estimate is only a target.
//!
//! Repeated runs must not be served from the prefix cache (that inflates every number), so each
//! synthetic prompt starts with an id unique to the request *and* the run; `--seed` fixes the
//! words and lengths, a per-run nonce the ids.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};

/// One prompt to send, with the number of tokens to ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchRequest {
    /// The prompt text (the user message for the chat endpoint).
    pub prompt: String,
    /// Client-side estimate of the prompt's token count (used only without server usage).
    pub expected_input_tokens: u64,
    /// `max_tokens` to request.
    pub output_len: u64,
}

/// Which prompts to generate or load.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSpec {
    /// Random words, lengths uniform in `len · (1 ± range_ratio)`.
    Random {
        /// Target prompt length in tokens.
        input_len: u64,
        /// Output tokens to request.
        output_len: u64,
        /// Relative spread of both lengths, in [0, 1).
        range_ratio: f64,
    },
    /// A ShareGPT-format JSON file: first human turn as prompt, the next gpt turn's length (in
    /// words, at least 4) as output length unless `output_len` is given.
    ShareGpt {
        /// The JSON file.
        path: PathBuf,
        /// Fixed output length overriding the conversation's.
        output_len: Option<u64>,
    },
    /// `num_prefixes` shared prefixes of `prefix_len` tokens, each prompt one of them followed by
    /// a unique random suffix of `suffix_len` tokens (exercises prefix caching).
    PrefixRepetition {
        /// Shared prefix length in tokens.
        prefix_len: u64,
        /// Unique suffix length in tokens.
        suffix_len: u64,
        /// Distinct prefixes.
        num_prefixes: u64,
        /// Output tokens to request.
        output_len: u64,
    },
    /// One `{"prompt": "...", "output_len": N}` object per line.
    Jsonl {
        /// The JSONL file.
        path: PathBuf,
    },
}

impl DatasetSpec {
    /// Short name for reports and result files.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetSpec::Random { .. } => "random",
            DatasetSpec::ShareGpt { .. } => "sharegpt",
            DatasetSpec::PrefixRepetition { .. } => "prefix-repetition",
            DatasetSpec::Jsonl { .. } => "jsonl",
        }
    }
}

/// Common English words; with a leading space nearly all are a single token in Llama-, GPT- and
/// Qwen-style BPE vocabularies, which makes "one word ≈ one token" a usable calibration.
pub const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "out", "up", "into", "about",
    "than", "them", "time", "some", "could", "other", "first", "people", "only", "new", "also",
    "like", "over", "then", "what", "its", "two", "most", "may", "any", "after", "these", "our",
    "many", "where", "before", "through", "years", "way", "back", "made", "much", "well", "just",
    "down", "work", "used", "should", "such", "life", "each", "world", "long", "because", "very",
    "between", "those", "same", "good", "great", "state", "day", "must", "three", "own", "even",
    "part", "house", "water", "light", "place", "city", "country", "school", "system", "number",
    "small", "large", "high", "right", "hand", "head", "night", "point", "home", "food", "money",
    "group", "story", "family", "power", "market", "game", "music", "business", "field", "road",
    "river", "paper", "table", "tree", "stone", "green", "white", "black", "red", "blue", "open",
    "close", "simple", "short", "young", "old", "early", "late", "strong", "clear", "free", "full",
    "real", "sure", "ready", "fast", "slow", "warm", "cold", "dark", "happy", "round", "heavy",
    "rich", "safe", "wide", "deep", "fresh", "sweet", "spring", "summer", "winter", "morning",
    "window", "garden", "island", "forest", "animal", "horse", "bird", "fish", "bread", "coffee",
    "letter", "answer", "question", "reason", "result", "method", "model", "energy", "value",
    "level", "order", "form", "line", "word", "name", "idea", "fact", "case", "area", "week",
    "month", "hour", "door", "car", "book", "film", "party", "team", "king", "war", "law", "art",
    "love", "face", "eye", "body", "child", "man", "woman", "friend", "street", "office", "church",
    "room", "bed", "fire", "wind", "rain", "snow", "sun", "moon", "star", "sea", "land", "ship",
    "train", "plan", "rule", "test", "change", "move", "play", "run", "walk", "talk", "read",
    "write", "think", "know", "see", "come", "give", "take", "find", "tell", "ask", "turn", "keep",
    "begin", "show", "hear", "hold", "bring", "happen", "stand", "lose", "pay", "meet", "learn",
    "lead", "build", "stay", "fall", "cut", "reach", "kill", "raise", "pass", "sell", "decide",
    "pull", "carry", "break", "grow",
];

/// Estimated tokens of a request id prefix such as `a3f91c-17:` (hex and digits split into
/// several tokens in most vocabularies; measured 8–11, mean 10.3, with SmolLM2's tokenizer).
pub const ID_TOKENS_ESTIMATE: u64 = 10;

/// A random nonce for the current run, so the ids of two runs differ even with the same seed.
pub fn run_nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut rng =
        StdRng::seed_from_u64((t as u64) ^ ((t >> 64) as u64) ^ u64::from(std::process::id()));
    rng.random()
}

/// Crude token estimate of a text: its whitespace-separated words.
pub fn approx_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// `n` random words joined by spaces.
pub fn random_words<R: Rng + ?Sized>(rng: &mut R, n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 6);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

/// Uniform integer in `len · (1 ± ratio)`, at least 1.
fn sample_len<R: Rng + ?Sized>(rng: &mut R, len: u64, ratio: f64) -> u64 {
    if ratio <= 0.0 {
        return len.max(1);
    }
    let lo = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as u64;
    let hi = ((len as f64) * (1.0 + ratio)).ceil().max(lo as f64) as u64;
    rng.random_range(lo..=hi)
}

/// Id that starts request `index` of a run: unique within the run, and across runs through the
/// nonce.
fn request_id(nonce: u64, index: usize) -> String {
    format!("{:06x}-{index}:", nonce & 0xff_ffff)
}

/// A synthetic prompt of about `tokens` tokens: a unique id, then random words.
fn synthetic_prompt<R: Rng + ?Sized>(rng: &mut R, id: &str, tokens: u64) -> String {
    let words = tokens.saturating_sub(ID_TOKENS_ESTIMATE).max(1);
    format!("{id} {}", random_words(rng, words))
}

/// Build the `num_prompts` requests of a run. `seed` fixes the content and lengths, `nonce` the
/// per-run ids of synthetic prompts (see [`run_nonce`]).
pub fn build_requests(
    spec: &DatasetSpec,
    num_prompts: usize,
    seed: u64,
    nonce: u64,
) -> Result<Vec<BenchRequest>> {
    if num_prompts == 0 {
        return Err(BenchError::InvalidArgument(
            "--num-prompts must be at least 1".into(),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    match spec {
        DatasetSpec::Random {
            input_len,
            output_len,
            range_ratio,
        } => {
            if !(0.0..1.0).contains(range_ratio) {
                return Err(BenchError::InvalidArgument(format!(
                    "--random-range-ratio must be in [0, 1), got {range_ratio}"
                )));
            }
            if *input_len == 0 || *output_len == 0 {
                return Err(BenchError::InvalidArgument(
                    "random input and output lengths must be at least 1".into(),
                ));
            }
            Ok((0..num_prompts)
                .map(|i| {
                    let input = sample_len(&mut rng, *input_len, *range_ratio);
                    let output = sample_len(&mut rng, *output_len, *range_ratio);
                    let prompt = synthetic_prompt(&mut rng, &request_id(nonce, i), input);
                    BenchRequest {
                        prompt,
                        expected_input_tokens: input.max(ID_TOKENS_ESTIMATE + 1),
                        output_len: output,
                    }
                })
                .collect())
        }
        DatasetSpec::PrefixRepetition {
            prefix_len,
            suffix_len,
            num_prefixes,
            output_len,
        } => {
            if *num_prefixes == 0 || *output_len == 0 {
                return Err(BenchError::InvalidArgument(
                    "--num-prefixes and the output length must be at least 1".into(),
                ));
            }
            let prefixes: Vec<String> = (0..*num_prefixes)
                .map(|k| {
                    let id = format!("{:06x}-prefix-{k}:", nonce & 0xff_ffff);
                    synthetic_prompt(&mut rng, &id, *prefix_len)
                })
                .collect();
            let mut reqs: Vec<BenchRequest> = (0..num_prompts)
                .map(|i| {
                    let prefix = &prefixes[i % prefixes.len()];
                    let suffix = synthetic_prompt(&mut rng, &request_id(nonce, i), *suffix_len);
                    BenchRequest {
                        prompt: format!("{prefix} {suffix}"),
                        expected_input_tokens: (*prefix_len).max(ID_TOKENS_ESTIMATE)
                            + (*suffix_len).max(ID_TOKENS_ESTIMATE),
                        output_len: *output_len,
                    }
                })
                .collect();
            reqs.shuffle(&mut rng);
            Ok(reqs)
        }
        DatasetSpec::ShareGpt { path, output_len } => {
            let pairs = load_sharegpt(path)?;
            let mut order: Vec<usize> = (0..pairs.len()).collect();
            order.shuffle(&mut rng);
            Ok((0..num_prompts)
                .map(|i| {
                    let (prompt, completion_words) = &pairs[order[i % order.len()]];
                    BenchRequest {
                        prompt: prompt.clone(),
                        expected_input_tokens: approx_tokens(prompt).max(1),
                        output_len: output_len.unwrap_or((*completion_words).max(4)),
                    }
                })
                .collect())
        }
        DatasetSpec::Jsonl { path } => {
            let all = load_jsonl(path)?;
            Ok((0..num_prompts)
                .map(|i| all[i % all.len()].clone())
                .collect())
        }
    }
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))
}

fn dataset_error(path: &Path, message: impl Into<String>) -> BenchError {
    BenchError::Dataset {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `(prompt, words of the reply)` of every usable ShareGPT conversation: the first human turn
/// and the assistant turn that follows it.
pub fn load_sharegpt(path: &Path) -> Result<Vec<(String, u64)>> {
    #[derive(Deserialize)]
    struct Turn {
        from: String,
        value: String,
    }
    #[derive(Deserialize)]
    struct Conversation {
        #[serde(default)]
        conversations: Vec<Turn>,
    }
    let text = read_to_string(path)?;
    let data: Vec<Conversation> = serde_json::from_str(&text)
        .map_err(|e| dataset_error(path, format!("not a ShareGPT JSON list: {e}")))?;
    let is_user = |t: &Turn| matches!(t.from.as_str(), "human" | "user");
    let is_assistant = |t: &Turn| {
        matches!(
            t.from.as_str(),
            "gpt" | "assistant" | "chatgpt" | "bard" | "bing"
        )
    };
    let pairs: Vec<(String, u64)> = data
        .into_iter()
        .filter_map(|c| {
            let first = c.conversations.iter().position(is_user)?;
            let reply = c.conversations[first + 1..]
                .iter()
                .find(|t| is_assistant(t))?;
            let prompt = c.conversations[first].value.trim();
            (!prompt.is_empty()).then(|| (prompt.to_owned(), approx_tokens(&reply.value)))
        })
        .collect();
    if pairs.is_empty() {
        return Err(dataset_error(
            path,
            "no conversation with a human turn followed by a gpt turn",
        ));
    }
    Ok(pairs)
}

/// Every line of a `{"prompt": "...", "output_len": N}` JSONL file (blank lines skipped).
pub fn load_jsonl(path: &Path) -> Result<Vec<BenchRequest>> {
    #[derive(Deserialize)]
    struct Line {
        prompt: String,
        output_len: u64,
    }
    let text = read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line)
            .map_err(|e| dataset_error(path, format!("line {}: {e}", i + 1)))?;
        if l.output_len == 0 {
            return Err(dataset_error(
                path,
                format!("line {}: output_len must be at least 1", i + 1),
            ));
        }
        out.push(BenchRequest {
            expected_input_tokens: approx_tokens(&l.prompt).max(1),
            prompt: l.prompt,
            output_len: l.output_len,
        });
    }
    if out.is_empty() {
        return Err(dataset_error(path, "no prompts"));
    }
    Ok(out)
}

/// Whether every prompt of `reqs` is distinct (synthetic datasets guarantee it).
pub fn all_distinct(reqs: &[BenchRequest]) -> bool {
    let mut seen = HashSet::new();
    reqs.iter().all(|r| seen.insert(r.prompt.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(input: u64, output: u64, ratio: f64) -> DatasetSpec {
        DatasetSpec::Random {
            input_len: input,
            output_len: output,
            range_ratio: ratio,
        }
    }

    fn temp_file(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spindle-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn random_prompts_have_the_requested_length() {
        let reqs = build_requests(&random(256, 32, 0.0), 50, 0, 1).unwrap();
        assert_eq!(reqs.len(), 50);
        for r in &reqs {
            // The id is one whitespace word; the rest are dictionary words.
            let words = approx_tokens(&r.prompt);
            assert_eq!(words, 256 - ID_TOKENS_ESTIMATE + 1);
            assert_eq!(r.expected_input_tokens, 256);
            assert_eq!(r.output_len, 32);
            assert!(r
                .prompt
                .split_whitespace()
                .skip(1)
                .all(|w| WORDS.contains(&w)));
        }
    }

    #[test]
    fn random_prompts_are_unique_within_and_across_runs() {
        let a = build_requests(&random(64, 8, 0.0), 500, 3, 100).unwrap();
        let b = build_requests(&random(64, 8, 0.0), 500, 3, 200).unwrap();
        assert!(all_distinct(&a) && all_distinct(&b));
        // Same seed, different nonce: same words, different leading ids.
        for (x, y) in a.iter().zip(&b) {
            assert_ne!(x.prompt, y.prompt);
            let (xi, xw) = x.prompt.split_once(' ').unwrap();
            let (yi, yw) = y.prompt.split_once(' ').unwrap();
            assert_ne!(xi, yi);
            assert_eq!(xw, yw);
        }
        // The id comes first, so no two prompts share even their first token block.
        let firsts: HashSet<&str> = a
            .iter()
            .map(|r| r.prompt.split(' ').next().unwrap())
            .collect();
        assert_eq!(firsts.len(), a.len());
    }

    #[test]
    fn same_seed_and_nonce_reproduce() {
        let a = build_requests(&random(32, 8, 0.5), 20, 9, 5).unwrap();
        let b = build_requests(&random(32, 8, 0.5), 20, 9, 5).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn range_ratio_spreads_lengths() {
        let reqs = build_requests(&random(100, 50, 0.5), 2000, 1, 1).unwrap();
        let ins: Vec<u64> = reqs.iter().map(|r| r.expected_input_tokens).collect();
        let outs: Vec<u64> = reqs.iter().map(|r| r.output_len).collect();
        assert!(ins.iter().all(|&l| (50..=150).contains(&l)));
        assert!(outs.iter().all(|&l| (25..=75).contains(&l)));
        assert!(*ins.iter().min().unwrap() <= 55 && *ins.iter().max().unwrap() >= 145);
        let mean = ins.iter().sum::<u64>() as f64 / ins.len() as f64;
        assert!((mean - 100.0).abs() < 3.0, "{mean}");
    }

    #[test]
    fn invalid_random_parameters() {
        assert!(build_requests(&random(10, 10, 1.0), 1, 0, 0).is_err());
        assert!(build_requests(&random(10, 10, -0.1), 1, 0, 0).is_err());
        assert!(build_requests(&random(0, 10, 0.0), 1, 0, 0).is_err());
        assert!(build_requests(&random(10, 10, 0.0), 0, 0, 0).is_err());
    }

    #[test]
    fn prefix_repetition_shares_prefixes() {
        let spec = DatasetSpec::PrefixRepetition {
            prefix_len: 40,
            suffix_len: 20,
            num_prefixes: 3,
            output_len: 5,
        };
        let reqs = build_requests(&spec, 30, 0, 77).unwrap();
        assert!(all_distinct(&reqs));
        let prefixes: HashSet<String> = reqs
            .iter()
            .map(|r| {
                r.prompt
                    .split_whitespace()
                    .take(40 - ID_TOKENS_ESTIMATE as usize + 1)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        assert_eq!(prefixes.len(), 3);
        assert!(reqs
            .iter()
            .all(|r| r.expected_input_tokens == 60 && r.output_len == 5));
    }

    #[test]
    fn sharegpt_file() {
        let json = r#"[
            {"id": "a", "conversations": [{"from": "human", "value": "What is Rust?"}, {"from": "gpt", "value": "A systems programming language with ownership."}]},
            {"id": "b", "conversations": [{"from": "gpt", "value": "hello"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"id": "d"}
        ]"#;
        let p = temp_file("sharegpt.json", json);
        let pairs = load_sharegpt(&p).unwrap();
        assert_eq!(
            pairs,
            vec![("What is Rust?".to_string(), 6), ("Hi".to_string(), 1)]
        );
        let reqs = build_requests(
            &DatasetSpec::ShareGpt {
                path: p.clone(),
                output_len: None,
            },
            4,
            0,
            0,
        )
        .unwrap();
        assert_eq!(reqs.len(), 4);
        for r in &reqs {
            let want = if r.prompt == "Hi" { 4 } else { 6 }; // at least 4
            assert_eq!(r.output_len, want);
        }
        let fixed = build_requests(
            &DatasetSpec::ShareGpt {
                path: p,
                output_len: Some(100),
            },
            2,
            0,
            0,
        )
        .unwrap();
        assert!(fixed.iter().all(|r| r.output_len == 100));
        let bad = temp_file("bad.json", "{\"not\": \"a list\"}");
        assert!(matches!(
            load_sharegpt(&bad),
            Err(BenchError::Dataset { .. })
        ));
        assert!(matches!(
            load_sharegpt(Path::new("/nonexistent/x.json")),
            Err(BenchError::Io { .. })
        ));
    }

    #[test]
    fn jsonl_file() {
        let p = temp_file("p.jsonl", "{\"prompt\": \"one two three\", \"output_len\": 5}\n\n{\"prompt\": \"x\", \"output_len\": 2}\n");
        let reqs = build_requests(&DatasetSpec::Jsonl { path: p }, 3, 0, 0).unwrap();
        assert_eq!(
            reqs[0],
            BenchRequest {
                prompt: "one two three".into(),
                expected_input_tokens: 3,
                output_len: 5
            }
        );
        assert_eq!(reqs[1].prompt, "x");
        assert_eq!(reqs[2], reqs[0]);
        let bad = temp_file("bad.jsonl", "{\"prompt\": \"x\"}\n");
        let err = load_jsonl(&bad).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
