r"""DEIS multistep (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
Integrator"), the Adams-Bashforth exponential integrators AB-DEIS on noise prediction.

With ``rho = sigma / alpha`` the noise-prediction ODE is ``d(x / alpha) = eps d rho``, so

    x_{i+1} / alpha_{i+1} = x_i / alpha_i + int_{t_i}^{t_{i+1}} eps(tau) d rho(tau).

AB-DEIS replaces ``eps`` by the Lagrange polynomial through the last ``k`` evaluations
``eps_i, ..., eps_{i-k+1}`` in some variable and integrates it exactly against ``d rho``:

    x_{i+1} / alpha_{i+1} = x_i / alpha_i + sum_j w_j eps_{i-j},   w_j = int l_j d rho.

The variable is the ``variant``:

* ``"log_rho"``: polynomial in ``lam = -log rho`` (the DEIS reference code's ``log-rho`` and
  diffusers' ``DEISMultistepScheduler``). Then ``d rho = -rho d lam`` and the weights are the
  exponential Adams-Bashforth weights in closed form, with ``h = lam_{i+1} - lam_i``:

      x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} h sum_j w_j eps_{i-j},
      w_j = int_0^1 e^{h (1 - theta)} l_j(theta) dtheta,   theta_j = (lam_{i-j} - lam_i) / h

  (:func:`~steerdiff.solvers._poly.exp_adams_bashforth`).
* ``"tab"``: the paper's tAB-DEIS, polynomial in process time ``t``; the weights
  ``w_j = int_{t_i}^{t_{i+1}} l_j(tau) rho'(tau) dtau`` have no closed form for a general process
  and are computed by Gauss-Legendre quadrature in ``u = log rho`` (:func:`tab_weights`), once
  per grid in :meth:`DEIS.init_state`.

The paper's rhoAB-DEIS (polynomial in ``rho``) is exactly steerdiff's ``lms``
(:class:`~steerdiff.solvers.lms.LMS`). Order 1 of every variant is DDIM,
``x_{i+1} = alpha_{i+1} x0_i + sigma_{i+1} eps_i``, which is also the step into a clean end (it
returns ``x0``). One NFE per step; warm-up at the first steps and lower order at the last
(``lower_order_final``, see :func:`~steerdiff.solvers.base.step_order`).

Every step is computed as that DDIM step (from the estimate the net gave,
:meth:`~steerdiff.denoiser.Prediction.renoise`) plus the history's correction
``sum_{j>=1} w_j (eps_{i-j} - eps_i)`` (times ``-sigma_{i+1} h``, resp. ``alpha_{i+1}``): the same
update, since the weights sum to ``int d rho``. The ``x_i / alpha_i`` form above multiplies ``x_i``
by ``alpha_{i+1} / alpha_i`` (348 on the first step out of zero terminal SNR, ``alpha = 2^-12``) and
cancels it against ``eps``: float32 against float64 on ``VP.scaled_linear`` rescaled to zero terminal
SNR (16-d mixture, karras_capped / trailing, 10 and 25 steps, both variants, orders 1-3) was median
1.8e-5, at most 1.1e-4 that way; is median 2.5e-7, at most 1.3e-6 so (DPM-Solver++(2M): at most
4.1e-7; order 1 is DDIM's float32 result exactly). What remains there is the method's own: on grids
with long log-SNR steps out of ``alpha ~ 0`` (karras from ``sigma / alpha = 4096``, logsnr_uniform)
its extrapolation of ``eps`` amplifies any per-step rounding (a float64 run whose state is perturbed
by ``2^-24`` after every step moves as far as float32 does): at 10 steps of karras up to 1.7e-5 for
``"log_rho"``, 1.2e-2 for ``"tab"`` at order 3.

Up the noise levels (a :meth:`~steerdiff.solvers.base.Grid.reversed` grid, :func:`steerdiff.invert`:
``h < 0``) the weight ``e^{h (1 - theta)}`` of the extrapolated ``eps`` grows towards the step's end, as
the data form's does when sampling (:mod:`steerdiff.solvers.dpmpp`), and a long step after short ones
extrapolates their errors: so there, and only there, a step longer than ``max_h`` in ``|h|`` and than
``max_h_ratio`` times the step before is first order (:func:`~steerdiff.solvers.base.step_order`; default
:data:`~steerdiff.solvers.base.ODE_MAX_H`, 2 and 2). Inverting the 8-d mixture of the tests (32 samples,
against the exact ODE) on ``karras_capped``, whose last step up is long (``t_max`` to ``sigma / alpha =
30``), at 20 / 40 steps: rectified flow 5.8e-2 / 3.0e-2 without the rule, 4.3e-3 / 1.5e-3 with it; SD's
betas rescaled to zero terminal SNR 0.11 / 6.3e-2 against 2.1e-3 / 1.6e-3; ``time_uniform`` under flow
0.37 / 6.1e-2 against 1.6e-2 / 4.6e-3; no step of ``logsnr_uniform``, nor of ``karras`` at 5-40 steps, is
affected.

Down the noise levels the step-ratio rule (``max_ratio``, default
:data:`~steerdiff.solvers.base.MAX_STEP_RATIO`, 2.5; :func:`~steerdiff.solvers.base.step_order`, shared with
DPM-Solver++ and UniPC): a step longer than ``max_ratio`` times the step before, but the one into the last
noisy node, is at most second order. Extrapolated over a step ``w`` times the steps between its nodes, the
quadratic through ``eps_i, eps_{i-1}, eps_{i-2}`` weights them by ``sum |w_j| = 1 + 2w + 2w^2/3``, the line by
``1 + w``: a step across the band where the denoised estimate settles, after short ones, carries their
differences' errors ``w^2``-fold. Adams methods are zero-stable for any step ratios (no extraneous roots:
Hairer, Norsett & Wanner, *Solving ODEs I*, Sec. III.5; Arevalo & Soderlind, BIT 2018; BDF2 needs ``w < 1 +
sqrt 2``, Grigorieff 1983), so the bound is on this amplification, not on stability; diffusers'
``DEISMultistepScheduler`` has none. ``python bench/longstep_rule.py`` (the solver benchmark's 64-d mixture
under SD's betas, 1024 draws, against the exact ODE; ``karras`` grids of 6-12 steps with 2-4 intervals merged
into one mid-grid step 2.2-5.3 times the one before): order 3 without the rule ends up to 0.691 from the exact
answer (DEIS-2 at most 0.423 there); the rule changes 71 of the 126 grids, better in 47 (all 35 whose long
step ends past ``lam = 1.2``: to 0.21x), worse in 24 (long steps ending at ``lam <= 1.14``, by at most 1.60x),
geometric mean 0.64x, largest error of the 71 0.691 -> 0.303 (of all 126: 0.423, DEIS-2's largest), below
DEIS-2 in 69 of the 71 (28 without). On GITS's grids of the authors' program (``max_ratio=None``; steps
3.7-4.0 times the one before) at NFE 7 / 8 / 9: 0.166 / 0.138 / 0.163 without, 0.147 / 0.110 / 0.074 with it.
The last step into a noisy node is left: on ``time_uniform``, ``linspace`` and ``leading`` it is 4.1-4.9 times
the one before (SD betas), and from 15 steps on (fewer: second order already, ``lower_order_final``) order 3
is up to 1.16x nearer the exact answer there (50 steps). No step of the named schedules' grids (3-50 steps,
six processes, ``tests/test_deis_ipndm_lms.py``) is affected. ``max_ratio=math.inf``: no rule (the paper's,
diffusers').

Default ``"log_rho"``, by measurement (order 3, NFE 5-50, karras_jump / karras / logsnr_uniform /
time_uniform on ``VP.scaled_linear``): its error is 1.1-4.8x below tAB's on a smooth mixture in 15
of 16 cases, and its median per-sample error 1.5-9x below on the benchmark problem at NFE >= 10,
where tAB's lower relative RMSE (mostly by <= 18%) comes from the few samples that change mode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .._checks import boolean, choice, real
from .._ops import lincomb
from ..processes import MeanRevertingDiscrete, Process, VPDiscrete
from ._poly import exp_adams_bashforth, lagrange_weights
from .base import (
    MAX_STEP_RATIO,
    ODE_MAX_H,
    ODE_MAX_H_RATIO,
    Grid,
    History,
    MaxH,
    Model,
    Solver,
    check_long_step,
    step_order,
)

__all__ = ["DEIS", "tab_weights"]

VARIANTS = ("log_rho", "tab")
GL_NODES = 8  # Gauss-Legendre nodes per piece
MAX_PIECE = 1.0  # longest piece in u = log rho


@functools.cache
def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def _kinks(process: Process, t_a: float, t_b: float) -> Tensor:
    """Times strictly between ``t_a`` and ``t_b`` at which ``t(lam)`` is not smooth.

    :meth:`~steerdiff.processes.VP.discrete`'s integer timesteps (``lam`` is linear between them) and
    :meth:`~steerdiff.processes.MeanReverting.discrete`'s (``thetabar`` is); none for the continuous
    processes.
    """
    if not isinstance(process, VPDiscrete | MeanRevertingDiscrete):
        return torch.zeros(0, dtype=torch.float64)
    lo, hi = min(t_a, t_b), max(t_a, t_b)
    return torch.arange(math.floor(lo) + 1, math.ceil(hi), dtype=torch.float64)


def tab_weights(process: Process, nodes: Sequence[float], t_next: float) -> list[float]:
    r"""tAB-DEIS weights ``w_j = int_{t_0}^{t_next} l_j(tau) d rho(tau)``, ``rho = sigma / alpha``.

    ``l_j`` is the Lagrange basis in process time through ``nodes`` (``nodes[0] = t_0`` the current
    node). With ``theta = (t - t_0) / (t_next - t_0)``, ``w_j = sum_m c_{jm} M_m``
    (:func:`~steerdiff.solvers._poly.lagrange_weights`) with the moments
    ``M_m = int theta^m d rho = int_{u_0}^{u_next} theta(t(u))^m e^u du`` in ``u = log rho = -lam``,
    by Gauss-Legendre quadrature (:data:`GL_NODES` nodes) on pieces of length at most
    :data:`MAX_PIECE` in ``u``, split where ``t(lam)`` has a kink (the integer timesteps of
    :meth:`VP.discrete` and :meth:`MeanReverting.discrete`), so the integrand is analytic on each piece (for
    ``VP.discrete``, ``t`` is linear in ``u`` there and the integrand a polynomial times ``e^u``).
    ``M_0 = rho_next - rho_0``.
    """
    t0 = nodes[0]
    u_a, u_b = (-float(process.lam(t)) for t in (t0, t_next))
    pieces = max(1, math.ceil(abs(u_b - u_a) / MAX_PIECE))
    knots = -process.lam(_kinks(process, t0, t_next))
    edges = torch.cat([torch.linspace(u_a, u_b, pieces + 1, dtype=torch.float64), knots])
    edges = edges.sort(descending=u_b < u_a).values
    x, w = _gauss_legendre(GL_NODES)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    u = (mid[:, None] + half[:, None] * x).flatten()
    dw = (half[:, None] * w).flatten() * u.exp()
    theta = (process.t_of_lam(-u) - t0) / (t_next - t0)
    moments = [float((dw * theta**m).sum()) for m in range(len(nodes))]
    return lagrange_weights([(t - t0) / (t_next - t0) for t in nodes], moments)


@dataclass
class DEIS(Solver):
    """AB-DEIS multistep of order 1-3; one network evaluation per step.

    Args:
        order: the number of past evaluations interpolated (diffusers' ``solver_order``).
        variant: ``"log_rho"`` (polynomial in ``lam``, diffusers' DEIS) or ``"tab"`` (polynomial in
            process time ``t``, the paper's tAB-DEIS).
        lower_order_final: lower the order at the last steps of short runs (< 15 steps).
        max_h, max_h_ratio: on a step up the noise levels (``h < 0``: an inversion's) longer than ``max_h``
            in ``|h|`` and than ``max_h_ratio`` times the step before, first order (module docstring; a rule
            ``(grid, i) -> limit`` is accepted, :data:`~steerdiff.solvers.base.MaxH`); default 2 and 2,
            ``max_h=math.inf``: none. Sampling steps (``h > 0``) have no such rule.
        max_ratio: down the noise levels, a step (but the last into a noisy node) longer than ``max_ratio``
            times the step before is at most second order (module docstring; a number >= 1, default 2.5,
            :data:`~steerdiff.solvers.base.MAX_STEP_RATIO`; ``math.inf``: none, the paper's and diffusers').
    """

    name: ClassVar[str] = "deis"
    picard: ClassVar[str | None] = "step"
    max_order: ClassVar[int] = 3
    order: int = 3
    variant: str = "log_rho"
    lower_order_final: bool = True
    max_h: MaxH = ODE_MAX_H
    max_h_ratio: float = ODE_MAX_H_RATIO
    max_ratio: float = MAX_STEP_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        check_long_step(self, self.max_h, self.max_h_ratio)
        self.max_ratio = real(who, "max_ratio", self.max_ratio, lo=1, finite=False)
        self.variant = choice(who, "variant", self.variant, VARIANTS)
        self.lower_order_final = boolean(who, "lower_order_final", self.lower_order_final)

    def _order(self, i: int, grid: Grid) -> int:
        # one evaluation is pushed per step, so min(i + 1, order) are available at step i; the long-step
        # rule only up the noise levels (module docstring), the step-ratio rule only down them (step_order)
        max_h = self.max_h if grid.h(i) < 0 else math.inf
        return step_order(
            i,
            grid,
            self.order,
            min(i + 1, self.order),
            self.lower_order_final,
            max_h,
            self.max_h_ratio,
            self.max_ratio,
        )

    def init_state(self, grid: Grid) -> dict[str, Any]:
        state: dict[str, Any] = {"eps": History(self.order)}
        if self.variant == "tab":
            state["w"] = [
                tab_weights(grid.process, grid.t[i - k + 1 : i + 1][::-1], grid.t[i + 1])
                if (k := self._order(i, grid)) > 1
                else None
                for i in range(grid.steps)
            ]
        return state

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        # DDIM plus the history's correction (module docstring); renoise before eps is derived, as it
        # reads eps once that is held
        pred = model(x, grid.t[i], i)
        a = grid.alpha[i + 1]
        out = pred.renoise(a, grid.sigma[i + 1])
        hist = state["eps"]
        hist.push(pred.eps, grid.lam[i])
        eps, lams = hist.values, hist.at
        k = min(self._order(i, grid), len(eps))  # fewer after a corrector's move restarted them
        if k > 1:
            if self.variant == "tab":  # x_{i+1} = alpha_{i+1} (x_i / alpha_i + sum_j w_j eps_{i-j})
                tab = state["w"][i]
                if len(tab) != k:  # a restart's warm-up
                    tab = tab_weights(grid.process, grid.t[i - k + 1 : i + 1][::-1], grid.t[i + 1])
                w = [a * wj for wj in tab]
            else:  # x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} h sum_j w_j eps_{i-j}
                h = grid.h(i)
                c = -grid.sigma[i + 1] * h
                w = [c * wj for wj in exp_adams_bashforth([(lam - lams[0]) / h for lam in lams[:k]], h)]
            out = lincomb(w[1:], (e - eps[0] for e in eps[1:k]), start=out)
        hist.trim()
        return out
