r"""Predictor-corrector guidance: the predictor-corrector reading of classifier-free guidance
(Bradley & Nakkiran 2024, "Classifier-Free Guidance is a Predictor-Corrector"): a DDIM step on
``p(x|c)`` followed by Langevin moves on ``p_t(x|c)^gamma p_t(x)^{1-gamma}``, whose score is
:class:`~steerdiff.guidance.CFG` at scale ``gamma``; with ``gamma = 2w - 1`` it is CFG-DDPM at scale
``w`` in the SDE limit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor

from .._checks import boolean, choice, held_by, integer, real
from ..denoiser import Denoiser, override_kwargs
from ..mcmc.base import Point, Target, chain, fixed_time
from ..mcmc.langevin import ULA
from ..noise import NoiseSource, check_fixed_time, make_noise
from ..sampling import DEFAULT_SCHEDULE, SampleInfo, check_seeded, check_x_T, diverged_step
from ..schedules import ScheduleLike
from ..schedules import get as get_schedule
from ..solvers._exp import sde_std
from ..solvers.base import DEFAULT_STEPS, FINALS, Model, make_grid, moved_error, to_sample_dtype, work_dtype
from ..solvers.ddim import DDIM
from .cfg import CFG, check_pair

__all__ = ["pcg"]


def _corrector_score(model: Model, t: float, sigma: float, step: int) -> Callable[[Tensor], Tensor]:
    """The score ``-eps / sigma`` of ``model``'s denoiser at ``t`` (one counted call per evaluation)."""
    return lambda y: model(y, t, step).eps * (-1.0 / sigma)


@overload
def pcg(
    cond: Denoiser,
    uncond: Denoiser,
    /,
    x_T: Tensor,
    steps: int | None = ...,
    gamma: float | None = ...,
    *,
    langevin_steps: int = ...,
    step_scale: float = ...,
    uncond_kwargs: dict[str, Any] | None = ...,
    schedule: ScheduleLike = ...,
    final: str = ...,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = ...,
    return_info: Literal[False] = ...,
    **kwargs: Any,
) -> Tensor: ...


@overload
def pcg(
    cond: Denoiser,
    uncond: Denoiser,
    /,
    x_T: Tensor,
    steps: int | None = ...,
    gamma: float | None = ...,
    *,
    langevin_steps: int = ...,
    step_scale: float = ...,
    uncond_kwargs: dict[str, Any] | None = ...,
    schedule: ScheduleLike = ...,
    final: str = ...,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = ...,
    return_info: Literal[True],
    **kwargs: Any,
) -> tuple[Tensor, SampleInfo]: ...


@overload
def pcg(
    cond: Denoiser,
    uncond: Denoiser,
    /,
    x_T: Tensor,
    steps: int | None = ...,
    gamma: float | None = ...,
    *,
    langevin_steps: int = ...,
    step_scale: float = ...,
    uncond_kwargs: dict[str, Any] | None = ...,
    schedule: ScheduleLike = ...,
    final: str = ...,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = ...,
    return_info: bool,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, SampleInfo]: ...


def pcg(
    cond: Denoiser,
    uncond: Denoiser,
    /,
    x_T: Tensor,
    steps: int | None = None,
    gamma: float | None = None,
    *,
    langevin_steps: int = 1,
    step_scale: float = 1.0,
    uncond_kwargs: dict[str, Any] | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = None,
    return_info: bool = False,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    r"""Predictor-corrector guidance (PCG; Bradley & Nakkiran 2024, "Classifier-Free Guidance is a
    Predictor-Corrector", Alg. 1-2).

    Each step is a DDIM step on the *conditional* denoiser (the predictor) from node ``i`` to
    ``i + 1``, then ``langevin_steps`` unadjusted Langevin moves (:class:`~steerdiff.mcmc.ULA`)
    targeting the gamma-powered density ``p_t(x|c)^gamma p_t(x)^{1-gamma}``, whose score is
    :class:`CFG` at scale ``gamma`` (``-eps_gamma / sigma``):

        x <- x + eta grad log p^{c,gamma}_t(x) + sqrt(2 eta) z,
        eta = step_scale * sigma_{i+1}^2 (1 - exp(-2 h)) / 2,       h = lam_{i+1} - lam_i,

    i.e. (``step_scale = 1``) half the variance of the DDPM step between the nodes. The reverse SDE
    is the probability-flow ODE plus a Langevin move of step ``g^2 dt / 2 = sigma^2 h``, so in the
    SDE limit one move with ``gamma = 2 w - 1`` is CFG-DDPM at scale ``w``: a score
    ``(s_c + s_{2w-1}) / 2 = s_w`` (their Sec. 4 equivalence, ``gamma' = 2 gamma - 1``). Into a
    clean end the step returns the conditional ``x0``, without correction.

    ``cond`` and ``uncond`` are positional-only, so that ``**kwargs`` may hold any name: a condition
    ``cond=`` for the net, say (latent diffusion's ``apply_model(x, t, cond)``), as ``pcg(den, den, x_T,
    steps, gamma, cond=c, uncond_kwargs={"cond": c_null})``.

    ``steps``: the number of steps; ``None`` (the default): an explicit grid's count (``schedule`` a list
    of times), else 10, as for :func:`steerdiff.sample`. ``gamma`` is required: its default ``None`` is
    refused, and only lets ``steps`` before it default (``pcg(cond, uncond, x_T, gamma=3.0)``).
    ``uncond_kwargs``, ``schedule``, ``final``, ``generator`` and ``**kwargs`` (the condition) are as
    for :class:`CFG` and :func:`steerdiff.sample` (the same wrappers refused, :func:`check_seeded`),
    but for a Brownian tree, refused: the moves are at fixed times, where it has no noise
    (:func:`~steerdiff.noise.check_fixed_time`). As there, a float16/bfloat16 ``x_T`` runs only the
    nets in its dtype (the state, the steps, the moves and the CFG combination in float32) and the
    result has its dtype. NFE: one per step for the predictor, plus
    ``CFG.cost`` (2; 1 for ``gamma`` 0 or 1) per Langevin move; ``SampleInfo.corrector`` has one
    :class:`~steerdiff.mcmc.ChainInfo` per corrected node.
    """
    if gamma is None:
        raise ValueError("pcg: gamma is required, a real number >= 0 (e.g. pcg(cond, uncond, x_T, gamma=3))")
    gamma = real("pcg", "gamma", gamma, lo=0)
    return_info = boolean("pcg", "return_info", return_info)
    langevin_steps = integer("pcg", "langevin_steps", langevin_steps, lo=1)
    step_scale = real("pcg", "step_scale", step_scale, lo=0, lo_open=True)
    # CFG's and make_grid's checks of these arguments, named as pcg's (they read "CFG: scale", some only
    # at the first move)
    uncond_kwargs = check_pair("pcg", cond, uncond, uncond_kwargs)
    size = check_x_T(cond, x_T, "pcg")
    held_by("pcg", "gamma", gamma, work_dtype(x_T.dtype))
    override_kwargs("pcg", "uncond_kwargs", kwargs, uncond_kwargs, x_T.shape[0])
    choice("pcg", "final", final, FINALS)
    sharpened = CFG(cond, uncond, gamma, uncond_kwargs=uncond_kwargs)
    check_fixed_time("pcg", generator, "pass a torch.Generator or a list of them (one per sample)")
    check_seeded(sharpened, generator, "pcg")
    sched = get_schedule(schedule, "pcg")
    grid = make_grid(cond.process, sched, steps, final, who="pcg", default=DEFAULT_STEPS)
    source = make_noise(generator, "pcg")
    predictor = Model(cond, kwargs, source, x_T.dtype, scale=size)
    corrector = Model(sharpened, kwargs, source, x_T.dtype, scale=size)
    chains = []
    # the divergence guard (Model.note_state) on the predictor's states and the corrector's moves
    stepped = diverged_step(DDIM(), predictor, "pcg's predictor (DDIM)")
    moved = functools.partial(
        moved_error, who="pcg's corrector (ULA)", fix="try a smaller step_scale or gamma, or more steps"
    )
    x = x_T.to(work_dtype(x_T.dtype))
    for i in range(grid.steps):
        x = predictor(x, grid.t[i], i).renoise(grid.alpha[i + 1], grid.sigma[i + 1])
        t, alpha, sigma = grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1]
        predictor.note_state(x, i, t, alpha, sigma, stepped)
        if grid.is_final_clean(i):
            break
        eta = step_scale * 0.5 * sde_std(sigma, grid.h(i), 1.0) ** 2
        target = Target(score=_corrector_score(corrector, t, sigma, i))

        def note(y: Tensor, i: int = i, t: float = t, alpha: float = alpha, sigma: float = sigma) -> None:
            corrector.note_state(y, i, t, alpha, sigma, moved)

        x, info = chain(ULA(), Point(x), target, langevin_steps, eta, fixed_time(source, t), t, note)
        chains.append(info)
    predictor.check_finite(corrector)
    x = to_sample_dtype("pcg", x, x_T.dtype)
    if return_info:
        return x, SampleInfo(predictor.nfe + corrector.nfe, grid, DDIM(), sched, chains)
    return x
