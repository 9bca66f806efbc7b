//! `/v1/embeddings`, `/v1/rerank` (also `/rerank`, `/v2/rerank`) and `/v1/score` (also
//! `/score`) for embedding models, with vLLM's request and response shapes. Inputs are parsed and
//! checked here, tokenized on the blocking pool, checked against the model's limits into one
//! [`EmbedRequest`], and embedded by the engine thread; rerank and score rank by the cosine
//! similarity of the embeddings.

use std::sync::Arc;

use base64::Engine as _;
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};
use spindle_engine::{EmbedRequest, EngineEvent, ModelKind, ModelLimits, RequestError, Usage};
use spindle_model::TokenizerBundle;

use crate::error::ApiError;
use crate::ids::{random_id, unix_now};
use crate::pool::blocking;
use crate::protocol::{EmbeddingRequest, RerankRequest, ScoreRequest};
use crate::response::{json_response, ApiBody};
use crate::state::AppState;
use crate::validation::{parse_json, parse_text_or_tokens, resolve_model, PromptInput};

/// Most inputs in one `/v1/embeddings` request (OpenAI's limit), and most documents to rerank or
/// texts to score.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// How inputs longer than the model's limit are handled.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Truncation {
    /// Refuse with a 400 stating the numbers.
    Refuse,
    /// Keep the first `n` tokens (special tokens kept for text inputs).
    To(usize),
}

fn parse_truncation(value: Option<i64>, limits: ModelLimits) -> Result<Truncation, ApiError> {
    let max = limits.max_model_len;
    match value {
        None => Ok(Truncation::Refuse),
        Some(-1) => Ok(Truncation::To(max)),
        Some(n) if n >= 1 && n as u64 <= max as u64 => Ok(Truncation::To(n as usize)),
        Some(n) if n >= 1 => Err(ApiError::invalid_param(
            "truncate_prompt_tokens",
            format!("`truncate_prompt_tokens` ({n}) is greater than the model's maximum input length ({max})."),
        )),
        Some(n) => Err(ApiError::invalid_param(
            "truncate_prompt_tokens",
            format!("`truncate_prompt_tokens` must be -1 or at least 1, got {n}."),
        )),
    }
}

/// Tokenize (on the blocking pool) and truncate the inputs.
async fn tokenize(
    tok: Arc<TokenizerBundle>,
    inputs: Vec<PromptInput>,
    truncation: Truncation,
    add_special_tokens: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    blocking(move || {
        inputs
            .into_iter()
            .map(|input| {
                let ids = match (input, truncation) {
                    (PromptInput::Tokens(mut ids), Truncation::To(n)) => {
                        ids.truncate(n);
                        ids
                    }
                    (PromptInput::Tokens(ids), Truncation::Refuse) => ids,
                    (PromptInput::Text(t), Truncation::To(n)) => tok
                        .encode_truncated(&t, add_special_tokens, n)
                        .map_err(ApiError::tokenization_failed)?,
                    (PromptInput::Text(t), Truncation::Refuse) => tok
                        .encode(&t, add_special_tokens)
                        .map_err(ApiError::tokenization_failed)?,
                };
                Ok(ids)
            })
            .collect()
    })
    .await
}

fn request_error(e: RequestError, param: &str) -> ApiError {
    match e {
        RequestError::InputTooLong {
            index,
            tokens,
            max_model_len,
        } => ApiError::invalid_param(
            param,
            format!(
                "This model's maximum input length is {max_model_len} tokens. However, input {index} has {tokens} tokens. Shorten it, or set `truncate_prompt_tokens` to truncate it."
            ),
        ),
        RequestError::EmptyInput { index } => ApiError::invalid_param(
            param,
            format!("Input {index} is empty after tokenization."),
        ),
        other => ApiError::invalid_param(param, format!("Invalid input: {other}.")),
    }
}

/// The embedding model this server runs, or a 400 saying it runs none.
fn require_embedding_model(state: &AppState, endpoint: &str) -> Result<(), ApiError> {
    match state.engine.model_kind() {
        ModelKind::Embed { .. } => Ok(()),
        ModelKind::Generate => Err(ApiError::bad_request(format!(
            "The served model generates text; it is not an embedding model, so {endpoint} is not available. Serve an embedding model (e.g. a sentence-transformers directory) for it."
        ))),
    }
}

/// Embed token inputs through the engine; one vector per input, in order, and the usage.
async fn embed(
    state: &Arc<AppState>,
    request_id: &str,
    inputs: Vec<Vec<u32>>,
    param: &str,
) -> Result<(Vec<Vec<f32>>, Usage), ApiError> {
    let request = EmbedRequest::new(request_id, inputs, state.engine.limits())
        .map_err(|e| request_error(e, param))?;
    let mut stream = state.engine.embed(request)?;
    let mut vectors = None;
    loop {
        match stream.recv().await {
            Some(EngineEvent::Embeddings(v)) => vectors = Some(v),
            Some(EngineEvent::Finished { usage, timings }) => {
                state
                    .metrics
                    .observe_request(&timings, usage.prompt_tokens, 0);
                state.metrics.count_success("stop");
                let vectors = vectors
                    .ok_or_else(|| ApiError::internal("the engine finished without embeddings"))?;
                return Ok((vectors, usage));
            }
            Some(EngineEvent::Error(e)) => return Err(e.into()),
            Some(EngineEvent::Delta(_) | EngineEvent::PromptLogprobs(_)) => {
                return Err(ApiError::internal(
                    "the engine sent tokens for an embedding request",
                ))
            }
            None => return Err(ApiError::internal("the engine closed the request")),
        }
    }
}

/// One vector as sent: float32 numbers (serialized as f32, shortest form, not widened to f64)
/// or base64 of little-endian float32.
#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingValue<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingData<'a> {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue<'a>,
}

#[derive(Serialize)]
struct EmbeddingResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    data: Vec<EmbeddingData<'a>>,
    usage: Value,
}

fn to_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let req: EmbeddingRequest =
        crate::validation::parse_request(body, crate::fields::Endpoint::Embeddings)?;
    let model = resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    require_embedding_model(state, "/v1/embeddings")?;
    let limits = state.engine.limits();
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("`encoding_format` must be \"float\" or \"base64\", got {other:?}."),
            ))
        }
    };
    let truncation = parse_truncation(req.truncate_prompt_tokens, limits)?;
    let inputs = parse_text_or_tokens(
        req.input.as_ref(),
        "input",
        "inputs",
        limits.vocab_size,
        MAX_EMBEDDING_INPUTS,
    )?;
    let ids = tokenize(
        state.engine.tokenizer().clone(),
        inputs,
        truncation,
        req.add_special_tokens.unwrap_or(true),
    )
    .await?;
    let id = random_id("embd");
    let (vectors, usage) = embed(state, &id, ids, "input").await?;
    // Formatting up to 2048 vectors (or base64-encoding them) is CPU work: off the runtime.
    let body = blocking(move || {
        let data: Vec<EmbeddingData> = vectors
            .iter()
            .enumerate()
            .map(|(index, v)| EmbeddingData {
                object: "embedding",
                index,
                embedding: if base64 {
                    EmbeddingValue::Base64(to_base64(v))
                } else {
                    EmbeddingValue::Float(v)
                },
            })
            .collect();
        let body = EmbeddingResponse {
            id: &id,
            object: "list",
            created: unix_now(),
            model: &model,
            data,
            usage: json!({"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}),
        };
        serde_json::to_vec(&body)
            .map_err(|e| ApiError::internal(format!("serialization failed: {e}")))
    })
    .await?;
    Ok(json_response(StatusCode::OK, body))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na * nb)
}

/// A list of texts (or one text) for rerank and score.
fn parse_texts(value: Option<&Value>, param: &str) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            param,
            format!("`{param}` must be a string or a list of strings."),
        )
    };
    let texts: Vec<String> = match value {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                param,
                format!("`{param}` is required."),
            ))
        }
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                // Cohere/Jina-style document objects.
                Value::Object(o) => o
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(bad),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if texts.is_empty() {
        return Err(ApiError::invalid_param(
            param,
            format!("`{param}` must not be empty."),
        ));
    }
    if texts.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "At most {MAX_EMBEDDING_INPUTS} texts per request, got {}.",
                texts.len()
            ),
        ));
    }
    Ok(texts)
}

/// Embed `texts` (query first, say) and return the vectors and the token count.
async fn embed_texts(
    state: &Arc<AppState>,
    request_id: &str,
    texts: Vec<String>,
    truncate: Option<i64>,
    param: &str,
) -> Result<(Vec<Vec<f32>>, Usage), ApiError> {
    let limits = state.engine.limits();
    let truncation = parse_truncation(truncate, limits)?;
    let inputs = texts.into_iter().map(PromptInput::Text).collect();
    let ids = tokenize(state.engine.tokenizer().clone(), inputs, truncation, true).await?;
    embed(state, request_id, ids, param).await
}

/// `POST /v1/rerank` (also `/rerank`, `/v2/rerank`).
pub(crate) async fn rerank(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let req: RerankRequest = parse_json(body)?;
    let model = resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    require_embedding_model(state, "rerank")?;
    let query = match &req.query {
        Some(Value::String(q)) => q.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param("query", "`query` is required."))
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "query",
                "`query` must be a string.",
            ))
        }
    };
    let documents = parse_texts(req.documents.as_ref(), "documents")?;
    let top_n = match req.top_n {
        None | Some(0) => documents.len(),
        Some(n) if n > 0 => (n as usize).min(documents.len()),
        Some(n) => {
            return Err(ApiError::invalid_param(
                "top_n",
                format!("`top_n` must be at least 0, got {n}."),
            ))
        }
    };
    let id = random_id("rerank");
    let mut texts = vec![query];
    texts.extend(documents.iter().cloned());
    let (vectors, usage) =
        embed_texts(state, &id, texts, req.truncate_prompt_tokens, "documents").await?;
    let (query_vec, doc_vecs) = vectors
        .split_first()
        .ok_or_else(|| ApiError::internal("the engine returned no embedding for the query"))?;
    let mut scored: Vec<(usize, f64)> = doc_vecs
        .iter()
        .enumerate()
        .map(|(i, v)| (i, cosine(query_vec, v)))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let with_docs = req.return_documents.unwrap_or(true);
    let results: Vec<Value> = scored
        .into_iter()
        .take(top_n)
        .map(|(index, score)| {
            let mut r = json!({"index": index, "relevance_score": score});
            if with_docs {
                r["document"] = json!({"text": documents[index]});
            }
            r
        })
        .collect();
    let body = json!({
        "id": id,
        "model": model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
        "results": results,
    });
    Ok(json_response(StatusCode::OK, body.to_string().into_bytes()))
}

/// `POST /v1/score` (also `/score`): `text_1` against each `text_2` (one against many, or
/// pairwise for two lists of the same length).
pub(crate) async fn score(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let req: ScoreRequest = parse_json(body)?;
    let model = resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    require_embedding_model(state, "score")?;
    let left = parse_texts(req.text_1.as_ref(), "text_1")?;
    let right = parse_texts(req.text_2.as_ref(), "text_2")?;
    if left.len() != 1 && left.len() != right.len() {
        return Err(ApiError::invalid_param(
            "text_1",
            format!(
                "`text_1` must be one text or as many texts as `text_2` ({} vs {}).",
                left.len(),
                right.len()
            ),
        ));
    }
    let id = random_id("score");
    let (n_left, n_right) = (left.len(), right.len());
    let texts: Vec<String> = left.into_iter().chain(right).collect();
    let (vectors, usage) =
        embed_texts(state, &id, texts, req.truncate_prompt_tokens, "text_2").await?;
    if vectors.len() != n_left + n_right {
        return Err(ApiError::internal(
            "the engine returned the wrong number of embeddings",
        ));
    }
    let (lv, rv) = vectors.split_at(n_left);
    let data: Vec<Value> = rv
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let l = if n_left == 1 { &lv[0] } else { &lv[i] };
            json!({"index": i, "object": "score", "score": cosine(l, r)})
        })
        .collect();
    let body = json!({
        "id": id,
        "object": "list",
        "created": unix_now(),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    });
    Ok(json_response(StatusCode::OK, body.to_string().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ModelLimits = ModelLimits {
        vocab_size: 100,
        max_model_len: 8,
    };

    #[test]
    fn input_shapes() {
        let p =
            |v: Value| parse_text_or_tokens(Some(&v), "input", "inputs", 100, MAX_EMBEDDING_INPUTS);
        assert_eq!(
            p(json!("hi")).unwrap(),
            vec![PromptInput::Text("hi".into())]
        );
        assert_eq!(
            p(json!(["a", "b"])).unwrap(),
            vec![PromptInput::Text("a".into()), PromptInput::Text("b".into())]
        );
        assert_eq!(
            p(json!([1, 2])).unwrap(),
            vec![PromptInput::Tokens(vec![1, 2])]
        );
        assert_eq!(
            p(json!([[1], [2, 3]])).unwrap(),
            vec![
                PromptInput::Tokens(vec![1]),
                PromptInput::Tokens(vec![2, 3])
            ]
        );
        for bad in [
            json!([]),
            json!([[]]),
            json!([[1], []]),
            json!(5),
            json!([true]),
            json!(["a", 1]),
            json!([1, "a"]),
            json!([100]),
            json!([-1]),
            json!({"a": 1}),
        ] {
            let e = p(bad.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("input"), "{bad}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert!(parse_text_or_tokens(None, "input", "inputs", 100, 1).is_err());
        let many = Value::Array(vec![json!("x"); MAX_EMBEDDING_INPUTS + 1]);
        assert!(p(many).is_err());
    }

    #[test]
    fn truncation_values() {
        assert_eq!(parse_truncation(None, LIMITS).unwrap(), Truncation::Refuse);
        assert_eq!(
            parse_truncation(Some(-1), LIMITS).unwrap(),
            Truncation::To(8)
        );
        assert_eq!(
            parse_truncation(Some(3), LIMITS).unwrap(),
            Truncation::To(3)
        );
        for bad in [0, -2, 9] {
            assert!(parse_truncation(Some(bad), LIMITS).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let s = to_base64(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(
            bytes,
            [1f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
    }

    #[test]
    fn cosine_handles_zero_vectors() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
