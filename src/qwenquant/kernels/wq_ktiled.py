"""Weight-only low-bit GEMM on a K-tile-interleaved repack: the MMA operand straight from a shift.

Why a second layout. In the checkpoint layout (``wq_matmul``) the CPW codes of one int32 word are
CPW *adjacent* columns, so unpacking a [BN, BKW] word tile gives [BN, BKW, CPW] and the MMA needs it
as [BN, BKW·CPW]: a reshape that Triton lowers to a register/shared-memory shuffle every K step.
That shuffle is what held ``gemm``/``gemm_wa`` to 0.2-0.6x bf16 on an H100.

The k-tiled layout (``numerics/ktiled.py``; a fused layer's storage is converted to it in place at its first
forward, ``runtime/layouts.py``) cuts K into
tiles of T = CPW·SUB columns. Word j of tile b of row n holds the codes of columns

    b·T + t·SUB + j,   t = 0 … CPW-1,   code t at bits [t·bits, (t+1)·bits)

so ``(w >> t·bits) & mask`` of one [BN, SUB] word load *is* the code tile of the contiguous
columns [b·T + t·SUB, b·T + (t+1)·SUB): already the MMA's K slice, no reshape. Each K step runs
CPW ``tl.dot``s of depth SUB (32). Same code bytes as the checkpoint (the words are a permutation of
the same bits), int32 words [N, K/CPW]. Scales and zeros are repacked too (``pack_ktiled_scales``):
one int32 ``fp16 bits << 16 | zero`` per (group, row), group-major, so each group's [BN] load is a
contiguous 4-byte vector that Triton's pipeliner copies ahead with the words (the checkpoint's 2- and
1-byte strided loads could not be, and stalled every program twice per K step on an H100).

Two ways to dequantize (constexpr ``SCALE_AFTER``), SASS-counted with ``benchmarks/sass_ktiled.py``:

* scale before the MMA (any bit width): one LOP3 ``(w & (mask << sh)) | 0x4B000000`` — the float
  2**23 + code·2**sh, the field left in place (fields ending above bit 23 come from ``w >> 16``) — one
  FADD of (2**23 + zero·2**sh), one FMUL by scale·2**-sh (both per row and slice) and half an F2FP to
  round pairs to bf16: the MMA gets Ŵ = ``Ŵ.to(bf16)``. 3.5 instructions per weight for this, 5.0-6.2 per
  weight in the whole K loop at M = 16.
* scale after the MMA (2- and 4-bit): the MMA gets (code - zero), small integers that bf16/fp16 hold
  exactly, and the fp32 partial sums of each group (or of each K step when the group spans several) are
  multiplied by the group's scale once: acc += s · Σ_k (code - zero)·x. Per *two* weights one inline-PTX
  block: PRMT (byte b of two words into the two half-words — each half from its own word, so correct for
  whichever two elements Triton hands one block; with the MMA operand layout they are k-neighbours), LOP3 (keep the field, OR 0x4300 = bf16 128) and
  one paired FMA adding -(128 + zero) (a HADD2 in SASS): 1.5 instructions per weight, 3.0 per weight in
  the K loop at M = 16 (758 vs 1282 per step for BN = 128). More exact than scale-before (Ŵ is never
  rounded to bf16); the fold costs 2·BM/group FMAs per weight, so it pays at small M. 8-bit codes do not
  fit bf16's 8-bit significand after the magic, so 8-bit runs scale-before.

Two orientations (constexpr ``W_AS_A``), both used at every M (``runtime/fused.py`` tables):
* W_AS_A: yᵀ[BN, BM] = Ŵ[BN, SUB] · xᵀ[SUB, BM]. The weight is the MMA's A operand, which Hopper's
  wgmma may take from registers; the MMA's N is the rows of x. Split-K (fp32 atomics into a workspace)
  gives small-N shapes enough programs.
* otherwise: y[BM, BN] = x[BM, SUB] · Ŵᵀ[SUB, BN], the usual GEMM (weight staged through shared memory),
  grouped tile order.

Two schedules: split-K (``split_k`` programs per output tile, each a fixed share of K) and stream-K
(``streamk`` programs per SM in one wave, each a contiguous run of (tile, K step) units, scale-after only).
Stream-K is no faster on the big Qwen3-8B shapes at M <= 64 (the per-SM issue rate limits them, not wave
quantization) but fills the SMs where split-K cannot: k/v at M = 128 runs 13.1 instead of 19.9 us on an H100.

Requirements: bits ∈ {2, 4, 8}; K a multiple of T (128 for 8-bit, 256 for 4-bit, 512 for 2-bit);
group size a multiple of SUB dividing K that either divides T or is a multiple of it (32/64/128/… or
per-channel); N a multiple of 8.
Also on this layout: ``ktiled_gemv`` (batch 1 on the CUDA cores, split-K) and ``dequantize_ktiled`` (the whole
weight to bf16 in one pass, for unpack + cuBLAS), so a layer that holds only k-tiled words lacks no path.

Reference: ``wq_matmul.reference_matmul`` on the checkpoint tensors (``unpack_ktiled`` inverts the repack).

Tried and dropped (commit ef9ec26, results/ktiled_pairs_h100.json): bf16x2 pairs with the *scale* applied in
bf16 (Ŵ rounded twice) bought 3-9 % while the scale loads still stalled every step. The scale-after
variant above is the version that keeps fp32 accuracy and pays off (session 5, benchmarks/NOTES.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwenquant.kernels.launch import launch_kernel
from qwenquant.kernels.overlap import INTERPRETED as _INTERPRETED  # no inline PTX under Triton's interpreter
from qwenquant.kernels.overlap import pdl_ok, prefetch_l2, prefetch_ok, release_dependents, wait_for_producer
from qwenquant.kernels.tiles import grouped_tile, sm_count, tile_ranges
from qwenquant.numerics.ktiled import (  # noqa: F401 — the layout is re-exported: callers read it as KT.*
    SUB, KTiledWeight, ktiled_ok, pack_ktiled, pack_ktiled_scales, tile_columns, unpack_ktiled, unpack_ktiled_scales)

# Overlap with the previous kernel (kernels/overlap.py): k-tiles of words (T columns each) every program asks L2
# for before it waits on the previous kernel; 0 = no prefetch. Programmatic dependent launch follows pdl_ok().
_pf_env = os.environ.get("QWENQUANT_PREFETCH_TILES", "0").strip()
if not _pf_env.isdigit():
    raise ValueError(f"QWENQUANT_PREFETCH_TILES={_pf_env!r}: expected a number of k-tiles >= 0 (0: no L2 prefetch)")
PREFETCH_TILES = int(_pf_env)
# where a PDL-launched program releases the next kernel (kernels/overlap.py): 0 at exit, 1 right after its wait, 2 after
# its K loop; split-K kernels (a shared workspace) and whole-K ones separately — 2 raced with split-K (session 9).
# 0 for both: never slower than stream order in session 9's chains, and within 1.2 % of the best policy end to end
PDL_TRIGGER_SPLIT = 0
PDL_TRIGGER_WHOLE = 0
ALLOW_SPLIT_TRIGGER2 = False  # only benchmarks/overlap_session.py's race experiment sets it
SCALE_AFTER_BITS = (2, 4)  # codes + zero point small enough that 128 + code is exact in bf16
MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # float32 2**23; OR-ing a field < 2**23 gives 2**23 + field


# --- the kernel -------------------------------------------------------------------------


@triton.jit
def _field_magic(w, w_hi, T_IDX: tl.constexpr, BITS: tl.constexpr, LOP3: tl.constexpr):
    """Field ``T_IDX`` of each int32 word, not shifted down: the float 2**23 + code·2**sh, where the field sits at bit
    sh = T_IDX·BITS of ``w`` — or, for fields ending above bit 23, at T_IDX·BITS - 16 of ``w_hi = w >> 16`` (the
    callers compute the same sh). One LOP3 on the GPU, ``(src & mask << sh) | 2**23``; ptxas splits the
    two-immediate C form in two. Triton's interpreter runs no PTX: there the same bits in two operations."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if T_IDX * BITS + BITS <= 23:
        SH: tl.constexpr = T_IDX * BITS
        src = w
    else:
        SH: tl.constexpr = T_IDX * BITS - 16
        src = w_hi
    if LOP3:  # the constants splat in src's shape (and layout: Gluon's wq_wgmma calls this too) by folded arithmetic
        bits_f = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [src, (src & 0) | (MASK << SH), (src & 0) | MAGIC],
            dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits_f = (src & (MASK << SH)) | MAGIC
    return bits_f.to(tl.float32, bitcast=True)


@triton.jit
def _overlap_prologue(w_ptr, sz_ptr, rn_c, n0, N, KW, k_start, k_end, GROUP: tl.constexpr, CPW: tl.constexpr,
                      T: tl.constexpr, BN: tl.constexpr, PREFETCH: tl.constexpr, SZ_GROUPS: tl.constexpr,
                      PDL: tl.constexpr, TRIGGER: tl.constexpr):
    """Before a program's K loop (``kernels/overlap.py``): ask L2 for its first PREFETCH k-tiles of words (one
    bulk prefetch per row) and their groups' scales (one per group row, SZ_GROUPS >= the groups they span),
    then wait for the previous kernel; TRIGGER 1 releases the next kernel right away."""
    if PREFETCH > 0:
        pf_end = tl.minimum(k_start + PREFETCH * T, k_end)
        prefetch_l2(w_ptr + rn_c * KW + k_start // CPW, (pf_end - k_start) // CPW * 4)  # rows 128-byte aligned
        g = tl.minimum(k_start // GROUP + tl.arange(0, SZ_GROUPS), (pf_end - 1) // GROUP)  # [SZ_GROUPS]
        lo = n0 // 4 * 4  # the [BN] columns of sz rounded out to 16-byte ends (N is a multiple of 8)
        hi = (tl.minimum(n0 + BN, N) + 3) // 4 * 4
        prefetch_l2(sz_ptr + g * N + lo, (hi - lo) * 4)
    wait_for_producer(PDL)
    if TRIGGER == 1:
        release_dependents(PDL)


@triton.jit
def _ktiled_gemm_kernel(
    x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, k_per_split,
    GROUP: tl.constexpr, BITS: tl.constexpr, SUBK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    W_AS_A: tl.constexpr, SPLITS: tl.constexpr, GROUP_M: tl.constexpr, LOP3: tl.constexpr,
    SCALE_AFTER: tl.constexpr = False, PREFETCH: tl.constexpr = 0, SZ_GROUPS: tl.constexpr = 1,
    PDL: tl.constexpr = False, TRIGGER: tl.constexpr = 0,
):
    CPW: tl.constexpr = 32 // BITS
    T: tl.constexpr = CPW * SUBK
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
    KW = tl.multiple_of(K // CPW, SUBK)  # K is a multiple of T = CPW·SUBK: rows of words start 128-byte aligned
    rm, m_mask, rn, rn_c = tile_ranges(pid_m, pid_n, M, N, BM, BN)
    rs = tl.arange(0, SUBK)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    _overlap_prologue(w_ptr, sz_ptr, rn_c, pid_n * BN, N, KW, k_start, k_end, GROUP, CPW, T, BN, PREFETCH, SZ_GROUPS,
                      PDL, TRIGGER)
    if W_AS_A:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    if SCALE_AFTER:
        # the MMA takes (code - zero) as exact small integers; each fold span's partial sums are scaled once
        FOLD: tl.constexpr = GROUP // SUBK if GROUP < T else CPW  # fields per fold span (<= one group, <= one step)
        BPW: tl.constexpr = 8 // BITS  # fields per byte
        acc = _ktiled_scale_after_loop(
            acc, x_ptr, w_ptr, sz_ptr, rm, m_mask, rn_c, rs, k_start, k_end, N, KW, stride_xm,
            GROUP, BITS, SUBK, CPW, T, FOLD, BPW, W_AS_A, LOP3)
    else:  # scale before the MMA: Ŵ = (code - zero)·scale in fp32, rounded once to x's type
        for k0 in range(k_start, k_end, T):
            w = tl.load(w_ptr + rn_c[:, None] * KW + (tl.multiple_of(k0 // CPW, SUBK) + rs)[None, :])  # [BN, SUBK] int32
            w_hi = w >> 16  # fields that end above bit 23 are taken from here (their value must stay below 2**23)
            for t in tl.static_range(CPW):
                if t == 0 or (t * SUBK) % GROUP == 0:  # slice t starts a scale group
                    # one contiguous int32 per row (fp16 scale bits << 16 | zero), so Triton's pipeliner can
                    # copy it ahead asynchronously like the words (a 2- or 1-byte strided load cannot be)
                    sz = tl.load(sz_ptr + ((k0 + t * SUBK) // GROUP) * N + rn_c)  # [BN] int32
                    s = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                    zb = ((sz & 0xFFFF) | MAGIC).to(tl.float32, bitcast=True)  # 2**23 + zero
                # the field is not shifted down: one LOP3 gives the float 2**23 + code·2**SH, and the power of two
                # moves into the per-row constants, (code - zero)·scale = (f - (2**23 + zero·2**SH))·(scale·2**-SH)
                # (both steps exact up to the one rounding of the product: the same fp32 value as unshifted)
                sh = t * BITS if t * BITS + BITS <= 23 else t * BITS - 16  # the field's place in w or w_hi
                f = _field_magic(w, w_hi, t, BITS, LOP3)  # 2**23 + code·2**sh
                zb_t = (zb - 8388608.0) * (1 << sh) + 8388608.0  # 2**23 + zero·2**SH, exact
                s_t = s * (1.0 / (1 << sh))
                x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + t * SUBK + rs)[None, :],
                            mask=m_mask[:, None], other=0.0)  # [BM, SUBK]
                wt = ((f - zb_t[:, None]) * s_t[:, None]).to(x.dtype)  # [BN, SUBK] Ŵ, rounded once
                if W_AS_A:
                    acc = tl.dot(wt, tl.trans(x), acc)
                else:
                    acc = tl.dot(x, tl.trans(wt), acc)
    if TRIGGER == 2:
        release_dependents(PDL)
    y_off, ymask = _output_tile(rm, m_mask, rn, N, stride_ym, W_AS_A)
    if SPLITS == 1:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:  # split-K without extra launches: each split adds one share of the tile's count (SPLITS)
        _add_partial(acc, y_ptr, ws_ptr, cnt_ptr + pid, y_off, ymask, 1, SPLITS)


@triton.jit
def _output_tile(rm, m_mask, rn, N, stride_ym, W_AS_A: tl.constexpr):
    """Offsets into y [M, N] and the store mask of an accumulator tile: [BN, BM] when the weight was the
    MMA's A operand (yᵀ), [BM, BN] otherwise."""
    if W_AS_A:
        y_off = rm[None, :] * stride_ym + rn[:, None]
        ymask = m_mask[None, :] & (rn[:, None] < N)
    else:
        y_off = rm[:, None] * stride_ym + rn[None, :]
        ymask = m_mask[:, None] & (rn[None, :] < N)
    return y_off, ymask


@triton.jit
def _add_partial(acc, y_ptr, ws_ptr, cnt, y_off, ymask, amount, total_count):
    """A partial sum of one output tile, met by the others without extra launches: it goes to the zeroed fp32
    workspace, the tile's counter ``cnt`` (a pointer) grows by ``amount``, and the program that brings it to
    ``total_count`` writes y once, in y's dtype, and re-zeroes the workspace and the counter for the next call."""
    tl.atomic_add(ws_ptr + y_off, acc, mask=ymask, sem="relaxed")
    tl.debug_barrier()  # every thread's partial sums are issued before the release below
    done = tl.atomic_add(cnt, amount, sem="acq_rel") + amount
    if done == total_count:
        total = tl.load(ws_ptr + y_off, mask=ymask, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=ymask)
        # Every thread has read the sums before any thread zeroes them: the zeros are a constant, so Triton may store
        # them in another layout than the load's — another thread's element — and without this barrier a zero could
        # overtake a read (session 18: wrong results at M = 8 on large N, benchmarks/NOTES.md)
        tl.debug_barrier()
        tl.store(ws_ptr + y_off, tl.zeros_like(total), mask=ymask)
        tl.atomic_xchg(cnt, 0)


@triton.jit
def _ktiled_streamk_kernel(
    x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, steps_per_tile, total_steps,
    GROUP: tl.constexpr, BITS: tl.constexpr, SUBK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    W_AS_A: tl.constexpr, GROUP_M: tl.constexpr, LOP3: tl.constexpr,
):
    """Stream-K schedule of the scale-after GEMM: one wave of programs, each a contiguous run of the
    (tile, K step) units in tile-major order, so every SM gets the same number of K steps whatever the
    tile count (split-K gives each program a fixed share of one tile: 0.73 or 1.45 waves on Qwen3-8B
    shapes). A run may end inside a tile and the next start inside one: each segment's partial sums go to
    the fp32 workspace, a per-tile counter adds the segment's steps, and the program that completes the
    count writes y and re-zeroes both (as split-K does). A segment that covers a whole tile stores y
    directly."""
    CPW: tl.constexpr = 32 // BITS
    T: tl.constexpr = CPW * SUBK
    FOLD: tl.constexpr = GROUP // SUBK if GROUP < T else CPW
    BPW: tl.constexpr = 8 // BITS
    progs = tl.num_programs(0)
    pid = tl.program_id(0)
    u = (pid * total_steps) // progs  # this program's units: [u, u_end)
    u_end = ((pid + 1) * total_steps) // progs
    KW = tl.multiple_of(K // CPW, SUBK)  # K is a multiple of T = CPW·SUBK: rows of words start 128-byte aligned
    rs = tl.arange(0, SUBK)
    while u < u_end:
        tile = u // steps_per_tile
        k_lo = u - tile * steps_per_tile
        n_steps = tl.minimum(steps_per_tile - k_lo, u_end - u)
        pid_m, pid_n = grouped_tile(tile, M, N, BM, BN, GROUP_M)
        rm, m_mask, rn, rn_c = tile_ranges(pid_m, pid_n, M, N, BM, BN)
        if W_AS_A:
            acc = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc = _ktiled_scale_after_loop(
            acc, x_ptr, w_ptr, sz_ptr, rm, m_mask, rn_c, rs, k_lo * T, (k_lo + n_steps) * T, N, KW, stride_xm,
            GROUP, BITS, SUBK, CPW, T, FOLD, BPW, W_AS_A, LOP3)
        y_off, ymask = _output_tile(rm, m_mask, rn, N, stride_ym, W_AS_A)
        if n_steps == steps_per_tile:
            tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=ymask)
        else:  # the tile's count is its K steps; this segment adds its own
            _add_partial(acc, y_ptr, ws_ptr, cnt_ptr + tile, y_off, ymask, n_steps, steps_per_tile)
        u += n_steps


@triton.jit
def _codes_minus_zero(src, sel, zneg, BITS: tl.constexpr, IS_BF16: tl.constexpr, LOP3: tl.constexpr):
    """(code - zero) of one field of each word, as exact small integers in x's 16-bit type.

    ``src`` [BN, SUBK] int32 words already shifted so the field sits at the bottom of byte ``b``; ``sel`` the
    PRMT selector gathering byte b of two words into the two half-words; ``zneg`` -(magic + zero) per row.
    On the GPU one asm block serves two words: PRMT (byte b of each word into a half-word), LOP3 (keep the
    field, OR the exponent of the magic: 128 + code in bf16 / 1024 + code in fp16) and one paired FMA
    (+ -(magic + zero)), i.e. 1.5 instructions per weight. Triton's interpreter runs no PTX: there ``src`` is
    the word shifted so the field is at bit 0 and plain integer and float operations give the same values."""
    if LOP3:
        if IS_BF16:
            out = tl.inline_asm_elementwise(
                "{ .reg .b32 p; prmt.b32 p, $1, $2, $3; lop3.b32 p, p, $5, 0x43004300, 0xEA; "
                "fma.rn.bf16x2 $0, p, $7, $8; }",
                "=r,r,r,r,r,r,r,r,r",
                [src, sel, tl.full(src.shape, ((1 << BITS) - 1) * 0x10001, tl.int32),
                 tl.full(src.shape, 1.0, tl.bfloat16), zneg],
                dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(
                "{ .reg .b32 p; prmt.b32 p, $1, $2, $3; lop3.b32 p, p, $5, 0x64006400, 0xEA; "
                "fma.rn.f16x2 $0, p, $7, $8; }",
                "=r,r,r,r,r,r,r,r,r",
                [src, sel, tl.full(src.shape, ((1 << BITS) - 1) * 0x10001, tl.int32),
                 tl.full(src.shape, 1.0, tl.float16), zneg],
                dtype=tl.float16, is_pure=True, pack=2)
    else:
        code = (src & ((1 << BITS) - 1)).to(tl.float32)
        magic = 128.0 if IS_BF16 else 1024.0
        out = (code + magic + zneg.to(tl.float32)).to(tl.bfloat16 if IS_BF16 else tl.float16)
    return out


@triton.jit
def _scale_and_zneg(sz, DTYPE: tl.constexpr, MAGIC16: tl.constexpr):
    """The packed scale/zero words (``fp16 scale bits << 16 | zero``, any shape) as the fp32 scale and
    -(MAGIC16 + zero) in x's 16-bit type (exact: the zero is a small integer)."""
    s = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zneg = (-((sz & 0xFFFF).to(tl.float32) + MAGIC16)).to(DTYPE)
    return s, zneg


@triton.jit
def _field_minus_zero(w, zneg, T_IDX: tl.constexpr, BITS: tl.constexpr, BPW: tl.constexpr, IS_BF16: tl.constexpr,
                      LOP3: tl.constexpr):
    """(code - zero) of field ``T_IDX`` of every word of ``w`` (any shape; ``zneg`` already in w's shape), as exact
    small integers in x's 16-bit type: the word shifted so the field sits at the bottom of its byte, then
    ``_codes_minus_zero``'s PRMT / LOP3 / paired FMA."""
    b = T_IDX // BPW  # the byte holding field T_IDX
    r = T_IDX % BPW  # its position inside the byte
    src = w >> (r * BITS) if r > 0 else w
    if not LOP3:  # interpreter: the plain path reads the field from its byte directly
        src = w >> (T_IDX * BITS)
    sel = b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12)
    return _codes_minus_zero(src, tl.full(src.shape, sel, tl.int32), zneg, BITS, IS_BF16, LOP3)


@triton.jit
def _ktiled_scale_after_loop(acc, x_ptr, w_ptr, sz_ptr, rm, m_mask, rn_c, rs, k_start, k_end, N, KW, stride_xm,
                             GROUP: tl.constexpr, BITS: tl.constexpr, SUBK: tl.constexpr, CPW: tl.constexpr,
                             T: tl.constexpr, FOLD: tl.constexpr, BPW: tl.constexpr, W_AS_A: tl.constexpr,
                             LOP3: tl.constexpr):
    """The K loop of the scale-after variant: per fold span, partial = Σ (code - zero)·x over its fields
    (tensor cores, exact integer weights), then acc += scale · partial."""
    IS_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    MAGIC16: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    for k0 in range(k_start, k_end, T):
        w = tl.load(w_ptr + rn_c[:, None] * KW + (tl.multiple_of(k0 // CPW, SUBK) + rs)[None, :])  # [BN, SUBK] int32
        for t in tl.static_range(CPW):
            if t % FOLD == 0:  # a fold span starts: its group's scale and zero
                sz = tl.load(sz_ptr + ((k0 + t * SUBK) // GROUP) * N + rn_c)  # [BN] int32
                s, zneg = _scale_and_zneg(sz, x_ptr.dtype.element_ty, MAGIC16)
            wt = _field_minus_zero(w, zneg[:, None] + tl.zeros(w.shape, zneg.dtype), t, BITS, BPW, IS_BF16,
                                   LOP3)  # [BN, SUBK] code - zero
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + t * SUBK + rs)[None, :],
                        mask=m_mask[:, None], other=0.0)  # [BM, SUBK]
            if W_AS_A:
                if t % FOLD == 0:
                    part = tl.dot(wt, tl.trans(x))
                else:
                    part = tl.dot(wt, tl.trans(x), part)
                if t % FOLD == FOLD - 1:
                    acc += part * s[:, None]
            else:
                if t % FOLD == 0:
                    part = tl.dot(x, tl.trans(wt))
                else:
                    part = tl.dot(x, tl.trans(wt), part)
                if t % FOLD == FOLD - 1:
                    acc += part * s[None, :]
    return acc


def _check_operands(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int) -> None:
    """The k-tiled kernels' shared input checks (a clear error instead of a wrong or faulting kernel)."""
    if x2.dim() != 2 or words.dim() != 2:
        raise ValueError(f"k-tiled GEMM takes x [M, K] and words [N, K·bits/32], got x {tuple(x2.shape)} and words "
                         f"{tuple(words.shape)}")
    m, k = x2.shape
    n = words.shape[0]
    t = tile_columns(bits)
    if words.dtype != torch.int32 or words.shape[1] != k * bits // 32:
        raise ValueError(f"words {words.dtype} {tuple(words.shape)} are not {bits}-bit k-tiled words of in_features={k} "
                         f"(expected int32 [{n}, {k * bits // 32}] from pack_ktiled)")
    if words.device != x2.device or sz.device != x2.device:
        raise ValueError(f"k-tiled GEMM: x on {x2.device}, words on {words.device}, sz on {sz.device}: expected one device")
    if not ktiled_ok(bits, group, n, k):
        raise ValueError(f"k-tiled GEMM cannot run bits={bits}, group={group}, N={n}, K={k} "
                         f"(needs K % {t} == 0, group % {SUB} == 0, group dividing or a multiple of {t}); use the "
                         "checkpoint-layout kernels")
    if m * x2.stride(0) >= 2**31 or n * words.shape[1] >= 2**31:
        raise ValueError(f"k-tiled GEMM indexes with int32 offsets: x [{m}, {k}] or words [{n}, {words.shape[1]}] is too "
                         "large; split the rows into chunks")
    if not (words.is_contiguous() and sz.is_contiguous()):
        raise ValueError("k-tiled words and sz must be contiguous (as pack_ktiled / pack_ktiled_scales return them)")
    if sz.shape != (k // group, n) or sz.dtype != torch.int32:
        raise ValueError(f"sz must be [K/G, N] = [{k // group}, {n}] int32 from pack_ktiled_scales, got "
                         f"{sz.dtype} {tuple(sz.shape)}")


def _prefetch_groups(bits: int, group: int, prefetch: int) -> int:
    """A power of two >= the scale groups that ``prefetch`` k-tiles starting at a tile boundary can touch: the tiles'
    columns over the group size where groups divide a tile, one more where a group spans several tiles (the start
    may fall inside one)."""
    cols = prefetch * tile_columns(bits)
    groups = cols // group if group <= tile_columns(bits) else -(-cols // group) + 1
    return triton.next_power_of_2(max(1, groups))


def _overlap_args(device, bits: int, group: int, prefetch: int | None, pdl: bool | None,
                  trigger: int | None, split: bool) -> tuple[dict, dict]:
    """(constexprs, launch options) of the overlap prologue for one launch: PREFETCH k-tiles (default
    ``PREFETCH_TILES``; none where the bulk prefetch cannot compile), SZ_GROUPS (a power of two >= the scale
    groups those tiles span from a tile-aligned start), PDL, TRIGGER (default ``PDL_TRIGGER_SPLIT`` or
    ``PDL_TRIGGER_WHOLE`` by ``split``; 2 is refused on a split-K launch) and ``launch_pdl`` when PDL is on."""
    prefetch = PREFETCH_TILES if prefetch is None else prefetch
    if trigger is None:
        trigger = PDL_TRIGGER_SPLIT if split else PDL_TRIGGER_WHOLE
    if prefetch < 0 or trigger not in (0, 1, 2):
        raise ValueError(f"prefetch is k-tiles (>= 0) and trigger 0 (at exit), 1 (after the wait) or 2 (after the K loop); "
                         f"got prefetch={prefetch}, trigger={trigger}")
    pdl = pdl_ok(device, pdl)
    if split and trigger == 2 and pdl and not ALLOW_SPLIT_TRIGGER2:
        raise ValueError("trigger=2 (release after the K loop) races with split-K (kernels/overlap.py); use 0 or 1")
    if not prefetch_ok(device):
        prefetch = 0
    consts = dict(PREFETCH=prefetch, SZ_GROUPS=_prefetch_groups(bits, group, prefetch), PDL=pdl, TRIGGER=trigger)
    return consts, ({"launch_pdl": True} if pdl else {})


def ktiled_gemm(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int,
                bm: int = 16, bn: int = 64, w_as_a: bool = True, split_k: int = 1,
                num_warps: int = 4, num_stages: int = 3, scale_after: bool = False, streamk: int = 0,
                group_m: int = 8, prefetch: int | None = None, pdl: bool | None = None, trigger: int | None = None) -> Tensor:
    """x2 [M, K] bf16/fp16, words [N, K/CPW] int32 from ``pack_ktiled``, sz [K/G, N] int32 from
    ``pack_ktiled_scales`` -> y [M, N] in x's dtype. ``split_k`` > 1 splits K over programs adding into an
    fp32 buffer. ``streamk`` > 0 (scale-after only) launches ``streamk`` programs per SM on the stream-K
    schedule instead (``split_k`` must then stay 1). ``prefetch`` / ``pdl`` / ``trigger``: the overlap with the
    previous and next kernel (``_overlap_args``, ``kernels/overlap.py``) — split-K and plain schedules only: a
    stream-K launch keeps stream order and ignores them."""
    m, k = x2.shape
    n = words.shape[0]
    t = tile_columns(bits)
    _check_operands(x2, words, sz, bits, group)
    if scale_after and bits not in SCALE_AFTER_BITS:
        raise ValueError(f"scale_after needs bits in {SCALE_AFTER_BITS} (code + magic exact in a 16-bit float), got {bits}")
    if streamk < 0 or (streamk and split_k != 1):
        raise ValueError(f"streamk is programs per SM (>= 0) and replaces split-K: got streamk={streamk}, split_k={split_k}")
    if streamk:
        if not scale_after:
            raise ValueError("the stream-K schedule runs the scale-after K loop only (scale_after=True, bits 2 or 4)")
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        steps = k // t  # K steps per tile
        progs = min(tiles * steps, streamk * sm_count(x2.device))
        if progs * tiles * steps >= 2**31:  # the kernel splits the units as pid * total // programs in int32
            raise ValueError(f"stream-K with {progs} programs over {tiles * steps} units overflows int32 indexing; use "
                             "fewer programs per SM, larger tiles, or split-K")
        y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
        ws, cnt = split_k_workspace(x2.device, m * n, tiles)
        launch_kernel(
            _ktiled_streamk_kernel, (progs,), (x2, words, sz, y, ws, cnt, m, n, k, x2.stride(0), y.stride(0), steps,
                                               tiles * steps),
            GROUP=group, BITS=bits, SUBK=SUB, BN=bn, BM=bm, W_AS_A=w_as_a, GROUP_M=group_m,
            LOP3=not _INTERPRETED, num_warps=num_warps, num_stages=num_stages,
        )
        return y
    per_split = triton.cdiv(triton.cdiv(k, split_k), t) * t
    grid_k = triton.cdiv(k, per_split)
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    ws, cnt = (y, y) if grid_k == 1 else split_k_workspace(x2.device, m * n, tiles)
    consts, launch = _overlap_args(x2.device, bits, group, prefetch, pdl, trigger, grid_k > 1)
    launch_kernel(
        _ktiled_gemm_kernel, (tiles, grid_k), (x2, words, sz, y, ws, cnt, m, n, k, x2.stride(0), y.stride(0), per_split),
        GROUP=group, BITS=bits, SUBK=SUB, BN=bn, BM=bm, W_AS_A=w_as_a, SPLITS=grid_k, GROUP_M=group_m,
        LOP3=not _INTERPRETED, SCALE_AFTER=scale_after, num_warps=num_warps, num_stages=num_stages, **consts, **launch,
    )
    return y


# --- batch 1 and whole-weight unpack on the same layout -----------------------------------------


@triton.jit
def _ktiled_gemv_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, k_per_split,
                        GROUP: tl.constexpr, BITS: tl.constexpr, SUBK: tl.constexpr, BN: tl.constexpr,
                        BT: tl.constexpr, SPLITS: tl.constexpr, LOP3: tl.constexpr, PREFETCH: tl.constexpr = 0,
                        SZ_GROUPS: tl.constexpr = 1, PDL: tl.constexpr = False, TRIGGER: tl.constexpr = 0):
    """y[0, :] = x[0, :] · Ŵᵀ for one row of x (decode at batch 1) on the CUDA cores: BN rows per program, BT
    k-tiles (BT·SUBK words per row) per step, one [BN, BT·SUBK] word load. Every tensor keeps the words' 2-D
    shape — x, the scale and the zero are loaded per word column, straight into the words' register layout (the
    same address for several threads is an L1 hit) — so the loop has no layout conversion and no reduction: it
    is one LOP3, one FADD and one FFMA per code plus, per fold span (a group, or a tile when groups span tiles),
    acc += scale·(Σ code·x - zero·Σ x) per word column; the columns are summed once at the end.
    Field t of a word, (w & mask << sh) | 2**23 read as a float, is 2**23 + code·2**sh; minus 2**23 it is exact,
    times x·2**-sh it is code·x. Tiles past the program's K range load as zero words with x = 0: they add nothing."""
    CPW: tl.constexpr = 32 // BITS
    T: tl.constexpr = CPW * SUBK
    FOLD: tl.constexpr = GROUP // SUBK if GROUP < T else CPW  # fields per fold span
    BKW: tl.constexpr = BT * SUBK
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    KW = tl.multiple_of(K // CPW, SUBK)
    rn = pid * BN + tl.arange(0, BN)
    rn_c = tl.where(rn < N, rn, 0)  # clamped rows: loads need no row mask, the store masks them
    rkw = tl.arange(0, BKW)  # word column within a step: tile rkw // SUBK, word rkw % SUBK
    col0 = (rkw // SUBK) * T + rkw % SUBK  # the column field 0 of each word holds, relative to the step's start
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    _overlap_prologue(w_ptr, sz_ptr, rn_c, pid * BN, N, KW, k_start, k_end, GROUP, CPW, T, BN, PREFETCH, SZ_GROUPS,
                      PDL, TRIGGER)
    acc = tl.zeros([BN, BKW], dtype=tl.float32)
    for k0 in range(k_start, k_end, BT * T):
        live = k0 + (rkw // SUBK) * T < k_end  # [BKW] tiles inside this program's K range
        w = tl.load(w_ptr + rn_c[:, None] * KW + (tl.multiple_of(k0 // CPW, SUBK) + rkw)[None, :],
                    mask=live[None, :], other=0)  # [BN, BKW] int32
        w_hi = w >> 16  # fields ending above bit 23 are read from here
        for t in tl.static_range(CPW):
            col = k0 + col0 + t * SUBK  # [BKW] the column of field t
            if t % FOLD == 0:  # a fold span starts: its group's scale and zero, fresh partial sums
                sz = tl.load(sz_ptr + (col // GROUP)[None, :] * N + rn_c[:, None], mask=live[None, :], other=0)
                s = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)  # [BN, BKW]
                z = (sz & 0xFFFF).to(tl.float32)
                part = tl.zeros([BN, BKW], dtype=tl.float32)
                xsum = tl.zeros([BKW], dtype=tl.float32)
            sh = t * BITS if t * BITS + BITS <= 23 else t * BITS - 16  # the field's place in w or w_hi
            f = _field_magic(w, w_hi, t, BITS, LOP3)  # 2**23 + code·2**sh
            x = tl.load(x_ptr + col, mask=live, other=0.0).to(tl.float32)  # [BKW]
            part += (f - 8388608.0) * (x * (1.0 / (1 << sh)))[None, :]
            xsum += x
            if t % FOLD == FOLD - 1:
                acc += s * (part - z * xsum[None, :])
    if TRIGGER == 2:
        release_dependents(PDL)
    y = tl.sum(acc, axis=1)  # [BN]
    if SPLITS == 1:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        _add_partial(y, y_ptr, ws_ptr, cnt_ptr + pid, rn, rn < N, 1, SPLITS)


def ktiled_gemv(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bn: int = 4, tiles_per_step: int = 4,
                split_k: int = 1, num_warps: int = 1, num_stages: int = 1, prefetch: int | None = None,
                pdl: bool | None = None, trigger: int | None = None) -> Tensor:
    """x2 [1, K] bf16/fp16 (one row: decode at batch 1) with the k-tiled weight -> y [1, N] in x's dtype. At
    batch 1 the tensor-core GEMM wastes 15 of its 16 MMA rows and its pipeline's latency shows on small
    weights (1024 x 1024: 4.7 us); this kernel is the CUDA-core path on the k-tiled layout, so a layer holding only
    that layout keeps a batch-1 kernel of its own (3.3 us there on an H100, the checkpoint-layout GEMV 3.0;
    benchmarks/gemv_small.py). ``tiles_per_step`` k-tiles (T columns each) per program and step; ``split_k``
    programs share K."""
    m, k = x2.shape
    n = words.shape[0]
    if m != 1:
        raise ValueError(f"ktiled_gemv takes one row of x, got {m}; use ktiled_gemm")
    if tiles_per_step < 1 or tiles_per_step & (tiles_per_step - 1):
        raise ValueError(f"tiles_per_step must be a power of two, got {tiles_per_step}")
    _check_operands(x2, words, sz, bits, group)
    t = tile_columns(bits)
    per_split = triton.cdiv(triton.cdiv(k, split_k), t) * t
    grid_k = triton.cdiv(k, per_split)
    y = torch.empty((1, n), device=x2.device, dtype=x2.dtype)
    tiles = triton.cdiv(n, bn)
    ws, cnt = (y, y) if grid_k == 1 else split_k_workspace(x2.device, n, tiles)
    consts, launch = _overlap_args(x2.device, bits, group, prefetch, pdl, trigger, grid_k > 1)
    launch_kernel(
        _ktiled_gemv_kernel, (tiles, grid_k), (x2, words, sz, y, ws, cnt, n, k, per_split),
        GROUP=group, BITS=bits, SUBK=SUB, BN=bn, BT=tiles_per_step, SPLITS=grid_k, LOP3=not _INTERPRETED,
        num_warps=num_warps, num_stages=num_stages, **consts, **launch,
    )
    return y


@triton.jit
def _ktiled_dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, stride_sz, GROUP: tl.constexpr, BITS: tl.constexpr,
                           SUBK: tl.constexpr, BN: tl.constexpr):
    """One k-tile of BN rows -> Ŵ = (code - zero)·scale in fp32, rounded once to out's dtype. N: rows here (a
    block of the weight's rows when w_ptr / sz_ptr point into it); stride_sz: the sz row stride (all the rows)."""
    CPW: tl.constexpr = 32 // BITS
    T: tl.constexpr = CPW * SUBK
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    b = tl.program_id(1)  # k-tile
    rn = pid_n * BN + tl.arange(0, BN)
    rs = tl.arange(0, SUBK)
    nmask = rn < N
    w = tl.load(w_ptr + rn[:, None] * (K // CPW) + (b * SUBK + rs)[None, :], mask=nmask[:, None], other=0)
    for t in tl.static_range(CPW):
        col0 = b * T + t * SUBK
        if t == 0 or (t * SUBK) % GROUP == 0:
            sz = tl.load(sz_ptr + (col0 // GROUP) * stride_sz + rn, mask=nmask, other=0)
            s = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            z = (sz & 0xFFFF).to(tl.float32)
        code = ((w >> (t * BITS)) & MASK).to(tl.float32)
        wt = (code - z[:, None]) * s[:, None]
        tl.store(out_ptr + rn[:, None] * K + (col0 + rs)[None, :], wt.to(out_ptr.dtype.element_ty), mask=nmask[:, None])


def dequantize_ktiled(words: Tensor, sz: Tensor, bits: int, group: int, k: int,
                      dtype: torch.dtype = torch.bfloat16, rows: tuple[int, int] | None = None,
                      out: Tensor | None = None) -> Tensor:
    """[N, K] Ŵ in ``dtype`` from the k-tiled layout, in one pass (packed words in, 2 bytes per weight out): the
    storage-only path (``dequant`` / ``auto``'s unpack + cuBLAS) for a layer held k-tiled. The same values as
    ``wq_matmul.dequantize`` on the checkpoint tensors. ``rows=(n0, n1)``: only weight rows n0…n1-1 (n0 a multiple
    of 64), as an [n1 - n0, K] tensor; ``out``: a contiguous tensor of ``dtype`` with at least that many elements,
    whose first (n1 - n0)·K are written and returned as the [n1 - n0, K] view (a buffer reused across calls)."""
    n = words.shape[0]
    if (not ktiled_ok(bits, group, n, k) or words.shape != (n, k * bits // 32) or sz.shape != (k // group, n)
            or words.dtype != torch.int32 or sz.dtype != torch.int32 or not (words.is_contiguous() and sz.is_contiguous())):
        raise ValueError(f"dequantize_ktiled: words {words.dtype} {tuple(words.shape)} / sz {sz.dtype} {tuple(sz.shape)} "
                         f"are not a contiguous k-tiled {bits}-bit weight of in_features={k}, group={group}")
    bn = 64
    n0, n1 = (0, n) if rows is None else rows
    if not (0 <= n0 < n1 <= n and n0 % bn == 0):
        raise ValueError(f"dequantize_ktiled: rows={rows} of a weight with {n} rows: expected 0 <= n0 < n1 <= {n}, "
                         f"n0 a multiple of {bn}")
    r = n1 - n0
    if r * k >= 2**31:
        raise ValueError(f"dequantize_ktiled indexes the [{r}, {k}] output with int32 offsets; split the rows (rows=)")
    if out is None:
        out = torch.empty((r, k), device=words.device, dtype=dtype)
    elif (out.dtype != dtype or out.device != words.device or not out.is_contiguous() or out.numel() < r * k):
        raise ValueError(f"dequantize_ktiled: out {out.dtype} {tuple(out.shape)} on {out.device}: expected a contiguous "
                         f"{dtype} buffer of at least {r}×{k} elements on {words.device}")
    else:
        out = out.view(-1)[:r * k].view(r, k)
    _ktiled_dequant_kernel[(triton.cdiv(r, bn), k // tile_columns(bits))](
        words[n0:n1], sz[:, n0:n1], out, r, k, n, GROUP=group, BITS=bits, SUBK=SUB, BN=bn, num_warps=4)
    return out


_WORKSPACES: dict[str, tuple[Tensor, Tensor]] = {}
_RETIRED: list[tuple[Tensor, Tensor]] = []


def split_k_workspace(device: torch.device, numel: int, tiles: int) -> tuple[Tensor, Tensor]:
    """A zeroed fp32 buffer (>= numel) and int32 tile counters (>= tiles) for split-K, one pair per
    device, grown on demand and kept: every kernel leaves them zeroed again, so consecutive calls (and
    CUDA-graph replays) share them without a memset. Not for concurrent split-K calls on several
    streams of one device. Growing is refused while a CUDA graph is being captured (warm up eagerly
    at the largest batch first)."""
    cuda = torch.device(device).type == "cuda"
    key = str(device)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < tiles:
        if cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"split-K workspace must grow to {numel} floats / {tiles} tiles during CUDA-graph "
                               "capture; run this shape eagerly once before capturing")
        numel = max(numel, 0 if ws is None else ws.numel())
        tiles = max(tiles, 0 if cnt is None else cnt.numel())
        if ws is not None:  # CUDA graphs captured earlier still point at the old pair: keep it alive
            _RETIRED.append((ws, cnt))
        ws = torch.zeros(numel, device=device, dtype=torch.float32)
        cnt = torch.zeros(tiles, device=device, dtype=torch.int32)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def compile_for_sm90(bm: int = 16, bn: int = 64, w_as_a: bool = True, splits: int = 2, warps: int = 4,
                     stages: int = 3, scale_after: bool = True, bits: int = 4, group: int = 128):
    """Compile ``_ktiled_gemm_kernel`` for an H100 (sm_90a) on any machine (the Triton wheel carries ptxas), specialized
    as the launcher would for an M that is not a multiple of 16 (no divisibility hint on M): the CPU tests read its PTX
    (the split-K meeting's barriers) without a GPU. The default is a tile that raced before session 18's fix."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "sz_ptr": "*i32", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "k_per_split": "i32"}
    const = {"GROUP": group, "BITS": bits, "SUBK": SUB, "BN": bn, "BM": bm, "W_AS_A": w_as_a, "SPLITS": splits,
             "GROUP_M": 8, "LOP3": True, "SCALE_AFTER": scale_after, "PREFETCH": 0, "SZ_GROUPS": 1, "PDL": False,
             "TRIGGER": 0}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n != "M"}
    sig.update({name: "constexpr" for name in const})
    return triton.compile(ASTSource(fn=_ktiled_gemm_kernel, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
