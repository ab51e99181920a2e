"""The Hopper GEMM of ``kernels/wq_wgmma.py`` (Gluon): refused clearly where it cannot run; on an H100 equal to the
plain-torch reference on fresh random inputs (every config, bit width 2/4/8, tails of every tile, bf16 and fp16)."""

import pytest
import torch

pytest.importorskip("triton")  # the GPU kernels' extra; without it the CPU install has no fused path at all
from qwenquant.kernels import wq_wgmma as W  # noqa: E402
from qwenquant.kernels import wq_wgmma_ws as WS  # noqa: E402
from qwenquant.runtime import fused  # noqa: E402

hopper = pytest.mark.skipif(not (torch.cuda.is_available() and fused.wgmma_available()), reason="needs an sm_90 GPU")


def test_every_offered_config_is_buildable_for_every_width():
    for bits in (2, 4, 8):
        for cfg in W.CONFIGS:
            W.check_config(bits, *cfg)


@pytest.mark.parametrize("bad", [dict(bits=3), dict(bn=96), dict(num_warps=2, bn=32), dict(bm=512), dict(stages=1),
                                 dict(sps=3), dict(stages=8, sps=8), dict(streamk=-1)])
def test_bad_tile_names_the_value(bad):
    args = dict(bits=4, bn=128, bm=256, num_warps=8, stages=4, sps=2) | bad
    with pytest.raises(ValueError, match="wgmma_gemm: bits="):
        W.check_config(**args)


def test_offered_only_where_the_device_runs_it():
    assert not W.runs_on(torch.device("cpu")) and not W.wgmma_ok("cpu", 4, 128, 4096, 4096)
    for m in (128, 1024):
        assert not any(kind in ("wgmma", "wgmma_ws") for kind, _ in fused._ktiled_configs(m, 4).values())
        offered = [cfg for kind, cfg in fused._configs(m, 4096, 128, 4, ktiled=True, wgmma=True).values() if kind == "wgmma"]
        assert offered == list(W.CONFIGS)
        offered_ws = [cfg for kind, cfg in fused._configs(m, 4096, 128, 4, ktiled=True, wgmma=True).values()
                      if kind == "wgmma_ws"]
        assert offered_ws == (list(WS.CONFIGS) if fused.OFFER_WGMMA_WS else [])
    # small M keeps the split-K / GEMV tiles only
    assert not any(kind in ("wgmma", "wgmma_ws") for kind, _ in fused._configs(64, 4096, 128, 4, ktiled=True, wgmma=True).values())


@pytest.mark.parametrize("streamk,programs", [(0, 4), (1, 0), (1, -2)])
def test_programs_only_sets_a_stream_k_grid(streamk, programs):
    x = torch.randn(256, 1024, dtype=torch.bfloat16)
    words = torch.zeros(64, 128, dtype=torch.int32)
    sz = torch.zeros(8, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"programs={programs} sets the stream-K grid"):
        W.wgmma_gemm(x, words, sz, 4, 128, 128, 256, 8, 4, 2, streamk, programs=programs)


def _nan_out(m, n, dtype):
    """A result tensor full of NaN: an output tile the kernel does not write fails the comparison instead of passing
    on whatever a reused allocation held (an earlier, correct result)."""
    return torch.full((m, n), float("nan"), device="cuda", dtype=dtype)


def test_not_run_without_a_hopper_gpu():
    if fused.wgmma_available():
        pytest.skip("this machine has a Hopper GPU")
    x = torch.randn(256, 1024, dtype=torch.bfloat16)
    words = torch.zeros(64, 128, dtype=torch.int32)
    sz = torch.zeros(8, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="sm_90 GPU.*ktiled_gemm or dequant"):
        W.wgmma_gemm(x, words, sz, 4, 128)


@pytest.mark.skipif(not W.GLUON, reason="this Triton has no Gluon")
@pytest.mark.parametrize("cfg", [0, 1, 6])
def test_each_stage_expects_the_bytes_its_copies_bring(cfg):
    """A ring stage's mbarrier completes only when the bytes it was told to expect have landed: with the 3-D x
    descriptor one copy brings the whole stage, with the 2-D one each of SPS copies brings a slice. An expect that
    counts more than the copies bring waits forever (a hang, not a wrong result: the first 3-D build expected SPS
    stages' bytes). Checked in the PTX for both descriptors, no GPU needed."""
    import re

    bn, bm, warps, stages, sps, streamk = W.CONFIGS[cfg]
    stage_bytes = sps * bm * 32 * 2  # bf16 x
    for x3d, box_bytes, copies_per_stage in ((False, bm * 32 * 2, sps), (True, stage_bytes, 1)):
        ptx = W.compile_for_sm90(4, 128, W.CONFIGS[cfg], x3d=x3d).asm["ptx"]
        assert {int(b) for b in re.findall(r"expect_tx\S*\s[^;]*?(\d+);", ptx)} == {stage_bytes}, (x3d, cfg)
        dims = set(re.findall(r"cp\.async\.bulk\.tensor\.(\d)d", ptx))
        assert dims == {"3" if x3d else "2"}, (x3d, dims)
        assert box_bytes * copies_per_stage == stage_bytes


@pytest.mark.skipif(not W.GLUON, reason="this Triton has no Gluon")
@pytest.mark.parametrize("bits,group,cfg", [(4, 128, 0), (4, 32, 4), (8, 4096, 4), (2, 64, 1), (4, 128, 6), (8, 128, 7)])
def test_kernel_builds_for_an_h100_here_with_the_wgmma_left_in_flight(bits, group, cfg):
    """No GPU needed: Triton's wheel compiles the Gluon kernel to sm_90a (ptxas included). The PTX must issue
    wgmma asynchronously and wait with one still in flight (the overlap the kernel exists for), the x ring
    must fit the shared memory the tile rules allow, the field extraction must be the one-LOP3 form, and the
    stream-K variant must meet its partial tiles through fp32 atomics."""
    import re

    config = W.CONFIGS[cfg]
    c = W.compile_for_sm90(bits, group, config)
    ptx = c.asm["ptx"]
    streamk = config[5] > 0
    # the K loop unrolls one k-tile: 32/bits slices of 32 columns, each two k16 wgmma instructions (stream-K: a
    # copy for its whole tiles and one for its spans)
    assert ptx.count("wgmma.mma_async") == 2 * (32 // bits) * (2 if streamk else 1)
    assert ptx.count("lop3.b32") >= 32 // bits and "0xEA" in ptx
    assert ("red.global" in ptx or "atom.global" in ptx) == streamk
    waits = set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))
    assert waits == {"0", "1"}, waits  # 1: the previous slice's wgmma retired, this one still running; 0: the end
    bn, bm, _, stages, sps, _ = config
    assert stages * sps * bm * 64 <= c.metadata.shared <= 227 * 1024
    # an x slot is refilled only after a CTA barrier that follows the wait: wait(1) retires this warpgroup's
    # wgmmas only, and the other warpgroup may still be reading the slot
    waited = barrier = False
    refills = 0
    for line in ptx.splitlines():
        if "wgmma.wait_group.sync.aligned 1" in line:
            waited, barrier = True, False
        elif "bar.sync" in line or "barrier.sync" in line:
            barrier = True
        elif "cp.async.bulk.tensor" in line and waited:
            refills += 1
            assert barrier, "a TMA refill without a CTA barrier after the wgmma wait"
    assert refills >= (32 // bits) // sps  # at least each stage of one k-tile: one 3-D copy per stage


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, 32, True), (4, None, False), (8, None, True),
                                            (8, 128, False), (2, 64, False)])
def test_wgmma_matches_reference(bits, group, sym):
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_matmul as K
    from tests.test_kernels import make_layer, rel_err

    n, k = 200, 1024  # N not a multiple of either tile height
    layer = make_layer(n, k, bits, group, sym, seed=bits + k, device="cuda")
    g = k if group is None else group
    kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k).double()
    # every config on the common format; two (bm 256 and bm 128) on the others: each (format, config, dtype) is a compile
    configs = W.CONFIGS if (bits, group) == (4, 128) else (W.CONFIGS[0], W.CONFIGS[4])
    for dtype in (torch.bfloat16, torch.float16) if bits == 4 and group in (128, 32) else (torch.bfloat16, ):
        for m in (2, 130, 300):  # below every bm (padded), and tails of bm = 128 and 256
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ wref.T
            cublas = rel_err(torch.nn.functional.linear(x, wref.to(dtype)), ref)
            for cfg in configs:
                y = W.wgmma_gemm(x, kt.words, kt.sz, bits, g, *cfg, out=_nan_out(m, n, dtype))
                assert y.shape == (m, n) and y.dtype == dtype
                # the same exact Ŵ as cuBLAS gets; only the fp32 summation order differs
                assert rel_err(y, ref) < 2 * cublas + 1e-4, (cfg, m, dtype, rel_err(y, ref), cublas)
            # the field extraction in plain Gluon (two LOP3s; benchmarks compare it) computes the same
            y = W.wgmma_gemm(x, kt.words, kt.sz, bits, g, *W.CONFIGS[1], lop3=False, out=_nan_out(m, n, dtype))
            assert rel_err(y, ref) < 2 * cublas + 1e-4, ("two-LOP3", m, dtype, rel_err(y, ref), cublas)
            # SPS 2-D TMA copies per stage (the comparison path; the default is one 3-D copy) land the same slices
            for cfg in (W.CONFIGS[0], W.CONFIGS[1], W.CONFIGS[6]):
                y = W.wgmma_gemm(x, kt.words, kt.sz, bits, g, *cfg, x3d=False, out=_nan_out(m, n, dtype))
                assert rel_err(y, ref) < 2 * cublas + 1e-4, ("2-D copies", cfg, m, dtype, rel_err(y, ref), cublas)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 64), (2, 128)])
def test_wgmma_stream_k_schedule_matches_reference(bits, group):
    """The hybrid stream-K schedule: 16 tiles of 8 k-tiles on 3, 5 and 7 programs (12 / 10 / 7 whole tiles first,
    then 2 / 4 / 6 tiles split between two programs) and on the default grid (an H100's 132 SMs > 128 units: one
    k-tile per program, every tile met from 8 spans). Each call writes into a NaN-filled result, gets a fresh x,
    and must leave the workspace and the tile counters zeroed for the next call."""
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_matmul as K
    from tests.test_kernels import make_layer, rel_err

    n, m = 1000, 300  # 8 row tiles of 128 (the last partial) × 2 tiles of 256 x rows (the last partial)
    k = 8 * KT.tile_columns(bits)
    layer = make_layer(n, k, bits, group, False, seed=bits + 7, device="cuda")
    kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k).double()
    for programs in (3, 5, 7, None):
        for x3d in (False, True):  # twice (the second call must find the workspace zeroed), 2-D then 3-D x copies
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ wref.T
            cublas = rel_err(torch.nn.functional.linear(x, wref.to(torch.bfloat16)), ref)
            y = W.wgmma_gemm(x, kt.words, kt.sz, bits, group, 128, 256, 8, 4, 2, 1, programs=programs,
                             out=_nan_out(m, n, torch.bfloat16), x3d=x3d)
            assert rel_err(y, ref) < 2 * cublas + 1e-4, (programs, x3d, rel_err(y, ref), cublas)
            ws, cnt = KT.split_k_workspace(x.device, 0, 0)
            assert not ws.any() and not cnt.any(), programs


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 64), (2, 64)])
def test_wgmma_reads_every_weight_exactly(bits, group):
    """x with one 1 per row picks one column of Ŵ per output row: the fp32 sum is exact, so y equals Ŵ rounded to
    bf16 bit for bit — the dequantization, every x slot / stage and the stores, with no tolerance. K is a single
    k-tile (fewer stages than the ring preloads) and a longer one."""
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_matmul as K
    from tests.test_kernels import make_layer

    for k in (KT.tile_columns(bits), 2048):
        n = 136
        layer = make_layer(n, k, bits, group, False, seed=k + bits, device="cuda")
        kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
        w = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k).to(torch.bfloat16)  # [N, K]
        m = 300
        cols = torch.randint(0, k, (m,), generator=torch.Generator().manual_seed(k)).cuda()
        x = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
        x[torch.arange(m, device="cuda"), cols] = 1
        for cfg in W.CONFIGS:
            for x3d in (False, True):
                y = W.wgmma_gemm(x, kt.words, kt.sz, bits, group, *cfg, x3d=x3d, out=_nan_out(m, n, torch.bfloat16))
                assert torch.equal(y, w[:, cols].T), (k, cfg, x3d)
        for programs in (3, 5):  # stream-K spans inside tiles: one nonzero term per output, so still exact
            y = W.wgmma_gemm(x, kt.words, kt.sz, bits, group, 128, 256, 8, 4, 2, 1, programs=programs,
                             out=_nan_out(m, n, torch.bfloat16))
            assert torch.equal(y, w[:, cols].T), (k, programs)


def test_ws_switch_is_checked_and_turns_the_tiles_off(monkeypatch):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import qwenquant.runtime.fused"], capture_output=True, text=True,
                         env={**__import__("os").environ, "QWENQUANT_WGMMA_WS": "yes"})
    assert run.returncode != 0 and "QWENQUANT_WGMMA_WS='yes'" in run.stderr
    monkeypatch.setattr(fused, "OFFER_WGMMA_WS", False)
    fused._configs.cache_clear()  # the config lists are cached per shape
    try:
        kinds = {kind for kind, _ in fused._configs(1024, 4096, 128, 4, ktiled=True, wgmma=True).values()}
    finally:
        fused._configs.cache_clear()
    assert "wgmma" in kinds and "wgmma_ws" not in kinds
