"""``fused`` execution mode: Triton kernels that read the packed weight and dequantize in registers.

W2/W4/W8 A16, any group size that is a multiple of 32 (or per-channel), symmetric or not (the
zero-point is read either way). M ≤ 4 rows go to an FFMA GEMV kernel (``gemv2`` where its tile fits
K and the group — per-group scale/zero, hand-prefetched word tiles — else the first ``gemv``), more rows
to the tensor-core GEMM kernel (``kernels/wq_matmul.py`` explains both). Tile configurations are chosen
per (bits, group, N, K, M bucket) by timing a short list once (``TUNER``); the weight is never
copied or repacked, so the memory is the storage bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qwenquant.kernels import wq_matmul as K
from qwenquant.runtime.tuning import Tuner, m_bucket

TUNER = Tuner("fused")

# (BN rows, BKW words per step, split-K, warps)
GEMV_CONFIGS = [
    (16, 64, 1, 4), (8, 128, 1, 4), (16, 128, 1, 4), (32, 32, 1, 4), (4, 128, 1, 2), (4, 256, 1, 4),
    (8, 128, 2, 4), (16, 64, 2, 4), (16, 64, 4, 4), (8, 128, 4, 4), (4, 128, 4, 2), (8, 64, 8, 4),
]
# gemv2: (BN rows, BKW words per step, split-K, warps, stages, xvec, prefetch); benchmarks/gemv_session.py
GEMV2_CONFIGS = [
    (8, 128, 1, 4, 1, False, True), (4, 128, 1, 4, 1, False, True), (8, 256, 1, 4, 1, False, True),
    (4, 256, 1, 4, 1, False, True), (8, 128, 1, 4, 1, False, False), (4, 128, 2, 4, 1, False, True),
    (8, 64, 1, 4, 1, False, True), (4, 64, 1, 2, 1, False, True), (8, 32, 1, 4, 1, False, True),
]
# (BM, BN, BK, warps, stages)
GEMM_CONFIGS_SMALL = [
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (16, 64, 256, 4, 3),
    (64, 64, 128, 4, 4), (32, 128, 64, 4, 4),
]
GEMM_CONFIGS_LARGE = [
    (64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 8, 4),
    (128, 64, 64, 4, 4),
]


def check_layer(layer, x: Tensor) -> tuple[int, int]:
    """Raise a ValueError naming the alternatives if this layer/input cannot run fused; returns (bits, group)."""
    if layer.fmt != "affine":
        raise ValueError(f"fused mode supports affine integer weights, not {layer.fmt!r}; use 'fake' or 'dequant'")
    if not x.is_cuda:
        raise ValueError("fused mode runs Triton kernels on a CUDA GPU; on CPU use 'fake' or 'dequant'")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fused kernels take bf16/fp16 activations, got {x.dtype}; set compute_dtype=torch.bfloat16")
    bits, group = layer.meta["bits"], layer.meta["group_size"]
    K.check_supported(bits, group, layer.out_features, layer.in_features)
    return bits, (layer.in_features if group is None else group)


def _configs(m: int, k: int, group: int, bits: int = 4) -> dict[str, tuple]:
    """name -> ("gemv2"|"gemv"|"gemm", config) for the kernel that serves m rows."""
    if m <= K.GEMV_MAX_M:
        v2 = {f"gemv2 bn{c[0]} bkw{c[1]} sk{c[2]} w{c[3]}{' pf' if c[6] else ''}": ("gemv2", c)
              for c in GEMV2_CONFIGS if K.gemv2_ok(bits, group, k, c[1])}
        if v2:
            return v2
        return {f"gemv bn{bn} bkw{bkw} sk{sk} w{w}": ("gemv", (bn, bkw, sk, w)) for bn, bkw, sk, w in GEMV_CONFIGS}
    table = GEMM_CONFIGS_SMALL if m <= 64 else GEMM_CONFIGS_LARGE
    return {f"gemm {bm}x{bn}x{bk} w{w} s{st}": ("gemm", (bm, bn, bk, w, st))
            for bm, bn, bk, w, st in table if k % bk == 0 and (bk % group == 0 or group % bk == 0)}


def _run(kind: str, cfg: tuple, x2: Tensor, qw: Tensor, s: Tensor, z: Tensor, bits: int, group: int) -> Tensor:
    if kind == "gemv2":
        return K.gemv2(x2, qw, s, z, bits, group, *cfg)
    if kind == "gemv":
        return K.gemv(x2, qw, s, z, bits, group, *cfg)
    return K.gemm(x2, qw, s, z, bits, group, *cfg)


def fused_matmul(x2: Tensor, qw: Tensor, s: Tensor, z: Tensor, bits: int, group: int) -> Tensor:
    """x2 [M, K] -> [M, N]: the tuned fused kernel for this shape."""
    m, k = x2.shape
    key = (bits, group, qw.shape[0], k, m_bucket(m), x2.dtype)
    configs = _configs(m, k, group, bits)
    hit = TUNER.choices.get(key)
    if hit is None:
        cands = {name: (lambda kc=kc: _run(*kc, x2, qw, s, z, bits, group)) for name, kc in configs.items()}
        name = TUNER.pick(key, cands)
    else:
        name = hit[0]
    return _run(*configs[name], x2, qw, s, z, bits, group)


def forward_fused(layer, x: Tensor) -> Tensor:
    bits, group = check_layer(layer, x)
    x2 = x.reshape(-1, layer.in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = fused_matmul(x2, layer.qweight, layer.scale, layer.zero, bits, group)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)
