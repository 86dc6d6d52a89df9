"""The multistep ODE solvers' long-step rule with another limit, against the default, on the longstep bench's
cases: ``python bench/longstep_limit.py [--max-h 1.0] [--max-h-ratio 2.0] [--n 256]``.

Every process x schedule x step count x solver of :mod:`steerdiff.bench.longstep` (16-d default mixture,
``n`` draws of ``x_T`` of seed 0) is run with the default rule (:data:`steerdiff.solvers.base.ODE_MAX_H`,
:data:`~steerdiff.solvers.base.ODE_MAX_H_RATIO`) and with ``--max-h`` / ``--max-h-ratio``; where the results
differ, the relative RMSE of each against the exact ODE and denoiser. What GITS's step-ratio rule
(:data:`steerdiff.gits.MAX_RATIO`) was weighed against: lowering the solvers' limit instead. The run quoted in
docs/schedules.md, ``--max-h 1``: 112 of 2,664 cases change, 49 for the better, 63 for the worse
(``docs/bench/longstep_limit.txt``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch

from steerdiff import schedules
from steerdiff.bench.longstep import SOLVERS, STEPS, _applies, processes
from steerdiff.bench.solvers import initial_noise
from steerdiff.sampling import sample
from steerdiff.solvers import get as get_solver
from steerdiff.solvers.base import make_grid
from steerdiff.toy.gmm import default_benchmark_mixture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-h", type=float, default=1.0)
    parser.add_argument("--max-h-ratio", type=float, default=2.0)
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    gmm = default_benchmark_mixture(dim=16)
    z = initial_noise(args.n, 16, 0)
    rows, total = [], 0
    for name, process in processes().items():
        den = gmm.denoiser(process)
        for schedule in schedules.available():
            if not _applies(process, schedule):
                continue
            for k in STEPS:
                t0 = make_grid(process, schedules.get(schedule), k, "zero").t[0]
                x_T = z * math.hypot(float(process.alpha(t0)), float(process.sigma(t0)))
                ref = None
                for solver in SOLVERS:
                    total += 1
                    other = replace(get_solver(solver), max_h=args.max_h, max_h_ratio=args.max_h_ratio)
                    base, y = sample(den, x_T, k, solver, schedule), sample(den, x_T, k, other, schedule)
                    if torch.equal(base, y):
                        continue
                    if ref is None:
                        ref = gmm.reference_ode(x_T, process, t0, process.t_min, denoise=True)
                    e = [float((v - ref).norm() / ref.norm()) for v in (base, y)]
                    rows.append((name, schedule, k, solver, *e))
    worse = [r for r in rows if r[5] > r[4]]
    print(
        f"max_h={args.max_h:g}, max_h_ratio={args.max_h_ratio:g} against the default: {len(rows)} of {total} "
        f"cases change, {len(rows) - len(worse)} for the better, {len(worse)} for the worse"
    )
    print(f"{'process':12s} {'schedule':13s} {'steps':>5s} {'solver':9s} {'default':>9s} {'other':>9s} ratio")
    for r in sorted(rows, key=lambda r: r[5] / r[4]):
        print(f"{r[0]:12s} {r[1]:13s} {r[2]:5d} {r[3]:9s} {r[4]:9.2e} {r[5]:9.2e} {r[5] / r[4]:.3g}")


if __name__ == "__main__":
    main()
