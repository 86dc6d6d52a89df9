r"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models").

Each step draws from the forward process's posterior ``q(x_{i+1} | x_i, x0)`` between the grid
nodes (on any grid of the model's times, as DDIM with ``eta = 1`` and diffusers' DDPMScheduler with
``set_timesteps``), with ``x0`` the network's estimate at ``x_i``. With ``h = lam_{i+1} - lam_i``
and ``e = exp(-2h)`` (Ho et al. Eq. 6-7 in alpha/sigma terms):

    mean  = alpha_{i+1} x0 + sigma_{i+1} exp(-h) eps
          = e alpha_{i+1} / alpha_i x_i + alpha_{i+1} (1 - e) x0,
    beta~ = sigma_{i+1}^2 (1 - e)          (posterior variance, "fixed_small"),
    beta  = sigma_i^2 (1 - e)              (forward step variance, "fixed_large").

When the denoiser predicts the variance (``Denoiser(..., learned_variance=True)``, Improved DDPM,
Nichol & Dhariwal 2021, Eq. 15) the step uses ``exp(v log beta + (1 - v) log beta~)`` with the
net's per-element interpolation ``v``, whatever ``variance`` says. One NFE per step; into a clean
end the step returns ``x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import choice
from ._exp import sde_std
from .base import Grid, Model, Solver, Transition
from .ddim import ancestral_split

__all__ = ["DDPM"]

VARIANCES = ("fixed_small", "fixed_large")


@dataclass
class DDPM(Solver):
    """Ancestral sampling with the DDPM posterior; ``variance`` is ``"fixed_small"`` (``beta~``,
    default) or ``"fixed_large"`` (``beta``); a learned variance is used when the denoiser has one."""

    name: ClassVar[str] = "ddpm"
    picard: ClassVar[str | None] = "step"
    stochastic: ClassVar[bool] = True

    variance: str = "fixed_small"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.variance = choice(type(self).__name__, "variance", self.variance, VARIANCES)

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        if grid.sigma[i + 1] == 0:
            return pred.x0
        sigma_det, std_small = ancestral_split(grid, i, 1.0)
        mean = pred.renoise(grid.alpha[i + 1], sigma_det)
        std_large = sde_std(grid.sigma[i], grid.h(i), 1.0)  # the forward step's (VP: sqrt(beta_t))
        if pred.var_interp is not None:
            log_small, log_large = math.log(std_small**2), math.log(std_large**2)
            return Transition(mean, torch.exp(0.5 * (log_small + pred.var_interp * (log_large - log_small))))
        if self.variance == "fixed_large":
            return Transition(mean, std_large)
        return Transition(mean, std_small)
