"""`qwenquant eval`: perplexity (with KL / top-1 agreement against a reference), zero-shot tasks, MMLU.

    qwenquant eval out/smollm2-gptq-w4 --ppl austen --kl smollm2 --tasks arc_easy,openbookqa --limit 200
    qwenquant eval Qwen/Qwen3-0.6B-Base --ppl wikitext2=wiki.test.raw --mmlu --device cuda --dtype bfloat16

The model is anything :func:`qwenquant.api.load` takes (short name, HF directory, hub id, quantized
checkpoint). Results print as a short summary; with ``--json`` also as one JSON object.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, KL vs a reference, zero-shot tasks and MMLU of one model")
    p.add_argument("model", metavar="MODEL_OR_DIR", help="short name, HF directory, hub id or quantized checkpoint")
    p.add_argument("--ppl", metavar="SOURCE", default=None,
                   help="perplexity text: wikitext2[=PATH], c4[=SHARD], austen, or a .txt/.jsonl/.parquet path")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first K windows")
    p.add_argument("--kl", metavar="REFERENCE_MODEL", default=None,
                   help="also report KL(P_ref || P_model) and top-1 agreement against this model (needs --ppl)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks, e.g. arc_easy,openbookqa")
    p.add_argument("--limit", type=int, default=None, help="items per task and test questions per MMLU subject")
    p.add_argument("--sample-seed", type=int, default=None,
                   help="with --limit: a seeded random sample of tasks' items instead of the first N")
    p.add_argument("--task-source", choices=("auto", "local", "hf"), default="auto",
                   help="task data: local files under the data root, Hugging Face datasets, or auto (local if present)")
    p.add_argument("--mc-mode", choices=("auto", "batched", "shared-prefix"), default="auto",
                   help="task scoring: whole sequences batched by length (GPU), or each context once with a KV cache "
                        "(CPU); auto = shared-prefix on cpu, batched otherwise (same numbers either way)")
    p.add_argument("--mmlu", action="store_true", help="5-shot MMLU (data root/mmlu)")
    p.add_argument("--mmlu-subjects", default=None, help="comma-separated MMLU subjects (default: all)")
    p.add_argument("--mmlu-shots", type=int, default=5)
    p.add_argument("--data-dir", default=None, help="benchmark data root (default $QWENQUANT_DATA or <repo>/../shared/data)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward for tasks and MMLU")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights dtype of unquantized models")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def run(args) -> dict:
    from qwenquant import api
    from qwenquant.eval import multiple_choice, sources
    from qwenquant.eval.mmlu import MMLUConfig, evaluate_mmlu
    from qwenquant.eval.perplexity import PerplexityConfig, check_context, evaluate_perplexity

    tasks = _csv(args.tasks)
    unknown = [t for t in tasks if t not in multiple_choice.TASKS]
    if unknown:  # refuse before loading a model
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(sorted(multiple_choice.TASKS))}")
    if args.kl and not args.ppl:
        raise ValueError("--kl compares next-token distributions on the perplexity text: give --ppl SOURCE too")
    if not (args.ppl or tasks or args.mmlu):
        raise ValueError("nothing to evaluate: give --ppl SOURCE, --tasks T1,T2 and/or --mmlu")
    progress = not args.no_progress
    dtype = DTYPES[args.dtype]

    model, tok, info = api.load(args.model, dtype=dtype, device=args.device)
    result: dict = {"model": str(args.model), "quantized": bool(info.get("quantized")),
                    "device": args.device, "dtype": args.dtype}

    if args.ppl:
        check_context(model, args.seqlen)
        stream = sources.load_token_stream(args.ppl, tok)
        reference = None
        if args.kl:
            reference, ref_tok, _ = api.load(args.kl, dtype=dtype, device=args.device)
            if ref_tok.get_vocab() != tok.get_vocab():
                raise ValueError(f"--kl reference {args.kl!r} has a different tokenizer than {args.model!r}")
        ppl = evaluate_perplexity(model, stream, PerplexityConfig(args.seqlen, args.max_windows), reference=reference,
                                  reference_name=str(args.kl), progress=progress)
        result.update(ppl.to_dict())
        del reference

    if tasks:
        shared_prefix = args.mc_mode == "shared-prefix" or (args.mc_mode == "auto" and args.device == "cpu")
        result["tasks"] = {}
        for task in tasks:
            r = multiple_choice.evaluate_task(model, tok, task, limit=args.limit, seed=args.sample_seed,
                                              data_dir=args.data_dir, source=args.task_source,
                                              batch_size=args.batch_size, shared_prefix=shared_prefix,
                                              progress=progress)
            result["tasks"][task] = r.to_dict()

    if args.mmlu:
        cfg = MMLUConfig(shots=args.mmlu_shots, subjects=tuple(_csv(args.mmlu_subjects)) or None,
                         limit=args.limit, batch_size=args.batch_size)
        result["mmlu"] = evaluate_mmlu(model, tok, cfg, data_dir=args.data_dir, progress=progress).to_dict()

    print(summary(result))
    return result


def summary(r: dict) -> str:
    lines = [f"model {r['model']}{' (quantized)' if r['quantized'] else ''}  [{r['device']}, {r['dtype']}]"]
    if "ppl" in r:
        lines.append(f"  perplexity {r['source']}: {r['ppl']:.4f}  ({r['windows']} windows x {r['seqlen']}, "
                     f"{r['tokens']} tokens, {r['seconds']:.1f} s)")
    if "kl_mean" in r:
        lines.append(f"  vs {r['reference']}: KL mean {r['kl_mean']:.4g}  p50 {r['kl_p50']:.4g}  p90 {r['kl_p90']:.4g}  "
                     f"p99 {r['kl_p99']:.4g}  max {r['kl_max']:.4g}  top-1 agreement {100 * r['top1_agreement']:.2f}%")
    for task, t in r.get("tasks", {}).items():
        lines.append(f"  {task}: acc {100 * t['acc']:.2f}%  acc_norm {100 * t['acc_norm']:.2f}%  "
                     f"(n={t['n']}, ±{100 * t['acc_stderr']:.1f}, {t['seconds']:.1f} s, {t['source']})")
    if "mmlu" in r:
        m = r["mmlu"]
        lines.append(f"  MMLU {m['shots']}-shot: {100 * m['accuracy']:.2f}% micro, {100 * m['macro_accuracy']:.2f}% macro "
                     f"(n={m['n']}, {len(m['subjects'])} subjects, {m['seconds']:.1f} s)")
    return "\n".join(lines)
