"""The study-style table, built from stored cells only: one row per (model, quantization), one column
per metric, the unquantized original first.

Rows are the cells' ``quant_key`` groups (model × quantization × calibration × seed); a row's cells
are its evaluations. Columns come from the metric names found, ordered as the study prints them:
perplexities (one per source), then KL and top-1 agreement against the original, then zero-shot
accuracies (``acc``, then ``acc_norm``), then MMLU. Nothing here computes a metric: a blank cell
means the store holds no such measurement.

Markdown rounds for reading (perplexity to 3 significant digits, ``7.5e3`` beyond 1000, accuracies in
percent to 0.1); CSV keeps every stored digit, so the CSV *is* the store's numbers in table form.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from qwenquant.io.store import CellRecord

BASELINE = "baseline"
METHOD_ORDER = ("rtn", "gptq", "awq", "smoothquant", "billm")   # the study's methods, in its order
KIND_ORDER = ("ppl", "kl", "top1", "acc", "acc_norm", "mmlu")
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LABEL_COLUMNS = ("model", "method", "w_bits", "group", "a_bits", "avg_bits")
TIMING_COLUMNS = ("quant_s", "eval_s")


@dataclass(frozen=True)
class ReportRow:
    model: str
    method: str                      # a method name, or BASELINE
    bits: int | None
    group_size: int | None           # None: per-channel
    act_bits: int | None
    symmetric: bool | None
    avg_bits: float | None           # as the quantization reported it (BiLLM: ~1.1)
    dtype: str | None                # the float dtype of the evaluated model (the baseline's label)
    quant_seconds: float | None
    eval_seconds: float
    values: dict[str, float]         # metric name -> stored value
    quant_key: str = ""

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    @property
    def method_label(self) -> str:
        if self.is_baseline:
            return DTYPE_LABELS.get(self.dtype or "", self.dtype or BASELINE)
        return self.method

    @property
    def series(self) -> str:
        """The row's line in a plot: everything but the weight bits (``gptq g64``, ``smoothquant a8``)."""
        parts = [self.method]
        if self.act_bits is not None:
            parts.append(f"a{self.act_bits}")
        if self.method != "billm":
            parts.append("per-channel" if self.group_size is None else f"g{self.group_size}")
        return " ".join(parts)


@dataclass(frozen=True)
class ResultTable:
    columns: tuple[str, ...]                 # metric names, in display order
    rows: tuple[ReportRow, ...]
    settings: tuple[str, ...] = ()           # how each evaluation was run (from the cells' configs)
    notes: tuple[str, ...] = ()              # anything a reader must know (conflicts resolved, ...)
    provenance: tuple[str, ...] = field(default=())


def build_table(cells: list[CellRecord]) -> ResultTable:
    """Group stored cells into rows (see module docstring). ``cells`` oldest first, as the store gives them."""
    groups: dict[str, list[CellRecord]] = {}
    for c in cells:
        groups.setdefault(c.quant_key, []).append(c)
    notes: list[str] = []
    rows = []
    for quant_key, group in groups.items():
        values: dict[str, float] = {}
        source_of: dict[str, CellRecord] = {}
        for c in group:  # oldest first: a later measurement of the same metric wins, and is noted
            for name, v in c.metrics.items():
                if name in source_of and source_of[name].key != c.key:
                    notes.append(f"{c.model} {_row_label(c)}: {name} measured twice with different settings; "
                                 f"showing the later ({c.finished_at})")
                values[name], source_of[name] = v, c
        head = group[0]
        q = _quant_details(group)
        rows.append(ReportRow(
            model=head.model, method=head.method, bits=head.bits, group_size=head.group_size,
            act_bits=head.act_bits, symmetric=head.symmetric, avg_bits=q.get("avg_bits"),
            dtype=_model_details(group).get("dtype"), quant_seconds=_quant_seconds(q),
            eval_seconds=sum(c.wall_seconds for c in group), values=values, quant_key=quant_key,
        ))
    model_order = list(dict.fromkeys(r.model for r in rows))
    rows.sort(key=lambda r: (model_order.index(r.model), *_row_sort_key(r)))
    names = list(dict.fromkeys(n for r in rows for n in r.values))
    columns = sorted(names, key=lambda n: (_kind_rank(n), names.index(n)))
    return ResultTable(tuple(columns), tuple(rows), _settings(cells), tuple(dict.fromkeys(notes)), _provenance(cells))


# ------------------------------------------------------------------------------------ rendering

def column_title(name: str) -> str:
    kind, _, what = name.partition(":")
    return {
        "ppl": f"PPL {what}", "kl": f"KL {what}", "top1": f"top-1 % {what}",
        "acc": f"{what} acc %", "acc_norm": f"{what} acc_norm %", "mmlu": "MMLU %",
    }.get(kind, name)


def format_value(name: str, v: float | None) -> str:
    if v is None:
        return "—"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    kind = name.partition(":")[0]
    if kind in ("top1", "acc", "acc_norm", "mmlu"):
        return f"{100 * v:.1f}"
    if kind == "ppl" and abs(v) >= 1000:
        mantissa, _, exp = f"{v:.1e}".partition("e")
        return f"{mantissa}e{int(exp)}"
    return f"{v:.3g}"


def label_cells(r: ReportRow) -> list[str]:
    return [
        r.model,
        r.method_label,
        "—" if r.bits is None else str(r.bits),
        "—" if r.is_baseline or r.method == "billm" else ("channel" if r.group_size is None else str(r.group_size)),
        "—" if r.act_bits is None else str(r.act_bits),
        "—" if r.avg_bits is None else f"{r.avg_bits:.2f}",
    ]


def to_markdown(table: ResultTable, timing: bool = True) -> str:
    head = ["model", "method", "W bits", "group", "A bits", "avg bits"] + [column_title(c) for c in table.columns]
    if timing:
        head += ["quant s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    for r in table.rows:
        cells = label_cells(r) + [format_value(c, r.values.get(c)) for c in table.columns]
        if timing:
            cells += ["—" if r.quant_seconds is None else f"{r.quant_seconds:.1f}", f"{r.eval_seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if table.settings:
        out += "\nEvaluations: " + "; ".join(table.settings) + ".\n"
    if table.provenance:
        out += "\nMeasured with: " + "; ".join(table.provenance) + ".\n"
    for n in table.notes:
        out += f"\nNote: {n}\n"
    return out


def to_csv(table: ResultTable) -> str:
    """Full-precision values (``repr`` of the stored float), blank where not measured."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*LABEL_COLUMNS, *table.columns, *TIMING_COLUMNS, "quant_key"])
    for r in table.rows:
        w.writerow([
            r.model, r.method_label, _blank(r.bits), _blank(r.group_size), _blank(r.act_bits), _blank(r.avg_bits),
            *(_blank(r.values.get(c)) for c in table.columns),
            _blank(r.quant_seconds), repr(r.eval_seconds), r.quant_key,
        ])
    return buf.getvalue()


# -------------------------------------------------------------------------------------- helpers

def _blank(v: Any) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def _kind_rank(name: str) -> int:
    kind = name.partition(":")[0]
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def _row_sort_key(r: ReportRow) -> tuple:
    method_rank = -1 if r.is_baseline else (METHOD_ORDER.index(r.method) if r.method in METHOD_ORDER else len(METHOD_ORDER))
    return (
        method_rank, r.method,
        -(r.bits or 0),
        r.group_size is None, r.group_size or 0,          # grouped before per-channel, as the study prints
        r.act_bits is not None, -(r.act_bits or 0),
    )


def _row_label(c: CellRecord) -> str:
    if c.method == BASELINE:
        return BASELINE
    return f"{c.method} w{c.bits}" + (f"a{c.act_bits}" if c.act_bits else "") + (
        "" if c.group_size is None else f" g{c.group_size}")


def _quant_details(group: list[CellRecord]) -> dict[str, Any]:
    for c in group:
        q = c.details.get("quantization") or {}
        if q:
            return q
    return {}


def _model_details(group: list[CellRecord]) -> dict[str, Any]:
    for c in group:
        m = c.details.get("model") or {}
        if m:
            return m
    return {}


def _quant_seconds(q: dict[str, Any]) -> float | None:
    if "seconds" in q:
        return float(q["seconds"])
    report = q.get("report") or {}
    return float(report["seconds"]) if "seconds" in report else None


def _settings(cells: list[CellRecord]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for c in cells:
        ev = c.config.get("evaluation", {})
        seen[_describe_evaluation(ev)] = None
        cal = c.config.get("calibration")
        if cal:
            seen[f"calibration {cal['source']} {cal['n']}×{cal['seqlen']} tokens, seed {c.config.get('seed')}"] = None
    return tuple(seen)


def _describe_evaluation(ev: dict[str, Any]) -> str:
    kind = ev.get("kind")
    if kind == "perplexity":
        windows = "all" if ev.get("max_windows") is None else str(ev["max_windows"])
        return f"perplexity {ev['source']}: {windows} windows × {ev['seqlen']} tokens" + (
            ", KL/top-1 vs the original" if ev.get("kl") else "")
    if kind == "task":
        return f"{ev['task']}: {'all' if ev.get('limit') is None else ev['limit']} items, 0-shot"
    if kind == "mmlu":
        subjects = "all subjects" if ev.get("subjects") is None else f"{len(ev['subjects'])} subjects"
        per = "all" if ev.get("limit") is None else f"≤{ev['limit']}"
        return f"MMLU: {subjects}, {per} questions each, {ev.get('shots')}-shot"
    return str(ev)


def _provenance(cells: list[CellRecord]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for c in cells:
        p = c.provenance
        v = p.get("versions", {})
        hw = p.get("hardware", {})
        seen[f"{hw.get('gpu') or hw.get('cpu', '?')}, torch {v.get('torch', '?')}, transformers "
             f"{v.get('transformers', '?')}, qwenquant {v.get('qwenquant', '?')}, commit {str(p.get('git_commit', '?'))[:12]}"] = None
    return tuple(seen)
