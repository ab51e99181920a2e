"""``fused`` execution mode: kernels that read the packed weight and dequantize in registers.

W2/W4/W8 A16, any group size that is a multiple of 32 (or per-channel), symmetric or not (the
zero-point is read either way).

Memory: one layout, held once. At its first fused forward a layer whose shape the k-tiled kernels take
(K a multiple of the interleave tile: every Qwen3 projection) converts its storage *in place* to the
k-tiled layout (``runtime/layouts.py``, ``numerics/ktiled.py``): the same bits permuted, 0.266x bf16
bytes at W4 g128 instead of the checkpoint's 0.262x; ``state_dict()`` still yields the checkpoint
tensors, rebuilt exactly. Other layers keep the checkpoint layout and its kernels.

Candidates per M bucket, timed once per (bits, group, N, K, M bucket) by ``TUNER``, the fastest kept.
On a k-tiled layer:

* M = 1: ``ktiled_gemv`` (CUDA cores, split-K) and the GEMM's small tiles; M <= 8: the batch-1 kernel
  (``kernels/wq_batch1.py``: a program's k-tiles as one batched MMA, ``BATCH1``), which wins most shapes there;
* 1 < M ≤ 64: ``ktiled`` (``kernels/wq_ktiled.py``), the tensor-core GEMM on the k-tiled words, small-M
  tiles (split-K, stream-K, scale applied after the MMA); M > 64: its large tiles and, on Hopper, ``wgmma``
  (``kernels/wq_wgmma.py``, Gluon: the dequantization of the next K slice runs under the wgmma in flight;
  1.2-1.5x the large k-tiled tiles at M >= 256 on an H100);
* M ≤ 16, 4-bit, bf16, only when ``QWENQUANT_FUSED_COPIES`` has ``tinygemm``: torch's tinygemm
  (``aten._weight_int4pack_mm``) on a repacked *copy* (``TinyGemmOperands``, + 0.26x bf16 bytes) — a few
  % ahead of ktiled on q/o-sized shapes at M ≤ 2 on an H100.

On a checkpoint-layout layer (K not a multiple of the tile, or ``QWENQUANT_FUSED_COPIES=none``): the FFMA
GEMV kernels at M ≤ 4 (``gemv2`` where its tile fits K and the group, else ``gemv``) and the checkpoint-
layout tensor-core GEMMs ``gemm_wa`` / ``gemm`` above (``kernels/wq_matmul.py``, ≈ 0.2x bf16 at M > 64).

At M >= 128 even ktiled trails cuBLAS bf16 (0.5-0.7x on gate/up): ``auto`` then compares it with
unpack + cuBLAS. Ratios on an H100 (Qwen3-8B, W4 g128): BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from qwenquant.kernels import wq_batch1 as B1
from qwenquant.kernels import wq_batch1_mma as Q
from qwenquant.kernels import wq_ktiled as KT
from qwenquant.kernels import wq_matmul as K
from qwenquant.kernels import wq_wgmma as W
from qwenquant.kernels import wq_wgmma_ws as WS
from qwenquant.runtime.tuning import Tuner, m_bucket

TUNER = Tuner("fused")
# How fused mode holds a weight, set before the first forward: QWENQUANT_FUSED_COPIES=ktiled (default: the k-tiled
# layout *replaces* the checkpoint layout on the device, 0.27x bf16 bytes for Qwen3-8B's decoder linears),
# tinygemm,ktiled (plus tinygemm's copy: 0.53x), none (the checkpoint layout and its kernels: 0.26x).
# Measured end to end on an H100 (Qwen3-8B W4 g128, merged projections, benchmarks/results/e2e_qwen3-8b-merged*_h100
# .json): decode batch 1 1.98x bf16 with tinygemm's copy beside a k-tiled copy, 1.94x k-tiled only, 1.30x
# checkpoint layout only; batch 8-128 equal with and without tinygemm.
_copies_env = os.environ.get("QWENQUANT_FUSED_COPIES", "ktiled")
FUSED_COPIES: set[str] = set() if _copies_env.strip() in ("", "none") else {c.strip() for c in _copies_env.split(",")}
if not FUSED_COPIES <= {"tinygemm", "ktiled"}:
    raise ValueError(f"QWENQUANT_FUSED_COPIES={_copies_env!r}: expected 'none' or a comma list of tinygemm, ktiled")
# QWENQUANT_WGMMA_WS=0 keeps the warp-specialized wgmma tiles (kernels/wq_wgmma_ws.py) out of the tuner (read at
# import). They win the tuner's CUDA-graph timings at M >= 512, but the eager e2e prefill of the run
# that first offered them was slower (benchmarks/NOTES.md, session 13: cause not isolated); this is the A/B switch.
_ws_env = os.environ.get("QWENQUANT_WGMMA_WS", "1").strip()
if _ws_env not in ("0", "1"):
    raise ValueError(f"QWENQUANT_WGMMA_WS={_ws_env!r}: expected 1 (offer the warp-specialized wgmma tiles) or 0")
OFFER_WGMMA_WS = _ws_env == "1"


def describe_weights() -> str:
    """How fused mode holds a weight under the current ``FUSED_COPIES`` (benchmark files record it)."""
    held = "k-tiled layout in place of the checkpoint's" if "ktiled" in FUSED_COPIES else "checkpoint layout"
    return held + (" + tinygemm's copy" if "tinygemm" in FUSED_COPIES else "")


# torch's tinygemm (tensor-core, int4) wins at M <= 8 on an H100 and falls off fast after
# (benchmarks/results/w4_session_h100_run1.json: 2.3-2.6x bf16 at M=1, ~1.1x at 8, 0.7x at 16)
TINYGEMM_MAX_M = 16

# (BN rows, BKW words per step, split-K, warps)
GEMV_CONFIGS = [
    (16, 64, 1, 4), (8, 128, 1, 4), (16, 128, 1, 4), (32, 32, 1, 4), (4, 128, 1, 2), (4, 256, 1, 4),
    (8, 128, 2, 4), (16, 64, 2, 4), (16, 64, 4, 4), (8, 128, 4, 4), (4, 128, 4, 2), (8, 64, 8, 4),
]
# gemv2: (BN rows, BKW words per step, split-K, warps, stages, xvec, prefetch); benchmarks/gemv_session.py
GEMV2_CONFIGS = [
    (8, 128, 1, 4, 1, False, True), (4, 128, 1, 4, 1, False, True), (8, 256, 1, 4, 1, False, True),
    (4, 256, 1, 4, 1, False, True), (8, 128, 1, 4, 1, False, False), (4, 128, 2, 4, 1, False, True),
    (8, 64, 1, 4, 1, False, True), (4, 64, 1, 2, 1, False, True), (8, 32, 1, 4, 1, False, True),
]
# (BM, BN, BK, warps, stages)
GEMM_CONFIGS_SMALL = [
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (16, 64, 256, 4, 3),
    (64, 64, 128, 4, 4), (32, 128, 64, 4, 4),
]
# gemm_wa for 4 < M <= 64 (BM = M rounded up, >= 16): (BN, BK, warps, stages, split-K); the winners of
# benchmarks/w4_session.py on Qwen3-8B shapes
GEMM_WA_CONFIGS = [(64, 64, 4, 4, 4), (64, 256, 4, 3, 2), (64, 128, 4, 3, 1), (128, 128, 8, 3, 2)]
# ktiled for 1 < M <= 64 (BM = M rounded up, >= 16): (BN, warps, stages, split-K, weight as the A operand?, scale after
# the MMA?); the winners of benchmarks/ktiled_session.py on Qwen3-8B shapes (results/ktiled_session_h100.json). The
# scale-after variant wins nearly everywhere for 2/4-bit; 8-bit (where it cannot run) takes the same tiles scale-before.
KTILED_SMALL = [(128, 4, 3, 4, False, True), (128, 4, 3, 8, True, True), (64, 4, 3, 2, True, True), (64, 4, 3, 4, True, True),
                (128, 8, 3, 4, True, True), (64, 4, 3, 1, True, True), (128, 4, 3, 4, True, False), (32, 2, 3, 4, True, True),
                (64, 4, 3, 8, True, True)]
KTILED_SMALL_MAX_M = 64
# ktiled_gemv (CUDA cores, batch 1): (BN rows, k-tiles per step, split-K, warps, stages). Few rows and one or two
# warps per program, many programs: the winners of benchmarks/gemv_small.py on 0.6B / 30B-A3B shapes (H100,
# results/batch1_small_weights_h100.json: 3.3-4.3 us where the checkpoint-layout GEMV takes 3.0-5.0); big weights take the GEMM
KTILED_GEMV = [(2, 4, 1, 1, 1), (4, 4, 1, 1, 1), (2, 8, 1, 2, 1), (4, 8, 1, 2, 1), (2, 8, 1, 1, 1), (8, 8, 1, 2, 1),
               (4, 4, 4, 1, 1), (2, 4, 4, 1, 1), (4, 8, 2, 2, 1)]
# batch1_gemm (``kernels/wq_batch1.py``: a program's k-tiles as one batched MMA) at M <= 8 (the MMA's N = 8, x padded):
# (BN rows, k-tiles per step, warps, stages, split-K). The best of two sweeps (benchmarks/m1_sweep.py, M1_KIND=batch1,
# H100, M = 1): session 14 (results/m1_sweep_batch1_h100.json; 1-2 stages) and session 15 (m1_sweep_batch1_s234_h100
# .json; 2-4 stages, kb 2-8): qkv 9.56 us (bn16 kb4 w2 s3, 9.58 for bn16 kb8 w4 s2), o 6.69 (bn16 kb4 w2 s3; 7.47 for
# the session-14 pick), gate_up 25.1 (bn32 kb4 w4 s2), down 13.7 (bn32 kb4 w4 s4; the best k-tiled tile 15.1)
BATCH1 = [(16, 8, 4, 2, 1), (16, 4, 2, 3, 1), (32, 4, 4, 2, 1), (32, 4, 4, 4, 1)]
# persistent batch-1 tiles (bn, kb, warps, stages, programs per SM; ``wq_batch1``'s ``persist``): where a weight has
# more row blocks than the SMs hold programs (gate_up: 768 blocks of 32 rows, the lm_head 4748), each program walks
# several blocks in one pipelined loop instead of filling and draining a pipeline per block. Programs per SM from an
# offline sm_90a build (session 21): 2 — the SiLU·mul and normed variants of these tiles hold 240-255 registers (164
# plain) and the 4-stage / 8-k-tile ones ≈ 100 KB of shared memory; 3 for the 3-stage bn32 tile of the plain and
# add-residual kernels (the lm_head, o, down)
BATCH1_PERSISTENT = [(32, 4, 4, 3, 2), (32, 4, 4, 4, 2), (16, 8, 4, 3, 2), (32, 4, 4, 3, 3)]
# False: the tuner times only one program per row block (A/B: benchmarks/pdl_step.py). Read when a shape is tuned;
# choices already made stay (the candidate tables always hold the persistent tiles, so a choice runs either way)
OFFER_BATCH1_PERSISTENT = True
# kernels/wq_batch1_mma.py (Gluon: the words loaded straight into the MMA operand registers; 4-bit, groups of
# 128·q, sm_90): its CONFIGS offered beside the BATCH1 tiles, plain and with the decode step's epilogues, while True.
# Off until a GPU run shows it winning (benchmarks/batch1_mma_probe.py, pdl_step.py PDL_MMA=1)
OFFER_BATCH1_MMA = os.environ.get("QWENQUANT_BATCH1_MMA", "0") == "1"
BATCH1_MAX_M = 8  # offered up to this M bucket: one MMA column block (N = 8) holds every row of x
KTILED_SPLIT_MAX_M = 256  # largest M bucket offered split-K / stream-K tiles (workspace memory)
# stream-K schedule (``wq_ktiled._ktiled_streamk_kernel``; 4-bit, weight as A, scale after), programs per SM last:
# (BN, warps, stages, programs) for M <= 64 and (BM, BN, warps, stages, programs) for 64 < M <= 256. On the H100 grid
# (NOTES, session 6) it is no faster than split-K at gate/up/down sizes, but wins where split-K leaves SMs idle:
# k/v M = 128 13.1 vs 19.9 us (0.68x bf16, beating unpack + cuBLAS's 0.65x), M = 256 16.5 vs 19.9 us, gate/up M = 128 0.81x.
KTILED_STREAMK_SMALL = [(128, 4, 3, 2)]
KTILED_STREAMK_LARGE = [(64, 64, 4, 3, 2)]
# ktiled for M > 64: (BM, BN, warps, stages, split-K, weight as A?, scale after?). H100 session grid (benchmarks/NOTES.md,
# session 5): scale-after tiles win M = 128-512 (gate/up M = 128 0.77x bf16 vs 0.68x before, down 0.84x), the
# 128x256 scale-before tile M >= 1024 (0.54-0.60x); unpack + cuBLAS beats all of them from M = 1024 (0.69-0.95x),
# so ``auto`` picks between them per shape.
KTILED_LARGE = [(128, 128, 8, 2, 1, True, True), (64, 128, 8, 3, 2, True, True), (64, 128, 8, 3, 1, True, True),
                (64, 64, 4, 3, 1, True, True), (128, 256, 8, 2, 1, True, False), (128, 128, 8, 2, 1, True, False),
                (64, 128, 4, 3, 2, True, False)]  # (the last: a pipelined tile for 2-bit, whose wide tiles lose a stage)
GEMM_CONFIGS_LARGE = [
    (64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 8, 4),
    (128, 64, 64, 4, 4),
]


@dataclass
class TinyGemmOperands:
    """torch's tinygemm int4 layout of a W4 weight (``aten._weight_int4pack_mm``), built once per layer.

    tinygemm dequantizes as (q - 8)·s + m with s, m in bf16, so ours, (q - z)·s with fp16 s, maps to
    m = (8 - z)·s; both are rounded to bf16 — a difference of at most 2⁻⁹ relative per weight from
    our fp32-exact dequantization, inside bf16 tolerance. Memory: a second 4-bit copy (0.5 byte per
    weight plus 4 bytes per group per row) beside the checkpoint layout, counted in ``nbytes``."""

    packed: Tensor  # tinygemm's tiled int4 tensor
    scale_zero: Tensor  # [K/G, N, 2] bf16
    group: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes


@dataclass
class FusedOperands:
    """What a layer's fused kernels read besides the checkpoint tensors: the k-tiled words and scales (views of
    the layer's own buffers once it holds the ``ktiled`` layout — not a copy) and tinygemm's repacked copy
    (only when ``FUSED_COPIES`` asks for it). ``QuantLinear.resident_bytes`` counts each storage once."""

    tiny: TinyGemmOperands | None = None
    ktiled: KT.KTiledWeight | None = None  # kernels/wq_ktiled.py


def tinygemm_ok(bits: int, group: int, n: int, k: int) -> bool:
    """Shapes torch's tinygemm kernel takes: 4-bit, group 32-256, K % 128 == 0, N % 8 == 0, CUDA build."""
    return (bits == 4 and group in (32, 64, 128, 256) and k % 128 == 0 and n % 8 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm"))


def tinygemm_operands(qweight: Tensor, scale: Tensor, zero: Tensor, group: int) -> TinyGemmOperands:
    """Repack our [N, K/2] bytes (even column in the low nibble) into tinygemm's layout."""
    swapped = ((qweight & 15) << 4) | (qweight >> 4)  # tinygemm wants the even column in the high nibble
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
    s = scale.float()
    sz = torch.stack([s.T, ((8 - zero.float()) * s).T], dim=-1).to(torch.bfloat16).contiguous()
    return TinyGemmOperands(packed, sz, group)


def _operands(layer, bits: int, group: int, m: int | None = None) -> FusedOperands:
    """The operands of the layer's fused kernels, built at its first fused forward and kept: the layer's storage
    is converted in place to the k-tiled layout (where the shape allows and ``FUSED_COPIES`` has ``ktiled``),
    and tinygemm's copy is built beside it at the first call with ``m`` ≤ TINYGEMM_MAX_M rows when
    ``FUSED_COPIES`` has ``tinygemm`` (a prefill-only layer never pays for it)."""
    ops = layer._cache.get("fused")
    n, k = layer.out_features, layer.in_features
    if ops is None:
        if "ktiled" in FUSED_COPIES and KT.ktiled_ok(bits, group, n, k):
            layer.set_layout("ktiled")  # replaces the checkpoint buffers (and clears the layer's cache)
        ktiled = KT.KTiledWeight(layer.words, layer.sz) if layer.layout == "ktiled" else None
        ops = layer._cache["fused"] = FusedOperands(ktiled=ktiled)
    if (ops.tiny is None and m is not None and m <= TINYGEMM_MAX_M and "tinygemm" in FUSED_COPIES
            and tinygemm_ok(bits, group, n, k)):
        t = layer.checkpoint_tensors()  # rebuilt from the k-tiled words if those are resident (transient)
        ops.tiny = tinygemm_operands(t["qweight"], t["scale"], t["zero"], group)
    return ops


def check_layer(layer, x: Tensor) -> tuple[int, int]:
    """Raise a ValueError naming the alternatives if this layer/input cannot run fused; returns (bits, group)."""
    if layer.fmt != "affine":
        raise ValueError(f"fused mode supports affine integer weights, not {layer.fmt!r}; use 'fake' or 'dequant'")
    if not x.is_cuda:
        raise ValueError("fused mode runs Triton kernels on a CUDA GPU; on CPU use 'fake' or 'dequant'")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fused kernels take bf16/fp16 activations, got {x.dtype}; set compute_dtype=torch.bfloat16")
    bits, group = layer.meta["bits"], layer.meta["group_size"]
    K.check_supported(bits, group, layer.out_features, layer.in_features)
    return bits, (layer.in_features if group is None else group)


@functools.lru_cache(maxsize=None)
def _configs(m: int, k: int, group: int, bits: int = 4, tinygemm: bool = False, ktiled: bool = False,
             wgmma: bool = False) -> dict[str, tuple]:
    """name -> ("gemv2"|"gemv"|"gemm"|"gemm_wa"|"tinygemm"|"ktiled"|"ktiled_gemv"|"wgmma"|"wgmma_ws", config) for the kernels
    that can serve m rows (``wgmma``: the device runs ``wq_wgmma``, ``wq_wgmma.runs_on``). Depends on m only through its
    bucket (callers pass ``m_bucket(m)``; cached, read-only)."""
    extra = {"tinygemm": ("tinygemm", ())} if tinygemm and m <= TINYGEMM_MAX_M else {}
    if ktiled:  # the layer holds the k-tiled layout only: its kernels (they beat the checkpoint-layout GEMMs at
        # every measured shape and M, up to 3x at M >= 128; the GEMV below stands in for the checkpoint one at M = 1)
        gemv = {f"ktiled gemv bn{bn} bt{bt} sk{sk} w{w} s{st}": ("ktiled_gemv", (bn, bt, sk, w, st))
                for bn, bt, sk, w, st in KTILED_GEMV} if m == 1 else {}
        return {**extra, **gemv, **_ktiled_configs(m, bits, wgmma)}
    return {**extra, **_triton_configs(m, k, group, bits)}


def _ktiled_configs(m: int, bits: int = 4, wgmma: bool = False) -> dict[str, tuple]:
    """name -> ("ktiled", (bm, bn, w_as_a, split_k, warps, stages, scale_after, streamk)) for an M bucket.
    Small-M tiles apply the scale after the MMA where the bit width allows (2/4-bit, ``wq_ktiled`` explains);
    ``streamk`` > 0 selects the stream-K schedule with that many programs per SM (4-bit only: the width the
    GPU check covered)."""
    if m <= KTILED_SMALL_MAX_M:
        bm = max(16, 1 << (m - 1).bit_length())
        cap = 2 if bits == 2 else 3  # 2-bit tiles are 512 columns: x's [BM, 512] tile per stage
        out = {}
        for bn, w, st, sk, wa, sa in KTILED_SMALL:
            sa = sa and bits in KT.SCALE_AFTER_BITS
            name = f"ktiled {'A' if wa else 'B'} bn{bn} bm{bm} w{w} s{min(st, cap)} sk{sk}{' after' if sa else ''}"
            out[name] = ("ktiled", (bm, bn, wa, sk, w, min(st, cap), sa, 0))
        if bits == 4:
            out.update({f"ktiled A bn{bn} bm{bm} w{w} s{st} streamk{p} after": ("ktiled", (bm, bn, True, 1, w, st, True, p))
                        for bn, w, st, p in KTILED_STREAMK_SMALL})
        if m <= BATCH1_MAX_M and bits in B1.BITS_OK:  # the tuner times them against the k-tiled tiles
            out.update({batch1_name(cfg): ("batch1", cfg) for cfg in BATCH1})
            out.update({batch1_persistent_name(cfg): ("batch1p", cfg) for cfg in BATCH1_PERSISTENT})
        if m <= Q.MAX_M and bits == Q.BITS and wgmma and OFFER_BATCH1_MMA:  # a shape it cannot run raises: skipped
            out.update({batch1_mma_name(cfg): ("batch1mma", cfg) for cfg in Q.CONFIGS})
        return out
    # large tiles: 2-bit's 512-column x tile leaves room for one stage less (shared memory). Split-K and stream-K
    # only up to M = 256: their fp32 workspace is M·N floats and is kept at its largest size
    # (``wq_ktiled.split_k_workspace``). Scale-after large tiles only at 4 bits: the 2-bit ones (512-column tiles)
    # were not checked on the GPU
    out = {f"ktiled {'A' if wa else 'B'} bm{bm} bn{bn} w{w} s{st - (bits == 2)} sk{sk}{' after' if sa else ''}":
           ("ktiled", (bm, bn, wa, sk, w, st - (bits == 2), sa, 0))
           for bm, bn, w, st, sk, wa, sa in KTILED_LARGE
           if not (bits == 2 and bn > 128) and (sk == 1 or m <= KTILED_SPLIT_MAX_M) and (not sa or bits == 4)}
    if bits == 4 and m <= KTILED_SPLIT_MAX_M:
        out.update({f"ktiled A bm{bm} bn{bn} w{w} s{st} streamk{p} after": ("ktiled", (bm, bn, True, 1, w, st, True, p))
                    for bm, bn, w, st, p in KTILED_STREAMK_LARGE})
    if wgmma:  # Hopper: the Gluon GEMM that dequantizes under the wgmma in flight (kernels/wq_wgmma.py), and its
        # warp-specialized form (kernels/wq_wgmma_ws.py: a producer warp issues every TMA copy), the faster of the two
        # at M >= 1024 on the 8B shapes (benchmarks/NOTES.md, session 13)
        out.update({wgmma_name(cfg): ("wgmma", cfg) for cfg in W.CONFIGS})
        if OFFER_WGMMA_WS:
            out.update({wgmma_ws_name(cfg): ("wgmma_ws", cfg) for cfg in WS.CONFIGS})
    return out


def batch1_name(cfg: tuple) -> str:
    """The tuner's name of a ``BATCH1`` entry."""
    bn, kb, w, st, sk = cfg
    return f"batch1 bn{bn} kb{kb} w{w} s{st}" + (f" sk{sk}" if sk > 1 else "")


def batch1_mma_name(cfg: tuple) -> str:
    """The tuner's name of a ``wq_batch1_mma.CONFIGS`` entry."""
    bn, w, pairs = cfg
    return f"batch1mma bn{bn} w{w}" + (" pairs" if pairs else "")


def _offered(persistent: bool) -> bool:
    """Whether the tuner times a candidate: the persistent batch-1 tiles only while ``OFFER_BATCH1_PERSISTENT``."""
    return OFFER_BATCH1_PERSISTENT or not persistent


def batch1_persistent_name(cfg: tuple) -> str:
    """The tuner's name of a ``BATCH1_PERSISTENT`` entry (ends in ``p<programs per SM>``)."""
    bn, kb, w, st, per_sm = cfg
    return f"batch1 bn{bn} kb{kb} w{w} s{st} p{per_sm}"


def wgmma_name(cfg: tuple) -> str:
    """The tuner's name of a ``wq_wgmma.CONFIGS`` entry (stream-K ones end in ``streamk<programs per SM>``)."""
    bn, bm, w, st, sps, sk = cfg
    return f"wgmma bn{bn} bm{bm} w{w} s{st} sps{sps}" + (f" streamk{sk}" if sk else "")


def wgmma_ws_name(cfg: tuple) -> str:
    """The tuner's name of a ``wq_wgmma_ws.CONFIGS`` entry (x rows per tile, x ring stages, slices per stage; the
    persistent ones end in ``p<programs per SM>``)."""
    bm, st, sps, per_sm = cfg
    return f"wgmma-ws bm{bm} s{st} sps{sps}" + (f" p{per_sm}" if per_sm else "")


def wgmma_available() -> bool:
    """Whether the current CUDA device runs ``wq_wgmma`` (False without one)."""
    return torch.cuda.is_available() and W.runs_on(torch.device("cuda", torch.cuda.current_device()))


def _triton_configs(m: int, k: int, group: int, bits: int) -> dict[str, tuple]:
    if m <= K.GEMV_MAX_M:
        v2 = {f"gemv2 bn{c[0]} bkw{c[1]} sk{c[2]} w{c[3]}{' pf' if c[6] else ''}": ("gemv2", c)
              for c in GEMV2_CONFIGS if K.gemv2_ok(bits, group, k, c[1])}
        if v2:
            return v2
        return {f"gemv bn{bn} bkw{bkw} sk{sk} w{w}": ("gemv", (bn, bkw, sk, w)) for bn, bkw, sk, w in GEMV_CONFIGS}
    table = GEMM_CONFIGS_SMALL if m <= 64 else GEMM_CONFIGS_LARGE
    out = {f"gemm {bm}x{bn}x{bk} w{w} s{st}": ("gemm", (bm, bn, bk, w, st))
           for bm, bn, bk, w, st in table if k % bk == 0 and (bk % group == 0 or group % bk == 0)}
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        out.update({f"gemm_wa bn{bn} bm{bm} bk{bk} w{w} s{st} sk{sk}": ("gemm_wa", (bn, bm, bk, w, st, sk))
                    for bn, bk, w, st, sk in GEMM_WA_CONFIGS if K.gemm_wa_ok(bits, group, k, bk)})
    return out


def _run(kind: str, cfg: tuple, x2: Tensor, qw: Tensor, s: Tensor, z: Tensor, bits: int, group: int,
         ops: FusedOperands | None = None) -> Tensor:
    if kind == "tinygemm":
        tiny = ops.tiny
        return torch.ops.aten._weight_int4pack_mm(x2, tiny.packed, tiny.group, tiny.scale_zero)
    if kind == "ktiled":
        return KT.ktiled_gemm(x2, ops.ktiled.words, ops.ktiled.sz, bits, group, *cfg)
    if kind == "wgmma":
        return W.wgmma_gemm(x2, ops.ktiled.words, ops.ktiled.sz, bits, group, *cfg)
    if kind == "wgmma_ws":
        return WS.wgmma_ws_gemm(x2, ops.ktiled.words, ops.ktiled.sz, bits, group, *cfg)
    if kind == "batch1":
        return B1.batch1_gemm(x2, ops.ktiled.words, ops.ktiled.sz, bits, group, *cfg)
    if kind == "batch1p":
        return B1.batch1_gemm(x2, ops.ktiled.words, ops.ktiled.sz, bits, group, *cfg[:4], persist=cfg[4])
    if kind == "batch1mma":
        return Q.batch1_mma_gemm(x2, ops.ktiled.words, ops.ktiled.sz, bits, group, *cfg)
    if kind == "ktiled_gemv":
        return KT.ktiled_gemv(x2, ops.ktiled.words, ops.ktiled.sz, bits, group, *cfg)
    if kind == "gemv2":
        return K.gemv2(x2, qw, s, z, bits, group, *cfg)
    if kind == "gemv":
        return K.gemv(x2, qw, s, z, bits, group, *cfg)
    if kind == "gemm_wa":
        return K.gemm_wa(x2, qw, s, z, bits, group, *cfg)
    return K.gemm(x2, qw, s, z, bits, group, *cfg)


def fused_matmul(x2: Tensor, qw: Tensor | None, s: Tensor | None, z: Tensor | None, bits: int, group: int,
                 ops: FusedOperands | None = None) -> Tensor:
    """x2 [M, K] -> [M, N]: the tuned fused kernel for this shape. ``qw, s, z`` are the checkpoint tensors, or
    None when the layer holds only the k-tiled layout (``ops.ktiled``); ``ops`` adds the kernels on the
    repacked layouts: tinygemm (x bf16 only, its one activation dtype) and ktiled."""
    m, k = x2.shape
    use_tiny = ops is not None and ops.tiny is not None and x2.dtype == torch.bfloat16
    use_kt = ops is not None and ops.ktiled is not None
    if qw is None and not use_kt:
        raise ValueError("fused_matmul needs the checkpoint tensors or the k-tiled operands")
    n = qw.shape[0] if qw is not None else ops.ktiled.words.shape[0]
    use_wg = use_kt and W.runs_on(x2.device)  # per device: in the key, so mixed GPUs never share a choice
    key = (bits, group, n, k, m_bucket(m), x2.dtype, use_tiny, use_kt, use_wg)
    configs = _configs(m_bucket(m), k, group, bits, tinygemm=use_tiny, ktiled=use_kt, wgmma=use_wg)
    hit = TUNER.choices.get(key)
    if hit is None:
        cands = {name: (lambda kc=kc: _run(*kc, x2, qw, s, z, bits, group, ops)) for name, kc in configs.items()
                 if _offered(persistent=kc[0] == "batch1p")}
        name = TUNER.pick(key, cands)
    else:
        name = hit[0]
    return _run(*configs[name], x2, qw, s, z, bits, group, ops)


def forward_fused(layer, x: Tensor) -> Tensor:
    bits, group = check_layer(layer, x)
    x2 = _rows(x, layer.in_features)
    ops = _operands(layer, bits, group, x2.shape[0])
    # a k-tiled layer has no checkpoint tensors: only the kernels on its layout (ops.ktiled) run
    ckpt = (layer.qweight, layer.scale, layer.zero) if layer.layout == "checkpoint" else (None, None, None)
    y = fused_matmul(x2, *ckpt, bits, group, ops)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


# --- projections with their neighbours' work inside (decode, M <= EPILOGUE_MAX_M) -------------------------------
# A decode step at batch 1 is launch-bound between its GEMMs: on an H100 the W4 Qwen3-8B step spent 72 add + RMSNorm
# kernels (2.0 us each) and 36 SiLU·mul kernels (1.2 us) per token, plus a launch gap each
# (results/profile_e2e_prep_in_split_h100.json). The batch-1 kernel does that work around its MMA instead
# (kernels/wq_batch1.py): ``add_residual`` after o and down, ``norm=`` in qkv and gate_up, ``silu_mul`` for gate_up.
# The tile is picked per shape, M bucket and variant by the same tuner (candidates: the ``BATCH1`` tiles without
# split-K, each timed with its epilogue). Measured on an H100 (session 20, results/epilogues_step_h100.json, W4 +head
# step, median of 2 rounds): batch 1 2.729 ms -> 2.702 (silu) / 2.605 (norm) / 2.555 (both); batch 8 3.040 -> 3.020 /
# 2.920 / 2.872 — so both, up to batch 8 (the largest M bucket the batch-1 kernel serves).
EPILOGUE_MAX_M = BATCH1_MAX_M


def epilogue_ok(layer, m: int) -> bool:
    """Whether :func:`add_residual`, :func:`linear_normed` and :func:`silu_mul` run the batch-1 kernel for ``layer`` at
    ``m`` rows: a QuantLinear in ``fused`` mode (no bias, no activation quantization) with 2- or 4-bit affine weights
    the k-tiled layout takes, on a CUDA device, m <= EPILOGUE_MAX_M. Static properties only — callers decide before a
    graph is traced or captured, and the layer converts to the k-tiled layout at its first call as ``forward_fused``
    does."""
    from qwenquant.runtime.quant_linear import QuantLinear

    if not (isinstance(layer, QuantLinear) and layer.mode == "fused" and layer.fmt == "affine" and layer.bias is None
            and layer.act_bits is None and 1 <= m <= EPILOGUE_MAX_M and "ktiled" in FUSED_COPIES):
        return False
    bits, group = layer.meta["bits"], layer.meta["group_size"] or layer.in_features
    return (bits in B1.BITS_OK and KT.ktiled_ok(bits, group, layer.out_features, layer.in_features)
            and layer._device().type == "cuda")


def _batch1_call(layer, x: Tensor, kind: str, run) -> object:
    """The tuned tile of the batch-1 kernel variant ``kind`` for x [..., K]; ``run(x2, words, sz, bits, group, tile)``
    launches one tile, ``tile`` = (kernel, config) of ``_EPILOGUE_TILES``: ("batch1", (bn, kb, warps, stages,
    programs per SM or 0)) for ``wq_batch1``, ("batch1mma", (bn, warps, pairs)) for ``wq_batch1_mma``."""
    rows = x.numel() // max(1, x.shape[-1])
    if not epilogue_ok(layer, rows):
        raise ValueError(f"{kind}: this layer / input does not take the batch-1 kernel's epilogues (fused.epilogue_ok):"
                         f" mode {getattr(layer, 'mode', None)!r}, {rows} rows, {x.device}")
    bits, group = check_layer(layer, x)
    x2 = _rows(x, layer.in_features)
    ops = _operands(layer, bits, group)
    words, sz = ops.ktiled.words, ops.ktiled.sz
    key = (bits, group, layer.out_features, layer.in_features, m_bucket(x2.shape[0]), x2.dtype, kind)
    hit = TUNER.choices.get(key)
    mma = OFFER_BATCH1_MMA and W.runs_on(x2.device)
    name = hit[0] if hit else TUNER.pick(key, {n: (lambda t=t: run(x2, words, sz, bits, group, t))
                                               for n, t in _EPILOGUE_TILES.items()
                                               if (t[0] == "batch1mma" and mma)
                                               or (t[0] == "batch1" and _offered(persistent=t[1][4] > 0))})
    return run(x2, words, sz, bits, group, _EPILOGUE_TILES[name])


# the tiles the epilogue variants are tuned over, name -> (kernel, config): ``wq_batch1``'s as (bn, kb, warps, stages,
# programs per SM or 0) — no split-K (the epilogue needs each output's whole sum), the persistent ones too — and
# ``wq_batch1_mma``'s CONFIGS (a shape one cannot run raises in the tuner and is skipped)
_EPILOGUE_TILES = {**{batch1_name(cfg): ("batch1", (*cfg[:4], 0)) for cfg in BATCH1 if cfg[4] == 1},
                   **{batch1_persistent_name(cfg): ("batch1", cfg) for cfg in BATCH1_PERSISTENT},
                   **{batch1_mma_name(cfg): ("batch1mma", cfg) for cfg in Q.CONFIGS}}


def _tile_kw(tile: tuple) -> dict:
    """Keywords of one ``_EPILOGUE_TILES`` entry for its kernel's functions."""
    kind, c = tile
    if kind == "batch1mma":
        return dict(bn=c[0], warps=c[1], pairs=c[2])
    return dict(bn=c[0], kb=c[1], num_warps=c[2], num_stages=c[3], persist=c[4])


def _tile_lib(tile: tuple):
    """The module whose batch1 functions run a ``_EPILOGUE_TILES`` entry: (gemm, silu_mul, add_residual)."""
    if tile[0] == "batch1mma":
        return Q.batch1_mma_gemm, Q.batch1_mma_silu_mul, Q.batch1_mma_add_residual
    return B1.batch1_gemm, B1.batch1_silu_mul, B1.batch1_add_residual


def _rows(t: Tensor, n: int) -> Tensor:
    """t [..., n] as a contiguous [rows, n] (a view where it can be)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.is_contiguous() else t2.contiguous()


def _add_residual(layer, x: Tensor, residual: Tensor, norm_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(h, hw, ss): h = residual + layer(x) [..., N], hw = h · norm_weight (the next RMSNorm's weight) and ss
    [slots, M] fp32 partial sums of h² per row, in one launch (``wq_batch1.batch1_add_residual``). (hw, ss) is the
    next norm's output before its division by the root mean square: :func:`linear_normed` / :func:`silu_mul` take it
    in place of the normalized input. Raises where ``epilogue_ok`` is false."""
    r2 = _rows(residual, layer.out_features)
    h, hw, ss = _batch1_call(layer, x, "add_residual",
                             lambda x2, w, s, b, g, t: _tile_lib(t)[2](x2, w, s, b, g, r2, norm_weight, **_tile_kw(t)))
    return h.reshape(residual.shape), hw.reshape(residual.shape), ss


def _linear_normed(layer, hw: Tensor, ss: Tensor, eps: float) -> Tensor:
    """layer(RMSNorm(h) · weight) from :func:`add_residual`'s (hw, ss): the division by the root mean square happens
    on the projection's sums, inside its kernel. Raises where ``epilogue_ok`` is false."""
    y = _batch1_call(layer, hw, "normed", lambda x2, w, s, b, g, t: _tile_lib(t)[0](x2, w, s, b, g, norm=(eps, ss),
                                                                                    **_tile_kw(t)))
    return y.reshape(*hw.shape[:-1], layer.out_features)


def _silu_mul(layer, x: Tensor, norm: tuple[float, Tensor] | None = None) -> Tensor:
    """silu(gate) · up of a merged [gate; up] QuantLinear (``concat_out_features`` of gate and up): x [..., K] ->
    [..., N / 2], one launch (``wq_batch1.batch1_silu_mul``); ``norm`` = (eps, ss): x is :func:`add_residual`'s hw
    and the input norm finishes inside too (as in :func:`linear_normed`). Raises where ``epilogue_ok`` is false."""
    y = _batch1_call(layer, x, "silu_mul" if norm is None else "silu_mul normed",
                     lambda x2, w, s, b, g, t: _tile_lib(t)[1](x2, w, s, b, g, norm=norm, **_tile_kw(t)))
    return y.reshape(*x.shape[:-1], layer.out_features // 2)


# Triton launches behind a host-side tuner: opaque to torch.compile, as QuantLinear's GPU modes are
add_residual = torch.compiler.disable(_add_residual)
linear_normed = torch.compiler.disable(_linear_normed)
silu_mul = torch.compiler.disable(_silu_mul)
