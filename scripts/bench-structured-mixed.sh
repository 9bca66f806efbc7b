#!/usr/bin/env bash
# Structured-output cost under load (benches/RESULTS.md, issue 12): 32 requests in flight as two
# `spindle bench serve` clients of 16 at once; in the "mixed" runs one client asks every request
# for a JSON schema. Prints each client's output tok/s and the total, plain and mixed, twice.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PORT=8441
NO_COLOR=1 target/release/spindle serve --host 127.0.0.1 --port $PORT --kv-cache-memory 1GiB --data-dir "$(mktemp -d)" > ${TMPDIR:-/tmp}/mixed-serve.log 2>&1 &
S=$!
trap 'kill $S; wait $S 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 0.5; done
SCHEMA='{"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": {"story": {"type": "string", "maxLength": 4000}}, "required": ["story"], "additionalProperties": false}}}}'
B=(target/release/spindle bench serve --base-url http://127.0.0.1:$PORT --endpoint completions --dataset random --random-input-len 64 --random-output-len 128 --num-prompts 64 --max-concurrency 16 --ignore-eos --temperature 0 --no-progress --num-warmups 2)
for MODE in plain mixed plain mixed; do
  if [ $MODE = mixed ]; then EXTRA=(--extra-body "$SCHEMA"); else EXTRA=(); fi
  "${B[@]}" --seed 1 "${EXTRA[@]}" > ${TMPDIR:-/tmp}/mixed-a.txt 2>&1 &
  A=$!
  "${B[@]}" --seed 2 > ${TMPDIR:-/tmp}/mixed-b.txt 2>&1
  wait $A
  a=$(grep -i "output token throughput" ${TMPDIR:-/tmp}/mixed-a.txt | grep -oE "[0-9]+\.[0-9]+" | head -1)
  b=$(grep -i "output token throughput" ${TMPDIR:-/tmp}/mixed-b.txt | grep -oE "[0-9]+\.[0-9]+" | head -1)
  echo "$MODE: client A $a tok/s, client B $b tok/s, total $(python3 -c "print(round($a+$b,1))")"
done
