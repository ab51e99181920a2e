"""BiLLM: ~1-bit post-training quantization — salient columns get two binary planes, the rest one.

Paper: Huang, Liu, Qin, Li, Zhang, Liu, Magno, Qi, "BiLLM: Pushing the Limit of Post-Training
Quantization for LLMs", ICML 2024 (arXiv 2402.04291); reference code Aaronhuang-778/BiLLM
(``bigptq.py``, ``binary.py``, ``utils/autosearch.py``). We implement the paper's Algorithm 1;
where the code differs from the paper we say which we follow and why.

Binarizing a set of weights x (one row of one block, restricted to a mask) means

    μ = mean(x),  b = sign(x - μ) ∈ {±1} (sign 0 -> +1),  α = mean|x - μ|,   x̂ = μ + α·b

α is the least-squares scale for those signs (the paper's α = ||x||₁/m, eq. 1). The paper writes
it without μ; its code (``high_order_residual``) subtracts the row mean first, and so do we by
default (``use_mean=True``; ``False`` gives the paper's formula). μ and α are per output row and
per block, and are rounded to fp16 before use, so what we store is what the algorithm used.

Per block of ``block_size`` (128) columns, left to right (paper, Algorithm 1):

1. **Salience** (Hessian-based, structured by column). With U = chol((H + λ·mean(diag H)·I)⁻¹)
   upper (``methods.hessian``), s_ij = w_ij² / U_jj², and column j scores Σ_i s_ij. U_jj² is
   the OBS inverse-Hessian diagonal [H_F⁻¹]_jj of the columns F not yet fixed, so s is the
   classic OBS saliency w²/[H⁻¹]_jj. The paper prints the denominator as "[H⁻¹]²_ii"; its code
   divides by the square of the Cholesky diagonal, i.e. what we do.
2. **How many salient columns**: for k = 1..``salient_search`` (the code's range(1, 50)), take
   the k top-scoring columns as one group and the rest as the other, residual-binarize both
   (two planes each, as the code's search does, so that candidates cost the same bits — with one
   plane for the rest the error falls with every added column and the search always takes the
   maximum), and keep the k with the least *salience-weighted* error Σ_ij (w_ij - ŵ_ij)² / U_jj².
   Deviation, and why: the code runs this search on the salience matrix s itself (binarizing the
   numbers w²/U_jj²), the paper writes a plain ||W - Ŵ||². Plain Frobenius ignores H and, on a
   test layer with outlier inputs, picks 49 columns per block (1.38 bits) with twice the output
   error; weighting the weight error by 1/U_jj² binarizes what is stored, measures it the way
   the salience does, and picks the few outlier-input columns (≈1.02 bits), as the code does.
3. **Residual binarization** of the salient columns: x̂ = (μ₁ + α₁b₁) + (μ₂ + α₂b₂), the second
   plane binarizing the residual x - (μ₁ + α₁b₁). Two sign bits per salient weight.
4. **Bell-shaped split** of the non-salient weights: a break-point p (one per block) divides them
   into concentrated |w| ≤ p and sparse |w| > p; each part is binarized on its own (own μ, α per
   row). p is searched over the quantiles 0.10, 0.11, …, 0.90 of |w| of the block's non-salient
   weights (the code's grid; ``split_search``), minimizing the same salience-weighted error over
   the non-salient weights. The split is on |w| as the paper describes (the code splits on the
   salience values, and takes quantiles over a matrix whose salient entries are zeros; splitting
   on salience gave a higher output error on the test layer: 0.171 vs 0.149).
5. **Error compensation** (OBC, as GPTQ but per block): the whole block is fixed at once to B_b,
   then E = (W_b - B_b)·U_bb⁻¹ and W[:, later] -= E·U[b, later]. The paper writes E = (W - B)/Hc;
   we read "/" as right division by the triangular block, which is exactly the OBS update for
   fixing the block jointly. The reference code divides elementwise by diag(U_bb), which ignores
   the block's off-diagonal couplings (an approximation). Columns inside a block do not compensate
   each other (the block's scales need all its columns at once) — as in the paper.

Storage (``BinarizedWeight``; ``to_tensors`` packs it for a checkpoint):

    sign          [out, in]  1 bit: first plane b₁ of every weight (True = +1)
    residual_sign [out, n_salient_columns] 1 bit: b₂ of salient weights
    sparse        [out, in - n_salient_columns] 1 bit: non-salient weight in the sparse group
    salient       [in] 1 bit: salient columns (structured, hence cheap)
    alpha, mean   [out, n_blocks, 4] fp16: (salient plane 1, salient plane 2, concentrated, sparse)

Bits per weight, two ways. ``avg_bits`` is the paper's (and the study's) count: 1 + salient
second-plane bits / total ≈ 1.05–1.1 — it ignores the split mask and the scales. ``storage_bits``
counts everything ``to_tensors`` stores: the split mask alone is another ~1 bit per non-salient
weight, and 8 fp16 numbers per row per 128-column block another 1 bit, so real storage is ~3 bits
per weight. A kernel that avoids the split mask (e.g. by storing the sparse group as an index
list) could do better; nothing here pretends to.

Cost. The two searches try 49 + 81 candidates per block; each candidate's error is computed
without materializing it: the salient count on cache-sized slices in salience order
(``_salient_count_errors``), the break point in closed form from per-row prefix sums
(``_break_point_errors``). Both are tested against the plain masked binarization
(tests/test_gptq_billm.py). SmolLM2-135M, 16×512 calibration, 2 CPU cores: 138 s per model,
of which ~60 s are the calibration forwards (the masked, batched version took 320 s).

Measured on the test layer (tests/test_gptq_billm.py): exact block feedback 0.149 relative output
error vs 0.153 with the code's diagonal division.

Known limits: the block's own columns are binarized without intra-block feedback; the count and
break-point searches are greedy (k first, then p) and measure a diagonal approximation of the
output error; float32; the split mask makes real storage ~3 bits per weight (see above).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qwenquant.methods.hessian import inverse_cholesky, prepare
from qwenquant.numerics.affine import SCALE_DTYPE
from qwenquant.numerics.packing import pack, unpack

# Slots of the last axis of BinarizedWeight.alpha / .mean.
SALIENT_1, SALIENT_2, CONCENTRATED, SPARSE = 0, 1, 2, 3
N_SLOTS = 4



@dataclass(frozen=True)
class BiLLMConfig:
    block_size: int = 128  # columns per block: salience, split and scales are per block
    damp: float = 0.01  # fraction of mean(diag H) added before the Cholesky
    salient_search: int = 49  # salient columns per block tried: 1..salient_search (code: range(1, 50))
    split_search: tuple[float, float, int] = (0.10, 0.90, 81)  # break-point quantiles of |w|: lo, hi, count
    use_mean: bool = True  # binarize around the per-row mean (the code) instead of around 0 (the paper's eq. 1)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {self.block_size!r}")
        if not self.damp > 0:
            raise ValueError(f"damp must be positive, got {self.damp!r}")
        if not isinstance(self.salient_search, int) or self.salient_search < 1:
            raise ValueError(f"salient_search must be a positive integer, got {self.salient_search!r}")
        lo, hi, n = self.split_search
        if not (0.0 <= lo <= hi <= 1.0) or not isinstance(n, int) or n < 1:
            raise ValueError(f"split_search must be (lo, hi, count) with 0 <= lo <= hi <= 1 and count >= 1, got {self.split_search!r}")


def _pad8(x: Tensor) -> Tensor:
    """Pad the last dimension with zeros to a multiple of 8 (whole bytes when packed at 1 bit)."""
    pad = -x.shape[-1] % 8
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def _ceil8(n: int) -> int:
    return n + (-n % 8)


@dataclass
class BinarizedWeight:
    """A BiLLM weight: sign planes, masks and per-row-per-block scales (see the module docstring).

    sign:          [out, in] bool, first plane (True = +1) for every weight
    residual_sign: [out, in] bool, second plane; used on salient columns only (False elsewhere)
    sparse:        [out, in] bool, True where a non-salient weight is in the sparse group (|w| > p)
    salient:       [in] bool, salient columns
    alpha, mean:   [out, n_blocks, 4] float32 holding fp16-representable values; slots
                   SALIENT_1, SALIENT_2, CONCENTRATED, SPARSE; mean is all zero without use_mean
    block_size:    columns per block (the last block may be narrower)
    """

    sign: Tensor
    residual_sign: Tensor
    sparse: Tensor
    salient: Tensor
    alpha: Tensor
    mean: Tensor
    block_size: int
    with_mean: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.sign.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ [out, in]: μ + α·b for the weight's group, plus the second plane on salient columns."""
        out_f, in_f = self.shape
        blk = torch.arange(in_f, device=self.sign.device) // self.block_size  # [in]
        a = self.alpha[:, blk, :]  # [out, in, 4]
        m = self.mean[:, blk, :]
        b1 = self.sign.float() * 2 - 1  # [out, in] ±1
        b2 = self.residual_sign.float() * 2 - 1
        sal = self.salient.unsqueeze(0).expand(out_f, in_f)
        slot = torch.where(sal, SALIENT_1, torch.where(self.sparse, SPARSE, CONCENTRATED)).unsqueeze(-1)  # [out, in, 1]
        w = m.gather(-1, slot).squeeze(-1) + a.gather(-1, slot).squeeze(-1) * b1
        second = m[..., SALIENT_2] + a[..., SALIENT_2] * b2
        w = torch.where(sal, w + second, w)
        return w.to(dtype)

    @property
    def n_salient_columns(self) -> int:
        return int(self.salient.sum())

    @property
    def avg_bits(self) -> float:
        """The paper's count: 1 sign bit per weight + 1 residual bit per salient weight."""
        return 1.0 + self.n_salient_columns / self.shape[1]

    @property
    def storage_bits(self) -> float:
        """Bits per weight of everything :meth:`to_tensors` stores (planes, masks, scales, means)."""
        out_f, in_f = self.shape
        n_sal = self.n_salient_columns
        bits = out_f * _ceil8(in_f)  # sign
        bits += out_f * _ceil8(n_sal)  # residual sign, salient columns
        bits += out_f * _ceil8(in_f - n_sal)  # split mask, non-salient columns
        bits += _ceil8(in_f)  # salient column mask
        bits += self.alpha.numel() * 16 * (2 if self.with_mean else 1)
        return bits / (out_f * in_f)

    def meta(self) -> dict:
        """The non-tensor facts :meth:`from_tensors` needs (JSON-serializable)."""
        return {"block_size": self.block_size}

    def to_tensors(self) -> dict[str, Tensor]:
        """Storage tensors, bit planes packed with ``numerics.packing.pack(bits=1)`` (rows padded to bytes).

        sign [out, ceil8(in)/8] u8; residual_sign [out, ceil8(n_sal)/8] u8 (salient columns, in order);
        sparse_mask [out, ceil8(in-n_sal)/8] u8 (non-salient columns, in order); salient_cols
        [ceil8(in)/8] u8; alpha [out, n_blocks, 4] f16; mean (only with use_mean) same.
        The block size travels in :meth:`meta`.
        """
        sal = self.salient
        t = {
            "sign": pack(_pad8(self.sign.to(torch.uint8)), 1),
            "residual_sign": pack(_pad8(self.residual_sign[:, sal].to(torch.uint8)), 1),
            "sparse_mask": pack(_pad8(self.sparse[:, ~sal].to(torch.uint8)), 1),
            "salient_cols": pack(_pad8(sal.to(torch.uint8)), 1),
            "alpha": self.alpha.to(SCALE_DTYPE),
        }
        if self.with_mean:
            t["mean"] = self.mean.to(SCALE_DTYPE)
        return t

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], shape: tuple[int, int], meta: dict) -> BinarizedWeight:
        """Inverse of :meth:`to_tensors` for a weight of ``shape`` = (out, in) and ``meta`` = :meth:`meta`."""
        out_f, in_f = shape
        block_size = int(meta["block_size"])
        n_blocks = -(-in_f // block_size)
        if tuple(t["alpha"].shape) != (out_f, n_blocks, N_SLOTS):
            raise ValueError(f"alpha has shape {tuple(t['alpha'].shape)}, expected {(out_f, n_blocks, N_SLOTS)} "
                             f"for a [{out_f}, {in_f}] weight in blocks of {block_size}")
        sal = unpack(t["salient_cols"], 1, _ceil8(in_f))[:in_f].bool()  # [in]
        n_sal = int(sal.sum())
        sign = unpack(t["sign"], 1, _ceil8(in_f))[:, :in_f].bool()
        residual = torch.zeros(out_f, in_f, dtype=torch.bool, device=sign.device)
        residual[:, sal] = unpack(t["residual_sign"], 1, _ceil8(n_sal))[:, :n_sal].bool()
        sparse = torch.zeros(out_f, in_f, dtype=torch.bool, device=sign.device)
        sparse[:, ~sal] = unpack(t["sparse_mask"], 1, _ceil8(in_f - n_sal))[:, : in_f - n_sal].bool()
        alpha = t["alpha"].float()
        with_mean = "mean" in t
        mean = t["mean"].float() if with_mean else torch.zeros_like(alpha)
        return cls(sign=sign, residual_sign=residual, sparse=sparse, salient=sal, alpha=alpha, mean=mean,
                   block_size=block_size, with_mean=with_mean)


def _round16(x: Tensor) -> Tensor:
    return x.to(SCALE_DTYPE).float()


def _binarize(x: Tensor, mask: Tensor, use_mean: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Binarize each row of ``x`` [..., out, n] over ``mask`` (broadcastable bool).

    Returns (x̂ [..., out, n], zero off the mask; plane b >= 0 as bool; α [..., out, 1]; μ [..., out, 1]),
    μ and α fp16-representable. An empty row gets α = μ = 0.
    """
    m = mask.to(x.dtype)
    cnt = m.sum(-1, keepdim=True).clamp(min=1)
    xm = x * m
    mu = _round16(xm.sum(-1, keepdim=True) / cnt) if use_mean else torch.zeros_like(xm[..., :1])
    pos = (x - mu) >= 0
    b = torch.where(pos, 1.0, -1.0)
    alpha = _round16(((x - mu) * b * m).sum(-1, keepdim=True) / cnt)
    return (mu + alpha * b) * m, pos, alpha, mu


def _residual_binarize(x: Tensor, mask: Tensor, use_mean: bool) -> tuple[Tensor, tuple, tuple]:
    r1, p1, a1, m1 = _binarize(x, mask, use_mean)
    r2, p2, a2, m2 = _binarize(x - r1, mask, use_mean)
    return r1 + r2, (p1, a1, m1), (p2, a2, m2)


def _quantiles(v: Tensor, q: Tensor) -> Tensor:
    """Linear-interpolated quantiles of a 1-D tensor (numpy's default), without torch.quantile's size limit."""
    s, _ = torch.sort(v)
    pos = q * (s.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _two_plane_error(X: Tensor, wt: Tensor, use_mean: bool) -> Tensor:
    """Σ_ij wt_j (x_ij - x̂_ij)² after residual-binarizing every row of X [out, c] over all its columns.

    The same numbers as ``_residual_binarize`` with a full mask, in fewer passes: with d = x - μ₁
    and plane-one residual r = d - α₁·sign(d), the second plane leaves d₂ = r - μ₂ and
    x - x̂ = d₂ - α₂·sign(d₂), whose square is (|d₂| - α₂)².
    """
    d = X - _round16(X.mean(-1, keepdim=True)) if use_mean else X
    ad = d.abs()
    a1 = _round16(ad.mean(-1, keepdim=True))
    r = torch.where(d >= 0, d - a1, d + a1)
    d2 = r - _round16(r.mean(-1, keepdim=True)) if use_mean else r
    ad2 = d2.abs()
    a2 = _round16(ad2.mean(-1, keepdim=True))
    return ((ad2 - a2).pow_(2) * wt).sum()


def _salient_count_errors(Wb: Tensor, wt: Tensor, order: Tensor, k_max: int, use_mean: bool) -> Tensor:
    """[k_max]: for k in 1..k_max, the error Σ wt_j (W_b - Ŵ_b)² when the k first columns of ``order``
    are salient; the search takes the k minimizing it. Σ wt_j (W_b - Ŵ_b)² with both column groups residual-binarized.

    ``wt`` [n] = 1/U_jj² makes the error the salience of the error (see the module docstring).
    Both groups get two planes here, as in the reference code: the search then compares
    partitions at equal bit cost instead of buying error with residual bits (which always wins).
    With the columns in salience order the groups are the slices [:k] and [k:], binarized
    without masks (small tensors that stay in cache: ~3× faster than one masked [k_max, out, n]
    batch on 2 CPU cores).
    """
    Ws, ws = Wb[:, order], wt[order]  # [out, n], [n] by falling salience
    return torch.stack([_two_plane_error(Ws[:, :k], ws[:k], use_mean) + _two_plane_error(Ws[:, k:], ws[k:], use_mean)
                        for k in range(1, k_max + 1)])


def _range_sum(P: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Σ over sorted positions [a, b) per row, from prefix sums P [out, m+1] (P[:, 0] = 0); a, b [out, C]."""
    return P.gather(1, b) - P.gather(1, a)


def _ranges_binarize_error(prefix: dict[str, Tensor], xs: Tensor, ranges: list[tuple[Tensor, Tensor]],
                           use_mean: bool) -> Tensor:
    """Per row and candidate, Σ wt (x - x̂)² for one binarization plane over a union of sorted ranges.

    xs [out, m] is each row sorted by value, ``prefix`` its prefix sums (keys n, x, w, wx, wxx, each
    [out, m+1], float64), ``ranges`` a list of (a, b) index pairs [out, C] (C candidates). With
    μ and α of the set (fp16-rounded, as ``_binarize`` stores them), the plane's error is
    Σ wt (|x-μ| - α)² = Σwt(x-μ)² - 2α·Σwt|x-μ| + α²·Σwt, and every sum splits at the position t
    where the sorted row crosses μ: sums of x and wt on each side come from the prefix sums.
    Returns [C], summed over rows.
    """
    S = lambda key, a, b: sum(_range_sum(prefix[key], ai, bi) for ai, bi in zip(a, b))  # noqa: E731
    a = [r[0] for r in ranges]
    b = [r[1] for r in ranges]
    cnt = S("n", a, b)
    safe = cnt.clamp(min=1)
    mu = _round16((S("x", a, b) / safe).float()).double() if use_mean else torch.zeros_like(cnt)
    t = torch.searchsorted(xs, mu.float().contiguous(), right=False)  # first position with x >= μ
    c = [torch.minimum(torch.maximum(t, ai), bi) for ai, bi in zip(a, b)]  # split of each range at μ
    lo_n, hi_n = S("n", a, c), S("n", c, b)
    abs_dev = (S("x", c, b) - mu * hi_n) + (mu * lo_n - S("x", a, c))  # Σ|x - μ|
    alpha = _round16((abs_dev / safe).float()).double()
    w_abs_dev = (S("wx", c, b) - mu * S("w", c, b)) + (mu * S("w", a, c) - S("wx", a, c))  # Σ wt|x - μ|
    w_sq_dev = S("wxx", a, b) - 2 * mu * S("wx", a, b) + mu * mu * S("w", a, b)  # Σ wt (x - μ)²
    err = w_sq_dev - 2 * alpha * w_abs_dev + alpha * alpha * S("w", a, b)
    return torch.where(cnt > 0, err, torch.zeros_like(err)).sum(0)


def _break_point_errors(Wb: Tensor, wt: Tensor, nonsal: Tensor, qs: Tensor, use_mean: bool) -> tuple[Tensor, Tensor]:
    """(candidates [P], errors [P]): break-points p, the quantiles ``qs`` of |w| over the non-salient
    entries, and Σ wt_j (w - ŵ)² over the non-salient weights for each; the search takes the least.

    Closed form instead of binarizing once per candidate: with each row's non-salient weights
    sorted by value, the concentrated group |w| <= p is one index range and the sparse group two
    (the tails), so each candidate's error comes from prefix sums in O(log n) per row
    (``_ranges_binarize_error``; float64 sums, ~1e-9 relative to a direct float32 evaluation).
    """
    Xn = Wb[:, nonsal.view(-1)]  # [out, m]
    wn = wt[nonsal.view(-1)]  # [m]
    cands = _quantiles(Xn.abs().reshape(-1), qs)  # [P]
    xs, idx = torch.sort(Xn, dim=1)
    w = wn[idx].double()  # [out, m]
    x = xs.double()
    zero = torch.zeros(xs.shape[0], 1, dtype=torch.float64, device=xs.device)
    prefix = {k: torch.cat([zero, v.cumsum(1)], 1)
              for k, v in {"n": torch.ones_like(x), "x": x, "w": w, "wx": w * x, "wxx": w * x * x}.items()}
    out_f, m = xs.shape
    P = cands.numel()
    lo = torch.searchsorted(xs, (-cands).expand(out_f, P).contiguous(), right=False)  # first x >= -p
    hi = torch.searchsorted(xs, cands.expand(out_f, P).contiguous(), right=True)  # first x > p
    start = torch.zeros_like(lo)
    end = torch.full_like(lo, m)
    err = (_ranges_binarize_error(prefix, xs, [(lo, hi)], use_mean)
           + _ranges_binarize_error(prefix, xs, [(start, lo), (hi, end)], use_mean))
    return cands, err


def _billm(W: Tensor, H: Tensor, cfg: BiLLMConfig) -> tuple[BinarizedWeight, Tensor]:
    """The algorithm; returns the weight and the float32 Ŵ [out, in] its error feedback assumed."""
    W, H, _dead = prepare(W, H)  # float32 copies; dead columns zeroed
    out_f, in_f = W.shape
    U, _ = inverse_cholesky(H, cfg.damp)  # warns if damping had to grow
    del H
    dU = torch.diagonal(U)  # [in]; dU_j² = [H_F⁻¹]_jj
    n_blocks = -(-in_f // cfg.block_size)
    lo, hi, n_q = cfg.split_search
    qs = torch.linspace(lo, hi, n_q, device=W.device)

    Q = torch.zeros_like(W)  # [out, in] binarized weights
    sign = torch.zeros(out_f, in_f, dtype=torch.bool, device=W.device)
    residual = torch.zeros_like(sign)
    sparse = torch.zeros_like(sign)
    salient = torch.zeros(in_f, dtype=torch.bool, device=W.device)
    alpha = torch.zeros(out_f, n_blocks, N_SLOTS, device=W.device)
    mean = torch.zeros_like(alpha)

    for bi, b0 in enumerate(range(0, in_f, cfg.block_size)):
        b1 = min(b0 + cfg.block_size, in_f)
        n = b1 - b0
        Wb = W[:, b0:b1]  # [out, n], already compensated for the earlier blocks
        wt = dU[b0:b1].pow(-2)  # [n] 1/[H_F⁻¹]_jj
        score = (Wb.pow(2) * wt).sum(0)  # [n] column salience Σ_i w_ij²/[H_F⁻¹]_jj
        order = torch.argsort(score, descending=True)
        k_max = min(cfg.salient_search, n - 1)  # leave at least one non-salient column
        k = int(torch.argmin(_salient_count_errors(Wb, wt, order, k_max, cfg.use_mean))) + 1 if k_max >= 1 else 0
        sal = torch.zeros(n, dtype=torch.bool, device=W.device)
        sal[order[:k]] = True
        sal_m = sal.unsqueeze(0)  # [1, n]
        nonsal = ~sal_m

        r_sal, (p1, a1, m1), (p2, a2, m2) = _residual_binarize(Wb, sal_m, cfg.use_mean)
        cands, errs = _break_point_errors(Wb, wt, nonsal, qs, cfg.use_mean)
        p = cands[torch.argmin(errs)]
        conc = (Wb.abs() <= p) & nonsal
        spar = (Wb.abs() > p) & nonsal
        r_c, pc, ac, mc = _binarize(Wb, conc, cfg.use_mean)
        r_s, ps, as_, ms = _binarize(Wb, spar, cfg.use_mean)
        Qb = r_sal + r_c + r_s  # [out, n]; the three masks partition the block

        sign[:, b0:b1] = torch.where(sal_m, p1, torch.where(spar, ps, pc))
        residual[:, b0:b1] = p2 & sal_m
        sparse[:, b0:b1] = spar
        salient[b0:b1] = sal
        for slot, a, m in ((SALIENT_1, a1, m1), (SALIENT_2, a2, m2), (CONCENTRATED, ac, mc), (SPARSE, as_, ms)):
            alpha[:, bi, slot] = a.squeeze(-1)
            mean[:, bi, slot] = m.squeeze(-1)
        Q[:, b0:b1] = Qb

        # OBS update for fixing the whole block: E U_bb = W_b - Q_b, later columns -= E U_b,later.
        E = torch.linalg.solve_triangular(U[b0:b1, b0:b1], Wb - Qb, upper=True, left=False)
        W[:, b1:] -= E @ U[b0:b1, b1:]

    if not (torch.isfinite(alpha).all() and torch.isfinite(mean).all()):
        raise ValueError("a BiLLM scale or mean overflowed float16 (|w| > 65504?); the weight is out of range")
    bw = BinarizedWeight(sign=sign, residual_sign=residual, sparse=sparse, salient=salient, alpha=alpha,
                         mean=mean, block_size=cfg.block_size, with_mean=cfg.use_mean)
    return bw, Q


def billm_quantize(W: Tensor, H: Tensor, cfg: BiLLMConfig) -> BinarizedWeight:
    """W [out, in], H [in, in] (2/n XᵀX) -> BinarizedWeight."""
    return _billm(W, H, cfg)[0]
