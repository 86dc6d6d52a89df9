"""The multistep solvers' step-ratio rule (``max_ratio``: a step longer than ``max_ratio`` times the step
before is at most second order, :func:`steerdiff.solvers.base.step_order`) on grids with one long mid-grid
step: ``python bench/longstep_rule.py [--batch 1024] [--out docs/bench]``.

The solver benchmark's problem (:func:`steerdiff.bench.solvers.make_problem`: the 64-d mixture under SD's
betas, exact denoiser, ``x_T`` of seed 0, the exact ODE's answer). A *merged* grid: the ``karras`` grid of
``N + m - 1`` steps with the ``m`` intervals from node ``p`` merged into one (``m`` = 2, 3, 4; ``p`` = 2 ..
``N - 2``, so the long step is never the first nor the last into a noisy node), at ``N`` = 6 .. 12 steps (NFE
= ``N`` for every solver here but ``plms``, which spends one more). Printed: every merged grid, the ratio of
its long step to the one before and its ``lam``, and the relative RMSE of ``deis`` (order 3) with the rule
(:data:`~steerdiff.solvers.base.MAX_STEP_RATIO`, the default) and without it (``max_ratio=inf``), beside the
other multistep solvers as they are (no such rule); a summary by ``m`` (geometric mean and range of
with / without); the GITS grids of the authors' program (``max_ratio=None``, fitted on 256 draws of seed 1);
and the check that the rule changes no result of ``deis`` on the benchmark's own grids (every schedule of
:func:`steerdiff.schedules.available` at every NFE of :data:`steerdiff.bench.solvers.NFES`).
Writes ``OUT/longstep_rule.csv`` and ``OUT/longstep_rule.png`` (with against without, one point per merged
grid).
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections import defaultdict

import torch

import steerdiff as sd
from steerdiff.bench._figure import diagonal_scatter, write_outputs
from steerdiff.bench.solvers import NFES, generator_for, make_problem, makes_grid
from steerdiff.metrics import relative_rmse
from steerdiff.solvers.base import Solver, make_grid

WITH = sd.solvers.DEIS(order=3)
WITHOUT = sd.solvers.DEIS(order=3, max_ratio=math.inf)
OTHERS: dict[str, str | Solver] = {
    "deis1": sd.solvers.DEIS(order=1),
    "deis2": sd.solvers.DEIS(order=2),
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp_3m": "dpmpp_3m",
    "unipc2": sd.solvers.UniPC(order=2),
    "unipc3": "unipc",
    "ipndm": "ipndm",
    "lms": "lms",
    "plms": "plms",
}
MERGED = (2, 3, 4)
STEPS = range(6, 13)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = make_problem(args.batch, seed=0)
    den = problem.gmm.denoiser(problem.process)
    karras = sd.schedules.get("karras")

    def error(solver: str | Solver, schedule: sd.schedules.ScheduleLike, n: int) -> float:
        return relative_rmse(sd.sample(den, problem.x_T, n, solver, schedule), problem.ref)

    print(
        f"Merged karras grids (64-d mixture, SD betas, {args.batch} draws of x_T, relative RMSE against the "
        f"exact ODE): deis order 3 with the step-ratio rule (max_ratio={WITH.max_ratio:g}) / without, and "
        "the others"
    )
    head = f"{'N':>2} {'m':>1} {'p':>2} {'ratio':>5} {'lam of the long step':>20} {'with':>6} {'without':>7}"
    print(head + "".join(f" {k:>8}" for k in OTHERS))
    rows, by_m = [], defaultdict(list)
    for n in STEPS:
        for m in MERGED:
            fine = make_grid(problem.process, karras, n + m - 1, "zero").t[:-1]
            for p in range(2, n - 1):
                nodes = fine[:p] + fine[p + m - 1 :]
                grid = make_grid(problem.process, sd.schedules.Custom(nodes), n, "zero")
                ratio = grid.h(p - 1) / grid.h(p - 2)
                ours, plain = error(WITH, nodes, n), error(WITHOUT, nodes, n)
                others = [error(s, nodes, n) for s in OTHERS.values()]
                lam = f"{grid.lam[p - 1]:.2f} -> {grid.lam[p]:.2f}"
                print(
                    f"{n:2d} {m} {p:2d} {ratio:5.2f} {lam:>20} {ours:6.3f} {plain:7.3f}"
                    + "".join(f" {e:8.3f}" for e in others),
                    flush=True,
                )
                errors = (f"{e:.6g}" for e in (ours, plain, *others))
                rows.append([n, m, p, f"{ratio:.4g}", *errors])
                by_m[m].append((ours, plain, others[1]))

    print("\nby m: ratio range; deis-3 with / without: geometric mean, range, better / worse; largest errors")
    for m, cases in by_m.items():
        ratios = [float(r[3]) for r in rows if r[1] == m]
        q = [a / b for a, b, _ in cases]
        better, worse = sum(v < 1 for v in q), sum(v > 1 for v in q)
        print(
            f"m={m} ({min(ratios):.1f}-{max(ratios):.1f}): geomean {geomean(q):.3f}, "
            f"{min(q):.3f}-{max(q):.3f}, "
            f"better {better} / worse {worse} of {len(q)}; largest with {max(a for a, _, _ in cases):.3f}, "
            f"without {max(b for _, b, _ in cases):.3f}, deis2 {max(c for _, _, c in cases):.3f}; "
            f"with / deis2 geomean {geomean([a / c for a, _, c in cases]):.3f}"
        )

    fit = sd.schedules.GITS(
        den, samples=256, generator=generator_for(1, "x_T"), max_ratio=None, dtype=torch.float64
    )
    print("\nGITS, the authors' program (max_ratio=None): deis-3 with / without, deis2, largest step ratio")
    for n in range(5, 11):
        grid = make_grid(problem.process, fit, n)
        hs = [grid.h(i) for i in range(n - 1)]
        ratio = max(b / a for a, b in itertools.pairwise(hs))
        print(
            f"NFE {n:2d}: {error(WITH, fit, n):.3f} / {error(WITHOUT, fit, n):.3f}, "
            f"deis2 {error(OTHERS['deis2'], fit, n):.3f}, ratio {ratio:.2f}"
        )

    changed, total = [], 0
    for schedule in sd.schedules.available():
        for n in NFES:
            if makes_grid(problem.process, schedule, n):
                total += 1
                a = sd.sample(den, problem.x_T, n, WITH, schedule)
                if not torch.equal(a, sd.sample(den, problem.x_T, n, WITHOUT, schedule)):
                    changed.append(f"{schedule} at {n}")
    span = f"{NFES[0]}-{NFES[-1]}"
    print(f"\nbenchmark grids (every schedule x NFE {span}): the rule changes {len(changed)} of {total}")
    if changed:
        print("  " + ", ".join(changed))

    values = [float(v) for r in rows for v in r[4:6]]

    def plot(path: object) -> bool:
        series = [
            (
                f"{m} intervals merged",
                [float(r[5]) for r in rows if r[1] == m],
                [float(r[4]) for r in rows if r[1] == m],
                {"s": 14, "marker": marker},
            )
            for m, marker in zip(MERGED, "os^", strict=True)
        ]
        return diagonal_scatter(
            str(path),
            series,
            (min(values) / 1.5, max(values) * 1.5),
            "deis order 3, without the rule (max_ratio=inf)",
            f"with the rule (max_ratio={WITH.max_ratio:g})",
            "One long mid-grid step: below the diagonal the rule helps",
        )

    header = ["steps", "merged", "node", "ratio", "with_rule", "without", *OTHERS]
    csv, png = write_outputs(args.out, "longstep_rule", header, rows, plot)
    print(f"\nwrote {csv}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
