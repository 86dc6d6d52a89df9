r"""ER-SDE-Solver (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDE for
diffusion models"), VP form, orders 1-3.

The extended reverse-time SDE is a family of reverse processes with the same marginals, indexed by
a noise scale function ``phi`` of ``rho = sigma / alpha`` (``phi(rho) = rho``: the probability-flow
ODE; ``phi(rho) = rho^2``: the reverse diffusion SDE). Its exact solution from ``s`` to ``t`` in data
prediction is (paper, VP ER SDE solution)

    x_t = (alpha_t / alpha_s) (phi(rho_t) / phi(rho_s)) x_s
          + alpha_t phi(rho_t) int_{rho_t}^{rho_s} phi'(rho) / phi(rho)^2 x0(rho) drho
          + alpha_t sqrt(rho_t^2 - rho_s^2 phi(rho_t)^2 / phi(rho_s)^2) z.

Expanding ``x0`` in ``rho`` around ``rho_s`` and integrating by parts, the weights of
``1, (rho - rho_s), (rho - rho_s)^2 / 2`` are

    1 - phi_t / phi_s,
    W_1 = (rho_t - rho_s) + phi_t int_{rho_t}^{rho_s} drho / phi(rho),
    W_2 = (rho_t - rho_s)^2 / 2 + phi_t int_{rho_t}^{rho_s} (rho - rho_s) / phi(rho) drho,

the integrals taken numerically (composite Simpson in ``log rho``, ``quadrature`` intervals; the
authors' reference code takes a left Riemann sum of 100 points in ``rho``, ComfyUI's ``sample_er_sde``
one of 200). With the last denoised estimates ``m_0, m_1, m_2`` at ``rho_i, rho_{i-1}, rho_{i-2}``
and the Newton divided differences
``d_1 = (m_0 - m_1) / (rho_i - rho_{i-1})``, ``d_2 = (d_1 - (m_1 - m_2)/(rho_{i-1} - rho_{i-2}))
/ (rho_i - rho_{i-2})``, the mean of ER-SDE-Solver-k is ``(alpha_t/alpha_s)(phi_t/phi_s) x_s +
alpha_t S`` with

    order 1:  S = (1 - phi_t/phi_s) m_0
    order 2:  S = (1 - phi_t/phi_s) m_0 + W_1 d_1
    order 3:  S = (1 - phi_t/phi_s) m_0 + W_1 d_1 + (2 W_2 + (rho_i - rho_{i-1}) W_1) d_2.

Order 3 integrates the quadratic through the three estimates (``third_order="exact"``); the paper
takes ``x0' ~ d_1`` and ``x0'' ~ 2 d_2`` (``third_order="paper"``: ``2 W_2 d_2``), which drops the
``(rho_i - rho_{i-1}) W_1 d_2`` term and is second order. The default noise scale is the paper's
(and its reference code's) ``phi(rho) = rho (e^{rho^0.3} + 10)``; ``"ode"`` and ``"sde"`` name
``rho`` and ``rho^2``. ``phi(rho) / rho`` must be nondecreasing (the variance is
``sigma_t^2 (1 - q^2)``, ``q = (phi_t / rho_t) / (phi_s / rho_s)``). Order 1 with ``"ode"`` is DDIM
and with ``"sde"`` the first-order SDE-DPM-Solver++.

The stochastic part forgets the start only by the factor ``q`` accumulated over the solve: the
mean's dependence on ``x_T`` is ``(phi(rho_end) / rho_end) / (phi(rho_T) / rho_T)`` times the ODE's
(0.59 with the default noise scale on the SD schedule, ``rho`` from 14.6 to 0.03; 0 for ``"sde"``),
so a prior ``x_T ~ N(0, I)`` that differs from the marginal at ``t_max`` (VP ``scaled_linear``:
``alpha_T = 0.068``) leaves most of the exact ODE's bias.

With ``"sde"`` the higher orders follow no smooth curve: along the exact reverse SDE the estimate
``x0(x_rho)`` is a martingale, so the exact transition's mean is order 1's (``E[x_t | x_s]``, whatever the
data) and order 1 misses only variance (the integral's fluctuation); orders 2-3 make it up through the
step noise that ``m_0 - m_1`` carries, which converges on gradual grids but overshoots after a jump in
step length. Measured (SD betas, ``time_uniform``, 20 steps; last noisy step ``h = 2.07`` after 0.43,
``rho`` 0.232 -> 0.029 after 0.356 -> 0.232): order 3's weights on ``m_0, m_1, m_2`` are 4.26, -5.20, 1.92
there (``karras``: 1.06, -0.53, 0.11); on ``N(1, v)``, ``v`` 0.3-0.8, exact law, the output variance is
2.01-1.46 times ``v`` (order 2: 1.35-1.21, order 1: 0.68-0.76; ``karras``: 1.02, 0.98, 0.71), from
1.04-1.03 before that step, the mean exact; on the tests' 8-d smooth mixture (8192 samples, ``x_T`` exact)
sliced W2 0.159 / 0.072 for orders 3 / 2 against 0.020 on ``karras`` (floor 0.021), the variance 1.13-1.48
times the exact one. The transition is the paper's (its integral by Gauss-Legendre agrees to 6e-10 on
that step); the default noise scale's order 3 gives 1.09-1.03. ``time_uniform`` ends so on VP and flow
processes; ``dpmpp_3m_sde`` and ``sa_solver`` (3, 3) take such a step at first order (``SDE_MAX_H`` in
:mod:`~steerdiff.solvers.base`; without it 26.7 and 32.0 there), ER-SDE does not: on the exact Gaussian
that rule helps ``"sde"`` (better / worse in 51 / 37 cases at order 2, 61 / 27 at order 3, over 5
processes, 6 schedules, 5-40 steps) and hurts the default (10 / 78, 12 / 76). The authors' third-order
step (``third_order="paper"``, their reference code's ``dd_x0``) overshoots too; other draws of that mixture
(floor 0.033), SD betas, ``time_uniform``, order 3, sliced W2 at 20 / 50 steps: ``"paper"`` 0.110 / 0.049,
``"exact"`` 0.162 / 0.069, the default noise scale 0.029 / 0.030; with the rule ``"exact"`` 0.038 / 0.030, but
the default 0.062 against 0.036 at 10 steps. The cause is that of the SDE multistep solvers' long steps (the
note on ``SDE_MAX_H`` in :mod:`~steerdiff.solvers.base`).

The other multistep solvers' step-ratio rule (``max_ratio``, :func:`~steerdiff.solvers.base.step_order`: a
step down the grid, but the last into a noisy node, longer in log-SNR than ``max_ratio`` times the one before
is at most second order) is an option here, off by default (``max_ratio=math.inf``). Its premise, a
polynomial extrapolated over a step ``w`` times those between its nodes, holds in ``rho``, the variable of
ER-SDE's polynomial, where the steps it takes are not long: on the ``karras`` grids of
``bench/longstep_rule.py`` (6-12 steps, one merged step 3.4-5.3 times the one before in log-SNR) they are
0.6-2.1 times the one before in ``rho``. ``python bench/longstep_rule_sde.py`` (those grids and 48 of 20-50
steps; the SDE benchmark's 64-d mixture, 4096 exact draws of ``x_T``, sliced W2, floor 0.029), with / without
it where it changes a result: the default noise scale better in 33, worse in 38 of 71 (geometric mean 0.95x,
0.52-1.42x), 7 / 41 of 48 at 20-50 steps (1.03x); ``"sde"`` 47 / 24 (0.83x, 0.43-1.21x) and 26 / 22 (0.92x),
so ``ERSDE(noise_scale="sde", max_ratio=2.5)`` on such grids.

One NFE per step, warm-up at the first steps and lower order at the last
(:func:`~steerdiff.solvers.base.step_order`); the step into a clean end returns ``m_0``. Each step
returns its Gaussian draw as a :class:`~steerdiff.solvers.base.Transition`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import boolean, choice, integer, real
from .._ops import lincomb
from ._poly import newton_weights
from .base import Grid, History, Model, Solver, Transition, step_order

__all__ = ["ERSDE", "NOISE_SCALES"]


def _default_noise_scale(rho: float) -> float:
    """Cui et al. 2023's default noise scale function ``rho (e^{rho^0.3} + 10)``."""
    return rho * (math.exp(rho**0.3) + 10.0)


NOISE_SCALES: dict[str, Callable[[float], float]] = {
    "default": _default_noise_scale,
    "ode": lambda rho: rho,
    "sde": lambda rho: rho * rho,
}

_THIRD_ORDER = ("exact", "paper")


def _simpson_log(f: Callable[[float], float], lo: float, hi: float, n: int) -> float:
    """``int_lo^hi f(rho) drho`` by composite Simpson in ``v = log rho`` (``n`` even intervals)."""
    a, b = math.log(lo), math.log(hi)
    dv = (b - a) / n
    total = 0.0
    for j in range(n + 1):
        rho = math.exp(a + j * dv)
        w = 1.0 if j in (0, n) else (4.0 if j % 2 else 2.0)
        total += w * f(rho) * rho
    return total * dv / 3.0


@dataclass
class ERSDE(Solver):
    """ER-SDE-Solver-1/2/3 (default: order 3, the paper's noise scale function).

    Args:
        order: 1-3.
        noise_scale: ``"default"``, ``"ode"``, ``"sde"`` or a function ``phi(rho)`` (floats).
        third_order: ``"exact"`` or ``"paper"`` (see the module docstring).
        lower_order_final: diffusers' lower orders at the last steps below 15 steps.
        quadrature: Simpson intervals for the weight integrals (even, >= 2).
        max_ratio: the other multistep solvers' step-ratio rule (:func:`~steerdiff.solvers.base.step_order`: a
            step down the grid, but the last into a noisy node, longer in log-SNR than ``max_ratio`` times the
            one before is at most second order); a number >= 1, default ``math.inf``: off (module docstring).
    """

    name: ClassVar[str] = "er_sde"
    picard: ClassVar[str | None] = "step"
    max_order: ClassVar[int] = 3
    order: int = 3
    noise_scale: str | Callable[[float], float] = "default"
    third_order: str = "exact"
    lower_order_final: bool = True
    quadrature: int = 64
    max_ratio: float = math.inf

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        self.max_ratio = real(who, "max_ratio", self.max_ratio, lo=1, finite=False)
        if not callable(self.noise_scale):  # else a function of rho
            self.noise_scale = choice(who, "noise_scale", self.noise_scale, list(NOISE_SCALES))
        self.third_order = choice(who, "third_order", self.third_order, _THIRD_ORDER)
        self.lower_order_final = boolean(who, "lower_order_final", self.lower_order_final)
        self.quadrature = integer(who, "quadrature", self.quadrature, lo=2)
        if self.quadrature % 2:
            raise ValueError(f"{who}: quadrature must be even, got {self.quadrature}")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: every noise scale but ``"ode"``."""
        return self.noise_scale != "ode"

    @property
    def phi(self) -> Callable[[float], float]:
        """The noise scale function ``phi(rho)``."""
        return self.noise_scale if callable(self.noise_scale) else NOISE_SCALES[self.noise_scale]

    def init_state(self, grid: Grid) -> dict[str, Any]:
        return {"x0": History(self.order)}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        hist = state["x0"]
        rho = grid.sigma[i] / grid.alpha[i]
        hist.push(model(x, grid.t[i], i).x0, rho)
        m, rhos = hist.values, hist.at
        if grid.is_final_clean(i):
            return m[0]
        k = step_order(i, grid, self.order, len(m), self.lower_order_final, max_ratio=self.max_ratio)
        phi = self.phi
        rho_t = grid.sigma[i + 1] / grid.alpha[i + 1]
        phi_s, phi_t = phi(rho), phi(rho_t)
        q = (phi_t * rho) / (phi_s * rho_t)  # (phi_t / rho_t) / (phi_s / rho_s): 1 for the ODE
        if not 0.0 < q <= 1.0 + 1e-12:
            raise ValueError(
                f"ERSDE: noise_scale: phi(rho)/rho must be positive and nondecreasing; got ratio {q} "
                f"between rho={rho_t:.6g} and rho={rho:.6g}"
            )
        std = grid.sigma[i + 1] * math.sqrt(max(0.0, (1.0 - q) * (1.0 + q)))
        decay = grid.sigma[i + 1] / grid.sigma[i] * q  # (alpha_t / alpha_s)(phi_t / phi_s)
        coefs = [1.0 - phi_t / phi_s]  # of m_0, d_1 (, d_2)
        if k >= 2:
            n, dr = self.quadrature, rho_t - rho
            w1 = dr + phi_t * _simpson_log(lambda r: 1.0 / phi(r), rho_t, rho, n)
            coefs.append(w1)
            if k == 3:
                w2 = dr * dr / 2 + phi_t * _simpson_log(lambda r: (r - rho) / phi(r), rho_t, rho, n)
                r0 = rho - rhos[1]
                coefs.append(2 * w2 + (r0 * w1 if self.third_order == "exact" else 0.0))
        a = grid.alpha[i + 1]
        w = newton_weights(rhos, coefs)  # S written out on the estimates
        mean = lincomb([decay, *(a * wj for wj in w)], [x, *m[:k]])
        hist.trim()
        return Transition(mean, std)
