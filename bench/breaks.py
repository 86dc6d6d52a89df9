"""Multistep solvers across a jump of the guided field, with and without the restart of their history there
(:func:`steerdiff.sampling.crossings`): ``python bench/breaks.py [--n 64] [--out docs/bench]``.

Model: the tests' well-conditioned 8-d mixture (``tests/reference.py``'s ``smooth_mixture``: 4 components,
standard deviations 0.55-0.9, where solver error is smooth in the step size), exact denoiser. (The 16-d
default mixture of ``bench/rf_default.py`` sends some samples to another component under a small error:
there ``ddim`` does not converge over 10-40 steps on these windows, 0.21 / 0.20 / 0.20 at ``[0, 0.4)``.)

* Editing: RF-Inversion's controlled reverse ODE (:class:`~steerdiff.rf_inversion.ControlledEditing`, Rout et
  al. 2025, Eq. 15) under :class:`~steerdiff.processes.RectifiedFlow`, from ``y_1`` (``initial_noise`` of seed
  1) pulled towards ``n`` exact draws ``x_0`` (``generator_for(0, "x_0")``) on the paper-time windows
  ``[0, 0.25)`` at ``eta`` 1 and 0.7, ``[0, 0.4)`` and ``[0.2, 0.6)`` at 0.7; ``time_uniform`` (the paper's
  grid).
* CFG with a guidance interval (Kynkaenniemi et al. 2024; EDM2-S's ``(0.28, 2.9]`` in ``sigma/alpha``): the
  first two components of the mixture against the whole (as ``steerdiff bench guided``), scales 2 and 4, from
  ``n`` draws of ``initial_noise`` (seed 0) under Stable Diffusion's betas (``VP.scaled_linear``) and
  rectified flow, on ``karras_capped`` (``sd.sample``'s default) and ``time_uniform``. CFG declares no break
  (what ``sd.sample`` runs is ``before``): ``after`` is what the restart at the interval's ends would give
  (:func:`cfg_restarts`, the ends as :meth:`~steerdiff.Denoiser.own_breaks` for the run), measured to decide.

Solvers ``default`` (``solver=None``: UniPC-3 for the editing, the guided default around CFG), ``unipc``,
``dpmpp_2m``, ``dpmpp_3m``, ``deis``, ``ipndm``, ``ddim`` at 10 / 20 / 40 steps, ``final="none"``; each run
twice, with the restart (``after``) and without it (``before``: :func:`~steerdiff.sampling.crossings` stubbed
to find none, the behaviour before it). Error: relative RMSE against the exact ODE over the run's own grid by
DOP853 (``rtol = atol = 1e-11``), piecewise at the field's breaks (each piece with its own field, so that no
evaluation takes the other side's). Prints every case, the ratio after / before per solver (geometric mean and
range); writes ``OUT/breaks.csv`` and ``OUT/breaks.png``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

import steerdiff as sd
import steerdiff.sampling as sampling
from steerdiff.bench._figure import diagonal_scatter, write_outputs
from steerdiff.bench._ode import piecewise_ode
from steerdiff.bench.solvers import generator_for, initial_noise
from steerdiff.guidance import CFG
from steerdiff.metrics import relative_rmse
from steerdiff.rf_inversion import ControlledEditing
from steerdiff.solvers.base import Grid
from steerdiff.toy.gmm import GaussianMixture

DIM = 8
STEPS = (10, 20, 40)
SOLVERS = ("default", "unipc", "dpmpp_2m", "dpmpp_3m", "deis", "ipndm", "ddim")
EDITS = ((1.0, 0.0, 0.25), (0.7, 0.0, 0.25), (0.7, 0.0, 0.4), (0.7, 0.2, 0.6))  # (eta, start, stop)
INTERVAL = (0.28, 2.9)
SCALES = (2.0, 4.0)
CFG_SCHEDULES = ("karras_capped", "time_uniform")


def smooth_mixture() -> GaussianMixture:
    """``tests/reference.py``'s ``smooth_mixture()``: 4 components in :data:`DIM` dimensions, means
    ``randn`` and variances ``0.3 + 0.5 rand`` from ``torch.Generator().manual_seed(0)``, equal weights."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, DIM, generator=g, dtype=torch.float64)
    variances = 0.3 + 0.5 * torch.rand(4, DIM, generator=g, dtype=torch.float64)
    return GaussianMixture(means, variances, torch.ones(4, dtype=torch.float64))


@contextmanager
def without_restart() -> Iterator[None]:
    """``run_grid`` as before the restart: no step crosses a break."""
    kept = sampling.crossings
    sampling.crossings = lambda den, grid: frozenset()  # type: ignore[assignment]
    try:
        yield
    finally:
        sampling.crossings = kept


def interval_breaks(cfg: CFG) -> tuple[float, ...]:
    """The process times of CFG's interval ends inside the process's range, ``t_of_lam(-log r)`` for ``r`` =
    ``lo``, ``hi`` (none at ``scale = 1`` or without an interval)."""
    if cfg.interval is None or cfg.scale == 1:
        return ()
    p = cfg.process
    lam_lo, lam_hi = float(p.lam(p.t_max)), float(p.lam(p.t_min))
    ends = (-math.log(r) for r in cfg.interval if 0 < r < math.inf)
    return tuple(float(p.t_of_lam(lam)) for lam in ends if lam_lo < lam < lam_hi)


@contextmanager
def cfg_restarts() -> Iterator[None]:
    """CFG with its interval's ends as breaks (it declares none): the restart there, to measure it."""
    CFG.own_breaks = interval_breaks  # type: ignore[method-assign]
    try:
        yield
    finally:
        del CFG.own_breaks


def errors(
    den: sd.Denoiser, x_T: Tensor, steps: int, schedule: str, ref_of: Callable[[Grid], Tensor]
) -> list:
    """``(solver, before, after)`` for every solver of :data:`SOLVERS` against ``ref_of(grid)``."""
    _, info = sd.sample(den, x_T, steps, "ddim", schedule, final="none", return_info=True)
    ref = ref_of(info.grid)
    out = []
    for name in SOLVERS:
        solver = None if name == "default" else name
        after = relative_rmse(sd.sample(den, x_T, steps, solver, schedule, final="none"), ref)
        with without_restart():
            before = relative_rmse(sd.sample(den, x_T, steps, solver, schedule, final="none"), ref)
        out.append((name, before, after))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    gmm = smooth_mixture()
    rows: list[tuple] = []

    flow = sd.RectifiedFlow()
    den = gmm.denoiser(flow)
    x_0 = gmm.sample(args.n, generator=generator_for(0, "x_0")).to(torch.float64)
    y_1 = initial_noise(args.n, DIM, 1)
    for eta, start, stop in EDITS:
        edit = ControlledEditing(den, x_0, eta, start, stop)

        def pieces(t: float, eta: float = eta, start: float = start, stop: float = stop) -> sd.Denoiser:
            return ControlledEditing(den, x_0, eta if start <= 1 - t < stop else 0.0, 0.0, 1.0)

        for steps in STEPS:
            ref_of = lambda grid, e=edit, pc=pieces: piecewise_ode(  # noqa: E731
                pc, e.process, y_1, grid.t[0], grid.t[-1], e.breaks()
            )
            for name, before, after in errors(edit, y_1, steps, "time_uniform", ref_of):
                case = f"edit eta={eta:g} [{start:g},{stop:g})"
                rows.append((case, "flow", "time_uniform", steps, name, before, after))

    part = GaussianMixture(gmm.means[:2], gmm.variances[:2], gmm.weights[:2])
    x_T = initial_noise(args.n, DIM, 0)
    with cfg_restarts():  # CFG declares no break: the restart at its interval's ends, measured
        for process_name, process in (("sd_betas", sd.VP.scaled_linear()), ("flow", flow)):
            cond, uncond = part.denoiser(process), gmm.denoiser(process)
            for scale in SCALES:
                cfg = CFG(cond, uncond, scale, interval=INTERVAL)
                guided = CFG(cond, uncond, scale)

                def pieces_cfg(
                    t: float, cfg: CFG = cfg, guided: CFG = guided, p: sd.Process = process
                ) -> sd.Denoiser:
                    lo, hi = INTERVAL
                    return guided if lo < float(p.sigma(t) / p.alpha(t)) <= hi else cfg.base

                for schedule in CFG_SCHEDULES:
                    for steps in STEPS:
                        ref_of = lambda grid, c=cfg, pc=pieces_cfg: piecewise_ode(  # noqa: E731
                            pc, c.process, x_T, grid.t[0], grid.t[-1], c.breaks()
                        )
                        for name, before, after in errors(cfg, x_T, steps, schedule, ref_of):
                            rows.append(
                                (f"cfg scale={scale:g}", process_name, schedule, steps, name, before, after)
                            )

    print(
        f"{'case':26s} {'process':9s} {'schedule':13s} {'steps':>5s} {'solver':9s} "
        f"{'before':>9s} {'after':>9s}"
    )
    for case, proc, schedule, steps, name, before, after in rows:
        print(f"{case:26s} {proc:9s} {schedule:13s} {steps:5d} {name:9s} {before:9.3e} {after:9.3e}")
    print("\nafter / before, geometric mean [range] over the cases, at 10 / 20 / 40 steps and all:")
    for kind in ("edit", "cfg"):
        for name in SOLVERS:
            cells = []
            for steps in (*STEPS, 0):
                r = [
                    a / b
                    for c, _, _, n, s, b, a in rows
                    if c.startswith(kind) and s == name and steps in (n, 0)
                ]
                mean = math.exp(sum(math.log(v) for v in r) / len(r))
                cells.append(f"{mean:.2f} [{min(r):.2f}, {max(r):.2f}]")
            print(f"  {kind:5s} {name:9s} " + "   ".join(cells))

    values = [float(v) for r in rows for v in r[5:]]

    def plot(path: object) -> bool:
        series = [
            (
                kind,
                [r[5] for r in rows if r[0].startswith(kind)],
                [r[6] for r in rows if r[0].startswith(kind)],
                {"s": 12},
            )
            for kind in ("edit", "cfg")
        ]
        return diagonal_scatter(
            str(path),
            series,
            (min(values) / 1.5, max(values) * 1.5),
            "without the restart (before)",
            "with the restart at the breaks (after)",
            "Restart at the breaks: below the diagonal it is nearer",
        )

    header = ["case", "process", "schedule", "steps", "solver", "before", "after"]
    csv, png = write_outputs(args.out, "breaks", header, rows, plot)
    print(f"\nwrote {csv}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
