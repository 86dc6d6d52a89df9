r"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): the multistep predictor UniP-p and the corrector UniC-p.

With ``h = lam_to - lam_from > 0``, data prediction (the default, "UniPC with DPM-Solver++")
uses the estimates ``m = x0`` and ``(c, d, g) = (sigma, alpha, h)``; noise prediction (the
paper's main text) uses ``m = eps`` and ``(c, d, g) = (alpha, sigma, -h)`` -- the paper's
``h -> -h`` duality. From node ``s`` (estimate ``m_s``; earlier ones ``m_{s-j}`` at ``lam_{s-j}``)
one update reads, with ``phi_k = phi_k(-g)`` (:mod:`steerdiff.solvers._exp`),

    x_to = (c_to / c_s) x_s + d_to g [phi_1 m_s + beta sum_j a_j D_j / r_j],
    r_j = (lam_{s-j} - lam_s) / h,   D_j = m_{s-j} - m_s,

where ``R a = b``, ``R_{nj} = r_j^{n-1}``, ``b_n = n! phi_{n+1} / beta`` (``n = 1..K`` for ``K``
differences), and ``B(h) = g beta`` is the paper's free factor: ``variant="bh1"``: ``B(h) = h``
(``beta = 1``), ``"bh2"``: ``B(h) = e^h - 1`` (``beta = phi_1``; ``1 - e^{-h}`` for data
prediction). Solved exactly, the system makes the update the exponential integral of the
polynomial through ``(r_j, m_{s-j})`` (``r_0 = 0``), whatever ``B``: it is computed as such
(:func:`steerdiff.solvers._poly.exp_adams_bashforth`). With a single difference UniPC takes
``a_1 = 1/2``, the limit of ``b_1`` as ``h -> 0`` (the paper's order theorem needs ``R a = b``
only up to ``O(h^p)``; diffusers does the same; :func:`steerdiff.solvers._poly.unipc_moments`), so
``B(h)`` matters only there: in UniP-2 and UniC-1. With bh2 and data prediction, UniP-2 is
DPM-Solver++(2M) and UniP-3 is :class:`~steerdiff.solvers.dpmpp.DPMSolverPPMultistep` of order 3
(exact third-order weight).

UniP-p (predictor ``x_i -> x_{i+1}``): differences to ``m_{i-1}, ..., m_{i-p+1}``.
UniC-p (corrector of ``x_i``, the step ``i-1 -> i`` redone): the same differences from node
``i-1`` plus ``r_p = 1``, ``D_p = m_i - m_{i-1}``, where ``m_i`` is the evaluation at the
*predicted* ``x_i``. That evaluation is re-used -- the corrected ``x_i`` is only the start of
the next prediction and is never evaluated -- so the corrector is free: **NFE = steps**. ``p``
of the corrector is that of the predictor that produced ``x_i``. UniPC-p has order ``p + 1``,
UniP-p alone (``corrector=False``) order ``p``; a first-order start (warm-up) limits UniPC-3's
observed order to about 3.6 on 10-80 steps.

UniC corrects the prediction it made, entry by entry: where a step is handed another ``x_i`` (a
pipeline's edits between steps, :class:`~steerdiff.integrations.diffusers.SteerdiffScheduler`) the
entries moved since are kept as handed (redoing the step from ``x_{i-1}`` would discard the edit).

A corrector's move at a node (:meth:`~steerdiff.solvers.base.Solver.moved`; at every node in
PC sampling) restarts the estimates and skips UniC there: each step is then UniP-1 (DDIM).

Warm-up and lower order at the last steps follow :func:`~steerdiff.solvers.base.step_order`
(diffusers' UniPC lowers the last orders at any step count, not only below 15 steps). The step
into a clean end returns the denoised estimate of the last evaluation, ``x0(x_{N-1})``: the
correction of ``x_{N-1}`` that diffusers computes there is multiplied by
``sigma_N / sigma_{N-1} = 0``, so it is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import boolean, choice
from .._ops import lincomb
from ._exp import phi
from ._poly import exp_adams_bashforth, lagrange_weights, unipc_moments
from .base import ODE_MAX_H, ODE_MAX_H_RATIO, Grid, History, Model, Solver, check_long_step, step_order

__all__ = ["UniPC"]

VARIANTS = ("bh1", "bh2")
PREDICTIONS = ("data", "noise")


@dataclass
class UniPC(Solver):
    """UniPC-p: UniP-p predictor and UniC-p corrector, order 1-3, one NFE per step.

    Args:
        order: ``p``, the predictor's order (diffusers' ``solver_order``).
        variant: ``"bh1"`` (``B(h) = h``) or ``"bh2"`` (``B(h) = e^h - 1``).
        corrector: apply UniC after every prediction that a later evaluation follows;
            ``False`` is the pure UniP-p predictor.
        lower_order_final: lower the order at the last steps of short runs (< 15 steps).
        prediction: integrate the data-prediction (``"data"``) or noise-prediction ODE.
        max_h, max_h_ratio: a step longer than ``max_h`` in log-SNR and than ``max_h_ratio`` times
            the step before is predicted at first order (its correction then uses two estimates):
            extrapolating the polynomial through estimates spaced by the short steps before over
            such a step amplifies their errors (:func:`~steerdiff.solvers.base.step_order`). Default
            2 and 2 (:data:`~steerdiff.solvers.base.ODE_MAX_H`); ``max_h=math.inf`` is the paper's
            and diffusers' rule.
    """

    name: ClassVar[str] = "unipc"
    max_order: ClassVar[int] = 3
    order: int = 3
    variant: str = "bh2"
    corrector: bool = True
    lower_order_final: bool = True
    prediction: str = "data"
    max_h: float = ODE_MAX_H
    max_h_ratio: float = ODE_MAX_H_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        check_long_step(self, self.max_h, self.max_h_ratio)
        self.variant = choice(who, "variant", self.variant, VARIANTS)
        self.corrector = boolean(who, "corrector", self.corrector)
        self.lower_order_final = boolean(who, "lower_order_final", self.lower_order_final)
        self.prediction = choice(who, "prediction", self.prediction, PREDICTIONS)

    def init_state(self, grid: Grid) -> dict[str, Any]:
        # m: estimates at their log-SNRs, newest first; x/k/pred: start, order and result of the last
        # prediction
        return {"m": History(self.order), "x": None, "k": 0, "pred": None}

    def moved(self, state: dict[str, Any]) -> None:
        """A corrector moved ``x_i``: no UniC of it (it would correct the prediction that was moved
        away from), and the estimates restart (:meth:`~steerdiff.solvers.base.Solver.moved`)."""
        super().moved(state)
        state["x"] = None

    def _update(
        self, grid: Grid, x: Tensor, src: int, dst: int, m: list[Tensor], lam: list[float], new: Tensor | None
    ) -> Tensor:
        """One UniP (``new=None``) or UniC (``new = m_dst``) update from node ``src`` to ``dst``.

        ``m[0]`` is the estimate at ``src``, ``m[1:]`` the earlier ones at ``lam[1:]``.
        """
        h = grid.lam[dst] - grid.lam[src]
        if self.prediction == "data":
            c, d, g = grid.sigma[dst] / grid.sigma[src], grid.alpha[dst], h
        else:
            c, d, g = grid.alpha[dst] / grid.alpha[src], grid.sigma[dst], -h
        r = [0.0, *((lj - lam[0]) / h for lj in lam[1:])]
        values = list(m) if new is None else [*m, new]
        if new is not None:
            r.append(1.0)
        if len(r) == 2:  # one difference: a_1 = 1/2
            w = lagrange_weights(r, unipc_moments(g, 1.0 if self.variant == "bh1" else phi(1, -g)))
        else:  # R a = b solved exactly: the exponential integral of the interpolating polynomial
            w = exp_adams_bashforth(r, -g)
        return lincomb([c, *(d * g * wj for wj in w)], [x, *values])

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        pred = model(x, grid.t[i], i)
        if grid.is_final_clean(i):
            return pred.x0
        hist = state["m"]
        new = pred.x0 if self.prediction == "data" else pred.eps
        if self.corrector and state["x"] is not None:
            k = state["k"]
            corrected = self._update(grid, state["x"], i - 1, i, hist.values[:k], hist.at[:k], new)
            pred = state["pred"]
            x = corrected if x is pred else torch.where(x == pred, corrected, x)
        hist.push(new, grid.lam[i])
        m, lam = hist.values, hist.at
        k = step_order(i, grid, self.order, len(m), self.lower_order_final, self.max_h, self.max_h_ratio)
        state["x"], state["k"] = x, k
        state["pred"] = self._update(grid, x, i, i + 1, m[:k], lam[:k], None)
        return state["pred"]
