"""Where the ``w4g128-fused+head`` e2e mode's 53 GB peak comes from (session 18: 53.3 GB against 16.6 GB without the
W4 head): GPU memory above the resident set while one W4 g128 layer of the lm_head's shape (151,936 × 4096) — and,
for comparison, the gate / up shape (24,576 × 4096) — runs its first call at each M (which tunes: every candidate
timed in its own CUDA graph; at M = 1 also the in-place conversion to the k-tiled layout, which session 19 found to be
the whole peak) and its second (no tuning). ``resident_gb`` before the M = 1 call is the checkpoint layout's.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/head_tuning_memory.py   # -> $OUT/head_tuning_memory.json
"""

from __future__ import annotations

import json
import os

import torch

from qwenquant.bench.hw import environment
from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime.quant_linear import QuantLinear

OUT = os.environ.get("OUT", "runs")


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    doc = {"kind": "head_tuning_memory", "env": environment(), "results": []}
    for name, n in (("lm_head", 151936), ("gate_up", 24576)):
        w = torch.randn(n, 4096, device="cuda") * 0.02
        lin = QuantLinear.from_weight(quantize_weight(w, QuantSpec(4, 128, False)), compute_dtype=torch.bfloat16,
                                      mode="fused").cuda()
        del w
        torch.cuda.empty_cache()
        for m in (1, 8, 32, 128):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            for call in ("first (converts the layout at M = 1, tunes)", "second"):
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                lin(x)
                torch.cuda.synchronize()
                r = {"layer": name, "n": n, "m": m, "call": call, "resident_gb": base / 1e9,
                     "peak_above_gb": (torch.cuda.max_memory_allocated() - base) / 1e9,
                     "reserved_gb": torch.cuda.memory_reserved() / 1e9}
                doc["results"].append(r)
                print(r, flush=True)
        del lin
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "head_tuning_memory.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    main()
