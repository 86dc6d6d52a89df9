"""diffusers integration: ``SteerdiffScheduler`` inside ``DDPMPipeline`` and ``denoiser_from_diffusers``.

A small randomly initialized ``UNet2DModel`` (nothing from a hub) plays the pretrained net. The
pipeline draws ``x_T`` from its generator with ``randn_tensor``; the reference reproduces it from the
same seed and runs ``sd.sample`` on ``denoiser_from_diffusers(unet, config)`` with that generator.
The pipeline's last ``prev_sample`` (before its ``(x / 2 + 0.5).clamp(0, 1)``) is read by a spy on
``scheduler.step``. Parity: diffusers' own schedulers in the same pipeline, for the same algorithm
on the same timesteps.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import math
import pickle
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy
import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import steerdiff as sd
from steerdiff.bench.solvers import make_problem
from steerdiff.integrations.diffusers_ref import run_scheduler
from steerdiff.solvers.base import History

from ._docs import block
from .reference import F64, PARITY_BOUND, Replay, eps_net, nodes_of, rel_rmse, sd_betas_config
from .test_device import _Syncs

diffusers = pytest.importorskip("diffusers")
randn_tensor = pytest.importorskip("diffusers.utils.torch_utils").randn_tensor
FrozenDict = pytest.importorskip("diffusers.configuration_utils").FrozenDict

from steerdiff.integrations.diffusers import (  # noqa: E402
    SteerdiffScheduler,
    denoiser_from_diffusers,
    process_from_config,
)
from steerdiff.integrations.diffusers_config import _SUPPORTED  # noqa: E402

SHAPE = (2, 3, 8, 8)
STEPS = 6
PARITY = 1e-4


def _unet(out_channels: int = 3, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def unet() -> Any:
    return _unet()


@pytest.fixture(scope="module")
def unet_lv() -> Any:
    """Learned variance: 2C output channels."""
    return _unet(out_channels=6, seed=1)


def _pipeline(
    unet: Any, scheduler: Any, steps: int, seed: int | list[int]
) -> tuple[Tensor, Tensor, list[Any]]:
    """Run ``DDPMPipeline``; return (last prev_sample, the pipeline's images, the timesteps passed). Our
    scheduler's ``step`` also gets ``eta=0.0``, which DDPMPipeline does not pass and most pipelines do."""
    outs: list[Tensor] = []
    passed: list[Any] = []
    step = scheduler.step

    def spy(model_output: Tensor, t: Any, sample: Tensor, **kw: Any) -> Any:
        passed.append(t)
        if isinstance(scheduler, SteerdiffScheduler):  # as the pipelines that take eta pass their default
            kw.setdefault("eta", 0.0)
            # DDIM from a clipping config steps as sd.sample's thresholding denoiser with the eps of the
            # clipped x0 (DDIMScheduler's option; by default it pairs the clipped x0 with the net's eps)
            kw.setdefault("use_clipped_model_output", True)
        out = step(model_output, t, sample, **kw)
        outs.append(out.prev_sample)
        return out

    scheduler.step = spy
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = _generators(seed)
    with torch.no_grad():
        images = pipe(batch_size=SHAPE[0], generator=gen, num_inference_steps=steps, output_type="pt").images
    return outs[-1], images, passed


def _generators(seed: int | list[int]) -> torch.Generator | list[torch.Generator]:
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)


def _reference(den: sd.Denoiser, steps: int, seed: int | list[int], **kw: Any) -> tuple[Tensor, int]:
    """``sd.sample`` from the pipeline's x_T (same seed, same draw), with the same generator after it."""
    gen = _generators(seed)
    x_T = randn_tensor(SHAPE, generator=gen, dtype=torch.float32)
    with torch.no_grad():
        x, info = sd.sample(den, x_T, steps, generator=gen, return_info=True, **kw)
    return x, info.nfe


def _images(x: Tensor) -> Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


# --- the pipeline with our scheduler is sd.sample -------------------------------------------------


# solvers that move the sample before every evaluation: a pipeline calls the net at its own sample first
MOVES_FIRST = ("accel_ddpm",)


@pytest.mark.parametrize("solver", sd.solvers.available())
def test_pipeline_is_sd_sample(unet, solver):
    config = diffusers.DDPMScheduler().config
    sched = SteerdiffScheduler.from_config(config, solver=solver, schedule="karras")
    if solver in MOVES_FIRST:
        with pytest.raises(ValueError, match="before its first evaluation"):
            _pipeline(unet, sched, STEPS, seed=5)
        return
    raw, images, passed = _pipeline(unet, sched, STEPS, seed=5)
    ref, nfe = _reference(denoiser_from_diffusers(unet, config), STEPS, 5, solver=solver, schedule="karras")
    # one net call per entry of timesteps: heun, edm_sde, dpmpp_sde evaluate twice per step but once
    # into the clean end (2N - 1), as diffusers' Heun
    assert len(passed) == len(sched.timesteps) == nfe == sd.solvers.get(solver).nfe(STEPS)
    assert sched.order == sd.solvers.get(solver).nfe(1, clean_end=False)  # the first step's evaluations
    assert torch.equal(raw, ref)  # measured: bit-identical on CPU for every solver
    assert torch.equal(images, _images(ref))


def test_the_diffusers_page_example_runs_with_what_it_is_given(unet):
    # "given a diffusers pipeline pipe and noise x_T of its net's sample shape": its block used sd without
    # importing it (a NameError pasted into a script). Its last pipeline run (UniPC-3 on karras, 10 steps,
    # the global RNG's x_T) is sd.sample's on the same net and noise, and its x0 sd.sample's defaults
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    scope: dict[str, Any] = {"pipe": pipe, "x_T": x_T}
    torch.manual_seed(2)  # the pipeline's own x_T, from the global RNG as it draws it without a generator
    with torch.no_grad():
        exec(compile(block("# Inside diffusers"), "docs/diffusers.md", "exec"), scope)
        den = denoiser_from_diffusers(unet, pipe.scheduler.config)
        ref = sd.sample(den, torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(2)), 10,
                        solver="unipc", schedule="karras")  # fmt: skip
        assert torch.equal(scope["x0"], sd.sample(den, x_T, 10))
    pixels = (_images(ref).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")[0]
    assert (scope["images"][0].size, scope["images"][0].mode) == ((8, 8), "RGB")
    assert (numpy.asarray(scope["images"][0]) == pixels).all()


def test_pipeline_per_sample_generators(unet):
    # a list of generators (one per image): the pipeline's x_T rows and the per-step noise of each
    # row come from that row's generator, as sd.sample(generator=[...]) draws them
    config = diffusers.DDPMScheduler().config
    sched = SteerdiffScheduler.from_config(config, solver="dpmpp_2m_sde", schedule="karras")
    raw, _, _ = _pipeline(unet, sched, STEPS, seed=[3, 4])
    den = denoiser_from_diffusers(unet, config)
    ref, _ = _reference(den, STEPS, [3, 4], solver="dpmpp_2m_sde", schedule="karras")
    assert torch.equal(raw, ref)


def test_scheduler_noise_wins_over_the_pipeline_generator(unet):
    config = diffusers.DDPMScheduler().config
    sched = SteerdiffScheduler.from_config(
        config, solver="ddpm", schedule="karras", noise=torch.Generator().manual_seed(9)
    )
    raw, _, _ = _pipeline(unet, sched, STEPS, seed=5)
    gen = torch.Generator().manual_seed(5)
    x_T = randn_tensor(SHAPE, generator=gen, dtype=torch.float32)
    with torch.no_grad():
        ref = sd.sample(
            denoiser_from_diffusers(unet, config),
            x_T,
            STEPS,
            "ddpm",
            "karras",
            generator=torch.Generator().manual_seed(9),
        )
    assert torch.equal(raw, ref)


# --- parity with diffusers' schedulers in the same pipeline ---------------------------------------


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpmpp_2m_matches_dpm_solver_multistep(unet, steps, spacing):
    # DPMSolverMultistepScheduler defaults: dpmsolver++, order 2, lower_order_final, final sigma 0.
    # Its linspace spacing (the first N of N + 1 points) is read with nodes_of; its trailing spacing
    # is steerdiff's "trailing" schedule.
    theirs = diffusers.DPMSolverMultistepScheduler(
        solver_order=2, algorithm_type="dpmsolver++", timestep_spacing=spacing, final_sigmas_type="zero"
    )
    ref, _, _ = _pipeline(unet, theirs, steps, seed=7)
    schedule = nodes_of(theirs) if spacing == "linspace" else "trailing"
    if spacing == "trailing":
        trailing = sd.schedules.get("trailing")(process_from_config(theirs), steps)
        assert torch.equal(nodes_of(theirs).grid, trailing)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="dpmpp_2m", schedule=schedule)
    raw, _, _ = _pipeline(unet, ours, steps, seed=7)
    assert ours.timesteps.tolist() == theirs.timesteps.float().tolist()
    # measured: 2.2e-7 / 2.9e-7 (linspace, 8 / 20 steps), 2.8e-7 / 3.4e-7 (trailing)
    assert rel_rmse(raw, ref) < PARITY


def test_ddpm_learned_variance_matches_ddpm_scheduler(unet_lv):
    # DDPMScheduler with a learned-range variance (Improved DDPM) and diffusers' default "leading"
    # spacing, no clipping; its noise is randn_tensor(x.shape) from the pipeline's generator at every
    # step but the last, which is what sd.sample's DDPM draws.
    theirs = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
    ref, _, _ = _pipeline(unet_lv, theirs, 10, seed=11)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="ddpm", schedule="leading")
    raw, _, _ = _pipeline(unet_lv, ours, 10, seed=11)
    assert ours.denoiser.learned_variance
    assert ours.timesteps.tolist() == theirs.timesteps.float().tolist()
    assert rel_rmse(raw, ref) < PARITY  # measured 2.7e-7
    den = denoiser_from_diffusers(unet_lv, theirs.config)
    x, _ = _reference(den, 10, 11, solver="ddpm", schedule="leading")
    assert torch.equal(raw, x)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_by_name_takes_the_configs_variance_type(variance):
    # DDPMScheduler's variance_type="fixed_large" steps with the forward step's beta, not the posterior's
    # beta~; the name "ddpm" ignored it (before: fixed_large's run 0.42 relative RMSE from DDPMScheduler's,
    # as far as its fixed_small run). fixed_small_log is fixed_small's std through its log. Exact 16-d mixture
    # net, 10 leading steps, 256 samples, the same generator: measured 2.2e-7 / 2.1e-7 / 1.9e-7.
    config = diffusers.DDPMScheduler(**sd_betas_config(variance_type=variance, clip_sample=False)).config
    net, x_T = _mixture_net(config), torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ref, _ = run_scheduler(
        diffusers.DDPMScheduler.from_config(config), net, x_T, 10, torch.Generator().manual_seed(3)
    )
    ours = SteerdiffScheduler.from_config(config, solver="ddpm", schedule="leading")
    raw, _ = run_scheduler(ours, net, x_T, 10, torch.Generator().manual_seed(3))
    large = variance == "fixed_large"
    assert ours._run.solver == sd.solvers.DDPM(variance="fixed_large" if large else "fixed_small")
    assert rel_rmse(raw, ref) < PARITY_BOUND["DDPMScheduler"]
    # the variance matters: the other one's run, from the same draws, is far
    other = diffusers.DDPMScheduler.from_config(
        config, variance_type="fixed_small" if large else "fixed_large"
    )
    assert rel_rmse(run_scheduler(other, net, x_T, 10, torch.Generator().manual_seed(3))[0], ref) > 0.1
    # an instance keeps its own variance (as Leading() its own offset)
    own = SteerdiffScheduler.from_config(config, solver=sd.solvers.DDPM(), schedule="leading")
    own.set_timesteps(10)
    assert own._run.solver == sd.solvers.DDPM()


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_as_a_dict_takes_the_configs_variance_type_as_the_name_does(variance, tmp_path):
    # {"name": "ddpm"} is the name "ddpm" in the config's form: it follows variance_type too, also once saved
    # and loaded (before: DDPM's fixed_small whatever the config, 0.42 relative RMSE from DDPMScheduler's
    # fixed_large run); with a variance of its own it keeps it, as an instance does. Measured 2.1e-7 / 1.9e-7
    config = diffusers.DDPMScheduler(**sd_betas_config(variance_type=variance, clip_sample=False)).config
    net, x_T = _mixture_net(config), torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ref, _ = run_scheduler(
        diffusers.DDPMScheduler.from_config(config), net, x_T, 10, torch.Generator().manual_seed(3)
    )
    ours = SteerdiffScheduler.from_config(config, solver={"name": "ddpm"}, schedule="leading")
    raw, _ = run_scheduler(ours, net, x_T, 10, torch.Generator().manual_seed(3))
    assert ours._run.solver == sd.solvers.DDPM(variance=variance)
    assert rel_rmse(raw, ref) < PARITY_BOUND["DDPMScheduler"]
    ours.save_pretrained(tmp_path)
    again = SteerdiffScheduler.from_pretrained(tmp_path)
    again.set_timesteps(10)
    assert again._run.solver == sd.solvers.DDPM(variance=variance)
    own = SteerdiffScheduler.from_config(config, solver={"name": "ddpm", "variance": "fixed_small"})
    own.set_timesteps(10)
    assert own._run.solver == sd.solvers.DDPM()


def test_ddpm_refuses_the_variance_types_it_cannot_take():
    # fixed_large_log: DDPMScheduler takes the square root of the log variance, NaN at every noisy step (its
    # intended variance is fixed_large's): refused for "ddpm", unused by other solvers; "learned" and names
    # DDPMScheduler does not know are refused for every solver
    config = diffusers.DDPMScheduler(
        **sd_betas_config(variance_type="fixed_large_log", clip_sample=False)
    ).config
    net, x_T = _mixture_net(config), torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs, _ = run_scheduler(diffusers.DDPMScheduler.from_config(config), net, x_T, 3, torch.Generator())
    assert bool(theirs.isnan().all())
    with pytest.raises(
        ValueError, match=r"variance_type='fixed_large_log' with solver='ddpm' .*'fixed_large'"
    ):
        SteerdiffScheduler.from_config(config, solver="ddpm")
    sched = SteerdiffScheduler.from_config(config, solver="ddim")
    # a config patched to name ddpm: refused where the run is planned
    sched._internal_dict = FrozenDict({**sched.config, "solver": "ddpm"})
    with pytest.raises(ValueError, match="variance_type='fixed_large_log'"):
        sched.set_timesteps(3)
    with pytest.raises(
        ValueError, match=r"variance_type='fixed_large_log' with solver='ddpm' .*'fixed_large'"
    ):
        SteerdiffScheduler.from_config(config, solver={"name": "ddpm", "order": 1})
    assert SteerdiffScheduler.from_config(config, solver=sd.solvers.DDPM(variance="fixed_large"))
    for bad, match in (
        ("fixed_medium", "variance_type must be one of"),
        ("learned", "variance_type='learned'"),
    ):
        with pytest.raises(ValueError, match=match):
            SteerdiffScheduler.from_config({**config, "variance_type": bad}, solver="dpmpp_2m")


def test_leading_by_name_takes_the_configs_steps_offset(unet):
    # Stable Diffusion's configs have steps_offset=1: diffusers' leading spacing is 901, 801, ..., 1 at 10
    # steps (before: the name gave steerdiff's Leading() -- 900, ..., 0 -- and another run than DDPM's)
    theirs = diffusers.DDPMScheduler(steps_offset=1, clip_sample=False)
    ref, _, _ = _pipeline(unet, theirs, 10, seed=11)
    assert theirs.timesteps.tolist() == list(range(901, 0, -100))
    ours = SteerdiffScheduler.from_config(theirs.config, solver="ddpm", schedule="leading")
    raw, _, _ = _pipeline(unet, ours, 10, seed=11)
    assert ours.timesteps.tolist() == theirs.timesteps.float().tolist()
    assert rel_rmse(raw, ref) < PARITY  # measured 2.3e-7
    den = denoiser_from_diffusers(unet, theirs.config)
    x, _ = _reference(den, 10, 11, solver="ddpm", schedule=sd.schedules.Leading(steps_offset=1))
    assert torch.equal(raw, x)
    # an instance is taken as given
    own = SteerdiffScheduler.from_config(theirs.config, solver="ddpm", schedule=sd.schedules.Leading())
    own.set_timesteps(10)
    assert own.timesteps.tolist() == list(range(900, -1, -100))


def test_clip_sample_matches_ddpm_scheduler(unet):
    # DDPMScheduler's default config clips x0 to [-1, 1] (google/ddpm-*); so does our scheduler from
    # it (before: ignored, relative RMSE 93 from DDPMScheduler's run, as far as its unclipped run)
    theirs = diffusers.DDPMScheduler()
    assert theirs.config.clip_sample
    ref, _, _ = _pipeline(unet, theirs, 10, seed=11)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="ddpm", schedule="leading")
    raw, _, _ = _pipeline(unet, ours, 10, seed=11)
    assert rel_rmse(raw, ref) < PARITY  # measured 3.3e-7
    plain, _, _ = _pipeline(unet, diffusers.DDPMScheduler(clip_sample=False), 10, seed=11)
    assert rel_rmse(plain, ref) > 1  # the clipping matters (measured 93)


def test_clip_sample_under_ddim_is_ddims_use_clipped_model_output(unet):
    # DDIMScheduler clips x0 by default (clip_sample=True) and then, unless step gets
    # use_clipped_model_output=True, steps with the net's own eps beside the clipped x0; with True, with the
    # consistent eps' = (x - alpha x0') / sigma (a clipping denoiser's, sd.sample's). Ours takes the option
    # alike for solver="ddim" (before: always True's run, 1.87 from DDIMScheduler's default). 8 trailing
    # steps from timestep 999 on the random net: the raw-eps run amplifies float32 rounding (DDIMScheduler's
    # own float32 run is 3.5e-5 from its float64 one), so both float32 runs are held to DDIMScheduler's
    # float64 run: measured ours 2.6e-7 / 4.1e-5 (True / False and not passed), DDIMScheduler's 1.4e-7 /
    # 3.5e-5; the flag's two runs are 1.87 apart.
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    net64 = copy.deepcopy(unet).double()

    def theirs_run(clipped: bool, dtype: torch.dtype) -> Tensor:
        theirs = diffusers.DDIMScheduler(timestep_spacing="trailing")
        assert theirs.config.clip_sample
        theirs.set_timesteps(8)
        x, net = x_T.to(dtype), (unet if dtype == torch.float32 else net64)
        with torch.no_grad():
            for t in theirs.timesteps:
                x = theirs.step(net(x, t).sample, t, x, use_clipped_model_output=clipped).prev_sample
        return x.double()

    ours = SteerdiffScheduler.from_config(
        diffusers.DDIMScheduler().config, solver="ddim", schedule="trailing"
    )
    refs = {flag: theirs_run(flag, torch.float64) for flag in (True, False)}
    for clipped in (True, False, None):
        ref = refs[bool(clipped)]
        floor = rel_rmse(theirs_run(bool(clipped), torch.float32), ref)  # DDIMScheduler's own float32 error
        ours.set_timesteps(8)
        x = x_T
        kw = {} if clipped is None else {"use_clipped_model_output": clipped}
        with torch.no_grad():
            for t in ours.timesteps:
                x = ours.step(unet(x, t).sample, t, x, **kw).prev_sample
        assert rel_rmse(x.double(), ref) < 2 * floor + PARITY_BOUND["DDIMScheduler"]
    assert rel_rmse(refs[True], refs[False]) > 1


def _ldm_pipeline(unet: Any, scheduler: Any, eta: float) -> Tensor:
    """``LDMPipeline`` (VQ latent diffusion; it passes ``eta`` to ``step`` where the signature takes it,
    and no generator: the step noise is torch's global RNG, seeded here) with a small random VQ model; the
    last ``prev_sample``, read by a spy that keeps ``step``'s signature."""
    torch.manual_seed(0)
    vq = diffusers.VQModel(
        block_out_channels=(8,), latent_channels=3, norm_num_groups=8, num_vq_embeddings=8, vq_embed_dim=3
    ).eval()
    outs: list[Tensor] = []
    step = scheduler.step

    @functools.wraps(step)
    def spy(*args: Any, **kw: Any) -> Any:
        out = step(*args, **kw)
        outs.append(out.prev_sample)
        return out

    scheduler.step = spy
    pipe = diffusers.LDMPipeline(vqvae=vq, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(11)
    with torch.no_grad():
        pipe(batch_size=2, generator=torch.Generator().manual_seed(5), eta=eta, num_inference_steps=10)
    return outs[-1]


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_pipeline_eta_is_ddim_schedulers_eta(unet, eta):
    # pipe(eta=...) reaches step only where its signature takes eta, which ours did not: the pipeline's eta
    # was dropped and the run was deterministic DDIM (before: 0.21 / 0.40 relative RMSE from DDIMScheduler's
    # run at eta 0.5 / 1). Measured 2.4e-7 / 2.2e-7 / 2.4e-7 now, the step noise the global RNG's on both.
    config = diffusers.DDIMScheduler(clip_sample=False).config
    ref = _ldm_pipeline(unet, diffusers.DDIMScheduler.from_config(config), eta)
    raw = _ldm_pipeline(unet, SteerdiffScheduler.from_config(config, solver="ddim", schedule="leading"), eta)
    assert rel_rmse(raw, ref) < PARITY_BOUND["DDIMScheduler(eta)"]
    if eta > 0:  # the eta matters
        assert rel_rmse(raw, _ldm_pipeline(unet, diffusers.DDIMScheduler.from_config(config), 0.0)) > 0.1


def _ddim_pipeline(unet: Any, scheduler: Any, eta: float, clipped: bool | None) -> Tensor:
    """``DDIMPipeline``'s images at ``eta`` and ``use_clipped_model_output=clipped``, with ``scheduler``
    set after construction (its constructor converts any scheduler to a DDIMScheduler)."""
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    kw = {"eta": eta, "use_clipped_model_output": clipped, "num_inference_steps": 6, "output_type": "pt"}
    with torch.no_grad():
        return pipe(batch_size=2, generator=gen, **kw).images


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize(("clip", "clipped"), [(False, None), (True, None), (True, False), (True, True)])
def test_ddim_pipeline_runs_and_is_ddim_schedulers(unet, eta, clip, clipped):
    # DDIMPipeline passes use_clipped_model_output to step (a TypeError at its first step before ours took
    # it). With clip_sample its None / False pair the clipped x0 with the net's eps, True with the eps of the
    # clipped x0: ours was True's run whatever the flag (0.94 / 0.73 from DDIMScheduler's default at eta 0 /
    # 0.5). Measured 6.1e-8 / 9.7e-8 without clipping; clipped, None and False 2.0e-6 / 6.9e-7 (the raw-eps
    # run amplifies float32 rounding: test_clip_sample_under_ddim_is_ddims_use_clipped_model_output), True
    # 1.5e-7 / 2.3e-7; the flag's two runs are 0.78 / 0.63 apart (relative to the None run).
    theirs = diffusers.DDIMScheduler(clip_sample=clip)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="ddim", schedule="leading")
    images = _ddim_pipeline(unet, ours, eta, clipped)
    ref = _ddim_pipeline(unet, theirs, eta, clipped)
    assert rel_rmse(images, ref) < PARITY_BOUND["DDIMScheduler(eta)"]
    if clip:  # the flag matters
        assert rel_rmse(ref, _ddim_pipeline(unet, theirs, eta, not clipped)) > 0.5


def _eta_loop(sched: Any, net: Any, x_T: Tensor, eta: float, generator: Any, **grid: Any) -> Tensor:
    """A pipeline's loop passing ``eta`` and ``generator`` to each step (``None``: the global RNG, seeded)."""
    sched.set_timesteps(**grid)
    torch.manual_seed(7)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(net(x, t), t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("generator", ["one", "per sample", "global"])
def test_step_eta_is_ddim_eta_on_the_exact_model(eta, generator):
    # DDIMScheduler(eta) against solver="ddim" given step(eta=...), the exact 16-d mixture net, 10 leading
    # steps, the same draws (the pipeline's generator, one per sample, or the global RNG): 1.8e-7..2.2e-7.
    # The run is sd.sample's with DDIM(eta) to the bit; a configured DDIM(eta) keeps its eta at eta=0.
    config = diffusers.DDIMScheduler(
        **sd_betas_config(clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    ).config
    net, x_T = _mixture_net(config), torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def gen() -> Any:
        if generator == "global":
            return None
        return torch.Generator().manual_seed(3) if generator == "one" else _generators([3, 4, 5, 6])

    ddim = diffusers.DDIMScheduler.from_config(config)
    theirs = _eta_loop(ddim, net, x_T, eta, gen(), num_inference_steps=10)
    ours = SteerdiffScheduler.from_config(config, solver="ddim", schedule="leading")
    x = _eta_loop(ours, net, x_T, eta, gen(), num_inference_steps=10)
    assert rel_rmse(x, theirs) < PARITY_BOUND["DDIMScheduler(eta)"]
    den = denoiser_from_diffusers(net, config)
    torch.manual_seed(7)
    solver = sd.solvers.DDIM(eta=eta)
    assert torch.equal(x, sd.sample(den, x_T, 10, solver, "leading", generator=gen()))
    configured = SteerdiffScheduler.from_config(config, solver=solver, schedule="leading")
    assert torch.equal(_eta_loop(configured, net, x_T, 0.0, gen(), num_inference_steps=10), x)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_step_eta_is_tcd_schedulers_gamma(eta):
    # TCDScheduler's step takes its gamma as eta (a pipeline's eta reaches it); a TCD solver takes it alike.
    # TCD(floor_s=True) with final="none" over its timesteps and 0 (tests/test_tcd.py): measured 4.8e-7 /
    # 6.4e-7 at eta 0 / 0.7. At the pipelines' default eta=0 TCDScheduler runs gamma 0 and ours its configured
    # gamma (here 0; the default TCD()'s 0.3 is 1.13 relative RMSE from that run).
    cfg = {**diffusers.TCDScheduler(**sd_betas_config()).config, "_class_name": "TCDScheduler"}
    net, x_T = _mixture_net(cfg), torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs = diffusers.TCDScheduler.from_config(cfg)
    ref = _eta_loop(theirs, net, x_T, eta, torch.Generator().manual_seed(3), num_inference_steps=4)
    ours = SteerdiffScheduler.from_config(cfg, solver=sd.solvers.TCD(gamma=0.0, floor_s=True), final="none")
    times = [*theirs.timesteps.tolist(), 0]
    x = _eta_loop(ours, net, x_T, eta, torch.Generator().manual_seed(3), timesteps=times)
    assert rel_rmse(x, ref) < PARITY_BOUND["TCDScheduler"]


def test_an_eta_the_solver_cannot_take_is_refused_not_ignored():
    # solvers without DDIM's eta, eta > 1 for TCD's gamma, an inverse run (the deterministic ODE) and a
    # negative eta are refused naming eta and what is accepted; a refused step leaves the run as it was, and
    # eta=0 (the pipelines' default) then runs the solver as configured
    config = sd_betas_config()
    net = _mixture_net(config)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cases = [
        ("dpmpp_2m", {}, 0.5, r"^step: eta=0.5 .*no option of this run's solver DPMSolverPPMultistep.*eta=0"),
        ("tcd", {}, 1.5, r"eta in \[0, 1\] with 'tcd'"),
        ("ddim", {}, -0.1, r"^step: eta must be a finite number >= 0, got -0.1"),
        ("ddim", {"inverse": True}, 0.5, r"eta=0.5 in an inverse run .*accepted: eta=0"),
    ]
    for solver, kw, eta, match in cases:
        sched = SteerdiffScheduler.from_config(config, solver=solver, **kw)
        sched.set_timesteps(4)
        t = sched.timesteps[0]
        with pytest.raises(ValueError, match=match):
            sched.step(net(x_T, t), t, x_T, eta=eta)
        assert sched.step_index is None
        x = _eta_loop(sched, net, x_T, 0.0, torch.Generator().manual_seed(3), num_inference_steps=4)
        plain = SteerdiffScheduler.from_config(config, solver=solver, **kw)
        ref, _ = run_scheduler(plain, net, x_T, 4, torch.Generator().manual_seed(3))
        assert torch.equal(x, ref)
    assert "eta" in inspect.signature(SteerdiffScheduler.step).parameters  # what pipelines look for


def _given_noise_loop(
    sched: Any, net: Any, x_T: Tensor, zs: list[Tensor], eta: float | None, **grid: Any
) -> Tensor:
    """A loop passing ``variance_noise=zs[k]`` to step ``k`` (LEDITS++'s, CycleDiffusion's), ``eta`` where
    not ``None``; the global RNG seeded apart, so that a draw from it would differ."""
    sched.set_timesteps(**grid)
    torch.manual_seed(123)
    x = x_T
    kw = {} if eta is None else {"eta": eta}
    for k, t in enumerate(sched.timesteps):
        x = sched.step(net(x, t), t, x, variance_noise=zs[k], **kw).prev_sample
    return x


@pytest.mark.parametrize("case", ["ddim", "dpmpp_2m_sde"])
def test_variance_noise_is_the_steps_draw(case):
    # step(variance_noise=z) was a TypeError (LEDITS++, CycleDiffusion pass it). It is the call's one draw:
    # DDIMScheduler(eta=0.5) and DPMSolverMultistepScheduler(sde-dpmsolver++, order 2) given the same z per
    # step, the exact 16-d mixture net, 10 steps: measured 2.0e-7 / 2.3e-7; the run is sd.sample's with the
    # z's as its noise, to the bit, and the z's matter (a run of the global RNG's draws: 0.76 / 1.13 away).
    ddim = case == "ddim"
    extra = {"clip_sample": False, "timestep_spacing": "leading", "set_alpha_to_one": True} if ddim else {}
    cls = diffusers.DDIMScheduler if ddim else diffusers.DPMSolverMultistepScheduler
    options = (
        {} if ddim else {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}
    )
    config = cls(**sd_betas_config(**extra), **options).config
    net, x_T = _mixture_net(config), torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    zs = [torch.randn(x_T.shape, generator=g) for _ in range(10)]
    eta = 0.5 if ddim else None
    theirs = _given_noise_loop(cls.from_config(config), net, x_T, zs, eta, num_inference_steps=10)
    ref = cls.from_config(config)
    ref.set_timesteps(10)
    solver = sd.solvers.DDIM(eta=0.5) if ddim else sd.solvers.DPMSolverSDEMultistep(order=2)
    schedule = "leading" if ddim else nodes_of(ref)
    ours = SteerdiffScheduler.from_config(config, solver="ddim" if ddim else solver, schedule=schedule)
    x = _given_noise_loop(ours, net, x_T, zs, eta, num_inference_steps=10)
    bound = PARITY_BOUND["DDIMScheduler(eta)" if ddim else "DPMSolverMultistepScheduler(sde-dpmsolver++)"]
    assert rel_rmse(x, theirs) < bound
    replay = Replay(zs)
    assert torch.equal(
        x, sd.sample(denoiser_from_diffusers(net, config), x_T, 10, solver, schedule, generator=replay)
    )
    assert (
        replay.calls == 9
    )  # no draw into the clean end: the last z is ignored, as diffusers' 0 std ignores it
    torch.manual_seed(123)
    drawn = _eta_loop(ours, net, x_T, 0.0 if eta is None else eta, None, num_inference_steps=10)
    assert rel_rmse(drawn, x) > 0.1


@dataclass
class TwoDraws(sd.solvers.DDIM):
    """DDIM that draws two noises per step (and adds neither): one ``variance_noise`` cannot serve it."""

    def step(self, model: Any, x: Tensor, i: int, grid: Any, state: dict[str, Any]) -> Any:
        out = super().step(model, x, i, grid, state)
        for _ in range(2):
            out = out + 0 * model.noise(grid.t[i], grid.t[i + 1], x)
        return out


def test_variance_noise_is_ignored_by_a_deterministic_step_and_checked():
    # a call that draws nothing ignores variance_noise, as DDIMScheduler at eta 0 and DPMSolverMultistep's
    # ODE algorithms do; one of another shape or not a tensor is refused naming it, the run left as it was
    config = sd_betas_config()
    net, x_T = _mixture_net(config), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    zs = [torch.randn(x_T.shape, generator=torch.Generator().manual_seed(k)) for k in range(6)]
    for solver in ("ddim", "dpmpp_2m"):
        sched = SteerdiffScheduler.from_config(config, solver=solver)
        x = _given_noise_loop(sched, net, x_T, zs, 0.0, num_inference_steps=6)
        ref, _ = run_scheduler(SteerdiffScheduler.from_config(config, solver=solver), net, x_T, 6, None)
        assert torch.equal(x, ref)
    sched = SteerdiffScheduler.from_config(config, solver="ddim")
    sched.set_timesteps(4)
    t = sched.timesteps[0]
    for bad, match in [
        (zs[0][:1], r"variance_noise has shape \(1, 1, 4, 4\), expected sample's"),
        (3, "variance_noise must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            sched.step(net(x_T, t), t, x_T, eta=0.5, variance_noise=bad)
        assert sched.step_index is None
    assert "variance_noise" in inspect.signature(SteerdiffScheduler.step).parameters
    # a solver that draws twice in one call is refused (the registry's stochastic solvers drew at most once
    # per call in a 6-step karras run on these betas)
    sched = SteerdiffScheduler.from_config(config, solver=TwoDraws())
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match=r"^step: variance_noise is the noise of one draw, and TwoDraws"):
        sched.step(net(x_T, t), t, x_T, variance_noise=zs[0])


def test_prev_timestep_is_checked_against_the_next_timestep():
    # UnCLIPScheduler's prev_timestep (Kandinsky prior, unCLIP) was a TypeError: the next entry of timesteps
    # (None at the last call) runs as without it; another is refused naming it, the run left as it was
    config = sd_betas_config()
    net, x_T = _mixture_net(config), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sched = SteerdiffScheduler.from_config(config, solver="dpmpp_2m")
    sched.set_timesteps(5)
    ts, x = sched.timesteps, x_T
    for k, t in enumerate(ts):
        if k == 2:
            for wrong in (ts[k], ts[k + 1] + 1, 0):
                with pytest.raises(
                    ValueError, match=rf"^step: prev_timestep={float(wrong):g}, .*timesteps\[3\]"
                ):
                    sched.step(net(x, t), t, x, prev_timestep=wrong)
                assert sched.step_index == 2
        prev = ts[k + 1] if k + 1 < len(ts) else None
        x = sched.step(net(x, t), t, x, prev_timestep=prev).prev_sample
    ref, _ = run_scheduler(SteerdiffScheduler.from_config(config, solver="dpmpp_2m"), net, x_T, 5, None)
    assert torch.equal(x, ref)
    sched.set_timesteps(5)
    t = sched.timesteps
    x = sched.step(net(x_T, t[0]), t[0], x_T, prev_timestep=t[1]).prev_sample
    for k in range(1, 4):
        x = sched.step(net(x, t[k]), t[k], x).prev_sample
    with pytest.raises(ValueError, match=r"prev_timestep=0, .*none \(the run's last evaluation\)"):
        sched.step(net(x, t[4]), t[4], x, prev_timestep=0)


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("per_token_timesteps", "per_token_timesteps .*LTXConditionPipeline"),
        ("pred_original_sample", "pred_original_sample .*Cosmos"),
    ],
)
def test_step_keywords_of_other_schedulers_are_refused_by_name(key, match):
    # LTX's per-token timesteps and Cosmos' pred_original_sample were TypeErrors; now a ValueError naming them
    config = sd_betas_config()
    net, x_T = _mixture_net(config), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sched = SteerdiffScheduler.from_config(config, solver="ddim")
    sched.set_timesteps(4)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match=rf"^step: {match}"):
        sched.step(net(x_T, t), t, x_T, **{key: torch.zeros(x_T.shape)})
    assert sched.step_index is None


def _patch_as_stable_diffusion_pipeline(scheduler: Any) -> None:
    """What ``StableDiffusionPipeline.__init__`` (and some 20 other pipelines, all needing transformers,
    which is not installed here) does to an old Stable Diffusion 1.x scheduler config once the scheduler
    is built: a new config object with ``steps_offset=1``, then one with ``clip_sample=False``."""
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        scheduler._internal_dict = FrozenDict({**scheduler.config, "steps_offset": 1})
    if getattr(scheduler.config, "clip_sample", False) is True:
        scheduler._internal_dict = FrozenDict({**scheduler.config, "clip_sample": False})


def _mixture_net(config: dict[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact eps net of the 16-d benchmark mixture under ``config``'s process, on 1x4x4 images."""
    flat = eps_net(sd.toy.default_benchmark_mixture(dim=16), process_from_config(config))

    def net(x: Tensor, t: Tensor) -> Tensor:
        return flat(x.reshape(-1, 16).double(), t).reshape(x.shape).to(x.dtype)

    return net


def test_a_config_patched_by_the_pipeline_is_followed():
    # DDIMScheduler reads its config at set_timesteps and step, so the pipeline's patch takes effect. Before,
    # ours read the model once, at construction, and kept clipping x0: 0.38 relative RMSE from DDIM's run on
    # the 16-d mixture (steps_offset was read at set_timesteps already). Measured 1.5e-6 now, bit-identical
    # to a scheduler built from the patched config.
    config = diffusers.DDIMScheduler(**sd_betas_config(), clip_sample=True, steps_offset=0).config
    net, x_T = _mixture_net(config), torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs = diffusers.DDIMScheduler.from_config(config)
    ours = SteerdiffScheduler.from_config(config, solver="ddim", schedule="leading")
    unpatched = pickle.dumps(ours)
    assert isinstance(ours.denoiser, sd.guidance.DynamicThreshold)  # the config clips until patched
    for sched in (theirs, ours):
        _patch_as_stable_diffusion_pipeline(sched)
    assert (ours.config.steps_offset, ours.config.clip_sample) == (1, False)
    ref, _ = run_scheduler(theirs, net, x_T, 10)
    x, _ = run_scheduler(ours, net, x_T, 10)
    assert ours.timesteps.tolist() == theirs.timesteps.float().tolist() == list(range(901, 0, -100))
    assert type(ours.denoiser) is sd.Denoiser
    assert rel_rmse(x, ref) < PARITY
    assert torch.equal(run_scheduler(SteerdiffScheduler.from_config(dict(ours.config)), net, x_T, 10)[0], x)
    # pickled before the patch and patched once loaded, or pickled after it: the same run
    again = pickle.loads(unpatched)
    _patch_as_stable_diffusion_pipeline(again)
    assert torch.equal(run_scheduler(again, net, x_T, 10)[0], x)
    assert torch.equal(run_scheduler(pickle.loads(pickle.dumps(ours)), net, x_T, 10)[0], x)
    # the solver and schedule the config names, and an EDM config's init_noise_sigma (a property of
    # EDMEuler's config; before: ours kept sigma_max=80's 80.006)
    ours.register_to_config(solver="heun", schedule=[900.0, 500.0, 100.0])
    ours.set_timesteps(3)
    assert ours.timesteps.tolist() == [900.0, 500.0, 500.0, 100.0, 100.0]
    edm = SteerdiffScheduler.from_config(diffusers.EDMEulerScheduler().config)
    edm._internal_dict = FrozenDict({**edm.config, "sigma_max": 40.0})
    assert edm.init_noise_sigma == diffusers.EDMEulerScheduler(sigma_max=40.0).init_noise_sigma
    assert edm.denoiser.process.t_max == 40.0


IF_CONFIG = {  # DeepFloyd IF stage I: thresholding wins over clip_sample (DDPM's precedence)
    "_class_name": "DDPMScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.95,
    "prediction_type": "epsilon",
    "sample_max_value": 1.5,
    "thresholding": True,
}


@pytest.mark.parametrize("betas", ["if", "sd"])
@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_thresholding_matches_the_diffusers_scheduler(cls, betas):
    """Dynamic thresholding of the config (ratio 0.95, max 1.5) in DPMSolverMultistep / UniPC (bh2,
    order 2) from it, on the exact model of the 16-d mixture as 1x4x4 images, 10 steps on their
    nodes. Measured 2.1e-6 / 1.9e-6 on SD's betas, 1.3e-4 / 7.1e-5 on IF's cosine betas (whose
    unthresholded parity is 5.5e-4 / 6.5e-5); before (ignored): 0.80 / 0.82 and 0.81 / 0.85."""
    config = IF_CONFIG if betas == "if" else {**IF_CONFIG, **sd_betas_config()}
    theirs = getattr(diffusers, cls).from_config(config)
    assert theirs.config.thresholding
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    flat = eps_net(gmm, process_from_config(config))
    x_T = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def net(x: Tensor, t: Tensor) -> Tensor:
        return flat(x.reshape(-1, 16).double(), t).reshape(x.shape).to(x.dtype)

    ref, _ = run_scheduler(theirs, net, x_T, 10)
    solver = "dpmpp_2m" if cls.startswith("DPM") else sd.solvers.UniPC(order=2)
    ours = SteerdiffScheduler.from_config(config, solver=solver, schedule=nodes_of(theirs))
    x, _ = run_scheduler(ours, net, x_T, 10)
    assert isinstance(ours.denoiser, sd.guidance.DynamicThreshold)
    assert rel_rmse(x, ref) < (PARITY if betas == "sd" else 1e-3)


def test_unipc_without_predict_x0_does_not_threshold():
    """UniPC converts the net output to x0 and thresholds it only with predict_x0=True; with
    predict_x0=False its eps is the net's. Such a config was read as thresholding: eps off by 4.2 from
    UniPC's convert_model_output at step 3 of 10 (2e-6 now)."""
    theirs = diffusers.UniPCMultistepScheduler(thresholding=True, predict_x0=False)
    theirs.set_timesteps(10)
    theirs._step_index = 3
    g = torch.Generator().manual_seed(0)
    x, f = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    eps = theirs.convert_model_output(f.float(), sample=x.float()).double()
    den = denoiser_from_diffusers(lambda x_, t: f, theirs.config)
    assert type(den) is sd.Denoiser
    assert type(SteerdiffScheduler.from_config(theirs.config).denoiser) is sd.Denoiser
    t = float(den.process.t_of_sigma_ratio(theirs.sigmas[3].double()))
    assert float((den(x, t).eps - eps).abs().max()) < 1e-5


def test_bad_threshold_settings_are_refused():
    for key, value in [("dynamic_thresholding_ratio", 1.5), ("sample_max_value", 0.5)]:
        with pytest.raises(ValueError, match=key):
            SteerdiffScheduler.from_config({**IF_CONFIG, key: value})
    with pytest.raises(ValueError, match="clip_sample_range"):
        denoiser_from_diffusers(lambda x, t: x, {"clip_sample": True, "clip_sample_range": 0})


def test_pipeline_edits_between_steps_match_dpm_solver(unet):
    # An inpainting-style loop: after every step the known region is replaced by the image noised to
    # the next timestep with add_noise. Our scheduler takes the edited sample where the solver
    # evaluates at a step's input, as diffusers' multistep schedulers do.
    theirs = diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ours = SteerdiffScheduler.from_config(theirs.config, solver="dpmpp_2m", schedule="trailing")
    g = torch.Generator().manual_seed(2)
    known, noise, x_T = (torch.randn(SHAPE, generator=g) for _ in range(3))
    mask = (torch.arange(8) < 4).float().expand(SHAPE)
    results = []
    for sched in (theirs, ours):
        sched.set_timesteps(8)
        x, ts = x_T.clone(), sched.timesteps
        with torch.no_grad():
            for k, t in enumerate(ts):
                x = sched.step(unet(x, t).sample, t, x).prev_sample
                if k < len(ts) - 1:
                    x = mask * x + (1 - mask) * sched.add_noise(known, noise, ts[k + 1 : k + 2])
        results.append(x)
    # measured 2.8e-7 (0.95 if the edits were ignored)
    assert rel_rmse(results[1], results[0]) < PARITY


def _inpaint(sched: Any, dtype: torch.dtype, in_place: bool | None, zero_x0: bool = False) -> Tensor:
    """An inpainting loop on the 16-d mixture (SD betas, exact eps net in float64, run in ``dtype``):
    before every step but the first the known half is reset to the clean data noised to the step's
    timestep, in place (``x[:, keep] = ...``, as JoyImageEditPlus does) or not (``torch.where``);
    ``in_place=None``: no edits. ``zero_x0``: the pipeline overwrites ``pred_original_sample``."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    net = eps_net(gmm, process_from_config(sd_betas_config()))
    g = torch.Generator().manual_seed(1)
    known = gmm.sample(64, generator=g).float()
    noise, x_T = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    keep = torch.arange(16) < 8
    sched.set_timesteps(10)
    x = x_T.to(dtype)
    for i, t in enumerate(sched.timesteps):
        if i > 0 and in_place is not None:
            proper = sched.add_noise(known, noise, t.reshape(1)).to(dtype)
            if in_place:
                x[:, keep] = proper[:, keep]
            else:
                x = torch.where(keep, proper, x)
        out = sched.step(net(x.double(), t).to(dtype), t, x)
        if zero_x0:
            out.pred_original_sample.zero_()
        x = out.prev_sample
    return x.double()


def test_in_place_edits_are_taken_as_edits_out_of_place_are():
    # the pipeline changes the sample it got back in place: the scheduler compares it with the
    # prev_sample it returned (fp16: a copy it kept, not the object; no version counter, which
    # inference_mode tensors lack)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(sd_betas_config(timestep_spacing="trailing"))
    ours = SteerdiffScheduler.from_config(sd_betas_config(), solver="dpmpp_2m", schedule="trailing")
    ref = _inpaint(theirs, torch.float32, in_place=True)
    for dtype in (torch.float32, torch.float16):
        in_place, out_of_place = _inpaint(ours, dtype, True), _inpaint(ours, dtype, False)
        assert torch.equal(in_place, out_of_place)
        # measured fp32 6.3e-7, fp16 1.04e-3 (diffusers' own fp16 run: 1.01e-3); before, in place in fp16: 10
        assert rel_rmse(in_place, ref) < (PARITY if dtype == torch.float32 else 2e-3)
    assert rel_rmse(_inpaint(ours, torch.float32, None), ref) > 0.5  # the edits matter (measured 1.15)
    with torch.inference_mode():
        assert torch.equal(_inpaint(ours, torch.float16, True), in_place)


def test_outputs_are_copies_of_the_state():
    # a multistep solver keeps its x0 estimates: pred_original_sample is a copy, so a pipeline that
    # overwrites it changes nothing (before: relative RMSE 0.42)
    ours = SteerdiffScheduler.from_config(sd_betas_config(), solver="dpmpp_2m", schedule="trailing")
    assert torch.equal(_inpaint(ours, torch.float32, True, zero_x0=True), _inpaint(ours, torch.float32, True))


class _Compares(TorchDispatchMode):
    """Counts elementwise ``==`` of tensors shaped ``shape`` (step's comparison of the sample)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.eq and out.shape == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_sample_handed_back_unchanged_is_not_compared(dtype, inference):
    # step compares the sample with the prev_sample it returned only where it may differ: another
    # tensor, or the same one written to (in place; seen by its version counter, under inference_mode
    # too, where step returns a normal tensor); the result is the same either way
    def run(edit: str | None) -> tuple[Tensor, int]:
        sched = SteerdiffScheduler(solver="dpmpp_2m", schedule="karras")
        sched.set_timesteps(8)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
        with _Compares(SHAPE) as mode, torch.inference_mode(inference):
            for i, t in enumerate(sched.timesteps):
                if i > 0 and edit == "copy":
                    x = x.clone()
                elif i > 0 and edit is not None:
                    (x[:, :, :4] if edit == "in place" else x.view(-1)[:5]).fill_(0.0)  # a view bumps it too
                x = sched.step(0.5 * x, t, x).prev_sample
        return x, mode.count

    (same, none), (copied, every) = run(None), run("copy")
    assert none == 0 and every == 7  # one compare at each step's input after the first
    assert torch.equal(same, copied)
    for edit in ("in place", "view"):
        edited, count = run(edit)
        assert count == 7 and not torch.equal(edited, same)


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in a solver state (dicts, lists, tuples, History)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, History):
        obj = obj.values
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
    return [t for v in items for t in _tensors(v)]


@pytest.mark.parametrize("solver", sd.solvers.available())
def test_solver_state_tensors_are_shared_not_written(solver):
    # step re-runs a solver step from its checkpoint with a copy of the state's containers whose
    # tensors are the checkpoint's (no copy per step): no solver may write a state tensor in place
    if solver in MOVES_FIRST:
        pytest.skip("refused in a pipeline (test_pipeline_is_sd_sample)")
    sched = SteerdiffScheduler(solver=solver, schedule="karras")
    sched.set_timesteps(STEPS)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[Tensor, int]] = []
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x = sched.step(0.5 * x, t, x, generator=g).prev_sample
        assert [s._version for s, _ in seen] == [v for _, v in seen]
        seen += [(s, s._version) for s in _tensors(sched._run.state)]
    if solver == "unipc":  # its history holds the estimates from step to step (no trim: the corrector)
        sched.set_timesteps(STEPS)
        x, newest = torch.randn(SHAPE), None
        for t in sched.timesteps[:-1]:
            x = sched.step(0.5 * x, t, x).prev_sample
            history = sched._run.state["m"].values
            assert newest is None or history[1] is newest
            newest = history[0]


def test_runs_share_the_denoiser_whose_time_caches_the_plan_fills(monkeypatch):
    # one denoiser for the runs with the config's model: set_timesteps' dry run fills its per-time
    # coefficients, which the run then reads, and the next set_timesteps too
    sched = SteerdiffScheduler(solver="unipc", schedule="karras")
    den = sched.denoiser
    calls: list[Any] = []
    coefficients = den.process.coefficients
    monkeypatch.setattr(den.process, "coefficients", lambda t: calls.append(t) or coefficients(t))
    x = torch.randn(SHAPE)
    for steps, new_times in ((8, True), (8, False), (12, True)):
        n = len(calls)
        sched.set_timesteps(steps)
        per_time = [t for t in calls[n:] if not isinstance(t, Tensor)]  # not make_grid's
        assert sched.denoiser is den and bool(per_time) == new_times
        n = len(calls)
        for t in sched.timesteps:
            x = sched.step(0.5 * x, t, x).prev_sample
        assert len(calls) == n
    sched.set_timesteps(timesteps=[999, 800, 500, 200], sigmas=[14.6, 5.0, 1.0, 0.2])  # its own net times
    assert sched.denoiser is not den
    sched.set_timesteps(8)
    assert sched.denoiser is den


# --- img2img: add_noise and set_begin_index --------------------------------------------------------


@pytest.mark.parametrize(("solver", "start"), [("unipc", 3), ("heun", 2)])
def test_img2img_begins_at_a_step(unet, solver, start):
    config = diffusers.DDPMScheduler().config
    sched = SteerdiffScheduler.from_config(config, solver=solver, schedule="karras")
    sched.set_timesteps(STEPS)
    k = start * sched.order  # as StableDiffusionImg2ImgPipeline.get_timesteps
    g = torch.Generator().manual_seed(4)
    image, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    x = sched.add_noise(image, noise, sched.timesteps[k : k + 1])
    den = denoiser_from_diffusers(unet, config)
    nodes = sd.schedules.get("karras")(den.process, STEPS)
    a, s = (float(c) for c in den.process.coefficients(nodes[start])[:2])
    assert torch.allclose(x, a * image + s * noise)
    sched.set_begin_index(k)
    x_k = x
    with torch.no_grad():
        for t in sched.timesteps[k:]:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        ref = sd.sample(den, x_k, STEPS - start, solver, sd.schedules.Custom(nodes[start:]))
    assert torch.equal(x, ref)


@pytest.mark.parametrize(("solver", "start"), [("unipc", 3), ("heun", 2)])
def test_img2img_without_set_begin_index_begins_at_the_first_timestep(unet, solver, start):
    # Kandinsky 2.2 img2img, AnimateDiff video2video, CogVideoX, Wan video2video slice
    # timesteps[t_start * order:] and never call set_begin_index: the first timestep places the run
    # (Heun lists its inner nodes twice; the run begins at the entry that starts a step)
    g = torch.Generator().manual_seed(4)
    x_k = torch.randn(SHAPE, generator=g)
    results, index = [], []
    for begin in (True, False):
        sched = SteerdiffScheduler.from_config(
            diffusers.DDPMScheduler().config, solver=solver, schedule="karras"
        )
        sched.set_timesteps(STEPS)
        k = start * sched.order
        if begin:
            sched.set_begin_index(k)
        x = x_k
        with torch.no_grad():
            for t in sched.timesteps[k:]:
                x = sched.step(unet(x, t).sample, t, x).prev_sample
                index.append(sched.step_index)
        results.append(x)
    # before: the run restarted at timesteps[0], relative RMSE 22 (unipc) and 11 (heun) apart
    assert torch.equal(results[0], results[1])
    assert index[: len(index) // 2] == index[len(index) // 2 :]


def test_img2img_without_set_begin_index_matches_dpm_solver(unet):
    # DPMSolverMultistep takes its step index from the first timestep: the same slice, no begin index
    theirs = diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ours = SteerdiffScheduler.from_config(theirs.config, solver="dpmpp_2m", schedule="trailing")
    x_k = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    results = []
    for sched in (theirs, ours):
        sched.set_timesteps(10)
        x = x_k
        with torch.no_grad():
            for t in sched.timesteps[6:]:
                x = sched.step(unet(x, t).sample, t, x).prev_sample
        results.append(x)
    assert rel_rmse(results[1], results[0]) < PARITY  # measured 2.1e-7 (before: 10)


def test_step_refuses_a_timestep_out_of_order():
    sched = SteerdiffScheduler(solver="ddim", schedule="karras")
    sched.set_timesteps(4)
    x = torch.zeros(1, 3, 4, 4)
    ts = sched.timesteps
    with pytest.raises(ValueError, match="timestep=12345 is not an entry"):
        sched.step(x, 12345.0, x)
    sched.step(x, ts[0], x)
    with pytest.raises(ValueError, match=rf"timestep={float(ts[2]):g} where scheduler.timesteps\[1\]"):
        sched.step(x, ts[2], x)
    with pytest.raises(ValueError, match="one-element tensor"):
        sched.step(x, ts[1:3], x)
    for t in ts[1:].tolist():  # numbers are read too
        sched.step(x, t, x)
    assert sched.step_index == 4


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "ddpm"])
def test_no_device_read_per_step(solver):
    """On an accelerator (the meta device stands in, as in test_device.py) ``step`` checks a timestep
    tensor at the end of the run and takes the pipeline's edits without reading the device: the same
    copies and reads at 6 and 12 steps (the timesteps and sigmas copied once; one read for the NaN
    checks, one for the timestep checks)."""

    def syncs(steps: int) -> Any:
        sched = SteerdiffScheduler(solver=solver, schedule="karras")
        net = torch.nn.Linear(8, 8, device="meta")
        with _Syncs() as mode, torch.no_grad():
            sched.set_timesteps(steps, device="meta")
            sched.set_begin_index(2 * sched.order)  # the meta device's faked reads cannot place the run
            x = torch.randn(4, 8, device="meta")
            for t in sched.timesteps[2 * sched.order :]:
                x = sched.step(net(x), t, x).prev_sample
        return mode.count

    few, many = syncs(6), syncs(12)
    assert few == many and few["copy"] == 2 and few["read"] == 2, (few, many)


def test_img2img_begin_inside_a_step_is_refused(unet):
    sched = SteerdiffScheduler.from_config(diffusers.DDPMScheduler().config, solver="heun", schedule="karras")
    sched.set_timesteps(STEPS)
    sched.set_begin_index(3)  # Heun's second evaluation of step 1
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_begin_index"):
        sched.step(torch.zeros(SHAPE), sched.timesteps[3], x)
    sched.set_timesteps(STEPS)
    # beyond timesteps (before: accepted, refused at the first step as a begin inside a step)
    with pytest.raises(ValueError, match=r"^set_begin_index: begin_index .* in \[0, 11\], got 100$"):
        sched.set_begin_index(100)


def test_a_first_evaluation_away_from_the_sample_is_refused():
    """edm_sde churns (adds noise) before its first evaluation where the first node's sigma/alpha is in
    [s_tmin, s_tmax] (``leading`` spacing on SD's betas): the solver wants the net at the churned
    sample, the pipeline calls it at its own. Before: that output was taken as the churned sample's
    (here 0.64 relative RMSE from ``sd.sample`` with the same noise). With the first node out of the
    churn range the run is ``sd.sample``'s, churn at the later nodes included."""
    config = sd_betas_config()
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    net = eps_net(gmm, process_from_config(config))
    x_T = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    sched = SteerdiffScheduler.from_config(config, solver="edm_sde", schedule="leading")
    with pytest.raises(ValueError, match="before its first evaluation"):
        run_scheduler(sched, net, x_T, 7, torch.Generator().manual_seed(1))
    solver = sd.solvers.EDMStochasticHeun(s_tmax=2.0)  # leading's first node: sigma/alpha 6.5
    sched = SteerdiffScheduler.from_config(config, solver=solver, schedule="leading")
    x, _ = run_scheduler(sched, net, x_T, 7, torch.Generator().manual_seed(1))
    den = denoiser_from_diffusers(net, config)
    ref = sd.sample(den, x_T, 7, solver, "leading", generator=torch.Generator().manual_seed(1))
    assert sum(c is not None for c in sched._run.state["churn"]) == 3 and torch.equal(x, ref)


# --- the scheduler's contract ----------------------------------------------------------------------


def test_step_out_of_order_is_refused():
    sched = SteerdiffScheduler(solver="ddim", schedule="karras")
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 0, x)
    sched.set_timesteps(2)
    for t in sched.timesteps:
        sched.step(torch.zeros_like(x), t, x)
    with pytest.raises(ValueError, match="more than"):
        sched.step(x, 0, x)
    with pytest.raises(ValueError, match="final"):
        SteerdiffScheduler(final="clean")
    with pytest.raises(ValueError, match="solver"):
        SteerdiffScheduler(solver="rk45")
    with pytest.raises(ValueError, match="noise"):
        SteerdiffScheduler.from_config(diffusers.DDPMScheduler().config, noise=5)


def test_a_sample_of_another_shape_mid_run_is_refused():
    # before: torch's RuntimeError "The size of tensor a (3) must match the size of tensor b (2)"
    sched = SteerdiffScheduler(solver="dpmpp_2m", schedule="karras")
    sched.set_timesteps(3)
    x = torch.zeros(2, 3, 4, 4)
    x = sched.step(torch.zeros_like(x), sched.timesteps[0], x).prev_sample
    other = torch.zeros(3, 3, 4, 4)
    with pytest.raises(ValueError, match=r"sample has shape \(3, 3, 4, 4\), the run's is \(2, 3, 4, 4\)"):
        sched.step(other, sched.timesteps[1], other)


def test_half_precision_runs_in_float32():
    # fp16 pipelines: the solver state is float32 (as diffusers' schedulers upcast), prev_sample fp16
    sched = SteerdiffScheduler(solver="unipc", schedule="karras")
    sched.set_timesteps(8)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = []
    for dtype in (torch.float16, torch.float32):
        x = x_T.to(dtype)
        for t in sched.timesteps:
            out = sched.step(0.5 * x, t, x)
            assert out.prev_sample.dtype == out.pred_original_sample.dtype == dtype
            x = out.prev_sample
        results.append(x.float())
        sched.set_timesteps(8)
    assert rel_rmse(results[0], results[1]) < 2e-3  # measured 7e-4: fp16 rounding of sample and outputs


def test_nan_output_is_reported():
    sched = SteerdiffScheduler(solver="dpmpp_2m", schedule="karras")
    sched.set_timesteps(3)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(sd.NonFiniteError, match="step 1"):
        for k, t in enumerate(sched.timesteps):
            out = torch.full_like(x, math.nan if k == 1 else 0.0)
            x = sched.step(out, t, x).prev_sample


PICKLED = [  # a custom net time map (timesteps with sigmas), Euler's continuous v time, a VP config
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, "euler_ancestral", {"sigmas": [1.0, 0.7, 0.4, 0.2]}),
    (
        "EulerDiscreteScheduler",
        {"prediction_type": "v_prediction", "timestep_type": "continuous"},
        "heun",
        {},
    ),
    ("DDPMScheduler", {}, "dpmpp_2m_sde", {}),
]


@pytest.mark.parametrize(("cls", "config", "solver", "grid"), PICKLED, ids=["flow", "continuous", "vp"])
def test_a_scheduler_pickled_mid_run_goes_on_as_it_was(cls, config, solver, grid):
    # before: pickle raised for every flow-matching or continuous-time config (a lambda time map) and,
    # for any config, once step had run (its weak reference to the prev_sample it returned)
    sched = SteerdiffScheduler.from_config(getattr(diffusers, cls)(**config).config, solver=solver)
    if "sigmas" in grid:
        grid = {**grid, "timesteps": [1000 * s for s in grid["sigmas"]]}
    else:
        grid = {"num_inference_steps": 4}
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) / 4

    def net(x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(x.reshape(len(x), -1) @ weight).reshape(x.shape) * (1 + float(t) / 1000)

    def run(sched: Any, x: Tensor, start: int, stop: int, g: torch.Generator) -> Tensor:
        for t in sched.timesteps[start:stop]:
            x = sched.step(net(x, t), t, x, generator=g).prev_sample
        return x

    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    sched.set_timesteps(**grid)
    n = len(sched.timesteps)
    whole = run(sched, x_T, 0, n, torch.Generator().manual_seed(2))
    sched.set_timesteps(**grid)
    g = torch.Generator().manual_seed(2)
    x = run(sched, x_T, 0, 2, g)
    again, g = pickle.loads(pickle.dumps((sched, g)))
    assert torch.equal(run(again, x, 2, n, g), whole)


def test_config_round_trip(tmp_path):
    # a saved config (as a pipeline loads it) names its class; ours keeps it as `origin`
    unipc = diffusers.UniPCMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    unipc.save_pretrained(tmp_path / "unipc")
    config = diffusers.UniPCMultistepScheduler.load_config(tmp_path / "unipc")
    sched = SteerdiffScheduler.from_config(config, solver="dpmpp_3m", schedule="logsnr_uniform")
    sched.save_pretrained(tmp_path)
    again = SteerdiffScheduler.from_pretrained(tmp_path)
    assert again.config.origin == "UniPCMultistepScheduler"
    assert (again.config.solver, again.config.schedule) == ("dpmpp_3m", "logsnr_uniform")
    assert again.config.solver_order == 2  # UniPC's own keys are kept, not used
    # without solver/schedule: sd.sample's choice for a guided denoiser (pipelines guide outside
    # the scheduler) and its default schedule (None: karras_capped; LCM and TCD configs, lcm)
    plain = SteerdiffScheduler.from_config(config)
    assert (plain.config.solver, plain.config.schedule) == (None, None)
    guarded = sd.solvers.DPMSolverPPMultistep(order=2, max_h=sd.sampling.GUIDED_MAX_H, max_h_ratio=0.0)
    short = sd.solvers.UniPC(order=2, max_h=sd.sampling.guided_corrector_max_h(None), max_h_ratio=0.0)
    long = sd.solvers.UniPC(order=2, max_h=sd.sampling.GUIDED_MAX_H, max_h_ratio=0.0)
    for steps, solver in [(9, guarded), (14, short), (15, long)]:
        plain.set_timesteps(steps)
        grid = plain._run.grid
        assert plain._run.solver == solver == sd.solvers.get(sd.sampling.guided_solver(steps, None, grid))
    plain.save_pretrained(tmp_path / "plain")
    loaded = SteerdiffScheduler.from_pretrained(tmp_path / "plain")
    assert (loaded.config.solver, loaded.config.schedule) == (None, None)
    # the pipeline's CFG scale, which the scheduler cannot see, sets the guided default's long-step limit
    mild = SteerdiffScheduler.from_config(config, guidance_scale=2.0)
    mild.set_timesteps(5)
    # (at 5 steps every step is within guided_max_h(2.0): UniPC-2, first order above its own limit)
    assert mild._run.solver == sd.solvers.UniPC(
        order=2, max_h=sd.sampling.guided_corrector_max_h(2.0), max_h_ratio=0.0
    )
    mild.save_pretrained(tmp_path / "mild")
    assert SteerdiffScheduler.from_pretrained(tmp_path / "mild").config.guidance_scale == 2.0
    for bad in ("7.5", math.inf, True, -1, -0.5):  # a negative scale, as CFG refuses it
        with pytest.raises(ValueError, match="guidance_scale"):
            SteerdiffScheduler.from_config(config, guidance_scale=bad)
    sched.set_timesteps(7)
    again.set_timesteps(7)
    assert torch.equal(sched.timesteps, again.timesteps)
    assert torch.equal(sched.denoiser.process.alphas_cumprod, again.denoiser.process.alphas_cumprod)


@pytest.mark.parametrize("inner", ["ddpm", sd.solvers.DDIM(eta=0.5), "heun"], ids=str)
def test_pipeline_runs_self_recurrence(unet, tmp_path, inner):
    """SelfRecurrence (a solver option: ``inner``; a constructor without ``order``) was refused by the
    scheduler, "cannot be kept in the scheduler config ... (define the class at module level ...)", though it
    is one: its inner solver is now kept as a nested stored form. The pipeline is sd.sample to the bit, and a
    saved pipeline loads it back."""
    solver = sd.solvers.SelfRecurrence(inner, repeats=2)
    config = diffusers.DDPMScheduler().config
    sched = SteerdiffScheduler.from_config(config, solver=solver, schedule="karras")
    raw, _, passed = _pipeline(unet, sched, STEPS, seed=5)
    ref, nfe = _reference(denoiser_from_diffusers(unet, config), STEPS, 5, solver=solver, schedule="karras")
    assert len(passed) == nfe == solver.nfe(STEPS)
    assert torch.equal(raw, ref)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path).scheduler
    assert again._solver == solver
    assert torch.equal(_pipeline(unet, again, STEPS, seed=5)[0], ref)


@dataclass
class OwnSolver(sd.solvers.Heun):
    """A solver of one's own (outside the registry), with an option of its own."""

    scale: float = 1.0


def test_pipeline_with_solver_and_schedule_instances_saves_and_loads(unet, tmp_path):
    # instances are kept as their registry name and options (before: their repr, which from_pretrained
    # could not parse: ValueError "unknown solver='UniPC(order=2, ...)'")
    sched = SteerdiffScheduler.from_config(
        diffusers.DDPMScheduler().config,
        solver=sd.solvers.UniPC(order=2, variant="bh1"),
        schedule=sd.schedules.KarrasJump(rho=5.0, sigma_top=20.0),
        guidance_scale=1.0,
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path).scheduler
    assert isinstance(again, SteerdiffScheduler) and again.config.solver["name"] == "unipc"
    assert again._solver == sched._solver
    assert type(again._schedule) is sd.schedules.KarrasJump and vars(again._schedule) == vars(sched._schedule)
    ref, _, _ = _pipeline(unet, sched, STEPS, seed=3)
    raw, _, _ = _pipeline(unet, again, STEPS, seed=3)
    assert torch.equal(raw, ref)

    grid = SteerdiffScheduler(
        solver=sd.solvers.Restart(restart_info=[(0.1, 2.0, 1, 2)]), schedule=[900, 500, 100]
    )
    grid.save_pretrained(tmp_path / "grid")
    loaded = SteerdiffScheduler.from_pretrained(tmp_path / "grid")
    assert loaded.config.schedule == [900.0, 500.0, 100.0]  # a custom grid: its process times
    assert loaded._solver.restart_info == [[0.1, 2.0, 1, 2]]

    own = SteerdiffScheduler(solver=OwnSolver(order=2, scale=0.5))  # a class of one's own: its import path
    own.save_pretrained(tmp_path / "own")
    assert own.config.solver["class"] == f"{__name__}:OwnSolver"
    assert SteerdiffScheduler.from_pretrained(tmp_path / "own")._solver == OwnSolver(order=2, scale=0.5)

    class Local(sd.solvers.UniPC):  # defined in a function: no import path rebuilds it
        pass

    with pytest.raises(ValueError, match="cannot be kept in the scheduler config"):
        SteerdiffScheduler(solver=Local())
    with pytest.raises(ValueError, match="does not describe a solver"):
        SteerdiffScheduler(solver={"name": "unipc", "rank": 3})


# a module whose import is seen: it counts its executions in sys (a module every run has)
_TRAP = """
import sys
from dataclasses import dataclass
import steerdiff as sd
sys.steerdiff_trap_runs = getattr(sys, "steerdiff_trap_runs", 0) + 1

@dataclass
class Trap(sd.solvers.Heun):
    pass
"""


def test_a_config_imports_steerdiffs_modules_and_only_modules_already_imported(tmp_path, monkeypatch):
    # a (downloaded) config's {"class": "module:Name"} imported any installed module, which runs its code
    # (before: the trap module below was imported and run by the config); now only steerdiff's modules, or
    # a module imported already (whoever defined the class has imported it)
    (tmp_path / "steerdiff_trap_mod.py").write_text(_TRAP)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "steerdiff_trap_runs", 0, raising=False)
    stored = {"class": "steerdiff_trap_mod:Trap", "order": 2}
    try:
        for kind, value in (("solver", stored), ("schedule", {"class": "steerdiff_trap_mod:Trap"})):
            match = f"{kind} class 'steerdiff_trap_mod:Trap'.*not imported.*first"
            with pytest.raises(ValueError, match=match):
                SteerdiffScheduler(**{kind: value})
        assert "steerdiff_trap_mod" not in sys.modules and sys.steerdiff_trap_runs == 0
        # the user's own import (the trusting step) lets the config use the class, not importing it again
        trap = importlib.import_module("steerdiff_trap_mod")
        assert SteerdiffScheduler(solver=stored)._solver == trap.Trap(order=2)
        assert sys.steerdiff_trap_runs == 1
    finally:
        sys.modules.pop("steerdiff_trap_mod", None)
    # steerdiff's own modules are imported freely, by path
    heun = SteerdiffScheduler(solver={"class": "steerdiff.solvers.euler:Heun", "order": 2})._solver
    assert type(heun) is sd.solvers.Heun
    with pytest.raises(ValueError, match="cannot be imported"):
        SteerdiffScheduler(solver={"class": "steerdiff.no_such_module:Heun"})


# --- breaks: a pipeline's field that jumps --------------------------------------------------------


def _controlled_loop(sched: Any, edit: sd.Denoiser, x: Tensor, begin: int = 0, seed: int = 1) -> Tensor:
    """A pipeline's loop whose net returns ``edit``'s velocity at the node's process time (an RF-Inversion
    pipeline's controlled field, exactly), from ``timesteps[begin]``."""
    sched.set_timesteps(12)
    sched.set_begin_index(begin)
    g = torch.Generator().manual_seed(seed)
    for k, t in enumerate(sched.timesteps[begin:]):
        p = edit(x, sched._times[begin + k])
        x = sched.step(p.eps - p.x0, t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("solver", ["unipc", "dpmpp_2m_sde"])
def test_breaks_restart_the_history_as_sd_sample_does(solver):
    """RF-Inversion's editing window ``[0.2, 0.6)`` makes the pipeline's field jump at ``t = 0.4, 0.8``: given
    them (``breaks``), the scheduler restarts the solver's history after the steps across them
    (``sampling.crossings``), so the loop is ``sd.sample`` / ``sd.invert`` of the ``ControlledEditing``
    denoiser, from the first step or an img2img begin index (relative RMSE measured <= 2.3e-16 sampling,
    4.3e-14 inverting; without the breaks 0.126 / 0.098 sampling with UniPC / dpmpp_2m_sde, 0.134
    inverting)."""
    from steerdiff.rf_inversion import ControlledEditing

    config, gmm = diffusers.FlowMatchEulerDiscreteScheduler().config, sd.toy.default_benchmark_mixture(dim=16)
    ours = SteerdiffScheduler.from_config(config, solver=solver, schedule="time_uniform")
    edit = ControlledEditing(
        gmm.denoiser(ours.denoiser.process), torch.zeros(1, 16, dtype=F64), 0.7, 0.2, 0.6
    )
    ours.breaks = list(reversed(edit.breaks()))
    assert ours.breaks == edit.breaks() == pytest.approx([0.4, 0.8])
    x_T = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    for begin in (0, 3):
        x = _controlled_loop(ours, edit, x_T, begin)
        nodes = sd.schedules.Custom(ours._times[begin:])
        ref = sd.sample(edit, x_T, 12 - begin, solver, nodes, generator=torch.Generator().manual_seed(1))
        assert rel_rmse(x, ref) < 1e-12
    if solver == "unipc":
        inv = SteerdiffScheduler.from_config(config, solver=solver, schedule="time_uniform", inverse=True)
        inv.breaks = edit.breaks()
        x_0 = gmm.sample(8, generator=torch.Generator().manual_seed(2)).to(F64)
        assert (
            rel_rmse(_controlled_loop(inv, edit, x_0), sd.invert(edit, x_0, 12, solver, "time_uniform"))
            < 1e-12
        )
    with pytest.raises(ValueError, match="breaks must be a list or tuple"):
        ours.breaks = 0.4
    with pytest.raises(ValueError, match="breaks must be a finite number"):
        ours.breaks = [0.4, math.nan]


# --- custom grids (timesteps= / sigmas=) and unguided pipelines ----------------------------------


def _flow_net(gmm: sd.toy.GaussianMixture) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact velocity ``eps - x0`` of ``gmm`` under rectified flow, at diffusers' timestep 1000 t."""
    den = gmm.denoiser(sd.RectifiedFlow())

    def net(x: Tensor, t: Tensor) -> Tensor:
        p = den(x.double(), float(t) / 1000)
        return (p.eps - p.x0).to(x.dtype)

    return net


FLOW_GRIDS = [  # FlowMatchEuler configs and the mu a Flux-style pipeline passes
    ({"shift": 3.0}, None),
    ({"use_dynamic_shifting": True}, 0.8),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear", "shift_terminal": 0.1}, 1.2),
]


@pytest.mark.parametrize(("config", "mu"), FLOW_GRIDS, ids=["shift", "dynamic", "linear_terminal"])
def test_custom_sigmas_of_flow_pipelines_are_shifted_as_flowmatch_euler_shifts_them(config, mu):
    """Flux-style pipelines always call ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``: the grid
    is then FlowMatchEuler's own (its node 1.0 clipped to the model's 0.999), with steerdiff's solver
    on it. On the 16-d default mixture (256 samples, against the 400-step UniPC-3 solution) at 10
    steps the guided default (2M) is measured 0.134 / 0.125 / 0.157 against FlowMatchEuler's
    0.245 / 0.236 / 0.259 on the same nodes (and 0.122 on steerdiff's own grid), and the run is
    ``sd.sample`` on those nodes."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    ours = SteerdiffScheduler.from_config(theirs.config)
    sigmas = [1 - k / 10 for k in range(10)]  # linspace(1, 0.1, 10)
    for sched in (theirs, ours):
        sched.set_timesteps(sigmas=sigmas, mu=mu)
    assert ours.timesteps[0] == pytest.approx(999.0) and theirs.timesteps[0] == pytest.approx(1000.0)
    assert torch.allclose(ours.timesteps[1:], theirs.timesteps[1:], rtol=0, atol=2e-4)

    gmm = sd.toy.default_benchmark_mixture(dim=16)
    x_T = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = sd.sample(gmm.denoiser(ours.denoiser.process), x_T, 400, "unipc", "logsnr_uniform")
    grid = {"sigmas": sigmas, "mu": mu}
    x_ours, nfe = run_scheduler(ours, _flow_net(gmm), x_T, None, **grid)
    x_theirs, _ = run_scheduler(theirs, _flow_net(gmm), x_T, None, **grid)
    nodes = sd.schedules.Custom(ours._times)  # the nodes' process times; the net sees float32 1000 t
    x = sd.sample(gmm.denoiser(ours.denoiser.process), x_T, 10, ours._run.solver, nodes)
    assert nfe == 10 and rel_rmse(x_ours, x) < 1e-7  # measured 2e-9
    assert rel_rmse(x_ours, ref) < 0.7 * rel_rmse(x_theirs, ref)


@pytest.mark.parametrize(
    ("config", "mu"), [({"flow_shift": 5.0}, None), ({"flow_shift": 5.0, "use_dynamic_shifting": True}, 0.8)]
)
def test_custom_sigmas_of_unipc_flow_configs_are_shifted_as_unipc_shifts_them(config, mu):
    """UniPC's flow configs (Wan, SkyReels: ``use_flow_sigmas=True``) name the shift ``flow_shift``;
    UniPC shifts custom ``sigmas`` by it. Before: ignored (shift 1), nodes at the unshifted sigmas
    (0.86 where UniPC's is 0.97)."""
    flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
    theirs = diffusers.UniPCMultistepScheduler(**flow, **config)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="euler")
    sigmas = [0.95 - 0.1 * k for k in range(9)]  # inside the model's range: no clipping
    theirs.set_timesteps(sigmas=torch.tensor(sigmas).numpy(), mu=mu)  # UniPC takes an array
    ours.set_timesteps(sigmas=sigmas, mu=mu)
    assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=0, atol=1e-6)


COGVIEW4 = {  # its FlowMatchEuler config
    "base_image_seq_len": 256,
    "base_shift": 0.25,
    "max_shift": 0.75,
    "time_shift_type": "linear",
    "use_dynamic_shifting": True,
}


@pytest.mark.parametrize(("top", "bottom", "bound"), [(1000, 1, 3e-3), (950, 50, PARITY)])
def test_custom_timesteps_with_sigmas_are_flowmatch_eulers(top, bottom, bound):
    """CogView4 / GLM-Image call ``set_timesteps(timesteps=t, sigmas=t / 1000, mu=mu)``: the net sees
    ``t`` while FlowMatchEuler integrates on the shifted sigmas. The same net times, and with
    ``solver="euler"`` FlowMatchEuler's output: measured 3.2e-7 apart on a grid inside the model's
    range (950 .. 50) and 1.5e-3 on CogView4's own (1000 .. 1), whose end nodes 1.0 and 7e-4 are
    clipped to 0.999 and 0.001 here. A multistage solver's inner evaluations get net times linear in
    process time between the nodes'. Before: refused."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**COGVIEW4)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="euler")
    t = torch.linspace(top, bottom, 10).long().float()  # CogView4: linspace(1000, 1, N).astype(int64)
    grid = {"timesteps": t, "sigmas": t / 1000, "mu": 0.7}
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    x_T = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    x_theirs, _ = run_scheduler(theirs, _flow_net(gmm), x_T, None, **grid)
    x_ours, _ = run_scheduler(ours, _flow_net(gmm), x_T, None, **grid)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert rel_rmse(x_ours, x_theirs) < bound
    fresh = SteerdiffScheduler.from_config(theirs.config, solver="euler")
    for sched in (ours, fresh):
        sched.set_timesteps(10)
    assert torch.equal(ours.timesteps, fresh.timesteps)  # the time map was that run's

    inner = SteerdiffScheduler.from_config(theirs.config, solver="dpmpp_sde")  # a midpoint per step
    inner.set_timesteps(**grid)
    assert torch.equal(inner.timesteps[::2], theirs.timesteps)
    nodes, mid = torch.tensor(inner._times[::2], dtype=F64), torch.tensor(inner._times[1::2], dtype=F64)
    tau = t.double()
    linear = tau[:-1] + (mid - nodes[:-1]) / (nodes[1:] - nodes[:-1]) * (tau[1:] - tau[:-1])
    assert torch.allclose(inner.timesteps[1::2].double(), linear, rtol=1e-6, atol=0)


def test_custom_timesteps_and_sigmas_of_vp_pipelines():
    """VP configs: ``timesteps`` are the nodes' net times as given, then ``final``'s step to the clean
    end (DPMSolverMultistep's custom timesteps); ``sigmas`` are Karras' ``sigma / alpha``, a trailing
    0 dropped, giving EulerDiscrete's timesteps for the same list."""
    config = sd_betas_config()
    # diffusers' rule for long steps (the last node's step is 2.6 in log-SNR, 4.2x the one before)
    ours = SteerdiffScheduler.from_config(config, solver=sd.solvers.DPMSolverPPMultistep(max_h=math.inf))
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config)
    for sched in (ours, theirs):
        sched.set_timesteps(timesteps=[999, 800, 500, 200, 0])
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == [999, 800, 500, 200, 0]
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    process = process_from_config(config)
    x_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    x_ours, _ = run_scheduler(ours, eps_net(gmm, process), x_T, None, timesteps=[999, 800, 500, 200, 0])
    x_theirs, _ = run_scheduler(theirs, eps_net(gmm, process), x_T, None, timesteps=[999, 800, 500, 200, 0])
    assert rel_rmse(x_ours, x_theirs) < PARITY  # the same algorithm on the same nodes

    euler = diffusers.EulerDiscreteScheduler.from_config(config)
    sigmas = [14.6, 5.0, 1.0, 0.2, 0.03, 0.0]
    for sched in (ours, euler):
        sched.set_timesteps(sigmas=sigmas)
    assert torch.allclose(ours.timesteps, euler.timesteps, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ({"num_inference_steps": 5, "sigmas": [1.0, 0.5]}, "one of"),
        ({}, "one of"),
        ({"sigmas": [0.5, 0.8]}, "strictly decreasing"),
        ({"sigmas": [0.5, math.nan]}, "sigmas must be finite"),
        ({"timesteps": "999"}, "timesteps must be"),
        ({"sigmas": [1.0, 0.5], "mu": None}, "mu is required"),
        ({"timesteps": [999, 500], "sigmas": [1.0, 0.5, 0.2]}, "same length"),
    ],
)
def test_bad_custom_grids_are_refused(grid, match):
    config = dict(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    sched = SteerdiffScheduler.from_config(config)
    grid = {"mu": 0.5, **grid}
    with pytest.raises(ValueError, match=match):
        sched.set_timesteps(**grid)
    karras = SteerdiffScheduler.from_config(
        diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).config
    )
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        karras.set_timesteps(sigmas=[1.0, 0.5])


def test_sigmas_are_the_diffusers_schedulers_sigmas():
    """Wan (``float(scheduler.sigmas[i])`` every step) and LTX-condition pipelines read ``sigmas``:
    aligned with ``timesteps``, in the config's convention, then the end (0), on the device. Before:
    no ``sigmas`` attribute (AttributeError)."""
    flux = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.1)
    ours = SteerdiffScheduler.from_config(flux.config)
    for sched in (flux, ours):
        sched.set_timesteps(sigmas=[1 - k / 10 for k in range(10)], mu=1.0)
    assert ours.sigmas[0] == pytest.approx(0.999) and flux.sigmas[0] == 1.0  # the model's range ends there
    assert torch.allclose(ours.sigmas[1:], flux.sigmas[1:], rtol=0, atol=1e-7)  # measured 6e-8
    wan = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    wan.set_timesteps(10)
    nodes = sd.schedules.Custom(wan.sigmas[:-1].double().clamp(max=0.999))  # flow sigma = process time
    ours = SteerdiffScheduler.from_config(wan.config, schedule=nodes)
    ours.set_timesteps(10)
    assert torch.allclose(ours.sigmas[1:], wan.sigmas[1:], rtol=0, atol=1e-7)  # measured 0
    for cls, solver, steps in [
        (diffusers.DPMSolverMultistepScheduler, "dpmpp_2m", 10),
        (diffusers.HeunDiscreteScheduler, "heun", 6),  # 2N - 1 timesteps, inner sigmas twice
    ]:
        theirs = cls.from_config(sd_betas_config())
        theirs.set_timesteps(steps)
        ours = SteerdiffScheduler.from_config(sd_betas_config(), solver=solver, schedule=nodes_of(theirs))
        ours.set_timesteps(steps)
        assert len(ours.sigmas) == len(ours.timesteps) + 1 == len(theirs.sigmas)
        assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=1e-5, atol=0)  # measured 1.0e-7, 1.7e-6
    ours.set_timesteps(steps, device="meta")
    assert ours.sigmas.is_meta and ours.sigmas.dtype == torch.float32


def test_unguided_pipelines_get_the_unguided_default():
    """``guidance_scale <= 1``: the pipeline does not guide, so the scheduler's default is
    ``sd.sample``'s for a plain denoiser (UniPC-3 with its guard), not the guided 2M / UniPC-2. On the
    64-d benchmark mixture (256 samples, SD betas, against the exact ODE) at 10 / 20 steps measured
    2.2e-2 / 2.1e-3 against the guided default's 0.126 / 3.5e-3, and the run is ``sd.sample``'s (on the
    draw before x_T left the mixture means' stream: 7.7e-2 / 3.3e-3 against 0.109 / 7.1e-2)."""
    problem = make_problem(256, seed=0)
    gmm, process, x_T, ref = problem.gmm, problem.process, problem.x_T, problem.ref
    for steps, bound in [(10, 0.3), (20, 0.8)]:
        unguided = SteerdiffScheduler.from_config(sd_betas_config(), guidance_scale=1.0)
        guided = SteerdiffScheduler.from_config(sd_betas_config())
        x, _ = run_scheduler(unguided, eps_net(gmm, process), x_T, steps)
        x_guided, _ = run_scheduler(guided, eps_net(gmm, process), x_T, steps)
        assert unguided._run.solver == sd.sampling.default_solver(gmm.denoiser(process), steps)
        plain = denoiser_from_diffusers(eps_net(gmm, process), sd_betas_config())
        assert rel_rmse(x, sd.sample(plain, x_T, steps)) < 1e-6  # the net sees float32 timesteps
        assert rel_rmse(x, ref) < bound * rel_rmse(x_guided, ref)


# --- denoiser_from_diffusers: the model a config describes ---------------------------------------

BETAS = [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"trained_betas": torch.linspace(1e-4, 0.03, 500).tolist(), "num_train_timesteps": 500},
    {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True},
]


@pytest.mark.parametrize("cfg", BETAS, ids=["linear", "scaled", "cosine", "sigmoid", "trained", "zero_snr"])
def test_process_is_the_training_process(cfg):
    theirs = diffusers.DDPMScheduler(**cfg)
    ac = process_from_config(theirs).alphas_cumprod
    # diffusers keeps alphas_cumprod[-1] = 0 for zero terminal SNR; steerdiff 2^-24 (lam finite)
    n = len(ac) - 1 if cfg.get("rescale_betas_zero_snr") else len(ac)
    # float32 rounding: diffusers rescales the float32 betas, steerdiff the float64 alphas_cumprod
    assert torch.allclose(ac[:n], theirs.alphas_cumprod[:n].double(), rtol=1e-5, atol=0)  # measured 2.3e-6
    assert len(ac) == theirs.config.num_train_timesteps


def test_snr_shift_is_the_cogvideox_process():
    theirs = diffusers.CogVideoXDDIMScheduler(snr_shift_scale=3.0)
    ac = process_from_config(theirs.config).alphas_cumprod
    assert torch.allclose(ac, theirs.alphas_cumprod.double(), rtol=1e-5, atol=0)  # measured 1.3e-6


@pytest.mark.parametrize("saved", [False, True], ids=["in_code", "saved"])
def test_cogvideox_configs_do_not_clip(saved):
    """CogVideoX's schedulers take clip_sample (default True) and never clip; their configs were read as
    clipping x0 to [-1, 1]: at timestep 900 of 10 steps x0 was off by 61 from CogVideoXDDIM's
    pred_original_sample (2e-5 now)."""
    theirs = diffusers.CogVideoXDDIMScheduler()
    theirs.set_timesteps(10)
    config = {**theirs.config, "_class_name": "CogVideoXDDIMScheduler"} if saved else theirs.config
    g = torch.Generator().manual_seed(0)
    x, f = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = theirs.timesteps[0]
    ref = theirs.step(f.float(), t, x.float()).pred_original_sample.double()
    den = denoiser_from_diffusers(lambda x_, t_: f, config)
    assert theirs.config.clip_sample and float(ref.abs().max()) > 10
    assert float((den(x, float(t)).x0 - ref).abs().max()) < 1e-4
    for cfg in (config, diffusers.CogVideoXDPMScheduler().config):
        assert type(denoiser_from_diffusers(lambda x_, t_: f, cfg)) is sd.Denoiser
        assert type(SteerdiffScheduler.from_config(cfg).denoiser) is sd.Denoiser


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_predictions_match_ddim(unet, prediction_type):
    # DDIM's pred_original_sample at an integer timestep is the config's conversion of the net output
    theirs = diffusers.DDIMScheduler(
        prediction_type=prediction_type, beta_schedule="scaled_linear", clip_sample=False
    )
    theirs.set_timesteps(10)
    den = denoiser_from_diffusers(unet, theirs.config)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = theirs.timesteps[3]
    with torch.no_grad():
        f = unet(x, t).sample
        ref = theirs.step(f, t, x).pred_original_sample
        pred = den(x, float(t))
    assert den.prediction == {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[prediction_type]
    assert rel_rmse(pred.x0, ref) < 1e-5


def test_learned_variance_and_condition_pass_through():
    seen: dict[str, Any] = {}

    def model(x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> tuple[Tensor]:
        seen["t"], seen["labels"] = t, class_labels
        return (torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], 1),)

    den = denoiser_from_diffusers(model, {"variance_type": "learned_range"})
    labels = torch.tensor([1, 2])
    pred = den(torch.ones(2, 3, 4, 4), 500.0, class_labels=labels)
    assert den.learned_variance
    assert torch.equal(seen["labels"], labels) and seen["t"].tolist() == [500.0, 500.0]
    assert torch.equal(pred.var_interp, torch.full((2, 3, 4, 4), 0.75))  # (r + 1) / 2


@pytest.mark.parametrize("saved", [False, True], ids=["in_code", "saved"])
def test_flow_matching_config(unet, saved):
    # FlowMatchEuler: x = (1 - t) x0 + t eps, the net predicts eps - x0 at timestep 1000 t. A config
    # of a scheduler made in code has no _class_name; its keys say flow.
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    config = dict(theirs.config)
    if saved:
        config["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    calls: list[Tensor] = []

    def model(x: Tensor, t: Tensor) -> Tensor:
        calls.append(t)
        return torch.full_like(x, 2.0)

    den = denoiser_from_diffusers(model, config)
    assert isinstance(den.process, sd.RectifiedFlow) and den.prediction == "flow"
    x = torch.ones(1, 3, 2, 2, dtype=torch.float64)
    pred = den(x, 0.25)
    assert calls[0].tolist() == [250.0]
    assert torch.allclose(pred.x0, x - 0.25 * 2.0)  # x0 = x - t v (diffusers' flow convention)

    sched = SteerdiffScheduler.from_config(config, solver="dpmpp_2m", schedule="time_uniform")
    raw, _, _ = _pipeline(unet, sched, STEPS, seed=6)
    ref, _ = _reference(
        denoiser_from_diffusers(unet, config), STEPS, 6, solver="dpmpp_2m", schedule="time_uniform"
    )
    assert sched.timesteps[0] == pytest.approx(999.0)
    assert torch.equal(raw, ref)


@pytest.mark.parametrize("cls", [diffusers.UniPCMultistepScheduler, diffusers.DPMSolverMultistepScheduler])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "flow_prediction"])
def test_flow_sigmas_configs_take_their_prediction_type(cls, prediction_type):
    """With ``use_flow_sigmas=True`` DPMSolver/UniPC convert the net output as ``prediction_type`` says on
    the rectified flow (``epsilon``: ``x0 = (x - sigma eps) / (1 - sigma)``). Every such config was read as
    a velocity: x0 off by 28 (epsilon) and 6.3 (sample) at step 3 of 10 (flow_shift 3), 2e-6 / 8e-8 now."""
    theirs = cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type=prediction_type)
    theirs.set_timesteps(10)
    theirs._step_index = 3
    g = torch.Generator().manual_seed(0)
    x, f = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    ref = theirs.convert_model_output(f.float(), sample=x.float()).double()
    expected = {"epsilon": "eps", "sample": "x0", "flow_prediction": "flow"}[prediction_type]
    for den in (
        denoiser_from_diffusers(lambda x_, t: f, theirs.config),
        SteerdiffScheduler.from_config(theirs.config).denoiser,
    ):
        assert isinstance(den.process, sd.RectifiedFlow) and den.prediction == expected
    pred = denoiser_from_diffusers(lambda x_, t: f, theirs.config)(x, float(theirs.sigmas[3]))
    assert float((pred.x0 - ref).abs().max()) < 1e-5


def test_continuous_timesteps_of_euler_v():
    # EulerDiscrete with timestep_type="continuous" and v-prediction hands the net 0.25 log(sigma)
    theirs = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    theirs.set_timesteps(5)
    den = denoiser_from_diffusers(lambda x, t: x, theirs.config)
    sigma = theirs.sigmas[1].double()
    t = float(den.process.t_of_sigma_ratio(sigma))
    assert float(den.time_map(torch.tensor(t, dtype=torch.float64))) == pytest.approx(
        float(theirs.timesteps[1]), rel=1e-5
    )


# --- EDM-preconditioned configs (EDMEuler, EDMDPMSolverMultistep: Playground v2.5, CosXL) -----------

EDM_PARITY = 1e-5


def _edm_net(x: Tensor, t: Tensor | float) -> Tensor:
    """A deterministic stand-in for an EDM net ``F(c_in x, c_noise)``, depending on both inputs."""
    tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return torch.tanh(1.3 * x) * 0.7 + 0.3 * torch.sin(2 * tt) * x + 0.05 * tt


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_x0_is_edm_eulers_pred_original_sample(prediction_type):
    # diffusers' step: c_skip x + c_out F(c_in x, 0.25 log sigma), c_out negated for v_prediction
    theirs = diffusers.EDMEulerScheduler(prediction_type=prediction_type)
    theirs.set_timesteps(10)
    den = denoiser_from_diffusers(_edm_net, theirs.config)
    assert isinstance(den, sd.denoiser.EDMDenoiser) and den.output == (
        "edm" if prediction_type == "epsilon" else "v"
    )
    assert (den.process.t_min, den.process.t_max, den.sigma_data) == (0.002, 80.0, 0.5)
    flipped = {"epsilon": "v_prediction", "v_prediction": "epsilon"}[prediction_type]
    other = denoiser_from_diffusers(_edm_net, {**theirs.config, "prediction_type": flipped})
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * theirs.init_noise_sigma
    for k in (0, 3, 9):
        t, sigma = theirs.timesteps[k], float(theirs.sigmas[k])
        theirs._step_index = k  # the step at sigmas[k]
        ref = theirs.step(_edm_net(theirs.scale_model_input(x, t), t), t, x).pred_original_sample
        # per-sample times: the same coefficients as tensors
        for time in (sigma, torch.full((SHAPE[0],), sigma, dtype=F64)):
            assert rel_rmse(den(x, time).x0, ref) < 3e-7  # measured 1.4e-8 to 1.4e-7
        assert float(den.net_time(sigma, x)[0]) == float(t)
        if k == 0:  # c_out of the other sign is another x0 (not where c_skip ~ 1)
            assert rel_rmse(other(x, sigma).x0, ref) > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
@pytest.mark.parametrize(
    ("cls", "solver"), [("EDMEulerScheduler", "euler"), ("EDMDPMSolverMultistepScheduler", "dpmpp_2m")]
)
@pytest.mark.parametrize("steps", [8, 20])
def test_edm_schedulers_are_euler_and_dpmpp_2m(cls, solver, sigma_schedule, prediction_type, steps):
    # diffusers' pipeline loop (init_noise_sigma, scale_model_input, net(., timesteps), step) with
    # EDMEuler and EDMDPMSolverMultistep (dpmsolver++, order 2, lower_order_final, final sigma 0); their
    # Karras (rho 7) and exponential sigmas are steerdiff's "karras" and "exponential" schedules
    theirs = getattr(diffusers, cls)(prediction_type=prediction_type, sigma_schedule=sigma_schedule)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref, _ = run_scheduler(theirs, _edm_net, x_T, steps)
    ours = SteerdiffScheduler.from_config(theirs.config, solver=solver, schedule=sigma_schedule)
    raw, nfe = run_scheduler(ours, _edm_net, x_T, steps)
    assert nfe == steps and ours.init_noise_sigma == theirs.init_noise_sigma
    assert float((ours.timesteps - theirs.timesteps).abs().max()) < 4e-7  # float32 rounding of the sigmas
    assert rel_rmse(ours.sigmas, theirs.sigmas) < 3e-7
    assert rel_rmse(raw, ref) < EDM_PARITY  # measured 1.6e-7 to 1.0e-6
    # the pipeline loop is sd.sample from the same x_T, to the bit
    den = denoiser_from_diffusers(_edm_net, theirs.config)
    with torch.no_grad():
        x = sd.sample(den, x_T * ours.init_noise_sigma, steps, solver=solver, schedule=sigma_schedule)
    assert torch.equal(raw, x)


RAMP = [0.0, 0.1, 0.25, 0.45, 0.7, 0.85, 0.95, 1.0]  # uneven positions on an EDM sigma ramp


@pytest.mark.parametrize(
    ("cls", "solver", "sigma_schedule", "ramp"),
    [
        ("EDMEulerScheduler", "euler", "karras", RAMP),
        ("EDMEulerScheduler", "euler", "karras", [0.05, 0.3, 0.6, 0.9]),
        ("EDMEulerScheduler", "euler", "exponential", torch.linspace(0, 1, 8).tolist()),
        # EDMDPMSolverMultistep takes no sigmas: its num_inference_steps=n is the ramp linspace(0, 1, n)
        ("EDMDPMSolverMultistepScheduler", "dpmpp_2m", "karras", torch.linspace(0, 1, 8).tolist()),
        ("EDMDPMSolverMultistepScheduler", "dpmpp_2m", "exponential", torch.linspace(0, 1, 8).tolist()),
    ],
)
def test_custom_sigmas_of_edm_configs_are_positions_on_their_ramp(cls, solver, sigma_schedule, ramp):
    # EDMEulerScheduler.set_timesteps(sigmas=r) reads r as positions on its sigma ramp (Karras' with the
    # config's rho, here 5, or exponential), not as noise levels; ours reads them alike on EDM configs.
    # Before: read as noise levels, so every ramp of two or more positions was refused (increasing, or
    # 0 at the top). Measured: timesteps within 3.6e-7 (EDMDPMSolver's ramp is float32), sigmas 0 to
    # 1.3e-7 relative RMSE, samples 1.8e-7 to 3.8e-7.
    theirs = getattr(diffusers, cls)(sigma_schedule=sigma_schedule, rho=5.0)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    if cls == "EDMEulerScheduler":
        ref, _ = run_scheduler(theirs, _edm_net, x_T, None, sigmas=torch.tensor(ramp, dtype=F64))
    else:
        ref, _ = run_scheduler(theirs, _edm_net, x_T, len(ramp))
    ours = SteerdiffScheduler.from_config(theirs.config, solver=solver)
    raw, nfe = run_scheduler(ours, _edm_net, x_T, None, sigmas=ramp)
    assert nfe == len(ramp) == len(theirs.timesteps)
    assert float((ours.timesteps - theirs.timesteps).abs().max()) < 4e-7  # float32 rounding of the sigmas
    assert rel_rmse(ours.sigmas, theirs.sigmas) < 3e-7
    assert rel_rmse(raw, ref) < EDM_PARITY


def test_custom_sigmas_of_edm_configs_each_a_position_others_refused():
    # diffusers' exponential ramp takes only the positions' number (its linspace); ours reads each one,
    # log-uniform in sigma: s_max (s_min / s_max)^r
    ours = SteerdiffScheduler.from_config(diffusers.EDMEulerScheduler(sigma_schedule="exponential").config)
    ours.set_timesteps(sigmas=RAMP)
    expected = 80.0 * (0.002 / 80.0) ** torch.tensor(RAMP, dtype=F64)
    assert torch.allclose(ours.sigmas[:-1].double(), expected, rtol=3e-7, atol=0)
    assert float(ours.sigmas[-1]) == 0.0
    for sigmas, match in [
        ([80.0, 10.0, 1.0, 0.0], r"positions on its sigma ramp .* finite numbers in \[0, 1\]"),
        ([0.0, 0.5, math.nan], r"finite numbers in \[0, 1\]"),
        ([1.0, 0.5, 0.0], r"must be strictly increasing"),
        ([0.0, 0.5, 0.5], r"must be strictly increasing"),
    ]:
        with pytest.raises(ValueError, match=rf"^set_timesteps: sigmas of an EDM config .*{match}"):
            ours.set_timesteps(sigmas=sigmas)


def _reader_specs() -> dict[str, tuple[dict[str, Any], Any]]:
    """The configs and specs the config reader gives: every diffusers scheduler class's default config it
    takes, and the settings that change the net time (continuous timesteps, flow sigmas, another number of
    steps)."""
    import inspect
    import warnings

    from steerdiff.integrations.diffusers_config import _spec

    configs: dict[str, dict[str, Any]] = {}
    for name in dir(diffusers):
        if not name.endswith("Scheduler"):
            continue
        try:
            cls = getattr(diffusers, name)
            assert inspect.isclass(cls)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                configs[name] = {**cls().config, "_class_name": name}
        except Exception:  # a class whose module needs what is not installed, or that has no config
            continue
    euler = configs["EulerDiscreteScheduler"]
    configs["continuous"] = {**euler, "timestep_type": "continuous", "prediction_type": "v_prediction"}
    configs["flow_sigmas"] = {**configs["DPMSolverMultistepScheduler"], "use_flow_sigmas": True}
    configs["flow_500"] = {**configs["FlowMatchEulerDiscreteScheduler"], "num_train_timesteps": 500}
    specs = {}
    for name, cfg in configs.items():
        try:
            specs[name] = (cfg, _spec(cfg))
        except ValueError:  # a model the reader refuses
            continue
    return specs


def test_every_net_time_the_config_reader_gives_has_its_inverse():
    """Custom timesteps are read by the inverse of the config's net time, which the spec carries beside it
    (was: an identity check on the map, the EDM inverse for any other; a third map would have been read
    as EDM's). forward then inverse is the identity on the process times (rel. 1e-12: EDM, cosine, flow,
    consistency models, ScoreSdeVe;
    abs. 1e-9 steps: the continuous VP map through t_of_lam), inverse then forward on the net times; net
    times outside a map's domain are NaN. VP configs with integer timesteps have none (their timesteps
    are the process times)."""
    owners = set()
    specs = _reader_specs()
    for name, (cfg, spec) in specs.items():
        p, net = spec.process, spec.time_map
        if net is None:
            assert isinstance(p, sd.processes.VPDiscrete), name
            continue
        owners.add(net.owner)
        t = torch.cat(
            [
                torch.linspace(p.t_min, p.t_max, 101, dtype=F64),
                p.t_of_lam(torch.linspace(float(p.lam(p.t_max)), float(p.lam(p.t_min)), 101, dtype=F64)),
            ]
        ).clamp(p.t_min, p.t_max)
        back = net.inverse(net.forward(t))
        if isinstance(p, sd.processes.VPDiscrete):
            torch.testing.assert_close(back, t, rtol=0, atol=1e-9)
        else:
            torch.testing.assert_close(back, t, rtol=1e-12, atol=0)
        c = net.forward(t)
        torch.testing.assert_close(net.forward(net.inverse(c)), c, rtol=1e-12, atol=1e-12)
        den = denoiser_from_diffusers(lambda x, t: x, cfg)
        torch.testing.assert_close(den.time_map(t), c, rtol=0, atol=0)  # the denoiser's is the forward map
    assert owners == {
        "an EDM config",
        "a CosineDPMSolverMultistep config",
        "a flow-matching config",
        "a continuous-timestep VP config",
        "a consistency model's config",
        "a ScoreSdeVe config",
    }
    edm, cosine, flow = (
        specs[k][1].time_map for k in ("EDMEulerScheduler", "CosineDPMSolverMultistepScheduler", "flow_500")
    )
    assert flow.inverse(torch.tensor([-1.0, 0.0, 250.0], dtype=F64)).isnan().tolist() == [True, False, False]
    assert float(flow.inverse(torch.tensor(250.0, dtype=F64))) == 0.5
    assert cosine.inverse(torch.tensor([-0.1, 0.0, 0.5, 1.0], dtype=F64)).isnan().tolist() == [
        True,
        False,
        False,
        True,
    ]
    assert (
        float(edm.inverse(torch.tensor(200.0, dtype=F64))) == math.inf
    )  # clipped to sigma_max by the reader
    cm, ve = (specs[k][1].time_map for k in ("CMStochasticIterativeScheduler", "ScoreSdeVeScheduler"))
    # below sigma_min = 0.002 (250 log 0.002 = -1553.7) no consistency-model time; VE's net time is sigma > 0
    assert cm.inverse(torch.tensor([-1560.0, 250 * math.log(0.002), 0.0], dtype=F64)).isnan().tolist() == [
        True,
        False,
        False,
    ]
    assert ve.inverse(torch.tensor([-1.0, 0.0, 1.0], dtype=F64)).isnan().tolist() == [True, True, False]


def test_custom_timesteps_of_edm_configs_are_the_nets_times():
    # EDM's net time is c_noise = log(sigma) / 4, negative below sigma 1. Before, custom timesteps were read
    # as sigmas (EDMEuler's first three, [1.0955, 0.7987, 0.4411], came back as [0.0228, -0.0562, -0.2046])
    # and a grid reaching below sigma 1 was refused; with sigmas, the given timesteps were ignored (the
    # EDM denoiser dropped the nodes' time map). Measured: EDMEuler's run to 1.7e-7.
    theirs = diffusers.EDMEulerScheduler()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref, _ = run_scheduler(theirs, _edm_net, x_T, 8)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="euler")
    raw, _ = run_scheduler(ours, _edm_net, x_T, None, timesteps=theirs.timesteps.tolist())
    assert float((ours.timesteps - theirs.timesteps).abs().max()) < 4e-7
    assert rel_rmse(ours.sigmas, theirs.sigmas) < 3e-7
    assert rel_rmse(raw, ref) < EDM_PARITY
    ours.set_timesteps(sigmas=[0.0, 0.5, 0.9])
    sigmas = ours.sigmas
    ours.set_timesteps(timesteps=[1.0, 0.5, -0.2], sigmas=[0.0, 0.5, 0.9])
    assert ours.timesteps.tolist() == torch.tensor([1.0, 0.5, -0.2]).tolist()  # as given, on the ramp's nodes
    assert torch.equal(ours.sigmas, sigmas)
    with pytest.raises(ValueError, match=r"^set_timesteps: timesteps must be finite numbers, got"):
        ours.set_timesteps(timesteps=[1.0, -math.inf])


def test_custom_timesteps_of_edm_configs_beyond_the_range_are_clipped():
    # as every config's custom grid: nodes beyond the model's range are clipped to it. Before, a net time
    # above 177 (exp(4 c) overflowed to inf) was refused as "must be finite numbers" though it was finite
    ours = SteerdiffScheduler.from_config(diffusers.EDMEulerScheduler().config, solver="euler")
    ours.set_timesteps(timesteps=[200.0, 0.5, 0.0])
    assert ours.sigmas.tolist() == torch.tensor([80.0, math.exp(2.0), 1.0, 0.0]).tolist()
    with pytest.raises(ValueError, match=r"^set_timesteps: timesteps must be strictly decreasing .*clipping"):
        ours.set_timesteps(timesteps=[300.0, 200.0, 0.0])


def _saved_and_made_in_code(theirs: Any, **options: Any) -> list[SteerdiffScheduler]:
    """``SteerdiffScheduler.from_config`` of ``theirs``'s config as made in code (no ``_class_name``) and as
    saved (with it), each then rebuilt from its own config (as save / load does), with ``theirs``'s
    ``init_noise_sigma``."""
    saved = {**theirs.config, "_class_name": type(theirs).__name__}
    out = []
    for config in (theirs.config, saved):
        again = SteerdiffScheduler.from_config(SteerdiffScheduler.from_config(config, **options).config)
        assert again.init_noise_sigma == theirs.init_noise_sigma
        out.append(again)
    return out


def test_edm_configs_saved_and_made_in_code_are_one_model():
    # saved: _class_name; made in code: told apart by sigma_data and sigma_schedule (Cosine's keys aside);
    # SteerdiffScheduler's own config keeps the model (from_config of it, as save/load does)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    theirs = diffusers.EDMDPMSolverMultistepScheduler(
        sigma_max=40.0, sigma_data=1.0, prediction_type="v_prediction"
    )
    ref, _ = run_scheduler(theirs, _edm_net, x_T, 6)
    outs = []
    for again in _saved_and_made_in_code(theirs, solver="dpmpp_2m", schedule="karras"):
        den = again.denoiser
        assert isinstance(den, sd.denoiser.EDMDenoiser)
        assert (den.process.t_max, den.sigma_data, den.output) == (40.0, 1.0, "v")
        outs.append(run_scheduler(again, _edm_net, x_T, 6)[0])
    assert torch.equal(outs[0], outs[1])
    assert rel_rmse(outs[0], ref) < EDM_PARITY


def test_edm_thresholding_matches_edm_dpm_solver():
    theirs = diffusers.EDMDPMSolverMultistepScheduler(
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5
    )
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref, _ = run_scheduler(theirs, _edm_net, x_T, 8)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="dpmpp_2m", schedule="karras")
    raw, _ = run_scheduler(ours, _edm_net, x_T, 8)
    unthresholded, _ = run_scheduler(diffusers.EDMDPMSolverMultistepScheduler(), _edm_net, x_T, 8)
    assert rel_rmse(unthresholded, ref) > 0.1
    assert rel_rmse(raw, ref) < EDM_PARITY  # measured 2.4e-7


def test_scale_model_input_of_edm_configs_needs_a_run():
    ours = SteerdiffScheduler.from_config(diffusers.EDMEulerScheduler().config)
    x = torch.ones(SHAPE)
    with pytest.raises(ValueError, match=r"^scale_model_input: call set_timesteps first$"):
        ours.scale_model_input(x, 0.5)
    vp = SteerdiffScheduler.from_config(diffusers.DDPMScheduler().config)
    assert vp.scale_model_input(x, 3) is x and vp.init_noise_sigma == 1.0


def test_timestep_errors_name_the_call_they_come_from():
    """scale_model_input before the first step and alphas_cumprod[...] read the pipeline's timestep as step
    does; a bad one was reported as ``step: ...``, a call the pipeline had not made yet."""
    ours = SteerdiffScheduler.from_config(diffusers.EDMEulerScheduler().config)
    ours.set_timesteps(4)
    x = torch.ones(SHAPE)
    not_one = "timestep must be a number or a one-element tensor"
    not_entry = r"timestep=123 is not an entry of scheduler\.timesteps"
    with pytest.raises(ValueError, match=rf"^scale_model_input: {not_one}"):
        ours.scale_model_input(x)
    with pytest.raises(ValueError, match=rf"^scale_model_input: {not_entry}"):
        ours.scale_model_input(x, 123.0)
    with pytest.raises(ValueError, match=rf"^alphas_cumprod: {not_one}"):
        ours.alphas_cumprod[ours.timesteps[:2]]
    with pytest.raises(ValueError, match=rf"^step: {not_entry}"):
        ours.step(x, 123.0, x)
    c_in = 1 / math.sqrt(80.0**2 + 0.5**2)  # at sigma_max, EDMEulerScheduler's default sigma_data 0.5
    assert torch.allclose(ours.scale_model_input(x, ours.timesteps[0]), c_in * x, rtol=1e-6, atol=0)


# --- CosineDPMSolverMultistep (Stable Audio Open): EDM preconditioning, net time 2 atan(sigma) / pi -----

COSINE_PARITY = 5e-6  # float32 on diffusers' side: measured 9.3e-7 at most (net inputs)
COSINE_SHAPE = (4, 8)


@pytest.fixture(scope="module")
def cosine_oracle() -> tuple[sd.toy.GaussianMixture, Callable[[Tensor, Tensor], Tensor]]:
    """A mixture (dim 8, std 0.5, sigma_data 1 as Stable Audio's) and its exact denoiser as a v-prediction
    net under the cosine preconditioning: ``F = (c_skip x - D(x; sigma)) / (sigma s_d / sqrt(sigma^2 +
    s_d^2))``, read from what the net is given alone (``c_in x`` and ``c = 2 atan(sigma) / pi``: ``sigma =
    tan(pi c / 2)``), in float64."""
    g = torch.Generator().manual_seed(0)
    gmm = sd.toy.GaussianMixture(
        torch.randn(3, 8, generator=g, dtype=F64), torch.full((3, 8), 0.25, dtype=F64), [1.0, 2.0, 1.0]
    )

    def net(x_in: Tensor, c_noise: Tensor) -> Tensor:
        sigma = float(torch.tan(torch.as_tensor(c_noise, dtype=F64).reshape(-1)[0] * (math.pi / 2)))
        n = sigma**2 + 1.0
        x = x_in.double() * math.sqrt(n)
        return ((x / n - gmm.denoise(x, 1.0, sigma)) / (sigma / math.sqrt(n))).to(x_in.dtype)

    return gmm, net


def _cosine_run(
    monkeypatch: pytest.MonkeyPatch,
    net: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    callback: Callable[[int, Tensor], None] | None = None,
    **cfg: Any,
) -> tuple[Any, Tensor, Tensor, list[Tensor]]:
    """CosineDPMSolverMultistep (always SDE-DPM-Solver++(2M), midpoint, with Brownian-tree noise) in
    diffusers' pipeline loop, its noise sampler replaced by seeded standard normal draws (recorded):
    ``(scheduler, x_T, x0, draws)``; ``callback(i, x)`` after each step."""
    theirs = diffusers.CosineDPMSolverMultistepScheduler(**cfg)
    draws: list[Tensor] = []
    gen = torch.Generator().manual_seed(3)

    def sampler(sigma: Tensor, sigma_to: Tensor) -> Tensor:
        draws.append(torch.randn(COSINE_SHAPE, generator=gen))
        return draws[-1]

    set_timesteps = theirs.set_timesteps

    def planned(*args: Any, **kw: Any) -> None:
        set_timesteps(*args, **kw)
        theirs.noise_sampler = sampler  # set_timesteps drops it; step makes a Brownian tree where unset

    monkeypatch.setattr(theirs, "set_timesteps", planned)
    x_T = torch.randn(COSINE_SHAPE, generator=torch.Generator().manual_seed(5))
    ref, _ = run_scheduler(theirs, net, x_T, steps, callback=callback)
    return theirs, x_T, ref, draws


def test_cosine_x0_is_the_exact_denoiser_and_diffusers_preconditioning(cosine_oracle):
    # the v-net of the exact denoiser through denoiser_from_diffusers gives the exact x0 back (so c_in,
    # c_skip, c_out and the net time are the model's); CosineDPMSolverMultistep's own precondition_inputs,
    # precondition_noise and precondition_outputs give the same x0. EDM's time input (log(sigma) / 4) on the
    # same net is another model. Before: refused ("an EDM-preconditioned model with a cosine-schedule time
    # input"). Measured: 6.5e-16 to the exact x0, 7.5e-8 to diffusers' (float32).
    gmm, net = cosine_oracle
    theirs = diffusers.CosineDPMSolverMultistepScheduler()
    den = denoiser_from_diffusers(net, theirs.config)
    assert isinstance(den, sd.denoiser.EDMDenoiser) and den.output == "v"
    assert (den.process.t_min, den.process.t_max, den.sigma_data) == (0.3, 500.0, 1.0)
    edm_time = sd.denoiser.EDMDenoiser(net, den.process, sigma_data=1.0, output="v")
    x = 3.0 * torch.randn(COSINE_SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64)
    for sigma in (500.0, 20.0, 2.5, 0.3):
        exact = gmm.denoise(x, 1.0, sigma)
        assert rel_rmse(den(x, sigma).x0, exact) < 1e-13
        xf, s = x.float(), torch.tensor(sigma)
        f = net(theirs.precondition_inputs(xf, s), theirs.precondition_noise(s))
        assert rel_rmse(theirs.precondition_outputs(xf, f, s), exact) < 3e-7
        c = float(den.net_time(sigma, x)[0])
        assert c == pytest.approx(float(theirs.precondition_noise(s)), abs=6e-8) and 0 < c < 1
        assert rel_rmse(edm_time(x, sigma).x0, exact) > 0.05  # measured 0.11 (sigma 20) to 2.0


def _recording(
    net: Callable[[Tensor, Tensor], Tensor], seen: list[Tensor]
) -> Callable[[Tensor, Tensor], Tensor]:
    """``net`` that keeps every input it gets (the pipeline's ``scale_model_input``)."""

    def recorded(x: Tensor, t: Tensor) -> Tensor:
        seen.append(x)
        return net(x, t)

    return recorded


@pytest.mark.parametrize("sigma_schedule", ["exponential", "karras"])
@pytest.mark.parametrize("steps", [8, 20])
def test_cosine_dpm_solver_is_dpmpp_2m_sde(monkeypatch, cosine_oracle, sigma_schedule, steps):
    # CosineDPMSolverMultistep has no ODE mode: every step is SDE-DPM-Solver++(2M) (midpoint, eta 1), first
    # order at the first and last steps, into sigma 0, with noise from a Brownian tree on [sigma_min,
    # sigma_max]. Same draws (diffusers draws one into sigma 0 too, multiplied by 0): steerdiff's
    # dpmpp_2m_sde on the config's sigma_schedule, through our scheduler in the same loop, from
    # Stable Audio's config (the class's defaults). Timesteps 2 atan(sigma) / pi, init_noise_sigma
    # sqrt(sigma_max^2 + 1) and scale_model_input c_in x as diffusers'. Before: the config was refused.
    # Measured: samples 8.6e-8 to 6.1e-7, net inputs 9.3e-7 at most, timesteps within 2.4e-7, sigmas
    # 1.2e-7 to 3.2e-7 relative RMSE (Karras' float32 sigmas the larger).
    _, net = cosine_oracle
    theirs_in: list[Tensor] = []
    ours_in: list[Tensor] = []
    theirs, x_T, ref, draws = _cosine_run(
        monkeypatch, _recording(net, theirs_in), steps, sigma_schedule=sigma_schedule
    )
    noise = Replay(draws[:-1])
    ours = SteerdiffScheduler.from_config(
        theirs.config, solver="dpmpp_2m_sde", schedule=sigma_schedule, noise=noise
    )
    raw, nfe = run_scheduler(ours, _recording(net, ours_in), x_T, steps)
    assert nfe == steps and noise.calls == len(draws) - 1 == steps - 1
    assert ours.init_noise_sigma == theirs.init_noise_sigma == math.sqrt(500.0**2 + 1)
    assert float((ours.timesteps - theirs.timesteps).abs().max()) < 4e-7  # float32 sigmas and atan
    assert rel_rmse(ours.sigmas, theirs.sigmas) < 5e-7  # float32 Karras sigmas: 3.2e-7
    assert max(rel_rmse(u, v) for u, v in zip(ours_in, theirs_in, strict=True)) < COSINE_PARITY
    assert rel_rmse(raw, ref) < COSINE_PARITY
    # the pipeline loop is sd.sample from the same x_T and draws, to the bit
    with torch.no_grad():
        x0 = sd.sample(
            denoiser_from_diffusers(net, theirs.config),
            x_T * theirs.init_noise_sigma,
            steps,
            solver="dpmpp_2m_sde",
            schedule=sigma_schedule,
            generator=Replay(draws[:-1]),
        )
    assert torch.equal(raw, x0)


@pytest.mark.parametrize("sigma_schedule", ["exponential", "karras"])
@pytest.mark.parametrize("steps", [8, 20])
def test_cosine_final_sigma_min_ends_at_sigma_min(monkeypatch, cosine_oracle, sigma_schedule, steps):
    # final_sigmas_type="sigma_min": diffusers' run ends with the sample at sigma_min, not the denoised
    # estimate: its N nodes end at sigma_min, then a step to sigma_min again (float32: 1-2 ulp above the
    # ramp's last sigma; the exponential ramp's sample moves by 1.2e-7 there, the karras one's, h = -7e-7,
    # by NaN: the SDE noise's sqrt(1 - e^{-2h}) of a step up). Before, the key was ignored: our run returned
    # the estimate at sigma 0 (relative RMSE from diffusers' sample at sigma_min 0.11 / 0.12, exponential /
    # karras, 8 steps). Now from_config gives final="none" (unless final is passed): our N - 1 steps on the
    # same N nodes are diffusers' run up to sigma_min, to float32 (measured 9.4e-8 to 7.7e-7), with
    # lower_order_final=False: diffusers counts its extra step as the last, so that its real last step is
    # second order below 15 steps.
    _, net = cosine_oracle
    states: list[Tensor] = []
    theirs, x_T, _, draws = _cosine_run(
        monkeypatch,
        net,
        steps,
        sigma_schedule=sigma_schedule,
        final_sigmas_type="sigma_min",
        callback=lambda i, x: states.append(x),
    )
    assert theirs.sigmas[-2:].tolist() == pytest.approx([0.3, 0.3], rel=1e-6)
    solver = sd.solvers.DPMSolverSDEMultistep(order=2, lower_order_final=False)
    ours = SteerdiffScheduler.from_config(theirs.config, solver=solver, schedule=sigma_schedule)
    assert ours.config["final"] == "none"
    assert SteerdiffScheduler.from_config(theirs.config, final="zero").config["final"] == "zero"
    ours.noise = Replay(draws[: steps - 1])
    raw, nfe = run_scheduler(ours, net, x_T, steps - 1)
    assert nfe == steps - 1
    assert rel_rmse(ours.sigmas, theirs.sigmas[:-1]) < 5e-7  # the same N nodes, the last at sigma_min
    assert rel_rmse(raw, states[-2]) < COSINE_PARITY


def test_vp_final_sigma_min_keeps_the_step_to_timestep_0(gmm, x_T):
    # A VP config's diffusers schedulers (DPMSolver's, UniPC's, Euler's) end a final_sigmas_type="sigma_min"
    # run with a step to sigma(timestep 0) = 0.0292 (SD's betas), a node that is not among its timesteps:
    # custom timesteps [999, 750, 500, 250, 100] are 5 steps, the last from timestep 100 (sigma 0.344).
    # final="none" (what from_config gave such configs) dropped that step: 4 steps, a run ending at sigma
    # 0.344, 0.092 relative RMSE from diffusers' sample. The key gives final="none" for EDM configs only,
    # whose ramps end at sigma_min (test_cosine_final_sigma_min_ends_at_sigma_min); here final stays
    # "zero": the same 5 steps, into the clean end instead of diffusers' sample at 0.0292 (measured 0.0097).
    config = diffusers.DPMSolverMultistepScheduler(**sd_betas_config(), final_sigmas_type="sigma_min").config
    net = eps_net(gmm, process_from_config(config))
    grid = {"timesteps": [999, 750, 500, 250, 100]}
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config)
    ref, nfe = run_scheduler(theirs, net, x_T, None, **grid)
    assert theirs.sigmas[-2:].tolist() == pytest.approx([0.3439, 0.0292], abs=1e-4) and nfe == 5
    ours = SteerdiffScheduler.from_config(config, solver="dpmpp_2m")
    x, our_nfe = run_scheduler(ours, net, x_T, None, **grid)
    assert ours.config["final"] == "zero" and our_nfe == 5
    assert rel_rmse(x, ref) < 0.02


def test_cosine_configs_saved_and_made_in_code_are_one_model(monkeypatch, cosine_oracle):
    # made in code (no _class_name) it is told apart from EDMEuler/EDMDPMSolver's by its keys (solver_order,
    # no algorithm_type); SteerdiffScheduler's own config keeps the model (from_config of it, as save/load
    # does): here sigma_max 80 and prediction_type "epsilon" (c_out's sign). Custom timesteps are the net's
    # times 2 atan(sigma) / pi, in [0, 1): diffusers' own give its run. Measured: 2.1e-7; on its timesteps
    # 3.2e-7 (sigmas 7.8e-6).
    _, net = cosine_oracle
    theirs, x_T, ref, draws = _cosine_run(monkeypatch, net, 6, sigma_max=80.0, prediction_type="epsilon")
    outs = []
    for again in _saved_and_made_in_code(theirs, solver="dpmpp_2m_sde", schedule="exponential"):
        den = again.denoiser
        assert isinstance(den, sd.denoiser.EDMDenoiser) and den.output == "edm"
        assert (den.process.t_min, den.process.t_max, den.sigma_data) == (0.3, 80.0, 1.0)
        again.noise = Replay(draws[:-1])
        outs.append(run_scheduler(again, net, x_T, 6)[0])
    assert torch.equal(outs[0], outs[1])
    assert rel_rmse(outs[0], ref) < COSINE_PARITY
    again.noise = Replay(draws[:-1])
    raw, _ = run_scheduler(again, net, x_T, None, timesteps=theirs.timesteps.tolist())
    # float32 timesteps near 1 hold sigma to about (pi / 2) sigma^2 6e-8: 79.9993 for sigma_max 80
    assert rel_rmse(again.sigmas, theirs.sigmas) < 2e-5
    assert rel_rmse(raw, ref) < COSINE_PARITY
    for timesteps in ([0.9, 0.5, 1.0], [0.9, -0.1], [1.5, 0.5]):
        with pytest.raises(
            ValueError, match=r"^set_timesteps: timesteps of a CosineDPMSolverMultistep config .* got"
        ):
            again.set_timesteps(timesteps=timesteps)


BAD: list[tuple[Callable[[], Any], str]] = [
    (lambda: {"beta_schedule": "cubic"}, "beta_schedule='cubic'"),
    (lambda: {"prediction_type": "score"}, "prediction_type='score'"),
    (lambda: {"variance_type": "learned"}, r"^variance_type='learned' \(extra output channels that"),
    # CosineDPMSolverMultistep takes prediction_type="sample" and fails on it at its first step
    (
        lambda: diffusers.CosineDPMSolverMultistepScheduler(prediction_type="sample").config,
        r"^prediction_type='sample' of an EDM config is not supported",
    ),
    (
        lambda: diffusers.EDMDPMSolverMultistepScheduler(prediction_type="sample").config,
        r"^prediction_type='sample' of an EDM config is not supported; accepted: "
        r"\['epsilon', 'v_prediction'\]$",
    ),
    (
        lambda: {**diffusers.EDMEulerScheduler().config, "precondition_type": "cm_edm"},
        "precondition_type='cm_edm'",
    ),
    (lambda: {**diffusers.EDMEulerScheduler().config, "sigma_data": -1.0}, "sigma_data must be"),
    # made in code, LCM's and TCD's configs are the same (with and without LCM's boundary condition)
    (lambda: diffusers.LCMScheduler().config, r"has timestep_scaling: .* give its _class_name"),
    (
        lambda: {**diffusers.LCMScheduler().config, "_class_name": "OtherScheduler"},
        r"OtherScheduler \(a consistency-distilled model\) is not supported",
    ),
    (
        lambda: {"_class_name": "KarrasVeScheduler", "sigma_min": 0.02, "sigma_max": 100.0, "s_churn": 80.0},
        r"KarrasVeScheduler \(a variance-exploding model\) is not supported",
    ),
    # made in code (no _class_name): read as flow matching before, sampled as an ODE
    (lambda: diffusers.FlowMatchLCMScheduler().config, "consistency-distilled"),
    (lambda: diffusers.HeliosScheduler().config, "multi-stage"),
    (lambda: {**diffusers.HeliosDMDScheduler().config, "_class_name": "HeliosDMDScheduler"}, "HeliosDMD"),
    (lambda: {**diffusers.FlowMatchEulerDiscreteScheduler().config, "invert_sigmas": True}, "invert_sigmas"),
    # diffusers' x0 = (1 - sigma) x - sigma v on flow sigmas is the x0 of no model; was read as a velocity
    (
        lambda: (
            diffusers.UniPCMultistepScheduler(prediction_type="v_prediction", use_flow_sigmas=True).config
        ),
        r"^prediction_type='v_prediction' with use_flow_sigmas=True is not supported; accepted: "
        r"\['epsilon', 'flow_prediction', 'sample'\]$",
    ),
    # no beta_schedule, no flow keys: read as DDPM's linear betas before (a flow model as a VP one)
    (lambda: diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0).config, "'shift'"),
    (
        lambda: {"_class_name": "FlowMapEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0},
        "FlowMapEulerDiscreteScheduler",
    ),
    # values the config reader took with int() / float() (2.5 truncated, None a TypeError, -1 a RuntimeError)
    *(
        (lambda v=v: {"beta_schedule": "linear", "num_train_timesteps": v}, "num_train_timesteps must be")
        for v in (2.5, None, -1, "1000")
    ),
    *(
        (
            lambda v=v: {**diffusers.FlowMatchEulerDiscreteScheduler().config, "num_train_timesteps": v},
            "num_train_timesteps must be",
        )
        for v in (2.5, 1)
    ),
    (lambda: {"beta_schedule": "linear", "beta_start": "x"}, "beta_start must be"),
    (lambda: {"beta_schedule": "scaled_linear", "beta_end": 2.0}, "beta_end must be"),
    (lambda: {"beta_schedule": "linear", "snr_shift_scale": -1.0}, "snr_shift_scale must be"),
    (lambda: {"beta_schedule": "linear", "timestep_type": "Continuous"}, "timestep_type must be one of"),
    (lambda: {"beta_schedule": "linear", "prediction_type": ["epsilon"]}, "prediction_type="),
    # trained_betas of another length than num_train_timesteps were taken as they were (a 100-step process
    # under a config of 1000, where diffusers fails at its first step), a 2-d array flattened, and values
    # out of (0, 1) refused with a message about alphas_cumprod, which the config does not hold
    *(
        (lambda v=v: {"trained_betas": v, "num_train_timesteps": 4}, r"^scheduler config: trained_betas must")
        for v in (
            [0.1] * 3,
            [[0.1, 0.2], [0.3, 0.4]],
            [0.1, 1.5, 0.2, 0.3],
            [0.1, math.nan, 0.2, 0.3],
            [0.0] * 4,
        )
    ),
]


@pytest.mark.parametrize(("config", "match"), BAD)
def test_bad_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        denoiser_from_diffusers(lambda x, t: x, config())
    with pytest.raises(ValueError, match=match):
        SteerdiffScheduler.from_config(config())
    with pytest.raises(ValueError, match="scheduler_or_config"):
        denoiser_from_diffusers(lambda x, t: x, "DDPMScheduler")


def test_an_unknown_class_is_not_told_to_give_its_class_name():
    """A config with a class name was refused with the advice for configs made in code without one
    ("a flow-matching config made in code without use_dynamic_shifting: give its _class_name")."""
    supported = _SUPPORTED
    head = "the scheduler config of {} has no beta_schedule or trained_betas, is no flow-matching config and "
    cases = [
        (
            {
                **diffusers.LTXEulerAncestralRFScheduler().config,
                "_class_name": "LTXEulerAncestralRFScheduler",
            },
            head.format("LTXEulerAncestralRFScheduler")
            + f"has the key 'eta': it describes a model that is not supported; supported: {supported}",
        ),
        (
            diffusers.FlowMatchHeunDiscreteScheduler().config,
            head.format("this scheduler") + "has the key 'shift': it describes a model that is not supported "
            f"(a FlowMatchHeun config made in code: give its _class_name); supported: {supported}",
        ),
    ]
    for config, message in cases:
        with pytest.raises(ValueError) as e:
            denoiser_from_diffusers(lambda x, t: x, config)
        assert str(e.value) == message


@pytest.mark.parametrize("steps", [0, -3, 2.5, "10", True])
def test_a_bad_num_inference_steps_is_named_as_diffusers_names_it(steps):
    """It was named ``make_grid: steps``, the internal argument; diffusers' name is num_inference_steps."""
    sched = SteerdiffScheduler(solver="ddim", schedule="karras")
    with pytest.raises(ValueError, match=r"^set_timesteps: num_inference_steps must be an integer >= 1, got"):
        sched.set_timesteps(steps)


def test_step_add_noise_and_set_begin_index_name_a_bad_argument():
    """A list model_output / sample was an AttributeError in step, a string return_dict silently true, a
    bad generator unnamed; add_noise's list samples, None noise and None / str timesteps were
    AttributeError, TypeError or RuntimeError; set_begin_index('a') was int()'s ValueError and -1 was
    accepted (refused only at the first step, as 'cannot begin at timesteps[-1]'): each a ValueError
    naming the method and the argument."""
    sched = SteerdiffScheduler(solver="ddpm", schedule="karras")
    sched.set_timesteps(3)
    x = torch.zeros(1, 3, 4, 4)
    t = sched.timesteps[0]
    begin = "set_begin_index: begin_index must be an integer in [0, 3],"
    cases = [
        (lambda: sched.step([0.0], t, x), "step: model_output must be a tensor, got list"),
        (lambda: sched.step(x, t, x.numpy()), "step: sample must be a tensor, got ndarray"),
        (lambda: sched.step(x, t, x, return_dict="no"), "step: return_dict must be True or False, got 'no'"),
        (lambda: sched.step(x, t, x, generator=5), "step: generator must be None, a torch.Generator"),
        (lambda: sched.add_noise([0.0], x, t.reshape(1)), "add_noise: original_samples must be a tensor"),
        (lambda: sched.add_noise(x, None, t.reshape(1)), "add_noise: noise must be a tensor, got NoneType"),
        (lambda: sched.add_noise(x, x, None), "add_noise: timesteps must be a tensor or array of numbers"),
        (lambda: sched.add_noise(x, x, "a"), "add_noise: timesteps must be a tensor or array of numbers"),
        (lambda: sched.set_begin_index("a"), f"{begin} got 'a'"),
        (lambda: sched.set_begin_index(-1), f"{begin} got -1"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(message), str(e.value)
    out = sched.step(torch.zeros_like(x), t, x, return_dict=False)  # the checks leave a run as it was
    assert isinstance(out, tuple) and out[0].shape == x.shape


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("timestep_spacing", "trailing", "schedule='leading', 'trailing' or 'linspace'"),
        ("use_karras_sigmas", True, "schedule='karras'"),
        ("use_exponential_sigmas", True, "schedule='exponential'"),
        ("use_beta_sigmas", True, "schedule=steerdiff.schedules.Beta()"),
        ("use_lu_lambdas", True, "schedule='logsnr_uniform'"),
        ("solver_order", 3, "solver="),
        ("algorithm_type", "sde-dpmsolver++", "solver="),
    ],
)
def test_a_grid_or_solver_setting_passed_to_from_config_is_refused_not_ignored(key, value, hint):
    """``from_config(config, timestep_spacing="trailing")`` (or ``use_karras_sigmas=True``,
    ``solver_order=3``, ...) was kept in the config and ignored: the run took the default grid and
    solver, with no word. Passed explicitly they are a ValueError naming the option and what to pass
    instead; in the config itself (every diffusers config has timestep_spacing) they are kept and
    ignored, as before."""
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(sd_betas_config())
    with pytest.raises(
        ValueError, match=rf"^from_config: {re.escape(f'{key}={value!r}')} .*; pass {re.escape(hint)}"
    ):
        SteerdiffScheduler.from_config(theirs.config, **{key: value})
    ours = SteerdiffScheduler.from_config({**theirs.config, key: value})
    ours.set_timesteps(10)
    plain = SteerdiffScheduler.from_config(theirs.config)
    plain.set_timesteps(10)
    assert torch.equal(ours.timesteps, plain.timesteps)


def test_a_step_refused_for_its_timestep_leaves_the_run_as_it_was():
    """The timestep was checked after the run had taken the call's sample: after set_begin_index(2), a
    first step with timesteps[0] was refused with the run begun at step 2 from that call's sample, and a
    retry with the due timestep and the pipeline's sample ran from the refused one (silently another
    result); mid-run, a refused call's edits to the sample were kept. Now the run is as it was."""
    sched = SteerdiffScheduler.from_config(sd_betas_config(), solver="ddim")
    g = torch.Generator().manual_seed(0)
    x, y, out, edited = (torch.randn(2, 4, generator=g) for _ in range(4))
    sched.set_timesteps(5)
    sched.set_begin_index(2)
    first = sched.step(out, sched.timesteps[2], y).prev_sample
    ref = sched.step(out, sched.timesteps[3], first).prev_sample
    sched.set_timesteps(5)
    sched.set_begin_index(2)
    with pytest.raises(ValueError, match=r"^step: timestep=999 where scheduler.timesteps\[2\]"):
        sched.step(out, sched.timesteps[0], x)
    assert sched.step_index is None
    prev = sched.step(out, sched.timesteps[2], y).prev_sample
    assert torch.equal(prev, first)
    with pytest.raises(ValueError, match=r"^step: timestep=999 where scheduler.timesteps\[3\]"):
        sched.step(out, sched.timesteps[0], edited)
    assert sched.step_index == 3
    assert torch.equal(sched.step(out, sched.timesteps[3], prev).prev_sample, ref)


def _unmovable_device() -> str | None:
    """A device torch takes by name and cannot put a tensor on here (``None``: it can on each tried)."""
    for device in ("mps", "xpu", "cuda:64"):
        try:
            torch.zeros(1, device=device)
        except (RuntimeError, AssertionError):  # not built with it / no such device
            return device
    return None


def test_a_failed_set_timesteps_leaves_the_scheduler_as_it_was():
    """set_timesteps changed the scheduler and then raised: a schedule refusing the step count left the
    run's denoiser replaced (a timesteps-with-sigmas run's net-time map lost), a device the tensors could
    not move to left the new run with the old timesteps (the next steps refused, or another run), a config
    patched to a solver it could not build was marked as read (the next call ran the old solver under it).
    Now every attribute is the object it was, and the run set up before steps as if no call had failed
    (ddpm's noise from the pipeline's generator included), before its first step and mid-run."""
    config = diffusers.DDPMScheduler(**sd_betas_config(clip_sample=False)).config
    net = _mixture_net(config)
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    grid = {"timesteps": [999, 700, 400, 200, 50], "sigmas": [14.6, 3.0, 1.0, 0.4, 0.1]}

    def run(sched: SteerdiffScheduler, fail: Callable[[], None]) -> Tensor:
        sched.set_timesteps(**grid)
        fail()
        x, g = x_T, torch.Generator().manual_seed(1)
        for k, t in enumerate(sched.timesteps):
            x = sched.step(net(x, t), t, x, generator=g).prev_sample
            if k == 1:
                fail()
        return x

    def failures(sched: SteerdiffScheduler) -> Callable[[], None]:
        calls: list[tuple[dict[str, Any], str]] = [
            ({"num_inference_steps": 2000}, "at most steps=1000 .*; got steps=2000"),  # leading refuses it
            ({"num_inference_steps": 4, "strength": 1.5}, "strength"),
            ({"num_inference_steps": 4, "original_inference_steps": 10}, "options of the lcm schedule"),
            ({"timesteps": [999, 500], "sigmas": [1.0, 0.5, 0.2]}, "same length"),
        ]
        device = _unmovable_device()
        if device is not None:
            calls.append(({"num_inference_steps": 4, "device": device}, ""))

        def fail() -> None:
            before = dict(vars(sched))
            for kw, match in calls:
                with pytest.raises((ValueError, RuntimeError, AssertionError), match=match or None):
                    sched.set_timesteps(**kw)
                assert vars(sched).keys() == before.keys()
                assert all(vars(sched)[k] is v for k, v in before.items()), kw
            config = sched._internal_dict
            sched._internal_dict = FrozenDict({**config, "solver": "no_such_solver"})
            for _ in range(2):  # refused at every call, not once
                with pytest.raises(ValueError, match="no_such_solver"):
                    sched.set_timesteps(4)
            sched._internal_dict = config
            assert all(vars(sched)[k] is v for k, v in before.items())

        return fail

    ref = run(SteerdiffScheduler.from_config(config, solver="ddpm", schedule="leading"), lambda: None)
    sched = SteerdiffScheduler.from_config(config, solver="ddpm", schedule="leading")
    assert torch.equal(run(sched, failures(sched)), ref)


def test_a_model_output_of_another_shape_or_an_integer_dtype_is_named():
    """A model_output of another shape than sample was refused as 'Denoiser: net returned shape ...' (the
    scheduler's inner net, not the argument) after the run had begun (step_index 0 after the refusal); an
    integer model_output or sample was taken as numbers. Now a ValueError naming step's argument, with the
    run as it was; learned variance takes twice sample's channels."""
    sched = SteerdiffScheduler.from_config(sd_betas_config(), solver="ddim")
    sched.set_timesteps(3)
    x, t = torch.randn(2, 3, 4, 4), sched.timesteps[0]
    cases = [
        (
            torch.zeros(3, 3, 4, 4),
            x,
            r"^step: model_output has shape \(3, 3, 4, 4\), expected \(2, 3, 4, 4\)",
        ),
        (
            torch.zeros(2, 6, 4, 4),
            x,
            r"^step: model_output has shape \(2, 6, 4, 4\), expected \(2, 3, 4, 4\)",
        ),
        (
            torch.zeros(2, 3, 4, 4, dtype=torch.int64),
            x,
            r"^step: model_output must be a floating-point tensor",
        ),
        (
            torch.zeros(2, 3, 4, 4),
            x.long(),
            r"^step: sample must be a floating-point tensor, got torch.int64",
        ),
    ]
    for out, sample, match in cases:
        with pytest.raises(ValueError, match=match):
            sched.step(out, t, sample)
        assert sched.step_index is None  # the run as it was
    learned = SteerdiffScheduler.from_config(sd_betas_config(variance_type="learned_range"), solver="ddpm")
    learned.set_timesteps(3)
    with pytest.raises(
        ValueError, match=r"^step: model_output has shape \(2, 3, 4, 4\), expected \(2, 6, 4, 4\)"
    ):
        learned.step(torch.zeros_like(x), t, x)
    assert learned.step(torch.zeros(2, 6, 4, 4), t, x).prev_sample.shape == x.shape


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_a_bad_batch_of_timesteps_generators_or_begin_index_is_named(solver):
    """Before: a list of generators of another length than the batch was accepted by a deterministic
    solver (sd.sample refuses it whatever the solver) and under DDPM refused at the draw, unnamed
    ('generator: 1 generators for a batch of 2 rows'); add_noise with 3 timesteps for 2 samples was
    torch's RuntimeError; set_begin_index(4) of 3 timesteps was accepted, then refused at the first step
    as 'not where a step starts'. 3 is an empty run's (SDXL img2img, denoising_start near 1)."""
    sched = SteerdiffScheduler(solver=solver, schedule="karras")
    sched.set_timesteps(3)
    x = torch.zeros(2, 3, 4, 4)
    t = sched.timesteps[0]
    one = [torch.Generator().manual_seed(0)]
    cases = [
        (lambda: sched.step(x, t, x, generator=one), "step: generator: 1 generators for a batch of 2 rows"),
        (
            lambda: sched.add_noise(x, x, sched.timesteps),
            "add_noise: timesteps must hold one entry or one per sample (2), got 3",
        ),
        (
            lambda: sched.set_begin_index(4),
            "set_begin_index: begin_index must be an integer in [0, 3], got 4",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message
    sched.noise = one
    with pytest.raises(ValueError) as e:
        sched.step(x, t, x)
    assert str(e.value) == "step (scheduler.noise): generator: 1 generators for a batch of 2 rows"
    sched.noise = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    assert sched.step_index is None  # the refused calls left the run as it was
    sched.set_begin_index(3)
    assert sched.begin_index == 3 and sched.timesteps[3:].numel() == 0
    sched.set_begin_index(2)
    out = sched.step(torch.zeros_like(x), sched.timesteps[2], x).prev_sample
    assert sched.step_index == 3 and out.shape == x.shape
    both = sched.add_noise(x, torch.ones_like(x), sched.timesteps[1:3])
    assert torch.equal(both[1], sched.add_noise(x[1:], torch.ones_like(x[1:]), sched.timesteps[2:3])[0])
    # one image, three noises at three timesteps: broadcast (as diffusers' add_noise does)
    three = sched.add_noise(x[:1] + 1, torch.ones(3, 3, 4, 4), sched.timesteps)
    a, s = (c.to(torch.float32) for c in sched.denoiser.process.coefficients(sched.timesteps.double())[:2])
    assert torch.allclose(three[:, 0, 0, 0], a + s)


@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize(
    "cls, sigma_min",
    [(diffusers.CosineDPMSolverMultistepScheduler, 0.3), (diffusers.EDMDPMSolverMultistepScheduler, 0.002)],
)
def test_final_sigma_min_default_schedule_ends_at_sigma_min(cls, sigma_min, steps):
    # An EDM config's final_sigmas_type="sigma_min" gives final="none": the run is to end with the sample at
    # sigma_min. The default schedule, karras_capped, ends above it below 15 nodes (made for a final jump to
    # the clean state): the cosine config's runs ended at sigma 0.82 / 0.53 at 5 / 10 steps, EDMDPMSolver's
    # at 0.17 / 0.08. Without a schedule such a run now takes the whole ramp, top kept, down to sigma_min;
    # a schedule given, or final="zero", keeps karras_capped's nodes.
    config = cls(final_sigmas_type="sigma_min").config
    ours = SteerdiffScheduler.from_config(config)
    ours.set_timesteps(steps)
    assert ours.config["final"] == "none" and len(ours.sigmas) == steps + 1
    assert float(ours.sigmas[-1]) == pytest.approx(sigma_min, rel=1e-6)
    # the ramp from karras_capped's top, 30 (Karras from the cosine config's 500: 188 / 312)
    assert float(ours.sigmas[1]) < 30
    for kw in ({"schedule": "karras_capped"}, {"final": "zero"}):
        capped = SteerdiffScheduler.from_config(config, **kw)
        capped.set_timesteps(steps)
        assert float(capped.sigmas[-1 - (kw.get("final") == "zero")]) > 1.5 * sigma_min
