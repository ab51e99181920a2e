"""The Triton kernels on a CPU, under Triton's interpreter (``TRITON_INTERPRET=1``), against the
plain-torch reference: the same kernel source the GPU compiles, run as numpy, small shapes.

Runs in a subprocess because the interpreter must be switched on before the kernels are defined
(another test may already have imported them for the GPU path). Activations are fp16: the
interpreter's ``tl.dot`` mis-handles bf16 operands (numpy has no bf16; Triton 3.6 returns values
~1e9 off), which says nothing about the compiled kernel — the GPU tests cover bf16. The k-tiled
kernel's inline PTX (LOP3, and the PRMT/LOP3/HFMA2 block of its scale-after variant) cannot run here:
the interpreter takes the plain-integer branches that compute the same values, so this checks the
tiling, grouping and split-K logic; the PTX is checked by the GPU tests (tests/test_kernels.py -m gpu).
Skips where Triton is not installed (it is in the ``dev`` extra).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")

SCRIPT = textwrap.dedent(
    """
    import json, torch
    from qwenquant.kernels import wq_batch1 as B
    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.kernels import wq_matmul as K
    from qwenquant.numerics.affine import QuantSpec, affine_to_tensors, quantize_weight

    torch.manual_seed(0)
    worst = {}

    def note(name, y, ref):
        e = float((y.double() - ref.double()).norm() / ref.double().norm())
        worst[name] = max(worst.get(name, 0.0), e)

    # (4, 512) with K = 1024: a group spanning two 256-column tiles
    for bits, group, sym, k in [(4, 64, False, 512), (4, 32, True, 512), (8, None, True, 512), (2, 128, False, 512),
                                (4, 512, False, 1024)]:
        n = 64
        g = k if group is None else group
        t = affine_to_tensors(quantize_weight(torch.randn(n, k), QuantSpec(bits, group, sym)))
        qw, s, z = t["qweight"], t["scale"], t["zero"]
        w = K.reference_dequantize(qw, s, z, bits, k)  # [n, k] fp32
        note("dequantize", K.dequantize(qw, s, z, bits, g, k, torch.float32), w)
        if KT.ktiled_ok(bits, g, n, k):
            kt = KT.KTiledWeight.from_checkpoint(qw, s, z, bits, k)
            wk = KT.dequantize_ktiled(kt.words, kt.sz, bits, g, k, torch.float32)
            assert torch.equal(wk, w), "k-tiled unpack differs from the checkpoint reference"
            note("dequantize_ktiled", wk, w)
            if bits == 4 and group == 64:  # rows 0-63 into a reused buffer, then rows 64-127 (n = 128 here)
                kt2 = KT.KTiledWeight.from_checkpoint(torch.cat([qw, qw.flip(0)]), torch.cat([s, s.flip(0)]),
                                                      torch.cat([z, z.flip(0)]), bits, k)
                buf = torch.full((64 * k + 5, ), float("nan"))
                for n0, rows in ((0, w), (64, w.flip(0))):
                    blk = KT.dequantize_ktiled(kt2.words, kt2.sz, bits, g, k, torch.float32, rows=(n0, n0 + 64),
                                               out=buf)
                    assert blk.data_ptr() == buf.data_ptr() and torch.equal(blk, rows), n0
        for m in (1, 3, 16, 20):
            x = torch.randn(m, k).half()
            ref = x.double() @ w.double().T
            if m <= K.GEMV_MAX_M:
                note("gemv", K.gemv(x, qw, s, z, bits, g, bn=16, bkw=8, split_k=2), ref)
                if K.gemv2_ok(bits, g, k, 8):
                    note("gemv2", K.gemv2(x, qw, s, z, bits, g, bn=8, bkw=8, prefetch=True), ref)
            note("gemm", K.gemm(x, qw, s, z, bits, g, bm=16, bn=32, bk=64), ref)
            if KT.ktiled_ok(bits, g, n, k):
                kt = KT.KTiledWeight.from_checkpoint(qw, s, z, bits, k)
                if m == 1:  # batch-1 GEMV on the k-tiled words; 4 tiles per step over fewer live tiles: masked tiles
                    for bn, bt, split in ((16, 1, 1), (32, 2, 2), (16, 4, 4), (8, 4, 1)):
                        note("ktiled_gemv", KT.ktiled_gemv(x, kt.words, kt.sz, bits, g, bn=bn, tiles_per_step=bt,
                                                           split_k=split), ref)
                for wa, split in ((True, 1), (True, 2), (False, 1)):
                    y = KT.ktiled_gemm(x, kt.words, kt.sz, bits, g, bm=16, bn=16, w_as_a=wa, split_k=split)
                    note("ktiled", y, ref)
                    if bits in KT.SCALE_AFTER_BITS:  # (the interpreter runs its plain-integer path, not the PTX)
                        y = KT.ktiled_gemm(x, kt.words, kt.sz, bits, g, bm=16, bn=16, w_as_a=wa, split_k=split,
                                           scale_after=True)
                        note("ktiled_after", y, ref)
                if bits in B.BITS_OK and m <= B.MAX_M:  # batch-1 kernel: 1 k-tile per step (K loops), then all at once
                    for bn, kb, sk in ((16, 1, 1), (32, 16, 1), (16, 1, 3)):  # split-K 3: shares of 1 or 2 k-tiles
                        note("batch1", B.batch1_gemm(x, kt.words, kt.sz, bits, g, bn=bn, kb=kb, split_k=sk), ref)
                if bits in KT.SCALE_AFTER_BITS:  # stream-K: 3 or 5 programs, so runs end and start inside tiles
                    for progs, wa in ((3, True), (5, False)):
                        y = KT.ktiled_gemm(x, kt.words, kt.sz, bits, g, bm=16, bn=16, w_as_a=wa, scale_after=True,
                                           streamk=progs)
                        note("ktiled_streamk", y, ref)
            for bk, split in ((64, 1), (128, 2)):
                if K.gemm_wa_ok(bits, g, k, bk):
                    note("gemm_wa", K.gemm_wa(x, qw, s, z, bits, g, bn=32, bm=16, bk=bk, split_k=split), ref)
    # stream-K edge cases: masked columns (N = 40, BN = 16), 2-bit with two K steps per tile, runs that cross
    # several tiles or sit inside one (2 and 7 programs over 3 tiles x 2-4 steps)
    for bits, group, k in [(4, 128, 1024), (2, 128, 1024)]:
        t = affine_to_tensors(quantize_weight(torch.randn(40, k), QuantSpec(bits, group, False)))
        kt = KT.KTiledWeight.from_checkpoint(t["qweight"], t["scale"], t["zero"], bits, k)
        w = K.reference_dequantize(t["qweight"], t["scale"], t["zero"], bits, k)
        x = torch.randn(5, k).half()
        for progs in (2, 7):
            y = KT.ktiled_gemm(x, kt.words, kt.sz, bits, group, bm=16, bn=16, scale_after=True, streamk=progs)
            note("ktiled_streamk", y, x.double() @ w.double().T)
        x1 = x[:1]  # masked rows in the GEMV too (N = 40, BN = 16 and 32)
        for bn, bt, split in ((16, 1, 1), (32, 2, 2), (16, 4, 1)):  # 4 tiles per step over 2-4 tiles: masked tiles
            note("ktiled_gemv", KT.ktiled_gemv(x1, kt.words, kt.sz, bits, group, bn=bn, tiles_per_step=bt, split_k=split),
                 x1.double() @ w.double().T)
    # fused mode's plumbing on a layer that holds only the k-tiled layout (the tuner takes each bucket's first
    # candidate: no timing on a CPU): checkpoint buffers gone, the same outputs, state_dict rebuilt exactly
    from qwenquant.runtime import fused
    from qwenquant.runtime.quant_linear import QuantLinear

    fused.TUNER.fixed = True
    qw_ = quantize_weight(torch.randn(48, 512), QuantSpec(4, 128, False))
    layer = QuantLinear.from_weight(qw_, compute_dtype=torch.float16)
    before = {k_: v.clone() for k_, v in layer.state_dict().items()}
    ops = fused._operands(layer, 4, 128)
    assert layer.layout == "ktiled" and not hasattr(layer, "qweight") and ops.ktiled is not None and ops.tiny is None
    w = qw_.dequantize(torch.float32)
    for m in (1, 3, 20, 70):
        x = torch.randn(m, 512).half()
        note("fused_ktiled_layer", fused.fused_matmul(x, None, None, None, 4, 128, ops), x.double() @ w.double().T)
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k_], before[k_]) for k_ in before)
    from qwenquant.kernels import w8a8
    from qwenquant.numerics.activation import quantize_per_token

    w8 = torch.randint(-127, 128, (64, 256), dtype=torch.int8)
    sw, zc, b = torch.rand(64) * 0.01, torch.randn(64), torch.randn(64)
    for m in (1, 5, 40):
        q, sx = quantize_per_token(torch.randn(m, 256), 8)  # (the act-quant kernel uses libdevice: GPU only)
        acc = q.double() @ w8.double().T - q.double().sum(1, keepdim=True) * zc.double()
        ref = acc * sx.double().reshape(-1, 1) * sw.double() + b.double()
        for tma in (0, 1):  # pointer loads; TMA descriptors with a persistent grid (4 "SMs" here: m = 40 loops)
            y = w8a8.int8_gemm_quantized(q.to(torch.int8), sx.float().reshape(-1, 1), q.float().sum(1), w8, sw, zc, b,
                                         torch.float32, 16, 32, 64, 4, 1, tma)
            note("int8_gemm" if tma == 0 else "int8_gemm_tma", y, ref)
    print(json.dumps(worst))
    """
)


def test_kernels_match_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    worst = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(worst) == {"dequantize", "dequantize_ktiled", "gemv", "gemv2", "gemm", "gemm_wa", "ktiled", "ktiled_after",
                          "ktiled_streamk", "ktiled_gemv", "batch1", "fused_ktiled_layer", "int8_gemm", "int8_gemm_tma"}
    # fp16 activations and fp16 output rounding: ~1e-3 relative; the reference is float64
    assert all(e < 5e-3 for e in worst.values()), worst


def test_ktiled_repack_is_a_permutation_of_the_checkpoint_bits():
    """pack_ktiled / unpack_ktiled round-trip the checkpoint bytes exactly, and the words hold the
    interleave the kernel assumes (word j of a tile: columns t·32 + j at bits t·bits)."""
    import torch

    from qwenquant.kernels import wq_ktiled as KT
    from qwenquant.numerics.packing import pack, unpack

    torch.manual_seed(1)
    for bits in (2, 4, 8):
        t = KT.tile_columns(bits)
        k = 2 * t
        codes = torch.randint(0, 1 << bits, (6, k), dtype=torch.uint8)
        qw = pack(codes, bits)
        words = KT.pack_ktiled(qw, bits, k)
        assert words.dtype == torch.int32 and words.shape == (6, k * bits // 32)
        assert words.numel() * 4 == qw.numel()  # the same bytes, permuted
        assert torch.equal(KT.unpack_ktiled(words, bits, k), qw)
        w64 = words.to(torch.int64) & 0xFFFFFFFF
        col = t + 3 * KT.SUB + 5  # tile 1, slice 3, word 5
        assert int((w64[2, t // (32 // bits) + 5] >> (3 * bits)) & ((1 << bits) - 1)) == int(codes[2, col])
        assert torch.equal(unpack(qw, bits, k), codes)
    with pytest.raises(ValueError, match="divisible by 256"):
        KT.pack_ktiled(pack(torch.zeros(2, 576, dtype=torch.uint8), 4), 4, 576)


def test_ktiled_scales_repack_round_trips_and_groups_must_nest_with_tiles():
    """Scale and zero become one group-major int32 per (group, row) and come back bit-exactly; a group
    size that neither divides the 256-column tile nor is a multiple of it (96) is refused, since the
    kernel would apply one group's scale across a group boundary."""
    import torch

    from qwenquant.kernels import wq_ktiled as KT

    torch.manual_seed(2)
    scale = (torch.rand(5, 7) * 0.03 + 1e-4).half()
    scale[0, 0] = -0.5  # the sign bit survives the shift into the high half-word
    zero = torch.randint(0, 256, (5, 7), dtype=torch.uint8)
    sz = KT.pack_ktiled_scales(scale, zero)
    assert sz.shape == (7, 5) and sz.dtype == torch.int32 and sz.is_contiguous()
    s2, z2 = KT.unpack_ktiled_scales(sz)
    assert torch.equal(s2.view(torch.int16), scale.view(torch.int16)) and torch.equal(z2, zero)
    with pytest.raises(ValueError, match="fp16 scale and uint8 zero"):
        KT.pack_ktiled_scales(scale.float(), zero)
    assert KT.ktiled_ok(4, 128, 64, 4096) and KT.ktiled_ok(4, 512, 64, 4096) and KT.ktiled_ok(4, 4096, 64, 4096)
    assert not KT.ktiled_ok(4, 96, 64, 12288)  # 96 divides K = 12288 but not the 256-column tile


def test_split_k_workspace_grows_and_keeps_old_buffers_alive():
    """The split-K workspace is shared per device, grows on demand, and keeps replaced buffers referenced
    (a CUDA graph captured earlier may still point at them)."""
    import torch

    from qwenquant.kernels import wq_ktiled as KT

    KT._WORKSPACES.pop("cpu", None)
    ws, cnt = KT.split_k_workspace(torch.device("cpu"), 100, 4)
    assert ws.numel() >= 100 and cnt.numel() >= 4 and not ws.any() and not cnt.any()
    assert KT.split_k_workspace(torch.device("cpu"), 50, 2)[0] is ws  # big enough: the same buffer
    retired = len(KT._RETIRED)
    ws2, cnt2 = KT.split_k_workspace(torch.device("cpu"), 1000, 2)
    assert ws2.numel() >= 1000 and cnt2.numel() >= 4  # grows, never shrinks
    assert len(KT._RETIRED) == retired + 1 and KT._RETIRED[-1][0] is ws


def test_fused_copies_setting_is_checked():
    env = {**os.environ, "QWENQUANT_FUSED_COPIES": "marlin"}
    out = subprocess.run([sys.executable, "-c", "import qwenquant.runtime.fused"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "QWENQUANT_FUSED_COPIES='marlin'" in out.stderr and "tinygemm, ktiled" in out.stderr
    env["QWENQUANT_FUSED_COPIES"] = "none"
    out = subprocess.run([sys.executable, "-c", "import qwenquant.runtime.fused as f; print(sorted(f.FUSED_COPIES))"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]"


@pytest.mark.parametrize("w_as_a,scale_after,bn", [(True, True, 64), (True, True, 32), (False, True, 128),
                                                   (True, False, 128)])
def test_split_k_meeting_reads_every_partial_sum_before_zeroing_it(w_as_a, scale_after, bn):
    """The last program of a split-K tile reads the fp32 sums (``ld.global.cg``) and zeroes them for the next call;
    Triton may store the constant zeros from other threads than the ones that read each element, so a barrier must
    separate the two (session 18: without it, 2-7 % wrong results at M = 8 on an H100). Checked in the sm_90a PTX."""
    import re

    from qwenquant.kernels import wq_ktiled as KT

    ptx = [ln.strip() for ln in KT.compile_for_sm90(w_as_a=w_as_a, scale_after=scale_after, bn=bn).asm["ptx"].splitlines()]
    reads = [i for i, ln in enumerate(ptx) if "ld.global.cg" in ln]
    reset = [i for i, ln in enumerate(ptx) if re.search(r"atom\.global\.gpu\.acq_rel\.exch", ln)]
    assert reads and len(reset) == 1
    stores = [i for i in range(reads[-1], reset[0]) if "st.global" in ptx[i]]  # y first, the zeroing last
    barriers = [i for i in range(reads[-1], reset[0]) if ptx[i].startswith("bar.sync")]
    assert stores and barriers and reads[-1] < barriers[0] < stores[-1], (reads[-1], barriers, stores)
