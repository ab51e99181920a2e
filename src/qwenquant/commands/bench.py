"""``qwenquant bench gemm|e2e|report``: per-GEMM and end-to-end speed per execution mode (GPU), and the report."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="GEMM / end-to-end speed per execution mode against bf16 (GPU); report")
    p.add_argument("what", choices=("gemm", "e2e", "report"))
    p.add_argument("--models", default="qwen3-8b", help="gemm: comma-separated of qwen3-0.6b,qwen3-8b,qwen3-8b-merged,qwen3-32b,qwen3-30b-a3b")
    p.add_argument("--modes", default=None, help="comma-separated mode names (default: all): gemm — of bench.gemm.MODES; "
                   "e2e — of bench.e2e.E2E_MODES (bf16 always runs first)")
    p.add_argument("--attend", default="prep-in-split", help="e2e: the decode attention of every mode (bench.e2e.ATTEND: "
                   "filled, split, prep, prep-in-split, masked)")
    p.add_argument("--no-epilogues", action="store_true", help="e2e: the residual adds + RMSNorms and SiLU·mul as "
                   "compiled kernels of their own, not inside the batch-1 W4 kernels (the default at batch <= 8)")
    p.add_argument("--pdl", action="store_true", help="e2e: programmatic dependent launch for every mode — our kernels "
                   "(QWENQUANT_PDL) and torch.compile's (its triton.enable_pdl); Hopper or newer")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--results", default="benchmarks/results", help="report: folder of result JSON")
    p.set_defaults(run=run)


def run(args) -> dict:
    if args.what == "report":
        from qwenquant.bench.render import render

        return render(args.results)
    import torch

    modes = None if args.modes is None else [m for m in args.modes.split(",") if m]
    if args.what == "e2e":  # names checked here, on any machine, before minutes of model building on a GPU
        from qwenquant.bench import e2e

        unknown = [m for m in modes or () if m not in e2e.E2E_MODES]
        if unknown:
            raise ValueError(f"bench e2e: unknown mode(s) {unknown}; known: {', '.join(e2e.E2E_MODES)}")
        if args.attend not in e2e.ATTEND:
            raise ValueError(f"bench e2e: --attend {args.attend!r}; expected one of {', '.join(e2e.ATTEND)}")
    if not torch.cuda.is_available():
        raise ValueError("bench gemm/e2e measure GPU kernels and need CUDA; `bench report` renders stored results on any machine")
    if args.what == "gemm":
        from qwenquant.bench import gemm

        res = gemm.run(models=args.models.split(","), modes=modes)
    else:
        res = e2e.run(modes=tuple(modes) if modes else tuple(e2e.E2E_MODES), out_path=args.out, attend=args.attend,
                      epilogues=not args.no_epilogues, pdl=args.pdl)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, default=str)
    return {"kind": res["kind"], "n_results": len(res["results"]), "out": args.out}
