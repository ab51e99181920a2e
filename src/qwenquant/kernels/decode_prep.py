"""Decode-step preparation of Qwen3 attention in one kernel: per-head RMSNorm of q and k, rotary embedding, and the
write of the new K and V into a static cache.

The cost it attacks (Qwen3-8B, batch 1, H100, ``results/profile_e2e_merged_h100.json``): between the qkv projection
and the attention, torch.compile leaves four small kernels per layer — q's norm + rotary, k's norm + rotary + cache
write, v's cache write, a layout copy — ≈ 6.7 µs per layer with their launch gaps, for 12 KB of data. One program per
(sequence, head) does all of it for its head: ``1 + 2·Hkv/Hq`` reads and writes of a head vector, nothing else.

:func:`decode_prep` is a ``torch.library`` op that mutates the two caches (torch.compile keeps it one opaque call and
writes the caches in place); on a CPU, or for shapes the kernel does not take, it runs :func:`reference_decode_prep`,
the HF modules' math written out (``Qwen3RMSNorm`` then ``apply_rotary_pos_emb``, then ``index_copy_``).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the op runs the reference
    triton = None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen3RMSNorm over the last dim: the mean square in fp32, the normalized value rounded to x's dtype, then
    scaled by ``weight`` (as HF's module, whose product rounds once more)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's ``apply_rotary_pos_emb`` for one tensor: x [B, H, T, D], cos / sin [B, T, D] (halves paired)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def reference_decode_prep(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float,
                          cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    """q [B, 1, Hq, D], k / v [B, 1, Hkv, D] (the qkv projection's output split by heads), norm weights [D], cos / sin
    [B, 1, D], caches [B, Hkv, ctx, D], pos [1] (int64, the new position) → the query [B, Hq, 1, D], normalized and
    rotated (contiguous). Writes rope(norm(k)) and v into both caches at ``pos``."""
    qr = rotate(rms_norm(q, q_weight, eps).transpose(1, 2), cos, sin)
    kr = rotate(rms_norm(k, k_weight, eps).transpose(1, 2), cos, sin)
    k_cache.index_copy_(2, pos, kr.to(k_cache.dtype))
    v_cache.index_copy_(2, pos, v.transpose(1, 2).to(v_cache.dtype))
    return qr.contiguous()


def check_operands(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                   k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> None:
    """Refuse, by value, operands that do not form one decode step's preparation (on every path alike)."""
    if q.dim() != 4 or q.shape[1] != 1 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"decode prep: expected q [B, 1, Hq, D] and k, v [B, 1, Hkv, D] alike, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or d % 2:
        raise ValueError(f"decode prep: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim, or the "
                         f"head dim {d} is odd (rotary pairs its halves)")
    if q_weight.shape != (d,) or k_weight.shape != (d,):
        raise ValueError(f"decode prep: norm weights {tuple(q_weight.shape)}, {tuple(k_weight.shape)}: expected ({d},)")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (1, d) or cos.shape[0] not in (1, b):
        raise ValueError(f"decode prep: cos {tuple(cos.shape)}, sin {tuple(sin.shape)}: expected [{b} or 1, 1, {d}]")
    if (k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[0] != b or k_cache.shape[1] != hkv
            or k_cache.shape[3] != d):
        raise ValueError(f"decode prep: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}: expected "
                         f"[{b}, {hkv}, ctx, {d}] alike")
    if pos.numel() != 1 or pos.dtype != torch.int64:
        raise ValueError(f"decode prep: pos {tuple(pos.shape)} {pos.dtype}: expected one int64 position")
    tensors = (q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, pos)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"decode prep: operands on several devices: {sorted({str(t.device) for t in tensors})}")


def kernel_ok(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """What the Triton kernel takes (operands already checked): CUDA, 16-bit, one dtype for activations and caches,
    head dim a power of two ≥ 16, unit stride along it everywhere."""
    if triton is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = q.shape[-1]
    same = all(t.dtype == q.dtype for t in (k, v, k_cache, v_cache))
    unit = all(t.stride(-1) == 1 for t in (q, k, v, k_cache, v_cache, cos, sin))
    return same and unit and d >= 16 and d & (d - 1) == 0


@torch.library.custom_op("qwenquant::decode_prep", mutates_args=("k_cache", "v_cache"))
def decode_prep(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float, cos: Tensor,
                sin: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    """q / k RMSNorm, rotary and the cache write of one decode step; shapes as :func:`reference_decode_prep`. One
    Triton kernel where :func:`kernel_ok`, else the reference. ``pos`` must lie in 0 … ctx − 1: it is a device value
    (a CUDA graph replays the step at any position), so the kernel cannot check it without a host sync."""
    check_operands(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, pos)
    if not kernel_ok(q, k, v, k_cache, v_cache, cos, sin):
        return reference_decode_prep(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, pos)
    return _triton_decode_prep(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, pos)


@decode_prep.register_fake
def _(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, pos):
    b, _, hq, d = q.shape
    return q.new_empty(b, hq, 1, d)


def _triton_decode_prep(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, pos) -> Tensor:
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    out = torch.empty(b, hq, 1, d, device=q.device, dtype=q.dtype)  # [B, Hq, 1, D], as the attention reads it
    cb = cos.stride(0) if cos.shape[0] > 1 else 0                    # one rotation for every row, or one per row
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    _decode_prep[(b, hq + hkv)](
        q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, pos, out, eps,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2), cb, sb,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1),
        HQ=hq, D=d, num_warps=1,
    )
    return out


if triton is not None:

    @triton.jit
    def _norm_rope(x, xp, w_ptr, d, c, sn, eps, D: tl.constexpr, dt: tl.constexpr):
        """Qwen3's per-head RMSNorm then rotary for rows x [R, D] (fp32), given xp, the same rows with their halves
        swapped (column (d + D/2) mod D, so no reshapes), d = arange(D), c / sn the row's cos / sin [D] (fp32):
        ``n·cos + rotate_half(n)·sin`` with rotate_half(n) = (−n₂, n₁). Rounds as :func:`rms_norm` (to dt before and
        after the weight); the result in dt. Shared by ``_decode_prep`` and the split-K attention kernel's PREP."""
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]                  # x and xp hold the same squares
        n = ((x * r).to(dt).to(tl.float32) * tl.load(w_ptr + d).to(tl.float32)[None, :]).to(dt).to(tl.float32)
        npart = ((xp * r).to(dt).to(tl.float32) * tl.load(w_ptr + (d + D // 2) % D).to(tl.float32)[None, :])
        npart = npart.to(dt).to(tl.float32)
        sign = tl.where(d < D // 2, -1.0, 1.0)[None, :]
        return (n * c[None, :] + sign * npart * sn[None, :]).to(dt)

    @triton.jit
    def _decode_prep(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, eps,
                     sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, ss_b, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
                     so_b, so_h, HQ: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)    # 64-bit offsets: caches of large batches pass 2**31 elements
        h = tl.program_id(1)                 # query heads 0 … HQ − 1, then the KV heads
        d = tl.arange(0, D)
        c = tl.load(cos_ptr + b * sc_b + d).to(tl.float32)
        sn = tl.load(sin_ptr + b * ss_b + d).to(tl.float32)
        if h < HQ:
            src = q_ptr + b * sq_b + h * sq_h
            w_ptr = qw_ptr
            dst = o_ptr + b * so_b + h * so_h
        else:
            j = (h - HQ).to(tl.int64)
            t = tl.load(pos_ptr)
            src = k_ptr + b * sk_b + j * sk_h
            w_ptr = kw_ptr
            dst = kc_ptr + b * skc_b + j * skc_h + t * skc_t
            tl.store(vc_ptr + b * svc_b + j * svc_h + t * svc_t + d, tl.load(v_ptr + b * sv_b + j * sv_h + d))
        x = tl.load(src + d[None, :])                                                   # [1, D]
        xp = tl.load(src + ((d + D // 2) % D)[None, :]).to(tl.float32)                   # halves swapped
        tl.store(dst + d[None, :], _norm_rope(x.to(tl.float32), xp, w_ptr, d, c, sn, eps, D, x.dtype))


def compile_for_sm90(dtype: torch.dtype = torch.bfloat16, q_heads: int = 32, head_dim: int = 128):
    """Compile ``_decode_prep`` for an H100 (sm_90a) on any machine (the Triton wheel carries ptxas): the CPU tests
    check that the real, not interpreted, kernel builds."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "qw_ptr": ptr, "kw_ptr": ptr, "cos_ptr": ptr, "sin_ptr": ptr,
           "kc_ptr": ptr, "vc_ptr": ptr, "pos_ptr": "*i64", "o_ptr": ptr, "eps": "fp32",
           **{name: "i32" for name in ("sq_b", "sq_h", "sk_b", "sk_h", "sv_b", "sv_h", "sc_b", "ss_b", "skc_b",
                                       "skc_h", "skc_t", "svc_b", "svc_h", "svc_t", "so_b", "so_h")},
           "HQ": "constexpr", "D": "constexpr"}
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a.endswith("_ptr")}
    return triton.compile(ASTSource(_decode_prep, sig, constexprs={"HQ": q_heads, "D": head_dim}, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
