r"""Improved PNDM (iPNDM; Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
Integrator", App.; k-diffusion's ``sample_ipndm``, diffusers' ``IPNDMScheduler``).

PNDM (Liu et al. 2022) with its Runge-Kutta warm-up replaced by lower-order multistep steps:
Adams-Bashforth with the *fixed* (uniform-step) coefficients on ``dy/ds = eps`` in
``y = x / alpha``, ``s = sigma / alpha``. With ``d_j = eps(x_j, t_j)`` and
``Delta = s_{i+1} - s_i``:

    order 1:  y_{i+1} = y_i + Delta d_i
    order 2:  y_{i+1} = y_i + Delta (3 d_i - d_{i-1}) / 2
    order 3:  y_{i+1} = y_i + Delta (23 d_i - 16 d_{i-1} + 5 d_{i-2}) / 12
    order 4:  y_{i+1} = y_i + Delta (55 d_i - 59 d_{i-1} + 37 d_{i-2} - 9 d_{i-3}) / 24

(:func:`~steerdiff.solvers._poly.adams_bashforth` on the nodes ``0, -1, -2, -3``) and
``x_{i+1} = alpha_{i+1} y_{i+1}``: :class:`~steerdiff.solvers.lms.LMS` with these weights.
Order ``min(order, i + 1)``; one NFE per step. The step into a clean end is first order and
returns ``x0`` (the references take a full-order step there).

The fixed coefficients are exact only for steps of equal length in ``s``; on the usual graded
grids, and with the first-order first step, the global error is second order whatever ``order``
is (orders 3 and 4 only lower the error constant); :class:`~steerdiff.solvers.lms.LMS` is the
variable-step method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ._poly import adams_bashforth
from .lms import LMS

__all__ = ["IPNDM"]

_COEFFS = tuple(tuple(adams_bashforth([-j for j in range(k)])) for k in range(1, 5))


@dataclass
class IPNDM(LMS):
    """iPNDM: :class:`~steerdiff.solvers.lms.LMS` with the fixed uniform-step weights; order 1-4."""

    name: ClassVar[str] = "ipndm"
    ratio_rule: ClassVar[bool] = False  # fixed weights (lms module docstring)

    def weights(self, nodes: list[float]) -> Sequence[float]:
        return _COEFFS[len(nodes) - 1]
