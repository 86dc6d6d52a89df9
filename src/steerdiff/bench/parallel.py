r"""``steerdiff bench parallel``: ParaDiGMS (:func:`steerdiff.paradigms`) against the sequential sampler.

Model: the embedded default (:func:`steerdiff.bench.solvers.default_model`: the 64-d, 10-component
Gaussian mixture under Stable Diffusion's betas, exact denoiser), ``n`` samples from
:func:`~steerdiff.bench.solvers.initial_noise` of ``seed``, noise from ``torch.Generator().manual_seed(seed +
1)``, ``time_uniform`` grids. For DDIM, UniPC-3 (:func:`steerdiff.sample`'s default) and DPM-Solver++(2M)
(deterministic; the last two multistep), DDPM (ancestral) and the staged Heun (deterministic, two
evaluations per step) and SDE-DPM-Solver++(2S) (``dpmpp_sde``, stochastic, two) at each step count
(:data:`STEPS`), window and tolerance: the *parallel iterations*, the *sequential calls* (sequential batched
network calls, the paper's speed measure: one per iteration, a staged solver's one per stage of its window's
longest step, :attr:`~steerdiff.paradigms.ParadigmsInfo.calls`) against the sequential sampler's NFE (its
sequential calls: ``steps``, ``2 steps - 1`` for the staged ones, whose last step into ``t = 0`` is one
evaluation), the total NFE, the relative RMSE to :func:`steerdiff.sample` with the same solver, grid and
generator, and the error against the exact answer beside the sequential sampler's: an ODE sampler's relative
RMSE to the exact probability-flow ODE solution from the same ``x_T`` (then the exact denoiser at
``t_min``), an SDE sampler's sliced Wasserstein-2 to ``4 n`` exact samples (256 fixed projections), with the
floor of ``n`` exact samples; and how many samples *moved* (RMS distance to their sequential sample above
:data:`MOVED`: to another component of the mixture, where a deviation within the tolerance early on puts a
sample on the other side of a boundary). No timings: on the CPU a batched call of ``p`` nodes costs ``p``
calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..paradigms import paradigms
from ..sampling import sample
from ..solvers import get as get_solver
from ._figure import panel_figure, write_outputs
from .solvers import default_model, initial_noise

__all__ = [
    "QUICK",
    "SOLVERS",
    "STEPS",
    "TOLS",
    "WINDOWS",
    "ParallelBench",
    "ParallelRow",
    "format_report",
    "run",
]

SOLVERS = ("ddim", "unipc", "dpmpp_2m", "ddpm", "heun", "dpmpp_sde")
# the step counts of each solver (the multistep and staged ones at 1000 steps would only repeat DDIM's)
STEPS = {
    "ddim": (50, 200, 1000),
    "unipc": (50, 200),
    "dpmpp_2m": (50, 200),
    "ddpm": (50, 200, 1000),
    "heun": (50, 200),
    "dpmpp_sde": (50, 200),
}
WINDOWS = (4, 16, 64)
TOLS = (0.1, 0.01)
QUICK = {"steps": (50, 200), "windows": (4, 16)}
SCHEDULE = "time_uniform"
PROJECTIONS = 256
REFERENCE_FACTOR = 4
MOVED = (
    0.1  # per-sample RMS distance to the sequential sample: moved (the rest are below 0.03, flips above 1)
)


@dataclass
class ParallelRow:
    """One run: ``iterations`` Picard iterations, ``calls`` sequential batched calls (``iterations`` but for
    a staged solver) and ``nfe`` evaluations for ``steps`` steps, against the sequential sampler's
    ``sequential_nfe`` (its sequential calls); ``to_sequential``: the relative RMSE to the sequential
    sample, ``moved`` the samples farther than :data:`MOVED` from theirs; ``error``, ``sequential_error``:
    against the exact one."""

    solver: str
    steps: int
    window: int
    tol: float
    iterations: int
    calls: int
    nfe: int
    sequential_nfe: int
    to_sequential: float
    moved: int
    error: float
    sequential_error: float


@dataclass
class ParallelBench:
    """Everything ``steerdiff bench parallel`` measured."""

    n: int
    seed: int
    floor: float
    rows: list[ParallelRow]


def run(n: int = 256, seed: int = 0, quick: bool = False, progress: bool = False) -> ParallelBench:
    """Run the benchmark (``quick``: :data:`QUICK`'s steps and windows)."""
    windows = QUICK["windows"] if quick else WINDOWS
    gmm, proc = default_model()
    den = gmm.denoiser(proc)
    x_T = initial_noise(n, gmm.dim, seed)
    ode = gmm.reference_ode(x_T, proc, proc.t_max, proc.t_min, denoise=True)
    exact = gmm.sample(REFERENCE_FACTOR * n, torch.Generator().manual_seed(seed + 3))

    def sw2(x: torch.Tensor, y: torch.Tensor) -> float:
        return metrics.sliced_wasserstein(x, y, PROJECTIONS, torch.Generator().manual_seed(seed + 4))

    floor = metrics.floor(
        gmm.sample, n, sw2, repeats=3, generator=torch.Generator().manual_seed(seed + 5), reference=exact
    )

    def error(solver: str, x: torch.Tensor) -> float:
        return sw2(x, exact) if get_solver(solver).stochastic else metrics.relative_rmse(x, ode)

    cases = [(s, k) for s in SOLVERS for k in STEPS[s] if not quick or k in QUICK["steps"]]
    rows: list[ParallelRow] = []
    for solver, steps in tqdm(cases, desc="paradigms", disable=not progress):
        ref, ref_info = sample(
            den,
            x_T,
            steps,
            solver,
            SCHEDULE,
            generator=torch.Generator().manual_seed(seed + 1),
            return_info=True,
        )
        ref_error = error(solver, ref)
        for window in windows:
            for tol in TOLS:
                x, info = paradigms(
                    den,
                    x_T,
                    steps,
                    solver,
                    SCHEDULE,
                    window=window,
                    tol=tol,
                    generator=torch.Generator().manual_seed(seed + 1),
                    return_info=True,
                )
                rows.append(
                    ParallelRow(
                        solver,
                        steps,
                        window,
                        tol,
                        info.iterations,
                        info.calls,
                        info.nfe,
                        ref_info.nfe,
                        metrics.relative_rmse(x, ref),
                        int(((x - ref).square().mean(1).sqrt() > MOVED).sum()),
                        error(solver, x),
                        ref_error,
                    )
                )
    return ParallelBench(n, seed, floor, rows)


def format_report(result: ParallelBench) -> str:
    """One line per run: iterations, sequential calls and the speed-up (the sequential sampler's NFE over
    them), NFE and its ratio to the steps, the distance to the sequential sample and both errors against
    the exact answer."""
    lines = [
        f"ParaDiGMS (sd.paradigms) vs the sequential sampler (sd.sample): default 64-d mixture, SD betas, "
        f"{SCHEDULE}, {result.n} samples, seed {result.seed}. iterations: Picard iterations; calls: "
        "sequential batched calls (one per iteration, a staged solver's one per stage), against the "
        "sequential sampler's NFE (seq NFE, one call each; speed-up: seq NFE / calls); to seq: relative "
        f"RMSE to sd.sample's result; moved: samples farther than {MOVED} (RMS) from theirs, in another "
        "component; error: ddim, unipc, dpmpp_2m, heun relative RMSE to the exact ODE solution, ddpm, "
        f"dpmpp_sde sliced W2 to exact samples (floor {result.floor:.4f}), parallel / sequential.",
        "",
        f"{'solver':9s} {'steps':>5s} {'window':>6s} {'tol':>5s} {'iterations':>10s} {'calls':>5s} "
        f"{'seq NFE':>7s} {'speed-up':>8s} {'NFE':>6s} {'NFE/steps':>9s} {'to seq':>9s} {'moved':>5s} "
        f"{'error':>9s} {'seq error':>9s}",
    ]
    lines += [
        f"{r.solver:9s} {r.steps:5d} {r.window:6d} {r.tol:5g} {r.iterations:10d} {r.calls:5d} "
        f"{r.sequential_nfe:7d} {r.sequential_nfe / r.calls:7.1f}x {r.nfe:6d} {r.nfe / r.steps:9.2f} "
        f"{r.to_sequential:9.2e} {r.moved:5d} {r.error:9.4g} {r.sequential_error:9.4g}"
        for r in result.rows
    ]
    return "\n".join(lines)


def plot(result: ParallelBench, path: str | Path) -> bool:
    """Sequential calls against the window, one panel per solver and step count, a line per tolerance, the
    sequential sampler's NFE dotted (log-log). ``False`` (logged) if matplotlib is not installed."""
    cases = list(dict.fromkeys((r.solver, r.steps) for r in result.rows))
    windows = sorted({r.window for r in result.rows})

    def draw(ax: Any, title: str, colors: Sequence[Any]) -> None:
        solver, steps = cases[titles.index(title)]
        for tol, color in zip(TOLS, colors, strict=False):
            rs = [r for r in result.rows if (r.solver, r.steps, r.tol) == (solver, steps, tol)]
            ax.plot([r.window for r in rs], [r.calls for r in rs], "o-", color=color, label=f"tol {tol:g}")
        sequential = next(r.sequential_nfe for r in result.rows if (r.solver, r.steps) == (solver, steps))
        ax.axhline(sequential, color="grey", ls=":", lw=0.8, label="sequential")
        ax.set(xscale="log", yscale="log", ylim=(1, 2 * sequential))

    titles = [f"{s}, {k} steps" for s, k in cases]
    return panel_figure(
        path,
        titles,
        draw,
        cols=max(len(steps) for steps in STEPS.values()),
        panel_size=(3.4, 3.0),
        suptitle="ParaDiGMS: sequential batched calls against the window (64-d mixture, SD betas)",
        ylabel="sequential calls",
        xticks=windows,
        xlabel="window",
    )


def write_results(result: ParallelBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/parallel.csv`` (one line per run) and ``OUT/parallel.png``."""
    header = [
        "solver",
        "steps",
        "window",
        "tol",
        "iterations",
        "calls",
        "nfe",
        "sequential_nfe",
        "to_sequential",
        "moved",
        "error",
        "sequential_error",
    ]
    rows = (
        [
            r.solver,
            r.steps,
            r.window,
            r.tol,
            r.iterations,
            r.calls,
            r.nfe,
            r.sequential_nfe,
            f"{r.to_sequential:.6g}",
            r.moved,
            f"{r.error:.6g}",
            f"{r.sequential_error:.6g}",
        ]
        for r in result.rows
    )
    return write_outputs(out, "parallel", header, rows, lambda path: plot(result, path))
