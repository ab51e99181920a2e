"""GPTQ and BiLLM on one synthetic layer with correlated, outlier-heavy inputs.

The problem: X = Z·A (Z Gaussian, A a random mixing close to I, so input channels correlate),
8 of the 512 input channels scaled ×20 (the outlier channels LLM activations have), 2048 tokens;
W [256, 512] Gaussian plus a rank-8 part, rows of different scale. Errors are relative output
errors ||X Wᵀ - X Ŵᵀ|| / ||X Wᵀ||, printed with ``pytest -s``.
"""

from __future__ import annotations

import pytest
import torch

from qwenquant.methods.billm import (
    BiLLMConfig,
    BinarizedWeight,
    _billm,
    _binarize,
    _break_point_errors,
    _quantiles,
    _residual_binarize,
    _salient_count_errors,
    billm_quantize,
)
from qwenquant.methods.gptq import GPTQConfig, gptq_quantize
from qwenquant.methods.hessian import HessianAccumulator, inverse_cholesky
from qwenquant.numerics.affine import QuantSpec, expand_groups, quantize_codes, quantize_weight


def _problem(seed: int = 0, n: int = 2048, d_in: int = 512, d_out: int = 256):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d_in, generator=g)
    A = torch.eye(d_in) + torch.randn(d_in, d_in, generator=g) / d_in**0.5  # [in, in] mixing
    X = Z @ A  # [n, in] correlated channels
    X[:, torch.randperm(d_in, generator=g)[:8]] *= 20.0  # outlier channels
    low_rank = torch.randn(d_out, 8, generator=g) @ torch.randn(8, d_in, generator=g) / 8**0.5
    W = 0.02 * (torch.randn(d_out, d_in, generator=g) + low_rank) * (1 + torch.rand(d_out, 1, generator=g))
    return X, W


@pytest.fixture(scope="module")
def layer():
    X, W = _problem()
    acc = HessianAccumulator(X.shape[1])
    for chunk in X.split(700):  # uneven batches exercise the running average
        acc.add(chunk)
    return X, W, acc.hessian()


def _rel(X, W, W_hat) -> float:
    ref = X @ W.T
    return float((ref - X @ W_hat.T).norm() / ref.norm())


def test_hessian_accumulator_is_the_mean_outer_product(layer):
    X, _, H = layer
    expected = 2.0 / X.shape[0] * (X.double().T @ X.double())
    assert torch.allclose(H.double(), expected, rtol=1e-4, atol=1e-3 * float(expected.diagonal().mean()))
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no inputs"):
        acc.hessian()
    with pytest.raises(ValueError, match="NaN"):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_gptq_beats_rtn(layer, bits, group_size):
    X, W, H = layer
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=False)
    rtn = _rel(X, W, quantize_weight(W, spec).dequantize())
    errs = {}
    for act_order in (False, True):
        qw = gptq_quantize(W, H, GPTQConfig(spec=spec, act_order=act_order))
        assert qw.codes.dtype == torch.uint8 and qw.shape == tuple(W.shape)
        assert int(qw.codes.max()) <= spec.qmax
        assert qw.scale.shape == qw.zero.shape == (W.shape[0], spec.n_groups(W.shape[1]))
        errs[act_order] = _rel(X, W, qw.dequantize())
    print(f"\n[{spec.describe()}] rel. output error: RTN {rtn:.4f}  GPTQ {errs[False]:.4f}  GPTQ+act-order {errs[True]:.4f}")
    assert errs[False] < 0.9 * rtn
    assert errs[True] < 0.9 * rtn


def test_gptq_dynamic_groups_beat_rtn(layer):
    X, W, H = layer
    spec = QuantSpec(bits=4, group_size=64, symmetric=False)
    qw = gptq_quantize(W, H, GPTQConfig(spec=spec, act_order=False, static_groups=False))
    err, rtn = _rel(X, W, qw.dequantize()), _rel(X, W, quantize_weight(W, spec).dequantize())
    print(f"\n[{spec.describe()} dynamic groups] GPTQ {err:.4f}  RTN {rtn:.4f}")
    assert err < rtn
    with pytest.raises(ValueError, match="g_idx"):
        GPTQConfig(spec=spec, act_order=True, static_groups=False)


@pytest.mark.parametrize("spec", [QuantSpec(4, 128, False), QuantSpec(3, None, False), QuantSpec(4, 64, True)])
def test_gptq_weight_is_self_consistent(layer, spec):
    """The stored codes are the RTN codes of the stored weight under the stored scale/zero."""
    _, W, H = layer
    qw = gptq_quantize(W, H, GPTQConfig(spec=spec))
    W_hat = qw.dequantize()
    in_f = W.shape[1]
    s, z = expand_groups(qw.scale, in_f), expand_groups(qw.zero, in_f)
    assert torch.equal(quantize_codes(W_hat, s, z, spec).to(torch.uint8), qw.codes)
    assert torch.equal(qw.scale, qw.scale.half().float())  # fp16-representable
    if spec.group_size is not None:  # static groups: min-max of the original contiguous groups
        from qwenquant.numerics.affine import minmax_qparams

        s0, z0 = minmax_qparams(W, spec)
        assert torch.equal(qw.scale, s0) and torch.equal(qw.zero, z0)


def test_gptq_dead_columns(layer):
    X, W, _ = layer
    dead = torch.tensor([3, 100, 511])
    Xd = X.clone()
    Xd[:, dead] = 0.0
    acc = HessianAccumulator(X.shape[1])
    acc.add(Xd)
    H = acc.hessian()
    assert (H.diagonal()[dead] == 0).all()
    for act_order in (False, True):
        qw = gptq_quantize(W, H, GPTQConfig(spec=QuantSpec(4, 128, False), act_order=act_order))
        W_hat = qw.dequantize()
        assert torch.isfinite(W_hat).all()
        assert (W_hat[:, dead] == 0).all()
        rtn = _rel(Xd, W, quantize_weight(W, QuantSpec(4, 128, False)).dequantize())
        assert _rel(Xd, W, W_hat) < rtn


def test_gptq_and_billm_reject_bad_input(layer):
    _, W, H = layer
    Wn = W.clone()
    Wn[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"weight .* 1 NaN/inf"):
        gptq_quantize(Wn, H, GPTQConfig())
    Hn = H.clone()
    Hn[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"Hessian .* 1 NaN/inf"):
        billm_quantize(W, Hn, BiLLMConfig())
    with pytest.raises(ValueError, match=r"\[512, 512\].*\(256, 256\)"):
        gptq_quantize(W, H[:256, :256], GPTQConfig())


def test_inverse_cholesky_raises_damping_then_fails(caplog):
    H = torch.ones(6, 6)  # rank 1: needs real damping
    H[0, 0] = 1.0
    U, lam = inverse_cholesky(H, damp=1e-9, max_damp=1.0)
    assert lam >= 1e-9 and torch.isfinite(U).all()
    bad = -torch.eye(4)  # negative definite: no damping ≤ 1 repairs it
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky(bad, damp=0.01)
    assert "retrying" in caplog.text


@pytest.fixture(scope="module")
def billm_result(layer):
    _, W, H = layer
    return _billm(W, H, BiLLMConfig())


def test_billm_beats_sign_and_rtn_1bit(layer, billm_result):
    X, W, H = layer
    bw, Q = billm_result
    err = _rel(X, W, bw.dequantize())
    alpha = W.abs().mean(dim=1, keepdim=True)  # [out, 1]
    sign = _rel(X, W, alpha * torch.where(W >= 0, 1.0, -1.0))
    rtn1 = _rel(X, W, quantize_weight(W, QuantSpec(1, None, False)).dequantize())
    rtn1_g = _rel(X, W, quantize_weight(W, QuantSpec(1, 128, False)).dequantize())
    rtn2_g = _rel(X, W, quantize_weight(W, QuantSpec(2, 128, False)).dequantize())
    gptq2_g = _rel(X, W, gptq_quantize(W, H, GPTQConfig(spec=QuantSpec(2, 128, False))).dequantize())
    print(
        f"\n[BiLLM] rel. output error {err:.4f} at {bw.avg_bits:.3f} bits (paper count), "
        f"{bw.storage_bits:.3f} bits stored; salient columns per block "
        f"{bw.salient.view(-1, 128).sum(1).tolist()}\n"
        f"  sign·α per row {sign:.4f} | RTN 1-bit asym per-channel {rtn1:.4f}, g128 {rtn1_g:.4f} | "
        f"RTN 2-bit g128 {rtn2_g:.4f} | GPTQ 2-bit g128 {gptq2_g:.4f}"
    )
    assert 1.0 <= bw.avg_bits <= 1.2
    assert err < 0.5 * sign
    assert err < 0.5 * rtn1 and err < 0.5 * rtn1_g
    # What the returned weight dequantizes to is exactly what the error feedback assumed.
    assert torch.equal(bw.dequantize(), Q)


def test_billm_storage_roundtrip(billm_result):
    bw, _ = billm_result
    W_hat = bw.dequantize(torch.bfloat16)
    assert W_hat.shape == bw.shape == (256, 512) and W_hat.dtype == torch.bfloat16
    t = bw.to_tensors()
    stored_bits = sum(v.numel() * v.element_size() * 8 for v in t.values())
    assert stored_bits / (256 * 512) == pytest.approx(bw.storage_bits, rel=1e-12)
    assert t["sign"].dtype == torch.uint8 and t["sign"].shape == (256, 64)
    back = BinarizedWeight.from_tensors(t, bw.shape, bw.meta())
    assert torch.equal(back.dequantize(), bw.dequantize())
    assert torch.equal(back.salient, bw.salient) and back.block_size == bw.block_size
    with pytest.raises(ValueError, match="alpha has shape"):
        BinarizedWeight.from_tensors(t, bw.shape, {"block_size": 64})
    # Each non-salient weight lies in exactly one of the two split groups; salient rows in none.
    assert not (bw.sparse[:, bw.salient]).any() and not (bw.residual_sign[:, ~bw.salient]).any()


def test_billm_odd_shapes_and_paper_formula():
    """A ragged last block, a row count needing byte padding, and use_mean=False (the paper's eq. 1)."""
    X, W = _problem(seed=1, n=512, d_in=200, d_out=12)
    acc = HessianAccumulator(200)
    acc.add(X)
    bw, Q = _billm(W, acc.hessian(), BiLLMConfig(use_mean=False))
    assert torch.equal(bw.dequantize(), Q)
    assert not bw.mean.any() and "mean" not in bw.to_tensors()
    back = BinarizedWeight.from_tensors(bw.to_tensors(), bw.shape, bw.meta())
    assert torch.equal(back.dequantize(), Q)
    sign = _rel(X, W, W.abs().mean(1, keepdim=True) * torch.where(W >= 0, 1.0, -1.0))
    assert _rel(X, W, Q) < sign


@pytest.mark.parametrize("use_mean", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (13, 72), (300, 128)])
def test_billm_search_errors_match_direct_binarization(shape, use_mean):
    """The fast searches (sliced salient count, closed-form break point) against the plain
    definition: binarize with masks, one candidate at a time, and sum the weighted error."""
    g = torch.Generator().manual_seed(shape[0] + use_mean)
    out_f, n = shape
    Wb = torch.randn(out_f, n, generator=g) * (1 + torch.rand(out_f, 1, generator=g))
    Wb[:, :3] *= 4  # a few columns that should come out salient
    wt = torch.rand(n, generator=g) + 0.1  # [n] 1/[H⁻¹]_jj
    order = torch.argsort((Wb.pow(2) * wt).sum(0), descending=True)
    k_max = min(49, n - 1)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)

    direct_k = []
    for k in range(1, k_max + 1):
        sal = (rank < k).unsqueeze(0)
        r_sal, _, _ = _residual_binarize(Wb, sal, use_mean)
        r_rest, _, _ = _residual_binarize(Wb, ~sal, use_mean)
        direct_k.append(float(((Wb - r_sal - r_rest).pow(2) * wt).sum()))
    fast_k = _salient_count_errors(Wb, wt, order, k_max, use_mean)
    assert fast_k.tolist() == pytest.approx(direct_k, rel=1e-4)

    sal = (rank < 3).unsqueeze(0)
    nonsal = ~sal
    qs = torch.linspace(0.1, 0.9, 81)
    cands, fast_p = _break_point_errors(Wb, wt, nonsal, qs, use_mean)
    assert torch.equal(cands, _quantiles(Wb.abs()[nonsal.expand(out_f, n)], qs))
    direct_p = []
    for p in cands:
        conc = (Wb.abs() <= p) & nonsal
        spar = (Wb.abs() > p) & nonsal
        rc = _binarize(Wb, conc, use_mean)[0]
        rs = _binarize(Wb, spar, use_mean)[0]
        direct_p.append(float(((Wb * nonsal - rc - rs).pow(2) * wt).sum()))
    assert fast_p.tolist() == pytest.approx(direct_p, rel=1e-4)
    assert int(torch.argmin(fast_p)) == int(torch.argmin(torch.tensor(direct_p)))
