"""The results store: atomic cells, no duplicates, exact round-trips (NaN and inf included)."""

from __future__ import annotations

import math
import sqlite3

import pytest

from qwenquant.io.store import CellRecord, ResultStore, SCHEMA_VERSION, StoreError


def _cell(key: str, **metrics: float) -> CellRecord:
    return CellRecord(
        key=key, quant_key="q-" + key, model="tiny-qwen3", method="rtn", bits=4, group_size=32, act_bits=None,
        symmetric=False, evaluation="perplexity:austen", config={"model": "tiny-qwen3", "bits": 4},
        metrics=metrics or {"ppl:austen": 12.5}, details={"evaluation": {"windows": 2}},
        provenance={"git_commit": "unknown"}, started_at="2025-01-01T00:00:00+00:00",
        finished_at="2025-01-01T00:00:01+00:00", wall_seconds=1.25,
    )


def test_put_then_read_back_exactly(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        cell = _cell("a", **{"ppl:austen": 12.345678901234567, "kl:austen": 0.0123, "top1:austen": 0.875})
        assert store.put(cell) is True
        assert store.has("a") and not store.has("b") and len(store) == 1
        (back,) = store.cells()
    assert back == cell  # every field, floats bit-exact


def test_second_put_of_same_key_is_refused_and_keeps_the_first(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        assert store.put(_cell("a", **{"ppl:austen": 10.0}))
        assert store.put(_cell("a", **{"ppl:austen": 99.0})) is False
        (only,) = store.cells()
        assert only.metrics == {"ppl:austen": 10.0}
        assert store.integrity_problems() == []
    # the unique constraint is in the schema itself, not only in put()
    conn = sqlite3.connect(tmp_path / "r.sqlite")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO cells SELECT * FROM cells")
    conn.close()


def test_nan_and_inf_round_trip(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put(_cell("a", **{"ppl:austen": math.inf, "kl:austen": math.nan}))
        (back,) = store.cells()
    assert back.metrics["ppl:austen"] == math.inf and math.isnan(back.metrics["kl:austen"])


def test_failed_put_leaves_nothing(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(TypeError, match="must be a number"):
            store.put(_cell("a", **{"ppl:austen": 1.0, "bad": "text"}))  # metrics insert fails after the cell row
        assert len(store) == 0 and store.integrity_problems() == []
        assert store.put(_cell("a"))  # the key is free again


def test_wal_mode_schema_version_and_reopen(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        store.put(_cell("a"))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute("PRAGMA user_version=99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        ResultStore(path)


def test_filter_by_keys(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        for k in "abc":
            store.put(_cell(k))
        assert [c.key for c in store.cells({"a", "c"})] == ["a", "c"]
        assert store.keys() == {"a", "b", "c"}
