r"""Fixed-budget step placement from UniPC's free error estimate, on the solver benchmark:
``python bench/budget_steps.py [--draws 16] [--row-draws 4] [--tune] [--no-plot]``.

The idea (issue 2, goal (a)): UniC's move ``x_i^c - x_i^p`` (corrected minus predicted state after each
step, :class:`steerdiff.solvers.UniPC`) estimates the predictor's local error at no cost in network calls.
With the budget fixed at ``N`` calls, keep ``sd.sample``'s grid (``karras_capped``, ``N`` steps) as the
prior and move the nodes not yet reached from the estimate, per batch (one grid for the batch, from its RMS
estimate; works with any net) or per sample (each row alone: same sample whatever the batch).

The controller (:class:`BudgetUniPC`). After the correction at node ``i`` (``i >= 1``; the step
``i-1 -> i`` of log-SNR length ``h`` had predictor order ``k``) the estimate ``e_i = RMS(x_i^c - x_i^p)``
is compared with what the prior expects: the prior is taken to equidistribute the local error
``e = C(lam) h^q`` (``q = k + 1``), so ``C`` is ``C_p(lam) ∝ h_p(lam)^{-q}`` up to a constant, and
``log r_i = log e_i - q log h + q log h_p(lam_mid)`` (``h_p``: the prior's step at the step's midpoint) is
the measured/expected ratio. Nodes ``0..i`` are fixed, and so is the last noisy node ``N-1`` (the prior's
end) and the clean end: nodes ``i+1..N-2`` move, and exactly ``N`` calls are made. A constant ratio leaves
the prior's grid where it is (the equidistributing grid of ``C = a C_p`` is the prior's), so only its
variation along ``lam`` moves nodes; two rules extrapolate it:

* ``trend``: a least-squares line ``log r = a + b lam`` through the measured ratios (from two on); the
  remaining nodes equidistribute ``C_p(lam) e^{b lam}``: uniform in the prior's node index ``u(lam)``
  (piecewise linear) reweighted by the density ``e^{b lam / q}``, ``q = order + 1``, with the density
  ratio across the remaining interval clipped to ``clip``;
* ``ratio`` (an I-controller with the budget as its constraint): the next step is the prior's local step
  times ``(r_ref / r_i)^{1/q}``, clipped to ``[1/clip, clip]``, ``log r_ref`` the mean of the earlier
  ``log r``; the steps after it are the prior's, rescaled to end at node ``N-1``.

``adapt``: only the first ``K`` nodes move the grid (the cheaper variant); after them it is kept.

Scored on the solver benchmark's draws of seeds ``0..draws-1`` (batch 1024;
:func:`steerdiff.bench.solvers.make_problem`): relative RMSE against the exact ODE solution on the draw of
seed 0, and ``sqrt(sum ||x - ref||^2 / sum ||y - ref||^2)`` pooled over the draws
(:class:`steerdiff.bench.solvers.Draws`) against diffusers' ``DPMSolverMultistepScheduler`` with its
default config (``y``; :data:`steerdiff.bench.solvers.DIFFUSERS_DEFAULT`) and against today's default;
beside each, the samples sent to another mixture component (:func:`steerdiff.bench.solvers.switched`) and
the pooled relative RMSE of the others. The controllers' constants (``clip`` 2 or 1.5, ``K = 4``) were
tried on the draws of seeds 100..107 (``--tune --row-draws 2``: docs/bench/budget_steps_tune.txt), outside
the scored ones; every variant tried is shown.
The per-sample variant runs each row alone (a batch of one), on the first ``--row-draws`` draws (it costs
~50-100 s a draw and NFE here). The plot: the estimate ``e_i`` against the exact local error of the same
predictor step (exact ODE from ``x_{i-1}`` to ``t_i``), and each controller's nodes on the draw of seed 0.

Result (docs/bench/budget_steps.txt, 16 draws): no controller reaches the bar (pooled NFE-10 error 1.25x
below today's default); the best, ``ratio`` on the first 4 nodes with clip 1.5, is 1.003x today's default
at NFE 10 (0.87x at 20), the others 1.06-1.95x at NFE 10. The estimate is good (within 0.7-1.0x of the exact
local error at every step, left panel of the plot); the objective is the problem. The local error peaks
mid-grid (``lam`` about -0.7..0.4), while the pooled error at NFE 10 is set by the ~0.2% of samples sent
to another mixture component (30 of 16,384 for today's default; 14 of them in the first three steps,
``docs/bench/solvers.txt`` (a), where the batch's local error is 13-34x below its peak): an error amplified
near a basin boundary, which the local error does not weigh. Moving nodes toward the peak (``trend``)
lowers the error of the rest (2.2e-2 -> 1.6e-2) and sends more samples away (30 -> 46); shrinking the steps
while the estimate rises (``ratio``) sends fewer away (13-18) and leaves long steps at the end, where the
rest's error grows (to 3.9e-2 - 9.5e-2). Per sample the same trade (4 draws: 1.08x and 1.18x).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

import steerdiff as sd
from steerdiff.bench._figure import pyplot
from steerdiff.bench.solvers import (
    DIFFUSERS_DEFAULT,
    DRAWS,
    Draws,
    Problem,
    diffusers_nfe,
    make_problem,
    steps_for_nfe,
    switched,
)
from steerdiff.integrations.diffusers_ref import diffusers_sample, quiet_diffusers
from steerdiff.metrics import relative_rmse
from steerdiff.solvers.base import Grid

F64 = torch.float64
NFES = (10, 20)
TUNE_SEEDS = tuple(range(100, 108))  # --tune: the draws the controllers' constants were tried on
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench"


def prior_step(prior: Sequence[float], lam: float) -> float:
    """The prior grid's step (log-SNR) at ``lam``: that of the step containing it, else the last one."""
    for a, b in itertools.pairwise(prior):
        if a <= lam <= b:
            return b - a
    return prior[-1] - prior[-2]


def place(prior: Sequence[float], lo: float, hi: float, steps: int, c: float) -> list[float]:
    """The ``steps - 1`` nodes strictly between ``lo`` and ``hi`` that split it into ``steps`` equal parts
    of the density ``exp(c (lam - lo)) / h_p(lam)`` (``h_p``: :func:`prior_step`; ``prior``: the prior's
    noisy nodes): ``c = 0`` keeps the prior's spacing, rescaled to ``[lo, hi]``."""
    knots = [lo, *(p for p in prior if lo < p < hi), hi]
    mesh = [a + (b - a) * j / 64 for a, b in itertools.pairwise(knots) for j in range(64)]
    mesh.append(hi)
    cum = [0.0]
    for a, b in itertools.pairwise(mesh):
        m = 0.5 * (a + b)
        cum.append(cum[-1] + (b - a) * math.exp(c * (m - lo)) / prior_step(prior, m))
    out, k = [], 1
    for j in range(1, steps):
        target = cum[-1] * j / steps
        while cum[k] < target:
            k += 1
        w = (target - cum[k - 1]) / (cum[k] - cum[k - 1])
        out.append(mesh[k - 1] + w * (mesh[k] - mesh[k - 1]))
    return out


@dataclass
class BudgetUniPC(sd.solvers.UniPC):
    """UniPC whose nodes not yet reached move by the rule of the module docstring (``controller``:
    ``"trend"`` or ``"ratio"``; ``clip``; ``adapt``: the last node at which the grid moves). ``trace``
    collects ``(i, lam_i, h, e_i, log r_i, x_{i-1}, x_i^p)`` of every estimate (the states with
    ``keep``)."""

    name: ClassVar[str] = "budget_unipc"
    controller: str = "trend"
    clip: float = 2.0
    adapt: int | None = None
    keep: bool = False
    trace: list[tuple[Any, ...]] = field(default_factory=list)

    def init_state(self, grid: Grid) -> dict[str, Any]:
        state = super().init_state(grid)
        state["prior"] = grid.lam[: grid.steps]  # the prior's noisy nodes (the last one is fixed)
        state["r"] = []  # (lam_mid, log r) of each estimate
        self.trace.clear()
        return state

    def _compensate(self, start: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> None:
        predicted = state["pred"]
        if predicted is None:
            return
        e = (start - predicted).square().mean().sqrt().item()
        h, q, prior = grid.h(i - 1), state["k"] + 1, state["prior"]
        mid = 0.5 * (grid.lam[i - 1] + grid.lam[i])
        log_r = math.log(max(e, 1e-300)) - q * math.log(h) + q * math.log(prior_step(prior, mid))
        state["r"].append((mid, log_r))
        kept = (state["x"], predicted) if self.keep else ()
        self.trace.append((i, grid.lam[i], h, e, log_r, *kept))
        last = grid.steps - 1  # the last noisy node stays
        left = last - i  # steps to it
        if left < 2 or len(state["r"]) < 2 or (self.adapt is not None and i > self.adapt):
            return
        lo, hi = grid.lam[i], prior[-1]
        if self.controller == "ratio":
            logs = [v for _, v in state["r"][:-1]]
            f = math.exp(-(log_r - sum(logs) / len(logs)) / q)
            nxt = min(
                lo + min(max(f, 1 / self.clip), self.clip) * prior_step(prior, lo), lo + 0.9 * (hi - lo)
            )
            new = [nxt, *place(prior, nxt, hi, left - 1, 0.0)]
        else:
            xs, ys = zip(*state["r"], strict=True)
            xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - xm) * (y - ym) for x, y in zip(xs, ys, strict=True)) / sum((x - xm) ** 2 for x in xs)
            cmax = math.log(self.clip) / (hi - lo)
            new = place(prior, lo, hi, left, min(max(b / (self.order + 1), -cmax), cmax))
        t = grid.process.t_of_lam(torch.tensor(new, dtype=F64))
        alpha, sigma, lam = grid.process.coefficients(t)
        for j, values in enumerate(
            zip(t.tolist(), alpha.tolist(), sigma.tolist(), lam.tolist(), strict=True)
        ):
            for column, v in zip((grid.t, grid.alpha, grid.sigma, grid.lam), values, strict=True):
                column[i + 1 + j] = v


VARIANTS: dict[str, BudgetUniPC] = {
    "trend": BudgetUniPC(controller="trend"),
    "trend, first 4 nodes": BudgetUniPC(controller="trend", adapt=4),
    "ratio": BudgetUniPC(controller="ratio"),
    "ratio, clip 1.5": BudgetUniPC(controller="ratio", clip=1.5),
    "ratio, first 4 nodes": BudgetUniPC(controller="ratio", adapt=4),
    "ratio, first 4, clip 1.5": BudgetUniPC(controller="ratio", adapt=4, clip=1.5),
}
PER_ROW = ("trend", "ratio, first 4 nodes")  # also run per sample


@dataclass
class Score:
    """Sums over the draws of one method at one NFE: squared error, switched samples, and the squared error
    and squared norm of the reference over the others; the draw of seed 0's relative RMSE."""

    sq: list[float] = field(default_factory=list)
    switched: int = 0
    rest: float = 0.0
    rest_norm: float = 0.0
    seed0: float = math.nan

    def add(self, problem: Problem, x: Tensor) -> None:
        sw = switched(problem, x)
        if not self.sq:
            self.seed0 = relative_rmse(x, problem.ref)
        self.sq.append(float((x - problem.ref).square().sum()))
        self.switched += int(sw.sum())
        self.rest += float((x - problem.ref)[~sw].square().sum())
        self.rest_norm += float(problem.ref[~sw].square().sum())


def ours(problem: Problem, solver: sd.solvers.UniPC, steps: int, per_row: bool = False) -> Tensor:
    """``solver`` on ``karras_capped``; exactly ``steps`` network calls (checked)."""
    den = problem.gmm.denoiser(problem.process)
    rows = [x[None] for x in problem.x_T] if per_row else [problem.x_T]
    out = []
    for x_T in rows:
        x, info = sd.sample(den, x_T, steps=steps, solver=solver, return_info=True)
        assert info.nfe == steps, (info.nfe, steps)
        out.append(x)
    return torch.cat(out)


def theirs(problem: Problem, nfe: int) -> Tensor:
    """diffusers' ``DPMSolverMultistepScheduler`` (default config, SD betas) at ``nfe`` calls."""
    with quiet_diffusers():
        steps = steps_for_nfe(diffusers_nfe(DIFFUSERS_DEFAULT), nfe)
        assert steps is not None
        x, used = diffusers_sample(DIFFUSERS_DEFAULT.make(), problem.gmm, problem.process, problem.x_T, steps)
    assert used == nfe, (used, nfe)
    return x


def local_errors(problem: Problem, steps: int) -> list[tuple[float, float, float]]:
    """``(lam_i, e_i, exact)`` along today's default grid on ``problem``: the estimate and the exact local
    error of the same predictor step (the exact ODE from the step's start ``x_{i-1}`` to ``t_i`` against
    ``x_i^p``), batch RMS."""
    probe = BudgetUniPC(adapt=-1, keep=True)
    ours(problem, probe, steps)
    grid = sd.solvers.base.make_grid(problem.process, sd.schedules.get("karras_capped"), steps)
    out = []
    for i, lam, _, e, _, start, predicted in probe.trace:
        exact = problem.gmm.reference_ode(start, problem.process, grid.t[i - 1], grid.t[i])
        out.append((lam, e, (exact - predicted).square().mean().sqrt().item()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=DRAWS)
    parser.add_argument("--row-draws", type=int, default=4, help="draws the per-sample variants run on")
    parser.add_argument("--tune", action="store_true", help="the draws of seeds 100..107 instead")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seeds = TUNE_SEEDS if args.tune else tuple(range(args.draws))
    methods: dict[str, tuple[sd.solvers.UniPC, bool]] = {
        "today's default (unipc)": (sd.solvers.UniPC(), False)
    }
    methods |= {f"per batch: {k}": (v, False) for k, v in VARIANTS.items()}
    methods |= {f"per sample: {k}": (VARIANTS[k], True) for k in PER_ROW}
    scores = {(m, n): Score() for m in [*methods, "diffusers"] for n in NFES}
    base = {(m, n): Score() for m in methods for n in NFES}  # today's default on the per-sample draws
    grids: dict[tuple[str, int], list[float]] = {}
    for d, seed in enumerate(seeds):
        problem = make_problem(1024, seed)
        for n in NFES:
            default = ours(problem, sd.solvers.UniPC(), n)
            scores["diffusers", n].add(problem, theirs(problem, n))
            for m, (solver, per_row) in methods.items():
                if per_row and d >= args.row_draws:
                    continue
                x = default if m.startswith("today") else ours(problem, solver, n, per_row)
                scores[m, n].add(problem, x)
                base[m, n].add(problem, default)
                if d == 0 and not per_row:
                    grid = sd.solvers.base.make_grid(problem.process, sd.schedules.get("karras_capped"), n)
                    if isinstance(solver, BudgetUniPC):
                        grids[m, n] = [grid.lam[0], *(lam for _, lam, *_ in solver.trace), grid.lam[n - 1]]
                    else:
                        grids[m, n] = grid.lam[:n]
    where = f"seeds {seeds[0]}..{seeds[-1]}" + (" (--tune: not the scored draws)" if args.tune else "")
    print(
        f"Fixed-budget step placement from UniPC's predictor-corrector difference (bench/budget_steps.py): "
        f"64-d mixture, SD betas, batch 1024, draws of {where}; relative RMSE vs the exact ODE on the first "
        f"draw, pooled ratio to diffusers' DPMSolverMultistepScheduler default and to today's default "
        f"(sd.sample: unipc, karras_capped) over the draws; samples sent to another mixture component; "
        "pooled relative RMSE of the others. Every run makes exactly NFE network calls. Per-sample "
        f"variants: each row alone, on the first {min(args.row_draws, len(seeds))} draws (their ratios "
        "against today's default on those draws)."
    )
    width = max(len(m) for m in methods)
    for n in NFES:
        print(f"\nNFE {n}:")
        head = f"{'1st draw':>9} {'/diffusers':>10} {'/default':>8} {'switched':>8} {'rest':>9}"
        print(f"{'method':<{width}} {head}")
        rows = [*methods, "diffusers"]
        for m in rows:
            s = scores[m, n]
            k = len(s.sq)
            if k == 0:  # a per-sample variant with --row-draws 0
                continue
            vs_diffusers = Draws(tuple(zip(s.sq, scores["diffusers", n].sq[:k], strict=True))).pooled
            b = base[m, n] if m in methods else scores["today's default (unipc)", n]
            vs_default = Draws(tuple(zip(s.sq, b.sq[:k], strict=True))).pooled
            rest = math.sqrt(s.rest / s.rest_norm)
            print(
                f"{m:<{width}} {s.seed0:9.3e} {vs_diffusers:10.3f} {vs_default:8.3f} "
                f"{s.switched:>4}/{k:<3} {rest:9.3e}"
            )
    profile = {n: local_errors(make_problem(1024, seeds[0]), n) for n in NFES}
    print(
        "\nThe estimate against the exact local error of the same predictor step (batch RMS), today's "
        "default grid, first draw:"
    )
    for n in NFES:
        print(f"NFE {n}: lam_i, estimate, exact")
        for lam, e, exact in profile[n]:
            print(f"  {lam:+6.2f}  {e:9.3e}  {exact:9.3e}")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if not args.no_plot and not args.tune:
        plot(profile, grids)


def plot(
    profile: dict[int, list[tuple[float, float, float]]], grids: dict[tuple[str, int], list[float]]
) -> None:
    """``docs/bench/budget_steps.png``: the estimate and the exact local error along the default grid (left),
    each per-batch controller's nodes at NFE 10 on the first draw (right)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n, rows in profile.items():
        lam, e, exact = zip(*rows, strict=True)
        (line,) = a.semilogy(lam, e, "o-", label=f"estimate, {n} steps")
        a.semilogy(lam, exact, "x--", color=line.get_color(), label=f"exact local error, {n} steps")
    a.set_xlabel("log-SNR lam at the step's end")
    a.set_ylabel("RMS over the batch")
    a.legend(fontsize=7)
    labels = [m for m, n in grids if n == 10]
    for y, m in enumerate(labels):
        b.plot(grids[m, 10], [y] * len(grids[m, 10]), "|", markersize=12)
    b.set_yticks(range(len(labels)), labels, fontsize=7)
    b.set_xlabel("log-SNR lam of the nodes (NFE 10, first draw)")
    fig.tight_layout()
    fig.savefig(OUT / "budget_steps.png", dpi=120)


if __name__ == "__main__":
    main()
