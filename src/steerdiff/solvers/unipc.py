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

Noise prediction computes the first-order part, ``(alpha_to / alpha_s) x_s - sigma_to (e^h - 1) eps_s``
(DDIM), as ``alpha_to x0_s + sigma_to eps_s`` from the estimate the net gave at ``s``
(:meth:`~steerdiff.denoiser.Prediction.renoise`: an ``x0``/``v`` net's ``x0``) plus ``alpha_to /
alpha_s`` times the move of ``x_s`` off the point evaluated there (UniC's correction), and adds the terms
in ``D_j`` (the weights of ``m_s, m_{s-1}, ...`` sum to ``phi_1`` for either ``B``, so those of ``j >= 1``
weight ``D_j``). Written as above, the update multiplies ``x_s`` by ``alpha_to / alpha_s`` (~250 on the
first step out of zero terminal SNR, ``alpha = 2^-12``) and cancels it against ``eps_s``: float32
against float64 on SD's betas rescaled to zero terminal SNR (16-d mixture, 10 steps, time_uniform /
trailing) was 1.9e-2 / 2.2e-3 for UniPC-3 that way, is 7.4e-5 / 1.4e-5 so, where a float64 run with its
state and estimates rounded to float32 at every step moves 2.7e-5 / 6.3e-6: the rest is the method's
amplification of rounding (bh2's UniC-1 weights ``eps_1 - eps_0`` by ~120 on that step).

Out of zero terminal SNR the noise form needs one more rule: ``eps`` departs from ``eps_s`` as
``e^{lam - lam_s}``, and UniC, which re-integrates a long first step (the top step of karras_capped,
time_uniform, trailing: ``h = 5.4`` on SD betas rescaled to zero terminal SNR at 10 karras_capped steps,
the next 0.48) with the line through ``eps_0`` and ``eps_1``, misses that exponential most where the noise
form weights it, at the start of the step (the singlestep DPM-Solver's mechanism,
:mod:`steerdiff.solvers.dpm_solver`); a predictor extrapolating over the short steps after it does not
(UniP alone gains nothing from the rule; nor do DEIS, iPNDM, LMS and MRS's noise form, predictors all, so
they have none). So after a step longer than ``max_h`` and than ``max_h_ratio`` times the next, the noise
form restarts its estimates (:meth:`moved`: no UniC of that node, and a first-order start, so that no later
UniC spans the long step either); the data form needs no such rule (its estimates ``x0`` change little
there). 16-d mixture on those betas, karras_capped, 64 samples,
against the exact ODE, UniPC-2 / UniPC-3 noise form without the rule 17 / 16 at 5 steps, 0.73 / 2.2 at 10,
0.40 / 0.40 at 20; with it 0.22 / 0.22, 0.047 / 0.067, 0.0056 / 0.0068; data form 0.30 / 0.28, 0.014 /
0.044, 0.0059 / 0.0053 (tests/test_unipc.py).

Up the noise levels (a :meth:`~steerdiff.solvers.base.Grid.reversed` grid, :func:`steerdiff.invert`:
``h < 0``) the forms swap roles (:mod:`steerdiff.inversion`): the noise form's weight ``e^{h-u}`` sits at
the end of the step, and the rule is for sampling steps only. Taken up the grid too it cost the noise form
(the inversion default; 8-d mixture of the tests, 16 samples, against the exact ODE) 2.6-9.5x at 5-20 steps
on ``time_uniform``, ``linspace`` and ``leading`` under SD's betas, with and without zero terminal SNR
(``time_uniform`` at 20 steps: 3.4e-2, now 3.9e-3), and up to 1.4x on ``time_uniform`` under flow, EDM and
``VP.cosine``; no other case changed. The data form would need it there instead (its weight ``e^{-(h-u)}``
sits at the start), but with :func:`~steerdiff.sampling.guided_solver`'s small ``max_h`` it then restarts
at most steps and loses the corrector (a CFG inversion at scale 7.5, 10 steps: 0.12 from the guided ODE
without, 0.40 with): its limits up the grid are those measured in :mod:`steerdiff.inversion`.

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
entries moved since are kept as handed (redoing the step from ``x_{i-1}`` would discard the edit). Where
the model marks ``x_i`` as a *guess* of the prediction (:attr:`~steerdiff.solvers.base.Model.guesses`:
:func:`steerdiff.paradigms`' Picard iteration, whose ``x_i`` is off the prediction by the iteration's
error) they move by UniC's move, ``x_i + (corrected - predicted)``, which depends on the estimates only:
kept as handed, an ``x_i`` off the prediction would be UniP's alone, and the Picard iteration would
accept a node only once its guess equals the prediction to the last bit (tests/test_paradigms.py).

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

from .._checks import boolean, choice, real
from .._ops import lincomb
from ._exp import phi
from ._poly import exp_adams_bashforth, lagrange_weights, unipc_moments
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
    step_limit,
    step_order,
)

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
            the step before is predicted at first order (``max_h`` may be a rule ``(grid, i) -> limit`` of
            the step, :data:`~steerdiff.solvers.base.MaxH`; its correction then uses two estimates):
            extrapolating the polynomial through estimates spaced by the short steps before over
            such a step amplifies their errors (:func:`~steerdiff.solvers.base.step_order`); with
            ``prediction="noise"``, after a step down the noise levels longer than ``max_h`` and than
            ``max_h_ratio`` times the next the estimates restart (not up them, in an inversion: module
            docstring). Default 2 and 2
            (:data:`~steerdiff.solvers.base.ODE_MAX_H`); ``max_h=math.inf`` is the paper's and diffusers'
            rule.
        max_ratio: the step-ratio rule: a prediction down the grid, but into the last noisy node, over a step
            longer than ``max_ratio`` times the step before is at most second order, whatever its length
            (:func:`~steerdiff.solvers.base.step_order`; default 2.5,
            :data:`~steerdiff.solvers.base.MAX_STEP_RATIO`; ``math.inf``: none, the paper's and diffusers').
            ``python bench/longstep_rule.py`` (the solver benchmark's mixture, ``karras`` grids with one
            merged mid-grid step 2.2-5.3 times the one before): UniPC-3 changes on 39 of 126 grids, better in
            20 (all whose long step ends past ``lam = 0.47``: to 0.052x), worse in 19 (ending at ``lam <=
            0.37``, by at most 1.52x), geometric mean 0.44x, largest error of the 39 0.742 -> 0.280, below
            UniPC-2 on 35 of the 39 (19 without); GITS's grids of the authors' program at NFE 7-10: 0.640 /
            0.731 / 0.758 / 0.281 -> 0.103 / 0.093 / 0.083 / 0.070. No named schedule's grid has such a step.
    """

    name: ClassVar[str] = "unipc"
    picard: ClassVar[str | None] = "step"
    max_order: ClassVar[int] = 3
    order: int = 3
    variant: str = "bh2"
    corrector: bool = True
    lower_order_final: bool = True
    prediction: str = "data"
    max_h: MaxH = ODE_MAX_H
    max_h_ratio: float = ODE_MAX_H_RATIO
    max_ratio: float = MAX_STEP_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        check_long_step(self, self.max_h, self.max_h_ratio)
        self.max_ratio = real(who, "max_ratio", self.max_ratio, lo=1, finite=False)
        self.variant = choice(who, "variant", self.variant, VARIANTS)
        self.corrector = boolean(who, "corrector", self.corrector)
        self.lower_order_final = boolean(who, "lower_order_final", self.lower_order_final)
        self.prediction = choice(who, "prediction", self.prediction, PREDICTIONS)

    def init_state(self, grid: Grid) -> dict[str, Any]:
        # m: estimates at their log-SNRs, newest first; x/k/pred: start (noise prediction: the DDIM part of
        # the update from it), order and result of the last prediction
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

        ``m[0]`` is the estimate at ``src``, ``m[1:]`` the earlier ones at ``lam[1:]``; ``x`` is ``x_src``,
        for noise prediction the DDIM part of the update (module docstring; :meth:`step`), added to on a copy.
        """
        h = grid.lam[dst] - grid.lam[src]
        g = h if self.prediction == "data" else -h
        r = [0.0, *((lj - lam[0]) / h for lj in lam[1:])]
        values = list(m) if new is None else [*m, new]
        if new is not None:
            r.append(1.0)
        if len(r) == 2:  # one difference: a_1 = 1/2
            w = lagrange_weights(r, unipc_moments(g, 1.0 if self.variant == "bh1" else phi(1, -g)))
        else:  # R a = b solved exactly: the exponential integral of the interpolating polynomial
            w = exp_adams_bashforth(r, -g)
        if self.prediction == "data":
            c, d = grid.sigma[dst] / grid.sigma[src], grid.alpha[dst]
            return lincomb([c, *(d * g * wj for wj in w)], [x, *values])
        d = grid.sigma[dst] * g  # the weights sum to phi_1(h): x plus sum_{j>=1} w_j (m_j - m_0)
        return lincomb([d * wj for wj in w[1:]], (v - values[0] for v in values[1:]), start=x.clone())

    def _order(self, i: int, grid: Grid, history: int) -> int:
        """The order of the prediction from node ``i`` with ``history`` estimates held
        (:func:`~steerdiff.solvers.base.step_order`)."""
        return step_order(
            i,
            grid,
            self.order,
            history,
            self.lower_order_final,
            self.max_h,
            self.max_h_ratio,
            self.max_ratio,
        )

    def _clean(self, x0: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        """The result of the step into a clean end: the denoised estimate ``x0`` of the last evaluation
        (:class:`~steerdiff.solvers.dc_solver.DCSolver` compensates it)."""
        return x0

    def _compensate(self, start: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> None:
        """Between the estimate at node ``i`` entering the history and the prediction from ``start``: nothing
        here (:class:`~steerdiff.solvers.dc_solver.DCSolver` replaces that estimate)."""

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        pred = model(x, grid.t[i], i)
        if grid.is_final_clean(i):
            return self._clean(pred.x0, i, grid, state)
        noise = self.prediction == "noise"
        # after a long step down the grid the eps estimates restart; up it the noise form's weight sits at the
        # step's end, and they need not (module docstring)
        if noise and i > 0 and grid.h(i - 1) > 0:
            h = grid.h(i - 1)
            if h > self.max_h_ratio * grid.h(i) and h > step_limit(self.max_h, grid, i - 1):
                self.moved(state)
        hist = state["m"]
        # noise prediction: the update's DDIM part, from the net's estimate before eps is derived (docstring)
        start = pred.renoise(grid.alpha[i + 1], grid.sigma[i + 1]) if noise else x
        new = pred.eps if noise else pred.x0
        if self.corrector and state["x"] is not None:
            k = state["k"]
            corrected = self._update(grid, state["x"], i - 1, i, hist.values[:k], hist.at[:k], new)
            predicted = state["pred"]
            if x is not predicted:  # entries moved since: kept, or a guess's moved by UniC's move (docstring)
                off = torch.add(x, corrected - predicted) if model.guesses else x
                corrected = torch.where(x == predicted, corrected, off)
            x = corrected
            if noise:  # x_i moved off the point evaluated: (alpha_{i+1} / alpha_i) times the move
                start.add_(x - pred.x, alpha=grid.alpha[i + 1] / grid.alpha[i])
            else:
                start = x
        hist.push(new, grid.lam[i])
        self._compensate(start, i, grid, state)
        m, lam = hist.values, hist.at
        k = self._order(i, grid, len(m))
        state["x"], state["k"] = start, k
        state["pred"] = self._update(grid, start, i, i + 1, m[:k], lam[:k], None)
        return state["pred"]
