"""The warp-specialized wgmma GEMM (``kernels/wq_wgmma_ws.py``, experimental): offline build checks here, reference
checks on a Hopper GPU (``-m gpu``)."""

import re

import pytest
import torch

from qwenquant.kernels import wq_wgmma as W
from qwenquant.kernels import wq_wgmma_ws as WS
from qwenquant.runtime import fused

hopper = pytest.mark.skipif(not (torch.cuda.is_available() and fused.wgmma_available()), reason="needs an sm_90 GPU")


@pytest.mark.parametrize("bad", [dict(bits=3), dict(bm=96), dict(stages=1), dict(sps=3), dict(stages=6, sps=4),
                                 dict(programs_per_sm=2)])
def test_bad_tile_names_the_value(bad):
    args = dict(bits=4, bm=256, stages=3, sps=2, programs_per_sm=0) | bad
    with pytest.raises(ValueError, match="wgmma_ws_gemm: bits="):
        WS.check_config(**args)


@pytest.mark.skipif(not W.GLUON, reason="this Triton has no Gluon")
@pytest.mark.parametrize("bits,group,cfg", [(4, 128, 0), (8, 4096, 1), (2, 64, 2), (4, 64, 3)])
def test_builds_for_an_h100_here_with_one_wgmma_left_in_flight(bits, group, cfg):
    """No GPU needed: the kernel compiles to sm_90a, the PTX waits with one wgmma still in flight, and ptxas keeps
    it that way — no "wgmma … serialized" (C75xx) report, which is what the layouts that did not work got (two
    4-warp consumer partitions: serialized for registers, or for accumulator definitions inside the pipeline).
    Each x stage expects the bytes of its one 3-D copy, each word slot the bytes of its [128, 32] box."""
    from qwenquant.kernels.launch import ptxas_usage

    config = WS.CONFIGS[cfg]
    c = WS.compile_for_sm90(bits, group, config)
    ptx = c.asm["ptx"]
    assert set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)) == {"0", "1"}
    assert ptx.count("wgmma.mma_async") == 2 * (32 // bits)
    bm, stages, sps, _ = config
    expects = {int(b) for b in re.findall(r"expect_tx\S*\s[^;]*?(\d+);", ptx)}
    assert expects == {sps * bm * 32 * 2, WS.BN * 32 * 4}, expects
    assert set(re.findall(r"cp\.async\.bulk\.tensor\.(\d)d", ptx)) == {"2", "3"}  # words 2-D, x stages 3-D
    use = ptxas_usage(c)
    report = use["report"]
    assert "serialized" not in report, [line for line in report.splitlines() if "C75" in line]
    assert use["spill_bytes"] == 0
    assert c.metadata.shared <= WS.SMEM_BYTES


def _case(n, k, bits, group, sym, seed):
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_matmul as K
    from tests.test_kernels import make_layer

    layer = make_layer(n, k, bits, group, sym, seed=seed, device="cuda")
    kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k)
    return kt, wref


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, 32, True), (8, None, True), (2, 64, False)])
def test_ws_matches_reference(bits, group, sym):
    """Every offered tile against the fp64 product on the exact dequantized weight, beside cuBLAS on the same Ŵ:
    N = 200 (a partial 128-row tile: its words arrive zero-filled), M below bm and across tails, fresh x each
    time, results written into NaN-filled tensors."""
    from tests.test_kernels import rel_err

    n, k = 200, 1024
    g = k if group is None else group
    kt, wref = _case(n, k, bits, group, sym, seed=bits + k)
    wref = wref.double()
    for dtype in (torch.bfloat16, torch.float16) if (bits, group) == (4, 128) else (torch.bfloat16, ):
        for m in (2, 130, 300):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ wref.T
            cublas = rel_err(torch.nn.functional.linear(x, wref.to(dtype)), ref)
            for cfg in WS.CONFIGS:
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                y = WS.wgmma_ws_gemm(x, kt.words, kt.sz, bits, g, *cfg, out=out)
                assert rel_err(y, ref) < 2 * cublas + 1e-4, (cfg, m, dtype, rel_err(y, ref), cublas)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 64), (2, 64)])
def test_ws_reads_every_weight_exactly(bits, group):
    """One 1 per row of x picks one column of Ŵ per output: y equals Ŵ rounded to bf16 bit for bit — every word
    slot, x slot and stage, K of one k-tile and of several."""
    from qwenquant.kernels import wq_ktiled as KT

    for k in (KT.tile_columns(bits), 2048):
        n, m = 136, 300
        kt, wref = _case(n, k, bits, group, False, seed=k + bits)
        w = wref.to(torch.bfloat16)
        cols = torch.randint(0, k, (m, ), generator=torch.Generator().manual_seed(k)).cuda()
        x = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
        x[torch.arange(m, device="cuda"), cols] = 1
        for cfg in WS.CONFIGS:
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            y = WS.wgmma_ws_gemm(x, kt.words, kt.sz, bits, group, *cfg, out=out)
            assert torch.equal(y, w[:, cols].T), (k, cfg)


def test_persistent_grid_is_refused_without_persistence():
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="programs=3 sets the persistent grid"):
        WS.wgmma_ws_gemm(x, torch.zeros(128, 32, dtype=torch.int32), torch.zeros(2, 128, dtype=torch.int32), 4, 128,
                         programs=3)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 64)])
def test_ws_persistent_walks_many_tiles(bits, group):
    """Persistent grids smaller than the tile count, so each program walks several tiles and its rings and mbarrier
    phases run on across them: 1, 4 and 5 programs over 3 × 3 = 9 tiles (partial weight- and x-row tiles), K of one
    k-tile and of several (ring slots wrap mid-tile), the grouped raster with a partial last group (2 of 3 x-row
    tiles per group; 8: one group) and x-row tiles fastest (the default). Against the fp64 product, into NaN-filled outputs."""
    from qwenquant.kernels import wq_ktiled as KT
    from tests.test_kernels import rel_err

    n, m = 328, 600
    for k in (KT.tile_columns(bits), 2304 if bits == 4 else 1536):
        kt, wref = _case(n, k, bits, group, False, seed=k + bits + 1)
        wref = wref.double()
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ wref.T
        cublas = rel_err(torch.nn.functional.linear(x, wref.to(torch.bfloat16)), ref)
        for cfg in (c for c in WS.CONFIGS if c[3]):
            for programs in (1, 4, 5):
                for group_m in (None, 2, 8):
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                    y = WS.wgmma_ws_gemm(x, kt.words, kt.sz, bits, group, *cfg, out=out, programs=programs,
                                         group_m=group_m)
                    err = rel_err(y, ref)
                    assert err < 2 * cublas + 1e-4, (k, cfg, programs, group_m, err, cublas)
