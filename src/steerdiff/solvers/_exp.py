r"""Exponential-integrator weights, shared by every solver in the log-SNR variable.

With ``h = lam_t - lam_s`` the data-prediction ODE (Lu et al. 2022b, Eq. 9) integrates as

    x_t = (sigma_t / sigma_s) x_s + alpha_t * int_0^h e^{-(h-u)} x0(lam_s + u) du,

and the noise-prediction ODE (Lu et al. 2022, Eq. 3.4) as

    x_t = (alpha_t / alpha_s) x_s - sigma_t * int_0^h e^{h-u} eps(lam_s + u) du.

A polynomial ``x0(lam_s + u) = sum_k c_k u^k / k!`` integrates exactly with
``int_0^h e^{-(h-u)} u^{k-1}/(k-1)! du = h^k phi_k(-h)``, where ``phi_k`` are the phi
functions of exponential integrators (Hochbruck & Ostermann 2010):
``phi_0(z) = e^z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``. For noise prediction,
``int_0^h e^{h-u} u^{k-1}/(k-1)! du = h^k phi_k(h)`` and ``sigma_t e^h = alpha_t sigma_s / alpha_s``
give the bounded form

    x_t = (alpha_t / alpha_s) * (x_s - sigma_s * sum_k e^{-h} h^k phi_k(h) c_k),

whose weights (:func:`hphi_eps`) tend to 1 as ``h -> inf`` (the step into a clean end).

The stochastic data-prediction integrators (SDE-DPM-Solver++ in the appendix of Lu et al. 2022b; with noise
scale ``eta``) damp ``x0`` with rate ``c = 1 + eta`` instead of 1,

    x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t * c int_0^h e^{-c(h-u)} x0(lam_s + u) du + noise,

whose polynomial weights are ``c int_0^h e^{-c(h-u)} u^{k-1}/(k-1)! du = hphi(k, c h) / c^{k-1}``
(:func:`hphi_scaled`; ``c = 1`` is the ODE), whose decay of ``x_s`` is :func:`sde_decay` and whose
noise std :func:`sde_std`. The same step with the variance-controlled SDE's ``tau`` is SA-Solver's
(Xue et al. 2023) at ``eta = tau^2``.
"""

from __future__ import annotations

import math

__all__ = ["hphi", "hphi_eps", "hphi_scaled", "noising", "phi", "sde_decay", "sde_std"]


def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_j z^j / (j + k)!``, stable for small ``|z|`` and for ``z = -inf``."""
    if k == 0:
        return math.exp(z)
    if abs(z) < 0.5:  # Taylor series: the recursion cancels catastrophically near 0
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(30):
            total += term
            term *= z / (j + k + 1)
        return total
    if math.isinf(z):
        return 0.0 if z < 0 else math.inf
    value = math.expm1(z) / z  # phi_1
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def hphi(k: int, h: float) -> float:
    """``h^k phi_k(-h) = int_0^h e^{-(h-u)} u^{k-1}/(k-1)! du`` (data-prediction weight).

    ``hphi(1, inf) = 1``: the step into a clean end returns the denoised estimate.
    """
    if math.isinf(h):
        if k == 1:
            return 1.0
        raise ValueError("higher-order exponential weights diverge at h = inf (clean end)")
    return h**k * phi(k, -h)


def hphi_eps(k: int, h: float) -> float:
    """``e^{-h} h^k phi_k(h) = int_0^h e^{-u} u^{k-1}/(k-1)! du`` (noise-prediction weight).

    ``sigma_t h^k phi_k(h) = (alpha_t sigma_s / alpha_s) hphi_eps(k, h)``; bounded, 1 at ``h = inf``.
    """
    if h > 30.0:  # 1 - e^{-h} sum_{j<k} h^j/j!: no cancellation, no overflow
        if math.isinf(h):
            return 1.0
        return 1.0 - math.exp(-h) * sum(h**j / math.factorial(j) for j in range(k))
    return math.exp(-h) * h**k * phi(k, h)


def hphi_scaled(k: int, h: float, c: float) -> float:
    """``c int_0^h e^{-c(h-u)} u^{k-1}/(k-1)! du = hphi(k, c h) / c^{k-1}`` (``c >= 1``).

    The weight of the ``k``-th Taylor term of ``x0`` in the SDE-DPM-Solver++ family with noise scale
    ``eta = c - 1``; ``hphi_scaled(k, h, 1) = hphi(k, h)``, ``hphi_scaled(1, inf, c) = 1``.
    """
    return hphi(k, c * h) / c ** (k - 1)


def sde_decay(sigma_s: float, sigma_t: float, h: float, eta: float) -> float:
    """``(sigma_t / sigma_s) e^{-eta h}``: the factor of ``x_s`` in the SDE-DPM-Solver++ step of noise
    scale ``eta`` (``eta = 0``: the ODE's ``sigma_t / sigma_s``)."""
    return sigma_t / sigma_s * math.exp(-eta * h)


def sde_std(scale: float, h: float, eta: float) -> float:
    """``scale sqrt(1 - e^{-2 eta h})``: the noise std of the exponential-integrator SDE step of noise
    scale ``eta``; ``scale = sigma_t`` in data prediction, ``scale = sigma_t e^h`` (``= alpha_t sigma_s /
    alpha_s``) for the noise-prediction SDE-DPM-Solver, whose std is ``sigma_t sqrt(e^{2h} - 1)`` at
    ``eta = 1``. 0 at ``eta = 0`` (the ODE)."""
    return scale * math.sqrt(-math.expm1(-2.0 * eta * h))


def noising(frm: tuple[float, float], to: tuple[float, float]) -> tuple[float, float]:
    """The forward process from the noise level ``frm = (alpha, sigma)`` up to ``to``:
    ``x_to = ratio x_frm + std z`` with ``ratio = alpha_to / alpha_frm`` and ``std = sqrt(sigma_to^2 -
    ratio^2 sigma_frm^2) = sigma_to sqrt(1 - e^{-2h})``, ``h = lam_frm - lam_to``: :func:`sde_std`'s
    ``eta = 1`` noise, seen from the other end (RePaint's and self-recurrence's re-noising, Restart's
    jump, EDM's churn). ``std`` is 0 where ``to`` is no noisier than ``frm``."""
    ratio = to[0] / frm[0]
    return ratio, to[1] * math.sqrt(max(1.0 - (ratio * frm[1] / to[1]) ** 2, 0.0))
