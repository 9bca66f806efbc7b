#!/usr/bin/env python3
"""Write the small local multiple-choice task for the lm-eval test (tests/lm_eval/capitals.jsonl)
and, with --golden, its reference log-likelihoods from HF transformers fp32 on the default model
(tests/golden/lm-eval-capitals.json).

The questions are made here (no Hub, no data set download). Tokenization follows lm-eval's
`_encode_pair`: trailing spaces of the context move to the continuation, the continuation's
tokens are the tail of encode(context + continuation) after encode(context), no special tokens.
Run --golden by hand with the pinned environment of scripts/golden (torch, transformers, gguf);
its output is committed.
"""

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "tests" / "lm_eval" / "capitals.jsonl"
GOLDEN = ROOT / "tests" / "golden" / "lm-eval-capitals.json"
GGUF = ROOT / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Greece", "Athens"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
    ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Argentina", "Buenos Aires"),
    ("Thailand", "Bangkok"), ("Turkey", "Ankara"), ("Australia", "Canberra"), ("Cuba", "Havana"),
    ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Chile", "Santiago"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("Mexico", "Mexico City"),
]


def make_task():
    docs = []
    n = len(CAPITALS)
    for i, (country, capital) in enumerate(CAPITALS):
        # Three wrong answers from other countries, the right one at a rotating place.
        wrong = [CAPITALS[(i + k) % n][1] for k in (3, 7, 11)]
        choices = wrong[:]
        answer = i % 4
        choices.insert(answer, capital)
        docs.append({"question": f"What is the capital of {country}?", "choices": choices, "answer": answer})
    TASK.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def context(doc):
    return f"Question: {doc['question']}\nAnswer:"


def golden(docs):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, torch_dtype=torch.float32)
    model.eval()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    out = []
    correct = 0
    for doc in docs:
        ctx = context(doc)
        scores = []
        for choice in doc["choices"]:
            cont = " " + choice
            c, k = ctx, cont
            n_spaces = len(c) - len(c.rstrip())
            if n_spaces:
                k = c[-n_spaces:] + k
                c = c[:-n_spaces]
            whole = enc(c + k)
            ctx_ids = enc(c)
            cont_ids = whole[len(ctx_ids):]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].double()
            lp = torch.log_softmax(logits, dim=-1)
            start = len(ctx_ids)
            ll = sum(lp[start - 1 + j, t].item() for j, t in enumerate(cont_ids))
            greedy = all(lp[start - 1 + j].argmax().item() == t for j, t in enumerate(cont_ids))
            scores.append({"choice": choice, "ids": whole, "context_len": start, "loglikelihood": ll, "is_greedy": greedy})
        best = max(range(len(scores)), key=lambda i: scores[i]["loglikelihood"])
        correct += best == doc["answer"]
        out.append({"question": doc["question"], "answer": doc["answer"], "choices": scores})
    import transformers
    GOLDEN.write_text(json.dumps({
        "model": str(GGUF.relative_to(ROOT)),
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32",
        "acc": correct / len(docs),
        "docs": out,
    }, indent=1) + "\n")
    print(f"acc {correct}/{len(docs)} -> {GOLDEN}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--golden", action="store_true")
    args = ap.parse_args()
    docs = make_task()
    if args.golden:
        golden(docs)
