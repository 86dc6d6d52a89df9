"""The SDE multistep solvers' step-ratio rule (``max_ratio``: a step longer than ``max_ratio`` times the step
before is at most second order, :func:`steerdiff.solvers.base.step_order`) on grids with one long mid-grid
step, at full SDE noise: ``python bench/longstep_rule_sde.py [--n 4096] [--out docs/bench]``.

The SDE benchmark's model (:mod:`steerdiff.bench.sde`: the 64-d mixture under SD's betas, exact denoiser)
and distance (sliced W2, 256 projections, to ``4 n`` exact samples, beside the floor of ``n`` exact ones).
``x_T``: ``n`` exact draws of the noised marginal at ``t_max`` (``alpha_T x_0 + sigma_T eps``: no prior
mismatch, so the distance is the solver's); the step noise from one seed in every run, so that a solver with
and without the rule draws the same noise and differs only from the step whose order the rule changes. Grids
(:func:`steerdiff.bench.solvers.merged_nodes`: ``N + m - 1`` steps of a schedule with the ``m`` intervals from
node ``p`` merged into one):

* *coarse*: those of ``bench/longstep_rule.py`` (``karras``, ``N`` = 6-12, ``m`` = 2-4, every ``p`` from 2
  to ``N - 2``; long steps 0.9-2.8 in log-SNR): counted where the rule changes a result;
* *fine*: ``karras`` and ``logsnr_uniform`` at ``N`` = 20, 30, 40, 50, ``m`` = 3, 4, ``p`` = ``N/4``,
  ``N/2``, ``3N/4`` (long steps 0.3-1.9 in log-SNR): every one printed.

Solvers (:data:`RULED`), each with the rule (:data:`~steerdiff.solvers.base.MAX_STEP_RATIO`) and without it
(``max_ratio=inf``): ``dpmpp_3m_sde`` (``eta = 1``) and SA-Solver (3, 3) (``tau = 1``), whose default has it,
and ER-SDE-3 (its default noise scale and ``"sde"``), whose default has not; beside the order-2 defaults
(:data:`SECOND`: ``dpmpp_2m_sde``, ``sa_solver``, which the rule never reaches).
Printed: the fine grids' rows, a summary by solver and grid set (geometric mean and range of with / without
over the grids the rule changes), and how many of the SDE benchmark's results (``time_uniform`` and
``karras`` at NFE 10-200, these ``x_T``) the rule changes. Writes ``OUT/longstep_rule_sde.csv`` and
``OUT/longstep_rule_sde.png`` (with against without, one point per changed grid and solver).
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
from steerdiff.bench.sde import NFES, PROJECTIONS, REFERENCE_FACTOR, SCHEDULES
from steerdiff.bench.solvers import default_model, generator_for, merged_nodes
from steerdiff.metrics import floor, sliced_wasserstein
from steerdiff.solvers.base import MAX_STEP_RATIO, Solver, make_grid

RULED: dict[str, Solver] = {
    "dpmpp_3m_sde": sd.solvers.get("dpmpp_3m_sde"),
    "sa_solver(3,3)": sd.solvers.SASolver(order=3, corrector_order=3),
    "er_sde": sd.solvers.get("er_sde"),
    "er_sde(sde)": sd.solvers.ERSDE(noise_scale="sde"),
}
SECOND: dict[str, str] = {"dpmpp_3m_sde": "dpmpp_2m_sde", "sa_solver(3,3)": "sa_solver"}
COARSE = [("karras", n, m, p) for n in range(6, 13) for m in (2, 3, 4) for p in range(2, n - 1)]
FINE = [
    (schedule, n, m, p)
    for schedule in ("karras", "logsnr_uniform")
    for n in (20, 30, 40, 50)
    for m in (3, 4)
    for p in (n // 4, n // 2, 3 * n // 4)
]


def ruled(solver: Solver, max_ratio: float) -> Solver:
    """``solver`` with the step-ratio rule ``max_ratio`` (``math.inf``: none)."""
    return replace(solver, max_ratio=max_ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gmm, proc = default_model()
    den = gmm.denoiser(proc)
    a_T, s_T = float(proc.alpha(proc.t_max)), float(proc.sigma(proc.t_max))
    x0 = gmm.sample(args.n, generator_for(0, "x_0"))
    x_T = a_T * x0 + s_T * torch.randn(x0.shape, generator=generator_for(0, "eps"), dtype=x0.dtype)
    exact = gmm.sample(REFERENCE_FACTOR * args.n, generator_for(0, "exact"))

    def sw2(x: torch.Tensor, y: torch.Tensor) -> float:
        return sliced_wasserstein(x, y, PROJECTIONS, generator_for(0, "projections"))

    base = floor(gmm.sample, args.n, sw2, repeats=3, generator=generator_for(0, "floor"), reference=exact)

    def run(solver: str | Solver, schedule: sd.schedules.ScheduleLike, n: int) -> torch.Tensor:
        return sd.sample(den, x_T, n, solver, schedule, generator=generator_for(0, "noise"))

    print(
        f"Merged grids (64-d mixture, SD betas, {args.n} exact draws of x_T; sliced W2 to "
        f"{REFERENCE_FACTOR * args.n} exact samples, floor {base:.4f}): {', '.join(RULED)} with the "
        f"step-ratio rule (max_ratio={MAX_STEP_RATIO:g}) / without (same: the rule changes nothing), and the "
        "order-2 defaults"
    )
    head = f"{'grid':>14} {'N':>2} {'m':>1} {'p':>2} {'ratio':>5} {'lam of the long step':>20}"
    print(
        head
        + "".join(f" {k + ' with/without':>26}" for k in RULED)
        + "".join(f" {k:>12}" for k in SECOND.values())
    )
    rows = []
    for which, cases in (("coarse", COARSE), ("fine", FINE)):
        for schedule, n, m, p in cases:
            nodes = merged_nodes(proc, schedule, n, m, p)
            grid = make_grid(proc, sd.schedules.Custom(nodes), n, "zero")
            ratio = grid.h(p - 1) / grid.h(p - 2)
            pairs = []
            for solver in RULED.values():
                x, y = run(ruled(solver, MAX_STEP_RATIO), nodes, n), run(ruled(solver, math.inf), nodes, n)
                pairs.append((sw2(x, exact), math.nan if torch.equal(x, y) else sw2(y, exact)))
            seconds = [sw2(run(s, nodes, n), exact) if which == "fine" else math.nan for s in SECOND.values()]
            rows.append(
                [which, schedule, n, m, p, ratio, grid.lam[p - 1], grid.lam[p], *sum(pairs, ()), *seconds]
            )
            if which == "fine":
                lam = f"{grid.lam[p - 1]:.2f} -> {grid.lam[p]:.2f}"
                cells = [f"{a:.4f} / {'same' if math.isnan(b) else f'{b:.4f}'}" for a, b in pairs]
                print(
                    f"{schedule:>14} {n:2d} {m} {p:2d} {ratio:5.2f} {lam:>20}"
                    + "".join(f" {c:>26}" for c in cells)
                    + "".join(f" {e:12.4f}" for e in seconds),
                    flush=True,
                )

    print("\nwith / without over the grids the rule changes: geometric mean, range, better / worse")
    for j, name in enumerate(RULED):
        for which, cases in (("coarse", COARSE), ("fine", FINE)):
            sel = [r for r in rows if r[0] == which]
            q = [r[8 + 2 * j] / r[9 + 2 * j] for r in sel if not math.isnan(r[9 + 2 * j])]
            stats = (
                f"{geometric_mean(q):.3f}, {min(q):.3f}-{max(q):.3f}, better {sum(v < 1 for v in q)} / worse "
                f"{sum(v > 1 for v in q)} of {len(q)} changed"
                if q
                else "none changed"
            )
            print(f"  {name:>14} {which:>6} ({len(cases):3d} grids): {stats}")

    same, total = [], 0
    for solver in RULED.values():
        for schedule, n in itertools.product(SCHEDULES, NFES):
            total += 1
            a, b = run(ruled(solver, MAX_STEP_RATIO), schedule, n), run(ruled(solver, math.inf), schedule, n)
            same.append(torch.equal(a, b))
    print(
        f"\nthe SDE benchmark's grids ({', '.join(SCHEDULES)} x NFE {NFES[0]}-{NFES[-1]}, "
        f"steerdiff.bench.sde): the rule changes {total - sum(same)} of {total} results"
    )

    changed = {
        name: [(r[9 + 2 * j], r[8 + 2 * j]) for r in rows if not math.isnan(r[9 + 2 * j])]
        for j, name in enumerate(RULED)
    }
    values = [v for pairs in changed.values() for pair in pairs for v in pair] or [base]

    def plot(path: object) -> bool:
        series = [
            (name, [b for b, _ in pairs], [a for _, a in pairs], {"s": 14, "marker": marker})
            for (name, pairs), marker in zip(changed.items(), "os^v", strict=True)
        ]
        return diagonal_scatter(
            str(path),
            series,
            (min(values) / 1.2, max(values) * 1.2),
            "sliced W2 without the rule (max_ratio=inf)",
            f"with the rule (max_ratio={MAX_STEP_RATIO:g})",
            "SDE, one long mid-grid step: below the diagonal the rule helps",
        )

    header = ["grids", "schedule", "steps", "merged", "node", "ratio", "lam_from", "lam_to"]
    header += [f"{k}_{w}" for k in RULED for w in ("with", "without")] + list(SECOND.values())
    table = [[f"{v:.6g}" if isinstance(v, float) else v for v in r] for r in rows]
    csv, png = write_outputs(args.out, "longstep_rule_sde", header, table, plot)
    print(f"\nwrote {csv}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
