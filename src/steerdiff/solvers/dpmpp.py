r"""Multistep DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models"), data prediction.

With ``h = lam_{i+1} - lam_i``, the exponential integrator of the data-prediction ODE
(:mod:`steerdiff.solvers._exp`) and the last denoised estimates ``m_0, m_1, m_2`` at
``lam_i, lam_{i-1}, lam_{i-2}`` (``h_0 = lam_i - lam_{i-1}``, ``h_1 = lam_{i-1} - lam_{i-2}``):

    1st order (DDIM):  x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) m_0
    2M (Alg. 2):       the same with  D = (1 + 1/(2r)) m_0 - 1/(2r) m_1,  r = h_0 / h
    3M:                x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} [h phi_1 m_0
                                 + h^2 phi_2 d_1 + (2 h^3 phi_3 + h_0 h^2 phi_2) d_2]

where ``d_1 = (m_0 - m_1)/h_0`` and ``d_2 = (d_1 - (m_1 - m_2)/h_1) / (h_0 + h_1)`` are Newton
divided differences in ``lam`` and ``phi_k = phi_k(-h)``: the 3M step integrates the quadratic
through the three estimates exactly. The DPM-Solver reference code (and diffusers) weights
``d_2`` by ``h^3 phi_3 + h_0 h^2 phi_2`` instead, which loses the third order (measured slope
2.7 against 3.2 over 10-40 log-SNR-uniform steps on the Gaussian-mixture oracle,
``tests/test_solvers_basic.py``); ``third_order="dpmsolver"`` reproduces it.
One NFE per step; warm-up at the first steps and lower order at the last (``lower_order_final``,
see :func:`~steerdiff.solvers.base.step_order`).

``max_h``, ``max_h_ratio``: steps longer than ``max_h`` in ``lam`` and than ``max_h_ratio`` times
the step before are first order (DDIM; :func:`~steerdiff.solvers.base.step_order`; ``max_h`` may be a
rule ``(grid, i) -> limit`` of the step, :data:`~steerdiff.solvers.base.MaxH`). By default 2 and 2
(:data:`~steerdiff.solvers.base.ODE_MAX_H`): the long last noisy step of ``time_uniform``,
``linspace`` and ``leading`` grids, where the extrapolated polynomial amplifies the estimates'
errors; ``max_h=math.inf`` is the paper's and diffusers' rule (the parity tests use it). In
``u = x / alpha`` the step reads ``u_{i+1} = e^{-h} u_i + (1 - e^{-h}) D``; on a mode where the
denoised estimate responds to ``u`` with gain ``-G`` (classifier-free guidance,
``(1 - w) D_u + w D_c``, makes ``G`` grow with the scale ``w``) the DDIM step is stable for
``(1 - e^{-h}) G < 1 + e^{-h}`` and the 2M step with equal steps for half that ``G``, so long steps
under strong guidance diverge with 2M where DDIM does not. The guided default
(:func:`steerdiff.sampling.guided_solver`) sets ``max_h`` by the guidance scale, with no ratio.

``max_ratio``: the step-ratio rule (:func:`~steerdiff.solvers.base.step_order`; default
:data:`~steerdiff.solvers.base.MAX_STEP_RATIO`, 2.5; ``math.inf``: none, the paper's and diffusers'): a step
down the grid, but the last into a noisy node, longer than ``max_ratio`` times the step before, whatever its
length, is at most second order (3M's quadratic weights its estimates by ``1 + 2w + 2w^2/3`` in sum over a
step ``w`` times the ones before, the line by ``1 + w``). ``python bench/longstep_rule.py`` (the solver
benchmark's mixture, 1024 draws, against the exact ODE; ``karras`` grids of 6-12 steps with one merged
mid-grid step 2.2-5.3 times the one before): 3M changes on 39 of 126 grids (the others' long step is already
first order by ``max_h``, or under 2.5 times the one before), better in 24 (every one whose long step ends
past ``lam = 0.19``: to 0.058x), worse in 15 (ending at ``lam <= 0.09``, by at most 1.69x), geometric mean
0.42x, largest error of the 39 1.170 -> 0.278, below 2M's on all 39 (16 without); on GITS's grids of the
authors' program at NFE 7-10 0.613 / 0.763 / 0.802 / 0.308 -> 0.172 / 0.135 / 0.111 / 0.087. No named
schedule's grid has such a step (the test of :mod:`steerdiff.solvers.deis`'s rule). Under 2.5 times the one
before 3M still breaks there (0.741 against 2M's 0.299 at 2.2-2.5): ``max_ratio=2`` for such grids (lcm's at
30-40 steps then change, by <= 0.11%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import boolean, choice, real
from .._ops import lincomb
from ._exp import hphi_scaled
from ._poly import newton_weights
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

__all__ = ["DPMSolverPPMultistep", "multistep_weights"]

THIRD_ORDERS = ("exact", "dpmsolver", "diffusers")  # the weight of d_2, see multistep_weights
SECOND_ORDERS = ("midpoint", "heun")


def multistep_weights(
    lams: list[float], k: int, h: float, c: float, second: str, third_order: str
) -> list[float]:
    """The weights ``w_j`` of ``S = sum_j w_j m_j``, the order-``k`` combination of the denoised estimates
    ``m_j`` (newest first, at ``lams``; ``k`` weights) in the step
    ``x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i + alpha_{i+1} S`` of multistep DPM-Solver++ (``c = 1``)
    and of its SDE (``c = 1 + eta``; :mod:`steerdiff.solvers.dpmpp_sde`), with
    ``W_j = hphi_scaled(j, h, c)``, ``h_0 = lam_i - lam_{i-1}`` and the divided differences ``d_1``,
    ``d_2`` in ``lam`` (written out on the estimates, :func:`~steerdiff.solvers._poly.newton_weights`):

        k = 1:               S = W_1 m_0
        k = 2, "midpoint":   S = W_1 [m_0 + h/(2 h_0) (m_0 - m_1)]   (Lu et al. 2022b, Alg. 2)
        k = 2, "heun":       S = W_1 m_0 + W_2 d_1
        k = 3:               S = W_1 m_0 + W_2 d_1 + (theta W_3 + h_0 W_2) d_2

    ``theta W_3`` is ``2 W_3`` (``"exact"``: the quadratic through the three estimates integrated
    exactly), ``W_3`` (``"dpmsolver"``: the reference code's, k-diffusion's) or ``W_3 - h^2``
    (``"diffusers"``: its SDE branch's).
    """
    w1 = hphi_scaled(1, h, c)
    if k == 1:
        return [w1]
    h0 = lams[0] - lams[1]
    if k == 2 and second == "midpoint":
        r = h / (2 * h0)
        return [w1 * (1 + r), -w1 * r]
    w2 = hphi_scaled(2, h, c)
    if k == 2:
        return newton_weights(lams, [w1, w2])
    w3 = hphi_scaled(3, h, c)
    theta_w3 = {"exact": 2 * w3, "dpmsolver": w3, "diffusers": w3 - h * h}[third_order]
    return newton_weights(lams, [w1, w2, theta_w3 + h0 * w2])


@dataclass
class DPMSolverPPMultistep(Solver):
    """DPM-Solver++ multistep of order 1-3 (``dpmpp_2m``: order 2, ``dpmpp_3m``: order 3)."""

    picard: ClassVar[str | None] = "step"

    max_order: ClassVar[int] = 3
    order: int = 2
    lower_order_final: bool = True
    third_order: str = "exact"
    max_h: MaxH = ODE_MAX_H
    max_h_ratio: float = ODE_MAX_H_RATIO
    max_ratio: float = MAX_STEP_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        check_long_step(self, self.max_h, self.max_h_ratio)
        self.max_ratio = real(who, "max_ratio", self.max_ratio, lo=1, finite=False)
        self.lower_order_final = boolean(who, "lower_order_final", self.lower_order_final)
        self.third_order = choice(who, "third_order", self.third_order, THIRD_ORDERS[:2])

    @property
    def name(self) -> str:  # type: ignore[override]
        """``dpmpp_{order}m``: the registry name of the order (``dpmpp_2m``, ``dpmpp_3m``)."""
        return f"dpmpp_{self.order}m"

    def init_state(self, grid: Grid) -> dict[str, Any]:
        return {"x0": History(self.order)}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        hist = state["x0"]
        hist.push(model(x, grid.t[i], i).x0, grid.lam[i])
        m, lams = hist.values, hist.at
        k = step_order(
            i, grid, self.order, len(m), self.lower_order_final, self.max_h, self.max_h_ratio, self.max_ratio
        )
        w = multistep_weights(lams, k, grid.h(i), 1.0, "midpoint", self.third_order)
        a = grid.alpha[i + 1]
        out = lincomb([grid.sigma[i + 1] / grid.sigma[i], *(a * wj for wj in w)], [x, *m[:k]])
        hist.trim()
        return out
