"""Compile ``kernels/wq_wgmma.py`` for sm_90a here (no GPU: the Triton wheel's ptxas) and summarize each config:
registers, spills, shared memory, and the main loop's sequence of wgmma (HGMMA), wgmma waits (WARPGROUP.DEPBAR),
CTA barriers (BAR.SYNC), mbarrier waits and TMA loads — where the warps of a program meet, and whether a wgmma is
left in flight while the next slice is dequantized.

    PYTHONPATH=src python3 benchmarks/sass_wgmma.py [bits] [group]      # default 4 128, every config
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton

from qwenquant.kernels import wq_wgmma as W

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
OPS = ("HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "BAR.SYNC", "SYNCS.PHASECHK", "UTMALDG", "LDG")


def summarize(bits: int, group: int, cfg: tuple) -> dict:
    c = W.compile_for_sm90(bits, group, cfg)
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        open(ptx, "w").write(c.asm["ptx"])
        info = subprocess.run([os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                              capture_output=True, text=True)
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", info.stdout + info.stderr)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", info.stdout + info.stderr)
    seq = [op for line in sass.splitlines() for op in OPS if op in line]
    return {"config": cfg, "registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(map(int, spills)),
            "shared": c.metadata.shared, "counts": dict(collections.Counter(seq)),
            "serialized": "serializ" in (info.stdout + info.stderr).lower(), "sequence": seq}


def main(argv):
    bits = int(argv[0]) if argv else 4
    group = int(argv[1]) if len(argv) > 1 else 128
    for cfg in W.CONFIGS:
        s = summarize(bits, group, cfg)
        print(f"bn{cfg[0]} bm{cfg[1]} w{cfg[2]} stages{cfg[3]} sps{cfg[4]} streamk{cfg[5]}: {s['registers']} registers, "
              f"{s['spill_bytes']} B spilled, {s['shared']} B shared, wgmma serialized: {s['serialized']}")
        print("   ", s["counts"])
        # the steady-state loop: the run-length sequence after the first wgmma
        first = s["sequence"].index("HGMMA") if "HGMMA" in s["sequence"] else 0
        runs = [(op, len(list(g))) for op, g in itertools.groupby(s["sequence"][first:first + 60])]
        print("    loop:", " ".join(f"{op}×{n}" if n > 1 else op for op, n in runs))


if __name__ == "__main__":
    main(sys.argv[1:])
