"""GITS on the solver benchmark, held out: ``python bench/gits.py [--samples 256] [--teacher-steps 60]``.

The grid is fitted (:class:`steerdiff.gits.GITS`) on ``--samples`` draws of ``x_T`` from the benchmark's
draw of seed 1 (:func:`steerdiff.bench.solvers.initial_noise`'s stream) and scored on its draw of seed 0
(batch 1024): relative RMSE against the exact ODE (:func:`steerdiff.bench.solvers.make_problem`) of each
solver on the GITS grid and on its best named schedule at each NFE (every schedule of
:func:`steerdiff.schedules.available` that makes the grid), beside the fit's one-time cost.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import steerdiff as sd
from steerdiff.bench.solvers import generator_for, make_problem, makes_grid
from steerdiff.metrics import relative_rmse
from steerdiff.schedules import GITS

SOLVERS = ("ddim", "ipndm", "dpmpp_2m", "unipc")
NFES = (5, 6, 8, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--coeff", type=float, default=1.0)
    args = parser.parse_args()
    problem = make_problem(1024, seed=0)
    den = problem.gmm.denoiser(problem.process)
    t0 = time.perf_counter()
    fit = GITS(
        den,
        samples=args.samples,
        generator=generator_for(1, "x_T"),
        teacher_steps=args.teacher_steps,
        coeff=args.coeff,
        dtype=torch.float64,
    )
    fit_s = time.perf_counter() - t0

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
