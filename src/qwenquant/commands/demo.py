"""`qwenquant demo`: the study in miniature, offline, on 2 CPU cores in about 20 minutes.

Runs the grid of ``configs/demo.toml`` — SmolLM2-135M (a real trained model, shipped as a wheel)
unquantized, RTN / GPTQ / AWQ at 8, 4 and 3 bits (group 64), SmoothQuant W8A8 and BiLLM (~1.1 bit);
calibration on Jane Austen's calibration novels, perplexity and KL / top-1 agreement against the
original on the held-out novels, ARC-Easy and OpenBookQA (a few dozen items each) and a few MMLU
subjects — into ``results/demo.sqlite``, then prints the study-style table and writes it with its
plots to ``results/demo-report/``.

It is an ordinary sweep: rerunning it skips everything already stored (``--fresh`` starts over in a
new store), and a killed run resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.toml"


def register(sub) -> None:
    p = sub.add_parser("demo", help="quantize SmolLM2 with every method and print the study-style table (~20 min, CPU)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="the demo grid (default: configs/demo.toml)")
    p.add_argument("--store", default=None, help="results store (default: the config's, results/demo.sqlite)")
    p.add_argument("--out", default=None, help="report directory (default: <store dir>/demo-report)")
    p.add_argument("--fresh", action="store_true", help="move an existing store aside and start over")
    p.add_argument("--no-cache", action="store_true", help="do not save or reuse quantized checkpoints")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.set_defaults(run=run)


def run(args) -> dict:
    import time

    from qwenquant.commands.sweep import resolve_paths
    from qwenquant.io.store import ResultStore
    from qwenquant.report import write_report
    from qwenquant.sweep import load_config, run_sweep, validate
    from qwenquant.sweep.backend import TorchBackend

    config_path = Path(args.config)
    if not config_path.is_file():
        raise FileNotFoundError(f"demo grid {str(config_path)!r} not found (it ships in the repository's configs/); "
                                "pass --config")
    config = validate(load_config(config_path))
    store_path, cache_dir, out_dir = resolve_paths(config, args.store, None, args.no_cache, args.out)
    if args.fresh and store_path.exists():
        aside = store_path.with_name(f"{store_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}{store_path.suffix}")
        store_path.rename(aside)
        for suffix in ("-wal", "-shm"):
            side = store_path.with_name(store_path.name + suffix)
            if side.exists():
                side.rename(aside.with_name(aside.name + suffix))
        print(f"previous store moved to {aside}")
    with ResultStore(store_path) as store:
        summary = run_sweep(config, store, TorchBackend(device=config.device, dtype=config.dtype, progress=args.progress),
                            cache_dir=cache_dir, keep_going=True)
        files = write_report(store, out_dir, keys={c.key for c in config.cells()})
    print(files.markdown.read_text(), end="")
    print(f"\n{summary.computed} cells computed, {summary.skipped} already stored, {summary.seconds:.0f} s wall")
    print(f"table: {files.markdown}\ncsv:   {files.csv}")
    for p in files.plots:
        print(f"plot:  {p}")
    if summary.failed:
        raise RuntimeError(f"{len(summary.failed)} quantization setting(s) failed (their cells are not stored; a "
                           "rerun retries them):\n  " + "\n  ".join(summary.failed))
    return {**summary.to_dict(), "report": files.to_dict()}
