"""The k-diffusion / ComfyUI schedules against their published expressions, written here in numpy (k-diffusion
is not installed): ``get_sigmas_polyexponential``, ``get_sigmas_vp``, ``get_sigmas_laplace`` and ComfyUI's
``kl_optimal``, without the final 0 (``sd.sample``'s ``final="zero"``); plus their limiting cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

import steerdiff as sd
from steerdiff.schedules import KLOptimal, Laplace, PolyExponential, VPUniform

F64 = torch.float64
PROCESSES = {
    "vp_linear": sd.VP.linear(),
    "sd": sd.VP.scaled_linear(),
    "edm": sd.EDM(),
    "rectified_flow": sd.RectifiedFlow(),
    "subvp": sd.SubVP(),
}


def _s(p: sd.Process, t: torch.Tensor | float) -> np.ndarray:
    """``sigma / alpha`` at ``t`` (k-diffusion's sigma)."""
    t = torch.as_tensor(t, dtype=F64)
    return (p.sigma(t) / p.alpha(t)).numpy()


def _ends(p: sd.Process) -> tuple[float, float]:
    return float(_s(p, p.t_min)), float(_s(p, p.t_max))


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    ramp = np.linspace(1, 0, n) ** rho
    return np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))


def vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> np.ndarray:
    t = np.linspace(1, eps_s, n)
    return np.sqrt(np.expm1(beta_d * t**2 / 2 + beta_min * t))


def laplace(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> np.ndarray:
    x = np.linspace(0, 1, n)
    lmb = mu - beta * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x) + 1e-5)
    return np.clip(np.exp(lmb), sigma_min, sigma_max)


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    u = np.arange(n) / (n - 1)
    return np.tan(u * math.atan(sigma_min) + (1 - u) * math.atan(sigma_max))


@pytest.mark.parametrize("kind", list(PROCESSES))
@pytest.mark.parametrize("rho", [1.0, 2.0, 0.5])
def test_polyexponential_is_kdiffusion_formula(kind, rho):
    p = PROCESSES[kind]
    smin, smax = _ends(p)
    for n in (2, 10, 33):
        ours = _s(p, PolyExponential(rho=rho)(p, n))
        np.testing.assert_allclose(ours, polyexponential(n, smin, smax, rho), rtol=1e-10, atol=0)
    # a given range (inside the process's)
    ours = _s(p, PolyExponential(rho, sigma_min=2 * smin, sigma_max=smax / 2)(p, 12))
    np.testing.assert_allclose(ours, polyexponential(12, 2 * smin, smax / 2, rho), rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_polyexponential_rho_1_is_exponential(kind):
    p = PROCESSES[kind]
    for n in (2, 9, 40):
        torch.testing.assert_close(
            sd.schedules.get("polyexponential")(p, n), sd.schedules.get("exponential")(p, n)
        )


@pytest.mark.parametrize(
    ("beta_min", "beta_max", "eps_s"), [(0.1, 20.0, 1e-3), (0.2, 10.2, 1e-2), (0.5, 30.0, 1e-4)]
)
def test_vp_on_vp_linear_is_time_uniform(beta_min, beta_max, eps_s):
    """On ``VP.linear`` of the same betas and ``t_min = eps_s`` the VP SDE's sigmas at uniform times are the
    process's time-uniform grid (the limiting case: the same SDE)."""
    p = sd.VP.linear(beta_min, beta_max, t_min=eps_s)
    sched = VPUniform(beta_d=beta_max - beta_min, beta_min=beta_min, eps_s=eps_s)
    for n in (1, 2, 10, 50):
        t = sched(p, n)
        torch.testing.assert_close(t, sd.schedules.get("time_uniform")(p, n), rtol=0, atol=1e-12)
        np.testing.assert_allclose(_s(p, t), vp(n, beta_max - beta_min, beta_min, eps_s), rtol=1e-12, atol=0)


def test_vp_elsewhere_is_kdiffusion_formula_and_refuses_what_the_range_cannot_hold():
    rf = sd.RectifiedFlow()  # sigma/alpha from 1e-3 to 999: holds vp's 0.0105 .. 152
    for n in (3, 10, 25):
        np.testing.assert_allclose(_s(rf, VPUniform()(rf, n)), vp(n), rtol=1e-10, atol=0)
    np.testing.assert_allclose(_s(rf, VPUniform(10.0, 1.0, 0.1)(rf, 7)), vp(7, 10.0, 1.0, 0.1), rtol=1e-10)
    for p, words in [
        (sd.EDM(), "[0.002, 80]"),  # 152 above EDM's 80
        (sd.VP.scaled_linear(), "[0.0291672, 14.6146]"),
        (sd.SubVP(t_min=0.5), "[3.27522"),  # 0.0105 below the range's bottom
    ]:
        with pytest.raises(
            ValueError, match=r"VPUniform\(beta_d=19\.9, beta_min=0\.1, eps_s=0\.001\): its sigma"
        ):
            VPUniform()(p, 10)
        with pytest.raises(ValueError) as err:
            sd.schedules.get("vp")(p, 10)
        assert "[0.010486, 152.167]" in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", list(PROCESSES))
@pytest.mark.parametrize(("mu", "beta"), [(0.0, 0.5), (-1.0, 0.3), (0.7, 1.2)])
def test_laplace_is_kdiffusion_formula(kind, mu, beta):
    p = PROCESSES[kind]
    smin, smax = _ends(p)
    for n in (1, 2, 9, 20):
        ref = laplace(n, smin, smax, mu, beta)
        if (ref == smax).sum() > 1 or (ref == smin).sum() > 1:  # k-diffusion would repeat a sigma
            with pytest.raises(ValueError, match=rf"\d of {n} nodes lie beyond sigma_m"):
                Laplace(mu, beta)(p, n)
            continue
        np.testing.assert_allclose(_s(p, Laplace(mu, beta)(p, n)), ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize(("mu", "beta"), [(0.0, 0.5), (-1.0, 0.3), (0.7, 1.2)])
def test_laplace_nodes_are_laplace_quantiles_clamped(mu, beta):
    """``log s_i`` is the quantile at ``1 - x_i`` of a Laplace(mu, beta) (scipy's ``ppf``), up to
    k-diffusion's ``eps = 1e-5`` inside the log (a shift of at most ``beta eps / (1 - 2|1/2 - x|)``), clamped
    to the range: the ends of EDM's ``[0.002, 80]`` where the quantile lies beyond them. At the ends, where
    the quantile is infinite, ``eps`` makes it ``mu -+ beta log(eps)``, then clamped."""
    p = sd.EDM()
    n = 15
    x = np.linspace(0, 1, n)
    ppf = scipy.stats.laplace.ppf(1 - x, loc=mu, scale=beta)  # -inf and inf at the ends
    ours = np.log(_s(p, Laplace(mu, beta)(p, n)))
    inner = slice(1, -1)
    bound = beta * 1e-5 / (1 - 2 * np.abs(0.5 - x[inner]))
    clamped = np.clip(ppf[inner], math.log(0.002), math.log(80.0))
    assert np.all(np.abs(ours[inner] - clamped) <= bound + 1e-12), (ours, clamped)
    top = min(mu - beta * math.log(1e-5), math.log(80.0))
    bottom = max(mu + beta * math.log(1e-5), math.log(0.002))
    assert abs(ours[0] - top) < 1e-12 and abs(ours[-1] - bottom) < 1e-12, (ours, top, bottom)
    t = Laplace(mu, beta)(p, n)  # an end clamped is the process's end exactly
    assert (float(t[0]) == p.t_max) == (top == math.log(80.0))
    assert (float(t[-1]) == p.t_min) == (bottom == math.log(0.002))


def test_laplace_refuses_a_clamp_that_repeats_nodes():
    """Stable Diffusion's s_max = 14.6 < e^{0.5 * 6.2}: at 1000 nodes the second quantile is clamped too."""
    p = sd.VP.scaled_linear()
    assert Laplace()(p, 200).shape == (200,)  # the second node at 9.97, below 14.6
    with pytest.raises(
        ValueError, match=r"Laplace\(mu=0, beta=0\.5\): \d+ of 1000 nodes lie beyond sigma_max = 14\.6146"
    ):
        Laplace()(p, 1000)


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_kl_optimal_is_comfyui_formula_and_uniform_in_arctan(kind):
    p = PROCESSES[kind]
    smin, smax = _ends(p)
    for n in (2, 10, 33):
        ours = _s(p, KLOptimal()(p, n))
        np.testing.assert_allclose(ours, kl_optimal(n, smin, smax), rtol=1e-10, atol=0)
        steps = np.diff(np.arctan(ours))
        np.testing.assert_allclose(steps, (math.atan(smin) - math.atan(smax)) / (n - 1), rtol=1e-8, atol=0)
    # one node: t_max (ComfyUI's 0 / 0 gave NaN there)
    assert KLOptimal()(p, 1).tolist() == [p.t_max]
    ours = _s(p, KLOptimal(sigma_min=3 * smin, sigma_max=smax / 3)(p, 8))
    np.testing.assert_allclose(ours, kl_optimal(8, 3 * smin, smax / 3), rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: PolyExponential(rho=0.0), ["PolyExponential", "rho", "> 0"]),
        (lambda: PolyExponential(rho=math.inf), ["PolyExponential", "rho", "finite"]),
        (lambda: PolyExponential(sigma_min=0.0), ["PolyExponential", "sigma_min", "infinite log-SNR"]),
        (lambda: PolyExponential(sigma_min=2.0, sigma_max=1.0), ["sigma_max > sigma_min"]),
        (lambda: VPUniform(beta_d=0.0), ["VPUniform", "beta_d", "> 0"]),
        (lambda: VPUniform(beta_min=-0.1), ["VPUniform", "beta_min", ">= 0"]),
        (lambda: VPUniform(eps_s=1.0), ["VPUniform", "eps_s", "(0, 1)"]),
        (lambda: VPUniform(eps_s="0.001"), ["VPUniform", "eps_s", "'0.001'"]),
        (lambda: Laplace(mu=math.nan), ["Laplace", "mu", "nan"]),
        (lambda: Laplace(beta=0.0), ["Laplace", "beta", "> 0"]),
        (lambda: Laplace(beta=None), ["Laplace", "beta", "None"]),
        (lambda: Laplace(sigma_max=-1.0), ["Laplace", "sigma_max", "> 0"]),
        (lambda: KLOptimal(sigma_max="80"), ["KLOptimal", "sigma_max", "'80'"]),
        (lambda: KLOptimal(sigma_min=1.0, sigma_max=1.0), ["KLOptimal", "sigma_max > sigma_min"]),
        (
            lambda: KLOptimal(sigma_max=200.0)(sd.EDM(), 5),
            ["KLOptimal", "sigma_max=200", "outside the range"],
        ),
        (lambda: Laplace(sigma_min=1e-4)(sd.EDM(), 5), ["Laplace", "sigma_min=0.0001", "outside the range"]),
        (lambda: PolyExponential(sigma_min=100.0)(sd.EDM(), 5), ["sigma_max > sigma_min", "100"]),
    ],
)
def test_bad_options_name_the_argument(make, words):
    with pytest.raises(ValueError) as err:
        make()
    assert all(w in str(err.value) for w in words), str(err.value)


def test_reprs_name_the_options():
    assert repr(PolyExponential(2.0, sigma_max=10.0)) == "PolyExponential(rho=2, sigma_max=10)"
    assert repr(VPUniform()) == "VPUniform(beta_d=19.9, beta_min=0.1, eps_s=0.001)"
    assert repr(Laplace(sigma_min=0.1)) == "Laplace(mu=0, beta=0.5, sigma_min=0.1)"
    assert repr(KLOptimal()) == "KLOptimal()" and repr(KLOptimal(sigma_min=0.1)) == "KLOptimal(sigma_min=0.1)"
