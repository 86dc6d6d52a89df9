"""Exact references for the masked-diffusion tests: a small mixture of product-of-categoricals, the
total-variation floor of exact samples, and the exact law of the ancestral sampler's output by matrix
propagation over every partly masked sequence (independent of the sampler's code)."""

from __future__ import annotations

import itertools
import math

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


def ancestral_law(
    mix: sd.toy.CategoricalMixture,
    process: sd.discrete.MaskedProcess,
    steps: int,
    eta: float = 0.0,
    strategy: str = "cap",
    t_on: float = 0.55,
    t_off: float = 0.05,
    alpha_on: float = 0.9,
) -> Tensor:
    """The exact law over clean sequences (in :meth:`~steerdiff.toy.CategoricalMixture.table` order) of
    the ancestral sampler (``eta = 0``) or ReMDM (``eta``, ``strategy``) with ``mix``'s exact denoiser, from
    the all-masked sequence: the state's law over every partly masked sequence propagated through ``steps``
    transition matrices. A step moves the positions independently given the state ``x``: an unmasked token
    is masked with probability ``sigma`` (kept otherwise), a masked one becomes ``v`` with probability
    ``c p(x_0^j = v | x)``, ``c = (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t)``, and stays masked
    otherwise; ``sigma = min(eta, sigma_max)`` (cap) or ``eta sigma_max`` (rescale), ``sigma_max = min(1,
    (1 - alpha_s) / alpha_t)``. ``"loop"``: with ``T`` the process time of ``alpha_on``, the grid time
    ``u`` is read as the process time ``T + (u - t_on) (1 - T) / (1 - t_on)`` above ``t_on``, ``T`` in
    ``[t_off, t_on]`` (alpha held at ``alpha_on``), ``u T / t_off`` below ``t_off``; a step with both ends
    in ``[t_off, t_on]`` (not the last) has ``sigma = min(eta, sigma_max)``, every other step ``sigma =
    0``."""
    L, V = mix.L, mix.V
    x = states(L, V)
    masked = x == V
    cond = mix.conditional_log_probs(x, V).exp()  # (S, L, V)
    keep = torch.nn.functional.one_hot(x, V + 1).to(F64)
    mask_col = torch.nn.functional.one_hot(torch.tensor(V), V + 1).to(F64)
    law = masked.all(-1).to(F64)

    hold = float(process.t_of_alpha(torch.tensor(alpha_on, dtype=F64)))

    def alpha(u: float) -> float:
        if strategy == "loop":
            u = (
                hold + (u - t_on) * (1 - hold) / (1 - t_on)
                if u > t_on
                else hold
                if u >= t_off
                else u * hold / t_off
            )
        return float(process.alpha(torch.tensor(u, dtype=F64)))

    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        a_t, a_s = alpha(t), 1.0 if i == steps - 1 else alpha(s)
        sigma_max = min(1.0, (1 - a_s) / a_t) if a_t > 0 else 1.0
        if strategy == "loop":
            sigma = min(eta, sigma_max) if t_off <= s and t <= t_on and i < steps - 1 else 0.0
        else:
            sigma = min(eta, sigma_max) if strategy == "cap" else eta * sigma_max
        c = (a_s - (1 - sigma) * a_t) / (1 - a_t)
        unmasking = torch.cat([c * cond, torch.full((len(x), L, 1), 1 - c, dtype=F64)], dim=-1)
        per_pos = torch.where(masked[..., None], unmasking, (1 - sigma) * keep + sigma * mask_col)
        step = torch.ones(len(x), len(x), dtype=F64)
        for j in range(L):
            step *= per_pos[:, j, x[:, j]]
        law = law @ step
    clean = ~masked.any(-1)
    return law[clean]  # base-(V+1) order restricted to digits < V is base-V order


def first_hitting_law(den: sd.discrete.MaskedDenoiser, L: int, V: int) -> Tensor:
    """The exact law over clean sequences (``table`` order) of ``first_hitting`` with one step per token
    from the all-masked sequence, for a denoiser ``den`` that does not depend on ``t`` (called at ``t =
    0.5``): the positions are unmasked in a uniformly random order, each token drawn from ``den``'s law
    given those before, so the law is the average over the ``L!`` orders of the products of ``den``'s
    conditionals along each sequence. Summed over the orders by recursion over the sets ``S`` of unmasked
    positions, ``f(S) = sum_{j in S} f(S - j) p(x^j | x^{S - j})``, one call of ``den`` per set
    (independent of the sampler's code)."""
    xs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    rows = torch.arange(len(xs))[:, None]
    cond = []  # cond[S]: p(x^j | x^S) (n, L), the positions in the bit set S unmasked
    for s in range(2**L):
        known = torch.tensor([bool(s >> j & 1) for j in range(L)])
        x = torch.where(known, xs, den.process.mask_id)
        cond.append(den.log_probs(x, torch.tensor(0.5)).exp()[rows, torch.arange(L), xs])
    f = [torch.ones(len(xs), dtype=F64)]
    for s in range(1, 2**L):
        f.append(sum(f[s ^ 1 << j] * cond[s ^ 1 << j][:, j] for j in range(L) if s >> j & 1))
    return f[-1] / math.factorial(L)
