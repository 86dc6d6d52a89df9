"""DPM2, DPM2 a and DPM++ 2S a (``dpm_2``, ``dpm_2_ancestral``, ``dpmpp_2s_ancestral``): parity with
diffusers' KDPM2 schedulers under the same noise, a chain written from the papers, the step of singlestep
DPM-Solver on a grid holding the midpoints, convergence order, exact laws on Gaussian data
(tests/test_stochastic_basic.py) and the mixture's distribution.

diffusers' KDPM2 schedulers evaluate at ``[t_0, m_0, t_1, m_1, ..., t_{N-1}]`` (``timesteps``), the midpoint
``m_i`` at the geometric mean of ``sigma / alpha`` at ``t_i`` and at ``t_{i+1}`` (the ancestral one: at its
``sigma_down``), mapped to a time by interpolating ``log sigma`` between the integer timesteps: the inverse of
``VP.discrete``'s log-SNR, so steerdiff's ``t_of_lam`` of the midpoint in ``lam`` is the same time and the
nodes ``timesteps[0::2]`` are the whole grid.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import steerdiff as sd
from steerdiff.solvers import DDIM, DPMSolver, DPMSolver2, Transition

from .reference import (
    PARITY_BOUND,
    Replay,
    assert_keeps_point_marginal,
    diffusers_sample,
    drive,
    exact_sample,
    noise,
    rel_rmse,
    sd_betas_config,
    slope,
)

F64 = torch.float64
ANCESTRAL = ["dpm_2_ancestral", "dpmpp_2s_ancestral"]


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- parity with diffusers ------------------------------------------------------------------------


def _kdpm2(diffusers, ancestral: bool, steps: int, spacing: str) -> tuple[object, sd.schedules.Custom, float]:
    """The scheduler after ``set_timesteps``, its nodes ``timesteps[0::2]`` and the factor that makes its
    ``x_T`` ours (its ``init_noise_sigma`` is ``sigma_max``, not ``sqrt(sigma_max^2 + 1)``, with linspace and
    trailing spacing)."""
    cls = diffusers.KDPM2AncestralDiscreteScheduler if ancestral else diffusers.KDPM2DiscreteScheduler
    sched = cls(**sd_betas_config(timestep_spacing=spacing))
    sched.set_timesteps(steps)
    scale = math.sqrt(float(sched.sigmas.max()) ** 2 + 1) / float(sched.init_noise_sigma)
    return sched, sd.schedules.Custom(sched.timesteps[0::2].double()), scale


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 / torch __array__ inside diffusers
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_2_matches_kdpm2(diffusers, gmm, sd_process, x_T, steps, spacing):
    sched, nodes, scale = _kdpm2(diffusers, False, steps, spacing)
    # the midpoints diffusers evaluates are ours
    grid = sd.solvers.make_grid(sd_process, nodes, steps)
    mids = [t for t, _ in DPMSolver2().init_state(grid)["mid"]]
    assert torch.allclose(torch.tensor(mids, dtype=F64), sched.timesteps[1::2].double(), rtol=0, atol=2e-3)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T * scale, steps)
    x, info = sd.sample(gmm.denoiser(sd_process), x_T, steps, "dpm_2", nodes, return_info=True)
    assert info.nfe == nfe == len(sched.timesteps) == 2 * steps - 1 == DPMSolver2().nfe(steps)
    assert rel_rmse(x, ref) < PARITY_BOUND["KDPM2DiscreteScheduler"]  # measured 2.3e-7 .. 5.4e-7


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 / torch __array__ inside diffusers
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_2_ancestral_matches_kdpm2_ancestral(diffusers, gmm, sd_process, x_T, steps, spacing):
    # one randn per step (its second stage) from the generator, none into sigma = 0, as ours
    sched, nodes, scale = _kdpm2(diffusers, True, steps, spacing)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T * scale, steps, _gen(3))
    x, info = sd.sample(
        gmm.denoiser(sd_process), x_T, steps, "dpm_2_ancestral", nodes, generator=_gen(3), return_info=True
    )
    assert info.nfe == nfe == len(sched.timesteps) == 2 * steps - 1
    # measured 3.2e-7 .. 6.7e-7, 2.7e-6 at 25 linspace steps (fractional nodes: diffusers interpolates sigma
    # linearly there)
    assert rel_rmse(x, ref) < PARITY_BOUND["KDPM2AncestralDiscreteScheduler"]


# --- the papers' chain ----------------------------------------------------------------------------


def _chain(gmm, grid: sd.solvers.Grid, x_T: Tensor, draws: list[Tensor], eta: float, data: bool) -> Tensor:
    """k-diffusion's loops, written here from the papers in ``y = x / alpha``, ``s = sigma / alpha``: the
    exact denoiser ``D(y, s) = E[x0 | x0 + s z = y]``; per step ``s_up = eta s' sqrt(1 - s'^2 / s^2)``,
    ``s_down = sqrt(s'^2 - s_up^2)``, ``s_m = sqrt(s s_down)``, then DPM-Solver-2 in its noise form (Lu et al.
    2022a, Alg. 1, r = 1/2: Euler to ``s_m``, Euler over the step with the slope there) or DPM-Solver++(2S)
    (Lu et al. 2022b, Alg. 1, r = 1/2, in ``t = -log s``), and ``s_up z``; ``D`` into ``s = 0``. steerdiff's
    one departure from k-diffusion: a grid step dividing ``s`` by more than 20 takes DPM-Solver++(2S)."""
    s = [sg / a for sg, a in zip(grid.sigma, grid.alpha, strict=True)]
    y, draws = x_T / grid.alpha[0], list(draws)

    def den(y: Tensor, s: float) -> Tensor:
        return gmm.denoise(y, 1.0, s)

    for i in range(grid.steps):
        d = den(y, s[i])
        if s[i + 1] == 0:
            return d
        up = eta * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)
        down = math.sqrt(s[i + 1] ** 2 - up**2)
        s_m = math.exp(0.5 * (math.log(s[i]) + math.log(down)))
        if data or s[i] > 20 * s[i + 1]:
            t, t_next = -math.log(s[i]), -math.log(down)
            h = t_next - t
            u = (math.exp(-(t + h / 2)) / s[i]) * y - math.expm1(-h / 2) * d
            y = (down / s[i]) * y - math.expm1(-h) * den(u, s_m)
        else:
            u = y + (s_m - s[i]) * (y - d) / s[i]
            y = y + (down - s[i]) * (u - den(u, s_m)) / s_m
        if up > 0:
            y = y + up * draws.pop(0)
    return grid.alpha[-1] * y


@pytest.mark.parametrize("process", [sd.VP.scaled_linear(), sd.RectifiedFlow()], ids=["vp", "flow"])
@pytest.mark.parametrize(
    "solver",
    [DPMSolver2(), DPMSolver2(eta=0.5), DPMSolver2(eta=1.0), DPMSolver2(algorithm="dpmsolver++", eta=1.0),
     DPMSolver2(algorithm="dpmsolver++", eta=0.3), DPMSolver2(algorithm="dpmsolver++")],
    ids=repr,
)  # fmt: skip
def test_run_is_the_papers_chain(gmm, process, solver):
    steps, x_T = 12, noise(4, 8)
    grid = sd.solvers.make_grid(process, sd.schedules.get("karras"), steps)
    draws = list(torch.randn(steps, *x_T.shape, generator=_gen(2), dtype=F64).unbind())
    src = Replay(draws)
    x = sd.sample(gmm.denoiser(process), x_T, steps, solver, "karras", generator=src)
    assert src.calls == (steps - 1 if solver.eta > 0 else 0)
    want = _chain(gmm, grid, x_T, draws, solver.eta, solver.algorithm == "dpmsolver++")
    assert rel_rmse(x, want) < 1e-10  # measured 7.0e-16 .. 9.2e-15


@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
def test_ode_step_is_singlestep_dpm_solver_on_the_midpoint_grid(gmm, sd_process, algorithm):
    # DPM-Solver(order=2) over [t_0, m_0, t_1, m_1, ..., t_{N-1}, clean] takes the same macro-steps with
    # r_1 = 1/2 (the last one first order into the clean end)
    steps, x_T, den = 8, noise(4, 8), gmm.denoiser(sd_process)
    solver = DPMSolver2(algorithm=algorithm)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("logsnr_uniform"), steps)
    mids = [t for t, _ in solver.init_state(grid)["mid"]]
    nodes = [t for i in range(steps - 1) for t in (grid.t[i], mids[i])] + [grid.t[steps - 1]]
    ref = DPMSolver(order=2, algorithm=algorithm)
    want = sd.sample(den, x_T, 2 * steps - 1, ref, sd.schedules.Custom(nodes))
    # measured 0: the same arithmetic (dpm_solver.update, midpoint_correction)
    assert rel_rmse(sd.sample(den, x_T, steps, solver, "logsnr_uniform"), want) < 1e-12


@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
def test_order_1_is_ddim(gmm, sd_process, algorithm, eta):
    den, x_T = gmm.denoiser(sd_process), noise(4, 8)
    x, info = sd.sample(
        den, x_T, 10, DPMSolver2(order=1, algorithm=algorithm, eta=eta), "karras", generator=_gen(1),
        return_info=True,
    )  # fmt: skip
    assert info.nfe == 10
    assert rel_rmse(x, sd.sample(den, x_T, 10, DDIM(eta=eta), "karras", generator=_gen(1))) < 1e-12


# --- transitions and NFE --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ANCESTRAL)
def test_transition_is_the_step_before_its_noise(gmm, sd_process, name):
    steps, x_T, den = 8, noise(3, 8), gmm.denoiser(sd_process)
    solver = sd.solvers.get(name)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("logsnr_uniform"), steps)
    draws = list(torch.randn(steps, *x_T.shape, generator=_gen(4), dtype=F64).unbind())
    x, outs = drive(solver, den, x_T, grid, draws)
    ups = solver.init_state(grid)["up"]
    s = [sg / a for sg, a in zip(grid.sigma, grid.alpha, strict=True)]
    for i, out in enumerate(outs[:-1]):  # std: alpha_{i+1} times k-diffusion's sigma_up
        assert isinstance(out, Transition)
        up = grid.alpha[i + 1] * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)
        assert out.std == ups[i] and math.isclose(out.std, up, rel_tol=1e-12)
    assert not isinstance(outs[-1], Transition)  # into the clean end: the denoised estimate
    y = sd.sample(den, x_T, steps, solver, "logsnr_uniform", generator=Replay(draws))
    assert (x - y).abs().max() < 1e-12


@pytest.mark.parametrize(
    "solver",
    [DPMSolver2(eta=e, algorithm=a) for e in (0.0, 0.5, 1.0) for a in ("dpmsolver", "dpmsolver++")],
    ids=repr,
)
def test_transition_keeps_the_marginal(sd_process, solver):
    assert_keeps_point_marginal(solver, sd_process, "logsnr_uniform")


@pytest.mark.parametrize("name", ["dpm_2", *ANCESTRAL])
@pytest.mark.parametrize(("order", "final"), [(2, "zero"), (2, "none"), (1, "zero")])
def test_nfe(gmm, sd_process, name, order, final):
    base = sd.solvers.get(name)
    solver = DPMSolver2(order=order, algorithm=base.algorithm, eta=base.eta)
    _, info = sd.sample(
        gmm.denoiser(sd_process), noise(2, 8), 7, solver, "karras", final=final, generator=_gen(0),
        return_info=True,
    )  # fmt: skip
    want = {(2, "zero"): 13, (2, "none"): 14, (1, "zero"): 7}[order, final]
    assert info.nfe == solver.nfe(7, clean_end=final == "zero") == want


# --- convergence, exact laws, distribution --------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
def test_ode_converges_at_second_order(gmm, sd_process, algorithm):
    # against the exact ODE (gmm.reference_ode), 10..40 log-SNR-uniform steps: measured slopes 2.18 (dpm_2)
    # and 2.00 (data prediction); relative RMSE at 40 steps 1.2e-3 and 1.6e-3
    den, x_T = gmm.denoiser(sd_process), noise(4, 8)
    exact = exact_sample(gmm, sd_process, x_T)
    steps = [10, 14, 20, 28, 40]
    errors = [
        rel_rmse(sd.sample(den, x_T, n, DPMSolver2(algorithm=algorithm), "logsnr_uniform"), exact)
        for n in steps
    ]
    assert abs(slope(steps, errors) - 2) < 0.35, errors
    assert errors[-1] < 3e-3


@pytest.fixture(scope="module")
def dist_problem(gmm):
    n = 2000

    def sw(a: Tensor, b: Tensor) -> float:
        return sd.metrics.sliced_wasserstein(a, b, projections=256, generator=_gen(0))

    floor = sd.metrics.floor(gmm.sample, n, sw, repeats=3, generator=_gen(1))
    return noise(n, 8, seed=5), gmm.sample(n, _gen(9)), sw, floor


@pytest.mark.parametrize("name", ANCESTRAL)
def test_distribution_at_100_nfe(gmm, sd_process, dist_problem, name):
    x_T, exact, sw, floor = dist_problem
    x, info = sd.sample(
        gmm.denoiser(sd_process), x_T, 51, name, "logsnr_uniform", generator=_gen(2), return_info=True
    )
    assert info.nfe == 101
    assert sw(x, exact) < 1.5 * floor  # measured 1.00x (dpm_2_ancestral) and 0.99x the floor


# --- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DPMSolver2(eta=-0.1), r"DPMSolver2: eta"),
        (lambda: DPMSolver2(eta=1.5), r"DPMSolver2: eta"),
        (lambda: DPMSolver2(eta=math.nan), r"DPMSolver2: eta"),
        (lambda: DPMSolver2(algorithm="dpmsolver+"), r"DPMSolver2: algorithm"),
        (lambda: DPMSolver2(order=3), r"DPMSolver2: order"),
    ],
)
def test_bad_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _zero_snr() -> sd.Process:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    return sd.VP.discrete(betas=betas, rescale_zero_snr=True)


@pytest.mark.parametrize(
    "process",
    [sd.VP.scaled_linear(), _zero_snr(), sd.RectifiedFlow(), sd.EDM()],
    ids=["sd", "zero_snr", "flow", "edm"],
)
def test_a_long_step_takes_the_data_form(process):
    """A grid step dividing sigma / alpha by more than 20 (``karras`` at 2-3 steps: sigma_max to the ramp's
    end) takes DPM-Solver++(2S): before, the noise form's ``(s - s') eps(u)`` made it 13.8 / 72 / 685 / 117
    at 2 steps (SD betas, zero terminal SNR, flow, EDM) and 0.69 / 36 / 32 / 2.1 at 3, against ``ddim``'s
    0.81 / 0.92 / 0.93 / 0.91 and 0.37 / 0.90 / 0.84 / 0.49; now 0.51 / 0.76 / 0.59 / 0.89 and 0.19 / 0.44 /
    0.79 / 0.41 (16-d mixture, 256 samples). The same run as ``DPMSolver2(algorithm="dpmsolver++")`` there."""
    g = torch.Generator().manual_seed(0)
    means, variances = torch.randn(4, 16, generator=g, dtype=F64), torch.full((4, 16), 0.05, dtype=F64)
    gmm = sd.toy.GaussianMixture(means, variances, torch.full((4,), 0.25, dtype=F64))
    den = gmm.denoiser(process)
    x_T = torch.randn(256, 16, generator=g, dtype=F64) * float(process.sigma(process.t_max))
    ref = gmm.reference_ode(x_T, process, process.t_max, process.t_min, denoise=True)
    for steps in (2, 3):
        ours = sd.sample(den, x_T, steps, "dpm_2", "karras")
        assert rel_rmse(ours, ref) < rel_rmse(sd.sample(den, x_T, steps, "ddim", "karras"), ref)
        if steps == 2:  # its one noisy step is long
            data = sd.sample(den, x_T, steps, DPMSolver2(algorithm="dpmsolver++"), "karras")
            assert rel_rmse(ours, data) < 1e-12
