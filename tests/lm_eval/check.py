#!/usr/bin/env python3
"""Compare lm-eval's logged samples with the HF transformers fp32 reference: every choice's
log-likelihood within 1e-3, the same greedy flags, and the same accuracy. Prints one
'N passed, N failed' line."""

import glob
import json
import sys

out_dir, golden_path = sys.argv[1], sys.argv[2]
golden = json.load(open(golden_path))
by_question = {d["question"]: d for d in golden["docs"]}
samples = []
for path in glob.glob(f"{out_dir}/**/samples_spindle_capitals_*.jsonl", recursive=True):
    samples += [json.loads(line) for line in open(path)]
results = [json.load(open(p)) for p in glob.glob(f"{out_dir}/**/results_*.json", recursive=True)]
passed = failed = 0
worst = 0.0
for s in samples:
    ref = by_question[s["doc"]["question"]]
    for i, resp in enumerate(s["resps"]):
        ll, greedy = resp[0]
        # The samples log may hold strings ("-1.5", "False").
        greedy = greedy if isinstance(greedy, bool) else str(greedy) == "True"
        want = ref["choices"][i]
        err = abs(float(ll) - want["loglikelihood"])
        worst = max(worst, err)
        if err <= 1e-3 and greedy == want["is_greedy"]:
            passed += 1
        else:
            failed += 1
            print(f"MISMATCH {s['doc']['question']} / {want['choice']}: {ll} {greedy} vs {want['loglikelihood']} {want['is_greedy']}")
if len(samples) != len(golden["docs"]):
    failed += 1
    print(f"MISMATCH: {len(samples)} samples, {len(golden['docs'])} questions")
acc = results[0]["results"]["spindle_capitals"]["acc,none"] if results else None
if acc is None or abs(acc - golden["acc"]) > 1e-9:
    failed += 1
    print(f"MISMATCH accuracy: {acc} vs {golden['acc']}")
else:
    passed += 1
print(f"lm-eval: accuracy {acc} (reference {golden['acc']}), worst log-likelihood error {worst:.2e}")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
