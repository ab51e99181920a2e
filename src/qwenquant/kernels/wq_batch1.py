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

Epilogues and an in-kernel norm (session 20). At batch 1 the decode step is launch-bound between its GEMMs, so the
kernel also does the work around a projection that the unfused step launches kernels for: ``batch1_silu_mul``
(gate_up: each program reads BN/2 rows of gate and the same rows of up and stores silu(gate)·up),
``batch1_add_residual`` (o and down: h = residual + y, h times the next RMSNorm's weight, and each row block's sums of
h² over its columns) and ``norm=`` (qkv and gate_up: the input is that weighted h, and each row's sums are scaled by
rsqrt(mean(h²) + eps) from the producer's partial sums) — so a layer's two add + RMSNorm kernels and its SiLU·mul
kernel disappear, with no grid-wide wait (the last program normalizing for all, tried first, cost as much as the
kernel it replaced). ``reference_silu_mul`` / ``reference_add_residual`` / ``reference_rmsnorm`` are the unfused
math.

Requirements: bits 2 or 4 (scale-after needs the code + magic exact in bf16/fp16), the k-tiled layout's shape rules
(``ktiled_ok``), x with at most 16 rows (the MMA's N, padded; decode), x bf16 or fp16.
Reference: ``wq_matmul.reference_matmul`` on the checkpoint tensors (``unpack_ktiled`` inverts the repack).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwenquant.kernels.launch import launch_kernel
from qwenquant.kernels.overlap import INTERPRETED as _INTERPRETED
from qwenquant.kernels import overlap
from qwenquant.kernels.overlap import pdl_ok, release_dependents, wait_for_producer
from qwenquant.kernels.tiles import result_tensor
from qwenquant.kernels.wq_ktiled import (_add_partial, _check_operands, _field_minus_zero, _scale_and_zneg,
                                         split_k_workspace)
from qwenquant.numerics.ktiled import SUB, tile_columns

MAX_M = 16  # rows of x: the MMA's N (x is padded to 16)
BITS_OK = (2, 4)
# epilogues (``_batch1_kernel``'s EPI): what a program does with its [BN, M] block of x · Ŵᵀ besides storing it
SILU_MUL = 1  # silu(gate) · up of a merged [gate; up] projection
ADD_RESIDUAL = 2  # h = residual + y, and each row block's sums of squares of its h columns (the next RMSNorm's input)
EPI_SILU_MUL: tl.constexpr = tl.constexpr(SILU_MUL)  # the same values, readable inside the kernels
EPI_ADD_RESIDUAL: tl.constexpr = tl.constexpr(ADD_RESIDUAL)


@triton.jit
def _batch1_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, r_ptr, nw_ptr, hw_ptr, ss_in_ptr, ss_out_ptr, eps, P_IN,
                   M, N, K, stride_xm, stride_ym, tiles_per_split,
                   GROUP: tl.constexpr, BITS: tl.constexpr, SUBK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                   KB: tl.constexpr, SPLITS: tl.constexpr, LOP3: tl.constexpr, EPI: tl.constexpr = 0,
                   NORM_IN: tl.constexpr = False, PB: tl.constexpr = 1, PDL: tl.constexpr = False,
                   PERSIST: tl.constexpr = False, RELEASE_AT_START: tl.constexpr = False):
    """y[:, n0:n0+BN] = x · Ŵ[n0:n0+BN]ᵀ for one program (or its share of K when SPLITS > 1): KB k-tiles per step,
    every word of a step in one load.

    ``NORM_IN`` (SPLITS = 1): x is h · nw, a residual stream times the next RMSNorm's weight but not yet divided by
    its root mean square, and the sums are multiplied by rsqrt(mean(h²) + eps) per row, mean(h²) from the P_IN
    partial sums of squares at ss_in [P_IN, M] (``PB``: P_IN rounded up to a power of two) — both written by the
    producing kernel's ``EPI_ADD_RESIDUAL``. ``EPI`` (SPLITS = 1): 0 stores y; ``EPI_SILU_MUL`` reads BN/2 rows of
    each half of a [gate; up] weight (N rows) and stores silu(gate) · up ([M, N/2]); ``EPI_ADD_RESIDUAL`` stores
    h = r + y, hw = h · nw (nw: the next norm's weight [N]) and the row block's sums of squares of its h columns per
    row at ss_out [row block, M]. ``PDL``: launched with programmatic dependent launch — the program waits for the
    kernel before it (``griddepcontrol.wait``) at its start, before its first load or store, and releases the
    next one by exiting (``kernels/overlap.py``'s TRIGGER 0) or, with ``RELEASE_AT_START``, right after its wait. ``PERSIST`` (SPLITS = 1): the grid holds at most as many
    programs as row blocks and each program walks blocks pid, pid + programs, … in one flattened loop (``tl.range(...,
    flatten=True)``), so Triton's pipeliner copies the next block's first words while this block finishes."""
    pid = tl.program_id(0)
    wait_for_producer(PDL)  # x, ss_in and the residual are the previous kernel's; y may reuse a buffer it still reads
    if RELEASE_AT_START:
        release_dependents(PDL)
    if PERSIST:
        blocks = tl.cdiv(N // 2, BN // 2) if EPI == EPI_SILU_MUL else tl.cdiv(N, BN)
        for tile in tl.range(pid, blocks, tl.num_programs(0), flatten=True):
            _batch1_tile(tile, 0, x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, r_ptr, nw_ptr, hw_ptr, ss_in_ptr,
                         ss_out_ptr, eps, P_IN, M, N, K, stride_xm, stride_ym, tiles_per_split, GROUP, BITS, SUBK, BN,
                         BM, KB, SPLITS, LOP3, EPI, NORM_IN, PB)
    else:
        _batch1_tile(pid, tl.program_id(1), x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, r_ptr, nw_ptr, hw_ptr,
                     ss_in_ptr, ss_out_ptr, eps, P_IN, M, N, K, stride_xm, stride_ym, tiles_per_split, GROUP, BITS,
                     SUBK, BN, BM, KB, SPLITS, LOP3, EPI, NORM_IN, PB)


@triton.jit
def _batch1_tile(pid, pid_k, x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, r_ptr, nw_ptr, hw_ptr, ss_in_ptr,
                 ss_out_ptr, eps, P_IN, M, N, K, stride_xm, stride_ym, tiles_per_split,
                 GROUP: tl.constexpr, BITS: tl.constexpr, SUBK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                 KB: tl.constexpr, SPLITS: tl.constexpr, LOP3: tl.constexpr, EPI: tl.constexpr,
                 NORM_IN: tl.constexpr, PB: tl.constexpr):
    """Row block ``pid`` (and K share ``pid_k``) of ``_batch1_kernel``."""
    CPW: tl.constexpr = 32 // BITS
    T: tl.constexpr = CPW * SUBK  # columns per k-tile
    FOLD: tl.constexpr = GROUP // SUBK if GROUP < T else CPW  # fields per scale group inside a k-tile
    BPW: tl.constexpr = 8 // BITS  # fields per byte
    IS_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    MAGIC16: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    KW = tl.multiple_of(K // CPW, SUBK)  # words per row
    if EPI == EPI_SILU_MUL:  # rows j < BN/2 of gate (rows 0 … N/2-1), then the same rows of up (N/2 …)
        HALF: tl.constexpr = BN // 2
        rh = tl.arange(0, BN)
        out_col = pid * HALF + rh % HALF
        rn = out_col + (rh // HALF) * (N // 2)
        row_ok = out_col < N // 2
    else:
        rn = pid * BN + tl.arange(0, BN)
        row_ok = rn < N
    rn_c = tl.where(row_ok, rn, 0)  # clamped rows: loads need no row mask, the store masks them
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
    if NORM_IN:
        rp = tl.arange(0, PB)
        ss = tl.load(ss_in_ptr + rp[:, None] * M + rm[None, :], mask=(rp[:, None] < P_IN) & m_mask[None, :], other=0.0)
        y = y * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)[None, :]
    if EPI == EPI_SILU_MUL:
        _store_silu_mul(y, y_ptr, pid, rm, m_mask, N // 2, stride_ym, BN, BM)
    elif EPI == EPI_ADD_RESIDUAL:
        _store_add_residual(y, y_ptr, r_ptr, nw_ptr, hw_ptr, ss_out_ptr + pid * M, rn, rm, m_mask, N, stride_ym)
    else:
        y_off = rm[None, :] * stride_ym + rn[:, None]
        ymask = m_mask[None, :] & (rn[:, None] < N)
        if SPLITS == 1:
            tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=ymask)
        else:  # the splits of one row block meet in the zeroed fp32 workspace; the last one stores y (wq_ktiled)
            _add_partial(y, y_ptr, ws_ptr, cnt_ptr + pid, y_off, ymask, 1, SPLITS)


@triton.jit
def _store_silu_mul(y, out_ptr, pid, rm, m_mask, HALF_N, stride_om, BN: tl.constexpr, BM: tl.constexpr):
    """y [BN, BM] fp32: rows 0 … BN/2-1 are gate, the rest the same columns of up. Each is rounded to the output
    dtype first (what the unfused projection stores), then silu(gate) · up in fp32, rounded once (as torch.compile's
    fused kernel of ``F.silu(g) * u``), stored to out [M, HALF_N] at columns pid·BN/2 …"""
    HALF: tl.constexpr = BN // 2
    dt = out_ptr.dtype.element_ty
    yq = y.to(dt).to(tl.float32)
    g, u = tl.split(tl.permute(tl.reshape(yq, [2, HALF, BM]), (1, 2, 0)))  # [HALF, BM] each
    act = g * tl.sigmoid(g) * u
    cols = pid * HALF + tl.arange(0, HALF)
    tl.store(out_ptr + rm[None, :] * stride_om + cols[:, None], act.to(dt),
             mask=m_mask[None, :] & (cols[:, None] < HALF_N))


@triton.jit
def _store_add_residual(y, h_ptr, r_ptr, nw_ptr, hw_ptr, ss_ptr, rn, rm, m_mask, N, stride_m):
    """The residual add after a projection, and what the next RMSNorm needs from it, without a kernel of its own:
    h = r + y for the program's columns (y rounded to the dtype first, then the add in fp32 rounded once — the
    unfused ``h + proj(x)``), hw = h · nw rounded (the norm's weight, applied here where it costs one load of BN
    values, not in the consumer's K loop) and per row the sum of h² over those columns at ss [M] (this row block's
    slot). The consumer sums the slots (``NORM_IN``): no atomics, no counter, the same result every run."""
    dt = h_ptr.dtype.element_ty
    off = rm[None, :] * stride_m + rn[:, None]
    mask = m_mask[None, :] & (rn[:, None] < N)
    r = tl.load(r_ptr + off, mask=mask, other=0.0)
    h = (r.to(tl.float32) + y.to(dt).to(tl.float32)).to(dt)
    tl.store(h_ptr + off, h, mask=mask)
    hf = tl.where(mask, h.to(tl.float32), 0.0)
    nw = tl.load(nw_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(hw_ptr + off, (hf * nw[:, None]).to(dt), mask=mask)
    tl.store(ss_ptr + rm, tl.sum(hf * hf, axis=0), mask=m_mask)


def reference_silu_mul(y: Tensor) -> Tensor:
    """The unfused math ``batch1_silu_mul`` replaces, on the projection's output y [M, N] (x's dtype): silu of the
    first N/2 columns times the rest, in fp32, rounded to y's dtype."""
    g, u = y.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(y.dtype)


def reference_rmsnorm(h: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """HF's Qwen3RMSNorm on h [M, N] (what ``norm=`` replaces): fp32 mean of squares, h · rsqrt(mean + eps) rounded to
    h's dtype, times the weight, rounded."""
    hf = h.float()
    xn = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return (norm_weight.float() * xn.float()).to(h.dtype)


def reference_add_residual(y: Tensor, residual: Tensor, norm_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What ``batch1_add_residual`` computes, on the projection's output y [M, N] (x's dtype): h = residual + y
    rounded to the dtype, h · norm_weight rounded, and the sum of h² per row [M] (fp32; the kernel's slots summed)."""
    h = (residual.float() + y.float()).to(y.dtype)
    return h, (h.float() * norm_weight.float()).to(y.dtype), h.float().pow(2).sum(-1)


def steps_for(k: int, bits: int, kb: int, split_k: int = 1) -> tuple[int, int, int]:
    """(k-tiles per step, k-tiles per split, splits) actually used: K's k-tiles shared as evenly as ``split_k``
    allows, and ``kb`` or the largest power of two below it that divides a split's k-tiles."""
    tiles = k // tile_columns(bits)
    per = -(-tiles // split_k)
    while kb > 1 and per % kb:
        kb //= 2
    return kb, per, -(-tiles // per)


def batch1_gemm(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bn: int = 16, kb: int = 8,
                num_warps: int = 4, num_stages: int = 1, split_k: int = 1, out: Tensor | None = None,
                norm: tuple[float, Tensor] | None = None, pdl: bool | None = None, persist: int = 0) -> Tensor:
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
    [M, N] result tensor (contiguous, x's dtype and device) instead of a new one — tests pass one filled with NaN.
    ``norm`` = (eps, ss [P, M] fp32): x is hw = h · norm_weight from ``batch1_add_residual`` and the result is
    RMSNorm(h)·norm_weight · Ŵᵀ — each row's sums times rsqrt(mean(h²) + eps), from the partial sums of squares ss
    it returned with hw (no split-K then). ``pdl``: programmatic dependent launch (default ``overlap.PDL_ENABLED``,
    ``QWENQUANT_PDL=1``; only on Hopper and newer, never in the interpreter — ``overlap.pdl_ok``). ``persist`` > 0
    (no split-K): at most that many programs per SM, each walking several row blocks in one flattened, pipelined
    loop (``_batch1_kernel``'s PERSIST) — the next block's words arrive while this one finishes, where one program
    per block pays its pipeline's fill and drain every few steps."""
    m, k, n = _check(x2, words, sz, bits, group, bn, kb, split_k, "batch1_gemm", norm, persist)
    y = result_tensor(x2, n, out, "batch1_gemm")
    kb, per, splits = steps_for(k, bits, kb, split_k if norm is None else 1)
    blocks = triton.cdiv(n, bn)
    ws, cnt = (y, y) if splits == 1 else split_k_workspace(x2.device, m * n, blocks)
    _launch(x2, words, sz, y, ws, cnt, norm, None, (blocks, splits), per, bits, group, bn, kb, splits, num_warps,
            num_stages, 0, pdl, persist)
    return y


def batch1_silu_mul(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bn: int = 32, kb: int = 4,
                    num_warps: int = 4, num_stages: int = 2, out: Tensor | None = None,
                    norm: tuple[float, Tensor] | None = None, pdl: bool | None = None, persist: int = 0) -> Tensor:
    """silu(x2 · Ŵ_gateᵀ) · (x2 · Ŵ_upᵀ) -> [M, N / 2] for a merged [gate; up] weight of N rows (gate rows 0 …
    N/2 - 1, up the rest; ``concat_out_features`` order): a decoder MLP's first projection and its activation in one
    launch, where the unfused path writes [M, N] and reads it back in a SiLU·mul kernel. Each program reads BN / 2
    rows of gate and the same rows of up (a row mapping, not a weight permutation: the layout is the k-tiled one
    every other kernel reads) and stores BN / 2 output columns. Both halves are rounded to x's dtype before the
    activation, as the unfused projection's output is. ``norm``, ``pdl``, ``persist``: as ``batch1_gemm``'s. No
    split-K."""
    m, k, n = _check(x2, words, sz, bits, group, bn, kb, 1, "batch1_silu_mul", norm, persist)
    if n % 2:
        raise ValueError(f"batch1_silu_mul: the merged [gate; up] weight has an odd row count N={n}")
    y = result_tensor(x2, n // 2, out, "batch1_silu_mul")
    kb, per, _ = steps_for(k, bits, kb, 1)
    _launch(x2, words, sz, y, y, y, norm, None, (triton.cdiv(n // 2, bn // 2), 1), per, bits, group, bn, kb, 1,
            num_warps, num_stages, SILU_MUL, pdl, persist)
    return y


def batch1_add_residual(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, residual: Tensor,
                        norm_weight: Tensor, bn: int = 32, kb: int = 4, num_warps: int = 4,
                        num_stages: int = 4, pdl: bool | None = None,
                        persist: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(h, hw, ss): h = residual + x2 · Ŵᵀ [M, N] in x's dtype (a decoder's o or down projection and its residual add
    in one launch), hw = h · norm_weight (the next RMSNorm's weight [N]) and ss [row blocks, M] fp32, each row block's
    sum of h² over its BN columns per row. (hw, ss) is the next RMSNorm's output before the division by the root mean
    square: the kernel that consumes it (``norm=(eps, ss)``) sums the slots and scales its own results, so the norm
    costs no launch and no pass of its own. ``residual`` [M, N] is only read. ``pdl``, ``persist``: as
    ``batch1_gemm``'s (ss keeps one slot per row block either way). No split-K."""
    m, k, n = _check(x2, words, sz, bits, group, bn, kb, 1, "batch1_add_residual", None, persist)
    if residual.shape != (m, n) or residual.dtype != x2.dtype or not residual.is_contiguous():
        raise ValueError(f"batch1_add_residual: residual {residual.dtype} {tuple(residual.shape)}: expected a "
                         f"contiguous {x2.dtype} [{m}, {n}] tensor")
    if norm_weight.shape != (n,) or not norm_weight.is_contiguous() or norm_weight.device != x2.device:
        raise ValueError(f"batch1_add_residual: norm_weight {tuple(norm_weight.shape)} on {norm_weight.device}: "
                         f"expected a contiguous [{n}] tensor on {x2.device}")
    blocks = triton.cdiv(n, bn)
    h = torch.empty_like(residual)
    hw = torch.empty_like(residual)
    ss = torch.empty(blocks, m, device=x2.device, dtype=torch.float32)
    kb, per, _ = steps_for(k, bits, kb, 1)
    _launch(x2, words, sz, h, h, h, None, (residual, norm_weight, hw, ss), (blocks, 1), per, bits, group, bn, kb, 1,
            num_warps, num_stages, ADD_RESIDUAL, pdl, persist)
    return h, hw, ss


def _check(x2, words, sz, bits, group, bn, kb, split_k, who, norm=None, persist=0) -> tuple[int, int, int]:
    """(M, K, N) after every check of the batch-1 kernel's operands, tile and ``norm``, each error naming ``who``."""
    if x2.dim() != 2:
        raise ValueError(f"{who} takes x as [M, K], got {tuple(x2.shape)}")
    m, k = x2.shape
    if bits not in BITS_OK:
        raise ValueError(f"{who} runs {BITS_OK}-bit weights (scale after the MMA), got bits={bits}; use ktiled_gemm")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"{who} takes 1 to {MAX_M} rows of x, got {m}; use ktiled_gemm or wgmma_gemm")
    if bn < 16 or bn & (bn - 1) or kb < 1 or kb & (kb - 1) or split_k < 1:
        raise ValueError(f"{who}: bn={bn}, kb={kb}, split_k={split_k}: expected bn a power of two >= 16, kb a "
                         "power of two and split_k >= 1")
    if persist < 0:
        raise ValueError(f"{who}: persist={persist}: expected >= 0 (programs per SM; 0 = one program per row block)")
    if persist and split_k > 1 and norm is None:
        raise ValueError(f"{who}: persist={persist} with split_k={split_k}: the persistent loop has no split-K")
    if x2.dtype not in (torch.bfloat16, torch.float16) or not x2.is_contiguous():
        raise ValueError(f"{who}: x must be contiguous bf16/fp16, got {x2.dtype}"
                         f"{'' if x2.is_contiguous() else ' (not contiguous)'}")
    _check_operands(x2, words, sz, bits, group)
    check_norm(norm, m, who)
    return m, k, words.shape[0]


def check_norm(norm: tuple[float, Tensor] | None, m: int, who: str) -> None:
    """A ``norm=(eps, ss)`` argument for x of ``m`` rows: eps > 0, ss the producer's contiguous float32 [slots, m]
    partial sums of squares (an add-residual epilogue's third result); errors name ``who``."""
    if norm is None:
        return
    eps, ss = norm
    if not eps > 0:
        raise ValueError(f"{who}: norm eps={eps}: expected > 0")
    if ss.dim() != 2 or ss.shape[1] != m or ss.dtype != torch.float32 or not ss.is_contiguous():
        raise ValueError(f"{who}: norm sums of squares {ss.dtype} {tuple(ss.shape)}: expected contiguous float32 "
                         f"[slots, {m}] (batch1_add_residual's third result)")


def _launch(x2, words, sz, y, ws, cnt, norm, residual, grid, per, bits, group, bn, kb, splits, num_warps, num_stages,
            epi, pdl=None, persist=0):
    """One launch of ``_batch1_kernel``; ``norm`` (eps, ss_in) and ``residual`` (r, nw, hw, ss_out) or None;
    ``pdl`` as ``overlap.pdl_ok`` resolves it; ``persist`` > 0: ``grid[0]`` row blocks shared by at most that many
    programs per SM."""
    m, k = x2.shape
    pdl = pdl_ok(x2.device, pdl)
    if persist:
        grid = (min(grid[0], persist * _sm_count(x2.device)), 1)
    eps, ss_in = norm if norm is not None else (1.0, y)
    r, nw, hw, ss_out = residual if residual is not None else (y, y, y, y)
    launch_kernel(
        _batch1_kernel, grid,
        (x2, words, sz, y, ws, cnt, r, nw, hw, ss_in, ss_out, float(eps), ss_in.shape[0] if norm is not None else 1,
         m, words.shape[0], k, x2.stride(0), y.stride(0), per),
        GROUP=group, BITS=bits, SUBK=SUB, BN=bn, BM=8 if m <= 8 else 16, KB=kb, SPLITS=splits, LOP3=not _INTERPRETED,
        EPI=epi, NORM_IN=norm is not None, PB=triton.next_power_of_2(ss_in.shape[0]) if norm is not None else 1,
        PDL=pdl, PERSIST=persist > 0, RELEASE_AT_START=pdl and overlap.RELEASE_AT_START, num_warps=num_warps,
        num_stages=num_stages, **({"launch_pdl": True} if pdl else {}))


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the interpreter's CPU: 4, enough programs to exercise the loop)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def compile_for_sm90(bn: int = 32, kb: int = 4, warps: int = 4, stages: int = 4, splits: int = 1, bits: int = 4,
                     group: int = 128, m: int = 1, epi: int = 0, norm_slots: int = 0, pdl: bool = False,
                     persist: bool = False, release_at_start: bool = False):
    """Compile ``_batch1_kernel`` for an H100 (sm_90a) on any machine (the Triton wheel carries ptxas), as the launcher
    specializes it for ``m`` rows (x padded to 8 MMA columns up to M = 8); the default is the tile the tuner takes for
    Qwen3-8B's down projection at M = 1. ``epi``: an epilogue (``SILU_MUL``, ``ADD_RESIDUAL``); ``norm_slots`` > 0:
    ``NORM_IN`` with that many partial sums per row; ``pdl`` / ``persist`` / ``release_at_start``: those builds (how many
    programs per SM a persistent launch runs is the launcher's business, not the build's). The CPU tests read its registers and
    shared memory: a latency-bound kernel lives on programs per SM (session 19 judged a SiLU·mul prologue by them before spending a
    GPU call)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "sz_ptr": "*i32", "y_ptr": "*bf16",
           "ws_ptr": "*fp32" if splits > 1 else "*bf16", "cnt_ptr": "*i32" if splits > 1 else "*bf16",
           "r_ptr": "*bf16", "nw_ptr": "*bf16", "hw_ptr": "*bf16", "ss_in_ptr": "*fp32" if norm_slots else "*bf16",
           "ss_out_ptr": "*fp32" if epi == ADD_RESIDUAL else "*bf16", "eps": "fp32", "P_IN": "i32",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "tiles_per_split": "i32"}
    const = {"GROUP": group, "BITS": bits, "SUBK": SUB, "BN": bn, "BM": 8 if m <= 8 else 16, "KB": kb, "SPLITS": splits,
             "LOP3": True, "EPI": epi, "NORM_IN": norm_slots > 0,
             "PB": triton.next_power_of_2(norm_slots) if norm_slots else 1, "PDL": pdl, "PERSIST": persist,
             "RELEASE_AT_START": release_at_start}
    names = list(sig)
    unaligned = ("M", "tiles_per_split", "eps", "P_IN")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a not in unaligned}
    sig.update({name: "constexpr" for name in const})
    return triton.compile(ASTSource(fn=_batch1_kernel, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
