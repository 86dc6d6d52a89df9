"""``karras_jump``: Karras nodes whose last point is replaced by the jump to the clean state."""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.schedules import Karras, KarrasJump

from .reference import exact_sample, noise, rel_rmse

F64 = torch.float64


def test_nodes_follow_the_n_plus_one_point_karras_formula() -> None:
    p = sd.VP.scaled_linear()
    s_max, s_min = math.exp(-float(p.lam(p.t_max))), math.exp(-float(p.lam(p.t_min)))
    a, b = s_max ** (1 / 7), s_min ** (1 / 7)
    for n in (1, 2, 5, 10, 14):
        t = KarrasJump()(p, n)
        s = (p.sigma(t) / p.alpha(t)).numpy()
        want = [(a + i / n * (b - a)) ** 7 for i in range(n)]
        assert s == pytest.approx(want, rel=1e-9)
        assert float(t[0]) == p.t_max and float(t[-1]) > p.t_min
    # 5 nodes under SD betas: s_min = 0.0292 is no node; the next-to-last Karras point ends the list
    t5 = KarrasJump()(p, 5)
    s5 = (p.sigma(t5) / p.alpha(t5)).tolist()
    assert s5 == pytest.approx([14.6146, 6.0821, 2.2322, 0.6926, 0.1698], abs=5e-5)


def test_from_max_nodes_on_it_is_karras() -> None:
    p = sd.VP.scaled_linear()
    for n in (15, 20):
        assert torch.equal(KarrasJump()(p, n), Karras()(p, n))
    assert torch.equal(KarrasJump(rho=5, max_nodes=4)(p, 4), Karras(rho=5)(p, 4))
    assert sd.schedules.get("karras_jump").max_nodes == 15
    with pytest.raises(ValueError, match="max_nodes"):
        KarrasJump(max_nodes=0)


@pytest.mark.parametrize("steps", [5, 6])
def test_about_half_karras_error_at_five_and_six_steps(steps: int) -> None:
    """On a 16-dim, 10-component mixture (default solver): karras_jump has under half Karras' error.

    Measured ratios 0.40 (5 steps) and 0.41 (6 steps) here; 0.40-0.48 over mixture seeds 0-2.
    """
    gmm = sd.toy.default_benchmark_mixture(dim=16, components=10, seed=0)
    p = sd.VP.scaled_linear()
    x_T = noise(256, 16, seed=3)
    ref = exact_sample(gmm, p, x_T)
    den = gmm.denoiser(p)
    err = {s: rel_rmse(sd.sample(den, x_T, steps=steps, schedule=s), ref) for s in ("karras", "karras_jump")}
    # measured errors: karras 0.415 / 0.308, karras_jump 0.165 / 0.127 (5 / 6 steps)
    assert err["karras_jump"] < 0.5 * err["karras"]


ZERO_SNR = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64), rescale_zero_snr=True)


@pytest.mark.parametrize("process", [ZERO_SNR, sd.RectifiedFlow(), sd.EDM()], ids=["zero_snr", "flow", "edm"])
def test_above_sigma_top_the_ramp_starts_at_sigma_top_after_the_start(process) -> None:
    """s_max = 3.1e4 / 999 / 80: the first node stays at t_max, the others are the ramp from 30."""
    s_min = math.exp(-float(process.lam(process.t_min)))
    a, b = 30.0 ** (1 / 7), s_min ** (1 / 7)
    for n in (2, 5, 10, 14, 20):
        t = KarrasJump(sigma_top=30)(process, n)
        s = (process.sigma(t) / process.alpha(t)).numpy()
        m = n if n < 15 else n - 1  # ramp intervals: the last node is the jump's below 15 nodes
        want = [(a + i / m * (b - a)) ** 7 for i in range(1, n)]
        assert float(t[0]) == process.t_max and s[1:] == pytest.approx(want, rel=1e-9)
        # without the top jump (the default): Eq. 5 from the process's s_max
        assert torch.equal(KarrasJump()(process, n), KarrasJump(sigma_top=1e9)(process, n))
    assert torch.equal(KarrasJump()(process, 20), Karras()(process, 20))
    for bad in (0, -1.0, math.nan, math.inf, "30"):
        with pytest.raises(ValueError, match="sigma_top"):
            KarrasJump(sigma_top=bad)


@pytest.mark.parametrize(
    ("process", "bounds"),
    [(ZERO_SNR, {10: 0.3, 20: 0.05}), (sd.RectifiedFlow(), {10: 0.75, 20: 0.2})],
    ids=["zero_snr", "flow"],
)
def test_the_top_jump_cuts_the_default_error_where_s_max_is_large(process, bounds) -> None:
    """Default solver on a 16-dim, 10-component mixture: the error with the top jump over that of
    Eq. 5 from s_max is below ``bounds[steps]``. Measured: zero SNR 0.21 (10 steps: 0.11 vs 0.52)
    and 0.017 (20 steps: 9.2e-3 vs 0.53); rectified flow 0.62 (0.24 vs 0.39) and 0.06 (0.014 vs 0.24),
    0.62 and 0.05-0.11 over mixture seeds 0-2."""
    gmm = sd.toy.default_benchmark_mixture(dim=16, components=10, seed=0)
    x_T = noise(512, 16, seed=3)
    ref = exact_sample(gmm, process, x_T)
    den = gmm.denoiser(process)
    for steps, bound in bounds.items():
        top, none = (
            rel_rmse(sd.sample(den, x_T, steps=steps, schedule=KarrasJump(sigma_top=s)), ref)
            for s in (30.0, None)
        )
        assert top < bound * none
