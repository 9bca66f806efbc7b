//! A streamed response: the chat stream of the same generation, re-told as the Responses API's
//! event sequence — `response.created`, `response.in_progress`, then per output item
//! `response.output_item.added`, its deltas (`response.reasoning_text.delta`,
//! `response.content_part.added` + `response.output_text.delta`,
//! `response.function_call_arguments.delta`) and their `.done` events, `response.output_item.done`,
//! and last `response.completed` (or `response.incomplete` / `response.failed`) carrying the
//! whole response, which is stored first when `store` is on. Every event has a
//! `sequence_number`; each is framed `event: TYPE` + `data: JSON`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use serde_json::{json, Value};

use super::convert::{self, Echo, Status};
use super::store::Storage;
use crate::chat_events::{named_event, ChatEvent, ChatEvents};
use crate::error::ApiError;
use crate::stream::SseBody;

/// The item being streamed.
enum Open {
    None,
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Storing the complete response (before the last event goes out).
type Saving = Pin<Box<dyn Future<Output = Result<(), ApiError>> + Send>>;

pub struct ResponseEvents {
    chat: ChatEvents,
    out: VecDeque<Bytes>,
    seq: u64,
    id: String,
    created_at: u64,
    echo: Echo,
    output: Vec<Value>,
    open: Open,
    status: Status,
    usage: Option<Value>,
    storage: Option<Storage>,
    saving: Option<Saving>,
    /// The chat stream ended: store, then send the last event.
    finishing: bool,
    done: bool,
}

impl ResponseEvents {
    pub fn new(
        chat: SseBody,
        id: String,
        created_at: u64,
        echo: Echo,
        storage: Option<Storage>,
    ) -> Self {
        let mut me = Self {
            chat: ChatEvents::new(chat),
            out: VecDeque::new(),
            seq: 0,
            id,
            created_at,
            echo,
            output: Vec::new(),
            open: Open::None,
            status: Status::InProgress,
            usage: None,
            storage,
            saving: None,
            finishing: false,
            done: false,
        };
        let response = me.response();
        me.emit("response.created", json!({"response": response}));
        me.emit("response.in_progress", json!({"response": response}));
        me
    }

    fn response(&self) -> Value {
        convert::response_object(
            &self.id,
            self.created_at,
            &self.echo,
            self.status,
            &self.output,
            self.usage.as_ref(),
        )
    }

    fn emit(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.out.push_back(named_event(kind, &data));
    }

    /// Finish the item being streamed.
    fn close(&mut self) {
        let index = self.output.len();
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => (),
            Open::Reasoning { id, text } => {
                self.emit(
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                );
                let item = convert::reasoning_item(&id, &text);
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
            Open::Message { id, text } => {
                self.emit("response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                self.emit("response.content_part.done", json!({"item_id": id, "output_index": index, "content_index": 0, "part": convert::output_text(&text)}));
                let item = convert::message_item(&id, &text, self.status.item_status());
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
            Open::Call {
                id,
                call_id,
                name,
                arguments,
            } => {
                self.emit("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments}));
                let item =
                    convert::function_call_item(&id, &call_id, &name, &arguments, "completed");
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
        }
    }

    fn reasoning_delta(&mut self, delta: &str) {
        let index = self.output.len();
        if !matches!(self.open, Open::Reasoning { .. }) {
            self.close();
            let id = convert::item_id("rs");
            let item = json!({"type": "reasoning", "id": id, "summary": [], "content": []});
            self.emit(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            self.open = Open::Reasoning {
                id,
                text: String::new(),
            };
        }
        if let Open::Reasoning { id, text } = &mut self.open {
            text.push_str(delta);
            let id = id.clone();
            self.emit(
                "response.reasoning_text.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta}),
            );
        }
    }

    fn text_delta(&mut self, delta: &str) {
        let index = self.output.len();
        if !matches!(self.open, Open::Message { .. }) {
            self.close();
            let index = self.output.len();
            let id = convert::item_id("msg");
            let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
            self.emit(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            self.emit("response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": convert::output_text("")}));
            self.open = Open::Message {
                id,
                text: String::new(),
            };
        }
        if let Open::Message { id, text } = &mut self.open {
            text.push_str(delta);
            let id = id.clone();
            self.emit("response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}));
        }
    }

    /// A chat tool-call fragment: the first names the call, the next carry its arguments.
    fn call_fragment(&mut self, fragment: &Value) {
        if let Some(name) = fragment.pointer("/function/name").and_then(Value::as_str) {
            self.close();
            let index = self.output.len();
            let id = convert::item_id("fc");
            let call_id = fragment["id"].as_str().unwrap_or_default().to_string();
            let item = convert::function_call_item(&id, &call_id, name, "", "in_progress");
            self.emit(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            self.open = Open::Call {
                id,
                call_id,
                name: name.to_string(),
                arguments: String::new(),
            };
        }
        let delta = fragment
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("");
        let index = self.output.len();
        if let (Open::Call { id, arguments, .. }, false) = (&mut self.open, delta.is_empty()) {
            arguments.push_str(delta);
            let id = id.clone();
            self.emit(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": index, "delta": delta}),
            );
        }
    }

    /// One chat chunk.
    fn chat_chunk(&mut self, chunk: &Value) {
        if let Some(err) = chunk.get("error") {
            self.close();
            let response = convert::failed(self.response(), err["message"].clone());
            self.emit("response.failed", json!({"response": response}));
            self.done = true;
            return;
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            let delta = &choice["delta"];
            if let Some(r) = delta["reasoning_content"]
                .as_str()
                .filter(|r| !r.is_empty())
            {
                self.reasoning_delta(r);
            }
            if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                self.text_delta(t);
            }
            for f in delta["tool_calls"].as_array().into_iter().flatten() {
                self.call_fragment(f);
            }
            if choice["finish_reason"] == "length" {
                self.status = Status::Incomplete;
            }
        }
    }

    fn finish(&mut self) {
        if self.finishing || self.done {
            return;
        }
        self.finishing = true;
        if self.status == Status::InProgress {
            self.status = Status::Completed;
        }
        self.close();
        if let Some(s) = self.storage.take() {
            let response = self.response();
            self.saving = Some(Box::pin(s.save(self.id.clone(), self.created_at, response)));
        }
    }

    fn completed_event(&mut self) {
        let kind = match self.status {
            Status::Incomplete => "response.incomplete",
            _ => "response.completed",
        };
        let response = self.response();
        self.emit(kind, json!({"response": response}));
        self.finishing = false;
        self.done = true;
    }
}

impl Body for ResponseEvents {
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
            if this.finishing {
                // The response is stored before the client hears it is complete.
                if let Some(saving) = this.saving.as_mut() {
                    let Poll::Ready(saved) = saving.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    if let Err(e) = saved {
                        tracing::warn!(id = %this.id, error = %e.message, "storing a response failed");
                    }
                    this.saving = None;
                }
                this.completed_event();
                continue;
            }
            match this.chat.poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ChatEvent::Done) => this.finish(),
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
