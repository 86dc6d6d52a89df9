r"""``steerdiff bench guided``: the solvers for guided denoisers, and the evidence for the guided default.

:func:`steerdiff.sampling.guided_solver` picks DPM-Solver++(2M) below
:data:`~steerdiff.sampling.GUIDED_CORRECTOR_FROM` steps, every step longer than
:func:`~steerdiff.sampling.guided_max_h` of the guidance scale in log-SNR taken at first order -- or where
every noisy step after the first is within that limit, UniPC-2 with the steps longer than
:func:`~steerdiff.sampling.guided_corrector_max_h` predicted at first order -- and UniPC-2 (bh2, with
corrector) from there on. This bench measures that choice against the alternatives on exact
models: classifier-free guidance (:class:`~steerdiff.guidance.CFG`) toward two components of the default
mixture (:func:`~steerdiff.bench.solvers.cfg_denoiser`, as ``steerdiff bench solvers`` (d)) on the 16-d
mixture under SD, DDPM and zero-terminal-SNR betas, EDM and rectified flow, and on the 64-d one under SD,
DDPM and zero-terminal-SNR betas and rectified flow (:func:`~steerdiff.bench.longstep.processes`), at CFG
scales :data:`SCALES` and :data:`STEPS` steps on ``karras_capped``.

Error: the relative RMSE against the guided probability-flow ODE from the same ``x_T``, solved by
:data:`~steerdiff.bench.solvers.CFG_REFERENCE_STEPS` DPM-Solver++(2M) steps on the log-SNR-uniform grid
and checked against as many UniPC-3 steps on the Karras one
(:func:`~steerdiff.bench.solvers.guided_reference`; the time-uniform check of ``steerdiff bench solvers``
is coarse under EDM). ``x_T`` is ``draws`` independent standard normal
draws of ``n`` samples (seeds ``seed, seed + 1, ...``), pooled; scaled by ``sqrt(alpha^2 + sigma^2)`` at
``t_max`` where the process is neither VP nor rectified flow (EDM: ``sigma_max``), as a pipeline draws it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..denoiser import Denoiser
from ..metrics import relative_rmse
from ..processes import VP, Process, RectifiedFlow
from ..sampling import (
    DEFAULT_SCHEDULE,
    GUIDED_CORRECTOR_FROM,
    GUIDED_MAX_H,
    guided_max_h,
    guided_solver,
    sample,
)
from ..schedules import get as get_schedule
from ..solvers import get as get_solver
from ..solvers.base import Grid, Solver, make_grid
from ..solvers.dpmpp import DPMSolverPPMultistep
from ..solvers.unipc import UniPC
from ..toy.gmm import default_benchmark_mixture
from ._figure import panel_figure, write_outputs
from .longstep import processes
from .solvers import CFG_REFERENCE_STEPS, cfg_denoiser, guided_reference, initial_noise

__all__ = [
    "CANDIDATES",
    "PROBLEMS",
    "QUICK_SCALES",
    "QUICK_STEPS",
    "SCALES",
    "STEPS",
    "GuidedBench",
    "GuidedCase",
    "candidate_solver",
    "format_report",
    "plot",
    "problem_setup",
    "run",
    "summary",
    "write_results",
]

SCALES = (2.0, 4.0, 7.5)
STEPS = (3, 4, 5, 6, 8, 10, 12, 15, 20)
QUICK_SCALES, QUICK_STEPS = (2.0, 7.5), (5, 15)
CHECK_SCHEDULE = "karras"  # the reference's check: as many UniPC-3 steps on this grid
# the problems: mixture dimension and a process of longstep.processes()
PROBLEMS = (
    "16d-sd",
    "16d-ddpm",
    "16d-sd-zero-snr",
    "16d-edm",
    "16d-flow",
    "64d-sd",
    "64d-ddpm",
    "64d-sd-zero-snr",
    "64d-flow",
)
# the candidates, by the name the CSV and the report use, and what each is
CANDIDATES = {
    "default": "sd.sample's guided default, guided_solver(steps, scale, grid)",
    "2m": "DPM-Solver++(2M), max_h=inf (the paper's and diffusers')",
    "2m_flat": f"2M, steps longer than {GUIDED_MAX_H:g} in log-SNR first order at every scale",
    "2m_scaled": "2M, steps longer than guided_max_h(scale) first order",
    "unipc_2": "UniPC-2 (bh2, corrector), max_h=inf",
    "unipc_3": "UniPC-3 (bh2, corrector): the unguided default, unipc",
    "ddim": "DDIM",
}


def candidate_solver(name: str, steps: int, scale: float, grid: Grid | None = None) -> Solver:
    """The solver the candidate ``name`` (of :data:`CANDIDATES`) runs at ``steps`` steps and CFG ``scale`` on
    ``grid`` (which only the default looks at)."""
    if name == "default":
        return guided_solver(steps, scale, grid)
    if name == "2m":
        return DPMSolverPPMultistep(order=2, max_h=math.inf)
    if name == "2m_flat":
        return DPMSolverPPMultistep(order=2, max_h=GUIDED_MAX_H, max_h_ratio=0.0)
    if name == "2m_scaled":
        return DPMSolverPPMultistep(order=2, max_h=guided_max_h(scale), max_h_ratio=0.0)
    if name == "unipc_2":
        return UniPC(order=2, max_h=math.inf)
    if name in ("unipc_3", "ddim"):
        return get_solver("unipc" if name == "unipc_3" else "ddim")
    raise ValueError(f"candidate_solver: name must be one of {', '.join(CANDIDATES)}, got {name!r}")


def problem_setup(name: str, n: int, seed: int, draws: int = 1) -> tuple[Callable[[float], Denoiser], Tensor]:
    """The problem ``name`` (of :data:`PROBLEMS`): ``make(scale)``, its CFG denoiser, and ``x_T``
    (``draws`` draws of ``n`` samples, seeds ``seed, seed + 1, ...``, scaled as the module says)."""
    dim, proc = name.split("-", 1)
    process = processes()[proc]
    gmm = default_benchmark_mixture(dim=int(dim.removesuffix("d")))
    z = torch.cat([initial_noise(n, gmm.dim, seed + k) for k in range(draws)])
    return (lambda w: cfg_denoiser(gmm, process, w)), z * _noise_scale(process)


def _noise_scale(process: Process) -> float:
    """1 for VP and rectified flow (standard normal ``x_T``), else the marginal std at ``t_max``."""
    if isinstance(process, VP | RectifiedFlow):
        return 1.0
    return math.hypot(float(process.alpha(process.t_max)), float(process.sigma(process.t_max)))


@dataclass(frozen=True)
class GuidedCase:
    """One problem at one scale and step count: each candidate's relative RMSE against the guided ODE."""

    problem: str
    scale: float
    steps: int
    errors: dict[str, float]

    @property
    def best(self) -> float:
        """The smallest error of the candidates."""
        return min(self.errors.values())


@dataclass
class GuidedBench:
    """Every case, the reference checks (per problem and scale: the 2M reference against UniPC-3's),
    the samples per case, and the wall time."""

    cases: list[GuidedCase]
    reference_gap: dict[tuple[str, float], float]
    n: int
    draws: int
    seconds: float

    @property
    def scales(self) -> list[float]:
        """The CFG scales measured, in run order."""
        return list(dict.fromkeys(c.scale for c in self.cases))

    @property
    def steps(self) -> list[int]:
        """The step counts measured, ascending."""
        return sorted({c.steps for c in self.cases})

    @property
    def problems(self) -> list[str]:
        """The problems measured (names of :data:`PROBLEMS`), in run order."""
        return list(dict.fromkeys(c.problem for c in self.cases))


def run(
    n: int = 256,
    seed: int = 0,
    draws: int = 2,
    quick: bool = False,
    progress: bool = True,
    only: Sequence[str] | None = None,
) -> GuidedBench:
    """Every problem (of :data:`PROBLEMS`; ``only``: those named) x scale x step count x candidate
    (``quick``: scales :data:`QUICK_SCALES`, steps :data:`QUICK_STEPS`). A candidate whose solver equals
    another's at a case (the default is always one of the others) is run once."""
    start = time.perf_counter()
    scales, steps = (QUICK_SCALES, QUICK_STEPS) if quick else (SCALES, STEPS)
    chosen = [p for p in PROBLEMS if only is None or p in only]
    cases: list[GuidedCase] = []
    gaps: dict[tuple[str, float], float] = {}
    for name in tqdm(chosen, desc="guided", disable=not progress, leave=False):
        make, x_T = problem_setup(name, n, seed, draws)
        for w in scales:
            den = make(w)
            ref, gaps[name, w] = guided_reference(den, x_T, CFG_REFERENCE_STEPS, CHECK_SCHEDULE)
            for k in steps:
                grid = make_grid(den.process, get_schedule(DEFAULT_SCHEDULE), k)
                done: list[tuple[Solver, float]] = []
                errors: dict[str, float] = {}
                for cand in CANDIDATES:
                    solver = candidate_solver(cand, k, w, grid)
                    err = next((e for s, e in done if s == solver), None)
                    if err is None:
                        err = _error(den, x_T, k, solver, ref)
                        done.append((solver, err))
                    errors[cand] = err
                cases.append(GuidedCase(name, w, k, errors))
    return GuidedBench(cases, gaps, n, draws, time.perf_counter() - start)


def _error(den: Denoiser, x_T: Tensor, steps: int, solver: Solver, ref: Tensor) -> float:
    """Relative RMSE of ``sd.sample`` against ``ref``; ``inf`` where the run overflowed (NaN/inf)."""
    try:
        return relative_rmse(sample(den, x_T, steps, solver, DEFAULT_SCHEDULE), ref)
    except FloatingPointError:  # NonFiniteError: the guided estimate overflowed
        return math.inf


BELOW = f"below {GUIDED_CORRECTOR_FROM} steps"
FROM = f"from {GUIDED_CORRECTOR_FROM} steps"


def _gmean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def _fmt(v: float) -> str:
    return f"{v:.2e}" if math.isfinite(v) else "inf"


def _where(c: GuidedCase) -> str:
    return f"{c.problem} {c.steps} steps"


def _worst(cases: Sequence[GuidedCase], name: str) -> GuidedCase:
    return max(cases, key=lambda c: c.errors[name])


def _far(cases: Sequence[GuidedCase], name: str) -> int:
    """How many of ``cases`` end more than 1 (relative RMSE) from the guided ODE under ``name``."""
    return sum(c.errors[name] > 1 for c in cases)


def _ratios(cases: Sequence[GuidedCase], a: str, b: str) -> list[float]:
    return [c.errors[a] / c.errors[b] for c in cases]


def _compare(cases: Sequence[GuidedCase], a: str, b: str) -> str:
    """``a`` against ``b`` over ``cases``: better / worse counts, geometric mean and range of the ratio."""
    r = _ratios(cases, a, b)
    if not r:
        return "-"
    better, worse = sum(v < 1 for v in r), sum(v > 1 for v in r)
    return (
        f"{a} / {b}: better in {better}, worse in {worse} of {len(r)}; ratio geometric mean {_gmean(r):.3g},"
        f" range {min(r):.3g}-{max(r):.3g}"
    )


def summary(result: GuidedBench) -> list[str]:
    """The numbers behind :func:`~steerdiff.sampling.guided_solver`'s choices, per scale."""
    lines: list[str] = []
    names = list(CANDIDATES)
    for w in result.scales:
        at = [c for c in result.cases if c.scale == w]
        below = [c for c in at if c.steps < GUIDED_CORRECTOR_FROM]
        above = [c for c in at if c.steps >= GUIDED_CORRECTOR_FROM]
        lines += [
            "",
            f"scale {w:g} (guided_max_h {guided_max_h(w):.3g}):",
        ]
        if below:
            ks = sorted({c.steps for c in below})
            lines += [
                f"  {BELOW} ({ks[0]}-{ks[-1]} steps, {len(below)} cases): cases more than 1 from the"
                " guided ODE, the worst case, and the geometric mean of error / the best candidate's error"
                " in each case",
                f"    {'candidate':10s} {'> 1':>4s} {'worst':>9s}  {'where':24s} {'gmean/best':>10s}",
            ]
            for name in names:
                worst = _worst(below, name)
                gm = _gmean([c.errors[name] / c.best for c in below])
                far, top = _far(below, name), _fmt(worst.errors[name])
                lines.append(f"    {name:10s} {far:4d} {top:>9s}  {_where(worst):24s} {gm:10.3g}")
            lines += [
                f"    {_compare(below, 'default', '2m_scaled')}",
                f"    {_compare(below, 'default', '2m')}",
                f"    {_compare(below, '2m_scaled', '2m_flat')}",
            ]
            for lo, hi in ((3, 8), (10, 12)):
                part = [c for c in below if lo <= c.steps <= hi]
                if part:
                    counts = ", ".join(f"{name} {_far(part, name)}" for name in names)
                    lines += [
                        f"    {lo}-{hi} steps ({len(part)} cases): more than 1 from the guided ODE: {counts}",
                        f"      {_compare(part, 'default', '2m')}",
                    ]
        if above:
            lines += [
                f"  {FROM} ({len(above)} cases):",
                f"    {_compare(above, 'unipc_2', '2m_scaled')}",
                f"    {_compare(above, 'unipc_2', '2m')}",
                f"    {_compare(above, 'unipc_2', 'unipc_3')}",
                "    cases more than 1 from the guided ODE: "
                + ", ".join(f"{n} {_far(above, n)}" for n in names),
            ]
            worse = [c for c in above if c.errors["unipc_2"] > c.errors["2m_scaled"]]
            if worse:
                lines.append(
                    "    2M ahead of UniPC-2: "
                    + "; ".join(
                        f"{_where(c)} {_fmt(c.errors['2m_scaled'])} vs {_fmt(c.errors['unipc_2'])}"
                        for c in worse
                    )
                )
        lines += [
            "  unipc_2 / default by step count (geometric mean over the problems; cases UniPC-2 is better;"
            " UniPC-2's cases more than 1 from the guided ODE):",
            "    " + "; ".join(_by_steps(at, k) for k in sorted({c.steps for c in at})),
        ]
    return lines


def _by_steps(cases: Sequence[GuidedCase], k: int) -> str:
    at = [c for c in cases if c.steps == k]
    r = _ratios(at, "unipc_2", "default")
    return f"{k}: {_gmean(r):.2g} ({sum(v < 1 for v in r)}/{len(r)}, {_far(at, 'unipc_2')})"


def format_report(result: GuidedBench) -> str:
    """The summary per scale and one line per case (problem x scale x steps) with every candidate."""
    names = list(CANDIDATES)
    gaps = result.reference_gap.values()
    lines = [
        "Guided solvers: classifier-free guidance toward components 0-1 of the default mixture, relative"
        f" RMSE against the guided ODE ({CFG_REFERENCE_STEPS} steps of dpmpp_2m on logsnr_uniform;"
        f" {CFG_REFERENCE_STEPS} of unipc on {CHECK_SCHEDULE} agree within {max(gaps):.1e});"
        f" {result.draws} x {result.n} samples; all candidates on {DEFAULT_SCHEDULE}; 2 NFE per step",
        "candidates:",
        *(f"  {name:10s} {what}" for name, what in CANDIDATES.items()),
        *summary(result),
        "",
        f"{'problem':16s} {'scale':>5s} {'steps':>5s} " + " ".join(f"{name:>9s}" for name in names),
    ]
    lines += [
        f"{c.problem:16s} {c.scale:5g} {c.steps:5d} "
        + " ".join(f"{_fmt(c.errors[name]):>9s}" for name in names)
        for c in result.cases
    ]
    lines += ["", f"wall time: {result.seconds:.1f} s"]
    return "\n".join(lines)


def plot(result: GuidedBench, path: str | Path) -> bool:
    """Per scale, error against steps for each candidate: the geometric mean over the problems (top row)
    and the worst problem (bottom row); log scale, the corrector's switch dotted. ``False`` (logged) if
    matplotlib is not installed."""
    scales = result.scales
    k = len(result.problems)
    titles = [f"scale {w:g}: geometric mean of {k}" for w in scales] + [
        f"scale {w:g}: worst of {k}" for w in scales
    ]
    styles = {"default": ("k", "-", 3.0)}

    def draw(ax: Any, title: str, colors: Sequence[Any]) -> None:
        w = scales[titles.index(title) % len(scales)]
        worst = "worst" in title
        for j, name in enumerate(CANDIDATES):
            ys = []
            for n in result.steps:
                errs = [c.errors[name] for c in result.cases if c.scale == w and c.steps == n]
                ys.append(max(errs) if worst else _gmean(errs))
            color, ls, lw = styles.get(name, (colors[j], "-", 1.2))
            z = 3 if name == "default" else 2  # the default on top of the candidate it equals
            ax.plot(result.steps, ys, ls, color=color, lw=lw, marker="o", ms=2.5, label=name, zorder=z)
        ax.axvline(GUIDED_CORRECTOR_FROM, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if worst and w == scales[0]:
            ax.set_ylabel("worst relative RMSE")

    return panel_figure(
        path,
        titles,
        draw,
        cols=len(scales),
        panel_size=(4.2, 3.3),
        suptitle="CFG on exact mixtures: error against the guided ODE (the default thick black)",
        ylabel="relative RMSE (geometric mean)",
        xticks=result.steps,
        xlabel="steps (2 NFE each)",
    )


def write_results(result: GuidedBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/guided.csv`` (one line per case, an error column per candidate) and ``OUT/guided.png``."""
    header = ["problem", "scale", "steps", *CANDIDATES]
    rows = (
        [c.problem, f"{c.scale:g}", c.steps, *(f"{c.errors[n]:.6g}" for n in CANDIDATES)]
        for c in result.cases
    )
    return write_outputs(out, "guided", header, rows, lambda path: plot(result, path))
