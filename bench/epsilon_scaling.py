"""Epsilon Scaling (Ning et al. 2024) on the embedded digits model: ``python bench/epsilon_scaling.py``.

For DDPM at 50 / 100 steps (``leading`` timesteps, the spacing of diffusers' ``DDPMScheduler``) and DDIM at
10 / 20 steps (the default schedule, as the demo's ``ddim`` row), unconditional, from ``x_T = randn(n, 1, 8,
8)`` per seed: the Frechet distance of the clean classifier's features to the held-out digits
(:meth:`steerdiff.bench.digits.DigitsModels.frechet`, the demo's FD) without scaling (``b = 1``), with the
uniform ``b`` and the line ``k t + b`` calibrated by :func:`steerdiff.guidance.epsilon_norms` (the norm
ratio on the first 512 samples against 512 training images, per seed and sampler), and with fixed ``b``
(``--b``; ``--no-calibration`` skips the calibrated rows). Prints every run, then one row per sampler and
setting (mean over the seeds, each seed's FD), and writes ``--out``/``epsilon_scaling.csv``. About 20 min
on 2 shared cores with the defaults (1,024 samples, seeds 0 and 1).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

import steerdiff as sd
from steerdiff.bench.digits import load_models
from steerdiff.toy import digits as D

SAMPLERS = (("ddpm", 50, "leading"), ("ddpm", 100, "leading"), ("ddim", 10, sd.sampling.DEFAULT_SCHEDULE),
            ("ddim", 20, sd.sampling.DEFAULT_SCHEDULE))  # fmt: skip
FIXED_B = (0.99, 0.995, 1.005, 1.01, 1.02)
CALIBRATION_N = 512


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="samples per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--b", type=float, nargs="+", default=list(FIXED_B), help="the fixed b values")
    ap.add_argument("--no-calibration", action="store_true", help="only b = 1 and the fixed b values")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    m = load_models()
    rows: dict[tuple[str, str], list[float]] = {}
    for seed in args.seeds:
        x_T = torch.randn(args.n, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(seed))
        pick = torch.randperm(len(m.train[0]), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_N]
        for solver, steps, schedule in SAMPLERS:
            name = f"{solver} {steps}"
            settings = {"b = 1 (none)": (0.0, 1.0)}
            if not args.no_calibration:
                norms = sd.guidance.epsilon_norms(
                    m.den, m.train[0][pick], x_T[:CALIBRATION_N], steps, solver, schedule,
                    generator=torch.Generator().manual_seed(seed + 100), label=D.NULL_LABEL,
                )  # fmt: skip
                settings["uniform b (calibrated)"] = (0.0, norms.uniform())
                settings["k t + b (calibrated)"] = norms.linear()
            settings.update({f"b = {fb}": (0.0, fb) for fb in args.b})
            for label, (kk, bb) in settings.items():
                den = sd.guidance.EpsilonScaling(m.den, k=kk, b=bb)
                with torch.no_grad():
                    x = sd.sample(
                        den, x_T, steps, solver, schedule, generator=torch.Generator().manual_seed(seed + 1),
                        label=D.NULL_LABEL,
                    )  # fmt: skip
                fd = m.frechet(x)
                rows.setdefault((name, label), []).append(fd)
                print(f"seed {seed} {name:9s} {label:24s} k={kk:+.2e} b={bb:.4f} FD {fd:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "epsilon_scaling.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sampler", "setting", "fd_mean", *[f"fd_seed{s}" for s in args.seeds]])
        for (name, label), fds in rows.items():
            w.writerow([name, label, f"{sum(fds) / len(fds):.2f}", *[f"{v:.2f}" for v in fds]])
            print(f"| {name} | {label} | {sum(fds) / len(fds):.2f} | {' / '.join(f'{v:.2f}' for v in fds)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
