"""Reports: the rendered table carries exactly the store's numbers, in the study's order; plots exist."""

from __future__ import annotations

import csv
import json
import io
import math

import pytest

from qwenquant.io.store import CellRecord, ResultStore
from qwenquant.report import build_table, to_csv, to_markdown, write_report
from qwenquant.report.table import format_value


def _cell(key, method, bits, group, act, evaluation, metrics, avg_bits=None, dtype="float32", finished="2025-01-01T00:00:01"):
    return CellRecord(
        key=key, quant_key=f"{method}-{bits}-{group}-{act}", model="smollm2", method=method, bits=bits,
        group_size=group, act_bits=act, symmetric=None if method == "baseline" else False, evaluation=evaluation,
        config={"evaluation": {"kind": evaluation.partition(":")[0], "source": "austen", "seqlen": 512,
                               "max_windows": 8, "kl": True, "task": "arc_easy", "limit": 40}},
        metrics=metrics,
        details={"quantization": {} if method == "baseline" else {"avg_bits": avg_bits, "seconds": 3.0},
                 "model": {"dtype": dtype}},
        provenance={"versions": {"torch": "2.x"}, "hardware": {"cpu": "test cpu"}, "git_commit": "unknown"},
        started_at="2025-01-01T00:00:00", finished_at=finished, wall_seconds=2.0,
    )


CELLS = [
    _cell("g4p", "gptq", 4, 64, None, "perplexity:austen", {"ppl:austen": 24.123456, "kl:austen": 0.0456, "top1:austen": 0.91}, 4.5),
    _cell("g4t", "gptq", 4, 64, None, "task:arc_easy", {"acc:arc_easy": 0.55, "acc_norm:arc_easy": 0.5}, 4.5),
    _cell("bp", "baseline", None, None, None, "perplexity:austen", {"ppl:austen": 22.2914}),
    _cell("bt", "baseline", None, None, None, "task:arc_easy", {"acc:arc_easy": 0.6, "acc_norm:arc_easy": 0.525}),
    _cell("r3p", "rtn", 3, 64, None, "perplexity:austen", {"ppl:austen": 7512.0, "kl:austen": 4.2, "top1:austen": 0.12}, 3.5),
    _cell("r4p", "rtn", 4, 64, None, "perplexity:austen", {"ppl:austen": 30.5, "kl:austen": 0.09, "top1:austen": 0.85}, 4.5),
    _cell("b1p", "billm", 1, None, None, "perplexity:austen", {"ppl:austen": math.inf, "kl:austen": math.nan, "top1:austen": 0.01}, 1.09),
    _cell("s8p", "smoothquant", 8, None, 8, "perplexity:austen", {"ppl:austen": 22.9, "kl:austen": 0.01, "top1:austen": 0.97}, 8.25),
]


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as s:
        for c in CELLS:
            assert s.put(c)
        yield s


def test_row_and_column_order(store):
    table = build_table(store.cells())
    assert [(r.method, r.bits) for r in table.rows] == [
        ("baseline", None), ("rtn", 4), ("rtn", 3), ("gptq", 4), ("smoothquant", 8), ("billm", 1)]
    assert table.columns == ("ppl:austen", "kl:austen", "top1:austen", "acc:arc_easy", "acc_norm:arc_easy")
    md = to_markdown(table)
    first_row = md.splitlines()[2]
    assert first_row.startswith("| smollm2 | fp32 | — |")  # the original, labelled by its dtype, first


def test_csv_is_the_store_exactly(store):
    table = build_table(store.cells())
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert len(rows) == 6
    stored = {}
    for c in store.cells():
        stored.setdefault(c.quant_key, {}).update(c.metrics)
    for row in rows:
        expected = stored[row["quant_key"]]
        for name in table.columns:
            if name in expected:
                v = float(row[name])
                assert v == expected[name] or (math.isnan(v) and math.isnan(expected[name])), (row["quant_key"], name)
            else:
                assert row[name] == ""
    billm = next(r for r in rows if r["method"] == "billm")
    assert billm["w_bits"] == "1" and billm["avg_bits"] == "1.09" and billm["group"] == ""


def test_markdown_numbers_are_the_store_rounded(store):
    md = to_markdown(build_table(store.cells()), timing=False)
    lines = {line.split(" | ")[1] + " " + line.split(" | ")[2]: line for line in md.splitlines() if line.startswith("| smollm2")}
    assert "| 22.3 |" in lines["fp32 —"] and "| 60.0 | 52.5 |" in lines["fp32 —"]
    assert "| 24.1 | 0.0456 | 91.0 | 55.0 | 50.0 |" in lines["gptq 4"]
    assert "| 7.5e3 |" in lines["rtn 3"]
    assert "| inf | nan | 1.0 |" in lines["billm 1"]
    assert "quant s" not in md and "quant s" in to_markdown(build_table(store.cells()))


@pytest.mark.parametrize("name, value, text", [
    ("ppl:x", 12.7, "12.7"), ("ppl:x", 9.391, "9.39"), ("ppl:x", 223.4, "223"), ("ppl:x", 86012.0, "8.6e4"),
    ("acc:arc_easy", 0.4725, "47.2"), ("mmlu", 0.523, "52.3"), ("kl:x", 0.001234, "0.00123"), ("ppl:x", None, "—"),
])
def test_number_format(name, value, text):
    assert format_value(name, value) == text


def test_write_report_files(store, tmp_path):
    files = write_report(store, tmp_path / "out")
    assert files.markdown.read_text().startswith("| model | method |")
    assert files.csv.read_text().count("\n") == 7
    assert {p.name for p in files.plots} == {"ppl_vs_bits_smollm2.png", "accuracy_vs_bits_smollm2.png"}
    for p in files.plots:
        data = p.read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_later_measurement_wins_and_is_noted(tmp_path):
    again = _cell("g4p2", "gptq", 4, 64, None, "perplexity:austen", {"ppl:austen": 25.0, "kl:austen": 0.05, "top1:austen": 0.9},
                  4.5, finished="2025-01-02T00:00:00")
    with ResultStore(tmp_path / "r.sqlite") as s:
        for c in (*CELLS, again):
            s.put(c)
        table = build_table(s.cells())
    gptq = next(r for r in table.rows if r.method == "gptq")
    assert gptq.values["ppl:austen"] == 25.0
    assert any("measured twice" in n for n in table.notes)


def test_empty_store_is_an_error(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as s, pytest.raises(ValueError, match="no finished cells"):
        write_report(s, tmp_path / "out")


def test_report_command(store, tmp_path, capsys):
    from qwenquant.cli import main

    assert main(["report", "--store", str(store.path), "--out", str(tmp_path / "rep"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "| smollm2 | fp32 |" in out and "plot:  " in out
    assert json.loads(out.strip().splitlines()[-1])["rows"] == 6
    assert main(["report", "--store", str(tmp_path / "missing.sqlite")]) == 2  # a clear error, no new file
    assert not (tmp_path / "missing.sqlite").exists()
