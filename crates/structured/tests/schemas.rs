//! Constrained decoding on the default model's vocabulary (SmolLM2, 49k tokens), with random
//! logits in place of a model: every constraint must finish, every token picked from a mask
//! must be accepted by the matcher, and JSON outputs must validate against their schema
//! (the `jsonschema` crate). 56 schemas, plus regex, choice and Lark grammars.

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use spindle_model::gguf::GgufFile;
use spindle_model::TokenizerBundle;
use spindle_structured::{ConstraintSpec, GrammarCompiler, StructuredError, Whitespace};

fn tokenizer() -> (TokenizerBundle, usize) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut file = GgufFile::open(&path).expect("run scripts/fetch-model.sh first");
    let vocab = file.config().expect("config").vocab_size;
    let tok = file.vocab().expect("vocab").build().expect("tokenizer");
    (tok, vocab)
}

/// Per-token bias that makes random decoding finish: closing quotes, brackets, commas, digits
/// and end-of-sequence are preferred, so strings and arrays end after a few tokens.
fn bias(tok: &TokenizerBundle, vocab: usize) -> Vec<f32> {
    (0..vocab as u32)
        .map(|id| {
            if tok.eos_token_ids.contains(&id) {
                return 12.0;
            }
            let text = tok.decode(&[id], false).unwrap_or_default();
            if text.is_empty() {
                0.0
            } else if text.chars().all(|c| "\"}],:".contains(c)) {
                6.0
            } else if text.chars().all(|c| c.is_ascii_digit()) {
                3.0
            } else {
                0.0
            }
        })
        .collect()
}

/// Decode under `spec` with random logits; returns the text, or the reason it failed.
fn decode(
    compiler: &GrammarCompiler,
    tok: &TokenizerBundle,
    bias: &[f32],
    spec: &ConstraintSpec,
    seed: u64,
) -> String {
    let mut c = compiler.compile(spec).expect("compiles");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..600 {
        if c.is_finished() {
            return tok.decode(&out, false).expect("decode");
        }
        let mut logits: Vec<f32> = bias.iter().map(|b| b + rng.random::<f32>() * 4.0).collect();
        c.mask_logits(&mut logits).expect("mask");
        let allowed: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize] > f32::NEG_INFINITY)
            .collect();
        assert!(!allowed.is_empty(), "{spec:?}: empty mask");
        // Property: any token the mask allows is accepted (checked on a copy, a few per step).
        for _ in 0..3 {
            let t = allowed[rng.random_range(0..allowed.len())];
            let mut probe = c.clone();
            probe
                .accept(t)
                .unwrap_or_else(|e| panic!("{spec:?}: mask allowed {t} but: {e}"));
        }
        let best = allowed
            .iter()
            .copied()
            .max_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]))
            .expect("non-empty");
        if tok.eos_token_ids.contains(&best) {
            assert!(
                c.is_accepting(),
                "{spec:?}: EOS allowed before the output was complete"
            );
            return tok.decode(&out, false).expect("decode");
        }
        c.accept(best).expect("accept");
        out.push(best);
    }
    panic!(
        "{spec:?}: did not finish in 600 tokens: {:?}",
        tok.decode(&out, false)
    );
}

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}),
        json!({"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}),
        json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}),
        json!({"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}),
        json!({"type": "object", "properties": {"n": {"type": "null"}}, "required": ["n"]}),
        json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"}}, "required": ["a", "b", "c"]}),
        json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}),
        json!({"type": "object", "properties": {"v": {"enum": [1, "two", null, true]}}, "required": ["v"]}),
        json!({"type": "object", "properties": {"k": {"const": "fixed"}}, "required": ["k"]}),
        json!({"type": "object", "properties": {"inner": {"type": "object", "properties": {"z": {"type": "integer"}}, "required": ["z"]}}, "required": ["inner"]}),
        json!({"type": "object", "properties": {"l1": {"type": "object", "properties": {"l2": {"type": "object", "properties": {"l3": {"type": "string"}}, "required": ["l3"]}}, "required": ["l2"]}}, "required": ["l1"]}),
        json!({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}, "required": ["tags"]}),
        json!({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3}}, "required": ["tags"]}),
        json!({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1}}, "required": ["xs"]}),
        json!({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}, "required": ["xs"]}),
        json!({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}),
        json!({"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}, "minItems": 1, "maxItems": 2}),
        json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["n"]}),
        json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": -10, "maximum": -1}}, "required": ["n"]}),
        json!({"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}, "required": ["n"]}),
        json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1000}}, "required": ["n"]}),
        json!({"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["p"]}),
        json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}}, "required": ["s"]}),
        json!({"type": "object", "properties": {"s": {"type": "string", "maxLength": 1}}, "required": ["s"]}),
        json!({"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]}),
        json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}, "required": ["code"]}),
        json!({"type": "object", "properties": {"v": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}, "required": ["v"]}),
        json!({"type": "object", "properties": {"v": {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]}}, "required": ["v"]}),
        json!({"type": "object", "properties": {"v": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}}, "required": ["v"]}),
        json!({"type": "object", "properties": {"v": {"type": ["string", "null"]}}, "required": ["v"]}),
        json!({"type": "object", "properties": {"v": {"type": ["integer", "null"], "maximum": 9}}, "required": ["v"]}),
        json!({"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"]}),
        json!({"definitions": {"name": {"type": "string", "maxLength": 8}}, "type": "object", "properties": {"first": {"$ref": "#/definitions/name"}}, "required": ["first"]}),
        json!({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["v", "next"]}}, "$ref": "#/$defs/node"}),
        json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"], "additionalProperties": false}),
        json!({"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 2}),
        json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["name", "qty"]}, "maxItems": 3}}, "required": ["items"]}),
        json!({"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": false}}, "required": ["pair"]}),
        json!({"type": "object", "properties": {"flag": {"type": "boolean"}, "count": {"type": "integer"}}}),
        json!({"type": "object", "properties": {"opt": {"type": "string"}}}),
        json!({"type": "object"}),
        json!({"type": "array"}),
        json!({"type": "string"}),
        json!({"type": "integer"}),
        json!({"type": "number"}),
        json!({"type": "boolean"}),
        json!({"enum": ["yes", "no"]}),
        json!({"type": "string", "enum": ["alpha", "beta", "gamma"]}),
        json!({"type": "object", "properties": {"weather": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}, "required": ["weather"]}),
        json!({"title": "Person", "type": "object", "properties": {"name": {"type": "string", "description": "full name"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}, "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["name", "age", "email"]}),
        json!({"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "maxItems": 2}}, "required": ["matrix"]}),
        json!({"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4}}, "required": ["ids"]}),
        json!({"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]}),
        json!({"type": "object", "properties": {"a": {"allOf": [{"type": "integer"}, {"minimum": 3}]}}, "required": ["a"]}),
        json!({"type": "object", "properties": {"text": {"type": "string"}, "score": {"type": "number"}, "labels": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}, "required": ["text", "score", "labels"]}),
    ]
}

#[test]
fn every_schema_gives_valid_json() {
    let (tok, vocab) = tokenizer();
    let compiler = GrammarCompiler::new(&tok, vocab).expect("compiler");
    let bias = bias(&tok, vocab);
    let schemas = schemas();
    assert!(schemas.len() >= 50, "{}", schemas.len());
    for (i, schema) in schemas.iter().enumerate() {
        let validator = jsonschema::validator_for(schema).expect("reference validator");
        for (w, ws) in [Whitespace::Compact, Whitespace::None]
            .into_iter()
            .enumerate()
        {
            let spec = ConstraintSpec::JsonSchema {
                schema: schema.clone(),
                whitespace: ws,
            };
            let text = decode(&compiler, &tok, &bias, &spec, (i * 2 + w) as u64);
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("schema {i}: {text:?} is not JSON: {e}"));
            assert!(
                validator.is_valid(&value),
                "schema {i} {schema}: {text} does not validate"
            );
        }
    }
}

#[test]
fn json_object_regex_choice_and_grammar() {
    let (tok, vocab) = tokenizer();
    let compiler = GrammarCompiler::new(&tok, vocab).expect("compiler");
    let bias = bias(&tok, vocab);
    for seed in 0..5 {
        let text = decode(
            &compiler,
            &tok,
            &bias,
            &ConstraintSpec::JsonObject {
                whitespace: Whitespace::Compact,
            },
            seed,
        );
        let v: Value = serde_json::from_str(&text).expect("json");
        assert!(v.is_object(), "{text}");
    }
    let cases: Vec<(ConstraintSpec, Box<dyn Fn(&str) -> bool>)> = vec![
        (
            ConstraintSpec::Regex("[0-9]{3}-[0-9]{4}".into()),
            Box::new(|t| t.len() == 8 && t.as_bytes()[3] == b'-'),
        ),
        (
            ConstraintSpec::Regex("(yes|no)".into()),
            Box::new(|t| t == "yes" || t == "no"),
        ),
        (
            ConstraintSpec::Regex("[a-z]{1,6}@example\\.com".into()),
            Box::new(|t| t.ends_with("@example.com")),
        ),
        (
            ConstraintSpec::Choice(vec!["Positive".into(), "Negative".into(), "a.b|c".into()]),
            Box::new(|t| ["Positive", "Negative", "a.b|c"].contains(&t)),
        ),
        (
            ConstraintSpec::Grammar(
                "start: \"The answer is \" NUMBER\nNUMBER: /[0-9]{1,3}/".into(),
            ),
            Box::new(|t| {
                t.starts_with("The answer is ") && t[14..].chars().all(|c| c.is_ascii_digit())
            }),
        ),
    ];
    for (i, (spec, ok)) in cases.iter().enumerate() {
        for seed in 0..3 {
            let text = decode(&compiler, &tok, &bias, spec, (i * 10 + seed) as u64);
            assert!(ok(&text), "{spec:?}: {text:?}");
        }
    }
}

#[test]
fn bad_specs_are_errors_and_repeats_are_cached() {
    let (tok, vocab) = tokenizer();
    let compiler = GrammarCompiler::new(&tok, vocab).expect("compiler");
    let bad = [
        ConstraintSpec::Regex("(unclosed".into()),
        ConstraintSpec::Grammar("start: undefined_rule".into()),
        ConstraintSpec::JsonSchema {
            schema: json!({"type": "no-such-type"}),
            whitespace: Whitespace::Compact,
        },
        ConstraintSpec::JsonSchema {
            schema: json!({"$ref": "#/$defs/missing"}),
            whitespace: Whitespace::Compact,
        },
        ConstraintSpec::JsonSchema {
            schema: json!({"type": "integer", "minimum": 5, "maximum": 1}),
            whitespace: Whitespace::Compact,
        },
        // Unsupported keywords are refused by name, never silently ignored.
        ConstraintSpec::JsonSchema {
            schema: json!({"type": "array", "uniqueItems": true}),
            whitespace: Whitespace::Compact,
        },
    ];
    for spec in &bad {
        match compiler.compile(spec) {
            Err(StructuredError::InvalidSpec(m)) => {
                assert!(!m.is_empty());
                if format!("{spec:?}").contains("uniqueItems") {
                    assert!(m.contains("uniqueItems"), "{m}");
                }
            }
            other => panic!("{spec:?}: {other:?}"),
        }
    }
    let spec = ConstraintSpec::JsonSchema {
        schema: json!({"type": "object", "properties": {"q": {"type": "integer"}}}),
        whitespace: Whitespace::Compact,
    };
    assert!(!compiler.is_cached(&spec));
    let t = std::time::Instant::now();
    compiler.compile(&spec).expect("compiles");
    let cold = t.elapsed();
    assert!(compiler.is_cached(&spec));
    let t = std::time::Instant::now();
    compiler.compile(&spec).expect("cached");
    eprintln!("compile: cold {cold:?}, cached {:?}", t.elapsed());
}

/// A gated constraint (a reasoning model's): tokens the grammar forbids pass freely until the
/// output contains the marker `</think>`, found in the tokens' bytes however the tokenizer
/// merged it with its neighbours, then the grammar applies.
#[test]
fn gated_constraints_apply_after_the_marker() {
    let (tok, vocab) = tokenizer();
    let compiler = GrammarCompiler::new(&tok, vocab).expect("compiler");
    let spec = ConstraintSpec::JsonSchema {
        schema: json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
        whitespace: Whitespace::Compact,
    };
    let alone = tok.encode("</think>", false).expect("encode");
    let enc = |parts: &[&str]| -> Vec<u32> {
        parts
            .iter()
            .flat_map(|p| tok.encode(p, false).expect("encode"))
            .collect()
    };
    // The marker as one piece, and cut where a tokenizer may cut it in context.
    let outputs = [
        enc(&["Let me think: </thin k> no JSON here.</think>"]),
        enc(&["Let me think.", "</th", "ink>"]),
        enc(&["Hmm", "</", "think", ">"]),
    ];
    let mut merged = 0;
    for thinking in outputs {
        let mut c = compiler.compile_after(&spec, "</think>").expect("compiles");
        if !thinking.windows(alone.len()).any(|w| w == alone.as_slice()) {
            merged += 1;
        }
        for &t in &thinking {
            let mut logits = vec![0f32; vocab];
            c.mask_logits(&mut logits).expect("mask");
            assert!(
                logits.iter().all(|l| l.is_finite()),
                "gated: nothing masked"
            );
            assert!(!c.is_finished());
            c.accept(t).expect("free before the marker");
        }
        let mut logits = vec![0f32; vocab];
        c.mask_logits(&mut logits).expect("mask");
        assert!(logits.contains(&f32::NEG_INFINITY), "the grammar applies");
        let answer = tok.encode("{\"a\": 12}", false).expect("encode");
        for &t in &answer {
            c.accept(t).expect("valid JSON is accepted");
        }
        assert!(c.is_accepting());
    }
    assert!(
        merged > 0,
        "some outputs hold the marker in other tokens than its own"
    );
    // An empty marker is no gate.
    let mut plain = compiler.compile_after(&spec, "").expect("compiles");
    let mut logits = vec![0f32; vocab];
    plain.mask_logits(&mut logits).expect("mask");
    assert!(logits.contains(&f32::NEG_INFINITY));
}
