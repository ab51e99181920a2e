"""Where one Qwen3-8B decode step spends its time, per mode: kernel-by-kernel from the CUDA graph replay.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/profile_e2e.py   (JSON -> $OUT/profile_e2e.json)

For each mode (bf16, then ``E2E_PROFILE_MODES``, default ``w4g128-fused``) and batch (``E2E_PROFILE_BATCHES``,
default 1; ``E2E_PROFILE_SEPARATE=1``: the HF layout's seven projections instead of merged qkv / gate_up) the
compiled decode step of ``bench.e2e`` is captured in a CUDA graph, replayed a few times under
``torch.profiler`` and its kernels grouped into classes (W4 GEMM, bf16 GEMM = lm_head, attention, the
compiled elementwise regions, memsets/copies). ``step_ms`` is the e2e benchmark's graph-replay median (``e2e._graph_ms``); ``kernel_ms`` the
sum of kernel durations per step; the difference is the time between kernels (launch gaps inside the
graph, dependencies). Random weights of the published shape, as in the e2e benchmark.
``E2E_PROFILE_PREFILL=1`` also profiles one eager 2048-token prefill per mode (``profile_prefill``: GPU busy and idle
time, time in CUDA launch calls on the host) — written in session 13 for its prefill regression, not yet run;
``E2E_PROFILE_BATCHES=`` (empty) skips the decode steps. ``E2E_PROFILE_ATTEND``: the decode attention
(``bench.e2e.ATTEND``: ``filled`` SDPA, the default; ``split`` our split-K kernels; ``prep`` split after our q / k
norm + rotary + cache-write kernel; ``masked``). Each layer's last residual add is folded into the next layer's norm
(``StaticDecoder(fold_norm=True)``, the e2e default since session 18; ``E2E_PROFILE_FOLD=0`` runs the add alone).
``E2E_PROFILE_EPILOGUES=0``: without ``StaticDecoder(epilogues=True)`` (the e2e default since session 20: the residual
adds, RMSNorms and SiLU·mul inside the batch-1 W4 kernels). ``E2E_PROFILE_RELEASE`` (with ``QWENQUANT_PDL=1``):
``exit`` (default), ``start`` (``overlap.RELEASE_AT_START``: every PDL kernel of ours releases the next one right
after its wait) or ``attention`` (``overlap.ATTENTION_RELEASE_AT_START``) — session 22's open question: why releasing
at the start costs the W4 step 0.37 ms. With PDL a kernel's profiled duration includes its programs' time parked at
the wait, so compare per-class kernel time and the step time together.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch

from qwenquant.bench import e2e
from qwenquant.bench.hw import environment
from qwenquant.kernels import overlap

OUT = os.environ.get("OUT", "runs/profile_e2e")
MODES = [m for m in os.environ.get("E2E_PROFILE_MODES", "w4g128-fused").split(",") if m]
BATCHES = [int(b) for b in os.environ.get("E2E_PROFILE_BATCHES", "1").split(",") if b]
ATTEND = os.environ.get("E2E_PROFILE_ATTEND", "filled")
FOLD = os.environ.get("E2E_PROFILE_FOLD", "1") != "0"
EPILOGUES = os.environ.get("E2E_PROFILE_EPILOGUES", "1") != "0"
RELEASE = os.environ.get("E2E_PROFILE_RELEASE", "exit")
if RELEASE not in ("exit", "start", "attention"):
    raise SystemExit(f"E2E_PROFILE_RELEASE={RELEASE!r}: expected exit, start or attention")
if ATTEND not in e2e.ATTEND:
    raise SystemExit(f"E2E_PROFILE_ATTEND={ATTEND!r}: expected one of {', '.join(e2e.ATTEND)}")
REPLAYS = 5

# first matching pattern names the class of a kernel
CLASSES = [
    ("w4_gemm", r"ktiled|wq_|wgmma|batch1|_gemv|tinygemm|_weight_int4|unpack|dequant"),
    ("int8_fp8", r"int8|act_quant|fp8|scaled_mm"),
    ("bf16_gemm", r"gemm|gemv|cutlass|sm90_xmma|nvjet|Kernel2|splitK"),
    ("attention_prep", r"_decode_prep"),  # q / k norm + rotary + cache write in one kernel (attend="prep")
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("memset_copy", r"memset|memcpy|Memset|Memcpy|copy_kernel|fill"),
    ("compiled_elementwise", r"triton_|poi_|red_|per_fused"),
]


def classify(name: str) -> str:
    for cls, pat in CLASSES:
        if re.search(pat, name):
            return cls
    return "other"


def profile_step(step, replays: int = REPLAYS) -> dict:
    step_ms = e2e._graph_ms(step)  # the e2e benchmark's own timing of the step (warm-up + graph replay median)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
        with torch.cuda.graph(g):
            step()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name][0] += 1
            by_name[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    by_class: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, (n, us) in by_name.items():
        c = by_class[classify(name)]
        c[0] += n / replays
        c[1] += us / replays / 1e3
    top = sorted(((us / replays / 1e3, n / replays, name) for name, (n, us) in by_name.items()), reverse=True)[:40]
    kernel_ms = sum(v[1] for v in by_class.values())
    return {"step_ms": step_ms, "kernel_ms": kernel_ms, "kernels_per_step": sum(v[0] for v in by_class.values()),
            "by_class": {k: {"kernels": v[0], "ms": v[1]} for k, v in sorted(by_class.items(), key=lambda kv: -kv[1][1])},
            "top": [{"ms": ms, "per_step": n, "name": name[:160]} for ms, n, name in top]}


def profile_prefill(model, tokens: int = 2048) -> dict:
    """One eager prefill of ``tokens`` (``e2e.prefill_logits``, as ``bench e2e`` times it) under torch.profiler: wall
    time, the sum of kernel times, the GPU's idle time (wall minus the union of kernel intervals) and, on the host,
    the time spent in CUDA launch calls. Session 13's prefill ran ≈ 250 µs per eager W4 GEMM call slower than its
    kernels; idle GPU time with long launch calls would say the host is the limit."""
    import time

    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=dev)
    e2e.prefill_logits(model, ids)  # warm-up: tuning, compilation
    sync()
    t0 = time.perf_counter()
    e2e.prefill_logits(model, ids)
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        e2e.prefill_logits(model, ids)
        sync()
    kernels, launches = [], defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end, e.name))
        elif "Launch" in e.name or e.name.startswith(("cuLaunch", "cudaLaunch")):
            launches[e.name][0] += 1
            launches[e.name][1] += e.time_range.end - e.time_range.start
    kernels.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for a, b, _ in kernels:  # union of the kernel intervals (µs)
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        busy += cur_e - cur_s
    span = (kernels[-1][1] - kernels[0][0]) if kernels else 0.0
    by_class: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for a, b, name in kernels:
        by_class[classify(name)][0] += 1
        by_class[classify(name)][1] += (b - a) / 1e3
    return {"prefill_wall_ms": wall_ms, "kernel_span_ms": span / 1e3, "gpu_busy_ms": busy / 1e3,
            "gpu_idle_ms": (span - busy) / 1e3, "kernels": len(kernels),
            "by_class": {k: {"kernels": v[0], "ms": v[1]} for k, v in sorted(by_class.items(), key=lambda kv: -kv[1][1])},
            "launch_calls": {k: {"calls": v[0], "host_ms": v[1] / 1e3} for k, v in launches.items()}}


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    overlap.RELEASE_AT_START = RELEASE == "start"
    overlap.ATTENTION_RELEASE_AT_START = RELEASE == "attention"
    model = e2e.build_model()
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]
    head = model.lm_head.weight.detach().to("cpu")  # the bf16 lm_head, for the +head modes
    merged = not os.environ.get("E2E_PROFILE_SEPARATE")  # the e2e benchmark's default layout: merged qkv, gate_up
    if merged:
        e2e.merge_projections(model)
    doc = {"kind": "profile_e2e", "env": environment(), "ctx": e2e.CTX, "merged_projections": merged, "attend": ATTEND,
           "fold_norm": FOLD,
           "epilogues": EPILOGUES, "pdl": overlap.PDL_ENABLED, "release": RELEASE, "results": []}
    for label in ["bf16", *MODES]:
        if label != "bf16":
            spec, mode, with_head = e2e.E2E_MODES[label]
            e2e.quantize_model(model, originals, spec, mode, head=head, quantize_head=with_head)
        if os.environ.get("E2E_PROFILE_PREFILL") == "1":
            r = {"mode": label, "prefill": profile_prefill(model)}
            doc["results"].append(r)
            print(label, "prefill", {k: round(v, 2) if isinstance(v, float) else v for k, v in r["prefill"].items()},
                  flush=True)
            torch.cuda.empty_cache()
        for b in BATCHES:
            dec = e2e.StaticDecoder(model, b, compiled=True, attend=ATTEND, fold_norm=FOLD, epilogues=EPILOGUES)
            r = {"mode": label, "batch": b, "epilogues": dec.epilogues, **profile_step(dec.step)}
            doc["results"].append(r)
            print(label, b, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k in ("step_ms", "kernel_ms", "kernels_per_step")},
                  {k: (round(v["kernels"]), round(v["ms"], 3)) for k, v in r["by_class"].items()}, flush=True)
            del dec
            torch.cuda.empty_cache()
        with open(os.path.join(OUT, "profile_e2e.json"), "w") as f:  # after each mode (a prefill-only run too)
            json.dump(doc, f, default=str, indent=1)


if __name__ == "__main__":
    main()
