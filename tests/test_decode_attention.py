"""Split-K decode attention (``kernels/decode_attention.py``): the split plan, the reference, the kernels under
Triton's interpreter (CPU, fp16: the interpreter's ``tl.dot`` mis-handles bf16) and compiled on a GPU."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qwenquant.kernels import decode_attention as DA


def explicit_attention(q, k, v, filled):
    """softmax(q kᵀ / √D) v in fp64 with the GQA head mapping written out: the math, not SDPA."""
    b, hq, _, d = q.shape
    g = hq // k.shape[1]
    kk = k[:, :, :filled].double().repeat_interleave(g, dim=1)
    vv = v[:, :, :filled].double().repeat_interleave(g, dim=1)
    w = torch.softmax(q.double() @ kk.transpose(-1, -2) / d ** 0.5, dim=-1)
    return w @ vv


@pytest.mark.parametrize("batch,kv_heads,filled", [(1, 8, 257), (8, 8, 257), (128, 8, 257), (1, 8, 1), (1, 1, 5000),
                                                   (3, 2, 17)])
def test_plan_splits_covers_every_position_once(batch, kv_heads, filled):
    splits, per = DA.plan_splits(batch, kv_heads, filled)
    assert per % DA.BLOCK_N == 0 and splits >= 1
    assert (splits - 1) * per < filled <= splits * per  # no empty split, none missing
    if batch * kv_heads >= DA.TARGET_PROGRAMS:
        assert splits == 1
    else:
        assert batch * kv_heads * splits <= DA.TARGET_PROGRAMS + batch * kv_heads * (per // DA.BLOCK_N)
    with pytest.raises(ValueError, match="filled=0"):
        DA.plan_splits(1, 8, 0)


def test_reference_is_the_attention_math_and_the_op_falls_back_on_cpu():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 32)
    k, v = torch.randn(2, 2, 24, 32), torch.randn(2, 2, 24, 32)
    ref = explicit_attention(q, k, v, 13)
    torch.testing.assert_close(DA.reference_decode_attention(q, k, v, 13).double(), ref, rtol=1e-5, atol=1e-5)
    assert not DA.kernel_ok(q, k, v)
    y = DA.decode_attention(q, k, v, 13)
    assert y.is_contiguous() and y.shape == q.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


INTERPRETED = textwrap.dedent(
    """
    import json, torch
    from qwenquant.kernels import decode_attention as DA
    torch.manual_seed(0)
    worst = {}
    # (batch, q heads, kv heads, head dim, cache, filled, program target): several splits, one split with several
    # blocks, a lone position, G = 1 / 4 / 16, a cache view that is not contiguous in the head dim order
    for b, hq, hkv, d, ctx, filled, target in [(1, 8, 2, 64, 48, 40, 264), (2, 4, 4, 16, 40, 17, 264),
                                               (1, 16, 1, 32, 64, 1, 264), (3, 8, 2, 64, 48, 33, 1),
                                               (1, 32, 8, 128, 24, 24, 264)]:
        DA.TARGET_PROGRAMS = target
        q = torch.randn(b, 1, hq, d, dtype=torch.float16).transpose(1, 2)   # [b, hq, 1, d] as the decode step's
        k = torch.randn(b, hkv, ctx, d, dtype=torch.float16)
        v = torch.randn(b, hkv, ctx, d, dtype=torch.float16)
        y = DA._triton_decode_attention(q, k, v, filled)
        ref = DA.reference_decode_attention(q.double(), k.double(), v.double(), filled)
        key = f"b{b} hq{hq} hkv{hkv} d{d} filled{filled} splits{DA.plan_splits(b, hkv, filled)[0]}"
        worst[key] = float((y.double() - ref).norm() / ref.norm())
    print(json.dumps(worst))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    worst = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(worst) == 5 and any("splits1" in k for k in worst) and any("splits3" in k for k in worst), worst
    assert max(worst.values()) < 2e-3, worst  # fp16 inputs, fp32 accumulation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 8, 32, 128])
@pytest.mark.parametrize("filled", [1, 257, 512])
def test_kernels_on_gpu_qwen3_8b_shape(batch, filled):
    torch.manual_seed(batch + filled)
    q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(batch, 8, 512, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    assert DA.kernel_ok(q, k, v)
    y = DA.decode_attention(q, k, v, filled)
    ref = explicit_attention(q, k, v, filled)
    assert y.dtype == torch.bfloat16 and y.is_contiguous()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    with pytest.raises(ValueError, match="filled=513 positions, but the cache holds 512"):
        DA.decode_attention(q, k, v, 513)
