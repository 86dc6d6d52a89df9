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
does; both are third order.

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

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import choice
from ._exp import hphi, hphi_eps
from .base import Grid, Model, Solver

__all__ = ["DPMSolver"]

ALGORITHMS = ("dpmsolver++", "dpmsolver")
SECOND_STAGES = ("paper", "midpoint")


@dataclass
class DPMSolver(Solver):
    """Singlestep DPM-Solver(++) of order 1-3; ``N`` steps cost ``N`` NFE (see the module docstring).

    ``algorithm="dpmsolver++"`` integrates the data prediction (Lu et al. 2022b), ``"dpmsolver"``
    the noise prediction (Lu et al. 2022). ``second_stage`` picks the order-3 intermediate update:
    ``"paper"`` (Alg. 2) or ``"midpoint"`` (diffusers).
    """

    name: ClassVar[str] = "dpm_solver"
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
        # x, f, jk: start, estimates and (first node, order) of the current macro-step
        return {"plan": plan, "x": None, "f": [], "jk": (0, 0)}

    def _w(self, k: int, h: float) -> float:
        return hphi(k, h) if self.algorithm == "dpmsolver++" else hphi_eps(k, h)

    def _update(self, grid: Grid, j: int, a: int, x: Tensor, s: Tensor) -> Tensor:
        """Exponential-integrator update from node ``j`` to node ``a`` with weighted sum ``S = s``."""
        if self.algorithm == "dpmsolver++":
            return (grid.sigma[a] / grid.sigma[j]) * x + grid.alpha[a] * s
        return (grid.alpha[a] / grid.alpha[j]) * (x - grid.sigma[j] * s)

    def moved(self, state: dict[str, Any]) -> None:
        """A corrector moved the state at a node: the next step starts a macro-step there (:meth:`step`)."""
        state["x"] = None

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        j, k = state["plan"][i]
        pred = model(x, grid.t[i], i)
        f = pred.x0 if self.algorithm == "dpmsolver++" else pred.eps
        if i == j or state["x"] is None:  # a macro-step starts; after a move, the rest of the planned one
            state["x"], state["f"], state["jk"] = x, [f], (i, j + k - i)
        else:
            state["f"].append(f)
        (j, k), xs, fs = state["jk"], state["x"], state["f"]
        lam = grid.lam
        h = lam[i + 1] - lam[j]
        if i == j:  # first order: u_1, or the whole step for k = 1
            s = self._w(1, h) * fs[0]
        elif i == j + 1 and (k == 2 or self.second_stage == "midpoint"):  # 2S, to t or to u_2
            s = self._w(1, h) * (fs[0] + (h / (2 * (lam[j + 1] - lam[j]))) * (fs[1] - fs[0]))
        else:  # DPM-Solver-3: u_2 (i = j + 1) or the final update from f_2 (i = j + 2)
            s = self._w(1, h) * fs[0] + (self._w(2, h) / (lam[i] - lam[j])) * (fs[-1] - fs[0])
        return self._update(grid, j, i + 1, xs, s)
