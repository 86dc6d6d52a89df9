r"""Coefficients-Preserving Sampling (Wang & Yu 2025, "Coefficients-Preserving Sampling for Reinforcement
Learning with Flow Matching", arXiv:2509.05952): a DDIM-like stochastic step whose output keeps the
forward marginal's coefficients, for the transition log-probabilities of online RL (Flow-GRPO,
Dance-GRPO) without the excess noise of an Euler-Maruyama step (:mod:`~steerdiff.solvers.flow_sde`).

With ``(x0, eps) = D(x_i, t_i)`` and the noise level ``a`` in ``[0, 1]``, DDIM's Eq. 12 (Song et al.
2021) with the fresh noise ``c = sigma_{i+1} sin(a pi / 2)``:

    x_{i+1} = alpha_{i+1} x0 + sqrt(sigma_{i+1}^2 - c^2) eps + c z
            = alpha_{i+1} x0 + sigma_{i+1} (cos(a pi / 2) eps + sin(a pi / 2) z),    z ~ N(0, I).

Where the estimates are exact (``x_i = alpha_i x0 + sigma_i eps``) the step lands on the marginal at
``t_{i+1}`` with its coefficients: ``alpha_{i+1}`` on ``x0`` and a unit normal of std ``sigma_{i+1}``
(``cos^2 + sin^2 = 1``), at any step size and noise level. Under rectified flow (``alpha = 1 - t``,
``sigma = t``) it is the paper's sampler, ``x_{t'} = (1 - t') x0 + sqrt(t'^2 - c^2) eps + c z`` with
``x0 = x - t v``, ``eps = x + (1 - t) v``; the step holds for any process.

It is DDIM's split of ``sigma_{i+1}`` (:func:`~steerdiff.solvers.ddim.noise_split`) with ``c`` set by
``a`` instead of Eq. 16's ``eta sigma_{i+1} sqrt(1 - exp(-2 h))`` (``h = lam_{i+1} - lam_i``): the same
step as ``DDIM(eta_i)`` with ``eta_i = sin(a pi / 2) / sqrt(1 - exp(-2 h_i))``, a constant ``eta`` only on
a grid with constant ``h`` (``logsnr_uniform``), so not a ``DDIM(eta)`` on the usual flow grids. It is
also TCD's step (:mod:`~steerdiff.solvers.tcd`) with its intermediate point at the fixed log-SNR
``lam_s = lam_{i+1} - log cos(a pi / 2)``: ``a = 0`` is deterministic DDIM, ``a = 1`` (``x_{i+1} =
alpha_{i+1} x0 + sigma_{i+1} z``) LCM's multistep consistency sampling (``lcm``). The default 0.8 is the
noise level of the Flow-GRPO code's CPS configurations.

Exact given the true ``x0``, not given the posterior mean ``E[x0 | x_i]`` a denoiser returns: the ``x0``
coefficient of the mean, ``alpha_{i+1} - sigma_{i+1} cos(a pi / 2) alpha_i / sigma_i``, tends to
``alpha_{i+1} (1 - cos(a pi / 2))``, not to 0, as the steps shrink, so each step drops a fixed share of
``Var(x0 | x_i)`` and at a fixed ``a > 0`` the sampler does not converge to the data law (on the 8-d test
mixture under rectified flow, sample variance / true 0.83 at 100 and at 400 steps for ``a = 0.8``, 0.96
for ``a = 0.3``; ``tests/test_flow_sde.py``).

Each step returns its :class:`~steerdiff.solvers.Transition` (``mean = alpha_{i+1} x0 + sigma_{i+1}
cos(a pi / 2) eps``, ``std = c``) before the noise is drawn. One NFE per step; into a clean end the step
returns ``x0`` (the paper's step there: ``c = 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import real
from .base import Grid, Model, Solver, Transition
from .ddim import noise_split

__all__ = ["CPS"]


@dataclass
class CPS(Solver):
    """Coefficients-Preserving Sampling with noise level ``noise_level`` in ``[0, 1]`` (default 0.8):
    fresh noise ``sigma_{i+1} sin(a pi / 2)`` per step; ``a = 0`` is ``ddim``, ``a = 1`` is ``lcm``.
    First order, 1 NFE per step."""

    name: ClassVar[str] = "cps"
    picard: ClassVar[str | None] = "step"

    noise_level: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.noise_level = real("CPS", "noise_level", self.noise_level, lo=0, hi=1)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.noise_level > 0

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        alpha_next, sigma_next = grid.alpha[i + 1], grid.sigma[i + 1]
        if self.noise_level == 0 or sigma_next == 0:
            return pred.renoise(alpha_next, sigma_next)
        sigma_det, c = noise_split(sigma_next, sigma_next * math.sin(self.noise_level * math.pi / 2))
        return Transition(pred.renoise(alpha_next, sigma_det), c)
