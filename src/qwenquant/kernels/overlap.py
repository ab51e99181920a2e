"""Overlap of one kernel's start with the previous kernel's end: programmatic dependent launch (+ an L2 weight prefetch).

Why. At decode (M = 1) a W4 projection of Qwen3-8B reads 9-53 MB in 9-25 us on an H100, and ≈ 5 us of each is
not streaming: the launch, the first loads' DRAM latency, the split-K epilogue, the last program's tail. cuBLAS's
bf16 GEMV pays about the same (session 9 fit below), but on 4x the bytes, so this fixed cost caps the W4 speedup.

What. The *weights* of the next projection do not depend on the kernel before it; only x does. With Hopper's
programmatic dependent launch (PDL: the kernel is launched with ``launch_pdl=True``, which CUDA-graph capture keeps
as a programmatic edge) the next kernel's programs may start before the previous kernel has finished. Each
program of a k-tiled kernel (``wq_ktiled._overlap_prologue``)

1. optionally asks L2 for its first ``PREFETCH`` k-tiles of weight rows and their scales
   (``cp.async.bulk.prefetch.L2``: one instruction per row, no registers, no data dependency; off by default),
2. waits for the previous kernel (``griddepcontrol.wait``: it has finished and all its writes are visible),
3. runs its K loop — x is read only after the wait, and nothing is written before it (the caching allocator may
   hand this kernel an output buffer the previous one was still reading, and split-K shares one fp32 workspace
   between consecutive kernels),
4. releases the next kernel (``griddepcontrol.launch_dependents``) where ``TRIGGER`` says: 0 — never explicitly,
   i.e. when all its programs have exited (the default: the next kernel's launch and its pre-wait work overlap
   this one's drain and flush); 1 — right after its wait (the next kernel's programs take free SM slots and park
   at their own wait while this one runs); 2 — after its K loop, before the epilogue.

``TRIGGER`` 2 is *not* safe with split-K, and we do not know why: chained split-K kernels at M = 3 and 5 came out
3-11 % wrong in 1-6 of 60 CUDA-graph replays, while the same chains with TRIGGER 0 or 1, with every intermediate
kept alive (no buffer reuse), with a barrier after the wait, and whole-K kernels with TRIGGER 2 all matched the
eager chain to bf16 rounding (``benchmarks/overlap_session.py check`` / ``policy``, results/overlap_race_h100.json,
overlap_policy_h100.json). ``wq_ktiled`` never uses it on split-K kernels.

A prefetch is a hint, never a read of stale data into registers: a weight written by the kernel just before (a
layout conversion) is read by the loop after the wait, from L2, the point of coherence. Without PDL (the default,
an older GPU, the CPU interpreter) ``griddepcontrol`` is a no-op.

torch.compile's own kernels join in with ``TORCHINDUCTOR_ENABLE_PDL=1`` (``torch._inductor.config.triton.
enable_pdl``): they wait before their first load and release their dependents right after it.

Measured on an H100 (session 9, ``benchmarks/overlap_session.py``; results/overlap_*_h100.json):

* Off by default, because it pays only among kernels that use it: the Qwen3-8B decode step (b = 1, torch.compile's
  PDL on for bf16 and W4 alike) went 3.52 → 3.42 ms with TRIGGER 0 in one run (bf16 6.72 ms: 1.91x → 1.97x), while
  the full rerun (``e2e.run(pdl=True)``) gave 1.91x, as without PDL: a 0-3 % effect, inside run-to-run noise. With
  TRIGGER 1 and torch.compile's PDL *off* it went 3.57 → 3.71 ms. ``QWENQUANT_PDL=1`` with ``TORCHINDUCTOR_ENABLE_PDL=1``
  turns it on; ``bench.e2e.run(pdl=True)`` does both for every mode.
* Qwen3-8B merged projections at M = 1, the tuned tiles, copies back to back in a CUDA graph (``bench gemm``'s
  timing), TRIGGER 0: qkv 10.8 → 10.2 us, o 8.7 → 8.5, gate_up 25.6 → 25.3, down 15.2 → 14.7; the layer 60.3 →
  58.7 us (2.48x → 2.55x bf16). TRIGGER 1 made qkv and gate_up 17-21 % slower here (the next kernel's early
  programs take SM slots from this one's) while helping the batch-1 GEMV of small weights most (Qwen3-0.6B o
  3.3 → 2.8 us, gate_up 4.9 → 4.1); the L2 prefetch helped only together with TRIGGER 1 or 2 and made the
  decode step slower, so it stays 0 (``wq_ktiled.PREFETCH_TILES``).
* The fixed cost, fitted over the four 8B projections (M = 1, time on bytes): cuBLAS bf16 4.65 us + bytes / 2.95
  TB/s; ours 5.4 us + bytes / 2.66 TB/s. A W4 kernel matching cuBLAS in both terms gives the layer 2.80x, so the
  3.0x target at M = 1 needs less fixed cost per kernel than cuBLAS has; PDL removed ≈ 0.5 us of ours.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: no inline PTX
# Off by default (the measurements in the module docstring): QWENQUANT_PDL=1 turns it on
_env = os.environ.get("QWENQUANT_PDL", "0").strip()
if _env not in ("0", "1"):
    raise ValueError(f"QWENQUANT_PDL={_env!r}: expected 0 (launch kernels in stream order) or 1 (programmatic "
                     "dependent launch on Hopper and newer)")
PDL_ENABLED = _env == "1"
# where the batch-1 W4 kernel and the decode attention kernels (session 21) release the next kernel under PDL: False —
# at exit (TRIGGER 0, measured: results/pdl_step_h100.json); True — right after their wait (TRIGGER 1: the next
# kernel is launched once every program of this one has started, and its programs take SM slots as this one's
# finish, parked at their own wait). Session 22 (benchmarks/pdl_step.py, PDL_RELEASE=1): True costs the W4 batch-1
# step 0.37 ms (2.87 vs 2.50 ms; why is open: the next kernel launches only once every program of this one has
# released or exited, so its parked programs take no slot this one still needs) while bf16's step, where only the
# attention kernels are ours, gained 0.03-0.05 ms. The second knob: only the attention kernels (66 split programs at batch 1, half the SMs) release
# at their start, the GEMMs at exit (benchmarks/pdl_step.py, PDL_ATTN_RELEASE=1) — W4 +0.015 ms, bf16 -0.04 ms
# (session 22, results/pdl_step_s22_attn_release_h100.json). Both off by default
RELEASE_AT_START = False
ATTENTION_RELEASE_AT_START = False


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_ok(device, requested: bool | None = None) -> bool:
    """Whether a kernel on ``device`` is launched with programmatic dependent launch: ``requested`` (default
    ``PDL_ENABLED``, i.e. ``QWENQUANT_PDL=1``) and a CUDA device of compute capability 9.0 or newer running compiled
    code (not Triton's interpreter)."""
    if not (PDL_ENABLED if requested is None else requested) or INTERPRETED:
        return False
    return _hopper_or_newer(torch.device(device))


def prefetch_ok(device) -> bool:
    """Whether the L2 bulk prefetch may be compiled in (sm_90+: ``cp.async.bulk.prefetch``; no PTX in the
    interpreter)."""
    return not INTERPRETED and _hopper_or_newer(torch.device(device))


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Ask L2 for ``nbytes`` (a multiple of 16, 16-byte aligned start) at each pointer of ``ptrs``: one
    ``cp.async.bulk.prefetch.L2.global`` per element (duplicated elements of a replicated layout repeat a hint,
    harmlessly). No result, no ordering: a hint the memory system may drop."""
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
        [ptrs.to(tl.int64), nbytes + tl.zeros(ptrs.shape, tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Block until the kernel this one depends on has finished and its writes are visible (no-op without PDL).
    The compiled PTX has it ahead of every global load and store of the kernel (``overlap_session.py ptx``)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream start its programs (those that do not fit yet queue for an SM)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
