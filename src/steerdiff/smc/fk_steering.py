r"""Feynman-Kac steering (Singhal, Horvitz, Teehan, Ren, Yu, McKeown & Ranganath 2025, "A General
Framework for Inference-time Scaling and Steering of Diffusion Models").

Target: the base sampler's output law tilted by a reward, ``p_target(x) ∝ p(x) exp(lam r(x))``.
Particles follow the base (stochastic) sampler unchanged, so ``r`` need not be differentiable. At
the potential nodes ``i_1 < i_2 < ...`` (every ``interval`` steps inside ``window``) each particle
is scored with the intermediate reward ``r_k = r(x0_hat(x_{i_k}))`` on its denoised estimate
(Tweedie's ``E[x_0 | x_i]``, the step's own network call) and weighted by a potential ``G_k``:

    difference:  G_k = exp(lam (r_k - r_{k-1})),   r_0 := 0
    max:         G_k = exp(lam max_{j <= k} r_j)
    sum:         G_k = exp(lam sum_{j <= k} r_j)
    immediate:   G_k = exp(lam r_k)

then resampled (per batch row, when its ESS drops below ``ess_threshold * N``; the default 1.0
resamples at every potential node, as the paper's sampler does). At the last node the final
correction ``G_final = exp(lam r(x_S)) / prod_k G_k`` (the product over the particle's ancestry)
makes every path's product of potentials exactly ``exp(lam r(x_S))``: the weighted particles
target ``p_S(x) exp(lam r(x)) / Z`` for the base sampler's output law ``p_S``, and the engine's
``log Z`` estimates ``log E_{p_S}[exp(lam r)]`` (for ``difference`` the product telescopes and the
correction is one more difference). ``lam = 0`` is the base sampler: no weights, no resampling.

``sum`` and ``immediate`` compound the reward over the potential nodes, and the final correction
divides that back out, so with potentials at every node the final weights degenerate (2-D
nine-mode mixture, ``r = -x1^2/100 - x2^2``, ``lam = 1``, 25 steps, 16 rows of 512 particles: median
final ESS 5 (``sum``) and 7 (``immediate``) at ``interval = 1``, 57 and 102 at ``interval = 5``, where
single rows still fall to 2 and 30); use them with a larger ``interval``. ``max`` too: its final
correction divides out the product of the running maxima (3-component 2-D mixture, linear reward,
``lam = 1``, 100 steps, 256 particles: at ``interval = 1`` final ESS 1.4-12 and a weighted-mean error
of 2.8, at ``interval = 25`` ESS ~180 and 0.18, ``difference`` at 1: 256 and 0.16). ``difference`` is the
one for potentials at every node.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from .. import schedules as _schedules
from .._checks import choice, integer, real
from ..denoiser import Denoiser
from ..distributed.group import spread_run
from ..noise import Generators
from ..schedules import ScheduleLike
from ..solvers.base import Solver, count_steps
from . import resample as _resample
from .particles import (
    DEFAULT_SCHEDULE,
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    Particles,
    Reward,
    SMCAlgorithm,
    StepContext,
    _check_reward,
    check_nodes,
    run_smc,
)

__all__ = [
    "POTENTIALS",
    "FKSteering",
    "check_arguments",
    "fk_steering",
    "increment",
    "initial_state",
    "potential_nodes",
]

POTENTIALS = ("difference", "max", "sum", "immediate")


class FKSteering(SMCAlgorithm):
    """The FK-steering potentials as engine hooks (see the module docstring).

    Args:
        lam: the tilt ``lambda`` (finite; 0 gives the base sampler).
        potential: ``"difference"``, ``"max"``, ``"sum"`` or ``"immediate"``.
        nodes: the grid nodes at which potentials are applied (the final correction always is): a set,
            list, tuple or range of integers >= 0 (:func:`potential_nodes` makes them from an interval);
            a run of ``steps`` steps refuses nodes outside ``0..steps - 1``, which it never reaches.

    Bad arguments are a ``ValueError`` naming them here, as :func:`fk_steering` names its own
    (:func:`check_arguments`, the one check of both).
    """

    name = "fk_steering"
    shardable = True

    def __init__(self, lam: float, potential: str, nodes: set[int]) -> None:
        self.lam, self.potential, self.nodes = check_arguments("FKSteering", lam, potential, nodes)

    def check_steps(self, steps: int) -> None:
        """The potential nodes must lie in ``0..steps - 1``, the nodes a run of ``steps`` steps weights
        before its final correction (:func:`~steerdiff.smc.particles.check_nodes`)."""
        check_nodes("FKSteering", "nodes", self.nodes, steps)

    def init_state(self, x: Tensor) -> dict[str, Tensor]:
        """:func:`initial_state` of the particles ``x`` ``(batch, particles, ...)``."""
        return initial_state(x.shape[:2], x.device)

    def log_weight(self, ctx: StepContext) -> Tensor | None:
        if ctx.final:
            r = ctx.reward(ctx.x)  # the target's r(x) on the samples returned, noisy with final="none"
            ctx.state["reward"] = r
            return None if self.lam == 0 else self.lam * r - ctx.state["log_g"]
        if self.lam == 0 or ctx.i not in self.nodes:
            return None
        return increment(self.potential, self.lam, ctx.reward(ctx.x0), ctx.state)


def initial_state(shape: tuple[int, ...], device: torch.device) -> dict[str, Tensor]:
    """The potentials' per-particle state, float64 tensors of ``shape`` ``(batch, particles)``: ``log_g``,
    the log of the product of potentials so far; ``prev``/``best``/``total``, the last, largest and summed
    intermediate rewards (along the particle's ancestry)."""
    zeros = torch.zeros(shape, dtype=torch.float64, device=device)
    return {"log_g": zeros, "prev": zeros, "best": torch.full_like(zeros, -math.inf), "total": zeros}


def increment(potential: str, lam: float, r: Tensor, state: dict[str, Tensor]) -> Tensor:
    """``log G_k`` of ``potential`` (module docstring) from the intermediate rewards ``r`` ``(batch,
    particles)`` at a potential node, updating ``state`` (:func:`initial_state`) in place; shared with
    :func:`steerdiff.discrete.fk_steering`."""
    if potential == "difference":
        g = lam * (r - state["prev"])
        state["prev"] = r
    elif potential == "max":
        state["best"] = torch.maximum(state["best"], r)
        g = lam * state["best"]
    elif potential == "sum":
        state["total"] = state["total"] + r
        g = lam * state["total"]
    else:
        g = lam * r
    state["log_g"] = state["log_g"] + g
    return g


def check_arguments(who: str, lam: object, potential: object, nodes: object) -> tuple[float, str, set[int]]:
    """``(lam, potential, nodes)`` of :class:`FKSteering` (and :func:`fk_steering`, as ``who``) checked:
    ``lam`` a finite number, ``potential`` one of :data:`POTENTIALS`, ``nodes`` a set, list, tuple or range
    of integers >= 0 (as a set); else a ``ValueError`` naming ``who`` and the argument."""
    lam = real(who, "lam", lam)
    potential = choice(who, "potential", potential, POTENTIALS)
    if not isinstance(nodes, set | frozenset | list | tuple | range) or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 0 for v in nodes
    ):
        raise ValueError(f"{who}: nodes must be a set of grid nodes (integers >= 0), got {nodes!r:.60}")
    return lam, potential, {int(v) for v in nodes}


def potential_nodes(
    steps: int, interval: int, window: tuple[int, int] | None, who: str = "fk_steering"
) -> set[int]:
    """``{start, start + interval, ...} ∩ [start, stop)`` for ``window = (start, stop)`` (grid nodes,
    default ``(0, steps)``); bad arguments a ``ValueError`` naming ``who``."""
    interval = integer(who, "interval", interval, lo=1)
    if window is None:
        window = (0, steps)
    ok = (
        isinstance(window, tuple | list)
        and len(window) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in window)
    )
    if not ok or not 0 <= window[0] < window[1] <= steps:
        raise ValueError(
            f"{who}: window must be (start, stop) grid nodes, 0 <= start < stop <= steps = {steps}; "
            f"got {window!r}"
        )
    return set(range(int(window[0]), int(window[1]), interval))


@spread_run
def fk_steering(
    den: Denoiser,
    reward: Reward,
    lam: float = 10.0,
    potential: str = "difference",
    *,
    shape: tuple[int, ...] | None = None,
    particles: int = 16,
    steps: int | None = None,
    interval: int = 1,
    window: tuple[int, int] | None = None,
    ess_threshold: float = 1.0,
    resampler: str | _resample.Resampler = "systematic",
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
    """Feynman-Kac steering towards ``p(x) exp(lam r(x))`` with ``particles`` per batch row.

    Args:
        den: the denoiser (any guidance included: FK steering composes with it).
        reward: ``r``, mapping a batch ``(n, *shape)`` to ``(n,)``; gradient-free (need not be
            differentiable); must be finite.
        lam: tilt ``lambda`` (0: the base sampler).
        potential: ``"difference"`` (default), ``"max"``, ``"sum"`` or ``"immediate"``.
        shape: ``(batch, *sample_shape)``; may be left out where ``x_T`` ``(batch, particles,
            *sample_shape)`` is given (read off it; a shape given with it must agree).
        particles: ``N >= 1`` per batch row. ``steps``: solver steps (``None``: 100, or an explicit grid's
            count: :func:`~steerdiff.smc.run_smc`).
        interval: apply potentials (and resample) every ``interval`` grid nodes ...
        window: ... inside ``(start, stop)`` (grid nodes, default the whole run).
        ess_threshold: resample a row when ``ESS < ess_threshold * N`` (default 1: always).
        resampler, solver, schedule, final, max_batch, x_T, dtype, device, generator, progress, group, cond:
            see :func:`~steerdiff.smc.run_smc`; the solver must be stochastic.

    Returns:
        :class:`~steerdiff.smc.Particles`: ``x`` ``(batch, particles, *shape)``, normalized ``log_w``,
        ``nfe`` (``steps * particles`` for DDPM, times ``den.cost``), ``reward`` of the final particles, the
        ``trace`` with ``log_z`` estimating ``log E[exp(lam r(x))]`` under the base sampler.

    Example:
        >>> out = sd.smc.fk_steering(den, reward, lam=10.0, shape=(4, 2), particles=16, steps=100)
        >>> x = out.sample(generator=g)   # (4, 2), one draw per batch row
    """
    _check_reward(reward, "fk_steering")
    steps = count_steps("fk_steering", steps, _schedules.get(schedule, "fk_steering"), final, DEFAULT_STEPS)
    nodes = potential_nodes(steps, interval, window)
    algorithm = FKSteering(*check_arguments("fk_steering", lam, potential, nodes))
    return run_smc(
        den, algorithm, shape, particles=particles, steps=steps, reward=reward, solver=solver,
        schedule=schedule, final=final, ess_threshold=ess_threshold, resampler=resampler,
        max_batch=max_batch, x_T=x_T, dtype=dtype, device=device, generator=generator,
        progress=progress, group=group, **cond,
    )  # fmt: skip
