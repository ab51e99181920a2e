"""Reports rendered from the results store, never by hand: the study-style table (Markdown, CSV)
and quality-vs-bits plots (PNG). ``table`` builds and formats; ``plots`` draws."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwenquant.io.store import ResultStore
from qwenquant.report.table import ResultTable, build_table, to_csv, to_markdown

__all__ = ["ReportFiles", "ResultTable", "build_table", "to_csv", "to_markdown", "write_report"]


@dataclass
class ReportFiles:
    markdown: Path
    csv: Path
    plots: list[Path] = field(default_factory=list)
    table: ResultTable | None = None

    def to_dict(self) -> dict:
        return {"markdown": str(self.markdown), "csv": str(self.csv), "plots": [str(p) for p in self.plots],
                "rows": 0 if self.table is None else len(self.table.rows)}


def write_report(store: ResultStore, out_dir: str | Path, keys: set[str] | None = None, plots: bool = True) -> ReportFiles:
    """Render ``results.md``, ``results.csv`` and the PNG plots of the cells in ``store`` (or only
    those among ``keys``) into ``out_dir``."""
    from qwenquant.report.plots import write_plots

    cells = store.cells(keys)
    if not cells:
        raise ValueError(f"results store {store.path} holds no finished cells{' of this sweep' if keys else ''}: nothing to report")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(cells)
    md, csv_path = out / "results.md", out / "results.csv"
    _write_atomic(md, to_markdown(table))
    _write_atomic(csv_path, to_csv(table))
    return ReportFiles(md, csv_path, write_plots(table, out) if plots else [], table)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
