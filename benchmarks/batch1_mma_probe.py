"""First GPU contact of ``kernels/wq_batch1_mma.py`` (Gluon, words straight into the MMA operand registers) against
``wq_batch1`` (Triton) on the merged Qwen3-8B shapes at M = 1, bf16 in the same run.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 -u benchmarks/batch1_mma_probe.py   # -> $OUT/batch1_mma_probe.json
    PROBE_QUICK=1 ...                                                                   # fewer checks, 3 trials

Phase 1 checks every config against the fp64 product (x @ dequantized weight) on each shape at M = 1, 3 and 8 in
bf16 and M = 1 in fp16, into an output filled with NaN; a config that fails is not timed. Phase 2 times, per shape,
every correct config of both kernels (``wq_batch1``: the tuner's ``fused.BATCH1`` tiles, and split-K 2 / 3 of the
best 4-warp tiles for the N = 4096 shapes) and bf16 round-robin (``bench.gemm.time_interleaved``: CUDA-graph
replays over weight copies that overflow L2). Prints as it goes (one line per shape).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from qwenquant.bench.gemm import l2_copies, time_interleaved
from qwenquant.bench.hw import environment
from qwenquant.kernels import wq_batch1 as B1
from qwenquant.kernels import wq_batch1_mma as Q
from qwenquant.runtime import fused

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wgmma_session import SHAPES, make  # noqa: E402

# PROBE_QUICK=1 (a call with little device time left): M = 1 and 3 in bf16 checked, the tuner's own BATCH1 tiles only,
# 3 trials, the shapes biggest first (each shape's record is written as soon as it is done)
QUICK = os.environ.get("PROBE_QUICK", "0") == "1"
OLD = [cfg for cfg in fused.BATCH1] + ([] if QUICK else [(32, 4, 4, 4, 2), (16, 4, 2, 3, 2), (32, 4, 4, 4, 3)])
CASES = (((1, torch.bfloat16), (3, torch.bfloat16)) if QUICK else
         ((1, torch.bfloat16), (3, torch.bfloat16), (8, torch.bfloat16), (1, torch.float16)))
ORDER = ("gate_up", "down", "qkv", "o") if QUICK else tuple(SHAPES)
# PROBE_SHAPES=gate_up,down and PROBE_CONFIGS=0,2 (indices into wq_batch1_mma.CONFIGS): fewer still
if os.environ.get("PROBE_SHAPES"):
    ORDER = tuple(os.environ["PROBE_SHAPES"].split(","))
MMA_CONFIGS = [Q.CONFIGS[int(i)] for i in os.environ.get("PROBE_CONFIGS", "").split(",") if i] or list(Q.CONFIGS)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def main():
    doc = {"kind": "batch1_mma_probe", "env": environment(), "commit": os.environ.get("QWENQUANT_COMMIT", "?"),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shapes": {}}
    out_dir = os.environ.get("OUT", ".")
    for proj in ORDER:
        n, k = SHAPES[proj]
        kt, wref = make(n, k, 4, 128, False, seed=1)
        rec = {"n": n, "k": k, "errors": {}, "us": {}}
        good = []
        for cfg in MMA_CONFIGS:
            name = "mma bn%d w%d pairs%d" % cfg
            errs = {}
            try:
                for m, dt in CASES:
                    x = torch.randn(m, k, device="cuda", dtype=dt)
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
                    y = Q.batch1_mma_gemm(x, kt.words, kt.sz, 4, 128, *cfg, out=out)
                    torch.cuda.synchronize()
                    errs[f"m{m} {str(dt)[6:]}"] = rel_err(y, x.double() @ wref.double().T)
            except Exception as e:  # noqa: BLE001 — recorded, the probe goes on
                errs["exception"] = f"{type(e).__name__}: {str(e)[:300]}"
            rec["errors"][name] = errs
            if "exception" not in errs and all(v < 1e-2 for v in errs.values()):
                good.append((name, cfg))
            else:
                print(proj, name, "FAILED", errs, flush=True)
        nbytes = kt.words.numel() * 4 + kt.sz.numel() * 4
        reps = l2_copies(nbytes, least=2)
        copies = [(kt.words.clone(), kt.sz.clone()) for _ in range(reps)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ wref.double().T
        wb = [wref.to(torch.bfloat16) for _ in range(l2_copies(n * k * 2, least=2))]
        cands = {}
        for name, cfg in good:
            cands[name] = lambda cfg=cfg: [Q.batch1_mma_gemm(x, w, s, 4, 128, *cfg) for w, s in copies]
        for cfg in OLD:
            if cfg[4] > 1 and n > 8192:
                continue
            cands[fused.batch1_name(cfg)] = lambda cfg=cfg: [B1.batch1_gemm(x, w, s, 4, 128, *cfg) for w, s in copies]
        warm = {}
        for name, fn in cands.items():
            try:
                e = rel_err(fn()[0], ref)
                torch.cuda.synchronize()
                rec["errors"].setdefault(name, {})["timed m1"] = e
                if e < 1e-2:
                    warm[name] = fn
            except Exception as ex:  # noqa: BLE001
                rec["errors"].setdefault(name, {})["exception"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        warm["bf16"] = lambda: [torch.nn.functional.linear(x, w) for w in wb]
        for name, ms in time_interleaved(warm, min_ms=5.0, trials=3 if QUICK else 5).items():
            rec["us"][name] = ms * 1e3 / (len(wb) if name == "bf16" else reps)
        ranked = sorted((v, c) for c, v in rec["us"].items() if c != "bf16")
        rec["best_mma"] = min(((v, c) for v, c in ranked if c.startswith("mma")), default=None)
        rec["best_old"] = min(((v, c) for v, c in ranked if c.startswith("batch1")), default=None)
        print(proj, "bf16 %.2f" % rec["us"]["bf16"], "mma", rec["best_mma"], "old", rec["best_old"],
              [(round(v, 2), c) for v, c in ranked[:8]], flush=True)
        doc["shapes"][proj] = rec
        with open(os.path.join(out_dir, "batch1_mma_probe.json"), "w") as f:
            json.dump(doc, f, indent=1)
        del copies, wb, cands, warm
        torch.cuda.empty_cache()
    sums = {key: sum(r[key][0] for r in doc["shapes"].values() if r.get(key)) for key in ("best_mma", "best_old")}
    bf16 = sum(r["us"]["bf16"] for r in doc["shapes"].values())
    doc["layer"] = {"bf16_us": bf16, **{f"{k}_us": v for k, v in sums.items()},
                    **{f"{k}_ratio": bf16 / v for k, v in sums.items() if v}}
    print("layer", doc["layer"], flush=True)
    with open(os.path.join(out_dir, "batch1_mma_probe.json"), "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
