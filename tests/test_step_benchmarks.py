"""The decode-step A/B benchmarks (``benchmarks/head_attention_b1.py``, ``epilogues_step.py`` on ``benchmarks/step_variants.py``) run only on
the GPU machine; here their skeleton runs on a CPU with a tiny Qwen3, the bf16 variants, eager layers and a stub
timer, so a broken script shows up before a GPU call is spent on it."""

import json
import sys
from functools import partial
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script,kind,bf16_variants", [("head_attention_b1", "head_attention_b1", 5),
                                                       ("epilogues_step", "epilogues_step", 1)])
def test_step_benchmark_skeleton_runs_on_cpu(script, kind, bf16_variants, monkeypatch, tmp_path):
    from test_e2e_layers import tiny_model

    from qwenquant.bench import e2e

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(e2e, "build_model", tiny_model)
    monkeypatch.setattr(e2e, "compiled_layer_step", lambda: e2e._layer_step)
    monkeypatch.setattr(e2e, "StaticDecoder", partial(e2e.StaticDecoder, ctx=16, device="cpu"))
    timed = []
    monkeypatch.setattr(e2e, "_graph_ms", lambda step: (timed.append(step()), 1.0)[1])
    sys.modules.pop(script, None)
    mod = __import__(script)
    from step_variants import time_step_variants

    doc = time_step_variants(kind, f"{kind}.json", ["bf16"], mod.variants_for, batches=(2,), rounds=2)
    n = len(mod.variants_for("bf16"))
    assert n == bf16_variants and len(doc["steps"]) == 2 * n == len(timed)
    assert all(s["mode"] == "bf16" and s["batch"] == 2 and s["step_ms"] == 1.0 for s in doc["steps"])
    assert json.loads((tmp_path / f"{kind}.json").read_text())["steps"] == doc["steps"]


def test_step_benchmark_modes_are_checked_before_the_model_is_built(monkeypatch):
    from qwenquant.bench import e2e

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(e2e, "build_model", lambda: pytest.fail("built the model before checking the modes"))
    from step_variants import time_step_variants

    for modes in (["w4g128-fused", "bf16"], ["bf16", "w4g128-fast"]):
        with pytest.raises(ValueError, match="expected 'bf16' \\(first"):
            time_step_variants("x", "x.json", modes, lambda mode: [])
