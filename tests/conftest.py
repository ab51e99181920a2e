import pytest
import torch


def outlier_layer(tokens: int = 2048, d_in: int = 512, d_out: int = 256, seed: int = 0):
    """A linear problem like an LLM's: correlated inputs with a few huge channels.

    X = Z A (random mixing: correlated channels), then 8 channels scaled x30 (activation
    outliers, as SmoothQuant/AWQ describe); W random with row-wise scale spread.
    Returns (X [tokens, d_in], W [d_out, d_in]).
    """
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, d_in, generator=g)
    A = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=g) / d_in**0.5
    X = Z @ A
    idx = torch.randperm(d_in, generator=g)[:8]
    X[:, idx] *= 30.0
    W = torch.randn(d_out, d_in, generator=g) * (0.5 + torch.rand(d_out, 1, generator=g)) / d_in**0.5
    return X, W


@pytest.fixture
def layer_problem():
    return outlier_layer()


def rel_output_error(X, W, W_hat, X_hat=None) -> float:
    ref = X.double() @ W.double().T
    out = (X if X_hat is None else X_hat).double() @ W_hat.double().T
    return float((out - ref).norm() / ref.norm())
