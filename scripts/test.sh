#!/usr/bin/env bash
# Run every test on a fresh machine: fetch the default model, build and test the workspace in
# release (the model tests run real forward passes), the OpenAI-SDK client suite against the
# real server, and the CUDA compile check (nvcc from PyPI; kernels to PTX, CUDA-only Rust code,
# CUDA tests compiled; kernel logic on the CPU emulator — no GPU needed), KV events against
# pyzmq/msgspec consumers, lm-eval's log-likelihood scoring against HF transformers, three replicas behind vllm-router, and the Kubernetes manifests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/fetch-model.sh
scripts/fetch-minilm.sh
scripts/fetch-qwen.sh
scripts/fetch-templates.sh
cargo test --release --workspace
# The lower instruction sets, forced on this AVX-512 machine (SPINDLE_CPU_ISA). AVX2: the kernel
# tests against their scalar references, the accuracy contract and batch invariance of every
# arithmetic on the golden prompts (default model and Qwen), the embeddings, every tiny family;
# then no AVX-512 instruction in the AVX2 kernels' machine code (this CPU would run one).
# Portable: the kernel tests, every tiny family exact against transformers and batch-invariant,
# the GGUF readers, and the default model's greedy tokens in a mixed batch.
SPINDLE_CPU_ISA=avx2 cargo test --release -p spindle-model --lib --test golden --test tiny_families \
    --test tiny_gguf --test embeddings_reference --test mxfp4 --test attention_window
cargo build --release --bin spindle
python3 scripts/check-avx2-code.py target/release/spindle
SPINDLE_CPU_ISA=scalar cargo test --release -p spindle-model --lib --test tiny_families --test tiny_gguf
SPINDLE_CPU_ISA=scalar cargo test --release -p spindle-model --test golden batched_paged_forward_matches_the_golden_reference
scripts/test-clients.sh
tests/lm_eval/run.sh
scripts/check-cuda.sh
scripts/test-kv-events.sh
scripts/test-router.sh
scripts/check-deploy.sh
