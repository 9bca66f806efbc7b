//! What every connection and request shares ([`AppState`]): the engine handle, the compiled
//! chat template, the grammar compiler, the batch store, and how it is built at start-up
//! (including the warm-up request).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use spindle_engine::{EngineHandle, ModelKind};
use spindle_structured::GrammarCompiler;

use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::metrics::{CacheInfo, Metrics};
use crate::template::ChatTemplate;
use crate::validation::ModelLimits;

/// Shared by every connection and request.
pub(crate) struct AppState {
    pub(crate) cfg: ServerConfig,
    pub(crate) engine: EngineHandle,
    pub(crate) metrics: Arc<Metrics>,
    /// The compiled chat template, or why chat requests cannot be served (a 400 message).
    pub(crate) template: Result<Arc<ChatTemplate>, String>,
    pub(crate) limits: ModelLimits,
    /// `created` of `/v1/models` entries.
    pub(crate) created: u64,
    pub(crate) fingerprint: String,
    pub(crate) shutting_down: AtomicBool,
    /// Compiles structured-output constraints for this model's vocabulary (`None` for
    /// embedding models, or when the tokenizer cannot be turned into a token trie).
    pub(crate) compiler: Option<Arc<GrammarCompiler>>,
    /// The Batch API's store and runner wake-up (`None` when it is off).
    pub(crate) batches: Option<Arc<crate::batch::Batches>>,
    /// Stored Responses API responses, beside the batch store (`None` without a data dir).
    pub(crate) responses: Option<Arc<crate::responses::store::ResponseStore>>,
    /// Background responses still running.
    pub(crate) background_responses: crate::responses::Background,
}

impl AppState {
    /// Everything requests share: the compiled chat template, cache metrics, the grammar
    /// compiler and the batch store. `spindle run-batch` builds one without a listener.
    pub(crate) async fn build(
        config: ServerConfig,
        engine: EngineHandle,
        metrics: Arc<Metrics>,
    ) -> Result<AppState, ServerError> {
        if config.served_model_names.is_empty() {
            return Err(ServerError::Config(
                "at least one served model name is required".into(),
            ));
        }
        let tok = engine.tokenizer().clone();
        let template = match (&config.chat_template, &tok.chat_template) {
            (Some(src), _) => Ok(Arc::new(
                ChatTemplate::new(src, tok.bos_token.as_deref(), tok.eos_token.as_deref())
                    .map_err(ServerError::Template)?,
            )),
            (None, Some(src)) => match ChatTemplate::new(src, tok.bos_token.as_deref(), tok.eos_token.as_deref()) {
                Ok(t) => Ok(Arc::new(t)),
                Err(e) => {
                    tracing::warn!(error = %e, "the model's chat template does not compile; chat completions are disabled");
                    Err(format!(
                        "The model's chat template could not be compiled ({e}); start the server with --chat-template."
                    ))
                }
            },
            (None, None) => Err(
                "This model has no chat template, so chat completions are not available; start the server with --chat-template, or use /v1/completions."
                    .to_string(),
            ),
        };
        let info = engine.model_info();
        let limits = engine.limits();
        let cache = engine.cache_config();
        metrics.set_cache_info(&CacheInfo {
            block_size: cache.block_size,
            num_gpu_blocks: cache.num_blocks as u64,
            enable_prefix_caching: cache.enable_prefix_caching,
            gpu_memory_utilization: config.gpu_memory_utilization,
        });
        let fingerprint = fingerprint(&config.model_root, &info.dtype, &info.device);
        let batches = match &config.batch {
            Some(cfg) => {
                let cfg = cfg.clone();
                let opened = tokio::task::spawn_blocking(move || crate::batch::Batches::open(cfg))
                    .await
                    .map_err(|e| ServerError::Config(format!("opening the batch store: {e}")))?;
                Some(Arc::new(opened?))
            }
            None => None,
        };
        let responses = match &config.batch {
            Some(cfg) => {
                let dir = cfg.data_dir.clone();
                let opened = tokio::task::spawn_blocking(move || {
                    crate::responses::store::ResponseStore::open(&dir)
                })
                .await
                .map_err(|e| ServerError::Config(format!("opening the response store: {e}")))?;
                Some(Arc::new(opened.map_err(|e| {
                    ServerError::Config(format!("opening the response store: {e}"))
                })?))
            }
            None => None,
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let compiler = match engine.model_kind() {
            ModelKind::Embed { .. } => None,
            ModelKind::Generate => {
                let tok = engine.tokenizer().clone();
                let vocab = limits.vocab_size;
                let built = tokio::task::spawn_blocking(move || GrammarCompiler::new(&tok, vocab))
                    .await
                    .map_err(|e| ServerError::Config(format!("building the token trie: {e}")))?;
                match built {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        tracing::warn!("structured outputs are disabled: {e}");
                        None
                    }
                }
            }
        };
        warm_up(&engine).await?;
        Ok(AppState {
            cfg: config,
            engine,
            metrics,
            template,
            limits,
            created,
            fingerprint,
            shutting_down: AtomicBool::new(false),
            compiler,
            batches,
            responses,
            background_responses: Default::default(),
        })
    }
}

/// Run one tiny request through the engine before serving, so that `/health` is 200 only once
/// the engine has completed a step (first-step costs such as lazy allocations are paid here,
/// not by the first client).
async fn warm_up(engine: &EngineHandle) -> Result<(), ServerError> {
    let limits = engine.limits();
    let token = engine.tokenizer().bos_token_id.unwrap_or(0);
    let failed =
        |e: String| ServerError::Config(format!("the engine failed its warm-up step: {e}"));
    let mut stream = match engine.model_kind() {
        ModelKind::Generate => {
            let params = spindle_engine::SamplingParams {
                max_tokens: Some(1),
                temperature: 0.0,
                ..Default::default()
            };
            let request =
                spindle_engine::GenerateRequest::new("warm-up", vec![token], params, limits)
                    .map_err(|e| failed(e.to_string()))?;
            engine
                .generate(request)
                .map_err(|e| failed(e.to_string()))?
        }
        ModelKind::Embed { .. } => {
            let request = spindle_engine::EmbedRequest::new("warm-up", vec![vec![token]], limits)
                .map_err(|e| failed(e.to_string()))?;
            engine.embed(request).map_err(|e| failed(e.to_string()))?
        }
    };
    loop {
        match stream.recv().await {
            Some(spindle_engine::EngineEvent::Finished { .. }) => return Ok(()),
            Some(spindle_engine::EngineEvent::Error(e)) => return Err(failed(e.to_string())),
            Some(_) => {}
            None => return Err(failed("the engine stopped".into())),
        }
    }
}

/// A stable-per-deployment fingerprint (OpenAI's `system_fingerprint` changes when the serving
/// configuration changes).
fn fingerprint(model: &str, dtype: &str, device: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (model, dtype, device, env!("CARGO_PKG_VERSION")).hash(&mut h);
    format!("fp_{:010x}", h.finish() & 0xff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_stable() {
        assert_eq!(
            fingerprint("a", "f32", "cpu"),
            fingerprint("a", "f32", "cpu")
        );
        assert!(fingerprint("a", "f32", "cpu").starts_with("fp_"));
    }
}
