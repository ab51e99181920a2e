"""The CPU execution modes of QuantLinear agree: a SmolLM2 quantized by the core pipeline generates
the same greedy tokens with `dequant` (unpack every call) as with `fake` (the evaluated model)."""

import pytest
import torch

from qwenquant import api
from qwenquant.runtime.quant_linear import set_execution_mode


def test_greedy_tokens_equal_across_cpu_modes():
    model, tok, _ = api.load("smollm2")
    api.quantize(model, tok, api.method_config("rtn", bits=4, group_size=64), None, progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    outs = {}
    for mode in ("fake", "dequant"):
        assert set_execution_mode(model, mode) == 30 * 7  # SmolLM2: 30 layers × 7 linears
        with torch.no_grad():
            outs[mode] = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(outs["fake"], outs["dequant"])
    assert outs["fake"].shape[1] == ids.shape[1] + 8


def test_gpu_modes_refused_clearly_on_cpu():
    model, tok, _ = api.load("tiny-qwen3")
    api.quantize(model, tok, api.method_config("rtn", bits=4, group_size=32), None, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    with pytest.raises(ValueError, match="unknown execution mode 'warp'"):
        layer.mode = "warp"
    for mode in ("fused", "native"):
        with pytest.raises((ValueError, RuntimeError), match="(?i)cuda|gpu|not available|fake|dequant"):
            layer.mode = mode
            layer(torch.randn(1, 2, layer.in_features))


def test_forward_glu_is_the_layer_on_silu_times_up():
    """``QuantLinear.forward_glu`` (the down projection on a merged gate / up output) computes the layer on
    silu(gate) · up — in fp32 with one rounding — in the CPU modes, and refuses an input of the wrong width by value."""
    from qwenquant.numerics import QuantSpec, quantize_weight
    from qwenquant.numerics.activation import silu_mul
    from qwenquant.runtime.quant_linear import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_weight(quantize_weight(torch.randn(48, 128), QuantSpec(4, 32, False)),
                                    compute_dtype=torch.bfloat16)
    gu = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    g, u = gu.float().chunk(2, dim=-1)
    assert torch.equal(silu_mul(gu), (g * torch.sigmoid(g) * u).to(torch.bfloat16))
    for mode in ("fake", "dequant"):
        layer.mode = mode
        assert torch.equal(layer.forward_glu(gu), layer(silu_mul(gu)))
    with pytest.raises(ValueError, match=r"2 x 128.*\(2, 3, 128\)"):
        layer.forward_glu(gu[..., :128])
