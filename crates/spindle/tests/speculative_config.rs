//! `spindle serve --speculative-config` refuses bad values at start-up (before the model loads)
//! and draft models it cannot use (missing, or with another vocabulary than the target's),
//! with the reason on stderr and a failing exit status.

mod common;

use std::process::Command;

use common::{free_port, model_path};

fn serve_with(config: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["serve", &model_path(), "--port", &free_port().to_string()])
        .args(["--speculative-config", config])
        .output()
        .expect("spindle runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_speculative_configs_stop_the_server_with_the_reason() {
    // Qwen2.5's tokenizer (scripts/fetch-qwen.sh) cannot draft for SmolLM2.
    let qwen = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let qwen_draft = format!(
        r#"{{"model":{:?},"num_speculative_tokens":3}}"#,
        qwen.display().to_string()
    );
    for (config, reason) in [
        ("{", "not valid JSON"),
        (r#"{"method":"ngram"}"#, "num_speculative_tokens"),
        (
            r#"{"method":"ngram","num_speculative_tokens":0}"#,
            "between 1 and 16",
        ),
        (
            r#"{"method":"ngram","num_speculative_tokens":40}"#,
            "between 1 and 16",
        ),
        (
            r#"{"method":"eagle","num_speculative_tokens":3}"#,
            "`eagle` is not supported",
        ),
        (
            r#"{"method":"ngram","num_speculative_tokens":3,"prompt_lookup_min":5,"prompt_lookup_max":2}"#,
            "prompt_lookup_min",
        ),
        (
            r#"{"method":"ngram","num_speculative_tokens":3,"lookup":2}"#,
            "unknown field `lookup`",
        ),
        (r#"{"num_speculative_tokens":3}"#, "needs a `method`"),
        (
            r#"{"model":"/nonexistent/draft.gguf","num_speculative_tokens":3}"#,
            "loading the draft model /nonexistent/draft.gguf failed",
        ),
        (&qwen_draft, "vocabulary differs from the target's"),
    ] {
        let (ok, stderr) = serve_with(config);
        assert!(!ok, "{config} was accepted");
        assert!(stderr.contains(reason), "{config}: {stderr}");
    }
}
