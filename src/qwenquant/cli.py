"""The ``qwenquant`` command: thin. Each subcommand lives in ``qwenquant/commands/<name>.py`` and
provides ``register(subparsers)``, which adds its parser and sets ``run=function(args) -> dict``.

Every subcommand takes ``--json``: the result dict is then printed as one JSON object on the last
line of output (human-readable text may precede it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

# Order is the order of `qwenquant --help`.
SUBCOMMANDS = ("fixtures", "quantize", "eval", "demo", "sweep", "report", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"qwenquant.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"qwenquant.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        result = args.run(args)
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # OSError: missing files, unreachable hub
        print(f"qwenquant {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
