"""Greedy generation per execution mode vs the fake-quant model, on the real SmolLM2 (issue 4's check).

    PYTHONPATH=src python3 benchmarks/greedy_modes.py [--device cuda] [--new-tokens 32]   # JSON -> $OUT/greedy_modes.json

SmolLM2-135M (offline fixture; ``QWENQUANT_SMOLLM2_GGUF`` may point at the GGUF) is quantized by the
core pipeline twice — RTN W4 g64 (weight-only) and RTN W8 per-channel with 8-bit per-token
activations (W8A8) — and, in bf16, generates greedily from a few prompts in every mode that can run
the format. Each mode's tokens are compared with the ``fake`` mode's (the model the evaluation
scored), and with the same quantized model run in fp32 (``fake`` in full precision: the exact
quantized model). Where they differ, the record keeps the first differing step and the reference's
top-1 − top-2 logit gap there: a gap of a few bf16 ulps is a tie broken by accumulation order, not a bug.

Modes: W4 — dequant, fused, auto; W8A8 — dequant, native-int8, native-fp8 (fp8 rounds the weight
to e4m3, a different model: reported, not expected equal), auto. On CPU only fake/dequant run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from qwenquant import api
from qwenquant.runtime.quant_linear import set_execution_mode

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "To make a cup of tea, you first",
]
RECIPES = {
    "rtn-w4g64": (dict(method="rtn", bits=4, group_size=64), ["dequant", "fused", "auto"]),
    "rtn-w8a8": (dict(method="rtn", bits=8, group_size=None, symmetric=True, act_bits=8),
                 ["dequant", "native-int8", "native-fp8", "auto"]),
}


@torch.no_grad()
def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation (token ids) and the per-step logits [new_tokens, vocab] (float32)."""
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack([s[0].float() for s in out.logits])


def top2_gap(logits: torch.Tensor) -> float:
    v = logits.topk(2).values
    return float(v[0] - v[1])


def compare(ref: list[int], ref_logits: torch.Tensor, got: list[int], logits: torch.Tensor) -> dict:
    """Where ``got`` first leaves ``ref``, and how close to a tie ``ref`` was there."""
    diff = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    r = {"equal": diff is None, "first_diff": diff}
    if diff is not None:
        r["ref_top2_gap_at_diff"] = top2_gap(ref_logits[diff])
        r["mode_top2_gap_at_diff"] = top2_gap(logits[diff])
    upto = len(ref) if diff is None else diff + 1  # logits agree in meaning only up to the first divergence
    r["max_abs_logit_diff"] = float((logits[:upto] - ref_logits[:upto]).abs().max())
    return r


def run(device: str, new_tokens: int, out_file: str | None = None) -> dict:
    doc = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "commit": os.environ.get("QWENQUANT_COMMIT", ""), "new_tokens": new_tokens, "recipes": {}}
    for rname, (kw, modes) in RECIPES.items():
        if device != "cuda":
            modes = [m for m in modes if m == "dequant"]
        model, tok, _ = api.load("smollm2")
        t0 = time.time()
        api.quantize(model, tok, api.method_config(**kw), None, progress=False)
        # the same quantized model twice: fp32 (fake-quant in full precision: the exact quantized model) and
        # bf16 (what every GPU mode runs in)
        model32 = copy.deepcopy(model).to(device=device).eval()
        model.to(device=device, dtype=torch.bfloat16).eval()
        rec = {"quantize_s": round(time.time() - t0, 1), "prompts": []}
        doc["recipes"][rname] = rec
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids.to(device)
            set_execution_mode(model32, "fake")
            ref32, ref32_logits = generate(model32, ids, new_tokens)
            set_execution_mode(model, "fake")
            ref, ref_logits = generate(model, ids, new_tokens)
            entry = {"prompt": prompt, "fake": tok.decode(ref), "fake_fp32": tok.decode(ref32),
                     "fake_vs_fp32": compare(ref32, ref32_logits, ref, ref_logits), "modes": {}}
            for mode in modes:
                set_execution_mode(model, mode)
                try:
                    got, logits = generate(model, ids, new_tokens)
                except Exception as e:  # noqa: BLE001 — recorded, the other modes still run
                    entry["modes"][mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
                    continue
                r = compare(ref, ref_logits, got, logits)
                r["vs_fp32"] = compare(ref32, ref32_logits, got, logits)
                if not r["equal"]:
                    r["text"] = tok.decode(got)
                entry["modes"][mode] = r
            rec["prompts"].append(entry)
            print(rname, repr(prompt[:30]), "fake-bf16 vs fp32:", entry["fake_vs_fp32"]["first_diff"],
                  {m: (v.get("first_diff"), round(v.get("ref_top2_gap_at_diff", 0), 3), v["vs_fp32"]["first_diff"])
                   if "error" not in v else v["error"][:80] for m, v in entry["modes"].items()}, flush=True)
            rec["summary"] = {
                "prompts": len(rec["prompts"]),
                "equal_to_fake_bf16": {m: sum(bool(p["modes"].get(m, {}).get("equal")) for p in rec["prompts"]) for m in modes},
                "equal_to_fake_fp32": {m: sum(bool(p["modes"].get(m, {}).get("vs_fp32", {}).get("equal")) for p in rec["prompts"])
                                       for m in modes},
                "fake_bf16_equal_to_fp32": sum(bool(p["fake_vs_fp32"]["equal"]) for p in rec["prompts"]),
            }
            if out_file:
                with open(out_file, "w") as f:
                    json.dump(doc, f, indent=1)
        print(rname, rec["summary"], flush=True)
        del model, model32
        if device == "cuda":
            torch.cuda.empty_cache()
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    out = os.environ.get("OUT", "runs")
    os.makedirs(out, exist_ok=True)
    run(a.device, a.new_tokens, os.path.join(out, "greedy_modes.json"))  # written after every prompt


if __name__ == "__main__":
    main()
