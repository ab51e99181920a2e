"""W4A16 decode GEMV (M = 1..4) at Qwen3-8B shapes: correctness of every variant, then CUDA-graph timings.

    PYTHONPATH=src python3 benchmarks/gemv_session.py            # on the device machine; JSON -> $OUT/gemv.json

Correctness: every ``gemv2`` variant (and the old ``gemv``) vs a float64 reference on fresh random packed
weights, for 4096x4096, 1024x4096, 12288x4096, 4096x12288 at g128 asym, g128 sym, g64 asym and M = 1..4.
Timing: each variant runs as a CUDA graph of R launches over R distinct weight copies (R·bytes >= 160 MB,
> 3x the 50 MB L2, so every launch reads from HBM), median of replays / R; bf16 F.linear and torch's
tinygemm (``_weight_int4pack_mm``) are timed the same way in the same run. Then the whole 7-linear
Qwen3-8B layer (q,k,v,o,gate,up,down) as one graph over 4 layers' weights, best variant per shape.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from qwenquant.kernels import wq_matmul as K
from qwenquant.runtime import fused

OUT = os.environ.get("OUT", "runs/gemv")
DEV = "cuda"
SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 12288x4096": (12288, 4096),
          "down 4096x12288": (4096, 12288)}
LAYER = ["q/o 4096x4096", "k/v 1024x4096", "k/v 1024x4096", "q/o 4096x4096", "gate/up 12288x4096",
         "gate/up 12288x4096", "down 4096x12288"]
FORMATS = [(128, False), (128, True), (64, False)]
# (bn, bkw, split_k, warps, stages, xvec)
VARIANTS = [  # run 1 (results/gemv_qwen3-8b_h100_run1.json): xvec and BKW=32 lost everywhere, bn4-8 x bkw128 won
    (8, 128, 1, 4, 1, False, False), (4, 128, 1, 4, 1, False, False), (8, 256, 1, 4, 1, False, False),
    (4, 256, 1, 4, 1, False, False), (8, 256, 1, 8, 1, False, False), (16, 128, 1, 8, 1, False, False),
    (8, 128, 1, 4, 1, False, True), (4, 128, 1, 4, 1, False, True), (8, 64, 1, 4, 1, False, True),
    (16, 64, 1, 4, 1, False, True), (8, 256, 1, 4, 1, False, True), (4, 256, 1, 4, 1, False, True),
    (8, 128, 2, 4, 1, False, True), (16, 128, 1, 8, 1, False, True), (4, 128, 2, 4, 1, False, True),
    (4, 64, 1, 2, 1, False, True), (2, 256, 1, 2, 1, False, True),
]
OLD = (16, 64, 1, 4)


def vname(v):
    bn, bkw, sk, w, st, xv, pf = v
    return f"v2 bn{bn} bkw{bkw} sk{sk} w{w} s{st}{' xvec' if xv else ''}{' pf' if pf else ''}"


def make_w4(n, k, group, sym, gen=None):
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV)
    s = (torch.rand(n, k // group, device=DEV) * 0.02 + 0.002).half()
    if sym:
        z = torch.full((n, k // group), 8, dtype=torch.uint8, device=DEV)
    else:
        z = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, device=DEV)
    return qw, s, z


def deq64(qw, s, z, group):
    lo = (qw & 15).to(torch.float64)
    hi = (qw >> 4).to(torch.float64)
    codes = torch.stack([lo, hi], -1).reshape(qw.shape[0], -1)
    return (codes - z.double().repeat_interleave(group, 1)) * s.double().repeat_interleave(group, 1)


def rel_err(y, ref):
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.double() - ref).norm() / ref.norm())


def time_graph(fns, reps=15):
    """median µs per call of a graph that runs every fn once (fns read distinct buffers)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1000 / len(fns))
    del g
    return statistics.median(ts)


def copy_bw():
    a = torch.empty(1 << 29, dtype=torch.uint8, device=DEV).random_(0, 255)
    b = torch.empty_like(a)
    t = time_graph([lambda: b.copy_(a)] * 4)
    return 2 * a.numel() / (t * 1e-6)


def tinygemm_prepare(qw, s, z, group):
    t = fused.tinygemm_operands(qw, s, z, group)  # the same repack `fused` mode uses
    return t.packed, t.scale_zero


def main():
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": [vname(v) for v in VARIANTS],
           "correctness": [], "timing": [], "layer": [], "errors": []}
    res["copy_bytes_per_s"] = bw = copy_bw()
    print(f"copy {bw/1e12:.2f} TB/s", flush=True)

    def dump():
        with open(f"{OUT}/gemv.json", "w") as f:
            json.dump(res, f, default=str, indent=0)

    # ---- timing sets (g128 asym), with a correctness check of each variant on the first copy
    sets, bsets, tsets = {}, {}, {}
    for name, (n, k) in SHAPES.items():
        wb = n * k // 2 + n * (k // 128) * 3
        r = max(8, min(64, math.ceil(160e6 / wb)))
        sets[name] = [make_w4(n, k, 128, False) for _ in range(r)]
        rb = max(2, min(64, math.ceil(160e6 / (n * k * 2))))
        bsets[name] = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(rb)]
        tsets[name] = [tinygemm_prepare(*w, 128) for w in sets[name][:r]]
    best = {}
    for name, (n, k) in SHAPES.items():
        qw0, s0, z0 = sets[name][0]
        wref = deq64(qw0, s0, z0, 128)
        wb = n * k // 2 + n * (k // 128) * 3
        for m in (1, 2, 4):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            ref = x.double() @ wref.T
            row = {"shape": name, "n": n, "k": k, "m": m, "floor_us": (wb + 2 * m * (n + k)) / bw * 1e6,
                   "bf16_floor_us": (2 * n * k) / bw * 1e6, "us": {}, "err": {}}
            xs = [x] * 1
            row["us"]["bf16"] = time_graph([lambda w=w: F.linear(x, w) for w in bsets[name]])
            try:
                tw = tsets[name]
                row["err"]["tinygemm"] = rel_err(torch.ops.aten._weight_int4pack_mm(x, tw[0][0], 128, tw[0][1]), ref)
                row["us"]["tinygemm"] = time_graph([lambda a=a: torch.ops.aten._weight_int4pack_mm(x, a[0], 128, a[1]) for a in tw])
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"tinygemm {name} {m}: {e!r}"[:400])
            row["err"]["old"] = rel_err(K.gemv(x, qw0, s0, z0, 4, 128, *OLD), ref)
            row["us"]["old"] = time_graph([lambda w=w: K.gemv(x, *w, 4, 128, *OLD) for w in sets[name]])
            for v in VARIANTS:
                vn = vname(v)
                try:
                    e = rel_err(K.gemv2(x, qw0, s0, z0, 4, 128, *v), ref)
                    row["err"][vn] = e
                    if e > 1e-2:
                        res["errors"].append(f"{vn} {name} m{m}: rel err {e}")
                        continue
                    row["us"][vn] = time_graph([lambda w=w: K.gemv2(x, *w, 4, 128, *v) for w in sets[name]])
                except Exception as ex:  # noqa: BLE001
                    res["errors"].append(f"{vn} {name} m{m}: {ex!r}"[:400])
            news = {a: b for a, b in row["us"].items() if a.startswith("v2")}
            bn_ = min(news, key=news.get)
            best[(name, m)] = VARIANTS[[vname(v) for v in VARIANTS].index(bn_)]
            row["best"] = bn_
            row["speedup"] = {a: row["us"]["bf16"] / b for a, b in row["us"].items()}
            row["frac_floor_best"] = row["floor_us"] / news[bn_]
            res["timing"].append(row)
            print(f"{name:20s} m{m} bf16 {row['us']['bf16']:7.1f}  old {row['us']['old']:7.1f}  tg {row['us'].get('tinygemm', float('nan')):7.1f}"
                  f"  best {news[bn_]:6.1f} ({bn_})  x{row['speedup'][bn_]:.2f}  floor {row['floor_us']:.1f} ({row['frac_floor_best']:.2f})"
                  f"  [{time.time()-t0:.0f}s]", flush=True)
            dump()

    # ---- whole layer (7 linears), 4 layers' weights in one graph
    for m in (1, 2, 4):
        x = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
        xd = torch.randn(m, 12288, device=DEV, dtype=torch.bfloat16)
        lrow = {"m": m, "us": {}}
        cnt = {}

        def seq(kind):
            fns = []
            cnt.clear()
            for layer in range(4):
                for name in LAYER:
                    i = cnt.get(name, 0)
                    cnt[name] = i + 1
                    xi = xd if name.startswith("down") else x
                    if kind == "bf16":
                        w = bsets[name][i % len(bsets[name])]
                        fns.append(lambda xi=xi, w=w: F.linear(xi, w))
                    elif kind == "tinygemm":
                        a = tsets[name][i % len(tsets[name])]
                        fns.append(lambda xi=xi, a=a: torch.ops.aten._weight_int4pack_mm(xi, a[0], 128, a[1]))
                    elif kind == "old":
                        w = sets[name][i % len(sets[name])]
                        fns.append(lambda xi=xi, w=w: K.gemv(xi, *w, 4, 128, *OLD))
                    else:
                        w = sets[name][i % len(sets[name])]
                        v = best[(name, m)]
                        fns.append(lambda xi=xi, w=w, v=v: K.gemv2(xi, *w, 4, 128, *v))
            return fns

        for kind in ("bf16", "tinygemm", "old", "v2best"):
            try:
                lrow["us"][kind] = time_graph(seq(kind)) * 7  # per layer
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"layer {kind} m{m}: {e!r}"[:400])
        lrow["speedup"] = {a: lrow["us"]["bf16"] / b for a, b in lrow["us"].items()}
        wbytes = sum(SHAPES[nm][0] * SHAPES[nm][1] * (0.5 + 3 / 128) for nm in LAYER)
        lrow["floor_us"] = wbytes / bw * 1e6
        lrow["frac_floor"] = lrow["floor_us"] / lrow["us"].get("v2best", float("inf"))
        res["layer"].append(lrow)
        print(f"LAYER m{m}: " + "  ".join(f"{a} {b:.1f}us x{lrow['speedup'][a]:.2f}" for a, b in lrow["us"].items())
              + f"  floor {lrow['floor_us']:.1f} ({lrow['frac_floor']:.2f})", flush=True)
        dump()

    # ---- correctness: every variant, every shape, all formats, M = 1..4 (fresh inputs each)
    for name, (n, k) in SHAPES.items():
        for group, sym in FORMATS:
            qw, s, z = make_w4(n, k, group, sym)
            wref = deq64(qw, s, z, group)
            for m in (1, 2, 3, 4):
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                ref = x.double() @ wref.T
                errs = {}
                for v in VARIANTS:
                    try:
                        errs[vname(v)] = rel_err(K.gemv2(x, qw, s, z, 4, group, *v), ref)
                    except Exception as ex:  # noqa: BLE001
                        errs[vname(v)] = repr(ex)[:200]
                res["correctness"].append({"shape": name, "group": group, "sym": sym, "m": m, "err": errs})
        worst = max((e for c in res["correctness"] for e in c["err"].values() if isinstance(e, float)), default=None)
        print(f"correctness {name}: worst rel err so far {worst}  [{time.time()-t0:.0f}s]", flush=True)
        dump()
        if time.time() - t0 > 540:
            res["errors"].append("correctness stage cut short by the time budget")
            break
    bad = [(c["shape"], c["group"], c["sym"], c["m"], k_, e) for c in res["correctness"] for k_, e in c["err"].items()
           if not (isinstance(e, float) and e < 1e-2)]
    res["correctness_failures"] = bad
    print(f"correctness: {len(res['correctness'])} cases x {len(VARIANTS)} variants, failures: {bad[:10]}")
    print("errors:", res["errors"][:10])
    dump()


if __name__ == "__main__":
    main()
