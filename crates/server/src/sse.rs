//! Server-sent events framing as OpenAI streams it: each event is `data: <json>\n\n`, the
//! stream ends with `data: [DONE]\n\n`, and an error after the stream started is a final
//! `data: {"error": …}` event before `[DONE]` (the status line was already sent).

use bytes::Bytes;
use serde::Serialize;

use crate::error::ApiError;

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
