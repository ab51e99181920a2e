"""Fold a per-input-channel scale into a layer, exactly: the previous op divides, the linears multiply.

    prev(x) / s  →  W diag(s)  :  W diag(s) (x / s) = W x

``prev`` is a norm (its weight, and bias if any, are divided by s) or a linear (its output rows
and bias are divided by s). ``followers`` are linears whose input columns are multiplied by s;
extra followers (the MoE router) are rescaled but never quantized. When the previous linear's
output width differs from the followers' input width (grouped-query attention: v_proj → o_proj)
the fold is impossible and the pair is skipped by the caller (``can_fold``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def out_width(prev: nn.Module) -> int:
    return prev.weight.shape[0]


def can_fold(prev: nn.Module, followers: list[nn.Module]) -> bool:
    return all(out_width(prev) == f.weight.shape[1] for f in followers)


@torch.no_grad()
def fold_scale(prev: nn.Module, followers: list[nn.Module], s: Tensor) -> None:
    if not can_fold(prev, followers):
        raise ValueError(
            f"cannot fold a scale of width {s.numel()}: previous op outputs {out_width(prev)} channels, "
            f"followers read {[f.weight.shape[1] for f in followers]}"
        )
    s = s.to(prev.weight.device)
    if prev.weight.dim() == 1:  # a norm: y = weight * normalized(x) (+ bias)
        prev.weight.div_(s.to(prev.weight.dtype))
    else:                       # a linear: y = W x + b, divide output rows
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for f in followers:
        f.weight.mul_(s.to(f.weight.dtype).unsqueeze(0))
