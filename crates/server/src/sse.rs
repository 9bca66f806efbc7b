//! Server-sent events framing as OpenAI streams it: each event is `data: <json>\n\n`, the
//! stream ends with `data: [DONE]\n\n`, and an error after the stream started is a final
//! `data: {"error": …}` event before `[DONE]` (the status line was already sent). [`SseBody`]
//! is the response body that pulls a [`Generation`]'s events as hyper asks for data.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use serde::Serialize;

use crate::error::ApiError;
use crate::stream::{Generation, Step};

/// The terminating event every OpenAI client waits for.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Frame one JSON event. Serialization of our own types cannot fail in practice; if it ever
/// did, the client gets an error event instead of a broken frame.
pub fn event<T: Serialize>(value: &T) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut buf, value).is_err() {
        buf.truncate(6);
        buf.extend_from_slice(br#"{"error":{"message":"serialization failed","type":"InternalServerError","param":null,"code":500}}"#);
    }
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// The error event sent when a started stream fails.
pub fn error_event(err: &ApiError) -> Bytes {
    event(&err.body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_data_lines_with_blank_line() {
        let b = event(&serde_json::json!({"a": 1}));
        assert_eq!(&b[..], b"data: {\"a\":1}\n\n");
        assert_eq!(DONE, b"data: [DONE]\n\n");
    }

    #[test]
    fn error_event_has_openai_shape() {
        let b = error_event(&ApiError::bad_request("nope"));
        let text = std::str::from_utf8(&b).unwrap();
        assert!(text.starts_with("data: {\"error\":{"), "{text}");
        assert!(text.ends_with("}\n\n"));
        let v: serde_json::Value =
            serde_json::from_str(text.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(v["error"]["message"], "nope");
        assert_eq!(v["error"]["code"], 400);
    }

    #[test]
    fn json_with_newlines_stays_on_one_line() {
        let b = event(&serde_json::json!({"content": "a\n\nb"}));
        let text = std::str::from_utf8(&b).unwrap();
        assert_eq!(text.matches('\n').count(), 2, "{text:?}");
    }
}

/// A streaming response body: pulls engine events when hyper asks for data and turns them into
/// SSE events. Owning the [`Generation`] means a disconnect (hyper drops the body) aborts the
/// engine requests at once; nothing else keeps the streams alive.
pub struct SseBody {
    generation: Generation,
    pending: VecDeque<Bytes>,
    finished: bool,
}

/// Coalesce ready events into frames of at most this many bytes (fewer writes under load).
const MAX_FRAME: usize = 16 * 1024;

impl SseBody {
    /// Start a stream: the chat role chunks are ready to send immediately.
    pub fn new(generation: Generation) -> Self {
        let pending = generation.opening_chunks().into();
        Self {
            generation,
            pending,
            finished: false,
        }
    }

    fn fail(&mut self, err: ApiError) {
        tracing::warn!(id = %self.generation.meta.id, error = %err.message, "stream failed");
        self.generation.abort_all();
        self.pending.push_back(error_event(&err));
        self.pending.push_back(Bytes::from_static(DONE));
        self.finished = true;
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let mut out = BytesMut::new();
        loop {
            while let Some(b) = this.pending.pop_front() {
                out.extend_from_slice(&b);
            }
            if this.finished || out.len() >= MAX_FRAME {
                break;
            }
            match this.generation.poll_event(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    let closing = this.generation.closing_chunks();
                    this.pending.extend(closing);
                    this.finished = true;
                }
                Poll::Ready(Some((slot, event))) => match this.generation.apply(slot, event) {
                    Step::Delta { choice, delta } => {
                        if let Some(chunk) = this.generation.delta_chunk(choice, &delta) {
                            this.pending.push_back(chunk);
                        }
                    }
                    Step::Continue => {}
                    Step::Failed(e) => this.fail(e),
                },
            }
        }
        if !out.is_empty() {
            Poll::Ready(Some(Ok(Frame::data(out.freeze()))))
        } else if this.finished {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.pending.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
