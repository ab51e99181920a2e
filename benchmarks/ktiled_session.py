"""The k-tiled W4A16 GEMM (``kernels/wq_ktiled.py``) vs the other W4 paths, Qwen3-8B shapes, one GPU.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/ktiled_session.py [check] [time]
    # JSON -> $OUT/ktiled_session.json

check: every config of ``fused``'s ktiled tables against a float64 reference on fresh random packed
weights (2/4/8 bits, groups 32/64/128/per-channel, sym/asym, Qwen3-8B shapes, M = 2, 16, 77, 300, 1024),
error as a ratio to the error of rounding Ŵ to bf16.
time: per (shape, M): bf16 F.linear, Triton unpack + cuBLAS (``dequant``), tinygemm (M <= 16), the
``fused`` path as tuned before this kernel (no ktiled copy) and now (with it), and each ktiled config.
CUDA-graph replay over R weight copies (R·bytes >= 200 MB > the 50 MB L2), per copy.
"""

from __future__ import annotations

import json
import os
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


def kt_configs(m: int) -> dict[str, tuple]:
    return {name: cfg for name, (kind, cfg) in fused._ktiled_configs(max(2, fused.m_bucket(m))).items()}


def check(doc):
    gen = torch.Generator(device=DEV).manual_seed(1)
    rows, worst = [], 0.0
    for bits, group, sym in [(4, 128, False), (4, 128, True), (4, 64, False), (4, 32, False), (4, None, False),
                             (8, None, True), (8, 128, False), (2, 128, False)]:
        for n, k in [(4096, 4096), (1024, 4096), (4096, 12288)]:
            g = k if group is None else group
            if not KT.ktiled_ok(bits, g, n, k):
                continue
            qw, s, z = make_packed(n, k, bits, g, sym, gen)
            words = KT.pack_ktiled(qw, bits, k)
            w = K.reference_dequantize(qw, s, z, bits, k)
            for m in (2, 16, 77, 300, 1024):
                x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
                ref = x.double() @ w.double().T
                bf16_err = rel(x.float() @ w.to(torch.bfloat16).float().T, ref)
                for name, cfg in kt_configs(m).items():
                    try:
                        e = rel(KT.ktiled_gemm(x, words, s, z, bits, g, *cfg), ref)
                    except Exception as ex:  # noqa: BLE001
                        e = float("inf")
                        print("ERR", bits, group, n, k, m, name, repr(ex)[:300], flush=True)
                    worst = max(worst, e / max(bf16_err, 1e-6))
                    rows.append(dict(bits=bits, group=group, sym=sym, n=n, k=k, m=m, cfg=name, rel_err=e, bf16_rel_err=bf16_err))
    doc["check"] = {"cases": len(rows), "worst_ratio_to_bf16_rounding": worst,
                    "failures": [r for r in rows if not r["rel_err"] < 1e-2]}
    print(f"check: {len(rows)} cases, worst rel err / bf16-rounding err = {worst:.2f}, "
          f"failures {len(doc['check']['failures'])}", flush=True)
    save(doc)


def time_all(doc):
    gen = torch.Generator(device=DEV).manual_seed(2)
    res = doc.setdefault("time", [])
    group = 128
    for label, (n, k) in SHAPES.items():
        r16 = max(1, -(-L2_OVERFLOW // (n * k * 2)))
        w16 = [torch.randn(n, k, device=DEV, generator=gen).to(torch.bfloat16) * 0.02 for _ in range(r16)]
        w4_bytes = n * k // 2 + n * (k // group) * 3
        r4 = max(1, -(-L2_OVERFLOW // w4_bytes))
        packed = [make_packed(n, k, 4, group, False, gen) for _ in range(r4)]
        ops_old = [fused.FusedOperands(tiny=fused.tinygemm_operands(*p, group)) for p in packed]
        ops_new = [fused.FusedOperands(tiny=o.tiny, ktiled=KT.pack_ktiled(p[0], 4, k)) for o, p in zip(ops_old, packed)]
        for m in ROWS:
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            t0 = time.time()
            us = {"bf16": timed(lambda i: F.linear(x, w16[i]), r16)}
            us["dequant"] = timed(lambda i: F.linear(x, K.dequantize(*packed[i], 4, group, k)), min(r4, 8))
            for tag, ops in (("fused(before)", ops_old), ("fused(now)", ops_new)):
                o = ops if m <= fused.TINYGEMM_MAX_M else [fused.FusedOperands(ktiled=q.ktiled) for q in ops]
                try:
                    fused.fused_matmul(x, *packed[0], 4, group, o[0])  # tunes once (bucket)
                    us[tag] = timed(lambda i: fused.fused_matmul(x, *packed[i], 4, group, o[i]), r4)
                except Exception as ex:  # noqa: BLE001
                    print(tag, "ERR", label, m, repr(ex)[:300], flush=True)
            if m > 1:
                for name, cfg in kt_configs(m).items():
                    try:
                        KT.ktiled_gemm(x, ops_new[0].ktiled, *packed[0][1:], 4, group, *cfg)
                        us[name] = timed(lambda i: KT.ktiled_gemm(x, ops_new[i].ktiled, *packed[i][1:], 4, group, *cfg), r4)
                    except Exception as ex:  # noqa: BLE001
                        print("kt ERR", name, repr(ex)[:300], flush=True)
            kt = {kk: v for kk, v in us.items() if kk.startswith("ktiled")}
            best = min(kt, key=kt.get) if kt else None
            floor_us = w4_bytes / doc["copy_bw"] * 1e6
            res.append({"shape": label, "n": n, "k": k, "m": m, "us": us, "best_ktiled": best, "w4_floor_us": floor_us})
            b16 = us["bf16"]
            summary = {kk: round(b16 / v, 2) for kk, v in us.items() if not kk.startswith("ktiled")}
            if best:
                summary["best_kt"] = round(b16 / kt[best], 2)
            print(f"{label} M={m}: bf16 {b16:.1f} us; vs bf16 {summary}; best {best} "
                  f"({kt.get(best, 0):.1f} us, W4 floor {floor_us:.1f}); {time.time() - t0:.0f}s", flush=True)
            save(doc)
        del w16, packed, ops_old, ops_new
        torch.cuda.empty_cache()
    doc["fused_choices"] = fused.TUNER.table()
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
