r"""Diffusion posterior sampling (Chung, Kim, McCann, Klasky & Ye 2023, "Diffusion Posterior Sampling
for General Noisy Inverse Problems", ICLR).

DPS approximates the likelihood of the noisy state through the denoised estimate,
``p(y | x_t) ~ N(y; A x0_hat(x_t), s^2 I)`` (their Sec. 3.2), and adds its gradient to the score
(:func:`~steerdiff.guidance.add_score`). With the residual ``r = y - A x0_hat(x_t)`` and
``J = d x0_hat / d x_t`` (one vector-Jacobian product through the denoiser):

* ``variant="normalized"`` (their Alg. 1 with their step choice ``zeta_i = zeta' / ||r||``, as their
  code runs it): ``g = -scale grad_x ||r|| = scale J^T A^T r / ||r||``;
* ``variant="squared"``: ``g = -scale grad_x ||r||^2 / (2 s^2) = scale J^T A^T r / s^2``, the score of
  the Gaussian approximation itself (``scale = 1``; the paper writes it without the 1/2).

Correspondence with Alg. 1. The guided prediction is ``x0' = x0_hat + (sigma_i^2 / alpha_i) g``, and
the DDPM step from node ``i`` to ``i+1`` (:class:`~steerdiff.solvers.DDPM`, ``e = exp(-2 h)``) has
mean ``e alpha_{i+1} / alpha_i x_i + alpha_{i+1} (1 - e) x0'``, so with ``solver="ddpm"``

    x_{i+1} = [the unguided DDPM step] + kappa_i g,     kappa_i = alpha_{i+1} (1 - e) sigma_i^2 / alpha_i,

which is Alg. 1's line 7, ``x_{i-1} = x'_{i-1} - zeta_i grad ||y - A x0_hat||^2``, with
``2 zeta' = kappa_i scale`` (normalized). ``kappa_i`` is the posterior-mean weight of ``x0`` times
Tweedie's ``sigma^2 / alpha``; on consecutive timesteps of a discrete VP it is
``beta_t / sqrt(1 - beta_t)``. What differs from the paper:

* the step is a constant per unit of the reverse SDE, not per iteration: the paper's ``zeta'`` is
  the same at every step, ours is ``kappa_i scale`` -- over the whole run the push does not grow
  with the number of steps, and it is spread over time as ``beta_t`` (for linear betas 200 times
  more at ``t = T`` than at ``t = 0``) instead of evenly;
* ``||r||`` is per sample (the official code takes the norm of the whole batch's residual, which
  couples the samples of a batch);
* ``scale`` multiplies ``grad ||r||``, as the official code's step does (that step is ``2 zeta'`` of the
  paper's text, ``zeta' / ||r||`` on ``||r||^2``).

``steerdiff bench posterior`` also runs Alg. 1 literally (constant step per iteration) beside this.
One network evaluation per call, with a backward pass; needs autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import choice, held_by, real
from ..denoiser import Denoiser, Prediction
from ..inverse.operators import LinearOperator
from ._measurement import MeasurementGuided
from .base import add_score

__all__ = ["DPS", "VARIANTS"]

VARIANTS = ("normalized", "squared")


class DPS(MeasurementGuided):
    """DPS guidance: ``eps' = eps - sigma g`` with ``g`` the DPS likelihood gradient (see the module).

    Args:
        base: the prior's denoiser.
        operator: the measurement operator ``A`` (:mod:`steerdiff.inverse`).
        y: the observation, ``operator.shape_out`` (broadcast over the batch) or one per sample.
        noise_std: ``s``; ``None`` takes ``operator.noise_std``. ``variant="squared"`` needs ``s > 0``.
        scale: the step ``zeta >= 0``.
        variant: ``"normalized"`` (the paper's ``zeta / ||r||`` step, default) or ``"squared"``.
    """

    def __init__(
        self,
        base: Denoiser,
        operator: LinearOperator,
        y: Tensor,
        noise_std: float | None = None,
        scale: float = 1.0,
        variant: str = "normalized",
    ) -> None:
        super().__init__(base, operator, y, noise_std)
        who = type(self).__name__
        variant = choice(who, "variant", variant, VARIANTS)
        if variant == "squared" and self.noise_std == 0:
            raise ValueError(f"{who}: variant='squared' divides by noise_std^2 and needs noise_std > 0")
        self.scale = real(who, "scale", scale, lo=0)
        self.variant = variant

    def _weight(self, r: Tensor, pred: Prediction) -> Tensor:
        if self.variant == "squared":
            return r / self.noise_std**2
        norm = r.flatten(1).norm(dim=1).reshape(-1, *([1] * (r.ndim - 1)))
        return torch.where(norm > 0, r / norm.clamp_min(torch.finfo(r.dtype).tiny), 0.0)

    def likelihood_score(
        self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype | None = None, /, **cond: Any
    ) -> tuple[Prediction, Tensor]:
        """``(pred, g)``: the base prediction (detached; its net in ``net_dtype``, default ``x``'s) and
        the guidance ``g`` (``scale`` included)."""
        scale = held_by(type(self).__name__, "scale", self.scale, x.dtype)
        pred, g = self.vjp_score(x, t, self._weight, net_dtype, **cond)
        return pred, scale * g

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        return add_score(*self.likelihood_score(x, t, net_dtype, **cond))

    def __repr__(self) -> str:
        return f"DPS({self.base!r}, scale={self.scale}, variant={self.variant!r})"
