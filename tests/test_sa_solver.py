"""SA-Solver: parity with diffusers' SASolverScheduler on replayed noise, ``tau = 0`` reductions to
UniPC-bh1 and DDIM, the exposed transition, and the sampled law at >= 100 NFE."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import steerdiff as sd
from steerdiff.bench.solvers import merged_nodes
from steerdiff.solvers.base import SDE_MAX_H, SDE_MAX_H_RATIO

from .reference import (
    F64,
    PARITY_BOUND,
    Record,
    Replay,
    diffusers_sample,
    nodes_of,
    noise,
    rel_rmse,
    sd_betas_config,
)

DIFFUSERS_TAU = lambda t: 1.0 if 200 <= t <= 800 else 0.0  # noqa: E731  (diffusers' default tau_func)


def _sasolver64(diffusers, process: sd.Process):
    """diffusers' SASolverScheduler with its sigmas recomputed in float64 from ``process``."""

    class SASolver64(diffusers.SASolverScheduler):
        def set_timesteps(self, *args, **kwargs) -> None:
            super().set_timesteps(*args, **kwargs)
            t = [*self.timesteps.tolist(), 0]  # the last step ends at t = 0 (noisy)
            self.sigmas = (process.sigma(t) / process.alpha(t)).to(F64)

    return SASolver64


@pytest.mark.parametrize("float64", [False, True])
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize(("p", "q"), [(2, 2), (3, 4), (1, 1), (4, 3)])
def test_parity_with_diffusers(gmm, sd_process, steps, p, q, float64):
    diffusers = pytest.importorskip("diffusers")
    x_T = noise(8, 8)
    lof = steps < 15  # diffusers lowers the last orders at any step count, steerdiff below 15
    cls = _sasolver64(diffusers, sd_process) if float64 else diffusers.SASolverScheduler
    sched = cls(**sd_betas_config(), predictor_order=p, corrector_order=q, lower_order_final=lof)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps, torch.Generator().manual_seed(3))
    # diffusers draws one normal per step, even where tau = 0: replay those draws where we use one
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(x_T.shape, generator=g, dtype=F64) for _ in range(steps)]
    grid_t = [*nodes_of(sched).grid.tolist(), 0.0]  # steps + 1 nodes ending at t = 0: final="none"
    taus = [DIFFUSERS_TAU(t) for t in grid_t[:-1]]
    # diffusers keeps the full order on the grid's last step (to t = 0, ~3.6 times the one before in
    # log-SNR at 20 steps), which our default long-step rule takes at first order: switched off here
    solver = sd.solvers.SASolver(
        order=p, corrector_order=q, tau=DIFFUSERS_TAU, second_order="sasolver", lower_order_final=lof,
        max_h=math.inf, max_h_ratio=0.0,
    )  # fmt: skip
    x, info = sd.sample(
        gmm.denoiser(sd_process),
        x_T,
        steps=steps,
        solver=solver,
        schedule=sd.schedules.Custom(grid_t),
        final="none",
        generator=Replay([z for z, tau in zip(draws, taus, strict=True) if tau > 0]),
        return_info=True,
    )
    assert info.nfe == nfe == steps
    # float32 sigmas (diffusers' own): measured 3e-7 - 1.9e-5 (3-4 at 20 steps); float64: 3.7e-16 - 2.8e-14
    assert rel_rmse(x, ref) < PARITY_BOUND["SASolverScheduler(float64)" if float64 else "SASolverScheduler"]


@pytest.mark.parametrize("schedule", ["logsnr_uniform", "karras_jump"])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_tau_zero_is_unipc_bh1(gmm, sd_process, p, schedule):
    x_T = noise(4, 8)
    den = gmm.denoiser(sd_process)
    for steps in (6, 20):
        sa = sd.solvers.SASolver(order=p, corrector_order=p + 1, tau=0.0, second_order="sasolver")
        uni = sd.solvers.UniPC(order=p, variant="bh1")
        x = sd.sample(den, x_T, steps=steps, solver=sa, schedule=schedule, generator=torch.Generator())
        y = sd.sample(den, x_T, steps=steps, solver=uni, schedule=schedule)
        assert torch.allclose(x, y, rtol=0, atol=1e-12)
        sa = sd.solvers.SASolver(order=p, corrector_order=0, tau=0.0, second_order="sasolver")
        uni = sd.solvers.UniPC(order=p, variant="bh1", corrector=False)
        x = sd.sample(den, x_T, steps=steps, solver=sa, schedule=schedule)
        y = sd.sample(den, x_T, steps=steps, solver=uni, schedule=schedule)
        assert torch.allclose(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [2, 3])
def test_tau_zero_is_unipc_bh1_with_the_sde_long_step_rules(gmm, sd_process, p):
    # 30 time_uniform steps end with a long step: SA-Solver's default long-step rule (SDE_MAX_H) and UniPC's
    # (ODE_MAX_H) differ there, so tau = 0 is UniPC-bh1 with SA-Solver's rules only
    x_T, den = noise(4, 8), gmm.denoiser(sd_process)
    sa = sd.solvers.SASolver(order=p, corrector_order=p + 1, tau=0.0, second_order="sasolver")
    x = sd.sample(den, x_T, steps=30, solver=sa, schedule="time_uniform")
    rules = {"max_h": SDE_MAX_H, "max_h_ratio": SDE_MAX_H_RATIO}
    y = sd.sample(
        den, x_T, steps=30, solver=sd.solvers.UniPC(order=p, variant="bh1", **rules), schedule="time_uniform"
    )
    assert torch.allclose(x, y, rtol=0, atol=1e-12)
    # with its own defaults UniPC is another solver there (measured 0.10 / 0.056 apart)
    z = sd.sample(
        den, x_T, steps=30, solver=sd.solvers.UniPC(order=p, variant="bh1"), schedule="time_uniform"
    )
    assert rel_rmse(x, z) > 0.02


@pytest.mark.parametrize("corrector", [True, False])
def test_tau_zero_is_unipc_bh1_with_defaults_over_a_long_mid_grid_step(gmm, sd_process, corrector):
    """40 logsnr_uniform steps with 3 intervals merged at node 19: a step 3 times the one before, 0.46 in lam,
    under both solvers' max_h (0.5 and 2), so only the step-ratio rule (max_ratio, default 2.5 in both) makes
    its prediction second order (and the corrector of its end third). tau = 0 with order 3 is then UniPC-bh1
    with each one's defaults; without the rule in SA-Solver (max_ratio=inf, its default before) it is not
    (measured 1.7e-3 with the corrector, 1.1e-2 without, apart, relative)."""
    x_T, den = noise(4, 8), gmm.denoiser(sd_process)
    nodes = merged_nodes(sd_process, "logsnr_uniform", 40, 3, 19)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.Custom(nodes), 40, "zero")
    assert 2.9 < grid.h(18) / grid.h(17) < 3.1 and grid.h(18) < SDE_MAX_H
    sa = sd.solvers.SASolver(order=3, corrector_order=4 if corrector else 0, tau=0.0, second_order="sasolver")
    x = sd.sample(den, x_T, steps=40, solver=sa, schedule=nodes)
    y = sd.sample(den, x_T, 40, sd.solvers.UniPC(order=3, variant="bh1", corrector=corrector), nodes)
    assert torch.allclose(x, y, rtol=0, atol=1e-12)
    z = sd.sample(den, x_T, 40, dataclasses.replace(sa, max_ratio=math.inf), nodes)
    assert rel_rmse(z, y) > 5e-4


@pytest.mark.parametrize("second_order", ["exact", "sasolver"])
def test_tau_zero_first_order_predictor_is_ddim(gmm, sd_process, second_order):
    x_T = noise(4, 8)
    den = gmm.denoiser(sd_process)
    sa = sd.solvers.SASolver(order=1, corrector_order=0, tau=0.0, second_order=second_order)
    x = sd.sample(den, x_T, steps=12, solver=sa, schedule="time_uniform")
    y = sd.sample(den, x_T, steps=12, solver="ddim", schedule="time_uniform")
    assert torch.allclose(x, y, rtol=0, atol=1e-12)


def test_exact_three_node_predictor_is_dpmpp_3m_step(gmm, sd_process):
    # with three estimates the exact weights are DPM-Solver++(3M)'s exact third-order step
    x_T = noise(4, 8)
    den = gmm.denoiser(sd_process)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("logsnr_uniform"), 8)
    sa, dp = (
        sd.solvers.SASolver(order=3, corrector_order=0, tau=0.0),
        sd.solvers.DPMSolverPPMultistep(order=3),
    )
    m1, m2 = sd.solvers.Model(den), sd.solvers.Model(den)
    s1, s2 = sa.init_state(grid), dp.init_state(grid)
    x = x_T
    for i in range(3):  # steps 0, 1 warm up (differently at 2 estimates); compare step 2 from the same x
        y1 = sa.step(m1, x, i, grid, s1)
        y2 = dp.step(m2, x, i, grid, s2)
        x = y2
    assert torch.allclose(y1, y2, rtol=0, atol=1e-12)


def test_transition_is_the_step_law(gmm, sd_process):
    """``sd.sample`` = manual steps with ``mean + std z`` on the recorded noise; first-order ``tau = 1``
    against the closed form ``e^{-h} (sigma_t/sigma_s) x + alpha_t (1 - e^{-2h}) x0``,
    ``std = sigma_t sqrt(1 - e^{-2h})``."""
    x_T = noise(4, 8)
    den = gmm.denoiser(sd_process)
    rec = Record(5)
    solver = sd.solvers.SASolver(order=2, corrector_order=3)
    x, info = sd.sample(
        den, x_T, steps=9, solver=solver, schedule="logsnr_uniform", generator=rec, return_info=True
    )
    grid, model, state, y = info.grid, sd.solvers.Model(den), solver.init_state(info.grid), x_T
    draws = [z for _, z in rec.log]
    for i in range(grid.steps):
        out = solver.step(model, y, i, grid, state)
        if isinstance(out, sd.solvers.Transition):
            h = grid.h(i)
            assert out.std == pytest.approx(grid.sigma[i + 1] * math.sqrt(1 - math.exp(-2 * h)), rel=1e-14)
            y = out.mean + out.std * draws.pop(0)
        else:
            y = out
    assert not draws
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)  # the sampler adds std z fused, torch.add(alpha=std)

    first = sd.solvers.SASolver(order=1, corrector_order=0)
    x0 = den(x_T, grid.t[0]).x0
    out = first.step(sd.solvers.Model(den), x_T, 0, grid, first.init_state(grid))
    h, a, s, s0 = grid.h(0), grid.alpha[1], grid.sigma[1], grid.sigma[0]
    assert torch.allclose(out.mean, math.exp(-h) * s / s0 * x_T + a * (1 - math.exp(-2 * h)) * x0, atol=1e-13)
    assert out.std == pytest.approx(s * math.sqrt(1 - math.exp(-2 * h)), rel=1e-14)


@pytest.mark.parametrize("solver", ["sa_solver", sd.solvers.SASolver(order=3, corrector_order=3)])
def test_sliced_w2_at_100_nfe_is_near_the_floor(gmm, sd_process, solver):
    n = 2000
    x_T = torch.randn(n, 8, generator=torch.Generator().manual_seed(11), dtype=F64)
    x, info = sd.sample(
        gmm.denoiser(sd_process),
        x_T,
        steps=100,
        solver=solver,
        schedule="logsnr_uniform",
        generator=torch.Generator().manual_seed(12),
        return_info=True,
    )
    assert info.nfe == 100
    ref = gmm.sample(n, torch.Generator().manual_seed(13))
    sw = sd.metrics.sliced_wasserstein(x, ref, projections=256, generator=torch.Generator().manual_seed(0))
    floor = sd.metrics.floor(
        lambda k, g: gmm.sample(k, g),
        n,
        lambda a, b: sd.metrics.sliced_wasserstein(a, b, 256, torch.Generator().manual_seed(0)),
        repeats=3,
    )
    assert sw < 1.5 * floor, (sw, floor)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"order": 5}, ["order", "[1, 4]", "got 5"]),
        ({"corrector_order": 5}, ["corrector_order", "[0, 4]", "got 5"]),
        ({"corrector_order": 1.0}, ["corrector_order", "got 1.0"]),
        ({"tau": -0.5}, ["tau", "-0.5"]),
        ({"second_order": "taylor"}, ["SASolver: second_order", "got 'taylor'", "'exact'", "'sasolver'"]),
    ],
)
def test_bad_options(kwargs, words):
    with pytest.raises(ValueError) as err:
        sd.solvers.SASolver(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_tau_function(gmm, sd_process):
    solver = sd.solvers.SASolver(tau=lambda t: -1.0)
    with pytest.raises(ValueError, match="tau"):
        sd.sample(gmm.denoiser(sd_process), noise(2, 8), steps=4, solver=solver, generator=torch.Generator())
