"""SKETCH, NOT A USABLE KERNEL — kept out of ``src/`` and never imported by the library or the tests.

Status (session 12, offline only, benchmarks/NOTES.md session 12 item 10): it builds for sm_90a, but ptxas
serializes its wgmmas — every ``wgmma.wait_group 1`` becomes ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` (C7515: "non wgmma
instructions defining accumulator registers … between start and end of the pipeline stage"), even with one
consumer partition — so it would run the dequantization and the MMA in turns, the very thing ``wq_wgmma``
exists to avoid. Not run on a GPU. Check it offline with

    PYTHONPATH=src python3 -c "import sys; sys.path.insert(0, 'benchmarks/sketches'); import wgmma_ws as S; \
        c = S.compile_for_sm90(4, 128); print(c.asm['ptx'].count('wgmma.wait_group.sync.aligned 1'))"

and ptxas -v on the PTX (``benchmarks/sass_wgmma.py`` shows how) for C75xx lines and DEPBAR 0x1 in the SASS.

The W4A16 (W2/W8) wgmma GEMM of ``wq_wgmma`` with warp specialization: a producer warp that only issues the TMA
copies (x stages, and the weight words of each k-tile into a ring of their own), and two consumer warpgroups, each its own partition, that only dequantize and issue wgmma.

Why. In ``wq_wgmma`` the same 8 warps refill the x ring: every refill is an explicit CTA barrier (both warpgroups
must have retired the stage) plus the barriers Triton puts around each TMA copy, all on the path between one
slice's wgmma and the next slice's dequantization. Cutting those barriers paid directly (benchmarks/NOTES.md,
session 12 item 4: one 3-D copy per stage instead of SPS 2-D ones, 16 → 12 barriers per k-tile, +3–9 %; 12 → 6,
+10–20 %). Here a consumer never issues a copy: per ring stage it waits for the stage's ``ready`` mbarrier and,
once its wgmma has retired the previous stage, arrives once on that stage's ``empty`` mbarrier (count 2: one
arrival per consumer warpgroup). Gluon lowers a partition's ``mbarrier.arrive`` / ``wait`` with a named barrier
over the partition's own warps only — one warpgroup, which its ``.sync.aligned`` wgmmas keep together anyway
(checked on a toy kernel: an 8-warp partition would get a 256-thread barrier there, hence two 4-warp partitions).
The producer warp waits on ``empty`` and refills; its TMA barriers are ``bar.warp.sync``.

Tile: 128 weight rows (64 per consumer warpgroup) × BM rows of x (wgmma's N, <= 256), one tile per program; the
ring, dequantization and layout are ``wq_wgmma``'s (scales one k-tile ahead, one 3-D TMA copy per stage, one-LOP3
field extraction). Registers: the kernel launches 3 warpgroups at 168 registers per thread; ``setmaxnreg`` gives
the producer's warpgroup 24 and each consumer at most (168·3 − 24) / 2 = 240. With the words prefetched in registers
(as ``wq_wgmma`` does, 247 registers there) ptxas serialized the wgmmas for lack of registers (C7512); with the
words from shared memory it serializes them for C7515 instead (status above) — the next thing to bisect.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from qwenquant.kernels import wq_wgmma as W
from qwenquant.numerics.ktiled import SUB

if W.GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# (bm, stages, slices per stage): the x ring is stages·sps·bm·64 bytes; each consumer's epilogue shuffle needs
# 64·bm·2 bytes of its own beside it
CONFIGS = ((256, 3, 2), (128, 4, 2), (256, 4, 2))
WSTAGES = 2  # [128, 32] int32 word tiles in flight (16 KB each)
BN = 128  # two consumer warpgroups × 64 weight rows
MAXNREG = 168  # 3 warpgroups × 128 threads × 168 <= 65536 registers at launch
CONSUMER_REGS, PRODUCER_REGS = 240, 24

if W.GLUON:

    @gluon.jit
    def _producer(x_desc, w_desc, xs, ws, ready, empty, wready, wempty, M, K, BITS: gl.constexpr,
                  STAGES: gl.constexpr, SPS: gl.constexpr):
        """One warp, in k-tile order: the tile's [128, 32] weight words into word slot b % WSTAGES, then the k-tile's
        x stages into the x ring, each copy once both consumers released the slot's previous contents (``empty`` /
        ``wempty``; a fresh barrier's parity-1 wait returns at once, so the first round goes out unasked). The
        consumers read the words with ordinary shared loads: a proxy fence orders those reads before the TMA
        overwrite."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        SUBK: gl.constexpr = x_desc.block_type.shape[-1]
        CPW: gl.constexpr = 32 // BITS
        STAGE_BYTES: gl.constexpr = SPS * BM * SUBK * x_desc.dtype.primitive_bitwidth // 8
        WSTAGES: gl.constexpr = ws.shape[0]
        pid = gl.program_id(0)
        num_m = gl.cdiv(M, BM)
        off_m = (pid % num_m) * BM
        n0 = (pid // num_m) * w_desc.block_type.shape[0]
        n_kt = K // (CPW * SUBK)
        for b in range(n_kt):
            wslot = b % WSTAGES
            mbarrier.wait(wempty.index(wslot), ((b // WSTAGES) & 1) ^ 1)
            fence_async_shared()
            mbarrier.expect(wready.index(wslot), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [n0, b * SUBK], wready.index(wslot), ws.index(wslot))
            for u in gl.static_range(CPW // SPS):
                s = b * (CPW // SPS) + u
                slot = s % STAGES
                mbarrier.wait(empty.index(slot), ((s // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), STAGE_BYTES)
                W._load_stage(x_desc, ready.index(slot), xs, slot, off_m, s * SPS * SUBK, True, SPS)

    @gluon.jit
    def _consumer(x_desc, sz_ptr, y_ptr, M, N, K, xs, ws, ready, empty, wready, wempty, WG: gl.constexpr,
                  BITS: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, SPS: gl.constexpr, LOP3: gl.constexpr):
        """One warpgroup: weight rows n0 + 64·WG … of the program's tile over all of K, then stored. The loop is
        ``wq_wgmma._mma_k_span``'s without the refills: each k-tile's words come from the word ring (its 64 rows of
        the producer's [128, 32] tile, loaded once ``wready`` says they landed, then released on ``wempty``); wait for
        an x stage's ``ready`` before its first slice, and release the previous stage on ``empty`` once this
        warpgroup's wgmma has retired it."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        SUBK: gl.constexpr = x_desc.block_type.shape[-1]
        DTYPE: gl.constexpr = x_desc.dtype
        CPW: gl.constexpr = 32 // BITS
        T: gl.constexpr = CPW * SUBK
        ROWS: gl.constexpr = 64
        acc_layout: gl.constexpr = W._acc_layout(BM, 4)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        rows_a: gl.constexpr = gl.SliceLayout(1, a_layout)
        GSTEP: gl.constexpr = GROUP if GROUP < T else T

        pid = gl.program_id(0)
        num_m = gl.cdiv(M, BM)
        off_m = (pid % num_m) * BM
        n0 = (pid // num_m) * (2 * ROWS) + WG * ROWS
        n_kt = K // T
        WSTAGES: gl.constexpr = ws.shape[0]
        rn = n0 + gl.arange(0, ROWS, layout=rows_a)
        rn_c = gl.where(rn < N, rn, 0)

        acc = gl.zeros([ROWS, BM], gl.float32, acc_layout)
        a_prev = gl.zeros([ROWS, SUBK], DTYPE, a_layout)
        sz_next = W._load_groups(sz_ptr, N, rn_c, 0, True, T // GSTEP, GSTEP, GROUP)
        zr = gl.zeros([ROWS], gl.float32, rows_a)
        sr = gl.zeros([ROWS], gl.float32, rows_a)
        for b in range(n_kt):
            wslot = b % WSTAGES
            mbarrier.wait(wready.index(wslot), (b // WSTAGES) & 1)
            words = ws.index(wslot).slice(WG * ROWS, ROWS).load(a_layout)  # [64, 32] int32, this warpgroup's rows
            mbarrier.arrive(wempty.index(wslot))
            szs = sz_next
            sz_next = W._load_groups(sz_ptr, N, rn_c, (b + 1) * T, b + 1 < n_kt, T // GSTEP, GSTEP, GROUP)
            for t in gl.static_range(CPW):
                if (t * SUBK) % GSTEP == 0:
                    sz = szs[(t * SUBK) // GSTEP]
                    sr = (sz >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
                    zr = (sz & 0xFFFF).to(gl.float32)
                # fields ending above bit 23 come from words >> 16, shifted per slice: a [64, 32] copy of the
                # shifted words kept for the whole k-tile would cost 16 registers the consumers do not have
                a = W._dequant_slice(words, words >> 16, zr, sr, t, BITS, DTYPE, LOP3)
                st = (b * CPW + t) // SPS
                slot = st % STAGES
                if t % SPS == 0:
                    mbarrier.wait(ready.index(slot), (st // STAGES) & 1)
                acc = warpgroup_mma(a, xs.index(slot * SPS + t % SPS).permute((1, 0)), acc, is_async=True)
                acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
                a_prev = a
                if t % SPS == 0:  # this warpgroup's last wgmma on stage st-1 has retired: release its slot
                    mbarrier.arrive(empty.index((st + STAGES - 1) % STAGES), pred=st > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        W._store_tile(acc, y_ptr, M, N, off_m, n0, ROWS, BM)

    @gluon.jit
    def _wgmma_ws_kernel(x_desc, w_desc, sz_ptr, y_ptr, M, N, K, BITS: gl.constexpr, GROUP: gl.constexpr,
                         STAGES: gl.constexpr, SPS: gl.constexpr, WSTAGES: gl.constexpr, LOP3: gl.constexpr):
        """One 128-row output tile per program: consumer warpgroup 0 (the default partition, this kernel's 4
        warps), consumer warpgroup 1 and the producer warp (worker partitions)."""
        BM: gl.constexpr = x_desc.block_type.shape[-2]
        SUBK: gl.constexpr = x_desc.block_type.shape[-1]
        xs = gl.allocate_shared_memory(x_desc.dtype, [STAGES * SPS, BM, SUBK], W._slice_layout(BM, SUBK, x_desc.dtype))
        ws = gl.allocate_shared_memory(gl.int32, [WSTAGES] + w_desc.block_type.shape, w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        wready = gl.allocate_shared_memory(gl.int64, [WSTAGES, 1], mbarrier.MBarrierLayout())
        wempty = gl.allocate_shared_memory(gl.int64, [WSTAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # one arrival per consumer warpgroup
        for s in gl.static_range(WSTAGES):
            mbarrier.init(wready.index(s), count=1)
            mbarrier.init(wempty.index(s), count=2)
        gl.warp_specialize([
            (_consumer, (x_desc, sz_ptr, y_ptr, M, N, K, xs, ws, ready, empty, wready, wempty, 0, BITS, GROUP, STAGES,
                         SPS, LOP3)),
            (_consumer, (x_desc, sz_ptr, y_ptr, M, N, K, xs, ws, ready, empty, wready, wempty, 1, BITS, GROUP, STAGES,
                         SPS, LOP3)),
            (_producer, (x_desc, w_desc, xs, ws, ready, empty, wready, wempty, M, K, BITS, STAGES, SPS)),
        ], [4, 1], [232, 24])  # registers per thread: the second consumer, the producer (the default takes the rest)


def check_config(bits: int, bm: int, stages: int, sps: int) -> None:
    """Refuse a tile this kernel cannot build, naming the value and what was expected."""
    cpw = 32 // bits if bits in (2, 4, 8) else None
    if (cpw is None or bm not in (64, 128, 192, 256) or stages < 2 or sps < 1 or cpw % sps
            or stages * sps * bm * SUB * 2 + WSTAGES * BN * 128 + 2 * 64 * bm * 2 > 227 * 1024):
        raise ValueError(f"wgmma_ws_gemm: bits={bits}, bm={bm}, stages={stages}, sps={sps}: expected bits in 2/4/8, bm in "
                         f"64/128/192/256, stages >= 2, sps dividing {cpw} and the x ring, the word ring and two epilogue "
                         f"tiles (stages·sps·bm·64 + {WSTAGES * BN * 128} + 256·bm bytes) within 227 KB")


def _w_descriptor(words: Tensor):
    """TMA descriptor of the k-tiled words int32 [N, K/CPW], read in [128, 32] boxes (one k-tile of a tile's rows;
    rows past N arrive as zeros)."""
    layout = gl.NVMMASharedLayout.get_default_for([BN, SUB], gl.int32)
    return TensorDescriptor(words, list(words.shape), [words.shape[1], 1], [BN, SUB], layout)


def wgmma_ws_gemm(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bm: int = 256, stages: int = 4,
                  sps: int = 2, lop3: bool = True, out: Tensor | None = None) -> Tensor:
    """y [M, N] = x2 [M, K] · Ŵᵀ from the k-tiled words (``wq_wgmma.wgmma_gemm``'s operands and result), on the
    warp-specialized kernel (module docstring). ``out``: a contiguous [M, N] result tensor to write into."""
    check_config(bits, bm, stages, sps)
    W.check_operands(x2, words, sz, bits, group)
    m, k = x2.shape
    n = words.shape[0]
    if out is not None and (out.shape != (m, n) or out.dtype != x2.dtype or out.device != x2.device
                            or not out.is_contiguous()):
        raise ValueError(f"wgmma_ws_gemm: out {out.dtype} {tuple(out.shape)} on {out.device}: expected a contiguous "
                         f"{x2.dtype} [{m}, {n}] tensor on {x2.device}")
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype) if out is None else out
    if m < bm:  # TMA boxes no taller than the tensor: zero rows, their outputs not stored
        x2 = torch.cat([x2, x2.new_zeros(bm - m, k)])
    elif x2.data_ptr() % 16:
        x2 = x2.clone()
    x_desc = W._x_descriptor(x2, bm, sps)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, BN), )
    _wgmma_ws_kernel[grid](x_desc, _w_descriptor(words), sz, y, m, n, k, BITS=bits, GROUP=group, STAGES=stages,
                           SPS=sps, WSTAGES=WSTAGES, LOP3=lop3, num_warps=4, maxnreg=MAXNREG)
    return y


def compile_for_sm90(bits: int, group: int, config: tuple = CONFIGS[0], dtype: torch.dtype = torch.bfloat16,
                     m: int = 4096, n: int = 4096, k: int = 4096, lop3: bool = True):
    """Compile for an H100 (sm_90a) on any machine (``wq_wgmma.compile_for_sm90``'s way): the compiled kernel,
    ``.asm['ptx' | 'cubin']`` — what the CPU tests and ``benchmarks/sass_wgmma.py ws`` read."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    if not W.GLUON:
        raise RuntimeError("Gluon is not available in this Triton: the wgmma kernel cannot be built")
    bm, stages, sps = config
    check_config(bits, bm, stages, sps)
    desc = W._x_descriptor(torch.empty(bm, k, dtype=dtype), bm, sps)
    wdesc = _w_descriptor(torch.empty(n, k * bits // 32, dtype=torch.int32))
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    sig = {"x_desc": mangle_type(desc), "w_desc": mangle_type(wdesc), "sz_ptr": "*i32", "y_ptr": ptr, "M": "i32",
           "N": "i32", "K": "i32", "BITS": "constexpr", "GROUP": "constexpr", "STAGES": "constexpr",
           "SPS": "constexpr", "WSTAGES": "constexpr", "LOP3": "constexpr"}
    consts = {"BITS": bits, "GROUP": group, "STAGES": stages, "SPS": sps, "WSTAGES": WSTAGES, "LOP3": lop3}
    names = list(sig)
    aligned = ["sz_ptr", "y_ptr"] + [a for a, v in (("M", m), ("N", n), ("K", k)) if v % 16 == 0]
    attrs = {(names.index(a), ): [["tt.divisibility", 16]] for a in aligned}
    src = GluonASTSource(_wgmma_ws_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": MAXNREG})
