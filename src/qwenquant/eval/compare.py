"""Methods side by side on one model: quantize copies of one loaded model, score each on the same windows.

The building block of the core quality check (tests/test_smollm2_quality.py) and of
``scripts/core_quality_table.py``: one calibration set and one evaluation stream for every method,
so differences are the methods', not the data's.
"""

from __future__ import annotations

import copy
import time

from qwenquant import api
from qwenquant.eval.perplexity import PerplexityConfig, evaluate_perplexity
from qwenquant.eval.sources import load_token_stream


def compare_perplexity(model_source: str, recipes: dict[str, dict], calib_source: str = "austen",
                       calib_n: int = 32, calib_len: int = 512, ppl_source: str = "austen",
                       eval_len: int = 512, eval_windows: int | None = 16, seed: int = 0,
                       device=None, kl: bool = True) -> list[dict]:
    """One row per recipe (plus the unquantized model first): name, ppl, avg_bits, quantize_seconds,
    and with ``kl`` the KL divergence / top-1 agreement against the unquantized model."""
    base, tok, _ = api.load(model_source)
    stream = load_token_stream(ppl_source, tok)
    cfg = PerplexityConfig(seqlen=eval_len, max_windows=eval_windows)
    rows = [{"name": "unquantized", "ppl": evaluate_perplexity(base, stream, cfg, progress=False).ppl,
             "avg_bits": 32.0, "quantize_seconds": 0.0}]
    calib = api.calibration_ids(tok, calib_source, calib_n, calib_len, seed=seed)
    for name, kw in recipes.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = api.quantize(model, tok, api.method_config(**kw), calib, device=device, progress=False)
        seconds = time.perf_counter() - t0
        result = evaluate_perplexity(model, stream, cfg, reference=base if kl else None, progress=False)
        row = {"name": name, "ppl": result.ppl, "avg_bits": report.avg_bits, "quantize_seconds": seconds}
        if result.agreement is not None:
            row.update(kl_mean=result.agreement.kl_mean, kl_p99=result.agreement.kl_p99,
                       top1_agreement=result.agreement.top1_agreement)
        rows.append(row)
        del model
    return rows
