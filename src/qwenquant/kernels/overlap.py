"""Overlap of one kernel's start with the previous kernel's end: weight prefetch + programmatic dependent launch.

Why. At decode (M = 1) a W4 projection of Qwen3-8B reads 9-53 MB in 9-25 us on an H100, and ≈ 4-7 us of each
is not streaming: the launch, the first loads' DRAM latency before any data arrives, the split-K epilogue's
atomics and the last program's tail (benchmarks/NOTES.md, sessions 7-8: every tile shape plateaued at ≈ 9 us
on 4096 x 4096, where the bytes alone take 3 us). cuBLAS's bf16 GEMV pays the same, but on 4x the bytes.

What. The *weights* of the next projection do not depend on the kernel before it; only x does. With
Hopper's programmatic dependent launch (PDL: the kernel is launched with ``launch_pdl=True``, which CUDA-graph
capture keeps as a programmatic edge) the next kernel's programs may start while the previous kernel is
still finishing. Each program then

1. asks L2 for the first ``PREFETCH`` K steps of its weight rows and their scales
   (``cp.async.bulk.prefetch.L2``: one instruction per row, no registers, no data dependency),
2. waits for the previous kernel (``griddepcontrol.wait``: all its writes visible),
3. runs its K loop as before — x is read only after the wait, and nothing is written before it (the
   caching allocator may hand this kernel an output buffer the previous one was still reading, and
   split-K shares one fp32 workspace between consecutive kernels),
4. signals its dependents (``griddepcontrol.launch_dependents``) right after its wait (``TRIGGER`` 1, the
   default), so the next kernel's programs can take free SM slots, prefetch and park at their own wait while
   this one runs.

``TRIGGER`` 2 (release after the K loop, before the epilogue) is *not* safe with split-K, and we do not know why:
chained split-K kernels at M = 3 and 5 came out 3-11 % wrong in 1 of 4 CUDA-graph replays or more, while the same
chains with TRIGGER 1, with TRIGGER 0 (no explicit release: implicitly at exit), with every intermediate kept
alive (no buffer reuse), and without split-K all matched the eager chain to bf16 rounding
(``benchmarks/overlap_session.py check``, session 9; NOTES.md). It stays selectable for that experiment only.

An L2 prefetch is a hint, never a read of stale data into registers: a weight written by the kernel just
before (a layout conversion) is read by the loop after the wait, from L2, the point of coherence.
Without PDL (the default, an older GPU, the CPU interpreter) ``griddepcontrol`` is a no-op and the prefetch
only deepens the loads in flight at the kernel's start — which measured slower, so it is off too
(``wq_ktiled.PREFETCH_TILES`` = 0).

Measured on an H100 (session 9, ``benchmarks/overlap_session.py``, results/overlap_*_h100.json):

* Qwen3-8B merged projections at M = 1, copies back to back in a CUDA graph: qkv 10.7 → 10.3 us, o 8.6 → 8.0-8.3,
  gate_up 25.5 → 25.2, down 15.2 → 14.1-14.4 (best variant per shape); the layer 2.49x → 2.57x bf16. Qwen3-0.6B
  projections (batch-1 GEMV) gain most: qkv 3.9 → 3.3 us, o 3.2 → 2.5, gate_up 4.9 → 3.7.
* The Qwen3-8B decode step (``bench.e2e``, b = 1): 3.52 → 3.41 ms with torch.compile's PDL on (bf16 6.63 ms: 1.94x),
  but 3.57 → 3.71 ms with it off; prefetching 2 k-tiles on top made both slower.
* Why batch 1 stays short of 3.0x on Qwen3-8B (4 kernels per layer): over the four projections cuBLAS's bf16 time
  fits t = 4.65 us + bytes / 2.95 TB/s, ours t = 5.4 us + bytes / 2.66 TB/s (4.9 us with PDL). A W4 kernel as
  good as cuBLAS in both terms would reach 2.80x on the layer; the fixed ≈ 5 us per kernel is not launch latency
  (PDL, which hides the launch and the first loads behind the previous kernel, removed ≈ 0.5 us of it).

torch.compile's own kernels join in with ``TORCHINDUCTOR_ENABLE_PDL=1`` (``torch._inductor.config.triton.
enable_pdl``): they wait before their first load and release their dependents right after it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Off by default: on an H100 it bought the Qwen3-8B decode step 3 % only when torch.compile's kernels take part
# (TORCHINDUCTOR_ENABLE_PDL=1) and cost 4 % when they do not (torch's default); see the numbers below.
_env = os.environ.get("QWENQUANT_PDL", "0").strip()
if _env not in ("0", "1"):
    raise ValueError(f"QWENQUANT_PDL={_env!r}: expected 0 (launch kernels in stream order) or 1 (programmatic "
                     "dependent launch on Hopper and newer)")
PDL_ENABLED = _env == "1"


def pdl_ok(device, requested: bool | None = None) -> bool:
    """Whether a kernel on ``device`` is launched with programmatic dependent launch: ``requested`` (default
    ``PDL_ENABLED``, i.e. ``QWENQUANT_PDL=1``) and a CUDA device of compute capability 9.0 or newer running compiled
    code (not Triton's interpreter)."""
    device = torch.device(device)
    if not (PDL_ENABLED if requested is None else requested) or _INTERPRETED or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def prefetch_ok(device) -> bool:
    """Whether the L2 bulk prefetch may be compiled in (sm_90+: ``cp.async.bulk.prefetch``; no PTX in the
    interpreter)."""
    device = torch.device(device)
    return not _INTERPRETED and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


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
