"""What a kernel that only *reads* a W4 weight's bytes costs, timed the way ``bench gemm`` times a GEMM (CUDA-graph
replays over copies that overflow L2, all candidates round-robin) — the floor a batch-1 W4 kernel cannot beat.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/read_floor.py     # -> $OUT/read_floor.json

Why: the W4 M = 1 target (3.0x bf16 on the merged Qwen3-8B layer) needs the four W4 kernels to total <= bf16 / 3
(about 50 us) for 34.6 us of bytes at the copy bandwidth. Session 9 fitted cuBLAS bf16 at 4.65 us + bytes / 2.95 TB/s
per kernel and concluded a W4 kernel with cuBLAS's fixed cost caps the layer at 2.80x. That is a fit to cuBLAS, not
a measurement of the hardware: here the same byte counts are read by kernels that do nothing else —
  read bB iI wW   one program per B*I int32 words (loads unrolled I deep, W warps), a per-program sum stored
  persist cC      C programs per SM, each striding over B-word chunks
  tma bR sS       C programs per SM, each loading [R, 256]-word boxes by TMA through an S-deep ring (Triton
                  descriptors)
  cublas same bytes   bf16 x[1, K] @ W[N', K]^T with N' K * 2 = the W4 bytes (cuBLAS's GEMV on the same byte count)
  bf16            cuBLAS on the real bf16 weight (the ratio's denominator, as in ``bench gemm``)
  w4-fused        our W4 g128 kernel on the real shape, M = 1 (the tuned tile)
Each row's floor is bytes / the copy bandwidth measured in this run. The per-kernel fixed cost of every candidate is
fitted (time = a + bytes / b over the four shapes), and the layer ratio a kernel with that cost would reach is printed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from qwenquant.bench.gemm import MODEL_SHAPES, W4, l2_copies, time_interleaved
from qwenquant.bench.hw import _time_ms, environment
from qwenquant.numerics import quantize_weight
from qwenquant.runtime.quant_linear import QuantLinear

WIDTH = 256  # int32 words per row of the 2-D view the TMA candidate reads (1 KB)


@triton.jit
def _read_kernel(src, out, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(acc, 0))


@triton.jit
def _persist_kernel(src, out, n_words, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for c in range(pid, tl.cdiv(n_words, BLOCK), tl.num_programs(0)):
        offs = c * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(acc, 0))


@triton.jit
def _tma_kernel(desc, out, n_rows, R: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([R, 256], tl.int32)
    for c in tl.range(pid, tl.cdiv(n_rows, R), tl.num_programs(0), num_stages=STAGES):
        acc ^= desc.load([c * R, 0])
    tl.store(out + pid, tl.xor_sum(tl.xor_sum(acc, 1), 0))


def w4_bytes(n: int, k: int) -> int:
    """Codes (4 bits) plus one int32 per 128-weight group (fp16 scale bits << 16 | zero, the k-tiled ``sz``): what the
    W4 g128 kernels read."""
    return n * k // 2 + n * (k // 128) * 4


def candidates(n_words: int, nsm: int) -> dict:
    """name -> (launch(src, out) on one copy, programs)"""
    c: dict = {}
    for block, iters, warps in [(1024, 1, 4), (1024, 4, 4), (1024, 8, 4), (2048, 4, 8), (4096, 2, 8), (4096, 4, 8)]:
        grid = triton.cdiv(n_words, block * iters)
        c[f"read b{block} i{iters} w{warps}"] = (
            lambda s, o, g=grid, b=block, i=iters, w=warps: _read_kernel[(g,)](s, o, n_words, BLOCK=b, ITERS=i, num_warps=w), grid)
    for per_sm, block, warps in [(1, 4096, 8), (2, 4096, 8), (4, 2048, 4), (8, 1024, 4)]:
        grid = nsm * per_sm
        c[f"persist c{per_sm} b{block} w{warps}"] = (
            lambda s, o, g=grid, b=block, w=warps: _persist_kernel[(g,)](s, o, n_words, BLOCK=b, num_warps=w), grid)
    for per_sm, rows, stages in [(1, 32, 4), (1, 16, 6), (2, 16, 4), (1, 64, 3)]:
        grid = nsm * per_sm
        c[f"tma c{per_sm} r{rows} s{stages}"] = (
            lambda s, o, g=grid, r=rows, st=stages: _tma_kernel[(g,)](s.desc, o, s.rows, R=r, STAGES=st, num_warps=4), grid)
    return c


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device copy (``bench.hw.ceilings``'s first number)."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (_time_ms(lambda: dst.copy_(src)) * 1e-3)


class Copy:
    """One copy of the bytes: flat int32 words padded to whole [., 256] rows (random padding, which only the TMA
    kernel reads), and its TMA descriptors by box height."""

    def __init__(self, n_words: int):
        self.rows = -(-n_words // WIDTH)
        self.flat = torch.randint(-2**31, 2**31 - 1, (self.rows * WIDTH,), device="cuda", dtype=torch.int32)
        self.n_words = n_words

    def tma(self, box_rows: int):
        d = TensorDescriptor.from_tensor(self.flat.view(self.rows, WIDTH), [box_rows, WIDTH])
        return type("Tma", (), {"desc": d, "rows": self.rows})()


def xor_all(t: torch.Tensor) -> int:
    return int(np.bitwise_xor.reduce(t.cpu().numpy()))


def time_shape(n: int, k: int, nsm: int, copy_bw: float) -> list[dict]:
    dev = "cuda"
    nbytes = w4_bytes(n, k)
    n_words = nbytes // 4
    copies = [Copy(n_words) for _ in range(l2_copies(nbytes, least=2))]
    out = torch.empty(nsm * 64 + n_words // 1024 + 1, device=dev, dtype=torch.int32)
    calls, per_call, read_bytes = {}, {}, {}
    for name, (launch, grid) in candidates(n_words, nsm).items():
        tma = name.startswith("tma")
        args = [c.tma(int(name.split()[2][1:])) for c in copies] if tma else [c.flat for c in copies]
        out.zero_()
        try:
            launch(args[0], out)
        except Exception as e:  # a candidate that does not compile here is reported, not fatal
            print(f"{(n, k)} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        got = xor_all(out[:grid])
        want = xor_all(copies[0].flat if tma else copies[0].flat[:n_words])
        if got != want:  # every word read (an odd number of times: each exactly once, in practice)
            print(f"{(n, k)} {name}: wrong sum {got} vs {want}: dropped", flush=True)
            continue
        calls[name] = lambda launch=launch, args=args: [launch(a, out) for a in args]
        per_call[name], read_bytes[name] = len(args), (copies[0].rows * WIDTH * 4 if tma else nbytes)
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    n_same = -(-nbytes // (2 * k))  # bf16 rows holding the W4 byte count
    same = [torch.randn(n_same, k, device=dev, dtype=torch.bfloat16) for _ in range(l2_copies(n_same * k * 2, least=2))]
    calls["cublas same bytes"] = lambda: [F.linear(x, w) for w in same]
    per_call["cublas same bytes"], read_bytes["cublas same bytes"] = len(same), n_same * k * 2
    full = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(l2_copies(n * k * 2, least=2))]
    calls["bf16"] = lambda: [F.linear(x, w) for w in full]
    per_call["bf16"], read_bytes["bf16"] = len(full), n * k * 2
    qs = []
    for _ in range(l2_copies(nbytes, least=2)):
        q = QuantLinear.from_weight(quantize_weight(torch.randn(n, k, device=dev) * 0.02, W4), compute_dtype=torch.bfloat16)
        q.mode = "fused"
        q(x)  # tuning
        qs.append(q)
    calls["w4-fused"] = lambda: [q(x) for q in qs]
    per_call["w4-fused"], read_bytes["w4-fused"] = len(qs), nbytes
    rows = []
    for name, t in time_interleaved(calls).items():
        us, b = t / per_call[name] * 1e3, read_bytes[name]
        floor = b / copy_bw * 1e6
        rows.append({"n": n, "k": k, "bytes": b, "name": name, "us": us, "floor_us": floor, "frac_of_floor": floor / us})
        print(f"{n}x{k} {name:24s} {us:7.2f} us  floor {floor:6.2f}  {floor / us:.3f}", flush=True)
    return rows


def fit(rows: list[dict]) -> dict:
    """Per candidate: time = fixed + bytes / bandwidth, least squares over the shapes, and its layer total."""
    fits = {}
    for name in sorted({r["name"] for r in rows}):
        pts = [(r["bytes"], r["us"]) for r in rows if r["name"] == name]
        xs = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        sol = torch.linalg.lstsq(torch.stack([torch.ones_like(xs), xs], 1), ys.unsqueeze(1)).solution.squeeze(1)
        fits[name] = {"shapes": len(pts), "fixed_us": float(sol[0]), "tb_per_s": float(1e-6 / sol[1]) if sol[1] > 0 else None,
                      "layer_us": float(ys.sum())}
    return fits


def main():
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    rows = []
    for proj, (n, k) in MODEL_SHAPES["qwen3-8b-merged"].items():
        for r in time_shape(n, k, nsm, copy_bw):
            rows.append({"proj": proj, **r})
        torch.cuda.empty_cache()
    fits = fit(rows)
    bf16 = fits["bf16"]["layer_us"]
    for f in fits.values():
        f["layer_ratio_vs_bf16"] = bf16 / f["layer_us"] if f["shapes"] == 4 else None
    reads = {n: f for n, f in fits.items() if n.startswith(("read", "persist", "tma")) and f["shapes"] == 4}
    best = min(reads, key=lambda n: reads[n]["layer_us"])
    doc = {"kind": "read_floor", "env": environment(), "copy_bytes_per_s": copy_bw, "sms": nsm, "rows": rows,
           "fits": fits, "best_read": best}
    for name, f in fits.items():
        print(f"{name:24s} fixed {f['fixed_us']:5.2f} us  {f['tb_per_s'] or 0:5.2f} TB/s  layer {f['layer_us']:6.1f} us  "
              f"ratio {f['layer_ratio_vs_bf16'] or 0:.2f}", flush=True)
    print("best pure read:", best, fits[best])
    with open(os.path.join(os.environ.get("OUT", "."), "read_floor.json"), "w") as fh:
        json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()
