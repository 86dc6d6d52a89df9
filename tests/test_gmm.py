"""The Gaussian-mixture oracle against Monte Carlo, scipy and the closed-form single-Gaussian flow."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import steerdiff as sd

from .reference import importance_posterior_mean

F64 = torch.float64


@pytest.fixture(scope="module")
def mix():
    """Three well-separated, anisotropic components in 2-D with unequal weights."""
    means = torch.tensor([[-2.0, 0.5], [1.5, 1.0], [0.5, -2.0]], dtype=F64)
    variances = torch.tensor([[0.3, 0.1], [0.05, 0.4], [0.2, 0.2]], dtype=F64)
    return sd.toy.GaussianMixture(means, variances, torch.tensor([0.5, 0.3, 0.2], dtype=F64))


def _moments(gmm: sd.toy.GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    w, mu, v = gmm.weights, gmm.means, gmm.variances
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (torch.diag_embed(v) + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


@pytest.mark.parametrize(("alpha", "sigma"), [(0.95, 0.3), (0.8, 0.6), (0.5, 0.866), (1.0, 1.5)])
def test_denoiser_matches_importance_sampling(mix, alpha, sigma):
    """E[x0 | x_t] by self-normalized importance sampling with the prior as proposal.

    w_i = N(x_t; alpha x0_i, sigma^2), estimate sum w_i x0_i / sum w_i, standard error by the delta
    method sqrt(sum w_i^2 (x0_i - est)^2) / sum w_i. Each coordinate within 4 standard errors.
    """
    g = torch.Generator().manual_seed(11)
    x0 = mix.sample(100_000, generator=g)
    # query points drawn from the noised marginal, plus one between modes
    q = alpha * mix.sample(5, generator=g) + sigma * torch.randn(5, 2, generator=g, dtype=F64)
    q = torch.cat([q, torch.tensor([[0.0, 0.0]], dtype=F64)])
    exact = mix.denoise(q, alpha, sigma)
    for x, ref in zip(q, exact, strict=True):
        est, se, ess = importance_posterior_mean(x, x0, alpha, sigma)
        assert ess > 250  # the delta-method standard error is reliable
        assert float(se.max()) < 0.015  # and the check is sharp
        z = ((est - ref) / se).abs()
        assert float(z.max()) < 4.0, (x.tolist(), est.tolist(), ref.tolist(), z.tolist())


def test_log_prob_matches_scipy(mix):
    g = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(50, 2, generator=g, dtype=F64)
    for alpha, sigma in [(1.0, 0.0), (0.8, 0.6), (1.0, 3.0)]:
        comp = [
            math.log(float(w))
            + multivariate_normal(alpha * m.numpy(), np.diag(alpha**2 * v.numpy() + sigma**2)).logpdf(x)
            for w, m, v in zip(mix.weights, mix.means, mix.variances, strict=True)
        ]
        ref = logsumexp(np.stack(comp), axis=0)
        assert np.allclose(mix.log_prob(x, alpha, sigma).numpy(), ref, rtol=1e-12, atol=1e-12)


def test_log_responsibilities_match_scipy(mix):
    """log p(k | x_t) = log w_k + log N(x; alpha mu_k, alpha^2 v_k + sigma^2) - log p_t(x)."""
    g = torch.Generator().manual_seed(6)
    x = 2 * torch.randn(50, 2, generator=g, dtype=F64)
    for alpha, sigma in [(1.0, 0.0), (0.8, 0.6)]:
        comp = np.stack(
            [
                math.log(float(w))
                + multivariate_normal(alpha * m.numpy(), np.diag(alpha**2 * v.numpy() + sigma**2)).logpdf(x)
                for w, m, v in zip(mix.weights, mix.means, mix.variances, strict=True)
            ],
            axis=1,
        )
        ref = comp - logsumexp(comp, axis=1, keepdims=True)
        assert np.allclose(mix.log_responsibilities(x, alpha, sigma).numpy(), ref, rtol=1e-12, atol=1e-12)
    # a point half a standard deviation from a mean belongs to that component
    near = mix.means + 0.5 * mix.variances.sqrt() * torch.tensor([1.0, -1.0], dtype=F64)
    assert mix.log_responsibilities(near).argmax(-1).tolist() == [0, 1, 2]


def test_sample_moments(mix):
    n = 200_000
    x = mix.sample(n, generator=torch.Generator().manual_seed(2))
    mean, cov = _moments(mix)
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert float(((x.mean(0) - mean) / se_mean).abs().max()) < 4.0
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert float(((prods.mean(0) - cov) / se_cov).abs().max()) < 4.0
    # reproducible per generator
    a = mix.sample(7, generator=torch.Generator().manual_seed(9))
    b = mix.sample(7, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_exact_denoiser_wraps_denoise(mix):
    p = sd.VP.scaled_linear()
    den = mix.denoiser(p)
    x = torch.randn(6, 2, dtype=F64)
    for t in (999.0, 400.5, 3.0):
        out = den(x, t)
        assert torch.allclose(
            out.x0, mix.denoise(x, float(p.alpha(t)), float(p.sigma(t))), rtol=0, atol=1e-14
        )
        assert torch.allclose(p.alpha(t) * out.x0 + p.sigma(t) * out.eps, x, rtol=0, atol=1e-12)


def test_denoise_is_differentiable(mix):
    """Guidance differentiates through the exact denoiser: autograd equals central differences."""
    x = torch.tensor([[0.3, -0.4], [-1.0, 1.2]], dtype=F64, requires_grad=True)
    u = torch.tensor([[0.7, -1.1], [0.2, 0.5]], dtype=F64)
    (grad,) = torch.autograd.grad((mix.denoise(x, 0.8, 0.6) * u).sum(), x)
    h = 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                e = torch.zeros_like(x)
                e[i, j] = h
                fd[i, j] = ((mix.denoise(x + e, 0.8, 0.6) - mix.denoise(x - e, 0.8, 0.6)) * u).sum() / (2 * h)
    assert torch.allclose(grad, fd, rtol=1e-7, atol=1e-9)


# -- the probability-flow ODE -----------------------------------------------------------------


def _single_gaussian_flow(mu, v, x_T, p, t0, t1):
    """Closed-form PF-ODE of one Gaussian in y = x/alpha, s = sigma/alpha, per coordinate:

    y(s) = mu + (y_T - mu) sqrt((v + s^2) / (v + s_T^2)).
    """
    a0, s0 = float(p.alpha(t0)), float(p.sigma(t0)) / float(p.alpha(t0))
    if t1 is None:
        a1, s1 = 1.0, 0.0
    else:
        a1, s1 = float(p.alpha(t1)), float(p.sigma(t1)) / float(p.alpha(t1))
    y = mu + (x_T / a0 - mu) * ((v + s1**2) / (v + s0**2)).sqrt()
    return a1 * y, mu + v / (v + s1**2) * (y - mu)  # x(t1), and E[x0 | x(t1)]


@pytest.mark.parametrize(
    ("process", "t0", "t1"),
    [
        (sd.VP.scaled_linear(), 999.0, None),
        (sd.VP.scaled_linear(), 999.0, 0.0),
        (sd.VP.scaled_linear(), 700.0, 250.5),
        (sd.EDM(), 80.0, 0.002),
        (sd.RectifiedFlow(), 0.999, 0.2),
        (sd.VP.linear(), 1.0, None),
        (sd.SubVP(), 1.0, 0.001),
        (sd.VP.cosine(), 0.9946, 0.001),
        (sd.VE(), 1.0, 0.0),
        # zero terminal SNR: alpha(999) = 2**-12, so y = x / alpha starts at ~4e3
        (
            sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64), rescale_zero_snr=True),
            999.0,
            0.0,
        ),
    ],
)
def test_reference_ode_single_gaussian_closed_form(process, t0, t1):
    mu = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    v = torch.tensor([0.04, 0.5, 1.7], dtype=F64)
    gmm = sd.toy.GaussianMixture(mu[None], v[None], torch.ones(1, dtype=F64))
    x_T = float(process.sigma(t0)) * torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    x_ref, d_ref = _single_gaussian_flow(mu, v, x_T, process, t0, t1)
    x = gmm.reference_ode(x_T, process, t0, t1)
    assert float((x - x_ref).abs().max()) < 1e-8
    if t1 is not None:
        d = gmm.reference_ode(x_T, process, t0, t1, denoise=True)
        assert float((d - d_ref).abs().max()) < 1e-8


def test_reference_ode_tolerance_and_composition(mix):
    p = sd.VP.scaled_linear()
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    tight = mix.reference_ode(x_T, p, p.t_max, p.t_min)
    tighter = mix.reference_ode(x_T, p, p.t_max, p.t_min, rtol=1e-12, atol=1e-12)
    assert float((tight - tighter).abs().max()) < 1e-8
    # two legs through t = 300 equal one leg
    mid = mix.reference_ode(x_T, p, p.t_max, 300.0)
    assert float((mix.reference_ode(mid, p, 300.0, p.t_min) - tight).abs().max()) < 1e-8
    # and the flow is invertible: integrating back recovers x_T
    back = mix.reference_ode(tight, p, p.t_min, p.t_max)
    assert float((back - x_T).abs().max()) < 1e-7


def test_reference_ode_transports_the_marginal(mix):
    """Exact samples of the noised marginal at t_max, pushed through the PF-ODE, have the data's moments."""
    p = sd.EDM(0.002, 10.0)
    n = 2000
    g = torch.Generator().manual_seed(4)
    x_T = mix.sample(n, generator=g) + 10.0 * torch.randn(n, 2, generator=g, dtype=F64)
    x0 = mix.reference_ode(x_T, p, p.t_max, None, rtol=1e-6, atol=1e-6)
    mean, cov = _moments(mix)
    se = (torch.diagonal(cov) / n).sqrt()
    assert float(((x0.mean(0) - mean) / se).abs().max()) < 4.0
    var_se = torch.diagonal(cov) * math.sqrt(2 / n) * 2  # generous: the mixture is not Gaussian
    assert float(((x0.var(0) - torch.diagonal(cov)) / var_se).abs().max()) < 4.0


def test_bad_arguments_raise(mix):
    m, v, w = mix.means, mix.variances, mix.weights
    with pytest.raises(ValueError, match="means"):
        sd.toy.GaussianMixture(m[0], v, w)
    with pytest.raises(ValueError, match="variances"):
        sd.toy.GaussianMixture(m, v[:, :1], w)
    with pytest.raises(ValueError, match="variances"):
        sd.toy.GaussianMixture(m, -v, w)
    with pytest.raises(ValueError, match="weights"):
        sd.toy.GaussianMixture(m, v, w[:2])
    with pytest.raises(ValueError, match="weights"):
        sd.toy.GaussianMixture(m, v, torch.tensor([1.0, 0.0, 1.0]))
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n must"):
            mix.sample(n)
    with pytest.raises(ValueError, match="2 values per sample"):
        mix.denoise(torch.zeros(4, 3), 1.0, 0.5)
    with pytest.raises(ValueError, match="2 values per sample"):
        mix.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x_T"):
        mix.reference_ode(torch.zeros(2), sd.EDM(), 80.0)


@pytest.mark.parametrize(
    ("means", "covariances", "weights", "words"),
    [
        ([[math.nan, 0.0]], [[1.0, 1.0]], [1.0], "means must be finite"),
        ([[math.inf, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]], [1.0], "means must be finite"),
        ([[0.0, 0.0]], [[math.inf, 1.0]], [1.0], "variances) must be finite"),
        ([[0.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [math.inf, 1.0], "weights must be"),
    ],
)
def test_non_finite_parameters_are_refused(means, covariances, weights, words):
    """Before: accepted, and every ``denoise`` / ``log_prob`` of the mixture was NaN (weights
    ``[inf, 1]`` normalized to ``[nan, 0]``; an infinite variance gave ``log_prob = -inf``)."""
    with pytest.raises(ValueError, match=re.escape(words)):
        sd.toy.GaussianMixture(torch.tensor(means), torch.tensor(covariances), torch.tensor(weights))


def test_default_benchmark_mixture_is_reproducible_and_pure():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = sd.toy.default_benchmark_mixture()
    b = sd.toy.default_benchmark_mixture(seed=0)
    c = sd.toy.default_benchmark_mixture(seed=1)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state, strict=True))
    for attr in ("means", "variances", "weights"):
        assert torch.equal(getattr(a, attr), getattr(b, attr))
        assert not torch.equal(getattr(a, attr), getattr(c, attr))
    assert a.means.shape == (10, 64) and a.dim == 64
    std = a.variances.sqrt()
    assert float(std.min()) >= 0.05 and float(std.max()) <= 0.5
    assert math.isclose(float(a.weights.sum()), 1.0, rel_tol=1e-15) and bool((a.weights > 0).all())


def test_denoiser_per_sample_times_match_scalar_calls() -> None:
    gmm = sd.toy.default_benchmark_mixture(dim=8, components=3)
    den = gmm.denoiser(sd.VP.scaled_linear())
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100.0, 500.0, 100.0, 900.0], dtype=torch.float64)
    batched = den(x, t).x0
    for i in range(4):
        assert torch.equal(batched[i], den(x[i : i + 1], float(t[i])).x0[0])


def test_posterior_drops_components_whose_weight_underflows() -> None:
    # the far component's posterior weight is exp(-1e5 / 2) = 0 in float64: it must vanish, not raise
    gmm = sd.toy.GaussianMixture(
        torch.tensor([[0.0, 0.0], [100.0, 0.0]]), torch.full((2, 2), 0.01), torch.ones(2)
    )
    post = gmm.posterior(torch.eye(2), torch.zeros(2), 0.01)
    assert post.means.shape == (1, 2) and float(post.means.abs().max()) == 0.0
    assert float(post.weights[0]) == 1.0


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "ddpm"])
def test_an_empty_batch_samples_to_an_empty_tensor(full, solver):
    # before: IndexError in the oracle's net (tt[0] of no times)
    gmm = sd.toy.default_benchmark_mixture(dim=4, components=3)
    if full:
        gmm = sd.toy.GaussianMixture(gmm.means, gmm.covariance_matrices, gmm.weights)
    proc = sd.VP.scaled_linear()
    x = sd.sample(gmm.denoiser(proc), torch.randn(0, 4, dtype=torch.float64), steps=3, solver=solver)
    assert x.shape == (0, 4) and x.dtype == torch.float64
    mr = sd.MeanReverting()
    y = sd.sample(
        gmm.mean_reverting_denoiser(mr, torch.ones(4)), torch.zeros(0, 4, dtype=torch.float64), steps=3
    )
    assert y.shape == (0, 4)


def test_mean_reverting_denoiser_takes_per_sample_times():
    """Rows at different times are each denoised at their own time (before: all at the first row's)."""
    gmm, mr, mu = sd.toy.default_benchmark_mixture(dim=4, components=3), sd.MeanReverting(), torch.ones(4)
    den = gmm.mean_reverting_denoiser(mr, mu)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.2], dtype=torch.float64)
    rows = torch.cat([den(x[i : i + 1], float(t[i])).x0 for i in range(3)])
    assert torch.allclose(den(x, t).x0, rows, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(rows[1], den(x[1:2], 0.2).x0[0])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        # before: 5000 was silently clamped to t_max = 999
        ({"t_start": 5000.0}, ["reference_ode", "t_start", "in [0, 999]", "5000.0"]),
        ({"t_start": -1.0}, ["t_start", "in [0, 999]"]),
        ({"t_start": 999.0, "t_end": 1000.0}, ["t_end", "in [0, 999]", "1000.0"]),
        ({"t_start": math.nan}, ["t_start", "nan"]),
        ({"t_start": 999.0, "rtol": 0.0}, ["rtol", "> 0"]),
    ],
)
def test_reference_ode_refuses_times_outside_the_process_range(kwargs, words):
    gmm, proc = sd.toy.default_benchmark_mixture(dim=4, components=3), sd.VP.scaled_linear()
    with pytest.raises(ValueError) as err:
        gmm.reference_ode(torch.zeros(2, 4, dtype=torch.float64), proc, **kwargs)
    msg = str(err.value)
    assert all(w in msg for w in words), msg


def test_denoiser_on_image_shaped_samples():
    """``denoiser(process, shape=(1, 4, 4))``: the same mixture on samples seen as 4x4 images (for the
    image operators of ``sd.inverse``); a run equals the flat one exactly."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    proc = sd.VP.scaled_linear()
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flat = sd.sample(gmm.denoiser(proc), x, 6)
    image = sd.sample(gmm.denoiser(proc, shape=(1, 4, 4)), x.reshape(8, 1, 4, 4), 6)
    assert image.shape == (8, 1, 4, 4) and torch.equal(image.reshape(8, 16), flat)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 5\) does not hold the mixture's dim = 16"):
        gmm.denoiser(proc, shape=(1, 4, 5))
    with pytest.raises(ValueError, match=r"shape\[1\] must be an integer >= 1, got 4.5"):
        gmm.denoiser(proc, shape=(1, 4.5, 4))
    with pytest.raises(ValueError, match=r"denoiser: shape must be a tuple of integers >= 1, got 16"):
        gmm.denoiser(proc, shape=16)


M2, V2, W2 = torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"means": "abc"}, "means"),
        ({"means": None}, "means"),
        ({"covariances": object()}, "covariances"),
        ({"weights": None}, "weights"),
        ({"allow_singular": "no"}, "allow_singular"),
        ({"allow_singular": torch.ones(2)}, "allow_singular"),
    ],
)
def test_gaussian_mixture_names_a_bad_argument(kwargs, name):
    """Non-numeric parameters raised torch's TypeError / RuntimeError; ``allow_singular="no"`` was truthy."""
    args = {"means": M2, "covariances": V2, "weights": W2, **kwargs}
    with pytest.raises(ValueError, match=f"GaussianMixture: {name} must be"):
        sd.toy.GaussianMixture(**args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 2.5}, "dim must be an integer >= 1, got 2.5"),
        ({"dim": 0}, "dim must be an integer >= 1, got 0"),
        ({"components": "3"}, "components must be an integer >= 1, got '3'"),
        ({"components": 0}, "components must be an integer >= 1, got 0"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ],
)
def test_default_benchmark_mixture_checks_its_integers(kwargs, message):
    """They went to torch unchecked: raw TypeErrors and RuntimeErrors, an empty mixture for 0."""
    with pytest.raises(ValueError, match=f"default_benchmark_mixture: {message}"):
        sd.toy.default_benchmark_mixture(**kwargs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        # before: raw torch TypeErrors ("new(): invalid data type 'str'", "must be real number, not NoneType")
        (
            lambda g: g.denoise("x", 1.0, 0.5),
            "GaussianMixture.denoise: x must be a tensor or array of numbers",
        ),
        (lambda g: g.log_prob(None), "GaussianMixture.log_prob: x must be a tensor or array of numbers"),
        (
            lambda g: g.posterior(None, torch.zeros(1), 0.1),
            "GaussianMixture.posterior: A must be a tensor or array of numbers",
        ),
        (
            lambda g: g.posterior(torch.ones(1, 2), "y", 0.1),
            "GaussianMixture.posterior: y must be a tensor or array of numbers",
        ),
        (lambda g: g.tilt(linear="ab"), "GaussianMixture.tilt: linear must be a tensor or array of numbers"),
        (
            lambda g: g.tilt_log_normalizer(quadratic=[[1.0, "a"], [0.0, 1.0]]),
            "GaussianMixture.tilt_log_normalizer: quadratic must be a tensor or array of numbers",
        ),
        (lambda g: g.shifted("s"), "GaussianMixture.shifted: shift must be a tensor or array of numbers"),
        # before: the same messages without the method's name
        (
            lambda g: g.log_responsibilities(torch.zeros(4, 3)),
            "GaussianMixture.log_responsibilities: x must be (batch, ...) with 2 values per sample, "
            "got (4, 3)",
        ),
        (
            lambda g: g.reference_ode(torch.zeros(2), sd.EDM(), 80.0),
            "GaussianMixture.reference_ode: x_T must be (batch, ...) with 2 values per sample, got (2,)",
        ),
        (
            lambda g: g.posterior(torch.ones(2, 3), torch.zeros(2), 0.1),
            "GaussianMixture.posterior: A must be a finite (m, 2) matrix, got shape (2, 3)",
        ),
        (
            lambda g: g.posterior(torch.ones(2, 2), torch.zeros(3), 0.1),
            "GaussianMixture.posterior: y must be a finite (2,) vector, got shape (3,)",
        ),
        (
            lambda g: g.tilt(quadratic=torch.tensor([[1.0, 1.0], [0.0, 1.0]])),
            "GaussianMixture.tilt: quadratic must be symmetric",
        ),
        (
            lambda g: g.tilt_log_normalizer(quadratic=-100 * torch.eye(2)),
            "GaussianMixture.tilt_log_normalizer: quadratic must keep S_k^{-1} + Q positive definite "
            "(normalizable tilt)",
        ),
        (
            lambda g: g.shifted(torch.zeros(3)),
            "GaussianMixture.shifted: shift must have 2 finite values, got shape (3,)",
        ),
        # before: the mixture built from it refused "means must be finite"
        (
            lambda g: g.shifted(torch.tensor([0.0, math.nan])),
            "GaussianMixture.shifted: shift must have 2 finite values, got shape (2,)",
        ),
        # before: torch's RuntimeError "The size of tensor a (2) must match the size of tensor b (3)"
        (
            lambda g: g.mean_reverting_marginal(sd.MeanReverting(), torch.zeros(3), 0.5),
            "GaussianMixture.mean_reverting_marginal: mu must have 2 finite values, got shape (3,)",
        ),
        # before: accepted, the scalar broadcast to every coordinate (the denoiser refused it, naming shift)
        (
            lambda g: g.mean_reverting_marginal(sd.MeanReverting(), 0.5, 0.5),
            "GaussianMixture.mean_reverting_marginal: mu must have 2 finite values, got shape ()",
        ),
        (
            lambda g: g.mean_reverting_denoiser(sd.MeanReverting(), torch.zeros(3)),
            "GaussianMixture.mean_reverting_denoiser: mu must have 2 finite values, got shape (3,)",
        ),
        # before: accepted, the marginal of another process (VP: alpha m + (1 - alpha) mu, ...); the
        # denoiser's AttributeError "'VPLinear' object has no attribute 'denoiser'"
        (
            lambda g: g.mean_reverting_marginal(sd.VP.linear(), torch.zeros(2), 0.5),
            "GaussianMixture.mean_reverting_marginal: process must be a steerdiff MeanReverting process, got "
            "VP.linear(beta_min=0.1, beta_max=20)",
        ),
        (
            lambda g: g.mean_reverting_denoiser(None, torch.zeros(2)),
            "GaussianMixture.mean_reverting_denoiser: process must be a steerdiff MeanReverting process, "
            "got None",
        ),
        # before: t = -1 accepted (thetabar(-1) = 3.55 > 0 for the default process: a finite, meaningless
        # mixture); two times torch's "only one element tensors can be converted to Python scalars"
        (
            lambda g: g.mean_reverting_marginal(sd.MeanReverting(), torch.zeros(2), -1.0),
            "GaussianMixture.mean_reverting_marginal: t must be a finite number in [0, 1], got -1.0",
        ),
        (
            lambda g: g.mean_reverting_marginal(sd.MeanReverting(), torch.zeros(2), [0.1, 0.2]),
            "GaussianMixture.mean_reverting_marginal: t must be a finite number in [0, 1], got [0.1, 0.2]",
        ),
        (
            lambda g: g.posterior(torch.eye(2)[:1], torch.zeros(1), 0.0).denoise(torch.zeros(1, 2), 1.0, 0.0),
            "GaussianMixture.denoise: singular covariances have no density at sigma = 0; use sigma > 0",
        ),
        (
            lambda g: sd.toy.GaussianMixture(g.means, -g.variances, g.weights),
            "GaussianMixture: covariances (variances) must be finite and > 0",
        ),
    ],
)
def test_gaussian_mixture_methods_name_themselves_and_the_argument(mix, call, message):
    """Bad input to a method is a ValueError that starts with the method's name (the ground rules'
    convention)."""
    with pytest.raises(ValueError) as err:
        call(mix)
    assert str(err.value).startswith(message), str(err.value)


def test_gaussian_mixture_takes_array_like_samples(mix):
    """A nested list is a sample batch as for ``log_prob``; ``denoise`` and ``reference_ode`` raised
    AttributeError ('list' object has no attribute 'device' / 'shape')."""
    x = [[0.3, -1.0], [1.2, 0.4]]
    assert torch.equal(mix.denoise(x, 0.8, 0.6), mix.denoise(torch.tensor(x), 0.8, 0.6))
    ode = mix.reference_ode(x, sd.EDM(), 80.0, 1.0)
    assert torch.equal(ode, mix.reference_ode(torch.tensor(x), sd.EDM(), 80.0, 1.0))


@pytest.mark.parametrize(("offset", "std"), [(1.0, 1e-8), (10.0, 1e-5), (1e3, 1e-3)])
def test_narrow_component_far_from_the_origin(offset, std):
    """Near a component whose mean is many standard deviations from the origin, the diagonal path's
    quadratic form, expanded as ``x^2 / v - 2 x mu / v + mu^2 / v``, cancelled to the round-off of
    ``|mu|^2 / v``: log_prob was off by 4.3 at ``|mu| / std = 1e8`` (4e-4 at 1e6), the responsibilities
    of two such components by as much. The direct sum of ``(x - mu)^2 / v`` (as the full path's) is
    exact to 1e-14 here."""
    d = 4
    means = offset * torch.tensor([[1.0] * d, [1.0] * d], dtype=F64)
    means[1, 0] += 2 * std  # a second component two standard deviations away in one coordinate
    var = torch.full((2, d), std**2, dtype=F64)
    weights = torch.tensor([0.4, 0.6], dtype=F64)
    diag = sd.toy.GaussianMixture(means, var, weights)
    x = means[:1] + std * torch.randn(5, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    comp = [
        math.log(float(w))
        - 0.5 * float(d * math.log(2 * math.pi * std**2))
        - 0.5 * (((x - m) / std) ** 2).sum(-1).numpy()
        for w, m in zip(weights, means, strict=True)
    ]
    ref = logsumexp(np.stack(comp), axis=0)
    assert np.abs(diag.log_prob(x).numpy() - ref).max() < 1e-9
    resp = np.stack(comp, 1) - ref[:, None]
    assert np.abs(diag.log_responsibilities(x).numpy() - resp).max() < 1e-9
    # the same at a small noise level, the denoiser included (the full path as the reference; the
    # denoisers agree to the float64 spacing of x, 2e-16 |x| = 2e-8 std at |mu| / std = 1e8)
    full = sd.toy.GaussianMixture(means, torch.diag_embed(var), weights)
    assert float((diag.log_prob(x, 1.0, std) - full.log_prob(x, 1.0, std)).abs().max()) < 1e-9
    assert float(((diag.denoise(x, 1.0, std) - full.denoise(x, 1.0, std)) / std).abs().max()) < 1e-6


def test_reference_ode_of_an_x_T_that_requires_grad(mix):
    """The reference is a constant: an ``x_T`` that requires grad (a leaf being optimized, the output of a
    differentiable pipeline) gives the value of its detached copy; it raised torch's RuntimeError ("Can't
    call numpy() on Tensor that requires grad")."""
    x = torch.tensor([[0.3, -1.0], [1.2, 0.4]], dtype=F64)
    ode = mix.reference_ode(x.clone().requires_grad_(), sd.EDM(), 80.0, 1.0, denoise=True)
    assert not ode.requires_grad
    assert torch.equal(ode, mix.reference_ode(x, sd.EDM(), 80.0, 1.0, denoise=True))
