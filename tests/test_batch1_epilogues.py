"""The batch-1 kernel's epilogues (``kernels/wq_batch1.py``: ``batch1_silu_mul``, ``batch1_add_rmsnorm``) and their
use in the decode step (``fused.silu_mul`` / ``fused.add_rmsnorm``, ``bench.e2e._layer_step``): on a CPU under
Triton's interpreter (fp16, small shapes) and on a GPU (bf16, Qwen3-8B shapes), against the unfused math —
the projection through the plain batch-1 kernel, then ``reference_silu_mul`` / ``reference_add_rmsnorm``; the
step's wiring on a CPU with the epilogues replaced by that math."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from qwenquant.kernels import wq_batch1 as B  # noqa: E402
from qwenquant.kernels import wq_ktiled as KT  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _weight(n, k, bits, group, device="cpu", seed=0):
    from qwenquant.numerics.affine import QuantSpec, affine_to_tensors, quantize_weight

    torch.manual_seed(seed)
    t = affine_to_tensors(quantize_weight(torch.randn(n, k), QuantSpec(bits, group, False)))
    kt = KT.KTiledWeight.from_checkpoint(t["qweight"], t["scale"], t["zero"], bits, k)
    return kt.words.to(device), kt.sz.to(device)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_epilogues(n_silu, n_norm, k, bits, group, ms, tiles, dtype, device):
    """Every tile and M: the epilogue kernels against the plain kernel's output through the reference math, results
    written into fresh tensors (the plain kernel's into NaN-filled ones); the grid counter is left at zero."""
    ws_w, ws_sz = _weight(n_silu, k, bits, group, device, seed=1)
    wn_w, wn_sz = _weight(n_norm, k, bits, group, device, seed=2)
    worst = {"silu_mul": 0.0, "h": 0.0, "xn": 0.0}
    for m in ms:
        x = torch.randn(m, k, device=device).to(dtype)
        r = torch.randn(m, n_norm, device=device).to(dtype)
        nw = (1 + 0.2 * torch.randn(n_norm, device=device)).to(dtype)
        for bn, kb, warps, stages in tiles:
            kw = dict(bn=bn, kb=kb, num_warps=warps, num_stages=stages)
            y = B.batch1_gemm(x, ws_w, ws_sz, bits, group, out=torch.full((m, n_silu), float("nan"), device=device,
                                                                          dtype=dtype), **kw)
            worst["silu_mul"] = max(worst["silu_mul"], _rel(B.batch1_silu_mul(x, ws_w, ws_sz, bits, group, **kw),
                                                            B.reference_silu_mul(y)))
            y = B.batch1_gemm(x, wn_w, wn_sz, bits, group, **kw)
            h_ref, xn_ref = B.reference_add_rmsnorm(y, r, nw, 1e-6)
            h, xn = B.batch1_add_rmsnorm(x, wn_w, wn_sz, bits, group, r, nw, 1e-6, **kw)
            worst["h"] = max(worst["h"], _rel(h, h_ref))
            worst["xn"] = max(worst["xn"], _rel(xn, xn_ref))
    _, cnt = KT.split_k_workspace(torch.device(device), 1, 1)
    assert not cnt.any()
    return worst


@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="the interpreter needs numpy")
def test_epilogues_under_the_interpreter():
    """N = 96 / 40 (partial last tiles: 48 and 40 output columns against 8 or 16 per program), M = 1 / 3 / 9 (the
    MMA's N = 8 and 16), 4-bit g128 and 2-bit g64, one k-tile per step (K loops) and four."""
    script = textwrap.dedent("""
        import json, torch
        from tests.test_batch1_epilogues import check_epilogues
        out = {}
        for bits, group, k in ((4, 128, 512), (2, 64, 1024)):
            out[f"{bits}"] = check_epilogues(96, 40, k, bits, group, (1, 3, 9), ((16, 1, 4, 1), (32, 4, 2, 1)),
                                             torch.float16, "cpu")
        print(json.dumps(out))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    for bits, worst in json.loads(out.stdout.strip().splitlines()[-1]).items():
        # fp16 outputs: a rounding of y or h that lands on the other side of a half-ulp moves an element by 1 ulp
        assert worst["silu_mul"] < 2e-3 and worst["h"] < 1e-3 and worst["xn"] < 2e-3, (bits, worst)


@pytest.mark.gpu
@cuda
def test_epilogues_on_the_gpu_qwen3_8b_shapes():
    """gate_up (N = 24576) and o (N = 4096) of Qwen3-8B at K = 4096, M = 1-8, every tile the tuner offers them, bf16."""
    from qwenquant.runtime import fused

    tiles = [c[:4] for c in fused.BATCH1 if c[4] == 1]
    worst = check_epilogues(24576, 4096, 4096, 4, 128, (1, 2, 5, 8), tiles, torch.bfloat16, "cuda")
    assert worst["silu_mul"] < 5e-3 and worst["h"] < 5e-3 and worst["xn"] < 5e-3, worst


def test_bad_epilogue_operands_name_the_value():
    words, sz = torch.zeros(64, 64, dtype=torch.int32), torch.zeros(4, 64, dtype=torch.int32)  # N 64, K 512, 4-bit
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    nw = torch.ones(64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"residual torch.bfloat16 \(2, 64\)"):
        B.batch1_add_rmsnorm(x, words, sz, 4, 128, torch.zeros(2, 64, dtype=torch.bfloat16), nw, 1e-6)
    with pytest.raises(ValueError, match=r"norm_weight \(32,\)"):
        B.batch1_add_rmsnorm(x, words, sz, 4, 128, torch.zeros(1, 64, dtype=torch.bfloat16), nw[:32], 1e-6)
    with pytest.raises(ValueError, match="eps=0"):
        B.batch1_add_rmsnorm(x, words, sz, 4, 128, torch.zeros(1, 64, dtype=torch.bfloat16), nw, 0)
    with pytest.raises(ValueError, match="batch1_silu_mul takes 1 to 16 rows of x, got 17"):
        B.batch1_silu_mul(torch.randn(17, 512, dtype=torch.bfloat16), words, sz, 4, 128)


def test_epilogue_ok_is_false_off_the_gpu_and_for_other_modules():
    from qwenquant.numerics.affine import QuantSpec, quantize_weight
    from qwenquant.runtime import fused
    from qwenquant.runtime.quant_linear import QuantLinear

    layer = QuantLinear.from_weight(quantize_weight(torch.randn(64, 512), QuantSpec(4, 128, False)), mode="fused")
    assert not fused.epilogue_ok(layer, 1)  # on a CPU
    assert not fused.epilogue_ok(torch.nn.Linear(512, 64), 1)
    with pytest.raises(ValueError, match="does not take the batch-1 epilogue"):
        fused.silu_mul(layer, torch.randn(1, 512, dtype=torch.bfloat16))


@torch.no_grad()
def test_decode_step_with_epilogues_wires_them_as_the_unfused_step(monkeypatch):
    """The step's three epilogue slots, each replaced by the unfused math on the layer's own output (a CPU has no
    kernel), give the logits of the step without them: the right norm goes with each projection, the residual
    stream passes through, and the last layer's down takes the final norm."""
    transformers = pytest.importorskip("transformers")
    from qwenquant.bench import e2e
    from qwenquant.runtime import fused

    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    e2e.merge_projections(model)
    calls = []

    def add_rmsnorm(layer, x, residual, w, eps):
        calls.append("add_rmsnorm")
        return B.reference_add_rmsnorm(layer(x), residual, w, eps)

    def silu_mul(layer, x):
        calls.append("silu_mul")
        return B.reference_silu_mul(layer(x))

    monkeypatch.setattr(fused, "add_rmsnorm", add_rmsnorm)
    monkeypatch.setattr(fused, "silu_mul", silu_mul)
    logits = []
    for epi in ((False,) * 3, (True,) * 3):
        torch.manual_seed(1)
        dec = e2e.StaticDecoder(model, 2, ctx=16, device="cpu", attend="split")
        dec.epilogues = epi
        logits.append(dec.step())
    assert calls == ["add_rmsnorm", "silu_mul", "add_rmsnorm"] * 2
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@cuda
@torch.no_grad()
def test_decode_step_with_epilogues_matches_the_unfused_step_on_the_gpu():
    """A small Qwen3 in fused W4 mode: the step with the three epilogues (batch 1 and 5) gives the logits of the
    step with the compiled add + norm and SiLU·mul kernels, within bf16 rounding."""
    transformers = pytest.importorskip("transformers")
    from qwenquant.bench import e2e
    from qwenquant.numerics import QuantSpec

    cfg = transformers.Qwen3Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    originals = [getattr(p, n).weight.detach().float().cpu() for p, n in e2e.decoder_linears(model)]
    e2e.merge_projections(model)
    e2e.quantize_model(model, originals, QuantSpec(4, 128, False), "fused")
    for b in (1, 5):
        out = {}
        for epi in (False, True):
            torch.manual_seed(1)
            dec = e2e.StaticDecoder(model, b, ctx=64, device="cuda", attend="split", epilogues=epi)
            assert dec.epilogues == (epi,) * 3
            out[epi] = dec.step().float()
        assert _rel(out[True], out[False]) < 2e-2, (b, _rel(out[True], out[False]))
