#!/usr/bin/env bash
# Run every test on a fresh machine: fetch the default model, build and test the workspace in
# release (the model tests run real forward passes), then the OpenAI-SDK client suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/fetch-model.sh
cargo test --release --workspace
if [ -x scripts/test-clients.sh ]; then
    scripts/test-clients.sh
fi
