#!/usr/bin/env python3
"""Generate golden reference outputs for spindle's model tests.

Loads the default GGUF model with Hugging Face transformers (dequantized to
float32, i.e. the same weights the Rust implementation uses), runs greedy
decoding for a fixed set of prompts and records, per step, the chosen token
and the top-k log-probabilities. It also records tokenizer round-trips and
chat-template renderings.

Run by hand (not in CI); the JSON it writes is committed under tests/golden/.
See scripts/golden/README.md.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

# Never touch the network: everything comes from the local GGUF file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import gguf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = REPO_ROOT / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / "tests" / "golden" / "smollm2-135m-instruct.json"


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------

LONG_RAW_PASSAGE = """\
The old lighthouse on the northern cape had not been lit for almost forty years when Marta Ellison bought it at auction for the price of a used car. Everyone in the village of Halvard's Reach told her it was a foolish purchase. The stone tower leaked in every storm, the keeper's cottage had lost half its roof, and the narrow road that led out to the point washed away at least twice each winter. Marta listened politely, thanked them for their advice, and signed the papers anyway.

She had spent most of her working life as a structural engineer in the city, designing parking garages and office towers that she never particularly loved. When her mother died and left her a modest inheritance, she decided that the next building she worked on would be one she actually cared about. The lighthouse, with its spiral staircase of one hundred and twelve iron steps and its lantern room glazed with thick, salt-clouded panes, seemed like exactly the right kind of challenge.

The first winter was harder than she expected. Wind drove rain through gaps in the masonry that she had not even known were there, and more than once she woke in the middle of the night to the sound of slate tiles sliding off the cottage roof and shattering on the rocks below. She kept a notebook in which she recorded every leak, every crack, and every draft, along with the date, the direction of the wind, and the approximate temperature. By March the notebook was nearly full, and she had begun to understand how the building breathed.

In the spring she started the real work. She repointed the lower courses of the tower with a lime mortar that she mixed herself, following a recipe she had found in a nineteenth-century manual on coastal construction. She replaced the rotten window frames in the cottage with oak, and she rebuilt the chimney from the roofline up. A retired carpenter named Tobias Grent, who had grown up in the village and remembered the last keeper, came out most afternoons to help. He worked slowly and talked constantly, mostly about the ships that had wrecked on the reef before the light was built, and about the keeper's daughter, who had apparently been the best swimmer on the whole coast.

By the end of the second summer the cottage was dry, warm, and almost comfortable. The tower still needed new glass in the lantern room and a great deal of patient work on the rusted gallery, but Marta no longer doubted that it could be done. On calm evenings she carried a mug of tea up the one hundred and twelve steps, sat with her back against the cold iron rail, and watched the fishing boats come home across the bay.
"""

LONG_CHAT_USER = """\
I am planning a three-day walking trip in a hilly region in early autumn and I would like some help organising it. Here is what I have so far.

Day one: we arrive by train around ten in the morning, leave our bags at the guesthouse, and walk a loop of about fourteen kilometres that climbs to a ridge with a view over two lakes. The path is marked but there is one steep section near the top that can be muddy after rain.

Day two: the longest day. We want to walk from the guesthouse to a village on the other side of the valley, roughly twenty-two kilometres with around nine hundred metres of total ascent. There is a small cafe halfway, but it is only open on weekends and our second day is a Tuesday. We will stay the night in the village and a taxi will bring our bags.

Day three: a short and easy walk of eight kilometres along the river back towards the station, with a train home at four in the afternoon.

There are four of us. Two are experienced hikers, one is reasonably fit but has a knee that sometimes hurts on long descents, and one has never done a multi-day walk before. We will each carry a day pack.

Could you tell me what I should pack for each person, how much water and food we should carry on the second day, and whether the order of the days makes sense or whether we should swap anything around? Please also suggest what to do if the weather turns bad on the second day.
"""

CHAT_CASES = [
    {
        "name": "chat_system_user_capital",
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    },
    {
        "name": "chat_user_only_explain",
        "messages": [
            {"role": "user", "content": "Explain why the sky is blue to a ten-year-old."},
        ],
    },
    {
        "name": "chat_multi_turn",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Give me a name for a small orange cat."},
            {"role": "assistant", "content": "How about \"Marmalade\"? It suits a small orange cat."},
            {"role": "user", "content": "Nice! Now suggest one for a big grey dog."},
        ],
    },
    {
        "name": "chat_coding_question",
        "messages": [
            {"role": "user", "content": "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces."},
        ],
    },
    {
        "name": "chat_cjk_emoji",
        "messages": [
            {"role": "user", "content": "你好！请问 \"谢谢\" 用英语怎么说？🙏 And what does こんにちは mean? 😊"},
        ],
    },
    {
        "name": "chat_long_trip_planning",
        "messages": [
            {"role": "system", "content": "You are a careful outdoor-travel assistant. Give practical, well organised advice."},
            {"role": "user", "content": LONG_CHAT_USER},
        ],
    },
]

RAW_CASES = [
    {"name": "raw_capital_france", "prompt_text": "The capital of France is"},
    {"name": "raw_code_fibonacci", "prompt_text": "def fibonacci(n):"},
    {"name": "raw_numbers_list", "prompt_text": "Here is a list of the first ten prime numbers:\n1. 2\n2. 3\n3. 5\n4."},
    {"name": "raw_emoji_cjk_accents", "prompt_text": "Café crème 🥐 au petit déjeuner, puis 東京で寿司 🍣 — naïve but délicieux! The next morning"},
    {"name": "raw_once_upon", "prompt_text": "Once upon a time, in a small village by the sea, there lived"},
    {"name": "raw_long_lighthouse", "prompt_text": LONG_RAW_PASSAGE},
]

TOKENIZER_STRINGS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "   three leading spaces and  two   gaps",
    "line one\nline two\n\nline four\r\nwindows line",
    "tab\tseparated\tvalues\t\t",
    "12345 3.14159 -42 1,000,000 2024-06-01",
    "I'm sure you don't think they'll say we've and she'd, OK?",
    "Wave 👋🏽 and rocket 🚀 and family 👨‍👩‍👧‍👦",
    "你好，世界",
    "日本語のテキスト、カタカナとひらがな。",
    "naïve café, Zürich, São Paulo, Ångström, façade",
    "def add(a, b):\n    if a:\n        return a + b\n    return b\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "plain <|endoftext|> in the middle and <repo_name> too",
    "See https://example.com/path/to?query=1&x=%20y#frag for details.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "",
    "\n",
    "MixedCASE camelCaseIdentifier snake_case_name SCREAMING_CASE",
    "Ünïcödé   \u00a0 non-breaking\u00a0space and zero\u200bwidth",
]

# Chat-template-only cases (rendering, no generation).
EXTRA_TEMPLATE_CASES = [
    {
        "messages": [{"role": "user", "content": "Hi, who are you?"}],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Ahoy, matey!"},
        ],
        "add_generation_prompt": False,
    },
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def render_chat(tok, messages, add_generation_prompt=True) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@torch.no_grad()
def greedy_with_logprobs(model, prompt_ids, steps, top):
    """Greedy decode `steps` tokens, recomputing the full sequence each step (no KV cache)."""
    ids = list(prompt_ids)
    chosen = []
    tops = []
    for _ in range(steps):
        input_ids = torch.tensor([ids], dtype=torch.long)
        logits = model(input_ids=input_ids, use_cache=False).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        vals, idx = torch.topk(logprobs, k=top)
        step = [{"id": int(i), "logprob": float(v)} for v, i in zip(vals.tolist(), idx.tolist())]
        step.sort(key=lambda e: e["logprob"], reverse=True)
        next_id = int(torch.argmax(logprobs).item())
        assert next_id == step[0]["id"] or step[0]["logprob"] == step[1]["logprob"]
        tops.append(step)
        chosen.append(next_id)
        ids.append(next_id)
    return chosen, tops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    gguf_path = args.gguf.resolve()
    model_dir, model_file = str(gguf_path.parent), gguf_path.name

    print(f"loading tokenizer + model from {gguf_path}", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype

    bos_id = tok.bos_token_id if tok.bos_token_id is not None else model.config.bos_token_id
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    eos_ids = sorted(set(eos if isinstance(eos, list) else [eos]))
    if tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
        eos_ids.append(tok.eos_token_id)

    # Does the tokenizer prepend BOS for raw text with add_special_tokens=True?
    probe = tok("probe").input_ids
    probe_plain = tok("probe", add_special_tokens=False).input_ids
    raw_bos_prepended = probe != probe_plain and bool(probe) and probe[0] == bos_id

    cases = []
    template_cases = []

    for c in CHAT_CASES:
        text = render_chat(tok, c["messages"], add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        cases.append({
            "name": c["name"], "kind": "chat", "messages": c["messages"],
            "add_special_tokens": False, "bos_prepended": False,
            "prompt_text": text, "prompt_ids": ids,
        })
        template_cases.append({"messages": c["messages"], "add_generation_prompt": True, "rendered": text})

    for c in RAW_CASES:
        text = c["prompt_text"]
        ids = tok(text).input_ids
        plain = tok(text, add_special_tokens=False).input_ids
        cases.append({
            "name": c["name"], "kind": "raw", "messages": None,
            "add_special_tokens": True, "bos_prepended": ids != plain and ids[:1] == [bos_id],
            "prompt_text": text, "prompt_ids": ids,
        })

    for c in EXTRA_TEMPLATE_CASES:
        template_cases.append({
            "messages": c["messages"], "add_generation_prompt": c["add_generation_prompt"],
            "rendered": render_chat(tok, c["messages"], add_generation_prompt=c["add_generation_prompt"]),
        })

    for case in cases:
        print(f"[{case['name']}] {len(case['prompt_ids'])} prompt tokens ...", file=sys.stderr, flush=True)
        greedy, tops = greedy_with_logprobs(model, case["prompt_ids"], args.steps, args.top)
        case["greedy_ids"] = greedy
        case["greedy_text"] = tok.decode(greedy, skip_special_tokens=False)
        case["top_logprobs"] = tops

    tokenizer_cases = []
    for s in TOKENIZER_STRINGS:
        ids = tok(s, add_special_tokens=False).input_ids
        tokenizer_cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})

    out = {
        "model_file": model_file,
        "model_sha256": sha256_file(gguf_path),
        "generator": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "dtype": "float32",
            "script": "scripts/golden/make_golden.py",
        },
        "bos_token_id": bos_id,
        "eos_token_ids": eos_ids,
        "steps": args.steps,
        "top": args.top,
        "notes": {
            "raw_bos_prepended": raw_bos_prepended,
            "decoding": "greedy argmax over log_softmax of fp32 logits; full-sequence forward each step "
                        "(no KV cache); never stops at EOS, always exactly `steps` tokens",
            "chat_prompts": "apply_chat_template(tokenize=False, add_generation_prompt=True), then "
                            "tokenized with add_special_tokens=False (special-token text is parsed as special tokens)",
            "raw_prompts": "tokenized with HF default add_special_tokens=True",
            "tokenizer_cases": "ids from tokenizer(text, add_special_tokens=False); special-token text is "
                               "parsed into special ids; decoded with skip_special_tokens=False",
        },
        "cases": cases,
        "tokenizer_cases": tokenizer_cases,
        "chat_template_cases": template_cases,
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")

    # Summary for a human sanity check.
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    print(f"bos={bos_id} eos={eos_ids} raw_bos_prepended={raw_bos_prepended}")
    for case in cases:
        print(f"- {case['name']:<28} {case['kind']:<4} prompt_tokens={len(case['prompt_ids']):<4} "
              f"greedy={case['greedy_text']!r}")


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
