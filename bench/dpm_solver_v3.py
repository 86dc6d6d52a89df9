"""DPM-Solver-v3 on the solver benchmark, held out:
``python bench/dpm_solver_v3.py [--samples 1024] [--nodes 100]``.

The EMS are fitted (:func:`steerdiff.solvers.fit_ems`) on ``--samples`` draws of ``x_T`` from the benchmark's
draw of seed 1 (:func:`steerdiff.bench.solvers.generator_for`, as ``bench/gits.py``) and the solvers are
scored on its draw of seed 0 (batch 1024): relative RMSE against the exact ODE
(:func:`steerdiff.bench.solvers.make_problem`: the 64-d 10-component mixture under SD's betas) at NFE 5, 10,
15 and 20 (one evaluation per step for every solver here), on the paper's schedules (``logsnr_uniform``,
``time_uniform``) and on each solver's best named schedule at that NFE (every schedule of
:func:`steerdiff.schedules.available` that makes the grid). Rows: DPM-Solver-v3 of order 3 with its corrector
at every step (``v3``) and with the authors' switches for CIFAR-10 (``v3 (authors)``: the pseudo-order
predictor at <= 5 steps, the corrector at <= 6), ``unipc``, ``dpmpp_2m``, ``dpmpp_3m``. Prints the table and
the fit's one-time cost, writes ``docs/bench/dpm_solver_v3.{txt,png}``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import steerdiff as sd
from steerdiff.bench._figure import pyplot
from steerdiff.bench.solvers import generator_for, make_problem, makes_grid
from steerdiff.metrics import relative_rmse
from steerdiff.solvers import DPMSolverV3, fit_ems

NFES = (5, 10, 15, 20)
PAPER_SCHEDULES = ("logsnr_uniform", "time_uniform")
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench"


def solvers(ems: sd.solvers.EMS, steps: int) -> dict[str, str | sd.solvers.Solver]:
    """The rows at ``steps`` steps (the authors' switches depend on the step count)."""
    return {
        "v3": DPMSolverV3(ems, 3),
        "v3 (authors)": DPMSolverV3(ems, 3, pseudo=steps <= 5, corrector=steps <= 6),
        "unipc": "unipc",
        "dpmpp_2m": "dpmpp_2m",
        "dpmpp_3m": "dpmpp_3m",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--nodes", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors on a shared box: the thread pool only adds overhead
    problem = make_problem(1024, seed=0)
    den = problem.gmm.denoiser(problem.process)
    ems = fit_ems(den, samples=args.samples, generator=generator_for(1, "x_T"), nodes=args.nodes)

    def error(solver: str | sd.solvers.Solver, schedule: str, n: int) -> float:
        try:
            x = sd.sample(den, problem.x_T, steps=n, solver=solver, schedule=schedule)
        except ValueError:  # a grid outside the EMS range
            return math.nan
        return relative_rmse(x, problem.ref)

    names = list(solvers(ems, 1))
    table: dict[tuple[str, str, int], float] = {}
    best: dict[tuple[str, int], tuple[float, str]] = {}
    t0 = time.perf_counter()
    for n in NFES:
        for name, solver in solvers(ems, n).items():
            errs = {
                s: error(solver, s, n) for s in sd.schedules.available() if makes_grid(problem.process, s, n)
            }
            for s in PAPER_SCHEDULES:
                table[name, s, n] = errs[s]
            best[name, n] = min((v, s) for s, v in errs.items() if math.isfinite(v))
    run_s = time.perf_counter() - t0
    lines = [
        f"DPM-Solver-v3 EMS fitted on {args.samples} draws of x_T (seed 1), {args.nodes} nodes in lam: "
        f"one-time cost {ems.nfe} NFE per draw ({ems.nfe * args.samples} evaluations, the Jacobian-vector "
        f"products' backward passes besides), {ems.seconds:.1f} s",
        f"scored on 1024 other draws (seed 0): relative RMSE vs the exact ODE; sweep {run_s:.1f} s",
        f"{'solver':<13} {'schedule':<15} " + " ".join(f"{'NFE ' + str(n):>9}" for n in NFES),
    ]
    for name in names:
        for s in PAPER_SCHEDULES:
            lines.append(f"{name:<13} {s:<15} " + " ".join(f"{table[name, s, n]:9.3e}" for n in NFES))
        lines.append(f"{name:<13} {'best named':<15} " + " ".join(f"{best[name, n][0]:9.3e}" for n in NFES))
        lines.append(f"{'':<13} {'':<15} " + " ".join(f"{best[name, n][1][:9]:>9}" for n in NFES))
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dpm_solver_v3.txt").write_text(text + "\n")
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, s in zip(axes, ("logsnr_uniform", "best named"), strict=True):
            for name in names:
                ys = [table[name, s, n] if s in PAPER_SCHEDULES else best[name, n][0] for n in NFES]
                ax.plot(NFES, ys, marker="o", label=name)
            ax.set(xscale="log", yscale="log", xlabel="NFE", title=s)
            ax.set_xticks(NFES, [str(n) for n in NFES])
            ax.tick_params(axis="x", which="minor", labelbottom=False)
        axes[0].set_ylabel("relative RMSE vs exact ODE")
        axes[0].legend()
        fig.suptitle("DPM-Solver-v3 on the 64-d mixture (SD betas), EMS fitted on held-out draws")
        fig.tight_layout()
        fig.savefig(OUT / "dpm_solver_v3.png", dpi=120)
        print(f"wrote {OUT / 'dpm_solver_v3.png'}")


if __name__ == "__main__":
    main()
