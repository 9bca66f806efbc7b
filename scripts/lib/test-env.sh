# Sourced by the test scripts (after ROOT is set).

# ensure_venv VENV REQUIREMENTS: create (or refresh, when the pinned requirements changed) a
# Python venv outside the repo.
ensure_venv() {
    local venv="$1" reqs="$2"
    if [ ! -x "$venv/bin/python" ] || ! cmp -s "$reqs" "$venv/.requirements"; then
        echo "creating $venv" >&2
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
        cp "$reqs" "$venv/.requirements"
    fi
}

# spindle_binary: fetch the default model, then print the spindle binary to test ($SPINDLE_BIN,
# or a fresh release build).
spindle_binary() {
    "$ROOT/scripts/fetch-model.sh" >/dev/null
    if [ -n "${SPINDLE_BIN:-}" ]; then
        echo "$SPINDLE_BIN"
    else
        (cd "$ROOT" && cargo build --release -p spindle >/dev/null)
        echo "$ROOT/target/release/spindle"
    fi
}

# free_ports N: N distinct free TCP ports on 127.0.0.1 (held open together while picking them).
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
PY
}
