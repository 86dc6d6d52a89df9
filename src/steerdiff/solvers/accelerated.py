r"""The accelerated deterministic and stochastic samplers of Li, Huang, Efimov, Wei, Chi & Chen (ICML 2024,
"Accelerating Convergence of Score-Based Diffusion Models, Provably"): a DDIM-type sampler that converges
as ``O(1/T^2)`` and a DDPM-type one that converges as ``O(1/T)`` in ``T`` steps (DDIM ``O(1/T)``, DDPM
``O(1/sqrt(T))``).

The update rules are those the authors state with their code (github.com/TimofeyEfimov/
AcceleratedDiffusionSamplers, README, Eq. 1 and 5), for the VP process ``x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps`` with ``alpha_t = abar_t / abar_{t-1}``, ``s_t(x) = -eps(x, t) / sqrt(1 - abar_t)``
the score and steps ``t = T, ..., 1``. Here the grid's nodes are ``t_i``; any process is the VP one with
the same ``s = sigma / alpha`` (``abar = 1 / (1 + s^2)``, ``x_VP = x / sqrt(alpha^2 + sigma^2)``), whose
net outputs are the same, so both samplers run on every process, prediction and schedule.

**Deterministic** (:class:`AcceleratedDDIM`, ``accel_ddim``). The probability-flow ODE in ``y = x / alpha``
against ``s`` is ``dy/ds = eps``; DDIM holds ``eps`` constant over a step. The accelerated sampler
interpolates ``eps`` linearly in ``abar`` through the last two evaluations (README Eq. 5):

    x(abar_{t-1}) = x_DDIM + sqrt(abar_{t-1}) / (abar_t - abar_{t+1})
        * (abar_t sqrt((1 - abar_{t-1}) / abar_{t-1}) + arcsin sqrt(abar_{t-1})
           - abar_t sqrt((1 - abar_t) / abar_t) - arcsin sqrt(abar_t)) * (eps_{t+1}(X_{t+1}) - eps_t(X_t)),

the integral of that line over the step, exactly. In the grid's terms, with ``a(s) = 1 / (1 + s^2)``
(``abar``), ``x_{i+1}`` the DDIM step ``alpha_{i+1} x0_i + sigma_{i+1} eps_i`` and ``eps_{i-1}`` the estimate
of the step before,

    x_{i+1} = x_DDIM + alpha_{i+1} C_i (eps_{i-1} - eps_i),
    C_i = int_{s_i}^{s_{i+1}} (a(s) - a(s_i)) ds / (a(s_{i-1}) - a(s_i))
        = (arctan s_{i+1} - arctan s_i - a(s_i) (s_{i+1} - s_i)) / (a(s_{i-1}) - a(s_i))

(``arctan s = pi/2 - arcsin sqrt(abar)``: the README's coefficient). One NFE per step. The first step has
no earlier estimate and is DDIM (as in the authors' code); so is the step into a clean end, which returns
the denoised estimate, as every solver here does (:func:`~steerdiff.solvers.base.step_order`). It has no
long-step rule (the paper has none): at 3-5 steps on grids with a long step after short ones it can end
further than DDIM (8-d test mixture, 8 samples, against the exact ODE: rectified flow on ``karras`` at 3
steps 1.96 against 0.885, EDM on ``time_uniform`` at 3 steps 1.2 against 0.93); from 10 steps it was ahead
of DDIM on every process and schedule measured (SD betas, EDM, rectified flow; ``karras_capped``,
``karras``, ``time_uniform``, ``logsnr_uniform``), by 1.3-4.6x.

**Stochastic** (:class:`AcceleratedDDPM`, ``accel_ddpm``). With ``Z_t, Z_t^+ ~ N(0, I)`` independent
(README Eq. 1 and the display below it),

    Y_t^+   = Y_t + sqrt((1 - alpha_t) / 2) Z_t,
    Y_{t-1} = (Y_t^+ + (1 - alpha_t) s_t(Y_t^+)) / sqrt(alpha_t) + sqrt((1 - alpha_t) / 2) Z_t^+:

DDPM's update with half its noise added before the score is taken, at the noisier point, and half after.
Its deterministic part is DDPM's posterior mean at ``Y_t^+`` (``(1 - alpha_t) / sqrt(1 - abar_t)`` on
``eps`` is ``sqrt(1 - abar_t) - sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t)``), so for any process,
with ``h = lam_{i+1} - lam_i``, ``beta = sigma_i^2 (1 - e^{-2h})`` (the forward step's variance, ``1 -
alpha_t`` on VP) and ``c = sqrt(alpha^2 + sigma^2)`` (1 on VP):

    x^+     = x_i + sqrt(beta / 2) z_1,
    x_{i+1} = alpha_{i+1} x0(x^+) + sigma_{i+1} e^{-h} eps(x^+) + (c_{i+1} / c_i) sqrt(beta / 2) z_2,

both estimates from one evaluation at ``(x^+, t_i)``: one NFE per step. The step into a clean end returns
the denoised estimate at ``x_i`` (no noise, as ``ddpm``). ``z_1`` passes through the network, so the step is
not Gaussian given ``x_i``: it draws both noises itself, ``z_1 = model.noise(t_i, t_m)`` and ``z_2 =
model.noise(t_m, t_{i+1})`` on the two halves of the step in process time (``t_m`` the middle; disjoint
ranges, so a Brownian tree gives independent draws), and returns the state, as ``edm_sde``, ``restart`` and
``dpmpp_sde`` do. Given ``x^+`` the step is the Gaussian ``N(mean, (c_{i+1} / c_i)^2 beta / 2)``; particle
methods that need the whole step's density (``tds``, DriftLite, FK correctors) refuse it,
:func:`steerdiff.smc.fk_steering` takes it.

**Schedule.** The paper's learning rates, ``beta_1 = T^{-c_0}``, ``beta_{t+1} = (c_1 log T / T) min(beta_1
(1 + c_1 log T / T)^t, 1)``, make ``1 - abar_t`` grow geometrically at low noise and ``abar_t`` decay
geometrically at high noise, so the half log-SNR falls by about ``c_1 log T / (2T)`` a step at both ends:
``schedule="logsnr_uniform"`` is the grid of that kind for a pretrained process's time range (the
constants ``c_0``, ``c_1`` are the theory's, "sufficiently large", and not given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._ops import axpby
from ._exp import sde_std
from .base import Grid, Model, Solver
from .ddim import EpsDifference, ancestral_split

__all__ = ["AcceleratedDDIM", "AcceleratedDDPM", "eps_line_weight"]


def eps_line_weight(s_prev: float, s: float, s_next: float) -> float:
    """``C = int_s^{s_next} (a(u) - a(s)) du / (a(s_prev) - a(s))``, ``a(u) = 1 / (1 + u^2)``: the weight of
    ``eps_prev - eps`` in the step from ``s`` to ``s_next`` when ``eps`` is linear in ``a`` (``abar``) through
    the estimates at ``s_prev`` and ``s`` (all ``s = sigma / alpha >= 0``, ``s_prev != s``). Written without
    the cancellations of ``arctan s_next - arctan s`` (both near ``pi / 2`` at high noise) and of
    ``a(s_prev) - a(s)``."""
    delta = s_next - s
    integral = math.atan2(delta, 1.0 + s * s_next) - delta / (1.0 + s * s)
    return integral * (1.0 + s_prev * s_prev) * (1.0 + s * s) / ((s - s_prev) * (s + s_prev))


@dataclass
class AcceleratedDDIM(EpsDifference):
    """The accelerated deterministic sampler (``accel_ddim``): DDIM plus the integral of ``eps`` linear in
    ``abar`` through the last two estimates; second order, one NFE per step. ``order=1`` is DDIM."""

    name: ClassVar[str] = "accel_ddim"
    max_order: ClassVar[int] = 2
    order: int = 2

    def weight(self, s_prev: float, s: float, s_next: float) -> float:
        return eps_line_weight(s_prev, s, s_next)

    def history_order(self) -> int:
        return self.order


@dataclass
class AcceleratedDDPM(Solver):
    """The accelerated stochastic sampler (``accel_ddpm``): half of DDPM's forward-step variance added before
    the evaluation, DDPM's posterior mean at that point, the other half after; one NFE per step, both noises
    drawn inside the step (module docstring)."""

    name: ClassVar[str] = "accel_ddpm"
    picard: ClassVar[str | None] = "stages"  # one evaluation, at a point the step's own noise moved x_i to
    stochastic: ClassVar[bool] = True

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        t, t_next = grid.t[i], grid.t[i + 1]
        if grid.sigma[i + 1] == 0:
            return model(x, t, i).x0
        half = sde_std(grid.sigma[i], grid.h(i), 1.0) / math.sqrt(2.0)  # sqrt(beta / 2)
        t_mid = 0.5 * (t + t_next)
        x_plus = axpby(1.0, x, half, model.noise(t, t_mid, x))
        mean = model(x_plus, t, i).renoise(grid.alpha[i + 1], ancestral_split(grid, i, 1.0)[0])
        scale = math.hypot(grid.alpha[i + 1], grid.sigma[i + 1]) / math.hypot(grid.alpha[i], grid.sigma[i])
        return axpby(1.0, mean, scale * half, model.noise(t_mid, t_next, mean))
