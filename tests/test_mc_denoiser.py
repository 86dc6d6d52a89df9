"""MonteCarloDenoiser (Reverse Diffusion Monte Carlo, Huang et al. 2024) against the exact denoiser of a
Gaussian mixture whose ``log_prob`` is the target.

The estimate of ``E[x0 | x_t]`` at a point is compared with the mixture's exact one in z-scores (the spread
of independent replicates, as many rows of one call), its error's decay with the number of draws is fitted,
the importance sampler's ESS is checked against its closed form on a Gaussian, and whole runs (early-stopped
VP from :meth:`~steerdiff.mcmc.MonteCarloDenoiser.warm_start`, DDPM) are compared with exact draws (sliced
W2 beside the floor of two exact sets) and, on a well-separated two-mode mixture, with ULA and MALA at the
same number of target evaluations (mode-weight error).

``python -m tests.test_mc_denoiser`` prints the numbers of docs/mcmc.md.
"""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd

from .reference import slope, smooth_mixture

F64 = torch.float64
PROC = sd.VP.linear()


def coef(t: float) -> tuple[float, float]:
    return float(PROC.alpha(t)), float(PROC.sigma(t))


def four_modes() -> sd.toy.GaussianMixture:
    """2-d, four components of std 0.55 spread over +-4."""
    means = 2 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    return sd.toy.GaussianMixture(means, torch.full((4, 2), 0.3, dtype=F64), torch.ones(4, dtype=F64))


def two_modes() -> sd.toy.GaussianMixture:
    """Modes at (+-3, 0), std 0.5, weights 1/4 and 3/4: 18 nats between a mode and the saddle."""
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=F64)
    return sd.toy.GaussianMixture(means, torch.full((2, 2), 0.25, dtype=F64), torch.tensor([0.25, 0.75]))


def noised(gmm: sd.toy.GaussianMixture, t: float, n: int, seed: int = 1) -> torch.Tensor:
    """``n`` exact draws of ``p_t``."""
    a, s = coef(t)
    g = torch.Generator().manual_seed(seed)
    return a * gmm.sample(n, g) + s * torch.randn(n, gmm.dim, generator=g, dtype=F64)


def replicates(den: sd.mcmc.MonteCarloDenoiser, x: torch.Tensor, t: float, k: int) -> torch.Tensor:
    """``k`` independent estimates of ``x0_hat`` at each row of ``x``: ``(k, n, d)``."""
    return den(x.repeat(k, 1), t).x0.reshape(k, *x.shape)


def mc(gmm: sd.toy.GaussianMixture, samples: int, seed: int = 3, **kw) -> sd.mcmc.MonteCarloDenoiser:
    g = torch.Generator().manual_seed(seed)
    return sd.mcmc.MonteCarloDenoiser(gmm.log_prob, PROC, (gmm.dim,), samples=samples, generator=g, **kw)


def z_scores(est: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (est.mean(0) - exact) / (est.std(0) / math.sqrt(est.shape[0]))


@pytest.mark.parametrize("t", [0.05, 0.2, 0.5])
def test_importance_is_unbiased_within_its_standard_error(t):
    """32 replicates of 512 draws at 16 points of p_t: the mean estimate is the exact denoiser's within its
    standard error (sigma / alpha = 0.17, 0.72, 3.4; min ESS 196, 32, 3 of 512)."""
    gmm, (a, s) = four_modes(), coef(t)
    x = noised(gmm, t, 16)
    z = z_scores(replicates(mc(gmm, 512), x, t, 32), gmm.denoise(x, a, s))
    assert float(z.abs().max()) < 4.5
    assert 0.7 < float(z.pow(2).mean().sqrt()) < 1.3


def test_importance_error_falls_as_one_over_sqrt_samples():
    """At high noise (t = 0.5, sigma / alpha = 3.4) the RMS error over 16 points x 32 replicates falls with
    slope 1/2 in the number of draws, 64 to 4096."""
    gmm, t = four_modes(), 0.5
    x = noised(gmm, t, 16)
    exact = gmm.denoise(x, *coef(t))
    counts = [64, 256, 1024, 4096]
    errors = [float((replicates(mc(gmm, m), x, t, 32) - exact).pow(2).mean().sqrt()) for m in counts]
    assert 0.4 < slope(counts, errors) < 0.6
    assert errors[-1] < 0.15  # measured 0.93, 0.49, 0.24, 0.11: slope 0.505


def test_importance_ess_matches_its_closed_form():
    """One Gaussian N(mu, c I): the weights are p(y) under the proposal N(m, v I) (m = x / alpha, v = sigma^2
    / alpha^2), so ESS / samples -> E[p]^2 / E[p^2] = N(m; mu, c + v)^2 / ((4 pi c)^{-d/2} N(m; mu, v + c/2))
    per coordinate product."""
    mu, c, d, t = torch.tensor([[1.0, -0.5]], dtype=F64), 0.4, 2, 0.3
    gmm = sd.toy.GaussianMixture(mu, torch.full((1, d), c, dtype=F64), torch.ones(1, dtype=F64))
    a, s = coef(t)
    x = noised(gmm, t, 8)
    den = mc(gmm, 16384)
    den(x, t)
    m, v = x / a, s * s / a / a

    def log_normal(var: float) -> torch.Tensor:
        return (-0.5 * (m - mu).pow(2) / var - 0.5 * math.log(2 * math.pi * var)).sum(1)

    ratio = torch.exp(2 * log_normal(c + v) + 0.5 * d * math.log(4 * math.pi * c) - log_normal(v + c / 2))
    assert den.ess is not None
    assert torch.allclose(
        den.ess / 16384, ratio, rtol=0.1
    )  # measured: within 0.8% but 8% at ESS / samples = 0.04
    assert bool(((den.ess >= 1) & (den.ess <= 16384)).all())


def test_langevin_inner_loop():
    """ULA chains on q from the Gaussian factor (64 chains, 50 moves, step_size 0.05): at t = 0.05 within the
    standard error of the exact denoiser; at t = 0.2 (sigma / alpha = 0.72) biased (ULA's step and the chains'
    unmixed start from a wide Gaussian: RMS 0.082 over these 16 points, 0.2 at the worst).
    cost = samples x inner, the sampler's NFE too."""
    gmm = four_modes()
    den = mc(gmm, 64, method="langevin", inner=50, step_size=0.05)
    assert den.cost == 64 * 50 and den.ess is None
    x = noised(gmm, 0.05, 16)
    z = z_scores(replicates(den, x, 0.05, 32), gmm.denoise(x, *coef(0.05)))
    assert float(z.abs().max()) < 4.5
    x = noised(gmm, 0.2, 16)
    bias = replicates(den, x, 0.2, 32).mean(0) - gmm.denoise(x, *coef(0.2))
    assert 0.02 < float(bias.pow(2).mean().sqrt()) < 0.12


def test_langevin_estimate_is_the_mean_of_ula_chains_on_q_at_the_stated_step():
    """``method="langevin"`` written out with the same draws: ``y_i = (x + sigma z_i) / alpha``, then
    ``inner`` moves ``y <- y + h grad log q(y) + sqrt(2 h) z``, ``grad log q(y) = grad log p(y) + alpha (x -
    alpha y) / sigma^2``, ``h = 1 / (1 / step_size + alpha^2 / sigma^2)``, and the chains' mean: to
    round-off. Before, the step rule was untested (``alpha^2 / (2 sigma^2)`` there passed)."""
    gmm, t, step, n, m, inner = four_modes(), 0.05, 0.05, 4, 8, 5
    a, s = coef(t)
    x = noised(gmm, t, n)
    est = mc(gmm, m, seed=5, method="langevin", inner=inner, step_size=step)(x, t).x0
    g = torch.Generator().manual_seed(5)
    y = (x.unsqueeze(1) + s * torch.randn(n, m, 2, generator=g, dtype=F64)) / a
    h = 1 / (1 / step + a**2 / s**2)
    for _ in range(inner):
        yr = y.reshape(n * m, 2).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(gmm.log_prob(yr).sum(), yr)
        drift = grad.reshape(n, m, 2) + a * (x.unsqueeze(1) - a * y) / s**2
        y = y + h * drift + math.sqrt(2 * h) * torch.randn(n, m, 2, generator=g, dtype=F64)
    torch.testing.assert_close(est, y.mean(1), rtol=0, atol=1e-12)
    assert h < 0.5 * step  # the Gaussian factor's limit rules at this noise (h = 0.019)


def early_stopped(ratio: float) -> tuple[float, float]:
    """rdMC's start: the VP.linear time where sigma / alpha = ratio, and its sigma."""
    t = float(PROC.t_of_lam(torch.tensor(-math.log(ratio), dtype=F64)))
    return t, coef(t)[1]


def rdmc(
    gmm: sd.toy.GaussianMixture, n: int, ratio: float, steps: int, samples: int, warm: int, c: float
) -> tuple[torch.Tensor, int]:
    """A whole rdMC run: x_T ~ N(0, sigma_T^2 I), ``warm`` ULA moves on p_T (step c sigma_T^2), DDPM on
    ``steps`` time-uniform nodes from T; the samples and the target evaluations per sample."""
    t_T, s_T = early_stopped(ratio)
    g = torch.Generator().manual_seed(0)
    den = mc(gmm, samples, seed=100)
    x = den.warm_start(s_T * torch.randn(n, gmm.dim, generator=g, dtype=F64), t_T, warm, c * s_T**2, g)
    times = torch.linspace(t_T, PROC.t_min, steps, dtype=F64)
    out, info = sd.sample(den, x, steps=steps, schedule=times, solver="ddpm", generator=g, return_info=True)
    assert info.nfe == steps * samples  # DDPM: one call per node, each `samples` target evaluations
    return out, info.nfe + warm * den.cost


def mode_weight_error(gmm: sd.toy.GaussianMixture, x: torch.Tensor) -> float:
    """Total variation between the fractions of ``x`` nearest each component and the weights."""
    k = gmm.log_responsibilities(x).argmax(1)
    return 0.5 * float((torch.bincount(k, minlength=len(gmm.weights)) / len(x) - gmm.weights).abs().sum())


# (name, mixture, sigma_T / alpha_T, draws per call, warm-start moves, their step / sigma_T^2, bound / floor)
RUNS = [
    ("2-d, 4 modes", four_modes, 2.0, 64, 20, 0.5, 1.6),
    ("8-d, 4 components", lambda: smooth_mixture(8), 1.0, 256, 20, 0.25, 1.8),
]


@pytest.mark.parametrize(("name", "gmm", "ratio", "samples", "warm", "c", "bound"), RUNS, ids=["2d", "8d"])
def test_rdmc_sampling_reaches_the_floor(name, gmm, ratio, samples, warm, c, bound):
    """512 samples, 20 DDPM steps from the early-stopped sigma / alpha: sliced W2 to 512 exact draws within
    `bound` x the floor (docs/mcmc.md's table; 2-d over generator seeds 0-3: 0.18-0.39 against the floor 0.27,
    the rest of the error the warm start's mode weights)."""
    gmm = gmm()
    out, cost = rdmc(gmm, 512, ratio, 20, samples, warm, c)
    ref = gmm.sample(512, torch.Generator().manual_seed(7))
    floor = sd.metrics.floor(gmm.sample, 512)
    assert cost == samples * (20 + warm)
    assert sd.metrics.sliced_wasserstein(out, ref) < bound * floor


def langevin_mode_errors(gmm: sd.toy.GaussianMixture, cost: int, chains: int) -> list[float]:
    """ULA and MALA (step 0.1) chains from N(0, I), ``cost`` target evaluations each: mode-weight errors."""
    errors = []
    for kernel in (sd.mcmc.ULA(step_size=0.1), sd.mcmc.MALA(step_size=0.1)):
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(chains, 2, generator=g, dtype=F64)
        steps = cost - (1 if isinstance(kernel, sd.mcmc.MALA) else 0)  # MALA evaluates its start too
        x, info = kernel.run(x0, gmm.log_prob, steps=steps, generator=g)
        assert info.evaluations == cost
        errors.append(mode_weight_error(gmm, x))
    return errors


def test_warm_start_is_ula_on_the_estimated_score():
    """``warm_start`` is ``y <- y + eps s(y) + sqrt(2 eps) z`` with ``s = -eps_hat / sigma_t`` of the
    estimate at ``t``, the moves' noise from ``generator`` and the estimates' from the denoiser's own:
    written out here with the same streams, to round-off. Nothing tested it before (the score taken with
    ``sigma^0.9`` passed)."""
    gmm, t, step = four_modes(), 0.3, 0.1
    sigma = coef(t)[1]
    x = sigma * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = mc(gmm, 64, seed=100).warm_start(x, t, 3, step, torch.Generator().manual_seed(7))
    den, g, y = mc(gmm, 64, seed=100), torch.Generator().manual_seed(7), x
    for _ in range(3):
        z = torch.randn(16, 2, generator=g, dtype=F64)
        y = y - step * den(y, t).eps / sigma + math.sqrt(2 * step) * z
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)
    assert float((out - x).abs().mean()) > 0.3  # the moves moved (0.59 measured)


def test_rdmc_beats_langevin_on_separated_modes():
    """Two modes 18 nats above their saddle, weights 1/4, 3/4: rdMC (sigma / alpha = 3, 10 warm-start moves,
    5 DDPM steps, 128 draws: 1920 evaluations per sample) gets the weights to 0.086 in total variation;
    ULA and MALA chains from N(0, I) with the same 1920 evaluations each stay in the mode they fell into
    first (0.246, 0.254)."""
    gmm = two_modes()
    out, cost = rdmc(gmm, 512, 3.0, 5, 128, 10, 0.25)
    assert cost == 1920
    ours = mode_weight_error(gmm, out)
    assert ours < 0.12
    assert min(langevin_mode_errors(gmm, cost, 256)) > max(0.15, 2 * ours)


def test_reproducible_per_seed_and_per_row():
    """The same generators give the same estimate; one generator per row gives a row the same estimate
    whatever its batch, in a call and through sd.sample (take_rows follows the rows)."""
    gmm, t = four_modes(), 0.3
    x = noised(gmm, t, 4)
    assert torch.equal(mc(gmm, 64)(x, t).x0, mc(gmm, 64)(x, t).x0)
    assert not torch.equal(mc(gmm, 64)(x, t).x0, mc(gmm, 64, seed=4)(x, t).x0)

    def per_row(rows: list[int]) -> sd.mcmc.MonteCarloDenoiser:
        gens = [torch.Generator().manual_seed(10 + r) for r in rows]
        return sd.mcmc.MonteCarloDenoiser(gmm.log_prob, PROC, (2,), samples=32, generator=gens)

    assert torch.equal(per_row([0, 1, 2, 3])(x, t).x0[2:3], per_row([2])(x[2:3], t).x0)
    assert torch.equal(
        per_row([0, 1, 2, 3]).take_rows(torch.tensor([2]), 4)(x[2:3], t).x0, per_row([2])(x[2:3], t).x0
    )

    def run(rows: list[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(20 + r) for r in rows]
        return sd.sample(
            per_row(rows), x[rows], steps=5, solver="ddpm", schedule="time_uniform", generator=gens
        )

    assert torch.equal(run([0, 1, 2, 3])[2:3], run([2]))


def test_derivative_in_x_is_tweedies_for_guidance():
    """Under DPS-like guidance (sd.guidance.denoise_with_grad) d x0_hat / d x of the importance estimate is
    (alpha / sigma^2) Cov_q[x0], on a Gaussian target in closed form: measured 0.166 +- 0.022 (32 rows,
    8192 draws; cross term 0.004 +- 0.012) against 0.1436; before, with the weights detached, 1 / alpha =
    3.556 exactly."""
    c, t, rows = 0.7, 0.5, 32
    a, s = coef(t)

    def gaussian(v: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((v - 0.5) / c).pow(2).sum(-1)

    g = torch.Generator().manual_seed(0)
    den = sd.mcmc.MonteCarloDenoiser(gaussian, PROC, (2,), samples=8192, generator=g)
    with sd.guidance.grad_on("test", torch.zeros(rows, 2, dtype=F64)):
        xr, pred = sd.guidance.denoise_with_grad("test", den, torch.zeros(rows, 2, dtype=F64), t)
        (jac,) = torch.autograd.grad(pred.x0[:, 0].sum(), xr)
    exact = a / s**2 / (1 / c**2 + a**2 / s**2)
    for j, value in enumerate((exact, 0.0)):  # d x0_0 / d x_0, and no cross term
        assert abs(float(jac[:, j].mean()) - value) < 4 * float(jac[:, j].std()) / math.sqrt(rows)


@pytest.mark.parametrize("t", [0.05, 0.1])
def test_langevin_derivative_in_x_is_the_exact_denoisers(t):
    """method='langevin' differentiated in x (DPS, a backward pass through the sampler): the vector-Jacobian
    product ``v^T d x0_hat / dx`` against the exact mixture denoiser's, by Stein's form of Tweedie's
    identity over the chains (1024 chains, 100 moves, step_size 0.02; 16 points of p_t): measured relative
    error median / max 0.027 / 0.037 at t = 0.05 and 0.040 / 0.066 at t = 0.1 (the covariance form
    ``(alpha / sigma^2) Cov``, ULA's inflated variance in it: 0.27 / 0.37 and 0.10 / 0.17). Before, a
    ValueError ('method='langevin' has no derivative of its estimate in x'). A differentiated call costs
    ``samples * (inner + 1)``: one more gradient per chain."""
    gmm = four_modes()
    a, s = coef(t)
    x = noised(gmm, t, 16)
    v = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    xr = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad((gmm.denoise(xr, a, s) * v).sum(), xr)
    den = mc(gmm, 1024, method="langevin", inner=100, step_size=0.02)
    xr = x.clone().requires_grad_(True)
    pred = den(xr, t)
    assert den.cost == 1024 * 101
    (got,) = torch.autograd.grad((pred.x0 * v).sum(), xr)
    err = (got - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(err.median()) < 0.06 and float(err.max()) < 0.1
    same = mc(gmm, 1024, method="langevin", inner=100, step_size=0.02)  # the same draws, not differentiated
    assert torch.equal(same(x, t).x0, pred.x0.detach())  # the value is the chains' mean, the term 0
    assert same.cost == 1024 * 100
    one = mc(gmm, 1, method="langevin", inner=2, step_size=0.02)
    with pytest.raises(ValueError, match=r"needs samples >= 2, got samples=1"):
        one(x.clone().requires_grad_(True), t)


def test_log_prob_nan_inf_and_an_empty_support_are_errors_and_minus_inf_is_weight_0():
    """-inf at some draws is weight 0 (the estimate is the mean over the rest); NaN, +inf, or -inf at every
    draw of a row is a ValueError naming log_prob, from a call, from sd.sample and from warm_start (before:
    a NaN estimate, a generic non-finite report from the sampler and a silent NaN from warm_start)."""
    x, t = torch.zeros(3, 2, dtype=F64), 0.5

    def right_half(v: torch.Tensor) -> torch.Tensor:
        return torch.where(v[:, 0] > 0, 0.0, -math.inf)

    half = sd.mcmc.MonteCarloDenoiser(right_half, PROC, (2,), samples=4096, generator=torch.Generator())
    a, s = coef(t)
    # the draws N(0, (s/a)^2 I) restricted to v_0 > 0: mean s/a sqrt(2/pi) along v_0, 0 along v_1
    x0, se = half(x, t).x0, 3 * (s / a) / math.sqrt(2048)
    assert (x0[:, 0] - s / a * math.sqrt(2 / math.pi)).abs().max() < se and x0[:, 1].abs().max() < 2 * se
    bad = [
        lambda v: torch.where(v[:, 0] > 0, math.nan, 0.0),
        lambda v: torch.where(v[:, 0] > 0, math.inf, 0.0),
        lambda v: torch.full(v.shape[:1], -math.inf, dtype=v.dtype),
    ]
    for log_prob in bad:
        den = sd.mcmc.MonteCarloDenoiser(log_prob, PROC, (2,), samples=16, generator=torch.Generator())
        match = r"log_prob must return finite numbers or -inf .* got NaN"
        with pytest.raises(ValueError, match=match):
            den(x, t)
        with pytest.raises(ValueError, match=match):
            sd.sample(den, x, steps=2, solver="ddim")
        with pytest.raises(ValueError, match=match):
            den.warm_start(x, t, 2, 0.1, generator=torch.Generator())


def test_langevin_nan_or_a_non_finite_gradient_is_an_error():
    """method='langevin': a log_prob NaN (ULA reads only its gradient), or whose gradient is not finite where
    it is, at a point a chain visited is a ValueError naming log_prob and t from a call, from sd.sample and
    from warm_start, as for 'importance' (before: a call and warm_start returned NaN or a finite estimate
    silently, sd.sample said only 'the model returned NaN/inf at step 0')."""
    x, t = torch.zeros(3, 2, dtype=F64), 0.5
    bad = [
        lambda v: -v[:, 0].sqrt() - 0.5 * v.pow(2).sum(-1),  # NaN, with a NaN gradient, at v_0 < 0
        lambda v: torch.where(v[:, 0] > 0, math.nan, 0.0) - 0.5 * v.pow(2).sum(-1),  # NaN, finite gradient
    ]
    for log_prob in bad:
        den = sd.mcmc.MonteCarloDenoiser(
            log_prob, PROC, (2,), 16, "langevin", inner=3, step_size=0.1, generator=torch.Generator()
        )
        match = r"log_prob must return finite numbers or -inf .* got NaN or a non-finite gradient .* t=0.5"
        with pytest.raises(ValueError, match=match):
            den(x, t)
        with pytest.raises(ValueError, match=match.replace("t=0.5", "t=1")):
            sd.sample(den, x, steps=2, solver="ddim")
        with pytest.raises(ValueError, match=match):
            den.warm_start(x, t, 2, 0.1, generator=torch.Generator())


@pytest.mark.parametrize("method", ["importance", "langevin"])
def test_nan_checks_read_nothing_per_call_on_an_accelerator(method, monkeypatch):
    """Off the CPU (faked: tensors that are not CPU ones) a call reads nothing from the device (its NaN check
    read it at every call, a sync per step: ``tests/test_device.py``); the NaN estimate is the sampler's to
    report at the end of the run, naming the step (NonFiniteError), and warm_start checks its end state once
    (a ValueError naming log_prob)."""
    x, t = torch.zeros(3, 2, dtype=F64), 0.5
    options = {} if method == "importance" else {"inner": 3, "step_size": 0.1}

    def log_prob(v: torch.Tensor) -> torch.Tensor:
        return -v[:, 0].sqrt() - 0.5 * v.pow(2).sum(-1)

    def make() -> sd.mcmc.MonteCarloDenoiser:
        return sd.mcmc.MonteCarloDenoiser(
            log_prob, PROC, (2,), 16, method, generator=torch.Generator().manual_seed(0), **options
        )

    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    assert bool(make()(x, t).x0.isnan().any())  # no error at the call
    with pytest.raises(sd.NonFiniteError, match=r"the model returned NaN/inf at step 0"):
        sd.sample(make(), x, steps=2, solver="ddim")
    with pytest.raises(ValueError, match=r"warm_start: the moves reached NaN/inf: log_prob returned NaN"):
        make().warm_start(x, t, 2, 0.1, generator=torch.Generator())


def test_bad_input():
    gmm = four_modes()
    make = sd.mcmc.MonteCarloDenoiser
    with pytest.raises(ValueError, match=r"MonteCarloDenoiser: log_prob must be callable"):
        make(3, PROC, (2,))
    with pytest.raises(ValueError, match=r"MonteCarloDenoiser: process must be a steerdiff Process"):
        make(gmm.log_prob, "vp", (2,))
    with pytest.raises(ValueError, match=r"MonteCarloDenoiser: samples must be an integer >= 1, got 0"):
        make(gmm.log_prob, PROC, (2,), samples=0)
    with pytest.raises(ValueError, match=r"MonteCarloDenoiser: method"):
        make(gmm.log_prob, PROC, (2,), method="mala")
    with pytest.raises(ValueError, match=r"inner are for method='langevin'"):
        make(gmm.log_prob, PROC, (2,), inner=5)
    with pytest.raises(ValueError, match=r"method='langevin' needs inner .* and step_size"):
        make(gmm.log_prob, PROC, (2,), method="langevin", inner=5)
    with pytest.raises(ValueError, match=r"MonteCarloDenoiser: step_size must be a finite number > 0"):
        make(gmm.log_prob, PROC, (2,), method="langevin", inner=5, step_size=-1.0)
    with pytest.raises(ValueError, match=r"MonteCarloDenoiser: generator must be"):
        make(gmm.log_prob, PROC, (2,), generator=3)
    den = mc(gmm, 8)
    with pytest.raises(ValueError, match=r"x must be \(batch, \*\(2,\)\), got \(3, 3\)"):
        den(torch.zeros(3, 3, dtype=F64), 0.5)
    with pytest.raises(ValueError, match=r"log_prob takes no conditions, got \['y'\]"):
        den(torch.zeros(3, 2, dtype=F64), 0.5, y=1)
    bad = sd.mcmc.MonteCarloDenoiser(lambda v: v.sum(), PROC, (2,), generator=torch.Generator())
    with pytest.raises(ValueError, match=r"log_prob must return a \(768,\) tensor, got \(\)"):
        bad(torch.zeros(3, 2, dtype=F64), 0.5)
    with pytest.raises(ValueError, match=r"warm_start: moves must be an integer >= 1"):
        den.warm_start(torch.zeros(3, 2, dtype=F64), 0.5, 0, 0.1)
    with pytest.raises(
        ValueError, match=r"generator: .*MonteCarloDenoiser in the denoiser draws noise from torch"
    ):
        unseeded = sd.mcmc.MonteCarloDenoiser(gmm.log_prob, PROC, (2,))
        sd.sample(unseeded, torch.zeros(3, 2), steps=2, solver="ddpm", generator=torch.Generator())


def main() -> None:
    """docs/mcmc.md's table: whole rdMC runs beside the floor, and the mode weights against ULA / MALA."""
    for name, gmm, ratio, samples, warm, c, _ in RUNS:
        gmm = gmm()
        out, cost = rdmc(gmm, 512, ratio, 20, samples, warm, c)
        ref = gmm.sample(512, torch.Generator().manual_seed(7))
        sw, floor = sd.metrics.sliced_wasserstein(out, ref), sd.metrics.floor(gmm.sample, 512)
        print(f"{name}: sliced W2 {sw:.3f} (floor {floor:.3f}) at {cost} target evaluations per sample")
    gmm = two_modes()
    out, cost = rdmc(gmm, 512, 3.0, 5, 128, 10, 0.25)
    ula, mala = langevin_mode_errors(gmm, cost, 256)
    ours = mode_weight_error(gmm, out)
    print(f"two modes, {cost} evaluations: mode-weight TV rdMC {ours:.3f}, ULA {ula:.3f}, MALA {mala:.3f}")


if __name__ == "__main__":
    main()
