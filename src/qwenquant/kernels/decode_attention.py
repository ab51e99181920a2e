"""Decode attention: one new query per sequence over a static KV cache, split along the keys (flash-decoding).

The cost it attacks (Qwen3-8B, batch 1, 257 cached positions, H100): a layer's attention reads K and V of
8 KV heads × 257 positions × 128 dims × 2 bytes = 1.05 MB — 0.35 µs at the measured 2.9 TB/s — yet cuDNN's SDPA
kernel takes ≈ 9 µs (benchmarks/results/profile_e2e_merged_h100.json): 32 CTAs, one per query head, each streaming its
KV head's 131 KB alone, four times over for the four query heads that share it. That is latency, not bandwidth:
the fix is more, shorter programs, and reading each KV row once per GQA group. Measured (session 18, H100,
benchmarks/results/decode_attention_prep_h100.json, per attention block at batch 1 including the cache writes):
split + merge 11.2 µs against cuDNN's 12.6; with the prep work inside the split kernel 7.5 µs (6.8 at a 66-program
target) against cuDNN plus the compiled norm / rotary / cache-write kernels — still ≈ 20× the byte time, two
latency-bound launches.

Two kernels:

1. ``_decode_attention_split``, grid (batch × KV heads, splits): one program takes the G query heads of one KV
   head (G = 4 in Qwen3-8B, padded to 16 rows for ``tl.dot``) over one slice of the positions, runs the online
   softmax over its keys in blocks of ``BLOCK_N`` and writes the slice's unnormalized output [G, D] (fp32) with its running
   max and sum. With one split it normalizes and writes the output itself (large batches have programs enough).
2. ``_decode_attention_merge``, grid (batch × query heads): rescales each slice by exp(m_s − max m) and divides
   by the rescaled sum: the exact softmax over all positions. With ``MERGE_IN_SPLIT`` the last split program of each
   (batch row, KV head) does this instead (``_merge_slices``; opt-in, ``MERGE_IN_SPLIT`` below says what it measured and why it is not the default).

With ``PREP`` the split kernel also does ``decode_prep``'s work (``kernels/decode_prep.py``): each program normalizes
and rotates its group's raw q rows (the projection's output), and the program whose slice holds the new position
first writes that position's K (normalized, rotated) and V into the caches, then a CTA barrier, then its loop reads
them — one kernel fewer per layer than ``decode_prep`` + split (:func:`decode_attention_prep`).

:func:`decode_attention` is a ``torch.library`` op: torch.compile sees one opaque call (no graph break) and a
CUDA graph captures both launches. On a CPU (and for shapes the kernel does not take) it runs the reference,
:func:`reference_decode_attention` — SDPA over the filled positions, the computation it replaces.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from qwenquant.kernels import decode_prep as P

try:
    import triton
    import triton.language as tl

    from qwenquant.kernels import overlap
    from qwenquant.kernels.overlap import pdl_ok, release_dependents, wait_for_producer
except ImportError:  # CPU-only installs: the op falls back to the reference
    triton = None

BLOCK_N = 16        # keys per inner step (tl.dot's minimum N)
TARGET_PROGRAMS = 264  # ≈ 2 per SM of an H100: above batch 1, splits are chosen so batch × KV heads × splits reaches this
# at batch 1, fewer and longer splits (Qwen3-8B, 257 positions: 9 of 32 keys, not 17 of 16): H100, prep inside the split
# kernel — isolated 6.8 vs 7.5 us per layer (session 18, results/decode_attention_prep_h100.json, where 264 was faster
# at batch 8: 10.1 vs 11.0 us), in the W4 decode step 2.494 vs 2.520 ms (session 21, results/pdl_step_h100.json)
BATCH1_TARGET_PROGRAMS = 66
# Merge the slices in the split kernel instead of a second launch: the last split program of each (batch row, KV head)
# to finish — they meet through an acq_rel counter, as the split-K GEMMs do — merges them. Session 19 measured the
# first form slower (+0.10-0.14 ms per W4 step at batch 1: its merging program loaded 17 slices one after another);
# this form issues every slice's loads at once (the loop over slices unrolled, G rows rather than 16): W4 step at batch 1
# with PDL 2.461 vs 2.502 ms (session 22, results/pdl_step_s22_h100.json; the two rounds 0.02 and 0.07 ms apart), bf16
# unchanged. Opt-in (QWENQUANT_ATTN_MERGE=split; benchmarks/pdl_step.py with PDL_MERGE=1 A/Bs it), not the default:
# the meeting counters are one set per device (``meet_counters``), so decodes on two concurrent streams would share
# them. Default: the merge kernel.
# Tried on an H100 and removed (session 19, benchmarks/NOTES.md; the code is in git history at 490dc11): the split
# programs asking L2 for the next projection's weights while they run (+0.05 ms per Qwen3-8B decode step: the
# prefetch traffic delays their own loads).
# Whole slices (session 23): where a split holds at most this many positions (Qwen3-8B at batch 1 in the e2e benchmark,
# 257 filled: 9 splits of 32), each program loads its slice's K and V at once — with the prep inside, *before* its PDL
# wait, since those rows are earlier steps' writes — and runs one softmax instead of stepping BLOCK_N keys at a time.
# The early loads rely on the kernel before this one having waited for *its* producer (every PDL kernel here waits at
# its start; a kernel launched without PDL runs in stream order), so everything older is complete when these programs
# start. 0: always step. Measured: ≈ 0.01 ms per W4 decode step at batch 1 (results/pdl_step_s23_whole_h100.json), so
# opt-in. QWENQUANT_ATTN_WHOLE=<positions> sets it, 16 … 64: the slice's two [positions, D] tiles sit in registers —
# sm_90a, D = 128, 4 warps: 168 registers at 32 positions, 255 at 64, and at 128 ptxas spills 6 KB per thread.
_whole_env = os.environ.get("QWENQUANT_ATTN_WHOLE", "0").strip()
if not (_whole_env.isdigit() and (int(_whole_env) == 0 or 16 <= int(_whole_env) <= 64)):
    raise ValueError(f"QWENQUANT_ATTN_WHOLE={_whole_env!r}: expected 0 (step through each slice) or a number of "
                     "positions from 16 to 64 (load a slice that short at once)")
WHOLE_SLICE_MAX = int(_whole_env)
_merge_env = os.environ.get("QWENQUANT_ATTN_MERGE", "launch").strip()
if _merge_env not in ("split", "launch"):
    raise ValueError(f"QWENQUANT_ATTN_MERGE={_merge_env!r}: expected 'launch' (a merge kernel after the split kernel) "
                     "or 'split' (the last split program of each KV head merges)")
MERGE_IN_SPLIT = _merge_env == "split"
_COUNTERS: dict[str, Tensor] = {}
_RETIRED: list[Tensor] = []  # counters replaced by larger ones: graphs captured earlier still point at them


def meet_counters(device, n: int) -> Tensor:
    """n zeroed int32 counters for the split programs' meeting, one set per device, grown on demand and kept: the
    merging program re-zeroes its counter, so calls and CUDA-graph replays share them without a memset. Growing is
    refused during graph capture (run the batch once eagerly first, as the decode step's warm-up does)."""
    key = str(device)
    cnt = _COUNTERS.get(key)
    if cnt is None or cnt.numel() < n:
        if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"decode attention's meeting counters must grow to {n} during CUDA-graph capture; run "
                               "this batch size once eagerly before capturing")
        if cnt is not None:
            _RETIRED.append(cnt)
        cnt = torch.zeros(max(n, 0 if cnt is None else cnt.numel()), device=device, dtype=torch.int32)
        _COUNTERS[key] = cnt
    return cnt


def reference_decode_attention(q: Tensor, k: Tensor, v: Tensor, filled: int) -> Tensor:
    """q [B, Hq, 1, D], k / v caches [B, Hkv, ctx, D] → [B, Hq, 1, D]: softmax(q kᵀ / √D) v over positions
    0 … filled − 1 (GQA: query head i reads KV head i // (Hq / Hkv)). Contiguous, as the Triton path's output."""
    return F.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled], enable_gqa=True).contiguous()


def plan_splits(batch: int, kv_heads: int, filled: int, target: int | None = None) -> tuple[int, int]:
    """(splits, keys per split): at most ``target`` programs (default ``TARGET_PROGRAMS``, ``BATCH1_TARGET_PROGRAMS``
    at batch 1) over batch × kv_heads ×
    splits, each split a whole number of ``BLOCK_N`` blocks, none empty. Rounding a split up to whole blocks can
    leave fewer programs than the target (1 × 1 × 5000 positions at a target of 264: 157 splits of 32 keys, not 264)."""
    if target is None:
        target = BATCH1_TARGET_PROGRAMS if batch == 1 else TARGET_PROGRAMS
    if filled < 1:
        raise ValueError(f"decode attention over filled={filled} positions: expected at least 1")
    blocks = triton.cdiv(filled, BLOCK_N) if triton else -(-filled // BLOCK_N)
    want = max(1, min(blocks, -(-target // (batch * kv_heads))))
    per_split = -(-blocks // want) * BLOCK_N
    return -(-filled // per_split), per_split


def check_operands(q: Tensor, k: Tensor, v: Tensor, filled: int) -> None:
    """Refuse, by value, operands that do not form one decode attention (on every path alike)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"decode attention: expected q [B, Hq, 1, D] and k, v [B, Hkv, ctx, D] alike, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"decode attention: q {tuple(q.shape)} and cache {tuple(k.shape)} differ in batch or head "
                         f"dim, or {hq} query heads are not a multiple of {k.shape[1]} KV heads")
    if not 1 <= filled <= k.shape[2]:
        raise ValueError(f"decode attention over filled={filled} positions: expected 1 … {k.shape[2]} (the cache)")
    if not q.device == k.device == v.device:
        raise ValueError(f"decode attention: q on {q.device}, k on {k.device}, v on {v.device}")


def kernel_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Shapes and dtypes the Triton kernels take (operands already checked): CUDA, 16-bit, one query per sequence,
    head dim a power of two ≥ 16, unit-stride head dim, at most 16 query heads per KV head."""
    if triton is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    _, hq, t, d = q.shape
    return (t == 1 and d >= 16 and d & (d - 1) == 0 and hq // k.shape[1] <= 16
            and k.dtype == v.dtype == q.dtype and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


@torch.library.custom_op("qwenquant::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, filled: int) -> Tensor:
    """Attention of one query per sequence over the first ``filled`` positions of a static cache; shapes as
    :func:`reference_decode_attention`. Triton split-K kernels where :func:`kernel_ok`, else the reference."""
    check_operands(q, k, v, filled)
    if not kernel_ok(q, k, v):
        return reference_decode_attention(q, k, v, filled)
    return _triton_decode_attention(q, k, v, filled)


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, filled: int) -> Tensor:
    return q.new_empty(q.shape)  # contiguous, as both real paths return


def _triton_decode_attention(q: Tensor, k: Tensor, v: Tensor, filled: int, prep: dict | None = None) -> Tensor:
    """The split and merge launches. ``prep``: q is the projection's raw output [B, 1, Hq, D] and ``prep`` holds
    ``decode_prep``'s other operands (k_new, v_new, q_weight, k_weight, eps, cos, sin, pos): the split programs
    normalize and rotate q themselves, and the one that reads position ``pos`` writes its K / V first."""
    b, hq, d = q.shape[0], (q.shape[2] if prep else q.shape[1]), q.shape[-1]
    hkv = k.shape[1]
    g = hq // hkv
    splits, per_split = plan_splits(b, hkv, filled)
    pdl = pdl_ok(q.device)  # programmatic dependent launch (``QWENQUANT_PDL=1``): each program waits at its start
    release = overlap.RELEASE_AT_START or overlap.ATTENTION_RELEASE_AT_START
    launch = {"launch_pdl": True, "RELEASE_AT_START": release} if pdl else {}
    out = torch.empty(b, hq, 1, d, device=q.device, dtype=q.dtype)
    if splits == 1:
        acc = m = l = out  # unused: the split kernel normalizes and writes ``out`` itself
    else:
        acc = torch.empty(b * hkv * splits, 16, d, device=q.device, dtype=torch.float32)  # [programs, G pad, D]
        m = torch.empty(b * hkv * splits, 16, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
    meet = MERGE_IN_SPLIT and splits > 1
    whole = triton.next_power_of_2(per_split) if per_split <= WHOLE_SLICE_MAX else 0
    cnt = meet_counters(q.device, b * hkv) if meet else out  # unread without MEET
    if prep:
        p = prep
        sq_b, sq_h = q.stride(0), q.stride(2)
        extra = (p["k_new"], p["v_new"], p["q_weight"], p["k_weight"], p["cos"], p["sin"], p["pos"], p["eps"],
                 p["k_new"].stride(0), p["k_new"].stride(2), p["v_new"].stride(0), p["v_new"].stride(2),
                 p["cos"].stride(0) if p["cos"].shape[0] > 1 else 0, p["sin"].stride(0) if p["sin"].shape[0] > 1 else 0)
    else:
        sq_b, sq_h = q.stride(0), q.stride(1)
        extra = (q, q, q, q, q, q, q, 0.0, 0, 0, 0, 0, 0, 0)  # unread without PREP
    _decode_attention_split[(b * hkv, splits)](
        q, k, v, acc, m, l, out, filled, per_split, d ** -0.5,
        sq_b, sq_h, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), *extra, cnt,
        HKV=hkv, G=g, D=d, BLOCK_N=BLOCK_N, SPLITS=splits, PREP=prep is not None, PDL=pdl, MEET=meet,
        G2=triton.next_power_of_2(g), WHOLE=whole, num_warps=4, **launch,
    )
    if splits > 1 and not meet:
        _decode_attention_merge[(b * hq,)](
            acc, m, l, out, out.stride(0), out.stride(1),
            HKV=hkv, G=g, D=d, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), PDL=pdl, num_warps=4,
            **launch,
        )
    return out


@torch.library.custom_op("qwenquant::decode_attention_prep", mutates_args=("k_cache", "v_cache"))
def decode_attention_prep(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float,
                          cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                          filled: int) -> Tensor:
    """``decode_prep`` then ``decode_attention`` in one split kernel (+ the merge): q / k / v the qkv projection's
    output by heads [B, 1, H, D], the rest as ``decode_prep.reference_decode_prep``; returns the attention output
    [B, Hq, 1, D] over positions 0 … filled − 1 after writing the new K / V at ``pos`` (which must lie inside the
    cache: a device value, not checked on the GPU path). On a CPU, or where either kernel would not run, the two
    references in turn."""
    P.check_operands(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, pos)
    qt = q.transpose(1, 2)  # [B, Hq, 1, D] as the attention takes it (a view)
    check_operands(qt, k_cache, v_cache, filled)
    if not (P.kernel_ok(q, k, v, k_cache, v_cache, cos, sin) and kernel_ok(qt, k_cache, v_cache)
            and q_weight.stride(-1) == k_weight.stride(-1) == 1):
        qr = P.reference_decode_prep(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, pos)
        return reference_decode_attention(qr, k_cache, v_cache, filled)
    return _triton_decode_attention(q, k_cache, v_cache, filled,
                                    prep=dict(k_new=k, v_new=v, q_weight=q_weight, k_weight=k_weight, eps=eps,
                                              cos=cos, sin=sin, pos=pos))


@decode_attention_prep.register_fake
def _(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, pos, filled):
    b, _, hq, d = q.shape
    return q.new_empty(b, hq, 1, d)


if triton is not None:
    from qwenquant.kernels.decode_prep import _norm_rope

    @triton.jit
    def _decode_attention_split(q_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr, o_ptr, filled, per_split, sm_scale,
                      sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h,
                      kn_ptr, vn_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, eps, skn_b, skn_h, svn_b, svn_h,
                      sc_b, ss_b, cnt_ptr,
                      HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPLITS: tl.constexpr, PREP: tl.constexpr, PDL: tl.constexpr = False,
                      RELEASE_AT_START: tl.constexpr = False, MEET: tl.constexpr = False, G2: tl.constexpr = 4,
                      WHOLE: tl.constexpr = 0):
        bh = tl.program_id(0)           # batch row * HKV + KV head
        s = tl.program_id(1)            # which slice of the positions
        b = (bh // HKV).to(tl.int64)    # 64-bit offsets: a long cache at a large batch passes 2**31 elements
        h = (bh % HKV).to(tl.int64)
        rows = tl.arange(0, 16)         # the group's query heads, padded to tl.dot's 16 rows
        d = tl.arange(0, D)
        live = rows < G
        start = s * per_split           # positions: 32-bit here, 64-bit once they multiply a stride (``n`` below)
        end = tl.minimum(start + per_split, filled)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        if WHOLE > 0:  # the slice (at most WHOLE positions) in one load of K and one of V, no loop (``WHOLE_SLICE_MAX``)
            nw = start + tl.arange(0, WHOLE)
            keep_w = nw < end
            if PREP:  # the cached rows are older steps' writes: load them before the wait, overlapping it; the new
                # position's row (stale here) is replaced below by the K / V this program computes
                kb_w = tl.load(k_base + nw.to(tl.int64)[:, None] * sk_t + d[None, :], mask=keep_w[:, None], other=0.0)
                vb_w = tl.load(v_base + nw.to(tl.int64)[:, None] * sv_t + d[None, :], mask=keep_w[:, None], other=0.0)
        wait_for_producer(PDL)          # q (and with PREP the new K / V) come from the kernel before
        if RELEASE_AT_START:            # overlap.RELEASE_AT_START: the next kernel may launch now
            release_dependents(PDL)
        q = tl.load(q_ptr + b * sq_b + (h * G + rows)[:, None] * sq_h + d[None, :], mask=live[:, None], other=0.0)
        if PREP:  # q is the projection's raw output: norm + rotary here (decode_prep's math, per program)
            dt = q.dtype
            c = tl.load(cos_ptr + b * sc_b + d).to(tl.float32)
            sn = tl.load(sin_ptr + b * ss_b + d).to(tl.float32)
            q = _norm_rope(q.to(tl.float32), tl.load(q_ptr + b * sq_b + (h * G + rows)[:, None] * sq_h
                                                     + ((d + D // 2) % D)[None, :], mask=live[:, None],
                                                     other=0.0).to(tl.float32),
                           qw_ptr, d, c, sn, eps, D, dt)
            t = tl.load(pos_ptr).to(tl.int32)  # the new position; its K / V are written by the program that
            # reads it (or by the last program when it lies past ``filled``), before that program's loop
            owner = ((t >= start) & (t < end)) | ((s == SPLITS - 1) & (t >= filled))
            # (the new row's load / rotation / store is written out in both branches: as one shared @triton.jit
            # helper the stepping build spilled 8 bytes, tests/test_pdl_step.py)
            if WHOLE > 0:  # every program rotates the new K (one row); the owner stores it, all substitute it
                kx = tl.load(kn_ptr + b * skn_b + h * skn_h + d[None, :]).to(tl.float32)                # [1, D]
                kp = tl.load(kn_ptr + b * skn_b + h * skn_h + ((d + D // 2) % D)[None, :]).to(tl.float32)
                kr = _norm_rope(kx, kp, kw_ptr, d, c, sn, eps, D, dt)
                vr = tl.load(vn_ptr + b * svn_b + h * svn_h + d)                                        # [D]
                tt = t.to(tl.int64)
                tl.store(k_ptr + b * sk_b + h * sk_h + tt * sk_t + d[None, :], kr, mask=owner)
                tl.store(v_ptr + b * sv_b + h * sv_h + tt * sv_t + d, vr, mask=owner)
                new_row = (nw == t)[:, None]
                kb_w = tl.where(new_row, kr.to(kb_w.dtype), kb_w)
                vb_w = tl.where(new_row, vr[None, :].to(vb_w.dtype), vb_w)
            elif owner:
                kx = tl.load(kn_ptr + b * skn_b + h * skn_h + d[None, :]).to(tl.float32)                # [1, D]
                kp = tl.load(kn_ptr + b * skn_b + h * skn_h + ((d + D // 2) % D)[None, :]).to(tl.float32)
                kr = _norm_rope(kx, kp, kw_ptr, d, c, sn, eps, D, dt)
                tt = t.to(tl.int64)
                tl.store(k_ptr + b * sk_b + h * sk_h + tt * sk_t + d[None, :], kr)
                tl.store(v_ptr + b * sv_b + h * sv_h + tt * sv_t + d, tl.load(vn_ptr + b * svn_b + h * svn_h + d))
                tl.debug_barrier()  # the row is in the cache before any thread of this program reads it
        if WHOLE > 0:  # the softmax over the whole slice at once (no rescaling steps)
            if not PREP:  # the cache's rows may be the kernel before's writes: load after the wait
                kb_w = tl.load(k_base + nw.to(tl.int64)[:, None] * sk_t + d[None, :], mask=keep_w[:, None], other=0.0)
                vb_w = tl.load(v_base + nw.to(tl.int64)[:, None] * sv_t + d[None, :], mask=keep_w[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(kb_w)) * sm_scale                                              # [16, WHOLE]
            qk = tl.where(keep_w[None, :], qk, float("-inf"))
            m_i = tl.max(qk, 1)
            p = tl.exp(qk - m_i[:, None])
            l_i = tl.sum(p, 1)
            acc = tl.dot(p.to(vb_w.dtype), vb_w)                                                    # [16, D]
        else:
            m_i = tl.full([16], float("-inf"), tl.float32)
            l_i = tl.zeros([16], tl.float32)
            acc = tl.zeros([16, D], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                keep = n < end
                n = n.to(tl.int64)
                kb = tl.load(k_base + n[:, None] * sk_t + d[None, :], mask=keep[:, None], other=0.0)   # [BLOCK_N, D]
                qk = tl.dot(q, tl.trans(kb)) * sm_scale                                                # [16, BLOCK_N]
                qk = tl.where(keep[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(qk - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                vb = tl.load(v_base + n[:, None] * sv_t + d[None, :], mask=keep[:, None], other=0.0)   # [BLOCK_N, D]
                acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
                m_i = m_new
        if SPLITS == 1:
            o = acc / l_i[:, None]
            tl.store(o_ptr + b * so_b + (h * G + rows)[:, None] * so_h + d[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=live[:, None])
        else:
            prog = bh.to(tl.int64) * SPLITS + s
            tl.store(acc_ptr + (prog * 16 + rows)[:, None] * D + d[None, :], acc)
            tl.store(m_ptr + prog * 16 + rows, m_i)
            tl.store(l_ptr + prog * 16 + rows, l_i)
            if MEET:  # the last split of this (batch row, KV head) to finish merges them all: no merge launch
                tl.debug_barrier()  # every thread's slice is stored before the release below
                done = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel") + 1
                if done == SPLITS:
                    _merge_slices(acc_ptr, m_ptr, l_ptr, o_ptr, bh.to(tl.int64) * SPLITS, b * so_b + h * G * so_h,
                                  so_h, G, G2, D, SPLITS)
                    tl.atomic_xchg(cnt_ptr + bh, 0)  # ready for the next call (and the next graph replay)

    @triton.jit
    def _merge_slices(acc_ptr, m_ptr, l_ptr, o_ptr, first, o_off, so_h, G: tl.constexpr, G2: tl.constexpr,
                      D: tl.constexpr, SPLITS: tl.constexpr):
        """The exact softmax over SPLITS slices (slots first … first + SPLITS - 1, G live rows each) into o: every
        slice's max, sum and output loaded at once (the loop unrolled: ``SPLITS`` loads of [G2, D] in flight, read
        past L1 — they were written by other programs), rescaled to the common max."""
        rg = tl.arange(0, G2)
        d = tl.arange(0, D)
        live = rg < G
        m_all = tl.full([G2], float("-inf"), tl.float32)
        for j in tl.static_range(SPLITS):
            m_all = tl.maximum(m_all, tl.load(m_ptr + (first + j) * 16 + rg, mask=live, other=0.0,
                                              cache_modifier=".cg"))
        den = tl.zeros([G2], tl.float32)
        o = tl.zeros([G2, D], tl.float32)
        for j in tl.static_range(SPLITS):
            w = tl.exp(tl.load(m_ptr + (first + j) * 16 + rg, mask=live, other=0.0, cache_modifier=".cg") - m_all)
            den += w * tl.load(l_ptr + (first + j) * 16 + rg, mask=live, other=0.0, cache_modifier=".cg")
            o += w[:, None] * tl.load(acc_ptr + ((first + j) * 16 + rg)[:, None] * D + d[None, :], mask=live[:, None],
                                      other=0.0, cache_modifier=".cg")
        o = o / tl.where(live, den, 1.0)[:, None]
        tl.store(o_ptr + o_off + rg[:, None] * so_h + d[None, :], o.to(o_ptr.dtype.element_ty), mask=live[:, None])

    @triton.jit
    def _decode_attention_merge(acc_ptr, m_ptr, l_ptr, o_ptr, so_b, so_h,
                      HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                      SPLITS_P2: tl.constexpr, PDL: tl.constexpr = False, RELEASE_AT_START: tl.constexpr = False):
        wait_for_producer(PDL)               # the split kernel's slices
        if RELEASE_AT_START:
            release_dependents(PDL)
        pid = tl.program_id(0).to(tl.int64)  # batch row * Hq + query head (64-bit offsets, as the split kernel)
        hq = HKV * G
        b = pid // hq
        qh = pid % hq
        bh = b * HKV + qh // G
        row = qh % G
        s = tl.arange(0, SPLITS_P2)
        d = tl.arange(0, D)
        ok = s < SPLITS
        idx = (bh * SPLITS + s) * 16 + row                                                   # [SPLITS_P2]
        m_s = tl.load(m_ptr + idx, mask=ok, other=float("-inf"))
        l_s = tl.load(l_ptr + idx, mask=ok, other=0.0)
        acc = tl.load(acc_ptr + idx[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)    # [SPLITS_P2, D]
        w = tl.exp(m_s - tl.max(m_s, 0))                                                     # 0 for padded slots
        o = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
        tl.store(o_ptr + b * so_b + qh * so_h + d, o.to(o_ptr.dtype.element_ty))


def compile_for_sm90(kernel: str = "split", dtype: torch.dtype = torch.bfloat16, kv_heads: int = 8, group: int = 4,
                     head_dim: int = 128, splits: int = 17, prep: bool = False, pdl: bool = False,
                     release_at_start: bool = False, meet: bool = False, whole: int = 0):
    """Compile ``_decode_attention_split`` (``kernel="split"``) or ``_decode_attention_merge`` for an H100 (sm_90a) on
    any machine, GPU or not (the Triton wheel carries ptxas): Triton's compiled kernel (``.asm['ptx' | 'cubin']``,
    ``.metadata.shared``). The CPU tests use it to check that the real (not interpreted) kernels build, without a GPU
    call: session 17 had no GPU to run them on."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    if kernel == "split":
        fn = _decode_attention_split
        sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
               "o_ptr": ptr, "filled": "i32", "per_split": "i32", "sm_scale": "fp32",
               **{name: "i32" for name in ("sq_b", "sq_h", "sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t", "so_b",
                                           "so_h")},
               "kn_ptr": ptr, "vn_ptr": ptr, "qw_ptr": ptr, "kw_ptr": ptr, "cos_ptr": ptr, "sin_ptr": ptr,
               "pos_ptr": "*i64", "eps": "fp32",
               **{name: "i32" for name in ("skn_b", "skn_h", "svn_b", "svn_h", "sc_b", "ss_b")}, "cnt_ptr": "*i32",
               "HKV": "constexpr", "G": "constexpr", "D": "constexpr", "BLOCK_N": "constexpr", "SPLITS": "constexpr",
               "PREP": "constexpr", "PDL": "constexpr", "RELEASE_AT_START": "constexpr", "MEET": "constexpr",
               "G2": "constexpr", "WHOLE": "constexpr"}
        consts = {"HKV": kv_heads, "G": group, "D": head_dim, "BLOCK_N": BLOCK_N, "SPLITS": splits, "PREP": prep,
                  "PDL": pdl, "RELEASE_AT_START": release_at_start, "MEET": meet,
                  "G2": triton.next_power_of_2(group), "WHOLE": whole}
    elif kernel == "merge":
        fn = _decode_attention_merge
        sig = {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "o_ptr": ptr, "so_b": "i32", "so_h": "i32",
               "HKV": "constexpr", "G": "constexpr", "D": "constexpr", "SPLITS": "constexpr", "SPLITS_P2": "constexpr",
               "PDL": "constexpr", "RELEASE_AT_START": "constexpr"}
        consts = {"HKV": kv_heads, "G": group, "D": head_dim, "SPLITS": splits,
                  "SPLITS_P2": triton.next_power_of_2(splits), "PDL": pdl, "RELEASE_AT_START": release_at_start}
    else:
        raise ValueError(f"kernel={kernel!r}: expected 'split' or 'merge'")
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a.endswith("_ptr")}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4})
