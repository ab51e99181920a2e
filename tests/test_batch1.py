"""The experimental batch-1 kernel ``kernels/wq_batch1.py``: refused clearly where it cannot run; on a GPU equal to the
fp64 product on the exact dequantized weight (the CPU check under Triton's interpreter is in
tests/test_kernels_interpreter.py)."""

import pytest
import torch

pytest.importorskip("triton")  # the GPU kernels' extra
from qwenquant.kernels import wq_batch1 as B  # noqa: E402
from qwenquant.kernels import wq_ktiled as KT  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _operands(n=64, k=512, bits=4, group=128):
    words = torch.zeros(n, k * bits // 32, dtype=torch.int32)
    sz = torch.zeros(k // group, n, dtype=torch.int32)
    return words, sz


@pytest.mark.parametrize("bad,match", [
    (dict(bits=8), "bits=8"),
    (dict(m=17), "got 17"),
    (dict(bn=24), "bn=24"),
    (dict(kb=3), "kb=3"),
    (dict(dtype=torch.float32), "torch.float32"),
    (dict(k=300), "K=300"),
])
def test_bad_input_names_the_value(bad, match):
    args = dict(m=1, k=512, bits=4, bn=16, kb=8, dtype=torch.bfloat16) | bad
    bits, k = args["bits"], args["k"]
    words, sz = _operands(k=k if k % 256 == 0 else 512, bits=bits)
    if k % 256:
        words = torch.zeros(64, k * bits // 32, dtype=torch.int32)
    x = torch.randn(args["m"], k).to(args["dtype"])
    with pytest.raises(ValueError, match=match):
        B.batch1_gemm(x, words, sz, bits, 128, bn=args["bn"], kb=args["kb"])


def test_steps_divide_the_k_tiles():
    assert B.steps_for(4096, 4, 16) == 16  # 16 k-tiles: all in one step
    assert B.steps_for(12288, 4, 16) == 16  # 48 k-tiles: 3 steps
    assert B.steps_for(3072, 4, 16) == 4  # 12 k-tiles: 3 steps of 4
    assert B.steps_for(1024, 2, 8) == 2  # 2-bit k-tiles are 512 columns


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, 32, True), (2, 64, False), (4, None, False)])
def test_batch1_matches_reference(bits, group, sym):
    """N = 200 (a partial last tile), K = 3072 (several steps at kb 2 and 4), M = 1 … 16 across the N = 8 / 16 MMA
    switch, bf16 and fp16, fresh x each time, against the fp64 product beside cuBLAS on the same Ŵ."""
    from qwenquant.kernels import wq_matmul as K
    from tests.test_kernels import make_layer, rel_err

    n, k = 200, 3072
    g = k if group is None else group
    layer = make_layer(n, k, bits, group, sym, seed=bits + k, device="cuda")
    kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, bits, k)
    wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, bits, k).double()
    for dtype in (torch.bfloat16, torch.float16):
        for m in (1, 5, 8, 9, 16):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ wref.T
            cublas = rel_err(torch.nn.functional.linear(x, wref.to(dtype)), ref)
            for bn, kb, warps in ((16, 8, 4), (32, 4, 8), (16, 2, 2)):
                y = B.batch1_gemm(x, kt.words, kt.sz, bits, g, bn=bn, kb=kb, num_warps=warps)
                assert rel_err(y, ref) < 2 * cublas + 1e-4, (bn, kb, warps, m, dtype, rel_err(y, ref), cublas)
