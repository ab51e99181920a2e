"""The e2e benchmark with the decode-step epilogues that ``epilogues_step.py`` measured fastest, in one GPU call:

    python3 benchmarks/epilogues_step.py && python3 benchmarks/e2e_epilogues.py   # -> $OUT/e2e.json

Reads ``$OUT/epilogues_step.json``, takes the variant with the lowest median W4 step at batch 1 (``none``, ``silu``,
``norm`` or ``norm,silu``) and keeps it up to batch 8 only if it is also faster there (else ``fused.EPILOGUE_MAX_M``
= 1), then runs ``e2e.run(modes=E2E_EPI_MODES, epilogues=...)`` (default ``w4g128-fused+head``); each decode entry of
the result records which epilogues ran.
"""

from __future__ import annotations

import json
import os
import statistics

from qwenquant.bench import e2e
from qwenquant.runtime import fused

out = os.environ.get("OUT", "runs")
steps = json.load(open(os.path.join(out, "epilogues_step.json")))["steps"]
times: dict[tuple[int, str], list[float]] = {}
for s in steps:
    if s["mode"] != "bf16":
        times.setdefault((s["batch"], s["epilogues"]), []).append(s["step_ms"])
median = {k: statistics.median(v) for k, v in times.items()}
best = min((v for b, v in median if b == 1), key=lambda v: median[(1, v)])
fused.EPILOGUE_MAX_M = 8 if median.get((8, best), float("inf")) < median.get((8, "none"), 0.0) else 1
print("epilogues", best, "up to batch", fused.EPILOGUE_MAX_M, {f"b{b} {v}": round(t, 4) for (b, v), t in median.items()},
      flush=True)
modes = tuple(m for m in os.environ.get("E2E_EPI_MODES", "w4g128-fused+head").split(",") if m)
e2e.run(modes=modes, out_path=os.path.join(out, "e2e.json"),
        epilogues=False if best == "none" else tuple(best.split(",")))
