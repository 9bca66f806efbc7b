//! One measured request: the JSON body sent to the server and the timing of its streamed answer.
//! Parsing is separated from I/O ([`StreamAccumulator`] takes events with their arrival times) so
//! the timing rules are testable without a server.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::client::{read_body, truncate, HttpClient};
use crate::dataset::BenchRequest;
use crate::metrics::RequestOutcome;
use crate::sse::SseParser;

/// Which OpenAI API the prompts go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// `/v1/chat/completions`: the prompt becomes one user message (the chat template adds
    /// tokens, which the server's usage counts).
    Chat,
    /// `/v1/completions`: the prompt is sent as is.
    #[default]
    Completions,
}

impl EndpointKind {
    /// The route under the base URL.
    pub fn route(self) -> &'static str {
        match self {
            EndpointKind::Chat => "/v1/chat/completions",
            EndpointKind::Completions => "/v1/completions",
        }
    }
}

/// Request fields shared by every prompt of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOptions {
    /// Model name to put in `model`.
    pub model: String,
    /// Send `ignore_eos: true` (vLLM's extension, honoured by spindle and llama-server) so every
    /// request generates exactly its output length.
    pub ignore_eos: bool,
    /// Sampling temperature; `None` leaves the server's default.
    pub temperature: Option<f64>,
    /// Extra JSON fields merged into every body.
    pub extra_body: Map<String, Value>,
}

/// The streaming request body for `req`: always `stream: true` with usage in the last chunk, and
/// the output length as `max_tokens` (plus `max_completion_tokens` for chat).
pub fn request_body(kind: EndpointKind, opts: &RequestOptions, req: &BenchRequest) -> Value {
    let mut body = match kind {
        EndpointKind::Chat => json!({
            "model": opts.model,
            "messages": [{"role": "user", "content": req.prompt}],
            "max_completion_tokens": req.output_len,
            "max_tokens": req.output_len,
        }),
        EndpointKind::Completions => json!({
            "model": opts.model,
            "prompt": req.prompt,
            "max_tokens": req.output_len,
        }),
    };
    if let Some(map) = body.as_object_mut() {
        map.insert("stream".into(), Value::Bool(true));
        map.insert("stream_options".into(), json!({"include_usage": true}));
        if opts.ignore_eos {
            map.insert("ignore_eos".into(), Value::Bool(true));
        }
        if let Some(t) = opts.temperature {
            map.insert("temperature".into(), json!(t));
        }
        for (k, v) in &opts.extra_body {
            map.insert(k.clone(), v.clone());
        }
    }
    body
}

/// Timing and counts of one streamed response, fed event by event.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StreamAccumulator {
    /// Arrival of the first chunk with output text (seconds after sending).
    first_content: Option<f64>,
    /// Arrival of the first chunk with any choice (text or a finish reason).
    first_choice: Option<f64>,
    last_content: Option<f64>,
    itl: Vec<f64>,
    content_chunks: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    error: Option<String>,
    done: bool,
}

/// Output text of a choice, for both APIs (chat deltas, reasoning deltas, completion text).
fn choice_text(choice: &Value) -> Option<&str> {
    if let Some(t) = choice.get("text").and_then(Value::as_str) {
        return Some(t);
    }
    let delta = choice.get("delta")?;
    ["content", "reasoning_content", "reasoning"]
        .iter()
        .filter_map(|k| delta.get(*k).and_then(Value::as_str))
        .find(|s| !s.is_empty())
}

impl StreamAccumulator {
    /// Feed the data of one server-sent event that arrived `t` seconds after the request was sent.
    pub fn on_event(&mut self, data: &str, t: f64) {
        let data = data.trim();
        if data.is_empty() {
            return;
        }
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                self.error.get_or_insert_with(|| {
                    format!("invalid JSON in the stream ({e}): {}", truncate(data, 200))
                });
                return;
            }
        };
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| err.to_string());
            self.error
                .get_or_insert_with(|| format!("error event: {}", truncate(&msg, 300)));
            return;
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            if let Some(p) = u.get("prompt_tokens").and_then(Value::as_u64) {
                self.prompt_tokens = Some(p);
            }
            if let Some(c) = u.get("completion_tokens").and_then(Value::as_u64) {
                self.completion_tokens = Some(c);
            }
        }
        let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
            return;
        };
        self.first_choice.get_or_insert(t);
        if choice_text(choice).is_some_and(|s| !s.is_empty()) {
            match self.last_content {
                None => self.first_content = Some(t),
                Some(last) => self.itl.push(t - last),
            }
            self.last_content = Some(t);
            self.content_chunks += 1;
        }
    }

    /// Record a failure (HTTP error, broken connection, timeout); the first one is kept.
    pub fn fail(&mut self, error: String) {
        self.error.get_or_insert(error);
    }

    /// The outcome of a request sent at `start_s` (relative to the run) whose last byte came
    /// `e2el_s` after sending.
    pub fn finish(self, start_s: f64, e2el_s: f64, expected_prompt_tokens: u64) -> RequestOutcome {
        let usage_reported = self.completion_tokens.is_some();
        let output_tokens = self.completion_tokens.unwrap_or(self.content_chunks);
        // Without any text (e.g. only an EOS token), the first choice marks the first token.
        let ttft = self.first_content.or(if output_tokens > 0 {
            self.first_choice
        } else {
            None
        });
        let error = match (&self.error, ttft) {
            (Some(e), _) => Some(e.clone()),
            (None, None) => Some("the stream ended without any output".to_owned()),
            (None, Some(_)) => None,
        };
        RequestOutcome {
            success: error.is_none(),
            error,
            prompt_tokens: self.prompt_tokens,
            expected_prompt_tokens,
            output_tokens,
            usage_reported,
            start_s,
            ttft_s: ttft.unwrap_or(0.0),
            itl_s: self.itl,
            e2el_s,
        }
    }
}

/// Send one streaming request and time it. `t0` is the start of the run; failures of any kind
/// end up in the outcome, never as an error of the run.
pub async fn run_request(
    client: &HttpClient,
    kind: EndpointKind,
    body: Vec<u8>,
    expected_prompt_tokens: u64,
    t0: Instant,
    timeout: Duration,
) -> RequestOutcome {
    let sent = Instant::now();
    let start_s = sent.saturating_duration_since(t0).as_secs_f64();
    let mut acc = StreamAccumulator::default();
    let exchange = async {
        let resp = client.send(Method::POST, kind.route(), Some(body)).await?;
        let status = resp.status();
        if !status.is_success() {
            let text = read_body(resp.into_body(), 1 << 16)
                .await
                .unwrap_or_default();
            return Err(format!(
                "HTTP {}: {}",
                status.as_u16(),
                truncate(&text, 300)
            ));
        }
        let mut parser = SseParser::new();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the stream: {e}"))?;
            if let Some(data) = frame.data_ref() {
                let t = sent.elapsed().as_secs_f64();
                for event in parser.push(data) {
                    acc.on_event(&event, t);
                }
            }
        }
        if let Some(event) = parser.finish() {
            acc.on_event(&event, sent.elapsed().as_secs_f64());
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => acc.fail(e),
        Err(_) => acc.fail(format!("timed out after {timeout:?}")),
    }
    acc.finish(
        start_s,
        sent.elapsed().as_secs_f64(),
        expected_prompt_tokens,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RequestOptions {
        RequestOptions {
            model: "m".into(),
            ignore_eos: true,
            temperature: Some(0.0),
            extra_body: Map::new(),
        }
    }

    fn req() -> BenchRequest {
        BenchRequest {
            prompt: "hello world".into(),
            expected_input_tokens: 2,
            output_len: 16,
        }
    }

    #[test]
    fn bodies() {
        let c = request_body(EndpointKind::Completions, &opts(), &req());
        assert_eq!(c["prompt"], "hello world");
        assert_eq!(c["max_tokens"], 16);
        assert_eq!(c["stream"], true);
        assert_eq!(c["stream_options"]["include_usage"], true);
        assert_eq!(c["ignore_eos"], true);
        assert_eq!(c["temperature"], 0.0);
        let mut o = opts();
        o.ignore_eos = false;
        o.temperature = None;
        o.extra_body.insert("top_k".into(), json!(5));
        let ch = request_body(EndpointKind::Chat, &o, &req());
        assert_eq!(ch["messages"][0]["content"], "hello world");
        assert_eq!(ch["max_completion_tokens"], 16);
        assert!(ch.get("ignore_eos").is_none() && ch.get("temperature").is_none());
        assert_eq!(ch["top_k"], 5);
    }

    fn chat_chunk(text: &str) -> String {
        json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
            .to_string()
    }

    #[test]
    fn timing_from_chat_stream() {
        let mut a = StreamAccumulator::default();
        // A role-only first chunk does not count as the first token.
        a.on_event(
            &json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}).to_string(),
            0.05,
        );
        a.on_event(&chat_chunk("Hel"), 0.25);
        a.on_event(&chat_chunk("lo"), 0.30);
        a.on_event(&chat_chunk(" there"), 0.40);
        a.on_event(
            &json!({"choices": [{"delta": {}, "finish_reason": "length"}]}).to_string(),
            0.40,
        );
        a.on_event(
            &json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 4}})
                .to_string(),
            0.41,
        );
        a.on_event("[DONE]", 0.41);
        let o = a.finish(1.0, 0.42, 2);
        assert!(o.success, "{:?}", o.error);
        assert_eq!(o.ttft_s, 0.25);
        assert_eq!(o.itl_s.len(), 2);
        assert!((o.itl_s[0] - 0.05).abs() < 1e-12 && (o.itl_s[1] - 0.10).abs() < 1e-12);
        assert_eq!(
            (o.prompt_tokens, o.output_tokens, o.usage_reported),
            (Some(12), 4, true)
        );
        assert_eq!((o.start_s, o.e2el_s), (1.0, 0.42));
        assert!((o.tpot_s().unwrap() - (0.42 - 0.25) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn completions_stream_without_usage_counts_chunks() {
        let mut a = StreamAccumulator::default();
        for (i, t) in ["a", "b", "c"].iter().enumerate() {
            a.on_event(
                &json!({"choices": [{"text": t}]}).to_string(),
                0.1 * (i + 1) as f64,
            );
        }
        let o = a.finish(0.0, 0.35, 7);
        assert!(o.success);
        assert_eq!(
            (o.output_tokens, o.usage_reported, o.prompt_tokens),
            (3, false, None)
        );
        assert_eq!(o.input_tokens(), 7);
    }

    #[test]
    fn failures() {
        let mut a = StreamAccumulator::default();
        a.on_event(&chat_chunk("x"), 0.1);
        a.on_event(
            &json!({"error": {"message": "engine died", "code": 500}}).to_string(),
            0.2,
        );
        let o = a.finish(0.0, 0.2, 1);
        assert!(!o.success);
        assert!(o.error.unwrap().contains("engine died"));

        let o = StreamAccumulator::default().finish(0.0, 0.1, 1);
        assert!(!o.success && o.error.unwrap().contains("without any output"));

        let mut a = StreamAccumulator::default();
        a.on_event("{not json", 0.1);
        assert!(a
            .finish(0.0, 0.1, 1)
            .error
            .unwrap()
            .contains("invalid JSON"));

        let mut a = StreamAccumulator::default();
        a.fail("HTTP 429: too many requests".into());
        a.fail("second".into());
        assert_eq!(
            a.finish(0.0, 0.0, 1).error.unwrap(),
            "HTTP 429: too many requests"
        );
    }

    #[test]
    fn eos_only_output_counts_via_usage() {
        let mut a = StreamAccumulator::default();
        a.on_event(
            &json!({"choices": [{"text": "", "finish_reason": "stop"}]}).to_string(),
            0.2,
        );
        a.on_event(
            &json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
                .to_string(),
            0.2,
        );
        let o = a.finish(0.0, 0.21, 3);
        assert!(o.success);
        assert_eq!((o.ttft_s, o.output_tokens), (0.2, 1));
    }
}
