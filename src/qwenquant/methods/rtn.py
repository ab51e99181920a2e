"""Round-to-nearest (RTN): the baseline every other method is measured against.

Each group of weights gets min-max parameters (``numerics.affine.minmax_qparams``) and every
weight is rounded to the nearest level independently — no data, no error feedback. The study
uses per-channel asymmetric min-max; groups and symmetric are options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from qwenquant.numerics.affine import QuantizedWeight, QuantSpec, quantize_weight


@dataclass(frozen=True)
class RTNConfig:
    spec: QuantSpec = field(default_factory=lambda: QuantSpec(bits=4, group_size=None, symmetric=False))


def rtn_quantize(W: Tensor, cfg: RTNConfig) -> QuantizedWeight:
    """W [out, in] -> QuantizedWeight with min-max parameters per group."""
    return quantize_weight(W, cfg.spec)
