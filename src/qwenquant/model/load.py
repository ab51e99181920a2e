"""Load a causal LM and its tokenizer from a short name, a local Hugging Face directory or a hub id.

Short names (``smollm2``, ``tiny-qwen3``, ``tiny-qwen3-moe``) are built offline on first use by
``model/fixtures.py``. A directory holding ``qwenquant_config.json`` is a quantized checkpoint and
is loaded by ``io/checkpoint.py`` instead (see :func:`qwenquant.api.load`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwenquant.model.arch import architecture_for


def model_class_name(model_dir: Path) -> str:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    archs = json.loads(cfg_path.read_text()).get("architectures") or []
    if not archs:
        raise ValueError(f"{cfg_path} names no 'architectures'; expected one of the supported causal LMs")
    return archs[0]


def resolve_model_dir(source: str | Path) -> Path | str:
    """A short name or existing directory -> Path; anything shaped like ``org/name`` -> hub id (str)."""
    from qwenquant.model import fixtures

    s = str(source)
    if s in fixtures.MODEL_BUILDERS:
        return fixtures.resolve_model(s)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"model source {s!r} is a file, expected a model directory, a short name or a hub id")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return s  # hub id: transformers resolves it (needs the hub or its local cache)
    raise FileNotFoundError(
        f"model {s!r} not found: no such directory, and not a short name "
        f"({', '.join(sorted(fixtures.MODEL_BUILDERS))}) or a hub id like Qwen/Qwen3-0.6B"
    )


def load_hf_model(source: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, Architecture) for an unquantized model; the model is on CPU in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = resolve_model_dir(source)
    if isinstance(where, Path):
        cls = model_class_name(where)
    else:
        cls = (AutoConfig.from_pretrained(where).architectures or ["?"])[0]
    arch = architecture_for(cls)  # refuse before loading gigabytes
    model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(where))
    return model, tokenizer, arch
