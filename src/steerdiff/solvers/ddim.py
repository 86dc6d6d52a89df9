r"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"), with ``eta >= 0``.

With ``(x0, eps) = D(x_i, t_i)`` and ``h = lam_{i+1} - lam_i``, Eq. 12 of the paper:

    x_{i+1} = alpha_{i+1} x0 + sqrt(sigma_{i+1}^2 - c^2) eps + c z,    z ~ N(0, I),

with Eq. 16's ``c = eta sqrt((1 - a_{i+1}) / (1 - a_i)) sqrt(1 - a_i / a_{i+1})`` in
``a = alphas_cumprod = alpha^2`` terms, i.e. for any process

    c = eta sigma_{i+1} sqrt(1 - exp(-2h))      (capped at sigma_{i+1}).

``eta = 0`` is deterministic: the Euler step of the probability-flow ODE in ``x / alpha`` against
``sigma / alpha`` (Karras et al. 2022, Sec. 4) and the first-order DPM-Solver (Lu et al. 2022).
``eta = 1`` is ancestral sampling with DDPM's posterior ``q(x_{i+1} | x_i, x0)`` (Ho et al. 2020).
One NFE per step; into a clean end it returns ``x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import real
from .._ops import axpby
from ._exp import sde_std
from .base import Grid, History, Model, Solver, Transition, step_order

__all__ = ["DDIM", "EpsDifference", "ancestral_split", "noise_split"]


def noise_split(sigma_next: float, c: float) -> tuple[float, float]:
    """``(sqrt(sigma_next^2 - c^2), c)``: the noise level ``sigma_next`` of Eq. 12's step split into the
    part the estimate ``eps`` carries (0 where ``c = sigma_next``) and the fresh noise ``c <= sigma_next``."""
    return math.sqrt(max(sigma_next**2 - c**2, 0.0)), c


def ancestral_split(grid: Grid, i: int, eta: float) -> tuple[float, float]:
    """``(sqrt(sigma_{i+1}^2 - c^2), c)``: the noise level of step ``i`` split into its deterministic
    and fresh-noise parts, ``c = min(sigma_{i+1}, eta sigma_{i+1} sqrt(1 - exp(-2h)))``.

    DDIM's Eq. 16 (Song et al. 2021) in alpha/sigma terms; ``eta = 1`` gives the DDPM posterior
    standard deviation (Ho et al. 2020, ``beta~``), and in k-diffusion's variables
    ``(sigma_down, sigma_up) * alpha_{i+1}`` of the ancestral step. Both are 0 into a clean end.
    """
    sigma_next = grid.sigma[i + 1]
    return noise_split(sigma_next, min(sigma_next, eta * sde_std(sigma_next, grid.h(i), 1.0)))


@dataclass
class DDIM(Solver):
    """DDIM with ``eta >= 0`` (default 0: deterministic); first order, one network evaluation per step."""

    name: ClassVar[str] = "ddim"
    picard: ClassVar[str | None] = "step"

    eta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eta = real("DDIM", "eta", self.eta, lo=0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    @property
    def bounded(self) -> bool:  # type: ignore[override]
        return self.eta == 0

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        if self.eta == 0 or grid.sigma[i + 1] == 0:
            return pred.renoise(grid.alpha[i + 1], grid.sigma[i + 1])
        sigma_det, c = ancestral_split(grid, i, self.eta)
        return Transition(pred.renoise(grid.alpha[i + 1], sigma_det), c)


@dataclass
class EpsDifference(Solver):
    """DDIM plus a multiple of the last two noise estimates' difference, the shared step of the two-step
    DDIM refinements (:class:`~steerdiff.solvers.accelerated.AcceleratedDDIM`,
    :class:`~steerdiff.solvers.gradient_estimation.GradientEstimation`): with ``s = sigma / alpha`` at the
    nodes,

        x_{i+1} = alpha_{i+1} x0_i + sigma_{i+1} eps_i + alpha_{i+1} w_i (eps_{i-1} - eps_i),
        w_i = w(s_{i-1}, s_i, s_{i+1}),

    ``w`` the subclass's :meth:`weight`. One NFE per step; the first step (no earlier estimate), a step
    :func:`~steerdiff.solvers.base.step_order` takes at first order and the step into a clean end are
    DDIM's."""

    picard: ClassVar[str | None] = "step"

    def init_state(self, grid: Grid) -> dict[str, Any]:
        return {"eps": History(2)}

    def weight(self, s_prev: float, s: float, s_next: float) -> float:
        """``w``: the coefficient of ``alpha_{i+1} (eps_{i-1} - eps_i)``."""
        raise NotImplementedError

    def history_order(self) -> int:
        """The order asked of :func:`~steerdiff.solvers.base.step_order`: 2 (the difference) unless the
        subclass lets its ``order`` turn it off."""
        return 2

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        hist = state["eps"]
        pred = model(x, grid.t[i], i)
        a_next, sigma_next = grid.alpha[i + 1], grid.sigma[i + 1]
        out = pred.renoise(a_next, sigma_next)  # before eps is derived: an x0 net's DDIM step from its x0
        hist.push(pred.eps, grid.sigma[i] / grid.alpha[i])
        if step_order(i, grid, self.history_order(), len(hist.values), False) == 2:
            (eps, eps_prev), (s, s_prev) = hist.values, hist.at
            out = axpby(1.0, out, a_next * self.weight(s_prev, s, sigma_next / a_next), eps_prev - eps)
        hist.trim()
        return out
