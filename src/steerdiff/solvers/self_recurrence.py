r"""Per-step self-recurrence (Bansal et al. 2023, "Universal Guidance for Diffusion Models", Alg. 1):
a solver that takes every step of a single-step solver ``k`` times, re-noising the result back to the
step's start with the forward process in between (usually around a guided denoiser,
:class:`~steerdiff.guidance.RewardGuidance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from .._checks import integer
from ..noise import BrownianTreeNoise
from ._exp import noising
from .base import Grid, Model, Solver, Transition, advance
from .ddim import DDIM

__all__ = ["SelfRecurrence"]


@dataclass(init=False)
class SelfRecurrence(Solver):
    r"""Per-step self-recurrence (Bansal et al. 2023, "Universal Guidance", Alg. 1) around a
    single-step solver.

    Step ``i`` is taken ``repeats = k`` times; after each of the first ``k - 1`` the result ``y``
    at node ``i + 1`` is re-noised back to node ``i`` with the forward process,

        x_i <- (alpha_i / alpha_{i+1}) y + sqrt(sigma_i^2 - (alpha_i sigma_{i+1} / alpha_{i+1})^2) z,

    which leaves ``p_{t_i}`` invariant when the step is exact (for an exact DDIM step of a point
    mass, exactly). ``inner``: a name or a solver without history (``ddim``, ``ddpm``, ``euler``,
    ``heun``, ``euler_ancestral``, ``euler_maruyama``, ``edm_sde``, ``dpmpp_sde``, ...: an empty
    :meth:`init_state` or one of per-grid tables, :attr:`~steerdiff.solvers.base.Solver.static_state`).
    NFE: ``k`` times the inner solver's. The re-noising draws from the run's generator (a Brownian tree
    has no fresh noise backwards: refused). Not in the registry (``solver="self_recurrence"``): it wraps
    another solver, so pass an instance.
    """

    name: ClassVar[str] = "self_recurrence"

    inner: Solver = field(default_factory=DDIM)  # as __init__'s default
    repeats: int = 1

    def __init__(self, inner: str | Solver = "ddim", repeats: int = 1) -> None:
        from . import get  # the registry's module imports this one

        try:
            solver = get(inner)
        except ValueError as e:  # the registry's message names solver=
            raise ValueError(f"SelfRecurrence: inner: {e}") from e
        self.order, self.inner, self.repeats = 1, solver, repeats
        self.__post_init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.inner, SelfRecurrence):
            raise ValueError("SelfRecurrence: inner must not itself be a SelfRecurrence")
        self.repeats = integer("SelfRecurrence", "repeats", self.repeats, lo=1)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: the re-noising (``repeats > 1``) or the inner solver's."""
        return self.repeats > 1 or self.inner.stochastic

    def noisy_on(self, grid: Grid) -> bool:
        return self.repeats > 1 or self.inner.noisy_on(grid)

    def init_state(self, grid: Grid) -> dict[str, Any]:
        state = self.inner.init_state(grid)
        if state and not self.inner.static_state:  # tables of the grid are read, never written
            raise ValueError(
                f"SelfRecurrence: inner solver {self.inner.name!r} keeps a history between steps; use a "
                "single-step solver (ddim, ddpm, euler, heun, euler_ancestral, euler_maruyama, edm_sde, "
                "dpmpp_sde)"
            )
        return state

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        if self.repeats > 1 and isinstance(model.noise, BrownianTreeNoise):
            raise ValueError(
                "SelfRecurrence: the re-noising needs fresh noise; pass a generator, not a Brownian tree"
            )
        back, std = noising((grid.alpha[i + 1], grid.sigma[i + 1]), (grid.alpha[i], grid.sigma[i]))
        for _ in range(self.repeats - 1):
            out = advance(self.inner.step(model, x, i, grid, state), model.noise, grid.t[i], grid.t[i + 1])
            x = back * out + std * model.noise(grid.t[i + 1], grid.t[i], out)
        return self.inner.step(model, x, i, grid, state)

    def nfe(self, steps: int, clean_end: bool = True) -> int:
        return self.repeats * self.inner.nfe(steps, clean_end)
