r"""Split Gibbs discrete diffusion posterior sampling (SGDD; Chu et al. 2025, "Split Gibbs Discrete
Diffusion Posterior Sampling", NeurIPS 2025, arXiv:2503.01161).

Target: ``p(x | y) ∝ p(x) exp(l(x))`` with ``p`` the prior of a uniform-noise discrete diffusion model
(:class:`~steerdiff.discrete.UniformProcess`) and ``l = log p(y | x)`` any log-likelihood (or reward) of
the tokens, differentiable or not. Split Gibbs sampling adds a copy ``z`` of ``x`` and samples the joint

    pi_eta(x, z) ∝ p(x) exp(-D(x, z; eta)) exp(l(z)),
    D(x, z; eta) = d_H(x, z) log((1 + (V - 1) e^{-eta}) / (1 - e^{-eta})),

``d_H`` the Hamming distance, by alternating its two conditionals. The potential ``D`` is the one that
makes the prior step a denoising step: ``exp(-D(x, z; eta))`` is, up to a constant, the uniform process's
kernel ``q(z | x)`` at total noise ``eta = -log alpha(t)`` (each token
kept with probability ``e^{-eta} + (1 - e^{-eta}) / V``, each other value ``(1 - e^{-eta}) / V``), so

* the *prior step*, ``x ~ p(x | z) ∝ p(x) q(z | x)``, is the model's posterior of ``x_0`` given ``x_t =
  z``: denoise ``z`` from ``t`` to 0 (``denoise_steps`` ancestral steps on the grid ``t (1 - k /
  denoise_steps)``, :class:`~steerdiff.discrete.Ancestral`'s uniform step);
* the *likelihood step*, ``z ~ pi(z | x) ∝ exp(l(z)) q(z | x)``, is Metropolis-Hastings in token space
  from ``z = x``: ``mh_steps`` proposals, each one position uniformly and a value uniformly among the
  ``V`` (a symmetric proposal), accepted with probability ``min(1, exp(l(z') - l(z) + log q(z' | x) -
  log q(z | x)))``.

As ``eta -> 0`` both marginals of ``pi_eta`` tend to ``p(x | y)``; large ``eta`` decouples ``x`` and ``z``
and lets the chain move between modes. The paper anneals: iteration ``i`` of ``N`` (``i = 0..N-1``) runs
at the time ``t_i = 1 - i (1 - t_min) / (N - 1)`` (``eta_i = -log alpha(t_i)``), from ``z`` uniform (the
process's limit), prior step then likelihood step, and returns the last ``z``.

Checked against the authors' code (github.com/chuwd19/Split-Gibbs-Discrete-Diffusion-Posterior-Sampling,
``sampling/sgdd.py``): the same loop, grid (``1 - (1 - 1e-5) r`` for ``r`` linear in ``[0, 1 - 1e-5]``: ``t``
from 1 to about ``2e-5``, the default ``t_min``), proposal and output. Two differences, both kept out
here: their Metropolis-Hastings ratio weighs a changed token by ``log((1 - e^{-eta})(V - 1) / V)``, the
probability that a token changes to *any* other value, where ``q(z | x)`` has ``log((1 - e^{-eta}) /
V)`` for the value it changes to (a coupling weaker by ``(V - 1)^{d_H}``, which this module does not
copy: here the prior step's ``q(z | x)`` and the likelihood step's are one kernel, as the split Gibbs
joint needs); and their prior step runs SEDD's ``analytic`` (Tweedie tau-leaping) sampler on the trained
score ratios, the denoiser's ancestral steps here.

Cost: ``N * denoise_steps`` network evaluations (NFE) and ``N * (mh_steps + 1)`` calls of ``l``, each on
the whole batch (one chain per row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor

from .._checks import boolean, integer, real
from ..noise import check_generators, rand
from .ancestral import uniform_step
from .base import Model
from .denoiser import UniformDenoiser
from .process import uniform_tokens
from .sampling import batch

__all__ = ["SGDDInfo", "sgdd"]

LogLikelihood = Callable[[Tensor], Tensor]


@dataclass
class SGDDInfo:
    """What a run of :func:`sgdd` cost and did.

    Attributes:
        nfe: network evaluations (each on the whole batch), ``iterations * denoise_steps``.
        likelihood_calls: calls of ``log_likelihood`` (each on the whole batch), ``iterations * (mh_steps +
            1)``.
        times: the annealing times ``t_i`` (float64, ``(iterations,)``); ``eta_i = -log alpha(t_i)``.
        acceptance: the fraction of proposals accepted at each iteration (``(iterations,)``, over rows and
            steps).
    """

    nfe: int
    likelihood_calls: int
    times: Tensor
    acceptance: Tensor


def _log_likelihood(who: str, fn: LogLikelihood, z: Tensor) -> Tensor:
    """``fn(z)`` as float64 ``(batch,)`` on ``z``'s device, detached (the chain keeps the accepted values:
    their graphs, through ``torch.where``, would pile up over the Metropolis-Hastings steps); a
    ``ValueError`` for another shape or a non-real dtype (complex or bool: a feasibility test is ``0`` or
    ``-inf``, as ``fk_steering`` refuses a bool reward)."""
    out = fn(z)
    real_valued = isinstance(out, Tensor) and not (out.is_complex() or out.dtype == torch.bool)
    if not real_valued or tuple(out.shape) != (len(z),):
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{who}: log_likelihood must return a real tensor of shape ({len(z)},), got {got}")
    return out.detach().to(device=z.device, dtype=torch.float64)


@overload
def sgdd(
    den: UniformDenoiser,
    log_likelihood: LogLikelihood,
    *,
    shape: Sequence[int],
    iterations: int = ...,
    denoise_steps: int = ...,
    mh_steps: int = ...,
    t_min: float = ...,
    generator: torch.Generator | Sequence[torch.Generator] | None = ...,
    device: torch.device | str | None = ...,
    return_info: Literal[False] = ...,
    **cond: Any,
) -> Tensor: ...


@overload
def sgdd(
    den: UniformDenoiser,
    log_likelihood: LogLikelihood,
    *,
    shape: Sequence[int],
    iterations: int = ...,
    denoise_steps: int = ...,
    mh_steps: int = ...,
    t_min: float = ...,
    generator: torch.Generator | Sequence[torch.Generator] | None = ...,
    device: torch.device | str | None = ...,
    return_info: Literal[True],
    **cond: Any,
) -> tuple[Tensor, SGDDInfo]: ...


def sgdd(
    den: UniformDenoiser,
    log_likelihood: LogLikelihood,
    *,
    shape: Sequence[int],
    iterations: int = 50,
    denoise_steps: int = 32,
    mh_steps: int = 200,
    t_min: float = 2e-5,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    return_info: bool = False,
    **cond: Any,
) -> Tensor | tuple[Tensor, SGDDInfo]:
    """Split Gibbs posterior sampling of ``p(x) exp(log_likelihood(x))`` with a uniform-noise model (module
    docstring: the algorithm, its check against the authors' code, its cost).

    Args:
        den: a :class:`~steerdiff.discrete.UniformDenoiser`, the prior.
        log_likelihood: ``(n, length)`` token ids ``->`` ``(n,)`` real values (``log p(y | x)``, or a reward
            times its weight) on any device (moved to the chains'), no gradient taken; ``-inf`` marks an
            impossible sequence, NaN and ``+inf`` are refused.
        shape: ``(batch, length)``: one chain per row.
        iterations: ``N >= 1``, the annealing iterations (the authors' default 50; 1: one iteration at ``t =
            1``, a prior draw and then Metropolis-Hastings for ``exp(l(z))`` alone, the prior forgotten).
        denoise_steps: the ancestral steps of each prior step, ``>= 1`` (the authors' 32 ``ode_steps``).
        mh_steps: the Metropolis-Hastings proposals of each likelihood step, ``>= 0`` (the authors' 200).
        t_min: the last iteration's time, in ``(0, 1)`` (``eta = -log alpha(t_min)``, the final coupling).
        generator: ``None``, a ``torch.Generator`` or one per row (a row then the same whatever its batch).
        device: where the chains run (default CPU).
        return_info: also return an :class:`SGDDInfo`.
        **cond: passed to the network on every call.

    Returns the last likelihood step's ``z``, int64 ``(batch, length)``.

    Raises:
        ValueError: bad arguments, or ``log_likelihood`` returning NaN / ``+inf`` (at the iteration it did).
        NonFiniteError: the network returned NaN / ``+inf`` logits (the message names the step).
    """
    who = "discrete.sgdd"
    if not isinstance(den, UniformDenoiser):
        raise ValueError(f"{who}: den must be a steerdiff.discrete.UniformDenoiser, got {type(den).__name__}")
    if not callable(log_likelihood):
        raise ValueError(f"{who}: log_likelihood must be callable, got {type(log_likelihood).__name__}")
    x = batch(who, den.process, shape, device, 0, "shape")
    n, length = x.shape
    iterations = integer(who, "iterations", iterations, lo=1)
    denoise_steps = integer(who, "denoise_steps", denoise_steps, lo=1)
    mh_steps = integer(who, "mh_steps", mh_steps, lo=0)
    t_min = real(who, "t_min", t_min, lo=0, hi=1, lo_open=True, hi_open=True)
    return_info = boolean(who, "return_info", return_info)
    rows = check_generators(who, generator, n)
    process, vocab = den.process, den.process.vocab_size
    model = Model(den, cond, who)
    times = torch.linspace(1.0, t_min, iterations, dtype=torch.float64)  # [1.0] for one iteration
    every = torch.arange(n, device=x.device)
    z = uniform_tokens(x.shape, vocab, rows, x.device)
    accepted = torch.zeros(iterations, dtype=torch.float64, device=x.device)
    for i, t_i in enumerate(times.tolist()):
        # prior step: x ~ p(x_0 | x_t = z), ancestral steps from t_i to 0
        x, grid = z, [t_i * (1 - k / denoise_steps) for k in range(denoise_steps + 1)]
        for k in range(denoise_steps):
            t = torch.full((n,), grid[k], dtype=torch.float64, device=x.device)
            last = k == denoise_steps - 1
            alpha_s = torch.ones_like(t) if last else process.alpha(torch.full_like(t, grid[k + 1]))
            x = uniform_step(process, x, model(x, t, i * denoise_steps + k), process.alpha(t), alpha_s, rows)
        # likelihood step: Metropolis-Hastings for exp(l(z)) q(z | x), from z = x
        alpha_i = process.alpha(torch.tensor(t_i, dtype=torch.float64))
        same, other = (float(torch.log(q)) for q in process.transition(alpha_i))
        z, log_l = x, _log_likelihood(who, log_likelihood, x)
        bad = log_l.isnan() | log_l.isposinf()
        for _ in range(mh_steps):
            u = rand((n, 3), rows, torch.float64, x.device)
            pos = (u[:, 0] * length).long().clamp(max=length - 1)
            value = (u[:, 1] * vocab).long().clamp(max=vocab - 1).to(z.dtype)
            proposal = z.clone()
            proposal[every, pos] = value
            log_l_new = _log_likelihood(who, log_likelihood, proposal)
            bad |= log_l_new.isnan() | log_l_new.isposinf()
            kept = x[every, pos]
            log_ratio = (
                log_l_new
                - log_l
                + _term(value == kept, same, other)
                - _term(z[every, pos] == kept, same, other)
            )
            accept = torch.log(u[:, 2]) < log_ratio  # a NaN ratio (-inf to -inf) rejects
            z = torch.where(accept[:, None], proposal, z)
            log_l = torch.where(accept, log_l_new, log_l)
            accepted[i] += accept.to(torch.float64).mean()
        if bool(bad.any()):  # one device sync per iteration
            raise ValueError(f"{who}: log_likelihood returned NaN or +inf at iteration {i} (t = {t_i:.6g})")
    if return_info:
        info = SGDDInfo(model.nfe, iterations * (mh_steps + 1), times, (accepted / max(mh_steps, 1)).cpu())
        return z, info
    return z


def _term(same_token: Tensor, same: float, other: float) -> Tensor:
    """``log q(z^j | x^j)`` of one token: ``same`` where it is ``x``'s, ``other`` where not."""
    return torch.where(same_token, same, other)
