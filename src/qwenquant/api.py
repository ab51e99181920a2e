"""The public Python API: load, configure, calibrate, quantize, save.

    from qwenquant import api
    model, tok, info = api.load("smollm2")
    recipe = api.method_config("gptq", bits=3, group_size=64)
    ids = api.calibration_ids(tok, "austen", n=32, seqlen=512, seed=0)
    report = api.quantize(model, tok, recipe, ids)
    api.save_quantized(model, tok, report, "out/smollm2-gptq-w3g64")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from qwenquant.io.checkpoint import is_quantized_checkpoint, load_quantized, save_quantized as _save
from qwenquant.model.arch import architecture_for
from qwenquant.model.calibrate import document_calibration_windows, text_calibration_windows
from qwenquant.model.load import load_hf_model, resolve_model_dir
from qwenquant.numerics.activation import check_act_bits
from qwenquant.numerics.affine import QuantSpec
from qwenquant.quantize import (METHOD_NAMES, QuantizationReport, QuantRecipe, check_head_method, method_spec,
                                quantize_model)
from qwenquant.quantize import needs_calibration as _needs_calibration

METHODS = tuple(METHOD_NAMES)


def load(source: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer, info) for a short name, an HF directory, a hub id or a quantized checkpoint.

    info: {"source", "architecture", "quantized": bool, and for checkpoints the stored config}.
    """
    where = resolve_model_dir(source)
    if isinstance(where, Path) and is_quantized_checkpoint(where):
        model, tok, qcfg = load_quantized(where, device=device)
        return model, tok, {"source": str(source), "architecture": qcfg["architecture"], "quantized": True, **qcfg}
    model, tok, arch = load_hf_model(where, dtype=dtype)
    return model.to(device), tok, {"source": str(source), "architecture": arch.hf_class, "quantized": False}


def method_config(method: str, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                  act_bits: int | None = None, **extra) -> QuantRecipe:
    """A QuantRecipe from flat options, as the CLI and sweep configs give them.

    ``extra`` sets method-config fields by name (e.g. damp=0.01, act_order=False, alpha=0.8) or
    recipe fields (min_expert_tokens, lm_head=True to quantize the output projection too); an unknown
    name is an error.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_NAMES)}")
    if act_bits is not None:
        check_act_bits(act_bits)
    cfg_type = METHOD_NAMES[method]
    fields = {f.name for f in dataclasses.fields(cfg_type)}
    recipe_fields = {"min_expert_tokens", "lm_head"}
    unknown = set(extra) - fields - recipe_fields
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method {method}; known: {sorted(fields - {'spec'})}")
    kw = {k: v for k, v in extra.items() if k in fields}
    if method == "billm":
        if bits != 1:
            raise ValueError(f"billm is a ~1.1-bit method: pass bits=1, got {bits}")
    else:
        if method == "smoothquant":
            symmetric = True  # the paper's scheme: symmetric per-channel weights
            act_bits = 8 if act_bits is None else act_bits
        kw["spec"] = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    recipe_kw = {k: v for k, v in extra.items() if k in recipe_fields}
    if "lm_head" in recipe_kw and not isinstance(recipe_kw["lm_head"], bool):
        raise ValueError(f"lm_head={recipe_kw['lm_head']!r}: expected true or false")
    recipe = QuantRecipe(method=cfg_type(**kw), act_bits=act_bits, **recipe_kw)
    if recipe.lm_head:
        check_head_method(method_spec(recipe.method))
    return recipe


def calibration_ids(tokenizer, source: str, n: int = 128, seqlen: int = 2048, seed: int = 0) -> Tensor:
    """[n, seqlen] calibration token windows.

    ``source``: ``austen`` (its calibration novels), a text file path, or ``c4=PATH`` / ``docs=PATH``
    for a document corpus (C4 ``en`` train shard as JSON/JSONL(.gz), parquet, a saved dataset):
    the study's sampling, random documents longer than seqlen, one random window each.
    """
    from qwenquant.model.fixtures import resolve_text

    name, sep, path = source.partition("=")
    if sep and name in ("c4", "docs"):
        from qwenquant.eval.sources import read_documents

        return document_calibration_windows(read_documents(Path(path).expanduser()), tokenizer, n, seqlen, seed)
    text = resolve_text(source, "calib")
    try:
        return text_calibration_windows(text, tokenizer, n, seqlen, seed)
    except ValueError as e:
        raise ValueError(f"calibration source {source!r}: {e}") from None


def quantize(model: nn.Module, tokenizer, recipe: QuantRecipe, calib_ids: Tensor | None, device=None,
             batch_size: int = 4, progress: bool = True) -> QuantizationReport:
    """Quantize ``model`` in place (decoder linears -> QuantLinear); see ``qwenquant.quantize``."""
    arch = architecture_for(type(model).__name__)
    return quantize_model(model, arch, recipe, calib_ids, device=device, batch_size=batch_size, progress=progress)


def needs_calibration(model: nn.Module, recipe: QuantRecipe) -> bool:
    """False for data-free settings (RTN on a dense model): ``quantize`` then takes ``calib_ids=None``."""
    return _needs_calibration(recipe, architecture_for(type(model).__name__))


def save_quantized(model: nn.Module, tokenizer, report: QuantizationReport, out_dir: str | Path,
                   source: str | None = None, calib: dict | None = None) -> Path:
    """Write a self-describing checkpoint (atomic: temp dir, then rename)."""
    return _save(model, tokenizer, out_dir, {"recipe": report.recipe, "source_model": source, "calibration": calib,
                                             "report": report.to_dict(), "avg_bits": report.avg_bits})
