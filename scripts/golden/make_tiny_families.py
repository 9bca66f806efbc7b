#!/usr/bin/env python3
"""Tiny random checkpoints of each family transformers knows (dense and mixture-of-experts), saved by transformers v5
(config.json as it writes them today), and their fp32 outputs on fixed token sequences: the
reference for crates/model/tests/tiny_families.rs.

Weights are not committed: every tensor is filled from an integer hash of its name's index (in
sorted order) and the element index (the formula of make_tiny_llama3.py, repeated by the Rust
test). Each family's directory under tests/golden/ gets config.json and outputs.json: the last
logits of three sequences (5, 70 and 150 tokens; the sliding window is 32, so the longer ones
see it) and 12 greedy tokens after the 70-token one (with each step's top 5, for vLLM's
check_logprobs_close); the tensor names and shapes let the test
write the checkpoint as a Hugging Face directory. Run with scripts/golden/requirements.txt.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import transformers

from make_tiny_llama3 import tensor_fill  # the integer-hash weights, shared with the Rust tests

ROOT = Path(__file__).resolve().parents[2] / "tests" / "golden"
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def families():
    t = transformers
    yield "tiny-qwen3", t.Qwen3Config(**SHAPE, num_hidden_layers=2, tie_word_embeddings=False,
                                      rope_theta=1000000.0), t.Qwen3ForCausalLM
    # Gemma's query_pre_attn_scalar is head_dim, and Gemma 3's layer pattern 6 and SmolLM3's
    # rope-free layer every 4th, as in the released models: llama.cpp's GGUFs do not store them
    # and its reader assumes these (see make_tiny_gguf_manifests.py).
    yield "tiny-gemma2", t.Gemma2Config(**SHAPE, num_hidden_layers=4, sliding_window=32,
                                        query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=30.0), t.Gemma2ForCausalLM
    yield "tiny-gemma3", t.Gemma3TextConfig(**SHAPE, num_hidden_layers=6, sliding_window=32,
                                            sliding_window_pattern=6, query_pre_attn_scalar=16,
                                            rope_scaling={"rope_type": "linear", "factor": 8.0},
                                            rope_theta=1000000.0, rope_local_base_freq=10000.0), t.Gemma3ForCausalLM
    yield "tiny-smollm3", t.SmolLM3Config(**SHAPE, num_hidden_layers=4, no_rope_layer_interval=4,
                                          tie_word_embeddings=True, rope_theta=2000000.0), t.SmolLM3ForCausalLM
    yield "tiny-olmo2", t.Olmo2Config(**SHAPE, num_hidden_layers=2, tie_word_embeddings=False,
                                      rope_theta=500000.0), t.Olmo2ForCausalLM
    yield "tiny-granite", t.GraniteConfig(**SHAPE, num_hidden_layers=2, embedding_multiplier=3.0,
                                          residual_multiplier=0.5, attention_multiplier=0.125,
                                          logits_scaling=4.0, tie_word_embeddings=True), t.GraniteForCausalLM
    # Phi-4-mini's shape of rope: 3/4 of each head rotated, longrope factors (short ones apply
    # within the original context, which the test sequences stay inside).
    yield "tiny-phi3", t.Phi3Config(**{**SHAPE, "max_position_embeddings": 1024}, num_hidden_layers=2,
                                    tie_word_embeddings=False, partial_rotary_factor=0.75,
                                    original_max_position_embeddings=256,
                                    rope_scaling={"rope_type": "longrope",
                                                  "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
                                                  "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}), t.Phi3ForCausalLM
    yield "tiny-llama-yarn", t.LlamaConfig(**SHAPE, num_hidden_layers=2, tie_word_embeddings=False,
                                           rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 64}), t.LlamaForCausalLM
    yield "tiny-mistral-window", t.MistralConfig(**SHAPE, num_hidden_layers=2, sliding_window=32,
                                                 tie_word_embeddings=False), t.MistralForCausalLM
    # Mixtures of experts: more experts than top-k, several layers; Qwen2-MoE with a shared
    # expert, Qwen3-MoE renormalizing its top-k (and a variant with a dense layer,
    # mlp_only_layers, which llama.cpp's converter cannot write), OLMoE (and a variant clamping
    # q/k/v, which released OLMoE does not set); OLMoE's rms_norm_eps is 1e-5 as released (and
    # as llama.cpp's converter writes it for every OLMoE).
    yield "tiny-mixtral", t.MixtralConfig(**SHAPE, num_hidden_layers=2, num_local_experts=4,
                                          num_experts_per_tok=2, tie_word_embeddings=False), t.MixtralForCausalLM
    yield "tiny-qwen2-moe", t.Qwen2MoeConfig(**SHAPE, num_hidden_layers=2, num_experts=6,
                                             num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=64,
                                             norm_topk_prob=False, tie_word_embeddings=False), t.Qwen2MoeForCausalLM
    yield "tiny-qwen3-moe", t.Qwen3MoeConfig(**SHAPE, num_hidden_layers=2, num_experts=8,
                                             num_experts_per_tok=3, moe_intermediate_size=32,
                                             norm_topk_prob=True, tie_word_embeddings=False), t.Qwen3MoeForCausalLM
    yield "tiny-qwen3-moe-mixed", t.Qwen3MoeConfig(**SHAPE, num_hidden_layers=3, num_experts=8,
                                                   num_experts_per_tok=3, moe_intermediate_size=32,
                                                   mlp_only_layers=[1], norm_topk_prob=True,
                                                   tie_word_embeddings=False), t.Qwen3MoeForCausalLM
    # gpt-oss: attention sinks, q/k/v/o and expert biases, alternating sliding (32) and full
    # layers, top-k-then-softmax routing, the clamped SwiGLU and its YaRN rope (no truncation).
    yield "tiny-gpt-oss", t.GptOssConfig(**{**SHAPE, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5},
                                         num_hidden_layers=2,
                                         num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                                         swiglu_limit=7.0, tie_word_embeddings=False,
                                         rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                          "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                          "original_max_position_embeddings": 4096}), t.GptOssForCausalLM
    yield "tiny-olmoe", t.OlmoeConfig(**{**SHAPE, "rms_norm_eps": 1e-5}, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                      norm_topk_prob=False, tie_word_embeddings=False), t.OlmoeForCausalLM
    yield "tiny-olmoe-clip", t.OlmoeConfig(**{**SHAPE, "rms_norm_eps": 1e-5}, num_hidden_layers=2, num_experts=8,
                                           num_experts_per_tok=2, clip_qkv=0.6,
                                           tie_word_embeddings=False), t.OlmoeForCausalLM


def on_disk_fill(model, cls):
    """Fill the tensors as a checkpoint stores them (transformers v5 fuses MoE experts in memory
    and writes them back one by one): save, hash-fill the saved names in sorted order, reload."""
    import tempfile
    from safetensors.torch import load_file, save_file
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(Path(tmp).glob("*.safetensors"))
        stored = {}
        for f in files:
            stored.update(load_file(f))
            f.unlink()
        names = sorted(stored)
        filled = {n: torch.from_numpy(tensor_fill(i, n, stored[n].shape)) for i, n in enumerate(names)}
        save_file(filled, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        index = Path(tmp) / "model.safetensors.index.json"
        if index.exists():
            index.unlink()
        model = cls.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
    return model, names, {n: list(filled[n].shape) for n in names}


def reference_outputs(model, names, shapes, how):
    """The golden outputs.json of a tiny model: last logits after 5/70/150-token sequences and 12
    greedy tokens (with each step's top 5) after the 70-token one, plus its tensor names/shapes."""
    seqs = [[(s * 31 + i * 7 + 3) % 128 for i in range(n)] for s, n in enumerate([5, 70, 150])]
    out = {"reference": f"transformers {transformers.__version__}, torch {torch.__version__}, {how}",
           "names": names, "shapes": shapes, "sequences": []}
    with torch.no_grad():
        for ids in seqs:
            logits = model(torch.tensor([ids])).logits[0, -1].tolist()
            out["sequences"].append({"ids": ids, "last_logits": logits})
        prompt = torch.tensor([seqs[1]])
        gen = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                             pad_token_id=None, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
        top5 = [torch.topk(step[0], 5).indices.tolist() for step in gen.logits]
        out["greedy"] = {"prompt": seqs[1], "tokens": gen.sequences[0, len(seqs[1]):].tolist(),
                         "top5": top5}
    return out


def build(name, config, cls):
    config._attn_implementation = "eager"
    model = cls(config).to(torch.float32).eval()
    if (getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)) \
            and config.model_type != "gpt_oss":  # gpt-oss stores its experts stacked, as in memory
        model, names, shapes = on_disk_fill(model, cls)
    else:
        state = model.state_dict()
        names = sorted(state)
        for i, n in enumerate(names):
            state[n].copy_(torch.from_numpy(tensor_fill(i, n, state[n].shape)))
        model.load_state_dict(state)
        shapes = {n: list(state[n].shape) for n in names}
    out_dir = ROOT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    out = reference_outputs(model, names, shapes, "float32, eager")
    (out_dir / "outputs.json").write_text(json.dumps(out) + "\n")
    print(name, "written", file=sys.stderr)


def main():
    only = set(sys.argv[1:])
    for name, config, cls in families():
        if not only or name in only:
            build(name, config, cls)


if __name__ == "__main__":
    main()
