"""Dynamic per-token activation quantization (the "A" of W8A8 / W4A8 / W4A4).

Each token (row of ``x``, all leading dims flattened) gets its own symmetric scale at run time,
``s = absmax(row) / (2**(bits-1) - 1)``; values are rounded to signed integers in
``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``. This is the SmoothQuant paper's "per-token dynamic"
scheme and the one int8 tensor-core kernels apply before ``int8 x int8 -> int32``.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_ACT_BITS = (4, 8)


def check_act_bits(bits: int) -> None:
    if bits not in SUPPORTED_ACT_BITS:
        raise ValueError(f"activation bits must be one of {SUPPORTED_ACT_BITS}, got {bits!r}")


def quantize_per_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """x [..., k] -> (q [..., k] int8, scale [..., 1] float32)."""
    check_act_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-8)
    q = torch.clamp(torch.round(xf / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def fake_quantize_per_token(x: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize in x's dtype (the float path of a W·A8 model)."""
    q, scale = quantize_per_token(x, bits)
    return (q.float() * scale).to(x.dtype)
