"""Check every name in a sweep config against the registries *before any work starts*.

A sweep that fails at cell 37 because of a typo in a task name wastes the hour before it; so all
problems are collected in one pass and raised together, naming the bad value and the choices. The
check is cheap: it builds each method's config (``api.method_config``), which also rejects invalid
combinations (BiLLM at 4 bits, activation bits the runtime cannot do), and looks names up in the
evaluation registries; no model or dataset is loaded.

It also *normalizes* each quantization to the settings the method will really use (SmoothQuant is
always symmetric and W·A8 unless told otherwise; BiLLM has no group size or symmetry), so the
report's row labels and the cell keys say what ran, not what was typed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qwenquant.sweep.grid import MMLUEval, PerplexityEval, QuantSetting, SweepConfig, TaskEval


def validate(config: SweepConfig, check_data: bool = True) -> SweepConfig:
    """The config with normalized quantization settings; ValueError listing every problem found.

    ``check_data=False`` checks and normalizes only the quantization settings (enough to compute the
    cells' keys, e.g. to report a sweep on a machine without its models and data).
    """
    problems: list[str] = []
    if check_data:
        problems += [p for m in config.models for p in _check_model(m)]
    quant = []
    for q in config.quant:
        normalized, problem = _normalize_quant(q)
        quant.append(normalized)
        if problem:
            problems.append(problem)
    if check_data and any(not q.is_baseline for q in config.quant):
        problems += _check_calibration_source(config.calibration.source)
    for ev in config.evaluations if check_data else ():
        problems += _check_evaluation(ev)
    if problems:
        where = f"sweep config {config.source}" if config.source else "sweep config"
        raise ValueError(f"{where}: {len(problems)} problem(s), nothing was run:\n  - " + "\n  - ".join(problems))
    return dataclasses.replace(config, quant=tuple(quant))


def recipe_for(q: QuantSetting):
    """The method's config object (``api.method_config``) for a quantization setting."""
    from qwenquant import api

    return api.method_config(q.method, bits=q.bits, group_size=q.group_size, symmetric=bool(q.symmetric),
                             act_bits=q.act_bits, **dict(q.options))


def _normalize_quant(q: QuantSetting) -> tuple[QuantSetting, str | None]:
    if q.is_baseline:
        return q, None
    try:
        recipe = recipe_for(q)
    except (ValueError, TypeError) as e:
        return q, f"quantization {q.label}: {e}"
    spec = getattr(recipe.method, "spec", None)
    if spec is None:  # a method without an integer grid (BiLLM): group and symmetry do not apply
        return dataclasses.replace(q, group_size=None, symmetric=None, act_bits=recipe.act_bits), None
    return dataclasses.replace(q, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                               act_bits=recipe.act_bits), None


def _check_model(name: str) -> list[str]:
    from qwenquant.model.fixtures import MODEL_BUILDERS

    if name in MODEL_BUILDERS or Path(name).expanduser().is_dir():
        return []
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return []  # a hub id: resolved (or refused) by transformers when loaded
    return [f"model {name!r}: not a short name ({', '.join(sorted(MODEL_BUILDERS))}), an existing "
            "directory, or a hub id like Qwen/Qwen3-0.6B"]


def _check_calibration_source(source: str) -> list[str]:
    from qwenquant.model.fixtures import TEXT_SOURCES

    name, sep, path = source.partition("=")
    if sep and name in ("c4", "docs"):
        if Path(path).expanduser().exists():
            return []
        return [f"calibration source {source!r}: no such corpus file {path!r} (a C4 en train shard, JSON/JSONL(.gz))"]
    if source in TEXT_SOURCES or Path(source).expanduser().is_file():
        return []
    return [f"calibration source {source!r}: not a named text ({', '.join(sorted(TEXT_SOURCES))}), "
            "not c4=PATH / docs=PATH (a document corpus), and not an existing text file"]


def _check_evaluation(ev) -> list[str]:
    if isinstance(ev, PerplexityEval):
        from qwenquant.eval.sources import parse_source

        try:
            parse_source(ev.source)
        except (ValueError, FileNotFoundError) as e:
            return [str(e)]
        return [] if ev.seqlen >= 2 else [f"perplexity {ev.source}: seqlen must be >= 2, got {ev.seqlen}"]
    if isinstance(ev, TaskEval):
        from qwenquant.eval.multiple_choice import TASKS

        if ev.task not in TASKS:
            return [f"unknown task {ev.task!r}; choose from {', '.join(TASKS)}"]
        return []
    if isinstance(ev, MMLUEval):
        from qwenquant.eval.mmlu import list_subjects

        try:
            available = list_subjects()
        except FileNotFoundError as e:
            return [f"mmlu: {e}"]
        unknown = [s for s in ev.subjects or () if s not in available]
        if unknown:
            return [f"unknown MMLU subject(s) {unknown}; available: {', '.join(available)}"]
        return []
    raise TypeError(f"no check for evaluation type {type(ev).__name__}")
