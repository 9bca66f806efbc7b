//! `spindle export-tokenizer --model M --output DIR`: write the model's tokenizer as a Hugging
//! Face tokenizer directory (tokenizer.json, tokenizer_config.json), also for GGUF models whose
//! tokenizer lives in the file's metadata. Routers that tokenize prompts themselves
//! (vllm-router's `VLLM_ROUTER_TOKENIZER`, llm-d's precise prefix-cache scorer) then compute
//! the same token ids, and so the same KV block hashes, as the replicas.

use anyhow::{anyhow, Context};
use clap::Args;
use spindle_model::{LoadFormat, LoadOptions, Loaded};

#[derive(Args, Debug)]
pub struct ExportTokenizerArgs {
    /// A .gguf file, a Hugging Face model directory, or a Hub repo id.
    #[arg(long, default_value = crate::generate::DEFAULT_MODEL)]
    model: String,
    /// Directory to write tokenizer.json and tokenizer_config.json into.
    #[arg(long, short = 'o')]
    output: String,
    #[arg(long, default_value = "auto")]
    load_format: LoadFormat,
}

pub fn run(args: ExportTokenizerArgs) -> anyhow::Result<()> {
    crate::logging::init(false);
    let options = LoadOptions {
        model: args.model.clone(),
        load_format: args.load_format,
        ..LoadOptions::default()
    };
    let loaded =
        spindle_model::load_any(&options).map_err(|e| anyhow!("loading {}: {e}", args.model))?;
    let tokenizer = match &loaded {
        Loaded::Decoder(m) => &m.tokenizer,
        Loaded::Encoder(m) => &m.tokenizer,
    };
    let dir = std::path::Path::new(&args.output);
    tokenizer
        .save_hf(dir)
        .with_context(|| format!("writing {}", dir.display()))?;
    println!(
        "wrote {}/tokenizer.json and tokenizer_config.json",
        dir.display()
    );
    Ok(())
}
