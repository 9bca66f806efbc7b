#!/usr/bin/env bash
# Fetch the default model, build spindle and serve it on port 8000 (extra flags pass through,
# e.g. `scripts/serve.sh --port 9000 --api-key secret`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/fetch-model.sh
cargo build --release -p spindle
# The GGUF carries no generation_config.json: the model card's recommended sampling
# (temperature 0.2, top_p 0.9) comes from models/generation-config/, as request defaults.
exec target/release/spindle serve \
    --model models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
    --generation-config models/generation-config/smollm2-135m-instruct \
    --served-model-name SmolLM2-135M-Instruct "$@"
