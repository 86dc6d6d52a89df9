"""``SteerdiffScheduler(inverse=True)``: an editing pipeline's ``inverse_scheduler`` running ``sd.invert``.

References: ``sd.invert`` with the same net, grid and solver (the pipeline loop ``for t in timesteps: x =
step(net(x, t), t, x).prev_sample`` from the clean sample; to the bit on CPU), and diffusers'
``DPMSolverMultistepInverseScheduler`` on its own timesteps (the same algorithm as ``dpmpp_2m`` on the
reversed grid, ``tests/test_invert.py``; to float32).
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from torch import Tensor

import steerdiff as sd
from steerdiff.inversion import default_inversion_solver, deterministic_solvers
from steerdiff.solvers import DDIM, UniPC
from steerdiff.solvers.base import make_grid

from .reference import PARITY_BOUND, eps_net, rel_rmse, sd_betas_config

diffusers = pytest.importorskip("diffusers")
FrozenDict = pytest.importorskip("diffusers.configuration_utils").FrozenDict

from steerdiff.integrations.diffusers import SteerdiffScheduler, denoiser_from_diffusers  # noqa: E402
from steerdiff.integrations.diffusers_ref import run_scheduler  # noqa: E402

from .test_integration_diffusers import SHAPE, _edm_net, _unet  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def unet() -> Any:
    return _unet()


@pytest.fixture(scope="module")
def x_0() -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def _net(unet: Any) -> Any:
    return lambda x, t: unet(x, t).sample


def _loop(sched: Any, net: Any, x_0: Tensor, steps: int | None, **grid: Any) -> tuple[Tensor, list[Tensor]]:
    """The pipeline's inversion loop (diffusers_ref.run_scheduler); returns the result and every
    ``prev_sample``."""
    outs: list[Tensor] = []
    with torch.no_grad():
        x, nfe = run_scheduler(sched, net, x_0, steps, callback=lambda i, x: outs.append(x), **grid)
    assert nfe == len(sched.timesteps)
    return x, outs


# --- the pipeline's loop is sd.invert ---------------------------------------------------------------


@pytest.mark.parametrize("solver", deterministic_solvers())
def test_inverse_loop_is_sd_invert(unet, x_0, solver):
    config = diffusers.DDPMScheduler().config  # clip_sample=True: thresholded estimates, on both sides
    sched = SteerdiffScheduler.from_config(config, inverse=True, solver=solver, schedule="karras")
    if solver == "ddim":  # by default (None) DDIMInverseScheduler's pair, the clipped x0 with the net's eps
        step = sched.step
        sched.step = lambda *a, **kw: step(*a, use_clipped_model_output=True, **kw)  # sd.invert's pair
    x, _ = _loop(sched, _net(unet), x_0, STEPS)
    with torch.no_grad():
        ref, info = sd.invert(
            denoiser_from_diffusers(unet, config), x_0, STEPS, solver, "karras", return_info=True
        )
    assert torch.equal(x, ref)  # measured: bit-identical on CPU for every deterministic solver
    assert len(sched.timesteps) == info.nfe and sched.num_inference_steps == STEPS
    ts = sched.timesteps.tolist()
    assert ts == sorted(ts) and ts[0] == info.grid.t[0]  # rising from the clean sample's timestep
    assert sched.sigmas.tolist() == sorted(sched.sigmas.tolist()) and sched.init_noise_sigma == 1.0


@pytest.mark.parametrize("guidance_scale", [1.0, None, 7.5])
def test_default_solver_is_sd_inverts(unet, x_0, guidance_scale):
    # unguided: UniPC-3's noise form, sd.invert's default for an unguided denoiser, to the bit; a guided
    # pipeline: the guided default, as default_inversion_solver gives a guided (CFG) denoiser
    config = diffusers.DDIMScheduler(clip_sample=False).config
    sched = SteerdiffScheduler.from_config(config, inverse=True, guidance_scale=guidance_scale)
    x, _ = _loop(sched, _net(unet), x_0, STEPS)
    den = denoiser_from_diffusers(unet, config)
    forward = make_grid(den.process, sd.schedules.get("karras_capped"), STEPS, "none")
    if guidance_scale == 1.0:
        assert sched._run.solver == UniPC(prediction="noise") == default_inversion_solver(den, STEPS, forward)
        with torch.no_grad():
            assert torch.equal(x, sd.invert(den, x_0, STEPS))
    else:
        assert sched._run.solver == sd.sampling.guided_solver(STEPS, guidance_scale, forward)
    # LCM and TCD configs: not their (noise-drawing) samplers
    lcm_config = {**diffusers.LCMScheduler().config, "_class_name": "LCMScheduler"}
    lcm = SteerdiffScheduler.from_config(lcm_config, inverse=True, guidance_scale=1)
    lcm.set_timesteps(4)
    assert lcm._run.solver == UniPC(prediction="noise")


def test_edm_config_scales_the_net_input_and_starts_at_the_clean_sample(x_0):
    # init_noise_sigma 1 (the loop multiplies x_0 by it) and scale_model_input c_in at each evaluation
    config = diffusers.EDMEulerScheduler().config
    sched = SteerdiffScheduler.from_config(config, inverse=True, solver="dpmpp_2m", schedule="karras")
    x, _ = _loop(sched, _edm_net, x_0, STEPS)
    assert sched.init_noise_sigma == 1.0
    assert SteerdiffScheduler.from_config(config).init_noise_sigma == pytest.approx(80.00625, rel=1e-6)
    with torch.no_grad():
        ref = sd.invert(denoiser_from_diffusers(_edm_net, config), x_0, STEPS, "dpmpp_2m", "karras")
    assert torch.equal(x, ref)


def test_stopping_early_gives_sd_inverts_states_on_the_way(unet, x_0):
    # DiffEdit's inpaint_strength: the loop runs timesteps[:-t_start]; each prev_sample is the state at
    # the next node, as sd.invert's callback reports it
    config = diffusers.DDIMScheduler(clip_sample=False).config
    sched = SteerdiffScheduler.from_config(config, inverse=True, guidance_scale=1, schedule="trailing")
    steps, kept = 10, 8
    sched.set_timesteps(steps)
    x, outs = x_0, []
    with torch.no_grad():
        for t in sched.timesteps[:kept]:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
            outs.append(x)
        states: list[Tensor] = []
        sd.invert(
            denoiser_from_diffusers(unet, config), x_0, steps, None, "trailing",
            callback=lambda info: states.append(info["x"]),
        )  # fmt: skip
    assert sched.step_index == kept
    assert all(torch.equal(a, b) for a, b in zip(outs, states[:kept], strict=True))


# --- parity with diffusers' inverse scheduler ----------------------------------------------------


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpmpp_2m_matches_dpm_solver_multistep_inverse(gmm, sd_process, steps, spacing):
    """On DPMSolverMultistepInverseScheduler's timesteps ``0 = t_N < ... < t_1`` and its noisiest timestep
    (the custom nodes ``[noisiest, *timesteps[::-1]]``, as for sampling: decreasing) ``dpmpp_2m`` is that
    scheduler's algorithm (its long-step rule changes no step there: the same bits as ``max_h=inf``).
    Measured 1.7e-6 on linspace at 10 and 25 steps, 4.6e-6 / 2.4e-7 on leading."""
    x_0 = gmm.sample(16, generator=torch.Generator().manual_seed(5))
    theirs = diffusers.DPMSolverMultistepInverseScheduler(**sd_betas_config(timestep_spacing=spacing))
    net = eps_net(gmm, sd_process)
    ref, _ = run_scheduler(theirs, net, x_0.clone(), steps)
    ours = SteerdiffScheduler.from_config(theirs.config, inverse=True, solver="dpmpp_2m")
    nodes = [float(theirs.noisiest_timestep), *theirs.timesteps.tolist()[::-1]]
    x, nfe = run_scheduler(ours, net, x_0, None, timesteps=nodes)
    assert torch.equal(ours.timesteps, theirs.timesteps.float()) and nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["DPMSolverMultistepInverseScheduler"]


# --- the config keeps the mode --------------------------------------------------------------------


def test_save_config_and_pickle_keep_inverse_mode(unet, x_0, tmp_path):
    config = diffusers.DDIMScheduler(clip_sample=False).config
    sched = SteerdiffScheduler.from_config(config, inverse=True, solver=DDIM(), schedule="trailing")
    whole, _ = _loop(sched, _net(unet), x_0, STEPS)
    sched.save_pretrained(tmp_path)
    loaded = SteerdiffScheduler.from_pretrained(tmp_path)
    assert loaded.config.inverse is True and loaded.config.solver == {"name": "ddim", "eta": 0.0, "order": 1}
    assert torch.equal(_loop(loaded, _net(unet), x_0, STEPS)[0], whole)
    again = SteerdiffScheduler.from_config(sched.config)
    assert again.config.inverse is True and torch.equal(_loop(again, _net(unet), x_0, STEPS)[0], whole)
    # pickled mid-run, it goes on up the grid
    sched.set_timesteps(STEPS)
    x = x_0
    with torch.no_grad():
        for t in sched.timesteps[:2]:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        copy = pickle.loads(pickle.dumps(sched))
        assert copy.config.inverse is True
        for t in copy.timesteps[2:]:
            x = copy.step(unet(x, t).sample, t, x).prev_sample
    assert torch.equal(x, whole)


# --- bad input -------------------------------------------------------------------------------------


def test_bad_input_in_inverse_mode_is_named():
    config = diffusers.DDPMScheduler().config
    with pytest.raises(ValueError, match=r"^SteerdiffScheduler: inverse must be True or False, got 'yes'$"):
        SteerdiffScheduler.from_config(config, inverse="yes")
    for solver in ("ddpm", DDIM(eta=1.0)):
        with pytest.raises(ValueError, match=r"solver=.* is stochastic, and inverse=True .*accepted: \["):
            SteerdiffScheduler.from_config(config, inverse=True, solver=solver)
    # a config patched to inverse mode (as pipelines patch configs) is checked where the run is planned
    sched = SteerdiffScheduler.from_config(config, solver="ddpm")
    sched._internal_dict = FrozenDict({**sched.config, "inverse": True})
    with pytest.raises(ValueError, match=r"solver='ddpm' is stochastic, and inverse=True"):
        sched.set_timesteps(4)
    inv = SteerdiffScheduler.from_config(config, inverse=True, guidance_scale=1)
    inv.set_timesteps(4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"^add_noise: an inverse scheduler \(inverse=True\) .* no noise"):
        inv.add_noise(x, x, inv.timesteps[:1])
    with pytest.raises(ValueError, match=r"^add_noise: an inverse scheduler"):
        inv.scale_noise(x, inv.timesteps[:1], x)
    t = inv.timesteps[1]
    with pytest.raises(ValueError, match=r"begins at timesteps\[0\].* not at timesteps\[1\]"):
        inv.step(x, t, x)
    inv.set_begin_index(1)
    with pytest.raises(ValueError, match=r"begins at timesteps\[0\].* not at timesteps\[1\]"):
        inv.step(x, t, x)
    with pytest.raises(ValueError, match=r"strictly decreasing \(with inverse=True too"):
        inv.set_timesteps(timesteps=[0, 500, 999])


# --- what editing pipelines read from their inverse_scheduler ------------------------------------------


def _pipeline_get_epsilon(module: str, cls: str) -> Any:
    """``cls.get_epsilon`` of the diffusers pipeline file ``module``, compiled from its source (the
    pipelines import transformers, which the tests do not need)."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("diffusers")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0], "pipelines", "deprecated", f"{module}.py")
    tree = ast.parse(path.read_text())
    body = next(c.body for c in tree.body if isinstance(c, ast.ClassDef) and c.name == cls)
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == "get_epsilon")
    scope: dict[str, Any] = {"torch": torch}
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)
    return scope["get_epsilon"]


@pytest.mark.parametrize("schedule", ["trailing", "karras"])
def test_noise_regularization_reads_alphas_cumprod(schedule):
    """Pix2Pix-Zero's inversion (num_reg_steps=5 by default) and DiffEdit's derive eps from the net's output
    with ``inverse_scheduler.alphas_cumprod[t]`` at each timestep (their get_epsilon, run here from
    diffusers' source): diffusers' own table at integer timesteps, ``alpha(t)^2`` at fractional ones.
    The old scheduler had no alphas_cumprod (AttributeError)."""
    from types import SimpleNamespace

    config = diffusers.DDIMScheduler(prediction_type="v_prediction").config
    table = diffusers.DDIMScheduler(prediction_type="v_prediction").alphas_cumprod
    sched = SteerdiffScheduler.from_config(config, inverse=True, guidance_scale=1, schedule=schedule)
    sched.set_timesteps(STEPS)
    process = sched.denoiser.process
    out, x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    for module, cls in (
        (
            "stable_diffusion_variants/pipeline_stable_diffusion_pix2pix_zero",
            "StableDiffusionPix2PixZeroPipeline",
        ),
        ("stable_diffusion_diffedit/pipeline_stable_diffusion_diffedit", "StableDiffusionDiffEditPipeline"),
    ):
        get_epsilon = _pipeline_get_epsilon(module, cls)
        for t, u in zip(sched.timesteps, sched._times, strict=True):
            u64 = torch.tensor(u, dtype=torch.float64)
            a, s = float(process.alpha(u64)), float(process.sigma(u64))
            eps = get_epsilon(SimpleNamespace(inverse_scheduler=sched), out, x, t)
            assert torch.allclose(eps, a * out + s * x, rtol=1e-5, atol=1e-6)  # v -> eps
            if schedule == "trailing":  # integer timesteps: diffusers' alphas_cumprod
                assert float(t) == int(t) and float(sched.alphas_cumprod[t]) == pytest.approx(
                    float(table[int(t)]), rel=1e-6
                )
    with pytest.raises(
        ValueError, match=r"^alphas_cumprod\[1\.5\]: only the entries of scheduler\.timesteps"
    ):
        sched.alphas_cumprod[1.5]
    with pytest.raises(ValueError, match=r"none yet, call set_timesteps first"):
        SteerdiffScheduler.from_config(config, inverse=True).alphas_cumprod[999]


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_inverse_of_a_clipping_config_is_ddim_inverse_schedulers(unet, x_0, clip):
    # DDIMInverseScheduler clips x0 where clip_sample=True and steps with the net's own eps beside it (it
    # has no use_clipped_model_output); the inverse ddim run's default (None) is that pair. On its nodes
    # with a net whose eps does not depend on t (DDIMInverseScheduler evaluates at the target's timestep,
    # test_invert.py) and set_alpha_to_one=False (its first step the identity, for a clean sample in
    # [-0.8, 0.8]): measured 7.8e-7 unclipped, 1.5e-6 clipped; use_clipped_model_output=True (sd.invert's
    # pair) is another run there, 0.39 away.
    options = sd_betas_config(set_alpha_to_one=False, clip_sample=clip)
    config = diffusers.DDIMInverseScheduler(**options).config
    theirs = diffusers.DDIMInverseScheduler.from_config(config)
    theirs.set_timesteps(8)
    ts = [float(t) for t in theirs.timesteps.tolist()]

    def frozen(x: Tensor, t: Any) -> Tensor:
        return unet(x, 500).sample

    clean = x_0.clamp(-0.8, 0.8)  # its first step, to timestep 0, clips nothing: the identity
    with torch.no_grad():
        ref = clean
        for t in theirs.timesteps:
            ref = theirs.step(frozen(ref, t), t, ref).prev_sample
        runs = []
        for clipped in (None, True):
            ours = SteerdiffScheduler.from_config(config, inverse=True, solver="ddim")
            ours.set_timesteps(timesteps=ts[::-1])
            assert ours.timesteps.tolist() == ts[:-1]  # evaluated at the start of each step
            x = clean
            for t in ours.timesteps:
                x = ours.step(frozen(x, t), t, x, use_clipped_model_output=clipped).prev_sample
            runs.append(x)
    assert rel_rmse(runs[0], ref) < PARITY_BOUND["DDIMInverseScheduler(t-independent eps)"]
    if clip:
        assert rel_rmse(runs[1], ref) > 0.1
