"""Decode step of the e2e benchmark (Qwen3-8B, merged projections, compiled step, CUDA-graph replay, attention
``prep-in-split``) with the split-K attention's merge as a second kernel (``launch``) or done by the last split
program of each batch row × KV head (``split``, ``decode_attention.MERGE_IN_SPLIT``): one launch per layer fewer.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/attention_merge_step.py   # -> $OUT/attention_merge_step.json

Each (mode, batch) times both ``MERGE_ROUNDS`` times round-robin (a fresh decoder and CUDA graph per timing), so the
spread between rounds is the noise. ``MERGE_BATCHES`` (default ``1,8``), ``MERGE_MODES`` (default
``bf16,w4g128-fused,w4g128-fused+head``). The JSON is rewritten after every timing.
"""

from __future__ import annotations

import os

from step_variants import time_step_variants  # the shared skeleton of the step A/B benchmarks

from qwenquant.kernels import decode_attention as DA

BATCHES = [int(b) for b in os.environ.get("MERGE_BATCHES", "1,8").split(",")]
MODES = os.environ.get("MERGE_MODES", "bf16,w4g128-fused,w4g128-fused+head").split(",")
ROUNDS = int(os.environ.get("MERGE_ROUNDS", "3"))


def setup(merge: str) -> dict:
    DA.MERGE_IN_SPLIT = merge == "split"
    return {"attend": "prep-in-split"}


def variants_for(mode: str) -> list:
    return [({"merge": m}, lambda m=m: setup(m)) for m in ("launch", "split")]


if __name__ == "__main__":
    time_step_variants("attention_merge_step", "attention_merge_step.json", MODES, variants_for, BATCHES, ROUNDS,
                       doc_extra={"attend": "prep-in-split"})
