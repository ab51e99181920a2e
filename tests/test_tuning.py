"""The tuner's choice (``runtime/tuning.py``) on scripted timings: no GPU needed."""

import pytest
import torch

from qwenquant.runtime import tuning


@pytest.fixture
def scripted(monkeypatch):
    """Replace the cold GPU timing with per-candidate scripts (each call pops the next time) and count the calls."""
    scripts: dict = {}
    calls: list = []

    def fake_time(fn, rep_ms):
        calls.append(fn.name)
        return scripts[fn.name].pop(0)

    monkeypatch.setattr(tuning, "_time_cold", fake_time)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return scripts, calls


def _candidate(name):
    def fn():
        return None

    fn.name = name
    return fn


def test_near_ties_are_retimed_round_robin_and_ranked_by_median(scripted):
    """a's first timing is lucky; retimed with b (within 5 %), b's median wins. c (40 % slower) is timed once."""
    scripts, calls = scripted
    scripts.update(a=[1.00, 1.10, 1.12], b=[1.03, 1.01, 1.02], c=[1.40])
    cands = {n: _candidate(n) for n in "abc"}
    t = tuning.Tuner("test")
    assert t.pick("key", cands) == "b"
    assert calls == ["a", "b", "c"] + ["a", "b"] * tuning.RETIME_ROUNDS
    chosen, times = t.choices["key"]
    assert times == {"a": 1.10, "b": 1.02, "c": 1.40}  # medians of 3 for a and b
    assert t.pick("key", cands) == "b" and len(calls) == 3 + 2 * tuning.RETIME_ROUNDS  # cached: no more timing


def test_a_clear_winner_is_timed_once(scripted):
    scripts, calls = scripted
    scripts.update(a=[1.0], b=[1.2])
    assert tuning.Tuner("test").pick("k", {n: _candidate(n) for n in "ab"}) == "a"
    assert calls == ["a", "b"]


def test_a_failing_candidate_is_skipped_and_never_retimed(scripted):
    scripts, calls = scripted
    scripts.update(a=[1.0])

    def broken():
        raise RuntimeError("out of resource: shared memory")

    t = tuning.Tuner("test")
    assert t.pick("k", {"a": _candidate("a"), "broken": broken}) == "a"
    assert calls == ["a"] and t.choices["k"][1]["broken"] == float("inf")


def test_at_most_three_near_ties_are_retimed(scripted):
    scripts, calls = scripted
    scripts.update(a=[1.00, 1.00, 1.00], b=[1.01, 1.01, 1.01], c=[1.02, 1.02, 1.02], d=[1.03])
    assert tuning.Tuner("test").pick("k", {n: _candidate(n) for n in "abcd"}) == "a"
    assert calls == list("abcd") + list("abc") * tuning.RETIME_ROUNDS


def test_a_fourth_near_tie_cannot_win_on_its_single_timing(scripted):
    scripts, calls = scripted
    scripts.update(a=[1.00, 1.05, 1.05], b=[1.01, 1.04, 1.04], c=[1.02, 1.06, 1.06], d=[1.03])
    assert tuning.Tuner("test").pick("k", {n: _candidate(n) for n in "abcd"}) == "b"
