"""AWQ and SmoothQuant on one linear layer with correlated, outlier-heavy inputs, against RTN."""

import pytest
import torch

from conftest import rel_output_error
from qwenquant.methods.awq import AWQConfig, awq_quantize, awq_search_scale
from qwenquant.methods.rtn import RTNConfig, rtn_quantize
from qwenquant.methods.smoothquant import SmoothQuantConfig, smooth_scale, smoothquant_quantize
from qwenquant.numerics import QuantSpec, fake_quantize_per_token


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 64])
def test_awq_beats_rtn(layer_problem, bits, group_size):
    X, W = layer_problem
    spec = QuantSpec(bits, group_size, False)
    rtn = rel_output_error(X, W, rtn_quantize(W, RTNConfig(spec)).dequantize())
    cfg = AWQConfig(spec=spec)
    s, alpha = awq_search_scale(X, [W], cfg)
    Ws = W * s                                     # the fold: W diag(s), input X / s
    q = awq_quantize(Ws, X / s, cfg)
    awq = rel_output_error(X, W, q.dequantize() / s)  # same function of X as the deployed pair
    print(f"w{bits} g{group_size}: RTN {rtn:.4f}  AWQ {awq:.4f} (alpha {alpha:.2f})")
    assert alpha > 0
    assert awq < 0.9 * rtn


def test_awq_scale_search_never_worse_than_rtn_grid_point(layer_problem):
    X, W = layer_problem
    cfg = AWQConfig(spec=QuantSpec(4, 64, False), grid=1)  # grid of one point: alpha = 0 -> s = 1
    s, alpha = awq_search_scale(X, [W], cfg)
    assert alpha == 0.0 and torch.allclose(s, torch.ones_like(s))


def test_smoothquant_w8a8_beats_plain_w8a8(layer_problem):
    X, W = layer_problem
    cfg = SmoothQuantConfig()
    plain_w = smoothquant_quantize(W, cfg).dequantize()
    plain = rel_output_error(X, W, plain_w, fake_quantize_per_token(X, 8))
    s = smooth_scale(X.abs().amax(0), [W], cfg.alpha)
    Xs, Ws = X / s, W * s
    sq = rel_output_error(X, W, smoothquant_quantize(Ws, cfg).dequantize(), fake_quantize_per_token(Xs, 8))
    print(f"W8A8: plain {plain:.5f}  SmoothQuant {sq:.5f}")
    assert sq < 0.7 * plain


def test_smoothing_is_exact_in_float(layer_problem):
    X, W = layer_problem
    s = smooth_scale(X.abs().amax(0), [W], 0.5)
    assert torch.allclose((X / s) @ (W * s).T, X @ W.T, rtol=1e-4, atol=1e-3)


def test_smoothquant_alpha_range():
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
