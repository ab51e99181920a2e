"""`qwenquant fixtures`: build the offline models and text (once; later calls only print paths)."""

from __future__ import annotations

import logging
import time

from qwenquant.model import fixtures

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "fixtures",
        help="build the offline fixtures (SmolLM2, tiny Qwen3s, Austen text) into the cache and print their paths",
        description=f"Fixtures are built into $QWENQUANT_CACHE (now {fixtures.cache_dir()}).",
    )
    p.add_argument(
        "--build",
        default="all",
        choices=("all", *fixtures.FIXTURE_NAMES),
        help="which fixture to build (default: all)",
    )
    p.set_defaults(run=run)


def run(args) -> dict:
    names = fixtures.FIXTURE_NAMES if args.build == "all" else (args.build,)
    paths = {}
    for name in names:
        t0 = time.perf_counter()
        paths[name] = str(fixtures.resolve_fixture(name))
        log.debug("%s ready in %.1f s", name, time.perf_counter() - t0)
        print(f"{name:16s} {paths[name]}")
    return paths
