"""A sweep's grid: a small config file -> typed settings -> an ordered list of cells with stable keys.

A config (TOML, or the same structure in JSON) names models, quantization blocks, calibration and
evaluations; the grid is their product::

    name = "demo"
    models = ["smollm2"]
    seed = 0
    dtype = "float32"                    # the original's float dtype (bfloat16 on a GPU)
    device = "cpu"                       # where quantization and evaluation run (default: cuda if any)
    baseline = true                      # the unquantized original is a row (first)

    [calibration]                        # shared by every method, as in the study
    source = "austen"                    # a named text (api.calibration_ids: austen) or a text file
    n = 32
    seqlen = 512

    [[quantize]]                         # one block = methods × bits × group_sizes × act_bits
    methods = ["rtn", "gptq", "awq"]
    bits = [8, 4, 3]
    group_sizes = [64]                   # an int, or "channel" for one group per output row
    # symmetric = false                  # default false; SmoothQuant is always symmetric (the study's)
    # act_bits = [8]                     # dynamic per-token activation bits (SmoothQuant W·A·)
    # options = { damp = 0.01 }          # extra method settings, passed to api.method_config

    [[perplexity]]                       # one cell per (model, quantization, evaluation)
    source = "austen"                    # austen | wikitext2[=PATH] | c4[=SHARD] | a text file
    seqlen = 512
    max_windows = 8                      # omit for all windows
    kl = true                            # KL and top-1 agreement vs the original model

    [[tasks]]
    name = "arc_easy"
    limit = 50                           # omit for all items

    [mmlu]
    subjects = ["astronomy"]             # omit for all 57
    limit = 10                           # test questions per subject; omit for all
    shots = 5

A **cell** is (model, dtype, quantization, calibration, evaluation, seed). Its ``key`` is the SHA-256 of its
canonical JSON (sorted keys, no whitespace): the same cell asked for by any sweep is the same row of
the results store. ``quant_key`` hashes only the part that decides the quantized weights (model,
dtype, quantization, calibration, seed): it names the cached checkpoint that every evaluation of that
quantization reuses. Neither key includes versions, hardware or the device: those are recorded
with each cell, not part of its identity (so a rerun on other hardware skips what is stored; use a
new store to re-measure).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

GRID_SCHEMA = 1            # bump when the meaning of a canonical cell changes (invalidates keys)
BASELINE = "baseline"      # the method name of the unquantized original's row
PER_CHANNEL = "channel"    # group_sizes entry meaning one group per output row (stored as None)


# ------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class QuantSetting:
    """One quantization of the grid, or the baseline (method ``"baseline"``, every other field None)."""

    method: str
    bits: int | None = None
    group_size: int | None = None                 # None: per-channel
    symmetric: bool | None = None                 # None (with group None): the method has no integer grid
    act_bits: int | None = None                   # None: activations stay in float
    options: tuple[tuple[str, Any], ...] = ()     # extra method settings, sorted by name

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    def canonical(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "act_bits": self.act_bits, "options": dict(self.options)}

    @property
    def label(self) -> str:
        """``gptq w4 g64``, ``rtn w4 per-channel``, ``smoothquant w8a8``, ``baseline``; ``+head`` when the setting
        quantizes lm_head too (``options = {lm_head = true}``), so tables keep both rows apart."""
        if self.is_baseline:
            return BASELINE
        head = " +head" if dict(self.options).get("lm_head") else ""
        w = f"w{self.bits}" + (f"a{self.act_bits}" if self.act_bits is not None else "")
        if self.group_size is None and self.symmetric is None:  # no integer grid (BiLLM, after validate)
            return f"{self.method} {w}{head}"
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"{self.method} {w} {g}{head}"


@dataclass(frozen=True)
class CalibrationSetting:
    source: str = "austen"
    n: int = 128
    seqlen: int = 2048

    def canonical(self) -> dict[str, Any]:
        return {"source": self.source, "n": self.n, "seqlen": self.seqlen}


@dataclass(frozen=True)
class PerplexityEval:
    """Perplexity on ``source`` (non-overlapping ``seqlen`` windows), and with ``kl`` the KL divergence
    and top-1 agreement of the next-token distributions against the original model."""

    source: str
    seqlen: int = 2048
    max_windows: int | None = None
    kl: bool = True
    kind: str = field(default="perplexity", init=False)

    @property
    def label(self) -> str:
        """``wikitext2=/data/wiki.test.raw`` -> ``wikitext2``; a bare file path -> its file name."""
        name, sep, _ = self.source.partition("=")
        return name if sep else Path(self.source).name

    @property
    def name(self) -> str:
        return f"perplexity:{self.label}"

    def metric_names(self) -> tuple[str, ...]:
        s = self.label
        return (f"ppl:{s}", f"kl:{s}", f"top1:{s}") if self.kl else (f"ppl:{s}",)

    def canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "seqlen": self.seqlen,
                "max_windows": self.max_windows, "kl": self.kl}


@dataclass(frozen=True)
class TaskEval:
    """Zero-shot log-likelihood multiple choice (``eval/multiple_choice.py``): acc and acc_norm."""

    task: str
    limit: int | None = None
    kind: str = field(default="task", init=False)

    @property
    def name(self) -> str:
        return f"task:{self.task}"

    def metric_names(self) -> tuple[str, ...]:
        return (f"acc:{self.task}", f"acc_norm:{self.task}")

    def canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "task": self.task, "limit": self.limit}


@dataclass(frozen=True)
class MMLUEval:
    """MMLU k-shot (``eval/mmlu.py``): the micro average over the questions asked."""

    subjects: tuple[str, ...] | None = None       # None: all subjects
    limit: int | None = None                      # test questions per subject
    shots: int = 5
    kind: str = field(default="mmlu", init=False)

    @property
    def name(self) -> str:
        return "mmlu"

    def metric_names(self) -> tuple[str, ...]:
        return ("mmlu",)

    def canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "subjects": None if self.subjects is None else list(self.subjects),
                "limit": self.limit, "shots": self.shots}


EvalSetting = PerplexityEval | TaskEval | MMLUEval


@dataclass(frozen=True)
class Cell:
    """One unit of work and of storage: evaluate ``model`` quantized by ``quant`` with ``evaluation``."""

    model: str
    quant: QuantSetting
    calibration: CalibrationSetting | None      # None for the baseline (nothing is calibrated)
    evaluation: EvalSetting
    seed: int = 0
    dtype: str = "float32"                      # the float dtype the original is loaded in

    def quant_canonical(self) -> dict[str, Any]:
        return {"schema": GRID_SCHEMA, "model": self.model, "dtype": self.dtype, "quant": self.quant.canonical(),
                "calibration": None if self.calibration is None else self.calibration.canonical(),
                "seed": self.seed}

    def canonical(self) -> dict[str, Any]:
        return {**self.quant_canonical(), "evaluation": self.evaluation.canonical()}

    @property
    def key(self) -> str:
        return config_hash(self.canonical())

    @property
    def quant_key(self) -> str:
        return config_hash(self.quant_canonical())

    @property
    def label(self) -> str:
        return f"{self.model} · {self.quant.label} · {self.evaluation.name}"


def config_hash(canonical: dict[str, Any]) -> str:
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class SweepConfig:
    name: str
    models: tuple[str, ...]
    quant: tuple[QuantSetting, ...]               # baseline first when asked for
    calibration: CalibrationSetting
    evaluations: tuple[EvalSetting, ...]
    seed: int = 0
    dtype: str = "float32"                        # float dtype of the original model (float32 | bfloat16 | float16)
    store: str | None = None                      # results store path (CLI may override)
    cache_dir: str | None = None                  # quantized checkpoints; None: no cache
    device: str | None = None                     # where quantization and evaluation run; None: cuda if available
    source: str = ""                              # the file this came from, for messages

    def cells(self) -> list[Cell]:
        """Every cell, in run order: per model, the baseline first, then each quantization with all
        its evaluations together (so one quantized model serves them all)."""
        return [
            Cell(model, q, None if q.is_baseline else self.calibration, ev, self.seed, self.dtype)
            for model in self.models
            for q in self.quant
            for ev in self.evaluations
        ]


# -------------------------------------------------------------------------------------- parsing

DTYPES = ("float32", "bfloat16", "float16")
_TOP_KEYS = {"name", "models", "seed", "dtype", "baseline", "store", "cache_dir", "device", "calibration",
             "quantize", "perplexity", "tasks", "mmlu"}
_BLOCK_KEYS = {"methods", "bits", "group_sizes", "symmetric", "act_bits", "options"}


def load_config(path: str | Path) -> SweepConfig:
    """Read a ``.toml`` or ``.json`` sweep config and check its structure (names are checked against
    the registries by :func:`qwenquant.sweep.validate.validate`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {str(path)!r} does not exist")
    if path.suffix == ".toml":
        with path.open("rb") as f:
            raw = tomllib.load(f)
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        raise ValueError(f"sweep config {str(path)!r}: expected a .toml or .json file")
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> SweepConfig:
    where = f"sweep config {source}"
    _no_unknown(raw, _TOP_KEYS, where)
    models = _str_list(raw.get("models"), f"{where}: models")
    if not models:
        raise ValueError(f"{where}: 'models' must name at least one model")
    quant: list[QuantSetting] = [QuantSetting(BASELINE)] if raw.get("baseline", True) else []
    for i, block in enumerate(raw.get("quantize", [])):
        quant.extend(_parse_block(block, f"{where}: quantize[{i}]"))
    if not quant:
        raise ValueError(f"{where}: nothing to run: no [[quantize]] block and baseline = false")
    _no_duplicates([q.label + repr(q.options) for q in quant], f"{where}: quantization settings")

    cal = raw.get("calibration", {})
    _no_unknown(cal, {"source", "n", "seqlen"}, f"{where}: calibration")
    calibration = CalibrationSetting(
        source=_str(cal.get("source", "austen"), f"{where}: calibration.source"),
        n=_pos_int(cal.get("n", 128), f"{where}: calibration.n"),
        seqlen=_pos_int(cal.get("seqlen", 2048), f"{where}: calibration.seqlen"),
    )

    evals: list[EvalSetting] = []
    for i, p in enumerate(raw.get("perplexity", [])):
        w = f"{where}: perplexity[{i}]"
        _no_unknown(p, {"source", "seqlen", "max_windows", "kl"}, w)
        evals.append(PerplexityEval(
            source=_str(p.get("source"), f"{w}.source"),
            seqlen=_pos_int(p.get("seqlen", 2048), f"{w}.seqlen"),
            max_windows=_opt_pos_int(p.get("max_windows"), f"{w}.max_windows"),
            kl=_bool(p.get("kl", True), f"{w}.kl"),
        ))
    for i, t in enumerate(raw.get("tasks", [])):
        w = f"{where}: tasks[{i}]"
        _no_unknown(t, {"name", "limit"}, w)
        evals.append(TaskEval(_str(t.get("name"), f"{w}.name"), _opt_pos_int(t.get("limit"), f"{w}.limit")))
    if "mmlu" in raw:
        m = raw["mmlu"]
        w = f"{where}: mmlu"
        _no_unknown(m, {"subjects", "limit", "shots"}, w)
        subjects = m.get("subjects")
        evals.append(MMLUEval(
            subjects=None if subjects is None else tuple(_str_list(subjects, f"{w}.subjects")),
            limit=_opt_pos_int(m.get("limit"), f"{w}.limit"),
            shots=_nonneg_int(m.get("shots", 5), f"{w}.shots"),
        ))
    if not evals:
        raise ValueError(f"{where}: no evaluations: add [[perplexity]], [[tasks]] or [mmlu]")
    _no_duplicates([m for e in evals for m in e.metric_names()], f"{where}: evaluation metrics")

    return SweepConfig(
        name=_str(raw.get("name", Path(source).stem), f"{where}: name"),
        models=tuple(models),
        quant=tuple(quant),
        calibration=calibration,
        evaluations=tuple(evals),
        seed=_nonneg_int(raw.get("seed", 0), f"{where}: seed"),
        dtype=_choice(raw.get("dtype", "float32"), DTYPES, f"{where}: dtype"),
        store=None if raw.get("store") is None else _str(raw["store"], f"{where}: store"),
        cache_dir=None if raw.get("cache_dir") is None else _str(raw["cache_dir"], f"{where}: cache_dir"),
        device=None if raw.get("device") is None else _str(raw["device"], f"{where}: device"),
        source=source,
    )


def _parse_block(block: dict[str, Any], where: str) -> list[QuantSetting]:
    _no_unknown(block, _BLOCK_KEYS, where)
    methods = _str_list(block.get("methods"), f"{where}.methods")
    bits = [_pos_int(b, f"{where}.bits") for b in _list(block.get("bits"), f"{where}.bits")]
    groups = [_group(g, f"{where}.group_sizes") for g in _list(block.get("group_sizes", [PER_CHANNEL]), f"{where}.group_sizes")]
    acts = [_pos_int(a, f"{where}.act_bits") for a in _list(block.get("act_bits", []), f"{where}.act_bits")] or [None]
    options = block.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"{where}.options must be a table of method settings, got {options!r}")
    if not methods or not bits:
        raise ValueError(f"{where}: 'methods' and 'bits' must each list at least one value")
    out = []
    for method, b, g, a in product(methods, bits, groups, acts):
        if method == BASELINE:
            raise ValueError(f"{where}: {BASELINE!r} is not a quantization method; use `baseline = true` at the top")
        sym = _bool(block.get("symmetric", False), f"{where}.symmetric")
        out.append(QuantSetting(method, b, g, sym, a, tuple(sorted(options.items()))))
    return out


def _no_unknown(d: Any, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table, got {d!r}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _no_duplicates(items: list[str], where: str) -> None:
    seen: set[str] = set()
    dup: set[str] = set()
    for x in items:
        if x in seen:
            dup.add(x)
        seen.add(x)
    if dup:
        raise ValueError(f"{where}: listed more than once: {sorted(set(dup))}")


def _list(v: Any, where: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError(f"{where}: expected a list, got {v!r}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{where}: expected a non-empty string, got {v!r}")
    return v


def _str_list(v: Any, where: str) -> list[str]:
    return [_str(x, where) for x in _list(v, where)]


def _choice(v: Any, choices: tuple[str, ...], where: str) -> str:
    if v not in choices:
        raise ValueError(f"{where}: expected one of {', '.join(choices)}, got {v!r}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{where}: expected true or false, got {v!r}")
    return v


def _pos_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{where}: expected a positive integer, got {v!r}")
    return v


def _nonneg_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{where}: expected an integer >= 0, got {v!r}")
    return v


def _opt_pos_int(v: Any, where: str) -> int | None:
    return None if v is None else _pos_int(v, where)


def _group(v: Any, where: str) -> int | None:
    if v == PER_CHANNEL:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{where}: expected a positive group size or {PER_CHANNEL!r}, got {v!r}")
    return v
