"""`qwenquant eval` end to end on the tiny random Qwen3 fixture."""

from __future__ import annotations

import json
import math

import pytest

from qwenquant.cli import main


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife. " * 40)
    return p


def test_eval_cli_ppl_and_self_kl(text_file, capsys):
    rc = main(["eval", "tiny-qwen3", "--ppl", str(text_file), "--seqlen", "64", "--max-windows", "3",
               "--kl", "tiny-qwen3", "--json", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["windows"] == 3 and result["tokens"] == 3 * 63 and result["seqlen"] == 64
    assert math.isclose(result["ppl"], math.exp(result["nll"]), rel_tol=1e-12)
    assert result["kl_mean"] == 0.0 and result["top1_agreement"] == 1.0
    assert any(line.startswith("  perplexity t.txt") for line in out)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "arc_medium"], "unknown task"),
    (["--ppl", "wikitext3"], "unknown perplexity source"),
    (["--kl", "tiny-qwen3"], "give --ppl"),
    ([], "nothing to evaluate"),
])
def test_eval_cli_bad_input(argv, message, capsys):
    assert main(["eval", "tiny-qwen3", *argv]) == 2
    assert message in capsys.readouterr().err
