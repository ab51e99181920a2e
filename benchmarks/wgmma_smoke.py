"""First GPU contact for a new path of the Gluon wgmma GEMMs: every tile of ``wq_wgmma`` (3-D x copies, the
default) and of the warp-specialized ``wq_wgmma_ws`` once against the fp64 reference, in one process
bounded by the caller's ``timeout`` — a wrong mbarrier expect or phase hangs rather than fails (session 12 lost a
440 s call to one), so run this with a short timeout before anything else. One line per tile; exit 1 on a wrong
or non-finite result.

    timeout 90 env PYTHONPATH=src python3 benchmarks/wgmma_smoke.py [ws]     # ws: only the warp-specialized tiles
"""

import sys

import torch

from qwenquant.kernels import wq_wgmma as W
from qwenquant.kernels import wq_wgmma_ws as WS

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from wgmma_session import make  # noqa: E402

kt, wref = make(256, 1024, 4, 128, False, seed=0)
x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
ref = x.double() @ wref.double().T
runs = [(f"ws {cfg}", lambda c=cfg: WS.wgmma_ws_gemm(x, kt.words, kt.sz, 4, 128, *c)) for cfg in WS.CONFIGS]
if sys.argv[1:] != ["ws"]:
    runs = [(f"x3d {cfg}", lambda c=cfg: W.wgmma_gemm(x, kt.words, kt.sz, 4, 128, *c)) for cfg in W.CONFIGS] + runs
bad = 0
for name, run in runs:
    y = run()
    torch.cuda.synchronize()
    err = float((y.double() - ref).norm() / ref.norm())
    bad += not err < 1e-2  # NaN fails too
    print(name, err, flush=True)
sys.exit(1 if bad else 0)
