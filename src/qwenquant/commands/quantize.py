"""`qwenquant quantize`: one model, one method, one checkpoint."""

from __future__ import annotations

import logging

from qwenquant import api

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with one method and save a checkpoint")
    p.add_argument("--model", required=True, help="short name (smollm2, tiny-qwen3, tiny-qwen3-moe), HF directory or hub id")
    p.add_argument("--method", required=True, choices=api.METHODS)
    p.add_argument("--bits", type=int, required=True, help="weight bits 1..8 (billm: 1)")
    p.add_argument("--act-bits", type=int, default=None, help="dynamic per-token activation bits (4 or 8); smoothquant defaults to 8")
    p.add_argument("--group-size", type=int, default=None, help="columns per group; omitted = per-channel")
    p.add_argument("--sym", action="store_true", help="symmetric weights (default asymmetric; smoothquant always symmetric)")
    p.add_argument("--calib", default="austen", help="calibration text: a source name (austen) or a .txt path")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward")
    p.add_argument("--lm-head", action="store_true",
                   help="also quantize lm_head (rtn, gptq, billm; with --act-bits its input too); a tied embedding is "
                        "untied and stays full precision")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. damp=0.01, act_order=false, alpha=0.8 (repeatable)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.set_defaults(run=run)


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def run(args) -> dict:
    options = parse_sets(args.set)
    if args.lm_head:
        options["lm_head"] = True
    recipe = api.method_config(args.method, bits=args.bits, group_size=args.group_size, symmetric=args.sym,
                               act_bits=args.act_bits, **options)
    model, tok, info = api.load(args.model)
    if info["quantized"]:
        raise ValueError(f"{args.model} is already a quantized checkpoint; quantize the original model")
    ids = None
    if api.needs_calibration(model, recipe):
        ids = api.calibration_ids(tok, args.calib, args.calib_samples, args.calib_seqlen, args.seed)
        log.info("calibration: %s windows x %s tokens from %s (seed %s)", *ids.shape, args.calib, args.seed)
    else:
        log.info("%s on a dense model is data-free: no calibration pass", recipe.method_name)
    report = api.quantize(model, tok, recipe, ids, device=args.device, batch_size=args.batch_size)
    calib = None if ids is None else {"source": args.calib, "samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed}
    out = api.save_quantized(model, tok, report, args.out, source=args.model, calib=calib)
    print(f"quantized {args.model} with {recipe.method_name} ({report.avg_bits:.3f} avg bits) in {report.seconds:.1f}s "
          f"-> {out}; MoE fallbacks: {report.fallback_count}")
    return {"out": str(out), "method": recipe.method_name, "avg_bits": report.avg_bits, "seconds": report.seconds,
            "peak_memory_bytes": report.peak_memory_bytes, "fallback_count": report.fallback_count,
            "expert_tokens": {str(l.index): l.expert_tokens for l in report.layers if l.expert_tokens}}
