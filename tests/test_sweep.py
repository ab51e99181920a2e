"""Sweeps: grid keys, skipping finished cells, resuming after kill -9, quantized-weight caching, and
refusing bad configs before any work. A fake backend stands in for models (no torch work at all),
so the bookkeeping is tested on its own; one slow test runs the real thing on tiny-qwen3.

This file is also the child process of the kill test: ``python tests/test_sweep.py child ...``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenquant.io.store import ResultStore
from qwenquant.report import build_table, to_markdown
from qwenquant.sweep import parse_config, run_sweep
from qwenquant.sweep.grid import QuantSetting

CONFIG = {
    "name": "fake",
    "models": ["tiny-qwen3"],
    "baseline": True,
    "calibration": {"source": "austen", "n": 4, "seqlen": 64},
    "quantize": [{"methods": ["rtn", "gptq"], "bits": [4, 3], "group_sizes": [32]},
                 {"methods": ["smoothquant"], "bits": [8], "act_bits": [8]}],
    "perplexity": [{"source": "austen", "seqlen": 64, "max_windows": 2, "kl": True}],
    "tasks": [{"name": "arc_easy", "limit": 5}],
}
N_CELLS = (1 + 4 + 1) * 2


class FakeBackend:
    """Deterministic metrics from the cell's settings; records what it was asked to do."""

    def __init__(self, sleep_in_cell: int | None = None, marker: Path | None = None):
        self.sleep_in_cell, self.marker = sleep_in_cell, marker
        self.loaded: list[str] = []
        self.quantized: list[str] = []
        self.from_cache: list[str] = []
        self.evaluated: list[str] = []

    def load_original(self, model):
        self.loaded.append(model)
        return {"model": model, "quant": None}

    def quantize(self, original, quant: QuantSetting, calibration, seed, cache_path):
        details = {"avg_bits": quant.bits + 32 / 32, "recipe": quant.canonical()}
        if cache_path is not None and cache_path.is_dir():
            self.from_cache.append(quant.label)
            return {"model": json.loads((cache_path / "w.json").read_text())["model"], "quant": quant}, {**details, "from_cache": True}
        base = original()
        self.quantized.append(quant.label)
        if cache_path is not None:  # atomic, like api.save_quantized
            tmp = cache_path.with_name(f".{cache_path.name}.tmp")
            tmp.mkdir(parents=True)
            (tmp / "w.json").write_text(json.dumps({"model": base["model"]}))
            tmp.rename(cache_path)
        return {"model": base["model"], "quant": quant}, {**details, "from_cache": False, "seconds": 0.01}

    def evaluate(self, subject, evaluation, reference):
        self.evaluated.append(evaluation.name)
        if self.sleep_in_cell is not None and len(self.evaluated) == self.sleep_in_cell:
            self.marker.write_text("inside")
            time.sleep(120)  # killed here
        q: QuantSetting | None = subject["quant"]
        damage = 0.0 if q is None else 2.0 ** (4 - q.bits) * (0.5 if q.method == "gptq" else 1.0)
        if evaluation.kind == "perplexity":
            m = {f"ppl:{evaluation.source}": 20.0 * (1 + damage)}
            if reference is not None:
                assert reference["quant"] is None, "the KL reference must be the original"
                m |= {f"kl:{evaluation.source}": 0.01 * damage, f"top1:{evaluation.source}": 1 - 0.05 * damage}
            return m, {"windows": evaluation.max_windows}
        acc = 0.6 / (1 + damage)
        return {f"acc:{evaluation.task}": acc, f"acc_norm:{evaluation.task}": acc + 0.01}, {"n": evaluation.limit}

    def describe(self, handle):
        return {"dtype": "float32", "architecture": "Fake"}

    def release(self, handle):
        pass


def _sweep(store_path: Path, backend: FakeBackend, cache: Path | None = None, config: dict = CONFIG):
    with ResultStore(store_path) as store:
        summary = run_sweep(parse_config(config), store, backend, cache_dir=cache)
        table = to_markdown(build_table(store.cells()), timing=False)
        problems = store.integrity_problems()
    assert problems == []
    return summary, table


def test_cell_keys_are_stable_and_distinct():
    cells = parse_config(CONFIG).cells()
    assert len(cells) == N_CELLS
    assert len({c.key for c in cells}) == N_CELLS
    assert len({c.quant_key for c in cells}) == N_CELLS // 2  # two evaluations share each quantization
    assert [c.key for c in parse_config(json.loads(json.dumps(CONFIG))).cells()] == [c.key for c in cells]
    assert cells[0].quant.is_baseline and cells[0].calibration is None
    changed = parse_config({**CONFIG, "seed": 1}).cells()
    assert not {c.key for c in changed} & {c.key for c in cells}


def test_lm_head_setting_is_its_own_row():
    """options = {lm_head = true} makes a distinct quantization (key and label) beside the same grid without it."""
    cfg = {**CONFIG, "quantize": [{"methods": ["gptq"], "bits": [4], "group_sizes": [32]},
                                  {"methods": ["gptq"], "bits": [4], "group_sizes": [32], "options": {"lm_head": True}}]}
    quant = [c.quant for c in parse_config(cfg).cells()]
    labels = sorted({q.label for q in quant})
    assert labels == ["baseline", "gptq w4 g32", "gptq w4 g32 +head"]
    assert len({c.quant_key for c in parse_config(cfg).cells()}) == 3


def test_rerun_skips_finished_cells(tmp_path):
    first = FakeBackend()
    s1, table1 = _sweep(tmp_path / "r.sqlite", first)
    assert (s1.computed, s1.skipped) == (N_CELLS, 0)
    assert first.loaded == ["tiny-qwen3"]  # the original is loaded once
    second = FakeBackend()
    s2, table2 = _sweep(tmp_path / "r.sqlite", second)
    assert (s2.computed, s2.skipped) == (0, N_CELLS)
    assert second.loaded == second.quantized == second.evaluated == []  # nothing touched at all
    assert table1 == table2


def test_sweep_stores_provenance_and_row_identity(tmp_path):
    _sweep(tmp_path / "r.sqlite", FakeBackend())
    with ResultStore(tmp_path / "r.sqlite") as store:
        cells = store.cells()
    sq = [c for c in cells if c.method == "smoothquant"]
    assert {(c.bits, c.act_bits, c.symmetric) for c in sq} == {(8, 8, True)}  # normalized by api.method_config
    p = cells[0].provenance
    assert set(p["versions"]) >= {"torch", "transformers", "qwenquant"}
    assert p["hardware"]["cpu"] and len(p["git_commit"]) in (40, len("unknown"))
    assert all(c.started_at <= c.finished_at for c in cells)  # provenance is consistent, not a speed goal
    walls = [c.wall_seconds for c in cells]
    assert min(walls) >= 0
    assert cells[0].config["model"] == "tiny-qwen3" and cells[0].config["evaluation"]["kind"] == "perplexity"


def test_quantized_weights_are_cached_and_reused(tmp_path):
    cache = tmp_path / "cache"
    first = FakeBackend()
    _sweep(tmp_path / "a.sqlite", first, cache)
    assert len(first.quantized) == 5 and first.from_cache == []  # once per quantization, not per evaluation
    assert len(list(cache.iterdir())) == 5
    second = FakeBackend()
    _sweep(tmp_path / "b.sqlite", second, cache)  # a new store: every cell reruns, no quantization does
    assert second.quantized == [] and len(second.from_cache) == 5
    assert second.loaded == ["tiny-qwen3"]  # for the baseline row only


def test_kill_minus_9_mid_cell_resumes_to_the_same_table(tmp_path):
    reference_summary, reference_table = _sweep(tmp_path / "uninterrupted.sqlite", FakeBackend())
    store, cache, marker = tmp_path / "killed.sqlite", tmp_path / "cache", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, __file__, "child", str(store), str(cache), str(marker), "3"])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the child sweep ended before reaching cell 3"
            assert time.monotonic() < deadline, "the child sweep never reached cell 3"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with ResultStore(store) as s:  # exactly the two finished cells, nothing of the third
        assert len(s) == 2 and s.integrity_problems() == []
    resumed = FakeBackend()
    summary, table = _sweep(store, resumed, cache)
    assert (summary.skipped, summary.computed) == (2, N_CELLS - 2)
    assert resumed.from_cache == ["rtn w4 g32"]  # quantized (and cached) by the killed run, before cell 3
    assert len(resumed.quantized) == 4
    assert table == reference_table
    with ResultStore(store) as s:
        assert len(s) == N_CELLS and len(s.keys()) == N_CELLS


class BrokenGPTQ3(FakeBackend):
    def quantize(self, original, quant, calibration, seed, cache_path):
        if quant.label == "gptq w3 g32":
            raise RuntimeError("Cholesky failed")
        return super().quantize(original, quant, calibration, seed, cache_path)


def test_keep_going_skips_a_broken_setting_and_a_rerun_retries_it(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(RuntimeError, match="Cholesky"):
            run_sweep(parse_config(CONFIG), store, BrokenGPTQ3())
        summary = run_sweep(parse_config(CONFIG), store, BrokenGPTQ3(), keep_going=True)
        assert summary.failed == ["tiny-qwen3 · gptq w3 g32: RuntimeError: Cholesky failed"]
        assert len(store) == N_CELLS - 2 and summary.computed == 2  # 8 stored by the first run, before it failed
        fixed = FakeBackend()
        summary = run_sweep(parse_config(CONFIG), store, fixed)
        assert summary.computed == 2 and fixed.quantized == ["gptq w3 g32"] and len(store) == N_CELLS


@pytest.mark.parametrize("patch, message", [
    ({"quantize": [{"methods": ["gptqq"], "bits": [4]}]}, "unknown method 'gptqq'"),
    ({"tasks": [{"name": "arc_eazy"}]}, "unknown task 'arc_eazy'"),
    ({"perplexity": [{"source": "wikitext3"}]}, "unknown perplexity source 'wikitext3'"),
    ({"models": ["no-such-model"]}, "model 'no-such-model'"),
    ({"quantize": [{"methods": ["billm"], "bits": [4]}]}, "billm"),
    ({"mmlu": {"subjects": ["astrology"]}}, "unknown MMLU subject"),
    ({"calibration": {"source": "shakespeare"}}, "calibration source 'shakespeare'"),
    ({"quantize": [{"methods": ["rtn"], "bits": [4], "group_size": [32]}]}, "unknown key"),
    ({"quantize": [{"methods": ["awq"], "bits": [4], "options": {"lm_head": True}}]}, "lm_head=True: awq migrates"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, patch, message):
    store_path = tmp_path / "r.sqlite"
    _sweep(store_path, FakeBackend())  # a store with finished cells, to check it stays as it was
    with ResultStore(store_path) as store:
        before = store.cells()
    backend = FakeBackend()
    with pytest.raises(ValueError, match=message), ResultStore(store_path) as store:
        run_sweep(parse_config({**CONFIG, **patch}), store, backend)
    assert backend.loaded == backend.quantized == backend.evaluated == []
    with ResultStore(store_path) as store:
        assert store.cells() == before and store.integrity_problems() == []


def test_all_problems_are_reported_together():
    from qwenquant.sweep import validate

    bad = {**CONFIG, "models": ["nope"], "tasks": [{"name": "arc_eazy"}], "quantize": [{"methods": ["gptqq"], "bits": [4]}]}
    with pytest.raises(ValueError, match="3 problem") as e:
        validate(parse_config(bad))
    assert "nope" in str(e.value) and "arc_eazy" in str(e.value) and "gptqq" in str(e.value)


def test_example_configs_parse_and_validate():
    from qwenquant.sweep import load_config, validate

    root = Path(__file__).resolve().parents[1] / "configs"
    demo = validate(load_config(root / "demo.toml"))
    assert [q.label for q in demo.quant][:2] == ["baseline", "rtn w8 g64"]
    paper = validate(load_config(root / "paper-qwen3.toml"), check_data=False)  # its data lives on the GPU machine
    assert len(paper.cells()) == 11 * 29 * 9
    assert len(paper.models) >= 4 and {q.method for q in paper.quant} >= {"rtn", "gptq", "awq", "smoothquant", "billm"}


def test_sweep_command_refuses_a_bad_config_without_creating_the_store(tmp_path, capsys):
    from qwenquant.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CONFIG, "tasks": [{"name": "arc_eazy"}]}))
    assert main(["sweep", str(bad), "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "unknown task 'arc_eazy'" in capsys.readouterr().err
    assert not (tmp_path / "r.sqlite").exists()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(CONFIG))
    assert main(["sweep", str(good), "--store", str(tmp_path / "r.sqlite"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{N_CELLS} cells, 0 done, {N_CELLS} to run" in out and "todo" in out


@pytest.mark.slow
def test_real_sweep_on_tiny_qwen3(tmp_path):
    """rtn w4 + the original on tiny-qwen3, perplexity on 2 short windows, through the real backend."""
    from qwenquant.report import write_report
    from qwenquant.sweep.backend import TorchBackend

    config = {"name": "tiny", "models": ["tiny-qwen3"], "calibration": {"source": "austen", "n": 4, "seqlen": 64},
              "quantize": [{"methods": ["rtn"], "bits": [4], "group_sizes": [32]}],
              "perplexity": [{"source": "austen", "seqlen": 64, "max_windows": 2, "kl": True}]}
    with ResultStore(tmp_path / "r.sqlite") as store:
        summary = run_sweep(parse_config(config), store, TorchBackend(device="cpu"), cache_dir=tmp_path / "cache")
        assert summary.computed == 2
        base, rtn = sorted(store.cells(), key=lambda c: c.method != "baseline")
        assert set(base.metrics) == {"ppl:austen"} and set(rtn.metrics) == {"ppl:austen", "kl:austen", "top1:austen"}
        assert rtn.metrics["kl:austen"] > 0 and 0 < rtn.metrics["top1:austen"] <= 1
        assert rtn.details["quantization"]["avg_bits"] > 4
        files = write_report(store, tmp_path / "report")
    assert files.markdown.read_text().count("\n| tiny-qwen3") == 2
    # a second store reuses the cached checkpoint and reproduces the numbers
    with ResultStore(tmp_path / "r2.sqlite") as store:
        run_sweep(parse_config(config), store, TorchBackend(device="cpu"), cache_dir=tmp_path / "cache")
        again = next(c for c in store.cells() if c.method == "rtn")
    assert again.details["quantization"]["from_cache"] is True
    assert again.metrics["ppl:austen"] == pytest.approx(rtn.metrics["ppl:austen"], rel=1e-5)


def _child(store: str, cache: str, marker: str, sleep_in_cell: str) -> None:
    with ResultStore(store) as s:
        run_sweep(parse_config(CONFIG), s, FakeBackend(int(sleep_in_cell), Path(marker)), cache_dir=Path(cache))


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(*sys.argv[2:6])


def test_memoized_reference_is_the_model_and_respects_its_budget():
    import torch

    from qwenquant.sweep.backend import MemoizedReference

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 7)
            self.config = object()
            self.calls = 0

        def forward(self, ids):
            self.calls += 1
            from types import SimpleNamespace
            return SimpleNamespace(logits=self.emb(ids))

    model = Counting()
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]])
    ref = MemoizedReference(model, budget=3 * 7 * 4)  # room for one [1, 3, 7] fp32 output
    first = ref(a).logits
    assert torch.equal(ref(a).logits, first) and torch.equal(first, model.emb(a)) and model.calls == 1
    ref(b), ref(b)
    assert model.calls == 3  # over budget: b is recomputed each time, a stays remembered
    ref(a)
    assert model.calls == 3
    assert next(ref.parameters()) is model.emb.weight
