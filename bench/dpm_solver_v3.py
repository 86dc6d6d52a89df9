"""DPM-Solver-v3 on the solver benchmark, held out:
``python bench/dpm_solver_v3.py [--samples 1024] [--nodes 100] [--against-diffusers [--draws 16]]``.

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

``--against-diffusers``: the solver benchmark's (b) comparison (as ``bench/gits.py --against-diffusers``).
The EMS are fitted once on the draw of seed 100 (outside the pooled draws); DPM-Solver-v3 (order 3, corrector
at every step) on the schedules of :data:`PAIRED_SCHEDULES` and ``unipc`` on ``karras_capped`` (the named
(b) entry) run at NFE 5 / 10 / 20 on the draws of seeds ``0 .. draws - 1``, beside diffusers' best
configuration at each NFE (:func:`steerdiff.bench.solvers.paired_against_diffusers`): the ratio on seed 0
and the pooled ratio over the draws. Writes ``docs/bench/dpm_solver_v3_vs_diffusers.txt``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import steerdiff as sd
from steerdiff.bench._figure import pyplot
from steerdiff.bench.solvers import (
    DRAWS,
    PAIRED_FIT_SEED,
    generator_for,
    make_problem,
    makes_grid,
    paired_against_diffusers,
)
from steerdiff.metrics import relative_rmse
from steerdiff.solvers import DPMSolverV3, fit_ems

NFES = (5, 10, 15, 20)
PAPER_SCHEDULES = ("logsnr_uniform", "time_uniform")
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench"
PAIRED_SCHEDULES = ("karras_jump", "karras_capped", "karras", "logsnr_uniform")


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
    parser.add_argument("--against-diffusers", action="store_true")
    parser.add_argument("--draws", type=int, default=DRAWS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors on a shared box: the thread pool only adds overhead
    problem = make_problem(1024, seed=0)
    den = problem.gmm.denoiser(problem.process)
    fit_seed = PAIRED_FIT_SEED if args.against_diffusers else 1
    ems = fit_ems(den, samples=args.samples, generator=generator_for(fit_seed, "x_T"), nodes=args.nodes)
    if args.against_diffusers:
        entries: dict[str, tuple[str | sd.solvers.Solver, str]] = {
            f"v3 ({s})": (DPMSolverV3(ems, 3), s) for s in PAIRED_SCHEDULES
        }
        entries["unipc (karras_capped)"] = ("unipc", "karras_capped")
        lines = [
            f"DPM-Solver-v3 (order 3, corrector at every step), EMS fitted once on {args.samples} draws of "
            f"x_T (seed {fit_seed}), {args.nodes} nodes, {ems.seconds:.1f} s; scored on the draws of seeds "
            f"0..{args.draws - 1} (batch 1024): relative RMSE on seed 0 and its ratio to diffusers' best (b) "
            "configuration, pooled ratio over the draws",
            *paired_against_diffusers(problem, entries, args.draws),
        ]
        print("\n".join(lines))
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "dpm_solver_v3_vs_diffusers.txt").write_text("\n".join(lines) + "\n")
        return

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
