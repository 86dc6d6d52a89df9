"""The particle methods' ``log Z`` against the exact evidence, over independent rows:
``python bench/smc_log_z.py [--rows 128] [--seed 7]``.

Problem (as ``tests/test_smc_afdps.py``): prior ``N(m, 0.5 I)`` in 3-d, one observation ``x_1 + x_2 / 2 = 1``
at ``s = 1``, exact ``log p(y)`` in closed form; VP cosine, 100 ER-SDE steps. Per method and particle count
``N``: the mean of ``log Z_hat - log p(y)`` over the rows with its standard error, the rows' standard
deviation, the median of ``|log Z_hat - log p(y)|``, the largest error, and ``E[Z_hat / p(y)] - 1`` (0 for an
unbiased estimator of ``Z``). Methods: ``afdps`` (its Euler weights of ``Q_tau = p_tau exp(-mu_y)``), ``tds``
with the noise-conditional twist ``log N(y; A x_t, s^2 I)`` (the same intermediate targets, the discrete
chain's exact weights) and ``tds`` with its linear-Gaussian twist (``prior_var = 0.5``: exact here).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import steerdiff as sd

F64 = torch.float64
PROC = sd.VP.cosine()
M, V = torch.tensor([0.5, -1.0, 0.3], dtype=F64), 0.5
GAUSS = sd.toy.GaussianMixture(M[None], torch.full((1, 3), V, dtype=F64), torch.ones(1, dtype=F64))
A = torch.tensor([[1.0, 0.5, 0.0]], dtype=F64)
Y, S = torch.tensor([1.0], dtype=F64), 1.0
STEPS, SOLVER = 100, "er_sde"


def evidence() -> float:
    """``log N(y; A m, v A A^T + s^2 I)``."""
    c = V * A @ A.T + S * S * torch.eye(1, dtype=F64)
    return float(torch.distributions.MultivariateNormal(A @ M, c).log_prob(Y))


def noisy_likelihood(x: torch.Tensor, t: object) -> torch.Tensor:
    r = Y - x @ A.T
    return -0.5 * (r * r).sum(-1) / S**2 - 0.5 * math.log(2 * math.pi * S**2)


def run(method: str, n: int, rows: int, seed: int) -> sd.smc.Particles:
    kw = {
        "shape": (rows, 3), "particles": n, "steps": STEPS, "solver": SOLVER, "dtype": F64,
        "generator": torch.Generator().manual_seed(seed),
    }  # fmt: skip
    den = GAUSS.denoiser(PROC)
    if method == "afdps":
        return sd.smc.afdps(den, sd.inverse.Matrix(A), Y, noise_std=S, **kw)
    if method == "tds (noisy twist)":
        return sd.smc.tds(den, classifier=noisy_likelihood, **kw)
    return sd.smc.tds(den, sd.inverse.Matrix(A), Y, noise_std=S, prior_var=V, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    log_z, rows = evidence(), args.rows
    print(f"exact log p(y) = {log_z:.4f}; {rows} rows, {STEPS} {SOLVER} steps, seed {args.seed}")
    print(f"{'method':22s} {'N':>5s} {'mean err':>16s} {'row sd':>7s} {'med |err|':>9s} {'max':>6s} "
          f"{'E[Z/Z] - 1':>16s} {'s':>5s}")  # fmt: skip
    for method in ("afdps", "tds (noisy twist)", "tds (linear twist)"):
        for n in (64, 256, 1024):
            start = time.perf_counter()
            err = run(method, n, rows, args.seed).log_z - log_z
            ratio, root = err.exp(), math.sqrt(rows)
            print(
                f"{method:22s} {n:5d} {float(err.mean()):+7.3f} +- {float(err.std()) / root:.3f} "
                f"{float(err.std()):7.3f} {float(err.abs().median()):9.3f} {float(err.max()):+6.2f} "
                f"{float(ratio.mean()) - 1:+7.3f} +- {float(ratio.std()) / root:.3f} "
                f"{time.perf_counter() - start:5.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
