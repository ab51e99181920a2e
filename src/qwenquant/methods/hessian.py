"""The layer Hessian that GPTQ and BiLLM share: accumulation, validation, damping, inverse Cholesky.

For a linear layer ``y = x Wᵀ`` and the layer-wise objective ``||X Wᵀ - X Ŵᵀ||²`` (summed over
output rows), the Hessian with respect to each row of ``W`` is the same matrix

    H = 2/n · Σ_t x_tᵀ x_t          [in, in], x_t one token's input (a row of X)

:class:`HessianAccumulator` builds it in the running-average way of the GPTQ reference
(``H *= n/(n+m); n += m; H += (sqrt(2/n)·X)ᵀ(sqrt(2/n)·X)``), so the sum never grows with the
number of calibration tokens. Differences from the reference, both deliberate: ``n`` counts
*tokens* (rows of X after flattening the leading dimensions) where the reference counts
sequences — only an overall factor, to which GPTQ and BiLLM are invariant (damping is relative
to mean(diag H), and BiLLM's salience ranking is scale-free); and the accumulation dtype is a
choice (float32 like the reference, or float64 for very long calibration runs).

:func:`inverse_cholesky` is the numerically delicate step both methods need:

    dead columns (diag H == 0, an input channel that never fired): H_ii = 1, W[:, i] = 0
    H += λ·mean(diag H)·I                  (λ = ``damp``, 0.01 in the study)
    U = chol((H)⁻¹), upper triangular, H⁻¹ = UᵀU

Row ``i`` of ``U`` is what GPTQ's sequential OBS update needs: ``U_ii² = [H_F⁻¹]_ii`` for the
set ``F = {i, i+1, …}`` of columns not yet quantized, and ``U_i,j>i / U_ii`` spreads the error of
column ``i`` over the later columns. When the Cholesky fails (H not positive definite even after
damping: too few tokens, duplicated channels, fp32 round-off), damping is raised ×10 up to
``max_damp`` with a logged warning, then a ValueError says what to change.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MAX_DAMP = 1.0  # beyond λ = 1 the "Hessian" is mostly the identity: the result would be RTN in disguise


class HessianAccumulator:
    """Running average H = 2/n Σ xᵀx over the rows of every ``x`` given to :meth:`add`."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulate in float32 or float64, got {dtype}")
        self.in_features = in_features
        self._H = torch.zeros(in_features, in_features, dtype=dtype, device=device)  # [in, in]
        self.n_tokens = 0

    def add(self, x: Tensor) -> None:
        """Add the tokens of ``x`` [..., in] (leading dimensions flattened)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got shape {tuple(x.shape)}")
        x = x.reshape(-1, self.in_features).to(device=self._H.device, dtype=self._H.dtype)  # [m, in]
        m = x.shape[0]
        if m == 0:
            return
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"calibration inputs hold {bad} NaN/inf values (of {x.numel()}); the layer's input is broken")
        self._H *= self.n_tokens / (self.n_tokens + m)
        self.n_tokens += m
        x = x * math.sqrt(2.0 / self.n_tokens)
        self._H.addmm_(x.T, x)

    def hessian(self) -> Tensor:
        """A copy of H [in, in] in the accumulation dtype."""
        if self.n_tokens == 0:
            raise ValueError("no inputs were added: the Hessian is undefined (did the layer ever run?)")
        return self._H.clone()


def check_problem(W: Tensor, H: Tensor) -> None:
    """Shapes and finiteness of a layer problem W [out, in], H [in, in]; raises ValueError."""
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    in_f = W.shape[1]
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"Hessian must be [in, in] = [{in_f}, {in_f}] for a weight of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    for name, t in (("weight", W), ("Hessian", H)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} of shape {tuple(t.shape)} holds {bad} NaN/inf values; refusing to quantize")


def prepare(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 copies with dead columns handled as in the GPTQ reference.

    Returns (W [out, in] with dead columns zeroed, H [in, in] with H_ii = 1 there, dead [in] bool).
    The caller's tensors are never modified.
    """
    check_problem(W, H)
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0  # [in]
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


def inverse_cholesky(H: Tensor, damp: float, max_damp: float = MAX_DAMP) -> tuple[Tensor, float]:
    """U upper-triangular with (H + λ·mean(diag H)·I)⁻¹ = UᵀU; returns (U [in, in], λ used).

    λ starts at ``damp`` and is multiplied by 10 while a factorization fails, up to ``max_damp``.
    """
    if not damp > 0:
        raise ValueError(f"damp must be positive (a fraction of mean(diag H)), got {damp!r}")
    n = H.shape[0]
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    lam = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + lam * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, lam
        if lam * 10 > max_damp * (1 + 1e-9):
            raise ValueError(
                f"the Hessian [{n}, {n}] is not positive definite even with damping {lam:g}·mean(diag H) "
                f"(mean diag {float(mean_diag):.3g}); use more calibration tokens or accumulate in float64"
            )
        log.warning("Cholesky failed with damping %g; retrying with %g", lam, lam * 10)
        lam *= 10
