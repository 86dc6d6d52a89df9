"""The sub-VP process (Song et al. 2021, Eq. 12) against its SDE: the probability-flow drift of its
coefficients, the exact mixture's posterior mean by Monte Carlo, and a solver's order on it."""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd

from .reference import exact_sample, importance_posterior_mean, noise, rel_rmse, slope, smooth_mixture

F64 = torch.float64


def _integral(t: torch.Tensor, b0: float, b1: float) -> torch.Tensor:
    """``B(t) = int_0^t beta``, ``beta(t) = b0 + (b1 - b0) t``."""
    return b0 * t + (b1 - b0) * t**2 / 2


@pytest.mark.parametrize(("b0", "b1"), [(0.1, 20.0), (0.05, 30.0)])
def test_drift_is_the_sde_probability_flow(b0, b1):
    """The SDE's own coefficients, ``f = -beta / 2`` and ``g^2 = beta (1 - e^{-2 B})`` (Eq. 12), give the
    probability-flow ODE ``dx/dt = f x - g^2 / 2 score`` (Eq. 13); the solvers' drift, from ``alpha`` and
    ``sigma`` alone (``alpha' x0 + sigma' eps``; Euler-Maruyama's ``f = alpha'/alpha``, ``g^2 = 2 sigma
    (sigma' - f sigma)``), is the same on the mixture's exact score to 1e-10."""
    p = sd.SubVP(b0, b1)
    gmm = smooth_mixture(dim=4)
    g = torch.Generator().manual_seed(3)
    for t in (p.t_min, 0.01, 0.2, 0.5, 0.9, 1.0):
        beta, b = b0 + (b1 - b0) * t, float(_integral(torch.tensor(t, dtype=F64), b0, b1))
        f_sde, g2_sde = -beta / 2, beta * (1 - math.exp(-2 * b))
        a, s = float(p.alpha(t)), float(p.sigma(t))
        x = a * gmm.sample(32, generator=g) + s * torch.randn(32, 4, generator=g, dtype=F64)
        x0 = gmm.denoise(x, a, s)
        score = (a * x0 - x) / s**2
        sde = f_sde * x - g2_sde / 2 * score
        eps = (x - a * x0) / s
        ours = float(p.d_alpha(t)) * x0 + float(p.d_sigma(t)) * eps
        scale = float(sde.abs().max())
        assert float((ours - sde).abs().max()) <= 1e-10 * scale, t
        f = float(p.d_alpha(t)) / a
        g2 = 2 * s * (float(p.d_sigma(t)) - f * s)
        assert abs(f - f_sde) <= 1e-12 * abs(f_sde) and abs(g2 - g2_sde) <= 1e-10 * g2_sde, (t, g2, g2_sde)


def test_same_mean_as_vp_linear_and_a_smaller_std():
    sub, vp = sd.SubVP(), sd.VP.linear()
    t = torch.linspace(sub.t_min, 1.0, 1001, dtype=F64)
    torch.testing.assert_close(sub.alpha(t), vp.alpha(t), rtol=1e-14, atol=0)
    torch.testing.assert_close(sub.sigma(t), vp.sigma(t) ** 2, rtol=1e-13, atol=0)  # 1 - alpha^2
    assert bool((sub.sigma(t) < vp.sigma(t)).all())  # sigma^2 = (1 - alpha^2)^2 < 1 - alpha^2


@pytest.mark.parametrize("t", [0.15, 0.3, 0.6])
def test_exact_denoiser_is_the_monte_carlo_posterior_mean(t):
    """``gmm.denoiser(SubVP())`` at ``x_t = alpha x0 + sigma eps`` is ``E[x0 | x_t]`` by self-normalized
    importance sampling over 100k prior draws: each coordinate within 4 standard errors."""
    p = sd.SubVP()
    means = torch.tensor([[-2.0, 0.5], [1.5, 1.0]], dtype=F64)
    gmm = sd.toy.GaussianMixture(
        means, torch.tensor([[0.3, 0.1], [0.2, 0.4]], dtype=F64), torch.ones(2, dtype=F64)
    )
    g = torch.Generator().manual_seed(7)
    a, s = float(p.alpha(t)), float(p.sigma(t))
    x0 = gmm.sample(100_000, generator=g)
    q = a * gmm.sample(4, generator=g) + s * torch.randn(4, 2, generator=g, dtype=F64)
    exact = gmm.denoiser(p)(q, t).x0
    for x, ref in zip(q, exact, strict=True):
        est, se, ess = importance_posterior_mean(x, x0, a, s)
        assert ess > 250 and float(se.max()) < 0.02
        assert float(((est - ref) / se).abs().max()) < 4.0, (x.tolist(), est.tolist(), ref.tolist())


@pytest.mark.parametrize(("solver", "order"), [("ddim", 1), ("dpmpp_2m", 2)])
def test_solver_order_holds_on_sub_vp(solver, order):
    """Against the exact ODE solution (DOP853 on the exact score): the error's log-log slope is the solver's
    order (measured 1.0 and 2.0 over 10, 20, 40 logsnr-uniform steps)."""
    p = sd.SubVP()
    gmm = smooth_mixture()
    x_T = noise(16, 8) * float(p.sigma(p.t_max))
    exact = exact_sample(gmm, p, x_T)
    den = gmm.denoiser(p)
    steps = [10, 20, 40]
    errors = [rel_rmse(sd.sample(den, x_T, n, solver, "logsnr_uniform"), exact) for n in steps]
    assert order - 0.25 < slope(steps, errors) < order + 0.35, errors
