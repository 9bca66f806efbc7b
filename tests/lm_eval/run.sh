#!/usr/bin/env bash
# lm-eval's log-likelihood scoring against spindle: `lm_eval --model local-completions` runs the
# small local multiple-choice task tests/lm_eval/capitals.jsonl (made by make_task.py; no Hub)
# against `spindle serve --dtype float32` on the default model, tokenizing through the server
# (/tokenizer_info, /tokenize), and check.py compares every choice's log-likelihood with HF
# transformers fp32 (tests/golden/lm-eval-capitals.json, within 1e-3) and the accuracy.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$ROOT/scripts/lib/test-env.sh"
CACHE="${SPINDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spindle}"
VENV="${SPINDLE_LM_EVAL_VENV:-$CACHE/lm-eval-venv}"
mkdir -p "$CACHE"
ensure_venv "$VENV" "$ROOT/tests/lm_eval/requirements.txt"
BIN="$(spindle_binary)"
WORK="$(mktemp -d)"
PORT="$(free_ports 1)"
LOG="$WORK/server.log"
"$BIN" serve --model "$ROOT/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --served-model-name smollm2 --host 127.0.0.1 --port "$PORT" --dtype float32 \
    --max-model-len 512 --kv-cache-memory 64MiB --data-dir "$WORK/data" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.2
done
python3 "$ROOT/tests/lm_eval/make_task.py"
sed "s|@DATA@|$ROOT/tests/lm_eval/capitals.jsonl|" "$ROOT/tests/lm_eval/spindle_capitals.yaml.in" \
    > "$WORK/spindle_capitals.yaml"
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$VENV/bin/lm_eval" --model local-completions \
    --model_args "model=smollm2,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=remote,num_concurrent=4,max_retries=1" \
    --tasks spindle_capitals --include_path "$WORK" --log_samples --output_path "$WORK/out" \
    >"$WORK/lm_eval.log" 2>&1 || { tail -40 "$WORK/lm_eval.log"; exit 1; }
"$VENV/bin/python" "$ROOT/tests/lm_eval/check.py" "$WORK/out" "$ROOT/tests/golden/lm-eval-capitals.json"
