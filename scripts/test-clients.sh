#!/usr/bin/env bash
# Run the OpenAI-SDK client suite (tests/clients) against the real `spindle serve`.
#
# Installs the pinned Python packages of tests/clients/requirements.txt into a venv outside the
# repository, fetches the default model and builds target/release/spindle (cargo skips the build
# when it is up to date), starts three servers on free ports of 127.0.0.1 -- one open, one with
# --api-key for the authentication tests, one serving the embedding model (scripts/fetch-minilm.sh)
# -- waits for GET /health, runs pytest, and always stops
# the servers. Exits with pytest's status ("no tests collected" counts as a failure).
#
# Arguments are passed to pytest, e.g. `scripts/test-clients.sh -k stream -x`.
#
# Environment:
#   SPINDLE_CACHE                  cache root (default ~/.cache/spindle)
#   SPINDLE_CLIENTS_VENV           the venv (default $SPINDLE_CACHE/clients-venv)
#   SPINDLE_BIN                    use this spindle binary instead of building one
#   SPINDLE_CLIENTS_HEALTH_TIMEOUT seconds to wait for the servers' /health (default 120)
#   PYTHON                         interpreter that creates the venv (default python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CACHE="${SPINDLE_CACHE:-$HOME/.cache/spindle}"
VENV="${SPINDLE_CLIENTS_VENV:-$CACHE/clients-venv}"
PYTHON="${PYTHON:-python3}"
REQS="$ROOT/tests/clients/requirements.txt"
MODEL_FILE="$ROOT/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME="smol"
MAX_MODEL_LEN=2048
HEALTH_TIMEOUT="${SPINDLE_CLIENTS_HEALTH_TIMEOUT:-120}"

log() { echo "test-clients: $*" >&2; }
START=$SECONDS

# --- Python environment ------------------------------------------------------------------------
# The venv is rebuilt when the requirements or the interpreter change.
PY_VERSION="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
WANT_STAMP="$(sha256sum "$REQS" | cut -d' ' -f1) python-$PY_VERSION"
STAMP_FILE="$VENV/.spindle-requirements"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP_FILE" 2>/dev/null)" != "$WANT_STAMP" ]; then
    log "creating venv $VENV (python $PY_VERSION)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! "$PYTHON" -m venv "$VENV"; then
        log "could not create a venv with $PYTHON (on Debian/Ubuntu: apt-get install python3-venv)"
        exit 1
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    echo "$WANT_STAMP" >"$STAMP_FILE"
fi
VPY="$VENV/bin/python"

# --- Model and binary --------------------------------------------------------------------------
scripts/fetch-model.sh
scripts/fetch-minilm.sh
EMBED_MODEL_DIR="$ROOT/models/all-minilm-l6-v2"
EMBED_NAME="minilm"
if [ -n "${SPINDLE_BIN:-}" ]; then
    BIN="$SPINDLE_BIN"
else
    cargo build --release -p spindle
    BIN="$ROOT/target/release/spindle"
fi
[ -x "$BIN" ] || { log "no spindle binary at $BIN"; exit 1; }

# --- Servers -----------------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/spindle-clients.XXXXXX")"
PIDS=()
NAMES=()

stop_servers() {
    local i pid
    for i in "${!PIDS[@]}"; do
        pid="${PIDS[$i]}"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for i in "${!PIDS[@]}"; do
        pid="${PIDS[$i]}"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "${NAMES[$i]} server (pid $pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

dump_logs() {
    local lines="$1" i
    for i in "${!NAMES[@]}"; do
        log "---- last $lines lines of the ${NAMES[$i]} server log ----"
        tail -n "$lines" "$WORK/${NAMES[$i]}.log" >&2 || true
    done
}

cleanup() {
    local status=$?
    stop_servers
    rm -rf "$WORK"
    exit "$status"
}
PYTEST_PID=""
on_signal() {
    # Interrupted: stop pytest (it runs in the background so that this trap runs at once).
    log "interrupted: stopping pytest and the servers"
    [ -z "$PYTEST_PID" ] || kill -TERM "$PYTEST_PID" 2>/dev/null || true
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

. "$ROOT/scripts/lib/test-env.sh"
read -r PORT AUTH_PORT EMBED_PORT < <(free_ports 3)
API_KEY="clients-key-$RANDOM$RANDOM"

# name port [serve flags...]
start_server() {
    local name="$1" port="$2"
    shift 2
    # The open servers must not pick up a key from the caller's environment.
    env -u SPINDLE_API_KEY -u VLLM_API_KEY NO_COLOR=1 "$BIN" serve \
        --host 127.0.0.1 --port "$port" \
        --shutdown-timeout 5 --data-dir "$WORK/$name-data" \
        "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
    log "started $name server on 127.0.0.1:$port (pid $!)"
}

GEN_FLAGS=(--model "$MODEL_FILE" --served-model-name "$SERVED_NAME" --max-model-len "$MAX_MODEL_LEN")
start_server main "$PORT" "${GEN_FLAGS[@]}" --kv-cache-memory 512MiB
start_server auth "$AUTH_PORT" "${GEN_FLAGS[@]}" --kv-cache-memory 128MiB --api-key "$API_KEY"
start_server embed "$EMBED_PORT" --model "$EMBED_MODEL_DIR" --served-model-name "$EMBED_NAME"

# Wait until every server answers GET /health with 200.
http_status() {
    "$VPY" - "$1" <<'PY' 2>/dev/null || echo 000
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}
PORTS=("$PORT" "$AUTH_PORT" "$EMBED_PORT")
deadline=$((SECONDS + HEALTH_TIMEOUT))
for i in "${!PIDS[@]}"; do
    while :; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            log "the ${NAMES[$i]} server exited during startup"
            dump_logs 200
            exit 1
        fi
        [ "$(http_status "http://127.0.0.1:${PORTS[$i]}/health")" = 200 ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "the ${NAMES[$i]} server was not healthy within ${HEALTH_TIMEOUT}s"
            dump_logs 200
            exit 1
        fi
        sleep 0.5
    done
done
log "servers healthy after $((SECONDS - START))s"

# --- Tests -------------------------------------------------------------------------------------
(
    cd "$ROOT/tests/clients"
    exec env \
        SPINDLE_BASE_URL="http://127.0.0.1:$PORT" \
        SPINDLE_MODEL_NAME="$SERVED_NAME" \
        SPINDLE_MAX_MODEL_LEN="$MAX_MODEL_LEN" \
        SPINDLE_AUTH_BASE_URL="http://127.0.0.1:$AUTH_PORT" \
        SPINDLE_AUTH_API_KEY="$API_KEY" \
        SPINDLE_EMBED_BASE_URL="http://127.0.0.1:$EMBED_PORT" \
        SPINDLE_EMBED_MODEL_NAME="$EMBED_NAME" \
        SPINDLE_EMBED_REFERENCE="$ROOT/tests/golden/all-minilm-l6-v2.json" \
        PYTHONDONTWRITEBYTECODE=1 \
        "$VPY" -m pytest "$@"
) &
PYTEST_PID=$!
status=0
wait "$PYTEST_PID" || status=$?
PYTEST_PID=""

if [ "$status" -eq 5 ]; then
    log "pytest collected no tests: treating that as a failure"
    status=1
fi
for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        log "the ${NAMES[$i]} server died during the tests"
        [ "$status" -ne 0 ] || status=1
    fi
done
if [ "$status" -ne 0 ]; then
    dump_logs 60
fi
log "done in $((SECONDS - START))s (pytest status $status)"
exit "$status"
