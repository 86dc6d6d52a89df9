r"""Euler-Maruyama on the reverse-time SDE (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", Eq. 6; Anderson 1982).

The forward process ``x_t = alpha(t) x_0 + sigma(t) eps`` is the SDE ``dx = f x dt + g dW`` with

    f = d log alpha / dt,    g^2 = d sigma^2 / dt - 2 f sigma^2,

and its reversal is ``dx = [f x - g^2 grad log p_t(x)] dt + g dW-bar`` with the score
``grad log p_t(x) = -eps / sigma``. One Euler-Maruyama step in process time, ``dt = t_{i+1} - t_i < 0``:

    x_{i+1} = (1 + f_i dt) x_i + g_i^2 dt / sigma_i eps_i + g_i sqrt(-dt) z,   z ~ N(0, I).

``f_i`` and ``g_i`` are the limits at ``t_i`` from below (the side the step integrates over): on
``VP.discrete``, whose ``lam`` is piecewise linear between the integer timesteps, the slope of the
segment the step crosses. Weak order 1, one NFE per step; into a clean end the step returns the
denoised estimate ``x0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._ops import axpby
from .base import Grid, Model, Solver, Transition

__all__ = ["EulerMaruyama"]


@dataclass
class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse SDE in process time; first order, 1 NFE per step."""

    name: ClassVar[str] = "euler_maruyama"
    stochastic: ClassVar[bool] = True
    static_state: ClassVar[bool] = True  # init_state: per-grid tables

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """Per step ``(1 + f dt, g^2 dt / sigma, g sqrt(-dt))`` from the process's derivatives."""
        p, n = grid.process, grid.steps
        t, alpha, sigma = (torch.tensor(v[:n], dtype=torch.float64) for v in (grid.t, grid.alpha, grid.sigma))
        t_next = torch.tensor(grid.t[1:], dtype=torch.float64)
        # the derivatives' limits from the side the step goes (t one ulp towards t_next): on a process
        # with kinks at the nodes (VP.discrete: lam piecewise linear between integer timesteps) the slope
        # of the segment the step crosses, not of the one above it; the same value where they are smooth
        t_in = torch.nextafter(t, t_next)
        f = p.d_alpha(t_in) / alpha
        g2 = 2 * sigma * (p.d_sigma(t_in) - f * sigma)
        dt = t_next - t
        coefs = zip(
            (1 + f * dt).tolist(), (g2 * dt / sigma).tolist(), (g2 * -dt).sqrt().tolist(), strict=True
        )
        return {"coefs": list(coefs)}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        if grid.sigma[i + 1] == 0:
            return pred.x0
        c_x, c_eps, std = state["coefs"][i]
        return Transition(axpby(c_x, x, c_eps, pred.eps), std)
