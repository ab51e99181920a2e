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

import json
import os
import time

import torch

from qwenquant.bench import e2e
from qwenquant.bench.hw import environment

OUT = os.environ.get("OUT", "runs")
BATCHES = [int(b) for b in os.environ.get("PREFETCH_BATCHES", "1,8").split(",")]
MODES = os.environ.get("PREFETCH_MODES", "bf16,w4g128-fused,w4g128-fused+head").split(",")
ROUNDS = int(os.environ.get("PREFETCH_ROUNDS", "3"))
# (prefetch, gate_up bytes): o alone, then o with 8 / 16 / 24 MB of gate_up (W4 only: bf16's o already fills 2/3 of L2)
VARIANTS = [("none", 0), ("o", 0), ("o+gate_up", 8 << 20), ("o+gate_up", 16 << 20), ("o+gate_up", 24 << 20)]


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    model = e2e.build_model()
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]
    head = model.lm_head.weight.detach().to("cpu")
    e2e.merge_projections(model)
    doc = {"kind": "prefetch_step", "env": environment(), "ctx": e2e.CTX, "attend": "prep-in-split", "steps": []}
    for mode in MODES:
        if mode != "bf16":
            spec, qmode, with_head = e2e.E2E_MODES[mode]
            e2e.quantize_model(model, originals, spec, qmode, head=head, quantize_head=with_head)
        variants = VARIANTS[:2] if mode == "bf16" else VARIANTS
        for b in BATCHES:
            for r in range(ROUNDS):
                for prefetch, gu in variants:
                    e2e.GATE_UP_PREFETCH_BYTES = gu or e2e.GATE_UP_PREFETCH_BYTES
                    t = time.time()
                    dec = e2e.StaticDecoder(model, b, compiled=True, attend="prep-in-split", prefetch=prefetch)
                    ms = e2e._graph_ms(dec.step)
                    doc["steps"].append({"mode": mode, "batch": b, "round": r, "prefetch": prefetch,
                                         "gate_up_bytes": gu, "step_ms": ms, "seconds": time.time() - t})
                    print(mode, b, r, prefetch, gu >> 20, round(ms, 4), flush=True)
                    del dec
                    torch.cuda.empty_cache()
                    with open(os.path.join(OUT, "prefetch_step.json"), "w") as f:
                        json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    main()
