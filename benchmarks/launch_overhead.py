"""Host time per eager call of the M = 2048 GEMMs (qkv shape, 6144 x 4096, W4 g128): bf16 cuBLAS, the wgmma tile
and the warp-specialized tile — the e2e prefill runs eagerly, so a launch slower than its kernel leaves the GPU idle.

    PYTHONPATH=src python3 benchmarks/launch_overhead.py     # -> $OUT/launch_overhead.json

Per candidate: 50 calls back to back; host = time to enqueue them (no sync), wall = until the GPU finished them,
gpu = CUDA-event time of the same 50; median of 3 trials. Random words and scales for the direct kernel calls (only
timing is read there); the eager fused QuantLinear goes through the library's own dispatch (forward_fused, the
tuner's lookup), as the e2e prefill does. Run it twice, with QWENQUANT_WGMMA_WS=0 and =1 (read at import).
"""

import json
import os
import time

import torch

from qwenquant.kernels import wq_wgmma as W
from qwenquant.kernels import wq_wgmma_ws as WS

n, k, m = 6144, 4096, 2048
words = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32)
sz = ((torch.rand(k // 128, n, device="cuda") * 0.01).half().view(torch.int16).int() << 16) | 8
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
# the e2e prefill's own path too: an eager fused QuantLinear (forward_fused -> tuner lookup -> the tuned kernel)
from qwenquant.bench.gemm import W4  # noqa: E402
from qwenquant.numerics import quantize_weight  # noqa: E402
from qwenquant.runtime.quant_linear import QuantLinear  # noqa: E402

layer = QuantLinear.from_weight(quantize_weight(torch.randn(n, k, device="cuda") * 0.02, W4), compute_dtype=torch.bfloat16)
layer.mode = "fused"
cands = {"bf16": lambda: torch.mm(x, wb.T),
         "QuantLinear fused (tuned)": lambda: layer(x),
         "wgmma bn128 bm256 w8 s4 sps2": lambda: W.wgmma_gemm(x, words, sz, 4, 128, 128, 256, 8, 4, 2, 0),
         "wgmma-ws bm256 s4 sps2": lambda: WS.wgmma_ws_gemm(x, words, sz, 4, 128, 256, 4, 2)}
out = {}
for name, fn in cands.items():
    fn(); fn()  # compile, tune
    torch.cuda.synchronize()
    trials = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        for _ in range(50):
            fn()
        b.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        trials.append({"host_us": (t1 - t0) / 50 * 1e6, "wall_us": (t2 - t0) / 50 * 1e6,
                       "gpu_us": a.elapsed_time(b) / 50 * 1e3})
    out[name] = {key: sorted(t[key] for t in trials)[1] for key in trials[0]}  # median of 3
    out[name]["trials"] = trials
    print(name, {key: round(v, 1) for key, v in out[name].items() if key != "trials"}, flush=True)
if "QuantLinear fused (tuned)" in out:
    from qwenquant.runtime import fused

    out["tuned_choice"] = [t for t in fused.TUNER.table() if t["key"][4] == m]
with open(os.path.join(os.environ.get("OUT", "."), "launch_overhead.json"), "w") as f:
    json.dump(out, f, default=str, indent=1)  # the tuner key holds a torch dtype
