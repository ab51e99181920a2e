"""Batch-1 (M = 1) W4 g128 on the merged Qwen3-8B shapes: a wide grid of the k-tiled GEMM's small tiles — rows per
program (BN), warps, pipeline stages, split-K — beyond the tuner's table, timed as ``bench gemm`` times (CUDA-graph
replays over copies that overflow L2, candidates round-robin), each checked against the fp64 product first.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/m1_sweep.py     # -> $OUT/m1_sweep_s1-2-3.json
    M1_STAGES=4,5,6 M1_SPLITS=1,2,4,8 ... benchmarks/m1_sweep.py             # -> $OUT/m1_sweep_s4-5-6.json
    M1_KIND=gemv ... benchmarks/m1_sweep.py                                    # -> $OUT/m1_sweep_gemv.json
    M1_KIND=batch1 ... benchmarks/m1_sweep.py                                  # -> $OUT/m1_sweep_batch1.json

Why: ``benchmarks/read_floor.py`` (session 13) measured that a kernel which only reads the W4 bytes costs
1.7 us + bytes / 3.05 TB/s per projection (the layer: 40 us, 3.7x bf16), while the tuned W4 tiles cost 5.5 us +
bytes / 2.67 TB/s (60 us, 2.47x). The tuner's table holds 3-stage tiles with split-K <= 8 and BN >= 32 only; the
read kernel that wins is many short programs whose loads all issue at once. This grid asks whether a k-tiled tile
shaped like it (one or two k-tiles per program, no pipeline) closes the gap. Phase 2 times the three best of each
shape again with PDL (trigger 0, as the library ships it) and with an L2 prefetch of its first k-tiles.
The "tuner" rows are the tuner's k-tiled MMA tiles at M = 1 (``_ktiled_configs``), not its CUDA-core GEMV
candidates (``M1_KIND=gemv`` times those).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

import torch

from qwenquant.bench.gemm import l2_copies, time_interleaved
from qwenquant.bench.hw import environment
from qwenquant.kernels import wq_batch1 as B1
from qwenquant.kernels import wq_ktiled as KT
from qwenquant.runtime import fused

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from wgmma_session import SHAPES, make  # noqa: E402

# (BN, warps): each warp owns 16 or 32 weight rows of the MMA's A operand
TILES = [(16, 1), (32, 1), (32, 2), (64, 2), (64, 4), (128, 4)]
# environment overrides (comma lists): M1_SPLITS, M1_STAGES — the first run (1, 2, 3 stages) found more stages better
SPLITS = [int(v) for v in os.environ.get("M1_SPLITS", "1,2,4,8,16").split(",")]
STAGES = [int(v) for v in os.environ.get("M1_STAGES", "1,2,3").split(",")]


# M1_KIND=gemv: the CUDA-core ``ktiled_gemv`` instead — (BN rows, k-tiles per step, warps): whole-K steps on the 4096-
# column shapes (16 k-tiles), so every word of a program is one load issued at once, like the pure-read kernel
GEMV_TILES = [(1, 8, 1), (1, 16, 1), (2, 8, 1), (2, 16, 1), (2, 16, 2), (4, 8, 1), (4, 16, 1), (4, 16, 2), (4, 16, 4),
              (8, 8, 2), (8, 16, 2), (8, 16, 4), (16, 16, 4)]
GEMV_SPLITS = [1, 2, 3]


# M1_KIND=batch1: kernels/wq_batch1.py (all of a program's words in one load, the k-tiles as one
# batched MMA) — (BN rows, k-tiles per step, warps, split-K) × stages
BATCH1_TILES = [(16, 4, 2, 1), (16, 8, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1), (32, 4, 4, 1), (32, 8, 8, 1), (32, 16, 8, 1),
                (16, 8, 2, 1), (16, 8, 4, 2), (16, 4, 4, 3), (16, 8, 4, 3)]
BATCH1_STAGES = [1, 2]
# overrides: M1_BATCH1_TILES="bn,kb,warps,split_k;…", M1_BATCH1_STAGES="2,3" (session 15: more stages, smaller kb)
if os.environ.get("M1_BATCH1_TILES"):
    BATCH1_TILES = [tuple(int(v) for v in t.split(",")) for t in os.environ["M1_BATCH1_TILES"].split(";")]
if os.environ.get("M1_BATCH1_STAGES"):
    BATCH1_STAGES = [int(v) for v in os.environ["M1_BATCH1_STAGES"].split(",")]


def grid(k: int) -> dict[str, dict]:
    t = KT.tile_columns(4)
    out = {}
    if os.environ.get("M1_KIND") == "batch1":
        for (bn, kb, w, sk), st in itertools.product(BATCH1_TILES, BATCH1_STAGES):
            out[f"batch1 bn{bn} kb{kb} w{w} s{st} sk{sk}"] = dict(batch1=True, bn=bn, kb=kb, num_warps=w, num_stages=st,
                                                                 split_k=sk)
        return out
    if os.environ.get("M1_KIND") == "gemv":
        for (bn, bt, w), sk in itertools.product(GEMV_TILES, GEMV_SPLITS):
            if k // t >= sk * bt or sk == 1:
                out[f"gemv bn{bn} bt{bt} w{w} sk{sk}"] = dict(gemv=True, bn=bn, tiles_per_step=bt, num_warps=w,
                                                             split_k=sk)
        return out
    for (bn, w), sk, st in itertools.product(TILES, SPLITS, STAGES):
        if k // t < sk:
            continue
        out[f"ktiled A bn{bn} w{w} s{st} sk{sk}"] = dict(bm=16, bn=bn, w_as_a=True, split_k=sk, num_warps=w,
                                                          num_stages=st, scale_after=True)
    return out


def run(x, words, sz, gemv=False, batch1=False, **kw):
    if batch1:
        return B1.batch1_gemm(x, words, sz, 4, 128, **kw)
    return KT.ktiled_gemv(x, words, sz, 4, 128, **kw) if gemv else KT.ktiled_gemm(x, words, sz, 4, 128, **kw)


def main():
    doc = {"kind": "m1_sweep", "env": environment(), "commit": os.environ.get("QWENQUANT_COMMIT", "?"),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shapes": {}}
    for proj, (n, k) in SHAPES.items():
        kt, wref = make(n, k, 4, 128, False, seed=1)
        nbytes = kt.words.numel() * 4 + kt.sz.numel() * 4
        reps = l2_copies(nbytes, least=2)
        copies = [(kt.words.clone(), kt.sz.clone()) for _ in range(reps)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ wref.double().T
        wb = [wref.to(torch.bfloat16) for _ in range(l2_copies(n * k * 2, least=2))]
        cands = {name: (lambda kw=kw: [run(x, wd, sz, **kw) for wd, sz in copies]) for name, kw in grid(k).items()}
        tuner = {name: cfg for name, (kind, cfg) in fused._ktiled_configs(1, 4).items() if kind == "ktiled"}
        for name, (bm, bn, wa, sk, w, st, sa, skp) in tuner.items():
            cands["tuner " + name] = (lambda kw=dict(bm=bm, bn=bn, w_as_a=wa, split_k=sk, num_warps=w, num_stages=st,
                                                      scale_after=sa, streamk=skp):
                                      [KT.ktiled_gemm(x, wd, sz, 4, 128, **kw) for wd, sz in copies])
        rec = {"n": n, "k": k, "bytes": nbytes, "copies": reps, "us": {}, "rel_err": {}}
        warm = {}
        t0 = time.time()
        for name, fn in cands.items():
            try:
                y = fn()[0]
                torch.cuda.synchronize()
                err = float((y.double() - ref).norm() / ref.norm())
                rec["rel_err"][name] = err
                if err < 1e-2:
                    warm[name] = fn
                else:
                    print(proj, name, "WRONG", err, flush=True)
            except Exception as e:
                rec["us"][name] = f"error: {type(e).__name__}: {str(e)[:120]}"
        rec["compile_s"] = round(time.time() - t0, 1)
        warm["bf16"] = lambda: [torch.nn.functional.linear(x, w) for w in wb]
        for name, ms in time_interleaved(warm, min_ms=5.0, trials=5).items():
            rec["us"][name] = ms * 1e3 / (len(wb) if name == "bf16" else reps)
        ranked = sorted((v, c) for c, v in rec["us"].items() if isinstance(v, float) and c != "bf16")
        print(proj, "bf16 %.2f" % rec["us"]["bf16"], "best", [(round(v, 2), c) for v, c in ranked[:6]],
              "tuner best", min((v, c) for v, c in ranked if c.startswith("tuner")), flush=True)
        # phase 2: the three best non-tuner tiles with PDL (trigger 0) and with PDL + an L2 prefetch of 1 / 2 k-tiles
        phase2 = {}
        for v, c in [r for r in ranked if not r[1].startswith(("tuner", "batch1"))][:3]:  # batch1 has no PDL yet
            kw = grid(k)[c]
            for pdl, pf in [(False, 0), (True, 0), (True, 1), (True, 2)]:
                phase2[f"{c} pdl{int(pdl)} pf{pf}"] = (
                    lambda kw=kw, pdl=pdl, pf=pf: [run(x, wd, sz, pdl=pdl, prefetch=pf, trigger=0, **kw) for wd, sz in copies])
        ok = {}
        for name, fn in phase2.items():
            try:
                y = fn()[0]
                torch.cuda.synchronize()
                if float((y.double() - ref).norm() / ref.norm()) < 1e-2:
                    ok[name] = fn
            except Exception as e:
                rec["us"][name] = f"error: {type(e).__name__}: {str(e)[:120]}"
        rec["phase2"] = {name: ms * 1e3 / reps for name, ms in time_interleaved(ok, min_ms=5.0, trials=5).items()}
        print(proj, "phase2", {c: round(v, 2) for c, v in sorted(rec["phase2"].items(), key=lambda kv: kv[1])}, flush=True)
        doc["shapes"][proj] = rec
        del copies, wb, cands, warm, phase2, ok
        torch.cuda.empty_cache()
    best = {p: min(v for c, v in r["us"].items() if isinstance(v, float) and c != "bf16") for p, r in doc["shapes"].items()}
    tuner = {p: min(v for c, v in r["us"].items() if isinstance(v, float) and c.startswith("tuner"))
             for p, r in doc["shapes"].items()}
    bf16 = sum(r["us"]["bf16"] for r in doc["shapes"].values())
    doc["layer"] = {"bf16_us": bf16, "best_us": sum(best.values()), "tuner_us": sum(tuner.values()),
                    "best_ratio": bf16 / sum(best.values()), "tuner_ratio": bf16 / sum(tuner.values())}
    print("layer", doc["layer"], flush=True)
    kind = os.environ.get("M1_KIND")
    name = f"m1_sweep_{kind}.json" if kind else f"m1_sweep_s{'-'.join(map(str, STAGES))}.json"
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
