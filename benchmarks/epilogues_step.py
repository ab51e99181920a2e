"""The decode step with and without the work around its projections inside the batch-1 kernel (session 20):
``norm`` — o and down add the residual and hand the next RMSNorm on unfinished, gate_up and qkv finish it on their
own sums (``fused.add_residual`` / ``fused.linear_normed``); ``silu`` — SiLU·mul in gate_up's kernel
(``fused.silu_mul``); each alone and both (``StaticDecoder(epilogues=...)``), against the step with the compiled
add + norm and SiLU·mul kernels, on the e2e benchmark's Qwen3-8B (merged projections, split-K attention with its prep
inside, compiled step, CUDA-graph replay), rounds round-robin.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/epilogues_step.py   # -> $OUT/epilogues_step.json

``EPI_MODES`` (default ``w4g128-fused+head``; bf16 always first, where the epilogues do not apply), ``EPI_BATCHES``
(default 1,8: the epilogues apply up to ``fused.EPILOGUE_MAX_M``), ``EPI_ROUNDS`` (default 2).
"""

from __future__ import annotations

import os

from step_variants import time_step_variants  # the shared skeleton of the step A/B benchmarks

MODES = ["bf16", *[m for m in os.environ.get("EPI_MODES", "w4g128-fused+head").split(",") if m and m != "bf16"]]
BATCHES = [int(b) for b in os.environ.get("EPI_BATCHES", "1,8").split(",") if b]
ROUNDS = int(os.environ.get("EPI_ROUNDS", "2"))


VARIANTS = [(), ("silu",), ("norm",), ("norm", "silu")]  # StaticDecoder(epilogues=...)


def variants_for(mode: str) -> list:
    asked = VARIANTS[:1] if mode == "bf16" else VARIANTS
    return [({"epilogues": ",".join(e) or "none"}, lambda e=e: {"attend": "prep-in-split", "epilogues": e})
            for e in asked]


if __name__ == "__main__":
    time_step_variants("epilogues_step", "epilogues_step.json", MODES, variants_for, batches=BATCHES, rounds=ROUNDS,
                       doc_extra={"attend": "prep-in-split"})
