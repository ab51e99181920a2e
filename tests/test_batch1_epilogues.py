"""The batch-1 kernel's epilogues and norm prologue (``kernels/wq_batch1.py``: ``batch1_silu_mul``,
``batch1_add_residual``, ``norm=``) and their use in the decode step (``fused.silu_mul`` / ``add_residual`` /
``linear_normed``, ``bench.e2e._layer_step``): on a CPU under Triton's interpreter (fp16, small shapes) and on a GPU
(bf16, Qwen3-8B shapes), against the unfused math (the plain batch-1 kernel, then ``reference_silu_mul`` /
``reference_add_residual``) and the exact fp64 product (the in-kernel norm); the step's wiring on a CPU with the
epilogues replaced by that math."""

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


def _small_qwen3(transformers, hidden, inter, layers, heads, head_dim, vocab):
    """A random HF Qwen3 (2 KV heads, untied head) with random RMSNorm weights (``_random_norms``), fp32, eval."""
    cfg = transformers.Qwen3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
                                   vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    _random_norms(model)
    return model


def _random_norms(model, seed=3):
    """Every RMSNorm weight of an HF Qwen3 model random (1 + 0.5·N(0, 1)): a fresh model has them all 1, under
    which a wrong norm weight in the wiring would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            w = 1 + 0.5 * torch.randn(mod.weight.shape, generator=g)
            mod.weight.data.copy_(w.to(mod.weight.dtype))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _partials(h, slots):
    """Sums of h² per row in ``slots`` column chunks: [slots, M] fp32, as ``batch1_add_residual`` hands them on."""
    return torch.stack([c.float().pow(2).sum(-1) for c in h.chunk(slots, dim=-1)]).contiguous()


def _batch1_tile(bn, kb, warps, stages, *persist):
    """``wq_batch1``'s keywords for a tile (bn, kb, warps, stages[, programs per SM])."""
    return dict(bn=bn, kb=kb, num_warps=warps, num_stages=stages, persist=persist[0] if persist else 0)


def check_epilogues(n_silu, n_res, k, bits, group, ms, tiles, dtype, device, kernels=None, tile_kw=_batch1_tile):
    """Every tile and M, fresh random inputs: SiLU·mul and the residual add against the plain kernel's output through
    the unfused math (results into fresh tensors, the plain kernel's into NaN-filled ones); the in-kernel RMSNorm
    (``norm=``, with and without SiLU·mul) against the exact product in fp64, next to the unfused path's error
    (``reference_rmsnorm`` then the plain kernel): returns the worst relative errors, ``*_unfused`` for the latter.
    ``kernels``: an object with ``batch1_gemm`` / ``batch1_silu_mul`` / ``batch1_add_residual`` of ``wq_batch1``'s
    signatures (default ``wq_batch1`` itself), ``tile_kw`` turning a tile into their keywords."""
    K1 = B if kernels is None else kernels
    wg, sg = _weight(n_silu, k, bits, group, device, seed=1)  # [gate; up], K = k
    wr, sr = _weight(n_res, k, bits, group, device, seed=2)  # o / down: N = n_res
    wq = KT.dequantize_ktiled(wg, sg, bits, group, k, torch.float64)
    worst = {}

    def note(name, e):
        worst[name] = max(worst.get(name, 0.0), e)

    for m in ms:
        x = torch.randn(m, k, device=device).to(dtype)
        r = torch.randn(m, n_res, device=device).to(dtype)
        h = (3 * torch.randn(m, k, device=device)).to(dtype)  # a residual stream, normalized inside
        nw = (1 + 0.2 * torch.randn(k, device=device)).to(dtype)
        hw, ss = (h.float() * nw.float()).to(dtype), _partials(h, 3)  # what batch1_add_residual hands on
        nw_res = (1 + 0.2 * torch.randn(n_res, device=device)).to(dtype)
        hf = h.double()
        exact_in = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
        exact = exact_in @ wq.T
        g, u = exact.chunk(2, dim=-1)
        exact_act = torch.nn.functional.silu(g) * u
        for tile in tiles:
            kw = tile_kw(*tile)
            bn = kw["bn"]
            y = K1.batch1_gemm(x, wg, sg, bits, group, out=torch.full((m, n_silu), float("nan"), device=device,
                                                                     dtype=dtype), **kw)
            act = K1.batch1_silu_mul(x, wg, sg, bits, group, out=torch.full((m, n_silu // 2), float("nan"),
                                                                           device=device, dtype=dtype), **kw)
            note("silu_mul", _rel(act, B.reference_silu_mul(y)))
            y = K1.batch1_gemm(x, wr, sr, bits, group, **kw)
            h_ref, hw_ref, ss_ref = B.reference_add_residual(y, r, nw_res)
            h_out, hw_out, ss_out = K1.batch1_add_residual(x, wr, sr, bits, group, r, nw_res, **kw)
            assert ss_out.shape == (-(-n_res // bn), m)
            note("add_residual", max(_rel(h_out, h_ref), _rel(hw_out, hw_ref)))
            note("sum_squares", _rel(ss_out.sum(0), ss_ref))
            xn = B.reference_rmsnorm(h, nw, 1e-6)
            unfused = K1.batch1_gemm(xn, wg, sg, bits, group, **kw)
            note("normed", _rel(K1.batch1_gemm(hw, wg, sg, bits, group, norm=(1e-6, ss), **kw), exact))
            note("normed_unfused", _rel(unfused, exact))
            note("silu_normed", _rel(K1.batch1_silu_mul(hw, wg, sg, bits, group, norm=(1e-6, ss), **kw), exact_act))
            note("silu_normed_unfused", _rel(B.reference_silu_mul(unfused), exact_act))
            # the chain as the decode step runs it: the producer's own (hw, ss) into the consumer, against the
            # producer's h through HF's norm and the plain kernel (K = n_res here: the producer's N is the hidden size)
            if n_res == k:
                _, hw2, ss2 = K1.batch1_add_residual(x, wr, sr, bits, group, r, nw, **kw)
                plain = K1.batch1_gemm(B.reference_rmsnorm(h_out, nw, 1e-6), wg, sg, bits, group, **kw)
                note("chain", _rel(K1.batch1_gemm(hw2, wg, sg, bits, group, norm=(1e-6, ss2), **kw), plain))
    return worst


def assert_close_to_unfused(worst, tol):
    """The epilogues within ``tol`` of the unfused math, the in-kernel norm no worse than twice the unfused path."""
    assert worst["silu_mul"] < tol and worst["add_residual"] < tol and worst["sum_squares"] < 1e-5, worst
    assert worst["normed"] < 2 * worst["normed_unfused"] + 1e-4, worst
    assert worst["silu_normed"] < 2 * worst["silu_normed_unfused"] + 1e-4, worst
    assert worst.get("chain", 0.0) < 4 * tol, worst


@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="the interpreter needs numpy")
def test_epilogues_under_the_interpreter():
    """N = 80 / 40 (partial last tiles: 40 output columns against 8 or 16 per program), M = 1 / 3 / 9 (the MMA's
    N = 8 and 16), 4-bit g128 and 2-bit g64, one k-tile per step (K loops) and four; three partial sums; and the
    producer's own hw / ss into the consumer (N = K = 512); a persistent tile (programs walking several row blocks)."""
    script = textwrap.dedent("""
        import json, torch
        from tests.test_batch1_epilogues import check_epilogues
        out = {}
        for bits, group, k in ((4, 128, 512), (2, 64, 1024)):
            out[f"{bits}"] = check_epilogues(80, 40, k, bits, group, (1, 3, 9), ((16, 1, 4, 1), (32, 4, 2, 1)),
                                             torch.float16, "cpu")
        # the producer -> consumer chain: o-shaped producer of the hidden size (N = K) into a gate_up-shaped consumer
        out["chain"] = check_epilogues(80, 512, 512, 4, 128, (1, 3), ((16, 2, 4, 1),), torch.float16, "cpu")
        # persistent: the interpreter's "SM count" is 4, so 4 programs walk gate_up's 5 and o's 3-5 row blocks
        out["persistent"] = check_epilogues(80, 80, 512, 4, 128, (1, 3), ((16, 2, 4, 1, 1),), torch.float16, "cpu")
        print(json.dumps(out))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    for bits, worst in json.loads(out.stdout.strip().splitlines()[-1]).items():
        # fp16 outputs: a rounding of y or h that lands on the other side of a half-ulp moves an element by 1 ulp
        assert_close_to_unfused(worst, 2e-3)


@pytest.mark.gpu
@cuda
def test_epilogues_on_the_gpu_qwen3_8b_shapes():
    """gate_up (N = 24576) and o (N = 4096) of Qwen3-8B at K = 4096, M = 1-8, every tile the tuner offers them (the
    persistent ones too), bf16."""
    from qwenquant.runtime import fused

    tiles = [c for kind, c in fused._EPILOGUE_TILES.values() if kind == "batch1"]  # (bn, kb, warps, stages, per SM)
    worst = check_epilogues(24576, 4096, 4096, 4, 128, (1, 2, 5, 8), tiles, torch.bfloat16, "cuda")  # chain too
    assert_close_to_unfused(worst, 5e-3)
    print(worst)


def test_bad_epilogue_operands_name_the_value():
    words, sz = torch.zeros(64, 64, dtype=torch.int32), torch.zeros(4, 64, dtype=torch.int32)  # N 64, K 512, 4-bit
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    nw, ss = torch.ones(64, dtype=torch.bfloat16), torch.ones(4, 1)
    with pytest.raises(ValueError, match=r"residual torch.bfloat16 \(2, 64\)"):
        B.batch1_add_residual(x, words, sz, 4, 128, torch.zeros(2, 64, dtype=torch.bfloat16), nw)
    with pytest.raises(ValueError, match=r"norm_weight \(32,\)"):
        B.batch1_add_residual(x, words, sz, 4, 128, torch.zeros(1, 64, dtype=torch.bfloat16), nw[:32])
    with pytest.raises(ValueError, match="norm eps=0"):
        B.batch1_silu_mul(x, words, sz, 4, 128, norm=(0, ss))
    with pytest.raises(ValueError, match=r"sums of squares torch.float32 \(4, 2\)"):
        B.batch1_gemm(x, words, sz, 4, 128, norm=(1e-6, torch.ones(4, 2)))
    with pytest.raises(ValueError, match="batch1_silu_mul takes 1 to 16 rows of x, got 17"):
        B.batch1_silu_mul(torch.randn(17, 512, dtype=torch.bfloat16), words, sz, 4, 128)


def test_epilogue_ok_is_false_off_the_gpu_and_for_other_modules():
    from qwenquant.numerics.affine import QuantSpec, quantize_weight
    from qwenquant.runtime import fused
    from qwenquant.runtime.quant_linear import QuantLinear

    layer = QuantLinear.from_weight(quantize_weight(torch.randn(64, 512), QuantSpec(4, 128, False)), mode="fused")
    assert not fused.epilogue_ok(layer, 1)  # on a CPU
    assert not fused.epilogue_ok(torch.nn.Linear(512, 64), 1)
    with pytest.raises(ValueError, match="does not take the batch-1 kernel's epilogues"):
        fused.silu_mul(layer, torch.randn(1, 512, dtype=torch.bfloat16))


@torch.no_grad()
def test_decode_step_with_epilogues_wires_them_as_the_unfused_step(monkeypatch):
    """The step's epilogue calls, each replaced by the unfused math on the layer's own output (a CPU has no kernel),
    give the logits of the step without them, for each of (norm, silu) and both: the right norm weight goes with each
    projection, the residual stream and its sums of squares pass from layer to layer, and the last layer's down ends
    with the final norm."""
    transformers = pytest.importorskip("transformers")
    from qwenquant.bench import e2e
    from qwenquant.runtime import fused

    model = _small_qwen3(transformers, hidden=64, inter=128, layers=3, heads=4, head_dim=16, vocab=97)
    e2e.merge_projections(model)
    calls = []

    def finish(hw, ss, eps):  # RMSNorm(h) · w from (h · w, partial sums of h²)
        return hw * torch.rsqrt(ss.sum(0) / hw.shape[-1] + eps).reshape(*hw.shape[:-1], 1)

    def add_residual(layer, x, residual, w):
        calls.append("add_residual")
        h, hw, _ = B.reference_add_residual(layer(x), residual, w)
        return h, hw, _partials(h.reshape(-1, h.shape[-1]), 2)

    def linear_normed(layer, hw, ss, eps):
        calls.append("linear_normed")
        return layer(finish(hw, ss, eps))

    def silu_mul(layer, x, norm=None):
        calls.append("silu_mul")
        return B.reference_silu_mul(layer(x if norm is None else finish(x, norm[1], norm[0])))

    for name, fn in (("add_residual", add_residual), ("linear_normed", linear_normed), ("silu_mul", silu_mul)):
        monkeypatch.setattr(fused, name, fn)
    monkeypatch.setattr(fused, "epilogue_ok", lambda layer, m: True)
    expect = {(False, False): [], (False, True): ["silu_mul"] * 3,
              (True, False): ["add_residual", "linear_normed", "add_residual", "linear_normed"] * 2
              + ["add_residual", "linear_normed", "add_residual"],
              (True, True): ["add_residual", "silu_mul", "add_residual", "linear_normed"] * 2
              + ["add_residual", "silu_mul", "add_residual"]}
    logits = {}
    for asked, flags in ((False, (False, False)), (("silu",), (False, True)), (("norm",), (True, False)),
                         (True, (True, True))):
        calls.clear()
        torch.manual_seed(1)
        dec = e2e.StaticDecoder(model, 2, ctx=16, device="cpu", attend="split", epilogues=asked)
        assert dec.epilogues == flags
        logits[flags] = dec.step()
        assert calls == expect[flags], (flags, calls)
    for flags, out in logits.items():
        torch.testing.assert_close(out, logits[(False, False)], rtol=1e-5, atol=1e-5)
    plain = {}
    for asked in (False, True):  # without folding the add into the next norm: the layers return h alone
        torch.manual_seed(1)
        plain[asked] = e2e.StaticDecoder(model, 2, ctx=16, device="cpu", attend="split", fold_norm=False,
                                         epilogues=asked).step()
    torch.testing.assert_close(plain[True], plain[False], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[True], logits[(False, False)], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="epilogues=\\('silu', 'gelu'\\)"):
        e2e.StaticDecoder(model, 2, ctx=16, device="cpu", epilogues=("silu", "gelu"))


@pytest.mark.gpu
@cuda
@torch.no_grad()
def test_decode_step_with_epilogues_matches_the_unfused_step_on_the_gpu():
    """A small Qwen3 in fused W4 mode: the step with the three epilogues (batch 1 and 5) gives the logits of the
    step with the compiled add + norm and SiLU·mul kernels, within bf16 rounding."""
    transformers = pytest.importorskip("transformers")
    from qwenquant.bench import e2e
    from qwenquant.numerics import QuantSpec

    model = _small_qwen3(transformers, hidden=512, inter=1024, layers=2, heads=8, head_dim=64, vocab=1000)
    model = model.to("cuda", torch.bfloat16)
    originals = [getattr(p, n).weight.detach().float().cpu() for p, n in e2e.decoder_linears(model)]
    e2e.merge_projections(model)
    e2e.quantize_model(model, originals, QuantSpec(4, 128, False), "fused")
    for b in (1, 5):
        out = {}
        for epi in (False, True):
            torch.manual_seed(1)
            dec = e2e.StaticDecoder(model, b, ctx=64, device="cuda", attend="split", epilogues=epi)
            assert dec.epilogues == (epi,) * 2
            out[epi] = dec.step().float()
        assert _rel(out[True], out[False]) < 2e-2, (b, _rel(out[True], out[False]))


@pytest.mark.parametrize("variant", ["normed", "silu_mul normed", "add_residual"])
def test_epilogue_tiles_build_for_an_h100_without_spills(variant):
    """No GPU needed: every batch-1 tile the epilogue tuner offers compiles to sm_90a with each variant as the decode
    step runs it (qkv normed, gate_up SiLU·mul normed, o / down with the residual add; 256 partial sums, o's count)
    with no spills in at most 168 registers — the plain kernel's budget (tests/test_batch1.py): an epilogue that cost
    programs per SM would slow the latency-bound loop it rides on."""
    from qwenquant.kernels.launch import ptxas_usage
    from qwenquant.runtime import fused

    epi, slots = {"normed": (0, 256), "silu_mul normed": (B.SILU_MUL, 256), "add_residual": (B.ADD_RESIDUAL, 0)}[variant]
    for bn, kb, warps, stages, sk in fused.BATCH1:
        if sk != 1:
            continue
        use = ptxas_usage(B.compile_for_sm90(bn, kb, warps, stages, epi=epi, norm_slots=slots))
        assert use["spill_bytes"] == 0 and use["registers"] <= 168 and use["shared_bytes"] <= 227 * 1024, \
            (bn, kb, warps, stages, {k: v for k, v in use.items() if k != "report"})
