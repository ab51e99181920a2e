"""Weight-only low-bit matmul (W4A16, W8A16, W2A16): y = x Ŵᵀ with Ŵ read packed and dequantized in registers.

The weight stays in the checkpoint layout (``numerics.affine.affine_to_tensors``), viewed — not
copied — as int32 words:

    qweight [N, K*bits/8] uint8  ──view──▶  words [N, K/cpw] int32,  cpw = 32 / bits codes per word
    code of column k = 8w + t (4 bits) sits at bits [4t, 4t+4) of word w  (little-endian stream)
    scale [N, K/G] fp16, zero [N, K/G] uint8:  ŵ = (code - zero) * scale

No repacking, so the bytes a kernel reads are exactly the storage bytes (4.1875 bits per weight for
W4 g128: codes + fp16 scale + uint8 zero per 128 columns). Widths that divide 32 (2, 4, 8) are
supported; 3-bit codes straddle words and are not (use ``dequant``).

Two kernels, because the bottleneck changes with the number of rows M of x:

* ``_gemv_kernel`` (M ≤ 4, decode). Memory-bound: the floor is weight bytes / bandwidth, but the
  arithmetic to unpack 8 codes per word is the same order as the bytes, so the inner loop is
  counted in instructions. Per code: one LOP3 ``(w & (15 << 4t)) | 0x4B000000`` — an fp32 whose
  value is ``2**23 + code * 16**t`` (the "magic number" int→float trick, no I2F) — one FADD to
  remove 2**23, one FFMA with ``x * 16**-t`` (the power of two is folded into x, exact). Codes in
  the high half-word use ``w >> 16`` (one shift per word) so every field sits below bit 23. Zero
  and scale are applied per word (``s * (Σ c·x - z Σ x)``), not per code. Split-K (fp32 atomics)
  gives small-N shapes enough blocks to fill the GPU.
* ``_gemm_kernel`` (M > 4, prefill and batched decode). Tensor cores: each K-step unpacks a
  [BN, BK] tile to bf16 (``(code - zero) * scale`` in fp32, rounded once — the same value as
  ``Ŵ.to(bf16)``) and ``tl.dot``s it with the x tile in fp32 accumulation.

References: ``reference_dequantize`` / ``reference_matmul`` (plain torch, any device). Known
limits: group sizes must be multiples of 32 and divide K (32/64/128 and per-channel are tested);
N, K multiples of 8 / 32; no 3-bit; the GEMM path is a plain Triton pipeline (no warp
specialisation), so at large M it trails cuBLAS bf16 — ``auto`` then dequantizes and calls cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwenquant.kernels.tiles import grouped_tile, tile_ranges
from qwenquant.numerics.packing import unpack

SUPPORTED_BITS = (2, 4, 8)
GEMV_MAX_M = 4  # the FFMA kernel holds one accumulator tile per row of x
# bits of float32 2**23; OR-ing a field < 2**23 into it gives the float 2**23 + field
MAGIC: tl.constexpr = tl.constexpr(0x4B000000)


# --- references -------------------------------------------------------------------------


def reference_dequantize(qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, in_features: int) -> Tensor:
    """[N, K] float32 Ŵ = (code - zero) * scale, straight from the storage tensors."""
    codes = unpack(qweight, bits, in_features).float()  # [N, K]
    g = in_features // scale.shape[1]
    return (codes - zero.float().repeat_interleave(g, 1)) * scale.float().repeat_interleave(g, 1)


def reference_matmul(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """x [.., K] @ Ŵᵀ in float64 (the ground truth kernels are compared with)."""
    k = x.shape[-1]
    w = reference_dequantize(qweight, scale, zero, bits, k)
    return (x.double() @ w.double().T).to(torch.float32)


# --- checks -------------------------------------------------------------------------------


def check_supported(bits: int, group_size: int | None, n: int, k: int) -> None:
    """Raise ValueError naming the alternatives when the fused kernels cannot run this weight."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"fused kernels support {SUPPORTED_BITS}-bit weights, got {bits}-bit; "
            "use execution mode 'dequant' (any width) or 'fake'"
        )
    g = k if group_size is None else group_size
    if g % 32 or k % g:
        raise ValueError(
            f"fused kernels need a group size that is a multiple of 32 and divides in_features={k}, "
            f"got {group_size}; supported: 32, 64, 128, … or per-channel; otherwise use 'dequant'"
        )
    if n % 8:
        raise ValueError(f"fused kernels need out_features divisible by 8, got {n}; use 'dequant'")


def _words(qweight: Tensor) -> Tensor:
    # [N, K*bits/8] uint8 -> [N, K*bits/32] int32, a view (little-endian, so code order is kept)
    return qweight.view(torch.int32)


# --- GEMV (M <= 4) ----------------------------------------------------------------------


@triton.jit
def _ffma_words(w, x_base, xmask, BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
    """The GEMV inner step on a [BN, BKW] word tile: (Σ_t code_t·x_t [BM, BN, BKW], Σ_t x_t [BM, BKW]).

    x_base [BM, BKW] points at the first of each word's CPW columns (x read with stride CPW). Per code one
    LOP3 ``(w & (MASK << sh)) | 0x4B000000`` (the float 2**23 + code·2**sh), one FADD, one FFMA with
    x·2**-sh (exact); codes in the high half-word use ``w >> 16`` so every field sits below bit 23."""
    CPW: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = CPW // 2
    MASK: tl.constexpr = (1 << BITS) - 1
    w_hi = w >> 16
    inner = tl.zeros([BM, BN, BKW], dtype=tl.float32)
    xs = tl.zeros([BM, BKW], dtype=tl.float32)
    for t in tl.static_range(CPW):
        if t < HALF:
            src = w
            sh = BITS * t
        else:
            src = w_hi
            sh = BITS * (t - HALF)
        f = ((src & (MASK << sh)) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0  # code * 2**sh
        xt = tl.load(x_base + t, mask=xmask, other=0.0).to(tl.float32)  # [BM, BKW]
        xs += xt
        inner += f[None, :, :] * (xt * (1.0 / (1 << sh)))[:, None, :]
    return inner, xs


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, kw_per_split, GROUP,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    CPW: tl.constexpr = 32 // BITS
    WPG = GROUP // CPW
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    KW = K // CPW
    NG = K // GROUP
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    n_mask = rn < N
    m_mask = rm < M
    kw_start = pid_k * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, KW)
    acc = tl.zeros([BM, BN, BKW], dtype=tl.float32)
    for kw0 in range(kw_start, kw_end, BKW):
        rkw = kw0 + tl.arange(0, BKW)
        k_mask = rkw < kw_end
        wmask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_ptr + rn[:, None] * KW + rkw[None, :], mask=wmask, other=0)  # [BN, BKW] int32
        g = rkw // WPG
        s = tl.load(s_ptr + rn[:, None] * NG + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * NG + g[None, :], mask=wmask, other=0).to(tl.float32)
        xmask = m_mask[:, None] & k_mask[None, :]
        x_base = x_ptr + rm[:, None] * stride_xm + rkw[None, :] * CPW  # [BM, BKW]
        inner, xsum = _ffma_words(w, x_base, xmask, BITS, BM, BN, BKW)
        acc += s[None, :, :] * (inner - z[None, :, :] * xsum[:, None, :])
    y = tl.sum(acc, axis=2)  # [BM, BN]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ymask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, y, mask=ymask, sem="relaxed")
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=ymask)


def gemv(x2: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int,
         bn: int = 16, bkw: int = 64, split_k: int = 1, num_warps: int = 4) -> Tensor:
    """x2 [M<=4, K] (bf16/fp16) -> [M, N] in x's dtype."""
    m, k = x2.shape
    n = qweight.shape[0]
    cpw = 32 // bits
    kw = k // cpw
    per_split = triton.cdiv(triton.cdiv(kw, split_k), bkw) * bkw
    grid_k = triton.cdiv(kw, per_split)
    bm = max(1, triton.next_power_of_2(m))
    if grid_k > 1:
        y = torch.zeros((m, n), device=x2.device, dtype=torch.float32)
    else:
        y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    _gemv_kernel[(triton.cdiv(n, bn), grid_k)](
        x2, _words(qweight), scale, zero, y, m, n, k, x2.stride(0), y.stride(0), per_split, group,
        BITS=bits, BM=bm, BN=bn, BKW=bkw, ATOMIC=grid_k > 1, num_warps=num_warps,
    )
    return y if grid_k == 1 else y.to(x2.dtype)


# --- GEMV v2 (M <= 4, decode): per-group scale/zero, no per-word side loads ------------------


@triton.jit
def _gemv2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, kw_per_split, WPG,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, GPB: tl.constexpr,
    XVEC: tl.constexpr, ATOMIC: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One program: BN rows × one K split. Per K-step a [BN, BKW] word tile (rows clamped, K unmasked:
    the host guarantees BKW | K/CPW and that a step never straddles a group unless it holds GPB whole
    groups), ONE scale/zero per (row, group) — not per word — and x either as CPW stride-CPW vectors
    (XVEC=False: the magic-number trick with shifts folded into x) or as one contiguous [BKW*CPW]
    vector reshaped to [BKW, CPW] against codes split by shifts (XVEC=True). The code·x sums are
    accumulated per group; ``s * (Σ c·x - z Σ x)`` is applied once per group."""
    CPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WB: tl.constexpr = BKW // GPB
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    KW = K // CPW
    NG = KW // WPG
    rn = pid_n * BN + tl.arange(0, BN)
    rn_c = tl.where(rn < N, rn, 0)
    rm = tl.arange(0, BM)
    m_mask = rm < M
    rkw = tl.arange(0, BKW)
    kw_start = pid_k * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, KW)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    w_ptrs = w_ptr + rn_c[:, None] * KW + rkw[None, :]
    sz_row = rn_c[:, None] * NG + tl.arange(0, GPB)[None, :]
    if PREFETCH:  # software pipeline by hand: the next step's words are in flight while this one computes
        w_n = tl.load(w_ptrs + kw_start)
        s_n = tl.load(s_ptr + sz_row + kw_start // WPG)
        z_n = tl.load(z_ptr + sz_row + kw_start // WPG)
    for kw0 in range(kw_start, kw_end, BKW):
        if PREFETCH:
            w = w_n
            s = s_n.to(tl.float32)
            z = z_n.to(tl.float32)
            nk = tl.minimum(kw0 + BKW, kw_end - BKW)  # the last step re-reads itself (an L1/L2 hit)
            w_n = tl.load(w_ptrs + nk)
            s_n = tl.load(s_ptr + sz_row + nk // WPG)
            z_n = tl.load(z_ptr + sz_row + nk // WPG)
        else:
            w = tl.load(w_ptrs + kw0)  # [BN, BKW] int32
            g0 = kw0 // WPG
            s = tl.load(s_ptr + sz_row + g0).to(tl.float32)  # [BN, GPB]
            z = tl.load(z_ptr + sz_row + g0).to(tl.float32)
        if XVEC:
            rk = kw0 * CPW + tl.arange(0, BKW * CPW)
            xv = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None], other=0.0)
            x3 = tl.reshape(xv.to(tl.float32), [BM, BKW, CPW])
            shifts = tl.arange(0, CPW) * BITS
            codes = (w[:, :, None] >> shifts[None, None, :]) & MASK
            f = (codes | MAGIC).to(tl.float32, bitcast=True) - 8388608.0  # [BN, BKW, CPW]
            inner = tl.sum(f[None, :, :, :] * x3[:, None, :, :], axis=3)  # [BM, BN, BKW]
            xs = tl.sum(x3, axis=2)  # [BM, BKW]
        else:
            x_base = x_ptr + rm[:, None] * stride_xm + (kw0 + rkw)[None, :] * CPW
            inner, xs = _ffma_words(w, x_base, m_mask[:, None], BITS, BM, BN, BKW)
        if GPB == 1:
            p = tl.sum(inner, axis=2)  # [BM, BN]
            xg = tl.sum(xs, axis=1)  # [BM]
            acc += tl.reshape(s, [BN])[None, :] * (p - tl.reshape(z, [BN])[None, :] * xg[:, None])
        else:
            p = tl.sum(tl.reshape(inner, [BM, BN, GPB, WB]), axis=3)  # [BM, BN, GPB]
            xg = tl.sum(tl.reshape(xs, [BM, GPB, WB]), axis=2)  # [BM, GPB]
            acc += tl.sum(s[None, :, :] * (p - z[None, :, :] * xg[:, None, :]), axis=2)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ymask = m_mask[:, None] & (rn[None, :] < N)
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=ymask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def gemv2_ok(bits: int, group: int, k: int, bkw: int) -> bool:
    """Can ``gemv2`` run this (K, group) with BKW words per step?"""
    cpw = 32 // bits
    kw, wpg = k // cpw, group // cpw
    return k % cpw == 0 and group % cpw == 0 and kw % bkw == 0 and (bkw % wpg == 0 or wpg % bkw == 0)


def gemv2(x2: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int,
          bn: int = 16, bkw: int = 32, split_k: int = 1, num_warps: int = 4, num_stages: int = 1,
          xvec: bool = False, prefetch: bool = False) -> Tensor:
    """x2 [M<=4, K] (bf16/fp16) -> [M, N] in x's dtype; needs ``gemv2_ok``."""
    m, k = x2.shape
    n = qweight.shape[0]
    cpw = 32 // bits
    kw, wpg = k // cpw, group // cpw
    if not gemv2_ok(bits, group, k, bkw):
        raise ValueError(f"gemv2: BKW={bkw} does not fit K={k}, group={group}")
    per_split = triton.cdiv(triton.cdiv(kw, split_k), bkw) * bkw
    if wpg > bkw:  # a split must start on a group boundary when a step holds part of a group
        per_split = triton.cdiv(per_split, wpg) * wpg
    grid_k = triton.cdiv(kw, per_split)
    bm = max(1, triton.next_power_of_2(m))
    gpb = max(1, bkw // wpg)
    if grid_k > 1:
        y = torch.zeros((m, n), device=x2.device, dtype=torch.float32)
    else:
        y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    _gemv2_kernel[(triton.cdiv(n, bn), grid_k)](
        x2, _words(qweight), scale, zero, y, m, n, k, x2.stride(0), y.stride(0), per_split, wpg,
        BITS=bits, BM=bm, BN=bn, BKW=bkw, GPB=gpb, XVEC=xvec, ATOMIC=grid_k > 1, PREFETCH=prefetch,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y if grid_k == 1 else y.to(x2.dtype)


# --- GEMM (tensor cores) ----------------------------------------------------------------


@triton.jit
def _dequant_tile(w, s, z, BITS: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
    """[BN, BKW] int32 words + per-word scale/zero -> [BN, BKW*CPW] float32 Ŵ in column order."""
    CPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    shifts = tl.arange(0, CPW) * BITS
    codes = (w[:, :, None] >> shifts[None, None, :]) & MASK  # [BN, BKW, CPW]
    f = (codes | MAGIC).to(tl.float32, bitcast=True) - (8388608.0 + z[:, :, None])
    return tl.reshape(f * s[:, :, None], [BN, BKW * CPW])


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, GROUP,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    CPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // CPW
    WPG = GROUP // CPW
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
    KW = K // CPW
    NG = K // GROUP
    rm, m_mask, rn, rn_c = tile_ranges(pid_m, pid_n, M, N, BM, BN)
    rk = tl.arange(0, BK)
    rkw = tl.arange(0, BKW)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_c[:, None] * KW + rkw[None, :]
    sz_off = rn_c[:, None] * NG + rkw[None, :] // WPG
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptrs)
        kw0 = k0 // CPW
        s = tl.load(s_ptr + sz_off + kw0 // WPG).to(tl.float32)
        z = tl.load(z_ptr + sz_off + kw0 // WPG).to(tl.float32)
        wt = _dequant_tile(w, s, z, BITS, BN, BKW).to(x.dtype)  # [BN, BK]
        acc = tl.dot(x, tl.trans(wt), acc)
        x_ptrs += BK
        w_ptrs += BKW
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (rn[None, :] < N))


def gemm(x2: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int,
         bm: int = 64, bn: int = 128, bk: int = 64, num_warps: int = 4, num_stages: int = 3, group_m: int = 8) -> Tensor:
    m, k = x2.shape
    n = qweight.shape[0]
    if k % bk:
        raise ValueError(f"K={k} is not a multiple of the tile BK={bk}")
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_kernel[grid](
        x2, _words(qweight), scale, zero, y, m, n, k, x2.stride(0), y.stride(0), group,
        BITS=bits, BM=bm, BN=bn, BK=bk, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
    )
    return y


# --- GEMM with the weight as the A operand (yᵀ = Ŵ xᵀ) ------------------------------------


@triton.jit
def _gemm_wa_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, GROUP, k_per_split,
    BITS: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GPS: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """One program: a [BN, BM] tile of yᵀ over one K split. Per K step the [BN, BK/CPW] word tile is
    unpacked in registers — each thread holds whole words, so the codes of one word land as CPW
    adjacent K values without a shuffle — to (code - zero)·scale in fp32, rounded once to x's
    dtype (the same value as ``Ŵ.to(bf16)``), and is the *register* A operand of the MMA; x's tile
    [BM, BK] is the B operand, transposed from shared memory. Putting the dequantized weight on the
    A side is what lets Hopper's wgmma take it straight from registers (B must come from shared
    memory): the older ``_gemm_kernel`` dequantizes into the B operand and pays a shared-memory
    round trip per step. GPS = scale groups per step (1 when BK <= group).

    Measured on an H100 (benchmarks/results/w4_session_h100_run{1,2}.json, Qwen3-8B shapes, W4 g128):
    0.55-0.63x bf16 at M = 8..64 — better than ``_gemm_kernel`` (0.2-0.45x) but far from the
    ~3x its bytes allow — and 0.06-0.27x at M >= 128, where the per-M-tile dequantization on the
    CUDA cores dominates. Loading the word tile pre-expanded to [BN, BK] (address k // CPW, shift
    (k % CPW)·BITS — the Triton GPTQ idiom, no reshape) was 4x slower still at every M and is gone."""
    CPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BK // CPW
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    KW = K // CPW
    NG = K // GROUP
    rm, m_mask, rn, rn_c = tile_ranges(pid_m, pid_n, M, N, BM, BN)
    rk = tl.arange(0, BK)
    rkw = tl.arange(0, BKW)
    shifts = tl.arange(0, CPW) * BITS
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        w = tl.load(w_ptr + rn_c[:, None] * KW + (k0 // CPW + rkw)[None, :])  # [BN, BKW] int32
        g = k0 // GROUP + tl.arange(0, GPS)
        s = tl.load(s_ptr + rn_c[:, None] * NG + g[None, :]).to(tl.float32)  # [BN, GPS]
        z = tl.load(z_ptr + rn_c[:, None] * NG + g[None, :]).to(tl.float32)
        codes = (w[:, :, None] >> shifts[None, None, :]) & MASK  # [BN, BKW, CPW]
        f = (codes | MAGIC).to(tl.float32, bitcast=True)  # 2**23 + code, exact
        f = tl.reshape(f, [BN, GPS, BK // GPS])
        wt = tl.reshape((f - (8388608.0 + z[:, :, None])) * s[:, :, None], [BN, BK])
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)
        acc = tl.dot(wt.to(x.dtype), tl.trans(x), acc)  # [BN, BK] @ [BK, BM]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    ymask = m_mask[None, :] & (rn[:, None] < N)
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=ymask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def gemm_wa_ok(bits: int, group: int, k: int, bk: int) -> bool:
    """Can ``gemm_wa`` run this (K, group) with BK columns per step?"""
    return k % bk == 0 and (bk % group == 0 or group % bk == 0) and bk % (32 // bits) == 0


def gemm_wa(x2: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int,
            bn: int = 64, bm: int = 16, bk: int = 128, num_warps: int = 4, num_stages: int = 3,
            split_k: int = 1) -> Tensor:
    """x2 [M, K] (bf16/fp16) -> [M, N] in x's dtype, the weight as the MMA's A operand (any M;
    meant for M >= 2). ``split_k`` > 1 splits K over programs that add into an fp32 buffer
    (small M: more programs than N/BN alone gives)."""
    m, k = x2.shape
    n = qweight.shape[0]
    if not gemm_wa_ok(bits, group, k, bk):
        raise ValueError(f"gemm_wa: BK={bk} does not fit K={k}, group={group}")
    per_split = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    grid_k = triton.cdiv(k, per_split)
    if grid_k > 1:
        y = torch.zeros((m, n), device=x2.device, dtype=torch.float32)
    else:
        y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    gps = max(1, bk // group)
    _gemm_wa_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), grid_k)](
        x2, _words(qweight), scale, zero, y, m, n, k, x2.stride(0), y.stride(0), group, per_split,
        BITS=bits, BN=bn, BM=bm, BK=bk, GPS=gps, ATOMIC=grid_k > 1, num_warps=num_warps,
        num_stages=num_stages,
    )
    return y if grid_k == 1 else y.to(x2.dtype)


# --- whole-weight dequantization (the storage-only path, done well) ---------------------


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP, BITS: tl.constexpr,
                    BN: tl.constexpr, BKW: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS
    WPG = GROUP // CPW
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    KW = K // CPW
    NG = K // GROUP
    rn = pid_n * BN + tl.arange(0, BN)
    rkw = pid_k * BKW + tl.arange(0, BKW)
    mask = (rn[:, None] < N) & (rkw[None, :] < KW)
    w = tl.load(w_ptr + rn[:, None] * KW + rkw[None, :], mask=mask, other=0)
    off = rn[:, None] * NG + rkw[None, :] // WPG
    s = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=mask, other=0).to(tl.float32)
    wt = _dequant_tile(w, s, z, BITS, BN, BKW)
    rk = pid_k * BKW * CPW + tl.arange(0, BKW * CPW)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], wt.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


def dequantize(qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, k: int,
               dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """[N, K] Ŵ in ``dtype`` (one pass: reads packed bytes, writes 2 bytes per weight)."""
    n = qweight.shape[0]
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    cpw = 32 // bits
    bn, bkw = 32, 32
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k // cpw, bkw))](
        _words(qweight), scale, zero, out, n, k, group, BITS=bits, BN=bn, BKW=bkw, num_warps=4,
    )
    return out
