"""The k-tiled storage layout of an affine weight: a lossless permutation of the checkpoint's bits.

The checkpoint layout (``numerics.packing``) puts the codes of adjacent columns next to each other:
4-bit byte j holds columns 2j and 2j+1. The k-tiled layout is what ``kernels/wq_ktiled.py``'s GEMM
reads (its docstring says why): K is cut into tiles of T = CPW·SUB columns (CPW = 32/bits codes per
int32 word, SUB = 32), and word j of tile b of row n holds the codes of columns

    b·T + t·SUB + j,   t = 0 … CPW-1,   code t at bits [t·bits, (t+1)·bits)

— words [N, K/CPW] int32, the same bytes as the checkpoint's [N, K·bits/8] uint8. Scales and zeros
become one int32 per (group, row), ``fp16 scale bits << 16 | zero``, group-major [K/G, N]: 4 bytes
where the checkpoint holds 3 (fp16 scale + uint8 zero), so a 4-bit g128 weight takes 0.531 instead of
0.523 bytes per weight (0.266x instead of 0.262x bf16).

Plain torch on any device: QuantLinear converts between the layouts (``runtime/layouts.py``) without
importing Triton, and a k-tiled layer's ``state_dict()`` is rebuilt in the checkpoint layout exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qwenquant.numerics.packing import by_row_blocks, pack, unpack

SUB = 32  # columns per shifted slice = depth of each tl.dot in the k-tiled GEMM


def tile_columns(bits: int) -> int:
    """T: columns per interleave tile (CPW codes per word × SUB words)."""
    return (32 // bits) * SUB


def ktiled_ok(bits: int, group: int, n: int, k: int) -> bool:
    """Can the k-tiled GEMM run this weight?"""
    t = tile_columns(bits)
    # a group either splits a tile into whole groups or spans whole tiles (e.g. 96 on 256-column tiles does neither)
    nested = t % group == 0 or group % t == 0
    return bits in (2, 4, 8) and k % t == 0 and group % SUB == 0 and k % group == 0 and n % 8 == 0 and nested


def pack_ktiled(qweight: Tensor, bits: int, k: int) -> Tensor:
    """Checkpoint bytes [N, K·bits/8] -> k-tiled words [N, K/CPW] int32 (see module docstring). Row blocks of
    ``packing.CHUNK_CODES`` codes at a time: the int64 temporaries stay ≈ 0.3 GB for any weight."""
    cpw, t = 32 // bits, tile_columns(bits)
    if k % t:
        raise ValueError(f"k-tiled layout needs in_features divisible by {t} for {bits}-bit, got {k}")
    if qweight.dim() != 2 or qweight.shape[1] != k * bits // 8:
        raise ValueError(f"pack_ktiled takes checkpoint bytes [N, {k * bits // 8}] ({bits}-bit, in_features={k}), got "
                         f"{tuple(qweight.shape)}")
    return by_row_blocks(lambda q: _pack_ktiled_rows(q, bits, k), qweight, k, k // cpw, torch.int32)


def _pack_ktiled_rows(qweight: Tensor, bits: int, k: int) -> Tensor:
    cpw, t = 32 // bits, tile_columns(bits)
    codes = unpack(qweight, bits, k).to(torch.int64)  # [N, K]
    n = codes.shape[0]
    c = codes.reshape(n, k // t, cpw, SUB)  # column b·T + t·SUB + j  ->  [n, b, t, j]
    shifts = (torch.arange(cpw, device=codes.device) * bits).reshape(1, 1, cpw, 1)
    words = (c << shifts).sum(2)  # [N, K/T, SUB], each < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement for int32
    return words.to(torch.int32).reshape(n, k // cpw)


def unpack_ktiled(words: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of ``pack_ktiled``: k-tiled words -> checkpoint bytes [N, K·bits/8] uint8 (in row blocks, as it)."""
    if words.dim() != 2 or words.shape[1] != k * bits // 32:
        raise ValueError(f"unpack_ktiled takes k-tiled words [N, {k * bits // 32}] ({bits}-bit, in_features={k}), got "
                         f"{tuple(words.shape)}")
    return by_row_blocks(lambda w: _unpack_ktiled_rows(w, bits, k), words, k, k * bits // 8, torch.uint8)


def _unpack_ktiled_rows(words: Tensor, bits: int, k: int) -> Tensor:
    cpw, t = 32 // bits, tile_columns(bits)
    n = words.shape[0]
    w = words.to(torch.int64).reshape(n, k // t, 1, SUB) & 0xFFFFFFFF
    shifts = (torch.arange(cpw, device=words.device) * bits).reshape(1, 1, cpw, 1)
    codes = ((w >> shifts) & ((1 << bits) - 1)).reshape(n, k)
    return pack(codes.to(torch.uint8), bits)


def pack_ktiled_scales(scale: Tensor, zero: Tensor) -> Tensor:
    """Checkpoint scale [N, K/G] fp16 and zero [N, K/G] uint8 -> [K/G, N] int32, group-major, each
    ``fp16 bits << 16 | zero``: one aligned 4-byte word per (group, row), contiguous over rows, so the
    kernel's per-group load is a vector Triton can copy ahead asynchronously (same 4 bytes the fp16 +
    uint8 pair would occupy padded)."""
    if scale.dtype != torch.float16 or zero.dtype != torch.uint8 or scale.shape != zero.shape:
        raise ValueError(f"expected fp16 scale and uint8 zero of one shape, got {scale.dtype} {tuple(scale.shape)}, "
                         f"{zero.dtype} {tuple(zero.shape)}")
    bits16 = scale.view(torch.int16).to(torch.int32) & 0xFFFF
    return ((bits16 << 16) | zero.to(torch.int32)).T.contiguous()


def unpack_ktiled_scales(sz: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of ``pack_ktiled_scales``: (scale [N, K/G] fp16, zero [N, K/G] uint8)."""
    t = sz.T
    scale = ((t >> 16) & 0xFFFF).to(torch.int16).view(torch.float16)
    return scale.contiguous(), (t & 0xFF).to(torch.uint8).contiguous()


@dataclass
class KTiledWeight:
    """A weight in the k-tiled layout: words [N, K/CPW] int32 (``pack_ktiled``) and sz [K/G, N] int32
    (``pack_ktiled_scales``). 0.5 byte per weight at 4-bit plus 4 bytes per (group, row)."""

    words: Tensor
    sz: Tensor

    @classmethod
    def from_checkpoint(cls, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, k: int) -> "KTiledWeight":
        return cls(pack_ktiled(qweight, bits, k), pack_ktiled_scales(scale, zero))

    def to_checkpoint(self, bits: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(qweight, scale, zero) exactly as the checkpoint holds them."""
        scale, zero = unpack_ktiled_scales(self.sz)
        return unpack_ktiled(self.words, bits, k), scale, zero
