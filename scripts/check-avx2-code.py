#!/usr/bin/env python3
"""Fail if a function of spindle-model's AVX2 kernels uses an AVX-512 register (zmm, k masks).

This AVX-512 machine runs AVX-512 instructions wherever they appear, so a kernel that slipped
one into its AVX2 path would pass every test here and crash on an AVX2-only CPU. The AVX2 paths
are instantiated from the same source as the AVX-512 ones (crates/model/src/cpu_emu512.rs), so
this checks the machine code itself: every function whose name has `avx2` in it.
Usage: check-avx2-code.py BINARY
"""
import re
import subprocess
import sys

binary = sys.argv[1]
dis = subprocess.run(
    ["objdump", "-d", "--no-show-raw-insn", "-C", binary],
    check=True, capture_output=True, text=True,
).stdout
current, checked, bad = None, set(), {}
for line in dis.splitlines():
    m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
    if m:
        name = m.group(1)
        current = name if ("spindle_model" in name and "avx2" in name and "isa_tests" not in name) else None
        if current:
            checked.add(current)
        continue
    if current and re.search(r"%zmm|%k[1-7]\b|\{%k", line):
        bad[current] = bad.get(current, 0) + 1
if not checked:
    sys.exit(f"no AVX2 kernel functions found in {binary}")
for name, n in bad.items():
    print(f"AVX-512 instruction in an AVX2 kernel: {name} ({n} instructions)")
print(f"{len(checked)} AVX2 kernel functions checked, {len(bad)} with AVX-512 instructions")
sys.exit(1 if bad else 0)
