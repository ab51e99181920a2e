"""``kernels/wq_batch1_mma.py`` (Gluon batch-1 W4): refused clearly where it cannot run; its unpacking PTX gives each
field minus the zero (a bit-level model of PRMT / LOP3 run on the module's own asm strings); it builds for sm_90a
offline with every layout conversion free of data movement; on a GPU it equals the fp64 product."""

import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from qwenquant.kernels import wq_batch1_mma as Q  # noqa: E402
from qwenquant.kernels import wq_ktiled as KT  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gluon = pytest.mark.skipif(not Q.GLUON, reason="needs Triton's Gluon")


def _operands(n=64, k=2048, group=128):
    return torch.zeros(n, k // 8, dtype=torch.int32), torch.zeros(k // group, n, dtype=torch.int32)


@pytest.mark.parametrize("bad,match", [
    (dict(bits=2), "bits=2"),
    (dict(group=64), "group=64"),
    (dict(m=9), "got 9"),
    (dict(bn=24), "bn=24"),
    (dict(warps=3), "warps=3"),
    (dict(dtype=torch.float32), "torch.float32"),
    (dict(n=72), "N=72 must be a multiple of bn=16"),
    (dict(warps=16), "warps=16"),
    (dict(k=1024, warps=8), "K=1024 .* 256·warps=2048"),
    (dict(), "needs an sm_90 GPU"),  # every value right, but this is a CPU
])
def test_bad_input_names_the_value(bad, match):
    a = dict(m=1, n=64, k=2048, bits=4, group=128, bn=16, warps=4, dtype=torch.bfloat16) | bad
    words, sz = _operands(n=a["n"], k=a["k"], group=a["group"])
    with pytest.raises(ValueError, match=match):
        Q.batch1_mma_gemm(torch.randn(a["m"], a["k"]).to(a["dtype"]), words, sz, a["bits"], a["group"], bn=a["bn"],
                          warps=a["warps"])


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    return sum(src[(sel >> 4 * j) & 7] << 8 * j for j in range(4))


def _halves(word: int, dtype: torch.dtype) -> list[float]:
    return torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(dtype).float().tolist()


def _run_asm(asm: str, regs: dict[int, int], dtype: torch.dtype, outputs: int = 2) -> list[float]:
    """A model of the three instructions the asm uses, run statement by statement (prmt, lop3 with LUT 0xEA = (a & b)
    | c, add / fma on 16-bit pairs): the values of $0 (and $1), low half first."""
    env = {f"${i}": v for i, v in regs.items()}
    val = lambda t: env[t] if t in env else int(t, 0)  # noqa: E731
    for stmt in asm.strip("{} ").split(";"):
        if not stmt.strip():
            continue
        op, *args = stmt.replace(",", " ").split()
        if op.startswith(".reg"):
            continue
        if op == "prmt.b32":
            env[args[0]] = _prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op == "lop3.b32":
            assert args[4] == "0xEA"
            env[args[0]] = (val(args[1]) & val(args[2])) | val(args[3])
        else:  # add.rn / fma.rn on pairs: every value here is exact, so the rounding mode does not matter
            x = _halves(val(args[1]), dtype)
            if op.startswith("fma"):
                x = [p * q + r for p, q, r in zip(x, _halves(val(args[2]), dtype), _halves(val(args[3]), dtype))]
            else:
                x = [p + r for p, r in zip(x, _halves(val(args[2]), dtype))]
            env[args[0]] = x
    return sum((env[f"${i}"] for i in range(outputs)), [])


def _pair(lo: float, hi: float, dtype: torch.dtype) -> int:
    v = torch.tensor([lo, hi], dtype=dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(v[0]) | int(v[1]) << 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpack_asm_gives_code_minus_zero(dtype):
    """For random words and zeros, both halves of a k-tile: the four values are fields 4H … 4H + 3 minus the zero,
    in that order (the order the K permutation assumes)."""
    if not Q.GLUON:
        pytest.skip("needs Triton's Gluon")
    rng = np.random.default_rng(0)
    for _ in range(64):
        w, z = int(rng.integers(0, 2**32)), int(rng.integers(0, 16))
        fields = [(w >> 4 * t) & 0xF for t in range(8)]
        for h in (0, 1):
            asm = Q._unpack_asm.fn(h, dtype == torch.bfloat16)  # the constexpr function's Python body
            if dtype == torch.bfloat16:
                regs = {2: w, 6: w >> 4, 10: _pair(-(128 + z), -(128 + z), dtype)}
            else:
                regs = {2: w, 6: _pair(1.0, 1 / 16, dtype), 7: _pair(1.0, 1 / 16, dtype),
                        8: _pair(-(1024 + z), -(64 + z), dtype), 9: _pair(-(1024 + z), -(64 + z), dtype)}
            assert _run_asm(asm, regs, dtype) == [f - z for f in fields[4 * h:4 * h + 4]], (hex(w), z, h)
            assert not re.search(r"\$(3|4|5)\b", asm)  # one word per pack of four: the copies are not read


@gluon
@pytest.mark.parametrize("bn,warps,dtype,pairs", [(16, 4, torch.bfloat16, False), (16, 4, torch.float16, False),
                                                  (32, 4, torch.bfloat16, False), (16, 4, torch.bfloat16, True),
                                                  (16, 4, torch.float16, True)])
def test_builds_for_an_h100_with_free_conversions(bn, warps, dtype, pairs):
    """No GPU needed: the build runs every ``assert_trivial`` conversion (words and fields into the MMA operand with
    no data moving between threads); no spills; the default tile holds ≤ 128 registers (four 4-warp programs per SM,
    where ``wq_batch1``'s tiles hold three)."""
    from qwenquant.kernels.launch import ptxas_usage

    use = ptxas_usage(Q.compile_for_sm90(bn, warps, dtype, pairs=pairs))
    assert use["spill_bytes"] == 0, use["report"][-500:]
    if (bn, dtype) == (16, torch.bfloat16):
        assert use["registers"] <= 128, use["registers"]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group", [128, 256])
def test_batch1_mma_matches_reference(group):
    """N = 96, K = 4096 (16 k-tiles: one loop iteration of two steps at 8 warps) and 8192: every offered config, M = 1 / 3 / 8,
    bf16 and fp16, fresh x, results written into NaN-filled tensors, against the fp64 product beside cuBLAS on the
    same Ŵ."""
    from qwenquant.kernels import wq_matmul as K
    from tests.test_kernels import make_layer, rel_err

    if not Q.mma_ok("cuda", 4, group, 1, 96, 4096):
        pytest.skip("needs an sm_90 GPU")
    n = 96
    for k in (4096, 8192):
        layer = make_layer(n, k, 4, group, False, seed=k + group, device="cuda")
        kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, 4, k)
        wref = K.reference_dequantize(layer.qweight, layer.scale, layer.zero, 4, k).double()
        for dtype in (torch.bfloat16, torch.float16):
            for m in (1, 3, 8):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = x.double() @ wref.T
                cublas = rel_err(torch.nn.functional.linear(x, wref.to(dtype)), ref)
                for cfg in Q.CONFIGS:
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    y = Q.batch1_mma_gemm(x, kt.words, kt.sz, 4, group, *cfg, out=out)
                    assert rel_err(y, ref) < 2 * cublas + 1e-4, (k, m, dtype, cfg, rel_err(y, ref))


@pytest.mark.gpu
@cuda
def test_batch1_mma_epilogues_on_the_gpu_qwen3_8b_shapes():
    """``tests/test_batch1_epilogues.check_epilogues`` on this kernel: SiLU·mul, the residual add and the in-kernel
    norm against the unfused math and fp64, gate_up (N = 24576) and o (N = 4096) of Qwen3-8B, M = 1-8, the two first
    config of each scheme (each config × epilogue × M = 1 or not is a compile of its own)."""
    import types

    from tests.test_batch1_epilogues import assert_close_to_unfused, check_epilogues

    if not Q.mma_ok("cuda", 4, 128, 1, 4096, 4096):
        pytest.skip("needs an sm_90 GPU")
    kernels = types.SimpleNamespace(batch1_gemm=Q.batch1_mma_gemm, batch1_silu_mul=Q.batch1_mma_silu_mul,
                                    batch1_add_residual=Q.batch1_mma_add_residual)
    worst = check_epilogues(24576, 4096, 4096, 4, 128, (1, 2, 5, 8), (Q.CONFIGS[0], Q.CONFIGS[2]), torch.bfloat16, "cuda",
                            kernels, lambda bn, warps, pairs: dict(bn=bn, warps=warps, pairs=pairs))
    assert_close_to_unfused(worst, 5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_asm_gives_one_field_of_two_words(dtype):
    """The k_width-2 scheme's PTX (``_pair_asm``): field T of words a and b (shifted by 4 for odd T, with the
    selector of byte T // 2, as the kernel passes them) minus the zero, a's in the low half."""
    if not Q.GLUON:
        pytest.skip("needs Triton's Gluon")
    rng = np.random.default_rng(1)
    magic = 128 if dtype == torch.bfloat16 else 1024
    for _ in range(32):
        a, b, z = int(rng.integers(0, 2**32)), int(rng.integers(0, 2**32)), int(rng.integers(0, 16))
        for t in range(8):
            sh, byte = 4 if t % 2 else 0, t // 2
            sel = byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12
            regs = {1: a >> sh, 2: b >> sh, 3: sel, 4: sel, 5: _pair(-(magic + z), -(magic + z), dtype)}
            got = _run_asm(Q._pair_asm.fn(dtype == torch.bfloat16), regs, dtype, outputs=1)
            assert got == [((a >> 4 * t) & 0xF) - z, ((b >> 4 * t) & 0xF) - z], (hex(a), hex(b), z, t)
