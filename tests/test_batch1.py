"""The batch-1 kernel ``kernels/wq_batch1.py``: refused clearly where it cannot run; on a GPU equal to the
fp64 product on the exact dequantized weight (the CPU check under Triton's interpreter is in
tests/test_kernels_interpreter.py)."""

import pytest
import torch

pytest.importorskip("triton")  # the GPU kernels' extra
from qwenquant.kernels import wq_batch1 as B  # noqa: E402
from qwenquant.kernels import wq_ktiled as KT  # noqa: E402
from qwenquant.runtime import fused  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _operands(n=64, k=512, bits=4, group=128):
    words = torch.zeros(n, k * bits // 32, dtype=torch.int32)
    sz = torch.zeros(k // group, n, dtype=torch.int32)
    return words, sz


@pytest.mark.parametrize("bad,match", [
    (dict(bits=8), "bits=8"),
    (dict(m=17), "got 17"),
    (dict(bn=24), "bn=24"),
    (dict(bn=48), "bn=48"),
    (dict(kb=3), "kb=3"),
    (dict(split_k=0), "split_k=0"),
    (dict(persist=-1), "persist=-1"),
    (dict(persist=2, split_k=2), "persist=2 with split_k=2"),
    (dict(dtype=torch.float32), "torch.float32"),
    (dict(k=300), "K=300"),
])
def test_bad_input_names_the_value(bad, match):
    args = dict(m=1, k=512, bits=4, bn=16, kb=8, split_k=1, persist=0, dtype=torch.bfloat16) | bad
    bits, k = args["bits"], args["k"]
    words, sz = _operands(k=k if k % 256 == 0 else 512, bits=bits)
    if k % 256:
        words = torch.zeros(64, k * bits // 32, dtype=torch.int32)
    x = torch.randn(args["m"], k).to(args["dtype"])
    with pytest.raises(ValueError, match=match):
        B.batch1_gemm(x, words, sz, bits, 128, bn=args["bn"], kb=args["kb"], split_k=args["split_k"],
                      persist=args["persist"])


def test_steps_divide_the_k_tiles():
    assert B.steps_for(4096, 4, 16) == (16, 16, 1)  # 16 k-tiles: all in one step
    assert B.steps_for(12288, 4, 16) == (16, 48, 1)  # 48 k-tiles: 3 steps
    assert B.steps_for(3072, 4, 16) == (4, 12, 1)  # 12 k-tiles: 3 steps of 4
    assert B.steps_for(1024, 2, 8) == (2, 2, 1)  # 2-bit k-tiles are 512 columns
    assert B.steps_for(4096, 4, 16, split_k=2) == (8, 8, 2)  # two splits of 8 k-tiles
    assert B.steps_for(12288, 4, 8, split_k=5) == (2, 10, 5)  # 48 k-tiles: 4 splits of 10 and one of 8
    assert B.steps_for(3072, 4, 8, split_k=5) == (1, 3, 4)  # 12 k-tiles: 5 splits would leave one empty: 4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, 32, True), (2, 64, False), (4, None, False)])
def test_batch1_matches_reference(bits, group, sym):
    """N = 200 (a partial last tile), M = 1 / 9 / 16 across the N = 8 / 16 MMA switch, against the fp64 product beside
    cuBLAS on the same Ŵ, results written into NaN-filled tensors. K = 4096 (16 k-tiles: kb 8 and 16 as asked) runs
    every tile shape in bf16: 1-4 stages (the tuner's 3- and 4-stage tiles among them), split-K 2 and 5 (uneven shares),
    a persistent tile (13 row blocks over fewer programs only on a GPU of < 13 SMs: this checks its launch; the walk
    over several blocks is checked under the interpreter and on the 8B shapes in test_batch1_epilogues); K = 3072 (12 k-tiles: kb lowered to 4,
    several steps) and fp16 run the default tile and split-K 5. Fresh x each time. (Trimmed from a 140-launch grid
    per format that compiled for over 4 minutes on the H100 machine.)"""
    from qwenquant.kernels import wq_matmul as K
    from tests.test_kernels import make_layer, rel_err

    n = 200
    every = ((16, 8, 4, 1, 1), (32, 4, 8, 1, 1), (16, 2, 2, 1, 1), (16, 16, 8, 1, 1), (16, 4, 4, 2, 1), (16, 8, 4, 1, 2),
             (16, 4, 2, 3, 1), (32, 4, 4, 4, 1), (16, 4, 4, 1, 5), (16, 4, 4, 3, -1))  # split -1: persistent, 1 per SM
    default_and_sk5 = (every[0], (16, 4, 4, 1, 5))
    for k, dtype, tiles, ms in ((4096, torch.bfloat16, every, (1, 9, 16)), (3072, torch.bfloat16, default_and_sk5, (1, 16)),
                                (4096, torch.float16, default_and_sk5, (1, 16))):
        g = k if group is None else group
        layer = make_layer(n, k, bits, group, sym, seed=bits + k, device="cuda")
        kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
        wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k).double()
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ wref.T
            cublas = rel_err(torch.nn.functional.linear(x, wref.to(dtype)), ref)
            for bn, kb, warps, stages, sk in tiles:
                if stages >= 4 and m > 8:  # x padded to 16 rows: 2-bit's 4-stage ring needs 258 KB (tuner: M <= 8)
                    continue
                # a NaN-filled result: a row the kernel does not store fails instead of passing on a stale block
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                y = B.batch1_gemm(x, kt.words, kt.sz, bits, g, bn=bn, kb=kb, num_warps=warps, num_stages=stages,
                                  split_k=max(sk, 1), persist=max(-sk, 0), out=out)
                assert rel_err(y, ref) < 2 * cublas + 1e-4, (k, bn, kb, warps, stages, sk, m, dtype, rel_err(y, ref),
                                                             cublas)
        # split-K leaves its workspace and counters zeroed for the next call
        ws, cnt = KT.split_k_workspace(torch.device("cuda"), 1, 1)
        assert not ws.any() and not cnt.any()


def test_wrong_words_and_out_are_refused():
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    words2, sz = _operands(bits=2)  # 2-bit words passed as 4-bit: would read past the end on a GPU
    with pytest.raises(ValueError, match="not 4-bit k-tiled words"):
        B.batch1_gemm(x, words2, sz, 4, 128)
    with pytest.raises(ValueError, match=r"takes x as \[M, K\]"):
        B.batch1_gemm(torch.randn(512, dtype=torch.bfloat16), *_operands(), 4, 128)
    words, sz = _operands()
    with pytest.raises(ValueError, match="batch1_gemm: out"):
        B.batch1_gemm(x, words, sz, 4, 128, out=torch.empty(2, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("tile", range(4))
def test_tuner_tiles_build_for_an_h100_without_spills(tile):
    """No GPU needed: each batch-1 tile the tuner offers compiles to sm_90a with no spills, at most 168 registers per
    thread (three 4-warp programs' worth of an SM's 64 K registers) and the shared memory an SM has."""
    from qwenquant.kernels.launch import ptxas_usage
    from qwenquant.runtime import fused

    bn, kb, warps, stages, sk = fused.BATCH1[tile]
    use = ptxas_usage(B.compile_for_sm90(bn, kb, warps, stages, sk))
    assert use["spill_bytes"] == 0 and use["registers"] <= 168 and use["shared_bytes"] <= 227 * 1024, \
        {k: v for k, v in use.items() if k != "report"}


@pytest.mark.parametrize("tile", range(len(fused.BATCH1_PERSISTENT)))
def test_persistent_tiles_build_for_an_h100_at_their_programs_per_sm(tile):
    """No GPU needed: each persistent batch-1 tile (``fused.BATCH1_PERSISTENT``), plain and in every epilogue variant
    the decode step runs, compiles to sm_90a without spills, and its programs per SM fit an H100 SM's 64 K registers
    and 227 KB of shared memory — else the grid would hold programs that wait for a slot. (The SiLU·mul variant holds
    240-255 registers in the flattened loop, the normed one up to 243: two 4-warp programs per SM; the tuner may still
    time the 3-per-SM tile on them, whose third program then waits for a slot.)"""
    from qwenquant.kernels.launch import ptxas_usage
    from qwenquant.runtime import fused

    bn, kb, warps, stages, per_sm = fused.BATCH1_PERSISTENT[tile]
    for epi, slots in ((0, 0), (0, 256), (B.SILU_MUL, 256), (B.ADD_RESIDUAL, 0)):
        use = ptxas_usage(B.compile_for_sm90(bn, kb, warps, stages, epi=epi, norm_slots=slots, persist=True))
        regs_per_program = -(-use["registers"] // 8) * 8 * 32 * warps  # allocated in units of 8 per thread
        fits = min(65536 // regs_per_program, 227 * 1024 // max(use["shared_bytes"], 1))
        assert use["spill_bytes"] == 0, (epi, use["spill_bytes"])
        if slots == 0 or per_sm <= 2:  # the 3-per-SM tile is for the plain and add-residual kernels
            assert fits >= per_sm, (epi, use["registers"], use["shared_bytes"], fits, per_sm)
