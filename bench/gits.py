"""GITS on the solver benchmark, held out: ``python bench/gits.py [--samples 256] [--teacher-steps 60]
[--max-ratio 2 | none] [--against-diffusers [--draws 16]]``.

The grid is fitted (:class:`steerdiff.gits.GITS`) on ``--samples`` draws of ``x_T`` from the benchmark's
draw of seed 1 (:func:`steerdiff.bench.solvers.initial_noise`'s stream) and scored on its draw of seed 0
(batch 1024): relative RMSE against the exact ODE (:func:`steerdiff.bench.solvers.make_problem`) of each
solver on the GITS grid and on its best named schedule at each NFE (every schedule of
:func:`steerdiff.schedules.available` that makes the grid), beside the fit's one-time cost; then the
multistep solvers of :data:`RATIO_SOLVERS` on the grids of the same teacher with and without the step-ratio
rule (``max_ratio``; :data:`steerdiff.gits.MAX_RATIO` and ``None``, the authors' program).

``--against-diffusers``: the solver benchmark's (b) comparison with GITS grids. The grid is fitted once on
the draw of seed 100 (outside the pooled draws), each solver of :data:`PAIRED` runs it at NFE 5 / 10 / 20
on the draws of seeds ``0 .. draws - 1`` (as :data:`steerdiff.bench.solvers.DRAWS`), and so does diffusers'
best configuration at that NFE in ``docs/bench/solvers.txt``'s (b) block
(:data:`steerdiff.bench.solvers.DIFFUSERS_BEST`, :func:`~steerdiff.bench.solvers.paired_against_diffusers`):
the ratio of relative RMSEs on the benchmark's draw (seed 0) and the pooled ratio
``sqrt(sum ||x - ref||^2 / sum ||y - ref||^2)`` over all draws (:class:`steerdiff.bench.solvers.Draws`).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import steerdiff as sd
from steerdiff.bench.solvers import (
    DRAWS,
    PAIRED_FIT_SEED,
    generator_for,
    make_problem,
    makes_grid,
    paired_against_diffusers,
)
from steerdiff.gits import MAX_RATIO
from steerdiff.metrics import relative_rmse
from steerdiff.schedules import GITS
from steerdiff.solvers.base import Solver, make_grid

SOLVERS = ("ddim", "ipndm", "dpmpp_2m", "unipc")
NFES = (5, 6, 8, 10)
# with and without the step-ratio rule: the third-order multistep solvers beside the second-order ones
RATIO_SOLVERS: dict[str, str | Solver] = {
    "ddim": "ddim",
    "dpmpp_2m": "dpmpp_2m",
    "UniPC(order=2)": sd.solvers.UniPC(order=2),
    "dpmpp_3m": "dpmpp_3m",
    "unipc": "unipc",
    "DEIS(order=3)": sd.solvers.DEIS(order=3),
    "ipndm": "ipndm",
}
RATIO_NFES = (5, 6, 7, 8, 9, 10)
# --against-diffusers: the solvers on the GITS grid and the fit's draw
PAIRED: dict[str, str | Solver] = {
    "UniPC(order=2)": sd.solvers.UniPC(order=2),
    **{name: name for name in ("unipc", "dpmpp_2m", "ipndm", "accel_ddim")},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--coeff", type=float, default=1.0)
    parser.add_argument("--max-ratio", type=lambda v: None if v == "none" else float(v), default=MAX_RATIO)
    parser.add_argument("--against-diffusers", action="store_true")
    parser.add_argument("--draws", type=int, default=DRAWS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # (batch, 64) tensors: a thread pool only adds overhead on a shared machine
    problem = make_problem(1024, seed=0)
    den = problem.gmm.denoiser(problem.process)
    t0 = time.perf_counter()
    fit = GITS(
        den,
        samples=args.samples,
        generator=generator_for(PAIRED_FIT_SEED if args.against_diffusers else 1, "x_T"),
        teacher_steps=args.teacher_steps,
        coeff=args.coeff,
        max_ratio=args.max_ratio,
        dtype=torch.float64,
    )
    fit_s = time.perf_counter() - t0
    if args.against_diffusers:
        print(f"fit {fit_s:.1f} s")
        lines = paired_against_diffusers(problem, {k: (v, fit) for k, v in PAIRED.items()}, args.draws)
        print(
            f"GITS (teacher {fit.teacher}, {fit.teacher_steps} steps, coeff {fit.coeff:g}) fitted once on "
            f"{args.samples} draws of x_T (seed {PAIRED_FIT_SEED}), scored on the draws of seeds "
            f"0..{args.draws - 1} (batch 1024): relative RMSE on seed 0 and its ratio to diffusers' best (b) "
            "configuration, pooled ratio over the draws"
        )
        print("\n".join(lines))
        return

    def error(solver: str | Solver, schedule: str | sd.schedules.Schedule, n: int) -> float:
        x = sd.sample(den, problem.x_T, steps=n, solver=solver, schedule=schedule)
        return relative_rmse(x, problem.ref)

    print(
        f"GITS (teacher {fit.teacher}, {fit.teacher_steps} steps, coeff {fit.coeff:g}, max_ratio "
        f"{fit.max_ratio}) fitted on "
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

    # the same teacher's cost, the grids of the other rule (max_ratio given or None)
    other = copy.copy(fit)
    other.max_ratio, other.grids = (MAX_RATIO if fit.max_ratio is None else None), {}
    fits = sorted([fit, other], key=lambda f: f.max_ratio is not None)  # None first
    print(f"\nmax_ratio None (the authors' program) / {fits[1].max_ratio:g}: relative RMSE at NFE")
    print(f"{'solver':<15}" + "".join(f"{n:>15}" for n in RATIO_NFES))
    for label, slv in RATIO_SOLVERS.items():
        cells = [" / ".join(f"{error(slv, f, n):.3f}" for f in fits) for n in RATIO_NFES]
        print(f"{label:<15}" + "".join(f"{c:>15}" for c in cells))
    for n in RATIO_NFES:
        lams = [make_grid(problem.process, f, n).lam[:-1] for f in fits]
        ratios = [max((c - b) / (b - a) for a, b, c in zip(x, x[1:], x[2:], strict=False)) for x in lams]
        print(f"  NFE {n}: largest step ratio in lam {ratios[0]:.2f} / {ratios[1]:.2f}")


if __name__ == "__main__":
    main()
