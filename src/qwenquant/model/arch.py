"""Architecture knowledge as data: the only place that names modules like ``q_proj``.

For each supported Hugging Face class we record, relative to one decoder layer:

- ``sequential``: the quantization order inside a layer (GPTQ's "true-sequential"): each step is a
  tuple of linears that read the same input, quantized together before the next step runs;
- ``scale_pairs``: (previous op, the linears it feeds) — where AWQ and SmoothQuant fold a
  per-input-channel scale ``s``: the previous op's output is divided by ``s`` (a norm's weight, or
  a linear's output rows) and the following linears' input columns multiplied by ``s``;
- ``moe``: where the experts and router live. transformers stores Qwen3-MoE experts as fused 3-D
  parameters; ``model/moe.py`` swaps that module for one holding a plain ``nn.Linear`` per expert
  projection so every expert is calibrated and quantized like a dense MLP.

Adding an architecture adds a table entry here, not code elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoESpec:
    block: str = "mlp"                       # the sparse-MoE block inside a layer
    experts: str = "mlp.experts"             # the (fused) experts module
    router: str = "mlp.gate"                 # the router; its weight is [num_experts, hidden]
    fused_gate_up: str = "gate_up_proj"      # [E, 2 * I, H]: gate rows first, then up rows
    fused_down: str = "down_proj"            # [E, H, I]
    expert_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    layers: str                                     # attribute path of the decoder layer list
    sequential: tuple[tuple[str, ...], ...]
    scale_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    moe: MoESpec | None = None
    # linears whose weights AWQ must not clip: query/key feed a softmax (AWQ reference)
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    embed: str = "model.embed_tokens"
    rotary: str = "model.rotary_emb"
    final_norm: str = "model.norm"                  # the norm after the last layer: lm_head's input
    head: str = "lm_head"                           # the output projection [vocab, hidden]

    def linear_names(self, num_experts: int = 0) -> list[str]:
        """Every quantizable linear in one layer, in sequential order (experts expanded)."""
        return [name for step in self.sequential_steps(num_experts) for name in step]

    def sequential_steps(self, num_experts: int = 0) -> list[tuple[str, ...]]:
        return [tuple(n for t in step for n in self._expand(t, num_experts)) for step in self.sequential]

    def scale_groups(self, num_experts: int = 0) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """(previous op, linears to quantize, extra followers) with experts expanded.

        Extra followers take the folded scale but are not quantized (the MoE router reads the
        same normed input as the experts, so its columns must be rescaled too).
        """
        out = []
        for prev, linears in self.scale_pairs:
            prevs = self._expand(prev, num_experts)
            if len(prevs) > 1:  # an expert's up_proj feeding its own down_proj
                for e, p in enumerate(prevs):
                    out.append((p, tuple(self._expand_one(t, e) for t in linears), ()))
                continue
            expanded = tuple(n for t in linears for n in self._expand(t, num_experts))
            extra = (self.moe.router,) if self.moe and any("{e}" in t for t in linears) else ()
            out.append((prevs[0], expanded, extra))
        return out

    @staticmethod
    def _expand(template: str, num_experts: int) -> list[str]:
        if "{e}" not in template:
            return [template]
        return [template.format(e=e) for e in range(num_experts)]

    @staticmethod
    def _expand_one(template: str, e: int) -> str:
        return template.format(e=e)


_ATTN_SEQ = (("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj",))
_ATTN_PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    # v_proj -> o_proj is skipped automatically when GQA makes the shapes differ (see methods/scaling.py)
    ("self_attn.v_proj", ("self_attn.o_proj",)),
)
_DENSE = dict(
    layers="model.layers",
    sequential=_ATTN_SEQ + (("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",)),
    scale_pairs=_ATTN_PAIRS
    + (
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
)
_MOE_EXPERT = "mlp.experts.{e}"

ARCHITECTURES: dict[str, Architecture] = {
    "Qwen3ForCausalLM": Architecture("Qwen3ForCausalLM", **_DENSE),
    "Qwen2ForCausalLM": Architecture("Qwen2ForCausalLM", **_DENSE),
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", **_DENSE),
    "Qwen3MoeForCausalLM": Architecture(
        "Qwen3MoeForCausalLM",
        layers="model.layers",
        sequential=_ATTN_SEQ
        + ((f"{_MOE_EXPERT}.up_proj", f"{_MOE_EXPERT}.gate_proj"), (f"{_MOE_EXPERT}.down_proj",)),
        scale_pairs=_ATTN_PAIRS
        + (
            ("post_attention_layernorm", (f"{_MOE_EXPERT}.gate_proj", f"{_MOE_EXPERT}.up_proj")),
            (f"{_MOE_EXPERT}.up_proj", (f"{_MOE_EXPERT}.down_proj",)),
        ),
        moe=MoESpec(),
    ),
}


def architecture_for(hf_class: str) -> Architecture:
    """The table for a Hugging Face model class name; unsupported classes are refused by name."""
    try:
        return ARCHITECTURES[hf_class]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {hf_class!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
