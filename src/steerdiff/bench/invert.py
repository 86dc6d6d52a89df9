r"""``steerdiff bench invert``: deterministic inversion (:func:`steerdiff.invert`) against the exact
inversion, beside diffusers' inverse schedulers.

Model: the embedded default (:func:`steerdiff.bench.solvers.default_model`: the 64-d, 10-component
Gaussian mixture under Stable Diffusion's betas, exact denoiser). Clean samples: ``n`` exact draws of the
mixture (:meth:`~steerdiff.toy.GaussianMixture.sample` from :func:`~steerdiff.bench.solvers.generator_for`
``(seed, "x_0")``), the data an inversion is given. Error: the relative RMSE
``||x - x_ref|| / ||x_ref||`` over the batch against the exact inversion over the run's own grid, the
probability-flow ODE from ``x_0`` at the grid's first node to its last
(:meth:`~steerdiff.toy.GaussianMixture.reference_ode`, DOP853 at ``rtol = 1e-10``).

The exact answer depends on both end nodes, and the grids do not share them: ``invert`` takes ``x_0`` as
the state at the sampling grid's last node ``t_N``, which is ``t_min`` for most schedules but not for
``ays``, ``karras_capped``, ``karras_jump`` and ``trailing`` (``t_N`` 4.7 for ``karras_capped`` at 10
steps, 90 for ``trailing``), and ``leading`` starts below ``t_max``. So :class:`ExactInversions` solves the
ODE once per distinct start node and reaches that start's end nodes one after the other (100 distinct
starts over the default run's grids, both sides). A grid ending at a larger ``t_N`` poses the easier
problem -- the data smoothed by noise -- and ``trailing`` (``t_N`` 166 / 90 / 19 at 5 / 10 / 50 steps)
wins at few steps on both sides for that reason; so the best of each side is compared both over all runs
and over the runs that take ``x_0`` at the data end (``t_min``, or ``sigma = 0``:
:meth:`InvertBench.from_data`), the whole inversion.

* every deterministic solver (:func:`steerdiff.inversion.deterministic_solvers`) x every schedule at each
  NFE of :data:`NFES` it reaches (``solver.nfe(N, clean_end=False)``, the grid ``sample(...,
  final="none")`` takes), through :func:`~steerdiff.bench.solvers.sweep_deterministic`;
* diffusers' ``DDIMInverseScheduler`` and ``DPMSolverMultistepInverseScheduler`` (:func:`diffusers_configs`)
  on the same ``x_0`` and exact net, run as a pipeline runs them
  (:func:`~steerdiff.integrations.diffusers_ref.diffusers_sample`), each scored against the exact
  inversion over its own grid (:func:`inverse_ends`);
* the defaults (``sd.invert`` without a solver, against ``DDIMInverseScheduler``'s default config) at
  :data:`DEFAULT_STEPS`, and each one's round trip: ``sample(invert(x_0), final="none")`` against
  ``DDIMScheduler`` (its default config too) from diffusers' inversion, both against ``x_0``, with the
  samples each sends to another mixture component (a few, near a basin boundary, dominate the RMSE).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import inversion, sampling
from ..denoiser import Denoiser
from ..integrations.diffusers_ref import diffusers_sample, quiet_diffusers
from ..metrics import relative_rmse
from ..processes import Process
from ..toy.gmm import GaussianMixture
from .solvers import (
    NFES,
    DiffusersConfig,
    Row,
    best_lines,
    best_per_method,
    default_model,
    diffusers_wanted,
    format_table,
    generator_for,
    sweep_configs,
    sweep_deterministic,
)

__all__ = [
    "DEFAULT_STEPS",
    "DIFFUSERS_DEFAULT",
    "QUICK_NFES",
    "DefaultVsDiffusers",
    "ExactInversions",
    "InvertBench",
    "Starts",
    "clean_samples",
    "diffusers_configs",
    "format_report",
    "inverse_ends",
    "run",
]

log = logging.getLogger(__name__)

QUICK_NFES = (5, 10)
DEFAULT_STEPS = (10, 20)  # the defaults and their round trips
# a start node this near t_min is the data end (diffusers' float32 sigmas put t_min at ~1e-7 from 0)
DATA_END_TOL = 1e-3
Starts = dict[tuple[str, str, str, int], float | None]  # (source, method, schedule, NFE) -> start node


def clean_samples(gmm: GaussianMixture, n: int, seed: int) -> Tensor:
    """``n`` exact draws of ``gmm`` (float64) from :func:`generator_for` ``(seed, "x_0")``."""
    return gmm.sample(n, generator_for(seed, "x_0"))


class ExactInversions:
    """The exact inversion of ``x_0`` between two nodes, memoized: the probability-flow ODE from ``x_0`` at
    ``start`` (``None``: the clean state ``alpha = 1``) to ``end``. From one start, an end node is reached
    from the nearest end below it already solved for (one ODE solution per start, in pieces)."""

    def __init__(self, gmm: GaussianMixture, process: Process, x_0: Tensor) -> None:
        self.gmm, self.process, self.x_0 = gmm, process, x_0
        self._ends: dict[float | None, dict[float, Tensor]] = {}

    def __call__(self, start: float | None, end: float) -> Tensor:
        ends = self._ends.setdefault(start, {})
        if end not in ends:
            below = [t for t in ends if t < end]
            t0, x = (max(below), ends[max(below)]) if below else (start, self.x_0)
            ends[end] = self.gmm.reference_ode(x, self.process, t0, end)
        return ends[end]

    @property
    def starts(self) -> int:
        """The distinct start nodes solved from."""
        return len(self._ends)


DIFFUSERS_DEFAULT = DiffusersConfig("DDIMInverse", "DDIMInverseScheduler", (("clip_sample", False),))


def diffusers_configs() -> list[DiffusersConfig]:
    """diffusers' inverse schedulers, SD betas: ``DDIMInverseScheduler`` with its ``leading`` (default) and
    ``trailing`` spacings, from ``alpha = 1`` (``set_alpha_to_one=True``, its default) and from timestep 0
    (``False``, Stable Diffusion's config: the first step is then the identity); and
    ``DPMSolverMultistepInverseScheduler`` of orders 1-3 with the ``linspace`` (default), ``leading`` and
    ``trailing`` spacings and Karras, exponential and beta sigmas. ``clip_sample`` (DDIM's clipping of the
    ``x_0`` estimate to ``[-1, 1]``, an image-range assumption) is off."""
    spacings: tuple[tuple[tuple[str, Any], ...], ...] = (
        (),
        (("timestep_spacing", "leading"),),
        (("timestep_spacing", "trailing"),),
        (("use_karras_sigmas", True),),
        (("use_exponential_sigmas", True),),
        (("use_beta_sigmas", True),),
    )
    ddim = [
        DiffusersConfig(
            DIFFUSERS_DEFAULT.method + ("" if one else "(set_alpha_to_one=False)"),
            DIFFUSERS_DEFAULT.cls,
            (*DIFFUSERS_DEFAULT.overrides, ("timestep_spacing", spacing), ("set_alpha_to_one", one)),
        )
        for one in (True, False)
        for spacing in ("leading", "trailing")
    ]
    dpm = [
        DiffusersConfig(
            f"DPMSolverMultistepInverse(order={k})",
            "DPMSolverMultistepInverseScheduler",
            (("solver_order", k), *s),
        )
        for k in (1, 2, 3)
        for s in spacings
    ]
    return ddim + dpm


def inverse_ends(scheduler: Any, process: Process) -> tuple[float | None, float]:
    """The nodes a diffusers inverse scheduler (after ``set_timesteps``) carries its state between, as
    ``process`` times: ``DPMSolverMultistepInverseScheduler`` from ``sigmas[0]`` to ``sigmas[-1]`` (its
    ``sigma / alpha`` values; the last, ``noisiest_timestep``'s, is the target of its last step);
    ``DDIMInverseScheduler`` from ``initial_alpha_cumprod`` (1: ``None``, the clean state; else timestep 0)
    to its last timestep (each step evaluates the net at its target)."""
    if hasattr(scheduler, "sigmas"):

        def t_of(s: Tensor) -> float:
            return min(max(float(process.t_of_sigma_ratio(s.double())), process.t_min), process.t_max)

        return t_of(scheduler.sigmas[0]), t_of(scheduler.sigmas[-1])
    start = None if float(scheduler.initial_alpha_cumprod) == 1.0 else 0.0
    return start, float(scheduler.timesteps[-1])


@dataclass
class DefaultVsDiffusers:
    """At ``steps`` steps (NFE): the error of ``sd.invert``'s default and of diffusers' default inverse
    scheduler against their exact inversions, of each one's round trip against ``x_0``, and how many
    samples each round trip ends in another mixture component than ``x_0``'s."""

    steps: int
    ours: float
    theirs: float
    ours_trip: float
    theirs_trip: float
    switched: tuple[int, int]


@dataclass
class InvertBench:
    """Everything ``steerdiff bench invert`` measured (``rows[i].errors``: relative RMSE per NFE)."""

    nfes: tuple[int, ...]
    n: int
    seed: int
    t_min: float
    rows: list[Row]
    starts: Starts
    defaults: list[DefaultVsDiffusers]
    seconds: dict[str, float]

    def of(self, source: str) -> list[Row]:
        """The rows of ``"steerdiff"`` or of ``"diffusers"``."""
        return [r for r in self.rows if r.source == source]

    def start(self, row: Row, nfe: int) -> float | None:
        """The node ``row``'s run at ``nfe`` took ``x_0`` at (``None``: ``sigma = 0``)."""
        return self.starts[row.source, row.method, row.same_as or row.schedule, nfe]

    def from_data(self, source: str) -> list[Row]:
        """The rows of ``source`` with only their runs that take ``x_0`` at the data end (``t_min``, or
        ``sigma = 0``): the whole inversion, the same problem for every run."""
        out = []
        for r in self.of(source):
            errors = {nfe: e for nfe, e in r.errors.items() if _at_data_end(self.start(r, nfe), self.t_min)}
            out.append(Row(r.source, r.method, r.schedule, errors, r.same_as))
        return out


def _at_data_end(start: float | None, t_min: float) -> bool:
    """Whether a run took ``x_0`` at ``sigma = 0`` or at ``t_min`` (a failed run's ``nan``: no)."""
    return start is None or start - t_min < DATA_END_TOL


def _ours(
    den: Denoiser,
    x_0: Tensor,
    exact: ExactInversions,
    starts: Starts,
    solver: str,
    sched: str,
    steps: int,
    nfe: int,
) -> float:
    """``sd.invert``'s error against the exact inversion over its grid (``nan``: the run failed); its
    start node goes to ``starts`` (``nan`` for a failed run)."""
    key = ("steerdiff", solver, sched, nfe)
    starts[key] = math.nan
    try:
        x, info = inversion.invert(den, x_0, steps, solver, sched, return_info=True)
    except (ValueError, FloatingPointError) as err:
        log.warning("invert %s/%s at %d steps failed: %s", solver, sched, steps, err)
        return math.nan
    starts[key] = info.grid.t[0]
    if info.nfe != nfe:
        log.warning("invert %s: %d steps made %d network calls, not %d", solver, steps, info.nfe, nfe)
        return math.nan
    return relative_rmse(x, exact(info.grid.t[0], info.grid.t[-1]))


def _theirs(
    config: DiffusersConfig, gmm: GaussianMixture, proc: Process, x_0: Tensor, steps: int
) -> tuple[Tensor, float | None, float] | None:
    """diffusers' inversion of ``x_0`` in ``steps`` steps and its end nodes (``None``: the run failed; a
    warning for non-finite samples too, such as ``DPMSolverMultistepInverseScheduler``'s of order 3 from 15
    steps on where its last step has ``h = 0``: a repeated last sigma, and ``0 / 0`` in its third-order
    weights)."""
    sched = config.make()
    try:
        x, _ = diffusers_sample(sched, gmm, proc, x_0, steps)
    except Exception as err:  # a failing reference run is reported in the table, not fatal
        log.warning("diffusers %s (%s) at %d steps failed: %r", config.method, config.schedule(), steps, err)
        return None
    if not bool(x.isfinite().all()):  # its error is nan: said, as bench solvers says it
        log.warning(
            "diffusers %s (%s) at %d steps returned non-finite samples",
            config.method,
            config.schedule(),
            steps,
        )
    return (x, *inverse_ends(sched, proc))


def sweep_diffusers(
    gmm: GaussianMixture,
    proc: Process,
    x_0: Tensor,
    exact: ExactInversions,
    starts: Starts,
    nfes: Sequence[int],
    progress: bool = False,
) -> list[Row]:
    """Every configuration of :func:`diffusers_configs` at every NFE of ``nfes`` it reaches; the start
    nodes go to ``starts``."""

    def score(config: DiffusersConfig, steps: int, nfe: int) -> float:
        sched = config.make()
        sched.set_timesteps(steps)
        starts["diffusers", config.method, config.schedule(), nfe] = inverse_ends(sched, proc)[0]
        run = _theirs(config, gmm, proc, x_0, steps)
        return math.nan if run is None else relative_rmse(run[0], exact(run[1], run[2]))

    return sweep_configs(diffusers_configs(), nfes, score, progress=progress)


def defaults_vs_diffusers(
    gmm: GaussianMixture, proc: Process, x_0: Tensor, exact: ExactInversions, steps: Sequence[int]
) -> list[DefaultVsDiffusers]:
    """``sd.invert``'s default against :data:`DIFFUSERS_DEFAULT` at each of ``steps``, and the round trips:
    ``sd.sample`` (its default, ``final="none"``) from ours, ``DDIMScheduler`` (default config, no
    clipping: it ends at ``alpha = 1`` where ``DDIMInverseScheduler`` starts) from theirs."""
    den = gmm.denoiser(proc)
    sampler = DiffusersConfig("DDIM", "DDIMScheduler", (("clip_sample", False),))
    component = gmm.log_responsibilities(x_0).argmax(-1)

    def trip(back: Tensor) -> tuple[float, int]:
        return relative_rmse(back, x_0), int((gmm.log_responsibilities(back).argmax(-1) != component).sum())

    out = []
    with quiet_diffusers():
        for n in steps:
            x_T, info = inversion.invert(den, x_0, n, return_info=True)
            ours = relative_rmse(x_T, exact(info.grid.t[0], info.grid.t[-1]))
            ours_trip, ours_switched = trip(sampling.sample(den, x_T, n, final="none"))
            run = _theirs(DIFFUSERS_DEFAULT, gmm, proc, x_0, n)
            if run is None:
                theirs, theirs_trip, theirs_switched = math.nan, math.nan, -1
            else:
                theirs = relative_rmse(run[0], exact(run[1], run[2]))
                theirs_trip, theirs_switched = trip(diffusers_sample(sampler.make(), gmm, proc, run[0], n)[0])
            out.append(
                DefaultVsDiffusers(n, ours, theirs, ours_trip, theirs_trip, (ours_switched, theirs_switched))
            )
    return out


def run(
    n: int = 256, seed: int = 0, quick: bool = False, with_diffusers: bool = True, progress: bool = False
) -> InvertBench:
    """Run the benchmark (``quick``: NFE in :data:`QUICK_NFES`, the defaults at 10 steps only)."""
    nfes = QUICK_NFES if quick else NFES
    gmm, proc = default_model()
    den = gmm.denoiser(proc)
    x_0 = clean_samples(gmm, n, seed)
    exact = ExactInversions(gmm, proc, x_0)
    starts: Starts = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    rows = sweep_deterministic(
        lambda solver, sched, steps, nfe: _ours(den, x_0, exact, starts, solver, sched, steps, nfe),
        proc,
        nfes,
        progress,
        clean_end=False,
    )
    seconds["steerdiff"] = time.perf_counter() - t0
    defaults: list[DefaultVsDiffusers] = []
    if diffusers_wanted(with_diffusers, "steerdiff's inversion"):
        t0 = time.perf_counter()
        rows += sweep_diffusers(gmm, proc, x_0, exact, starts, nfes, progress)
        defaults = defaults_vs_diffusers(gmm, proc, x_0, exact, [s for s in DEFAULT_STEPS if s in nfes])
        seconds["diffusers"] = time.perf_counter() - t0
    log.info("bench invert: %d distinct start nodes", exact.starts)
    return InvertBench(tuple(nfes), n, seed, proc.t_min, rows, starts, defaults, seconds)


def format_report(result: InvertBench) -> str:
    """Best schedule per solver, best configuration per diffusers scheduler, the best of each side at each
    NFE, and the defaults with their round trips."""
    ours, theirs = result.of("steerdiff"), result.of("diffusers")
    lines = [
        f"Relative RMSE of the inversion of {result.n} exact samples x_0 (default 64-d mixture, SD betas, "
        f"seed {result.seed}) against the exact inversion over each run's own grid (the ODE from x_0 at its "
        "first node to its last); '-': NFE not reachable. All rows are in the CSV.",
        "",
        "steerdiff sd.invert, best schedule per solver (columns: NFE):",
        *format_table(best_per_method(ours), result.nfes, "solver"),
    ]
    if theirs:
        lines += [
            "",
            "diffusers, best configuration per inverse scheduler (columns: NFE):",
            *format_table(best_per_method(theirs), result.nfes, "scheduler"),
            "",
            "best at each NFE (ratio: ours / diffusers'), over all runs (grids that take x_0 at a larger "
            "t_N, as trailing does, pose an easier problem):",
            *best_lines(ours, theirs, result.nfes, 2),
            "",
            f"best at each NFE over the runs that take x_0 at the data end (t_min = {result.t_min:g}, or "
            "sigma = 0): the whole inversion:",
            *best_lines(result.from_data("steerdiff"), result.from_data("diffusers"), result.nfes, 2),
        ]
    if result.defaults:
        lines += [
            "",
            f"defaults: sd.invert (UniPC-3's noise form, {sampling.DEFAULT_SCHEDULE}) vs "
            f"diffusers {DIFFUSERS_DEFAULT.cls} default config (leading, set_alpha_to_one; clip_sample off); "
            "round trip: sd.sample(final='none') | DDIMScheduler default config from each inversion, vs x_0:",
        ]
        for d in result.defaults:
            trip = d.ours_trip / d.theirs_trip
            lines.append(
                f"    steps {d.steps:>2}: {d.ours:.2e} vs {d.theirs:.2e}  ratio {d.ours / d.theirs:.3g};"
                f"  round trip {d.ours_trip:.2e} vs {d.theirs_trip:.2e}  ratio {trip:.3g}"
                f" ({d.switched[0]} vs {d.switched[1]} of {result.n} end in another mixture component)"
            )
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())]
    return "\n".join(lines)
