"""Processes against their definitions, finite differences and diffusers' noise schedules."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import steerdiff as sd

F64 = torch.float64
N = 1000


def _scaled_linear_betas(b0: float = 0.00085, b1: float = 0.012, n: int = N) -> np.ndarray:
    """diffusers' ``scaled_linear`` betas, in float64."""
    return np.linspace(b0**0.5, b1**0.5, n) ** 2


def _cosine_betas(n: int = N, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``squaredcos_cap_v2`` betas (Nichol & Dhariwal 2021), in float64."""

    def ab(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - ab((i + 1) / n) / ab(i / n), max_beta) for i in range(n)])


PROCESSES = {
    "discrete_betas": lambda: sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, N, dtype=F64)),
    "discrete_alphas_cumprod": lambda: sd.VP.discrete(
        alphas_cumprod=torch.from_numpy(np.cumprod(1 - _scaled_linear_betas()))
    ),
    "discrete_zero_snr": lambda: sd.VP.discrete(
        betas=torch.from_numpy(_scaled_linear_betas()), rescale_zero_snr=True
    ),
    "scaled_linear": lambda: sd.VP.scaled_linear(),
    "vp_linear": lambda: sd.VP.linear(),
    "vp_cosine": lambda: sd.VP.cosine(),
    "ve": lambda: sd.VE(),
    "edm": lambda: sd.EDM(),
    "rectified_flow": lambda: sd.RectifiedFlow(),
    "subvp": lambda: sd.SubVP(),
    "subvp_wide": lambda: sd.SubVP(beta_min=0.05, beta_max=30.0, t_min=1e-5),
    "mr_linear": lambda: sd.MeanReverting(theta_min=0.3, theta_max=8.0, stationary_std=0.5),
    "mr_cosine": lambda: sd.MeanReverting.cosine(100, 0.005, stationary_std=10 / 255),
}
TABLES = (sd.processes.VPDiscrete, sd.processes.MeanRevertingDiscrete)  # integer timesteps
VP_KINDS = [k for k in PROCESSES if k.startswith(("discrete", "scaled", "vp_"))]


@pytest.fixture(params=list(PROCESSES), scope="module")
def process(request):
    return PROCESSES[request.param]()


def _grid(p: sd.Process, n: int = 2001) -> torch.Tensor:
    """``n`` times over ``[t_min, t_max]`` plus, for discrete processes, fractional and integer ones."""
    t = torch.linspace(p.t_min, p.t_max, n, dtype=F64)
    if isinstance(p, TABLES):
        steps = torch.arange(p.t_min, p.t_max + 1, dtype=F64)
        t = torch.cat([t, steps[:-1] + 0.37, steps])
    return t


def test_lam_round_trip(process):
    t = _grid(process)
    lam = process.lam(t)
    assert bool(torch.isfinite(lam).all())
    assert float((process.t_of_lam(lam) - t).abs().max()) < 1e-10
    # and the other way: lam -> t -> lam over the whole lam range
    lo, hi = float(process.lam(process.t_max)), float(process.lam(process.t_min))
    lams = torch.linspace(lo, hi, 3001, dtype=F64)
    assert float((process.lam(process.t_of_lam(lams)) - lams).abs().max()) < 1e-10


def test_lam_is_log_alpha_over_sigma_and_decreasing(process):
    t = _grid(process, 501)[:501]
    ref = torch.log(process.alpha(t) / process.sigma(t))
    assert torch.allclose(process.lam(t), ref, rtol=0, atol=1e-12)
    assert bool((process.lam(t)[1:] < process.lam(t)[:-1]).all())


def _half_log_snr(ac: np.ndarray) -> np.ndarray:
    """``0.5 log(ac / (1 - ac))`` for a VP ``alphas_cumprod`` (``alpha^2``)."""
    return 0.5 * (np.log(ac) - np.log1p(-ac))


def _zero_snr_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Alg. 1 in numpy (sqrt(ac) shifted to end at 0, first kept), last set to 2**-24."""
    ab = np.sqrt(np.cumprod(1 - betas))
    ab = (ab - ab[-1]) * ab[0] / (ab[0] - ab[-1])
    ac = ab**2
    ac[-1] = 2.0**-24
    return ac


def _vp_linear_ac(t: np.ndarray, b0: float = 0.1, b1: float = 20.0) -> np.ndarray:
    """Song et al. 2021 (VP SDE perturbation kernel, App. B): alpha^2 = exp(-b0 t - (b1 - b0) t^2 / 2)."""
    return np.exp(-b0 * t - 0.5 * (b1 - b0) * t**2)


def _vp_cosine_ac(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: alpha^2 = f(t) / f(0), f(t) = cos((t + s) / (1 + s) pi / 2)^2."""
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def _mr_lam(theta_bar: np.ndarray, lam: float) -> np.ndarray:
    """``log(alpha / sigma)`` of mean-reverting diffusion from ``thetabar`` and ``lambda``."""
    return np.log(np.exp(-theta_bar) / (lam * np.sqrt(1 - np.exp(-2 * theta_bar))))


def _irsde_cosine_theta_bar(T: int = 100, eps: float = 0.005, s: float = 0.008) -> np.ndarray:
    """The IR-SDE code's cosine ``thetas_cumsum * dt`` at steps ``0, ..., T``: ``thetas = 1 - a[1:-1]`` of
    ``a_j = f(j / (T + 2)) / f(0)``, ``f(u) = cos((u + s) / (1 + s) pi / 2)^2``, scaled to ``-log(eps)``."""
    f = np.cos((np.arange(T + 3) / (T + 2) + s) / (1 + s) * np.pi / 2) ** 2
    thetas = 1 - (f / f[0])[1:-1]
    cumsum = np.cumsum(thetas) - thetas[0]
    return cumsum * -np.log(eps) / cumsum[-1]


# lam(t) from each kind's own definition, in numpy (integer t for the discrete kinds)
def _subvp_lam(b: np.ndarray) -> np.ndarray:
    """``log(alpha / sigma)`` of the sub-VP kernel from ``B = int_0^t beta``."""
    return -b / 2 - np.log(-np.expm1(-b))


LAM_CLOSED_FORMS = {
    "discrete_betas": lambda t: _half_log_snr(np.cumprod(1 - np.linspace(1e-4, 0.02, N)))[t.astype(int)],
    "discrete_alphas_cumprod": lambda t: _half_log_snr(np.cumprod(1 - _scaled_linear_betas()))[t.astype(int)],
    "discrete_zero_snr": lambda t: _half_log_snr(_zero_snr_alphas_cumprod(_scaled_linear_betas()))[
        t.astype(int)
    ],
    "scaled_linear": lambda t: _half_log_snr(np.cumprod(1 - _scaled_linear_betas()))[t.astype(int)],
    "vp_linear": lambda t: _half_log_snr(_vp_linear_ac(t)),
    "vp_cosine": lambda t: _half_log_snr(_vp_cosine_ac(t)),
    "ve": lambda t: -np.log(0.01 * (50.0 / 0.01) ** t),  # sigma = sigma_min (sigma_max / sigma_min)^t
    "edm": lambda t: -np.log(t),  # alpha = 1, sigma = t
    "rectified_flow": lambda t: np.log((1 - t) / t),  # alpha = 1 - t, sigma = t
    # Song et al. 2021 (sub-VP, App. B): alpha = e^{-B/2}, sigma = 1 - e^{-B}, B = int_0^t beta
    "subvp": lambda t: _subvp_lam(0.1 * t + 19.9 * t**2 / 2),
    "subvp_wide": lambda t: _subvp_lam(0.05 * t + 29.95 * t**2 / 2),
    # Luo et al. 2023: alpha = e^{-thetabar}, sigma = lambda sqrt(1 - e^{-2 thetabar})
    "mr_linear": lambda t: _mr_lam(0.3 * t + 0.5 * (8.0 - 0.3) * t**2, 0.5),
    "mr_cosine": lambda t: _mr_lam(_irsde_cosine_theta_bar()[t.astype(int)], 10 / 255),
}


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_lam_matches_the_closed_form(kind):
    """``lam(t)`` against each process's published definition, computed independently in numpy."""
    p = PROCESSES[kind]()
    if isinstance(p, TABLES):
        t = np.arange(p.t_min, p.t_max + 1, dtype=np.float64)
    else:
        t = np.linspace(p.t_min, p.t_max, 501)
    want = LAM_CLOSED_FORMS[kind](t)
    got = p.lam(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_vp_cosine_keeps_full_precision_near_t_0():
    """With ``s = 0`` the cosine schedule is ``alpha = cos(theta)``, ``sigma = sin(theta)``,
    ``theta = t pi / 2``: ``lam = -log tan(theta)``, exact in float64. ``lam`` and ``t_of_lam`` hold
    that to 1e-14 (relative) down to ``t = 1e-4``; taking ``1 - alpha^2`` from ``alpha`` and ``arccos``
    of ``alpha`` lost ``eps / sigma^2``: 2.4e-10 in ``lam``, 2.1e-9 in the round trip there."""
    for s in (0.0, 0.008):
        p = sd.VP.cosine(s=s, t_min=1e-4)
        t = torch.tensor([1e-4, 1e-3, 1e-2, 0.3, 0.9, 0.99], dtype=torch.float64)
        if s == 0.0:
            torch.testing.assert_close(p.lam(t), -torch.log(torch.tan(t * math.pi / 2)), rtol=1e-14, atol=0)
        torch.testing.assert_close(p.t_of_lam(p.lam(t)), t, rtol=1e-14, atol=0)


def test_coefficients_equal_the_separate_functions(process):
    t = _grid(process, 301)
    a, s, lam = process.coefficients(t)
    for got, want in ((a, process.alpha(t)), (s, process.sigma(t)), (lam, process.lam(t))):
        assert torch.allclose(got, want, rtol=1e-13, atol=1e-13)


def test_sigma_ratio_inverse(process):
    t = _grid(process, 301)[:301]
    s = process.sigma(t) / process.alpha(t)
    torch.testing.assert_close(process.sigma_ratio(t), s, rtol=1e-12, atol=0)
    assert float((process.t_of_sigma_ratio(s) - t).abs().max()) < 1e-10


@pytest.mark.parametrize("kind", VP_KINDS)
def test_vp_is_variance_preserving(kind):
    p = PROCESSES[kind]()
    t = _grid(p)
    assert float((p.alpha(t) ** 2 + p.sigma(t) ** 2 - 1).abs().max()) < 1e-14


def test_closed_forms():
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    rf, edm, ve = sd.RectifiedFlow(), sd.EDM(), sd.VE(0.01, 50.0)
    assert torch.equal(rf.alpha(t), 1 - t) and torch.equal(rf.sigma(t), t)
    assert torch.equal(edm.alpha(t), torch.ones_like(t)) and torch.equal(edm.sigma(t), t)
    assert torch.allclose(ve.sigma(t), 0.01 * (50.0 / 0.01) ** t, rtol=1e-14, atol=0)
    # Song et al. 2021: log alpha = -(b1 - b0) t^2 / 4 - b0 t / 2
    lin = sd.VP.linear(0.1, 20.0)
    assert torch.allclose(lin.alpha(t).log(), -(19.9) * t**2 / 4 - 0.1 * t / 2, rtol=1e-13, atol=0)
    # Song et al. 2021, App. B: sub-VP's kernel N(x0 e^{-B/2}, (1 - e^{-B})^2), B = int_0^t beta
    sub, b = sd.SubVP(0.1, 20.0), 0.1 * t + 19.9 * t**2 / 2
    assert torch.allclose(sub.alpha(t), torch.exp(-b / 2), rtol=1e-14, atol=0)
    assert torch.allclose(sub.sigma(t), 1 - torch.exp(-b), rtol=1e-13, atol=0)
    # Nichol & Dhariwal 2021: alpha^2 = f(t) / f(0), f(t) = cos((t + s) / (1 + s) pi / 2)^2
    cos = sd.VP.cosine()
    tc = torch.linspace(cos.t_min, cos.t_max, 99, dtype=F64)
    f = torch.cos((tc + 0.008) / 1.008 * math.pi / 2) ** 2
    assert torch.allclose(cos.alpha(tc) ** 2, f / math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rtol=1e-12)


def test_derivatives_match_finite_differences(process):
    span = process.t_max - process.t_min
    # interior points, off the integer knots of discrete processes
    t = process.t_min + span * (torch.arange(1, 60, dtype=F64) / 60 + 0.0037)
    h = 1e-6 * span
    for fn, dfn in ((process.alpha, process.d_alpha), (process.sigma, process.d_sigma)):
        fd = (fn(t + h) - fn(t - h)) / (2 * h)
        exact = dfn(t)
        scale = float(exact.abs().max()) + 1e-300
        assert float((fd - exact).abs().max()) / scale < 1e-6, fn.__name__


def test_discrete_lam_linear_between_integers():
    """Between timesteps ``log(sigma/alpha)`` is linear in ``t`` (diffusers' fractional timestep)."""
    p = sd.VP.scaled_linear()
    k = torch.arange(N - 1, dtype=F64)
    for w in (0.25, 0.5, 0.9):
        assert torch.allclose(p.lam(k + w), (1 - w) * p.lam(k) + w * p.lam(k + 1), rtol=0, atol=1e-13)


# -- diffusers' noise schedules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "betas64", "tol32"),
    [
        (
            {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
            _scaled_linear_betas,
            5e-6,
        ),
        ({"beta_schedule": "linear"}, lambda: np.linspace(1e-4, 0.02, N), 5e-6),
        ({"beta_schedule": "squaredcos_cap_v2"}, _cosine_betas, 5e-5),
    ],
)
def test_discrete_alphas_cumprod_match_diffusers(config, betas64, tol32):
    """``alpha(t)^2`` at integer ``t`` is diffusers' ``alphas_cumprod``.

    Against the float64 formula: 1e-10 relative. Against diffusers' own tensor, which is float32:
    ``tol32`` relative (measured 9.3e-7 scaled_linear, 3.6e-7 linear, 1.3e-5 squaredcos_cap_v2:
    float32 roundoff accumulated through the cumulative product).
    """
    diffusers = pytest.importorskip("diffusers")
    b64 = betas64()
    p = sd.VP.scaled_linear() if config["beta_schedule"] == "scaled_linear" else sd.VP.discrete(betas=b64)
    t = torch.arange(N, dtype=F64)
    ours = p.alpha(t) ** 2
    ref64 = torch.from_numpy(np.cumprod(1 - b64))
    assert float(((ours - ref64) / ref64).abs().max()) < 1e-10
    assert float(((p.alphas_cumprod - ref64) / ref64).abs().max()) < 1e-10
    sched = diffusers.DDPMScheduler(num_train_timesteps=N, **config)
    ref32 = sched.alphas_cumprod.to(F64)
    assert float(((ours - ref32) / ref32).abs().max()) < tol32
    # same process from alphas_cumprod
    q = sd.VP.discrete(alphas_cumprod=ref64)
    assert float(((q.alpha(t) ** 2 - ref64) / ref64).abs().max()) < 1e-10


def test_fractional_timesteps_match_diffusers_sigma_to_t():
    """``t_of_sigma_ratio`` is diffusers' Euler ``_sigma_to_t`` (log-sigma interpolation)."""
    diffusers = pytest.importorskip("diffusers")
    p = sd.VP.scaled_linear()
    sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=N, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    ac = p.alphas_cumprod.numpy()
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)  # float64, so the comparison is exact arithmetic
    sigmas = np.exp(np.linspace(log_sigmas[0], log_sigmas[-1], 997))
    sigmas = np.concatenate([sigmas, np.exp(log_sigmas[[0, 1, 7, 500, 998, 999]])])
    ref = np.array([sched._sigma_to_t(s, log_sigmas) for s in sigmas]).ravel()
    ours = p.t_of_sigma_ratio(torch.from_numpy(sigmas)).numpy()
    assert np.abs(ours - ref).max() < 1e-10
    # and the forward map: sigma/alpha at diffusers' fractional timesteps
    assert np.allclose((p.sigma(ours) / p.alpha(ours)).numpy(), sigmas, rtol=1e-12, atol=0)


def test_zero_terminal_snr_matches_diffusers():
    """Lin et al. 2024 rescaling equals diffusers' ``rescale_zero_terminal_snr``, last value 2**-24."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    b = torch.from_numpy(_scaled_linear_betas())
    ref = torch.cumprod(1 - rescale_zero_terminal_snr(b.clone()), 0)  # float64 through diffusers
    assert float(ref[-1]) == 0.0
    # the library function itself (no clamp)
    ours = sd.processes.rescale_zero_terminal_snr(torch.cumprod(1 - b, 0))
    assert float(ours[-1]) == 0.0
    assert float(((ours[:-1] - ref[:-1]) / ref[:-1]).abs().max()) < 1e-12
    # the process: diffusers' Euler sets the last alphas_cumprod to 2**-24
    p = sd.VP.discrete(betas=b, rescale_zero_snr=True)
    assert float(p.alphas_cumprod[-1]) == 2.0**-24
    assert float(((p.alphas_cumprod[:-1] - ref[:-1]) / ref[:-1]).abs().max()) < 1e-12
    assert math.isclose(float(p.lam(p.t_max)), 0.5 * math.log(2.0**-24 / (1 - 2.0**-24)), rel_tol=1e-14)
    sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=N,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
    )
    ref32 = sched.alphas_cumprod.to(F64)
    assert float(ref32[-1]) == 2.0**-24
    assert float(((p.alphas_cumprod - ref32) / ref32).abs().max()) < 1e-4  # float32 (measured 3.8e-5)
    # the same from alphas_cumprod
    q = sd.VP.discrete(alphas_cumprod=torch.cumprod(1 - b, 0), rescale_zero_snr=True)
    assert torch.equal(q.alphas_cumprod, p.alphas_cumprod)


def test_a_schedule_already_rescaled_to_zero_terminal_snr_names_rescale_zero_snr():
    """diffusers' schedulers with ``rescale_betas_zero_snr`` hold betas ending in 1 and (DDIM's)
    alphas_cumprod ending in 0, an infinite last log-SNR: still refused, now with the way to that process
    (the message gave only the range, which such a schedule leaves at its last value alone)."""
    original = sd.VP.scaled_linear().alphas_cumprod
    ac = sd.processes.rescale_zero_terminal_snr(original)
    betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    assert (
        float(betas[-1]) == 1.0 and float(ac[-1]) == 0.0 and bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all())
    )
    hint = (
        ", got a last value of {}: a schedule rescaled to zero terminal SNR (lam = -inf there) is built "
        "from the betas or alphas_cumprod before the rescaling, with rescale_zero_snr=True (which keeps "
        "the last lam finite)"
    )
    for kwargs, name, end in (
        ({"betas": betas}, "betas", "1"),
        ({"alphas_cumprod": ac}, "alphas_cumprod", "0"),
    ):
        with pytest.raises(ValueError) as err:
            sd.VP.discrete(**kwargs)
        range_message = f"VP.discrete: `{name}` must be a 1-D array of at least 2 values in (0, 1)"
        assert str(err.value) == range_message + hint.format(end)
    # another value out of range too, or a last value past the end: the range alone
    for bad in ([0.0, 1.0], [0.1, 1.5]):
        with pytest.raises(ValueError) as err:
            sd.VP.discrete(betas=bad)
        assert str(err.value) == "VP.discrete: `betas` must be a 1-D array of at least 2 values in (0, 1)"
    # the way it names: the rescaled process, last log-SNR finite
    p = sd.VP.discrete(alphas_cumprod=original, rescale_zero_snr=True)
    assert float(p.alphas_cumprod[-1]) == 2.0**-24 and math.isfinite(float(p.lam(p.t_max)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: sd.VP.discrete(),
        lambda: sd.VP.discrete(betas=[0.1, 0.2], alphas_cumprod=[0.9, 0.8]),
        lambda: sd.VP.discrete(betas=[0.1]),
        lambda: sd.VP.discrete(betas=[0.1, 1.0]),
        lambda: sd.VP.discrete(betas=[0.0, 0.1]),
        lambda: sd.VP.discrete(alphas_cumprod=[0.9, 0.95]),
        lambda: sd.VP.discrete(alphas_cumprod=[1.0, 0.5]),
        lambda: sd.VP.discrete(alphas_cumprod=[0.9, 0.0]),
        lambda: sd.VP.linear(beta_min=20.0, beta_max=0.1),
        lambda: sd.VP.linear(beta_min=0.0),
        lambda: sd.VP.cosine(t_min=0.0),
        lambda: sd.VP.cosine(t_max=1.0),
        lambda: sd.VE(sigma_min=50.0, sigma_max=0.01),
        lambda: sd.VE(sigma_min=0.0),
        lambda: sd.EDM(sigma_min=-1.0),
        lambda: sd.EDM(sigma_min=80.0, sigma_max=0.002),
        lambda: sd.RectifiedFlow(t_min=0.0),
        lambda: sd.RectifiedFlow(t_max=1.0),
        lambda: sd.RectifiedFlow(t_min=0.5, t_max=0.4),
    ],
)
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_bare_vp_says_how_to_build_one():
    with pytest.raises(NotImplementedError, match=r"VP\.discrete, VP\.linear"):
        sd.VP().alpha(0.5)


def test_zero_terminal_snr_keeps_lam_monotone_for_ddpm_linear_betas():
    """DDPM's linear betas rescale to alphas_cumprod[998] = 4.2e-9 < 2**-24: the last value is then
    alphas_cumprod[998] / 4 (2**-24 would give lam[995:] = -8.24, -8.53, -8.94, -9.64, -8.32)."""
    betas = torch.linspace(1e-4, 0.02, N, dtype=F64)
    p = sd.VP.discrete(betas=betas, rescale_zero_snr=True)
    ac = sd.processes.rescale_zero_terminal_snr(torch.cumprod(1 - betas, 0))
    assert math.isclose(float(ac[-2]), 4.2133e-9, rel_tol=1e-4)
    assert float(p.alphas_cumprod[-1]) == float(ac[-2]) / 4
    lam = p.lam(torch.arange(N, dtype=F64))
    assert bool((lam[1:] < lam[:-1]).all())
    assert lam[-5:].tolist() == pytest.approx([-8.2425, -8.5348, -8.9448, -9.6425, -10.3357], abs=1e-4)
    assert float(lam[-2] - lam[-1]) == pytest.approx(math.log(2), rel=1e-8)  # sqrt(ac) halved
    # t_of_lam inverts lam on the whole range (before: t_of_lam(-9.0) = 995.26, where lam = -8.32)
    targets = torch.linspace(float(lam[-1]), float(lam[0]), 999, dtype=F64)
    assert float((p.lam(p.t_of_lam(targets)) - targets).abs().max()) < 1e-12
    assert 997 < float(p.t_of_lam(-9.0)) < 998
    # the 500-step trailing grid is monotone in lam, and an SDE step there stays finite (before:
    # h < 0 at the first step, sqrt of a negative variance, reported as "the model returned NaN")
    gmm = sd.toy.GaussianMixture(
        torch.tensor([[1.0, -1.0]], dtype=F64), torch.ones(1, 2, dtype=F64), torch.ones(1)
    )
    grid = sd.solvers.make_grid(p, sd.schedules.get("trailing"), 500)
    assert all(b > a for a, b in zip(grid.lam, grid.lam[1:], strict=False))
    x = sd.sample(
        gmm.denoiser(p),
        torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64),
        steps=500,
        solver="euler_maruyama",
        schedule="trailing",
        generator=torch.Generator().manual_seed(1),
    )
    # the data is N((1, -1), I): 64 samples, mean within 4 standard errors
    assert bool(torch.isfinite(x).all())
    assert float((x.mean(0) - torch.tensor([1.0, -1.0], dtype=F64)).abs().max()) < 4 / 8


def test_zero_terminal_snr_keeps_diffusers_value_where_it_is_monotone():
    # scaled_linear: the rescaled alphas_cumprod[998] = 2.0e-7 > 2**-24, diffusers' value is kept
    p = sd.VP.discrete(betas=torch.from_numpy(_scaled_linear_betas()), rescale_zero_snr=True)
    assert float(p.alphas_cumprod[-1]) == 2.0**-24 < float(p.alphas_cumprod[-2])


def test_discrete_rejects_alphas_cumprod_that_underflow():
    # cumprod(1 - 0.999) underflows to 0 in float64 after ~108 steps: lam would be -inf
    with pytest.raises(ValueError, match=r"positive and strictly decreasing .*index 10[0-9]"):
        sd.VP.discrete(betas=torch.full((200,), 0.999, dtype=F64))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        # before: a complex-linspace RuntimeError, a linspace TypeError, a message that blamed `betas`
        (lambda: sd.VP.scaled_linear(beta_start=-1), ["VP.scaled_linear", "beta_start", "(0, 1)", "-1"]),
        (lambda: sd.VP.scaled_linear(beta_end=1.5), ["beta_end", "(0, 1)", "1.5"]),
        (lambda: sd.VP.scaled_linear(beta_start=0.02, beta_end=0.01), ["beta_start < beta_end", "0.02"]),
        (
            lambda: sd.VP.scaled_linear(num_train_timesteps=2.5),
            ["num_train_timesteps", "integer >= 2", "2.5"],
        ),
        (
            lambda: sd.VP.scaled_linear(num_train_timesteps=0),
            ["num_train_timesteps", "integer >= 2", "got 0"],
        ),
        (lambda: sd.VP.scaled_linear(num_train_timesteps=1), ["num_train_timesteps", "integer >= 2"]),
        (lambda: sd.VP.scaled_linear(beta_start=math.nan), ["beta_start", "nan"]),
        (lambda: sd.VP.discrete(betas="abc"), ["VP.discrete", "betas", "1-d array of real numbers", "'abc'"]),
        (lambda: sd.VP.discrete(betas=[[0.1, 0.2]]), ["betas", "1-d", "(1, 2)"]),
        (lambda: sd.VP.discrete(alphas_cumprod=[0.9j, 0.8]), ["alphas_cumprod", "real numbers"]),
        (
            lambda: sd.VP.discrete(betas=[0.1, 0.2], rescale_zero_snr="yes"),
            ["rescale_zero_snr", "True or False"],
        ),
        (lambda: sd.VP.linear(beta_min="0.1"), ["VP.linear", "beta_min", "> 0", "'0.1'"]),
        (lambda: sd.VP.linear(beta_max=math.inf), ["beta_max", "finite", "inf"]),
        (lambda: sd.VP.linear(beta_min=20.0, beta_max=0.1), ["beta_min < beta_max"]),
        (lambda: sd.VP.linear(t_min=0.0), ["VP.linear", "t_min", "(0, 1)"]),
        (lambda: sd.VP.cosine(s=-0.1), ["VP.cosine", "s must be", ">= 0"]),
        (lambda: sd.VP.cosine(t_min=0.5, t_max=0.4), ["t_min < t_max"]),
        (lambda: sd.VP.cosine(t_max=1.0), ["t_max", "(0, 1)"]),
        (lambda: sd.VE(sigma_min="x"), ["VE", "sigma_min", "> 0", "'x'"]),
        (lambda: sd.VE(sigma_max=math.nan), ["VE", "sigma_max", "nan"]),
        (lambda: sd.VE(sigma_min=50.0, sigma_max=0.01), ["VE", "sigma_min < sigma_max"]),
        (lambda: sd.EDM(sigma_min=0.0), ["EDM", "sigma_min", "> 0"]),
        (lambda: sd.EDM(sigma_max=math.inf), ["EDM", "sigma_max", "finite"]),
        (lambda: sd.EDM(sigma_min=80.0, sigma_max=0.002), ["EDM", "sigma_min < sigma_max"]),
        (lambda: sd.RectifiedFlow(t_min=None), ["RectifiedFlow", "t_min", "(0, 1)", "None"]),
        (lambda: sd.RectifiedFlow(t_max=1.0), ["RectifiedFlow", "t_max", "(0, 1)"]),
        (lambda: sd.RectifiedFlow(t_min=0.5, t_max=0.4), ["RectifiedFlow", "t_min < t_max"]),
        (lambda: sd.SubVP(beta_min=0.0), ["SubVP", "beta_min", "> 0"]),
        (lambda: sd.SubVP(beta_max=math.inf), ["SubVP", "beta_max", "finite"]),
        (lambda: sd.SubVP(beta_min=20.0, beta_max=0.1), ["SubVP", "beta_min < beta_max"]),
        (lambda: sd.SubVP(t_min=1.0), ["SubVP", "t_min", "(0, 1)"]),
        (lambda: sd.SubVP(t_min="0.001"), ["SubVP", "t_min", "(0, 1)", "'0.001'"]),
        (lambda: sd.MeanReverting(theta_max="10"), ["MeanReverting", "theta_max", "> 0"]),
        (lambda: sd.MeanReverting(theta_min=3.0, theta_max=2.0), ["theta_min <= theta_max"]),
        (lambda: sd.MeanReverting(stationary_std=math.inf), ["stationary_std", "finite"]),
        (lambda: sd.MeanReverting(t_min=1.0), ["MeanReverting", "t_min", "(0, 1)"]),
    ],
)
def test_bad_arguments_name_the_argument(make, words):
    with pytest.raises(ValueError) as err:
        make()
    msg = str(err.value)
    assert all(w in msg for w in words), msg


def test_scaled_linear_accepts_numpy_scalars_and_keeps_its_betas():
    p = sd.VP.scaled_linear(np.float64(0.00085), 0.012, np.int64(1000))
    assert p.num_train_timesteps == 1000
    assert np.allclose(p.alphas_cumprod.numpy(), np.cumprod(1 - _scaled_linear_betas()), rtol=1e-14, atol=0)


def test_option_messages_name_the_owner():
    with pytest.raises(ValueError) as e:
        sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 10, dtype=F64), rescale_zero_snr="yes")
    assert str(e.value) == "VP.discrete: rescale_zero_snr must be True or False, got 'yes'"
    with pytest.raises(ValueError) as e:
        sd.MeanReverting(theta_min=0.3, theta_max=8.0, stationary_std=0.5).denoiser(
            lambda x, t: x, 0.0, "flow"
        )
    assert (
        str(e.value)
        == "MeanReverting.denoiser: prediction must be one of ['eps', 'x0', 'v', 'score'], got 'flow'"
    )


def test_vp_discrete_scalar_lam_is_the_tensor_lam_bit_for_bit():
    """A Python time takes a float path (a solver's node, ~20 us of tensor ops less per new time): the
    same IEEE operations as the tensor path, so the same bits, including the range ends and clamping."""
    p = sd.VP.scaled_linear()
    ts = torch.linspace(999, 0, 4001, dtype=torch.float64).tolist() + [i + 0.5 for i in range(999)]
    ts += [0, 999, 1000.5, -3.0, 998.9999999, np.float64(17.25)]
    for t in ts:
        assert float(p.lam(t)) == float(p.lam(torch.tensor(float(t), dtype=torch.float64))), t


_ALL_PROCESSES = [
    sd.VP.scaled_linear(),
    sd.VP.linear(),
    sd.VP.cosine(),
    sd.VE(),
    sd.EDM(),
    sd.RectifiedFlow(),
    sd.SubVP(),
    sd.MeanReverting(),
    sd.MeanReverting.cosine(),
]
# every public method of one time argument, with that argument's name
_TIME_METHODS = [
    ("alpha", "t"),
    ("sigma", "t"),
    ("lam", "t"),
    ("t_of_lam", "lam"),
    ("coefficients", "t"),
    ("d_alpha", "t"),
    ("d_sigma", "t"),
    ("model_time", "t"),
    ("sigma_ratio", "t"),
    ("t_of_sigma_ratio", "s"),
]


@pytest.mark.parametrize("proc", _ALL_PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize(("method", "name"), _TIME_METHODS)
@pytest.mark.parametrize(
    "bad", [None, "0.5", True, math.nan, torch.tensor(math.nan, dtype=F64), torch.tensor([0.5j]), ["a"]]
)
def test_a_bad_time_names_the_method_and_argument(proc, method, name, bad):
    """None, a string, a bool, a complex tensor and a NaN given as a number or a 0-d CPU tensor were torch's
    TypeError deep inside, an IndexError (VP.discrete at NaN) or a silent NaN: a ValueError naming the
    method and its argument."""
    owner = type(proc).__name__
    with pytest.raises(ValueError, match=rf"^{owner}\.{method}: {name} must be a real number"):
        getattr(proc, method)(bad)


@pytest.mark.parametrize("proc", _ALL_PROCESSES, ids=lambda p: type(p).__name__)
def test_process_time_checks_keep_the_values(proc):
    """Numbers, numpy scalars, lists, arrays and integer tensors still give the values of a float64 tensor;
    inf is a limit, not an error; NaN entries of a tensor of times give NaN there (VP.discrete's table
    lookup made an IndexError of them); a negative sigma ratio is refused as a number."""
    t = 0.5 * (proc.t_min + proc.t_max)
    ref = proc.alpha(torch.tensor([t, t], dtype=F64))
    for same in (np.float64(t), np.array([t, t]), [t, t]):
        torch.testing.assert_close(proc.alpha(same).reshape(-1)[:1], ref[:1], rtol=0, atol=0)
    assert proc.alpha(torch.tensor([2])).dtype == F64
    out = proc.sigma(torch.tensor([t, math.nan], dtype=F64))
    assert math.isfinite(float(out[0])) and math.isnan(float(out[1]))
    assert isinstance(proc.t_of_lam(math.inf), torch.Tensor)
    assert isinstance(proc.t_of_sigma_ratio(0.0), torch.Tensor)
    with pytest.raises(ValueError, match=r"t_of_sigma_ratio: s must be a real number >= 0"):
        proc.t_of_sigma_ratio(-1.0)


@pytest.mark.parametrize(
    ("proc", "at_inf", "at_minus_inf"),
    [
        # a table: its ends; closed forms: the limit of t_of_lam(lam) as lam -> +-inf
        (sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, N, dtype=F64)), 0.0, N - 1.0),
        (sd.VP.scaled_linear(), 0.0, 999.0),
        (sd.VP.linear(), 0.0, math.inf),  # alpha = exp(-t^2 ...) > 0 for every t
        (sd.VP.cosine(), 0.0, 1.0),  # alpha(1) = cos(pi / 2) = 0
        (sd.VE(), -math.inf, math.inf),  # sigma = sigma_min ratio^t
        (sd.EDM(), 0.0, math.inf),  # sigma = t
        (sd.RectifiedFlow(), 0.0, 1.0),  # alpha(1) = 0
        (sd.SubVP(), 0.0, math.inf),  # alpha = exp(-B(t) / 2) > 0 for every t
        (sd.MeanReverting(), 0.0, math.inf),  # thetabar(t) grows without bound
        (sd.MeanReverting(theta_min=0.0), 0.0, math.inf),
        (sd.MeanReverting(theta_min=2.0, theta_max=2.0), 0.0, math.inf),
        (sd.MeanReverting.cosine(100), 0.0, 100.0),  # a table: its ends (step 0 the clean x_0)
    ],
    ids=lambda v: repr(v) if isinstance(v, sd.Process) else None,
)
def test_t_of_lam_at_infinite_lam_is_the_limit(proc, at_inf, at_minus_inf):
    """``lam = -inf`` gave NaN on VP.linear and MeanReverting (``inf / inf`` in their closed-form inverses;
    ``0 * inf`` too for a constant theta) while the others give their limit. Now every process gives the
    limit, a float, a 0-d tensor or per entry, and ``t_of_sigma_ratio(inf)`` (``lam = -inf``) with it; as
    ``|lam|`` grows the time moves monotonically towards it."""
    lams = torch.tensor([math.inf, -math.inf], dtype=F64)
    assert proc.t_of_lam(lams).tolist() == [at_inf, at_minus_inf]
    assert float(proc.t_of_lam(math.inf)) == at_inf and float(proc.t_of_lam(-math.inf)) == at_minus_inf
    assert float(proc.t_of_sigma_ratio(math.inf)) == at_minus_inf
    near = proc.t_of_lam(torch.tensor([10.0, 30.0, -10.0, -30.0], dtype=F64)).tolist()
    assert at_inf <= near[1] <= near[0] and near[2] <= near[3] <= at_minus_inf  # monotone towards the limits


# -- equivalent: one process to float32's rounding --------------------------------------------------------


def _float32_table(betas64: np.ndarray) -> sd.VPDiscrete:
    """``VP.discrete`` of ``alphas_cumprod`` formed as diffusers does: ``cumprod(1 - betas)`` in float32."""
    b32 = torch.from_numpy(betas64).to(torch.float32)
    return sd.VP.discrete(alphas_cumprod=torch.cumprod(1.0 - b32, dim=0))


def _float32_scaled_linear(b0: float = 0.00085, b1: float = 0.012) -> sd.VPDiscrete:
    """SD's ``scaled_linear`` table as diffusers forms it: betas ``linspace(...)^2`` and their cumulative
    product, all in float32."""
    b32 = torch.linspace(b0**0.5, b1**0.5, N, dtype=torch.float32) ** 2
    return sd.VP.discrete(alphas_cumprod=torch.cumprod(1.0 - b32, dim=0))


@pytest.mark.parametrize(
    ("name", "table32", "process64"),
    [
        ("scaled_linear", _float32_scaled_linear, sd.VP.scaled_linear),
        (
            "linear",
            lambda: _float32_table(np.linspace(1e-4, 0.02, N)),
            lambda: sd.VP.discrete(betas=np.linspace(1e-4, 0.02, N)),
        ),
        (
            "squaredcos_cap_v2",
            lambda: _float32_table(_cosine_betas()),
            lambda: sd.VP.discrete(betas=_cosine_betas()),
        ),
    ],
)
def test_equivalent_takes_a_float32_table_for_its_float64_schedule(name, table32, process64):
    """A table formed in float32 is the float64 schedule to float32's rounding: 6.1e-7, 8.3e-7 and 2.3e-6 of
    ``sqrt(alpha^2 + sigma^2)`` (scaled_linear, linear, squaredcos_cap_v2), where its ``sigma`` near ``t = 0``
    is off by 1.3e-5, 8.3e-5 and 2.6e-4 relative: the old rule (alpha and sigma to 1e-12 relative) refused
    all three. Equal floats (``rtol=0``) still differ, and say where."""
    p32, p64 = table32(), process64()
    ts = torch.linspace(0, N - 1, 257, dtype=F64)
    scale = torch.hypot(p64.alpha(ts), p64.sigma(ts))
    off = max(
        float(((f(ts) - g(ts)).abs() / scale).max())
        for f, g in ((p32.alpha, p64.alpha), (p32.sigma, p64.sigma))
    )
    rel_sigma = float(((p32.sigma(ts) - p64.sigma(ts)) / p64.sigma(ts)).abs().max())
    assert 1e-7 < off < 3e-6 and rel_sigma > 1e-5, (off, rel_sigma)  # the premise: off by float32, sigma more
    assert sd.processes.equivalent(p32, p64) and sd.processes.equivalent(p64, p32)
    assert sd.processes.difference(p32, p64) is None
    assert not sd.processes.equivalent(p32, p64, rtol=0)
    assert re.fullmatch(
        r"(alpha|sigma) differs by up to \S+ of sqrt\(alpha\^2 \+ sigma\^2\), above rtol=0 \(at t = \S+: \S+ "
        r"against \S+\)",
        sd.processes.difference(p32, p64, rtol=0),
    )
    assert sd.processes.equivalent(p64, sd.VP.discrete(alphas_cumprod=p64.alphas_cumprod), rtol=0)


def test_equivalent_refuses_other_schedules_both_ways_and_says_by_how_much():
    """Other schedules, from float32 or float64 tables, either way round: SD's betas with ``beta_end`` 0.0121
    instead of 0.012 (2.1e-3 of the scale), DDPM's linear betas against SD's (0.25), another kind; the
    message names what differs, by how much and where."""
    sd64, sd32 = sd.VP.scaled_linear(), _float32_scaled_linear()
    near64, near32 = sd.VP.scaled_linear(beta_end=0.0121), _float32_scaled_linear(b1=0.0121)
    ddpm = sd.VP.discrete(betas=np.linspace(1e-4, 0.02, N))
    for p, q, size in [
        (near64, sd64, 2.1e-3),
        (sd64, near64, 2.1e-3),
        (near32, sd64, 2.1e-3),
        (sd64, near32, 2.1e-3),
        (near32, sd32, 2.1e-3),
        (ddpm, sd64, 0.25),
        (sd32, ddpm, 0.25),
    ]:
        assert not sd.processes.equivalent(p, q)
        msg = sd.processes.difference(p, q)
        m = re.fullmatch(
            r"(alpha|sigma) differs by up to (\S+) of sqrt\(alpha\^2 \+ sigma\^2\), above rtol=0.0001 "
            r"\(at t = (\S+): (\S+) against (\S+)\)",
            msg,
        )
        assert m is not None, msg
        assert float(m[2]) == pytest.approx(size, rel=0.1)
        t = float(m[3])
        got = getattr(p, m[1])(t), getattr(q, m[1])(t)
        assert float(m[4]) == pytest.approx(float(got[0]), rel=1e-4)  # t is printed to 6 digits
        assert float(m[5]) == pytest.approx(float(got[1]), rel=1e-4)
    assert sd.processes.difference(sd.EDM(), sd64) == "another kind (EDM against VPDiscrete)"
    assert not sd.processes.equivalent(sd64, sd.VP.cosine())
    for bad in (-1e-4, float("nan"), "1e-4"):
        with pytest.raises(ValueError, match=r"equivalent: rtol"):
            sd.processes.equivalent(sd64, sd32, rtol=bad)
        with pytest.raises(ValueError, match=r"^difference: rtol must be"):  # was named equivalent's
            sd.processes.difference(sd64, sd32, rtol=bad)


def test_equivalent_is_symmetric_over_both_ranges():
    """A table cut short (the first 999 of SD's 1000 ``alphas_cumprod``: ``alpha`` at 999 is its own at 998,
    4.1e-4 of the scale off) was one process with the full table when given first (times over its own range
    only) and not the other way round: ``Coupled([full, short])``, whose grid runs over the first's range to
    999, was accepted. Now refused either way round, at t = 999; formulas that agree beyond a range (EDM to
    80 and to 160) are still one process."""
    full = sd.VP.scaled_linear()
    short = sd.VP.discrete(alphas_cumprod=full.alphas_cumprod[:999])
    for p, q in ((short, full), (full, short)):
        assert not sd.processes.equivalent(p, q)
        m = re.fullmatch(
            r"alpha differs by up to (\S+) of sqrt\(alpha\^2 \+ sigma\^2\), above rtol=0.0001 "
            r"\(at t = 999: .*\)",
            sd.processes.difference(p, q),
        )
        assert m is not None and float(m[1]) == pytest.approx(4.13e-4, rel=0.01)
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    dens = [sd.Denoiser(net, p, prediction="eps") for p in (full, short)]
    for pair in (dens, dens[::-1]):
        with pytest.raises(ValueError, match=r"Coupled: denoisers must share a process.*\(at t = 999"):
            sd.guidance.Coupled(pair)
        with pytest.raises(ValueError, match=r"CFG: cond and uncond must share a process.*\(at t = 999"):
            sd.guidance.CFG(*pair, 2.0)
    assert sd.processes.equivalent(sd.EDM(), sd.EDM(sigma_max=160.0))
    assert sd.processes.equivalent(sd.EDM(sigma_max=160.0), sd.EDM())
    # the scale is the larger of the two's: the same size either way round (q's alone: 24.3 against 0.961)
    lo, hi = sd.MeanReverting.cosine(100, stationary_std=10 / 255), sd.MeanReverting.cosine(100)
    assert (
        sd.processes.difference(lo, hi)[:31]
        == sd.processes.difference(hi, lo)[:31]
        == ("sigma differs by up to 0.961 of")
    )


def test_equivalent_holds_alpha_to_itself_near_zero_terminal_snr():
    """SD's betas rescaled to zero terminal SNR with the last ``alphas_cumprod`` ``2^-26`` and ``2^-28``:
    ``alpha`` at t_max 1.2e-4 against 6.1e-5, 6.1e-5 of the scale apart (within rtol=1e-4), ``lam`` -9.01
    against -9.70. An eps net of the one sampled as the other's is 2.7% off, CFG of an eps net and a v net of
    the two 1.3% (of the same process: 1e-13): they were one process. Now refused, ``alpha`` off by 0.5 of
    itself; the same table formed in float32 (rescaled in float32) is still one with the float64 one."""
    b64 = torch.linspace(0.00085**0.5, 0.012**0.5, N, dtype=F64) ** 2
    zero = sd.VP.discrete(betas=b64, rescale_zero_snr=True)

    def last(v: float) -> sd.VPDiscrete:
        ac = zero.alphas_cumprod.clone()
        ac[-1] = v
        return sd.VP.discrete(alphas_cumprod=ac)

    p, q = last(2.0**-26), last(2.0**-28)
    from .reference import smooth_mixture

    gmm = smooth_mixture()
    x0_net = gmm.denoiser(p).net

    def net(pred: str):  # p's exact eps / v at p's times
        def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x0, a, s = x0_net(x, t), p.alpha(t).reshape(-1, 1), p.sigma(t).reshape(-1, 1)
            eps = (x - a * x0) / s
            return eps if pred == "eps" else a * eps - s * x0

        return f

    x_T = float(p.sigma(p.t_max)) * torch.randn(
        256, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    run = lambda d: sd.sample(d, x_T, steps=10, solver="ddim", schedule="trailing")  # noqa: E731
    ref = run(sd.Denoiser(net("eps"), p, prediction="eps"))
    wrong = run(sd.Denoiser(net("eps"), q, prediction="eps"))
    assert float((wrong - ref).norm() / ref.norm()) > 0.02  # the premise: the other process is 2.7% off
    ts = torch.linspace(0, N - 1, 257, dtype=F64)
    assert float((p.alpha(ts) - q.alpha(ts)).abs().max()) == pytest.approx(6.1e-5, rel=1e-3)  # < 1e-4
    assert torch.equal(p.sigma(ts[:-1]), q.sigma(ts[:-1])) and float(p.lam(999) - q.lam(999)) > 0.69
    for a, b in ((p, q), (q, p)):
        assert re.fullmatch(
            r"alpha differs by up to 0.5 of itself, above 0.01 \(at t = 999: \S+ against \S+\)",
            sd.processes.difference(a, b),
        ), sd.processes.difference(a, b)
    with pytest.raises(ValueError, match=r"share a process.*alpha differs by up to 0.5 of itself"):
        sd.guidance.CFG(
            sd.Denoiser(net("eps"), p, prediction="eps"), sd.Denoiser(net("v"), q, prediction="v"), 2.0
        )
    # float32: SD's betas rescaled in float32 (alpha 1.5e-6 of itself off), and the float32 tables above
    b32 = b64.to(torch.float32)
    ac32 = sd.processes.rescale_zero_terminal_snr(torch.cumprod(1 - b32, 0))
    ac32[-1] = 2.0**-24
    assert sd.processes.equivalent(sd.VP.discrete(alphas_cumprod=ac32.to(F64)), zero)
    assert sd.processes.equivalent(_float32_table(_cosine_betas()), sd.VP.discrete(betas=_cosine_betas()))


def test_equivalent_takes_diffusers_float32_config_for_the_float64_schedule():
    """The process of a diffusers config (its float32 ``alphas_cumprod``) is the float64 one: CFG pairs a
    denoiser of each; one of another ``beta_end`` is refused with what differs."""
    pytest.importorskip("diffusers")
    from steerdiff.integrations.diffusers import process_from_config

    config = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": N,
    }
    p32 = process_from_config(config)
    assert sd.processes.equivalent(p32, sd.VP.scaled_linear()) and not sd.processes.equivalent(
        p32, sd.VP.scaled_linear(), rtol=0
    )
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    sd.guidance.CFG(
        sd.Denoiser(net, p32, prediction="eps"),
        sd.Denoiser(net, sd.VP.scaled_linear(), prediction="eps"),
        2.0,
    )
    other = process_from_config({**config, "beta_end": 0.0121})
    with pytest.raises(ValueError, match=r"share a process, .*: alpha differs by up to 0.0021\d of sqrt"):
        sd.guidance.CFG(
            sd.Denoiser(net, other, prediction="eps"),
            sd.Denoiser(net, sd.VP.scaled_linear(), prediction="eps"),
            2.0,
        )
