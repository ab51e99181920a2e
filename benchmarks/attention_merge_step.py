"""Decode step of the e2e benchmark (Qwen3-8B, merged projections, compiled step, CUDA-graph replay, attention
``prep-in-split``) with the split-K attention's merge as a second kernel (``launch``) or done by the last split
program of each batch row × KV head (``split``, ``decode_attention.MERGE_IN_SPLIT``): one launch per layer fewer.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/attention_merge_step.py   # -> $OUT/attention_merge_step.json

Each (mode, batch) times both ``MERGE_ROUNDS`` times round-robin (a fresh decoder and CUDA graph per timing), so the
spread between rounds is the noise. ``MERGE_BATCHES`` (default ``1,8``), ``MERGE_MODES`` (default
``bf16,w4g128-fused,w4g128-fused+head``). The JSON is rewritten after every timing.
"""

from __future__ import annotations

import json
import os
import time

import torch

from qwenquant.bench import e2e
from qwenquant.bench.hw import environment
from qwenquant.kernels import decode_attention as DA

OUT = os.environ.get("OUT", "runs")
BATCHES = [int(b) for b in os.environ.get("MERGE_BATCHES", "1,8").split(",")]
MODES = os.environ.get("MERGE_MODES", "bf16,w4g128-fused,w4g128-fused+head").split(",")
ROUNDS = int(os.environ.get("MERGE_ROUNDS", "3"))


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    model = e2e.build_model()
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]
    head = model.lm_head.weight.detach().to("cpu")
    e2e.merge_projections(model)
    doc = {"kind": "attention_merge_step", "env": environment(), "ctx": e2e.CTX, "attend": "prep-in-split",
           "steps": []}
    for mode in MODES:
        if mode != "bf16":
            spec, qmode, with_head = e2e.E2E_MODES[mode]
            e2e.quantize_model(model, originals, spec, qmode, head=head, quantize_head=with_head)
        for b in BATCHES:
            for r in range(ROUNDS):
                for merge in ("launch", "split"):
                    DA.MERGE_IN_SPLIT = merge == "split"
                    t = time.time()
                    dec = e2e.StaticDecoder(model, b, compiled=True, attend="prep-in-split")
                    ms = e2e._graph_ms(dec.step)
                    doc["steps"].append({"mode": mode, "batch": b, "round": r, "merge": merge, "step_ms": ms,
                                         "seconds": time.time() - t})
                    print(mode, b, r, merge, round(ms, 4), flush=True)
                    del dec
                    torch.cuda.empty_cache()
                    with open(os.path.join(OUT, "attention_merge_step.json"), "w") as f:
                        json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    main()
