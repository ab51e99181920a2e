"""The layer-by-layer calibration runner.

Calibration ids [n, L] are embedded once; then for each decoder layer in order, only that layer
is moved to the accelerator, the current inputs [n, L, H] (kept on the CPU between layers) run
through it in mini-batches while observers hooked on its linears collect statistics, a
method-specific procedure (``qwenquant.quantize``) replaces its weights, and the *quantized*
layer's outputs become the next layer's inputs. Peak accelerator memory is therefore one layer
plus one mini-batch of activations, whatever the model's depth.

Hooks are context managers: they always come off, even when a method raises.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from qwenquant.methods.hessian import HessianAccumulator

log = logging.getLogger(__name__)


# --- calibration windows -------------------------------------------------------------------


def calibration_windows(token_ids: Tensor, n: int, seqlen: int, seed: int) -> Tensor:
    """n random windows of seqlen tokens from a 1-D token stream: [n, seqlen] int64.

    Window starts are drawn with ``random.Random(seed)`` (reproducible, independent of torch's
    global RNG); windows may overlap when the text is short, as with the study's C4 sampling.
    """
    if n < 1 or seqlen < 1:
        raise ValueError(f"calibration needs n >= 1 and seqlen >= 1, got n={n}, seqlen={seqlen}")
    total = token_ids.numel()
    if total < seqlen + 1:
        raise ValueError(
            f"calibration text too short: {total} tokens, need at least {seqlen + 1} for windows of {seqlen}"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, total - seqlen) for _ in range(n)]
    return torch.stack([token_ids[s : s + seqlen] for s in starts]).long()


CHARS_PER_TOKEN_BOUND = 8  # a span of seqlen * 8 characters holds seqlen tokens of prose (~4 chars/token)


def text_calibration_windows(text: str, tokenizer, n: int, seqlen: int, seed: int) -> Tensor:
    """n windows of seqlen tokens from a long text: [n, seqlen] int64.

    Like the study's C4 sampling (one random window per sample), without tokenizing the whole
    corpus: each window starts at a random character offset (``random.Random(seed)``), a span of
    ``seqlen * 8`` characters is tokenized, its first token (likely cut mid-word) dropped, and
    the next seqlen tokens kept. Texts too short for that are tokenized whole and windowed by
    :func:`calibration_windows`.
    """
    if not text or not text.strip():
        raise ValueError("calibration text is empty")
    span = seqlen * CHARS_PER_TOKEN_BOUND
    if len(text) < 4 * span:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        return calibration_windows(ids, n, seqlen, seed)
    if n < 1 or seqlen < 1:
        raise ValueError(f"calibration needs n >= 1 and seqlen >= 1, got n={n}, seqlen={seqlen}")
    rng = random.Random(seed)
    rows = []
    for _attempt in range(20 * n):
        if len(rows) == n:
            break
        start = rng.randrange(0, len(text) - span)
        ids = tokenizer(text[start : start + span], add_special_tokens=False)["input_ids"][1 : seqlen + 1]
        if len(ids) == seqlen:  # a span of unusually dense text: draw again
            rows.append(torch.tensor(ids, dtype=torch.long))
    if len(rows) < n:
        raise ValueError(f"could not draw {n} windows of {seqlen} tokens from spans of {span} characters")
    return torch.stack(rows)


def document_calibration_windows(docs: list[str], tokenizer, n: int, seqlen: int, seed: int) -> Tensor:
    """The study's C4 sampling: n random documents longer than seqlen tokens, one random window each.

    Documents are drawn with replacement by ``random.Random(seed)`` (as the GPTQ reference does);
    returns [n, seqlen] int64.
    """
    if not docs:
        raise ValueError("calibration corpus holds no documents")
    rng = random.Random(seed)
    rows = []
    for _attempt in range(200 * n):
        if len(rows) == n:
            break
        ids = tokenizer(docs[rng.randrange(len(docs))], add_special_tokens=False)["input_ids"]
        if len(ids) <= seqlen:
            continue
        start = rng.randrange(0, len(ids) - seqlen)
        rows.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
    if len(rows) < n:
        raise ValueError(f"calibration corpus: found only {len(rows)} of {n} documents longer than {seqlen} tokens "
                         f"in {200 * n} draws from {len(docs)} documents")
    return torch.stack(rows)


# --- observers -----------------------------------------------------------------------------


@dataclass
class InputObserver:
    """Statistics of the inputs a linear sees, all over the last (feature) dimension.

    hessian: running H = 2/N Σ x xᵀ (float32, [in, in]) — GPTQ's normalisation;
    absmax / mean_abs: per-channel [in]; samples: a uniform random subsample of rows (≤ max_samples).
    """

    want_hessian: bool = False
    want_samples: bool = False
    max_samples: int = 16384
    seed: int = 0
    tokens: int = 0
    _hacc: HessianAccumulator | None = None
    absmax: Tensor | None = None
    abs_sum: Tensor | None = None
    _samples: list[Tensor] = field(default_factory=list)
    _kept: int = 0
    _pooled_hessian: Tensor | None = None

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
        t = x.shape[0]
        if t == 0:
            return
        amax = x.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        asum = x.abs().sum(0)
        self.abs_sum = asum if self.abs_sum is None else self.abs_sum + asum
        if self.want_hessian:
            if self._hacc is None:
                self._hacc = HessianAccumulator(x.shape[1], device=x.device)
            self._hacc.add(x)
        if self.want_samples:
            self._reservoir(x)
        self.tokens += t

    def _reservoir(self, x: Tensor) -> None:
        room = self.max_samples - self._kept
        if room > 0:
            take = x[:room]
            self._samples.append(take.cpu())
            self._kept += take.shape[0]
            return
        # Full: replace kept rows with probability max/seen (chunked reservoir sampling).
        g = torch.Generator().manual_seed(self.seed + self.tokens)
        seen = self.tokens + torch.arange(1, x.shape[0] + 1)
        slots = (torch.rand(x.shape[0], generator=g) * seen).long()
        keep = slots < self.max_samples
        if keep.any():
            pool = torch.cat(self._samples)
            pool[slots[keep]] = x[keep.to(x.device)].cpu()
            self._samples = [pool]

    @property
    def hessian(self) -> Tensor:
        """H = 2/N Σ x xᵀ [in, in] float32 (GPTQ's normalisation)."""
        if self._pooled_hessian is not None:
            return self._pooled_hessian
        if self._hacc is None:
            raise ValueError("no calibration tokens reached this linear: its Hessian is undefined")
        return self._hacc.hessian()

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / max(self.tokens, 1)

    def samples(self) -> Tensor:
        return torch.cat(self._samples) if self._samples else torch.empty(0)

    @staticmethod
    def pooled(observers: list["InputObserver"]) -> "InputObserver":
        """Token-weighted pool of several observers of same-shaped inputs (the MoE fallback)."""
        live = [o for o in observers if o.tokens > 0]
        if not live:
            raise ValueError("no calibration tokens reached any of the pooled linears")
        p = InputObserver(want_hessian=live[0].want_hessian, want_samples=live[0].want_samples)
        p.tokens = sum(o.tokens for o in live)
        p.absmax = torch.stack([o.absmax for o in live]).amax(0)
        p.abs_sum = torch.stack([o.abs_sum for o in live]).sum(0)
        if p.want_hessian:
            p._pooled_hessian = sum(o.hessian * (o.tokens / p.tokens) for o in live)
        if p.want_samples:
            p._samples = [torch.cat([o.samples() for o in live])[: live[0].max_samples]]
            p._kept = p._samples[0].shape[0]
        return p


@contextlib.contextmanager
def observing(modules: dict[str, nn.Module], make: Callable[[], InputObserver]) -> Iterator[dict[str, InputObserver]]:
    """Hook each module's input with a fresh observer; hooks always come off."""
    observers = {name: make() for name in modules}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, obs=observers[name]: obs.add(args[0]))
        for name, m in modules.items()
    ]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


# --- running one layer ---------------------------------------------------------------------


@dataclass
class LayerInputs:
    """The current hidden states entering a layer, and the keyword arguments every layer takes."""

    hidden: Tensor            # [n, L, H] on the CPU (storage dtype)
    kwargs: dict              # position_embeddings, attention_mask, position_ids (on the device)
    device: torch.device
    batch_size: int = 4

    @torch.no_grad()
    def run(self, layer: nn.Module, keep_outputs: bool = True, max_windows: int | None = None) -> Tensor | None:
        """Push the inputs (all, or the first ``max_windows``) through ``layer`` in mini-batches;
        outputs [n, L, H] on the CPU."""
        outs = []
        n = self.hidden.shape[0] if max_windows is None else min(max_windows, self.hidden.shape[0])
        for b in range(0, n, self.batch_size):
            x = self.hidden[b : min(b + self.batch_size, n)].to(self.device)
            kw = {k: _batch_kwarg(v, x.shape[0]) for k, v in self.kwargs.items()}
            y = layer(x, **kw)
            y = y[0] if isinstance(y, tuple) else y
            if keep_outputs:
                outs.append(y.to("cpu", self.hidden.dtype))
        return torch.cat(outs) if keep_outputs else None


def _batch_kwarg(v, batch: int):
    if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == 1 and batch > 1 and v.dim() == 4:
        return v.expand(batch, *v.shape[1:])  # an explicit [1, 1, L, L] mask
    if isinstance(v, tuple):
        return tuple(_batch_kwarg(t, batch) for t in v)
    return v


@torch.no_grad()
def first_layer_inputs(model: nn.Module, ids: Tensor, device: torch.device, batch_size: int, dtype: torch.dtype) -> LayerInputs:
    """Embed the calibration ids and build the per-layer kwargs (rotary tables, causal mask)."""
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    embed = inner.embed_tokens
    orig = embed.weight.device
    embed.to(device)
    hidden = torch.cat([embed(ids[b : b + batch_size].to(device)).to("cpu", dtype) for b in range(0, ids.shape[0], batch_size)])
    embed.to(orig)
    L = ids.shape[1]
    position_ids = torch.arange(L, device=device).unsqueeze(0)
    probe = hidden[:1].to(device)
    inner.rotary_emb.to(device)
    position_embeddings = inner.rotary_emb(probe, position_ids=position_ids)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=probe, attention_mask=None, past_key_values=None, position_ids=position_ids
    )
    kwargs = {"position_embeddings": position_embeddings, "attention_mask": mask, "position_ids": position_ids}
    return LayerInputs(hidden=hidden, kwargs=kwargs, device=device, batch_size=batch_size)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
