"""Storage-only W4 at large M, the weight unpacked in row blocks through one reused buffer that L2 can hold.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/blocked_dequant.py     # -> $OUT/blocked_dequant.json

Why. ``auto``'s other candidate beside ``fused`` is unpack + cuBLAS: at M >= 2048 the unpack is what separates it
from bf16 (gate_up of Qwen3-8B: ≈ 95 us of unpack against a 570 us GEMM at M = 2048). The whole [N, K] bf16 weight
goes to HBM and comes back: 2 bytes written + 2 read per weight, beside the 0.53 read of the packed one. Unpacked
block by block into *one* buffer of B rows (B·K·2 bytes: 16 MB at B = 2048, K = 4096), each block is read by the
GEMM of its output columns (``torch.mm(x, buf.T, out=y[:, n0:n1])``, cuBLAS writes the strided slice in place)
while it is still in the 50 MB L2, and the next block overwrites the same lines: the unpack's HBM traffic could fall
to the packed bytes. The price: N / B GEMMs instead of one (x re-read by each; hidden while the GEMM is
compute-bound), and their ramps.

Per (shape, M): cuBLAS bf16 on the dense weight; unpack + one GEMM (what ``auto`` runs today); blocked with a
reused buffer of B = 1024 / 2048 / 4096 rows; blocked with a fresh buffer per block (B = 2048: separates the reuse
from the blocking). CUDA-graph replay, candidates round-robin (``bench.gemm.time_interleaved``). Each blocked
result is checked against the unpack + one GEMM result first (same Ŵ; cuBLAS may pick other kernels per block, so
within bf16 rounding).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from qwenquant.bench.gemm import time_interleaved
from qwenquant.bench.hw import environment
from qwenquant.kernels import wq_ktiled as KT

sys.path.insert(0, os.path.dirname(__file__))
from wgmma_session import SHAPES, make  # noqa: E402

OUT = os.environ.get("OUT", ".")
ROWS = [int(r) for r in os.environ.get("BLOCKED_ROWS", "512,1024,2048,4096,8192").split(",")]
BLOCKS = [int(b) for b in os.environ.get("BLOCKED_BLOCKS", "1024,2048,4096").split(",")]


def blocked(x, kt, k, n, block, buf, y):
    """y = x · Ŵᵀ, Ŵ unpacked ``block`` rows at a time into ``buf`` (None: a fresh tensor per block)."""
    for n0 in range(0, n, block):
        n1 = min(n, n0 + block)
        w = KT.dequantize_ktiled(kt.words, kt.sz, 4, 128, k, rows=(n0, n1), out=buf)
        torch.mm(x, w.T, out=y[:, n0:n1])
    return y


@torch.no_grad()
def main() -> None:
    res = {"env": environment(), "commit": os.environ.get("QWENQUANT_COMMIT", "?"),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "time": []}
    for name, (n, k) in SHAPES.items():
        kt, wref = make(n, k, 4, 128, False, seed=1)
        wb = wref.to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            full = torch.mm(x, KT.dequantize_ktiled(kt.words, kt.sz, 4, 128, k).T)
            cands = {"bf16": lambda: torch.mm(x, wb.T),
                     "dequant+mm": lambda: torch.mm(x, KT.dequantize_ktiled(kt.words, kt.sz, 4, 128, k).T)}
            rec = {"proj": name, "n": n, "k": k, "m": m, "us": {}, "max_abs_diff": {}}
            for b in BLOCKS:
                if b >= n:
                    continue
                buf = torch.empty(b * k, device="cuda", dtype=torch.bfloat16)
                cands[f"blocked {b}"] = lambda b=b, buf=buf: blocked(x, kt, k, n, b, buf, y)
                if b == 2048:
                    cands[f"blocked {b} fresh"] = lambda b=b: blocked(x, kt, k, n, b, None, y)
            for c, fn in cands.items():
                if c.startswith("blocked"):
                    y.fill_(float("nan"))
                    out = fn()
                    torch.cuda.synchronize()
                    d = float((out.float() - full.float()).abs().max())
                    rec["max_abs_diff"][c] = d
                    if not torch.isfinite(out).all() or d > 0.05 * float(full.float().abs().max()):
                        rec["us"][c] = f"wrong: max abs diff {d}"
            warm = {c: f for c, f in cands.items() if c not in rec["us"]}
            for c, ms in time_interleaved(warm, min_ms=5.0, trials=5).items():
                rec["us"][c] = round(1000 * ms, 2)
            bf = rec["us"]["bf16"]
            rec["ratio"] = {c: round(bf / v, 3) for c, v in rec["us"].items() if isinstance(v, float)}
            print(name, m, rec["ratio"], file=sys.stderr, flush=True)
            res["time"].append(rec)
    with open(os.path.join(OUT, "blocked_dequant.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
