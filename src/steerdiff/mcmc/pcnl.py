r"""Preconditioned Crank-Nicolson Langevin (pCNL; Cotter, Roberts, Stuart & White 2013, "MCMC methods for
functions: modifying old algorithms to make them faster", Statist. Sci. 28(3), Sec. 4.3).

The target is a change of measure from a Gaussian reference ``N(0, C)``, ``C = s^2 I``:

    pi(x) ∝ N(x; 0, C) exp(Phi(x)),

and the kernel is given ``Phi`` (the log-likelihood, differentiable), not ``log pi``. The Langevin SDE
preconditioned by ``C``, ``dx = -x dt + C grad Phi(x) dt + sqrt(2 C) dW``, leaves ``pi`` invariant; its
Crank-Nicolson step of size ``delta`` (implicit midpoint on the linear drift, explicit on ``grad Phi``),
``v - u = -(delta/2)(u + v) + delta C grad Phi(u) + sqrt(2 delta) C^{1/2} xi``, is the proposal

    v = ((2 - delta) u + 2 delta C grad Phi(u) + sqrt(8 delta) C^{1/2} xi) / (2 + delta),

``xi ~ N(0, I)`` (their eq. for pCNL, in their convention ``exp(-Phi)``, so the sign of the gradient term
flips). Since ``((2 - delta)^2 + 8 delta) / (2 + delta)^2 = 1``, for ``Phi = 0`` it is an autoregressive
move that leaves ``N(0, C)`` invariant exactly, whatever ``delta`` and the dimension; it is accepted per
sample with probability ``min(1, exp(rho(v, u) - rho(u, v)))``,

    rho(u, v) = Phi(u) + <v - u, g_u> / 2 + (delta / 4) <u + v, g_u> - (delta / 4) |C^{1/2} g_u|^2,

``g_u = grad Phi(u)``. Derivation (ours, matching theirs up to the sign convention): in ``log pi(u) +
log q(u -> v)`` the Gaussian terms ``-|u|_C^2 / 2 - |v - a u|_C^2 / (2 c^2)`` (``a``, ``c`` the
coefficients of ``u`` and ``xi``, ``a^2 + c^2 = 1``) sum to ``-(|u|_C^2 + |v|_C^2 - 2 a <u, v>_C) /
(2 c^2)``, symmetric in ``(u, v)``: the reference cancels from the Metropolis-Hastings ratio, and what is
left is ``rho`` (``b / c^2 = (2 + delta) / 4``, ``b^2 / (2 c^2) = delta / 4`` for the gradient's
coefficient ``b``). The acceptance therefore depends on ``Phi`` alone: where ``Phi`` depends on a few
coordinates of a high-dimensional ``x`` it does not fall with the dimension, as MALA's does at a fixed
step (Cotter et al., Sec. 4-5; ``tests/test_mcmc_pcnl.py`` measures both).

``delta = 2`` proposes ``v = C grad Phi(u) + C^{1/2} xi`` (independent of ``u`` but for the drift);
``delta -> 0`` is the continuous-time SDE (acceptance -> 1). Cost: one value-and-gradient of ``Phi`` per
move plus one for the starting point (as MALA).

Use: ``PCNL(step_size=delta, scale=s).run(x, phi, steps, generator)``, ``phi(x) -> (n,)`` the
log-likelihood ``Phi`` (what :meth:`~steerdiff.mcmc.Kernel.run` calls ``log_prob``), or :func:`chain` with a
:class:`~steerdiff.mcmc.Target` of ``Phi``. Not a corrector of :func:`steerdiff.sample`, which gives the
whole ``log p_t`` (refused there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import real
from .base import Kernel, Normal, Point, StepSize, Target, Valued, metropolis, rows, select, sq_norm

__all__ = ["PCNL"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product, float64 ``(n,)``."""
    return (rows(a).to(torch.float64) * rows(b).to(torch.float64)).sum(-1)


@dataclass
class PCNL(Kernel):
    """pCNL move for ``pi ∝ N(0, scale^2 I) exp(Phi)`` given ``Phi`` (module docstring); ``step_size`` is
    ``delta > 0``, ``scale`` the reference's standard deviation ``s > 0`` (``sqrt(alpha^2 + sigma^2)`` of a
    diffusion's initial node: 1 for VP)."""

    name: ClassVar[str] = "pcnl"
    needs_log_prob: ClassVar[bool] = True
    corrector: ClassVar[bool] = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scale = real("PCNL", "scale", self.scale, lo=0, lo_open=True)

    def _rho(self, u: Valued, v: Tensor, delta: StepSize) -> Tensor:
        """``rho(u, v)`` of the module docstring, float64 ``(n,)``."""
        g = u.grad
        return (
            u.log_prob.to(torch.float64)
            + 0.5 * _dot(v - u.x, g)
            + (delta / 4) * _dot(u.x + v, g)
            - (delta / 4) * self.scale**2 * sq_norm(g)
        )

    def move(
        self, p: Point, target: Target, step_size: StepSize, normal: Normal
    ) -> tuple[Point, Tensor | None]:
        d = step_size
        p = target.evaluate(p, value=True)
        xi = normal(p.x)
        v = ((2 - d) * p.x + 2 * d * self.scale**2 * p.grad + (8 * d) ** 0.5 * self.scale * xi) / (2 + d)
        q = target.evaluate(Point(v), value=True)
        accept = metropolis(self._rho(q, p.x, d) - self._rho(p, q.x, d), normal)
        return select(accept, q, p), accept
