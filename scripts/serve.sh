#!/usr/bin/env bash
# Fetch the default model, build spindle and serve it on port 8000 (extra flags pass through,
# e.g. `scripts/serve.sh --port 9000 --api-key secret`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/fetch-model.sh
cargo build --release -p spindle
exec target/release/spindle serve \
    --model models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
    --served-model-name SmolLM2-135M-Instruct "$@"
