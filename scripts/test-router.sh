#!/usr/bin/env bash
# spindle behind vLLM's router (vllm-router from PyPI) on loopback: prefix-cache hit rates of
# round_robin, cache_aware and kv_aware (KV events) against one replica's, and a replica
# SIGKILLed under load (tests/router/router_e2e.py --check). Writes results to $OUT
# (default: a temporary directory).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${SPINDLE_ROUTER_VENV:-$HOME/.cache/spindle/router-venv}"
REQS="$ROOT/tests/router/requirements.txt"
log() { echo "test-router: $*" >&2; }

. "$ROOT/scripts/lib/test-env.sh"
BIN="$(spindle_binary)"
ensure_venv "$VENV" "$REQS"
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/spindle-router.XXXXXX")}"
log "results and logs in $OUT"
"$VENV/bin/python" tests/router/router_e2e.py --spindle "$BIN" --router "$VENV/bin/vllm-router" --out "$OUT" --check "$@"
