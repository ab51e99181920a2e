"""The decode step with and without the projections' epilogues (session 20): the batch-1 kernel doing the residual
add + next RMSNorm after o and down, and SiLU·mul after gate_up (``fused.add_rmsnorm`` / ``fused.silu_mul``,
``StaticDecoder(epilogues=True)``) — three compiled elementwise kernels fewer per layer — against the same step with
those kernels, on the e2e benchmark's Qwen3-8B (merged projections, split-K attention with its prep inside,
compiled step, CUDA-graph replay), rounds round-robin.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/epilogues_step.py   # -> $OUT/epilogues_step.json

``EPI_MODES`` (default ``w4g128-fused+head``; bf16 always first, where the epilogues do not apply), ``EPI_BATCHES``
(default 1,8: the epilogues apply up to ``fused.EPILOGUE_MAX_M``), ``EPI_ROUNDS`` (default 3).
"""

from __future__ import annotations

import os

from step_variants import time_step_variants  # the shared skeleton of the step A/B benchmarks

MODES = ["bf16", *[m for m in os.environ.get("EPI_MODES", "w4g128-fused+head").split(",") if m and m != "bf16"]]
BATCHES = [int(b) for b in os.environ.get("EPI_BATCHES", "1,8").split(",") if b]
ROUNDS = int(os.environ.get("EPI_ROUNDS", "3"))


def variants_for(mode: str) -> list:
    flags = (False,) if mode == "bf16" else (False, True)
    return [({"epilogues": e}, lambda e=e: {"attend": "prep-in-split", "epilogues": e}) for e in flags]


if __name__ == "__main__":
    time_step_variants("epilogues_step", "epilogues_step.json", MODES, variants_for, batches=BATCHES, rounds=ROUNDS,
                       doc_extra={"attend": "prep-in-split"})
