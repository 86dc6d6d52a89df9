r"""Langevin correctors: ULA and MALA.

Both propose the Euler-Maruyama step of the Langevin diffusion ``dx = grad log p(x) dt + sqrt(2) dW``,

    x' = x + eps grad log p(x) + sqrt(2 eps) z,    z ~ N(0, I).

* :class:`ULA` (unadjusted Langevin; Roberts & Tweedie 1996; the corrector of Song et al. 2021,
  Alg. 4-5) takes every proposal: it needs only the score and is biased by ``O(eps)``.
* :class:`MALA` (Metropolis-adjusted; Roberts & Tweedie 1996, Besag 1994) accepts ``x'`` per
  sample with probability ``min(1, p(x') q(x | x') / (p(x) q(x' | x)))``, where
  ``log q(x' | x) = -|x' - x - eps grad log p(x)|^2 / (4 eps) + const`` is the exact proposal
  density: it leaves ``p`` invariant for every ``eps`` and needs ``log p`` itself.

Cost: ULA one score evaluation per move; MALA one value-and-gradient per move plus one for the
starting point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Kernel, Normal, Point, StepSize, Target, metropolis, select, sq_norm

__all__ = ["MALA", "ULA"]


@dataclass
class ULA(Kernel):
    """Unadjusted Langevin move ``x' = x + eps grad log p(x) + sqrt(2 eps) z`` (no Metropolis test)."""

    name: ClassVar[str] = "ula"

    def move(
        self, p: Point, target: Target, step_size: StepSize, normal: Normal
    ) -> tuple[Point, Tensor | None]:
        p = target.evaluate(p)
        z = normal(p.x)
        return Point(p.x + step_size * p.grad + (2 * step_size) ** 0.5 * z), None


@dataclass
class MALA(Kernel):
    """Metropolis-adjusted Langevin move: the ULA proposal, accepted per sample (exact for ``p``)."""

    name: ClassVar[str] = "mala"
    needs_log_prob: ClassVar[bool] = True

    def move(
        self, p: Point, target: Target, step_size: StepSize, normal: Normal
    ) -> tuple[Point, Tensor | None]:
        p = target.evaluate(p, value=True)
        z = normal(p.x)
        q = target.evaluate(Point(p.x + step_size * p.grad + (2 * step_size) ** 0.5 * z), value=True)
        log_fwd = -0.5 * sq_norm(z)  # x' - x - eps g(x) = sqrt(2 eps) z
        log_bwd = -sq_norm(p.x - q.x - step_size * q.grad) / (4 * step_size)
        log_ratio = q.log_prob.to(torch.float64) - p.log_prob.to(torch.float64) + log_bwd - log_fwd
        accept = metropolis(log_ratio, normal)
        return select(accept, q, p), accept
