"""Programmatic dependent launch (PDL, ``kernels/overlap.py``) for the kernels of the decode step's chain: the batch-1
W4 kernel with its epilogues (``kernels/wq_batch1.py``) and the split-K attention (``kernels/decode_attention.py``).

A PDL-launched kernel may start while the one before it drains, so every program must wait
(``griddepcontrol.wait``) before its first global load or store: a load ahead of the wait reads a stale input, a store
ahead of it may overwrite a buffer the previous kernel still reads. The CPU tests check that order in the sm_90a
PTX (built offline, no GPU) and that the wait costs no registers; the GPU test replays a whole decode step with PDL
from a CUDA graph and compares it bit for bit with the step in stream order.
"""

from __future__ import annotations

import re

import pytest
import torch

from qwenquant.kernels import decode_attention as A
from qwenquant.kernels import wq_batch1 as B

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_MEMORY_OP = re.compile(r"(@!?%p\d+\s+)?((ld|st|atom|red)\.global|cp\.async)")  # predicated ones too


def _wait_precedes_memory(ptx: str) -> tuple[int, int]:
    """(line of the first ``griddepcontrol.wait``, line of the first global memory instruction) in ``ptx``."""
    lines = [line.strip() for line in ptx.splitlines()]
    waits = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
    memory = [i for i, line in enumerate(lines) if _MEMORY_OP.match(line)]
    assert waits and memory, (len(waits), len(memory))
    return waits[0], memory[0]


@pytest.mark.parametrize("kernel", ["batch1 add_residual", "batch1 silu_mul normed", "batch1 split-k",
                                    "batch1 persistent silu_mul normed", "attention split prep", "attention merge"])
def test_pdl_builds_wait_before_the_first_memory_access(kernel):
    """Offline sm_90a builds (the Triton wheel's ptxas, no GPU): with PDL the wait is the first thing that touches
    global memory, and it costs no registers, spills or shared memory against the same kernel without PDL."""
    from qwenquant.kernels.launch import ptxas_usage

    build = {"batch1 add_residual": lambda pdl: B.compile_for_sm90(32, 4, 4, 4, epi=B.ADD_RESIDUAL, pdl=pdl),
             "batch1 silu_mul normed": lambda pdl: B.compile_for_sm90(32, 4, 4, 2, epi=B.SILU_MUL, norm_slots=128,
                                                                      pdl=pdl),
             "batch1 split-k": lambda pdl: B.compile_for_sm90(16, 8, 4, 2, splits=2, pdl=pdl),
             "batch1 persistent silu_mul normed": lambda pdl: B.compile_for_sm90(32, 4, 4, 3, epi=B.SILU_MUL,
                                                                                 norm_slots=128, pdl=pdl, persist=True),
             "attention split prep": lambda pdl: A.compile_for_sm90("split", prep=True, pdl=pdl),
             "attention merge": lambda pdl: A.compile_for_sm90("merge", pdl=pdl)}[kernel]
    plain, with_pdl = build(False), build(True)
    assert "griddepcontrol" not in plain.asm["ptx"]
    wait, first = _wait_precedes_memory(with_pdl.asm["ptx"])
    assert wait < first, (kernel, wait, first)
    use, base = ptxas_usage(with_pdl), ptxas_usage(plain)
    assert use["spill_bytes"] == 0 and use["registers"] <= base["registers"] and \
        use["shared_bytes"] == base["shared_bytes"], (kernel, use["registers"], base["registers"])


@pytest.mark.parametrize("kernel", ["batch1", "attention split", "attention merge"])
def test_release_at_start_builds_the_release_after_the_wait(kernel):
    """``overlap.RELEASE_AT_START`` (offline sm_90a builds): ``griddepcontrol.launch_dependents`` right after the wait,
    before any global memory access; without it no release instruction at all (the next kernel launches at exit)."""
    build = {"batch1": lambda r: B.compile_for_sm90(32, 4, 4, 4, epi=B.ADD_RESIDUAL, pdl=True, release_at_start=r),
             "attention split": lambda r: A.compile_for_sm90("split", prep=True, pdl=True, release_at_start=r),
             "attention merge": lambda r: A.compile_for_sm90("merge", pdl=True, release_at_start=r)}[kernel]
    assert "griddepcontrol.launch_dependents" not in build(False).asm["ptx"]
    ptx = build(True).asm["ptx"]
    lines = [line.strip() for line in ptx.splitlines()]
    release = next(i for i, line in enumerate(lines) if line.startswith("griddepcontrol.launch_dependents"))
    wait, first = _wait_precedes_memory(ptx)
    assert wait < release < first, (wait, release, first)


def test_pdl_is_off_on_a_cpu_whatever_is_asked():
    from qwenquant.kernels import overlap

    assert not overlap.pdl_ok("cpu", True) and not overlap.pdl_ok(torch.device("cpu"))


@pytest.mark.gpu
@cuda
@torch.no_grad()
def test_decode_step_with_pdl_replays_bit_equal_to_stream_order():
    """A small Qwen3 in fused W4 (every projection a batch-1 kernel with its epilogues, split-K attention with its
    prep inside) at batch 1 and 5: 30 CUDA-graph replays of the step with PDL on (released at exit, right after the
    wait: ``overlap.RELEASE_AT_START``, and right after it in the attention kernels only:
    ``overlap.ATTENTION_RELEASE_AT_START``) give the logits of the step launched in stream order, bit for bit, and the
    kernels were built and launched for PDL."""
    transformers = pytest.importorskip("transformers")
    from qwenquant.bench import e2e
    from qwenquant.kernels import launch, overlap
    from qwenquant.numerics import QuantSpec
    from tests.test_batch1_epilogues import _small_qwen3

    if not overlap.pdl_ok("cuda", True):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    model = _small_qwen3(transformers, hidden=512, inter=1024, layers=3, heads=8, head_dim=64, vocab=1000)
    model = model.to("cuda", torch.bfloat16)
    originals = [getattr(p, n).weight.detach().float().cpu() for p, n in e2e.decoder_linears(model)]
    e2e.merge_projections(model)
    e2e.quantize_model(model, originals, QuantSpec(4, 128, False), "fused")
    saved = overlap.PDL_ENABLED, overlap.RELEASE_AT_START, overlap.ATTENTION_RELEASE_AT_START
    try:
        for b, release in ((1, False), (5, False), (1, True), (5, True), (1, "attention"), (5, "attention")):
            overlap.PDL_ENABLED = False
            torch.manual_seed(1)
            dec = e2e.StaticDecoder(model, b, ctx=256, device="cuda", attend="prep-in-split", epilogues=True)
            assert dec.epilogues == (True, True)
            ref = dec.step().clone()
            overlap.PDL_ENABLED, overlap.RELEASE_AT_START = True, release is True
            overlap.ATTENTION_RELEASE_AT_START = release == "attention"
            dec.step()  # compile the PDL builds outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = dec.step()
            for i in range(30):
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, ref), (b, release, i, float((out.float() - ref.float()).abs().max()))
            del graph
    finally:
        overlap.PDL_ENABLED, overlap.RELEASE_AT_START, overlap.ATTENTION_RELEASE_AT_START = saved
    batch1 = [e.kernel for key, e in launch._CACHES.get(id(B._batch1_kernel), {}).items() if ("PDL", True) in key[1]]
    attention = [ck for kernel in (A._decode_attention_split, A._decode_attention_merge)
                 for cache in kernel.device_caches.values() for ck in cache[0].values()
                 if getattr(ck.metadata, "launch_pdl", False)]
    assert batch1 and len(attention) >= 2
    assert all(ck.metadata.launch_pdl and "griddepcontrol.wait" in ck.asm["ptx"] for ck in batch1 + attention)
