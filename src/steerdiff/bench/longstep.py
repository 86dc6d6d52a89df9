r"""``steerdiff bench longstep``: the multistep ODE solvers with and without their long-step rule.

A multistep step of order ``k`` integrates the polynomial through the last ``k`` denoised estimates; over a
step much longer than the steps those estimates are spaced by, it extrapolates their errors. Grids that end
with such a step are common: ``time_uniform`` on every process, ``linspace`` and ``leading`` on discrete VP
schedules (the last noisy step 3.4-13 times the one before in log-SNR), ``karras`` at 3-4 steps. DPM-Solver++
multistep, UniPC and the MR Sampler's data form (``mrs``) therefore take a step longer than
:data:`~steerdiff.solvers.base.ODE_MAX_H` in log-SNR and than :data:`~steerdiff.solvers.base.ODE_MAX_H_RATIO`
times the step before at first order by default; ``max_h=math.inf`` is the papers' and diffusers' rule (no
such step).

On the 16-d default mixture (exact probability-flow ODE from the same ``x_T``, then the exact
denoiser at ``t_min``: what :func:`steerdiff.sample` approximates), for each process, schedule,
step count and solver where the rule changes the result, the relative RMSE with the rule and
without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import schedules
from ..processes import EDM, VP, Process, RectifiedFlow
from ..sampling import sample
from ..solvers import get as get_solver
from ..solvers.base import make_grid
from ..solvers.dpmpp import DPMSolverPPMultistep
from ..solvers.mrs import MRSampler
from ..solvers.unipc import UniPC
from ..toy.gmm import default_benchmark_mixture
from ._figure import diagonal_scatter, write_outputs
from .solvers import initial_noise

__all__ = [
    "PROCESSES",
    "QUICK_STEPS",
    "SOLVERS",
    "STEPS",
    "LongStep",
    "LongStepBench",
    "format_report",
    "plot",
    "processes",
    "run",
    "write_results",
]

SOLVERS = ("dpmpp_2m", "dpmpp_3m", "unipc", "mrs")
PROCESSES = ("sd", "ddpm", "sd-zero-snr", "cosine", "edm", "flow")  # the names of processes()
STEPS = (3, 4, 5, 8, 10, 15, 20, 30, 50)
QUICK_STEPS = (10, 20)


def processes() -> dict[str, Process]:
    """The processes measured, by name: Stable Diffusion's betas (``sd``), DDPM's (``ddpm``), SD's
    rescaled to zero terminal SNR (``sd-zero-snr``), VP cosine (``cosine``), EDM (``edm``) and
    rectified flow (``flow``)."""
    ddpm = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    zero_snr = VP.discrete(alphas_cumprod=VP.scaled_linear().alphas_cumprod, rescale_zero_snr=True)
    built = (VP.scaled_linear(), VP.discrete(betas=ddpm), zero_snr, VP.cosine(), EDM(), RectifiedFlow())
    return dict(zip(PROCESSES, built, strict=True))


@dataclass
class LongStep:
    """One case the rule changes: relative RMSE against the exact answer with the rule (the default)
    and without it (``max_h=inf``)."""

    process: str
    schedule: str
    steps: int
    solver: str
    with_rule: float
    without: float

    @property
    def ratio(self) -> float:
        """``with_rule / without``: below 1 where the rule helps."""
        return self.with_rule / self.without


@dataclass
class LongStepBench:
    """The changed cases and the number of cases measured (``total``: every process x schedule x
    steps x solver)."""

    rows: list[LongStep]
    total: int
    n: int
    dim: int


def run(
    n: int = 256,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    only: Sequence[str] | None = None,
) -> LongStepBench:
    """Every process (of :func:`processes`; ``only``: those named) x schedule x step count x solver on
    ``n`` draws of ``x_T`` (:func:`~steerdiff.bench.solvers.initial_noise` of ``seed``); schedules
    that refuse a process (the discrete spacings on continuous ones) are skipped."""
    dim = 16
    gmm = default_benchmark_mixture(dim=dim)
    z = initial_noise(n, dim, seed)
    steps = QUICK_STEPS if quick else STEPS
    rows: list[LongStep] = []
    total = 0
    chosen = [(k, p) for k, p in processes().items() if only is None or k in only]
    cases = [(p, s) for p in chosen for s in schedules.available() if _applies(p[1], s)]
    for (name, process), schedule in tqdm(cases, desc="longstep", disable=not progress, leave=False):
        den = gmm.denoiser(process)
        refs: dict[float, torch.Tensor] = {}
        for k in steps:
            t0 = make_grid(process, schedules.get(schedule), k, "zero").t[0]
            x_T = z * math.hypot(float(process.alpha(t0)), float(process.sigma(t0)))
            for solver in SOLVERS:
                total += 1
                plain = _without_rule(solver)
                ours, theirs = sample(den, x_T, k, solver, schedule), sample(den, x_T, k, plain, schedule)
                if not torch.equal(ours, theirs):
                    if t0 not in refs:  # the exact answer from x_T at t0, solved once per start
                        refs[t0] = gmm.reference_ode(x_T, process, t0, process.t_min, denoise=True)
                    ref = refs[t0]
                    err = [float((y - ref).norm() / ref.norm()) for y in (ours, theirs)]
                    rows.append(LongStep(name, schedule, k, solver, *err))
    return LongStepBench(rows, total, n, dim)


def _without_rule(name: str) -> DPMSolverPPMultistep | UniPC | MRSampler:
    """The named solver with ``max_h=inf``: the paper's and diffusers' rule."""
    solver = get_solver(name)
    assert isinstance(solver, DPMSolverPPMultistep | UniPC | MRSampler), name  # the SOLVERS have the rule
    return replace(solver, max_h=math.inf)


def _applies(process: Process, schedule: str) -> bool:
    """Whether ``schedule`` accepts ``process`` (the discrete spacings refuse continuous processes)."""
    try:
        make_grid(process, schedules.get(schedule), 2, "zero")
    except ValueError:
        return False
    return True


def format_report(result: LongStepBench) -> str:
    """The summary (cases helped / hurt, the extremes) and one line per changed case."""
    rows = result.rows
    better = sum(r.ratio < 1 for r in rows)
    lines = [
        f"Multistep solvers with / without the long-step rule (16-d default mixture, {result.n} samples, "
        "relative RMSE against the exact ODE and denoiser)",
        f"the rule changes {len(rows)} of {result.total} cases (process x schedule x steps x solver): "
        f"better in {better}, worse in {len(rows) - better}",
    ]
    if rows:
        best, worst = min(rows, key=lambda r: r.ratio), max(rows, key=lambda r: r.ratio)
        lines += [
            f"best:  {_case(best)}",
            f"worst: {_case(worst)}",
            f"largest error without the rule: {_case(max(rows, key=lambda r: r.without))}",
            "",
            f"{'process':12s} {'schedule':13s} {'steps':>5s} {'solver':9s} {'with':>9s} {'without':>9s}"
            " ratio",
        ]
        lines += [
            f"{r.process:12s} {r.schedule:13s} {r.steps:5d} {r.solver:9s} {r.with_rule:9.2e} {r.without:9.2e}"
            f" {r.ratio:.3g}"
            for r in rows
        ]
    return "\n".join(lines)


def _case(r: LongStep) -> str:
    return f"{r.solver} on {r.process}, {r.schedule}, {r.steps} steps: {r.with_rule:.3g} vs {r.without:.3g}"


def plot(result: LongStepBench, path: str | Path) -> bool:
    """Error with the rule against error without it, one point per changed case, by solver (log-log,
    the diagonal dashed). ``False`` (logged) if matplotlib is not installed."""
    values = [v for r in result.rows for v in (r.with_rule, r.without)] or [1e-3, 1.0]
    series = []
    for solver, marker in zip(SOLVERS, "os^D", strict=True):
        rs = [r for r in result.rows if r.solver == solver]
        series.append(
            (solver, [r.without for r in rs], [r.with_rule for r in rs], {"s": 14, "marker": marker})
        )
    return diagonal_scatter(
        path,
        series,
        (min(values) / 2, max(values) * 2),
        "relative RMSE without the rule (max_h=inf)",
        "relative RMSE with the rule (default)",
        "Long steps at first order: below the diagonal it helps",
    )


def write_results(result: LongStepBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/longstep.csv`` (one line per changed case) and ``OUT/longstep.png``."""
    header: Sequence[str] = ["process", "schedule", "steps", "solver", "with_rule", "without", "ratio"]
    rows = (
        [r.process, r.schedule, r.steps, r.solver, f"{r.with_rule:.6g}", f"{r.without:.6g}", f"{r.ratio:.6g}"]
        for r in result.rows
    )
    return write_outputs(out, "longstep", header, rows, lambda path: plot(result, path))
