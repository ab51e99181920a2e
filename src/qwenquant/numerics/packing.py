"""Exact bit packing of unsigned integer codes along the last dimension.

Layout (one rule for every width): the codes of a row form a little-endian bit stream — code
``i`` occupies stream bits ``[bits*i, bits*i + bits)``, stream bit ``k`` being bit ``k % 8`` of
byte ``k // 8``. So for 4 bits, byte ``j`` holds code ``2j`` in its low nibble and ``2j+1`` in
its high nibble, and viewing 4 bytes as a little-endian int32 puts code ``8w + t`` at bits
``[4t, 4t+4)`` of word ``w`` — the layout GPU kernels read. 3-bit codes pack 8 to 3 bytes.

Any width 1..8 packs; the row length times ``bits`` must be a multiple of 8 (whole bytes).
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_row_bytes(n: int, bits: int) -> int:
    _check(n, bits)
    return n * bits // 8


def _check(n: int, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if (n * bits) % 8:
        raise ValueError(f"cannot pack {n} codes of {bits} bits into whole bytes: {n} x {bits} is not a multiple of 8")


# Codes handled at once. The bit streams below hold one int64 per bit (≈ 80 bytes of temporaries per 4-bit code), so
# a whole Qwen3 lm_head (151,936 × 4096 codes) would take ≈ 50 GB of them; row blocks of this many codes bound it to
# ≈ 0.3 GB for any weight (benchmarks/NOTES.md, session 19: the W4 head's k-tiled conversion peaked 47 GB above its
# resident bytes on an H100).
CHUNK_CODES = 1 << 22


def by_row_blocks(fn, x: Tensor, codes: int, n_out: int, dtype: torch.dtype) -> Tensor:
    """``fn`` ([r, x's last dim] -> [r, n_out]) over the rows of ``x`` in blocks of at most ``CHUNK_CODES`` codes
    (``codes`` per row; at least one row), into one preallocated [..., n_out] result; small tensors in one call."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows * codes <= CHUNK_CODES:
        return fn(x)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.empty(rows, n_out, dtype=dtype, device=x.device)
    step = max(1, CHUNK_CODES // codes)
    for r in range(0, flat.shape[0], step):
        out[r:r + step] = fn(flat[r:r + step])
    return out.reshape(*x.shape[:-1], n_out)


def pack(codes: Tensor, bits: int) -> Tensor:
    """[..., n] integer codes in [0, 2**bits) -> [..., n*bits/8] uint8."""
    n = codes.shape[-1]
    _check(n, bits)
    if codes.numel():  # the whole tensor, before any block
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 2**bits:
            raise ValueError(f"codes out of range for {bits} bits: min {lo}, max {hi}")
    return by_row_blocks(lambda c: _pack_rows(c, bits), codes, n, n * bits // 8, torch.uint8)


def _pack_rows(codes: Tensor, bits: int) -> Tensor:
    n = codes.shape[-1]
    c = codes.to(torch.int64)
    if bits == 8:
        return c.to(torch.uint8)
    # Split each code into its bits, lay them out as one stream, regroup by 8.
    shifts = torch.arange(bits, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(*c.shape[:-1], n * bits)  # [..., n*bits] of 0/1
    stream = stream.reshape(*c.shape[:-1], n * bits // 8, 8)
    weights = (1 << torch.arange(8, device=c.device))
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: [..., n*bits/8] uint8 -> [..., n] uint8 codes."""
    _check(n, bits)
    if packed.shape[-1] != n * bits // 8:
        raise ValueError(f"expected {n * bits // 8} bytes per row for {n} codes of {bits} bits, got {packed.shape[-1]}")
    return by_row_blocks(lambda p: _unpack_rows(p, bits, n), packed, n, n, torch.uint8)


def _unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    if bits == 8:
        return packed.to(torch.uint8)
    p = packed.to(torch.int64)
    stream = ((p.unsqueeze(-1) >> torch.arange(8, device=p.device)) & 1).reshape(*p.shape[:-1], n, bits)
    return (stream << torch.arange(bits, device=p.device)).sum(-1).to(torch.uint8)
