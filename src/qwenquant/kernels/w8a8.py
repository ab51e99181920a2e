"""W8A8 on tensor cores: dynamic per-token activation quantization and the scaled epilogue.

int8:  xq = rint(x / sx) ∈ [-127, 127], sx = absmax(row) / 127  (numerics.activation's rule)
       acc = xq · (code - 128)ᵀ  via ``torch._int_mm`` (cuBLASLt, int8 × int8 → int32)
       y = sx · sw · (acc - (zero - 128) · Σ xq)   — the Σ term makes asymmetric 8-bit weights exact
fp8:   xq = (x / sx).to(e4m3), sx = absmax(row) / 448; weights re-quantized once to e4m3 with a
       per-channel scale; ``torch._scaled_mm`` applies both scales (row-wise) in its epilogue.

References: ``reference_act_quant`` (numerics.activation) and ``reference_w8a8`` below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import Tensor

from qwenquant.kernels.launch import launch_kernel
from qwenquant.kernels.tiles import grouped_tile, sm_count
from qwenquant.numerics.activation import quantize_per_token

FP8_MAX = 448.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, sum_ptr, K, stride_x, stride_q,
                      FP8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    if FP8:
        scale = tl.maximum(amax / 448.0, 1e-8)
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=mask)
    else:
        scale = tl.maximum(amax / 127.0, 1e-8)
        q = tl.clamp(libdevice.rint(x / scale), -127.0, 127.0)
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=mask)
        tl.store(sum_ptr + row, tl.sum(q, axis=0))
    tl.store(s_ptr + row, scale)


def act_quant(x2: Tensor, fp8: bool, pad_rows_to: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """x2 [M, K] -> (q [M', K] int8|e4m3, scale [M', 1] fp32, row sums of q [M'] fp32); M' = M padded (pad rows are 0)."""
    m, k = x2.shape
    mp = triton.cdiv(m, pad_rows_to) * pad_rows_to
    dt = torch.float8_e4m3fn if fp8 else torch.int8
    q = torch.empty((mp, k), device=x2.device, dtype=dt) if mp == m else torch.zeros((mp, k), device=x2.device, dtype=dt)
    s = torch.ones((mp, 1), device=x2.device, dtype=torch.float32)
    qsum = torch.zeros((mp,), device=x2.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    launch_kernel(_act_quant_kernel, (m,), (x2, q, s, qsum, k, x2.stride(0), q.stride(0)), FP8=fp8, BLOCK=block,
                  num_warps=8 if block >= 4096 else 4)
    return q, s, qsum


@triton.jit
def _int8_epilogue_kernel(acc_ptr, sx_ptr, qsum_ptr, sw_ptr, zc_ptr, b_ptr, y_ptr, M, N, stride_acc, stride_y,
                          HAS_ZC: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The scales of ``_scaled_store`` applied to ``torch._int_mm``'s int32 output."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    acc = tl.load(acc_ptr + rm[:, None] * stride_acc + rn[None, :], mask=mask, other=0)
    _scaled_store(acc, rm, rn, M, N, sx_ptr, qsum_ptr, sw_ptr, zc_ptr, b_ptr, y_ptr, stride_y, HAS_ZC, HAS_BIAS)


@triton.jit
def _scaled_store(acc, rm, rn, M, N, sx_ptr, qsum_ptr, sw_ptr, zc_ptr, b_ptr, y_ptr, stride_y,
                  HAS_ZC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The int8 GEMM epilogue: y = sx·sw·(acc - qsum·zc) (+ b) for the int32 tile acc [BM, BN] of rows rm and
    columns rn, stored in y's dtype (rows/columns past M/N masked)."""
    rm_c = tl.where(rm < M, rm, 0)
    rn_c = tl.where(rn < N, rn, 0)
    accf = acc.to(tl.float32)
    if HAS_ZC:
        accf = accf - tl.load(qsum_ptr + rm_c)[:, None] * tl.load(zc_ptr + rn_c)[None, :]
    y = accf * tl.load(sx_ptr + rm_c)[:, None] * tl.load(sw_ptr + rn_c)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn_c).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_gemm_kernel(q_ptr, w_ptr, sx_ptr, qsum_ptr, sw_ptr, zc_ptr, b_ptr, y_ptr, M, N, K, stride_q, stride_w, stride_y,
                      HAS_ZC: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y = sx·sw·(xq·wᵀ - qsum·zc) (+ b): int8 × int8 → int32 on the tensor cores with the scales applied in
    the epilogue, no int32 [M, N] round trip through memory. Grouped tile order for L2 reuse."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm_c = tl.where(rm < M, rm, 0)
    rn_c = tl.where(rn < N, rn, 0)
    q_ptrs = q_ptr + rm_c[:, None] * stride_q + rk[None, :]
    w_ptrs = w_ptr + rn_c[:, None] * stride_w + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for _ in range(0, K, BK):  # the host guarantees BK | K
        a = tl.load(q_ptrs)
        b = tl.load(w_ptrs)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        q_ptrs += BK
        w_ptrs += BK
    _scaled_store(acc, rm, rn, M, N, sx_ptr, qsum_ptr, sw_ptr, zc_ptr, b_ptr, y_ptr, stride_y, HAS_ZC, HAS_BIAS)


@triton.jit
def _int8_gemm_tma_kernel(q_desc, w_desc, sx_ptr, qsum_ptr, sw_ptr, zc_ptr, b_ptr, y_ptr, M, N, K, stride_y,
                          HAS_ZC: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, GROUP_M: tl.constexpr):
    """The same GEMM with the operand tiles fetched by the Hopper TMA engine (tensor descriptors: one
    instruction per [BM, BK] / [BN, BK] tile instead of per-thread address arithmetic and cp.async, rows past
    M/N zero-filled by the hardware) and a persistent grid: P programs stay resident and walk tiles
    pid, pid + P, … in grouped order (no block scheduling between tiles; the epilogue of one tile overlaps
    the next one's first loads)."""
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, M, N, BM, BN, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros([BM, BN], dtype=tl.int32)
        for k in range(0, K, BK):  # the host guarantees BK | K
            a = q_desc.load([off_m, k])
            b = w_desc.load([off_n, k])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rm = off_m + tl.arange(0, BM)
        rn = off_n + tl.arange(0, BN)
        _scaled_store(acc, rm, rn, M, N, sx_ptr, qsum_ptr, sw_ptr, zc_ptr, b_ptr, y_ptr, stride_y, HAS_ZC, HAS_BIAS)


# (BM, BN, BK, warps, stages, tma) for the Triton int8 GEMM; tuned per shape by runtime.native. tma = P > 0: TMA
# loads and a persistent grid of P programs per SM. The large tiles are the winners of benchmarks/int8_configs.py
# (H100, Qwen3-8B shapes, M = 1024..8192): with pointer loads 1.03-1.15 int8 POP/s (commit a2fa510); the TMA
# variant 8-12 % faster at every measured shape, 1.13-1.27 POP/s (commit 929da17, results/int8_configs_tma_h100.json).
# The small ones serve small M.
INT8_GEMM_CONFIGS = [(128, 256, 128, 8, 3, 1), (128, 256, 128, 8, 4, 1), (128, 256, 128, 8, 3, 2),
                     (128, 256, 128, 8, 4, 0), (256, 128, 128, 8, 3, 0),
                     (64, 128, 128, 4, 4, 0), (64, 64, 128, 4, 4, 0)]


def int8_gemm(x2: Tensor, w_int8: Tensor, w_scale: Tensor, zero_corr: Tensor | None, bias: Tensor | None,
              bm: int = 128, bn: int = 256, bk: int = 128, num_warps: int = 8, num_stages: int = 3,
              tma: int = 0) -> Tensor:
    """Same contract as :func:`int8_matmul`, with the Triton int8 GEMM and fused epilogue instead of
    ``torch._int_mm`` + a separate epilogue pass. Needs K % BK == 0."""
    q, sx, qsum = act_quant(x2, fp8=False)
    return int8_gemm_quantized(q, sx, qsum, w_int8, w_scale, zero_corr, bias, x2.dtype, bm, bn, bk, num_warps,
                               num_stages, tma)


def int8_gemm_quantized(q: Tensor, sx: Tensor, qsum: Tensor, w_int8: Tensor, w_scale: Tensor, zero_corr: Tensor | None,
                        bias: Tensor | None, out_dtype: torch.dtype, bm: int = 128, bn: int = 256, bk: int = 128,
                        num_warps: int = 8, num_stages: int = 3, tma: int = 0) -> Tensor:
    """The GEMM + epilogue of :func:`int8_gemm` on already quantized activations: q [M, K] int8, sx [M, 1]
    fp32, qsum [M] fp32 (row sums of q).

    ``tma`` = 0: pointer loads (cp.async), one program per output tile. ``tma`` = P > 0: TMA tensor-descriptor
    loads and a persistent grid of min(tiles, P · SMs) programs (Hopper and later; needs 16-byte aligned rows,
    i.e. K % 16 == 0, which BK | K implies)."""
    m, k = q.shape
    n = w_int8.shape[0]
    if k % bk:
        raise ValueError(f"int8_gemm: K={k} is not a multiple of BK={bk}")
    if tma < 0:
        raise ValueError(f"int8_gemm: tma={tma} must be 0 (pointer loads) or programs per SM (> 0)")
    y = torch.empty((m, n), device=q.device, dtype=out_dtype)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    zc = zero_corr if zero_corr is not None else w_scale  # placeholders: never read when the flag is off
    b = bias if bias is not None else w_scale
    flags = dict(HAS_ZC=zero_corr is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                 num_warps=num_warps, num_stages=num_stages)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        programs = min(tiles, tma * sm_count(q.device))
        q_desc = TensorDescriptor.from_tensor(q, [bm, bk])
        w_desc = TensorDescriptor.from_tensor(w_int8, [bn, bk])
        launch_kernel(_int8_gemm_tma_kernel, (programs,), (q_desc, w_desc, sx, qsum, w_scale, zc, b, y, m, n, k,
                                                           y.stride(0)), **flags)
    else:
        launch_kernel(_int8_gemm_kernel, (tiles,), (q, w_int8, sx, qsum, w_scale, zc, b, y, m, n, k, q.stride(0),
                                                    w_int8.stride(0), y.stride(0)), **flags)
    return y


def int8_matmul(x2: Tensor, w_int8: Tensor, w_scale: Tensor, zero_corr: Tensor | None, bias: Tensor | None) -> Tensor:
    """x2 [M, K] bf16, w_int8 [N, K] (code - 128), w_scale [N] fp32, zero_corr [N] fp32 (zero - 128) or None."""
    m, k = x2.shape
    n = w_int8.shape[0]
    q, sx, qsum = act_quant(x2, fp8=False, pad_rows_to=32 if m <= 16 else 8)  # _int_mm wants M > 16, M % 8 == 0
    acc = torch._int_mm(q, w_int8.t())  # [M', N] int32
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    bm, bn = 32, 128
    launch_kernel(
        _int8_epilogue_kernel, (triton.cdiv(m, bm), triton.cdiv(n, bn)),
        (acc, sx, qsum, w_scale, zero_corr if zero_corr is not None else w_scale, bias if bias is not None else w_scale,
         y, m, n, acc.stride(0), y.stride(0)), HAS_ZC=zero_corr is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn,
    )
    return y


def fp8_matmul(x2: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """x2 [M, K] bf16, w_fp8 [N, K] e4m3, w_scale [1, N] fp32 -> [M, N] bf16 via cuBLASLt/CUTLASS row-wise scaled fp8."""
    m = x2.shape[0]
    q, sx, _ = act_quant(x2, fp8=True, pad_rows_to=16)
    y = torch._scaled_mm(q, w_fp8.t(), scale_a=sx, scale_b=w_scale, bias=None if bias is None else bias.to(x2.dtype),
                         out_dtype=x2.dtype, use_fast_accum=True)
    return y[:m] if y.shape[0] != m else y


def weight_to_fp8(w_hat: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (e4m3 [N, K], per-channel scale [1, N] fp32): the one-time re-quantization for fp8 compute."""
    sw = (w_hat.float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w_hat.float() / sw[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), sw[None, :].contiguous()


def reference_w8a8(x2: Tensor, w_hat: Tensor, fp8: bool) -> Tensor:
    """What the kernels compute, in float64: per-token quantized x times the (re-)quantized weight."""
    if fp8:
        sx = (x2.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-8)
        xq = (x2.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() * sx.double()
        wq, sw = weight_to_fp8(w_hat)
        w = wq.double() * sw.double().T
    else:
        q, sx = quantize_per_token(x2, 8)
        xq = q.double() * sx.double()
        w = w_hat.double()
    return (xq @ w.T).float()
