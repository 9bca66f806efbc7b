#!/usr/bin/env python3
"""The sentence-transformers side of the embeddings benchmark (benches/RESULTS.md).

Encodes a corpus (one sentence per line, e.g. written by `spindle bench embeddings
--write-corpus`) with sentence-transformers on the CPU, float32, `torch.set_num_threads(2)`,
batch 32, and reports sentences/s; then the latency of single-sentence `encode` calls (p50/p90/p99
over --single N sentences). Prints one JSON object. Run from scripts/bench-embeddings.sh.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402


def pct(values, p):
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--sentences", type=int, default=6400, help="sentences to encode (cycled)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single", type=int, default=200, help="single-sentence calls to time")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    with open(args.corpus, encoding="utf-8") as f:
        corpus = [line.strip() for line in f if line.strip()]
    texts = [corpus[i % len(corpus)] for i in range(args.sentences)]
    model = SentenceTransformer(args.model, device="cpu")
    model.float()
    model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    tok = model.tokenizer
    tokens = sum(len(tok(t, truncation=True, max_length=model.max_seq_length)["input_ids"]) for t in texts)

    start = time.perf_counter()
    model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    elapsed = time.perf_counter() - start

    lat = []
    for t in texts[: args.single]:
        s = time.perf_counter()
        model.encode([t], batch_size=1, convert_to_numpy=True)
        lat.append((time.perf_counter() - s) * 1e3)

    print(
        json.dumps(
            {
                "encoder": "sentence-transformers",
                "torch": torch.__version__,
                "threads": args.threads,
                "batch_size": args.batch_size,
                "sentences": len(texts),
                "tokens": tokens,
                "duration_s": elapsed,
                "sentences_per_s": len(texts) / elapsed,
                "tokens_per_s": tokens / elapsed,
                "single_latency_ms": {
                    "mean": statistics.fmean(lat),
                    "p50": pct(lat, 50),
                    "p90": pct(lat, 90),
                    "p99": pct(lat, 99),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
