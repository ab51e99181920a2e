"""Print the README's core quality table: SmolLM2-135M, held-out Austen perplexity, methods side by side.

    python scripts/core_quality_table.py            # 32 x 512 calibration, 16 x 512 evaluation windows
    python scripts/core_quality_table.py --lm-head  # and each rtn / gptq / billm row again with lm_head quantized

Prints a Markdown table, then one JSON line with every number and the settings.
"""

import argparse
import json
import platform
import subprocess
import time

import torch

from qwenquant.eval.compare import compare_perplexity
from qwenquant.quantize import METHOD_NAMES, method_spec

RECIPES = {
    "RTN w8 per-channel": dict(method="rtn", bits=8),
    "RTN w4 g64": dict(method="rtn", bits=4, group_size=64),
    "GPTQ w4 g64": dict(method="gptq", bits=4, group_size=64),
    "AWQ w4 g64": dict(method="awq", bits=4, group_size=64),
    "RTN w3 g64": dict(method="rtn", bits=3, group_size=64),
    "GPTQ w3 g64": dict(method="gptq", bits=3, group_size=64),
    "AWQ w3 g64": dict(method="awq", bits=3, group_size=64),
    "SmoothQuant W8A8": dict(method="smoothquant", bits=8),
    "BiLLM": dict(method="billm", bits=1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--only", default=None, help="comma-separated recipe names to run")
    p.add_argument("--lm-head", action="store_true",
                   help="after each recipe that can (rtn, gptq, billm), the same with lm_head quantized ('+ head')")
    args = p.parse_args()
    recipes = {}
    for name, kw in RECIPES.items():
        if args.only and name not in args.only.split(","):
            continue
        recipes[name] = kw
        if args.lm_head and not method_spec(METHOD_NAMES[kw["method"]]()).scales:  # the methods that take a head
            recipes[f"{name} + head"] = {**kw, "lm_head": True}
    t0 = time.time()
    rows = compare_perplexity("smollm2", recipes, calib_n=args.calib_samples, calib_len=args.calib_seqlen,
                              eval_len=args.seqlen, eval_windows=args.max_windows)
    base = rows[0]["ppl"]
    print("| setting | avg bits | held-out PPL | vs fp32 | KL mean (nats) | KL p99 | top-1 agreement | quantize time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kl = (f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {100 * r['top1_agreement']:.1f} %" if "kl_mean" in r
              else "0 | 0 | 100 %")
        print(f"| {r['name']} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.1f} % | {kl} "
              f"| {r['quantize_seconds']:.0f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"rows": rows, "settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine(), "commit": commit, "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
