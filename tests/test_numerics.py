"""Numerics: exact packing round-trips, quantization error falling with bits, clear errors."""

import pytest
import torch

from qwenquant.numerics import QuantSpec, fake_quantize_per_token, pack, quantize_per_token, quantize_weight, sqnr_db, unpack
from qwenquant.numerics.affine import affine_from_tensors, affine_to_tensors


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 8), (3, 64), (17, 96), (2, 5, 40)])
def test_pack_unpack_roundtrip_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + shape[-1])
    codes = torch.randint(0, 2**bits, shape, generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == shape[-1] * bits // 8  # bytes = bits per code, nothing more
    assert torch.equal(unpack(packed, bits, shape[-1]), codes.to(torch.uint8))


def test_pack_4bit_layout_is_little_endian_nibbles():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    packed = pack(codes, 4)
    assert packed.tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert packed.view(torch.int32).item() & 0xFFFFFFFF == 0x87654321  # code t of a word at bits 4t


def test_pack_rejects_partial_bytes_and_out_of_range():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(1, 5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[16, 0]]), 4)


@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_sqnr_rises_with_bits(group_size, symmetric):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    lo = 2 if symmetric else 1
    sqnrs = [sqnr_db(w, quantize_weight(w, QuantSpec(b, group_size, symmetric)).dequantize()) for b in range(lo, 9)]
    assert all(b > a + 4.0 for a, b in zip(sqnrs, sqnrs[1:])), sqnrs  # ~6 dB per bit
    assert sqnrs[-1] > 40


def test_grouping_beats_per_channel_on_outlier_rows():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    w[:, 7] *= 30  # one outlier column inflates every per-channel range
    per_channel = sqnr_db(w, quantize_weight(w, QuantSpec(4, None)).dequantize())
    grouped = sqnr_db(w, quantize_weight(w, QuantSpec(4, 64)).dequantize())
    assert grouped > per_channel + 3


def test_symmetric_codes_are_signed_restricted_range_and_zero_exact():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    q = quantize_weight(w, QuantSpec(8, None, True))
    signed = q.codes.int() - 128
    assert signed.min() >= -128 and signed.max() <= 127
    # the largest magnitude per row maps to ±127 exactly
    assert torch.equal(signed.abs().amax(1), torch.full((8,), 127, dtype=torch.int32))
    wz = w.clone(); wz[:, :4] = 0
    assert torch.all(quantize_weight(wz, QuantSpec(3, 32, False)).dequantize()[:, :4] == 0)


def test_storage_roundtrip_and_bytes():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(4, 128, False)
    q = quantize_weight(w, spec)
    t = affine_to_tensors(q)
    assert t["qweight"].numel() == 128 * 256 // 2
    back = affine_from_tensors(t, (128, 256), spec)
    assert torch.equal(back.dequantize(), q.dequantize())
    assert abs(q.avg_bits - (4 + (16 + 4) / 128)) < 1e-9


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match=f"bits must be an integer from 1 to 8, got {bad}"):
        QuantSpec(bits=bad)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group size 128 does not divide the input dimension 576"):
        quantize_weight(torch.randn(4, 576), QuantSpec(4, 128))


def test_nan_weight_refused():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_weight(w, QuantSpec(4, 32))


def test_symmetric_one_bit_refused():
    with pytest.raises(ValueError, match="billm"):
        QuantSpec(bits=1, symmetric=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_activation_quant(bits):
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(4))
    x[0, 0] *= 50  # one hot token must not hurt the others: scales are per token
    q, s = quantize_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() <= qmax
    assert s.shape == (5, 7, 1)
    err = (fake_quantize_per_token(x, bits) - x).abs()
    assert torch.all(err <= s / 2 + 1e-6)
    with pytest.raises(ValueError, match="activation bits"):
        quantize_per_token(x, 6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_row_blocks_equals_packing_at_once(monkeypatch, bits):
    """Big weights are (un)packed in row blocks of ``CHUNK_CODES`` codes (bounded temporaries: a whole lm_head took
    47 GB at once); the bytes are those of one call, for leading dims and a row count the block does not divide, and
    the k-tiled conversion both ways too."""
    from qwenquant.numerics import ktiled as KT
    from qwenquant.numerics import packing

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 7, 512), generator=g, dtype=torch.uint8)
    whole = packing.pack(codes, bits)
    kt = KT.pack_ktiled(whole[0], bits, 512) if bits != 3 else None
    monkeypatch.setattr(packing, "CHUNK_CODES", 2 * 512 + 5)  # 2 rows per block: 21 rows in 11 blocks
    assert torch.equal(packing.pack(codes, bits), whole)
    assert torch.equal(packing.unpack(whole, bits, 512), codes)
    if kt is not None:
        assert torch.equal(KT.pack_ktiled(whole[0], bits, 512), kt)
        assert torch.equal(KT.unpack_ktiled(kt, bits, 512), whole[0])
    with pytest.raises(ValueError, match=f"codes out of range for {bits} bits: min 0, max {2**bits}"):
        bad = codes.clone().to(torch.int64)
        bad[2, 6, 0] = 2**bits  # in the last block: the message reports the whole tensor's range
        packing.pack(bad, bits)
    if kt is not None:
        with pytest.raises(ValueError, match=r"pack_ktiled takes checkpoint bytes \[N, "):
            KT.pack_ktiled(whole, bits, 512)  # 3-D: refused at every size, not only below the block size
        with pytest.raises(ValueError, match=r"unpack_ktiled takes k-tiled words"):
            KT.unpack_ktiled(kt[:, :-1], bits, 512)
