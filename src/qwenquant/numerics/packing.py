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


def pack(codes: Tensor, bits: int) -> Tensor:
    """[..., n] integer codes in [0, 2**bits) -> [..., n*bits/8] uint8."""
    n = codes.shape[-1]
    _check(n, bits)
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: min {int(c.min())}, max {int(c.max())}")
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
    if bits == 8:
        return packed.to(torch.uint8)
    p = packed.to(torch.int64)
    stream = ((p.unsqueeze(-1) >> torch.arange(8, device=p.device)) & 1).reshape(*p.shape[:-1], n, bits)
    return (stream << torch.arange(bits, device=p.device)).sum(-1).to(torch.uint8)
