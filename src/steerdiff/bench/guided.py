r"""``steerdiff bench guided``: the solvers for guided denoisers, and the evidence for the guided default.

:func:`steerdiff.sampling.guided_solver` picks DPM-Solver++(2M) below
:data:`~steerdiff.sampling.GUIDED_CORRECTOR_FROM` steps, every step longer than
:func:`~steerdiff.sampling.guided_max_h` of the guidance scale in log-SNR taken at first order -- or where
every noisy step after the first is within that limit, UniPC-2 with the steps longer than
:func:`~steerdiff.sampling.guided_corrector_max_h` predicted at first order -- and UniPC-2 (bh2, with
corrector) from there on, its steps longer than ``guided_max_h`` predicted at first order. This bench
measures that choice against the alternatives on exact models: classifier-free guidance
(:class:`~steerdiff.guidance.CFG`) toward two components of the default mixture
(:func:`~steerdiff.bench.solvers.cfg_denoiser`, as ``steerdiff bench solvers`` (d)) on the 16-d mixture
under SD, DDPM and zero-terminal-SNR betas, EDM and rectified flow, and on the 64-d one under SD,
DDPM and zero-terminal-SNR betas and rectified flow (:func:`~steerdiff.bench.longstep.processes`), at CFG
scales :data:`SCALES` and :data:`STEPS` steps on ``karras_capped``.

Error: the relative RMSE against the guided probability-flow ODE from the same ``x_T``, solved by
:data:`~steerdiff.bench.solvers.CFG_REFERENCE_STEPS` DPM-Solver++(2M) steps on the log-SNR-uniform grid
and checked against as many UniPC-3 steps on the Karras one
(:func:`~steerdiff.bench.solvers.guided_reference`; the time-uniform check of ``steerdiff bench solvers``
is coarse under EDM). ``x_T`` is ``draws`` independent standard normal
draws of ``n`` samples (:func:`~steerdiff.bench.solvers.initial_noise` of seeds ``seed, seed + 1, ...``),
pooled; scaled
by ``sqrt(alpha^2 + sigma^2)`` at ``t_max`` where the process is neither VP nor rectified flow (EDM:
``sigma_max``), as a pipeline draws it.

:func:`validate` (``steerdiff bench guided --validate``) checks the default's grid rules on other data
(:data:`VALIDATION_SETS`): the same problems from other ``x_T``, the learned digits model, and other
schedules, against the default before the rules (:data:`OLD_DEFAULT`). The rule below
:data:`~steerdiff.sampling.GUIDED_CORRECTOR_FROM` steps was chosen on :func:`run`'s data alone; the one from
there (long steps predicted at first order) on sets (a) and (c), which :func:`run`'s grid hardly tests
(``karras_capped`` keeps the steps short), so set (d) (``x_T`` seeds ``seed + 200, ...`` on ``karras`` and
``logsnr_uniform``) is the data it was not chosen on.
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
from ..schedules import Custom
from ..schedules import get as get_schedule
from ..solvers import get as get_solver
from ..solvers.base import Grid, Solver, make_grid
from ..solvers.dpmpp import DPMSolverPPMultistep
from ..solvers.unipc import UniPC
from ..toy.gmm import default_benchmark_mixture
from ._figure import diagonal_scatter, panel_figure, write_outputs
from .longstep import processes
from .solvers import CFG_REFERENCE_STEPS, cfg_denoiser, guided_reference, initial_noise

__all__ = [
    "CANDIDATES",
    "DIGITS_STEPS",
    "OLD_DEFAULT",
    "PROBLEMS",
    "QUICK_SCALES",
    "QUICK_STEPS",
    "SCALES",
    "STEPS",
    "VALIDATION_SETS",
    "VALIDATION_STEPS",
    "GuidedBench",
    "GuidedCase",
    "GuidedValidation",
    "candidate_solver",
    "format_report",
    "format_validation",
    "plot",
    "plot_validation",
    "problem_setup",
    "run",
    "summary",
    "validate",
    "write_results",
    "write_validation",
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


# the default before its two grid rules (UniPC-2 below GUIDED_CORRECTOR_FROM steps where the grid is short
# enough; from there, long steps predicted at first order), the validation's baseline
OLD_DEFAULT = "old_default"
OLD_DEFAULT_IS = f"2m_scaled below {GUIDED_CORRECTOR_FROM} steps, unipc_2 from there"


def candidate_solver(name: str, steps: int, scale: float, grid: Grid | None = None) -> Solver:
    """The solver the candidate ``name`` (of :data:`CANDIDATES`, or :data:`OLD_DEFAULT`) runs at ``steps``
    steps and CFG ``scale`` on ``grid`` (which only the default looks at)."""
    if name == "default":
        return guided_solver(steps, scale, grid)
    if name == OLD_DEFAULT:
        return candidate_solver(
            "2m_scaled" if steps < GUIDED_CORRECTOR_FROM else "unipc_2", steps, scale, grid
        )
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
    schedule: str = DEFAULT_SCHEDULE

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
    *,
    schedule: str = DEFAULT_SCHEDULE,
    candidates: Sequence[str] = tuple(CANDIDATES),
    scales: Sequence[float] | None = None,
    steps: Sequence[int] | None = None,
    references: dict[tuple[Any, ...], tuple[Tensor, float]] | None = None,
) -> GuidedBench:
    """Every problem (of :data:`PROBLEMS`; ``only``: those named) x scale x step count x candidate
    (``quick``: scales :data:`QUICK_SCALES`, steps :data:`QUICK_STEPS`; ``scales`` and ``steps``, where
    given, instead) on ``schedule``. A candidate whose solver equals another's at a case (the default is
    always one of the others) is run once. The reference starts at the grid's first node, ``t_max``
    except under ``leading`` (:func:`_reference`); ``references`` (where given) keeps the references
    across calls (by problem, scale, ``x_T`` and first node)."""
    start = time.perf_counter()
    scales = scales if scales is not None else QUICK_SCALES if quick else SCALES
    steps = steps if steps is not None else QUICK_STEPS if quick else STEPS
    refs = {} if references is None else references
    chosen = [p for p in PROBLEMS if only is None or p in only]
    cases: list[GuidedCase] = []
    gaps: dict[tuple[str, float], float] = {}
    for name in tqdm(chosen, desc=f"guided {schedule}", disable=not progress, leave=False):
        make, x_T = problem_setup(name, n, seed, draws)
        for w in scales:
            den = make(w)
            for k in steps:
                grid = make_grid(den.process, get_schedule(schedule), k)
                key = (name, w, n, seed, draws, grid.t[0])
                if key not in refs:
                    refs[key] = _reference(den, x_T, grid.t[0], CFG_REFERENCE_STEPS, CHECK_SCHEDULE)
                ref, gap = refs[key]
                gaps[name, w] = max(gap, gaps.get((name, w), 0.0))
                cases.append(_case(name, den, x_T, ref, w, grid, schedule, candidates))
    return GuidedBench(cases, gaps, n, draws, time.perf_counter() - start)


def _reference(
    den: Denoiser, x_T: Tensor, t_start: float, steps: int, check_schedule: str, **cond: Any
) -> tuple[Tensor, float]:
    """The guided ODE's solution from ``x_T`` at ``t_start`` and its check
    (:func:`~steerdiff.bench.solvers.guided_reference`) where ``t_start`` is ``t_max``; below (a grid that
    starts lower, ``leading``) ``steps`` DPM-Solver++(2M) steps uniform in log-SNR from ``t_start``,
    checked against as many UniPC-3 steps on the same nodes."""
    p = den.process
    if t_start >= p.t_max:
        return guided_reference(den, x_T, steps, check_schedule, **cond)
    lam = torch.linspace(float(p.lam(t_start)), float(p.lam(p.t_min)), steps, dtype=torch.float64)
    t = p.t_of_lam(lam)
    t[0], t[-1] = t_start, p.t_min
    nodes = Custom(t)
    ref = sample(den, x_T, steps, "dpmpp_2m", nodes, **cond)
    return ref, relative_rmse(sample(den, x_T, steps, "unipc", nodes, **cond), ref)


def _case(
    problem: str,
    den: Denoiser,
    x_T: Tensor,
    ref: Tensor,
    w: float,
    grid: Grid,
    schedule: str,
    candidates: Sequence[str],
    **cond: Any,
) -> GuidedCase:
    """Each candidate's error at scale ``w`` on ``grid`` (of ``schedule``), a solver run once."""
    k = grid.steps
    done: list[tuple[Solver, float]] = []
    errors: dict[str, float] = {}
    for cand in candidates:
        solver = candidate_solver(cand, k, w, grid)
        err = next((e for s, e in done if s == solver), None)
        if err is None:
            err = _error(den, x_T, k, solver, ref, schedule, **cond)
            done.append((solver, err))
        errors[cand] = err
    return GuidedCase(problem, w, k, errors, schedule)


def _error(
    den: Denoiser,
    x_T: Tensor,
    steps: int,
    solver: Solver,
    ref: Tensor,
    schedule: str = DEFAULT_SCHEDULE,
    **cond: Any,
) -> float:
    """Relative RMSE of ``sd.sample`` against ``ref``; ``inf`` where the run overflowed (NaN/inf)."""
    try:
        return relative_rmse(sample(den, x_T, steps, solver, schedule, **cond), ref)
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


# --- validation: the grid rules on other data ----------------------------------------------------------

VALIDATION_STEPS = (3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30)
DIGITS_STEPS = (5, 6, 8, 10, 12, 15, 20)
DIGITS_DRAW = 4096  # bench solvers --model digits' x_T (its guided table runs the first GUIDED_BATCH)
DISCRETE = tuple(p for p in PROBLEMS if p.split("-", 1)[1] in ("sd", "ddpm", "sd-zero-snr"))
# label -> (seed offset of x_T, schedule, problems); "digits": the learned model (_digits_set)
VALIDATION_SETS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "(a) seeds +100": (100, DEFAULT_SCHEDULE, PROBLEMS),
    "(b) digits": (0, DEFAULT_SCHEDULE, ()),
    "(c) logsnr_uniform": (0, "logsnr_uniform", PROBLEMS),
    "(c) karras": (0, "karras", PROBLEMS),
    "(c) linspace": (0, "linspace", DISCRETE),
    "(c) trailing": (0, "trailing", DISCRETE),
    "(c) leading": (0, "leading", DISCRETE),
    "(d) karras +200": (200, "karras", PROBLEMS),
    "(d) logsnr +200": (200, "logsnr_uniform", PROBLEMS),
}
VALIDATED = ("default", OLD_DEFAULT)


@dataclass
class GuidedValidation:
    """Per set of :data:`VALIDATION_SETS`, its cases (the default and :data:`OLD_DEFAULT`); the seed and the
    number of draws (``x_T``: seeds ``seed + offset, ...``; the digits' ``seed, ...``) and the wall time."""

    sets: dict[str, GuidedBench]
    seed: int
    draws: int
    seconds: float

    @property
    def cases(self) -> list[tuple[str, GuidedCase]]:
        """Every case with its set's label, pooled."""
        return [(label, c) for label, b in self.sets.items() for c in b.cases]


def validate(
    n: int = 256,
    seed: int = 0,
    draws: int = 2,
    quick: bool = False,
    progress: bool = True,
    only: Sequence[str] | None = None,
    digits_weights: str | Path | None = None,
) -> GuidedValidation:
    """The default against :data:`OLD_DEFAULT` on :data:`VALIDATION_SETS` at scales :data:`SCALES`:
    (a) the problems of :func:`run` from ``x_T`` of seeds ``seed + 100, ...`` on ``karras_capped``;
    (b) the learned digits model (:mod:`steerdiff.bench.digits`: CFG toward its ``GUIDED_DIGIT``, the first
    ``min(n, GUIDED_BATCH)`` samples of ``draws`` draws of ``x_T`` drawn as ``steerdiff bench solvers
    --model digits``' (seeds ``seed, seed + 1, ...``; draw 0 is its ``x_T``), pooled, :data:`DIGITS_STEPS`
    steps against its ``GUIDED_REFERENCE_STEPS``-step guided ODE); (c) the problems from ``seed`` on
    ``logsnr_uniform`` and ``karras``, and those under discrete betas on ``linspace``, ``trailing`` and
    ``leading`` (the reference from ``leading``'s first node, below ``t_max``); (d) the problems from seeds
    ``seed + 200, ...`` on ``karras`` and ``logsnr_uniform``. (a), (c) and (d) at :data:`VALIDATION_STEPS`,
    ``draws`` x ``n`` samples. ``quick``: scales :data:`QUICK_SCALES`, 5 and 15 steps (digits: scale 2 at 5
    steps)."""
    start = time.perf_counter()
    scales = QUICK_SCALES if quick else SCALES
    steps = (5, 15) if quick else VALIDATION_STEPS
    refs: dict[tuple[Any, ...], tuple[Tensor, float]] = {}
    sets: dict[str, GuidedBench] = {}
    for label, (offset, schedule, problems) in VALIDATION_SETS.items():
        if label == "(b) digits":
            sets[label] = _digits_set(n, seed, draws, quick, digits_weights)
            continue
        chosen = [p for p in problems if only is None or p in only]
        if chosen:
            sets[label] = run(
                n,
                seed + offset,
                draws,
                progress=progress,
                only=chosen,
                schedule=schedule,
                candidates=VALIDATED,
                scales=scales,
                steps=steps,
                references=refs,
            )
    return GuidedValidation(sets, seed, draws, time.perf_counter() - start)


def _digits_set(n: int, seed: int, draws: int, quick: bool, weights: str | Path | None) -> GuidedBench:
    """(b): CFG on the digits model toward its ``GUIDED_DIGIT`` on the first ``min(n, GUIDED_BATCH)``
    samples of each of ``draws`` draws of ``x_T`` (``bench solvers --model digits``' of seeds ``seed, seed +
    1, ...``), pooled, against the guided ODE of :func:`~steerdiff.bench.digits.run`'s guided table."""
    from ..guidance import CFG
    from ..toy import digits as D
    from . import digits as B

    start = time.perf_counter()
    m = B.load_models(weights)
    per_draw = min(n, B.GUIDED_BATCH)

    def draw(s: int) -> Tensor:
        g = torch.Generator().manual_seed(s)
        return torch.randn(DIGITS_DRAW, *D.DIGITS_SHAPE, generator=g, dtype=torch.float64)[:per_draw]

    x_T = torch.cat([draw(s) for s in range(seed, seed + draws)])
    cond: dict[str, Any] = {"label": B.GUIDED_DIGIT}
    cases, gaps = [], {}
    with torch.no_grad():
        for w in QUICK_SCALES[:1] if quick else SCALES:
            den = CFG(m.den, m.den, w, uncond_kwargs={"label": D.NULL_LABEL})
            ref, gaps["digits", w] = guided_reference(den, x_T, B.GUIDED_REFERENCE_STEPS, **cond)
            for k in (5,) if quick else DIGITS_STEPS:
                grid = make_grid(den.process, get_schedule(DEFAULT_SCHEDULE), k)
                cases.append(_case("digits", den, x_T, ref, w, grid, DEFAULT_SCHEDULE, VALIDATED, **cond))
    return GuidedBench(cases, gaps, per_draw, draws, time.perf_counter() - start)


def _ratio(c: GuidedCase) -> float:
    """The default's error / the old default's (1 where both overflowed)."""
    new, old = c.errors["default"], c.errors[OLD_DEFAULT]
    return 1.0 if new == old else new / old


def _validation_row(label: str, cases: Sequence[tuple[str, GuidedCase]]) -> str:
    r = [_ratio(c) for _, c in cases]
    far_old = sum(c.errors[OLD_DEFAULT] > 1 for _, c in cases)
    far_new = sum(c.errors["default"] > 1 for _, c in cases)
    new = sum(c.errors["default"] > 1 >= c.errors[OLD_DEFAULT] for _, c in cases)
    better, worse = sum(v < 1 for v in r), sum(v > 1 for v in r)
    i = max(range(len(r)), key=r.__getitem__)
    where_set, c = cases[i]
    where = f"{c.problem} {c.scale:g} {c.steps}" + (f" ({where_set})" if where_set != label else "")
    return (
        f"{label:20s} {len(r):5d} {_gmean(r):7.3f} {better:6d} {worse:5d} {far_old:6d} {far_new:6d} {new:4d}"
        f" {r[i]:7.3g}  {where}"
    )


def _seeds(first: int, draws: int) -> str:
    """``"seed 3"`` for one draw, ``"seeds 3-4"`` for two from seed 3."""
    return f"seed {first}" if draws == 1 else f"seeds {first}-{first + draws - 1}"


def format_validation(result: GuidedValidation) -> str:
    """Per set and pooled: the cases, the geometric mean of default / old default, the cases more than 1
    from the guided ODE for each (and the default's new ones), the worst ratio; then the digits cases."""
    mixtures = [b for label, b in result.sets.items() if label != "(b) digits"]
    gaps = [g for b in mixtures for g in b.reference_gap.values()]  # (b)'s own reference is checked apart
    sizes = sorted({f"{b.draws} x {b.n}" for b in mixtures})
    digit_set, draws = result.sets["(b) digits"], result.draws
    lines = [
        "Guided default validation: the default (guided_solver: below"
        f" {GUIDED_CORRECTOR_FROM} steps UniPC-2 where every step is within guided_max_h, from there long"
        f" steps predicted at first order) against the old default ({OLD_DEFAULT_IS}) under classifier-free"
        " guidance, relative RMSE against the guided ODE, on other data: the rule below"
        f" {GUIDED_CORRECTOR_FROM} was chosen on steerdiff bench guided (x_T seeds {result.seed}-"
        f"{result.seed + 1}, {DEFAULT_SCHEDULE}), the one from {GUIDED_CORRECTOR_FROM} among three on (a) and"
        " (c); (d) is data neither was chosen on",
        "sets (scales " + ", ".join(f"{w:g}" for w in result.sets[next(iter(result.sets))].scales) + "):",
        f"  (a) bench guided's problems from x_T {_seeds(result.seed + 100, draws)}, {DEFAULT_SCHEDULE}",
        f"  (b) the learned digits model, CFG toward its digit 3 on the first {digit_set.n} samples of"
        f" {'its x_T' if draws == 1 else f'each of {draws} draws of x_T'} ({_seeds(result.seed, draws)}),"
        f" {DEFAULT_SCHEDULE}, against the 400-step guided ODE (dpmpp_2m, logsnr_uniform; checked against"
        f" unipc on time_uniform, within {max(digit_set.reference_gap.values()):.1e})",
        f"  (c) bench guided's problems (seed {result.seed}) on logsnr_uniform and karras; those under"
        " discrete betas ("
        + ", ".join(DISCRETE)
        + ") on linspace, trailing and leading (its reference from its first"
        " node, below t_max)",
        f"  (d) bench guided's problems from x_T {_seeds(result.seed + 200, draws)}, karras and"
        " logsnr_uniform",
        f"  (a), (c), (d): {', '.join(sizes)} samples; references {CFG_REFERENCE_STEPS} steps of dpmpp_2m on"
        f" logsnr_uniform, checked against unipc (within {max(gaps, default=math.nan):.1e})",
        "",
        "ratio: default / old default; > 1: cases more than 1 from the guided ODE (old, default, the"
        " default's new ones); worst: the largest ratio (problem scale steps)",
        f"{'set':20s} {'cases':>5s} {'gmean':>7s} {'better':>6s} {'worse':>5s} {'>1 old':>6s} {'>1 new':>6s}"
        f" {'new':>4s} {'worst':>7s}  where",
    ]
    lines += [_validation_row(label, [(label, c) for c in b.cases]) for label, b in result.sets.items()]
    pooled = result.cases
    for part in ("(c)", "(d)"):
        chosen = [(label, c) for label, c in pooled if label.startswith(part)]
        if chosen:
            lines.append(_validation_row(f"{part} pooled", chosen))
    lines.append(_validation_row("pooled", pooled))
    for part, chosen in (
        (
            f"below {GUIDED_CORRECTOR_FROM} steps",
            [(s, c) for s, c in pooled if c.steps < GUIDED_CORRECTOR_FROM],
        ),
        (
            f"from {GUIDED_CORRECTOR_FROM} steps",
            [(s, c) for s, c in pooled if c.steps >= GUIDED_CORRECTOR_FROM],
        ),
        (
            f"(d) from {GUIDED_CORRECTOR_FROM}",
            [(s, c) for s, c in pooled if s.startswith("(d)") and c.steps >= GUIDED_CORRECTOR_FROM],
        ),
    ):
        if chosen:
            lines.append(_validation_row(part, chosen))
    lines += [
        "",
        "pooled, per scale: "
        + "; ".join(
            f"{w:g}: {_gmean([_ratio(c) for _, c in pooled if c.scale == w]):.3f}"
            f" ({sum(c.scale == w for _, c in pooled)} cases)"
            for w in dict.fromkeys(c.scale for _, c in pooled)
        ),
    ]
    digits = result.sets.get("(b) digits")
    if digits is not None:
        lines += [
            "",
            "(b) digits, per case:",
            f"  {'scale':>5s} {'steps':>5s} {'old':>9s} {'default':>9s} {'ratio':>6s}",
            *(
                f"  {c.scale:5g} {c.steps:5d} {_fmt(c.errors[OLD_DEFAULT]):>9s}"
                f" {_fmt(c.errors['default']):>9s} {_ratio(c):6.3f}"
                for c in digits.cases
            ),
        ]
    lines += ["", f"wall time: {result.seconds:.1f} s"]
    return "\n".join(lines)


def plot_validation(result: GuidedValidation, path: str | Path) -> bool:
    """The default's error against the old default's, one point per case, a colour per set (log-log, the
    diagonal dashed). ``False`` (logged) if matplotlib is not installed."""
    values = [v for _, c in result.cases for v in (c.errors["default"], c.errors[OLD_DEFAULT])]
    finite = [v for v in values if 0 < v < math.inf]
    lo, hi = min(finite) / 1.5, max(finite) * 1.5
    series = [
        (
            f"{label} ({len(b.cases)})",
            [min(c.errors[OLD_DEFAULT], hi) for c in b.cases],
            [min(c.errors["default"], hi) for c in b.cases],
            {"s": 9, "alpha": 0.7},
        )
        for label, b in result.sets.items()
    ]
    return diagonal_scatter(
        path,
        series,
        (lo, hi),
        f"old default ({OLD_DEFAULT_IS}): relative RMSE",
        "default: relative RMSE",
        "Guided default on validation data: below the diagonal the rule helps",
        figsize=(6.0, 5.5),
        legend_size=7,
        unit_lines=True,
    )


def write_validation(result: GuidedValidation, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/guided_validation.csv`` (one line per case) and ``OUT/guided_validation.png``."""
    header = ["set", "problem", "schedule", "scale", "steps", "default", OLD_DEFAULT]
    rows = (
        [label, c.problem, c.schedule, f"{c.scale:g}", c.steps, *(f"{c.errors[n]:.6g}" for n in VALIDATED)]
        for label, c in result.cases
    )
    return write_outputs(out, "guided_validation", header, rows, lambda path: plot_validation(result, path))
