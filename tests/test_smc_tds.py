"""The twisted diffusion sampler and SVDD against exact answers.

Exact targets: the posterior of a Gaussian mixture under ``y = A x + s n`` (``GaussianMixture.posterior``)
with the evidence ``log p(y) = log sum_k w_k N(y; A mu_k, A S_k A^T + s^2 I)``, and a mixture's class
conditional ``p(x | c)`` with ``p(c) = sum of the class's weights``. As in ``test_smc_fk.py`` the base
sampler is ER-SDE at 25 steps, whose discretization bias is well below the Monte Carlo errors here.
"""

from __future__ import annotations

import gc
import importlib
import math
import weakref

import pytest
import torch

import steerdiff as sd

from .reference import slope, smooth_mixture

F64 = torch.float64
PROC = sd.VP.cosine()
GMM = smooth_mixture(dim=2, components=3, seed=0)
DEN = GMM.denoiser(PROC)
A = torch.tensor([[1.0, 0.5]], dtype=F64)
Y = torch.tensor([1.0], dtype=F64)
S = 0.5
SOLVER, STEPS = "er_sde", 25


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tds(den: sd.Denoiser, operator: object = None, y: object = None, **kw: object) -> sd.smc.Particles:
    """``sd.smc.tds`` with its positional-only observation taken by name, as the parametrized likelihoods
    here give it."""
    return sd.smc.tds(den, operator, y, **kw)


def posterior(y: torch.Tensor, A: torch.Tensor = A) -> tuple[torch.Tensor, float]:
    """Exact ``E[x | y]`` and ``log p(y)``."""
    post = GMM.posterior(A, y, S)
    c = A @ GMM.covariance_matrices @ A.T + S * S * torch.eye(A.shape[0], dtype=F64)
    log_lik = torch.distributions.MultivariateNormal(GMM.means @ A.T, c).log_prob(y)
    return (post.weights[:, None] * post.means).sum(0), float(torch.logsumexp(GMM.weights.log() + log_lik, 0))


def run_tds(particles: int, rows: int = 32, seed: int = 0, **kw: object) -> sd.smc.Particles:
    args = {"operator": sd.inverse.Matrix(A), "y": Y, "noise_std": S, **kw}
    return tds(
        DEN, **args, shape=(rows, 2), particles=particles, steps=STEPS, solver=SOLVER, generator=gen(seed),
        dtype=F64,
    )  # fmt: skip


# --- TDS: exact posterior and evidence ---------------------------------------------------------------


def test_tds_converges_to_the_exact_posterior_and_evidence():
    """Weighted E[x | y] and log Z_hat against the exact posterior mean and log p(y), over 32 rows.

    Measured (seed 0): E[x] RMSE 0.170, 0.090, 0.036 and log Z RMSE 0.204, 0.095, 0.051 at N = 64, 256,
    1024 (slopes 0.56 and 0.50); mean log Z error at N = 1024: -0.011 (exact log p(y) = -1.9576).
    """
    mean, log_z = posterior(Y)
    ns, err, zerr = [64, 256, 1024], [], []
    for n in ns:
        out = run_tds(n)
        err.append(float((out.mean() - mean).pow(2).sum(-1).mean().sqrt()))
        zerr.append(float((out.log_z - log_z).pow(2).mean().sqrt()))
    assert 0.35 < slope(ns, err) < 0.85, err
    assert 0.35 < slope(ns, zerr) < 0.8, zerr
    assert err[-1] < 0.06 and zerr[-1] < 0.08, (err, zerr)
    assert abs(float((out.log_z - log_z).mean())) < 0.03
    assert out.nfe == STEPS * 1024 and out.x.shape == (32, 1024, 2)


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0])
def test_tds_twist_scale_keeps_the_target(scale):
    """The final weight is the untwisted likelihood: every twist scale targets p(x | y) (z-test over
    16 rows, 4 standard errors + 0.02); scale 0 is importance sampling from the base sampler."""
    mean, log_z = posterior(Y)
    out = run_tds(512, rows=16, seed=3, twist_scale=scale)
    for err in (out.mean() - mean, (out.log_z - log_z)[:, None]):
        se = err.std(0) / 4
        assert bool((se < 0.06).all()), se
        assert bool((err.mean(0).abs() < 4 * se + 0.02).all()), (scale, err.mean(0), se)
    if scale == 0:
        assert not bool(out.trace.resampled[:-1].any())  # no twist: nothing to resample on before the end


@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_tds_evidence_is_unbiased_with_few_particles(scale):
    """``exp(log_z)`` is an unbiased estimate of ``p(y)`` at any particle count: 4 particles, 1024 rows, the
    mean of ``p_hat(y) / p(y)`` is 1 (4 standard errors + 0.02: the base sampler's bias, -0.01 in log p(y)),
    while ``log p_hat(y)`` is low by Jensen's gap.

    Measured (seed 1): ``E[p_hat / p] - 1`` +0.027 +- 0.022 (twisted), +0.024 +- 0.028 (no twist: importance
    sampling from the base); mean ``log p_hat - log p`` -0.52 and -1.62.
    """
    log_z = posterior(Y)[1]
    out = run_tds(4, rows=1024, seed=1, twist_scale=scale)
    ratio = (out.log_z - log_z).exp()
    se = float(ratio.std()) / math.sqrt(1024)
    assert abs(float(ratio.mean()) - 1) < 4 * se + 0.02, (float(ratio.mean()), se)
    assert float((out.log_z - log_z).mean()) < -0.3


def test_tds_twist_shapes_the_variance():
    """A sharper observation (``A`` 2 x 2, ``s = 0.2``), 256 particles: the PiGDM-variance twist
    (``prior_var = 1``) keeps the weights even (final ESS) and beats both no twist (importance sampling
    from the base) and the plain ``N(y; A x0_hat, s^2)`` twist (``prior_var = 0``), which ignores the
    spread of ``x0 | x_t`` and degenerates mid-run.

    Measured E[x | y] RMSE over 32 rows: 0.045, 0.061 (no twist), 0.417 (plain); mean final ESS 196,
    12, 202.
    """
    a2, y2, s2 = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64), torch.tensor([1.0, -0.5], dtype=F64), 0.2
    post = GMM.posterior(a2, y2, s2)
    mean = (post.weights[:, None] * post.means).sum(0)
    errs, ess = [], []
    for v, g in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0)):
        out = run_tds(256, operator=sd.inverse.Matrix(a2), y=y2, noise_std=s2, prior_var=v, twist_scale=g)
        errs.append(float((out.mean() - mean).pow(2).sum(-1).mean().sqrt()))
        ess.append(float(out.ess().mean()))
    assert errs[0] < 0.06 and errs[0] < errs[1] and errs[2] > 4 * errs[0], errs
    assert ess[0] > 120 and ess[1] < 30, ess


# --- TDS: the twist and its proposal, exact for Gaussian data --------------------------------------------

TDS_MODULE = importlib.import_module("steerdiff.smc.tds")  # the module (``sd.smc.tds`` is the function)
M1, V1 = torch.tensor([0.5, -1.0, 0.3], dtype=F64), 0.5
GAUSS = sd.toy.GaussianMixture(M1[None], torch.full((1, 3), V1, dtype=F64), torch.ones(1, dtype=F64))
A1 = torch.tensor([[1.0, 0.5, 0.0], [0.0, -1.0, 2.0]], dtype=F64)
Y1, S1 = torch.tensor([2.0, -1.0], dtype=F64), 0.3


def gauss_log_lik(x: torch.Tensor, t: float) -> torch.Tensor:
    """Exact ``log p(y | x_t)`` for ``x0 ~ N(m, v I)``, ``y = A x0 + s n``, ``x_t = alpha x0 + sigma eps``:
    ``log N((x_t, y); joint Gaussian) - log N(x_t; alpha m, (alpha^2 v + sigma^2) I)``."""
    a, s = float(PROC.alpha(t)), float(PROC.sigma(t))
    cxx = (a * a * V1 + s * s) * torch.eye(3, dtype=F64)
    cxy = a * V1 * A1.T  # Cov(x_t, y)
    cyy = V1 * A1 @ A1.T + S1 * S1 * torch.eye(2, dtype=F64)
    joint = torch.cat([torch.cat([cxx, cxy], 1), torch.cat([cxy.T, cyy], 1)])
    mvn = torch.distributions.MultivariateNormal
    xy = torch.cat([x, Y1.expand(x.shape[0], 2)], 1)
    return mvn(torch.cat([a * M1, A1 @ M1]), joint).log_prob(xy) - mvn(a * M1, cxx).log_prob(x)


def run_gauss(steps: int, rows: int, particles: int, solver: str = "ddpm", **kw: object) -> sd.smc.Particles:
    return sd.smc.tds(
        GAUSS.denoiser(PROC), sd.inverse.Matrix(A1), Y1, noise_std=S1, prior_var=V1, shape=(rows, 3),
        particles=particles, steps=steps, solver=solver, generator=gen(0), dtype=F64, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(("solver", "scale"), [("ddpm", 1.0), ("er_sde", 0.5)])
def test_tds_linear_twist_and_proposal_are_exact_for_gaussian_data(monkeypatch, solver, scale):
    """Data ``N(m, v I)`` and ``prior_var = v``: ``x0 | x_t ~ N(x0_hat, r_t^2 I)`` exactly, so the twist
    ``N(y; A x0_hat, s^2 I + r_t^2 A A^T)`` is ``p(y | x_t)`` (Wu et al. Sec. 3). At every node (after any
    resampling) the particles' log-twist is ``gamma log p(y | x_i)`` up to a per-node constant, and the
    proposal's mean is the base mean plus ``std^2 gamma grad log p(y | x_i)`` (Alg. 1), against
    :func:`gauss_log_lik` and its autograd gradient. Measured: both within 7e-14 (relative for the shift);
    the largest shift is 0.17 (ddpm)."""
    seen = []

    class Recording(TDS_MODULE.TDS):
        def propose(self, ctx, base):
            prop = super().propose(ctx, base)
            means = (base.mean.detach(), prop.mean.detach())
            seen.append((ctx.t, ctx.x.detach(), ctx.state["log_twist"].clone(), means, base.std, prop))
            return prop

    monkeypatch.setattr(TDS_MODULE, "TDS", Recording)
    run_gauss(10, rows=4, particles=8, solver=solver, twist_scale=scale)
    assert len(seen) == 10
    for k, (t, x, log_twist, (base_mean, prop_mean), std, prop) in enumerate(seen):
        xf = x.reshape(-1, 3).requires_grad_(True)
        exact = scale * gauss_log_lik(xf, t)
        (grad,) = torch.autograd.grad(exact.sum(), xf)
        gap = log_twist - exact.detach().reshape(log_twist.shape)
        assert float(gap.max() - gap.min()) < 1e-10, (t, gap)
        if k == len(seen) - 1:  # the deterministic jump to x0_hat is not twisted
            assert std == 0 and torch.equal(prop_mean, base_mean)
            continue
        want = std**2 * grad.reshape(x.shape)
        err = float((prop_mean - base_mean - want).abs().max())
        assert err < 1e-10 * float(want.abs().max()), (t, err)
        assert torch.equal(torch.as_tensor(prop.std), torch.as_tensor(std))


def test_tds_exact_twist_keeps_the_weights_even():
    """DDPM with the exact twist above, no resampling (``ess_threshold = 0``), 16 rows x 64 particles: the
    proposal ``N(m + std^2 grad log p(y | x_i), std^2)`` tends to the exact conditional transition, so the
    final ESS/N tends to 1 at first order in the steps; without a twist (or with the shift's sign flipped)
    the weights collapse onto one particle.

    Measured (seed 0) ESS/N at 50, 100, 200 steps: 0.31, 0.61, 0.82 (the deficit halves, ratios 0.56 and
    0.47; worst row 0.77 at 200); no twist at 200 steps: 0.02; shift's sign flipped: 0.016 (= 1/N) at every
    step count.
    """
    ess = {s: run_gauss(s, rows=16, particles=64, ess_threshold=0.0).ess() / 64 for s in (50, 100, 200)}
    deficit = [1 - float(ess[s].mean()) for s in (50, 100, 200)]
    assert float(ess[200].mean()) > 0.75 and float(ess[200].min()) > 0.6, ess[200]
    assert 0.35 < deficit[1] / deficit[0] < 0.7 and 0.35 < deficit[2] / deficit[1] < 0.7, deficit
    none = run_gauss(200, rows=16, particles=64, ess_threshold=0.0, twist_scale=0.0).ess() / 64
    assert float(none.mean()) < 0.1, none


@pytest.mark.parametrize("cut", ["where", "probit"])
def test_tds_zero_twist_keeps_a_zero_weight(cut):
    """A likelihood that is zero somewhere (log -inf: ``N(y; x_1, 0.5^2)`` truncated to ``x_1 > 0.3``; or
    times a probit ``Phi((x_1 - 0.3) / 1e-3)``, whose log underflows to -inf with a NaN gradient below
    0.26) on the Gaussian prior ``N(m, v I)``: particles whose twist is zero have weight zero and keep it
    until resampled away, proposed from the base; the target is the truncated Gaussian posterior
    ``N(0.7, 1/6)`` on ``x_1 > 0.3`` (mean 0.8205, ``log Z = -0.7879``). Before, a zero-weight particle left
    unresampled (ESS above threshold) got the increment ``-log p~ = +inf`` at the next node (ValueError
    "NaN or +inf at node 12"), or, with the NaN gradient, a NaN proposal (NonFiniteError from the net).

    Measured (seed 0, 8 rows x 256): mean of x_1 error 0.0097 / 0.0104, mean log Z error -0.039 / -0.041
    (where / probit)."""
    std_normal = torch.distributions.Normal(0.0, 1.0)

    def log_lik(x: torch.Tensor) -> torch.Tensor:
        lp = -0.5 * ((x[:, 0] - 0.8) / 0.5) ** 2
        if cut == "probit":
            return lp + torch.log(std_normal.cdf((x[:, 0] - 0.3) / 1e-3))
        return torch.where(x[:, 0] > 0.3, lp, torch.full_like(lp, -math.inf))

    out = sd.smc.tds(
        GAUSS.denoiser(PROC), log_likelihood=log_lik, shape=(8, 3), particles=256, steps=STEPS, solver=SOLVER,
        generator=gen(0), dtype=F64,
    )  # fmt: skip
    v = 1 / (1 / V1 + 1 / 0.25)
    mu, a = v * (0.5 / V1 + 0.8 / 0.25), (0.3 - 0.7) / math.sqrt(v)
    tail = 1 - float(std_normal.cdf(torch.tensor(a)))
    mean = mu + math.sqrt(v) * float(std_normal.log_prob(torch.tensor(a)).exp()) / tail
    log_z = float(torch.distributions.Normal(0.5, math.sqrt(V1 + 0.25)).log_prob(torch.tensor(0.8)))
    log_z += 0.5 * math.log(2 * math.pi * 0.25) + math.log(tail)
    assert bool(torch.isinf(out.log_w).any()) and not bool(out.trace.resampled.all())  # zero weights kept
    assert bool(torch.isfinite(out.x).all())
    assert abs(float(out.mean()[:, 0].mean()) - mean) < 0.03, out.mean()[:, 0]
    assert abs(float(out.log_z.mean()) - log_z) < 0.08, out.log_z


def test_tds_per_row_observations_and_any_operator():
    """One y per batch row, each row its own posterior; an ``Inpaint`` mask is the operator ``[[1, 0]]``."""
    ys = torch.tensor([[1.5], [-1.0]], dtype=F64)
    mask = torch.tensor([True, False])
    out = sd.smc.tds(
        DEN, sd.inverse.Inpaint(mask), ys, noise_std=S, shape=(2, 2), particles=2048, steps=STEPS,
        solver=SOLVER, generator=gen(5), dtype=F64,
    )  # fmt: skip
    a = torch.tensor([[1.0, 0.0]], dtype=F64)
    for row in range(2):
        mean, log_z = posterior(ys[row], a)
        assert float((out.mean()[row] - mean).norm()) < 0.12, (row, out.mean()[row], mean)
        assert float(out.log_z[row]) == pytest.approx(log_z, abs=0.12)


@pytest.mark.parametrize("twist", ["operator", "log_likelihood"])
def test_tds_under_no_grad_equals_the_run_with_grad(twist):
    """Pipelines sample under ``no_grad``: the x0-based twists differentiate inside the run all the same
    (the leaf used to be made outside the grad context: a RuntimeError); ``inference_mode`` is refused
    by name."""
    if twist == "operator":
        kw = {"operator": sd.inverse.Matrix(A), "y": Y, "noise_std": S}
    else:
        kw = {"log_likelihood": lambda x0: -((x0 @ A.T - Y) ** 2).sum(1) / (2 * S * S)}

    def run() -> sd.smc.Particles:
        return tds(
            DEN, **kw, shape=(3, 2), particles=4, steps=STEPS, solver=SOLVER, generator=gen(), dtype=F64
        )

    with torch.no_grad():
        quiet = run()
    loud = run()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        run()
    torch.testing.assert_close(quiet.x, loud.x, rtol=0, atol=0)
    torch.testing.assert_close(quiet.log_w, loud.log_w, rtol=0, atol=0)


# --- TDS: classifiers ----------------------------------------------------------------------------------

MEANS = torch.tensor([[-2.0, 0.0], [-1.0, 1.5], [1.5, -1.0], [2.0, 1.0]], dtype=F64)
VARS = torch.full((4, 2), 0.4, dtype=F64)
WEIGHTS = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=F64)
TWO_CLASS = sd.toy.GaussianMixture(MEANS, VARS, WEIGHTS)
CLASS0 = sd.toy.GaussianMixture(MEANS[:2], VARS[:2], WEIGHTS[:2])  # class 0: components 0 and 1


def log_p_class0(x: torch.Tensor, alpha: float = 1.0, sigma: float = 0.0) -> torch.Tensor:
    """Exact ``log p(c = 0 | x_t)`` of the two-class mixture at noise level ``(alpha, sigma)``."""
    return math.log(3 / 7) + CLASS0.log_prob(x, alpha, sigma) - TWO_CLASS.log_prob(x, alpha, sigma)


@pytest.mark.parametrize("kind", ["log_likelihood", "classifier"])
def test_tds_classifier_hits_the_class_conditional(kind):
    """p(x) p(c | x) = p(c) p(x | c): weighted mean -> the class's mean (-4/3, 1), log Z -> log 3/7.

    Measured (seed 0, 32 rows x 1024): E[x] RMSE 0.089 (classifier at x0_hat) / 0.054 (exact
    noise-conditional classifier), log Z error -0.006 / 0.006 (mean), the base's E[x] is (0.57, -0.14).
    """
    if kind == "log_likelihood":
        kw = {"log_likelihood": log_p_class0}
    else:
        kw = {"classifier": lambda x, t: log_p_class0(x, float(PROC.alpha(t)), float(PROC.sigma(t)))}
    out = sd.smc.tds(
        TWO_CLASS.denoiser(PROC), **kw, shape=(32, 2), particles=1024, steps=STEPS, solver=SOLVER,
        generator=gen(0), dtype=F64,
    )  # fmt: skip
    exact = (CLASS0.weights[:, None] * CLASS0.means).sum(0)
    assert float((out.mean() - exact).pow(2).sum(-1).mean().sqrt()) < 0.13
    assert float((out.mean().mean(0) - exact).norm()) < 0.05
    assert float(out.log_z.mean()) == pytest.approx(math.log(3 / 7), abs=0.03)


# --- SVDD ------------------------------------------------------------------------------------------------

C = torch.tensor([1.0, -0.5], dtype=F64)


def linear(x: torch.Tensor) -> torch.Tensor:
    return x @ C


@pytest.mark.slow  # 10-17 s: in make test-slow, out of make test's default run
def test_tds_frees_each_steps_graph():
    """TDS differentiates every step; with a net holding parameters, a step's graph (the tensors saved for
    its backward) must be freed by the next (the run's deferred NaN check kept a sum on it: 5 more saved
    tensors alive per step here, memory growing by a state per step: 1.1 GiB at 100 steps for 4 x 1024
    particles of a 64-256-64 MLP, 135 MiB now), and none of it alive during the next step."""
    holders: list[weakref.ref[object]] = []

    class Saved:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t
            holders.append(weakref.ref(self))

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    alive: list[int] = []
    before: list[int] = []

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gc.collect()
        before.append(sum(r() is not None for r in holders))  # those earlier steps left
        out = mlp(x)
        gc.collect()
        alive.append(sum(r() is not None for r in holders))  # and this call's
        return out

    den = sd.Denoiser(eps, sd.VP.scaled_linear(), "eps")
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        sd.smc.tds(den, log_likelihood=lambda x0: -0.5 * x0[:, 0] ** 2, shape=(1, 4), particles=3, steps=12)
    assert alive[-1] == alive[3] > 0, alive
    # none of the previous step's at the next step's call: its graph went with the step's frame (were 5,
    # the step's locals in run_smc's loop, alive until the next step replaced them)
    assert before == [0] * 12, before


def test_svdd_alpha_zero_is_code_with_block_one():
    kw = dict(shape=(16, 2), particles=8, steps=STEPS, solver=SOLVER, dtype=F64)
    a = sd.smc.svdd(DEN, linear, 0.0, generator=gen(4), **kw)
    b = sd.smc.code(DEN, linear, block=1, generator=gen(4), **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.log_w, b.log_w)
    assert bool(a.trace.resampled[:-1].all())  # a selection at every node


def test_svdd_alpha_inf_is_the_base_sampler():
    """Uniform selection among M base draws is a base draw: pooled mean and covariance of 4096 samples
    against the mixture's exact moments."""
    out = sd.smc.svdd(
        DEN, linear, math.inf, shape=(4096, 2), particles=4, steps=STEPS, solver=SOLVER, generator=gen(1),
        dtype=F64,
    )  # fmt: skip
    x = out.sample(gen(2))
    w, mu = GMM.weights, GMM.means
    mean = (w[:, None] * mu).sum(0)
    d = mu - mean
    cov = (w[:, None, None] * (torch.diag_embed(GMM.variances) + d[:, :, None] * d[:, None, :])).sum(0)
    se = (torch.diagonal(cov) / len(x)).sqrt()
    assert bool(((x.mean(0) - mean).abs() < 4 * se).all()), (x.mean(0), mean)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.1 * float(torch.diagonal(cov).max()))


def test_svdd_selects_by_softmax_of_the_value():
    """Finite alpha: the kept candidate is drawn from ``softmax_j(r(x0_hat(x^j)) / alpha)`` (Li et al.
    Alg. 1). Observed at the last noisy node, where with ``final="zero"`` every returned particle is
    ``x0_hat`` of the kept candidate: it is found (exactly) among the candidates' ``x0_hat`` the reward saw
    there. 4096 rows, M = 4, alpha = 0.5, ``r = 3 c.x`` (mean spread of ``r / alpha`` in a row 2.6): z-tests
    of the counts of kept candidates per reward rank and of the sum of the kept rewards against their
    expectations under the softmax (|z| < 4; the counts' variance is ``sum p (1 - p)``).

    Measured (seed 0): rank z 0.15, -0.61, -0.59, 1.61, reward-sum z -0.28. Selecting by ``-r / alpha``:
    rank z down to -71, sum z -169; by ``r alpha``: -31, sum z -57.
    """
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reward(z: torch.Tensor) -> torch.Tensor:
        r = 3 * linear(z)
        calls.append((z.clone(), r.clone()))
        return r

    rows, m, alpha, steps = 4096, 4, 0.5, 4
    out = sd.smc.svdd(
        DEN, reward, alpha, shape=(rows, 2), particles=m, steps=steps, solver=SOLVER, generator=gen(0),
        dtype=F64,
    )  # fmt: skip
    assert len(calls) == steps  # nodes 1 .. S-1 select (node 0 keeps the one x_T), node S weights
    z, r = calls[-2][0].reshape(rows, m, 2), calls[-2][1].reshape(rows, m)
    assert torch.equal(out.x, out.x[:, :1].expand_as(out.x))
    dist = (out.x[:, :1] - z).norm(dim=-1).sort(dim=1).values
    assert float(dist[:, 0].max()) < 1e-12 and float(dist[:, 1].min()) > 1e-6  # one candidate matches
    kept = (out.x[:, :1] - z).norm(dim=-1).argmin(1)
    p = torch.softmax(r / alpha, dim=1)
    order = r.argsort(dim=1, descending=True)
    p_rank = p.gather(1, order)
    counts = torch.bincount((order == kept[:, None]).int().argmax(1), minlength=m).to(F64)
    z_rank = (counts - p_rank.sum(0)) / (p_rank * (1 - p_rank)).sum(0).sqrt()
    mean_r = (p * r).sum(1)
    z_sum = (r.gather(1, kept[:, None])[:, 0] - mean_r).sum() / ((p * r * r).sum(1) - mean_r**2).sum().sqrt()
    assert float(z_rank.abs().max()) < 4 and abs(float(z_sum)) < 4, (z_rank, z_sum)


def test_svdd_greedy_raises_the_reward():
    """alpha = 0: E[c.x] of the returned samples against the base's exact -0.387 (256 rows).

    Measured (seed 0): M = 1: -0.20 (the base sampler, standard error 0.12), M = 4: 4.48, M = 16: 6.63.
    """
    base = float((GMM.weights * (GMM.means @ C)).sum())
    got = {}
    for m in (1, 4, 16):
        out = sd.smc.svdd(
            DEN, linear, 0.0, shape=(256, 2), particles=m, steps=STEPS, solver=SOLVER, generator=gen(0),
            dtype=F64,
        )  # fmt: skip
        got[m] = float(linear(out.sample()).mean())
        assert out.nfe == (STEPS - 1) * m + 1
    assert abs(got[1] - base) < 0.5
    assert base + 4.0 < got[4] < got[16] and got[16] > base + 6.0, got


def test_svdd_weights_and_nfe_accounting():
    """Every candidate is one network evaluation per step, but at node 0, where the one ``x_T`` of a row is
    evaluated once: ``(steps - 1) M + 1`` per row, the rows the net saw (before: ``steps M``, its ``M`` draws
    of ``x_T`` evaluated and all but the first discarded). The final log-weights are softmax(r / alpha)
    of the candidates' rewards (with ``final="none"`` the last candidates differ and are scored as
    they are returned, ``r(x_S)``, with no further evaluation)."""
    seen: list[int] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return DEN.net(x, t)

    den = sd.Denoiser(net, PROC, prediction="x0", shape=(2,))
    alpha, m, steps = 0.5, 6, 10
    kw = dict(shape=(3, 2), particles=m, steps=steps, solver=SOLVER, generator=gen(0), dtype=F64)
    out = sd.smc.svdd(den, linear, alpha, **kw)
    assert out.nfe == 55 == (steps - 1) * m + 1 and sum(seen) == 55 * 3 and seen[0] == 3  # before: 60
    seen.clear()
    out = sd.smc.svdd(den, linear, alpha, final="none", **kw)
    assert out.nfe == 55 and sum(seen) == 55 * 3
    assert torch.allclose(out.reward, linear(out.x.flatten(0, 1)).reshape(3, m), rtol=0, atol=1e-12)
    assert torch.allclose(out.log_w, torch.log_softmax(out.reward / alpha, dim=-1))
    assert out.x[0].unique(dim=0).shape[0] == m


# --- bad input -------------------------------------------------------------------------------------------


def test_bad_input():
    kw = dict(shape=(2, 2), particles=4, steps=5, solver=SOLVER, dtype=F64)
    M = sd.inverse.Matrix(A)
    with pytest.raises(ValueError, match="tds: operator acts on samples of shape"):
        sd.smc.tds(DEN, sd.inverse.Matrix(torch.ones(1, 3, dtype=F64)), Y, noise_std=S, **kw)
    with pytest.raises(ValueError, match="tds: y must have shape"):
        sd.smc.tds(DEN, M, torch.ones(3, dtype=F64), noise_std=S, **kw)
    with pytest.raises(ValueError, match="y holds 3 observations"):
        sd.smc.tds(DEN, M, torch.ones(3, 1, dtype=F64), noise_std=S, **kw)
    for s in (-0.1, 0.0, float("nan"), True):
        with pytest.raises(ValueError, match="noise_std must be a finite number > 0"):
            sd.smc.tds(DEN, M, Y, noise_std=s, **kw)
    with pytest.raises(ValueError, match="noise_std must be a finite number > 0"):
        sd.smc.tds(DEN, M, Y, **kw)  # operator.noise_std = 0
    with pytest.raises(ValueError, match="particles"):
        sd.smc.tds(DEN, M, Y, noise_std=S, **{**kw, "particles": 0})
    for den in (None, "den", DEN.net):  # was "tds: base must be ..." (the measurement wrapper's name)
        with pytest.raises(ValueError, match=r"^tds: den must be a steerdiff Denoiser"):
            sd.smc.tds(den, M, Y, noise_std=S, **kw)
    with pytest.raises(ValueError, match="exactly one likelihood"):
        sd.smc.tds(DEN, **kw)
    with pytest.raises(ValueError, match="exactly one likelihood"):
        sd.smc.tds(DEN, M, Y, noise_std=S, log_likelihood=linear, **kw)
    with pytest.raises(ValueError, match="needs both operator and y"):
        sd.smc.tds(DEN, M, noise_std=S, **kw)
    with pytest.raises(ValueError, match=r"operator must be a steerdiff\.inverse\.LinearOperator"):
        sd.smc.tds(DEN, A, Y, noise_std=S, **kw)
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="twist_scale"):
            sd.smc.tds(DEN, M, Y, noise_std=S, twist_scale=bad, **kw)
        with pytest.raises(ValueError, match="prior_var"):
            sd.smc.tds(DEN, M, Y, noise_std=S, prior_var=bad, **kw)
    with pytest.raises(ValueError, match=r"log_likelihood must map .* \(8,\)"):
        sd.smc.tds(DEN, log_likelihood=lambda x: x, **kw)
    with pytest.raises(ValueError, match="does not depend differentiably"):
        sd.smc.tds(DEN, log_likelihood=lambda x: linear(x.detach()), **kw)
    with pytest.raises(ValueError, match=r"^tds: classifier must be callable: .* got float$"):
        sd.smc.tds(DEN, classifier=1.0, **kw)
    with pytest.raises(ValueError, match=r"^tds: log_likelihood must be callable: .* got str$"):
        sd.smc.tds(DEN, log_likelihood="r", **kw)
    with pytest.raises(ValueError, match="stochastic solver"):
        sd.smc.tds(DEN, M, Y, noise_std=S, **{**kw, "solver": "ddim"})
    with pytest.raises(ValueError, match="needs Gaussian transitions"):
        sd.smc.tds(DEN, M, Y, noise_std=S, **{**kw, "solver": "edm_sde"})
    for alpha in (-1.0, float("nan"), None):
        with pytest.raises(ValueError, match="alpha must be a number >= 0"):
            sd.smc.svdd(DEN, linear, alpha, **kw)
    with pytest.raises(ValueError, match="particles"):
        sd.smc.svdd(DEN, linear, **{**kw, "particles": 0})
    with pytest.raises(ValueError, match="reward must be a callable"):
        sd.smc.svdd(DEN, None, **kw)
    with pytest.raises(ValueError, match="stochastic solver"):
        sd.smc.svdd(DEN, linear, **{**kw, "solver": "dpmpp_2m"})


# --- conditioning and the benchmark's exact answers ------------------------------------------------------


def test_tds_passes_cond_to_the_network_and_the_likelihood():
    """A per-row ``shift`` moves the prior (the net) and the likelihood together: each row's weighted
    mean is its shift plus the unshifted posterior mean of ``p(x) p(c = 0 | x)``."""
    shift = torch.tensor([[0.0, 0.0], [3.0, -2.0]], dtype=F64)
    base = TWO_CLASS.denoiser(PROC)

    def net(x: torch.Tensor, t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        alpha = float(PROC.alpha(float(t.reshape(-1)[0])))
        return base.net(x - alpha * shift, t) + shift

    den = sd.Denoiser(net, PROC, prediction="x0", shape=(2,))
    out = sd.smc.tds(
        den, log_likelihood=lambda x, shift: log_p_class0(x - shift), shape=(2, 2), particles=2048,
        steps=STEPS, solver=SOLVER, generator=gen(6), dtype=F64, shift=shift,
    )  # fmt: skip
    exact = (CLASS0.weights[:, None] * CLASS0.means).sum(0)
    assert float((out.mean() - shift - exact).norm(dim=-1).max()) < 0.15, out.mean() - shift


def test_bench_steer_targets_are_exact():
    """``steerdiff bench steer``'s closed forms: E_pi[r] against a Monte Carlo mean over 2^16 exact target
    samples (4 standard errors), the nine-mode value -0.29072, and pi = p x N(0, Q^{-1}) (the FK
    correctors' product of experts) up to a constant."""
    from steerdiff.bench import steer

    for name in steer.CASES:
        t = steer.make_target(name, n=64)
        r = t.reward(t.target.sample(2**16, gen(9)))
        assert float(r.mean()) == pytest.approx(t.expected_reward, abs=4 * float(r.std()) / 256 + 1e-3), name
        assert t.floor_range[0] <= 1 <= t.floor_range[1]
    t = steer.make_target("nine_quadratic", n=64)
    assert t.expected_reward == pytest.approx(-0.290720, abs=1e-6)
    x = 3 * torch.randn(64, 2, generator=gen(1), dtype=F64)
    gap = t.target.log_prob(x) - t.prior.log_prob(x) - t.expert.log_prob(x)
    assert float(gap.max() - gap.min()) < 1e-9


# --- max_batch: every call and every graph in slices -----------------------------------------------------


class _Box:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _SavedBytes:
    """``saved_tensors_hooks`` that track the bytes saved for backward alive at once (the graphs' memory)."""

    def __init__(self) -> None:
        self.alive = self.peak = 0

    def pack(self, t: torch.Tensor) -> object:
        n = t.numel() * t.element_size()
        self.alive += n
        self.peak = max(self.peak, self.alive)
        box = _Box(t)
        weakref.finalize(box, self._free, n)  # the box lives as long as the graph node that saved it
        return box

    def _free(self, n: int) -> None:
        self.alive -= n


@pytest.mark.parametrize("twist", ["operator", "per_row_y", "log_likelihood", "classifier"])
def test_tds_max_batch_bounds_every_call_and_graph(twist):
    """``max_batch = 5`` for 3 x 4 = 12 particle rows: the network, the twist's ``log_likelihood``,
    ``classifier`` or ``operator`` and every graph differentiated see at most 5 rows (before: the twist
    was called on all 12 rows, and the step's graph through the denoiser held all 12 at once: the tensors
    saved for backward peaked as high as unsliced, 1840 bytes for the operator twist; now 136, a slice's
    network and twist). Row by row the arithmetic is the same (an elementwise network and twists, per-row
    ``shift`` and ``y`` sliced with the rows), so the run is bit for bit the unsliced one, at the same
    NFE (the slice-wise evaluation that the gradient goes through is the step's own)."""
    shift = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-0.5, 0.25]], dtype=F64)
    rows: dict[str, int] = {}

    def seen(name: str, x: torch.Tensor) -> None:
        rows[name] = max(rows.get(name, 0), x.shape[0])

    def net(x: torch.Tensor, t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        seen("net", x)
        return 0.9 * torch.tanh(x - 0.5 * shift) + shift

    class Op(sd.inverse.Matrix):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen("operator", x)
            return super().forward(x)

    def log_likelihood(x0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        seen("log_likelihood", x0)
        return -((x0 - shift - 0.3) ** 2).sum(1)

    def classifier(x: torch.Tensor, t: float, shift: torch.Tensor) -> torch.Tensor:
        seen("classifier", x)
        return -0.5 * ((x - shift) ** 2).sum(1) / (1 + t)

    kw = {
        "operator": {"operator": Op(A), "y": Y, "noise_std": S},
        "per_row_y": {
            "operator": Op(A),
            "y": torch.tensor([[1.0], [-0.5], [0.3]], dtype=F64),
            "noise_std": S,
        },
        "log_likelihood": {"log_likelihood": log_likelihood},
        "classifier": {"classifier": classifier},
    }[twist]
    den = sd.Denoiser(net, PROC, prediction="x0", shape=(2,))

    def run(max_batch: int | None) -> tuple[sd.smc.Particles, int]:
        rows.clear()
        saved = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda box: box.t):
            out = tds(
                den, **kw, shape=(3, 2), particles=4, steps=8, solver="ddpm", ess_threshold=1.0,
                generator=gen(3), dtype=F64, max_batch=max_batch, shift=shift,
            )  # fmt: skip
        return out, saved.peak

    full, full_peak = run(None)
    assert max(rows.values()) == 12
    sliced, sliced_peak = run(5)
    assert max(rows.values()) == 5, rows
    assert set(rows) == {"net", twist if twist in kw else "operator"}
    assert sliced_peak < 0.5 * full_peak, (sliced_peak, full_peak)
    for a, b in ((full.x, sliced.x), (full.log_w, sliced.log_w), (full.trace.log_z, sliced.trace.log_z)):
        assert torch.equal(a, b), float((a - b).abs().max())
    assert bool(full.trace.resampled[:-1].all())  # uneven weights: resampled at every node but the last
    assert sliced.nfe == full.nfe == 8 * 4


@pytest.mark.parametrize("twist", ["classifier", "scale_0", "log_likelihood"])
def test_tds_runs_the_network_with_a_graph_only_for_a_twist_through_it(twist):
    """The classifier twist's gradient is in ``x`` alone and ``twist_scale = 0`` takes none: the step's
    network runs without a graph there (it ran with one, kept until the weights, 1.8x the saved bytes of
    the likelihood twist's in the max_batch test's repro), and the run is bit for bit the same as with
    one (the old path, forced by the ``denoised`` flag)."""
    grads: list[bool] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        grads.append(torch.is_grad_enabled() and x.requires_grad)
        return 0.9 * torch.tanh(x)

    def classifier(x: torch.Tensor, t: float) -> torch.Tensor:
        return -0.5 * ((x - 0.4) ** 2).sum(1) / (1 + t)

    def log_likelihood(x0: torch.Tensor) -> torch.Tensor:
        return -((x0 - 0.3) ** 2).sum(1)

    den = sd.Denoiser(net, PROC, prediction="x0", shape=(2,))
    kw = {
        "classifier": {"classifier": classifier},
        "scale_0": {"classifier": classifier, "twist_scale": 0.0},
        "log_likelihood": {"log_likelihood": log_likelihood},
    }[twist]

    def run() -> sd.smc.Particles:
        grads.clear()
        return sd.smc.tds(
            den, **kw, shape=(2, 2), particles=4, steps=6, solver="ddpm", generator=gen(5), dtype=F64
        )

    out = run()
    assert grads and all(grads) == (twist == "log_likelihood") and any(grads) == all(grads)
    if twist == "classifier":  # the graph path gives the same particles and weights
        tds_module = importlib.import_module("steerdiff.smc.tds")  # sd.smc.tds is the function
        forced = pytest.MonkeyPatch()
        forced.setattr(tds_module._NoisyClassifier, "denoised", True)
        try:
            old = run()
        finally:
            forced.undo()
        assert all(grads)
        for a, b in ((out.x, old.x), (out.log_w, old.log_w), (out.trace.log_z, old.trace.log_z)):
            assert torch.equal(a, b), float((a - b).abs().max())


def test_a_grad_algorithms_propose_reads_the_steps_prediction_in_slices():
    """An algorithm with ``grad`` whose ``log_weight`` makes no prediction and whose ``propose`` reads
    ``ctx.x0``: in slices of ``max_batch`` rows (``log_weight`` before the step) ``propose`` gets the step's
    own prediction, as in one piece: the same particles at the same NFE (since 7aab1e6 it evaluated the
    network a second time at every node, NFE 24 -> 48)."""
    calls = [0]

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += x.shape[0]
        return 0.9 * torch.tanh(x)

    class Pull(sd.smc.SMCAlgorithm):
        grad = True

        def log_weight(self, ctx: sd.smc.StepContext) -> torch.Tensor | None:
            return None if ctx.final else -0.1 * (ctx.x**2).sum(-1)

        def propose(self, ctx: sd.smc.StepContext, base: sd.solvers.Transition) -> sd.solvers.Transition:
            return sd.solvers.Transition(base.mean + 0.01 * ctx.x0.reshape(base.mean.shape), base.std)

    den = sd.Denoiser(net, PROC, prediction="x0", shape=(2,))

    def run(max_batch: int | None) -> sd.smc.Particles:
        calls[0] = 0
        return sd.smc.run_smc(
            den, Pull(), shape=(2, 2), particles=4, steps=6, solver="ddpm", generator=gen(0), dtype=F64,
            max_batch=max_batch,
        )  # fmt: skip

    full = run(None)
    full_rows = calls[0]
    sliced = run(3)
    assert torch.equal(full.x, sliced.x) and torch.equal(full.log_w, sliced.log_w)
    assert sliced.nfe == full.nfe == 6 * 4
    assert calls[0] == full_rows == 6 * 8


@pytest.mark.parametrize("solver", ["ddpm", "euler_ancestral", "ddim"])
@pytest.mark.parametrize("twist", ["operator", "log_likelihood"])
def test_tds_max_batch_hands_an_eps_nets_step_its_own_eps(solver, twist):
    """With an ``eps`` net in slices of ``max_batch`` rows, the step gets the prediction as the net gave it
    (``eps`` held, ``x0`` derived on access), as in one piece: the run is bit for bit the unsliced one (since
    7aab1e6 the twist's read of ``x0`` came with it, and the solvers that read ``eps`` derived it back from
    ``x0``: other rounding, a few ulp off, where it had been bit-identical before)."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # about that of N(0.5, 0.5^2 I) data
        a, s = (c(t.to(F64)).to(x.dtype)[:, None] for c in (PROC.alpha, PROC.sigma))
        return s * (x - 0.5 * a) / (0.25 * a * a + s * s)

    den = sd.Denoiser(eps, PROC, prediction="eps", shape=(2,))
    kw = {
        "operator": {"operator": sd.inverse.Matrix(A), "y": Y, "noise_std": S},
        "log_likelihood": {"log_likelihood": lambda x0: -((x0 - 0.3) ** 2).sum(1)},
    }[twist]
    slv = sd.solvers.DDIM(eta=0.7) if solver == "ddim" else solver

    def run(max_batch: int | None) -> sd.smc.Particles:
        return tds(
            den, **kw, shape=(3, 2), particles=4, steps=7, solver=slv, ess_threshold=1.0, generator=gen(3),
            dtype=F64, max_batch=max_batch,
        )  # fmt: skip

    full, sliced = run(None), run(5)
    for a, b in ((full.x, sliced.x), (full.log_w, sliced.log_w), (full.trace.log_z, sliced.trace.log_z)):
        assert torch.equal(a, b), float((a - b).abs().max())
    assert sliced.nfe == full.nfe == 7 * 4


@pytest.mark.parametrize("max_batch", [None, 3])
def test_tds_classifier_twist_under_inference_mode_says_so(max_batch):
    """The classifier twist takes the classifier's gradient in ``x``: under ``torch.inference_mode()`` a
    ``RuntimeError`` says that mode forbids it, as before 2a8c1ed (since, the step's network runs without
    a graph and the run went on to "classifier does not depend differentiably on x (computed under
    torch.no_grad() ...)", a ValueError blaming the classifier); ``twist_scale = 0`` takes no gradient and
    runs."""
    den = sd.Denoiser(lambda x, t: 0.9 * torch.tanh(x), PROC, prediction="x0", shape=(2,))

    def classifier(x: torch.Tensor, t: float) -> torch.Tensor:
        return -(x**2).sum(1)

    kw = {"shape": (2, 2), "particles": 3, "steps": 4, "generator": gen(0), "max_batch": max_batch}
    with torch.inference_mode():
        forbids = r"^tds differentiates .*which torch\.inference_mode\(\) forbids"
        with pytest.raises(RuntimeError, match=forbids):
            sd.smc.tds(den, classifier=classifier, **kw)
        assert sd.smc.tds(den, classifier=classifier, twist_scale=0.0, **kw).x.shape == (2, 3, 2)


def test_a_net_condition_may_be_named_y_or_operator():
    """``den``, ``operator`` and ``y`` are positional-only: a net whose condition is called ``y`` (a class
    label, as in guided-diffusion's ``model(x, t, y)``) or ``operator`` gets it from ``**cond`` (before: a
    TypeError, multiple values for ``y``). The run is bit for bit that of the net with the condition baked
    in; a keyword observation (``operator=``, ``y=``) with no positional one is refused with the way to
    pass it."""
    seen = []

    def eps(x: torch.Tensor, t: torch.Tensor, mean: float, scale: float) -> torch.Tensor:
        a, s = (c(t.to(F64)).to(x.dtype)[:, None] for c in (PROC.alpha, PROC.sigma))
        return s * (x - mean * a) / (scale * a * a + s * s)

    def net(x: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor, operator: float) -> torch.Tensor:
        seen.append((y, operator))
        return eps(x, t, y[:, None], operator)

    kw = dict(noise_std=S, shape=(2, 2), particles=4, steps=6, solver="ddpm", dtype=F64)
    labels = torch.tensor([0.5, -0.5], dtype=F64)
    conditioned = sd.Denoiser(net, PROC, prediction="eps", shape=(2,))
    out = sd.smc.tds(conditioned, sd.inverse.Matrix(A), Y, y=labels, operator=0.25, generator=gen(4), **kw)
    assert all(torch.equal(y, labels.repeat_interleave(4)) and op == 0.25 for y, op in seen)
    baked = sd.Denoiser(
        lambda x, t: eps(x, t, labels.repeat_interleave(4)[:, None], 0.25), PROC, "eps", shape=(2,)
    )
    ref = sd.smc.tds(baked, sd.inverse.Matrix(A), Y, generator=gen(4), **kw)
    assert torch.equal(out.x, ref.x) and torch.equal(out.log_w, ref.log_w)
    with pytest.raises(
        ValueError, match=r"^tds: give exactly one likelihood: .*positional: tds\(den, operator, y"
    ):
        sd.smc.tds(baked, operator=sd.inverse.Matrix(A), y=Y, generator=gen(4), **kw)
    with pytest.raises(
        ValueError, match=r"^tds: a linear-Gaussian observation needs both .*keyword operator= or y="
    ):
        sd.smc.tds(baked, sd.inverse.Matrix(A), y=Y, generator=gen(4), **kw)


def test_tds_nfe_is_steps_times_particles_times_the_cost():
    """One evaluation per particle and step, of the denoiser's cost (2 for a CFG that guides)."""
    for den, cost in ((DEN, 1), (sd.guidance.CFG(DEN, DEN, 2.0), 2)):
        out = tds(
            den, sd.inverse.Matrix(A), Y, noise_std=S, shape=(2, 2), particles=4, steps=10, solver=SOLVER,
            generator=gen(0), dtype=F64,
        )  # fmt: skip
        assert out.nfe == cost * 10 * 4
