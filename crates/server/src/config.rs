//! How the server is set up (`spindle serve` fills it from its flags) and its default limits.

use std::time::Duration;

/// Largest request body accepted by default (32 MiB): room for long prompts as token ids, small
/// enough that a client cannot make the server buffer arbitrary amounts.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Default time a client has to send a request's headers (hyper's own default). It also ends
/// idle keep-alive connections, so slow or silent clients cannot pin connections forever.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time a client has to send a whole request body (32 MiB at ~1 MB/s); a slower body
/// (slowloris) gets 408.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How the server is set up; `spindle serve` fills it from its flags.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Host name or address to listen on (`--host`).
    pub host: String,
    /// Port (`--port`); 0 picks a free one (tests), see [`Server::local_addr`].
    pub port: u16,
    /// Names clients may put in `model` (`--served-model-name`); the first is the default and
    /// the metrics' `model_name`.
    pub served_model_names: Vec<String>,
    /// What was loaded (`--model`), reported as `root` in `/v1/models`.
    pub model_root: String,
    /// Required `Authorization: Bearer` key for `/v1/*` (`--api-key`).
    pub api_key: Option<String>,
    /// CORS origins (`--allowed-origins`); `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Chat template source replacing the model's own (`--chat-template`, already read from
    /// its file if it was a path).
    pub chat_template: Option<String>,
    /// `--enable-auto-tool-choice --tool-call-parser NAME`: how `tool_choice: "auto"` answers
    /// are parsed into tool calls; `None` makes `auto` with tools a 400 naming the flags.
    pub tool_call_parser: Option<crate::tools::ToolParser>,
    /// `--reasoning-parser`: split thinking from the answer.
    pub reasoning_parser: Option<crate::reasoning::ReasoningParser>,
    /// Request bodies over this are refused with 413.
    pub max_body_bytes: usize,
    /// HTTP/1 connections that do not deliver a request head within this are closed (also the
    /// idle keep-alive limit).
    pub header_read_timeout: Duration,
    /// A request body not fully received within this is answered with 408.
    pub body_read_timeout: Duration,
    /// `/health` fails once the engine showed no progress for this long.
    pub stall_timeout: Duration,
    /// On shutdown, in-flight requests get this long to finish before they are cut.
    pub shutdown_timeout: Duration,
    /// Reported in `vllm:cache_config_info`.
    pub gpu_memory_utilization: f32,
    /// The Batch API (`/v1/files`, `/v1/batches`) and its store; `None` turns it off.
    pub batch: Option<crate::batch::BatchConfig>,
    /// Sampling defaults for what a request leaves unset (`--generation-config`).
    pub defaults: crate::validation::RequestDefaults,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8000,
            served_model_names: Vec::new(),
            model_root: String::new(),
            api_key: None,
            allowed_origins: vec!["*".into()],
            chat_template: None,
            tool_call_parser: None,
            reasoning_parser: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            stall_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            gpu_memory_utilization: 0.9,
            batch: None,
            defaults: crate::validation::RequestDefaults::default(),
        }
    }
}
