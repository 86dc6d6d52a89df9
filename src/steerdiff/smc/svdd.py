r"""Soft value-based decoding (SVDD; Li, Zhao, Uehara et al. 2024, "Derivative-Free Guidance in
Continuous and Discrete Diffusion Models with Soft Value-Based Decoding").

Target: the reward-tilted law ``p(x) exp(r(x) / alpha)``, approached step by step through the soft
value ``v(x_i) = alpha log E[exp(r(x_0) / alpha) | x_i]``. At
every step each sample proposes ``M`` candidates from the base (stochastic) transition,
``x_{i+1}^j ~ p(x_{i+1} | x_i)``, scores them with the soft value ``v(x_{i+1}^j)`` and keeps one,

    x_{i+1} = x_{i+1}^k,   k ~ Categorical(softmax_j(v(x_{i+1}^j) / alpha))     (their Alg. 1),

``k = argmax_j v(x_{i+1}^j)`` for ``alpha = 0``; ``alpha = inf`` picks uniformly, which is the base
sampler. ``M = 1`` selects nothing and draws nothing: the base sampler's run, draw for draw.
The value is SVDD-PM's posterior-mean approximation ``v(x_i) = r(x0_hat(x_i))``
(Tweedie's estimate: the reward need not be differentiable). On the engine: the ``M`` candidates
are the ``M`` particles of a batch row; the step at node ``i + 1`` evaluates the denoiser on each
candidate, which gives both its value and (for the one kept) its next base transition, and the
selection is a forced resampling of all ``M`` particles onto candidate ``k``
(:meth:`~steerdiff.smc.SMCAlgorithm.resample`, as CoDe). All candidates start from one ``x_T``. At
the last node the weights are ``r(x_S) / alpha`` (a point mass on the best for ``alpha = 0``), so
``out.sample()`` makes the last selection (with ``final="zero"`` the ``M`` candidates of the
deterministic last step coincide).

NFE per batch row: ``(steps - 1) M + 1`` (the ``M`` value evaluations of each step, but at node 0,
where the one ``x_T`` is evaluated once and the ``M`` candidates are drawn from its transition; a
staged solver's step costs its calls times that). ``alpha = 0`` is CoDe with ``block = 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import real
from ..denoiser import Denoiser
from ..distributed.group import spread_run
from ..noise import Generators, rand
from ..schedules import ScheduleLike
from ..solvers.base import Solver
from . import resample as _resample
from .particles import (
    DEFAULT_SCHEDULE,
    DEFAULT_SOLVER,
    Particles,
    Reward,
    SMCAlgorithm,
    StepContext,
    _check_reward,
    run_smc,
)

__all__ = ["SVDD", "select", "selection_logits", "svdd"]


def selection_logits(r: Tensor, alpha: float) -> Tensor:
    """Selection log-probabilities (unnormalized) from the values ``r`` ``(batch, M)`` at temperature
    ``alpha``: ``(r_j - max_k r_k) / alpha``, the softmax's logits shifted per row so that the best is 0 and
    none overflows (``r / alpha`` is ``+-inf`` for every candidate once ``alpha`` is tiny); a point mass on
    the first best for ``alpha = 0``, zeros (uniform) for ``alpha = inf``."""
    if alpha == 0:
        best = r.argmax(-1, keepdim=True)
        return torch.full_like(r, -math.inf).scatter_(1, best, 0.0)
    if math.isinf(alpha):
        return torch.zeros_like(r)
    return (r - r.amax(-1, keepdim=True)) / alpha


def select(r: Tensor, alpha: float, generator: Generators) -> Tensor:
    """SVDD's selection: the index ``k`` ``(batch,)`` of the candidate each row keeps, ``k ~
    Categorical(softmax_j(r_j / alpha))`` by one uniform per row from ``generator`` (row ``b`` from
    ``generator[b]`` where a list), ``argmax_j r_j`` (the first best, no draw) for ``alpha = 0``."""
    if alpha == 0:  # no draw: the same run as CoDe with block = 1
        return r.argmax(-1)
    logits = selection_logits(r, alpha)
    u = rand((logits.shape[0], 1), generator, torch.float64, logits.device)
    return _resample._inverse_cdf(logits, u)[:, 0]


class SVDD(SMCAlgorithm):
    """SVDD-PM as engine hooks: a forced selection by ``softmax(r(x0_hat) / alpha)`` at every node.

    Args:
        alpha: the temperature ``alpha >= 0`` (0: argmax; ``math.inf``: uniform, the base sampler).
    """

    name = "svdd"
    shardable = True
    one_start = "M candidates"

    def __init__(self, alpha: float) -> None:
        self.alpha = real("svdd", "alpha", alpha, lo=0, finite=False)  # 0: argmax, inf: the base sampler

    def log_weight(self, ctx: StepContext) -> Tensor | None:
        if not ctx.final:
            return None
        r = ctx.reward(ctx.x)  # the samples returned (noisy ones with final="none")
        ctx.state["reward"] = r
        # over every rank's candidates (group=)
        return selection_logits(ctx.gather(r, last=True), self.alpha)[:, ctx.shard]

    def resample(self, ctx: StepContext, log_w: Tensor, generator: Generators) -> Tensor:
        if ctx.i == 0 or log_w.shape[1] == 1:  # one x_T per batch row; one candidate: nothing to draw
            return torch.zeros(log_w.shape, dtype=torch.long, device=log_w.device)
        r = ctx.gather(ctx.reward(ctx.x0), last=True)  # every rank's candidates (group=)
        return select(r, self.alpha, generator)[:, None].expand(log_w.shape)


@spread_run
def svdd(
    den: Denoiser,
    reward: Reward,
    alpha: float = 0.0,
    *,
    shape: tuple[int, ...] | None = None,
    particles: int = 16,
    steps: int | None = None,
    solver: str | Solver = DEFAULT_SOLVER,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    max_batch: int | None = None,
    x_T: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: Generators = None,
    progress: bool = False,
    group: Any = None,
    **cond: Any,
) -> Particles:
    """SVDD-PM: ``particles = M`` candidates per step and batch row, one kept by ``softmax(v / alpha)``.

    Args:
        den: the denoiser (any guidance included).
        reward: ``r``, mapping ``(n, *shape)`` to ``(n,)``; gradient-free; scores ``x0_hat`` of every
            candidate and the final samples themselves.
        alpha: temperature ``>= 0`` (default 0: greedy argmax, as the paper's main experiments;
            ``math.inf``: the base sampler).
        shape: ``(batch, *sample_shape)``; may be left out where ``x_T`` is given. ``particles``: ``M >= 1``
            candidates. ``steps``: solver steps (``None``: 100, or an explicit grid's count:
            :func:`~steerdiff.smc.run_smc`).
        x_T: ``(batch, particles, *sample_shape)``, as for :func:`~steerdiff.smc.run_smc`, with a row's
            particles all equal (``x[:, None].expand(-1, M, ...)`` of one start ``x`` per row): every
            candidate of a row branches from its one ``x_T`` (Alg. 1), and a row whose particles differ is
            refused (``ValueError``) rather than read for its first alone. Default: one standard normal
            draw per row, scaled.
        solver, schedule, final, max_batch, dtype, device, generator, progress, group, cond: see
            :func:`~steerdiff.smc.run_smc`; the solver must be stochastic (candidates must differ).

    Returns:
        :class:`~steerdiff.smc.Particles`: the final candidates with log-weights ``r / alpha``
        (``out.sample()`` draws the returned sample), ``reward`` their values, ``nfe = (steps - 1) M + 1``.
    """
    _check_reward(reward, "svdd")
    return run_smc(
        den, SVDD(alpha), shape, particles=particles, steps=steps, reward=reward, solver=solver,
        schedule=schedule, final=final, ess_threshold=0.0, max_batch=max_batch, x_T=x_T, dtype=dtype,
        device=device, generator=generator, progress=progress, group=group, **cond,
    )  # fmt: skip
