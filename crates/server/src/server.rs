//! The HTTP server: listener, connections (HTTP/1.1 keep-alive and HTTP/2 via hyper-util's auto
//! builder), routing, CORS, auth, body limits, per-request metrics, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use spindle_engine::EngineHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::auth::bearer_matches;
use crate::error::{ApiError, ServerError};
use crate::generation::SseBody;
use crate::handlers;
use crate::metrics::{CacheInfo, Metrics};
use crate::template::ChatTemplate;
use crate::validation::ModelLimits;
use spindle_engine::ModelKind;
use spindle_structured::GrammarCompiler;

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
}

/// Every response body: a buffered one, or an SSE stream tied to engine requests.
pub enum ApiBody {
    /// A complete body (JSON, metrics text), sent in one frame.
    Full(Option<Bytes>),
    /// A live event stream.
    Sse(Box<SseBody>),
}

impl ApiBody {
    /// An empty body.
    pub fn empty() -> Self {
        ApiBody::Full(None)
    }

    /// A buffered body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        ApiBody::Full((!b.is_empty()).then_some(b))
    }
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Sse(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Full(b) => b.is_none(),
            ApiBody::Sse(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ApiBody::Full(None) => SizeHint::with_exact(0),
            ApiBody::Sse(s) => s.size_hint(),
        }
    }
}

/// A bound, not yet serving server: bind first to learn the address (port 0 in tests).
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<AppState>,
}

impl Server {
    /// Compile the chat template, publish cache metrics and bind the listener.
    pub async fn bind(
        config: ServerConfig,
        engine: EngineHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServerError> {
        let listener = bind_listener(&config.host, config.port).await?;
        Self::on_listener(listener, config, engine, metrics).await
    }

    /// Take over the listener of a [`LoadingServer`] (which answered 503 while the model
    /// loaded): clients never see a refused connection between start-up and serving.
    pub async fn from_loading(
        loading: LoadingServer,
        config: ServerConfig,
        engine: EngineHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServerError> {
        // Build (and warm up) while the loading responder still answers 503.
        let state = AppState::build(config, engine, metrics).await;
        let listener = loading.stop().await?;
        let state = Arc::new(state?);
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            state,
        })
    }

    async fn on_listener(
        listener: TcpListener,
        config: ServerConfig,
        engine: EngineHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServerError> {
        let local_addr = listener.local_addr()?;
        let state = Arc::new(AppState::build(config, engine, metrics).await?);
        Ok(Self {
            listener,
            local_addr,
            state,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
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
        })
    }
}

impl Server {
    /// Serve until `shutdown` resolves; then stop accepting, let in-flight requests finish for
    /// up to `shutdown_timeout`, and cut the rest (which aborts their engine requests).
    pub async fn serve<F>(self, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = ()>,
    {
        let Server {
            listener,
            state,
            local_addr,
        } = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(state.cfg.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        // Batch jobs run in the background for the server's life; a line in flight at shutdown
        // stays pending in the store and runs again after the restart.
        let batch_runner = state
            .batches
            .clone()
            .map(|b| tokio::spawn(crate::batch::runner::run(state.clone(), b)));
        tracing::info!(%local_addr, "listening");

        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        let state = state.clone();
                        // Set by the first request: hyper's header timeout only starts once it
                        // knows the protocol, so a client that connects and sends nothing (or a
                        // fragment of the HTTP/2 preface) is cut here instead.
                        let seen_request = Arc::new(AtomicBool::new(false));
                        let seen = seen_request.clone();
                        let header_read_timeout = state.cfg.header_read_timeout;
                        let service = hyper::service::service_fn(move |req| {
                            seen.store(true, Ordering::Relaxed);
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(state, req).await) }
                        });
                        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        let conn = graceful.watch(conn);
                        connections.spawn(async move {
                            let silent = async {
                                tokio::time::sleep(header_read_timeout).await;
                                if seen_request.load(Ordering::Relaxed) {
                                    std::future::pending::<()>().await;
                                }
                            };
                            tokio::select! {
                                ended = conn => if let Err(e) = ended {
                                    tracing::debug!(error = %e, "connection ended with an error");
                                },
                                _ = silent => tracing::debug!("no request within the header read timeout; closing the connection"),
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }

        state.shutting_down.store(true, Ordering::SeqCst);
        drop(listener);
        if let Some(runner) = batch_runner {
            runner.abort();
        }
        let timeout = state.cfg.shutdown_timeout;
        tracing::info!(
            open_connections = connections.len(),
            ?timeout,
            "shutting down: draining in-flight requests"
        );
        if tokio::time::timeout(timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                open_connections = connections.len(),
                "shutdown timeout reached; cutting remaining requests"
            );
            connections.abort_all();
        }
        while connections.join_next().await.is_some() {}
        Ok(())
    }
}

async fn bind_listener(host: &str, port: u16) -> Result<TcpListener, ServerError> {
    TcpListener::bind((host, port))
        .await
        .map_err(|source| ServerError::Bind {
            addr: format!("{host}:{port}"),
            source,
        })
}

/// The listener while the model loads: every request (`/health` included) gets 503 with
/// `Retry-After`, so orchestrators and routers see "not ready" rather than a refused
/// connection. [`Server::from_loading`] takes the listener over.
pub struct LoadingServer {
    local_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<TcpListener>,
}

impl LoadingServer {
    /// Bind `host:port` and start answering 503.
    pub async fn bind(host: &str, port: u16) -> Result<Self, ServerError> {
        let listener = bind_listener(host, port).await?;
        let local_addr = listener.local_addr()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                            let mut e = ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "The model is loading; retry shortly.",
                            );
                            e.retry_after = Some(5);
                            let mut r = error_response(&e);
                            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                            Ok::<_, Infallible>(r)
                        });
                        connections.spawn(async move {
                            let conn = hyper::server::conn::http1::Builder::new()
                                .keep_alive(false)
                                .serve_connection(TokioIo::new(stream), service);
                            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
            connections.abort_all();
            listener
        });
        tracing::info!(%local_addr, "listening; answering 503 until the model is loaded");
        Ok(Self {
            local_addr,
            stop: Some(stop),
            task,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    async fn stop(mut self) -> Result<TcpListener, ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| ServerError::Config(format!("the loading responder failed: {e}")))
    }
}

/// Bind and serve in one call (the common case).
pub async fn run_server<F>(
    config: ServerConfig,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    shutdown: F,
) -> Result<(), ServerError>
where
    F: Future<Output = ()>,
{
    Server::bind(config, engine, metrics)
        .await?
        .serve(shutdown)
        .await
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

/// Routes: path → (metrics label, allowed methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    ChatCompletions,
    Completions,
    ChatRender,
    CompletionsRender,
    Models,
    Model,
    Health,
    Version,
    TokenizerInfo,
    Tokenize,
    Detokenize,
    Metrics,
    Embeddings,
    Rerank,
    Score,
    Files,
    File,
    FileContent,
    Batches,
    Batch,
    BatchCancel,
}

/// The id in `/v1/{collection}/{id}` or `/v1/{collection}/{id}/{action}`.
fn path_id<'a>(path: &'a str, collection: &str) -> Option<(&'a str, Option<&'a str>)> {
    let rest = path.strip_prefix(collection)?.strip_prefix('/')?;
    let (id, action) = match rest.split_once('/') {
        Some((id, action)) => (id, Some(action)),
        None => (rest, None),
    };
    (!id.is_empty()).then_some((id, action))
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        Some(match path {
            "/v1/chat/completions" => Route::ChatCompletions,
            "/v1/completions" => Route::Completions,
            "/v1/chat/completions/render" => Route::ChatRender,
            "/v1/completions/render" => Route::CompletionsRender,
            "/v1/models" => Route::Models,
            "/health" => Route::Health,
            "/version" => Route::Version,
            "/tokenizer_info" => Route::TokenizerInfo,
            "/tokenize" => Route::Tokenize,
            "/detokenize" => Route::Detokenize,
            "/metrics" => Route::Metrics,
            "/v1/embeddings" => Route::Embeddings,
            "/v1/rerank" | "/rerank" | "/v2/rerank" => Route::Rerank,
            "/v1/score" | "/score" => Route::Score,
            "/v1/files" => Route::Files,
            "/v1/batches" => Route::Batches,
            p if p.starts_with("/v1/models/") && p.len() > "/v1/models/".len() => Route::Model,
            p => match (path_id(p, "/v1/files"), path_id(p, "/v1/batches")) {
                (Some((_, None)), _) => Route::File,
                (Some((_, Some("content"))), _) => Route::FileContent,
                (_, Some((_, None))) => Route::Batch,
                (_, Some((_, Some("cancel")))) => Route::BatchCancel,
                _ => return None,
            },
        })
    }

    fn label(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::ChatRender => "/v1/chat/completions/render",
            Route::CompletionsRender => "/v1/completions/render",
            Route::Models => "/v1/models",
            Route::Model => "/v1/models/{model}",
            Route::Health => "/health",
            Route::Version => "/version",
            Route::TokenizerInfo => "/tokenizer_info",
            Route::Tokenize => "/tokenize",
            Route::Detokenize => "/detokenize",
            Route::Metrics => "/metrics",
            Route::Embeddings => "/v1/embeddings",
            Route::Rerank => "/v1/rerank",
            Route::Score => "/v1/score",
            Route::Files => "/v1/files",
            Route::File => "/v1/files/{file_id}",
            Route::FileContent => "/v1/files/{file_id}/content",
            Route::Batches => "/v1/batches",
            Route::Batch => "/v1/batches/{batch_id}",
            Route::BatchCancel => "/v1/batches/{batch_id}/cancel",
        }
    }

    fn allow(self) -> &'static str {
        match self {
            Route::ChatCompletions
            | Route::Completions
            | Route::ChatRender
            | Route::CompletionsRender
            | Route::Tokenize
            | Route::Detokenize
            | Route::Embeddings
            | Route::Rerank
            | Route::Score
            | Route::BatchCancel => "POST, OPTIONS",
            Route::Files | Route::Batches => "GET, HEAD, POST, OPTIONS",
            Route::File => "GET, HEAD, DELETE, OPTIONS",
            Route::Models
            | Route::Model
            | Route::Health
            | Route::Version
            | Route::TokenizerInfo
            | Route::Metrics
            | Route::FileContent
            | Route::Batch => "GET, HEAD, OPTIONS",
        }
    }

    fn method_ok(self, m: &Method) -> bool {
        self.allow()
            .split(", ")
            .any(|allowed| allowed != "OPTIONS" && allowed == m.as_str())
    }
}

/// Build a JSON response.
pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response<ApiBody> {
    let mut r = Response::new(ApiBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Render an [`ApiError`] as the OpenAI error response.
pub(crate) fn error_response(err: &ApiError) -> Response<ApiBody> {
    let body = serde_json::to_vec(&err.body()).unwrap_or_default();
    let mut r = json_response(err.status, body);
    if let Some(secs) = err.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// The streaming response: SSE headers, no buffering by proxies.
pub(crate) fn sse_response(body: SseBody) -> Response<ApiBody> {
    let mut r = Response::new(ApiBody::Sse(Box::new(body)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// The client's `X-Request-Id` (vLLM echoes it and builds the response id from it); a
/// malformed one is a 400.
fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(X_REQUEST_ID) else {
        return Ok(None);
    };
    let text = v.to_str().map_err(|_| {
        ApiError::invalid_param("X-Request-Id", "`X-Request-Id` must be printable ASCII.")
    })?;
    crate::validation::request_id(Some(text), "X-Request-Id")
}

const X_REQUEST_ID: &str = "x-request-id";

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<ApiBody> {
    let method = req.method().clone();
    let origin = req.headers().get(header::ORIGIN).cloned();
    // Echoed on every answer, errors included, so a client can match its logs.
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .filter(|v| client_request_id(req.headers()).is_ok_and(|id| id.is_some()) && !v.is_empty())
        .cloned();
    let route = Route::parse(req.uri().path());
    let label = route.map_or("unmatched", Route::label);
    let mut resp = match dispatch(&state, route, req).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(status = e.status.as_u16(), error = %e.message, "request failed");
            } else {
                tracing::debug!(status = e.status.as_u16(), error = %e.message, "request rejected");
            }
            error_response(&e)
        }
    };
    if let Some(origin) = origin {
        add_cors(&state.cfg.allowed_origins, &origin, resp.headers_mut());
    }
    if let Some(id) = request_id {
        resp.headers_mut().insert(X_REQUEST_ID, id);
    }
    state
        .metrics
        .count_http(label, method.as_str(), resp.status().as_u16());
    resp
}

fn origin_allowed(allowed: &[String], origin: &HeaderValue) -> bool {
    allowed
        .iter()
        .any(|a| a == "*" || a.as_bytes() == origin.as_bytes())
}

/// CORS headers of a simple (non-preflight) response.
fn add_cors(allowed: &[String], origin: &HeaderValue, headers: &mut HeaderMap) {
    if allowed.iter().any(|a| a == "*") {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    } else if origin_allowed(allowed, origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// `OPTIONS`: a CORS preflight (Origin + Access-Control-Request-Method) gets the allow headers
/// (or 400 for a disallowed origin); a plain OPTIONS gets `Allow`.
fn options_response(
    state: &AppState,
    route: Option<Route>,
    headers: &HeaderMap,
) -> Result<Response<ApiBody>, ApiError> {
    let origin = headers.get(header::ORIGIN);
    let requested = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut r = Response::new(ApiBody::empty());
    let allow = route.map_or("GET, POST, OPTIONS", Route::allow);
    match (origin, requested) {
        (Some(origin), Some(_)) => {
            if !origin_allowed(&state.cfg.allowed_origins, origin) {
                return Err(ApiError::bad_request("Disallowed CORS origin."));
            }
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            let req_headers = headers
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("*"));
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, req_headers);
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        _ => {
            if route.is_none() {
                return Err(ApiError::new(StatusCode::NOT_FOUND, "Not Found"));
            }
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
    }
    Ok(r)
}

async fn dispatch(
    state: &Arc<AppState>,
    route: Option<Route>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    if req.method() == Method::OPTIONS {
        return options_response(state, route, req.headers());
    }
    // `/v1/*` as vLLM, plus the model-running aliases outside it (rerank and score).
    let guarded = req.uri().path().starts_with("/v1/")
        || req.uri().path() == "/v1"
        || matches!(route, Some(Route::Rerank | Route::Score));
    if guarded {
        if let Some(key) = &state.cfg.api_key {
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes);
            if !bearer_matches(header, key) {
                return Err(ApiError::unauthorized());
            }
        }
    }
    let Some(route) = route else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Not Found: {}", req.uri().path()),
        ));
    };
    if !route.method_ok(req.method()) {
        let mut r = error_response(&ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "Method {} is not allowed on {}; use {}.",
                req.method(),
                route.label(),
                route.allow()
            ),
        ));
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(route.allow()));
        return Ok(r);
    }
    let read_only = req.method() == Method::GET || req.method() == Method::HEAD;
    if state.shutting_down.load(Ordering::SeqCst) && !read_only {
        return Err(ApiError::shutting_down());
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let file_id = || path_id(&path, "/v1/files").map_or("", |(id, _)| id);
    let batch_id = || path_id(&path, "/v1/batches").map_or("", |(id, _)| id);
    match route {
        Route::Files if req.method() == Method::POST => {
            crate::batch::http::create_file(state, req).await
        }
        Route::Files => crate::batch::http::list_files(state, query.as_deref()).await,
        Route::File if req.method() == Method::DELETE => {
            crate::batch::http::delete_file(state, file_id()).await
        }
        Route::File => crate::batch::http::get_file(state, file_id()).await,
        Route::FileContent => crate::batch::http::file_content(state, file_id()).await,
        Route::Batches if req.method() == Method::POST => {
            let body = read_json_body(req, &state.cfg).await?;
            crate::batch::http::create_batch(state, &body).await
        }
        Route::Batches => crate::batch::http::list_batches(state, query.as_deref()).await,
        Route::Batch => crate::batch::http::get_batch(state, batch_id()).await,
        Route::BatchCancel => crate::batch::http::cancel_batch(state, batch_id()).await,
        Route::ChatCompletions => {
            let header_id = client_request_id(req.headers())?;
            let body = read_json_body(req, &state.cfg).await?;
            handlers::chat_completions(state, &body, handlers::Origin::Http, header_id.as_deref())
                .await
        }
        Route::Completions => {
            let header_id = client_request_id(req.headers())?;
            let body = read_json_body(req, &state.cfg).await?;
            handlers::completions(state, &body, handlers::Origin::Http, header_id.as_deref()).await
        }
        Route::Tokenize => {
            let body = read_json_body(req, &state.cfg).await?;
            handlers::tokenize(state, &body).await
        }
        Route::ChatRender => {
            let body = read_json_body(req, &state.cfg).await?;
            handlers::render_chat(state, &body).await
        }
        Route::CompletionsRender => {
            let body = read_json_body(req, &state.cfg).await?;
            handlers::render_completions(state, &body).await
        }
        Route::Detokenize => {
            let body = read_json_body(req, &state.cfg).await?;
            handlers::detokenize(state, &body).await
        }
        Route::Embeddings => {
            let body = read_json_body(req, &state.cfg).await?;
            crate::embeddings::embeddings(state, &body).await
        }
        Route::Rerank => {
            let body = read_json_body(req, &state.cfg).await?;
            crate::embeddings::rerank(state, &body).await
        }
        Route::Score => {
            let body = read_json_body(req, &state.cfg).await?;
            crate::embeddings::score(state, &body).await
        }
        Route::Models => Ok(handlers::models(state)),
        Route::Model => {
            let id = req.uri().path().trim_start_matches("/v1/models/");
            handlers::model(state, id)
        }
        Route::Health => Ok(handlers::health(state)),
        Route::Version => Ok(handlers::version()),
        Route::TokenizerInfo => handlers::tokenizer_info(state),
        Route::Metrics => Ok(handlers::metrics(state)),
    }
}

/// Read a JSON request body without ever holding more than `max_body_bytes`: a declared length
/// over the limit is refused before reading, and the limit also applies while streaming
/// (chunked). A body that does not arrive within `body_read_timeout` is a 408 (slowloris).
async fn read_json_body(req: Request<Incoming>, cfg: &ServerConfig) -> Result<Bytes, ApiError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Type must be application/json, got `{essence}`."),
            ));
        }
    }
    read_body(req, cfg.max_body_bytes, cfg.body_read_timeout).await
}

/// Read a whole request body of at most `max` bytes (413 above, checked against
/// `Content-Length` first and while reading), within `timeout` (408 after).
pub(crate) async fn read_body(
    req: Request<Incoming>,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body is larger than the limit of {max} bytes."),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(too_large());
        }
    }
    let collected = tokio::time::timeout(timeout, Limited::new(req.into_body(), max).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "The request body was not received within {} s.",
                    timeout.as_secs_f64()
                ),
            )
        })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "Failed to read the request body: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            Route::parse("/v1/chat/completions"),
            Some(Route::ChatCompletions)
        );
        assert_eq!(Route::parse("/v1/models/org/name"), Some(Route::Model));
        assert_eq!(Route::parse("/v1/models/"), None);
        assert_eq!(Route::parse("/nope"), None);
        assert!(Route::Completions.method_ok(&Method::POST));
        assert!(!Route::Completions.method_ok(&Method::GET));
        assert!(Route::Health.method_ok(&Method::HEAD));
        assert_eq!(Route::Health.allow(), "GET, HEAD, OPTIONS");
    }

    #[test]
    fn cors_headers() {
        let mut h = HeaderMap::new();
        add_cors(&["*".into()], &HeaderValue::from_static("http://a"), &mut h);
        assert_eq!(h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).unwrap(), "*");
        let mut h = HeaderMap::new();
        add_cors(
            &["http://a".into()],
            &HeaderValue::from_static("http://a"),
            &mut h,
        );
        assert_eq!(
            h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).unwrap(),
            "http://a"
        );
        let mut h = HeaderMap::new();
        add_cors(
            &["http://a".into()],
            &HeaderValue::from_static("http://b"),
            &mut h,
        );
        assert!(h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }

    #[test]
    fn error_response_shape() {
        let r = error_response(&ApiError::from(spindle_engine::EngineError::QueueFull(3)));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let r = error_response(&ApiError::from(spindle_engine::EngineError::EngineDead(
            "x".into(),
        )));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn fingerprint_is_stable() {
        assert_eq!(
            fingerprint("a", "f32", "cpu"),
            fingerprint("a", "f32", "cpu")
        );
        assert!(fingerprint("a", "f32", "cpu").starts_with("fp_"));
    }
}
