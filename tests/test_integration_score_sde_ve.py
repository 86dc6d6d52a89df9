"""Variance-exploding score models (Song et al. 2021, the VE SDE; NCSN++) from diffusers'
``ScoreSdeVeScheduler`` configs: ``denoiser_from_diffusers`` reads the VE process, the score output and
the net time ``sigma``, for ``sd.sample`` with any solver; ScoreSdeVePipeline's predictor is DDPM's step
with the ``fixed_large`` variance on the discrete sigmas, under the same draws."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import steerdiff as sd

from .reference import F64, noise, rel_rmse

diffusers = pytest.importorskip("diffusers")

from steerdiff.integrations.diffusers import SteerdiffScheduler, denoiser_from_diffusers  # noqa: E402

VES = diffusers.ScoreSdeVeScheduler


def ve_config(**overrides) -> dict:
    """A ScoreSdeVeScheduler config as a pipeline's (with its ``_class_name``): sigma 0.01..1348."""
    return {**VES(**overrides).config, "_class_name": "ScoreSdeVeScheduler"}


def score_net(gmm: sd.toy.GaussianMixture):
    """The mixture's exact score ``(E[x0 | x] - x) / sigma^2`` at the noise level the net gets as its time."""

    def net(x: Tensor, sigma: Tensor) -> Tensor:
        s = float(torch.as_tensor(sigma, dtype=F64).reshape(-1)[0])
        return (gmm.denoise(x, 1.0, s) - x) / s**2

    return net


def test_the_denoiser_is_the_exact_mixtures(gmm):
    """The process is ``VE(sigma_min, sigma_max)`` (``sigma_min (sigma_max / sigma_min)^t``), the net gets
    ``sigma(t)`` and its output is the score: the denoiser's ``x0`` is the mixture's exact one at every noise
    level, saved or made in code (before: refused, "a variance-exploding score model"); measured 2.8e-13
    relative RMSE at ``sigma_max``, where ``x0 = x + sigma^2 score`` cancels (``|x| / |x0| ~ 2000``)."""
    for cfg in (ve_config(), dict(VES().config)):
        den = denoiser_from_diffusers(score_net(gmm), cfg)
        p = den.process
        assert isinstance(p, sd.VE) and (p.sigma_min, p.sigma_max) == (0.01, 1348.0)
        x = noise(16, 8)
        for t in (0.0, 0.2, 0.5, 0.8, 1.0):
            sigma = float(p.sigma(t))
            assert float(den.time_map(torch.tensor(t, dtype=F64))) == sigma
            x_t = gmm.sample(16, generator=torch.Generator().manual_seed(1)) + sigma * x
            assert rel_rmse(den(x_t, t).x0, gmm.denoise(x_t, 1.0, sigma)) < 1e-12


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "unipc", "euler_maruyama"])
def test_any_solver_samples_the_model(gmm, x_T, solver):
    """``sd.sample`` on the config's denoiser is the run on the mixture's own denoiser of the VE process,
    measured 1.5e-15 apart."""
    den = denoiser_from_diffusers(score_net(gmm), ve_config())
    kw = {"steps": 12, "solver": solver, "schedule": "karras"}
    a = sd.sample(den, 1348.0 * x_T, generator=torch.Generator().manual_seed(2), **kw)
    b = sd.sample(gmm.denoiser(den.process), 1348.0 * x_T, generator=torch.Generator().manual_seed(2), **kw)
    assert rel_rmse(a, b) < 1e-13


def pipeline_predictor(sched, net, x_T: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """ScoreSdeVePipeline's loop with ``correct_steps=0``: the net gets ``scheduler.sigmas[i]``, ``step_pred``
    moves the sample; the result is the last ``prev_sample_mean``."""
    sched.set_timesteps(steps)
    sched.set_sigmas(steps)
    x = x_T * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        out = sched.step_pred(net(x, sched.sigmas[i] * torch.ones(len(x))), t, x, generator=generator)
        x, mean = out.prev_sample, out.prev_sample_mean
    return mean


@pytest.mark.parametrize("steps", [10, 50, 200])
def test_the_pipelines_predictor_is_ddpm_fixed_large(gmm, x_T, steps):
    """``step_pred`` is ``x + (s_k^2 - s_{k-1}^2) score + sqrt(s_k^2 - s_{k-1}^2) z`` on its discrete sigmas
    ``s_k``, ``k = n - 1, ..., 0`` (process times ``k / (n - 1)``, ending with ``x + s_min^2 score``, the
    clean end's ``x0``): DDPM's posterior mean with the ``fixed_large`` variance, under the same draws. The
    net, though, gets ``sigma`` at ``sampling_eps + (1 - sampling_eps) t`` (its ``timesteps``), not at the
    step's ``t``: with that time map, measured 2.9e-7..1.0e-6 relative RMSE (its float32 sigma tables);
    with the net's own time ``sigma(t)``, 9.5e-5..3.6e-4. With ``correct_steps >= 1`` the loop has no
    steerdiff counterpart: its Langevin steps come before each predictor step (from ``sigma_max`` on), each
    sized from that move's own score and drawn noise norms, while steerdiff's corrector moves after each
    step into a noisy node at one step size per node, from ``snr`` and ``sqrt(d)``."""
    cfg = ve_config(correct_steps=0)
    net = score_net(gmm)
    ref = pipeline_predictor(VES.from_config(cfg), net, x_T, steps, torch.Generator().manual_seed(3))
    den = denoiser_from_diffusers(net, cfg)
    eps, p = cfg["sampling_eps"], den.process
    shifted = denoiser_from_diffusers(net, cfg, time_map=lambda t: p.sigma(eps + (1 - eps) * t))
    kw = {
        "steps": steps,
        "solver": sd.solvers.DDPM(variance="fixed_large"),
        "schedule": sd.schedules.Custom(torch.linspace(1, 0, steps, dtype=F64)),
    }
    x = sd.sample(shifted, 1348.0 * x_T, generator=torch.Generator().manual_seed(3), **kw)
    assert rel_rmse(x, ref) < 5e-6
    own = sd.sample(den, 1348.0 * x_T, generator=torch.Generator().manual_seed(3), **kw)
    assert rel_rmse(own, ref) > 5e-5


def test_steerdiff_scheduler_refuses_it():
    """ScoreSdeVePipeline calls ``step_pred`` / ``step_correct`` and hands the net ``scheduler.sigmas``: no
    scheduler step; the refusal points to ``sd.sample``."""
    for cfg in (ve_config(), dict(VES().config)):
        with pytest.raises(
            ValueError, match=r"^SteerdiffScheduler: a ScoreSdeVeScheduler config .* sd\.sample\("
        ):
            SteerdiffScheduler.from_config(cfg)


def test_a_vp_sde_config_made_in_code_is_no_ve_config():
    """ScoreSdeVpScheduler (diffusers' deprecated continuous VP SDE) has ``sampling_eps`` too: made in code
    (no ``_class_name``) its config was read as a VE model of ScoreSdeVe's default sigmas 0.01..1348, a
    different process (VP, ``beta_min`` 0.1, ``beta_max`` 20) taken silently, and SteerdiffScheduler refused
    it as "a ScoreSdeVeScheduler config". Now a config made in code is ScoreSdeVe's by the keys only it has
    (``sampling_eps`` with ``snr`` and ``correct_steps``); the VP SDE config is refused naming its key, as
    with its ``_class_name``."""
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    in_code = {k: v for k, v in ScoreSdeVpScheduler().config.items() if not k.startswith("_")}
    for cfg in (in_code, {**in_code, "_class_name": "ScoreSdeVpScheduler"}):
        with pytest.raises(ValueError, match=r"has the key 'beta_min'"):
            denoiser_from_diffusers(lambda x, t: x, cfg)
        with pytest.raises(ValueError, match=r"has the key 'beta_min'"):
            SteerdiffScheduler.from_config(cfg)
    ve_in_code = {k: v for k, v in VES().config.items() if not k.startswith("_")}
    assert isinstance(denoiser_from_diffusers(lambda x, t: x, ve_in_code).process, sd.VE)
