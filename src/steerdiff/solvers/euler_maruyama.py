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

The same step discretizes every reverse SDE with the process's marginals, ``dx = [f x - (g^2 + s^2) / 2
grad log p_t(x)] dt + s dW-bar`` for a diffusion ``s(t)`` (``s = 0``: the probability-flow ODE; ``s = g``:
the SDE above):

    x_{i+1} = (1 + f_i dt) x_i + (g_i^2 + s_i^2) dt / (2 sigma_i) eps_i + s_i sqrt(-dt) z.

:class:`EulerMaruyama` is ``s = g``; :class:`~steerdiff.solvers.flow_sde.FlowSDE` (Flow-GRPO's SDE) sets
``s_i`` from its noise level (:meth:`EulerMaruyama.diffusion2`).
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
    picard: ClassVar[str | None] = "step"
    stochastic: ClassVar[bool] = True
    static_state: ClassVar[bool] = True  # init_state: per-grid tables

    def diffusion2(self, grid: Grid, g2: Tensor) -> Tensor:
        """``s_i^2``, the reverse SDE's squared diffusion at each step's start, from the forward SDE's
        ``g_i^2`` (float64, one per step): ``g_i^2`` itself (Anderson's reverse SDE)."""
        return g2

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """Per step ``(1 + f dt, (g^2 + s^2) dt / (2 sigma), s sqrt(-dt))`` from the process's derivatives
        (``s^2``: :meth:`diffusion2`)."""
        p, n = grid.process, grid.steps
        t, alpha, sigma = (torch.tensor(v[:n], dtype=torch.float64) for v in (grid.t, grid.alpha, grid.sigma))
        t_next = torch.tensor(grid.t[1:], dtype=torch.float64)
        # the derivatives' limits from the side the step goes (t one ulp towards t_next): on a process
        # with kinks at the nodes (VP.discrete: lam piecewise linear between integer timesteps) the slope
        # of the segment the step crosses, not of the one above it; the same value where they are smooth
        t_in = torch.nextafter(t, t_next)
        f = p.d_alpha(t_in) / alpha
        g2 = 2 * sigma * (p.d_sigma(t_in) - f * sigma)
        dt, s2 = t_next - t, self.diffusion2(grid, g2)
        coefs = zip(
            (1 + f * dt).tolist(),
            ((g2 + s2) / 2 * dt / sigma).tolist(),
            (s2 * -dt).sqrt().tolist(),
            strict=True,
        )
        return {"coefs": list(coefs)}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        if grid.sigma[i + 1] == 0:
            return pred.x0
        c_x, c_eps, std = state["coefs"][i]
        mean = axpby(c_x, x, c_eps, pred.eps)
        return Transition(mean, std) if std > 0 else mean
