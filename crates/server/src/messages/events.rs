//! A streamed Messages answer: the chat stream of the same generation re-told as Anthropic's
//! events — `message_start`, per content block `content_block_start`, its deltas
//! (`thinking_delta`, `text_delta`, `input_json_delta`) and `content_block_stop`, then
//! `message_delta` (stop reason, output tokens) and `message_stop`; an error mid-stream is an
//! `error` event.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use serde_json::{json, Value};

use super::convert;
use crate::chat_events::{named_event, ChatEvent, ChatEvents};
use crate::stream::SseBody;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    None,
    Thinking,
    Text,
    ToolUse,
}

pub struct MessageEvents {
    chat: ChatEvents,
    out: VecDeque<Bytes>,
    id: String,
    model: String,
    started: bool,
    /// The open block and its index.
    block: Block,
    index: usize,
    finish: (Value, Value),
    usage: Value,
    done: bool,
}

impl MessageEvents {
    pub fn new(chat: SseBody, id: String, model: String) -> Self {
        Self {
            chat: ChatEvents::new(chat),
            out: VecDeque::new(),
            id,
            model,
            started: false,
            block: Block::None,
            index: 0,
            finish: (Value::Null, Value::Null),
            usage: Value::Null,
            done: false,
        }
    }

    fn emit(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        self.out.push_back(named_event(kind, &data));
    }

    fn start(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let input = self.usage["prompt_tokens"].as_u64().unwrap_or(0);
        let message = json!({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 0}});
        self.emit("message_start", json!({"message": message}));
    }

    fn close(&mut self) {
        if self.block != Block::None {
            self.emit("content_block_stop", json!({"index": self.index}));
            self.block = Block::None;
            self.index += 1;
        }
    }

    /// Open a block of `kind` unless one is open.
    fn open(&mut self, kind: Block, content_block: Value) {
        if self.block == kind && kind != Block::ToolUse {
            return;
        }
        self.close();
        self.block = kind;
        self.emit(
            "content_block_start",
            json!({"index": self.index, "content_block": content_block}),
        );
    }

    fn delta(&mut self, delta: Value) {
        self.emit(
            "content_block_delta",
            json!({"index": self.index, "delta": delta}),
        );
    }

    fn chat_chunk(&mut self, chunk: &Value) {
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = u.clone();
        }
        if let Some(err) = chunk.get("error") {
            self.start();
            let error = json!({"type": "api_error", "message": err["message"]});
            self.emit("error", json!({"error": error}));
            self.done = true;
            return;
        }
        self.start();
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            let d = &choice["delta"];
            if let Some(r) = d["reasoning_content"].as_str().filter(|r| !r.is_empty()) {
                self.open(
                    Block::Thinking,
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                );
                self.delta(json!({"type": "thinking_delta", "thinking": r}));
            }
            if let Some(t) = d["content"].as_str().filter(|t| !t.is_empty()) {
                self.open(Block::Text, json!({"type": "text", "text": ""}));
                self.delta(json!({"type": "text_delta", "text": t}));
            }
            for f in d["tool_calls"].as_array().into_iter().flatten() {
                if let Some(name) = f.pointer("/function/name").and_then(Value::as_str) {
                    let block =
                        json!({"type": "tool_use", "id": f["id"], "name": name, "input": {}});
                    self.open(Block::ToolUse, block);
                }
                if let Some(a) = f
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .filter(|a| !a.is_empty())
                {
                    self.delta(json!({"type": "input_json_delta", "partial_json": a}));
                }
            }
            if !choice["finish_reason"].is_null() {
                self.finish = (
                    choice["finish_reason"].clone(),
                    choice["stop_reason"].clone(),
                );
            }
        }
    }

    fn end(&mut self) {
        self.start();
        self.close();
        let (reason, sequence) = convert::stop_reason(&self.finish.0, &self.finish.1);
        let output = self.usage["completion_tokens"].as_u64().unwrap_or(0);
        self.emit(
            "message_delta",
            json!({"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": {"output_tokens": output}}),
        );
        self.emit("message_stop", json!({}));
        self.done = true;
    }
}

impl Body for MessageEvents {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.chat.poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ChatEvent::Done) => this.end(),
                Poll::Ready(ChatEvent::Json(chunk)) => this.chat_chunk(&chunk),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
