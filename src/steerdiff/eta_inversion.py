r"""Eta Inversion (Kang, Galim & Koo, ECCV 2024, "Eta Inversion: Designing an Optimal Eta Function for
Diffusion-based Real Image Editing"; the authors' ``modules/inversion/eta_inversion.py``): DDIM inversion,
then an edit sampled by DDIM with a time- and region-dependent ``eta``, whose fresh noise at every step is
the one of a few Gaussian draws nearest to the noise that would keep the *source* branch on the inversion.

The edit's step is DDIM's Eq. 12 (:mod:`steerdiff.solvers.ddim`) with ``eta`` a function of the step's
start ``t_i`` and of the element,

    x_{i+1} = alpha_{i+1} x0 + sqrt(sigma_{i+1}^2 - c_i^2) eps + c_i z_i,
    c_i = M eta(t_i) sigma_{i+1} sqrt(1 - exp(-2h))    (capped at sigma_{i+1}),

    eta(t) = eta_0 + (eta_1 - eta_0) u,    u = (t - t_min) / (t_max - t_min),

linear from ``eta_0`` at the clean end to ``eta_1`` at the noise end (the authors' default ``(0, 0.4)``:
their ``np.linspace(0.0, 0.4, 1000)[t]`` at Stable Diffusion's timestep ``t``, which is this formula on a
1000-step discrete process, ``t_min = 0``, ``t_max = 999``). On another process ``u`` is its own normalized
time, as CADS's (:class:`~steerdiff.guidance.cfg.CADS`): near SD's ``t / 999`` on ``VP.linear``, ``VP.cosine``
and ``RectifiedFlow``, but on ``EDM``, whose time is ``sigma``, linear in ``sigma``: at the default 0.005 at
``sigma = 1``, where SD's table gives 0.14 (``t = 354``), so an EDM edit is near DDIM below the top few
steps unless ``eta`` is raised. ``M`` in ``[0, 1]``, of the sample's shape or
broadcastable to it, is the region: 1 where the edit may inject noise, 0 where the step is DDIM's
deterministic one. The authors threshold the source word's cross-attention map (averaged over the
inversion's steps) at 0.2; here ``M`` is given (``mask``), and ``None`` is 1 everywhere.

The noise ``z_i`` (:func:`eta_invert`): with ``x_{t_0..t_N}`` the DDIM inversion of ``x_0``
(:func:`steerdiff.invert` with ``solver="ddim"``; ``x_{t_N} = x_0``), the source branch of the edit stays on
it (the authors' direct-inversion step, which puts the source latent back on the inversion's every step),
so its step from ``x_{t_i}`` under the source condition is known before the edit: with ``M = 1`` its mean
``mu_i`` and std ``c_i``, and the noise that would land it on the inversion is

    z*_i = (x_{t_{i+1}} - mu_i) / c_i.

``candidates`` standard normal draws ``z^(1..K)`` are made per step and per batch row, and ``z_i`` is the
one with the least mean squared distance to ``z*_i`` (the authors' ``noise_sample_count``, 10 by default;
a step with ``c_i = 0`` draws none and gets zeros). The source branch's steps depend only on the
inversion, so the maps are made once, in :func:`eta_invert`, and the edit is
``sd.sample(target, **inv.sample_kwargs(), **target_cond)``: DDIM with this ``eta`` replaying them
(:class:`~steerdiff.noise.ReplayNoise`), as the target branch of the authors' code does.

What is exact, and what is not: the source branch is the inversion, so it returns ``x_0`` exactly
(``inv.xs[-1]`` is ``x_0``). The *edit's* branch under the source condition does not: the chosen ``z_i`` is
the nearest of a few draws, not ``z*_i``, which is no standard normal vector (on the 8-d mixture of the
tests, 8 steps: mean norm 0.44-1.5 over the first six steps, against a draw's 2.8, and 250 at the last,
where ``eta = 0.05``), so the replay carries fresh noise of std up to ``c_i <= eta(t_i) sigma_{i+1}`` per
step (the two-Gaussian edit of ``tests/test_eta_inversion.py``, 50 steps: 0.81 from ``x_0`` at the
defaults, DDIM inversion 0.14). With ``eta = (0, 0)`` it is DDIM inversion followed by DDIM sampling, bit
for bit. The authors' inversion is diffusers' ``DDIMInverseScheduler`` (the net at the step's target
timestep, :mod:`steerdiff.inversion`); this one evaluates it at the step's start.

Cost: ``N`` evaluations to invert, ``N`` for the source branch's steps (``EtaNoise.nfe``: ``2 N``, times the
denoisers' cost), and the edit's ``N``: the authors' per-step batch of source and target, one inversion.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import schedules as _schedules
from ._checks import boolean, integer, real
from ._ops import host_to, kept
from .ddpm_inversion import EditNoise
from .denoiser import Denoiser, check_denoiser
from .inversion import invert_as
from .noise import Generators, ReplayNoise, check_generators, randn
from .sampling import DEFAULT_SCHEDULE, check_sample_only, check_x_T
from .schedules import ScheduleLike
from .solvers.base import (
    Grid,
    Model,
    Solver,
    Transition,
    count_steps,
    diverged_error,
    make_grid,
    work_dtype,
)
from .solvers.ddim import ancestral_split

__all__ = ["EtaDDIM", "EtaNoise", "eta_invert"]

log = logging.getLogger(__name__)

# sample's keyword arguments that eta_invert has none of: given to it they would reach the net as conditions
SAMPLE_ONLY = ("solver", "final", "callback", "corrector", "corrector_steps", "snr", "return_info")


def _eta_pair(who: str, eta: object) -> tuple[float, float]:
    if not isinstance(eta, tuple | list) or len(eta) != 2:
        raise ValueError(
            f"{who}: eta must be a pair (eta at the clean end, eta at the noise end) of numbers >= 0, got "
            f"{eta!r}"
        )
    return real(who, "eta[0]", eta[0], lo=0), real(who, "eta[1]", eta[1], lo=0)


def _mask(who: str, mask: object) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or not mask.is_floating_point() or mask.numel() == 0:
        raise ValueError(f"{who}: mask must be None or a non-empty floating torch.Tensor, got {mask!r}")
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError(f"{who}: mask must hold values in [0, 1] (1: eta applies, 0: DDIM's eta = 0)")
    return mask


def _broadcasts(mask: Tensor, x: Tensor) -> bool:
    try:
        return torch.broadcast_shapes(mask.shape, x.shape) == x.shape
    except RuntimeError:
        return False


@dataclass
class EtaDDIM(Solver):
    """DDIM whose ``eta`` is linear in the step's start time and scaled by a region ``mask`` (module
    docstring): ``eta(t) = eta[0] + (eta[1] - eta[0]) (t - t_min) / (t_max - t_min)``, times ``mask``
    (``None``: 1) element by element. One network evaluation per step; ``eta = (e, e)`` without a mask is
    ``DDIM(eta=e)``.

    Args:
        eta: ``(eta at the clean end t_min, eta at the noise end t_max)``, numbers ``>= 0`` (default the
            paper's ``(0, 0.4)``).
        mask: ``None`` or a tensor of values in ``[0, 1]`` broadcastable to the batch ``(batch, *shape)``;
            left out of ``==`` (the noise maps of :func:`eta_invert` do not depend on it).
    """

    name: ClassVar[str] = "eta_ddim"
    picard: ClassVar[str | None] = "step"

    eta: tuple[float, float] = (0.0, 0.4)
    mask: Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eta = _eta_pair("EtaDDIM", self.eta)
        self.mask = _mask("EtaDDIM", self.mask)
        # read on the host once here, not at every step (a device sync per step for a CUDA mask)
        self._any_noise = max(self.eta) > 0 and (self.mask is None or bool(self.mask.gt(0).any()))
        self._mask_on: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # the mask on a batch's device

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self._any_noise

    def eta_at(self, grid: Grid, t: float) -> float:
        """``eta(t)`` on ``grid``'s process, before the mask (``t`` clamped to ``[t_min, t_max]``)."""
        proc = grid.process
        u = min(max((t - proc.t_min) / (proc.t_max - proc.t_min), 0.0), 1.0)
        return (1.0 - u) * self.eta[0] + u * self.eta[1]

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        a_next, sigma_next = grid.alpha[i + 1], grid.sigma[i + 1]
        eta = self.eta_at(grid, grid.t[i])
        if eta == 0 or sigma_next == 0 or not self.stochastic:
            return pred.renoise(a_next, sigma_next)
        sigma_det, c = ancestral_split(grid, i, eta)
        if self.mask is None:
            return Transition(pred.renoise(a_next, sigma_det), c)
        if not _broadcasts(self.mask, x):
            raise ValueError(
                f"EtaDDIM: mask of shape {tuple(self.mask.shape)} must broadcast to the batch's shape "
                f"{tuple(x.shape)}"
            )
        mask = self.mask
        on = kept(
            self._mask_on,
            (x.device, x.dtype),
            lambda: host_to(mask, x.device, x.dtype) if mask.is_cpu else mask.to(x.device, x.dtype),
        )
        cm = (c * on).expand_as(x)
        return Transition(a_next * pred.x0 + (sigma_next**2 - cm**2).clamp_min(0).sqrt() * pred.eps, cm)


@dataclass
class EtaNoise(EditNoise):
    """The result of :func:`eta_invert`, an :class:`~steerdiff.ddpm_inversion.EditNoise` whose ``xs`` are the
    DDIM inversion's states (``xs[0] = x_T``, ``xs[N] = x_0``: the source branch, exact), ``z`` the chosen
    draws, ``solver`` the :class:`EtaDDIM` they belong to and ``nfe`` the inversion's and the source
    branch's evaluations (``2 N`` times the denoisers' cost). Unlike :func:`ddpm_invert`'s maps these do not
    bring ``sample`` under the source condition back to ``x_0`` (module docstring);
    ``sd.sample(target, **inv.sample_kwargs(skip), **cond)`` is the edit."""


def eta_invert(
    den: Denoiser,
    x_0: Tensor,
    steps: int | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    eta: tuple[float, float] = (0.0, 0.4),
    mask: Tensor | None = None,
    candidates: int = 10,
    source: Denoiser | None = None,
    generator: Generators = None,
    progress: bool = False,
    **cond: Any,
) -> EtaNoise:
    """Eta Inversion of ``x_0`` (module docstring): its DDIM inversion on the grid of
    ``sample(den, x_T, steps, schedule=schedule, final="none")`` and, for every step, the one of
    ``candidates`` normal draws nearest to the noise that keeps the source branch of an :class:`EtaDDIM`
    edit on the inversion.

    ``sd.sample(target, **inv.sample_kwargs(), **target_cond)`` is the edit (``inv.sample_kwargs(skip)``
    from node ``skip`` on).

    Args:
        den: the :class:`~steerdiff.denoiser.Denoiser` to invert with (the authors: classifier-free guidance
            at scale 1, the source prompt); not one that draws noise itself.
        x_0: the clean samples, shape ``(batch, ...)``, taken as the state at the grid's last node.
        steps: number of steps ``N``; default (``None``) the paper's 50, or ``len(times) - 1`` for explicit
            times (a ``steps`` that disagrees with them is refused).
        schedule: as :func:`~steerdiff.sample`'s; its ``steps + 1`` nodes.
        eta: ``(eta at the clean end, eta at the noise end)`` of :class:`EtaDDIM` (default the paper's
            ``(0, 0.4)``).
        mask: the region (:class:`EtaDDIM`): ``None`` or values in ``[0, 1]`` broadcastable to ``x_0``.
        candidates: draws per step and row ``K >= 1`` (the authors' ``noise_sample_count``, 10).
        source: the denoiser of the edit's source branch, whose steps the draws are chosen for (default
            ``den``; the authors': guidance at the edit's scale, 7.5, with the source prompt).
        generator: where the candidates are drawn from: ``None``, a ``torch.Generator`` or one per batch row
            (row ``b``'s maps then depend only on ``generator[b]``).
        progress: show a tqdm bar.
        **cond: passed to the network on every call (the source condition).

    Raises:
        ValueError: bad arguments (the message names the argument and what is accepted).
        NonFiniteError: the network returned NaN/inf, the DDIM inversion diverged (:func:`steerdiff.invert`'s
            guard), or the source branch's step from the inversion's state did: its mean beyond
            :func:`~steerdiff.solvers.base.state_bound` at the node it reaches (``D`` of ``x_0``).
    """
    who = "eta_invert"
    check_denoiser(who, "den", den)
    size = check_x_T(den, x_0, who, "x_0")
    src = den if source is None else source
    if source is not None:
        check_denoiser(who, "source", source)
        if source.process != den.process:
            raise ValueError(
                f"{who}: source has process {source.process!r} and den {den.process!r}: the source branch "
                "steps on the inversion's grid; pass a denoiser of den's process"
            )
    check_sample_only(
        who,
        cond,
        SAMPLE_ONLY,
        "which inverts with DDIM and chooses the noise of an EtaDDIM edit on the grid of sample(..., "
        "final='none'); accepted: den, x_0, steps, schedule, eta, mask, candidates, source, generator, "
        "progress and the net's conditions (**cond)",
    )
    sched = _schedules.get(schedule, who)
    steps = count_steps(who, steps, sched, "none", 50, only=who, process=den.process)
    K = integer(who, "candidates", candidates, lo=1)
    progress = boolean(who, "progress", progress)
    slv = EtaDDIM(eta=_eta_pair(who, eta), mask=_mask(who, mask))
    if mask is not None and not _broadcasts(mask, x_0):
        raise ValueError(
            f"{who}: mask of shape {tuple(mask.shape)} must broadcast to x_0's shape {tuple(x_0.shape)}"
        )
    generator = check_generators(who, generator, len(x_0))
    ups = [x_0.to(work_dtype(x_0.dtype))]
    _, info = invert_as(
        who,
        den,
        x_0,
        steps,
        "ddim",
        schedule,
        callback=lambda step: ups.append(step["x"]),
        progress=progress,
        return_info=True,
        **cond,
    )
    xs = ups[::-1]
    xs[0] = xs[0].to(x_0.dtype).to(xs[0].dtype)  # sample_kwargs hands x_T over in x_0's dtype
    grid = make_grid(den.process, sched, steps, "none", only=who)
    unmasked = replace(slv, mask=None)
    model = Model(src, cond, net_dtype=x_0.dtype, scale=size)
    # the divergence guard on the source branch's step from the inversion's state, at the node it reaches: its
    # mean (the chosen draw z_i, a standard normal, adds at most c_i <= sigma_{i+1} times it)
    name = "den" if source is None else "source"
    diverged = functools.partial(
        diverged_error,
        who=f"{who}: the source branch's step (EtaDDIM, {name})",
        fix=f"{name}'s guidance scale may be too large: try less"
        if src.guided
        else f"the steps are too long for {name}'s field: try more steps",
    )
    z: list[Tensor] = []
    indices = tqdm(range(steps), desc=who, leave=False) if progress else range(steps)
    for i in indices:
        out = unmasked.step(model, xs[i], i, grid, {})
        mean = out.mean if isinstance(out, Transition) else out
        model.note_state(mean, i, grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1], diverged)
        if not isinstance(out, Transition):  # eta(t_i) = 0: no noise at this step
            z.append(torch.zeros_like(xs[i]))
            continue
        best = (xs[i + 1] - out.mean) / out.std
        draws = torch.stack([randn(best.shape, generator, best.dtype, best.device) for _ in range(K)])
        dist = (draws - best).pow(2).flatten(2).mean(2)  # (candidates, batch)
        pick = dist.argmin(0)
        z.append(draws[pick, torch.arange(len(best), device=best.device)])
    model.check_finite()
    nfe = info.nfe + model.nfe
    log.debug("eta_invert %s: %d steps, %d candidates, %d NFE", tuple(x_0.shape), steps, K, nfe)
    return EtaNoise(xs, z, ReplayNoise(grid, z, slv), list(grid.t), slv, nfe, x_0.dtype)
