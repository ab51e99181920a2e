"""Pick the fastest of a few candidate callables by timing them (near ties three times), and remember the choice.

Used by ``fused`` (which tile configuration, per weight shape and M bucket) and ``auto`` (which
execution mode). The cache is an explicit object, keyed by plain tuples (bits, group, N, K, M
bucket, …) — the same idea as Triton's autotune cache, but the candidates may be whole host-side
paths (split-K with a zeroed fp32 buffer, dequantize-then-cuBLAS), which Triton's autotuner cannot
express. Timing needs the GPU idle and no CUDA graph being captured: warm a model up (one eager
forward per batch size) before capturing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch


def m_bucket(m: int) -> int:
    """Rows of x -> the power of two at or above it (1, 2, 4, …): one tuning decision per bucket."""
    return 1 << max(0, (m - 1).bit_length())


@dataclass
class Tuner:
    """key -> (chosen name, {name: median ms}) for every candidate that ran."""

    name: str
    fixed: bool = False  # True: take the first candidate without timing (tests: correctness, not speed)
    choices: dict[Hashable, tuple[str, dict[str, float]]] = field(default_factory=dict)

    def pick(self, key: Hashable, candidates: dict[str, Callable[[], object]], rep_ms: int = 15) -> str:
        if key in self.choices:
            return self.choices[key][0]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{self.name}: no tuned choice for {key} and a CUDA graph is being captured; "
                "run the model eagerly once at this batch size before capturing"
            )
        if self.fixed:
            return next(iter(candidates))
        import triton.testing

        times: dict[str, float] = {}
        for cname, fn in candidates.items():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 — a tile config may not compile (shared memory), or not fit the shape
                times[cname] = float("inf")
                _errors.append(f"{self.name} {key} {cname}: {e}")
                continue
            # graph replay: eager timing of a 10 µs kernel measures Python launch overhead, not the kernel
            torch.cuda.synchronize()
            times[cname] = _time_cold(fn, rep_ms)
        best = min(times, key=times.get)
        if times[best] == float("inf"):
            raise ValueError(f"{self.name}: no candidate ran for {key}: {_errors[-len(times):]}")
        best, times = _retime_near_ties(times, candidates, rep_ms)
        self.choices[key] = (best, times)
        return best

    def table(self) -> list[dict]:
        """The decisions so far, JSON-able (for benchmark reports)."""
        return [{"key": list(k) if isinstance(k, tuple) else k, "choice": c, "ms": t} for k, (c, t) in self.choices.items()]


_errors: list[str] = []
# the (at most RETIME_MAX) candidates within NEAR_TIE of the fastest first timing are timed RETIME_ROUNDS more times,
# round-robin, and ranked by the median of all their timings. One cold timing of a 10-25 us kernel moves by ~0.5 us
# between calls; on an H100 the M = 1 tuner once kept a down_proj tile 4 % slower than the next one (14.7 vs 15.0 us as timed, 14.5 vs 13.8 us
# in the round-robin benchmark of the same run: benchmarks/NOTES.md, session 15)
NEAR_TIE = 0.05
RETIME_ROUNDS = 2
RETIME_MAX = 3


def _retime_near_ties(times: dict[str, float], candidates: dict[str, Callable[[], object]],
                      rep_ms: int) -> tuple[str, dict[str, float]]:
    """(choice, times): the (at most RETIME_MAX) fastest candidates within NEAR_TIE of the first timings' best are
    timed RETIME_ROUNDS more times, round-robin (one of each, then the next round, so a clock drift lands on all of
    them alike); their entries become the median of all their timings and the choice is the fastest of them — a near
    tie beyond RETIME_MAX keeps its one timing and cannot win on it."""
    first = min(times.values())
    close = sorted((c for c, t in times.items() if t <= first * (1 + NEAR_TIE)), key=times.get)[:RETIME_MAX]
    if len(close) < 2:
        return close[0], times
    samples = {c: [times[c]] for c in close}
    for _ in range(RETIME_ROUNDS):
        for c in close:
            samples[c].append(_time_cold(candidates[c], rep_ms))
    out = dict(times)
    for c, v in samples.items():
        out[c] = sorted(v)[len(v) // 2]
    return min(close, key=out.get), out


_flush: dict[str, tuple[torch.Tensor, float]] = {}


def _time_cold(fn: Callable[[], object], rep_ms: int) -> float:
    """Median ms of ``fn`` with the weights coming from DRAM, as in a model's forward (each layer's weight is
    read once per step, long evicted from L2 by the others): every graph replay first reads a buffer of twice
    the L2 size (a read, so L2 holds clean lines and ``fn`` pays no write-backs), and that read's own median
    time is subtracted. Timing ``fn`` alone replays it on an
    L2-hot weight (a Qwen3-8B gate/up projection, 25 MB at 4-bit, fits the H100's 50 MB L2) and picked tiles
    that were 10 % slower cold (benchmarks/NOTES.md, session 5)."""
    import triton.testing

    dev = str(torch.cuda.current_device())
    if dev not in _flush:
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20)
        buf = torch.ones(2 * max(l2, 2**20) // 4, dtype=torch.float32, device="cuda")
        _flush[dev] = (buf, float(triton.testing.do_bench_cudagraph(buf.sum, rep=rep_ms, return_mode="median")))
    buf, flush_ms = _flush[dev]

    def cold():
        buf.sum()
        fn()

    return max(0.0, float(triton.testing.do_bench_cudagraph(cold, rep=rep_ms, return_mode="median")) - flush_ms)
