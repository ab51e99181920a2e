"""QuantLinear: a linear layer whose weight is stored quantized, run in a named execution mode.

Storage is always the real packed format (``numerics.affine.affine_to_tensors`` for integer
weights, ``BinarizedWeight.to_tensors`` for BiLLM), held once: the module's buffers are the
checkpoint tensors, or — after a GPU mode's first forward — the same bits in the layout that mode's
kernels read (``runtime/layouts.py``: ``ktiled`` for fused/auto, ``int8`` for native int8), converted in
place and exactly. ``state_dict()`` always yields the checkpoint tensors, and the bytes in memory
match the bit-width plus metadata (``resident_bytes`` counts them, with any extra operand a mode
caches). How a forward uses them is the execution mode, chosen by name:

| mode      | what happens at each forward                                             | where    |
|-----------|--------------------------------------------------------------------------|----------|
| `fake`    | a float weight dequantized once and cached; F.linear (fake-quant eval)  | CPU, GPU |
| `dequant` | storage only: unpack the whole weight to the compute dtype, then matmul  | CPU, GPU |
| `fused`   | Triton kernels reading packed weights (runtime/fused.py)                 | GPU      |
| `native`  | int8 tensor-core GEMM on quantized weights and activations (`native-int8`; `native-fp8`: e4m3) | GPU |
| `auto`    | picks per shape from measured timings (runtime/auto.py)                  | GPU      |

``act_bits`` (SmoothQuant W·A8 / W·A4) quantizes the input per token, dynamically, before the
matmul in every mode; ``fake`` and ``dequant`` do it in float (quantize-dequantize), which is
numerically what an integer kernel computes up to accumulation order.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwenquant.numerics.activation import check_act_bits, fake_quantize_per_token
from qwenquant.numerics.affine import QuantizedWeight, QuantSpec, affine_from_tensors, affine_to_tensors
from qwenquant.runtime.layouts import get_layout

# mode name -> "module:function"; a function takes (QuantLinear, x) and returns y. Imported lazily
# so that CPU users never import Triton.
EXECUTION_MODES: dict[str, str] = {
    "fake": "qwenquant.runtime.quant_linear:forward_fake",
    "dequant": "qwenquant.runtime.quant_linear:forward_dequant",
    "fused": "qwenquant.runtime.fused:forward_fused",
    "native": "qwenquant.runtime.native:forward_native",          # int8 x int8 -> int32
    "native-int8": "qwenquant.runtime.native:forward_native",
    "native-fp8": "qwenquant.runtime.native:forward_native_fp8",  # e4m3, scaled
    "auto": "qwenquant.runtime.auto:forward_auto",
}


def _resolve_mode(mode: str) -> Callable[["QuantLinear", Tensor], Tensor]:
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; choose from {', '.join(EXECUTION_MODES)}")
    module_name, fn_name = EXECUTION_MODES[mode].split(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"execution mode {mode!r} is not available here ({e}); CPU modes: fake, dequant") from e
    if mode in ("fake", "dequant"):
        return fn
    # Triton kernels behind a host-side tuner: opaque to torch.compile (a graph break around each
    # call; the code between the projections still compiles and fuses).
    return torch.compiler.disable(fn)


class QuantLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ held as packed codes (see module docstring).

    fmt: "affine" (integer codes, QuantSpec) or "binary" (BiLLM planes).
    meta: JSON-able description needed to rebuild the weight object from the buffers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str,
        meta: dict,
        tensors: dict[str, Tensor],
        bias: Tensor | None = None,
        act_bits: int | None = None,
        mode: str = "fake",
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(WEIGHT_FORMATS)}")
        if act_bits is not None:
            check_act_bits(act_bits)
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.meta = dict(meta)
        self.act_bits = act_bits
        self.compute_dtype = compute_dtype
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.layout = "checkpoint"  # which arrangement of the weight's bits the buffers hold (runtime/layouts.py)
        # what the current mode built from the storage and keeps (fake: the float weight; fused: tinygemm's copy;
        # native: its operand), keyed by the mode's name; cleared when the mode, layout or device changes
        self._cache: dict[str, object] = {}
        self._forward: Callable | None = None
        self.mode = mode

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight, bias: Tensor | None = None, act_bits: int | None = None, **kw) -> "QuantLinear":
        """From a QuantizedWeight or BinarizedWeight produced by a method."""
        fmt, meta, tensors = weight_to_storage(weight)
        out_f, in_f = weight.shape
        return cls(in_f, out_f, fmt, meta, tensors, bias=bias, act_bits=act_bits, **kw)

    # --- the weight ---------------------------------------------------------------------
    def weight_object(self):
        """Rebuild the method's weight object (QuantizedWeight / BinarizedWeight) from the buffers."""
        return WEIGHT_FORMATS[self.fmt][1](self.checkpoint_tensors(), (self.out_features, self.in_features), self.meta)

    def storage_tensors(self) -> dict[str, Tensor]:
        """The weight's buffers as they are resident now (names depend on ``layout``)."""
        return {n: b for n, b in self._buffers.items() if n != "bias" and b is not None}

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """The checkpoint tensors (qweight, scale, zero for affine weights), rebuilt exactly if another layout
        is resident (a transient copy then)."""
        tensors = self.storage_tensors()
        if self.layout == "checkpoint":
            return tensors
        return get_layout(self.layout).to_checkpoint(tensors, self.meta["bits"], self.in_features)

    def set_layout(self, layout: str) -> None:
        """Hold the weight in ``layout`` (``runtime/layouts.py``), replacing the resident buffers in place: the
        old arrangement is freed, never kept beside the new one. Exact both ways."""
        if layout == self.layout:
            return
        target = get_layout(layout)
        if self.fmt != "affine":
            raise ValueError(f"layout {layout!r} holds affine integer weights; this layer's format is {self.fmt!r}")
        tensors = self.checkpoint_tensors()
        new = target.from_checkpoint(tensors, self.meta["bits"], self.in_features)
        bias = self._buffers.pop("bias")
        for name in list(self.storage_tensors()):
            del self._buffers[name]
        for name in target.buffers:  # storage first, then bias: the checkpoint's state_dict order
            self.register_buffer(name, new[name])
        self.register_buffer("bias", bias)
        self.layout = layout
        self._cache = {}

    @property
    def resident_bytes(self) -> int:
        """Bytes this layer holds for its weight now: the resident storage plus whatever the current mode
        cached from it (a float weight, a repacked copy), each tensor storage counted once (a cached view of
        a buffer costs nothing)."""
        seen: dict[tuple, int] = {}
        for t in [*self.storage_tensors().values(), *_tensors_in(self._cache)]:
            st = t.untyped_storage()
            seen[(t.device.type, st.data_ptr())] = st.nbytes()
        return sum(seen.values())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Always the checkpoint tensors, whichever layout is resident: what is saved loads anywhere. From another
        layout they are rebuilt (new tensors, on the layer's device: saving a model held k-tiled on a nearly full
        GPU needs room for one checkpoint-sized copy of every layer; move it to the CPU first if it does not fit)."""
        if self.layout == "checkpoint":
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self.checkpoint_tensors().items():
            destination[prefix + name] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.set_layout("checkpoint")  # the state dict holds checkpoint tensors; a GPU mode converts again
        self._cache = {}  # whatever a mode built from the old values (set_layout clears it only when it converts)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """[out, in] in ``dtype`` (default: compute dtype), freshly unpacked."""
        w = self.weight_object().dequantize(torch.float32)
        return w.to(device=self._device(), dtype=dtype or self.compute_dtype)

    @property
    def storage_bytes(self) -> int:
        """Bytes of the resident weight buffers (the checkpoint's, or the same bits in another layout)."""
        return sum(b.numel() * b.element_size() for b in self.storage_tensors().values())

    # --- execution ----------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        """Choose the execution mode. The weight returns to the checkpoint layout; a GPU mode converts it to the
        layout its kernels read at its first forward."""
        self._forward = _resolve_mode(mode)
        self._mode = mode
        self.set_layout("checkpoint")
        self._cache = {}

    def forward(self, x: Tensor) -> Tensor:
        # native modes quantize activations per token themselves, as integers: no float round trip first
        if self.act_bits is not None and not self._mode.startswith("native"):
            x = fake_quantize_per_token(x, self.act_bits)
        return self._forward(self, x)

    def _device(self) -> torch.device:
        return next(b for n, b in self.named_buffers(recurse=False) if n != "bias").device

    def _apply(self, fn, *args, **kwargs):
        """.to()/.cuda() move the storage but never change its dtypes.

        ``model.to(torch.bfloat16)`` must not round the fp16 scales (that would change the
        weights); only the device follows. What the mode cached is dropped.
        """
        self._cache = {}
        storage = self.storage_tensors()
        result = super()._apply(fn, *args, **kwargs)
        for name, before in storage.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return result

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, meta={self.meta}, act_bits={self.act_bits}, "
                f"mode={self.mode}, layout={self.layout}")


def set_execution_mode(model: nn.Module, mode: str) -> int:
    """Run every QuantLinear in ``model`` in ``mode`` (see the module docstring); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.mode = mode
    return len(layers)


def concat_out_features(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear computing the given layers side by side: y = [y_1 | y_2 | …] (serving engines' merged
    QKV / gate-up projections: one kernel per shared input instead of one per projection).

    Affine storage is per output row (each row's codes, scales and zero-points depend on that row alone), so
    concatenating the buffers along the rows is exact: the merged layer holds the same bytes and computes the
    same values. The layers must agree in format, bits, group size, symmetry, in_features, act_bits and
    compute dtype; the merged layer takes the first one's execution mode."""
    first = layers[0]
    if first.fmt != "affine":
        raise ValueError(f"concat_out_features merges affine integer layers, got format {first.fmt!r}")
    for other in layers[1:]:
        same = (other.fmt, other.meta, other.in_features, other.act_bits, other.compute_dtype)
        want = (first.fmt, first.meta, first.in_features, first.act_bits, first.compute_dtype)
        if same != want:
            raise ValueError(f"concat_out_features: layers differ — (fmt, meta, in_features, act_bits, dtype) {same} vs {want}")
    if len({layer.bias is None for layer in layers}) > 1:
        raise ValueError("concat_out_features: either every layer has a bias or none")
    parts = [layer.checkpoint_tensors() for layer in layers]
    tensors = {name: torch.cat([p[name] for p in parts], dim=0) for name in ("qweight", "scale", "zero")}
    bias = None if first.bias is None else torch.cat([layer.bias for layer in layers])
    return QuantLinear(first.in_features, sum(layer.out_features for layer in layers), first.fmt, first.meta, tensors,
                       bias=bias, act_bits=first.act_bits, mode=first.mode, compute_dtype=first.compute_dtype)


def forward_fake(layer: QuantLinear, x: Tensor) -> Tensor:
    w = layer._cache.get("fake")
    if w is None or w.dtype != x.dtype:
        w = layer._cache["fake"] = layer.dequantized_weight(x.dtype)
    return F.linear(x, w, None if layer.bias is None else layer.bias.to(x.dtype))


def forward_dequant(layer: QuantLinear, x: Tensor) -> Tensor:
    """Storage only: the whole weight unpacked to x's dtype at every call, then a dense matmul.

    On a GPU, affine 2/4/8-bit weights unpack in one Triton pass (packed bytes in, 2 bytes per
    weight out: what a well-made storage-only runtime does); elsewhere with torch ops. The same
    values either way: (code - zero)·scale in fp32, rounded once to x's dtype."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    if x.is_cuda and layer.fmt == "affine":
        from qwenquant.kernels import wq_matmul as K

        bits, group = layer.meta["bits"], layer.meta["group_size"] or layer.in_features
        if layer.layout == "ktiled":  # auto mode, whose fused candidate holds the weight k-tiled
            from qwenquant.kernels import wq_ktiled as KT

            w = KT.dequantize_ktiled(layer.words, layer.sz, bits, group, layer.in_features, x.dtype)
            return F.linear(x, w, bias)
        if layer.layout == "checkpoint":
            try:
                K.check_supported(bits, group, layer.out_features, layer.in_features)
            except ValueError:
                pass  # a width or group the unpack kernel lacks: torch below
            else:
                w = K.dequantize(layer.qweight, layer.scale, layer.zero, bits, group, layer.in_features, x.dtype)
                return F.linear(x, w, bias)
    w = layer.dequantized_weight(x.dtype)  # the whole weight, every call: storage-only
    return F.linear(x, w, bias)


def _tensors_in(obj) -> list[Tensor]:
    """Every tensor inside a mode's cache entry (tensors, dataclasses and dicts of them, nested)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in obj.__dataclass_fields__ for t in _tensors_in(getattr(obj, f))]
    return []


# --- weight formats: fmt -> (to_storage, from_storage) --------------------------------------


def _affine_to_storage(w: QuantizedWeight) -> tuple[dict, dict[str, Tensor]]:
    s = w.spec
    return {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric}, affine_to_tensors(w)


def _affine_from_storage(tensors: dict[str, Tensor], shape, meta: dict) -> QuantizedWeight:
    return affine_from_tensors(tensors, shape, QuantSpec(meta["bits"], meta["group_size"], meta["symmetric"]))


def _binary_to_storage(w) -> tuple[dict, dict[str, Tensor]]:
    return w.meta(), w.to_tensors()


def _binary_from_storage(tensors: dict[str, Tensor], shape, meta: dict):
    from qwenquant.methods.billm import BinarizedWeight

    return BinarizedWeight.from_tensors(tensors, shape, meta)


WEIGHT_FORMATS = {
    "affine": (_affine_to_storage, _affine_from_storage),
    "binary": (_binary_to_storage, _binary_from_storage),
}


def weight_to_storage(weight) -> tuple[str, dict, dict[str, Tensor]]:
    fmt = "affine" if isinstance(weight, QuantizedWeight) else "binary"
    meta, tensors = WEIGHT_FORMATS[fmt][0](weight)
    return fmt, meta, tensors
