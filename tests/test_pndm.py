"""PNDM and PLMS (Liu et al. 2022) against diffusers' ``PNDMScheduler``, the exact ODE and exact counts.

Parity notes (diffusers 0.42): ``PNDMScheduler`` runs on ``leading`` timesteps; its last step goes from the
last node to ``alphas_cumprod[0]`` (``set_alpha_to_one=False``: the identity from ``t = 0``, a step to
``t = 0`` with ``steps_offset=1``), where steerdiff's clean end returns the denoised estimate at the last
node. States are compared at the end of every step before that one (its intermediate PRK / improved Euler
calls dropped), and the clean end against the exact denoiser of diffusers' state at the last node. PRK's
half step is ``t - step_ratio // 2`` there and the midpoint in process time here: equal for even step
ratios (1000 / 10, 20, 50 steps).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import steerdiff as sd
from steerdiff.integrations.diffusers import SteerdiffScheduler, denoiser_from_diffusers
from steerdiff.integrations.diffusers_ref import run_scheduler
from steerdiff.solvers import PNDM, Model, make_grid

from .reference import PARITY_BOUND, eps_net, noise, rel_rmse, sd_betas_config, slope

diffusers = pytest.importorskip("diffusers")

PLMS = PNDM(warmup="improved_euler")


def _diffusers_states(gmm, process, x_T, steps, skip_prk, offset):
    """``PNDMScheduler``'s state at the end of each of its steps, and its number of net calls."""
    sched = diffusers.PNDMScheduler(**sd_betas_config(), skip_prk_steps=skip_prk, steps_offset=offset)
    out: list[torch.Tensor] = []
    _, nfe = run_scheduler(sched, eps_net(gmm, process), x_T, steps, callback=lambda i, x: out.append(x))
    # PLMS: the first call's point is the improved Euler step's predictor; PNDM: 3 PRK steps of 4 calls
    return (out[1:] if skip_prk else out[3:12:4] + out[12:]), nfe


@pytest.mark.parametrize(
    ("solver", "steps", "offset"),
    [(s, n, 0) for s in (PNDM(), PLMS) for n in (10, 20, 50)]
    + [(PNDM(), 20, 1), (PLMS, 50, 1), (PLMS, 30, 1)],
    ids=lambda v: getattr(v, "name", v),
)
def test_matches_diffusers(gmm, sd_process, x_T, solver, steps, offset):
    # measured: max 4.9e-7 over these cases (float32 alphas_cumprod on diffusers' side)
    ref, nfe = _diffusers_states(gmm, sd_process, x_T, steps, solver.warmup == "improved_euler", offset)
    ours: list[torch.Tensor] = []
    schedule = sd.schedules.Leading(steps_offset=offset)
    x, info = sd.sample(
        gmm.denoiser(sd_process),
        x_T,
        steps,
        solver,
        schedule,
        return_info=True,
        callback=lambda d: ours.append(d["x"]),
    )
    assert len(ours) == len(ref) == steps
    assert info.nfe == nfe == solver.nfe(steps)
    assert (
        max(rel_rmse(a, b) for a, b in zip(ours[:-1], ref[:-1], strict=True)) < PARITY_BOUND["PNDMScheduler"]
    )
    t_last = float(schedule(sd_process, steps)[-1])
    a, s = float(sd_process.alpha(t_last)), float(sd_process.sigma(t_last))
    assert rel_rmse(x, gmm.denoise(ref[-2], a, s)) < PARITY_BOUND["PNDMScheduler"]


class _Times(Model):
    """A model that records where it is evaluated."""

    def __init__(self, den: sd.Denoiser) -> None:
        super().__init__(den)
        self.times: list[float] = []

    def __call__(self, x, t, step):
        self.times.append(t)
        return super().__call__(x, t, step)


def _run(solver, grid, den, x, moved_at=None):
    """``solver`` over ``grid`` step by step: each step's evaluation times (``moved`` before ``moved_at``)."""
    model, state, per_step = _Times(den), solver.init_state(grid), []
    for i in range(grid.steps):
        if i == moved_at:
            solver.moved(state)
        start = len(model.times)
        x = solver.step(model, x, i, grid, state)
        per_step.append(model.times[start:])
    return per_step


def test_prk_evaluates_at_the_midpoint_in_process_time(gmm, sd_process, x_T):
    # 1000 // 30 = 33: the half steps are fractional timesteps (diffusers' t - 16 is off the midpoint)
    grid = make_grid(sd_process, sd.schedules.Leading(), 30)
    times = _run(PNDM(), grid, gmm.denoiser(sd_process), x_T)
    for i in range(3):
        t, t_next = grid.t[i], grid.t[i + 1]
        assert times[i] == [t, (t + t_next) / 2, (t + t_next) / 2, t_next]
    assert [len(ts) for ts in times[3:]] == [1] * 27
    plms = _run(PLMS, grid, gmm.denoiser(sd_process), x_T)
    assert plms[0] == [grid.t[0], grid.t[1]] and [len(ts) for ts in plms[1:]] == [1] * 29


def test_a_move_restarts_the_warmup(gmm, sd_process, x_T):
    grid = make_grid(sd_process, sd.schedules.Karras(), 10)
    den = gmm.denoiser(sd_process)
    assert [len(ts) for ts in _run(PNDM(), grid, den, x_T, moved_at=5)] == [4, 4, 4, 1, 1, 4, 4, 4, 1, 1]
    assert [len(ts) for ts in _run(PLMS, grid, den, x_T, moved_at=5)] == [2, 1, 1, 1, 1, 2, 1, 1, 1, 1]


@pytest.mark.parametrize(
    ("solver", "final", "counts"),
    [
        (PNDM(), "zero", [1, 5, 9, 13, 14, 15]),  # PRK (4) on the first 3 noisy steps, 1 into the clean end
        (PNDM(), "none", [4, 8, 12, 13, 14, 15]),
        (PNDM(order=2), "zero", [1, 5, 6, 7, 8, 9]),  # PRK while fewer than order - 1 estimates are held
        (PLMS, "zero", [1, 3, 4, 5, 6, 7]),  # improved Euler (2) first
        (PLMS, "none", [2, 3, 4, 5, 6, 7]),
    ],
    ids=lambda v: getattr(v, "name", v),
)
def test_nfe_is_exact(gmm, sd_process, x_T, solver, final, counts):
    den = gmm.denoiser(sd_process)
    for steps, expected in enumerate(counts, start=1):
        _, info = sd.sample(den, x_T, steps, solver, "karras", final=final, return_info=True)
        assert info.nfe == solver.nfe(steps, clean_end=final == "zero") == expected


def test_plms_order_1_is_one_improved_euler_step_then_ddim(gmm, sd_process, x_T):
    """At order 1 the improved Euler warm-up is the first step only, then Euler (DDIM) steps, as ``nfe``
    counts. Before, the history (one entry, trimmed to none after each step) never told the warm-up done:
    every step was improved Euler (karras, 6 steps: 11 NFE against nfe's 7)."""
    solver, den = PNDM(order=1, warmup="improved_euler"), gmm.denoiser(sd_process)
    nodes = sd.schedules.Karras()(sd_process, 7).tolist()
    x, info = sd.sample(den, x_T, 6, solver, sd.schedules.Custom(nodes), final="none", return_info=True)
    assert info.nfe == solver.nfe(6, clean_end=False) == 7
    x_1 = sd.sample(den, x_T, 1, solver, sd.schedules.Custom(nodes[:2]), final="none")
    ddim = sd.sample(den, x_1, 5, "ddim", sd.schedules.Custom(nodes[1:]), final="none")
    assert rel_rmse(x, ddim) < 1e-14  # the same step in other arithmetic


# Uniform steps in s = sigma / alpha (the fixed Adams-Bashforth weights' assumption) on EDM's process,
# where s = t: the PRK midpoint in time is the midpoint in s and PRK is classical RK4 in (x / alpha, s).
# Theory: PNDM 4 (RK4 warm-up, AB4); PLMS 3 (its improved Euler and AB2 steps: O(d^3) each); S-PNDM
# (PLMS at order 2) 2. Measured over s in [0.1, 1], 10-80 steps: 4.13, 3.06, 1.99 (3.06 drifts to 3.00
# over 20-160; on SD's VP process the PRK node is O(d) off the s midpoint, third order only asymptotically:
# 3.38 over 10-80 there).
CONVERGENCE = [(PNDM(), 4), (PLMS, 3), (PNDM(warmup="improved_euler", order=2), 2)]
S_MIN, S_MAX, STEPS = 0.1, 1.0, [10, 20, 40, 80]


@pytest.mark.parametrize(("solver", "order"), CONVERGENCE, ids=lambda v: repr(v))
def test_global_convergence_order(gmm, x_T, solver, order):
    process = sd.EDM()
    x_start = gmm.reference_ode(x_T, process, process.t_max, S_MAX)
    exact = gmm.reference_ode(x_start, process, S_MAX, S_MIN, rtol=1e-12, atol=1e-12)
    schedule = sd.schedules.Karras(rho=1.0, sigma_min=S_MIN, sigma_max=S_MAX)
    den = gmm.denoiser(process)
    errors = [rel_rmse(sd.sample(den, x_start, n, solver, schedule, final="none"), exact) for n in STEPS]
    assert min(errors) > 1e-8  # well above the reference ODE's tolerance
    assert abs(slope(STEPS, errors) - order) < 0.35


@pytest.mark.parametrize("solver", ["pndm", "plms"])
def test_pipeline_loop_is_sd_sample(solver):
    # Stable Diffusion's PNDM config (steps_offset=1, skip_prk_steps) and 1000 // 14 = 71 (PRK's half
    # steps at fractional timesteps): SteerdiffScheduler in a pipeline's loop gives sd.sample's result
    config = diffusers.PNDMScheduler(**sd_betas_config(), skip_prk_steps=True, steps_offset=1).config
    flat = eps_net(sd.toy.default_benchmark_mixture(dim=16), sd.VP.scaled_linear())

    def net(x, t):
        return flat(x.reshape(-1, 16).double(), t).reshape(x.shape).to(x.dtype)

    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sched = SteerdiffScheduler.from_config(config, solver=solver, schedule="leading")
    x, nfe = run_scheduler(sched, net, x_T, 14)
    ref, info = sd.sample(
        denoiser_from_diffusers(net, config),
        x_T,
        14,
        solver,
        sd.schedules.Leading(steps_offset=1),
        return_info=True,
    )
    assert nfe == info.nfe == sd.solvers.get(solver).nfe(14)
    assert any(t % 1 for t in sched.timesteps.tolist()) == (solver == "pndm")
    assert torch.equal(x, ref)


@pytest.mark.parametrize(
    ("solver", "k", "j", "ours", "listed"), [("plms", 2, 1, 10, 9), ("pndm", 8, 2, 17, 11)]
)
def test_a_pipeline_cannot_begin_after_the_warmup_starts(solver, k, j, ours, listed):
    """img2img: begun at a later step the warm-up starts again and evaluates more than the ``timesteps`` a
    pipeline slices (plms at step 1 of 10: 10 against 9), so the run is refused, naming why. Before, the
    message said ``timesteps[k]`` was not where a step starts, though it was."""
    sched = SteerdiffScheduler.from_config(sd_betas_config(), solver=solver, schedule="karras")
    sched.set_timesteps(10)
    sched.set_begin_index(k)
    x = torch.zeros(1, 4)
    with pytest.raises(
        ValueError,
        match=rf"timesteps\[{k}\] .*, the start of step {j}: .* {ours} times, not the {listed} that",
    ):
        sched.step(x, sched.timesteps[k], x)


def test_registry_and_options():
    assert (sd.solvers.get("pndm"), sd.solvers.get("plms")) == (PNDM(), PLMS)
    assert (PNDM().name, PLMS.name, PNDM(order=2, warmup="improved_euler").name) == ("pndm", "plms", "plms")
    with pytest.raises(
        ValueError, match=r"^PNDM: warmup must be one of \['prk', 'improved_euler'\], got 'rk4'$"
    ):
        PNDM(warmup="rk4")


ZERO_SNR = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rescale_zero_snr=True)


@pytest.mark.parametrize("process", [ZERO_SNR, sd.RectifiedFlow()], ids=["zero_snr", "flow"])
@pytest.mark.parametrize("solver", [PNDM(), PLMS], ids=lambda v: v.name)
def test_steps_dividing_s_by_a_large_factor(process, solver):
    """karras_capped's first step divides s = sigma / alpha by 1000 (zero terminal SNR: 3e4 -> 30) or 33
    (flow). PRK transferred x_T with slopes from the end of the step, weighted by alpha' (s' - s), and the
    improved Euler trapezoid in s weighs their change by (s - s') / 2; such steps now combine the estimates'
    x0 (PRK) or take Heun's exponential trapezoid (edm.HEUN_MAX_RATIO). 16-d mixture, 256 samples, 10 steps
    against the exact ODE, zero SNR / flow: pndm 2.25e4 / 3.41 -> 0.085 / 0.104, plms 3.35 / 0.31 -> 0.087 /
    0.104 (ipndm 0.085 / 0.085). float32 against float64 at zero terminal SNR (linspace, trailing; 10, 25
    steps): 0.39 / 0.094 -> 3.5e-6 / 1.2e-5 (the DDIM step from x and an eps derived from the net's x0 took
    x / alpha)."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    den, x_T = gmm.denoiser(process), noise(256, 16, seed=0)
    exact = gmm.reference_ode(x_T, process, process.t_max, process.t_min, denoise=True)
    ours, ipndm = (rel_rmse(sd.sample(den, x_T, 10, s, "karras_capped"), exact) for s in (solver, "ipndm"))
    assert ours < 1.5 * ipndm
    if process is ZERO_SNR:
        for schedule, steps in itertools.product(("linspace", "trailing"), (10, 25)):
            a = sd.sample(den, x_T, steps, solver, schedule)
            b = sd.sample(den, x_T.float(), steps, solver, schedule).double()
            assert rel_rmse(b, a) < 2e-5


@pytest.mark.parametrize(
    ("process", "schedule", "steps"),
    [
        (sd.VP.cosine(), "time_uniform", 12),
        (sd.RectifiedFlow(), "logsnr_uniform", 6),
        (sd.RectifiedFlow(), "karras_jump", 5),
    ],
    ids=["cosine_time_uniform", "flow_logsnr_uniform", "flow_karras_jump"],
)
def test_prk_takes_its_data_form_from_a_ratio_of_5(gmm, x_T, process, schedule, steps):
    """PRK warm-up steps dividing s = sigma / alpha by 8-18 (below Heun's 20) in noise form ended far from the
    exact ODE, its half step (the midpoint in time) being far off the midpoint in s there: relative RMSE
    1.81 / 4.79 / 1.45 against ddim's 0.093 / 0.481 / 0.543 on these grids; with the data form from
    pndm.PRK_MAX_RATIO = 5 on 0.0081 / 0.053 / 0.41."""
    den = gmm.denoiser(process)
    exact = gmm.reference_ode(x_T, process, process.t_max, process.t_min, denoise=True)
    ours, ddim = (rel_rmse(sd.sample(den, x_T, steps, s, schedule), exact) for s in ("pndm", "ddim"))
    assert ours < 0.8 * ddim
