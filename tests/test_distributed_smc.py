"""Particle methods spread over ranks (``group=``): on 2 and 3 gloo ranks, with a row's 7 particles in
uneven shards (4/3 and 3/2/2), every rank's result equals the single-process run with the same
generators bitwise (CPU float64, the exact mixture denoiser): particles, weights, trace (ESS, resampling
events, log Z), NFE, rewards and ``sample()``."""

from __future__ import annotations

import contextlib
import datetime
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import steerdiff as sd
from steerdiff.distributed.group import spread_run
from steerdiff.noise import Generators
from steerdiff.smc import SMCAlgorithm, StepContext

from .distributed import outcomes, spawn
from .reference import smooth_mixture

F64 = torch.float64
PROC = sd.VP.cosine()
GMM = smooth_mixture(dim=2, components=3, seed=0)
DEN = GMM.denoiser(PROC)
C = torch.tensor([1.0, -0.5], dtype=F64)
A = torch.tensor([[1.0, 0.5]], dtype=F64)
N, STEPS = 7, 10


def linear(x: torch.Tensor) -> torch.Tensor:
    return x @ C


def gens(per_row: bool, seed: int = 0) -> Generators:
    """One generator, or one per batch row (of 2)."""
    if per_row:
        return [torch.Generator().manual_seed(seed + b) for b in range(2)]
    return torch.Generator().manual_seed(seed)


def _fk_difference(group: Any) -> sd.smc.Particles:
    # ess_threshold below 1: some nodes resample, some do not; ER-SDE's multistep history follows
    return sd.smc.fk_steering(
        DEN, linear, lam=3.0, shape=(2, 2), particles=N, steps=STEPS, solver="er_sde", ess_threshold=0.8,
        dtype=F64, generator=gens(True), group=group,
    )  # fmt: skip


def _fk_max(group: Any) -> sd.smc.Particles:
    return sd.smc.fk_steering(
        DEN, linear, lam=3.0, potential="max", interval=2, shape=(2, 2), particles=N, steps=STEPS,
        ess_threshold=0.9, resampler="multinomial", max_batch=3, dtype=F64, generator=gens(False),
        group=group,
    )  # fmt: skip


def _tds(group: Any, max_batch: int | None = None) -> sd.smc.Particles:
    # one observation per batch row (sharded with the particles)
    y = torch.tensor([[1.0], [-0.5]], dtype=F64)
    return sd.smc.tds(
        DEN, sd.inverse.Matrix(A), y, noise_std=0.3, shape=(2, 2), particles=N, steps=STEPS,
        ess_threshold=0.9, max_batch=max_batch, dtype=F64, generator=gens(True, 3), group=group,
    )  # fmt: skip


def _tds_sliced(group: Any) -> sd.smc.Particles:
    # gradients through the denoiser slice by slice: a rank slices its 8 or 6 rows as 5 + 3 and 5 + 1,
    # one process its 14 as 5 + 5 + 4, and the matrix products round by their row count (one process
    # with max_batch=4 is 1e-16 off its own unsliced run): equal to ~1e-14, not bitwise
    return _tds(group, max_batch=5)


def _svdd(group: Any) -> sd.smc.Particles:
    return sd.smc.svdd(
        DEN, linear, alpha=0.5, shape=(2, 2), particles=N, steps=STEPS, dtype=F64, generator=gens(False, 4),
        group=group,
    )  # fmt: skip


def _best_of_n(group: Any) -> sd.smc.Particles:
    # progress: a bar on rank 0 alone (_on_ranks reads each rank's stderr)
    return sd.smc.best_of_n(
        DEN, linear, shape=(2, 2), particles=N, steps=STEPS, dtype=F64, generator=gens(True, 5),
        progress=True, group=group,
    )  # fmt: skip


def _code(group: Any) -> sd.smc.Particles:
    return sd.smc.code(
        DEN, linear, shape=(2, 2), particles=N, block=3, steps=STEPS, max_batch=4, dtype=F64,
        generator=gens(False, 6), group=group,
    )  # fmt: skip


def _fkc(group: Any) -> sd.smc.Particles:
    return sd.smc.fkc_anneal(
        DEN, 2.0, shape=(2, 2), particles=N, steps=20, ess_threshold=0.9, dtype=F64, generator=gens(True, 7),
        group=group,
    )  # fmt: skip


def _fk_global(group: Any) -> sd.smc.Particles:
    # generator=None: torch's global RNG, seeded alike on every rank (checked by the run)
    torch.manual_seed(11)
    return sd.smc.fk_steering(
        DEN, linear, lam=3.0, shape=(2, 2), particles=N, steps=STEPS, ess_threshold=0.8, dtype=F64,
        group=group,
    )  # fmt: skip


class _Centred(SMCAlgorithm):
    """A user's algorithm with gradients taken slice by slice (sliced_grad) whose log_weight gathers: the
    values of x0_hat's first coordinate, centred on the row's mean over every rank's particles."""

    name = "centred"
    grad = True
    sliced_grad = True
    shardable = True

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.final:
            return None
        v, _ = ctx.value_grad("centred", "x0", lambda rows: (rows.x0[:, 0], rows.x0[:, 0]))
        return 2.0 * (v - ctx.gather(v).mean(1, keepdim=True))


def _centred(group: Any) -> sd.smc.Particles:
    # max_batch=7 slices one process's 14 rows and a rank's 8 of 4/3 shards, not its 6: every rank must
    # still run log_weight before the step (sliced_grad), or the ranks' collectives go out of step
    return sd.smc.run_smc(
        DEN, _Centred(), (2, 2), particles=N, steps=STEPS, max_batch=7, dtype=F64, generator=gens(True, 10),
        group=group,
    )  # fmt: skip


def _shifted(x: torch.Tensor, t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The mixture's x0 net moved by a per-sample ``shift`` (a condition of the net)."""
    alpha = float(PROC.alpha(float(t.reshape(-1)[0])))
    return DEN.net(x - alpha * shift, t) + shift


def _fk_cond(group: Any) -> sd.smc.Particles:
    # a condition of batch rows: repeated for a row's particles, then taken at a rank's
    den = sd.Denoiser(_shifted, PROC, prediction="x0", shape=(2,))
    shift = torch.tensor([[0.0, 0.0], [2.0, -1.0]], dtype=F64)
    return sd.smc.fk_steering(
        den, linear, lam=3.0, shape=(2, 2), particles=N, steps=STEPS, ess_threshold=0.8, dtype=F64,
        generator=gens(True, 8), group=group, shift=shift,
    )  # fmt: skip


@dataclass
class _TimeTable(sd.solvers.DDPM):
    """A user's solver with a tensor table in its state: DDPM, moved by the table's time of the node less the
    grid's (0 where the table is read as made). The table has the grid's ``steps + 1`` entries: with 7 steps
    the 8 flat rows of rank 0 of 2 (4 of 7 particles of 2 rows), with 6 the 14 of one process."""

    def init_state(self, grid: Any) -> dict[str, Any]:
        return {**super().init_state(grid), "t": torch.tensor(grid.t, dtype=F64)}

    def step(self, model: Any, x: torch.Tensor, i: int, grid: Any, state: dict[str, Any]) -> Any:
        out = super().step(model, x, i, grid, state)
        shift = float(state["t"][i]) - grid.t[i]
        return (
            sd.solvers.Transition(out.mean + shift, out.std)
            if isinstance(out, sd.solvers.Transition)
            else out
        )


def _fk_table(group: Any, solver: str | sd.solvers.Solver | None = None, steps: int = 7) -> sd.smc.Particles:
    # resamples at every node; the table's 8 entries are rank 0's rows on 2 ranks: were gathered by it alone
    return sd.smc.fk_steering(
        DEN, linear, lam=3.0, shape=(2, 2), particles=N, steps=steps, solver=solver or _TimeTable(),
        ess_threshold=1.0, dtype=F64, generator=gens(True, 13), group=group,
    )  # fmt: skip


RUNS: dict[str, Callable[[Any], sd.smc.Particles]] = {
    "fk_steering difference": _fk_difference,
    "fk_steering max": _fk_max,
    "fk_steering shift=": _fk_cond,
    "tds": _tds,
    "tds max_batch": _tds_sliced,
    "svdd": _svdd,
    "best_of_n": _best_of_n,
    "code": _code,
    "fkc_anneal": _fkc,
    "fk_steering generator=None": _fk_global,
    "sliced_grad gather": _centred,
    "a solver's tensor table": _fk_table,
}
# equal to 1e-12 (rounding of slices of other sizes); the others bitwise
ROUNDED = {"tds max_batch", "sliced_grad gather"}


class _Halve(SMCAlgorithm):
    """A user's selection (overrides resample, declares nothing): refused with group=."""

    def resample(self, ctx: StepContext, log_w: torch.Tensor, generator: Generators) -> torch.Tensor:
        return torch.zeros(log_w.shape, dtype=torch.long)


class _Whole(SMCAlgorithm):
    """A user's weights of the whole row ``(batch, N)``, where a rank's share ``(batch, n_r)`` is due."""

    def log_weight(self, ctx: StepContext) -> torch.Tensor:
        return torch.zeros(ctx.x.shape[0], N, dtype=F64)


def _summary(out: sd.smc.Particles) -> dict[str, Any]:
    assert out.trace is not None
    return {
        "x": out.x,
        "log_w": out.log_w,
        "nfe": out.nfe,
        "reward": out.reward,
        "ess": out.trace.ess,
        "resampled": out.trace.resampled,
        "log_z": out.trace.log_z,
        "sample": out.sample(generator=gens(True, 9)),
    }


def _errors(group: Any) -> list[str]:
    said = []
    cads = sd.guidance.CFG(DEN, DEN, 3.0, cads=sd.guidance.CADS("emb", 0.5))
    for run in (
        lambda: sd.smc.run_smc(DEN, _Halve(), (1, 2), particles=4, steps=3, group=group),
        lambda: sd.smc.fk_steering(DEN, linear, shape=(1, 2), particles=1, steps=3, dtype=F64, group=group),
        lambda: sd.smc.run_smc(DEN, _Whole(), (1, 2), particles=N, steps=3, dtype=F64, group=group),
        lambda: sd.smc.fk_steering(cads, linear, shape=(1, 2), particles=N, steps=3, dtype=F64, group=group),
        lambda: (
            torch.manual_seed(100 + torch.distributed.get_rank()),  # the global RNG seeded per rank
            sd.smc.fk_steering(DEN, linear, shape=(1, 2), particles=N, steps=3, dtype=F64, group=group),
        ),
        lambda: _seeded_per_rank(group),
    ):
        with pytest.raises(ValueError) as err:
            run()
        said.append(str(err.value))
    return said


def _seeded_per_rank(group: Any) -> sd.smc.Particles:
    # a list of one generator per row, seeded with the rank
    return sd.smc.tds(
        DEN, sd.inverse.Matrix(A), torch.ones(1), noise_std=0.3, shape=(2, 2), particles=N, steps=3,
        dtype=F64, generator=gens(True, 100 * torch.distributed.get_rank()), group=group,
    )  # fmt: skip


def _nan_below_half(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mixture's x0 net, NaN below process time 0.5 on the last rank only (everywhere on one process)."""
    last = not torch.distributed.is_initialized() or torch.distributed.get_rank() == _world() - 1
    return DEN.net(x, t) * (math.nan if last and float(t.reshape(-1)[0]) < 0.5 else 1.0)


def _world() -> int:
    return torch.distributed.get_world_size()


def _nan_message(group: Any) -> str:
    den = sd.Denoiser(_nan_below_half, PROC, prediction="x0", shape=(2,))
    with pytest.raises(sd.NonFiniteError) as err:
        sd.smc.fk_steering(
            den, linear, shape=(2, 2), particles=N, steps=STEPS, dtype=F64, generator=gens(False, 12),
            group=group,
        )  # fmt: skip
    return str(err.value)


def _on_ranks(group: Any) -> tuple[dict[str, dict[str, Any]], list[str], str]:
    with contextlib.redirect_stderr(io.StringIO()) as err:
        runs = {name: _summary(run(group)) for name, run in RUNS.items()}
    return runs, [*_errors(group), _nan_message(group)], err.getvalue()


@pytest.fixture(scope="module")
def alone() -> dict[str, dict[str, Any]]:
    return {name: _summary(run(None)) for name, run in RUNS.items()}


# three ranks: in make test-slow, out of make test's default run (two ranks stay in it)
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_spread_runs_equal_the_single_process_run(alone, world):
    for rank, (spread, said, stderr) in enumerate(spawn(_on_ranks, world)):
        # one progress bar, rank 0's (not one per rank, each redrawing over the others)
        assert ("best_of_n" in stderr) == (rank == 0), (rank, stderr[-200:])
        for name, want in alone.items():
            got = spread[name]
            for key, value in want.items():
                where = f"{name}: {key} on rank {rank} of {world}"
                if value is None or isinstance(value, int):  # no reward (tds); the NFE
                    assert value == got[key], where
                elif name in ROUNDED:
                    torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12, msg=where)
                else:
                    assert torch.equal(value, got[key]), where
        assert said[0].startswith("run_smc: group: _Halve overrides resample (a selection across a row's")
        assert said[1] == (
            f"fk_steering: group: particles = 1 is fewer than the group's {world} ranks; every rank needs at "
            "least one particle of each batch row"
        )
        mine = len(range(N)[sd.distributed.Ranks(rank, world).shard(N)])
        assert said[2] == (
            "run_smc: smc's log_weight must return (batch, particles on this rank) = "
            f"(1, {mine}) with group=, got (1, {N})"
        )
        # a denoiser drawing noise of its own would draw a rank's rows only: other noise than one process's
        assert said[3] == (
            "fk_steering: group: CADS in the denoiser draws noise for the rows it is called with, which a "
            "rank's share of the particles would change; pass group=None"
        )
        # torch's global RNG seeded per rank: every rank would draw other noise and resample otherwise
        assert said[4] == (
            "fk_steering: generator=None draws from torch's global RNG, whose state differs between the "
            "group's ranks; seed it alike on every rank (torch.manual_seed) or pass a torch.Generator (one, "
            "or one per batch row) seeded alike"
        )
        # generators seeded per rank: the run would be no one-process run (each rank's share of the particles
        # drawn from other noise, its ancestors from other resampling draws), silently
        assert said[5] == (
            "tds: generator: its state differs between the group's ranks; every rank must pass generators "
            "seeded alike (not with the rank): each rank draws the noise and the resampling of the whole "
            "group from them"
        )
        # a NaN from one rank's net: every rank raises it, naming the step one process names (not the
        # last rank alone, leaving the others waiting at their next collective)
        assert said[6] == _nan_message(None)
        assert said[6].startswith("the model returned NaN/inf at step ")


def test_a_solver_table_of_the_rows_count_stays_a_table():
    """A tensor the solver's init_state made is a constant, not per-particle, though its first dimension is
    the flat rows' count (14 = 2 rows x 7 particles, 13 steps): the run is DDPM's. Was: permuted with the
    particles at each resampling (1.97 from DDPM; on 2 ranks at 7 steps gathered by rank 0 alone)."""
    for steps in (6, 13):
        want = _fk_table(None, "ddpm", steps)
        got = _fk_table(None, steps=steps)
        assert torch.equal(got.x, want.x) and torch.equal(got.log_w, want.log_w)


def test_the_runs_compared_resample_and_select(alone):
    """What the comparison covers: resampling at some nodes and not at others, a selection every node."""
    for name in ("fk_steering difference", "fk_steering max", "fk_steering shift=", "tds", "fkc_anneal"):
        events = alone[name]["resampled"][:-1]
        assert 0 < int(events.sum()) < events.numel(), name
    assert bool(alone["svdd"]["resampled"][:-1].all())
    assert torch.isfinite(alone["tds"]["log_z"][-1]).all()


def _last_rank() -> bool:
    """Whether this process is the group's last rank (one process: yes)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == _world() - 1


def _refuse_on_last_rank(x: torch.Tensor) -> torch.Tensor:
    """``linear``, raising ``ValueError`` on the last rank only."""
    if _last_rank():
        raise ValueError("the reward refused this rank's particles")
    return linear(x)


def _net_refuses_below_half(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mixture's x0 net, below process time 0.5 raising ``KeyError`` on the last rank and NaN on the
    others."""
    if float(t.reshape(-1)[0]) < 0.5:
        if _last_rank():
            raise KeyError("the net refused this rank's rows")
        return DEN.net(x, t) * math.nan
    return DEN.net(x, t)


class _WholeOnLast(SMCAlgorithm):
    """A user's weights of the whole row ``(batch, N)`` on the last rank, a rank's share elsewhere."""

    def log_weight(self, ctx: StepContext) -> torch.Tensor:
        return torch.zeros(ctx.x.shape[0], N if _last_rank() else ctx.x.shape[1], dtype=F64)


def _one_rank_raises(group: Any) -> tuple[list[list[str]], list[float], sd.smc.Particles]:
    """Runs in which the last rank alone raises an error other than a NaN: fk_steering's reward raising
    ``ValueError`` (at the first node's increments), its net raising ``KeyError`` at the step where every
    other rank's net returns NaN, a user's log_weight of the wrong shape, svdd's reward raising (in its
    resample hook, from node 1 on). The group's collectives time out after 6 s: a rank left waiting for the
    failed one fails the test (a gloo timeout or a mismatched collective instead of the outcomes below).
    After each run every rank's outcome is gathered (a later collective: the failed rank stays, which a
    rank left waiting would mismatch) with its seconds; last a run that goes through on the same group."""
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=6))
    kw = {"shape": (2, 2), "particles": N, "steps": STEPS, "dtype": F64, "group": quick}
    net_refuses = sd.Denoiser(_net_refuses_below_half, PROC, prediction="x0", shape=(2,))
    runs = (
        lambda: sd.smc.fk_steering(DEN, _refuse_on_last_rank, lam=3.0, generator=gens(True), **kw),
        lambda: sd.smc.fk_steering(net_refuses, linear, lam=3.0, generator=gens(True), **kw),
        lambda: sd.smc.run_smc(DEN, _WholeOnLast(), generator=gens(False), **kw),
        lambda: sd.smc.svdd(DEN, _refuse_on_last_rank, generator=gens(False, 4), **kw),
    )
    said, seconds = outcomes(quick, runs)
    return said, seconds, _fk_difference(quick)


def test_an_error_on_one_rank_is_raised_by_every_rank_at_once(alone):
    """The failing rank raises its own error and the other a RuntimeError naming it, at once (before: the
    other rank waited at its next collective, the increments' gather, until the group's timeout: 6 s); the
    group goes on working (the run after them equals the one-process run)."""
    refused = "ValueError: the reward refused this rank's particles"
    wrong = (
        "ValueError: run_smc: smc's log_weight must return (batch, particles on this rank) = (2, 3) with "
        "group=, got (2, 7)"
    )

    def others(who: str) -> str:
        return (
            f"RuntimeError: {who}: rank(s) [1] of the group failed (each raised its error); so stops rank 0"
        )

    for said, seconds, after in spawn(_one_rank_raises, 2):
        assert said == [
            [others("fk_steering"), refused],
            [others("fk_steering"), 'KeyError: "the net refused this rank\'s rows"'],
            [others("run_smc"), wrong],
            [others("svdd"), refused],
        ]
        assert max(seconds) < 3, seconds
        summary = _summary(after)
        for key, value in alone["fk_steering difference"].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(summary[key])), key


@dataclass
class _CorrectedDDPM(sd.solvers.DDPM):
    """A user's predictor-corrector solver: DDPM whose step 3 starts with a ULA corrector move on the model's
    score, of step size 1e308 on the last rank (everywhere on one process), 1e-3 on the others. At step 3 a
    particle of each row on the last rank (of 4/3 shards) has a score coordinate over 1.8 in size: its move
    overflows from a finite state and score, and the model's next output on it is NaN."""

    def step(self, model: Any, x: torch.Tensor, i: int, grid: Any, state: dict[str, Any]) -> Any:
        if i == 3:
            ula = sd.mcmc.ULA(step_size=_on_last(1e308, 1e-3), generator=torch.Generator().manual_seed(0))
            x, _ = sd.mcmc.correct(ula, model, x, grid.t[i], grid.sigma[i], i, 1, 0.16)
        return super().step(model, x, i, grid, state)


def _corrector_overflow_message(group: Any) -> str:
    with pytest.raises(sd.NonFiniteError) as err:
        sd.smc.fk_steering(
            DEN, linear, lam=3.0, shape=(2, 2), particles=N, steps=STEPS, solver=_CorrectedDDPM(), dtype=F64,
            generator=gens(False, 12), group=group,
        )  # fmt: skip
    return str(err.value)


def test_a_corrector_overflow_on_one_rank_is_raised_by_every_rank_as_one_process_names_it():
    """A corrector's non-finite move on the last rank alone (Model.note_move): every rank raises the error one
    process raises, the corrector's at its step (Model.check_finite's decision on the ranks' joined flags).
    Was: the ranks exchanged the net's flags alone and named the model's NaN output on the moved state."""
    alone = _corrector_overflow_message(None)
    assert alone.startswith("the corrector ULA made the state diverge at step 3 (process time t=0.967494)")
    assert spawn(_corrector_overflow_message, 2) == [alone, alone]


class _NaNAtCall:
    """``linear``, NaN on the last rank (everywhere on one process) from its ``at``-th call (from 0)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        last = not torch.distributed.is_initialized() or torch.distributed.get_rank() == _world() - 1
        self.calls += 1
        return linear(x) * (math.nan if last and self.calls > self.at else 1.0)


def _events_of(out: sd.smc.Particles) -> int:
    """The nodes before the last at which some row resampled."""
    assert out.trace is not None
    return int(out.trace.resampled[:-1].any(1).sum())


def _counted(group: Any) -> tuple[dict[str, tuple[int, int, int, int]], str]:
    """The collectives each run makes (every torch.distributed call Ranks makes, counted: all_gathers,
    all_reduces, others) and its resampling nodes; and the message of a reward NaN on the last rank alone."""
    names = ("all_gather", "all_reduce", "all_gather_object", "broadcast")
    made = []
    real = {name: getattr(torch.distributed, name) for name in names}

    def counting(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            made.append(name)
            return real[name](*args, **kwargs)

        return call

    counts = {}
    for name in names:
        setattr(torch.distributed, name, counting(name))
    try:
        for label, run in (
            ("fk_steering", _fk_half),
            ("tds", _tds),
            ("svdd", _svdd),
            ("code", _code),
            ("best_of_n", _best_of_n),
            ("fkc", _fkc),
        ):
            made.clear()
            out = run(group)
            others = len(made) - made.count("all_gather") - made.count("all_reduce")
            counts[label] = (made.count("all_gather"), made.count("all_reduce"), others, _events_of(out))
    finally:
        for name in names:
            setattr(torch.distributed, name, real[name])
    return counts, _reward_nan_message(group)


def _fk_half(group: Any) -> sd.smc.Particles:
    return sd.smc.fk_steering(
        DEN, linear, lam=3.0, shape=(2, 2), particles=N, steps=STEPS, ess_threshold=0.5, dtype=F64,
        generator=gens(False, 5), group=group,
    )  # fmt: skip


def _reward_nan_message(group: Any) -> str:
    with pytest.raises(ValueError) as err:
        sd.smc.fk_steering(
            DEN, _NaNAtCall(4), lam=3.0, shape=(2, 2), particles=N, steps=STEPS, dtype=F64,
            generator=gens(False, 5), group=group,
        )  # fmt: skip
    return str(err.value)


def test_collectives_per_step_one_gather_each_weighted_node_one_per_resampling():
    """A spread run's collectives: one all_gather per weighted node (the increments, with the checks of the
    net's and the reward's finiteness), one per node with a resampling event (every per-particle tensor
    packed: particles, transition, solver and algorithm state) and one at the end (particles and rewards):
    17 and 15 for fk_steering and tds here (11 weighted nodes, 5 and 3 events), where a collective per tensor
    and per check, and a gather at every weighted node with or without an event, made 94 and 62. And one
    all_reduce at the start (the set-up's failure flags and the generators' digest, checked alike: was an
    all_gather of their states) and one per node (11), before its first gather: whether any rank's node
    raised (an error on one rank raised by every rank at once); tds's propose hook, after that gather, adds
    none (its flags ride the next node's)."""
    alone = _reward_nan_message(None)
    assert alone == "fk_steering: reward returned NaN or inf at node 4 (rewards must be finite)"
    for counts, said in spawn(_counted, 2):
        # svdd, code, best_of_n: a selection across the row at every node / every third / the last, on the
        # gathered rewards (their hooks' gathers say so, StepContext.gather's last: no all_reduce before the
        # resampling's or the increments'); fkc_anneal's weights as fk_steering's: one per node too
        for name, steps in (("svdd", STEPS), ("code", STEPS), ("best_of_n", STEPS), ("fkc", 20)):
            assert counts.pop(name)[1:3] == (1 + steps + 1, 0), name
        for name, (gathers, reduces, others, events) in counts.items():
            assert 0 < events < STEPS, name  # nodes with and without an event
            assert gathers == (STEPS + 1) + events + 1, (name, gathers, events)
            assert (reduces, others) == (1 + STEPS + 1, 0), name
        # a reward NaN on one rank: every rank raises it, naming the node one process names
        assert said == alone


class _FailsAt:
    """A user's algorithm on a rank's share of a row's particles: zero increments at every node (gathered);
    the last rank raising ``KeyError`` in the part ``where`` at node 3: its ``resample`` or ``propose`` hook
    (after the node's increments were gathered), its ``log_weight`` after a gather of its own, or its
    ``init_state`` (the set-up, before the run's first collective)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, part: str, i: int = 3) -> None:
        if part == self.where and i == 3 and _last_rank():
            raise KeyError(f"{part} refused this rank's particles")


class _Shares(SMCAlgorithm):
    shardable = True  # its hooks are right on a rank's share (resample returns None)

    def __init__(self, where: str) -> None:
        self.fail = _FailsAt(where)

    def init_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.fail("init_state")
        return {}

    def log_weight(self, ctx: StepContext) -> torch.Tensor:
        v = ctx.gather(ctx.x0[..., 0])
        self.fail("log_weight", ctx.i)
        return 0.0 * v[:, ctx.shard]

    def resample(self, ctx: StepContext, log_w: torch.Tensor, generator: Generators) -> None:
        self.fail("resample", ctx.i)

    def propose(self, ctx: StepContext, base: sd.solvers.Transition) -> sd.solvers.Transition:
        self.fail("propose", ctx.i)
        return base


class _GatherThenReward(SMCAlgorithm):
    """A user's algorithm whose log_weight gathers, then reads the reward: ``lam (r - mean r)``."""

    shardable = True

    def log_weight(self, ctx: StepContext) -> torch.Tensor:
        mean = ctx.gather(ctx.x0[..., 0]).mean(1, keepdim=True)
        return 3.0 * (ctx.reward(ctx.x0) - mean)


class _RefusesAtCall:
    """``linear``, raising ``ValueError`` on the last rank from its ``at``-th call (from 0) on."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if _last_rank() and self.calls > self.at:
            raise ValueError("the reward refused this rank's particles at a later node")
        return linear(x)


@dataclass
class _InitRaises(sd.solvers.DDPM):
    """DDPM whose ``init_state`` raises on the last rank."""

    def init_state(self, grid: Any) -> dict[str, Any]:
        if _last_rank():
            raise KeyError("the solver's init_state refused this rank")
        return super().init_state(grid)


def _on_last(value: Any, other: Any) -> Any:
    """``value`` on the last rank, ``other`` on the others: an argument that differs between the ranks."""
    return value if _last_rank() else other


def _later_runs(group: Any) -> tuple[Callable[[], Any], ...]:
    """Runs in which the last rank alone raises where the others made a collective it would not join: after
    a node's first gather (a resample or propose hook after the increments' gather, a log_weight after a
    gather of its own, a reward at node 3 read after such a gather), in the set-up (a solver's or an
    algorithm's init_state) and in an argument's check before the first collective (run_smc's, and a
    wrapper's own before run_smc: fk_steering's lam, tds's noise_std, fkc_anneal's beta). Was: the last rank
    raised alone, and the other waited at its next collective until the group's 6 s timeout (then was out
    of step with the outcomes' gather: spawn's limit)."""
    kw = {"shape": (2, 2), "particles": N, "steps": STEPS, "dtype": F64, "group": group}
    y = torch.tensor([[1.0], [-0.5]], dtype=F64)
    runs = (
        lambda: sd.smc.run_smc(DEN, _Shares("resample"), generator=gens(False), **kw),
        lambda: sd.smc.run_smc(DEN, _Shares("propose"), generator=gens(False), **kw),
        lambda: sd.smc.run_smc(DEN, _Shares("log_weight"), generator=gens(False), **kw),
        lambda: sd.smc.run_smc(
            DEN, _GatherThenReward(), reward=_RefusesAtCall(3), generator=gens(True), **kw
        ),
        lambda: sd.smc.run_smc(DEN, _Shares("init_state"), generator=gens(False), **kw),
        lambda: sd.smc.fk_steering(DEN, linear, solver=_InitRaises(), generator=gens(True), **kw),
        lambda: sd.smc.fk_steering(DEN, linear, ess_threshold=_on_last(2.0, 0.5), generator=gens(True), **kw),
        lambda: sd.smc.fk_steering(DEN, linear, lam=_on_last(math.nan, 3.0), generator=gens(True), **kw),
        lambda: sd.smc.tds(
            DEN, sd.inverse.Matrix(A), y, noise_std=_on_last(-1.0, 0.3), generator=gens(True), **kw
        ),
        lambda: sd.smc.fkc_anneal(DEN, _on_last(-1.0, 2.0), generator=gens(True), **kw),
    )
    return runs


def _later_failures(group: Any) -> tuple[list[list[str]], list[float], sd.smc.Particles]:
    """:func:`_later_runs` on a group whose collectives time out after 6 s, every rank's outcomes gathered
    after each (:func:`outcomes`); then a run that goes through on the same group."""
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=6))
    said, seconds = outcomes(quick, _later_runs(quick))
    return said, seconds, _fk_difference(quick)


def test_an_error_after_a_gather_or_in_the_set_up_on_one_rank_is_raised_by_every_rank(alone):
    """The last rank raises its own error and the other a RuntimeError naming it, within 3 s of each other
    (spawn's limit of 150 s fails a rank left waiting); the group goes on working (the run after them equals
    the one-process run)."""
    own = [
        'KeyError: "resample refused this rank\'s particles"',
        'KeyError: "propose refused this rank\'s particles"',
        'KeyError: "log_weight refused this rank\'s particles"',
        "ValueError: the reward refused this rank's particles at a later node",
        'KeyError: "init_state refused this rank\'s particles"',
        'KeyError: "the solver\'s init_state refused this rank"',
        "ValueError: fk_steering: ess_threshold must be a finite number in [0, 1], got 2.0",
        "ValueError: fk_steering: lam must be",
        "ValueError: tds: noise_std must be",
        "ValueError: fkc_anneal: beta must be",
    ]
    who = ["run_smc"] * 5 + ["fk_steering"] * 3 + ["tds", "fkc"]
    for said, seconds, after in spawn(_later_failures, 2, timeout=150):
        assert len(said) == len(own)
        for (other, last), mine, name in zip(said, own, who, strict=True):
            assert last.startswith(mine), (last, mine)
            failed = "rank(s) [1] of the group failed (each raised its error); so stops rank 0"
            assert other == f"RuntimeError: {name}: {failed}", (other, mine)
        assert max(seconds) < 3, seconds
        summary = _summary(after)
        for key, value in alone["fk_steering difference"].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(summary[key])), key


def _afdps(
    group: Any, noise_std: float = 1.0, solver: str | sd.solvers.Solver = "ddpm", ess_threshold: float = 0.5
) -> sd.smc.Particles:
    # group= reaches run_smc through afdps's **cond
    y = torch.tensor([[1.0], [-0.5]], dtype=F64)
    return sd.smc.afdps(
        DEN, sd.inverse.Matrix(A), y, noise_std=noise_std, shape=(2, 2), particles=N, steps=STEPS, dtype=F64,
        solver=solver, ess_threshold=ess_threshold, generator=gens(True, 8), group=group,
    )  # fmt: skip


def _afdps_failures(group: Any) -> tuple[list[list[str]], list[float], sd.smc.Particles]:
    """afdps with a noise_std refused on the last rank alone (afdps's own check, before run_smc), on a group
    whose collectives time out after 6 s; then a run on the same group."""
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=6))
    said, seconds = outcomes(quick, (lambda: _afdps(quick, _on_last(-1.0, 1.0)),))
    return said, seconds, _afdps(quick)


def test_afdps_set_up_error_on_one_rank_is_raised_by_every_rank():
    """afdps takes group= through **cond (to run_smc): its own argument checks and draws before run_smc are
    the run's set-up too. Was: the last rank raised alone and the other waited at run_smc's first collective
    until the group's 6 s timeout. The run after it equals the one-process run bitwise."""
    alone = _summary(_afdps(None))
    assert alone.pop("reward") is None
    for said, seconds, after in spawn(_afdps_failures, 2, timeout=150):
        failed = "rank(s) [1] of the group failed (each raised its error); so stops rank 0"
        assert said == [
            [
                f"RuntimeError: afdps: {failed}",
                "ValueError: afdps: noise_std must be a finite number > 0, got -1.0",
            ]
        ]
        assert max(seconds) < 3, seconds
        summary = _summary(after)
        assert summary.pop("reward") is None  # afdps has no reward
        for key, value in alone.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(summary[key])), key


@dataclass
class _EntrywiseStd(sd.solvers.ERSDE):
    """ER-SDE whose Gaussian steps give ``std`` per entry (a tensor, as DDPM's learned variance), ``scale``
    times ER-SDE's: a std that depends on the particles a rank holds."""

    scale: float = 1.0

    def step(self, model, x, i, grid, state):
        out = super().step(model, x, i, grid, state)
        if isinstance(out, sd.solvers.Transition) and isinstance(out.std, float) and out.std > 0:
            return sd.solvers.Transition(out.mean, torch.full_like(out.mean, self.scale * out.std))
        return out


def _afdps_noisy_on_one_rank(group: Any) -> tuple[list[list[str]], list[float], sd.smc.Particles]:
    """afdps whose per-entry std is 6 times larger on the last rank's particles alone (never resampled: the
    other rank's particles never descend from them), on a group whose collectives time out after 6 s; then
    a run on the same group."""
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=6))
    noisy = _EntrywiseStd(scale=_on_last(6.0, 1.0))
    said, seconds = outcomes(quick, (lambda: _afdps(quick, solver=noisy, ess_threshold=0.0),))
    return said, seconds, _afdps(quick, solver=_EntrywiseStd())


def test_afdps_entrywise_std_refused_on_one_ranks_particles_is_refused_by_every_rank():
    """A step's std per entry (DDPM's learned variance) is refused where std^2 |A|^2 / s^2 >= 1 at the last
    node, where its maxima are read: one rank's particles too noisy, every rank raises the one-process run's
    ValueError (the maxima gathered over the ranks), at once. Was: the rank holding them raised alone, the
    other a RuntimeError naming it (on the CPU; on an accelerator, where the engine exchanges no failure
    flags per node, it waited at the final gather). The run after it equals the one-process run bitwise."""
    with pytest.raises(ValueError) as refused:
        _afdps(None, solver=_EntrywiseStd(scale=6.0), ess_threshold=0.0)
    assert "afdps: steps=10: the step from node 0" in str(refused.value)
    alone = _summary(_afdps(None, solver=_EntrywiseStd()))
    assert alone.pop("reward") is None  # afdps has no reward
    for said, seconds, after in spawn(_afdps_noisy_on_one_rank, 2, timeout=150):
        assert said == [[f"ValueError: {refused.value}"] * 2]
        assert max(seconds) < 3, seconds
        summary = _summary(after)
        assert summary.pop("reward") is None
        for key, value in alone.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(summary[key])), key


@spread_run
def _two_runs(*, group: Any = None) -> sd.smc.Particles:
    """A user's run of two spread runs (spread_run, as the particle methods): the second's lam refused on the
    last rank alone."""
    kw = {"shape": (2, 2), "particles": N, "steps": 2, "dtype": F64, "generator": gens(True), "group": group}
    sd.smc.fk_steering(DEN, linear, lam=3.0, **kw)
    return sd.smc.fk_steering(DEN, linear, lam=_on_last(math.nan, 3.0), **kw)


@dataclass
class _RunInReward:
    """``linear``, after a spread run of its own whose lam is refused on the last rank alone."""

    group: Any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sd.smc.fk_steering(
            DEN, linear, lam=_on_last(math.nan, 3.0), shape=(2, 2), particles=N, steps=2, dtype=F64,
            generator=gens(True), group=self.group,
        )  # fmt: skip
        return linear(x)


def _nested_failures(group: Any) -> tuple[list[list[str]], list[float], sd.smc.Particles]:
    """A spread run started inside another's (a wrapper's second run, a reward's run) whose set-up fails on
    the last rank alone, on a group whose collectives time out after 6 s; then a run on the same group."""
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=6))
    kw = {"shape": (2, 2), "particles": N, "steps": STEPS, "dtype": F64, "group": quick}
    runs = (
        lambda: _two_runs(group=quick),
        lambda: sd.smc.fk_steering(DEN, _RunInReward(quick), lam=3.0, generator=gens(True), **kw),
    )
    said, seconds = outcomes(quick, runs)
    return said, seconds, _fk_difference(quick)


def test_a_run_inside_a_started_run_has_a_set_up_of_its_own(alone):
    """A spread run made after another's start (a wrapper's second run, a run in a reward) is a run of its
    own: its set-up's failure on one rank is raised by every rank at its own start. Was: the outer run's
    start counted for it, so the last rank raised alone and the other waited at the inner run's first
    collective (the group's 6 s timeout; in the reward, a mismatch with the outer node's flags)."""
    lam = "ValueError: fk_steering: lam must be a finite number, got nan"
    failed = (
        "RuntimeError: fk_steering: rank(s) [1] of the group failed (each raised its error); so stops rank 0"
    )
    for said, seconds, after in spawn(_nested_failures, 2, timeout=150):
        assert said == [[failed, lam], [failed, lam]]
        assert max(seconds) < 3, seconds
        summary = _summary(after)
        for key, value in alone["fk_steering difference"].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(summary[key])), key


def _interrupted(x: torch.Tensor) -> torch.Tensor:
    """``linear``, a KeyboardInterrupt on the last rank (a Ctrl-C reaching that process alone)."""
    if _last_rank():
        raise KeyboardInterrupt
    return linear(x)


def _interrupts(group: Any) -> tuple[list[list[str]], list[float], sd.smc.Particles]:
    """fk_steering whose reward raises KeyboardInterrupt (no Exception) on the last rank, in the set-up of a
    run (a wrapper's check) and in a node, on a group whose collectives time out after 6 s; then a run."""
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=6))
    kw = {"shape": (2, 2), "particles": N, "steps": STEPS, "dtype": F64, "group": quick}
    runs = (
        lambda: sd.smc.fk_steering(DEN, _interrupted, lam=3.0, generator=gens(True), **kw),
        lambda: _set_up_interrupted(quick),
    )
    said, seconds = outcomes(quick, runs)
    return said, seconds, _fk_difference(quick)


def _set_up_interrupted(group: Any) -> sd.smc.Particles:
    # an interrupt in the set-up: the solver's init_state
    return sd.smc.fk_steering(
        DEN, linear, solver=_InterruptedInit(), shape=(2, 2), particles=N, steps=2, dtype=F64,
        generator=gens(True), group=group,
    )  # fmt: skip


@dataclass
class _InterruptedInit(sd.solvers.DDPM):
    """DDPM whose ``init_state`` raises KeyboardInterrupt on the last rank."""

    def init_state(self, grid: Any) -> dict[str, Any]:
        if _last_rank():
            raise KeyboardInterrupt
        return super().init_state(grid)


def test_a_keyboard_interrupt_on_one_rank_is_raised_by_every_rank(alone):
    """An exception that is no Exception (KeyboardInterrupt) on one rank, in a node and in the set-up: that
    rank raises it, the others a RuntimeError naming it, at once. Was: the interrupted rank left, the others
    waited at their next collective until the group's 6 s timeout."""
    failed = "rank(s) [1] of the group failed (each raised its error); so stops rank 0"
    for said, seconds, after in spawn(_interrupts, 2, timeout=150):
        assert said == [[f"RuntimeError: fk_steering: {failed}", "KeyboardInterrupt: "]] * 2
        assert max(seconds) < 3, seconds
        summary = _summary(after)
        for key, value in alone["fk_steering difference"].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(summary[key])), key
