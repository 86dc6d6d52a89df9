r"""MR Sampler (MRS; Li et al. 2025, "A Fast Sampler for Mean Reverting Diffusion based on ODE and
SDE Solvers"): semi-analytic solutions of the PF-ODE and the reverse SDE of mean-reverting diffusion.

For ``y = x - mu`` (:class:`~steerdiff.processes.MeanReverting`) the paper's solutions are the
exponential integrators of a VP-like process (they hold for any ``alpha, sigma``). With
``h = lam_{i+1} - lam_i``, the integrated estimate ``m_0`` at ``lam_i`` (``x0`` for
``prediction="data"``, ``eps`` for ``"noise"``) and, at order 2, the divided difference
``d_1 = (m_0 - m_1) / h_0`` in ``lam`` (``h_0 = lam_i - lam_{i-1}``):

    ODE, data:   y' = (sigma'/sigma) y + alpha' [hphi(1, h) m_0 + hphi(2, h) d_1]
    ODE, noise:  y' = (alpha'/alpha) y - (alpha' sigma/alpha) [hphi_eps(1, h) m_0 + hphi_eps(2, h) d_1]
    SDE, data:   y' = (sigma'/sigma) e^{-h} y + alpha' [hphi(1, 2h) m_0 + hphi(2, 2h)/2 d_1]
                      + sigma' sqrt(1 - e^{-2h}) z
    SDE, noise:  y' = (alpha'/alpha) y - 2 (alpha' sigma/alpha) [hphi_eps(1, h) m_0 + hphi_eps(2, h) d_1]
                      + (alpha' sigma/alpha) sqrt(1 - e^{-2h}) z

(:mod:`steerdiff.solvers._exp`; ``hphi(k, 2h)/2^{k-1}`` is ``hphi_scaled(k, h, 2)``): the
polynomial through the estimates integrated exactly, which is the paper's MRS-1/2 and
diffusers' ``DPMSolverMultistepScheduler(solver_type="heun")`` for ``dpmsolver++`` / ``dpmsolver``
(ODE) and ``sde-dpmsolver++`` / ``sde-dpmsolver`` (SDE). Order 1 (ODE) is DDIM for both
predictions. The noise form is computed as DDIM's renoise of the net's own estimate to
``(alpha', (alpha' sigma/alpha)(1 - c w_0))`` (``c = 1`` ODE, 2 SDE; ``w_0`` the weight of ``m_0``)
plus the history's terms: the same update, as ``y = alpha x0 + sigma eps``. ``(alpha'/alpha) y``
multiplies ``y`` by 80-260 on the first step out of zero terminal SNR (``alpha = 2^-12``) and cancels it
against ``eps``: float32 against float64 there (orders 1-2, karras_capped / time_uniform, 10 and 25
steps) was up to 8.3e-4 for the ODE and 1.4e-5 for the SDE that way, is at most 1.9e-6 so. The net's
own parameterization (noise, data or MRS's velocity) is the
:class:`~steerdiff.denoiser.Denoiser`'s concern (:meth:`MeanReverting.denoiser`).

The noise form's SDE step holds ``eps`` fixed over the step with weight ``2 sigma' (e^h - 1)``: where
``alpha ~ 0`` (``eps_s ~ y / sigma``) its mean is ``(sigma' / sigma)(2 - e^h) y``, against the exact
contraction, so a long step diverges at first order already. Out of zero terminal SNR the first step of
karras_capped is ``h ~ 5.4`` (``e^h ~ 200``): 16-d mixture, SD betas rescaled to zero terminal SNR, sliced
W2 to 1024 exact samples (floor 0.078), at 10 / 20 / 50 steps the noise form's SDE reads 38 / 1.3 / 1.0
(order 1: 0.23 / 0.37 / 0.42), the data form's 0.083 / 0.068 / 0.059 (tests/test_mean_reverting.py). The
same holds for diffusers' ``sde-dpmsolver``; use the data form there.

One NFE per step; warm-up and ``lower_order_final`` as for the multistep solvers
(:func:`~steerdiff.solvers.base.step_order`); the step into a clean end returns the denoised
estimate (std 0). SDE steps return their :class:`~steerdiff.solvers.base.Transition`.

``max_h``, ``max_h_ratio``: a step longer than ``max_h`` in ``lam`` and than ``max_h_ratio`` times the step
before is first order (:func:`~steerdiff.solvers.base.step_order`). The data form has the long-step rule of
``dpmpp_2m`` by default (:data:`~steerdiff.solvers.base.ODE_MAX_H`, 2 and 2) and, with ``sde=True``, that of
``dpmpp_2m_sde`` (:data:`~steerdiff.solvers.base.SDE_MAX_H`, 0.5 and 2): the line through two estimates,
extrapolated over a step much longer than the one between them, amplifies their errors. On the
mean-reverting test process with ``time_uniform`` at 10 steps (last noisy step 2.84, 4.2 times the one
before) the ODE ends 0.0169 (relative) from the exact answer with it, 0.174 without; the SDE's sample
variance under SD betas at 20 steps is 0.99 of the true one with it, 1.72 without
(``tests/test_mean_reverting.py``). ``steerdiff bench longstep`` (docs/bench/longstep.csv, 16-d mixture,
six processes, every schedule, 3-50 steps): the rule changes 188 of 666 cases of the ODE, better in 177
(EDM + ``time_uniform`` at 50 steps 0.372 against 2.61), worse in 11 by at most 1.42x (EDM +
``time_uniform`` at 3-10 steps; ``karras`` at 3 steps on flow and zero-terminal-SNR betas; ``laplace`` at
20-30 steps on SD and zero-terminal-SNR betas, 1.02x), as for
``dpmpp_2m``. The noise form extrapolates ``eps`` (as DEIS, which has no rule either) and has none by
default (``max_h=inf``): on the test case above the ODE rule takes it from 0.0251 to 0.0427. ``max_h=inf``
is the paper's and diffusers' rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import boolean, choice
from .._ops import lincomb
from ._exp import hphi_eps, hphi_scaled, sde_decay, sde_std
from ._poly import newton_weights
from .base import (
    ODE_MAX_H,
    ODE_MAX_H_RATIO,
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

__all__ = ["MRSampler"]

PREDICTIONS = ("data", "noise")


@dataclass
class MRSampler(Solver):
    """MR Sampler of order 1-2 integrating the data (``"data"``) or noise (``"noise"``) prediction,
    the PF-ODE (``sde=False``) or the reverse SDE (``sde=True``).

    Args:
        max_h, max_h_ratio: a step longer than ``max_h`` in log-SNR and than ``max_h_ratio`` times the
            step before is first order (module docstring; ``max_h`` may be a rule ``(grid, i) -> limit``,
            :data:`~steerdiff.solvers.base.MaxH`). ``None``: the form's default, for the data form
            :data:`~steerdiff.solvers.base.ODE_MAX_H` (2, 2) or with ``sde=True``
            :data:`~steerdiff.solvers.base.SDE_MAX_H` (0.5, 2), for the noise form none (``inf``, 0).
    """

    name: ClassVar[str] = "mrs"
    picard: ClassVar[str | None] = "step"
    max_order: ClassVar[int] = 2
    order: int = 2
    prediction: str = "data"
    sde: bool = False
    lower_order_final: bool = True
    max_h: MaxH | None = None
    max_h_ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        self.prediction = choice(who, "prediction", self.prediction, PREDICTIONS)
        self.sde = boolean(who, "sde", self.sde)
        self.lower_order_final = boolean(who, "lower_order_final", self.lower_order_final)
        check_long_step(self, *self.long_step)

    @property
    def long_step(self) -> tuple[MaxH, float]:
        """``(max_h, max_h_ratio)`` with ``None`` read as the form's default (resolved here, not stored,
        so that ``dataclasses.replace`` to another form takes that form's)."""
        if self.prediction == "noise":  # no limit: step_order's own defaults
            rule = (math.inf, 0.0)
        else:
            rule = (SDE_MAX_H, SDE_MAX_H_RATIO) if self.sde else (ODE_MAX_H, ODE_MAX_H_RATIO)
        return (
            rule[0] if self.max_h is None else self.max_h,
            rule[1] if self.max_h_ratio is None else self.max_h_ratio,
        )

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.sde

    def init_state(self, grid: Grid) -> dict[str, Any]:
        return {"m": History(self.order)}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        if grid.is_final_clean(i):
            return pred.x0
        hist = state["m"]
        lams = [grid.lam[i], *hist.at][: self.order]  # with this step's estimate, pushed below
        k = step_order(i, grid, self.order, len(lams), self.lower_order_final, *self.long_step)
        h = grid.h(i)
        a0, s0, a1, s1 = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        eta = 1.0 if self.sde else 0.0  # the SDE damps x0 with rate c = 1 + eta
        c = 1.0 + eta
        if self.prediction == "data":  # of m_0 (, d_1)
            w = newton_weights(lams, [hphi_scaled(j, h, c) for j in range(1, k + 1)])
            hist.push(pred.x0, grid.lam[i])
            mean = lincomb([sde_decay(s0, s1, h, eta), *(a1 * wj for wj in w)], [x, *hist.values[:k]])
            std = sde_std(s1, h, eta)
        else:  # DDIM's renoise of the net's estimate, then the history's terms (module docstring)
            e = a1 * s0 / a0  # sigma' e^h
            w = newton_weights(lams, [hphi_eps(j, h) for j in range(1, k + 1)])
            mean = pred.renoise(a1, e - c * e * w[0])  # before eps is derived: renoise reads eps once held
            hist.push(pred.eps, grid.lam[i])
            mean = lincomb([-c * e * wj for wj in w[1:]], hist.values[1:k], start=mean)
            std = sde_std(e, h, eta)
        hist.trim()
        return Transition(mean, std) if self.sde else mean
