#!/usr/bin/env bash
# Bounded cargo-fuzz (libFuzzer) runs of every fuzz target in fuzz/: request parsing and
# validation, chat-template rendering, the tokenizer, the incremental detokenizer, and GGUF
# header parsing. Not part of CI (it needs a nightly toolchain and minutes per target).
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh tokenizer detokenizer
#   FUZZ_SANITIZER=address scripts/fuzz.sh    # with ASan (slower; default: none)
#   FUZZ_JOBS=2 scripts/fuzz.sh               # parallel libFuzzer jobs (logs in fuzz/fuzz-<n>.log)
#
# Needs: `rustup toolchain install nightly` and `cargo install cargo-fuzz --locked`, and the
# default model (scripts/fetch-model.sh) for the tokenizer, template and detokenizer targets.
# Corpora persist in fuzz/corpus/<target> (seeded from fuzz/seeds/<target>); crashes land in
# fuzz/artifacts/<target> and fail the script. Prints each target's executions at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"

SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
SANITIZER="${FUZZ_SANITIZER:-none}"
JOBS="${FUZZ_JOBS:-1}"
ALL_TARGETS=(request_validation chat_template tokenizer detokenizer gguf_header)
if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi
# Parallel jobs only when asked for: libFuzzer then writes fuzz-<n>.log files here.
parallel=()
if [ "$JOBS" -gt 1 ]; then parallel=(-jobs="$JOBS" -workers="$JOBS"); fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: a nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is required (cargo install cargo-fuzz --locked)" >&2
    exit 2
fi

cargo +nightly fuzz build -s "$SANITIZER"

summary=()
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="$(mktemp)"
    echo "== $t: ${SECONDS_PER_TARGET}s"
    # -rss_limit_mb / -malloc_limit_mb: a single input may not make us hold over 2 GiB.
    if cargo +nightly fuzz run -s "$SANITIZER" "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
        -timeout=10 "${parallel[@]}" -print_final_stats=1 >"$log" 2>&1; then
        result="ok"
    else
        result="FAILED (see fuzz/artifacts/$t)"
        status=1
        tail -40 "$log" >&2
    fi
    execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1 || true)"
    summary+=("$t: ${execs:-?} execs in ${SECONDS_PER_TARGET}s, $(ls "corpus/$t" | wc -l) corpus entries, $result")
    rm -f "$log"
done

echo
echo "fuzz summary (sanitizer: $SANITIZER)"
printf '  %s\n' "${summary[@]}"
exit "$status"
