"""Where the host time of one eager W4 GEMM call goes: each step of the wgmma / warp-specialized / k-tiled call path
timed alone on the host, at M = 16 (kernel shorter than any launch) and M = 2048 (the e2e prefill's M), qkv shape
(6144 x 4096, W4 g128).

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/launch_breakdown.py     # -> $OUT/launch_breakdown.json

Why: session 14's ``launch_overhead.py`` found 120-185 us of host time per eager wgmma call (bf16 cuBLAS: 30 us),
as long as the kernel itself, so an eager prefill of 144 such calls plus ~1700 other launches runs host-bound.
Per step: 200 calls back to back, host time per call (no sync inside), median of 5 trials. If a step's host time
grows with M, something in it waits for the GPU. The steps:
  - calibration: ``x.add_(0)`` (one torch launch) and bf16 ``torch.mm``;
  - pieces: ``runs_on``, ``check_operands``, the x TMA descriptor, the result allocation;
  - the kernel through Triton's JIT launch (``kernel[grid](...)``) with prebuilt operands;
  - the same compiled kernel through ``CompiledKernel.run`` (no binder, no cache key, no launch metadata);
  - the library wrappers (``wgmma_gemm``, ``wgmma_ws_gemm``, ``ktiled_gemm``) and the eager fused QuantLinear.
Then cProfile of 200 QuantLinear calls at M = 2048 (top 30 by own time, text).
"""

import cProfile
import io
import json
import os
import pstats
import time

import torch
import triton

from qwenquant.bench.gemm import W4
from qwenquant.bench.hw import environment
from qwenquant.kernels import launch as L
from qwenquant.kernels import wq_ktiled as KT
from qwenquant.kernels import wq_wgmma as W
from qwenquant.kernels import wq_wgmma_ws as WS
from qwenquant.numerics import quantize_weight
from qwenquant.runtime.quant_linear import QuantLinear

OUT = os.environ.get("OUT", ".")
n, k = 6144, 4096


def host_us(fn, calls: int = 200, trials: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(ts)[trials // 2]


def compiled_runner(ck, grid: int, args: tuple):
    """``CompiledKernel.run`` with the bound arguments (constexprs included, in signature order), as Triton's JIT
    launch ends, minus its binder, cache key and launch metadata."""
    stream = torch.cuda.current_stream().cuda_stream
    return lambda: ck.run(grid, 1, 1, stream, ck.function, ck.packed_metadata, None, None, None, *args)


def main() -> None:
    layer = QuantLinear.from_weight(quantize_weight(torch.randn(n, k, device="cuda") * 0.02, W4),
                                    compute_dtype=torch.bfloat16)
    layer.mode = "fused"
    from qwenquant.runtime import fused

    ops = fused._operands(layer, 4, 128, 2048)
    words, sz = ops.ktiled.words, ops.ktiled.sz
    doc = {"kind": "launch_breakdown", "env": environment(), "shape": [n, k], "host_us": {}}
    for m in (16, 2048):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        bm = 256
        xp = x if m >= bm else torch.cat([x, x.new_zeros(bm - m, k)])
        xd = W._x_descriptor(xp, bm, 2)
        grid = triton.cdiv(m, bm) * triton.cdiv(n, 128)
        wg_args = (xd, words, sz, y, y, y, m, n, k, 4, 128, 128, 4, 2, False, True)
        ck = W._wgmma_w_as_a_kernel[(grid, )](*wg_args[:9], BITS=4, GROUP=128, BN=128, STAGES=4, SPS=2,
                                              STREAMK=False, LOP3=True, num_warps=8)
        wd = WS._w_descriptor(words)
        ws_grid = triton.cdiv(m, bm) * triton.cdiv(n, WS.BN)
        ws_args = (xd, wd, sz, y, m, n, k, 4, 128, 4, 2, WS.WSTAGES, True, 0)
        ck_ws = WS._wgmma_ws_kernel[(ws_grid, )](*ws_args[:7], BITS=4, GROUP=128, STAGES=4, SPS=2, NWS=WS.WSTAGES,
                                                 LOP3=True, GM=0, num_warps=8, maxnreg=WS.MAXNREG)
        steps = {
            "torch add_ (one launch)": lambda: x.add_(0),
            "bf16 torch.mm": lambda: torch.mm(x, wb.T),
            "runs_on": lambda: W.runs_on(x.device),
            "check_operands": lambda: W.check_operands(x, words, sz, 4, 128),
            "x TMA descriptor (3-D)": lambda: W._x_descriptor(xp, bm, 2),
            "w TMA descriptor": lambda: WS._w_descriptor(words),
            "torch.empty result": lambda: torch.empty(m, n, device="cuda", dtype=torch.bfloat16),
            "wgmma JIT launch, operands prebuilt": lambda: W._wgmma_w_as_a_kernel[(grid, )](
                *wg_args[:9], BITS=4, GROUP=128, BN=128, STAGES=4, SPS=2, STREAMK=False, LOP3=True, num_warps=8),
            "wgmma CompiledKernel.run, operands prebuilt": compiled_runner(ck, grid, wg_args),
            "wgmma_ws JIT launch, operands prebuilt": lambda: WS._wgmma_ws_kernel[(ws_grid, )](
                *ws_args[:7], BITS=4, GROUP=128, STAGES=4, SPS=2, NWS=WS.WSTAGES, LOP3=True, GM=0, num_warps=8,
                maxnreg=WS.MAXNREG),
            "wgmma_ws CompiledKernel.run, operands prebuilt": compiled_runner(ck_ws, ws_grid, ws_args),
            "wgmma launch_kernel, operands prebuilt": lambda: L.launch_kernel(
                W._wgmma_w_as_a_kernel, (grid, ), wg_args[:9], BITS=4, GROUP=128, BN=128, STAGES=4, SPS=2,
                STREAMK=False, LOP3=True, num_warps=8),
        }
        wrappers = {
            "wgmma_gemm wrapper": lambda: W.wgmma_gemm(x, words, sz, 4, 128, 128, 256, 8, 4, 2, 0),
            "wgmma_ws_gemm wrapper": lambda: WS.wgmma_ws_gemm(x, words, sz, 4, 128, 256, 4, 2),
            "ktiled_gemm wrapper (bn64 s3 sk1)": lambda: KT.ktiled_gemm(x, words, sz, 4, 128, 16, 64, True, 1, 4, 3, True),
            "ktiled_gemm wrapper (bn64 s3 sk4)": lambda: KT.ktiled_gemm(x, words, sz, 4, 128, 16, 64, True, 4, 4, 3, True),
            "QuantLinear fused (tuned)": lambda: layer(x),
        }
        for name, fn in wrappers.items():  # each through the cached launch and through Triton's (launch.ENABLED)
            for on in (True, False):
                steps[f"{name}, {'cached' if on else 'triton'} launch"] = (
                    lambda fn=fn, on=on: (setattr(L, "ENABLED", on), fn())[1])
        rec = {}
        for name, fn in steps.items():
            try:
                rec[name] = host_us(fn)
            except Exception as e:  # one failing step must not hide the others
                rec[name] = f"error: {type(e).__name__}: {str(e)[:160]}"
            print(m, name, rec[name] if isinstance(rec[name], str) else round(rec[name], 1), flush=True)
        doc["host_us"][str(m)] = rec
        L.ENABLED = True
        if m == 2048:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                layer(x)
            prof.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
            doc["cprofile_quantlinear_m2048"] = s.getvalue()
            print(s.getvalue()[:6000], flush=True)
        doc["tuned_choice"] = [t for t in fused.TUNER.table()]
        with open(os.path.join(OUT, "launch_breakdown.json"), "w") as f:
            json.dump(doc, f, default=str, indent=1)


if __name__ == "__main__":
    main()
