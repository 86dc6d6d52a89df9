"""Inverse-problem guidance (DPS, MCG, PiGDM, RePaint) against closed forms: Tweedie's covariance for
the DPS gradient, the Gaussian posterior for PiGDM, a literal RePaint loop, the exact posterior."""

from __future__ import annotations

import csv
import itertools
import math
import traceback
from pathlib import Path

import pytest
import torch

import steerdiff as sd
from steerdiff.bench.posterior import make_case
from steerdiff.guidance import DPS, MCG, ClassifierGuidance, PiGDM, RePaint, repaint_nfe, repaint_sample
from steerdiff.guidance._measurement import MeasurementGuided
from steerdiff.inverse import Blur, Inpaint, Matrix

from .reference import half_net, smooth_v_net
from .test_guidance_cfg import learned_variance, two_class

F64 = torch.float64
PROC = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))


def _diag_mixture(d: int = 4, k: int = 3, seed: int = 0) -> sd.toy.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(k, d, generator=g, dtype=F64)
    variances = 0.05 + 0.5 * torch.rand(k, d, generator=g, dtype=F64)
    return sd.toy.GaussianMixture(means, variances, 0.5 + torch.rand(k, generator=g, dtype=F64))


def _tweedie_jacobian(gmm: sd.toy.GaussianMixture, x: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """``d E[x0 | x_t] / d x_t = (alpha / sigma^2) Cov[x0 | x_t]`` from the components, ``(n, d, d)``."""
    mu, var, w = gmm.means, gmm.variances, gmm.weights
    tot = a * a * var + s * s  # (k, d) marginal variances
    logr = w.log() - 0.5 * (((x[:, None, :] - a * mu) ** 2 / tot) + tot.log()).sum(-1)
    r = torch.softmax(logr, dim=-1)  # (n, k)
    m = mu + a * var / tot * (x[:, None, :] - a * mu)  # (n, k, d) component posterior means
    c = var * s * s / tot  # (k, d) component posterior variances
    mean = (r[:, :, None] * m).sum(1)
    second = torch.einsum("nk,nkd,nke->nde", r, m, m) + torch.diag_embed(r @ c)
    return (a / s**2) * (second - mean[:, :, None] * mean[:, None, :])


@pytest.mark.parametrize("variant", ["normalized", "squared"])
def test_dps_gradient_is_tweedie_jacobian_times_residual(variant: str) -> None:
    gmm = _diag_mixture()
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 4, generator=g, dtype=F64)
    y = torch.randn(2, generator=g, dtype=F64)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    t, s_y, scale = 400.0, 0.3, 0.7
    a, s = float(PROC.alpha(t)), float(PROC.sigma(t))
    den = gmm.denoiser(PROC)
    J = _tweedie_jacobian(gmm, x, a, s)
    # the oracle itself against autograd's Jacobian of the exact denoiser (one sample)
    J0 = torch.autograd.functional.jacobian(lambda v: gmm.denoise(v[None], a, s)[0], x[0])
    torch.testing.assert_close(J[0], J0, rtol=1e-10, atol=1e-12)
    r = y - gmm.denoise(x, a, s) @ A.T
    w = r / r.norm(dim=1, keepdim=True) if variant == "normalized" else r / s_y**2
    expected = scale * torch.einsum("nde,ne->nd", J, w @ A)  # J symmetric: J^T A^T w
    dps = DPS(den, Matrix(A), y, noise_std=s_y, scale=scale, variant=variant)
    _, grad = dps.likelihood_score(x, t)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    guided = dps(x, t)
    torch.testing.assert_close(guided.eps, den(x, t).eps - s * expected, rtol=1e-10, atol=1e-12)
    assert not guided.eps.requires_grad


def test_dps_ddpm_step_is_alg1_with_beta_step() -> None:
    """Docstring claim: on consecutive timesteps the guided DDPM step moves x by kappa g with
    kappa = beta_t / sqrt(1 - beta_t) (Alg. 1's step, up to the posterior-mean scaling)."""
    gmm = _diag_mixture()
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 4, generator=g, dtype=F64)
    y = torch.randn(3, generator=g, dtype=F64)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    den = gmm.denoiser(PROC)
    dps = DPS(den, Matrix(A), y, scale=2.0)
    grid = sd.solvers.make_grid(PROC, sd.schedules.Custom(torch.tensor([500.0, 499.0])), 1, final="none")
    step = sd.solvers.DDPM().step
    guided = step(sd.solvers.Model(dps), x, 0, grid, {})
    plain = step(sd.solvers.Model(den), x, 0, grid, {})
    beta = 1 - float(PROC.alphas_cumprod[500] / PROC.alphas_cumprod[499])
    torch.testing.assert_close(guided.std, plain.std)
    g_ = dps.likelihood_score(x, 500.0)[1]
    torch.testing.assert_close(
        guided.mean - plain.mean, beta / math.sqrt(1 - beta) * g_, rtol=1e-9, atol=1e-13
    )


@pytest.mark.parametrize("noise_std", [0.2, 0.0])
def test_pigdm_is_exact_for_a_unit_gaussian(noise_std: float) -> None:
    """Prior N(mu, I): x0 | x_t is N(x0_hat, r_t^2 I) and PiGDM's x0 is the exact E[x0 | x_t, y]."""
    d = 5
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(d, generator=g, dtype=F64)

    def net(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # E[x0 | x_t] under N(mu, I), per-sample t
        a, s = PROC.alpha(t)[:, None], PROC.sigma(t)[:, None]
        return mu + a / (a * a + s * s) * (v - a * mu)

    A = torch.randn(3, d, generator=g, dtype=F64)
    y = torch.randn(4, 3, generator=g, dtype=F64)  # one observation per sample
    x = torch.randn(4, d, generator=g, dtype=F64)
    t = torch.tensor([300.0, 300.0, 550.0, 900.0], dtype=F64)  # per-sample times
    guided = PiGDM(sd.Denoiser(net, PROC, "x0", shape=(d,)), Matrix(A), y, noise_std=noise_std)
    out = guided(x, t).x0
    for i in range(4):
        a, s = float(PROC.alpha(t[i])), float(PROC.sigma(t[i]))
        # E[x0 | x_t] and Cov = r^2 I under N(mu, I), then Gaussian conditioning on y
        m = mu + a / (a * a + s * s) * (x[i] - a * mu)
        c = s * s / (a * a + s * s) * torch.eye(d, dtype=F64)
        gain = c @ A.T @ torch.linalg.inv(A @ c @ A.T + noise_std**2 * torch.eye(3, dtype=F64))
        torch.testing.assert_close(out[i], m + gain @ (y[i] - A @ m), rtol=1e-8, atol=1e-10)


def test_dps_normalized_step_is_zero_where_the_residual_is() -> None:
    """``r / ||r||`` at ``r = 0`` is taken as 0: DPS over a denoiser whose ``x0`` satisfies ``A x0 = y``
    exactly (an inpainting net that returns the known entries) is that denoiser, in a sampling run too (it
    was 0 / 0 = NaN without the guard)."""
    gmm, op, y = _gaussian_inpainting()
    known = torch.tensor([True, False, True, False])
    y_full = torch.tensor([y[0], 0.0, y[1], 0.0], dtype=F64)
    net = gmm.denoiser(PROC).net
    # the known entries y + 0 x: exactly y, and a function of x for autograd
    den = sd.Denoiser(lambda v, t: torch.where(known, y_full + 0 * v, net(v, t)), PROC, "x0", shape=(4,))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    for t in (700.0, 50.0):
        assert torch.equal(op(den(x, t).x0), y.expand(5, 2))
        torch.testing.assert_close(DPS(den, op, y, scale=5.0)(x, t).x0, den(x, t).x0, rtol=0, atol=0)
    runs = [sd.sample(d, x, 8, "dpmpp_2m") for d in (DPS(den, op, y, scale=5.0), den)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_add_score_steers_the_estimate_the_prediction_holds() -> None:
    # x0' = x0 + (sigma^2 / alpha) g where x0 is held, eps' = eps - sigma g where eps is: one prediction
    g = torch.Generator().manual_seed(8)
    x, x0, grad = (torch.randn(5, 4, generator=g, dtype=F64) for _ in range(3))
    for a, s in ((0.6, 0.8), (torch.tensor([[0.6], [0.1], [0.9], [0.3], [0.5]], dtype=F64), None)):
        s = s if s is not None else (1 - a * a).sqrt()
        by_x0 = sd.guidance.add_score(sd.Prediction(x, a, s, x0=x0), grad)
        by_eps = sd.guidance.add_score(sd.Prediction(x, a, s, eps=(x - a * x0) / s), grad)
        assert by_x0.x0_given and not by_eps.x0_given
        torch.testing.assert_close(by_x0.x0, x0 + s * s / a * grad, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(by_eps.x0, by_x0.x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(by_eps.eps, by_x0.eps, rtol=1e-12, atol=1e-12)


def test_dps_keeps_float32_accuracy_near_zero_snr() -> None:
    """DPS steers the denoised estimate it holds: a v-prediction net on zero-terminal-SNR betas,
    dpmpp_2m over 20 time-uniform steps, float32 against float64. Measured: 5.2e-7 relative (3.9e-6
    when the estimate went x0 -> eps -> eps' -> x0' through x, which cancels where alpha is tiny)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    proc = sd.VP.discrete(betas=betas, rescale_zero_snr=True)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(16, generator=g, dtype=F64)
    w = torch.randn(16, 16, generator=g, dtype=F64) / 4
    A, y = torch.randn(4, 16, generator=g, dtype=F64) / 4, torch.randn(4, generator=g, dtype=F64)
    x_T = torch.randn(256, 16, generator=g, dtype=F64)

    guided = DPS(sd.Denoiser(smooth_v_net(proc, mu, w), proc, "v"), Matrix(A, noise_std=0.05), y, scale=2.0)
    ref, out = (
        sd.sample(guided, x_T.to(dtype), steps=20, solver="dpmpp_2m", schedule="time_uniform").double()
        for dtype in (F64, torch.float32)
    )
    assert float((out - ref).abs().max() / ref.abs().max()) < 1.5e-6


@pytest.mark.parametrize("method", [DPS, PiGDM])
def test_inverse_guidance_keeps_an_eps_nets_eps_near_the_clean_end(method) -> None:
    """An eps net's eps is steered where it is held, although the guidance reads ``x0`` (which derives it)
    for the residual: float32 against float64 at t = 0, 5 and 50 of DDPM betas, as
    ClassifierGuidance / RewardGuidance do. Measured <= 2.4e-7 relative, as the unguided net (2.2e-7);
    when the derived x0 was steered and eps derived back through x: DPS 2.9e-4, 9.7e-5, 1.2e-5; PiGDM
    5.2e-6 at t = 0."""
    proc = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g, dtype=F64) / 4
    A, y = torch.randn(4, 16, generator=g, dtype=F64) / 4, torch.randn(4, generator=g, dtype=F64)
    x = 3 * torch.randn(256, 16, generator=g, dtype=F64)

    def net(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a smooth eps, in float64
        return (0.5 * torch.tanh(v.double() @ w) + 1e-5 * t.double()[:, None]).to(v.dtype)

    den = sd.Denoiser(net, proc, "eps")
    kwargs = {"scale": 2.0} if method is DPS else {}
    guided = method(den, Matrix(A, noise_std=0.05), y, **kwargs)
    for t in (0.0, 5.0, 50.0):
        ref, out = (guided(x.to(dtype), t) for dtype in (F64, torch.float32))
        for get in (lambda p: p.eps, lambda p: p.x0):
            want, got = get(ref), get(out).double()
            assert float((got - want).abs().max() / want.abs().max()) < 5e-7, t


def test_mcg_projects_the_dps_estimate() -> None:
    gmm = _diag_mixture()
    g = torch.Generator().manual_seed(4)
    A = torch.randn(2, 4, generator=g, dtype=F64)
    y = torch.randn(2, generator=g, dtype=F64)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    den = gmm.denoiser(PROC)
    x0 = DPS(den, Matrix(A), y, scale=3.0)(x, 250.0).x0
    expected = x0 + (A.T @ torch.linalg.solve(A @ A.T, (y - x0 @ A.T).T)).T
    torch.testing.assert_close(
        MCG(den, Matrix(A), y, scale=3.0)(x, 250.0).x0, expected, rtol=1e-10, atol=1e-12
    )
    x_T = torch.randn(64, 4, generator=g, dtype=F64)
    out = sd.sample(MCG(den, Matrix(A), y, scale=0.0), x_T, steps=20, solver="ddpm", generator=g)
    torch.testing.assert_close(out @ A.T, y.expand(64, 2), rtol=0, atol=1e-10)


def test_mcg_at_scale_zero_is_the_projection_without_a_backward_pass() -> None:
    """``scale = 0`` leaves the projection alone and takes no gradient (the module docstring): under
    ``torch.inference_mode()`` and over a net whose output is detached it is ``x0 + A^+ (y - A x0)`` of the
    base's ``x0``. Taking the zero-scaled DPS gradient anyway passed every other test (and refuses both)."""
    gmm = _diag_mixture()
    g = torch.Generator().manual_seed(4)
    A, y = torch.randn(2, 4, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    net = gmm.denoiser(PROC).net
    den = sd.Denoiser(lambda v, t: net(v, t).detach(), PROC, "x0", shape=(4,))
    x0 = den(x, 250.0).x0
    want = x0 + (A.T @ torch.linalg.solve(A @ A.T, (y - x0 @ A.T).T)).T
    with torch.inference_mode():
        got = MCG(den, Matrix(A), y, scale=0.0)(x, 250.0).x0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", [DPS, PiGDM, MCG])
def test_inverse_guidance_over_exact_classifier_guidance_is_over_the_class(method) -> None:
    """Classifier guidance with the exact noisy classifier of class 1 is class 1's exact denoiser (its
    x0 holds ``sigma^2 / alpha`` times the classifier's gradient), so DPS / PiGDM / MCG over it are DPS /
    PiGDM / MCG over class 1's denoiser: their gradient goes through the classifier's Hessian (a
    second-order graph). Before, the inner guidance refused an ``x`` that requires grad
    ('ClassifierGuidance: x requires grad, and differentiating through ... is not supported')."""
    _, c1, full = two_class()

    def log_prob_y(x: torch.Tensor, t: float) -> torch.Tensor:
        a, s = float(PROC.alpha(t)), float(PROC.sigma(t))
        return math.log(0.5) + c1.log_prob(x, a, s) - full.log_prob(x, a, s)

    g = torch.Generator().manual_seed(9)
    A = torch.randn(1, 2, generator=g, dtype=F64)
    y = torch.tensor([1.0], dtype=F64)
    x = 2 * torch.randn(6, 2, generator=g, dtype=F64)
    nested = method(ClassifierGuidance(full.denoiser(PROC), log_prob_y), Matrix(A), y, noise_std=0.2)
    direct = method(c1.denoiser(PROC), Matrix(A), y, noise_std=0.2)
    for t in (800.0, 300.0, 50.0):
        got, want = nested(x, t), direct(x, t)
        torch.testing.assert_close(got.eps, want.eps, rtol=1e-9, atol=1e-11)
        assert not got.eps.requires_grad
    x_T = torch.randn(16, 2, generator=g, dtype=F64)
    run = [
        sd.sample(den, x_T, 10, "ddpm", generator=torch.Generator().manual_seed(1))
        for den in (nested, direct)
    ]
    torch.testing.assert_close(run[0], run[1], rtol=1e-9, atol=1e-11)


def test_dps_on_the_16d_case_lands_near_the_floor() -> None:
    """The benchmark's gmm16 case (d_y = 2, s = 0.1) at 200 NFE, DDPM. Measured (seed 0, n = 512): DPS
    squared at scale 1 is 3.53x the floor (0.3: 3.59x, 3: 6.00x), DPS normalized at scale 30 is 2.64x
    (10: 3.43x, 100: 6.15x); the prior is 8.06x."""
    case = make_case("gmm16", 2, 0.1, n=512, seed=0)
    op = Matrix(case.A)

    def ratio(den: sd.Denoiser) -> float:
        g = case.noise_generator()
        x = sd.sample(den, case.x_T, steps=200, solver="ddpm", schedule="time_uniform", generator=g)
        return case.distance(x) / case.floor

    assert case.prior_distance / case.floor > 7
    assert ratio(DPS(case.den, op, case.y, 0.1, scale=1.0, variant="squared")) < 4.5
    assert ratio(DPS(case.den, op, case.y, 0.1, scale=30.0)) < 3.4


def _gaussian_inpainting() -> tuple[sd.toy.GaussianMixture, Inpaint, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    cov = q @ torch.diag(torch.tensor([0.05, 0.3, 0.8, 1.5], dtype=F64)) @ q.T
    mu = torch.randn(4, generator=g, dtype=F64)
    gmm = sd.toy.GaussianMixture(mu[None], cov[None], torch.ones(1, dtype=F64))
    return gmm, Inpaint(torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)), torch.tensor([0.5, -1.0], dtype=F64)


def _literal_repaint(
    gmm: sd.toy.GaussianMixture, y: torch.Tensor, x_T: torch.Tensor, steps: int
) -> torch.Tensor:
    """Lugmayr et al. Alg. 1 with U = 1, written out: DDPM step for the unknown entries, a forward sample
    of y for the known ones, merged; the final image takes y on the known entries."""
    ts = torch.linspace(999, 0, steps, dtype=F64).tolist()
    known = torch.tensor([True, False, True, False])
    y_full = torch.tensor([y[0], 0.0, y[1], 0.0], dtype=F64)
    g = torch.Generator().manual_seed(7)
    x = x_T
    for k, t in enumerate(ts):
        a, s = float(PROC.alpha(t)), float(PROC.sigma(t))
        x0 = gmm.denoise(x, a, s)
        if k == steps - 1:
            return torch.where(known, y_full, x0)
        a1, s1 = float(PROC.alpha(ts[k + 1])), float(PROC.sigma(ts[k + 1]))
        e = (s1 * a / (a1 * s)) ** 2
        unknown = (
            e * a1 / a * x
            + a1 * (1 - e) * x0
            + s1 * math.sqrt(1 - e) * torch.randn(x.shape, generator=g, dtype=F64)
        )
        x = torch.where(known, a1 * y_full + s1 * torch.randn(x.shape, generator=g, dtype=F64), unknown)
    return x


def test_repaint_known_entries_exact_and_unknown_as_the_paper() -> None:
    """Replacement is biased on correlated data (a property of RePaint, not of the code): with U = 1 the
    unknown entries match a literal Alg. 1 loop; resampling (U = 4) moves them towards the exact
    posterior. Measured (n = 2000, 50 steps): largest error of the unknown entries' mean 0.56 (U = 1;
    the literal loop 0.54) and 0.22 (U = 4, j = 1); ours vs the literal loop: 0.033 (se 0.017), 0.046 in
    the covariance."""
    gmm, op, y = _gaussian_inpainting()
    post = gmm.posterior(op.to_dense(), y, 0.0)
    den = gmm.denoiser(PROC)
    n, steps = 2000, 50
    x_T = torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    g = torch.Generator().manual_seed(2)
    one = sd.sample(
        RePaint(den, op, y, generator=g),
        x_T,
        steps=steps,
        solver="ddpm",
        schedule="time_uniform",
        generator=g,
    )
    assert torch.equal(one[:, [0, 2]], y.expand(n, 2))
    ref = _literal_repaint(gmm, y, x_T, steps)
    unknown = [1, 3]
    se = (post.covariances[0].diagonal()[unknown] / n).sqrt()
    assert bool(((one[:, unknown].mean(0) - ref[:, unknown].mean(0)).abs() < 5 * math.sqrt(2) * se).all())
    # 5 standard errors of a difference of two sample covariances (entries ~0.33, n = 2000): 0.075
    torch.testing.assert_close(torch.cov(one[:, unknown].T), torch.cov(ref[:, unknown].T), rtol=0, atol=0.075)

    def mean_error(x: torch.Tensor) -> float:
        return float((x[:, unknown].mean(0) - post.means[0, unknown]).abs().max())

    x4 = repaint_sample(den, op, y, x_T, steps, resample=4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x4[:, [0, 2]], y.expand(n, 2))
    assert mean_error(one) > 0.4  # the replacement bias is real
    assert mean_error(x4) < 0.3 and mean_error(x4) < 0.5 * mean_error(one)


def test_repaint_call_is_the_paper_replacement_exactly() -> None:
    """Lugmayr et al. Alg. 1 (lines 5-8) written out with ``torch.where``: the net sees ``x_t`` with its known
    entries replaced by ``alpha_t y + sigma_t z`` (``z`` the next ``randn(x.shape)`` of the module's
    generator) and the unknown ones untouched; ``x0`` is the net's with the known entries set to ``y``;
    ``eps`` is relative to the caller's ``x``. All to 1e-12, for scalar and per-sample times, with a
    fresh ``z`` at every call."""
    gmm, op, y = _gaussian_inpainting()
    seen: list[torch.Tensor] = []

    def net(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(v.clone())
        return gmm.denoiser(PROC).net(v, t)

    known = torch.tensor([True, False, True, False])
    y_full = torch.tensor([y[0], 0.0, y[1], 0.0], dtype=F64)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    guided = RePaint(
        sd.Denoiser(net, PROC, "x0", shape=(4,)), op, y, generator=torch.Generator().manual_seed(11)
    )
    g = torch.Generator().manual_seed(11)
    per_sample = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0, 10.0], dtype=F64)
    for t in (700.0, 250.0, per_sample):
        tt = torch.as_tensor(t, dtype=F64).expand(6)
        a, s = PROC.alpha(tt)[:, None], PROC.sigma(tt)[:, None]
        z = torch.randn(x.shape, generator=g, dtype=F64)
        x_in = torch.where(known, a * y_full + s * z, x)  # Alg. 1: x_known = alpha y + sigma z
        x0_net = torch.cat([gmm.denoise(x_in[k : k + 1], float(a[k]), float(s[k])) for k in range(6)])
        x0 = torch.where(known, y_full, x0_net)
        pred = guided(x, t)
        torch.testing.assert_close(seen[-1], x_in, rtol=0, atol=1e-12)
        torch.testing.assert_close(pred.x0, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(pred.eps, (x - a * x0) / s, rtol=1e-12, atol=1e-12)
    assert len(seen) == 3


def _alg1_with_resampling(
    gmm: sd.toy.GaussianMixture,
    y: torch.Tensor,
    x_T: torch.Tensor,
    steps: int,
    resample: int,
    jump: int,
    seed: int,
) -> torch.Tensor:
    """Lugmayr et al. Alg. 1 with the jumps of their Sec. 4.2, written out for the VP process on the nodes
    ``linspace(999, 0, steps)``, drawing from one generator in the order the library does: per evaluation
    the known-region sample ``z``, then the DDPM noise; a jump back ``j`` nodes is the forward transition
    ``x_b ~ N(a_b / a_k x_k, (1 - a_b^2 / a_k^2) I)``, ``U - 1`` times at node ``steps - 1`` and every
    ``j``-th node above it (the authors' ``get_schedule_jump``).
    """
    ts = torch.linspace(999, 0, steps, dtype=F64).tolist()
    known = torch.tensor([True, False, True, False])
    y_full = torch.tensor([y[0], 0.0, y[1], 0.0], dtype=F64)
    g = torch.Generator().manual_seed(seed)
    passes = [0] * steps
    x, k = x_T, 0
    while True:
        a, s = float(PROC.alpha(ts[k])), float(PROC.sigma(ts[k]))
        x_in = torch.where(known, a * y_full + s * torch.randn(x.shape, generator=g, dtype=F64), x)
        x0 = torch.where(known, y_full, gmm.denoise(x_in, a, s))
        if k == steps - 1:
            return x0
        a1, s1 = float(PROC.alpha(ts[k + 1])), float(PROC.sigma(ts[k + 1]))
        e = (s1 * a / (a1 * s)) ** 2
        noise = torch.randn(x.shape, generator=g, dtype=F64)
        x = e * a1 / a * x + a1 * (1 - e) * x0 + s1 * math.sqrt(1 - e) * noise
        k += 1
        if jump <= k < steps and (steps - 1 - k) % jump == 0 and passes[k] < resample - 1:
            passes[k] += 1
            r = float(PROC.alpha(ts[k - jump])) / float(PROC.alpha(ts[k]))
            x = r * x + math.sqrt(1 - r * r) * torch.randn(x.shape, generator=g, dtype=F64)
            k -= jump


def test_repaint_sample_nfe_and_single_pass_equals_sample() -> None:
    gmm, op, y = _gaussian_inpainting()
    den = gmm.denoiser(PROC)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    for steps, resample, jump in [(20, 1, 1), (20, 3, 1), (23, 4, 5), (10, 2, 10)]:
        gen = torch.Generator().manual_seed(5)
        x, info = repaint_sample(
            den, op, y, x_T, steps, resample=resample, jump=jump, generator=gen, return_info=True
        )
        assert info.nfe == repaint_nfe(steps, resample, jump)
        ref = _alg1_with_resampling(gmm, y, x_T, steps, resample, jump, seed=5)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
    assert repaint_nfe(20, 3, 1) == 19 * 3 + 1
    cfg = sd.guidance.CFG(den, sd.Denoiser(den.net, PROC, "x0", shape=(4,)), 2.0)  # 2 evaluations a call
    info = repaint_sample(cfg, op, y, x_T, 23, resample=4, jump=5, generator=gen, return_info=True)[1]
    assert info.nfe == 2 * repaint_nfe(23, 4, 5)
    a = repaint_sample(den, op, y, x_T, 15, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    b = sd.sample(
        RePaint(den, op, y, generator=g), x_T, steps=15, solver="ddpm", schedule="time_uniform", generator=g
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, _alg1_with_resampling(gmm, y, x_T, 15, 1, 1, seed=5), rtol=0, atol=1e-10)


def _jumps(evaluated: list[int]) -> list[tuple[int, int]]:
    """``(from, to)`` of each jump in a sequence of evaluated nodes (after node ``k`` the state is at
    ``k + 1``)."""
    return [(a + 1, b) for a, b in itertools.pairwise(evaluated) if b != a + 1]


@pytest.mark.parametrize(
    ("steps", "resample", "jump"),
    [(6, 2, 1), (6, 3, 1), (6, 2, 2), (6, 2, 3), (7, 2, 3), (25, 3, 4), (40, 2, 40), (250, 10, 10)],
)
def test_repaint_sample_jumps_where_the_authors_code_does(steps: int, resample: int, jump: int) -> None:
    """The nodes the net is evaluated at, in order, are those of the authors' RePaint: diffusers'
    ``RePaintScheduler.set_timesteps(steps, j, U)`` list (their ``get_schedule_jump``) read as they do,
    each entry the 0-based level of the state, the net evaluated where the next one is lower. At
    ``j = 1`` that is Alg. 1 (``U`` passes at every node but the last). diffusers' pipeline evaluates
    at each entry instead, so its jumps are these shifted one node towards the clean end. Before, jumps
    went from the multiples of ``j`` (``(2, 0), (4, 2)`` at ``(6, 2, 2)`` for the authors' ``(3, 1),
    (5, 3)``; at the paper's ``(250, 10, 10)`` from nodes 10..240 for their 19..249)."""
    from diffusers import RePaintScheduler

    seen: list[float] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    op, y = Inpaint(torch.tensor([1.0, 0.0], dtype=F64)), torch.tensor([0.3], dtype=F64)
    x_T = torch.zeros(1, 2, dtype=F64)
    _, info = repaint_sample(
        sd.Denoiser(net, PROC, "eps"),
        op,
        y,
        x_T,
        steps,
        resample=resample,
        jump=jump,
        generator=torch.Generator().manual_seed(0),
        return_info=True,
    )
    nodes = torch.tensor(info.grid.t[:steps], dtype=F64)
    evaluated = [int((nodes - t).abs().argmin()) for t in seen]
    assert len(evaluated) == info.nfe == repaint_nfe(steps, resample, jump)

    scheduler = RePaintScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps, jump_length=jump, jump_n_sample=resample)
    stride = 1000 // steps
    levels = [int(t) // stride for t in scheduler.timesteps] + [-1]
    assert evaluated == [steps - 1 - a for a, b in itertools.pairwise(levels) if b < a]
    if jump == 1:
        assert evaluated == [k for k in range(steps) for _ in range(resample if k < steps - 1 else 1)]
    pipeline = [steps - 1 - b for a, b in itertools.pairwise([levels[0] + 1, *levels[:-1]]) if b < a]
    assert _jumps(pipeline) == [(a + 1, b + 1) for a, b in _jumps(evaluated)]
    assert len(_jumps(evaluated)) == (resample - 1) * ((steps - 1) // jump)


def test_repaint_sample_passes_a_net_condition_named_y_or_operator() -> None:
    """``den``, ``operator`` and ``y`` are positional-only: a net whose condition is called ``y`` (a class
    label, as in guided-diffusion's ``model(x, t, y)``) or ``operator`` gets it from ``**cond`` (before: a
    TypeError, multiple values for ``y``), bit for bit the run of the net with the condition baked in."""
    seen = []

    def eps(x: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
        a, s = (c(t.to(F64)).to(x.dtype)[:, None] for c in (PROC.alpha, PROC.sigma))
        return s * (x - mean * a) / (var * a * a + s * s)  # data N(mean, var I)

    def net(x: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor, operator: float) -> torch.Tensor:
        seen.append((y, operator))
        return eps(x, t, y[:, None], operator)

    labels = torch.tensor([0.5, -0.5, 1.0], dtype=F64)
    op, y_obs = Inpaint(torch.tensor([1.0, 0, 1, 0], dtype=F64)), torch.tensor([0.3, -0.2], dtype=F64)
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(resample=2, jump=2, generator=torch.Generator().manual_seed(5))
    out = repaint_sample(sd.Denoiser(net, PROC, "eps"), op, y_obs, x_T, 6, y=labels, operator=0.25, **kw)
    assert len(seen) == repaint_nfe(6, 2, 2) and all(torch.equal(y, labels) and o == 0.25 for y, o in seen)
    baked = sd.Denoiser(lambda x, t: eps(x, t, labels[:, None], 0.25), PROC, "eps")
    kw["generator"] = torch.Generator().manual_seed(5)
    assert torch.equal(out, repaint_sample(baked, op, y_obs, x_T, 6, **kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_repaint_sample_half_precision_runs_only_the_net_in_half(dtype: torch.dtype) -> None:
    """A half-precision ``x_T``: exactly a float32 run (DDPM steps, jumps and the replacement in float32)
    whose net rounds its input and output to ``dtype``, returned in ``dtype``."""
    gmm, op, y = _gaussian_inpainting()
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    runs = []
    for net, x in ((half_net(gmm, PROC), x_T), (half_net(gmm, PROC, round_input=dtype), x_T.float())):
        den = sd.Denoiser(net, PROC, prediction="eps")
        runs.append(
            repaint_sample(den, op, y, x, 12, resample=2, jump=3, generator=torch.Generator().manual_seed(5))
        )
    assert runs[0].dtype == dtype and runs[1].dtype == torch.float32
    assert torch.equal(runs[0], runs[1].to(dtype))


@pytest.mark.parametrize("method", [DPS, PiGDM, MCG])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradient_guidance_in_half_precision_runs_only_the_net_in_half(method, dtype) -> None:
    """A half-precision ``x_T``: exactly a float32 run whose net rounds its input and output to ``dtype``
    (the residual, the operator's solves and the gradient in float32; they used to run in ``dtype``:
    PiGDM's error against float64 was 6.5e-2 in float16, 4.2e-4 with only the net in half)."""
    gmm, op, y = _gaussian_inpainting()
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    runs = []
    for net, x in ((half_net(gmm, PROC), x_T), (half_net(gmm, PROC, round_input=dtype), x_T.float())):
        guided = method(sd.Denoiser(net, PROC, prediction="eps"), op, y.float(), noise_std=0.3)
        runs.append(sd.sample(guided, x, 12, solver="ddpm", generator=torch.Generator().manual_seed(5)))
    assert runs[0].dtype == dtype and runs[1].dtype == torch.float32
    assert torch.equal(runs[0], runs[1].to(dtype))


@pytest.mark.parametrize("method", [PiGDM, MCG, RePaint, sd.guidance.LanPaint])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_observation_is_taken_as_float32(method, dtype) -> None:
    """``y`` in half precision (a measurement taken in a float16 pipeline) with a circular Blur, whose FFT
    solves need float32: the run is that of ``y`` in float32 (the guidance computes in float32 and casts
    ``y`` there). It was refused when the guidance was made, by the check that the operator has a
    pseudo-inverse / a solve, run in ``y``'s dtype: 'Blur.pinv: y must be float32 or float64 (an FFT)'."""
    g = torch.Generator().manual_seed(14)
    gmm = _diag_mixture(d=16)
    den = gmm.denoiser(PROC, shape=(1, 4, 4))
    op = Blur(torch.rand(3, 3, generator=g, dtype=F64), (1, 4, 4))
    y = op(torch.randn(1, 1, 4, 4, generator=g, dtype=F64))[0].to(dtype)
    x_T = torch.randn(3, 1, 4, 4, generator=g)

    def run(obs: torch.Tensor) -> torch.Tensor:
        if method in (PiGDM, MCG):
            guided = method(den, op, obs, noise_std=0.1)
        else:
            guided = (
                method(den, op, obs, generator=torch.Generator().manual_seed(1))
                if method is RePaint
                else method(den, op, obs)
            )
        return sd.sample(guided, x_T, 4, solver="ddim")

    assert torch.equal(run(y), run(y.float()))


@pytest.mark.parametrize("method", [DPS, PiGDM, MCG])
def test_gradient_guidance_under_no_grad_is_the_same_run(method) -> None:
    """Pipelines sample under ``torch.no_grad()``: the guidance switches autograd on for its gradient
    (it used to refuse), the same samples bit for bit."""
    gmm, op, y = _gaussian_inpainting()
    guided = method(gmm.denoiser(PROC), op, y, noise_std=0.3)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    runs = []
    for context in (torch.no_grad, torch.enable_grad):
        with context():
            runs.append(sd.sample(guided, x_T, 12, solver="ddpm", generator=torch.Generator().manual_seed(5)))
    assert torch.equal(runs[0], runs[1])


def test_a_seeded_run_refuses_noise_from_the_global_rng() -> None:
    """RePaint draws its replacement noise itself: under ``sd.sample(..., generator=g)`` (or an SMC
    run) without a generator of its own it would use torch's global RNG and the seed would not
    reproduce the run, so that is refused, naming ``generator``; with its own generator, or with no
    seed at all, it runs, and the seeded run reproduces exactly."""
    gmm, op, y = _gaussian_inpainting()
    den = gmm.denoiser(PROC)
    x_T = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(steps=6, solver="ddpm", schedule="time_uniform")
    for wrapped in (RePaint(den, op, y), sd.guidance.DynamicThreshold(RePaint(den, op, y), 0.99)):
        with pytest.raises(ValueError, match=r"generator: RePaint .* global RNG"):
            sd.sample(wrapped, x_T, generator=torch.Generator().manual_seed(0), **kw)
    with pytest.raises(ValueError, match=r"generator: RePaint"):
        sd.smc.fk_steering(
            RePaint(den, op, y), lambda x: x[:, 0], lam=1.0, shape=(2, 4), particles=2, steps=4,
            generator=torch.Generator().manual_seed(0), dtype=F64,
        )  # fmt: skip

    def seeded() -> torch.Tensor:
        return sd.sample(
            RePaint(den, op, y, generator=torch.Generator().manual_seed(3)),
            x_T,
            generator=torch.Generator().manual_seed(0),
            **kw,
        )

    assert torch.equal(seeded(), seeded())
    assert bool(torch.isfinite(sd.sample(RePaint(den, op, y), x_T, **kw)).all())  # unseeded: allowed


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_repaint_takes_one_generator_per_row() -> None:
    """With one generator per row for the sampler and for RePaint, row ``b`` of a batch is the run of
    that row alone with its generators (``sd.sample``, ``repaint_sample`` with jumps, FK steering
    with one RePaint generator per particle); before, RePaint refused a list. RePaint with one
    generator under a per-row list makes each row depend on the batch (measured before on an 8-d
    inpainting, 30 DDPM steps: 0.19 from the row alone; under FK steering 1.6): refused, naming both."""
    gmm, op, y = _gaussian_inpainting()
    den = gmm.denoiser(PROC)
    x_T = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(steps=12, solver="ddpm", schedule="time_uniform")

    def run(rows: list[int]) -> torch.Tensor:
        guided = RePaint(den, op, y, generator=_gens([100 + r for r in rows]))
        return sd.sample(guided, x_T[rows], generator=_gens(rows), **kw)

    def jumps(rows: list[int]) -> torch.Tensor:
        return repaint_sample(den, op, y, x_T[rows], 12, resample=3, jump=4, generator=_gens(rows))

    for fn in (run, jumps):
        batch = fn([0, 1, 2, 3])
        for r in (0, 2):
            torch.testing.assert_close(batch[r : r + 1], fn([r]), rtol=0, atol=1e-12)
        assert float((batch[0] - batch[1]).abs().max()) > 0.1  # the rows' noise differs
    # the known entries are y (x0 made consistent)
    torch.testing.assert_close(run([0, 1, 2, 3])[:, [0, 2]], y.expand(4, 2), rtol=0, atol=1e-12)

    particles = 3

    def fk(rows: list[int]) -> torch.Tensor:
        guided = RePaint(den, op, y, generator=_gens([10 * r + p for r in rows for p in range(particles)]))
        return sd.smc.fk_steering(
            guided, lambda x: -x[:, 1] ** 2, lam=1.0, shape=(len(rows), 4), particles=particles, steps=6,
            generator=_gens(rows), dtype=F64,
        ).x  # fmt: skip

    batch = fk([0, 1, 2])
    torch.testing.assert_close(batch[1], fk([1])[0], rtol=0, atol=1e-12)

    one = RePaint(den, op, y, generator=torch.Generator().manual_seed(3))
    words = r"generator: one generator per row .* RePaint draws the whole batch from one torch\.Generator"
    with pytest.raises(ValueError, match=words):
        sd.sample(one, x_T, generator=_gens([0, 1, 2, 3]), **kw)
    with pytest.raises(ValueError, match=words):  # nested in another wrapper
        sd.sample(sd.guidance.DynamicThreshold(one, None, 5.0), x_T, generator=_gens([0, 1, 2, 3]), **kw)
    with pytest.raises(ValueError, match=r"max_batch: RePaint in the denoiser draws noise"):
        sd.smc.fk_steering(
            RePaint(den, op, y, generator=_gens(range(4))), lambda x: x[:, 0], lam=1.0, shape=(2, 4),
            particles=2, steps=4, generator=_gens([0, 1]), dtype=F64, max_batch=3,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"Composition: max_batch: RePaint in the denoiser draws noise"):
        sd.smc.Composition([RePaint(den, op, y, generator=_gens(range(4))), den], [1.0, 1.0], max_batch=3)
    with pytest.raises(ValueError, match=words):
        sd.smc.fk_steering(
            one, lambda x: x[:, 0], lam=1.0, shape=(2, 4), particles=2, steps=4, generator=_gens([0, 1]),
            dtype=F64,
        )  # fmt: skip
    for bad in (5, [], [torch.Generator(), 1]):
        with pytest.raises(
            ValueError, match=r"RePaint: generator must be None, a torch\.Generator or a non-empty"
        ):
            RePaint(den, op, y, generator=bad)


@pytest.mark.parametrize("method", [DPS, PiGDM, MCG])
def test_a_per_sample_observation_follows_its_batch_row_under_particles(method) -> None:
    """``y`` with one observation per batch row under FK steering (3 particles a row, whole or in slices of
    ``max_batch``): row ``b``'s particles are guided by ``y[b]``, so each row is its run alone with its
    observation (to rounding), and a row differs from the run under another row's observation."""
    gmm = _diag_mixture()
    g = torch.Generator().manual_seed(13)
    A, ys = torch.randn(2, 4, generator=g, dtype=F64), 2 * torch.randn(3, 2, generator=g, dtype=F64)

    def run(rows: list[int], obs: list[int] | None = None, max_batch: int | None = None) -> torch.Tensor:
        guided = method(gmm.denoiser(PROC), Matrix(A), ys[rows if obs is None else obs], noise_std=0.3)
        return sd.smc.fk_steering(
            guided, lambda x: -x[:, 0] ** 2, lam=1.0, shape=(len(rows), 4), particles=3, steps=6,
            generator=_gens(rows), dtype=F64, max_batch=max_batch,
        ).x  # fmt: skip

    batch = run([0, 1, 2])  # equal to rounding: a BLAS may sum a product differently at another batch size
    torch.testing.assert_close(run([0, 1, 2], max_batch=4), batch, rtol=0, atol=1e-12)
    for r in range(3):
        torch.testing.assert_close(run([r])[0], batch[r], rtol=0, atol=1e-12)
    assert float((run([1], obs=[0])[0] - batch[1]).abs().max()) > 0.1
    with pytest.raises(
        ValueError, match=rf"{method.__name__}: y holds 2 observations for calls on 9 samples"
    ):
        run([0, 1, 2], obs=[0, 1])


def test_inverse_guidance_keeps_the_learned_variance() -> None:
    """DPS, PiGDM, MCG, LanPaint and RePaint carry the base net's ``var_interp`` (at the input the net saw;
    detached where a gradient was taken), so DDPM keeps a learned variance: DPS at scale 0 is the
    unguided DDPM run (with fixed_small instead of the learned variance it is 1.0 away)."""
    seen: list[torch.Tensor] = []
    lv = learned_variance(PROC, dim=4, seen=seen)
    g = torch.Generator().manual_seed(6)
    op, y = Matrix(torch.randn(2, 4, generator=g, dtype=F64)), torch.randn(2, generator=g, dtype=F64)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    guided = [
        DPS(lv, op, y, scale=0.5),
        DPS(lv, op, y, noise_std=0.3, scale=1.0, variant="squared"),
        PiGDM(lv, op, y, noise_std=0.2),
        MCG(lv, op, y, scale=0.5),
        MCG(lv, op, y, scale=0.0),
        sd.guidance.LanPaint(lv, op, y),
        RePaint(lv, op, y, generator=torch.Generator().manual_seed(7)),
    ]
    for t in (800.0, 200.0, torch.tensor([900.0, 600.0, 400.0, 100.0, 5.0], dtype=F64)):
        for den in guided:
            v = den(x, t).var_interp
            assert v is not None and not v.requires_grad, den
            torch.testing.assert_close(v, lv(seen[-1], t).var_interp, rtol=0, atol=0)
    assert not torch.equal(seen[-1], x)  # RePaint's net saw the replaced x_t
    x_T = torch.randn(8, 4, generator=g, dtype=F64)
    runs = [
        sd.sample(d, x_T, 10, "ddpm", generator=torch.Generator().manual_seed(8))
        for d in (lv, DPS(lv, op, y, scale=0.0), sd.Denoiser(lambda v, t: lv.net(v, t)[:, :4], PROC, "eps"))
    ]
    assert float((runs[1] - runs[0]).abs().max()) < 1e-12  # measured 1.1e-13 (x0 round trip)
    assert float((runs[2] - runs[0]).abs().max()) > 0.1


def test_bad_input() -> None:
    gmm = _diag_mixture()
    den = gmm.denoiser(PROC)
    with pytest.raises(ValueError, match="x_T contains NaN or inf"):  # it blamed the net at step 0
        sd.guidance.repaint_sample(
            den, Inpaint(torch.ones(4)), torch.zeros(4), torch.full((3, 4), math.nan), 5
        )
    A = torch.randn(2, 4, dtype=F64)
    y = torch.zeros(2, dtype=F64)
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="operator acts on samples of shape"):
        DPS(den, Matrix(torch.randn(2, 5, dtype=F64)), y)
    unshaped = sd.Denoiser(den.net, PROC, prediction="x0")
    with pytest.raises(ValueError, match="operator acts on"):
        DPS(unshaped, Matrix(torch.randn(2, 5, dtype=F64)), y)(x, 100.0)
    with pytest.raises(ValueError, match="y must have shape"):
        DPS(den, Matrix(A), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="observations for a batch"):
        PiGDM(den, Matrix(A), torch.zeros(5, 2, dtype=F64))(x, 100.0)
    for cls in (DPS, MCG, PiGDM):
        with pytest.raises(ValueError, match="noise_std"):
            cls(den, Matrix(A), y, noise_std=-0.1)
    # m > d: A A^T singular, which noise_std = 0 solves without a shift at the clean end (it failed there,
    # mid-sampling, advising an internal argument)
    tall = torch.cat([torch.eye(4, dtype=F64), torch.ones(1, 4, dtype=F64)])
    with pytest.raises(ValueError, match=r"noise_std = 0 needs A A\^T invertible"):
        PiGDM(den, Matrix(tall), torch.zeros(5, dtype=F64), noise_std=0.0)
    PiGDM(den, Matrix(tall), torch.zeros(5, dtype=F64), noise_std=0.1)
    PiGDM(den, Matrix(A), y, noise_std=0.0)
    with pytest.raises(ValueError, match="noise_std"):
        DPS(den, Matrix(A, noise_std=0.0), y, variant="squared")
    with pytest.raises(ValueError, match="scale"):
        DPS(den, Matrix(A), y, scale=-1.0)
    with pytest.raises(ValueError, match="variant"):
        DPS(den, Matrix(A), y, variant="l1")
    with pytest.raises(ValueError, match="operator must be"):
        DPS(den, A, y)
    with pytest.raises(ValueError, match="pseudo-inverse"):
        blur = Blur(torch.ones(2, 2, dtype=F64), (2, 2), padding="zero")
        RePaint(sd.Denoiser(den.net, PROC, "x0"), blur, torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="resample"):
        repaint_sample(den, Inpaint(torch.tensor([1.0, 0, 1, 0])), y, x, 5, resample=0)
    # guidance that needs gradients: under inference_mode, or a net that detaches
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        sd.sample(DPS(den, Matrix(A), y), x, steps=3, solver="ddpm")
    detached = sd.Denoiser(lambda v, t: den.net(v, t).detach(), PROC, "x0", shape=(4,))
    with pytest.raises(ValueError, match="detached"):
        MCG(detached, Matrix(A), y)(x, 100.0)


def test_bench_posterior_quick_writes_the_library_numbers(tmp_path: Path) -> None:
    """``steerdiff bench posterior --quick``: one case (gmm16, d_y = 2, s = 0.1), NFE 50, n = 512. Its CSV
    entries are recomputed here from the public API."""
    from steerdiff.cli import main

    assert main(["bench", "posterior", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    with open(tmp_path / "posterior.csv", newline="") as f:
        rows = {(r["method"], r["schedule"]): r for r in csv.DictReader(f)}
    assert {m for m, _ in rows} == {
        "floor",
        "prior",
        "dps",
        "dps_squared",
        "dps_alg1",
        "mcg",
        "pigdm",
        "repaint",
    }
    assert (tmp_path / "posterior.png").exists()
    case = make_case("gmm16", 2, 0.1, n=512, seed=0)
    assert float(rows[("floor", "")]["nfe_50"]) == case.floor
    x = sd.sample(
        DPS(case.den, Matrix(case.A), case.y, 0.1, scale=1.0, variant="squared"),
        case.x_T,
        steps=50,
        solver="ddpm",
        schedule="time_uniform",
        generator=case.noise_generator(),
    )
    assert float(rows[("dps_squared", "scale=1")]["nfe_50"]) == pytest.approx(case.distance(x), rel=1e-12)


def test_bench_posterior_and_steer_reports_say_the_tuning_is_in_sample() -> None:
    """Each method's step (``bench posterior``) and DPS's scale (``bench steer``) is the best on the samples
    it is then scored on (same x_T, noise and reference set), and the reports say so. Before, they read
    "best step per method, case and NFE (all runs in the CSV)" and "DPS NFE steps (best scale)"; rescored
    on an independent draw, the chosen steps at NFE 50 move e.g. mcg on grid8 d_y=4 s=0.01 from 8.50x to
    13.5x the floor and pigdm on gmm16 d_y=2 s=0.1 from 7.88x to 6.65x."""
    from steerdiff.bench import posterior, steer
    from steerdiff.bench.solvers import Row

    rows = [Row("c", m, "", {50: 1.0}) for m in ("floor", "prior", *(m.name for m in posterior.METHODS))]
    text = posterior.format_report(posterior.PosteriorBench((50,), 8, 0, ["c"], rows))
    assert text.splitlines()[0].endswith(
        "best step per method, case and NFE, chosen in-sample (on the x_T, noise and reference set it is "
        "scored on; all runs in the CSV)."
    )
    result = steer.SteerBench((100,), 8, 0, [], [])
    assert (
        "DPS NFE steps (best scale, chosen in-sample: on the x_T, noise and reference set it is scored on);"
        in (steer.format_report(result))
    )


@pytest.mark.slow  # 7-18 s: in make test-slow, out of make test's default run
def test_bench_posterior_and_steer_give_each_draw_its_own_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every seed that ``bench posterior`` (its 39 cases, each method once) and ``bench steer`` (every
    case and method) give a generator, at seeds 0 and 1, is given at one line of their code (one
    purpose), so no two draws read the same stream. With ``seed + k`` offsets seed 0 built gmm64's prior
    (its means were the first 10 rows of x_T), x_T, and the full grid's gmm16 d_y=1 s=0.01 observation;
    seed 1 gmm16's prior (its means were the first noise of 8 samples), the sampling noise and (at seed
    1) x_T. Seeds are compared mod 2^32: the CPU generator keeps no more."""
    from steerdiff.bench import posterior, steer

    sites: dict[int, set[tuple[str, int]]] = {}

    class Recording(torch.Generator):
        def manual_seed(self, seed: int) -> torch.Generator:
            stack = traceback.extract_stack()
            f = next(f for f in reversed(stack) if f.filename.endswith(("posterior.py", "steer.py")))
            sites.setdefault(seed % 2**32, set()).add((Path(f.filename).name, f.lineno or 0))
            return super().manual_seed(seed)

    monkeypatch.setattr(torch, "Generator", Recording)
    for seed in (0, 1):
        for prior, dim_y, noise, *op in posterior.FULL_CASES + posterior.INPAINT_CASES:
            case = make_case(prior, dim_y, noise, 8, seed, *op)
        for method in posterior.METHODS:
            method.run(case, method.grid[0], 20)
        for name in steer.CASES:
            t = steer.make_target(name, 8, seed)
            for m in steer.METHODS[:-1]:
                steer._run_method(t, m, 200, 8)
            steer._run_dps(t, 1.0, 10, 8)
    assert {seed: where for seed, where in sites.items() if len(where) > 1} == {}
    assert len(sites) > 100


def test_bench_inpaint_case_observes_the_first_coordinates():
    case = make_case("gmm16", 8, 0.01, 64, operator="inpaint")
    assert isinstance(case.operator, sd.inverse.Inpaint) and case.label == "gmm16 inpaint d_y=8 s=0.01"
    assert torch.equal(case.A, torch.eye(16, dtype=torch.float64)[:8])
    # s = 0.01: every posterior sample reproduces the observed coordinates to within a few s
    post = case.posterior.sample(256, torch.Generator().manual_seed(0))
    assert float((post[:, :8] - case.y).abs().max()) < 0.06
    with pytest.raises(ValueError, match="operator"):
        make_case("gmm16", 8, 0.01, 64, operator="blur")


@pytest.mark.parametrize("op_name", ["matrix", "blur"])
def test_pigdm_per_sample_t_is_one_solve_with_a_shift_per_sample(op_name: str) -> None:
    """A per-sample ``t`` makes one ``aat_solve`` call with the shifts ``s^2 / r_t^2`` (was: one call per
    sample with ``float(r_t^2)``, a host sync each), and the same numbers as the scalar-``t`` calls."""
    gmm = _diag_mixture(d=16)
    den = sd.Denoiser(lambda v, t: gmm.denoiser(PROC).net(v.reshape(-1, 16), t).reshape(v.shape), PROC, "x0")
    g = torch.Generator().manual_seed(7)
    if op_name == "matrix":
        op, shape = Matrix(torch.randn(6, 16, generator=g, dtype=F64)), (16,)
    else:
        op, shape = Blur(torch.rand(3, 3, generator=g, dtype=F64), (1, 4, 4)), (1, 4, 4)
    den = sd.Denoiser(den.net, PROC, "x0", shape=shape)
    y = op(torch.randn(1, *shape, generator=g, dtype=F64))[0]
    x = torch.randn(4, *shape, generator=g, dtype=F64)
    t = torch.tensor([50.0, 300.0, 550.0, 900.0], dtype=F64)
    shifts = []
    solve = op.aat_solve
    op.aat_solve = lambda v, shift=0.0: shifts.append(shift) or solve(v, shift)  # type: ignore[method-assign]
    guided = PiGDM(den, op, y, noise_std=0.2)
    shifts.clear()
    out = guided(x, t).x0
    assert len(shifts) == 1 and isinstance(shifts[0], torch.Tensor)
    a, s = PROC.alpha(t), PROC.sigma(t)
    torch.testing.assert_close(shifts[0], 0.04 / (s * s / (a * a + s * s)), rtol=1e-14, atol=0)
    for i in range(4):
        one = guided(x[i : i + 1], float(t[i])).x0
        assert float((out[i : i + 1] - one).abs().max() / one.abs().max()) < 1e-12


def test_gaussian_weight_is_the_dense_precision_times_the_residual() -> None:
    """``C^{-1} res``, ``C = r^2 A A^T + s^2 I`` with ``r^2 = v sigma^2 / (alpha^2 v + sigma^2)``: floats,
    per-sample tensors, ``v = 0`` (``res / s^2``) -- PiGDM's weight and TDS's linear-Gaussian twist."""
    gmm = _diag_mixture()
    g = torch.Generator().manual_seed(8)
    A = torch.randn(3, 4, generator=g, dtype=F64)
    m = MeasurementGuided(gmm.denoiser(PROC), Matrix(A), torch.zeros(3, dtype=F64), noise_std=0.3)
    res = torch.randn(2, 3, generator=g, dtype=F64)
    alpha, sigma = torch.tensor([0.9, 0.4], dtype=F64), torch.tensor([0.3, 0.8], dtype=F64)
    for v in (1.0, 2.5, 0.0):
        per_sample = m.gaussian_weight(res, alpha[:, None], sigma[:, None], v)
        for i in range(2):
            a, s = float(alpha[i]), float(sigma[i])
            r2 = v * s * s / (a * a * v + s * s)
            C = r2 * A @ A.T + 0.09 * torch.eye(3, dtype=F64)
            want = torch.linalg.solve(C, res[i])
            torch.testing.assert_close(per_sample[i], want, rtol=1e-12, atol=0)
            torch.testing.assert_close(
                m.gaussian_weight(res[i : i + 1], a, s, v)[0], want, rtol=1e-12, atol=0
            )


def test_repaint_nfe_refuses_what_repaint_sample_refuses() -> None:
    """``repaint_nfe`` answered 1 for ``resample=0`` (10 steps), 0 for ``steps=0``, 19.5 for ``steps=10.5``
    and a ZeroDivisionError for ``jump=0``."""
    for args, message in [
        ((10, 0, 1), "repaint_nfe: resample must be an integer >= 1, got 0"),
        ((0, 1, 1), "repaint_nfe: steps must be an integer >= 1, got 0"),
        ((10.5, 2, 1), "repaint_nfe: steps must be an integer >= 1, got 10.5"),
        ((10, 2, 0), "repaint_nfe: jump must be an integer >= 1, got 0"),
    ]:
        with pytest.raises(ValueError) as e:
            repaint_nfe(*args)
        assert str(e.value) == message


def test_option_messages_name_the_owner() -> None:
    gmm = _diag_mixture()
    den = gmm.denoiser(PROC)
    A, y = torch.randn(2, 4, dtype=F64), torch.zeros(2, dtype=F64)
    x = torch.randn(3, 4, dtype=F64)
    cases = [
        (
            lambda: DPS(den, Matrix(A), y, variant="l1"),
            "DPS: variant must be one of ['normalized', 'squared'], got 'l1'",
        ),
        (
            lambda: MCG(den, Matrix(A), y, variant=1),
            "MCG: variant must be one of ['normalized', 'squared'], got 1",
        ),
        (
            lambda: repaint_sample(den, Inpaint(torch.tensor([1.0, 0, 1, 0])), y, x, 5, return_info="no"),
            "repaint_sample: return_info must be True or False, got 'no'",
        ),
    ]
    for make, message in cases:
        with pytest.raises(ValueError) as e:
            make()
        assert str(e.value) == message


@pytest.mark.parametrize("bad", [None, "den", 1.0])
def test_repaint_sample_names_a_den_that_is_no_denoiser(bad):
    """It read ``den.shape`` first: an AttributeError."""
    mask = torch.tensor([1.0, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="repaint_sample: den must be a steerdiff Denoiser"):
        repaint_sample(bad, Inpaint(mask), torch.zeros(2, 1, dtype=F64), torch.zeros(2, 2, dtype=F64), 3)


@pytest.mark.parametrize("steps", [0, 2.5, "10"])  # None: the default 10 (test_steps_count)
def test_repaint_sample_names_a_bad_steps(steps):
    """It was named ``make_grid: steps``, the internal function's."""
    den = _diag_mixture().denoiser(PROC)
    mask = torch.tensor([1.0, 0, 1, 0], dtype=F64)
    with pytest.raises(ValueError, match=r"^repaint_sample: steps must be an integer >= 1, got"):
        repaint_sample(den, Inpaint(mask), torch.zeros(2, dtype=F64), torch.zeros(3, 4, dtype=F64), steps)


@pytest.mark.parametrize("proc", [sd.EDM(), sd.RectifiedFlow(), sd.VE(), sd.VP.linear()], ids=type)
def test_guidance_terms_off_the_discrete_vp(proc: sd.Process) -> None:
    """Where ``alpha^2 + sigma^2 != 1`` (EDM, VE, flow) or the time is continuous: DPS's gradient against
    central differences of ``-||r||`` / ``-||r||^2 / (2 s^2)`` through the exact full-covariance
    denoiser, and PiGDM's ``x0`` against Gaussian conditioning under ``N(mu, I)`` with
    ``r^2 = sigma^2 / (alpha^2 + sigma^2)``. Measured: <= 2e-6 relative (differences), 1e-15 (PiGDM)."""
    g = torch.Generator().manual_seed(12)
    d = 4
    mu = torch.randn(d, generator=g, dtype=F64)
    root = torch.randn(2, d, d, generator=g, dtype=F64) / 2
    gmm = sd.toy.GaussianMixture(
        torch.stack([mu, -mu]), root @ root.mT + 0.2 * torch.eye(d, dtype=F64), torch.tensor([1.0, 2.0])
    )
    A, y = torch.randn(2, d, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    x = torch.randn(3, d, generator=g, dtype=F64)
    t = 0.5 * (proc.t_min + proc.t_max)
    a, s = float(proc.alpha(torch.tensor(t, dtype=F64))), float(proc.sigma(torch.tensor(t, dtype=F64)))
    x = x * math.hypot(a, s)  # a typical x_t at t
    for variant in ("normalized", "squared"):
        dps = DPS(gmm.denoiser(proc), Matrix(A), y, 0.2, scale=0.7, variant=variant)
        _, grad = dps.likelihood_score(x, t)

        def objective(v: torch.Tensor, variant: str = variant) -> torch.Tensor:
            r = y - gmm.denoise(v, a, s) @ A.T
            return -0.7 * (r.norm(dim=1) if variant == "normalized" else r.pow(2).sum(1) / (2 * 0.2**2))

        h = 1e-6 * math.hypot(a, s)
        fd = torch.stack([(objective(x + h * e) - objective(x - h * e)) / (2 * h) for e in torch.eye(d)], 1)
        torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6 * float(fd.abs().max()))
    unit = sd.toy.GaussianMixture(mu[None], torch.ones(1, d, dtype=F64), torch.ones(1, dtype=F64))
    for noise_std in (0.0, 0.3):
        out = PiGDM(unit.denoiser(proc), Matrix(A), y, noise_std=noise_std)(x, t).x0
        m = unit.denoise(x, a, s)
        c = s * s / (a * a + s * s) * torch.eye(d, dtype=F64)
        gain = c @ A.T @ torch.linalg.inv(A @ c @ A.T + noise_std**2 * torch.eye(2, dtype=F64))
        torch.testing.assert_close(out, m + (y - m @ A.T) @ gain.T, rtol=1e-10, atol=1e-12)


def test_a_subclass_override_of_the_score_is_what_evaluate_runs():
    """A subclass of DPS overriding ``likelihood_score`` (of DPS, PiGDM or MCG overriding ``vjp_score``)
    steers the samples its own way (a guard: an input-check change, reverted this session, had
    ``evaluate`` call unchecked private copies, skipping the override: a zeroed DPS score sampled as DPS)."""
    proc = sd.VP.scaled_linear()
    den = sd.toy.default_benchmark_mixture(dim=4).denoiser(proc)
    op, y = sd.inverse.Matrix(torch.eye(2, 4, dtype=torch.float64)), torch.ones(2, dtype=torch.float64)

    class Unguided(sd.guidance.DPS):
        def likelihood_score(self, x, t, net_dtype=None, /, **cond):  # type: ignore[no-untyped-def]
            pred, g = super().likelihood_score(x, t, net_dtype, **cond)
            return pred, 0 * g

    class Halved(sd.guidance.PiGDM):
        def vjp_score(self, x, t, weight, net_dtype=None, /, **cond):  # type: ignore[no-untyped-def]
            pred, g = super().vjp_score(x, t, weight, net_dtype, **cond)
            return pred, 0.5 * g

    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = sd.sample(den, x, 5, "ddim")
    assert not torch.equal(sd.sample(sd.guidance.DPS(den, op, y, noise_std=0.1), x, 5, "ddim"), plain)
    assert torch.equal(sd.sample(Unguided(den, op, y, noise_std=0.1), x, 5, "ddim"), plain)
    half = sd.sample(sd.guidance.PiGDM(den, op, y, noise_std=0.1, scale=0.5), x, 5, "ddim")
    assert torch.equal(sd.sample(Halved(den, op, y, noise_std=0.1), x, 5, "ddim"), half)
