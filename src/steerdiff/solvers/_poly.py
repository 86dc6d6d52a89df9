r"""Lagrange-polynomial quadrature weights, shared by the Adams-Bashforth-type multistep solvers.

A multistep method interpolates past derivative evaluations ``f_j`` at nodes ``u_j`` by the
Lagrange polynomial ``p(u) = sum_j f_j l_j(u)``, ``l_j(u) = prod_{m != j} (u - u_m)/(u_j - u_m)``,
and integrates it over the step exactly. With the step mapped to ``theta in [0, 1]`` (nodes in
units of the step, ``theta_0 = 0`` for the current node, ``theta_j < 0`` for past ones), the
weights are ``w_j = int_0^1 w(theta) l_j(theta) dtheta = sum_m c_{jm} M_m``, where ``c_{jm}`` are
the monomial coefficients of ``l_j`` and ``M_m = int_0^1 w(theta) theta^m dtheta`` the moments of
the weight:

* ``w = 1`` (Adams-Bashforth, LMS, iPNDM): ``M_m = 1 / (m + 1)``;
* ``w = e^{h (1 - theta)}`` (exponential integrator of the noise-prediction ODE, DEIS):
  ``M_m = m! phi_{m+1}(h)`` with the phi functions of :mod:`steerdiff.solvers._exp`;
* ``d rho`` with ``rho = sigma / alpha`` and the nodes in process time (tAB-DEIS): moments by
  quadrature, :func:`steerdiff.solvers.deis.tab_weights`.

At most four nodes are used, so the monomial form is well conditioned on the unit interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._exp import phi

__all__ = ["adams_bashforth", "exp_adams_bashforth", "lagrange_basis", "lagrange_weights"]


def lagrange_basis(nodes: Sequence[float]) -> list[list[float]]:
    """Monomial coefficients ``c[j][m]`` of the Lagrange basis ``l_j(u) = sum_m c[j][m] u^m``."""
    basis = []
    for j, uj in enumerate(nodes):
        coef = [1.0]
        for m, um in enumerate(nodes):
            if m == j:
                continue
            # multiply by (u - u_m) / (u_j - u_m)
            d = uj - um
            coef = [(lo - um * hi) / d for lo, hi in zip([0.0, *coef], [*coef, 0.0], strict=True)]
        basis.append(coef)
    return basis


def lagrange_weights(nodes: Sequence[float], moments: Sequence[float]) -> list[float]:
    """``w_j = sum_m c[j][m] M_m``: the weights of ``l_j`` from the moments ``M_m`` of the weight."""
    return [sum(c * mm for c, mm in zip(coef, moments, strict=True)) for coef in lagrange_basis(nodes)]


def adams_bashforth(nodes: Sequence[float]) -> list[float]:
    """``int_0^1 l_j(theta) dtheta`` for nodes in units of the step.

    ``adams_bashforth([0, -1, -2])`` gives the classical AB3 weights ``(23, -16, 5) / 12``.
    """
    return lagrange_weights(nodes, [1.0 / (m + 1) for m in range(len(nodes))])


def exp_adams_bashforth(nodes: Sequence[float], h: float) -> list[float]:
    """``int_0^1 e^{h (1 - theta)} l_j(theta) dtheta`` for nodes in units of the step ``h``.

    ``h * exp_adams_bashforth([0], h) = e^h - 1``; these are the exponential Adams-Bashforth
    weights of DEIS (Zhang & Chen 2023) in the variable ``lam``.
    """
    return lagrange_weights(nodes, [math.factorial(m) * phi(m + 1, h) for m in range(len(nodes))])
