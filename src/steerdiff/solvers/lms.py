r"""Linear multistep (LMS) sampler (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"; k-diffusion's ``sample_lms``, diffusers' ``LMSDiscreteScheduler``).

Adams-Bashforth on the probability-flow ODE ``dy/ds = eps`` in ``y = x / alpha``,
``s = sigma / alpha``, with variable steps: the Lagrange polynomial through the last ``k``
derivatives ``d_j = eps(x_j, t_j)`` at ``s_i, ..., s_{i-k+1}`` is integrated exactly over the
actual step ``Delta = s_{i+1} - s_i``:

    y_{i+1} = y_i + Delta sum_j w_j d_{i-j},   w_j = int_0^1 l_j(theta) dtheta,
    theta_j = (s_{i-j} - s_i) / Delta

(:func:`~steerdiff.solvers._poly.adams_bashforth`; the references integrate the same polynomial
by quadrature), and ``x_{i+1} = alpha_{i+1} y_{i+1}``. Computed, with ``y_i = x0_i + s_i d_i`` (the
net's own pair) and ``sum_j w_j = 1``, as the DDIM step plus the history's correction,

    x_{i+1} = alpha_{i+1} x0_i + sigma_{i+1} d_i + alpha_{i+1} Delta sum_{j>=1} w_j (d_{i-j} - d_i),

which never forms ``x / alpha``: near zero terminal SNR (``alpha_0`` ~ 1e-5) that quotient cancels
against ``Delta d_i`` and cost float32 runs 1e-4-5e-4 of relative error (now <= 7e-6). One NFE per step; order
``min(order, i + 1)`` (warm-up). The step into a clean end (``s = 0``) is first order and returns
the denoised estimate ``y_i - s_i d_i = x0``; k-diffusion and diffusers take a full-order step
there instead.

Up the noise levels (a :meth:`~steerdiff.solvers.base.Grid.reversed` grid, :func:`steerdiff.invert`) the
steps in ``s`` grow: by the step ratio ``omega = Delta_i / Delta_{i-1}`` (``e^{|h|}`` on a log-SNR uniform
grid), and the past nodes crowd within ``1 / omega`` of a step behind the current one. Far from the data
(``s^2`` much larger than the data's variance) ``eps`` is ``y / s``: ``y`` grows by ``omega`` a step, and
order ``k`` on a constant ratio is a recursion with ``k - 1`` parasitic roots besides it, ``(omega - 1) / 2``
of it at order 2 and more at 3 and 4; they reach the solution's own growth at ``omega`` = 3, 1.79, 1.36,
past which errors grow relative to it (inverting the 8-d mixture of the tests with order 4: 4.1e4 at 20
``karras_capped`` steps under rectified flow, 7.1 under EDM). So up the grid, and only there, order ``k``
needs each of the last ``k - 1`` step ratios to be at most :data:`MAX_RATIO_UP` ``[k]``, where the parasitic
roots are a quarter of the solution's growth (1.5, 1.12, 1.027), and takes the highest order that meets it
(:func:`order_up`). Measured on that mixture (16 samples) under SD's betas, with zero terminal SNR,
rectified flow, EDM and ``VP.cosine``, every schedule that applies, 5 / 10 / 20 / 40 steps (172 cases): the
largest error 6.7e8 before, 0.91 with the rule (EDM on ``time_uniform`` at 5 steps, ``ddim`` 0.93), and none
further from the exact inversion than ``ddim`` (first order; ``tests/test_invert.py``). It costs accuracy
where order 4 was stable: SD's betas on ``karras_capped`` at 20 / 40 steps 1.8e-2 / 8.0e-4 before, 3.3e-2 /
5.9e-3 with it. Sampling steps (``s`` falls) never consult it, nor do the fixed uniform-step weights of
:class:`~steerdiff.solvers.ipndm.IPNDM` (and PNDM), which do not grow with the ratio: their parasitic roots
stay below 0.5, 0.65, 0.89 of the growth at orders 2, 3, 4 whatever ``omega`` (their limits as it grows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._ops import axpby, lincomb
from ._poly import adams_bashforth
from .base import Grid, History, Model, Solver, step_order

__all__ = ["LMS", "MAX_RATIO_UP", "order_up"]

# omega at which the parasitic roots of order k's recursion on eps = y / s with a constant step ratio
# omega are a quarter of its growth omega (module docstring; order 2: (omega - 1) / 2 = 1 / 4; orders 3
# and 4 from the roots, tests/test_invert.py recomputes them). With a half (2, 1.34, 1.12) instead, 11 of
# the 172 cases of the module docstring's sweep end further than ddim from the exact inversion (by up to
# 2.3x); with a quarter none.
MAX_RATIO_UP = {2: 1.5, 3: 1.1208, 4: 1.0273}


def order_up(order: int, steps: Sequence[float]) -> int:
    """The highest order ``k <= order`` a step up the noise levels may take: each of the last ``k - 1`` step
    ratios ``steps[j] / steps[j + 1]`` at most ``MAX_RATIO_UP[k]``; ``steps`` are the lengths in
    ``sigma / alpha`` of this step and the ones before it, newest first (module docstring)."""
    k = order
    while k > 1 and any(steps[j] > MAX_RATIO_UP[k] * steps[j + 1] for j in range(k - 1)):
        k -= 1
    return k


@dataclass
class LMS(Solver):
    """Variable-step Adams-Bashforth in ``(x/alpha, sigma/alpha)`` of order 1-4; 1 NFE per step."""

    name: ClassVar[str] = "lms"
    picard: ClassVar[str | None] = "step"
    max_order: ClassVar[int] = 4
    # whether the weights follow the step ratios, and steps up the noise levels take order_up's rule
    ratio_rule: ClassVar[bool] = True
    order: int = 4

    def init_state(self, grid: Grid) -> dict[str, Any]:
        return {"eps": History(self.order)}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        hist = state["eps"]
        pred = model(x, grid.t[i], i)
        hist.push(pred.eps, grid.sigma[i] / grid.alpha[i])
        d, s = hist.values, hist.at
        k = step_order(i, grid, self.order, len(d), False)
        delta = grid.sigma[i + 1] / grid.alpha[i + 1] - s[0]
        if delta > 0 and self.ratio_rule:  # up the noise levels: the step-ratio rule (module docstring)
            k = order_up(k, [delta, *(s[j] - s[j + 1] for j in range(k - 1))])
        w = self.weights([(sj - s[0]) / delta for sj in s[:k]])
        a = grid.alpha[i + 1]
        x = axpby(a, pred.x0, grid.sigma[i + 1], d[0])
        x = lincomb([a * delta * wj for wj in w[1:]], (dj - d[0] for dj in d[1:k]), start=x)
        hist.trim()
        return x

    def weights(self, nodes: list[float]) -> Sequence[float]:
        """Quadrature weights of the past derivatives at ``nodes`` (in units of the step)."""
        return adams_bashforth(nodes)
