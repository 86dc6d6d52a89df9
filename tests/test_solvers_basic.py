"""DDIM, Euler, Heun and DPM-Solver++ (2M, 3M): parity with diffusers and convergence order.

Parity: diffusers' scheduler is driven by the *exact* Gaussian-mixture model on its own grid
(``diffusers_sample``), steerdiff runs on the same nodes (``nodes_of``); outputs must agree to
relative RMSE below ``PARITY_BOUND[scheduler]`` (diffusers steps in float32, so ~1e-7 is the floor;
``tests/reference.py`` gives the measured values) with equal NFE.
Order: the least-squares slope of log error against log steps on the smooth mixture.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

import steerdiff as sd

from .reference import (
    PARITY,
    PARITY_BOUND,
    diffusers_sample,
    eps_net,
    exact_sample,
    nodes_of,
    noise,
    rel_rmse,
    sd_betas_config,
    slope,
)

STEPS = (10, 25)


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def _ours(gmm, process, x_T, steps, solver, schedule):
    return sd.sample(
        gmm.denoiser(process), x_T, steps=steps, solver=solver, schedule=schedule, return_info=True
    )


def _vp_scale(sched, steps: int) -> float:
    """Factor that makes a k-diffusion-style diffusers scheduler start from *our* VP state.

    Euler/Heun with ``linspace``/``trailing`` spacing set ``init_noise_sigma = sigma_max`` instead of
    the exact ``sqrt(sigma_max^2 + 1)`` of ``x_T / alpha(t_max)`` (a 0.23% scale difference at SD's
    sigma_max = 14.6, which alone gives a 1.5e-3 mismatch); ``leading`` uses the exact value.
    """
    sched.set_timesteps(steps)
    sigma_max = float(sched.sigmas.max())
    return math.sqrt(sigma_max**2 + 1) / float(sched.init_noise_sigma)


@pytest.fixture(scope="module")
def order_problem(gmm, sd_process):
    """Exact-model problem for accuracy checks: 4 samples and their exact answer."""
    x_T = noise(4, 8)
    return gmm.denoiser(sd_process), x_T, exact_sample(gmm, sd_process, x_T)


# --- DDIM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize(
    ("spacing", "offset", "ours"),
    [
        ("leading", 0, sd.schedules.Leading()),
        ("leading", 1, sd.schedules.Leading(steps_offset=1)),  # Stable Diffusion's config
        ("trailing", 0, sd.schedules.Trailing()),
    ],
)
def test_ddim_matches_diffusers(diffusers, gmm, sd_process, x_T, steps, spacing, offset, ours):
    # diffusers' DDIM steps from t to t - N_train // N (not to the next timestep): the grid is ours
    # (nodes + clean end) exactly when that is the next node, true for leading spacing and for
    # trailing when N divides N_train. With "linspace" spacing (or trailing with N = 7, say) the
    # state lands on t - N_train // N but is next evaluated at the next timestep: not a grid method,
    # and not reproducible. clip_sample=False: DDIM's default clips x0 to [-1, 1].
    cfg = sd_betas_config(
        clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing, steps_offset=offset
    )
    sched = diffusers.DDIMScheduler(**cfg)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps)
    ts = sched.timesteps.tolist()
    ratio = sched.config.num_train_timesteps // steps
    assert [t - ratio for t in ts[:-1]] == ts[1:]  # each step lands on the next node ...
    assert ts[-1] - ratio < 0 and float(sched.final_alpha_cumprod) == 1.0  # ... the last on alpha = 1
    assert ours(sd_process, steps).tolist() == nodes_of(sched).grid.tolist() == ts

    x, info = _ours(gmm, sd_process, x_T, steps, "ddim", ours)
    assert info.grid.t[:-1] == ts and info.grid.alpha[-1] == 1.0 and info.grid.sigma[-1] == 0.0
    assert info.nfe == nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["DDIMScheduler"]


# --- Euler and Heun (k-diffusion variables) ----------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("karras", [False, True])
def test_euler_matches_diffusers(diffusers, gmm, sd_process, x_T, steps, karras):
    sched = diffusers.EulerDiscreteScheduler(**sd_betas_config(use_karras_sigmas=karras))
    scale = _vp_scale(sched, steps)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T * scale, steps)
    nodes = nodes_of(sched)
    # diffusers' timesteps (fractional with karras, and with linspace when N - 1 does not divide
    # 999) are our process times: sigma/alpha there is the sigma it steps with (log-sigma linear
    # between integers, which its _sigma_to_t inverts), then sigma = 0. Off by 1.3e-5 from its
    # float32 alphas_cumprod; 2.3e-5 at 25 linspace steps, where it interpolates sigma linearly.
    ratio = sd_process.sigma(nodes.grid) / sd_process.alpha(nodes.grid)
    assert torch.allclose(ratio, sched.sigmas[:-1].double(), rtol=5e-5, atol=0)
    assert float(sched.sigmas[-1]) == 0.0
    if karras:
        assert any(t != round(t) for t in nodes.grid.tolist())

    x, info = _ours(gmm, sd_process, x_T, steps, "euler", nodes)
    assert info.nfe == nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["EulerDiscreteScheduler"]


@pytest.mark.parametrize("steps", STEPS)
def test_heun_matches_diffusers(diffusers, gmm, sd_process, x_T, steps):
    sched = diffusers.HeunDiscreteScheduler(**sd_betas_config())
    scale = _vp_scale(sched, steps)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T * scale, steps)
    x, info = _ours(gmm, sd_process, x_T, steps, "heun", nodes_of(sched))
    # every node but the first is evaluated twice, and the step into sigma = 0 is Euler's
    assert info.nfe == nfe == len(sched.timesteps) == 2 * steps - 1 == sd.solvers.Heun().nfe(steps)
    assert rel_rmse(x, ref) < PARITY_BOUND["HeunDiscreteScheduler"]


# --- DPM-Solver++ multistep -------------------------------------------------------------------


def _dpmpp(order: int) -> sd.solvers.Solver:
    if order == 2:
        return sd.solvers.get("dpmpp_2m")
    return sd.solvers.DPMSolverPPMultistep(order=3, third_order="dpmsolver")


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_matches_diffusers(diffusers, gmm, sd_process, x_T, steps, order):
    sched = diffusers.DPMSolverMultistepScheduler(**sd_betas_config(solver_order=order))
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps)
    x, info = _ours(gmm, sd_process, x_T, steps, _dpmpp(order), nodes_of(sched))
    assert info.nfe == nfe == steps
    assert rel_rmse(x, ref) < PARITY_BOUND["DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("steps", [14, 15])
def test_dpmpp_3m_lower_order_final_boundary_matches_diffusers(diffusers, gmm, sd_process, x_T, steps):
    # diffusers lowers the order of the last steps below 15 steps only (len(timesteps) < 15): at 14 the
    # second-to-last step is second order, at 15 third (a rule counting down from 16 steps: 3.0e-3 off)
    sched = diffusers.DPMSolverMultistepScheduler(**sd_betas_config(solver_order=3))
    ref, _ = diffusers_sample(sched, gmm, sd_process, x_T, steps)
    x, _ = _ours(gmm, sd_process, x_T, steps, _dpmpp(3), nodes_of(sched))
    assert rel_rmse(x, ref) < PARITY_BOUND["DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_karras_matches_diffusers(diffusers, gmm, sd_process, x_T, steps):
    # With karras sigmas DPMSolverMultistepScheduler steps with the karras sigmas but rounds the
    # timesteps it hands the net to integers (beta schedules other than squaredcos_cap_v2), so the
    # net is asked about another noise level than the update assumes (5e-4 mismatch at 10 steps):
    # a grid method cannot reproduce that. Here the net gets the fractional time of the sigma the
    # scheduler steps with, which diffusers' timesteps round.
    sched = diffusers.DPMSolverMultistepScheduler(**sd_betas_config(use_karras_sigmas=True))
    sched.set_timesteps(steps)
    times = sd_process.t_of_sigma_ratio(sched.sigmas[:-1].double())
    assert torch.equal(times.round().long(), sched.timesteps)
    assert float(sched.sigmas[-1]) == 0.0

    net, x_d = eps_net(gmm, sd_process), x_T.clone()
    for t_frac, t in zip(times.tolist(), sched.timesteps, strict=True):
        x_d = sched.step(net(x_d, t_frac), t, x_d).prev_sample
    x, info = _ours(gmm, sd_process, x_T, steps, "dpmpp_2m", sd.schedules.Custom(times))
    assert info.nfe == len(sched.timesteps) == steps
    assert rel_rmse(x, x_d) < PARITY_BOUND["DPMSolverMultistepScheduler"]


def test_parity_bounds_are_within_the_contract():
    """Every scheduler's asserted bound is at most the 1e-4 the README promises."""
    assert all(0 < bound <= PARITY for bound in PARITY_BOUND.values())


def test_dpmpp_3m_default_integrates_the_quadratic(diffusers, gmm, sd_process, order_problem):
    # Our default 3M weights the second divided difference by 2 h^3 phi_3 + h_0 h^2 phi_2 (exact
    # for the quadratic through three estimates); diffusers by h^3 phi_3 + h_0 h^2 phi_2.
    den, x_T, exact = order_problem
    sched = diffusers.DPMSolverMultistepScheduler(**sd_betas_config(solver_order=3))
    ref, _ = diffusers_sample(sched, gmm, sd_process, x_T, 10)
    x, _ = _ours(gmm, sd_process, x_T, 10, "dpmpp_3m", nodes_of(sched))
    assert rel_rmse(x, ref) > PARITY

    ours = sd.sample(den, x_T, steps=20, solver="dpmpp_3m", schedule="logsnr_uniform")
    theirs = sd.sample(den, x_T, steps=20, solver=_dpmpp(3), schedule="logsnr_uniform")
    # measured: 1.5e-3 against 1.9e-3 (logsnr_uniform, 20 steps). Only on grids uniform in lam: at
    # 20 steps diffusers' weights win on karras (1.4e-3 against 3.3e-3) and time_uniform (3.6e-2
    # against 1.2e-1), where the step ratios vary and the exact quadratic extrapolates further.
    assert rel_rmse(ours, exact) < 0.9 * rel_rmse(theirs, exact)


def test_dpmpp_3m_diffusers_weight_loses_the_third_order(order_problem):
    """docs/solvers.md's footnote: with diffusers' h^3 phi_3 weight the 3M's slope over 10..40 steps on the
    log-SNR-uniform grid falls from third order (measured 3.22) to 2.69."""
    den, x_T, exact = order_problem
    slopes = []
    for third_order in ("exact", "dpmsolver"):
        solver = sd.solvers.DPMSolverPPMultistep(order=3, lower_order_final=False, third_order=third_order)
        errors = [rel_rmse(sd.sample(den, x_T, n, solver, "logsnr_uniform"), exact) for n in STEPS_ORDER]
        slopes.append(slope(STEPS_ORDER, errors))
    assert slopes[0] > 3.0 and slopes[1] < 2.85, slopes


def _linear_run(gain: float, solver: sd.solvers.Solver, h: float = 0.5, steps: int = 20) -> torch.Tensor:
    """EDM (alpha = 1, lam = -log sigma) with the denoiser ``x0 = -gain x`` from sigma = 80, ``steps``
    steps of length ``h`` in lam, no clean end: the test equation of the step's stability."""
    den = sd.Denoiser(lambda x, t: -gain * x, sd.EDM(), prediction="x0")
    sigmas = [80.0 * math.exp(-h * k) for k in range(steps + 1)]
    return sd.sample(
        den, torch.ones(1, 1, dtype=torch.float64), steps, solver, sd.schedules.Custom(sigmas), final="none"
    )


def test_dpmpp_max_h_takes_long_steps_at_first_order():
    """In ``u = x / alpha`` a step reads ``u' = e^{-h} u + (1 - e^{-h}) D``; with ``D = -G u`` and
    ``a = (1 - e^{-h}) G`` DDIM multiplies by ``e^{-h} - a`` (stable for ``a < 1 + e^{-h}``) and 2M
    with equal steps has the roots of ``z^2 - (e^{-h} - 1.5 a) z - 0.5 a``, stable for
    ``a < (1 + e^{-h}) / 2``. At h = 0.5: G = 1.5 (a = 0.59) both decay; G = 3 (a = 1.18) DDIM decays
    (factor -0.574) and 2M grows like 1.546^n; ``max_h`` below h makes the 2M run the DDIM run (to
    rounding), above h changes nothing."""
    b = math.exp(-0.5)
    ddim, two_m = sd.solvers.DDIM(), sd.solvers.DPMSolverPPMultistep(order=2, lower_order_final=False)
    for gain in (1.5, 3.0):
        a = (1 - b) * gain
        x_ddim = float(_linear_run(gain, ddim))
        assert x_ddim == pytest.approx((b - a) ** 20, rel=1e-9)
        p = b - 1.5 * a  # real roots (p +- sqrt(p^2 + 2a)) / 2
        root = (abs(p) + math.sqrt(p * p + 2 * a)) / 2
        x_2m = abs(float(_linear_run(gain, two_m)))
        assert (root < 1) == (gain == 1.5) and (x_2m < 1) == (gain == 1.5)
        if gain == 3.0:
            assert root == pytest.approx(1.546, abs=1e-3) and x_2m > root**15
        guarded = sd.solvers.DPMSolverPPMultistep(
            order=2, lower_order_final=False, max_h=0.49, max_h_ratio=0.0
        )
        assert float(_linear_run(gain, guarded)) == pytest.approx(x_ddim, rel=1e-12)
        loose = sd.solvers.DPMSolverPPMultistep(order=2, lower_order_final=False, max_h=0.51, max_h_ratio=0.0)
        assert float(_linear_run(gain, loose)) == float(_linear_run(gain, two_m))
    for bad in (0.0, -1.0, "0.8", True, math.nan):
        with pytest.raises(ValueError, match="max_h"):
            sd.solvers.DPMSolverPPMultistep(max_h=bad)
    for bad in (-0.5, math.inf, math.nan, "2"):
        for cls in (sd.solvers.DPMSolverPPMultistep, sd.solvers.UniPC):
            with pytest.raises(ValueError, match="max_h_ratio"):
                cls(max_h_ratio=bad)


def test_step_order_long_step_needs_both_conditions():
    """A step is *long* (first order) when ``h > max_h`` and ``h > max_h_ratio`` times the step before:
    on nodes with h = 0.5, 0.5, 2.5, 2.5, 0.5 (EDM, no clean end), order 3 becomes 1 at step 2 only
    (2.5 > 2 and > 2 x 0.5), at steps 2 and 3 with ``max_h_ratio = 0`` and nowhere with ``max_h = 3``."""
    lams = [-4.0, -3.5, -3.0, -0.5, 2.0, 2.5]
    grid = sd.solvers.base.make_grid(sd.EDM(), sd.schedules.Custom([math.exp(-v) for v in lams]), 5, "none")
    assert [round(grid.h(i), 9) for i in range(5)] == [0.5, 0.5, 2.5, 2.5, 0.5]

    def orders(**kw: float) -> list[int]:
        return [sd.solvers.base.step_order(i, grid, 3, 3, False, **kw) for i in range(5)]

    assert orders() == [3, 3, 3, 3, 3]
    assert orders(max_h=2.0, max_h_ratio=2.0) == [3, 3, 1, 3, 3]
    assert orders(max_h=2.0) == [3, 3, 1, 1, 3]
    assert orders(max_h=3.0, max_h_ratio=0.0) == [3, 3, 3, 3, 3]


def test_max_h_may_be_a_rule_of_the_step(gmm, sd_process, x_T):
    """``max_h`` as a rule ``(grid, i) -> limit`` (:data:`~steerdiff.solvers.base.MaxH`): a constant rule is
    the number (the same orders; the same samples, bit for bit, for every solver that takes ``max_h``,
    UniPC's noise form whose restart after a long step reads it too), and a rule that differs by step
    changes only those steps (on the nodes above, limit 3 at step 3 and 2 elsewhere: step 2 alone is long)."""
    lams = [-4.0, -3.5, -3.0, -0.5, 2.0, 2.5]
    grid = sd.solvers.base.make_grid(sd.EDM(), sd.schedules.Custom([math.exp(-v) for v in lams]), 5, "none")
    seen: list[int] = []

    def rule(g: sd.solvers.base.Grid, i: int) -> float:
        seen.append(i)
        return 3.0 if i == 3 else 2.0

    def orders(**kw) -> list[int]:
        return [sd.solvers.base.step_order(i, grid, 3, 3, False, **kw) for i in range(5)]

    assert (
        orders(max_h=lambda g, i: 2.0, max_h_ratio=0.0)
        == orders(max_h=2.0, max_h_ratio=0.0)
        == [3, 3, 1, 1, 3]
    )
    assert orders(max_h=rule, max_h_ratio=0.0) == [3, 3, 1, 3, 3]
    assert seen == [1, 2, 3, 4]  # the first step is first order anyway: not asked
    den = gmm.denoiser(sd_process)
    for cls, kw in (
        (sd.solvers.DPMSolverPPMultistep, {}),
        (sd.solvers.UniPC, {"prediction": "noise"}),
        (sd.solvers.DPMSolverSDEMultistep, {}),
        (sd.solvers.SASolver, {}),
        (sd.solvers.MRSampler, {}),
    ):
        runs = []
        for max_h in (0.3, lambda g, i: 0.3):
            solver = cls(max_h=max_h, max_h_ratio=0.0, **kw)
            runs.append(
                sd.sample(
                    den,
                    x_T,
                    steps=10,
                    solver=solver,
                    schedule="time_uniform",
                    generator=torch.Generator().manual_seed(0),
                )
            )
        assert torch.equal(runs[0], runs[1]), cls.__name__
        default = sd.sample(
            den,
            x_T,
            steps=10,
            solver=cls(**kw),
            schedule="time_uniform",
            generator=torch.Generator().manual_seed(0),
        )
        assert not torch.equal(runs[0], default), cls.__name__  # the limit acts on this grid


# --- convergence order ------------------------------------------------------------------------

STEPS_ORDER = [10, 14, 20, 28, 40]


@pytest.mark.parametrize(
    ("solver", "order"),
    [
        (sd.solvers.DDIM(), 1),
        (sd.solvers.Euler(), 1),
        (sd.solvers.Heun(), 2),
        (sd.solvers.DPMSolverPPMultistep(order=2, lower_order_final=False), 2),
        # The warm-up (a first-order step, then a second-order one) has local error O(h^2) that is
        # not accumulated over the run, so the 3M's global error is C3 h^3 + C1 h^2 and its slope
        # falls to 2 once C1 h^2 dominates: the local slopes on logsnr_uniform are 3.7, 3.1, 3.2,
        # 2.9 from 10 to 40 steps, then 2.6, 2.4 (56, 80), 2.2 at 160. The first step (at t_max,
        # where x0(x_t) is nearly constant) has a tiny C1, so 10..40 steps show the third order.
        (sd.solvers.DPMSolverPPMultistep(order=3, lower_order_final=False), 3),
    ],
    ids=["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m"],
)
def test_convergence_order(order_problem, solver, order):
    den, x_T, exact = order_problem
    errors = [
        rel_rmse(sd.sample(den, x_T, steps=n, solver=solver, schedule="logsnr_uniform"), exact)
        for n in STEPS_ORDER
    ]
    # measured slopes over 10..40 steps: ddim/euler 1.04, heun 2.21, dpmpp_2m 2.06, dpmpp_3m 3.2
    # (over 10..80: 1.03, 2.15, 2.07, 3.0)
    assert abs(slope(STEPS_ORDER, errors) - order) < 0.35, errors


# --- names, options and shared arithmetic ------------------------------------------------------


@pytest.mark.parametrize("name", sd.solvers.available())
def test_preset_name_is_its_registry_name(name):
    assert sd.solvers.get(name).name == name


def _solver_options() -> list[tuple[type, str, object]]:
    """``(class, option, bad value)`` for every string and bool option of every solver class."""
    cases = []
    for cls_name in sd.solvers.__all__:
        cls = getattr(sd.solvers, cls_name)
        if not (isinstance(cls, type) and issubclass(cls, sd.solvers.Solver)) or cls is sd.solvers.Solver:
            continue
        for f in dataclasses.fields(cls):
            if isinstance(f.default, bool):
                cases += [(cls, f.name, bad) for bad in ("no", 1, None)]
            elif isinstance(f.default, str):
                cases += [(cls, f.name, bad) for bad in ("bogus", 1)]
    return cases


@pytest.mark.parametrize(("cls", "option", "bad"), _solver_options())
def test_string_and_bool_options_are_checked(cls, option, bad):
    message = rf"^{cls.__name__}: {option} must be .*, got {re.escape(repr(bad))}$"
    with pytest.raises(ValueError, match=message):
        cls(**{option: bad})


def test_option_checks_cover_the_known_options():
    covered = {(cls.__name__, option) for cls, option, _ in _solver_options()}
    expected = {("UniPC", "corrector"), ("DPMSolverPPMultistep", "lower_order_final"), ("MRSampler", "sde")}
    assert expected <= covered
    assert {("ERSDE", "noise_scale"), ("DDPM", "variance"), ("DPMSolver", "second_stage")} <= covered


def test_newton_weights_of_a_quadratic():
    # f(u) = 3 u^2 - 2 u + 1: f[u0, u1] = 3 (u0 + u1) - 2, f[u0, u1, u2] = 3
    from steerdiff.solvers._poly import newton_weights

    nodes = [0.7, -0.4, -1.9]
    values = [3 * u * u - 2 * u + 1 for u in nodes]

    def combine(coefs):
        return sum(w * v for w, v in zip(newton_weights(nodes, coefs), values, strict=False))

    assert newton_weights(nodes, [1.0]) == [1.0]
    assert combine([0.0, 1.0]) == pytest.approx(3 * (0.7 - 0.4) - 2, rel=1e-14)
    assert combine([0.0, 0.0, 1.0]) == pytest.approx(3.0, rel=1e-14)
    # a combination of all three: f(u0) + 0.5 d_1 - 0.25 d_2
    assert combine([1.0, 0.5, -0.25]) == pytest.approx(values[0] + 0.5 * (3 * 0.3 - 2) - 0.75, rel=1e-14)


def test_sde_decay_and_std_keep_the_marginal():
    # with a known x0 the SDE-DPM-Solver++ step maps N(alpha_s x0, sigma_s^2) to N(alpha_t x0, sigma_t^2):
    # decay alpha_s + alpha_t hphi_scaled(1, h, 1 + eta) = alpha_t, (decay sigma_s)^2 + std^2 = sigma_t^2
    from steerdiff.solvers._exp import hphi_scaled, sde_decay, sde_std

    a_s, s_s, a_t, s_t = 0.6, 0.8, 0.9, math.sqrt(1 - 0.81)
    h = math.log(a_t / s_t) - math.log(a_s / s_s)
    for eta in (0.0, 0.3, 1.0, 2.5):
        decay, std = sde_decay(s_s, s_t, h, eta), sde_std(s_t, h, eta)
        assert decay * a_s + a_t * hphi_scaled(1, h, 1 + eta) == pytest.approx(a_t, rel=1e-14)
        assert (decay * s_s) ** 2 + std**2 == pytest.approx(s_t**2, rel=1e-14)
    assert sde_std(s_t, h, 0.0) == 0.0


def test_history_keeps_the_newest_size_entries():
    # push keeps the newest `size` (newest first), trim the newest size - 1: a multistep step frees the oldest
    # estimate before the next network call (a held estimate is a batch-sized tensor of device memory)
    from steerdiff.solvers.base import History

    hist = History(3)
    for j in range(5):
        hist.push(torch.full((1,), float(j)), 0.5 * j)
    assert [float(v) for v in hist.values] == [4.0, 3.0, 2.0] and hist.at == [2.0, 1.5, 1.0]
    hist.trim()
    assert [float(v) for v in hist.values] == [4.0, 3.0] and hist.at == [2.0, 1.5]
    hist.push(torch.full((1,), 5.0), 2.5)
    assert hist.at == [2.5, 2.0, 1.5]
    slv = sd.solvers.get("dpmpp_3m")
    grid = sd.solvers.make_grid(sd.VP.cosine(), sd.schedules.get("logsnr_uniform"), 6)
    state = slv.init_state(grid)
    model = sd.solvers.Model(sd.Denoiser(lambda x, t: 0.5 * x, grid.process, "x0"))
    x = torch.ones(2, 3)
    for i in range(4):
        x = slv.step(model, x, i, grid, state)
        assert len(state["x0"].values) == min(i + 1, 2)  # trimmed at the end of each step


def test_step_order_rules_on_hand_made_grids():
    # step_order's rules on log-SNR nodes chosen so that every comparison is exact in floats
    from steerdiff.solvers.base import Grid, step_order

    def grid(lam: list[float], clean: bool = False) -> Grid:
        n = len(lam)
        return Grid(sd.VP.cosine(), [1.0 - j / n for j in range(n)], [0.5] * n, [0.5] * n, lam, clean)

    def orders(g: Grid, **kw) -> list[int]:
        kw.setdefault("max_ratio", 2.5)  # the solvers' default (MAX_STEP_RATIO); step_order's is none
        return [step_order(i, g, 3, min(i + 1, 3), False, **kw) for i in range(g.steps)]

    ratio = [
        0.0,
        0.5,
        1.0,
        2.25,
        2.5,
        2.75,
        5.0,
        5.25,
    ]  # h: 0.5, 0.5, 1.25 (2.5x), 0.25, 0.25, 2.25 (9x), 0.25
    assert orders(grid(ratio)) == [1, 2, 3, 3, 3, 2, 3]  # longer than 2.5x the step before: at most 2
    assert orders(grid(ratio), max_ratio=2.4) == [1, 2, 2, 3, 3, 2, 3]
    assert orders(grid(ratio), max_ratio=math.inf) == [1, 2, 3, 3, 3, 3, 3]
    last = [0.0, 0.25, 0.5, 0.75, 3.0]  # the step into the last noisy node is left
    assert orders(grid(last)) == [1, 2, 3, 3]
    assert orders(grid([*last, math.inf], clean=True)) == [1, 2, 3, 3, 1]  # the clean end: first order
    assert orders(grid(ratio[::-1])) == [1, 2, 3, 3, 3, 3, 3]  # up the grid (h < 0): no ratio rule
    # the long-step rule: longer than max_h and than max_h_ratio times the step before, in |h|, either way
    assert orders(grid(ratio), max_h=2.0, max_h_ratio=2.0) == [1, 2, 3, 3, 3, 1, 3]
    assert orders(grid(ratio), max_h=2.25, max_h_ratio=2.0) == [1, 2, 3, 3, 3, 2, 3]
    assert orders(grid(ratio), max_h=1.0, max_h_ratio=9.0) == [1, 2, 3, 3, 3, 2, 3]
    assert orders(grid(ratio[::-1]), max_h=2.0, max_h_ratio=2.0) == [1, 1, 3, 3, 3, 3, 3]
    # lower_order_final under 15 steps: order <= steps - i
    assert [step_order(i, grid(last), 3, 3, True, max_ratio=math.inf) for i in range(4)] == [3, 3, 2, 1]


def test_transition_draws_no_noise_at_zero_std():
    # std exactly 0 (an eta = 0 step, the step into a clean end): the mean, and the noise source is not asked
    # (a draw would move every later draw of a run's generator); a number std: mean + std z
    from steerdiff.solvers.base import Transition

    asked: list[tuple[float, float]] = []

    def noise(t_from: float, t_to: float, like: torch.Tensor) -> torch.Tensor:
        asked.append((t_from, t_to))
        return torch.full_like(like, 2.0)

    mean = torch.arange(3.0)
    assert Transition(mean, 0.0).draw(noise, 0.5, 0.4) is mean and asked == []
    assert torch.equal(Transition(mean, 0.25).draw(noise, 0.5, 0.4), mean + 0.5) and asked == [(0.5, 0.4)]
    assert torch.equal(Transition(mean, torch.ones(3)).draw(noise, 0.4, 0.3), mean + 2.0)


def test_dpmpp_third_order_choices():
    # "diffusers" is the SDE branch's weight (DPMSolverSDEMultistep), not an ODE solver's: refused by name
    for bad in ("diffusers", "exactly"):
        with pytest.raises(
            ValueError, match=r"^DPMSolverPPMultistep: third_order must be one of \['exact', "
        ):
            sd.solvers.DPMSolverPPMultistep(order=3, third_order=bad)
