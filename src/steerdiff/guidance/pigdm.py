r"""Pseudoinverse-guided diffusion (PiGDM; Song, Vahdat, Mardani & Kautz 2023, "Pseudoinverse-Guided
Diffusion Models for Inverse Problems", ICLR).

PiGDM approximates ``p(x0 | x_t)`` by ``N(x0_hat(x_t), r_t^2 I)``, so that for ``y = A x0 + s n``
``p(y | x_t) ~ N(A x0_hat, r_t^2 A A^T + s^2 I)``; with the covariance held fixed its score is
their Eq. 8 (Eq. 7 when ``s = 0``),

    g = ((y - A x0_hat)^T (r_t^2 A A^T + s^2 I)^{-1} A  d x0_hat / d x_t)^T,

one solve in measurement space (``operator.aat_solve``) and one vector-Jacobian product through
the denoiser. ``r_t^2 = sigma^2 / (alpha^2 + sigma^2)``: their ``sigma_t^2 / (1 + sigma_t^2)`` in the
variance-exploding variable ``x_t / alpha`` -- the posterior variance of ``x0`` under a ``N(0, I)``
prior. The guided score is ``score + scale g`` (:func:`~steerdiff.guidance.add_score`), so
``x0' = x0_hat + scale (sigma^2 / alpha) g``.

Exactness: if ``x0 | x_t`` is Gaussian with covariance ``r_t^2 I`` (a ``N(mu, I)`` prior), Tweedie's
second-order identity gives ``d x0_hat / d x_t = (alpha / sigma^2) r_t^2 I`` and, with ``scale = 1``,
``x0'`` is the exact ``E[x0 | x_t, y]`` (the Gaussian conditioning formula). For other priors the
fixed ``r_t^2`` is the approximation. One network evaluation per call, with a backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import held_by, real
from ..denoiser import Denoiser, Prediction
from ..inverse.operators import LinearOperator
from ._measurement import MeasurementGuided
from .base import add_score

__all__ = ["PiGDM"]


class PiGDM(MeasurementGuided):
    """PiGDM guidance (see the module): ``eps' = eps - scale sigma g``.

    Args:
        base: the prior's denoiser.
        operator: the measurement operator ``A``; needs ``aat_solve`` (and ``A`` of full row rank
            when ``noise_std = 0``).
        y: the observation, ``operator.shape_out`` (broadcast over the batch) or one per sample.
        noise_std: ``s``; ``None`` takes ``operator.noise_std``.
        scale: guidance weight ``>= 0`` (1: the approximation's own score).
    """

    def __init__(
        self,
        base: Denoiser,
        operator: LinearOperator,
        y: Tensor,
        noise_std: float | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__(base, operator, y, noise_std)
        self.scale = real("PiGDM", "scale", scale, lo=0)
        probe = self.probe()
        try:
            operator.aat_solve(probe, self.noise_std**2 + 1.0)
        except NotImplementedError as err:
            raise ValueError(f"PiGDM: the operator has no (A A^T + c I) solve ({err})") from err
        if self.noise_std == 0:  # the solve at the clean end has no shift: A A^T itself
            try:
                operator.aat_solve(probe, 0.0)
            except ValueError as err:
                raise ValueError(
                    "PiGDM: noise_std = 0 needs A A^T invertible (an operator of full row rank), and this "
                    "operator's is singular; give noise_std > 0"
                ) from err

    def _weight(self, r: Tensor, pred: Prediction) -> Tensor:
        """``(r_t^2 A A^T + s^2 I)^{-1} r`` (one solve, with one shift per sample if ``t`` is per sample)."""
        return self.gaussian_weight(r, pred.alpha, pred.sigma)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        scale = held_by("PiGDM", "scale", self.scale, x.dtype)
        pred, g = self.vjp_score(x, t, self._weight, net_dtype, **cond)
        return add_score(pred, scale * g)

    def __repr__(self) -> str:
        return f"PiGDM({self.base!r}, scale={self.scale})"
