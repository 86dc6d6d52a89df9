r"""Flow-GRPO's SDE sampler (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
its ODE-to-SDE conversion): Euler-Maruyama on a reverse SDE with the flow's marginals, for the Gaussian
transitions (mean, std) whose log-probabilities online RL fine-tuning (Flow-GRPO, Dance-GRPO) needs.

The probability-flow ODE of the process ``x_t = alpha(t) x_0 + sigma(t) eps`` is ``dx = u dt`` with
``u = f x - g^2 / 2 grad log p_t(x) = f x + g^2 / (2 sigma) eps`` (``f = d log alpha / dt``,
``g^2 = d sigma^2 / dt - 2 f sigma^2``: the forward SDE's, :mod:`~steerdiff.solvers.euler_maruyama`).
For any diffusion ``s_t`` the reverse-time SDE (``dt < 0``)

    dx = [u - s_t^2 / 2 grad log p_t(x)] dt + s_t dW-bar = [u + s_t^2 / (2 sigma) eps] dt + s_t dW-bar

has the same marginals ``p_t`` (its Fokker-Planck equation is the ODE's continuity equation: the
``s_t^2 / 2`` Laplacian cancels the added drift). Flow-GRPO takes, under rectified flow
(``alpha = 1 - t``, ``sigma = t``, velocity ``v = eps - x0``, so ``u = v`` and ``eps = x + (1 - t) v``),

    dx = [v + s_t^2 / (2 t) (x + (1 - t) v)] dt + s_t dW-bar,    s_t = a sqrt(t / (1 - t)),

with the noise level ``a`` (0.7 in the paper). Since rectified flow's ``g^2 = 2 t / (1 - t)``, that is
``s_t = (a / sqrt 2) g(t)`` on every process, so ``a = 0`` is the probability-flow ODE and ``a = sqrt 2``
Anderson's reverse SDE (``euler_maruyama``).
One Euler-Maruyama step from ``t_i`` to ``t_{i+1}`` (``dt = t_{i+1} - t_i < 0``, ``f``, ``g``, ``s`` at
``t_i``; :mod:`~steerdiff.solvers.euler_maruyama`'s step with ``s_i^2 = a^2 g_i^2 / 2``):

    x_{i+1} = (1 + f_i dt) x_i + (g_i^2 + s_i^2) dt / (2 sigma_i) eps_i + s_i sqrt(-dt) z,

on rectified flow ``mean = x_i (1 + s_i^2 dt / (2 t_i)) + v_i (1 + s_i^2 (1 - t_i) / (2 t_i)) dt`` and
``std = s_i sqrt(-dt)``, Flow-GRPO's step. At ``a = 0`` it is Euler on the probability-flow ODE in
process time, which under rectified flow is the DDIM step ``x_i + v_i dt``.

The first step. ``s_t^2 = a^2 t / (1 - t)`` diverges at ``t = 1``, where Flow-GRPO's code takes
``1 - t_1`` for ``1 - t_0`` (``s_0^2 = a^2 / (1 - t_1)``, so that the first step's noise has std ``a``);
a grid here starts at ``t_max < 1`` (:class:`~steerdiff.processes.RectifiedFlow`'s 0.999) as that
``t = 1``, and Euler-Maruyama from there with ``s_0^2 = 999 a^2`` multiplies the state's noise by about
``1 - a^2 |dt| / (2 (1 - t_0))`` (-23.5 at ``a = 0.7`` over a first step of 0.1): on the 8-d test
mixture at 10 time-uniform steps the samples ended 142x the sliced-W2 floor, 3.2x at 100. So a grid that
starts at ``t_max`` takes the same rule, ``1 - t_0 -> 1 - t_1``, i.e. ``alpha_0 -> alpha_1`` in
``s_0^2 = (a^2 / 2) g_0^2 alpha_0 / alpha_1`` (on rectified flow ``a^2 t_0 / (1 - t_1)``, Flow-GRPO's
value in the limit ``t_0 -> 1``); from the second step on ``s_i^2 = a^2 g_i^2 / 2``, so ``a = sqrt 2`` is
``euler_maruyama`` there.

Each step returns its :class:`~steerdiff.solvers.Transition` (``N(mean, std^2)`` before the noise is
drawn: ``sd.smc.transition_log_prob`` gives the log-probability). Weak order 1, one NFE per step; into
a clean end the step returns the denoised estimate ``x0`` (Flow-GRPO's last step instead draws noise of
std ``a t_{N-1} / sqrt(1 - t_{N-1})`` into ``t = 0``). The Euler-Maruyama step leaves more noise than
the marginal at ``t_{i+1}`` has where ``a`` is large and steps are long (Wang & Yu 2025, "Coefficients-
Preserving Sampling for Reinforcement Learning with Flow Matching"): with the exact ``x0`` of a point,
10 time-uniform steps at ``a = 0.7`` leave 1.06-1.38 times the marginal's ``sigma`` at the nodes and 82
times it at ``t_min = 0.001`` (std 0.082). :mod:`~steerdiff.solvers.cps` keeps it exact given the exact
``x0``, but not with a posterior-mean denoiser, where this SDE converges and CPS does not
(``tests/test_flow_sde.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .._checks import real
from .base import Grid
from .euler_maruyama import EulerMaruyama

__all__ = ["FlowSDE"]


@dataclass
class FlowSDE(EulerMaruyama):
    """Flow-GRPO's SDE with noise level ``noise_level`` (``a >= 0``, default 0.7, the paper's): diffusion
    ``s_t = a g(t) / sqrt 2`` (``a sqrt(t / (1 - t))`` under rectified flow; the first step from ``t_max``
    as Flow-GRPO's from ``t = 1``); ``a = 0`` is Euler on the probability-flow ODE, ``a = sqrt 2`` is
    ``euler_maruyama`` after the first step. First order, 1 NFE per step."""

    name: ClassVar[str] = "flow_sde"

    noise_level: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        self.noise_level = real("FlowSDE", "noise_level", self.noise_level, lo=0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.noise_level > 0

    def diffusion2(self, grid: Grid, g2: Tensor) -> Tensor:
        """``s_i^2 = a^2 g_i^2 / 2``, times ``alpha_0 / alpha_1`` at the first step of a grid that starts at
        the process's ``t_max`` (Flow-GRPO's rule at ``t = 1``: module docstring)."""
        s2 = self.noise_level**2 / 2 * g2
        if grid.steps > 0 and grid.t[0] == grid.process.t_max:
            s2[0] *= grid.alpha[0] / grid.alpha[1]
        return s2
