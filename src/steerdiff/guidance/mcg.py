r"""Manifold-constrained gradient (Chung, Sim, Ryu & Ye 2022, "Improving Diffusion Models for Inverse
Problems using Manifold Constraints", NeurIPS).

MCG's step is the unguided reverse step, then a gradient step on ``||y - A x0_hat(x_t)||`` through the
denoised estimate (the manifold constraint, the step DPS later kept), then a projection onto the
measurement set:
``x_{i-1} <- x_{i-1} - A^+ (A x_{i-1} - y_{i-1})`` with the noised measurement
``y_{i-1} = alpha_{i-1} y + sigma_{i-1} A z`` (for inpainting: the known pixels replaced by a forward
sample of ``y``).

A denoiser wrapper changes only the prediction, so here the projection acts on the denoised
estimate (data consistency on ``x0``, as DDNM's range-null decomposition):

    x0' = x0_hat + (sigma^2 / alpha) g            (DPS, :class:`~steerdiff.guidance.DPS`)
    x0'' = x0' + A^+ (y - A x0')                  (A x0'' = y)

What this does to the state: under any step that mixes ``x_i`` and ``x0`` (DDPM: mean
``c1 x_i + c2 x0''`` with ``c1 alpha_i + c2 = alpha_{i+1}``), the measured component of the next
state is ``A x_{i+1} = c1 A x_i + c2 y + std A z``. If ``A x_i ~ alpha_i y + sigma_i A n`` this is
again ``alpha_{i+1} y + sigma_{i+1} A n'`` -- the law MCG's projection imposes -- but with the noise
carried over from ``x_i`` instead of redrawn, and the null-space component ``(I - A^+ A) x`` is
left to the prior and the gradient step, as in MCG. The projection removes the row-space part of
the gradient step; only its null-space part remains.

The projection is hard (``A x0 = y``) as in the paper, whatever ``noise_std``: with noisy ``y`` the
samples' measured component has no spread and the method is biased (of order ``noise_std``; Chung
et al. 2023 make the same remark when motivating DPS). ``scale = 0`` leaves the projection alone.
One network evaluation per call, with a backward pass (none when ``scale = 0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser, Prediction
from ..inverse.operators import LinearOperator
from .base import with_estimate
from .dps import DPS

__all__ = ["MCG"]


class MCG(DPS):
    """DPS guidance followed by the projection of ``x0`` onto ``{A x = y}`` (see the module).

    Args are those of :class:`~steerdiff.guidance.DPS`; the operator needs ``pinv``.
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
        super().__init__(base, operator, y, noise_std, scale, variant)
        self.check_pinv()

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        if self.scale == 0:
            pred = self.base.evaluate(x, t, net_dtype, **cond)
        else:
            pred = super().evaluate(x, t, net_dtype, **cond)
        return with_estimate(pred, x0=self.project(pred.x0))

    def __repr__(self) -> str:
        return f"MCG({self.base!r}, scale={self.scale}, variant={self.variant!r})"
