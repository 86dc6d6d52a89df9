"""Multistep consistency sampling (``tcd``, ``lcm``): DDIM at ``gamma = 0``, the transition against the
paper's two stages, exact output laws on Gaussian data (the exact denoiser; the exact consistency
function, with which ``gamma = 1`` samples the data law at any step count), and parity with diffusers'
``TCDScheduler`` and ``LCMScheduler`` under the same normal draws."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import steerdiff as sd
from steerdiff.integrations.diffusers import SteerdiffScheduler, denoiser_from_diffusers
from steerdiff.integrations.diffusers_ref import run_scheduler
from steerdiff.solvers import TCD, Model, Transition, make_grid

from .reference import PARITY_BOUND, Record, diffusers_sample, eps_net, noise, rel_rmse, sd_betas_config

F64 = torch.float64
PROCESSES = {
    "sd": sd.VP.scaled_linear(),
    "vp_linear": sd.VP.linear(),
    "edm": sd.EDM(),
    "flow": sd.RectifiedFlow(),
}


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def test_registry_names():
    tcd, lcm = sd.solvers.get("tcd"), sd.solvers.get("lcm")
    assert isinstance(tcd, TCD) and tcd.gamma == 0.3 and tcd.stochastic
    assert isinstance(lcm, TCD) and lcm.gamma == 1.0 and lcm.name == "lcm"
    assert TCD(gamma=1.0, floor_s=True).name == "tcd" and not TCD(gamma=0.0).stochastic


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("final", ["zero", "none"])
def test_gamma_0_is_ddim(gmm, process, final):
    # s = t_{i+1}: no noise, the DDIM step; measured max |difference| 0 (the same two renoise terms)
    den, x_T = gmm.denoiser(PROCESSES[process]), noise(4, 8)
    kw = {"steps": 12, "schedule": "karras", "final": final}
    x = sd.sample(den, x_T, solver=TCD(gamma=0.0), generator=Record(0), **kw)
    assert torch.allclose(x, sd.sample(den, x_T, solver="ddim", **kw), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "solver", [TCD(), TCD(gamma=0.7), TCD(gamma=1.0), TCD(gamma=0.3, floor_s=True)], ids=repr
)
@pytest.mark.parametrize("process", ["sd", "edm"])
def test_transition_is_the_papers_two_stages(gmm, process, solver):
    """Each step of a run is its transition drawn with the run's noise, and that transition is the
    paper's: DDIM to ``s = (1 - gamma) t_{i+1}`` (floored with ``floor_s``, the clean end at
    ``gamma = 1``), then the forward process from ``s`` up to ``t_{i+1}``, written out here from the
    process's ``alpha``, ``sigma``."""
    p = PROCESSES[process]
    if solver.floor_s and process != "sd":
        pytest.skip("floor_s needs timestep indices (test_floor_s_is_refused_off_timestep_indices)")
    den, x_T, replay, xs = gmm.denoiser(p), noise(3, 8), Record(4), []
    _, info = sd.sample(
        den,
        x_T,
        steps=6,
        solver=solver,
        generator=replay,
        callback=lambda s: xs.append(s["x"]),
        return_info=True,
    )
    grid, draws, prev = info.grid, iter(replay.drawn), x_T
    for i, x_next in enumerate(xs):
        out = solver.step(Model(den), prev, i, grid, {})
        pred = den(prev, grid.t[i])
        if i == grid.steps - 1:  # into the clean end: the denoised estimate, no noise
            assert isinstance(out, torch.Tensor) and torch.equal(out, pred.x0) and torch.equal(out, x_next)
            break
        s = (1 - solver.gamma) * grid.t[i + 1]
        s = math.floor(s) if solver.floor_s else s
        clean = solver.gamma == 1 and not solver.floor_s
        a_s, s_s = (1.0, 0.0) if clean else (float(p.alpha(s)), float(p.sigma(s)))
        ratio = grid.alpha[i + 1] / a_s
        x_s = a_s * pred.x0 + s_s * pred.eps
        assert isinstance(out, Transition)
        assert torch.allclose(out.mean, ratio * x_s, rtol=0, atol=1e-12)
        assert math.isclose(out.std**2, grid.sigma[i + 1] ** 2 - ratio**2 * s_s**2, rel_tol=1e-12)
        assert torch.allclose(out.mean + out.std * next(draws), x_next, rtol=0, atol=1e-12)
        prev = x_next
    assert next(draws, None) is None and len(replay.drawn) == grid.steps - 1


def test_floor_s_at_gamma_0_draws_the_noise_of_a_fractional_node(gmm, sd_process, x_T):
    """``floor_s`` puts ``s = floor(t_{i+1})`` below a fractional ``t_{i+1}`` even at ``gamma = 0``, so the
    step is TCD's two stages with noise (``karras``: ``t_1 = 687.15``, ``s = 687``, std 0.033). Before,
    ``gamma = 0`` counted as deterministic and the noise was dropped: the mean alone, 0.021 relative RMSE
    from DDIM and without the variance the step owes."""
    den, solver = gmm.denoiser(sd_process), TCD(gamma=0.0, floor_s=True)
    assert solver.stochastic
    runs = [
        sd.sample(den, x_T, 4, s, "karras", generator=torch.Generator().manual_seed(3))
        for s in (solver, TCD(gamma=1e-12, floor_s=True))  # the same s at every node
    ]
    assert torch.equal(*runs)


# --- exact laws on Gaussian data ----------------------------------------------------------------

MU = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64)
VAR = torch.tensor([0.25, 1.0, 2.0, 0.5], dtype=F64)
GAUSS = sd.toy.GaussianMixture(MU[None], VAR[None], torch.ones(1, dtype=F64))


def consistency_function(process: sd.Process) -> sd.Denoiser:
    """The exact consistency function of ``N(MU, diag(VAR))``: the probability-flow ODE's map from
    ``x_t`` to its clean end. The ODE keeps each coordinate's standardized value ``(x_t - alpha mu) /
    sqrt(alpha^2 v + sigma^2)`` (it is linear and moves the Gaussian marginals into each other), so
    ``f(x_t, t) = mu + sqrt(v) (x_t - alpha mu) / sqrt(alpha^2 v + sigma^2)``."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = (float(c(float(t[0]))) for c in (process.alpha, process.sigma))
        return MU + VAR.sqrt() * (x - a * MU) / (a * a * VAR + s * s).sqrt()

    return sd.Denoiser(net, process, prediction="x0")


def closed_form_law(solver: TCD, grid: sd.solvers.Grid, gain, mean, var):
    """The output law ``N(mean, diag(var))`` of ``solver`` over ``grid`` from ``N(mean, diag(var))``
    for a denoiser ``x0 = gain(alpha, sigma) (x - alpha MU) + MU`` (per coordinate), from the paper's
    step alone: ``x_{i+1} = r (alpha_s x0 + sigma_s (x - alpha_i x0) / sigma_i) + std z``."""
    p = grid.process
    for i in range(grid.steps):
        a, s = grid.alpha[i], grid.sigma[i]
        k = gain(a, s)  # x0 = k x + (1 - k a) MU
        if i == grid.steps - 1 and grid.clean_end:
            return k * mean + (1 - k * a) * MU, k * k * var
        t_s = (1 - solver.gamma) * grid.t[i + 1]
        a_s, s_s = (1.0, 0.0) if solver.gamma == 1 else (float(p.alpha(t_s)), float(p.sigma(t_s)))
        r = grid.alpha[i + 1] / a_s
        c = a_s - s_s * a / s  # x_{i+1} = r (c x0 + (sigma_s / sigma_i) x) + std z
        slope, offset = r * (c * k + s_s / s), r * c * (1 - k * a) * MU
        mean, var = slope * mean + offset, slope**2 * var + grid.sigma[i + 1] ** 2 - r * r * s_s * s_s
    return mean, var


def exact_denoiser_gain(a: float, s: float) -> torch.Tensor:
    return a * VAR / (a * a * VAR + s * s)


def consistency_gain(a: float, s: float) -> torch.Tensor:
    return VAR.sqrt() / (a * a * VAR + s * s).sqrt()


def law_of_run(solver: TCD, den: sd.Denoiser, grid: sd.solvers.Grid, mean, var):
    """The output law read off the solver's own transitions (affine in ``x``: probed at 0 and 1)."""
    model, basis = Model(den), torch.stack([torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)])
    for i in range(grid.steps):
        out = solver.step(model, basis, i, grid, {})
        m, std = (out.mean, out.std) if isinstance(out, Transition) else (out, 0.0)
        slope = m[1] - m[0]
        mean, var = slope * mean + m[0], slope**2 * var + std**2
    return mean, var


def _monte_carlo_z(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[float, float]:
    """Largest |z| of the sample mean and variance against ``N(mean, diag(var))``."""
    n = x.shape[0]
    z_mean = ((x.mean(0) - mean).abs() / (var / n).sqrt()).max()
    z_var = ((x.var(0) - var).abs() / (var * math.sqrt(2 / n))).max()
    return float(z_mean), float(z_var)


def _x_T(process: sd.Process, n: int, seed: int) -> torch.Tensor:
    """``n`` exact draws of the Gaussian data's marginal at ``t_max``."""
    a, s = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a * MU + (a * a * VAR + s * s).sqrt() * z


@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("process", ["sd", "edm"])
def test_gaussian_law_with_the_exact_denoiser(process, gamma):
    """With the exact (affine) denoiser of Gaussian data the output is Gaussian, its law propagated
    through the paper's step (:func:`closed_form_law`): the solver's transitions give it to 1e-12, and
    4000 samples of ``sd.sample`` match it within Monte Carlo error (measured max |z| 2.2)."""
    p, solver, steps = PROCESSES[process], TCD(gamma=gamma), 4
    a, s = float(p.alpha(p.t_max)), float(p.sigma(p.t_max))
    start = (a * MU, a * a * VAR + s * s)
    grid = make_grid(p, sd.schedules.get("karras"), steps)
    mean, var = closed_form_law(solver, grid, exact_denoiser_gain, *start)
    run_mean, run_var = law_of_run(solver, GAUSS.denoiser(p), grid, *start)
    assert torch.allclose(run_mean, mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(run_var, var, rtol=1e-10, atol=1e-12)
    assert (var < 0.95 * VAR).any()  # few steps of a posterior-mean denoiser: not the data law
    x = sd.sample(
        GAUSS.denoiser(p),
        _x_T(p, 4000, 0),
        steps=steps,
        solver=solver,
        schedule="karras",
        generator=torch.Generator().manual_seed(1),
    )
    assert max(_monte_carlo_z(x, mean, var)) < 4.5


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("process", PROCESSES)
def test_lcm_with_the_exact_consistency_function_samples_the_data(process, steps):
    """Song et al. 2023, Alg. 1 with the exact consistency function: the data law ``N(MU, VAR)`` at
    every step count, exactly (the propagated law to 1e-12; 4000 samples within Monte Carlo error,
    measured max |z| 1.9). TCD's ``gamma = 0.3`` with the same function is not exact (its ``x_s`` is
    a DDIM point, not the flow's): the variance off by 0.28% (flow, 2 steps) to 110% (SD's betas, 8)."""
    p = PROCESSES[process]
    a, s = float(p.alpha(p.t_max)), float(p.sigma(p.t_max))
    start = (a * MU, a * a * VAR + s * s)
    grid, den = make_grid(p, sd.schedules.get("karras"), steps), consistency_function(p)
    lcm = sd.solvers.get("lcm")
    for law in (closed_form_law(lcm, grid, consistency_gain, *start), law_of_run(lcm, den, grid, *start)):
        assert torch.allclose(law[0], MU, rtol=0, atol=1e-12) and torch.allclose(law[1], VAR, rtol=1e-12)
    x = sd.sample(
        den,
        _x_T(p, 4000, steps),
        steps=steps,
        solver="lcm",
        schedule="karras",
        generator=torch.Generator().manual_seed(100 + steps),
    )
    assert max(_monte_carlo_z(x, MU, VAR)) < 4.5
    if steps > 1:
        _, var = law_of_run(TCD(gamma=0.3), den, grid, *start)
        assert float((var / VAR - 1).abs().max()) > 2e-3


# --- parity with diffusers under the same noise --------------------------------------------------


@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0])
def test_tcd_matches_tcd_scheduler(diffusers, gmm, sd_process, x_T, steps, gamma):
    """TCDScheduler (its ``eta`` is gamma) ends at timestep 0 and places ``s`` at the integer timestep
    ``floor((1 - gamma) t_{i+1})``, timestep 0 at gamma = 1: ``floor_s=True`` over its timesteps and 0
    with ``final="none"`` (the last step's ``s`` is its end, no noise). Measured 3.7e-7..5.6e-7; without
    ``floor_s`` 6.0e-4..1.7e-3 (gamma 0.3, 0.7), 3.9e-2..4.2e-2 (gamma 1: LCM's clean ``s``)."""
    sched = diffusers.TCDScheduler(**sd_betas_config())
    sched.step = functools.partial(sched.step, eta=gamma)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps, torch.Generator().manual_seed(3))
    kw = {
        "steps": steps,
        "schedule": sd.schedules.Custom([*sched.timesteps.tolist(), 0]),
        "final": "none",
        "generator": torch.Generator().manual_seed(3),
    }
    x, info = sd.sample(
        gmm.denoiser(sd_process), x_T, solver=TCD(gamma=gamma, floor_s=True), return_info=True, **kw
    )
    assert info.nfe == nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["TCDScheduler"]
    kw["generator"] = torch.Generator().manual_seed(3)
    assert rel_rmse(sd.sample(gmm.denoiser(sd_process), x_T, solver=TCD(gamma=gamma), **kw), ref) > 2e-4


def lcm_config(**overrides) -> dict:
    """An LCMScheduler config as a pipeline's (with its ``_class_name``: made in code, LCM's and TCD's
    configs are the same) on Stable Diffusion's betas."""
    diffusers = pytest.importorskip("diffusers")
    return {**diffusers.LCMScheduler(**sd_betas_config(**overrides)).config, "_class_name": "LCMScheduler"}


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_lcm_scheduler(diffusers, gmm, sd_process, x_T, steps):
    """LCMScheduler: ``x_{i+1} = alpha_{i+1} x0' + sigma_{i+1} z``, no noise at its last timestep,
    whose ``x0'`` it returns (the clean end here); ``x0'`` is its boundary condition on the net's estimate,
    :class:`~steerdiff.guidance.ConsistencyBoundary` as ``denoiser_from_diffusers`` reads the config.
    Measured 7.2e-8..7.9e-7 (1 step the largest)."""
    cfg = lcm_config()
    sched = diffusers.LCMScheduler.from_config(cfg)
    ref, nfe = run_scheduler(sched, eps_net(gmm, sd_process), x_T, steps, torch.Generator().manual_seed(3))
    den = denoiser_from_diffusers(eps_net(gmm, sd_process), cfg)
    assert isinstance(den, sd.guidance.ConsistencyBoundary) and den.timestep_scaling == 10.0
    kw = {"steps": steps, "solver": "lcm", "schedule": sd.schedules.Custom(sched.timesteps.tolist())}
    x, info = sd.sample(den, x_T, generator=torch.Generator().manual_seed(3), return_info=True, **kw)
    assert info.nfe == nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["LCMScheduler"]
    if steps > 1:
        other = sd.sample(den, x_T, generator=torch.Generator().manual_seed(4), **kw)
        assert rel_rmse(other, ref) > 1e-2


@pytest.mark.parametrize("clip", [False, True])
def test_steerdiff_scheduler_runs_an_lcm_config(diffusers, gmm, sd_process, x_T, clip):
    """``SteerdiffScheduler.from_config`` of an LCMScheduler config (before: refused, "a
    consistency-distilled model") samples with ``lcm`` by default and LCM's boundary condition applied after
    its ``clip_sample``, as LCMScheduler does: in a pipeline loop it matches LCMScheduler, measured
    7.8e-8 / 9.6e-8. The timesteps end at 19 (on LCM's distillation schedule), where ``c_skip = 6.9e-6``:
    without the boundary condition 3.8e-6 / 4.4e-6 from it, with it before the clipping 3.6e-6. (At
    LCMScheduler's own timesteps, down to 259 at 4 steps, the condition moves the result by 3.7e-7.)"""
    cfg = lcm_config(clip_sample=clip, clip_sample_range=0.5)
    net, times = eps_net(gmm, sd_process), [999, 499, 259, 19]
    ref, _ = run_scheduler(
        diffusers.LCMScheduler.from_config(cfg),
        net,
        x_T,
        None,
        torch.Generator().manual_seed(3),
        timesteps=times,
    )
    ours = SteerdiffScheduler.from_config(cfg)
    x, nfe = run_scheduler(ours, net, x_T, None, torch.Generator().manual_seed(3), timesteps=times)
    assert nfe == len(times) and ours.config["origin"] == "LCMScheduler"
    assert isinstance(ours._run.solver, TCD) and ours._run.solver.name == "lcm"
    assert rel_rmse(x, ref) < PARITY_BOUND["LCMScheduler"]
    plain = sd.Denoiser(net, sd_process)
    others = [sd.guidance.DynamicThreshold(plain, None, 0.5) if clip else plain]
    if clip:
        others.append(sd.guidance.DynamicThreshold(sd.guidance.ConsistencyBoundary(plain), None, 0.5))
        unclipped, _ = run_scheduler(
            diffusers.LCMScheduler.from_config(lcm_config()),
            net,
            x_T,
            None,
            torch.Generator().manual_seed(3),
            timesteps=times,
        )
        assert rel_rmse(unclipped, ref) > 1e-2
    kw = {"steps": len(times), "solver": "lcm", "schedule": sd.schedules.Custom(times)}
    for other in others:
        assert rel_rmse(sd.sample(other, x_T, generator=torch.Generator().manual_seed(3), **kw), ref) > 1e-6


@pytest.mark.parametrize("clip", [False, True])
def test_steerdiff_scheduler_runs_a_tcd_config(diffusers, gmm, sd_process, x_T, clip):
    """A TCDScheduler config is its net as it is (no boundary condition; its ``clip_sample`` unused, as
    TCDScheduler leaves it), sampled with ``tcd`` by default; with ``TCD(floor_s=True)`` and
    ``final="none"`` over its timesteps and 0 it matches TCDScheduler. Measured 1.0e-7."""
    cfg = {
        **diffusers.TCDScheduler(**sd_betas_config(clip_sample=clip)).config,
        "_class_name": "TCDScheduler",
    }
    net, steps = eps_net(gmm, sd_process), 4
    sched = diffusers.TCDScheduler.from_config(cfg)
    ref, _ = run_scheduler(sched, net, x_T, steps, torch.Generator().manual_seed(3))
    assert type(denoiser_from_diffusers(net, cfg)) is sd.Denoiser
    ours = SteerdiffScheduler.from_config(cfg, solver=TCD(floor_s=True), final="none")
    times = [*sched.timesteps.tolist(), 0]
    x, nfe = run_scheduler(ours, net, x_T, None, torch.Generator().manual_seed(3), timesteps=times)
    assert nfe == steps and rel_rmse(x, ref) < PARITY_BOUND["TCDScheduler"]
    default = SteerdiffScheduler.from_config(cfg)
    default.set_timesteps(steps)
    assert default._run.solver == TCD()


def consistency_config(cls: str, **overrides) -> dict:
    """``cls``'s config (LCMScheduler's or TCDScheduler's) on Stable Diffusion's betas, with its name."""
    diffusers = pytest.importorskip("diffusers")
    return {**getattr(diffusers, cls)(**sd_betas_config(**overrides)).config, "_class_name": cls}


# (steps, set_timesteps' keyword arguments): LatentConsistencyModelPipeline passes
# original_inference_steps, its img2img pipeline strength too
DEFAULT_GRIDS = [
    (1, {}),
    (2, {}),
    (4, {}),
    (8, {}),
    (4, {"original_inference_steps": 25}),
    (4, {"strength": 0.5}),
    (3, {"strength": 0.6, "original_inference_steps": 40}),
]


@pytest.mark.parametrize(("steps", "kw"), DEFAULT_GRIDS)
def test_steerdiff_scheduler_takes_lcm_schedulers_timesteps(diffusers, gmm, sd_process, x_T, steps, kw):
    """An LCM config's default schedule is ``LCM`` with the config's ``original_inference_steps`` (before:
    ``karras_capped``, 4 steps 999, 786.7, 430.0, 60.5, off the distillation timesteps), and ``set_timesteps``
    takes ``original_inference_steps`` and ``strength`` (before: a TypeError): in a pipeline loop it
    matches LCMScheduler with its own timesteps, measured 2.5e-8..7.9e-7 (1 step the largest), and equals
    ``sd.sample(den, x_T, steps, "lcm", LCM(...))`` ("lcm" by name at the defaults) to the bit."""
    cfg = consistency_config("LCMScheduler")
    net = eps_net(gmm, sd_process)
    theirs = diffusers.LCMScheduler.from_config(cfg)
    ref, _ = run_scheduler(theirs, net, x_T, steps, torch.Generator().manual_seed(3), **kw)
    ours = SteerdiffScheduler.from_config(cfg)
    x, nfe = run_scheduler(ours, net, x_T, steps, torch.Generator().manual_seed(3), **kw)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() and nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["LCMScheduler"]
    schedule = sd.schedules.LCM(kw.get("original_inference_steps", 50), kw.get("strength", 1.0))
    den = denoiser_from_diffusers(net, cfg)
    alone = sd.sample(
        den, x_T, steps, "lcm", schedule if kw else "lcm", generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(alone, x)


@pytest.mark.parametrize(
    ("steps", "kw"), [g for g in DEFAULT_GRIDS if "original_inference_steps" not in g[1]]
)
def test_steerdiff_scheduler_takes_tcd_schedulers_timesteps(diffusers, gmm, sd_process, x_T, steps, kw):
    """A TCD config's default schedule is ``LCM`` too; with TCDScheduler's integer ``s``
    (``TCD(floor_s=True)``, its default ``eta`` 0.3) and ``final="none"`` (the schedule then ends at timestep
    0, ``clean_node=True``: TCDScheduler steps there last) it matches TCDScheduler with its own timesteps,
    measured 4.3e-8..7.8e-7, and equals ``sd.sample`` on ``LCM(..., clean_node=True)`` to the bit. The
    default solver, ``tcd``, ends in the clean state with ``final="zero"`` on the same timesteps. (An explicit
    ``original_inference_steps`` TCDScheduler reads otherwise: the next test.)"""
    cfg = consistency_config("TCDScheduler")
    net = eps_net(gmm, sd_process)
    theirs = diffusers.TCDScheduler.from_config(cfg)
    ref, _ = run_scheduler(theirs, net, x_T, steps, torch.Generator().manual_seed(3), **kw)
    floor = TCD(floor_s=True)
    ours = SteerdiffScheduler.from_config(cfg, solver=floor, final="none")
    x, nfe = run_scheduler(ours, net, x_T, steps, torch.Generator().manual_seed(3), **kw)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() and nfe == steps
    assert ours._run.grid.t[-1] == 0.0 and not ours._run.grid.clean_end
    assert rel_rmse(x, ref) < PARITY_BOUND["TCDScheduler"]
    schedule = sd.schedules.LCM(kw.get("original_inference_steps", 50), kw.get("strength", 1.0), True)
    den = denoiser_from_diffusers(net, cfg)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(sd.sample(den, x_T, steps, floor, schedule, final="none", generator=g), x)
    default = SteerdiffScheduler.from_config(cfg)
    default.set_timesteps(steps, **kw)
    assert default.timesteps.tolist() == theirs.timesteps.tolist() and default._run.grid.clean_end
    assert default._run.solver == TCD()


def test_tcd_scheduler_given_original_inference_steps_takes_every_training_timestep(diffusers):
    """TCDScheduler given ``original_inference_steps`` explicitly takes its nodes from all 1000 training
    timesteps (its "customised option"); ours stay on the distillation timesteps, as LCMScheduler's do."""
    cfg = consistency_config("TCDScheduler")
    theirs, ours = diffusers.TCDScheduler.from_config(cfg), SteerdiffScheduler.from_config(cfg)
    theirs.set_timesteps(4, original_inference_steps=25)
    ours.set_timesteps(4, original_inference_steps=25)
    assert theirs.timesteps.tolist() == [999, 749, 499, 249]
    assert ours.timesteps.tolist() == [999.0, 759.0, 519.0, 279.0]


@pytest.mark.parametrize("cls", ["LCMScheduler", "TCDScheduler"])
def test_custom_timesteps_with_strength_are_cut_as_diffusers_cuts_them(diffusers, gmm, sd_process, x_T, cls):
    """Custom ``timesteps`` with ``strength`` (LatentConsistencyModelImg2ImgPipeline passes both): the last
    ``int(n * strength)`` of them, as LCMScheduler and TCDScheduler keep them (before: a TypeError)."""
    cfg, times = consistency_config(cls), [999, 759, 499, 259, 19]
    theirs = getattr(diffusers, cls).from_config(cfg)
    theirs.set_timesteps(timesteps=times, strength=0.5)
    ours = SteerdiffScheduler.from_config(cfg)
    ours.set_timesteps(timesteps=times, strength=0.5)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == [259.0, 19.0]


def test_consistency_schedule_follows_the_config(diffusers):
    """The name ``"lcm"`` takes the config's ``original_inference_steps`` (any VP config: 50 without one),
    ``LCM(...)`` its own options unless ``set_timesteps`` overrides them; an explicit schedule wins over the
    default and takes ``original_inference_steps=None`` and ``strength=1`` (what pipelines pass); other
    configs keep ``karras_capped``."""
    cfg = consistency_config("LCMScheduler", original_inference_steps=20)
    for schedule, first_steps in (
        (None, [999, 949]),
        ("lcm", [999, 949]),
        (sd.schedules.LCM(), [999, 959]),
        ("leading", [950, 900]),
    ):
        sched = SteerdiffScheduler.from_config(cfg, schedule=schedule)
        sched.set_timesteps(20)
        assert sched.timesteps[:2].tolist() == first_steps, schedule
    sched = SteerdiffScheduler.from_config(cfg, schedule=sd.schedules.LCM(strength=0.5))
    sched.set_timesteps(4, original_inference_steps=20)  # the instance's strength kept
    assert sched.timesteps.tolist() == [499.0, 399.0, 249.0, 149.0]
    sched.set_timesteps(4, strength=1.0)
    assert sched.timesteps.tolist() == [999.0, 759.0, 499.0, 259.0]
    leading = SteerdiffScheduler.from_config(cfg, schedule="leading")
    leading.set_timesteps(4, original_inference_steps=None, strength=1.0)  # as pipelines pass them
    assert leading.timesteps.tolist() == [750.0, 500.0, 250.0, 0.0]
    plain = SteerdiffScheduler.from_config(sd_betas_config(), schedule="lcm")
    plain.set_timesteps(4)
    assert plain.timesteps.tolist() == [999.0, 759.0, 499.0, 259.0]
    ddim = SteerdiffScheduler.from_config(diffusers.DDIMScheduler(**sd_betas_config()).config)
    ddim.set_timesteps(4)
    grid = sd.solvers.make_grid(ddim.denoiser.process, sd.schedules.get("karras_capped"), 4)
    assert ddim.config.schedule is None and ddim._run.grid.t == grid.t


@pytest.mark.parametrize(
    ("schedule", "kw", "words"),
    [
        ("karras", {"strength": 0.5}, "set_timesteps: strength=0.5: options of the lcm schedule only"),
        (
            "trailing",
            {"original_inference_steps": 25},
            "set_timesteps: original_inference_steps=25: options of the lcm schedule only",
        ),
        (None, {"strength": 0.0}, "set_timesteps: strength must be a finite number in (0, 1], got 0.0"),
        (None, {"strength": 1.5}, "set_timesteps: strength must be a finite number in (0, 1], got 1.5"),
        (
            None,
            {"original_inference_steps": 0},
            "set_timesteps: original_inference_steps must be an integer >= 1",
        ),
        (None, {"original_inference_steps": 2000}, "original_steps must be at most the process's num_train"),
        (None, {"strength": 0.1}, "5 distillation timesteps they are taken from; ask for at most 5"),
        (
            None,
            {"num_inference_steps": 51},
            "51 nodes asked, more than the int(original_steps * strength) = 50",
        ),
        (
            None,
            {"num_inference_steps": None, "timesteps": [999, 499], "strength": 0.4},
            "keeps int(2 * strength) = 0",
        ),
    ],
)
def test_bad_consistency_grid(diffusers, schedule, kw, words):
    sched = SteerdiffScheduler.from_config(consistency_config("LCMScheduler"), schedule=schedule)
    kw = {"num_inference_steps": 8, **kw}
    with pytest.raises(ValueError) as err:
        sched.set_timesteps(**kw)
    assert words in str(err.value), str(err.value)


def test_consistency_boundary_per_sample_times(gmm, sd_process):
    """Per-sample times give each row its own scalings: the rows of scalar calls, and at a timestep
    the scalings diffusers' LCMScheduler computes (``tau = 10 t``, ``s_d = 0.5``)."""
    den = sd.guidance.ConsistencyBoundary(gmm.denoiser(sd_process))
    x, t = noise(3, 8), torch.tensor([999.0, 259.0, 19.0], dtype=F64)
    rows = torch.cat([den(x[k : k + 1], float(t[k])).x0 for k in range(3)])
    assert torch.allclose(den(x, t).x0, rows, rtol=0, atol=1e-14)
    tau = 10 * 259.0
    assert den.scalings(259.0, x) == pytest.approx((0.25 / (tau**2 + 0.25), tau / math.sqrt(tau**2 + 0.25)))


@pytest.mark.parametrize("kw", [{"timestep_scaling": 0.0}, {"sigma_data": -1.0}, {"timestep_scaling": "10"}])
def test_bad_consistency_boundary(gmm, sd_process, kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"ConsistencyBoundary: {name} must be"):
        sd.guidance.ConsistencyBoundary(gmm.denoiser(sd_process), **kw)


def test_consistency_boundary_refuses_a_negative_net_time(gmm):
    """An EDM net's time ``0.25 log(sigma)`` is negative below ``sigma = 1``, where ``c_out`` is: before,
    accepted, and at ``sigma = 0.5`` the estimate was ``0.077 x - 0.96 x0``."""
    den = sd.EDMDenoiser(lambda x, t: torch.zeros_like(x), sd.EDM(), sigma_data=0.5)
    with pytest.raises(ValueError, match=r"^ConsistencyBoundary: den's net time is negative at t = 0\.002 "):
        sd.guidance.ConsistencyBoundary(den)
    flow = sd.guidance.ConsistencyBoundary(gmm.denoiser(sd.RectifiedFlow()))  # net time t >= 0: accepted
    assert flow.scalings(0.5, noise(1, 8)) == pytest.approx((0.25 / 25.25, 5 / math.sqrt(25.25)))


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"gamma": -0.1}, {"gamma": 1.5}, {"gamma": math.nan}, {"gamma": "0.3"}])
def test_bad_gamma(kw):
    with pytest.raises(ValueError, match=r"TCD: gamma must be a finite number in \[0, 1\]"):
        TCD(**kw)


def test_bad_floor_s():
    with pytest.raises(ValueError, match=r"TCD: floor_s must be True or False"):
        TCD(floor_s=1)


@pytest.mark.parametrize("process", ["edm", "vp_linear", "flow"])
def test_floor_s_is_refused_off_timestep_indices(gmm, process):
    """``floor_s`` floors ``s`` to TCDScheduler's integer timestep: on a process timed over a continuous
    range it would floor every intermediate time to its start (on ``[0, 1]``: ``s = 0`` whatever ``gamma``,
    a silent LCM step), so it is refused, naming it; ``VP.discrete`` takes it."""
    p = {"edm": sd.EDM(), "vp_linear": sd.VP.linear(), "flow": sd.RectifiedFlow()}[process]
    with pytest.raises(ValueError, match=r"floor_s=True .*\(VP\.discrete\).*use floor_s=False"):
        sd.sample(
            gmm.denoiser(p), noise(2, 8), steps=4, solver=TCD(gamma=0.3, floor_s=True), generator=Record(0)
        )
    x = sd.sample(
        gmm.denoiser(PROCESSES["sd"]), noise(2, 8), steps=4, solver=TCD(floor_s=True), generator=Record(0)
    )
    assert torch.isfinite(x).all()
