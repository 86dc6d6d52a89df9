r"""Resampling for particle systems: pure functions ``(log_w, generator) -> indices``.

Each batch row holds ``N`` particles with log-weights ``log_w`` (any normalization; ``-inf`` is a
zero weight). A resampler draws ``N`` ancestor indices ``a_1..a_N`` per row such that the offspring
count ``O_i = #{j : a_j = i}`` is unbiased, ``E[O_i] = N W_i`` with ``W = softmax(log_w)``. All four
below are inverse-CDF draws ``a_j = F^{-1}(u_j)`` on the row's cumulative weights and differ only
in the uniforms ``u_j`` (Douc, Cappé & Moulines 2005, "Comparison of resampling schemes for
particle filtering"; Hol, Schön & Gustafsson 2006):

* multinomial:  ``u_j ~ U(0, 1)`` i.i.d.;
* stratified:   ``u_j = (j + U_j) / N``, ``U_j ~ U(0, 1)`` i.i.d.;
* systematic:   ``u_j = (j + U) / N``, one ``U ~ U(0, 1)`` per row;
* residual:     ``floor(N W_i)`` copies of particle ``i`` kept deterministically, the remaining
  ``R = N - sum_i floor(N W_i)`` drawn multinomially with weights ``N W_i - floor(N W_i)``.

Stratified and residual resampling have lower offspring variance than multinomial
(``Var O_i <= N W_i (1 - W_i)``); systematic is usually lowest in practice. The effective sample
size of a row is ``ESS = 1 / sum_i W_i^2 = exp(2 logsumexp(log_w) - logsumexp(2 log_w))``, between 1
and ``N`` (Kong, Liu & Wong 1994).

**Contract** of a resampler (the four below, or a callable passed as ``resampler=``):
``resampler(log_w, generator) -> indices``, ``log_w`` float64 ``(batch, N)``, ``indices`` an integer
tensor ``(batch, N)`` with entries in ``[0, N)`` (per row: row ``b``'s ancestors among its own ``N``
particles), which :func:`~steerdiff.smc.run_smc` checks. ``generator`` is what the run was given:
``None``, one ``torch.Generator``, or a list of ``batch`` of them, one per row (row ``b``'s uniforms
from ``generator[b]`` alone); :func:`steerdiff.noise.rand` / :func:`~steerdiff.noise.randn` draw
for all three (``torch.rand(generator=...)`` takes no list). A row whose weights are NaN or ``+inf``,
or all ``-inf``, has no distribution: for CPU tensors the four below refuse it, elsewhere (no device
read) they return indices in range that mean nothing, and ``run_smc`` reports the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import caller
from .._ops import first_false
from ..noise import Generators, check_generators, rand

__all__ = [
    "RESAMPLERS",
    "Resampler",
    "ess",
    "get",
    "indices_from_counts",
    "multinomial",
    "normalize",
    "offspring",
    "residual",
    "stratified",
    "systematic",
]

Resampler = Callable[[Tensor, Generators], Tensor]


def _check(who: str, log_w: Tensor, generator: Generators) -> None:
    """``log_w`` and ``generator`` as the contract has them, else a ``ValueError`` naming the resampler
    ``who`` and the argument."""
    if (
        not isinstance(log_w, Tensor)
        or log_w.ndim != 2
        or log_w.shape[1] < 1
        or not log_w.is_floating_point()
    ):
        shape = tuple(log_w.shape) if isinstance(log_w, Tensor) else type(log_w).__name__
        raise ValueError(
            f"{who}: log_w must be a floating (batch, particles) tensor with particles >= 1, got {shape}"
        )
    check_generators(who, generator, log_w.shape[0])
    if log_w.is_cpu:  # no device read elsewhere: the indices of such a row are in range but meaningless
        ok = torch.isfinite(torch.logsumexp(log_w, dim=-1))  # NaN, +inf and all -inf
        if not bool(ok.all()):
            raise ValueError(
                f"{who}: log_w has no distribution in row {first_false(ok)} (a NaN or +inf weight, or all "
                "-inf)"
            )


def normalize(log_w: Tensor) -> Tensor:
    """``log W = log_w - logsumexp(log_w)`` along the last (particle) dimension."""
    return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)


def ess(log_w: Tensor) -> Tensor:
    """Effective sample size per row, ``1 / sum_i W_i^2``, shape ``log_w.shape[:-1]``, in ``log_w``'s dtype.

    Computed relative to each row's largest log-weight: the two log-sums of the formula are each about
    ``2 max log_w``, and their difference would lose ``log_w``'s precision there (float32 log-weights
    near ``1e6``: 10% off)."""
    if not isinstance(log_w, Tensor):
        raise ValueError(f"ess: log_w must be a tensor of log-weights, got {type(log_w).__name__}")
    if not log_w.is_floating_point() or (log_w.ndim > 0 and log_w.shape[-1] == 0):
        raise ValueError(
            f"ess: log_w must be floating log-weights with particles >= 1 (the last dimension), got "
            f"{log_w.dtype} {tuple(log_w.shape)}"
        )
    top = log_w.amax(-1, keepdim=True)
    log_w = log_w - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.exp(2 * torch.logsumexp(log_w, dim=-1) - torch.logsumexp(2 * log_w, dim=-1))


def _inverse_cdf(log_w: Tensor, u: Tensor) -> Tensor:
    """``a_j = min{i : W_1 + ... + W_i > u_j}`` per row (``u`` in ``[0, 1)``), computed in float64.

    A zero weight adds nothing to the cumulative sum, so it is never selected; nor are the zero
    weights after the last positive one when ``u`` rounds up to the total (``(N - 1 + U) / N`` is 1.0
    for the largest ``U``; ``u * total`` can round to ``total``): the index is capped at the first one
    whose cumulative sum reaches the total, the last particle of positive weight.
    """
    w = torch.exp(normalize(log_w.to(torch.float64)))
    cum = w.cumsum(-1)
    total = cum[:, -1:].contiguous()  # searchsorted copies (and warns about) a non-contiguous input
    idx = torch.searchsorted(cum, u * total, right=True)
    last = torch.searchsorted(cum, total, right=False).clamp_(max=log_w.shape[1] - 1)
    return torch.minimum(idx, last)


def _uniform(log_w: Tensor, generator: Generators, cols: int | None = None) -> Tensor:
    rows, n = log_w.shape
    return rand((rows, n if cols is None else cols), generator, torch.float64, log_w.device)


def _strata(log_w: Tensor) -> Tensor:
    n = log_w.shape[1]
    return torch.arange(n, dtype=torch.float64, device=log_w.device)


def multinomial(log_w: Tensor, generator: Generators = None) -> Tensor:
    """``N`` i.i.d. draws from ``W`` per row: ``(batch, N)`` ancestor indices."""
    _check("multinomial", log_w, generator)
    return _inverse_cdf(log_w, _uniform(log_w, generator))


def stratified(log_w: Tensor, generator: Generators = None) -> Tensor:
    """One draw per stratum ``[j/N, (j+1)/N)``: ``u_j = (j + U_j) / N`` (Kitagawa 1996)."""
    _check("stratified", log_w, generator)
    n = log_w.shape[1]
    return _inverse_cdf(log_w, (_strata(log_w) + _uniform(log_w, generator)) / n)


def systematic(log_w: Tensor, generator: Generators = None) -> Tensor:
    """One shared uniform per row: ``u_j = (j + U) / N`` (Carpenter, Clifford & Fearnhead 1999)."""
    _check("systematic", log_w, generator)
    n = log_w.shape[1]
    return _inverse_cdf(log_w, (_strata(log_w) + _uniform(log_w, generator, cols=1)) / n)


def indices_from_counts(counts: Tensor) -> Tensor:
    """Ancestor indices ``(batch, N)`` (sorted) from offspring counts ``(batch, N)`` summing to ``N``."""
    cum = counts.cumsum(-1)
    slots = torch.arange(counts.shape[1], device=counts.device).expand_as(cum).contiguous()
    return torch.searchsorted(cum, slots, right=True)


FLOOR_TOL = 1e-9  # residual: N W_i this close below an integer is that integer (float round-off)


def residual(log_w: Tensor, generator: Generators = None) -> Tensor:
    """``floor(N W_i)`` copies of each particle, the ``R`` left drawn multinomially from the
    residual weights ``N W_i - floor(N W_i)`` (Liu & Chen 1998)."""
    _check("residual", log_w, generator)
    n = log_w.shape[1]
    nw = n * torch.exp(normalize(log_w.to(torch.float64)))
    # equal weights give N W_i = 0.99...9 for N = 9, 10, 100, ...: its floor, 0, would draw every
    # offspring at random; sum(kept) <= N still (N FLOOR_TOL < 1)
    kept = (nw + FLOOR_TOL).floor()
    left = n - kept.sum(-1, keepdim=True)  # R per row, (rows, 1)
    frac = (nw - kept).clamp_min(0)
    # rows with R = 0 have (up to round-off) no residual mass; a uniform placeholder keeps the draw
    # defined, and its draws are masked out below
    frac = torch.where(frac.sum(-1, keepdim=True) > 0, frac, torch.ones_like(frac))
    drawn = _inverse_cdf(frac.log(), _uniform(log_w, generator))
    use = torch.arange(n, device=log_w.device) < left  # the first R draws of each row
    counts = kept.to(torch.long).scatter_add(1, drawn, use.to(torch.long))
    return indices_from_counts(counts).clamp_(max=n - 1)  # NaN weights' garbage counts stay in range


def offspring(indices: Tensor, n: int | None = None) -> Tensor:
    """Offspring counts ``O_i = #{j : a_j = i}``, ``(batch, n)`` (``n`` defaults to ``indices.shape[1]``)."""
    n = indices.shape[1] if n is None else n
    return torch.zeros(indices.shape[0], n, dtype=torch.long, device=indices.device).scatter_add_(
        1, indices, torch.ones_like(indices)
    )


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "residual": residual,
    "stratified": stratified,
    "systematic": systematic,
}


def get(resampler: str | Resampler, who: str | None = None) -> Resampler:
    """Resolve a name (``multinomial``, ``residual``, ``stratified``, ``systematic``) or pass a
    callable ``(log_w, generator) -> indices`` through; anything else is a ``ValueError`` naming
    ``resampler`` (after ``who:``, the caller, where given)."""
    if isinstance(resampler, str) and resampler in RESAMPLERS:
        return RESAMPLERS[resampler]
    if callable(resampler) and not isinstance(resampler, str):
        return resampler
    prefix = caller(who)
    raise ValueError(
        f"{prefix}unknown resampler={resampler!r}; accepted: {sorted(RESAMPLERS)} "
        "or a callable (log_w, generator) -> indices"
    )
