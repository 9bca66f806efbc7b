//! What the engine thread's loop (`engine.rs`) drives and what the cores (`generation.rs`,
//! `embedding.rs`) implement, apart from both so neither side imports the other.

use std::sync::Arc;

use spindle_model::{ModelInfo, TokenizerBundle};

use crate::api::{CacheConfig, EngineError, ModelKind, ModelLimits};
use crate::handle::EngineMessage;

/// What the engine thread reports back once the model is loaded.
#[derive(Clone)]
pub(crate) struct Ready {
    pub(crate) kind: ModelKind,
    pub(crate) tokenizer: Arc<TokenizerBundle>,
    pub(crate) info: Arc<ModelInfo>,
    pub(crate) limits: ModelLimits,
    pub(crate) cache: CacheConfig,
}

/// What the engine thread runs between messages: the generation core (scheduler, model runner,
/// output processor) or the embedding core (token-budget packing of encoder inputs).
pub(crate) trait Core: Send {
    /// Whether a step has anything to do (otherwise the loop blocks on its channel).
    fn has_work(&self) -> bool;
    /// A new request or an abort (shutdown is the loop's own).
    fn handle(&mut self, msg: EngineMessage);
    /// One iteration. An error ends the engine.
    fn step(&mut self) -> Result<(), EngineError>;
    /// Refresh the gauges in `EngineStats`.
    fn publish_gauges(&self);
    /// The engine is stopping: end every request in flight with `error`.
    fn fail_all(&mut self, error: &EngineError);
}
