//! The request contract over HTTP on the default model: log-likelihood scoring (`echo` with
//! `logprobs` and `max_tokens: 0`, `prompt_logprobs`), `X-Request-Id` and `request_id`,
//! `cache_salt` isolation, the legacy `guided_*` fields, token ids in responses, prompt
//! truncation, and request defaults from a generation config.

mod reliability;

use reliability::*;
use serde_json::{json, Value};
use spindle_server::validation::RequestDefaults;

const PROMPT: &str = "The capital of France is Paris, and the capital of Italy is";

fn completion(r: &Reply) -> Value {
    assert_eq!(r.status, hyper::StatusCode::OK, "{}", r.text());
    r.json()
}

async fn prompt_len(addr: std::net::SocketAddr, text: &str) -> usize {
    let r = post(addr, "/tokenize", &json!({"prompt": text})).await;
    r.json()["count"].as_u64().unwrap() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_and_prompt_logprobs_score_the_prompt() {
    let server = TestServer::start_default().await;
    let a = server.addr;
    let n = prompt_len(a, PROMPT).await;

    // lm-eval's scoring request: the prompt alone, with its logprobs, no completion tokens.
    let v = completion(
        &post(a, "/v1/completions", &json!({"prompt": PROMPT, "echo": true, "max_tokens": 0, "logprobs": 1, "temperature": 0})).await,
    );
    let c = &v["choices"][0];
    assert_eq!(c["text"], PROMPT);
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 0);
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    for i in 1..n {
        let x = lp["token_logprobs"][i]
            .as_f64()
            .expect("a logprob after the first token");
        assert!(x <= 0.0);
        assert!(lp["top_logprobs"][i].as_object().unwrap().len() <= 2);
    }
    assert!(c.get("prompt_logprobs").is_none(), "only when asked for");

    // With one generated token (lm-eval's older shape): prompt tokens, then the new one.
    let v = completion(
        &post(a, "/v1/completions", &json!({"prompt": PROMPT, "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0})).await,
    );
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n + 1);
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with(PROMPT) && text.len() > PROMPT.len(),
        "{text}"
    );

    // prompt_logprobs: vLLM's shape, the prompt token always present with its rank.
    let v = completion(
        &post(
            a,
            "/v1/completions",
            &json!({"prompt": PROMPT, "prompt_logprobs": 2, "max_tokens": 1}),
        )
        .await,
    );
    let pl = v["choices"][0]["prompt_logprobs"]
        .as_array()
        .expect("prompt_logprobs")
        .clone();
    assert_eq!(pl.len(), n);
    assert!(pl[0].is_null());
    let ids = post(a, "/tokenize", &json!({"prompt": PROMPT}))
        .await
        .json()["tokens"]
        .clone();
    for (i, entry) in pl.iter().enumerate().skip(1) {
        let e = entry.as_object().unwrap();
        let own = &e[&ids[i].to_string()];
        assert!(own["rank"].as_u64().unwrap() >= 1 && own["logprob"].as_f64().unwrap() <= 0.0);
        assert!(own["decoded_token"].is_string());
        assert!(e.len() <= 3);
    }
    // The same numbers as echo's.
    let echo = completion(
        &post(
            a,
            "/v1/completions",
            &json!({"prompt": PROMPT, "echo": true, "max_tokens": 0, "logprobs": 0}),
        )
        .await,
    );
    for i in 1..n {
        let x = echo["choices"][0]["logprobs"]["token_logprobs"][i]
            .as_f64()
            .unwrap();
        let y = pl[i][&ids[i].to_string()]["logprob"].as_f64().unwrap();
        assert!((x - y).abs() < 1e-6, "{i}: {x} vs {y}");
    }

    // Chat: prompt_logprobs on the response; echo repeats the assistant's last message.
    let v = completion(
        &post(a, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}],
            "continue_final_message": true, "echo": true, "prompt_logprobs": 0, "max_tokens": 3, "temperature": 0})).await,
    );
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("1, 2,"));
    assert_eq!(
        v["prompt_logprobs"].as_array().unwrap().len(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize
    );

    // Streaming echo: the first chunk of the choice carries the prompt and prompt_logprobs.
    let r = post(a, "/v1/completions", &json!({"prompt": PROMPT, "echo": true, "prompt_logprobs": 1, "max_tokens": 3, "stream": true})).await;
    let body = r.text();
    let chunks: Vec<Value> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["text"], PROMPT);
    assert_eq!(
        chunks[0]["choices"][0]["prompt_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        n
    );
    let all: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert!(all.starts_with(PROMPT));

    // Echoed logprobs streamed read as the non-streamed answer: same tokens, logprobs, offsets.
    let body =
        json!({"prompt": PROMPT, "echo": true, "logprobs": 1, "max_tokens": 3, "temperature": 0});
    let whole =
        completion(&post(a, "/v1/completions", &body).await)["choices"][0]["logprobs"].clone();
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let text = post(a, "/v1/completions", &streamed_body).await.text();
    let (mut tokens, mut offsets, mut lps) = (Vec::new(), Vec::new(), Vec::new());
    for data in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let lp = &chunk["choices"][0]["logprobs"];
        for (key, out) in [
            ("tokens", &mut tokens),
            ("text_offset", &mut offsets),
            ("token_logprobs", &mut lps),
        ] {
            out.extend(lp[key].as_array().cloned().unwrap_or_default());
        }
    }
    assert_eq!(Value::from(tokens), whole["tokens"]);
    assert_eq!(Value::from(offsets), whole["text_offset"]);
    assert_eq!(Value::from(lps), whole["token_logprobs"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_salts_guided_fields_token_ids_and_truncation() {
    let server = TestServer::start_default().await;
    let a = server.addr;

    // X-Request-Id: echoed, and the base of the response id (the header wins over the body).
    let r = call(
        a,
        "POST",
        "/v1/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "trace-42"),
        ],
        json!({"prompt": "Hi", "max_tokens": 1, "request_id": "body-id"})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(r.headers.get("x-request-id").unwrap(), "trace-42");
    assert_eq!(completion(&r)["id"], "cmpl-trace-42");
    let v = completion(&post(a, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "request_id": "body-id"})).await);
    assert_eq!(v["id"], "chatcmpl-body-id");
    let r = call(
        a,
        "GET",
        "/v1/models",
        &[("x-request-id", "m-1")],
        Vec::new(),
    )
    .await;
    assert_eq!(r.headers.get("x-request-id").unwrap(), "m-1");

    // cache_salt: prefix hits only within a salt.
    let long = "Once upon a time there was a lighthouse keeper who counted ships. ".repeat(6);
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let ask = |salt: Option<&str>| {
        let mut body = json!({"prompt": long, "max_tokens": 1});
        if let Some(s) = salt {
            body["cache_salt"] = json!(s);
        }
        body
    };
    assert_eq!(
        cached(&completion(
            &post(a, "/v1/completions", &ask(Some("tenant-a"))).await
        )),
        0
    );
    assert!(
        cached(&completion(
            &post(a, "/v1/completions", &ask(Some("tenant-a"))).await
        )) > 0
    );
    assert_eq!(
        cached(&completion(
            &post(a, "/v1/completions", &ask(Some("tenant-b"))).await
        )),
        0
    );
    assert_eq!(
        cached(&completion(&post(a, "/v1/completions", &ask(None)).await)),
        0
    );
    assert!(cached(&completion(&post(a, "/v1/completions", &ask(None)).await)) > 0);

    // Legacy guided fields constrain the output (never dropped).
    let v = completion(&post(a, "/v1/completions", &json!({"prompt": "Is the sky blue? Answer:", "guided_choice": ["yes", "no"], "max_tokens": 5})).await);
    let t = v["choices"][0]["text"].as_str().unwrap();
    assert!(t == "yes" || t == "no", "{t}");
    let v = completion(&post(a, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Give a number."}], "guided_regex": "[0-9]{3}", "max_tokens": 8})).await);
    let t = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(t.len() == 3 && t.chars().all(|c| c.is_ascii_digit()), "{t}");

    // return_token_ids and return_tokens_as_token_ids.
    let v = completion(
        &post(
            a,
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 4, "min_tokens": 4, "return_token_ids": true,
        "logprobs": 1, "return_tokens_as_token_ids": true}),
        )
        .await,
    );
    let c = &v["choices"][0];
    assert_eq!(c["token_ids"].as_array().unwrap().len(), 4);
    assert_eq!(
        c["prompt_token_ids"].as_array().unwrap().len(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize
    );
    for t in c["logprobs"]["tokens"].as_array().unwrap() {
        assert!(t.as_str().unwrap().starts_with("token_id:"), "{t}");
    }
    for (t, id) in c["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip(c["token_ids"].as_array().unwrap())
    {
        assert_eq!(t.as_str().unwrap(), format!("token_id:{id}"));
    }

    // truncate_prompt_tokens keeps the last k tokens.
    let v = completion(
        &post(
            a,
            "/v1/completions",
            &json!({"prompt": long, "truncate_prompt_tokens": 7, "max_tokens": 1}),
        )
        .await,
    );
    assert_eq!(v["usage"]["prompt_tokens"], 7);

    // bad_words: the word's tokens never follow each other.
    let free = completion(
        &post(
            a,
            "/v1/completions",
            &json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}),
        )
        .await,
    );
    let word = free["choices"][0]["text"]
        .as_str()
        .unwrap()
        .trim()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let v = completion(&post(a, "/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "bad_words": [word.clone()]})).await);
    assert!(
        !v["choices"][0]["text"].as_str().unwrap().contains(&word),
        "{v}"
    );
    server.shutdown().await;
}

/// `--generation-config` defaults apply to what a request leaves unset; its own values win.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generation_config_defaults_apply_unless_the_request_sets_them() {
    let (engine, metrics) = start_engine(|_| {});
    let defaults =
        RequestDefaults::from_json(&json!({"temperature": 0.0, "max_new_tokens": 3})).unwrap();
    let server = TestServer::start(engine, metrics, |c| c.defaults = defaults).await;
    let a = server.addr;
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "ignore_eos": true});
    let v = completion(&post(a, "/v1/chat/completions", &body).await);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Greedy by default: the same answer twice.
    let again = completion(&post(a, "/v1/chat/completions", &body).await);
    assert_eq!(v["choices"][0]["message"], again["choices"][0]["message"]);
    let mut longer = body.clone();
    longer["max_tokens"] = json!(6);
    let v = completion(&post(a, "/v1/chat/completions", &longer).await);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    server.shutdown().await;
}
