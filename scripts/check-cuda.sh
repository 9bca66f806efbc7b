#!/usr/bin/env bash
# CI gate for the CUDA path, on a machine with no GPU and no NVIDIA driver:
#   1. install nvcc 13.0.88 from PyPI (scripts/cuda-toolchain.sh; cached between runs);
#   2. cargo check --release --features cuda of spindle-kernels, spindle-model and spindle, with
#      every target (the CUDA tests too). This compiles every kernels/*.cu to PTX with nvcc and
#      assembles each PTX for sm_90 with ptxas (SPINDLE_PTXAS_CHECK=1), and compiles candle's own
#      CUDA kernels, so a kernel error or a CUDA-only Rust error fails here;
#   3. builds the kernels as host C++ on the CPU emulator (kernels/emulator) and checks each one
#      against a float64 reference: the kernels' logic is tested even though no GPU is present.
# With --link it also links the CUDA test binaries (needs the link wheels: cuBLAS etc., ~650 MB
# more) and starts them against a no-driver libcuda stub, proving they build, start and skip.
#
# Usage: scripts/check-cuda.sh [--link] [--no-emulator]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LINK=0
EMULATOR=1
for arg in "$@"; do
    case "$arg" in
        --link) LINK=1 ;;
        --no-emulator) EMULATOR=0 ;;
        *) echo "check-cuda: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
t0=$(date +%s)
stamp() { echo "check-cuda: [$(( $(date +%s) - t0 ))s] $*"; }

if [ "$LINK" = 1 ]; then
    eval "$(scripts/cuda-toolchain.sh --env)"
else
    eval "$(scripts/cuda-toolchain.sh --env --compile-only)"
fi
stamp "toolchain ready: $(nvcc --version | tail -n 2 | head -n 1), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

# Kernel PTX + ptxas, candle's kernels, the model's CUDA backend, the binary and the CUDA tests.
export SPINDLE_PTXAS_CHECK=1
cargo check --release --features cuda -p spindle-kernels -p spindle-model -p spindle --all-targets
stamp "cargo check --features cuda passed"

# Show the kernels' resource report (registers / spills), from the build just checked.
report="$(ls -t "$TARGET_DIR"/release/build/spindle-kernels-*/out/ptxas-report.txt 2>/dev/null | head -n 1 || true)"
if [ -n "$report" ]; then
    kernels=$(grep -c "Compiling entry function" "$report" || true)
    spills=$(grep "spill stores" "$report" | grep -vc " 0 bytes spill stores" || true)
    stamp "ptxas assembled $kernels kernels for sm_$CUDA_COMPUTE_CAP; $spills with register spills"
fi

if [ "$EMULATOR" = 1 ]; then
    EMU_BIN="$TARGET_DIR/kernel-emulator/test_kernels"
    mkdir -p "$(dirname "$EMU_BIN")"
    g++ -std=c++20 -O2 -pthread -I"$CUDA_HOME/include" -Ikernels -o "$EMU_BIN" kernels/emulator/test_kernels.cpp
    stamp "kernel emulator built"
    "$EMU_BIN"
    stamp "kernel emulator tests passed"
fi

if [ "$LINK" = 1 ]; then
    cargo test --release --features cuda -p spindle-kernels -p spindle-model --no-run
    stub="${SPINDLE_CUDA_HOME:-$HOME/.cache/spindle/cuda13}/nodriver"
    for t in cuda_kernels cuda_attention; do
        bin="$(ls -t "$TARGET_DIR"/release/deps/$t-* 2>/dev/null | grep -v '\.d$' | head -n 1)"
        # No driver here: the stub's every call fails with CUDA_ERROR_NO_DEVICE, so each test
        # must print SKIPPED and pass.
        LD_LIBRARY_PATH="$stub:$CUDA_HOME/lib" "$bin" --nocapture 2>&1 | tee /tmp/check-cuda-$t.log | tail -n 3
        grep -q "SKIPPED" /tmp/check-cuda-$t.log
    done
    stamp "CUDA test binaries link, start and skip without a GPU"
fi
stamp "done"
