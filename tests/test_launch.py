"""``kernels/launch.py``: the cached launch stands in for Triton's JIT launch only where the kernel it reuses is the one
Triton would pick. CPU: the cache key refines Triton's own specialization over a table of arguments, and the
signature tail (constexprs, defaults) comes out in order. GPU: every W4 kernel gives bitwise the same output
through a cache hit as through Triton's launch, across the specializations an eager model meets (M = 1, 16, 17,
2048; an x view off 16-byte alignment)."""

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")  # the GPU kernels' extra
import triton.language as tl  # noqa: E402

from qwenquant.kernels import launch as L  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _triton_spec(arg):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    return native_specialize_impl(CUDABackend, arg, False, True, True)


def _args():
    base = torch.empty(4096, dtype=torch.float16)
    out = [0, 1, 2, 15, 16, 17, 32, 48, 2048, 2**31 - 16, 2**31 - 1, 2**31, 2**40, 2**63 - 16, 2**63, -1, -16, -2**31 - 16,
           True, False, None, 0.5, 2.0]
    out += [base, base[8:], base[1:], base[3:], base.view(torch.bfloat16), base.view(torch.bfloat16)[5:],
            torch.empty(64, dtype=torch.int32), torch.empty(64, dtype=torch.int32)[1:], torch.empty(64, dtype=torch.int8)]
    from triton.tools.tensor_descriptor import TensorDescriptor  # the Triton (not Gluon) host descriptor: w8a8's TMA GEMM

    q = torch.empty(256, 512, dtype=torch.int8)
    out += [TensorDescriptor.from_tensor(q, [128, 64]), TensorDescriptor.from_tensor(q, [64, 64]),
            TensorDescriptor.from_tensor(q[:100], [128, 64])]
    try:
        from qwenquant.kernels import wq_wgmma as W
    except ImportError:  # pragma: no cover
        return out
    if W.GLUON:
        x = torch.empty(512, 4096, dtype=torch.bfloat16)
        out += [W._x_descriptor(x, 256, 2), W._x_descriptor(x[:300], 256, 2), W._x_descriptor(x, 128, 2),
                W._x_descriptor(x, 256, 0), W._x_descriptor(x.half(), 256, 2), W._x_descriptor(x, 256, 4)]
    return out


def test_key_refines_tritons_specialization():
    """Two arguments with one key always get one specialization from Triton — else a cached kernel compiled for the
    first (say M divisible by 16) would run the second. Checked pairwise over ints near the 16 / 1 / int32 edges,
    bools, None, floats, tensors at aligned and unaligned offsets, and TMA descriptors of several boxes."""
    args = _args()
    keys = [L.spec_key(a) for a in args]
    specs = [_triton_spec(a) for a in args]
    for (ka, sa, a), (kb, sb, b) in itertools.combinations(zip(keys, specs, args), 2):
        if ka == kb:
            assert sa == sb, (a, b, ka, sa, sb)
    # and the key is not trivially coarse: M = 16 and M = 17 differ, as do aligned and unaligned bases
    assert L.spec_key(16) != L.spec_key(17) and L.spec_key(1) != L.spec_key(2)
    t = torch.empty(64, dtype=torch.float16)
    assert L.spec_key(t) != L.spec_key(t[1:]) and L.spec_key(t) != L.spec_key(t.view(torch.bfloat16))


def test_unknown_argument_types_are_unkeyable():
    with pytest.raises(L.Unkeyable, match="str"):
        L.spec_key("a string")


@triton.jit
def _toy_kernel(x_ptr, n, A: tl.constexpr, B: tl.constexpr = 3, C: tl.constexpr = None):
    pass


def test_tail_lists_constexprs_and_defaults_in_signature_order():
    assert L._tail(_toy_kernel, 2, {"A": 7}) == (7, 3, None)
    assert L._tail(_toy_kernel, 2, {"C": 1, "A": 2, "num_warps": 4}) == (2, 3, 1)  # options are not parameters
    with pytest.raises(TypeError, match="'A'"):
        L._tail(_toy_kernel, 2, {})


@pytest.mark.gpu
@cuda
def test_cached_launch_matches_tritons_launch():
    """Each W4 kernel the fused mode runs, called twice through ``launch_kernel`` (a miss, then a hit on the cached
    compiled kernel) and once through Triton's own launch (ENABLED off): the three outputs are bitwise equal, and the
    hits add no compiled kernel. Fresh random x per M; M = 1, 16, 17 and 2048 (different specializations of M) and an
    x view at a 2-byte offset (an unaligned base: its own key). Split- and stream-K add partial sums in arrival
    order: those are compared within bf16 rounding."""
    from qwenquant.kernels import wq_batch1 as B
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_wgmma as W
    from qwenquant.kernels import wq_wgmma_ws as WS
    from tests.test_kernels import make_layer

    n, k = 384, 4096
    layer = make_layer(n, k, 4, 128, False, seed=5, device="cuda")
    kt = KT.KTiledWeight.from_checkpoint(layer.qweight, layer.scale, layer.zero, 4, k)
    calls = {
        "ktiled": lambda x: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, 16, 64, True, 1, 4, 3, True),
        "ktiled split-K": lambda x: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, 16, 64, True, 4, 4, 3, True),
        "ktiled stream-K": lambda x: KT.ktiled_gemm(x, kt.words, kt.sz, 4, 128, 16, 64, True, 1, 4, 3, True, 2),
    }
    calls["ktiled gemv"] = lambda x: KT.ktiled_gemv(x, kt.words, kt.sz, 4, 128) if x.shape[0] == 1 else None
    calls["batch1"] = lambda x: B.batch1_gemm(x, kt.words, kt.sz, 4, 128) if x.shape[0] <= 16 else None
    if W.runs_on("cuda"):
        calls["wgmma"] = lambda x: W.wgmma_gemm(x, kt.words, kt.sz, 4, 128)
        calls["wgmma stream-K"] = lambda x: W.wgmma_gemm(x, kt.words, kt.sz, 4, 128, streamk=1)
        calls["wgmma_ws"] = lambda x: WS.wgmma_ws_gemm(x, kt.words, kt.sz, 4, 128)
        calls["wgmma_ws persistent"] = lambda x: WS.wgmma_ws_gemm(x, kt.words, kt.sz, 4, 128, programs_per_sm=1)
    for m in (1, 16, 17, 2048, "unaligned"):
        if m == "unaligned":
            x = torch.randn(33 * k + 1, device="cuda", dtype=torch.bfloat16)[1:].view(33, k)
        else:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for name, call in calls.items():
            first = call(x)
            if first is None:
                continue
            before = L.cached_kernels()
            hit = call(x)
            assert L.cached_kernels() == before, name
            L.ENABLED = False
            try:
                jit = call(x)
            finally:
                L.ENABLED = True
            torch.cuda.synchronize()
            if "split" in name or "stream" in name:  # partial sums meet in arrival order: equal up to rounding
                for y in (hit, jit):
                    torch.testing.assert_close(y, first, rtol=1e-2, atol=1e-2, msg=f"{name} M={m}")
            else:
                assert torch.equal(first, hit) and torch.equal(first, jit), (name, m)
