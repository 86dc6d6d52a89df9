"""Deterministic inversion (``sd.invert``): the probability-flow ODE integrated up the sampling grid.

Exact answer: the ODE from ``x_0`` at the grid's last node ``t_N`` to its first ``t_0``,
``gmm.reference_ode(x_0, process, t_start=t_N, t_end=t_0)`` on the Gaussian-mixture oracle (itself checked
against the closed form of a Gaussian). Reference implementations: diffusers'
``DPMSolverMultistepInverseScheduler`` (the same algorithm: parity to float32) and ``DDIMInverseScheduler``
(a lagged variant: the same only for a net whose ``eps`` does not depend on ``t``).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import steerdiff as sd
from steerdiff.guidance import CFG
from steerdiff.solvers import DDIM, DEIS, IPNDM, LMS, DPMSolver, DPMSolverPPMultistep, Euler, Heun, UniPC

from .reference import PARITY_BOUND, eps_net, rel_rmse, sd_betas_config, slope
from .test_guidance_cfg import NULL, labelled, two_class

F64 = torch.float64


@pytest.fixture(scope="module")
def x_0(gmm):
    return gmm.sample(16, generator=torch.Generator().manual_seed(5))


def _exact(gmm, process, x_0, grid):
    """The exact inversion over ``grid`` (a reversed grid: ``t`` increasing)."""
    return gmm.reference_ode(x_0, process, t_start=grid.t[0], t_end=grid.t[-1])


# --- the oracle runs up the noise levels ------------------------------------------------------------


@pytest.mark.parametrize("s", [5.0, None], ids=["t=5", "clean"])
def test_reference_ode_runs_up_the_noise_levels(sd_process, s):
    """For Gaussian data N(m, v) the flow maps ``x_s`` to ``alpha_t m + sqrt(alpha_t^2 v + sigma_t^2)
    (x_s - alpha_s m) / sqrt(alpha_s^2 v + sigma_s^2)`` in either direction: reference_ode from t = 5 up
    to t = 900 matches it to 1e-9, and from the clean state (``t_start=None``: ``alpha_s = 1``,
    ``sigma_s = 0``, where diffusers' DDIMInverseScheduler starts by default) too."""
    g = torch.Generator().manual_seed(2)
    m, v = torch.randn(1, 3, generator=g, dtype=F64), 0.2 + torch.rand(1, 3, generator=g, dtype=F64)
    gauss = sd.toy.GaussianMixture(m, v, torch.ones(1, dtype=F64))
    x = torch.randn(5, 3, generator=g, dtype=F64)
    t = 900.0
    a_s, s_s = (1.0, 0.0) if s is None else (float(sd_process.alpha(s)), float(sd_process.sigma(s)))
    a_t, s_t = float(sd_process.alpha(t)), float(sd_process.sigma(t))
    closed = a_t * m + ((a_t**2 * v + s_t**2) / (a_s**2 * v + s_s**2)).sqrt() * (x - a_s * m)
    assert rel_rmse(gauss.reference_ode(x, sd_process, t_start=s, t_end=t), closed) < 1e-9


# --- accuracy per solver ------------------------------------------------------------------------------

# relative RMSE against the exact inversion, SD's betas, karras_capped (the default), 16 samples of the
# 8-d mixture, at 10 / 20 steps (measured; bounds 1.25x)
MEASURED = {
    "ddim": (1.329e-1, 7.641e-2),
    "deis": (1.071e-2, 1.308e-3),
    "dpm_solver": (6.075e-2, 6.769e-3),
    "dpmpp_2m": (3.172e-2, 1.014e-2),
    "dpmpp_3m": (1.650e-2, 2.738e-3),
    "euler": (1.329e-1, 7.641e-2),
    "heun": (3.111e-2, 1.016e-2),
    "ipndm": (2.408e-2, 4.396e-3),
    "lms": (1.160e-1, 3.257e-2),  # order 4 there, 2.1e-1 / 1.8e-2, before the step-ratio rule
    "unipc": (1.854e-2, 1.653e-3),
    None: (5.325e-3, 4.408e-4),  # the default: UniPC-3's noise form
}


INVERTIBLE = sorted(set(sd.inversion.deterministic_solvers()) - {"mrs"})


@pytest.mark.parametrize("solver", [*INVERTIBLE, None], ids=str)
def test_inversion_error(gmm, sd_process, x_0, solver):
    """Every deterministic solver (mrs: mean-reverting processes only) converges up the grid, within 1.25x
    of the measured error where it is in ``MEASURED``."""
    den = gmm.denoiser(sd_process)
    errors = []
    for steps in (10, 20):
        x_T, info = sd.invert(den, x_0, steps, solver, return_info=True)
        assert info.grid.t == sorted(info.grid.t) and info.nfe == info.solver.nfe(steps, clean_end=False)
        errors.append(rel_rmse(x_T, _exact(gmm, sd_process, x_0, info.grid)))
    assert errors[1] < errors[0] / 1.5, errors  # ddim: 1.74
    if solver in MEASURED:
        assert errors[0] < 1.25 * MEASURED[solver][0] and errors[1] < 1.25 * MEASURED[solver][1], errors


def test_default_is_unipc_noise_form_and_beats_the_sampling_default(gmm, sd_process, x_0):
    """UniPC's noise form up the grid has the weights of its data form down it (``g = -h > 0``): 5.3e-3 at
    10 steps against the data form's 1.9e-2 (3.5x), 4.4e-4 at 20 against 1.7e-3."""
    den = gmm.denoiser(sd_process)
    _, info = sd.invert(den, x_0, 10, return_info=True)
    assert isinstance(info.solver, UniPC) and info.solver.prediction == "noise" and info.solver.order == 3
    for steps in (10, 20):
        default, info = sd.invert(den, x_0, steps, return_info=True)
        exact = _exact(gmm, sd_process, x_0, info.grid)
        assert 3 * rel_rmse(default, exact) < rel_rmse(sd.invert(den, x_0, steps, "unipc"), exact)


# default_inversion_solver's docstring: 32 samples, karras_capped, 5 / 10 / 20 / 40 steps (measured)
DEFAULT_32 = {
    "sd": (4.565e-2, 5.300e-3, 3.878e-4, 3.165e-5),
    "flow": (4.955e-2, 5.975e-3, 2.134e-3, 1.756e-3),
    "edm": (6.263e-2, 6.967e-3, 3.325e-3, 9.526e-4),
}
# the others under SD's betas at 5 / 40 steps (measured; asserted within 0.8-1.25x)
OTHERS_SD = {"unipc": (1.860e-1, 1.202e-4), "dpmpp_3m": (9.046e-2, 3.976e-4), "deis": (5.733e-2, 1.223e-4)}


def test_default_inversion_solver_docstring_numbers(gmm):
    """UniPC-3's noise form at 5-40 steps (within 1.25x of the measured, 32 samples): ahead of the data form,
    dpmpp_3m and deis at every count under SD's betas (data form 0.19 / 1.2e-4 at 5 / 40 steps, dpmpp_3m
    9.0e-2 / 4.0e-4, deis 5.7e-2 / 1.2e-4), at 5-20 under flow and EDM; on time_uniform at 5 steps the data
    form diverges (2.6 SD, 12.8 flow), the noise form does not (0.068, 0.095)."""
    x_0 = gmm.sample(32, generator=torch.Generator().manual_seed(5))
    processes = {"sd": sd.VP.scaled_linear(), "flow": sd.RectifiedFlow(), "edm": sd.EDM()}
    for name, proc in processes.items():
        den = gmm.denoiser(proc)
        for steps, measured in zip((5, 10, 20, 40), DEFAULT_32[name], strict=True):
            x_T, info = sd.invert(den, x_0, steps, return_info=True)
            exact = _exact(gmm, proc, x_0, info.grid)
            err = rel_rmse(x_T, exact)
            assert err < 1.25 * measured, (name, steps, err)
            for other in ("unipc", "dpmpp_3m", "deis"):
                theirs = rel_rmse(sd.invert(den, x_0, steps, other), exact)
                assert err < theirs or (name != "sd" and steps == 40), (name, steps, other)
                if name == "sd" and steps in (5, 40):
                    assert 0.8 < theirs / OTHERS_SD[other][steps == 40] < 1.25, (other, steps, theirs)
    for name, data_form, noise_form in (("sd", 2.6, 0.0675), ("flow", 12.8, 0.0952)):
        den = gmm.denoiser(processes[name])
        x_T, info = sd.invert(den, x_0, 5, schedule="time_uniform", return_info=True)
        exact = _exact(gmm, processes[name], x_0, info.grid)
        assert rel_rmse(x_T, exact) < 1.25 * noise_form
        assert rel_rmse(sd.invert(den, x_0, 5, "unipc", "time_uniform"), exact) > 0.8 * data_form


# the default at 10 / 20 steps where the last step down (the first up) is long; before UniPC's noise form
# restarted its estimates after it up the grid too: 8.2e-2 / 3.4e-2 (SD time_uniform, linspace), 7.3e-2 /
# 3.2e-2 (leading), 8.8e-2 / 4.0e-2 (zero terminal SNR, time_uniform)
NO_RESTART_UP = {
    ("sd", "time_uniform"): (2.01e-2, 3.89e-3),
    ("sd", "linspace"): (2.02e-2, 3.90e-3),
    ("sd", "leading"): (1.69e-2, 3.33e-3),
    ("zsnr", "time_uniform"): (2.76e-2, 8.85e-3),
}


def test_default_does_not_restart_after_a_long_step_up(gmm, x_0):
    """The noise form's weight ``e^{h-u}`` sits at the end of a step up the grid: its estimates do not restart
    after a long one (unipc module docstring), within 1.25x of the measured errors."""
    zsnr = sd.VP.discrete(
        betas=torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2, rescale_zero_snr=True
    )
    processes = {"sd": sd.VP.scaled_linear(), "zsnr": zsnr}
    for (name, schedule), measured in NO_RESTART_UP.items():
        den = gmm.denoiser(processes[name])
        for steps, bound in zip((10, 20), measured, strict=True):
            x_T, info = sd.invert(den, x_0, steps, schedule=schedule, return_info=True)
            err = rel_rmse(x_T, _exact(gmm, processes[name], x_0, info.grid))
            assert err < 1.25 * bound, (name, schedule, steps, err)


# (process, schedule, solver, steps) -> the data forms' error up the grid (measured; inversion docstring)
DATA_FORM_LIMITS = {
    ("flow", "karras", "dpm_solver", 5): 199.0,
    ("flow", "karras", "unipc", 5): 41.8,
    ("flow", "time_uniform", "dpm_solver", 10): 59.3,
    ("zsnr", "karras", "unipc", 10): 1.65,
    ("edm", "time_uniform", "dpm_solver", 5): 50.4,
    ("edm", "time_uniform", "dpm_solver", 40): 416.0,
    ("edm", "time_uniform", "unipc", 5): 331.0,
    ("edm", "time_uniform", "unipc", 40): 159.0,
}


def test_data_forms_limits_up_the_grid_and_their_noise_forms(gmm, x_0):
    """The singlestep DPM-Solver++ and UniPC's data form diverge up grids with long steps (0.8-1.25x the
    measured errors); their noise forms stay below 1 on the same cases."""
    zsnr = sd.VP.discrete(
        betas=torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2, rescale_zero_snr=True
    )
    processes = {"zsnr": zsnr, "flow": sd.RectifiedFlow(), "edm": sd.EDM()}
    noise_forms = {"dpm_solver": DPMSolver(algorithm="dpmsolver"), "unipc": UniPC(prediction="noise")}
    for (name, schedule, solver, steps), measured in DATA_FORM_LIMITS.items():
        den = gmm.denoiser(processes[name])
        x_T, info = sd.invert(den, x_0, steps, solver, schedule, return_info=True)
        exact = _exact(gmm, processes[name], x_0, info.grid)
        assert 0.8 < rel_rmse(x_T, exact) / measured < 1.25, (name, schedule, solver, steps)
        assert rel_rmse(sd.invert(den, x_0, steps, noise_forms[solver], schedule), exact) < 1
    den = gmm.denoiser(processes["edm"])  # ddim there: EDM's first step up (sigma 0.002 -> 16 at 5 steps)
    x_T, info = sd.invert(den, x_0, 40, "ddim", "time_uniform", return_info=True)
    assert 0.5 < rel_rmse(x_T, _exact(gmm, processes["edm"], x_0, info.grid)) < 0.7  # 0.603


# --- convergence order --------------------------------------------------------------------------------

STEPS_ORDER = [20, 28, 40, 56, 80]

# (solver, steps, lo, hi) on logsnr_uniform: the order +-0.35, measured slope in the comment
CONVERGENCE = [
    (DDIM(), STEPS_ORDER, 0.65, 1.35),  # 0.98
    (Euler(), STEPS_ORDER, 0.65, 1.35),  # 0.98
    (Heun(), STEPS_ORDER, 1.65, 2.35),  # 1.94
    (DPMSolverPPMultistep(order=2, lower_order_final=False), STEPS_ORDER, 1.65, 2.35),  # 1.96
    (DPMSolverPPMultistep(order=3, lower_order_final=False), STEPS_ORDER, 2.65, 3.35),  # 2.85
    (UniPC(order=2, prediction="noise", lower_order_final=False), STEPS_ORDER, 2.65, 3.35),  # 3.01
    (UniPC(order=3, lower_order_final=False), STEPS_ORDER, 3.65, 4.35),  # 4.00
    (DEIS(order=2, lower_order_final=False), STEPS_ORDER, 1.65, 2.35),  # 2.01
    # 3.70 over 20-80 steps, 3.40 over 20-160: pre-asymptotic, the third order from 40 steps on
    (DEIS(order=3, lower_order_final=False), [40, 80, 160, 320], 2.65, 3.35),  # 2.77
    (DPMSolver(order=2), STEPS_ORDER, 1.65, 2.35),  # 2.05
    (DPMSolver(order=3), STEPS_ORDER, 2.65, 3.35),  # 3.20
    (IPNDM(), STEPS_ORDER, 1.65, 2.35),  # 2.10: fixed weights, second order on graded grids (ipndm.py)
    (LMS(order=2), STEPS_ORDER, 1.65, 2.35),  # 2.15
    # order 3 up the grid from a step ratio of 1.12 (MAX_RATIO_UP): |h| <= 0.113, 55 steps here; order 4 from
    # 1.027 (230 steps), where the first-order first step caps every slope at 2: not measured
    (LMS(order=3), [56, 80, 112, 160], 2.65, 3.35),  # 3.09
]


@pytest.mark.parametrize(("solver", "steps", "lo", "hi"), CONVERGENCE, ids=lambda v: repr(v)[:60])
def test_convergence_order(gmm, sd_process, solver, steps, lo, hi):
    den = gmm.denoiser(sd_process)
    x_0 = gmm.sample(4, generator=torch.Generator().manual_seed(5))
    errors = []
    for n in steps:
        x_T, info = sd.invert(den, x_0, n, solver, "logsnr_uniform", return_info=True)
        exact = gmm.reference_ode(x_0, sd_process, info.grid.t[0], info.grid.t[-1], rtol=1e-12, atol=1e-12)
        errors.append(rel_rmse(x_T, exact))
    assert min(errors) > 1e-7  # well above the reference's tolerance
    assert lo < slope(steps, errors) < hi, errors


def test_third_order_multistep_predictors_are_second_order_up_the_grid():
    """The warm-up's first-order first step is at the clean end up the grid: on a Gaussian with a variance of
    0.05 (``tests/test_adjoint.py``'s, exact inversion in closed form) under SD's betas, DEIS-3 and
    DPM-Solver++(3M) converge at second order (measured 1.8e-4 / 4.4e-5 / 1.1e-5 and 2.1e-4 / 4.5e-5 /
    1.1e-5 at 40 / 80 / 160 steps), UniPC-3's noise form (corrected first step) and singlestep DPM-Solver-3
    at third or more (1.9e-5 / 1.5e-6 / 1.1e-7, 1.6e-4 / 2.0e-5 / 2.1e-6): the module docstring's numbers."""
    from .test_adjoint import DEN, MU, PROC, SCHED, VAR, X_T, flow_map

    x_0 = sd.sample(DEN, X_T, 500, DEIS(order=3), SCHED, final="none")
    steps = [40, 80, 160]

    def errors(solver):
        out = []
        for n in steps:
            (a_0, _), (a_n, _), amp = flow_map(n, PROC, VAR)
            exact = a_0 * MU + (x_0 - a_n * MU) / amp
            out.append(float((sd.invert(DEN, x_0, n, solver, SCHED) - exact).norm() / exact.norm()))
        return out

    for solver in (
        DEIS(order=3, lower_order_final=False),
        DPMSolverPPMultistep(order=3, lower_order_final=False),
    ):
        e = errors(solver)
        assert abs(slope(steps, e) - 2) < 0.3 and 8e-6 < e[-1] < 1.4e-5, (solver, e)
    for solver, hi in (
        (UniPC(order=3, prediction="noise", lower_order_final=False), 1.4e-7),
        (DPMSolver(order=3), 2.7e-6),
    ):
        e = errors(solver)
        assert slope(steps, e) > 2.8 and e[-1] < hi, (solver, e)


# --- lms: the step-ratio rule up the grid ----------------------------------------------------------------


def _parasitic(k, omega, weights):
    """Largest parasitic root of order ``k`` on ``eps = y / s`` with the constant step ratio ``omega``,
    relative to the solution's growth ``omega`` (lms module docstring): ``zeta^k = zeta^{k-1} + sum_j w_j
    (Delta / s_{i-j}) zeta^{k-1-j}`` with ``Delta / s_{i-j} = (omega - 1) omega^j``."""
    w = weights([(omega**-j - 1) / (omega - 1) for j in range(k)])
    coeffs = [1.0, -1.0] + [0.0] * (k - 1)
    for j in range(k):
        coeffs[1 + j] -= w[j] * (omega - 1) * omega**j
    roots = np.roots(coeffs)
    return float(np.delete(np.abs(roots), np.argmin(np.abs(roots - omega))).max()) / omega


def test_lms_ratio_limits_are_where_the_parasitic_roots_are_a_quarter():
    """At MAX_RATIO_UP[k] the variable-step weights' parasitic roots are a quarter of the growth; at
    3 / 1.79 / 1.36 they reach it. The fixed weights (ipndm, pndm) stay below 0.5 / 0.65 / 0.89 at any
    ratio, and take no rule."""
    from steerdiff.solvers._poly import adams_bashforth
    from steerdiff.solvers.lms import MAX_RATIO_UP

    for k, omega in MAX_RATIO_UP.items():
        assert _parasitic(k, omega, adams_bashforth) == pytest.approx(0.25, abs=2e-4), k
    for k, omega in ((2, 3.0), (3, 1.7922), (4, 1.3587)):
        assert _parasitic(k, omega, adams_bashforth) == pytest.approx(1.0, abs=2e-4), k
    fixed = {k: adams_bashforth([-j for j in range(k)]) for k in (2, 3, 4)}
    for k, bound in ((2, 0.5), (3, 0.65), (4, 0.89)):
        assert max(_parasitic(k, om, lambda _, k=k: fixed[k]) for om in (1.01, 1.5, 3.0, 33.0, 1e3)) < bound
    assert not IPNDM.ratio_rule and LMS.ratio_rule


def test_lms_order_up_takes_the_highest_order_within_the_ratios():
    order_up = sd.solvers.lms.order_up
    assert order_up(4, [1.02, 1.0, 1.0, 1.0]) == 4  # every ratio <= 1.0273
    assert order_up(4, [1.1, 1.0, 1.0, 1.0]) == 3  # 1.1 <= 1.1208
    assert order_up(4, [1.0, 1.0, 0.8, 1.0]) == 2  # the second ratio 1.25 > 1.1208, the first 1.0
    assert order_up(4, [1.6, 1.0, 1.0, 1.0]) == 1


# (process, schedule, steps) -> lms's error with the rule (measured; bound 1.25x); before it, order 4 up the
# grid: 4.1e4 / 299 (flow), 7.1 / 3.5e-2 (EDM), 4.4e5 / 1.6e4 (zero terminal SNR) at 20 / 40 steps
LMS_UP = {
    ("flow", 20): 2.42e-2,
    ("flow", 40): 1.52e-2,
    ("edm", 20): 3.35e-2,
    ("edm", 40): 1.47e-2,
    ("zsnr", 20): 4.28e-2,
    ("zsnr", 40): 9.11e-3,
}


def test_lms_inverts_no_worse_than_ddim(gmm, x_0):
    """Up the grid lms takes order k only where the step ratios in ``s`` are within MAX_RATIO_UP[k]:
    on five processes x three schedules at 5-40 steps it is no further from the exact inversion than
    ``ddim`` (which it was by up to 6.7e8 without the rule) and below 1.25x the measured errors above."""
    zsnr = sd.VP.discrete(
        betas=torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2, rescale_zero_snr=True
    )
    processes = {"sd": sd.VP.scaled_linear(), "zsnr": zsnr, "flow": sd.RectifiedFlow(), "edm": sd.EDM()}
    processes["cosine"] = sd.VP.cosine()
    # equal to ddim's, up to rounding, where every step is first order
    for name, proc in processes.items():
        den = gmm.denoiser(proc)
        for schedule in ("karras_capped", "logsnr_uniform", "time_uniform"):
            for steps in (5, 10, 20, 40):
                x_T, info = sd.invert(den, x_0, steps, "lms", schedule, return_info=True)
                exact = _exact(gmm, proc, x_0, info.grid)
                err = rel_rmse(x_T, exact)
                ddim = rel_rmse(sd.invert(den, x_0, steps, "ddim", schedule), exact)
                assert err <= ddim * (1 + 1e-9), (name, schedule, steps)
                if schedule == "karras_capped" and (name, steps) in LMS_UP:
                    assert err < 1.25 * LMS_UP[name, steps], (name, steps, err)


def test_lms_rule_is_never_consulted_when_sampling(gmm, monkeypatch):
    """Sampling steps (``s`` falls) and ipndm's fixed weights never reach the rule: their results are the
    old code's bit for bit (checked over 2,580 runs of lms 2-4 / ipndm / pndm / plms, five processes, every
    schedule, 3-40 steps, when it was added)."""

    def refuse(order, steps):
        raise AssertionError("consulted")

    monkeypatch.setattr(sd.solvers.lms, "order_up", refuse)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    for proc in (sd.VP.scaled_linear(), sd.RectifiedFlow(), sd.EDM()):
        for schedule in ("karras_capped", "logsnr_uniform", "time_uniform", "exponential"):
            sd.sample(gmm.denoiser(proc), x, 20, "lms", schedule)
            sd.sample(gmm.denoiser(proc), x, 20, "lms", schedule, final="none")
            sd.invert(gmm.denoiser(proc), x, 20, "ipndm", schedule)
    with pytest.raises(AssertionError, match="consulted"):
        sd.invert(gmm.denoiser(sd.RectifiedFlow()), x, 20, "lms")


# --- round trip ---------------------------------------------------------------------------------------


def _round_trips(gmm, process, x_0, solver, factor: float) -> list[float]:
    """``sample(invert(x_0), final="none")``'s error at 10 and 20 steps, each asserted below ``factor`` times
    the sum of the inversion's error carried back by the exact flow and the sampler's own from the exact
    ``x_T``."""
    den = gmm.denoiser(process)
    trips = []
    for steps in (10, 20):
        x_T, info = sd.invert(den, x_0, steps, solver, return_info=True)
        g = info.grid
        carried = rel_rmse(gmm.reference_ode(x_T, process, t_start=g.t[-1], t_end=g.t[0]), x_0)
        own = rel_rmse(sd.sample(den, _exact(gmm, process, x_0, g), steps, solver, final="none"), x_0)
        trips.append(rel_rmse(sd.sample(den, x_T, steps, solver, final="none"), x_0))
        assert trips[-1] < factor * (carried + own), (steps, trips[-1], carried, own)
    return trips


@pytest.mark.parametrize("solver", [None, "unipc", "dpmpp_2m", "heun", "deis", "dpm_solver", "ddim"], ids=str)
def test_round_trip_returns_x_0_within_the_solver_error(gmm, sd_process, x_0, solver):
    """``sample(invert(x_0), final="none")`` is ``x_0`` up to both runs' error: the inversion's carried back
    by the exact flow (which may expand it: dpm_solver's 6.8e-3 at 20 steps becomes 0.12) plus the sampler's
    own from the exact ``x_T``; within 1.5x of that sum, and converging."""
    trips = _round_trips(gmm, sd_process, x_0, solver, 1.5)
    assert trips[1] < trips[0] / 1.5, trips


def test_round_trip_of_the_defaults(gmm, sd_process, x_0):
    """Both defaults (UniPC-3's noise form up, its data form down): 1.6e-2 at 10 steps, 4.0e-3 at 20, 2.1e-4
    at 50."""
    den = gmm.denoiser(sd_process)
    for steps, measured in ((10, 1.550e-2), (20, 4.006e-3), (50, 2.09e-4)):
        back = sd.sample(den, sd.invert(den, x_0, steps), steps, final="none")
        assert rel_rmse(back, x_0) < 1.25 * measured, steps


@pytest.mark.parametrize("process", [sd.VE(), sd.EDM(), sd.RectifiedFlow(), sd.VP.cosine()], ids=repr)
@pytest.mark.parametrize("solver", [None, "dpmpp_3m", "ipndm"], ids=str)
def test_round_trip_on_every_process_kind(gmm, x_0, process, solver):
    """The round trip beyond SD's betas, the multistep solvers included: within the sum of the inversion's
    error carried back and the sampler's own (measured 0.71-0.97 of it at 10 and 20 steps on these twelve
    cases; 3.4e-2 / 1.1e-2 for the defaults under EDM, 4.4e-2 / 1.3e-2 for ``dpmpp_3m``) and falling."""
    trips = _round_trips(gmm, process, x_0, solver, 1.2)
    assert 5e-3 < trips[1] < trips[0] / 2 and trips[0] < 0.1, trips


# --- long steps up the grid -----------------------------------------------------------------------------


def test_long_step_rule_judges_the_length_of_steps_up_the_grid():
    """On a reversed grid (``h < 0``) a step longer than ``max_h`` and ``max_h_ratio`` times the one before
    is first order too; the old test ``h > max_h_ratio * h_prev`` never held for negative steps."""
    lam = torch.tensor([-1.0, -0.5, 0.0, 2.5, 5.0, 5.5], dtype=F64)  # h = 0.5, 0.5, 2.5, 2.5, 0.5
    grid = sd.solvers.make_grid(sd.EDM(), sd.schedules.Custom(torch.exp(-lam).tolist()), 5, "none")
    up = grid.reversed()
    assert [up.h(i) for i in range(5)] == pytest.approx([-0.5, -2.5, -2.5, -0.5, -0.5])
    orders = [sd.solvers.base.step_order(i, up, 3, 3, False, max_h=2.0, max_h_ratio=2.0) for i in range(5)]
    assert orders == [3, 1, 3, 3, 3]
    with pytest.raises(ValueError, match=r"Grid\.reversed: a grid with a clean end"):
        sd.solvers.make_grid(sd.EDM(), sd.schedules.Custom(torch.exp(-lam).tolist()), 6).reversed()


def test_deis_takes_long_steps_up_at_first_order_and_samples_as_before(gmm, x_0):
    """karras_capped's last step up under rectified flow (sigma/alpha 30 -> t_max, h = -3.5) after short
    ones: at 20 steps 4.3e-3 with the rule (measured, 32 samples), 5.8e-2 without. Sampling steps (h > 0)
    never take it: the samples are the same bit for bit."""
    proc = sd.RectifiedFlow()
    den = gmm.denoiser(proc)
    x_T, info = sd.invert(den, x_0, 20, "deis", return_info=True)
    exact = _exact(gmm, proc, x_0, info.grid)
    assert rel_rmse(x_T, exact) < 8e-3
    assert rel_rmse(sd.invert(den, x_0, 20, DEIS(max_h=math.inf)), exact) > 4e-2
    for schedule in ("time_uniform", "linspace"):
        noise = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
        p = sd.VP.scaled_linear()
        ours = sd.sample(gmm.denoiser(p), noise, 20, "deis", schedule)
        assert torch.equal(ours, sd.sample(gmm.denoiser(p), noise, 20, DEIS(max_h=math.inf), schedule))


def test_heun_keeps_its_trapezoid_up_the_grid(gmm, monkeypatch):
    """heun_update's docstring: up the grid (``h < 0``) Heun keeps the trapezoid in ``s``; the exponential
    trapezoid that long steps down take, applied up by ``|h|``, was far worse. 8-d mixture, 32 samples,
    against the exact ODE (measured): rectified flow on karras at 5 steps 0.472 against 5.78 with that
    rule, EDM on time_uniform at 10 steps 0.807 against 72.3."""
    from steerdiff.solvers._exp import hphi
    from steerdiff.solvers.edm import HEUN_MAX_RATIO, heun_update

    def by_abs_h(model, x, step, frm, to, second=True, pred=None):  # the rule by |h|, the counterfactual
        (t, a, s), (t_next, a_next, s_next) = frm, to
        if not second or s_next == 0 or s_next / a_next <= HEUN_MAX_RATIO * (s / a):
            return heun_update(model, x, step, frm, to, second, pred)
        pred = model(x, t, step) if pred is None else pred
        x_euler = pred.renoise(a_next, s_next)
        h = math.log((s / a) / (s_next / a_next))
        return x_euler + a_next * hphi(2, h) / h * (model(x_euler, t_next, step).x0 - pred.x0)

    x_0 = gmm.sample(32, generator=torch.Generator().manual_seed(5))
    for proc, schedule, steps, measured, by_h in (
        (sd.RectifiedFlow(), "karras", 5, 0.472, 5.78),
        (sd.EDM(), "time_uniform", 10, 0.807, 72.3),
    ):
        den = gmm.denoiser(proc)
        x_T, info = sd.invert(den, x_0, steps, "heun", schedule, return_info=True)
        exact = _exact(gmm, proc, x_0, info.grid)
        with monkeypatch.context() as m:
            m.setattr("steerdiff.solvers.euler.heun_update", by_abs_h)
            other = sd.invert(den, x_0, steps, "heun", schedule)
        assert 0.95 < rel_rmse(x_T, exact) / measured < 1.05, (proc, schedule)
        assert 0.95 < rel_rmse(other, exact) / by_h < 1.05, (proc, schedule)


# --- diffusers ----------------------------------------------------------------------------------------


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def _run_inverse(sched, net, x):
    for t in sched.timesteps:
        x = sched.step(net(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpmpp_matches_diffusers_inverse_scheduler(diffusers, gmm, sd_process, x_0, order, steps, spacing):
    """DPMSolverMultistepInverseScheduler evaluates at its timesteps ``0 = t_N < ... `` and steps into the
    noisiest timestep last: the reversed grid of ``Custom([999, *timesteps[::-1]])``, dpmpp_{k}m with
    diffusers' rules (``max_h=inf``; its order-3 weight ``third_order="dpmsolver"``). Measured 4.5e-6 at
    most (leading at 10 steps, whose last step 810 -> 999 is long), 1.2e-6 on linspace."""
    sched = diffusers.DPMSolverMultistepInverseScheduler(
        **sd_betas_config(solver_order=order, timestep_spacing=spacing)
    )
    sched.set_timesteps(steps)
    ts = [float(t) for t in sched.timesteps.tolist()]
    ref = _run_inverse(sched, eps_net(gmm, sd_process), x_0.clone())
    solver = DPMSolverPPMultistep(order=order, max_h=math.inf, third_order="dpmsolver")  # order 1: DDIM
    nodes = sd.schedules.Custom([float(sched.noisiest_timestep), *ts[::-1]])
    x_T, info = sd.invert(gmm.denoiser(sd_process), x_0, steps, solver, nodes, return_info=True)
    assert info.grid.t[:-1] == ts and info.nfe == len(ts) == steps
    assert rel_rmse(x_T, ref) < PARITY_BOUND["DPMSolverMultistepInverseScheduler"]


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_ddim_and_diffusers_ddim_inverse_differ_only_in_the_net_time(diffusers, gmm, sd_process, x_0, steps):
    """DDIMInverseScheduler moves x from timestep s to t = s + 1000 // N with the DDIM step but evaluates
    the net at ``(x_s, t)``, the target's timestep; ``invert(solver="ddim")`` at ``(x_s, s)``. With
    ``set_alpha_to_one=False`` its first step (from ``alphas_cumprod[0]`` to timestep 0) is the identity,
    so on the same nodes and with a net whose eps does not depend on ``t`` the two agree (5.4e-7 measured);
    with the exact net both are first order and ours is the nearer the exact inversion (0.147 against
    0.223 at 10 steps, 0.065 / 0.098 at 25, 0.034 / 0.051 at 50)."""
    sched = diffusers.DDIMInverseScheduler(**sd_betas_config(set_alpha_to_one=False, clip_sample=False))
    exact_net = eps_net(gmm, sd_process)

    def frozen(x, t):
        return exact_net(x, 500.0)

    results = {}
    for name, net in (("frozen", frozen), ("exact", exact_net)):
        sched.set_timesteps(steps)
        ts = [float(t) for t in sched.timesteps.tolist()]
        ref = _run_inverse(sched, net, x_0.clone())
        den = sd.Denoiser(net, sd_process, prediction="eps")
        x_T, info = sd.invert(den, x_0, steps - 1, "ddim", sd.schedules.Custom(ts[::-1]), return_info=True)
        assert info.grid.t == ts
        results[name] = (ref, x_T, _exact(gmm, sd_process, x_0, info.grid))
    ref, ours, _ = results["frozen"]
    assert rel_rmse(ours, ref) < PARITY_BOUND["DDIMInverseScheduler(t-independent eps)"]
    ref, ours, exact = results["exact"]
    assert rel_rmse(ours, ref) > 0.05  # another algorithm
    assert rel_rmse(ours, exact) < 0.7 * rel_rmse(ref, exact)


# --- guidance -------------------------------------------------------------------------------------------


def _guided_ode(x, process, w, t_start, t_end):
    """The probability-flow ODE of CFG at scale ``w`` towards class 1 of ``two_class`` (in ``x / alpha``
    against ``sigma / alpha``, as reference_ode)."""
    _, c1, full = two_class()
    (a0, s0), (a1, s1) = ((float(process.alpha(t)), float(process.sigma(t))) for t in (t_start, t_end))
    n = x.shape[0]

    def rhs(s, y):
        yt = torch.from_numpy(y).reshape(n, 2)
        d = (1 - w) * full.denoise(yt, 1.0, s) + w * c1.denoise(yt, 1.0, s)
        return ((yt - d) / s).reshape(-1).numpy()

    y0 = (x / a0).reshape(-1).numpy()
    sol = solve_ivp(rhs, (s0 / a0, s1 / a1), y0, method="DOP853", rtol=1e-10, atol=1e-10)
    return torch.from_numpy(sol.y[:, -1]).reshape(n, 2) * a1


@pytest.mark.parametrize(("w", "measured"), [(2.0, (1.56e-2, 4.1e-2)), (7.5, (1.20e-1, 5.0e-1))])
def test_cfg_inverts_along_the_guided_ode(sd_process, w, measured):
    """A CFG denoiser inverts along its guided ODE (the guided default of ``sample``, 10 steps); the round
    trip expands the error with the scale (measured 4.1e-2 at 2, 0.50 at 7.5)."""
    _, c1, _ = two_class()
    x_0 = c1.sample(32, generator=torch.Generator().manual_seed(5))
    guided = CFG(labelled(sd_process), labelled(sd_process), w, uncond_kwargs={"y": NULL})
    x_T, info = sd.invert(guided, x_0, 10, return_info=True, y=1)
    assert info.nfe == 20  # two branches per step
    exact = _guided_ode(x_0, sd_process, w, info.grid.t[0], info.grid.t[-1])
    assert rel_rmse(x_T, exact) < 1.25 * measured[0]
    back = sd.sample(guided, x_T, 10, info.solver, final="none", y=1)
    assert rel_rmse(back, x_0) < 1.25 * measured[1]


# --- the loop and bad input -----------------------------------------------------------------------------


def test_callback_reports_each_step_up(gmm, sd_process, x_0):
    seen = []
    den = gmm.denoiser(sd_process)
    x_T, info = sd.invert(den, x_0, 6, "dpmpp_2m", callback=seen.append, return_info=True)
    assert [d["i"] for d in seen] == list(range(6)) and [d["nfe"] for d in seen] == list(range(1, 7))
    assert [d["t"] for d in seen] == info.grid.t[1:] and [d["sigma"] for d in seen] == info.grid.sigma[1:]
    assert torch.equal(seen[-1]["x"], x_T)


@pytest.mark.parametrize(
    "solver", ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "restart", "sa_solver", DDIM(eta=0.5)], ids=str
)
def test_stochastic_solvers_are_refused(gmm, sd_process, x_0, solver):
    shown = r"'\w+'" if isinstance(solver, str) else r"DDIM\(order=1, eta=0\.5\)"
    accepted = r"accepted: \['accel_ddim', 'ddim', 'de"
    with pytest.raises(ValueError, match=rf"invert: solver={shown} is stochastic.*{accepted}"):
        sd.invert(gmm.denoiser(sd_process), x_0, 5, solver)


def test_bad_input_is_named(gmm, sd_process, x_0):
    den = gmm.denoiser(sd_process)
    with pytest.raises(ValueError, match=r"invert: x_0 has sample shape \(4,\), the denoiser expects \(8,\)"):
        sd.invert(den, x_0[:, :4])
    with pytest.raises(ValueError, match=r"invert: x_0 must be batched"):
        sd.invert(den, x_0[0])
    with pytest.raises(ValueError, match=r"invert: x_0 contains NaN or inf"):
        sd.invert(den, torch.full_like(x_0, math.nan))
    with pytest.raises(ValueError, match=r"invert: steps must be an integer >= 1"):
        sd.invert(den, x_0, 0)
    with pytest.raises(ValueError, match=r"invert: unknown solver='nope'"):
        sd.invert(den, x_0, 5, "nope")
    needs = r"invert: schedule has 3 times, .* runs down: steps must be len\(times\) - 1 = 2, got"
    for steps in (1, 3):
        with pytest.raises(ValueError, match=needs + rf" steps={steps}$"):
            sd.invert(den, x_0, steps, schedule=[900.0, 500.0, 100.0])
        with pytest.raises(ValueError, match=needs):
            sd.invert(den, x_0, steps, schedule=sd.schedules.Custom([900.0, 500.0, 100.0]))
    with pytest.raises(ValueError, match=r"invert: callback must be None or a callable"):
        sd.invert(den, x_0, callback=3)
    # a list of times that is no grid names the argument and the caller (it read "Custom: times ..." alone)
    for who, run in (("invert", sd.invert), ("sample", sd.sample)):
        with pytest.raises(ValueError, match=rf"^{who}: schedule: Custom: times must be strictly decreasing"):
            run(den, x_0, 2, schedule=[100.0, 500.0, 900.0])
        with pytest.raises(ValueError, match=rf"^{who}: schedule: Custom: times must be finite"):
            run(den, x_0, 2, schedule=[900.0, math.nan, 100.0])


def test_keywords_of_sample_that_invert_lacks_are_refused(gmm, sd_process, x_0):
    """sample's final=, generator=, corrector=, corrector_steps=, snr= given to invert went on to the net as
    conditions: a TypeError inside it (``net() got an unexpected keyword argument 'generator'``), or nothing
    at all for a net that takes **kwargs (``final="zero"`` ignored). They are the keyword-only arguments of
    sample that invert does not have, and are refused by name."""
    kw_only = inspect.Parameter.KEYWORD_ONLY
    own = {name for name, p in inspect.signature(sd.invert).parameters.items() if p.kind == kw_only}
    theirs = {name for name, p in inspect.signature(sd.sample).parameters.items() if p.kind == kw_only}
    assert set(sd.inversion.SAMPLE_ONLY) == theirs - own
    calls = []

    def net(x, t, **cond):
        calls.append(cond)
        return gmm.denoiser(sd_process).net(x, t)

    den = sd.Denoiser(net, sd_process, prediction="x0")
    given = [("generator", torch.Generator()), ("final", "zero"), ("corrector", "ula"), ("snr", 0.1)]
    for name, value in given:
        with pytest.raises(ValueError, match=rf"^invert: {name} is an argument of sample, not of invert, .*"):
            sd.invert(den, x_0, 5, **{name: value})
    with pytest.raises(ValueError, match=r"^invert: generator, corrector_steps are arguments of sample"):
        sd.invert(den, x_0, 5, generator=None, corrector_steps=2)
    assert calls == []
    sd.invert(den, x_0, 5, label=3)  # the net's own conditions still reach it
    assert calls and all(c == {"label": 3} for c in calls)


@pytest.mark.parametrize("bad_step", [0, 3])
def test_nan_from_the_net_is_named_with_its_step(gmm, sd_process, x_0, bad_step):
    den = gmm.denoiser(sd_process)
    _, info = sd.invert(den, x_0, 5, "dpmpp_2m", return_info=True)
    start = info.grid.t[bad_step]  # the net returns NaN from the time step `bad_step` evaluates at on

    def net(x, t):
        out = den.net(x, t)
        return out * math.nan if float(t.reshape(-1)[0]) >= start else out

    broken = sd.Denoiser(net, sd_process, prediction="x0")
    with pytest.raises(sd.NonFiniteError, match=rf"NaN/inf at step {bad_step} \(evaluation {bad_step + 1},"):
        sd.invert(broken, x_0, 5, "dpmpp_2m")


@pytest.mark.parametrize(
    ("who", "run"),
    [
        ("invert", lambda den, x: sd.invert(den, x, 3)),
        ("ddpm_invert", lambda den, x: sd.ddpm_invert(den, x, 3)),
        ("adjoint", lambda den, x: sd.adjoint(den, x, lambda v: v.sum(), 3)),
    ],
)
def test_noise_drawing_parts_named_once(gmm, sd_process, x_0, who, run):
    """A denoiser holding two parts that draw noise of the same kind (a CFG of two RePaints: own_noise lists
    each) is refused naming the kind once, as sample's and paradigms' messages do (was 'RePaint, RePaint')."""
    den = gmm.denoiser(sd_process)
    op, y = sd.inverse.Matrix(torch.eye(x_0.shape[1], dtype=x_0.dtype)[:1]), x_0[:, :1]
    guided = CFG(sd.guidance.RePaint(den, op, y), sd.guidance.RePaint(den, op, y), 2.0)
    with pytest.raises(ValueError, match=rf"^{who}: den: RePaint draws noise"):
        run(guided, x_0)
