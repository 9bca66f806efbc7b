#!/usr/bin/env bash
# Issue 16's benchmark: batch jobs next to interactive traffic on the default model.
#   interactive c=4 alone vs. while a 1000-line batch job runs (TTFT / TPOT p50);
#   the batch job alone vs. the same requests sent directly at c=64 (output tok/s).
# Usage: scripts/bench-batch.sh            (env: PORT, LINES, OUTPUT_LEN, SPINDLE_EXTRA_ARGS, OUT)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PORT="${PORT:-8311}"
OUT="${OUT:-$ROOT/benches/out/batch-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
log() { echo "bench-batch: $*" >&2; }

scripts/fetch-model.sh >/dev/null
cargo build --release -p spindle >/dev/null 2>&1
SPINDLE="$ROOT/target/release/spindle"
MODEL_NAME=smollm2

# shellcheck disable=SC2086
NO_COLOR=1 "$SPINDLE" serve --host 127.0.0.1 --port "$PORT" --served-model-name "$MODEL_NAME" \
    --data-dir "$OUT/data" ${SPINDLE_EXTRA_ARGS:-} >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { log "server exited"; tail -20 "$OUT/server.log"; exit 1; }
    sleep 0.5
done
log "server up (pid $SERVER); results in $OUT"
python3 scripts/bench_batch.py --base-url "http://127.0.0.1:$PORT" --spindle "$SPINDLE" \
    --model "$MODEL_NAME" --out "$OUT" --lines "${LINES:-1000}" --output-len "${OUTPUT_LEN:-64}"
log "commit $(git rev-parse --short HEAD); $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
