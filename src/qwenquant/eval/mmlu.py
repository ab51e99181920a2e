"""MMLU, 5-shot, the Hendrycks prompt, prediction by next-token logits — the study's protocol.

Prompt for a test question of subject ``s`` (``s`` with "_" -> " "):

    The following are multiple choice questions (with answers) about {s}.\\n\\n
    {dev question 1}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n      (k dev shots, k = 5)
    ...
    {test question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

If the prompt has more than ``max_length`` (2048) tokens, shots are dropped from the end (k = 4,
3, ...) until it fits, as Hendrycks' ``evaluate.py`` does. The prediction is the argmax, over the
four answer tokens only, of the logits at the last prompt position. The answer tokens are what the
tokenizer makes of ``"Answer:" + " A"`` after ``"Answer:"`` — one token each (" A" for the Qwen and
GPT-2 style tokenizers); a tokenizer that splits them is refused rather than scored wrongly.

All questions of a subject share the header and the k shots, so by default (``shared_prefix``)
the longest common token prefix of a subject's prompts runs once and is kept as a KV cache; each
question then feeds only its own tokens (≈100 of ≈600 for 5 shots): the same logits, ~4× less
compute. The prefix is found on the token ids, not the text, so a BPE merge across the boundary
cannot change what the model sees.

Accuracy is reported per subject and as the micro average over all scored questions (the study's
number), with the macro average (mean of subjects) beside it.

Data: ``<data root>/mmlu/{dev,test}/{subject}_{dev,test}.csv``, rows ``question,A,B,C,D,answer``.
"""

from __future__ import annotations

import copy
import csv
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qwenquant.eval.perplexity import model_device
from qwenquant.eval.sources import data_root

log = logging.getLogger(__name__)

LETTERS = "ABCD"


@dataclass(frozen=True)
class MMLUConfig:
    shots: int = 5
    max_length: int = 2048          # prompt tokens; shots are dropped until it fits
    subjects: tuple[str, ...] | None = None  # None: all subjects found
    limit: int | None = None        # first N test questions per subject
    batch_size: int = 8
    shared_prefix: bool = True      # run each subject's common prompt prefix once (KV cache)


@dataclass(frozen=True)
class MMLUResult:
    accuracy: float                 # micro average over questions (the study's number)
    macro_accuracy: float           # mean of per-subject accuracies
    n: int
    subjects: dict[str, dict] = field(default_factory=dict)  # subject -> {"acc", "n"}
    shots: int = 5
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def mmlu_dir(data_dir: str | Path | None = None) -> Path:
    return data_root(data_dir) / "mmlu"


def list_subjects(data_dir: str | Path | None = None) -> list[str]:
    test = mmlu_dir(data_dir) / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"MMLU test directory {str(test)!r} not found; set --data-dir or QWENQUANT_DATA")
    return sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))


def read_mmlu_csv(path: Path) -> list[tuple[str, str, str, str, str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"MMLU file {str(path)!r} does not exist")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise ValueError(f"{path}:{reader.line_num}: malformed row (expected question,A,B,C,D,answer in A-D)")
            rows.append(tuple(row[:5]) + (row[5].strip(),))
    return rows


def format_example(row, include_answer: bool) -> str:
    text = row[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row[1:5])) + "\nAnswer:"
    return text + (f" {row[5]}\n\n" if include_answer else "")


def build_prompt(subject: str, shots: list, question, k: int) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_example(s, True) for s in shots[:k]) + format_example(question, False)


def fit_prompt(tokenizer, subject: str, shots: list, question, k: int, max_length: int) -> tuple[list[int], int]:
    """(prompt ids, shots used): the first k shots, dropping from the end until <= max_length tokens."""
    while True:
        ids = tokenizer.encode(build_prompt(subject, shots, question, k), add_special_tokens=False)
        if len(ids) <= max_length:
            return ids, k
        if k == 0:
            raise ValueError(f"MMLU {subject}: the question alone has {len(ids)} tokens > max_length {max_length}")
        k -= 1


def answer_token_ids(tokenizer) -> list[int]:
    """The id of " A", " B", " C", " D" as they follow "Answer:" in running text."""
    prefix = tokenizer.encode("Answer:", add_special_tokens=False)
    ids = []
    for letter in LETTERS:
        whole = tokenizer.encode(f"Answer: {letter}", add_special_tokens=False)
        if whole[: len(prefix)] != prefix or len(whole) != len(prefix) + 1:
            raise ValueError(
                f"tokenizer splits ' {letter}' after 'Answer:' into {whole[len(prefix):]} (not one token); "
                "next-token MMLU scoring needs single-token answers"
            )
        ids.append(whole[-1])
    if len(set(ids)) != 4:
        raise ValueError(f"answer tokens are not distinct: {ids}")
    return ids


@torch.no_grad()
def predict(model, prompts: list[list[int]], answer_ids: list[int], batch_size: int, pad_id: int = 0,
            progress: bool = False) -> list[int]:
    """Index (0-3) of the answer token with the highest next-token logit after each prompt."""
    device = model_device(model)
    answer = torch.tensor(answer_ids, device=device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    preds = [0] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="mmlu", disable=not progress, unit="batch"):
        width = len(prompts[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [b, W] right-padded
        for row, i in enumerate(batch):
            ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
        logits = model(ids.to(device)).logits                            # [b, W, V]
        last = torch.tensor([len(prompts[i]) - 1 for i in batch], device=device)
        scores = logits[torch.arange(len(batch), device=device), last][:, answer]  # [b, 4]
        for row, i in enumerate(batch):
            preds[i] = int(scores[row].argmax())
    return preds


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of ``seqs``, leaving at least one token of each."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


@torch.no_grad()
def predict_shared_prefix(model, prompts: list[list[int]], answer_ids: list[int], batch_size: int,
                          pad_id: int = 0) -> list[int]:
    """Same predictions as :func:`predict`; the prompts' common prefix runs once (KV cache) and
    each batch of right-padded suffixes runs on a copy of that cache."""
    n_prefix = common_prefix_length(prompts)
    if n_prefix == 0:
        return predict(model, prompts, answer_ids, batch_size, pad_id)
    device = model_device(model)
    answer = torch.tensor(answer_ids, device=device)
    prefix_cache = model(torch.tensor([prompts[0][:n_prefix]], device=device), use_cache=True).past_key_values
    suffixes = [p[n_prefix:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(suffixes[i]))
    preds = [0] * len(prompts)
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        width = len(suffixes[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [b, W] right-padded suffixes
        for row, i in enumerate(batch):
            ids[row, : len(suffixes[i])] = torch.tensor(suffixes[i])
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(batch))
        logits = model(ids.to(device), past_key_values=cache, use_cache=True).logits  # [b, W, V]
        last = torch.tensor([len(suffixes[i]) - 1 for i in batch], device=device)
        scores = logits[torch.arange(len(batch), device=device), last][:, answer]  # [b, 4]
        for row, i in enumerate(batch):
            preds[i] = int(scores[row].argmax())
    return preds


def evaluate_mmlu(model, tokenizer, cfg: MMLUConfig = MMLUConfig(), data_dir: str | Path | None = None,
                  progress: bool = True) -> MMLUResult:
    root = mmlu_dir(data_dir)
    available = list_subjects(data_dir)
    subjects = list(cfg.subjects) if cfg.subjects else available
    unknown = [s for s in subjects if s not in available]
    if unknown:
        raise ValueError(f"unknown MMLU subject(s) {unknown}; available: {', '.join(available)}")
    answer_ids = answer_token_ids(tokenizer)
    prompts, golds, owner = [], [], []
    for subject in subjects:
        shots = read_mmlu_csv(root / "dev" / f"{subject}_dev.csv")
        test = read_mmlu_csv(root / "test" / f"{subject}_test.csv")
        for row in test[: cfg.limit] if cfg.limit else test:
            ids, _ = fit_prompt(tokenizer, subject, shots, row, cfg.shots, cfg.max_length)
            prompts.append(ids)
            golds.append(LETTERS.index(row[5]))
            owner.append(subject)
    t0 = time.perf_counter()
    pad_id = tokenizer.pad_token_id or 0
    if cfg.shared_prefix:
        preds = [0] * len(prompts)
        for subject in tqdm(subjects, desc="mmlu", disable=not progress, unit="subject"):
            idx = [i for i, s in enumerate(owner) if s == subject]
            if idx:
                for i, p in zip(idx, predict_shared_prefix(model, [prompts[i] for i in idx], answer_ids,
                                                           cfg.batch_size, pad_id)):
                    preds[i] = p
    else:
        preds = predict(model, prompts, answer_ids, cfg.batch_size, pad_id, progress)
    per: dict[str, dict] = {s: {"correct": 0, "n": 0} for s in subjects}
    for p, g, s in zip(preds, golds, owner):
        per[s]["correct"] += int(p == g)
        per[s]["n"] += 1
    subj = {s: {"acc": v["correct"] / v["n"], "n": v["n"]} for s, v in per.items() if v["n"]}
    n = sum(v["n"] for v in subj.values())
    res = MMLUResult(
        accuracy=sum(per[s]["correct"] for s in subj) / n,
        macro_accuracy=sum(v["acc"] for v in subj.values()) / len(subj),
        n=n, subjects=subj, shots=cfg.shots, seconds=time.perf_counter() - t0,
    )
    log.info("MMLU: %.4f micro, %.4f macro over %d questions (%.1f s)", res.accuracy, res.macro_accuracy, n, res.seconds)
    return res
