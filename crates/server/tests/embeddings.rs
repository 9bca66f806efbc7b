//! The embedding endpoints end to end on all-MiniLM-L6-v2 (scripts/fetch-minilm.sh):
//! `/v1/embeddings` (float and base64, text and token inputs, order, usage, many small requests
//! packed together), `/v1/rerank` and `/v1/score` with their aliases, the 400 matrix, and the
//! generation endpoints refusing an embedding model. Vectors are checked against
//! sentence-transformers' (tests/golden/all-minilm-l6-v2.json).

mod reliability;

use std::path::PathBuf;

use base64::Engine as _;
use hyper::StatusCode;
use reliability::*;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn minilm() -> String {
    let dir = root().join("models/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/fetch-minilm.sh",
        dir.display()
    );
    dir.display().to_string()
}

/// (text, token ids, embedding) from the sentence-transformers reference.
fn reference() -> Vec<(String, Vec<u32>, Vec<f32>)> {
    let text = std::fs::read_to_string(root().join("tests/golden/all-minilm-l6-v2.json"))
        .expect("reference");
    let v: Value = serde_json::from_str(&text).expect("json");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|i| i["truncated"] == json!(false))
        .map(|i| {
            (
                i["text"].as_str().unwrap_or_default().to_string(),
                serde_json::from_value(i["token_ids"].clone()).expect("ids"),
                serde_json::from_value(i["embedding"].clone()).expect("vector"),
            )
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn vectors(reply: &Reply) -> Vec<Vec<f32>> {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().expect("data");
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], json!(i));
            match &d["embedding"] {
                Value::String(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("base64")
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                other => serde_json::from_value(other.clone()).expect("floats"),
            }
        })
        .collect()
}

async fn embedding_server() -> TestServer {
    let (engine, metrics) = start_engine(|cfg| {
        cfg.model.model = minilm();
        cfg.model.max_model_len = None;
        // Small steps, so that concurrent requests really share and span steps.
        cfg.max_num_batched_tokens = 64;
    });
    TestServer::start(engine, metrics, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeddings_match_sentence_transformers() {
    let server = embedding_server().await;
    let addr = server.addr;
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();

    // Floats, in input order, usage = the tokens of every input.
    let reply = post(
        addr,
        "/v1/embeddings",
        &json!({"model": MODEL_NAME, "input": texts}),
    )
    .await;
    let got = vectors(&reply);
    assert_eq!(got.len(), refs.len());
    for (g, (text, _, want)) in got.iter().zip(&refs) {
        assert_eq!(g.len(), 384);
        // The default encoder arithmetic multiplies in bf16: within issue 25's bar of 0.9999.
        assert!(cosine(g, want) >= 0.9999, "{text:?}: {}", cosine(g, want));
    }
    let tokens: usize = refs.iter().map(|r| r.1.len()).sum();
    let v = reply.json();
    assert_eq!(v["usage"]["prompt_tokens"], json!(tokens));
    assert_eq!(v["usage"]["total_tokens"], json!(tokens));
    assert_eq!(v["model"], MODEL_NAME);

    // base64 (the openai SDK's default) carries the same float32 values.
    let b64 = vectors(
        &post(
            addr,
            "/v1/embeddings",
            &json!({"input": texts, "encoding_format": "base64"}),
        )
        .await,
    );
    assert_eq!(b64, got);

    // Token-id inputs, one list and a list of lists, give the text's vectors.
    let one = vectors(&post(addr, "/v1/embeddings", &json!({"input": refs[1].1})).await);
    assert!(cosine(&one[0], &got[1]) >= 0.999999);
    let ids: Vec<&Vec<u32>> = refs.iter().map(|r| &r.1).take(3).collect();
    let many = vectors(&post(addr, "/v1/embeddings", &json!({"input": ids})).await);
    for i in 0..3 {
        assert!(cosine(&many[i], &got[i]) >= 0.999999);
    }

    // Many concurrent small requests share steps (budget 64 tokens): each equals its reference.
    let mut tasks = Vec::new();
    for k in 0..24 {
        let (text, _, want) = refs[k % refs.len()].clone();
        tasks.push(tokio::spawn(async move {
            let reply = post(
                addr,
                "/v1/embeddings",
                &json!({"input": [text.clone(), "filler text"]}),
            )
            .await;
            let v = vectors(&reply);
            assert!(cosine(&v[0], &want) >= 0.9999, "{text:?}");
        }));
    }
    for t in tasks {
        t.await.expect("concurrent request");
    }

    // Truncation on request; without it an input over the limit is a 400 with the numbers.
    let long = "word ".repeat(300);
    let r = post(addr, "/v1/embeddings", &json!({"input": long})).await;
    let e = assert_openai_error(r.status, &r.body);
    assert_eq!(e["param"], "input");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(msg.contains("256") && msg.contains("302"), "{msg}");
    let r = post(
        addr,
        "/v1/embeddings",
        &json!({"input": long, "truncate_prompt_tokens": -1}),
    )
    .await;
    assert_eq!(r.json()["usage"]["prompt_tokens"], json!(256));
    let r = post(
        addr,
        "/v1/embeddings",
        &json!({"input": long, "truncate_prompt_tokens": 10}),
    )
    .await;
    assert_eq!(r.json()["usage"]["prompt_tokens"], json!(10));

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_and_score_rank_by_cosine_similarity() {
    let server = embedding_server().await;
    let addr = server.addr;
    let docs = [
        "The Eiffel tower is in Paris.",
        "Paris is the capital and most populous city of France.",
        "Bananas are rich in potassium.",
    ];
    for path in ["/v1/rerank", "/rerank", "/v2/rerank"] {
        let r = post(
            addr,
            path,
            &json!({"query": "What is the capital of France?", "documents": docs, "top_n": 2}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        let v = r.json();
        let results = v["results"].as_array().expect("results");
        assert_eq!(results.len(), 2, "{path}");
        assert_eq!(results[0]["index"], 1, "{path}: {v}");
        assert_eq!(results[0]["document"]["text"], docs[1]);
        let (s0, s1) = (
            results[0]["relevance_score"].as_f64().unwrap_or(0.0),
            results[1]["relevance_score"].as_f64().unwrap_or(0.0),
        );
        assert!(s0 >= s1 && s0 <= 1.0 + 1e-6, "{path}: {v}");
        assert!(v["usage"]["total_tokens"].as_u64().unwrap_or(0) > 0);
    }
    let r = post(
        addr,
        "/v1/rerank",
        &json!({"query": "fruit", "documents": docs, "return_documents": false}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["results"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["results"][0]["index"], 2);
    assert!(v["results"][0].get("document").is_none());

    // Score: one against many, then pairwise; the same numbers as rerank's.
    for path in ["/v1/score", "/score"] {
        let r = post(addr, path, &json!({"text_1": "fruit", "text_2": docs})).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        let v = r.json();
        let scores: Vec<f64> = v["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|d| d["score"].as_f64().unwrap_or(f64::NAN))
            .collect();
        assert_eq!(scores.len(), 3);
        assert!(scores[2] > scores[0] && scores[2] > scores[1], "{scores:?}");
        assert_eq!(v["data"][0]["object"], "score");
    }
    let r = post(
        addr,
        "/v1/score",
        &json!({"text_1": ["a cat", "a car"], "text_2": ["a kitten", "a truck"]}),
    )
    .await;
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embedding_requests_are_400s_and_the_server_stays_healthy() {
    let server = embedding_server().await;
    let addr = server.addr;
    let too_many: Vec<&str> = vec!["x"; 2049];
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        ("/v1/embeddings", json!({}), 400, Some("input")),
        ("/v1/embeddings", json!({"input": []}), 400, Some("input")),
        ("/v1/embeddings", json!({"input": [[]]}), 400, Some("input")),
        (
            "/v1/embeddings",
            json!({"input": [[101], []]}),
            400,
            Some("input"),
        ),
        ("/v1/embeddings", json!({"input": 42}), 400, Some("input")),
        (
            "/v1/embeddings",
            json!({"input": [true]}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"input": ["a", 1]}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"input": [1, 2.5]}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"input": [30522]}),
            400,
            Some("input"),
        ),
        ("/v1/embeddings", json!({"input": [-1]}), 400, Some("input")),
        (
            "/v1/embeddings",
            json!({"input": too_many}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "encoding_format": "int8"}),
            400,
            Some("encoding_format"),
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "dimensions": 64}),
            400,
            Some("dimensions"),
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "truncate_prompt_tokens": 0}),
            400,
            Some("truncate_prompt_tokens"),
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "truncate_prompt_tokens": 100000}),
            400,
            Some("truncate_prompt_tokens"),
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "model": "other"}),
            404,
            Some("model"),
        ),
        (
            "/v1/embeddings",
            json!({"input": "x", "encoding_format": 3}),
            400,
            Some("encoding_format"),
        ),
        (
            "/v1/rerank",
            json!({"documents": ["a"]}),
            400,
            Some("query"),
        ),
        (
            "/v1/rerank",
            json!({"query": 5, "documents": ["a"]}),
            400,
            Some("query"),
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": []}),
            400,
            Some("documents"),
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": [1]}),
            400,
            Some("documents"),
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "top_n": -1}),
            400,
            Some("top_n"),
        ),
        ("/v1/score", json!({"text_1": "a"}), 400, Some("text_2")),
        (
            "/v1/score",
            json!({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}),
            400,
            Some("text_1"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            None,
        ),
        ("/v1/completions", json!({"prompt": "hi"}), 400, None),
    ];
    for (path, body, status, param) in cases {
        expect_api_error(addr, path, &body, status, param).await;
    }
    assert_eq!(get(addr, "/health").await.status, StatusCode::OK);
    let models = get(addr, "/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], MODEL_NAME);
    let tok = post(addr, "/tokenize", &json!({"prompt": "Hello world"}))
        .await
        .json();
    assert_eq!(tok["tokens"], json!([101, 7592, 2088, 102]));
    let ok = post(addr, "/v1/embeddings", &json!({"input": "still fine"})).await;
    assert_eq!(vectors(&ok).len(), 1);
    server.shutdown().await;
}
