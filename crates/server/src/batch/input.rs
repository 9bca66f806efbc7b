//! Checking a batch input file before any line runs. What makes the whole file unusable fails
//! the batch in `validating` (OpenAI's behaviour): a line that is not a JSON object, a missing
//! or duplicate `custom_id`, a `url` other than the batch's endpoint, a method other than POST,
//! a body that is not an object, or a `model` this server does not serve. What is wrong inside
//! a body (a bad parameter, a prompt too long) is found when the line runs, exactly as for a
//! live request, and becomes an entry of the error file.

use std::collections::HashSet;

use serde_json::Value;

use super::store::{BatchError, NewLine};

/// Most lines in one batch (OpenAI's limit).
pub const MAX_BATCH_LINES: usize = 50_000;

/// At most this many errors are reported for a failed batch.
const MAX_REPORTED_ERRORS: usize = 100;

/// The endpoints a batch can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEndpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl BatchEndpoint {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/completions" => Self::Completions,
            "/v1/embeddings" => Self::Embeddings,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }
}

fn error(line: usize, code: &str, param: Option<&str>, message: String) -> BatchError {
    BatchError {
        code: code.to_string(),
        message,
        param: param.map(str::to_string),
        line: Some(line as u64),
    }
}

/// The lines of a valid input file, or why it is not one.
pub fn parse_input(
    content: &[u8],
    endpoint: BatchEndpoint,
    served_model_names: &[String],
) -> Result<Vec<NewLine>, Vec<BatchError>> {
    let text = std::str::from_utf8(content).map_err(|e| {
        vec![BatchError {
            code: "invalid_file".into(),
            message: format!("The input file is not UTF-8 text: {e}."),
            param: Some("input_file_id".into()),
            line: None,
        }]
    })?;
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if lines.len() + errors.len() >= MAX_BATCH_LINES {
            return Err(vec![BatchError {
                code: "too_many_requests".into(),
                message: format!("A batch holds at most {MAX_BATCH_LINES} requests."),
                param: Some("input_file_id".into()),
                line: Some(number as u64),
            }]);
        }
        match check_line(raw, number, endpoint, served_model_names, &mut seen) {
            Ok(line) => lines.push(line),
            Err(e) => {
                if errors.len() < MAX_REPORTED_ERRORS {
                    errors.push(e);
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if lines.is_empty() {
        return Err(vec![BatchError {
            code: "empty_file".into(),
            message: "The input file has no requests.".into(),
            param: Some("input_file_id".into()),
            line: None,
        }]);
    }
    Ok(lines)
}

fn check_line(
    raw: &str,
    number: usize,
    endpoint: BatchEndpoint,
    served_model_names: &[String],
    seen: &mut HashSet<String>,
) -> Result<NewLine, BatchError> {
    let value: Value = serde_json::from_str(raw).map_err(|e| {
        error(
            number,
            "invalid_json_line",
            None,
            format!("Line {number} is not valid JSON: {e}."),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(error(
            number,
            "invalid_json_line",
            None,
            format!("Line {number} is not a JSON object."),
        ));
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(error(
                number,
                "missing_required_parameter",
                Some("custom_id"),
                format!("Line {number} has no `custom_id` string."),
            ))
        }
    };
    match obj.get("method") {
        None => {}
        Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
        Some(other) => {
            return Err(error(
                number,
                "invalid_method",
                Some("method"),
                format!("Line {number}: `method` must be POST, got {other}."),
            ))
        }
    }
    match obj.get("url") {
        Some(Value::String(u)) if u == endpoint.as_str() => {}
        Some(Value::String(u)) => {
            return Err(error(
                number,
                "mismatched_endpoint",
                Some("url"),
                format!(
                    "Line {number}: `url` is {u} but the batch's endpoint is {}.",
                    endpoint.as_str()
                ),
            ))
        }
        _ => {
            return Err(error(
                number,
                "missing_required_parameter",
                Some("url"),
                format!("Line {number} has no `url` string."),
            ))
        }
    }
    let body = match obj.get("body") {
        Some(Value::Object(b)) => b,
        _ => {
            return Err(error(
                number,
                "missing_required_parameter",
                Some("body"),
                format!("Line {number} has no `body` object."),
            ))
        }
    };
    match body.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if served_model_names.iter().any(|n| n == m) => {}
        Some(m) => {
            return Err(error(
                number,
                "model_not_found",
                Some("body.model"),
                format!(
                    "Line {number}: model {m} is not served here (served: {}).",
                    served_model_names.join(", ")
                ),
            ))
        }
    }
    if !seen.insert(custom_id.clone()) {
        return Err(error(
            number,
            "duplicate_custom_id",
            Some("custom_id"),
            format!("Line {number}: `custom_id` {custom_id:?} is used more than once."),
        ));
    }
    Ok(NewLine {
        custom_id,
        body: Value::Object(body.clone()).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["m".to_string()]
    }

    fn line(custom_id: &str, body: &str) -> String {
        format!(
            r#"{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/completions", "body": {body}}}"#
        )
    }

    fn codes(r: Result<Vec<NewLine>, Vec<BatchError>>) -> Vec<(String, Option<u64>)> {
        r.unwrap_err()
            .into_iter()
            .map(|e| (e.code, e.line))
            .collect()
    }

    #[test]
    fn a_valid_file_gives_its_lines_in_order() {
        let text = format!(
            "{}\n\n{}\n",
            line("a", r#"{"prompt": "x", "model": "m"}"#),
            line("b", r#"{"prompt": "y", "max_tokens": -5}"#)
        );
        let lines = parse_input(text.as_bytes(), BatchEndpoint::Completions, &names()).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].custom_id, "a");
        // A bad parameter inside a body is the line's problem, found when it runs.
        assert!(lines[1].body.contains("-5"));
    }

    #[test]
    fn file_level_problems_fail_the_batch_with_line_numbers() {
        let text = [
            "not json".to_string(),
            "[1, 2]".to_string(),
            line("a", r#"{"prompt": "x"}"#),
            line("a", r#"{"prompt": "y"}"#),
            line("b", r#"{"prompt": "y", "model": "other"}"#),
            r#"{"custom_id": "c", "url": "/v1/chat/completions", "body": {}}"#.to_string(),
            r#"{"custom_id": "d", "url": "/v1/completions", "method": "GET", "body": {}}"#
                .to_string(),
            r#"{"url": "/v1/completions", "body": {}}"#.to_string(),
            r#"{"custom_id": "e", "url": "/v1/completions", "body": "text"}"#.to_string(),
        ]
        .join("\n");
        let got = codes(parse_input(
            text.as_bytes(),
            BatchEndpoint::Completions,
            &names(),
        ));
        let want: Vec<(String, Option<u64>)> = [
            ("invalid_json_line", 1),
            ("invalid_json_line", 2),
            ("duplicate_custom_id", 4),
            ("model_not_found", 5),
            ("mismatched_endpoint", 6),
            ("invalid_method", 7),
            ("missing_required_parameter", 8),
            ("missing_required_parameter", 9),
        ]
        .iter()
        .map(|(c, l)| (c.to_string(), Some(*l)))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn empty_and_non_utf8_files_fail() {
        assert_eq!(
            codes(parse_input(b"\n\n", BatchEndpoint::Completions, &names())),
            vec![("empty_file".to_string(), None)]
        );
        assert_eq!(
            codes(parse_input(
                &[0xff, 0xfe],
                BatchEndpoint::Completions,
                &names()
            )),
            vec![("invalid_file".to_string(), None)]
        );
    }
}
