"""The solver contract: a grid, a counted model, and one step at a time.

A solver moves ``x`` from grid node ``i`` to node ``i + 1`` in :meth:`Solver.step`, calling the
model as often as its algorithm needs. The model is a :class:`Model`: it counts network calls
exactly and records non-finite outputs so that :func:`steerdiff.sample` can name the step at
which a net returned NaN/inf, and the loops record their states with it (:meth:`Model.note_state`, the
divergence guard: a state beyond :data:`DIVERGED` times the process's scale is a run that diverged).
Node data (``t``, ``alpha``, ``sigma``, ``lam``) lives in a :class:`Grid` as CPU floats, so no step
syncs with the device.

A grid whose last node is *clean* (``sigma = 0``, ``lam = +inf``) ends with a step that returns
the denoised estimate of the last evaluation: an exponential integrator's higher-order terms
diverge as ``h -> inf``, so that step is always first order (:func:`step_order`).

A sampling grid runs towards the data (``lam`` increasing, ``h > 0``); :meth:`Grid.reversed` runs the
same nodes back (``h < 0``), which is how :func:`steerdiff.invert` integrates the ODE up the noise
levels with the same solvers: the exponential integrators and the Adams-Bashforth methods in
``sigma / alpha`` hold for either sign of the step, and the step rules that compare lengths
(:func:`step_order`'s long steps) compare ``|h|``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from .._checks import caller, choice, integer, real
from .._ops import first_false, host_to
from ..denoiser import Denoiser, Prediction
from ..noise import GeneratorNoise, NoiseSource
from ..processes import Process
from ..schedules import Custom, Schedule

__all__ = [
    "DIVERGED",
    "MAX_STEP_RATIO",
    "Failure",
    "Grid",
    "History",
    "MaxH",
    "Model",
    "NonFiniteError",
    "Solver",
    "Transition",
    "advance",
    "check_long_step",
    "count_steps",
    "data_scale",
    "diverged_error",
    "guard_scale",
    "keeps_history",
    "largest",
    "make_grid",
    "moved_error",
    "nonfinite_error",
    "state_bound",
    "step_limit",
    "step_order",
    "to_sample_dtype",
    "within",
    "work_dtype",
]


_HALF = (torch.float16, torch.bfloat16)


class NonFiniteError(FloatingPointError):
    """The network returned NaN or inf, or a run's state became NaN/inf or diverged (:func:`state_bound`)."""


# The divergence guard (Model.note_state). At process time t a sample is x_t = alpha_t x_0 + sigma_t eps, so
# each entry is within alpha_t |x_0|_max + sigma_t |eps|_max, and |eps|_max < 7 for up to 1e11 standard
# normals. A state beyond DIVERGED (alpha_t D + sigma_t) is a run that diverged (a corrector's step_size or
# snr, an SDE's noise, a guidance scale, a solver unstable on its grid). D, the run's data scale (data_scale),
# is at least 1 and at least the largest |entry| of the state the run starts from: the noise x_T (about 5
# sigma_max: 5 under VP and flow, 400 under VE / EDM's sigma_max = 80) or the data x_0 of an inversion. So the
# bound never binds on data within 1e8 max(1, |x_start|_max): pixels in [-1, 1] or [0, 255], latents scaled by
# 0.18215 or not, a mean-reverting process's residual x - mu, guidance that overshoots the data a
# thousandfold. An unstable run grows geometrically and crosses it a few steps after it starts to grow, long
# before float32 (3e38) or float64 (1e308) overflows (ULA with step_size=10 after DDIM steps on the 8-d
# mixture of the tests under VE, 20 steps: |x|_max 11 at step 7, then x1.5-x20 a step, 1.3e9 at step 16, past
# the bound 1.85e10 at step 17; tests/test_diverged.py). A half-precision run keeps its state in float32
# (work_dtype); a bound beyond the state dtype's largest number is capped there (the test is then isfinite).
DIVERGED = 1e8


def guard_scale(size: Tensor) -> Tensor:
    """The data scale ``D`` of the divergence guard for a run that starts from a state whose largest
    ``|entry|`` is ``size``, a 0-d tensor: ``max(1, size)``, 1 where ``size`` is NaN or inf; in ``size``'s
    dtype and on its device, no host read. The rule's one place: :func:`data_scale` is it on a host number,
    a chain's bound (:meth:`steerdiff.mcmc.Kernel.run`) on a device scalar."""
    return size.clamp_min(1.0).nan_to_num(1.0, 1.0)


def data_scale(size: float) -> float:
    """:func:`guard_scale` of a host number ``size`` (the one host read of
    :func:`~steerdiff.sampling.check_x_T`, or a start's known scale), through a float64 CPU scalar: no
    device read (6 us, once per :class:`Model`)."""
    return float(guard_scale(torch.tensor(size, dtype=torch.float64)))


ScaleT = TypeVar("ScaleT", float, Tensor)


def state_bound(scale: ScaleT, alpha: float, sigma: float) -> ScaleT:
    """The largest ``|entry|`` of a sane state at a time of ``alpha(t), sigma(t)`` in a run of data scale
    ``scale`` (:func:`data_scale` on the host, where each step's bound is a number; :func:`guard_scale` on
    a device scalar): ``DIVERGED (alpha scale + sigma)`` (:data:`DIVERGED`), of ``scale``'s kind."""
    return DIVERGED * (alpha * scale + sigma)


def within(x: Tensor, bound: float | Tensor) -> Tensor:
    """A 0-d bool tensor on ``x``'s device: every entry of ``x`` is finite and at most ``bound`` in absolute
    value (a number ``bound`` capped at the largest number of ``x``'s dtype: there the test is ``isfinite``;
    a 0-d tensor one finite, on ``x``'s device). :func:`largest` and a compare, no host read; on the CPU,
    where a read costs nothing, ``x``'s extremes compared on the host (4.4 against 9.3 us at 256x64); True
    for an empty ``x``."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    if x.is_cpu and not isinstance(bound, Tensor):  # detach only a graph: 0.4 us a step where there is none
        low, high = torch.aminmax(x.detach() if x.requires_grad else x)
        return _FLAGS[low.item() >= -bound and high.item() <= bound]  # False for NaN; inf > any bound
    size = largest(x)
    return size <= (bound if isinstance(bound, Tensor) else min(bound, torch.finfo(size.dtype).max))


_FLAGS = (torch.tensor(False), torch.tensor(True))  # within's results on the CPU: read, never written


def largest(x: Tensor) -> Tensor:
    """``max |x|`` of a non-empty ``x`` as a 0-d tensor on its device, in its dtype, detached (NaN where an
    entry is NaN), no host read: ``max(max x, -min x)`` from one fused ``aminmax`` on the CPU (8 / 13 us on
    256x64 / 4x4x64x64 float32, one thread, against 47 / 172 us for ``vector_norm(x, inf)`` and 35 / 160 us
    for ``isfinite(x).all()``: bench/guard_overhead.py), ``vector_norm(x, inf)`` elsewhere (one kernel)."""
    x = x.detach() if x.requires_grad else x  # as within: no detach (0.4 us) where there is no graph
    if not x.is_cpu:
        return torch.linalg.vector_norm(x, math.inf)
    low, high = torch.aminmax(x)
    return torch.maximum(high, low.neg())


@dataclass(frozen=True)
class Grid:
    """Grid nodes ``0..N`` as float64 Python floats; ``clean_end`` marks ``sigma_N = 0``."""

    process: Process
    t: list[float]
    alpha: list[float]
    sigma: list[float]
    lam: list[float]
    clean_end: bool

    @property
    def steps(self) -> int:
        """The number of steps: one fewer than the nodes."""
        return len(self.t) - 1

    def h(self, i: int) -> float:
        """``lam_{i+1} - lam_i`` (``inf`` into a clean end; ``< 0`` on a :meth:`reversed` grid)."""
        return self.lam[i + 1] - self.lam[i]

    def reversed(self) -> Grid:
        """The same nodes in the opposite order, from the least noisy to the noisiest (``h < 0``): the grid of
        an inversion (:func:`steerdiff.invert`). A ``ValueError`` for a grid with a clean end, whose node at
        ``sigma = 0`` (``lam = inf``) no step can leave."""
        if self.clean_end:
            raise ValueError(
                "Grid.reversed: a grid with a clean end (sigma = 0) cannot be reversed; make it with "
                "final='none'"
            )
        return Grid(self.process, self.t[::-1], self.alpha[::-1], self.sigma[::-1], self.lam[::-1], False)

    def is_final_clean(self, i: int) -> bool:
        """Whether step ``i`` goes into the clean terminal node."""
        return self.clean_end and i == self.steps - 1

    def at(self, t: float) -> tuple[float, float, float]:
        """``(alpha, sigma, lam)`` at an off-grid time ``t``."""
        p = self.process
        return float(p.alpha(t)), float(p.sigma(t)), float(p.lam(t))


FINALS = ("zero", "none")


def keeps_history(slv: Solver, grid: Grid) -> bool:
    """Whether ``slv``'s state over ``grid`` holds a per-trajectory history (multistep solvers): its step is
    then not a transition of the state alone, as tree search, budgeted search and noise-map extraction
    need."""
    return bool(slv.init_state(grid)) and not slv.static_state


DEFAULT_STEPS = 10
"""The step count of :func:`steerdiff.sample` and its kin where neither ``steps`` nor an explicit grid gives
one (:func:`count_steps`)."""


def count_steps(
    who: str,
    steps: object,
    schedule: Schedule,
    final: str = "zero",
    default: int | None = DEFAULT_STEPS,
    *,
    only: str | None = None,
    process: Process | None = None,
) -> int:
    """The number of steps ``N`` of a run on ``schedule``: ``steps``, an integer >= 1, or ``None``: the
    explicit grid's (a :class:`~steerdiff.schedules.Custom` of ``m`` times: ``N = m`` with ``final="zero"``,
    its ``m`` nodes then the clean state appended; ``N = m - 1`` with ``final="none"``, the steps between
    its nodes), else ``default`` (``None``: refused, the caller has no default). As k-diffusion's
    ``sigmas`` and diffusers' ``set_timesteps(timesteps=...)`` take a list as the grid, the list sets the
    count; a ``steps`` that disagrees with it is a ``ValueError`` naming both (after ``who``, the entry
    point; ``only``: the name of one that runs ``final="none"`` alone, an inversion, whose message offers
    no other ``final``; where the times end in 0 below ``process``'s ``t_min``, it adds that the list
    ends at the clean state, as k-diffusion's ``sigmas`` do). The one place every entry point taking
    ``steps`` and ``schedule`` counts its steps (:func:`make_grid` included)."""
    final = choice(who, "final", final, FINALS)
    if not isinstance(schedule, Custom):
        if steps is None and default is not None:
            return default
        if steps is None:
            raise ValueError(
                f"{who}: steps must be an integer >= 1, got None (None counts the times of an explicit grid, "
                f"a list; schedule {schedule!r} is none)"
            )
        return integer(who, "steps", steps, lo=1)
    m = schedule.grid.numel()
    n = m if final == "zero" else m - 1
    if steps is not None:
        steps = integer(who, "steps", steps, lo=1)  # before the comparison: steps=4.0 is refused as such
        if steps == n:
            return n
    elif n >= 1:
        return n
    # a k-diffusion sigmas list ends in 0, the clean state (not a node, not a time of the process's range)
    end = float(schedule.grid[-1])
    clean = end == 0.0 and process is not None and process.t_min > 0
    hint = (
        " (the times end in 0, the clean state, as k-diffusion's sigmas do: pass sigmas[:-1])"
        if clean
        else ""
    )
    got = "steps=None: a grid of one node has no step between nodes" if steps is None else f"steps={steps}"
    if only is not None:
        raise ValueError(
            f"{only}: schedule has {m} times, and {only} takes the steps + 1 nodes that "
            f"sample(..., final={final!r}) runs down: steps must be len(times) - 1 = {m - 1}, "
            f"got {got}{hint}"
        )
    raise ValueError(
        f"{who}: schedule has {m} times: steps must equal len(times) = {m} with final='zero' (the "
        f"default), or len(times) - 1 = {m - 1} with final='none' (or None: the count of the times); got "
        f"{got} with final={final!r}{hint}"
    )


def make_grid(
    process: Process,
    schedule: Schedule,
    steps: int | None,
    final: str = "zero",
    *,
    only: str | None = None,
    who: str | None = None,
    default: int | None = None,
) -> Grid:
    """The grid of ``steps`` steps (:func:`count_steps`: ``None`` is an explicit grid's count, else
    ``default``).

    ``final="zero"``: ``steps`` schedule nodes, then the clean state (``sigma = 0``, ``alpha = 1``,
    ``lam = inf``) into which the last step returns the denoised estimate. ``final="none"``:
    ``steps + 1`` schedule nodes, ending at the last one (``t_min`` for most schedules).

    Raises a ``ValueError`` naming the schedule and ``steps`` where ``lam`` is infinite at a node
    or does not strictly increase between consecutive nodes (a process whose ``lam(t)`` is not
    decreasing in ``t``): every step needs ``h = lam_{i+1} - lam_i > 0``; and naming ``final`` where the
    schedule was fitted for the other end (:attr:`Schedule.final`: a GITS fit's ``n`` nodes for
    ``final="zero"`` lead into the clean state, and asked for ``steps + 1`` of them it would give a path into
    it cut short; for ``final="none"`` they end at the teacher's last node, from which ``final="zero"``
    would add a step). ``only``: the name of a caller whose runs take this ``final`` alone (an inversion,
    ``final="none"``), which that error names instead of offering the other ``final``, as it does where a
    :class:`~steerdiff.schedules.Custom` grid's times do not number the nodes asked; ``who``: the caller's
    name there otherwise.
    """
    choice("make_grid", "final", final, FINALS)
    if not isinstance(schedule, Schedule):
        raise ValueError(
            f"make_grid: schedule must be a steerdiff Schedule (schedules.get(name)), got {schedule!r}"
        )
    steps = count_steps(who or "make_grid", steps, schedule, final, default, only=only, process=process)
    if schedule.final not in (None, final):
        made = "lead into the clean state" if schedule.final == "zero" else "end at its last node"
        way = (
            f", or run with final={schedule.final!r}"
            if only is None
            else f" ({only} runs the grid of final={final!r} only)"
        )
        raise ValueError(
            f"{'' if only is None else only + ': '}schedule {schedule!r} was fitted for "
            f"final={schedule.final!r} (its grids {made}), not for this run's final={final!r}: fit it with "
            f"final={final!r}{way}"
        )
    clean = final == "zero"
    try:
        t = schedule(process, steps if clean else steps + 1)
    except ValueError as refused:  # too many steps for a spacing: said in steps (the schedule counts nodes)
        most = schedule.most_nodes(process) if isinstance(process, Process) else None
        if most is None or (steps if clean else steps + 1) <= most:
            raise
        raise ValueError(
            f"{only + ': ' if only is not None else caller(who)}schedule {schedule!r} takes at most "
            f"steps={most if clean else most - 1} with final={final!r} on {process!r} ({most} distinct "
            f"trained steps are the most nodes this spacing gives it); got steps={steps}"
        ) from refused
    alpha, sigma, lam = (c.tolist() for c in process.coefficients(t))
    if not all(math.isfinite(v) for v in lam):
        raise ValueError(f"schedule {schedule!r} reaches an infinite log-SNR; lam = {lam}")
    times = t.tolist()
    for i in range(len(lam) - 1):
        if not lam[i] < lam[i + 1]:  # h <= 0: exponential integrators and SDE steps break down
            raise ValueError(
                f"schedule {schedule!r} with steps={steps}: the log-SNR lam = log(alpha/sigma) of "
                f"{process!r} does not increase from node {i} to node {i + 1} (t = {times[i]:.6g} -> "
                f"{times[i + 1]:.6g}, lam = {lam[i]:.6g} -> {lam[i + 1]:.6g}); a grid needs lam "
                "strictly increasing towards the clean end"
            )
    if clean:
        times.append(process.t_min)
        alpha.append(1.0)
        sigma.append(0.0)
        lam.append(math.inf)
    return Grid(process, times, alpha, sigma, lam, clean)


class History:
    """The last ``size`` estimates of a multistep method and where they were taken, newest first:
    ``values[j]`` (tensors) at ``at[j]`` (e.g. ``lam``); :meth:`push` adds one and drops the oldest,
    :meth:`trim` drops it at the end of a step that has read them all."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[Tensor] = []
        self.at: list[float] = []

    def push(self, value: Tensor, at: float) -> None:
        """Record ``value`` at ``at`` as the newest entry, dropping the oldest beyond ``size``."""
        self.values.insert(0, value)
        self.at.insert(0, at)
        del self.values[self.size :], self.at[self.size :]

    def trim(self) -> None:
        """Keep the newest ``size - 1``: what the next step reads besides the estimate it pushes. The
        next :meth:`push` would drop the oldest; a step that ends with ``trim`` frees it before the next
        network call instead of after (not for a corrector, which redoes the step with all of them)."""
        del self.values[self.size - 1 :], self.at[self.size - 1 :]

    def clear(self) -> None:
        """Drop every estimate (new lists: a checkpoint that shares the old ones keeps them)."""
        self.values, self.at = [], []


_ATOMS = (int, float, complex, str, bytes, type(None))  # kept as they are (schedule constants)
_ATOM_TYPES = frozenset(_ATOMS) | {bool}  # the same by exact type: the fast test


def map_state(obj: Any, fn: Callable[[Tensor], Tensor], other: Callable[[Any], Any]) -> Any:
    """Solver state ``obj`` rebuilt with ``fn`` applied to every tensor in it: the containers the
    :class:`Solver` contract allows -- dicts, lists, tuples (namedtuples too), deques, dataclasses,
    :class:`History` (subclasses kept) -- are new objects, numbers and strings are kept (a tuple of
    them shared), and any other object is ``other(obj)``. What particle methods resample the state
    with (``fn`` indexes the rows) and what ``SteerdiffScheduler`` forks its checkpoint with (``fn``
    the identity)."""
    kind = type(obj)
    if kind is Tensor:
        return fn(obj)
    if kind in _ATOM_TYPES:
        return obj
    if kind is list:  # numbers inline: a run's tables (a tuple per step) are long
        return [v if type(v) in _ATOM_TYPES else map_state(v, fn, other) for v in obj]
    if kind is dict:
        return {k: v if type(v) in _ATOM_TYPES else map_state(v, fn, other) for k, v in obj.items()}
    if kind is tuple:
        if all(type(v) in _ATOM_TYPES for v in obj):
            return obj
        return tuple(map_state(v, fn, other) for v in obj)
    if isinstance(obj, Tensor):  # subclasses (torch.nn.Parameter)
        return fn(obj)
    if isinstance(obj, _ATOMS):
        return obj
    if isinstance(obj, History):
        hist = object.__new__(kind)  # a shallow copy (copy.copy takes 7 us), of a subclass too
        vars(hist).update(vars(obj))
        hist.values, hist.at = [map_state(v, fn, other) for v in obj.values], list(obj.at)
        return hist
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the subclass (OrderedDict, defaultdict's factory)
        out.update((k, map_state(v, fn, other)) for k, v in obj.items())
        return out
    if isinstance(obj, deque):
        return kind((map_state(v, fn, other) for v in obj), obj.maxlen)
    if isinstance(obj, list | tuple):
        items = [map_state(v, fn, other) for v in obj]
        return kind(*items) if hasattr(obj, "_fields") else kind(items)  # a namedtuple or not
    if is_dataclass(obj) and not isinstance(obj, type):
        dup = copy.copy(obj)  # no __init__ / __post_init__ rerun; frozen ones too
        for f in fields(obj):
            object.__setattr__(dup, f.name, map_state(getattr(obj, f.name), fn, other))
        return dup
    return other(obj)


@dataclass
class Transition:
    """A stochastic step's Gaussian transition ``N(mean, std^2)``, before noise is drawn."""

    mean: Tensor
    std: float | Tensor

    def draw(self, noise: NoiseSource, t_from: float, t_to: float) -> Tensor:
        """``mean + std z`` with ``z = noise(t_from, t_to, mean)``; no draw when ``std`` is exactly 0. A
        number ``std`` goes through ``torch.add(mean, z, alpha=std)``, one kernel that may round once where
        ``mean + std * z`` rounds twice: the two differ in the last bit of some entries."""
        if not isinstance(self.std, float):  # per-sample stds
            return self.mean + self.std * noise(t_from, t_to, self.mean)
        if self.std == 0.0:
            return self.mean
        return torch.add(self.mean, noise(t_from, t_to, self.mean), alpha=self.std)


def advance(out: Tensor | Transition, noise: NoiseSource, t_from: float, t_to: float) -> Tensor:
    """The state after a solver step that returned ``out``: ``out`` itself, or a draw from its
    :class:`Transition` (:meth:`Transition.draw`)."""
    return out.draw(noise, t_from, t_to) if isinstance(out, Transition) else out


# A long-step limit: a number (the same at every step) or a rule ``(grid, i) -> limit`` of step ``i``
# (a limit that depends on the step's noise level: steerdiff.smc.FKCStepLimit)
MaxH = float | Callable[[Grid, int], float]


def step_limit(max_h: MaxH, grid: Grid, i: int) -> float:
    """The long-step limit at step ``i`` (in log-SNR): ``max_h`` itself, or ``max_h(grid, i)`` for a rule."""
    return max_h(grid, i) if callable(max_h) else max_h


def step_order(
    i: int,
    grid: Grid,
    order: int,
    history: int,
    lower_order_final: bool,
    max_h: MaxH = math.inf,
    max_h_ratio: float = 0.0,
    max_ratio: float = math.inf,
) -> int:
    """Order a multistep method uses at step ``i``.

    At most ``order`` and at most the number of evaluations available (``history``, warm-up at
    the first steps). With ``lower_order_final`` and fewer than 15 steps the last steps count
    down (order <= steps - i), as diffusers' multistep schedulers do. The step into a clean end is
    first order, and so is a *long* step: longer than ``max_h`` in log-SNR
    (``|h|``, ``h = lam_{i+1} - lam_i``; a rule ``max_h(grid, i)``: its limit for step ``i``,
    :func:`step_limit`) and than ``max_h_ratio`` times the step before. Lengths are ``|h|``: on a
    :meth:`Grid.reversed` grid (``h < 0``) a step longer than the one before extrapolates the estimates
    as far as on a sampling grid.

    The step-ratio rule (``max_ratio``, :data:`MAX_STEP_RATIO`): a step down the noise levels (``h > 0``), but
    the one into the last noisy node, longer than ``max_ratio`` times the step before, whatever its length,
    is at most second order. Over nodes ``0, -1/w, -2/w`` (in units of the step, ``w`` its ratio to the steps
    before) the quadratic's Adams weights are ``(1 + 3w/4 + w^2/6, -(w + w^2/3), w/4 + w^2/6)``, the line's
    ``(1 + w/2, -w/2)`` (:func:`~steerdiff.solvers._poly.adams_bashforth`): order 3 multiplies its estimates'
    errors by ``sum |w_j| = 1 + 2w + 2w^2/3`` (3.7 at ``w = 1``, 13 at 3, 28 at 5), order 2 by ``1 + w``.
    """
    n = grid.steps
    k = min(order, history)
    if lower_order_final and n < 15:
        k = min(k, n - i)
    h = abs(grid.h(i))
    if 0 < i < n - 1 - grid.clean_end and grid.h(i) > max_ratio * abs(grid.h(i - 1)):  # down the grid only
        k = min(k, 2)
    if grid.is_final_clean(i) or (
        i > 0 and h > max_h_ratio * abs(grid.h(i - 1)) and h > step_limit(max_h, grid, i)
    ):
        k = 1
    return max(k, 1)


# The stochastic multistep solvers' default long-step rule (DPMSolverSDEMultistep, SASolver): their
# estimates carry the step noise, and extrapolating their differences over a step much longer than
# the steps they came from inflates it. time_uniform puts a node at t_min, whose step is ~3.6 times
# the one before in log-SNR (SD betas); on the 8-d mixture of the tests, 8192 exact draws of p_T,
# variance of the samples / true at 50 and 100 steps: dpmpp_3m_sde 2.85 and 1.42, SA-Solver(3, 3)
# 3.52 and 1.57, the default dpmpp_2m_sde / sa_solver 1.10 / 1.20 at 50; with the rule 0.99 to 1.01
# for all; no step of karras / logsnr_uniform grids is affected (results unchanged). MRSampler's data form
# with sde=True has it too (tests/test_mean_reverting.py).
# What it leaves: long steps that follow long ones. Along the reverse SDE the denoised estimate is a
# martingale in lam, not a smooth curve: a first-order step lacks the exact transition's alpha_t^2
# (1-e^{-2h})^2 E[Var(x0 | x_s)] of variance, and the differences orders 2-3 extrapolate carry the
# estimate's past increments instead; a step of h ~ 2 just after the lam band where the estimate settles
# (about -2..1 for unit-scale data) gets those of the band, far more than it lacks. Rectified flow spans lam
# -6.9..6.9, so karras (h 0.70 -> 3.67 at 10 steps, 0.32 -> 1.98 at 20) and logsnr_uniform (1.53 at 10) take
# such steps where the ratio rule never fires. Same mixture and draws, variance / true - 1 at 10 / 20 steps
# on karras: dpmpp_3m_sde +8.1 / +0.27, sa_solver +2.9 / +1.4, dpmpp_2m_sde +0.43 / +0.41, ddpm -0.66 /
# -0.41 (logsnr_uniform at 10: +2.9, +1.4, +0.14, -0.61); diffusers' sde-dpmsolver++ 2M on the same karras
# grid +0.44. One step of the 10 from draws of the exact path (lam 0.85 -> 3.24, h = 2.39): first order
# -0.116 (the lacking variance above: -0.116), 2M +0.94, 3M +5.7. No order is right there: an absolute rule
# (max_h=1, max_h_ratio=0) trades the excess for first order's loss, sliced W2 at 10 steps 2.50 -> 0.48
# (dpmpp_3m_sde), 1.24 -> 0.47 (sa_solver) but 0.29 -> 0.48 (dpmpp_2m_sde; logsnr_uniform 0.14 -> 0.43),
# with a threshold tied to the data's scale: an option, not the default. karras_capped (the default) ramps
# from s = 30: its steps after the first are at most 0.94 on flow at 10 steps, 0.82 on VP.
SDE_MAX_H, SDE_MAX_H_RATIO = 0.5, 2.0

# The deterministic multistep solvers' default long-step rule (DPMSolverPPMultistep, UniPC): over a step
# much longer than the steps its estimates came from, the polynomial through them extrapolates their errors.
# Grids that end with such a step: time_uniform (the last noisy step 3.5-5.1 times the one before in log-SNR
# on VP processes, 4.5-5.9 under flow, 9.7-13 on EDM), linspace and leading on discrete VP schedules
# (3.4-5.0); karras at 3-4 steps; laplace, kl_optimal and vp have one too. `steerdiff bench longstep`
# (docs/bench/longstep.txt: 16-d mixture, six processes, every schedule, 3-50 steps): the rule changes 564
# of 1,998 cases of dpmpp_2m / dpmpp_3m / unipc, better in 506 (without it dpmpp_3m and unipc end 5.3-11.8,
# relative, from the exact answer on EDM + time_uniform at 15-50 steps; with it 0.36-0.75), worse in 58 by
# at most 1.43x (EDM + time_uniform at 3-15 steps; karras at 3-4 steps 1.01-1.23x; dpmpp_2m on SD and
# zero-terminal-SNR betas' leading, linspace and time_uniform at 15-20 steps 1.03-1.22x; laplace and
# kl_optimal at 8-50 steps 1.002-1.08x). No step of karras_capped, logsnr_uniform or polyexponential grids
# is affected, nor of karras from 5 steps. MRSampler's data form has it too (mrs in the bench: 188 of 666
# cases changed, better in 177, worse in 11 by at most 1.42x: EDM + time_uniform at 3-10 steps, karras at 3,
# laplace at 20-30). DEIS and MRSampler's noise form, which extrapolate eps rather than the denoised
# estimate, have no such rule (DEIS has the step-ratio rule, MAX_STEP_RATIO, as DPMSolverPPMultistep and
# UniPC do).
ODE_MAX_H, ODE_MAX_H_RATIO = 2.0, 2.0

# The step-ratio rule (step_order's max_ratio; the default of DEIS, DPMSolverPPMultistep and UniPC, and of
# DPMSolverSDEMultistep and SASolver, so that their noise-free limits equal DPMSolverPPMultistep and UniPC-bh1
# with each one's defaults wherever SDE_MAX_H and ODE_MAX_H agree): a step down the grid, but the last into a
# noisy node, longer than 2.5 times the step before is at most second order. bench/longstep_rule.py
# (docs/bench/longstep_rule.txt; the numbers in steerdiff.solvers.deis, dpmpp, unipc): on karras grids with
# one mid-grid step 2.2-5.3 times the one before, order 3's errors by a geometric mean of 0.64x (deis), 0.42x
# (dpmpp_3m), 0.44x (unipc) where it changes them; GITS grids of the authors' program: unipc 0.731 -> 0.093 at
# NFE 8. 2.5 is above the named grids' largest mid-grid ratio (lcm at 40 steps, 2.34-2.40: with 2 the rule
# reaches lcm's grids at 30-40 steps, up to 1.0024x worse for deis), so none of their results changes; their
# last noisy step, 2.7-14 times the one before on time_uniform, linspace and leading, is left: order 3 is up
# to 1.16x better than 2 there for deis (50 steps of time_uniform). At 2.2-2.5 times the one before order 3
# still loses to order 2 (dpmpp_3m up to 0.741 against dpmpp_2m's 0.299): max_ratio=2 for such grids. The SDE
# solvers take such a step over 0.5 in log-SNR at first order by SDE_MAX_H first; on shorter ones at full
# noise the rule's effect is within the distance's resolution (bench/longstep_rule_sde.py: 18 of 48 results of
# 20-50 steps changed, geometric mean 0.96x dpmpp_3m_sde, 1.02x SA-Solver (3, 3)); ERSDE has it as an option.
MAX_STEP_RATIO = 2.5


def check_long_step(solver: Solver, max_h: MaxH, max_h_ratio: float) -> None:
    """``ValueError`` naming the argument unless ``max_h`` is positive (``inf``: no limit) or a rule
    ``(grid, i) -> limit`` (a callable) and ``max_h_ratio`` a finite number >= 0 (the long-step rule of
    :func:`step_order`)."""

    who = type(solver).__name__
    if not callable(max_h):
        real(who, "max_h", max_h, lo=0, lo_open=True, finite=False)
    real(who, "max_h_ratio", max_h_ratio, lo=0)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a run keeps its state and does its solver arithmetic in: float32 for a
    half-precision (float16/bfloat16) input, else the input's own.

    Half precision holds 2-3 significant digits; a solver that rounds its state to it at every step
    accumulates those roundings (measured on ``VP.scaled_linear`` + karras, unipc/ddim/heun/
    dpmpp_2m_sde at 25-50 steps, against a float64 run: bfloat16 0.9-1.7% relative error, float16
    0.12-0.19%; with the state in float32 0.18-0.25% and 0.023-0.032%), so, as diffusers'
    schedulers do in ``step``, only the network runs in half precision (:class:`Model`'s
    ``net_dtype``).
    """
    return torch.float32 if dtype in _HALF else dtype


def to_sample_dtype(who: str, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A run's result ``x`` (in :func:`work_dtype`) cast back to the samples' ``dtype``; a
    ``FloatingPointError`` where a finite ``x`` overflows there (float16 ends at 65504) rather than an
    ``inf`` returned silently. One device read, for float16 results only."""
    out = x.to(dtype)
    if dtype == torch.float16 and x.dtype != dtype and not bool(torch.isfinite(out).all()):
        big = float(x.abs().amax())
        if math.isfinite(big):
            raise FloatingPointError(
                f"{who}: the sample overflows float16 (max |x| = {big:.4g} > 65504): the run diverged, "
                "or pass x_T in float32/bfloat16"
            )
    return out


class Model:
    """What a solver may call: the denoiser (counted, non-finite output recorded) and the noise.

    Each call counts ``denoiser.cost`` network evaluations (1, or more for a guided denoiser).

    ``model(x, t, step)`` returns the :class:`Prediction` at process time ``t`` (kept as ``last`` until
    the next call starts: the net does not run with the previous ``x`` and estimates held here);
    ``step`` is the solver step it belongs to, reported if the output is not finite: at once for
    CPU tensors (unless ``eager`` is set to False, as a run spread over ranks does, whose ranks must
    raise together), by :meth:`check_finite` at the end of the run otherwise (no device sync per call).
    ``model.noise(t_from, t_to, like)`` is the run's noise source (:mod:`steerdiff.noise`), for
    stochastic sub-steps.

    ``net_dtype``: the dtype of the run's input, the one the net runs in. Where it is half precision
    (so :func:`work_dtype` keeps the solver state in float32) only the net's input is cast to it and
    the prediction is in ``x``'s dtype (:meth:`~steerdiff.denoiser.Denoiser.evaluate`); otherwise,
    and for ``None``, the denoiser is called in ``x``'s dtype.

    ``guesses``: the ``x`` handed to a step is a guess of the state the last step returned, off it by an
    iteration's error (:func:`steerdiff.paradigms`' Picard iteration), not an edit of it (a pipeline's,
    between steps): a step that corrects the state it returned (UniPC's UniC) moves a guess by the
    correction's move. False (edits) by default.

    ``scale``: the largest ``|entry|`` of the state the run starts from (:func:`data_scale` makes the run's
    data scale of it), which :meth:`note_state` bounds the states with.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: dict[str, Any] | None = None,
        noise: NoiseSource | None = None,
        net_dtype: torch.dtype | None = None,
        scale: float = 1.0,
    ) -> None:
        self.denoiser = denoiser
        self.cond = cond or {}
        self.noise: NoiseSource = noise if noise is not None else GeneratorNoise()
        self.net_dtype = net_dtype if net_dtype is not None and work_dtype(net_dtype) != net_dtype else None
        self.scale = data_scale(scale)
        self.nfe = 0
        self.eager = True
        self.guesses = False
        self.last: Prediction | None = None
        self._sums: list[Tensor] = []
        self._where: list[tuple[int, float]] = []
        # note_move's 0-d flags and note_state's sizes off the CPU (max |x|, compared with their limits when
        # read: one compare a run, not one a step), read with the sums
        self._moves: list[Tensor] = []
        self._limits: list[float | None] = []  # a size's bound, None for a flag
        self._move_where: list[tuple[int, int, float, Callable[[int, float], NonFiniteError]]] = []
        self._excused: Tensor | None = None  # note_state's excuses so far

    def __call__(self, x: Tensor, t: float, step: int) -> Prediction:
        self.last = None
        if self.net_dtype is None:
            pred = self.denoiser(x, t, **self.cond)
        else:
            pred = self.denoiser.evaluate(x, t, self.net_dtype, **self.cond)
        self.nfe += self.denoiser.cost
        # one reduction per call: a NaN/inf anywhere makes the sum non-finite (the other estimate
        # follows from this one and x; a learned variance is an output of its own, DDPM draws with it);
        # the sums are tested together at the end
        # the graph detached only where there is one (a sum on it would keep every step's graph alive until
        # the end); detach, and sum's dtype=None, cost 0.4 and 0.15 us a step where they change nothing
        given = pred.given
        if given.requires_grad:
            given = given.detach()
        total = given.sum(dtype=torch.float32) if given.dtype in _HALF else given.sum()
        if pred.var_interp is not None:
            total = total + pred.var_interp.detach().sum(dtype=total.dtype)
        self._sums.append(total)
        self._where.append((step, t))
        if self.eager and given.is_cpu and not math.isfinite(total.item()):
            self.check_finite()  # no sync to save on the CPU: stop at the first bad evaluation
        self.last = pred
        return pred

    @property
    def calls(self) -> int:
        """The evaluations made so far (those :meth:`first_nonfinite` counts)."""
        return len(self._sums)

    def first_nonfinite(self) -> tuple[int, int, float] | None:
        """``(step, evaluation, t)`` of the first evaluation that was not finite, ``None`` if none was;
        one device sync for the whole run (the flags are stacked and read once)."""
        k = first_false(torch.isfinite(torch.stack(self._sums))) if self._sums else None
        return None if k is None else (self._where[k][0], k, self._where[k][1])

    def note_move(
        self,
        finite: Tensor,
        step: int,
        t: float,
        error: Callable[[int, float], NonFiniteError],
        read: bool = True,
    ) -> None:
        """Record ``finite``, a 0-d bool tensor: whether the state a move (a corrector's) took the sample to
        after solver ``step`` at process time ``t`` is finite (no host read; where the move, not the model's
        output on the state, made the first NaN/inf, :meth:`check_finite` raises ``error(step, t)``); read
        at once on the CPU, as the evaluations' sums are (unless ``eager`` or ``read`` is False: a flag the
        caller knows to be True, or one left for the next :meth:`check_finite`)."""
        self._record(finite, None, step, t, error)
        if read and self.eager and finite.is_cpu and not bool(finite):
            self.check_finite()

    def _record(
        self,
        value: Tensor,
        limit: float | None,
        step: int,
        t: float,
        error: Callable[[int, float], NonFiniteError],
    ) -> None:
        """A move's 0-d ``value`` (a flag, or with ``limit`` a size), where it was made and its error."""
        self._moves.append(value)
        self._limits.append(limit)
        self._move_where.append((self.calls, step, t, error))

    def note_state(
        self,
        x: Tensor,
        step: int,
        t: float,
        alpha: float,
        sigma: float,
        error: Callable[..., NonFiniteError],
        excused: Tensor | None = None,
        defer: bool = False,
    ) -> None:
        """The divergence guard: record, as :meth:`note_move` does (no host read off the CPU), whether the
        state ``x`` a loop reached after ``step``, at process time ``t`` (``alpha(t), sigma(t)``), is finite
        and within :func:`state_bound` of the run's :attr:`scale`; where it is not, :meth:`check_finite`
        raises ``error(step, t, bound=...)`` (:func:`diverged_error`). ``excused``: a 0-d bool tensor, True
        where another check reports the cause after the run (a non-finite snr step size,
        :func:`~steerdiff.mcmc.base.check_step_sizes`): this state and every later one are then not
        flagged. ``defer``: not raised at once on the CPU either, but at the next :meth:`check_finite` (a loop
        whose own checks, read later, name the cause better: the particle engine's, where an algorithm refuses
        a step after the run, as :func:`~steerdiff.smc.afdps` does)."""
        bound = state_bound(self.scale, alpha, sigma)
        # bound even where within: another rank's failure at this index is named by this rank's error
        error = functools.partial(error, bound=bound)
        if excused is not None:
            self._excused = excused if self._excused is None else self._excused | excused
        if self._excused is None and not x.is_cpu:  # within's test, its compare made when read
            size = largest(x)
            self._record(size, min(bound, torch.finfo(size.dtype).max), step, t, error)
            return
        ok = within(x, bound) if self._excused is None else within(x, bound) | self._excused
        # no read where within read it on the CPU already, or where deferred
        self.note_move(ok, step, t, error, read=not (defer or ok is _FLAGS[1]))

    @property
    def moves(self) -> int:
        """The moved states :meth:`note_move` recorded so far (those :meth:`first_bad_move` indexes)."""
        return len(self._moves)

    def first_bad_move(self) -> int | None:
        """The index (from 0, in the order recorded) of the first state :meth:`note_move` found not finite,
        ``None`` if none was; one device sync."""
        return self._first_bad(self._move_flags().cpu()) if self._moves else None

    def _move_flags(self) -> Tensor:
        """The moves' flags as one 1-d bool tensor on their device: the recorded flags, then the recorded
        sizes compared with their limits (all at once: one copy of the limits, one compare)."""
        flags = [m for m, limit in zip(self._moves, self._limits, strict=True) if limit is None]
        sizes = [m for m, limit in zip(self._moves, self._limits, strict=True) if limit is not None]
        parts = [torch.stack(flags)] if flags else []
        if sizes:
            size = torch.stack(sizes)
            limits = torch.tensor([limit for limit in self._limits if limit is not None], dtype=torch.float64)
            parts.append(size <= host_to(limits, size.device, size.dtype))
        return torch.cat([part.to(parts[-1].device) for part in parts])

    def _first_bad(self, flags: Tensor) -> int | None:
        """The index (in the order recorded) of the first move whose flag in ``flags``, :meth:`_move_flags`
        read on the host, is False; ``None`` if none is."""
        order = [k for k, limit in enumerate(self._limits) if limit is None]
        order += [k for k, limit in enumerate(self._limits) if limit is not None]
        return min((k for k, ok in zip(order, flags.tolist(), strict=True) if not ok), default=None)

    def first_failures(self) -> tuple[tuple[int, int, float] | None, int | None]:
        """:meth:`first_nonfinite` and :meth:`first_bad_move` together, in one device read (the evaluations'
        and the moves' flags joined): :meth:`check_finite`'s input."""
        if not self._moves:
            return self.first_nonfinite(), None
        if not self._sums:
            return None, self.first_bad_move()
        calls = torch.isfinite(torch.stack(self._sums))
        flags = torch.cat([calls, self._move_flags().to(calls.device)]).cpu()
        calls, moves = flags[: len(self._sums)], flags[len(self._sums) :]
        k, m = first_false(calls), self._first_bad(moves)  # on the host: no more reads
        return (None if k is None else (self._where[k][0], k, self._where[k][1])), m

    def first_error(self, net: tuple[int, int, float] | None, move: int | None) -> Failure | None:
        """What :meth:`check_finite` raises for this model, given its first non-finite evaluation ``net``
        (:meth:`first_nonfinite`'s) and its first non-finite moved state ``move`` (:meth:`first_bad_move`'s):
        the move's error (:meth:`note_move`) where the move was made before that evaluation (which then took
        the moved state as input), else the model's; ``None`` if neither. The flags may be joined over the
        ranks that share a run (each rank's first of either, the earliest taken), the moves recorded alike
        on every rank."""
        if move is not None:
            calls, step, t, error = self._move_where[move]
            if net is None or calls <= net[1]:
                return Failure((step, -t), error(step, t), True, move)
        return None if net is None else Failure((net[0], -net[2]), nonfinite_error(*net), False, net[1])

    def check_finite(self, *others: Model) -> None:
        """Raise :class:`NonFiniteError` naming the first step whose evaluation was not finite, of this
        model or of ``others`` run beside it (pcg's predictor and corrector): the earliest step wins. Where
        a move recorded by :meth:`note_move` made a non-finite state before the first non-finite evaluation
        (which then took it as input), the error is the move's (:meth:`note_move`), not the model's
        (:meth:`first_error`)."""
        bad = [f for m in (self, *others) if (f := m.first_error(*m.first_failures()))]
        if bad:  # the earliest: by step, then by time, which falls as sampling goes on (not by index)
            raise min(bad, key=lambda f: f.key).error


class Failure(NamedTuple):
    """A run's first non-finite value (:meth:`Model.first_error`): ``key``, ``(step, -t)``, orders it against
    another model's; ``error``, the one to raise; ``moved``: a moved state (:meth:`Model.note_move`) was not
    finite, the ``at``-th of them (from 0), else the model's ``at``-th evaluation (from 0) was not."""

    key: tuple[int, float]
    error: NonFiniteError
    moved: bool
    at: int


def moved_error(
    step: int, t: float, *, who: str, bound: float | None = None, fix: str = "try a smaller step_size or snr"
) -> NonFiniteError:
    """The error for a state that ``who`` (a corrector) moved to NaN/inf after solver ``step``, at process
    time ``t``, from a finite state and finite model outputs; or, with ``bound``, beyond the divergence
    guard's :func:`state_bound` (:func:`diverged_error`, ``fix`` the advice)."""
    if bound is not None:
        return diverged_error(step, t, who=who, bound=bound, fix=fix)
    return NonFiniteError(
        f"{who} made the state NaN/inf at step {step} (process time t={t:.6g}), not the model: its move "
        "from a finite state and score overflowed (try a smaller step_size or snr)"
    )


def diverged_error(step: int, t: float, *, who: str, bound: float, fix: str) -> NonFiniteError:
    """The error for a state that ``who`` (a solver's step, a corrector's move, a particle method's proposal)
    took beyond the divergence guard's ``bound`` (:func:`state_bound`) or to NaN/inf at ``step``, process time
    ``t``, the model's outputs finite until then; ``fix`` names the argument most likely at fault."""
    return NonFiniteError(
        f"{who} made the state diverge at step {step} (process time t={t:.6g}): an entry is NaN/inf or "
        f"beyond {bound:.3g} = {DIVERGED:g} (alpha(t) D + sigma(t)), D the run's data scale, the model's "
        f"outputs finite until then; {fix}"
    )


def nonfinite_error(step: int, evaluation: int, t: float) -> NonFiniteError:
    """The error for a non-finite network output at solver ``step``, the run's ``evaluation``-th call
    (from 0), at process time ``t``."""
    return NonFiniteError(
        f"the model returned NaN/inf at step {step} (evaluation {evaluation + 1}, process time t={t:.6g})"
    )


@dataclass
class Solver:
    """Base class of all solvers; a new one is a dataclass subclass passed as an instance
    (``sd.sample(den, x_T, solver=MySolver(order=2))``, and to every particle method).

    Class attributes: ``name`` (the registry key; a property where the options choose it, as the
    order does for ``dpmpp_2m`` / ``dpmpp_3m``); ``max_order`` (the highest ``order`` accepted; the
    field ``order`` is checked against it); ``stochastic`` (steps draw noise: particle methods
    accept only such solvers); ``staged`` (a step of order ``k`` evaluates the network ``k`` times:
    Runge-Kutta stages as Heun, EDM, Restart, singlestep SDE-DPM-Solver++, the step into a clean
    end once; otherwise once per step; :meth:`nfe` predicts from it, the sampler counts the
    evaluations actually made); ``static_state`` (:meth:`init_state` only tabulates the grid's
    coefficients, which no step changes: a one-step method, as wrappers that repeat a step need);
    ``picard`` (how :func:`steerdiff.paradigms` takes a window of steps: ``"step"``, one network
    evaluation per step, at ``(x_i, t_i)``, moving ``x_i`` by an update from it and the state the steps
    before left, so the steps run in order after one batched call; ``"stages"``, a step that is a function
    of ``x_i`` alone given its noise, evaluated stage by stage; ``None``, refused there: PNDM's warm-up
    steps evaluate several times and the steps after read their estimates). Implement :meth:`step`,
    and :meth:`init_state` where steps keep a history (:class:`History`) in the ``state`` dict.
    Per-particle tensors in ``state`` (first dimension the batch) must sit in dicts, lists, tuples
    (namedtuples too), ``collections.deque``, dataclasses or :class:`History`, nested freely, so that
    particle methods can resample them with the particles; the particle engine refuses any other
    object that holds a tensor. A step never writes in place a tensor that was in ``state`` when it
    began (``SteerdiffScheduler`` shares them between its checkpoints; replace entries instead).
    """

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    # a step whose x_{i+1} / alpha_{i+1} is a convex combination of x_i / alpha_i and the net's x0 estimate
    # down the grid (DDIM with eta = 0, Euler: x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0): it
    # cannot take the state beyond its start and the net's outputs, so run_grid's divergence guard
    # (Model.note_state) reads only the run's last state for it (unguided, unprojected, down the grid): one
    # reduction per run, not per step (a step's 3.7 us at 256x64 on the CPU is a tenth of Euler's overhead)
    bounded: ClassVar[bool] = False
    staged: ClassVar[bool] = False
    static_state: ClassVar[bool] = False
    picard: ClassVar[str | None] = None
    max_order: ClassVar[int] = 1

    order: int = field(default=1)

    def __post_init__(self) -> None:
        self.order = integer(type(self).__name__, "order", self.order, lo=1, hi=self.max_order)

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """The mutable state of one run over ``grid`` (made once, passed to every :meth:`step`)."""
        return {}

    def noisy_on(self, grid: Grid) -> bool:
        """Whether a run over ``grid`` draws noise: :attr:`stochastic`, unless its only step is the jump to
        the clean end (which returns the denoised estimate) or the solver adds noise only on part of the
        noise range and ``grid`` has no node there (EDM's churn, Restart's intervals)."""
        return self.stochastic and grid.steps > int(grid.clean_end)

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        """The state at node ``i + 1`` from ``x`` at node ``i``: a tensor, or for a stochastic step its
        Gaussian :class:`Transition` (the engine draws the noise, so particle methods can weight or
        replace it). ``model(x, grid.t[i], i)`` gives the :class:`~steerdiff.denoiser.Prediction`
        (``x0``, ``eps``), counted; ``grid`` holds the nodes' ``t``, ``alpha``, ``sigma``, ``lam``
        and ``grid.is_final_clean(i)`` marks the step into ``sigma = 0`` (return the denoised
        estimate); :func:`step_order` lowers the order at the first and last steps."""
        raise NotImplementedError

    def moved(self, state: dict[str, Any]) -> None:
        """The state the last step returned (or drew) was moved before the next step: a corrector's
        Langevin/MALA/HMC moves in :func:`steerdiff.sample`, or the projection of
        :func:`~steerdiff.guidance.pcd_sample`; or the field jumped between the last evaluation and the next
        (a step across a break of the denoiser, :meth:`~steerdiff.denoiser.Denoiser.breaks`: RF-Inversion's
        editing window). Called only there, by :func:`~steerdiff.sampling.run_grid`; after a step across a
        break (:func:`~steerdiff.sampling.crossings`) also by the particle engine
        (:func:`~steerdiff.smc.run_smc`), :func:`~steerdiff.paradigms`,
        :func:`~steerdiff.solvers.dc_solver.search_ratios` and
        :class:`~steerdiff.integrations.diffusers.SteerdiffScheduler`.

        The next step starts from the moved state (or evaluates another field), so estimates made before the
        move belong to another trajectory: at the move the estimate jumps (``eps`` by ``move / sigma``,
        ``x0`` by about ``move / alpha``) and a multistep extrapolation through the jump amplifies it
        (iPNDM's weights sum to 6.7 in absolute value). The default restarts every :class:`History` held
        directly in ``state`` (the next steps warm up as at the first one); a solver that keeps other
        cross-step state (a singlestep macro-step's start, a corrector's prediction) overrides it. One-step
        solvers (empty state) keep nothing to restart.
        """
        for value in state.values():
            if isinstance(value, History):
                value.clear()

    @property
    def evals_per_step(self) -> int:
        """Network evaluations of a step into a noisy node: ``order`` if ``staged``, else 1."""
        return self.order if self.staged else 1

    def nfe(self, steps: int, clean_end: bool = True) -> int:
        """Network evaluations for ``steps`` steps: ``E = evals_per_step`` per step, one for the step
        into a clean end (it returns the denoised estimate of its first evaluation): ``E N - E + 1``
        with ``clean_end``, ``E N`` without."""
        per = self.evals_per_step
        return per * steps - (per - 1 if clean_end else 0)
