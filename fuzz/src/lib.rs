//! Shared set-up of the fuzz targets: the default model's tokenizer and chat template, loaded
//! once per fuzzing process from the GGUF that scripts/fetch-model.sh downloads (override the
//! path with `SPINDLE_FUZZ_MODEL`).

use std::sync::OnceLock;

use spindle_model::gguf::GgufFile;
use spindle_model::TokenizerBundle;

/// The default model's file.
pub fn model_path() -> String {
    std::env::var("SPINDLE_FUZZ_MODEL").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .to_string()
    })
}

/// The default model's tokenizer bundle (byte-level BPE from the GGUF vocabulary), built once.
pub fn bundle() -> &'static TokenizerBundle {
    static BUNDLE: OnceLock<TokenizerBundle> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let path = model_path();
        let file = GgufFile::open(std::path::Path::new(&path))
            .unwrap_or_else(|e| panic!("cannot open {path} (run scripts/fetch-model.sh): {e}"));
        let vocab = file.vocab().expect("the default GGUF has a vocabulary");
        vocab.build().expect("the default vocabulary builds")
    })
}
