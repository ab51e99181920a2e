"""The k-tiled W4A16 GEMM (``kernels/wq_ktiled.py``) vs the other W4 paths, Qwen3-8B shapes, one GPU.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/ktiled_session.py [check] [time]
    # JSON -> $OUT/ktiled_session.json

check: every config of ``fused``'s ktiled tables against a float64 reference on fresh random packed
weights (2/4/8 bits, groups 32/64/128/per-channel, sym/asym, Qwen3-8B shapes, M = 2, 16, 77, 300, 1024),
error as a ratio to the error of rounding Ŵ to bf16.
time: per (shape, M): bf16 F.linear, Triton unpack + cuBLAS (``dequant``), tinygemm (M <= 16), the
``fused`` path as tuned before this kernel (no ktiled copy) and now (with it), and each ktiled config.
CUDA-graph replay over R weight copies (R·bytes >= 200 MB > the 50 MB L2), per copy.
(The ``pairs`` stage behind results/ktiled_pairs_h100.json is in commit ef9ec26, with the variant it timed.)
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from w4_session import L2_OVERFLOW, SHAPES, make_packed, rel, timed  # noqa: E402

from qwenquant.bench.hw import environment  # noqa: E402
from qwenquant.kernels import wq_ktiled as KT  # noqa: E402
from qwenquant.kernels import wq_matmul as K  # noqa: E402
from qwenquant.runtime import fused  # noqa: E402

OUT = os.environ.get("OUT", "runs/ktiled")
DEV = "cuda"
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def save(doc):
    with open(os.path.join(OUT, "ktiled_session.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)


def kt_configs(m: int, bits: int = 4) -> dict[str, tuple]:
    """fused's ktiled table for M's bucket."""
    return {name: cfg for name, (kind, cfg) in fused._ktiled_configs(max(2, fused.m_bucket(m)), bits).items()}



def check(doc):
    gen = torch.Generator(device=DEV).manual_seed(1)
    rows, worst = [], 0.0
    only_bits = [int(b) for b in os.environ.get("KTILED_CHECK_BITS", "4,8,2").split(",")]  # e.g. "8,2"
    for bits, group, sym in [(4, 128, False), (4, 32, True), (4, None, False), (8, None, True), (2, 128, False)]:
        if bits not in only_bits:
            continue
        for n, k in [(1024, 4096), (4096, 12288)]:
            g = k if group is None else group
            if not KT.ktiled_ok(bits, g, n, k):
                continue
            qw, s, z = make_packed(n, k, bits, g, sym, gen)
            words, sz = KT.pack_ktiled(qw, bits, k), KT.pack_ktiled_scales(s, z)
            w = K.reference_dequantize(qw, s, z, bits, k)
            for m in [int(r) for r in os.environ.get("KTILED_CHECK_ROWS", "1,2,16,77,300").split(",")]:
                x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
                ref = x.double() @ w.double().T
                bf16_err = rel(x.float() @ w.to(torch.bfloat16).float().T, ref)
                cfgs = kt_configs(m, bits)
                if (m > 64 or os.environ.get("KTILED_CHECK_GRID")) and bits != 2:  # the exploration grid too
                    # (2-bit tiles are too wide for the large grid's stages)
                    cfgs.update({nm: c for nm, c in grid_configs(m).items() if not c[6] or bits in KT.SCALE_AFTER_BITS})
                if os.environ.get("KTILED_CHECK_ONLY"):  # a substring of the config names, e.g. "after"
                    cfgs = {nm: c for nm, c in cfgs.items() if os.environ["KTILED_CHECK_ONLY"] in nm}
                for name, cfg in cfgs.items():
                    try:
                        e = rel(KT.ktiled_gemm(x, words, sz, bits, g, *cfg), ref)
                    except Exception as ex:  # noqa: BLE001
                        e = float("inf")
                        print("ERR", bits, group, n, k, m, name, repr(ex)[:300], flush=True)
                    worst = max(worst, e / max(bf16_err, 1e-6))
                    rows.append(dict(bits=bits, group=group, sym=sym, n=n, k=k, m=m, cfg=name, rel_err=e, bf16_rel_err=bf16_err))
            bad = [r for r in rows if not r["rel_err"] < 1e-2]
            print(f"  {bits}-bit g{group} sym={sym} {n}x{k}: {len(rows)} cases so far, worst ratio {worst:.2f}, failures {len(bad)}",
                  flush=True)
            doc["check"] = {"cases": len(rows), "worst_ratio_to_bf16_rounding": worst, "failures": bad, "partial": True}
            save(doc)
    doc["check"] = {"cases": len(rows), "worst_ratio_to_bf16_rounding": worst,
                    "failures": [r for r in rows if not r["rel_err"] < 1e-2]}
    print(f"check: {len(rows)} cases, worst rel err / bf16-rounding err = {worst:.2f}, "
          f"failures {len(doc['check']['failures'])}", flush=True)
    save(doc)


# exploration grid (the tables in runtime/fused.py keep the winners)
# M <= 64, weight as A: (BN, warps, stages, split-K)
SMALL_GRID = [(16, 2, 3, 4), (16, 2, 3, 8), (32, 2, 3, 4), (32, 2, 3, 8), (32, 4, 3, 8), (32, 2, 3, 16),
              (64, 4, 3, 1), (64, 4, 3, 2), (64, 4, 3, 4), (64, 4, 3, 8), (64, 4, 4, 8), (64, 4, 3, 16),
              (128, 4, 3, 2), (128, 4, 3, 4), (128, 8, 3, 4), (128, 4, 3, 8), (128, 8, 3, 8)]
SMALL_GRID_B = [(64, 4, 3, 8), (128, 4, 3, 8), (64, 4, 3, 4), (128, 4, 3, 4)]  # weight as B, BM = 16..64
# M >= 128: (BM, BN, weight as A?, warps, stages, split-K)
LARGE_GRID = [(128, 128, True, 8, 2, 1), (128, 128, True, 8, 2, 2), (128, 128, True, 8, 2, 4), (64, 128, True, 4, 3, 1),
              (64, 128, True, 4, 3, 2), (64, 128, True, 4, 3, 4), (128, 64, True, 4, 3, 2), (128, 256, True, 8, 2, 1),
              (128, 128, False, 8, 2, 1), (128, 128, False, 8, 2, 2), (128, 128, False, 8, 2, 4), (64, 128, False, 4, 3, 2),
              (128, 256, False, 8, 2, 1), (64, 256, False, 8, 3, 1), (128, 64, False, 4, 3, 2)]
LARGE_GRID_AFTER = [(128, 128, True, 8, 2, 1), (128, 128, True, 8, 2, 2), (64, 128, True, 8, 3, 1), (64, 128, True, 8, 3, 2),
                    (64, 128, True, 4, 3, 1), (64, 128, True, 4, 3, 2), (128, 64, True, 4, 3, 1), (64, 64, True, 4, 3, 1),
                    (128, 128, False, 8, 2, 1), (64, 128, False, 4, 3, 1)]
# stream-K schedule (scale-after, weight as A): (BN, warps, stages, programs per SM) for M <= 64 and
# (BM, BN, warps, stages, programs per SM) beyond
STREAMK_SMALL = [(64, 4, 3, 3), (64, 4, 3, 2), (64, 4, 3, 6), (128, 4, 3, 2), (128, 4, 3, 1), (128, 4, 3, 4),
                 (32, 2, 3, 4), (32, 2, 3, 8)]
STREAMK_LARGE = [(128, 128, 8, 2, 1), (64, 128, 8, 3, 1), (64, 128, 8, 3, 2), (64, 64, 4, 3, 2), (64, 64, 4, 3, 3)]
TIME_ROWS = [1, 2, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]


def grid_configs(m: int) -> dict[str, tuple]:
    """name -> ktiled_gemm args (bm, bn, w_as_a, split_k, warps, stages, scale_after[, streamk]): each small-M
    tile both ways (scale before / after the MMA), the large-M grid with a few scale-after tiles, and the stream-K
    tiles (8-tuples: programs per SM last)."""
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        out = {}
        for sa in (False, True):
            tag = " after" if sa else ""
            out.update({f"ktiled A bn{bn} bm{bm} w{w} s{st} sk{sk}{tag}": (bm, bn, True, sk, w, st, sa) for bn, w, st, sk in SMALL_GRID})
            out.update({f"ktiled B bn{bn} bm{bm} w{w} s{st} sk{sk}{tag}": (bm, bn, False, sk, w, st, sa) for bn, w, st, sk in SMALL_GRID_B})
        out.update({f"ktiled A bn{bn} bm{bm} w{w} s{st} streamk{p} after": (bm, bn, True, 1, w, st, True, p)
                    for bn, w, st, p in STREAMK_SMALL})
        return out
    out = {f"ktiled {'A' if wa else 'B'} bm{bm} bn{bn} w{w} s{st} sk{sk}": (bm, bn, wa, sk, w, st, False)
           for bm, bn, wa, w, st, sk in LARGE_GRID}
    out.update({f"ktiled {'A' if wa else 'B'} bm{bm} bn{bn} w{w} s{st} sk{sk} after": (bm, bn, wa, sk, w, st, True)
                for bm, bn, wa, w, st, sk in LARGE_GRID_AFTER})
    out.update({f"ktiled A bm{bm} bn{bn} w{w} s{st} streamk{p} after": (bm, bn, True, 1, w, st, True, p)
                for bm, bn, w, st, p in STREAMK_LARGE})
    return out


def shape_operands(n: int, k: int, group: int, gen):
    """bf16 weights and W4 packed weights (+ their k-tiled words), each repeated past the L2 size:
    (w16, r16, packed, r4, w4_bytes, words)."""
    r16 = max(1, -(-L2_OVERFLOW // (n * k * 2)))
    w16 = [torch.randn(n, k, device=DEV, generator=gen).to(torch.bfloat16) * 0.02 for _ in range(r16)]
    w4_bytes = n * k // 2 + n * (k // group) * 3
    r4 = max(1, -(-L2_OVERFLOW // w4_bytes))
    packed = [make_packed(n, k, 4, group, False, gen) for _ in range(r4)]
    words = [(KT.pack_ktiled(p[0], 4, k), KT.pack_ktiled_scales(p[1], p[2])) for p in packed]
    return w16, r16, packed, r4, w4_bytes, words


def time_all(doc):
    gen = torch.Generator(device=DEV).manual_seed(2)
    res = doc.setdefault("time", [])
    group = 128
    only = os.environ.get("KTILED_SHAPES")  # e.g. "gate/up,down": a subset of w4_session.SHAPES by prefix
    shapes = {lb: nk for lb, nk in SHAPES.items() if not only or any(lb.startswith(p) for p in only.split(","))}
    for label, (n, k) in shapes.items():
        w16, r16, packed, r4, w4_bytes, words = shape_operands(n, k, group, gen)
        tiny = [fused.tinygemm_operands(*p, group) for p in packed]
        rows = [int(r) for r in os.environ["KTILED_ROWS"].split(",")] if os.environ.get("KTILED_ROWS") else TIME_ROWS
        for m in rows:
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            t0 = time.time()
            us = {"bf16": timed(lambda i: F.linear(x, w16[i]), r16)}
            if m <= 16:
                us["tinygemm"] = timed(lambda i: torch.ops.aten._weight_int4pack_mm(x, tiny[i].packed, group, tiny[i].scale_zero), r4)
            else:
                us["dequant"] = timed(lambda i: F.linear(x, K.dequantize(*packed[i], 4, group, k)), min(r4, 8))
            for name, cfg in grid_configs(m).items():
                if os.environ.get("KTILED_TIME_ONLY") and not re.search(os.environ["KTILED_TIME_ONLY"], name):
                    continue  # a regex over the config names, e.g. "after|bm128 bn128 w8 s2 sk1"
                try:
                    KT.ktiled_gemm(x, *words[0], 4, group, *cfg)
                    us[name] = timed(lambda i: KT.ktiled_gemm(x, *words[i], 4, group, *cfg), r4)
                except Exception as ex:  # noqa: BLE001
                    us[name] = None
                    print("kt ERR", name, repr(ex)[:120], flush=True)
            kt = {kk: v for kk, v in us.items() if kk.startswith("ktiled") and v}
            best = min(kt, key=kt.get) if kt else None
            floor_us = w4_bytes / doc["copy_bw"] * 1e6
            res.append({"shape": label, "n": n, "k": k, "m": m, "us": us, "best_ktiled": best, "w4_floor_us": floor_us})
            b16 = us["bf16"]
            top = sorted(kt, key=kt.get)[:3]
            print(f"{label} M={m}: bf16 {b16:.1f} us; " + ", ".join(f"{kk} {b16 / us[kk]:.2f}x" for kk in ("tinygemm", "dequant") if kk in us)
                  + "; best ktiled: " + ", ".join(f"{kk} {kt[kk]:.1f} us ({b16 / kt[kk]:.2f}x)" for kk in top)
                  + f"; W4 floor {floor_us:.1f} us; {time.time() - t0:.0f}s", flush=True)
            save(doc)
        del w16, packed, tiny, words
        torch.cuda.empty_cache()
    save(doc)


def main():
    os.makedirs(OUT, exist_ok=True)
    doc = {"env": environment(), "commit": os.environ.get("QWENQUANT_COMMIT", "")}
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    from qwenquant.bench.gemm import time_graph

    ms = time_graph(lambda: b.copy_(a))
    doc["copy_bw"] = 2 * a.numel() / (ms * 1e-3)
    del a, b
    print(f"copy {doc['copy_bw'] / 1e12:.2f} TB/s", flush=True)
    stages = sys.argv[1:] or ["check", "time"]
    if "check" in stages:
        check(doc)
    if "time" in stages:
        time_all(doc)


if __name__ == "__main__":
    main()
