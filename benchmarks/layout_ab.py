"""A/B of the resident int8 layout against the copy it replaced, on the GPU: native int8 at prefill rows.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/layout_ab.py   # writes $OUT/layout_ab.json

The same layer run two ways in one process — ``native`` mode (the storage converted in place to signed codes
and read as it is) and ``native.forward_native`` called on a layer left in ``fake`` mode (the operand built as
a copy, as before c899505) — timed alternately with CUDA-graph replay at M = 2048 and 1, on Qwen3-8B's merged
shapes. Written to check whether the e2e int8 prefill change after c899505 was the layout or run-to-run noise.
"""

from __future__ import annotations

import json
import os

import torch

from qwenquant.bench.gemm import time_graph
from qwenquant.bench.hw import environment
from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime import native
from qwenquant.runtime.quant_linear import QuantLinear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


def main() -> None:
    out = os.environ.get("OUT", "runs")
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        make = lambda: QuantLinear.from_weight(quantize_weight(w, QuantSpec(8, None, True)), act_bits=8,  # noqa: E731
                                               compute_dtype=torch.bfloat16)
        resident, copied = make(), make()
        resident.mode = "native"
        for m in (2048, 1):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y_r, y_c = resident(x), native.forward_native(copied, x)  # build operands, tune, outside the graphs
            same = bool(torch.equal(y_r, y_c))
            times = {"resident": [], "copy": []}
            for _ in range(3):  # alternate, so a clock drift hits both
                times["resident"].append(time_graph(lambda: resident(x)))
                times["copy"].append(time_graph(lambda: native.forward_native(copied, x)))
            rows.append({"proj": name, "n": n, "k": k, "m": m, "equal_outputs": same, "layout": resident.layout,
                         "resident_bytes": resident.resident_bytes, "copy_resident_bytes": copied.resident_bytes,
                         "ms_resident": sorted(times["resident"])[1], "ms_copy": sorted(times["copy"])[1]})
            print(rows[-1], flush=True)
    with open(os.path.join(out, "layout_ab.json"), "w") as f:
        json.dump({"kind": "layout_ab", "env": environment(), "results": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
