"""Batch-1 decode step of the e2e benchmark (Qwen3-8B, merged projections, compiled step, CUDA-graph replay) with the
two non-GEMM changes of session 17 switched one at a time: the decode attention (cuDNN SDPA ``filled`` vs our split-K
kernels ``split``) and lm_head (bf16 vs W4 g128, the ``w4g128-fused+head`` mode).

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
ORDER = [("bf16", "filled"), ("bf16", "split"), ("w4g128-fused", "split"), ("w4g128-fused+head", "split"),
         ("w4g128-fused", "filled")]


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    model = e2e.build_model()
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]
    head = model.lm_head.weight.detach().to("cpu")
    e2e.merge_projections(model)
    doc = {"kind": "head_attention_b1", "env": environment(), "ctx": e2e.CTX, "batch": 1, "steps": []}
    current = "bf16"
    for mode, attend in ORDER:
        if mode != current:
            spec, qmode, with_head = e2e.E2E_MODES[mode]
            e2e.quantize_model(model, originals, spec, qmode, head=head, quantize_head=with_head)
            current = mode
        t = time.time()
        dec = e2e.StaticDecoder(model, 1, compiled=True, attend=attend)
        ms = e2e._graph_ms(dec.step)
        doc["steps"].append({"mode": mode, "attend": attend, "step_ms": ms, "seconds": time.time() - t})
        print(mode, attend, round(ms, 3), flush=True)
        del dec
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "head_attention_b1.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    main()
