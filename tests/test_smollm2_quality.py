"""The real model, offline: SmolLM2-135M on held-out Austen, methods compared in one run.

Default run (reduced: 8 x 256 calibration tokens, 4 x 256 evaluation tokens, ~2 min on 2 cores):
RTN w8 within 1 % of the unquantized model; at 3 bits / group 64, GPTQ and AWQ below RTN.
The `slow` variant uses the issue's 32 x 512 calibration and 16 x 512 evaluation windows; its
numbers are the README's table (`python scripts/core_quality_table.py` prints them).
"""

import copy

import pytest
import torch

from qwenquant import api
from qwenquant.eval.perplexity import PerplexityConfig, evaluate_perplexity
from qwenquant.eval.sources import load_token_stream


def run_methods(calib_n: int, calib_len: int, eval_len: int, eval_windows: int, recipes: dict) -> dict:
    base, tok, _ = api.load("smollm2")
    stream = load_token_stream("austen", tok)
    cfg = PerplexityConfig(seqlen=eval_len, max_windows=eval_windows)
    ppl = {"fp32": evaluate_perplexity(base, stream, cfg, progress=False).ppl}
    calib = api.calibration_ids(tok, "austen", calib_n, calib_len, seed=0)
    for name, kw in recipes.items():
        model = copy.deepcopy(base)
        api.quantize(model, tok, api.method_config(**kw), calib, progress=False)
        ppl[name] = evaluate_perplexity(model, stream, cfg, progress=False).ppl
        del model
    return ppl


CORE = {
    "rtn-w8": dict(method="rtn", bits=8),
    "rtn-w3g64": dict(method="rtn", bits=3, group_size=64),
    "gptq-w3g64": dict(method="gptq", bits=3, group_size=64),
    "awq-w3g64": dict(method="awq", bits=3, group_size=64),
}


def check_core_ordering(ppl: dict) -> None:
    print(ppl)
    assert ppl["rtn-w8"] == pytest.approx(ppl["fp32"], rel=0.01)
    assert ppl["gptq-w3g64"] < 0.97 * ppl["rtn-w3g64"]
    assert ppl["awq-w3g64"] < 0.97 * ppl["rtn-w3g64"]
    assert ppl["rtn-w3g64"] > ppl["fp32"]


def test_smollm2_reduced_ordering():
    torch.manual_seed(0)
    check_core_ordering(run_methods(8, 256, 256, 4, CORE))


@pytest.mark.slow
def test_smollm2_issue_ordering():
    check_core_ordering(run_methods(32, 512, 512, 16, CORE))
