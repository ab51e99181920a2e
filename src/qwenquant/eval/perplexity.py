"""Perplexity, and — in the same pass — KL divergence and top-1 agreement with a reference model.

Protocol (the study's, after GPTQ): the evaluation text is tokenized once into a stream of ids,
cut into non-overlapping windows of ``seqlen`` tokens (2048), the remainder dropped; each window
is one independent sequence (no carried-over context). In a window of L tokens the model predicts
tokens 1..L-1 from their prefixes, so each window scores L-1 tokens:

    nll  = mean over all windows and positions of  -log softmax(logits[t])[ids[t+1]]   (fp32)
    ppl  = exp(nll)

Since every window scores the same number of tokens this equals GPTQ's mean of per-window means.

Agreement with a reference (the unquantized model) on the same positions:

    KL_t  = sum_v P_ref(v) * (log P_ref(v) - log P_q(v))      per token, nats, KL(P_ref || P_q)
    top1  = fraction of positions where argmax P_q == argmax P_ref

KL is reported as its mean and p50/p90/p99/max over tokens. Logits are never kept beyond one
window: each window's per-token KL values (4 bytes a token) are kept, which for the C4 protocol
(256 x 2047 tokens) is 2 MB. Log-softmax over the vocabulary is done in chunks of positions so a
151,936-word vocabulary costs a few hundred MB of fp32 temporaries, not gigabytes.

Known limit: a window must not exceed the model's ``max_position_embeddings`` (checked).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qwenquant.eval.sources import TokenStream

log = logging.getLogger(__name__)

POSITION_CHUNK = 512  # positions per fp32 log-softmax chunk


@dataclass(frozen=True)
class PerplexityConfig:
    seqlen: int = 2048              # tokens per window (the study: 2048)
    max_windows: int | None = None  # score only the first K windows (None: all)
    batch_size: int = 1             # windows per forward


@dataclass(frozen=True)
class AgreementStats:
    """Per-token KL(P_ref || P_q) summary and top-1 agreement, over the scored positions."""

    kl_mean: float
    kl_p50: float
    kl_p90: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    reference: str


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float          # mean token NLL, nats
    tokens: int         # scored (predicted) tokens = windows * (seqlen - 1)
    windows: int
    seqlen: int
    source: str
    origin: str
    seconds: float
    agreement: AgreementStats | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        agreement = d.pop("agreement")
        if agreement is not None:
            d.update(agreement)
        return d


def make_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of a token stream, remainder dropped.  # [n_windows, seqlen]"""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (one token of context, one to predict), got {seqlen}")
    n = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def check_context(model: torch.nn.Module, seqlen: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ValueError(
            f"seqlen {seqlen} exceeds the model's context (max_position_embeddings={limit}); "
            f"use --seqlen {limit} or less"
        )


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    stream: TokenStream,
    cfg: PerplexityConfig = PerplexityConfig(),
    reference: torch.nn.Module | None = None,
    reference_name: str = "reference",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``stream``; with ``reference``, also KL and top-1 agreement."""
    check_context(model, cfg.seqlen)
    if reference is not None:
        check_context(reference, cfg.seqlen)
    windows = make_windows(stream.ids, cfg.seqlen, cfg.max_windows)  # [n, L]
    device = model_device(model)
    nll_sum = 0.0  # float64 accumulator across windows
    kl_values: list[torch.Tensor] = []
    agree = 0
    t0 = time.perf_counter()
    batches = windows.split(cfg.batch_size)
    for batch in tqdm(batches, desc=f"ppl {stream.name}", disable=not progress, unit="batch"):
        ids = batch.to(device)                                   # [b, L]
        logits = model(ids).logits[:, :-1]                       # [b, L-1, V]
        targets = ids[:, 1:]                                     # [b, L-1]
        ref_logits = reference(ids.to(model_device(reference))).logits[:, :-1].to(device) if reference is not None else None
        for s in range(0, targets.shape[1], POSITION_CHUNK):
            chunk = slice(s, s + POSITION_CHUNK)
            logp = F.log_softmax(logits[:, chunk].float(), dim=-1)         # [b, c, V] fp32
            nll_sum += -logp.gather(-1, targets[:, chunk, None]).double().sum().item()
            if ref_logits is not None:
                ref_logp = F.log_softmax(ref_logits[:, chunk].float(), dim=-1)  # [b, c, V] fp32
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)              # [b, c]
                kl_values.append(kl.clamp_min(0).flatten().cpu())               # rounding can dip below 0
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    seconds = time.perf_counter() - t0
    n_tokens = windows.shape[0] * (cfg.seqlen - 1)
    nll = nll_sum / n_tokens
    agreement = None
    if reference is not None:
        kl_all = torch.cat(kl_values).double().numpy()  # [n_tokens]
        p50, p90, p99 = np.percentile(kl_all, [50, 90, 99])
        agreement = AgreementStats(
            kl_mean=float(kl_all.mean()), kl_p50=float(p50), kl_p90=float(p90), kl_p99=float(p99),
            kl_max=float(kl_all.max()), top1_agreement=agree / n_tokens, reference=reference_name,
        )
    result = PerplexityResult(
        ppl=math.exp(nll), nll=nll, tokens=n_tokens, windows=windows.shape[0], seqlen=cfg.seqlen,
        source=stream.name, origin=stream.origin, seconds=seconds, agreement=agreement,
    )
    log.info("ppl %s: %.4f over %d windows x %d (%.1f s)", stream.name, result.ppl, result.windows, cfg.seqlen, seconds)
    return result
