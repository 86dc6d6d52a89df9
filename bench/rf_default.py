"""The default solver of RF-Inversion's controlled ODEs (:class:`steerdiff.rf_inversion.ControlledInversion`,
:class:`~steerdiff.rf_inversion.ControlledEditing`): the unguided one against the guided one, each against the
exact controlled ODE: ``python bench/rf_default.py [--n 64] [--dim 16] [--out docs/bench]``.

Model: the ``dim``-d default mixture (:func:`steerdiff.toy.gmm.default_benchmark_mixture`) under
:class:`~steerdiff.processes.RectifiedFlow`, exact denoiser. Inversion (Rout et al. 2025, Eq. 8): ``n``
exact draws ``x_0`` of the mixture (``generator_for(0, "x_0")``) up ``sd.invert``'s grid, pulled towards
``y_1 ~ N(0, I)`` (``initial_noise`` of seed 1) with ``gamma`` = 0.25 / 0.5 / 0.75. Editing (Eq. 15): from
``y_1`` down ``sd.sample``'s grid (``final="none"``), pulled towards ``x_0`` with ``eta`` on the paper-time
window ``[0, stop)``: ``eta`` 1 and 0.7 on the default ``[0, 0.25)``, 0.7 on ``[0, 0.4)`` and on the whole
run. Schedules ``time_uniform`` (the paper's) and ``karras_capped`` (``sd.sample``'s default) at 5 / 10 / 20
/ 40 steps. Solvers: ``sd.invert`` / ``sd.sample``'s default for a plain denoiser (UniPC-3: its noise form
up the grid, its data form down); the guided default those wrappers got as guided denoisers
(:func:`steerdiff.sampling.guided_solver` at an unknown scale: DPM-Solver++(2M) below 15 steps, UniPC-2
from 15, long steps first order); ``ddim`` (the paper's Euler step, ``rf_invert`` / ``rf_edit``'s default).
Error: relative RMSE against the controlled ODE over the run's own grid by DOP853 (``rtol = atol =
1e-11``; piecewise at the window's end). Prints every case and the geometric mean and range of unguided /
guided per wrapper and schedule; writes ``OUT/rf_default.csv`` and ``OUT/rf_default.png``.
"""

from __future__ import annotations

import argparse
import math

import torch

import steerdiff as sd
from steerdiff.bench._figure import diagonal_scatter, write_outputs
from steerdiff.bench._ode import controlled_ode
from steerdiff.bench.solvers import generator_for, initial_noise
from steerdiff.inversion import default_inversion_solver
from steerdiff.metrics import relative_rmse
from steerdiff.rf_inversion import ControlledEditing, ControlledInversion
from steerdiff.sampling import default_solver, guided_solver
from steerdiff.toy.gmm import default_benchmark_mixture

FLOW = sd.RectifiedFlow()
SCHEDULES = ("time_uniform", "karras_capped")
STEPS = (5, 10, 20, 40)
GAMMAS = (0.25, 0.5, 0.75)
EDITS = ((1.0, 0.25), (0.7, 0.25), (0.7, 0.4), (0.7, 1.0))  # (eta, stop), start 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    gmm = default_benchmark_mixture(dim=args.dim)
    den = gmm.denoiser(FLOW)
    x_0 = gmm.sample(args.n, generator=generator_for(0, "x_0")).to(torch.float64)
    y_1 = initial_noise(args.n, args.dim, 1)
    rows = []
    print(f"{'case':28s} {'schedule':13s} {'steps':>5s} {'unguided':>9s} {'guided':>9s} {'ddim':>9s} ratio")
    for schedule in SCHEDULES:
        for steps in STEPS:
            for gamma in GAMMAS:
                wrapped = ControlledInversion(den, y_1, gamma)
                _, info = sd.invert(wrapped, x_0, steps, "ddim", schedule, return_info=True)
                ref = controlled_ode(gmm, x_0, y_1, gamma, info.grid.t[0], info.grid.t[-1], toward_noise=True)
                solvers = {
                    "unguided": default_inversion_solver(den, steps, info.grid.reversed()),
                    "guided": guided_solver(steps, None, info.grid.reversed()),
                    "ddim": "ddim",
                }
                errors = [
                    relative_rmse(sd.invert(wrapped, x_0, steps, s, schedule), ref) for s in solvers.values()
                ]
                rows.append(("inversion", f"gamma={gamma:g}", schedule, steps, *errors))
            for eta, stop in EDITS:
                wrapped_e = ControlledEditing(den, x_0, eta, stop=stop)
                _, info = sd.sample(wrapped_e, y_1, steps, "ddim", schedule, final="none", return_info=True)
                t_hi, t_lo = info.grid.t[0], info.grid.t[-1]
                edge = min(max(1 - stop, t_lo), t_hi)  # the window [0, stop) of tau = 1 - t: t > 1 - stop
                ref = controlled_ode(gmm, y_1, x_0, eta, t_hi, edge, toward_noise=False)
                if edge > t_lo:
                    ref = controlled_ode(gmm, ref, x_0, 0.0, edge, t_lo, toward_noise=False)
                solvers = {
                    "unguided": default_solver(den, steps, info.grid),
                    "guided": guided_solver(steps, None, info.grid),
                    "ddim": "ddim",
                }
                errors = [
                    relative_rmse(sd.sample(wrapped_e, y_1, steps, s, schedule, final="none"), ref)
                    for s in solvers.values()
                ]
                rows.append(("editing", f"eta={eta:g} stop={stop:g}", schedule, steps, *errors))
    for kind, case, schedule, steps, un, gu, dd in rows:
        print(
            f"{kind + ' ' + case:28s} {schedule:13s} {steps:5d} {un:9.3e} {gu:9.3e} {dd:9.3e} {un / gu:.3g}"
        )
    print("\nunguided / guided default, geometric mean [range] over the cases:")
    for kind in ("inversion", "editing"):
        for schedule in (*SCHEDULES, "all"):
            r = [u / g for k, _, s, _, u, g, _ in rows if k == kind and schedule in (s, "all")]
            mean = math.exp(sum(math.log(v) for v in r) / len(r))
            print(f"  {kind:9s} {schedule:13s} {mean:.3f} [{min(r):.3f}, {max(r):.3f}] over {len(r)}")

    values = [float(v) for r in rows for v in r[4:6]]

    def plot(path: object) -> bool:
        series = [
            (kind, [r[5] for r in rows if r[0] == kind], [r[4] for r in rows if r[0] == kind], {"s": 14})
            for kind in ("inversion", "editing")
        ]
        return diagonal_scatter(
            str(path),
            series,
            (min(values) / 1.5, max(values) * 1.5),
            "guided default (guided_solver)",
            "unguided default (UniPC-3)",
            "RF-Inversion: below the diagonal the unguided default is nearer",
        )

    header = ["kind", "case", "schedule", "steps", "unguided", "guided", "ddim"]
    csv, png = write_outputs(args.out, "rf_default", header, rows, plot)
    print(f"\nwrote {csv}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
