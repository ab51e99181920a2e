"""Eager 2048-token prefill of the full-size Qwen3-8B (``bench e2e``'s model and ``prefill_logits``), bf16 against the
W4 g128 modes, with the cached kernel launch (``kernels/launch.py``) on and off in the same process, trials
round-robin so clock drift lands on every variant alike.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/prefill_ab.py     # -> $OUT/prefill_ab.json

Why: session 13's e2e prefill ran 0.65x bf16 in ``fused`` though its GEMMs timed faster than bf16's; session 14
measured 120-185 us of host time per eager W4 call, about the kernel's own time. Per variant: one warm-up (tuning,
compilation), then PREFILL_AB_TRIALS (default 7) timed prefills each, median kept, plus the host time to enqueue one
prefill (no sync until the end) — a host time near the wall time means the GPU waited on the host.
"""

import json
import os
import time

import torch

from qwenquant.bench import e2e
from qwenquant.bench.hw import environment
from qwenquant.kernels import launch as L

OUT = os.environ.get("OUT", ".")
TRIALS = int(os.environ.get("PREFILL_AB_TRIALS", "7"))
MODES = [m for m in os.environ.get("PREFILL_AB_MODES", "w4g128-fused,w4g128-auto").split(",") if m]


def one(model, ids) -> tuple[float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    e2e.prefill_logits(model, ids)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, (t1 - t0) * 1e3


@torch.no_grad()
def main() -> None:
    model = e2e.build_model()
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]
    head = model.lm_head.weight.detach().to("cpu")  # the bf16 lm_head, for the +head modes
    e2e.merge_projections(model)
    ids = torch.randint(0, model.config.vocab_size, (1, e2e.PREFILL), device="cuda")
    doc = {"kind": "prefill_ab", "env": environment(), "tokens": e2e.PREFILL, "trials": TRIALS, "results": {}}
    for label in ["bf16", *MODES]:
        if label != "bf16":
            spec, mode, with_head = e2e.E2E_MODES[label]
            e2e.quantize_model(model, originals, spec, mode, head=head, quantize_head=with_head)
        variants = ["cached launch", "triton launch"] if label != "bf16" else ["-"]
        for v in variants:  # warm-up each (the first also tunes)
            L.ENABLED = v != "triton launch"
            e2e.prefill_logits(model, ids)
        walls = {v: [] for v in variants}
        hosts = {v: [] for v in variants}
        for _ in range(TRIALS):
            for v in variants:
                L.ENABLED = v != "triton launch"
                w, h = one(model, ids)
                walls[v].append(w)
                hosts[v].append(h)
        L.ENABLED = True
        for v in variants:
            med = sorted(walls[v])[TRIALS // 2]
            doc["results"][f"{label} {v}"] = {"wall_ms": med, "host_ms": sorted(hosts[v])[TRIALS // 2],
                                              "tok_s": e2e.PREFILL / med * 1e3, "walls_ms": walls[v]}
            print(label, v, {k: round(x, 2) for k, x in doc["results"][f"{label} {v}"].items() if k != "walls_ms"},
                  flush=True)
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "prefill_ab.json"), "w") as f:
            json.dump(doc, f, default=str, indent=1)
    base = doc["results"]["bf16 -"]["wall_ms"]
    doc["ratio_to_bf16"] = {k: base / r["wall_ms"] for k, r in doc["results"].items()}
    print("ratio to bf16", {k: round(x, 3) for k, x in doc["ratio_to_bf16"].items()}, flush=True)
    with open(os.path.join(OUT, "prefill_ab.json"), "w") as f:
        json.dump(doc, f, default=str, indent=1)


if __name__ == "__main__":
    main()
