"""Exact references for the discrete-diffusion tests: a small mixture of product-of-categoricals, the
total-variation floor of exact samples, and the exact laws of the samplers' outputs (ancestral, masked and
uniform, and SGDD) by matrix propagation over every (partly masked) sequence, independent of the samplers'
code."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

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


def sequences(L: int, V: int) -> Tensor:
    """Every sequence of length ``L`` over ``0..V-1``, ``(V^L, L)``, in the order of ``table()``."""
    return torch.tensor(list(itertools.product(range(V), repeat=L)))


def kernel(alpha: float, V: int) -> Tensor:
    """``Q[u, v] = q(x_t = u | x_0 = v) = alpha [u = v] + (1 - alpha) / V``."""
    return alpha * torch.eye(V, dtype=F64) + (1 - alpha) / V


def brute_posterior(mix: sd.toy.CategoricalMixture, x_t: Tensor, alpha: float) -> Tensor:
    """``p(x_0^j = v | x_t)`` ``(n, L, V)`` by enumerating every clean sequence: ``p(x_0) prod_i
    Q[x_t^i, x_0^i]`` normalized, then marginalized per position."""
    X = sequences(mix.L, mix.V)
    p0 = mix.table()
    Q = kernel(alpha, mix.V)
    w = p0 * Q[x_t[:, None, :], X[None]].prod(-1)  # (n, S)
    w = w / w.sum(-1, keepdim=True)
    return torch.einsum("ns,slv->nlv", w, torch.nn.functional.one_hot(X, mix.V).to(F64))


def uniform_ancestral_law(
    mix: sd.toy.CategoricalMixture, process: sd.discrete.UniformProcess, steps: int
) -> Tensor:
    """The exact law over clean sequences of ``steps`` ancestral steps with the exact denoiser, from the
    uniform law at ``t = 1``: the state's law propagated through transition matrices built by Bayes' rule
    on the kernels, ``q(x_s = k | x_t = j, x_0 = v) = Q_{t|s}[j, k] Q_s[k, v] / Q_t[j, v]``, averaged over
    the brute-force posterior of every position, the positions independent given the state."""
    law = torch.full((mix.V**mix.L,), 1.0 / mix.V**mix.L, dtype=F64)
    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        a_s = 1.0 if i == steps - 1 else float(process.alpha(torch.tensor(s, dtype=F64)))
        law = law @ uniform_step_matrix(mix, float(process.alpha(torch.tensor(t, dtype=F64))), a_s)
    return law


def uniform_step_matrix(mix: sd.toy.CategoricalMixture, a_t: float, a_s: float) -> Tensor:
    """The transition matrix ``(S from, S to)`` over clean sequences of one uniform-noise ancestral step from
    ``alpha = a_t`` to ``a_s`` with the exact denoiser: Bayes' rule on the kernels, ``q(x_s = k | x_t = j,
    x_0 = v) = Q_{t|s}[j, k] Q_s[k, v] / Q_t[j, v]``, averaged over the brute-force posterior of every
    position, the positions independent given the state."""
    L, V = mix.L, mix.V
    X = sequences(L, V)
    Q_t, Q_s, Q_ts = kernel(a_t, V), kernel(a_s, V), kernel(a_t / a_s, V)
    post = brute_posterior(mix, X, a_t)  # (S, L, V): over x_0^j
    # per position: p(x_s^j = k | x_t) = sum_v post[v] Q_ts[j, k] Q_s[k, v] / Q_t[j, v]
    step = torch.einsum("slv,slk,kv,slv->slk", post, Q_ts[X], Q_s, 1 / Q_t[X])
    return step[:, torch.arange(L), X].prod(-1)


def sgdd_law(
    mix: sd.toy.CategoricalMixture,
    process: sd.discrete.UniformProcess,
    log_likelihood: Callable[[Tensor], Tensor],
    iterations: int,
    denoise_steps: int,
    mh_steps: int,
    t_min: float,
) -> Tensor:
    """The exact law over clean sequences of SGDD's output with ``mix``'s exact denoiser: from the uniform
    law, at each annealing time ``t_i`` (linear from 1 to ``t_min``) the prior step's ``denoise_steps``
    ancestral transition matrices from ``t_i``, then the likelihood step's ``mh_steps`` Metropolis-Hastings
    kernels for ``exp(l(z)) q(z | x)`` (one per ``x``: a position and a value uniformly, accepted with
    ``min(1, ratio)``) applied from ``z = x``."""
    L, V = mix.L, mix.V
    X = sequences(L, V)
    S = len(X)
    ll = log_likelihood(X).to(F64)
    powers = V ** torch.arange(L - 1, -1, -1)
    # neighbours: nbr[z, j, v] = z with position j set to v
    nbr = torch.stack(
        [(X + (v - X[:, j])[:, None] * (torch.arange(L) == j)) @ powers for j in range(L) for v in range(V)],
        1,
    )
    law = torch.full((S,), 1.0 / S, dtype=F64)
    for t_i in torch.linspace(1.0, t_min, iterations, dtype=F64).tolist():
        grid = [t_i * (1 - k / denoise_steps) for k in range(denoise_steps + 1)]
        for k in range(denoise_steps):
            a_t = float(process.alpha(torch.tensor(grid[k], dtype=F64)))
            a_s = (
                1.0 if k == denoise_steps - 1 else float(process.alpha(torch.tensor(grid[k + 1], dtype=F64)))
            )
            law = law @ uniform_step_matrix(mix, a_t, a_s)
        log_q = torch.log(kernel(float(process.alpha(torch.tensor(t_i, dtype=F64))), V))
        coupling = log_q[X[None, :, :], X[:, None, :]].sum(-1)  # (x, z): log q(z | x)
        target = ll[None, :] + coupling  # (x, z)
        ratio = (target[:, nbr] - target[:, :, None]).exp().clamp(max=1.0) / (L * V)  # (x, z, L V)
        stay = 1 - ratio.sum(-1)  # (x, z): the rejected proposals' mass
        to = nbr.reshape(1, -1).expand(S, -1)
        z = torch.eye(S, dtype=F64)  # (x, z): from z = x
        for _ in range(mh_steps):
            z = (z * stay).scatter_add_(1, to, (z[:, :, None] * ratio).reshape(S, -1))
        law = law @ z
    return law
