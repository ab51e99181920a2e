"""Split-K k-tiled tiles at small M, each run five times against the fp32 product: which are wrong, where.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/splitk_race.py   # -> $OUT/splitk_race.json

Follows ``lm_head_splitk_check.py`` (session 18): at M = 8 on the lm_head shape four such configs were 2.9-6.5 % off
with different tiles wrong on every run; M = 1 and 40 and the non-split / not-W-as-A / not-scale-after tiles were
right. Every split-K k-tiled config the tuner offers at M = 2, 4, 8, 16, 32 runs five times on the Qwen3-8B decoder
shapes and on N = 65,536 × K = 4096 (``SPLITK_RACE_SHAPES``, ``SPLITK_RACE_M`` narrow it); the worst relative error
against the fp32 product is kept per (shape, M, config). The configs are the tuner's own (``fused._ktiled_configs``);
until session 19 this script built them from ``fused.KTILED_SMALL`` to include the ones then withdrawn. Session 18 ran it with GPU-scope fences added to ``_add_partial`` (commit d247efc,
``QWENQUANT_SPLITK_FENCE=1``, since removed: ``results/splitk_race_fence1_h100.json``) and without
(``..._fence0_h100.json``); the cause it then pointed to — a zeroing store overtaking another thread's read — is
fixed by a barrier in ``_add_partial``. Session 19 ran it on the fix (7bf7ba2 → ``results/splitk_race_barrier_h100.json``):
all 200 (shape, M, config) cells right on all five runs, worst relative error 0.0024 (bf16 rounding), so the tiles were
offered again.
"""

from __future__ import annotations

import json
import os

import torch

from lm_head_splitk_check import layer_for  # the same W4 g128 layer, reference and k-tiled operands

from qwenquant.bench.hw import environment
from qwenquant.runtime import fused

OUT = os.environ.get("OUT", "runs")
SHAPES = [tuple(int(v) for v in s.split("x")) for s in
          os.environ.get("SPLITK_RACE_SHAPES", "6144x4096,4096x4096,24576x4096,4096x12288,65536x4096").split(",")]
ROWS = [int(v) for v in os.environ.get("SPLITK_RACE_M", "2,4,8,16,32").split(",")]


def candidates(m: int) -> dict:
    """Every split-K k-tiled config the fused tuner offers a 4-bit layer at this M (``fused._ktiled_configs``; none
    is withdrawn since the fix): name -> ("ktiled", config), split-K > 1 only."""
    return {name: kc for name, kc in fused._ktiled_configs(m, 4).items() if kc[0] == "ktiled" and kc[1][3] > 1}


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    doc = {"kind": "splitk_race", "env": environment(), "results": []}
    path = os.path.join(OUT, "splitk_race.json")
    for n, k in SHAPES:
        layer, wref, ops = layer_for(n, k, seed=n + k)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wref.T
            for name, (kind, cfg) in candidates(m).items():
                errs = []
                for _ in range(5):
                    y = fused._run(kind, cfg, x, layer.qweight, layer.scale, layer.zero, 4, 128, ops).float()
                    errs.append(float((y - ref).norm() / ref.norm()))
                doc["results"].append({"n": n, "k": k, "m": m, "config": name, "worst": max(errs), "errs": errs})
                if max(errs) > 1e-2:
                    print(n, k, m, name, [round(e, 4) for e in errs], flush=True)
        print("done", n, k, flush=True)
        del layer, wref, ops
        torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
