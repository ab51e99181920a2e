"""The e2e benchmark's own layer functions compute what the HF Qwen3 forward computes (tiny random model, CPU):
prefill, merged projections, and the static-cache decode step, in float32 and with quantized layers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwenquant.bench import e2e  # noqa: E402
from qwenquant.numerics import QuantSpec  # noqa: E402


def tiny_model():
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def decode_logits(model, ids, attend="filled"):
    torch.manual_seed(1)  # the same random static cache for both layouts
    dec = e2e.StaticDecoder(model, ids.shape[0], ctx=16, device="cpu", attend=attend)
    dec.ids = ids[:, -1:]
    return dec.step()


@torch.no_grad()
def test_decode_reading_the_filled_positions_equals_the_masked_cache():
    """The e2e step's attention over positions 0 … pos only is the masked attention over the whole cache."""
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 5))
    torch.testing.assert_close(decode_logits(model, ids, "filled"), decode_logits(model, ids, "masked"),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attend='window'"):
        e2e.StaticDecoder(model, 1, ctx=16, device="cpu", attend="window")


@torch.no_grad()
def test_prefill_and_decode_match_hf_and_merged_layout():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 11))
    ref = model(ids, use_cache=False).logits[:, -1:]
    ours = e2e.prefill_logits(model, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    step = decode_logits(model, ids)

    originals = [getattr(p, n).weight.detach().clone() for p, n in e2e.decoder_linears(model)]
    e2e.merge_projections(model)
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj") and not hasattr(model.model.layers[0].mlp, "up_proj")
    torch.testing.assert_close(e2e.prefill_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode_logits(model, ids), step, rtol=1e-4, atol=1e-4)

    # quantized: merged QuantLinears (quantized per projection, then joined) = the separate ones
    spec = QuantSpec(4, 32, False)
    e2e.quantize_model(model, originals, spec, "fake")
    merged_q = e2e.prefill_logits(model, ids)
    assert len(e2e.projection_modules(model)) == 4 * 2
    sep = tiny_model()
    e2e.quantize_model(sep, originals, spec, "fake")
    assert len(e2e.projection_modules(sep)) == 7 * 2
    torch.testing.assert_close(merged_q, e2e.prefill_logits(sep, ids), rtol=1e-4, atol=1e-4)
    assert e2e.linear_bytes(model) == e2e.linear_bytes(sep) > 0


@torch.no_grad()
def test_head_modes_swap_the_head_both_ways():
    """A ``+head`` mode packs lm_head (RTN of the bf16 weight, the same grid); the next mode without it gets the
    bf16 head back, equal to the original; the decode step runs on either."""
    from qwenquant.numerics import quantize_weight
    from qwenquant.runtime.quant_linear import QuantLinear

    model = tiny_model()
    ids = torch.randint(0, 97, (2, 5))
    originals = [getattr(p, n).weight.detach().clone() for p, n in e2e.decoder_linears(model)]
    head = model.lm_head.weight.detach().clone()
    spec = QuantSpec(4, 32, False)
    e2e.quantize_model(model, originals, spec, "fake", head=head, quantize_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    torch.testing.assert_close(model.lm_head.dequantized_weight(torch.float32),
                               quantize_weight(head, spec).dequantize(), rtol=0, atol=1e-6)
    assert torch.isfinite(decode_logits(model, ids)).all()
    e2e.quantize_model(model, originals, spec, "fake", head=head)
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, head)
    assert torch.isfinite(decode_logits(model, ids)).all()
    assert all(len(v) == 3 for v in e2e.E2E_MODES.values()) and e2e.E2E_MODES["w4g128-fused+head"][2]


@torch.no_grad()
def test_split_attention_step_equals_sdpa_and_compiles_without_a_break():
    """attend="split" (our kernels' op; its reference on a CPU) gives the SDPA step's logits, and dynamo traces the
    layer step with the op in it as one graph (fullgraph: a graph break would raise)."""
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(decode_logits(model, ids, "split"), decode_logits(model, ids, "filled"),
                               rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    dec = e2e.StaticDecoder(model, 2, ctx=16, device="cpu", attend="split")
    m = model.model
    h = m.embed_tokens(ids[:, -1:])
    cos, sin = m.rotary_emb(h, dec.pos.view(1, 1).expand(2, 1))
    args = (m.layers[0], h, dec.kc[0], dec.vc[0], dec.pos, cos, sin, None, dec.rope, dec.filled, True)
    eager = e2e._layer_step(*args)
    traced = torch.compile(e2e._layer_step, backend="eager", fullgraph=True)(*args)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prep_and_folded_norm_steps_equal_the_plain_step():
    """attend="prep" (our norm + rotary + cache-write op, its reference on a CPU) and fold_norm (each layer ends with
    the next one's input norm) compute the plain step's logits and write the same caches."""
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 5))
    ref = decode_logits(model, ids, "filled")
    torch.testing.assert_close(decode_logits(model, ids, "prep"), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_logits(model, ids, "prep-in-split"), ref, rtol=1e-5, atol=1e-5)
    steps = {}
    for fold in (False, True):
        torch.manual_seed(1)
        dec = e2e.StaticDecoder(model, 2, ctx=16, device="cpu", attend="prep", fold_norm=fold)
        dec.ids = ids[:, -1:]
        steps[fold] = (dec.step(), dec.kc[1].clone(), dec.vc[1].clone())
    for a, b in zip(steps[False], steps[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prep=True is the prologue of the split-K attention"):
        m = model.model
        h = m.embed_tokens(ids[:, -1:])
        cos, sin = m.rotary_emb(h, dec.pos.view(1, 1).expand(2, 1))
        e2e._layer_step(m.layers[0], h, dec.kc[0], dec.vc[0], dec.pos, cos, sin, None, dec.rope, dec.filled, False, True)


@pytest.mark.parametrize("attend,op", [("prep", "decode_prep"), ("prep-in-split", "decode_attention_prep")])
@torch.no_grad()
def test_inductor_writes_the_caches_in_place_through_the_prep_op(attend, op):
    """torch.compile (inductor, as the e2e step) calls the mutating op on the cache buffers themselves: no copy of
    a cache appears in the generated code, and the compiled step writes position ``pos`` of the caller's cache."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model()
    torch.manual_seed(1)
    dec = e2e.StaticDecoder(model, 2, ctx=16, device="cpu", attend=attend)
    m = model.model
    h = m.embed_tokens(dec.ids)
    cos, sin = m.rotary_emb(h, dec.pos.view(1, 1).expand(2, 1))
    args = (m.layers[0], h, dec.kc[0], dec.vc[0], dec.pos, cos, sin, None, dec.rope, dec.filled, True, dec.prep)
    kw = dict(x=m.layers[0].input_layernorm(h), next_norm=m.layers[1].input_layernorm)
    kc, vc = dec.kc[0].clone(), dec.vc[0].clone()
    eager = e2e._layer_step(*args[:2], kc, vc, *args[4:], **kw)
    torch._dynamo.reset()
    compiled, code = run_and_get_code(torch.compile(e2e._layer_step, dynamic=False), *args, **kw)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dec.kc[0], kc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec.vc[0], vc, rtol=1e-5, atol=1e-5)
    src = "\n".join(code)
    assert f"qwenquant.{op}.default(" in src
    assert "copy_" not in src and "clone" not in src, [ln for ln in src.splitlines() if "copy_" in ln or "clone" in ln]

