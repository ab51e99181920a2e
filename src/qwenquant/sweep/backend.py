"""The real backend of a sweep: models through ``qwenquant.api``, evaluations through ``qwenquant.eval``.

The original model is loaded once per model, on the CPU, and never modified: each quantization works
on a deep copy (cheap next to calibration), and the same original is the KL/top-1 reference — moved
to the evaluation device as a copy of its own when that is not the CPU, so the CPU original stays
clean for the next deep copy. Quantization runs layer by layer on ``device`` (``qwenquant.quantize``);
every evaluation runs on ``device`` too. With a cache
directory, a quantized model is saved once (``api.save_quantized``, atomic) under its quantization
key and reloaded (``api.load``) by any later run that needs it — a resumed sweep does not redo GPTQ.

The original's logits on the perplexity windows are the same for every quantization it is compared
with, so the KL reference is wrapped in :class:`MemoizedReference`, which remembers them (up to
``REFERENCE_MEMO_BYTES``; beyond that it just runs the model): each quantized setting then costs
one forward pass per window instead of two.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from qwenquant.sweep.grid import CalibrationSetting, EvalSetting, MMLUEval, PerplexityEval, QuantSetting, TaskEval
from qwenquant.sweep.validate import recipe_for

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    name: str                 # the model as the sweep names it (short name, directory or hub id)
    model: torch.nn.Module
    tokenizer: Any
    info: dict[str, Any]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE_MEMO_BYTES = 2 * 2**30  # logits of the original kept for reuse as the KL reference


class MemoizedReference(torch.nn.Module):
    """The original model as a KL reference: ``forward(ids)`` returns the same output as the model,
    remembered per distinct ``ids`` while the memo holds fewer than ``budget`` bytes of logits."""

    def __init__(self, model: torch.nn.Module, budget: int = REFERENCE_MEMO_BYTES):
        super().__init__()
        self.model = model  # a submodule, so parameters() (and so the device) are the model's
        self.config = model.config
        self.budget = budget
        self._memo: dict[tuple, Any] = {}
        self._bytes = 0

    @torch.no_grad()
    def forward(self, ids: torch.Tensor):
        key = (tuple(ids.shape), ids.cpu().numpy().tobytes())
        if key in self._memo:
            return self._memo[key]
        out = self.model(ids)
        size = out.logits.numel() * out.logits.element_size()
        if self._bytes + size <= self.budget:
            self._memo[key] = SimpleNamespace(logits=out.logits)  # not the KV cache
            self._bytes += size
        return out


class TorchBackend:
    """``device``: where quantization and evaluations run (None: CUDA if available, else CPU);
    ``dtype``: the float dtype originals are loaded in."""

    def __init__(self, device: str | None = None, dtype: str = "float32", progress: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[dtype]
        self.progress = progress
        self._streams: dict[tuple[str, str], Any] = {}          # (model, source) -> TokenStream
        self._on_device: dict[int, Loaded] = {}                 # id(original) -> its copy on self.device
        self._memos: dict[int, Loaded] = {}                     # id(original on device) -> memoized reference

    def load_original(self, model: str) -> Loaded:
        from qwenquant import api

        t0 = time.perf_counter()
        m, tok, info = api.load(model, dtype=self.dtype)
        log.info("loaded %s in %.1f s", model, time.perf_counter() - t0)
        return Loaded(model, m, tok, info)

    def quantize(self, original: Callable[[], Loaded], quant: QuantSetting, calibration: CalibrationSetting,
                 seed: int, cache_path: Path | None) -> tuple[Loaded, dict[str, Any]]:
        from qwenquant import api

        t0 = time.perf_counter()
        if cache_path is not None and cache_path.is_dir():
            m, tok, info = api.load(str(cache_path), device=str(self.device))
            log.info("loaded cached %s from %s in %.1f s", quant.label, cache_path, time.perf_counter() - t0)
            name = info.get("source_model") or str(cache_path)
            details = {"from_cache": True, "load_seconds": time.perf_counter() - t0, "avg_bits": info.get("avg_bits"),
                       "recipe": info.get("recipe"), "report": info.get("report"), "calibration": info.get("calibration")}
            return Loaded(name, m, tok, info), details
        base = original()
        t0, cpu0 = time.perf_counter(), time.process_time()
        recipe = recipe_for(quant)
        model = copy.deepcopy(base.model)
        ids = None  # data-free settings (RTN on a dense model) run no calibration pass at all
        if api.needs_calibration(model, recipe):
            ids = api.calibration_ids(base.tokenizer, calibration.source, n=calibration.n, seqlen=calibration.seqlen,
                                      seed=seed)
        report = api.quantize(model, base.tokenizer, recipe, ids, device=self.device, progress=self.progress)
        calib = {**calibration.canonical(), "seed": seed}
        if cache_path is not None:
            api.save_quantized(model, base.tokenizer, report, cache_path, source=base.name, calib=calib)
        log.info("quantized %s with %s in %.1f s (avg %.3f bits)", base.name, quant.label, report.seconds, report.avg_bits)
        details = {"from_cache": False, "avg_bits": report.avg_bits, "seconds": report.seconds,
                   "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
                   "recipe": report.recipe, "report": report.to_dict(), "calibration": calib}
        return Loaded(base.name, model.to(self.device), base.tokenizer, {"quantized": True}), details

    def _placed(self, handle: Loaded) -> Loaded:
        """``handle`` with its model on the evaluation device (originals: a cached device copy)."""
        if next(handle.model.parameters()).device == self.device:
            return handle
        if id(handle) not in self._on_device:
            self._on_device[id(handle)] = dataclasses.replace(handle, model=copy.deepcopy(handle.model).to(self.device))
        return self._on_device[id(handle)]

    def _reference(self, original: Loaded) -> Loaded:
        if id(original) not in self._memos:
            self._memos[id(original)] = dataclasses.replace(original, model=MemoizedReference(original.model))
        return self._memos[id(original)]

    def evaluate(self, subject: Loaded, evaluation: EvalSetting, reference: Loaded | None):
        subject = self._placed(subject)
        reference = None if reference is None else self._reference(self._placed(reference))
        if isinstance(evaluation, PerplexityEval):
            return self._perplexity(subject, evaluation, reference)
        if isinstance(evaluation, TaskEval):
            from qwenquant.eval.multiple_choice import evaluate_task

            r = evaluate_task(subject.model, subject.tokenizer, evaluation.task, limit=evaluation.limit,
                              progress=self.progress)
            return {f"acc:{evaluation.task}": r.acc, f"acc_norm:{evaluation.task}": r.acc_norm}, dataclasses.asdict(r)
        if isinstance(evaluation, MMLUEval):
            from qwenquant.eval.mmlu import MMLUConfig, evaluate_mmlu

            cfg = MMLUConfig(shots=evaluation.shots, subjects=evaluation.subjects, limit=evaluation.limit)
            r = evaluate_mmlu(subject.model, subject.tokenizer, cfg, progress=self.progress)
            return {"mmlu": r.accuracy}, r.to_dict()
        raise TypeError(f"no evaluation for {type(evaluation).__name__}")

    def _perplexity(self, subject: Loaded, ev: PerplexityEval, reference: Loaded | None):
        from qwenquant.eval.perplexity import PerplexityConfig, evaluate_perplexity
        from qwenquant.eval.sources import load_token_stream

        key = (subject.name, ev.source)
        if key not in self._streams:
            self._streams[key] = load_token_stream(ev.source, subject.tokenizer)
        r = evaluate_perplexity(subject.model, self._streams[key], PerplexityConfig(seqlen=ev.seqlen, max_windows=ev.max_windows),
                                reference=None if reference is None else reference.model,
                                reference_name="original", progress=self.progress)
        metrics = {f"ppl:{ev.label}": r.ppl}
        if r.agreement is not None:
            metrics[f"kl:{ev.label}"] = r.agreement.kl_mean
            metrics[f"top1:{ev.label}"] = r.agreement.top1_agreement
        return metrics, r.to_dict()

    def describe(self, handle: Loaded) -> dict[str, Any]:
        return {"name": handle.name, "dtype": str(next(handle.model.parameters()).dtype).removeprefix("torch."),
                "architecture": handle.model.config.architectures[0],
                "parameters": sum(p.numel() for p in handle.model.parameters()),
                "device": str(next(handle.model.parameters()).device)}

    def release(self, handle: Loaded) -> None:
        placed = self._on_device.pop(id(handle), handle)
        self._memos.pop(id(placed), None)
        del handle
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
