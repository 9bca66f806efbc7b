//! A GGUF v3 writer for tests that rebuild llama.cpp's files: candle's writer holds only the
//! tensor types candle knows, and gpt-oss's GGUFs carry MXFP4 (ggml type 39) experts.

use std::io::Write;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};

/// A tensor's bytes as the file holds them.
pub enum TensorData {
    Candle(QTensor),
    /// Bytes of ggml type `ggml_type`, `shape` outermost first.
    Raw {
        ggml_type: u32,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    },
}

const ALIGNMENT: usize = 32;

fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q4K => 12,
        GgmlDType::Q6K => 14,
        GgmlDType::BF16 => 30,
        other => panic!("no type id written for {other:?}"),
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => string(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            let t = items.first().map(value_type).unwrap_or(4);
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                value(out, item);
            }
        }
    }
}

/// Writes a GGUF v3 file with `metadata` and `tensors`, data aligned to 32 bytes.
pub fn write(
    path: &std::path::Path,
    metadata: &[(String, Value)],
    tensors: &[(String, TensorData)],
) {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        out.extend_from_slice(&value_type(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in tensors {
        let (ggml_type, shape, bytes) = match t {
            TensorData::Candle(q) => (
                ggml_type_id(q.dtype()),
                q.shape().dims().to_vec(),
                q.data().expect("tensor bytes").into_owned(),
            ),
            TensorData::Raw {
                ggml_type,
                shape,
                bytes,
            } => (*ggml_type, shape.clone(), bytes.clone()),
        };
        string(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ggml_type.to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        data.extend_from_slice(&bytes);
        data.resize(data.len().next_multiple_of(ALIGNMENT), 0);
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    out.extend_from_slice(&data);
    let mut f = std::fs::File::create(path).expect("create gguf");
    f.write_all(&out).expect("write gguf");
}
