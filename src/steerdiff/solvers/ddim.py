r"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"), deterministic (eta = 0).

With ``(x0, eps) = D(x_i, t_i)``, Eq. 12 of the paper with ``sigma_t = 0``:

    x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} eps.

It is the Euler step of the probability-flow ODE in ``x / alpha`` against ``sigma / alpha``
(Karras et al. 2022, Sec. 4) and the first-order DPM-Solver (Lu et al. 2022). One NFE per step;
into a clean end it returns ``x0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .base import Grid, Model, Solver

__all__ = ["DDIM"]


@dataclass
class DDIM(Solver):
    """Deterministic DDIM; first order, one network evaluation per step."""

    name: ClassVar[str] = "ddim"

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        return model(x, grid.t[i], i).renoise(grid.alpha[i + 1], grid.sigma[i + 1])
