"""GITS on the solver benchmark, held out: ``python bench/gits.py [--samples 256] [--teacher-steps 60]
[--against-diffusers [--draws 16]]``.

The grid is fitted (:class:`steerdiff.gits.GITS`) on ``--samples`` draws of ``x_T`` from the benchmark's
draw of seed 1 (:func:`steerdiff.bench.solvers.initial_noise`'s stream) and scored on its draw of seed 0
(batch 1024): relative RMSE against the exact ODE (:func:`steerdiff.bench.solvers.make_problem`) of each
solver on the GITS grid and on its best named schedule at each NFE (every schedule of
:func:`steerdiff.schedules.available` that makes the grid), beside the fit's one-time cost.

``--against-diffusers``: the solver benchmark's (b) comparison with GITS grids. The grid is fitted once on
the draw of seed 100 (outside the pooled draws), each solver of :data:`PAIRED` runs it at NFE 5 / 10 / 20
on the draws of seeds ``0 .. draws - 1`` (as :data:`steerdiff.bench.solvers.DRAWS`), and so does diffusers'
best configuration at that NFE in ``docs/bench/solvers.txt``'s (b) block (:data:`DIFFUSERS_BEST`, run by
the bench's own runner): the ratio of relative RMSEs on the benchmark's draw (seed 0) and the pooled ratio
``sqrt(sum ||x - ref||^2 / sum ||y - ref||^2)`` over all draws (:class:`steerdiff.bench.solvers.Draws`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

import steerdiff as sd
from steerdiff.bench.solvers import (
    DRAWS,
    Draws,
    Problem,
    _ours,
    _squared,
    _theirs,
    diffusers_configs,
    diffusers_nfe,
    generator_for,
    make_problem,
    makes_grid,
    steps_for_nfe,
)
from steerdiff.integrations.diffusers_ref import quiet_diffusers
from steerdiff.metrics import relative_rmse
from steerdiff.schedules import GITS
from steerdiff.solvers.base import Solver

SOLVERS = ("ddim", "ipndm", "dpmpp_2m", "unipc")
NFES = (5, 6, 8, 10)
# --against-diffusers: the solvers on the GITS grid, the NFEs of the solver benchmark's (b), diffusers' best
# configuration (method, schedule) there as docs/bench/solvers.txt's (b) block names it, the fit's draw
PAIRED: dict[str, str | Solver] = {
    "UniPC(order=2)": sd.solvers.UniPC(order=2),
    **{name: name for name in ("unipc", "dpmpp_2m", "ipndm", "accel_ddim")},
}
PAIRED_NFES = (5, 10, 20)
DIFFUSERS_BEST = {
    5: ("UniPCMultistep(bh1, final sigma_min)", "linspace"),
    10: ("UniPCMultistep(bh2, order=3)", "karras"),
    20: ("UniPCMultistep(bh2, order=3)", "karras"),
}
PAIRED_FIT_SEED = 100


def against_diffusers(problem: Problem, fit: GITS, samples: int, draws: int) -> None:
    """Print each solver of :data:`PAIRED` on ``fit``'s grid against :data:`DIFFUSERS_BEST` at each NFE of
    :data:`PAIRED_NFES`: the error on ``problem`` (seed 0) and the ratios over the draws of seeds
    ``0 .. draws - 1``."""
    with quiet_diffusers():
        configs = {(c.method, c.schedule()): c for c in diffusers_configs()}
        theirs = {n: configs[DIFFUSERS_BEST[n]] for n in PAIRED_NFES}
        steps_theirs = {n: steps_for_nfe(diffusers_nfe(c), n) for n, c in theirs.items()}
    solvers = [sd.solvers.get(s) for s in PAIRED.values()]
    # squared errors summed over each draw: per (solver, NFE) ours, per NFE diffusers'
    ours: dict[tuple[int, int], list[float]] = {(k, n): [] for k in range(len(solvers)) for n in PAIRED_NFES}
    base: dict[int, list[float]] = {n: [] for n in PAIRED_NFES}
    seed0: dict[tuple[int, int], float] = {}
    for seed in range(draws):
        # the fit's process object: a GITS grid serves the process it was fitted to
        d = problem if seed == 0 else dataclasses.replace(make_problem(1024, seed), process=problem.process)
        den = d.gmm.denoiser(d.process)
        for n in PAIRED_NFES:
            steps = steps_theirs[n]
            assert steps is not None, n
            with quiet_diffusers():
                e = _theirs(theirs[n], d, steps, n)
            base[n].append(_squared(d, e))
            seed0.setdefault((-1, n), e)
            for k, solver in enumerate(solvers):
                steps = steps_for_nfe(solver.nfe, n)
                assert steps is not None, (solver, n)
                e = _ours(den, d, solver, fit, steps, n)
                ours[k, n].append(_squared(d, e))
                seed0.setdefault((k, n), e)
        print(f"  draw {seed} done", flush=True)
    print(
        f"GITS (teacher {fit.teacher}, {fit.teacher_steps} steps, coeff {fit.coeff:g}) fitted once on "
        f"{samples} draws of x_T (seed {PAIRED_FIT_SEED}), scored on the draws of seeds 0..{draws - 1} "
        "(batch 1024): relative RMSE on seed 0 and its ratio to diffusers' best (b) configuration, pooled "
        "ratio over the draws"
    )
    print(f"{'NFE':>3} {'solver':<14} {'GITS':>9} {'diffusers':>9}  ratio  pooled  per draw")
    for n in PAIRED_NFES:
        name, sched = DIFFUSERS_BEST[n]
        for k, label in enumerate(PAIRED):
            r = Draws(tuple(zip(ours[k, n], base[n], strict=True)))
            print(
                f"{n:>3} {label:<14} {seed0[k, n]:9.3e} {seed0[-1, n]:9.3e}  {r.ratios[0]:.3f}  "
                f"{r.pooled:.3f}  {min(r.ratios):.3g} to {max(r.ratios):.3g}"
            )
        print(f"    diffusers: {name} ({sched})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--coeff", type=float, default=1.0)
    parser.add_argument("--against-diffusers", action="store_true")
    parser.add_argument("--draws", type=int, default=DRAWS)
    args = parser.parse_args()
    problem = make_problem(1024, seed=0)
    den = problem.gmm.denoiser(problem.process)
    t0 = time.perf_counter()
    fit = GITS(
        den,
        samples=args.samples,
        generator=generator_for(PAIRED_FIT_SEED if args.against_diffusers else 1, "x_T"),
        teacher_steps=args.teacher_steps,
        coeff=args.coeff,
        dtype=torch.float64,
    )
    fit_s = time.perf_counter() - t0
    if args.against_diffusers:
        print(f"fit {fit_s:.1f} s")
        against_diffusers(problem, fit, args.samples, args.draws)
        return

    def error(solver: str, schedule: str | sd.schedules.Schedule, n: int) -> float:
        x = sd.sample(den, problem.x_T, steps=n, solver=solver, schedule=schedule)
        return relative_rmse(x, problem.ref)

    print(
        f"GITS (teacher {fit.teacher}, {fit.teacher_steps} steps, coeff {fit.coeff:g}) fitted on "
        f"{args.samples} draws of x_T (seed 1), scored on 1024 others (seed 0): relative RMSE vs the exact "
        f"ODE; one-time cost {fit.nfe} NFE per draw ({fit.nfe * args.samples} evaluations), {fit_s:.1f} s"
    )
    print(f"{'solver':<10} {'NFE':>3} {'GITS':>9} {'best named':>10}  {'schedule':<15} ratio  GITS nodes (t)")
    for solver in SOLVERS:
        for n in NFES:  # every solver here spends one evaluation per step
            ours = error(solver, fit, n)
            named = {
                name: error(solver, name, n)
                for name in sd.schedules.available()
                if makes_grid(problem.process, name, n)
            }
            best = min((v, k) for k, v in named.items() if math.isfinite(v))
            nodes = ", ".join(f"{t:.0f}" for t in fit(problem.process, n).tolist())
            ratio = ours / best[0]
            print(f"{solver:<10} {n:>3} {ours:9.3e} {best[0]:10.3e}  {best[1]:<15} {ratio:.3f}  {nodes}")


if __name__ == "__main__":
    main()
