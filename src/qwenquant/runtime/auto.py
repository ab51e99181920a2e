"""``auto`` execution mode: per (weight shape, M bucket), the fastest path measured on this GPU.

Candidates, all computing the same function up to rounding (weight-only, activations untouched):

* ``fused`` — the packed-weight Triton kernels (fast at small M: they read 4× fewer bytes);
* ``dequant`` — the storage-only mode (``quant_linear.forward_dequant``): one Triton pass unpacks the
  weight to a temporary bf16 [N, K], then cuBLAS (at large M the unpack, ~5 bytes per weight, is small
  next to the 2·M·N·K flops).

When the layer was quantized with ``act_bits=8`` and holds 8-bit per-channel weights, the int8 W8A8
tensor-core path (``native``) joins, since per-token activation quantization is then already part of the
model's numerics (int8 × int8 → int32 is exact for those codes). fp8 does not: it re-rounds the weight.

No bf16 copy of the weight is kept: the layer holds fused's layout (by default the k-tiled one, converted
in place at the first forward: ≈ 0.27x bf16 bytes for Qwen3-8B W4 g128; ``fused.FUSED_COPIES`` chooses),
the unpack reads that layout (``wq_ktiled.dequantize_ktiled``), and one transient [N, K] bf16 buffer lives
while a dequant matmul runs. W8A8 layers add native int8's operand as a copy (1 byte per weight) while an M
bucket of their shape runs it; fp8 is not a candidate (it re-rounds the weight: another model). The price: where both candidates are slower than bf16 (mid-size M, where the fused GEMM trails
cuBLAS and the unpack is not yet amortized) auto is slower than bf16 too — the benchmark reports it as
measured.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qwenquant.runtime import fused, native
from qwenquant.runtime.quant_linear import forward_dequant
from qwenquant.runtime.tuning import Tuner, m_bucket

TUNER = Tuner("auto")


def _candidates(layer, x: Tensor) -> dict:
    cands = {"fused": fused.forward_fused, "dequant": forward_dequant}
    m = layer.meta
    if layer.act_bits == 8 and m["bits"] == 8 and m["group_size"] in (None, layer.in_features):
        # int8 only: native-fp8 re-rounds the weight to e4m3 (rel. error ≈ 0.04 against the stored weight), a
        # different model, so auto never picks it; a user who wants it names the mode
        cands["native-int8"] = native.forward_native
    return cands


def drop_unused_native(layer, key: tuple) -> None:
    """Timing built native's int8 operand (a copy beside the k-tiled words): keep it only while some M bucket of
    this shape (``key`` with any bucket) runs it; a later bucket that picks it rebuilds it, eagerly."""
    same_shape = lambda k: k[:6] == key[:6] and k[7:] == key[7:]  # noqa: E731 — key[6] is the M bucket
    if not any(c == "native-int8" and same_shape(k) for k, (c, _) in TUNER.choices.items()):
        layer._cache.pop("native-int8", None)


def forward_auto(layer, x: Tensor) -> Tensor:
    bits, group = fused.check_layer(layer, x)
    fused._operands(layer, bits, group)  # the resident layout first, so every candidate reads the same storage
    rows = x.numel() // layer.in_features
    m = layer.meta
    key = (m["bits"], m["group_size"], m["symmetric"], layer.act_bits, layer.out_features, layer.in_features,
           m_bucket(rows), x.dtype)
    cands = _candidates(layer, x)
    hit = TUNER.choices.get(key)
    if hit is None:
        # time at the bucket's row count, so that one decision serves the whole bucket
        xb = torch.randn(m_bucket(rows), layer.in_features, device=x.device, dtype=x.dtype)
        name = TUNER.pick(key, {n: (lambda f=f: f(layer, xb)) for n, f in cands.items()})
        drop_unused_native(layer, key)
    else:
        name = hit[0]
    return cands[name](layer, x)
