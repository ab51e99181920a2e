"""Compile the k-tiled GEMM for an H100 (sm_90a) on a CPU-only machine and count its inner-loop instructions.

    .venv/bin/python benchmarks/sass_ktiled.py [bm bn w_as_a split_k warps stages [bits group [scale_after]]]
    # default: 16 64 1 8 4 3 4 128 0 (fused's M = 16 tile); writes runs/sass/<tag>.{ttgir,ptx,sass}

No GPU needed: Triton lowers the kernel for ``GPUTarget("cuda", 90, 32)`` and assembles it with the ptxas
bundled in its wheel; ``cuobjdump`` (also bundled) disassembles. Every pointer and integer argument is
declared divisible by 16, as Triton's launcher specializes them at run time for the Qwen3 shapes (without
those hints the x loads compile to scalar 2-byte loads and the SASS misleads). Printed: registers and
shared memory per program, ``convert_layout`` count in the TTGIR (1 = only the epilogue's), and a histogram
of the opcodes in the longest loop (the K loop). This is how the synchronous scale loads and the two-LOP3
field extraction were found (benchmarks/NOTES.md, session 4) — check it before spending GPU time.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from qwenquant.kernels import wq_ktiled as KT  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_ktiled(bm: int, bn: int, w_as_a: bool, splits: int, warps: int, stages: int, bits: int = 4, group: int = 128,
                   scale_after: bool = False):
    """The kernel as ``wq_ktiled.compile_for_sm90`` builds it (no divisibility hint on M, as the launcher for an M
    that is not a multiple of 16; until session 18 this script assumed one, which shares masks between rows)."""
    return KT.compile_for_sm90(bm=bm, bn=bn, w_as_a=w_as_a, splits=splits, warps=warps, stages=stages,
                               scale_after=scale_after, bits=bits, group=group)


def loop_histogram(sass: str) -> tuple[int, collections.Counter]:
    """Opcode counts between the target and the source of the longest backward branch."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?);", line) for line in sass.splitlines()) if m]
    loops = [(int(b.group(1), 16), a) for a, t in ins if (b := re.search(r"BRA (0x[0-9a-f]+)", t)) and int(b.group(1), 16) < a]
    if not loops:
        return 0, collections.Counter()
    lo, hi = max(loops, key=lambda p: p[1] - p[0])
    body = [re.sub(r"^@!?U?P\w+ ", "", t).split()[0].split(".")[0] for a, t in ins if lo <= a <= hi]
    return len(body), collections.Counter(body)


def main(argv: list[str]) -> None:
    args = [int(a) for a in argv] if argv else [16, 64, 1, 8, 4, 3, 4, 128]
    bm, bn, wa, sk, w, st = args[:6]
    bits, group = (args[6], args[7]) if len(args) >= 8 else (4, 128)
    after = bool(args[8]) if len(args) >= 9 else False
    k = compile_ktiled(bm, bn, bool(wa), sk, w, st, bits, group, after)
    tag = f"bm{bm}_bn{bn}_{'A' if wa else 'B'}_sk{sk}_w{w}_s{st}_b{bits}_g{group}{'_after' if after else ''}"
    out = os.path.join("runs", "sass")
    os.makedirs(out, exist_ok=True)
    for ext in ("ttgir", "ptx"):
        with open(os.path.join(out, f"{tag}.{ext}"), "w") as f:
            f.write(k.asm[ext])
    cubin = os.path.join(out, f"{tag}.cubin")
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(out, f"{tag}.sass"), "w") as f:
        f.write(sass)
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    n, hist = loop_histogram(sass)
    codes_per_thread = bn * KT.tile_columns(bits) // (32 * w)
    print(f"{tag}: {regs.group(1) if regs else '?'} registers, {k.metadata.shared} B shared, "
          f"{k.asm['ttgir'].count('convert_layout')} convert_layout; K loop: {n} instructions per thread per step "
          f"({codes_per_thread} weights per thread, {n / max(1, codes_per_thread):.1f} per weight)")
    print("  " + ", ".join(f"{op} {c}" for op, c in hist.most_common(16)))
    # the width of every async copy: 4/8-byte LDGSTS where 16 would do mean Triton could not prove the alignment
    # (the word rows were 8-byte loads until K // CPW carried a tl.multiple_of hint: layer M = 16 1.82x -> 2.00x)
    widths = collections.Counter(re.findall(r"LDGSTS(?:\.E)?(?:\.BYPASS)?(?:\.LTC128B)?(?:\.(\d+))?", sass))
    by_bytes = sorted((int(w) // 8 if w else 4, c) for w, c in widths.items())
    print("  cp.async widths (bytes: count): " + ", ".join(f"{b}: {c}" for b, c in by_bytes))


if __name__ == "__main__":
    main(sys.argv[1:])
