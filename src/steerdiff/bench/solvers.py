r"""``steerdiff bench solvers``: solver accuracy at fixed NFE on an exact model, beside diffusers.

Model: :func:`steerdiff.toy.default_benchmark_mixture` (64 dimensions, 10 components) under Stable
Diffusion's betas (:meth:`steerdiff.VP.scaled_linear`), used through its exact denoiser. Initial
noise ``x_T = randn(batch, 64)`` in float64 from :func:`generator_for` ``(seed, "x_T")``
(:func:`initial_noise`).
Reference: the exact sample that :func:`steerdiff.sample` approximates,
``gmm.reference_ode(x_T, proc, proc.t_max, proc.t_min, denoise=True)`` (the probability-flow ODE
to ``t_min`` by DOP853 at ``rtol = 1e-10``, then the exact denoiser there). Error: the relative
RMSE ``||x - x_ref|| / ||x_ref||`` over the batch.

* Every deterministic solver of :func:`steerdiff.solvers.available` runs with every schedule of
  :func:`steerdiff.schedules.available` at each NFE of :data:`NFES`, with the step count ``N``
  for which ``solver.nfe(N) == NFE`` (NFE values that no ``N`` reaches are left out; schedules
  that give the same grid as an earlier one, like ``exponential`` and ``logsnr_uniform``, reuse
  its numbers).
* Where diffusers is installed its schedulers (:func:`diffusers_configs`) run on the same model and
  ``x_T``, driven as a pipeline drives them (:mod:`steerdiff.integrations.diffusers_ref`).
* Sampler overhead (:func:`sampler_overhead`): wall time per step outside the network, with a net
  that returns a precomputed tensor, ours against diffusers' ``scheduler.step`` loop.
* Guided sampling (:func:`guided_vs_diffusers`), flow models (:func:`flow_vs_diffusers`) and both
  (:func:`guided_vs_diffusers` with ``flow``): the defaults under classifier-free guidance, under
  rectified flow, and under both, against diffusers' samplers for them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import sampling, schedules, solvers
from ..denoiser import Denoiser
from ..guidance import CFG
from ..integrations.diffusers_ref import (
    diffusers_sample,
    quiet_diffusers,
    run_scheduler,
    sd_betas_config,
)
from ..metrics import relative_rmse
from ..processes import VP, Process, RectifiedFlow
from ..sampling import DEFAULT_SCHEDULE
from ..solvers.base import Solver, make_grid
from ..toy.gmm import GaussianMixture, default_benchmark_mixture
from ._figure import pyplot
from .overhead import Overhead, format_overhead, sampler_overhead

__all__ = [
    "DIFFUSERS_BEST",
    "NFES",
    "PAIRED_FIT_SEED",
    "QUICK_NFES",
    "BestVsBest",
    "Decisions",
    "DefaultVsDiffusers",
    "DiffusersConfig",
    "Draws",
    "FlowRow",
    "GuidedBench",
    "GuidedRow",
    "Problem",
    "Results",
    "Row",
    "SolverBench",
    "Theirs",
    "best_at",
    "best_lines",
    "best_per_method",
    "best_vs_best",
    "cfg_denoiser",
    "csv_table",
    "decided_at",
    "default_model",
    "default_vs_diffusers",
    "diffusers_configs",
    "diffusers_nfe",
    "diffusers_wanted",
    "fifth_at",
    "flow_euler_sampler",
    "flow_match_euler",
    "flow_vs_diffusers",
    "format_guided",
    "format_report",
    "format_table",
    "generator_for",
    "guided_errors",
    "guided_reference",
    "guided_vs_diffusers",
    "heun_in_s",
    "ill_conditioned",
    "initial_noise",
    "make_problem",
    "makes_grid",
    "merged_nodes",
    "paired_against_diffusers",
    "pipeline_sampler",
    "plot",
    "run",
    "steps_for_nfe",
    "sweep_configs",
    "sweep_deterministic",
    "sweep_diffusers",
    "sweep_steerdiff",
    "switched",
]

log = logging.getLogger(__name__)

F64 = torch.float64
State = tuple[float, Tensor]  # (t, x): a sampler's state after a step
NFES = (3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)
QUICK_NFES = (5, 10)
DEFAULT_VS_DIFFUSERS_NFES = (10, 20)  # (a): sd.sample's defaults vs diffusers' default DPM-Solver++
DRAWS = 16  # (a) and (b) pooled over this many independent x_T draws (seeds seed, seed + 1, ...)
# (a): the NFE ladder on which sd.sample looks for 1/5 of diffusers' pooled error
FIFTH_NFES = (10, 12, 15, 20, 25, 30, 40, 50, 60, 80)
BEST_VS_DIFFUSERS_NFES = (5, 10, 20)  # (b): best of ours vs best of diffusers
# (d): classifier-free guidance toward CFG_COMPONENTS of the mixture, on the first CFG_BATCH samples
CFG_SCALES, CFG_STEPS, CFG_COMPONENTS, CFG_BATCH = (2.0, 4.0, 7.5), (5, 10, 20), 2, 256
CFG_REFERENCE_STEPS = 800  # the guided ODE's solution: DPM-Solver++(2M), checked against UniPC-3
QUICK_CFG_SCALES, QUICK_CFG_STEPS = CFG_SCALES[-1:], (10,)  # --quick: the hardest scale, 10 steps
LIFT_STEPS = 100  # (f): Heun steps that carry diffusers' flow start (s = 1) to t_max = 0.999
# (e): the mixture under rectified flow, pooled over FLOW_DRAWS draws of x_T
FLOW_STEPS, FLOW_DRAWS, FLOW_SHIFTS = (10, 20), 4, (1.0, 3.0)
ILL_EPS, ILL_DIRECTIONS = 1e-2, 16  # (a): the perturbation that marks an x_T as ill-conditioned


def default_model() -> tuple[GaussianMixture, Process]:
    """The embedded default model: :func:`default_benchmark_mixture` under ``VP.scaled_linear()``."""
    return default_benchmark_mixture(), VP.scaled_linear()


def initial_noise(batch: int, dim: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    """``randn(batch, dim)`` from :func:`generator_for` ``(seed, "x_T")``, drawn in float64: not from
    ``torch.Generator().manual_seed(seed)``, the stream :func:`~steerdiff.toy.default_benchmark_mixture`
    draws its means from (with it, seed 0's ``x_T[:10]`` were the default model's component means)."""
    return torch.randn(batch, dim, generator=generator_for(seed, "x_T"), dtype=F64).to(dtype)


def generator_for(seed: int, *key: str | int | float) -> torch.Generator:
    """A CPU generator for the draw that ``key`` names (a case, a purpose) in the run of ``seed``: seeded
    by SHA-256 of ``repr((seed, *key))``, so that different keys draw unrelated streams (``seed + k``
    offsets made one draw's stream another's) and a key the same stream in every process (Python's
    ``hash`` of a ``str`` is salted). 32 bits: the CPU generator (mt19937) keeps no more of a seed."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


def steps_for_nfe(nfe_of: Callable[[int], int], nfe: int) -> int | None:
    """The smallest step count ``N`` with ``nfe_of(N) == nfe``, or ``None`` if there is none."""
    return next((n for n in range(1, nfe + 1) if nfe_of(n) == nfe), None)


@dataclass
class Problem:
    """The benchmark's model, initial noise and exact reference sample."""

    gmm: GaussianMixture
    process: Process
    x_T: Tensor
    ref: Tensor


def make_problem(batch: int = 1024, seed: int = 0) -> Problem:
    """Build the default model, ``x_T`` (:func:`initial_noise`) and the exact reference sample."""
    gmm, proc = default_model()
    x_T = initial_noise(batch, gmm.dim, seed)
    t0 = time.perf_counter()
    ref = gmm.reference_ode(x_T, proc, proc.t_max, proc.t_min, denoise=True)
    log.info("reference ODE for batch %d: %.1f s", batch, time.perf_counter() - t0)
    return Problem(gmm, proc, x_T, ref)


def merged_nodes(process: Process, schedule: str, steps: int, m: int, p: int) -> list[float]:
    """The noisy nodes of ``schedule`` at ``steps + m - 1`` steps (``final="zero"``) with the ``m`` intervals
    from node ``p`` merged into one: with ``final="zero"`` a grid of ``steps`` steps whose step ``p - 1``
    is long (the step-ratio rule's grids, ``bench/longstep_rule.py``)."""
    fine = make_grid(process, schedules.get(schedule), steps + m - 1, "zero").t[:-1]
    return fine[:p] + fine[p + m - 1 :]


@dataclass
class Row:
    """One solver configuration's relative RMSE at each NFE it reaches (``nan``: the run failed)."""

    source: str
    method: str
    schedule: str
    errors: dict[int, float] = field(default_factory=dict)
    same_as: str | None = None  # the schedule whose identical grid gave these numbers

    def score(self) -> tuple[int, float]:
        """Sort key, smaller is better: (failed runs, mean log error over the NFE values reached)."""
        vals = list(self.errors.values())
        logs = [math.log(max(v, 1e-300)) for v in vals if math.isfinite(v)]
        failed = len(vals) - len(logs)
        return failed, (sum(logs) / len(logs) if logs else math.inf)

    @property
    def label(self) -> str:
        """``method (schedule)``."""
        return f"{self.method} ({self.schedule})"


def best_per_method(rows: Iterable[Row]) -> list[Row]:
    """The best-scoring row (:meth:`Row.score`) of each method, in order of first appearance
    (rows that repeat another schedule's grid, ``same_as``, are not candidates)."""
    best: dict[str, Row] = {}
    for row in rows:
        if row.same_as is not None:
            continue
        if row.method not in best or row.score() < best[row.method].score():
            best[row.method] = row
    return list(best.values())


def best_at(rows: Iterable[Row], nfe: int) -> Row | None:
    """The row with the smallest finite error at ``nfe`` (``None`` if no row has one)."""
    ok = [r for r in rows if math.isfinite(r.errors.get(nfe, math.nan))]
    return min(ok, key=lambda r: r.errors[nfe], default=None)


def best_lines(
    ours: Sequence[Row],
    theirs: Sequence[Row],
    nfes: Sequence[int],
    width: int,
    unit: float = 1.0,
    suffix: str = "",
) -> list[str]:
    """At each NFE of ``nfes`` (printed ``width`` wide) the best row of each side (:func:`best_at`), its
    error over ``unit`` (printed ``.2f`` with ``suffix``, e.g. ``"x"`` for multiples of a floor; ``.2e``
    with none) and the ratio of the two errors: the comparison lines of bench sde and invert."""
    value = (lambda e: f"{e / unit:.2f}{suffix}") if suffix else (lambda e: f"{e:.2e}")
    lines = []
    for nfe in nfes:
        a, b = best_at(ours, nfe), best_at(theirs, nfe)
        parts = [f"{r.label} {value(r.errors[nfe])}" for r in (a, b) if r is not None]
        ratio = f"  ratio {a.errors[nfe] / b.errors[nfe]:.3g}" if a is not None and b is not None else ""
        lines.append(f"    NFE {nfe:>{width}}: " + " vs ".join(parts) + ratio)
    return lines


def diffusers_wanted(with_diffusers: bool, running: str) -> bool:
    """``with_diffusers`` where diffusers is installed; else ``False``, with a warning that the bench runs
    ``running`` only."""
    if not with_diffusers:
        return False
    try:
        import diffusers  # noqa: F401
    except ImportError:
        log.warning("diffusers is not installed: running %s only", running)
        return False
    return True


# schedules whose nodes agree to this (relative) at every step count are one grid in the sweeps
ALIAS_RTOL = 1e-12


def _schedule_aliases(process: Process, names: Sequence[str], steps: Iterable[int]) -> dict[str, str]:
    """Map each schedule name to the first name whose nodes are the same at every step count, to
    ``ALIAS_RTOL`` (``polyexponential`` at its default ``rho = 1`` is ``exponential``'s nodes to rounding)."""

    def nodes(name: str, n: int) -> Tensor | None:
        try:
            return schedules.get(name)(process, n)
        except ValueError:
            return None

    def same(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> bool:
        return all(
            (x is None and y is None)
            or (
                x is not None and y is not None and x.shape == y.shape and torch.allclose(x, y, ALIAS_RTOL, 0)
            )
            for x, y in zip(a, b, strict=True)
        )

    steps = list(steps)
    first: list[tuple[list[Tensor | None], str]] = []
    alias: dict[str, str] = {}
    for name in names:
        key = [nodes(name, n) for n in steps]
        if all(k is None for k in key):
            alias[name] = name
            continue
        alias[name] = next((other for grid, other in first if same(grid, key)), name)
        if alias[name] == name:
            first.append((key, name))
    return alias


def _ours(
    den: Denoiser,
    problem: Problem,
    solver: str | Solver,
    schedule: schedules.ScheduleLike,
    steps: int,
    nfe: int,
) -> float:
    try:
        x, info = sampling.sample(
            den, problem.x_T, steps=steps, solver=solver, schedule=schedule, return_info=True
        )
    except (ValueError, FloatingPointError) as err:
        log.warning("%s/%s at %d steps failed: %s", solver, schedule, steps, err)
        return math.nan
    if info.nfe != nfe:
        log.warning("%s: nfe(%d) = %d but the run made %d network calls", solver, steps, nfe, info.nfe)
        return math.nan
    return relative_rmse(x, problem.ref)


def sweep_steerdiff(problem: Problem, nfes: Sequence[int], progress: bool = False) -> list[Row]:
    """Every deterministic solver x every schedule at every reachable NFE in ``nfes``."""
    den = problem.gmm.denoiser(problem.process)
    return sweep_deterministic(
        lambda name, sched, n, nfe: _ours(den, problem, name, sched, n, nfe), problem.process, nfes, progress
    )


def sweep_deterministic(
    score: Callable[[str, str, int, int], float],
    process: Process,
    nfes: Sequence[int],
    progress: bool = False,
    clean_end: bool = True,
) -> list[Row]:
    """``score(solver, schedule, steps, nfe)`` of every deterministic solver x every schedule (the default
    first) at every NFE of ``nfes`` it reaches: the fewest steps ``N`` with ``solver.nfe(N, clean_end) ==
    nfe`` (``clean_end=False``: grids without the final jump to ``sigma = 0``, as inversion's), where the
    schedule makes a grid of ``N`` steps (:func:`makes_grid`). A schedule whose nodes are an earlier one's at
    every step count repeats its numbers (``Row.same_as``)."""
    names = sorted(schedules.available(), key=lambda name: name != sampling.DEFAULT_SCHEDULE)
    alias = _schedule_aliases(process, names, range(1, max(nfes) + 1))
    rows: list[Row] = []
    for name in tqdm(solvers.available(), desc="steerdiff", disable=not progress):
        solver = solvers.get(name)
        if solver.stochastic:
            log.info("skipping %s: stochastic (the reference is the ODE solution)", name)
            continue
        nfe_of = partial(solver.nfe, clean_end=clean_end)
        steps = {nfe: steps_for_nfe(nfe_of, nfe) for nfe in nfes}
        done: dict[str, Row] = {}
        for sched in names:
            row = Row("steerdiff", name, sched)
            if alias[sched] in done:
                row.errors, row.same_as = dict(done[alias[sched]].errors), alias[sched]
            else:
                row.errors = {
                    nfe: score(name, sched, n, nfe)
                    for nfe, n in steps.items()
                    if n is not None and makes_grid(process, sched, n, clean_end)
                }
                done[sched] = row
            rows.append(row)
    return rows


Overrides = tuple[tuple[str, Any], ...]


def makes_grid(process: Process, schedule: str, steps: int, clean_end: bool = True) -> bool:
    """Whether the schedule named ``schedule`` makes ``process`` a grid of ``steps`` steps (``clean_end``:
    ending at ``sigma = 0``, else at its last node, ``steps + 1`` nodes). ``lcm`` has no more nodes than its
    distillation timesteps (50: 49 steps without the clean end): a count it refuses is not reached, as an
    NFE no step count gives, where scoring it would report a failed run."""
    try:
        make_grid(process, schedules.get(schedule), steps, "zero" if clean_end else "none")
    except ValueError as err:
        log.info("schedule %s makes no grid of %d steps: %s", schedule, steps, err)
        return False
    return True


@dataclass(frozen=True)
class DiffusersConfig:
    """A diffusers scheduler class and config overrides on top of :func:`sd_betas_config`."""

    method: str
    cls: str
    overrides: Overrides = ()

    def make(self) -> Any:
        """A fresh scheduler (imports diffusers)."""
        import diffusers

        return getattr(diffusers, self.cls)(**sd_betas_config(**dict(self.overrides)))

    def schedule(self) -> str:
        """The timestep/sigma spacing the scheduler uses: ``karras``, ``exponential``, ``beta``,
        ``lu_lambdas`` or its spacing."""
        cfg = self.make().config
        if cfg.get("use_karras_sigmas"):
            return "karras"
        if cfg.get("use_exponential_sigmas"):
            return "exponential"
        if cfg.get("use_beta_sigmas"):
            return "beta"
        if cfg.get("use_lu_lambdas"):
            return "lu_lambdas"
        return str(cfg.get("timestep_spacing", "linspace"))  # DPMSolverSinglestep: always linspace


DIFFUSERS_DEFAULT = DiffusersConfig("DPMSolverMultistep(order=2)", "DPMSolverMultistepScheduler")


def diffusers_configs() -> list[DiffusersConfig]:
    """The diffusers configurations compared against, each its own row (SD betas throughout).

    DDIM (its default ``leading`` spacing; also ``trailing``); PNDM with and without its Runge-Kutta
    warm-up (``skip_prk_steps``, default ``leading`` spacing); DPMSolverMultistep of order 2 and 3 with the
    ``linspace``/``leading``/``trailing`` spacings, Karras and exponential sigmas and Lu lambdas; Euler,
    Heun, DPMSolverSinglestep of order 2 and 3, UniPC ``bh1``/``bh2`` (``bh2`` also of order 3, the
    algorithm of ``sd.sample``'s default), DEIS (order 3) and KDPM2, each with its default spacing and with
    Karras and exponential sigmas (the sigma spacings of our ``karras`` and ``exponential``); UniPC
    ``bh1`` also with ``final_sigmas_type="sigma_min"``, as with diffusers' default final sigma 0 it
    returns NaN.
    """
    karras: Overrides = (("use_karras_sigmas", True),)
    sigmas: tuple[Overrides, ...] = ((), karras, (("use_exponential_sigmas", True),))
    spacings: tuple[Overrides, ...] = (
        (),
        (("timestep_spacing", "leading"),),
        (("timestep_spacing", "trailing"),),
        *sigmas[1:],
        (("use_lu_lambdas", True),),
    )
    multistep = [
        DiffusersConfig(
            f"DPMSolverMultistep(order={k})", "DPMSolverMultistepScheduler", (("solver_order", k), *s)
        )
        for k in (2, 3)
        for s in spacings
    ]
    others = [
        DiffusersConfig("EulerDiscrete", "EulerDiscreteScheduler"),
        DiffusersConfig("HeunDiscrete", "HeunDiscreteScheduler"),
        DiffusersConfig(
            "DPMSolverSinglestep(order=2)", "DPMSolverSinglestepScheduler", (("solver_order", 2),)
        ),
        DiffusersConfig(
            "DPMSolverSinglestep(order=3)", "DPMSolverSinglestepScheduler", (("solver_order", 3),)
        ),
        DiffusersConfig("UniPCMultistep(bh1)", "UniPCMultistepScheduler", (("solver_type", "bh1"),)),
        DiffusersConfig(
            "UniPCMultistep(bh1, final sigma_min)",
            "UniPCMultistepScheduler",
            (("solver_type", "bh1"), ("final_sigmas_type", "sigma_min")),
        ),
        DiffusersConfig("UniPCMultistep(bh2)", "UniPCMultistepScheduler", (("solver_type", "bh2"),)),
        DiffusersConfig(
            "UniPCMultistep(bh2, order=3)",
            "UniPCMultistepScheduler",
            (("solver_type", "bh2"), ("solver_order", 3)),
        ),
        DiffusersConfig("DEISMultistep(order=3)", "DEISMultistepScheduler", (("solver_order", 3),)),
        DiffusersConfig("KDPM2Discrete", "KDPM2DiscreteScheduler"),
    ]
    return [
        # DDIM clips x0 to [-1, 1] by default (an image-range assumption): off, as for the others
        *(
            DiffusersConfig("DDIM", "DDIMScheduler", (("clip_sample", False), ("timestep_spacing", sp)))
            for sp in ("leading", "trailing")
        ),
        # PNDM (Runge-Kutta warm-up, its default) and PLMS (skip_prk_steps: Stable Diffusion 1.x's config)
        DiffusersConfig("PNDM", "PNDMScheduler"),
        DiffusersConfig("PNDM(skip_prk_steps)", "PNDMScheduler", (("skip_prk_steps", True),)),
        *multistep,
        *(DiffusersConfig(c.method, c.cls, c.overrides + s) for c in others for s in sigmas),
    ]


def diffusers_nfe(config: DiffusersConfig) -> Callable[[int], int]:
    """A configuration's network calls for a step count; ``sys.maxsize``, which no NFE budget reaches, where
    its ``set_timesteps`` refuses the count (PNDM's Runge-Kutta warm-up below 4 steps)."""
    sched = config.make()

    def nfe(steps: int) -> int:
        try:
            sched.set_timesteps(steps)
        except ValueError:
            return sys.maxsize
        return len(sched.timesteps)

    return nfe


def _theirs_sample(
    config: DiffusersConfig, problem: Problem, steps: int, nfe: int, states: list[State] | None = None
) -> Tensor | None:
    """diffusers' sample (``None`` if the run fails); ``states`` (for schedulers that evaluate each
    timestep once) receives ``(t, x)`` after every step but the last, ``t`` the next timestep."""
    sched = config.make()

    def record(i: int, x: Tensor) -> None:
        if states is not None and i + 1 < len(sched.timesteps):
            states.append((float(sched.timesteps[i + 1]), x))

    try:
        x, used = diffusers_sample(sched, problem.gmm, problem.process, problem.x_T, steps, callback=record)
    except Exception as err:  # a failing reference run is reported in the table, not fatal
        log.warning("diffusers %s at %d steps failed: %r", config.method, steps, err)
        return None
    if used != nfe:
        log.warning("diffusers %s: %d steps made %d network calls, not %d", config.method, steps, used, nfe)
        return None
    return x


def _theirs(config: DiffusersConfig, problem: Problem, steps: int, nfe: int) -> float:
    x = _theirs_sample(config, problem, steps, nfe)
    return math.nan if x is None else relative_rmse(x, problem.ref)


def sweep_configs(
    configs: Sequence[DiffusersConfig],
    nfes: Sequence[int],
    score: Callable[[DiffusersConfig, int, int], float],
    fit: Callable[[Callable[[int], int], int], int | None] = steps_for_nfe,
    progress: bool = False,
) -> list[Row]:
    """``score(config, steps, nfe)`` of every diffusers configuration of ``configs`` at every NFE of ``nfes``
    it reaches: ``steps = fit(nfe_of, nfe)`` (:func:`steps_for_nfe`: the fewest steps making exactly that
    NFE; :func:`steerdiff.bench.sde.steps_within`: the most that fit it), ``None`` for none. diffusers'
    config warnings are silenced; non-finite scores (failed runs) are logged per row. The loop of bench
    solvers, sde and invert."""
    rows: list[Row] = []
    with quiet_diffusers():
        for config in tqdm(configs, desc="diffusers", disable=not progress):
            nfe_of = diffusers_nfe(config)
            row = Row("diffusers", config.method, config.schedule())
            for nfe in nfes:
                steps = fit(nfe_of, nfe)
                if steps is not None:
                    row.errors[nfe] = score(config, steps, nfe)
            bad = [nfe for nfe, e in row.errors.items() if not math.isfinite(e)]
            if bad:
                log.warning("diffusers %s failed or returned non-finite samples at NFE %s", row.label, bad)
            rows.append(row)
    return rows


def sweep_diffusers(problem: Problem, nfes: Sequence[int], progress: bool = False) -> list[Row]:
    """Every configuration of :func:`diffusers_configs` at every reachable NFE in ``nfes``."""
    return sweep_configs(
        diffusers_configs(), nfes, lambda config, n, nfe: _theirs(config, problem, n, nfe), progress=progress
    )


def switched(problem: Problem, x: Tensor) -> Tensor:
    """``(batch,)`` bool: the samples of ``x`` whose most probable mixture component differs from the
    exact solution's -- the trajectories a solver sent to another mode."""
    comp = problem.gmm.log_responsibilities
    return comp(x).argmax(-1) != comp(problem.ref).argmax(-1)


def ill_conditioned(
    problem: Problem, eps: float = ILL_EPS, directions: int = ILL_DIRECTIONS, seed: int = 0
) -> Tensor:
    """``(batch,)`` bool: the samples whose exact answer changes mixture component when ``x_T`` moves
    by ``eps * ||x_T||`` along one of ``directions`` random directions (exact ODE solutions).

    Independent of any solver: these ``x_T`` lie within ``eps`` of the boundary between the basins of
    two components, so a sampler whose error at the decision noise level is ``eps`` may switch them.
    The directions come from :func:`generator_for` ``(seed, "ill_conditioned")``: from
    ``torch.Generator().manual_seed(0)`` sample 0's first 10 directions were the default model's
    component means, and it was flagged only by its move toward component 8's mean.
    """
    g = generator_for(seed, "ill_conditioned")
    x_T = problem.x_T.repeat_interleave(directions, 0)
    d = torch.randn(x_T.shape, generator=g, dtype=x_T.dtype)
    d = d * (eps * x_T.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)).view(-1, *[1] * (d.ndim - 1))
    p = problem.process
    moved = problem.gmm.reference_ode(x_T + d, p, p.t_max, p.t_min, denoise=True)
    ref = problem.ref.repeat_interleave(directions, 0)
    return switched(Problem(problem.gmm, p, x_T, ref), moved).view(-1, directions).any(-1)


def decided_at(problem: Problem, states: Sequence[State], x: Tensor) -> list[int]:
    """For each sample of ``x`` that :func:`switched` (in batch order), the step whose error sent it
    to another mixture component: the first ``k`` such that the exact ODE started from the solver's
    state after step ``k``, and from its state after every later step, ends in the component ``x``
    ends in (``states[k - 1] = (t_k, x_k)``: the noisy states after steps ``1 .. len(states)``;
    ``len(states) + 1``: only the last step did). Only the switched rows are integrated.
    """
    rows = switched(problem, x).nonzero().flatten()
    if len(rows) == 0:
        return []
    comp = problem.gmm.log_responsibilities
    wrong = comp(x[rows]).argmax(-1)
    decided = torch.full((len(rows),), len(states) + 1)
    still = torch.ones(len(rows), dtype=torch.bool)
    p = problem.process
    for k in range(len(states), 0, -1):
        t, xs = states[k - 1]
        still &= comp(problem.gmm.reference_ode(xs[rows], p, t, p.t_min, denoise=True)).argmax(-1) == wrong
        if not still.any():
            break
        decided[still] = k
    return decided.tolist()


@dataclass(frozen=True)
class Draws:
    """``(ours, theirs)`` squared errors summed over each independent draw of ``x_T``, the
    benchmark's draw first.

    At few steps the error is dominated by the few samples a sampler sends to another mixture
    component (:func:`switched`, a Poisson count of a handful per 1024), so one draw's ratio is
    noisy: the pooled ratio is the estimate, the per-draw ratios its spread.
    """

    sums: tuple[tuple[float, float], ...]

    @property
    def ratios(self) -> list[float]:
        """The ratio of relative RMSEs on each draw."""
        return [math.sqrt(a / b) for a, b in self.sums]

    @property
    def pooled(self) -> float:
        """The ratio over all draws together: ``sqrt(sum ||x - ref||^2 / sum ||y - ref||^2)``."""
        return math.sqrt(sum(a for a, _ in self.sums) / sum(b for _, b in self.sums))

    def describe(self, batch: int) -> str:
        """``over N draws of B: pooled ratio P, per draw LO to HI``."""
        r = self.ratios
        spread = f"per draw {min(r):.3g} to {max(r):.3g}"
        return f"over {len(r)} draws of {batch}: pooled ratio {self.pooled:.3g}, {spread}"


def _squared(problem: Problem, rel: float) -> float:
    """``||x - ref||^2`` summed over ``problem``'s batch, from the relative RMSE ``rel``."""
    return rel**2 * float((problem.ref**2).sum())


# paired_against_diffusers: diffusers' best configuration (method, schedule) at each NFE of the (b) block of
# docs/bench/solvers.txt, against which a grid or solver fitted to the model is scored
# the draw of x_T (generator_for's seed) a grid or solver is fitted on for paired_against_diffusers: outside
# the scored draws 0 .. DRAWS - 1
PAIRED_FIT_SEED = 100
DIFFUSERS_BEST = {
    5: ("UniPCMultistep(bh1, final sigma_min)", "linspace"),
    10: ("UniPCMultistep(bh2, order=3)", "karras"),
    20: ("UniPCMultistep(bh2, order=3)", "karras"),
}


def paired_against_diffusers(
    problem: Problem,
    entries: dict[str, tuple[str | Solver, schedules.ScheduleLike]],
    draws: int = DRAWS,
    progress: bool = True,
) -> list[str]:
    """Each ``(solver, schedule)`` of ``entries`` against :data:`DIFFUSERS_BEST` at each of its NFEs, on
    ``problem`` (the draw of seed 0) and on the draws of seeds ``1 .. draws - 1`` (:func:`make_problem`, with
    ``problem``'s process object: a grid or solver fitted to a process serves that process): lines of a table
    with the relative RMSE on seed 0, its ratio to diffusers' and the pooled ratio over all draws
    (:class:`Draws`) with the per-draw spread. For what is fitted to the model (``bench/gits.py``,
    ``bench/dpm_solver_v3.py``), fitted on draws outside these."""
    nfes = tuple(DIFFUSERS_BEST)
    with quiet_diffusers():
        configs = {(c.method, c.schedule()): c for c in diffusers_configs()}
        theirs = {n: configs[DIFFUSERS_BEST[n]] for n in nfes}
        steps_theirs = {n: steps_for_nfe(diffusers_nfe(c), n) for n, c in theirs.items()}
    made = {label: (solvers.get(solver), schedule) for label, (solver, schedule) in entries.items()}
    ours: dict[tuple[str, int], list[float]] = {(k, n): [] for k in made for n in nfes}
    base: dict[int, list[float]] = {n: [] for n in nfes}
    seed0: dict[tuple[str, int], float] = {}
    for seed in tqdm(range(draws), desc="draws", disable=not progress):
        d = problem if seed == 0 else replace(make_problem(len(problem.x_T), seed), process=problem.process)
        den = d.gmm.denoiser(d.process)
        for n in nfes:
            steps = steps_theirs[n]
            assert steps is not None, n
            with quiet_diffusers():
                e = _theirs(theirs[n], d, steps, n)
            base[n].append(_squared(d, e))
            seed0.setdefault(("diffusers", n), e)
            for label, (solver, schedule) in made.items():
                steps = steps_for_nfe(solver.nfe, n)
                assert steps is not None, (label, n)
                e = _ours(den, d, solver, schedule, steps, n)
                ours[label, n].append(_squared(d, e))
                seed0.setdefault((label, n), e)
    width = max(len(k) for k in made)
    lines = [f"{'NFE':>3} {'ours':<{width}} {'seed 0':>9} {'diffusers':>9}  ratio  pooled  per draw"]
    for n in nfes:
        for label in made:
            r = Draws(tuple(zip(ours[label, n], base[n], strict=True)))
            lines.append(
                f"{n:>3} {label:<{width}} {seed0[label, n]:9.3e} {seed0['diffusers', n]:9.3e}  "
                f"{r.ratios[0]:.3f}  {r.pooled:.3f}  {min(r.ratios):.3g} to {max(r.ratios):.3g}"
            )
        name, sched = DIFFUSERS_BEST[n]
        lines.append(f"    diffusers: {name} ({sched})")
    return lines


@dataclass(frozen=True)
class Decisions:
    """Where a sampler sent the samples it switched, pooled over the draws: for each, the step
    :func:`decided_at` finds, and ``sigma/alpha`` after steps ``1, 2, ...`` of the sampler's grid."""

    steps: tuple[int, ...]
    sigmas: tuple[float, ...]

    def at(self, k: int) -> int:
        """How many were sent away by step ``k``."""
        return self.steps.count(k)


@dataclass
class DefaultVsDiffusers:
    """(a) at one NFE: relative RMSE of ``sd.sample``'s defaults and of diffusers' default
    DPM-Solver++ on the benchmark's draw; the samples each sent to another mixture component than
    the exact solution (:func:`switched`), in all and among the :func:`ill_conditioned`; both errors
    over the well-conditioned samples; the errors on every further independent draw of ``x_T``;
    over all draws, the step that sent each switched sample away (:func:`decided_at`); and
    ``fifth``: ``(NFE, pooled ratio)`` of ``sd.sample`` at more steps against diffusers at ``nfe``
    (:func:`fifth_at`), up to the first at most 1/5."""

    nfe: int
    ours: float
    diffusers: float
    switches: tuple[int, int]
    switches_ill: tuple[int, int]
    well_conditioned: int
    rest: tuple[float, float]
    draws: Draws
    decided: tuple[Decisions, Decisions]
    fifth: tuple[tuple[int, float], ...]

    @property
    def ratio(self) -> float:
        """Ours over diffusers' on the benchmark's draw (the goal: at most 1/5)."""
        return self.ours / self.diffusers

    @property
    def rest_ratio(self) -> float:
        """The same ratio over the well-conditioned samples."""
        return self.rest[0] / self.rest[1]


Run = tuple[Tensor, list[State]]  # a sample and the sampler's noisy states after each step


def _defaults_pair(problem: Problem, n_ours: int, n_theirs: int, nfe: int) -> tuple[Run, Run] | None:
    """``sd.sample``'s and diffusers' default runs from ``problem.x_T`` at ``n_ours`` and
    ``n_theirs`` steps (both ``nfe`` network calls), or ``None`` if diffusers' run fails."""
    theirs: list[State] = []
    y = _theirs_sample(DIFFUSERS_DEFAULT, problem, n_theirs, nfe, theirs)
    if y is None:
        return None
    ours: list[State] = []

    def record(d: dict[str, Any]) -> None:
        if d["sigma"] > 0:
            ours.append((d["t"], d["x"]))

    x = sampling.sample(problem.gmm.denoiser(problem.process), problem.x_T, steps=n_ours, callback=record)
    return (x, ours), (y, theirs)


def _only_switched(problem: Problem, run: Run) -> tuple[Problem, Run]:
    """``problem`` and ``run`` cut to the samples the run :func:`switched`: all that
    :func:`decided_at` needs of a draw, kept instead of every draw's whole trajectories."""
    x, states = run
    sw = switched(problem, x)
    part = Problem(problem.gmm, problem.process, problem.x_T[sw], problem.ref[sw])
    return part, (x[sw], [(t, xs[sw]) for t, xs in states])


def _decisions(runs: Sequence[tuple[Problem, Run]]) -> Decisions:
    """:func:`decided_at` over ``runs`` (one sampler, one grid, each cut by :func:`_only_switched`)."""
    first = runs[0][0]
    both = Problem(
        first.gmm, first.process, torch.cat([d.x_T for d, _ in runs]), torch.cat([d.ref for d, _ in runs])
    )
    times = [t for t, _ in runs[0][1][1]]
    states = [(t, torch.cat([st[k][1] for _, (_, st) in runs])) for k, t in enumerate(times)]
    steps = decided_at(both, states, torch.cat([x for _, (x, _) in runs]))
    return Decisions(tuple(steps), tuple(float(first.process.sigma_ratio(t)) for t in times))


def fifth_at(
    draws: Sequence[Problem], theirs: float, nfe: int, ladder: Sequence[int] = FIFTH_NFES
) -> tuple[tuple[int, float], ...]:
    """``(NFE, pooled ratio)`` of ``sd.sample``'s defaults over ``draws`` against ``theirs``
    (diffusers' squared error at ``nfe``, summed over the same draws) at each NFE of ``ladder``
    above ``nfe``, up to the first whose ratio is at most 1/5: how many network calls the defaults
    need to meet (a)'s goal."""
    nfe_of = solvers.get(sampling.DEFAULT_SOLVER).nfe
    out: list[tuple[int, float]] = []
    for n in ladder:
        steps = steps_for_nfe(nfe_of, n)
        if n <= nfe or steps is None:
            continue
        ours = sum(
            _squared(d, relative_rmse(sampling.sample(d.gmm.denoiser(d.process), d.x_T, steps=steps), d.ref))
            for d in draws
        )
        out.append((n, math.sqrt(ours / theirs)))
        if out[-1][1] <= 0.2:
            break
    return tuple(out)


def default_vs_diffusers(
    problem: Problem, nfes: Sequence[int], draws: Sequence[Problem] = ()
) -> list[DefaultVsDiffusers]:
    """(a): ``sd.sample(den, x_T, steps)`` with its default solver and schedule against diffusers'
    ``DPMSolverMultistepScheduler`` with its default config (SD betas), at the step counts that
    cost each ``nfe``; on ``problem`` in detail, and pooled with the independent ``draws``.

    The error at few steps is dominated by the few samples a sampler sends to another mixture
    component (a Poisson count of a handful per 1024), so one draw's ratio is noisy: the pooled
    ratio is the estimate, the per-draw ratios its spread; :func:`decided_at` finds, on all
    draws, the step whose error sent each of them away, and :func:`fifth_at` the NFE at which
    ``sd.sample`` reaches 1/5 of diffusers' pooled error.
    """
    keep = ~ill_conditioned(problem)
    nfe_ours = solvers.get(sampling.DEFAULT_SOLVER).nfe
    out = []
    with quiet_diffusers():
        nfe_theirs = diffusers_nfe(DIFFUSERS_DEFAULT)
        for nfe in nfes:
            n_ours, n_theirs = steps_for_nfe(nfe_ours, nfe), steps_for_nfe(nfe_theirs, nfe)
            if n_ours is None or n_theirs is None:
                continue
            first = _defaults_pair(problem, n_ours, n_theirs, nfe)
            if first is None:
                continue
            (x, _), (y, _) = first
            used, sums, cut = [], [], []
            for d in (problem, *draws):
                pair = first if d is problem else _defaults_pair(d, n_ours, n_theirs, nfe)
                if pair is None:
                    continue
                used.append(d)
                (a, _), (b, _) = pair
                sums.append((_squared(d, relative_rmse(a, d.ref)), _squared(d, relative_rmse(b, d.ref))))
                cut.append(tuple(_only_switched(d, run) for run in pair))
            ours, theirs = relative_rmse(x, problem.ref), relative_rmse(y, problem.ref)
            sx, sy = switched(problem, x), switched(problem, y)
            out.append(
                DefaultVsDiffusers(
                    nfe,
                    ours,
                    theirs,
                    (int(sx.sum()), int(sy.sum())),
                    (int((sx & ~keep).sum()), int((sy & ~keep).sum())),
                    int(keep.sum()),
                    (relative_rmse(x[keep], problem.ref[keep]), relative_rmse(y[keep], problem.ref[keep])),
                    Draws(tuple(sums)),
                    (_decisions([c[0] for c in cut]), _decisions([c[1] for c in cut])),
                    fifth_at(used, sum(b for _, b in sums), nfe),
                )
            )
    return out


@dataclass
class BestVsBest:
    """(b) at one NFE: the best steerdiff row and the best diffusers row on the benchmark's draw
    (:func:`best_at`), and both configurations run again on every further draw of ``x_T``."""

    nfe: int
    ours: Row
    theirs: Row
    draws: Draws

    @property
    def ratio(self) -> float:
        """Ours over diffusers' on the benchmark's draw (the goal: at most 1/3)."""
        return self.ours.errors[self.nfe] / self.theirs.errors[self.nfe]


def best_vs_best(
    problem: Problem, rows: Sequence[Row], nfes: Sequence[int], draws: Sequence[Problem] = ()
) -> list[BestVsBest]:
    """(b): the best steerdiff configuration against the best diffusers configuration at each NFE
    (chosen on ``problem``), pooled with the independent ``draws``."""
    ours = [r for r in rows if r.source == "steerdiff"]
    theirs = [r for r in rows if r.source == "diffusers"]
    out = []
    with quiet_diffusers():
        configs = {(c.method, c.schedule()): c for c in diffusers_configs()}
        for nfe in nfes:
            a, b = best_at(ours, nfe), best_at(theirs, nfe)
            if a is None or b is None:
                continue
            config = configs[b.method, b.schedule]
            steps_a = steps_for_nfe(solvers.get(a.method).nfe, nfe)
            steps_b = steps_for_nfe(diffusers_nfe(config), nfe)
            if steps_a is None or steps_b is None:  # not reached: both rows have an error at nfe
                continue
            sums = [(_squared(problem, a.errors[nfe]), _squared(problem, b.errors[nfe]))]
            for d in draws:
                ea = _ours(d.gmm.denoiser(d.process), d, a.method, a.schedule, steps_a, nfe)
                sums.append((_squared(d, ea), _squared(d, _theirs(config, d, steps_b, nfe))))
            out.append(BestVsBest(nfe, a, b, Draws(tuple(sums))))
    return out


@dataclass(frozen=True)
class GuidedRow:
    """(d) at one guidance scale and step count: relative RMSE of each sampler against the guided
    ODE's solution (``None``: diffusers not run)."""

    scale: float
    steps: int
    default: float
    unipc: float
    ddim: float
    diffusers: float | None


@dataclass(frozen=True)
class GuidedBench:
    """(d): ``rows``, the guided default ``solver`` (a description: it depends on the step count),
    the diffusers sampler beside it (``theirs``), the samples, the reference's step count, and per
    scale the distance between the two reference solutions."""

    solver: str
    theirs: str
    batch: int
    reference_steps: int
    reference_gap: tuple[float, ...]
    rows: tuple[GuidedRow, ...]


def cfg_denoiser(gmm: GaussianMixture, process: Process, scale: float) -> CFG:
    """Classifier-free guidance at ``scale`` with the exact denoisers (under ``process``) of the
    mixture's first :data:`CFG_COMPONENTS` components (conditional, weights renormalized) and of the
    whole mixture (unconditional)."""
    k = CFG_COMPONENTS
    cond = GaussianMixture(gmm.means[:k], gmm.variances[:k], gmm.weights[:k] / gmm.weights[:k].sum())
    return CFG(cond.denoiser(process), gmm.denoiser(process), scale)


@dataclass(frozen=True)
class Theirs:
    """A diffusers sampler of guided denoisers from a fixed ``x_T``: its ``label``, ``run(den, steps)
    -> samples``, and, for one that starts above ``t_max`` (flow matching: ``s = 1``), ``lift(den)``:
    its ``x_T`` carried by the guided flow to ``t_max``, where its reference then starts."""

    label: str
    run: Callable[[Denoiser, int], Tensor]
    lift: Callable[[Denoiser], Tensor] | None = None


def pipeline_sampler(name: str, scheduler: Callable[[], Any], x_T: Tensor, **cond: Any) -> Theirs:
    """``name``: the diffusers scheduler ``scheduler()`` in a pipeline's loop (:func:`run_scheduler`)
    from ``x_T``, around the guided denoiser's noise estimate (``eps_u + w (eps_c - eps_u)`` for CFG);
    ``cond`` goes to the net."""

    def run(den: Denoiser, n: int) -> Tensor:
        def eps(x: Tensor, t: Tensor) -> Tensor:
            return den(x, float(t), **cond).eps

        return run_scheduler(scheduler(), eps, x_T, n)[0]

    return Theirs(name, run)


def guided_reference(
    den: Denoiser,
    x_T: Tensor,
    steps: int = CFG_REFERENCE_STEPS,
    check_schedule: str = "time_uniform",
    **cond: Any,
) -> tuple[Tensor, float]:
    """The guided probability-flow ODE's solution from ``x_T`` (at ``t_max``) for the guided ``den``:
    ``steps`` DPM-Solver++(2M) steps on the log-SNR-uniform grid (no closed form exists for a guided
    denoiser), and its relative RMSE against UniPC-3's solution on the ``check_schedule`` grid of as
    many steps (the check of the reference; ``cond`` goes to the net). Under EDM the time-uniform grid
    ends with a step of about 4 in log-SNR, which UniPC takes at first order: the check then measures
    that step's error rather than the reference's; ``karras`` does not."""
    ref = sampling.sample(den, x_T, steps, "dpmpp_2m", "logsnr_uniform", **cond)
    return ref, relative_rmse(sampling.sample(den, x_T, steps, "unipc", check_schedule, **cond), ref)


def guided_errors(
    make: Callable[[float], Denoiser],
    x_T: Tensor,
    scales: Sequence[float],
    steps: Sequence[int],
    theirs: Theirs | None,
    reference_steps: int = CFG_REFERENCE_STEPS,
    **cond: Any,
) -> GuidedBench:
    """(d)'s table for the guided denoisers ``make(scale)`` from ``x_T`` (``cond`` goes to the net):
    ``sd.sample``'s default for a guided denoiser, UniPC-3 (the unguided default), DDIM (all on the
    default schedule) and a diffusers sampler (``None``: not run), each against the guided
    probability-flow ODE from its own start solved by ``reference_steps`` DPM-Solver++(2M) steps on
    the log-SNR-uniform grid; ``reference_gap``: that solution against UniPC-3's on the time-uniform
    grid of as many steps (:func:`guided_reference`)."""
    guided = (
        f"dpmpp_2m, long steps first order; UniPC-2 on short steps and from {sampling.GUIDED_CORRECTOR_FROM}"
    )
    gaps, rows = [], []
    with quiet_diffusers():
        for w in scales:
            den = make(w)
            ref, gap = guided_reference(den, x_T, reference_steps, **cond)

            def error(n: int, solver: str | Solver | None, den: Denoiser = den, ref: Tensor = ref) -> float:
                return relative_rmse(sampling.sample(den, x_T, n, solver, DEFAULT_SCHEDULE, **cond), ref)

            gaps.append(gap)
            ref_theirs = ref
            if theirs is not None and theirs.lift is not None:
                lifted = theirs.lift(den)
                ref_theirs = sampling.sample(
                    den, lifted, reference_steps, "dpmpp_2m", "logsnr_uniform", **cond
                )
            for n in steps:
                diff = None if theirs is None else relative_rmse(theirs.run(den, n), ref_theirs)
                default = error(n, None)  # sd.sample's default (on the run's grid)
                rows.append(GuidedRow(w, n, default, error(n, "unipc"), error(n, "ddim"), diff))
    label = "-" if theirs is None else theirs.label
    return GuidedBench(guided, label, len(x_T), reference_steps, tuple(gaps), tuple(rows))


def guided_vs_diffusers(
    problem: Problem,
    scales: Sequence[float] = CFG_SCALES,
    steps: Sequence[int] = CFG_STEPS,
    batch: int = CFG_BATCH,
    with_diffusers: bool = True,
    flow: bool = False,
) -> GuidedBench:
    """(d): :func:`guided_errors` for :func:`cfg_denoiser` from the first ``batch`` samples of
    ``problem.x_T``, against diffusers' default ``DPMSolverMultistepScheduler`` (SD betas); with
    ``flow``, (f): the mixture under :class:`~steerdiff.processes.RectifiedFlow`, against
    :func:`flow_euler_sampler`."""
    x_T = problem.x_T[:batch]
    process = RectifiedFlow() if flow else problem.process
    if flow:
        theirs = flow_euler_sampler(x_T)
    else:
        theirs = pipeline_sampler("diffusers DPMSolverMultistep", DIFFUSERS_DEFAULT.make, x_T)
    return guided_errors(
        lambda w: cfg_denoiser(problem.gmm, process, w),
        x_T,
        scales,
        steps,
        theirs if with_diffusers else None,
    )


def flow_euler_sampler(x_T: Tensor, shift: float = FLOW_SHIFTS[-1]) -> Theirs:
    """:func:`flow_match_euler` (Stable Diffusion 3's shift 3 by default) with a guided denoiser's
    ``x0``. It starts at ``s = 1``, :func:`steerdiff.sample` at ``t_max = 0.999``; its reference
    starts from its ``x_T`` carried to ``t_max`` by :data:`LIFT_STEPS` Heun steps of the guided flow
    (the guided ODE is ill-conditioned: on (f)'s problem that move of 0.16-0.45% of x_T's norm changes
    the answer by up to 10% at scales 4-7.5)."""
    t_max = RectifiedFlow().t_max

    def euler(den: Denoiser, n: int) -> Tensor:
        return flow_match_euler(lambda x, s: den(x, s).x0, x_T, n, shift=shift)

    def lift(den: Denoiser) -> Tensor:
        return heun_in_s(lambda x, s: den(x, s).x0, x_T, 1.0, t_max, LIFT_STEPS)

    return Theirs(f"diffusers FlowMatchEuler (shift {shift:g})", euler, lift)


def heun_in_s(
    x0: Callable[[Tensor, float], Tensor], x: Tensor, s_from: float, s_to: float, steps: int
) -> Tensor:
    """Heun's method for the flow ``dx/ds = (x - x0(x, s)) / s`` from ``s_from`` to ``s_to``."""
    ds = (s_to - s_from) / steps
    for k in range(steps):
        s = s_from + k * ds
        v = (x - x0(x, s)) / s
        y = x + ds * v
        x = x + 0.5 * ds * (v + (y - x0(y, s + ds)) / (s + ds))
    return x


@dataclass(frozen=True)
class FlowRow:
    """(e) at one step count (= NFE): relative RMSE of ``sd.sample``'s defaults and of diffusers'
    ``FlowMatchEulerDiscreteScheduler`` at each shift of :data:`FLOW_SHIFTS` (empty: diffusers not
    run), pooled over ``draws``."""

    steps: int
    draws: int
    ours: float
    diffusers: tuple[float, ...]

    @property
    def ratios(self) -> tuple[float, ...]:
        """Ours over diffusers' at each shift."""
        return tuple(self.ours / d for d in self.diffusers)


def flow_match_euler(
    x0: Callable[[Tensor, float], Tensor], x_T: Tensor, steps: int, shift: float = 1.0
) -> Tensor:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` (Euler; ``shift = 1`` is its
    default config, 3 that of Stable Diffusion 3) driven as a flow-matching pipeline drives it, with
    the velocity ``(x - x0(x, s)) / s`` at ``x = (1 - s) x_0 + s eps`` (``x0``: the denoised
    estimate, e.g. the mixture's exact ``E[x_0 | x]``); it starts at ``s = 1``."""
    # from its module: diffusers' top-level name is typed as the dummy class of a torch-less install
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    x = x_T
    for t in sched.timesteps:
        s = float(t) / sched.config.num_train_timesteps
        x = sched.step((x - x0(x, s)) / s, t, x).prev_sample
    return x


def flow_vs_diffusers(
    batch: int,
    seed: int,
    draws: int = FLOW_DRAWS,
    steps: Sequence[int] = FLOW_STEPS,
    with_diffusers: bool = True,
) -> list[FlowRow]:
    """(e): the default mixture under :class:`~steerdiff.processes.RectifiedFlow`, ``x_T`` of seeds
    ``seed, ..., seed + draws - 1``: ``sd.sample``'s defaults (from ``t_max = 0.999``) against
    :func:`flow_match_euler` at each shift of :data:`FLOW_SHIFTS` (from ``t = 1``), each against the
    exact ODE solution from its own start (``reference_ode`` from ``t_max``, and from ``1 - 1e-12``
    for diffusers', under the same flow on the range that reaches it), pooled over the draws."""
    gmm, proc = default_benchmark_mixture(), RectifiedFlow()
    from_1 = RectifiedFlow(proc.t_min, 1.0 - 1e-12)  # diffusers' start, s = 1, as near as lam is finite
    den = gmm.denoiser(proc)
    shifts = FLOW_SHIFTS if with_diffusers else ()
    errors = {n: [0.0] * (1 + len(shifts)) for n in steps}  # squared errors: ours, then diffusers' by shift
    norms = [0.0, 0.0]  # squared norms of the two exact solutions
    for k in range(draws):
        x_T = initial_noise(batch, gmm.dim, seed + k)
        ref = gmm.reference_ode(x_T, proc, proc.t_max, proc.t_min, denoise=True)
        ref_1 = gmm.reference_ode(x_T, from_1, from_1.t_max, proc.t_min, denoise=True) if shifts else ref
        norms[0] += float(ref.square().sum())
        norms[1] += float(ref_1.square().sum())
        for n in steps:
            errors[n][0] += float((sampling.sample(den, x_T, n) - ref).square().sum())
            for j, shift in enumerate(shifts, 1):
                euler = flow_match_euler(lambda x, s: gmm.denoise(x, 1.0 - s, s), x_T, n, shift)
                errors[n][j] += float((euler - ref_1).square().sum())
    return [
        FlowRow(n, draws, math.sqrt(e[0] / norms[0]), tuple(math.sqrt(d / norms[1]) for d in e[1:]))
        for n, e in errors.items()
    ]


class Results(Protocol):
    """What :func:`csv_table` and :func:`plot` read: the NFE columns and the rows."""

    nfes: tuple[int, ...]
    rows: list[Row]


@dataclass
class SolverBench:
    """Everything ``steerdiff bench solvers`` measured."""

    nfes: tuple[int, ...]
    batch: int
    seed: int
    rows: list[Row]
    default_vs_diffusers: list[DefaultVsDiffusers]
    best_vs_best: list[BestVsBest]
    overhead: list[Overhead]
    guided: GuidedBench
    flow: list[FlowRow]
    guided_flow: GuidedBench
    seconds: dict[str, float]

    def of(self, source: str) -> list[Row]:
        """The rows of ``"steerdiff"`` or of ``"diffusers"``."""
        return [r for r in self.rows if r.source == source]


def run(
    batch: int = 1024,
    seed: int = 0,
    quick: bool = False,
    with_diffusers: bool = True,
    progress: bool = False,
    draws: int = DRAWS,
) -> SolverBench:
    """Run the whole benchmark. ``quick``: NFE in :data:`QUICK_NFES`, a short overhead timing, (d)
    and (f) at the largest scale and fewest steps only and (e) on one draw at 10 steps;
    ``draws``: independent draws of ``x_T`` (seeds ``seed, seed + 1, ...``) that (a) and (b) pool.

    ``with_diffusers=False`` (or diffusers not installed) skips the diffusers rows, (a), (b)'s
    diffusers side, (c), and the diffusers columns of (d), (e) and (f).
    """
    with_diffusers = diffusers_wanted(with_diffusers, "steerdiff's solvers")
    nfes = QUICK_NFES if quick else NFES
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    problem = make_problem(batch, seed)
    seconds["reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = sweep_steerdiff(problem, nfes, progress)
    seconds["steerdiff"] = time.perf_counter() - t0
    ratio_a: list[DefaultVsDiffusers] = []
    ratio_b: list[BestVsBest] = []
    overhead: list[Overhead] = []
    if with_diffusers:
        t0 = time.perf_counter()
        rows += sweep_diffusers(problem, nfes, progress)
        more = [make_problem(batch, seed + i) for i in range(1, draws)]
        ratio_a = default_vs_diffusers(problem, [n for n in DEFAULT_VS_DIFFUSERS_NFES if n in nfes], more)
        ratio_b = best_vs_best(problem, rows, [n for n in BEST_VS_DIFFUSERS_NFES if n in nfes], more)
        seconds["diffusers"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        overhead = sampler_overhead(steps=5 if quick else 20, repeats=3 if quick else 30, progress=progress)
        seconds["overhead"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scales, steps = (QUICK_CFG_SCALES, QUICK_CFG_STEPS) if quick else (CFG_SCALES, CFG_STEPS)
    guided = guided_vs_diffusers(problem, scales, steps, with_diffusers=with_diffusers)
    seconds["guided"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    flow = flow_vs_diffusers(
        batch, seed, 1 if quick else FLOW_DRAWS, FLOW_STEPS[:1] if quick else FLOW_STEPS, with_diffusers
    )
    seconds["flow"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    guided_flow = guided_vs_diffusers(problem, scales, steps, with_diffusers=with_diffusers, flow=True)
    seconds["guided flow"] = time.perf_counter() - t0
    log.info("bench solvers: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return SolverBench(
        tuple(nfes), batch, seed, rows, ratio_a, ratio_b, overhead, guided, flow, guided_flow, seconds
    )


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2e}" if math.isfinite(v) else "nan"


def format_table(rows: Sequence[Row], nfes: Sequence[int], head: str) -> list[str]:
    """The lines of a table of ``rows``: method, schedule and the error at each of ``nfes``."""
    w1 = max([len(head)] + [len(r.method) for r in rows])
    w2 = max([len("schedule")] + [len(r.schedule) for r in rows])
    lines = [f"{head:<{w1}}  {'schedule':<{w2}}" + "".join(f"{n:>9}" for n in nfes)]
    for r in rows:
        lines.append(
            f"{r.method:<{w1}}  {r.schedule:<{w2}}" + "".join(f"{_fmt(r.errors.get(n)):>9}" for n in nfes)
        )
    return lines


def _format_decisions(decided: tuple[Decisions, Decisions], draws: int, first: int = 3) -> list[str]:
    """(a)'s lines on where the switched samples of all draws were sent away (:func:`decided_at`)."""
    a, b = decided
    ks = range(1, min(first, len(a.sigmas), len(b.sigmas)) + 1)
    parts = [
        f"step {k} (sigma/alpha {a.sigmas[k - 1]:.3g} | {b.sigmas[k - 1]:.3g}): {a.at(k)} vs {b.at(k)}"
        for k in ks
    ]
    rest = [len(d.steps) - sum(d.at(k) for k in ks) for d in decided]
    return [
        f"            over the {draws} draws {len(a.steps)} vs {len(b.steps)} switched; the step whose error"
        " sent each away (the exact ODE from the state after it ends in the wrong component):",
        "              " + "; ".join([*parts, f"later: {rest[0]} vs {rest[1]}"]),
    ]


def _format_fifth(fifth: Sequence[tuple[int, float]]) -> str:
    """(a)'s line on the NFE at which ``sd.sample`` reaches 1/5 of diffusers' pooled error."""
    ladder = ", ".join(f"{n}: {r:.3g}" for n, r in fifth)
    if fifth and fifth[-1][1] <= 0.2:
        head = f"takes sd.sample NFE {fifth[-1][0]}"
    else:
        head = f"not reached by NFE {FIFTH_NFES[-1]}"
    return f"            1/5 of diffusers' pooled error {head} (pooled ratio at NFE {ladder})"


def format_guided(g: GuidedBench, what: str) -> list[str]:
    """(d)'s table, headed by ``what`` was guided toward: one row per scale and step count (each
    step costs 2 NFE)."""
    head = ("scale", "steps", f"sd.sample ({g.solver})", "unipc", "ddim", g.theirs)

    def line(cells: Sequence[str]) -> str:
        return "    " + "  ".join(f"{c:>{max(len(h), 8)}}" for c, h in zip(cells, head, strict=True))

    return [
        f"classifier-free guidance toward {what} ({g.batch} samples of x_T; 2 NFE per step): relative"
        f" RMSE vs the guided ODE solved in {g.reference_steps} steps (dpmpp_2m, logsnr_uniform; unipc,"
        f" time_uniform agrees within {max(g.reference_gap):.1e}); all ours on {DEFAULT_SCHEDULE}:",
        line(head),
        *(
            line([f"{r.scale:g}", str(r.steps), *map(_fmt, (r.default, r.unipc, r.ddim, r.diffusers))])
            for r in g.rows
        ),
    ]


def _format_flow(rows: Sequence[FlowRow], batch: int) -> list[str]:
    """(e)'s lines: pooled errors and their ratios at each step count."""

    def line(r: FlowRow) -> str:
        if not r.diffusers:
            return f"    NFE {r.steps:>2}: {_fmt(r.ours)}"
        theirs = ", ".join(f"{_fmt(d)} (shift {k:g})" for d, k in zip(r.diffusers, FLOW_SHIFTS, strict=True))
        ratios = ", ".join(f"{q:.3g}" for q in r.ratios)
        return f"    NFE {r.steps:>2}: {_fmt(r.ours)} vs {theirs}  ratios {ratios}"

    return [
        f"(e) rectified flow (the mixture under x = (1 - t) x0 + t eps; {batch} samples per draw): sd.sample"
        f" defaults ({sampling.DEFAULT_SOLVER}, {sampling.DEFAULT_SCHEDULE}) vs diffusers"
        " FlowMatchEulerDiscreteScheduler (Euler; shift 1: its default config, 3: Stable Diffusion 3's), each"
        " against the exact ODE solution from its own start (t = 0.999 | 1), pooled over"
        f" {rows[0].draws if rows else 0} draws:",
        *map(line, rows),
    ]


def format_report(result: SolverBench) -> str:
    """The printed summary: best schedule per solver, best configuration per diffusers scheduler,
    and the sections (a)-(f)."""
    nfes = result.nfes
    ours, theirs = result.of("steerdiff"), result.of("diffusers")
    lines = [
        f"Relative RMSE vs the exact sample (default 64-d mixture, SD betas, batch {result.batch}, "
        f"seed {result.seed}); '-': NFE not reachable. All solver x schedule rows are in the CSV.",
        "",
        "steerdiff, best schedule per solver (columns: NFE):",
        *format_table(best_per_method(ours), nfes, "solver"),
    ]
    if theirs:
        lines += [
            "",
            "diffusers, best configuration per scheduler (columns: NFE):",
            *format_table(best_per_method(theirs), nfes, "scheduler"),
        ]
    if result.default_vs_diffusers:
        lines += [
            "",
            f"(a) sd.sample defaults ({sampling.DEFAULT_SOLVER}, {sampling.DEFAULT_SCHEDULE}) vs diffusers "
            "DPMSolverMultistepScheduler default config",
            "    (ill-conditioned x_T: the exact answer changes mixture component when x_T moves by"
            f" {ILL_EPS:g} of its norm along one of {ILL_DIRECTIONS} random directions):",
        ]
        for r in result.default_vs_diffusers:
            lines += [
                f"    NFE {r.nfe:>2}: {_fmt(r.ours)} vs {_fmt(r.diffusers)}  ratio {r.ratio:.3g}; "
                + r.draws.describe(result.batch),
                f"            sent to another mixture component: {r.switches[0]} vs {r.switches[1]} of"
                f" {result.batch} ({r.switches_ill[0]} vs {r.switches_ill[1]} of them among the"
                f" {result.batch - r.well_conditioned} ill-conditioned)",
                f"            on the {r.well_conditioned} others: {_fmt(r.rest[0])} vs {_fmt(r.rest[1])}"
                f"  ratio {r.rest_ratio:.3g}",
                *_format_decisions(r.decided, len(r.draws.sums)),
                _format_fifth(r.fifth),
            ]
    if result.best_vs_best:
        lines += [
            "",
            "(b) best steerdiff solver+schedule vs best diffusers configuration at equal NFE (chosen on the"
            " benchmark's draw):",
        ]
        for b in result.best_vs_best:
            ea, eb = b.ours.errors[b.nfe], b.theirs.errors[b.nfe]
            lines += [
                f"    NFE {b.nfe:>2}: {b.ours.label} {_fmt(ea)} vs {b.theirs.label} {_fmt(eb)}"
                f"  ratio {b.ratio:.3g}",
                "            " + b.draws.describe(result.batch),
            ]
    if result.overhead:
        lines += [
            "",
            "(c) sampler overhead per step outside the net (batch 256x64 float32, free net, median):",
        ]
        lines += format_overhead(result.overhead)
    what = f"components 0-{CFG_COMPONENTS - 1} of the mixture"
    d, f = (
        format_guided(result.guided, what),
        format_guided(result.guided_flow, f"{what} under rectified flow"),
    )
    lines += [
        "",
        "(d) " + d[0],
        *d[1:],
        "",
        *_format_flow(result.flow, result.batch),
        "",
        "(f) " + f[0],
        *f[1:],
    ]
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())]
    return "\n".join(lines)


def csv_table(result: Results) -> tuple[list[str], Iterator[list[str]]]:
    """The CSV of all rows (for :func:`~steerdiff.bench._figure.write_outputs`): the header ``source,
    method, schedule, same_as, nfe_<n>...`` and the rows; errors as exact float reprs (``nan``: the run
    failed), empty where the NFE is not reachable; ``same_as`` names the schedule with the identical
    grid whose numbers the row repeats."""
    header = ["source", "method", "schedule", "same_as", *(f"nfe_{n}" for n in result.nfes)]
    rows = (
        [
            r.source,
            r.method,
            r.schedule,
            r.same_as or "",
            *(repr(r.errors[n]) if n in r.errors else "" for n in result.nfes),
        ]
        for r in result.rows
    )
    return header, rows


def plot(
    result: Results,
    path: str | Path,
    ylabel: str = "relative RMSE vs exact sample",
    title: str = "Solvers on the exact 64-d Gaussian mixture (SD betas): steerdiff solid, diffusers dashed",
    references: Sequence[tuple[str, float]] = (),
) -> bool:
    """Error vs NFE, log-log: best schedule per solver (solid), best configuration per diffusers
    scheduler (dashed), and a horizontal line per ``(label, value)`` in ``references``. Returns
    ``False`` (and logs) if matplotlib is not installed. Any result with ``nfes`` and ``rows``
    (:class:`Row`) can be plotted."""
    plt = pyplot()
    if plt is None:
        return False
    groups = [
        (best_per_method([r for r in result.rows if r.source == source]), style)
        for source, style in (("steerdiff", "-"), ("diffusers", "--"))
    ]
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(13, 6.5))
    k = 0
    for rows, style in groups:
        for r in rows:
            pts = sorted((n, e) for n, e in r.errors.items() if math.isfinite(e))
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.loglog(xs, ys, style, marker="o", ms=3, color=colors[k % len(colors)], label=r.label)
                k += 1
    for (label, value), style in zip(references, (":", "-."), strict=False):
        ax.axhline(value, color="black", lw=1, ls=style, label=label)
    ax.set_xticks(list(result.nfes), [str(n) for n in result.nfes])
    ax.minorticks_off()
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
