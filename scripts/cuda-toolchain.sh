#!/usr/bin/env bash
# Install a CUDA 13.0 toolchain (nvcc 13.0.88) from PyPI wheels into a venv OUTSIDE the repo, so the
# CUDA path of spindle can be compiled (and linked) on a machine with no GPU and no NVIDIA driver.
#
# Why these pins: the target H100/H200 machines run driver 580 (CUDA 13.0); PTX made by a newer nvcc
# does not load there, and cudarc 0.19.10 refuses an nvcc newer than it knows. The cu12 wheels carry
# no nvcc; the CUDA 13 ones do. All wheels below are the CUDA 13.0 Update 1 redistributables.
#
# Usage:
#   scripts/cuda-toolchain.sh                 # install (idempotent) and print the export lines
#   eval "$(scripts/cuda-toolchain.sh --env)" # install quietly, then export into this shell
#   scripts/cuda-toolchain.sh --compile-only  # only what `cargo check --features cuda` needs (no
#                                             # cuBLAS/cuRAND/NVRTC: saves ~650 MB of download)
#
# Layout (PREFIX = ${SPINDLE_CUDA_HOME:-$HOME/.cache/spindle/cuda13}):
#   $PREFIX/venv/.../site-packages/nvidia/cu13   CUDA_HOME: bin/nvcc, include/, lib/, nvvm/
#   $CUDA_HOME/lib/lib*.so                        unversioned symlinks, for the linker
#   $CUDA_HOME/lib/stubs/libcuda.so               link-time stub of the driver API (SONAME libcuda.so.1)
#   $PREFIX/nodriver/libcuda.so.1                 run-time stub whose every call fails with "no device";
#                                                 only for starting CUDA test binaries on a machine without
#                                                 a driver so they can print their skip reason. Never
#                                                 put it on LD_LIBRARY_PATH on a machine with a GPU.
set -euo pipefail

PREFIX="${SPINDLE_CUDA_HOME:-$HOME/.cache/spindle/cuda13}"
PYTHON="${PYTHON:-python3}"
NVCC_VERSION="13.0.88"

COMPILE_WHEELS=(
    "nvidia-cuda-nvcc==13.0.88"    # nvcc, ptxas, fatbinary
    "nvidia-nvvm==13.0.88"         # cicc + libdevice (nvcc's front end)
    "nvidia-cuda-crt==13.0.88"     # include/crt/*.h
    "nvidia-cuda-runtime==13.0.88" # cuda_runtime.h, cuda.h, cuda_fp16/bf16.h, libcudart
    "nvidia-cuda-cccl==13.0.85"    # include/cccl (libcu++, nv/target), shipped with 13.0 U1
)
LINK_WHEELS=(
    "nvidia-cuda-nvrtc==13.0.88"   # libnvrtc.so.13 (candle/cudarc link it)
    "nvidia-cublas==13.0.2.14"     # libcublas.so.13, libcublasLt.so.13
    "nvidia-curand==10.4.0.35"     # libcurand.so.10
)

MODE=full
PRINT=exports
for arg in "$@"; do
    case "$arg" in
        --compile-only) MODE=compile ;;
        --env) PRINT=env ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "cuda-toolchain: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

log() { if [ "$PRINT" = env ]; then echo "cuda-toolchain: $*" >&2; else echo "cuda-toolchain: $*"; fi; }

WHEELS=("${COMPILE_WHEELS[@]}")
if [ "$MODE" = full ]; then WHEELS+=("${LINK_WHEELS[@]}"); fi

VENV="$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    mkdir -p "$PREFIX"
    "$PYTHON" -m venv --without-pip "$VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CUDA_HOME="$SITE/nvidia/cu13"

# Idempotence: one marker per exact wheel set; a complete full install also satisfies --compile-only.
STAMP_FULL="$PREFIX/.installed-$(printf '%s\n' "${COMPILE_WHEELS[@]}" "${LINK_WHEELS[@]}" | sha256sum | cut -c1-16)"
STAMP_COMPILE="$PREFIX/.installed-$(printf '%s\n' "${COMPILE_WHEELS[@]}" | sha256sum | cut -c1-16)"
if [ "$MODE" = full ]; then STAMP="$STAMP_FULL"; else STAMP="$STAMP_COMPILE"; fi

if [ -f "$STAMP" ] || { [ "$MODE" = compile ] && [ -f "$STAMP_FULL" ]; }; then
    log "wheels already installed in $VENV"
else
    log "installing ${#WHEELS[@]} wheels into $VENV (nvcc $NVCC_VERSION)"
    # The host pip installs into the venv's site-packages (--target would lose entry points we do
    # not need anyway; --prefix keeps the standard layout). --no-deps: the pins are the whole set.
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --only-binary=:all: --prefix "$VENV" --ignore-installed "${WHEELS[@]}" >&2
    touch "$STAMP"
fi

NVCC="$CUDA_HOME/bin/nvcc"
if [ ! -x "$NVCC" ]; then
    echo "cuda-toolchain: $NVCC is missing after install; remove $PREFIX and retry" >&2
    exit 1
fi
chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME/nvvm/bin/cicc" 2>/dev/null || true
if ! "$NVCC" --version | grep -q "V$NVCC_VERSION"; then
    echo "cuda-toolchain: $NVCC is not version $NVCC_VERSION:" >&2
    "$NVCC" --version >&2
    exit 1
fi

# The wheels ship only versioned sonames (libcublas.so.13); `-lcublas` needs libcublas.so.
LIB="$CUDA_HOME/lib"
for so in "$LIB"/lib*.so.*; do
    [ -e "$so" ] || continue
    base="$(basename "$so")"
    case "$base" in *.alt.so*|*builtins*) continue ;; esac
    plain="${base%%.so.*}.so"
    [ -e "$LIB/$plain" ] || ln -sf "$base" "$LIB/$plain"
done

# libcuda comes with the NVIDIA driver, which this machine does not have; the toolkit wheels carry
# no stub. candle enables cudarc's `dynamic-linking`, so executables link `-lcuda`. Build a stub
# exporting every driver entry point declared in cuda.h (under each API-version macro set), with the
# driver's SONAME so the binary asks for the real libcuda.so.1 at run time.
make_driver_stub() { # $1 = output path, $2 = soname, $3 = error code every entry point returns
    local out="$1" soname="$2" code="$3" tmp
    tmp="$(mktemp -d)"
    {
        for defs in "" "-DCUDA_API_PER_THREAD_DEFAULT_STREAM" "-D__CUDA_API_VERSION_INTERNAL"; do
            # shellcheck disable=SC2086
            echo '#include <cuda.h>' | gcc -E -P $defs -I"$CUDA_HOME/include" -x c - 2>/dev/null \
                | tr ';' '\n' | grep -oE '\bCUresult\s+(cu[A-Za-z0-9_]+)\s*\(' \
                | sed -E 's/^CUresult\s+//; s/\s*\($//' || true
        done
        # Macro targets (cuCtxCreate -> cuCtxCreate_v2 ...) and plain declarations, belt and braces.
        grep -ohE '#define\s+cu[A-Za-z0-9_]+\s+cu[A-Za-z0-9_]+\s*$' "$CUDA_HOME/include/cuda.h" \
            | awk '{print $2; print $3}'
        # Whatever cudarc declares, when its source is in the cargo registry.
        local sys
        # (On a fresh machine the glob matches nothing: that must not fail the pipeline.)
        for sys in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs; do
            [ -f "$sys" ] || continue
            grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/^\s+fn //; s/\($//' || true
        done
    } | sort -u | grep -E '^cu[A-Za-z0-9_]+$' >"$tmp/names"
    if [ "$(wc -l <"$tmp/names")" -lt 300 ]; then
        echo "cuda-toolchain: found only $(wc -l <"$tmp/names") driver entry points in cuda.h" >&2
        rm -rf "$tmp"
        return 1
    fi
    {
        echo "/* Generated by scripts/cuda-toolchain.sh: no-driver stub, every call returns $code. */"
        while read -r name; do echo "int $name(void) { return $code; }"; done <"$tmp/names"
    } >"$tmp/stub.c"
    mkdir -p "$(dirname "$out")"
    gcc -shared -fPIC -O1 -Wl,-soname,"$soname" -o "$out.tmp" "$tmp/stub.c"
    mv "$out.tmp" "$out"
    rm -rf "$tmp"
}

STUB="$LIB/stubs/libcuda.so"
RUNTIME_STUB="$PREFIX/nodriver/libcuda.so.1"
if [ ! -f "$STUB" ] || [ ! -f "$RUNTIME_STUB" ] || [ "$0" -nt "$STUB" ]; then
    command -v gcc >/dev/null || { echo "cuda-toolchain: gcc is needed to build the libcuda stub" >&2; exit 1; }
    log "building the libcuda stubs"
    # 999 = CUDA_ERROR_UNKNOWN: never used at run time (the real driver's libcuda.so.1 is).
    make_driver_stub "$STUB" libcuda.so.1 999
    # 100 = CUDA_ERROR_NO_DEVICE: what a test sees when it starts against this stub.
    make_driver_stub "$RUNTIME_STUB" libcuda.so.1 100
fi

# A PTX smoke test: proves nvcc, cicc, the headers and cccl fit together.
SMOKE="$PREFIX/.smoke-$NVCC_VERSION"
if [ ! -f "$SMOKE" ]; then
    tmp="$(mktemp -d)"
    cat >"$tmp/smoke.cu" <<'EOF'
#include <cuda_bf16.h>
#include <cuda_fp16.h>
extern "C" __global__ void smoke(__nv_bfloat16 *x, __half *y) { x[threadIdx.x] = __float2bfloat16(__half2float(y[threadIdx.x])); }
EOF
    if ! "$NVCC" --ptx -arch=sm_90 -o "$tmp/smoke.ptx" "$tmp/smoke.cu" >&2; then
        echo "cuda-toolchain: nvcc could not compile a trivial kernel (see above)" >&2
        rm -rf "$tmp"
        exit 1
    fi
    rm -rf "$tmp"
    touch "$SMOKE"
fi

EXPORTS="export CUDA_HOME=\"$CUDA_HOME\"
export CUDA_PATH=\"$CUDA_HOME\"
export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\"
export CUDARC_CUDA_VERSION=13000
export PATH=\"$CUDA_HOME/bin:\$PATH\"
export LIBRARY_PATH=\"$LIB:$LIB/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""

if [ "$PRINT" = env ]; then
    echo "$EXPORTS"
else
    log "ready: $("$NVCC" --version | tail -n 2 | head -n 1)"
    echo "# Paste these (or: eval \"\$(scripts/cuda-toolchain.sh --env)\"):"
    echo "$EXPORTS"
    echo "# To start CUDA test binaries on THIS machine (no driver) so they skip: "
    echo "#   LD_LIBRARY_PATH=\"$PREFIX/nodriver:$LIB\" <test binary>"
fi
