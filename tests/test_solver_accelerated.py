"""The accelerated samplers of Li et al. (ICML 2024), ``accel_ddim`` and ``accel_ddpm``: the authors' update
rules written out on a VP process, the same trajectory on every process, the deterministic one's second order
against the exact ODE solution and its lead over DDIM, the stochastic one's exact output law on Gaussian data
against DDPM's, NFE, noise ranges and particle methods.

Gaussian data: the exact denoiser is affine, so every step maps ``x -> A x + b`` plus noise coordinate-wise
and the output law is the Gaussian propagated through the steps (as in ``test_stochastic_basic.py``); the
step's coefficients are read off the solver's own step at ``x = 0, 1`` with the noise set to 0 or 1.
"""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers import AcceleratedDDIM, AcceleratedDDPM, Model, Transition, make_grid

from .reference import Replay, exact_sample, noise, rel_rmse, slope

F64 = torch.float64


def _eps(den: sd.Denoiser, x: torch.Tensor, t: float) -> torch.Tensor:
    return den(x, t).eps


# --- the authors' update rules on VP ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["logsnr_uniform", "time_uniform"])
def test_accel_ddim_is_the_authors_eq_5(gmm, sd_process, schedule):
    """README Eq. 5 of github.com/TimofeyEfimov/AcceleratedDiffusionSamplers in ``abar`` (alphas_cumprod),
    step ``t -> t - 1`` from ``X(abar_t)`` with the estimate ``eps_{t+1}`` of the step before (none at the
    first step: DDIM)."""
    x_T, steps = noise(4, 8), 12
    den = gmm.denoiser(sd_process)
    grid = make_grid(sd_process, sd.schedules.get(schedule), steps, final="none")
    abar = [a * a for a in grid.alpha]
    x, eps_before = x_T, None
    for i in range(steps):
        a_t, a_prev = abar[i], abar[i + 1]  # abar_t, abar_{t-1}
        eps = _eps(den, x, grid.t[i])
        out = (
            x / math.sqrt(a_t / a_prev)
            + (math.sqrt(1 - a_prev) - math.sqrt(1 - a_t) * math.sqrt(a_prev / a_t)) * eps
        )
        if eps_before is not None:
            a_next = abar[i - 1]  # abar_{t+1}
            c = (
                a_t * math.sqrt((1 - a_prev) / a_prev)
                + math.asin(math.sqrt(a_prev))
                - a_t * math.sqrt((1 - a_t) / a_t)
                - math.asin(math.sqrt(a_t))
            )
            out = out + math.sqrt(a_prev) / (a_t - a_next) * c * (eps_before - eps)
        x, eps_before = out, eps
    ours = sd.sample(den, x_T, steps, solver="accel_ddim", schedule=schedule, final="none")
    assert rel_rmse(ours, x) < 1e-12  # measured 1.1e-15 / 7.4e-16


def test_accel_ddpm_is_the_papers_phi_psi(gmm, sd_process):
    """``Y_t^+ = Y_t + sqrt((1 - alpha_t) / 2) Z_t``, ``Y_{t-1} = (Y_t^+ + (1 - alpha_t) s_t(Y_t^+)) /
    sqrt(alpha_t) + sqrt((1 - alpha_t) / 2) Z_t^+`` with ``s_t = -eps / sqrt(1 - abar_t)``, the same draws."""
    x_T, steps = noise(4, 8), 10
    g = torch.Generator().manual_seed(7)
    draws = [torch.randn(4, 8, generator=g, dtype=F64) for _ in range(2 * steps)]
    den = gmm.denoiser(sd_process)
    grid = make_grid(sd_process, sd.schedules.get("logsnr_uniform"), steps, final="none")
    abar = [a * a for a in grid.alpha]
    y = x_T
    for i in range(steps):
        alpha = abar[i] / abar[i + 1]
        y_plus = y + math.sqrt((1 - alpha) / 2) * draws[2 * i]
        score = -_eps(den, y_plus, grid.t[i]) / math.sqrt(1 - abar[i])
        y = (y_plus + (1 - alpha) * score) / math.sqrt(alpha) + math.sqrt((1 - alpha) / 2) * draws[2 * i + 1]
    source = Replay(draws)
    ours = sd.sample(
        den, x_T, steps, solver="accel_ddpm", schedule="logsnr_uniform", final="none", generator=source
    )
    assert source.calls == 2 * steps
    assert rel_rmse(ours, y) < 1e-12  # measured 2.0e-15


@pytest.mark.parametrize("name", ["accel_ddim", "accel_ddpm"])
def test_every_process_takes_the_same_path(gmm, name):
    """A process is the VP one with the same ``s = sigma / alpha``, scaled by ``c = sqrt(alpha^2 +
    sigma^2)``: on the same ``s`` nodes with ``x_T`` scaled alike (and the same draws), EDM and rectified flow
    end at the VP result times ``c`` there."""
    vp, steps = sd.VP.scaled_linear(), 10
    grid = make_grid(vp, sd.schedules.get("logsnr_uniform"), steps, final="none")
    s = [sg / a for a, sg in zip(grid.alpha, grid.sigma, strict=True)]
    x_T = noise(4, 8)
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(4, 8, generator=g, dtype=F64) for _ in range(2 * steps)]

    def run(process: sd.Process, times: list[float]) -> torch.Tensor:
        a, sg = (float(c) for c in (process.alpha(times[0]), process.sigma(times[0])))
        a_end, sg_end = (float(c) for c in (process.alpha(times[-1]), process.sigma(times[-1])))
        x = sd.sample(
            gmm.denoiser(process),
            x_T * math.hypot(a, sg),
            steps,
            solver=name,
            schedule=sd.schedules.Custom(times),
            final="none",
            generator=Replay(draws),
        )
        return x / math.hypot(a_end, sg_end)

    ref = run(vp, grid.t)
    assert rel_rmse(run(sd.EDM(), s), ref) < 1e-11  # measured 5.6e-16 .. 1.1e-15
    assert rel_rmse(run(sd.RectifiedFlow(), [v / (1 + v) for v in s]), ref) < 1e-11


# --- accel_ddim: second order, ahead of DDIM --------------------------------------------------------------

STEPS = [14, 20, 28, 40, 56]


@pytest.mark.parametrize("schedule", ["logsnr_uniform", "karras"])
def test_accel_ddim_is_second_order_and_ahead_of_ddim(gmm, sd_process, schedule):
    """Relative RMSE to the exact ODE solution (4 samples, SD's betas). Measured on logsnr_uniform / karras
    at 14 .. 56 steps: accel_ddim 1.94e-2 .. 1.48e-3 / 2.15e-2 .. 1.71e-3 (slopes 1.86 / 1.83), ddim 0.103 ..
    0.0245 / 0.0982 .. 0.0235 (slopes 1.03 / 1.03): 5.3-16.5x / 4.6-13.7x the error of accel_ddim at the
    same NFE."""
    den, x_T = gmm.denoiser(sd_process), noise(4, 8)
    exact = exact_sample(gmm, sd_process, x_T)
    errors = {
        name: [rel_rmse(sd.sample(den, x_T, n, solver=name, schedule=schedule), exact) for n in STEPS]
        for name in ("accel_ddim", "ddim")
    }
    assert abs(slope(STEPS, errors["accel_ddim"]) - 2) < 0.35, errors
    assert abs(slope(STEPS, errors["ddim"]) - 1) < 0.35, errors
    assert all(a < b / 3 for a, b in zip(errors["accel_ddim"], errors["ddim"], strict=True)), errors


def test_accel_ddim_order_1_is_ddim(gmm, sd_process):
    den, x_T = gmm.denoiser(sd_process), noise(4, 8)
    ddim = sd.sample(den, x_T, 8, solver="ddim")
    assert torch.equal(sd.sample(den, x_T, 8, solver=AcceleratedDDIM(order=1)), ddim)


# --- accel_ddpm: the exact output law on Gaussian data ------------------------------------------------------

MU = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64)
VAR = torch.tensor([0.25, 1.0, 2.0, 0.5], dtype=F64)
GAUSS = sd.toy.GaussianMixture(MU[None], VAR[None], torch.ones(1, dtype=F64))


def _constant(*values: float):
    """A noise source whose ``k``-th draw is ``values[k]`` everywhere."""
    left = list(values)
    return lambda t_from, t_to, like: torch.full_like(like, left.pop(0))


def _law(
    solver: sd.solvers.Solver, process: sd.Process, steps: int
) -> tuple[float, tuple[torch.Tensor, ...]]:
    """W2 from the exact marginal at ``t_min`` of the output law of ``steps`` ``logsnr_uniform`` steps
    (``final="none"``) started from the exact marginal at ``t_max``, and that law ``(mean, var)``."""
    grid = make_grid(process, sd.schedules.get("logsnr_uniform"), steps, final="none")
    den, state = GAUSS.denoiser(process), solver.init_state(grid)
    mean, var = grid.alpha[0] * MU, grid.alpha[0] ** 2 * VAR + grid.sigma[0] ** 2
    basis = torch.stack([torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)])
    for i in range(steps):
        out = solver.step(Model(den, noise=_constant(0.0, 0.0)), basis, i, grid, state)
        m, std = (out.mean, out.std) if isinstance(out, Transition) else (out, 0.0)
        gain, shift = m[1] - m[0], m[0]
        noise_var = torch.full_like(mean, std**2)
        if not isinstance(out, Transition):  # noise drawn inside: each draw's weight at x = 0
            for one in ((1.0, 0.0), (0.0, 1.0)):
                noise_var += (
                    solver.step(Model(den, noise=_constant(*one)), basis, i, grid, state)[0] - shift
                ) ** 2
        mean, var = gain * mean + shift, gain**2 * var + noise_var
    true_mean, true_var = grid.alpha[-1] * MU, grid.alpha[-1] ** 2 * VAR + grid.sigma[-1] ** 2
    w2 = float(((mean - true_mean) ** 2 + (var.sqrt() - true_var.sqrt()) ** 2).sum().sqrt())
    return w2, (mean, var)


@pytest.mark.parametrize("process", [sd.VP.scaled_linear(), sd.EDM(), sd.RectifiedFlow()], ids=str)
def test_accel_ddpm_law_is_closer_than_ddpm_s_at_the_same_rate(process):
    """Exact W2 of the output law, 10 / 20 / 40 / 80 logsnr_uniform steps. Measured: SD betas accel_ddpm
    0.243 / 0.139 / 0.0747 / 0.0387 against ddpm's 0.471 / 0.265 / 0.141 / 0.0728 (0.517-0.532 of it); EDM
    0.353 .. 0.0651 against 0.688 .. 0.121 (0.514-0.536); rectified flow 0.411 .. 0.0832 against 0.806 ..
    0.156 (0.510-0.535). Both first order (slopes 0.89 / 0.90, 0.82 / 0.84, 0.77 / 0.79): a constant factor,
    not a faster rate, in this metric (the paper's rates are upper bounds in TV; on Gaussian data both
    samplers' errors are first order)."""
    steps = [10, 20, 40, 80]
    accel = [_law(AcceleratedDDPM(), process, n)[0] for n in steps]
    ddpm = [_law(sd.solvers.DDPM(), process, n)[0] for n in steps]
    assert all(0.4 < a / b < 0.6 for a, b in zip(accel, ddpm, strict=True)), (accel, ddpm)
    assert 0.65 < slope(steps, accel) < 1.2, accel


def test_ddpm_with_the_forward_variance_is_closer_on_sd_betas(sd_process):
    """``DDPM(variance="fixed_large")`` (the forward step's variance, the paper's DDPM) is closer than
    accel_ddpm on SD's betas: measured 0.129 / 0.0652 / 0.0327 / 0.0164 at 10 / 20 / 40 / 80 steps (not on
    EDM: 1.66 at 10 steps against 0.353)."""
    for n in (10, 20, 40, 80):
        large = _law(sd.solvers.DDPM(variance="fixed_large"), sd_process, n)[0]
        assert large < 0.6 * _law(AcceleratedDDPM(), sd_process, n)[0]


def test_accel_ddpm_samples_follow_the_propagated_law(sd_process):
    """4000 samples through ``sd.sample`` (20 steps from the exact marginal at ``t_max``) against the law the
    step coefficients give (the propagation above): mean and variance within 4.5 standard errors (measured
    max |z| 1.4 and 0.82). Dropping the pre-noise or the post-noise moves the variance by 19 and 28
    standard errors."""
    n, steps = 4000, 20
    _, (mean, var) = _law(AcceleratedDDPM(), sd_process, steps)
    g = torch.Generator().manual_seed(0)
    a_T, s_T = float(sd_process.alpha(sd_process.t_max)), float(sd_process.sigma(sd_process.t_max))
    x_T = a_T * MU + (a_T**2 * VAR + s_T**2).sqrt() * torch.randn(n, 4, generator=g, dtype=F64)
    x = sd.sample(
        GAUSS.denoiser(sd_process),
        x_T,
        steps,
        solver="accel_ddpm",
        schedule="logsnr_uniform",
        final="none",
        generator=g,
    )
    assert ((x.mean(0) - mean).abs() / (var / n).sqrt()).max() < 4.5
    assert ((x.var(0) - var).abs() / (var * math.sqrt(2 / n))).max() < 4.5


# --- NFE, particles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("final", ["zero", "none"])
@pytest.mark.parametrize("name", ["accel_ddim", "accel_ddpm"])
def test_one_evaluation_per_step(gmm, sd_process, name, final):
    _, info = sd.sample(
        gmm.denoiser(sd_process),
        noise(2, 8),
        7,
        solver=name,
        final=final,
        generator=torch.Generator().manual_seed(0),
        return_info=True,
    )
    assert info.nfe == 7 == info.solver.nfe(7, clean_end=final == "zero")


def test_particle_methods(gmm, sd_process):
    """FK steering runs on the accelerated stochastic sampler (with ``lam = 0`` no weight moves); TDS, which
    needs each step's Gaussian density given its start, refuses it (the pre-noise passes through the net)."""
    den = gmm.denoiser(sd_process)
    reward = lambda x: x.sum(-1)  # noqa: E731
    kw = {
        "shape": (2, 8),
        "particles": 4,
        "steps": 6,
        "solver": "accel_ddpm",
        "x_T": noise(8, 8).reshape(2, 4, 8),
    }
    out = sd.smc.fk_steering(den, reward, 0.0, generator=torch.Generator().manual_seed(0), **kw)
    assert out.nfe == 4 * 6 and torch.equal(out.log_w, torch.full((2, 4), -math.log(4), dtype=F64))
    with pytest.raises(ValueError, match="needs Gaussian transitions"):
        sd.smc.tds(
            den,
            sd.inverse.Matrix(torch.eye(8, dtype=F64)[:2]),
            torch.zeros(2, 2, dtype=F64),
            noise_std=0.1,
            **kw,
        )


@pytest.mark.parametrize("name", sd.solvers.available())
def test_order_error_names_the_accepted_orders(name):
    """Every registered solver's bad ``order`` names the orders it takes: a one-order solver said
    ``order must be an integer in [1, 1]`` (``AcceleratedDDPM(order=3)``), now ``order must be 1``."""
    solver = sd.solvers.get(name)
    if not hasattr(solver, "max_order"):
        pytest.skip(f"{name} has no order field")
    cls, top = type(solver), solver.max_order
    accepted = "1" if top == 1 else rf"an integer in \[1, {top}\]"
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: order must be {accepted}, got {top + 1}$"):
        cls(order=top + 1)


def test_accel_ddpm_order_error():
    with pytest.raises(ValueError, match=r"^AcceleratedDDPM: order must be 1, got 3$"):
        AcceleratedDDPM(order=3)
