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
    target = DA.BATCH1_TARGET_PROGRAMS if batch == 1 else DA.TARGET_PROGRAMS
    if batch * kv_heads >= target:
        assert splits == 1
    else:
        assert batch * kv_heads * splits <= target + batch * kv_heads * (per // DA.BLOCK_N)
    with pytest.raises(ValueError, match="filled=0"):
        DA.plan_splits(1, 8, 0)


def test_batch_1_takes_its_own_program_target():
    """Qwen3-8B's 8 KV heads over 257 positions: 9 splits of 32 keys at batch 1 (the measured faster plan there), 5 of
    64 at batch 8 (264 programs' plan); an explicit target overrides both."""
    assert (DA.BATCH1_TARGET_PROGRAMS, DA.TARGET_PROGRAMS) == (66, 264)
    assert DA.plan_splits(1, 8, 257) == (9, 32)
    assert DA.plan_splits(8, 8, 257) == (5, 64)
    assert DA.plan_splits(1, 8, 257, target=264) == (17, 16)


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


@pytest.mark.parametrize("change,message", [
    (dict(filled=0), "filled=0 positions: expected 1 … 24"),
    (dict(filled=25), "filled=25 positions: expected 1 … 24"),
    (dict(filled=-3), "filled=-3"),
    (dict(v=torch.zeros(2, 2, 20, 32)), "k, v"),
    (dict(k=torch.zeros(2, 2, 24, 16), v=torch.zeros(2, 2, 24, 16)), "differ in batch or head dim"),
    (dict(k=torch.zeros(2, 3, 24, 32), v=torch.zeros(2, 3, 24, 32)), "8 query heads are not a multiple of 3"),
])
def test_bad_operands_are_refused_on_every_path(change, message):
    """The CPU fallback refuses what the GPU path would: slicing past the cache would silently shorten it."""
    args = dict(q=torch.randn(2, 8, 1, 32), k=torch.randn(2, 2, 24, 32), v=torch.randn(2, 2, 24, 32), filled=13)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        DA.decode_attention(args["q"], args["k"], args["v"], args["filled"])


INTERPRETED = textwrap.dedent(
    """
    import json, torch
    from qwenquant.kernels import decode_attention as DA
    torch.manual_seed(0)
    worst = {}
    # (batch, q heads, kv heads, head dim, cache, filled, program target, cache layout): several splits, one split
    # with several blocks, a lone position, G = 1 / 4 / 16; q a transposed view as the decode step's; caches as
    # [b, ctx, hkv, d] transposed (other strides) and as a slice at an offset of a larger buffer
    for b, hq, hkv, d, ctx, filled, target, layout in [
            (1, 8, 2, 64, 48, 40, 264, "plain"), (2, 4, 4, 16, 40, 17, 264, "plain"),
            (1, 16, 1, 32, 64, 1, 264, "plain"), (3, 8, 2, 64, 48, 33, 1, "plain"),
            (1, 32, 8, 128, 24, 24, 264, "plain"), (2, 8, 2, 32, 40, 37, 264, "transposed"),
            (2, 16, 1, 16, 40, 40, 264, "offset")]:
        DA.TARGET_PROGRAMS = DA.BATCH1_TARGET_PROGRAMS = target  # batch 1 too
        q = torch.randn(b, 1, hq, d, dtype=torch.float16).transpose(1, 2)   # [b, hq, 1, d] as the decode step's
        if layout == "transposed":
            k, v = (torch.randn(b, ctx, hkv, d, dtype=torch.float16).transpose(1, 2) for _ in range(2))
        elif layout == "offset":
            k, v = (torch.randn(b + 1, hkv, ctx, d, dtype=torch.float16)[1:] for _ in range(2))
        else:
            k, v = (torch.randn(b, hkv, ctx, d, dtype=torch.float16) for _ in range(2))
        y = DA._triton_decode_attention(q, k, v, filled)
        ref = DA.reference_decode_attention(q.double(), k.double(), v.double(), filled)
        key = f"b{b} hq{hq} hkv{hkv} d{d} filled{filled} splits{DA.plan_splits(b, hkv, filled)[0]} {layout}"
        worst[key] = float((y.double() - ref).norm() / ref.norm())
    print(json.dumps(worst))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
@pytest.mark.parametrize("whole", ["0", "64"])
def test_kernels_under_the_interpreter(whole, monkeypatch):
    """Every case of ``INTERPRETED`` against the fp64 math, stepping through each slice (``QWENQUANT_ATTN_WHOLE=0``)
    and loading it at once (64: slices of 16 to 48 positions, padded to 16 / 64, the tail masked)."""
    monkeypatch.setenv("QWENQUANT_ATTN_WHOLE", whole)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    worst = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(worst) == 7 and any("splits1 " in k for k in worst) and any("splits3 " in k for k in worst), worst
    assert max(worst.values()) < 2e-3, worst  # fp16 inputs, fp32 accumulation


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
@pytest.mark.parametrize("kernel,splits,dtype", [("split", 17, torch.bfloat16), ("split", 1, torch.bfloat16),
                                                 ("split", 3, torch.float16), ("merge", 17, torch.bfloat16)])
def test_kernels_compile_for_sm90(kernel, splits, dtype):
    """The compiled (not interpreted) kernels build for an H100 on this CPU machine (ptxas from the Triton wheel); the
    split kernel's two products run on the tensor cores (mma.sync), in the shared memory an SM has."""
    c = DA.compile_for_sm90(kernel, dtype=dtype, splits=splits)
    ptx = c.asm["ptx"]
    assert ".target sm_90a" in ptx and c.metadata.shared < 232448
    assert ("mma.sync" in ptx) == (kernel == "split")


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
    with pytest.raises(ValueError, match="filled=513 positions: expected 1 … 512"):
        DA.decode_attention(q, k, v, 513)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_gpu_past_2_31_cache_elements():
    """Batch 128 × 8 KV heads × 17,000 positions × 128 dims = 2.2e9 elements per cache: offsets past 2**31 (a
    review found the 32-bit offsets of the first version crash here with an illegal memory access)."""
    torch.manual_seed(0)
    b, ctx = 128, 17000
    k = torch.randn(b, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    y = DA.decode_attention(q, k, v, ctx)
    for row in (0, b - 1):  # the reference on two batch rows (the whole one would need 17 GB of fp64)
        ref = explicit_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], ctx)
        assert float((y[row:row + 1].double() - ref).norm() / ref.norm()) < 1e-2, row


def prep_operands(b, hq, hkv, d, ctx, filled, dtype=torch.float16, device="cpu", pos=None):
    from test_decode_prep import operands

    o = operands(b, hq, hkv, d, ctx=ctx, dtype=dtype, device=device, cos_rows=1)
    o["pos"] = torch.tensor([filled - 1 if pos is None else pos], device=device)
    return o


def exact_prep_attention(o, filled):
    """The fp64 math of norm + rotary + cache write, then attention: (output, k cache, v cache)."""
    from qwenquant.kernels import decode_prep as P

    ex = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in o.items()}
    q = P.reference_decode_prep(**ex)
    return explicit_attention(q, ex["k_cache"], ex["v_cache"], filled), ex["k_cache"], ex["v_cache"]


def test_prep_in_split_op_falls_back_to_the_two_references_on_cpu():
    from qwenquant.kernels import decode_prep as P

    torch.manual_seed(0)
    o = prep_operands(2, 8, 2, 32, 24, 13, dtype=torch.float32)
    ref = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in o.items()}
    y = DA.decode_attention_prep(**o, filled=13)
    q = P.reference_decode_prep(**ref)
    torch.testing.assert_close(y, DA.reference_decode_attention(q, ref["k_cache"], ref["v_cache"], 13), rtol=0, atol=0)
    torch.testing.assert_close(o["k_cache"], ref["k_cache"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="filled=25 positions"):
        DA.decode_attention_prep(**o, filled=25)
    with pytest.raises(ValueError, match="one int64 position"):
        DA.decode_attention_prep(**{**o, "pos": torch.tensor([1, 2])}, filled=13)


INTERPRETED_PREP = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_decode_attention import prep_operands, exact_prep_attention
    from qwenquant.kernels import decode_attention as DA
    torch.manual_seed(0)
    out = {{}}
    # (batch, q heads, kv heads, head dim, cache, filled, new position, program target): the new position last of the
    # filled ones in a one-split and a several-split plan, inside the range, past it, a lone position
    for b, hq, hkv, d, ctx, filled, pos, target in [(1, 8, 2, 64, 48, 40, None, 264), (2, 4, 4, 16, 40, 17, None, 264),
            (1, 16, 1, 32, 64, 1, None, 264), (3, 8, 2, 64, 48, 33, None, 1), (1, 8, 2, 32, 40, 20, 13, 264),
            (1, 8, 2, 32, 40, 20, 31, 264)]:
        DA.TARGET_PROGRAMS = DA.BATCH1_TARGET_PROGRAMS = target  # batch 1 too
        o = prep_operands(b, hq, hkv, d, ctx, filled, pos=pos)
        y64, kc64, vc64 = exact_prep_attention(o, filled)
        before = o["k_cache"].clone()
        y = DA._triton_decode_attention(
            o["q"], o["k_cache"], o["v_cache"], filled, prep=dict(k_new=o["k"], v_new=o["v"], q_weight=o["q_weight"],
            k_weight=o["k_weight"], eps=o["eps"], cos=o["cos"], sin=o["sin"], pos=o["pos"]))
        t = int(o["pos"])
        out[f"b{{b}} hq{{hq}} hkv{{hkv}} d{{d}} filled{{filled}} pos{{t}} splits{{DA.plan_splits(b, hkv, filled)[0]}}"] = dict(
            y=float((y.double() - y64).norm() / y64.norm()),
            k=float((o["k_cache"].double() - kc64).norm() / kc64.norm()),
            rows=(o["k_cache"] != before).any(-1).nonzero()[:, 2].unique().tolist(),
            v=bool(torch.equal(o["v_cache"][:, :, t], o["v"][:, 0])))
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
@pytest.mark.parametrize("whole", ["0", "64"])
def test_prep_in_split_kernel_under_the_interpreter(whole, monkeypatch):
    """The split kernel with q / k norm, rotary and the cache write inside (PREP) against the fp64 math: the output,
    the written K row (only at ``pos``) and the V row copied exactly — wherever ``pos`` lies; stepping and, with
    whole slices, loading the cache before the new row is written and substituting that row in registers."""
    from test_decode_prep import run_interpreted

    monkeypatch.setenv("QWENQUANT_ATTN_WHOLE", whole)

    cases = run_interpreted(INTERPRETED_PREP)
    assert len(cases) == 6 and any(k.endswith("splits1") for k in cases) and any(k.endswith("splits3") for k in cases), cases
    for name, c in cases.items():
        pos = int(name.split(" pos")[1].split()[0])
        assert c["rows"] == [pos] and c["v"], (name, c)
        assert c["y"] < 2e-3 and c["k"] < 2e-3, (name, c)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_prep_in_split_kernel_compiles_for_sm90():
    c = DA.compile_for_sm90("split", splits=17, prep=True)
    ptx = c.asm["ptx"]
    assert ".target sm_90a" in ptx and "mma.sync" in ptx and "bar.sync" in ptx and c.metadata.shared < 232448


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 8, 128])
@pytest.mark.parametrize("filled", [1, 257])
@pytest.mark.parametrize("whole", [0, 64])
def test_prep_in_split_on_gpu_qwen3_8b_shape(batch, filled, whole, monkeypatch):
    """bf16 (the interpreter truncates bf16, so this is the bf16 check), Qwen3-8B heads, several splits at batch 1;
    stepping through each slice and (``WHOLE_SLICE_MAX``) loading slices of up to 64 positions at once."""
    monkeypatch.setattr(DA, "WHOLE_SLICE_MAX", whole)
    torch.manual_seed(batch + filled)
    o = prep_operands(batch, 32, 8, 128, 512, filled, dtype=torch.bfloat16, device="cuda")
    y64, kc64, _ = exact_prep_attention(o, filled)
    before = o["k_cache"].clone()
    y = DA.decode_attention_prep(**o, filled=filled)
    assert y.dtype == torch.bfloat16 and y.shape == (batch, 32, 1, 128)
    assert float((y.double() - y64).norm() / y64.norm()) < 1e-2
    assert float((o["k_cache"].double() - kc64).norm() / kc64.norm()) < 1e-2
    assert (o["k_cache"] != before).any(-1).nonzero()[:, 2].unique().tolist() == [filled - 1]
    assert torch.equal(o["v_cache"][:, :, filled - 1], o["v"][:, 0])


MEET_INTERPRETED = """
import json, torch
from qwenquant.kernels import decode_attention as DA
from tests.test_decode_attention import prep_operands, exact_prep_attention
torch.manual_seed(0)
out = {}
for b, hq, hkv, d, ctx, filled in [(2, 8, 2, 64, 200, 150), (1, 4, 1, 32, 64, 64), (3, 4, 2, 16, 40, 17),
                                   (1, 32, 8, 128, 300, 257)]:
    q = torch.randn(b, hq, 1, d, dtype=torch.float16)
    k = torch.randn(b, hkv, ctx, d, dtype=torch.float16)
    v = torch.randn_like(k)
    ys = {}
    for meet in (True, False):
        DA.MERGE_IN_SPLIT = meet
        ys[meet] = DA._triton_decode_attention(q, k, v, filled)
    ref = DA.reference_decode_attention(q.double(), k.double(), v.double(), filled)
    out[f"b{b} hq{hq} splits{DA.plan_splits(b, hkv, filled)[0]}"] = dict(
        meet=float((ys[True].double() - ref).norm() / ref.norm()),
        launch=float((ys[False].double() - ref).norm() / ref.norm()),
        counters=int(DA._COUNTERS["cpu"].abs().sum()))
# with the prep inside (the decode step's path), Qwen3-8B heads at batch 1
o = prep_operands(1, 32, 8, 128, 300, 257)
y64, _, _ = exact_prep_attention(o, 257)
DA.MERGE_IN_SPLIT = True
y = DA._triton_decode_attention(o["q"], o["k_cache"], o["v_cache"], 257, prep=dict(k_new=o["k"], v_new=o["v"],
    q_weight=o["q_weight"], k_weight=o["k_weight"], eps=o["eps"], cos=o["cos"], sin=o["sin"], pos=o["pos"]))
out["prep b1"] = dict(meet=float((y.double() - y64).norm() / y64.norm()), launch=0.0,
                      counters=int(DA._COUNTERS["cpu"].abs().sum()))
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
@pytest.mark.parametrize("whole", ["0", "64"])
def test_merge_inside_the_split_kernel_under_the_interpreter(whole, monkeypatch):
    """``MERGE_IN_SPLIT``: the last split program of each (batch row, KV head) merges the slices (no merge launch) —
    the same attention as the merge kernel within fp16 rounding, G = 1 / 2 / 4 (padded to 2 and 4), the Qwen3-8B
    heads with the prep inside, and every meeting counter back to zero for the next call; stepping and whole slices."""
    monkeypatch.setenv("QWENQUANT_ATTN_WHOLE", whole)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src"), os.path.join(root, "tests")])}
    r = subprocess.run([sys.executable, "-c", MEET_INTERPRETED], capture_output=True, text=True, env=env, cwd=root,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    cases = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(cases) == 5 and all(int(k.split("splits")[1]) > 1 for k in cases if "splits" in k), cases
    for name, c in cases.items():
        assert c["meet"] < 2e-3 + 2 * c["launch"] and c["counters"] == 0, (name, c)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_split_kernel_meeting_compiles_to_release_acquire():
    """The meeting in the sm_90a build: a CTA barrier after the slice's stores, then one acq_rel GPU-scope atomic
    add; the merging program reads the slices past L1 (``ld.global.cg``) and resets the counter; no atomic without
    MEET; the unrolled merge holds no spills."""
    from qwenquant.kernels.launch import ptxas_usage

    c = DA.compile_for_sm90("split", splits=9, prep=True, meet=True)
    ptx = c.asm["ptx"]
    add = ptx.index("atom.global.gpu.acq_rel.add")
    assert "bar.sync" in ptx[ptx.rindex("st.global", 0, add):add]
    assert ptx.index("ld.global.cg", add) > add and "atom.global.gpu.acq_rel.exch" in ptx[add:]
    assert "atom." not in DA.compile_for_sm90("split", splits=9, prep=True, meet=False).asm["ptx"]
    assert ptxas_usage(c)["spill_bytes"] == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_whole_slice_loads_the_cache_before_the_wait():
    """Whole slices with the prep and PDL in the sm_90a build: the slice's K and V loads are issued before
    ``griddepcontrol.wait`` (they overlap it; older steps' rows), q's after it; the tile fits without spills and both
    products stay on the tensor cores. Without the prep the cache loads wait (the kernel before may have written it)."""
    from qwenquant.kernels.launch import ptxas_usage

    c = DA.compile_for_sm90("split", splits=8, prep=True, pdl=True, whole=64)
    ptx = c.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert ptx[:wait].count("ld.global") >= 2 and "mma.sync" in ptx[wait:]
    assert ptxas_usage(c)["spill_bytes"] == 0
    plain = DA.compile_for_sm90("split", splits=8, prep=False, pdl=True, whole=64).asm["ptx"]
    assert "ld.global" not in plain[:plain.index("griddepcontrol.wait")]


@pytest.mark.parametrize("variable,value", [("QWENQUANT_ATTN_WHOLE", "8"), ("QWENQUANT_ATTN_WHOLE", "128"),
                                            ("QWENQUANT_ATTN_WHOLE", "yes"), ("QWENQUANT_ATTN_MERGE", "kernel")])
def test_attention_settings_are_checked_by_value(variable, value):
    """A bad value stops the import (settings are read once, at import: a fresh interpreter per value) with an error
    naming the variable and the value."""
    r = subprocess.run([sys.executable, "-c", "import qwenquant.kernels.decode_attention"], capture_output=True,
                       text=True, env={**os.environ, variable: value}, timeout=120)
    assert r.returncode != 0 and f"{variable}={value!r}" in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 8])
def test_merge_in_split_on_gpu_in_graph_replays(batch):
    """On the GPU, with the meeting's timing real: the prep-in-split attention merged in the split kernel matches the
    fp64 math and the merge-kernel path, and 30 CUDA-graph replays reproduce the eager result bit for bit (a lost
    or stale slice, or a counter not reset, would show as a changed output)."""
    torch.manual_seed(batch)
    o = prep_operands(batch, 32, 8, 128, 512, 257, dtype=torch.bfloat16, device="cuda")
    y64, _, _ = exact_prep_attention(o, 257)
    saved = DA.MERGE_IN_SPLIT
    try:
        outs = {}
        for meet in (False, True):
            DA.MERGE_IN_SPLIT = meet
            op = {n: (t.clone() if torch.is_tensor(t) else t) for n, t in o.items()}
            outs[meet] = DA.decode_attention_prep(**op, filled=257)
        assert DA.plan_splits(batch, 8, 257)[0] > 1
        for y in outs.values():
            assert float((y.double() - y64).norm() / y64.norm()) < 1e-2
        assert float((outs[True].float() - outs[False].float()).norm() / outs[False].float().norm()) < 1e-2
        op = {n: (t.clone() if torch.is_tensor(t) else t) for n, t in o.items()}
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = DA.decode_attention_prep(**op, filled=257)
        for _ in range(30):
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, outs[True])
        assert int(DA._COUNTERS[str(y.device)].abs().sum()) == 0
    finally:
        DA.MERGE_IN_SPLIT = saved
