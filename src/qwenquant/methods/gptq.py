"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns not yet done.

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (arXiv 2210.17323). Reference code:
IST-DASLab/gptq (``fasterquant``); this function follows it step by step.

Objective, per layer: min ||X Wᵀ - X Ŵᵀ||² with H = 2/n XᵀX (``methods.hessian``). With
U = chol((H + λ·mean(diag H)·I)⁻¹) upper triangular, column ``j`` (in processing order) is

    q_j  = dequant(quant(w_j))                      # its group's fixed scale/zero
    e_j  = (w_j - q_j) / U_jj                        # [out]
    w_k -= e_j · U_jk      for every later column k  # OBS update, optimal for the rest

Lazy batching: inside a block of ``block_size`` columns the update is applied to the block only;
the block's accumulated errors E [out, B] reach the later columns in one GEMM, W[:, rest] -= E U[B, rest].

Options (study settings: 4/3/2 bit asymmetric, per-channel or g128, damp 0.01, block 128, act-order):

- ``act_order``: process columns by descending diag H (the channels with the largest inputs
  first, while the most freedom is left to compensate them).
- ``static_groups`` (default): every group's scale/zero is computed *before* the loop, from the
  original contiguous column groups of W (``QuantSpec.group_size`` columns). With act-order the
  columns are visited out of order but each still uses its own contiguous group's parameters, so
  the stored groups stay contiguous and no ``g_idx`` permutation is needed at inference.
  ``static_groups=False`` recomputes a group's parameters from the *error-updated* weights when
  the loop reaches its first column (the paper's original variant); it is only defined without
  act-order here, since act-order with dynamic groups produces non-contiguous groups (g_idx).
- per-channel (``group_size=None``): one scale/zero per row from the whole row, up front.

Scales come from ``numerics.affine.compute_qparams`` (rounded to fp16), and the algorithm rounds
with exactly the parameters it stores, so the returned QuantizedWeight dequantizes bit-for-bit to
the weights GPTQ's error feedback assumed.

Storage: ``QuantizedWeight`` — codes [out, in] uint8 in the original column order, scale/zero
[out, n_groups] (n_groups = 1 per-channel).

Known limits: the greedy column order is a heuristic, and compensation only sees the
calibration distribution (overfits with few tokens); dead input channels are quantized as zero;
float32 throughout (the Cholesky of a badly conditioned H can fail — damping is then raised
×10 with a warning, see ``methods.hessian.inverse_cholesky``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qwenquant.methods.hessian import inverse_cholesky, prepare
from qwenquant.numerics.affine import QuantizedWeight, QuantSpec, compute_qparams, expand_groups, minmax_qparams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    spec: QuantSpec = field(default_factory=lambda: QuantSpec(bits=4, group_size=128, symmetric=False))
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal before the Cholesky
    block_size: int = 128  # columns per lazy-update block (speed only; the result does not depend on it)
    act_order: bool = True  # visit columns by descending diag H
    static_groups: bool = True  # group parameters from the original W, computed before the loop

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be positive, got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.act_order and not self.static_groups and self.spec.group_size is not None:
            raise ValueError(
                "act_order with static_groups=False builds groups in permuted column order, which needs a "
                "g_idx per column that QuantizedWeight does not store; use static_groups=True"
            )


def gptq_quantize(W: Tensor, H: Tensor, cfg: GPTQConfig) -> QuantizedWeight:
    """W [out, in], H [in, in] (2/n XᵀX) -> QuantizedWeight (codes in the original column order)."""
    spec = cfg.spec
    W, H, dead = prepare(W, H)  # float32 copies; dead columns zeroed
    out_f, in_f = W.shape
    n_groups = spec.n_groups(in_f)  # raises if the group size does not divide in
    width = in_f // n_groups
    dynamic = spec.group_size is not None and not cfg.static_groups

    if dynamic:
        scale = torch.empty(out_f, n_groups, device=W.device)  # [out, n_groups], filled in the loop
        zero = torch.empty(out_f, n_groups, device=W.device)
    else:
        scale, zero = minmax_qparams(W, spec)  # [out, n_groups] from the original (dead-zeroed) W

    if cfg.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)  # [in] processing order -> column
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(in_f, device=W.device)
    group_of = (perm // width).tolist()  # group of the j-th processed column (a list: no device sync per column)

    U, lam = inverse_cholesky(H, cfg.damp)
    if lam != cfg.damp:
        log.warning("GPTQ on a [%d, %d] weight needed damping %g instead of %g", out_f, in_f, lam, cfg.damp)
    del H

    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)  # [out, in] processing order
    qmax = spec.qmax
    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        W1 = W[:, i1:i2].clone()  # [out, B] receives the in-block updates
        Err1 = torch.zeros_like(W1)  # [out, B] scaled errors e_j
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = group_of[j]
            if dynamic and j % width == 0:
                # Parameters from the current (error-updated) weights of the group: the in-block
                # part from W1, the part beyond the block from W minus this block's pending updates.
                cur = W1[:, i : i + width]
                if j + width > i2:
                    rest = W[:, i2 : j + width] - Err1[:, :i] @ U[i1:j, i2 : j + width]
                    cur = torch.cat([cur, rest], dim=1)
                s_g, z_g = compute_qparams(cur.amin(dim=1), cur.amax(dim=1), spec)
                scale[:, g] = s_g
                zero[:, g] = z_g
            s, z = scale[:, g], zero[:, g]  # [out]
            w = W1[:, i]
            c = torch.clamp(torch.round(w / s) + z, 0, qmax)
            q = (c - z) * s  # exactly what QuantizedWeight.dequantize computes
            codes[:, j] = c.to(torch.uint8)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if cfg.act_order:
        codes = codes[:, torch.argsort(perm)]
    # Dead columns were zeroed; 0 is exactly representable (asym ranges include 0, sym zero = mid).
    assert not dead.any() or bool(
        (((codes[:, dead].float() - expand_groups(zero, in_f)[:, dead]) * expand_groups(scale, in_f)[:, dead]) == 0).all()
    )
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, spec=spec)
