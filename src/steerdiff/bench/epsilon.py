r"""``steerdiff bench epsilon``: Epsilon Scaling (Ning et al. 2024;
:class:`steerdiff.guidance.EpsilonScaling`) on the embedded digits model.

For DDPM at 50 / 100 steps (``leading`` timesteps, the spacing of diffusers' ``DDPMScheduler``) and DDIM at
10 / 20 steps (the default schedule, as the demo's ``ddim`` row), unconditional, from ``x_T = randn(n, 1, 8,
8)`` of ``torch.Generator().manual_seed(seed)`` per seed (DDPM's noise from ``seed + 1``): the Frechet
distance of the clean classifier's features to the held-out digits
(:meth:`steerdiff.bench.digits.DigitsModels.frechet`, the demo's FD) without scaling (``b = 1``), with the
uniform ``b`` and the line ``k t + b`` calibrated by :func:`steerdiff.guidance.epsilon_norms` (the norm
ratio on the first :data:`CALIBRATION_N` samples against as many training images drawn by a permutation of
``seed``, fresh noise from ``seed + 100``; per seed and sampler), and with each fixed ``b``. The table is the
mean FD over the seeds beside each seed's. About 20 min on 2 shared cores with the defaults (1,024 samples,
seeds 0 and 1); ``quick``: DDIM at 10 steps, ``b = 1.01`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..guidance import EpsilonScaling, epsilon_norms
from ..sampling import DEFAULT_SCHEDULE, sample
from ..toy import digits as D
from ._figure import pyplot, write_outputs
from .digits import DigitsModels

__all__ = [
    "CALIBRATION_N",
    "FIXED_B",
    "QUICK_B",
    "QUICK_SAMPLERS",
    "SAMPLERS",
    "EpsilonBench",
    "EpsilonRow",
    "format_report",
    "run",
    "write_results",
]

SAMPLERS = (("ddpm", 50, "leading"), ("ddpm", 100, "leading"), ("ddim", 10, DEFAULT_SCHEDULE),
            ("ddim", 20, DEFAULT_SCHEDULE))  # fmt: skip
FIXED_B = (0.99, 0.995, 1.005, 1.01, 1.02)
QUICK_SAMPLERS = (("ddim", 10, DEFAULT_SCHEDULE),)
QUICK_B = (1.01,)
CALIBRATION_N = 512
NONE, UNIFORM, LINEAR = "b = 1 (none)", "uniform b (calibrated)", "k t + b (calibrated)"


@dataclass
class EpsilonRow:
    """One run: ``solver`` at ``steps`` on ``schedule`` with ``lambda(t) = k t + b`` (``setting``: none,
    calibrated or a fixed ``b``), from ``x_T`` of ``seed``; ``fd``: the Frechet distance to the held-out
    digits."""

    solver: str
    steps: int
    schedule: str
    setting: str
    seed: int
    k: float
    b: float
    fd: float

    @property
    def sampler(self) -> str:
        return f"{self.solver} {self.steps}"


@dataclass
class EpsilonBench:
    """Everything ``steerdiff bench epsilon`` measured."""

    n: int
    seeds: list[int]
    rows: list[EpsilonRow]

    def table(self) -> list[tuple[str, str, list[float]]]:
        """``(sampler, setting, FD per seed)`` in the order run."""
        fds: dict[tuple[str, str], list[float]] = {}
        for r in self.rows:
            fds.setdefault((r.sampler, r.setting), []).append(r.fd)
        return [(sampler, setting, v) for (sampler, setting), v in fds.items()]


def run(
    models: DigitsModels,
    n: int = 1024,
    seeds: Sequence[int] = (0, 1),
    b_values: Sequence[float] = FIXED_B,
    calibrate: bool = True,
    quick: bool = False,
    progress: bool = False,
) -> EpsilonBench:
    """Run the benchmark on ``models`` (:func:`steerdiff.bench.digits.load_models`); ``quick``:
    :data:`QUICK_SAMPLERS` and :data:`QUICK_B` only; ``calibrate``: the calibrated rows too."""
    samplers = QUICK_SAMPLERS if quick else SAMPLERS
    b_values = QUICK_B if quick else b_values
    train = models.train[0]
    rows: list[EpsilonRow] = []
    cases = [(seed, s) for seed in seeds for s in samplers]
    for seed, (solver, steps, schedule) in tqdm(cases, desc="epsilon", disable=not progress):
        x_T = torch.randn(n, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(seed))
        settings = {NONE: (0.0, 1.0)}
        if calibrate:
            m = min(CALIBRATION_N, n)
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:m]
            norms = epsilon_norms(
                models.den, train[pick], x_T[:m], steps, solver, schedule,
                generator=torch.Generator().manual_seed(seed + 100), label=D.NULL_LABEL,
            )  # fmt: skip
            settings[UNIFORM] = (0.0, norms.uniform())
            settings[LINEAR] = norms.linear()
        settings.update({f"b = {b:g}": (0.0, b) for b in b_values})
        for setting, (k, b) in settings.items():
            with torch.no_grad():
                x = sample(
                    EpsilonScaling(models.den, k=k, b=b), x_T, steps, solver, schedule,
                    generator=torch.Generator().manual_seed(seed + 1), label=D.NULL_LABEL,
                )  # fmt: skip
            rows.append(EpsilonRow(solver, steps, str(schedule), setting, seed, k, b, models.frechet(x)))
    return EpsilonBench(n, list(seeds), rows)


def format_report(result: EpsilonBench) -> str:
    """Every run (its ``k``, ``b`` and FD), then one line per sampler and setting: the mean FD over the
    seeds and each seed's."""
    lines = [
        f"Epsilon Scaling on the digits model: unconditional, {result.n} samples, seeds "
        f"{', '.join(map(str, result.seeds))}; FD of the clean classifier's features to the held-out digits.",
        "",
    ]
    lines += [
        f"seed {r.seed} {r.sampler:9s} {r.setting:24s} k={r.k:+.2e} b={r.b:.4f} FD {r.fd:.2f}"
        for r in result.rows
    ]
    lines += ["", "| sampler | setting | FD (mean) | FD per seed |", "|---|---|---:|---|"]
    lines += [
        f"| {sampler} | {setting} | {sum(fds) / len(fds):.2f} | {' / '.join(f'{v:.2f}' for v in fds)} |"
        for sampler, setting, fds in result.table()
    ]
    return "\n".join(lines)


def plot(result: EpsilonBench, path: str | Path) -> bool:
    """The mean FD of every setting, one panel per sampler (each seed's FD a dot). ``False`` (logged) if
    matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    table = result.table()
    samplers = list(dict.fromkeys(sampler for sampler, _, _ in table))
    fig, axes = plt.subplots(1, len(samplers), figsize=(max(3.6 * len(samplers), 6.0), 3.6), squeeze=False)
    for ax, sampler in zip(axes.flat, samplers, strict=True):
        rows = [(setting, fds) for s, setting, fds in table if s == sampler]
        pos = range(len(rows))
        means = [sum(fds) / len(fds) for _, fds in rows]
        ax.bar(pos, means, color="tab:blue", alpha=0.6)
        ax.set_ylim(0.9 * min(min(fds) for _, fds in rows), 1.05 * max(max(fds) for _, fds in rows))
        for i, (_, fds) in enumerate(rows):
            ax.plot([i] * len(fds), fds, "k.", ms=4)
        ax.set_xticks(list(pos), [setting for setting, _ in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(sampler, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes.flat[0].set_ylabel("FD to the held-out digits")
    fig.suptitle(f"Epsilon Scaling on the digits model ({result.n} samples; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(result: EpsilonBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/epsilon.csv`` (one line per run) and ``OUT/epsilon.png``."""
    header = ["solver", "steps", "schedule", "setting", "seed", "k", "b", "fd"]
    rows = (
        [r.solver, r.steps, r.schedule, r.setting, r.seed, f"{r.k:.6g}", f"{r.b:.6g}", f"{r.fd:.4f}"]
        for r in result.rows
    )
    return write_outputs(out, "epsilon", header, rows, lambda path: plot(result, path))
