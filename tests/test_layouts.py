"""One resident layout per QuantLinear: conversions are exact, replace the buffers (no second copy), and
``state_dict()`` always yields the checkpoint tensors. Plain torch on the CPU (the GPU modes that ask for
these layouts are checked in tests/test_kernels.py -m gpu and under Triton's interpreter)."""

import pytest
import torch
from torch import nn

from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime.quant_linear import QuantLinear, concat_out_features


def make_layer(n, k, bits, group, sym, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_weight(quantize_weight(w, QuantSpec(bits, group, sym)), bias=b, compute_dtype=torch.float32)


CASES = [(4, 128, False, 512), (4, 64, True, 256), (2, 128, False, 512), (8, None, True, 256), (8, 32, False, 128),
         (4, 512, False, 1024)]


@pytest.mark.parametrize("bits,group,sym,k", CASES)
def test_ktiled_layout_replaces_the_checkpoint_buffers_exactly(bits, group, sym, k):
    layer = make_layer(40, k, bits, group, sym)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    w_before = layer.dequantized_weight(torch.float32)
    x = torch.randn(3, k)
    y_before = layer(x)
    ckpt_bytes = layer.storage_bytes

    layer.set_layout("ktiled")
    names = [n for n, b in layer.named_buffers() if b is not None]
    assert names == ["words", "sz", "bias"]  # the checkpoint buffers are gone, not kept beside
    assert not hasattr(layer, "qweight")
    n_groups = k // (group or k)
    # the same code bytes; 4 bytes per (group, row) instead of fp16 scale + uint8 zero
    assert layer.storage_bytes == ckpt_bytes + 40 * n_groups
    assert layer.resident_bytes == layer.storage_bytes  # fake's float weight was dropped with the old layout
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[n], before[n]) and after[n].dtype == before[n].dtype
                                               for n in before)
    assert torch.equal(layer.dequantized_weight(torch.float32), w_before)
    assert torch.equal(layer(x), y_before)  # fake mode rebuilds its weight from whichever layout is resident

    layer.set_layout("checkpoint")
    assert [n for n, b in layer.named_buffers() if b is not None] == ["qweight", "scale", "zero", "bias"]
    assert all(torch.equal(getattr(layer, n), before[n]) for n in ("qweight", "scale", "zero"))


def test_int8_layout_is_the_codes_minus_128_and_round_trips():
    layer = make_layer(32, 128, 8, None, False)
    codes = layer.qweight.clone()
    layer.set_layout("int8")
    assert layer.codes_s8.dtype == torch.int8 and layer.storage_bytes == codes.numel() + 32 * 3
    assert torch.equal(layer.codes_s8.to(torch.int16), codes.to(torch.int16) - 128)
    assert torch.equal(layer.checkpoint_tensors()["qweight"], codes)
    layer.set_layout("ktiled")  # any layout to any other, through the checkpoint tensors
    layer.set_layout("checkpoint")
    assert torch.equal(layer.qweight, codes)


def test_a_mode_change_returns_the_checkpoint_layout_and_loading_works_in_any_layout():
    layer = make_layer(24, 256, 4, 64, False)
    state = {n: t.clone() for n, t in layer.state_dict().items()}
    layer.set_layout("ktiled")
    layer.mode = "dequant"
    assert layer.layout == "checkpoint" and torch.equal(layer.qweight, state["qweight"])

    other = make_layer(24, 256, 4, 64, False, seed=1)
    other.set_layout("ktiled")
    other.load_state_dict(state)  # the state dict holds checkpoint tensors: the layer takes them as they are
    assert other.layout == "checkpoint" and all(torch.equal(t, state[n]) for n, t in other.state_dict().items())


def test_merging_layers_held_ktiled_gives_the_merged_checkpoint():
    parts = [make_layer(n, 256, 4, 64, False, seed=i) for i, n in enumerate((64, 16, 16))]
    want = concat_out_features(parts)
    for p in parts:
        p.set_layout("ktiled")
    got = concat_out_features(parts)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


def test_resident_bytes_counts_cached_copies_once_and_views_not_at_all():
    layer = make_layer(16, 256, 4, 32, False, bias=False)
    layer(torch.randn(2, 256))  # fake mode caches the float weight: 16 x 256 fp32
    assert layer.resident_bytes == layer.storage_bytes + 16 * 256 * 4
    layer.set_layout("ktiled")
    layer._cache["view"] = {"w": layer.words[:, :2], "again": layer.words}  # views of a buffer cost nothing
    assert layer.resident_bytes == layer.storage_bytes


def test_layout_errors_name_what_was_expected():
    layer = make_layer(16, 128, 4, 32, False)
    with pytest.raises(ValueError, match="unknown weight layout 'marlin'.*checkpoint, ktiled, int8"):
        layer.set_layout("marlin")
    with pytest.raises(ValueError, match="in_features divisible by 256 for 4-bit, got 128"):
        layer.set_layout("ktiled")
    assert layer.layout == "checkpoint" and layer.qweight is not None  # nothing half-converted
    with pytest.raises(ValueError, match="int8 layout holds 8-bit codes, got 4-bit"):
        layer.set_layout("int8")


def test_a_model_held_ktiled_saves_the_checkpoint_tensors():
    model = nn.Sequential(make_layer(32, 256, 4, 128, False), make_layer(16, 256, 4, 128, True, seed=2))
    want = {n: t.clone() for n, t in model.state_dict().items()}  # what io.checkpoint writes
    for m in model:
        m.set_layout("ktiled")
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_loading_new_values_drops_what_a_mode_built_from_the_old_ones():
    a, b = make_layer(16, 256, 4, 64, False, seed=0), make_layer(16, 256, 4, 64, False, seed=1)
    x = torch.randn(2, 256)
    a(x)  # fake mode caches a's float weight
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


def test_a_layer_held_ktiled_moves_and_copies_as_it_is():
    import copy

    layer = make_layer(24, 512, 4, 128, False)
    want = {n: t.clone() for n, t in layer.state_dict().items()}
    layer.set_layout("ktiled")
    for other in (copy.deepcopy(layer), layer.to(torch.float64)):  # .to(dtype) must not touch packed storage
        assert other.layout == "ktiled" and other.words.dtype == torch.int32 and other.sz.dtype == torch.int32
        assert all(torch.equal(t, want[n]) for n, t in other.state_dict().items())


def test_auto_keeps_no_native_operand_it_does_not_run():
    """W8A8 under auto: the k-tiled words are the storage; native int8's operand is a copy, dropped when no M bucket
    picked it (CPU: the conversion and the bookkeeping, without the GPU timing)."""
    from qwenquant.runtime import fused, native

    w = torch.randn(32, 256) * 0.05
    layer = QuantLinear.from_weight(quantize_weight(w, QuantSpec(8, None, True)), act_bits=8, compute_dtype=torch.float32)
    layer.mode = "auto"
    fused._operands(layer, 8, 256)
    native.prepare(layer, fp8=False)  # what timing the int8 candidate leaves behind: a copy (layout stays k-tiled)
    assert layer.layout == "ktiled" and layer.resident_bytes == layer.storage_bytes + 32 * 256 + 32 * 4
    from qwenquant.runtime import auto

    key = (8, None, True, 8, 32, 256, 1, torch.float32)
    saved = dict(auto.TUNER.choices)
    try:
        auto.TUNER.choices[(*key[:6], 4096, key[7])] = ("native-int8", {})  # another bucket of this shape runs it
        auto.TUNER.choices[key] = ("fused", {})
        auto.drop_unused_native(layer, key)
        assert "native-int8" in layer._cache
        del auto.TUNER.choices[(*key[:6], 4096, key[7])]
        auto.drop_unused_native(layer, key)
        assert "native-int8" not in layer._cache and layer.resident_bytes == layer.storage_bytes
    finally:
        auto.TUNER.choices.clear()
        auto.TUNER.choices.update(saved)
