//! `spindle generate`: run one prompt through the engine and print the completion as it
//! streams, so a person can try a model without the HTTP server.

use std::io::Write;

use anyhow::{bail, Context};
use clap::Args;
use spindle_engine::{Engine, EngineConfig, EngineEvent, GenerateRequest, SamplingParams};
use spindle_model::{
    CpuArithmeticChoice, DTypeChoice, DeviceChoice, KvCacheDtypeChoice, LoadFormat, LoadOptions,
};

/// The default model fetched by `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Args)]
pub struct GenerateArgs {
    /// A .gguf file, a Hugging Face model directory, or a Hub repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 = greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value = "auto")]
    dtype: DTypeChoice,
    /// auto, float32, bfloat16 or int8 (see `spindle serve --help`).
    #[arg(long, default_value = "auto")]
    cpu_arithmetic: CpuArithmeticChoice,
    /// auto, bfloat16, float16 or float32.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: KvCacheDtypeChoice,
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    #[arg(long, default_value = "auto")]
    load_format: LoadFormat,
    #[arg(long)]
    max_model_len: Option<usize>,
}

/// Render `prompt` as one user turn with the model's chat template.
fn chat_prompt(
    template: &str,
    bos: Option<&str>,
    eos: Option<&str>,
    prompt: &str,
) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template("chat", template)
        .context("parsing the chat template")?;
    let messages = vec![minijinja::context! { role => "user", content => prompt }];
    let rendered = env
        .get_template("chat")?
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos.unwrap_or(""),
            eos_token => eos.unwrap_or(""),
        })
        .context("rendering the chat template")?;
    Ok(rendered)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    crate::logging::init(false);
    let config = EngineConfig {
        model: LoadOptions {
            model: args.model.clone(),
            load_format: args.load_format,
            dtype: args.dtype,
            cpu_arithmetic: args.cpu_arithmetic,
            device: args.device,
            max_model_len: args.max_model_len,
            ..LoadOptions::default()
        },
        max_num_seqs: 1,
        kv_cache_memory_bytes: Some(1 << 30),
        kv_cache_dtype: args.kv_cache_dtype,
        ..EngineConfig::default()
    };
    let engine = Engine::spawn(config).with_context(|| format!("loading {}", args.model))?;
    let tokenizer = engine.tokenizer().clone();
    let prompt_ids = if args.chat {
        let Some(template) = tokenizer.chat_template.as_deref() else {
            bail!("--chat: the model has no chat template");
        };
        let text = chat_prompt(
            template,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
            &args.prompt,
        )?;
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: Some(args.max_tokens),
        ..SamplingParams::default()
    };
    let request = GenerateRequest::new("generate", prompt_ids, params, engine.limits())?;
    let started = std::time::Instant::now();
    let mut stream = engine.generate(request)?;
    let mut out = std::io::stdout().lock();
    if !args.chat {
        write!(out, "{}", args.prompt)?;
    }
    loop {
        match stream.blocking_recv() {
            Some(EngineEvent::Delta(delta)) => {
                write!(out, "{}", delta.text)?;
                out.flush()?;
            }
            Some(EngineEvent::Finished { usage, timings }) => {
                writeln!(out)?;
                let decode_rate = if timings.decode > 0.0 && usage.completion_tokens > 1 {
                    (usage.completion_tokens - 1) as f64 / timings.decode
                } else {
                    0.0
                };
                eprintln!(
                    "[{} prompt tokens, {} generated, TTFT {:.3}s, {:.1} tok/s decode, {:.2}s total]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    timings.time_to_first_token,
                    decode_rate,
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            Some(EngineEvent::Error(e)) => bail!("generation failed: {e}"),
            Some(EngineEvent::Embeddings(_)) => bail!("the engine answered with embeddings"),
            Some(EngineEvent::PromptLogprobs(_)) => {} // not asked for
            None => bail!("the engine stopped unexpectedly"),
        }
    }
    engine.shutdown();
    Ok(())
}
