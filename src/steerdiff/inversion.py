r"""Deterministic inversion: the probability-flow ODE integrated *up* the noise levels, from a clean sample
to the initial noise that :func:`~steerdiff.sampling.sample` brings back to it.

The probability-flow ODE is a bijection between ``x`` at any two noise levels (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Sec. 4.3); DDIM inversion (Song, Meng & Ermon 2021, "Denoising Diffusion
Implicit Models", Sec. 4.3: Eq. 14 run from ``t`` to ``t + dt``) integrates it from the data to the noise,
the first step of image editing (null-text inversion, Mokady et al. 2023; prompt-to-prompt, Hertz et al.
2023). :func:`invert` takes the grid that ``sample(den, x_T, steps, solver, schedule, final="none")`` takes,
``t_0 > t_1 > ... > t_N`` (:func:`~steerdiff.solvers.base.make_grid`), reverses it
(:meth:`~steerdiff.solvers.base.Grid.reversed`: ``h = lam_{i+1} - lam_i < 0``) and runs the same solver
loop (:func:`~steerdiff.sampling.run_grid`) on it, starting from the clean sample ``x_0`` taken as the
state at ``t_N`` (``sigma_N / alpha_N`` is small but not 0: the state there is ``x_0`` only up to
``O(sigma_N)``, which is what diffusers' ``DPMSolverMultistepInverseScheduler`` and DDIM inversion do).
The exact answer is the ODE's solution from ``x_0`` at ``t_N`` to ``t_0``
(:meth:`steerdiff.toy.GaussianMixture.reference_ode` with ``t_start = t_N``, ``t_end = t_0``), and
``sample(den, invert(den, x_0, ...), ..., final="none")`` returns ``x_0`` up to both runs' solver error.

Every deterministic solver runs both ways: the exponential integrators in ``lam`` (``ddim``, ``dpmpp_2m`` /
``dpmpp_3m``, ``unipc``, ``deis``, ``dpm_solver``) are exact for their polynomial of the estimates whatever
the sign of ``h``, and the Adams-Bashforth methods in ``sigma / alpha`` (``euler``, ``heun``, ``lms``,
``ipndm``) for either sign of the step; the long-step rule (first order on a step much longer than the one
before, :func:`~steerdiff.solvers.base.step_order`) compares ``|h|``. A grid without a clean end has no
final jump, and ``lower_order_final`` lowers the order at the last (noisiest) steps, as diffusers' inverse
scheduler does. Stochastic solvers are refused: their reverse SDE has no deterministic inverse.

The multistep warm-up runs at the *clean* end up the grid: the first step is first order there, where the
flow moves fastest, and its local ``O(h^2)`` holds a third-order predictor to second order (as the same
warm-up, at the noise end, does sampling, by less: the flow is slower there). On the Gaussian oracle of
``tests/test_invert.py`` (a variance of 0.05 among its three) under SD's betas, ``logsnr_uniform`` at 40 /
80 / 160 / 320 steps: ``DEIS(order=3)`` 1.8e-4 / 4.4e-5 / 1.1e-5 / 2.6e-6 and ``dpmpp_3m`` 2.1e-4 / 4.5e-5
/ 1.1e-5 / 2.6e-6 (slope 2.0), against UniPC-3's noise form, the default, whose corrector makes its first
step second order, 1.9e-5 / 1.5e-6 / 1.1e-7 / 7.4e-9, and the singlestep ``DPMSolver(order=3)`` 1.6e-4 /
2.0e-5 / 2.1e-6 / 2.7e-7 (slope 3). Less active data keep the third order longer (the mixture's 2.8 at
40-320 steps, ``test_convergence_order``); diffusers' inverse schedulers share the warm-up (``dpmpp_2m``'s
parity).

What changes up the grid is which end of a step the exponential weight favours: the data form's
``e^{-(h-u)}`` and the noise form's ``e^{h-u}`` swap roles with the sign of ``h``. So DEIS, which
extrapolates ``eps``, takes long steps up the grid at first order (:mod:`steerdiff.solvers.deis`), UniPC's
noise form is the accurate one up the grid (:func:`default_inversion_solver`), and Heun keeps its trapezoid
in ``sigma / alpha`` (:func:`~steerdiff.solvers.edm.heun_update`). ``lms`` (Adams-Bashforth in
``s = sigma / alpha``) takes up the grid only the orders its step ratios allow: each step in ``s`` there is
about ``e^{|h|}`` times the one before, the variable-step weights grow with that ratio, and past 3 / 1.79 /
1.36 (orders 2 / 3 / 4) the method's parasitic roots outgrow the solution (to 4.1e4 at 20 ``karras_capped``
steps under rectified flow with order 4 throughout); :mod:`steerdiff.solvers.lms` keeps them at a quarter of
it. It is then no further from the exact answer than ``ddim`` in any of 172 cases (five processes, every
schedule, 5-40 steps; ``tests/test_invert.py`` checks 60 of them), but it reaches order 4 only where steps
grow by at most 2.7% (230 ``logsnr_uniform`` steps under SD's betas): on the 8-d mixture of the tests under
SD's betas, ``karras_capped``, 0.12 / 3.3e-2 at 10 / 20 steps against ``ddim``'s 0.13 / 7.6e-2 and
``dpmpp_3m``'s 1.7e-2 / 2.7e-3.

Two data forms have no rule up the grid and diverge where it has long steps: the singlestep ``dpm_solver``
(DPM-Solver++, whose macro-steps span the grid's nodes) and ``unipc`` (UniPC's data form, whose corrector
re-integrates each step); up the grid the data form's weight ``e^{-(h-u)}`` is largest, ``e^{|h|}``, at a
step's start, where they extrapolate. The noise form's restart after a long step, its remedy down the grid
(:mod:`steerdiff.solvers.unipc`), fixes ``unipc`` unguided but costs guided inversions their corrector. On
the 8-d mixture of the tests (16 samples) under SD's betas, with zero terminal SNR, rectified flow, EDM and
``VP.cosine``, every schedule that applies (43 grids), the error exceeds 1 at 5 / 10 / 20 / 40 steps on 23
/ 12 / 2 / 1 grids (``dpm_solver``) and 17 / 3 / 1 / 1 (``unipc``): under flow on ``karras`` at 5 steps
199 and 42; on EDM's ``time_uniform``, whose first step up goes from ``sigma`` = 0.002 to 16 at 5 steps,
neither converges (5 / 40 steps: 50 / 416 and 331 / 159; ``ddim`` 0.93 / 0.60). Their noise forms,
``DPMSolver(algorithm="dpmsolver")`` and ``UniPC(prediction="noise")`` (the default), stay below 1 there
(``tests/test_invert.py``).

diffusers' ``DDIMInverseScheduler`` is another algorithm: it moves the state from the node ``s`` to the next
noisier node ``t`` with the DDIM step but evaluates the net at ``(x_s, t)``, the *target*'s timestep (the
lagged inversion of null-text inversion's code), while ``invert(solver="ddim")``
evaluates it at ``(x_s, s)``, Euler's method for the ODE. Both are first order; they agree where the net's
``eps`` does not depend on ``t`` (``tests/test_invert.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, overload

from torch import Tensor

from . import schedules as _schedules
from . import solvers as _solvers
from ._checks import boolean
from ._ops import laid_out_as
from .denoiser import Denoiser, check_denoiser
from .sampling import DEFAULT_SCHEDULE, SampleInfo, check_sample_only, check_x_T, guided_solver, run_grid
from .schedules import ScheduleLike
from .solvers.base import Grid, Model, Solver, count_steps, make_grid, to_sample_dtype, work_dtype
from .solvers.unipc import UniPC

__all__ = ["SAMPLE_ONLY", "default_inversion_solver", "deterministic_solvers", "invert", "invert_as"]

log = logging.getLogger(__name__)

# sample's keyword arguments that invert has none of: given to invert they would reach the net as conditions
# (a TypeError inside it, or silently nothing where it takes **kwargs); sample keeps them from the net too
SAMPLE_ONLY = ("final", "generator", "corrector", "corrector_steps", "snr")


def default_inversion_solver(den: Denoiser, steps: int, grid: Grid) -> Solver:
    """The solver :func:`invert` takes when none is given, for ``steps`` steps up the sampling ``grid``.

    UniPC-3 (bh2, with corrector) in its noise form, ``UniPC(prediction="noise")``: UniPC's ``h -> -h``
    duality (Zhao et al. 2023; :mod:`steerdiff.solvers.unipc`) gives the noise form on a reversed grid
    (``h < 0``, ``g = -h > 0``) the weights the data form -- :func:`~steerdiff.sampling.sample`'s default --
    has when sampling, whereas the data form there has ``g = h < 0``, where UniC's ``a_1 = 1/2`` (the
    ``g -> 0`` limit) is far off. Inverting the 8-d mixture of the tests (32 samples, relative RMSE
    against the exact ODE) on ``karras_capped`` at 5 / 10 / 20 / 40 steps under SD's betas: 0.046 / 5.3e-3
    / 3.9e-4 / 3.2e-5, against the data form's 0.19 / 1.8e-2 / 1.6e-3 / 1.2e-4, ``dpmpp_3m``'s 0.090 /
    1.6e-2 / 2.7e-3 / 4.0e-4 and ``deis``'s 0.057 / 1.1e-2 / 1.3e-3 / 1.2e-4; ahead of all three at 5-20 steps
    under rectified flow and EDM too (5.0e-2 / 6.0e-3 / 2.1e-3 on flow, against 0.30 / 3.4e-2 / 4.6e-3 for the
    data form). On ``time_uniform`` the data form diverges (2.6 at 5 steps under SD's betas, 12.8 under flow),
    the noise form does not (0.068, 0.095). (``tests/test_invert.py``.)

    A guided ``den`` (classifier-free guidance) gets what ``sample`` takes on ``grid``
    (:func:`~steerdiff.sampling.guided_solver`): on the two-class mixture of ``tests/test_guidance_cfg.py``
    under SD's betas at scale 2 / 7.5 and 10 steps it is 0.016 / 0.12 from the guided ODE (UniPC's noise form
    0.039 / 0.17) and ``sample`` with it brings ``x_0`` back to 0.041 / 0.50 (2.5 with UniPC's noise form):
    a guided ODE contracts towards the class, so its inversion expands errors, the more so the larger
    the scale (hence null-text inversion).
    """
    if den.guided:
        return guided_solver(steps, den.guidance_scale, grid)
    return UniPC(prediction="noise")


def deterministic_solvers() -> list[str]:
    """The names from :func:`steerdiff.solvers.available` whose solver draws no noise: those :func:`invert`
    accepts."""
    return [name for name in _solvers.available() if not _solvers.get(name).stochastic]


@overload
def invert(
    den: Denoiser,
    x_0: Tensor,
    steps: int | None = ...,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    progress: bool = ...,
    return_info: Literal[False] = ...,
    **cond: Any,
) -> Tensor: ...


@overload
def invert(
    den: Denoiser,
    x_0: Tensor,
    steps: int | None = ...,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    progress: bool = ...,
    return_info: Literal[True],
    **cond: Any,
) -> tuple[Tensor, SampleInfo]: ...


@overload
def invert(
    den: Denoiser,
    x_0: Tensor,
    steps: int | None = ...,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    progress: bool = ...,
    return_info: bool,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]: ...


def invert(
    den: Denoiser,
    x_0: Tensor,
    steps: int | None = None,
    solver: str | Solver | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    return_info: bool = False,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """The initial noise ``x_T`` from which ``sample(den, x_T, steps, solver, schedule, final="none")``
    returns the clean sample ``x_0``: the probability-flow ODE integrated up that run's grid (module
    docstring).

    Args:
        den: the :class:`~steerdiff.denoiser.Denoiser` (guided denoisers such as
            :class:`~steerdiff.guidance.CFG` included; not one that draws noise itself).
        x_0: the clean samples, shape ``(batch, ...)``, taken as the state at the grid's last node ``t_N``.
            The result has its dtype and memory layout (half precision: a float32 state, as in ``sample``).
        steps: number of steps ``N``; default (``None``) 10, or ``len(times) - 1`` for explicit times; NFE
            as ``sample``'s with ``final="none"`` (``SampleInfo.nfe``).
        solver: a deterministic solver: a name from :func:`deterministic_solvers` or a Solver instance
            whose ``stochastic`` is false; default (``None``) :func:`default_inversion_solver`: UniPC-3 in its
            noise form (for a guided ``den``, the guided default of ``sample``). Pass the same ``solver`` to
            ``sample`` to come back: each run's error is its solver's.
        schedule: as ``sample``'s; its ``steps + 1`` nodes must have a finite, strictly monotone log-SNR
            (explicit times: ``steps``, if given, must be ``len(times) - 1``).
        callback: called after every step as in ``sample`` (``i``, ``t``, ``sigma`` of the node reached:
            the noise level rises).
        progress: show a tqdm bar.
        return_info: also return a :class:`~steerdiff.sampling.SampleInfo`, whose ``grid`` is the reversed
            one (``grid.t`` increasing).
        **cond: passed to the network on every call; not named as a keyword of ``sample`` that
            ``invert`` lacks (:data:`SAMPLE_ONLY`: ``final``, ``generator``, ``corrector``,
            ``corrector_steps``, ``snr``), which ``sample`` keeps from the net too.

    Raises:
        ValueError: bad arguments, a stochastic solver, a keyword of :data:`SAMPLE_ONLY` or a grid that cannot
            be inverted (the message names the argument and what is accepted).
        NonFiniteError: the network returned NaN/inf (the message names the step and time).
    """
    return invert_as(
        "invert",
        den,
        x_0,
        steps,
        solver,
        schedule,
        callback=callback,
        progress=progress,
        return_info=return_info,
        **cond,
    )


def invert_as(
    who: str,
    /,
    den: Denoiser,
    x_0: Tensor,
    steps: int | None = None,
    solver: str | Solver | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    return_info: bool = False,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """:func:`invert` run by the entry point ``who`` (``rf_invert``), whose name its messages carry, as the
    checks' ``who`` (:mod:`steerdiff._checks`) does."""
    check_denoiser(who, "den", den)
    size = check_x_T(den, x_0, who, "x_0")
    own = den.own_noise()
    if own:
        raise ValueError(
            f"{who}: den: {', '.join(dict.fromkeys(name for name, _ in own))} draws noise, and inversion "
            "is deterministic; pass a denoiser that does not"
        )
    wrapped: list[Denoiser] = [den]  # den and every denoiser inside it (Denoiser.inner_denoisers)
    while wrapped:
        part = wrapped.pop()
        if part.state_time:
            raise ValueError(
                f"{who}: den: {type(part).__name__} evaluates the net at a time chosen from the state, and "
                "inversion cannot undo that (the steps up the grid see other states); invert its base instead"
            )
        wrapped += part.inner_denoisers()
    check_sample_only(
        who,
        cond,
        SAMPLE_ONLY,
        "which runs the deterministic probability-flow ODE up the grid that sample(..., final='none') runs "
        "down, drawing no noise and moving no corrector; accepted: den, x_0, steps, solver, schedule, "
        "callback, progress, return_info and the net's conditions (**cond)",
    )
    sched = _schedules.get(schedule, who)
    steps = count_steps(who, steps, sched, "none", only=who, process=den.process)
    progress = boolean(who, "progress", progress)
    return_info = boolean(who, "return_info", return_info)
    if callback is not None and not callable(callback):
        raise ValueError(f"{who}: callback must be None or a callable(dict), got {type(callback).__name__}")
    forward = make_grid(den.process, sched, steps, "none", only=who)
    if solver is None:
        slv = default_inversion_solver(den, steps, forward)
    else:
        slv = _solvers.get(solver, who, deterministic_solvers())
    if slv.stochastic:
        raise ValueError(
            f"{who}: solver={solver!r} is stochastic, and inversion needs the "
            f"deterministic probability-flow ODE; accepted: {deterministic_solvers()} or a deterministic "
            "Solver instance (e.g. DDIM(eta=0))"
        )
    grid = forward.reversed()
    model = Model(den, cond, net_dtype=x_0.dtype, scale=size)
    x, _ = run_grid(slv, model, grid, x_0.to(work_dtype(x_0.dtype)), callback, progress)
    model.check_finite()
    log.debug("inverted %s with %s/%s: %d steps, %d NFE", tuple(x.shape), slv.name, sched, steps, model.nfe)
    x = laid_out_as(to_sample_dtype(who, x, x_0.dtype), x_0)
    if return_info:
        return x, SampleInfo(model.nfe, grid, slv, sched)
    return x
