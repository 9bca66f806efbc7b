#!/usr/bin/env python3
"""Issue 16's batch-job benchmark against a running `spindle serve` (stdlib only).

1. interactive alone: `spindle bench serve`, concurrency 4 (TTFT / TPOT p50);
2. the batch's requests sent directly at concurrency 64 (`spindle bench serve`, output tok/s);
3. the same requests as one batch job with the server otherwise idle (output tok/s, from
   creation to `completed`, tokens counted from the output file);
4. interactive again (concurrency 4) while a second copy of the batch job runs; the batch must
   still be in progress when the interactive run ends, then it is waited for.

Writes results.json and summary.md to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

WORDS = (
    "river mountain quiet engine paper garden window silver morning story music bridge "
    "coffee planet forest market winter signal harbor lantern circle meadow thunder castle "
    "rocket valley candle mirror orchard pencil island shadow button voyage ladder"
).split()


def prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"[{seed}-{i}] " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def http(base: str, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
    req = urllib.request.Request(base + path, data=body, method=method, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()


def upload(base: str, content: bytes) -> str:
    boundary = "bench-batch-boundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    out = json.loads(http(base, "POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}"))
    return out["id"]


def create_batch(base: str, file_id: str) -> str:
    body = json.dumps({"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"})
    return json.loads(http(base, "POST", "/v1/batches", body.encode()))["id"]


def batch(base: str, batch_id: str) -> dict:
    return json.loads(http(base, "GET", f"/v1/batches/{batch_id}"))


def wait_batch(base: str, batch_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        b = batch(base, batch_id)
        if b["status"] in ("completed", "failed", "cancelled", "expired"):
            return b
        if time.monotonic() > deadline:
            sys.exit(f"batch {batch_id} not done after {timeout}s: {b}")
        time.sleep(0.25)


def output_tokens(base: str, file_id: str) -> tuple[int, int]:
    text = http(base, "GET", f"/v1/files/{file_id}/content").decode()
    lines = [json.loads(l) for l in text.splitlines() if l.strip()]
    return len(lines), sum(l["response"]["body"]["usage"]["completion_tokens"] for l in lines)


def bench(spindle: str, base: str, dataset: Path, n: int, concurrency: int, out: Path, label: str) -> dict:
    cmd = [
        spindle, "bench", "serve", "--base-url", base, "--dataset", "jsonl", "--dataset-path", str(dataset),
        "--num-prompts", str(n), "--max-concurrency", str(concurrency), "--ignore-eos", "--no-progress",
        "--label", label, "--save-result", str(out),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--spindle", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--input-words", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--interactive-prompts", type=int, default=40)
    args = ap.parse_args()
    base = args.base_url.rstrip("/")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Every run gets its own prompts of the same shape (unique first words), so no run is
    # helped by the prefix cache another one filled.
    def dataset(name: str, n: int, seed: int) -> Path:
        path = out / f"{name}.jsonl"
        path.write_text("".join(
            json.dumps({"prompt": p, "output_len": args.output_len}) + "\n"
            for p in prompts(n, args.input_words, seed)
        ))
        return path

    def batch_input(seed: int) -> bytes:
        return "".join(
            json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": args.model, "prompt": p, "max_tokens": args.output_len, "ignore_eos": True}}) + "\n"
            for i, p in enumerate(prompts(args.lines, args.input_words, seed))
        ).encode()

    results: dict = {"lines": args.lines, "input_words": args.input_words, "output_len": args.output_len}
    ni = args.interactive_prompts
    print("0. warm-up", flush=True)
    bench(args.spindle, base, dataset("warmup", 8, 9), 8, 4, out / "warmup.json", "warmup")
    print("1. interactive alone, concurrency 4", flush=True)
    alone = bench(args.spindle, base, dataset("interactive-alone", ni, 2), ni, 4, out / "interactive-alone.json", "alone")
    print("2. the batch's requests sent directly, concurrency 64", flush=True)
    direct = bench(args.spindle, base, dataset("direct", args.lines, 1), args.lines, 64, out / "direct-c64.json", "direct-c64")

    print("3. the batch job alone", flush=True)
    file_id = upload(base, batch_input(3))
    t0 = time.monotonic()
    b = wait_batch(base, create_batch(base, file_id), timeout=3600)
    batch_seconds = time.monotonic() - t0
    assert b["status"] == "completed", b
    n_lines, n_tokens = output_tokens(base, b["output_file_id"])
    assert n_lines == args.lines, (n_lines, b)

    print("4. interactive (concurrency 4) while the batch job runs", flush=True)
    busy_id = create_batch(base, upload(base, batch_input(4)))
    while batch(base, busy_id)["request_counts"]["completed"] < 64:
        time.sleep(0.25)
    t1 = time.monotonic()
    during = bench(args.spindle, base, dataset("interactive-during", ni, 5), ni, 4, out / "interactive-during-batch.json", "during-batch")
    mid = batch(base, busy_id)
    assert mid["status"] == "in_progress", f"the batch ended before the interactive run did: {mid}"
    done = wait_batch(base, busy_id, timeout=3600)
    busy_seconds = time.monotonic() - t1
    assert done["status"] == "completed", done

    def p50(r: dict, metric: str) -> float:
        return r[metric]["median"]

    results.update({
        "interactive_alone": {"ttft_p50_ms": p50(alone, "ttft_ms"), "tpot_p50_ms": p50(alone, "tpot_ms"),
                              "output_tok_s": alone["output_throughput"]},
        "interactive_during_batch": {"ttft_p50_ms": p50(during, "ttft_ms"), "tpot_p50_ms": p50(during, "tpot_ms"),
                                     "output_tok_s": during["output_throughput"],
                                     "batch_lines_done_during_run": mid["request_counts"]["completed"] - 64},
        "direct_c64": {"output_tok_s": direct["output_throughput"], "seconds": direct["duration_s"],
                       "failed": direct["failed"]},
        "batch_alone": {"output_tok_s": n_tokens / batch_seconds, "seconds": batch_seconds, "lines": n_lines,
                        "output_tokens": n_tokens},
        "batch_with_interactive": {"seconds_from_interactive_start": busy_seconds,
                                   "counts": done["request_counts"]},
    })
    r = results
    ratios = {
        "ttft_p50": r["interactive_during_batch"]["ttft_p50_ms"] / r["interactive_alone"]["ttft_p50_ms"],
        "tpot_p50": r["interactive_during_batch"]["tpot_p50_ms"] / r["interactive_alone"]["tpot_p50_ms"],
        "batch_vs_direct": r["batch_alone"]["output_tok_s"] / r["direct_c64"]["output_tok_s"],
    }
    results["ratios"] = ratios
    (out / "results.json").write_text(json.dumps(results, indent=2))
    summary = f"""| measurement | value |
|---|---|
| interactive alone, c=4: TTFT p50 / TPOT p50 | {r['interactive_alone']['ttft_p50_ms']:.1f} ms / {r['interactive_alone']['tpot_p50_ms']:.1f} ms |
| interactive during the batch, c=4: TTFT p50 / TPOT p50 | {r['interactive_during_batch']['ttft_p50_ms']:.1f} ms / {r['interactive_during_batch']['tpot_p50_ms']:.1f} ms |
| ratio during / alone (goal ≤ 1.5) | TTFT {ratios['ttft_p50']:.2f}x, TPOT {ratios['tpot_p50']:.2f}x |
| batch lines finished during the interactive run | {r['interactive_during_batch']['batch_lines_done_during_run']} |
| direct, c=64: output tok/s | {r['direct_c64']['output_tok_s']:.1f} ({r['direct_c64']['seconds']:.1f} s) |
| batch job alone: output tok/s | {r['batch_alone']['output_tok_s']:.1f} ({r['batch_alone']['seconds']:.1f} s, {r['batch_alone']['lines']} lines) |
| batch / direct (goal ≥ 0.90) | {ratios['batch_vs_direct']:.2f} |
| batch job with the interactive run, all lines completed | {done['request_counts']} |
"""
    (out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
