r"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Alg. 2): Heun steps with "churn", noise added at the start of each step.

In k-diffusion's variables ``s = sigma / alpha`` and ``y = x / alpha`` (EDM's ``sigma`` and ``x``
for ``alpha = 1``), step ``i`` of ``N`` from ``s_i`` to ``s_{i+1}`` reads

    gamma_i = min(S_churn / N, sqrt(2) - 1)  if S_tmin <= s_i <= S_tmax,  else 0
    s^ = (1 + gamma_i) s_i,    y^ = y_i + sqrt(s^2 - s_i^2) S_noise z,    z ~ N(0, I)
    d = eps(y^, s^),  y~ = y^ + (s_{i+1} - s^) d,
    y_{i+1} = y^ + (s_{i+1} - s^) (d + eps(y~, s_{i+1})) / 2                           (2 NFE)

with an Euler step into a clean end (``s_{i+1} = 0``); ``x = alpha y``, the net is evaluated at
the process time ``t^`` with ``sigma(t^) / alpha(t^) = s^``. ``N`` is the grid's number of steps,
the step into the clean end included (k-diffusion's ``len(sigmas) - 1``). ``S_tmin``/``S_tmax``
are in ``s`` units; churn never raises ``s^`` above the process's ``s(t_max)`` (the net has no
time beyond it), so a step starting at ``t_max`` has none. ``S_churn = 0`` is :class:`Heun`.

The churn noise is drawn inside the step, *before* the two deterministic evaluations, so the step
is not Gaussian given ``x_i``: it returns the state (a Tensor), not a
:class:`~steerdiff.solvers.base.Transition`. It is drawn with ``model.noise(t_i, min(t^, t_{i-1}), x)``
(``t^`` at the first step): ``[t_i, t^]`` overlaps the previous step's range wherever ``s^ = (1 +
gamma) s_i`` is above ``s_{i-1}``, where a Brownian-tree source
(:class:`~steerdiff.noise.BrownianTreeNoise`) would correlate the draws that Alg. 2 takes fresh; cut
at ``t_{i-1}`` the ranges are disjoint and never empty (the step into a clean end spans no time when
the last noisy node is at ``t_min``). NFE as :class:`Heun`: ``2N - 1``
with a clean end, ``2N`` without.

:func:`heun_update` -- one Heun step between two arbitrary noise levels -- is shared with
:mod:`steerdiff.solvers.restart`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import real
from .._ops import axpby
from ..denoiser import Prediction
from ._exp import hphi, noising
from .base import Grid, Model, Solver

__all__ = ["EDMStochasticHeun", "Level", "heun_update"]

Level = tuple[float, float, float]  # (t, alpha, sigma) of a noise level

# Heun's trapezoid in s = sigma / alpha weights the change of the slope by (s - s') / 2, which on a
# step that divides s by a large factor is a large multiple of the clean estimates' difference;
# above this ratio the same two estimates are combined by the exponential trapezoid in lam instead.
# Measured (4-d mixture, 128 samples, against the exact ODE), heun at 3 / 5 / 10 / 20 steps before ->
# after: zero-SNR DDPM betas on karras_capped (its top step 3e4 -> 30) 4.4 / 1.57 / 0.658 / 0.529 ->
# 0.29 / 0.18 / 0.022 / 0.0070; VE(0.01, 1e4) 1.55 / 0.74 / 0.43 / 0.33 -> 0.29 / 0.18 / 0.023 /
# 0.0070; EDM on karras (3 steps: 80 -> 2.4) 3.0 -> 0.45; SD betas' karras_capped grids unchanged.
HEUN_MAX_RATIO = 20.0


def heun_update(
    model: Model,
    x: Tensor,
    step: int,
    frm: Level,
    to: Level,
    second: bool = True,
    pred: Prediction | None = None,
) -> Tensor:
    r"""One Heun step (EDM Alg. 1) in ``(x / alpha, sigma / alpha)`` from level ``frm`` to ``to``.

    ``frm`` and ``to`` are ``(t, alpha, sigma)``; an Euler step (1 NFE) when ``second`` is false
    or ``to`` is clean (``sigma = 0``), else 2 NFE. ``step`` is reported with non-finite outputs.
    ``pred``: the prediction at ``(x, frm)`` where the caller has made it (one NFE fewer; PLMS keeps
    its ``eps``).

    In ``x``, with ``s = sigma / alpha``, the Euler step ``y~ = y + (s' - s) d`` is the DDIM step
    ``x~ = alpha' x0 + sigma' eps`` (:meth:`~steerdiff.denoiser.Prediction.renoise`), and Heun's
    correction, with ``c = alpha' (s' - s)`` and the estimates ``x0``, ``x0~`` behind ``d``, ``d~``,

        x' = x~ + (c / 2) (d~ - d) = x~ + (c / (2 s')) (x0 - x0~),

    since ``d~ - d = (x0 - x0~) / s'``. Both read the estimates the net gave: the ``(x / alpha)``
    form derived ``eps`` from an ``x0``-predicting net and cancelled it against ``x`` again, losing
    ``log10(s / s')`` digits where ``alpha`` is tiny (zero terminal SNR, Lin et al. 2024; measured
    there, 10 time-uniform steps, float32 against float64: Euler 1.3e-5 -> 1.2e-7, Heun 1.2e-3 ->
    3.8e-7 relative).

    A step dividing ``s`` by more than :data:`HEUN_MAX_RATIO` (``h = log(s / s') > 3``) combines the
    two estimates by the exponential trapezoid in ``lam`` instead, ``x0`` linear in ``lam`` between
    them (second order too, DPM-Solver-2 with the estimate at the end point):
    ``x' = x~ + alpha' ((h - 1 + e^{-h}) / h) (x0~ - x0)``, whose weight stays below ``alpha'``. A step
    that multiplies ``s`` (up the noise levels: :func:`steerdiff.invert`) keeps the trapezoid: there
    (``h < 0``) that weight exceeds ``alpha'`` (5.4 ``alpha'`` at ``h = -3``), and inverting with it, the
    same rule by ``|h|``, was far worse (8-d mixture of the tests, 32 samples, against the exact ODE:
    rectified flow on ``karras`` at 5 steps 5.8 against 0.47, EDM on ``time_uniform`` at 10 steps 72
    against 0.81; ``tests/test_invert.py::test_heun_keeps_its_trapezoid_up_the_grid``).
    """
    (t, a, s), (t_next, a_next, s_next) = frm, to
    if pred is None:
        pred = model(x, t, step)
    x_euler = pred.renoise(a_next, s_next)
    if not second or s_next == 0:
        return x_euler
    pred2 = model(x_euler, t_next, step)
    if s / a > HEUN_MAX_RATIO * (s_next / a_next):  # x0 linear in lam between the two estimates
        h = math.log((s / a) / (s_next / a_next))
        return axpby(1.0, x_euler, a_next * hphi(2, h) / h, pred2.x0 - pred.x0)
    c = a_next * (s_next / a_next - s / a)  # x-space weight of a slope d = eps
    if pred.x0_given and pred2.x0_given:
        return axpby(1.0, x_euler, 0.5 * c * a_next / s_next, pred.x0 - pred2.x0)
    return axpby(1.0, x_euler, 0.5 * c, pred2.eps - pred.eps)


@dataclass
class EDMStochasticHeun(Solver):
    """EDM's stochastic Heun sampler (Alg. 2); ``edm_sde``.

    Args:
        s_churn: total churn ``S_churn >= 0`` (``gamma = min(S_churn / N, sqrt(2) - 1)``).
        s_tmin, s_tmax: churn only where ``S_tmin <= sigma/alpha <= S_tmax``.
        s_noise: noise inflation ``S_noise`` (1.003 in EDM for real nets; 1 is exact).
        order: 2 (Heun) or 1 (Euler with churn).

    The defaults are EDM's ImageNet-64 setting (Table 5: ``S_churn = 40``, ``S_tmin = 0.05``,
    ``S_tmax = 50``) with ``S_noise = 1``.
    """

    name: ClassVar[str] = "edm_sde"
    picard: ClassVar[str | None] = "stages"
    staged: ClassVar[bool] = True
    static_state: ClassVar[bool] = True  # init_state: per-grid tables
    max_order: ClassVar[int] = 2
    order: int = 2
    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        who = "EDMStochasticHeun"
        self.s_churn = real(who, "s_churn", self.s_churn, lo=0, finite=False)
        self.s_tmin = real(who, "s_tmin", self.s_tmin, lo=0, finite=False)
        self.s_tmax = real(who, "s_tmax", self.s_tmax, lo=0, finite=False)
        if self.s_tmin > self.s_tmax:  # named as a pair: either may be the one out of place
            raise ValueError(f"{who}: need s_tmin <= s_tmax, got s_tmin={self.s_tmin}, s_tmax={self.s_tmax}")
        self.s_noise = real(who, "s_noise", self.s_noise, lo=0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: ``S_churn > 0`` and ``S_noise > 0``."""
        return self.s_churn > 0 and self.s_noise > 0

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """``churn``: the level ``(t^, alpha^, sigma^)`` each step starts from (``None`` where ``s^ = s_i``),
        the process evaluated once for the whole grid."""
        p = grid.process
        s_max = float(p.sigma(p.t_max) / p.alpha(p.t_max))
        gamma = min(self.s_churn / grid.steps, math.sqrt(2) - 1)
        r = [s / a for a, s in zip(grid.alpha[:-1], grid.sigma[:-1], strict=True)]
        r_hat = [min((1 + gamma) * ri, s_max) if self.s_tmin <= ri <= self.s_tmax else ri for ri in r]
        churned = [i for i in range(grid.steps) if r_hat[i] > r[i]]
        churn: list[Level | None] = [None] * grid.steps
        if churned:
            t_hat = p.t_of_sigma_ratio(torch.tensor([r_hat[i] for i in churned], dtype=torch.float64))
            a_hat, s_hat, _ = p.coefficients(t_hat)
            levels = zip(t_hat.tolist(), a_hat.tolist(), s_hat.tolist(), strict=True)
            for i, level in zip(churned, levels, strict=True):
                churn[i] = level
        return {"churn": churn}

    def noisy_on(self, grid: Grid) -> bool:
        """Whether some node of ``grid`` is churned (its ``sigma/alpha`` within ``[S_tmin, S_tmax]``)."""
        return self.stochastic and any(level is not None for level in self.init_state(grid)["churn"])

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        t, a, s = grid.t[i], grid.alpha[i], grid.sigma[i]
        to = (grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1])
        churn = state["churn"][i]
        if churn is not None:
            t_hat, a_hat, s_hat = churn
            ratio, std = noising((a, s), (a_hat, s_hat))
            top = t_hat if i == 0 else min(t_hat, grid.t[i - 1])  # disjoint from the previous step's draw
            x = axpby(ratio, x, std * self.s_noise, model.noise(t, top, x))
            t, a, s = churn
        return heun_update(model, x, i, (t, a, s), to, second=self.order == 2)
