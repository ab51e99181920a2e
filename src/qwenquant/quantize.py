"""Quantize a whole model: the calibration runner driving a method, layer by layer.

For each decoder layer (one on the accelerator at a time, see ``model/calibrate.py``):

1. MoE layers get their fused experts unfused into per-expert linears (``model/moe.py``).
2. Scale-migrating methods (AWQ, SmoothQuant) observe the original layer once, compute one scale
   per (previous op → linears) pair of the architecture table and fold it in exactly.
3. The quantization steps run in true-sequential order (``Architecture.sequential``): observe the
   inputs of the step's linears *with earlier steps already quantized*, quantize each linear with
   its method, replace it by a :class:`QuantLinear`.
4. The quantized layer's outputs become the next layer's inputs.
5. Optionally (``QuantRecipe.lm_head``) the output projection, on the final norm of the last layer's
   outputs (:func:`quantize_head`); by default it stays in full precision, as in most W4 formats.

Methods are a registry keyed by config type (:data:`METHODS`): what statistics they need, whether
they migrate scales, and the pure function that turns (W, statistics) into a quantized weight.

MoE: every expert is calibrated on the tokens the router sends it, and the count is logged per
expert. An expert that sees fewer than ``min_expert_tokens`` tokens is calibrated on the *pooled*
statistics of all experts of its layer for that projection (token-weighted average Hessian, pooled
samples) — a documented, counted fallback (``LayerReport.fallback_experts``), never silent RTN.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qwenquant.methods.awq import AWQConfig, awq_quantize, awq_search_scale
from qwenquant.methods.billm import BiLLMConfig, billm_quantize
from qwenquant.methods.gptq import GPTQConfig, gptq_quantize
from qwenquant.methods.rtn import RTNConfig, rtn_quantize
from qwenquant.methods.smoothquant import SmoothQuantConfig, smooth_scale, smoothquant_quantize
from qwenquant.model.arch import Architecture
from qwenquant.model.calibrate import InputObserver, LayerInputs, first_layer_inputs, observing, peak_memory_bytes
from qwenquant.model.moe import num_experts, unfuse_experts
from qwenquant.model.scaling import can_fold, fold_scale
from qwenquant.runtime.quant_linear import QuantLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stats: str | None                  # "hessian" | "samples" | None: what each step observes
    scales: str | None                 # "awq" | "smooth" | None: scale migration before quantizing
    quantize: Callable                 # (W [out,in] f32, observer | None, cfg, linear name, arch) -> weight
    step_tokens: Callable = lambda cfg: None  # tokens a step's statistics need (None: all calibration tokens)


METHODS: dict[type, MethodSpec] = {
    RTNConfig: MethodSpec("rtn", None, None, lambda W, obs, cfg, name, arch: rtn_quantize(W, cfg)),
    GPTQConfig: MethodSpec("gptq", "hessian", None, lambda W, obs, cfg, name, arch: gptq_quantize(W, obs.hessian, cfg)),
    AWQConfig: MethodSpec(
        "awq",
        "samples",
        "awq",
        lambda W, obs, cfg, name, arch: awq_quantize(W, None if name in arch.no_clip else obs.samples(), cfg),
        step_tokens=lambda cfg: cfg.clip_tokens,  # the clip search reads only this many tokens
    ),
    SmoothQuantConfig: MethodSpec("smoothquant", None, "smooth", lambda W, obs, cfg, name, arch: smoothquant_quantize(W, cfg)),
    BiLLMConfig: MethodSpec("billm", "hessian", None, lambda W, obs, cfg, name, arch: billm_quantize(W, obs.hessian, cfg)),
}
METHOD_NAMES = {spec.name: cfg_type for cfg_type, spec in METHODS.items()}


def method_spec(cfg) -> MethodSpec:
    try:
        return METHODS[type(cfg)]
    except KeyError:
        raise ValueError(f"no method registered for config {type(cfg).__name__}; known: {', '.join(METHOD_NAMES)}") from None


@dataclass(frozen=True)
class QuantRecipe:
    """Everything that decides the quantized weights (and so the cache key of a checkpoint)."""

    method: object                           # one of the config dataclasses in METHODS
    act_bits: int | None = None              # dynamic per-token activation bits (W·A8, W·A4)
    min_expert_tokens: int = 16              # MoE: below this, an expert uses pooled statistics
    lm_head: bool = False                    # also quantize the output projection (see quantize_head)

    @property
    def method_name(self) -> str:
        return method_spec(self.method).name

    def to_dict(self) -> dict:
        d = {"method": self.method_name, "config": asdict(self.method), "act_bits": self.act_bits,
             "min_expert_tokens": self.min_expert_tokens}
        if self.lm_head:  # only when set: recipes (and cache keys) from before the option stay as they were
            d["lm_head"] = True
        return d


@dataclass
class LayerReport:
    index: int
    seconds: float
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # projection -> tokens per expert
    fallback_experts: list[str] = field(default_factory=list)
    alphas: dict[str, float] = field(default_factory=dict)             # AWQ α per scale group
    skipped_folds: list[str] = field(default_factory=list)


@dataclass
class QuantizationReport:
    recipe: dict
    layers: list[LayerReport]
    seconds: float
    peak_memory_bytes: int
    device: str
    calib_shape: tuple[int, int]
    avg_bits: float
    quantized_params: int

    @property
    def fallback_count(self) -> int:
        return sum(len(layer.fallback_experts) for layer in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fallback_count"] = self.fallback_count
        return d


# --- the driver ----------------------------------------------------------------------------


def quantize_model(
    model: nn.Module,
    arch: Architecture,
    recipe: QuantRecipe,
    calib_ids: Tensor | None,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize every decoder-block linear of ``model`` in place; embeddings stay as they are, and so does lm_head
    unless ``recipe.lm_head`` (then :func:`quantize_head` runs after the last layer)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = method_spec(recipe.method)
    if recipe.lm_head:
        check_head(model, arch, spec)  # before any layer changes: a refused recipe leaves the model as it was
    data = needs_calibration(recipe, arch)
    if data and (calib_ids is None or calib_ids.dim() != 2):
        shape = None if calib_ids is None else tuple(calib_ids.shape)
        raise ValueError(f"{spec.name} on {arch.hf_class} needs calibration ids [n, seqlen], got {shape}")
    _check_finite(model)
    dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    # Data-free (RTN, dense): no calibration pass at all. MoE still runs one, to count tokens per expert.
    inputs = first_layer_inputs(model, calib_ids, device, batch_size, dtype) if data else None
    layers = model.get_submodule(arch.layers)
    reports = []
    bar = tqdm(range(len(layers)), desc=f"{spec.name} layers", unit="layer", disable=not progress, mininterval=2)
    for i in bar:
        t_layer = time.perf_counter()
        layer = layers[i].to(device)
        report = LayerReport(index=i, seconds=0.0)
        quantize_layer(layer, arch, inputs, recipe, spec, report)
        if inputs is not None:
            with _counting_experts(layer, report):
                inputs.hidden = inputs.run(layer)
        layers[i] = layer.to("cpu")
        report.seconds = time.perf_counter() - t_layer
        reports.append(report)
        _log_layer(report, device)
        bar.set_postfix(peak_mem=f"{peak_memory_bytes(device) / 2**30:.2f}GiB")
    if recipe.lm_head:
        t_head = time.perf_counter()
        quantize_head(model, arch, inputs, recipe, spec, device)
        log.info("%s quantized in %.1fs", arch.head, time.perf_counter() - t_head)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    n_params = sum(m.in_features * m.out_features for m in qlinears)
    bits = sum(_weight_bits(m) for m in qlinears)
    return QuantizationReport(
        recipe=recipe.to_dict(),
        layers=reports,
        seconds=time.perf_counter() - t0,
        peak_memory_bytes=peak_memory_bytes(device),
        device=str(device),
        calib_shape=tuple(calib_ids.shape) if data else (0, 0),
        avg_bits=bits / max(n_params, 1),
        quantized_params=n_params,
    )


def needs_calibration(recipe: QuantRecipe, arch: Architecture) -> bool:
    """Whether quantizing needs data: any method with statistics or scales, and every MoE (token counts)."""
    spec = method_spec(recipe.method)
    return bool(spec.stats or spec.scales or arch.moe)


def _weight_bits(m: QuantLinear) -> float:
    """Average bits per weight the method reports (BiLLM: the paper's count) times the weight count."""
    return m.weight_object().avg_bits * m.in_features * m.out_features


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} of shape {tuple(p.shape)} holds NaN/inf values; refusing to quantize")


def _log_layer(report: LayerReport, device: torch.device) -> None:
    log.info("layer %d quantized in %.1fs; peak %s memory %.2f GiB", report.index, report.seconds, device.type,
             peak_memory_bytes(device) / 2**30)
    for proj, counts in report.expert_tokens.items():
        log.info("layer %d %s tokens per expert: %s", report.index, proj, counts)
    if report.fallback_experts:
        log.warning("layer %d: %d expert linears saw < min tokens and used pooled statistics: %s",
                    report.index, len(report.fallback_experts), ", ".join(report.fallback_experts))
    if report.skipped_folds:
        log.info("layer %d: scale folds skipped (shape mismatch, e.g. GQA v->o): %s", report.index, report.skipped_folds)


# --- the output projection -----------------------------------------------------------------


def check_head_method(spec: MethodSpec) -> None:
    """Refuse lm_head quantization with a method that migrates scales (checked on the recipe alone, so a sweep can
    refuse it before any model is loaded)."""
    if spec.scales:
        raise ValueError(f"lm_head=True: {spec.name} migrates scales into the op before each linear, which lm_head's "
                         f"final norm does not take here; lm_head quantization supports methods without scale "
                         f"migration (rtn, gptq, billm)")


def check_head(model: nn.Module, arch: Architecture, spec: MethodSpec) -> None:
    """Refuse, by name, an lm_head quantization this pipeline cannot do."""
    check_head_method(spec)
    try:
        head = model.get_submodule(arch.head)
        model.get_submodule(arch.final_norm)
    except AttributeError as e:
        raise ValueError(f"lm_head quantization: {e} ({arch.hf_class} table: head {arch.head!r}, final norm "
                         f"{arch.final_norm!r})") from None
    if type(head) is not nn.Linear:
        raise ValueError(f"{arch.head} is a {type(head).__name__}, expected an nn.Linear to quantize "
                         f"(already quantized?)")


@torch.no_grad()
def quantize_head(model: nn.Module, arch: Architecture, inputs: LayerInputs | None, recipe: QuantRecipe,
                  spec: MethodSpec, device: torch.device) -> None:
    """Quantize the output projection with the recipe's method, in place.

    Its input is the final norm of the last layer's outputs (``inputs.hidden`` after the layer loop), observed the
    way a layer's linears are: GPTQ / BiLLM get the Hessian of those [tokens, hidden] rows. A model with tied
    embeddings is untied: the embedding keeps its full-precision table (a lookup reads one row per token, there is
    nothing to gain there) and ``config.tie_word_embeddings`` becomes False so a saved checkpoint loads untied.
    So a tied model *gains* the packed head's bytes; the win is the bytes the decode step reads, the head being
    the largest single matrix of a Qwen3 (151,936 × hidden). The head takes the recipe's ``act_bits`` like every
    other linear (W4A8 + head: the final norm's output is quantized per token too). It runs after the last layer:
    a failure here leaves the decoder quantized and the head as it was.
    """
    head = model.get_submodule(arch.head)
    obs = None
    if spec.stats:
        norm = model.get_submodule(arch.final_norm)
        home = next(norm.parameters()).device
        norm.to(device)
        obs = InputObserver(want_hessian=spec.stats == "hessian", want_samples=spec.stats == "samples")
        try:
            for b in range(0, inputs.hidden.shape[0], inputs.batch_size):
                obs.add(norm(inputs.hidden[b:b + inputs.batch_size].to(device)))  # [batch, L, hidden]
        finally:
            norm.to(home)
    W = head.weight.detach().to(device).float()  # [vocab, hidden]
    qweight = spec.quantize(W, obs, recipe.method, arch.head, arch)
    quantized = QuantLinear.from_weight(qweight, bias=head.bias, act_bits=recipe.act_bits,
                                        compute_dtype=head.weight.dtype).to(head.weight.device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    _replace(model, arch.head, quantized)


# --- one layer -----------------------------------------------------------------------------


def quantize_layer(layer: nn.Module, arch: Architecture, inputs: LayerInputs, recipe: QuantRecipe,
                   spec: MethodSpec, report: LayerReport) -> None:
    n_exp = num_experts(layer, arch.moe) if arch.moe and unfuse_experts(layer, arch.moe) else 0
    if spec.scales:
        _migrate_scales(layer, arch, inputs, recipe, spec, n_exp, report)
    for step in arch.sequential_steps(n_exp):
        modules = {name: layer.get_submodule(name) for name in step}
        observers = _observe_step(layer, modules, inputs, spec, recipe) if spec.stats else {}
        if n_exp:
            _record_expert_tokens(observers, report)
        for name, linear in modules.items():
            obs = _observer_for(name, observers, recipe, report) if spec.stats else None
            W = linear.weight.detach().float()
            qweight = spec.quantize(W, obs, recipe.method, name, arch)
            _replace(layer, name, QuantLinear.from_weight(
                qweight, bias=linear.bias, act_bits=recipe.act_bits, compute_dtype=linear.weight.dtype
            ).to(linear.weight.device))


def _site(name: str) -> str:
    """Linears with the same parent module in one step read the same input (q/k/v; gate/up)."""
    return name.rpartition(".")[0]


def _observe_step(layer, modules: dict[str, nn.Module], inputs: LayerInputs, spec: MethodSpec,
                  recipe: QuantRecipe) -> dict[str, InputObserver]:
    sites = {}
    for name, m in modules.items():
        sites.setdefault(_site(name), m)  # hook one linear per shared input
    make = lambda: InputObserver(want_hessian=spec.stats == "hessian", want_samples=spec.stats == "samples")
    tokens = spec.step_tokens(recipe.method)
    experts = any(part.isdigit() for name in modules for part in name.split("."))
    # experts see a fraction of the tokens each: they always get every window
    windows = None if tokens is None or experts else -(-tokens // inputs.hidden.shape[1])  # ceil
    with observing(sites, make) as observers:
        inputs.run(layer, keep_outputs=False, max_windows=windows)
    return observers


def _role(name: str) -> str:
    """'mlp.experts.3.up_proj' -> 'mlp.experts.*.up_proj' (pooling key)."""
    parts = name.split(".")
    return ".".join("*" if p.isdigit() else p for p in parts)


def _observer_for(name: str, observers: dict[str, InputObserver], recipe: QuantRecipe, report: LayerReport) -> InputObserver:
    obs = observers[_site(name)]
    is_expert = any(p.isdigit() for p in name.split("."))
    if not is_expert or obs.tokens >= recipe.min_expert_tokens:
        return obs
    role = _role(_site(name))
    report.fallback_experts.append(f"{name} ({obs.tokens} tokens)")
    return InputObserver.pooled([o for site, o in observers.items() if _role(site) == role])


def _record_expert_tokens(observers: dict[str, InputObserver], report: LayerReport) -> None:
    by_role: dict[str, list[int]] = {}
    for site, obs in observers.items():
        if any(p.isdigit() for p in site.split(".")):
            by_role.setdefault(_role(site), []).append(obs.tokens)
    report.expert_tokens.update(by_role)


@contextlib.contextmanager
def _counting_experts(layer: nn.Module, report: LayerReport):
    """Count tokens per expert during the layer's final pass when no step observed them (RTN, SmoothQuant)."""
    experts = {} if report.expert_tokens else {
        _site(name): m for name, m in layer.named_modules()
        if isinstance(m, QuantLinear) and any(p.isdigit() for p in name.split(".")) and name.endswith("up_proj")
    }
    with observing(experts, InputObserver) as observers:
        yield
    _record_expert_tokens(observers, report)


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, attr, module)


def _migrate_scales(layer, arch: Architecture, inputs: LayerInputs, recipe: QuantRecipe, spec: MethodSpec,
                    n_exp: int, report: LayerReport) -> None:
    """Observe the original layer once, then fold one scale per (previous op -> linears) group."""
    groups = arch.scale_groups(n_exp)
    # The input of a group: its first follower, or the router when the group spans every expert
    # (each expert only sees its routed tokens; the router sees them all).
    sites = {prev: layer.get_submodule(extra[0] if extra else linears[0]) for prev, linears, extra in groups}
    make = lambda: InputObserver(want_samples=spec.scales == "awq", max_samples=recipe.method.max_tokens
                                 if spec.scales == "awq" else 0)
    with observing(sites, make) as observers:
        inputs.run(layer, keep_outputs=False)
    for prev_name, linears, extra in groups:
        prev = layer.get_submodule(prev_name)
        followers = [layer.get_submodule(n) for n in linears]
        if not can_fold(prev, followers):
            report.skipped_folds.append(f"{prev_name}->{','.join(linears)}")
            continue
        obs = observers[prev_name]
        if obs.tokens < recipe.min_expert_tokens:
            report.fallback_experts.append(f"{prev_name} scale (s=1, {obs.tokens} tokens)")
            continue
        weights = [f.weight.detach().float() for f in followers]
        if spec.scales == "awq":
            s, alpha = awq_search_scale(obs.samples().to(weights[0].device), weights, recipe.method)
            report.alphas[prev_name] = alpha
        else:
            s = smooth_scale(obs.absmax, weights, recipe.method.alpha)
        fold_scale(prev, followers + [layer.get_submodule(n) for n in extra], s)
