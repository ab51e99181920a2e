"""Where one Qwen3-8B decode step spends its time, per mode: kernel-by-kernel from the CUDA graph replay.

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/profile_e2e.py   (JSON -> $OUT/profile_e2e.json)

For each mode (bf16, then ``E2E_PROFILE_MODES``, default ``w4g128-fused``) and batch (``E2E_PROFILE_BATCHES``,
default 1; ``E2E_PROFILE_SEPARATE=1``: the HF layout's seven projections instead of merged qkv / gate_up) the
compiled decode step of ``bench.e2e`` is captured in a CUDA graph, replayed a few times under
``torch.profiler`` and its kernels grouped into classes (W4 GEMM, bf16 GEMM = lm_head, attention, the
compiled elementwise regions, memsets/copies). ``step_ms`` is the e2e benchmark's graph-replay median (``e2e._graph_ms``); ``kernel_ms`` the
sum of kernel durations per step; the difference is the time between kernels (launch gaps inside the
graph, dependencies). Random weights of the published shape, as in the e2e benchmark.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch

from qwenquant.bench import e2e
from qwenquant.bench.hw import environment

OUT = os.environ.get("OUT", "runs/profile_e2e")
MODES = [m for m in os.environ.get("E2E_PROFILE_MODES", "w4g128-fused").split(",") if m]
BATCHES = [int(b) for b in os.environ.get("E2E_PROFILE_BATCHES", "1").split(",")]
REPLAYS = 5

# first matching pattern names the class of a kernel
CLASSES = [
    ("w4_gemm", r"ktiled|wq_|_gemv|tinygemm|_weight_int4|unpack|dequant"),
    ("int8_fp8", r"int8|act_quant|fp8|scaled_mm"),
    ("bf16_gemm", r"gemm|gemv|cutlass|sm90_xmma|nvjet|Kernel2|splitK"),
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


@torch.no_grad()
def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    model = e2e.build_model()
    originals = [getattr(p, n).weight.detach().to("cpu") for p, n in e2e.decoder_linears(model)]
    merged = not os.environ.get("E2E_PROFILE_SEPARATE")  # the e2e benchmark's default layout: merged qkv, gate_up
    if merged:
        e2e.merge_projections(model)
    doc = {"kind": "profile_e2e", "env": environment(), "ctx": e2e.CTX, "merged_projections": merged, "results": []}
    for label in ["bf16", *MODES]:
        if label != "bf16":
            spec, mode = e2e.E2E_MODES[label]
            e2e.quantize_model(model, originals, spec, mode)
        for b in BATCHES:
            dec = e2e.StaticDecoder(model, b, compiled=True)
            r = {"mode": label, "batch": b, **profile_step(dec.step)}
            doc["results"].append(r)
            print(label, b, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k in ("step_ms", "kernel_ms", "kernels_per_step")},
                  {k: (round(v["kernels"]), round(v["ms"], 3)) for k, v in r["by_class"].items()}, flush=True)
            del dec
            torch.cuda.empty_cache()
            with open(os.path.join(OUT, "profile_e2e.json"), "w") as f:
                json.dump(doc, f, default=str, indent=1)


if __name__ == "__main__":
    main()
