"""``benchmarks/batch1_pattern.py`` (session 22): the batch-1 W4 kernel's access pattern without its dequantization
(and with a stand-in for it), run only on the GPU machine. Here its kernel runs under Triton's interpreter against
the torch reference, and an offline sm_90a build checks the premise that makes it a fair stand-in: the words go
through Triton's cp.async pipeline, as the real kernel's do."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")

INTERPRETED = textwrap.dedent(
    f"""
    import json, sys
    import torch
    sys.path.insert(0, {str(BENCH)!r})
    import batch1_pattern as P
    from triton.tools.tensor_descriptor import TensorDescriptor

    torch.manual_seed(0)
    results = {{}}
    n, kw = 96, 256  # 96 rows, K = 2048: 3 / 6 row blocks, 2 steps of 128 words
    words = torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32)
    x0 = 0.37
    for bn in (16, 32):
        for programs in (0, 4):
            for alu in (False, True):
                for tma in (False, True):
                    out = torch.zeros(64, dtype=torch.int32)
                    grid = programs or n // bn
                    w = TensorDescriptor.from_tensor(words, [bn, 128]) if tma else words
                    P._pattern_kernel[(grid,)](w, x0, out, kw, n, BN=bn, KBW=128, STAGES=2, ALU=alu,
                                               PERSIST=programs > 0, TMA=tma)
                    key = f"bn{{bn}} p{{programs}} alu{{int(alu)}} tma{{int(tma)}}"
                    results[key] = P.check(words, x0, out, bn, alu, programs)
    print(json.dumps(results))
    """
)


@needs_triton
def test_pattern_kernel_matches_the_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 16 and all(results.values()), results


@needs_triton
@pytest.mark.parametrize("alu", [False, True])
@pytest.mark.parametrize("persist", [False, True])
@pytest.mark.parametrize("tma", [False, True])
def test_pattern_kernel_pipelines_the_words_like_the_real_kernel(alu, persist, tma):
    """sm_90a, offline: at 2 and 3 stages every word load is a cp.async into shared memory (the real kernel's path)
    or, with TMA, one bulk tensor copy per stage; none left as a plain global load; registers without spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwenquant.kernels.launch import ptxas_usage

    sys.path.insert(0, str(BENCH))
    import batch1_pattern as P
    from triton.tools.tensor_descriptor import TensorDescriptor

    for stages in (2, 3):
        sig = {"w_ptr": "tensordesc<i32[32, 128]>" if tma else "*i32", "x0": "fp32", "out_ptr": "*i32", "KW": "i32",
               "N": "i32"}
        const = {"BN": 32, "KBW": 128, "STAGES": stages, "ALU": alu, "PERSIST": persist, "TMA": tma}
        attrs = {(i,): [["tt.divisibility", 16]] for i in ((2, 3, 4) if tma else (0, 2, 3, 4))}
        k = triton.compile(ASTSource(fn=P._pattern_kernel, signature={**sig, **dict.fromkeys(const, "constexpr")},
                                     constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
        ttgir = k.asm["ttgir"]
        copy = "async_tma_copy_global_to_local" if tma else "async_copy_global_to_local"
        assert len(re.findall(copy, ttgir)) == stages, stages
        assert not re.findall(r"tt\.load", ttgir), stages
        use = ptxas_usage(k)
        assert use["spill_bytes"] == 0 and use["shared_bytes"] >= (stages - 1) * 32 * 128 * 4, use
