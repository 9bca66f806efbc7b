#!/usr/bin/env python3
"""The tiny gpt-oss of make_tiny_families.py with its experts stored as gpt-oss checkpoints
store them: MXFP4 `*_blocks` and `*_scales` bytes instead of `gate_up_proj` / `down_proj`.
transformers expands them with its own `convert_moe_packed_tensors` (float32) and runs the
model in fp32; tests/golden/tiny-gpt-oss-mxfp4/ gets config.json and outputs.json (logits,
greedy tokens, names and shapes as in make_tiny_families.py, plus the first expanded values of
one expert tensor as float32 bits, for a bit-exact check of spindle's MXFP4 expansion).

Bytes come from the integer hash of make_tiny_llama3.fill (`byte_fill` below; the Rust test's
HashWeights repeats it): block bytes cover every nibble, scales stay within 2^-6 .. 2^-3 so the
experts' weights are as small as the other tensors'. Run with scripts/golden/requirements.txt.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import make_tiny_families
from make_tiny_families import reference_outputs
from make_tiny_llama3 import EXPERT_MIX, tensor_fill

OUT = make_tiny_families.ROOT / "tiny-gpt-oss-mxfp4"
PACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def byte_fill(index: int, shape, scales: bool) -> np.ndarray:
    """Byte k of tensor number `index`: bits 13..20 of the hash; scales 121 + that % 4."""
    n = int(np.prod(shape))
    k = np.arange(n, dtype=np.uint64)
    h = (k * np.uint64(2654435761) + np.uint64(index) * np.uint64(EXPERT_MIX) + np.uint64(12345)) % np.uint64(2**32)
    b = (h >> np.uint64(13)) & np.uint64(0xFF)
    if scales:
        b = np.uint64(121) + b % np.uint64(4)
    return b.astype(np.uint8).reshape(shape)


def main():
    name, config, cls = next(f for f in make_tiny_families.families() if f[0] == "tiny-gpt-oss")
    config._attn_implementation = "eager"
    model = cls(config).to(torch.float32).eval()
    state = model.state_dict()
    # The checkpoint's names: each packed projection becomes its blocks and scales.
    shapes = {}
    for n, t in state.items():
        if n.endswith(PACKED):
            e, a, b = t.shape  # [experts, in, out] in memory; stored as [experts, out, in / 32, 16]
            shapes[n + "_blocks"] = [e, b, a // 32, 16]
            shapes[n + "_scales"] = [e, b, a // 32]
        else:
            shapes[n] = list(t.shape)
    names = sorted(shapes)
    stored = {}
    for i, n in enumerate(names):
        if n.endswith("_blocks") or n.endswith("_scales"):
            stored[n] = torch.from_numpy(byte_fill(i, shapes[n], n.endswith("_scales")))
        else:
            stored[n] = torch.from_numpy(tensor_fill(i, n, shapes[n]))
    check = None
    for n in state:
        if n.endswith(PACKED):
            expanded = convert_moe_packed_tensors(stored[n + "_blocks"], stored[n + "_scales"],
                                                  dtype=torch.float32)
            state[n].copy_(expanded)
            if check is None:
                # The expansion in storage order ([experts, out, in]), first expert's first rows.
                first = expanded.transpose(1, 2)[0].reshape(-1)[:512]
                check = {"blocks": n + "_blocks", "scales": n + "_scales",
                         "bits": first.view(torch.int32).tolist()}
        else:
            state[n].copy_(stored[n])
    model.load_state_dict(state)
    OUT.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(OUT)
    out = reference_outputs(model, names, shapes,
                            "float32, eager, experts expanded by convert_moe_packed_tensors")
    out["mxfp4_expansion"] = check
    (OUT / "outputs.json").write_text(json.dumps(out) + "\n")
    print(OUT, "written", file=sys.stderr)


if __name__ == "__main__":
    main()
