"""PNG plots of a :class:`ResultTable`: quality against weight bits, one line per method setting.

Per model, two figures:

``ppl_vs_bits_<model>.png``       one panel per perplexity source; log-scale y whenever the values
                                   span more than a factor of 5 (3-bit and binary collapse would
                                   flatten everything else on a linear axis).
``accuracy_vs_bits_<model>.png``  one panel per zero-shot task (``acc``) and MMLU, in percent.

The unquantized original is a dashed horizontal line. x is the nominal weight bit-width (BiLLM: 1).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from qwenquant.report.table import ResultTable, ReportRow, column_title

LOG_SPAN = 5.0  # max/min ratio above which a perplexity panel switches to a log y axis


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def write_plots(table: ResultTable, out_dir: Path) -> list[Path]:
    """Write every figure for every model in ``table``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for model in dict.fromkeys(r.model for r in table.rows):
        rows = [r for r in table.rows if r.model == model]
        ppl = [c for c in table.columns if c.startswith("ppl:")]
        acc = [c for c in table.columns if c.startswith("acc:") or c == "mmlu"]
        if ppl:
            paths.append(_figure(rows, ppl, f"{model}: perplexity vs weight bits", out_dir / f"ppl_vs_bits_{slug(model)}.png",
                                 percent=False))
        if acc:
            paths.append(_figure(rows, acc, f"{model}: accuracy vs weight bits", out_dir / f"accuracy_vs_bits_{slug(model)}.png",
                                 percent=True))
    return paths


def _figure(rows: list[ReportRow], columns: list[str], title: str, path: Path, percent: bool) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.8 * len(columns), 4.0), squeeze=False)
    scale = 100.0 if percent else 1.0
    for ax, col in zip(axes[0], columns):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            v = r.values.get(col)
            if v is None or r.bits is None or r.is_baseline:
                continue
            series.setdefault(r.series, []).append((r.bits, v * scale))
        values = [v for pts in series.values() for _, v in pts]
        for r in rows:
            if r.is_baseline and col in r.values:
                ax.axhline(r.values[col] * scale, color="black", linestyle="--", linewidth=1, label=r.method_label)
                values.append(r.values[col] * scale)
        for name, pts in series.items():
            pts.sort()
            shown = [(b, v) for b, v in pts if math.isfinite(v)]
            (line,) = ax.plot([b for b, _ in shown], [v for _, v in shown], marker="o", label=name)
            for b, v in pts:  # a collapsed model's inf / nan cannot be drawn: say it at the top of the panel
                if not math.isfinite(v):
                    ax.annotate(f"{name}: {v}", xy=(b, 0.97), xycoords=("data", "axes fraction"), ha="center",
                                va="top", fontsize=7, color=line.get_color())
        finite = [v for v in values if math.isfinite(v) and v > 0]
        if not percent and finite and max(finite) / min(finite) > LOG_SPAN:
            ax.set_yscale("log")
        bits = sorted({b for pts in series.values() for b, _ in pts})
        if bits:
            ax.set_xticks(bits)
        ax.set_xlabel("weight bits")
        ax.set_title(column_title(col))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)  # a reader never sees half a PNG
    return path
