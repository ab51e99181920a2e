"""Per-GEMM benchmark: Qwen3 linear shapes × rows M × execution modes, against bf16 in the same run.

Every timing is the median of CUDA-graph replays (launch overhead out, as in a graph-captured
decoder), the modes of one M timed round-robin (``time_interleaved``), over R copies of the weight,
R chosen so the copies overflow L2 (a weight that stays in L2 would measure the cache, not HBM). Each result carries its floor, ``max(bytes / copy
bandwidth, flops / matmul peak)``, with both ceilings measured in this run, and its ratio to bf16.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qwenquant.numerics import QuantSpec, quantize_weight
from qwenquant.runtime.quant_linear import QuantLinear

log = logging.getLogger(__name__)

# (out N, in K) per projection; "x2" projections occur twice per layer (k/v, gate/up)
MODEL_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "qwen3-0.6b": {"q": (2048, 1024), "k|v": (1024, 1024), "o": (1024, 2048), "gate|up": (3072, 1024), "down": (1024, 3072)},
    "qwen3-8b": {"q": (4096, 4096), "k|v": (1024, 4096), "o": (4096, 4096), "gate|up": (12288, 4096), "down": (4096, 12288)},
    # the same layer as serving engines run it: [q|k|v] and [gate|up] merged (bench.e2e.merge_projections)
    "qwen3-8b-merged": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
    "qwen3-32b": {"q": (8192, 5120), "k|v": (1024, 5120), "o": (5120, 8192), "gate|up": (25600, 5120), "down": (5120, 25600)},
    "qwen3-30b-a3b": {"q": (4096, 2048), "k|v": (512, 2048), "o": (2048, 4096), "expert gate|up": (768, 2048), "expert down": (2048, 768)},
}
ROWS = [2**i for i in range(14)]  # 1 … 8192
L2_OVERFLOW_BYTES = 200 * 2**20


def l2_copies(nbytes: int, least: int = 1, most: int = 32) -> int:
    """How many copies of an ``nbytes`` weight a timing cycles through so that together they overflow L2
    (``L2_OVERFLOW_BYTES``; a weight left in L2 would time the cache, not HBM), within [least, most]."""
    return max(least, min(most, -(-L2_OVERFLOW_BYTES // max(1, nbytes))))


@dataclass
class GemmResult:
    model: str
    proj: str
    n: int
    k: int
    m: int
    mode: str
    ms: float
    weight_bytes: int  # resident: the stored weight plus any repacked copy the mode built
    floor_bytes: int  # what one kernel must read of the weight (one copy), the floor's byte count
    floor_ms: float
    frac_of_floor: float
    speedup_vs_bf16: float | None
    rel_err: float | None


@dataclass(frozen=True)
class Mode:
    """How to run one GEMM: the weight it needs (None = bf16) and the call."""

    weight: QuantSpec | None
    call: Callable  # (obj, x) -> y ; obj = bf16 tensor or QuantLinear or a prepared baseline
    compute: str = "bf16"  # which peak bounds it: bf16 | int8 | fp8
    prepare: Callable | None = None  # QuantLinear -> obj (baselines with their own layout)
    rows: tuple[int, ...] | None = None  # restrict M (slow baselines)


def _tinygemm_prepare(layer: QuantLinear):
    """torch's int4 kernel alone (``_weight_int4pack_mm``, tinygemm), on ``fused``'s repacked operands."""
    from qwenquant.runtime.fused import tinygemm_operands

    group = layer.meta["group_size"] or layer.in_features
    return tinygemm_operands(layer.qweight, layer.scale, layer.zero, group)


def _tinygemm_call(obj, x):
    return torch.ops.aten._weight_int4pack_mm(x, obj.packed, obj.group, obj.scale_zero)


def _dq_mm(x, words, s, z):
    n, kw = words.shape
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    c = ((words.unsqueeze(-1) >> shifts) & 15).reshape(n, s.shape[1], -1).float()
    w = ((c - z.float().unsqueeze(-1)) * s.float().unsqueeze(-1)).reshape(n, kw * 8).to(x.dtype)
    return x @ w.T


_compiled_dq_mm = None


def _compiled_prepare(layer: QuantLinear):
    return (layer.qweight.view(torch.int32), layer.scale, layer.zero)


def _compiled_call(obj, x):
    global _compiled_dq_mm
    if _compiled_dq_mm is None:
        _compiled_dq_mm = torch.compile(_dq_mm, dynamic=False)
    return _compiled_dq_mm(x, *obj)


def _native_fp8(layer, x):
    from qwenquant.runtime.native import forward_native_fp8

    return forward_native_fp8(layer, x)


def _set_mode(mode: str):
    def prep(layer: QuantLinear):
        layer.mode = mode
        return layer
    return prep


W4 = QuantSpec(4, 128, False)
W8 = QuantSpec(8, None, True)

MODES: dict[str, Mode] = {
    "bf16": Mode(None, lambda w, x: F.linear(x, w)),
    # storage only: one Triton unpack of the whole weight to bf16 per call, then cuBLAS
    "w4g128-dequant": Mode(W4, lambda l, x: l(x), prepare=_set_mode("dequant")),
    "w4g128-fused": Mode(W4, lambda l, x: l(x), prepare=_set_mode("fused")),
    "w4g128-auto": Mode(W4, lambda l, x: l(x), prepare=_set_mode("auto")),
    "w4g128-tinygemm": Mode(W4, _tinygemm_call, prepare=_tinygemm_prepare),
    "w4g128-compiled-dequant": Mode(W4, _compiled_call, prepare=_compiled_prepare, rows=(1, 16, 256, 4096)),
    "w8-fused": Mode(W8, lambda l, x: l(x), prepare=_set_mode("fused")),
    "w8a8-int8-native": Mode(W8, lambda l, x: l(x), compute="int8", prepare=_set_mode("native")),
    "w8a8-fp8-native": Mode(W8, _native_fp8, compute="fp8", prepare=_set_mode("fake")),
}


def _bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, QuantLinear):
        return obj.resident_bytes
    if hasattr(obj, "nbytes"):  # prepared operand objects (tinygemm's) say their own size
        return obj.nbytes
    return sum(_bytes(t) for t in obj if isinstance(t, torch.Tensor))


def _read_bytes(obj) -> int:
    """Bytes of one copy of the weight: a QuantLinear's storage format (every fused kernel reads one copy of
    about that size, whichever repacked copies it keeps beside it), else the object's bytes."""
    return obj.storage_bytes if isinstance(obj, QuantLinear) else _bytes(obj)


class GraphTimer:
    """``fn`` (already warm: tuned, compiled) captured once in a CUDA graph; each ``trial()`` replays it n times
    back to back (n calibrated so a trial lasts at least ``min_ms``) and returns ms per call."""

    def __init__(self, fn: Callable[[], object], min_ms: float = 20.0):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()
        self.graph.replay()
        torch.cuda.synchronize()
        self.n = 1
        self.n = max(1, int(min_ms / max(self.trial(), 1e-3)))

    def trial(self) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(self.n):
            self.graph.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / self.n


def time_graph(fn: Callable[[], object], min_ms: float = 20.0, trials: int = 5) -> float:
    """Median ms of one ``fn()`` replayed from a CUDA graph (fn must already be warm: tuned, compiled)."""
    return time_interleaved({"fn": fn}, min_ms, trials)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], min_ms: float = 20.0, trials: int = 5) -> dict[str, float]:
    """Median ms per call of each warm candidate, its trials taken round-robin with the others' (trial 1 of every
    candidate, then trial 2 …): the clock drifts of a long run (boost, heating) land on every candidate alike instead
    of on whichever was timed last, so ratios between them hold. Timing candidates one after the other moved the
    same kernel's ratio to bf16 by ±10 % between runs (benchmarks/NOTES.md, session 11 item 8)."""
    timers = {name: GraphTimer(fn, min_ms) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(trials):
        for name, t in timers.items():
            times[name].append(t.trial())
    del timers
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def _prepare(name: str, mode: Mode, w_bf16: torch.Tensor, layers: dict) -> list | None:
    """The copies of one mode's weight that a timing cycles through: enough to overflow L2 (each its own prepared
    weight), or None where the mode cannot take this weight."""
    base = w_bf16 if mode.weight is None else layers[mode.weight]
    try:
        obj0 = base if mode.prepare is None else mode.prepare(copy.deepcopy(base))
    except (RuntimeError, ValueError) as e:
        log.warning("%s %s: cannot prepare: %s", name, tuple(w_bf16.shape), e)
        return None
    reps = l2_copies(_bytes(obj0))
    return [obj0] + [(base.clone() if mode.weight is None else (copy.deepcopy(base) if mode.prepare is None else mode.prepare(copy.deepcopy(base))))
                     for _ in range(reps - 1)]


def bench_shape(model: str, proj: str, n: int, k: int, rows, modes: dict[str, Mode], ceil: dict, seed: int = 0) -> list[GemmResult]:
    """Every mode at every M of one weight shape. Per M, all modes are warmed up (tuning, compilation) and checked
    against the fp32 product first, then timed together (``time_interleaved``), bf16 among them."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(seed)
    w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.float32) * 0.02
    w_bf16 = w.to(torch.bfloat16)
    layers: dict[QuantSpec, QuantLinear] = {}
    for mode in modes.values():
        if mode.weight is not None and mode.weight not in layers:
            layers[mode.weight] = QuantLinear.from_weight(quantize_weight(w, mode.weight), compute_dtype=torch.bfloat16)
    del w
    copies = {name: c for name, mode in modes.items() if (c := _prepare(name, mode, w_bf16, layers)) is not None}
    ref_ws = {spec: layer.dequantized_weight(torch.float32) for spec, layer in layers.items()}
    results: list[GemmResult] = []
    for m in rows:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        calls, errs, refs = {}, {}, {}  # refs: the fp32 product per weight (None: bf16), shared by its modes
        for name, objs in copies.items():
            mode = modes[name]
            if mode.rows is not None and m not in mode.rows:
                continue
            try:
                y = None
                for o in objs:  # eager warm-up: tuning, compilation, native operand build
                    y = mode.call(o, x)
                if mode.weight not in refs:
                    refs[mode.weight] = x.float() @ (w_bf16.float() if mode.weight is None else ref_ws[mode.weight]).T
                ref = refs[mode.weight]
                errs[name] = float((y.float() - ref).norm() / ref.norm())
                calls[name] = (lambda mode=mode, objs=objs: [mode.call(o, x) for o in objs])
            except (RuntimeError, ValueError) as e:
                log.warning("%s %s m=%d failed: %s", name, (n, k), m, str(e).splitlines()[0][:200])
        try:
            ms_all = time_interleaved(calls)
        except (RuntimeError, ValueError) as e:  # one capture failing: time the others one by one
            log.warning("%s m=%d: interleaved timing failed (%s); timing modes one by one", (n, k), m, str(e)[:200])
            ms_all = {}
            for name, fn in calls.items():
                try:
                    ms_all[name] = time_graph(fn)
                except (RuntimeError, ValueError) as e2:
                    log.warning("%s %s m=%d failed: %s", name, (n, k), m, str(e2).splitlines()[0][:200])
        for name, ms_copies in ms_all.items():
            mode, objs = modes[name], copies[name]
            ms = ms_copies / len(objs)
            flops = 2 * m * n * k
            peak = {"bf16": ceil["bf16_flops_per_s"], "int8": ceil["int8_ops_per_s"], "fp8": ceil["fp8_rowwise_flops_per_s"]}[mode.compute]
            fbytes = _read_bytes(objs[0])
            bytes_moved = fbytes + 2 * m * k + 2 * m * n
            floor = max(bytes_moved / ceil["copy_bytes_per_s"], flops / peak) * 1e3
            bf16 = ms_all["bf16"] / len(copies["bf16"]) if "bf16" in ms_all else None
            results.append(GemmResult(model, proj, n, k, m, name, ms, _bytes(objs[0]), fbytes, floor, floor / ms,
                                      bf16 / ms if bf16 else None, errs[name]))
        del calls, refs
    del copies
    torch.cuda.empty_cache()
    return results


def run(models=("qwen3-8b",), rows=ROWS, modes: list[str] | None = None, ceil: dict | None = None,
        other_rows=(1, 16, 256, 4096)) -> dict:
    from qwenquant.bench.hw import ceilings, environment
    from qwenquant.kernels import overlap
    from qwenquant.runtime import auto, fused

    ceil = ceil or ceilings()
    sel = {k: v for k, v in MODES.items() if modes is None or k in modes or k == "bf16"}
    out = []
    for model in models:
        r = rows if model.startswith("qwen3-8b") else other_rows
        for proj, (n, k) in MODEL_SHAPES[model].items():
            log.info("gemm %s %s %dx%d", model, proj, n, k)
            out += bench_shape(model, proj, n, k, r, sel, ceil)
    return {"kind": "gemm", "env": environment(), "ceilings": ceil, "fused_weights": fused.describe_weights(),
            "pdl": overlap.pdl_ok("cuda"), "timing": "round-robin",  # bench_shape: time_interleaved per M
            "wgmma_ws": fused.OFFER_WGMMA_WS,  # whether the tuner was offered the warp-specialized tiles
            "results": [asdict(x) for x in out],
            "tuning": {"fused": fused.TUNER.table(), "auto": auto.TUNER.table()}}
