r"""``steerdiff bench sde``: stochastic samplers' distance to the exact distribution, beside diffusers.

Model: the embedded default (:func:`steerdiff.bench.solvers.default_model`: the 64-d, 10-component
Gaussian mixture under Stable Diffusion's betas, exact denoiser). ``n`` samples from standard
normal ``x_T`` (:func:`~steerdiff.bench.solvers.initial_noise` of ``seed``), noise from
``torch.Generator().manual_seed(seed + 1)``; distance:
sliced Wasserstein-2 (:func:`steerdiff.metrics.sliced_wasserstein`, 256 fixed projections) to
``4 n`` exact samples of the mixture, quoted beside the floor (:func:`steerdiff.metrics.floor`:
the same distance for ``n`` independent exact samples). Columns are NFE budgets: a sampler runs
the most steps whose NFE fits.

* every stochastic solver of :func:`steerdiff.solvers.available` with the ``time_uniform`` and
  ``karras`` schedules at each NFE of :data:`NFES` it reaches;
* diffusers' stochastic schedulers (:func:`diffusers_configs`) on the same model, ``x_T`` and
  seeds, when diffusers is installed, each with the most steps whose NFE fits too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import metrics, sampling, solvers
from ..integrations.diffusers_ref import diffusers_sample
from .solvers import (
    DiffusersConfig,
    Row,
    best_lines,
    best_per_method,
    default_model,
    diffusers_wanted,
    format_table,
    initial_noise,
    sweep_configs,
)

__all__ = ["NFES", "QUICK_NFES", "SdeBench", "diffusers_configs", "format_report", "run"]

log = logging.getLogger(__name__)

NFES = (10, 20, 50, 100, 200)
QUICK_NFES = (20, 100)
SCHEDULES = ("time_uniform", "karras")
PROJECTIONS = 256
REFERENCE_FACTOR = 4


def steps_within(nfe_of: Callable[[int], int], budget: int) -> int | None:
    """The most steps whose NFE fits in ``budget`` (samplers with 2 NFE per step, or restarts,
    reach only some NFE values), or ``None``."""
    fits = [n for n in range(1, budget + 1) if nfe_of(n) <= budget]
    return max(fits, default=None)


def diffusers_configs() -> list[DiffusersConfig]:
    """DDPM, Euler ancestral, KDPM2 ancestral, SDE-DPM-Solver++ (orders 2, 3) and SA-Solver, SD betas."""
    return [
        DiffusersConfig("DDPM", "DDPMScheduler", (("clip_sample", False),)),
        DiffusersConfig("EulerAncestral", "EulerAncestralDiscreteScheduler"),
        DiffusersConfig("KDPM2AncestralDiscrete", "KDPM2AncestralDiscreteScheduler"),
        *(
            DiffusersConfig(
                f"DPMSolverMultistep(sde-dpmsolver++, order={k})",
                "DPMSolverMultistepScheduler",
                (("algorithm_type", "sde-dpmsolver++"), ("solver_order", k)),
            )
            for k in (2, 3)
        ),
        DiffusersConfig("SASolver", "SASolverScheduler"),
    ]


@dataclass
class SdeBench:
    """Everything ``steerdiff bench sde`` measured (``rows[i].errors``: sliced W2 per NFE)."""

    nfes: tuple[int, ...]
    n: int
    seed: int
    floor: float
    prior: float
    ode: float
    rows: list[Row]
    seconds: dict[str, float]

    def of(self, source: str) -> list[Row]:
        """The rows of ``"steerdiff"`` or of ``"diffusers"``."""
        return [r for r in self.rows if r.source == source]


def run(
    n: int = 4096, seed: int = 0, quick: bool = False, with_diffusers: bool = True, progress: bool = False
) -> SdeBench:
    """Run the benchmark (``quick``: NFE in :data:`QUICK_NFES`)."""
    nfes = QUICK_NFES if quick else NFES
    gmm, proc = default_model()
    den = gmm.denoiser(proc)
    x_T = initial_noise(n, gmm.dim, seed)
    # a reference set REFERENCE_FACTOR times larger than the sampler's: less noise in every distance
    exact = gmm.sample(REFERENCE_FACTOR * n, torch.Generator().manual_seed(seed + 3))

    def sw2(x: torch.Tensor, y: torch.Tensor) -> float:
        return metrics.sliced_wasserstein(x, y, PROJECTIONS, torch.Generator().manual_seed(seed + 4))

    def distance(x: torch.Tensor) -> float:
        return sw2(x, exact)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    floor = metrics.floor(
        gmm.sample, n, sw2, repeats=3, generator=torch.Generator().manual_seed(seed + 5), reference=exact
    )
    prior = distance(x_T)
    # the exact probability-flow ODE from the same x_T: x_T ~ N(0, I) is not the model's marginal at
    # t_max (alpha(t_max) = 0.068), and a sampler that adds little noise keeps that mismatch
    ode = distance(gmm.reference_ode(x_T, proc, proc.t_max, proc.t_min, denoise=True))
    rows: list[Row] = []
    for name in tqdm(solvers.available(), desc="steerdiff", disable=not progress):
        solver = solvers.get(name)
        if not solver.stochastic:
            continue
        for sched in SCHEDULES:
            row = Row("steerdiff", name, sched)
            for nfe in nfes:
                steps = steps_within(solver.nfe, nfe)
                if steps is None:
                    continue
                try:
                    x, info = sampling.sample(
                        den,
                        x_T,
                        steps=steps,
                        solver=name,
                        schedule=sched,
                        generator=torch.Generator().manual_seed(seed + 1),
                        return_info=True,
                    )
                    row.errors[nfe] = distance(x) if info.nfe <= nfe else math.nan
                except (ValueError, FloatingPointError) as err:
                    log.warning("%s/%s at %d steps failed: %s", name, sched, steps, err)
                    row.errors[nfe] = math.nan
            rows.append(row)
    seconds["steerdiff"] = time.perf_counter() - t0
    if diffusers_wanted(with_diffusers, "steerdiff's samplers"):
        t0 = time.perf_counter()

        def score(config: DiffusersConfig, steps: int, nfe: int) -> float:
            try:
                x, used = diffusers_sample(
                    config.make(), gmm, proc, x_T, steps, torch.Generator().manual_seed(seed + 1)
                )
            except Exception as err:  # a failing reference run is reported, not fatal
                log.warning("diffusers %s at %d steps failed: %r", config.method, steps, err)
                return math.nan
            return distance(x) if used <= nfe else math.nan

        rows += sweep_configs(diffusers_configs(), nfes, score, fit=steps_within, progress=progress)
        seconds["diffusers"] = time.perf_counter() - t0
    return SdeBench(tuple(nfes), n, seed, floor, prior, ode, rows, seconds)


def format_report(result: SdeBench) -> str:
    """Best schedule per sampler, best configuration per diffusers scheduler, and at each NFE the
    best of ours against the best of diffusers, in units of the floor."""
    ours, theirs = result.of("steerdiff"), result.of("diffusers")
    lines = [
        f"Sliced W2 of {result.n} samples to {REFERENCE_FACTOR * result.n} exact ones (default 64-d "
        f"mixture, SD betas, seed {result.seed}); floor ({result.n} exact samples) {result.floor:.4f}, "
        f"x_T {result.prior:.4f}, exact ODE from x_T {result.ode:.4f} (x_T ~ N(0, I) is not the "
        "marginal at t_max: samplers that add little noise keep that mismatch). Columns: NFE budgets.",
        "",
        "steerdiff, best schedule per sampler (columns: NFE):",
        *format_table(best_per_method(ours), result.nfes, "sampler"),
    ]
    if theirs:
        lines += [
            "",
            "diffusers (columns: NFE):",
            *format_table(best_per_method(theirs), result.nfes, "scheduler"),
        ]
    lines += ["", "best at each NFE, as a multiple of the floor:"]
    lines += best_lines(ours, theirs, result.nfes, 3, result.floor, "x")
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())]
    return "\n".join(lines)
