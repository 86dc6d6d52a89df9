"""The discrete particle methods spread over ranks (``group=``): on 2 and 3 gloo ranks, with a row's 7
particles in uneven shards (4/3 and 3/2/2), every rank's result equals the single-process run with the same
generators bitwise (CPU, the exact mixture denoiser): tokens, float64 weights, trace (ESS, resampling
events, log Z), NFE, rewards and ``sample()``. That run is itself checked against exact laws
(tests/test_discrete_steering.py), so equality with it is the oracle here."""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import steerdiff as sd
from steerdiff.noise import Generators

from .discrete_reference import mixture
from .distributed import outcomes, spawn

F64 = torch.float64
MIX = mixture()
PROC = sd.discrete.MaskedProcess(MIX.V)
DEN = MIX.denoiser(PROC)
F = torch.rand(MIX.L, MIX.V, generator=torch.Generator().manual_seed(0), dtype=F64)  # r(x) = sum_i F[i, x^i]
N, STEPS = 7, 6
# rows with 4 and 3 masked tokens: first_hitting's row 1 is done before row 0 (its last step moves nothing)
X_T = torch.tensor([[3, 3, 1, 3, 3], [0, 3, 3, 3, 2]])


def reward(x: torch.Tensor) -> torch.Tensor:
    return F[torch.arange(MIX.L), x.long()].sum(-1)


def gens(per_row: bool, seed: int = 0) -> Generators:
    """One generator, or one per batch row (of 2)."""
    if per_row:
        return [torch.Generator().manual_seed(seed + b) for b in range(2)]
    return torch.Generator().manual_seed(seed)


def _ancestral(group: Any) -> sd.smc.Particles:
    # ess_threshold below 1: some nodes resample, some do not
    return sd.discrete.fk_steering(
        DEN, reward, 3.0, shape=(2, MIX.L), particles=N, steps=STEPS, ess_threshold=0.7, generator=gens(True),
        group=group,
    )  # fmt: skip


def _first_hitting(group: Any) -> sd.smc.Particles:
    # every node resamples; immediate weights a row again at each node unless it is done
    return sd.discrete.fk_steering(
        DEN, reward, 3.0, "immediate", x_T=X_T, particles=N, sampler="first_hitting",
        generator=gens(False, 1), group=group,
    )  # fmt: skip


def _remdm(group: Any) -> sd.smc.Particles:
    return sd.discrete.fk_steering(
        DEN, reward, 3.0, "max", shape=(2, MIX.L), particles=N, steps=STEPS, sampler=sd.discrete.ReMDM(0.1),
        interval=2, ess_threshold=0.9, resampler="multinomial", generator=gens(True, 2), group=group,
    )  # fmt: skip


def _labels(group: Any) -> sd.smc.Particles:
    # a condition of batch rows: repeated for a row's particles, then taken at a rank's
    return sd.discrete.fk_steering(
        DEN, reward, 3.0, shape=(2, MIX.L), particles=N, steps=STEPS, ess_threshold=0.6,
        generator=gens(False, 3), group=group, y=torch.tensor([0, 2]),
    )  # fmt: skip


def _best_of_n(group: Any) -> sd.smc.Particles:
    return sd.discrete.best_of_n(
        DEN, reward, shape=(2, MIX.L), particles=N, steps=STEPS, generator=gens(True, 4), group=group
    )


def _best_of_n_first_hitting(group: Any) -> sd.smc.Particles:
    return sd.discrete.best_of_n(
        DEN, reward, x_T=X_T, particles=N, sampler="first_hitting", generator=gens(False, 5), group=group
    )


RUNS: dict[str, Callable[[Any], sd.smc.Particles]] = {
    "fk_steering ancestral": _ancestral,
    "fk_steering first_hitting": _first_hitting,
    "fk_steering remdm": _remdm,
    "fk_steering y=": _labels,
    "best_of_n": _best_of_n,
    "best_of_n first_hitting": _best_of_n_first_hitting,
}


def _summary(out: sd.smc.Particles) -> dict[str, Any]:
    trace = out.trace
    return {
        "x": out.x,
        "log_w": out.log_w,
        "nfe": out.nfe,
        "reward": out.reward,
        "ess": None if trace is None else trace.ess,
        "resampled": None if trace is None else trace.resampled,
        "log_z": None if trace is None else trace.log_z,
        "sample": out.sample(generator=gens(True, 9)),
    }


def _last_rank() -> bool:
    """Whether this process is the group's last rank (one process: yes)."""
    dist = torch.distributed
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def _nan_below_half(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mixture's net, NaN below process time 0.5 on the last rank only (everywhere on one process)."""
    return DEN.net(x, t) * (math.nan if _last_rank() and float(t.min()) < 0.5 else 1.0)


def _nan_reward(x: torch.Tensor) -> torch.Tensor:
    """``reward``, NaN for the first row on the last rank only."""
    r = reward(x)
    return torch.where(torch.arange(len(x)) == 0, math.nan, r) if _last_rank() else r


def _errors(group: Any) -> list[str]:
    """What every rank raises: too few particles, a NaN from one rank's net, a NaN reward on one rank."""
    den = sd.discrete.MaskedDenoiser(_nan_below_half, PROC)
    kw = {"shape": (2, MIX.L), "group": group}
    said = []
    for error, run in (
        (ValueError, lambda: sd.discrete.best_of_n(DEN, reward, particles=1, **kw)),
        (sd.NonFiniteError, lambda: sd.discrete.fk_steering(den, reward, particles=N, steps=16, **kw)),
        (ValueError, lambda: sd.discrete.best_of_n(DEN, _nan_reward, particles=N, steps=4, **kw)),
    ):
        # generator=None: torch's global RNG, in one state on every rank (checked); again after a failed
        # run, which a rank may have left before the others' last draws
        torch.manual_seed(0)
        with pytest.raises(error) as err:
            run()
        said.append(str(err.value))
    if group is not None:  # torch's global RNG, or a generator, seeded per rank: each would draw other noise
        rank = torch.distributed.get_rank()
        torch.manual_seed(100 + rank)
        for generator in (None, gens(False, 100 * rank)):
            with pytest.raises(ValueError) as err:
                sd.discrete.fk_steering(DEN, reward, particles=N, steps=4, generator=generator, **kw)
            said.append(str(err.value))
    return said


def _refuse_on_last_rank(x: torch.Tensor) -> torch.Tensor:
    """``reward``, raising ``ValueError`` on the last rank only."""
    if _last_rank():
        raise ValueError("the reward refused this rank's particles")
    return reward(x)


def _wrong_shape_on_last_rank(x: torch.Tensor) -> torch.Tensor:
    """``reward``, of one value too many on the last rank only."""
    r = reward(x)
    return torch.cat([r, r[:1]]) if _last_rank() else r


def _net_refuses_below_half(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mixture's net, below process time 0.5 raising ``KeyError`` on the last rank and NaN on the
    others."""
    if float(t.min()) < 0.5:
        if _last_rank():
            raise KeyError("the net refused this rank's rows")
        return DEN.net(x, t) * math.nan
    return DEN.net(x, t)


def _on_last(value: Any, other: Any) -> Any:
    """``value`` on the last rank, ``other`` on the others: an argument that differs between the ranks."""
    return value if _last_rank() else other


def _one_rank_runs(group: Any) -> tuple[Callable[[], Any], ...]:
    """Runs in which the last rank alone raises an error other than a NaN: its reward raising ``ValueError``
    at the first potential node (fk_steering) or returning the wrong shape at the final samples (best_of_n),
    its net raising ``KeyError`` at the step where every other rank's net returns NaN; and in the set-up, an
    argument of its own refused before the run's first collective (``particles``; an ``x_T`` of one row for
    two generators) or after the generators' check that was the first (``interval``, ``lam``: the other
    waited at the first step's all_reduce)."""
    kw = {"shape": (2, MIX.L), "particles": N, "steps": STEPS, "group": group}
    runs = (
        lambda: sd.discrete.fk_steering(DEN, _refuse_on_last_rank, 3.0, generator=gens(True), **kw),
        lambda: sd.discrete.best_of_n(DEN, _wrong_shape_on_last_rank, generator=gens(True), **kw),
        lambda: sd.discrete.fk_steering(
            sd.discrete.MaskedDenoiser(_net_refuses_below_half, PROC), reward, 3.0, generator=gens(True), **kw
        ),
        lambda: sd.discrete.fk_steering(
            DEN, reward, 3.0, interval=_on_last(0, 1), generator=gens(True), **kw
        ),
        lambda: sd.discrete.fk_steering(DEN, reward, _on_last(math.nan, 3.0), generator=gens(True), **kw),
        lambda: sd.discrete.best_of_n(
            DEN, reward, generator=gens(True), **{**kw, "particles": _on_last(1, N)}
        ),
        lambda: sd.discrete.fk_steering(
            DEN, reward, x_T=_on_last(X_T[:1], X_T), generator=gens(True), **{**kw, "shape": None}
        ),
    )
    return runs


def _one_rank_raises(group: Any) -> tuple[list[list[str]], list[float], sd.smc.Particles]:
    """:func:`_one_rank_runs` on a group whose collectives time out after 10 s: a rank left waiting for the
    failed one fails the test (a gloo timeout or a mismatched collective instead of the outcomes below).
    After each run every rank's outcome is gathered (a later collective, which a rank left waiting would
    mismatch) and its seconds; last a run that goes through on the same group."""
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=10))
    said, seconds = outcomes(quick, _one_rank_runs(quick))
    return said, seconds, _ancestral(quick)


SET_UP_SAID = [
    ("discrete.fk_steering", "ValueError: discrete.fk_steering: interval must be an integer >= 1, got 0"),
    ("discrete.fk_steering", "ValueError: discrete.fk_steering: lam must be"),
    (
        "discrete.best_of_n",
        "ValueError: discrete.best_of_n: group: particles = 1 is fewer than the group's 2 ranks",
    ),
    ("discrete.fk_steering", "ValueError: discrete.fk_steering: generator must be None, one torch.Generator"),
]


def test_an_error_on_one_rank_is_raised_by_every_rank_at_once(alone):
    """The failing rank raises its own error and the other a RuntimeError naming it, within a second
    (before: the other rank waited at its next collective, the rewards' all_gather or the step's all_reduce,
    until the group's timeout); the group goes on working (the run after them equals the one-process run)."""
    shape_said = (
        "ValueError: discrete.best_of_n: reward must return a real tensor of shape (n,) = (6,) for the n "
        "particles it is given, got torch.float64 (7,) at the final samples"
    )

    def others(who: str) -> str:
        return (
            f"RuntimeError: {who}: rank(s) [1] of the group failed (each raised its error); so stops rank 0"
        )

    for said, seconds, after in spawn(_one_rank_raises, 2, timeout=150):
        assert said[:3] == [
            [others("discrete.fk_steering"), "ValueError: the reward refused this rank's particles"],
            [others("discrete.best_of_n"), shape_said],
            [others("discrete.fk_steering"), 'KeyError: "the net refused this rank\'s rows"'],
        ]
        # an argument of the last rank's own refused in the set-up: every rank raises at its end
        for (other, last), (who, mine) in zip(said[3:], SET_UP_SAID, strict=True):
            assert (other, last[: len(mine)]) == (others(who), mine), (other, last)
        assert max(seconds) < 5, seconds
        summary = _summary(after)
        for key, value in alone["fk_steering ancestral"].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(summary[key])), key


def _on_ranks(group: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    return {name: _summary(run(group)) for name, run in RUNS.items()}, _errors(group)


@pytest.fixture(scope="module")
def alone() -> dict[str, dict[str, Any]]:
    return {name: _summary(run(None)) for name, run in RUNS.items()}


# three ranks: in make test-slow, out of make test's default run (two ranks stay in it)
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_spread_runs_equal_the_single_process_run(alone, world):
    alone_said = _errors(None)[1:]
    for rank, (spread, said) in enumerate(spawn(_on_ranks, world)):
        for name, want in alone.items():
            for key, value in want.items():
                where = f"{name}: {key} on rank {rank} of {world}"
                if value is None or isinstance(value, int):  # no trace (best_of_n); the NFE
                    assert value == spread[name][key], where
                else:
                    assert torch.equal(value, spread[name][key]), where
        assert said[0] == (
            f"discrete.best_of_n: group: particles = 1 is fewer than the group's {world} ranks; every rank "
            "needs at least one particle of each batch row"
        )
        # a NaN from the last rank's net or reward: every rank raises it, with one process's message (not
        # the last rank alone, leaving the others waiting at their next collective)
        assert said[1:-2] == alone_said
        assert said[-2].startswith(
            "discrete.fk_steering: generator=None draws from torch's global RNG, whose state differs between"
        )
        assert said[-1] == (
            "discrete.fk_steering: generator: its state differs between the group's ranks; every rank must "
            "pass generators seeded alike (not with the rank): each rank draws the noise and the resampling "
            "of the whole group from them"
        )
    assert alone_said[0] == (
        "discrete.fk_steering: at step 9 (evaluation 10, t in [0.4375, 0.4375]): MaskedDenoiser: the network "
        "returned NaN or +inf logits"
    )
    assert alone_said[1] == (
        "discrete.best_of_n: reward returned NaN or inf at the final samples (rewards must be finite)"
    )


def test_the_runs_compared_resample_at_some_nodes_or_every_node(alone):
    for name in ("fk_steering ancestral", "fk_steering remdm", "fk_steering y="):
        events = alone[name]["resampled"][:-1]
        assert 0 < int(events.sum()) < events.numel(), name
    hitting = alone["fk_steering first_hitting"][
        "resampled"
    ]  # every node but row 1's last (done) and the end
    assert bool(hitting[:-2].all()) and hitting[-2].tolist() == [True, False] and not bool(hitting[-1].any())


def test_a_group_that_is_no_process_group_is_refused():
    with pytest.raises(
        ValueError, match=r"^discrete\.fk_steering: group must be None \(this process alone\)"
    ):
        sd.discrete.fk_steering(DEN, reward, shape=(1, MIX.L), particles=2, group="world")


def _counted(group: Any) -> list[tuple[int, int, int]]:
    """Each run's all_reduces and all_gathers (every torch.distributed call counted) and its nodes with a
    resampling event."""
    made: list[str] = []
    real = {name: getattr(torch.distributed, name) for name in ("all_gather", "all_reduce")}

    def counting(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            made.append(name)
            return real[name](*args, **kwargs)

        return call

    out = []
    for name in real:
        setattr(torch.distributed, name, counting(name))
    try:
        for run in (_ancestral, _first_hitting):
            made.clear()
            trace = run(group).trace
            assert trace is not None
            out.append(
                (made.count("all_reduce"), made.count("all_gather"), int(trace.resampled[:-1].any(1).sum()))
            )
    finally:
        for name, call in real.items():
            setattr(torch.distributed, name, call)
    return out


def test_collectives_per_step():
    """One all_reduce at the start (the set-up's failure flags and the generators' digest, checked alike: was
    an all_gather of their states) and one per step (a failure flag and the rows it moved, together), one
    all_gather per potential node (the rewards), per node with a resampling event (tokens and times
    together) and two at the end (the rewards and the particles): 7 + 12 for ancestral's 6 steps and 5 + 10
    for first_hitting's 4 (4 events each), where one collective each for the flag, the moved rows, the tokens
    and the times, and a take at every potential node, made 12 + 21 and 8 + 15."""
    for counts in spawn(_counted, 2):
        (reduces, gathers, events), (reduces_fh, gathers_fh, events_fh) = counts
        assert 0 < events < STEPS
        assert (reduces, gathers) == (1 + STEPS, STEPS + events + 2)
        assert (reduces_fh, gathers_fh) == (1 + 4, 4 + events_fh + 2)
