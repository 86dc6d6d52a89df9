r"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models"): stochastic Adams predictor and corrector on the variance-controlled diffusion SDE,
data prediction.

The SDE family ``dx = [f x - (1 + tau^2) g^2 / 2 grad log p] dt + tau g dw`` has the marginals of
the data for every ``tau(t) >= 0`` (``tau = 0``: the probability-flow ODE, ``tau = 1``: the
reverse SDE). In ``lam = log(alpha / sigma)``, with ``h = lam_t - lam_s`` and ``c = 1 + tau^2``
(``tau`` taken at the step's start ``s``), its exact solution in data prediction is

    x_t = e^{-tau^2 h} (sigma_t / sigma_s) x_s + alpha_t c int_0^h e^{-c (h - u)} x0(lam_s + u) du
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) z.

The integral of the Lagrange polynomial through the estimates ``m_j`` at ``theta_j`` (the nodes
in units of the step, ``theta = u / h``) is exact: ``alpha_t H sum_j w_j m_j``, ``H = c h``,
``w_j = int_0^1 e^{-H (1 - theta)} l_j(theta) dtheta``
(:func:`~steerdiff.solvers._poly.exp_adams_bashforth` at ``-H``).

* SA-Predictor of order ``p`` (step ``i -> i+1``): nodes ``lam_i, ..., lam_{i-p+1}``.
* SA-Corrector of order ``q``: redoes step ``i-1 -> i`` with the nodes ``lam_i, ..., lam_{i-q+1}``,
  ``m_i`` evaluated at the *predicted* ``x_i``, and the *same* noise ``z``. Hence the corrected
  state is ``x_i + alpha_i H (sum w^C m - sum w^P m)``: the predictor's noise need not be known.
  The evaluation is re-used by the next prediction (the corrected state is never evaluated), so
  the corrector is free: **NFE = steps**, as in UniPC.

``second_order="sasolver"`` reproduces the authors' code (and diffusers' ``SASolverScheduler``): with two
nodes, the moment ``int_0^1 e^{-H (1 - theta)} theta dtheta = phi_2(-H)`` is replaced by its ``H -> 0`` limit
1/2 (an ``O(h^3)`` change, like UniPC's ``B(h) = h``); then ``tau = 0`` with ``corrector_order = order + 1``
is exactly :class:`~steerdiff.solvers.unipc.UniPC` with ``variant="bh1"``
(:func:`~steerdiff.solvers._poly.unipc_moments`) and the same long-step rules (SA-Solver's ``max_h``,
``max_h_ratio``, default :data:`~steerdiff.solvers.base.SDE_MAX_H`, ``SDE_MAX_H_RATIO``: first order over a
step longer than 0.5 in log-SNR and twice the one before, UniPC's 2 and 2; the same step-ratio rule,
``max_ratio``, default :data:`~steerdiff.solvers.base.MAX_STEP_RATIO` in both). With each one's defaults they
differ only where a step is 0.5-2 in log-SNR and over twice the one before (SD betas, 30 ``time_uniform``
steps, whose last noisy step is such, the tests' 8-d mixture: 0.10 apart, relative, at order 2, 0.056 at 3),
not over a long mid-grid step under 0.5 (40 ``logsnr_uniform`` steps with 3 merged into one, 3 times the one
before, order 3: equal to 1e-12; 1.7e-3 apart without the step-ratio rule). ``"exact"`` (default) keeps the
exact weight.

``max_ratio``: the step-ratio rule of :class:`~steerdiff.solvers.unipc.UniPC`
(:func:`~steerdiff.solvers.base.step_order`): a prediction down the grid, but into the last noisy node, over a
step longer than ``max_ratio`` times the step before is at most second order (the corrector of its end at most
third). It reaches only predictor or corrector orders above 2 (not the default (2, 2)), and only steps under
0.5 in log-SNR, since ``SDE_MAX_H`` makes longer ones first order already; at ``tau = 1`` its effect is within
the distance's resolution (``bench/longstep_rule_sde.py``: order (3, 3) changes 18 of 48 results, geometric
mean 1.02x, 0.88-1.24x; the numbers in :mod:`~steerdiff.solvers.dpmpp_sde`). ``max_ratio=math.inf``: none
(the paper's and diffusers').

The predictor's transition is exposed: ``mean = e^{-tau^2 h} (sigma_t / sigma_s) x_s + alpha_t H sum
w^P m``, ``std = sigma_t sqrt(1 - e^{-2 tau^2 h})`` (a Tensor is returned where ``std = 0``: ``tau =
0`` and the step into a clean end, which returns the denoised estimate). Orders: warm-up, and lower
orders at the last steps of runs shorter than 15 steps
(:func:`~steerdiff.solvers.base.step_order`; diffusers lowers them at any step count); the
corrector of ``x_i`` has order at most ``i + 1``, and at most one more than the predictor order the
last steps allow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import boolean, choice, integer, real
from .._ops import axpby, lincomb
from ._exp import sde_decay, sde_std
from ._poly import exp_adams_bashforth, lagrange_weights, unipc_moments
from .base import (
    MAX_STEP_RATIO,
    SDE_MAX_H,
    SDE_MAX_H_RATIO,
    Grid,
    History,
    MaxH,
    Model,
    Solver,
    Transition,
    check_long_step,
    step_order,
)

__all__ = ["SASolver"]

SECOND_ORDER = ("exact", "sasolver")


@dataclass
class SASolver(Solver):
    """SA-Solver: SA-Predictor of order ``order`` (1-4) and SA-Corrector of order ``corrector_order``.

    Args:
        order: the predictor's order ``p`` (diffusers' ``predictor_order``).
        corrector_order: the corrector's order ``q`` (1-4), 0 for the predictor alone.
        tau: the noise level ``tau(t) >= 0``: a number, or a function of process time (evaluated at
            each step's start). Diffusers' default for 1000-step models is
            ``lambda t: 1.0 if 200 <= t <= 800 else 0.0``.
        second_order: ``"exact"`` or ``"sasolver"`` (the two-node weight of the authors' code).
        lower_order_final: lower the orders at the last steps of short runs.
        max_h, max_h_ratio: a step longer than ``max_h`` in log-SNR and than ``max_h_ratio`` times the
            step before is first order, predictor and corrector (:func:`~steerdiff.solvers.base.step_order`;
            the default :data:`~steerdiff.solvers.base.SDE_MAX_H` rule; ``inf``, 0 for none); ``max_h`` may be
            a rule ``(grid, i) -> limit`` of the step (:data:`~steerdiff.solvers.base.MaxH`).
        max_ratio: down the noise levels, a step (but the last into a noisy node) longer than ``max_ratio``
            times the step before is at most second order, predictor and corrector (module docstring; a number
            >= 1, default 2.5, :data:`~steerdiff.solvers.base.MAX_STEP_RATIO`; ``math.inf``: none).
    """

    name: ClassVar[str] = "sa_solver"
    picard: ClassVar[str | None] = "step"
    max_order: ClassVar[int] = 4
    order: int = 2
    corrector_order: int = 2
    tau: float | Callable[[float], float] = 1.0
    second_order: str = "exact"
    lower_order_final: bool = True
    max_h: MaxH = SDE_MAX_H
    max_h_ratio: float = SDE_MAX_H_RATIO
    max_ratio: float = MAX_STEP_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        check_long_step(self, self.max_h, self.max_h_ratio)
        who = type(self).__name__
        self.max_ratio = real(who, "max_ratio", self.max_ratio, lo=1, finite=False)
        self.corrector_order = integer(who, "corrector_order", self.corrector_order, lo=0, hi=4)
        self.second_order = choice(who, "second_order", self.second_order, SECOND_ORDER)
        self.lower_order_final = boolean(who, "lower_order_final", self.lower_order_final)
        if not callable(self.tau):
            self._tau(0.0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: ``tau > 0`` (a function of time counts as noisy)."""
        return callable(self.tau) or self.tau > 0

    def noisy_on(self, grid: Grid) -> bool:
        """Whether ``tau`` is positive at a node a noisy step starts from (a function of time may vanish on
        the whole grid)."""
        noisy = grid.steps - 1 if grid.clean_end else grid.steps
        return any(self._tau(grid.t[i]) > 0 for i in range(noisy))

    def _tau(self, t: float) -> float:
        return real("SASolver", "tau", self.tau(t) if callable(self.tau) else self.tau, lo=0)

    def init_state(self, grid: Grid) -> dict[str, Any]:
        # m: estimates, newest first; prev: (corrector order, tau, predictor's gradient term) of the
        # last stochastic prediction
        return {"m": History(max(self.order, self.corrector_order)), "prev": None}

    def _weights(self, grid: Grid, src: int, tau: float, lam: list[float]) -> list[float]:
        """The weights ``alpha_t H w_j`` of the estimates ``m_j`` at ``lam`` in the gradient term
        ``alpha_t H sum_j w_j m_j`` of the step ``src -> src + 1``."""
        h = grid.h(src)
        big_h = (1 + tau**2) * h
        theta = [(lj - grid.lam[src]) / h for lj in lam]
        if len(theta) == 2 and self.second_order == "sasolver":  # UniPC's bh1 moments
            w = lagrange_weights(theta, unipc_moments(big_h, 1.0))
        else:
            w = exp_adams_bashforth(theta, -big_h)
        return [grid.alpha[src + 1] * big_h * wj for wj in w]

    def moved(self, state: dict[str, Any]) -> None:
        """A corrector moved ``x_i``: no SA-Corrector of it, and the estimates restart
        (:meth:`~steerdiff.solvers.base.Solver.moved`)."""
        super().moved(state)
        state["prev"] = None

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        x0 = model(x, grid.t[i], i).x0
        hist = state["m"]
        hist.push(x0, grid.lam[i])
        m, lam = hist.values, hist.at
        if state["prev"] is not None:  # SA-Corrector of x_i: same noise, so only the gradient changes
            q, tau, pred = state["prev"]
            x = lincomb(self._weights(grid, i - 1, tau, lam[:q]), m[:q], start=torch.sub(x, pred))
        if grid.is_final_clean(i):
            return x0
        long_step = (self.lower_order_final, self.max_h, self.max_h_ratio, self.max_ratio)
        k = step_order(i, grid, self.order, len(m), *long_step)
        tau = self._tau(grid.t[i])
        h = grid.h(i)
        pred = lincomb(self._weights(grid, i, tau, lam[:k]), m[:k])
        mean = axpby(sde_decay(grid.sigma[i], grid.sigma[i + 1], h, tau**2), x, 1.0, pred)
        if self.corrector_order > 0 and not grid.is_final_clean(i + 1) and i + 1 < grid.steps:
            # at most one order above what step_order allows the predictor (it counts the new estimate)
            q = (
                1
                if self.corrector_order == 1
                else 1 + step_order(i, grid, self.corrector_order - 1, len(m), *long_step)
            )
            state["prev"] = (q, tau, pred)
        else:
            state["prev"] = None
        std = sde_std(grid.sigma[i + 1], h, tau**2)
        return mean if std == 0 else Transition(mean, std)
