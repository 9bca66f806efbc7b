//! A GGUF file's header. candle reads the metadata; the tensor table is read here, because
//! candle's tensor types stop short of ggml's newer ones (MXFP4, type 39, holds gpt-oss's
//! experts) and it refuses the whole file over one such tensor. Tensors candle can hold go into
//! its `Content` as usual; the others are kept aside with their ggml type, so MXFP4 experts are
//! read as bytes and any other type is refused by name only if the model asks for it.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::{Content, TensorInfo, DEFAULT_ALIGNMENT};
use candle_core::quantized::GgmlDType;

/// ggml's type id of MXFP4 blocks (32 values: one e8m0 scale byte, 16 bytes of nibbles).
pub(super) const GGML_MXFP4: u32 = 39;
/// Bytes of one ggml MXFP4 block.
pub(super) const MXFP4_BLOCK_BYTES: usize = 17;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// A tensor candle's types cannot hold: its ggml type id, shape (outermost first, as candle
/// writes shapes) and offset from the start of the tensor data.
pub(super) struct OtherTensor {
    pub ggml_type: u32,
    pub shape: Vec<usize>,
    pub offset: u64,
}

/// The parsed header.
pub(super) struct Header {
    pub content: Content,
    pub others: HashMap<String, OtherTensor>,
}

/// The file as candle is shown it: the tensor count reads as zero, so candle parses the
/// metadata and stops where the tensor table begins.
struct MetadataOnly<'a, R> {
    inner: &'a mut R,
    /// Where the tensor count lies (bytes 8..12 in GGUF v1, 8..16 after).
    count: std::ops::Range<u64>,
    pos: u64,
}

impl<R: Read> Read for MetadataOnly<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            if self.count.contains(&(self.pos + i as u64)) {
                *b = 0;
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for MetadataOnly<'_, R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

/// candle's type for a ggml type id, where it has one.
fn candle_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Little-endian reads of the tensor table, bounded by the file's size.
struct Table<'a, R> {
    reader: &'a mut R,
    /// GGUF v1 writes lengths as u32.
    v1: bool,
    file_size: u64,
}

impl<R: Read + Seek> Table<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.reader
            .read_exact(&mut b)
            .map_err(|e| format!("tensor table cut short: {e}"))?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn length(&mut self) -> Result<u64, String> {
        match self.v1 {
            true => self.u32().map(u64::from),
            false => self.u64(),
        }
    }

    fn remaining(&mut self) -> Result<u64, String> {
        let pos = self.reader.stream_position().map_err(|e| e.to_string())?;
        Ok(self.file_size.saturating_sub(pos))
    }

    fn name(&mut self) -> Result<String, String> {
        let len = self.length()?;
        if len > self.remaining()? {
            return Err(format!(
                "tensor name of {len} bytes runs past the file's end"
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.reader
            .read_exact(&mut v)
            .map_err(|e| format!("tensor table cut short: {e}"))?;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// One entry: name, dimensions (innermost first in the file), type id, offset.
    fn entry(&mut self) -> Result<(String, Vec<usize>, u32, u64), String> {
        let name = self.name()?;
        let n_dims = self.u32()?;
        if n_dims > MAX_DIMS {
            return Err(format!(
                "tensor '{name}' has {n_dims} dimensions, at most {MAX_DIMS}"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.length()?;
            dims.push(usize::try_from(d).map_err(|_| format!("tensor '{name}': dimension {d}"))?);
        }
        if dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .is_none()
        {
            return Err(format!("tensor '{name}': {dims:?} elements overflow"));
        }
        dims.reverse();
        let ggml_type = self.u32()?;
        let offset = self.u64()?;
        Ok((name, dims, ggml_type, offset))
    }
}

/// Parse the header of the GGUF file `reader` (positioned anywhere).
pub(super) fn read<R: Read + Seek>(reader: &mut R) -> Result<Header, String> {
    let io = |e: std::io::Error| e.to_string();
    let file_size = reader.seek(SeekFrom::End(0)).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut head = [0u8; 8];
    reader.read_exact(&mut head).map_err(io)?;
    let v1 = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) == 1;
    let count_at = 8..if v1 { 12 } else { 16 };
    reader.seek(SeekFrom::Start(count_at.start)).map_err(io)?;
    let mut table = Table {
        reader,
        v1,
        file_size,
    };
    let tensor_count = table.length()?;
    table.reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut view = MetadataOnly {
        inner: &mut *table.reader,
        count: count_at.clone(),
        pos: 0,
    };
    let metadata_only = Content::read(&mut view).map_err(|e| e.to_string())?;
    let table_start = view.pos;
    table
        .reader
        .seek(SeekFrom::Start(table_start))
        .map_err(io)?;
    // Each entry takes at least a name length, a dimension count, a type and an offset.
    let smallest_entry = if v1 { 4 + 4 + 4 + 8 } else { 8 + 4 + 4 + 8 };
    if tensor_count.saturating_mul(smallest_entry) > table.remaining()? {
        return Err(format!(
            "the header declares {tensor_count} tensors, more than the file can hold"
        ));
    }
    let mut tensor_infos = HashMap::new();
    let mut others = HashMap::new();
    for _ in 0..tensor_count {
        let (name, shape, ggml_type, offset) = table.entry()?;
        match candle_type(ggml_type) {
            Some(ggml_dtype) => {
                let info = TensorInfo {
                    ggml_dtype,
                    shape: shape.into(),
                    offset,
                };
                tensor_infos.insert(name, info);
            }
            None => {
                let other = OtherTensor {
                    ggml_type,
                    shape,
                    offset,
                };
                others.insert(name, other);
            }
        }
    }
    let alignment = match metadata_only.metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .to_u64()
            .ok()
            .filter(|a| *a > 0)
            .ok_or("'general.alignment' must be a positive integer")?,
    };
    let table_end = table.reader.stream_position().map_err(io)?;
    let Content {
        magic, metadata, ..
    } = metadata_only;
    Ok(Header {
        content: Content {
            magic,
            metadata,
            tensor_infos,
            tensor_data_offset: table_end.div_ceil(alignment) * alignment,
        },
        others,
    })
}

/// ggml's name for a type id candle lacks (for error messages).
pub(super) fn type_name(id: u32) -> String {
    let name = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        GGML_MXFP4 => "MXFP4",
        _ => return format!("ggml type {id}"),
    };
    name.to_string()
}
