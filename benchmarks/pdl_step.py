"""The decode step with programmatic dependent launch (PDL) for our kernels, and the attention's program target
(session 21), A/B on the e2e benchmark's Qwen3-8B step (merged projections, split-K attention with its prep inside,
the batch-1 epilogues, compiled step, CUDA-graph replay), rounds round-robin.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/pdl_step.py   # -> $OUT/pdl_step.json

Why. With the epilogues (session 20) a W4 batch-1 step is ≈ 216 of our kernels in a chain (qkv, attention split,
merge, o, gate_up, down per layer) with 0.11 ms of gaps between them (``profile_e2e_epilogues_h100.json``). PDL
(``kernels/overlap.py``) lets each kernel's launch overlap the previous one's drain: each program waits
(``griddepcontrol.wait``) before its first load. Session 9 measured 0-3 % on a step then full of torch.compile's
kernels. The attention's split kernel aims at ``decode_attention.TARGET_PROGRAMS`` programs (264, ≈ 2 per SM, at
every batch); session 18's isolated benchmark had 66 faster at batch 1 (6.8 vs 7.5 µs), never timed in the step.

Variants: ``pdl`` (our batch-1, k-tiled and attention kernels launched with PDL: ``overlap.PDL_ENABLED``;
torch.compile's own kernels stay without it here, so no variant recompiles the step) × ``target`` (the attention's
program target). ``PDL_MODES`` (default ``w4g128-fused+head``; bf16 always first, it runs our attention kernels too),
``PDL_BATCHES`` (default 1,8), ``PDL_ROUNDS`` (default 2), ``PDL_TARGETS`` (default 264,132,66).

Correctness in the same run: after each timing, ``REPLAYS`` replays of a fresh CUDA graph of the step are compared
with the first variant's logits (PDL off, the first target; same seed, same cache): ``replays_bit_equal`` counts the
bit-identical ones (all of them where only PDL differs: the same kernels do the same arithmetic) and ``worst_rel`` the
largest relative difference (another target splits the keys differently: bf16 rounding).
"""

from __future__ import annotations

import os

import torch
from step_variants import time_step_variants  # the shared skeleton of the step A/B benchmarks

from qwenquant.kernels import decode_attention, overlap

MODES = ["bf16", *[m for m in os.environ.get("PDL_MODES", "w4g128-fused+head").split(",") if m and m != "bf16"]]
BATCHES = [int(b) for b in os.environ.get("PDL_BATCHES", "1,8").split(",") if b]
ROUNDS = int(os.environ.get("PDL_ROUNDS", "2"))
TARGETS = [int(t) for t in os.environ.get("PDL_TARGETS", "264,132,66").split(",") if t]
REPLAYS = 20
_first: dict[tuple[str, int], torch.Tensor] = {}  # (mode, batch) -> the first variant's logits


def _setup(pdl: bool, target: int):
    def setup() -> dict:
        overlap.PDL_ENABLED = pdl
        decode_attention.TARGET_PROGRAMS = target
        return {"attend": "prep-in-split", "epilogues": True}
    return setup


def variants_for(mode: str) -> list:
    pairs = [(False, TARGETS[0]), (True, TARGETS[0]), *[(True, t) for t in TARGETS[1:]], (False, TARGETS[-1])]
    return [({"pdl": pdl, "target": t}, _setup(pdl, t)) for pdl, t in dict.fromkeys(pairs)]


def check_replays(mode: str, batch: int, fields: dict, dec) -> dict:
    """Capture the step in a fresh CUDA graph, replay it ``REPLAYS`` times and compare each output with the first
    variant's (module docstring)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dec.step()  # warm on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            out = dec.step()
    torch.cuda.current_stream().wait_stream(stream)
    ref = _first.setdefault((mode, batch), None)
    equal, worst = 0, 0.0
    for _ in range(REPLAYS):
        graph.replay()
        torch.cuda.synchronize()
        if ref is None:
            ref = _first[(mode, batch)] = out.detach().clone()
        equal += bool(torch.equal(out, ref))
        worst = max(worst, float((out.double() - ref.double()).norm() / ref.double().norm()))
    del graph
    return {"replays": REPLAYS, "replays_bit_equal": equal, "worst_rel": worst}


if __name__ == "__main__":
    if not overlap.pdl_ok("cuda", True):
        raise SystemExit("pdl_step: PDL needs a CUDA GPU of compute capability 9.0 or newer")
    time_step_variants("pdl_step", "pdl_step.json", MODES, variants_for, batches=BATCHES, rounds=ROUNDS,
                       doc_extra={"attend": "prep-in-split", "epilogues": True, "inductor_pdl": False},
                       after=check_replays)
