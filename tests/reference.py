"""Shared test oracles: small exact mixtures, the exact reference sample, and diffusers runs.

``diffusers_sample`` drives a diffusers scheduler with the *exact* Gaussian-mixture model, the
way a pipeline does (``init_noise_sigma``, ``scale_model_input``, ``step``); ``nodes_of`` reads
the timesteps it used, so that ``sd.schedules.Custom(nodes_of(sched))`` runs steerdiff on the
same grid. diffusers is a test extra: import this module only under ``pytest.importorskip``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import steerdiff as sd

F64 = torch.float64


def smooth_mixture(dim: int = 8, components: int = 4, seed: int = 0) -> sd.toy.GaussianMixture:
    """A well-conditioned mixture (std 0.55-0.9): solver error is smooth in the step size."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=F64)
    variances = 0.3 + 0.5 * torch.rand(components, dim, generator=g, dtype=F64)
    return sd.toy.GaussianMixture(means, variances, torch.ones(components, dtype=F64))


def noise(batch: int, dim: int, seed: int = 1, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def exact_sample(gmm: sd.toy.GaussianMixture, process: sd.Process, x_T: Tensor) -> Tensor:
    """What ``sd.sample`` approximates by default: ODE from ``t_max`` to ``t_min``, then denoise."""
    return gmm.reference_ode(x_T, process, process.t_max, process.t_min, denoise=True)


def rel_rmse(x: Tensor, ref: Tensor) -> float:
    x, ref = x.to(F64), ref.to(F64)
    return float(((x - ref) ** 2).mean().sqrt() / (ref**2).mean().sqrt())


def slope(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of ``-log(error)`` against ``log(steps)``: the observed order."""
    xs = [math.log(s) for s in steps]
    ys = [-math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def sd_betas_config(**overrides: object) -> dict:
    """Stable Diffusion's scheduler config (scaled_linear 0.00085-0.012, 1000 steps)."""
    cfg = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    }
    cfg.update(overrides)
    return cfg


def eps_net(gmm: sd.toy.GaussianMixture, process: sd.Process):
    """The exact eps-prediction net of ``gmm`` under ``process``, at (possibly fractional) timesteps."""

    def net(x: Tensor, t: Tensor | float) -> Tensor:
        tt = float(torch.as_tensor(t, dtype=F64).reshape(-1)[0])
        a, s = float(process.alpha(tt)), float(process.sigma(tt))
        x0 = gmm.denoise(x, a, s)
        return (x - a * x0) / s

    return net


def diffusers_sample(scheduler, gmm: sd.toy.GaussianMixture, process: sd.Process, x_T: Tensor, steps: int):
    """Run a diffusers scheduler as a pipeline would, with the exact eps model.

    Returns ``(x0, nfe)``. ``x_T`` is standard normal; it is scaled by ``init_noise_sigma``.
    """
    net = eps_net(gmm, process)
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    nfe = 0
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = net(inp, t)
        nfe += 1
        x = scheduler.step(out, t, x).prev_sample
    return x, nfe


def nodes_of(scheduler) -> sd.schedules.Custom:
    """The distinct timesteps a diffusers scheduler evaluated, as a steerdiff schedule.

    For schedulers that evaluate a node twice (Heun), duplicates are dropped.
    """
    ts: list[float] = []
    for t in scheduler.timesteps.tolist():
        if not ts or t != ts[-1]:
            ts.append(float(t))
    return sd.schedules.Custom(ts)
