"""Offered to the fused tuner at M = 1 from session 14 and up to M = 8 from session 15 (``fused.BATCH1``, whose 3- and
4-stage tiles a second sweep found: o 6.7 and down 13.7 us on the merged 8B shapes; ncu in session 15: latency-bound,
≈ 11 warps per SM, issue slots 30-40 % busy, DRAM 36-62 % of peak over the kernel); first GPU contact in session 14:
``benchmarks/m1_sweep.py`` (``M1_KIND=batch1``) checked every tile against the fp64 product before timing it. The
measurement overturned the premise below: one stage (every word of a program loaded at once) is the slow variant
(merged 8B qkv 13.1 us); two stages, where Triton copies the next step's words ahead, win (9.55 us, against 10.7 for
the best k-tiled tile; benchmarks/NOTES.md, session 14).

Batch-1 (decode, M <= 16) W4/W2 on the k-tiled layout, shaped like the fastest kernel that only *reads* the weight.

Why. At M = 1 a projection is its weight bytes. On an H100 a Triton kernel that only reads them, one short program
per few KB with every load issued at once, costs 1.7 us + bytes / 3.05 TB/s (benchmarks/read_floor.py: the merged
Qwen3-8B layer at 3.71x bf16), while the k-tiled GEMM's best small tile costs 5.5 us + bytes / 2.67 TB/s (2.47-2.55x;
benchmarks/NOTES.md, session 13). That tile walks K one 256-column k-tile per step through a 3-stage pipeline: 2-8 KB
per stage, so too few bytes in flight per SM; splitting K to shorten the walk costs atomics and an arrival counter per
program (split-K 16 was the slowest shape in the grid).

Here a program owns BN weight rows and KB k-tiles of K and loads all of its words in one [KB, BN, SUB] load
(KB = 8, BN = 16: 16 KB per program, three programs per SM), then runs the k-tiles as one
*batched* MMA per field: [KB, BN, SUB] (code - zero) · [KB, SUB, BM] x-slices -> [KB, BN, BM] partial sums, one per
k-tile, each scaled by its own group's scale after the MMA (as ``wq_ktiled``'s scale-after tiles: PRMT + LOP3 + one
paired FMA per two weights, exact small integers into the MMA), then summed over the k-tiles once at the end.
No split-K by default (``split_k`` adds it for small N, below): where K holds more than KB k-tiles the program loops (at the default ``num_stages=1`` each step loads
then computes; with more stages Triton's pipeliner copies the next step ahead through shared memory), so every output
row is written by one program, with a plain store. Where N is small the grid is too: o and down of Qwen3-8B (N = 4096)
give 256 programs, about 2 per SM against 3 register-limited slots, and down's K = 12288 walks 6 steps — so
``split_k`` 2-3 is offered for those, at the price of the atomics the k-tiled grid measured.

Requirements: bits 2 or 4 (scale-after needs the code + magic exact in bf16/fp16), the k-tiled layout's shape rules
(``ktiled_ok``), x with at most 16 rows (the MMA's N, padded; decode), x bf16 or fp16.
Reference: ``wq_matmul.reference_matmul`` on the checkpoint tensors (``unpack_ktiled`` inverts the repack).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwenquant.kernels.launch import launch_kernel
from qwenquant.kernels.overlap import INTERPRETED as _INTERPRETED
from qwenquant.kernels.tiles import result_tensor
from qwenquant.kernels.wq_ktiled import (_add_partial, _check_operands, _field_minus_zero, _scale_and_zneg,
                                         split_k_workspace)
from qwenquant.numerics.ktiled import SUB, tile_columns

MAX_M = 16  # rows of x: the MMA's N (x is padded to 16)
BITS_OK = (2, 4)


@triton.jit
def _batch1_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym, tiles_per_split,
                   GROUP: tl.constexpr, BITS: tl.constexpr, SUBK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                   KB: tl.constexpr, SPLITS: tl.constexpr, LOP3: tl.constexpr):
    """y[:, n0:n0+BN] = x · Ŵ[n0:n0+BN]ᵀ for one program (or its share of K when SPLITS > 1): KB k-tiles per step,
    every word of a step in one load."""
    CPW: tl.constexpr = 32 // BITS
    T: tl.constexpr = CPW * SUBK  # columns per k-tile
    FOLD: tl.constexpr = GROUP // SUBK if GROUP < T else CPW  # fields per scale group inside a k-tile
    BPW: tl.constexpr = 8 // BITS  # fields per byte
    IS_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    MAGIC16: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    KW = tl.multiple_of(K // CPW, SUBK)  # words per row
    rn = pid * BN + tl.arange(0, BN)
    rn_c = tl.where(rn < N, rn, 0)  # clamped rows: loads need no row mask, the store masks them
    rb = tl.arange(0, KB)  # k-tile within the step
    rj = tl.arange(0, SUBK)  # word within a k-tile (field t of word j is column t·SUBK + j of the k-tile)
    rm = tl.arange(0, BM)
    m_mask = rm < M
    acc = tl.zeros([KB, BN, BM], dtype=tl.float32)
    kt_start = pid_k * tiles_per_split
    kt_end = tl.minimum(kt_start + tiles_per_split, K // T)
    for kt0 in range(kt_start, kt_end, KB):  # first k-tile of the step (KB divides tiles_per_split)
        # [KB, BN, SUB] words: k-tile b of rows rn — each row's KB·SUB words are contiguous in memory
        w = tl.load(w_ptr + rn_c[None, :, None] * KW + ((kt0 + rb) * SUBK)[:, None, None] + rj[None, None, :])
        col0 = (kt0 + rb) * T  # [KB] first column of each k-tile
        for t in tl.static_range(CPW):
            if t % FOLD == 0:  # a scale group starts: its scale and zero for every (k-tile, row)
                g = (col0 + t * SUBK) // GROUP  # [KB]
                sz = tl.load(sz_ptr + g[:, None] * N + rn_c[None, :])  # [KB, BN] int32
                s, zneg = _scale_and_zneg(sz, x_ptr.dtype.element_ty, MAGIC16)
            wt = _field_minus_zero(w, zneg[:, :, None] + tl.zeros(w.shape, zneg.dtype), t, BITS, BPW, IS_BF16,
                                   LOP3)  # [KB, BN, SUB] code - zero
            # x slice t of every k-tile, transposed for the MMA: [KB, SUB, BM]
            xt = tl.load(x_ptr + rm[None, None, :] * stride_xm + (col0 + t * SUBK)[:, None, None] + rj[None, :, None],
                         mask=m_mask[None, None, :], other=0.0)
            if t % FOLD == 0:
                part = tl.dot(wt, xt)  # [KB, BN, BM]: one partial sum per k-tile
            else:
                part = tl.dot(wt, xt, part)
            if t % FOLD == FOLD - 1:
                acc += part * s[:, :, None]
    y = tl.sum(acc, axis=0)  # [BN, BM]
    y_off = rm[None, :] * stride_ym + rn[:, None]
    ymask = m_mask[None, :] & (rn[:, None] < N)
    if SPLITS == 1:
        tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=ymask)
    else:  # the splits of one row block meet in the zeroed fp32 workspace; the last one stores y (wq_ktiled)
        _add_partial(y, y_ptr, ws_ptr, cnt_ptr + pid, y_off, ymask, 1, SPLITS)


def steps_for(k: int, bits: int, kb: int, split_k: int = 1) -> tuple[int, int, int]:
    """(k-tiles per step, k-tiles per split, splits) actually used: K's k-tiles shared as evenly as ``split_k``
    allows, and ``kb`` or the largest power of two below it that divides a split's k-tiles."""
    tiles = k // tile_columns(bits)
    per = -(-tiles // split_k)
    while kb > 1 and per % kb:
        kb //= 2
    return kb, per, -(-tiles // per)


def batch1_gemm(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bn: int = 16, kb: int = 8,
                num_warps: int = 4, num_stages: int = 1, split_k: int = 1, out: Tensor | None = None) -> Tensor:
    """x2 [M <= 16, K] bf16/fp16 with the k-tiled weight (``pack_ktiled`` words, ``pack_ktiled_scales`` sz) ->
    y [M, N] in x's dtype. ``bn`` weight rows per program (a multiple of 16), ``kb`` k-tiles per step (a power of two;
    lowered to one that divides a split's k-tiles). The MMA's N is 8 for M <= 8 (mma.m16n8k16), else 16.
    ``split_k`` > 1 shares K among that many programs per row block (more programs where N is small: o and down of
    Qwen3-8B give 256 row blocks); their partial sums meet in ``wq_ktiled``'s fp32 workspace through atomics, and the
    last to arrive writes y — the cost split-K 16 showed in the k-tiled grid, so only a few splits make sense.
    Defaults from an offline sm_90a build (ptxas, CPU): 16 rows × 8 k-tiles on 4 warps hold 168 registers, no spills,
    16 KB shared — three programs and 48 KB of words in flight per SM; 3.9 SASS instructions per weight in all.
    ``num_stages`` > 1 lets Triton copy the next step's words and x ahead through shared memory (x padded to BM rows
    there: 16 k-tiles at 2 stages took 166 KB with N = 16 on 8 warps, 100 KB with N = 8 on 4 warps). ``out``: the
    [M, N] result tensor (contiguous, x's dtype and device) instead of a new one — tests pass one filled with NaN."""
    if x2.dim() != 2:
        raise ValueError(f"batch1_gemm takes x as [M, K], got {tuple(x2.shape)}")
    m, k = x2.shape
    n = words.shape[0]
    if bits not in BITS_OK:
        raise ValueError(f"batch1_gemm runs {BITS_OK}-bit weights (scale after the MMA), got bits={bits}; use ktiled_gemm")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"batch1_gemm takes 1 to {MAX_M} rows of x, got {m}; use ktiled_gemm or wgmma_gemm")
    if bn < 16 or bn & (bn - 1) or kb < 1 or kb & (kb - 1) or split_k < 1:
        raise ValueError(f"batch1_gemm: bn={bn}, kb={kb}, split_k={split_k}: expected bn a power of two >= 16, kb a "
                         "power of two and split_k >= 1")
    if x2.dtype not in (torch.bfloat16, torch.float16) or not x2.is_contiguous():
        raise ValueError(f"batch1_gemm: x must be contiguous bf16/fp16, got {x2.dtype}"
                         f"{'' if x2.is_contiguous() else ' (not contiguous)'}")
    _check_operands(x2, words, sz, bits, group)
    y = result_tensor(x2, n, out, "batch1_gemm")
    kb, per, splits = steps_for(k, bits, kb, split_k)
    blocks = triton.cdiv(n, bn)
    ws, cnt = (y, y) if splits == 1 else split_k_workspace(x2.device, m * n, blocks)
    launch_kernel(
        _batch1_kernel, (blocks, splits), (x2, words, sz, y, ws, cnt, m, n, k, x2.stride(0), y.stride(0), per),
        GROUP=group, BITS=bits, SUBK=SUB, BN=bn, BM=8 if m <= 8 else 16, KB=kb, SPLITS=splits, LOP3=not _INTERPRETED, num_warps=num_warps,
        num_stages=num_stages)
    return y


def compile_for_sm90(bn: int = 32, kb: int = 4, warps: int = 4, stages: int = 4, splits: int = 1, bits: int = 4,
                     group: int = 128, m: int = 1):
    """Compile ``_batch1_kernel`` for an H100 (sm_90a) on any machine (the Triton wheel carries ptxas), as the launcher
    specializes it for ``m`` rows (x padded to 8 MMA columns up to M = 8); the default is the tile the tuner takes for
    Qwen3-8B's down projection at M = 1. The CPU tests read its registers and shared memory: a latency-bound kernel
    lives on programs per SM (session 19 judged a SiLU·mul prologue by them before spending a GPU call)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "sz_ptr": "*i32", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "tiles_per_split": "i32"}
    const = {"GROUP": group, "BITS": bits, "SUBK": SUB, "BN": bn, "BM": 8 if m <= 8 else 16, "KB": kb, "SPLITS": splits,
             "LOP3": True}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in ("M", "tiles_per_split")}
    sig.update({name: "constexpr" for name in const})
    return triton.compile(ASTSource(fn=_batch1_kernel, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
