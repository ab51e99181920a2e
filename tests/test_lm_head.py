"""Quantizing the output projection too (``QuantRecipe.lm_head``): which methods, what it does to a tied
embedding, that a checkpoint carries it, and that GPTQ's head beats RTN's on the error GPTQ minimizes."""

import json
import subprocess
import sys

import pytest
import torch

from qwenquant import api
from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime.quant_linear import QuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _tiny_llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def test_recipe_key_unchanged_without_the_option():
    """Checkpoints and sweep caches keyed on a recipe from before the option keep their key."""
    assert "lm_head" not in api.method_config("gptq", bits=4, group_size=32).to_dict()
    assert api.method_config("gptq", bits=4, group_size=32, lm_head=True).to_dict()["lm_head"] is True


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_scale_migrating_methods_are_refused(method):
    with pytest.raises(ValueError, match=f"lm_head=True: {method} migrates scales"):
        api.method_config(method, bits=8 if method == "smoothquant" else 4, lm_head=True)


def test_refused_recipe_leaves_the_model_untouched():
    """A recipe built around method_config's check still fails before the first layer is quantized."""
    from qwenquant.quantize import QuantRecipe

    model = _tiny_llama(tied=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = QuantRecipe(method=api.method_config("awq", bits=4, group_size=32).method, lm_head=True)
    with pytest.raises(ValueError, match="lm_head quantization supports methods without scale migration"):
        api.quantize(model, None, recipe, torch.randint(0, 320, (2, 16)), progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_lm_head_option_must_be_a_bool():
    with pytest.raises(ValueError, match="lm_head='false': expected true or false"):
        api.method_config("rtn", bits=4, lm_head="false")


@pytest.mark.parametrize("method,kw", [("billm", dict(bits=1)), ("gptq", dict(bits=4, group_size=32, act_bits=8))])
def test_billm_and_act_bits_heads(method, kw):
    """BiLLM packs the head in its binary planes; with act_bits the head quantizes its input per token like every
    other linear. Both run through the model and stay close enough to the original to be the same model."""
    model = _tiny_llama(tied=True)
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, ids)
    api.quantize(model, None, api.method_config(method, lm_head=True, **kw), ids, progress=False)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.act_bits == kw.get("act_bits")
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and 0 < float((out - ref).norm() / ref.norm()) < 1.0


def test_rtn_head_is_the_fake_quant_head():
    """RTN needs no data: the packed head dequantizes to exactly the fake-quantized weight, the logits follow."""
    model = _tiny_llama(tied=False)
    w = model.lm_head.weight.detach().clone()
    emb = model.model.embed_tokens.weight.detach().clone()
    report = api.quantize(model, None, api.method_config("rtn", bits=4, group_size=32, lm_head=True), None,
                          progress=False)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and (head.out_features, head.in_features) == (320, 64)
    ref = quantize_weight(w, QuantSpec(4, 32, False)).dequantize()
    torch.testing.assert_close(head.dequantized_weight(torch.float32), ref, rtol=0, atol=1e-6)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    # 2 layers x 7 linears + the head
    assert report.quantized_params == sum(m.in_features * m.out_features for m in model.modules()
                                          if isinstance(m, QuantLinear))
    assert report.quantized_params > 2 * (4 * 64 * 64 // 2 + 3 * 64 * 128) + 320 * 64 - 1
    assert report.recipe["lm_head"] is True


def test_tied_model_is_untied_and_roundtrips(tmp_path):
    """SmolLM2-like tied embeddings: the embedding keeps its full-precision table, the head is packed, and a
    saved checkpoint reloads untied with the same logits."""
    model = _tiny_llama(tied=True)
    ids = torch.randint(0, 320, (2, 16))
    emb = model.model.embed_tokens.weight.detach().clone()
    report = api.quantize(model, None, api.method_config("gptq", bits=4, group_size=32, lm_head=True), ids,
                          progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings is False
    assert torch.equal(model.model.embed_tokens.weight, emb)
    out = _logits(model, ids)
    path = api.save_quantized(model, None, report, tmp_path / "tied-head")
    modules = json.loads((path / "qwenquant_config.json").read_text())["modules"]
    assert "lm_head" in modules and modules["lm_head"]["out_features"] == 320
    model2, _, info = api.load(str(path))
    assert isinstance(model2.lm_head, QuantLinear) and info["recipe"]["lm_head"] is True
    assert torch.equal(model2.model.embed_tokens.weight, emb)
    assert torch.equal(_logits(model2, ids), out)


def test_gptq_head_beats_rtn_on_its_objective():
    """GPTQ's head, fitted on the final-norm outputs of the calibration tokens, has a lower output error on those
    inputs than RTN's head of the same grid (the error GPTQ minimizes: ‖(W − Ŵ) Xᵀ‖; RTN's head is data-free, so
    both are measured on GPTQ's own inputs)."""
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    model = _tiny_llama(tied=False)
    w = model.lm_head.weight.detach().clone()
    api.quantize(model, None, api.method_config("gptq", bits=3, group_size=32, lm_head=True), ids, progress=False)
    with torch.no_grad():
        x = model.model(ids).last_hidden_state  # the head's input: final norm of the quantized layers' outputs
    heads = {"gptq": model.lm_head.dequantized_weight(torch.float32),
             "rtn": quantize_weight(w, QuantSpec(3, 32, False)).dequantize()}
    errs = {name: float((x @ (w - w_hat).T).norm() / (x @ w.T).norm()) for name, w_hat in heads.items()}
    assert 0 < errs["gptq"] < 0.9 * errs["rtn"], errs


def test_cli_flag(tmp_path):
    out = tmp_path / "q"
    args = ["quantize", "--model", "tiny-qwen3", "--method", "rtn", "--bits", "4", "--group-size", "32", "--lm-head",
            "--out", str(out), "--json"]
    r = subprocess.run([sys.executable, "-m", "qwenquant.cli", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    cfg = json.loads((out / "qwenquant_config.json").read_text())
    assert result["out"] == str(out) and "lm_head" in cfg["modules"] and cfg["recipe"]["lm_head"] is True
