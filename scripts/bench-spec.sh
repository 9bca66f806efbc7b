#!/usr/bin/env bash
# Speculative decoding side by side with llama.cpp (issue 23), through bench-vs-llamacpp.sh:
#   WORKLOAD=grounded (default)  chat requests that repeat a ~300-token Python module with one
#       rename (benches/workloads/make_grounded.py), greedy, up to 256 new tokens, one stream,
#       on Qwen2.5-Coder-0.5B Q4_K_M: spindle without and with n-gram speculation against
#       llama-server without and with its n-gram modes;
#   WORKLOAD=random   random prompts (nothing to look up), same model, one stream, sampled at
#       temperature 1 (greedy decoding of random-word prompts falls into loops that prompt
#       lookup drafts well: TEMPERATURE=0 shows it): what speculation costs where it cannot help;
#   WORKLOAD=c64      the default model at concurrency 64: speculation switched off by
#       disable_by_batch_size, what the check costs;
#   WORKLOAD=draft    draft-model speculation: SmolLM2-135M requantized to F16 (llama-quantize,
#       into the cache directory) as the target, the default Q4_1 GGUF as its draft, on the
#       grounded workload, against llama-server's draft-simple with the same pair.
# Results go to benches/out/spec-$WORKLOAD (OUT_DIR); other variables as bench-vs-llamacpp.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WORKLOAD="${WORKLOAD:-grounded}"
QWEN="$ROOT/models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CACHE="${SPINDLE_CACHE:-$HOME/.cache/spindle}"
DEFAULT_GGUF="$ROOT/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
NGRAM() { echo "--speculative-config {\"method\":\"ngram\",\"num_speculative_tokens\":$1,\"prompt_lookup_max\":4,\"prompt_lookup_min\":2}"; }
export OUT_DIR="${OUT_DIR:-$ROOT/benches/out/spec-$WORKLOAD}"
mkdir -p "$OUT_DIR"

case "$WORKLOAD" in
grounded)
    python3 benches/workloads/make_grounded.py "$OUT_DIR/grounded.jsonl" "${NUM_PROMPTS:-8}" 256
    export MODEL="${MODEL:-$QWEN}" DATASET=jsonl DATASET_PATH="$OUT_DIR/grounded.jsonl" \
        ENDPOINT=chat IGNORE_EOS=0 TEMPERATURE=0 CONCURRENCY=1 NUM_PROMPTS="${NUM_PROMPTS:-8}" \
        NUM_WARMUPS="${NUM_WARMUPS:-1}" CTX="${CTX:-4096}"
    export LLAMA_VARIANTS="${LLAMA_VARIANTS:-llama-server:;llama-ngram-simple:--spec-type ngram-simple;llama-ngram-simple-n4-m16:--spec-type ngram-simple --spec-ngram-simple-size-n 4 --spec-ngram-simple-size-m 16 --spec-draft-n-max 16;llama-ngram-map-k:--spec-type ngram-map-k;llama-ngram-mod:--spec-type ngram-mod}"
    export SPINDLE_VARIANTS="${SPINDLE_VARIANTS:-spindle:;spindle-ngram-k4:$(NGRAM 4);spindle-ngram-k12:$(NGRAM 12)}"
    ;;
random)
    export MODEL="${MODEL:-$QWEN}" INPUT_LEN="${INPUT_LEN:-300}" OUTPUT_LEN="${OUTPUT_LEN:-256}" \
        TEMPERATURE="${TEMPERATURE:-1}" CONCURRENCY=1 NUM_PROMPTS="${NUM_PROMPTS:-6}" NUM_WARMUPS="${NUM_WARMUPS:-1}" \
        CTX="${CTX:-4096}"
    export SPINDLE_VARIANTS="${SPINDLE_VARIANTS:-spindle:;spindle-ngram-k12:$(NGRAM 12)}"
    ;;
draft)
    TARGET="$CACHE/spec-models/SmolLM2-135M-Instruct.F16.gguf"
    if [ ! -f "$TARGET" ]; then
        LLAMA_SERVER="$(scripts/bench-vs-llamacpp.sh --install-only 2>&1 >/dev/null | sed -n "s/.*llama-server: //p" | tail -1)"
        mkdir -p "$(dirname "$TARGET")"
        "$(dirname "$LLAMA_SERVER")/llama-quantize" --allow-requantize "$DEFAULT_GGUF" "$TARGET" F16 >&2
    fi
    python3 benches/workloads/make_grounded.py "$OUT_DIR/grounded.jsonl" "${NUM_PROMPTS:-8}" 256
    export MODEL="$TARGET" DATASET=jsonl DATASET_PATH="$OUT_DIR/grounded.jsonl" ENDPOINT=chat \
        IGNORE_EOS=0 TEMPERATURE=0 CONCURRENCY=1 NUM_PROMPTS="${NUM_PROMPTS:-8}" \
        NUM_WARMUPS="${NUM_WARMUPS:-1}" CTX="${CTX:-4096}"
    export LLAMA_VARIANTS="${LLAMA_VARIANTS:-llama-server:;llama-draft-k4:--spec-type draft-simple --model-draft $DEFAULT_GGUF --spec-draft-n-max 4}"
    export SPINDLE_VARIANTS="${SPINDLE_VARIANTS:-spindle:;spindle-draft-k4:--speculative-config {\"model\":\"$DEFAULT_GGUF\",\"num_speculative_tokens\":4}}"
    ;;
c64)
    export CONCURRENCY=64 NUM_PROMPTS="${NUM_PROMPTS:-256}" INPUT_LEN="${INPUT_LEN:-256}" \
        OUTPUT_LEN="${OUTPUT_LEN:-128}"
    export SPINDLE_VARIANTS="${SPINDLE_VARIANTS:-spindle:;spindle-ngram-k12:$(NGRAM 12)}"
    ;;
*)
    echo "WORKLOAD must be grounded, random, c64 or draft" >&2
    exit 2
    ;;
esac
exec scripts/bench-vs-llamacpp.sh
