"""Compile the batch-1 kernel (``kernels/wq_batch1.py``) for an H100 (sm_90a) on a CPU-only machine:
registers, spills, shared memory and the whole kernel's SASS instructions per weight, per tile.

    .venv/bin/python benchmarks/sass_batch1.py [bn,kb,warps,stages[,bm] ...]   # default: the module's defaults, BM 8

No GPU needed (``benchmarks/sass_ktiled.py`` explains the approach). Registers decide how many programs share an SM,
and with them how many bytes of words are in flight there — the quantity the batch-1 read floor says matters
(benchmarks/NOTES.md, session 13).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
from qwenquant.kernels import wq_batch1 as B  # noqa: E402
from sass_ktiled import BIN  # noqa: E402


def build(bn: int, kb: int, warps: int, stages: int, bm: int = 8, bits: int = 4, group: int = 128):
    """The kernel as the launcher specializes it (``wq_batch1.compile_for_sm90``, which the CPU tests keep in step with
    the kernel's signature): ``bm`` 8 is the decode build (M ≤ 8), 16 the M = 9–16 one."""
    return B.compile_for_sm90(bn, kb, warps, stages, bits=bits, group=group, m=1 if bm <= 8 else 16)


def report(bn: int, kb: int, warps: int, stages: int, bm: int = 8) -> str:
    k = build(bn, kb, warps, stages, bm)
    cubin = os.path.join("runs", "sass", f"batch1_bn{bn}_kb{kb}_w{warps}_s{stages}_bm{bm}.cubin")
    os.makedirs(os.path.dirname(cubin), exist_ok=True)
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+ ", "", m.group(1)).split()[0].split(".")[0]
                              for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s*(.*?);", sass))
    weights_per_thread = bn * kb * B.tile_columns(4) / (32 * warps)
    n_regs = int(regs.group(1)) if regs else 0
    per_sm = min(65536 // max(1, n_regs * 32 * warps), (227 * 1024) // max(1, k.metadata.shared))
    return (f"bn{bn} kb{kb} w{warps} s{stages} bm{bm}: {n_regs} registers, stack {stack.group(1) if stack else '?'} B, "
            f"{k.metadata.shared} B shared, {per_sm} programs per SM ({per_sm * bn * kb * 128 // 1024} KB of words in "
            f"flight); {sum(ops.values()) / weights_per_thread:.2f} SASS instructions per weight (one step)\n  "
            + ", ".join(f"{op} {c}" for op, c in ops.most_common(14)))


if __name__ == "__main__":
    specs = sys.argv[1:] or ["16,8,4,1"]
    for spec in specs:
        print(report(*(int(v) for v in spec.split(","))), flush=True)
