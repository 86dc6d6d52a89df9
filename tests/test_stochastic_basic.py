"""DDPM, DDIM(eta), Euler ancestral and Euler-Maruyama: exact laws on Gaussian data, the mixture's
distribution, transitions, diffusers parity under the same noise, and bad input.

Gaussian data (Pierret & Galerne 2024, "Diffusion models for Gaussian distributions: exact
solutions and Wasserstein errors"): for ``x0 ~ N(mu, diag(v))`` the exact denoiser is affine, so
every step maps ``x -> A x + b + s z`` coordinate-wise and the sampler's output law is the
Gaussian obtained by propagating mean and variance through the steps. ``A, b, s`` are read off the
solver's own transition at ``x = 0`` and ``x = 1``; the propagated law is checked against the
truth (its error must shrink at first order with the steps), and the samples of ``sd.sample``
against the truth at many steps (Monte Carlo).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import steerdiff as sd
from steerdiff.integrations.diffusers_ref import run_scheduler
from steerdiff.metrics import floor, sliced_wasserstein
from steerdiff.solvers import Model, Transition, make_grid

from .reference import (
    PARITY_BOUND,
    Record,
    diffusers_sample,
    eps_net,
    nodes_of,
    noise,
    rel_rmse,
    sd_betas_config,
    slope,
)
from .test_solvers_basic import _vp_scale

F64 = torch.float64

SOLVERS = {
    "ddpm": sd.solvers.DDPM,
    "euler_maruyama": sd.solvers.EulerMaruyama,
    "ddim_eta0.5": functools.partial(sd.solvers.DDIM, eta=0.5),
    "ddim_eta1": functools.partial(sd.solvers.DDIM, eta=1.0),
    "dpm_2_ancestral": functools.partial(sd.solvers.get, "dpm_2_ancestral"),
    "dpmpp_2s_ancestral": functools.partial(sd.solvers.get, "dpmpp_2s_ancestral"),
}


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


# --- exact laws on Gaussian data ----------------------------------------------------------------

MU = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64)
VAR = torch.tensor([0.25, 1.0, 2.0, 0.5], dtype=F64)
GAUSS = sd.toy.GaussianMixture(MU[None], VAR[None], torch.ones(1, dtype=F64))


def propagate(solver: sd.solvers.Solver, process, steps: int, mean, var) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact output law ``N(mean, diag(var))`` of ``steps`` steps from ``N(mean, diag(var))``
    (``final="none"``, time-uniform nodes) with the exact denoiser of the Gaussian data."""
    grid = make_grid(process, sd.schedules.get("time_uniform"), steps, final="none")
    model, state = Model(GAUSS.denoiser(process)), solver.init_state(grid)
    basis = torch.stack([torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)])
    for i in range(grid.steps):
        out = solver.step(model, basis, i, grid, state)
        m, s = (out.mean, out.std) if isinstance(out, Transition) else (out, 0.0)
        a = m[1] - m[0]
        mean, var = a * mean + m[0], a * a * var + s**2
    return mean, var


def w2_gauss(m1, v1, m2, v2) -> float:
    """W2 between diagonal Gaussians."""
    return float(((m1 - m2) ** 2 + (v1.sqrt() - v2.sqrt()) ** 2).sum().sqrt())


@pytest.mark.parametrize("name", SOLVERS)
def test_gaussian_law_converges_to_the_truth(sd_process, name):
    # started from the exact marginal at t_max, the only error is the discretisation's; the truth
    # is the marginal N(alpha mu, alpha^2 v + sigma^2) at t_min. Measured W2 at 10/50/200 steps:
    # ddpm = ddim(1) 0.38/0.11/0.033, euler_maruyama 0.13/0.024/0.0066, ddim(0.5) 0.27/0.067/0.018,
    # dpm_2_ancestral 0.20/0.022/0.0032 and dpmpp_2s_ancestral 0.15/0.021/0.0032 (slopes 1.37, 1.29)
    p = sd_process
    a_T, s_T, a_0, s_0 = (float(c) for c in (p.alpha(p.t_max), p.sigma(p.t_max), p.alpha(0), p.sigma(0)))
    steps = [10, 50, 200]
    errors = [
        w2_gauss(
            *propagate(SOLVERS[name](), p, n, a_T * MU, a_T**2 * VAR + s_T**2),
            a_0 * MU,
            a_0**2 * VAR + s_0**2,
        )
        for n in steps
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.04
    assert slope(steps, errors) > 0.75  # first order: measured 0.81 (ddpm) .. 0.99 (euler_maruyama)


@pytest.mark.parametrize("name", SOLVERS)
def test_gaussian_samples_reach_the_exact_marginal(sd_process, name):
    # end to end through sd.sample and a torch.Generator, against the truth: 4000 samples in 4-d
    # started from the exact marginal at t_max; after 500 steps mean and variance are the exact
    # marginal N(alpha mu, alpha^2 v + sigma^2) at t_min within 4.5 standard errors. The
    # discretisation bias is at most 1.3 standard errors here (DDPM's variance). Measured max |z|
    # 2.6 (mean) and 2.2 (variance), at most 3.1 over 8 seeds (dpm_2_ancestral, dpmpp_2s_ancestral:
    # 2.3 and 0.98); dropping the noise, scaling its std
    # by sqrt(2) or 2, using the variance as std or reusing one draw for every step gives z > 34.
    p, n = sd_process, 4000
    a_T, s_T, a_0, s_0 = (float(c) for c in (p.alpha(p.t_max), p.sigma(p.t_max), p.alpha(0), p.sigma(0)))
    g = torch.Generator().manual_seed(0)
    x_T = a_T * MU + (a_T**2 * VAR + s_T**2).sqrt() * torch.randn(n, 4, generator=g, dtype=F64)
    x = sd.sample(
        GAUSS.denoiser(p),
        x_T,
        steps=500,
        solver=SOLVERS[name](),
        schedule="time_uniform",
        final="none",
        generator=g,
    )
    mean, var = a_0 * MU, a_0**2 * VAR + s_0**2
    assert ((x.mean(0) - mean).abs() / (var / n).sqrt()).max() < 4.5
    assert ((x.var(0) - var).abs() / (var * math.sqrt(2 / n))).max() < 4.5


# --- the mixture's distribution at 100 NFE ------------------------------------------------------


@pytest.mark.parametrize("schedule", ["time_uniform", "karras_jump"])
def test_mixture_within_1_5x_of_the_floor(gmm, sd_process, schedule):
    # mean sliced W2 over 5 independent sets of 2000 samples, against the same for two exact sets.
    # Measured ratios (4 seeds): ddpm = ddim(1) = euler_ancestral 1.04-1.25, euler_maruyama 0.98-1.17
    n, repeats = 2000, 5

    def metric(x: torch.Tensor, y: torch.Tensor) -> float:
        return sliced_wasserstein(x, y, projections=128, generator=torch.Generator().manual_seed(7))

    base = floor(gmm.sample, n, metric, repeats=repeats, generator=torch.Generator().manual_seed(100))
    den = gmm.denoiser(sd_process)
    for solver in ("ddpm", "euler_maruyama", "euler_ancestral", sd.solvers.DDIM(eta=1.0)):
        g = torch.Generator().manual_seed(0)
        dist = 0.0
        for _ in range(repeats):
            x_T = torch.randn(n, gmm.dim, generator=g, dtype=F64)
            x = sd.sample(den, x_T, steps=100, solver=solver, schedule=schedule, generator=g)
            dist += metric(x, gmm.sample(n, g)) / repeats
        assert dist < 1.5 * base, (solver, dist, base)


@pytest.mark.parametrize(
    "solver", ["dpmpp_3m_sde", sd.solvers.SASolver(order=3, corrector_order=3), "sa_solver"], ids=str
)
def test_multistep_sde_keeps_the_variance_over_a_long_last_step(gmm, sd_process, solver):
    """time_uniform's last noisy step (to t_min) is ~3.6 times the one before in log-SNR; extrapolating
    the noisy estimates' differences over it inflated the variance: samples / true 2.85 (dpmpp_3m_sde),
    3.52 (SA-Solver p3c3), 1.20 (sa_solver) at 50 steps. The default long-step rule (first order
    there): 0.99 for each. 8192 draws of the exact p_T; one standard error of the mean ratio ~0.006."""
    p, n = sd_process, 8192
    g = torch.Generator().manual_seed(1)
    x_T = float(p.alpha(p.t_max)) * gmm.sample(n, g) + float(p.sigma(p.t_max)) * torch.randn(
        n, gmm.dim, generator=g, dtype=F64
    )
    x = sd.sample(gmm.denoiser(p), x_T, steps=50, solver=solver, schedule="time_uniform", generator=g)
    var = gmm.sample(200_000, torch.Generator().manual_seed(2)).var(0)
    assert float((x.var(0) / var).mean()) == pytest.approx(1.0, abs=0.04)


def test_mixture_metric_has_teeth(gmm, sd_process):
    # the same check fails for DDPM at 4 steps (too few for the variance): measured 3.3x the floor
    n = 2000
    g = torch.Generator().manual_seed(0)

    def metric(x: torch.Tensor, y: torch.Tensor) -> float:
        return sliced_wasserstein(x, y, projections=128, generator=torch.Generator().manual_seed(7))

    base = floor(gmm.sample, n, metric, repeats=5, generator=torch.Generator().manual_seed(100))
    x = sd.sample(
        gmm.denoiser(sd_process),
        torch.randn(n, gmm.dim, generator=g, dtype=F64),
        steps=4,
        solver="ddpm",
        schedule="time_uniform",
        generator=g,
    )
    assert metric(x, gmm.sample(n, g)) > 2 * base


# --- transitions and identities -----------------------------------------------------------------


def _learned_variance_denoiser(gmm, process) -> sd.Denoiser:
    """The exact eps model with a learned-variance channel ``r = tanh(x)``."""
    net = eps_net(gmm, process)
    return sd.Denoiser(lambda x, t: torch.cat([net(x, t), torch.tanh(x)], 1), process, learned_variance=True)


@pytest.mark.parametrize(
    "solver",
    ["ddpm", "ddpm_large", "ddpm_learned", "euler_maruyama", "euler_ancestral", "ddim_eta0.5", "ddim_eta1.5"],
)
def test_transition_reproduces_the_step(gmm, sd_process, solver):
    den = (
        _learned_variance_denoiser(gmm, sd_process) if solver == "ddpm_learned" else gmm.denoiser(sd_process)
    )
    slv = {
        "ddpm_large": sd.solvers.DDPM(variance="fixed_large"),
        "ddpm_learned": sd.solvers.DDPM(),
        "ddim_eta0.5": sd.solvers.DDIM(eta=0.5),
        "ddim_eta1.5": sd.solvers.DDIM(eta=1.5),
    }.get(solver, solver)
    slv = sd.solvers.get(slv)
    x_T, replay, xs = noise(3, 8), Record(4), []
    _, info = sd.sample(
        den,
        x_T,
        steps=8,
        solver=slv,
        schedule="logsnr_uniform",
        generator=replay,
        callback=lambda s: xs.append(s["x"]),
        return_info=True,
    )
    grid, state, model = info.grid, slv.init_state(info.grid), Model(den)
    prev, draws = x_T, iter(replay.drawn)
    for i, x_next in enumerate(xs):
        out = slv.step(model, prev, i, grid, state)
        if i == grid.steps - 1:  # into the clean end: the denoised estimate, no noise
            assert isinstance(out, torch.Tensor)
            assert torch.allclose(out, x_next, rtol=0, atol=1e-12)
        else:
            assert isinstance(out, Transition)
            if solver == "ddpm_learned":  # per-element std between beta~ and beta
                assert isinstance(out.std, torch.Tensor) and out.std.shape == prev.shape
            assert torch.allclose(out.mean + out.std * next(draws), x_next, rtol=0, atol=1e-12)
        prev = x_next
    assert next(draws, None) is None and len(replay.drawn) == grid.steps - 1


@pytest.mark.parametrize("eta", [0.5, 1.0, 2.0])
def test_euler_ancestral_is_ddim_eta(gmm, sd_process, eta):
    # the same algorithm in k-diffusion's variables (with eta > 1 both cap the noise at sigma_{i+1})
    den, x_T = gmm.denoiser(sd_process), noise(4, 8)
    kw = {"steps": 20, "schedule": "karras_jump"}
    ea = sd.sample(den, x_T, solver=sd.solvers.EulerAncestral(eta=eta), generator=Record(1), **kw)
    ddim = sd.sample(den, x_T, solver=sd.solvers.DDIM(eta=eta), generator=Record(1), **kw)
    assert torch.allclose(ea, ddim, rtol=0, atol=1e-10)
    if eta == 1.0:  # ... and DDPM's posterior
        ddpm = sd.sample(den, x_T, solver="ddpm", generator=Record(1), **kw)
        assert torch.allclose(ddpm, ddim, rtol=0, atol=1e-12)


def test_ddim_eta0_is_deterministic_ddim(gmm, sd_process):
    den, x_T = gmm.denoiser(sd_process), noise(4, 8)
    assert not sd.solvers.DDIM().stochastic and sd.solvers.DDIM(eta=0.3).stochastic
    a = sd.sample(den, x_T, steps=10, solver=sd.solvers.DDIM(eta=0.0), generator=Record(0))
    assert torch.equal(a, sd.sample(den, x_T, steps=10, solver="ddim"))


# --- parity with diffusers under the same noise ----------------------------------------------------


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_matches_diffusers(diffusers, gmm, sd_process, x_T, steps, variance):
    # diffusers draws one randn of the sample's shape per step except at t = 0 (the step into the
    # clean end), as we do: the same seeded generator replays the same noise. Measured 5.9e-7..7.5e-7.
    sched = diffusers.DDPMScheduler(**sd_betas_config(variance_type=variance, clip_sample=False))
    if variance == "learned_range":
        den = _learned_variance_denoiser(gmm, sd_process)
        ref, nfe = run_scheduler(sched, den.net, x_T, steps, torch.Generator().manual_seed(3))
        solver = sd.solvers.DDPM()
    else:
        den = gmm.denoiser(sd_process)
        ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps, torch.Generator().manual_seed(3))
        solver = sd.solvers.DDPM(variance=variance)
    x, info = sd.sample(
        den,
        x_T,
        steps=steps,
        solver=solver,
        schedule=nodes_of(sched),
        generator=torch.Generator().manual_seed(3),
        return_info=True,
    )
    assert info.nfe == nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["DDPMScheduler"]
    # and the noise is what makes the run: another seed is far
    other = sd.sample(
        den,
        x_T,
        steps=steps,
        solver=solver,
        schedule=nodes_of(sched),
        generator=torch.Generator().manual_seed(4),
    )
    assert rel_rmse(other, ref) > 1e-2


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_ancestral_matches_diffusers(diffusers, gmm, sd_process, x_T, steps, spacing):
    # diffusers steps x / alpha in float32 and draws one randn per step; measured 4e-7..2.3e-6
    # (linspace at 25 steps has fractional timesteps, where it interpolates sigma linearly)
    sched = diffusers.EulerAncestralDiscreteScheduler(**sd_betas_config(timestep_spacing=spacing))
    scale = _vp_scale(sched, steps)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T * scale, steps, torch.Generator().manual_seed(3))
    x, info = sd.sample(
        gmm.denoiser(sd_process),
        x_T,
        steps=steps,
        solver="euler_ancestral",
        schedule=nodes_of(sched),
        generator=torch.Generator().manual_seed(3),
        return_info=True,
    )
    assert info.nfe == nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["EulerAncestralDiscreteScheduler"]


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_matches_diffusers(diffusers, gmm, sd_process, x_T, eta):
    sched = diffusers.DDIMScheduler(
        **sd_betas_config(clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    )
    sched.step = functools.partial(sched.step, eta=eta)
    ref, _ = diffusers_sample(sched, gmm, sd_process, x_T, 20, torch.Generator().manual_seed(3))
    x = sd.sample(
        gmm.denoiser(sd_process),
        x_T,
        steps=20,
        solver=sd.solvers.DDIM(eta=eta),
        schedule=nodes_of(sched),
        generator=torch.Generator().manual_seed(3),
    )
    assert rel_rmse(x, ref) < PARITY_BOUND["DDIMScheduler(eta)"]


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: sd.solvers.DDIM(eta=-0.1), ["eta", ">= 0", "got -0.1"]),
        (lambda: sd.solvers.DDIM(eta=float("nan")), ["eta", "got nan"]),
        (lambda: sd.solvers.EulerAncestral(eta=-1.0), ["eta", ">= 0", "got -1.0"]),
        (
            lambda: sd.solvers.DDPM(variance="learned"),
            ["DDPM: variance", "'learned'", "fixed_small", "fixed_large"],
        ),
    ],
)
def test_bad_solver_options(make, words):
    with pytest.raises(ValueError) as err:
        make()
    assert all(w in str(err.value) for w in words), str(err.value)


def test_learned_variance_net_with_wrong_channels(gmm, sd_process):
    net = eps_net(gmm, sd_process)
    den = sd.Denoiser(net, sd_process, learned_variance=True)  # returns C, not 2C channels
    with pytest.raises(ValueError, match=r"net returned shape \(2, 8\), expected \(2, 16\)"):
        sd.sample(den, noise(2, 8), steps=4, solver="ddpm")

    # the other way round, a 2C net without learned_variance=True: the message names the option (it said
    # only "net returned shape (2, 16), expected (2, 8)"), and the 2C net with it is sd.sample's C one
    def twice(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x, t), torch.zeros_like(x)], 1)

    with pytest.raises(ValueError, match=r"expected \(2, 8\) \(twice the channels: .*learned_variance=True"):
        sd.sample(sd.Denoiser(twice, sd_process), noise(2, 8), steps=4)
    right = sd.Denoiser(twice, sd_process, learned_variance=True)
    plain = sd.Denoiser(net, sd_process)
    assert torch.equal(sd.sample(right, noise(2, 8), 4), sd.sample(plain, noise(2, 8), 4))
    with pytest.raises(ValueError, match=r"expected \(2, 8\)$"):  # other shapes: no hint
        sd.sample(sd.Denoiser(lambda x, t: net(x, t)[:, :4], sd_process), noise(2, 8), steps=4)


def test_euler_maruyama_takes_the_slope_of_the_segment_it_crosses():
    """On ``VP.discrete`` ``lam`` is piecewise linear between integer timesteps, so ``d alpha / dt`` jumps
    at the nodes; a reverse step from ``t_i`` down must use the segment below ``t_i``. It used the one
    above: on the 999 unit steps of SD's betas, data ``N(0.7, 0.3)``, the exact output mean was off the
    marginal at ``t_min`` by 1.5e-3 (relative 2.1e-3), now 1.5e-5; the variance by 5.8e-3, now 2.9e-3
    (the law is exact: the run is affine in ``(x_T, z)``)."""
    from .test_guidance_cfg import affine_law

    m, v, steps = 0.7, 0.3, 999
    law = sd.toy.GaussianMixture(
        torch.tensor([[m]], dtype=F64), torch.tensor([[v]], dtype=F64), torch.ones(1)
    )
    process = sd.VP.scaled_linear()
    grid = make_grid(process, sd.schedules.get("time_uniform"), steps, "none")
    assert grid.t[1] == grid.t[0] - 1  # every step one segment

    def run(x: torch.Tensor, z) -> torch.Tensor:
        return sd.sample(
            law.denoiser(process), x, steps, "euler_maruyama", "time_uniform", final="none", generator=z
        )

    mean, var = affine_law(run, steps)
    a, s = grid.alpha[-1], grid.sigma[-1]
    assert abs(float(mean) - a * m) < 5e-5, float(mean) - a * m
    assert abs(float(var) / (a * a * v + s * s) - 1) < 4e-3, float(var) / (a * a * v + s * s) - 1
