"""Where evaluation text comes from, turned into one stream of token ids.

Perplexity is measured on a *token stream*: a 1-D tensor of ids that ``perplexity.py`` cuts into
non-overlapping windows. This module makes that stream from a named source:

``wikitext2``  WikiText-2 raw, test split (``wikitext`` / ``wikitext-2-raw-v1``). With ``datasets``
               installed and the hub reachable it is downloaded; offline, point at a local copy with
               ``wikitext2=PATH`` (a plain-text file such as ``wiki.test.raw``, JSON/JSONL rows with a
               ``"text"`` field, a parquet file, or a directory saved by ``datasets``). Rows are joined
               with ``"\\n\\n"`` as the study does; a plain-text file is used as it is.
``c4``         The study's 256 fixed windows of the C4 ``en`` validation shard
               ``c4-validation.00000-of-00008``: ``data/c4_eval_windows.json`` (shipped in this
               package) lists, per window, a document index (line number in the shard, from 0) and a
               start offset in that document's *Qwen* token ids; window = ids[offset : offset + 2048].
               The 256 windows are concatenated, so with ``seqlen=2048`` each window is scored as
               one sequence. Give the shard as ``c4=PATH`` (``.json`` or ``.json.gz``, one JSON
               object with a ``"text"`` field per line), or let ``huggingface_hub`` fetch it.
               The offsets are meaningful only with the Qwen2/Qwen3 tokenizer; another tokenizer
               that makes a document too short for its window raises an error.
``austen``     Offline English prose: *Pride and Prejudice* and *Sense and Sensibility*, the held-out
               half of ``qwenquant.model.fixtures.resolve_text("austen", "heldout")``.
a path         Any existing ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet`` file or saved dataset dir.

Tokenization never adds special tokens (no BOS): the Qwen tokenizer adds none anyway, so this is
the study's setting, and it keeps streams comparable across tokenizers that would.

Benchmark files (MMLU, the offline ARC-Easy/OpenBookQA CSVs) live under a *data root*:
``QWENQUANT_DATA`` if set, else ``<repo>/../shared/data`` (see :func:`data_root`).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

C4_SHARD = "c4-validation.00000-of-00008.json.gz"
C4_REPO = "allenai/c4"
C4_WINDOW = 2048  # the windows file's window length (tokens)
WIKITEXT_HF = ("wikitext", "wikitext-2-raw-v1", "test")
SOURCE_NAMES = ("wikitext2", "c4", "austen")
TEXT_SUFFIXES = (".txt", ".raw", ".json", ".jsonl", ".gz", ".parquet")


def data_root(override: str | Path | None = None) -> Path:
    """The benchmark data directory: ``override``, else ``$QWENQUANT_DATA``, else ``<repo>/../shared/data``.

    The last default holds for a checkout whose parent also holds ``shared/`` (the build machines and
    CI). Existence is not checked here: the loaders say which file they missed.
    """
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("QWENQUANT_DATA")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]  # src/qwenquant/eval/sources.py -> repo
    return repo.parent / "shared" / "data"


@dataclass(frozen=True)
class TokenStream:
    """A named 1-D stream of token ids and where it came from (recorded with every result)."""

    name: str
    ids: torch.Tensor  # [n_tokens] int64
    origin: str        # file path, hub id or fixture name


def parse_source(spec: str) -> tuple[str, Path | None]:
    """``"c4=/data/shard.json.gz"`` -> ("c4", Path); ``"wikitext2"`` -> ("wikitext2", None);
    an existing file or directory -> ("file", Path). Anything else is refused, naming the choices."""
    name, sep, path = spec.partition("=")
    if sep and name in SOURCE_NAMES:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"perplexity source {name!r}: no such file or directory {str(p)!r}")
        return name, p
    if spec in SOURCE_NAMES:
        return spec, None
    p = Path(spec).expanduser()
    if p.exists():
        return "file", p
    raise ValueError(
        f"unknown perplexity source {spec!r}: expected one of {', '.join(SOURCE_NAMES)}, "
        f"NAME=PATH (e.g. wikitext2=wiki.test.raw, c4={C4_SHARD}), or an existing text file "
        f"({', '.join(TEXT_SUFFIXES)}) — and no file of that name exists"
    )


def load_token_stream(spec: str, tokenizer) -> TokenStream:
    """Resolve ``spec`` (see the module docstring) and tokenize it once."""
    name, path = parse_source(spec)
    if name == "c4":
        shard = path if path is not None else _download_c4_shard()
        return TokenStream("c4", c4_window_ids(shard, tokenizer), str(shard))
    if name == "wikitext2":
        text, origin = (read_text_file(path), str(path)) if path is not None else _wikitext2_from_hub()
    elif name == "austen":
        text, origin = _austen_heldout()
    else:
        text, origin = read_text_file(path), str(path)
        name = path.name
    return TokenStream(name, encode(tokenizer, text), origin)


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens.  # [n] int64"""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------- text files

def read_text_file(path: Path) -> str:
    """Text of a local file or saved dataset; row-shaped formats are joined with ``"\\n\\n"``."""
    path = Path(path)
    if path.is_dir():
        return "\n\n".join(_rows_from_saved_dataset(path))
    if not path.is_file():
        raise FileNotFoundError(f"text source {str(path)!r} does not exist")
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "\n\n".join(_rows_from_json(path))
    if path.suffix.lower() == ".parquet":
        return "\n\n".join(_rows_from_parquet(path))
    return path.read_text(encoding="utf-8")


def read_documents(path: Path) -> list[str]:
    """Documents of a local corpus file: JSON/JSONL(.gz) or parquet rows (``"text"``), a saved
    dataset directory, or a plain text file split on blank lines."""
    path = Path(path)
    if path.is_dir():
        return _rows_from_saved_dataset(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist")
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return _rows_from_json(path)
    if path.suffix.lower() == ".parquet":
        return _rows_from_parquet(path)
    return [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _rows_from_json(path: Path) -> list[str]:
    """JSON lines (one object per line), or one JSON array of objects; each needs a ``"text"`` field."""
    with _open_maybe_gz(path) as f:
        head = f.read(1)
        f.seek(0)
        rows = json.load(f) if head == "[" else [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "text" not in row:
            raise ValueError(f"{path}: row {i} has no 'text' field (expected objects like {{\"text\": ...}})")
    return [row["text"] for row in rows]


def _rows_from_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    table = pq.read_table(path, columns=["text"])
    return table.column("text").to_pylist()


def _rows_from_saved_dataset(path: Path) -> list[str]:
    """A directory written by ``datasets.save_to_disk``; a DatasetDict contributes its ``test`` split."""
    try:
        import datasets
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{path} is a directory: reading a saved dataset needs `datasets`") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "test" not in ds:
            raise ValueError(f"saved dataset {path} has splits {list(ds)}, expected a 'test' split")
        ds = ds["test"]
    return list(ds["text"])


def _wikitext2_from_hub() -> tuple[str, str]:
    try:
        import datasets
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "wikitext2 without a path needs the `datasets` package and the hub; offline, pass "
            "wikitext2=PATH (wiki.test.raw, JSON/JSONL/parquet rows with 'text', or a saved dataset dir)"
        ) from e
    path, name, split = WIKITEXT_HF
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except (OSError, ConnectionError, ValueError) as e:  # offline / hub unreachable / not cached
        raise FileNotFoundError(
            f"could not load {path}/{name} ({split}) from the hub ({type(e).__name__}: {e}); "
            "offline, pass wikitext2=PATH to a local copy"
        ) from e
    return "\n\n".join(ds["text"]), f"hf:{path}/{name}/{split}"


def _austen_heldout() -> tuple[str, str]:
    from qwenquant.model import fixtures

    got = fixtures.resolve_text("austen", "heldout")
    if isinstance(got, Path):
        return got.read_text(encoding="utf-8"), str(got)
    return got, "fixture:austen/heldout"


# ---------------------------------------------------------------------------------------- C4 windows

@dataclass(frozen=True)
class C4Windows:
    doc_indices: tuple[int, ...]    # line numbers in the shard, from 0
    token_offsets: tuple[int, ...]  # start of each window in its document's token ids
    window: int = C4_WINDOW


def c4_windows(path: Path | None = None) -> C4Windows:
    """The study's window list; by default the copy shipped in ``qwenquant/eval/data``."""
    if path is None:
        raw = resources.files("qwenquant.eval").joinpath("data/c4_eval_windows.json").read_text()
    else:
        raw = Path(path).read_text()
    d = json.loads(raw)
    if len(d["doc_indices"]) != len(d["token_offsets"]):
        raise ValueError("c4 windows file: doc_indices and token_offsets differ in length")
    return C4Windows(tuple(d["doc_indices"]), tuple(d["token_offsets"]))


def read_c4_documents(shard: Path, indices: set[int]) -> dict[int, str]:
    """Texts of the documents at the given line numbers of a C4 JSON-lines shard (read up to the last)."""
    wanted, last, docs = set(indices), max(indices), {}
    with _open_maybe_gz(Path(shard)) as f:
        for i, line in enumerate(f):
            if i in wanted:
                docs[i] = json.loads(line)["text"]
            if i >= last:
                break
    missing = wanted - docs.keys()
    if missing:
        raise ValueError(
            f"C4 shard {shard} has fewer documents than the windows need (missing e.g. index {min(missing)}); "
            f"expected the full {C4_SHARD}"
        )
    return docs


def c4_window_ids(shard: Path, tokenizer, windows: C4Windows | None = None) -> torch.Tensor:
    """The concatenated C4 evaluation windows.  # [n_windows * 2048] int64"""
    windows = windows or c4_windows()
    docs = read_c4_documents(shard, set(windows.doc_indices))
    cache: dict[int, torch.Tensor] = {}
    pieces = []
    for doc, off in zip(windows.doc_indices, windows.token_offsets):
        if doc not in cache:
            cache[doc] = encode(tokenizer, docs[doc])
        ids = cache[doc]
        if off + windows.window > len(ids):
            raise ValueError(
                f"C4 document {doc} has {len(ids)} tokens, too few for the window at offset {off} "
                f"(+{windows.window}); the windows are defined in Qwen2/Qwen3 tokens — is this the Qwen tokenizer "
                f"and the shard {C4_SHARD}?"
            )
        pieces.append(ids[off : off + windows.window])
    return torch.cat(pieces)


def _download_c4_shard() -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(C4_REPO, f"en/{C4_SHARD}", repo_type="dataset"))
    except (OSError, ConnectionError, ValueError) as e:
        raise FileNotFoundError(
            f"could not fetch {C4_REPO} en/{C4_SHARD} from the hub ({type(e).__name__}); "
            f"offline, pass c4=PATH to a local copy of the shard"
        ) from e
