"""Affine integer quantization, 1 to 8 bits, per output channel or per group of input columns.

A weight row ``w`` (length ``in``) is cut into groups of ``group_size`` consecutive columns
(one group spanning the row when ``group_size`` is None: "per-channel"). Each group gets a
scale ``s`` and an integer zero-point ``z`` and every element is stored as an unsigned code

    code = clamp(round(w / s) + z, 0, 2**bits - 1)          w_hat = (code - z) * s

- asymmetric (min-max): ``s = (max - min) / (2**bits - 1)``, ``z = round(-min / s)``; the range
  always includes 0 so that zero is exact.
- symmetric: ``z = 2**(bits-1)`` fixed and ``s = absmax / (2**(bits-1) - 1)``: the signed value
  ``code - z`` lies in ``[-(2**(bits-1)), 2**(bits-1) - 1]`` and ``±absmax`` maps to
  ``±(2**(bits-1) - 1)`` — the "restricted range" int8 convention that SmoothQuant and the
  int8/fp8 tensor-core kernels use. Symmetric needs ``bits >= 2``: 1-bit symmetric is sign
  binarization, which is BiLLM's business (``methods/billm.py``).

Scales are rounded to float16 when they are made (``SCALE_DTYPE``), so that the fake-quantized
model we evaluate is bit-for-bit the model a packed checkpoint or a kernel reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_DTYPE = torch.float16
MIN_SCALE = 1e-5  # a constant group (all zeros) still gets a finite, fp16-normal scale


@dataclass(frozen=True)
class QuantSpec:
    """How one weight (or activation) tensor is quantized.

    bits: 1..8. group_size: columns per group along the input dimension; None = one group per
    row ("per-channel"). symmetric: fixed mid-range zero-point instead of min-max.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 1 to 8, got {self.bits!r}")
        if self.symmetric and self.bits < 2:
            raise ValueError(
                "symmetric quantization needs bits >= 2 (got 1): 1-bit symmetric is sign "
                "binarization — use the billm method, or asymmetric 1-bit"
            )
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None (per-channel), got {self.group_size!r}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        """Groups per row; raises if the group size does not divide the row."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the input dimension {in_features}; "
                f"use a divisor of {in_features} (e.g. 32 or 64) or per-channel"
            )
        return in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return in_features // self.n_groups(in_features)

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


def compute_qparams(wmin: Tensor, wmax: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero-point from per-group minima and maxima (any matching shapes).

    Returns ``scale`` (float16-representable, as float32) and ``zero`` (float32 holding integers).
    """
    wmin = wmin.float()
    wmax = wmax.float()
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        absmax = torch.maximum(wmin.abs(), wmax.abs())
        scale = absmax / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        wmin = wmin.clamp(max=0.0)
        wmax = wmax.clamp(min=0.0)
        scale = (wmax - wmin) / spec.qmax
        scale = _round_scale(scale)
        zero = torch.round(-wmin / scale).clamp(0, spec.qmax)
        return scale, zero
    return _round_scale(scale), zero


def _round_scale(scale: Tensor) -> Tensor:
    return scale.clamp(min=MIN_SCALE).to(SCALE_DTYPE).float()


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes of ``w`` for broadcastable ``scale``/``zero``; returned as float (exact integers)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, spec.qmax)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize then dequantize (float32), for broadcastable ``scale``/``zero``."""
    return (quantize_codes(w, scale, zero, spec) - zero) * scale


def group_view(w: Tensor, spec: QuantSpec) -> Tensor:
    """[out, in] -> [out, n_groups, group_width] (a view when contiguous)."""
    out_f, in_f = w.shape
    n = spec.n_groups(in_f)
    return w.reshape(out_f, n, in_f // n)


def minmax_qparams(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min-max scale and zero per group: both [out, n_groups] float32."""
    g = group_view(w.float(), spec)
    return compute_qparams(g.amin(dim=-1), g.amax(dim=-1), spec)


def expand_groups(p: Tensor, in_features: int) -> Tensor:
    """[out, n_groups] -> [out, in] by repeating each group's value over its columns."""
    return p.repeat_interleave(in_features // p.shape[1], dim=1)


@dataclass
class QuantizedWeight:
    """A linear weight as integer codes plus per-group scale and zero-point.

    codes: [out, in] uint8 in [0, 2**bits - 1] (unpacked; ``numerics.packing`` packs them)
    scale: [out, n_groups] float32 holding float16-representable values
    zero:  [out, n_groups] float32 holding integers in [0, 2**bits - 1]
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """w_hat = (code - zero) * scale, [out, in]."""
        in_f = self.codes.shape[1]
        s = expand_groups(self.scale, in_f)
        z = expand_groups(self.zero, in_f)
        return ((self.codes.float() - z) * s).to(dtype)

    @property
    def avg_bits(self) -> float:
        """Storage bits per weight including fp16 scales and ``bits``-wide zero-points."""
        out_f, in_f = self.codes.shape
        meta = self.scale.numel() * 16 + (0 if self.spec.symmetric else self.zero.numel() * self.spec.bits)
        return self.spec.bits + meta / (out_f * in_f)


def quantize_weight(w: Tensor, spec: QuantSpec, scale: Tensor | None = None, zero: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest with given (or min-max) per-group parameters: [out, in] -> QuantizedWeight."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"weight of shape {tuple(w.shape)} holds {bad} NaN/inf values; refusing to quantize")
    if scale is None or zero is None:
        scale, zero = minmax_qparams(w, spec)
    in_f = w.shape[1]
    codes = quantize_codes(w, expand_groups(scale, in_f), expand_groups(zero, in_f), spec)
    return QuantizedWeight(codes=codes.to(torch.uint8), scale=scale.float(), zero=zero.float(), spec=spec)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - x_hat|^2)."""
    ref = reference.double()
    err = (ref - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / err.clamp(min=1e-300)))


def affine_to_tensors(qw: QuantizedWeight) -> dict[str, Tensor]:
    """Storage tensors of an affine weight (what a checkpoint and GPU memory hold).

    qweight: [out, in*bits/8] uint8, codes bit-packed along each row (numerics.packing layout)
    scale:   [out, n_groups] float16
    zero:    [out, n_groups] uint8 (integer zero-points; for symmetric all equal 2**(bits-1))
    """
    from qwenquant.numerics.packing import pack

    return {
        "qweight": pack(qw.codes, qw.spec.bits),
        "scale": qw.scale.to(SCALE_DTYPE),
        "zero": qw.zero.to(torch.uint8),
    }


def affine_from_tensors(t: dict[str, Tensor], shape: tuple[int, int], spec: QuantSpec) -> QuantizedWeight:
    """Inverse of :func:`affine_to_tensors`."""
    from qwenquant.numerics.packing import unpack

    out_f, in_f = shape
    codes = unpack(t["qweight"], spec.bits, in_f)
    return QuantizedWeight(codes=codes, scale=t["scale"].float(), zero=t["zero"].float(), spec=spec)
