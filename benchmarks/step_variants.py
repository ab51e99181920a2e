"""Skeleton of the decode-step A/B benchmarks (``head_attention_b1.py``; session 19's L2-prefetch and in-split-merge
runs used it too, before those options were removed): the e2e benchmark's Qwen3-8B step (random weights, merged
projections, compiled layer step, CUDA-graph replay: ``bench.e2e``) timed per mode × batch × round × variant, one fresh
decoder and graph per timing, the JSON rewritten after every timing so a run cut short keeps what it measured.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable

import torch

from qwenquant.bench import e2e
from qwenquant.bench.hw import environment

# a variant: (fields recorded with its timing, a setup run just before the decoder is built -> StaticDecoder kwargs)
Variant = tuple[dict, Callable[[], dict]]


@torch.no_grad()
def time_step_variants(kind: str, out_name: str, modes: Iterable[str], variants_for: Callable[[str], list[Variant]],
                       batches: Iterable[int] = (1,), rounds: int = 1, doc_extra: dict | None = None,
                       after: Callable[[str, int, dict, "e2e.StaticDecoder"], dict] | None = None) -> dict:
    """Build the model once; for each mode (``bf16`` or an ``e2e.E2E_MODES`` name, quantized in that order), batch and
    round, time every variant of ``variants_for(mode)`` round-robin. Writes ``$OUT/<out_name>`` and returns the doc.
    Each decoder is built under ``torch.manual_seed(0)`` (its random cache and token ids alike for every variant);
    ``after(mode, batch, fields, decoder)``, run after a timing, returns more fields for its record (a check of the
    step's output)."""
    modes = list(modes)
    unknown = [m for m in modes if m != "bf16" and m not in e2e.E2E_MODES]
    if unknown or ("bf16" in modes and modes[0] != "bf16"):  # before minutes of model building
        raise ValueError(f"modes {modes}: expected 'bf16' (first: nothing restores the bf16 projections after a "
                         f"quantized mode) and names of e2e.E2E_MODES; unknown: {unknown}")
    out_dir = os.environ.get("OUT", "runs")
    os.makedirs(out_dir, exist_ok=True)
    model = e2e.build_model()
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]
    head = model.lm_head.weight.detach().to("cpu")
    e2e.merge_projections(model)
    doc = {"kind": kind, "env": environment(), "ctx": e2e.CTX, **(doc_extra or {}), "steps": []}
    for mode in modes:
        if mode != "bf16":
            spec, qmode, with_head = e2e.E2E_MODES[mode]
            e2e.quantize_model(model, originals, spec, qmode, head=head, quantize_head=with_head)
        for b in batches:
            for r in range(rounds):
                for fields, setup in variants_for(mode):
                    kwargs = setup()
                    t = time.time()
                    torch.manual_seed(0)
                    dec = e2e.StaticDecoder(model, b, compiled=True, **kwargs)
                    ms = e2e._graph_ms(dec.step)
                    rec = {"mode": mode, "batch": b, "round": r, **fields, "step_ms": ms, "seconds": time.time() - t}
                    if after is not None:
                        rec.update(after(mode, b, fields, dec))
                    doc["steps"].append(rec)
                    print(mode, b, r, *fields.values(), round(ms, 4), flush=True)
                    del dec
                    torch.cuda.empty_cache()
                    with open(os.path.join(out_dir, out_name), "w") as f:
                        json.dump(doc, f, indent=1, default=str)
    return doc
