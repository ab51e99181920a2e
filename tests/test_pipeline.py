"""End to end on the tiny Qwen3 and Qwen3-MoE: every method quantizes, saves, reloads with the same
logits; the MoE log shows each expert's tokens; bad input fails loudly and leaves nothing behind."""

import contextlib
import io
import json
import logging
import subprocess
import sys

import pytest
import torch

from qwenquant import api, cli
from qwenquant.model.calibrate import first_layer_inputs
from qwenquant.runtime.quant_linear import QuantLinear

RECIPES = {
    "rtn-w4g32": dict(method="rtn", bits=4, group_size=32),
    "gptq-w4g32": dict(method="gptq", bits=4, group_size=32),
    "gptq-w3pc-sym": dict(method="gptq", bits=3, group_size=None, symmetric=True),
    "awq-w4g32": dict(method="awq", bits=4, group_size=32),
    "smoothquant-w8a8": dict(method="smoothquant", bits=8),
    "smoothquant-w4a4": dict(method="smoothquant", bits=4, act_bits=4),
    "billm": dict(method="billm", bits=1),
}


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = api.load("tiny-qwen3")
    return api.calibration_ids(tok, "austen", n=8, seqlen=64, seed=0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_layerwise_runner_reproduces_the_model(name, calib):
    model, _, info = api.load(name)
    from qwenquant.model.arch import architecture_for

    arch = architecture_for(info["architecture"])
    inputs = first_layer_inputs(model, calib[:2], torch.device("cpu"), batch_size=1, dtype=torch.float32)
    h = inputs.hidden
    for layer in model.get_submodule(arch.layers):
        inputs.hidden = h
        h = inputs.run(layer)
    logits = model.lm_head(model.model.norm(h))
    torch.testing.assert_close(logits, _logits(model, calib[:2]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_quantize_save_reload(model_name, recipe_name, calib, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qwenquant")
    model, tok, _ = api.load(model_name)
    ref = _logits(model, calib[:2])
    embed_before = model.model.embed_tokens.weight.clone()
    recipe = api.method_config(**RECIPES[recipe_name])
    report = api.quantize(model, tok, recipe, calib, progress=False)

    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    n_layers = model.config.num_hidden_layers
    per_layer = 7 if model_name == "tiny-qwen3" else 4 + 3 * model.config.num_experts
    assert len(qlinears) == n_layers * per_layer
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in n)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.model.embed_tokens.weight, embed_before)

    out = _logits(model, calib[:2])
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < (1.0 if recipe_name in ("billm", "smoothquant-w4a4") else 0.5), rel

    path = api.save_quantized(model, tok, report, tmp_path / "ckpt")
    model2, _, info = api.load(str(path))
    assert info["quantized"] and info["recipe"]["method"] == RECIPES[recipe_name]["method"]
    assert torch.equal(_logits(model2, calib[:2]), out)
    stored = json.loads((path / "qwenquant_config.json").read_text())
    assert stored["avg_bits"] == pytest.approx(report.avg_bits)

    if model_name == "tiny-qwen3-moe":
        expected_tokens = calib.numel() * model.config.num_experts_per_tok
        for layer in report.layers:
            counts = layer.expert_tokens["mlp.experts.*"]
            assert len(counts) == model.config.num_experts and sum(counts) == expected_tokens
        assert sum("tokens per expert" in r.message for r in caplog.records) == n_layers


def test_moe_fallback_is_counted(calib):
    model, tok, _ = api.load("tiny-qwen3-moe")
    recipe = api.method_config("gptq", bits=4, group_size=32, min_expert_tokens=10**9)
    report = api.quantize(model, tok, recipe, calib, progress=False)
    n_exp = model.config.num_experts
    # every expert's up/gate site and down site fell back, in every layer
    assert report.fallback_count == model.config.num_hidden_layers * n_exp * 3
    assert torch.isfinite(_logits(model, calib[:1])).all()


def test_bits_reported():
    assert api.method_config("rtn", bits=4, group_size=32).method.spec.bits == 4
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        api.method_config("foo")
    with pytest.raises(ValueError, match="billm is a ~1.1-bit method"):
        api.method_config("billm", bits=4)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dampp'\]"):
        api.method_config("gptq", bits=4, dampp=0.1)


# --- the command line, bad input -------------------------------------------------------------


def qq(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "qwenquant.cli", *args], capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"qwenquant {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


QUICK = ["--calib", "austen", "--calib-samples", "4", "--calib-seqlen", "64"]


def test_cli_quantize_json(tmp_path):
    out = tmp_path / "q"
    r = qq("quantize", "--model", "tiny-qwen3", "--method", "gptq", "--bits", "4", "--group-size", "32", *QUICK,
           "--out", str(out), "--json")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["out"] == str(out) and result["avg_bits"] == pytest.approx(4 + 20 / 32)
    assert (out / "model.safetensors").is_file() and (out / "qwenquant_config.json").is_file()


def _fails(tmp_path, *args, message: str):
    """In-process (a subprocess per case would spend its time importing transformers)."""
    out = tmp_path / "never"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["quantize", *args, "--out", str(out)])
    assert code == 2, err.getvalue()
    assert message in err.getvalue(), err.getvalue()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no temp leftovers


def test_bad_inputs(tmp_path):
    base = ["--method", "rtn", "--bits", "4", *QUICK]
    _fails(tmp_path, "--model", str(tmp_path / "nope"), *base, message="not found")
    alien = tmp_path / "gpt2"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _fails(tmp_path, "--model", str(alien), *base, message="unsupported architecture 'GPT2LMHeadModel'")
    for bits in ("0", "9"):
        _fails(tmp_path, "--model", "tiny-qwen3", "--method", "rtn", "--bits", bits, *QUICK,
               message=f"bits must be an integer from 1 to 8, got {bits}")
    _fails(tmp_path, "--model", "tiny-qwen3", *base, "--group-size", "48", message="group size 48 does not divide")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(tmp_path, "--model", "tiny-qwen3", "--method", "gptq", "--bits", "4", "--calib", str(empty),
           message="calibration text is empty")
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    _fails(tmp_path, "--model", "tiny-qwen3", "--method", "gptq", "--bits", "4", "--calib", str(short),
           "--calib-seqlen", "64", message="calibration text too short")


def test_nan_weight_is_refused(tmp_path):
    model, tok, _ = api.load("tiny-qwen3")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    src = tmp_path / "nan-model"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    _fails(tmp_path, "--model", str(src), "--method", "rtn", "--bits", "4", *QUICK,
           message="model.layers.1.mlp.down_proj.weight")


def test_qwen2_architecture_quantizes(tmp_path):
    """Llama-structured classes share the dense table: a tiny random Qwen2 goes through GPTQ."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (4, 32))
    ref = _logits(model, ids)
    report = api.quantize(model, None, api.method_config("awq", bits=4, group_size=32), ids, progress=False)
    out = _logits(model, ids)
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.5
    # Qwen2 has q/k/v biases: they survive into QuantLinear; MHA lets AWQ fold v_proj -> o_proj too
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert report.layers[0].skipped_folds == []
    assert "self_attn.v_proj" in report.layers[0].alphas


def test_corrupt_checkpoint_is_refused(tmp_path, calib):
    model, tok, _ = api.load("tiny-qwen3")
    report = api.quantize(model, tok, api.method_config("rtn", bits=4, group_size=32), calib, progress=False)
    path = api.save_quantized(model, tok, report, tmp_path / "ckpt")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        api.load(str(path))
    (path / "qwenquant_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        api.load(str(path))


def test_dtype_cast_keeps_packed_storage(calib):
    model, tok, _ = api.load("tiny-qwen3")
    api.quantize(model, tok, api.method_config("rtn", bits=4, group_size=32), calib, progress=False)
    q = model.model.layers[0].mlp.down_proj
    scale, w = q.scale.clone(), q.dequantized_weight(torch.float32)
    model.to(torch.bfloat16)
    assert q.scale.dtype == torch.float16 and torch.equal(q.scale, scale)
    assert torch.equal(q.dequantized_weight(torch.float32), w)
    assert model(calib[:1]).logits.dtype == torch.bfloat16


def test_tied_embeddings_roundtrip(tmp_path):
    """SmolLM2-like: lm_head shares the embedding; the checkpoint stores it once and re-ties it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (2, 16))
    report = api.quantize(model, None, api.method_config("gptq", bits=4, group_size=32), ids, progress=False)
    out = _logits(model, ids)
    path = api.save_quantized(model, None, report, tmp_path / "tied")
    model2, tok2, info = api.load(str(path))
    assert tok2 is None and info["architecture"] == "LlamaForCausalLM"
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(model2, ids), out)


def test_c4_style_document_calibration(tmp_path):
    _, tok, _ = api.load("tiny-qwen3")
    shard = tmp_path / "c4-train.00000-of-01024.json"
    docs = [{"text": "short doc."}] + [{"text": f"Document {i}. " + "word " * (50 + 20 * i)} for i in range(6)]
    shard.write_text("\n".join(json.dumps(d) for d in docs))
    ids = api.calibration_ids(tok, f"c4={shard}", n=5, seqlen=40, seed=0)
    assert ids.shape == (5, 40)
    assert torch.equal(ids, api.calibration_ids(tok, f"c4={shard}", n=5, seqlen=40, seed=0))  # reproducible
    with pytest.raises(ValueError, match="longer than 4000 tokens"):
        api.calibration_ids(tok, f"c4={shard}", n=2, seqlen=4000, seed=0)
