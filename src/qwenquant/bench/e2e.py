"""End-to-end benchmark: a full-size Qwen3-8B with random weights (published shapes), per mode.

Prefill: one 2048-token sequence, eager (compute-bound: launch overhead is <5% of it), through
``prefill_logits`` (the HF forward's computation on our layer functions; tested equal to it on CPU).
Decode: one token per sequence at batch 1/8/32/128 over a static KV cache of ``CTX`` positions,
replayed from a CUDA graph — without the graph a 36-layer step is ~250 kernel launches and the
launch rate, not the kernels, would set the speed — with each layer's elementwise work fused by
torch.compile (``compiled_layer_step``; on an H100 the eager-module step spent ~3 ms of its
10.2 ms in ~25 small kernels per layer, benchmarks/results/e2e_probe_h100.json). Batch 1 is also
timed eager-module for reference (``step_ms_eager``). The decode step is our own (gpt-fast style)
over the HF model's modules (norms, rotary, projections, MLP), so every linear runs in its
QuantLinear mode; attention is SDPA over the cache positions written so far (``StaticDecoder(attend=...)``; files
without an ``attention`` field used the whole cache under a position mask, the same math at ≈ 6-26 µs more per layer).

Projections: by default merged as serving engines run them — [q | k | v] and [gate | up] as one GEMM each
(``merge_projections``), for bf16 and every quantized mode alike; ``run(merged=False)`` keeps the HF
layout's seven projections (the only layout of the e2e results before commit 1eaa505).

Quantization: RTN (min-max) into QuantLinear for every decoder-layer linear; embeddings stay bf16, and so does
lm_head (as in most W4 checkpoints) except in the ``+head`` modes, which quantize it too (``QuantRecipe.lm_head``):
at batch 1 the bf16 head is 1.24 GB of the step's reads, ≈ 0.43 ms on an H100.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from qwenquant.bench.gemm import time_graph
from qwenquant.kernels.decode_attention import decode_attention, decode_attention_prep
from qwenquant.kernels.decode_prep import decode_prep
from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime.quant_linear import QuantLinear, concat_out_features

try:
    from qwenquant.runtime import fused
except ImportError:  # no Triton: the projection epilogues (GPU-only) are never asked for
    fused = None

log = logging.getLogger(__name__)

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1_000_000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
CTX = 512  # static cache length; decode steps attend over CTX//2 filled positions
BATCHES = (1, 8, 32, 128)
PREFILL = 2048
# eager prefills timed per mode (median kept): 1 in 5-7 of them stalls 50-100 ms on the H100 machine (session 14,
# benchmarks/prefill_ab.py), enough to move a median of 3
PREFILL_TRIALS = 9
# decode attention (StaticDecoder(attend=...)): "filled" SDPA over the written positions, "split" our split-K
# kernels over the same positions, "prep" split with q / k norm, rotary and the cache write in our one kernel before
# it, "prep-in-split" the same work inside the split kernel (no kernel of its own), "masked" SDPA over the whole
# cache under a mask
ATTEND = ("filled", "split", "prep", "prep-in-split", "masked")

# mode name -> (weight spec, QuantLinear execution mode, lm_head quantized too)
E2E_MODES = {
    "w4g128-fused": (QuantSpec(4, 128, False), "fused", False),
    "w4g128-auto": (QuantSpec(4, 128, False), "auto", False),
    "w8a8-int8-native": (QuantSpec(8, None, True), "native", False),
    "w8-fused": (QuantSpec(8, None, True), "fused", False),
    "w4g128-fused+head": (QuantSpec(4, 128, False), "fused", True),
}


def build_model(n_layers: int = 36):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{**QWEN3_8B, "num_hidden_layers": n_layers})
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def decoder_linears(model) -> list[tuple[nn.Module, str]]:
    """(parent, name) of the 7 projections per layer in the HF (unmerged) layout: q, k, v, o, gate, up, down."""
    out = []
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            out += [(parent, n) for n in names]
    return out


def projection_modules(model) -> list[nn.Module]:
    """Every projection module of the decoder layers, merged or not (what the linear-bytes count covers)."""
    return [m for layer in model.model.layers for parent in (layer.self_attn, layer.mlp)
            for m in parent.children() if isinstance(m, (nn.Linear, QuantLinear))]


def _concat(mods: list[nn.Module]) -> nn.Module:
    if isinstance(mods[0], QuantLinear):
        return concat_out_features(mods)
    if any(m.bias is not None for m in mods):
        raise ValueError("merge_projections: Qwen3's projections have no bias; got a biased nn.Linear")
    w = torch.cat([m.weight.detach() for m in mods])
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


def merge_projections(model) -> None:
    """The layout serving engines run (vLLM's QKVParallelLinear / MergedColumnParallelLinear): q, k, v as one
    [q | k | v] projection and gate, up as one [gate | up], so each shared input is read by one GEMM instead of
    three / two. Exact for bf16 and for per-row quantized weights (``concat_out_features``)."""
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        a.qkv_sizes = (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features)
        a.qkv_proj = _concat([a.q_proj, a.k_proj, a.v_proj])
        del a.q_proj, a.k_proj, a.v_proj
        mlp.gate_up_proj = _concat([mlp.gate_proj, mlp.up_proj])
        del mlp.gate_proj, mlp.up_proj


def quantize_model(model, originals: list[torch.Tensor], spec: QuantSpec, mode: str,
                   head: torch.Tensor | None = None, quantize_head: bool = False) -> None:
    """Replace every decoder projection by a QuantLinear (RTN of ``originals``, ``decoder_linears`` order) in
    ``mode``; a model with merged projections gets merged QuantLinears (quantized per projection, then joined).
    ``head``: the bf16 lm_head weight [vocab, hidden] (kept off the device): ``quantize_head`` puts its QuantLinear
    in ``model.lm_head``, otherwise a quantized head left by an earlier mode is replaced by the bf16 one."""
    merged = hasattr(model.model.layers[0].self_attn, "qkv_proj")
    per_layer = 7
    slots = None if merged else decoder_linears(model)
    device = model.model.embed_tokens.weight.device
    if head is None and (quantize_head or isinstance(model.lm_head, QuantLinear)):
        raise ValueError("quantize_model: the bf16 lm_head weight (head=) is needed to quantize the head or to put "
                         "the bf16 head back after a +head mode")
    if quantize_head:
        model.lm_head = QuantLinear.from_weight(quantize_weight(head.to(device, torch.float32), spec),
                                                compute_dtype=torch.bfloat16, mode=mode)
    elif isinstance(model.lm_head, QuantLinear):
        model.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, device="meta")  # no init, no memory
        model.lm_head.weight = nn.Parameter(head.to(device), requires_grad=False)
    for i, layer in enumerate(model.model.layers):
        ws = originals[i * per_layer:(i + 1) * per_layer]
        ql = [QuantLinear.from_weight(quantize_weight(w.to(device, torch.float32), spec), compute_dtype=torch.bfloat16, mode=mode)
              for w in ws]
        a, mlp = layer.self_attn, layer.mlp
        if merged:
            a.qkv_proj, a.o_proj = concat_out_features(ql[:3]), ql[3]
            mlp.gate_up_proj, mlp.down_proj = concat_out_features(ql[4:6]), ql[6]
        else:
            for (parent, name), q in zip(slots[i * per_layer:(i + 1) * per_layer], ql):
                setattr(parent, name, q)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _qkv(a, x):
    """x [b, t, hidden] -> q, k, v [b, t, heads, head_dim] (merged or separate projections)."""
    b, t = x.shape[:2]
    if hasattr(a, "qkv_proj"):
        q, k, v = a.qkv_proj(x).split(a.qkv_sizes, dim=-1)
    else:
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
    return (q.reshape(b, t, -1, a.head_dim), k.reshape(b, t, -1, a.head_dim), v.reshape(b, t, -1, a.head_dim))


def _gate_up_act(mlp, x):
    """act(gate(x)) · up(x), merged or separate projections: the MLP up to the down projection."""
    if hasattr(mlp, "gate_up_proj"):
        g, u = mlp.gate_up_proj(x).chunk(2, dim=-1)
    else:
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
    return mlp.act_fn(g) * u


def _mlp(mlp, x):
    return mlp.down_proj(_gate_up_act(mlp, x))


def _layer_step(layer, h, kc, vc, pos, cos, sin, mask, rope, filled: int | None = None, split: bool = False,
                prep: bool | str = False, x=None, next_norm=None, epilogues: tuple[bool, bool] = (False, False),
                normed=None, hand_normed: bool = False):
    """One decoder layer for one new token per sequence: h [b, 1, hidden] -> h; writes K/V at ``pos``. Attention
    reads the first ``filled`` cache positions without a mask when given (positions 0 … pos: the same math as the
    mask, ``mask`` is then unused) — through our split-K kernels with ``split`` (``kernels/decode_attention.py``),
    else SDPA — or the whole cache under ``mask``. ``prep`` (with ``split``): q / k norm, rotary and the cache write
    in our one kernel (``kernels/decode_prep.py``) instead of the compiled modules; ``prep="in-split"``: inside the
    split kernel itself (``decode_attention_prep``).

    ``x``: the layer's normalized input when the step before computed it; ``next_norm``: the next layer's input norm
    (the final norm after the last layer), then the return is (h, next_norm(h)) — the residual add and the next norm
    in one compiled kernel, as serving engines fuse them (vLLM's ``fused_add_rms_norm``), not an add kernel of its own
    at the end of each layer.

    ``epilogues`` = (norm, silu) (``StaticDecoder`` sets them where ``fused.epilogue_ok``): norm — o and down add the
    residual in their kernel and hand the next norm on unfinished (``fused.add_residual``: h · weight and partial
    sums of h²), gate_up and the next layer's qkv finish it on their own sums (``fused.linear_normed``; ``normed``:
    this layer's input so, ``hand_normed``: return (h, normed) for the next layer instead of (h, next_norm(h)));
    silu — gate_up with SiLU·mul (``fused.silu_mul``). Each replaces a compiled kernel launch of its own."""
    a = layer.self_attn
    mlp = layer.mlp
    norm_epi, silu_epi = epilogues
    b = h.shape[0]
    if normed is not None:
        qkv = fused.linear_normed(a.qkv_proj, *normed, layer.input_layernorm.variance_epsilon)
        q, k, v = (t.reshape(b, 1, -1, a.head_dim) for t in qkv.split(a.qkv_sizes, dim=-1))
    else:
        q, k, v = _qkv(a, layer.input_layernorm(h) if x is None else x)
    o = _attend(a, q, k, v, kc, vc, pos, cos, sin, mask, rope, filled, split, prep)
    o = o.transpose(1, 2).reshape(b, 1, -1)
    post = layer.post_attention_layernorm
    eps = post.variance_epsilon
    if norm_epi:
        h, x, ss = fused.add_residual(a.o_proj, o, h, post.weight)  # x = h · weight, not yet divided by its RMS
    else:
        h = h + a.o_proj(o)
        x, ss = post(h), None
    if silu_epi:
        act = fused.silu_mul(mlp.gate_up_proj, x, norm=None if ss is None else (eps, ss))
    elif ss is not None:
        g, u = fused.linear_normed(mlp.gate_up_proj, x, ss, eps).chunk(2, dim=-1)
        act = mlp.act_fn(g) * u
    else:
        act = _gate_up_act(mlp, x)
    if norm_epi:
        h, hw, ss = fused.add_residual(mlp.down_proj, act, h, (post if next_norm is None else next_norm).weight)
        if hand_normed:
            return h, (hw, ss)
    else:
        h = h + mlp.down_proj(act)
    return h if next_norm is None else (h, next_norm(h))


def _attend(a, q, k, v, kc, vc, pos, cos, sin, mask, rope, filled, split, prep):
    """The decode step's attention block after the qkv projection (q, k, v [b, 1, heads, D]): q / k norm, rotary, the
    cache write at ``pos``, attention (``_layer_step`` says which path) → o [b, Hq, 1, D]."""
    if prep and not (split and filled):
        raise ValueError(f"_layer_step: prep={prep!r} is the prologue of the split-K attention (split=True, filled)")
    eps = a.q_norm.variance_epsilon
    if prep == "in-split":
        return decode_attention_prep(q, k, v, a.q_norm.weight, a.k_norm.weight, eps, cos, sin, kc, vc, pos, filled)
    if prep:
        q = decode_prep(q, k, v, a.q_norm.weight, a.k_norm.weight, eps, cos, sin, kc, vc, pos)
    else:
        q, k = rope(a.q_norm(q).transpose(1, 2), a.k_norm(k).transpose(1, 2), cos, sin)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v.transpose(1, 2))
    if filled is None:
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
    if split:
        return decode_attention(q, kc, vc, filled)
    return F.scaled_dot_product_attention(q, kc[:, :, :filled], vc[:, :, :filled], enable_gqa=True)


def _prefill_layer(layer, h, cos, sin, rope):
    """One decoder layer over a whole prompt (causal attention, no cache): h [b, t, hidden] -> h."""
    a = layer.self_attn
    b, t = h.shape[:2]
    q, k, v = _qkv(a, layer.input_layernorm(h))
    q, k = rope(a.q_norm(q).transpose(1, 2), a.k_norm(k).transpose(1, 2), cos, sin)
    o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, enable_gqa=True)
    h = h + a.o_proj(o.transpose(1, 2).reshape(b, t, -1))
    return h + _mlp(layer.mlp, layer.post_attention_layernorm(h))


@torch.no_grad()
def prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The HF model's forward over ``ids`` [b, t], on our layer functions (so merged projections work too);
    returns the last position's logits [b, 1, vocab], as ``model(ids, logits_to_keep=1)``."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    m = model.model
    h = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(h, torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1))
    for layer in m.layers:
        h = _prefill_layer(layer, h, cos, sin, apply_rotary_pos_emb)
    return model.lm_head(m.norm(h[:, -1:]))


_compiled_layer_step = None


def compiled_layer_step():
    """``_layer_step`` through torch.compile (inductor), built once: the norms, rotary, residuals and
    SiLU·mul between the projections fuse into a few kernels instead of ~25 per layer. QuantLinear's
    GPU modes are opaque to the compiler (``torch.compiler.disable``), so each projection still runs
    its own kernel; inlined nn.Modules make one compiled graph serve all 36 layers."""
    global _compiled_layer_step
    if _compiled_layer_step is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled_layer_step = torch.compile(_layer_step, dynamic=False)
    return _compiled_layer_step


class StaticDecoder:
    """One decode step of the HF Qwen3 modules over our own static KV cache; graph-capturable.

    ``compiled``: run each layer through :func:`compiled_layer_step` (fused elementwise work);
    otherwise eager modules (one kernel per HF op: a graph replay still pays ~2-4 µs per kernel).
    ``attend``: "filled" (default) — attention reads the ``ctx // 2 + 1`` positions written so far, as a serving
    engine's decode attention does (one step at a fixed position is what is timed, so the length is a constant),
    with SDPA; "split" — the same positions through our split-K kernels (``kernels/decode_attention.py``, the
    reference on a CPU); "prep" — "split" with q / k norm, rotary and the cache write in our one kernel before it
    (``kernels/decode_prep.py``); "prep-in-split" — that work inside the split kernel; "masked" — the whole ``ctx`` cache under a position mask (the same math; e2e files
    without an ``attention`` field were measured so: 19 vs 13 µs per layer at b = 1, 43 vs 17 at b = 32 on an H100,
    results/decode_attention_h100.json).
    ``fold_norm`` (default): each layer's last residual add is computed with the next layer's input norm (the
    final norm after the last layer) in one compiled kernel (``_layer_step``'s ``next_norm``); e2e files without a
    ``fold_norm`` field ran an add kernel at the end of every layer.
    ``epilogues``: True, or some of ("norm", "silu"), where the merged projections take them (``fused.epilogue_ok``:
    fused-mode W2/W4 layers at batch <= 8): the residual adds and RMSNorms inside the batch-1 GEMMs around them, and
    SiLU·mul in gate_up's (``_layer_step``) — three compiled kernels fewer per layer; ``self.epilogues`` = (norm,
    silu) says which ran."""

    def __init__(self, model, batch: int, ctx: int = CTX, device: str = "cuda", compiled: bool = False,
                 attend: str = "filled", fold_norm: bool = True, epilogues: bool | tuple[str, ...] = False):
        if attend not in ATTEND:
            raise ValueError(f"attend={attend!r}: expected one of {', '.join(ATTEND)}")
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

        self.rope = apply_rotary_pos_emb
        self.m = model
        cfg = model.config
        self.b = batch
        shape = (batch, cfg.num_key_value_heads, ctx, cfg.head_dim)
        dtype = model.model.embed_tokens.weight.dtype
        self.kc = [torch.randn(shape, device=device, dtype=dtype) for _ in model.model.layers]
        self.vc = [torch.randn(shape, device=device, dtype=dtype) for _ in model.model.layers]
        self.pos = torch.tensor([ctx // 2], device=device)
        self.ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
        self.ar = torch.arange(ctx, device=device)
        self.layer_fn = compiled_layer_step() if compiled else _layer_step
        self.filled = None if attend == "masked" else ctx // 2 + 1
        self.split = attend in ("split", "prep", "prep-in-split")
        self.prep = {"prep": True, "prep-in-split": "in-split"}.get(attend, False)
        self.fold_norm = fold_norm
        asked = {"norm", "silu"} if epilogues is True else set(epilogues or ())
        if not asked <= {"norm", "silu"}:
            raise ValueError(f"epilogues={epilogues!r}: expected True, False or some of ('norm', 'silu')")
        self.epilogues = (False, False)
        layers = model.model.layers
        if asked and fused is not None and all(hasattr(l.self_attn, "qkv_proj") and hasattr(l.mlp, "gate_up_proj")
                                               for l in layers):  # every layer alike: one compiled step serves all
            gate_up = all(fused.epilogue_ok(l.mlp.gate_up_proj, batch) for l in layers)
            norm = gate_up and all(fused.epilogue_ok(p, batch) for l in layers
                                   for p in (l.self_attn.qkv_proj, l.self_attn.o_proj, l.mlp.down_proj))
            self.epilogues = ("norm" in asked and norm, "silu" in asked and gate_up)

    @torch.no_grad()
    def step(self):
        m, b = self.m.model, self.b
        h = m.embed_tokens(self.ids)
        cos, sin = m.rotary_emb(h, self.pos.view(1, 1).expand(b, 1))
        mask = None if self.filled else (self.ar <= self.pos).view(1, 1, 1, -1)  # only the masked attention reads it
        layers = m.layers
        x = layers[0].input_layernorm(h) if self.fold_norm else None
        normed = None
        for i, layer in enumerate(layers):
            args = (layer, h, self.kc[i], self.vc[i], self.pos, cos, sin, mask, self.rope, self.filled, self.split,
                    self.prep)
            if self.fold_norm:  # each layer ends with the next one's input norm (the final norm after the last)
                nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else m.norm
                hand = self.epilogues[0] and i + 1 < len(layers)  # the next qkv finishes the norm in its kernel
                h, out = self.layer_fn(*args, x=x, next_norm=nxt, epilogues=self.epilogues, normed=normed,
                                       hand_normed=hand)
                x, normed = (None, out) if hand else (out, None)
            else:
                h = self.layer_fn(*args, epilogues=self.epilogues)
        return self.m.lm_head(x if self.fold_norm else m.norm(h))


def _graph_ms(fn) -> float:
    """Median ms of one decode step replayed from a CUDA graph (bench.gemm.time_graph), after an
    eager warm-up so that tuning and lazily built operands stay outside the capture."""
    fn()
    return time_graph(fn)


def _inductor_pdl() -> bool:
    """Whether torch.compile emits programmatic dependent launch (its ``triton.enable_pdl``; absent in older torch)."""
    import torch._inductor.config as inductor_config

    return bool(getattr(inductor_config.triton, "enable_pdl", False))


def linear_bytes(model) -> int:
    """Bytes the decoder projections hold on the device: bf16 weights, or a QuantLinear's resident storage plus any
    operand its mode built beside it (fp8's e4m3 copy, tinygemm's copy; ``QuantLinear.resident_bytes``)."""
    return sum(module_bytes(mod) for mod in projection_modules(model))


def module_bytes(mod: nn.Module) -> int:
    """Device bytes of one linear: a QuantLinear's resident storage (+ bias), else its parameters and buffers."""
    bias = 0 if getattr(mod, "bias", None) is None else mod.bias.numel() * mod.bias.element_size()
    if isinstance(mod, QuantLinear):
        return mod.resident_bytes + bias
    return sum(p.numel() * p.element_size() for p in mod.parameters()) + sum(b.numel() * b.element_size() for b in mod.buffers())


@torch.no_grad()
def measure(model, label: str, attend: str = "filled", epilogues: bool | tuple[str, ...] = True) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    lin = linear_bytes(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    ids = torch.randint(0, model.config.vocab_size, (1, PREFILL), device="cuda")
    prefill_logits(model, ids)  # warm-up (tunes the M=2048 bucket)
    torch.cuda.synchronize()
    ts = []
    for _ in range(PREFILL_TRIALS):
        t = time.perf_counter()
        prefill_logits(model, ids)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    res = {"mode": label, "prefill_tokens": PREFILL, "prefill_tok_s": PREFILL / sorted(ts)[len(ts) // 2],
           "prefill_ms_trials": [t * 1e3 for t in ts], "decode": {},
           "peak_mem_bytes_after": {"prefill": torch.cuda.max_memory_allocated()}}  # running peak, phase by phase
    for b in BATCHES:
        dec = StaticDecoder(model, b, compiled=True, attend=attend, epilogues=epilogues)
        ms = _graph_ms(dec.step)
        res["decode"][b] = {"step_ms": ms, "tok_s": b / ms * 1e3, "epilogues": dict(zip(("norm", "silu"), dec.epilogues))}
        del dec
        if b == 1:  # the same step with eager (unfused) elementwise work, for reference
            dec = StaticDecoder(model, b, compiled=False, attend=attend, epilogues=epilogues)
            res["decode"][b]["step_ms_eager"] = _graph_ms(dec.step)
            del dec
        torch.cuda.empty_cache()
        res["peak_mem_bytes_after"][f"decode b{b}"] = torch.cuda.max_memory_allocated()
    # re-count: native builds its int8 operand at first use
    lin = linear_bytes(model)
    res.update(linear_weight_bytes=lin, lm_head_bytes=module_bytes(model.lm_head), model_weight_bytes=total,
               peak_mem_bytes=torch.cuda.max_memory_allocated())
    log.info("e2e %s: %s", label, res)
    return res


def run(modes=tuple(E2E_MODES), n_layers: int = 36, out_path: str | None = None, merged: bool = True,
        pdl: bool = False, attend: str = "prep-in-split", epilogues: bool | tuple[str, ...] = True) -> dict:
    """bf16, then each of ``modes``, on one model. ``merged``: q/k/v and gate/up as single projections
    (``merge_projections``, what serving engines run; bf16 gets the same merge) — False runs the seven
    separate projections of the HF layout. ``pdl``: programmatic dependent launch for every mode alike — torch.compile's
    kernels (``torch._inductor.config.triton.enable_pdl``) and ours (``kernels/overlap.py``: the k-tiled and batch-1 W4
    kernels, the split-K attention; ``qwenquant bench e2e --pdl``); both
    switches stay on for the rest of the process, and the compiled decode step is rebuilt under them. ``attend``: the
    decode attention of every mode alike (``StaticDecoder``; the prefill is causal SDPA either way): by default since
    session 18 our split-K kernel with q / k norm, rotary and the cache write inside it (the fastest measured path for
    bf16 and W4 alike, ``results/head_attention_b1_h100.json``); ``"filled"`` is cuDNN's SDPA as before.
    ``epilogues``: ``StaticDecoder(epilogues=...)`` for every decode step (True, the default since session 20, or
    some of "norm", "silu", or False) — the residual adds, RMSNorms and SiLU·mul inside the batch-1 W4 kernels where
    ``fused.epilogue_ok`` (fused W2/W4 at batch <= ``fused.EPILOGUE_MAX_M``; 0.17 ms less per step at batch 1 and 8
    on an H100, ``results/epilogues_step_h100.json``); each decode entry records which ran. bf16 has no such kernel
    and keeps torch.compile's fused add + norm and SiLU·mul kernels."""
    import json

    from qwenquant.bench.hw import environment
    from qwenquant.kernels import decode_attention as attention_module
    from qwenquant.kernels import overlap
    from qwenquant.runtime import auto, fused, native

    if attend not in ATTEND:  # before minutes of model building
        raise ValueError(f"attend={attend!r}: expected one of {', '.join(ATTEND)}")
    unknown = [m for m in modes if m not in E2E_MODES]
    if unknown:
        raise ValueError(f"unknown e2e mode(s) {unknown}; known: {', '.join(E2E_MODES)}")
    if pdl:
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config.triton, "enable_pdl"):
            raise ValueError(f"e2e.run(pdl=True) needs torch.compile's enable_pdl (torch {torch.__version__} lacks it)")
        inductor_config.triton.enable_pdl = True
        overlap.PDL_ENABLED = True
        global _compiled_layer_step
        _compiled_layer_step = None  # compiled (if ever) without PDL: compile again under the new switch
        from torch import _dynamo

        _dynamo.reset()

    model = build_model(n_layers)
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in decoder_linears(model)]
    if merged:
        merge_projections(model)
        torch.cuda.empty_cache()
    results = [measure(model, "bf16", attend, epilogues)]
    head = model.lm_head.weight.detach().to("cpu")
    summary = {}

    def save():
        base = results[0]
        for r in results[1:]:
            summary[r["mode"]] = {"prefill_x": r["prefill_tok_s"] / base["prefill_tok_s"],
                                  **{f"decode_b{b}_x": r["decode"][b]["tok_s"] / base["decode"][b]["tok_s"] for b in BATCHES},
                                  "linear_bytes_x": r["linear_weight_bytes"] / base["linear_weight_bytes"],
                                  "lm_head_bytes_x": r["lm_head_bytes"] / base["lm_head_bytes"]}
        # every tuning decision (which kernel / which mode per shape and M bucket, with the timings): the
        # per-GEMM table and the end-to-end step can then be traced to the same choices
        tuning = {t.name: t.table() for t in (fused.TUNER, auto.TUNER, native.TUNER)}
        doc = {"kind": "e2e", "model": "qwen3-8b (random weights)", "env": environment(), "ctx": CTX,
               "attention": {"filled": f"SDPA over the {CTX // 2 + 1} filled positions of the static cache",
                             "split": f"split-K kernels (kernels/decode_attention.py) over the {CTX // 2 + 1} filled "
                                      "positions of the static cache",
                             "prep": f"split-K kernels over the {CTX // 2 + 1} filled positions, after one kernel "
                                     "for q / k norm, rotary and the cache write (kernels/decode_prep.py)",
                             "prep-in-split": f"split-K kernels over the {CTX // 2 + 1} filled positions, q / k norm, "
                                              "rotary and the cache write inside the split kernel",
                             "masked": f"SDPA over the whole {CTX}-position cache under a position mask"}[attend],
               "attention_target_programs": attention_module.TARGET_PROGRAMS,
               "attention_target_programs_batch1": attention_module.BATCH1_TARGET_PROGRAMS,
               "attention_merge_in_split": attention_module.MERGE_IN_SPLIT,
               "attention_whole_slice_max": attention_module.WHOLE_SLICE_MAX,
               "fold_norm": True, "epilogues": epilogues, "epilogue_max_m": fused.EPILOGUE_MAX_M,
               "projections": "merged qkv, gate_up" if merged else "separate q, k, v, o, gate, up, down",
               "fused_copies": ",".join(sorted(fused.FUSED_COPIES)) or "none", "fused_weights": fused.describe_weights(),
               "batch1_persistent": fused.OFFER_BATCH1_PERSISTENT,
               "batch1_mma": fused.OFFER_BATCH1_MMA,
               "pdl": overlap.pdl_ok("cuda"), "pdl_release_at_start": overlap.RELEASE_AT_START,
               "pdl_attention_release_at_start": overlap.ATTENTION_RELEASE_AT_START,
               "inductor_pdl": _inductor_pdl(), "wgmma_ws": fused.OFFER_WGMMA_WS,
               "results": results, "summary": summary, "tuning": tuning}
        if out_path:
            with open(out_path, "w") as f:
                json.dump(doc, f, default=str)
        return doc

    save()
    for name in modes:
        spec, mode, with_head = E2E_MODES[name]
        t = time.time()
        quantize_model(model, originals, spec, mode, head=head, quantize_head=with_head)
        log.info("quantized %s in %.0fs", name, time.time() - t)
        try:
            results.append(measure(model, name, attend, epilogues))
        except (RuntimeError, ValueError) as e:
            log.warning("e2e %s failed: %s", name, str(e)[:500])
        save()
    return save()
