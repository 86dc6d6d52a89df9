r"""Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", Sec. 4.2, Alg. 4-5).

After each predictor step into a noisy node ``t``, :func:`correct` runs ``steps`` moves of a
kernel that targets the noised marginal ``p_t``:

* with the kernel's ``log_prob(x, t)``: value and gradient by autograd (ULA, MALA, HMC; exact
  Metropolis corrections); each evaluation counts as one NFE;
* without it: the denoiser's score ``grad log p_t(x) = -eps(x, t) / sigma_t`` (ULA only); each
  evaluation is one counted network call. On a guided denoiser that is the guided score, so ULA
  targets the density it is the gradient of (``p_t(x|c)^w p_t(x)^{1-w}`` for CFG at scale ``w``;
  for DPS and other approximate guidance, only approximately a density), while a kernel's
  ``log_prob`` is the target as given, whatever the guidance.

The moves are in the sampler's variable ``x_t = alpha_t x_0 + sigma_t eps`` (not ``x_t / alpha_t``):
``log_prob(x, t)`` is the density of ``x_t``.

The step size is the kernel's ``step_size`` or, if ``None``, the Langevin step from ``snr`` at the
node (:func:`~steerdiff.mcmc.base.snr_step_size`, from the batch's mean score norm at the
corrector's starting point, so a sample depends on its batch there; HMC's leapfrog step is
``sqrt(2 eps)``; ``nan`` for an empty batch, whose moves are empty), fixed for the node's moves. That
step stays a tensor on the samples' device, so no node reads a value on the host; :func:`steerdiff.sample`
checks all of them once, after the run (:func:`~steerdiff.mcmc.base.check_step_sizes`).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .._checks import caller, integer, real
from ..noise import NoiseSource, check_fixed_time, check_generators, check_shared, make_noise
from ..solvers.base import Model, NonFiniteError, moved_error
from .base import ChainInfo, Kernel, Point, StepSize, chain, finite_run, fixed_time, snr_step_size
from .hmc import HMC
from .langevin import MALA, ULA
from .lanpaint import BiGLangevin

__all__ = ["available", "check_corrector", "correct", "get"]

_REGISTRY: dict[str, type[Kernel]] = {"ula": ULA, "mala": MALA, "hmc": HMC, "lanpaint": BiGLangevin}


def available() -> list[str]:
    """Names accepted by ``corrector=``."""
    return sorted(_REGISTRY)


def get(corrector: str | Kernel, who: str | None = None) -> Kernel:
    """Resolve a name (see :func:`available`) or pass a :class:`~steerdiff.mcmc.base.Kernel` through;
    anything else is a ``ValueError`` naming ``corrector`` (after ``who:``, the caller, where given)."""
    if isinstance(corrector, Kernel):
        return corrector
    if isinstance(corrector, str) and corrector in _REGISTRY:
        return _REGISTRY[corrector]()
    prefix = caller(who)
    raise ValueError(
        f"{prefix}unknown corrector={corrector!r}; accepted: None, {available()} or a Kernel instance"
    )


def check_corrector(
    kernel: Kernel, noise: NoiseSource, steps: int, snr: float, rows: int | None = None, who: str = "sample"
) -> None:
    """Reject what cannot run, before sampling starts, or would not be reproducible as asked: a
    kernel without a generator under a Brownian tree or replayed noise maps (no noise at a fixed time),
    a kernel whose ``log_prob`` needs a gradient under ``torch.inference_mode()``, a kernel whose list
    of generators is not one per row of the batch of ``rows`` (where given), a kernel with one
    generator under the run's per-row ``noise`` (:func:`~steerdiff.noise.check_shared`). A bad ``steps``
    or ``snr`` is named after ``who``, the entry point that runs the corrector."""
    if not kernel.corrector:
        raise ValueError(
            f"corrector {type(kernel).__name__} targets N(0, s^2 I) exp(Phi) given a log-likelihood Phi, not "
            "the noised log-density a corrector is given; accepted: None, "
            f"{available()} or a Kernel instance of one"
        )
    integer(who, "corrector_steps", steps, lo=1)
    real(who, "snr", snr, lo=0, lo_open=True)
    check_generators(f"corrector {type(kernel).__name__}", kernel.generator, rows)
    if kernel.needs_log_prob and kernel.log_prob is None:
        raise ValueError(
            f"corrector {kernel.name!r} needs the noised log-density: pass "
            f"sd.mcmc.{type(kernel).__name__}(log_prob=lambda x, t: ...); a denoiser gives only the score "
            "(use 'ula')"
        )
    if kernel.log_prob is not None and torch.is_inference_mode_enabled():  # as Target's, before any call
        raise ValueError(
            f"{who}: the corrector {type(kernel).__name__}'s log_prob(x, t): its gradient is needed, which "
            "torch.inference_mode() forbids"
        )
    if kernel.generator is None:
        check_fixed_time("corrector", noise, "give the kernel a generator")
    one = isinstance(kernel.generator, torch.Generator)
    check_shared(
        noise,
        [f"the corrector {type(kernel).__name__}"] if one else [],
        "give the kernel one generator per row too, or none (it then draws from the run's)",
    )


def correct(
    kernel: Kernel,
    model: Model,
    x: Tensor,
    t: float,
    sigma: float,
    step: int,
    steps: int,
    snr: float,
    alpha: float | None = None,
) -> tuple[Tensor, ChainInfo]:
    """``steps`` moves of ``kernel`` on ``p_t`` from ``x`` (NFE counted on ``model``); ``alpha``: ``alpha(t)``
    (default: from the denoiser's process), for the divergence guard on the moved states
    (:meth:`~steerdiff.solvers.base.Model.note_state`)."""
    target = kernel.target(model, t, sigma, step)
    source = make_noise(kernel.generator) if kernel.generator is not None else model.noise
    normal = fixed_time(source, t)
    p = Point(x)
    size: StepSize
    if kernel.step_size is not None:
        size = kernel.step_size
    else:
        p = target.evaluate(p, value=kernel.needs_log_prob)
        # an empty batch has no score norm to take a step from, and its moves are empty whatever the step
        size = kernel.step_from_langevin(snr_step_size(p.grad, snr)) if len(x) else math.nan
    # the moved state is checked with the model's outputs (Model.note_move: no sync per node, read at once
    # on the CPU), so a NaN/inf the corrector made is not reported as the model's output on it. With a
    # log_prob: once, after the chain; on the model's score: after each move, one with a non-finite snr
    # step excused (check_step_sizes reports a zero score norm, after the run)
    a = float(model.denoiser.process.alpha(t)) if alpha is None else alpha
    error = functools.partial(moved_error, who=f"the corrector {type(kernel).__name__}")
    if target.has_log_prob:
        x, info = chain(kernel, p, target, steps, size, normal, t)
        model.nfe += info.evaluations
        info.finite = finite_run(x, target)
        model.note_move(info.finite, step, t, nonfinite_error)
        model.note_state(x, step, t, a, sigma, error)  # a finite state that diverged (MALA/HMC accept none)
        return x, info
    excused = None if isinstance(size, float) else ~torch.isfinite(size)

    def moved(y: Tensor) -> None:
        model.note_state(y, step, t, a, sigma, error, excused)

    return chain(kernel, p, target, steps, size, normal, t, moved)


def nonfinite_error(step: int, t: float) -> NonFiniteError:
    """The error for a corrector whose moves made NaN/inf (its ``log_prob`` or gradient, not the model)."""
    return NonFiniteError(
        f"the corrector made NaN/inf at step {step} (process time t={t:.6g}): its log_prob or its "
        "gradient is not finite there"
    )
