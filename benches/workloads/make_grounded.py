#!/usr/bin/env python3
"""A grounded workload for speculative decoding (issue 23): chat requests that ask the model to
repeat a ~300-token Python module with one small change (a rename), as code-editing assistants
do. Every module differs (names, constants, order), so no two prompts share more than the
instruction. Writes `spindle bench --dataset jsonl` lines: {"prompt", "output_len"}.

Usage: make_grounded.py OUT.jsonl [NUM_PROMPTS=8] [OUTPUT_LEN=256] [SEED=0]
"""
import json
import random
import sys

NOUNS = ["order", "invoice", "sensor", "ticket", "packet", "record", "account", "reading",
         "shipment", "booking", "sample", "message", "report", "session", "payment", "batch"]
VERBS = ["load", "parse", "validate", "merge", "summarize", "filter", "normalize", "export",
         "score", "group", "count", "format"]
FIELDS = ["name", "amount", "created_at", "status", "owner", "weight", "priority", "region",
          "label", "quantity", "price", "source"]


def function(rng, noun, verb):
    a, b, c = rng.sample(FIELDS, 3)
    limit = rng.randint(2, 99)
    return f'''def {verb}_{noun}s(items, limit={limit}):
    """{verb.capitalize()} a list of {noun}s and return at most `limit` of them."""
    result = []
    for item in items:
        if item.get("{a}") is None:
            continue
        value = item["{a}"]
        if isinstance(value, str):
            value = value.strip().lower()
        entry = {{"{a}": value, "{b}": item.get("{b}", 0), "{c}": item.get("{c}", "")}}
        result.append(entry)
        if len(result) >= limit:
            break
    return sorted(result, key=lambda e: e["{b}"])
'''


def module(rng):
    noun = rng.choice(NOUNS)
    verbs = rng.sample(VERBS, 3)
    body = "\n\n".join(function(rng, noun, v) for v in verbs)
    header = f'"""Helpers for {noun} records."""\n\nimport json\n\nVERSION = "{rng.randint(1, 9)}.{rng.randint(0, 20)}"\n\n\n'
    old = f"{verbs[1]}_{noun}s"
    new = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}_list"
    return header + body, old, new


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    output_len = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 0)
    with open(out, "w") as f:
        for _ in range(n):
            code, old, new = module(rng)
            prompt = (f"Here is a Python module:\n\n```python\n{code}```\n\n"
                      f"Rename the function `{old}` to `{new}` and output the complete updated "
                      f"module in one code block, with no explanation.")
            f.write(json.dumps({"prompt": prompt, "output_len": output_len}) + "\n")


if __name__ == "__main__":
    main()
