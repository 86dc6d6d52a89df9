"""Full-covariance Gaussian mixtures, the exact posterior and the exact reward tilt, against
scipy, the diagonal path, the closed-form single-Gaussian flow and importance sampling."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import steerdiff as sd

from .reference import importance_posterior_mean

F64 = torch.float64


def _spd(d: int, g: torch.Generator, lo: float = 0.1, hi: float = 0.6) -> torch.Tensor:
    """A random rotation of a diagonal with eigenvalues in [lo, hi]."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = lo + (hi - lo) * torch.rand(d, generator=g, dtype=F64)
    return q @ torch.diag(lam) @ q.T


@pytest.fixture(scope="module")
def mix():
    """Two correlated components in 3-D with unequal weights."""
    g = torch.Generator().manual_seed(3)
    means = torch.tensor([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.8]], dtype=F64)
    cov = torch.stack([_spd(3, g), _spd(3, g)])
    return sd.toy.GaussianMixture(means, cov, torch.tensor([0.6, 0.4], dtype=F64))


def _moments(gmm: sd.toy.GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    w, mu, s = gmm.weights, gmm.means, gmm.covariance_matrices
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (s + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def _weighted_moments_z(x0: torch.Tensor, logw: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """Largest |z| of the self-normalized importance estimates of E[x] and E[x x^T] against the
    exact ``mean`` and ``cov``; standard errors by the delta method."""
    w = torch.exp(logw - logw.max())
    w = w / w.sum()
    assert float(1 / (w**2).sum()) > 500  # effective sample size: the delta method is reliable
    second = mean[:, None] * mean[None, :] + cov
    feats = torch.cat([x0, (x0[:, :, None] * x0[:, None, :]).reshape(len(x0), -1)], dim=1)
    exact = torch.cat([mean, second.reshape(-1)])
    est = (w[:, None] * feats).sum(0)
    se = ((w[:, None] ** 2 * (feats - est) ** 2).sum(0)).sqrt()
    return float(((est - exact) / se).abs().max())


def test_full_covariance_validation(mix):
    m, c, w = mix.means, mix.covariances, mix.weights
    bad = c.clone()
    bad[0, 0, 1] += 0.1
    with pytest.raises(ValueError, match="covariances must be finite and symmetric"):
        sd.toy.GaussianMixture(m, bad, w)
    with pytest.raises(ValueError, match="covariances must be positive definite"):
        sd.toy.GaussianMixture(m, -c, w)
    with pytest.raises(ValueError, match="covariances must be"):
        sd.toy.GaussianMixture(m, c[:, :2, :2], w)
    singular = torch.zeros(2, 3, 3, dtype=F64)
    singular[:, 0, 0] = 1.0
    with pytest.raises(ValueError, match="positive definite"):
        sd.toy.GaussianMixture(m, singular, w)
    semi = sd.toy.GaussianMixture(m, singular, w, allow_singular=True)
    with pytest.raises(ValueError, match="sigma > 0"):
        semi.log_prob(torch.zeros(1, 3))
    assert torch.isfinite(semi.denoise(torch.zeros(2, 3), 0.9, 0.3)).all()
    assert mix.full and torch.equal(mix.variances, torch.diagonal(c, dim1=-2, dim2=-1))


def test_diagonal_and_full_paths_agree():
    """A full mixture whose covariances are diagonal equals the diagonal one to 1e-12."""
    base = sd.toy.default_benchmark_mixture(dim=5, components=4, seed=2)
    full = sd.toy.GaussianMixture(base.means, torch.diag_embed(base.variances), base.weights)
    g = torch.Generator().manual_seed(0)
    x = base.sample(64, generator=torch.Generator().manual_seed(1))
    for alpha, sigma in [(1.0, 0.0), (0.9, 0.2), (0.5, 0.8), (0.01, 1.0)]:
        xt = alpha * x + sigma * torch.randn(64, 5, generator=g, dtype=F64)
        torch.testing.assert_close(
            full.denoise(xt, alpha, sigma), base.denoise(xt, alpha, sigma), rtol=0, atol=1e-12
        )
        for method in ("log_prob", "log_responsibilities"):
            torch.testing.assert_close(
                getattr(full, method)(xt, alpha, sigma),
                getattr(base, method)(xt, alpha, sigma),
                rtol=1e-12,
                atol=1e-12,
            )
    torch.testing.assert_close(
        full.sample(50, generator=torch.Generator().manual_seed(4)),
        base.sample(50, generator=torch.Generator().manual_seed(4)),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize(("alpha", "sigma"), [(1.0, 0.0), (0.8, 0.6), (1.0, 1.5)])
def test_log_prob_matches_scipy(mix, alpha, sigma):
    g = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(40, 3, generator=g, dtype=F64)
    ref = logsumexp(
        [
            math.log(w)
            + multivariate_normal(alpha * m.numpy(), alpha**2 * s.numpy() + sigma**2 * np.eye(3)).logpdf(
                x.numpy()
            )
            for w, m, s in zip(mix.weights.tolist(), mix.means, mix.covariances, strict=True)
        ],
        axis=0,
    )
    np.testing.assert_allclose(mix.log_prob(x, alpha, sigma).numpy(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("alpha", "sigma"), [(0.95, 0.3), (0.6, 0.8)])
def test_full_denoiser_matches_importance_sampling(mix, alpha, sigma):
    """E[x0 | x_t] by self-normalized importance sampling from the prior; within 4 standard errors."""
    g = torch.Generator().manual_seed(11)
    x0 = mix.sample(100_000, generator=g)
    q = alpha * mix.sample(4, generator=g) + sigma * torch.randn(4, 3, generator=g, dtype=F64)
    exact = mix.denoise(q, alpha, sigma)
    for x, ref in zip(q, exact, strict=True):
        est, se, ess = importance_posterior_mean(x, x0, alpha, sigma)
        assert ess > 250
        assert float(((est - ref) / se).abs().max()) < 4.0, (est.tolist(), ref.tolist())


def test_reference_ode_single_full_gaussian_closed_form():
    """PF-ODE of N(mu, S) in y = x/alpha, s = sigma/alpha (S and I commute):
    y(s) = mu + (S + s^2)^{1/2} (S + s_T^2)^{-1/2} (y_T - mu)."""
    g = torch.Generator().manual_seed(7)
    mu = torch.tensor([0.3, -0.7, 1.1], dtype=F64)
    s_mat = _spd(3, g, 0.05, 1.5)
    gauss = sd.toy.GaussianMixture(mu[None], s_mat[None], torch.ones(1, dtype=F64))
    p = sd.VP.linear()
    t0, t1 = 0.9, 0.05
    x_T = torch.randn(4, 3, generator=g, dtype=F64)
    a0, s0 = float(p.alpha(t0)), float(p.sigma(t0))
    a1, s1 = float(p.alpha(t1)), float(p.sigma(t1))
    eye = np.eye(3)
    for t_end, (a, s) in [(t1, (a1, s1)), (None, (1.0, 0.0))]:
        got = gauss.reference_ode(x_T, p, t0, t_end)
        m = np.real(sqrtm(s_mat.numpy() + (s / a) ** 2 * eye)) @ np.linalg.inv(
            np.real(sqrtm(s_mat.numpy() + (s0 / a0) ** 2 * eye))
        )
        y = mu.numpy() + (x_T.numpy() / a0 - mu.numpy()) @ m.T
        np.testing.assert_allclose(got.numpy(), a * y, rtol=0, atol=1e-8)


def _obs(m: int, seed: int) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 3, generator=g, dtype=F64), 0.5


@pytest.mark.parametrize("m", [1, 2])
def test_posterior_matches_importance_sampling(mix, m):
    """Posterior moments vs the prior reweighted by the likelihood N(y; A x0, s^2 I)."""
    A, s = _obs(m, 20 + m)
    y = A @ torch.tensor([0.2, 0.1, 0.3], dtype=F64) + 0.1
    post = mix.posterior(A, y, s)
    assert post.full and post.means.shape == (2, 3)
    x0 = mix.sample(200_000, generator=torch.Generator().manual_seed(2))
    logw = -((x0 @ A.T - y) ** 2).sum(-1) / (2 * s**2)
    mean, cov = _moments(post)
    assert _weighted_moments_z(x0, logw, mean, cov) < 4.0
    # and its samples satisfy the same moments (the mixture object is self-consistent)
    xs = post.sample(200_000, generator=torch.Generator().manual_seed(3))
    assert _weighted_moments_z(xs, torch.zeros(len(xs), dtype=F64), mean, cov) < 4.0


def test_posterior_single_gaussian_closed_form():
    """k = 1: Bishop (2.116)-(2.117) in information form (one component: its weight is always 1; the
    weights are checked in test_posterior_component_weights_are_the_evidence)."""
    g = torch.Generator().manual_seed(9)
    mu, s_mat = torch.randn(3, generator=g, dtype=F64), _spd(3, g)
    A, noise = torch.randn(2, 3, generator=g, dtype=F64), 0.3
    y = torch.randn(2, generator=g, dtype=F64)
    post = sd.toy.GaussianMixture(mu[None], s_mat[None], torch.ones(1, dtype=F64)).posterior(A, y, noise)
    prec = torch.linalg.inv(s_mat) + A.T @ A / noise**2
    cov = torch.linalg.inv(prec)
    mean = cov @ (torch.linalg.solve(s_mat, mu) + A.T @ y / noise**2)
    torch.testing.assert_close(post.covariances[0], cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(post.means[0], mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2])
def test_posterior_component_weights_are_the_evidence(mix, m):
    """w_k' ∝ w_k N(y; A mu_k, A S_k A^T + s^2 I), the evidence by scipy; each component's mean and
    covariance is the single-Gaussian posterior (Bishop 2.116-2.117)."""
    A, s = _obs(m, 30 + m)
    # an observation between the two components' predictions: weights 0.645 / 0.355 (m = 1) and
    # 0.758 / 0.242 (m = 2), neither the prior's 0.6 / 0.4 nor uniform
    y = (0.6 * mix.means[0] + 0.4 * mix.means[1]) @ A.T
    post = mix.posterior(A, y, s)
    log_ev = np.array(
        [
            math.log(float(w))
            + multivariate_normal(
                mean=(A @ mu).numpy(), cov=(A @ S @ A.T + s**2 * torch.eye(m)).numpy()
            ).logpdf(y.numpy())
            for w, mu, S in zip(mix.weights, mix.means, mix.covariance_matrices, strict=True)
        ]
    )
    want = np.exp(log_ev - logsumexp(log_ev))
    np.testing.assert_allclose(post.weights.numpy(), want, rtol=1e-10, atol=0)
    assert want.min() > 0.2 and abs(want[0] - 0.6) > 0.04
    for k in range(2):
        S = mix.covariance_matrices[k]
        cov = torch.linalg.inv(torch.linalg.inv(S) + A.T @ A / s**2)
        mean = cov @ (torch.linalg.solve(S, mix.means[k]) + A.T @ y / s**2)
        torch.testing.assert_close(post.covariance_matrices[k], cov, rtol=0, atol=1e-12)
        torch.testing.assert_close(post.means[k], mean, rtol=0, atol=1e-12)


def test_posterior_noiseless_lives_on_the_constraint(mix):
    A, _ = _obs(2, 5)
    y = torch.tensor([0.4, -0.2], dtype=F64)
    post = mix.posterior(A, y, 0.0)
    xs = post.sample(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(xs @ A.T, y.expand(1000, 2), rtol=0, atol=1e-10)
    # the noiseless limit of the noisy posterior
    near = mix.posterior(A, y, 1e-7)
    torch.testing.assert_close(near.means, post.means, rtol=0, atol=1e-8)
    torch.testing.assert_close(near.weights, post.weights, rtol=0, atol=1e-8)


@pytest.mark.parametrize("full", [False, True])
def test_posterior_of_a_square_observation_small_and_zero_noise(full):
    """Square invertible A: the posterior covariance is (S^{-1} + A^T A / s^2)^{-1} ~ s^2 (A^T A)^{-1}, and
    at s = 0 each component is a point mass at A^{-1} y with weight w_k N(y; A mu_k, A S_k A^T) (scipy).
    Before: S - K C K^T cancelled, 1.4e-4 relative off at s = 1e-6 and 2x at 1e-8, and s = 0 raised
    'covariances must be positive definite' (round-off eigenvalues of +-1e-16)."""
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    var = torch.tensor([[0.5, 0.2], [0.3, 0.4]], dtype=F64)
    w = torch.tensor([0.4, 0.6], dtype=F64)
    gmm = sd.toy.GaussianMixture(means, torch.diag_embed(var) if full else var, w)
    A = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    y = torch.tensor([0.7, 0.1], dtype=F64)
    for s in (1e-3, 1e-6, 1e-8):
        post = gmm.posterior(A, y, s)
        for k in range(2):
            want = torch.linalg.inv(torch.diag(1 / var[k]) + A.T @ A / s**2)
            torch.testing.assert_close(post.covariances[k], want, rtol=1e-12, atol=0)
    post = gmm.posterior(A, y, 0.0)
    point = torch.linalg.solve(A, y)
    torch.testing.assert_close(post.means, point.expand(2, 2), rtol=0, atol=1e-14)
    assert float(post.covariances.abs().max()) < 1e-28
    log_ev = np.array(
        [
            math.log(float(w[k]))
            + multivariate_normal((A @ means[k]).numpy(), (A @ torch.diag(var[k]) @ A.T).numpy()).logpdf(
                y.numpy()
            )
            for k in range(2)
        ]
    )
    np.testing.assert_allclose(post.weights.numpy(), np.exp(log_ev - logsumexp(log_ev)), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        post.sample(5, torch.Generator().manual_seed(0)), point.expand(5, 2), rtol=0, atol=1e-14
    )


@pytest.mark.parametrize("kind", ["linear", "quadratic", "both", "indefinite"])
def test_tilt_matches_importance_reweighting(mix, kind):
    """Tilted moments and log Z = log E_p[exp r] vs the prior reweighted by exp r(x)."""
    b = torch.tensor([0.8, -0.5, 0.3], dtype=F64)
    q = {
        "quadratic": 0.7 * torch.eye(3, dtype=F64),
        "both": torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]], dtype=F64),
    }
    q["indefinite"] = torch.diag(torch.tensor([-0.3, 0.5, 0.2], dtype=F64))
    lin = None if kind == "quadratic" else b
    quad = q.get(kind)
    tilted = mix.tilt(linear=lin, quadratic=quad)
    x0 = mix.sample(200_000, generator=torch.Generator().manual_seed(4))
    r = torch.zeros(len(x0), dtype=F64)
    if lin is not None:
        r = r + x0 @ lin
    if quad is not None:
        r = r - 0.5 * ((x0 @ quad) * x0).sum(-1)
    mean, cov = _moments(tilted)
    assert _weighted_moments_z(x0, r, mean, cov) < 4.0
    w = torch.exp(r - r.max())
    log_z = float(torch.log(w.mean()) + r.max())
    se = float(w.std() / w.mean()) / math.sqrt(len(w))
    assert abs(mix.tilt_log_normalizer(lin, quad) - log_z) < 4 * se


def test_tilt_closed_form_and_diagonal():
    """Single Gaussian: S' = (S^{-1} + Q)^{-1}, mu' = S' (S^{-1} mu + b); a linear tilt keeps a
    diagonal mixture diagonal."""
    g = torch.Generator().manual_seed(12)
    mu, s_mat = torch.randn(3, generator=g, dtype=F64), _spd(3, g)
    b, q = torch.randn(3, generator=g, dtype=F64), 0.4 * torch.eye(3, dtype=F64)
    tilted = sd.toy.GaussianMixture(mu[None], s_mat[None], torch.ones(1, dtype=F64)).tilt(b, q)
    cov = torch.linalg.inv(torch.linalg.inv(s_mat) + q)
    torch.testing.assert_close(tilted.covariances[0], cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(tilted.means[0], cov @ (torch.linalg.solve(s_mat, mu) + b), rtol=0, atol=1e-12)
    base = sd.toy.default_benchmark_mixture(dim=4, components=3, seed=1)
    full = sd.toy.GaussianMixture(base.means, torch.diag_embed(base.variances), base.weights)
    b4 = torch.tensor([0.5, -1.0, 0.2, 0.0], dtype=F64)
    diag_t, full_t = base.tilt(b4), full.tilt(b4)
    assert not diag_t.full
    torch.testing.assert_close(diag_t.covariance_matrices, full_t.covariances, rtol=0, atol=1e-12)
    torch.testing.assert_close(diag_t.means, full_t.means, rtol=0, atol=1e-12)
    torch.testing.assert_close(diag_t.weights, full_t.weights, rtol=0, atol=1e-12)
    assert math.isclose(base.tilt_log_normalizer(b4), full.tilt_log_normalizer(b4), rel_tol=1e-12)


def test_tilt_normalizability_is_checked_on_semi_definite_mixtures():
    """A posterior (built ``allow_singular``) tilted by a quadratic that is not normalizable raises, as on
    the prior (before: the check was skipped, ``tilt_log_normalizer`` returned a finite -0.93 for
    ``log Z = +inf``); one that is normalizable on the support (negative only where S' = 0) is accepted,
    and its log Z equals 1-d quadrature along the support."""
    from scipy.integrate import quad

    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    var = torch.tensor([[0.5, 0.2], [0.3, 0.4]], dtype=F64)
    gmm = sd.toy.GaussianMixture(means, var, torch.tensor([0.4, 0.6], dtype=F64))
    post = gmm.posterior(torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([0.3], dtype=F64), 0.5)
    bad = torch.diag(torch.tensor([-5.0, 1.0], dtype=F64))  # 1 / 0.5 - 5 < 0 along x_1
    for call in (post.tilt_log_normalizer, post.tilt):
        with pytest.raises(ValueError, match="normalizable"):
            call(quadratic=bad)
    # noiseless observation of x_1 = 0.3: x_1 is fixed, so Q_11 < 0 is harmless
    point = gmm.posterior(torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([0.3], dtype=F64), 0.0)
    b, q = torch.tensor([0.4, -0.7], dtype=F64), torch.diag(torch.tensor([-10.0, 1.5], dtype=F64))

    def tilted_density(u: float) -> float:
        x = np.array([0.3, u])
        r = float(b.numpy() @ x - 0.5 * x @ q.numpy() @ x)
        dens = sum(
            float(w)
            * math.exp(-((u - float(m[1])) ** 2) / (2 * float(c[1, 1])))
            / math.sqrt(2 * math.pi * float(c[1, 1]))
            for w, m, c in zip(point.weights, point.means, point.covariances, strict=True)
        )
        return dens * math.exp(r)

    want = math.log(quad(tilted_density, -15, 15, epsabs=0, epsrel=1e-12, limit=200)[0])
    assert point.tilt_log_normalizer(b, q) == pytest.approx(want, rel=0, abs=1e-10)


def test_posterior_and_tilt_bad_arguments(mix):
    A, y = torch.ones(2, 3, dtype=F64), torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="A must"):
        mix.posterior(torch.ones(2, 4), y, 0.1)
    with pytest.raises(ValueError, match="y must"):
        mix.posterior(A, torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="y must"):
        mix.posterior(A, torch.zeros(5, 2), 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        mix.posterior(A, y, -0.1)
    with pytest.raises(ValueError, match="noise_std"):
        mix.posterior(A, y, 0.0)  # rank-1 A with m = 2: A S A^T singular
    g = torch.Generator().manual_seed(6)  # rank 2 with m = 3: Cholesky ends in a round-off pivot here
    low_rank = torch.randn(3, 2, generator=g, dtype=F64) @ torch.randn(2, mix.dim, generator=g, dtype=F64)
    with pytest.raises(ValueError, match="singular"):
        mix.posterior(low_rank, torch.zeros(3, dtype=F64), 0.0)
    with pytest.raises(ValueError, match="linear"):
        mix.tilt(linear=torch.zeros(2))
    with pytest.raises(ValueError, match="quadratic"):
        mix.tilt(quadratic=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="quadratic"):
        mix.tilt(quadratic=torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="quadratic"):
        mix.tilt(quadratic=-100 * torch.eye(3, dtype=F64))


@pytest.mark.parametrize("noise_std", [0.0, 1e-8])
def test_posterior_singular_observation_message_fits_the_noise(noise_std):
    """A rank-1 A with 2 rows: A S A^T + s^2 I is singular to float64 precision for s = 0 and for
    s = 1e-8 (its small eigenvalue s^2 = 1e-16 against 3.5 and 8.25). Before, both said "use
    noise_std > 0 or a full-rank A", advice already followed at s = 1e-8 and not enough at s = 0 for an
    A of more rows than columns."""
    gmm = sd.toy.GaussianMixture(
        torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64),
        torch.tensor([[0.3, 0.1], [0.05, 0.4]], dtype=F64),
        torch.tensor([0.6, 0.4], dtype=F64),
    )
    A = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64)
    message = (
        f"GaussianMixture.posterior: A S_k A^T + noise_std^2 I is singular to float64 precision with "
        f"noise_std = {noise_std:g}: use a larger noise_std (noise_std = 0 needs every A S_k A^T "
        "nonsingular: A of full row rank, at most as many rows as columns)"
    )
    with pytest.raises(ValueError) as err:
        gmm.posterior(A, torch.tensor([0.3, 0.6], dtype=F64), noise_std)
    assert str(err.value) == message


def test_full_sample_is_mu_plus_the_symmetric_root_times_z(mix):
    """``mu_k + S_k^{1/2} z`` with the same component and normal draws (multinomial, then randn)."""
    g = torch.Generator().manual_seed(9)
    k = torch.multinomial(mix.weights, 200, replacement=True, generator=g)
    z = torch.randn(200, mix.dim, dtype=F64, generator=g)
    roots = torch.stack([torch.from_numpy(np.real(sqrtm(c.numpy()))) for c in mix.covariances])
    want = mix.means[k] + (roots[k] @ z[:, :, None])[:, :, 0]
    torch.testing.assert_close(mix.sample(200, torch.Generator().manual_seed(9)), want, rtol=0, atol=1e-13)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_full_sample_memory_is_linear_in_n():
    """20,000 draws from the 64-d posterior of the benchmark mixture (a full-covariance mixture): peak RSS
    growth. Before: each draw's (64, 64) root was gathered, n d^2 float64 = 625 MiB (654 MiB measured,
    0.28 s); now component by component, measured +48 MiB (the draws are 10 MiB), 0.12 s."""
    gmm = sd.toy.default_benchmark_mixture(dim=64, components=10)
    post = gmm.posterior(torch.eye(64, dtype=F64)[:16], torch.zeros(16, dtype=F64), 0.1)
    assert post.full
    post.sample(100, torch.Generator().manual_seed(0))  # warm-up: allocator and caches
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    before = _rss_kib("VmRSS")
    x = post.sample(20_000, torch.Generator().manual_seed(1))
    peak_mib = (_rss_kib("VmHWM") - before) / 1024
    assert x.shape == (20_000, 64)
    assert peak_mib < 160, f"peak RSS growth {peak_mib:.1f} MiB"
