"""Unfused MoE experts: one ``nn.Linear`` per expert projection.

transformers (5.x) stores Qwen3-MoE experts as fused 3-D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]) and runs them in a loop over hit experts. Quantization
wants ordinary linears it can hook, calibrate and replace one by one, so we swap that module for
:class:`UnfusedExperts`: the same forward signature and arithmetic, ``experts[e].gate_proj`` etc.
as plain linears. Each expert linear then sees exactly the tokens routed to it — which is how
per-expert token counts are observed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qwenquant.model.arch import MoESpec


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for the fused experts module: forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_experts(layer: nn.Module, spec: MoESpec) -> bool:
    """Replace the layer's fused experts by UnfusedExperts holding the same weights. False if the layer is dense."""
    try:
        fused = layer.get_submodule(spec.experts)
    except AttributeError:
        return False
    if isinstance(fused, UnfusedExperts):
        return True
    gate_up = getattr(fused, spec.fused_gate_up, None)
    down = getattr(fused, spec.fused_down, None)
    if gate_up is None or down is None or gate_up.dim() != 3:
        return False
    n_exp, two_i, hidden = gate_up.shape
    inter = two_i // 2
    experts = []
    for e in range(n_exp):
        m = ExpertMLP(hidden, inter, fused.act_fn).to(dtype=gate_up.dtype, device=gate_up.device)
        m.gate_proj.weight.data.copy_(gate_up.data[e, :inter])
        m.up_proj.weight.data.copy_(gate_up.data[e, inter:])
        m.down_proj.weight.data.copy_(down.data[e])
        experts.append(m)
    parent_path, _, attr = spec.experts.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, attr, UnfusedExperts(experts))
    return True


def num_experts(layer: nn.Module, spec: MoESpec | None) -> int:
    if spec is None:
        return 0
    try:
        experts = layer.get_submodule(spec.experts)
    except AttributeError:
        return 0
    return len(experts) if isinstance(experts, UnfusedExperts) else 0
