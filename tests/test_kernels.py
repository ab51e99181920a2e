"""Kernels equal their plain-torch references on fresh random inputs, over a table of shapes.

GPU tests (``-m gpu``) need CUDA and Triton; on a CPU machine they skip, and the CPU tests check
that GPU-only modes refuse clearly.
"""

import pytest
import torch

from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime.quant_linear import QuantLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_layer(n, k, bits, group, sym, seed=0, device="cpu", bias=False, act_bits=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    qw = quantize_weight(w, QuantSpec(bits, group, sym))
    layer = QuantLinear.from_weight(qw, bias=b, act_bits=act_bits, compute_dtype=torch.bfloat16)
    return layer.to(device)


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "NaN/inf in kernel output"
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("mode", ["fused", "native", "auto"])
def test_gpu_modes_refuse_cpu_clearly(mode):
    layer = make_layer(64, 128, 8, None, True)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fake|dequant"):
        layer.mode = mode  # no Triton here: refused when the mode is set
        layer(x)  # Triton present but a CPU tensor: refused at the call


def test_concat_out_features_is_exact_and_refuses_mismatches():
    """Merged QKV / gate-up: the same bytes and the same outputs as the separate layers."""
    from qwenquant.runtime.quant_linear import concat_out_features

    parts = [make_layer(n, 256, 4, 64, False, seed=i, bias=True) for i, n in enumerate((128, 32, 32))]
    merged = concat_out_features(parts)
    assert merged.out_features == 192 and merged.storage_bytes == sum(p.storage_bytes for p in parts)
    assert torch.equal(merged.dequantized_weight(torch.float32), torch.cat([p.dequantized_weight(torch.float32) for p in parts]))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    for mode in ("fake", "dequant"):
        merged.mode = mode
        for p in parts:
            p.mode = mode
        # same values; a CPU GEMM may block K differently for a wider N: allow bf16 output rounding
        torch.testing.assert_close(merged(x), torch.cat([p(x) for p in parts], dim=-1), rtol=8e-3, atol=1e-3)
    with pytest.raises(ValueError, match="layers differ"):
        concat_out_features([parts[0], make_layer(32, 256, 4, 128, False, bias=True)])
    with pytest.raises(ValueError, match="bias"):
        concat_out_features([parts[0], make_layer(32, 256, 4, 64, False)])


# ---------------------------------------------------------------------------------- GPU


SHAPES = [(256, 512), (1024, 256), (200, 768)]
FORMATS = [(4, 128, False), (4, 128, True), (4, 64, False), (4, 32, True), (4, None, False),
           (8, 128, False), (8, None, True), (2, 64, False), (2, 128, True)]
ROWS = [1, 3, 5, 33, 100]


@pytest.fixture
def untuned(monkeypatch):
    """Correctness tests run the first config of each table (the tuned choice is tested for speed, and every
    config is checked by test_every_kernel_config_matches_reference)."""
    from qwenquant.runtime import auto, fused

    monkeypatch.setattr(fused.TUNER, "fixed", True)
    monkeypatch.setattr(auto.TUNER, "fixed", True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,group,sym", FORMATS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_fused_matches_reference(bits, group, sym, n, k, untuned):
    from qwenquant.kernels import wq_matmul as K

    from qwenquant.kernels import wq_ktiled as KT

    layer = make_layer(n, k, bits, group, sym, seed=n + k + bits, device="cuda", bias=True)
    layer.mode = "fused"
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k)
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ wref.double().T) + layer.bias.double()
        y = layer(x)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert rel_err(y, ref) < 1e-2, (m, rel_err(y, ref))
    # one resident layout: k-tiled where its kernels take the shape, else the checkpoint's (no copy either way)
    tiled = KT.ktiled_ok(bits, k if group is None else group, n, k)
    assert layer.layout == ("ktiled" if tiled else "checkpoint") and layer.resident_bytes == layer.storage_bytes


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 64), (2, 128)])
def test_every_kernel_config_matches_reference(bits, group):
    """Not only the tuned choice: every GEMV/GEMM tile config in the tables computes the same thing."""
    from qwenquant.kernels import wq_matmul as K
    from qwenquant.runtime import fused

    n, k = 512, 1024
    layer = make_layer(n, k, bits, group, False, seed=7, device="cuda")
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k)
    from qwenquant.kernels import wq_ktiled as KT

    tiny_ok = fused.tinygemm_ok(bits, group, n, k)
    assert KT.ktiled_ok(bits, group, n, k)
    ops = fused.FusedOperands(
        tiny=fused.tinygemm_operands(layer.qweight, layer.scale, layer.zero, group) if tiny_ok else None,
        ktiled=KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k),
    )
    for m in (1, 3, 16, 40, 70, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ wref.double().T
        for kt in (True, False):  # with the k-tiled copy, and without (K not a multiple of its tile)
            configs = fused._configs(m, k, group, bits, tinygemm=tiny_ok, ktiled=kt, wgmma=kt and fused.wgmma_available())
            assert ("tinygemm" in configs) == (tiny_ok and m <= fused.TINYGEMM_MAX_M)
            assert any(c[0] == "ktiled" for c in configs.values()) == kt
            assert any(c[0] == "gemm_wa" for c in configs.values()) == (not kt and 4 < m <= 64)
            # a k-tiled layer holds no checkpoint tensors: its own GEMV at M = 1, no checkpoint-layout kernel
            assert any(c[0] == "ktiled_gemv" for c in configs.values()) == (kt and m == 1)
            assert any(c[0] in ("gemv", "gemv2", "gemm") for c in configs.values()) == (not kt)
            for name, (kind, cfg) in configs.items():
                y = fused._run(kind, cfg, x, layer.qweight, layer.scale, layer.zero, bits, group, ops)
                assert rel_err(y, ref) < 1e-2, (name, m)


@pytest.mark.gpu
@cuda
def test_every_kernel_config_on_the_lm_head_shape():
    """Qwen3's lm_head (151,936 x 4096, the ``+head`` e2e mode): 311 MB of packed words, the largest single weight a
    kernel reads. Every batch-1 / small-M config the tuner may pick computes the reference (fp32: fp64 would be 5 GB)."""
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_matmul as K
    from qwenquant.runtime import fused

    n, k, bits, group = 151936, 4096, 4, 128
    layer = make_layer(n, k, bits, group, False, seed=11, device="cuda")
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k).float()
    ops = fused.FusedOperands(tiny=None, ktiled=KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale,
                                                                                  layer.zero, bits, k))
    for m in (1, 8, 40):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ wref.T
        configs = fused._configs(m, k, group, bits, tinygemm=False, ktiled=True, wgmma=fused.wgmma_available())
        for name, (kind, cfg) in configs.items():
            y = fused._run(kind, cfg, x, layer.qweight, layer.scale, layer.zero, bits, group, ops)
            assert rel_err(y, ref) < 1e-2, (name, m)


@pytest.mark.gpu
@cuda
def test_dequant_mode_on_gpu_equals_fake_mode():
    """Storage-only on a GPU (one Triton unpack + cuBLAS) computes exactly what fake-quant does."""
    layer = make_layer(384, 512, 4, 64, False, seed=3, device="cuda", bias=True)
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    layer.mode = "fake"
    y_fake = layer(x)
    layer.mode = "dequant"
    assert torch.equal(layer(x), y_fake)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (2, 32, True), (8, None, False)])
def test_dequant_kernel_is_exact(bits, group, sym):
    from qwenquant.kernels import wq_matmul as K

    n, k = 96, 1024
    layer = make_layer(n, k, bits, group, sym, seed=3, device="cuda")
    g = k if group is None else group
    w = K.dequantize(layer.qweight, layer.scale, layer.zero, bits, g, k, torch.bfloat16)
    ref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k).to(torch.bfloat16)
    assert torch.equal(w, ref)
    from qwenquant.kernels import wq_ktiled as KT

    kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
    assert torch.equal(KT.dequantize_ktiled(kt.words, kt.sz, bits, g, k, torch.bfloat16), ref)


@pytest.mark.gpu
@cuda
def test_fused_and_auto_hold_the_weight_once_and_save_the_checkpoint(untuned):
    """Requirement: the bytes on the GPU match the bit-width plus metadata. fused converts the storage in place
    (allocated memory grows by the sz/scale difference only, not by a copy), auto's unpack path reads the k-tiled
    words, and state_dict() still yields the checkpoint tensors. Untuned: timing would allocate its L2-flush buffer."""
    n, k = 4096, 4096
    for mode in ("fused", "auto"):
        layer = make_layer(n, k, 4, 128, False, seed=5, device="cuda")
        state = {name: t.clone() for name, t in layer.state_dict().items()}
        x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
        layer.mode = "fake"
        y_fake = layer(x)
        layer.mode = mode
        ckpt = layer.storage_bytes
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = layer(x)
        del y
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        assert layer.layout == "ktiled" and not hasattr(layer, "qweight")
        assert layer.storage_bytes == ckpt + n * (k // 128)  # 4 bytes per (group, row) instead of 3
        assert grown < 0.05 * ckpt, (mode, grown, ckpt)  # a second copy would be ~ckpt
        after = layer.state_dict()
        assert all(torch.equal(after[name], state[name]) for name in state)
        if mode == "auto":  # the storage-only candidate on the k-tiled words: exactly fake's weight
            from qwenquant.runtime.quant_linear import forward_dequant

            assert torch.equal(forward_dequant(layer, x), y_fake)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("sym", [True, False])
def test_native_int8_reads_the_storage_in_place(sym):
    """native int8 holds the codes as signed bytes (the int8 layout) and reads them without a copy: only the fp32
    per-row scale (and zero correction) is extra; outputs equal the copy path auto uses."""
    from qwenquant.runtime import native

    n, k = 384, 1024
    layer = make_layer(n, k, 8, None, sym, seed=9, device="cuda", bias=True)
    x = torch.randn(5, k, device="cuda", dtype=torch.bfloat16)
    y_copy = native.forward_native(layer, x)  # mode "fake": a copy of the operand
    layer.mode = "native"
    y = layer(x)
    assert layer.layout == "int8" and torch.equal(y, y_copy)
    extra_rows = 4 if sym else 8
    assert layer.resident_bytes == layer.storage_bytes + n * extra_rows


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m", [1, 7, 16, 64, 300])
def test_native_matches_reference(sym, fp8, m):
    from qwenquant.kernels import w8a8
    from qwenquant.runtime import native

    n, k = 384, 1024
    layer = make_layer(n, k, 8, None, sym, seed=m, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = (native.forward_native_fp8 if fp8 else native.forward_native)(layer, x)
    ref = w8a8.reference_w8a8(x, layer.dequantized_weight(torch.float32), fp8)
    assert rel_err(y, ref) < (2e-2 if fp8 else 1e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("sym,bias", [(True, False), (False, True)])
def test_int8_triton_gemm_every_config_matches_reference(sym, bias):
    """Not only the tuned choice: each Triton int8 GEMM config (fused scales, zero correction, bias)."""
    from qwenquant.kernels import w8a8
    from qwenquant.runtime import native

    n, k = 384, 1024
    layer = make_layer(n, k, 8, None, sym, seed=11, device="cuda", bias=bias)
    nw = native.prepare(layer, fp8=False)
    for m in (1, 5, 130, 600):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = w8a8.reference_w8a8(x, layer.dequantized_weight(torch.float32), False)
        if bias:
            ref = ref + layer.bias.float()
        for cfg in w8a8.INT8_GEMM_CONFIGS:
            y = w8a8.int8_gemm(x, nw.w, nw.w_scale, nw.zero_corr, layer.bias, *cfg)
            assert rel_err(y, ref) < 1e-2, (cfg, m)


@pytest.mark.gpu
@cuda
def test_auto_matches_reference_and_records_choice():
    from qwenquant.kernels import wq_matmul as K
    from qwenquant.runtime import auto

    n, k = 512, 1024
    layer = make_layer(n, k, 4, 128, False, seed=11, device="cuda")
    layer.mode = "auto"
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, 4, k)
    for m in (1, 8, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert rel_err(layer(x), x.double() @ wref.double().T) < 1e-2
    assert len(auto.TUNER.choices) >= 3


@pytest.mark.gpu
@cuda
def test_auto_on_w8a8_runs_int8_or_fused_and_keeps_only_what_it_runs():
    """Tuned for real: at each M auto picks fused (k-tiled words), dequant or native int8 — never fp8 (another
    model) — and keeps native's int8 copy only while some bucket of the shape runs it."""
    from qwenquant.kernels import w8a8
    from qwenquant.runtime import auto

    n, k = 1024, 2048
    layer = make_layer(n, k, 8, None, False, seed=13, device="cuda", act_bits=8)
    layer.mode = "auto"
    for m in (1, 2048):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert rel_err(layer(x), w8a8.reference_w8a8(x, layer.dequantized_weight(torch.float32), False)) < 2e-2
    picks = {key[6]: c for key, (c, _) in auto.TUNER.choices.items() if key[4:6] == (n, k) and key[3] == 8}
    assert set(picks) == {1, 2048} and "native-fp8" not in picks.values()
    assert layer.layout == "ktiled"
    copy = n * k + n * 8 if "native-int8" in picks.values() else 0  # int8 codes + fp32 scale and zero correction
    assert layer.resident_bytes == layer.storage_bytes + copy, (picks, layer.resident_bytes, layer.storage_bytes)


@pytest.mark.gpu
@cuda
def test_unsupported_formats_raise_naming_alternatives():
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    l4 = make_layer(64, 256, 4, 128, False, device="cuda")
    l4.mode = "native"
    with pytest.raises(ValueError, match="fused"):
        l4(x)
    l3 = make_layer(64, 256, 3, 128, False, device="cuda")
    l3.mode = "fused"
    with pytest.raises(ValueError, match="dequant"):
        l3(x)
    lg = make_layer(64, 256, 8, 128, True, device="cuda")
    lg.mode = "native"
    with pytest.raises(ValueError, match="per-channel"):
        lg(x)


def _check_streamk_crosses_tiles(device: str, shapes, dtype) -> None:
    """Stream-K against the float64 reference where there are fewer programs than (tile, K step) units, so runs
    cross tiles, start and end inside them, and some tiles are stored whole; each call twice (the shared workspace
    and counters must come back zeroed)."""
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_matmul as K

    for n, k in shapes:
        layer = make_layer(n, k, 4, 128, False, seed=5, device=device)
        wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, 4, k)
        kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, 4, k)
        for m in (1, 16):
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = x.double() @ wref.double().T
            for programs_per_sm in (1, 2):
                for _ in range(2):
                    y = KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, bm=16, bn=64, w_as_a=True, scale_after=True,
                                       streamk=programs_per_sm)
                    assert rel_err(y, ref) < 1e-2, (n, k, m, programs_per_sm, rel_err(y, ref))
                ws, cnt = KT._WORKSPACES[str(x.device)]
                assert not ws.any() and not cnt.any()


@pytest.mark.gpu
@cuda
def test_ktiled_streamk_runs_cross_tiles_on_gpu():
    """On an H100 (132 SMs): 32 tiles x 16 steps and 128 tiles x 2 steps over 132-264 programs, and N = 2040
    (the last tile masks columns). The fused tables' shapes in test_every_kernel_config give every program one unit."""
    _check_streamk_crosses_tiles("cuda", [(2048, 4096), (8192, 512), (2040, 1024)], torch.bfloat16)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ktiled_scale_after_matches_reference_both_dtypes(dtype):
    """The scale-after PTX block (PRMT + LOP3 + paired FMA, a bf16 and an fp16 variant) on fresh random
    codes: 2/4-bit, groups 32/128/512 (spanning two tiles)/per-channel, sym and asym, several M; error no
    worse than 1.5x the error of rounding Ŵ to the activation dtype (it never rounds Ŵ, so usually better)."""
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_matmul as K

    for bits, group, sym in [(4, 128, False), (4, 32, True), (4, 512, False), (4, None, True), (2, 128, False), (2, 64, True)]:
        n, k = 256, 2048
        g = k if group is None else group
        layer = make_layer(n, k, bits, group, sym, seed=11, device="cuda")
        wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k)
        kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
        for m in (1, 5, 16, 33, 64):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ wref.double().T
            rounding = rel_err((x.float() @ wref.to(dtype).float().T).to(dtype), ref)
            for wa, sk in ((True, 1), (True, 4), (False, 2)):
                y = KT.ktiled_gemm(x, kt.words, kt.sz, bits, g, bm=max(16, 1 << (m - 1).bit_length()), bn=64,
                                   w_as_a=wa, split_k=sk, scale_after=True)
                assert y.dtype == dtype
                assert rel_err(y, ref) <= 1.5 * rounding + 1e-4, (bits, group, sym, m, wa, sk, rel_err(y, ref), rounding)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("prefetch", [0, 2])
def test_pdl_chain_of_dependent_kernels_matches_stream_order(prefetch):
    """Programmatic dependent launch (``kernels/overlap.py``): six W4 layers, each reading the previous one's
    output with nothing in between, replayed from a CUDA graph with PDL (and L2 prefetch) equal the same chain in
    stream order — split-K tiles sharing one workspace, a plain tile, the batch-1 GEMV; M = 1, 3, 5, 16. A missing
    wait reads a stale x (3-11 % off in session 9's after-loop-release experiment). Skips below sm_90."""
    from qwenquant.kernels import overlap
    from qwenquant.kernels import wq_ktiled as KT

    if not overlap.pdl_ok("cuda", True):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    n = 2048
    layers = []
    for seed in range(6):
        layer = make_layer(n, n, 4, 128, False, seed=seed, device="cuda")
        layers.append(KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, 4, n))
    for m in (1, 3, 5, 16):
        x0 = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        kernels = [lambda x, kt, pdl: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, 16, 64, True, 4, 4, 3, True,
                                                      prefetch=prefetch * pdl, pdl=pdl),
                   lambda x, kt, pdl: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, 16, 128, False, 4, 4, 3, True,
                                                      prefetch=prefetch * pdl, pdl=pdl),
                   lambda x, kt, pdl: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, 16, 64, True, 1, 4, 3, True,
                                                      prefetch=prefetch * pdl, pdl=pdl)]
        if m == 1:
            kernels.append(lambda x, kt, pdl: KT.ktiled_gemv(x, kt.words, kt.sz, 4, 128, 4, 4, 4, 1, 1,
                                                             prefetch=prefetch * pdl, pdl=pdl))
        for kernel in kernels:
            def chain(pdl, kernel=kernel):
                h = x0
                for kt in layers:
                    h = kernel(h, kt, pdl)
                return h
            ref = chain(False).float()
            chain(True)  # compile outside the capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = chain(True)
            for _ in range(20):
                g.replay()
                torch.cuda.synchronize()
                # split-K adds in any order: a few bf16 roundings apart over six layers, never a stale input
                assert rel_err(y, ref) < 1e-2, (m, rel_err(y, ref))
            del g
    # PDL really was on: the compiled kernels wait on their producer and were built for a PDL launch
    compiled = [ck for kernel in (KT._ktiled_gemm_kernel, KT._ktiled_gemv_kernel)
                for cache in kernel.device_caches.values() for ck in cache[0].values()]
    with_pdl = [ck for ck in compiled if getattr(ck.metadata, "launch_pdl", False)]
    assert with_pdl and all("griddepcontrol.wait" in ck.asm["ptx"] for ck in with_pdl)


@pytest.mark.parametrize("rows,out", [((32, 64), None), ((0, 200), None), ((64, 64), None),
                                      ((0, 64), torch.empty(10)), ((0, 64), torch.empty(64 * 256, dtype=torch.float16))])
def test_ktiled_unpack_of_row_blocks_refuses_bad_blocks(rows, out):
    from qwenquant.kernels import wq_ktiled as KT

    words, sz = torch.zeros(128, 32, dtype=torch.int32), torch.zeros(2, 128, dtype=torch.int32)
    with pytest.raises(ValueError, match="dequantize_ktiled: (rows|out)"):
        KT.dequantize_ktiled(words, sz, 4, 128, 256, torch.float32, rows=rows, out=out)
