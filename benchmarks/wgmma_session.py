"""GPU session for ``kernels/wq_wgmma.py`` (the Gluon GEMM that overlaps dequantization with the wgmma in flight).

    PYTHONPATH=src python3 benchmarks/wgmma_session.py [check] [time] > $OUT/wgmma.json

``check``: every config in ``wq_wgmma.CONFIGS`` against the plain-torch reference (fp64 on the exact dequantized
weight) on fresh random inputs: bit widths 2/4/8, groups 32-128 and per-channel, sym/asym, bf16/fp16, N not a
multiple of the tile, M from 1 to 1000 (tails of every tile); also against cuBLAS on the same Ŵ.
``time``: Qwen3-8B merged projections × M = 128 … 8192: cuBLAS bf16, the best of the k-tiled large tiles
(``fused.KTILED_LARGE``), unpack + cuBLAS (``auto``'s other candidate), and each wgmma config; CUDA-graph replay
(``bench.gemm.time_interleaved``: the candidates of one M in round-robin trials), L2 not flushed (at these M the shapes are compute-bound; gate/up's weights exceed L2).
Configs are ``wq_wgmma.CONFIGS`` (the 6th field: stream-K programs per SM; ``check`` also runs stream-K on 3 and 5
programs, so spans start and end inside tiles). ``time`` adds the best tile with the two-LOP3 field extraction,
``X3D_CONFIGS`` with SPS 2-D TMA copies per ring stage (`` 2d``, ``x3d=False``; the default is one 3-D copy;
``check`` runs both) and the warp-specialized ``wq_wgmma_ws`` tiles (``wgmma-ws …``; ``check`` runs
them too; the persistent ones also as `` gm8``, in the grouped order). WGMMA_ONLY="wgmma-ws" keeps only those
among the wgmma candidates.
``smoke``: one case per config, first. Env: WGMMA_KTILED=0 (skip the k-tiled tiles), WGMMA_CHECK (quick|full formats), WGMMA_ROWS (comma list), WGMMA_SHAPES (qkv,o,gate_up,down),
WGMMA_ONLY (';'-separated substrings of the wgmma candidate names to time).
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
from qwenquant.kernels import wq_matmul as K
from qwenquant.kernels import wq_wgmma as W
from qwenquant.kernels import wq_wgmma_ws as WS
from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime import fused
from qwenquant.runtime.quant_linear import QuantLinear

# tiles timed (and checked) with both x descriptors: the offered 8-warp ones, bn 64 × bm 256, a 6-stage ring of 2 slices
X3D_CONFIGS = (W.CONFIGS[0], W.CONFIGS[1], W.CONFIGS[3], W.CONFIGS[6], (128, 256, 8, 6, 2, 0))
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


def make(n, k, bits, group, sym, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    layer = QuantLinear.from_weight(quantize_weight(w, QuantSpec(bits, group, sym)), compute_dtype=torch.bfloat16)
    layer = layer.to("cuda")
    kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k)  # fp32 [N, K]
    return kt, wref


def smoke() -> list[dict]:
    """One case per config (4-bit g128, bf16, M = 128): the first thing to run on a new machine."""
    kt, wref = make(256, 1024, 4, 128, False, seed=0)
    x = torch.randn(128, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ wref.double().T
    out = []
    for cfg, programs in [(c, None) for c in W.CONFIGS] + [(W.CONFIGS[6], 3)]:
        t = time.time()
        errs = []
        for _ in range(2):  # twice: stream-K must leave its workspace and counters zeroed
            y = W.wgmma_gemm(x, kt.words, kt.sz, 4, 128, *cfg, programs=programs)
            torch.cuda.synchronize()
            errs.append(float((y.double() - ref).norm() / ref.norm()))
        out.append({"config": list(cfg), "programs": programs, "rel_err": errs, "seconds": round(time.time() - t, 2)})
        print("smoke", out[-1], file=sys.stderr, flush=True)
    return out


FORMATS = {"full": [(4, 128, False), (4, 128, True), (4, 64, False), (4, 32, True), (4, None, False),
                    (8, 128, False), (8, None, True), (2, 64, False), (2, 128, True)],
           "quick": [(4, 128, False), (4, 32, True), (8, None, True), (2, 64, False)]}


def check() -> list[dict]:
    out = []
    formats = FORMATS[os.environ.get("WGMMA_CHECK", "quick")]
    for (n, k) in [(256, 1024), (200, 2048)]:
        for bits, group, sym in formats:
            g = k if group is None else group
            if not W.wgmma_ok("cuda", bits, g, n, k):
                out.append({"n": n, "k": k, "bits": bits, "group": g, "skipped": "not wgmma_ok"})
                continue
            kt, wref = make(n, k, bits, group, sym, seed=n + k + bits)
            for dtype in (torch.bfloat16, torch.float16) if (bits, group) == (4, 128) else (torch.bfloat16, ):
                w_cast = wref.to(dtype)
                for m in (1, 100, 300):
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    ref = x.double() @ wref.double().T
                    cublas = torch.nn.functional.linear(x, w_cast)
                    for cfg, programs, x3d in ([(c, None, False) for c in W.CONFIGS] + [(c, None, True) for c in X3D_CONFIGS]
                                               + [(W.CONFIGS[6], 3, False), (W.CONFIGS[6], 5, True)]
                                               + [(c, "ws", True) for c in WS.CONFIGS]):
                        if programs == "ws":  # the warp-specialized kernel's (bm, stages, sps) tiles
                            y = WS.wgmma_ws_gemm(x, kt.words, kt.sz, bits, g, *cfg)
                        else:
                            y = W.wgmma_gemm(x, kt.words, kt.sz, bits, g, *cfg, programs=programs, x3d=x3d)
                        torch.cuda.synchronize()
                        err = float((y.double() - ref).norm() / ref.norm())
                        err_cublas = float((cublas.double() - ref).norm() / ref.norm())
                        out.append({"n": n, "k": k, "bits": bits, "group": g, "sym": sym, "dtype": str(dtype), "m": m,
                                    "config": list(cfg), "programs": programs, "x3d": x3d, "rel_err": err, "rel_err_cublas": err_cublas,
                                    "finite": bool(torch.isfinite(y).all()), "ok": err < 1e-2 and err < 3 * err_cublas + 1e-4})
                        print("check", out[-1], file=sys.stderr, flush=True)
    return out


def timings() -> list[dict]:
    rows = [int(r) for r in os.environ.get("WGMMA_ROWS", "128,256,512,1024,2048,4096,8192").split(",")]
    names = os.environ.get("WGMMA_SHAPES", "qkv,o,gate_up,down").split(",")
    out = []
    for name in names:
        n, k = SHAPES[name]
        kt, wref = make(n, k, 4, 128, False, seed=1)
        wb = wref.to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rec = {"proj": name, "n": n, "k": k, "m": m, "us": {}}
            cands = {"bf16": lambda: torch.mm(x, wb.T),
                     "dequant+mm": lambda: torch.mm(x, KT.dequantize_ktiled(kt.words, kt.sz, 4, 128, k).T)}
            for cfg_name, (kind, cfg) in fused._ktiled_configs(m, 4).items() if os.environ.get("WGMMA_KTILED", "1") == "1" else ():
                cands[cfg_name] = lambda cfg=cfg: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, *cfg)
            for cfg in W.CONFIGS:
                cands[fused.wgmma_name(cfg)] = lambda c=cfg: W.wgmma_gemm(x, kt.words, kt.sz, 4, 128, *c)
            # the field extraction written in plain Gluon (two LOP3s per field) on the tile that wins most
            cands[fused.wgmma_name(W.CONFIGS[1]) + " twolop3"] = (
                lambda: W.wgmma_gemm(x, kt.words, kt.sz, 4, 128, *W.CONFIGS[1], lop3=False))
            # SPS 2-D TMA copies per ring stage (before session 12; the default is one 3-D copy), on some tiles
            for cfg in X3D_CONFIGS:
                cands[fused.wgmma_name(cfg) + " 2d"] = (
                    lambda c=cfg: W.wgmma_gemm(x, kt.words, kt.sz, 4, 128, *c, x3d=False))
            # the warp-specialized kernel (producer warp for every TMA copy), each offered tile
            for cfg in WS.CONFIGS:
                cands[fused.wgmma_ws_name(cfg)] = (
                    lambda c=cfg: WS.wgmma_ws_gemm(x, kt.words, kt.sz, 4, 128, *c))
                if cfg[3]:  # persistent: also in the grouped order (8 x-row tiles per group; the default walks them
                    # fastest), which measured the same in session 15
                    cands[fused.wgmma_ws_name(cfg) + " gm8"] = (
                        lambda c=cfg: WS.wgmma_ws_gemm(x, kt.words, kt.sz, 4, 128, *c, group_m=8))
            only = os.environ.get("WGMMA_ONLY")  # e.g. "streamk;s4 sps2": keep wgmma names containing one of these
            if only:
                cands = {c: f for c, f in cands.items()
                         if not c.startswith("wgmma") or any(o in c for o in only.split(";"))}
            warm = {}
            for cname, fn in cands.items():
                try:
                    fn()
                    torch.cuda.synchronize()
                    warm[cname] = fn
                except Exception as e:  # a config that does not fit (shared memory, registers): recorded, skipped
                    rec["us"][cname] = f"error: {type(e).__name__}: {str(e)[:120]}"
            # round-robin trials: clock drift over the candidates of one M lands on all of them alike
            for cname, ms in time_interleaved(warm, min_ms=5.0, trials=5).items():
                rec["us"][cname] = round(1000 * ms, 2)
            best_kt = min(((v, c) for c, v in rec["us"].items() if c.startswith("ktiled") and isinstance(v, float)),
                          default=(float("nan"), None))
            best_w = min((v, c) for c, v in rec["us"].items() if c.startswith("wgmma") and isinstance(v, float))
            bf = rec["us"]["bf16"]
            rec["summary"] = {"bf16": bf, "ktiled_best": best_kt, "wgmma_best": best_w,
                              "dequant+mm": rec["us"]["dequant+mm"],
                              "ratio_ktiled": round(bf / best_kt[0], 3), "ratio_wgmma": round(bf / best_w[0], 3),
                              "ratio_dequant": round(bf / rec["us"]["dequant+mm"], 3) if isinstance(rec["us"]["dequant+mm"], float) else None,
                              "tflops_wgmma": round(2 * m * n * k / best_w[0] / 1e6, 1)}
            print(name, m, rec["summary"], file=sys.stderr, flush=True)
            out.append(rec)
    return out


def main(argv):
    stages = argv or ["check", "time"]
    res = {"env": environment(), "commit": os.environ.get("QWENQUANT_COMMIT", "?"),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "configs": [list(c) for c in W.CONFIGS]}
    if "smoke" in stages:
        res["smoke"] = smoke()
    if "check" in stages:
        t = time.time()
        res["check"] = check()
        bad = [r for r in res["check"] if "ok" in r and not r["ok"]]
        res["check_summary"] = {"cases": sum("ok" in r for r in res["check"]), "failed": len(bad),
                                "worst": max((r["rel_err"] for r in res["check"] if "rel_err" in r), default=None),
                                "seconds": round(time.time() - t, 1)}
        print("check", res["check_summary"], bad[:5], file=sys.stderr, flush=True)
    if "time" in stages:
        res["time"] = timings()
    json.dump(res, sys.stdout, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
