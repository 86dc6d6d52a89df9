"""The Time-Shift Sampler (Li et al. 2024): ``sd.guidance.TimeShift``.

The rule (per sample, ``t > cutoff``: the window's time whose noise level matches ``Var(x_t)``) against a
brute-force argmin; no shift where the statistics already match (the base's prediction to the bit); the
x0 / eps conversion at the shifted time (the authors' DDIM step); exact NFE with every solver family.
``python -m tests.test_time_shift`` measures the FD on the learned digits model with and without it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import TimeShift

F64 = torch.float64
PROCESS = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
W = torch.tensor([[0.9, -0.3, 0.2], [0.1, 1.1, -0.4], [0.3, 0.2, 0.8]], dtype=F64)


def linear_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x @ W.T * (1 + t[:, None] / 2000) + 0.05


def gmm(dim: int = 3) -> sd.toy.GaussianMixture:
    g = torch.Generator().manual_seed(5)
    means = torch.randn(2, dim, dtype=F64, generator=g)
    var = 0.1 + 0.3 * torch.rand(2, dim, dtype=F64, generator=g)
    return sd.toy.GaussianMixture(means, var, torch.tensor([0.4, 0.6], dtype=F64))


def with_variance(n: int, dim: int, v: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rows of per-sample (unbiased) variance exactly ``v``."""
    z = torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    return z * v.sqrt()[:, None] + 0.3


def brute_force(v: float, t: float, window: int, data_var: float = 0.0) -> float:
    best, arg = float("inf"), t
    for j in range(-(window // 2), window // 2 + 1):
        tau = min(max(t + j, PROCESS.t_min), PROCESS.t_max)
        d = abs(v - (float(PROCESS.alpha(tau)) ** 2 * data_var + float(PROCESS.sigma(tau)) ** 2))
        if d < best:
            best, arg = d, tau
    return arg


def test_no_shift_where_the_statistics_match():
    """Rows whose variance is the target at t: t_s = t, and the prediction is the base's."""
    den = gmm(16).denoiser(PROCESS)
    for data_var in (0.0, 0.7):
        ts = TimeShift(den, window=10, data_var=data_var)
        for t in (400.0, 650.0, 998.0):
            target = float(PROCESS.alpha(t)) ** 2 * data_var + float(PROCESS.sigma(t)) ** 2
            x = with_variance(8, 16, torch.full((8,), target, dtype=F64))
            assert torch.equal(ts.shifted_times(x, t), torch.full((8,), t, dtype=F64))
            got, ref = ts(x, t), den(x, t)  # the base at per-sample times t: rounding apart, its prediction
            torch.testing.assert_close(got.x0, ref.x0, rtol=0, atol=1e-14)
            torch.testing.assert_close(got.eps, ref.eps, rtol=0, atol=1e-13)


def test_rule_matches_brute_force():
    """Variances above / below the target move t up / down to the window's best match, clipped at the window
    and at t_max; nothing moves at or below the cutoff, nor at t_max (the prior's noise)."""
    ts = TimeShift(sd.Denoiser(linear_net, PROCESS), window=10, cutoff=300.0)
    v = torch.tensor([0.2, 0.5, 0.55, 0.6, 0.7, 0.9, 1.0, 1.3], dtype=F64)
    x = with_variance(8, 50, v, seed=1)
    for t in (200.0, 300.0, 301.0, 400.0, 555.5, 700.0, 996.0, 999.0):
        got = ts.shifted_times(x, t)
        want = [t if t <= 300 or t == 999 else brute_force(float(vi), t, 10) for vi in x.var(1)]
        assert got.tolist() == want
    got = ts.shifted_times(x, 500.0)
    assert got[0] == 495 and got[-1] == 505  # far off: the window's ends
    sig2 = float(PROCESS.sigma(500.0)) ** 2
    assert (got > 500).tolist() == (x.var(1) > sig2).tolist()
    # per-sample times: each row as at its own scalar time
    times = torch.tensor([250.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0, 999.0], dtype=F64)
    rows = ts.shifted_times(x, times)
    assert rows.tolist() == [float(ts.shifted_times(x[i : i + 1], float(v))[0]) for i, v in enumerate(times)]
    off = TimeShift(ts.base, window=0).shifted_times(x, 500.0)
    assert torch.equal(off, torch.full((8,), 500.0, dtype=F64))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversion_at_the_shifted_time(prediction):
    """The prediction is the base's at t_s (alpha, sigma of t_s), so DDIM's renoising is the authors' step
    x_{t-1} = alpha_{t-1} x0(x_t, t_s) + sigma_{t-1} eps(x_t, t_s)."""
    den = sd.Denoiser(linear_net, PROCESS, prediction=prediction)
    t, t_next = 600.0, 500.0
    x = with_variance(4, 3, PROCESS.sigma(torch.tensor([593.0, 597.0, 604.0, 608.0], dtype=F64)) ** 2, seed=2)
    shift = TimeShift(den, window=20)
    t_s = shift.shifted_times(x, t)
    assert t_s.tolist() == [593.0, 597.0, 604.0, 608.0]
    pred = shift(x, t)
    for i in range(4):
        ref = den(x[i : i + 1], float(t_s[i]))
        a, s = float(PROCESS.alpha(float(t_s[i]))), float(PROCESS.sigma(float(t_s[i])))
        torch.testing.assert_close(pred.x0[i : i + 1], ref.x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pred.eps[i : i + 1], ref.eps, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x[i : i + 1], a * ref.x0 + s * ref.eps, rtol=1e-12, atol=1e-12)
    a1, s1 = float(PROCESS.alpha(t_next)), float(PROCESS.sigma(t_next))
    torch.testing.assert_close(pred.renoise(a1, s1), a1 * pred.x0 + s1 * pred.eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpm_solver", "dpmpp_2m", "unipc", "heun"])
def test_every_solver_family_at_the_same_nfe(solver):
    """No extra network call; with x_T's statistics off the prior's (scaled noise) the run differs."""
    den = gmm(16).denoiser(PROCESS)
    x_T = 1.1 * torch.randn(32, 16, dtype=F64, generator=torch.Generator().manual_seed(3))

    def run(d: sd.Denoiser) -> tuple[torch.Tensor, int]:
        out = sd.sample(d, x_T, 10, solver, generator=torch.Generator().manual_seed(0), return_info=True)
        return out[0], out[1].nfe

    (ref, nfe), (x, nfe_ts) = run(den), run(TimeShift(den, window=20))
    assert nfe_ts == nfe and torch.isfinite(x).all()
    assert not torch.equal(x, ref)
    x0, nfe0 = run(TimeShift(den, window=0))
    assert nfe0 == nfe and torch.allclose(x0, ref, rtol=1e-12, atol=1e-12)


def test_forward_states_of_the_exact_model():
    """What the rule does on states with the training statistics: forward-noised samples of the exact 64-d
    mixture, data_var = their mean per-sample variance. The per-sample variance over d = 64 elements spreads
    by about sqrt(2 / 63) = 18% (and with each sample's content), while the target moves by a few percent
    over the window, so the rule shifts almost every sample to an end of the window, the side of
    Var(x_t) takes (measured: 98.4% / 99.9% / 100% at t = 400 / 700 / 900, w = 40)."""
    law = gmm(64)
    x0 = law.sample(4000, torch.Generator().manual_seed(4))
    data_var = float(x0.var(1).mean())
    ts = TimeShift(law.denoiser(PROCESS), window=40, data_var=data_var)
    z = torch.randn(x0.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    for t, pinned in ((400.0, 0.98), (700.0, 0.995), (900.0, 0.999)):
        a, s = float(PROCESS.alpha(t)), float(PROCESS.sigma(t))
        x = a * x0 + s * z
        shift = ts.shifted_times(x, t) - t
        ends = shift.abs() == 20
        assert float(ends.double().mean()) > pinned
        up, down = (
            float(PROCESS.alpha(t + d) ** 2 * data_var + PROCESS.sigma(t + d) ** 2) for d in (20, -20)
        )
        assert torch.equal((shift > 0)[ends], ((x.var(1) - up).abs() < (x.var(1) - down).abs())[ends])


class _Switch(sd.Denoiser):
    """A base whose prediction jumps at t = 500, declared: eps = 0.3 x above, 0.1 x at and below."""

    def __init__(self) -> None:
        super().__init__(lambda x, t: x * torch.where(t > 500, 0.3, 0.1)[:, None].to(x.dtype), PROCESS)

    def own_breaks(self) -> tuple[float, ...]:
        return (500.0,)


def test_breaks_where_the_shifted_time_meets_the_bases():
    """The base's break b = 500 is met where a sample's t_s = t + j equals it: at t = 500 - j for the j it
    takes (here -5 and +5, variances far below and above the window's noise levels), so the breaks are
    495 .. 505, and ``crossings`` restarts the history after both steps in which the two samples meet it
    (the base's 500 alone: after the first only). Below the cutoff the base's own; across it, the cutoff
    too; ``window=0`` the base's."""
    from steerdiff.sampling import crossings
    from steerdiff.solvers.base import make_grid

    ts = TimeShift(_Switch(), window=10, cutoff=300.0)
    assert ts.breaks() == tuple(float(b) for b in range(495, 506))
    x = with_variance(2, 50, torch.tensor([1e-3, 5.0], dtype=F64), seed=6)
    nodes = [999.0, 700.0, 497.0, 493.0, 300.0]
    t_s = torch.stack([ts.shifted_times(x, t) for t in nodes[1:4]])
    assert t_s.tolist() == [[695.0, 705.0], [492.0, 502.0], [488.0, 498.0]]
    scale = torch.stack([ts(x, t).eps[:, 0] / x[:, 0] for t in nodes[1:4]])
    torch.testing.assert_close(scale, torch.tensor([[0.3, 0.3], [0.1, 0.3], [0.1, 0.1]], dtype=F64))
    grid = make_grid(PROCESS, sd.schedules.Custom(nodes), 5)
    assert crossings(ts, grid) == {1, 2} and crossings(ts.base, grid) == {1}
    assert TimeShift(_Switch(), window=10, cutoff=600.0).breaks() == (500.0,)
    assert TimeShift(_Switch(), window=10, cutoff=502.0).breaks() == (500.0, 502.0, 503.0, 504.0, 505.0)
    assert TimeShift(_Switch(), window=0, cutoff=300.0).breaks() == (500.0,)


def test_the_cutoff_is_a_break_where_the_lowest_shifted_meeting_is_at_it():
    """b = 500 = cutoff + 5 (window 10): the lowest ``t = b - j`` is the cutoff itself. A sample shifted by
    j = +5 just above the cutoff is evaluated above b (t_s = 500.5 at t = 495.5), at the cutoff unshifted
    below it (t_s = 495): the field jumps in any step from (495, 496) to at or below 495, so the cutoff is a
    break. It was left out (no window time strictly below the cutoff), and ``crossings`` missed that step."""
    from steerdiff.sampling import crossings
    from steerdiff.solvers.base import make_grid

    ts = TimeShift(_Switch(), window=10, cutoff=495.0)
    assert ts.breaks() == tuple(float(b) for b in range(495, 506))
    x = with_variance(2, 50, torch.tensor([1e-3, 5.0], dtype=F64), seed=6)
    nodes = [999.0, 495.5, 300.0]
    assert ts.shifted_times(x, 495.5).tolist() == [490.5, 500.5]
    scale = torch.stack([ts(x, t).eps[:, 0] / x[:, 0] for t in nodes[1:]])
    torch.testing.assert_close(scale, torch.tensor([[0.1, 0.3], [0.1, 0.1]], dtype=F64))
    grid = make_grid(PROCESS, sd.schedules.Custom(nodes), 3)
    assert crossings(ts, grid) == {0, 1}  # the old declaration: {0}


class _ExactSwitch(sd.Denoiser):
    """Two exact mixture denoisers, one above t = 500, the other at and below, the jump declared."""

    def __init__(self) -> None:
        above = gmm().denoiser(PROCESS)
        below = sd.toy.GaussianMixture(
            torch.ones(1, 3, dtype=F64), torch.full((1, 3), 0.5, dtype=F64), torch.ones(1)
        ).denoiser(PROCESS)

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.where((t > 500)[:, None], above.net(x, t), below.net(x, t))

        super().__init__(net, PROCESS, prediction="x0")

    def own_breaks(self) -> tuple[float, ...]:
        return (500.0,)


class _Declared(sd.guidance.Guided):
    """``base`` unchanged, with a break of its own at ``at``: the history restarts after a step across it."""

    def __init__(self, base: sd.Denoiser, at: float) -> None:
        super().__init__(base)
        self.at = at

    def evaluate(self, x, t, net_dtype, /, **cond):  # type: ignore[no-untyped-def]
        return self.base.evaluate(x, t, net_dtype, **cond)

    def own_breaks(self) -> tuple[float, ...]:
        return (self.at,)


def test_a_step_shorter_than_spacing_between_declared_breaks_restarts():
    """The base's jump at b = 500 (two exact mixture denoisers) is met at no fixed t when a sample's t_s moves
    to another candidate: a state whose variance matches the noise level at 500.05 is evaluated at t_s =
    499.6 (below b) at t = 497.6 and at 500.2 (above) at t = 497.2, a step of 0.4 < spacing = 1 between the
    declared breaks 497 and 498. ``crossings`` missed it (TimeShift.breaks alone); now every step whose
    windows reach both sides of b restarts the history, and the run equals the one with a break declared
    inside that step (DPM-Solver++(2M) on the exact oracle; before: 2M extrapolated across the jump)."""
    from steerdiff.sampling import crossings
    from steerdiff.solvers.base import make_grid

    ts = TimeShift(_ExactSwitch(), window=10, cutoff=300.0)
    x = with_variance(1, 3, PROCESS.sigma(torch.tensor([500.05], dtype=F64)) ** 2)
    assert [float(ts.shifted_times(x, t)) for t in (497.6, 497.2)] == pytest.approx([499.6, 500.2], abs=1e-9)
    assert not any(497.2 <= b < 497.6 for b in ts.breaks())  # between two declared times
    base = ts.base
    torch.testing.assert_close(ts(x, 497.6).x0, base(x, 499.6).x0, rtol=0, atol=0)
    torch.testing.assert_close(ts(x, 497.2).x0, base(x, 500.2).x0, rtol=0, atol=0)
    assert not torch.allclose(base(x, 499.6).x0, base(x, 500.4).x0, atol=0.1)  # the field jumps at 500
    nodes = [999.0, 700.0, 497.6, 497.2, 300.0, 100.0]
    grid = make_grid(PROCESS, sd.schedules.Custom(nodes), 6)
    assert 2 in crossings(ts, grid)  # before: {1, 3} only
    assert crossings(ts, grid) == crossings(_Declared(ts, 497.4), grid) == {1, 2, 3}
    x_T = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    ours = sd.sample(ts, x_T, solver="dpmpp_2m", schedule=nodes)
    declared = sd.sample(_Declared(ts, 497.4), x_T, solver="dpmpp_2m", schedule=nodes)
    assert torch.equal(ours, declared)
    # the window's reach, b -+ 5: any step that meets (495, 505] restarts, however short; none outside it
    assert ts.crosses(504.9, 504.8) and ts.crosses(495.1, 495.05) and ts.crosses(700.0, 400.0)
    assert not ts.crosses(700.0, 505.2) and not ts.crosses(494.9, 400.0)
    assert not TimeShift(_ExactSwitch(), window=0).crosses(497.6, 497.2)


def test_invert_refuses():
    """The net's time jumps with the state's variance, so the steps up the grid do not undo the steps down:
    sample(invert(x_0)) on the 16-d mixture (DDIM, window 20) misses x_0 by 0.37 / 0.53 at 20 / 100 steps
    (0.096 / 0.021 without). invert refuses it, also under another wrapper and in any slot of a wrapper of
    several denoisers (Denoiser.inner_denoisers: a Composition's second component and a CFG's unconditional
    branch passed before), and inverts its base."""
    den = gmm(16).denoiser(PROCESS)
    x_0 = gmm(16).sample(4, torch.Generator().manual_seed(0))
    zero = torch.zeros(1, 16, dtype=F64)
    wrapped = sd.guidance.Calibrated(TimeShift(den), torch.tensor([0.0], dtype=F64), zero)
    composed = sd.smc.Composition([den, TimeShift(den)], [0.5, 0.5])
    for d in (TimeShift(den), wrapped, composed, sd.guidance.CFG(den, TimeShift(den), 2.0)):
        with pytest.raises(ValueError, match=r"invert: den: TimeShift evaluates the net at a time chosen"):
            sd.invert(d, x_0, 10, "ddim")
    assert torch.isfinite(sd.invert(den, x_0, 10, "ddim")).all()


def test_bad_arguments():
    den = sd.Denoiser(linear_net, PROCESS)
    with pytest.raises(ValueError, match=r"TimeShift: window must be an integer >= 0"):
        TimeShift(den, window=-1)
    with pytest.raises(ValueError, match=r"TimeShift: spacing must be a finite number > 0"):
        TimeShift(den, spacing=0.0)
    with pytest.raises(ValueError, match=r"TimeShift: data_var must be a finite number >= 0"):
        TimeShift(den, data_var=-0.1)
    one = gmm(1).denoiser(PROCESS)  # a single element per sample has no variance: once a silent t - w / 2
    x = torch.randn(4, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"TimeShift: .* x has 1 element per sample; it needs at least 2"):
        TimeShift(one)(x, 500.0)
    torch.testing.assert_close(TimeShift(one, window=0)(x, 500.0).eps, one(x, 500.0).eps, rtol=0, atol=0)
    assert TimeShift(den).cutoff == pytest.approx(299.7) and TimeShift(den).spacing == 1.0
    rf = gmm().denoiser(sd.RectifiedFlow())
    assert TimeShift(rf).spacing == pytest.approx((rf.process.t_max - rf.process.t_min) / 1000)


def digits_fd(n: int = 1024, seeds: tuple[int, ...] = (0, 1)) -> Iterator[str]:
    """FD to the held-out digits (unconditional, ``steerdiff bench epsilon``'s samplers and seeds) without
    and with the shift (window 10, cutoff 300; the authors' data_var = 0 and the digits' mean variance)."""
    from steerdiff.bench.digits import load_models
    from steerdiff.bench.epsilon import SAMPLERS
    from steerdiff.toy import digits as D

    models = load_models()
    data_var = float(models.train[0].flatten(1).var(1).mean())
    settings = {"none": None, "w = 10": (10, 0.0), "w = 10, data_var": (10, data_var)}
    yield f"digits: mean per-sample variance {data_var:.4f}"
    yield "| sampler | " + " | ".join(settings) + " |"
    for solver, steps, schedule in SAMPLERS:
        fds: dict[str, list[float]] = {k: [] for k in settings}
        for seed in seeds:
            x_T = torch.randn(n, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(seed))
            for name, opt in settings.items():
                den = (
                    models.den
                    if opt is None
                    else TimeShift(models.den, opt[0], cutoff=300.0, data_var=opt[1])
                )
                with torch.no_grad():
                    g = torch.Generator().manual_seed(seed + 1)
                    x = sd.sample(den, x_T, steps, solver, schedule, generator=g, label=D.NULL_LABEL)
                fds[name].append(models.frechet(x))
        row = " | ".join(f"{sum(v) / len(v):.2f} ({' / '.join(f'{f:.2f}' for f in v)})" for v in fds.values())
        yield f"| {solver} {steps} | {row} |"


if __name__ == "__main__":
    for line in digits_fd():
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
