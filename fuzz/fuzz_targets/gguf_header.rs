//! GGUF header and metadata parsing on arbitrary files: `GgufFile::open`, the model config and
//! the tokenizer built from the metadata must fail with an error, never panic or exhaust memory.
//! Inputs are written to a per-process temporary file because the loader reads from a path.

#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spindle_model::gguf::GgufFile;

fn scratch() -> &'static std::path::PathBuf {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm".into()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("spindle-fuzz-gguf-{}.gguf", std::process::id()))
    })
}

/// libfuzzer-sys's panic hook aborts even on panics that `GgufFile::open` catches (candle's
/// reader panics on some headers and we turn that into an error), so replace it once with one
/// that only reports. A panic that escapes the target still aborts: libfuzzer-sys aborts on it.
fn install_panic_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            let in_candle = info
                .location()
                .is_some_and(|l| l.file().contains("candle-core"));
            if !in_candle {
                eprintln!("panic: {info}");
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    install_panic_hook();
    let path = scratch();
    {
        let mut f = std::fs::File::create(path).expect("scratch file");
        f.write_all(data).expect("write scratch file");
    }
    let Ok(file) = GgufFile::open(path) else {
        return;
    };
    let _ = file.architecture_name();
    let _ = file.config();
    if let Ok(vocab) = file.vocab() {
        // Building a BPE from a hostile vocabulary is part of loading a model.
        if vocab.tokens.len() <= 4096 && vocab.merges.len() <= 4096 {
            let _ = vocab.build();
        }
    }
});
