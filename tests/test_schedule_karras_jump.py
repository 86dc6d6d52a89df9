"""``karras_jump`` (Karras nodes whose last point is replaced by the jump to the clean state, and
its optional top and floor) and ``karras_capped``, the sampler's default (the top at 30, the floor
at 0.03)."""

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


def test_without_a_top_most_nodes_lie_above_30_where_s_max_is_large() -> None:
    """The counts KarrasJump's docstring quotes, nodes of 10 above s = 30: zero terminal SNR (SD's and
    DDPM's betas) 7 and 8, rectified flow 5 (the docstring said 6)."""
    sd_zero = sd.VP.discrete(
        betas=torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2, rescale_zero_snr=True
    )
    for process, above in ((sd_zero, 7), (ZERO_SNR, 8), (sd.RectifiedFlow(), 5)):
        t = KarrasJump()(process, 10)
        assert int((process.sigma(t) / process.alpha(t) > 30).sum()) == above


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


@pytest.mark.parametrize("process", [ZERO_SNR, sd.RectifiedFlow(), sd.EDM()], ids=["zero_snr", "flow", "edm"])
def test_from_fifty_steps_more_steps_lead_into_the_ramp(process) -> None:
    """n >= 50: after t_max, m - 1 = n // 50 nodes at s_max (30 / s_max)^(j / m), then the ramp
    from 30 of n - m + 1 points without its first (n - m + 1 >= 15: the whole ramp to s_min)."""
    s_max, s_min = (math.exp(-float(process.lam(t))) for t in (process.t_max, process.t_min))
    a, b = 30.0 ** (1 / 7), s_min ** (1 / 7)
    for n in (49, 50, 99, 100, 230):
        t = KarrasJump(sigma_top=30)(process, n)
        s = (process.sigma(t) / process.alpha(t)).numpy()
        m = 1 + n // 50
        top = [s_max * (30 / s_max) ** (j / m) for j in range(1, m)]
        ramp = [(a + i / (n - m) * (b - a)) ** 7 for i in range(1, n - m + 1)]
        assert len(t) == n and float(t[0]) == process.t_max and float(t[-1]) == process.t_min
        assert s[1:] == pytest.approx(top + ramp, rel=1e-9)


def test_karras_capped_is_the_default_and_karras_jump_with_a_top_at_30_and_a_floor_at_003() -> None:
    assert sd.sampling.DEFAULT_SCHEDULE == "karras_capped"
    capped = sd.schedules.get("karras_capped")
    assert capped.sigma_top == 30.0 and capped.sigma_floor == 0.03 and capped.max_nodes == 15
    assert capped.rho == 7.0
    for process in (ZERO_SNR, sd.RectifiedFlow(), sd.VP.scaled_linear()):
        for n in (3, 10, 20, 60):
            assert torch.equal(capped(process, n), KarrasJump(sigma_top=30, sigma_floor=0.03)(process, n))
    # s_max = 14.6 under SD betas: no top; s_min = 0.029: the floor moves the nodes by under 3% (measured
    # 0.8%, 1.3%, 2.4% at 2, 3, 14 nodes; the docstring said "no change")
    sdp = sd.VP.scaled_linear()
    for n in (3, 10, 14):
        s, s_jump = ((sdp.sigma(t) / sdp.alpha(t)).numpy() for t in (capped(sdp, n), KarrasJump()(sdp, n)))
        assert s == pytest.approx(s_jump, rel=3e-2)
    for n in (15, 20, 60):
        assert torch.equal(capped(sdp, n), KarrasJump()(sdp, n))


@pytest.mark.parametrize("process", [ZERO_SNR, sd.RectifiedFlow(), sd.EDM()], ids=["zero_snr", "flow", "edm"])
def test_below_max_nodes_the_ramp_ends_at_the_floor(process) -> None:
    """s_min = 1e-2 / 1e-3 / 2e-3 < 0.03: below 15 nodes the ramp of n + 1 points ends at 0.03 (its
    last point is the jump's); from 15 on it runs to s_min, as without the floor."""
    s_max = math.exp(-float(process.lam(process.t_max)))
    a, b = 30.0 ** (1 / 7), 0.03 ** (1 / 7)
    floor = KarrasJump(sigma_top=30, sigma_floor=0.03)
    for n in (2, 5, 10, 14):
        t = floor(process, n)
        s = (process.sigma(t) / process.alpha(t)).numpy()
        assert float(t[0]) == process.t_max
        assert s[1:] == pytest.approx([(a + i / n * (b - a)) ** 7 for i in range(1, n)], rel=1e-9)
    for n in (15, 20, 60):
        assert torch.equal(floor(process, n), KarrasJump(sigma_top=30)(process, n))
    # the floor is no bound where it would not lie inside the ramp, nor with an explicit sigma_min
    assert torch.equal(KarrasJump(sigma_floor=2 * s_max)(process, 10), KarrasJump()(process, 10))
    explicit = KarrasJump(sigma_min=0.01, sigma_floor=0.03)(process, 10)
    assert torch.equal(explicit, KarrasJump(sigma_min=0.01)(process, 10))
    for bad in (0, -1.0, math.nan, math.inf, "0.03"):
        with pytest.raises(ValueError, match="sigma_floor"):
            KarrasJump(sigma_floor=bad)


FLOOR_CASES = [(sd.RectifiedFlow(), 1.0), (sd.EDM(), 80.0)]


@pytest.mark.parametrize(("process", "scale"), FLOOR_CASES, ids=["flow", "edm"])
def test_the_floor_cuts_the_default_error_of_short_runs(process, scale) -> None:
    """Default solver, 16-dim mixture, 10 steps: the floor takes the error below 0.6 of that without.
    Measured: rectified flow 0.42 (0.100 vs 0.241), EDM 0.45 (0.083 vs 0.185)."""
    gmm = sd.toy.default_benchmark_mixture(dim=16, components=10, seed=0)
    x_T = noise(512, 16, seed=3) * scale
    ref = exact_sample(gmm, process, x_T)
    den = gmm.denoiser(process)
    with_floor, without = (
        rel_rmse(sd.sample(den, x_T, steps=10, schedule=KarrasJump(sigma_top=30, sigma_floor=f)), ref)
        for f in (0.03, None)
    )
    assert with_floor < 0.6 * without


def test_the_split_top_leaves_no_error_floor(monkeypatch) -> None:
    """Default solver, 16-d mixture under rectified flow: with one top step at every n the error
    stalls at the step's own (measured 1.9e-5, 1.2e-5, 1.2e-5 at 200, 400, 800 steps); with
    1 + n // 50 of them it keeps falling (1.2e-5, 7.7e-7, 5.0e-8)."""
    gmm, process = sd.toy.default_benchmark_mixture(dim=16), sd.RectifiedFlow()
    x_T = noise(256, 16, seed=0)
    ref = exact_sample(gmm, process, x_T)
    den = gmm.denoiser(process)
    split = [rel_rmse(sd.sample(den, x_T, steps=n), ref) for n in (200, 800)]
    assert split[1] < split[0] / 50 and split[1] < 2e-7
    monkeypatch.setattr(sd.schedules, "TOP_EVERY", 10**9)
    one = [rel_rmse(sd.sample(den, x_T, steps=n), ref) for n in (200, 800)]
    assert one[1] > 0.5 * one[0] and one[1] > 5e-6


@pytest.mark.parametrize(
    ("process", "errors"),
    [
        (sd.VP.scaled_linear(), ((0.0755, 0.1327), (0.0178, 0.0321))),
        (sd.RectifiedFlow(), ((0.1635, 0.3261), (0.0862, 0.5038))),
    ],
    ids=["sd-betas", "rectified-flow"],
)
def test_final_none_on_the_default_ends_above_t_min_and_nearer_the_exact_state(process, errors) -> None:
    # sample's docstring: with final="none" the default's short grids end above t_min (no clean jump
    # follows to cover the lowest noise), yet nearer the exact ODE state at t_min than the whole Karras
    # ramp, which ends there (4-component 8-d mixture, 256 samples, 5 and 10 steps)
    g = torch.Generator().manual_seed(0)
    gmm = sd.toy.GaussianMixture(
        torch.randn(4, 8, generator=g, dtype=F64) * 2, torch.full((4, 8), 0.25), [1.0] * 4
    )
    x_T = torch.randn(256, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = gmm.reference_ode(x_T, process, process.t_max, process.t_min)
    den = gmm.denoiser(process)
    for steps, (ours, karras) in zip((5, 10), errors, strict=True):
        x = sd.sample(den, x_T, steps=steps, final="none")
        ramp = sd.sample(den, x_T, steps=steps, final="none", schedule="karras")
        assert rel_rmse(x, ref) == pytest.approx(ours, abs=1e-4)
        assert rel_rmse(ramp, ref) == pytest.approx(karras, abs=1e-4)
    grid = sd.solvers.base.make_grid(process, sd.schedules.get("karras_capped"), 10, "none")
    assert float(process.sigma_ratio(grid.t[-1])) > 2 * float(process.sigma_ratio(process.t_min))
    assert sd.solvers.base.make_grid(process, sd.schedules.get("karras"), 10, "none").t[-1] == pytest.approx(
        process.t_min
    )
