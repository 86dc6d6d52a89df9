"""Consistency models (Song et al. 2023) from diffusers' ``CMStochasticIterativeScheduler`` configs:
``denoiser_from_diffusers`` gives a :class:`~steerdiff.ConsistencyModelDenoiser` whose ``x0`` is that
scheduler's boundary condition on the net's output; ``lcm`` on :func:`consistency_schedule` (and
``SteerdiffScheduler`` in the pipeline loop, ``ConsistencyModelPipeline`` included) is its multistep
sampling under the same draws; with the exact consistency function the samples follow the data law."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import steerdiff as sd
from steerdiff.integrations.diffusers_ref import run_scheduler

from .reference import F64, PARITY_BOUND, noise, rel_rmse
from .test_tcd import MU, VAR, _monte_carlo_z, law_of_run

diffusers = pytest.importorskip("diffusers")

from steerdiff.integrations.diffusers import (  # noqa: E402
    SteerdiffScheduler,
    consistency_schedule,
    denoiser_from_diffusers,
    process_from_config,
)

CM = diffusers.CMStochasticIterativeScheduler
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5


def cm_config(**overrides: Any) -> dict[str, Any]:
    """A CMStochasticIterativeScheduler config as a pipeline's (with its ``_class_name``)."""
    return {**CM(**overrides).config, "_class_name": "CMStochasticIterativeScheduler"}


def boundary(sigma: float) -> tuple[float, float]:
    """Song et al. 2023, App. C: ``(c_skip, c_out)`` at noise level ``sigma``, written out."""
    gap = sigma - SIGMA_MIN
    return SIGMA_DATA**2 / (gap**2 + SIGMA_DATA**2), gap * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2)


def cm_net(consistency: Callable[[Tensor, float], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """A consistency model's net whose boundary-conditioned output is ``consistency(x, sigma)``: it gets
    ``c_in x`` and ``250 log(sigma)`` (as the pipeline passes them) and returns ``F = (f - c_skip x) /
    c_out``."""

    def net(x_in: Tensor, t: Tensor) -> Tensor:
        sigma = math.exp(float(torch.as_tensor(t, dtype=F64).reshape(-1)[0]) / 250)
        x = x_in * math.sqrt(sigma**2 + SIGMA_DATA**2)
        c_skip, c_out = boundary(sigma)
        return (consistency(x, sigma) - c_skip * x) / c_out

    return net


def denoiser_net(gmm: sd.toy.GaussianMixture) -> Callable[[Tensor, Tensor], Tensor]:
    """A net for parity runs: the mixture's exact denoiser at ``sigma`` as the boundary-conditioned output."""
    return cm_net(lambda x, sigma: gmm.denoise(x, 1.0, sigma))


class Float64Sigmas(CM):
    """CMStochasticIterativeScheduler with its sigma table in float64 (it rounds it to float32)."""

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        self.sigmas = torch.cat(
            [torch.exp(self.timesteps / 250), torch.tensor([self.config.sigma_min], dtype=F64)]
        )


# --- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [True, False])
def test_x0_is_the_schedulers_boundary_condition_at_every_node(gmm, clip):
    """At each of the 39 nodes of the default ramp (a one-node run of CMStochasticIterativeScheduler
    returns its ``c_skip x + c_out F``, clipped with ``clip_denoised``, and no noise) the denoiser's ``x0``
    is that scheduler's on a net given ``c_in x`` and ``250 log(sigma)``: measured 1.1e-7 relative RMSE with
    its own float32 sigmas, 7.2e-15 with them in float64; and it is Song et al.'s boundary condition
    written out here (clipped to [-1, 1] at the 17 nodes where it leaves that range)."""
    cfg = cm_config(clip_denoised=clip)
    net = denoiser_net(gmm)
    den = denoiser_from_diffusers(net, cfg)
    assert isinstance(den, sd.guidance.DynamicThreshold) == clip
    times = consistency_schedule(cfg, timesteps=list(range(38, -1, -1))).grid  # ramp index k at [k]
    x, clipped, worst = noise(16, 8), 0, [0.0, 0.0]
    for k in range(39):
        mine = den(x * float(times[k]), float(times[k])).x0
        for j, sched in enumerate((CM.from_config(cfg), Float64Sigmas.from_config(cfg))):
            sched.set_timesteps(timesteps=[k])
            t, x_k = sched.timesteps[0], x * float(times[k])
            out = sched.step(net(sched.scale_model_input(x_k, t), t), t, x_k).prev_sample
            worst[j] = max(worst[j], rel_rmse(mine, out))
        sigma = math.hypot(float(times[k]), SIGMA_MIN)
        c_skip, c_out = boundary(sigma)
        x_k = x * float(times[k])
        f = c_skip * x_k + c_out * net(
            x_k / math.hypot(sigma, SIGMA_DATA), torch.tensor([250 * math.log(sigma)], dtype=F64)
        )
        clipped += int((f.abs() > 1).any())
        assert rel_rmse(mine, f.clamp(-1, 1) if clip else f) < 1e-14
    assert worst[0] < 5e-7 and worst[1] < 2e-14 and clipped == 17  # the clipping acts at 17 nodes


def test_process_net_time_and_sigmas():
    """The process is that of ``x_e``: EDM in ``t = sqrt(sigma^2 - sigma_min^2)`` up to
    ``sqrt(sigma_max^2 - sigma_min^2)``, down to the ramp's last node before ``sigma_min`` (index 38 of 40:
    ``sigma = 0.00366``) or ``sigma_min`` below it; the net time at the nodes is the scheduler's
    ``timesteps``, ``250 log(sigma)``, to 1e-14, its sigmas to float32 rounding."""
    cfg = cm_config()
    p = process_from_config(cfg)
    assert (
        isinstance(p, sd.EDM) and p.t_max == math.sqrt(SIGMA_MAX**2 - SIGMA_MIN**2) and p.t_min == SIGMA_MIN
    )
    p201 = process_from_config(cm_config(num_train_timesteps=201))  # openai's CT ImageNet-64 ramp
    assert 0 < p201.t_min < SIGMA_MIN
    den = denoiser_from_diffusers(lambda x, t: x, cfg)
    assert isinstance(den.base, sd.ConsistencyModelDenoiser)
    for grid in ({"num_inference_steps": 4}, {"timesteps": [22, 0]}, {"timesteps": [38, 20, 3]}):
        theirs = CM.from_config(cfg)
        theirs.set_timesteps(**grid)
        times = consistency_schedule(cfg, **grid).grid
        assert torch.allclose(den.time_map(times), theirs.timesteps, rtol=1e-14, atol=0)
        assert torch.allclose(den.base.noise_level(times), theirs.sigmas[:-1].double(), rtol=1e-7, atol=0)
        ours = SteerdiffScheduler.from_config(cfg)
        ours.set_timesteps(**grid)
        assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=1e-7, atol=0)
        assert torch.allclose(ours.timesteps.double(), theirs.timesteps, rtol=1e-7, atol=0)
        assert ours.init_noise_sigma == theirs.init_noise_sigma == SIGMA_MAX


def test_configs_saved_and_made_in_code_are_one_model(gmm):
    """Made in code (no ``_class_name``: its ``clip_denoised`` key tells it) the config is the same
    model; before, both were refused ("a consistency model")."""
    net, x = denoiser_net(gmm), noise(4, 8) * 3.0
    saved, in_code = cm_config(), dict(CM().config)
    assert "_class_name" not in in_code
    a, b = denoiser_from_diffusers(net, saved), denoiser_from_diffusers(net, in_code)
    assert torch.equal(a(x, 3.0).x0, b(x, 3.0).x0)
    assert SteerdiffScheduler.from_config(in_code).config["origin"] == "CMStochasticIterativeScheduler"


# --- sampling: parity with the scheduler's loop ----------------------------------------------------


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_is_the_schedulers_multistep_sampling(gmm, x_T, steps, clip):
    """CMStochasticIterativeScheduler's loop (``x <- f + sqrt(sigma_next^2 - sigma_min^2) z``, no noise
    into its end ``sigma_min``; ``x_T`` times ``sigma_max``) under the same draws: ``SteerdiffScheduler``
    in the same loop and ``sd.sample(den, sigma_max x_T, steps, "lcm", consistency_schedule(cfg,
    steps))``. Measured 8.7e-7..1.07e-6 relative RMSE at 2 and 4 steps, 1.5e-8 at 1 (the scheduler's float32
    sigmas); with them in float64, 3.9e-15 (1 step) and 2.0e-15 or less. The scheduler's loop and
    ``sd.sample`` are 1.5e-8 apart (its ``timesteps`` are float32, as the net gets them)."""
    cfg = cm_config(clip_denoised=clip)
    net = denoiser_net(gmm)
    ref, nfe = run_scheduler(CM.from_config(cfg), net, x_T, steps, torch.Generator().manual_seed(3))
    ref64, _ = run_scheduler(
        Float64Sigmas.from_config(cfg), net, x_T, steps, torch.Generator().manual_seed(3)
    )
    ours = SteerdiffScheduler.from_config(cfg)
    x, our_nfe = run_scheduler(ours, net, x_T, steps, torch.Generator().manual_seed(3))
    assert nfe == our_nfe == steps and ours._run.solver.name == "lcm"
    den = denoiser_from_diffusers(net, cfg)
    kw = {"generator": torch.Generator().manual_seed(3)}
    alone = sd.sample(den, SIGMA_MAX * x_T, steps, "lcm", consistency_schedule(cfg, steps), **kw)
    assert rel_rmse(x, ref) < PARITY_BOUND["CMStochasticIterativeScheduler"]
    assert rel_rmse(alone, ref) < PARITY_BOUND["CMStochasticIterativeScheduler"]
    assert rel_rmse(alone, ref64) < PARITY_BOUND["CMStochasticIterativeScheduler(float64)"]
    assert rel_rmse(x, alone) < 1e-7
    if steps > 1:  # the noise is the draws': another seed is another sample; std sigma_next is not Alg. 1
        kw = {"generator": torch.Generator().manual_seed(4)}
        assert (
            rel_rmse(
                sd.sample(den, SIGMA_MAX * x_T, steps, "lcm", consistency_schedule(cfg, steps), **kw), ref
            )
            > 1e-2
        )


def test_pipeline_custom_timesteps(gmm, x_T):
    """Custom ``timesteps`` (ramp indices, openai's ``ts``: ``[22, 0]`` for their two-step ImageNet-64
    run) as the pipeline passes them; measured 1.0e-6."""
    cfg, net = cm_config(), denoiser_net(gmm)
    grid = {"timesteps": [22, 0]}
    ref, _ = run_scheduler(CM.from_config(cfg), net, x_T, None, torch.Generator().manual_seed(3), **grid)
    ours = SteerdiffScheduler.from_config(cfg)
    x, nfe = run_scheduler(ours, net, x_T, None, torch.Generator().manual_seed(3), **grid)
    assert nfe == 2 and rel_rmse(x, ref) < PARITY_BOUND["CMStochasticIterativeScheduler"]


def test_consistency_model_pipeline(gmm):
    """``ConsistencyModelPipeline`` with a small random ``UNet2DModel`` (nothing from a hub; class labels
    as the ImageNet models take them): with SteerdiffScheduler its images are those of
    CMStochasticIterativeScheduler (float32), measured 9.8e-8 (1 step), 6.3e-7 (2 steps) and 6.4e-7
    (``timesteps=[22, 0]``)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=10,
    ).eval()
    cfg = cm_config()
    for kw in (
        {"num_inference_steps": 1},
        {"num_inference_steps": 2},
        {"num_inference_steps": None, "timesteps": [22, 0]},
    ):
        images = []
        for sched in (CM.from_config(cfg), SteerdiffScheduler.from_config(cfg)):
            pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=sched)
            pipe.set_progress_bar_config(disable=True)
            with torch.no_grad():
                out = pipe(
                    batch_size=2,
                    class_labels=[1, 7],
                    generator=torch.Generator().manual_seed(5),
                    output_type="pt",
                    **kw,
                )
            images.append(out.images)
        assert images[0].std() > 0.05 and rel_rmse(images[1], images[0]) < 5e-6


# --- sampling: the exact answer ---------------------------------------------------------------------


def gaussian_consistency(x: Tensor, sigma: float) -> Tensor:
    """The exact consistency function of ``N(MU, diag(VAR))``: the probability-flow ODE's point at
    ``sigma_min`` from ``x`` at ``sigma`` (it keeps each standardized coordinate ``(x - MU) / sqrt(VAR +
    sigma^2)``)."""
    return MU + (VAR + SIGMA_MIN**2).sqrt() * (x - MU) / (VAR + sigma**2).sqrt()


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_exact_consistency_function_samples_the_data_law(steps):
    """Song et al.'s Alg. 1 with the exact consistency function of Gaussian data samples ``x_e``'s law
    ``N(MU, VAR + sigma_min^2)`` exactly from the marginal at ``sigma_max``, at any step count: the law
    propagated through the run's own transitions to 1e-12 (the noise ``sqrt(sigma^2 - sigma_min^2)``:
    with ``sigma``'s, LCM's clean-end step, the variance would be off by up to ``sigma_min^2``), and 4000
    samples of SteerdiffScheduler's pipeline loop within Monte Carlo error (measured max |z| 1.9)."""
    cfg = cm_config(clip_denoised=False)
    net = cm_net(gaussian_consistency)
    den = denoiser_from_diffusers(net, cfg)
    grid = sd.solvers.make_grid(den.process, consistency_schedule(cfg, steps), steps)
    start = (MU, VAR + SIGMA_MAX**2)  # the marginal at sigma_max
    mean, var = law_of_run(sd.solvers.get("lcm"), den, grid, *start)
    assert torch.allclose(mean, MU, rtol=0, atol=1e-12) and torch.allclose(
        var, VAR + SIGMA_MIN**2, rtol=1e-12
    )
    z = torch.randn(4000, 4, generator=torch.Generator().manual_seed(steps), dtype=F64)
    x_T = (MU + (VAR + SIGMA_MAX**2).sqrt() * z) / SIGMA_MAX  # the pipeline scales it by sigma_max
    x, _ = run_scheduler(
        SteerdiffScheduler.from_config(cfg), net, x_T, steps, torch.Generator().manual_seed(9)
    )
    assert max(_monte_carlo_z(x, MU, VAR + SIGMA_MIN**2)) < 4.5


def test_exact_consistency_function_of_a_mixture_samples_the_mixture():
    """The same with a two-component mixture, whose consistency function is the probability-flow ODE
    solved to ``sigma_min`` (DOP853, ``GaussianMixture.reference_ode``): 2000 samples of 1, 2 and 3 steps
    match the law of ``x_e`` (the mixture, its variances plus ``sigma_min^2``) in mean, variance and
    component weights within Monte Carlo error (measured max |z| 2.5). The exact denoiser (the posterior
    mean) in its place, 2 steps: the variance |z| 30."""
    gmm = sd.toy.GaussianMixture(
        torch.tensor([[-0.6, 0.2], [0.5, -0.3]], dtype=F64),
        torch.tensor([[0.02, 0.05], [0.04, 0.01]], dtype=F64),
        torch.tensor([0.3, 0.7], dtype=F64),
    )
    process = sd.EDM(SIGMA_MIN, SIGMA_MAX)
    net = cm_net(lambda x, sigma: gmm.reference_ode(x, process, sigma, SIGMA_MIN, rtol=1e-9, atol=1e-9))
    cfg = cm_config(clip_denoised=False)
    den = denoiser_from_diffusers(net, cfg)
    law = sd.toy.GaussianMixture(gmm.means, gmm.variances + SIGMA_MIN**2, gmm.weights)
    n = 2000
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    var = (gmm.weights[:, None] * (law.variances + gmm.means**2)).sum(0) - mean**2
    for steps in (1, 2, 3):
        g = torch.Generator().manual_seed(20 + steps)
        x_T = gmm.sample(n, generator=g) + SIGMA_MAX * torch.randn(n, 2, generator=g, dtype=F64)
        x = sd.sample(den, x_T, steps, "lcm", consistency_schedule(cfg, steps), generator=g)
        assert max(_monte_carlo_z(x, mean, var)) < 4.5, steps
        share = law.log_responsibilities(x).exp().mean(0)
        assert ((share - gmm.weights).abs() / (gmm.weights * (1 - gmm.weights) / n).sqrt()).max() < 4.5
    posterior_mean = denoiser_from_diffusers(cm_net(lambda x, sigma: gmm.denoise(x, 1.0, sigma)), cfg)
    g = torch.Generator().manual_seed(5)
    x_T = gmm.sample(n, generator=g) + SIGMA_MAX * torch.randn(n, 2, generator=g, dtype=F64)
    x = sd.sample(posterior_mean, x_T, 2, "lcm", consistency_schedule(cfg, 2), generator=g)
    assert _monte_carlo_z(x, mean, var)[1] > 20


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: consistency_schedule(cm_config(), 40),
            r"num_inference_steps must be an integer in \[1, 39\]",
        ),
        (
            lambda: consistency_schedule(cm_config(), timesteps=[39, 0]),
            r"strictly decreasing integers in \[0, 38\]",
        ),
        (lambda: consistency_schedule(cm_config(), timesteps=[0, 22]), r"strictly decreasing integers"),
        (lambda: consistency_schedule(cm_config(), timesteps=[22.5, 0]), r"strictly decreasing integers"),
        (lambda: consistency_schedule(cm_config()), r"pass one of num_inference_steps or timesteps"),
        (
            lambda: consistency_schedule(diffusers.DDIMScheduler().config, 2),
            r"must be a CMStochasticIterativeScheduler config",
        ),
        (
            lambda: denoiser_from_diffusers(lambda x, t: x, cm_config(clip_denoised=1)),
            r"clip_denoised must be",
        ),
        (
            lambda: denoiser_from_diffusers(lambda x, t: x, cm_config(sigma_min=80.0, sigma_max=1.0)),
            r"need sigma_min < sigma_max",
        ),
        (
            lambda: SteerdiffScheduler.from_config(cm_config(s_noise=1.007)),
            r"s_noise=1\.007 .* accepted: 1\.0",
        ),
        (
            lambda: SteerdiffScheduler.from_config(cm_config()).set_timesteps(sigmas=[80.0, 1.0]),
            r"takes no sigmas",
        ),
        # the run's steps, named as set_timesteps got them (with final="none" the grid holds one node more:
        # 39 steps asked for consistency_schedule's 40 nodes, and the message said "got 40")
        (
            lambda: SteerdiffScheduler.from_config(cm_config()).set_timesteps(40),
            r"^set_timesteps: num_inference_steps must be an integer in \[1, 39\] .*, got 40$",
        ),
        (
            lambda: SteerdiffScheduler.from_config(cm_config(), final="none").set_timesteps(39),
            r"^set_timesteps: num_inference_steps must be an integer in \[1, 38\] .*final='none'.*, got 39$",
        ),
        # img2img's strength: no consistency-model grid takes it, and the lcm schedule (suggested to VP
        # configs) is for VP nets: the message said "pass schedule='lcm'"
        (
            lambda: SteerdiffScheduler.from_config(cm_config()).set_timesteps(4, strength=0.5),
            r"^set_timesteps: strength=0\.5: options of the lcm schedule only .*; leave them out$",
        ),
        (lambda: sd.ConsistencyModelDenoiser(lambda x, t: x, t_min=100.0), r"t_min must be a finite number"),
        (lambda: sd.ConsistencyModelDenoiser(lambda x, t: x, sigma_data=0.0), r"sigma_data must be"),
        (lambda: sd.ConsistencyModelDenoiser(lambda x, t: x, sigma_min=-1.0), r"sigma_min must be"),
    ],
)
def test_bad_consistency_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_add_noise_is_the_schedulers(gmm):
    """``add_noise`` adds ``sigma`` times the noise to the clean sample, as CMStochasticIterativeScheduler
    does (not the process's ``t = sqrt(sigma^2 - sigma_min^2)``: the noise of ``x0``, not of ``x_e``);
    measured 4.7e-8 relative RMSE (its float32 sigmas; with ``t``, 1.2e-4 at the last node)."""
    cfg = cm_config()
    theirs, ours = CM.from_config(cfg), SteerdiffScheduler.from_config(cfg)
    theirs.set_timesteps(4)
    ours.set_timesteps(4)
    x0, z = gmm.sample(16, generator=torch.Generator().manual_seed(0)), noise(16, 8, seed=2)
    for k in range(4):
        ref = theirs.add_noise(x0, z, theirs.timesteps[k : k + 1])
        mine = ours.add_noise(x0, z, ours.timesteps[k : k + 1])
        assert rel_rmse(mine - x0, ref - x0) < 1e-7, k
