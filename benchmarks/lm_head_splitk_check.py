"""Which fused kernel configs compute Qwen3's lm_head shape (151,936 × 4096, W4 g128) wrongly, and how.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/lm_head_splitk_check.py   # -> $OUT/lm_head_splitk_check.json

Why: session 18's GPU run of ``test_every_kernel_config_on_the_lm_head_shape`` failed on ``ktiled A bn64 bm16 w4 s3 sk2
after`` at M = 8 (relative error 0.042 against fp32), a config that passes on the decoder shapes. This runs every
config the tuner offers at M = 1 / 8 / 40 on the lm_head shape (not stopping at the first failure), repeats each
failing one three times, once more with freshly zeroed split-K workspaces, and at smaller N (same K) to find where it
starts; for a failure it records which output columns (as tile indices) are wrong.
"""

from __future__ import annotations

import json
import os

import torch

from qwenquant.bench.hw import environment
from qwenquant.kernels import wq_ktiled as KT
from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime import fused
from qwenquant.runtime.quant_linear import QuantLinear

OUT = os.environ.get("OUT", "runs")


def layer_for(n: int, k: int = 4096, seed: int = 11):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, generator=g, device="cuda") * 0.05
    layer = QuantLinear.from_weight(quantize_weight(w, QuantSpec(4, 128, False)), compute_dtype=torch.bfloat16)
    from qwenquant.kernels import wq_matmul as K

    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, 4, k).float()
    ops = fused.FusedOperands(tiny=None, ktiled=KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero,
                                                                                  4, k))
    return layer, wref, ops


def check(kind, cfg, x, layer, wref, ops, bn=64):
    ref = x.float() @ wref.T
    y = fused._run(kind, cfg, x, layer.qweight, layer.scale, layer.zero, 4, 128, ops).float()
    err = float((y - ref).norm() / ref.norm())
    col = ((y - ref).norm(dim=0) / ref.norm(dim=0).clamp_min(1e-6))  # per output column
    bad = (col > 5e-2).nonzero().flatten()
    return err, {"bad_columns": int(bad.numel()), "bad_tiles_first": sorted(set((bad // bn).tolist()))[:12],
                 "bad_rows": int(((y - ref).norm(dim=1) / ref.norm(dim=1) > 5e-2).sum())}


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    doc = {"kind": "lm_head_splitk_check", "env": environment(), "results": [], "by_n": []}
    n, k = 151936, 4096
    layer, wref, ops = layer_for(n, k)
    failing = []
    for m in (1, 8, 40):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        configs = fused._configs(m, k, 128, 4, tinygemm=False, ktiled=True, wgmma=fused.wgmma_available())
        for name, (kind, cfg) in configs.items():
            err, info = check(kind, cfg, x, layer, wref, ops)
            row = {"m": m, "config": name, "err": err, **info}
            if err >= 1e-2:
                row["repeats"] = [check(kind, cfg, x, layer, wref, ops)[0] for _ in range(3)]
                KT._WORKSPACES.clear()
                row["fresh_workspace"] = check(kind, cfg, x, layer, wref, ops)[0]
                failing.append((m, name, kind, cfg))
            doc["results"].append(row)
            print(m, name, round(err, 5), info if err >= 1e-2 else "", flush=True)
        with open(os.path.join(OUT, "lm_head_splitk_check.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)
    del layer, wref, ops
    torch.cuda.empty_cache()
    for n_small in (16384, 65536, 131072, 151936 + 64):
        if not failing:
            break
        layer, wref, ops = layer_for(n_small, k)
        for m, name, kind, cfg in failing[:4]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            err, info = check(kind, cfg, x, layer, wref, ops)
            doc["by_n"].append({"n": n_small, "m": m, "config": name, "err": err, **info})
            print("n", n_small, m, name, round(err, 5), flush=True)
        del layer, wref, ops
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "lm_head_splitk_check.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    main()
