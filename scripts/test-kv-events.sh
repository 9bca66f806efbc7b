#!/usr/bin/env bash
# KV-cache events against real consumers: start `spindle serve` (default model, 24 KV blocks so
# that evictions happen) with vLLM's --kv-events-config and PYTHONHASHSEED, then run
# tests/kv_events with pyzmq / msgpack / msgspec / cbor2 from a venv outside the repo.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${SPINDLE_KV_VENV:-$HOME/.cache/spindle/kv-events-venv}"
REQS="$ROOT/tests/kv_events/requirements.txt"
log() { echo "test-kv-events: $*" >&2; }

. "$ROOT/scripts/lib/test-env.sh"
BIN="$(spindle_binary)"
ensure_venv "$VENV" "$REQS"
read -r PORT PUB REPLAY < <(free_ports 3)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/spindle-kv-events.XXXXXX")"
CONFIG="{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://*:$PUB\", \"replay_endpoint\": \"tcp://*:$REPLAY\", \"topic\": \"kv-events\"}"
PYTHONHASHSEED=42 NO_COLOR=1 "$BIN" serve --host 127.0.0.1 --port "$PORT" --served-model-name smol \
    --max-model-len 256 --num-gpu-blocks-override 24 --data-dir "$WORK/data" \
    --kv-events-config "$CONFIG" >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
healthy=no
for _ in $(seq 1 240); do
    if [ "$("$VENV/bin/python" -c "import urllib.request,sys
try: print(urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2).status)
except Exception: print(0)")" = 200 ]; then healthy=yes; break; fi
    kill -0 "$SERVER" 2>/dev/null || { log "server exited"; tail -30 "$WORK/server.log"; exit 1; }
    sleep 0.5
done
[ "$healthy" = yes ] || { log "the server was not healthy within 120 s"; tail -30 "$WORK/server.log"; exit 1; }
status=0
SPINDLE_BASE_URL="http://127.0.0.1:$PORT" SPINDLE_KV_PUB="tcp://127.0.0.1:$PUB" \
    SPINDLE_KV_REPLAY="tcp://127.0.0.1:$REPLAY" SPINDLE_KV_TOPIC=kv-events SPINDLE_KV_SEED=42 \
    PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/kv_events "$@" || status=$?
[ "$status" = 0 ] || { tail -30 "$WORK/server.log"; exit "$status"; }

# vLLM's connect form: a replica whose indexer (a SUB that binds) starts 60 s after it, then
# restarts. The server must start, stay healthy and publish once the indexer is there.
read -r PORT2 SUBPORT < <(free_ports 2)
CONNECT="{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://127.0.0.1:$SUBPORT\", \"topic\": \"kv-events\"}"
NO_COLOR=1 "$BIN" serve --host 127.0.0.1 --port "$PORT2" --served-model-name smol \
    --max-model-len 256 --num-gpu-blocks-override 24 --data-dir "$WORK/data2" \
    --kv-events-config "$CONNECT" >"$WORK/server2.log" 2>&1 &
SERVER2=$!
trap 'kill $SERVER $SERVER2 2>/dev/null || true; wait $SERVER $SERVER2 2>/dev/null || true; rm -rf "$WORK"' EXIT
health2() { "$VENV/bin/python" -c "import urllib.request
try: print(urllib.request.urlopen('http://127.0.0.1:$PORT2/health', timeout=2).status)
except Exception: print(0)"; }
for _ in $(seq 1 240); do
    [ "$(health2)" = 200 ] && break
    kill -0 "$SERVER2" 2>/dev/null || { log "connect-mode server exited"; tail -30 "$WORK/server2.log"; exit 1; }
    sleep 0.5
done
log "connect form: waiting 60 s with no subscriber listening"
sleep 60
kill -0 "$SERVER2" 2>/dev/null || { log "connect-mode server died without a subscriber"; tail -30 "$WORK/server2.log"; exit 1; }
[ "$(health2)" = 200 ] || { log "connect-mode server unhealthy"; tail -30 "$WORK/server2.log"; exit 1; }
SPINDLE_BASE_URL="http://127.0.0.1:$PORT2" SPINDLE_KV_BIND="tcp://127.0.0.1:$SUBPORT" \
    "$VENV/bin/python" "$ROOT/tests/kv_events/connect_check.py" || { tail -30 "$WORK/server2.log"; exit 1; }
