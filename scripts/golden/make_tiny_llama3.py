#!/usr/bin/env python3
"""A tiny Llama with llama3 rope scaling, saved by transformers v5 (whose config.json carries
`rope_parameters`), and its fp32 logits on fixed token sequences: the reference for
crates/model/tests/tiny_llama3.rs.

The weights are not committed: every tensor is filled from an integer hash of its name's index
(in sorted order) and the element index, a formula the Rust test repeats exactly. Only
config.json and the logits are written (tests/golden/tiny-llama3/). Run with the environment of
scripts/golden/requirements.txt.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[2] / "tests" / "golden" / "tiny-llama3"


def fill(index: int, shape, scale: float, offset: float, mix: int = 40503) -> np.ndarray:
    """Element k of tensor number `index`: offset + scale * (u - 0.5), u from a 32-bit hash."""
    n = int(np.prod(shape))
    k = np.arange(n, dtype=np.uint64)
    h = (k * np.uint64(2654435761) + np.uint64(index) * np.uint64(mix) + np.uint64(12345)) % np.uint64(2**32)
    u = h.astype(np.float64) / 2.0**32
    return (offset + scale * (u - 0.5)).astype(np.float32).reshape(shape)


# Tensors numbered close together differ by a shift of index * mix / 2^32: negligible with the
# default mix, so experts get a large one (else every expert computes nearly the same thing and
# a wrong routing would go unnoticed).
EXPERT_MIX = 2246822519


def tensor_fill(index: int, name: str, shape) -> np.ndarray:
    """Tensor number `index` (sorted names) of the tiny checkpoints: norms around 1, embeddings
    wide, other weights narrow (the Rust tests' HashWeights repeats this)."""
    if name.endswith("norm.weight"):
        scale, offset = 0.4, 1.0
    elif "embed_tokens" in name:
        scale, offset = 2.0, 0.0
    elif name.endswith("sinks"):
        # gpt-oss's attention sinks: the tiny models' scores spread over ±100, so sinks of 20..60
        # take a visible share of some softmaxes.
        scale, offset = 40.0, 40.0
    else:
        scale, offset = 0.5, 0.0
    mix = EXPERT_MIX if ".experts." in name else 40503
    return fill(index, tuple(shape), scale, offset, mix)


def main():
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    state = model.state_dict()
    for i, name in enumerate(sorted(state)):
        state[name].copy_(torch.from_numpy(tensor_fill(i, name, state[name].shape)))
    OUT.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(OUT)
    seqs = [[(s * 31 + i * 7 + 3) % 128 for i in range(n)] for s, n in enumerate([5, 70, 150])]
    out = {"reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32",
           "names": sorted(state), "sequences": []}
    with torch.no_grad():
        for ids in seqs:
            logits = model(torch.tensor([ids])).logits[0, -1].tolist()
            out["sequences"].append({"ids": ids, "last_logits": logits})
    (OUT / "logits.json").write_text(json.dumps(out) + "\n")
    print(open(OUT / "config.json").read())


if __name__ == "__main__":
    main()
