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
# The portable kernels, forced on this AVX-512 machine (SPINDLE_CPU_ISA): every tiny family
# exact against transformers and batch-invariant, the GGUF readers, and the default model's
# greedy tokens in a mixed batch.
SPINDLE_CPU_ISA=scalar cargo test --release -p spindle-model --test tiny_families --test tiny_gguf
SPINDLE_CPU_ISA=scalar cargo test --release -p spindle-model --test golden batched_paged_forward_matches_the_golden_reference
scripts/test-clients.sh
tests/lm_eval/run.sh
scripts/check-cuda.sh
scripts/test-kv-events.sh
scripts/test-router.sh
scripts/check-deploy.sh
