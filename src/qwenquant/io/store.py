"""The results store: one SQLite file holding every finished sweep cell, and nothing half-done.

A *cell* is one evaluation of one model under one quantization setting (or of the unquantized
original), e.g. "smollm2 · GPTQ w4 g64 · perplexity on austen". Its identity is ``key``: a hash of
its canonical configuration (``qwenquant.sweep.grid`` makes it), so the same cell asked for twice
— by a rerun, a resumed run, or another sweep that shares it — is computed once.

Crash safety comes from three rules, each enforced here rather than by callers' good manners:

1. A cell's row and its metrics are written in **one transaction**, only once the cell is complete.
   A process killed mid-cell (even ``kill -9``) leaves no trace of that cell; a rerun redoes it.
2. ``key`` is the **primary key** and inserts are ``ON CONFLICT DO NOTHING``: a cell can never be
   stored twice, even by two sweeps racing on the same file.
3. The database runs in **WAL mode** with ``synchronous=FULL``: a committed cell survives a crash
   of the process or the machine, and readers (``qwenquant report`` during a sweep) never block
   the writer.

Tables (schema version in ``PRAGMA user_version``)::

    cells(key PK, quant_key, model, method, bits, group_size, act_bits, symmetric, evaluation,
          config_json, details_json, provenance_json, started_at, finished_at, wall_seconds)
    metrics(cell_key -> cells.key, name, value; PK (cell_key, name))

``metrics`` holds the numbers the report tabulates, one row per named scalar (``ppl:austen``,
``kl:austen``, ``acc:arc_easy``, ``mmlu``, ...); ``details_json`` keeps everything else the
evaluation and quantization returned (per-subject MMLU, the quantization report, item counts).
NaN is stored as SQL NULL and read back as NaN; ±inf round-trips as itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key             TEXT PRIMARY KEY,
    quant_key       TEXT NOT NULL,
    model           TEXT NOT NULL,
    method          TEXT NOT NULL,
    bits            INTEGER,
    group_size      INTEGER,
    act_bits        INTEGER,
    symmetric       INTEGER,
    evaluation      TEXT NOT NULL,
    config_json     TEXT NOT NULL,
    details_json    TEXT NOT NULL,
    provenance_json TEXT NOT NULL,
    started_at      TEXT NOT NULL,
    finished_at     TEXT NOT NULL,
    wall_seconds    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    cell_key TEXT NOT NULL REFERENCES cells(key),
    name     TEXT NOT NULL,
    value    REAL,
    PRIMARY KEY (cell_key, name)
);
CREATE INDEX IF NOT EXISTS cells_by_quant ON cells(quant_key);
"""

_CELL_COLUMNS = (
    "key", "quant_key", "model", "method", "bits", "group_size", "act_bits", "symmetric", "evaluation",
    "config_json", "details_json", "provenance_json", "started_at", "finished_at", "wall_seconds",
)


@dataclass(frozen=True)
class CellRecord:
    """One finished cell, as stored.

    ``method`` is a quantization method name, or ``"baseline"`` for the unquantized original (then
    ``bits``, ``group_size``, ``act_bits`` and ``symmetric`` are None). ``group_size`` None means
    per-channel; ``act_bits`` None means activations are not quantized.
    """

    key: str
    quant_key: str
    model: str
    method: str
    bits: int | None
    group_size: int | None
    act_bits: int | None
    symmetric: bool | None
    evaluation: str                      # e.g. "perplexity:austen", "task:arc_easy", "mmlu"
    config: dict[str, Any]               # the canonical cell config whose hash is ``key``
    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""                 # ISO 8601, UTC
    finished_at: str = ""
    wall_seconds: float = 0.0


class StoreError(RuntimeError):
    """The file is not a results store this version can read."""


class ResultStore:
    """A results store on disk; open with ``ResultStore(path)`` or as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly one cell.
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=60.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            self._conn.close()
            raise StoreError(
                f"{self.path}: results store schema version {version}, this qwenquant reads version "
                f"{SCHEMA_VERSION}; use a new store file"
            )
        if version == 0:
            # executescript commits by itself; every statement is idempotent (IF NOT EXISTS), so two
            # processes creating the same new store at once both end with the same schema.
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so two writers queue instead of deadlocking.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # ---------------------------------------------------------------------------------------- write

    def put(self, cell: CellRecord) -> bool:
        """Store a finished cell and its metrics atomically. False if ``cell.key`` was already stored
        (the stored copy is kept untouched)."""
        row = (
            cell.key, cell.quant_key, cell.model, cell.method, cell.bits, cell.group_size, cell.act_bits,
            None if cell.symmetric is None else int(cell.symmetric), cell.evaluation,
            _dumps(cell.config), _dumps(cell.details), _dumps(cell.provenance),
            cell.started_at, cell.finished_at, float(cell.wall_seconds),
        )
        placeholders = ", ".join("?" * len(_CELL_COLUMNS))
        with self._transaction() as conn:
            cur = conn.execute(
                f"INSERT INTO cells ({', '.join(_CELL_COLUMNS)}) VALUES ({placeholders}) "
                "ON CONFLICT(key) DO NOTHING",
                row,
            )
            if cur.rowcount == 0:
                return False
            conn.executemany(
                "INSERT INTO metrics (cell_key, name, value) VALUES (?, ?, ?)",
                [(cell.key, name, _to_sql_float(name, v)) for name, v in cell.metrics.items()],
            )
        return True

    # ----------------------------------------------------------------------------------------- read

    def has(self, key: str) -> bool:
        return self._conn.execute("SELECT 1 FROM cells WHERE key = ?", (key,)).fetchone() is not None

    def keys(self) -> set[str]:
        return {k for (k,) in self._conn.execute("SELECT key FROM cells")}

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]

    def cells(self, keys: set[str] | None = None) -> list[CellRecord]:
        """All stored cells (or those among ``keys``), oldest first."""
        metrics: dict[str, dict[str, float]] = {}
        for cell_key, name, value in self._conn.execute("SELECT cell_key, name, value FROM metrics ORDER BY rowid"):
            metrics.setdefault(cell_key, {})[name] = math.nan if value is None else float(value)
        out = []
        for r in self._conn.execute(f"SELECT {', '.join(_CELL_COLUMNS)} FROM cells ORDER BY finished_at, rowid"):
            d = dict(zip(_CELL_COLUMNS, r))
            if keys is not None and d["key"] not in keys:
                continue
            out.append(CellRecord(
                key=d["key"], quant_key=d["quant_key"], model=d["model"], method=d["method"],
                bits=d["bits"], group_size=d["group_size"], act_bits=d["act_bits"],
                symmetric=None if d["symmetric"] is None else bool(d["symmetric"]),
                evaluation=d["evaluation"], config=json.loads(d["config_json"]),
                metrics=metrics.get(d["key"], {}), details=json.loads(d["details_json"]),
                provenance=json.loads(d["provenance_json"]), started_at=d["started_at"],
                finished_at=d["finished_at"], wall_seconds=d["wall_seconds"],
            ))
        return out

    def integrity_problems(self) -> list[str]:
        """Empty when the file is consistent: SQLite's own check, and no metric without its cell."""
        problems = [r[0] for r in self._conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
        orphans = self._conn.execute(
            "SELECT COUNT(*) FROM metrics WHERE cell_key NOT IN (SELECT key FROM cells)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} metric rows without a cell")
        return problems


def _to_sql_float(name: str, v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {type(v).__name__} {v!r}")
    return None if math.isnan(v) else float(v)


def _dumps(obj: Mapping[str, Any]) -> str:
    # sort_keys: the stored text of equal configs is equal; allow_nan: a collapsed model's NaN/inf
    # in details is data, and Python's json reads its own NaN/Infinity back.
    return json.dumps(obj, sort_keys=True, allow_nan=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a results store: {obj!r}")
