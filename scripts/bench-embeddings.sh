#!/usr/bin/env bash
# Embeddings side by side on this machine, one after the other (benches/RESULTS.md, issue 13):
#   1. spindle serve all-MiniLM-L6-v2; `spindle bench embeddings` with 16 clients x 32 sentences
#      (200 requests = 6400 sentences of a synthetic corpus), then single-sentence latency
#      (1 client x 1 sentence, 200 requests);
#   2. sentence-transformers (PyTorch, float32, 2 threads, batch 32) on the same corpus and
#      sentence count, then single-sentence encode() latency (scripts/bench-embeddings-st.py).
# Needs a venv with sentence-transformers (created outside the repo on first use). Results go to
# $OUT (default benches/out/embeddings-<date>/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${SPINDLE_CACHE:-$HOME/.cache/spindle}"
VENV="${SPINDLE_ST_VENV:-$CACHE/st-venv}"
OUT="${OUT:-$ROOT/benches/out/embeddings-$(date +%Y%m%d-%H%M%S)}"
PORT="${PORT:-8431}"
MODEL="$ROOT/models/all-minilm-l6-v2"
mkdir -p "$OUT"

scripts/fetch-minilm.sh
cargo build --release -p spindle
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check sentence-transformers
fi

NO_COLOR=1 target/release/spindle serve --model "$MODEL" --served-model-name minilm \
    --host 127.0.0.1 --port "$PORT" --data-dir "$OUT/data" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.5
done

BENCH=(target/release/spindle bench embeddings --base-url "http://127.0.0.1:$PORT" --model minilm)
"${BENCH[@]}" --concurrency 16 --batch-size 32 --num-requests 200 \
    --write-corpus "$OUT/corpus.txt" --save-result "$OUT/spindle-c16-b32.json" | tee "$OUT/spindle-c16-b32.txt"
"${BENCH[@]}" --concurrency 1 --batch-size 1 --num-requests 200 \
    --save-result "$OUT/spindle-c1-b1.json" | tee "$OUT/spindle-c1-b1.txt"
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT

"$VENV/bin/python" scripts/bench-embeddings-st.py --model "$MODEL" --corpus "$OUT/corpus.txt" \
    --sentences 6400 --batch-size 32 --threads 2 --single 200 | tee "$OUT/sentence-transformers.json"
echo "results in $OUT"
