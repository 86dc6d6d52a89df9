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

UniPC (Zhao et al. 2023) with two nodes replaces the moment ``M_1 = phi_2(-g)`` by ``beta / 2``
(``B(h) = g beta``; :func:`unipc_moments`), and the multistep solvers that expand the estimates
around the newest node use Newton's divided differences, written out on the values (:func:`newton_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._exp import phi

__all__ = [
    "adams_bashforth",
    "exp_adams_bashforth",
    "lagrange_basis",
    "lagrange_weights",
    "newton_weights",
    "unipc_moments",
]


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


def unipc_moments(g: float, beta: float) -> list[float]:
    """``[M_0, M_1] = [phi_1(-g), beta / 2]``: the moments of UniPC's update with two nodes (Zhao et al.
    2023), for :func:`lagrange_weights`.

    The exact moments of the weight ``e^{-g (1 - theta)}`` are ``[phi_1(-g), phi_2(-g)]``
    (:func:`exp_adams_bashforth` at ``-g``). With one difference UniPC takes ``a_1 = 1/2``, the
    ``g -> 0`` limit of ``b_1 = phi_2(-g) / beta`` where ``B(h) = g beta``, i.e. ``M_1 = beta / 2``;
    for the nodes ``0, r_1`` the update's sum is ``M_0 m_0 + (M_1 / r_1) (m_1 - m_0)``. ``beta = 1``:
    ``B(h) = h`` ("bh1", and SA-Solver's authors' code with ``g = (1 + tau^2) h``); ``beta =
    phi_1(-g)``: ``B(h) = e^h - 1`` ("bh2").
    """
    return [phi(1, -g), 0.5 * beta]


def newton_weights(nodes: Sequence[float], coefs: Sequence[float]) -> list[float]:
    r"""The weights ``w_j`` of the values ``f(u_j)`` in ``sum_k coefs[k] f[u_0, ..., u_k]``, a combination of
    Newton's divided differences of ``f`` at ``nodes`` (``k < len(coefs) <= len(nodes)``):

        f[u_0, ..., u_k] = sum_{j <= k} f(u_j) / prod_{m <= k, m != j} (u_j - u_m),

    so ``w_j = sum_{k >= j} coefs[k] / prod_{m <= k, m != j} (u_j - u_m)`` (``len(coefs)`` weights). With the
    nodes in ``lam``, ``f[u_0, u_1] = (m_0 - m_1) / h_0`` and ``f[u_0, u_1, u_2] = (d_1 - (m_1 - m_2) / h_1) /
    (h_0 + h_1)`` are DPM-Solver++(3M)'s ``d_1``, ``d_2`` (Lu et al. 2022b): the multistep solvers that expand
    the estimates around the newest node weight them so, one kernel per estimate.
    """
    w = [0.0] * len(coefs)
    for k, c in enumerate(coefs):
        for j in range(k + 1):
            w[j] += c / math.prod(nodes[j] - nodes[m] for m in range(k + 1) if m != j)
    return w
