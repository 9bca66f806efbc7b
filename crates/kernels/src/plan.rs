//! Host-side planning of one step's paged attention: which sequences go to the decode kernel and
//! which to the prefill kernel, the flattened block tables, the prefill work items (one per CTA,
//! longest first) and the split-K choice for decode. Plain Rust with no CUDA dependency, so the
//! planning rules are unit-tested on every machine; the CUDA launch code only uploads a plan.
//!
//! The constants mirror the kernels in `/kernels/paged_attention.cu` and
//! `/kernels/prefill_attention.cu`; if you change one side, change the other.

use crate::error::{KernelError, Result};

/// Head sizes the attention kernels are instantiated for.
pub const SUPPORTED_HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];
/// Threads per decode CTA (`DECODE_THREADS`).
pub const DECODE_THREADS: u32 = 128;
/// Keys per decode tile (`DECODE_TILE`); partitions are multiples of it.
pub const DECODE_TILE: usize = 64;
/// Query heads of one KV group one decode CTA serves (`DECODE_MAX_HEADS`).
pub const DECODE_MAX_HEADS: usize = 16;
/// Threads per prefill CTA (`PF_THREADS`).
pub const PREFILL_THREADS: u32 = 256;
/// Query rows, i.e. (token, head) pairs, per prefill CTA (`PF_ROWS`).
pub const PREFILL_ROWS: usize = 64;
/// Keys per prefill tile (`PF_TILE`).
pub const PREFILL_TILE: usize = 64;
/// Default split-K partition for long decode contexts (a multiple of `DECODE_TILE`).
pub const DEFAULT_PARTITION_SIZE: usize = 512;

/// Dynamic shared memory of the decode kernel for `elem_size`-byte elements and `head_dim`
/// (mirrors `DecodeSmem<T, D>::BYTES`; the kernel traps if given less).
pub fn decode_smem_bytes(elem_size: usize, head_dim: usize) -> usize {
    let vec = 16 / elem_size;
    let row = head_dim + vec;
    DECODE_MAX_HEADS * head_dim * 4
        + 2 * DECODE_TILE * row * elem_size
        + DECODE_MAX_HEADS * DECODE_TILE * 4
        + 3 * DECODE_MAX_HEADS * 4
}

/// Dynamic shared memory of the prefill kernel (mirrors `PrefillSmem<T, D>::BYTES`).
pub fn prefill_smem_bytes(elem_size: usize, head_dim: usize) -> usize {
    let vec = 16 / elem_size;
    PREFILL_ROWS * (head_dim + 4) * 4
        + 2 * PREFILL_TILE * (head_dim + vec) * elem_size
        + PREFILL_ROWS * (PREFILL_TILE + 16) * 4
        + 3 * PREFILL_ROWS * 4
}

/// Dynamic shared memory of the split-K merge kernel for `max_parts` partitions.
pub fn reduce_smem_bytes(max_parts: usize) -> usize {
    (max_parts + 32) * 4
}

/// One sequence of the flattened batch, as the model's `SequenceSlice` describes it.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpec<'a> {
    /// Row of the sequence's first new token in q / the output.
    pub query_start: usize,
    /// New tokens this step (1 = decode).
    pub query_len: usize,
    /// Tokens in the cache after this step's writes.
    pub context_len: usize,
    /// Cache blocks holding positions `0..context_len`, in order.
    pub block_table: &'a [u32],
}

/// The model and cache geometry a plan is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA groups).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Blocks in the cache (block ids must be below it).
    pub num_blocks: usize,
}

impl AttentionShape {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads.max(1)
    }

    /// Check the shape is one the kernels are built for, with a message naming the limit.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(KernelError::Unsupported(m));
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim) {
            return bad(format!(
                "head_dim {} (the CUDA kernels support {:?})",
                self.head_dim, SUPPORTED_HEAD_DIMS
            ));
        }
        if self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "{} query heads over {} kv heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.group() > PREFILL_ROWS {
            return bad(format!(
                "GQA group of {} heads (at most {PREFILL_ROWS})",
                self.group()
            ));
        }
        if self.block_size == 0 || self.num_blocks == 0 {
            return bad("an empty cache".into());
        }
        if self.num_kv_heads > 65535 || self.num_heads > 65535 {
            return bad(format!("{} heads exceed the CUDA grid", self.num_heads));
        }
        Ok(())
    }
}

/// Which decode kernel variant to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeVariant {
    /// v1 unless the contexts are long and there are too few CTAs to fill the GPU.
    #[default]
    Auto,
    /// One CTA walks a sequence's whole context.
    V1,
    /// Split-K: partitions of `partition_size` keys, merged by the reduce kernel.
    V2,
}

/// Knobs for [`AttentionPlan::build`]; the defaults are what the backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Decode variant (tests force each one).
    pub decode_variant: DecodeVariant,
    /// Keys per split-K partition; rounded up to a multiple of 64.
    pub partition_size: usize,
    /// Multiprocessors on the device: v2 is chosen when v1 would leave them idle.
    pub num_sms: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            decode_variant: DecodeVariant::Auto,
            partition_size: DEFAULT_PARTITION_SIZE,
            num_sms: 132,
        }
    }
}

/// Launch data of the decode kernel: one entry per sequence with one new token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodePlan {
    /// Row of each entry's query in q / the output.
    pub entry_token: Vec<i32>,
    /// Context length of each entry.
    pub entry_ctx: Vec<i32>,
    /// Block tables, `entries x bt_stride`, zero-padded.
    pub block_tables: Vec<i32>,
    /// Row stride of `block_tables` (at least 1).
    pub bt_stride: usize,
    /// Query heads one CTA serves (at most `DECODE_MAX_HEADS`).
    pub heads_per_cta: usize,
    /// CTAs per KV head (`ceil(group / heads_per_cta)`).
    pub head_chunks: usize,
    /// Keys per partition (a multiple of 64; covers every context in v1).
    pub partition_size: usize,
    /// Grid z: 1 for v1, the most partitions of any entry for v2.
    pub num_partitions: usize,
}

impl DecodePlan {
    /// Number of decode entries.
    pub fn len(&self) -> usize {
        self.entry_token.len()
    }

    /// Whether there is no decode work.
    pub fn is_empty(&self) -> bool {
        self.entry_token.is_empty()
    }

    /// Whether the split-K path (partials + reduce) runs.
    pub fn is_split(&self) -> bool {
        self.num_partitions > 1
    }
}

/// Launch data of the prefill kernel: sequences with more than one new token, and one work item
/// per CTA (sequence, first query token of the CTA).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefillPlan {
    /// First row of each sequence in q / the output.
    pub seq_qstart: Vec<i32>,
    /// New tokens of each sequence.
    pub seq_qlen: Vec<i32>,
    /// Context length of each sequence after this step.
    pub seq_ctx: Vec<i32>,
    /// Block tables, `seqs x bt_stride`, zero-padded.
    pub block_tables: Vec<i32>,
    /// Row stride of `block_tables` (at least 1).
    pub bt_stride: usize,
    /// Sequence index of each work item, longest work first.
    pub work_seq: Vec<i32>,
    /// Offset of the work item's first query token within its sequence.
    pub work_qoff: Vec<i32>,
    /// Query tokens per CTA: `PREFILL_ROWS / group`, at least 1.
    pub tokens_per_cta: usize,
}

impl PrefillPlan {
    /// Whether there is no prefill work.
    pub fn is_empty(&self) -> bool {
        self.work_seq.is_empty()
    }
}

/// Everything the attention launches of one step need, built once and shared by all layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Geometry the plan was made for.
    pub shape: AttentionShape,
    /// Rows of q / the output.
    pub num_tokens: usize,
    /// Sequences with one new token.
    pub decode: DecodePlan,
    /// Sequences with several new tokens.
    pub prefill: PrefillPlan,
}

fn to_i32(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| KernelError::InvalidBatch(format!("{what} {value} does not fit in 32 bits")))
}

/// Check that every sequence's query rows lie inside a batch of `num_tokens` new tokens, its
/// context covers its queries, and its block table holds the context within a cache of
/// `num_blocks` blocks of `block_size` — the checks every attention backend needs before it
/// indexes a cache (the CPU backend calls this too).
pub fn validate_sequences(
    seqs: &[SeqSpec<'_>],
    num_tokens: usize,
    block_size: usize,
    num_blocks: usize,
) -> Result<()> {
    let bad = |m: String| Err(KernelError::InvalidBatch(m));
    for (i, seq) in seqs.iter().enumerate() {
        let end = seq.query_start.checked_add(seq.query_len);
        if end.is_none_or(|e| e > num_tokens)
            || seq.query_len == 0
            || seq.query_len > seq.context_len
        {
            return bad(format!(
                "sequence {i}: inconsistent query range or context length"
            ));
        }
        let needed = seq.context_len.div_ceil(block_size.max(1));
        if seq.block_table.len() < needed {
            return bad(format!(
                "sequence {i}: {} blocks cannot hold {} tokens",
                seq.block_table.len(),
                seq.context_len
            ));
        }
        if let Some(b) = seq.block_table.iter().find(|&&b| b as usize >= num_blocks) {
            return bad(format!("sequence {i}: block {b} is outside the cache"));
        }
    }
    Ok(())
}

impl AttentionPlan {
    /// Validate the batch (as the CPU backend does) and plan the launches.
    pub fn build(
        seqs: &[SeqSpec<'_>],
        num_tokens: usize,
        shape: AttentionShape,
        options: PlanOptions,
    ) -> Result<Self> {
        shape.validate()?;
        to_i32(num_tokens, "token count")?;
        validate_sequences(seqs, num_tokens, shape.block_size, shape.num_blocks)?;
        for seq in seqs {
            to_i32(seq.context_len, "context length")?;
        }
        if shape.num_blocks > i32::MAX as usize {
            return Err(KernelError::InvalidBatch(format!(
                "{} cache blocks do not fit in 32 bits",
                shape.num_blocks
            )));
        }
        let (decode_seqs, prefill_seqs): (Vec<&SeqSpec<'_>>, Vec<&SeqSpec<'_>>) =
            seqs.iter().partition(|s| s.query_len == 1);
        let decode = plan_decode(&decode_seqs, shape, options)?;
        let prefill = plan_prefill(&prefill_seqs, shape)?;
        Ok(Self {
            shape,
            num_tokens,
            decode,
            prefill,
        })
    }
}

/// Flatten the needed part of each block table into rows of a common stride.
fn flatten_tables(seqs: &[&SeqSpec<'_>], block_size: usize) -> (Vec<i32>, usize) {
    let stride = seqs
        .iter()
        .map(|s| s.context_len.div_ceil(block_size))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out = vec![0i32; seqs.len() * stride];
    for (row, seq) in seqs.iter().enumerate() {
        let needed = seq.context_len.div_ceil(block_size);
        for (dst, &b) in out[row * stride..row * stride + needed]
            .iter_mut()
            .zip(seq.block_table)
        {
            *dst = b as i32; // < num_blocks <= i32::MAX, checked in build
        }
    }
    (out, stride)
}

fn plan_decode(
    seqs: &[&SeqSpec<'_>],
    shape: AttentionShape,
    options: PlanOptions,
) -> Result<DecodePlan> {
    if seqs.is_empty() {
        return Ok(DecodePlan::default());
    }
    if seqs.len() > 65535 {
        return Err(KernelError::InvalidBatch(format!(
            "{} decode sequences exceed the CUDA grid",
            seqs.len()
        )));
    }
    let group = shape.group();
    let heads_per_cta = group.min(DECODE_MAX_HEADS);
    let head_chunks = group.div_ceil(heads_per_cta);
    let max_ctx = seqs.iter().map(|s| s.context_len).max().unwrap_or(1);
    let partition = options
        .partition_size
        .max(DECODE_TILE)
        .div_ceil(DECODE_TILE)
        * DECODE_TILE;
    let split_parts = max_ctx.div_ceil(partition);
    let ctas = seqs.len() * shape.num_kv_heads * head_chunks;
    let use_v2 = match options.decode_variant {
        DecodeVariant::V1 => false,
        DecodeVariant::V2 => split_parts > 1,
        DecodeVariant::Auto => split_parts > 1 && ctas < 2 * options.num_sms.max(1),
    };
    if use_v2 && split_parts > 65535 {
        return Err(KernelError::InvalidBatch(format!(
            "{split_parts} partitions exceed the CUDA grid"
        )));
    }
    let (partition_size, num_partitions) = if use_v2 {
        (partition, split_parts)
    } else {
        (max_ctx.div_ceil(DECODE_TILE) * DECODE_TILE, 1)
    };
    let (block_tables, bt_stride) = flatten_tables(seqs, shape.block_size);
    Ok(DecodePlan {
        entry_token: seqs.iter().map(|s| s.query_start as i32).collect(),
        entry_ctx: seqs.iter().map(|s| s.context_len as i32).collect(),
        block_tables,
        bt_stride,
        heads_per_cta,
        head_chunks,
        partition_size,
        num_partitions,
    })
}

fn plan_prefill(seqs: &[&SeqSpec<'_>], shape: AttentionShape) -> Result<PrefillPlan> {
    if seqs.is_empty() {
        return Ok(PrefillPlan::default());
    }
    let tokens_per_cta = (PREFILL_ROWS / shape.group()).max(1);
    // (keys the CTA's last query sees, sequence, query offset): most keys first, so the longest
    // CTAs start first and short ones fill the tail.
    let mut work: Vec<(usize, usize, usize)> = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        let first_pos = seq.context_len - seq.query_len;
        let mut qoff = 0;
        while qoff < seq.query_len {
            let ntok = tokens_per_cta.min(seq.query_len - qoff);
            work.push((first_pos + qoff + ntok, s, qoff));
            qoff += tokens_per_cta;
        }
    }
    work.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    to_i32(work.len(), "prefill work items")?;
    let (block_tables, bt_stride) = flatten_tables(seqs, shape.block_size);
    Ok(PrefillPlan {
        seq_qstart: seqs.iter().map(|s| s.query_start as i32).collect(),
        seq_qlen: seqs.iter().map(|s| s.query_len as i32).collect(),
        seq_ctx: seqs.iter().map(|s| s.context_len as i32).collect(),
        block_tables,
        bt_stride,
        work_seq: work.iter().map(|w| w.1 as i32).collect(),
        work_qoff: work.iter().map(|w| w.2 as i32).collect(),
        tokens_per_cta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(num_heads: usize, num_kv_heads: usize) -> AttentionShape {
        AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim: 64,
            block_size: 16,
            num_blocks: 64,
        }
    }

    #[test]
    fn routes_decode_and_prefill_and_flattens_tables() {
        let t0: Vec<u32> = vec![3, 7];
        let t1: Vec<u32> = vec![1, 2, 5];
        let seqs = [
            SeqSpec {
                query_start: 0,
                query_len: 1,
                context_len: 20,
                block_table: &t0,
            },
            SeqSpec {
                query_start: 1,
                query_len: 40,
                context_len: 40,
                block_table: &t1,
            },
        ];
        let plan =
            AttentionPlan::build(&seqs, 41, shape(9, 3), PlanOptions::default()).expect("plan");
        assert_eq!(plan.decode.entry_token, vec![0]);
        assert_eq!(plan.decode.entry_ctx, vec![20]);
        assert_eq!(plan.decode.block_tables, vec![3, 7]);
        assert_eq!(plan.decode.bt_stride, 2);
        assert_eq!(plan.decode.heads_per_cta, 3);
        assert_eq!(plan.decode.num_partitions, 1);
        assert_eq!(plan.decode.partition_size, 64);
        assert_eq!(plan.prefill.seq_qstart, vec![1]);
        assert_eq!(plan.prefill.block_tables, vec![1, 2, 5]);
        // group 3 -> 21 tokens per CTA -> 2 work items, the later (more keys) first.
        assert_eq!(plan.prefill.tokens_per_cta, 21);
        assert_eq!(plan.prefill.work_qoff, vec![21, 0]);
    }

    #[test]
    fn split_k_only_when_forced_or_needed() {
        let table: Vec<u32> = (0..64).collect();
        let seqs = [SeqSpec {
            query_start: 0,
            query_len: 1,
            context_len: 1000,
            block_table: &table,
        }];
        let s = shape(8, 8);
        let auto = AttentionPlan::build(&seqs, 1, s, PlanOptions::default()).expect("plan");
        assert_eq!(
            auto.decode.num_partitions, 2,
            "8 CTAs leave 132 SMs idle: split"
        );
        let v1 = PlanOptions {
            decode_variant: DecodeVariant::V1,
            ..PlanOptions::default()
        };
        let plan = AttentionPlan::build(&seqs, 1, s, v1).expect("plan");
        assert_eq!(
            (plan.decode.num_partitions, plan.decode.partition_size),
            (1, 1024)
        );
        let small = PlanOptions {
            decode_variant: DecodeVariant::V2,
            partition_size: 100,
            ..PlanOptions::default()
        };
        let plan = AttentionPlan::build(&seqs, 1, s, small).expect("plan");
        assert_eq!(
            (plan.decode.partition_size, plan.decode.num_partitions),
            (128, 8)
        );
    }

    #[test]
    fn rejects_what_the_cpu_backend_rejects() {
        let table: Vec<u32> = vec![0];
        let ok = SeqSpec {
            query_start: 0,
            query_len: 1,
            context_len: 16,
            block_table: &table,
        };
        let s = shape(4, 2);
        for bad in [
            SeqSpec {
                context_len: 17,
                ..ok
            },
            SeqSpec { query_len: 0, ..ok },
            SeqSpec {
                query_start: 1,
                ..ok
            },
            SeqSpec {
                query_len: 2,
                context_len: 1,
                ..ok
            },
        ] {
            assert!(
                AttentionPlan::build(&[bad], 1, s, PlanOptions::default()).is_err(),
                "{bad:?}"
            );
        }
        let far: Vec<u32> = vec![64];
        let bad = SeqSpec {
            block_table: &far,
            ..ok
        };
        assert!(AttentionPlan::build(&[bad], 1, s, PlanOptions::default()).is_err());
        let odd = AttentionShape { head_dim: 72, ..s };
        assert!(AttentionPlan::build(&[ok], 1, odd, PlanOptions::default()).is_err());
    }

    #[test]
    fn shared_memory_fits_an_h100() {
        // 227 KiB is the most one CTA may have on sm_90.
        for d in SUPPORTED_HEAD_DIMS {
            for es in [2, 4] {
                assert!(decode_smem_bytes(es, d) <= 232_448, "decode d{d} x{es}");
                assert!(prefill_smem_bytes(es, d) <= 232_448, "prefill d{d} x{es}");
            }
        }
        assert_eq!(
            decode_smem_bytes(2, 128),
            47_296,
            "bf16 d128 decode stays under the 48 KiB default"
        );
    }
}
