//! The chat templates of the newer families (Gemma 2, SmolLM3, Granite 3.3, Phi-3.5, gpt-oss's
//! harmony, Qwen3; the files llama.cpp ships, fetched by `scripts/fetch-templates.sh`) render as
//! transformers renders them
//! (`tests/golden/chat-templates.json`, made by `scripts/golden/make_chat_templates.py`), and a
//! template's refusal (Gemma's "System role not supported") is the client's 400 with the
//! template's message, not a 500.

use std::path::PathBuf;

use serde_json::Value;
use spindle_server::template::{ChatTemplate, RenderOptions};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn family_templates_render_as_transformers() {
    let root = repo_root();
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/golden/chat-templates.json")).expect("golden"),
    )
    .expect("json");
    for t in golden["templates"].as_array().expect("templates") {
        let file = t["file"].as_str().expect("file");
        let path = root.join("models/templates").join(file);
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-templates.sh)", path.display()));
        let template = ChatTemplate::new(&source, t["bos_token"].as_str(), t["eos_token"].as_str())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        // Granite and gpt-oss put today's date in their system prompts; the golden says <TODAY>.
        let today_long = ChatTemplate::new("{{ strftime_now('%B %d, %Y') }}", None, None)
            .expect("date template")
            .render(&[], &RenderOptions::default())
            .expect("date");
        let today_iso = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", None, None)
            .expect("date template")
            .render(&[], &RenderOptions::default())
            .expect("date");
        for case in t["cases"].as_array().expect("cases") {
            let name = case["name"].as_str().expect("name");
            let messages = case["messages"].as_array().expect("messages");
            let opts = RenderOptions {
                add_generation_prompt: case["add_generation_prompt"].as_bool().expect("bool"),
                extra: case["kwargs"]
                    .as_object()
                    .filter(|m| !m.is_empty())
                    .cloned(),
                ..Default::default()
            };
            let got = template.render(messages, &opts);
            match (case.get("text"), case.get("error")) {
                (Some(want), _) => {
                    let got = got.unwrap_or_else(|e| panic!("{file} / {name}: {}", e.message));
                    assert_eq!(
                        got.replace(&today_long, "<TODAY>")
                            .replace(&today_iso, "<TODAY>"),
                        want.as_str().expect("text"),
                        "{file} / {name}"
                    );
                }
                (None, Some(error)) => {
                    let e = got.expect_err(&format!("{file} / {name}: should be refused"));
                    assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST, "{file} / {name}");
                    let error = error.as_str().expect("error");
                    assert!(e.message.contains(error), "{file} / {name}: {}", e.message);
                }
                _ => panic!("{file} / {name}: golden case has neither text nor error"),
            }
        }
    }
}
