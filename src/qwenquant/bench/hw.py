"""What a benchmark result must carry: the machine, the software, the commit; and the two ceilings
(copy bandwidth, matmul peaks) measured in the same run, so every timing can be read against its floor."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch


def environment() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import triton

        triton_version = triton.__version__
    except ModuleNotFoundError:
        triton_version = None
    commit = os.environ.get("QWENQUANT_COMMIT") or run(["git", "rev-parse", "HEAD"]) or "unknown"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                   l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                   driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    return env


def _time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and dense matmul peaks (bf16, fp8, int8), random data."""
    dev = "cuda"
    src = torch.randn(2**28, device=dev, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    t = _time_ms(lambda: dst.copy_(src))
    out = {"copy_bytes_per_s": 2 * src.numel() * 4 / (t * 1e-3)}
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    flops = 2 * n**3
    out["bf16_flops_per_s"] = flops / (_time_ms(lambda: a @ b.T) * 1e-3)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
    out["fp8_flops_per_s"] = flops / (_time_ms(lambda: torch._scaled_mm(a8, b8.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)) * 1e-3)
    out["fp8_rowwise_flops_per_s"] = flops / (_time_ms(lambda: torch._scaled_mm(a8, b8.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)) * 1e-3)
    ai = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
    out["int8_ops_per_s"] = flops / (_time_ms(lambda: torch._int_mm(ai, bi.T)) * 1e-3)
    return out
