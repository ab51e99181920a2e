"""Decode step of the e2e benchmark (Qwen3-8B, merged projections, compiled step, CUDA-graph replay, attention
``prep-in-split``) with the attention kernel's L2 prefetch of the next weights switched on and off
(``StaticDecoder(prefetch=...)``: ``none``, ``o`` — the o projection's weight —, ``o+gate_up`` — o's words and the
first ``GATE_UP_PREFETCH_BYTES`` of the merged gate / up words, at several sizes).

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/prefetch_step.py   # -> $OUT/prefetch_step.json

Why: at batch 1 the attention (two launches, ≈ 7 µs) reads ≈ 1 MB of cache and leaves DRAM idle, and the o projection
after it is latency-bound (W4: 8.6 MB in ≈ 7 µs, 40 % of the copy bandwidth). Asking L2 for o's weight while the
attention runs lets o read it from L2. Every mode gets the same step (bf16's o weight is 33.5 MB: it fits the 50 MB
L2 too). Each (mode, batch) times its variants ``PREFETCH_ROUNDS`` times round-robin (a fresh decoder and CUDA graph
per timing), so the spread between rounds is the noise. ``PREFETCH_BATCHES`` (default ``1,8``), ``PREFETCH_MODES``
(default ``bf16,w4g128-fused,w4g128-fused+head``). The JSON is rewritten after every timing.
"""

from __future__ import annotations

import os

from step_variants import time_step_variants  # the shared skeleton of the step A/B benchmarks

from qwenquant.bench import e2e

BATCHES = [int(b) for b in os.environ.get("PREFETCH_BATCHES", "1,8").split(",")]
MODES = os.environ.get("PREFETCH_MODES", "bf16,w4g128-fused,w4g128-fused+head").split(",")
ROUNDS = int(os.environ.get("PREFETCH_ROUNDS", "3"))
# (prefetch, gate_up bytes): o alone, then o with 8 / 16 / 24 MB of gate_up (W4 only: bf16's o already fills 2/3 of L2)
VARIANTS = [("none", 0), ("o", 0), ("o+gate_up", 8 << 20), ("o+gate_up", 16 << 20), ("o+gate_up", 24 << 20)]


def setup(prefetch: str, gate_up_bytes: int) -> dict:
    if gate_up_bytes:
        e2e.GATE_UP_PREFETCH_BYTES = gate_up_bytes
    return {"attend": "prep-in-split", "prefetch": prefetch}


def variants_for(mode: str) -> list:
    return [({"prefetch": p, "gate_up_bytes": gu}, lambda p=p, gu=gu: setup(p, gu))
            for p, gu in (VARIANTS[:2] if mode == "bf16" else VARIANTS)]


if __name__ == "__main__":
    time_step_variants("prefetch_step", "prefetch_step.json", MODES, variants_for, BATCHES, ROUNDS,
                       doc_extra={"attend": "prep-in-split"})
