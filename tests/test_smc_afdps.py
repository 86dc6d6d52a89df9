"""AFDPS (the approximation-free ensemble posterior sampler of Chen et al. 2025) against exact answers.

Exact targets: the posterior of a Gaussian mixture under ``y = A x + s n`` (``GaussianMixture.posterior``),
its evidence ``log p(y) = log E_p[N(y; A x, s^2 I)]`` (``GaussianMixture.tilt_log_normalizer`` of the
likelihood's exponent), and for one Gaussian component the closed-form posterior mean and covariance. The
base sampler is ER-SDE (less noise per step than DDPM: the method's explicit likelihood drift and Euler
weights need ``std^2 |A|^2 / s^2`` small, which DDPM, with more noise per step, reaches at more steps).
"""

from __future__ import annotations

import importlib
import math
import re
import sys

import pytest
import torch

import steerdiff as sd
from steerdiff.metrics import sliced_wasserstein

from .reference import smooth_mixture

F64 = torch.float64
PROC = sd.VP.cosine()
SOLVER = "er_sde"
AFDPS = importlib.import_module("steerdiff.smc.afdps")  # the module (``sd.smc.afdps`` is the function)
S = 0.5
ONE = torch.ones(1, dtype=F64)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def evidence(gmm: sd.toy.GaussianMixture, A: torch.Tensor, y: torch.Tensor, s: float) -> float:
    """``log p(y) = log E[exp(y^T A x / s^2 - |A x|^2 / (2 s^2))] - |y|^2 / (2 s^2) - m/2 log(2 pi s^2)``."""
    tilt = gmm.tilt_log_normalizer(A.T @ y / s**2, A.T @ A / s**2)
    return tilt - float(y @ y) / (2 * s**2) - 0.5 * A.shape[0] * math.log(2 * math.pi * s**2)


def problem(dim: int) -> tuple[sd.toy.GaussianMixture, torch.Tensor, torch.Tensor]:
    """2-d: one observation of ``x_1 + x_2 / 2``; 8-d: three random projections (rows of norm about 1) at the
    first component's mean. ``s = 0.5``: ``|A|^2 / s^2`` is 5.0 and 6.4."""
    if dim == 2:
        return smooth_mixture(dim=2, components=3, seed=0), torch.tensor([[1.0, 0.5]], dtype=F64), ONE
    gmm = smooth_mixture(dim=8, components=4, seed=0)
    A = torch.randn(3, 8, generator=gen(5), dtype=F64) / math.sqrt(8)
    return gmm, A, A @ gmm.means[0]


@pytest.mark.parametrize("dim", [2, 8])
def test_afdps_sliced_wasserstein_falls_with_particles_and_beats_dps(dim):
    """Sliced W of the resampled particles to 2048 exact posterior draws, averaged over 3 batch rows (each an
    independent system), against the floor (exact draws of the same size) and DPS (scale 1) at the same NFE
    (one DPS sample per particle: ``steps * N``); 80 ER-SDE steps.

    Measured (N = 64 / 256 / 1024 / 4096): 2-d 0.181 / 0.132 / 0.101 / 0.050, floor 0.133 / 0.086 / 0.043
    / 0.037, DPS 0.429 at N = 1024; 8-d 0.440 / 0.538 / 0.334 / 0.191, floor 0.144 / 0.077 / 0.053 / 0.039,
    DPS 0.464. The distance falls toward the floor, slowly (in 8-d not monotonically at these N): the Euler
    weights of the reaction term fluctuate at high noise, where the likelihood acts on the noisy state, so the
    resampled system holds far fewer distinct particles than N. At N = 1024 TDS is at 0.062 / 0.084 with its
    linear-Gaussian twist and 0.088 / 0.391 with the noise-conditional twist ``log N(y; A x_t, s^2 I)`` (the
    same intermediate targets, exact discrete weights). N = 4096 runs in 2-d only.
    """
    gmm, A, y = problem(dim)
    post = gmm.posterior(A, y, S)
    ref = post.sample(2048, gen(99))
    den = gmm.denoiser(PROC)
    steps, rows = 80, 3
    dist, floor = {}, {}
    for n in (64, 1024, 4096) if dim == 2 else (64, 1024):
        out = sd.smc.afdps(
            den, sd.inverse.Matrix(A), y, noise_std=S, shape=(rows, dim), particles=n, steps=steps,
            solver=SOLVER, generator=gen(0), dtype=F64,
        )  # fmt: skip
        assert out.nfe == steps * n
        xs = out.resample(sd.smc.systematic(out.log_w, gen(1))).x
        dist[n] = sum(sliced_wasserstein(xs[r], ref) for r in range(rows)) / rows
        floor[n] = sum(sliced_wasserstein(post.sample(n, gen(100 + r)), ref) for r in range(rows)) / rows
    guided = sd.guidance.DPS(den, sd.inverse.Matrix(A), y, noise_std=S)
    x = sd.sample(guided, torch.randn(1024, dim, generator=gen(2), dtype=F64), steps=steps, solver=SOLVER,
                  generator=gen(3))  # fmt: skip
    dps = sliced_wasserstein(x, ref)
    assert dist[1024] < 0.8 * dist[64], dist
    assert dist[1024] < 0.75 * dps, (dist, dps)
    if dim == 2:
        assert dist[4096] < 0.6 * dist[1024] and dist[4096] < 1.6 * floor[4096], (dist, floor)


# --- one Gaussian component: closed-form posterior and evidence ----------------------------------------

M1, V1 = torch.tensor([0.5, -1.0, 0.3], dtype=F64), 0.5
GAUSS = sd.toy.GaussianMixture(M1[None], torch.full((1, 3), V1, dtype=F64), torch.ones(1, dtype=F64))
A1, Y1, S1 = torch.tensor([[1.0, 0.5, 0.0]], dtype=F64), torch.tensor([1.0], dtype=F64), 1.0


def test_afdps_gaussian_posterior_mean_covariance_and_evidence():
    """Gaussian prior ``N(m, 0.5 I)`` in 3-d, one observation ``x_1 + x_2 / 2 = 1`` at ``s = 1``: the weighted
    mean and covariance against the closed form and ``log Z`` against ``log p(y)``, z-tests over 16 rows of
    512 particles, 100 ER-SDE steps (4 standard errors + 0.02).

    Measured: mean error (-0.013, 0.022, 0.022), standard errors 0.02-0.03;
    covariance diagonal error (-0.019, -0.017, -0.012) of (0.346, 0.462, 0.5), standard errors 0.011-0.014;
    log Z error 0.05, standard error 0.11 (log p(y) = -1.469). At 60 steps the observed direction's variance
    is 0.06 (5 standard errors) low: the Euler weights' bias, O(step).
    """
    post = GAUSS.posterior(A1, Y1, S1)
    out = sd.smc.afdps(
        GAUSS.denoiser(PROC), sd.inverse.Matrix(A1), Y1, noise_std=S1, shape=(16, 3), particles=512,
        steps=100, solver=SOLVER, generator=gen(0), dtype=F64,
    )  # fmt: skip
    mean = out.mean()
    dev = out.x - mean[:, None]
    cov = torch.einsum("bn,bni,bnj->bij", out.weights, dev, dev)
    log_z = evidence(GAUSS, A1, Y1, S1)
    for err, tol in (
        (mean - post.means[0], 0.02),
        ((cov - post.covariance_matrices[0]).flatten(1), 0.02),
        ((out.log_z - log_z)[:, None], 0.02),
    ):
        se = err.std(0) / 4
        assert bool((err.mean(0).abs() < 4 * se + tol).all()), (err.mean(0), se)
    assert float((out.log_z - log_z).std()) < 0.6


def test_afdps_two_component_evidence_and_posterior_mean():
    """A 2-d mixture of two unequal components at (-1.5, 0.5) and (1.5, -0.5) (weights 0.3 / 0.7), one
    observation ``x_1 + x_2 / 2 = -1`` at ``s = 1`` (posterior weights 0.75 / 0.25: the prior's minor
    component leads): ``log Z`` against the exact ``log p(y) = -2.005`` and the weighted mean against the
    posterior's, z-tests over 16 rows of 512 particles, 100 ER-SDE steps.

    Measured: log Z error -0.071 (standard error 0.038), mean error (-0.007, -0.029) (standard errors 0.026,
    0.017). At s = 0.5 the weights are rougher (``|A|^2 / s^2 = 5``): log Z is +0.81 +- 0.27 off at 100 steps
    and -0.68 / -1.02 at 200 / 800 (DDPM +8.6 at 100 steps, -2.5 at 800 with 512 particles, -4.4 with 64, -1.7
    +- 0.7 with 4096): the Euler weights' bias falls with the steps, leaving the downward bias of ``log Z`` of
    their heavy-tailed product at a fixed N, which falls slowly with N."""
    gmm = sd.toy.GaussianMixture(
        torch.tensor([[-1.5, 0.5], [1.5, -0.5]], dtype=F64),
        torch.tensor([[0.3, 0.2], [0.2, 0.3]], dtype=F64),
        torch.tensor([0.3, 0.7], dtype=F64),
    )
    A, y = torch.tensor([[1.0, 0.5]], dtype=F64), torch.tensor([-1.0], dtype=F64)
    post = gmm.posterior(A, y, S1)
    out = sd.smc.afdps(
        gmm.denoiser(PROC), sd.inverse.Matrix(A), y, noise_std=S1, shape=(16, 2), particles=512, steps=100,
        solver=SOLVER, generator=gen(0), dtype=F64,
    )  # fmt: skip
    assert abs(float(post.weights[0]) - 0.75) < 0.01
    for err, tol in (
        (out.mean() - post.weights @ post.means, 0.03),
        ((out.log_z - evidence(gmm, A, y, S1))[:, None], 0.05),
    ):
        se = err.std(0) / 4
        assert bool((err.mean(0).abs() < 4 * se + tol).all()), (err.mean(0), se)


def test_evidence_helper_is_the_closed_form():
    """``evidence`` (the tilt) equals ``log N(y; A m, A S A^T + s^2 I)`` for one component."""
    c = A1 @ GAUSS.covariance_matrices[0] @ A1.T + S1**2 * torch.eye(1, dtype=F64)
    exact = float(torch.distributions.MultivariateNormal(A1 @ M1, c).log_prob(Y1))
    assert abs(evidence(GAUSS, A1, Y1, S1) - exact) < 1e-12


def test_afdps_start_is_the_conditioned_gaussian():
    """The first stage draws ``N(0, v0 I) exp(-mu_y)`` exactly (Matheron's rule) and its mass is
    ``log N(y; 0, v0 A A^T + s^2 I)``: moments of 20000 draws against the Gaussian's closed form."""
    A = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=F64)
    y, s, v0 = torch.tensor([1.0, 0.3], dtype=F64), 0.5, 0.8
    obs = AFDPS._Observation(sd.inverse.Matrix(A), y[None], s)
    x = obs.start(torch.randn(1, 20000, 3, generator=gen(1), dtype=F64),
                  torch.randn(1, 20000, 2, generator=gen(2), dtype=F64), v0)[0]  # fmt: skip
    prec = torch.eye(3, dtype=F64) / v0 + A.T @ A / s**2
    cov = torch.linalg.inv(prec)
    mean = cov @ A.T @ y / s**2
    assert torch.allclose(x.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.02)
    c = v0 * A @ A.T + s**2 * torch.eye(2, dtype=F64)
    exact = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), c).log_prob(y)
    assert torch.allclose(obs.log_mass(v0), exact[None], atol=1e-12)


def test_afdps_reproducible_per_seed_and_per_row():
    """The same seed gives the same particles and weights; per-row generators give a row the same result in
    any batch."""
    den = GAUSS.denoiser(PROC)

    def run(rows: int, generator: object) -> sd.smc.Particles:
        return sd.smc.afdps(
            den, sd.inverse.Matrix(A1), Y1, noise_std=S1, shape=(rows, 3), particles=8, steps=20,
            solver=SOLVER, generator=generator, dtype=F64,
        )  # fmt: skip

    a, b = run(2, gen(4)), run(2, gen(4))
    assert torch.equal(a.x, b.x) and torch.equal(a.log_w, b.log_w) and torch.equal(a.log_z, b.log_z)
    assert not torch.equal(a.x, run(2, gen(5)).x)
    pair, one = run(2, [gen(6), gen(7)]), run(1, [gen(7)])
    assert torch.allclose(pair.x[1], one.x[0], atol=1e-12) and torch.allclose(pair.log_w[1], one.log_w[0])


def test_afdps_per_row_observations():
    """``y`` of one observation per batch row: row ``b`` conditions on ``y[b]`` (the same as a run with that
    ``y`` alone, same generator)."""
    den = GAUSS.denoiser(PROC)
    ys = torch.tensor([[1.0], [-0.5]], dtype=F64)

    def run(y: torch.Tensor, rows: int, generator: object) -> sd.smc.Particles:
        return sd.smc.afdps(
            den, sd.inverse.Matrix(A1), y, noise_std=S1, shape=(rows, 3), particles=8, steps=20,
            solver=SOLVER, generator=generator, dtype=F64,
        )  # fmt: skip

    both = run(ys, 2, [gen(1), gen(2)])
    alone = run(ys[1], 1, [gen(2)])
    assert torch.allclose(both.x[1], alone.x[0], atol=1e-12)
    assert torch.allclose(both.log_z[1], alone.log_z[0], atol=1e-12)


def test_bad_input():
    den = GAUSS.denoiser(PROC)
    op = sd.inverse.Matrix(A1)

    def run(operator: object = op, y: object = Y1, **kw: object) -> sd.smc.Particles:
        args = {"noise_std": S1, "shape": (1, 3), "particles": 4, "steps": 20, "solver": SOLVER, **kw}
        return sd.smc.afdps(den, operator, y, **args)

    with pytest.raises(ValueError, match=r"operator must be a steerdiff\.inverse\.LinearOperator"):
        run(A1)
    with pytest.raises(ValueError, match=r"operator acts on samples of shape \(2,\)"):
        run(sd.inverse.Matrix(torch.ones(1, 2, dtype=F64)))
    with pytest.raises(ValueError, match=r"y must have shape \(1,\) \(one observation\) or \(batch"):
        run(y=torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match=r"y must be a floating-point torch\.Tensor"):
        run(y=[1.0])
    with pytest.raises(ValueError, match=r"y contains NaN or inf"):
        run(y=torch.tensor([math.nan], dtype=F64))
    with pytest.raises(ValueError, match=r"noise_std must be"):
        run(noise_std=0.0)
    with pytest.raises(ValueError, match=r"noise_std must be"):
        run(noise_std=None)  # the operator's own noise_std is 0
    with pytest.raises(ValueError, match=r"particles must be an integer >= 1"):
        run(particles=0)
    with pytest.raises(ValueError, match=r"final must be one of"):
        run(final="clean")
    with pytest.raises(ValueError, match=r"afdps needs a stochastic solver"):
        run(solver="ddim")
    # a sharp observation on a coarse grid: refused at the first step, before the weights go wrong
    with pytest.raises(
        ValueError, match=r"steps=20: the step from node 0 .* std\^2 \|A\|\^2 / s\^2 = .* >= 1"
    ):
        run(noise_std=0.1, steps=20)


def test_afdps_refusal_names_a_step_count_that_passes():
    """The refusal of ``std^2 |A|^2 / s^2 >= 1`` names the argument to change and a step count: a run with it
    (s = 0.1, DDPM: 2164 steps from a refusal at 20, where the first step's ratio is 54.1; at 1353 steps node
    50's is 1.0) is accepted."""
    den = GAUSS.denoiser(PROC)

    def run(steps: int) -> sd.smc.Particles:
        return sd.smc.afdps(
            den, sd.inverse.Matrix(A1), Y1, noise_std=0.1, shape=(1, 3), particles=2, steps=steps,
            solver="ddpm", generator=gen(0), dtype=F64,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"pass steps >= (\d+)") as info:
        run(20)
    steps = int(re.search(r"pass steps >= (\d+)", str(info.value)).group(1))
    assert 2000 < steps < 2500, steps
    assert run(steps).nfe == 2 * steps


class _EntrywiseStd(sd.solvers.ERSDE):
    """ER-SDE whose Gaussian steps give ``std`` as a tensor of the particles' shape (the same values)."""

    def step(self, model, x, i, grid, state):
        out = super().step(model, x, i, grid, state)
        if isinstance(out, sd.solvers.Transition) and isinstance(out.std, float) and out.std > 0:
            return sd.solvers.Transition(out.mean, torch.full_like(out.mean, out.std))
        return out


def test_afdps_entrywise_std_is_the_scalar_case():
    """A step's ``std`` given per entry weights by ``sum_j std_j^2 (g_j^2 - (A^T A)_jj / s^2) / 2``: with
    every entry equal, the run of the scalar ``std`` to round-off (the diagonal sums to the trace)."""
    den = GAUSS.denoiser(PROC)
    A = torch.tensor([[1.0, 0.5, 0.0], [0.3, -0.2, 0.8]], dtype=F64)
    y = torch.tensor([1.0, 0.2], dtype=F64)

    def run(solver: sd.solvers.Solver) -> sd.smc.Particles:
        return sd.smc.afdps(
            den, sd.inverse.Matrix(A), y, noise_std=S1, shape=(2, 3), particles=16, steps=20, solver=solver,
            generator=gen(3), dtype=F64,
        )  # fmt: skip

    scalar, entrywise = run(sd.solvers.ERSDE()), run(_EntrywiseStd())
    assert torch.allclose(scalar.x, entrywise.x, atol=1e-10)
    assert torch.allclose(scalar.log_w, entrywise.log_w, atol=1e-10)
    assert torch.allclose(scalar.log_z, entrywise.log_z, atol=1e-10)


def test_afdps_entrywise_std_is_read_on_the_host_once():
    """A step's ``std`` given per entry (a tensor: DDPM's learned variance) is not read on the host at every
    step, a device sync per step on a GPU (was 19 reads in 20 steps): the steps' maxima are read once, at the
    last node, where a step with ``std^2 |A|^2 / s^2 >= 1`` is refused, named as the scalar case names it."""
    reads: list[str] = []
    host = {torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist}

    class Reads(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in host:
                frame = sys._getframe(1)
                if frame.f_code.co_filename == AFDPS.__file__:
                    reads.append(frame.f_code.co_name)
            return func(*args, **(kwargs or {}))

    def run(s: float, solver: sd.solvers.Solver) -> sd.smc.Particles:
        return sd.smc.afdps(
            GAUSS.denoiser(PROC), sd.inverse.Matrix(A1), Y1, noise_std=s, shape=(2, 3), particles=8, steps=20,
            solver=solver, generator=gen(0), dtype=F64,
        )  # fmt: skip

    with Reads():
        run(S1, _EntrywiseStd())
    assert [r for r in reads if r in ("propose", "log_weight")] == ["log_weight"], reads
    messages = []
    for solver in (sd.solvers.ERSDE(), _EntrywiseStd()):
        with pytest.raises(
            ValueError, match=r"steps=20: the step from node 0 \(t = 0.9946\) has .* = 55 >= 1"
        ) as e:
            run(0.1, solver)
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_afdps_nfe_is_steps_times_particles_times_the_cost():
    """One evaluation per particle and step, of the denoiser's cost (2 for a CFG that guides)."""
    den = GAUSS.denoiser(PROC)
    for d, cost in ((den, 1), (sd.guidance.CFG(den, den, 2.0), 2)):
        out = sd.smc.afdps(
            d, sd.inverse.Matrix(A1), Y1, noise_std=S1, shape=(2, 3), particles=4, steps=10, solver=SOLVER,
            generator=gen(0), dtype=F64,
        )  # fmt: skip
        assert out.nfe == cost * 10 * 4
