#!/usr/bin/env bash
# The one command to run on a GPU machine that has the NVIDIA driver but no Rust toolchain and no
# network. It uses the bundle made beforehand by scripts/build-gpu-bundle.sh on any Linux x86-64
# machine (no GPU needed there) and:
#   1. finds the CUDA 13 libraries the binaries need (driver's libcuda, cuBLAS, cuRAND, cudart:
#      from the system, a CUDA toolkit, or a Python environment's nvidia-* wheels);
#   2. runs the kernel tests (every kernel vs a float64 reference, tests/cuda_kernels);
#   3. runs the CPU-vs-CUDA comparison (attention backend, greedy decoding; tests/cuda_attention);
#   4. benchmarks `spindle serve` with dummy weights of the Llama-3.1-8B shape: random 1024-token
#      prompts, 128 output tokens, concurrency 1 and 256, through `spindle bench serve`;
#   5. prints a short table. Logs and JSON results go to $OUT_DIR (default: <bundle>/results).
# On a GPU machine a skipped test counts as a failure.
#
# Usage: gpu-check.sh [--tests-only | --bench-only] [BUNDLE_DIR]
#   BUNDLE_DIR defaults to the folder holding this script when it is the bundle's copy, else to
#   target/gpu-bundle of the repository it sits in. The xz-compressed binaries are unpacked into
#   $SPINDLE_UNPACK_DIR (default /tmp/spindle-gpu-bundle-<id>) and checked against the MANIFEST.
# Environment: SPINDLE_BENCH_PROMPTS_C1 (default 8), SPINDLE_BENCH_PROMPTS_C256 (default 256),
#   SPINDLE_BENCH_PORT (default 8765), SPINDLE_SERVER_START_TIMEOUT (seconds, default 900).
set -uo pipefail

MODE=all
BUNDLE=""
for arg in "$@"; do
    case "$arg" in
        --tests-only) MODE=tests ;;
        --bench-only) MODE=bench ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) BUNDLE="$arg" ;;
    esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "$BUNDLE" ]; then
    if [ -e "$HERE/MANIFEST" ]; then BUNDLE="$HERE"; else BUNDLE="$HERE/../target/gpu-bundle"; fi
fi
BUNDLE="$(cd "$BUNDLE" 2>/dev/null && pwd)" || { echo "gpu-check: no bundle at ${BUNDLE}; build it with scripts/build-gpu-bundle.sh" >&2; exit 2; }
for f in bin/spindle.xz tests/cuda_kernels.xz tests/cuda_attention.xz models/configs/llama-3.1-8b.json MANIFEST; do
    [ -e "$BUNDLE/$f" ] || { echo "gpu-check: $BUNDLE/$f is missing; rebuild with scripts/build-gpu-bundle.sh" >&2; exit 2; }
done
OUT_DIR="${OUT_DIR:-$BUNDLE/results}"
mkdir -p "$OUT_DIR"
declare -A RESULT

say() { echo "gpu-check: $*"; }

# --- 0. unpack the xz-compressed binaries and verify them against the MANIFEST ----------------
# Outside the bundle, so the bundle stays small enough to copy again.
UNPACK="${SPINDLE_UNPACK_DIR:-${TMPDIR:-/tmp}/spindle-gpu-bundle-$(sha256sum "$BUNDLE/MANIFEST" | cut -c1-12)}"
mkdir -p "$UNPACK/bin" "$UNPACK/tests" 2>/dev/null || UNPACK="$(mktemp -d)"
mkdir -p "$UNPACK/bin" "$UNPACK/tests"
for f in bin/spindle tests/cuda_kernels tests/cuda_attention; do
    want="$(awk -v f="./$f" '$2 == f || $2 == substr(f, 3) {print $1}' "$BUNDLE/MANIFEST")"
    if [ ! -x "$UNPACK/$f" ] || [ "$(sha256sum "$UNPACK/$f" | cut -d' ' -f1)" != "$want" ]; then
        if command -v xz >/dev/null; then
            xz -dc "$BUNDLE/$f.xz" >"$UNPACK/$f.tmp"
        else
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "$BUNDLE/$f.xz" "$UNPACK/$f.tmp"
        fi
        chmod +x "$UNPACK/$f.tmp" && mv "$UNPACK/$f.tmp" "$UNPACK/$f"
    fi
    if [ -n "$want" ] && [ "$(sha256sum "$UNPACK/$f" | cut -d' ' -f1)" != "$want" ]; then
        say "$f does not match its sha256 in MANIFEST: the bundle is damaged"
        exit 2
    fi
done
SPINDLE="$UNPACK/bin/spindle"
say "bundle: $(sed -n 2,4p "$BUNDLE/MANIFEST" | tr '\n' ';')"

# --- 1. driver and libraries ------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
    say "no working NVIDIA driver (nvidia-smi fails): this script needs a GPU machine"
    exit 2
fi
GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
say "GPU: $GPU"

NEEDED=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13)
candidate_dirs() {
    for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13.0; do
        [ -n "$d" ] && printf '%s\n' "$d/lib64" "$d/lib" "$d/targets/x86_64-linux/lib"
    done
    for py in python3 /opt/torch/.venv/bin/python3; do
        command -v "$py" >/dev/null 2>&1 || continue
        "$py" - <<'EOF' 2>/dev/null
import glob, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
for r in roots:
    for d in glob.glob(r + "/nvidia/*/lib") + glob.glob(r + "/nvidia/cu13/lib"):
        print(d)
EOF
    done
}
LIBDIRS=""
for lib in "${NEEDED[@]}"; do
    found=""
    if ldconfig -p 2>/dev/null | grep -q " $lib "; then continue; fi
    while read -r d; do
        if [ -n "$d" ] && [ -e "$d/$lib" ]; then found="$d"; break; fi
    done < <(candidate_dirs)
    if [ -z "$found" ]; then
        found="$(find /usr/local /opt /usr/lib /root -xdev -name "$lib" -print -quit 2>/dev/null | xargs -r dirname)"
    fi
    if [ -n "$found" ]; then
        case ":$LIBDIRS:" in *":$found:"*) ;; *) LIBDIRS="${LIBDIRS:+$LIBDIRS:}$found" ;; esac
    fi
done
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing="$(ldd "$SPINDLE" "$UNPACK/tests/cuda_kernels" "$UNPACK/tests/cuda_attention" 2>&1 | grep "not found" | sort -u)"
if [ -n "$missing" ]; then
    say "libraries not found (install CUDA 13 cuBLAS/cuRAND/cudart, or pip wheels nvidia-cublas, nvidia-curand, nvidia-cuda-runtime):"
    echo "$missing"
    exit 2
fi
say "libraries: ${LIBDIRS:-system default paths}"
# PTX is JIT-compiled by the driver on first load; keep the cache with the results.
export CUDA_CACHE_PATH="${CUDA_CACHE_PATH:-$OUT_DIR/.nv-compute-cache}"

# --- 2 + 3. tests -------------------------------------------------------------------------------
run_test() { # name binary
    local name="$1" bin="$2" log="$OUT_DIR/$1.log"
    say "running $name ..."
    local start=$SECONDS
    SPINDLE_MODEL_CONFIGS="$BUNDLE/models/configs" "$bin" --nocapture --test-threads 1 >"$log" 2>&1
    local rc=$?
    local secs=$((SECONDS - start))
    if [ $rc -ne 0 ]; then
        RESULT[$name]="FAIL (${secs}s, see $log)"
        grep -E "panicked|FAIL|error" "$log" | head -n 20
    elif grep -q "SKIPPED" "$log"; then
        RESULT[$name]="FAIL: skipped on a GPU machine (${secs}s, see $log)"
        grep "SKIPPED" "$log" | head -n 5
    else
        RESULT[$name]="pass (${secs}s, $(grep -c '\.\.\. ok' "$log") tests)"
    fi
    say "$name: ${RESULT[$name]}"
}
if [ "$MODE" != bench ]; then
    run_test kernel-tests "$UNPACK/tests/cuda_kernels"
    run_test cpu-vs-cuda "$UNPACK/tests/cuda_attention"
fi

# --- 4. benchmark ------------------------------------------------------------------------------
bench() {
    if ! "$SPINDLE" bench serve --help >/dev/null 2>&1; then
        RESULT[benchmark]="NOT RUN: this spindle has no 'bench serve' subcommand yet (the benchmark client is not wired into the CLI in this build)"
        say "${RESULT[benchmark]}"
        return
    fi
    local port="${SPINDLE_BENCH_PORT:-8765}" log="$OUT_DIR/server.log"
    say "starting spindle serve (Llama-3.1-8B shape, dummy weights) on port $port ..."
    "$SPINDLE" serve --model "$BUNDLE/models/configs/llama-3.1-8b.json" --load-format dummy --device cuda \
        --served-model-name llama-8b-dummy --port "$port" --host 127.0.0.1 --max-model-len 4096 \
        --max-num-seqs 256 --data-dir "$OUT_DIR/data" >"$log" 2>&1 &
    local server=$!
    local deadline=$((SECONDS + ${SPINDLE_SERVER_START_TIMEOUT:-900}))
    until python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; do
        if ! kill -0 "$server" 2>/dev/null; then
            RESULT[benchmark]="FAIL: the server exited during start-up (see $log)"
            tail -n 20 "$log"
            return
        fi
        if [ $SECONDS -ge $deadline ]; then
            RESULT[benchmark]="FAIL: the server did not become healthy in time (see $log)"
            kill "$server" 2>/dev/null
            return
        fi
        sleep 2
    done
    say "server up after ${SECONDS}s of this script"
    local ok=1
    for c in 1 256; do
        local n
        if [ "$c" = 1 ]; then n="${SPINDLE_BENCH_PROMPTS_C1:-8}"; else n="${SPINDLE_BENCH_PROMPTS_C256:-256}"; fi
        say "bench: concurrency $c, $n prompts of 1024 tokens, 128 output tokens"
        if ! "$SPINDLE" bench serve --base-url "http://127.0.0.1:$port" --endpoint completions --dataset random \
            --random-input-len 1024 --random-output-len 128 --ignore-eos --max-concurrency "$c" \
            --num-prompts "$n" --num-warmups 2 --label "spindle-cuda-c$c" --no-progress \
            --save-result "$OUT_DIR/bench-c$c.json" >"$OUT_DIR/bench-c$c.log" 2>&1; then
            ok=0
            tail -n 20 "$OUT_DIR/bench-c$c.log"
        fi
    done
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    if [ $ok = 1 ]; then RESULT[benchmark]="done"; else RESULT[benchmark]="FAIL (see $OUT_DIR/bench-c*.log)"; fi
}
if [ "$MODE" != tests ]; then
    bench
fi

# --- 5. summary --------------------------------------------------------------------------------
echo
echo "== spindle gpu-check on $GPU"
for k in kernel-tests cpu-vs-cuda benchmark; do
    [ -n "${RESULT[$k]:-}" ] && printf '%-14s %s\n' "$k" "${RESULT[$k]}"
done
if ls "$OUT_DIR"/bench-c*.json >/dev/null 2>&1; then
    python3 - "$OUT_DIR" <<'EOF'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("bench-c*.json"), key=lambda p: int(p.stem.split("c")[-1])):
    r = json.loads(p.read_text())
    rows.append((r.get("max_concurrency") or "-", r.get("completed", 0), r.get("failed", 0),
                 r.get("request_throughput", 0.0), r.get("output_throughput", 0.0), r.get("total_token_throughput", 0.0),
                 r.get("ttft_ms", {}).get("median", 0.0), r.get("tpot_ms", {}).get("median", 0.0)))
print()
print("Llama-3.1-8B shape, dummy weights, 1024 in / 128 out:")
print("| concurrency | done | failed | req/s | output tok/s | total tok/s | median TTFT ms | median TPOT ms |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| %s | %d | %d | %.2f | %.1f | %.1f | %.1f | %.2f |" % r)
EOF
fi
status=0
for k in "${!RESULT[@]}"; do
    case "${RESULT[$k]}" in FAIL*) status=1 ;; esac
done
exit $status
