"""The decode step with programmatic dependent launch (PDL) for our kernels, persistent batch-1 tiles, and the
attention's program target (session 21), A/B on the e2e benchmark's Qwen3-8B step (merged projections, split-K attention with its prep inside,
the batch-1 epilogues, compiled step, CUDA-graph replay), rounds round-robin.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/pdl_step.py   # -> $OUT/pdl_step.json

Why. With the epilogues (session 20) a W4 batch-1 step is ≈ 216 of our kernels in a chain (qkv, attention split,
merge, o, gate_up, down per layer) with 0.11 ms of gaps between them (``profile_e2e_epilogues_h100.json``). PDL
(``kernels/overlap.py``) lets each kernel's launch overlap the previous one's drain: each program waits
(``griddepcontrol.wait``) before its first load. Session 9 measured 0-3 % on a step then full of torch.compile's
kernels. The attention's split kernel aimed at 264 programs (≈ 2 per SM) at every batch; session 18's isolated
benchmark had 66 faster at batch 1 (6.8 vs 7.5 µs), never timed in the step. A variant's target applies at every
batch (``TARGET_PROGRAMS`` and ``BATCH1_TARGET_PROGRAMS``; since this run the default is 66 at batch 1, 264 above).

Persistent tiles (``fused.BATCH1_PERSISTENT``): gate_up has 768 row blocks of 32 rows for 264-396 resident
programs, each filling and draining its own 4-step pipeline; a persistent program walks ≈ 3 blocks in one pipelined
loop. The tuner times them beside the one-block-per-program tiles when ``fused.OFFER_BATCH1_PERSISTENT``; the
variants without them use a tuner state of their own (tuned once per state, swapped in, not re-tuned per variant).

Variants: ``pdl`` (our batch-1, k-tiled and attention kernels launched with PDL: ``overlap.PDL_ENABLED``;
torch.compile's own kernels stay without it here, so no variant recompiles the step) × ``persist`` (W4 only) ×
``target`` (the attention's program target). ``PDL_MODES`` (default ``w4g128-fused+head``; bf16 always first, it runs our attention kernels too),
``PDL_BATCHES`` (default 1,8), ``PDL_ROUNDS`` (default 2), ``PDL_TARGETS`` (default 264,132,66), ``PDL_RELEASE=1``
(each PDL variant again with ``overlap.RELEASE_AT_START``: the batch-1 and attention kernels release the next kernel
right after their wait instead of at exit; session 21's run had it off), ``PDL_ATTN_RELEASE=1`` (the same with
``overlap.ATTENTION_RELEASE_AT_START``: the attention kernels only; session 22), ``PDL_MERGE=1`` (each PDL variant again
with ``decode_attention.MERGE_IN_SPLIT``: the last split program merges, no merge launch), ``PDL_WHOLE=1`` (each PDL
variant again with ``decode_attention.WHOLE_SLICE_MAX = 64``: slices of at most 64 positions loaded at once, ahead of
the wait; session 23), ``PDL_PERSIST=0`` (no persistent-tile variants), ``PDL_MMA=1`` (each W4 PDL variant again with
``kernels/wq_batch1_mma.py`` offered to the tuner beside ``wq_batch1``: ``fused.OFFER_BATCH1_MMA``, a tuner state of
its own; session 26 — every other variant runs with it off). Session 25 timed two batch-1 levers here and
removed them (a register cap of 128, the zero point after the MMA: +0.31-0.37 and +0.75-0.82 ms per step;
``results/pdl_step_s25_levers_h100.json``, benchmarks/NOTES.md).

Correctness in the same run: after each timing, ``REPLAYS`` replays of a fresh CUDA graph of the step:
``replays_bit_equal`` counts those equal bit for bit to the graph's first replay (a race — a load ahead of its
producer — would not repeat exactly), ``bit_equal_first_variant`` whether it equals the first variant's logits (PDL
off, the first target, no persistent tiles; same seed, same cache: expected where only PDL differs, the same kernels
doing the same arithmetic) and ``worst_rel`` the largest relative difference from them (another attention target or
tile sums in another order: bf16 rounding).
"""

from __future__ import annotations

import os

import torch
from step_variants import time_step_variants  # the shared skeleton of the step A/B benchmarks

from qwenquant.kernels import decode_attention, overlap
from qwenquant.runtime import fused

MODES = ["bf16", *[m for m in os.environ.get("PDL_MODES", "w4g128-fused+head").split(",") if m and m != "bf16"]]
BATCHES = [int(b) for b in os.environ.get("PDL_BATCHES", "1,8").split(",") if b]
ROUNDS = int(os.environ.get("PDL_ROUNDS", "2"))
TARGETS = [int(t) for t in os.environ.get("PDL_TARGETS", "264,132,66").split(",") if t]
RELEASE = os.environ.get("PDL_RELEASE", "0") == "1"  # each PDL variant also with overlap.RELEASE_AT_START
ATTN_RELEASE = os.environ.get("PDL_ATTN_RELEASE", "0") == "1"  # ... with overlap.ATTENTION_RELEASE_AT_START
MERGE = os.environ.get("PDL_MERGE", "0") == "1"  # each PDL variant also with decode_attention.MERGE_IN_SPLIT
WHOLE = 64 if os.environ.get("PDL_WHOLE", "0") == "1" else 0  # ... also with decode_attention.WHOLE_SLICE_MAX
PERSIST = os.environ.get("PDL_PERSIST", "1") == "1"  # the W4 variants with persistent batch-1 tiles too
MMA = os.environ.get("PDL_MMA", "0") == "1"  # each PDL variant also with wq_batch1_mma offered (session 26)
REPLAYS = 20
_first: dict[tuple[str, int], torch.Tensor] = {}  # (mode, batch) -> the first variant's logits


_tuned: dict[tuple[bool, bool], dict] = {}  # (OFFER_BATCH1_PERSISTENT, OFFER_BATCH1_MMA) -> the tuner's choices


def use_persistent(on: bool, mma: bool = False) -> None:
    """Offer the persistent batch-1 tiles or not (and ``wq_batch1_mma``'s configs or not), with the tuner choices made
    under that setting."""
    now = (fused.OFFER_BATCH1_PERSISTENT, fused.OFFER_BATCH1_MMA)
    if now == (on, mma):
        return
    _tuned[now] = fused.TUNER.choices
    fused.OFFER_BATCH1_PERSISTENT, fused.OFFER_BATCH1_MMA = on, mma
    fused.TUNER.choices = _tuned.get((on, mma), {})


def _setup(pdl: bool, target: int, persist: bool, release: bool = False, merge: bool = False,
           attn_release: bool = False, whole: int = 0, mma: bool = False):
    def setup() -> dict:
        overlap.PDL_ENABLED = pdl
        overlap.RELEASE_AT_START = release
        overlap.ATTENTION_RELEASE_AT_START = attn_release
        decode_attention.MERGE_IN_SPLIT = merge
        decode_attention.WHOLE_SLICE_MAX = whole
        decode_attention.TARGET_PROGRAMS = decode_attention.BATCH1_TARGET_PROGRAMS = target
        use_persistent(persist, mma)
        return {"attend": "prep-in-split", "epilogues": True}
    return setup


def variants_for(mode: str) -> list:
    t0 = TARGETS[0]
    if mode == "bf16" or not PERSIST:  # bf16: no W4 kernel, the persistent tiles do not apply
        asked = [(False, t0, False), (True, t0, False), *[(True, t, False) for t in TARGETS[1:]]]
    else:
        asked = [(False, t0, False), (True, t0, False), (False, t0, True), (True, t0, True),
                 *[(True, t, True) for t in TARGETS[1:]]]
    asked = [(*a, False) for a in asked] + ([(*a, True) for a in asked if a[0]] if RELEASE else [])
    asked = [(*a, False) for a in asked] + ([(*a, True) for a in asked if a[0] and not a[3]] if ATTN_RELEASE else [])
    # (pdl, target, persist, release, attention release) -> + merge
    asked = [(*a, False) for a in asked] + ([(*a, True) for a in asked if a[0]] if MERGE else [])
    asked = [(*a, 0) for a in asked] + ([(*a, WHOLE) for a in asked if a[0]] if WHOLE else [])
    w4 = mode != "bf16"
    asked = [(*a, False) for a in asked] + ([(*a, True) for a in asked if a[0] and w4] if MMA else [])
    return [({"pdl": pdl, "target": t, "persist": p, "release": r, "attn_release": ar, "merge": m, "whole": w,
              "mma": mm}, _setup(pdl, t, p, r, m, ar, w, mm)) for pdl, t, p, r, ar, m, w, mm in asked]


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
    own = None  # this graph's first replay: every later one must equal it bit for bit (a race would not)
    equal, worst = 0, 0.0
    for _ in range(REPLAYS):
        graph.replay()
        torch.cuda.synchronize()
        if own is None:
            own = out.detach().clone()
        ref = _first.setdefault((mode, batch), own)
        equal += bool(torch.equal(out, own))
        worst = max(worst, float((out.double() - ref.double()).norm() / ref.double().norm()))
    del graph
    return {"replays": REPLAYS, "replays_bit_equal": equal, "worst_rel": worst,
            "bit_equal_first_variant": bool(torch.equal(own, _first[(mode, batch)]))}


if __name__ == "__main__":
    if not overlap.pdl_ok("cuda", True):
        raise SystemExit("pdl_step: PDL needs a CUDA GPU of compute capability 9.0 or newer")
    time_step_variants("pdl_step", "pdl_step.json", MODES, variants_for, batches=BATCHES, rounds=ROUNDS,
                       doc_extra={"attend": "prep-in-split", "epilogues": True, "inductor_pdl": False},
                       after=check_replays)
