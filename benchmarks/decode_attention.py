"""Decode attention of the e2e benchmark's step, on the GPU: what the masked SDPA over the static cache costs per layer,
and what reading only the filled positions would cost — the same math (the mask drops exactly those positions).

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/decode_attention.py   # -> $OUT/decode_attention.json

Also times our split-K kernels (``kernels/decode_attention.py``) at several program targets (``split, N programs``;
8 programs is one split at batch 1: no merge kernel), and from the projection's raw output: our prep kernel then split
(``prep + split``) and the split kernel doing that work itself (``prep-in-split``), each against its fp32 reference.

Why: the session-8 profile put 0.48 ms of the 3.6 ms W4 decode step (b = 1) in attention, ≈ 13 µs per layer for
≈ 2 MB of K/V — the same in bf16 and W4, so it dilutes every ratio. Each variant is checked against the masked
step in fp32 before it is timed (CUDA-graph replay, ``bench.gemm.time_graph``).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwenquant.bench.e2e import CTX, QWEN3_8B
from qwenquant.bench.gemm import time_graph
from qwenquant.bench.hw import environment
from qwenquant.kernels import decode_attention as DA
from qwenquant.kernels import decode_prep as DP


def main() -> None:
    out = os.environ.get("OUT", "runs")
    hq, hkv, d = QWEN3_8B["num_attention_heads"], QWEN3_8B["num_key_value_heads"], QWEN3_8B["head_dim"]
    pos = CTX // 2  # as bench.e2e.StaticDecoder: attend over positions 0 … pos
    rows = []
    default_target = DA.TARGET_PROGRAMS, DA.BATCH1_TARGET_PROGRAMS
    for b in (1, 8, 32, 128):
        kc = torch.randn(b, hkv, CTX, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        p = torch.tensor([pos], device="cuda")
        mask = (torch.arange(CTX, device="cuda") <= p).view(1, 1, 1, -1)

        def masked():  # the benchmark's step today
            kc.index_copy_(2, p, k)
            vc.index_copy_(2, p, v)
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)

        def filled(backend=None):
            kc.index_copy_(2, p, k)
            vc.index_copy_(2, p, v)
            ks, vs = kc[:, :, :pos + 1], vc[:, :, :pos + 1]
            if backend is None:
                return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)

        def filled_repeat():  # GQA by repeating K/V heads (what older flash paths need)
            kc.index_copy_(2, p, k)
            vc.index_copy_(2, p, v)
            ks = kc[:, :, :pos + 1].repeat_interleave(hq // hkv, dim=1)
            vs = vc[:, :, :pos + 1].repeat_interleave(hq // hkv, dim=1)
            return F.scaled_dot_product_attention(q, ks, vs)

        def split(target):
            kc.index_copy_(2, p, k)
            vc.index_copy_(2, p, v)
            DA.TARGET_PROGRAMS = DA.BATCH1_TARGET_PROGRAMS = target  # at every batch
            return DA.decode_attention(q, kc, vc, pos + 1)

        ref = masked().float()
        cands = {"masked (today)": masked, "filled, default backend": filled,
                 "filled, flash": lambda: filled(SDPBackend.FLASH_ATTENTION),
                 "filled, efficient": lambda: filled(SDPBackend.EFFICIENT_ATTENTION),
                 "filled, cudnn": lambda: filled(SDPBackend.CUDNN_ATTENTION),
                 "filled, repeat kv + default": filled_repeat,
                 **{f"split, {t} programs": (lambda t=t: split(t)) for t in (8, 66, 132, 264, 528)}}
        res = {"batch": b, "us": {}, "err": {}}
        check_and_time(cands, ref, res)
        prep_block(b, hq, hkv, d, kc, vc, pos, res)
        DA.TARGET_PROGRAMS, DA.BATCH1_TARGET_PROGRAMS = default_target
        print(b, {a: (round(t, 2) if isinstance(t, float) else t[:60]) for a, t in res["us"].items()}, flush=True)
        rows.append(res)
    with open(os.path.join(out, "decode_attention.json"), "w") as f:
        json.dump({"kind": "decode_attention", "env": environment(), "ctx": CTX, "pos": pos, "results": rows}, f, indent=1)


def check_and_time(cands: dict, ref: torch.Tensor, res: dict) -> None:
    """Each candidate's relative error against ``ref`` (fp32) into ``res["err"]``, then, if below 2e-2, its CUDA-graph
    time in µs into ``res["us"]``; a backend that refuses the shape (or a wrong result) is reported as its error."""
    for name, fn in cands.items():
        try:
            err = float((fn().float() - ref).norm() / ref.norm())
            res["err"][name] = err
            if not err < 2e-2:
                raise AssertionError(f"rel err {err}")
            res["us"][name] = time_graph(fn) * 1e3
        except Exception as e:  # noqa: BLE001
            res["us"][name] = repr(e)[:200]


def prep_block(b, hq, hkv, d, kc, vc, pos, res):
    """From the qkv projection's raw output to the attention output: q / k norm, rotary, the cache write, attention —
    our prep kernel then the split kernels (3 launches), or all of it in the split kernel (``prep-in-split``, 2),
    against the references of both in fp32."""
    qkv = torch.randn(b, 1, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.reshape(b, 1, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], -1))
    angle = torch.rand(1, 1, d // 2, device="cuda") * 6.3
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    qw, kw = (torch.rand(d, device="cuda") + 0.5).to(torch.bfloat16), (torch.rand(d, device="cuda") + 0.5).to(torch.bfloat16)
    p = torch.tensor([pos], device="cuda")
    kf, vf = kc.float(), vc.float()
    qr = DP.reference_decode_prep(q.float(), k.float(), v.float(), qw.float(), kw.float(), 1e-6, cos.float(),
                                  sin.float(), kf, vf, p)
    ref = DA.reference_decode_attention(qr, kf, vf, pos + 1)

    def prep_then_split(target):
        DA.TARGET_PROGRAMS = DA.BATCH1_TARGET_PROGRAMS = target
        qq = DP.decode_prep(q, k, v, qw, kw, 1e-6, cos, sin, kc, vc, p)
        return DA.decode_attention(qq, kc, vc, pos + 1)

    def in_split(target):
        DA.TARGET_PROGRAMS = DA.BATCH1_TARGET_PROGRAMS = target
        return DA.decode_attention_prep(q, k, v, qw, kw, 1e-6, cos, sin, kc, vc, p, pos + 1)

    cands = {**{f"prep + split, {t} programs": (lambda t=t: prep_then_split(t)) for t in (8, 66, 264)},
             **{f"prep-in-split, {t} programs": (lambda t=t: in_split(t)) for t in (8, 66, 264)}}
    check_and_time(cands, ref, res)


if __name__ == "__main__":
    main()
