//! Shared by the tests that run the real `spindle` binary.

use std::path::PathBuf;

/// The default model, fetched by scripts/fetch-model.sh.
pub fn model_path() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    path.display().to_string()
}
