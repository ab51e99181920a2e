"""Pure tensor math: affine integer quantization, activation quantization, bit packing.

Imports torch only; nothing here knows about models.
"""

from qwenquant.numerics.affine import (
    QuantizedWeight,
    QuantSpec,
    compute_qparams,
    expand_groups,
    fake_quantize,
    minmax_qparams,
    quantize_weight,
    sqnr_db,
)
from qwenquant.numerics.activation import fake_quantize_per_token, quantize_per_token
from qwenquant.numerics.packing import pack, unpack

__all__ = [
    "QuantizedWeight",
    "QuantSpec",
    "compute_qparams",
    "expand_groups",
    "fake_quantize",
    "fake_quantize_per_token",
    "minmax_qparams",
    "pack",
    "quantize_per_token",
    "quantize_weight",
    "sqnr_db",
    "unpack",
]
