"""Batch-1 kernels on small weights (Qwen3-0.6B, 30B-A3B experts), on the GPU: the k-tiled GEMV's variants against
the checkpoint-layout GEMV and the k-tiled GEMM's best small tile, with the tuner's cold-L2 timer.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/gemv_small.py   # -> $OUT/gemv_small.json
    # committed as results/batch1_small_weights_h100.json (gemv*.json is gemv_session.py's format)

Why: holding only the k-tiled layout (session 8) cost these shapes their 3.0 µs checkpoint GEMV; the k-tiled kernels
sat at ≈ 4.6 µs. Each variant is checked against the float64 reference before it is timed.
"""

from __future__ import annotations

import itertools
import json
import os

import torch

from qwenquant.bench.hw import environment
from qwenquant.kernels import wq_ktiled as KT
from qwenquant.kernels import wq_matmul as K
from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.numerics.affine import affine_to_tensors
from qwenquant.runtime import fused
from qwenquant.runtime.tuning import _time_cold

# the k-tiled GEMV grid (environment overrides: comma lists); the first trial (e64f529) found 1 warp, 4 rows, 4 tiles
GEMV_BN, GEMV_BT, GEMV_SPLITS, GEMV_WARPS = ([int(v) for v in os.environ.get(name, default).split(",")] for name, default in (
    ("GEMV_BN", "2,4,8"), ("GEMV_BT", "4,8"), ("GEMV_SPLITS", "1,2,4"), ("GEMV_WARPS", "1,2")))
SHAPES = [tuple(int(v) for v in nk.split("x")) for nk in os.environ.get(
    "GEMV_SHAPES", "1024x1024,3072x1024,1024x3072,768x2048,2048x768,4096x4096").split(",")]
# GEMV_GEMM_GRID=1 adds a wider grid of the k-tiled GEMM's batch-1 tiles (BM = 16): BN x split-K x warps x stages,
# and stream-K with 1-4 programs per SM — for the mid-size weights (Qwen3-8B o / qkv) where the GEMM, not the GEMV, wins
GEMM_GRID = os.environ.get("GEMV_GEMM_GRID") == "1"


def main() -> None:
    out = os.environ.get("OUT", "runs")
    rows = []
    for n, k in SHAPES:
        t = affine_to_tensors(quantize_weight(torch.randn(n, k, device="cuda") * 0.02, QuantSpec(4, 128, False)))
        qw, s, z = t["qweight"], t["scale"], t["zero"]
        kt = KT.KTiledWeight.from_checkpoint(qw, s, z, 4, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ K.reference_dequantize(qw, s, z, 4, k).double().T
        wb = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        cands = {"bf16": lambda: x @ wb.T}
        for c in fused.GEMV2_CONFIGS:
            if K.gemv2_ok(4, 128, k, c[1]):
                cands[f"ckpt gemv2 {c}"] = lambda c=c: K.gemv2(x, qw, s, z, 4, 128, *c)
        for name, (kind, cfg) in fused._ktiled_configs(16, 4).items():
            cands[name] = lambda cfg=cfg: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, *cfg)
        if GEMM_GRID:  # (bm, bn, w_as_a, split_k, warps, stages, scale_after, streamk)
            for bn, sk, w, st, wa in itertools.product((32, 64, 128), (2, 4, 8, 16), (2, 4), (3,), (True, False)):
                if k // 256 >= sk and not (bn == 32 and w == 4):
                    cands[f"grid ktiled {'A' if wa else 'B'} bn{bn} sk{sk} w{w} s{st}"] = (
                        lambda c=(16, bn, wa, sk, w, st, True, 0): KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, *c))
            for bn, p in itertools.product((64, 128), (1, 2, 3, 4)):
                cands[f"grid ktiled A bn{bn} streamk{p}"] = (
                    lambda c=(16, bn, True, 1, 4, 3, True, p): KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, *c))
        for bn, bt, sk, w, st in itertools.product(GEMV_BN, GEMV_BT, GEMV_SPLITS, GEMV_WARPS, (1,)):
            if sk > 1 and k // 256 < sk:
                continue
            cands[f"ktiled gemv bn{bn} bt{bt} sk{sk} w{w} s{st}"] = (
                lambda a=(bn, bt, sk, w, st): KT.ktiled_gemv(x, kt.words, kt.sz, 4, 128, bn=a[0], tiles_per_step=a[1],
                                                             split_k=a[2], num_warps=a[3], num_stages=a[4]))
        times = {}
        for name, fn in cands.items():
            try:
                y = fn()
                if name != "bf16":
                    err = float((y.double() - ref).norm() / ref.norm())
                    assert err < 1e-2, (name, err)
                times[name] = _time_cold(fn, 10) * 1e3
            except Exception as e:  # noqa: BLE001 — a variant that does not compile is reported, not fatal
                times[name] = repr(e)[:200]
        ok = {a: b for a, b in times.items() if isinstance(b, float)}
        best = sorted(ok.items(), key=lambda p: p[1])[:6]
        print(n, k, "bf16 %.2f" % ok["bf16"], [(a, round(b, 2)) for a, b in best], flush=True)
        rows.append({"n": n, "k": k, "us": times})
    with open(os.path.join(out, "gemv_small.json"), "w") as f:
        json.dump({"kind": "gemv_small", "env": environment(), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
