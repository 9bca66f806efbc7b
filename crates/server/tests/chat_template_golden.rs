//! The default model's chat template rendered by our minijinja set-up must equal what HF
//! transformers' `apply_chat_template` produced (stored in tests/golden by
//! scripts/golden/make_golden.py).

use std::path::PathBuf;

use serde_json::Value;
use spindle_server::template::{normalize_messages, ChatTemplate, RenderOptions};

#[test]
fn default_model_template_matches_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = root.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let loaded = spindle_model::load(&spindle_model::LoadOptions {
        model: model.display().to_string(),
        ..Default::default()
    })
    .expect("default model (scripts/fetch-model.sh)");
    let tok = &loaded.tokenizer;
    let source = tok
        .chat_template
        .as_deref()
        .expect("the GGUF carries a chat template");
    let template = ChatTemplate::new(source, tok.bos_token.as_deref(), tok.eos_token.as_deref())
        .expect("compile");

    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/golden/smollm2-135m-instruct.json"))
            .expect("golden file"),
    )
    .expect("golden json");
    let cases = golden["chat_template_cases"]
        .as_array()
        .expect("chat_template_cases");
    assert!(cases.len() >= 6);
    for case in cases {
        let messages = normalize_messages(case.get("messages")).expect("messages");
        let opts = RenderOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(true),
            ..RenderOptions::default()
        };
        let rendered = template.render(&messages, &opts).expect("render");
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap_or_default(),
            "messages: {}",
            case["messages"]
        );
    }
}
