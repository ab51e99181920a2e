"""``native`` execution mode: W8A8 on tensor cores (int8 by default, fp8 e4m3 as ``forward_native_fp8``).

Only 8-bit per-channel weights qualify: the int32 accumulator can take one scale per output
channel, not one per group. Symmetric codes map exactly to int8 (``code - 128``); asymmetric
ones too, with a per-token correction ``(zero - 128) · Σ xq`` in the epilogue. fp8 re-quantizes
the dequantized weight once to e4m3 with its own per-channel scale (a second rounding: the model
is no longer bit-identical to the stored one). Activations are quantized per token at run time
(``kernels/w8a8.py``), which changes the numerics: use it for models quantized with ``act_bits=8``.

int8 runs either ``torch._int_mm`` (cuBLASLt) plus an epilogue pass, or a Triton int8 GEMM with the
scales fused into its epilogue, whichever ``TUNER`` measured faster for the shape and M bucket.

Memory: int8 converts the layer's storage in place to signed codes (the ``int8`` layout of
``runtime/layouts.py``, exact: code - 128 is the code with its top bit flipped) and reads it as it is —
one byte per weight, as stored. fp8's e4m3 operand is a copy beside the codes (``N·K`` bytes more per
layer); ``resident_bytes`` and the benchmarks count it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qwenquant.kernels import w8a8
from qwenquant.runtime import layouts
from qwenquant.runtime.tuning import Tuner, m_bucket

TUNER = Tuner("native-int8")


@dataclass
class NativeWeight:
    w: Tensor                 # [N, K] int8 (code - 128) or float8_e4m3fn
    w_scale: Tensor           # int8: [N] fp32; fp8: [1, N] fp32
    zero_corr: Tensor | None  # [N] fp32 (zero - 128), None when symmetric (all zero-points 128)


def check_layer(layer, x: Tensor) -> None:
    if layer.fmt != "affine" or layer.meta["bits"] != 8:
        what = layer.fmt if layer.fmt != "affine" else f"{layer.meta['bits']}-bit"
        raise ValueError(
            f"native mode (W8A8 int8/fp8 tensor cores) needs 8-bit integer weights, got {what}; "
            "use 'fused' (2/4/8-bit weight-only kernels), 'auto', or 'dequant'"
        )
    if layer.meta["group_size"] is not None and layer.meta["group_size"] != layer.in_features:
        raise ValueError(
            f"native mode needs per-channel 8-bit weights (group_size=None), got group_size={layer.meta['group_size']}; "
            "use 'fused' for grouped 8-bit weights"
        )
    if not x.is_cuda:
        raise ValueError("native mode runs int8/fp8 tensor-core GEMMs on a CUDA GPU; on CPU use 'fake' or 'dequant'")
    if layer.in_features % 16 or layer.out_features % 16:
        raise ValueError(f"native mode needs in/out features divisible by 16, got {layer.in_features}x{layer.out_features}")


def prepare(layer, fp8: bool) -> NativeWeight:
    """The tensor-core operand, built once and cached on the layer until its mode, layout or device changes.

    int8: in ``native`` mode the layer's storage itself is converted to the ``int8`` layout (codes - 128 as
    signed bytes, ``runtime/layouts.py``) and the operand is a view of it — no second copy; only the fp32
    per-row scale and zero correction (8 bytes per row) are extra. Under ``auto`` the fused candidate holds the
    weight k-tiled, and the int8 operand is then a copy. fp8: the weight re-rounded to e4m3 is always a copy
    (1 byte per weight beside the 8-bit codes): it is not the checkpoint's bits."""
    key = "native-fp8" if fp8 else "native-int8"
    cached = layer._cache.get(key)
    if cached is not None:
        return cached
    if fp8:
        w, sw = w8a8.weight_to_fp8(layer.dequantized_weight(torch.float32))
        nw = NativeWeight(w, sw, None)
    else:
        if layer.mode.startswith("native"):
            layer.set_layout("int8")
        t = layer.storage_tensors() if layer.layout == "int8" else layouts.get_layout("int8").from_checkpoint(
            layer.checkpoint_tensors(), 8, layer.in_features)
        zero = t["zero"][:, 0].float()
        zc = None if bool((zero == 128).all()) else (zero - 128).contiguous()
        nw = NativeWeight(t["codes_s8"], t["scale"][:, 0].float().contiguous(), zc)
    layer._cache[key] = nw
    return nw


def _forward(layer, x: Tensor, fp8: bool) -> Tensor:
    check_layer(layer, x)
    nw = prepare(layer, fp8)
    x2 = x.reshape(-1, layer.in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if fp8:
        y = w8a8.fp8_matmul(x2, nw.w, nw.w_scale, layer.bias)
    else:
        y = int8_matmul_tuned(x2, nw, layer.bias)
    return y.reshape(*x.shape[:-1], layer.out_features)


_INT8_TRITON = {"triton " + "x".join(map(str, cfg)): cfg for cfg in w8a8.INT8_GEMM_CONFIGS}


def _int8_run(name: str, x2: Tensor, nw: NativeWeight, bias: Tensor | None) -> Tensor:
    if name == "int_mm":
        return w8a8.int8_matmul(x2, nw.w, nw.w_scale, nw.zero_corr, bias)
    return w8a8.int8_gemm(x2, nw.w, nw.w_scale, nw.zero_corr, bias, *_INT8_TRITON[name])


def int8_matmul_tuned(x2: Tensor, nw: NativeWeight, bias: Tensor | None) -> Tensor:
    """The faster, per (N, K, M bucket), of ``torch._int_mm`` + epilogue and the Triton int8 GEMM configs."""
    m, k = x2.shape
    key = (nw.w.shape[0], k, m_bucket(m), nw.zero_corr is None, bias is None)
    hit = TUNER.choices.get(key)
    if hit is not None:
        return _int8_run(hit[0], x2, nw, bias)
    names = ["int_mm"] + [name for name, cfg in _INT8_TRITON.items() if k % cfg[2] == 0]
    name = TUNER.pick(key, {n: (lambda n=n: _int8_run(n, x2, nw, bias)) for n in names})
    return _int8_run(name, x2, nw, bias)


def forward_native(layer, x: Tensor) -> Tensor:
    """int8 × int8 → int32 (exact for 8-bit codes), per-token × per-channel scales."""
    return _forward(layer, x, fp8=False)


def forward_native_fp8(layer, x: Tensor) -> Tensor:
    """e4m3 × e4m3 with row-wise scales (``torch._scaled_mm``)."""
    return _forward(layer, x, fp8=True)
