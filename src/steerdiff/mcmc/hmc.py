r"""Hamiltonian Monte Carlo (Duane et al. 1987; Neal 2011, "MCMC using Hamiltonian dynamics").

With momentum ``m ~ N(0, I)`` and ``H(x, m) = -log p(x) + |m|^2 / 2``, ``L`` leapfrog steps of size
``h``

    m <- m + (h/2) grad log p(x);  x <- x + h m;  m <- m + (h/2) grad log p(x)

propose ``(x', m')``, accepted per sample with probability ``min(1, exp(H(x, m) - H(x', m')))``:
``p`` is left invariant. One leapfrog step with ``h = sqrt(2 eps)`` is exactly the MALA move with
step ``eps`` (same proposal, same acceptance), which is how a Langevin step size (``snr``) maps to
``h``. Cost: ``L`` value-and-gradient evaluations per move plus one for the starting point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import integer
from .base import Kernel, Normal, Point, StepSize, Target, metropolis, select, sq_norm

__all__ = ["HMC"]


@dataclass
class HMC(Kernel):
    """HMC move with ``leapfrog_steps`` leapfrog steps; ``step_size`` is the leapfrog step ``h``."""

    name: ClassVar[str] = "hmc"
    needs_log_prob: ClassVar[bool] = True
    leapfrog_steps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.leapfrog_steps = integer("HMC", "leapfrog_steps", self.leapfrog_steps, lo=1)

    def step_from_langevin(self, eps: StepSize) -> StepSize:
        """``h = sqrt(2 eps)``: one leapfrog step is then the MALA move of step ``eps``."""
        return (2 * eps) ** 0.5

    def move(
        self, p: Point, target: Target, step_size: StepSize, normal: Normal
    ) -> tuple[Point, Tensor | None]:
        h = step_size
        p = target.evaluate(p, value=True)
        m0 = normal(p.x)
        m = m0 + (h / 2) * p.grad
        q = p
        for k in range(self.leapfrog_steps):
            q = target.evaluate(Point(q.x + h * m), value=True)
            m = m + (h if k < self.leapfrog_steps - 1 else h / 2) * q.grad
        log_ratio = (
            q.log_prob.to(torch.float64) - p.log_prob.to(torch.float64) + 0.5 * (sq_norm(m0) - sq_norm(m))
        )
        accept = metropolis(log_ratio, normal)
        return select(accept, q, p), accept
