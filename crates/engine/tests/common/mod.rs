//! What the engine's integration tests share: the default model's engine, requests from text,
//! and a collector that turns a request's events into its whole output.
#![allow(dead_code, unused_imports)]

pub use std::path::PathBuf;
pub use std::sync::{Arc, Mutex};
pub use std::time::{Duration, Instant};

pub use spindle_engine::{
    Engine, EngineConfig, EngineError, EngineEvent, EngineHandle, FinishReason, GenerateRequest,
    PromptTokenLogprob, RequestError, RequestStream, SamplingParams, StepLogprobs, StepObserver,
    StepTrace, StopReason, Usage,
};
pub use spindle_model::LoadOptions;

pub fn model_path() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        .display()
        .to_string()
}

#[derive(Default)]
pub struct Recorder(pub Mutex<Vec<StepTrace>>);

impl StepObserver for Recorder {
    fn on_step(&self, trace: &StepTrace) {
        self.0.lock().unwrap().push(trace.clone());
    }
}

pub fn config(kv_bytes: u64) -> EngineConfig {
    EngineConfig {
        model: LoadOptions {
            model: model_path(),
            max_model_len: Some(2048),
            ..LoadOptions::default()
        },
        max_num_seqs: 64,
        max_num_batched_tokens: 512,
        kv_cache_memory_bytes: Some(kv_bytes),
        ..EngineConfig::default()
    }
}

pub fn spawn(cfg: EngineConfig) -> EngineHandle {
    Engine::spawn(cfg).expect("engine starts")
}

/// Everything a request produced, per choice.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    pub tokens: Vec<Vec<u32>>,
    pub texts: Vec<String>,
    pub finish: Vec<Option<FinishReason>>,
    pub stop_reasons: Vec<Option<StopReason>>,
    pub logprobs: Vec<Vec<StepLogprobs>>,
    pub prompt_logprobs: Option<Vec<Option<PromptTokenLogprob>>>,
    pub usage: Usage,
}

pub fn collect(mut stream: RequestStream) -> Output {
    let mut out = Output::default();
    loop {
        match stream.blocking_recv() {
            Some(EngineEvent::Delta(d)) => {
                while out.tokens.len() <= d.index {
                    out.tokens.push(Vec::new());
                    out.texts.push(String::new());
                    out.finish.push(None);
                    out.stop_reasons.push(None);
                    out.logprobs.push(Vec::new());
                }
                out.logprobs[d.index].extend(d.logprobs.iter().cloned());
                out.tokens[d.index].extend(&d.token_ids);
                out.texts[d.index].push_str(&d.text);
                if d.finish_reason.is_some() {
                    out.finish[d.index] = d.finish_reason;
                    out.stop_reasons[d.index] = d.stop_reason;
                }
            }
            Some(EngineEvent::Finished { usage, .. }) => {
                out.usage = usage;
                return out;
            }
            Some(EngineEvent::Error(e)) => panic!("request failed: {e}"),
            Some(EngineEvent::Embeddings(_)) => panic!("embeddings from a generative model"),
            Some(EngineEvent::PromptLogprobs(p)) => {
                assert!(
                    out.tokens.is_empty(),
                    "prompt logprobs come before any delta"
                );
                assert!(out.prompt_logprobs.is_none(), "prompt logprobs come once");
                out.prompt_logprobs = Some(p);
            }
            None => panic!("stream ended without Finished"),
        }
    }
}

pub fn request(
    engine: &EngineHandle,
    id: &str,
    text: &str,
    params: SamplingParams,
) -> RequestStream {
    let ids = engine.tokenizer().encode(text, true).expect("encode");
    let request = GenerateRequest::new(id, ids, params, engine.limits()).expect("valid request");
    engine.generate(request).expect("submit")
}

pub fn prompts(n: usize) -> Vec<String> {
    let topics = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "The three primary colors are",
        "In 1969, humans first",
        "A good recipe for pancakes needs",
        "The largest planet in the solar system",
        "To install Rust on Linux, run",
    ];
    (0..n)
        .map(|i| format!("{} ({i})", topics[i % topics.len()]))
        .collect()
}

pub fn wait_idle(engine: &EngineHandle) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let s = engine.stats();
        if s.num_running.load(std::sync::atomic::Ordering::Relaxed) == 0
            && s.num_waiting.load(std::sync::atomic::Ordering::Relaxed) == 0
            && s.kv_cache_usage() == 0.0
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "engine did not become idle: kv usage {}",
        engine.stats().kv_cache_usage()
    );
}
