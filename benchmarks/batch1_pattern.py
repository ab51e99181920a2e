"""Is it the access pattern or the arithmetic? The batch-1 W4 kernel's loads without its dequantization, and with a
stand-in for it, beside a flat read of the same bytes and the real kernel — Qwen3-8B's merged projections at M = 1.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=$PWD/src python3 benchmarks/batch1_pattern.py   # -> $OUT/batch1_pattern.json

Why (session 22). gate_up at M = 1 takes ≈ 25–26 µs for its 53 MB where a kernel that only reads them takes ≈ 19 µs
(``read_floor.py``); neither deeper pipelines, other tiles (sessions 13–15) nor persistent programs (session 21) moved
it, and ncu shows the warps waiting on memory with the issue slots 40 % busy. Two explanations predict different
numbers here:

- **the pattern**: each program reads BN rows × KB·32 words (512 B per row at KB = 4) per step, rows 2 KB apart
  (K = 4096), through Triton's cp.async pipeline — if ``pattern`` alone is near the real kernel, the loads are the
  limit (layout: one contiguous chunk per step; or TMA);
- **the arithmetic between the loads**: if ``pattern`` is near the flat read but ``pattern+alu`` (the same loads, every
  word's 8 nibbles extracted, converted and multiply-added in fp32: ≈ 3–4 instructions per weight, the real kernel's
  count) is near the real kernel, the dequantization's issue time is what the too-few warps cannot hide (fewer
  instructions per weight: a layout with a column pair per word; or more warps per SM).

Candidates per shape (all timed round-robin over copies that overflow L2, as ``bench gemm``):
  flat                     ``read_floor``'s best flat read of the same code bytes (b1024 i4 w4)
  pattern bnR kbK sS wW    the batch-1 tile's loads (R rows, K k-tiles of 32 words per step, S pipeline stages)
  pattern+alu …            the same loads with the nibble arithmetic
  pattern[+alu] tma …      the same steps, each one TMA box of [BN, KB·32] words instead of per-thread cp.async
  w4-fused                 the real kernel (QuantLinear ``fused`` at M = 1, tuned; codes + scales)
Every candidate's result is checked against torch on the same words before it is timed (a wrong one is dropped).
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from qwenquant.bench.gemm import MODEL_SHAPES, W4, l2_copies, time_interleaved
from qwenquant.bench.hw import environment
from read_floor import _read_kernel, copy_bandwidth, xor_all  # benchmarks/ is on the path: this script's own folder

SUB = 32  # words per k-tile of the k-tiled layout (``numerics.ktiled.SUB``)
# (bn, kb, stages, warps): the tuner's batch-1 tiles (``fused.BATCH1``: gate_up takes bn32 kb4 w4 s2), deeper
# pipelines of it, and the whole of K = 4096 in one step (kb16, one stage)
TILES = [(32, 4, 2, 4), (32, 4, 3, 4), (32, 4, 4, 4), (16, 8, 2, 4), (16, 4, 3, 2), (32, 16, 1, 4)]
PER_SM = [0, 3]  # 0: one program per row block (occupancy as registers allow); 3: the real kernel's 3 per SM, persistent
LOADS = ["cp.async", "tma"]  # per-thread copies (what Triton makes of the real kernel's loads) or one TMA box per step


@triton.jit
def _pattern_kernel(w_ptr, x0, out_ptr, KW, N, BN: tl.constexpr, KBW: tl.constexpr, STAGES: tl.constexpr,
                    ALU: tl.constexpr, PERSIST: tl.constexpr, TMA: tl.constexpr = False):
    """Row block ``b`` (rows b·BN …) of a [N, KW] word matrix, walked in steps of KBW words per row as
    ``wq_batch1._batch1_tile`` does; one block per program, or with ``PERSIST`` blocks pid, pid + programs, … (a grid
    of c programs per SM: the real kernel's 163 registers allow 3, this one's 72 would let 7 in). Without ``ALU`` the
    program xors the words; with it, every word's 8 nibbles t times x0 + t are summed in fp32 (stored as the float's
    bits; x is a scalar argument so that the only loads are the words). ``TMA``: ``w_ptr`` is a host tensor
    descriptor of the [N, KW] words with [BN, KBW] boxes, and each step is one TMA copy (Hopper's bulk tensor load,
    pipelined through shared memory by Triton) instead of per-thread cp.async."""
    pid = tl.program_id(0)
    rw = tl.arange(0, KBW)
    acc_i = tl.zeros([BN, KBW], tl.int32)
    acc_f = tl.zeros([BN, KBW], tl.float32)
    step = tl.num_programs(0) if PERSIST else 1
    last = N // BN if PERSIST else pid + 1
    for blk in range(pid, last, step):
        rn = blk * BN + tl.arange(0, BN)
        for k0 in tl.range(0, KW, KBW, num_stages=STAGES):
            if TMA:
                w = w_ptr.load([blk * BN, k0])  # [BN, KBW] words, one bulk copy
            else:
                w = tl.load(w_ptr + rn[:, None] * KW + k0 + rw[None, :])  # [BN, KBW] words
            if ALU:
                for t in tl.static_range(8):
                    acc_f += ((w >> (4 * t)) & 15).to(tl.float32) * (x0 + t)
            else:
                acc_i ^= w
    if ALU:
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc_f, 1), 0).to(tl.int32, bitcast=True))
    else:
        tl.store(out_ptr + pid, tl.xor_sum(tl.xor_sum(acc_i, 1), 0))


def pattern_reference(words: torch.Tensor, x0: float, bn: int, alu: bool, programs: int = 0) -> torch.Tensor:
    """Per program: the xor of its row blocks' words, or Σ nibble_t(word) · (x0 + t) in fp64; one block of ``bn``
    rows per program, or with ``programs`` > 0 blocks pid, pid + programs, … (``_pattern_kernel``'s PERSIST)."""
    n, kw = words.shape
    blocks = words.view(n // bn, bn * kw)
    if alu:
        x = x0 + torch.arange(8, device=words.device, dtype=torch.float64)
        per_block = sum(((blocks >> (4 * t)) & 15).double().sum(1) * x[t] for t in range(8))
    else:
        per_block = _xor_reduce(blocks)
    if not programs:
        return per_block
    out = []
    for p in range(programs):
        mine = per_block[p::programs]
        out.append(mine.sum() if alu else (_xor_reduce(mine) if len(mine) else torch.zeros_like(per_block[0])))
    return torch.stack(out)


def _xor_reduce(t: torch.Tensor) -> torch.Tensor:
    """xor over the last dim by halving (fast on the GPU)."""
    while t.shape[-1] > 1:
        if t.shape[-1] % 2:
            t = torch.cat([t[..., :1] ^ t[..., -1:], t[..., 1:-1]], -1)
        h = t.shape[-1] // 2
        t = t[..., :h] ^ t[..., h:]
    return t[..., 0]


def check(words: torch.Tensor, x0: float, out: torch.Tensor, bn: int, alu: bool, programs: int = 0) -> bool:
    """The kernel's per-program results in ``out`` against ``pattern_reference`` (exact for the xor, fp32 sums)."""
    want = pattern_reference(words, x0, bn, alu, programs)
    got = out[: len(want)]
    if alu:
        return bool(torch.allclose(got.view(torch.float32).double(), want, rtol=1e-4, atol=1e-2))
    return bool(torch.equal(got, want))


def shape_rows(proj: str, n: int, k: int, copy_bw: float | None) -> list[dict]:
    from qwenquant.numerics import quantize_weight
    from qwenquant.runtime.quant_linear import QuantLinear

    kw = k // 8  # words per row: 8 four-bit codes per int32
    code_bytes = n * kw * 4
    copies = [torch.randint(-2**31, 2**31 - 1, (n, kw), device="cuda", dtype=torch.int32)
              for _ in range(l2_copies(code_bytes, least=2))]
    x0 = 0.37  # the stand-in's x values: x0 + t for nibble t
    out = torch.empty(n * kw // 1024 + 1, device="cuda", dtype=torch.int32)
    calls, per_call, nbytes = {}, {}, {}

    flat_grid = triton.cdiv(n * kw, 1024 * 4)
    flat = lambda w: _read_kernel[(flat_grid,)](w, out, n * kw, BLOCK=1024, ITERS=4, num_warps=4)  # noqa: E731
    flat(copies[0])
    if xor_all(out[:flat_grid]) == xor_all(copies[0].view(-1)):  # read_floor's own check of the flat read
        calls["flat"] = lambda: [flat(w) for w in copies]
        per_call["flat"], nbytes["flat"] = len(copies), code_bytes
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    variants = [(t, c, a, ld) for t in TILES for c in PER_SM for a in (False, True) for ld in LOADS]
    for (bn, kb, stages, warps), per_sm, alu, loads in variants:
        if kw % (kb * SUB) or n % bn or (loads == "tma" and stages < 2):
            continue
        programs = per_sm * nsm
        name = (f"pattern{'+alu' if alu else ''}{' tma' if loads == 'tma' else ''} bn{bn} kb{kb} s{stages} w{warps}"
                + (f" c{per_sm}" if per_sm else ""))
        args = [TensorDescriptor.from_tensor(w, [bn, kb * SUB]) for w in copies] if loads == "tma" else copies
        run = lambda w, bn=bn, kb=kb, st=stages, wp=warps, alu=alu, p=programs, tma=loads == "tma": (  # noqa: E731
            _pattern_kernel[(p or n // bn,)](w, x0, out, kw, n, BN=bn, KBW=kb * SUB, STAGES=st, ALU=alu,
                                             PERSIST=p > 0, TMA=tma, num_warps=wp))
        out.zero_()
        try:
            run(args[0])
        except Exception as e:  # a variant that does not build here is reported, not fatal
            print(f"{proj} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        if not check(copies[0], x0, out, bn, alu, programs):
            print(f"{proj} {name}: wrong result, dropped", flush=True)
            continue
        calls[name] = lambda run=run, args=args: [run(a) for a in args]
        per_call[name], nbytes[name] = len(copies), code_bytes
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    qs = []
    for _ in range(l2_copies(code_bytes, least=2)):
        q = QuantLinear.from_weight(quantize_weight(torch.randn(n, k, device="cuda") * 0.02, W4),
                                    compute_dtype=torch.bfloat16)
        q.mode = "fused"
        q(x)  # tuning
        qs.append(q)
    calls["w4-fused"] = lambda: [q(x) for q in qs]
    per_call["w4-fused"], nbytes["w4-fused"] = len(qs), n * k // 2 + n * (k // 128) * 4
    rows = []
    for name, ms in time_interleaved(calls).items():
        us = ms / per_call[name] * 1e3
        row = {"proj": proj, "n": n, "k": k, "name": name, "us": us, "bytes": nbytes[name],
               "tb_per_s": nbytes[name] / us * 1e-6}
        if copy_bw:
            row["frac_of_copy_bw"] = row["tb_per_s"] * 1e12 / copy_bw
        rows.append(row)
        print(f"{proj:8s} {name:34s} {us:7.2f} us  {row['tb_per_s']:.2f} TB/s", flush=True)
    return rows


def main():
    copy_bw = copy_bandwidth()
    rows = []
    only = [p for p in os.environ.get("PATTERN_PROJ", "").split(",") if p]
    for proj, (n, k) in MODEL_SHAPES["qwen3-8b-merged"].items():
        if not only or proj in only:
            rows += shape_rows(proj, n, k, copy_bw)
            torch.cuda.empty_cache()
    doc = {"kind": "batch1_pattern", "env": environment(), "copy_bytes_per_s": copy_bw, "tiles": TILES, "rows": rows}
    with open(os.path.join(os.environ.get("OUT", "."), "batch1_pattern.json"), "w") as fh:
        json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()
