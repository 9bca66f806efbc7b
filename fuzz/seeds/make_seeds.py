#!/usr/bin/env python3
"""Write the fuzz seed corpora in fuzz/seeds/<target>/: small valid GGUF files (the fuzzer
rarely invents the format on its own) and typical request bodies. Run from anywhere; the
outputs are committed, so this only needs re-running when the seeds change."""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(kind, v):
    if kind == STRING:
        return gguf_string(v)
    if kind == ARRAY:
        item_kind, items = v
        out = struct.pack("<IQ", item_kind, len(items))
        return out + b"".join(gguf_value(item_kind, i) for i in items)
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}[kind]
    return struct.pack(fmt, v)


def gguf(metadata, tensors, alignment=32):
    """metadata: list of (key, kind, value); tensors: list of (name, dims, ggml_type, nbytes)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, kind, value in metadata:
        out += gguf_string(key) + struct.pack("<I", kind) + gguf_value(kind, value)
    offset = 0
    for name, dims, ggml_type, nbytes in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
        offset += (nbytes + alignment - 1) // alignment * alignment
    if alignment:
        out += b"\0" * ((-len(out)) % alignment)
    return out + b"\0" * offset


def llama_metadata(tokenizer_model, extra=()):
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "<|im_start|>", "<|im_end|>"]
    md = [
        ("general.architecture", STRING, "llama"),
        ("general.alignment", U32, 32),
        ("llama.embedding_length", U32, 8),
        ("llama.feed_forward_length", U32, 16),
        ("llama.block_count", U32, 1),
        ("llama.attention.head_count", U32, 2),
        ("llama.attention.head_count_kv", U32, 1),
        ("llama.context_length", U32, 64),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.vocab_size", U32, len(tokens)),
        ("tokenizer.ggml.model", STRING, tokenizer_model),
        ("tokenizer.ggml.pre", STRING, "smollm"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.scores", ARRAY, (F32, [0.0] * len(tokens))),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [2, 3, 3, 1, 1, 1, 1, 1, 3, 3])),
        ("tokenizer.ggml.merges", ARRAY, (STRING, ["a b", "Ġ a"])),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.add_bos_token", BOOL, False),
        ("tokenizer.chat_template", STRING,
         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"),
    ]
    return md + list(extra)


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    tensors = [("token_embd.weight", [8, 10], 0, 8 * 10 * 4), ("output_norm.weight", [8], 0, 32)]
    write("gguf_header", "llama-gpt2.gguf", gguf(llama_metadata("gpt2"), tensors))
    write("gguf_header", "llama-spm.gguf", gguf(llama_metadata("llama"), tensors))
    write("gguf_header", "qwen2.gguf", gguf(
        [(k.replace("llama", "qwen2", 1) if k.startswith("llama.") else k, kind, ("qwen2" if v == "llama" else v))
         for k, kind, v in llama_metadata("gpt2")], tensors))
    write("gguf_header", "no-tensors.gguf", gguf(llama_metadata("gpt2"), []))
    write("gguf_header", "empty.gguf", gguf([], []))

    bodies = [
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0.7,
         "top_p": 0.9, "top_k": 40, "stop": ["\n"], "stream": True, "stream_options": {"include_usage": True}},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}],
         "n": 2, "seed": 1, "logprobs": True, "top_logprobs": 3, "logit_bias": {"5": 1.5},
         "stop_token_ids": [2], "min_tokens": 1, "max_completion_tokens": 4, "repetition_penalty": 1.1},
        {"prompt": "Once upon a time", "max_tokens": 16, "logprobs": 2, "echo": False, "best_of": 1},
        {"prompt": [[1, 2, 3], [4, 5]], "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.5},
        {"prompt": ["a", "b"], "ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True},
        {"tokens": [1, 2, 3]},
    ]
    for i, b in enumerate(bodies):
        write("request_validation", f"body-{i}.json", json.dumps(b).encode())
    texts = ["Hello, world!", "<|im_start|>user\nHi<|im_end|>", "naïve café 😀 日本語", "  spaces\t\ttabs\n\n",
             "def f(x):\n    return x ** 2\n", "\u00e9\u0301 combining"]
    for i, t in enumerate(texts):
        write("tokenizer", f"text-{i}.txt", t.encode())


if __name__ == "__main__":
    main()
