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
scripts/test-clients.sh
tests/lm_eval/run.sh
scripts/check-cuda.sh
scripts/test-kv-events.sh
scripts/test-router.sh
scripts/check-deploy.sh
