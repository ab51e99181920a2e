"""The real model, offline: SmolLM2-135M on held-out Austen, methods compared in one run.

Default run (reduced: 8 x 256 calibration tokens, 4 x 256 evaluation tokens): RTN w8 within 1 % of
the unquantized model; at 3 bits / group 64, GPTQ and AWQ below RTN; KL to the original rising and
top-1 agreement falling from 8 to 4 to 3 bits. The `slow` variant uses the
issue's 32 x 512 calibration and 16 x 512 evaluation windows — the README's table
(`python scripts/core_quality_table.py` prints it).
"""

import pytest

from qwenquant.eval.compare import compare_perplexity

CORE = {
    "rtn-w8": dict(method="rtn", bits=8),
    "rtn-w4g64": dict(method="rtn", bits=4, group_size=64),
    "rtn-w3g64": dict(method="rtn", bits=3, group_size=64),
    "gptq-w3g64": dict(method="gptq", bits=3, group_size=64),
    "awq-w3g64": dict(method="awq", bits=3, group_size=64),
}


def check_core_ordering(rows: list[dict]) -> None:
    ppl = {r["name"]: r["ppl"] for r in rows}
    print(ppl)
    assert ppl["rtn-w8"] == pytest.approx(ppl["unquantized"], rel=0.01)
    assert ppl["rtn-w3g64"] > ppl["unquantized"]
    assert ppl["gptq-w3g64"] < 0.97 * ppl["rtn-w3g64"]
    assert ppl["awq-w3g64"] < 0.97 * ppl["rtn-w3g64"]
    # fidelity to the original degrades monotonically with fewer bits, and GPTQ keeps more of it
    kl = {r["name"]: r["kl_mean"] for r in rows[1:]}
    top1 = {r["name"]: r["top1_agreement"] for r in rows[1:]}
    assert 0 < kl["rtn-w8"] < kl["rtn-w4g64"] < kl["rtn-w3g64"]
    assert top1["rtn-w8"] > top1["rtn-w4g64"] > top1["rtn-w3g64"]
    assert kl["gptq-w3g64"] < kl["rtn-w3g64"]


def test_smollm2_reduced_ordering():
    check_core_ordering(compare_perplexity("smollm2", CORE, calib_n=8, calib_len=256, eval_len=256, eval_windows=4))


@pytest.mark.slow
def test_smollm2_issue_ordering():
    check_core_ordering(compare_perplexity("smollm2", CORE, calib_n=32, calib_len=512, eval_len=512, eval_windows=16))
