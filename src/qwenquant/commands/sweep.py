"""`qwenquant sweep CONFIG`: run a grid of (model × quantization × evaluation) cells into a results store.

    qwenquant sweep configs/demo.toml                       # run (or resume) the demo grid
    qwenquant sweep configs/paper-qwen3.toml --dry-run      # check names, list cells, run nothing
    qwenquant sweep my.toml --store runs/a.sqlite --cache-dir runs/quantized

Every finished cell is stored at once; a rerun skips finished cells and a killed run resumes. The
config format is documented in ``qwenquant/sweep/grid.py``; ``configs/`` holds examples. After the
sweep the report (``qwenquant report``) of this grid's cells is written beside the store.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of quantize+evaluate cells into a results store (resumable)")
    p.add_argument("config", metavar="CONFIG", help="sweep config (.toml or .json)")
    p.add_argument("--store", default=None, help="results store (SQLite); default: the config's `store`, else results/<name>.sqlite")
    p.add_argument("--cache-dir", default=None, help="keep quantized checkpoints here and reuse them (default: the config's `cache_dir`)")
    p.add_argument("--no-cache", action="store_true", help="do not save or reuse quantized checkpoints")
    p.add_argument("--device", default=None, help="quantization device (default: the config's, else cuda if available)")
    p.add_argument("--out", default=None, help="report directory (default: <store dir>/<name>-report)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and list its cells; run nothing")
    p.add_argument("--progress", action="store_true", help="progress bars for quantization and evaluations")
    p.set_defaults(run=run)


def resolve_paths(config, store: str | None, cache_dir: str | None, no_cache: bool, out: str | None):
    store_path = Path(store or config.store or f"results/{config.name}.sqlite").expanduser()
    cache = None if no_cache else (cache_dir or config.cache_dir)
    out_dir = Path(out).expanduser() if out else store_path.parent / f"{config.name}-report"
    return store_path, None if cache is None else Path(cache).expanduser(), out_dir


def run(args) -> dict:
    from qwenquant.io.store import ResultStore
    from qwenquant.report import write_report
    from qwenquant.sweep import load_config, run_sweep, validate
    from qwenquant.sweep.backend import TorchBackend

    config = validate(load_config(args.config))  # every name checked before the store is touched
    store_path, cache_dir, out_dir = resolve_paths(config, args.store, args.cache_dir, args.no_cache, args.out)
    cells = config.cells()
    if args.dry_run:
        done = ResultStore(store_path).keys() if store_path.exists() else set()
        for c in cells:
            print(f"{'done' if c.key in done else 'todo'}  {c.key[:12]}  {c.label}")
        todo = sum(c.key not in done for c in cells)
        print(f"{len(cells)} cells, {len(cells) - todo} done, {todo} to run; store {store_path}")
        return {"cells": len(cells), "done": len(cells) - todo, "todo": todo, "store": str(store_path)}
    with ResultStore(store_path) as store:
        summary = run_sweep(config, store, TorchBackend(device=args.device or config.device, dtype=config.dtype, progress=args.progress),
                            cache_dir=cache_dir, keep_going=True)
        files = write_report(store, out_dir, keys={c.key for c in cells})
    print(files.markdown.read_text(), end="")
    print(f"\n{summary.computed} cells computed, {summary.skipped} already stored, {summary.seconds:.0f} s; "
          f"store {store_path}; report {files.markdown}")
    if summary.failed:
        raise RuntimeError(f"{len(summary.failed)} quantization setting(s) failed (their cells are not stored; a "
                           "rerun retries them):\n  " + "\n  ".join(summary.failed))
    return {**summary.to_dict(), "report": files.to_dict()}
