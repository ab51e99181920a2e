"""Decode step of the e2e benchmark (Qwen3-8B, merged projections, compiled step, CUDA-graph replay, attention
``prep-in-split``) with the MLP's SiLU·mul as torch.compile's kernel (``fuse_glu`` off) or inside the down projection's
batch-1 kernel (on: ``QuantLinear.forward_glu``, one kernel per layer fewer at M <= 8).

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/glu_step.py   # -> $OUT/glu_step.json

Expected (session 19's profile, results/profile_e2e_prep_in_split_h100.json): the SiLU·mul kernel is 1.2 µs per layer
plus a ≈ 0.44 µs gap, ≈ 0.06 ms per step, if the prologue costs the down kernel nothing. ``GLU_BATCHES`` (default
``1,8``), ``GLU_MODES`` (default ``w4g128-fused,w4g128-fused+head``), ``GLU_ROUNDS`` (3), round-robin.
"""

from __future__ import annotations

import os

from step_variants import time_step_variants  # the shared skeleton of the step A/B benchmarks

BATCHES = [int(b) for b in os.environ.get("GLU_BATCHES", "1,8").split(",")]
MODES = os.environ.get("GLU_MODES", "w4g128-fused,w4g128-fused+head").split(",")
ROUNDS = int(os.environ.get("GLU_ROUNDS", "3"))


def variants_for(mode: str) -> list:
    return [({"fuse_glu": f}, lambda f=f: {"attend": "prep-in-split", "fuse_glu": f})
            for f in ((False,) if mode == "bf16" else (False, True))]


if __name__ == "__main__":
    time_step_variants("glu_step", "glu_step.json", MODES, variants_for, BATCHES, ROUNDS,
                       doc_extra={"attend": "prep-in-split"})
