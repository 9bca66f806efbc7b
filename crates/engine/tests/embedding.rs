//! The embedding core on all-MiniLM-L6-v2 (scripts/fetch-minilm.sh), through the engine API:
//! requests whose inputs span several steps of a small token budget answer in input order with
//! the same vectors as alone; an aborted request frees its queue; generation requests to an
//! embedding model, and embedding requests to a decoder, get a clear error.

use std::path::PathBuf;

use spindle_engine::{
    EmbedRequest, Engine, EngineConfig, EngineError, EngineEvent, EngineHandle, GenerateRequest,
    ModelKind, RequestError, SamplingParams,
};
use spindle_model::LoadOptions;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn engine(model: PathBuf, budget: usize) -> EngineHandle {
    Engine::spawn(EngineConfig {
        model: LoadOptions {
            model: model.display().to_string(),
            max_model_len: Some(1024).filter(|_| model.extension().is_some()),
            ..LoadOptions::default()
        },
        max_num_batched_tokens: budget,
        kv_cache_memory_bytes: Some(64 << 20),
        ..EngineConfig::default()
    })
    .expect("engine starts")
}

fn embed(engine: &EngineHandle, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, EngineError> {
    let request = EmbedRequest::new("t", inputs, engine.limits()).expect("valid");
    let mut stream = engine.embed(request)?;
    let mut vectors = None;
    loop {
        match stream.blocking_recv() {
            Some(EngineEvent::Embeddings(v)) => vectors = Some(v),
            Some(EngineEvent::Finished { usage, .. }) => {
                assert!(usage.prompt_tokens > 0);
                return Ok(vectors.expect("embeddings before Finished"));
            }
            Some(EngineEvent::Error(e)) => return Err(e),
            other => panic!("unexpected event {other:?}"),
        }
    }
}

fn ids(engine: &EngineHandle, text: &str) -> Vec<u32> {
    engine.tokenizer().encode(text, true).expect("encode")
}

#[test]
fn inputs_span_steps_and_keep_their_order_and_values() {
    let engine = engine(root().join("models/all-minilm-l6-v2"), 16);
    assert_eq!(engine.model_kind(), ModelKind::Embed { dimensions: 384 });
    let texts = [
        "a short one",
        "a somewhat longer sentence that needs more than sixteen tokens to be encoded at all",
        "third",
        "Paris is the capital of France.",
    ];
    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            embed(&engine, vec![ids(&engine, t)])
                .expect("embed")
                .remove(0)
        })
        .collect();
    let together = embed(&engine, texts.iter().map(|t| ids(&engine, t)).collect()).expect("embed");
    assert_eq!(together.len(), texts.len());
    for (a, b) in alone.iter().zip(&together) {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(
            dot > 0.99999,
            "same vector alone and in a multi-step request: {dot}"
        );
    }
    // Several requests in flight at once, submitted before any finishes.
    let streams: Vec<_> = (0..6)
        .map(|i| {
            let r = EmbedRequest::new("c", vec![ids(&engine, texts[i % 4])], engine.limits())
                .expect("valid");
            engine.embed(r).expect("submit")
        })
        .collect();
    for (i, mut s) in streams.into_iter().enumerate() {
        match s.blocking_recv() {
            Some(EngineEvent::Embeddings(v)) => assert_eq!(v[0], alone[i % 4]),
            other => panic!("unexpected event {other:?}"),
        }
    }

    // An aborted request leaves nothing queued behind it.
    let big =
        EmbedRequest::new("a", vec![ids(&engine, texts[1]); 50], engine.limits()).expect("valid");
    let mut s = engine.embed(big).expect("submit");
    s.abort();
    drop(s);
    let after = embed(&engine, vec![ids(&engine, texts[0])]).expect("still serving");
    assert_eq!(after[0], alone[0]);
    for _ in 0..100 {
        if engine.stats().num_waiting_total() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(engine.stats().num_waiting_total(), 0);

    // Limits are checked before the engine: empty, too long, out of the vocabulary.
    let limits = engine.limits();
    assert_eq!(
        EmbedRequest::new("x", vec![], limits).unwrap_err(),
        RequestError::NoInputs
    );
    assert_eq!(
        EmbedRequest::new("x", vec![vec![101], vec![]], limits).unwrap_err(),
        RequestError::EmptyInput { index: 1 }
    );
    assert!(matches!(
        EmbedRequest::new("x", vec![vec![101; 300]], limits).unwrap_err(),
        RequestError::InputTooLong {
            tokens: 300,
            max_model_len: 256,
            ..
        }
    ));

    // Generation is refused by an embedding model.
    let gen = GenerateRequest::new("g", vec![101, 102], SamplingParams::greedy(2), limits)
        .expect("valid");
    let mut s = engine.generate(gen).expect("submit");
    assert!(matches!(
        s.blocking_recv(),
        Some(EngineEvent::Error(EngineError::WrongModelKind(_)))
    ));
}

#[test]
fn a_decoder_refuses_embedding_requests() {
    let engine = engine(
        root().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        512,
    );
    assert_eq!(engine.model_kind(), ModelKind::Generate);
    let err = embed(&engine, vec![vec![1, 2, 3]]).unwrap_err();
    assert!(matches!(err, EngineError::WrongModelKind(_)), "{err}");
}
