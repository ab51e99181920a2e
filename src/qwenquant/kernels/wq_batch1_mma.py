"""Batch-1 (M <= 8) W4A16 for Hopper in Gluon: each word's fields land straight in the MMA operand registers.

Why. ``wq_batch1`` (Triton) is latency-bound at decode: ≈ 12 warps per SM and 3.84 SASS instructions per weight
(offline sm_90a, the gate_up tile), of which the dequantization proper (PRMT + LOP3 + one paired add per two weights)
is only 1.5; the rest is the shared-memory round trip of the words (cp.async, LDS into the dot layout), the address
arithmetic around it and per-step bookkeeping (benchmarks/NOTES.md, sessions 23-25: every Triton-level lever on it —
register cap, zero after the MMA, smaller tiles, stages, persistence, TMA — was measured and lost). Triton chooses the
dot operand's register layout itself; Gluon lets the kernel name it, so the words can be loaded from global memory
directly into the registers that become the MMA's A operand, with no shared memory and no shuffle.

The K permutation. An MMA sums over K in any order as long as both operands agree. In the k-tiled layout
(``numerics.ktiled``) word j of k-tile b holds columns b·256 + t·32 + j, t = 0 … 7 (4-bit). The A operand of
``mma_v2`` with ``k_width = 4`` gives each thread 4 consecutive *logical* K values per 16 (lanes c = 0 … 3 take
4c … 4c + 3, registers step i = 0 … 7 take 16 i more). Define, per k-tile half H (fields 4H … 4H + 3, i.e. columns
H·128 … H·128 + 127 — one scale group for any group that is a multiple of 128):

    logical K = e + 4c + 16 i   <->   column (4H + e)·32 + 8c + i   (e = 0 … 3)

so the four values a thread holds for (row, c, i) are fields 4H … 4H + 3 of *one* word, j = 8c + i: each thread
loads words 8c … 8c + 7 of its rows (two 16-byte loads per row and k-tile) and unpacks them in place. x is loaded
with the same permutation (16-byte loads along i, then a register repack into pairs along e). The layouts are
written out as linear layouts and every conversion between them is checked to move no data (``assert_trivial``) at
compile time.

A second scheme (``pairs``, ``k_width = 2``): logical K = b + 2c + 8d + 16t + 32u <-> column (4H + 2t + d)·32 + 8c +
2u + b, so a register pair is one field of two adjacent words (PRMT of the two words) and x's pairs are adjacent
columns, loaded as 32-bit words and turned into the B operand only in the step that uses them (carried across the
loop as 16-bit values they were re-packed by ≈ 40 half-word PRMTs per step). The k_width-4 scheme keeps ≈ 66 such
PRMTs per step: its x pairs are two columns 32 apart. Columns of x past M read row M - 1 (their results are never
stored): no masks in the loop.

Unpacking (exact small integers, as ``wq_batch1``; the scale is applied after the MMA, per group and row):
bf16 — PRMT puts byte b of w and of w >> 4 in the two halves, LOP3 keeps each low nibble | the exponent of 128, one
bf16x2 add of -(128 + zero): 3 instructions per two weights plus one shift per word. fp16 — no shift: PRMT puts byte
b in both halves, LOP3 keeps the low nibble of half 0 and the high nibble of half 1 (1024 + f, 1024 + 16 f: fp16's 10
mantissa bits hold both, bf16's 7 do not), one f16x2 FMA by (1, 1/16) plus (-(1024 + zero), -(64 + zero)).

Program: BN weight rows (16 per MMA row tile) × W warps; warp w takes k-tiles w, w + W, … (the mma layout's batch
dimension is the k-tile, so each warp runs its own MMA chain), the next step's words, x and scales loaded before
this step's arithmetic, and the W partial sums meet once at the end (a cross-warp reduction through
shared memory). Offline sm_90a (``compile_for_sm90``, bf16, the K loop per step and thread): BN 16 × 4 warps holds 128
registers (four programs, 16 warps per SM), pairs 369 SASS per 128 weights = 2.88 per weight (k_width 4: 403, 3.15);
BN 32 × 4 warps 167-168 registers, pairs 672 per 256 = 2.63 (k_width 4: 712, 2.78). ``wq_batch1``'s bn32 kb4 tile:
3.84, 166 registers, three programs.

Requirements: an sm_90 GPU with Gluon; 4-bit k-tiled words, group a multiple of 128; x bf16/fp16 with 1 to 8 rows;
N a multiple of BN; K a multiple of 256·W. Reference: ``wq_matmul.reference_matmul`` on the checkpoint tensors.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from qwenquant.kernels.launch import launch_kernel
from qwenquant.kernels.overlap import pdl_ok
from qwenquant.kernels.tiles import result_tensor
from qwenquant.kernels.wq_batch1 import check_norm
from qwenquant.kernels.wq_ktiled import _check_operands

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    GLUON = True
except ImportError:  # pragma: no cover
    GLUON = False

MAX_M = 8  # rows of x: the MMA's N
BITS = 4
TILE = 256  # columns per k-tile (4-bit)
# (bn, warps, pairs) offered for timing; the first is the default. pairs: the k_width-2 scheme
# (``_unpack_half_pairs``: a register pair is one field of two adjacent words, x loaded as it sits)
CONFIGS = ((16, 4, True), (32, 4, True), (16, 4, False), (32, 4, False), (16, 8, True))


def mma_ok(device: torch.device | str, bits: int, group: int, m: int, n: int, k: int, bn: int = 16,
           warps: int = 4) -> bool:
    """Whether ``batch1_mma_gemm`` can run this problem on ``device`` with this tile."""
    device = torch.device(device)
    if not GLUON or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    return (bits == BITS and group % 128 == 0 and k % group == 0 and 1 <= m <= MAX_M and n % bn == 0
            and k % (TILE * warps) == 0)


if GLUON:

    @gluon.constexpr_function
    def _layouts(W, BN, PAIRS=False):
        """The kernel's register layouts, as linear layouts (bases: which tensor index each register / lane / warp
        bit adds). mma: the [W, BN, 8] accumulator (warps over the k-tile batch); a / b: its operands, k_width 4;
        words_ld: [W, BN, 4 (c), 8 (i)] words as loaded (8 consecutive words per thread and row); words: [W, BN, 32]
        with l = c + 4 i, the registers in the order the A operand wants them; unpack: [W, BN, 32, 4 (e)] words ×
        fields; x_ld: [W, 4 (e), 4 (c), 8 (i), 8 (n)] x as loaded (8 consecutive columns per thread)."""
        mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
        a = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2 if PAIRS else 4)
        b = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2 if PAIRS else 4)
        row_bits = BN.bit_length() - 4  # row 8, 16, 32 … in registers (rows 1, 2, 4 are lanes)
        warps3 = [[1 << q, 0, 0] for q in range(W.bit_length() - 1)]
        words_ld = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]] + [[0, 8 << r, 0, 0] for r in range(row_bits)],
            lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]],
            warp_bases=[w + [0] for w in warps3], block_bases=[], shape=[W, BN, 4, 8])
        regs3 = [[0, 8, 0], [0, 0, 4], [0, 0, 8], [0, 0, 16]] + [[0, 8 << r, 0] for r in range(1, row_bits)]
        lanes3 = [[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
        words = gl.DistributedLinearLayout(reg_bases=regs3, lane_bases=lanes3, warp_bases=warps3, block_bases=[],
                                           shape=[W, BN, 32])
        unpack = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2]] + [r + [0] for r in regs3],
                                            lane_bases=[v + [0] for v in lanes3], warp_bases=[w + [0] for w in warps3],
                                            block_bases=[], shape=[W, BN, 32, 4])
        x_ld = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0]],
            lane_bases=[[0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 0, 4]],
            warp_bases=[w + [0, 0] for w in warps3], block_bases=[], shape=[W, 4, 4, 8, 8])
        return mma, a, b, words_ld, words, unpack, x_ld

    @gluon.constexpr_function
    def _unpack_asm(H, IS_BF16):
        """PTX for 4 values, fields 4H … 4H + 3 of one word (byte b = 2H, then 2H + 1; byte b holds fields 2b and
        2b + 1 in its low and high nibble) -> two 16-bit pairs of (code - zero).
        bf16: $2 = w, $6 = w >> 4, $10 = the row's (-(128 + zero)) pair. fp16: $2 = w, $6 / $7 = the constant pair
        (1, 1/16), $8 / $9 = the row's (-(1024 + zero), -(64 + zero)) pair."""
        if IS_BF16:
            s0, s1 = [b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12) for b in (2 * H, 2 * H + 1)]
            return (f"{{ .reg .b32 p, q; prmt.b32 p, $2, $6, {s0}; prmt.b32 q, $2, $6, {s1}; "
                    f"lop3.b32 p, p, {0x000F000F}, {0x43004300}, 0xEA; lop3.b32 q, q, {0x000F000F}, {0x43004300}, 0xEA; "
                    f"add.rn.bf16x2 $0, p, $10; add.rn.bf16x2 $1, q, $10; }}")
        s0, s1 = 2 * H * 0x1111, (2 * H + 1) * 0x1111
        return (f"{{ .reg .b32 p, q; prmt.b32 p, $2, 0, {s0}; prmt.b32 q, $2, 0, {s1}; "
                f"lop3.b32 p, p, {0x00F0000F}, {0x64006400}, 0xEA; lop3.b32 q, q, {0x00F0000F}, {0x64006400}, 0xEA; "
                f"fma.rn.f16x2 $0, p, $6, $8; fma.rn.f16x2 $1, q, $7, $9; }}")

    @gluon.jit
    def _unpack_half(words, zneg, zneg16, H: gl.constexpr, unpack: gl.constexpr, a_l: gl.constexpr,
                     IS_BF16: gl.constexpr):
        """Fields 4H … 4H + 3 of every word [W, BN, 32] -> the A operand [W, BN, 128] of (code - zero), logical K
        = 4 l + e. ``zneg`` / ``zneg16`` [W, BN]: -(magic + zero) and (fp16) -(magic / 16 + zero) per row."""
        W: gl.constexpr = words.shape[0]
        BN: gl.constexpr = words.shape[1]
        shape: gl.constexpr = [W, BN, 32, 4]
        S3: gl.constexpr = gl.SliceLayout(3, unpack)
        we = gl.expand_dims(gl.convert_layout(words, S3, assert_trivial=True), 3) + gl.zeros(shape, gl.int32, unpack)
        zlo = gl.expand_dims(gl.expand_dims(gl.convert_layout(zneg, gl.SliceLayout(2, S3)), 2), 3)
        ASM: gl.constexpr = _unpack_asm(H, IS_BF16)
        if IS_BF16:
            te = gl.expand_dims(gl.convert_layout(words >> 4, S3, assert_trivial=True), 3)
            we, te = gl.broadcast(we, te)
            we, ze = gl.broadcast(we, zlo)
            out = gl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r,r,r,r,r,r", [we, te, ze], dtype=ze.dtype,
                                            is_pure=True, pack=4)
        else:
            E: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, unpack)))
            odd = (gl.arange(0, 4, layout=E) % 2 == 1)[None, None, None, :]  # a byte's high nibble: 1024 + 16 f
            zhi = gl.expand_dims(gl.expand_dims(gl.convert_layout(zneg16, gl.SliceLayout(2, S3)), 2), 3)
            ze = gl.where(odd, zhi, zlo)
            te = gl.where(odd, gl.full(shape, 0.0625, zneg.dtype, unpack), gl.full(shape, 1.0, zneg.dtype, unpack))
            we, ze = gl.broadcast(we, ze)
            out = gl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r,r,r,r", [we, te, ze], dtype=ze.dtype,
                                            is_pure=True, pack=4)
        return gl.convert_layout(gl.reshape(out, [W, BN, 128]), a_l, assert_trivial=True)

    @gluon.jit
    def _x_rows(n, M):
        """The row of x each MMA column n reads: n, or M - 1 for the columns past M. Those columns' results are never
        stored, so they may hold anything finite — a copy of a real row is, and unmasked loads need no zero fill
        (16 CS2R per step) or predicates; a warp's lanes reading one address are served once."""
        return gl.minimum(n, M - 1)

    @gluon.jit
    def _load_x(x_ptr, M, stride_xm, kt, H: gl.constexpr, W: gl.constexpr, x_ld: gl.constexpr, b_l: gl.constexpr):
        """x's columns of half H of k-tiles kt + w (w = 0 … W-1) as the B operand [W, 128, 8]: logical K
        e + 4c + 16i is column (4H + e)·32 + 8c + i; rows of x at or past M are zeros (no load)."""
        L0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, x_ld))))
        L1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, x_ld))))
        L2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, x_ld))))
        L3: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, x_ld))))
        L4: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, x_ld))))
        bw = gl.arange(0, W, layout=L0)
        e = gl.arange(0, 4, layout=L1)
        c = gl.arange(0, 4, layout=L2)
        i = gl.arange(0, 8, layout=L3)
        n = _x_rows(gl.arange(0, 8, layout=L4), M)
        off = (((kt + bw) * 256)[:, None, None, None, None] + ((4 * H + e) * 32)[None, :, None, None, None]
               + (8 * c)[None, None, :, None, None] + i[None, None, None, :, None]
               + (n * stride_xm)[None, None, None, None, :])
        xv = gl.load(x_ptr + off)  # [W, e, c, i, n]; rows n >= M read row M - 1 (``_x_rows``): no mask
        xv = gl.permute(xv, (0, 3, 2, 1, 4))  # [W, i, c, e, n]: logical K = 16 i + 4 c + e
        return gl.convert_layout(gl.reshape(xv, [W, 128, 8]), b_l)

    @gluon.constexpr_function
    def _pair_asm(IS_BF16):
        """PTX for one pair: one field of two words ($1, $2; shifted by 4 for an odd field) -> (code - zero) of both
        in one 16-bit pair: PRMT with the field's selector ($3: byte field // 2 of each word into the two halves),
        LOP3 (low nibble | magic), one add of the row's -(magic + zero) pair ($5, built once per row as a 32-bit
        word: passed as two 16-bit values it was re-packed by a PRMT per pair)."""
        magic, add = (0x43004300, "add.rn.bf16x2") if IS_BF16 else (0x64006400, "add.rn.f16x2")
        return (f"{{ .reg .b32 p; prmt.b32 p, $1, $2, $3; lop3.b32 p, p, {0x000F000F}, {magic}, 0xEA; "
                f"{add} $0, p, $5; }}")

    @gluon.constexpr_function
    def _pairs_layout(W, BN):
        """[W, BN, u (4), t (2), d (2), c (4), b (2)]: the A operand (k_width 2) of one k-tile half before its
        reshape to [W, BN, 128] (K = b + 2c + 8d + 16t + 32u), basis for basis."""
        z = [0] * 7

        def at(dim, v):
            e = list(z)
            e[dim] = v
            return e
        rows = [at(1, 16 << r) for r in range(BN.bit_length() - 5)]
        return gl.DistributedLinearLayout(
            reg_bases=[at(6, 1), at(1, 8), at(4, 1), at(3, 1), at(2, 1), at(2, 2)] + rows,
            lane_bases=[at(5, 1), at(5, 2), at(1, 1), at(1, 2), at(1, 4)],
            warp_bases=[at(0, 1 << q) for q in range(W.bit_length() - 1)], block_bases=[], shape=[W, BN, 4, 2, 2, 4, 2])

    @gluon.jit
    def _unpack_half_pairs(words, zneg, H: gl.constexpr, a_l: gl.constexpr, IS_BF16: gl.constexpr):
        """The k_width-2 scheme: words [W, BN, 4 (c), 8] as loaded -> the A operand [W, BN, 128] of half H, logical
        K = b + 2c + 8d + 16t + 32u <-> column (4H + 2t + d)·32 + 8c + 2u + b: a register pair is one field of two
        adjacent words, so x's pairs are adjacent columns (loaded as they sit, no repack). The fields' selectors and
        shifts vary only along t and d, so they fold to constants per register."""
        W: gl.constexpr = words.shape[0]
        BN: gl.constexpr = words.shape[1]
        L7: gl.constexpr = _pairs_layout(W, BN)
        S5: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, L7))  # [W, BN, u, c, b]
        w5 = gl.permute(gl.reshape(words, [W, BN, 4, 4, 2]), (0, 1, 3, 2, 4))  # word 8c + 2u + b
        w5 = gl.convert_layout(w5, S5)
        w7 = gl.expand_dims(gl.expand_dims(w5, 3), 4)  # [W, BN, u, 1, 1, c, b]
        shape: gl.constexpr = [W, BN, 4, 2, 2, 4, 2]
        Ld: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(
            5, gl.SliceLayout(6, L7))))))
        Lt: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, gl.SliceLayout(
            5, gl.SliceLayout(6, L7))))))
        d = gl.arange(0, 2, layout=Ld)[None, None, None, None, :, None, None]
        t = gl.arange(0, 2, layout=Lt)[None, None, None, :, None, None, None]
        src = gl.where(d == 1, w7 >> 4, w7)  # an odd field: its nibble is the byte's high one
        byte = 2 * H + t
        sel = (byte | (byte << 4) | ((4 + byte) << 8) | ((4 + byte) << 12)) + gl.zeros(shape, gl.int32, L7)
        Z: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, gl.SliceLayout(5, gl.SliceLayout(
            6, L7)))))
        zbits = zneg.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        z7 = gl.convert_layout(zbits * 0x10001, Z)[:, :, None, None, None, None, None]  # (z, z) as one word
        src, z7 = gl.broadcast(src, z7)
        out = gl.inline_asm_elementwise(_pair_asm(IS_BF16), "=r,r,r,r,r,r,r", [src, sel, z7], dtype=zneg.dtype,
                                        is_pure=True, pack=2)
        return gl.convert_layout(gl.reshape(out, [W, BN, 128]), a_l, assert_trivial=True)

    @gluon.constexpr_function
    def _x_pairs_layout(W, LOAD=False):
        """[W, f (4), c (4), u (4), n (8), b (2)]: x of one k-tile half for the k_width-2 scheme, column
        (4H + f)·32 + 8c + 2u + b of row n; b first in the registers (a 32-bit pair), then f and u in the B
        operand's order — or, ``LOAD``, u first (16-byte loads along u)."""
        z = [0] * 6

        def at(dim, v):
            e = list(z)
            e[dim] = v
            return e
        regs = [at(3, 1), at(3, 2), at(1, 1), at(1, 2)] if LOAD else [at(1, 1), at(1, 2), at(3, 1), at(3, 2)]
        return gl.DistributedLinearLayout(
            reg_bases=[at(5, 1)] + regs,
            lane_bases=[at(2, 1), at(2, 2), at(4, 1), at(4, 2), at(4, 4)],
            warp_bases=[at(0, 1 << q) for q in range(W.bit_length() - 1)], block_bases=[], shape=[W, 4, 4, 4, 8, 2])

    @gluon.jit
    def _load_x_pairs(x_ptr, M, stride_xm, kt, H: gl.constexpr, W: gl.constexpr, x_ld: gl.constexpr,
                      b_l: gl.constexpr):
        """x for ``_unpack_half_pairs`` as 32-bit words [W, f, c, u, n] (a pair of columns each; 16-byte loads along
        u); ``_x_pairs_operand`` makes the B operand of them: logical K = b + 2c + 8d + 16t + 32u <-> column
        (4H + 2t + d)·32 + 8c + 2u + b, f = 2t + d."""
        S: gl.constexpr = gl.SliceLayout(5, _x_pairs_layout(W, True))
        L0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, S))))
        L1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, S))))
        L2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, S))))
        L3: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, S))))
        L4: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, S))))
        bw = gl.arange(0, W, layout=L0)
        f = gl.arange(0, 4, layout=L1)
        c = gl.arange(0, 4, layout=L2)
        u = gl.arange(0, 4, layout=L3)
        n = _x_rows(gl.arange(0, 8, layout=L4), M)
        # in 32-bit words: column / 2
        off = (((kt + bw) * 128)[:, None, None, None, None] + ((4 * H + f) * 16)[None, :, None, None, None]
               + (4 * c)[None, None, :, None, None] + u[None, None, None, :, None]
               + (n * (stride_xm // 2))[None, None, None, None, :])
        I32P: gl.constexpr = gl.pointer_type(gl.int32)
        return gl.load(x_ptr.to(I32P, bitcast=True) + off)  # [W, f, c, u, n] int32; rows n >= M read row M - 1

    @gluon.jit
    def _x_pairs_operand(xw, like, b_l: gl.constexpr):
        """``_load_x_pairs``' 32-bit words -> the B operand [W, 128, 8] in ``like``'s dtype. Done inside the loop body: carried
        across the loop as 16-bit values, the prefetched operand was re-packed by half-word PRMTs every step."""
        W: gl.constexpr = xw.shape[0]
        L6: gl.constexpr = _x_pairs_layout(W)
        # 32-bit registers renamed into the B operand's order (free), then one pair per register
        xw = gl.expand_dims(gl.convert_layout(xw, gl.SliceLayout(5, L6)), 5) + gl.zeros([W, 4, 4, 4, 8, 2], gl.int32, L6)
        xv = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [xw], dtype=like.dtype, is_pure=True, pack=2)
        xv = gl.reshape(xv, [W, 2, 2, 4, 4, 8, 2])  # [W, t, d, c, u, n, b]
        xv = gl.permute(xv, (0, 4, 1, 2, 3, 6, 5))  # [W, u, t, d, c, b, n]
        return gl.convert_layout(gl.reshape(xv, [W, 128, 8]), b_l, assert_trivial=True)

    @gluon.constexpr_function
    def _b_layout(a_l):
        """The B operand layout matching an A operand layout (same mma parent and k_width)."""
        return gl.DotOperandLayout(operand_index=1, parent=a_l.parent, k_width=a_l.k_width)

    @gluon.jit
    def _step_loads(x_ptr, w_ptr, sz_ptr, woff, sb, rows, M, N, stride_xm, kt, Q: gl.constexpr, W: gl.constexpr,
                    x_ld: gl.constexpr, b_l: gl.constexpr, PAIRS: gl.constexpr):
        """One step's operands, k-tiles kt … kt + W - 1 (one per warp): words [W, BN, 4, 8], x of both halves (the B
        operand, or its 32-bit words for ``PAIRS``) and both halves' scale/zero words (half h of k-tile t is group
        (2t + h) // Q)."""
        words = gl.load(w_ptr + woff + kt * 32)
        if PAIRS:  # x stays 32-bit words until the step that uses it (``_x_pairs_operand``)
            x0 = _load_x_pairs(x_ptr, M, stride_xm, kt, 0, W, x_ld, b_l)
            x1 = _load_x_pairs(x_ptr, M, stride_xm, kt, 1, W, x_ld, b_l)
        else:
            x0 = _load_x(x_ptr, M, stride_xm, kt, 0, W, x_ld, b_l)
            x1 = _load_x(x_ptr, M, stride_xm, kt, 1, W, x_ld, b_l)
        sz0 = gl.load(sz_ptr + ((2 * (kt + sb)) // Q)[:, None] * N + rows)
        sz1 = gl.load(sz_ptr + ((2 * (kt + sb) + 1) // Q)[:, None] * N + rows)
        return words, x0, x1, sz0, sz1

    @gluon.jit
    def _half(acc, zero, words, sz, b, H: gl.constexpr, MAGIC: gl.constexpr, DT: gl.constexpr,
              words_l: gl.constexpr, unpack: gl.constexpr, a_l: gl.constexpr, IS_BF16: gl.constexpr,
              PAIRS: gl.constexpr = False):
        """acc + scale · Σ (code - zero)·x over half H of each warp's k-tile (one scale group)."""
        s = (sz >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        zf = (sz & 0xFFFF).to(gl.float32)
        if PAIRS:
            a = _unpack_half_pairs(words, (-(zf + MAGIC)).to(DT), H, a_l, IS_BF16)
            b = _x_pairs_operand(b, a, _b_layout(a_l))
        else:
            zneg = gl.convert_layout((-(zf + MAGIC)).to(DT), gl.SliceLayout(2, words_l))
            zneg16 = gl.convert_layout((-(zf + MAGIC / 16)).to(DT), gl.SliceLayout(2, words_l))
            W: gl.constexpr = words.shape[0]
            BN: gl.constexpr = words.shape[1]
            w3 = gl.convert_layout(gl.reshape(gl.permute(words, (0, 1, 3, 2)), [W, BN, 32]), words_l)
            a = _unpack_half(w3, zneg, zneg16, H, unpack, a_l, IS_BF16)
        part = mma_v2(a, b, zero)
        return acc + part * s[:, :, None]

    @gluon.jit
    def _batch1_mma_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, r_ptr, nw_ptr, hw_ptr, ss_in_ptr, ss_out_ptr, eps, P_IN,
                           M, N, K, stride_xm, stride_ym, GROUP: gl.constexpr, BN: gl.constexpr, W: gl.constexpr,
                           IS_BF16: gl.constexpr, PDL: gl.constexpr = False,
                           EPI: gl.constexpr = 0, NORM_IN: gl.constexpr = False, PB: gl.constexpr = 1,
                           PAIRS: gl.constexpr = False):
        """y[:M, n0:n0+BN] = x · Ŵ[n0:n0+BN]ᵀ, one row block per program, all of K (see the module docstring).
        ``PDL``: launched with programmatic dependent launch — ``griddepcontrol.wait`` before the first load (the
        first step's words ahead of it, which no kernel writes, made ptxas spill 72 bytes in the loop at 128
        registers, or hold 136 with the scales after it: three programs per SM instead of four; offline sm_90a); the
        next kernel is released when the programs exit. ``EPI`` / ``NORM_IN`` / ``PB`` and the pointers beside them:
        ``wq_batch1._batch1_kernel``'s epilogues and input norm, the same math (``wq_batch1.SILU_MUL``: the program's
        rows are BN/2 of gate and the same rows of up, N/2 apart)."""
        mma: gl.constexpr = _layouts(W, BN, PAIRS)[0]
        a_l: gl.constexpr = _layouts(W, BN, PAIRS)[1]
        b_l: gl.constexpr = _layouts(W, BN, PAIRS)[2]
        words_ld: gl.constexpr = _layouts(W, BN, PAIRS)[3]
        words_l: gl.constexpr = _layouts(W, BN, PAIRS)[4]
        unpack: gl.constexpr = _layouts(W, BN, PAIRS)[5]
        x_ld: gl.constexpr = _layouts(W, BN, PAIRS)[6]
        MAGIC: gl.constexpr = 128.0 if IS_BF16 else 1024.0
        DT: gl.constexpr = gl.bfloat16 if IS_BF16 else gl.float16
        Q: gl.constexpr = GROUP // 128  # k-tile halves per scale group
        pid = gl.program_id(0)
        kw = gl.multiple_of(K // 8, 32)  # words per row
        # word offsets [W, BN, 4 (c), 8 (i)] of k-tile w: row n0 + r, word w·32 + 8c + i
        P0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, words_ld)))
        P1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, words_ld)))
        P2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, words_ld)))
        P3: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, words_ld)))
        bw = gl.arange(0, W, layout=P0)
        r = gl.arange(0, BN, layout=P1)
        c = gl.arange(0, 4, layout=P2)
        i = gl.arange(0, 8, layout=P3)
        woff = (bw[:, None, None, None] * 32 + (_weight_rows(pid, r, N, BN, EPI) * kw)[None, :, None, None]
                + (8 * c)[None, None, :, None] + i[None, None, None, :])
        # scale/zero words [W, BN] in the accumulator's row layout: half h of k-tile t is group (2t + h) // Q
        sb = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, mma)))
        rows = _weight_rows(pid, gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma))), N, BN, EPI)[None, :]
        acc = gl.zeros([W, BN, 8], gl.float32, mma)
        zero = gl.zeros([W, BN, 8], gl.float32, mma)
        n_kt = K // 256
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        words, x0, x1, sz0, sz1 = _step_loads(x_ptr, w_ptr, sz_ptr, woff, sb, rows, M, N, stride_xm, 0, Q, W, x_ld,
                                              b_l, PAIRS)
        for kt in range(0, n_kt, W):
            # the next step's operands before this step's math (the last step reloads its own: no masks in the loop).
            # Unrolled by two (each step loading into the registers the loop carries, no copies at the back edge) it
            # issued 3 % fewer instructions per step but held 142 registers: three programs per SM instead of four
            nk = gl.minimum(kt + W, n_kt - W)
            words_n, x0n, x1n, sz0n, sz1n = _step_loads(x_ptr, w_ptr, sz_ptr, woff, sb, rows, M, N, stride_xm, nk, Q,
                                                        W, x_ld, b_l, PAIRS)
            acc = _half(acc, zero, words, sz0, x0, 0, MAGIC, DT, words_l, unpack, a_l, IS_BF16, PAIRS)
            acc = _half(acc, zero, words, sz1, x1, 1, MAGIC, DT, words_l, unpack, a_l, IS_BF16, PAIRS)
            words, x0, x1, sz0, sz1 = words_n, x0n, x1n, sz0n, sz1n
        y = gl.sum(acc, axis=0)  # [BN, 8]: the W warps' partial sums meet
        Y: gl.constexpr = gl.SliceLayout(0, mma)
        yr = gl.arange(0, BN, layout=gl.SliceLayout(1, Y))
        ym = gl.arange(0, 8, layout=gl.SliceLayout(0, Y))
        m_ok = ym < M
        if NORM_IN:  # y · rsqrt(mean(h²) + eps) per row of x, from the producer's partial sums
            rp = gl.arange(0, PB, layout=gl.SliceLayout(1, Y))
            ss = gl.load(ss_in_ptr + rp[:, None] * M + ym[None, :], mask=(rp[:, None] < P_IN) & m_ok[None, :],
                         other=0.0)
            y = y * gl.rsqrt(gl.sum(ss, axis=0) / K + eps)[None, :]
        if EPI == 1:  # SiLU·mul: rows 0 … BN/2-1 are gate, the rest the same columns of up
            HALF: gl.constexpr = BN // 2
            yq = y.to(DT).to(gl.float32)
            g, u = gl.split(gl.permute(gl.reshape(yq, [2, HALF, 8]), (1, 2, 0)))  # [HALF, 8] each
            act = g / (1.0 + gl.exp(-g)) * u
            A: gl.constexpr = act.type.layout
            cols = pid * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, A))
            am = gl.arange(0, 8, layout=gl.SliceLayout(0, A))
            gl.store(y_ptr + am[None, :] * stride_ym + cols[:, None], act.to(DT), mask=(am < M)[None, :])
        elif EPI == 2:  # h = r + y, hw = h · nw, and this row block's sums of h² per row
            rn = pid * BN + yr
            off = ym[None, :] * stride_ym + rn[:, None]
            mask = m_ok[None, :] & (rn[:, None] < N)
            res = gl.load(r_ptr + off, mask=mask, other=0.0)
            h = (res.to(gl.float32) + y.to(DT).to(gl.float32)).to(DT)
            gl.store(y_ptr + off, h, mask=mask)
            hf = gl.where(mask, h.to(gl.float32), 0.0)
            nw = gl.load(nw_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)
            gl.store(hw_ptr + off, (hf * nw[:, None]).to(DT), mask=mask)
            gl.store(ss_out_ptr + pid * M + ym, gl.sum(hf * hf, axis=0), mask=m_ok)
        else:
            gl.store(y_ptr + ym[None, :] * stride_ym + (pid * BN + yr)[:, None], y.to(DT), mask=m_ok[None, :])

    @gluon.jit
    def _weight_rows(pid, r, N, BN: gl.constexpr, EPI: gl.constexpr):
        """Weight rows of program ``pid`` for row indices r (any layout): pid·BN + r, or for SiLU·mul the program's
        BN/2 rows of gate (r < BN/2) and the same rows of up (N/2 further)."""
        if EPI == 1:
            HALF: gl.constexpr = BN // 2
            return pid * HALF + r % HALF + (r // HALF) * (N // 2)
        return pid * BN + r


def batch1_mma_gemm(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bn: int = 16, warps: int = 4,
                    pairs: bool = True, out: Tensor | None = None, norm: tuple[float, Tensor] | None = None,
                    pdl: bool | None = None) -> Tensor:
    """x2 [M <= 8, K] bf16/fp16 with the 4-bit k-tiled weight (``pack_ktiled`` words, ``pack_ktiled_scales`` sz) ->
    y [M, N] in x's dtype, on an sm_90 GPU. ``bn`` rows per program (16 or 32), ``warps`` k-tiles per step (one per
    warp; the next step's operands are loaded before this step's arithmetic), ``pairs``: the k_width-2 scheme (the
    default; False: k_width 4 — module docstring). ``out``, ``norm``: as
    ``wq_batch1.batch1_gemm``'s. ``pdl``: programmatic dependent launch (default ``overlap.PDL_ENABLED``;
    ``overlap.pdl_ok``)."""
    m, k, n = _check(x2, words, sz, bits, group, bn, warps, "batch1_mma_gemm", norm)
    y = result_tensor(x2, n, out, "batch1_mma_gemm")
    _launch(x2, words, sz, y, norm, None, n // bn, group, bn, warps, 0, pdl, pairs)
    return y


def batch1_mma_silu_mul(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, bn: int = 16, warps: int = 4,
                        pairs: bool = True, out: Tensor | None = None, norm: tuple[float, Tensor] | None = None,
                        pdl: bool | None = None) -> Tensor:
    """silu(x2 · Ŵ_gateᵀ) · (x2 · Ŵ_upᵀ) -> [M, N / 2] for a merged [gate; up] weight, as
    ``wq_batch1.batch1_silu_mul`` (each program: BN/2 rows of gate and the same rows of up)."""
    m, k, n = _check(x2, words, sz, bits, group, bn, warps, "batch1_mma_silu_mul", norm, halves=True)
    y = result_tensor(x2, n // 2, out, "batch1_mma_silu_mul")
    _launch(x2, words, sz, y, norm, None, n // bn, group, bn, warps, 1, pdl, pairs)
    return y


def batch1_mma_add_residual(x2: Tensor, words: Tensor, sz: Tensor, bits: int, group: int, residual: Tensor,
                            norm_weight: Tensor, bn: int = 16, warps: int = 4,
                            pairs: bool = True, pdl: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(h, hw, ss) as ``wq_batch1.batch1_add_residual``: h = residual + x2 · Ŵᵀ, hw = h · norm_weight, ss [N / bn, M]
    fp32 sums of h² per row block and row."""
    m, k, n = _check(x2, words, sz, bits, group, bn, warps, "batch1_mma_add_residual")
    if residual.shape != (m, n) or residual.dtype != x2.dtype or not residual.is_contiguous():
        raise ValueError(f"batch1_mma_add_residual: residual {residual.dtype} {tuple(residual.shape)}: expected a "
                         f"contiguous {x2.dtype} [{m}, {n}] tensor")
    if norm_weight.shape != (n,) or not norm_weight.is_contiguous() or norm_weight.device != x2.device:
        raise ValueError(f"batch1_mma_add_residual: norm_weight {tuple(norm_weight.shape)} on {norm_weight.device}: "
                         f"expected a contiguous [{n}] tensor on {x2.device}")
    h, hw = torch.empty_like(residual), torch.empty_like(residual)
    ss = torch.empty(n // bn, m, device=x2.device, dtype=torch.float32)
    _launch(x2, words, sz, h, None, (residual, norm_weight, hw, ss), n // bn, group, bn, warps, 2, pdl, pairs)
    return h, hw, ss


def _check(x2, words, sz, bits, group, bn, warps, who, norm=None, halves=False) -> tuple[int, int, int]:
    """(M, K, N) after every check of the operands and tile, each error naming ``who`` and the alternative."""
    if x2.dim() != 2:
        raise ValueError(f"{who} takes x as [M, K], got {tuple(x2.shape)}")
    m, k = x2.shape
    if bits != BITS or group % 128:
        raise ValueError(f"{who} runs 4-bit weights with a group that is a multiple of 128, got bits={bits}, "
                         f"group={group}; use wq_batch1")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"{who} takes 1 to {MAX_M} rows of x, got {m}; use wq_batch1 or ktiled_gemm")
    if bn not in (16, 32, 64) or warps not in (1, 2, 4, 8):
        raise ValueError(f"{who}: bn={bn}, warps={warps}: expected bn in (16, 32, 64) and warps in (1, 2, 4, 8)")
    if x2.dtype not in (torch.bfloat16, torch.float16) or not x2.is_contiguous():
        raise ValueError(f"{who}: x must be contiguous bf16/fp16, got {x2.dtype}")
    _check_operands(x2, words, sz, bits, group)
    n = words.shape[0]
    rows = n // 2 if halves else n
    step = bn // 2 if halves else bn
    if rows % step or k % (TILE * warps) or (halves and n % 2):
        raise ValueError(f"{who}: N={n} must be a multiple of bn={bn}{' (per half)' if halves else ''} and K={k} of "
                         f"{TILE}·warps={TILE * warps}")
    check_norm(norm, m, who)
    if not mma_ok(x2.device, bits, group, m, n, k, bn, warps):
        raise ValueError(f"{who} needs an sm_90 GPU with Gluon, got {x2.device}; use wq_batch1")
    return m, k, n


def _launch(x2, words, sz, y, norm, residual, programs, group, bn, warps, epi, pdl, pairs):
    m, k = x2.shape
    pdl = pdl_ok(x2.device, pdl)
    eps, ss_in = norm if norm is not None else (1.0, y)
    r, nw, hw, ss_out = residual if residual is not None else (y, y, y, y)
    launch_kernel(_batch1_mma_kernel, (programs,),
                  (x2, words, sz, y, r, nw, hw, ss_in, ss_out, float(eps), ss_in.shape[0] if norm is not None else 1,
                   m, words.shape[0], k, x2.stride(0), y.stride(0)),
                  GROUP=group, BN=bn, W=warps, IS_BF16=x2.dtype == torch.bfloat16, PDL=pdl,
                  EPI=epi, NORM_IN=norm is not None, PAIRS=pairs,
                  PB=triton.next_power_of_2(ss_in.shape[0]) if norm is not None else 1,
                  num_warps=warps, **({"launch_pdl": True} if pdl else {}))


def compile_for_sm90(bn: int = 16, warps: int = 4, dtype: torch.dtype = torch.bfloat16,
                     group: int = 128, pdl: bool = False, epi: int = 0, norm_slots: int = 0, pairs: bool = False):
    """Compile the kernel for an H100 (sm_90a) on any machine (no GPU needed; ``launch.ptxas_usage`` reads its
    registers). The layout conversions' ``assert_trivial`` checks run here: a build is the proof that the words reach
    the MMA operand without moving between threads. ``epi``: 1 SiLU·mul, 2 add-residual; ``norm_slots`` > 0: the
    input norm with that many partial sums per row."""
    from triton.backends.compiler import GPUTarget

    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    sig = {"x_ptr": ptr, "w_ptr": "*i32", "sz_ptr": "*i32", "y_ptr": ptr, "r_ptr": ptr, "nw_ptr": ptr, "hw_ptr": ptr,
           "ss_in_ptr": "*fp32" if norm_slots else ptr, "ss_out_ptr": "*fp32" if epi == 2 else ptr, "eps": "fp32",
           "P_IN": "i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    const = {"GROUP": group, "BN": bn, "W": warps, "IS_BF16": dtype == torch.bfloat16,
             "PDL": pdl, "EPI": epi, "NORM_IN": norm_slots > 0,
             "PB": triton.next_power_of_2(norm_slots) if norm_slots else 1, "PAIRS": pairs}
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a not in ("M", "eps", "P_IN")}
    sig.update({name: "constexpr" for name in const})
    src = gluon._runtime.GluonASTSource(fn=_batch1_mma_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
