"""SmoothQuant (Xiao et al., ICML 2023, arXiv 2211.10438): W8A8 by migrating outliers.

Activations have a few channels with huge magnitude, weights are smooth; per-token activation
quantization then wastes its range. A per-input-channel scale moves the difficulty:

    s_j = max|X_j|^α / max|W_{:,j}|^(1−α)          Ŷ = Q(X diag(s)^-1) · Q(diag(s) Wᵀ)

with the migration strength α (0.5 by default; the study's setting). ``max|W_{:,j}|`` is over
all linears that read the same input. ``1/s`` is folded into the previous op (norm weight, or the
previous linear's output rows), ``s`` into the weights — really applied, unlike the study's
script. Weights are then quantized per output channel, symmetric (the paper's W8A8 "O1" scheme:
per-channel weights, dynamic per-token activations); ``QuantLinear(act_bits=…)`` quantizes
activations per token at run time. W4A8 and W4A4 use the same recipe with fewer bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from qwenquant.numerics.affine import QuantizedWeight, QuantSpec, quantize_weight


@dataclass(frozen=True)
class SmoothQuantConfig:
    spec: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, group_size=None, symmetric=True))
    act_bits: int = 8
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")


@torch.no_grad()
def smooth_scale(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s [in] from per-channel activation abs-max [in] and the linears [out_i, in] sharing it."""
    w_absmax = torch.cat([w.float().abs() for w in weights], 0).amax(0).clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-5)


def smoothquant_quantize(W: Tensor, cfg: SmoothQuantConfig) -> QuantizedWeight:
    """Quantize an already-smoothed weight (per-channel symmetric by default)."""
    return quantize_weight(W, cfg.spec)
