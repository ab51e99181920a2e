"""Hardware-counter profile of the W4 kernels on one Qwen3-8B shape (gate/up, N=12288, K=4096), for ncu.

    ncu --clock-control none --profile-from-start off --csv --page details \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
        env QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/profile_w4.py > $OUT/ncu_w4.csv

Each case is compiled and run once outside the profiled range, then run exactly once between
cudaProfilerStart/Stop, so the CSV holds one launch per case, in the order printed to stderr
(``$OUT/profile_w4_cases.json`` lists them too). Random packed weights of the real shape; the
numbers are the kernels' behaviour (DRAM throughput, issue activity, stall reasons), not timings to
compare across runs (ncu serializes launches and replays each kernel for its passes).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from w4_session import make_packed  # noqa: E402

from qwenquant.bench.hw import environment  # noqa: E402
from qwenquant.kernels import wq_ktiled as KT  # noqa: E402
from qwenquant.kernels import wq_matmul as K  # noqa: E402
from qwenquant.runtime import fused  # noqa: E402

N, KK, GROUP = 12288, 4096, 128
# (label, M, runner key, config): ktiled args are (bm, bn, w_as_a, split_k, warps, stages[, scale_after]).
# The session-5/6 winners; the session-4 cases (gemv2, the scale-before small tiles) are in commit 7586358 and
# results/ncu_w4_h100.csv.
CASES = [
    ("bf16 M=1", 1, "bf16", None),
    ("tinygemm M=1", 1, "tinygemm", None),
    ("ktiled M=1 B bn128 w4 s3 sk4 after", 1, "ktiled", (16, 128, False, 4, 4, 3, True)),
    ("bf16 M=16", 16, "bf16", None),
    ("ktiled M=16 A bn64 w4 s3 sk2 after", 16, "ktiled", (16, 64, True, 2, 4, 3, True)),
    ("ktiled M=16 A bn128 w4 s3 sk4 after", 16, "ktiled", (16, 128, True, 4, 4, 3, True)),
    ("ktiled M=16 A bn128 w4 s3 sk4 (scale before)", 16, "ktiled", (16, 128, True, 4, 4, 3, False)),
    ("bf16 M=128", 128, "bf16", None),
    ("ktiled M=128 A bm128 bn128 w8 s2 sk1 after", 128, "ktiled", (128, 128, True, 1, 8, 2, True)),
    ("dequant unpack (Triton)", 128, "unpack", None),
    ("bf16 M=1024", 1024, "bf16", None),
    ("ktiled M=1024 A bm128 bn256 w8 s2 sk1", 1024, "ktiled", (128, 256, True, 1, 8, 2, False)),
    ("ktiled M=1024 A bm128 bn128 w8 s2 sk1 after", 1024, "ktiled", (128, 128, True, 1, 8, 2, True)),
]


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    qw, s, z = make_packed(N, KK, 4, GROUP, False, gen)
    w16 = (torch.randn(N, KK, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    kt = KT.KTiledWeight.from_checkpoint(qw, s, z, 4, KK)
    tiny = fused.tinygemm_operands(qw, s, z, GROUP)
    runners = {
        "bf16": lambda x, c: F.linear(x, w16),
        "tinygemm": lambda x, c: torch.ops.aten._weight_int4pack_mm(x, tiny.packed, GROUP, tiny.scale_zero),
        "ktiled": lambda x, c: KT.ktiled_gemm(x, kt.words, kt.sz, 4, GROUP, *c),
        "unpack": lambda x, c: K.dequantize(qw, s, z, 4, GROUP, KK),
    }
    order = []
    for label, m, key, cfg in CASES:
        x = torch.randn(m, KK, device="cuda", generator=gen).to(torch.bfloat16)
        for _ in range(3):
            runners[key](x, cfg)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        runners[key](x, cfg)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        order.append(label)
        print("case", len(order), label, file=sys.stderr, flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "profile_w4_cases.json"), "w") as f:
        json.dump({"env": environment(), "commit": os.environ.get("QWENQUANT_COMMIT", ""), "shape": [N, KK, GROUP],
                   "cases": order}, f, indent=1)


if __name__ == "__main__":
    main()
