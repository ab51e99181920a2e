"""Batch-1 decode step of the e2e benchmark (Qwen3-8B, merged projections, compiled step, CUDA-graph replay) with the
non-GEMM changes of sessions 17–18 switched one at a time: the residual add folded into the next norm
(``fold_norm``), the decode attention (cuDNN SDPA ``filled``, our split-K kernels ``split``, and ``prep``: split after
our one q / k norm + rotary + cache-write kernel; ``prep-in-split``: that work inside the split kernel) and lm_head (bf16 vs W4 g128, the ``w4g128-fused+head`` mode).

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/head_attention_b1.py   # -> $OUT/head_attention_b1.json

A short form of ``e2e.run`` for a short GPU budget: batch 1 only, no prefill, the JSON rewritten after every step
timing so a run cut short keeps what it measured. ``e2e.run(attend="split")`` is the full measurement.
"""

from __future__ import annotations

from step_variants import time_step_variants  # the shared skeleton of the step A/B benchmarks

# (mode, attention, fold the residual add into the next norm): bf16 and W4 under each change, one at a time
ORDER = [("bf16", "filled", False), ("bf16", "filled", True), ("bf16", "split", True), ("bf16", "prep", True),
         ("bf16", "prep-in-split", True),
         ("w4g128-fused", "filled", False), ("w4g128-fused", "filled", True), ("w4g128-fused", "split", True),
         ("w4g128-fused", "prep", True), ("w4g128-fused", "prep-in-split", True),
         ("w4g128-fused+head", "prep", True), ("w4g128-fused+head", "prep-in-split", True)]


def variants_for(mode: str) -> list:
    return [({"attend": attend, "fold_norm": fold}, lambda attend=attend, fold=fold: {"attend": attend, "fold_norm": fold})
            for m, attend, fold in ORDER if m == mode]


if __name__ == "__main__":
    time_step_variants("head_attention_b1", "head_attention_b1.json", dict.fromkeys(m for m, _, _ in ORDER),
                       variants_for, batches=(1,), doc_extra={"batch": 1})
