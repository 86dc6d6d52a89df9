r"""Singlestep DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic
Model Sampling in Around 10 Steps", Alg. 1-2) and singlestep DPM-Solver++ (Lu et al. 2022b,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Alg. 1).

A macro-step of order ``k`` goes from node ``s = t_j`` to ``t = t_{j+k}``; its intermediate points
are the grid nodes ``s_1 = t_{j+1}``, ``s_2 = t_{j+2}`` (so ``r_1 = h_1 / h``, ``r_2 = h_2 / h`` come
from the schedule), with ``h = lam_t - lam_s``, ``h_a = lam_{s_a} - lam_s``. With the estimates
``f_s, f_1, f_2`` at ``(x_s, s), (u_1, s_1), (u_2, s_2)`` and weights ``W_k``, every update reads

    dpmsolver++ (f = x0, W_k = hphi):      x_a = (sigma_a / sigma_s) x_s + alpha_a * S
    dpmsolver   (f = eps, W_k = hphi_eps): x_a = (alpha_a / alpha_s) (x_s - sigma_s * S)

(:mod:`steerdiff.solvers._exp`; ``hphi_eps`` is the paper's ``sigma_t h^k phi_k(h)`` over
``alpha_t sigma_s / alpha_s``, finite at a clean end) with ``S`` the weighted sum:

    u_1 (to s_1):               S = W_1(h_1) f_s
    order 2, to t (2S):         S = W_1(h) [f_s + (f_1 - f_s) / (2 r_1)]
    order 3, u_2 (to s_2):      S = W_1(h_2) f_s + W_2(h_2) (f_1 - f_s) / h_1
    order 3, to t:              S = W_1(h) f_s + W_2(h) (f_2 - f_s) / h_2

the last two being DPM-Solver-3 (Alg. 2; for ``x0`` the same exponential-integrator
transcription as DPM-Solver++(2S), as in the authors' reference code). ``second_stage="midpoint"``
computes ``u_2`` with the order-2 formula from ``s`` over ``[s, s_1, s_2]`` instead
(``S = W_1(h_2) [f_s + (f_1 - f_s) h_2 / (2 h_1)]``), as diffusers' ``DPMSolverSinglestepScheduler``
does. Both are third order where ``r_2 = 2/3`` (logsnr_uniform's ``r_1, r_2 = 1/3, 2/3``, those of Alg. 2)
or tends to it as the steps shrink (a smooth grid): the last update weights ``(f_2 - f_s) / h_2`` alone,
so its ``h^3 f''`` term is off by ``(1/6 - r_2/4) h^3``; with ``r_1, r_2`` held at ``1/10, 1/2`` the order is
2 (slope 1.90 / 1.94, noise / data prediction, 97-385 steps; tests/test_dpm_solver.py).

Each update is computed as the paper writes it (Alg. 1-2): the first-order step (DDIM) plus the
higher-order term. With ``S = W_1(h) f_s + c D`` (``c D`` the term in ``f_1 - f_s`` or ``f_2 - f_s``),

    dpmsolver++: x_a = (sigma_a / sigma_s) x_s + alpha_a hphi(1, h) x0_s + alpha_a c D
    dpmsolver:   x_a = (sigma_a / sigma_s) x_s + alpha_a hphi(1, h) x0_s - (alpha_a sigma_s / alpha_s) c D

(``h = lam_a - lam_s``), where, for noise prediction, the DDIM part ``(alpha_a / alpha_s) (x_s - sigma_s
hphi_eps(1, h) eps_s)`` is rearranged with ``x_s = alpha_s x0_s + sigma_s eps_s`` and ``alpha_a hphi(1, h)
= alpha_a - sigma_a alpha_s / sigma_s`` to read the ``x0`` an ``x0``/``v`` net gave (an ``eps`` net's
step keeps the ``eps`` form): the ``eps`` form multiplies ``x_s`` by ``alpha_a / alpha_s`` and cancels
it against ``eps_s`` where ``alpha_s`` is tiny. On SD's betas rescaled to zero terminal SNR (``alpha =
2^-12``, the 16-d mixture's exact ``x0``, 256 samples, order 3, 10 steps) float32 was 4.6e-2 / 4.8e-2
from float64 on time_uniform / trailing that way; is 3.4e-4 / 3.5e-5 so, within 2.5x of how far a float64
run perturbed by ``2^-24`` after every step moves (1.4e-4 / 2.6e-5; tests/test_dpm_solver.py): the rest
is the method's own amplification of rounding, by ``alpha_a sigma_s / alpha_s`` in ``c D``.

Noise prediction is inaccurate out of zero terminal SNR on grids whose first interval is much longer in
``lam`` than the next (``lam ~ log(t_max - t)`` there: time_uniform, trailing, karras_capped's top step):
the first macro-step's intermediate points, grid nodes, sit near its end (karras_capped, 10 steps:
``h = 6.4``, ``r_1, r_2 = 0.84, 0.92``). ``eps`` departs from ``eps_s`` as ``e^{lam - lam_s}`` (its term in
``alpha / sigma``), the weight ``e^{h-u}`` of the noise form sits at the start, and the chord through
``f_1`` (``f_2``) overshoots the exponential there by a factor growing as ``e^{h_1} / h_1``: truncation
error of the method, not its handling here: the run equals Alg. 1-2 as printed (to 1e-10), float32 is
within 3e-4 of float64 (an ``x0`` net), and diffusers' ``DPMSolverSinglestepScheduler(algorithm_type=
"dpmsolver")`` on the same betas and nodes (its default spacing, order 3, 10 steps, 128 samples) errs as
much as this one (49 and 49), as does UniPC's noise form (2.2; karras_capped, 10 steps). 16-d mixture, SD
betas rescaled to zero terminal SNR, 64 samples, relative RMSE against the exact ODE: karras_capped, order 3
at 10 steps 7.4 (data prediction 0.025, DDIM 0.28), order 2 at 20 steps 0.45 (0.016, 0.24); order 3 at 10
steps time_uniform 29 (0.24), trailing 14 (4.2e-3). The same macro-steps with their intermediate points at
the paper's ``r_1 = 1/2`` and ``r_1, r_2 = 1/3, 2/3`` (another grid of as many nodes) give 0.22 (order 3)
and 0.016 (order 2) on karras_capped (tests/test_dpm_solver.py); data prediction, the default, needs neither.

NFE: one per grid interval, each intermediate point being a grid node (as in diffusers), so ``N``
steps cost ``N`` evaluations. The macro-step orders follow the paper's DPM-Solver-fast: for order 3
and ``N`` steps ``[3, ..., 3, 2, 1]`` if ``N % 3 == 0``, ``[3, ..., 3, 1]`` if ``N % 3 == 1``,
``[3, ..., 3, 2]`` if ``N % 3 == 2``; for order 2 ``[2, ..., 2]`` or ``[2, ..., 2, 1]``; so few
steps lower the order. A corrector's move at a node (:meth:`~steerdiff.solvers.base.Solver.moved`)
restarts the macro-step there, over the intervals left of the planned one (at every node: every step
first order, DDIM); before, the end of a macro-step was rebuilt from its start and a move made at an
inner node was lost but for its effect on the estimate there. Into a clean end (``h = inf``) the
higher-order terms diverge: a last macro-step of order ``k > 1`` becomes one of order ``k - 1`` and a
first-order step that returns the denoised estimate at the last node (diffusers' order list with
``final_sigmas_type="zero"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import choice
from .._ops import axpby
from ..processes import Process
from ._exp import hphi, hphi_eps
from .base import Grid, Model, Solver

__all__ = ["DPMSolver"]

ALGORITHMS = ("dpmsolver++", "dpmsolver")
SECOND_STAGES = ("paper", "midpoint")
Correction = tuple[float, Tensor] | None  # (c, D): the higher-order term c D of an update
Coefficients = tuple[float, float, float]  # (alpha, sigma, lam) of a noise level, as Process.coefficients


def weights(algorithm: str) -> Callable[[int, float], float]:
    """The exponential-integrator weights ``W_k`` of ``algorithm``: ``hphi`` (``"dpmsolver++"``, data
    prediction) or ``hphi_eps`` (``"dpmsolver"``, noise prediction)."""
    return hphi if algorithm == "dpmsolver++" else hphi_eps


def midpoint_weight(algorithm: str, h: float, h1: float) -> float:
    """DPM-Solver-2 / DPM-Solver++(2S)'s ``c`` of ``c (f_1 - f_s)`` over ``h`` with the intermediate estimate
    ``f_1`` at ``lam_s + h1`` (``r_1 = h1 / h``): ``S = W_1(h) [f_s + (f_1 - f_s) / (2 r_1)]``."""
    return weights(algorithm)(1, h) * h / (2 * h1)


def midpoint_correction(algorithm: str, h: float, h1: float, f_s: Tensor, f_1: Tensor) -> Correction:
    """DPM-Solver-2 / DPM-Solver++(2S)'s term ``c D`` (:func:`midpoint_weight`, ``D = f_1 - f_s``)."""
    return midpoint_weight(algorithm, h, h1), f_1 - f_s


def third_order_weight(algorithm: str, h: float, h_a: float) -> float:
    """DPM-Solver-3's ``c`` of ``c (f_a - f_s)`` over ``h`` with the estimate ``f_a`` at ``lam_s + h_a``:
    ``S = W_1(h) f_s + W_2(h) (f_a - f_s) / h_a`` (Alg. 2: ``u_2`` from ``f_1``, the final update from
    ``f_2``)."""
    return weights(algorithm)(2, h) / h_a


def update_weights(
    algorithm: str, frm: Coefficients, to: Coefficients, from_x0: bool, c: float | None
) -> tuple[float, float, float]:
    """``(a, b, d)`` of the update from the level ``frm`` to ``to``, ``a x_s + b g + d D``: the first-order
    step from ``g = x0_s`` (``from_x0``: data prediction, or an ``x0`` the net gave) or ``g = eps_s``, plus
    the higher-order term ``c D`` of ``S`` (``c = None``: none; module docstring)."""
    (alpha_s, sigma_s, lam_s), (alpha_a, sigma_a, lam_a) = frm, to
    h = lam_a - lam_s
    scale = alpha_a if algorithm == "dpmsolver++" else -alpha_a * sigma_s / alpha_s  # -sigma_a e^h
    d = 0.0 if c is None else scale * c
    if from_x0:  # DDIM from x0: (sigma_a / sigma_s) x_s + alpha_a hphi(1, h) x0_s
        return sigma_a / sigma_s, alpha_a * hphi(1, h), d
    return alpha_a / alpha_s, scale * hphi_eps(1, h), d  # (alpha_a / alpha_s) (x_s - sigma_s hphi_eps eps_s)


def update(
    algorithm: str,
    frm: Coefficients,
    to: Coefficients,
    x: Tensor,
    f: Tensor,
    x0: Tensor | None,
    corr: Correction,
) -> Tensor:
    """The update from the level ``frm`` (state ``x``, estimate ``f``; ``x0``: the net's there, or ``None``)
    to ``to``: the first-order step plus ``corr = (c, D)``, the term ``c D`` of ``S`` (module docstring).
    """
    if algorithm == "dpmsolver++":
        x0 = f
    a, b, d = update_weights(algorithm, frm, to, x0 is not None, None if corr is None else corr[0])
    out = axpby(a, x, b, f if x0 is None else x0)
    if corr is not None:
        out.add_(corr[1], alpha=d)
    return out


def node_coefficients(grid: Grid, j: int) -> Coefficients:
    """``(alpha, sigma, lam)`` of grid node ``j``."""
    return grid.alpha[j], grid.sigma[j], grid.lam[j]


def levels_at(process: Process, lams: list[float]) -> list[tuple[float, Coefficients]]:
    """``(t, (alpha, sigma, lam))`` of the levels at the half log-SNRs ``lams`` (the intermediate points of
    singlestep solvers), the process evaluated once for all of them."""
    t = process.t_of_lam(torch.tensor(lams, dtype=torch.float64))
    alpha, sigma, lam = (c.tolist() for c in process.coefficients(t))
    return [(t_k, (alpha[k], sigma[k], lam[k])) for k, t_k in enumerate(t.tolist())]


@dataclass
class DPMSolver(Solver):
    """Singlestep DPM-Solver(++) of order 1-3; ``N`` steps cost ``N`` NFE (see the module docstring).

    ``algorithm="dpmsolver++"`` integrates the data prediction (Lu et al. 2022b), ``"dpmsolver"``
    the noise prediction (Lu et al. 2022). ``second_stage`` picks the order-3 intermediate update:
    ``"paper"`` (Alg. 2) or ``"midpoint"`` (diffusers).
    """

    name: ClassVar[str] = "dpm_solver"
    picard: ClassVar[str | None] = "step"  # its intermediate points are grid nodes, each one step's
    max_order: ClassVar[int] = 3
    order: int = 3
    algorithm: str = "dpmsolver++"
    second_stage: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        self.algorithm = choice(who, "algorithm", self.algorithm, ALGORITHMS)
        self.second_stage = choice(who, "second_stage", self.second_stage, SECOND_STAGES)

    def macro_orders(self, steps: int, clean_end: bool = True) -> list[int]:
        """Orders of the macro-steps over ``steps`` grid intervals (DPM-Solver-fast split).

        They sum to ``steps``; with ``clean_end`` a last macro-step of order ``k > 1`` is split
        into ``k - 1`` and ``1``, so that only a first-order step enters the clean node.
        """
        k = self.order
        q, rem = divmod(steps, k)
        orders = [3] * (q - 1) + [2, 1] if k == 3 and rem == 0 else [k] * q + [rem] * (rem > 0)
        if clean_end and orders[-1] > 1:
            last = orders.pop()
            orders += [last - 1, 1]
        return orders

    def init_state(self, grid: Grid) -> dict[str, Any]:
        plan: list[tuple[int, int]] = []  # (first node, order) of the macro-step of each interval
        for k in self.macro_orders(grid.steps, grid.clean_end):
            plan += [(len(plan), k)] * k
        # x, x0, f, jk: start, the net's x0 there (noise prediction), estimates and (first node, order) of
        # the current macro-step
        return {"plan": plan, "x": None, "x0": None, "f": [], "jk": (0, 0)}

    def moved(self, state: dict[str, Any]) -> None:
        """A corrector moved the state at a node: the next step starts a macro-step there (:meth:`step`)."""
        state["x"] = None

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        j, k = state["plan"][i]
        pred = model(x, grid.t[i], i)
        if i == j or state["x"] is None:  # a macro-step starts; after a move, the rest of the planned one
            # noise prediction: an x0 net's x0, read before eps is derived, for the DDIM part (docstring)
            x0 = pred.x0 if self.algorithm == "dpmsolver" and pred.x0_given else None
            f = pred.x0 if self.algorithm == "dpmsolver++" else pred.eps
            state["x"], state["x0"], state["f"], state["jk"] = x, x0, [f], (i, j + k - i)
        else:
            state["f"].append(pred.x0 if self.algorithm == "dpmsolver++" else pred.eps)
        (j, k), fs = state["jk"], state["f"]
        lam = grid.lam
        h = lam[i + 1] - lam[j]
        corr: Correction = None  # S = W_1(h) f_s + corr[0] corr[1]; none at first order (u_1, or k = 1)
        if i == j + 1 and (k == 2 or self.second_stage == "midpoint"):  # 2S, to t or to u_2
            corr = midpoint_correction(self.algorithm, h, lam[j + 1] - lam[j], fs[0], fs[1])
        elif i > j:  # DPM-Solver-3: u_2 (i = j + 1) or the final update from f_2 (i = j + 2)
            corr = (third_order_weight(self.algorithm, h, lam[i] - lam[j]), fs[-1] - fs[0])
        frm, to = node_coefficients(grid, j), node_coefficients(grid, i + 1)
        return update(self.algorithm, frm, to, state["x"], fs[0], state["x0"], corr)
