"""Mean-reverting diffusion (IR-SDE) and the MR Sampler against the exact mixture oracle.

``y = x - mu`` is a VP-like process: ``gmm.shifted(-mu)`` is the exact law of ``y_0`` and its
``reference_ode`` the exact PF-ODE solution; ``gmm.mean_reverting_marginal`` the exact
``p(x_t | mu)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers.base import ODE_MAX_H, ODE_MAX_H_RATIO, SDE_MAX_H, SDE_MAX_H_RATIO

from .reference import (
    PARITY_BOUND,
    Noise64,
    Replay,
    diffusers_sample,
    nodes_of,
    noise,
    rel_rmse,
    sd_betas_config,
    slope,
    smooth_mixture,
)

F64 = torch.float64
MRS = sd.solvers.MRSampler


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def mr():
    gmm = smooth_mixture()
    proc = sd.MeanReverting(theta_min=0.3, theta_max=8.0, stationary_std=0.5)
    mu = torch.randn(8, generator=_gen(7), dtype=F64)
    return gmm, proc, mu, gmm.mean_reverting_denoiser(proc, mu)


# --- the process -----------------------------------------------------------------------------


@pytest.mark.parametrize(("tmin", "tmax", "lam"), [(0.3, 8.0, 0.5), (2.0, 2.0, 0.2), (0.0, 12.0, 1.5)])
def test_process_round_trips(tmin, tmax, lam):
    p = sd.MeanReverting(theta_min=tmin, theta_max=tmax, stationary_std=lam)
    t = torch.linspace(p.t_min, p.t_max, 101, dtype=F64)
    a, s, lm = p.coefficients(t)
    assert torch.allclose(a, torch.exp(-p.theta_bar(t)), rtol=1e-12, atol=0)
    assert torch.allclose(a**2 + s**2 / lam**2, torch.ones_like(t), rtol=0, atol=1e-12)
    assert torch.allclose(lm, torch.log(a / s), rtol=0, atol=1e-10)
    assert torch.allclose(p.t_of_lam(lm), t, rtol=0, atol=1e-10)
    # derivatives, and the variance obeys the OU moment ODE  var' = -2 theta var + diffusion^2
    d = 1e-6
    fd = lambda f: (f(t + d) - f(t - d)) / (2 * d)  # noqa: E731
    assert torch.allclose(p.d_alpha(t), fd(p.alpha), rtol=1e-7, atol=1e-9)
    assert torch.allclose(p.d_sigma(t), fd(p.sigma), rtol=1e-6, atol=1e-8)
    var = lambda u: p.sigma(u) ** 2  # noqa: E731
    assert torch.allclose(fd(var), -2 * p.theta(t) * var(t) + p.diffusion(t) ** 2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("tmin", [0.0, 0.3])
def test_t_of_lam_at_the_clean_end(tmin):
    """``lam = inf`` (``sigma / alpha = 0``) is ``t = 0``, as for every other process. Before, with
    ``theta_min = 0`` (accepted) the stable quadratic root ``2 thetabar / (a + sqrt(a^2 + ...))`` was
    ``0 / 0``: ``t_of_lam(inf)``, ``t_of_sigma_ratio(0)`` and ``t_of_lam(400)`` (``e^{-2 lam}`` below
    float64's range) were NaN."""
    p = sd.MeanReverting(theta_min=tmin, theta_max=12.0, stationary_std=1.5)
    assert float(p.t_of_lam(math.inf)) == 0.0 and float(p.t_of_sigma_ratio(0.0)) == 0.0
    big = p.t_of_lam(torch.tensor([math.inf, 400.0, math.nan], dtype=F64))
    assert big[:2].tolist() == [0.0, 0.0] and math.isnan(big[2])  # a NaN entry stays NaN
    t = torch.tensor([1e-100, 1e-30, 1e-8], dtype=F64)  # and the round trip far below t_min still holds
    assert torch.allclose(p.t_of_lam(p.lam(t)), t, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tmin", [0.0, 0.3, 12.0])
def test_t_of_lam_far_at_the_noisy_end(tmin):
    """``t_of_lam`` inverts ``lam`` out to ``lam = -1e307``. Before, the root ``2 thetabar / (a + sqrt(a^2 +
    c^2 thetabar))`` overflowed under the square root from ``thetabar ~ 1e307 / c^2`` on and gave ``t = 0``
    (the clean end); and ``theta_bar`` was NaN (``0 * inf``) at such times for ``theta_min = theta_max``."""
    p = sd.MeanReverting(theta_min=tmin, theta_max=12.0, stationary_std=1.5)
    lam = torch.tensor([-1e307, -1e300, -1e10, -50.0], dtype=F64)
    torch.testing.assert_close(p.lam(p.t_of_lam(lam)), lam, rtol=1e-14, atol=0)


def test_unit_stationary_std_is_vp_linear():
    p, v = sd.MeanReverting(theta_min=0.05, theta_max=10.0, stationary_std=1.0), sd.VP.linear(0.1, 20.0)
    t = torch.linspace(1e-3, 1, 50, dtype=F64)
    for f in ("alpha", "sigma", "lam", "d_alpha", "d_sigma"):
        assert torch.allclose(getattr(p, f)(t), getattr(v, f)(t), rtol=1e-12, atol=1e-14), f


def test_bad_process_input():
    for kw in (
        {"theta_min": -1.0},
        {"theta_min": 3.0, "theta_max": 2.0},
        {"stationary_std": 0.0},
        {"t_min": 0.0},
    ):
        with pytest.raises(ValueError, match="MeanReverting"):
            sd.MeanReverting(**kw)
    with pytest.raises(ValueError, match="prediction"):
        sd.MeanReverting().denoiser(lambda x, t, mu: x, torch.zeros(2), prediction="flow")
    with pytest.raises(ValueError, match="prediction"):
        MRS(prediction="velocity")
    with pytest.raises(ValueError, match="order"):
        MRS(order=3)


def _refused(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


def test_bad_mu_and_net_are_refused_naming_them():
    """Before: ``mu=None`` / ``"a"`` a RuntimeError / TypeError of torch's, a NaN ``mu`` accepted (sampling
    then stopped with "the model returned NaN/inf at step 0"), a bool ``mu`` taken as 0/1, ``net=None``
    accepted (a TypeError at the first call), a ``mu`` of another shape torch's RuntimeError "The size of
    tensor a (8) must match the size of tensor b (3)" from inside the denoiser, and a sampler condition
    ``mu=`` a TypeError "got multiple values for keyword argument 'mu'"."""
    proc = sd.MeanReverting(theta_min=0.3, theta_max=8.0, stationary_std=0.5)
    who = "MeanReverting.denoiser"
    mu, y = torch.zeros(8, dtype=F64), torch.zeros(4, 8, dtype=F64)

    def net(x, t, mu):
        return x

    _refused(lambda: proc.denoiser(net, None), f"{who}: mu must be a tensor or array of numbers, got None")
    _refused(lambda: proc.denoiser(net, "a"), f"{who}: mu must be a tensor or array of numbers, got 'a'")
    for bad in (torch.tensor([0.0, math.nan]), torch.tensor([math.inf, 0.0])):
        _refused(
            lambda bad=bad: proc.denoiser(net, bad),
            f"{who}: mu must be finite real numbers (a tensor or array), got NaN or inf",
        )
    _refused(
        lambda: proc.denoiser(net, torch.zeros(8, dtype=torch.bool)),
        f"{who}: mu must be finite real numbers (a tensor or array), got a torch.bool tensor",
    )
    _refused(
        lambda: proc.denoiser(None, mu),
        f"{who}: net must be callable as net(x, t, mu=mu, **cond), got NoneType",
    )
    for bad in (torch.zeros(3), torch.zeros(5, 8), torch.zeros(4, 1, 8)):
        _refused(
            lambda bad=bad: sd.sample(proc.denoiser(net, bad), y, 3, "mrs"),
            f"{who}: mu has shape {tuple(bad.shape)}, which does not broadcast to the samples' (4, 8): "
            "give one mu of shape (8,) for all samples or one per sample, (4, 8)",
        )
    _refused(
        lambda: sd.sample(proc.denoiser(net, mu), y, 3, "mrs", mu=mu),
        f"{who}: the net gets this denoiser's mu; a condition named mu (a keyword of the sampler) would be a "
        "second one: give mu to MeanReverting.denoiser only",
    )
    # what broadcasts is taken: a scalar, a list, a (1, 8), an integer tensor, one per sample
    for good in (0.0, [0.0] * 8, torch.zeros(1, 8), torch.zeros(8, dtype=torch.long), torch.zeros(4, 8)):
        assert torch.equal(proc.denoiser(net, good, prediction="x0")(y, 0.5).x0, y)


# --- the oracle ------------------------------------------------------------------------------


def test_marginal_and_denoiser_against_monte_carlo(mr):
    _, proc, _, _ = mr
    gmm = smooth_mixture(dim=2, components=3)  # two dimensions: importance sampling stays efficient
    mu = torch.tensor([0.7, -1.2], dtype=F64)
    den = gmm.mean_reverting_denoiser(proc, mu)
    t = 0.15
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    n = 200_000
    x0 = gmm.sample(n, _gen(1))
    xt = mu + a * (x0 - mu) + s * torch.randn(n, 2, generator=_gen(2), dtype=F64)  # the SDE's solution
    marg = gmm.mean_reverting_marginal(proc, mu, t)
    w = marg.weights[:, None]
    mean = (w * marg.means).sum(0)
    var = (w * (marg.variances + marg.means**2)).sum(0) - mean**2
    assert float(((xt.mean(0) - mean) / (var / n).sqrt()).abs().max()) < 4  # measured 0.66
    assert float((xt.var(0) / var - 1).abs().max()) < 0.015  # measured 3e-3
    # E[x0 | x_t] by self-normalized importance sampling over the prior draws
    queries = xt[:4]
    logw = -((queries[:, None, :] - (mu + a * (x0 - mu))[None]) ** 2).sum(-1) / (2 * s * s)
    wts = torch.softmax(logw, dim=1)
    mc = wts @ x0
    ess = 1 / (wts**2).sum(1)
    exact = den(queries - mu, t).x0 + mu
    # measured: max abs error 3.6e-3 with ESS >= 13000 (the query itself is 0.12 away)
    assert float(ess.min()) > 5000
    assert float((mc - exact).abs().max()) < 0.015
    assert float((mc - exact).abs().max()) < 0.1 * float((mc - queries).abs().max())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_denoiser_wrapper_parameterizations(mr, prediction):
    _, proc, mu, exact = mr
    lam = proc.stationary_std

    def net(x: torch.Tensor, t: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        tt = float(t[0])
        a, s = float(proc.alpha(tt)), float(proc.sigma(tt))
        x0 = exact(x - mu, tt).x0 + mu
        eps = (x - mu - a * (x0 - mu)) / s
        return {"eps": eps, "x0": x0, "v": lam * a * eps - (s / lam) * (x0 - mu), "score": -eps / s}[
            prediction
        ]

    den = proc.denoiser(net, mu, prediction=prediction)
    y = noise(5, 8) * 0.4
    for t in (0.01, 0.2, 0.9):
        assert torch.allclose(den(y, t).x0, exact(y, t).x0, rtol=0, atol=1e-10)
        assert torch.allclose(den(y, t).eps, exact(y, t).eps, rtol=0, atol=1e-8)


# --- deterministic sampling: the exact PF-ODE solution ----------------------------------------


@pytest.fixture(scope="module")
def ode(mr):
    gmm, proc, mu, _ = mr
    y_T = float(proc.sigma(proc.t_max)) * noise(16, 8)
    return y_T, gmm.shifted(-mu).reference_ode(y_T, proc, proc.t_max, proc.t_min, denoise=True)


@pytest.mark.parametrize(
    ("solver", "order"),
    [("dpmpp_2m", 2), ("mrs", 2), (MRS(prediction="noise"), 2), (MRS(order=1), 1), ("unipc", 3)],
    ids=["dpmpp_2m", "mrs_data", "mrs_noise", "mrs_1", "unipc"],
)
def test_ode_solvers_converge_on_the_mr_process(mr, ode, solver, order):
    _, _, mu, den = mr
    y_T, exact = ode
    steps = [5, 10, 20, 40]
    errs = [rel_rmse(sd.sample(den, y_T, s, solver, "logsnr_uniform") + mu, exact + mu) for s in steps]
    # measured at 40 steps: dpmpp_2m 2.2e-3, mrs 3.4e-3 (noise 3.9e-3), mrs-1 4.0e-2, unipc 9.8e-5;
    # slopes 1.89, 1.93, 1.92, 1.04, 3.78
    assert errs[-1] < {1: 5e-2, 2: 5e-3, 3: 3e-4}[order]
    assert slope(steps, errs) > order - 0.2


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_mrs_first_order_is_ddim(mr, ode, prediction):
    _, _, _, den = mr
    y_T, _ = ode
    ddim = sd.sample(den, y_T, 7, "ddim", "logsnr_uniform")
    ours = sd.sample(den, y_T, 7, MRS(order=1, prediction=prediction), "logsnr_uniform")
    assert torch.allclose(ours, ddim, rtol=0, atol=1e-12)


def test_mrs_data_takes_a_long_step_after_short_ones_at_first_order(mr, ode):
    """time_uniform at 10 steps ends this process with a step of 2.84 in log-SNR, 4.2 times the one before;
    the line through the two estimates before it, extrapolated over it, amplified their errors. The data
    form's default long-step rule (``max_h=2, max_h_ratio=2``, as dpmpp_2m's) takes that step at first
    order: relative RMSE against the exact ODE and denoiser 0.174 before (``max_h=inf``), 0.0169 now
    (dpmpp_2m 0.0211, DDIM 0.116)."""
    _, proc, mu, den = mr
    y_T, exact = ode
    grid = sd.solvers.make_grid(proc, sd.schedules.get("time_uniform"), 10)
    assert grid.h(8) > ODE_MAX_H and grid.h(8) > ODE_MAX_H_RATIO * grid.h(7)
    err = rel_rmse(sd.sample(den, y_T, 10, "mrs", "time_uniform") + mu, exact + mu)
    assert err < 0.025
    plain = rel_rmse(sd.sample(den, y_T, 10, MRS(max_h=math.inf), "time_uniform") + mu, exact + mu)
    assert plain > 5 * err


@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
def test_mrs_noise_form_has_no_long_step_rule(mr, ode, sde):
    """The noise form extrapolates ``eps``, as DEIS does, and the rule does not help it: on the case above
    the ODE with the data form's rule (``max_h=2, max_h_ratio=2``) ends 0.0427 from the exact answer,
    0.0251 without. So by default it has none: bit-equal to ``max_h=inf``, ODE and SDE."""
    _, _, mu, den = mr
    y_T, exact = ode
    solver = MRS(prediction="noise", sde=sde)
    assert solver.long_step == (math.inf, 0.0)
    plain = MRS(prediction="noise", sde=sde, max_h=math.inf)
    a = sd.sample(den, y_T, 10, solver, "time_uniform", generator=_gen(1))
    assert torch.equal(a, sd.sample(den, y_T, 10, plain, "time_uniform", generator=_gen(1)))
    if not sde:
        ruled = MRS(prediction="noise", max_h=ODE_MAX_H, max_h_ratio=ODE_MAX_H_RATIO)
        with_rule = rel_rmse(sd.sample(den, y_T, 10, ruled, "time_uniform") + mu, exact + mu)
        assert with_rule > 1.4 * rel_rmse(a + mu, exact + mu)


def test_mrs_sde_data_keeps_the_variance_over_a_long_last_step(gmm, sd_process):
    """As for dpmpp_2m_sde (``tests/test_stochastic_basic.py``): time_uniform's last noisy step is ~3.6 times
    the one before under SD betas, and extrapolating the noisy estimates over it inflates the variance. The
    SDE data form's default rule (``max_h=0.5, max_h_ratio=2``): variance of the samples / true at 20 steps
    1.72 before (``max_h=inf``), 0.99 now. 8192 draws of the exact p_T; one standard error of the mean ratio
    ~0.006."""
    p, n = sd_process, 8192
    var = gmm.sample(200_000, _gen(2)).var(0)
    ratios = []
    for solver in (MRS(sde=True), MRS(sde=True, max_h=math.inf)):
        g = _gen(1)
        x_T = float(p.alpha(p.t_max)) * gmm.sample(n, g) + float(p.sigma(p.t_max)) * torch.randn(
            n, gmm.dim, generator=g, dtype=F64
        )
        x = sd.sample(gmm.denoiser(p), x_T, steps=20, solver=solver, schedule="time_uniform", generator=g)
        ratios.append(float((x.var(0) / var).mean()))
    assert ratios[0] == pytest.approx(1.0, abs=0.04) and ratios[1] > 1.5, ratios


def test_mrs_long_step_defaults_and_bad_values():
    # None: the form's default (the data form's ODE / SDE rule, none for the noise form); values as given
    def rule(**kw):
        return MRS(**kw).long_step

    assert rule() == (ODE_MAX_H, ODE_MAX_H_RATIO) and rule(sde=True) == (SDE_MAX_H, SDE_MAX_H_RATIO)
    assert rule(prediction="noise") == rule(prediction="noise", sde=True) == (math.inf, 0.0)
    assert rule(max_h=1.0, max_h_ratio=0.0) == (1.0, 0.0)
    assert rule(sde=True, max_h=1.0) == (1.0, SDE_MAX_H_RATIO)
    assert rule(prediction="noise", max_h=2.0) == (2.0, 0.0)
    # the form's default follows a replace (it was resolved once and stored: the data form's 2.0 stayed)
    assert dataclasses.replace(MRS(), prediction="noise").long_step == (math.inf, 0.0)
    assert dataclasses.replace(MRS(), sde=True).long_step == (SDE_MAX_H, SDE_MAX_H_RATIO)
    for bad in (0.0, -1.0, "0.8", True, math.nan):
        with pytest.raises(ValueError, match=r"^MRSampler: max_h must be a number > 0 or inf, got "):
            MRS(max_h=bad)
    for bad in (-0.5, math.inf, math.nan, "2"):
        with pytest.raises(ValueError, match=r"^MRSampler: max_h_ratio must be a finite number >= 0, got "):
            MRS(prediction="noise", max_h_ratio=bad)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"])
@pytest.mark.parametrize("steps", [8, 20])
def test_mrs_matches_diffusers_heun_multistep(gmm, sd_process, x_T, algorithm, steps):
    # MRS-2 integrates the line through the last two estimates exactly: DPM-Solver 2M with
    # diffusers' solver_type="heun" (on a VP process: MRS's update holds for any alpha, sigma), the
    # ODE and, under the same noise, the SDE (every step but the first and, below 15 steps, the
    # last one weights d_1)
    diffusers = pytest.importorskip("diffusers")

    sde, data = algorithm.startswith("sde-"), algorithm.endswith("++")
    # diffusers' noise form cannot end at sigma = 0: it ends at sigma_min, the process's t = 0
    final = "zero" if data else "none"
    sched = diffusers.DPMSolverMultistepScheduler(
        **sd_betas_config(
            solver_type="heun",
            algorithm_type=algorithm,
            final_sigmas_type="zero" if final == "zero" else "sigma_min",
        )
    )
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps, generator=_gen(3))
    # diffusers draws randn(float32) from the generator at every step, also into sigma = 0
    g = _gen(3)
    noise_src = Replay([torch.randn(x_T.shape, generator=g) for _ in range(steps)])
    nodes = nodes_of(sched) if final == "zero" else sd.schedules.Custom([*nodes_of(sched).grid.tolist(), 0.0])
    solver, den = MRS(prediction="data" if data else "noise", sde=sde), gmm.denoiser(sd_process)
    x, info = sd.sample(den, x_T, steps, solver, nodes, final=final, generator=noise_src, return_info=True)
    assert info.nfe == nfe == steps
    assert noise_src.calls == (steps - (final == "zero") if sde else 0)  # no draw into a clean end
    # measured SDE (8, 20 steps): data 1.2e-6, 4.6e-7; noise 6.5e-7, 9.9e-7 (diffusers steps in float32)
    assert rel_rmse(x, ref) < PARITY_BOUND["DPMSolverMultistepScheduler(heun)"]


@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
def test_mrs_noise_float32_keeps_float64_accuracy_at_zero_terminal_snr(sde):
    """The noise form ``(alpha'/alpha) x - ...`` multiplies ``x`` by ``alpha'/alpha`` (80-260 on the first
    step out of zero terminal SNR, ``alpha = 2^-12``) and cancels it against ``eps``; DDIM's renoise of the
    net's estimate plus the history's terms does not. Measured (16-d mixture, 256 samples, float32 against
    float64 under the same noise, orders 1-2 over these grids): ODE before up to 8.3e-4, its order 1 up to
    0.026 from DDIM's float32 result; SDE up to 1.4e-5. Now at most 1.9e-6 (ODE) and 1.7e-6 (SDE), order 1
    DDIM's result exactly."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    proc = sd.VP.discrete(alphas_cumprod=sd.VP.scaled_linear().alphas_cumprod, rescale_zero_snr=True)
    den, x_T = gmm.denoiser(proc), noise(256, 16, seed=0)
    for schedule, steps, order in itertools.product(("karras_capped", "time_uniform"), (10, 25), (1, 2)):
        solver = MRS(order=order, prediction="noise", sde=sde)
        a = sd.sample(den, x_T, steps, solver, schedule, generator=Noise64(3))
        b = sd.sample(den, x_T.float(), steps, solver, schedule, generator=Noise64(3))
        assert rel_rmse(b.double(), a) < 5e-6, (schedule, steps, order)
        if order == 1 and not sde:
            assert torch.equal(b, sd.sample(den, x_T.float(), steps, "ddim", schedule))


def test_per_sample_mu_follows_the_particles():
    """One ``mu`` per batch row (each degraded input its own) must stay with that row's particles. Clean
    data ``x_0 ~ N(c, v I)`` whatever ``mu``, so ``y_0 = x_0 - mu_b`` and the exact net is
    ``E[x_0 | x_t, mu]``; FK steering at ``lam = 0`` (no tilt) must end at ``x = mu_b + y`` with mean ``c``
    in every row. Before, the denoiser kept its ``mu`` of ``batch`` rows for the ``batch x particles`` rows
    of the particles: a RuntimeError in the net (192 rows against 3)."""
    proc = sd.MeanReverting(theta_min=0.3, theta_max=8.0, stationary_std=0.5)
    c, v = torch.tensor([0.5, -1.0], dtype=F64), 0.01
    mu = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-3.0, -3.0]], dtype=F64)

    def net(x: torch.Tensor, t: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        a, s = proc.alpha(t.double())[:, None], proc.sigma(t.double())[:, None]
        m0 = c - mu  # the mean of y_0 given mu
        return mu + m0 + a * v / (a * a * v + s * s) * (x - mu - a * m0)

    den = proc.denoiser(net, mu, prediction="x0")
    out = sd.smc.fk_steering(
        den,
        lambda x: x[:, 0],
        lam=0.0,
        shape=(3, 2),
        particles=64,
        steps=20,
        solver="ddpm",
        generator=_gen(1),
    )
    x = out.x + mu[:, None]
    # per row 64 samples of std <= 0.1 (standard error <= 0.0125); measured max |mean - c| 0.014 (also with
    # max_batch=50); a row run with another row's mu would be off by >= 4.9
    assert torch.allclose(x.mean(1), c.expand(3, 2), rtol=0, atol=0.06), x.mean(1)


# --- stochastic sampling: distance to exact samples -------------------------------------------


@pytest.fixture(scope="module")
def dist(mr):
    gmm, proc, _, _ = mr
    n = 1000
    floor = sd.metrics.floor(gmm.sample, n, repeats=3, generator=_gen(2))
    return float(proc.sigma(proc.t_max)) * noise(n, 8, seed=3), gmm.sample(n, _gen(9)), floor


@pytest.mark.parametrize(
    "solver",
    ["ddpm", MRS(sde=True), MRS(sde=True, prediction="noise"), MRS(sde=True, order=1)],
    ids=["ddpm", "mrs_sde_data", "mrs_sde_noise", "mrs_sde_1"],
)
def test_sde_samplers_reach_the_floor_on_the_mr_process(mr, dist, solver):
    _, _, mu, den = mr
    y_T, ref, floor = dist
    y = sd.sample(den, y_T, 100, solver, "logsnr_uniform", generator=_gen(4))
    sw = sd.metrics.sliced_wasserstein(y + mu, ref, generator=_gen(5))
    # floor 0.090; measured 1.23x (ddpm, mrs-1), 1.13x (data), 1.14x (noise)
    assert sw < 1.5 * floor


def test_mrs_sde_first_order_data_is_ddpm(mr, ode):
    # the first-order SDE-DPM-Solver++ step is the ancestral DDPM step (Lu et al. 2022b)
    _, _, _, den = mr
    y_T, _ = ode
    a = sd.sample(den, y_T, 12, MRS(sde=True, order=1), "logsnr_uniform", generator=_gen(1))
    b = sd.sample(den, y_T, 12, "ddpm", "logsnr_uniform", generator=_gen(1))
    assert torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_mrs_sde_transition_is_the_step(mr, ode, prediction):
    # the returned (mean, std): the mean is the ODE-free drift part, std the exact noise scale
    _, proc, _, den = mr
    y_T, _ = ode
    solver = MRS(sde=True, prediction=prediction)
    grid = sd.solvers.make_grid(proc, sd.schedules.get("logsnr_uniform"), 6)
    model = sd.solvers.Model(den)
    state = solver.init_state(grid)
    out = solver.step(model, y_T, 0, grid, state)
    h = grid.h(0)
    scale = grid.sigma[1] if prediction == "data" else grid.alpha[1] * grid.sigma[0] / grid.alpha[0]
    assert isinstance(out, sd.solvers.Transition) and solver.stochastic
    assert out.std == pytest.approx(scale * math.sqrt(1 - math.exp(-2 * h)), rel=1e-12)
    x0 = den(y_T, grid.t[0]).x0
    if prediction == "data":  # first step: e^{-h} sigma'/sigma y + alpha' (1 - e^{-2h}) x0
        want = (
            grid.sigma[1] / grid.sigma[0] * math.exp(-h) * y_T + grid.alpha[1] * (1 - math.exp(-2 * h)) * x0
        )
        assert torch.allclose(out.mean, want, rtol=0, atol=1e-12)
    last = solver.step(model, out.mean, 5, grid, state)
    assert torch.is_tensor(last)  # into the clean end: the denoised estimate, std 0


def test_mrs_noise_sde_diverges_on_a_long_first_step_out_of_zero_terminal_snr():
    """The module docstring's numbers: the noise form's SDE step holds eps fixed with weight 2 sigma'
    (e^h - 1), so over karras_capped's first step out of zero terminal SNR (h ~ 5.4) its mean is ~(2 - e^h)
    times the exact one's scale. Sliced W2 to 1024 exact samples (floor 0.078), 10 / 20 / 50 steps: order 2
    38 / 1.3 / 1.0, order 1 0.23 / 0.37 / 0.42, data form 0.083 / 0.068 / 0.059."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    proc = sd.VP.discrete(alphas_cumprod=sd.VP.scaled_linear().alphas_cumprod, rescale_zero_snr=True)
    den, n = gmm.denoiser(proc), 1024
    exact = gmm.sample(n, torch.Generator().manual_seed(1))
    x_T = torch.randn(n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    MRS = sd.solvers.MRSampler
    for steps in (20, 50):
        noise, noise_1, data = (
            sd.metrics.sliced_wasserstein(
                sd.sample(den, x_T, steps, s, "karras_capped", generator=torch.Generator().manual_seed(3)),
                exact,
            )
            for s in (
                MRS(prediction="noise", sde=True),
                MRS(order=1, prediction="noise", sde=True),
                MRS(sde=True),
            )
        )
        assert noise > 0.9 and noise_1 > 0.3 and data < 0.08, (steps, noise, noise_1, data)


# --- the discrete process of the released IR-SDE models (MeanReverting.cosine / .discrete) ---------------


def _irsde_cosine_theta_bar(T: int, eps: float, s: float = 0.008) -> torch.Tensor:
    """The IR-SDE code's ``cosine`` table, from its formula in float64: ``a_j = f(j / (T + 2)) / f(0)``,
    ``thetas = 1 - a[1:-1]`` (``T + 1`` values), ``thetas_cumsum = cumsum(thetas) - thetas[0]``,
    ``dt = -log(eps) / thetas_cumsum[-1]``; ``thetabar_i = thetas_cumsum[i] dt``."""
    j = torch.arange(T + 3, dtype=F64)
    f = torch.cos((j / (T + 2) + s) / (1 + s) * math.pi / 2) ** 2
    thetas = 1 - (f / f[0])[1:-1]
    cumsum = torch.cumsum(thetas, 0) - thetas[0]
    return cumsum * (-math.log(eps) / cumsum[-1])


@pytest.mark.parametrize(
    ("T", "eps", "lam"), [(100, 0.005, 10 / 255), (100, 0.005, 50 / 255), (37, 0.01, 0.5)]
)
def test_cosine_table_is_the_irsde_schedule(T, eps, lam):
    """Step ``i`` has the IR-SDE marginal ``x_i = mu + (x_0 - mu) e^{-thetabar_i} + lambda sqrt(1 -
    e^{-2 thetabar_i}) eps``, ``e^{-thetabar_T} = eps``; the net sees steps ``1, ..., T`` as its time."""
    p = sd.MeanReverting.cosine(T, eps, stationary_std=lam)
    tb = _irsde_cosine_theta_bar(T, eps)
    assert (p.t_min, p.t_max) == (1.0, float(T)) and isinstance(p, sd.MeanReverting)
    torch.testing.assert_close(p.theta_bars, tb, rtol=1e-13, atol=0)
    steps = torch.arange(T + 1, dtype=F64)
    torch.testing.assert_close(p.theta_bar(steps), tb, rtol=1e-13, atol=0)
    assert float(p.alpha(float(T))) == pytest.approx(eps, rel=1e-14)
    a, s, lm = p.coefficients(steps[1:])
    torch.testing.assert_close(a, torch.exp(-tb[1:]), rtol=1e-13, atol=0)
    torch.testing.assert_close(s, lam * torch.sqrt(1 - torch.exp(-2 * tb[1:])), rtol=1e-12, atol=0)
    torch.testing.assert_close(lm, torch.log(a / s), rtol=0, atol=1e-12)
    assert torch.equal(p.model_time(steps), steps)
    # step 0 is the clean x_0 (never given to the net): alpha = 1, sigma = 0, lam = inf, t_of_lam(inf) = 0
    assert float(p.alpha(0.0)) == 1.0 and float(p.sigma(0.0)) == 0.0 and float(p.lam(0.0)) == math.inf
    assert float(p.t_of_lam(math.inf)) == 0.0 and float(p.t_of_lam(-math.inf)) == float(T)
    # the code's own float32 arithmetic (their table) is within float32 rounding of it: measured 3.3e-5
    # (thetabar, the first steps, 1 - a_j where a_j ~ 1) and 6.8e-6 (sigma) at T = 100
    j = torch.linspace(0, T + 2, T + 3, dtype=torch.float32)
    f32 = torch.cos(((j / (T + 2)) + 0.008) / (1 + 0.008) * math.pi * 0.5) ** 2
    th32 = 1 - (f32 / f32[0])[1:-1]
    cs32 = torch.cumsum(th32, 0) - th32[0]
    tb32 = (cs32 * (-1 / cs32[-1] * math.log(eps))).double()
    assert float(((tb32[1:] - tb[1:]) / tb[1:]).abs().max()) < 1e-4


def test_discrete_interpolates_theta_bar_linearly():
    """Between steps ``thetabar`` is linear (``theta`` constant on each step, IR-SDE's rate for it): the
    OU moment ODE ``var' = -2 theta var + diffusion^2`` holds inside every step, ``lam`` decreases strictly
    and ``t_of_lam`` inverts it to 1e-10 at fractional and integer steps; ``MeanReverting.discrete`` of the
    table is the same process, bit for bit."""
    p = sd.MeanReverting.cosine(100, 0.005, stationary_std=0.3)
    q = sd.MeanReverting.discrete(p.theta_bars.tolist(), stationary_std=0.3)
    tb = p.theta_bars
    k = torch.arange(1, 100, dtype=F64)
    for w in (0.25, 0.5, 0.9):
        torch.testing.assert_close(
            p.theta_bar(k + w), (1 - w) * tb[1:100] + w * tb[2:101], rtol=1e-14, atol=0
        )
        torch.testing.assert_close(p.theta(k + w), tb[2:101] - tb[1:100], rtol=1e-14, atol=0)
    t = torch.cat([torch.linspace(1, 100, 3001, dtype=F64), k + 0.37, k])
    for f in ("alpha", "sigma", "lam", "d_alpha", "d_sigma", "theta", "diffusion"):
        assert torch.equal(getattr(p, f)(t), getattr(q, f)(t)), f
    assert float((p.t_of_lam(p.lam(t)) - t).abs().max()) < 1e-10
    lam = p.lam(torch.linspace(0.5, 100, 4001, dtype=F64))
    assert bool((lam[1:] < lam[:-1]).all())
    d, u = 1e-6, (k + 0.37)
    var = lambda v: p.sigma(v) ** 2  # noqa: E731
    fd_var = (var(u + d) - var(u - d)) / (2 * d)
    torch.testing.assert_close(fd_var, -2 * p.theta(u) * var(u) + p.diffusion(u) ** 2, rtol=1e-6, atol=1e-9)
    fd_a = (p.alpha(u + d) - p.alpha(u - d)) / (2 * d)
    torch.testing.assert_close(p.d_alpha(u), fd_a, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sd.MeanReverting.discrete([0.0, 0.1, 0.1, 0.3]), "strictly increasing"),
        (lambda: sd.MeanReverting.discrete([-0.1, 0.1, 0.3]), ">= 0"),
        (lambda: sd.MeanReverting.discrete([0.0, 0.1]), "at least 2 values > 0"),
        (lambda: sd.MeanReverting.discrete([0.1, math.inf]), "finite"),
        (lambda: sd.MeanReverting.discrete([[0.1, 0.2]]), "1-d array"),
        (lambda: sd.MeanReverting.discrete([0.1, 0.2], stationary_std=0.0), "stationary_std"),
        (lambda: sd.MeanReverting.cosine(1), "num_train_timesteps"),
        (lambda: sd.MeanReverting.cosine(100, eps=1.0), "eps"),
        (lambda: sd.MeanReverting.cosine(100, s=-0.1), "s must"),
    ],
)
def test_bad_discrete_input(call, message):
    with pytest.raises(ValueError, match=r"^MeanReverting\.(discrete|cosine): ") as err:
        call()
    assert message in str(err.value)


def test_discrete_without_a_clean_step_starts_at_0():
    """A table whose step 0 is noisy (``thetabar_0 > 0``) is sampled from step 0, as ``VP.discrete``."""
    p = sd.MeanReverting.discrete([0.01, 0.5, 2.0, 5.0], stationary_std=2.0)
    assert (p.t_min, p.t_max) == (0.0, 3.0)
    assert float(p.alpha(0.0)) == pytest.approx(math.exp(-0.01), rel=1e-15)
    assert float(p.t_of_lam(math.inf)) == 0.0 and float(p.t_of_lam(-math.inf)) == 3.0


@pytest.fixture(scope="module")
def mr_cosine():
    gmm = smooth_mixture()
    proc = sd.MeanReverting.cosine(100, 0.005, stationary_std=0.5)
    mu = torch.randn(8, generator=_gen(7), dtype=F64)
    den = gmm.mean_reverting_denoiser(proc, mu)
    y_T = float(proc.sigma(proc.t_max)) * noise(16, 8)
    exact = gmm.shifted(-mu).reference_ode(y_T, proc, proc.t_max, proc.t_min, denoise=True)
    return gmm, proc, mu, den, y_T, exact


@pytest.mark.parametrize(
    ("solver", "bound"),
    [("mrs", 5e-3), (MRS(prediction="noise"), 5e-3), ("unipc", 2e-4), ("dpmpp_2m", 4e-3), ("deis", 8e-4)],
    ids=["mrs_data", "mrs_noise", "unipc", "dpmpp_2m", "deis"],
)
@pytest.mark.parametrize("schedule", ["logsnr_uniform", "karras_capped"])
def test_ode_solvers_reach_the_exact_ode_on_the_cosine_process(mr_cosine, solver, bound, schedule):
    """The exact PF-ODE solution of the mixture oracle (``y = x - mu``) from step 100 to step 1, then the
    exact denoiser. Measured at 50 steps (logsnr_uniform / karras_capped): mrs 3.0e-3 / 3.2e-3, its noise
    form 3.4e-3 / 1.8e-3, unipc 7.6e-5 / 9.3e-5, dpmpp_2m 2.0e-3 / 2.2e-3, deis 3.8e-4 / 2.5e-4; at 10
    steps 5-100x more."""
    _, _, mu, den, y_T, exact = mr_cosine
    err = rel_rmse(sd.sample(den, y_T, 50, solver, schedule) + mu, exact + mu)
    assert err < bound
    assert rel_rmse(sd.sample(den, y_T, 10, solver, schedule) + mu, exact + mu) > 3 * err


@pytest.mark.parametrize("solver", [MRS(sde=True), "ddpm"], ids=["mrs_sde", "ddpm"])
def test_sde_samplers_reach_the_exact_law_on_the_cosine_process(mr_cosine, solver):
    """Sliced W2 of ``x = mu + y`` to 1000 exact draws of the mixture, from exact draws of ``p(x_T | mu)``
    (``gmm.mean_reverting_marginal``) at 60 steps; measured 1.12x (mrs) and 1.25x (ddpm) the floor 0.090
    (at 20 steps 1.60x, 2.62x)."""
    gmm, proc, mu, den, _, _ = mr_cosine
    n = 1000
    floor = sd.metrics.floor(gmm.sample, n, repeats=3, generator=_gen(2))
    x_T = gmm.mean_reverting_marginal(proc, mu, proc.t_max).sample(n, _gen(3))
    y = sd.sample(den, x_T - mu, 60, solver, "logsnr_uniform", generator=_gen(4))
    sw = sd.metrics.sliced_wasserstein(y + mu, gmm.sample(n, _gen(9)), generator=_gen(5))
    assert sw < 1.5 * floor, (sw, floor)


def test_deis_tab_weights_split_at_the_integer_steps():
    """tAB-DEIS integrates ``l_j(t) d rho`` by Gauss-Legendre quadrature, which needs the integrand smooth on
    each piece: ``t(lam)`` has a kink at every integer step of the discrete process (``thetabar`` is linear
    between them). Without splitting there (before) the weights of a step over 7.6 steps were 1.6e-4 off an
    adaptive quadrature split at the integers (scipy, rtol 1e-13); split, 2.2e-16."""
    from scipy.integrate import quad

    p = sd.MeanReverting.cosine(100, 0.005, stationary_std=0.5)
    nodes, t_next = [60.3, 67.9, 75.5], 52.7

    def integrand(j: int, t: float) -> float:
        a, s, da, ds = (float(f(t)) for f in (p.alpha, p.sigma, p.d_alpha, p.d_sigma))
        lj = math.prod((t - tm) / (nodes[j] - tm) for m, tm in enumerate(nodes) if m != j)
        return lj * (ds * a - s * da) / (a * a)  # l_j(t) rho'(t)

    edges = [t_next, *range(53, 61), nodes[0]]
    want = [
        -sum(
            quad(lambda t, j=j: integrand(j, t), a, b, epsabs=0, epsrel=1e-13)[0]
            for a, b in itertools.pairwise(edges)
        )
        for j in range(3)
    ]
    got = sd.solvers.deis.tab_weights(p, nodes, t_next)
    assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 1e-12
