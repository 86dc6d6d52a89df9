"""The shared exponential-integrator and quadrature arithmetic against closed forms and exact integrals
(``steerdiff.solvers._exp``, ``steerdiff.solvers._poly``)."""

from __future__ import annotations

import math

import mpmath
import pytest
from scipy.integrate import quad
from scipy.special import gammainc

from steerdiff.solvers._exp import hphi, hphi_eps, hphi_scaled, noising, phi
from steerdiff.solvers._poly import (
    adams_bashforth,
    exp_adams_bashforth,
    lagrange_basis,
    newton_weights,
    unipc_moments,
)

ZS = (-7.0, -2.5, -0.7, -0.3, -1e-3, 0.0, 2e-2, 0.45, 0.55, 1.3, 4.0)


def exact_phi(k: int, z: float) -> float:
    """``phi_k(z) = (e^z - sum_{j<k} z^j / j!) / z^k`` in 50-digit arithmetic (``1/k!`` at 0)."""
    if z == 0:
        return 1.0 / math.factorial(k)
    with mpmath.workdps(50):
        zz = mpmath.mpf(z)
        return float((mpmath.exp(zz) - sum(zz**j / mpmath.factorial(j) for j in range(k))) / zz**k)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_phi_closed_forms(k: int) -> None:
    # both branches (the Taylor series for |z| < 0.5, the recursion beyond) and the limits at -inf / +inf
    for z in ZS:
        assert phi(k, z) == pytest.approx(exact_phi(k, z), rel=1e-12, abs=0), (k, z)
    if k > 0:
        assert phi(k, -math.inf) == 0.0
        assert phi(k, math.inf) == math.inf


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hphi_weights_are_their_integrals(k: int) -> None:
    # hphi(k, h) = int_0^h e^{-(h-u)} u^{k-1}/(k-1)! du; hphi_eps(k, h) = int_0^h e^{-u} u^{k-1}/(k-1)! du,
    # the regularised incomplete gamma P(k, h) (both of its branches, h <= 30 and h > 30)
    def integrand(u: float, h: float, c: float) -> float:
        return c * math.exp(-c * (h - u)) * u ** (k - 1) / math.factorial(k - 1)

    for h in (1e-3, 0.4, 1.7, 6.0):
        assert hphi(k, h) == pytest.approx(quad(integrand, 0, h, args=(h, 1.0))[0], rel=1e-11)
        for c in (1.0, 1.6, 3.0):
            want = quad(integrand, 0, h, args=(h, c))[0]
            assert hphi_scaled(k, h, c) == pytest.approx(want, rel=1e-11), (h, c)
    for h in (1e-3, 0.4, 1.7, 6.0, 29.0, 31.0, 45.0):
        assert hphi_eps(k, h) == pytest.approx(gammainc(k, h), rel=1e-13), h
    assert hphi_eps(k, math.inf) == 1.0


def test_hphi_clean_end() -> None:
    assert hphi(1, math.inf) == 1.0
    assert hphi_scaled(1, math.inf, 2.0) == 1.0
    with pytest.raises(ValueError, match="diverge"):
        hphi(2, math.inf)


def test_noising_keeps_the_marginal() -> None:
    # x_to = ratio x_frm + std z takes N(alpha_frm x0, sigma_frm^2) to N(alpha_to x0, sigma_to^2)
    for frm, to in (((0.9, math.sqrt(0.19)), (0.6, 0.8)), ((1.0, 0.3), (1.0, 2.0)), ((0.8, 0.6), (0.8, 0.6))):
        ratio, std = noising(frm, to)
        assert ratio * frm[0] == pytest.approx(to[0], rel=1e-15)
        assert (ratio * frm[1]) ** 2 + std**2 == pytest.approx(to[1] ** 2, rel=1e-14)
    assert noising((0.6, 0.8), (0.9, math.sqrt(0.19)))[1] == 0.0  # less noisy: no noise


def test_adams_bashforth_classical_weights() -> None:
    assert adams_bashforth([0.0]) == [1.0]
    assert adams_bashforth([0.0, -1.0]) == pytest.approx([1.5, -0.5], rel=1e-14)
    assert adams_bashforth([0.0, -1.0, -2.0]) == pytest.approx([23 / 12, -16 / 12, 5 / 12], rel=1e-14)
    assert adams_bashforth([0.0, -1.0, -2.0, -3.0]) == pytest.approx(
        [55 / 24, -59 / 24, 37 / 24, -9 / 24], rel=1e-13
    )


@pytest.mark.parametrize("nodes", [[0.0, -0.8], [0.0, -0.6, -1.7], [0.0, -0.3, -1.1, -2.6], [0.0, 1.0]])
def test_quadrature_weights_integrate_polynomials_exactly(nodes: list[float]) -> None:
    # every polynomial of degree < len(nodes) is integrated exactly, against 1 and against e^{h (1 - theta)}
    n = len(nodes)
    for j, coef in enumerate(lagrange_basis(nodes)):  # l_j(u_m) = delta_jm
        for m, u in enumerate(nodes):
            assert sum(c * u**p for p, c in enumerate(coef)) == pytest.approx(float(j == m), abs=1e-13)
    for deg in range(n):
        assert sum(w * u**deg for w, u in zip(adams_bashforth(nodes), nodes, strict=True)) == pytest.approx(
            1 / (deg + 1), rel=1e-13
        )
        for h in (-1.4, 0.05, 2.3):
            want = quad(lambda t, h=h, deg=deg: math.exp(h * (1 - t)) * t**deg, 0, 1, epsabs=0, epsrel=1e-13)[
                0
            ]
            w = exp_adams_bashforth(nodes, h)
            assert sum(wj * u**deg for wj, u in zip(w, nodes, strict=True)) == pytest.approx(want, rel=1e-11)


def test_newton_weights_are_divided_differences() -> None:
    # against the recursive definition f[u_a..u_b] = (f[u_{a+1}..u_b] - f[u_a..u_{b-1}]) / (u_b - u_a)
    nodes = [0.4, -0.5, -1.3, -2.9]
    values = [math.sin(3 * u) + u**4 for u in nodes]

    def dd(a: int, b: int) -> float:
        return values[a] if a == b else (dd(a + 1, b) - dd(a, b - 1)) / (nodes[b] - nodes[a])

    coefs = [0.7, -1.3, 2.1, 0.45]
    for n in range(1, 5):
        got = sum(w * v for w, v in zip(newton_weights(nodes, coefs[:n]), values, strict=False))
        assert got == pytest.approx(sum(c * dd(0, k) for k, c in enumerate(coefs[:n])), rel=1e-12), n


def test_unipc_moments() -> None:
    # [phi_1(-g), beta / 2]: with beta = phi_1(-g) (bh2) the line's update is DPM-Solver++(2M)'s
    for g in (0.3, 1.5, -0.8):
        assert unipc_moments(g, 1.0) == pytest.approx([-math.expm1(-g) / g, 0.5], rel=1e-14)
        b = -math.expm1(-g) / g
        assert unipc_moments(g, b) == pytest.approx([b, b / 2], rel=1e-14)
