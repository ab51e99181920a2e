"""The decode step's q / k norm + rotary + cache-write kernel (``kernels/decode_prep.py``): its reference against the
HF modules, the Triton kernel under the interpreter (CPU) and compiled for / run on a GPU, bad operands."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qwenquant.kernels import decode_prep as P

transformers = pytest.importorskip("transformers")


def operands(b=2, hq=8, hkv=2, d=32, ctx=12, dtype=torch.float32, device="cpu", cos_rows=None):
    """Random operands as the e2e step makes them: q / k / v views of one merged projection output."""
    qkv = torch.randn(b, 1, (hq + 2 * hkv) * d, dtype=dtype, device=device) * 3
    q, k, v = (t.reshape(b, 1, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], -1))
    rows = b if cos_rows is None else cos_rows
    angle = torch.rand(rows, 1, d // 2, device=device) * 6.3
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype)
    return dict(q=q, k=k, v=v, q_weight=(torch.rand(d, device=device) + 0.5).to(dtype),
                k_weight=(torch.rand(d, device=device) + 0.5).to(dtype), eps=1e-6, cos=cos, sin=sin,
                k_cache=torch.randn(b, hkv, ctx, d, dtype=dtype, device=device),
                v_cache=torch.randn(b, hkv, ctx, d, dtype=dtype, device=device),
                pos=torch.tensor([ctx - 4], device=device))


def hf_prep(o):
    """What the e2e step computes with HF's modules (Qwen3RMSNorm, apply_rotary_pos_emb, index_copy_), on copies."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    d = o["q"].shape[-1]
    qn, kn = Qwen3RMSNorm(d, eps=o["eps"]), Qwen3RMSNorm(d, eps=o["eps"])
    qn.weight.data, kn.weight.data = o["q_weight"].clone(), o["k_weight"].clone()
    q, k = apply_rotary_pos_emb(qn(o["q"]).transpose(1, 2), kn(o["k"]).transpose(1, 2), o["cos"], o["sin"])
    kc, vc = o["k_cache"].clone(), o["v_cache"].clone()
    kc.index_copy_(2, o["pos"], k)
    vc.index_copy_(2, o["pos"], o["v"].transpose(1, 2))
    return q, kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_reference_is_the_hf_modules_and_the_op_falls_back_on_cpu(dtype):
    torch.manual_seed(0)
    o = operands(dtype=dtype)
    q_hf, kc_hf, vc_hf = hf_prep(o)
    kc_before = o["k_cache"].clone()
    assert not P.kernel_ok(o["q"], o["k"], o["v"], o["k_cache"], o["v_cache"], o["cos"], o["sin"])
    q = P.decode_prep(**o)
    assert q.is_contiguous() and q.shape == (2, 8, 1, 32)
    torch.testing.assert_close(q, q_hf, rtol=0, atol=0)
    torch.testing.assert_close(o["k_cache"], kc_hf, rtol=0, atol=0)   # written in place, at pos only
    torch.testing.assert_close(o["v_cache"], vc_hf, rtol=0, atol=0)
    assert (o["k_cache"] != kc_before).any(-1).nonzero()[:, 2].unique().tolist() == [8]


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.randn(2, 2, 8, 32)), r"expected q \[B, 1, Hq, D\]"),
    (dict(v=torch.randn(2, 1, 3, 32)), "k, v"),
    (dict(q_weight=torch.randn(16)), r"norm weights \(16,\)"),
    (dict(cos=torch.randn(3, 1, 32), sin=torch.randn(3, 1, 32)), r"cos \(3, 1, 32\)"),
    (dict(k_cache=torch.randn(2, 4, 12, 32)), r"expected \[2, 2, ctx, 32\]"),
    (dict(pos=torch.tensor([3.0])), "one int64 position"),
    (dict(pos=torch.tensor([3, 4])), "one int64 position"),
])
def test_bad_operands_are_refused_on_every_path(change, message):
    o = operands()
    o.update(change)
    with pytest.raises(ValueError, match=message):
        P.decode_prep(**o)


INTERPRETED = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_decode_prep import operands
    from qwenquant.kernels import decode_prep as P
    torch.manual_seed(0)
    out = {{}}
    # (batch, q heads, kv heads, head dim, cos rows): G = 4 / 1 / 16, one rotation shared by every row. fp16 only:
    # the interpreter truncates fp32 -> bf16 (531 of 1024 random values differ from round-to-nearest), a GPU rounds
    for dtype in (torch.float16,):
        for b, hq, hkv, d, rows in [(1, 8, 2, 64, 1), (3, 4, 4, 16, 3), (2, 16, 1, 128, 1)]:
            o = operands(b, hq, hkv, d, ctx=10, dtype=dtype, cos_rows=rows)
            exact = {{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in o.items()}}
            exact["k_cache"], exact["v_cache"] = o["k_cache"].double(), o["v_cache"].double()
            q64 = P.reference_decode_prep(**exact)                       # the math in fp64
            ref = {{k: (v.clone() if torch.is_tensor(v) else v) for k, v in o.items()}}
            q_ref = P.reference_decode_prep(**ref)                       # the 16-bit reference
            q = P._triton_decode_prep(**o)
            err = lambda a, b: float((a.double() - b).norm() / b.norm())
            out[f"{{dtype}} b{{b}} hq{{hq}} hkv{{hkv}} d{{d}}"] = dict(
                q=err(q, q64), q_ref=err(q_ref, q64), k=err(o["k_cache"], exact["k_cache"]),
                k_ref=err(ref["k_cache"], exact["k_cache"]), v_equal=bool(torch.equal(o["v_cache"], ref["v_cache"])),
                others_kept=bool(torch.equal(o["k_cache"][:, :, :6], ref["k_cache"][:, :, :6])))
    print(json.dumps(out))
    """
)


def run_interpreted(script: str, timeout: int = 600) -> dict:
    """Run ``script`` (its ``{tests}`` filled with this folder, for imports) under Triton's interpreter in a fresh
    process (the switch is read at import); its last stdout line is JSON, returned."""
    import json

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", script.format(tests=tests)], capture_output=True, text=True, env=env,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_kernel_under_the_interpreter():
    """The kernel's error against the fp64 math is no worse than the 16-bit reference's own (it rounds less), the
    V row is copied exactly, and no other cache row is touched (fp16; bf16 on a GPU: ``test_kernel_on_gpu_…``)."""
    cases = run_interpreted(INTERPRETED)
    assert len(cases) == 3, cases
    for name, c in cases.items():
        assert c["v_equal"] and c["others_kept"], (name, c)
        assert c["q"] <= 1.2 * c["q_ref"] + 1e-4 and c["k"] <= 1.2 * c["k_ref"] + 1e-4, (name, c)
        assert c["q"] < 2e-3 and c["k"] < 2e-3, (name, c)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_compiles_for_sm90(dtype):
    c = P.compile_for_sm90(dtype)
    assert ".target sm_90a" in c.asm["ptx"] and c.metadata.shared < 232448


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 128])
def test_kernel_on_gpu_qwen3_8b_shape(batch):
    torch.manual_seed(batch)
    o = operands(batch, 32, 8, 128, ctx=512, dtype=torch.bfloat16, device="cuda", cos_rows=batch)
    assert P.kernel_ok(o["q"], o["k"], o["v"], o["k_cache"], o["v_cache"], o["cos"], o["sin"])
    exact = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in o.items()}
    q64 = P.reference_decode_prep(**exact)
    before = o["k_cache"].clone()
    q = P.decode_prep(**o)
    assert float((q.double() - q64).norm() / q64.norm()) < 1e-2
    assert float((o["k_cache"].double() - exact["k_cache"]).norm() / exact["k_cache"].norm()) < 1e-2
    assert torch.equal(o["v_cache"][:, :, 508], o["v"][:, 0])
    keep = torch.ones(512, dtype=torch.bool)
    keep[508] = False
    assert torch.equal(o["k_cache"][:, :, keep], before[:, :, keep])
