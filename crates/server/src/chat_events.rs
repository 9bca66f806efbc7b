//! A chat completion's SSE stream read back as events (`data: ...` payloads), for the APIs that
//! answer from the chat pipeline in their own stream shapes (Responses, Anthropic Messages).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use hyper::body::Body;

use crate::stream::SseBody;

/// The chat stream's events, one at a time.
pub struct ChatEvents {
    chat: SseBody,
    /// SSE bytes not yet cut into events.
    buffer: BytesMut,
    ended: bool,
}

/// One chat stream event.
pub enum ChatEvent {
    /// A JSON chunk (or error object).
    Json(serde_json::Value),
    /// `data: [DONE]`, or the stream ended.
    Done,
}

impl ChatEvents {
    pub fn new(chat: SseBody) -> Self {
        Self {
            chat,
            buffer: BytesMut::new(),
            ended: false,
        }
    }

    /// The next event; `Done` once at the end (and again if polled after).
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<ChatEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event = self.buffer.split_to(end + 2);
                let text = String::from_utf8_lossy(&event[..end]);
                let Some(data) = text.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    return Poll::Ready(ChatEvent::Done);
                }
                match serde_json::from_str(data) {
                    Ok(v) => return Poll::Ready(ChatEvent::Json(v)),
                    Err(_) => continue,
                }
            }
            if self.ended {
                return Poll::Ready(ChatEvent::Done);
            }
            match Pin::new(&mut self.chat).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Poll::Ready(Some(Err(never))) => match never {},
            }
        }
    }
}

/// One server-sent event with an `event:` line, as the Responses and Messages APIs frame them.
pub fn named_event(kind: &str, data: &serde_json::Value) -> bytes::Bytes {
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(b"event: ");
    b.extend_from_slice(kind.as_bytes());
    b.extend_from_slice(b"\ndata: ");
    b.extend_from_slice(data.to_string().as_bytes());
    b.extend_from_slice(b"\n\n");
    bytes::Bytes::from(b)
}
