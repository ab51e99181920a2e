"""Where a QuantLinear's affine weight lives in memory: one resident layout, never two copies.

The checkpoint layout (``qweight`` packed codes, ``scale`` fp16, ``zero`` uint8; ``numerics.affine``)
is what is saved and loaded. An execution mode whose kernels want the same bits arranged differently
converts the layer *in place* on its first forward — the checkpoint buffers are replaced, not kept
beside the new ones — so the bytes on the GPU stay the bit-width plus metadata:

| layout       | buffers                                  | who asks for it                | bytes (4-bit g128) |
|--------------|------------------------------------------|--------------------------------|--------------------|
| `checkpoint` | qweight [N, K·b/8] u8, scale, zero [N, K/G] | save / load, fake, dequant    | 0.523 / weight     |
| `ktiled`     | words [N, K/CPW] i32, sz [K/G, N] i32    | fused, auto (``wq_ktiled``)    | 0.531 / weight     |
| `int8`       | codes_s8 [N, K] i8 (= code - 128), scale, zero | native int8 (8-bit per-channel) | 1 + 3/K / weight |

Every conversion is exact both ways (a permutation of the code bits, or a flip of the top bit), so
``QuantLinear.state_dict()`` rebuilds the checkpoint tensors bit for bit from whichever layout is
resident. Plain torch, any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from qwenquant.numerics import ktiled as KT

CHECKPOINT_BUFFERS = ("qweight", "scale", "zero")


@dataclass(frozen=True)
class Layout:
    """A resident arrangement of an affine weight: its buffer names and the exact maps to and from the
    checkpoint tensors (each map takes the tensors, the bit width and in_features)."""

    name: str
    buffers: tuple[str, ...]
    from_checkpoint: Callable[[dict[str, Tensor], int, int], dict[str, Tensor]]
    to_checkpoint: Callable[[dict[str, Tensor], int, int], dict[str, Tensor]]


def _ktiled_from(t: dict[str, Tensor], bits: int, k: int) -> dict[str, Tensor]:
    kt = KT.KTiledWeight.from_checkpoint(t["qweight"], t["scale"], t["zero"], bits, k)
    return {"words": kt.words, "sz": kt.sz}


def _ktiled_to(t: dict[str, Tensor], bits: int, k: int) -> dict[str, Tensor]:
    return dict(zip(CHECKPOINT_BUFFERS, KT.KTiledWeight(t["words"], t["sz"]).to_checkpoint(bits, k)))


def _int8_from(t: dict[str, Tensor], bits: int, k: int) -> dict[str, Tensor]:
    if bits != 8:
        raise ValueError(f"the int8 layout holds 8-bit codes, got {bits}-bit")
    # code - 128 as a signed byte is the code with its top bit flipped: the tensor cores' int8 operand
    return {"codes_s8": (t["qweight"] ^ 0x80).view(torch.int8), "scale": t["scale"], "zero": t["zero"]}


def _int8_to(t: dict[str, Tensor], bits: int, k: int) -> dict[str, Tensor]:
    return {"qweight": t["codes_s8"].view(torch.uint8) ^ 0x80, "scale": t["scale"], "zero": t["zero"]}


LAYOUTS: dict[str, Layout] = {
    "checkpoint": Layout("checkpoint", CHECKPOINT_BUFFERS, lambda t, b, k: dict(t), lambda t, b, k: dict(t)),
    "ktiled": Layout("ktiled", ("words", "sz"), _ktiled_from, _ktiled_to),
    "int8": Layout("int8", ("codes_s8", "scale", "zero"), _int8_from, _int8_to),
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown weight layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
