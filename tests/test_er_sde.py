"""ER-SDE-Solver (``er_sde``, Cui et al. 2023): its ODE and SDE ends, convergence of the weights,
exact transitions, and distribution on the Gaussian-mixture oracle."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import Tensor

import steerdiff as sd
from steerdiff.bench.solvers import merged_nodes
from steerdiff.solvers import DDIM, ERSDE, DPMSolverSDEMultistep

from .reference import Replay, assert_keeps_point_marginal, drive, exact_sample, noise, rel_rmse, slope

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the ends of the family -----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [5, 20])
def test_ode_noise_scale_order_1_is_ddim(gmm, sd_process, x_T, steps):
    den = gmm.denoiser(sd_process)
    x = sd.sample(den, x_T, steps, ERSDE(order=1, noise_scale="ode"), "logsnr_uniform", generator=_gen())
    y = sd.sample(den, x_T, steps, DDIM(), "logsnr_uniform")
    assert rel_rmse(x, y) < 1e-12


@pytest.mark.parametrize("steps", [5, 20])
def test_sde_noise_scale_order_1_is_sde_dpmpp_1(gmm, sd_process, x_T, steps):
    # phi(rho) = rho^2: the reverse diffusion SDE; its first-order step is SDE-DPM-Solver++-1
    den = gmm.denoiser(sd_process)
    x = sd.sample(den, x_T, steps, ERSDE(order=1, noise_scale="sde"), "logsnr_uniform", generator=_gen(3))
    y = sd.sample(den, x_T, steps, DPMSolverSDEMultistep(order=1), "logsnr_uniform", generator=_gen(3))
    assert rel_rmse(x, y) < 1e-12


@pytest.mark.parametrize(
    ("solver", "lo", "hi"),
    [
        (ERSDE(order=1, noise_scale="ode"), 0.9, 1.2),
        (ERSDE(order=2, noise_scale="ode"), 1.9, 2.4),
        (ERSDE(order=3, noise_scale="ode"), 2.7, 3.3),
        (ERSDE(order=3, noise_scale="ode", third_order="paper"), 2.0, 2.5),
    ],
    ids=["1", "2", "3", "3-paper"],
)
def test_ode_limit_converges_at_its_order(gmm, sd_process, solver, lo, hi):
    # with phi(rho) = rho the weights W_1, W_2 are those of the data-prediction ODE in rho; measured
    # slopes 1.04, 2.12, 2.90 and 2.30 for the paper's third order (it drops (rho_i - rho_{i-1}) W_1 d_2)
    x_T = noise(4, 8)
    exact, steps = exact_sample(gmm, sd_process, x_T), [10, 14, 20, 28, 40]
    den = gmm.denoiser(sd_process)
    errors = [rel_rmse(sd.sample(den, x_T, n, solver, "logsnr_uniform"), exact) for n in steps]
    assert lo < slope(steps, errors) < hi


def test_quadrature_is_converged(gmm, sd_process, x_T):
    den = gmm.denoiser(sd_process)
    x = sd.sample(den, x_T, 12, ERSDE(), "karras", generator=_gen(1))
    y = sd.sample(den, x_T, 12, ERSDE(quadrature=1024), "karras", generator=_gen(1))
    assert rel_rmse(x, y) < 1e-10


# --- transitions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_transition_reproduces_the_step(gmm, sd_process, order):
    x_T, steps, solver = noise(6, 8), 8, ERSDE(order=order)
    g = _gen(7)
    draws = [torch.randn(x_T.shape, generator=g, dtype=F64) for _ in range(steps)]
    den = gmm.denoiser(sd_process)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("logsnr_uniform"), steps)
    x, outs = drive(solver, den, x_T, grid, draws)
    assert all(isinstance(out, sd.solvers.Transition) and out.std > 0 for out in outs[:-1])
    assert not isinstance(outs[-1], sd.solvers.Transition)  # into the clean end: the estimate
    y = sd.sample(den, x_T, steps, solver, "logsnr_uniform", generator=Replay(draws))
    assert (x - y).abs().max() < 1e-12


@pytest.mark.parametrize("noise_scale", ["default", "ode", "sde", lambda r: r**1.5])
def test_transition_keeps_the_marginal(sd_process, noise_scale):
    assert_keeps_point_marginal(ERSDE(noise_scale=noise_scale), sd_process, "karras")


# --- distribution ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_distribution_at_100_nfe(gmm, sd_process, order):
    n = 2000

    def sw(a: Tensor, b: Tensor) -> float:
        return sd.metrics.sliced_wasserstein(a, b, projections=256, generator=_gen(0))

    floor = sd.metrics.floor(gmm.sample, n, sw, repeats=3, generator=_gen(1))
    x = sd.sample(
        gmm.denoiser(sd_process),
        noise(n, 8, seed=5),
        100,
        ERSDE(order=order),
        "logsnr_uniform",
        generator=_gen(2),
    )
    assert sw(x, gmm.sample(n, _gen(9))) < 1.5 * floor  # measured 1.20, 1.17, 1.17 x floor


def _sharp_problem(process: sd.Process, n: int) -> tuple[sd.toy.GaussianMixture, Tensor, Tensor]:
    """An 8-d, 4-component mixture (stds 0.05-0.5, means 3 N(0, I)) whose marginal at ``t_max`` of
    the SD schedule (alpha = 0.068) is far from N(0, I); ``x_T`` from N(0, I) and from that marginal."""
    base = sd.toy.gmm.default_benchmark_mixture(8, 4, 0)
    gmm = sd.toy.GaussianMixture(3 * base.means, base.variances, base.weights)
    a, s = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
    g = _gen(5)
    return gmm, noise(n, 8, seed=5), a * gmm.sample(n, g) + s * torch.randn(n, 8, generator=g, dtype=F64)


def test_sharp_mixture_bias_is_the_priors(sd_process):
    # From the exact terminal marginal the default solver is unbiased on a sharply multimodal
    # mixture; from N(0, I) the prior's mismatch, which the exact ODE keeps in full, is only partly
    # forgotten: the default noise scale keeps (phi/rho)(rho_end) / (phi/rho)(rho_T) = 0.59 of the
    # ODE's dependence on x_T (the benchmark's er_sde plateau at ~1.9x the floor).
    n = 1000

    def sw(a: Tensor, b: Tensor) -> float:
        return sd.metrics.sliced_wasserstein(a, b, projections=256, generator=_gen(0))

    gmm, x_prior, x_exact = _sharp_problem(sd_process, n)
    floor, ref = sd.metrics.floor(gmm.sample, n, sw, repeats=3, generator=_gen(1)), gmm.sample(n, _gen(9))
    den = gmm.denoiser(sd_process)
    ratio = {
        lab: sw(sd.sample(den, x, 100, ERSDE(), "karras", generator=_gen(2)), ref) / floor
        for lab, x in [("prior", x_prior), ("exact", x_exact)]
    }
    ode = sw(exact_sample(gmm, sd_process, x_prior), ref) / floor
    assert ratio["exact"] < 1.5  # measured 0.98
    assert ode > 2.0 and 0.7 * ode < ratio["prior"] < 0.95 * ode, (ode, ratio)  # 2.44; 2.09


# --- the step-ratio rule, opt-in ------------------------------------------------------------------


@pytest.mark.parametrize("noise_scale", ["default", "sde"])
def test_step_ratio_rule_is_opt_in(gmm, sd_process, noise_scale):
    """Off by default (``max_ratio=inf``: ER-SDE's polynomial is in ``rho``, where the mid-grid steps the rule
    takes in log-SNR are 0.6-2.1 times the one before; bench/longstep_rule_sde.py). With ``max_ratio=2.5`` the
    long step of 12 karras steps with 4 merged at node 8 (4.7 times the one before in lam) is ER-SDE-2's step
    from the same state and estimates, and every other step is as without the rule."""
    den, x_T, steps = gmm.denoiser(sd_process), noise(6, 8), 12
    grid = sd.solvers.make_grid(
        sd_process, sd.schedules.Custom(merged_nodes(sd_process, "karras", 12, 4, 8)), 12
    )
    assert grid.h(7) > 4 * grid.h(6)
    g = _gen(5)
    draws = [torch.randn(x_T.shape, generator=g, dtype=F64) for _ in range(steps)]
    bare, rule = ERSDE(noise_scale=noise_scale), ERSDE(noise_scale=noise_scale, max_ratio=2.5)
    assert ERSDE().max_ratio == math.inf
    _, outs = drive(bare, den, x_T, grid, draws)
    _, ruled = drive(rule, den, x_T, grid, draws)
    for i, (a, b) in enumerate(zip(outs[:7], ruled[:7], strict=True)):
        assert torch.equal(a.mean, b.mean), i
    # step 7 from the state both reached: the rule's is order 2's, the default's order 3
    model, state, x = sd.solvers.Model(den, noise=Replay(draws)), bare.init_state(grid), x_T
    for i in range(7):
        out = bare.step(model, x, i, grid, state)
        x = out.mean + out.std * model.noise(grid.t[i], grid.t[i + 1], out.mean)
    second = ERSDE(order=2, noise_scale=noise_scale).step(model, x, 7, grid, copy.deepcopy(state)).mean
    assert torch.equal(rule.step(model, x, 7, grid, copy.deepcopy(state)).mean, second)
    assert rel_rmse(bare.step(model, x, 7, grid, copy.deepcopy(state)).mean, second) > 1e-3


# --- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda: ERSDE(order=0), "order"),
        (lambda: ERSDE(noise_scale="vp"), "noise_scale"),
        (lambda: ERSDE(third_order="taylor"), "third_order"),
        (lambda: ERSDE(quadrature=7), "quadrature"),
        (lambda: ERSDE(max_ratio=0.5), "max_ratio must be a number >= 1 or inf"),
    ],
)
def test_bad_options(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_noise_scale_must_grow_faster_than_rho(gmm, sd_process, x_T):
    bad = r"^ERSDE: noise_scale: phi\(rho\)/rho must be positive and nondecreasing"  # did not name ERSDE
    with pytest.raises(ValueError, match=bad):
        sd.sample(gmm.denoiser(sd_process), x_T, 5, ERSDE(noise_scale=math.sqrt), "karras", generator=_gen())


@pytest.mark.parametrize("noise_scale", ["default", "sde"])
def test_transition_mean_is_the_papers_integral(gmm, sd_process, noise_scale):
    """The mean against Cui et al. 2023's VP solution taken directly: ``(alpha_t/alpha_s)(phi_t/phi_s) x_s
    + alpha_t phi_t int_{rho_t}^{rho_s} phi'(rho)/phi(rho)^2 P(rho) drho`` with ``P`` the Lagrange polynomial
    through the estimates in ``rho`` (Gauss-Legendre in ``log rho``, no integration by parts), and ``std =
    alpha_t sqrt(rho_t^2 - rho_s^2 phi_t^2/phi_s^2)``; measured to agree to 1e-14."""
    phi, dphi = {
        "default": (
            lambda r: r * (math.exp(r**0.3) + 10),
            lambda r: math.exp(r**0.3) * (1 + 0.3 * r**0.3) + 10,
        ),
        "sde": (lambda r: r * r, lambda r: 2 * r),
    }[noise_scale]
    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(60))
    solver, den = ERSDE(order=3, noise_scale=noise_scale, quadrature=512), gmm.denoiser(sd_process)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("karras"), 10)
    model, state, x = sd.solvers.Model(den), solver.init_state(grid), noise(4, 8)
    ms: list[Tensor] = []
    rhos: list[float] = []
    for i in range(grid.steps - 1):
        out = solver.step(model, x, i, grid, state)
        assert model.last is not None and isinstance(out, sd.solvers.Transition)
        ms, rhos = [model.last.x0, *ms][:3], [grid.sigma[i] / grid.alpha[i], *rhos][:3]
        rs, rt = rhos[0], grid.sigma[i + 1] / grid.alpha[i + 1]
        v = 0.5 * (math.log(rs) - math.log(rt)) * nodes + 0.5 * (math.log(rs) + math.log(rt))
        want = grid.alpha[i + 1] / grid.alpha[i] * phi(rt) / phi(rs) * x
        kept = rhos[: min(3, i + 1, grid.steps - i)]  # warm-up, and lower orders at the last steps
        for j, mj in enumerate(ms[: len(kept)]):
            lag = [math.prod((r - b) / (rhos[j] - b) for b in kept if b != rhos[j]) for r in v.exp().tolist()]
            f = [dphi(r) / phi(r) ** 2 * lg * r for r, lg in zip(v.exp().tolist(), lag, strict=True)]
            integral = (
                0.5 * (math.log(rs) - math.log(rt)) * float((weights * torch.tensor(f, dtype=F64)).sum())
            )
            want = want + grid.alpha[i + 1] * phi(rt) * integral * mj
        assert (out.mean - want).abs().max() < 1e-12
        assert out.std == pytest.approx(
            grid.alpha[i + 1] * math.sqrt(rt**2 - (rs * phi(rt) / phi(rs)) ** 2), rel=1e-12
        )
        x = out.mean


def test_sde_first_order_mean_is_the_exact_conditional_mean(sd_process):
    """With ``phi = rho^2`` (the reverse diffusion SDE) ``x0(x_rho)`` is a martingale along the exact path,
    so ``E[x_t | x_s]`` is ER-SDE-1's mean (the module docstring's caveat): on a Gaussian data law, at
    time_uniform's long last noisy step (``h = 2.07``), slope and intercept to 1e-12; the variance is 1.7-1.9%
    of the exact conditional one (the integral's fluctuation, which orders 2-3 make up from past noise)."""
    mu, v = torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([0.3, 0.8], dtype=F64)
    den = sd.toy.GaussianMixture(mu[None], v[None], torch.ones(1, dtype=F64)).denoiser(sd_process)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("time_uniform"), 20)
    i, solver = 18, ERSDE(order=3, noise_scale="sde")
    a_s, s_s, a_t, s_t = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
    assert grid.h(i) == pytest.approx(2.074, abs=1e-3)
    x = a_s * mu + torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    out = solver.step(sd.solvers.Model(den), x, i, grid, solver.init_state(grid))  # first step: order 1
    assert isinstance(out, sd.solvers.Transition)
    var_s = a_s**2 * v + s_s**2
    cov = a_t * a_s * v + s_t**2 * a_s / a_t  # forward: x_s = (a_s / a_t) x_t + independent noise
    slope = cov / var_s
    torch.testing.assert_close(out.mean[0], a_t * mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.mean[1] - out.mean[0], slope, rtol=0, atol=1e-12)
    ratio = out.std**2 / (a_t**2 * v + s_t**2 - cov * slope)
    torch.testing.assert_close(ratio, torch.tensor([0.0186, 0.0168], dtype=F64), rtol=0, atol=2e-4)
