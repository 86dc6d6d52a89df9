"""DEIS, iPNDM and LMS against diffusers, the exact Gaussian-mixture ODE solution and closed forms.

Parity notes (diffusers 0.42):

* ``DEISMultistepScheduler`` ends at ``t = 0`` (``sigma ~ 0.029``), not at a clean node, so it is
  compared with ``final="none"`` on its nodes plus ``t = 0``.
* ``LMSDiscreteScheduler`` and ``IPNDMScheduler`` take a full-order Adams-Bashforth step into
  ``sigma = 0``; steerdiff's step into a clean end returns the denoised estimate. They are compared
  on every step before that one, and the clean end against the exact denoiser of diffusers'
  state there. LMS's coefficients come from ``scipy.integrate.quad``, exact for polynomials, so
  parity is at float32 precision of its sigma table. LMS with ``timestep_spacing="linspace"``
  starts from ``x_T * sigma_max`` (``init_noise_sigma``) instead of ``x_T * sqrt(1 + sigma_max^2)``,
  a 0.2% offset; the driver below starts it from the exact ``x_T / alpha_max``.
* ``IPNDMScheduler`` has its own grid starting at ``alpha = 0`` and expects v-prediction; it is
  driven through ``trained_betas`` (which it reads as the node sigmas) on a steerdiff grid, with
  the exact v. It is order 4 only.

DEIS ``variant="tab"`` (the paper's tAB-DEIS, polynomial in process time) has no diffusers
counterpart; its quadrature weights are checked against ``scipy.integrate.quad`` in ``t`` (split at
VP.discrete's integer timesteps, where ``d rho / dt`` jumps).

Convergence: every method here starts with a first-order step (warm-up), so asymptotically the
global order of each is at most 2; the warm-up error is small (the noise end has ``alpha ~ 0.07``)
and the nominal orders show over 10-80 steps for DEIS and LMS 1-3. LMS 4 reaches ~3.4 there.
iPNDM's fixed coefficients are exact only on steps of equal length in ``sigma/alpha``: on graded
grids its local error is O(h^3) and its global order 2 for every order >= 2. The nominal orders
of all formulas are checked on one step with exact history (local error O(h^(k+1))).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import pytest
import torch
from scipy import integrate

import steerdiff as sd
from steerdiff.bench.solvers import merged_nodes
from steerdiff.solvers import (
    DEIS,
    IPNDM,
    LMS,
    DPMSolverPPMultistep,
    DPMSolverSDEMultistep,
    Model,
    SASolver,
    UniPC,
    make_grid,
)
from steerdiff.solvers._poly import adams_bashforth, exp_adams_bashforth
from steerdiff.solvers.deis import tab_weights

from .reference import (
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

F64 = torch.float64
STEPS = [10, 20, 40, 80]


# ---------------------------------------------------------------------------------------- weights


def test_adams_bashforth_weights_are_the_classical_ones():
    published = [[1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
    for k, ref in enumerate(published, start=1):
        assert adams_bashforth([-j for j in range(k)]) == pytest.approx(ref, abs=1e-14)


@pytest.mark.parametrize("h", [1e-3, 0.3, 2.0])
def test_exponential_weights_match_quadrature(h):
    nodes = [0.0, -0.7, -1.9, -2.6]
    for k in range(1, 5):
        ours = exp_adams_bashforth(nodes[:k], h)
        for j in range(k):

            def basis(th: float, j: int = j, k: int = k) -> float:
                return math.prod((th - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j)

            ref = integrate.quad(lambda th: math.exp(h * (1 - th)) * basis(th), 0, 1, epsabs=0, epsrel=1e-13)[
                0
            ]
            assert ours[j] == pytest.approx(ref, rel=1e-11, abs=1e-13)
    assert h * exp_adams_bashforth([0.0], h)[0] == pytest.approx(math.expm1(h), rel=1e-14)


def _drho(process: sd.Process, a: float, b: float) -> Callable[[float], float]:
    """``rho'(t)`` on ``[a, b]``: for VP.discrete, ``lam`` is linear between integer timesteps
    ``n <= a < b <= n + 1`` and ``rho = e^{-lam}``; otherwise from ``alpha``, ``sigma`` and their
    derivatives."""
    if isinstance(process, sd.processes.VPDiscrete):
        n = math.floor(a)
        l0, l1 = (float(process.lam(float(m))) for m in (n, n + 1))
        return lambda t: -(l1 - l0) * math.exp(-(l0 + (t - n) * (l1 - l0)))

    def drho(t: float) -> float:
        al, s = float(process.alpha(t)), float(process.sigma(t))
        return (float(process.d_sigma(t)) * al - s * float(process.d_alpha(t))) / al**2

    return drho


def _tab_reference(process: sd.Process, nodes: list[float], t_next: float) -> list[float]:
    """``int_{t_0}^{t_next} l_j(t) rho'(t) dt`` by adaptive quadrature in ``t``, piece by piece
    between VP.discrete's integer timesteps (``rho'`` jumps there)."""
    lo, hi = sorted((nodes[0], t_next))
    inner = range(math.floor(lo) + 1, math.ceil(hi)) if isinstance(process, sd.processes.VPDiscrete) else []
    edges = [lo, *inner, hi]
    drhos = [_drho(process, a, b) for a, b in itertools.pairwise(edges)]
    sign = 1.0 if t_next > nodes[0] else -1.0
    out = []
    for j, tj in enumerate(nodes):

        def basis(t: float, j: int = j, tj: float = tj) -> float:
            return math.prod((t - tm) / (tj - tm) for m, tm in enumerate(nodes) if m != j)

        pieces = (
            integrate.quad(lambda t, d=d: basis(t) * d(t), a, b, epsabs=0, epsrel=1e-13)[0]
            for (a, b), d in zip(itertools.pairwise(edges), drhos, strict=True)
        )
        out.append(sign * math.fsum(pieces))
    return out


@pytest.mark.parametrize("process", [sd.VP.scaled_linear(), sd.VP.cosine()], ids=repr)
@pytest.mark.parametrize("k", [2, 3])
def test_tab_weights_match_quadrature(process, k):
    grid = make_grid(process, sd.schedules.get("karras"), 6, final="none")
    for i in range(k - 1, grid.steps):
        nodes = grid.t[i - k + 1 : i + 1][::-1]
        ref = _tab_reference(process, nodes, grid.t[i + 1])
        assert tab_weights(process, nodes, grid.t[i + 1]) == pytest.approx(ref, rel=1e-10, abs=0)


def test_tab_weight_of_one_node_is_the_rho_increment(sd_process):
    """``int d rho = rho_{i+1} - rho_i``: the order-1 tAB step is DDIM."""
    grid = make_grid(sd_process, sd.schedules.get("time_uniform"), 7, final="none")
    for i in range(grid.steps):
        drho = grid.sigma[i + 1] / grid.alpha[i + 1] - grid.sigma[i] / grid.alpha[i]
        assert tab_weights(sd_process, [grid.t[i]], grid.t[i + 1])[0] == pytest.approx(drho, rel=1e-12)


# ---------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(diffusers, gmm, sd_process, x_T, order, steps):
    sched = diffusers.DEISMultistepScheduler(**sd_betas_config(), solver_order=order)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps)
    nodes = sd.schedules.Custom([*nodes_of(sched).grid.tolist(), 0.0])  # diffusers ends at t = 0
    ours, info = sd.sample(
        gmm.denoiser(sd_process),
        x_T,
        steps,
        DEIS(order=order, variant="log_rho"),
        nodes,
        final="none",
        return_info=True,
    )
    assert info.nfe == nfe == steps
    assert rel_rmse(ours, ref) < PARITY_BOUND["DEISMultistepScheduler"]


def _diffusers_lms(diffusers, gmm, process, x_T, steps, order):
    """diffusers' LMS on its ``steps`` nodes, stopped before its step into ``sigma = 0``.

    Returns the state at the last node in ``x`` units and the nodes.
    """
    sched = diffusers.LMSDiscreteScheduler(**sd_betas_config())
    sched.set_timesteps(steps)
    net = eps_net(gmm, process)
    sig = sched.sigmas.to(F64)
    x = x_T * (1 + sig[0] ** 2).sqrt()
    for t in sched.timesteps[:-1]:
        x = sched.step(net(sched.scale_model_input(x, t), t), t, x, order=order).prev_sample
    return x / (1 + sig[steps - 1] ** 2).sqrt(), sched.timesteps.tolist()


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_matches_diffusers(diffusers, gmm, sd_process, x_T, order):
    steps = 10  # linspace timesteps are integers: 999, 888, ..., 0
    ref, ts = _diffusers_lms(diffusers, gmm, sd_process, x_T, steps, order)
    den = gmm.denoiser(sd_process)
    nodes = sd.schedules.Custom(ts)
    before_end = sd.sample(den, x_T, steps - 1, LMS(order=order), nodes, final="none")
    assert rel_rmse(before_end, ref) < PARITY_BOUND["LMSDiscreteScheduler"]
    ours, info = sd.sample(den, x_T, steps, LMS(order=order), nodes, return_info=True)
    a, s = float(sd_process.alpha(ts[-1])), float(sd_process.sigma(ts[-1]))
    assert info.nfe == steps
    assert rel_rmse(ours, gmm.denoise(ref, a, s)) < PARITY_BOUND["LMSDiscreteScheduler"]


@pytest.mark.parametrize("schedule", ["logsnr_uniform", "karras"])
def test_ipndm_matches_diffusers(diffusers, gmm, sd_process, x_T, schedule):
    steps = 10
    grid = make_grid(sd_process, sd.schedules.get(schedule), steps, final="none")
    sched = diffusers.IPNDMScheduler(trained_betas=grid.sigma)  # read as the node sigmas
    sched.set_timesteps(steps)
    x = x_T
    for i, t in enumerate(sched.timesteps):
        a, s = grid.alpha[i], grid.sigma[i]
        x0 = gmm.denoise(x, a, s)
        v = a * (x - a * x0) / s - s * x0  # the v-prediction IPNDMScheduler expects
        x = sched.step(v, t, x).prev_sample
    ours, info = sd.sample(
        gmm.denoiser(sd_process), x_T, steps, IPNDM(order=4), schedule, final="none", return_info=True
    )
    assert info.nfe == steps
    assert rel_rmse(ours, x) < PARITY_BOUND["IPNDMScheduler"]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_is_lms_on_steps_uniform_in_sigma_ratio(gmm, sd_process, x_T, order):
    den, uniform = gmm.denoiser(sd_process), sd.schedules.Karras(rho=1.0)  # uniform in sigma/alpha
    ipndm = sd.sample(den, x_T, 20, IPNDM(order=order), uniform)
    lms = sd.sample(den, x_T, 20, LMS(order=order), uniform)
    assert rel_rmse(ipndm, lms) < 1e-12


# ---------------------------------------------------------------------------------------- orders


@pytest.fixture(scope="module")
def exact(gmm, sd_process, x_T):
    return exact_sample(gmm, sd_process, x_T)


CONVERGENCE = [
    *[
        (DEIS(order=k, variant=v, lower_order_final=False), "logsnr_uniform", k - 0.35, k + 0.35)
        for v in ("log_rho", "tab")
        for k in (1, 2, 3)
    ],
    *[(LMS(order=k), "karras", k - 0.35, k + 0.35) for k in (1, 2, 3)],
    (LMS(order=4), "karras", 3.0, 4.35),  # ~3.4: pre-asymptotic, the warm-up caps it at 2 eventually
    *[(IPNDM(order=k), "karras", min(k, 2) - 0.35, min(k, 2) + 0.35) for k in (1, 2, 3, 4)],
    (IPNDM(order=4), "logsnr_uniform", 1.65, 2.35),
]


@pytest.mark.parametrize(("solver", "schedule", "lo", "hi"), CONVERGENCE, ids=lambda v: repr(v))
def test_global_convergence_order(gmm, sd_process, x_T, exact, solver, schedule, lo, hi):
    den = gmm.denoiser(sd_process)
    errors = [rel_rmse(sd.sample(den, x_T, n, solver, schedule), exact) for n in STEPS]
    assert min(errors) > 1e-7  # well above the reference ODE's tolerance
    assert lo < slope(STEPS, errors) < hi


LAM_C = 0.0  # mid-trajectory; the step goes from lam_c to lam_c + h
HS = [0.025, 0.0125, 0.00625]


@pytest.fixture(scope="module")
def trajectories(gmm, sd_process):
    """Exact states at ``lam_c + m h`` (m = -3..1) on one ODE trajectory, for each ``h``."""
    x_T = noise(4, 8)
    t_c = float(sd_process.t_of_lam(LAM_C))
    x_c = gmm.reference_ode(x_T, sd_process, sd_process.t_max, t_c)
    out = {}
    for h in HS:
        ts = sd_process.t_of_lam(torch.tensor([LAM_C + m * h for m in range(-3, 2)], dtype=F64)).tolist()
        xs = [gmm.reference_ode(x_c, sd_process, t_c, t, rtol=1e-13, atol=1e-13) for t in ts]
        out[h] = (ts, xs)
    return out


LOCAL = [
    *[
        (DEIS(order=k, variant=v, lower_order_final=False), k + 1)
        for v in ("log_rho", "tab")
        for k in (1, 2, 3)
    ],
    *[(LMS(order=k), k + 1) for k in (1, 2, 3, 4)],
    *[(IPNDM(order=k), min(k, 2) + 1) for k in (1, 2, 3, 4)],  # fixed coefficients, graded steps
]


@pytest.mark.parametrize(("solver", "local_order"), LOCAL, ids=lambda v: repr(v))
def test_local_error_order_with_exact_history(gmm, sd_process, trajectories, solver, local_order):
    """One step from exact states at the ``k`` previous nodes (uniform in ``lam``): error O(h^(k+1))."""
    k = solver.order
    errors = []
    for h in HS:
        ts, xs = (v[-k - 1 :] for v in trajectories[h])
        grid = make_grid(sd_process, sd.schedules.Custom(ts), k, final="none")
        model, state = Model(gmm.denoiser(sd_process)), solver.init_state(grid)
        for j in range(k):
            out = solver.step(model, xs[j], j, grid, state)
        errors.append(rel_rmse(out, xs[k]))
    assert abs(slope([1 / h for h in HS], errors) - local_order) < 0.35


# ---------------------------------------------------------------------------------------- contract

ALL = [DEIS(order=3, variant="log_rho"), DEIS(order=3, variant="tab"), LMS(order=4), IPNDM(order=4)]


def _name(solver: sd.solvers.Solver) -> str:
    return f"{solver.name}-{solver.variant}" if isinstance(solver, DEIS) else solver.name


@pytest.mark.parametrize("solver", ALL, ids=_name)
def test_clean_end_returns_denoised_estimate(gmm, sd_process, x_T, solver):
    states = []
    den = gmm.denoiser(sd_process)
    out, info = sd.sample(
        den, x_T, 8, solver, "karras", callback=lambda d: states.append(d["x"]), return_info=True
    )
    g = info.grid
    assert info.nfe == 8 and g.sigma[-1] == 0.0
    assert rel_rmse(out, gmm.denoise(states[-2], g.alpha[-2], g.sigma[-2])) < 1e-12


@pytest.mark.parametrize("solver", ALL, ids=_name)
def test_too_few_steps_lower_the_order(gmm, sd_process, x_T, solver):
    den = gmm.denoiser(sd_process)
    one, info = sd.sample(den, x_T, 1, solver, "karras", return_info=True)
    t = sd_process.t_max
    assert info.nfe == 1
    assert rel_rmse(one, gmm.denoise(x_T, float(sd_process.alpha(t)), float(sd_process.sigma(t)))) < 1e-12
    two = sd.sample(den, x_T, 2, solver, "karras")
    assert rel_rmse(two, sd.sample(den, x_T, 2, "ddim", "karras")) < 1e-12  # both steps first order


@pytest.mark.parametrize(
    ("cls", "bad", "accepted"), [(DEIS, 4, r"\[1, 3\]"), (LMS, 5, r"\[1, 4\]"), (IPNDM, 0, r"\[1, 4\]")]
)
def test_unsupported_order_raises(cls, bad, accepted):
    with pytest.raises(ValueError, match=rf"order must be an integer in {accepted}, got {bad}"):
        cls(order=bad)
    with pytest.raises(ValueError, match=accepted):
        cls(order=True)


@pytest.mark.parametrize("schedule", ["karras", "time_uniform"])
def test_tab_order_one_is_ddim(gmm, sd_process, x_T, schedule):
    den = gmm.denoiser(sd_process)
    for final in ("zero", "none"):
        tab, info = sd.sample(
            den, x_T, 12, DEIS(order=1, variant="tab"), schedule, final=final, return_info=True
        )
        assert info.nfe == 12
        assert rel_rmse(tab, sd.sample(den, x_T, 12, "ddim", schedule, final=final)) < 1e-12


@pytest.mark.parametrize("steps", [3, 7, 20])
def test_tab_nfe_is_steps(gmm, sd_process, x_T, steps):
    _, info = sd.sample(gmm.denoiser(sd_process), x_T, steps, DEIS(variant="tab"), "karras", return_info=True)
    assert info.nfe == DEIS(variant="tab").nfe(steps) == steps


def test_unsupported_deis_variant_raises():
    with pytest.raises(ValueError, match=r"DEIS: variant must be one of \['log_rho', 'tab'\], got 'rho'"):
        DEIS(variant="rho")


def test_registry_names():
    for name, cls in [("deis", DEIS), ("ipndm", IPNDM), ("lms", LMS)]:
        assert name in sd.solvers.available()
        assert type(sd.solvers.get(name)) is cls and cls.name == name


@pytest.mark.parametrize("solver", ["lms", "ipndm"])
def test_float32_keeps_float64_accuracy_at_zero_terminal_snr(solver: str) -> None:
    """At zero terminal SNR (alpha_0 ~ 1e-5) x / alpha cancels against Delta eps in float32; the
    x0 + history form does not. Measured (16-d mixture, 256 samples): float32 vs float64 at most
    6.5e-6 over linspace/trailing x 10/25 steps (the x / alpha form: up to 5.5e-4)."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    proc = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rescale_zero_snr=True)
    den, x_T = gmm.denoiser(proc), noise(256, 16, seed=0)
    for schedule in ("linspace", "trailing"):
        for steps in (10, 25):
            a = sd.sample(den, x_T, steps=steps, solver=solver, schedule=schedule)
            b = sd.sample(den, x_T.float(), steps=steps, solver=solver, schedule=schedule).double()
            assert rel_rmse(b, a) < 2e-5


@pytest.mark.parametrize("variant", ["log_rho", "tab"])
def test_deis_float32_keeps_float64_accuracy_at_zero_terminal_snr(variant: str) -> None:
    """At zero terminal SNR (alpha_0 = 2**-12) the x / alpha form multiplied x by alpha_1 / alpha_0 = 348
    and cancelled it against eps in float32; DDIM from the net's x0 plus the eps history's correction
    does not. Measured (16-d mixture, 256 samples), float32 vs float64 over these cases: before median
    1.8e-5, up to 1.1e-4 (both variants); now at most 1.3e-6, beside DPM-Solver++(2M)'s 4.1e-7."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    proc = sd.VP.discrete(alphas_cumprod=sd.VP.scaled_linear().alphas_cumprod, rescale_zero_snr=True)
    den, x_T = gmm.denoiser(proc), noise(256, 16, seed=0)
    for schedule, steps, order in itertools.product(("karras_capped", "trailing"), (10, 25), (1, 2, 3)):
        solver = DEIS(order=order, variant=variant)
        a = sd.sample(den, x_T, steps=steps, solver=solver, schedule=schedule)
        b = sd.sample(den, x_T.float(), steps=steps, solver=solver, schedule=schedule)
        assert rel_rmse(b.double(), a) < 4e-6, (schedule, steps, order)
        if order == 1:  # the DDIM step from the x0 the net gave, not from the eps derived from it
            assert torch.equal(b, sd.sample(den, x_T.float(), steps=steps, solver="ddim", schedule=schedule))


# ---------------------------------------------------------------------------------------- step-ratio rule


@pytest.fixture(scope="module")
def bench_problem():
    """The solver benchmark's problem (64-d mixture, SD betas) on 64 draws of x_T: its exact ODE answer."""
    from steerdiff.bench.solvers import make_problem

    return make_problem(64, seed=0)


RULED = [DEIS(), DEIS(variant="tab"), DPMSolverPPMultistep(order=3), UniPC(order=3)]
# the SDE multistep solvers at order 3, which have the rule too (MAX_STEP_RATIO by default)
SDE_RULED = [DPMSolverSDEMultistep(order=3), SASolver(order=3, corrector_order=3)]


@pytest.mark.parametrize("solver", RULED, ids=["deis", "deis-tab", "dpmpp_3m", "unipc"])
@pytest.mark.parametrize(("m", "p"), [(4, 8), (3, 7)])
def test_step_ratio_rule_mends_a_long_mid_grid_step(bench_problem, solver, m, p):
    """12 karras steps with ``m`` intervals merged (a step 4.7 / 3.4 times the one before, across lam -0.24 ->
    1.66 / -0.46 -> 0.98, where the denoised estimate settles): order 3 extrapolates its quadratic over it;
    with the rule (default max_ratio=2.5) that step alone is second order, and the solver ends nearer the
    exact ODE answer than without it and than its order 2 throughout (bench/longstep_rule.py). Measured,
    with / without / order 2: deis 0.078 / 0.384 / 0.089 and 0.052 / 0.156 / 0.061, tab 0.078 / 0.340 / 0.083
    and 0.059 / 0.292 / 0.065, dpmpp_3m 0.113 / 1.107 / 0.141 and 0.068 / 0.772 / 0.098, unipc 0.062 / 0.683
    / 0.074 and 0.036 / 0.609 / 0.043."""
    prob = bench_problem
    den, nodes = prob.gmm.denoiser(prob.process), merged_nodes(prob.process, "karras", 12, m, p)
    grid = make_grid(prob.process, sd.schedules.Custom(nodes), 12, "zero")
    assert grid.h(p - 1) > 3 * grid.h(p - 2)
    bare = dataclasses.replace(solver, max_ratio=math.inf)
    rule = solver.max_ratio
    orders = [sd.solvers.step_order(i, grid, 3, min(i + 1, 3), True, max_ratio=rule) for i in range(12)]
    assert orders == [1, 2, *[3] * (p - 3), 2, *[3] * (10 - p), 2, 1]
    if isinstance(solver, DEIS):
        assert [solver._order(i, grid) for i in range(12)] == orders
        assert bare._order(p - 1, grid) == 3

    def err(s: sd.solvers.Solver) -> float:
        return rel_rmse(sd.sample(den, prob.x_T, 12, s, nodes), prob.ref)

    ours = err(solver)
    assert ours < 0.4 * err(bare)
    assert ours < err(dataclasses.replace(solver, order=2))


STANDARD = {
    "sd": sd.VP.scaled_linear(),
    "ddpm": sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64)),
    "zero-snr": sd.VP.discrete(alphas_cumprod=sd.VP.scaled_linear().alphas_cumprod, rescale_zero_snr=True),
    "cosine": sd.VP.cosine(),
    "edm": sd.EDM(),
    "flow": sd.RectifiedFlow(),
}


@pytest.mark.parametrize("process", STANDARD.values(), ids=STANDARD.keys())
def test_step_ratio_rule_never_fires_on_the_named_schedules(process):
    """Every schedule of ``sd.schedules.available()`` at 3-50 steps, both ends: the named grids' only steps
    over 2.5 times the one before are their last into a noisy node (time_uniform, linspace, leading: 2.7-14
    times), which the rule leaves (third order is better there for ``deis``: bench/longstep_rule.py); the
    largest mid-grid ratio is lcm's at 40 steps, 2.34-2.40. So the solvers with the rule sample on them as
    without it, bit for bit (below on the benchmark's SD betas, and bench/longstep_rule.py)."""
    rule = sd.solvers.base.MAX_STEP_RATIO
    fired, grids = [], 0
    for schedule in sd.schedules.available():
        for n, final in itertools.product((3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50), ("zero", "none")):
            try:
                grid = make_grid(process, sd.schedules.get(schedule), n, final)
            except ValueError:  # the discrete spacings refuse continuous processes
                continue
            grids += 1
            for lof in (True, False):
                a = [sd.solvers.step_order(i, grid, 3, 3, lof, max_ratio=rule) for i in range(n)]
                if a != [sd.solvers.step_order(i, grid, 3, 3, lof) for i in range(n)]:
                    fired.append((schedule, n, final, lof))
    assert fired == [] and grids > 150


def test_step_ratio_rule_never_fires_on_the_sde_benchmark_grids():
    """The SDE benchmark's grids (:mod:`steerdiff.bench.sde`: time_uniform and karras under SD betas at 10-200
    steps, docs/bench/sde.txt): the rule changes no step's order there (with ``max_ratio=1`` it would), so
    the SDE multistep solvers' numbers there are those without it."""
    from steerdiff.bench.sde import NFES, SCHEDULES

    process = sd.VP.scaled_linear()
    for schedule, n in itertools.product(SCHEDULES, NFES):
        grid = make_grid(process, sd.schedules.get(schedule), n, "zero")
        orders = {
            rule: [sd.solvers.step_order(i, grid, 3, 3, True, max_ratio=rule) for i in range(n)]
            for rule in (sd.solvers.base.MAX_STEP_RATIO, math.inf, 1.0)
        }
        assert orders[sd.solvers.base.MAX_STEP_RATIO] == orders[math.inf] != orders[1.0]


def test_step_ratio_rule_leaves_the_last_noisy_step_and_samples_as_before(gmm, sd_process, x_T):
    """time_uniform's last step into a noisy node is ~4.8 times the one before (SD betas): the rule leaves it
    (deis: order 3 there is up to 16% nearer the exact answer than order 2 on the benchmark, at 50 steps),
    with ``final="zero"`` (the step before the clean end's) and ``final="none"`` (the grid's last step), and
    the solvers with the rule sample as without it, the SDE multistep solvers too (same noise)."""
    den = gmm.denoiser(sd_process)
    for schedule in ("time_uniform", "linspace", "leading"):
        grid = make_grid(sd_process, sd.schedules.get(schedule), 20, "zero")
        assert grid.h(18) > 4 * grid.h(17)
        assert DEIS()._order(18, grid) == 3
        for solver in [*RULED, *SDE_RULED]:
            ours = sd.sample(den, x_T, 20, solver, schedule, generator=torch.Generator().manual_seed(0))
            bare = dataclasses.replace(solver, max_ratio=math.inf)
            again = sd.sample(den, x_T, 20, bare, schedule, generator=torch.Generator().manual_seed(0))
            assert torch.equal(ours, again)
        assert DEIS()._order(18, make_grid(sd_process, sd.schedules.Custom(grid.t[:-1]), 19, "none")) == 3


@pytest.mark.parametrize("bad", [0.5, math.nan, "3", True])
@pytest.mark.parametrize("cls", [DEIS, DPMSolverPPMultistep, UniPC, DPMSolverSDEMultistep, SASolver])
def test_step_ratio_rule_bad_max_ratio_raises(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: max_ratio must be a number >= 1 or inf, got"):
        cls(max_ratio=bad)


@pytest.mark.parametrize("variant", ["log_rho", "tab"])
def test_deis_restart_warms_up_with_the_estimates_it_holds(gmm, sd_process, variant):
    # after a corrector's move (Solver.moved) DEIS-3 holds one, then two estimates: its steps are those of
    # a fresh DEIS-2 run from the same state (two-node weights), not the three-node weights of its grid
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("logsnr_uniform"), 10)
    den = gmm.denoiser(sd_process)
    x = torch.randn(4, gmm.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    deis3 = sd.solvers.DEIS(order=3, variant=variant)
    state = deis3.init_state(grid)
    for i in range(3):
        x = deis3.step(sd.solvers.Model(den), x, i, grid, state)
    deis3.moved(state)
    deis2 = sd.solvers.DEIS(order=2, variant=variant)
    fresh, y = deis2.init_state(grid), x
    for i in (3, 4):
        x = deis3.step(sd.solvers.Model(den), x, i, grid, state)
        y = deis2.step(sd.solvers.Model(den), y, i, grid, fresh)
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-12), i
