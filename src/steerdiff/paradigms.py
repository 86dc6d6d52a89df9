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
The singlestep DPM-Solver is one of these: its intermediate points are grid nodes, each step one evaluation
at its own, and a step's update starts from its macro-step's first node, held in the state (``F_i`` reads
``x_i`` through its estimate alone; the sum still telescopes at the fixed point, node ``t + j`` exact after
``j`` iterations).

A staged solver (Heun, DPM-Solver-2 / DPM-Solver++(2S) and their ancestral forms, the singlestep
SDE-DPM-Solver++, EDM's stochastic sampler, Restart) evaluates the net several times in a step, each stage at
a point made from the ones before, and keeps no state but tables of the grid: ``F_i(x_i)`` is a function of
``x_i`` alone, given the step's noise. An iteration takes the window's steps together, stage by stage: pass
``k`` takes every step from its start to its ``k``-th stage (handing it the predictions of the stages before)
and one batched call evaluates those stages, each row at its own time. So an iteration makes ``K``
sequential batched calls for steps of ``K`` stages (the stages of the window's longest step,
:attr:`ParadigmsInfo.calls`) and the fixed point is the sequential trajectory as before. A step's noise is
drawn in a first run of the step alone, with stand-in predictions, as the step enters the window (in node
order, so in :func:`steerdiff.sample`'s order: a step's draws and stages follow the grid, never the values),
and replayed in every pass. Restart's step into a restart node makes ``2 + 2 K N`` evaluations in a row,
which every iteration whose window holds it pays: it converges to the sequential result, but at 30 steps on
the 8-d test mixture in 106 sequential calls at the default ``tol`` against the sequential sampler's 77.
PNDM's and PLMS's warm-up steps evaluate several times and the steps after read the estimates they leave: a
step's stages would wait for the last stage of the step before, and they are refused. With ``group``, each
rank takes its share of a staged window's rows through every stage with calls of its own, and one all_gather
per iteration brings every rank the steps' results.

The window moves at least one node per iteration, so the run ends after at most ``steps`` *parallel
iterations*, ``steps`` exactly for ``window=1``, which is the sequential sampler; each makes one sequential
batched call (a staged solver's one per stage); the paper's speed-up is ``steps / iterations`` (sequential
calls against the sequential sampler's NFE, for a staged solver) at the price of more network evaluations
(every window row counts). Converged, the result is the sequential sampler's -- :func:`steerdiff.sample` with
the same solver, grid and generator, whose draws are reproduced in the order that sampler makes them -- up to
the tolerance, and up to rounding as ``tol -> 0``. The tolerance bounds each accepted node's last update, not
its distance to the sequential trajectory, which an ODE sampler carries to the end: on the 64-d default
mixture DDIM at 50 steps and ``tol = 0.1`` ends 3-7 of 256 samples in another component than the sequential
run (none at ``tol = 0.01`` from window 16); DDPM's samples stay within 8e-4 (relative RMSE) of its
(``steerdiff bench parallel``).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import solvers as _solvers
from ._checks import boolean, integer, real
from ._ops import host_to, laid_out_as
from .denoiser import Denoiser, Prediction, check_denoiser, predict_rows
from .distributed.group import Ranks, ranks, spread_run
from .noise import NoiseSource, PerSampleNoise, ReplayNoise, check_rows, make_noise
from .sampling import DEFAULT_SCHEDULE, check_sample_only, check_x_T, crossings, diverged_step, plan
from .schedules import Schedule, ScheduleLike
from .solvers.base import (
    Grid,
    Model,
    NonFiniteError,
    Solver,
    advance,
    data_scale,
    map_state,
    state_bound,
    to_sample_dtype,
    work_dtype,
)
from .solvers.ddim import ancestral_split

__all__ = ["ACCEPTED", "SAMPLE_ONLY", "ParadigmsInfo", "paradigms"]

log = logging.getLogger(__name__)

# sample's keyword arguments that paradigms has none of: in **cond they would reach the net
SAMPLE_ONLY = ("callback", "corrector", "corrector_steps", "snr")


def _supported(solver: Solver) -> bool:
    """Whether the Picard iteration takes ``solver``'s steps (:attr:`~steerdiff.solvers.base.Solver.picard`:
    ``"step"``, one evaluation per step at its own node, the steps in order after one batched call;
    ``"stages"``, a step of its start alone given its noise, one batched call per stage, :func:`_staged`)."""
    return solver.picard in ("step", "stages")


ACCEPTED = tuple(name for name in _solvers.available() if _supported(_solvers.get(name)))


@dataclass
class ParadigmsInfo:
    """What a :func:`paradigms` run cost: ``nfe`` network evaluations (every row of every window, a guided
    denoiser's ``cost`` each), the nodes of each iteration's batched call (``windows``) and how far the
    window slid after it (``strides``, summing to the steps), the sequential batched calls (``calls``), with
    the grid, solver and schedule used."""

    nfe: int
    grid: Grid
    solver: Solver
    schedule: Schedule
    windows: list[int] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)
    calls: int = 0

    @property
    def iterations(self) -> int:
        """Parallel (Picard) iterations (the steps, for the sequential sampler). Each makes one sequential
        batched network call, a staged solver's one per stage of its window's longest step (:attr:`calls`)."""
        return len(self.windows)


class _CachedNoise:
    """``noise``'s draws for each step, drawn on the step's first run and replayed, in the order the step
    makes them, on every run after. A step first runs after every step before it (a staged one first runs
    alone, :meth:`_Stages.count`): the draws are made in :func:`steerdiff.sample`'s order."""

    def __init__(self, noise: NoiseSource) -> None:
        self.noise = noise
        self.drawn: dict[int, list[Tensor]] = {}

    def at(self, i: int, rows: slice | None = None) -> NoiseSource:
        """The source of one run of step ``i``: its draws, in order; ``rows``: a run on these rows of the
        batch (a rank's share of a window) after a run that made the draws on the whole batch."""
        drawn = self.drawn.setdefault(i, [])
        made = itertools.count()

        def draw(t_from: float, t_to: float, like: Tensor) -> Tensor:
            k = next(made)
            if k == len(drawn):
                if rows is not None:
                    raise RuntimeError(f"paradigms: step {i} drew more noise than in its first run")
                drawn.append(self.noise(t_from, t_to, like))
            return drawn[k] if rows is None else drawn[k][rows]

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


class _Ask(Exception):
    """A staged step's next evaluation, at ``x`` and time ``t``, asked for in a pass of :class:`_Stages`."""

    def __init__(self, x: Tensor, t: float) -> None:
        super().__init__()
        self.x, self.t = x, t


class _Stages(Model):
    """The model a staged step sees: the step is taken from its start in every pass of an iteration, handed
    the predictions of its stages made so far in order, and stopped at the next (:class:`_Ask`), which the
    pass's batched call makes. The passes take the same stages (a step of a function of its start and its
    noise, whose stages are chosen by the grid, never by values: control flow on CPU scalars)."""

    def __init__(self, den: Denoiser, noise: NoiseSource) -> None:
        super().__init__(den, None, noise)
        self.made: list[tuple[float, Prediction]] | None = []
        self.asked = 0
        self.times: list[float] = []  # the stages' times in count's run

    def take(
        self,
        slv: Solver,
        x: Tensor,
        i: int,
        grid: Grid,
        state: dict[str, Any],
        made: list[tuple[float, Prediction]] | None,
        noise: NoiseSource,
    ) -> Tensor | _Ask:
        """Step ``i`` from ``x`` (``made``: its stages' ``(t, prediction)`` so far; ``noise``: its draws): the
        state at node ``i + 1``, or the next stage asked for."""
        self.made, self.asked, self.noise = made, 0, noise
        try:
            return advance(slv.step(self, x, i, grid, state), noise, grid.t[i], grid.t[i + 1])
        except _Ask as ask:
            return ask

    def count(
        self, slv: Solver, x: Tensor, i: int, grid: Grid, state: dict[str, Any], noise: NoiseSource
    ) -> list[float]:
        """Step ``i``'s evaluations, the times of its stages in order, from a run with stand-in predictions
        (``x0 = x``) on the whole batch, which makes its draws (``noise``)."""
        self.times = []
        self.take(slv, x, i, grid, state, None, noise)
        return self.times

    def __call__(self, x: Tensor, t: float, step: int) -> Prediction:
        made, k = self.made, self.asked
        self.asked += 1
        if made is None:  # count's stand-in
            self.times.append(t)
            return Prediction(x, 1.0, 1.0, x0=x)
        if k == len(made):
            raise _Ask(x, t)
        if made[k][0] != t or made[k][1].x.shape != x.shape:
            raise RuntimeError(
                f"paradigms: the solver's step {step} evaluated the model at another time than in its pass "
                "before: its stages are not a function of its start"
            )
        self.last = made[k][1]
        return self.last


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a solver state that its steps can update without changing ``state``: new containers, the
    same tensors (a step never writes in place a tensor of its state), other objects deep-copied."""
    return map_state(state, lambda t: t, copy.deepcopy)


Window = tuple[Tensor, bool, Tensor | None, int]


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
    """:func:`~steerdiff.denoiser.predict_rows` with the rows split over ``group``'s ranks and gathered on
    each (all of them on every rank where there are fewer rows than ranks): the given estimate, whether it is
    ``x0``, the learned-variance interpolation and the call's cost.

    One all_gather per call (:meth:`~steerdiff.distributed.group.Ranks.gather_many`): each rank's shard of
    its given estimate (and variance) with a row of flags -- whether the call raised (every rank then raises:
    :meth:`~steerdiff.distributed.group.Ranks.fail_together`), its cost, whether its estimate is ``eps``,
    whether it is ``x0`` -- whose maximum over the ranks is the window's as one process has it: the cost (a
    guided denoiser's may depend on its rows' times) and the kind. A guided denoiser may give another kind
    for rows all inside its interval than for mixed rows (CFG-rescale in x0 of an eps net: x0, where the
    mixed rows' is eps, which one process gives for the whole window); where the ranks' kinds differ, a
    second gather takes every rank's ``eps`` (read as the other kind, the gathered rows would be wrong).
    That case alone pays a second collective (sending both estimates every time would double every
    gather's bytes and derive the other estimate on every rank, for a case of a few windows of guidance
    with an interval)."""
    total = xs.shape[0]
    if group.size == 1 or total < group.size:
        pred, cost = predict_rows(den, xs, t_rows, rows, n, net_dtype, cond)
        return pred.given, pred.x0_given, pred.var_interp, cost
    mine = group.shard(total)

    def share(done: tuple[Prediction, int] | None) -> tuple[tuple[list[Tensor], list[list[int]]], list[int]]:
        """Every rank's ``given`` (and variance) shard and flags row (whether its call raised, its cost,
        whether its estimate is ``eps``, whether it is ``x0``), in one all_gather, in ``xs``'s dtype (a
        denoiser's estimates and variance are in its input's already); a rank whose call raised sends zeros
        in the others' layout (the variance where ``den`` learns one). The flags read once."""
        if done is None:
            zeros = xs.new_zeros(xs[mine].shape)
            given, var, flags = zeros, zeros if den.learned_variance else None, [1, 0, 0, 0]
        else:
            pred, cost = done
            given, var, flags = pred.given, pred.var_interp, [0, cost, not pred.x0_given, pred.x0_given]
        sent = [given.to(xs.dtype), *([] if var is None else [var.to(xs.dtype)])]
        *whole, every = group.gather_many(
            [*sent, torch.tensor([flags], device=xs.device)], [total] * len(sent) + [group.size]
        )
        table = every.tolist()
        return (whole, table), [row[0] for row in table]

    def call() -> tuple[Prediction, int]:
        return predict_rows(den, xs[mine], t_rows[mine], rows[mine], n, net_dtype, cond)

    (pred, _), ((given, *var), every) = group.fail_together("paradigms", call, share)
    cost, some_eps, some_x0 = map(max, list(zip(*every, strict=True))[1:])
    if some_eps and some_x0:
        given = group.gather(pred.eps, total)
    return given, not some_eps, var[0] if var else None, cost


def _sequenced(
    replay: _Replay,
    slv: Solver,
    grid: Grid,
    state: dict[str, Any],
    buf: Tensor,
    start: int,
    t_nodes: Tensor,
    net_dtype: torch.dtype | None,
    cond: dict[str, Any],
    draws: _CachedNoise,
    group: Ranks,
    multistep: bool,
    jumps: frozenset[int],
) -> tuple[Tensor, Tensor, int, list[dict[str, Any]]]:
    """A one-evaluation solver's step ``F_i(x_i)`` at every guess ``buf[j]`` of the window from node
    ``start``: one batched call (:func:`_evaluate`; ``t_nodes``: the grid's times ``t_0 .. t_{N-1}`` in
    float64 on ``buf``'s device, whose rows the call's times are taken from there), then the steps in order,
    each fed its node's prediction, the solver's history restarted after a step across a break of the field
    (``jumps``, :func:`crossings`), as :func:`~steerdiff.sampling.run_grid` restarts it. Returns the results
    ``(width, n, ...)``, whether each node's estimates were finite, the NFE and a multistep solver's state
    after each step (``state`` itself is updated by the steps)."""
    den, (width, n) = replay.denoiser, buf.shape[:2]
    width -= 1
    rows = torch.arange(n, device=buf.device).repeat(width)
    t_rows = t_nodes[start : start + width].repeat_interleave(n)
    given, x0_given, var, cost = _evaluate(
        den, buf[:width].flatten(0, 1), t_rows, rows, n, net_dtype, cond, group
    )
    given = given.unflatten(0, (width, n))
    var = None if var is None else var.unflatten(0, (width, n))
    outs, after = [], []
    for j in range(width):
        i, x = start + j, buf[j]
        pred = _node_prediction(den, x, grid.t[i], given[j], x0_given, None if var is None else var[j])
        replay.expect(x, grid.t[i], pred)
        outs.append(advance(slv.step(replay, x, i, grid, state), draws.at(i), grid.t[i], grid.t[i + 1]))
        if i in jumps:
            slv.moved(state)
        if multistep:
            after.append(_copy_state(state))
    finite = torch.isfinite(given.flatten(2)).all(2).all(1)
    if var is not None:
        finite &= torch.isfinite(var.flatten(2)).all(2).all(1)
    return torch.stack(outs), finite, width * cost, after


def _node_prediction(
    den: Denoiser, x: Tensor, t: float, given: Tensor, x0_given: bool, var: Tensor | None
) -> Prediction:
    """The prediction at ``(x, t)`` from its rows of a batched call: the call's estimate ``given`` (``x0`` or
    not) and variance, with the floats ``alpha``, ``sigma`` of a call at ``t`` alone."""
    alpha, sigma = den.coefficients(t, x)[:2]
    pred = Prediction(x, alpha, sigma, **{"x0" if x0_given else "eps": given})
    pred.var_interp = var
    return pred


def _stage_passes(
    stages: _Stages,
    slv: Solver,
    grid: Grid,
    state: dict[str, Any],
    jobs: list[tuple[int, Tensor, slice]],
    times: list[list[float]],
    n: int,
    net_dtype: torch.dtype | None,
    cond: dict[str, Any],
    draws: _CachedNoise,
) -> tuple[list[Tensor], list[int], list[tuple[int, int, Tensor]]]:
    """Staged steps taken together: ``jobs`` holds ``(i, x, rows)``, step ``i`` from ``x``, its rows ``rows``
    of the batch, which evaluates at ``times[i]`` (:meth:`_Stages.count`, which made its draws). Pass ``k``
    takes every step from its start to its ``k``-th stage, whose points are evaluated in one batched call.
    Returns the steps' results, each call's cost and ``(i, k, finite)`` of each stage's estimates."""
    made: list[list[tuple[float, Prediction]]] = [[] for _ in jobs]
    outs: list[Tensor | None] = [None] * len(jobs)
    costs: list[int] = []
    checks: list[tuple[int, int, Tensor]] = []
    for _ in range(max((len(times[i]) for i, _, _ in jobs), default=0) + 1):
        asks = []
        for a, (i, x, rows) in enumerate(jobs):
            if outs[a] is None:
                got = stages.take(slv, x, i, grid, state, made[a], draws.at(i, rows))
                if isinstance(got, _Ask):
                    asks.append((a, got))
                else:
                    outs[a] = got
        if not asks:
            break
        xs = torch.cat([ask.x for _, ask in asks])
        # the rows' times and samples filled on the device: no host-to-device copy per call
        t_rows = torch.cat(
            [torch.full((len(ask.x),), ask.t, dtype=torch.float64, device=xs.device) for _, ask in asks]
        )
        samples = torch.cat([torch.arange(n, device=xs.device)[jobs[a][2]] for a, _ in asks])
        pred, cost = predict_rows(stages.denoiser, xs, t_rows, samples, n, net_dtype, cond)
        costs.append(cost)
        sizes = [len(ask.x) for _, ask in asks]
        var = [None] * len(asks) if pred.var_interp is None else pred.var_interp.split(sizes)
        for (a, ask), given, v in zip(asks, pred.given.split(sizes), var, strict=True):
            made[a].append((ask.t, _node_prediction(stages.denoiser, ask.x, ask.t, given, pred.x0_given, v)))
            finite = torch.isfinite(given).all()
            finite = finite if v is None else finite & torch.isfinite(v).all()
            checks.append((jobs[a][0], len(made[a]) - 1, finite))
    for (i, _, _), out, m in zip(jobs, outs, made, strict=True):
        if out is None or len(m) != len(times[i]):
            raise RuntimeError(
                f"paradigms: the solver's step {i} evaluated the model {len(m)} times or more, "
                f"{len(times[i])} times in its first run: its stages are not a function of its start"
            )
    return outs, costs, checks  # type: ignore[return-value]  # every out was checked above


def _staged(
    stages: _Stages,
    slv: Solver,
    grid: Grid,
    state: dict[str, Any],
    buf: Tensor,
    start: int,
    times: list[list[float]],
    net_dtype: torch.dtype | None,
    cond: dict[str, Any],
    draws: _CachedNoise,
    group: Ranks,
) -> tuple[Tensor, Tensor, int, int]:
    """A staged solver's step ``F_i(x_i)`` at every guess ``buf[j]`` of the window from node ``start``, its
    stages taken together (:func:`_stage_passes`; step ``i`` evaluates at ``times[i]``): the results
    ``(width, n, ...)``, each node's first stage whose estimates were not finite (the sequential calls where
    all were), the NFE (the calls' costs times the steps evaluated in each) and the sequential calls (the
    stages of the window's longest step).

    With ``group``, each rank takes its share of the window's rows (steps on a share of the batch: their
    draws were made on the whole) through every stage, its calls its own, and one all_gather per iteration
    brings every rank the results with a row of flags: whether its calls raised (every rank then raises:
    :meth:`~steerdiff.distributed.group.Ranks.fail_together`), their costs, whose maximum over the ranks is
    one process's, and its first non-finite stage per node."""
    width, n = len(buf) - 1, buf.shape[1]
    evals = [len(ts) for ts in times[start : start + width]]
    total, depth = width * n, max(evals)
    split = group.size > 1 and total >= group.size
    mine = group.shard(total) if split else slice(0, total)
    jobs = []
    for j in range(width):
        lo, hi = max(mine.start - j * n, 0), min(mine.stop - j * n, n)
        if lo < hi:
            jobs.append((start + j, buf[j][lo:hi], slice(lo, hi)))

    def passes() -> tuple[Tensor, list[int], Tensor]:
        """This rank's steps through every stage: their results, each call's cost (0 past the calls made)
        and each node's first non-finite stage."""
        outs, costs, checks = _stage_passes(stages, slv, grid, state, jobs, times, n, net_dtype, cond, draws)
        # ok[j, k]: node j's stage k finite (or not evaluated here), set on the device: no index copied over
        ok = torch.ones((width, depth), dtype=torch.bool, device=buf.device)
        for i, k, finite in checks:
            ok[i - start, k] = finite
        first = torch.where(ok, depth, torch.arange(depth, device=buf.device)).amin(1)
        return torch.cat(outs), costs + [0] * (depth - len(costs)), first

    def share(
        done: tuple[Tensor, list[int], Tensor] | None,
    ) -> tuple[tuple[Tensor, list[list[int]], Tensor], list[int]]:
        """Every rank's results and flags row (whether its calls raised, their costs, its first non-finite
        stage per node) in one all_gather; a rank whose calls raised sends zeros. The flags read once."""
        if done is None:
            mine_out = buf.new_zeros(mine.stop - mine.start, *buf.shape[2:])
            flags = buf.new_tensor([[1] + [0] * (depth + width)], dtype=torch.int64)
        else:
            mine_out, costs, first = done
            flags = torch.cat([torch.tensor([0, *costs], device=buf.device), first])[None]
        result, every = group.gather_many([mine_out, flags], [total, group.size])
        table = every[:, : depth + 1].tolist()
        return (result, table, every[:, depth + 1 :].amin(0)), [row[0] for row in table]

    if split:
        _, (result, table, first) = group.fail_together("paradigms", passes, share)
        costs = list(map(max, list(zip(*table, strict=True))[1:]))
    else:
        result, costs, first = passes()
    # the steps evaluated at stage k: those of more than k evaluations
    nfe = sum(cost * sum(e > k for e in evals) for k, cost in enumerate(costs))
    return result.unflatten(0, (width, n)), first, nfe, depth


@overload
def paradigms(
    den: Denoiser,
    x_T: Tensor,
    steps: int | None = ...,
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
    steps: int | None = ...,
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


@spread_run
def paradigms(
    den: Denoiser,
    x_T: Tensor,
    steps: int | None = None,
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
        den, x_T, steps, schedule, final, progress, **cond: as :func:`steerdiff.sample` (``steps=None``:
            an explicit grid's count, else its 10; the method pays off on long grids, as the module says);
            ``**cond`` holds none of the keywords of :func:`steerdiff.sample` that this function lacks
            (:data:`SAMPLE_ONLY`: ``callback``, ``corrector``, ``corrector_steps``, ``snr``), which would
            reach the net.
        solver: a solver with one network evaluation per step, at its own node, or a staged one whose step
            is a function of its start alone (module docstring): a name of :data:`ACCEPTED` (every
            registered solver but ``pndm`` / ``plms``) or an instance whose class says so
            (:attr:`~steerdiff.solvers.base.Solver.picard`: ``"step"`` or ``"stages"``; e.g. DDIM at any
            ``eta``, :class:`~steerdiff.eta_inversion.EtaDDIM` with the maps of
            :func:`~steerdiff.eta_invert`, Heun); default (``None``) :func:`steerdiff.sample`'s,
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
        return_info: also return a :class:`ParadigmsInfo` (parallel iterations, sequential calls, NFE,
            windows, strides).

    Raises:
        ValueError: bad arguments (the message names the argument and the accepted values), a keyword of
            :data:`SAMPLE_ONLY`, or a denoiser that draws noise of its own (a re-evaluated step would draw
            it again).
        NonFiniteError: the network returned NaN/inf (the message names the step and time).
        RuntimeError: with ``group``, another rank's network call failed.
    """
    who = "paradigms"
    check_denoiser(who, "den", den)
    size = check_x_T(den, x_T, who)
    check_sample_only(
        who,
        cond,
        SAMPLE_ONLY,
        "whose Picard iteration evaluates every step of a window at once, again at each iteration: it "
        "calls back between no two steps and moves no corrector; accepted: den, x_T, steps, solver, "
        "schedule, final, window, tol, generator, group, progress, return_info and the net's conditions "
        "(**cond)",
    )
    sched, grid, slv = plan(den, steps, solver, schedule, final, who, ACCEPTED)
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
            f"{who}: solver={solver!r} is neither a solver of one network evaluation per step, at its own "
            "node, nor a staged one whose step is a function of its start alone (PNDM's and PLMS's warm-up "
            "steps evaluate several times and the steps after read their estimates); accepted: "
            f"{list(ACCEPTED)} or a Solver instance whose picard is 'step' or 'stages' (its class says how "
            f"its steps run; {type(slv).__name__}'s is {slv.picard!r})"
        )
    noise = make_noise(generator, who)
    if isinstance(noise, PerSampleNoise):
        check_rows(noise.generators, len(x_T), who)
    if isinstance(noise, ReplayNoise):  # its solver, grid and batch, as sample checks them
        noise.check_run(who, slv, grid, x_T)
    dtype = work_dtype(x_T.dtype)
    net_dtype = x_T.dtype if dtype != x_T.dtype else None
    state = slv.init_state(grid)
    # the set-up's end on every rank (spread_run: a rank whose set-up raised makes it too): every rank draws
    # the steps' noise, so the generators must be alike where the solver draws any (a noise source of a path
    # is not checked; an empty list checks nothing)
    checked = generator if slv.noisy_on(grid) and not callable(generator) else []
    ranked.start(who, checked, x_T.device)
    # a multistep solver's state holds estimates of earlier nodes: each iteration starts from the window
    # start's (a copy made in the iteration before); a one-step solver's (none, or grid tables) is read only
    multistep = bool(state) and not slv.static_state
    jumps = crossings(den, grid)
    staged = slv.picard == "stages"
    replay, stages, draws = _Replay(den, noise), _Stages(den, noise), _CachedNoise(noise)
    times: list[list[float]] = []  # a staged solver's evaluation times in each step, from its first run
    # the grid's times t_0 .. t_{N-1} of the steps' rows, the tolerances tol^2 v_{j+1} of the nodes they
    # reach and the divergence guard's bounds there (state_bound), on the device once per run (a copy per
    # iteration would be a sync), float64
    scale = data_scale(size)
    bounds = [state_bound(scale, grid.alpha[j + 1], grid.sigma[j + 1]) for j in range(steps)]
    table = torch.tensor(
        [grid.t[:steps], [tol**2 * ancestral_split(grid, j, 1.0)[1] ** 2 for j in range(steps)], bounds],
        dtype=torch.float64,
    )
    t_nodes, limits, far_from = host_to(table, x_T.device).unbind()
    diverged = diverged_step(slv, replay, f"{who}: the solver {slv.name!r}")
    info = ParadigmsInfo(0, grid, slv, sched)
    show = progress and ranked.rank == 0  # one bar for the group
    bar = tqdm(total=steps, desc=f"ParaDiGMS {slv.name}", leave=False) if show else None

    # buf[j]: the guess at node start + j; buf[0] is exact
    start, buf = 0, x_T.to(dtype).expand(window + 1, *x_T.shape).clone()
    while start < steps:
        width = len(buf) - 1
        if staged:
            # the steps entering the window, counted in order: their draws made in sd.sample's order
            for i in range(len(times), start + width):
                times.append(stages.count(slv, buf[i - start], i, grid, state, draws.at(i)))
            outs, first, nfe, calls = _staged(
                stages, slv, grid, state, buf, start, times, net_dtype, cond, draws, ranked
            )
            finite = first == calls
            after: list[dict[str, Any]] = []
        else:
            outs, finite, nfe, after = _sequenced(
                replay,
                slv,
                grid,
                state,
                buf,
                start,
                t_nodes,
                net_dtype,
                cond,
                draws,
                ranked,
                multistep,
                jumps,
            )
            calls = 1
        info.nfe += nfe
        info.calls += calls
        # x_start + sum d_i with d_i(x_i) = F_i(x_i) - x_i, the first term F_start(x_start) exact
        new = torch.cumsum(torch.cat([outs[:1], outs[1:] - buf[1:width]]), 0)
        err = (new - buf[1:]).square().flatten(2).mean(2)  # (width, n)
        limit = limits[start : start + width].to(err.dtype)
        # the divergence guard on each new node: its largest |entry| past state_bound, or NaN
        low, high = torch.aminmax(
            new.flatten(1), dim=1
        )  # one reduction (vector_norm(inf) is slow on the CPU)
        far = ~(torch.maximum(high, low.neg()) <= far_from[start : start + width])
        flags = torch.stack([(err > limit[:, None]).any(1), ~finite, far]).tolist()  # one device read
        stride = flags[0].index(True) + 1 if True in flags[0] else width
        # a node accepted (converged) out of bounds, before any non-finite evaluation (which then took it)
        if True in flags[2][:stride] and flags[2].index(True) < (flags[1] + [True]).index(True):
            i = start + flags[2].index(True)  # the step that reached the node
            raise diverged(i, grid.t[i + 1], bound=bounds[i])
        if True in flags[1]:
            i = start + flags[1].index(True)
            t = times[i][int(first[i - start])] if staged else grid.t[i]  # a staged step's stage's time
            raise NonFiniteError(
                f"{who}: the model returned NaN/inf at step {i} (process time t={t:.6g}, parallel "
                f"iteration {info.iterations + 1})"
            )
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
    x = laid_out_as(to_sample_dtype(who, buf[0], x_T.dtype), x_T)  # buf's rows are contiguous
    return (x, info) if return_info else x
