"""Overlap of consecutive W4 kernels (``kernels/overlap.py``: L2 weight prefetch + programmatic dependent launch), on
the GPU: correctness in a dependent chain, then per-projection timings with and without it.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/overlap_session.py check gemm   # -> $OUT/overlap_*.json
    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/overlap_session.py e2e          # decode step, 2 x 3 ways

``check``: a chain of square W4 layers where each kernel reads the previous one's output (x -> y1 -> y2 …), with
split-K tiles that share one fp32 workspace, captured in a CUDA graph with every overlap variant and compared with
the same chain run eagerly without it — a missing wait would read a stale x or a workspace still being zeroed.
``gemm``: each Qwen3-8B merged projection (and three Qwen3-0.6B ones) at M = 1 and 16, copies back to back in one
CUDA graph (as ``qwenquant bench gemm`` times them: the weights overflow L2), for the fused table's best batch-1
tiles × (prefetch k-tiles, PDL, trigger); bf16 cuBLAS the same way.
``e2e``: the Qwen3-8B decode step (``bench.e2e``, merged projections, b = 1 and 8) for bf16 and W4 fused, torch.compile's
PDL (``TORCHINDUCTOR_ENABLE_PDL``) off/on × ours off / PDL / PDL + prefetch (fused only).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from qwenquant.bench.gemm import L2_OVERFLOW_BYTES, time_graph
from qwenquant.bench.hw import environment
from qwenquant.kernels import overlap
from qwenquant.kernels import wq_ktiled as KT
from qwenquant.kernels import wq_matmul as K
from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.numerics.affine import affine_to_tensors

OUT = os.environ.get("OUT", "runs")
DEFAULTS = (overlap.PDL_ENABLED, KT.PREFETCH_TILES)
KT.ALLOW_SPLIT_TRIGGER2 = True  # this script reproduces the trigger-2 race on purpose (check / gemm stages)
SPEC = QuantSpec(4, 128, False)
# (prefetch k-tiles, PDL, trigger): 0 at exit, 1 after the wait, 2 after the K loop
VARIANTS = [(0, False, 2), (0, True, 2), (2, True, 2), (4, True, 2), (8, True, 2), (4, True, 1), (4, False, 2),
            (16, True, 2)]
if os.environ.get("OVERLAP_VARIANTS"):  # e.g. "0,1,2;0,1,0" (prefetch, pdl, trigger)
    VARIANTS = [(int(a), bool(int(b)), int(c)) for a, b, c in (v.split(",") for v in os.environ["OVERLAP_VARIANTS"].split(";"))]
# ktiled_gemm(*cfg): (bm, bn, w_as_a, split_k, warps, stages, scale_after, streamk) — the batch-1 winners and runners-up
# of results/gemm_qwen3-8b-merged-resident_h100.json's tuning table
GEMM_CFGS = {
    (6144, 4096): [(16, 64, True, 4, 4, 3, True, 0), (16, 32, True, 4, 2, 3, True, 0), (16, 128, False, 4, 4, 3, True, 0)],
    (4096, 4096): [(16, 128, False, 4, 4, 3, True, 0), (16, 32, True, 4, 2, 3, True, 0), (16, 64, True, 4, 4, 3, True, 0)],
    (24576, 4096): [(16, 64, True, 1, 4, 3, True, 0), (16, 64, True, 2, 4, 3, True, 0), (16, 128, True, 1, 4, 3, True, 0)],
    (4096, 12288): [(16, 128, True, 8, 4, 3, True, 0), (16, 128, False, 4, 4, 3, True, 0), (16, 64, True, 4, 4, 3, True, 0)],
}
# ktiled_gemv (bn, tiles per step, split-K, warps, stages): the small-weight winners (fused.KTILED_GEMV head)
GEMV_CFGS = [(2, 4, 1, 1, 1), (4, 4, 1, 1, 1), (4, 8, 1, 2, 1), (4, 4, 4, 1, 1)]
SHAPES = [(6144, 4096, "8b qkv"), (4096, 4096, "8b o"), (24576, 4096, "8b gate_up"), (4096, 12288, "8b down"),
          (4096, 1024, "0.6b qkv"), (1024, 2048, "0.6b o"), (6144, 1024, "0.6b gate_up")]


def _weight(n: int, k: int, seed: int = 0) -> tuple[KT.KTiledWeight, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = affine_to_tensors(quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.02, SPEC))
    kt = KT.KTiledWeight.from_checkpoint(t["qweight"], t["scale"], t["zero"], 4, k)
    return kt, K.reference_dequantize(t["qweight"], t["scale"], t["zero"], 4, k)


def check() -> dict:
    """Dependent chains: y_{i+1} = W_i y_i, eager without overlap vs CUDA graph with each variant. Nothing runs
    between the W4 kernels (each layer's gain is ≈ 0.02·√4096 = 1.3, so six stay in range), so consecutive kernels
    really overlap under PDL."""
    n = 4096
    layers = [_weight(n, n, seed)[0] for seed in range(6)]
    out = []
    for m in [int(v) for v in os.environ.get("OVERLAP_CHECK_ROWS", "1,16,5").split(",")]:
        x0 = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        cfgs = [("gemm", c) for c in GEMM_CFGS[(n, n)] + [(16, 64, True, 1, 4, 3, True, 0)]] + (
            [("gemv", c) for c in GEMV_CFGS] if m == 1 else [])
        keep = os.environ.get("OVERLAP_KEEP") == "1"  # keep every intermediate alive: no buffer reuse inside the chain
        for kind, cfg in cfgs:
            def chain(pf, pdl, trig, kind=kind, cfg=cfg):
                h = x0
                kept = []
                for kt in layers:
                    if keep:
                        kept.append(h)
                    if kind == "gemm":
                        h = KT.ktiled_gemm(h, kt.words, kt.sz, 4, 128, *cfg, prefetch=pf, pdl=pdl, trigger=trig)
                    else:
                        bn, bt, sk, w, st = cfg
                        h = KT.ktiled_gemv(h, kt.words, kt.sz, 4, 128, bn, bt, sk, w, st, prefetch=pf, pdl=pdl, trigger=trig)
                return h
            ref = chain(0, False, 2).float()
            for pf, pdl, trig in VARIANTS:
                chain(pf, pdl, trig)  # compile outside the capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    y = chain(pf, pdl, trig)
                worst = 0.0
                for _ in range(int(os.environ.get("OVERLAP_REPLAYS", "20"))):
                    g.replay()
                    torch.cuda.synchronize()
                    worst = max(worst, float((y.float() - ref).norm() / ref.norm()))
                res = {"m": m, "kind": kind, "cfg": list(cfg), "prefetch": pf, "pdl": pdl, "trigger": trig, "keep": keep,
                       "rel_diff": worst}
                out.append(res)
                print("check", res, flush=True)
                del g
    bad = [r for r in out if not r["rel_diff"] < 2e-2]
    return {"cases": out, "failures": bad}


def ptx() -> dict:
    """Where the compiler put griddepcontrol.wait / launch_dependents relative to the first global loads, per
    compiled k-tiled kernel (a load above the wait reads the previous kernel's output too early)."""
    n = 4096
    kt = _weight(n, n)[0]
    x = torch.randn(5, n, device="cuda", dtype=torch.bfloat16)
    for cfg in GEMM_CFGS[(n, n)]:
        for trig in (1, 2):
            KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, *cfg, prefetch=0, pdl=True, trigger=trig)
    out = []
    for dev_cache in KT._ktiled_gemm_kernel.device_caches.values():
        for key, ck in dev_cache[0].items():
            src = ck.asm.get("ptx", "")
            if "griddepcontrol" not in src:
                continue
            lines = [ln.strip() for ln in src.splitlines()]
            idx = {name: [i for i, ln in enumerate(lines) if name in ln][:3]
                   for name in ("griddepcontrol.wait", "griddepcontrol.launch_dependents", "cp.async", "ld.global",
                                "bar.sync", "atom.")}
            out.append({"key": str(key)[:400], "ptx_line_of": idx})
            print("ptx", idx, flush=True)
    return {"kernels": out}


def _chain_ms(fns) -> float:
    return time_graph(lambda: [f() for f in fns]) / len(fns)


def gemm() -> list[dict]:
    rows = []
    for n, k, label in SHAPES:
        kt0, wref = _weight(n, k)
        reps = max(2, min(32, -(-L2_OVERFLOW_BYTES // (kt0.words.nbytes + kt0.sz.nbytes))))
        kts = [kt0] + [_weight(n, k, seed)[0] for seed in range(1, reps)]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
              for _ in range(max(2, min(32, -(-L2_OVERFLOW_BYTES // (2 * n * k)))))]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ wref.double().T
            times = {"bf16": _chain_ms([lambda w=w: x @ w.T for w in wb]) * 1e3}
            cands = [("gemm", c) for c in GEMM_CFGS.get((n, k), [])]
            if m == 1:
                cands += [("gemv", c) for c in GEMV_CFGS]
            if (n, k) not in GEMM_CFGS:
                cands += [("gemm", (16, 64, True, 4, 4, 3, True, 0)), ("gemm", (16, 32, True, 4, 2, 3, True, 0))]
            for kind, cfg in cands:
                for pf, pdl, trig in VARIANTS:
                    name = f"{kind} {cfg} pf{pf} pdl{int(pdl)} t{trig}"
                    if kind == "gemm":
                        fns = [lambda kt=kt, cfg=cfg, a=(pf, pdl, trig): KT.ktiled_gemm(
                            x, kt.words, kt.sz, 4, 128, *cfg, prefetch=a[0], pdl=a[1], trigger=a[2]) for kt in kts]
                    else:
                        fns = [lambda kt=kt, cfg=cfg, a=(pf, pdl, trig): KT.ktiled_gemv(
                            x, kt.words, kt.sz, 4, 128, *cfg, prefetch=a[0], pdl=a[1], trigger=a[2]) for kt in kts]
                    try:
                        err = float((fns[0]().double() - ref).norm() / ref.norm())
                        if not err < 1e-2:
                            raise AssertionError(f"rel err {err}")
                        for f in fns:
                            f()
                        times[name] = _chain_ms(fns) * 1e3
                    except Exception as e:  # noqa: BLE001 — reported, not fatal
                        times[name] = repr(e)[:300]
            ok = {a: b for a, b in times.items() if isinstance(b, float)}
            best = sorted(ok.items(), key=lambda p: p[1])[:5]
            print(label, m, "bf16 %.2f" % ok["bf16"], [(a, round(b, 2)) for a, b in best], flush=True)
            rows.append({"shape": label, "n": n, "k": k, "m": m, "copies": len(kts), "us": times})
        del kts, wb
        torch.cuda.empty_cache()
    return rows


def e2e() -> dict:
    """The decode step: bf16 and W4 fused with torch.compile's PDL off/on, and for fused our overlap three ways
    (off; PDL; PDL + prefetch of OVERLAP_E2E_PREFETCH k-tiles). Compiled once per (model, inductor flag, batch)."""
    from torch import _dynamo
    import torch._inductor.config as icfg

    from qwenquant.bench import e2e as E

    has_pdl = hasattr(icfg.triton, "enable_pdl")
    model = E.build_model()
    originals = [getattr(p, nm).weight.detach().to("cpu") for p, nm in E.decoder_linears(model)]
    E.merge_projections(model)
    torch.cuda.empty_cache()
    res = {"inductor_has_enable_pdl": has_pdl, "rows": []}
    pf = int(os.environ.get("OVERLAP_E2E_PREFETCH", "4"))
    ours = [("off", False, 0), ("pdl", True, 0), (f"pdl+pf{pf}", True, pf)]

    def steps(label, variants):
        for ind in ((False, True) if has_pdl else (False,)):
            if has_pdl:
                icfg.triton.enable_pdl = ind
            _dynamo.reset()
            E._compiled_layer_step = None
            for b in (1, 8):
                dec = E.StaticDecoder(model, b, compiled=True)
                for name, pdl, prefetch in variants:
                    overlap.PDL_ENABLED, KT.PREFETCH_TILES = pdl, prefetch
                    ms = E._graph_ms(dec.step)
                    row = {"mode": label, "batch": b, "inductor_pdl": ind, "ours": name, "step_ms": ms, "tok_s": b / ms * 1e3}
                    res["rows"].append(row)
                    print("e2e", row, flush=True)
                del dec
                torch.cuda.empty_cache()

    steps("bf16", ours[:1])
    t = time.time()
    E.quantize_model(model, originals, SPEC, "fused")
    print("quantized in %.0fs" % (time.time() - t), flush=True)
    steps("w4g128-fused", ours)
    overlap.PDL_ENABLED, KT.PREFETCH_TILES = DEFAULTS  # back to the environment's settings
    if has_pdl:
        icfg.triton.enable_pdl = False
    return res


# trigger policies (PDL_TRIGGER_WHOLE, PDL_TRIGGER_SPLIT); None = PDL off
POLICIES = {"off": None, "t0": (0, 0), "t1": (1, 1), "whole2-split1": (2, 1), "whole2-split0": (2, 0)}


def _set_policy(policy) -> None:
    overlap.PDL_ENABLED = policy is not None
    if policy is not None:
        KT.PDL_TRIGGER_WHOLE, KT.PDL_TRIGGER_SPLIT = policy


def policy() -> dict:
    """The library's tuned batch-1 / 16 tiles (first of GEMM_CFGS) and the small-weight GEMVs under each trigger policy:
    dependent chains checked against stream order (M = 3, 5, 30 replays), then copies back to back timed; then the
    8B decode step (torch.compile's PDL on) per policy."""
    out = {"check": [], "gemm": [], "e2e": []}
    n = 4096
    layers = [_weight(n, n, seed)[0] for seed in range(6)]
    for m in (3, 5):
        x0 = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        for cfg in [(16, 128, False, 4, 4, 3, True, 0), (16, 64, True, 4, 4, 3, True, 0), (16, 64, True, 1, 4, 3, True, 0)]:
            def chain(cfg=cfg):
                h = x0
                for kt in layers:
                    h = KT.ktiled_gemm(h, kt.words, kt.sz, 4, 128, *cfg)
                return h
            _set_policy(None)
            ref = chain().float()
            for name, pol in POLICIES.items():
                _set_policy(pol)
                chain()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    y = chain()
                worst = 0.0
                for _ in range(30):
                    g.replay()
                    torch.cuda.synchronize()
                    worst = max(worst, float((y.float() - ref).norm() / ref.norm()))
                out["check"].append({"m": m, "cfg": list(cfg), "policy": name, "rel_diff": worst})
                del g
    print("policy check worst per policy:", {p: max(r["rel_diff"] for r in out["check"] if r["policy"] == p) for p in POLICIES}, flush=True)
    for n, k, label in SHAPES:
        kts = [_weight(n, k, seed)[0] for seed in range(max(2, min(32, -(-L2_OVERFLOW_BYTES // (n * k // 2)))))]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cands = {}
            if (n, k) in GEMM_CFGS:
                cfg = GEMM_CFGS[(n, k)][0]
                cands["tuned"] = [lambda kt=kt: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, *cfg) for kt in kts]
            elif m == 1:
                for c in GEMV_CFGS[:3]:
                    cands[f"gemv {c}"] = [lambda kt=kt, c=c: KT.ktiled_gemv(x, kt.words, kt.sz, 4, 128, *c) for kt in kts]
            for cname, fns in cands.items():
                row = {"shape": label, "m": m, "kernel": cname, "us": {}}
                for name, pol in POLICIES.items():
                    _set_policy(pol)
                    for f in fns:
                        f()
                    row["us"][name] = _chain_ms(fns) * 1e3
                out["gemm"].append(row)
                print(label, m, cname, {a: round(b, 2) for a, b in row["us"].items()}, flush=True)
        del kts
        torch.cuda.empty_cache()
    import torch._inductor.config as icfg
    from torch import _dynamo

    from qwenquant.bench import e2e as E

    model = E.build_model()
    originals = [getattr(p, nm).weight.detach().to("cpu") for p, nm in E.decoder_linears(model)]
    E.merge_projections(model)
    icfg.triton.enable_pdl = True
    _dynamo.reset()
    E._compiled_layer_step = None
    for label, pols in (("bf16", {"off": None}), ("w4g128-fused", POLICIES)):
        if label != "bf16":
            E.quantize_model(model, originals, SPEC, "fused")
            _dynamo.reset()
            E._compiled_layer_step = None
        for b in (1, 8):
            dec = E.StaticDecoder(model, b, compiled=True)
            for name, pol in pols.items():
                _set_policy(pol)
                ms = E._graph_ms(dec.step)
                out["e2e"].append({"mode": label, "batch": b, "policy": name, "step_ms": ms})
                print("e2e", label, b, name, round(ms, 3), flush=True)
            del dec
    _set_policy(None)
    overlap.PDL_ENABLED, KT.PREFETCH_TILES = DEFAULTS
    KT.PDL_TRIGGER_WHOLE = KT.PDL_TRIGGER_SPLIT = 0
    icfg.triton.enable_pdl = False
    return out


def main() -> None:
    doc = {"kind": "overlap", "env": environment()}
    for stage in sys.argv[1:] or ["check", "gemm"]:
        t = time.time()
        doc[stage] = {"check": check, "gemm": gemm, "e2e": e2e, "ptx": ptx, "policy": policy}[stage]()
        doc[stage + "_s"] = time.time() - t
        with open(os.path.join(OUT, f"overlap_{'_'.join(sys.argv[1:]) or 'check_gemm'}.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    main()
