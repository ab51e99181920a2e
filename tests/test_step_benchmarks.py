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
                                                       ("epilogues_step", "epilogues_step", 1),
                                                       ("pdl_step", "pdl_step", 4)])
def test_step_benchmark_skeleton_runs_on_cpu(script, kind, bf16_variants, monkeypatch, tmp_path):
    from test_e2e_layers import tiny_model

    from qwenquant.bench import e2e
    from qwenquant.kernels import decode_attention, overlap
    from qwenquant.runtime import fused

    # the variants' setups set these module knobs; restored after the test
    for module, names in ((overlap, ("PDL_ENABLED", "RELEASE_AT_START", "ATTENTION_RELEASE_AT_START")),
                          (decode_attention, ("MERGE_IN_SPLIT", "TARGET_PROGRAMS", "BATCH1_TARGET_PROGRAMS",
                                              "WHOLE_SLICE_MAX")),
                          (fused, ("OFFER_BATCH1_PERSISTENT",))):
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(fused.TUNER, "choices", fused.TUNER.choices)

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


def _e2e_pdl(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("e2e_pdl", None)
    return __import__("e2e_pdl")


@pytest.mark.parametrize("name,merge", [("pdl_step_s22_h100.json", True), ("pdl_step_s22_attn_release_h100.json", True),
                                        ("pdl_step_s25_levers_h100.json", False)])
def test_e2e_pdl_chooses_what_the_committed_ab_measured_fastest(name, merge, monkeypatch):
    """On session 22's committed A/Bs: PDL, 66 programs, per-block tiles, release at exit, merge in split (the fastest
    W4 median at batch 1 in both files; its logits differ from the first variant's by rounding, which is allowed).
    Session 25's file also holds variants of two knobs since removed (register cap, zero after): skipped, PDL alone
    chosen (that run had no merge variant)."""
    mod = _e2e_pdl(monkeypatch)
    steps = json.loads((BENCH / "results" / name).read_text())["steps"]
    choice, excluded, median = mod.choose(steps)
    assert choice == {"pdl": True, "target": 66, "persist": False, "release": False, "merge": merge,
                      "attn_release": False, "whole": 0, "mma": False}, (choice, median)
    assert excluded == []


def test_e2e_pdl_never_chooses_a_variant_that_raced_or_changed_where_only_the_launch_did(monkeypatch):
    mod = _e2e_pdl(monkeypatch)

    def step(ms, batch=1, mode="w4g128-fused+head", equal=20, first=True, **knobs):
        return {"mode": mode, "batch": batch, "step_ms": ms, "replays": 20, "replays_bit_equal": equal,
                "bit_equal_first_variant": first, **{**mod.KNOBS, "target": 66, **knobs}}

    steps = [step(2.60), step(2.50, pdl=True),
             step(2.30, pdl=True, release=True, equal=19),           # a race: replays differ among themselves
             step(2.35, pdl=True, attn_release=True, first=False),   # only the launch differs, yet the logits do
             step(2.40, pdl=True, persist=True, first=False),        # tile sums in another order: allowed
             step(2.20, batch=8, pdl=True, merge=True),              # batch 8 does not choose
             step(2.45, pdl=True, merge=True, batch=8, equal=3)]     # ... but a race there excludes the variant
    choice, excluded, _ = mod.choose(steps)
    assert choice == {**mod.KNOBS, "target": 66, "pdl": True, "persist": True}
    assert {(e["release"], e["attn_release"], e["merge"]) for e in excluded} == {(True, False, False),
                                                                                   (False, True, False),
                                                                                   (False, False, True)}
    saved = {k: getattr(m, a) for k, (m, a) in {"t": (mod.decode_attention, "BATCH1_TARGET_PROGRAMS"),
                                                "p": (mod.fused, "OFFER_BATCH1_PERSISTENT"),
                                                "r": (mod.overlap, "RELEASE_AT_START"),
                                                "a": (mod.overlap, "ATTENTION_RELEASE_AT_START"),
                                                "m": (mod.decode_attention, "MERGE_IN_SPLIT"),
                                                "w": (mod.decode_attention, "WHOLE_SLICE_MAX")}.items()}
    try:
        mod.apply(choice)
        assert mod.decode_attention.BATCH1_TARGET_PROGRAMS == 66 and mod.fused.OFFER_BATCH1_PERSISTENT
        assert not (mod.overlap.RELEASE_AT_START or mod.overlap.ATTENTION_RELEASE_AT_START
                    or mod.decode_attention.MERGE_IN_SPLIT or mod.decode_attention.WHOLE_SLICE_MAX)
    finally:
        mod.decode_attention.BATCH1_TARGET_PROGRAMS, mod.fused.OFFER_BATCH1_PERSISTENT = saved["t"], saved["p"]
        mod.overlap.RELEASE_AT_START, mod.overlap.ATTENTION_RELEASE_AT_START = saved["r"], saved["a"]
        mod.decode_attention.MERGE_IN_SPLIT, mod.decode_attention.WHOLE_SLICE_MAX = saved["m"], saved["w"]


# W4: none, PDL, persistent, PDL + persistent, PDL + persistent at 132 and 66 programs; bf16 has no persistent tiles.
# session 22's third call (one target, no persistent tiles): none, PDL, + attention release, + merge, + both.
# RELEASE then MERGE: each adds every PDL variant so far again (W4 4 → 10 → 18, bf16 3 → 7 → 13); session 23's call
# (one target, no persistent tiles): none, PDL, + merge, + whole slices, + both
@pytest.mark.parametrize("flags,w4,bf16", [({}, 6, 4), ({"MERGE": True, "PERSIST": False, "ATTN_RELEASE": True}, 5, 5),
                                           ({"RELEASE": True, "MERGE": True}, 18, 13),
                                           ({"MERGE": True, "PERSIST": False, "WHOLE": 64}, 5, 5)])
def test_pdl_step_variant_counts(flags, w4, bf16, monkeypatch):
    """``pdl_step.py``'s variants under its env flags (TARGETS 264,132,66 unless set): each flag adds every PDL
    variant again with that knob on."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pdl_step", None)
    mod = __import__("pdl_step")
    if "PERSIST" in flags and not flags["PERSIST"]:
        monkeypatch.setattr(mod, "TARGETS", [66])
    for k, v in flags.items():
        monkeypatch.setattr(mod, k, v)
    got_w4, got_bf16 = mod.variants_for("w4g128-fused+head"), mod.variants_for("bf16")
    assert (len(got_w4), len(got_bf16)) == (w4, bf16), ([v for v, _ in got_w4], [v for v, _ in got_bf16])
    assert all(v["pdl"] or not (v["release"] or v["attn_release"] or v["merge"]) for v, _ in got_w4 + got_bf16)


def test_e2e_pdl_overrides_parse_knobs_by_name(monkeypatch):
    mod = _e2e_pdl(monkeypatch)
    assert mod.overrides("merge=1, whole=64,target=132") == {"merge": True, "whole": 64, "target": 132}
    assert mod.overrides("") == {}
    for bad in ("merg=1", "whole=lots", "whole", "maxnreg=128"):  # a removed knob is refused by name too
        with pytest.raises(SystemExit, match="E2E_PDL_SET"):
            mod.overrides(bad)
