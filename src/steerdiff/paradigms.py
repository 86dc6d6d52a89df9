r"""Parallel-in-time sampling by Picard iteration: ParaDiGMS (Shih, Belkhale, Ermon, Sadigh & Anari 2023,
"Parallel Sampling of Diffusion Models", NeurIPS 2023, Alg. 1).

A one-evaluation sampler is the recursion ``x_{i+1} = F_i(x_i) = x_i + d_i(x_i)``: ``F_i`` is the solver's
step ``i`` (:meth:`~steerdiff.solvers.base.Solver.step`) with, for a stochastic step, its noise ``z_i`` drawn
once and for all (``mean + std z_i``). Over a window of ``p`` nodes from node ``t``, one Picard iteration
turns the guesses ``x^k`` into

    x^{k+1}_{t+j} = x^k_t + sum_{i=t}^{t+j-1} d_i(x^k_i),    j = 1..p,

where every ``d_i(x^k_i)`` of the window comes from *one* batched network call (the window's ``p`` nodes
stacked, row ``i`` at its own time ``t_i``). The sequential trajectory is its fixed point (the sum
telescopes), and node ``t + 1`` is exact after one iteration, ``t + j`` after ``j``. The window then slides
to the first node whose update is above the tolerance,

    ||x^{k+1}_{t+j} - x^k_{t+j}||^2 / D  >  tol^2 v_{t+j}    (any sample of the batch; ``D``: its size),

which was computed from converged nodes only and becomes the window's exact start (``p`` nodes on when
none is); the nodes that enter the window start from the last node computed. ``v_j`` is the variance of
DDPM's posterior step into node ``j``, ``sigma_j^2 (1 - e^{-2 h})`` (:func:`~steerdiff.solvers.ddim.
ancestral_split` at ``eta = 1``), whatever the solver: the paper scales the tolerance by the step's noise
variance, and diffusers' ParaDiGMS pipeline takes DDPM's for DDIM too (pairing node ``j`` with the step
leaving it rather than the one into it: DDIM at 50 and 200 steps, window 16, moves as many samples either
way on ``steerdiff bench parallel``'s mixture; at the clean end ``v = 0``).

A multistep solver's step (DPM-Solver++(2M/3M), UniPC, DEIS, iPNDM, LMS, SA-Solver, SDE-DPM-Solver++(2M/3M),
ER-SDE, MRS; the paper's ParaDPMSolver) is ``F_i(x_i; S_i)``: its state ``S_i`` holds the estimates of
earlier nodes, which step ``i - 1`` updated. One iteration takes the window's steps in order, exactly as
the sequential sampler does, from the state at the window's start, each fed its node's prediction from the
batched call: node ``i``'s step reads the estimates made at the guesses of nodes ``< i`` in the same
iteration (the sequential run reads the converged ones, so the fixed point is still the sequential
trajectory), and a window that slides by ``s`` starts from the state after step ``t + s - 1``, made with
the nodes accepted. Each step is the solver's own, so its warm-up at lower order, its order at the last
steps and its long-step rule (``max_h``) are the sequential sampler's. A corrector that redoes the last
step with the estimate at ``x_i`` before predicting (UniPC's UniC, SA-Solver's SA-Corrector) keeps
``F_i(x_i) - x_i`` a function of the guess ``x_i`` and the state: SA-Corrector adds its change of the
gradient term to ``x_i``, and UniC moves a guess by its move (:attr:`~steerdiff.solvers.base.Model.guesses`;
:mod:`steerdiff.solvers.unipc`); ``d_i`` is ``F_i(x_i) - x_i`` at the guess, not at the corrected point.
Solvers that evaluate the net more than once per step (Heun, the singlestep and staged ones, PNDM's and
PLMS's warm-up) or update from another node than their own (the singlestep DPM-Solver) are refused.

The window moves at least one node per iteration, so the run ends after at most ``steps`` *parallel
iterations* (sequential batched calls), ``steps`` exactly for ``window=1``, which is the sequential
sampler; the paper's speed-up is ``steps / iterations`` at the price of more network evaluations (every
window row counts). Converged, the result is the sequential sampler's -- :func:`steerdiff.sample` with the
same solver, grid and generator, whose draws are reproduced in the order that sampler makes them -- up to
the tolerance, and up to rounding as ``tol -> 0``. The tolerance bounds each accepted node's last update,
not its distance to the sequential trajectory, which an ODE sampler carries to the end: on the 64-d default
mixture DDIM at 50 steps and ``tol = 0.1`` ends 3-7 of 256 samples in another component than the
sequential run (none at ``tol = 0.01`` from window 16); DDPM's samples stay within 8e-4 (relative RMSE) of
its (``steerdiff bench parallel``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import solvers as _solvers
from ._checks import boolean, integer, real
from .denoiser import Denoiser, Prediction, check_denoiser, take_kwarg_rows
from .distributed.group import Ranks, ranks
from .noise import NoiseSource, PerSampleNoise, check_rows, make_noise
from .sampling import DEFAULT_SCHEDULE, check_sample_only, check_x_T, plan
from .schedules import Schedule, ScheduleLike
from .solvers import (
    DDIM,
    DDPM,
    DEIS,
    ERSDE,
    LMS,
    PNDM,
    TCD,
    DPMSolverPPMultistep,
    DPMSolverSDEMultistep,
    Euler,
    EulerAncestral,
    EulerMaruyama,
    MRSampler,
    SASolver,
    UniPC,
)
from .solvers.base import (
    Grid,
    Model,
    NonFiniteError,
    Solver,
    advance,
    map_state,
    to_sample_dtype,
    work_dtype,
)
from .solvers.ddim import ancestral_split

__all__ = ["ACCEPTED", "SAMPLE_ONLY", "ParadigmsInfo", "paradigms"]

log = logging.getLogger(__name__)

# sample's keyword arguments that paradigms has none of: in **cond they would reach the net
SAMPLE_ONLY = ("callback", "corrector", "corrector_steps", "snr")

# the solvers whose step i makes one network evaluation, at (x_i, t_i), and moves x_i by their update from it
# and the estimates of earlier steps (their state), with its noise (if any) drawn by the engine from the
# step's Transition. Not the flags' to tell: the singlestep DPM-Solver (its update starts from the
# macro-step's first node) and PNDM / PLMS (an LMS whose warm-up steps evaluate 2-4 times) are not staged
SUPPORTED = (
    DDIM,
    DDPM,
    Euler,
    EulerAncestral,
    EulerMaruyama,
    TCD,
    DPMSolverPPMultistep,
    DPMSolverSDEMultistep,
    UniPC,
    DEIS,
    LMS,
    SASolver,
    ERSDE,
    MRSampler,
)


def _supported(solver: Solver) -> bool:
    return isinstance(solver, SUPPORTED) and not isinstance(solver, PNDM)


ACCEPTED = tuple(name for name in _solvers.available() if _supported(_solvers.get(name)))


@dataclass
class ParadigmsInfo:
    """What a :func:`paradigms` run cost: ``nfe`` network evaluations (every row of every window, a guided
    denoiser's ``cost`` each), the nodes of each iteration's batched call (``windows``) and how far the
    window slid after it (``strides``, summing to the steps), with the grid, solver and schedule used."""

    nfe: int
    grid: Grid
    solver: Solver
    schedule: Schedule
    windows: list[int] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        """Parallel iterations: sequential batched network calls (the steps, for the sequential sampler)."""
        return len(self.windows)


class _CachedNoise:
    """``noise``'s draw for each step, drawn on the step's first evaluation and replayed afterwards. A step is
    first evaluated after every step before it: the draws are made in :func:`steerdiff.sample`'s order."""

    def __init__(self, noise: NoiseSource) -> None:
        self.noise = noise
        self.drawn: dict[int, Tensor] = {}

    def at(self, i: int) -> NoiseSource:
        """The source of step ``i``: its draw."""

        def draw(t_from: float, t_to: float, like: Tensor) -> Tensor:
            if i not in self.drawn:
                self.drawn[i] = self.noise(t_from, t_to, like)
            return self.drawn[i]

        return draw

    def forget(self, before: int) -> None:
        """Drop the draws of the steps before ``before``, which no window evaluates again."""
        for i in [i for i in self.drawn if i < before]:
            del self.drawn[i]


class _Replay(Model):
    """The model a solver's step sees: the prediction made for its node in the window's batched call,
    handed out once, at that node's state and time."""

    def __init__(self, den: Denoiser, noise: NoiseSource) -> None:
        super().__init__(den, None, noise)
        self.guesses = True  # x_i: the window's guess of the state the last step returned
        self._next: tuple[Tensor, float, Prediction] | None = None

    def expect(self, x: Tensor, t: float, pred: Prediction) -> None:
        """The next call must be at ``(x, t)``; it returns ``pred``."""
        self._next = (x, t, pred)

    def __call__(self, x: Tensor, t: float, step: int) -> Prediction:
        if self._next is None or self._next[0] is not x or self._next[1] != t:
            raise RuntimeError(
                f"paradigms: the solver's step {step} evaluated the model at another point than its own "
                "state and node, or twice: it is not a one-evaluation step of (x_i, i)"
            )
        pred = self._next[2]
        self._next, self.last = None, pred
        return pred


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a solver state that its steps can update without changing ``state``: new containers, the
    same tensors (a step never writes in place a tensor of its state), other objects deep-copied."""
    return map_state(state, lambda t: t, copy.deepcopy)


Window = tuple[Tensor, bool, Tensor | None, int]


def _window_prediction(
    den: Denoiser,
    xs: Tensor,
    t_rows: Tensor,
    rows: Tensor,
    n: int,
    net_dtype: torch.dtype | None,
    cond: dict[str, Any],
) -> tuple[Prediction, int]:
    """One batched call on the stacked window ``xs`` (row ``r`` at time ``t_rows[r]``, sample ``rows[r]``
    of the batch of ``n``): the prediction and the call's cost in network evaluations."""
    part = den.take_rows(rows, n)
    kwargs = take_kwarg_rows(cond, rows, n)
    pred = part(xs, t_rows, **kwargs) if net_dtype is None else part.evaluate(xs, t_rows, net_dtype, **kwargs)
    return pred, part.cost


def _evaluate(
    den: Denoiser,
    xs: Tensor,
    t_rows: Tensor,
    rows: Tensor,
    n: int,
    net_dtype: torch.dtype | None,
    cond: dict[str, Any],
    group: Ranks,
) -> Window:
    """:func:`_window_prediction` with the rows split over ``group``'s ranks and gathered on each (all of
    them on every rank where there are fewer rows than ranks): the given estimate, whether it is ``x0``, the
    learned-variance interpolation and the call's cost.

    One all_gather per call (:meth:`~steerdiff.distributed.group.Ranks.gather_many`): each rank's shard of
    its given estimate (and variance) with a row of flags -- its call's cost, whether its estimate is
    ``eps``, whether it is ``x0``, whether the call raised -- whose maximum over the ranks is the window's
    as one process has it: the cost (a guided denoiser's may depend on its rows' times), whether a rank
    failed, and the kind. A guided denoiser may give another kind for rows all inside its interval than
    for mixed rows (CFG-rescale in x0 of an eps net: x0, where the mixed rows' is eps, which one process
    gives for the whole window); where the ranks' kinds differ, a second gather takes every rank's ``eps``
    (read as the other kind, the gathered rows would be wrong). That case alone pays a second collective
    (sending both estimates every time would double every gather's bytes and derive the other estimate on
    every rank, for a case of a few windows of guidance with an interval)."""
    total = xs.shape[0]
    if group.size == 1 or total < group.size:
        pred, cost = _window_prediction(den, xs, t_rows, rows, n, net_dtype, cond)
        return pred.given, pred.x0_given, pred.var_interp, cost
    mine = group.shard(total)

    def gather(given: Tensor, var: Tensor | None, flags: list[int]) -> list[Tensor]:
        """Every rank's ``given`` (and ``var``) shard and ``flags`` row (one of ``group.size``), in one
        all_gather, in ``xs``'s dtype (a denoiser's estimates and variance are in its input's already): a
        layout that a rank whose call raised knows without a prediction (the variance where ``den`` learns
        one)."""
        sent = [given.to(xs.dtype), *([] if var is None else [var.to(xs.dtype)])]
        row = torch.tensor([flags], device=xs.device)
        return group.gather_many([*sent, row], [total] * len(sent) + [group.size])

    try:
        pred, cost = _window_prediction(den, xs[mine], t_rows[mine], rows[mine], n, net_dtype, cond)
    except Exception:  # raised once every rank knows, rather than leave them waiting at the gather
        zeros = xs.new_zeros(xs[mine].shape)
        gather(zeros, zeros if den.learned_variance else None, [0, 0, 0, 1])
        raise
    given, *var, every = gather(pred.given, pred.var_interp, [cost, not pred.x0_given, pred.x0_given, 0])
    cost, some_eps, some_x0, failed = every.amax(0).tolist()
    if failed:
        raise RuntimeError(
            f"paradigms: a rank of the group failed in the network call (it raised its error); so stops rank "
            f"{group.rank}"
        )
    if some_eps and some_x0:
        given = group.gather(pred.eps, total)
    return given, not some_eps, var[0] if var else None, cost


@overload
def paradigms(
    den: Denoiser,
    x_T: Tensor,
    steps: int,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    final: str = ...,
    window: int = ...,
    tol: float = ...,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = ...,
    group: object = ...,
    progress: bool = ...,
    return_info: Literal[False] = ...,
    **cond: Any,
) -> Tensor: ...


@overload
def paradigms(
    den: Denoiser,
    x_T: Tensor,
    steps: int,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    final: str = ...,
    window: int = ...,
    tol: float = ...,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = ...,
    group: object = ...,
    progress: bool = ...,
    return_info: Literal[True],
    **cond: Any,
) -> tuple[Tensor, ParadigmsInfo]: ...


def paradigms(
    den: Denoiser,
    x_T: Tensor,
    steps: int,
    solver: str | Solver | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    final: str = "zero",
    window: int = 16,
    tol: float = 0.01,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = None,
    group: object = None,
    progress: bool = False,
    return_info: bool = False,
    **cond: Any,
) -> Tensor | tuple[Tensor, ParadigmsInfo]:
    """Sample ``den`` from ``x_T`` in ``steps`` steps of ``solver`` by ParaDiGMS's sliding-window Picard
    iteration (module docstring): the result of :func:`steerdiff.sample` with the same ``steps``, ``solver``,
    ``schedule``, ``final`` and ``generator``, up to ``tol``, in fewer sequential (batched) network calls.

    Args:
        den, x_T, steps, schedule, final, progress, **cond: as :func:`steerdiff.sample` (``steps`` >= 1,
            no default: the method pays off on long grids); ``**cond`` holds none of the keywords of
            :func:`steerdiff.sample` that this function lacks (:data:`SAMPLE_ONLY`: ``callback``,
            ``corrector``, ``corrector_steps``, ``snr``), which would reach the net.
        solver: a solver with one network evaluation per step, at its own node (module docstring): a name
            of :data:`ACCEPTED` or an instance of DDIM (any ``eta``), DDPM, Euler, EulerAncestral,
            EulerMaruyama, TCD (LCM), DPMSolverPPMultistep, DPMSolverSDEMultistep, UniPC, DEIS, LMS
            (iPNDM), SASolver, ERSDE, MRSampler; default (``None``) :func:`steerdiff.sample`'s,
            :func:`~steerdiff.sampling.default_solver` (UniPC-3; a guided denoiser's UniPC-2 or
            DPM-Solver++(2M)).
        window: ``p``, the nodes evaluated together in one batched call (``p`` times the batch), an
            integer >= 1 (capped at ``steps``; 1 is the sequential sampler); default 16.
        tol: ``tau > 0``, the tolerance relative to each node's step standard deviation; default 0.01, not
            the paper's 0.1: at 0.1 an ODE sampler (DDIM, 50 steps, window 16) ends 7 of 256 samples of
            ``steerdiff bench parallel``'s mixture in another component than the sequential run, 2.5 times
            its error against the exact ODE solution (0.198 against 0.078); at 0.01 none from window 16 up,
            for 0.86-1.46 times the parallel iterations (1.2 for DDPM 1000 steps, window 64; 0.86 for UniPC
            200 steps, window 64). SDE samplers keep their law at 0.1.
        generator: as :func:`steerdiff.sample`; each stochastic step's noise is drawn once, in that
            sampler's order, and kept for the step's re-evaluations.
        group: ``None``, or a ``torch.distributed`` process group (:mod:`steerdiff.distributed.group`) over
            whose ranks every window's rows are split; every rank makes the same call (same arguments,
            same generator state) and returns the same result; where one rank's network call raises, that
            rank raises its error and the others a ``RuntimeError`` saying so (none waits at the gather).
        return_info: also return a :class:`ParadigmsInfo` (parallel iterations, NFE, windows, strides).

    Raises:
        ValueError: bad arguments (the message names the argument and the accepted values), a keyword of
            :data:`SAMPLE_ONLY`, or a denoiser that draws noise of its own (a re-evaluated step would draw
            it again).
        NonFiniteError: the network returned NaN/inf (the message names the step and time).
        RuntimeError: with ``group``, another rank's network call failed.
    """
    who = "paradigms"
    check_denoiser(who, "den", den)
    check_x_T(den, x_T, who)
    check_sample_only(
        who,
        cond,
        SAMPLE_ONLY,
        "whose Picard iteration evaluates every step of a window at once, again at each iteration: it "
        "calls back between no two steps and moves no corrector; accepted: den, x_T, steps, solver, "
        "schedule, final, window, tol, generator, group, progress, return_info and the net's conditions "
        "(**cond)",
    )
    sched, grid, slv = plan(den, steps, solver, schedule, final, who)
    steps = grid.steps
    window = min(integer(who, "window", window, lo=1), steps)
    tol = real(who, "tol", tol, lo=0, lo_open=True)
    progress = boolean(who, "progress", progress)
    return_info = boolean(who, "return_info", return_info)
    ranked = ranks(who, group)
    own = [name for name, _ in den.own_noise()]
    if own:
        raise ValueError(
            f"{who}: den: {', '.join(dict.fromkeys(own))} in the denoiser draws noise of its own, which "
            "every re-evaluation of a step would draw again: use steerdiff.sample"
        )
    if not _supported(slv):
        raise ValueError(
            f"{who}: solver={solver!r} does not take each step from its own node with one network evaluation "
            f"there; accepted: {list(ACCEPTED)} or an instance of {', '.join(c.__name__ for c in SUPPORTED)} "
            "(not PNDM)"
        )
    noise = make_noise(generator, who)
    if isinstance(noise, PerSampleNoise):
        check_rows(noise.generators, len(x_T), who)
    if slv.noisy_on(grid) and not callable(generator):  # every rank draws the steps' noise: alike, or they
        ranked.check_generator(who, generator, x_T.device)  # part (a noise source of a path is not checked)

    n, dtype = len(x_T), work_dtype(x_T.dtype)
    net_dtype = x_T.dtype if dtype != x_T.dtype else None
    state = slv.init_state(grid)
    # a multistep solver's state holds estimates of earlier nodes: each iteration starts from the window
    # start's (a copy made in the iteration before); a one-step solver's (none, or grid tables) is read only
    multistep = bool(state) and not slv.static_state
    replay, draws = _Replay(den, noise), _CachedNoise(noise)
    # tol^2 v_j of nodes 0..N (node 0 is never compared)
    limits = [0.0] + [tol**2 * ancestral_split(grid, j, 1.0)[1] ** 2 for j in range(steps)]
    info = ParadigmsInfo(0, grid, slv, sched)
    rows_of: dict[int, Tensor] = {}
    show = progress and ranked.rank == 0  # one bar for the group
    bar = tqdm(total=steps, desc=f"ParaDiGMS {slv.name}", leave=False) if show else None

    # buf[j]: the guess at node start + j; buf[0] is exact
    start, buf = 0, x_T.to(dtype).expand(window + 1, *x_T.shape).clone()
    while start < steps:
        width = len(buf) - 1
        nodes = range(start, start + width)
        rows = rows_of.setdefault(width, torch.arange(n, device=x_T.device).repeat(width))
        t_rows = torch.tensor([grid.t[i] for i in nodes], dtype=torch.float64).repeat_interleave(n)
        given, x0_given, var, cost = _evaluate(
            den, buf[:width].flatten(0, 1), t_rows, rows, n, net_dtype, cond, ranked
        )
        info.nfe += width * cost
        given = given.unflatten(0, (width, n))
        var = None if var is None else var.unflatten(0, (width, n))
        moves = []  # F_start(x_start), then d_i(x_i) = F_i(x_i) - x_i
        after = []  # a multistep solver's state after node j's step; the steps update `state` itself
        for j, i in enumerate(nodes):
            x = buf[j]
            alpha, sigma = den.coefficients(grid.t[i], x)[:2]  # the floats of a call at t_i alone
            pred = Prediction(x, alpha, sigma, **{"x0" if x0_given else "eps": given[j]})
            pred.var_interp = None if var is None else var[j]
            replay.expect(x, grid.t[i], pred)
            out = advance(slv.step(replay, x, i, grid, state), draws.at(i), grid.t[i], grid.t[i + 1])
            moves.append(out if j == 0 else out - x)
            if multistep:
                after.append(_copy_state(state))
        new = torch.cumsum(torch.stack(moves), 0)  # x_start + sum d_i, the first term F_start(x_start) exact
        err = (new - buf[1:]).square().flatten(2).mean(2)  # (width, n)
        limit = torch.tensor(limits[start + 1 : start + width + 1], dtype=err.dtype, device=err.device)
        finite = torch.isfinite(given.flatten(2)).all(2).all(1)
        if var is not None:
            finite &= torch.isfinite(var.flatten(2)).all(2).all(1)
        flags = torch.stack([(err > limit[:, None]).any(1), ~finite]).tolist()  # one device read
        if True in flags[1]:
            i = start + flags[1].index(True)
            raise NonFiniteError(
                f"{who}: the model returned NaN/inf at step {i} (process time t={grid.t[i]:.6g}, parallel "
                f"iteration {info.iterations + 1})"
            )
        stride = flags[0].index(True) + 1 if True in flags[0] else width
        info.windows.append(width)
        info.strides.append(stride)
        start += stride
        if multistep:  # the state the new start's step reads, made in this iteration from the accepted nodes
            state = after[stride - 1]
        draws.forget(start)
        # the exact node onwards, then the nodes entering the window at the last one computed
        kept = torch.cat([buf[:1], new])[stride:]
        grow = min(window, steps - start) + 1 - len(kept)  # >= 0: the window never shrinks but at the end
        buf = torch.cat([kept, kept[-1:].expand(grow, *kept.shape[1:])])
        if bar is not None:
            bar.update(stride)
    if bar is not None:
        bar.close()
    log.debug(
        "paradigms %s: %d steps in %d parallel iterations, %d NFE", slv.name, steps, info.iterations, info.nfe
    )
    x = to_sample_dtype(who, buf[0], x_T.dtype)
    return (x, info) if return_info else x
