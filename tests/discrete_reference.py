"""Exact references for the masked-diffusion tests: a small mixture of product-of-categoricals, the
total-variation floor of exact samples, and the exact law of the ancestral sampler's output by matrix
propagation over every partly masked sequence (independent of the sampler's code)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

import steerdiff as sd

F64 = torch.float64


def mixture(L: int = 5, V: int = 3, K: int = 3, seed: int = 0) -> sd.toy.CategoricalMixture:
    """``K`` peaked components (``u^4 + 0.02`` probabilities): strongly correlated tokens, so that drawing
    them independently (ancestral with few steps) is far from the law."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(K, generator=g, dtype=F64) + 0.5
    probs = torch.rand(K, L, V, generator=g, dtype=F64) ** 4 + 0.02
    return sd.toy.CategoricalMixture(weights, probs)


def tv(counts_of: Tensor, p: Tensor) -> float:
    """``(1/2) sum |p_hat - p|`` of the empirical law of the integer codes ``counts_of`` against ``p``."""
    counts = torch.bincount(counts_of, minlength=len(p)).to(F64)
    return 0.5 * float((counts / len(counts_of) - p).abs().sum())


def tv_floor(p: Tensor, n: int, sets: int = 20, seed: int = 123) -> tuple[float, float]:
    """Mean and standard deviation of the TV distance to ``p`` of ``n`` exact draws from ``p``, over
    ``sets`` sets: the distance a sampler of the exact law shows at this sample size."""
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor([tv(torch.multinomial(p, n, replacement=True, generator=g), p) for _ in range(sets)])
    return float(d.mean()), float(d.std())


def states(L: int, V: int) -> Tensor:
    """Every sequence of length ``L`` over ``0..V`` (``V`` the mask), ``((V+1)^L, L)``, in base-``(V+1)``
    order."""
    return torch.tensor(list(itertools.product(range(V + 1), repeat=L)))


def ancestral_law(mix: sd.toy.CategoricalMixture, process: sd.discrete.MaskedProcess, steps: int) -> Tensor:
    """The exact law over clean sequences (in :meth:`~steerdiff.toy.CategoricalMixture.table` order) of
    the ancestral sampler with ``mix``'s exact denoiser: the state's law over every partly masked
    sequence propagated through ``steps`` transition matrices. From ``x`` with ``n(x)`` masked positions
    to ``y`` (which keeps ``x``'s tokens and unmasks ``k = n(x) - n(y)`` of its masks) the step has
    probability ``c^k (1 - c)^{n(y)} prod_{j unmasked} p(y^j | x)``, with
    ``c = (alpha_s - alpha_t) / (1 - alpha_t)``."""
    L, V = mix.L, mix.V
    x = states(L, V)
    masked = x == V
    cond = mix.conditional_log_probs(x, V).exp()  # (S, L, V)
    per_pos = torch.cat([cond, torch.ones(len(x), L, 1, dtype=F64)], dim=-1)  # a mask stays: factor 1
    keep = torch.nn.functional.one_hot(x, V + 1).to(F64)  # an unmasked token stays
    per_pos = torch.where(masked[..., None], per_pos, keep)
    g = torch.ones(len(x), len(x), dtype=F64)
    for j in range(L):
        g *= per_pos[:, j, x[:, j]]
    n = masked.sum(-1)
    k = (n[:, None] - n[None, :]).clamp(min=0).to(F64)
    law = (masked.all(-1)).to(F64)
    for i in range(steps):
        a_t = float(process.alpha(torch.tensor(1 - i / steps)))
        a_s = 1.0 if i == steps - 1 else float(process.alpha(torch.tensor(1 - (i + 1) / steps)))
        c = (a_s - a_t) / (1 - a_t)
        law = law @ (g * c**k * (1 - c) ** n[None, :].to(F64))
    clean = ~masked.any(-1)
    return law[clean]  # base-(V+1) order restricted to digits < V is base-V order
