"""Weight-as-A-operand W4/W8/W2 GEMM (``gemm_wa``) vs the other W4A16 paths, Qwen3-8B shapes, one H100.

    PYTHONPATH=src python3 benchmarks/w4_session.py [check] [time]      # JSON -> $OUT/w4_session.json

check: ``gemm_wa`` against a float64 reference on fresh random packed weights (2/4/8 bits, groups
32/64/128/per-channel, sym/asym, M = 1, 3, 16, 77, 300, split-K 1 and 4).
time: per (shape, M): bf16 F.linear, torch's tinygemm (``_weight_int4pack_mm``), Triton unpack + cuBLAS
(``dequant``), the current ``fused`` path (its own tuner), and ``gemm_wa`` over a config list. Every
timing is a CUDA-graph replay over R weight copies (R·bytes >= 200 MB > the 50 MB L2), per copy.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from qwenquant.bench.gemm import time_graph
from qwenquant.bench.hw import environment
from qwenquant.kernels import wq_matmul as K
from qwenquant.runtime import fused

OUT = os.environ.get("OUT", "runs/w4")
DEV = "cuda"
SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 12288x4096": (12288, 4096),
          "down 4096x12288": (4096, 12288)}
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
L2_OVERFLOW = 200 * 2**20


def wa_configs(m: int) -> list[tuple]:
    """(bn, bm, bk, warps, stages, split_k, expand) candidates for M rows (run 1 showed the
    non-expanded tile at 0.6x bf16 for M <= 64 and ~0.25x at large M; run 2 adds EXPAND)."""
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        return [(64, bm, 64, 4, 4, 4, False), (64, bm, 128, 4, 3, 1, True), (64, bm, 64, 4, 4, 4, True),
                (64, bm, 256, 4, 3, 2, True), (128, bm, 128, 4, 3, 1, True), (64, bm, 128, 4, 3, 4, True),
                (128, bm, 64, 4, 4, 2, True), (64, bm, 128, 4, 4, 2, True)]
    if m <= 256:
        return [(128, 64, 64, 4, 4, 1, True), (128, 128, 64, 8, 3, 1, True), (64, 64, 64, 4, 4, 1, True),
                (128, 64, 128, 4, 3, 1, True), (128, 32, 64, 4, 4, 1, True)]
    return [(128, 128, 64, 8, 3, 1, True), (256, 128, 64, 8, 3, 1, True), (128, 256, 64, 8, 3, 1, True),
            (128, 128, 32, 4, 4, 1, True), (128, 128, 64, 4, 4, 1, True)]


def make_packed(n, k, bits, group, sym, gen):
    cpw = 32 // bits
    qw = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, device=DEV, generator=gen)
    ng = k // group
    s = (torch.rand(n, ng, device=DEV, generator=gen) * 0.02 + 0.002).half()
    if sym:
        z = torch.full((n, ng), 1 << (bits - 1), dtype=torch.uint8, device=DEV)
    else:
        z = torch.randint(0, 1 << bits, (n, ng), dtype=torch.uint8, device=DEV, generator=gen)
    assert k % cpw == 0
    return qw, s, z


def rel(y, ref):
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def check(doc):
    gen = torch.Generator(device=DEV).manual_seed(1)
    rows = []
    worst = 0.0
    for bits, group, sym in [(4, 128, False), (4, 128, True), (4, 64, False), (4, 32, False), (4, None, False),
                             (8, None, True), (8, 128, False), (2, 128, False)]:
        for n, k in [(4096, 4096), (1024, 4096), (4096, 12288), (192, 512)]:
            g = k if group is None else group
            qw, s, z = make_packed(n, k, bits, g, sym, gen)
            w = K.reference_dequantize(qw, s, z, bits, k)  # [N, K] fp32
            for m in (1, 3, 16, 77, 300):
                x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
                ref = x.double() @ w.double().T
                bf16_err = rel(x.float() @ w.to(torch.bfloat16).float().T, ref)
                for bk, sk, ex in ((64, 1, False), (128, 4, False), (64, 1, True), (128, 1, True), (128, 4, True)):
                        if not K.gemm_wa_ok(bits, g, k, bk):
                            continue
                        bm = 16 if m <= 16 else 64
                        try:
                            y = K.gemm_wa(x, qw, s, z, bits, g, bn=64, bm=bm, bk=bk, split_k=sk, expand=ex)
                            e = rel(y, ref)
                        except Exception as ex:  # noqa: BLE001
                            e = float("inf")
                            print("ERR", bits, group, n, k, m, bk, sk, repr(ex)[:300], flush=True)
                        worst = max(worst, e / max(bf16_err, 1e-6))
                        rows.append(dict(bits=bits, group=group, sym=sym, n=n, k=k, m=m, bk=bk, split_k=sk, expand=ex,
                                         rel_err=e, bf16_rel_err=bf16_err))
    doc["check"] = {"rows": rows, "worst_ratio_to_bf16_rounding": worst}
    print(f"check: {len(rows)} cases, worst rel err / bf16-rounding err = {worst:.2f}", flush=True)


def timed(fn_per_copy, n_copies):
    def all_copies():
        for i in range(n_copies):
            fn_per_copy(i)
    all_copies()
    torch.cuda.synchronize()
    return time_graph(all_copies) / n_copies * 1e3  # µs per copy


def time_all(doc, shapes=SHAPES, rows=ROWS):
    gen = torch.Generator(device=DEV).manual_seed(2)
    res = []
    for label, (n, k) in shapes.items():
        group = 128
        bf16_bytes = n * k * 2
        r16 = max(1, -(-L2_OVERFLOW // bf16_bytes))
        w16 = [torch.randn(n, k, device=DEV, generator=gen).to(torch.bfloat16) * 0.02 for _ in range(r16)]
        w4_bytes = n * k // 2 + n * (k // group) * 3
        r4 = max(1, -(-L2_OVERFLOW // w4_bytes))
        packed = [make_packed(n, k, 4, group, False, gen) for _ in range(r4)]
        tiny = [fused.tinygemm_operands(*p, group) for p in packed]
        for m in rows:
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            t0 = time.time()
            entry = {"shape": label, "n": n, "k": k, "m": m, "us": {}}
            entry["us"]["bf16"] = timed(lambda i: F.linear(x, w16[i]), r16)
            entry["us"]["tinygemm"] = timed(lambda i: torch.ops.aten._weight_int4pack_mm(x, tiny[i].packed, group, tiny[i].scale_zero), r4)
            entry["us"]["dequant"] = timed(lambda i: F.linear(x, K.dequantize(*packed[i], 4, group, k)), min(r4, 8))
            try:
                fused.fused_matmul(x, *packed[0], 4, group)  # tunes once (bucket)
                entry["us"]["fused(current)"] = timed(lambda i: fused.fused_matmul(x, *packed[i], 4, group), r4)
            except Exception as ex:  # noqa: BLE001
                print("fused ERR", label, m, repr(ex)[:200], flush=True)
            for cfg in wa_configs(m):
                bn, bm, bk, w, st, sk, ex = cfg
                if not K.gemm_wa_ok(4, group, k, bk):
                    continue
                name = f"wa bn{bn} bm{bm} bk{bk} w{w} s{st} sk{sk}{' ex' if ex else ''}"
                try:
                    K.gemm_wa(x, *packed[0], 4, group, bn=bn, bm=bm, bk=bk, num_warps=w, num_stages=st, split_k=sk,
                              expand=ex)
                    entry["us"][name] = timed(lambda i: K.gemm_wa(x, *packed[i], 4, group, bn=bn, bm=bm, bk=bk,
                                                                  num_warps=w, num_stages=st, split_k=sk, expand=ex), r4)
                except Exception as ex:  # noqa: BLE001
                    print("wa ERR", name, repr(ex)[:200], flush=True)
            wa = {kk: v for kk, v in entry["us"].items() if kk.startswith("wa ")}
            best = min(wa, key=wa.get) if wa else None
            entry["best_wa"] = best
            b16 = entry["us"]["bf16"]
            floor_us = w4_bytes / doc["copy_bw"] * 1e6
            entry["w4_floor_us"] = floor_us
            summary = {kk: round(b16 / v, 2) for kk, v in entry["us"].items() if not kk.startswith("wa ")}
            if best:
                summary["best_wa"] = round(b16 / wa[best], 2)
            print(f"{label} M={m}: bf16 {b16:.1f} us; x vs bf16 {summary}; best {best} "
                  f"({wa.get(best, 0):.1f} us, floor {floor_us:.1f}); {time.time() - t0:.0f}s", flush=True)
            res.append(entry)
        del w16, packed, tiny
        torch.cuda.empty_cache()
        doc["time"] = res
        save(doc)


def e2e_probe(doc):
    """Qwen3-8B decode step: eager modules vs torch.compile'd layers, both replayed from a CUDA graph;
    a kernel profile of the eager bf16 step; then W4 g128 fused the same two ways."""
    from torch.profiler import ProfilerActivity, profile

    from qwenquant.bench import e2e
    from qwenquant.numerics import QuantSpec

    out = doc.setdefault("e2e_probe", {})
    model = e2e.build_model(36)
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]

    def measure(label, batches=(1, 32)):
        for b in batches:
            for compiled in (False, True):
                t = time.time()
                dec = e2e.StaticDecoder(model, b, compiled=compiled)
                ms = e2e._graph_ms(dec.step)
                out[f"{label} b{b} {'compiled' if compiled else 'eager'}"] = ms
                print(f"e2e {label} b{b} {'compiled' if compiled else 'eager'}: {ms:.3f} ms/step ({time.time() - t:.0f}s)",
                      flush=True)
                del dec
                torch.cuda.empty_cache()
                save(doc)

    measure("bf16")
    dec = e2e.StaticDecoder(model, 1)
    dec.step()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dec.step()
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    out["bf16_b1_profile"] = table
    print(table, flush=True)
    del g, dec
    e2e.quantize_model(model, originals, QuantSpec(4, 128, False), "fused")
    measure("w4g128-fused")
    doc["fused_tuning"] = fused.TUNER.table()
    save(doc)


def save(doc):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "w4_session.json"), "w") as f:
        json.dump(doc, f, default=str)


def copy_bandwidth() -> float:
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us = time_graph(lambda: b.copy_(a)) * 1e3
    return 2 * a.numel() / (us * 1e-6)


if __name__ == "__main__":
    what = sys.argv[1:] or ["check", "time"]
    doc = {"env": environment(), "fused_tuning": None}
    doc["copy_bw"] = copy_bandwidth()
    print("copy bandwidth GB/s", doc["copy_bw"] / 1e9, flush=True)
    t = time.time()
    if "check" in what:
        check(doc)
        save(doc)
        print(f"check done {time.time() - t:.0f}s", flush=True)
    if "time" in what:
        time_all(doc)
    if "e2e" in what:
        e2e_probe(doc)
    doc["fused_tuning"] = fused.TUNER.table()
    save(doc)
    print(f"all done {time.time() - t:.0f}s", flush=True)
