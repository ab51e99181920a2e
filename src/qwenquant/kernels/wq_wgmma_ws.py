"""Built offline for sm_90a in session 12 (ptxas keeps one wgmma in flight, no serialization warning); first run on
an H100 in session 13: ``benchmarks/wgmma_smoke.py ws`` and the GPU tests in ``tests/test_wgmma_ws.py`` pass, and it
beats ``wq_wgmma``'s shipped 128×256 tile by 1–13 % at M >= 1024 on the Qwen3-8B shapes and is the fastest wgmma tile
there but for one cell (benchmarks/NOTES.md, session 13; slower below M = 512, where its one 128-row tile per program
leaves SMs idle). Offered to the tuner beside ``wq_wgmma`` (``runtime/fused.py``, kind ``wgmma_ws``).

``wq_wgmma``'s W4A16 (W2/W8) GEMM, warp-specialized: one producer warp issues every TMA copy — each k-tile's
[128, 32] weight words into a word ring, then its x stages into the x ring — and the program's 8 warps (two
warpgroups of 64 weight rows) only dequantize and issue wgmma.

Why. In ``wq_wgmma`` the 8 warps refill the x ring themselves: per refill an explicit CTA barrier (both
warpgroups must have retired the stage) plus the barriers Triton puts around each TMA copy, all on the path between
one slice's wgmma and the next slice's dequantization; cutting them paid directly (benchmarks/NOTES.md, session 12
item 4: +3–20 % from one 3-D copy per stage). Here the consumers never copy: per x stage they wait on its ``ready``
mbarrier and, once their wgmmas retired the previous stage, arrive once on its ``empty`` one; per k-tile the same
on the word ring. Gluon lowers each such wait / arrive in the 8-warp partition as one 256-thread named barrier;
the producer warp's copies get warp-level barriers only. The words come through shared memory, not registers:
``wq_wgmma`` prefetches them into registers one k-tile ahead (247 registers), and here the partition runs at 240.

Layouts that did not build (offline, ptxas; benchmarks/NOTES.md session 12 item 10): each consumer warpgroup as its
own 4-warp partition — ptxas serialized the wgmmas (C7512 / C7515), even for a trivial A operand, whenever a wgmma
ran in a worker partition.

Tile: 128 weight rows × BM rows of x (wgmma's N <= 256), all of K; one tile per program, or persistent (session 15:
one program per SM walks tiles and its rings run on across them, so the next tile's copies go out during the store;
+0-3 % at M >= 1024 on the Qwen3-8B shapes, ``results/wgmma_ws_persistent_h100.json``). ncu at gate_up M = 2048
(``results/ncu_ws_b1_h100.csv``): 81 % SM throughput against cuBLAS's 92 %, the top stalls the 256-thread barriers
around the ring waits / releases and dispatch. Dequantization, x ring
layout (3-D copies) and scales a k-tile ahead are ``wq_wgmma``'s. Registers: 9 warps launch as 3 warpgroups at
168 per thread; ``setmaxnreg`` leaves the producer's warpgroup 24 and gives the consumers 240.

Reference: ``wq_matmul.reference_matmul`` on the checkpoint tensors, as for ``wq_wgmma``.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from qwenquant.kernels import wq_wgmma as W
from qwenquant.kernels.launch import launch_kernel
from qwenquant.kernels.tiles import sm_count
from qwenquant.numerics.ktiled import SUB

if W.GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# (bm, x stages, slices per stage, programs per SM) offered to callers; shared memory = x ring stages·sps·bm·64 + word
# ring WSTAGES·16 KB + the epilogue's layout shuffle. Programs per SM 0: one output tile per program; 1: persistent,
# one program per SM walks tiles (its next tile's copies go out while it stores the last one: +0-3 % at M >= 1024
# on the Qwen3-8B shapes, session 15; the 3-stage persistent tile won no shape there and is not offered)
CONFIGS = ((256, 3, 2, 0), (256, 4, 2, 0), (128, 4, 2, 0), (256, 4, 2, 1))
BN = 128  # weight rows per program: two consumer warpgroups × 64
WSTAGES = 2  # [128, 32] int32 word tiles in flight (16 KB each)
MAXNREG = 168  # 3 warpgroups × 128 threads × 168 <= 65536 registers at launch
SMEM_BYTES = 227 * 1024
# the persistent grid's tile order: 0 walks x-row tiles fastest over all of M, as the one-tile-per-program grid; G > 0
# lets groups of G x-row tiles sweep the weight-row tiles together (fewer distinct operand blocks in L2 at once).
# Measured on an H100 (benchmarks/NOTES.md, session 15): G = 8 against 0 within ±1.5 % at M = 256-8192, no
# consistent sign, so the simpler order is the default
RASTER_M = 0

if W.GLUON:

    @gluon.jit
    def _tile_origin(tile, M, N, BM: gl.constexpr, ROWS: gl.constexpr, GM: gl.constexpr):
        """(first x row, first weight row) of output tile ``tile``. GM = 0: x-row tiles fastest over all of M (the
        one-tile-per-program grid); GM > 0: groups of GM x-row tiles sweep the weight-row tiles together
        (``tiles.grouped_tile``'s order), so the tiles in flight at once share few operand blocks in L2."""
        num_m = gl.cdiv(M, BM)
        if GM == 0:
            pid_m = tile % num_m
            pid_n = tile // num_m
        else:
            per_group = GM * gl.cdiv(N, ROWS)
            first_m = (tile // per_group) * GM
            gm = gl.minimum(num_m - first_m, GM)
            pid_m = first_m + (tile % per_group) % gm
            pid_n = (tile % per_group) // gm
        return pid_m * BM, pid_n * ROWS

    @gluon.jit
    def _producer(x_desc, w_desc, xs, ws, ready, empty, wready, wempty, M, N, K, BITS: gl.constexpr,
                  STAGES: gl.constexpr, SPS: gl.constexpr, GM: gl.constexpr):
        """One warp, for each of the program's tiles in k-tile order: the k-tile's [128, 32] words into word slot
        g % WSTAGES (g: k-tiles this program has issued, over all its tiles), then its x stages into the x ring,
        each copy once the consumers released the slot's previous contents (``wempty`` / ``empty``; a fresh
        mbarrier's parity-1 wait returns at once, so the first round goes out unasked). Across tiles the rings run
        on: the next tile's first copies go out while the consumers store the last one. The consumers read the
        words with ordinary shared loads, so a proxy fence orders those reads before the TMA overwrites the slot."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        SUBK: gl.constexpr = x_desc.block_type.shape[-1]
        ROWS: gl.constexpr = w_desc.block_type.shape[0]
        CPW: gl.constexpr = 32 // BITS
        STAGE_BYTES: gl.constexpr = W._stage_bytes(x_desc, SPS)
        NWS: gl.constexpr = ws.shape[0]
        n_kt = K // (CPW * SUBK)
        num_tiles = gl.cdiv(M, BM) * gl.cdiv(N, ROWS)
        g = 0  # k-tiles issued by this program so far
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            off_m, n0 = _tile_origin(tile, M, N, BM, ROWS, GM)
            for b in range(n_kt):
                wslot = g % NWS
                mbarrier.wait(wempty.index(wslot), ((g // NWS) & 1) ^ 1)
                fence_async_shared()
                mbarrier.expect(wready.index(wslot), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [n0, b * SUBK], wready.index(wslot), ws.index(wslot))
                for u in gl.static_range(CPW // SPS):
                    s = g * (CPW // SPS) + u
                    slot = s % STAGES
                    mbarrier.wait(empty.index(slot), ((s // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(slot), STAGE_BYTES)
                    W._load_stage(x_desc, ready.index(slot), xs, slot, off_m, (b * (CPW // SPS) + u) * SPS * SUBK,
                                  True, SPS)
                g += 1

    @gluon.jit
    def _consumer(x_desc, sz_ptr, y_ptr, M, N, K, xs, ws, ready, empty, wready, wempty, BITS: gl.constexpr,
                  GROUP: gl.constexpr, STAGES: gl.constexpr, SPS: gl.constexpr, LOP3: gl.constexpr, GM: gl.constexpr):
        """The program's 8 warps, for each of its tiles: 128 weight rows over all of K, then stored.
        ``wq_wgmma._mma_k_span``'s loop without the refills: per k-tile the words from the word ring (then
        released), per x stage a wait on ``ready`` before its first slice, and the previous stage released on
        ``empty`` once the wgmmas retired it (``wgmma_wait(1)`` in both warpgroups: Gluon puts a 256-thread barrier
        before the arrive); a tile's last stage is released once its last wgmma retired, before the store, so the
        producer fills the whole ring for the next tile meanwhile. Ring slots and phases count k-tiles (g) and
        stages (st) over all of the program's tiles, as the producer does."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        SUBK: gl.constexpr = x_desc.block_type.shape[-1]
        DTYPE: gl.constexpr = x_desc.dtype
        CPW: gl.constexpr = 32 // BITS
        T: gl.constexpr = CPW * SUBK
        ROWS: gl.constexpr = ws.shape[1]
        NWS: gl.constexpr = ws.shape[0]
        acc_layout: gl.constexpr = W._acc_layout(BM, gl.num_warps())
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        rows_a: gl.constexpr = gl.SliceLayout(1, a_layout)
        GSTEP: gl.constexpr = GROUP if GROUP < T else T  # columns between scale groups within a k-tile

        n_kt = K // T
        num_tiles = gl.cdiv(M, BM) * gl.cdiv(N, ROWS)
        a_prev = gl.zeros([ROWS, SUBK], DTYPE, a_layout)  # the A operand of the wgmma in flight (kept alive)
        zr = gl.zeros([ROWS], gl.float32, rows_a)
        sr = gl.zeros([ROWS], gl.float32, rows_a)
        g = 0  # k-tiles consumed by this program so far
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            off_m, n0 = _tile_origin(tile, M, N, BM, ROWS, GM)
            rn = n0 + gl.arange(0, ROWS, layout=rows_a)
            rn_c = gl.where(rn < N, rn, 0)  # rows past N: their words arrive as zeros, their outputs are not stored
            acc = gl.zeros([ROWS, BM], gl.float32, acc_layout)
            sz_next = W._load_groups(sz_ptr, N, rn_c, 0, True, T // GSTEP, GSTEP, GROUP)
            for b in range(n_kt):
                wslot = g % NWS
                mbarrier.wait(wready.index(wslot), (g // NWS) & 1)
                words = ws.index(wslot).load(a_layout)  # [128, 32] int32 straight into the wgmma A layout
                mbarrier.arrive(wempty.index(wslot))
                szs = sz_next
                sz_next = W._load_groups(sz_ptr, N, rn_c, (b + 1) * T, b + 1 < n_kt, T // GSTEP, GSTEP, GROUP)
                for t in gl.static_range(CPW):
                    sr, zr = W._slice_scales(szs, sr, zr, t, SUBK, GSTEP)
                    # fields ending above bit 23 come from words >> 16, shifted per slice: a shifted copy kept for
                    # the whole k-tile would cost 16 registers more than the partition's 240
                    a = W._dequant_slice(words, words >> 16, zr, sr, t, BITS, DTYPE, LOP3)
                    st = (g * CPW + t) // SPS  # x stage of this slice, counted over the program's tiles
                    slot = st % STAGES
                    if t % SPS == 0:
                        mbarrier.wait(ready.index(slot), (st // STAGES) & 1)
                    acc = warpgroup_mma(a, xs.index(slot * SPS + t % SPS).permute((1, 0)), acc, is_async=True)
                    acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
                    a_prev = a
                    if t % SPS == 0:  # the last wgmma on stage st-1 has retired (both warpgroups): release its slot
                        mbarrier.arrive(empty.index((st + STAGES - 1) % STAGES), pred=b * CPW + t > 0)
                g += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(((g * CPW) // SPS - 1) % STAGES))  # the tile's last stage
            W._store_tile(acc, y_ptr, M, N, off_m, n0, ROWS, BM)

    @gluon.jit
    def _wgmma_ws_kernel(x_desc, w_desc, sz_ptr, y_ptr, M, N, K, BITS: gl.constexpr, GROUP: gl.constexpr,
                         STAGES: gl.constexpr, SPS: gl.constexpr, NWS: gl.constexpr, LOP3: gl.constexpr,
                         GM: gl.constexpr):
        """[128, BM] output tiles tile = program, program + programs, … (one per program when the grid has a
        program per tile; ``_tile_origin`` maps them with GM): the consumers are the default partition (this
        kernel's 8 warps), the producer a 1-warp worker partition."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        SUBK: gl.constexpr = x_desc.block_type.shape[-1]
        xs = gl.allocate_shared_memory(x_desc.dtype, [STAGES * SPS, BM, SUBK], W._slice_layout(BM, SUBK, x_desc.dtype))
        ws = gl.allocate_shared_memory(gl.int32, [NWS] + w_desc.block_type.shape, w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        wready = gl.allocate_shared_memory(gl.int64, [NWS, 1], mbarrier.MBarrierLayout())
        wempty = gl.allocate_shared_memory(gl.int64, [NWS, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        for s in gl.static_range(NWS):
            mbarrier.init(wready.index(s), count=1)
            mbarrier.init(wempty.index(s), count=1)
        gl.warp_specialize([
            (_consumer, (x_desc, sz_ptr, y_ptr, M, N, K, xs, ws, ready, empty, wready, wempty, BITS, GROUP, STAGES, SPS,
                         LOP3, GM)),
            (_producer, (x_desc, w_desc, xs, ws, ready, empty, wready, wempty, M, N, K, BITS, STAGES, SPS, GM)),
        ], [1], [24])  # the producer warp's registers per thread; the consumers take the rest (240)


def check_config(bits: int, bm: int, stages: int, sps: int, programs_per_sm: int = 0) -> None:
    """Refuse a tile this kernel cannot build, naming the value and what was expected."""
    cpw = 32 // bits if bits in (2, 4, 8) else None
    if (cpw is None or bm not in (64, 128, 192, 256) or stages < 2 or sps < 1 or cpw % sps
            or programs_per_sm not in (0, 1)
            or stages * sps * bm * SUB * 2 + WSTAGES * BN * SUB * 4 + BN * bm * 2 > SMEM_BYTES):
        raise ValueError(f"wgmma_ws_gemm: bits={bits}, bm={bm}, stages={stages}, sps={sps}, programs_per_sm="
                         f"{programs_per_sm}: expected bits in 2/4/8, bm in 64/128/192/256, stages >= 2, sps dividing "
                         f"{cpw} (32-column slices per {bits}-bit k-tile), programs_per_sm 0 (a program per tile) or 1 "
                         f"(persistent; shared memory holds one program per SM) and the x ring, the word ring and the "
                         f"epilogue tile (stages·sps·bm·64 + {WSTAGES * BN * SUB * 4} + 256·bm bytes) within {SMEM_BYTES}")


def _w_descriptor(words: Tensor):
    """TMA descriptor of the k-tiled words int32 [N, K/CPW] read in [128, 32] boxes — one k-tile of a program's
    rows (rows past N arrive as zeros)."""
    layout = W.nvmma_layout((BN, SUB), torch.int32)
    return TensorDescriptor(words, list(words.shape), [words.shape[1], 1], [BN, SUB], layout)


def wgmma_ws_gemm(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bm: int = 256, stages: int = 3,
                  sps: int = 2, programs_per_sm: int = 0, lop3: bool = True, out: Tensor | None = None,
                  programs: int | None = None, group_m: int | None = None) -> Tensor:
    """y [M, N] = x2 [M, K] · Ŵᵀ from the k-tiled words — ``wq_wgmma.wgmma_gemm``'s operands and result — on the
    warp-specialized kernel (module docstring). ``programs_per_sm`` 0: a program per output tile; 1: persistent,
    one program per SM walking the tiles in ``RASTER_M``'s order. ``programs`` (persistent only): that grid instead
    (tests use small ones so each program walks many tiles); ``group_m``: the order's x-row tiles per group instead
    of ``RASTER_M`` (0: x-row tiles fastest over all of M; timing comparisons). ``out``: a contiguous [M, N] tensor of
    x's dtype to write into."""
    check_config(bits, bm, stages, sps, programs_per_sm)
    if programs is not None and (not programs_per_sm or programs < 1):
        raise ValueError(f"wgmma_ws_gemm: programs={programs} sets the persistent grid: it needs programs_per_sm=1 "
                         "and programs >= 1")
    W.check_operands(x2, words, sz, bits, group)
    m, k = x2.shape
    n = words.shape[0]
    y, x2 = W.result_and_tma_x(x2, n, bm, out, "wgmma_ws_gemm")
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, BN)
    grid = min(tiles, programs or sm_count(x2.device)) if programs_per_sm else tiles
    gm = (RASTER_M if programs_per_sm else 0) if group_m is None else group_m
    launch_kernel(_wgmma_ws_kernel, (grid, ), (W._x_descriptor(x2, bm, sps), _w_descriptor(words), sz, y, m, n, k),
                  BITS=bits, GROUP=group, STAGES=stages, SPS=sps, NWS=WSTAGES, LOP3=lop3, GM=gm, num_warps=8,
                  maxnreg=MAXNREG)
    return y


def compile_for_sm90(bits: int, group: int, config: tuple = CONFIGS[0], dtype: torch.dtype = torch.bfloat16,
                     m: int = 4096, n: int = 4096, k: int = 4096, lop3: bool = True):
    """Compile for an H100 (sm_90a) on any machine, as ``wq_wgmma.compile_for_sm90`` does; returns the compiled
    kernel (``.asm['ptx' | 'cubin']``, ``.metadata.shared``)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    if not W.GLUON:
        raise RuntimeError("Gluon is not available in this Triton: the wgmma kernel cannot be built")
    bm, stages, sps, programs_per_sm = config
    check_config(bits, bm, stages, sps, programs_per_sm)
    xdesc = W._x_descriptor(torch.empty(bm, k, dtype=dtype), bm, sps)
    wdesc = _w_descriptor(torch.empty(n, k * bits // 32, dtype=torch.int32))
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    sig = {"x_desc": mangle_type(xdesc), "w_desc": mangle_type(wdesc), "sz_ptr": "*i32", "y_ptr": ptr, "M": "i32",
           "N": "i32", "K": "i32", "BITS": "constexpr", "GROUP": "constexpr", "STAGES": "constexpr",
           "SPS": "constexpr", "NWS": "constexpr", "LOP3": "constexpr", "GM": "constexpr"}
    consts = {"BITS": bits, "GROUP": group, "STAGES": stages, "SPS": sps, "NWS": WSTAGES, "LOP3": lop3,
              "GM": RASTER_M if programs_per_sm else 0}
    names = list(sig)
    aligned = ["sz_ptr", "y_ptr"] + [a for a, v in (("M", m), ("N", n), ("K", k)) if v % 16 == 0]
    attrs = {(names.index(a), ): [["tt.divisibility", 16]] for a in aligned}
    src = GluonASTSource(_wgmma_ws_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "maxnreg": MAXNREG})
