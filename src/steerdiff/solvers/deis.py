r"""DEIS multistep (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
Integrator"), the Adams-Bashforth exponential integrator (AB-DEIS) on noise prediction.

The noise-prediction ODE has an exact linear part (:mod:`steerdiff.solvers._exp`); with
``h = lam_{i+1} - lam_i``,

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} int_0^h e^{h-u} eps(lam_i + u) du.

DEIS replaces ``eps`` by the Lagrange polynomial through the last ``k`` evaluations
``eps_i, ..., eps_{i-k+1}`` and integrates it exactly against the exponential weight:

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} h sum_j w_j eps_{i-j},
    w_j = int_0^1 e^{h (1 - theta)} l_j(theta) dtheta,   theta_j = (lam_{i-j} - lam_i) / h

(:func:`~steerdiff.solvers._poly.exp_adams_bashforth`). The polynomial is in
``lam = -log rho``, ``rho = sigma / alpha``: the "log-rho" variant of the DEIS reference code and
of diffusers' ``DEISMultistepScheduler`` (which writes the same step as
``x_{i+1}/alpha_{i+1} = x_i/alpha_i + sum_j eps_{i-j} int l_j(log rho) drho``); the paper's
tAB-DEIS interpolates in ``t``, rhoAB-DEIS in ``rho``. Order 1 is DDIM,
``x_{i+1} = alpha_{i+1} x0_i + sigma_{i+1} eps_i``, which is also the step into a clean end
(it returns ``x0``). One NFE per step; warm-up at the first steps and lower order at the last
(``lower_order_final``, see :func:`~steerdiff.solvers.base.step_order`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ._poly import exp_adams_bashforth
from .base import Grid, History, Model, Solver, step_order

__all__ = ["DEIS"]


@dataclass
class DEIS(Solver):
    """DEIS (AB-DEIS, log-rho) multistep of order 1-3; one network evaluation per step."""

    name: ClassVar[str] = "deis"
    max_order: ClassVar[int] = 3
    order: int = 3
    lower_order_final: bool = True

    def init_state(self, grid: Grid) -> dict[str, Any]:
        return {"eps": History(self.order)}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        pred = model(x, grid.t[i], i)
        hist = state["eps"]
        hist.push(pred.eps, grid.lam[i])
        eps, lams = hist.values, hist.at
        k = step_order(i, grid, self.order, len(eps), self.lower_order_final)
        if k == 1:
            return pred.renoise(grid.alpha[i + 1], grid.sigma[i + 1])
        h = grid.h(i)
        w = exp_adams_bashforth([(lam - lams[0]) / h for lam in lams[:k]], h)
        c = grid.sigma[i + 1] * h
        return (grid.alpha[i + 1] / grid.alpha[i]) * x - sum(
            c * wj * e for wj, e in zip(w, eps, strict=False)
        )
