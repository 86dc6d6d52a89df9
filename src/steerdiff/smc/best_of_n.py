r"""Best-of-N and blockwise best-of-N (CoDe: Singh, Mukherjee, Beirami & Jamali-Rad 2025, "CoDe:
Blockwise Control for Denoising Diffusion Models").

Best-of-N draws ``N`` independent samples per batch row with the base sampler and keeps the one of
highest reward, ``x* = argmax_j r(x^j)``. Any solver works (with a deterministic one the samples
differ by their initial noise).

CoDe (Alg. 1 of the paper, greedy selection) works in blocks of ``B`` steps: from the current state
``x_i`` of a batch row, ``N`` branches run the next ``B`` steps of the stochastic sampler
independently, and the branch whose denoised estimate scores best, ``argmax_j r(x0_hat(x_{i+B}^j))``
(Tweedie's estimate, the value approximation ``V(x_t) ≈ r(x0_hat(x_t))`` of the paper), becomes the
state all ``N`` branches continue from. All branches start from one ``x_T``; the last block ends at
the final sample and is scored by ``r(x_S)``. ``B >= steps`` is best-of-N over samples sharing
``x_T``; ``B = 1`` selects greedily at every step.

Both return all ``N`` final particles with a point mass on the best (``log_w = 0`` there, ``-inf``
elsewhere), so ``out.sample()`` returns it; ``out.reward`` holds the final rewards. NFE per batch
row is ``N`` times the solver's (``steps * N`` for DDPM), but at CoDe's node 0, whose step is taken on
the one ``x_T`` alone (``(steps - 1) N + 1`` for DDPM).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import integer
from ..denoiser import Denoiser
from ..distributed.group import spread_run
from ..noise import Generators
from ..schedules import ScheduleLike
from ..solvers.base import Solver
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

__all__ = ["BestOfN", "CoDe", "best_of_n", "code"]


def _keep_best(ctx: StepContext) -> Tensor:
    """Final node: score the samples returned (``x``, not an estimate: with ``final="none"`` the last
    node is noisy), store the rewards, and a point mass on each row's best."""
    r = ctx.reward(ctx.x)
    ctx.state["reward"] = r
    every = ctx.gather(r, last=True)  # the row's best among every rank's particles (group=)
    best = every.argmax(-1, keepdim=True)
    return torch.full_like(every, -math.inf).scatter_(1, best, 0.0)[:, ctx.shard]


class BestOfN(SMCAlgorithm):
    """Best-of-N as engine hooks: no weights until the final node, then the best sample."""

    name = "best_of_n"
    stochastic = False
    shardable = True

    def log_weight(self, ctx: StepContext) -> Tensor | None:
        return _keep_best(ctx) if ctx.final else None


class CoDe(SMCAlgorithm):
    """CoDe as engine hooks: a forced selection of each row's best branch every ``block`` nodes
    (and of one common ``x_T`` at node 0), the best final sample at the end."""

    name = "code"
    shardable = True
    one_start = "branches"

    def __init__(self, block: int) -> None:
        self.block = integer("code", "block", block, lo=1)

    def log_weight(self, ctx: StepContext) -> Tensor | None:
        return _keep_best(ctx) if ctx.final else None

    def resample(self, ctx: StepContext, log_w: Tensor, generator: Generators) -> Tensor | None:
        if ctx.i == 0:
            return torch.zeros(log_w.shape, dtype=torch.long, device=log_w.device)
        if ctx.i % self.block:
            return None
        return ctx.gather(ctx.reward(ctx.x0), last=True).argmax(-1, keepdim=True).expand(log_w.shape)


@spread_run
def best_of_n(
    den: Denoiser,
    reward: Reward,
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
    """Best of ``particles`` independent samples per batch row by ``reward`` (see the module docstring).

    ``reward`` maps ``(n, *shape)`` to ``(n,)`` (gradient-free); the other arguments are those of
    :func:`~steerdiff.smc.run_smc` (``steps=None``: 100, or an explicit grid's count; any solver,
    deterministic ones included; ``shape`` may be left out where ``x_T`` is given). Returns
    :class:`~steerdiff.smc.Particles` with a point mass on each row's best sample.
    """
    _check_reward(reward, "best_of_n")
    return run_smc(
        den, BestOfN(), shape, particles=particles, steps=steps, reward=reward, solver=solver,
        schedule=schedule, final=final, ess_threshold=0.0, max_batch=max_batch, x_T=x_T, dtype=dtype,
        device=device, generator=generator, progress=progress, group=group, **cond,
    )  # fmt: skip


@spread_run
def code(
    den: Denoiser,
    reward: Reward,
    *,
    shape: tuple[int, ...] | None = None,
    particles: int = 16,
    block: int = 5,
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
    """CoDe, blockwise best-of-N: ``particles`` branches per block of ``block`` steps, the best kept.

    ``reward`` maps ``(n, *shape)`` to ``(n,)`` (gradient-free); it scores the denoised estimate at
    each block's end and the final sample. The solver must be stochastic (branches must differ);
    the other arguments are those of :func:`~steerdiff.smc.run_smc` (``shape`` may be left out where ``x_T``
    is given; ``x_T`` ``(batch, particles, *sample_shape)`` must hold one start per row repeated over its
    particles, as all branches start from one ``x_T`` (Alg. 1): a row whose particles differ is refused,
    ``ValueError``, rather than read for its first alone; ``x_T=None`` draws one per row). Node 0's step
    is taken on that one start per row, its branches drawn from its transition: NFE ``(steps - 1) N + 1``
    per row for DDPM (``N`` times the solver's at every other node). Returns
    :class:`~steerdiff.smc.Particles` with a point mass on each row's best final sample.
    """
    _check_reward(reward, "code")
    return run_smc(
        den, CoDe(block), shape, particles=particles, steps=steps, reward=reward, solver=solver,
        schedule=schedule, final=final, ess_threshold=0.0, max_batch=max_batch, x_T=x_T, dtype=dtype,
        device=device, generator=generator, progress=progress, group=group, **cond,
    )  # fmt: skip
