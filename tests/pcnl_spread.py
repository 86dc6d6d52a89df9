"""The spread across seeds of ``tests/test_mcmc_pcnl.py``'s sliced-W2 statistic (the sliced W2 of 4000 chains
to exact draws over the floor of two exact sets), from which its bound ``SW_MAX`` is set:
``PYTHONPATH=src python -m tests.pcnl_spread [--seeds 30]`` (run from the repository root; 16 min on 2
heavily shared cores).

For each Gaussian target of the tests (``Phi`` zero, linear, quadratic) at the test's own ``delta`` and move
count, the statistic at ``seeds`` seeds (``0, 100, ...``): mean, standard deviation, largest, and the
``1 - 1e-3`` quantile of a log-normal fitted to the values of all three (the statistic is a ratio of two
sliced W2 of exact-size sets, skewed right: its log is close to normal). Then the same statistic for wrong
samplers at the tests' seeds: the Metropolis correction off (every move accepted), and the Metropolis
ratio computed for half the proposal's step (a step size 2x off between the two).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

import steerdiff as sd

from .test_mcmc_pcnl import F64, _gaussian_check, _quadratic, _quadratic_target

Case = tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, float, float, int, int]


def cases() -> dict[str, Case]:
    """The three tests' runs: ``(phi, mean, cov, scale, delta, steps, seed)``."""
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    eye = torch.eye(3, dtype=F64)
    return {
        "zero": (lambda x: 0.0 * x.sum(-1), torch.zeros(3, dtype=F64), 1.7**2 * eye, 1.7, 0.7, 20, 100),
        "linear": (lambda x: x @ c, 1.3**2 * c, 1.3**2 * eye, 1.3, 0.5, 40, 0),
        "quadratic": (_quadratic, *_quadratic_target(1.5), 1.5, 0.3, 60, 0),
    }


@contextmanager
def wrong(kind: str) -> Iterator[None]:
    """``"metropolis off"``: every proposal accepted; ``"ratio at delta / 2"``: the Metropolis ratio
    of a proposal of half the step taken."""
    pcnl = sd.mcmc.pcnl
    real_metropolis, real_rho = pcnl.metropolis, pcnl.PCNL._rho
    if kind == "metropolis off":
        pcnl.metropolis = lambda log_ratio, normal: torch.ones_like(log_ratio, dtype=torch.bool)
    else:
        pcnl.PCNL._rho = lambda self, u, v, delta: real_rho(self, u, v, delta / 2)  # type: ignore[method-assign]
    try:
        yield
    finally:
        pcnl.metropolis, pcnl.PCNL._rho = real_metropolis, real_rho  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=30)
    args = parser.parse_args()
    logs = []
    print(f"{'target':10s} {'mean':>6s} {'std':>6s} {'max':>6s}   values (seeds 0, 100, ...)")
    for name, (phi, mean, cov, s, delta, steps, _) in cases().items():
        r = [_gaussian_check(phi, mean, cov, s, delta, steps, 100 * k)[1] for k in range(args.seeds)]
        logs += [math.log(v) for v in r]
        values = " ".join(f"{v:.3f}" for v in r)
        print(f"{name:10s} {statistics.mean(r):6.3f} {statistics.stdev(r):6.3f} {max(r):6.3f}   {values}")
    mu, sd_log = statistics.mean(logs), statistics.stdev(logs)
    q3, q4 = (math.exp(mu + statistics.NormalDist().inv_cdf(1 - p) * sd_log) for p in (1e-3, 1e-4))
    print(
        f"log of all {len(logs)}: mean {mu:.4f}, std {sd_log:.4f}; log-normal quantile 1 - 1e-3: {q3:.3f}, "
        f"1 - 1e-4: {q4:.3f}"
    )
    print("wrong samplers at the tests' seeds (sliced W2 over the floor; max |z| of the moments):")
    for kind in ("metropolis off", "ratio at delta / 2"):
        for name, (phi, mean, cov, s, delta, steps, seed) in cases().items():
            with wrong(kind):
                zmax, ratio, info = _gaussian_check(phi, mean, cov, s, delta, steps, seed)
            rate = info.acceptance_rate
            print(f"  {kind:18s} {name:10s} {ratio:7.3f}  |z| {zmax:6.1f}  acceptance {rate:.3f}")


if __name__ == "__main__":
    main()
