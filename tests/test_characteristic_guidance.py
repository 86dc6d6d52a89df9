"""Characteristic guidance (Zheng & Lan 2024) against the closed form for Gaussian data laws.

For Gaussian ``p(x|c) = N(mu_c, S_c)`` and ``p(x) = N(mu_u, S_u)`` the guided target ``p(x|c)^w p(x)^{1-w}``
is the Gaussian of precision ``w S_c^{-1} - (w - 1) S_u^{-1}`` (positive definite here for every ``w >= 1``:
the conditional law is the narrower), and its noised denoiser is exact (``sd.toy.GaussianMixture``). CFG's
estimate is the score of ``p_t(x|c)^w p_t(x)^{1-w}``, which is not the noised target where the covariances
differ; characteristic guidance's is, to the tolerance of its solve (a Gaussian's score is constant along
its characteristics).

docs/guidance.md's table: ``PYTHONPATH=src python -m tests.test_characteristic_guidance``.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import CFG, CharacteristicGuidance

F64 = torch.float64
ONE = torch.ones(1, dtype=F64)
MU_U, MU_C = torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([1.0, -0.5], dtype=F64)
VAR_U, VAR_C = torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([0.25, 0.3], dtype=F64)  # diagonal
FULL_U = torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=F64)  # full, not commuting with FULL_C
FULL_C = torch.tensor([[0.3, -0.1], [-0.1, 0.2]], dtype=F64)
TIGHT = {"tol": 1e-12, "max_iter": 100}


def law(mean: torch.Tensor, cov: torch.Tensor) -> sd.toy.GaussianMixture:
    return sd.toy.GaussianMixture(mean[None], cov[None], ONE)


def target(w: float, cov_c: torch.Tensor, cov_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of ``N(MU_C, cov_c)^w N(MU_U, cov_u)^{1-w}`` (covariances as matrices)."""
    prec_c, prec_u = torch.linalg.inv(cov_c), torch.linalg.inv(cov_u)
    cov = torch.linalg.inv(w * prec_c - (w - 1) * prec_u)
    return cov @ (w * prec_c @ MU_C - (w - 1) * prec_u @ MU_U), cov


def branches(
    process: sd.Process, cov_c: torch.Tensor, cov_u: torch.Tensor
) -> tuple[sd.Denoiser, sd.Denoiser]:
    return law(MU_C, cov_c).denoiser(process), law(MU_U, cov_u).denoiser(process)


def points(n: int = 64) -> torch.Tensor:
    return 2 * torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(3))


# --- exact for Gaussians --------------------------------------------------------------------------


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("w", [2.0, 4.0, 8.0])
def test_exact_noised_target_for_gaussians(sd_process, full, w):
    cov_c, cov_u = (FULL_C, FULL_U) if full else (torch.diag(VAR_C), torch.diag(VAR_U))
    dc, du = branches(sd_process, cov_c, cov_u)
    exact = law(*target(w, cov_c, cov_u))
    ch, cfg = CharacteristicGuidance(dc, du, w, **TIGHT), CFG(dc, du, w)
    x = points()
    for t in (999.0, 700.0, 300.0, 40.0, 1.0):
        a, s = float(sd_process.alpha(t)), float(sd_process.sigma(t))
        want = exact.denoise(x, a, s)
        got = ch(x, t)
        assert ch.unconverged == 0 and ch.cost == 2 * ch.iterations <= 2 * 7
        # measured <= 7.7e-13 over all cases (max abs, x0 of norm ~1-3), at most 6 iterations
        assert float((got.x0 - want).abs().max()) < 1e-10
        assert float((got.eps - (x - a * want) / s).abs().max()) < 1e-10 * max(1.0, a / s)
        assert float((cfg(x, t).x0 - want).abs().max()) > 1e-4  # CFG is not the noised target
    times = torch.tensor([999.0, 500.0, 20.0, 3.0] * 16, dtype=F64)  # one time per sample
    want = torch.cat(
        [
            exact.denoise(x[k : k + 1], float(sd_process.alpha(tk)), float(sd_process.sigma(tk)))
            for k, tk in enumerate(times)
        ]
    )
    assert float((ch(x, times).x0 - want).abs().max()) < 1e-10


def test_exact_for_an_eps_net_under_rectified_flow():
    """The solve and the combination in eps (an eps net), and another process."""
    proc = sd.RectifiedFlow()
    dc, du = branches(proc, FULL_C, FULL_U)

    def eps_net(den: sd.Denoiser) -> sd.Denoiser:
        return sd.Denoiser(lambda x, t: den(x, t).eps, proc, prediction="eps", shape=(2,))

    w = 4.0
    exact = law(*target(w, FULL_C, FULL_U))
    ch = CharacteristicGuidance(eps_net(dc), eps_net(du), w, tol=1e-10)
    x = points()
    for t in (0.99, 0.7, 0.3, 0.01):  # x0 = (x - sigma eps) / alpha: 1e-12 is round-off at alpha = 0.001
        a, s = float(proc.alpha(t)), float(proc.sigma(t))
        got = ch(x, t)
        assert not got.x0_given and ch.unconverged == 0
        # measured <= 7.9e-11
        assert float((got.x0 - exact.denoise(x, a, s)).abs().max()) < 1e-9


# --- sampling: CFG misses the target, characteristic guidance reaches it ---------------------------


def run(den: sd.Denoiser, x_T: torch.Tensor, solver: str, steps: int) -> tuple[torch.Tensor, int]:
    out, info = sd.sample(den, x_T, steps=steps, solver=solver, return_info=True)
    return out, info.nfe


def exact_flow(process: sd.Process, w: float, x_T: torch.Tensor) -> torch.Tensor:
    """What an exact sampler of the target returns from ``x_T``: its probability-flow ODE from ``t_max``
    to ``t_min`` (for a Gaussian ``N(m, S)``: ``x_t - a_t m = (a_t^2 S + s_t^2)^{1/2} (a_T^2 S + s_T^2)^{-1/2}
    (x_T - a_T m)``, diagonal ``S`` here), then the denoised estimate there (``sd.sample``'s final step)."""
    m, cov = target(w, torch.diag(VAR_C), torch.diag(VAR_U))
    v = torch.diagonal(cov)
    (a_T, s_T), (a_0, s_0) = (
        (float(process.alpha(t)), float(process.sigma(t))) for t in (process.t_max, process.t_min)
    )
    gain = a_0 * v / ((a_T**2 * v + s_T**2) * (a_0**2 * v + s_0**2)).sqrt()
    return m + gain * (x_T - a_T * m)


def output_law(den: sd.Denoiser, solver: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the sampler's output for ``x_T ~ N(0, I)``: the output is affine in ``x_T``
    (Gaussian data; characteristic guidance to the tolerance of its solve), read off ``x_T = 0, e_1, e_2``."""
    out, _ = run(den, torch.cat([torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)]), solver, steps)
    gain = (out[1:] - out[0]).T
    return out[0], gain @ gain.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(process: sd.Process, w: float, solver: str, steps: int) -> dict[str, tuple[float, float]]:
    """CFG's and characteristic guidance's (default options) errors: per-sample endpoint against the exact
    flow (relative RMSE, 256 samples), output mean and covariance against the target (relative)."""
    dc, du = branches(process, torch.diag(VAR_C), torch.diag(VAR_U))
    m, cov = target(w, torch.diag(VAR_C), torch.diag(VAR_U))
    x_T = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = exact_flow(process, w, x_T)
    res: dict[str, list[float]] = {"endpoint": [], "mean": [], "cov": [], "nfe": []}
    for den in (CFG(dc, du, w), CharacteristicGuidance(dc, du, w)):
        out, nfe = run(den, x_T, solver, steps)
        mean, c = output_law(den, solver, steps)
        res["endpoint"].append(rel(out, exact))
        res["mean"].append(rel(mean, m))
        res["cov"].append(rel(c, cov))
        res["nfe"].append(nfe)
    return {k: (v[0], v[1]) for k, v in res.items()}


def flow_law(process: sd.Process, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the exact flow's output for ``x_T ~ N(0, I)``."""
    zero = exact_flow(process, w, torch.zeros(1, 2, dtype=F64))[0]
    gain = exact_flow(process, w, torch.eye(2, dtype=F64)) - zero
    return zero, gain.T @ gain


def floor(process: sd.Process, w: float) -> tuple[float, float]:
    """The exact flow's mean and covariance errors (``x_T ~ N(0, I)`` is not the target's noised law at
    ``t_max``, and the last step returns a denoised estimate): what no sampler goes below."""
    m, cov = target(w, torch.diag(VAR_C), torch.diag(VAR_U))
    mean, c = flow_law(process, w)
    return rel(mean, m), rel(c, cov)


@pytest.mark.parametrize("w", [2.0, 4.0, 8.0])
def test_sampling_reaches_the_target_where_cfg_does_not(sd_process, w):
    got = measure(sd_process, w, "unipc", 100)
    # measured: endpoint CFG 0.219 / 0.341 / 0.341, characteristic 3.8e-6 / 7.7e-6 / 1.6e-5 (w = 2 / 4 / 8)
    assert got["endpoint"][0] > 0.2 and got["endpoint"][1] < 1e-4
    # measured: covariance CFG 0.34 / 0.65 / 0.92, mean 0.17 / 0.28 / 0.28 (the floor: 1e-3 - 3e-2)
    assert got["cov"][0] > 0.3 and got["mean"][0] > 0.15
    assert got["nfe"][0] == 200 and 400 < got["nfe"][1] <= 2 * 7 * 100
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    mean, cov = output_law(CharacteristicGuidance(dc, du, w, tol=1e-10), "unipc", 100)
    want_mean, want_cov = flow_law(sd_process, w)
    # against the exact flow's output law, measured: mean 1.2e-7 / 1.1e-7 / 9.6e-8, covariance 8.3e-6 /
    # 9.5e-6 / 1.1e-5: UniPC's error (400 steps: 4.6e-10 / 3.9e-10 / 3.5e-10 and 3.1e-8 / 3.5e-8 / 4.2e-8)
    assert rel(mean, want_mean) < 1e-6 and rel(cov, want_cov) < 5e-5


def test_ddim_converges_at_first_order(sd_process):
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    x_T = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = exact_flow(sd_process, 4.0, x_T)
    errs = [
        [
            rel(run(den, x_T, "ddim", n)[0], exact)
            for den in (CFG(dc, du, 4.0), CharacteristicGuidance(dc, du, 4.0))
        ]
        for n in (50, 200)
    ]
    # measured: CFG 0.379 / 0.373, characteristic 1.14e-2 / 2.85e-3 (first order: / 4.0)
    assert all(cfg > 0.3 for cfg, _ in errs)
    assert 3.0 < errs[0][1] / errs[1][1] < 5.0 and errs[1][1] < 4e-3


# --- where CFG is exact, and the limits -----------------------------------------------------------


@pytest.mark.parametrize("w", [3.0, 8.0])
def test_equal_covariances_give_cfg(sd_process, w):
    """Equal covariances: CFG is exact, and so the guided estimate equals CFG's. The shift itself is
    ``sigma^2 / alpha S^{-1} (mu_c - mu_u)``, not 0: both branches move by it, which leaves their difference
    unchanged; it is 0 where the means are equal too."""
    dc, du = branches(sd_process, FULL_C, FULL_C)
    ch, cfg = CharacteristicGuidance(dc, du, w, **TIGHT), CFG(dc, du, w)
    x = points()
    for t in (999.0, 300.0, 10.0):
        a, s = float(sd_process.alpha(t)), float(sd_process.sigma(t))
        got, ref = ch(x, t), cfg(x, t)
        # measured <= 1.7e-13 (x0 and eps)
        assert float((got.x0 - ref.x0).abs().max()) < 1e-10 and float((got.eps - ref.eps).abs().max()) < 1e-10
        shift = (s * s / a) * torch.linalg.solve(FULL_C, MU_C - MU_U)
        assert ch.shift is not None and float((ch.shift - shift).abs().max()) < 1e-10 * float(
            shift.abs().max()
        )
    same = law(MU_C, FULL_C).denoiser(sd_process)
    ch = CharacteristicGuidance(dc, same, w, **TIGHT)  # one law: the shift is 0 and one iteration suffices
    assert torch.equal(ch(x, 500.0).x0, CFG(dc, same, w)(x, 500.0).x0)
    assert ch.iterations == 1 and ch.cost == 2 and ch.shift is not None and not bool(ch.shift.any())


def test_scale_one_and_zero_are_the_branches(sd_process):
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    x_T = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = {"steps": 12, "solver": "dpmpp_2m", "return_info": True}
    cond, info_c = sd.sample(dc, x_T, **kw)
    uncond, _ = sd.sample(du, x_T, **kw)
    one, info_1 = sd.sample(CharacteristicGuidance(dc, du, 1.0), x_T, **kw)
    zero, info_0 = sd.sample(CharacteristicGuidance(dc, du, 0.0), x_T, **kw)
    assert torch.equal(one, cond) and torch.equal(zero, uncond)
    assert info_1.nfe == info_0.nfe == info_c.nfe == 12


# --- NFE, fallback, composition -------------------------------------------------------------------


class Counted:
    """An x0 net counting its calls (one per call, whatever the batch)."""

    def __init__(self, den: sd.Denoiser) -> None:
        self.den, self.calls = den, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.den.net(x, t)


@pytest.mark.parametrize("name", sd.solvers.available())
def test_nfe_is_exact_with_every_solver(sd_process, name):
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    nc, nu = Counted(dc), Counted(du)
    ch = CharacteristicGuidance(
        sd.Denoiser(nc, sd_process, prediction="x0"), sd.Denoiser(nu, sd_process, prediction="x0"), 4.0
    )
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    out, info = sd.sample(
        ch, x_T, steps=5, solver=name, generator=torch.Generator().manual_seed(7), return_info=True
    )
    assert bool(torch.isfinite(out).all())
    assert nc.calls == nu.calls and info.nfe == nc.calls + nu.calls > 2 * info.solver.nfe(5)


def test_unconverged_samples_get_cfg_and_a_warning(sd_process, caplog):
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    x = points(8)
    ch = CharacteristicGuidance(dc, du, 4.0, tol=1e-14, max_iter=2)
    with caplog.at_level(logging.WARNING, logger="steerdiff.guidance.characteristic"):
        got = ch(x, 600.0)
    assert "8 of 8 samples did not converge in 2 iterations" in caplog.text
    assert torch.equal(got.x0, CFG(dc, du, 4.0)(x, 600.0).x0)
    assert ch.unconverged == 8 and ch.cost == 4 and ch.shift is not None and not bool(ch.shift.any())


def test_unconverged_warning_under_autograd_raises_no_torch_warning(sd_process, caplog):
    """The logged residual is read off the graph: under DPS / TDS (x requiring grad) the warning's
    ``float(...)`` of a tensor that requires grad made torch warn 'Converting a tensor with
    requires_grad=True to a scalar' at every unconverged call, logging on or off."""
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    x = points(8).requires_grad_(True)
    ch = CharacteristicGuidance(dc, du, 4.0, tol=1e-14, max_iter=2)
    with (
        warnings.catch_warnings(),
        caplog.at_level(logging.WARNING, logger="steerdiff.guidance.characteristic"),
    ):
        warnings.simplefilter("error")
        got = ch(x, 600.0)
    assert "8 of 8 samples did not converge in 2 iterations" in caplog.text
    assert got.x0.requires_grad and torch.equal(got.x0, CFG(dc, du, 4.0)(x, 600.0).x0)


def test_max_iter_one_is_cfg_without_a_warning(sd_process, caplog):
    # max_iter=1 (documented as CFG) logged an "unconverged" warning at every call
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    x = points(8)
    ch = CharacteristicGuidance(dc, du, 4.0, max_iter=1)
    with caplog.at_level(logging.WARNING, logger="steerdiff.guidance.characteristic"):
        got = ch(x, 600.0)
    assert caplog.text == ""
    assert torch.equal(got.x0, CFG(dc, du, 4.0)(x, 600.0).x0) and ch.cost == 2


def test_memory_must_span_the_slow_directions_at_extreme_noise(caplog):
    """Where sigma/alpha is extreme (rectified flow's t_max: 999) the fixed-point map's Jacobian is the
    identity to ~1e-6 in every direction: Anderson's default memory 2 spans two of them and, in 8-d, gives
    up (CFG's estimate, 1.6 off the exact target's x0), while memory D + 1 solves the (linear) Gaussian
    problem exactly (18 iterations to tol 1e-10; measured 1.5e-10 off). At t = 0.8 the default converges."""
    d, w, proc = 8, 2.0, sd.RectifiedFlow()
    g = torch.Generator().manual_seed(0)
    mu_c, mu_u = torch.randn(d, dtype=F64, generator=g), torch.randn(d, dtype=F64, generator=g)
    v_c = 0.2 + 0.5 * torch.rand(d, dtype=F64, generator=g)
    v_u = 0.8 + 0.5 * torch.rand(d, dtype=F64, generator=g)
    v_t = 1 / (w / v_c - (w - 1) / v_u)  # the powered target, a Gaussian (positive precision here)
    m_t = v_t * (w * mu_c / v_c - (w - 1) * mu_u / v_u)
    dc, du = law(mu_c, torch.diag(v_c)).denoiser(proc), law(mu_u, torch.diag(v_u)).denoiser(proc)
    exact = law(m_t, torch.diag(v_t)).denoiser(proc)
    x = torch.randn(32, d, dtype=F64, generator=g)
    with caplog.at_level(logging.WARNING, logger="steerdiff.guidance.characteristic"):
        default = CharacteristicGuidance(dc, du, w)
        pred = default(x, proc.t_max)
    assert default.unconverged >= 24 and "did not converge" in caplog.text  # measured 31 of 32
    assert float((pred.x0 - exact(x, proc.t_max).x0).abs().max()) > 0.5
    wide = CharacteristicGuidance(dc, du, w, memory=d + 1, tol=1e-10, max_iter=60)
    for t in (proc.t_max, 0.8):
        torch.testing.assert_close(wide(x, t).x0, exact(x, t).x0, rtol=0, atol=1e-8)
        assert wide.unconverged == 0
    default(x, 0.8)
    assert default.unconverged == 0


@pytest.mark.parametrize("process", [sd.VP.scaled_linear(), sd.RectifiedFlow()], ids=["sd", "flow"])
def test_half_precision_stops_at_the_nets_resolution(caplog, process):
    # float16 nets cannot resolve x0 below ~eps(fp16) sigma/alpha: at the default tol the noisy steps ran
    # all 30 iterations and fell back to CFG (NFE 224 against 46 in float32, 5 UniPC steps on 8 samples).
    # The resolution grows with sigma/alpha: at rectified flow's t_max (999) a floor without that factor
    # (8 eps(fp16), enough under SD's betas, sigma/alpha <= 14.6) iterated on there: NFE 68 against 56
    dc, du = branches(process, torch.diag(VAR_C), torch.diag(VAR_U))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    nfe = {}
    with caplog.at_level(logging.WARNING, logger="steerdiff.guidance.characteristic"):
        for dt in (torch.float32, torch.float16):
            nfe[dt] = run(CharacteristicGuidance(dc, du, 4.0), x.to(dt), "unipc", 5)[1]
    assert caplog.text == ""
    assert nfe[torch.float16] <= nfe[torch.float32] + 4  # measured 48 against 46 (sd), 38 against 54 (flow)


def test_a_non_finite_residual_falls_back_to_cfg(sd_process, caplog):
    """A branch that returns NaN away from x (here: in row 0, on every call after the first): that sample is
    given up at once -- CFG's estimate, finite, and a warning -- rather than iterated on or returned as NaN;
    the others converge as before."""
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    calls = [0]

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = du.net(x, t)
        if calls[0] > 1:
            out[0] = math.nan
        return out

    ch = CharacteristicGuidance(dc, sd.Denoiser(net, sd_process, prediction="x0"), 4.0)
    x = points(8)
    with caplog.at_level(logging.WARNING, logger="steerdiff.guidance.characteristic"):
        got = ch(x, 600.0)
    assert torch.equal(got.x0[0], CFG(dc, du, 4.0)(x, 600.0).x0[0])
    assert torch.equal(got.x0[1:], CharacteristicGuidance(dc, du, 4.0)(x, 600.0).x0[1:])
    assert ch.unconverged == 1 and "1 of 8 samples did not converge" in caplog.text
    assert ch.cost == 2 * ch.iterations and ch.iterations > 2


def test_plain_iteration_needs_the_acceleration(sd_process):
    """``memory=0`` is the damped fixed-point iteration: at high noise its contraction is ~1, and it does
    not converge where Anderson's does in 6 iterations."""
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    x = points(8)
    plain = CharacteristicGuidance(dc, du, 8.0, tol=1e-8, max_iter=50, memory=0)
    plain(x, 999.0)
    accelerated = CharacteristicGuidance(dc, du, 8.0, tol=1e-8, max_iter=50)
    accelerated(x, 999.0)
    assert plain.unconverged == 8 and accelerated.unconverged == 0 and accelerated.iterations <= 7


def test_dps_differentiates_through_the_solve(sd_process):
    """DPS over characteristic guidance takes its gradient through the iteration: for Gaussian laws the guided
    x0 is the exact target denoiser's, and so are its Jacobian (to 1e-12) and the DPS run over it (the
    in-place updates of the iteration's masks made the backward pass raise)."""
    dc, du = branches(sd_process, FULL_C, FULL_U)
    mean, cov = target(4.0, FULL_C, FULL_U)
    exact = law(mean, cov).denoiser(sd_process)
    ch = CharacteristicGuidance(dc, du, 4.0, **TIGHT)
    x = points(8).requires_grad_(True)
    jac = [torch.autograd.grad(d(x, 500.0).x0[:, 0].sum(), x)[0] for d in (ch, exact)]
    assert (jac[0] - jac[1]).abs().max() < 1e-12 < jac[1].abs().max()
    A, y = torch.tensor([[1.0, 0.5]], dtype=F64), torch.full((4, 1), 0.5, dtype=F64)
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    runs = [
        sd.sample(
            sd.guidance.DPS(d, sd.inverse.Matrix(A), y, noise_std=0.1, scale=1.0),
            x_T,
            steps=10,
            solver="ddpm",
            generator=torch.Generator().manual_seed(0),
        )
        for d in (ch, exact)
    ]
    assert rel(*runs) < 1e-10


def test_fk_steering_nfe_is_exact_in_max_batch_slices(sd_process):
    """Slices of ``max_batch`` rows converge in different numbers of iterations; the particles' NFE is that
    of one call on all rows, the slices' largest (it was the last slice's: 426 for 428 here), and the
    particles are those of one call."""
    dc, du = branches(sd_process, FULL_C, FULL_U)
    x_T = 3 * torch.randn(4, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    runs = [
        sd.smc.fk_steering(
            CharacteristicGuidance(dc, du, 8.0, tol=1e-10, max_iter=60, memory=0, step=0.5),
            lambda x: x[:, 0],
            lam=1.0,
            shape=(4, 2),
            particles=1,
            steps=4,
            generator=torch.Generator().manual_seed(0),
            max_batch=max_batch,
            x_T=x_T,
        )
        for max_batch in (None, 2)
    ]
    assert runs[1].nfe == runs[0].nfe == 428 and torch.equal(runs[1].x, runs[0].x)


# --- bad input ------------------------------------------------------------------------------------


# --- warm start (the authors': from the previous call's shift, rescaled) ---------------------------


def gauss8(w: float) -> tuple[sd.Denoiser, sd.Denoiser, torch.Tensor, torch.Tensor]:
    """8-d diagonal Gaussians (bench/characteristic_warm.py's gauss8): the branches and the target's mean and
    variances."""
    g = torch.Generator().manual_seed(1)
    mu_c, mu_u = torch.randn(8, dtype=F64, generator=g), torch.randn(8, dtype=F64, generator=g)
    var_c = 0.2 + 0.5 * torch.rand(8, dtype=F64, generator=g)
    var_u = 0.8 + 0.5 * torch.rand(8, dtype=F64, generator=g)
    proc = sd.VP.scaled_linear()
    v = 1 / (w / var_c - (w - 1) / var_u)
    m = v * (w * mu_c / var_c - (w - 1) * mu_u / var_u)
    return law(mu_c, torch.diag(var_c)).denoiser(proc), law(mu_u, torch.diag(var_u)).denoiser(proc), m, v


class Exactness(CharacteristicGuidance):
    """Records, over its calls, the largest distance of its guided x0 to the exact noised target's."""

    def __init__(self, *args, exact: sd.Denoiser, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exact, self.worst, self.warm_rows, self.calls = exact, 0.0, 0, 0

    def evaluate(self, x, t, net_dtype, /, **cond):
        pred = super().evaluate(x, t, net_dtype, **cond)
        self.worst = max(self.worst, float((pred.x0 - self.exact(x, t).x0).abs().max()))
        self.warm_rows, self.calls = self.warm_rows + self.warmed, self.calls + 1
        return pred


@pytest.mark.parametrize(("solver", "steps"), [("unipc", 20), ("heun", 10)])
def test_warm_start_reaches_the_same_fixed_point_with_fewer_evaluations(solver, steps):
    """At every call the warm-started solve ends at the exact noised target (the unique fixed point) to the
    solve's tolerance, as the cold one does, at about 2/3 of its evaluations (8-d Gaussians, w = 4; Heun's
    second stage and the next step's first evaluation share a time: each starts from the call before at a
    higher noise level); the endpoints agree to the tolerance."""
    w = 4.0
    dc, du, m, v = gauss8(w)
    exact = law(m, torch.diag(v)).denoiser(dc.process)
    x_T = torch.randn(64, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    cold = Exactness(dc, du, w, exact=exact)
    warm = Exactness(dc, du, w, warm_start=1.0, exact=exact)
    (x_c, i_c), (x_w, i_w) = (
        sd.sample(d, x_T, steps=steps, solver=solver, return_info=True) for d in (cold, warm)
    )
    # measured: every row warm-started after the first call (unipc 64 x 19 = 1216, heun 64 x 18 = 1152)
    assert warm.warm_rows == 64 * (warm.calls - 1) and cold.warm_rows == 0
    # measured: NFE cold / warm 320 / 200 (unipc 20), 318 / 218 (heun 10)
    assert i_w.nfe < 0.72 * i_c.nfe
    # measured: max |x0 - exact x0| over the calls, cold / warm 6.0e-4 / 5.5e-4 (unipc), 5.8e-4 / 5.4e-4
    # (heun): the tolerance 1e-4 is on the RMS of x0_u - x0_c, not on x0 itself
    assert cold.worst < 1e-3 and warm.worst < 1e-3
    # measured: 2.6e-4 (unipc), 3.2e-4 (heun)
    assert float((x_w - x_c).abs().max()) < 1e-3


def test_warm_start_falls_back_to_cold_when_the_batch_changes():
    """A warm start needs the same batch, a lower noise level and each sample where the call before left it
    (within a step's noise of its DDIM step); any other call starts cold: the same result, bit for bit, as a
    solver that never warm-starts."""
    w = 4.0
    dc, du, _, _ = gauss8(w)
    sd_process = dc.process
    x = 2 * torch.randn(8, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    cold = CharacteristicGuidance(dc, du, w)

    def ddim(pred: sd.Prediction, t: float) -> torch.Tensor:  # the probability-flow step to t
        return float(sd_process.alpha(t)) * pred.x0 + float(sd_process.sigma(t)) * pred.eps

    def warm_after(t0: float) -> tuple[CharacteristicGuidance, sd.Prediction]:
        ch = CharacteristicGuidance(dc, du, w, warm_start=1.0)
        return ch, ch(x, t0)

    ch, first = warm_after(600.0)
    assert ch.warmed == 0 and torch.equal(first.x0, cold(x, 600.0).x0)
    y = ddim(first, 560.0)
    got, want = ch(y, 560.0), cold(y, 560.0)

    assert ch.warmed == 8 and ch.iterations < cold.iterations  # measured 6 against 9
    assert float((got.x0 - want.x0).abs().max()) < 1e-3
    changed = {
        "fewer rows": (y[:4], 560.0),
        "rows permuted": (y.flip(0), 560.0),
        "same noise level": (y, 600.0),
        "a higher one": (y, 700.0),
        "the same call again": (x, 600.0),
        "float32": (y.float(), 560.0),
    }
    for what, (z, t) in changed.items():
        ch, _ = warm_after(600.0)
        got = ch(z, t)
        assert ch.warmed == 0, what
        assert torch.equal(got.x0, CharacteristicGuidance(dc, du, w)(z, t).x0), what
    ch, _ = warm_after(600.0)  # a call above every remembered noise level (a new run's) forgets them
    ch(x + 100, 700.0)  # other samples, far from these
    assert torch.equal(ch(y, 560.0).x0, cold(y, 560.0).x0) and ch.warmed == 0
    ch, _ = warm_after(600.0)  # per-row times: the rows whose time went up start cold
    times = torch.tensor([560.0, 700.0] * 4, dtype=F64)
    ch(y, times)
    assert ch.warmed == 4
    ch, _ = warm_after(600.0)
    for rows in (slice(0, 4), torch.arange(8)):  # a part of the batch (a max_batch slice): a copy, no memory
        part = ch.take_rows(rows, 8)
        assert part is not ch and part(y[rows], 560.0) is not None and part.warmed == 0
    assert ch(y, 560.0) is not None and ch.warmed == 8  # its own memory kept


def test_warm_started_samples_that_do_not_converge_get_cfg(caplog):
    """A warm-started sample's first evaluation is not at CFG's points: where it gives up, one more
    evaluation of both branches at ``x`` gives it CFG's estimate (counted in ``cost``)."""
    w = 4.0
    dc, du, _, _ = gauss8(w)
    x = 2 * torch.randn(8, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    ch = CharacteristicGuidance(dc, du, w, warm_start=1.0, max_iter=2, tol=1e-12)
    with caplog.at_level(logging.WARNING, logger="steerdiff.guidance.characteristic"):
        first = ch(x, 600.0)
        y = float(dc.process.alpha(560.0)) * first.x0 + float(dc.process.sigma(560.0)) * first.eps
        got = ch(y, 560.0)
    assert ch.warmed == 8 and ch.unconverged == 8 and ch.cost == 2 * 2 + 2
    assert (
        torch.equal(got.x0, CFG(dc, du, w)(y, 560.0).x0) and "8 of 8 samples did not converge" in caplog.text
    )


def test_warm_start_runs_are_reproducible(sd_process):
    """The memory of a run does not reach into the next: a run's first call is at a noise level no
    remembered call is below, which forgets them. Two runs of one instance, and one after a run from other
    noise, equal a fresh instance's run bit for bit."""
    w = 4.0
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    x_T, other = (torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    ch = CharacteristicGuidance(dc, du, w, warm_start=1.0)
    runs = [
        sd.sample(ch, z, steps=12, solver=s) for z, s in ((x_T, "unipc"), (x_T, "unipc"), (other, "heun"))
    ]
    again = sd.sample(ch, x_T, steps=12, solver="unipc")
    fresh = sd.sample(CharacteristicGuidance(dc, du, w, warm_start=1.0), x_T, steps=12, solver="unipc")
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], again) and torch.equal(runs[0], fresh)
    assert not torch.equal(fresh, sd.sample(CharacteristicGuidance(dc, du, w), x_T, steps=12, solver="unipc"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": -1.0}, r"scale must be a finite number >= 0, got -1.0"),
        ({"scale": math.nan}, r"scale must be"),
        ({"scale": "4"}, r"scale must be"),
        ({"max_iter": 0}, r"max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, r"max_iter must be an integer"),
        ({"max_iter": True}, r"max_iter must be an integer"),
        ({"tol": 0.0}, r"tol must be a finite number > 0, got 0.0"),
        ({"tol": -1e-4}, r"tol must be"),
        ({"tol": math.inf}, r"tol must be"),
        ({"step": 0.0}, r"step must be a finite number in \(0, 1\]"),
        ({"step": 1.5}, r"step must be"),
        ({"memory": -1}, r"memory must be an integer >= 0"),
        ({"uncond_kwargs": [1]}, r"uncond_kwargs must be a dict"),
        ({"warm_start": 1.5}, r"warm_start must be a finite number in \[0, 1\], got 1.5"),
        ({"warm_start": -0.1}, r"warm_start must be"),
        ({"warm_start": 0.5, "max_iter": 1}, r"warm_start=0\.5 needs an iteration .*max_iter=1 is CFG"),
    ],
)
def test_bad_input(sd_process, kwargs, match):
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    args = {"scale": 4.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        CharacteristicGuidance(dc, du, **args)


def test_branches_must_share_a_process(sd_process):
    dc, _ = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    du = law(MU_U, torch.diag(VAR_U)).denoiser(sd.RectifiedFlow())
    with pytest.raises(ValueError, match=r"CharacteristicGuidance: cond and uncond must share a process"):
        CharacteristicGuidance(dc, du, 4.0)


def main() -> None:
    """docs/guidance.md's table: ``PYTHONPATH=src python -m tests.test_characteristic_guidance``."""
    torch.set_num_threads(1)
    process = sd.VP.scaled_linear()
    print("| w | sampler | NFE CFG / char. | endpoint CFG / char. | mean CFG / char. (floor) | cov (floor) |")
    print("|---|---|---|---|---|---|")
    for w in (2.0, 4.0, 8.0):
        fm, fc = floor(process, w)
        for solver, steps in (("ddim", 100), ("unipc", 25), ("unipc", 100)):
            g = measure(process, w, solver, steps)
            print(
                f"| {w:g} | {solver} {steps} | {g['nfe'][0]:.0f} / {g['nfe'][1]:.0f} "
                f"| {g['endpoint'][0]:.3g} / {g['endpoint'][1]:.2g} "
                f"| {g['mean'][0]:.3g} / {g['mean'][1]:.3g} ({fm:.3g}) "
                f"| {g['cov'][0]:.3g} / {g['cov'][1]:.3g} ({fc:.3g}) |"
            )


if __name__ == "__main__":
    main()


def test_one_denoiser_as_both_branches_warns(sd_process, caplog):
    """``CharacteristicGuidance(den, den, w)`` without ``uncond_kwargs`` evaluates one call as both branches
    (as CFG's same-branch warning says); logged once when made, not with ``uncond_kwargs`` or at scale 1."""
    dc, du = branches(sd_process, torch.diag(VAR_C), torch.diag(VAR_U))
    name = "steerdiff.guidance.characteristic"
    with caplog.at_level(logging.WARNING, logger=name):
        CharacteristicGuidance(dc, dc, 3.0)
        (record,) = [r for r in caplog.records if r.name == name]
        assert "CharacteristicGuidance: uncond is cond and no uncond_kwargs" in record.getMessage()
        caplog.clear()
        CharacteristicGuidance(dc, du, 3.0)
        CharacteristicGuidance(dc, dc, 1.0)
        CharacteristicGuidance(dc, dc, 3.0, uncond_kwargs={"label": 0})
        assert not [r for r in caplog.records if r.name == name]
