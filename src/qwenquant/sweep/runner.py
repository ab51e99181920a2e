"""Run a sweep: every cell not yet in the store, in order, each stored the moment it finishes.

The loop is deliberately plain::

    for model:                              # the original is loaded lazily, once
        for quantization of that model:     # quantized once (or loaded from the cache)
            for evaluation:                 # one cell
                metrics = evaluate(...)
                store.put(cell)             # one transaction; nothing before this line is kept

What happens to models is delegated to a :class:`Backend` (``backend.TorchBackend`` for real
models; tests inject a fake one that needs no model), so the bookkeeping — skipping finished
cells, resuming after ``kill -9``, caching quantized weights, recording provenance — is tested on
its own, in milliseconds.

Resume needs no journal: a cell is either in the store (complete) or not (redo it). The quantized
checkpoint cache is keyed by ``Cell.quant_key`` and written atomically by the backend, so a crash
during quantization leaves no half checkpoint to be mistaken for a whole one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from qwenquant.io.store import CellRecord, ResultStore
from qwenquant.sweep.grid import Cell, CalibrationSetting, EvalSetting, PerplexityEval, QuantSetting, SweepConfig
from qwenquant.sweep.provenance import provenance, utc_now
from qwenquant.sweep.validate import validate

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What a sweep needs done to models. ``Any`` below is the backend's own model handle."""

    def load_original(self, model: str) -> Any:
        """The unquantized model named ``model``; it must never be modified afterwards."""

    def quantize(self, original: Callable[[], Any], quant: QuantSetting, calibration: CalibrationSetting,
                 seed: int, cache_path: Path | None) -> tuple[Any, dict[str, Any]]:
        """A quantized copy of ``original()`` (called only if needed: it loads the model on first call),
        or the checkpoint at ``cache_path`` if one is there; a new one is saved there atomically when a
        path is given. Returns (handle, the quantization's details to store)."""

    def evaluate(self, subject: Any, evaluation: EvalSetting, reference: Any | None) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics named as ``evaluation.metric_names()``, details) for one evaluation of ``subject``;
        ``reference`` is the original model when the evaluation compares against it."""

    def describe(self, handle: Any) -> dict[str, Any]:
        """What to record about a model handle (e.g. its float dtype and architecture)."""

    def release(self, handle: Any) -> None:
        """Free a model handle that the sweep no longer needs."""


@dataclass
class SweepSummary:
    name: str
    store: str
    total: int                    # cells in the grid
    skipped: int                  # already in the store when the run began
    computed: int                 # stored by this run
    seconds: float
    computed_keys: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)   # "model · setting: error", with keep_going

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "store": self.store, "total": self.total, "skipped": self.skipped,
                "computed": self.computed, "failed": self.failed, "seconds": round(self.seconds, 3)}


def run_sweep(config: SweepConfig, store: ResultStore, backend: Backend, cache_dir: Path | None = None,
              keep_going: bool = False) -> SweepSummary:
    """Compute and store every cell of ``config`` missing from ``store``; see the module docstring.

    With ``keep_going``, a quantization (or one of its evaluations) that raises is logged and listed
    in ``SweepSummary.failed`` and the sweep goes on with the next one; its unfinished cells stay
    unstored, so a rerun retries them. Without it, the error propagates at once.
    """
    config = validate(config)  # every name checked before any model is touched
    t0 = time.perf_counter()
    cells = config.cells()
    _check_unique_keys(cells)
    done = store.keys()
    todo = [c for c in cells if c.key not in done]
    log.info("sweep %s: %d cells, %d already in %s, %d to run", config.name, len(cells), len(cells) - len(todo),
             store.path, len(todo))
    prov = provenance()
    computed: list[str] = []
    failed: list[str] = []
    for model in dict.fromkeys(c.model for c in todo):
        original = _Lazy(lambda m=model: backend.load_original(m))
        groups: dict[str, list[Cell]] = {}
        for c in todo:
            if c.model == model:
                groups.setdefault(c.quant_key, []).append(c)
        for group in groups.values():
            try:
                _run_group(group, original, cache_dir, prov, store, backend, computed)
            except Exception as e:  # noqa: BLE001 -- with keep_going, one broken setting must not stop the grid
                if not keep_going:
                    raise
                log.exception("quantization %s of %s failed; its cells are not stored", group[0].quant.label, model)
                failed.append(f"{group[0].label.rpartition(' · ')[0]}: {type(e).__name__}: {e}")
        if original.loaded:
            backend.release(original.get())
    summary = SweepSummary(config.name, str(store.path), len(cells), len(cells) - len(todo), len(computed),
                           time.perf_counter() - t0, computed, failed)
    log.info("sweep %s: %d computed, %d skipped, %.1f s", config.name, summary.computed, summary.skipped, summary.seconds)
    return summary


def _run_group(group: list[Cell], original: "_Lazy", cache_dir: Path | None, prov: dict[str, Any],
               store: ResultStore, backend: Backend, computed: list[str]) -> None:
    """One quantization of one model (or its baseline) and all of its pending evaluations; the key of
    each stored cell is appended to ``computed`` as it is stored."""
    head = group[0]
    if head.quant.is_baseline:
        subject, qdetails = original.get(), {}
    else:
        cache_path = None if cache_dir is None else Path(cache_dir) / head.quant_key
        log.info("quantizing %s with %s%s", head.model, head.quant.label,
                 " (cached)" if cache_path is not None and cache_path.exists() else "")
        subject, qdetails = backend.quantize(original.get, head.quant, head.calibration, head.seed, cache_path)
    try:
        for cell in group:
            computed.append(_run_cell(cell, subject, original, qdetails, prov, store, backend))
    finally:
        if not head.quant.is_baseline:
            backend.release(subject)


def _run_cell(cell: Cell, subject: Any, original: "_Lazy", qdetails: dict[str, Any], prov: dict[str, Any],
              store: ResultStore, backend: Backend) -> str:
    ev = cell.evaluation
    wants_reference = isinstance(ev, PerplexityEval) and ev.kl and not cell.quant.is_baseline
    log.info("cell %s: %s", cell.key[:8], cell.label)
    reference = original.get() if wants_reference else None
    started, t0, cpu0 = utc_now(), time.perf_counter(), time.process_time()
    metrics, details = backend.evaluate(subject, ev, reference)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    expected = set(ev.metric_names())
    if not set(metrics) <= expected or (wants_reference and set(metrics) != expected):
        raise RuntimeError(f"cell {cell.label}: evaluation returned metrics {sorted(metrics)}, expected {sorted(expected)}")
    q = cell.quant
    record = CellRecord(
        key=cell.key, quant_key=cell.quant_key, model=cell.model, method=q.method, bits=q.bits,
        group_size=q.group_size, act_bits=q.act_bits, symmetric=q.symmetric, evaluation=ev.name,
        config=cell.canonical(), metrics=metrics,
        details={"evaluation": details, "quantization": qdetails, "model": backend.describe(subject),
                 "cpu_seconds": cpu},
        provenance=prov,
        started_at=started, finished_at=utc_now(), wall_seconds=wall,
    )
    if not store.put(record):
        log.warning("cell %s was stored by another process meanwhile; kept the stored copy", cell.label)
    log.info("cell %s done in %.1f s: %s", cell.key[:8], wall, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return cell.key


def _check_unique_keys(cells: list[Cell]) -> None:
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.key in seen:
            raise ValueError(f"the grid holds the same cell twice: {c.label} (and {seen[c.key].label})")
        seen[c.key] = c


class _Lazy:
    """A value computed on first use (the original model: not loaded if every cell needing it is done)."""

    def __init__(self, make):
        self._make, self._value, self.loaded = make, None, False

    def get(self):
        if not self.loaded:
            self._value, self.loaded = self._make(), True
        return self._value

