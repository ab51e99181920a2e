"""``qwenquant bench gemm|e2e|report``: per-GEMM and end-to-end speed per execution mode (GPU), and the report."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="GEMM / end-to-end speed per execution mode against bf16 (GPU); report")
    p.add_argument("what", choices=("gemm", "e2e", "report"))
    p.add_argument("--models", default="qwen3-8b", help="gemm: comma-separated of qwen3-0.6b,qwen3-8b,qwen3-8b-merged,qwen3-32b,qwen3-30b-a3b")
    p.add_argument("--modes", default=None, help="gemm: comma-separated mode names (default: all)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--results", default="benchmarks/results", help="report: folder of result JSON")
    p.set_defaults(run=run)


def run(args) -> dict:
    if args.what == "report":
        from qwenquant.bench.render import render

        return render(args.results)
    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench gemm/e2e measure GPU kernels and need CUDA; `bench report` renders stored results on any machine")
    if args.what == "gemm":
        from qwenquant.bench import gemm

        res = gemm.run(models=args.models.split(","), modes=None if args.modes is None else args.modes.split(","))
    else:
        from qwenquant.bench import e2e

        res = e2e.run(out_path=args.out)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, default=str)
    return {"kind": res["kind"], "n_results": len(res["results"]), "out": args.out}
