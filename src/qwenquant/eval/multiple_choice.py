"""Zero-shot multiple choice by log-likelihood, as lm-evaluation-harness scores it.

Each item is a list of (context, continuation) requests, one per choice, and a gold index. The
model's score for a choice is the summed log-probability of the continuation's tokens given the
context:

    ll_i = sum_t log P(cont_i[t] | context_i, cont_i[:t])
    acc       : argmax_i ll_i == gold
    acc_norm  : argmax_i ll_i / len(choice_i)          (characters of the choice text — lm-eval's
                                                        acc_norm; equal to its bytes for ASCII)
    acc_bytes : argmax_i ll_i / len(choice_i as UTF-8)  (lm-eval's acc_bytes)

Tokenization follows lm-eval's ``_encode_pair``: trailing spaces of the context move to the
continuation, ``context + continuation`` is encoded once, and the continuation's tokens are the
ids after the context's own encoding — so a word boundary tokenizes as it would in running text.
Requests are scored in batches sorted longest-first (little padding; right padding is harmless
for a causal model, since no real position attends to a later pad), inputs longer than
``max_length`` are cut from the left. Alternatively (``shared_prefix=True``) each distinct context
runs once and its continuations reuse its KV cache — the same numbers for less compute, the
better choice on a CPU.

Prompt formats are lm-eval's (v0.4 task YAMLs):

- ARC-Easy / ARC-Challenge / PIQA: ``"Question: {q}\\nAnswer:"`` + ``" {choice}"``
- OpenBookQA: ``"{question_stem}"`` + ``" {choice}"`` (lm-eval uses the bare stem)
- HellaSwag: ``preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}")`` + ``" {ending}"``
- WinoGrande ("partial" scoring): context = sentence up to the blank with the option filled in,
  continuation = ``" " + sentence after the blank``; the same continuation scored under each context
- BoolQ: ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + ``" no"`` / ``" yes"``

Data: for each task a local file under the data root is used when present (``mmlu/auxiliary_train/
arc_easy.csv`` and ``mmlu/auxiliary_train/obqa.csv`` — MMLU's 4-choice CSV rows ``question,A,B,C,D,
answer``, the *train* splits, so not comparable digit-for-digit with published test-set numbers —
or ``<task>.jsonl`` in the Hugging Face schema); otherwise the Hugging Face dataset lm-eval uses
(needs ``datasets`` and the hub). ``source`` forces one or the other.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qwenquant.eval.perplexity import model_device
from qwenquant.eval.sources import data_root

log = logging.getLogger(__name__)

LETTERS = "ABCD"


@dataclass(frozen=True)
class MCItem:
    """One question: per choice a (context, continuation) pair, the choice text used for
    length normalization, and the gold index."""

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class TaskResult:
    task: str
    acc: float
    acc_norm: float
    acc_bytes: float
    acc_stderr: float
    n: int
    source: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------- prompt formats
# Each converts one row of the Hugging Face schema lm-eval uses into an MCItem.

def _choice_item(context: str, choices: Sequence[str], gold: int) -> MCItem:
    return MCItem(tuple((context, " " + c) for c in choices), tuple(choices), gold)


def arc_item(doc: dict) -> MCItem:
    return _choice_item(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                        doc["choices"]["label"].index(doc["answerKey"]))


def obqa_item(doc: dict) -> MCItem:
    return _choice_item(doc["question_stem"], doc["choices"]["text"],
                        doc["choices"]["label"].index(doc["answerKey"].lstrip()))


def piqa_item(doc: dict) -> MCItem:
    return _choice_item(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict) -> MCItem:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return _choice_item(_hellaswag_clean(doc["activity_label"] + ": " + ctx),
                        [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def winogrande_item(doc: dict) -> MCItem:
    blank = doc["sentence"].index("_")
    target = doc["sentence"][blank + 1 :].strip()
    contexts = [doc["sentence"][:blank] + opt for opt in (doc["option1"], doc["option2"])]
    # lm-eval's doc_to_choice is the filled contexts: acc_norm divides by their lengths
    return MCItem(tuple((c, " " + target) for c in contexts), tuple(contexts), {"1": 0, "2": 1}[doc["answer"]])


def boolq_item(doc: dict) -> MCItem:
    return _choice_item(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["label"]))


def csv_row_to_doc(row: list[str], question_field: str) -> dict:
    """MMLU-style CSV row ``question,A,B,C,D,answer`` -> the ARC/OBQA Hugging Face schema."""
    return {question_field: row[0], "choices": {"text": row[1:5], "label": list(LETTERS)}, "answerKey": row[5]}


@dataclass(frozen=True)
class TaskSpec:
    to_item: Callable[[dict], MCItem]
    hf: tuple[str, str | None, str]        # (dataset path, config name, split) as lm-eval uses
    local_csv: str | None = None           # 4-choice CSV under the data root
    csv_question_field: str = "question"


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec(arc_item, ("allenai/ai2_arc", "ARC-Easy", "test"), "mmlu/auxiliary_train/arc_easy.csv"),
    "arc_challenge": TaskSpec(arc_item, ("allenai/ai2_arc", "ARC-Challenge", "test")),
    "openbookqa": TaskSpec(obqa_item, ("allenai/openbookqa", "main", "test"), "mmlu/auxiliary_train/obqa.csv", "question_stem"),
    "piqa": TaskSpec(piqa_item, ("baber/piqa", None, "validation")),
    "hellaswag": TaskSpec(hellaswag_item, ("Rowan/hellaswag", None, "validation")),
    "winogrande": TaskSpec(winogrande_item, ("allenai/winogrande", "winogrande_xl", "validation")),
    "boolq": TaskSpec(boolq_item, ("aps/super_glue", "boolq", "validation")),
}


# ------------------------------------------------------------------------------------- loading

def read_choice_csv(path: Path, question_field: str = "question") -> list[dict]:
    """Rows ``question,A,B,C,D,answer`` (answer a letter A-D) as Hugging Face-schema docs."""
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice file {str(path)!r} does not exist")
    docs = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            line = reader.line_num
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise ValueError(
                    f"{path}:{line}: malformed row (expected 6 fields question,A,B,C,D,answer with answer "
                    f"in A-D; got {len(row)} fields{', answer ' + repr(row[5]) if len(row) == 6 else ''})"
                )
            row[5] = row[5].strip()
            docs.append(csv_row_to_doc(row, question_field))
    return docs


def load_task_items(task: str, data_dir: str | Path | None = None, source: str = "auto") -> tuple[list[MCItem], str]:
    """The task's items and a description of where they came from.

    ``source``: ``"local"`` (files under the data root), ``"hf"`` (Hugging Face datasets), or
    ``"auto"`` (local when the file exists, else hf).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    if source not in ("auto", "local", "hf"):
        raise ValueError(f"task source must be 'auto', 'local' or 'hf', got {source!r}")
    spec, root = TASKS[task], data_root(data_dir)
    local = [p for p in ([root / spec.local_csv] if spec.local_csv else []) + [root / f"{task}.jsonl"] if p.is_file()]
    if source == "local" or (source == "auto" and local):
        if not local:
            wanted = [str(root / spec.local_csv)] if spec.local_csv else []
            raise FileNotFoundError(
                f"no local data for task {task!r}: looked for {', '.join(wanted + [str(root / f'{task}.jsonl')])}; "
                f"set --data-dir / QWENQUANT_DATA or use the Hugging Face source"
            )
        path = local[0]
        if path.suffix == ".csv":
            docs = read_choice_csv(path, spec.csv_question_field)
        else:
            docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [spec.to_item(d) for d in docs], str(path)
    return [spec.to_item(d) for d in _load_hf(task, spec)], "hf:" + "/".join(x for x in spec.hf if x)


def _load_hf(task: str, spec: TaskSpec) -> list[dict]:
    try:
        import datasets
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"task {task!r} has no local file and loading {spec.hf[0]} needs `datasets` (pip install datasets)"
        ) from e
    path, name, split = spec.hf
    try:
        return list(datasets.load_dataset(path, name, split=split))
    except (OSError, ConnectionError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load {path} ({split}) for task {task!r} ({type(e).__name__}: {e}); offline, put "
            f"{task}.jsonl (Hugging Face schema) under the data root or pass --data-dir"
        ) from e


def select(items: list, limit: int | None, seed: int | None = None) -> list:
    """The first ``limit`` items, or with ``seed`` a seeded random sample of ``limit`` (order kept)."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if seed is None:
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


# ------------------------------------------------------------------------------------- scoring

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split the lm-eval way (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return whole[: len(ctx)], whole[len(ctx) :]


def context_limit(model: torch.nn.Module, default: int = 2048) -> int:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None) or default


@torch.no_grad()
def score_token_pairs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
    pad_id: int = 0,
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum log P(continuation), continuation is greedy)."""
    max_length = max_length or context_limit(model)
    device = model_device(model)
    # the model sees (ctx + cont)[:-1], left-cut to max_length; it predicts the last len(cont) tokens
    inputs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("empty continuation: nothing to score")
        if not ctx:
            raise ValueError("empty context: give at least one token of context (e.g. the EOS token)")
        inputs.append((ctx + cont)[-(max_length + 1) :][:-1])
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="loglikelihood", disable=not progress, unit="batch"):
        width = len(inputs[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [b, W] right-padded
        for row, i in enumerate(batch):
            ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
        logits = model(ids.to(device)).logits                                  # [b, W, V]
        for row, i in enumerate(batch):
            cont = pairs[i][1]
            end = len(inputs[i])
            logp = F.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)  # [n_cont, V]
            target = torch.tensor(cont, device=logp.device)
            ll = logp.gather(-1, target[:, None]).sum().item()
            greedy = bool((logp.argmax(-1) == target).all())
            out[i] = (ll, greedy)
    return out


@torch.no_grad()
def score_shared_prefix(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    max_length: int | None = None,
    progress: bool = False,
    pad_id: int = 0,
) -> list[tuple[float, bool]]:
    """Same numbers as :func:`score_token_pairs`, computing each distinct context once.

    Requests are grouped by identical context ids; per group the context runs once (KV cache kept),
    then all its continuations run as one right-padded batch on a copy of that cache. For
    multiple choice this processes ctx + n*cont tokens per item instead of n*(ctx + cont): about
    2-3x less work for ARC/HellaSwag on a compute-bound CPU. Groups whose request would exceed
    ``max_length`` fall back to :func:`score_token_pairs` (left-cut inputs).
    """
    max_length = max_length or context_limit(model)
    device = model_device(model)
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    groups: dict[tuple[int, ...], list[int]] = {}
    too_long = []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError("empty context or continuation (give at least one token of each)")
        if len(ctx) + len(cont) - 1 > max_length:
            too_long.append(i)
        else:
            groups.setdefault(tuple(ctx), []).append(i)
    for ctx, members in tqdm(groups.items(), desc="loglikelihood", disable=not progress, unit="context"):
        first = model(torch.tensor([ctx], device=device), use_cache=True)
        last = F.log_softmax(first.logits[0, -1].float(), dim=-1)              # [V]: predicts cont[0]
        conts = [pairs[i][1] for i in members]
        width = max(len(c) for c in conts) - 1                                 # tokens fed after the context
        rest = None
        if width > 0:
            cache = first.past_key_values
            cache.batch_repeat_interleave(len(members))
            ids = torch.full((len(members), width), pad_id, dtype=torch.long)  # [n, width] right-padded
            for row, c in enumerate(conts):
                ids[row, : len(c) - 1] = torch.tensor(c[:-1])
            rest = model(ids.to(device), past_key_values=cache, use_cache=True).logits  # [n, width, V]
        for row, (i, c) in enumerate(zip(members, conts)):
            target = torch.tensor(c, device=device)
            if len(c) > 1:
                logp = torch.cat([last[None], F.log_softmax(rest[row, : len(c) - 1].float(), dim=-1)])  # [len(c), V]
            else:
                logp = last[None]
            out[i] = (logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
    if too_long:
        for i, r in zip(too_long, score_token_pairs(model, [pairs[i] for i in too_long], batch_size=1,
                                                    max_length=max_length, pad_id=pad_id)):
            out[i] = r
    return out


def score_requests(model, tokenizer, requests: Sequence[tuple[str, str]], shared_prefix: bool = False,
                   batch_size: int = 16, progress: bool = False) -> list[tuple[float, bool]]:
    """lm-eval ``loglikelihood`` on strings: (sum log P(continuation | context), is_greedy).

    ``shared_prefix``: score per distinct context with a KV cache (:func:`score_shared_prefix`,
    best on CPU) instead of batches of whole sequences sorted by length (best on a GPU).
    """
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    pad_id = tokenizer.pad_token_id or 0
    if shared_prefix:
        return score_shared_prefix(model, pairs, progress=progress, pad_id=pad_id)
    return score_token_pairs(model, pairs, batch_size=batch_size, progress=progress, pad_id=pad_id)


def score_items(model, tokenizer, items: Sequence[MCItem], batch_size: int = 16, shared_prefix: bool = False,
                progress: bool = True) -> dict[str, float]:
    """acc / acc_norm / acc_bytes over ``items`` (all their requests scored together)."""
    # identical (context, continuation) pairs across items are scored once
    unique = list(dict.fromkeys(req for item in items for req in item.requests))
    scores = score_requests(model, tokenizer, unique, shared_prefix=shared_prefix, batch_size=batch_size,
                            progress=progress)
    lls = dict(zip(unique, (ll for ll, _ in scores)))
    correct = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for item in items:
        scores = [lls[req] for req in item.requests]
        norms = {
            "acc": [1.0] * len(scores),
            "acc_norm": [float(len(c)) for c in item.choices],
            "acc_bytes": [float(len(c.encode("utf-8"))) for c in item.choices],
        }
        for metric, denom in norms.items():
            normed = [s / d for s, d in zip(scores, denom)]
            correct[metric] += int(max(range(len(normed)), key=normed.__getitem__) == item.gold)
    return {k: v / len(items) for k, v in correct.items()}


def evaluate_task(
    model: torch.nn.Module,
    tokenizer,
    task: str,
    limit: int | None = None,
    seed: int | None = None,
    data_dir: str | Path | None = None,
    source: str = "auto",
    batch_size: int = 16,
    shared_prefix: bool = False,
    progress: bool = True,
) -> TaskResult:
    """Zero-shot accuracy of ``model`` on ``task`` (first ``limit`` items, or a seeded sample)."""
    items, origin = load_task_items(task, data_dir, source)
    items = select(items, limit, seed)
    t0 = time.perf_counter()
    m = score_items(model, tokenizer, items, batch_size=batch_size, shared_prefix=shared_prefix, progress=progress)
    n = len(items)
    stderr = math.sqrt(m["acc"] * (1 - m["acc"]) / (n - 1)) if n > 1 else float("nan")
    res = TaskResult(task, m["acc"], m["acc_norm"], m["acc_bytes"], stderr, n, origin, time.perf_counter() - t0)
    log.info("%s: acc %.4f acc_norm %.4f (n=%d, %.1f s)", task, res.acc, res.acc_norm, n, res.seconds)
    return res
