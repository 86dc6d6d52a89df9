r"""diffusers' schedulers driven by an exact model, as a reference to measure steerdiff against.

:func:`diffusers_sample` runs a diffusers scheduler the way a pipeline does
(``x = x_T * init_noise_sigma``; per timestep ``eps = net(scale_model_input(x, t), t)`` and
``x = step(eps, t, x).prev_sample``) with the exact noise-prediction network of a Gaussian
mixture (:func:`eps_net`: ``eps = (x - alpha_t E[x0 | x]) / sigma_t`` at the, possibly
fractional, timestep ``t``). :func:`nodes_of` reads the timesteps a scheduler evaluated, so that
``sd.sample(..., schedule=nodes_of(sched))`` runs steerdiff on the same grid.

This module never imports diffusers: the scheduler objects are made by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..processes import Process
from ..schedules import Custom
from ..toy.gmm import GaussianMixture

__all__ = ["diffusers_sample", "eps_net", "nodes_of", "quiet_diffusers", "run_scheduler", "sd_betas_config"]

F64 = torch.float64


def sd_betas_config(**overrides: Any) -> dict[str, Any]:
    """Stable Diffusion's scheduler config (``scaled_linear`` betas 0.00085-0.012, 1000 steps, eps).

    The same process as :meth:`steerdiff.VP.scaled_linear`; ``overrides`` update the dict.
    """
    cfg: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    }
    cfg.update(overrides)
    return cfg


def eps_net(gmm: GaussianMixture, process: Process) -> Callable[[Tensor, Tensor | float], Tensor]:
    """The exact eps-prediction net of ``gmm`` under ``process`` at (possibly fractional) timesteps.

    ``net(x, t) = (x - alpha_t D(x; alpha_t, sigma_t)) / sigma_t`` with ``D`` the exact denoiser.
    """

    def net(x: Tensor, t: Tensor | float) -> Tensor:
        tt = float(torch.as_tensor(t, dtype=F64).reshape(-1)[0])
        a, s = float(process.alpha(tt)), float(process.sigma(tt))
        return (x - a * gmm.denoise(x, a, s)) / s

    return net


def run_scheduler(
    scheduler: Any,
    net: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,
    steps: int | None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    **grid: Any,
) -> tuple[Tensor, int]:
    """A diffusers pipeline's denoising loop around ``net(x, t) -> eps``; returns ``(x0, nfe)``.

    ``scheduler.set_timesteps(steps, **grid)`` (``grid``: a custom ``timesteps=`` / ``sigmas=``,
    ``mu=``, with ``steps=None``); ``x = x_T * init_noise_sigma``; for each ``t`` in ``scheduler.timesteps``:
    ``x = step(net(scale_model_input(x, t), t), t, x).prev_sample``; stochastic schedulers draw
    their noise from ``generator``. ``callback(i, x)`` is called after the ``i``-th step with its
    ``prev_sample`` (as a pipeline's ``callback_on_step_end``).
    """
    scheduler.set_timesteps(steps, **grid)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers have neither
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    kwargs = {} if generator is None else {"generator": generator}
    nfe = 0
    for t in scheduler.timesteps:
        out = net(scale(x, t), t)
        nfe += 1
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        if callback is not None:
            callback(nfe - 1, x)
    return x, nfe


def diffusers_sample(
    scheduler: Any,
    gmm: GaussianMixture,
    process: Process,
    x_T: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, int]:
    """Run a diffusers ``scheduler`` for ``steps`` inference steps with the exact eps model.

    Returns ``(x0, nfe)``, ``nfe`` being the number of network calls (``len(scheduler.timesteps)``:
    ``2 steps - 1`` for Heun). ``x_T`` is standard normal; it is scaled by ``init_noise_sigma``. An inverse
    scheduler (``DDIMInverseScheduler``, ``DPMSolverMultistepInverseScheduler``) runs the same loop up its
    timesteps: ``x_T`` is then the clean sample and the result the inverted noise.
    Stochastic schedulers draw their noise from ``generator``; ``callback`` as in
    :func:`run_scheduler`.
    """
    return run_scheduler(scheduler, eps_net(gmm, process), x_T, steps, generator, callback)


def nodes_of(scheduler: Any) -> Custom:
    """The distinct timesteps a diffusers scheduler evaluates, as a steerdiff schedule.

    Call after ``scheduler.set_timesteps``; for schedulers that evaluate a node twice (Heun),
    duplicates are dropped.
    """
    ts: list[float] = []
    for t in scheduler.timesteps.tolist():
        if not ts or t != ts[-1]:
            ts.append(float(t))
    return Custom(ts)


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' config-change warnings for the duration (restoring its verbosity); nothing
    to silence where diffusers is not installed (the ``--no-diffusers`` runs)."""
    try:
        from diffusers.utils import logging as dlog
    except ImportError:
        yield
        return
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
