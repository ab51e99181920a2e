"""The batch-1 W4 kernel's two session-23 levers, kernel by kernel: Qwen3-8B's merged projections at M = 1 (and the
other batch-1 rows), bf16 in the same round-robin timing.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=$PWD/src python3 benchmarks/batch1_knobs.py   # -> $OUT/batch1_knobs.json

Why. ``batch1_pattern.py`` (session 23) found the batch-1 kernels' gap to a flat read of their bytes in the
dequantization's arithmetic, not in the loads, and that more resident programs hide it. Two levers, off by default:
``wq_batch1.ZERO_AFTER`` (magic + code straight into the MMA, the zero taken off per scale group after it: no paired
FMA per two weights, offline SASS −8 to −11 % instructions) and ``wq_batch1.MAX_REGISTERS = 128`` (four 4-warp
programs per SM instead of three, 64–80 bytes spilled). ``pdl_step.py`` times them in the whole decode step; this
times each projection, which is what the issue's ``W4A16 fused, M = 1`` row measures (``bench gemm``'s layer ratio:
the four projections' bf16 time over their W4 time).

Variants (``KNOB_SETTINGS``): plain, zero after, cap 128, both. Each variant tunes its own tile choices (the tuner's
state is swapped per variant, so a register cap can pick another tile) and its own weight copies (``bench_shape``
cycles copies that overflow L2); every variant's product is checked against the fp32 product of the same dequantized
weight (``rel_err``) before the timing. ``KNOB_ROWS`` (default 1) the batch rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from qwenquant.bench.gemm import MODEL_SHAPES, MODES, W4, Mode, _set_mode, bench_shape
from qwenquant.bench.hw import ceilings, environment
from qwenquant.kernels import wq_batch1
from qwenquant.runtime import fused

MODEL = "qwen3-8b-merged"
ROWS = [int(m) for m in os.environ.get("KNOB_ROWS", "1").split(",") if m]
KNOB_SETTINGS = {  # variant name -> (ZERO_AFTER, MAX_REGISTERS)
    "w4g128-fused": (False, None),
    "w4g128-fused+zero_after": (True, None),
    "w4g128-fused+maxnreg128": (False, 128),
    "w4g128-fused+both": (True, 128),
}
_choices: dict[str, dict] = {}  # variant -> its tuner choices


def _with_knobs(name: str):
    """The fused call with variant ``name``'s knobs and tuner state set around it (read at launch, so a CUDA graph
    captured through this call keeps them)."""
    zero_after, maxnreg = KNOB_SETTINGS[name]

    def call(layer, x):
        saved = wq_batch1.ZERO_AFTER, wq_batch1.MAX_REGISTERS, fused.TUNER.choices
        wq_batch1.ZERO_AFTER, wq_batch1.MAX_REGISTERS = zero_after, maxnreg
        fused.TUNER.choices = _choices.setdefault(name, {})
        try:
            return layer(x)
        finally:
            wq_batch1.ZERO_AFTER, wq_batch1.MAX_REGISTERS, fused.TUNER.choices = saved
    return call


def main() -> dict:
    modes = {"bf16": MODES["bf16"], **{name: Mode(W4, _with_knobs(name), prepare=_set_mode("fused"))
                                       for name in KNOB_SETTINGS}}
    ceil = ceilings()
    results = []
    for proj, (n, k) in MODEL_SHAPES[MODEL].items():
        results += [asdict(r) for r in bench_shape(MODEL, proj, n, k, ROWS, modes, ceil)]
    layer = {}
    for m in ROWS:
        ms = {name: sum(r["ms"] for r in results if r["m"] == m and r["mode"] == name) for name in modes}
        layer[m] = {name: round(ms["bf16"] / t, 4) for name, t in ms.items() if t > 0}
    out = {"kind": "batch1_knobs", "env": environment(), "ceilings": ceil, "model": MODEL, "rows": ROWS,
           "settings": {k: {"zero_after": z, "max_registers": r} for k, (z, r) in KNOB_SETTINGS.items()},
           "layer_speedup_vs_bf16": layer, "results": results,
           "tuning": {name: [{"key": str(key), "choice": str(c)} for key, (c, _) in ch.items()]
                      for name, ch in _choices.items()}}
    for r in results:
        print(f"{r['proj']:8s} m={r['m']:<3d} {r['mode']:26s} {r['ms'] * 1e3:8.2f} us  x{r['speedup_vs_bf16'] or 1:.3f}"
              f"  floor {r['frac_of_floor']:.2f}  err {r['rel_err'] or 0:.1e}")
    print("layer speedup vs bf16:", json.dumps(layer))
    return out


if __name__ == "__main__":
    res = main()
    path = os.path.join(os.environ.get("OUT", "runs"), "batch1_knobs.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
