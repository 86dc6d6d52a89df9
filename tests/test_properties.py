"""Property-based tests (hypothesis): the library's invariants over random processes, times, grids,
mixtures and weights, each checked against an exact relation or an independent oracle.

* processes: the defining identities (``alpha^2 + sigma^2 = 1`` for VP, ``alpha = 1`` for VE/EDM,
  ``alpha + sigma = 1`` for rectified flow, ``alpha^2 + sigma^2 / lambda^2 = 1`` for IR-SDE),
  ``lam = log(alpha / sigma)``, ``t_of_lam`` inverting ``lam``, ``lam`` strictly decreasing, the
  derivatives against central differences;
* denoiser: every parameterization built from a known ``(x0, eps)`` converts back to it;
* schedules: the documented shape of every named grid (length, order, range, ends) and its defining
  spacing (uniform in ``t``, ``lam`` or ``s^(1/rho)``; karras_jump as a prefix of karras);
* solvers: batch invariance and permutation equivariance (per-row generators for the stochastic
  ones), the exact solution of a single Gaussian (the ODE is linear, so every deterministic solver is
  an affine map of ``x_T``; the closed-form solution is the reference ODE's, and errors shrink with
  the step count), the data-mean trajectory reproduced exactly, and NFE = ``solver.nfe(steps)``;
* the mixture oracle: Tweedie's formula against autograd of ``log_prob``, the noised marginal,
  ``posterior`` against Bayes' rule, ``tilt`` against its definition;
* resamplers: indices in range, the floor/ceil structure of systematic / stratified / residual
  offspring counts, unbiased counts within a Bernstein bound from each scheme's variance, per-row
  generators, ESS.

Every test is derandomized (a fixed example sequence: CI is deterministic) and has no deadline.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import steerdiff as sd
from steerdiff.processes import VPDiscrete
from steerdiff.schedules import AYS_SIGMAS, AYS_TIMESTEPS
from steerdiff.smc import resample as rs
from steerdiff.solvers.base import make_grid

F64 = torch.float64

PROPS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def props(n: int) -> settings:
    return settings(PROPS, max_examples=n)


seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# random processes

KINDS = (
    "vp_discrete",
    "vp_alphas_cumprod",
    "scaled_linear",
    "vp_linear",
    "vp_cosine",
    "ve",
    "edm",
    "rf",
    "subvp",
    "mr",
)


@st.composite
def processes(draw, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    if kind == "vp_discrete":  # random (unsorted) betas, optionally rescaled to zero terminal SNR
        n = draw(st.integers(2, 80))
        lo = draw(st.floats(1e-5, 1e-2))
        hi = draw(st.floats(2e-2, 0.4))
        u = torch.rand(n, generator=_gen(draw(seeds)), dtype=F64)
        return sd.VP.discrete(betas=lo + (hi - lo) * u, rescale_zero_snr=draw(st.booleans()))
    if kind == "vp_alphas_cumprod":
        n = draw(st.integers(2, 80))
        steps = torch.rand(n, generator=_gen(draw(seeds)), dtype=F64) * draw(st.floats(0.02, 0.4)) + 1e-4
        return sd.VP.discrete(alphas_cumprod=torch.exp(-steps.cumsum(0)))
    if kind == "scaled_linear":
        b0 = draw(st.floats(1e-4, 2e-3))
        return sd.VP.scaled_linear(b0, draw(st.floats(5e-3, 0.03)), draw(st.sampled_from([10, 100, 1000])))
    if kind == "vp_linear":
        b0 = draw(st.floats(0.01, 1.0))
        return sd.VP.linear(b0, b0 + draw(st.floats(1.0, 30.0)), draw(st.floats(1e-4, 1e-2)))
    if kind == "vp_cosine":
        return sd.VP.cosine(
            draw(st.floats(0.0, 0.1)), draw(st.floats(1e-4, 1e-2)), draw(st.floats(0.9, 0.999))
        )
    if kind == "ve":
        smin = draw(st.floats(1e-3, 0.1))
        return sd.VE(smin, smin * draw(st.floats(10.0, 1e5)))
    if kind == "edm":
        smin = draw(st.floats(1e-3, 0.1))
        return sd.EDM(smin, smin * draw(st.floats(10.0, 1e5)))
    if kind == "rf":
        return sd.RectifiedFlow(draw(st.floats(1e-4, 1e-2)), draw(st.floats(0.99, 0.9999)))
    if kind == "subvp":
        b0 = draw(st.floats(0.01, 1.0))
        return sd.SubVP(b0, b0 + draw(st.floats(1.0, 30.0)), draw(st.floats(1e-4, 1e-2)))
    th0 = draw(st.floats(0.0, 1.0))
    return sd.MeanReverting(
        th0, th0 + draw(st.floats(0.0, 15.0)) + 0.05, draw(st.floats(0.1, 3.0)), draw(st.floats(1e-4, 1e-2))
    )


def times(p: sd.Process, u: torch.Tensor) -> torch.Tensor:
    """Process times at fractions ``u`` in ``[0, 1]`` of its range, float64."""
    return p.t_min + u.to(F64) * (p.t_max - p.t_min)


fractions = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12)


# ---------------------------------------------------------------------------------------------------
# processes


@props(150)
@given(processes(), fractions)
def test_process_identities(p, us):
    t = times(p, torch.tensor(us))
    a, s, lam = p.alpha(t), p.sigma(t), p.lam(t)
    assert a.dtype == s.dtype == lam.dtype == F64
    assert bool(((a > 0) & (s > 0) & torch.isfinite(lam)).all())
    if isinstance(p, sd.VP):
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(t), rtol=0, atol=1e-14)
    elif isinstance(p, sd.VE | sd.EDM):
        assert bool((a == 1).all())
        if isinstance(p, sd.EDM):
            assert bool((s == t).all())
    elif isinstance(p, sd.RectifiedFlow):
        torch.testing.assert_close(a + s, torch.ones_like(t), rtol=0, atol=1e-15)
    elif isinstance(p, sd.SubVP):
        torch.testing.assert_close(a**2 + s, torch.ones_like(t), rtol=0, atol=1e-15)  # sigma = 1 - alpha^2
    else:
        assert isinstance(p, sd.MeanReverting)
        torch.testing.assert_close(a**2 + (s / p.stationary_std) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(lam, torch.log(a) - torch.log(s), rtol=0, atol=1e-12 * (1 + lam.abs().max()))
    ca, cs, cl = p.coefficients(t)
    torch.testing.assert_close(ca, a, rtol=1e-14, atol=0)
    torch.testing.assert_close(cs, s, rtol=1e-14, atol=0)
    torch.testing.assert_close(cl, lam, rtol=0, atol=1e-13 * (1 + lam.abs().max()))
    torch.testing.assert_close(p.sigma_ratio(t), s / a, rtol=1e-12, atol=0)
    # scalar times (the solvers' path) give the same numbers as tensors
    for ti, li in zip(t.tolist(), lam.tolist(), strict=True):
        assert abs(float(p.lam(ti)) - li) <= 1e-13 * (1 + abs(li))


@props(150)
@given(processes(), fractions)
def test_t_of_lam_inverts_lam(p, us):
    t = times(p, torch.tensor(us))
    span = max(1.0, p.t_max - p.t_min)
    assert float((p.t_of_lam(p.lam(t)) - t).abs().max()) <= 1e-10 * span
    assert float((p.t_of_sigma_ratio(p.sigma_ratio(t)) - t).abs().max()) <= 1e-10 * span
    # and lam -> t -> lam over the process's lam range
    lo, hi = float(p.lam(p.t_max)), float(p.lam(p.t_min))
    lams = lo + torch.tensor(us, dtype=F64) * (hi - lo)
    assert float((p.lam(p.t_of_lam(lams)) - lams).abs().max()) <= 1e-10 * (1 + abs(lo) + abs(hi))


@props(150)
@given(processes(), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=40, unique=True))
def test_lam_strictly_decreasing(p, us):
    t = times(p, torch.tensor(sorted(us)))
    t = t[torch.cat([torch.tensor([True]), t[1:] > t[:-1]])]  # distinct after scaling
    lam = p.lam(t)
    dlam = lam[1:] - lam[:-1]
    # separated times (1e-9 of the range) have strictly ordered lam; for closer ones float round-off
    # of lam's own size may tie them (VP.discrete's interpolation), but never reverse them by more
    sep = (t[1:] - t[:-1]) > 1e-9 * (p.t_max - p.t_min)
    assert bool((dlam[sep] < 0).all()), (t.tolist(), lam.tolist())
    assert bool((dlam <= 4e-16 * (1 + lam[1:].abs())).all())


@props(100)
@given(processes(), fractions)
def test_derivatives_are_central_differences(p, us):
    u = torch.tensor(us, dtype=F64).clamp(0.05, 0.95)
    if isinstance(p, VPDiscrete):  # piecewise in t: away from the integer kinks
        t = torch.floor(u * p.t_max).clamp(max=p.t_max - 1) + 0.1 + 0.8 * u
    else:
        t = times(p, u)
    h = 1e-6 * (p.t_max - p.t_min)
    for f, df in ((p.alpha, p.d_alpha), (p.sigma, p.d_sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        exact = df(t)
        # central differences: O(h^2 f''') truncation plus O(eps |f| / h) round-off
        tol = 1e-6 * exact.abs() + 1e-9 * f(t).abs() / h + 1e-12
        assert bool(((fd - exact).abs() <= tol).all()), (f.__name__, t.tolist(), fd.tolist(), exact.tolist())


# ---------------------------------------------------------------------------------------------------
# denoiser parameterizations


def _target(pred: str, x0, eps, a, s, da, ds):
    """The net output of ``pred`` whose truth is ``(x0, eps)``."""
    return {
        "eps": eps,
        "x0": x0,
        "v": a * eps - s * x0,
        "score": -eps / s,
        "flow": da * x0 + ds * eps,
    }[pred]


@props(150)
@given(processes(), st.sampled_from(sd.denoiser.PREDICTIONS), fractions, seeds, st.booleans())
def test_parameterizations_round_trip(p, prediction, us, seed, per_sample):
    g = _gen(seed)
    n = len(us)
    x0 = torch.randn(n, 3, dtype=F64, generator=g)
    eps = torch.randn(n, 3, dtype=F64, generator=g)
    t = times(p, torch.tensor(us)) if per_sample else times(p, torch.tensor(us[:1])).expand(n)
    a, s, da, ds = (c(t)[:, None] for c in (p.alpha, p.sigma, p.d_alpha, p.d_sigma))
    x = a * x0 + s * eps
    f = _target(prediction, x0, eps, a, s, da, ds)
    seen = []

    def net(xin, t_model):
        seen.append(t_model)
        return f

    den = sd.Denoiser(net, p, prediction=prediction)
    out = den(x, t if per_sample else float(t[0]))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], p.model_time(t), rtol=1e-15, atol=0)  # the net's time input
    # the conversions divide by alpha or sigma (or the flow's a s' - s a'): round-off grows with 1/those
    amin, smin = float(a.min()), float(s.min())
    tol = 1e-10 * max(1.0, 1e-4 / amin, 1e-4 / smin)
    torch.testing.assert_close(out.x0, x0, rtol=0, atol=tol)
    torch.testing.assert_close(out.eps, eps, rtol=0, atol=tol)
    # renoising to another point of the same process is alpha' x0 + sigma' eps
    t2 = float(times(p, torch.tensor([us[-1] / 2])))
    a2, s2 = float(p.alpha(t2)), float(p.sigma(t2))
    if not per_sample:
        torch.testing.assert_close(out.renoise(a2, s2), a2 * x0 + s2 * eps, rtol=0, atol=tol * (1 + a2 + s2))


@props(60)
@given(
    processes(kinds=("mr",)),
    st.sampled_from(["eps", "x0", "v", "score"]),
    st.floats(0.0, 1.0),
    seeds,
)
def test_mean_reverting_denoiser_round_trip(p, prediction, u, seed):
    """``MeanReverting.denoiser``: the net sees ``x = y + mu``; its ``v`` is MRS's
    ``lambda alpha eps - (sigma / lambda) (x0 - mu)``; the result is ``(y0, eps) = (x0 - mu, eps)``."""
    g = _gen(seed)
    mu, x0, eps = (torch.randn(4, 3, dtype=F64, generator=g) for _ in range(3))
    t = float(times(p, torch.tensor([u])))
    a, s, lam = float(p.alpha(t)), float(p.sigma(t)), p.stationary_std
    y = a * (x0 - mu) + s * eps
    f = {
        "eps": eps,
        "x0": x0,
        "v": lam * a * eps - (s / lam) * (x0 - mu),
        "score": -eps / s,
    }[prediction]

    def net(x, t_model, mu):
        torch.testing.assert_close(x, y + mu, rtol=0, atol=1e-14)
        return f

    out = p.denoiser(net, mu, prediction=prediction)(y, t)
    tol = 1e-10 * max(1.0, 1e-4 / a, 1e-4 / s)
    torch.testing.assert_close(out.x0, x0 - mu, rtol=0, atol=tol)
    torch.testing.assert_close(out.eps, eps, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------------
# schedules

DISCRETE_SPACINGS = {"linspace", "leading", "trailing"}
# vp's sigma/alpha at u = 1 and u = eps_s = 1e-3 (k-diffusion's get_sigmas_vp: beta_d = 19.9, beta_min = 0.1)
VP_LEVELS = tuple(math.sqrt(math.expm1(19.9 * u**2 / 2 + 0.1 * u)) for u in (1.0, 1e-3))


def _laplace_levels(n: int) -> np.ndarray:
    """``laplace``'s sigma/alpha before the clamp (mu = 0, beta = 0.5: k-diffusion's expression)."""
    x = np.linspace(0, 1, n)
    return np.exp(-0.5 * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x) + 1e-5))


def _ays_fits(p: sd.Process) -> bool:
    """Whether AYS applies: a 1000-step VP.discrete, or a process whose sigma/alpha range covers the list."""
    if isinstance(p, VPDiscrete) and p.num_train_timesteps == 1000:
        return True
    sig = AYS_SIGMAS["sd15"]
    return (
        float(p.lam(p.t_max)) <= -math.log(sig[0]) + 1e-9
        and float(p.lam(p.t_min)) >= -math.log(sig[-1]) - 1e-9
    )


@props(250)
@given(processes(), st.sampled_from(sd.schedules.available()), st.integers(1, 60))
def test_named_schedules_shape(p, name, n):
    sched = sd.schedules.get(name)
    discrete = isinstance(p, VPDiscrete)
    valid = (discrete and n <= p.num_train_timesteps) if name in DISCRETE_SPACINGS else True
    if name == "lcm":  # LCM(original_steps=50): n of the 50 distillation timesteps, N >= 50
        valid = discrete and n <= 50 <= p.num_train_timesteps
    if name == "ays":
        valid = _ays_fits(p)
    s_lo, s_hi = float(p.sigma_ratio(p.t_min)), float(p.sigma_ratio(p.t_max))
    own = None  # vp / laplace: their own first and last levels
    if name == "vp":  # its levels must lie in the range (to RANGE_RTOL)
        own = VP_LEVELS
        valid = s_lo * (1 - 1e-3) <= own[1] and own[0] <= s_hi * (1 + 1e-3)
    if name == "laplace":  # clamped to the range, where no two nodes clamp to one end
        levels = _laplace_levels(n)
        own = float(levels[0]), float(levels[-1])
        valid = (levels >= s_hi).sum() <= 1 and (levels <= s_lo).sum() <= 1
    if not valid:  # documented refusals: a discrete spacing off VP.discrete / finer than it, AYS off range
        with pytest.raises(ValueError):
            sched(p, n)
        return
    t = sched(p, n)
    assert t.dtype == F64 and t.shape == (n,)
    assert bool((t[1:] < t[:-1]).all())
    assert bool(((t >= p.t_min) & (t <= p.t_max)).all())
    if name in DISCRETE_SPACINGS or name == "lcm":
        assert bool((t == t.round()).all())  # integer timesteps
    # first node: t_max exactly, except leading's (n - 1) (N // n) + steps_offset and lcm's 50 k - 1
    if name == "leading":
        assert float(t[0]) == (n - 1) * (p.num_train_timesteps // n)
    elif name == "lcm":  # the skipping step k = N // 50; every node is k j - 1
        k = p.num_train_timesteps // 50
        assert float(t[0]) == 50 * k - 1 and bool(((t + 1) % k == 0).all())
    elif own is not None:  # t_max where the own top level reaches s_max (within rounding), else below
        assert (float(t[0]) == p.t_max) == (own[0] >= s_hi * (1 - 1e-9)), (own, s_hi, float(t[0]))
    else:
        assert float(t[0]) == p.t_max
    if n >= 2 and own is not None:
        assert (float(t[-1]) == p.t_min) == (own[1] <= s_lo * (1 + 1e-9)), (own, s_lo, float(t[-1]))
    elif n >= 2:
        # last node: t_min, except where the documented spacing ends above it
        above = name == "ays" or (name.startswith("karras_") and n < 15)
        if name == "trailing":  # round(N - (n - 1) N / n) - 1
            assert abs(float(t[-1]) - (p.num_train_timesteps / n - 1)) <= 0.5
        elif name == "lcm":  # at least the lowest distillation timestep, k - 1
            assert float(t[-1]) >= p.num_train_timesteps // 50 - 1
        elif above:
            assert float(t[-1]) > p.t_min
        else:
            assert float(t[-1]) == p.t_min
    # the grid a solver runs on: steps + 1 nodes, lam strictly increasing, clean end for final="zero"
    for final in ("zero", "none"):
        if final == "none" and name in DISCRETE_SPACINGS and n + 1 > p.num_train_timesteps:
            continue
        if final == "none" and name == "lcm" and n + 1 > 50:
            continue
        grid = make_grid(p, sched, n, final)
        assert grid.steps == n and len(grid.t) == n + 1
        assert all(grid.h(i) > 0 for i in range(n))
        if final == "zero":
            assert grid.t[:-1] == t.tolist() and grid.sigma[-1] == 0 and grid.lam[-1] == math.inf
        else:
            assert grid.sigma[-1] > 0 and math.isfinite(grid.lam[-1])


def _uniform(v: torch.Tensor, tol: float) -> None:
    d = v[1:] - v[:-1]
    assert float((d - d.mean()).abs().max()) <= tol * (1 + float(v.abs().max())), v.tolist()


@props(120)
@given(processes(), st.integers(2, 60), st.floats(1.0, 10.0))
def test_schedule_spacings(p, n, rho):
    """Each schedule's defining relation, and how the named variants relate to one another."""
    _uniform(sd.schedules.get("time_uniform")(p, n), 1e-12)
    lsnr = sd.schedules.get("logsnr_uniform")(p, n)
    _uniform(p.lam(lsnr), 1e-10)
    assert torch.equal(sd.schedules.get("exponential")(p, n), lsnr)
    karras = sd.schedules.Karras(rho=rho)
    k = karras(p, n)
    _uniform(p.sigma_ratio(k) ** (1 / rho), 1e-9)
    # karras_jump (no top): the first n of the n + 1 Karras nodes below 15 nodes, else Karras itself
    jump = sd.schedules.KarrasJump(rho=rho)(p, n)
    expect = karras(p, n + 1)[:n] if n < 15 else k
    torch.testing.assert_close(jump, expect, rtol=1e-12, atol=1e-12 * max(1.0, p.t_max))
    # polyexponential: log s on a ramp to the power rho, rho = 1 exponential; kl_optimal: arctan s uniform
    s_min, s_max = float(p.sigma_ratio(p.t_min)), float(p.sigma_ratio(p.t_max))
    if (1 / (n - 1)) ** rho * math.log(s_max / s_min) > 1e-9:  # else the last nodes coincide in float64
        log_s = p.sigma_ratio(sd.schedules.PolyExponential(rho=rho)(p, n)).log()
        want = torch.linspace(1, 0, n, dtype=F64) ** rho * math.log(s_max / s_min) + math.log(s_min)
        assert bool(((log_s - want).abs() <= 1e-10 * (1 + want.abs())).all()), (log_s.tolist(), want.tolist())
    torch.testing.assert_close(
        sd.schedules.get("polyexponential")(p, n), lsnr, rtol=1e-12, atol=1e-12 * max(1.0, p.t_max)
    )
    _uniform(torch.atan(p.sigma_ratio(sd.schedules.get("kl_optimal")(p, n))), 1e-9)


@props(40)
@given(processes(kinds=("ve", "edm", "rf", "vp_linear", "scaled_linear")), st.integers(2, 30))
def test_ays_interpolates_the_published_list(p, n):
    """At 10 nodes AYS is the published list (timesteps for 1000-step VP.discrete, else sigma/alpha
    with the first node at t_max); at other counts log-linear interpolation of it, i.e. the n + 1
    points of lam interpolated linearly over a uniform index (the last, t_min's, dropped)."""
    if not _ays_fits(p):
        return
    t = sd.schedules.get("ays")(p, 10)
    if isinstance(p, VPDiscrete) and p.num_train_timesteps == 1000:
        assert t.tolist() == [float(v) for v in AYS_TIMESTEPS["sd15"]]
    else:
        assert float(t[0]) == p.t_max
        torch.testing.assert_close(p.sigma_ratio(t[1:]), torch.tensor(AYS_SIGMAS["sd15"][1:10], dtype=F64))
    t10 = torch.cat([t, torch.tensor([p.t_min], dtype=F64)])
    lam10 = p.lam(t10)
    if not isinstance(p, VPDiscrete):
        lam10[-1] = -math.log(AYS_SIGMAS["sd15"][-1])
    else:
        lam10[-1] = p.lam(0.0)
    tn = sd.schedules.get("ays")(p, n)
    xs = torch.linspace(0, 1, n + 1, dtype=F64)[:-1] * 10
    j = xs.floor().long().clamp(max=9)
    w = xs - j
    lam_n = (1 - w) * lam10[j] + w * lam10[j + 1]
    torch.testing.assert_close(p.lam(tn), lam_n, rtol=0, atol=1e-9 * (1 + float(lam_n.abs().max())))


# ---------------------------------------------------------------------------------------------------
# solvers on exact mixtures

SOLVERS = sd.solvers.available()
DETERMINISTIC = [n for n in SOLVERS if not sd.solvers.get(n).stochastic]
STOCHASTIC = [n for n in SOLVERS if sd.solvers.get(n).stochastic]
SOLVER_PROCESSES = ("scaled_linear", "vp_discrete", "vp_linear", "vp_cosine", "ve", "edm", "rf", "mr")
SOLVER_SCHEDULES = ("karras_capped", "karras", "logsnr_uniform", "time_uniform")


@st.composite
def mixtures(draw, components=(1, 3), dim=(1, 3), shared_mean=False, full=None):
    k = draw(st.integers(*components))
    d = draw(st.integers(*dim))
    g = _gen(draw(seeds))
    means = torch.randn(1 if shared_mean else k, d, generator=g, dtype=F64).expand(k, d).clone()
    var = torch.exp(
        math.log(0.05) + (math.log(2.0) - math.log(0.05)) * torch.rand(k, d, generator=g, dtype=F64)
    )
    w = 0.2 + torch.rand(k, generator=g, dtype=F64)
    if full if full is not None else draw(st.booleans()):
        q = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=F64))[0]
        cov = q @ torch.diag_embed(var) @ q.mT
        return sd.toy.GaussianMixture(means, cov, w)
    return sd.toy.GaussianMixture(means, var, w)


def _x_T(p: sd.Process, batch: int, dim: int, seed: int) -> torch.Tensor:
    return float(p.sigma(p.t_max)) * torch.randn(batch, dim, generator=_gen(seed), dtype=F64)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12, what: str = "") -> None:
    torch.testing.assert_close(
        a, b, rtol=tol, atol=tol * (1 + float(b.abs().max())), msg=lambda m: f"{what}: {m}"
    )


@props(12)
@given(
    mixtures(),
    processes(kinds=SOLVER_PROCESSES),
    st.sampled_from(SOLVER_SCHEDULES),
    st.integers(1, 8),
    st.sampled_from(["zero", "none"]),
    st.integers(2, 4),
    seeds,
    st.permutations(range(4)),
)
def test_deterministic_solvers_batch_invariant_and_permutation_equivariant(
    gmm, p, schedule, steps, final, batch, seed, perm
):
    den = gmm.denoiser(p)
    x_T = _x_T(p, batch, gmm.dim, seed)
    perm = torch.tensor([i for i in perm if i < batch])
    for name in DETERMINISTIC:

        def run(x, name=name):
            return sd.sample(den, x, steps=steps, solver=name, schedule=schedule, final=final)

        full = run(x_T)
        assert full.shape == x_T.shape and bool(torch.isfinite(full).all())
        for i in range(batch):
            _close(run(x_T[i : i + 1]), full[i : i + 1], what=name)
        _close(run(x_T[perm]), full[perm], what=name)


@props(10)
@given(
    mixtures(),
    processes(kinds=SOLVER_PROCESSES),
    st.sampled_from(SOLVER_SCHEDULES),
    st.integers(1, 6),
    st.integers(2, 3),
    seeds,
)
def test_stochastic_solvers_per_row_generators(gmm, p, schedule, steps, batch, seed):
    """With one generator per row a stochastic sample depends on its own seed only: the same in any
    batch and any order (DESIGN: reproducible per sample regardless of batch size)."""
    den = gmm.denoiser(p)
    x_T = _x_T(p, batch, gmm.dim, seed)
    row_seeds = [seed + 1 + i for i in range(batch)]
    perm = list(reversed(range(batch)))
    for name in STOCHASTIC:

        def run(x, ss, name=name):
            gens = [_gen(s) for s in ss]
            return sd.sample(den, x, steps=steps, solver=name, schedule=schedule, generator=gens)

        full = run(x_T, row_seeds)
        assert bool(torch.isfinite(full).all())
        for i in range(batch):
            _close(run(x_T[i : i + 1], row_seeds[i : i + 1]), full[i : i + 1], what=name)
        _close(run(x_T[perm], [row_seeds[i] for i in perm]), full[perm], what=name)


@props(12)
@given(
    mixtures(components=(1, 1), dim=(1, 4)),
    processes(kinds=SOLVER_PROCESSES),
    st.sampled_from(SOLVER_SCHEDULES),
    st.integers(1, 8),
    st.floats(-2.0, 3.0),
    seeds,
)
def test_single_gaussian_solvers_are_affine_in_x_T(gmm, p, schedule, steps, c, seed):
    """One Gaussian component: the exact denoiser is affine in x, so the ODE and every deterministic
    solver's map ``x_T -> x_0`` is affine: ``F(x1 + c (x2 - x1)) = F(x1) + c (F(x2) - F(x1))``."""
    den = gmm.denoiser(p)
    x1, x2 = _x_T(p, 2, gmm.dim, seed).split(1)
    xc = x1 + c * (x2 - x1)
    for name in DETERMINISTIC:
        out = sd.sample(den, torch.cat([x1, x2, xc]), steps=steps, solver=name, schedule=schedule)
        f1, f2, fc = out.split(1)
        scale = 1.0 + float(torch.cat([x1, x2]).abs().max())
        torch.testing.assert_close(fc, f1 + c * (f2 - f1), rtol=0, atol=1e-11 * scale * (1 + abs(c)))


def _closed_form(gmm: sd.toy.GaussianMixture, p: sd.Process, x_T: torch.Tensor) -> torch.Tensor:
    """One diagonal Gaussian N(mu, S): in ``y = x / alpha``, ``s = sigma / alpha`` the flow is
    ``dy/ds = (y - mu) s / (S + s^2)``, so ``(y - mu) / sqrt(S + s^2)`` is constant; the default sample
    is the denoised estimate ``mu + S / (S + s^2) (y - mu)`` at ``t_min``."""
    mu, var = gmm.means[0], gmm.variances[0]
    s_T, s_0 = float(p.sigma_ratio(p.t_max)), float(p.sigma_ratio(p.t_min))
    y = x_T / float(p.alpha(p.t_max)) - mu
    y_0 = y * ((var + s_0**2) / (var + s_T**2)).sqrt()
    return mu + var / (var + s_0**2) * y_0


@props(5)
@given(
    mixtures(components=(1, 1), dim=(3, 4), full=False),
    processes(kinds=("scaled_linear", "vp_linear", "vp_cosine", "ve", "edm", "rf", "mr")),
    st.sampled_from(["logsnr_uniform", "karras"]),
    seeds,
)
def test_single_gaussian_closed_form_and_convergence(gmm, p, schedule, seed):
    """The reference ODE is the closed-form flow, and every deterministic solver converges to it: from
    12/24 to 96 steps (8x / 4x finer) the error falls by at least 2^(3 q) / 2^(2 q) for ``q = 1/2`` (first
    order: DDIM, Euler), ``q = 1`` (the rest, of order >= 2, though a multistep method's first-order
    warm-up step limits it to global order 2).
    Over 60 random draws the largest ratio of err(96) to that bound was 0.37."""
    x_T = _x_T(p, 3, gmm.dim, seed)
    exact = _closed_form(gmm, p, x_T)
    ref = gmm.reference_ode(x_T, p, p.t_max, p.t_min, denoise=True)
    torch.testing.assert_close(ref, exact, rtol=0, atol=1e-8 * (1 + float(exact.abs().max())))
    for name in DETERMINISTIC:
        err = {}
        for steps in (12, 24, 96):
            x = sd.sample(gmm.denoiser(p), x_T, steps=steps, solver=name, schedule=schedule)
            err[steps] = float((x - exact).norm() / exact.norm())
        q = 0.5 if sd.solvers.get(name).order == 1 else 1.0
        assert err[96] <= max(err[12] / 2 ** (3 * q), err[24] / 2 ** (2 * q)), (name, err)


class _Zero:
    """A noise source that draws zeros: a stochastic solver's transition means, step by step."""

    def __call__(self, t_from: float, t_to: float, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like)


@props(10)
@given(
    mixtures(components=(1, 3), dim=(1, 3), shared_mean=True),
    processes(kinds=SOLVER_PROCESSES),
    st.sampled_from(SOLVER_SCHEDULES),
    st.integers(1, 6),
    st.sampled_from(["zero", "none"]),
)
def test_mean_trajectory_is_exact(gmm, p, schedule, steps, final):
    """Components sharing one mean ``mu``: along ``x_t = alpha_t mu`` the exact denoiser is ``mu`` and
    ``eps = 0``, so every solver (the stochastic ones with zero noise: their transition means) stays on
    it exactly and returns ``mu`` (``final="zero"``) or ``alpha(t_N) mu`` (``final="none"``); and its NFE
    is the documented ``solver.nfe(steps)``.

    Except Euler-Maruyama (and Flow-GRPO's SDE, the same step where ``eps = 0``), a plain Euler step in
    process time: on the line its step is
    ``x_1 = (1 + f_0 dt_0) x_0`` with ``f = d log alpha / dt``, which is ``alpha_1 mu`` only where alpha
    is linear in t; that first step (the denoised estimate ``mu`` into a clean end) is what it must give.
    """
    mu = gmm.means[:1].expand(2, -1)
    den = gmm.denoiser(p)
    grid = make_grid(p, sd.schedules.get(schedule), steps, final)
    x_T = grid.alpha[0] * mu
    for name in SOLVERS:
        states: list[torch.Tensor] = []
        x, info = sd.sample(
            den,
            x_T,
            steps=steps,
            solver=name,
            schedule=schedule,
            final=final,
            generator=_Zero(),
            return_info=True,
            callback=lambda d, states=states: states.append(d["x"]),
        )
        assert info.nfe == info.solver.nfe(steps, clean_end=final == "zero"), name
        if name not in ("euler_maruyama", "flow_sde"):
            _close(x, grid.alpha[-1] * mu, 1e-11, name)
            continue
        t0 = torch.tensor(grid.t[0], dtype=F64)
        first = (
            1.0
            if grid.is_final_clean(0)
            else grid.alpha[0] * (1 + float(p.d_alpha(t0) / p.alpha(t0)) * (grid.t[1] - grid.t[0]))
        )
        _close(states[0], first * mu, 1e-11, name)


# ---------------------------------------------------------------------------------------------------
# the Gaussian-mixture oracle


@props(60)
@given(mixtures(components=(1, 4), dim=(1, 4)), st.floats(0.05, 1.0), st.floats(0.05, 3.0), seeds)
def test_tweedie_and_noised_marginal(gmm, alpha, sigma, seed):
    """``E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha`` (Tweedie) with the gradient by
    autograd of ``log_prob``, and ``log_prob`` at ``(alpha, sigma)`` is the mixture of
    ``N(alpha mu_k, alpha^2 S_k + sigma^2 I)`` evaluated independently (torch.distributions)."""
    x = torch.randn(5, gmm.dim, generator=_gen(seed), dtype=F64) * (alpha + sigma)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(xr, alpha, sigma).sum(), xr)
    torch.testing.assert_close(
        gmm.denoise(x, alpha, sigma), (x + sigma**2 * grad) / alpha, rtol=1e-9, atol=1e-9
    )
    cov = alpha**2 * gmm.covariance_matrices + sigma**2 * torch.eye(gmm.dim, dtype=F64)
    comp = torch.distributions.MultivariateNormal(alpha * gmm.means, covariance_matrix=cov)
    ref = torch.logsumexp(comp.log_prob(x[:, None, :]) + gmm.weights.log(), dim=-1)
    torch.testing.assert_close(gmm.log_prob(x, alpha, sigma), ref, rtol=1e-10, atol=1e-10)


@props(60)
@given(
    mixtures(components=(1, 4), dim=(1, 4)),
    st.integers(1, 4),
    st.floats(0.05, 2.0),
    seeds,
)
def test_posterior_is_bayes_rule(gmm, m, noise_std, seed):
    """For ``y = A x + s n``: ``log p(x | y) - log p(x) - log N(y; A x, s^2 I) = -log p(y)`` for every x,
    with ``p(y) = sum_k w_k N(y; A mu_k, A S_k A^T + s^2 I)`` computed independently."""
    g = _gen(seed)
    A = torch.randn(m, gmm.dim, generator=g, dtype=F64)
    y = torch.randn(m, generator=g, dtype=F64) * 2
    post = gmm.posterior(A, y, noise_std)
    x = gmm.sample(6, generator=g) + 0.3 * torch.randn(6, gmm.dim, generator=g, dtype=F64)
    lik = torch.distributions.Normal(x @ A.T, noise_std).log_prob(y).sum(-1)
    cov_y = A @ gmm.covariance_matrices @ A.T + noise_std**2 * torch.eye(m, dtype=F64)
    log_py = torch.logsumexp(
        torch.distributions.MultivariateNormal(gmm.means @ A.T, covariance_matrix=cov_y).log_prob(y)
        + gmm.weights.log(),
        dim=0,
    )
    gap = post.log_prob(x) - gmm.log_prob(x) - lik
    torch.testing.assert_close(gap, -log_py.expand(6), rtol=0, atol=1e-8 * (1 + float(log_py.abs())))
    assert abs(float(post.weights.sum()) - 1) < 1e-12


@props(60)
@given(mixtures(components=(1, 4), dim=(1, 4)), st.booleans(), st.floats(0.0, 2.0), seeds)
def test_tilt_is_its_definition(gmm, quadratic, q_scale, seed):
    """``log p_r(x) - log p(x) - r(x) = -log Z`` for ``r(x) = b^T x - x^T Q x / 2`` (Q positive
    semi-definite: always normalizable), with ``log Z = tilt_log_normalizer``."""
    g = _gen(seed)
    d = gmm.dim
    b = torch.randn(d, generator=g, dtype=F64)
    q = None
    if quadratic:
        r = torch.randn(d, d, generator=g, dtype=F64)
        q = q_scale * r @ r.T / d
    tilted = gmm.tilt(b, q)
    x = gmm.sample(6, generator=g)
    rew = x @ b - (0.0 if q is None else 0.5 * ((x @ q) * x).sum(-1))
    gap = tilted.log_prob(x) - gmm.log_prob(x) - rew
    log_z = gmm.tilt_log_normalizer(b, q)
    torch.testing.assert_close(gap, torch.full_like(gap, -log_z), rtol=0, atol=1e-8 * (1 + abs(log_z)))


# ---------------------------------------------------------------------------------------------------
# resamplers

REPS = 20_000


@st.composite
def log_weights(draw):
    n = draw(st.integers(1, 12))
    vals = draw(st.lists(st.floats(-30.0, 30.0), min_size=n, max_size=n))
    zero = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if all(zero):
        zero[draw(st.integers(0, n - 1))] = False
    lw = torch.tensor(vals, dtype=F64)
    return torch.where(torch.tensor(zero), torch.tensor(-math.inf, dtype=F64), lw)


def _bernstein(
    var: torch.Tensor, bound: torch.Tensor | float, reps: int, delta: float = 1e-9
) -> torch.Tensor:
    """Deviation ``eps`` of a mean of ``reps`` i.i.d. draws with variance ``var`` and ``|X - EX| <= bound``
    exceeded with probability at most ``delta``: Bernstein's inequality,
    ``P(|mean - EX| >= eps) <= 2 exp(-n eps^2 / (2 var + 2 bound eps / 3))``, solved for ``eps``."""
    lg = math.log(2 / delta)
    b = torch.as_tensor(bound, dtype=F64) * lg / 3
    return (b + (b * b + 2 * reps * var * lg).sqrt()) / reps


@props(40)
@given(log_weights(), seeds)
@example(torch.zeros(10, dtype=F64), 0)  # N W_i = 0.99...9 in float64 (residual kept none of them)
@example(torch.tensor([0.0, -math.inf, 0.0, 0.0, 0.0, 0.0, 0.0, -math.inf, 0.0], dtype=F64), 1)
def test_resamplers_structure_and_unbiased_counts(log_w, seed):
    n = log_w.numel()
    w = torch.softmax(log_w, 0)
    nw = n * w
    fl = (nw + 1e-9).floor()  # an integer N W_i up to round-off is that integer
    frac = nw - fl
    left = n - fl.sum()  # residual's multinomial draws
    rows = log_w.expand(REPS, n).contiguous()
    # per scheme: (variance of O_i or an upper bound of it, bound on |O_i - N W_i|)
    theory = {
        "multinomial": (nw * (1 - w), float(n)),
        "stratified": (nw * (1 - w), 2.0),  # Var <= multinomial's (Douc et al. 2005)
        "systematic": (frac * (1 - frac), 1.0),  # O_i in {floor, ceil}: a Bernoulli(frac) above floor
        "residual": (
            frac * (1 - frac / left) if left > 0 else torch.zeros(n, dtype=F64),
            max(float(left), 0.0),
        ),
    }
    for name, (var, bound) in theory.items():
        idx = rs.get(name)(rows, _gen(seed))
        assert idx.shape == (REPS, n) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < n
        o = rs.offspring(idx).to(F64)
        assert bool((o.sum(-1) == n).all())
        assert bool((o[:, w == 0] == 0).all()), name  # a zero weight is never drawn
        slack = 1e-9
        if name == "systematic":  # equally spaced points in an interval of length W_i
            assert bool(((o >= fl - slack) & (o <= torch.ceil(nw - slack) + slack)).all()), name
        elif name == "stratified":  # one point per stratum: |O_i - N W_i| < 2
            assert bool(((o - nw).abs() < 2).all()), name
        elif name == "residual":
            assert bool(((o >= fl - slack) & (o <= fl + left + slack)).all()), name
        tol = _bernstein(var, bound, REPS) + 1e-9
        dev = (o.mean(0) - nw).abs()
        assert bool((dev <= tol).all()), (name, dev.tolist(), tol.tolist())


@props(30)
@given(st.lists(log_weights(), min_size=2, max_size=4), seeds)
def test_resamplers_rows_use_their_own_generator(rows_lw, seed):
    """``generator`` a list: row b's indices are what resampling row b alone with generator[b] gives."""
    n = min(lw.numel() for lw in rows_lw)
    lw = torch.stack([r[:n] for r in rows_lw])
    lw[:, 0] = torch.where(torch.isinf(lw).all(-1), 0.0, lw[:, 0])  # keep every row a distribution
    for name, fn in rs.RESAMPLERS.items():
        both = fn(lw, [_gen(seed + b) for b in range(lw.shape[0])])
        for b in range(lw.shape[0]):
            assert torch.equal(both[b], fn(lw[b : b + 1], [_gen(seed + b)])[0]), name


@props(80)
@given(log_weights(), st.floats(-100.0, 100.0))
def test_ess(log_w, shift):
    n = log_w.numel()
    w = torch.softmax(log_w, 0)
    e = float(rs.ess(log_w[None])[0])
    assert abs(e - 1 / float((w * w).sum())) <= 1e-10 * e
    assert 1 - 1e-12 <= e <= n + 1e-12
    assert abs(float(rs.ess((log_w + shift)[None])[0]) - e) <= 1e-10 * e
