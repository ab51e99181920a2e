"""First GPU contact for a new x-copy path of ``kernels/wq_wgmma.py``: each offered tile once with the 3-D x
descriptor against the fp64 reference, one process bounded by the caller's ``timeout`` (a wrong mbarrier expect
hangs rather than fails). Prints one line per tile; exit 1 on a wrong result.

    timeout 60 env PYTHONPATH=src python3 benchmarks/x3d_smoke.py
"""

import sys

import torch

from qwenquant.kernels import wq_wgmma as W

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from wgmma_session import make  # noqa: E402

kt, wref = make(256, 1024, 4, 128, False, seed=0)
x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
ref = x.double() @ wref.double().T
bad = 0
for cfg in W.CONFIGS:
    y = W.wgmma_gemm(x, kt.words, kt.sz, 4, 128, *cfg, x3d=True)
    torch.cuda.synchronize()
    err = float((y.double() - ref).norm() / ref.norm())
    bad += not err < 1e-2
    print("x3d", cfg, err, flush=True)
sys.exit(1 if bad else 0)
