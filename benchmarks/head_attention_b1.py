"""Batch-1 decode step of the e2e benchmark (Qwen3-8B, merged projections, compiled step, CUDA-graph replay) with the
non-GEMM changes of sessions 17–18 switched one at a time: the residual add folded into the next norm
(``fold_norm``), the decode attention (cuDNN SDPA ``filled``, our split-K kernels ``split``, and ``prep``: split after
our one q / k norm + rotary + cache-write kernel; ``prep-in-split``: that work inside the split kernel) and lm_head (bf16 vs W4 g128, the ``w4g128-fused+head`` mode).

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/head_attention_b1.py   # -> $OUT/head_attention_b1.json

A short form of ``e2e.run`` for a short GPU budget: batch 1 only, no prefill, the JSON rewritten after every step
timing so a run cut short keeps what it measured. ``e2e.run(attend="split")`` is the full measurement.
"""

from __future__ import annotations

import json
import os
import time

import torch

from qwenquant.bench import e2e
from qwenquant.bench.hw import environment

OUT = os.environ.get("OUT", "runs")
# (mode, attention, fold the residual add into the next norm): bf16 and W4 under each change, one at a time
ORDER = [("bf16", "filled", False), ("bf16", "filled", True), ("bf16", "split", True), ("bf16", "prep", True),
         ("bf16", "prep-in-split", True),
         ("w4g128-fused", "filled", False), ("w4g128-fused", "filled", True), ("w4g128-fused", "split", True),
         ("w4g128-fused", "prep", True), ("w4g128-fused", "prep-in-split", True),
         ("w4g128-fused+head", "prep", True), ("w4g128-fused+head", "prep-in-split", True)]


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    model = e2e.build_model()
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]
    head = model.lm_head.weight.detach().to("cpu")
    e2e.merge_projections(model)
    doc = {"kind": "head_attention_b1", "env": environment(), "ctx": e2e.CTX, "batch": 1, "steps": []}
    current = "bf16"
    for mode, attend, fold in ORDER:
        if mode != current:
            spec, qmode, with_head = e2e.E2E_MODES[mode]
            e2e.quantize_model(model, originals, spec, qmode, head=head, quantize_head=with_head)
            current = mode
        t = time.time()
        dec = e2e.StaticDecoder(model, 1, compiled=True, attend=attend, fold_norm=fold)
        ms = e2e._graph_ms(dec.step)
        doc["steps"].append({"mode": mode, "attend": attend, "fold_norm": fold, "step_ms": ms,
                             "seconds": time.time() - t})
        print(mode, attend, fold, round(ms, 3), flush=True)
        del dec
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "head_attention_b1.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    main()
