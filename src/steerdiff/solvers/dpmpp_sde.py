r"""Stochastic DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", appendix: SDE-DPM-Solver++), multistep and singlestep.

The reverse SDE in data prediction, integrated exactly in its linear part over ``h = lam_t - lam_s``
(:mod:`steerdiff.solvers._exp`), with noise scale ``eta`` (k-diffusion's and the paper's SDE at
``eta = 1``; the probability-flow ODE, i.e. DPM-Solver++, at ``eta = 0``) and ``c = 1 + eta``:

    x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t c int_0^h e^{-c(h-u)} x0(lam_s + u) du
          + sigma_t sqrt(1 - e^{-2 eta h}) z.

For every ``eta >= 0`` the step is exact when ``x0`` is known: given ``x_s ~ N(alpha_s x0, sigma_s^2)``
it gives ``x_t ~ N(alpha_t x0, sigma_t^2)``. With ``W_k = hphi_scaled(k, h, c)`` and the last
denoised estimates ``m_0, m_1, m_2`` at ``lam_i, lam_{i-1}, lam_{i-2}`` (``h_0``, ``h_1`` the
previous steps, ``d_1``, ``d_2`` the Newton divided differences in ``lam``), the mean is
``(sigma_{i+1}/sigma_i) e^{-eta h} x_i + alpha_{i+1} S``:

    1st order:            S = W_1 m_0
    2M, "midpoint":       S = W_1 [m_0 + h/(2 h_0) (m_0 - m_1)]   (diffusers' and k-diffusion's default)
    2M, "heun":           S = W_1 m_0 + W_2 d_1
    3M:                   S = W_1 m_0 + W_2 d_1 + (theta W_3 + h_0 W_2) d_2

``theta = 2`` integrates the quadratic through the three estimates (``third_order="exact"``);
``theta = 1`` is the DPM-Solver reference code's and k-diffusion's ``sample_dpmpp_3m_sde``
(``"dpmsolver"``). diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``
weights ``d_2`` by ``W_3 - h^2`` (``"diffusers"``): the ``- 0.5`` in its ``D2`` coefficient has the
sign of the ODE branch's, so its third-order step carries an ``O(h^2)`` local error.
At ``eta = 0`` the multistep solver is :class:`~steerdiff.solvers.dpmpp.DPMSolverPPMultistep`
(midpoint 2M; 3M with the same ``third_order``) with the same long-step rules: the SDE solver's
``max_h``, ``max_h_ratio`` (default :data:`~steerdiff.solvers.base.SDE_MAX_H`, ``SDE_MAX_H_RATIO``: first
order over a step longer than 0.5 in log-SNR and twice the one before; the ODE solver's 2 and 2) and the same
step-ratio rule (``max_ratio``, default :data:`~steerdiff.solvers.base.MAX_STEP_RATIO` in both). With each
one's defaults they differ only where a step is 0.5-2 in log-SNR and over twice the one before (SD betas, 30
``time_uniform`` steps, whose last noisy step is such, the tests' 8-d mixture: 0.047 apart, relative, at
order 2, 0.057 at order 3), not over a long mid-grid step under 0.5 (40 ``logsnr_uniform`` steps with 3
merged into one, 3 times the one before: equal to 1e-12; 7.4e-3 apart without the step-ratio rule).

``max_ratio``: the step-ratio rule of :class:`~steerdiff.solvers.dpmpp.DPMSolverPPMultistep`
(:func:`~steerdiff.solvers.base.step_order`): a step down the grid, but the last into a noisy node, longer
than ``max_ratio`` times the step before is at most second order (``dpmpp_3m_sde``'s). A step that long is
first order by ``SDE_MAX_H`` already where it is over 0.5 in log-SNR, so the rule reaches only shorter ones:
on the ``karras`` grids of 6-12 steps with one merged mid-grid step 2.2-5.3 times the one before (the ODE
solvers' ``bench/longstep_rule.py`` grids) it changes nothing. At ``eta = 1`` it neither helps nor hurts
beyond the distance's resolution: ``python bench/longstep_rule_sde.py`` (the SDE benchmark's 64-d mixture,
4096 exact draws of ``x_T``, sliced W2 to 16384 exact samples, floor 0.029; ``karras`` and ``logsnr_uniform``
grids of 20-50 steps with 3-4 intervals merged) changes 18 of 48 results, better in 10, worse in 8, geometric
mean 0.96x (0.70-1.22x; SA-Solver (3, 3): 1.02x, 0.88-1.24x). No step of the named schedules is affected
(the SDE benchmark's grids included: its numbers are unchanged). ``max_ratio=math.inf``: none (the paper's,
k-diffusion's and diffusers').

Singlestep (k-diffusion's ``sample_dpmpp_sde``, diffusers' ``DPMSolverSDEScheduler``): an SDE step
of the first order to ``lam_m = lam_s + r h`` (``r = 1/2``) with its own noise
``sigma_m sqrt(1 - e^{-2 eta r h}) z_1``, a second estimate ``m'`` there, then the step from ``x_i``
with ``S = W_1 [(1 - 1/(2r)) m_0 + 1/(2r) m']`` and noise ``sigma_{i+1} sqrt(1 - e^{-2 eta h}) z``.
Two NFE per step. ``z`` continues ``z_1`` along one Brownian path in process time: with
``p = (t_i - t_m) / (t_i - t_{i+1})``,

    z = sqrt(p) z_1 + sqrt(1 - p) z_2,

``z_1`` and ``z_2`` drawn with ``model.noise`` over ``[t_i, t_m]`` and ``[t_m, t_{i+1}]`` (independent draws
from a generator; independent increments of a :class:`~steerdiff.noise.BrownianTreeNoise`, whose ``z`` is then
its increment over the step). Drawn independently of ``z_1``, ``z`` would leave the intermediate estimate's
noise uncorrelated with the step's and the method first order. k-diffusion and diffusers draw both from one
Brownian tree too, but one indexed by ``rho = sigma / alpha``: their ``p`` is
``(rho_i - rho_m) / (rho_i - rho_{i+1})``. Both are ``r + O(h)``, so the order is the same; on the parity
test's replayed draws steerdiff's ``p`` stands in for the tree's. Both draws are made inside the step, which
returns the state (a Tensor; a :class:`~steerdiff.solvers.base.Transition` for ``eta = 0`` and ``order=1``),
as ``edm_sde`` and ``restart`` do: the step is not Gaussian given ``x_i``. For ``0 < eta < 1`` k-diffusion
splits the noise as an ancestral step instead (``sigma_up = eta s_t sqrt(1 - s_t^2 / s_s^2)`` with
``s = sigma / alpha``); both agree at ``eta = 0`` and ``eta = 1``.

Every multistep step (and ``order=1`` singlestep) returns its Gaussian draw as a
:class:`~steerdiff.solvers.base.Transition` with ``std = sigma_{i+1} sqrt(1 - e^{-2 eta h})``; the step
into a clean end returns the denoised estimate ``m_0`` (one NFE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import boolean, choice, real
from .._ops import axpby, lincomb
from ._exp import hphi_scaled, sde_decay, sde_std
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
from .dpm_solver import levels_at
from .dpmpp import SECOND_ORDERS, THIRD_ORDERS, multistep_weights

__all__ = ["DPMSolverSDE", "DPMSolverSDEMultistep"]


def _sde_step(grid: Grid, i: int, x: Tensor, w: list[float], m: list[Tensor], eta: float) -> Transition:
    """``N((sigma_{i+1}/sigma_i) e^{-eta h} x + alpha_{i+1} S, sigma_{i+1}^2 (1 - e^{-2 eta h}))`` with
    ``S = sum_j w_j m_j``."""
    h, sigma_t, a = grid.h(i), grid.sigma[i + 1], grid.alpha[i + 1]
    decay = sde_decay(grid.sigma[i], sigma_t, h, eta)
    return Transition(lincomb([decay, *(a * wj for wj in w)], [x, *m]), sde_std(sigma_t, h, eta))


@dataclass
class DPMSolverSDEMultistep(Solver):
    """SDE-DPM-Solver++ multistep of order 1-3 (``dpmpp_2m_sde``: order 2, ``dpmpp_3m_sde``: order 3).

    Args:
        order: 1-3.
        eta: noise scale ``>= 0`` (1: the paper's reverse SDE; 0: DPM-Solver++).
        solver_type: ``"midpoint"`` or ``"heun"``, the second-order weight (see the module docstring).
        third_order: ``"exact"``, ``"dpmsolver"`` (k-diffusion) or ``"diffusers"``.
        lower_order_final: diffusers' lower orders at the last steps below 15 steps.
        max_h, max_h_ratio: a step longer than ``max_h`` in log-SNR and than ``max_h_ratio`` times the
            step before is first order (:func:`~steerdiff.solvers.base.step_order`; the default
            :data:`~steerdiff.solvers.base.SDE_MAX_H` rule; ``inf``, 0 for none). ``max_h`` may be a rule
            ``(grid, i) -> limit`` of the step (:data:`~steerdiff.solvers.base.MaxH`; e.g.
            :class:`~steerdiff.smc.FKCStepLimit`, by the step's noise level).
        max_ratio: down the noise levels, a step (but the last into a noisy node) longer than ``max_ratio``
            times the step before is at most second order (module docstring; a number >= 1, default 2.5,
            :data:`~steerdiff.solvers.base.MAX_STEP_RATIO`; ``math.inf``: none, the paper's and diffusers').
    """

    picard: ClassVar[str | None] = "step"

    max_order: ClassVar[int] = 3
    order: int = 2
    eta: float = 1.0
    solver_type: str = "midpoint"
    third_order: str = "exact"
    lower_order_final: bool = True
    max_h: MaxH = SDE_MAX_H
    max_h_ratio: float = SDE_MAX_H_RATIO
    max_ratio: float = MAX_STEP_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        check_long_step(self, self.max_h, self.max_h_ratio)
        who = type(self).__name__
        self.max_ratio = real(who, "max_ratio", self.max_ratio, lo=1, finite=False)
        self.eta = real(who, "eta", self.eta, lo=0)
        self.solver_type = choice(who, "solver_type", self.solver_type, SECOND_ORDERS)
        self.third_order = choice(who, "third_order", self.third_order, THIRD_ORDERS)
        self.lower_order_final = boolean(who, "lower_order_final", self.lower_order_final)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: ``eta > 0`` (``eta = 0`` is DPM-Solver++)."""
        return self.eta > 0

    @property
    def name(self) -> str:  # type: ignore[override]
        """``dpmpp_{order}m_sde``: the registry name of the order (``dpmpp_2m_sde``, ``dpmpp_3m_sde``)."""
        return f"dpmpp_{self.order}m_sde"

    def init_state(self, grid: Grid) -> dict[str, Any]:
        return {"x0": History(self.order)}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        hist = state["x0"]
        hist.push(model(x, grid.t[i], i).x0, grid.lam[i])
        m, lams = hist.values, hist.at
        if grid.is_final_clean(i):
            return m[0]
        k = step_order(
            i, grid, self.order, len(m), self.lower_order_final, self.max_h, self.max_h_ratio, self.max_ratio
        )
        w = multistep_weights(lams, k, grid.h(i), 1.0 + self.eta, self.solver_type, self.third_order)
        out = _sde_step(grid, i, x, w, m[:k], self.eta)
        hist.trim()
        return out


@dataclass
class DPMSolverSDE(Solver):
    """Singlestep SDE-DPM-Solver++(2S) with the intermediate point at ``lam_i + r h`` (``dpmpp_sde``).

    Args:
        eta: noise scale ``>= 0`` (1: k-diffusion's and diffusers' default).
        r: where the intermediate estimate is taken, ``0 < r <= 1`` (default 1/2).

    NFE: 2 per step, 1 for the step into a clean end (``2 N - 1`` with ``final="zero"``); ``order=1``
    is the first-order step alone (one NFE per step).
    """

    name: ClassVar[str] = "dpmpp_sde"
    picard: ClassVar[str | None] = "stages"
    staged: ClassVar[bool] = True
    static_state: ClassVar[bool] = True  # init_state: per-grid tables
    max_order: ClassVar[int] = 2
    order: int = 2
    eta: float = 1.0
    r: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eta = real(type(self).__name__, "eta", self.eta, lo=0)
        self.r = real("DPMSolverSDE", "r", self.r, lo=0, hi=1, lo_open=True)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: ``eta > 0``."""
        return self.eta > 0

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """``mid``: the intermediate level ``(t, (alpha, sigma, lam))`` at ``lam_i + r h`` of each step into a
        noisy node, the process evaluated once for the whole grid."""
        if self.order == 1:
            return {}
        n = grid.steps - grid.clean_end
        return {"mid": levels_at(grid.process, [grid.lam[i] + self.r * grid.h(i) for i in range(n)])}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        m0 = model(x, grid.t[i], i).x0
        if grid.is_final_clean(i):
            return m0
        h, c = grid.h(i), 1.0 + self.eta
        if self.order == 2:
            t_mid, (a_mid, s_mid, lam_mid) = state["mid"][i]
            h_mid = lam_mid - grid.lam[i]
            decay = sde_decay(grid.sigma[i], s_mid, h_mid, self.eta)
            u = axpby(decay, x, a_mid * hphi_scaled(1, h_mid, c), m0)
            z_mid = None
            if self.eta > 0:
                z_mid = model.noise(grid.t[i], t_mid, u)
                u = u + sde_std(s_mid, h_mid, self.eta) * z_mid
            f = h / (2.0 * h_mid)  # 1 / (2 r)
            w1 = hphi_scaled(1, h, c)
            out = _sde_step(grid, i, x, [w1 * (1.0 - f), w1 * f], [m0, model(u, t_mid, i).x0], self.eta)
            if z_mid is None:
                return out
            # the step's noise continues the midpoint's draw along one Brownian path in process time: a
            # Brownian tree's increment over [t_i, t_{i+1}] sums those over [t_i, t_m] and [t_m, t_{i+1}]
            part = (grid.t[i] - t_mid) / (grid.t[i] - grid.t[i + 1])
            z = z_mid * math.sqrt(part)
            if part < 1.0:
                z = z.add_(model.noise(t_mid, grid.t[i + 1], u), alpha=math.sqrt(1.0 - part))
            return out.draw(lambda t_from, t_to, like: z, grid.t[i], grid.t[i + 1])
        return _sde_step(grid, i, x, [hphi_scaled(1, h, c)], [m0], self.eta)
