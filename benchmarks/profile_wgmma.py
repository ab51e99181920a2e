"""Hardware-counter profile of the Gluon wgmma GEMM (``kernels/wq_wgmma.py``) beside cuBLAS bf16, for ncu: where a
stream-K span's overhead goes (benchmarks/NOTES.md session 11 item 3: ≈ 17–22 µs per program more than its k-tiles
predict) and what holds the whole-tile kernel at ≈ 0.78 of the bf16 peak.

    ncu --clock-control none --profile-from-start off --csv --page details \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section MemoryWorkloadAnalysis \
        --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
        env QWENQUANT_COMMIT=<full sha> PYTHONPATH=src python3 benchmarks/profile_wgmma.py > $OUT/ncu_wgmma.csv

As ``profile_w4.py``: every case is compiled and run outside the profiled range, then run once between
cudaProfilerStart/Stop, so the CSV has one launch per case in the order of ``$OUT/profile_wgmma_cases.json``.
Random W4 g128 weights of the Qwen3-8B merged shapes. Counters describe the kernels; ncu serializes and replays,
so its durations are not the timings of ``wgmma_session.py``. ``PROFILE_WGMMA_CASES=ws``: the batch-1 and
warp-specialized cases (``WS_CASES``) instead.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from wgmma_session import SHAPES, make  # noqa: E402

from qwenquant.bench.hw import environment  # noqa: E402
from qwenquant.kernels import wq_batch1 as B1  # noqa: E402
from qwenquant.kernels import wq_wgmma as W  # noqa: E402
from qwenquant.kernels import wq_wgmma_ws as WS  # noqa: E402
from qwenquant.runtime import fused  # noqa: E402

WHOLE = (128, 256, 8, 4, 2, 0)  # the whole-tile config the tuner takes at M >= 512
STREAMK = (128, 256, 8, 4, 2, 1)
# (proj, M, config or None for cuBLAS bf16): down at 256/512 is where stream-K wins (0.95× / 0.72× bf16) and o at 512
# where it loses (0.55×); gate_up at 2048 shows the whole-tile kernel at full occupancy of the machine
CASES = [("down", 256, None), ("down", 256, (64, 128, 4, 4, 2, 0)), ("down", 256, STREAMK),
         ("down", 512, None), ("down", 512, STREAMK),
         ("o", 512, None), ("o", 512, (128, 128, 8, 4, 2, 0)), ("o", 512, STREAMK),
         ("gate_up", 2048, None), ("gate_up", 2048, WHOLE), ("gate_up", 2048, STREAMK)]
# PROFILE_WGMMA_CASES=ws (session 15): the kernels the tuner now runs where the targets are missed — batch1 at
# M = 1 (its best tiles per shape, session 14) and the warp-specialized tiles at M = 512-2048 (one tile per program
# and persistent), each beside cuBLAS on the same shape and M
WS_CASES = [("qkv", 1, None), ("qkv", 1, ("batch1", (16, 8, 4, 2, 1))),
            ("gate_up", 1, None), ("gate_up", 1, ("batch1", (32, 4, 4, 2, 1))),
            ("o", 512, None), ("o", 512, ("ws", (128, 4, 2, 0))),
            ("qkv", 1024, None), ("qkv", 1024, ("ws", (256, 4, 2, 0))),
            ("gate_up", 2048, None), ("gate_up", 2048, ("ws", (256, 4, 2, 0))), ("gate_up", 2048, ("ws", (256, 4, 2, 1)))]


def runner(x, kt, w16, proj, m, cfg):
    """(call, label) of one case: cuBLAS bf16 (cfg None), a ``wq_wgmma`` config, or ("ws" | "batch1", config)."""
    if cfg is None:
        return (lambda: F.linear(x, w16)), f"bf16 {proj} M={m}"
    if cfg[0] == "ws":
        return (lambda: WS.wgmma_ws_gemm(x, kt.words, kt.sz, 4, 128, *cfg[1])), f"{fused.wgmma_ws_name(cfg[1])} {proj} M={m}"
    if cfg[0] == "batch1":
        return (lambda: B1.batch1_gemm(x, kt.words, kt.sz, 4, 128, *cfg[1])), f"{fused.batch1_name(cfg[1])} {proj} M={m}"
    return (lambda: W.wgmma_gemm(x, kt.words, kt.sz, 4, 128, *cfg)), f"{fused.wgmma_name(cfg)} {proj} M={m}"


def main():
    weights = {}
    order = []
    for proj, m, cfg in WS_CASES if os.environ.get("PROFILE_WGMMA_CASES") == "ws" else CASES:
        n, k = SHAPES[proj]
        if proj not in weights:
            kt, wref = make(n, k, 4, 128, False, seed=1)  # wgmma_session's weights: k-tiled words and exact Ŵ
            weights[proj] = (kt, wref.to(torch.bfloat16))
        kt, w16 = weights[proj]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        run, label = runner(x, kt, w16, proj, m, cfg)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        order.append(label)
        print("case", len(order), label, file=sys.stderr, flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "profile_wgmma_cases.json"), "w") as f:
        json.dump({"env": environment(), "commit": os.environ.get("QWENQUANT_COMMIT", ""), "cases": order}, f, indent=1)


if __name__ == "__main__":
    main()
