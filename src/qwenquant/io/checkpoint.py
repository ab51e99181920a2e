"""The qwenquant checkpoint: a Hugging Face directory plus packed quantized linears, self-describing.

Layout of a saved directory::

    config.json, generation_config.json     the original model's config (``architectures`` set to the class;
                                             ``tie_word_embeddings`` false when lm_head was quantized)
    tokenizer.json, tokenizer_config.json…   the tokenizer
    model.safetensors                        every tensor of the model: unquantized ones as they
                                             were (embeddings, norms, lm_head unless quantized), and for each
                                             quantized linear its packed storage buffers
                                             (``<name>.qweight`` uint8, ``.scale`` fp16, ``.zero``
                                             uint8; BiLLM: bit planes and masks)
    qwenquant_config.json                    format version, the recipe (method + config), the
                                             calibration data, per-module format/meta, the
                                             quantization report, the qwenquant version

Writes go to a temporary sibling directory renamed into place at the end, so a failure never
leaves a half-written checkpoint. Loading rebuilds the model skeleton on the meta device (no
random init), puts :class:`QuantLinear` shells where the config says, then fills every tensor
from the safetensors file — strictly: a missing or extra tensor is an error, not a silent default.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

import qwenquant
from qwenquant.model.arch import architecture_for
from qwenquant.model.moe import unfuse_experts
from qwenquant.runtime.quant_linear import QuantLinear

CONFIG_NAME = "qwenquant_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, extra: dict) -> Path:
    """Write ``model`` (with QuantLinear modules) atomically to ``out_dir``; returns the path."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        modules = {
            name: {"fmt": m.fmt, "meta": m.meta, "in_features": m.in_features, "out_features": m.out_features,
                   "act_bits": m.act_bits, "bias": m.bias is not None}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)
        }
        save_file(_state_to_save(model), str(tmp / WEIGHTS_NAME), metadata={"format": "qwenquant"})
        cfg = {"format": "qwenquant", "format_version": FORMAT_VERSION, "qwenquant_version": qwenquant.__version__,
               "architecture": type(model).__name__, "modules": modules, **extra}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1, default=str))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor once: a tied lm_head (it *is* the embedding) is left out and re-tied on load."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if _tied(model):
        state.pop("lm_head.weight", None)
    return state


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def load_quantized(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, config dict) from a directory written by :func:`save_quantized`."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    cfg_path = path / CONFIG_NAME
    weights = path / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path} is not a qwenquant checkpoint: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        qcfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {cfg_path}: {e}") from e
    if qcfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {qcfg.get('format_version')!r}, this qwenquant reads {FORMAT_VERSION}")
    arch = architecture_for(qcfg["architecture"])
    hf_config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=_dtype_of(hf_config))
    if arch.moe:
        for layer in model.get_submodule(arch.layers):
            unfuse_experts(layer, arch.moe)
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name, info in qcfg["modules"].items():
                shapes = {k.rpartition(".")[2]: f.get_slice(k) for k in f.keys() if k.rpartition(".")[0] == name}
                tensors = {k: torch.empty(s.get_shape(), dtype=_st_dtype(s.get_dtype())) for k, s in shapes.items() if k != "bias"}
                bias = torch.empty(info["out_features"]) if info["bias"] else None
                shell = QuantLinear(info["in_features"], info["out_features"], info["fmt"], info["meta"], tensors,
                                    bias=bias, act_bits=info["act_bits"])
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, shell)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"corrupt or unreadable {weights}: {e}") from e
    model.to_empty(device="cpu")
    _reinit_rotary(model)
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise ValueError(f"corrupt or unreadable {weights}: {e}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and _tied(model))]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if _tied(model):
        model.lm_head.weight = model.get_input_embeddings().weight
    model.eval().to(device)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return model, tokenizer, qcfg


def _dtype_of(cfg) -> torch.dtype:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    return getattr(torch, d) if isinstance(d, str) else d


def _st_dtype(name: str) -> torch.dtype:
    return {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
            "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}[name]


def _reinit_rotary(model: nn.Module) -> None:
    """Rotary tables are non-persistent buffers computed at init: rebuild them after meta init."""
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(m)(config=model.config))
