r"""``steerdiff bench overhead``: time per step outside the network, ours and diffusers' ``scheduler.step``.

A free network (it returns a precomputed float32 tensor of the sample's shape) isolates what a
sampler costs: :func:`steerdiff.sample` with each solver of :data:`OVERHEAD_PAIRS`, on the timesteps
of its diffusers counterpart (``nodes_of``), against a pipeline's loop around that scheduler
(``set_timesteps(steps, device=...)``, ``scale_model_input``, ``step``). Each pair is one algorithm on
both sides (diffusers' default UniPC is UniPC-2, so ours is ``UniPC(order=2)`` there): with a net that
depends on ``x`` and ``t`` the two give the same samples (tests/test_cli.py). Both include the grid
set-up (ours makes its :class:`~steerdiff.schedules.Custom` grid from the times in the call); they are
timed in alternation ``repeats`` times after two warm-up runs and the median per step is reported.
Ours is also timed on a new denoiser each run (``cold``: its per-time coefficient caches empty, as on a
first run). On an accelerator the clock is read after a synchronize, so a run's time
includes the kernels it queued; at small sizes a step's cost there is its kernel launches.

Issue 2 (c) sets the goal at batch 256x64 on the CPU: at most half of diffusers' time per step.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import sampling
from ..denoiser import Denoiser
from ..integrations.diffusers_ref import nodes_of, quiet_diffusers, run_scheduler, sd_betas_config
from ..processes import VP
from ..solvers import Solver, UniPC
from ._figure import pyplot, write_outputs

__all__ = [
    "OVERHEAD_PAIRS",
    "SHAPES",
    "Overhead",
    "OverheadBench",
    "Pair",
    "format_overhead",
    "format_report",
    "pairs",
    "plot",
    "run",
    "sampler_overhead",
    "write_results",
]

# (label, steerdiff solver, diffusers scheduler class, its config beside SD's betas) timed with a free
# network, the same algorithm on both sides: diffusers' UniPC is UniPC-2 by default (``unipc`` is UniPC-3),
# DDIM without its default x0 clipping, which steerdiff's ddim does not do
OVERHEAD_PAIRS: tuple[tuple[str, str | Solver, str, dict[str, Any]], ...] = (
    ("dpmpp_2m", "dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("unipc(order=2)", UniPC(order=2), "UniPCMultistepScheduler", {}),
    ("ddim", "ddim", "DDIMScheduler", {"clip_sample": False}),
    ("euler", "euler", "EulerDiscreteScheduler", {}),
)
# the 256x64 batch, and Stable Diffusion's 64x64 latents at batch 4
SHAPES: tuple[tuple[int, ...], ...] = ((256, 64), (4, 4, 64, 64))


@dataclass
class Overhead:
    """Median wall time per step outside the network, ours and diffusers', in seconds; ``cold``: ours
    on a denoiser that has not yet seen the grid's times (its per-time caches empty: a first run)."""

    solver: str
    scheduler: str
    ours: float
    diffusers: float
    cold: float
    shape: tuple[int, ...] = SHAPES[0]

    @property
    def ratio(self) -> float:
        """Ours over diffusers' (below 1: ours is faster)."""
        return self.ours / self.diffusers

    @property
    def cold_ratio(self) -> float:
        """Ours on a first run over diffusers'."""
        return self.cold / self.diffusers


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds of ``fn()``, ``device``'s queue drained before and after (a no-op on the CPU)."""
    sync = partial(torch.cuda.synchronize, device) if device.type == "cuda" else (lambda: None)

    def seconds(fn: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return seconds


@dataclass
class Pair:
    """One timed pair on shared inputs: ``ours(fresh)`` runs ``sd.sample`` (on a new denoiser if
    ``fresh``), ``theirs()`` a pipeline's loop around the diffusers scheduler; both return the sample."""

    solver: str
    scheduler: str
    ours: Callable[[bool], Tensor]
    theirs: Callable[[], Tensor]


def pairs(
    steps: int,
    shape: Sequence[int],
    device: str | torch.device = "cpu",
    net: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> list[Pair]:
    """The :data:`OVERHEAD_PAIRS` with a free network on float32 samples of ``shape`` on ``device``:
    the net returns a fixed tensor, the two sides run on the same timesteps. ``net``: another eps net
    in its place (a fixed eps takes every consistent solver to the same sample; one that depends on
    ``x`` and ``t`` tells whether the two sides run the same algorithm)."""
    import diffusers

    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(*shape, generator=g).to(device)
    eps = torch.randn(*shape, generator=g).to(device)

    def free(x: Tensor, t: Tensor) -> Tensor:
        return eps

    net = free if net is None else net

    den = Denoiser(net, VP.scaled_linear(), prediction="eps")
    out = []
    for label, solver, cls, config in OVERHEAD_PAIRS:
        sched = getattr(diffusers, cls)(**sd_betas_config(**config))
        sched.set_timesteps(steps)
        times = nodes_of(sched).grid.tolist()

        # the grid made (and checked) in the call, as diffusers' loop sets its timesteps in its own
        def ours(fresh: bool, solver: str | Solver = solver, times: list[float] = times) -> Tensor:
            d = Denoiser(net, den.process, prediction="eps") if fresh else den
            return sampling.sample(d, x_T, steps=steps, solver=solver, schedule=times)

        def theirs(sched: Any = sched) -> Tensor:
            return run_scheduler(sched, net, x_T, steps, device=device)[0]

        out.append(Pair(label, cls, ours, theirs))
    return out


def sampler_overhead(
    steps: int = 20,
    repeats: int = 30,
    shape: Sequence[int] = SHAPES[0],
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[Overhead]:
    """Per-step time of ``sd.sample`` and of diffusers' ``scheduler.step`` loop for every pair of
    :func:`pairs`: warm (ours, theirs) and cold (ours on a new denoiser) in alternation, two warm-up
    rounds, then the median of ``repeats``."""
    seconds = _timer(torch.device(device))
    out = []
    with quiet_diffusers():
        for p in tqdm(pairs(steps, shape, device), desc=f"overhead {tuple(shape)}", disable=not progress):
            runs = (partial(p.ours, False), p.theirs, partial(p.ours, True))
            times: tuple[list[float], list[float], list[float]] = ([], [], [])
            for r in range(repeats + 2):
                for record, run in zip(times, runs, strict=True):
                    t = seconds(run)
                    if r >= 2:
                        record.append(t)
            ours, theirs, cold = (statistics.median(v) / steps for v in times)
            out.append(Overhead(p.solver, p.scheduler, ours, theirs, cold, shape=tuple(shape)))
    return out


def format_overhead(rows: Sequence[Overhead]) -> list[str]:
    """One line per row: per-step microseconds, ours (warm, then a first run) against diffusers'."""
    return [
        f"    {o.solver} vs {o.scheduler}: {o.ours * 1e6:.0f} us vs {o.diffusers * 1e6:.0f} us"
        f"  ratio {o.ratio:.3g}; first run of a new denoiser {o.cold * 1e6:.0f} us ({o.cold_ratio:.3g})"
        for o in rows
    ]


@dataclass
class OverheadBench:
    """Everything ``steerdiff bench overhead`` measured, and where."""

    device: str
    steps: int
    repeats: int
    threads: int
    rows: list[Overhead]


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's architecture and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def run(
    shapes: Sequence[Sequence[int]] = SHAPES,
    device: str | torch.device = "cpu",
    steps: int = 20,
    repeats: int = 30,
    progress: bool = False,
) -> OverheadBench:
    """:func:`sampler_overhead` for every shape of ``shapes`` on ``device``."""
    device = torch.device(device)
    rows = [r for s in shapes for r in sampler_overhead(steps, repeats, s, device, progress)]
    return OverheadBench(device_name(device), steps, repeats, torch.get_num_threads(), rows)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def format_report(result: OverheadBench) -> str:
    """The table: per shape, per pair, per-step microseconds and the ratio to diffusers'."""
    lines = [
        f"Sampler overhead per step outside the net on {result.device}: float32, free net, "
        f"{result.steps} steps, median of {result.repeats} runs (goal, issue 2 (c): ratio <= 0.5)",
        "",
        "| shape | solver | diffusers scheduler | ours (us) | diffusers (us) | ratio"
        " | first run (us) | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {_shape(o.shape)} | {o.solver} | {o.scheduler} | {o.ours * 1e6:.0f} | {o.diffusers * 1e6:.0f}"
        f" | {o.ratio:.2f} | {o.cold * 1e6:.0f} | {o.cold_ratio:.2f} |"
        for o in result.rows
    ]
    return "\n".join(lines)


def plot(result: OverheadBench, path: str | Path) -> bool:
    """One panel per shape: per-step microseconds of ours (warm, first run) and diffusers' per pair,
    log scale. ``False`` (logged) if matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    shapes = list(dict.fromkeys(o.shape for o in result.rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    series = (("steerdiff", "ours"), ("steerdiff, first run", "cold"), ("diffusers", "diffusers"))
    width = 0.8 / len(series)
    for ax, shape in zip(axes.flat, shapes, strict=True):
        rows = [o for o in result.rows if o.shape == shape]
        for k, (label, attr) in enumerate(series):
            xs = [i + (k - 1) * width for i in range(len(rows))]
            ax.bar(xs, [getattr(o, attr) * 1e6 for o in rows], width, label=label)
        ax.set_xticks(range(len(rows)), [o.solver for o in rows])
        ax.set_yscale("log")
        ax.set_title(f"{_shape(shape)} on {result.device}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes.flat[0].set_ylabel("time per step outside the net (us)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Sampler overhead per step: steerdiff vs diffusers' scheduler.step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(result: OverheadBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/overhead.csv`` (one line per shape and pair, seconds per step) and ``OUT/overhead.png``."""
    header = ["device", "shape", "solver", "scheduler", "ours_s", "diffusers_s", "first_run_s", "ratio"]
    rows = (
        [
            result.device,
            _shape(o.shape),
            o.solver,
            o.scheduler,
            *(f"{v:.6g}" for v in (o.ours, o.diffusers, o.cold, o.ratio)),
        ]
        for o in result.rows
    )
    return write_outputs(out, "overhead", header, rows, lambda path: plot(result, path))
