r"""``steerdiff bench distributed``: what spreading a run over ``torch.distributed`` ranks buys and costs.

The three ways to spread sampling (``group=``), each with the same work at every world size in
:data:`WORLDS`, on the embedded digits model (:func:`~steerdiff.toy.digits.load_digits_denoiser`, a learned
net of 0.66 M parameters: the compute is the net's), unconditional:

* ``sample``: :func:`steerdiff.distributed.sample`, ``shape=(n, 1, 8, 8)``, ``seed=``, the default solver
  (UniPC-3), the batch split over the ranks;
* ``fk_steering``: :func:`steerdiff.smc.fk_steering` with ``group=``: ``batch`` rows of ``particles``
  particles, DDPM, the reward ``log p(DIGIT | x)`` of the digits classifier
  (:func:`~steerdiff.toy.digits.load_classifier`) with ``lam = LAM``, ``ess_threshold = 0.5``; each row's
  particles split over the ranks, resampling on the gathered weights;
* ``paradigms``: :func:`steerdiff.paradigms` with ``group=``, DDPM, each Picard window's rows split.

Each world size runs in fresh processes (``torch.multiprocessing`` spawn, a gloo group initialized through
a ``file://`` store in a temporary folder, one torch thread per rank). A case's time is the median over
``repeats`` runs after one warm-up, on rank 0's clock between a barrier before the run and one after.
Beside it the same run with a *free* net (a :class:`~steerdiff.denoiser.Denoiser` over a net returning
zeros; for ``fk_steering`` also a free reward, the pixel sum): the sampler's and the collectives' time
without the net's, whose ratio to the real run's is the non-net share at that world size. Its
resampling events and Picard iterations (the count of collectives) are reported beside the real run's, as
the zero net moves the samples elsewhere. Every rank's result is compared with the one-rank result: the
maximum absolute difference of the samples (``fk_steering``: of the particles and their log-weights),
which :mod:`steerdiff.distributed`'s contract makes zero up to the rounding a batch's size makes in the
net's arithmetic.

What the numbers are not: GPUs and NCCL. On 2 CPU cores (possibly busy with other work) the speed-up is
bounded by 2, and gloo's collectives over the loopback cost what they cost there; the numbers say what
the machinery costs relative to this net, not what 8 GPUs give.
"""

from __future__ import annotations

import datetime
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed, smc
from ..denoiser import Denoiser
from ..paradigms import paradigms
from ..toy import digits
from ._figure import panel_figure, write_outputs

__all__ = [
    "CASES",
    "DIGIT",
    "FULL",
    "LAM",
    "QUICK",
    "WORLDS",
    "DistributedBench",
    "DistributedRow",
    "Work",
    "format_report",
    "run",
    "write_results",
]

WORLDS = (1, 2)
CASES = ("sample", "fk_steering", "paradigms")
DIGIT = 3
LAM = 2.0  # the demo's FK_LAM
ESS_THRESHOLD = 0.5
TIMEOUT = datetime.timedelta(seconds=300)  # a rank waiting at a collective for one that is gone


@dataclass(frozen=True)
class Work:
    """The work of each case (the same at every world size) and the timed repeats."""

    samples: int
    sample_steps: int
    batch: int
    particles: int
    smc_steps: int
    paradigms_samples: int
    paradigms_steps: int
    window: int
    repeats: int

    def describe(self, case: str) -> str:
        """The case's work in words."""
        if case == "sample":
            return f"{self.samples} samples, {self.sample_steps} steps"
        if case == "fk_steering":
            return f"{self.batch} x {self.particles} particles, {self.smc_steps} steps"
        return f"{self.paradigms_samples} samples, {self.paradigms_steps} steps, window {self.window}"


FULL = Work(2048, 20, 4, 64, 20, 64, 200, 16, repeats=5)
QUICK = Work(256, 5, 2, 16, 10, 16, 50, 8, repeats=1)


@dataclass
class DistributedRow:
    """One case at one world size: ``seconds`` (median), ``free_seconds`` (the free net's), the speed-up
    over one rank, ``max_diff`` to the one-rank result; ``events`` / ``free_events``: resampling events
    (rows x nodes, ``fk_steering``) or Picard iterations (``paradigms``), ``None`` for ``sample``."""

    case: str
    work: str
    world: int
    seconds: float
    free_seconds: float
    speedup: float
    max_diff: float
    events: int | None
    free_events: int | None

    @property
    def non_net(self) -> float:
        """The free net's time as a fraction of the real run's."""
        return self.free_seconds / self.seconds


@dataclass
class DistributedBench:
    """Everything ``steerdiff bench distributed`` measured."""

    work: Work
    seed: int
    rows: list[DistributedRow]


_Run = Callable[[Denoiser, Callable[[Tensor], Tensor], Any], tuple[Tensor, int | None]]


def _case(name: str, work: Work, seed: int) -> _Run:
    """``run(den, reward, group) -> (result, events)`` of case ``name``: the result compared across world
    sizes, the resampling events or Picard iterations (``None``: none)."""
    shape = (1, 8, 8)

    def sample(den: Denoiser, reward: Callable[[Tensor], Tensor], group: Any) -> tuple[Tensor, int | None]:
        n, steps = work.samples, work.sample_steps
        return distributed.sample(den, None, steps, group=group, shape=(n, *shape), seed=seed), None

    def fk_steering(
        den: Denoiser, reward: Callable[[Tensor], Tensor], group: Any
    ) -> tuple[Tensor, int | None]:
        out = smc.fk_steering(
            den, reward, LAM, shape=(work.batch, *shape), particles=work.particles, steps=work.smc_steps,
            ess_threshold=ESS_THRESHOLD, generator=torch.Generator().manual_seed(seed), group=group,
        )  # fmt: skip
        events = int(cast(smc.Trace, out.trace).resampled.sum())  # fk_steering's particles carry a trace
        return torch.cat([out.x.flatten(), out.log_w.flatten().to(out.x.dtype)]), events

    def parallel(den: Denoiser, reward: Callable[[Tensor], Tensor], group: Any) -> tuple[Tensor, int | None]:
        n = work.paradigms_samples
        x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
        x, info = paradigms(
            den, x_T, work.paradigms_steps, "ddpm", window=work.window,
            generator=torch.Generator().manual_seed(seed + 1), group=group, return_info=True,
        )  # fmt: skip
        return x, info.iterations

    return {"sample": sample, "fk_steering": fk_steering, "paradigms": parallel}[name]


def _zeros(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
    """The free net: no compute."""
    return torch.zeros_like(x)


def _pixel_sum(x: Tensor) -> Tensor:
    """The free reward: the pixel sum (no net, and weights that still degenerate, so resampling happens)."""
    return x.flatten(1).sum(1)


def _timed(run: Callable[[], tuple[Tensor, int | None]], repeats: int) -> tuple[float, Tensor, int | None]:
    """One warm-up, then the median of ``repeats`` runs on this rank's clock between barriers; the last
    result."""
    x, events = run()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        x, events = run()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times), x, events


def _measure(work: Work, seed: int) -> dict[str, dict[str, tuple[float, Tensor, int | None]]]:
    """Every case with the real and the free net on this rank: ``{case: {"real" | "free": (seconds, result,
    events)}}``."""
    den = digits.load_digits_denoiser()
    clf = digits.load_classifier()
    free = Denoiser(_zeros, den.process, den.prediction, den.time_map, den.shape)

    def reward(x: Tensor) -> Tensor:
        return clf.log_prob(x, DIGIT)

    group = dist.group.WORLD
    measured: dict[str, dict[str, tuple[float, Tensor, int | None]]] = {}
    with torch.no_grad():
        for name in CASES:
            run = _case(name, work, seed)
            measured[name] = {
                kind: _timed(partial(run, d, r, group), work.repeats)
                for kind, d, r in (("real", den, reward), ("free", free, _pixel_sum))
            }
    return measured


def _rank(rank: int, world: int, init: str, out: str, work: Work, seed: int) -> None:
    """One rank's process: a gloo group, one torch thread, :func:`_measure`; rank 0 saves it to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        measured = _measure(work, seed)
        if rank == 0:
            torch.save(measured, out)
    finally:
        gc.collect()  # objects in reference cycles holding the group, freed before it is destroyed
        dist.destroy_process_group()
    # no interpreter teardown: a gloo group's threads destroyed there may abort the process (SIGABRT)
    os._exit(0)


def _spawn(world: int, work: Work, seed: int) -> dict[str, dict[str, tuple[float, Tensor, int | None]]]:
    """:func:`_measure` on ``world`` fresh gloo ranks; rank 0's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        init, out = "file://" + os.path.join(tmp, "init"), os.path.join(tmp, "rank0.pt")
        mp.start_processes(_rank, args=(world, init, out, work, seed), nprocs=world, start_method="spawn")
        measured: dict[str, dict[str, tuple[float, Tensor, int | None]]] = torch.load(out, weights_only=False)
        return measured


def run(seed: int = 0, quick: bool = False, progress: bool = False) -> DistributedBench:
    """Run the benchmark (``quick``: :data:`QUICK`'s work, else :data:`FULL`'s)."""
    work = QUICK if quick else FULL
    by_world = {w: _spawn(w, work, seed) for w in tqdm(WORLDS, desc="world sizes", disable=not progress)}
    rows = []
    for case in CASES:
        one = by_world[1][case]["real"]
        for w in WORLDS:
            real, free = by_world[w][case]["real"], by_world[w][case]["free"]
            events = real[2], free[2]
            diff = float((real[1] - one[1]).abs().max())
            rows.append(
                DistributedRow(
                    case, work.describe(case), w, real[0], free[0], one[0] / real[0], diff, *events
                )
            )
    return DistributedBench(work, seed, rows)


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def format_report(result: DistributedBench) -> str:
    """The header (what this is and is not), then one line per case and world size."""
    lines = [
        "Sampling spread over torch.distributed ranks (group=) on THIS machine: gloo on CPU ranks of one "
        f"torch thread each, {os.cpu_count()} cores shared with others (possibly busy), not GPUs and NCCL.",
        "The speed-ups are bounded by the cores; the numbers say what the machinery costs relative to the "
        "net, not what 8 GPUs give.",
        "The same work at every world size, on the digits model (a 0.66 M-parameter net), unconditional, "
        f"seed {result.seed}.",
        f"time: median of {result.work.repeats} run(s) after a warm-up, rank 0's clock between barriers; "
        "speed-up: over 1 rank.",
        "free net: the same run with a net returning zeros (fk_steering: and the pixel sum as the reward), "
        "the sampler's and the collectives' time; non-net: its share of the real run's time.",
        f"events: fk_steering's resampling events (rows x nodes; ess_threshold {ESS_THRESHOLD}, lam {LAM}, "
        f"reward log p({DIGIT} | x) of the digits classifier), paradigms' Picard iterations (ddpm, "
        "tol 0.01); real / free net.",
        "max |diff|: to the 1-rank result (the samples; fk_steering: the particles and their log-weights).",
        "",
        f"{'case':11s} {'work':38s} {'ranks':>5s} {'time s':>8s} {'speed-up':>8s} {'free net s':>10s} "
        f"{'non-net':>7s} {'events':>9s} {'max |diff|':>10s}",
    ]
    lines += [
        f"{r.case:11s} {r.work:38s} {r.world:5d} {r.seconds:8.3f} {r.speedup:7.2f}x {r.free_seconds:10.3f} "
        f"{r.non_net:7.1%} {_count(r.events) + ' / ' + _count(r.free_events):>9s} {r.max_diff:10.2e}"
        for r in result.rows
    ]
    return "\n".join(lines)


def plot(result: DistributedBench, path: str | Path) -> bool:
    """Time against the ranks, one panel per case: the real net, the free net, and the ideal (one rank's
    time over the ranks) dotted. ``False`` (logged) if matplotlib is not installed."""

    def draw(ax: Any, title: str, colors: Sequence[Any]) -> None:
        rs = [r for r in result.rows if r.case == title]
        worlds = [r.world for r in rs]
        ax.plot(worlds, [r.seconds for r in rs], "o-", color=colors[0], label="digits net")
        ax.plot(worlds, [r.free_seconds for r in rs], "s--", color=colors[1], label="free net")
        ax.plot(worlds, [rs[0].seconds / w for w in worlds], ":", color="grey", label="1 rank / ranks")
        ax.set(ylim=(0, None))

    return panel_figure(
        path,
        list(CASES),
        draw,
        cols=len(CASES),
        panel_size=(3.6, 3.2),
        suptitle="group= on gloo CPU ranks (one thread each; 2 shared cores): time against the ranks",
        ylabel="seconds (median)",
        xticks=WORLDS,
        xlabel="ranks",
    )


def write_results(result: DistributedBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/distributed.csv`` (one line per case and world size) and ``OUT/distributed.png``."""
    header = [
        "case",
        "work",
        "world",
        "seconds",
        "speedup",
        "free_seconds",
        "non_net",
        "events",
        "free_events",
        "max_diff",
    ]
    rows = (
        [
            r.case,
            r.work,
            r.world,
            f"{r.seconds:.6g}",
            f"{r.speedup:.4g}",
            f"{r.free_seconds:.6g}",
            f"{r.non_net:.4g}",
            _count(r.events),
            _count(r.free_events),
            f"{r.max_diff:.3g}",
        ]
        for r in result.rows
    )
    return write_outputs(out, "distributed", header, rows, lambda path: plot(result, path))
