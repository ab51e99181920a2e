"""`qwenquant report`: the study-style table (Markdown + CSV) and quality-vs-bits plots (PNG), rendered
from a results store — never by hand.

    qwenquant report                                   # the demo's store -> results/demo-report/
    qwenquant report --store runs/a.sqlite --out runs/report
    qwenquant report --config configs/demo.toml        # only that grid's cells
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_STORE = "results/demo.sqlite"


def register(sub) -> None:
    p = sub.add_parser("report", help="render tables and plots from a results store")
    p.add_argument("--store", default=None, help=f"results store (default: the config's, else {DEFAULT_STORE})")
    p.add_argument("--out", default=None, help="output directory (default: <store dir>/<store name>-report)")
    p.add_argument("--config", default=None, help="only the cells of this sweep config's grid")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(run=run)


def run(args) -> dict:
    from qwenquant.io.store import ResultStore
    from qwenquant.report import write_report

    keys = None
    store = args.store
    if args.config:
        from qwenquant.sweep import load_config, validate

        config = validate(load_config(args.config), check_data=False)  # keys only: data may live elsewhere
        keys = {c.key for c in config.cells()}
        store = store or config.store
    store_path = Path(store or DEFAULT_STORE).expanduser()
    if not store_path.is_file():
        raise FileNotFoundError(f"results store {str(store_path)!r} does not exist; run `qwenquant sweep CONFIG` "
                                "(or `qwenquant demo`) first, or pass --store")
    out = Path(args.out).expanduser() if args.out else store_path.parent / f"{store_path.stem}-report"
    with ResultStore(store_path) as s:
        files = write_report(s, out, keys=keys, plots=not args.no_plots)
    print(files.markdown.read_text(), end="")
    print(f"\ntable: {files.markdown}\ncsv:   {files.csv}")
    for p in files.plots:
        print(f"plot:  {p}")
    return files.to_dict()
