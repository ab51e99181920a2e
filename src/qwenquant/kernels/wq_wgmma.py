"""W4A16 (and W2/W8) GEMM for prefill-sized M on Hopper: the dequantization overlapped with the MMA in flight.

Why this kernel exists. ``wq_ktiled``'s large tiles reach only ≈ 0.55 of the tensor-core floor at M >= 256
(benchmarks/NOTES.md, session 8 item 8): Triton's pipeliner waits on every wgmma whose A operand comes from
registers, so each K step the same warps first dequantize (≈ 0.7 µs of issue per SM) and then wait for the
MMA (≈ 1.4 µs): the two take turns. Gluon (``triton.experimental.gluon``, shipped with Triton 3.6) lets the
kernel say what the pipeliner would not:

    for each 32-column slice i of K:
        Ŵ_i = dequantize(words)            # CUDA cores, while wgmma(i-1) runs on the tensor cores
        wgmma(Ŵ_i [regs], xᵀ_i [smem]) async
        wait until <= 1 wgmma is in flight  # wgmma(i-1) done: Ŵ_{i-1}'s registers are free
        if i starts a stage: CTA barrier, then TMA the next stage of x into the stage wgmma(i-1) finished

so the CUDA-core work hides under the tensor-core work instead of adding to it.

Layout: the k-tiled words of ``wq_ktiled`` (int32 [N, K/CPW]; word j of k-tile b of row n holds the codes of
columns b·T + t·32 + j, t = 0 … CPW-1, code t at bits [t·bits, (t+1)·bits)), the scale/zero words
int32 [K/group, N] (fp16 scale bits << 16 | zero). One [BN, 32] word load per k-tile feeds CPW slices:
slice t is ``(w >> t·bits) & mask``, already the MMA's K slice. The words are loaded straight into the wgmma
A-operand register layout, one k-tile ahead.

Orientation: yᵀ[BN, BM] = Ŵ[BN, K] · xᵀ[K, BM]. The weight is wgmma's A operand (registers, 64 rows per
warpgroup); the rows of x are wgmma's N (BM <= 256), staged by TMA into a ring of STAGES stages of SPS [BM, 32]
slices, one mbarrier per stage.

Dequantization (scale before the MMA, exact): the field is OR-ed into the float 2**23 in place —
``(w & (mask << sh)) | 0x4B000000`` is 2**23 + code·2**sh — then one FADD of -(2**23 + zero·2**sh) and one FMUL
by scale·2**-sh (both per row) give (code - zero)·scale in fp32, rounded once to x's dtype: bit-equal to
``wq_matmul.reference_dequantize``. Fields ending above bit 23 are taken from ``w >> 16``.

Schedules: one output tile per program, or (``streamk`` > 0) a hybrid stream-K grid of a few programs per SM
that runs whole tiles while two waves remain and splits the last waves' k-tiles evenly; a tile split between
programs is met in a zeroed fp32 workspace region (relaxed atomic adds, a per-tile counter, the span completing
the count stores y and re-zeroes both) — what fills the SMs when 128 × 256 tiles are few (down at M = 256: 0.67×
→ 0.95× bf16, benchmarks/NOTES.md session 11).

Requirements: an sm_90 GPU (wgmma, TMA); x bf16 or fp16, contiguous, M >= 1; bits ∈ {2, 4, 8}; K a multiple of
the k-tile T (``wq_ktiled.tile_columns``); group a multiple of 32 dividing K; N a multiple of 8.
Reference: ``wq_matmul.reference_matmul`` on the checkpoint tensors (``wq_ktiled.unpack_ktiled`` inverts the repack).
"""

from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor

try:  # Gluon ships with Triton >= 3.5; the kernel is only built where it is available
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    GLUON = True
except ImportError:  # pragma: no cover — an older Triton: wgmma_ok() says False
    GLUON = False

from qwenquant.kernels.launch import launch_kernel
from qwenquant.kernels.tiles import result_tensor, sm_count
from qwenquant.kernels.wq_ktiled import _check_operands as check_ktiled_operands
from qwenquant.kernels.wq_ktiled import _field_magic, split_k_workspace
from qwenquant.numerics.ktiled import SUB, ktiled_ok, tile_columns

# (bn, bm, warps, stages, slices per stage, stream-K programs per SM) the tuner may offer: bn = 64 rows per warpgroup
# × warpgroups; bm <= 256 (wgmma's N); a stage is SPS [bm, 32] x slices under one mbarrier, shared memory =
# stages·SPS·bm·64 bytes; stream-K 0 = one output tile per program, else that many programs per SM share the
# (tile, k-tile) units evenly (what fills the SMs when the tiles do not: 32–96 tiles of 128 × 256 at M = 256–512)
CONFIGS = ((128, 256, 8, 3, 4, 0), (128, 256, 8, 4, 2, 0), (128, 256, 8, 6, 1, 0), (64, 256, 4, 4, 2, 0),
           (64, 128, 4, 4, 2, 0), (128, 128, 8, 4, 2, 0), (128, 256, 8, 4, 2, 1), (128, 128, 8, 4, 2, 1))
SMEM_BYTES = 200 * 1024  # the x ring's budget (an H100 gives a program 227 KB; the epilogue's shuffle needs some)


@functools.lru_cache(maxsize=None)
def runs_on(device: torch.device | str) -> bool:
    """Whether this kernel runs on ``device`` at all: Gluon present and a Hopper (sm_90) GPU. Per device, so a machine
    with several GPU kinds asks for each (``fused`` puts the answer in its tuner key)."""
    device = torch.device(device)
    if not GLUON or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9  # index None: the current device


def wgmma_ok(device: torch.device | str, bits: int, group: int, n: int, k: int) -> bool:
    """Whether this kernel can run the shape on ``device``: ``runs_on`` and the k-tiled layout's constraints."""
    return runs_on(device) and ktiled_ok(bits, group, n, k)


if GLUON:

    @gluon.constexpr_function
    def _store_layout(bn, num_warps):
        """A blocked layout over the [BN, BM] output tile with 8 consecutive rows of N per thread: y is [M, N]
        row-major, so N is the contiguous direction of the store (16-byte vectors)."""
        tn = min(32, bn // 8)
        return gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[tn, 32 // tn],
                                warps_per_cta=[1, num_warps], order=[0, 1])

    @gluon.jit
    def _dequant_slice(words, hi, zr, sr, T_IDX: gl.constexpr, BITS: gl.constexpr, DTYPE: gl.constexpr,
                       LOP3: gl.constexpr):
        """Slice T_IDX of a [BN, 32] word tile -> (code - zero)·scale in DTYPE, in the words' layout. ``hi`` is
        ``words >> 16`` (fields ending above bit 23); ``zr``/``sr`` the per-row zero and scale in fp32. LOP3: the
        field and the exponent of 2**23 in one ``lop3.b32 … 0xEA`` ((a & b) | c, the two constants in registers
        hoisted out of the loop); written in Gluon, ``(w & mask) | magic`` compiles to two LOP3s."""
        f = _field_magic(words, hi, T_IDX, BITS, LOP3)  # wq_ktiled's: 2**23 + code·2**sh as fp32
        SH: gl.constexpr = T_IDX * BITS if T_IDX * BITS + BITS <= 23 else T_IDX * BITS - 16
        zf = 8388608.0 + zr * (1 << SH)  # 2**23 + zero·2**sh: exact (fields < 2**23)
        sf = sr * (1.0 / (1 << SH))  # scale·2**-sh: exact
        return ((f - zf[:, None]) * sf[:, None]).to(DTYPE)

    @gluon.constexpr_function
    def _slice_layout(bm, subk, dtype):
        """wgmma's shared-memory layout of one [bm, 32] x slice (64-byte swizzle), what both descriptors write."""
        return gl.NVMMASharedLayout.get_default_for([bm, subk], dtype)

    @gluon.constexpr_function
    def _stage_bytes(x_desc, sps):
        """Bytes one ring stage's mbarrier expects: SPS [BM, 32] x slices, whatever the descriptor's rank (a 3-D box
        already holds the whole stage: expecting SPS boxes of it hangs the wait)."""
        shape = x_desc.block_type.shape
        return sps * shape[-2] * shape[-1] * x_desc.dtype.primitive_bitwidth // 8

    @gluon.jit
    def _load_stage(x_desc, bar, xs, slot, off_m, col, pred, SPS: gl.constexpr):
        """TMA the SPS [BM, 32] x slices of one ring stage (columns col, col + 32, …) into ring slots slot·SPS …,
        completing on ``bar``. A 3-D descriptor (``_x_descriptor(..., sps)``: x seen as [K/32, rows, 32]) moves the
        stage as one [SPS, BM, 32] box — one copy, so one of the CTA barriers Triton puts around each copy, where
        the 2-D descriptor needs SPS copies."""
        SUBK: gl.constexpr = x_desc.block_type.shape[-1]
        if len(x_desc.block_type.shape) == 3:  # the ring seen as [STAGES, SPS, BM, 32] in the descriptor's layout
            BM: gl.constexpr = x_desc.block_type.shape[1]
            ring = xs._reinterpret(x_desc.dtype, [xs.shape[0] // SPS, SPS, BM, SUBK], x_desc.layout)
            tma.async_copy_global_to_shared(x_desc, [col // SUBK, off_m, 0], bar, ring.index(slot), pred=pred)
        else:
            for u in gl.static_range(SPS):
                tma.async_copy_global_to_shared(x_desc, [off_m, col + u * SUBK], bar, xs.index(slot * SPS + u),
                                                pred=pred)

    @gluon.jit
    def _slice_scales(szs, sr, zr, T_IDX: gl.constexpr, SUBK: gl.constexpr, GSTEP: gl.constexpr):
        """Per-row scale and zero (fp32) for slice T_IDX of a k-tile: decoded from the k-tile's group words ``szs``
        (``_load_groups``; fp16 scale bits << 16 | zero) where a scale group starts at this slice, else ``sr``/``zr``
        as they were."""
        if (T_IDX * SUBK) % GSTEP == 0:
            sz = szs[(T_IDX * SUBK) // GSTEP]
            sr = (sz >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            zr = (sz & 0xFFFF).to(gl.float32)
        return sr, zr

    @gluon.jit
    def _load_groups(sz_ptr, N, rn_c, col, pred, NG: gl.constexpr, GSTEP: gl.constexpr, GROUP: gl.constexpr):
        """The scale/zero words ([BN] int32, rows ``rn_c``) of the NG groups starting at columns col, col + GSTEP, …
        of one k-tile, as a tuple; all-zero where ``pred`` is False (past the span's last k-tile)."""
        out = ()
        for j in gl.static_range(NG):
            out = out + (gl.load(sz_ptr + ((col + j * GSTEP) // GROUP) * N + rn_c, mask=pred & (rn_c >= 0), other=0), )
        return out

    @gluon.jit
    def _mma_k_span(x_desc, w_ptr, sz_ptr, N, K, off_m, n0, kt_lo, n_kt, BITS: gl.constexpr, GROUP: gl.constexpr,
                    BN: gl.constexpr, STAGES: gl.constexpr, SPS: gl.constexpr, LOP3: gl.constexpr):
        """The fp32 [BN, BM] accumulator of output tile (rows n0…, x rows off_m…) over k-tiles [kt_lo, kt_lo + n_kt).

        The x ring and its mbarriers live for this span only (allocated, initialized and invalidated here): a
        stream-K program that runs several spans starts each with a fresh ring, and the epilogue's layout shuffle
        may reuse the ring's shared memory. The scale/zero words of k-tile b+1 are loaded with its weight words, a
        k-tile ahead of use: loaded right before each group's first slice, their L2 latency stalled every warp (ncu on
        gate_up M = 2048: long-scoreboard 1.5 of 6.1 cycles per instruction; ahead: +3–8 %, NOTES session 12)."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        SUBK: gl.constexpr = x_desc.block_type.shape[-1]  # 32 columns of K per slice (one wgmma of depth 32)
        DTYPE: gl.constexpr = x_desc.dtype
        CPW: gl.constexpr = 32 // BITS  # codes per int32 word = slices per k-tile
        T: gl.constexpr = CPW * SUBK  # columns per k-tile
        STAGE_BYTES: gl.constexpr = _stage_bytes(x_desc, SPS)
        acc_layout: gl.constexpr = _acc_layout(BM, gl.num_warps())
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        rows_a: gl.constexpr = gl.SliceLayout(1, a_layout)

        kw = K // CPW  # words per row
        n_stages = n_kt * (CPW // SPS)
        col0 = kt_lo * T  # first column of the span
        rn = n0 + gl.arange(0, BN, layout=rows_a)
        rn_c = gl.where(rn < N, rn, 0)  # rows past N read row 0 (their outputs are not stored)
        rw = gl.arange(0, SUBK, layout=gl.SliceLayout(0, a_layout))
        w_ptrs = w_ptr + rn_c[:, None] * kw + kt_lo * SUBK + rw[None, :]  # [BN, 32] words of the span's k-tile 0

        # x ring: STAGES stages of SPS [BM, 32] slices, one mbarrier per stage; the warps of the program meet (CTA
        # barriers: the explicit one below, and the ones Triton adds around each TMA copy) only when a stage is
        # refilled, so several slices per stage let them run apart in between; stages 0 … STAGES-2 in flight first
        xs = gl.allocate_shared_memory(DTYPE, [STAGES * SPS, BM, SUBK], _slice_layout(BM, SUBK, DTYPE))
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        for s in gl.static_range(STAGES - 1):
            mbarrier.expect(bars.index(s), STAGE_BYTES, pred=s < n_stages)
            _load_stage(x_desc, bars.index(s), xs, s, off_m, col0 + s * SPS * SUBK, s < n_stages, SPS)

        acc = gl.zeros([BN, BM], gl.float32, acc_layout)
        a_prev = gl.zeros([BN, SUBK], DTYPE, a_layout)  # the A operand of the wgmma in flight (kept alive)
        words_next = gl.load(w_ptrs)
        GSTEP: gl.constexpr = GROUP if GROUP < T else T  # columns between scale loads within a k-tile
        sz_next = _load_groups(sz_ptr, N, rn_c, col0, True, T // GSTEP, GSTEP, GROUP)
        zr = gl.zeros([BN], gl.float32, rows_a)
        sr = gl.zeros([BN], gl.float32, rows_a)
        for b in range(n_kt):
            words = words_next
            words_next = gl.load(w_ptrs + (b + 1) * SUBK, mask=(b + 1 < n_kt) & (rn_c[:, None] >= 0), other=0)
            szs = sz_next
            sz_next = _load_groups(sz_ptr, N, rn_c, col0 + (b + 1) * T, b + 1 < n_kt, T // GSTEP, GSTEP, GROUP)
            hi = words >> 16
            for t in gl.static_range(CPW):
                sr, zr = _slice_scales(szs, sr, zr, t, SUBK, GSTEP)
                a = _dequant_slice(words, hi, zr, sr, t, BITS, DTYPE, LOP3)
                st = (b * CPW + t) // SPS  # stage of this slice (SPS divides CPW: t % SPS is its place in it)
                slot = st % STAGES
                if t % SPS == 0:
                    mbarrier.wait(bars.index(slot), phase=(st // STAGES) & 1)
                acc = warpgroup_mma(a, xs.index(slot * SPS + t % SPS).permute((1, 0)), acc, is_async=True)
                acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
                a_prev = a
                if t % SPS == 0:  # the wgmma before this one finished stage st-1: its slot takes stage st-1+STAGES
                    # ... once *both* warpgroups have retired it: wait(1) above covers only this warpgroup's wgmmas
                    gl.thread_barrier()
                    nxt = st + STAGES - 1
                    nslot = nxt % STAGES
                    mbarrier.expect(bars.index(nslot), STAGE_BYTES, pred=nxt < n_stages)
                    _load_stage(x_desc, bars.index(nslot), xs, nslot, off_m, col0 + nxt * SPS * SUBK, nxt < n_stages,
                                SPS)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        gl.thread_barrier()  # every warp is past its last mbarrier wait before the barriers go
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))
        return acc

    @gluon.constexpr_function
    def _acc_layout(bm, num_warps):
        """wgmma's accumulator over a [BN, BM] tile: 16 weight rows per warp, the x rows as the MMA's N."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, bm, 16])

    @gluon.jit
    def _store_tile(acc, y_ptr, M, N, off_m, n0, BN: gl.constexpr, BM: gl.constexpr):
        """yᵀ tile (fp32, any layout) -> y[M, N] in y's dtype, N contiguous (16-byte stores)."""
        out_layout: gl.constexpr = _store_layout(BN, gl.num_warps())
        out = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), out_layout)
        on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, out_layout))
        om = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, out_layout))
        gl.store(y_ptr + om[None, :].to(gl.int64) * N + on[:, None], out, mask=(on[:, None] < N) & (om[None, :] < M))

    @gluon.jit
    def _ws_offsets(BN: gl.constexpr, BM: gl.constexpr):
        """[BN, BM] int32 offsets of a tile's partial sums in its private BN·BM-float region of the workspace, in the
        accumulator layout and ordered like it: in wgmma's accumulator, warp w holds rows 16w + r + 8h (r = lane // 4,
        h = 0/1) and columns 8j + 2(lane % 4) + e (e = 0/1). Offset = 64·WPT·(BM/8·h + j) + 64w + 8r + 2(lane % 4) + e,
        WPT = BN/16 warps: one warp's 32 lanes × 2 columns are 64 consecutive floats for every (h, j) — each atomic
        instruction covers whole 32-byte sectors, and the offsets are the same bijection for writer and reader."""
        acc_layout: gl.constexpr = _acc_layout(BM, gl.num_warps())
        WPT: gl.constexpr = BN // 16
        rn = gl.arange(0, BN, layout=gl.SliceLayout(1, acc_layout))
        rm = gl.arange(0, BM, layout=gl.SliceLayout(0, acc_layout))
        a = (64 * WPT * (BM // 8)) * ((rn // 8) % 2) + ((rn // 16) * 8 + rn % 8) * 8
        b = (64 * WPT) * (rm // 8) + rm % 8
        return a[:, None] + b[None, :]

    @gluon.jit
    def _add_partial(acc, y_ptr, ws_tile, cnt, M, N, off_m, n0, amount, total_count, BN: gl.constexpr,
                     BM: gl.constexpr):
        """A stream-K span's partial sums of one tile, met by the tile's other spans without extra launches
        (``wq_ktiled._add_partial``'s protocol): added to the tile's zeroed fp32 region ``ws_tile`` (BN·BM floats),
        the tile's counter ``cnt`` grows by the span's k-tiles ``amount``, and the program that brings it to
        ``total_count`` writes y once and re-zeroes the region and the counter for the next call."""
        off = _ws_offsets(BN, BM)
        gl.atomic_add(ws_tile + off, acc, sem="relaxed")
        gl.thread_barrier()  # every thread's partial sums are issued before the release below
        done = gl.atomic_add(cnt, amount, sem="acq_rel") + amount
        if done == total_count:
            total = gl.load(ws_tile + off, cache_modifier=".cg")
            gl.store(ws_tile + off, gl.zeros_like(total))
            gl.atomic_xchg(cnt, 0)
            _store_tile(total, y_ptr, M, N, off_m, n0, BN, BM)

    @gluon.jit
    def _whole_tile(tile, x_desc, w_ptr, sz_ptr, y_ptr, M, N, K, num_m, BITS: gl.constexpr, GROUP: gl.constexpr,
                    BN: gl.constexpr, STAGES: gl.constexpr, SPS: gl.constexpr, LOP3: gl.constexpr):
        """Output tile ``tile`` (m fastest: the programs sharing a weight tile run together and read it from DRAM
        once) over all of K, stored."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        T: gl.constexpr = (32 // BITS) * x_desc.block_type.shape[-1]
        off_m = (tile % num_m) * BM
        n0 = (tile // num_m) * BN
        acc = _mma_k_span(x_desc, w_ptr, sz_ptr, N, K, off_m, n0, 0, K // T, BITS, GROUP, BN, STAGES, SPS, LOP3)
        _store_tile(acc, y_ptr, M, N, off_m, n0, BN, BM)

    @gluon.jit
    def _wgmma_w_as_a_kernel(x_desc, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                             BITS: gl.constexpr, GROUP: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                             SPS: gl.constexpr, STREAMK: gl.constexpr, LOP3: gl.constexpr):
        """One output tile per program (STREAMK False), or the hybrid stream-K schedule on a grid of P programs
        (a few per SM): whole tiles round-robin while at least two waves of tiles remain, then the last 1–2 waves'
        (tile, k-tile) units split evenly, each program a contiguous run — every SM gets the same number of k-tiles
        whatever the tile count. A run may start and end inside a tile; those spans meet in ``_add_partial``, in the
        tile's region of the workspace (indexed from the first stream-K tile: at most 2P regions)."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        T: gl.constexpr = (32 // BITS) * x_desc.block_type.shape[-1]
        pid = gl.program_id(0)
        num_m = gl.cdiv(M, BM)
        if STREAMK:
            kt_per_tile = K // T
            tiles = num_m * gl.cdiv(N, BN)
            progs = gl.num_programs(0)
            dp_tiles = gl.maximum(tiles // progs - 1, 0) * progs
            for tile in range(pid, dp_tiles, progs):
                _whole_tile(tile, x_desc, w_ptr, sz_ptr, y_ptr, M, N, K, num_m, BITS, GROUP, BN, STAGES, SPS, LOP3)
            total = (tiles - dp_tiles) * kt_per_tile
            u = (pid * total) // progs  # this program's units [u, u_end); int32: the host keeps progs·total < 2**31
            u_end = ((pid + 1) * total) // progs
            while u < u_end:
                sk_tile = u // kt_per_tile
                kt_lo = u - sk_tile * kt_per_tile
                n_kt = gl.minimum(kt_per_tile - kt_lo, u_end - u)
                tile = dp_tiles + sk_tile
                off_m = (tile % num_m) * BM
                n0 = (tile // num_m) * BN
                acc = _mma_k_span(x_desc, w_ptr, sz_ptr, N, K, off_m, n0, kt_lo, n_kt, BITS, GROUP, BN, STAGES,
                                  SPS, LOP3)
                if n_kt == kt_per_tile:
                    _store_tile(acc, y_ptr, M, N, off_m, n0, BN, BM)
                else:
                    _add_partial(acc, y_ptr, ws_ptr + sk_tile * (BN * BM), cnt_ptr + sk_tile, M, N, off_m, n0, n_kt,
                                 kt_per_tile, BN, BM)
                u += n_kt
        else:
            _whole_tile(pid, x_desc, w_ptr, sz_ptr, y_ptr, M, N, K, num_m, BITS, GROUP, BN, STAGES, SPS, LOP3)


def check_config(bits: int, bn: int, bm: int, num_warps: int, stages: int, sps: int, streamk: int = 0) -> None:
    """Refuse a tile the kernel cannot build: bn = 16·num_warps (64 weight rows per warpgroup of 4 warps), bm one of
    wgmma's N sizes used here, sps dividing the slices of a k-tile, the x ring within ``SMEM_BYTES``, stream-K
    programs per SM >= 0."""
    cpw = 32 // bits if bits in (2, 4, 8) else None
    if (cpw is None or num_warps not in (4, 8) or bn != 16 * num_warps or bm not in (64, 128, 192, 256) or stages < 2
            or sps < 1 or cpw % sps or stages * sps * bm * SUB * 2 > SMEM_BYTES or streamk < 0):
        raise ValueError(f"wgmma_gemm: bits={bits}, bn={bn}, num_warps={num_warps}, bm={bm}, stages={stages}, sps={sps}, "
                         f"streamk={streamk}: expected bits in 2/4/8, num_warps 4 or 8 with bn = 16·num_warps, bm in "
                         f"64/128/192/256, stages >= 2, sps dividing {cpw} (32-column slices per {bits}-bit k-tile), "
                         f"stages·sps·bm·64 <= {SMEM_BYTES} bytes of shared memory and streamk >= 0 programs per SM")


def check_operands(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int) -> None:
    """Refuse what the kernel cannot run, naming the value and what was expected."""
    if x2.dim() != 2 or x2.dtype not in (torch.bfloat16, torch.float16) or not x2.is_contiguous():
        raise ValueError(f"wgmma_gemm: x must be a contiguous 2-D bf16/fp16 tensor, got {x2.dtype} {tuple(x2.shape)}"
                         f"{'' if x2.is_contiguous() else ' (not contiguous)'}")
    m, k = x2.shape
    n = words.shape[0]
    if not wgmma_ok(x2.device, bits, group, n, k):
        raise ValueError(f"wgmma_gemm: {bits}-bit, group {group}, N={n}, K={k} on {x2.device} is not supported "
                         f"(needs Gluon, an sm_90 GPU, K a multiple of {tile_columns(bits) if bits in (2, 4, 8) else '?'} "
                         "and a group that is a multiple of 32 dividing K); use ktiled_gemm or dequant + matmul")
    check_ktiled_operands(x2, words, sz, bits, group)  # words / sz shapes, dtypes, contiguity, devices


@functools.lru_cache(maxsize=None)
def nvmma_layout(block: tuple[int, ...], dtype: torch.dtype):
    """Gluon's default shared-memory layout of a TMA box (``NVMMASharedLayout.get_default_for``), cached: computing
    it is ≈ 6 µs of host Python per descriptor, and every eager call builds one or two descriptors."""
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.int32: gl.int32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


def _x_descriptor(x2: Tensor, bm: int, sps: int = 0):
    """TMA descriptor of x [rows, K] read in [bm, 32] boxes into wgmma's shared-memory layout (64-byte swizzle);
    ``sps`` > 0: x seen as [K/32, rows, 32] (strides 32, K, 1), read in [sps, bm, 32] boxes — one copy per ring
    stage, landing as sps consecutive [bm, 32] slices in the same layout."""
    rows, k = x2.shape
    if sps:
        layout = nvmma_layout((sps, bm, SUB), x2.dtype)
        return TensorDescriptor(x2, [k // SUB, rows, SUB], [SUB, k, 1], [sps, bm, SUB], layout)
    return TensorDescriptor(x2, [rows, k], [k, 1], [bm, SUB], nvmma_layout((bm, SUB), x2.dtype))


def result_and_tma_x(x2: Tensor, n: int, bm: int, out: Tensor | None, who: str) -> tuple[Tensor, Tensor]:
    """The [M, N] result (``out`` checked, or a new tensor) and x as TMA may read it in [bm, 32] boxes: padded with
    zero rows up to bm (their outputs are not stored), or copied when the base is not 16-byte aligned."""
    m, k = x2.shape
    y = result_tensor(x2, n, out, who)
    if m < bm:  # TMA boxes no taller than the tensor
        x2 = torch.cat([x2, x2.new_zeros(bm - m, k)])
    elif x2.data_ptr() % 16:  # TMA needs a 16-byte aligned base (a view at an odd offset)
        x2 = x2.clone()
    return y, x2


def wgmma_gemm(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bn: int = 128, bm: int = 256,
               num_warps: int = 8, stages: int = 4, sps: int = 2, streamk: int = 0, lop3: bool = True,
               programs: int | None = None, out: Tensor | None = None, x3d: bool = True) -> Tensor:
    """y [M, N] = x2 [M, K] · Ŵᵀ from the k-tiled words, on Hopper's tensor cores with the dequantization
    overlapped (module docstring). ``bn`` weight rows (64 per warpgroup: bn = 16·num_warps), ``bm`` rows of x
    (wgmma's N, <= 256), ``stages`` stages of ``sps`` 32-column x slices in flight; ``streamk`` > 0: that many
    programs per SM on the stream-K schedule (partial tiles meet in ``wq_ktiled.split_k_workspace``), 0: one
    program per output tile. ``lop3=False`` builds the field extraction from plain Gluon (two LOP3s; comparison).
    ``programs``: the stream-K grid instead of ``streamk`` × SMs (tests use small grids to reach every path of the
    schedule: whole tiles first, then spans that start and end inside tiles). ``out``: the [M, N] result tensor
    (contiguous, x's dtype and device) instead of a new one — tests pass one filled with NaN, so an output tile
    the kernel failed to write cannot pass on a stale allocation. ``x3d`` (default): one 3-D TMA copy per ring stage;
    ``x3d=False``: ``sps`` 2-D copies, as before session 12 (comparison: 3–20 % slower on the 8-warp tiles)."""
    check_config(bits, bn, bm, num_warps, stages, sps, streamk)
    if programs is not None and (not streamk or programs < 1):
        raise ValueError(f"wgmma_gemm: programs={programs} sets the stream-K grid: it needs streamk > 0 and programs >= 1")
    check_operands(x2, words, sz, bits, group)
    m, k = x2.shape
    n = words.shape[0]
    y, x2 = result_and_tma_x(x2, n, bm, out, "wgmma_gemm")
    x_desc = _x_descriptor(x2, bm, sps if x3d else 0)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if streamk:  # the hybrid schedule of the kernel: the last 1-2 waves of tiles on the stream-K split
        units = tiles * (k // tile_columns(bits))
        grid_cap = programs or streamk * sm_count(x2.device)
        grid = min(units, grid_cap)
        if grid * units >= 2**31:  # the kernel's unit split is int32
            raise ValueError(f"wgmma_gemm: stream-K over M={m}, N={n}, K={k} overflows int32 indexing; use streamk=0")
        # a zeroed region and counter per stream-K tile: fewer than 2·grid of them; sized for the grid cap, not M,
        # so a CUDA graph captured at another M than the warm-up never needs the workspace to grow
        ws, cnt = split_k_workspace(x2.device, 2 * grid_cap * bn * bm, 2 * grid_cap)
    else:
        grid, ws, cnt = tiles, y, y  # no partial tiles: the workspace pointers are never used
    launch_kernel(_wgmma_w_as_a_kernel, (grid, ), (x_desc, words, sz, y, ws, cnt, m, n, k), BITS=bits, GROUP=group,
                  BN=bn, STAGES=stages, SPS=sps, STREAMK=bool(streamk), LOP3=lop3, num_warps=num_warps)
    return y


def compile_for_sm90(bits: int, group: int, config: tuple = CONFIGS[0], dtype: torch.dtype = torch.bfloat16,
                     m: int = 4096, n: int = 4096, k: int = 4096, lop3: bool = True, x3d: bool = True):
    """Compile the kernel for an H100 (sm_90a) on any machine, GPU or not: the Triton wheel carries ptxas. Returns
    Triton's compiled kernel (``.asm['ptx' | 'cubin']``, ``.metadata.shared``) — what ``benchmarks/sass_wgmma.py``
    reads and the CPU tests check (it builds, and the wgmma is issued asynchronously), without a GPU call.
    ``m``/``n``/``k`` matter only through Triton's divisibility specialization, which is given as a launch on a GPU
    would give it: every pointer 16-byte aligned (``torch`` allocations are), M, N, K where divisible by 16."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    if not GLUON:
        raise RuntimeError("Gluon is not available in this Triton: the wgmma kernel cannot be built")
    bn, bm, num_warps, stages, sps, streamk = config
    check_config(bits, bn, bm, num_warps, stages, sps, streamk)
    # a host tensor stands in for x: only its dtype, shape and alignment count
    desc = _x_descriptor(torch.empty(bm, k, dtype=dtype), bm, sps if x3d else 0)
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    sig = {"x_desc": mangle_type(desc), "w_ptr": "*i32", "sz_ptr": "*i32", "y_ptr": ptr, "ws_ptr": "*fp32",
           "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "BITS": "constexpr", "GROUP": "constexpr",
           "BN": "constexpr", "STAGES": "constexpr", "SPS": "constexpr", "STREAMK": "constexpr", "LOP3": "constexpr"}
    consts = {"BITS": bits, "GROUP": group, "BN": bn, "STAGES": stages, "SPS": sps, "STREAMK": bool(streamk),
              "LOP3": lop3}
    names = list(sig)
    aligned = ["w_ptr", "sz_ptr", "y_ptr", "ws_ptr", "cnt_ptr"] + [a for a, v in (("M", m), ("N", n), ("K", k)) if v % 16 == 0]
    attrs = {(names.index(a), ): [["tt.divisibility", 16]] for a in aligned}
    src = GluonASTSource(_wgmma_w_as_a_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
