"""The e2e benchmark with what ``pdl_step.py`` measured fastest, in the same GPU call:

    python3 benchmarks/pdl_step.py && python3 benchmarks/e2e_pdl.py   # -> $OUT/e2e.json

Reads ``$OUT/pdl_step.json`` (or ``$PDL_STEP_JSON``: a committed run); takes the (pdl, attention target, persistent tiles) variant with the lowest median W4
step at batch 1, if its replays repeated bit for bit (and equal the first variant's where only PDL differs);
sets ``decode_attention.BATCH1_TARGET_PROGRAMS`` (batch 1 only) and ``fused.OFFER_BATCH1_PERSISTENT`` to it and runs ``e2e.run(modes=E2E_PDL_MODES, pdl=...)`` (default both
W4 modes, ``w4g128-fused`` and ``w4g128-fused+head``). ``pdl=True`` turns on torch.compile's PDL too, for bf16 and
W4 alike (the A/B kept it off to avoid recompiling the step per variant).
"""

from __future__ import annotations

import json
import os
import statistics

from qwenquant.bench import e2e
from qwenquant.kernels import decode_attention, overlap
from qwenquant.runtime import fused

out = os.environ.get("OUT", "runs")
steps = json.load(open(os.environ.get("PDL_STEP_JSON", os.path.join(out, "pdl_step.json"))))["steps"]
times: dict[tuple[int, bool, int, bool, bool, bool, bool], list[float]] = {}
bad = set()
for s in steps:
    key = (s["batch"], s["pdl"], s["target"], s["persist"], s.get("release", False), s.get("merge", False),
           s.get("attn_release", False))
    if s["mode"] != "bf16":
        times.setdefault(key, []).append(s["step_ms"])
    only_pdl_differs = not s["persist"] and not s.get("merge") and s["target"] == steps[0]["target"]
    # never picked: a variant whose replays differ among themselves (a race), or that differs from the baseline where
    # only PDL differs. Another attention target or tile sums in another order moves the random model's logits by up
    # to 5e-2 (36 random layers amplify a rounding; session 21: the kernel itself is as close to SDPA at 66 programs
    # as at 264), so worst_rel is recorded, not a criterion
    if s["replays_bit_equal"] < s["replays"] or (only_pdl_differs and not s["bit_equal_first_variant"]):
        bad.add(key[1:])
median = {k: statistics.median(v) for k, v in times.items()}
best = min((k for k in median if k[0] == 1 and k[1:] not in bad), key=median.get)
_, pdl, target, persist, release, merge, attn_release = best
decode_attention.BATCH1_TARGET_PROGRAMS = target  # picked at batch 1; above it TARGET_PROGRAMS stays (264)
fused.OFFER_BATCH1_PERSISTENT = persist
overlap.RELEASE_AT_START = release
overlap.ATTENTION_RELEASE_AT_START = attn_release
decode_attention.MERGE_IN_SPLIT = merge
print("pdl", pdl, "target", target, "persistent tiles", persist, "release at start", release, "merge in split", merge, "attention release at start", attn_release,
      "excluded", sorted(bad), {str(k): round(v, 4) for k, v in median.items()},
      flush=True)
modes = tuple(m for m in os.environ.get("E2E_PDL_MODES", "w4g128-fused,w4g128-fused+head").split(",") if m)
e2e.run(modes=modes, out_path=os.path.join(out, "e2e.json"), pdl=pdl)  # records the attention's target too
