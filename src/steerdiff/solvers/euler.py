r"""Euler and Heun on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", Alg. 1).

In k-diffusion's variables ``s = sigma / alpha`` and ``y = x / alpha`` the ODE is
``dy/ds = (y - x0(y, s)) / s = eps``. With ``d_i = eps(x_i, t_i)``:

    Euler:  y_{i+1} = y_i + (s_{i+1} - s_i) d_i                                     (1 NFE)
    Heun:   y~ = y_i + (s_{i+1} - s_i) d_i,
            y_{i+1} = y_i + (s_{i+1} - s_i) (d_i + eps(y~, t_{i+1})) / 2              (2 NFE)

and ``x = alpha y``. Heun takes an Euler step into a clean end (``s = 0``), so ``N`` Heun steps
cost ``2N - 1`` evaluations with a clean end and ``2N`` without.

In ``x`` the Euler step is the DDIM step ``x_{i+1} = alpha_{i+1} x0_i + sigma_{i+1} eps_i``, and
Heun's correction is written in the estimate the net gave
(:func:`~steerdiff.solvers.edm.heun_update`), which keeps float32 accuracy where ``alpha`` is
tiny (zero terminal SNR).

Euler ancestral (k-diffusion's ``sample_euler_ancestral``; Ho et al. 2020's ancestral sampling in
these variables) steps down to ``s_down`` and adds fresh noise of std ``s_up``:

    s_up = min(s_{i+1}, eta s_{i+1} sqrt(1 - s_{i+1}^2 / s_i^2)),  s_down = sqrt(s_{i+1}^2 - s_up^2),
    y_{i+1} = y_i + (s_down - s_i) d_i + s_up z,                                      (1 NFE)

which is DDIM with the same ``eta`` (Song et al. 2021) in exact arithmetic: its mean is
``alpha_{i+1} x0_i + alpha_{i+1} s_down eps_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import real
from .base import Grid, Model, Solver, Transition
from .ddim import ancestral_split
from .edm import heun_update

__all__ = ["Euler", "EulerAncestral", "Heun"]


@dataclass
class Euler(Solver):
    """Euler's method in ``(x/alpha, sigma/alpha)``; first order, 1 NFE per step."""

    name: ClassVar[str] = "euler"
    picard: ClassVar[str | None] = "step"
    bounded: ClassVar[bool] = True

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        return model(x, grid.t[i], i).renoise(grid.alpha[i + 1], grid.sigma[i + 1])


@dataclass
class Heun(Solver):
    """Heun's second-order method (EDM Alg. 1, deterministic); 2 NFE per step."""

    name: ClassVar[str] = "heun"
    picard: ClassVar[str | None] = "stages"
    staged: ClassVar[bool] = True
    max_order: ClassVar[int] = 2
    order: int = 2

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        frm, to = ((grid.t[j], grid.alpha[j], grid.sigma[j]) for j in (i, i + 1))
        return heun_update(model, x, i, frm, to, second=self.order == 2)


@dataclass
class EulerAncestral(Solver):
    """Euler ancestral with ``eta`` (default 1); first order, 1 NFE per step."""

    name: ClassVar[str] = "euler_ancestral"
    picard: ClassVar[str | None] = "step"

    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eta = real("EulerAncestral", "eta", self.eta, lo=0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: ``eta > 0``."""
        return self.eta > 0

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        down, up = ancestral_split(grid, i, self.eta)  # alpha_{i+1} (s_down, s_up)
        mean = model(x, grid.t[i], i).renoise(grid.alpha[i + 1], down)  # alpha_{i+1} x0 + down eps
        return mean if up == 0 else Transition(mean, up)
