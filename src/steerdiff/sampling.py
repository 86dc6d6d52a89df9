"""The one entry point: :func:`sample` assembles a denoiser, a schedule and a solver."""

from __future__ import annotations

import bisect
import functools
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import mcmc as _mcmc
from . import schedules as _schedules
from . import solvers as _solvers
from ._checks import SAMPLE_DTYPES, boolean, caller, choice, integer
from ._ops import laid_out_as
from .denoiser import Denoiser, check_denoiser, check_sample_shape
from .mcmc.base import check_step_sizes
from .noise import NoiseSource, PerSampleNoise, ReplayNoise, check_rows, check_shared, make_noise
from .schedules import Schedule, ScheduleLike
from .solvers._poly import exp_adams_bashforth
from .solvers.base import (
    DEFAULT_STEPS,
    FINALS,
    Grid,
    Model,
    NonFiniteError,
    Solver,
    advance,
    count_steps,
    diverged_error,
    largest,
    make_grid,
    to_sample_dtype,
    work_dtype,
)
from .solvers.dpmpp import DPMSolverPPMultistep
from .solvers.unipc import UniPC

__all__ = [
    "SampleInfo",
    "check_foreign",
    "check_sample_only",
    "check_seeded",
    "check_x_T",
    "crossings",
    "default_solver",
    "diverged_step",
    "guided_corrector_max_h",
    "guided_max_h",
    "guided_solver",
    "plan",
    "run_grid",
    "sample",
    "sample_as",
]

log = logging.getLogger(__name__)

DEFAULT_SOLVER = "unipc"  # UniPC-3 (bh2, corrector), long steps after short ones at first order
# from here on guided denoisers get UniPC-2: the same predictor, corrected (steerdiff bench guided:
# ahead of the guided 2M in all 54 cases from 15 steps), long steps first order; below, where the grid
# is short enough (guided_solver)
GUIDED_CORRECTOR_FROM = 15
# the guided default: first order on steps longer than 0.8 in log-SNR from CFG scale 7.5 up, longer ones
# below (guided_max_h; steerdiff bench guided)
GUIDED_MAX_H, GUIDED_MAX_H_SCALE = 0.8, 7.5
DEFAULT_SCHEDULE = "karras_capped"
DEFAULT_CORRECTOR_STEPS, DEFAULT_SNR = 1, 0.16


@dataclass
class SampleInfo:
    """What a run cost and where it went: exact network evaluations (corrector moves included), the
    grid used, and one :class:`~steerdiff.mcmc.ChainInfo` per corrected node (acceptance rates)."""

    nfe: int
    grid: Grid
    solver: Solver
    schedule: Schedule
    corrector: list[_mcmc.ChainInfo] = field(default_factory=list)


def guided_max_h(scale: float | None) -> float:
    """The longest step (in log-SNR) the guided default predicts at second order (its DPM-Solver++(2M)
    below :data:`GUIDED_CORRECTOR_FROM` steps, its UniPC-2 from there), for classifier-free guidance at
    ``scale`` (``None``: unknown, or a guided denoiser that is not CFG): :data:`GUIDED_MAX_H` from
    :data:`GUIDED_MAX_H_SCALE` up and for ``None``, ``GUIDED_MAX_H sqrt((GUIDED_MAX_H_SCALE - 1) /
    (scale - 1))`` below, no limit from scale 1 down (nothing is guided there): 0.8 at 7.5, 1.18 at 4,
    2.04 at 2.

    The stiffness the guidance adds grows with ``scale - 1`` (:mod:`steerdiff.solvers.dpmpp`), so the
    step 2M tolerates shrinks with it; the square root is measured, not derived. ``steerdiff bench
    guided`` (docs/bench/guided.txt: CFG toward two components of the 16-d and 64-d default mixtures
    under nine processes, 2 x 256 samples against the 800-step guided ODE; 3-12 steps, 63 cases per
    scale): at scale 2 the limit keeps plain 2M (the same result in 56 cases, at most 1.18x worse in
    the other 7, all at 3 steps) and beats a flat 0.8 in 51, worse in 3 (geometric mean of the ratio
    0.89; the 64-d mixture under SD betas at 10 steps 1.48e-2 against 2.24e-2); at 4 it is slightly
    ahead of the flat 0.8 (better in 38, worse in 5, geometric mean 0.95) and, like it, ends within 0.68
    of the guided ODE where plain 2M ends up to 1.5 away; from 7.5 up it is the flat 0.8. At 5 steps
    every step of the default grid under SD and DDPM betas is longer than 0.8 (the bench's flat-0.8
    column is DDIM's there): on the digits model at scale 2 (``steerdiff bench solvers --model digits``,
    docs/bench/digits_solvers.txt) that is 0.153 against the default's 0.117 (UniPC-2 there; 2M with this
    limit 0.090, docs/bench/guided_validation.txt).
    """
    if scale is None or scale >= GUIDED_MAX_H_SCALE:
        return GUIDED_MAX_H
    if scale <= 1:
        return math.inf
    return GUIDED_MAX_H * math.sqrt((GUIDED_MAX_H_SCALE - 1) / (scale - 1))


def _unipc2_stiffness_limit(h: float) -> float:
    """The largest ``G`` for which UniPC-2 (UniP-2 bh2, i.e. 2M, then UniC-2) with equal steps ``h`` is
    stable on the linear test of :mod:`steerdiff.solvers.dpmpp` (the denoised estimate responds to
    ``u = x / alpha`` with gain ``-G``).

    The state ``(u^c_i, m_i, m_{i-1})`` (``m_i = -G u^p_i``, evaluated at the *predicted* ``u``) maps
    to the next by a matrix affine in ``G`` with a rank-one ``G`` part, and the boundary is its eigenvalue
    ``-1`` (checked against the spectral radius on a grid of ``h`` and ``G``):
    ``G = (1 + E) / [E (c_+ - c_0 + c_-) + (1 + E)(a_0 - a_1)]``, ``E = e^{-h}``, with the predictor's
    weights ``a_0, a_1 = (1 - E)(3/2, -1/2)`` and the corrector's ``c_+, c_0, c_-`` of ``m_{i+1}, m_i,
    m_{i-1}`` (the exponential integral of their quadratic). About ``6 / (11 h)`` for short steps, 6/11
    of 2M's ``(1 + E) / (2 (1 - E))``; 0.94 at ``h = 0.8`` against 2M's 1.32.
    """
    e = math.exp(-h)
    a0, a1 = 1.5 * (1 - e), -0.5 * (1 - e)  # UniP-2 bh2 with equal steps: 2M
    c0, c_, cp = (h * w for w in exp_adams_bashforth([0.0, -1.0, 1.0], -h))
    return (1 + e) / (e * (cp - c0 + c_) + (1 + e) * (a0 - a1))


@functools.lru_cache(maxsize=64)  # a bisection (0.5 ms); sd.sample asks it on every guided run
def guided_corrector_max_h(scale: float | None) -> float:
    """The longest step (in log-SNR) the guided default's UniPC-2 predicts at second order below
    :data:`GUIDED_CORRECTOR_FROM` steps, for classifier-free guidance at ``scale`` (``None`` as in
    :func:`guided_max_h`): the step at which UniPC-2's stability limit on the linear test
    (:func:`_unipc2_stiffness_limit`) equals 2M's at :func:`guided_max_h`, i.e. the stiffness ``G`` that
    2M's measured limit implies, ``(1 + e^{-h_2}) / (2 (1 - e^{-h_2}))``: 0.51 at 7.5 (against 0.8),
    0.79 at 4 (1.18), 1.49 at 2 (2.04); no limit from scale 1 down. Derived, not fitted: ``steerdiff
    bench guided`` never tuned it.
    """
    h2 = guided_max_h(scale)
    if math.isinf(h2):
        return math.inf
    target = (1 + math.exp(-h2)) / (2 * -math.expm1(-h2))
    lo, hi = 1e-3, h2  # the limit falls with h, and lies below 2M's at every h
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _unipc2_stiffness_limit(mid) >= target else (lo, mid)
    return lo


def guided_solver(steps: int, scale: float | None = None, grid: Grid | None = None) -> Solver:
    """The default for a guided denoiser at ``steps`` steps on ``grid``: UniPC-2 (bh2) from
    :data:`GUIDED_CORRECTOR_FROM` steps on, every step longer than :func:`guided_max_h` of the
    classifier-free guidance ``scale`` in log-SNR predicted at first order. Below, DPM-Solver++(2M) -- the
    same predictor without the corrector -- with those steps taken at first order (DDIM;
    ``DPMSolverPPMultistep(max_h=...)``, :mod:`steerdiff.solvers.dpmpp`); but where every noisy step of
    ``grid`` after the first is within that limit (so 2M would take them all at second order), UniPC-2
    with the steps longer than :func:`guided_corrector_max_h` predicted at first order (and corrected).
    Without ``grid`` (a caller that has none) the rule below :data:`GUIDED_CORRECTOR_FROM` is 2M's. So
    no step longer than :func:`guided_max_h` is ever predicted at second order.

    High-order multistep solvers are unstable under large guidance scales; Lu et al. 2022b
    ("DPM-Solver++", Sec. 5) recommend the second-order multistep solver for guided sampling, and
    diffusers' multistep schedulers default to order 2 for it. UniPC's corrector (Zhao et al. 2023)
    then raises the order by one for no extra evaluation, but with long steps it destabilizes guided
    runs too (diffusers' ``disable_corrector`` exists for the same reason): on the linear test its
    stable stiffness is 0.55-0.71 of 2M's at the same step up to 0.8 (0.82 at 1.49;
    :func:`_unipc2_stiffness_limit`). Measured by
    ``steerdiff bench guided`` (docs/bench/guided.txt; classifier-free guidance toward two components
    of the 16-d default mixture under SD, DDPM and zero-terminal-SNR betas, EDM and rectified flow, and
    of the 64-d one under SD, DDPM and zero-terminal-SNR betas and rectified flow; 2 x 256 samples
    against the guided ODE solved in 800 steps; scales 2 / 4 / 7.5): from 15 steps UniPC-2 is ahead of
    2M (with its limit) in all 18 cases per scale (geometric mean of the ratio 0.18 / 0.29 / 0.28) and
    of UniPC-3 in 8 / 16 / 17 of them (geometric mean 1.05 / 0.080 / 0.0080: level at scale 2), which
    ends more than 1 from the guided ODE in 5 of them at scale 4 and 11 at 7.5. Below 15 steps UniPC-2
    without limits ends more than 1 away in 0 / 3 / 43 of 63 cases, 2M with its limit in 0 / 0 / 9; the
    grid rule keeps 2M's 0 / 0 / 9 and takes the error to 0.555 / 0.67 / 0.99 of 2M's in geometric mean
    (3-12 steps on ``karras_capped``; at 7.5 it acts only at 12 steps under SD betas: 0.60x on the 16-d
    mixture, 1.17x on the 64-d one).

    On other data (``steerdiff bench guided --validate``, docs/bench/guided_validation.txt: the same
    problems from other ``x_T``, the digits model, the schedules ``logsnr_uniform``, ``karras``,
    ``linspace``, ``trailing``, ``leading``; 3-30 steps; ratio to the default before these rules, 2M
    with its limit below 15 steps and UniPC-2 without one from there, geometric mean; cases more than 1
    away, before / now): below 15 steps 0.926 over 1,338 cases, 153 / 152, none new (the worst 3.5x:
    the 64-d mixture under SD betas on ``karras`` at scale 4 and 12 steps); from 15 steps 0.892 over 762,
    26 / 7, none new (the worst 3.35x: the 64-d mixture under zero-terminal-SNR betas on ``logsnr_uniform``
    at scale 7.5 and 15 steps, 0.171 against 0.051). From 15 steps the limit hardly acts on
    ``karras_capped`` (1.000 on the other ``x_T``, 1.01 on the digits model) but does where a grid's long
    steps come after short ones: ``karras`` puts steps up to 2.7 at the low-noise end under rectified
    flow, EDM and zero-terminal-SNR betas, where UniPC-2 without it diverged (the 16-d mixture under
    rectified flow at scale 7.5 and 15 steps: 10.4 against 0.23 now). That rule was chosen among three
    (this limit, :func:`guided_corrector_max_h` at every step, the fallback to 2M of the rule below 15) on
    those sets; on ``x_T`` it was not chosen on (seeds 200-201, ``karras`` and ``logsnr_uniform``) it gives
    0.834 over 216 cases from 15 steps, 14 / 5 more than 1 away, the worst 1.99x. Of the 5 left, three are
    UniPC-2's own, on ``logsnr_uniform``: equal steps within the limit but above
    :func:`guided_corrector_max_h`, at scale 7.5 (the 16-d mixture under DDPM betas at 15 steps, under
    zero-terminal-SNR betas and rectified flow at 20: 2.5 / 1.2 / 2.8 from the guided ODE, unchanged);
    two are the 16-d mixture under zero-terminal-SNR betas on ``karras`` at 15 and 25 steps (1.08 and
    1.06, were 11.3 and 3.2).

    Plain 2M diverges under strong guidance at few steps too (the step's stability bound is in
    :mod:`steerdiff.solvers.dpmpp`). At scale 7.5 at 3-8 steps (45 cases) plain 2M ends more than 1
    (relative) from the guided ODE in 31, up to 19 (the 64-d mixture under SD betas, 4 steps); with
    first-order steps above h = 0.8 in 9, all on the 16-d mixture at 3-4 steps, where the default is
    DDIM (every step is longer; the worst 2.6, SD betas at 3 steps); at 10-12 steps the default is
    0.17-1.20x plain 2M's error (geometric mean 0.91; the 1.20 is the 64-d mixture under SD betas at 10
    steps, where it takes the long steps at first order). At scale 4 the limit's worst is 0.68 (plain
    2M 1.5). A flat 0.8 would cost mild guidance (scale 2, 3-12 steps: 2.22x the best candidate's error
    in geometric mean against 1.97x for :func:`guided_max_h`, under which scale 2 keeps 2M's second
    order).
    """
    steps = integer("guided_solver", "steps", steps, lo=1)
    max_h = guided_max_h(scale)
    if steps >= GUIDED_CORRECTOR_FROM:
        return UniPC(order=2, max_h=max_h, max_h_ratio=0.0)
    if grid is not None:
        noisy = grid.steps - 1 if grid.clean_end else grid.steps
        if all(grid.h(i) <= max_h for i in range(1, noisy)):
            return UniPC(order=2, max_h=guided_corrector_max_h(scale), max_h_ratio=0.0)
    return DPMSolverPPMultistep(order=2, max_h=max_h, max_h_ratio=0.0)


def default_solver(den: Denoiser, steps: int, grid: Grid | None = None) -> Solver:
    """The solver :func:`sample` takes when none is given: :data:`DEFAULT_SOLVER` (UniPC-3, bh2,
    with corrector), which predicts at first order on any step longer than
    :data:`~steerdiff.solvers.base.ODE_MAX_H` in log-SNR and than
    :data:`~steerdiff.solvers.base.ODE_MAX_H_RATIO` times the step before; or where ``den.guided``
    (the wrappers of :mod:`steerdiff.guidance`) :func:`guided_solver` at ``steps``,
    ``den.guidance_scale`` and ``grid`` (the grid the run takes; :func:`sample` passes it).

    The long-step rule never acts on the default schedule (``karras_capped``: each step is at most 1.4 times
    the one before, on VP, VE, EDM and flow processes at 2-200 steps), nor on ``logsnr_uniform`` or on
    ``karras`` from 5 steps. It is for grids that end with a long step after short ones -- ``linspace`` (to
    t = 0), ``leading``, ``time_uniform`` (the last noisy step 3.4-13 times the one before) -- where
    extrapolating the cubic through the closely spaced estimates over the long step amplifies their
    errors. ``steerdiff bench longstep`` (docs/bench/longstep.txt; 16-d default mixture, 256 samples
    against the exact ODE; SD, DDPM and zero-terminal-SNR betas, VP cosine, EDM, rectified flow; every
    schedule at 3-50 steps): for UniPC-3 the rule changes 188 cases, better in 178 (DDPM betas' linspace at
    20 steps 0.49 -> 0.043, EDM's time_uniform at 50 steps 11.8 -> 0.36), worse in 10, by at most 1.43x
    (EDM's time_uniform at 3-10 steps, karras at 3-4 steps on EDM, flow and zero-terminal-SNR betas;
    laplace at 30 steps on zero-terminal-SNR betas 1.08x).
    diffusers' UniPC escapes these grids another way, lowering the order of the last steps at every step count
    (ours, like DPM-Solver++, only below 15 steps; :func:`~steerdiff.solvers.base.step_order`).
    """
    if den.guided:
        return guided_solver(steps, den.guidance_scale, grid)
    return _solvers.get(DEFAULT_SOLVER)


def check_seeded(den: Denoiser, generator: object, who: str | None = None) -> None:
    """Raise a ``ValueError`` naming ``generator`` (after ``who:``, the caller, where given) when a
    seeded run would not be reproducible as asked (the parts of ``den`` that draw noise themselves:
    :meth:`~steerdiff.denoiser.Denoiser.own_noise`): with ``generator`` given, a part drawing from
    torch's global RNG, which the seed does not reach; with one generator per row (a list), also a
    part that draws the whole batch from one generator of its own, which makes every row depend on
    the batch (:func:`~steerdiff.noise.check_shared`)."""
    own = den.own_noise()
    parts = [name for name, g in own if g is None] if generator is not None else []
    prefix = caller(who)
    if parts:
        raise ValueError(
            f"{prefix}generator: {', '.join(dict.fromkeys(parts))} in the denoiser draws noise from torch's "
            "global RNG, which generator= does not reach, so the run would not be reproducible by its "
            "seed; give it a generator of its own (e.g. RePaint(..., generator=g2), CADS(..., "
            "generator=g2)) or pass generator=None"
        )
    check_shared(
        generator,
        [name for name, g in own if isinstance(g, torch.Generator)],
        "give it one generator per row of its batch too (e.g. RePaint(..., generator=[g2_0, g2_1, ...]); "
        "under a particle method one per particle, batch-major) or pass one generator",
        who,
    )


def check_sample_only(who: str, cond: dict[str, Any], names: Sequence[str], why: str) -> None:
    """Raise a ``ValueError`` naming the keyword arguments of :func:`sample` among ``names`` -- those the
    entry point ``who`` has none of -- that its ``**cond`` holds: they would reach the net as conditions (a
    ``TypeError`` inside it, or nothing at all for a net that takes ``**kwargs``). ``why`` ends the message
    (what ``who`` does instead, what it accepts)."""
    if given := [name for name in names if name in cond]:
        are = "is an argument" if len(given) == 1 else "are arguments"
        raise ValueError(f"{who}: {', '.join(given)} {are} of sample, not of {who}, {why}")


# diffusers' and k-diffusion's names for sample's arguments: in **cond they would reach the net as conditions
# (a TypeError deep inside it, or a silently ignored keyword and the default steps / grid)
FOREIGN = {
    "num_inference_steps": "steps= (the number of steps)",
    "sigmas": (
        "schedule= (a list of process times is a grid, whose count is the steps: under sd.EDM, whose times "
        "are its sigmas, k-diffusion's sigmas ending in 0 are sample(den, x_T, schedule=sigmas[:-1]))"
    ),
}


def check_foreign(who: str, cond: dict[str, Any]) -> None:
    """Raise a ``ValueError`` for a keyword of diffusers' or k-diffusion's samplers (:data:`FOREIGN`) in
    ``**cond``, naming the argument of :func:`sample` that takes its place."""
    for name, ours in FOREIGN.items():
        if name in cond:
            raise ValueError(
                f"{who}: {name} is not an argument here (in **cond it would reach the net as a condition); "
                f"use {ours}"
            )


def check_x_T(den: Denoiser, x_T: Tensor, who: str | None = None, name: str = "x_T") -> float:
    """Raise a ``ValueError`` naming ``x_T`` (``name``: another argument, such as ``x_0`` of
    :func:`~steerdiff.inversion.invert`; after ``who:``, the caller, where given) unless it is a finite,
    batched float tensor of den's shape. Returns its largest ``|entry|`` (0 for an empty batch), read in the
    same host read as the finiteness: the run's scale for the divergence guard
    (:meth:`~steerdiff.solvers.base.Model.note_state`)."""
    p = caller(who) + name
    if not isinstance(x_T, Tensor):
        raise ValueError(f"{p} must be a torch.Tensor, got {type(x_T).__name__}")
    if x_T.dtype not in SAMPLE_DTYPES:
        raise ValueError(
            f"{p} must have a floating dtype (float16/bfloat16/float32/float64), got {x_T.dtype}"
        )
    if x_T.ndim < 2:
        raise ValueError(f"{p} must be batched, shape (batch, *sample_shape); got {tuple(x_T.shape)}")
    size = float(largest(x_T)) if x_T.numel() else 0.0  # NaN where an entry is
    if not math.isfinite(size):
        raise ValueError(f"{p} contains NaN or inf")
    check_sample_shape(p, den, tuple(x_T.shape[1:]))
    return size


def _is_default(value: object, default: float) -> bool:
    """Whether ``value`` is the number ``default``, a Python or numpy scalar (never a tensor or string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == default


def check_unused_corrector_args(
    who: str, kernel: _mcmc.Kernel | None, corrector_steps: object, snr: object
) -> None:
    """Refuse a ``corrector_steps`` / ``snr`` other than the default where it would be silently ignored
    (a ``ValueError`` naming ``who``): both without a corrector, ``snr`` with a kernel that has its own
    ``step_size``."""
    if kernel is None:
        for name, value, default in (
            ("corrector_steps", corrector_steps, DEFAULT_CORRECTOR_STEPS),
            ("snr", snr, DEFAULT_SNR),
        ):
            if not _is_default(value, default):
                raise ValueError(
                    f"{who}: {name} has no effect without corrector=... (one of {_mcmc.available()} or a "
                    f"steerdiff.mcmc.Kernel), got {name}={value!r}"
                )
    elif kernel.step_size is not None and not _is_default(snr, DEFAULT_SNR):
        raise ValueError(
            f"{who}: snr has no effect with a corrector that has a step_size "
            f"({type(kernel).__name__}(step_size={kernel.step_size!r})), got snr={snr!r}"
        )


@overload
def sample(
    den: Denoiser,
    x_T: Tensor,
    steps: int | None = ...,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    final: str = ...,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = ...,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    corrector: str | _mcmc.Kernel | None = ...,
    corrector_steps: int = ...,
    snr: float = ...,
    progress: bool = ...,
    return_info: Literal[False] = ...,
    **cond: Any,
) -> Tensor: ...


@overload
def sample(
    den: Denoiser,
    x_T: Tensor,
    steps: int | None = ...,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    final: str = ...,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = ...,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    corrector: str | _mcmc.Kernel | None = ...,
    corrector_steps: int = ...,
    snr: float = ...,
    progress: bool = ...,
    return_info: Literal[True],
    **cond: Any,
) -> tuple[Tensor, SampleInfo]: ...


@overload
def sample(
    den: Denoiser,
    x_T: Tensor,
    steps: int | None = ...,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    final: str = ...,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = ...,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    corrector: str | _mcmc.Kernel | None = ...,
    corrector_steps: int = ...,
    snr: float = ...,
    progress: bool = ...,
    return_info: bool,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]: ...


def sample(
    den: Denoiser,
    x_T: Tensor,
    steps: int | None = None,
    solver: str | Solver | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    final: str = "zero",
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    corrector: str | _mcmc.Kernel | None = None,
    corrector_steps: int = DEFAULT_CORRECTOR_STEPS,
    snr: float = DEFAULT_SNR,
    progress: bool = False,
    return_info: bool = False,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Sample ``den`` from the initial noise ``x_T`` in ``steps`` steps.

    Args:
        den: the :class:`~steerdiff.denoiser.Denoiser` (guided denoisers included).
        x_T: initial noise at the schedule's first time, as a diffusers pipeline draws it
            (standard normal for VP and rectified flow; ``sigma_max``-scaled for VE/EDM: the first node
            of every built-in schedule but ``leading`` is ``t_max``), shape ``(batch, ...)``.
            The result has its dtype and memory layout (``channels_last`` stays so, whatever the net
            returns). For float16/bfloat16 the solver state and arithmetic are
            float32 and only the net runs in ``x_T``'s dtype (as diffusers' schedulers upcast in
            ``step``; see :func:`~steerdiff.solvers.base.work_dtype`).
        steps: number of steps ``N`` (grid intervals); default (``None``) 10, or for an explicit grid
            (``schedule`` a list of ``m`` times) its count, ``m`` with ``final="zero"`` (its nodes, then the
            clean state), ``m - 1`` with ``final="none"``; a ``steps`` that disagrees with it is refused
            (:func:`~steerdiff.solvers.base.count_steps`). NFE is counted (``SampleInfo.nfe``); for the
            built-in solvers without a corrector or guidance it is
            ``solver.nfe(N, clean_end=final == "zero")`` (a staged solver such as Heun spends one
            evaluation more with ``final="none"``).
        solver: a name from :func:`steerdiff.solvers.available` or a Solver instance; default
            (``None``) :func:`default_solver`: UniPC-3 (bh2, with corrector), the most accurate on
            the exact benchmark, at first order on a long step after short ones; or for a guided
            ``den`` :func:`guided_solver`: DPM-Solver++(2M) below 15 steps (its long steps at first
            order, by ``den.guidance_scale``) or UniPC-2 where every step is short enough, UniPC-2 from
            15 on.
            Any solver that keeps a history (multistep) restarts it, warming up again at lower order, after a
            corrector's moves and after a step across a time where ``den``'s field jumps
            (:meth:`~steerdiff.denoiser.Denoiser.breaks`: RF-Inversion's editing window, not CFG's
            ``interval``; :func:`crossings`), so that it never extrapolates estimates from one side of the
            jump into the other.
        schedule: a name from :func:`steerdiff.schedules.available`, a Schedule instance or the
            nodes' process times (a list, array or tensor: :class:`~steerdiff.schedules.Custom`);
            default ``"karras_capped"`` (Karras nodes from at most ``sigma/alpha = 30``, entered
            from ``t_max`` in ``1 + steps // 50`` steps; below 15 steps the last node gives way to
            the final jump and the nodes end at ``sigma/alpha = 0.03`` at the lowest;
            :class:`~steerdiff.schedules.KarrasCapped`).
        final: ``"zero"`` (default): ``steps`` schedule nodes, then the step to the clean state
            ``sigma = 0``, which returns the denoised estimate at the last node;
            ``"none"``: ``steps + 1`` nodes, the result is the noisy state at the last one. That is
            ``t_min`` for most schedules, not for the default's short grids (``karras_capped`` below 15
            nodes ends at ``sigma/alpha`` 0.07 at 10 steps on Stable Diffusion's betas, 0.029 at
            ``t_min``), which are nonetheless nearer the exact ODE solution at ``t_min`` than the whole
            ramp (``schedule="karras"``) is (a 4-component 8-d mixture, 256 samples, 5 / 10 steps:
            relative error 0.076 / 0.018 against 0.13 / 0.032; rectified flow 0.16 / 0.086 against 0.33
            / 0.50; ``tests/test_schedule_karras_jump.py``). Pass ``schedule="karras"`` to end at ``t_min``.
        generator: the only source of randomness (for stochastic solvers): a
            ``torch.Generator``, a list of them (one per sample: a sample is then the same
            whatever the batch), or a :class:`~steerdiff.noise.NoiseSource` such as
            :class:`~steerdiff.noise.BrownianTreeNoise` or the :class:`~steerdiff.noise.ReplayNoise` of
            :func:`~steerdiff.ddpm_inversion.ddpm_invert` (checked against the run's grid, solver and
            batch before the first step); ``None`` (default): torch's global RNG
            (reproducible after ``torch.manual_seed``, not per sample). Wrappers and corrector
            kernels that hold a generator of their own draw from it instead; with a list, theirs
            must be one per row too (a single one is refused, :func:`check_seeded`,
            :func:`~steerdiff.mcmc.check_corrector`).
            One exception to batch independence: a corrector without a ``step_size`` takes its step
            from ``snr`` with batch means (:func:`~steerdiff.mcmc.snr_step_size`), so there a sample
            depends on its batch; give the kernel a ``step_size`` for per-sample reproducibility.
        callback: called after every step with ``{"i", "t", "sigma", "x", "denoised", "nfe"}``
            (``x``: the solver state, float32 for a half-precision ``x_T``; ``denoised``: the x0
            estimate of the latest evaluation, as k-diffusion's callback has it, ``None`` while a
            custom solver has made none; ``t``: the process time of the node reached, ``t_min`` after
            the clean step of ``final="zero"``; ``sigma``:
            the process's ``sigma(t)`` at the node reached, 0 after the clean step of
            ``final="zero"``; k-diffusion's ``sigma / alpha`` is ``exp(-lam(t))``). Read-only: the
            tensors are the run's own, and what an in-place edit of ``x`` does depends on the solver
            (multistep solvers go on from it; UniPC's corrector redoes the step and drops most of
            it); to edit the state between steps, use a guidance wrapper or
            :class:`~steerdiff.integrations.diffusers.SteerdiffScheduler`, which takes edits.
        corrector: predictor-corrector sampling (Song et al. 2021): ``"ula"``, ``"mala"``,
            ``"hmc"`` or a :class:`~steerdiff.mcmc.Kernel`; after every predictor step into a
            noisy node, ``corrector_steps`` moves targeting ``p_t`` there (see
            :mod:`steerdiff.mcmc.corrector`; MALA/HMC need the kernel's ``log_prob``). Their
            evaluations count in the NFE; acceptance rates are in ``SampleInfo.corrector``.
        corrector_steps: corrector moves per node (an integer >= 1); only with a ``corrector``.
        snr: signal-to-noise ratio giving the Langevin step where the kernel has no ``step_size``
            (:func:`~steerdiff.mcmc.snr_step_size`: from the batch's mean score norm at each node);
            a finite number > 0, only with a ``corrector`` that has no ``step_size``.
        progress: show a tqdm bar.
        return_info: also return a :class:`SampleInfo`.
        **cond: passed to the network on every call (e.g. class labels).

    Raises:
        ValueError: bad arguments (the message names the argument and the accepted values).
        NonFiniteError: the network returned NaN/inf, or a corrector on its ``log_prob`` made it (the
            message names the step and time).
        FloatingPointError: a float16 ``x_T`` whose finite result overflows float16
            (:func:`~steerdiff.solvers.base.to_sample_dtype`).
    """
    return sample_as(
        "sample",
        den,
        x_T,
        steps,
        solver,
        schedule,
        final=final,
        generator=generator,
        callback=callback,
        corrector=corrector,
        corrector_steps=corrector_steps,
        snr=snr,
        progress=progress,
        return_info=return_info,
        **cond,
    )


def sample_as(
    who: str,
    /,
    den: Denoiser,
    x_T: Tensor,
    steps: int | None = None,
    solver: str | Solver | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    final: str = "zero",
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    corrector: str | _mcmc.Kernel | None = None,
    corrector_steps: int = DEFAULT_CORRECTOR_STEPS,
    snr: float = DEFAULT_SNR,
    progress: bool = False,
    return_info: bool = False,
    project: Callable[[Tensor], Tensor] | None = None,
    default_steps: int = DEFAULT_STEPS,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """:func:`sample` run by the entry point ``who`` (``rf_edit``, ``epsilon_norms``, ...), whose name its
    messages carry, as the checks' ``who`` (:mod:`steerdiff._checks`) does. ``project``: a map of the state
    applied after every step (:func:`run_grid`), :func:`~steerdiff.guidance.pcd_sample`'s alone: from any
    other entry point it came in the caller's keywords, and is refused (the others would sample unprojected
    steps or, as :func:`~steerdiff.adjoint.adjoint`, differentiate them). ``default_steps``: the steps of
    ``steps=None`` without an explicit grid (:func:`~steerdiff.solvers.base.count_steps`), other than 10 for
    ``pcd_sample`` alone (refused as ``project`` is from the others)."""
    if project is not None and who != "pcd_sample":
        raise ValueError(
            f"{who}: project is an argument of steerdiff.guidance.pcd_sample (the state projected after "
            f"every step), not of {who}"
        )
    if default_steps != DEFAULT_STEPS and who != "pcd_sample":
        raise ValueError(f"{who}: default_steps is not an argument of {who} (its steps=None are 10)")
    check_denoiser(who, "den", den)
    check_foreign(who, cond)
    size = check_x_T(den, x_T, who)
    check_seeded(den, generator, who)
    sched, grid, slv = plan(den, steps, solver, schedule, final, who, default_steps=default_steps)
    progress = boolean(who, "progress", progress)
    return_info = boolean(who, "return_info", return_info)
    if callback is not None and not callable(callback):
        raise ValueError(f"{who}: callback must be None or a callable(dict), got {type(callback).__name__}")
    if project is not None and not callable(project):
        raise ValueError(f"{who}: project must be a callable(x) -> x, got {type(project).__name__}")
    model = Model(den, cond, make_noise(generator, who), net_dtype=x_T.dtype, scale=size)
    if isinstance(model.noise, PerSampleNoise):  # checked whatever the solver, not only where it draws
        check_rows(model.noise.generators, len(x_T), who)
    if isinstance(model.noise, ReplayNoise):  # its grid, solver and batch: before the first step
        model.noise.check_run(who, slv, grid, x_T)
    kernel = None if corrector is None else _mcmc.get(corrector, who)
    check_unused_corrector_args(who, kernel, corrector_steps, snr)
    if kernel is not None:
        _mcmc.check_corrector(kernel, model.noise, corrector_steps, snr, len(x_T), who)
    x, chains = run_grid(
        slv,
        model,
        grid,
        x_T.to(work_dtype(x_T.dtype)),
        callback,
        progress,
        kernel,
        corrector_steps,
        snr,
        None if project is None else functools.partial(projected, who, project),
    )
    model.check_finite()  # first: a NaN from the model also makes the snr step sizes NaN
    check_step_sizes(chains)
    log.debug(
        "sampled %s with %s/%s: %d steps, %d NFE", tuple(x.shape), slv.name, sched, grid.steps, model.nfe
    )
    # x_T's layout whatever the net returns: a step mixing the state with a net output of another layout
    # takes either's, by the order of its operands
    x = laid_out_as(to_sample_dtype(who, x, x_T.dtype), x_T)
    if return_info:
        return x, SampleInfo(model.nfe, grid, slv, sched, chains)
    return x


def plan(
    den: Denoiser,
    steps: object,
    solver: str | Solver | None,
    schedule: ScheduleLike,
    final: object,
    who: str,
    accepted: Sequence[str] | None = None,
    *,
    default_steps: int | None = DEFAULT_STEPS,
) -> tuple[Schedule, Grid, Solver]:
    """The schedule, grid and solver :func:`sample` runs ``den`` with for its arguments ``steps`` (``None``:
    :func:`~steerdiff.solvers.base.count_steps`, an explicit grid's count or ``default_steps``, refused where
    that is ``None``), ``solver``
    (``None``: :func:`default_solver` on that grid), ``schedule`` and ``final``, each checked (a
    ``ValueError`` naming it after ``who``, the entry point; an unknown solver's lists ``accepted``, the
    entry point's names, default all)."""
    final = choice(who, "final", final, FINALS)
    sched = _schedules.get(schedule, who)
    steps = count_steps(who, steps, sched, final, default_steps, process=den.process)
    grid = make_grid(den.process, sched, steps, final, who=who)
    slv = _solvers.get(default_solver(den, steps, grid) if solver is None else solver, who, accepted)
    return sched, grid, slv


def diverged_step(slv: Solver, model: Model, who: str | None = None) -> Callable[..., NonFiniteError]:
    """The divergence guard's error (:func:`~steerdiff.solvers.base.diverged_error`) for a state that a step
    of ``slv`` on ``model`` took out of bounds, for :meth:`~steerdiff.solvers.base.Model.note_state`: naming
    ``who`` (default the solver) and what ``slv`` and ``model``'s denoiser have to blame (its noise, its order
    above 1, the guidance scale; else the steps' length)."""
    return functools.partial(
        diverged_error, who=who or f"the solver {slv.name!r}", fix=_solver_fix(slv, model)
    )


def _solver_fix(slv: Solver, model: Model) -> str:
    """What a diverged solver step's error suggests: the arguments most likely at fault."""
    what = ["its noise (eta, s_noise, ...)"] if slv.stochastic else []
    if slv.order > 1:
        what.append(f"its order ({slv.order})")
    if model.denoiser.guided:
        what.append("the guidance scale")
    if not what:
        return "the steps are too long for the model's field: try more steps"
    return f"{' or '.join(what)} may be too large for this grid: try less, or more steps"


def run_grid(
    slv: Solver,
    model: Model,
    grid: Grid,
    x: Tensor,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    kernel: _mcmc.Kernel | None = None,
    corrector_steps: int = DEFAULT_CORRECTOR_STEPS,
    snr: float = DEFAULT_SNR,
    project: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, list[_mcmc.ChainInfo]]:
    """``slv`` over every step of ``grid`` from ``x`` (in :func:`~steerdiff.solvers.base.work_dtype`): the
    loop of :func:`sample` (a sampling grid) and of :func:`~steerdiff.inversion.invert` (a
    :meth:`~steerdiff.solvers.base.Grid.reversed` one). After each step into a noisy node the ``kernel``'s
    corrector moves, if any; then ``x <- project(x)`` after every step, the clean one included (a move like
    a corrector's: the solver restarts its history, :meth:`~steerdiff.solvers.base.Solver.moved`); then
    ``callback`` (:func:`sample`'s ``callback``). After a step across a break of the denoiser's field
    (:func:`crossings`) the solver restarts its history too, as after a move. Returns the state and the
    corrector chains; the caller checks ``model`` for non-finite values (the correctors' moved states
    included: ``Model.note_move``), and for states that diverged: the state after each step, as each
    corrector move's, is bounded by :meth:`~steerdiff.solvers.base.Model.note_state` (the divergence guard,
    :func:`~steerdiff.solvers.base.state_bound`; no host read per step off the CPU)."""

    chains: list[_mcmc.ChainInfo] = []
    state = slv.init_state(grid)
    jumps = crossings(model.denoiser, grid)
    indices = tqdm(range(grid.steps), desc=type(slv).__name__, leave=False) if progress else range(grid.steps)
    diverged = diverged_step(slv, model)
    # a bounded step (Solver.bounded) of an unguided denoiser down the grid, the state unprojected, keeps
    # x/alpha within its last value and the net's x0: the guard reads the last state alone
    every = not (slv.bounded and not model.denoiser.guided and project is None and grid.t[-1] < grid.t[0])
    last = grid.steps - 1
    for i in indices:
        x = advance(slv.step(model, x, i, grid, state), model.noise, grid.t[i], grid.t[i + 1])
        if every or i == last:
            model.note_state(x, i, grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1], diverged)
        if kernel is not None and not grid.is_final_clean(i):
            x, chain = _mcmc.correct(
                kernel, model, x, grid.t[i + 1], grid.sigma[i + 1], i, corrector_steps, snr, grid.alpha[i + 1]
            )
            chains.append(chain)
            slv.moved(state)  # the next step starts from the moved x: estimates made before it are stale
        if project is not None:
            x = project(x)
            slv.moved(state)
        elif i in jumps:  # the next evaluation is across a jump of the field from the history's (crossings)
            slv.moved(state)
        if callback is not None:
            callback(
                {
                    "i": i,
                    "t": grid.t[i + 1],
                    "sigma": grid.sigma[i + 1],
                    "x": x,
                    "denoised": None if model.last is None else model.last.x0,
                    "nfe": model.nfe,
                }
            )
    return x, chains


def crossings(den: Denoiser | Sequence[float], grid: Grid) -> frozenset[int]:
    """The steps ``i`` of ``grid`` (the last excepted) after which :func:`run_grid` restarts the solver's
    history because ``den``'s field jumps between the evaluations at ``t_i`` and ``t_{i+1}``: a break ``b``
    of :meth:`~steerdiff.denoiser.Denoiser.breaks` (or of ``den``, a sequence of process times where a field
    jumps: a diffusers pipeline's, :class:`~steerdiff.integrations.diffusers.SteerdiffScheduler`'s
    ``breaks``) with ``min(t_i, t_{i+1}) <= b < max(t_i, t_{i+1})``
    (at a break the field is its less noisy side's), down a sampling grid or up an inversion's. Where a
    node sits on a break the field there is the piece's below it, so the restart comes after the step into
    it (down the grid) or out of it (up). A denoiser says so per step,
    :meth:`~steerdiff.denoiser.Denoiser.crosses` (that rule over its breaks, or its own where it evaluates
    its inner denoisers at other times: :class:`~steerdiff.guidance.TimeShift`'s window).

    Every loop that carries a solver's history over a grid restarts it there: :func:`run_grid`
    (:func:`sample`, :func:`~steerdiff.inversion.invert`), the particle engine
    (:func:`~steerdiff.smc.run_smc`), :func:`~steerdiff.paradigms`' Picard iterations, DC-Solver's ratio
    search (:func:`~steerdiff.solvers.dc_solver.search_ratios`) and
    :class:`~steerdiff.integrations.diffusers.SteerdiffScheduler` (its ``breaks``: the pipeline's field);
    :func:`~steerdiff.guidance.repaint_sample` (DDPM) and :func:`~steerdiff.ddpm_inversion.ddpm_invert`
    (refusing solvers that keep a history) carry none. One exception: the backward pass of
    :func:`~steerdiff.adjoint.adjoint` keeps its Adams history across a jump (its forward pass is
    :func:`sample`'s; see there).

    The next step then warms up as at the first node (:meth:`~steerdiff.solvers.base.Solver.moved`): a
    multistep solver (UniPC, DPM-Solver++ 2M/3M, DEIS, iPNDM, ...) would otherwise extrapolate the
    estimates of one side of the jump into the other (RF-Inversion's editing window,
    :class:`~steerdiff.rf_inversion.ControlledEditing`). The step across the jump itself is first order in
    any solver; a staged one (Heun) still mixes both sides inside it. ``python bench/breaks.py``
    (docs/bench/breaks.txt; exact piecewise ODEs of an 8-d mixture, 10-40 steps): on RF-Inversion's editing
    windows the multistep errors now fall with the steps in every series, to 0.12-0.16x of their error
    without the restart at 40 steps (geometric mean per solver), but 1.2-2.2x at 10, where the jump falls
    inside a long step. Under CFG's guidance interval (Kynkaenniemi et al. 2024) the restart would gain
    UniPC-3 0.74x but cost the guided default (2M, UniPC-2) 1.7x, its one-step history through the jump
    having averaged the two fields across it: CFG declares no break."""
    if isinstance(den, Denoiser):
        if not den.breaks():
            return frozenset()
        return frozenset(i for i in range(grid.steps - 1) if den.crosses(grid.t[i], grid.t[i + 1]))
    breaks = sorted(den)
    piece = [bisect.bisect_left(breaks, t) for t in grid.t]  # the k with b_{k-1} < t <= b_k
    return frozenset(i for i in range(grid.steps - 1) if piece[i] != piece[i + 1])


def projected(who: str, project: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``project(x)``, checked: a tensor of ``x``'s shape, dtype and device, else a ``ValueError`` naming
    ``project`` after ``who``, the entry point."""
    out = project(x)
    if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        got = (
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
            if isinstance(out, Tensor)
            else type(out).__name__
        )
        raise ValueError(
            f"{who}: project must return a tensor of the state's shape, dtype and device "
            f"({x.dtype} {tuple(x.shape)} on {x.device}), got {got}"
        )
    return out
