//! gpt-oss's experts: each projection's experts in one tensor, `x @ W` style (`gate_up_proj`
//! `[experts, hidden, 2 inter]` with gate and up interleaved column by column, `down_proj`
//! `[experts, inter, hidden]`), with biases, or as MXFP4 `*_blocks`/`*_scales` bytes; or, from
//! a GGUF, split per expert and into gate and up as llama.cpp's converter writes them. The
//! router has a bias too.

use candle_core::{DType, Device, Tensor};

use super::{f32_matrix, MoeBlock};
use crate::config::MoeSpec;
use crate::error::{ModelError, Result};
use crate::mlp::GatedMlp;
use crate::weights::{LinearWeight, WeightSource};

/// The router and experts of the layer whose tensors start with `p` (`model.layers.N`).
pub(super) fn load(
    weights: &mut dyn WeightSource,
    p: &str,
    spec: &MoeSpec,
    hidden: usize,
    dtype: DType,
    device: &Device,
) -> Result<MoeBlock> {
    let (e, inter) = (spec.num_experts, spec.expert_intermediate);
    let router = f32_matrix(weights, &format!("{p}.mlp.router.weight"), &[e, hidden])?;
    let router_bias = weights
        .get(&format!("{p}.mlp.router.bias"), &[e])?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let x = format!("{p}.mlp.experts");
    let down_bias = weights.get(&format!("{x}.down_proj_bias"), &[e, hidden])?;
    // Gate rows first, then up rows, as the fused activations expect.
    let order: Vec<usize> = (0..inter)
        .map(|i| 2 * i)
        .chain((0..inter).map(|i| 2 * i + 1))
        .collect();
    let order_t = Tensor::new(
        order
            .iter()
            .map(|&i| i as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        device,
    )?;
    let interleaved_bias = |w: &mut dyn WeightSource| -> Result<Tensor> {
        let b = w.get(&format!("{x}.gate_up_proj_bias"), &[e, 2 * inter])?;
        Ok(b.index_select(&order_t, 1)?)
    };
    let (projections, gate_up_bias) = if weights.contains(&format!("{x}.gate_up_proj_blocks")) {
        let projections = mxfp4_experts(weights, &x, e, hidden, inter, &order, dtype, device)?;
        (projections, interleaved_bias(weights)?)
    } else if weights.contains(&format!("{x}.gate_up_proj")) {
        let gate_up = weights.get(&format!("{x}.gate_up_proj"), &[e, hidden, 2 * inter])?;
        let down = weights.get(&format!("{x}.down_proj"), &[e, inter, hidden])?;
        let arithmetic = weights.arithmetic();
        let projections = (0..e)
            .map(|i| {
                let gu = gate_up
                    .get(i)?
                    .t()?
                    .contiguous()?
                    .index_select(&order_t, 0)?;
                let d = down.get(i)?.t()?.contiguous()?;
                Ok((
                    LinearWeight::Dense(gu.to_dtype(dtype)?).with_arithmetic(arithmetic)?,
                    LinearWeight::Dense(d.to_dtype(dtype)?).with_arithmetic(arithmetic)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        (projections, interleaved_bias(weights)?)
    } else {
        split_experts(weights, &x, e, hidden, inter, dtype, device)?
    };
    let experts = projections
        .into_iter()
        .enumerate()
        .map(|(i, (gate_up, down))| {
            Ok(GatedMlp {
                gate_up,
                down,
                inter,
                biases: Some((
                    gate_up_bias.get(i)?.to_dtype(dtype)?,
                    down_bias.get(i)?.to_dtype(dtype)?,
                )),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MoeBlock {
        router,
        router_bias: Some(router_bias),
        routing: spec.routing,
        experts,
        shared: None,
        top_k: spec.top_k,
        renormalize: false,
        hidden,
    })
}

/// The experts as llama.cpp's converter splits them: gate and up apart, as per-expert
/// `experts.E.{gate,up,down}_proj.weight` (slices of the GGUF's stacked tensors, in whatever
/// block type they are stored, MXFP4 included) and the gate and up biases as
/// `experts.{gate,up}_proj_bias` (`[experts, inter]` each). Returns the projections and the
/// `[experts, 2 inter]` gate-then-up biases.
#[allow(clippy::too_many_arguments)]
fn split_experts(
    weights: &mut dyn WeightSource,
    x: &str,
    e: usize,
    hidden: usize,
    inter: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Vec<(LinearWeight, LinearWeight)>, Tensor)> {
    let projections = (0..e)
        .map(|i| {
            let prefix = format!("{x}.{i}");
            let m = GatedMlp::load(
                weights,
                &prefix,
                GatedMlp::HF_PARTS,
                hidden,
                inter,
                dtype,
                device,
            )?;
            Ok((m.gate_up, m.down))
        })
        .collect::<Result<Vec<_>>>()?;
    let gate = weights.get(&format!("{x}.gate_proj_bias"), &[e, inter])?;
    let up = weights.get(&format!("{x}.up_proj_bias"), &[e, inter])?;
    Ok((projections, Tensor::cat(&[gate, up], 1)?))
}

/// gpt-oss's MXFP4 experts (`*_blocks` `[experts, rows, cols / 32, 16]`, `*_scales`
/// `[experts, rows, cols / 32]`, rows being output features): kept as MXFP4 on the CPU,
/// expanded to the serving dtype elsewhere. `order` puts the interleaved gate/up rows apart.
#[allow(clippy::too_many_arguments)]
fn mxfp4_experts(
    weights: &mut dyn WeightSource,
    x: &str,
    e: usize,
    hidden: usize,
    inter: usize,
    order: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Vec<(LinearWeight, LinearWeight)>> {
    use crate::quant::mxfp4::{Mxfp4Matrix, BLOCK};
    if !hidden.is_multiple_of(BLOCK) || !inter.is_multiple_of(BLOCK) {
        return Err(ModelError::Config(format!(
            "MXFP4 experts need hidden ({hidden}) and intermediate ({inter}) sizes in blocks of {BLOCK}"
        )));
    }
    let bytes = |w: &mut dyn WeightSource, name: &str, shape: &[usize]| {
        w.get_bytes(&format!("{x}.{name}"), shape)
    };
    let (hb, ib) = (hidden / BLOCK, inter / BLOCK);
    let gu_blocks = bytes(weights, "gate_up_proj_blocks", &[e, 2 * inter, hb, 16])?;
    let gu_scales = bytes(weights, "gate_up_proj_scales", &[e, 2 * inter, hb])?;
    let d_blocks = bytes(weights, "down_proj_blocks", &[e, hidden, ib, 16])?;
    let d_scales = bytes(weights, "down_proj_scales", &[e, hidden, ib])?;
    let wrap = |m: Mxfp4Matrix| -> Result<LinearWeight> {
        if device.is_cpu() {
            return Ok(LinearWeight::Mxfp4(std::sync::Arc::new(m)));
        }
        let t = Tensor::from_vec(m.dequantize(), (m.rows(), m.cols()), &Device::Cpu)?;
        Ok(LinearWeight::Dense(t.to_dtype(dtype)?.to_device(device)?))
    };
    let slice = |v: &[u8], i: usize, per: usize| v[i * per..(i + 1) * per].to_vec();
    (0..e)
        .map(|i| {
            let gu = Mxfp4Matrix::new(
                2 * inter,
                hidden,
                slice(&gu_blocks, i, 2 * inter * hidden / 2),
                slice(&gu_scales, i, 2 * inter * hb),
            )?
            .permute_rows(order)?;
            let d = Mxfp4Matrix::new(
                hidden,
                inter,
                slice(&d_blocks, i, hidden * inter / 2),
                slice(&d_scales, i, hidden * ib),
            )?;
            Ok((wrap(gu)?, wrap(d)?))
        })
        .collect()
}
