#!/usr/bin/env bash
# Build, on a machine without a GPU, everything scripts/gpu-check.sh needs on a GPU machine that
# has the NVIDIA driver but no Rust toolchain and no network:
#   bin/spindle.xz            the server/benchmark binary, --features cuda, stripped
#   tests/cuda_kernels.xz     every kernel vs a float64 reference (crates/kernels/tests)
#   tests/cuda_attention.xz   CUDA attention vs CPU, greedy decoding CUDA vs CPU (crates/model/tests)
#   models/configs/*.json     model shapes for dummy weights
#   gpu-check.sh, MANIFEST    the runner and what was built (commit, toolchain, sha256 of each binary)
# The binaries link libcuda.so.1 (the driver's) and cuBLAS/cuRAND/cudart 13 (looked up on the
# GPU machine by gpu-check.sh); PTX targets sm_${CUDA_COMPUTE_CAP:-90} from nvcc 13.0.88, which
# the driver 580 (CUDA 13.0) machines load. The bundle must stay under ~60 MiB: each stripped
# binary is ~60 MB (a third of it candle's CUDA kernels: its quantized/MoE cubins and PTX), so they
# travel xz-compressed (~22 MB together) and gpu-check.sh unpacks them (xz, or Python's lzma).
#
# Usage: scripts/build-gpu-bundle.sh [OUT_DIR]      (default: target/gpu-bundle)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-$ROOT/target/gpu-bundle}"
LIMIT_MIB="${SPINDLE_BUNDLE_LIMIT_MIB:-60}"

eval "$(scripts/cuda-toolchain.sh --env)"
echo "build-gpu-bundle: $(nvcc --version | tail -n 2 | head -n 1), sm_$CUDA_COMPUTE_CAP"

cargo build --release --features cuda -p spindle --bin spindle
# The CUDA test binaries; their paths come from cargo's JSON messages.
TEST_LIST="$(mktemp)"
trap 'rm -f "$TEST_LIST"' EXIT
cargo test --release --features cuda -p spindle-kernels -p spindle-model --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cuda_kernels", "cuda_attention"):
        print(m["target"]["name"], m["executable"])
' >"$TEST_LIST"
if [ "$(wc -l <"$TEST_LIST")" -ne 2 ]; then
    echo "build-gpu-bundle: expected the cuda_kernels and cuda_attention test binaries, got:" >&2
    cat "$TEST_LIST" >&2
    exit 1
fi

rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/tests" "$OUT/models/configs"
cp target/release/spindle "$OUT/bin/spindle"
while read -r name exe; do cp "$exe" "$OUT/tests/$name"; done <"$TEST_LIST"
strip "$OUT/bin/spindle" "$OUT"/tests/*
cp models/configs/*.json "$OUT/models/configs/"
cp scripts/gpu-check.sh "$OUT/gpu-check.sh"
chmod +x "$OUT/gpu-check.sh"

{
    echo "spindle GPU bundle"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), glibc $(ldd --version | head -n 1 | awk '{print $NF}')"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "nvcc: $(nvcc --version | tail -n 2 | head -n 1); PTX target sm_$CUDA_COMPUTE_CAP"
    echo "needs on the GPU machine: libcuda.so.1 (driver >= 580), libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libcudart.so.13"
    echo
    (cd "$OUT" && find bin tests -type f -exec sha256sum {} +)
} >"$OUT/MANIFEST"
echo "build-gpu-bundle: compressing (xz)"
(cd "$OUT" && du -h bin/* tests/* | sed 's/^/  uncompressed /')
xz -6 -T0 "$OUT/bin/spindle" "$OUT"/tests/*

SIZE_KIB=$(du -sk "$OUT" | cut -f1)
echo "build-gpu-bundle: $OUT"
(cd "$OUT" && du -h bin/* tests/* | sed 's/^/  /')
echo "build-gpu-bundle: total $((SIZE_KIB / 1024)) MiB (limit ${LIMIT_MIB} MiB)"
if [ "$SIZE_KIB" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "build-gpu-bundle: the bundle is over ${LIMIT_MIB} MiB" >&2
    exit 1
fi
echo "build-gpu-bundle: copy $OUT to the GPU machine and run: $(basename "$OUT")/gpu-check.sh"
