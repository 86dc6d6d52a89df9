"""Shifted flow-matching grids against steerdiff's named ones on an exact rectified-flow model:
``python bench/flow_shift.py [--n 1024] [--dim 64] [--steps 10 28] [--out docs/bench]``.

Model: the ``dim``-d default mixture (:func:`steerdiff.toy.gmm.default_benchmark_mixture`) under
:class:`~steerdiff.processes.RectifiedFlow` (``t`` in ``[1e-3, 0.999]``), exact denoiser. ``x_T``:
``initial_noise(n, dim, 0)`` scaled to the marginal's scale at ``t_max`` (``hypot(alpha, sigma)``); every
grid starts there. Reference: ``gmm.reference_ode(x_T, RF, t_max, t_min, denoise=True)`` (DOP853 at
``rtol = 1e-10``, then the exact denoiser: what ``sd.sample`` with its clean end approximates). Error:
relative RMSE against it. Grids: ``time_uniform``, ``karras_capped`` (``sd.sample``'s default),
``FlowShift(shift=3)`` (SD3: FlowMatchEulerDiscreteScheduler's ``set_timesteps(n)``), ``FlowShift(shift=3,
spacing="flux")`` (the Flux pipelines' ``linspace(1, 1/n, n)``, shifted) and ``Beta()`` (diffusers'
``use_beta_sigmas``, in flow time). Solvers ``euler`` (on FlowShift(3): FlowMatchEuler's update on its
grid, but for the first node, 0.999 for 1) and ``unipc`` (UniPC-3, ``sd.sample``'s default). Prints the
table; writes ``OUT/flow_shift.csv`` and ``OUT/flow_shift.png``.
"""

from __future__ import annotations

import argparse
import math

import steerdiff as sd
from steerdiff.bench._figure import pyplot, write_outputs
from steerdiff.bench.solvers import initial_noise
from steerdiff.metrics import relative_rmse
from steerdiff.schedules import Beta, FlowShift
from steerdiff.toy.gmm import default_benchmark_mixture

RF = sd.RectifiedFlow()
SOLVERS = ("euler", "unipc")
SCHEDULES: dict[str, sd.schedules.ScheduleLike] = {
    "time_uniform": "time_uniform",
    "karras_capped": "karras_capped",
    "FlowShift(3)": FlowShift(shift=3.0),
    "FlowShift(3, flux)": FlowShift(shift=3.0, spacing="flux"),
    "Beta()": Beta(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 28])
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    gmm = default_benchmark_mixture(dim=args.dim)
    den = gmm.denoiser(RF)
    x_T = initial_noise(args.n, args.dim, 0) * math.hypot(
        float(RF.alpha(RF.t_max)), float(RF.sigma(RF.t_max))
    )
    ref = gmm.reference_ode(x_T, RF, RF.t_max, RF.t_min, denoise=True)
    rows = []
    for solver in SOLVERS:
        for label, schedule in SCHEDULES.items():
            for steps in args.steps:
                rows.append(
                    (solver, label, steps, relative_rmse(sd.sample(den, x_T, steps, solver, schedule), ref))
                )
    error = {(s, label, k): e for s, label, k, e in rows}
    cols = [f"{s} {k}" for s in SOLVERS for k in args.steps]
    print(f"relative RMSE, {args.dim}-d mixture, rectified flow, {args.n} samples (NFE = steps)\n")
    print(f"| schedule | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for label in SCHEDULES:
        cells = [f"{error[s, label, k]:.3g}" for s in SOLVERS for k in args.steps]
        print(f"| {label} | {' | '.join(cells)} |")

    def plot(path: object) -> bool:
        plt = pyplot()
        if plt is None:
            return False
        fig, axes = plt.subplots(1, len(SOLVERS), figsize=(5 * len(SOLVERS), 3.6), sharey=True)
        for ax, solver in zip(axes, SOLVERS, strict=True):
            for label in SCHEDULES:
                ax.loglog(args.steps, [error[solver, label, k] for k in args.steps], "o-", label=label)
            ax.set_title(solver)
            ax.set_xlabel("steps (NFE)")
        axes[0].set_ylabel("relative RMSE vs exact ODE")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True

    csv, png = write_outputs(args.out, "flow_shift", ["solver", "schedule", "steps", "rel_rmse"], rows, plot)
    print(f"\nwrote {csv}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
