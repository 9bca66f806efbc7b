//! The HTTP server: listener, connections (HTTP/1.1 keep-alive and HTTP/2 via hyper-util's auto
//! builder), the routes and their wiring to handlers, CORS, auth, per-request metrics, and
//! graceful shutdown. Shared state is in `state.rs`, bodies and response helpers in
//! `response.rs`, the configuration in `config.rs`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use spindle_engine::EngineHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::auth::bearer_matches;
use crate::config::ServerConfig;
use crate::error::{ApiError, ServerError};
use crate::handlers;
use crate::metrics::Metrics;
use crate::response::{error_response, read_json_body, ApiBody};
use crate::state::AppState;

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
    Responses,
    Response,
    ResponseInputItems,
    ResponseCancel,
    Messages,
    CountTokens,
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
            "/v1/responses" => Route::Responses,
            "/v1/messages" => Route::Messages,
            "/v1/messages/count_tokens" => Route::CountTokens,
            p if p.starts_with("/v1/models/") && p.len() > "/v1/models/".len() => Route::Model,
            p => match (
                path_id(p, "/v1/files"),
                path_id(p, "/v1/batches"),
                path_id(p, "/v1/responses"),
            ) {
                (Some((_, None)), _, _) => Route::File,
                (Some((_, Some("content"))), _, _) => Route::FileContent,
                (_, Some((_, None)), _) => Route::Batch,
                (_, Some((_, Some("cancel"))), _) => Route::BatchCancel,
                (_, _, Some((_, None))) => Route::Response,
                (_, _, Some((_, Some("input_items")))) => Route::ResponseInputItems,
                (_, _, Some((_, Some("cancel")))) => Route::ResponseCancel,
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
            Route::Responses => "/v1/responses",
            Route::Response => "/v1/responses/{response_id}",
            Route::ResponseInputItems => "/v1/responses/{response_id}/input_items",
            Route::ResponseCancel => "/v1/responses/{response_id}/cancel",
            Route::Messages => "/v1/messages",
            Route::CountTokens => "/v1/messages/count_tokens",
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
            | Route::BatchCancel
            | Route::Responses
            | Route::ResponseCancel
            | Route::Messages
            | Route::CountTokens => "POST, OPTIONS",
            Route::Files | Route::Batches => "GET, HEAD, POST, OPTIONS",
            Route::File | Route::Response => "GET, HEAD, DELETE, OPTIONS",
            Route::Models
            | Route::Model
            | Route::Health
            | Route::Version
            | Route::TokenizerInfo
            | Route::Metrics
            | Route::FileContent
            | Route::Batch
            | Route::ResponseInputItems => "GET, HEAD, OPTIONS",
        }
    }

    fn method_ok(self, m: &Method) -> bool {
        self.allow()
            .split(", ")
            .any(|allowed| allowed != "OPTIONS" && allowed == m.as_str())
    }
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
            error_for(route, &e)
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

/// An error answer in the route's API's shape (Anthropic's for `/v1/messages`).
fn error_for(route: Option<Route>, e: &ApiError) -> Response<ApiBody> {
    match route {
        Some(Route::Messages | Route::CountTokens) => crate::messages::error_response(e),
        _ => error_response(e),
    }
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
            // Anthropic's clients send the key as `x-api-key`.
            let x_api_key = req
                .headers()
                .get("x-api-key")
                .is_some_and(|v| crate::auth::constant_time_eq(v.as_bytes(), key.as_bytes()));
            if !bearer_matches(header, key) && !x_api_key {
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
        let mut r = error_for(
            Some(route),
            &ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "Method {} is not allowed on {}; use {}.",
                    req.method(),
                    route.label(),
                    route.allow()
                ),
            ),
        );
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
    let response_id = || path_id(&path, "/v1/responses").map_or("", |(id, _)| id);
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
        Route::Messages => {
            let body = read_json_body(req, &state.cfg).await?;
            crate::messages::create(state, &body).await
        }
        Route::CountTokens => {
            let body = read_json_body(req, &state.cfg).await?;
            crate::messages::count_tokens(state, &body).await
        }
        Route::Responses => {
            let header_id = client_request_id(req.headers())?;
            let body = read_json_body(req, &state.cfg).await?;
            crate::responses::create(state, &body, header_id.as_deref()).await
        }
        Route::Response if req.method() == Method::DELETE => {
            crate::responses::delete(state, response_id()).await
        }
        Route::Response => crate::responses::get(state, response_id()).await,
        Route::ResponseCancel => crate::responses::cancel(state, response_id()).await,
        Route::ResponseInputItems => {
            crate::responses::input_items_list(state, response_id(), query.as_deref()).await
        }
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
}
