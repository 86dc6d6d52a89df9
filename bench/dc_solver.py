"""DC-Solver on the solver benchmark, held out: ``python bench/dc_solver.py [--fit-samples 64] [--batch 256]
[--draws 3] [--iters 40] [--out docs/bench]``.

For each UniPC configuration of :data:`CONFIGS` (bh1 / bh2, order 2 / 3) the schedule is the best named one
for UniPC itself (every schedule of :func:`steerdiff.schedules.available` that makes the grid, scored by the
mean log error over :data:`NFES` on the draw of seed 0). On it DC-Solver's ratios are searched
(:func:`steerdiff.solvers.search_ratios`, AdamW as the authors) at each NFE on ``--fit-samples`` draws of
``x_T`` of seed 100 (:func:`steerdiff.bench.solvers.initial_noise`'s stream; outside the scored draws, as
``bench/gits.py``), against their exact ODE trajectory (:class:`steerdiff.solvers.ExactReference`), and both
solvers are scored on the draws of seeds ``0 .. draws - 1`` (batch ``--batch``): relative RMSE against the
exact ODE (:func:`steerdiff.bench.solvers.make_problem`) on seed 0, the ratio DC / UniPC there and pooled over
the draws (:class:`steerdiff.bench.solvers.Draws`). ``CPR`` is the pooled ratio of the ratios that a
:class:`steerdiff.solvers.CPR` fitted on the other NFEs' searched ratios predicts (leave one NFE out; ``-``
at the first and last NFE, where it would extrapolate). The search's one-time cost: its network calls per
fit sample and its wall time. Writes ``dc_solver.txt`` and ``dc_solver.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import steerdiff as sd
from steerdiff.bench.solvers import Draws, Problem, initial_noise, make_problem, makes_grid
from steerdiff.solvers import CPR, DCSolver, ExactReference, UniPC, search_ratios

NFES = (5, 6, 8, 10, 15, 20)
CONFIGS = {f"UniPC-{o} {v}": UniPC(order=o, variant=v) for v in ("bh1", "bh2") for o in (2, 3)}
FIT_SEED = 100


def squared(problem: Problem, solver: UniPC, schedule: str, n: int) -> float:
    """``||x - ref||^2`` summed over the batch of ``problem``."""
    den = problem.gmm.denoiser(problem.process)
    x = sd.sample(den, problem.x_T, n, solver, schedule)
    return float(((x - problem.ref) ** 2).sum())


def best_schedule(problem: Problem, solver: UniPC) -> str:
    """The named schedule with the least mean log error of ``solver`` over :data:`NFES` on ``problem``."""
    scores = {}
    for name in sd.schedules.available():
        if all(makes_grid(problem.process, name, n) for n in NFES):
            errs = [squared(problem, solver, name, n) for n in NFES]
            if all(math.isfinite(e) for e in errs):
                scores[name] = sum(math.log(e) for e in errs)
    return min(scores, key=scores.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fit-samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)  # (batch, 64) tensors: a thread pool only adds overhead on a shared machine
    t0 = time.perf_counter()
    draws = [make_problem(args.batch, seed) for seed in range(args.draws)]
    ref_s = time.perf_counter() - t0
    problem = draws[0]
    den = problem.gmm.denoiser(problem.process)
    x_fit = initial_noise(args.fit_samples, problem.gmm.dim, FIT_SEED)
    t0 = time.perf_counter()
    reference = ExactReference(problem.gmm, problem.process, x_fit)
    ref_fit_s = 0.0
    lines, curves = [], {}
    for label, unipc in CONFIGS.items():
        schedule = best_schedule(problem, unipc)
        template = DCSolver(order=unipc.order, variant=unipc.variant)
        ratios, fit_s, fit_nfe = {}, {}, {}
        for n in NFES:
            t1 = time.perf_counter()
            grid = sd.solvers.make_grid(problem.process, sd.schedules.get(schedule), n)
            reference(grid)  # the exact trajectory (cached): timed apart from the search
            t2 = time.perf_counter()
            ref_fit_s += t2 - t1
            fit = search_ratios(
                den, x_fit, n, schedule, solver=template, reference=reference, iters=args.iters
            )
            fit_s[n], fit_nfe[n], ratios[n] = time.perf_counter() - t2, fit.nfe, list(fit.solver.ratios or ())
        rows = []
        for n in NFES:
            dc = DCSolver(ratios=ratios[n], order=unipc.order, variant=unipc.variant)
            solvers = [dc, unipc]
            if NFES[0] < n < NFES[-1]:  # CPR interpolates: fitted on the other NFEs, n inside their range
                cpr = CPR.fit({m: r for m, r in ratios.items() if m != n})
                solvers.append(DCSolver(ratios=cpr(n), order=unipc.order, variant=unipc.variant))
            sums = [[squared(d, s, schedule, n) for s in solvers] for d in draws]
            pooled = Draws(tuple((v[0], v[1]) for v in sums))
            cpr_pooled = (
                f"{Draws(tuple((v[2], v[1]) for v in sums)).pooled:6.3f}" if len(solvers) > 2 else "     -"
            )
            scale = float((problem.ref**2).sum())
            e_dc, e_u = math.sqrt(sums[0][0] / scale), math.sqrt(sums[0][1] / scale)
            rows.append((n, e_u, e_dc))
            spread = f"{min(pooled.ratios):5.3f}-{max(pooled.ratios):5.3f}"
            lines.append(
                f"{label:<12} {n:>3} {schedule:<14} {e_u:9.3e} {e_dc:9.3e} {e_dc / e_u:6.3f} "
                f"{pooled.pooled:6.3f} {spread} {cpr_pooled} {fit_nfe[n]:>5} {fit_s[n]:5.2f}  "
                + " ".join(f"{r:.3f}" for r in ratios[n])
            )
        curves[f"{label} ({schedule})"] = rows
    total = time.perf_counter() - t0
    head = [
        "DC-Solver vs UniPC on the solver benchmark (64-d mixture, SD betas, exact denoiser): ratios "
        f"searched on {args.fit_samples} draws of x_T (seed {FIT_SEED}), {args.iters} AdamW iterations "
        f"per step, against the exact ODE; scored on the draws of seeds 0..{args.draws - 1} (batch "
        f"{args.batch}): relative RMSE vs the exact ODE on seed 0, DC / UniPC there, pooled over the draws "
        "and per draw; CPR: pooled ratio with the ratios a CPR fitted on the other NFEs predicts; the "
        "search's NFE per fit sample and seconds",
        f"(exact references: {ref_s:.1f} s for the scored draws, {ref_fit_s:.1f} s for the fit draws' "
        f"trajectory; bench total {total + ref_s:.1f} s)",
        f"{'config':<12} {'NFE':>3} {'schedule':<14} {'UniPC':>9} {'DC':>9} {'ratio':>6} {'pooled':>6} "
        f"{'per draw':>11} {'CPR':>6} {'nfe':>5} {'fit s':>5}  ratios",
    ]
    text = "\n".join(head + lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dc_solver.txt").write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab10").colors
    for k, (label, rows) in enumerate(curves.items()):
        ns, eu, ed = zip(*rows, strict=True)
        ax.loglog(ns, eu, "--", marker="o", ms=3, color=colors[k], label=f"{label}")
        ax.loglog(ns, ed, "-", marker="o", ms=3, color=colors[k], label=f"DC-Solver on {label}")
    ax.set_xticks(list(NFES), [str(n) for n in NFES])
    ax.minorticks_off()
    ax.set_xlabel("NFE")
    ax.set_ylabel("relative RMSE vs exact ODE (seed 0)")
    ax.set_title("DC-Solver (solid) vs UniPC (dashed), ratios fitted on held-out draws")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dc_solver.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
