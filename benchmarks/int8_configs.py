"""Triton int8 GEMM tile configs at Qwen3-8B shapes, M = 1024..8192 (pre-quantized activations), and the
activation-quantization pass on its own.  PYTHONPATH=src python3 benchmarks/int8_configs.py  (JSON -> $OUT)"""

import json
import os

import torch

from qwenquant.bench.gemm import time_graph
from qwenquant.bench.hw import environment
from qwenquant.kernels import w8a8

OUT = os.environ.get("OUT", "runs/int8")
# (BM, BN, BK, warps, stages, tma): tma = 0 pointer loads, one program per tile; P > 0 TMA loads, persistent
# grid of P programs per SM (w8a8.int8_gemm_quantized)
CONFIGS = [(128, 256, 128, 8, 3, 0), (128, 256, 128, 8, 4, 0), (256, 128, 128, 8, 3, 0), (256, 128, 128, 8, 4, 0),
           (128, 256, 128, 8, 3, 1), (128, 256, 128, 8, 4, 1), (256, 128, 128, 8, 3, 1), (256, 128, 128, 8, 4, 1),
           (128, 256, 64, 8, 4, 1), (128, 256, 64, 8, 5, 1), (256, 128, 64, 8, 5, 1), (128, 128, 128, 8, 4, 1),
           (128, 128, 128, 4, 4, 2), (128, 128, 128, 8, 4, 2), (128, 256, 128, 8, 3, 2), (256, 256, 64, 8, 3, 1)]
if os.environ.get("INT8_CONFIGS_TMA_ONLY"):
    CONFIGS = [c for c in CONFIGS if c[5]]
res = []
for n, k in [(12288, 4096), (4096, 12288), (4096, 4096)]:
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    sw = torch.rand(n, device="cuda") * 0.01
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for m in (1024, 4096, 8192):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q, sx, qsum = w8a8.act_quant(x, fp8=False)
        row = {"n": n, "k": k, "m": m, "us": {}, "rel_err": {}}
        ref = (torch._int_mm(q, w.t()).double() * sx.double() * sw.double()).float()  # exact int32 sums, then scales
        row["us"]["bf16"] = time_graph(lambda: x @ wb.T) * 1e3
        row["us"]["act_quant"] = time_graph(lambda: w8a8.act_quant(x, fp8=False)) * 1e3
        row["us"]["int_mm"] = time_graph(lambda: torch._int_mm(q, w.t())) * 1e3
        for cfg in CONFIGS:
            try:
                f = lambda cfg=cfg: w8a8.int8_gemm_quantized(q, sx, qsum, w, sw, None, None, torch.bfloat16, *cfg)
                y = f()
                row["rel_err"]["x".join(map(str, cfg))] = float((y.float() - ref).norm() / ref.norm())
                row["us"]["x".join(map(str, cfg))] = time_graph(f) * 1e3
            except Exception as e:  # noqa: BLE001
                row["us"]["x".join(map(str, cfg))] = None
                print("ERR", cfg, repr(e)[:200], flush=True)
        best = min((v, c) for c, v in row["us"].items() if v and "x" in c)
        print(n, k, m, {c: round(v, 1) for c, v in row["us"].items() if v and c in ("bf16", "act_quant", "int_mm")},
              "best", best[1], round(best[0], 1), "TOP/s", round(2 * m * n * k / best[0] / 1e6), flush=True)
        tma = min((v, c) for c, v in row["us"].items() if v and "x" in c and not c.endswith("x0"))
        ptr = min((v, c) for c, v in row["us"].items() if v and c.endswith("x0"))
        print("   best TMA", tma[1], round(tma[0], 1), "best pointer", ptr[1], round(ptr[0], 1),
              "worst rel err", max(row["rel_err"].values()), flush=True)
        res.append(row)
os.makedirs(OUT, exist_ok=True)
json.dump({"env": environment(), "commit": os.environ.get("QWENQUANT_COMMIT", ""), "rows": res},
          open(os.path.join(OUT, "int8_configs.json"), "w"))
