"""The gradient-estimation sampler of Permenter & Yuan (ICML 2024), ``gradient_estimation``: the paper's
update written out in its variance-exploding variables, the same path on every process, its special cases
(``gamma = 1`` is DDIM, ``gamma = 1.5`` iPNDM's second order), its error against the exact ODE solution
beside DDIM and DPM-Solver++(2M) at the same NFE, and its NFE."""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers import IPNDM, GradientEstimation, make_grid

from .reference import exact_sample, noise, rel_rmse, slope

# --- the paper's update -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [2.0, 3.0])
@pytest.mark.parametrize("schedule", ["logsnr_uniform", "time_uniform"])
def test_is_the_papers_update(gmm, sd_process, schedule, gamma):
    """The update in ``y = x / alpha``, ``s = sigma / alpha`` (the paper's ``x`` and ``sigma``): ``y_1 =
    y_0 + (s_1 - s_0) eps_0``, then ``y_{i+1} = y_i + (s_{i+1} - s_i) (gamma eps_i + (1 - gamma)
    eps_{i-1})``, each ``eps`` evaluated once."""
    x_T, steps = noise(4, 8), 12
    den = gmm.denoiser(sd_process)
    grid = make_grid(sd_process, sd.schedules.get(schedule), steps, final="none")
    s = [sg / a for a, sg in zip(grid.alpha, grid.sigma, strict=True)]
    y, eps_before = x_T / grid.alpha[0], None
    for i in range(steps):
        eps = den(y * grid.alpha[i], grid.t[i]).eps
        direction = eps if eps_before is None else gamma * eps + (1 - gamma) * eps_before
        y, eps_before = y + (s[i + 1] - s[i]) * direction, eps
    ours = sd.sample(den, x_T, steps, GradientEstimation(gamma=gamma), schedule, final="none")
    assert rel_rmse(ours, y * grid.alpha[-1]) < 1e-12  # measured 2.1e-16 .. 5.1e-16


def test_every_process_takes_the_same_path(gmm):
    """On the same ``s = sigma / alpha`` nodes with ``x_T`` scaled by ``c = sqrt(alpha^2 + sigma^2)``, EDM
    and rectified flow end at the VP result times ``c`` there (the path is the VE one's, scaled)."""
    vp, steps = sd.VP.scaled_linear(), 10
    grid = make_grid(vp, sd.schedules.get("logsnr_uniform"), steps, final="none")
    s = [sg / a for a, sg in zip(grid.alpha, grid.sigma, strict=True)]
    x_T = noise(4, 8)

    def run(process: sd.Process, times: list[float]) -> torch.Tensor:
        a, sg = (float(c) for c in (process.alpha(times[0]), process.sigma(times[0])))
        a_end, sg_end = (float(c) for c in (process.alpha(times[-1]), process.sigma(times[-1])))
        x = sd.sample(
            gmm.denoiser(process),
            x_T * math.hypot(a, sg),
            steps,
            "gradient_estimation",
            sd.schedules.Custom(times),
            final="none",
        )
        return x / math.hypot(a_end, sg_end)

    ref = run(vp, grid.t)
    assert rel_rmse(run(sd.EDM(), s), ref) < 1e-11  # measured 8.5e-16, 8.7e-16
    assert rel_rmse(run(sd.RectifiedFlow(), [v / (1 + v) for v in s]), ref) < 1e-11


def test_gamma_1_is_ddim_and_gamma_1_5_is_ipndm_order_2(gmm, sd_process):
    den, x_T = gmm.denoiser(sd_process), noise(4, 8)
    for schedule in ("karras", "time_uniform"):
        ddim = sd.sample(den, x_T, 12, "ddim", schedule)
        assert torch.equal(sd.sample(den, x_T, 12, GradientEstimation(gamma=1.0), schedule), ddim)
        ab2 = sd.sample(den, x_T, 12, IPNDM(order=2), schedule)
        gamma_1_5 = sd.sample(den, x_T, 12, GradientEstimation(gamma=1.5), schedule)
        assert rel_rmse(gamma_1_5, ab2) < 1e-13  # measured 4.2e-16, 1.3e-15


# --- accuracy against the exact ODE solution --------------------------------------------------------------

STEPS = [5, 7, 10, 14, 20, 28, 40, 56]


@pytest.mark.parametrize("schedule", ["logsnr_uniform", "karras"])
def test_error_against_ddim_and_dpmpp_2m(gmm, sd_process, schedule):
    """Relative RMSE to the exact ODE solution (4 samples of the 8-d mixture, SD's betas), 5 .. 56 steps
    (one NFE each for all three). Measured on logsnr_uniform: gradient_estimation 0.0739 / 0.0701 / 0.0686
    / 0.0599 / 0.0483 / 0.0379 / 0.0285 / 0.0213, ddim 0.300 / 0.214 / 0.147 / 0.103 / 0.0706 / 0.0498 /
    0.0345 / 0.0245, dpmpp_2m 0.0904 / 0.0427 / 0.0231 / 0.0117 / 0.00556 / 0.00276 / 0.00132 / 0.000659;
    on karras 0.0634 .. 0.0210, ddim 0.293 .. 0.0235, dpmpp_2m 0.0959 .. 0.00106. Slope over 14 .. 56 steps
    0.75 / 0.78 (ddim 1.03, dpmpp_2m 2.07 / 2.17): first order, with DDIM's error constant in the limit
    (``gamma = 2`` overshoots the step's mean ``eps`` by what DDIM's ``eps_i`` undershoots it), 0.22-0.51x
    DDIM's error at 5 .. 10 steps, 0.58-0.89x at 14 .. 56. Ahead of dpmpp_2m only at 5 steps (0.82x /
    0.66x) and on karras at 7 (0.96x); 1.6-32x behind it from 10 steps (from 7 on logsnr_uniform)."""
    den, x_T = gmm.denoiser(sd_process), noise(4, 8)
    exact = exact_sample(gmm, sd_process, x_T)
    errors = {
        name: [rel_rmse(sd.sample(den, x_T, n, name, schedule), exact) for n in STEPS]
        for name in ("gradient_estimation", "ddim", "dpmpp_2m")
    }
    ge, ddim, dpmpp = errors["gradient_estimation"], errors["ddim"], errors["dpmpp_2m"]
    long = STEPS[3:]
    assert 0.6 < slope(long, ge[3:]) < 0.95 and abs(slope(long, ddim[3:]) - 1) < 0.1, errors
    assert all(a < 0.55 * b for a, b in zip(ge[:3], ddim[:3], strict=True)), errors
    assert all(0.5 * b < a < 0.92 * b for a, b in zip(ge[3:], ddim[3:], strict=True)), errors
    assert ge[0] < 0.85 * dpmpp[0] and all(a > 1.5 * b for a, b in zip(ge[2:], dpmpp[2:], strict=True)), (
        errors
    )


# --- NFE, options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("final", ["zero", "none"])
def test_one_evaluation_per_step(gmm, sd_process, final):
    _, info = sd.sample(
        gmm.denoiser(sd_process), noise(2, 8), 7, "gradient_estimation", final=final, return_info=True
    )
    assert info.nfe == 7 == info.solver.nfe(7, clean_end=final == "zero")
    assert isinstance(info.solver, GradientEstimation) and info.solver.gamma == 2.0


@pytest.mark.parametrize("gamma", [math.nan, math.inf, "2", True])
def test_bad_gamma_is_refused_by_name(gamma):
    with pytest.raises(ValueError, match=r"GradientEstimation: gamma must be a finite number, got"):
        GradientEstimation(gamma=gamma)
