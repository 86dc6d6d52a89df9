"""The multistep solvers' step-ratio rule (``max_ratio``: a step longer than ``max_ratio`` times the step
before is at most second order, :func:`steerdiff.solvers.base.step_order`) on grids with one long mid-grid
step: ``python bench/longstep_rule.py [--batch 1024] [--out docs/bench]``.

The solver benchmark's problem (:func:`steerdiff.bench.solvers.make_problem`: the 64-d mixture under SD's
betas, exact denoiser, ``x_T`` of seed 0, the exact ODE's answer). A *merged* grid: the ``karras`` grid of
``N + m - 1`` steps with the ``m`` intervals from node ``p`` merged into one (``m`` = 2, 3, 4; ``p`` = 2 ..
``N - 2``, so the long step is never the first nor the last into a noisy node), at ``N`` = 6 .. 12 steps (NFE
= ``N`` for every solver here but ``plms``, which spends one more). Printed: every merged grid, the ratio of
its long step to the one before and its ``lam``, and the relative RMSE of each solver of :data:`RULED` with
the rule (:data:`~steerdiff.solvers.base.MAX_STEP_RATIO`, the default) and without it (``max_ratio=inf``),
beside the multistep solvers that have no such rule or never take order 3 (:data:`OTHERS`); a summary by
solver and ``m`` (geometric mean and range of with / without over the grids the rule changes); the GITS grids
of the authors' program (``max_ratio=None``, fitted on 256 draws of seed 1); and the check that the rule
changes no result of these solvers on the benchmark's own grids (every schedule of
:func:`steerdiff.schedules.available` at every NFE of :data:`steerdiff.bench.solvers.NFES`).
Writes ``OUT/longstep_rule.csv`` and ``OUT/longstep_rule.png`` (with against without, one point per merged
grid and solver).
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import replace
from statistics import geometric_mean

import torch

import steerdiff as sd
from steerdiff.bench._figure import diagonal_scatter, write_outputs
from steerdiff.bench.solvers import NFES, generator_for, make_problem, makes_grid, merged_nodes
from steerdiff.metrics import relative_rmse
from steerdiff.solvers.base import MAX_STEP_RATIO, Solver, make_grid

# order 3 with the rule (the default) and without it
RULED: dict[str, Solver] = {
    "deis": sd.solvers.DEIS(order=3),
    "dpmpp_3m": sd.solvers.get("dpmpp_3m"),
    "unipc": sd.solvers.get("unipc"),
}
OTHERS: dict[str, str | Solver] = {
    "deis1": sd.solvers.DEIS(order=1),
    "deis2": sd.solvers.DEIS(order=2),
    "dpmpp_2m": "dpmpp_2m",
    "unipc2": sd.solvers.UniPC(order=2),
    "ipndm": "ipndm",
    "lms": "lms",
    "plms": "plms",
}
MERGED = (2, 3, 4)
STEPS = range(6, 13)


def without(solver: Solver) -> Solver:
    """``solver`` with ``max_ratio=inf``: no step-ratio rule (the papers' and diffusers')."""
    return replace(solver, max_ratio=math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = make_problem(args.batch, seed=0)
    den = problem.gmm.denoiser(problem.process)

    def error(solver: str | Solver, schedule: sd.schedules.ScheduleLike, n: int) -> float:
        return relative_rmse(sd.sample(den, problem.x_T, n, solver, schedule), problem.ref)

    print(
        f"Merged karras grids (64-d mixture, SD betas, {args.batch} draws of x_T, relative RMSE against the "
        f"exact ODE): {', '.join(RULED)} (order 3) with the step-ratio rule (max_ratio={MAX_STEP_RATIO:g}) / "
        "without, and the others as they are"
    )
    head = f"{'N':>2} {'m':>1} {'p':>2} {'ratio':>5} {'lam of the long step':>20}"
    print(head + "".join(f" {k + ' with/without':>21}" for k in RULED) + "".join(f" {k:>8}" for k in OTHERS))
    rows = []
    for n in STEPS:
        for m in MERGED:
            for p in range(2, n - 1):
                nodes = merged_nodes(problem.process, "karras", n, m, p)
                grid = make_grid(problem.process, sd.schedules.Custom(nodes), n, "zero")
                ratio = grid.h(p - 1) / grid.h(p - 2)
                ruled = [(error(s, nodes, n), error(without(s), nodes, n)) for s in RULED.values()]
                others = [error(s, nodes, n) for s in OTHERS.values()]
                lam = f"{grid.lam[p - 1]:.2f} -> {grid.lam[p]:.2f}"
                print(
                    f"{n:2d} {m} {p:2d} {ratio:5.2f} {lam:>20}"
                    + "".join(f" {f'{a:.3f} / {b:.3f}':>21}" for a, b in ruled)
                    + "".join(f" {e:8.3f}" for e in others),
                    flush=True,
                )
                errors = [f"{e:.6g}" for e in (*itertools.chain(*ruled), *others)]
                rows.append([n, m, p, f"{ratio:.4g}", f"{grid.lam[p]:.4g}", *errors])

    print(
        "\nwith / without over the grids the rule changes: geometric mean, range, better / worse; largest "
        "error over all grids with / without, and the order-2 solver's"
    )
    second = {"deis": "deis2", "dpmpp_3m": "dpmpp_2m", "unipc": "unipc2"}
    for j, name in enumerate(RULED):
        col = 5 + 2 * j
        low = 5 + 2 * len(RULED) + list(OTHERS).index(second[name])
        for m in (*MERGED, None):
            sel = [r for r in rows if m is None or r[1] == m]
            changed = [(float(r[col]), float(r[col + 1])) for r in sel if r[col] != r[col + 1]]
            q = [a / b for a, b in changed]
            stats = (
                f"{geometric_mean(q):.3f}, {min(q):.3f}-{max(q):.3f}, better {sum(v < 1 for v in q)} / worse "
                f"{sum(v > 1 for v in q)} of {len(q)} changed"
                if q
                else "none changed"
            )
            largest = [max(float(r[c]) for r in sel) for c in (col, col + 1, low)]
            print(
                f"{name:9s} {'all' if m is None else f'm={m}':4s}: {stats}; largest {largest[0]:.3f} / "
                f"{largest[1]:.3f}, {second[name]} {largest[2]:.3f}"
            )

    fit = sd.schedules.GITS(
        den, samples=256, generator=generator_for(1, "x_T"), max_ratio=None, dtype=torch.float64
    )
    print("\nGITS, the authors' program (max_ratio=None): with / without the rule at NFE 5-10")
    for name, s in {**RULED, "deis2": OTHERS["deis2"], "UniPC(order=2)": OTHERS["unipc2"]}.items():
        cells = []
        for n in range(5, 11):
            pair = (error(s, fit, n), error(without(s), fit, n)) if name in RULED else (error(s, fit, n),)
            cells.append(" / ".join(f"{e:.3f}" for e in pair))
        print(f"{name:15s}" + "".join(f"{c:>15}" for c in cells))
    ratios = []
    for n in range(5, 11):
        hs = [make_grid(problem.process, fit, n).h(i) for i in range(n - 1)]
        ratios.append(max(b / a for a, b in itertools.pairwise(hs[:-1])))  # the last noisy step is left
    print(f"{'largest mid-grid step ratio':28s}" + " ".join(f"{r:.2f}" for r in ratios))

    changed, total = [], 0
    for name, s in RULED.items():
        for schedule in sd.schedules.available():
            for n in NFES:
                if makes_grid(problem.process, schedule, n):
                    total += 1
                    a = sd.sample(den, problem.x_T, n, s, schedule)
                    if not torch.equal(a, sd.sample(den, problem.x_T, n, without(s), schedule)):
                        changed.append(f"{name} on {schedule} at {n}")
    span = f"{NFES[0]}-{NFES[-1]}"
    print(
        f"\nbenchmark grids ({', '.join(RULED)} x every schedule x NFE {span}): the rule changes "
        f"{len(changed)} of {total}"
    )
    if changed:
        print("  " + ", ".join(changed))

    values = [float(v) for r in rows for v in r[5 : 5 + 2 * len(RULED)]]

    def plot(path: object) -> bool:
        series = [
            (
                name,
                [float(r[6 + 2 * j]) for r in rows if r[5 + 2 * j] != r[6 + 2 * j]],
                [float(r[5 + 2 * j]) for r in rows if r[5 + 2 * j] != r[6 + 2 * j]],
                {"s": 14, "marker": marker},
            )
            for j, (name, marker) in enumerate(zip(RULED, "os^", strict=True))
        ]
        return diagonal_scatter(
            str(path),
            series,
            (min(values) / 1.5, max(values) * 1.5),
            "order 3, without the rule (max_ratio=inf)",
            f"with the rule (max_ratio={MAX_STEP_RATIO:g})",
            "One long mid-grid step: below the diagonal the rule helps",
        )

    header = [
        "steps",
        "merged",
        "node",
        "ratio",
        "lam_end",
        *(f"{k}_{w}" for k in RULED for w in ("with", "without")),
        *OTHERS,
    ]
    csv, png = write_outputs(args.out, "longstep_rule", header, rows, plot)
    print(f"\nwrote {csv}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
