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
    from qwenquant.kernels import decode_attention, overlap, wq_batch1
    from qwenquant.runtime import fused

    # the variants' setups set these module knobs; restored after the test
    for module, names in ((overlap, ("PDL_ENABLED", "RELEASE_AT_START", "ATTENTION_RELEASE_AT_START")),
                          (decode_attention, ("MERGE_IN_SPLIT", "TARGET_PROGRAMS", "BATCH1_TARGET_PROGRAMS",
                                              "WHOLE_SLICE_MAX")),
                          (fused, ("OFFER_BATCH1_PERSISTENT",)), (wq_batch1, ("MAX_REGISTERS", "ZERO_AFTER"))):
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


@pytest.mark.parametrize("name,merge", [("pdl_step_s22_h100.json", True), ("pdl_step_s22_attn_release_h100.json", True)])
def test_e2e_pdl_chooses_what_the_committed_ab_measured_fastest(name, merge, monkeypatch):
    """On session 22's committed A/Bs: PDL, 66 programs, per-block tiles, release at exit, merge in split (the fastest
    W4 median at batch 1 in both files; its logits differ from the first variant's by rounding, which is allowed)."""
    mod = _e2e_pdl(monkeypatch)
    steps = json.loads((BENCH / "results" / name).read_text())["steps"]
    choice, excluded, median = mod.choose(steps)
    assert choice == {"pdl": True, "target": 66, "persist": False, "release": False, "merge": merge,
                      "attn_release": False, "whole": 0, "maxnreg": 0, "zero_after": False}, (choice, median)
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
                                                "w": (mod.decode_attention, "WHOLE_SLICE_MAX"),
                                                "n": (mod.wq_batch1, "MAX_REGISTERS"),
                                                "z": (mod.wq_batch1, "ZERO_AFTER")}.items()}
    try:
        mod.apply(choice)
        assert mod.decode_attention.BATCH1_TARGET_PROGRAMS == 66 and mod.fused.OFFER_BATCH1_PERSISTENT
        assert not (mod.overlap.RELEASE_AT_START or mod.overlap.ATTENTION_RELEASE_AT_START
                    or mod.decode_attention.MERGE_IN_SPLIT or mod.decode_attention.WHOLE_SLICE_MAX
                    or mod.wq_batch1.MAX_REGISTERS or mod.wq_batch1.ZERO_AFTER)
    finally:
        mod.decode_attention.BATCH1_TARGET_PROGRAMS, mod.fused.OFFER_BATCH1_PERSISTENT = saved["t"], saved["p"]
        mod.overlap.RELEASE_AT_START, mod.overlap.ATTENTION_RELEASE_AT_START = saved["r"], saved["a"]
        mod.decode_attention.MERGE_IN_SPLIT, mod.decode_attention.WHOLE_SLICE_MAX = saved["m"], saved["w"]
        mod.wq_batch1.MAX_REGISTERS, mod.wq_batch1.ZERO_AFTER = saved["n"], saved["z"]


# W4: none, PDL, persistent, PDL + persistent, PDL + persistent at 132 and 66 programs; bf16 has no persistent tiles.
# session 22's third call (one target, no persistent tiles): none, PDL, + attention release, + merge, + both.
# RELEASE then MERGE: each adds every PDL variant so far again (W4 4 → 10 → 18, bf16 3 → 7 → 13); session 23's call
# (one target, no persistent tiles): none, PDL, + merge, + whole slices, + both; and the register cap (W4 only)
@pytest.mark.parametrize("flags,w4,bf16", [({}, 6, 4), ({"MERGE": True, "PERSIST": False, "ATTN_RELEASE": True}, 5, 5),
                                           ({"RELEASE": True, "MERGE": True}, 18, 13),
                                           ({"MERGE": True, "PERSIST": False, "WHOLE": 64}, 5, 5),
                                           ({"PERSIST": False, "WHOLE": 64, "MAXNREG": 128}, 5, 3),
                                           ({"PERSIST": False, "MAXNREG": 128, "ZERO_AFTER": True}, 5, 2)])
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
    assert mod.overrides("merge=1, whole=64,maxnreg=128") == {"merge": True, "whole": 64, "maxnreg": 128}
    assert mod.overrides("") == {}
    for bad in ("merg=1", "whole=lots", "whole"):
        with pytest.raises(SystemExit, match="E2E_PDL_SET"):
            mod.overrides(bad)


def test_batch1_knobs_sets_each_variant_around_its_call_and_sums_the_layer(monkeypatch, tmp_path):
    """``benchmarks/batch1_knobs.py`` on a CPU: each variant's call sees its own knobs and tuner state and leaves the
    modules as they were (also when the call raises); the layer ratio is bf16's summed time over the variant's."""
    from qwenquant.bench.gemm import GemmResult
    from qwenquant.kernels import wq_batch1
    from qwenquant.runtime import fused

    monkeypatch.setattr(wq_batch1, "ZERO_AFTER", False)
    monkeypatch.setattr(wq_batch1, "MAX_REGISTERS", None)
    monkeypatch.setattr(fused.TUNER, "choices", {"outside": 1})
    monkeypatch.syspath_prepend(str(BENCH))
    knobs = __import__("batch1_knobs")
    monkeypatch.setattr(knobs, "_choices", {})

    seen = knobs._with_knobs("w4g128-fused+both")(lambda x: (wq_batch1.ZERO_AFTER, wq_batch1.MAX_REGISTERS,
                                                              fused.TUNER.choices), None)
    assert seen[:2] == (True, 128) and seen[2] is knobs._choices["w4g128-fused+both"] and seen[2] == {}

    def boom(x):
        raise RuntimeError("kernel failed")
    with pytest.raises(RuntimeError):
        knobs._with_knobs("w4g128-fused+zero_after")(boom, None)
    assert (wq_batch1.ZERO_AFTER, wq_batch1.MAX_REGISTERS, fused.TUNER.choices) == (False, None, {"outside": 1})

    # the aggregation, on a stub bench_shape: bf16 takes 2 ms per projection, a variant v takes 1 + index(v) / 10
    names = list(knobs.KNOB_SETTINGS)

    def stub(model, proj, n, k, rows, modes, ceil):
        assert list(modes) == ["bf16", *names]
        return [GemmResult(model, proj, n, k, m, name, 2.0 if name == "bf16" else 1.0 + names.index(name) / 10,
                           1, 1, 0.1, 0.5, None, 0.0) for m in rows for name in modes]
    monkeypatch.setattr(knobs, "bench_shape", stub)
    monkeypatch.setattr(knobs, "ceilings", lambda: {"copy_bytes_per_s": 1.0})
    monkeypatch.setattr(knobs, "environment", lambda: {"gpu": "none"})
    out = knobs.main()
    assert out["layer_speedup_vs_bf16"][1] == {"bf16": 1.0, **{v: round(2.0 / (1.0 + i / 10), 4)
                                                               for i, v in enumerate(names)}}
    assert len(out["results"]) == 4 * len(names + ["bf16"])
    json.dumps(out, default=str)
