r"""DPM-Solver-2 and DPM-Solver++(2S) with the intermediate point at the middle of each step in log-SNR:
k-diffusion's ``sample_dpm_2`` ("DPM2"), ``sample_dpm_2_ancestral`` ("DPM2 a") and
``sample_dpmpp_2s_ancestral`` ("DPM++ 2S a"); diffusers' ``KDPM2DiscreteScheduler`` and
``KDPM2AncestralDiscreteScheduler`` for the first two.

Every grid interval ``[t_i, t_{i+1}]`` is one singlestep second-order step of Lu et al. 2022 ("DPM-Solver",
Alg. 1, DPM-Solver-2; noise prediction, ``algorithm="dpmsolver"``) or Lu et al. 2022b ("DPM-Solver++",
Alg. 1, DPM-Solver++(2S); data prediction, ``algorithm="dpmsolver++"``) with ``r_1 = 1/2``: from node
``t_i`` (subscript ``s``) to the target level ``a`` over ``h = lam_a - lam_s``, an intermediate state ``u`` at
``lam_m = lam_s + h / 2`` (where ``sigma / alpha`` is the geometric mean of the ends'; the time
``t_m = t_of_lam(lam_m)``), then

    u   = first-order (DDIM) step from x_s to lam_m,
    x_a = first-order step from x_s to lam_a with f_s replaced by f(u, t_m)

(``f = eps`` or ``x0``; :func:`~steerdiff.solvers.dpm_solver.update` with the term of
:func:`~steerdiff.solvers.dpm_solver.midpoint_correction`, whose ``f_s + (f_1 - f_s) / (2 r_1)`` is ``f_1`` at
``r_1 = 1/2``). In ``y = x / alpha`` and ``s = sigma / alpha`` the noise-prediction step is

    x_a / alpha_a = (x_s - sigma_s hphi_eps(1, h) eps(u, t_m)) / alpha_s = y_s + (s_a - s_s) eps(u, t_m),
    u / alpha_m = y_s + (s_m - s_s) eps_s,

since ``hphi_eps(1, h) = 1 - e^{-h} = 1 - s_a / s_s``: k-diffusion's DPM2, an Euler step with the slope
taken at the midpoint in ``log s``. The data-prediction step is
``y_a = (s_a / s_s) y_s + (1 - s_a / s_s) x0(u, t_m)``, k-diffusion's ``sample_dpmpp_2s_ancestral`` before
its noise.

Ancestral (``eta > 0``, at most 1; k-diffusion's default 1): the step goes to ``sigma_down`` and adds fresh
noise of std ``sigma_up`` (:func:`~steerdiff.solvers.ddim.ancestral_split`, DDIM's ``eta`` variance, as
``euler_ancestral``): the target is ``a = (alpha_{i+1}, sigma_down)``, its midpoint that of ``lam_s`` and
``lam_a = log(alpha_{i+1} / sigma_down)``, and the step returns the
:class:`~steerdiff.solvers.base.Transition` ``N(x_a, sigma_up^2)``, its noise drawn over ``[t_i, t_{i+1}]``.
``eta <= 1`` keeps ``sigma_down > 0`` at every noisy node, so every such step has its midpoint and costs 2
NFE (above 1 k-diffusion falls back to a one-evaluation step where ``sigma_down`` is capped to 0, which
would make the NFE depend on the grid).

Long steps: the noise form's update weighs the midpoint's ``eps`` by ``s_s - s_a``, which a step dividing
``s = sigma / alpha`` by a large factor makes a large multiple of its error; the data form's weight on ``x0``
stays below ``alpha_a``. So a step of the grid dividing ``s`` by more than
:data:`~steerdiff.solvers.edm.HEUN_MAX_RATIO` (20; ``h > log 20``) takes the data-form update with the same
midpoint (DPM-Solver++(2S)), as ``heun`` and ``pndm`` take their data forms there (an ancestral step's
``sigma_down`` does not count: the grid's step does). On a 16-d mixture against the exact ODE (256
samples), ``karras`` at 2 / 3 steps: 13.8 / 0.69 before, 0.51 / 0.19 with it (SD betas), 72 / 36 -> 0.76 /
0.44 (zero terminal SNR), 685 / 32 -> 0.59 / 0.79 (rectified flow), 117 / 2.1 -> 0.89 / 0.41 (EDM);
``ddim`` 0.81 / 0.37, 0.92 / 0.90, 0.93 / 0.84, 0.91 / 0.49 (``tests/test_dpm_2.py``). diffusers' KDPM2
grids under SD's betas have such a step (their last noisy one, into ``sigma_min``) at up to 5 steps
(``linspace``) or 4 (``leading``); there this departs from them (the parity tests run 10 and 25 steps).

NFE: 2 per step, 1 for the step into a clean end, which returns the denoised estimate (``2 N - 1`` with
``final="zero"``, ``2 N`` without; diffusers' ``timesteps`` are the same ``2 N - 1``). ``order=1`` is the
first-order step alone (DDIM with ``eta``; one NFE per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import choice, real
from .base import Grid, Model, Solver, Transition
from .ddim import ancestral_split
from .dpm_solver import ALGORITHMS, Coefficients, levels_at, midpoint_correction, node_coefficients, update
from .edm import HEUN_MAX_RATIO

__all__ = ["DPMSolver2"]

_LONG_H = math.log(HEUN_MAX_RATIO)  # a step dividing sigma / alpha by more than HEUN_MAX_RATIO


@dataclass
class DPMSolver2(Solver):
    """DPM-Solver-2 / DPM-Solver++(2S) with ``r_1 = 1/2``, optionally ancestral; 2 NFE per step.

    Args:
        algorithm: ``"dpmsolver"`` (noise prediction, DPM2; the default) or ``"dpmsolver++"`` (data
            prediction, DPM++ 2S).
        eta: ancestral noise scale in ``[0, 1]`` (0: the ODE step; 1: ``dpm_2_ancestral``,
            ``dpmpp_2s_ancestral``).
    """

    picard: ClassVar[str | None] = "stages"

    staged: ClassVar[bool] = True
    static_state: ClassVar[bool] = True  # init_state: per-grid tables
    max_order: ClassVar[int] = 2
    order: int = 2
    algorithm: str = "dpmsolver"
    eta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.algorithm = choice("DPMSolver2", "algorithm", self.algorithm, ALGORITHMS)
        self.eta = real("DPMSolver2", "eta", self.eta, lo=0, hi=1)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``dpm_2`` / ``dpmpp_2s``, with ``_ancestral`` where ``eta > 0``."""
        return ("dpmpp_2s" if self.algorithm == "dpmsolver++" else "dpm_2") + "_ancestral" * (self.eta > 0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: ``eta > 0``."""
        return self.eta > 0

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """Per step into a noisy node: ``to``, the target level (node ``i + 1``, or ``sigma_down`` there),
        ``up``, the fresh noise's std, and (order 2) ``mid``, the intermediate ``(t, (alpha, sigma, lam))``;
        the process evaluated once for the whole grid."""
        to: list[Coefficients] = []
        up: list[float] = []
        for i in range(grid.steps - grid.clean_end):
            if self.eta == 0:
                to.append(node_coefficients(grid, i + 1))
                up.append(0.0)
                continue
            down, std = ancestral_split(grid, i, self.eta)
            alpha = grid.alpha[i + 1]
            to.append((alpha, down, math.log(alpha / down)))
            up.append(std)
        if self.order == 1:
            return {"to": to, "up": up}
        mid = levels_at(grid.process, [(grid.lam[i] + lvl[2]) / 2 for i, lvl in enumerate(to)])
        return {"to": to, "up": up, "mid": mid}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        if grid.is_final_clean(i):
            return pred.x0
        frm, to = node_coefficients(grid, i), state["to"][i]
        long = grid.h(i) > _LONG_H  # a long step of the grid takes the data form (module docstring)
        algorithm = "dpmsolver++" if long else self.algorithm
        data = algorithm == "dpmsolver++"
        f_s = pred.x0 if data else pred.eps
        # noise prediction: an x0 net's x0, read before eps is derived, for the DDIM part (dpm_solver.py)
        x0 = pred.x0 if not data and pred.x0_given else None
        corr = None
        if self.order == 2:
            t_mid, mid = state["mid"][i]
            u = update(algorithm, frm, mid, x, f_s, x0, None)
            pred_m = model(u, t_mid, i)
            f_m = pred_m.x0 if data else pred_m.eps
            corr = midpoint_correction(algorithm, to[2] - frm[2], mid[2] - frm[2], f_s, f_m)
        mean = update(algorithm, frm, to, x, f_s, x0, corr)
        up = state["up"][i]
        return mean if up == 0 else Transition(mean, up)
