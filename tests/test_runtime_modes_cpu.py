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
