"""Stochastic samplers for flow models' online RL (``flow_sde``: Flow-GRPO's SDE; ``cps``: Coefficients-
Preserving Sampling): their transitions against the papers' formulas, the noise-free ends (DDIM, LCM,
``euler_maruyama``), the output law on the 8-d mixture under rectified flow and SD's VP process against
exact samples, and the excess noise of the Euler-Maruyama step that CPS removes."""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.metrics import floor, sliced_wasserstein
from steerdiff.solvers import CPS, DDIM, EulerMaruyama, FlowSDE, Model, Transition, make_grid

from .reference import Record, assert_keeps_point_marginal, noise

F64 = torch.float64
FLOW = sd.RectifiedFlow()
UNIFORM = sd.schedules.get("time_uniform")


def _metric(x: torch.Tensor, y: torch.Tensor) -> float:
    return sliced_wasserstein(x, y, projections=128, generator=torch.Generator().manual_seed(7))


def _distance(
    gmm, process, solver, steps: int, n: int = 2000, repeats: int = 2, final: str = "zero"
) -> float:
    """Mean sliced W2 of ``repeats`` runs of ``n`` samples from ``N(0, I)`` to as many exact draws."""
    den, g, total = gmm.denoiser(process), torch.Generator().manual_seed(0), 0.0
    for _ in range(repeats):
        x_T = torch.randn(n, gmm.dim, generator=g, dtype=F64)
        x = sd.sample(den, x_T, steps=steps, solver=solver, schedule="time_uniform", final=final, generator=g)
        total += _metric(x, gmm.sample(n, g))
    return total / repeats


@pytest.fixture(scope="module")
def base(gmm):
    """The floor: two independent exact sets of 2000 (0.056)."""
    return floor(gmm.sample, 2000, _metric, repeats=3, generator=torch.Generator().manual_seed(100))


def test_registry_and_defaults():
    fs, cps = sd.solvers.get("flow_sde"), sd.solvers.get("cps")
    assert isinstance(fs, FlowSDE) and fs.noise_level == 0.7 and fs.stochastic and fs.name == "flow_sde"
    assert isinstance(cps, CPS) and cps.noise_level == 0.8 and cps.stochastic and cps.name == "cps"
    assert not FlowSDE(noise_level=0).stochastic and not CPS(noise_level=0).stochastic
    assert fs.nfe(10) == cps.nfe(10) == 10 and fs.nfe(10, clean_end=False) == 10


@pytest.mark.parametrize(
    ("solver", "match"),
    [
        (lambda: FlowSDE(noise_level=-0.1), r"FlowSDE: noise_level must be a finite number >= 0, got -0.1"),
        (lambda: FlowSDE(noise_level=math.nan), r"FlowSDE: noise_level must be a finite number"),
        (lambda: FlowSDE(noise_level=math.inf), r"FlowSDE: noise_level must be a finite number"),
        (lambda: FlowSDE(noise_level=True), r"FlowSDE: noise_level must be a finite number"),
        (lambda: CPS(noise_level=1.5), r"CPS: noise_level must be a finite number in \[0, 1\], got 1.5"),
        (lambda: CPS(noise_level=-1), r"CPS: noise_level must be a finite number in \[0, 1\]"),
        (lambda: CPS(noise_level="0.5"), r"CPS: noise_level must be a finite number in \[0, 1\]"),
        (lambda: CPS(order=2), r"^CPS: order must be 1, got 2$"),
    ],
)
def test_bad_input(solver, match):
    with pytest.raises(ValueError, match=match):
        solver()


# --- the noise-free ends -------------------------------------------------------------------------------


@pytest.mark.parametrize("final", ["zero", "none"])
def test_flow_sde_at_noise_level_0_is_ddim_under_rectified_flow(gmm, final):
    """Euler in ``t`` on the velocity, ``x + v dt``, is the DDIM step under ``alpha = 1 - t``, ``sigma = t``;
    written as ``(1 + f dt) x + g^2 dt / (2 sigma) eps`` it cancels ``1 / (1 - t_0) = 1000`` at the first
    node: measured max |difference| 4.6e-14 / 5.9e-14 (float64, final zero / none)."""
    den, x_T = gmm.denoiser(FLOW), noise(16, 8)
    kw = {"steps": 12, "schedule": "time_uniform", "final": final}
    x = sd.sample(den, x_T, solver=FlowSDE(noise_level=0.0), **kw)
    assert torch.allclose(x, sd.sample(den, x_T, solver="ddim", **kw), rtol=0, atol=1e-12)


@pytest.mark.parametrize("process", [FLOW, sd.VP.scaled_linear()], ids=["flow", "vp"])
def test_cps_ends_are_ddim_and_lcm(gmm, process):
    """``a = 0``: DDIM; ``a = 1``: ``x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} z``, LCM's step; bitwise."""
    den, x_T = gmm.denoiser(process), noise(4, 8)
    kw = {"steps": 8, "schedule": "time_uniform", "final": "none"}
    assert torch.equal(
        sd.sample(den, x_T, solver=CPS(noise_level=0), **kw), sd.sample(den, x_T, solver="ddim", **kw)
    )
    lcm = sd.sample(den, x_T, solver="lcm", generator=Record(3), **kw)
    assert torch.equal(sd.sample(den, x_T, solver=CPS(noise_level=1), generator=Record(3), **kw), lcm)


@pytest.mark.parametrize("a", [0.2, 0.8])
def test_cps_is_ddim_with_a_per_step_eta(gmm, a):
    """CPS is DDIM's Eq. 12 with ``c = sigma_{i+1} sin(a pi / 2)``: DDIM(eta) with ``eta = sin(a pi / 2) /
    sqrt(1 - exp(-2 h))``, a constant on ``logsnr_uniform`` nodes (same draws: equal to 1e-12); on
    ``time_uniform`` ones no constant eta gives CPS (``h`` varies 9.7x over 8 steps)."""
    den, x_T = gmm.denoiser(FLOW), noise(4, 8)
    grid = make_grid(FLOW, sd.schedules.get("logsnr_uniform"), 8, final="none")
    eta = math.sin(a * math.pi / 2) / math.sqrt(-math.expm1(-2 * grid.h(0)))
    kw = {"steps": 8, "schedule": "logsnr_uniform", "final": "none"}
    x = sd.sample(den, x_T, solver=CPS(noise_level=a), generator=Record(5), **kw)
    assert torch.allclose(x, sd.sample(den, x_T, solver=DDIM(eta=eta), generator=Record(5), **kw), atol=1e-12)
    hs = [make_grid(FLOW, UNIFORM, 8, final="none").h(i) for i in range(8)]
    assert max(hs) / min(hs) > 9


@pytest.mark.parametrize("process", [FLOW, sd.VP.scaled_linear()], ids=["flow", "vp"])
def test_flow_sde_at_sqrt_2_is_euler_maruyama_after_the_first_step(process):
    """``s = a g / sqrt 2``: at ``a = sqrt 2`` Anderson's reverse SDE, the same step table as
    ``euler_maruyama`` from the second step on (the first from ``t_max`` takes Flow-GRPO's rule)."""
    grid = make_grid(process, UNIFORM, 10)
    fs = FlowSDE(noise_level=math.sqrt(2)).init_state(grid)["coefs"]
    em = EulerMaruyama().init_state(grid)["coefs"]
    assert [c for row in fs[1:] for c in row] == pytest.approx([c for row in em[1:] for c in row], rel=1e-14)
    assert fs[0][0] == em[0][0] and fs[0][2] == pytest.approx(
        em[0][2] * math.sqrt(grid.alpha[0] / grid.alpha[1])
    )


# --- transitions against the papers -------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.3, 0.7, 1.2])
def test_flow_sde_transition_is_flow_grpos_step(gmm, a):
    """Each step's ``Transition`` against Flow-GRPO's update written from the velocity ``v = eps - x0``:
    ``mean = x (1 + s^2 dt / (2 t)) + v (1 + s^2 (1 - t) / (2 t)) dt``, ``std = s sqrt(-dt)``,
    ``s = a sqrt(t / (1 - t))`` (``a sqrt(t_0 / (1 - t_1))`` at the first node); and its log-probability
    (``sd.smc.transition_log_prob``) the Gaussian's, summed over coordinates."""
    den, x, z = gmm.denoiser(FLOW), noise(5, 8), Record(2)
    grid = make_grid(FLOW, UNIFORM, 10)
    solver = FlowSDE(noise_level=a)
    state, model = solver.init_state(grid), Model(den)
    for i in range(grid.steps - 1):
        t, dt = grid.t[i], grid.t[i + 1] - grid.t[i]
        out = solver.step(model, x, i, grid, state)
        pred = den(x, t)
        v = pred.eps - pred.x0
        s = a * math.sqrt(t / (1 - (grid.t[1] if i == 0 else t)))
        mean = x * (1 + s**2 * dt / (2 * t)) + v * (1 + s**2 * (1 - t) / (2 * t)) * dt
        assert isinstance(out, Transition)
        assert out.std == pytest.approx(s * math.sqrt(-dt), rel=1e-13)
        assert torch.allclose(out.mean, mean, rtol=1e-11, atol=1e-11 * (1 + abs(1 / (1 - t))))
        x_next = out.mean + out.std * z(t, grid.t[i + 1], out.mean)
        lp = sd.smc.transition_log_prob(x_next[:, None], Transition(out.mean[:, None], out.std))[:, 0]
        want = -0.5 * ((x_next - mean) / out.std) ** 2 - math.log(out.std) - 0.5 * math.log(2 * math.pi)
        assert torch.allclose(lp, want.sum(1), rtol=1e-10)
        x = x_next
    assert torch.equal(solver.step(model, x, grid.steps - 1, grid, state), den(x, grid.t[-2]).x0)


@pytest.mark.parametrize("process", [FLOW, sd.VP.scaled_linear()], ids=["flow", "vp"])
@pytest.mark.parametrize("a", [0.3, 0.8, 1.0])
def test_cps_keeps_the_marginal_coefficients(gmm, process, a):
    """The paper's step, ``mean = alpha_{i+1} x0 + sqrt(sigma_{i+1}^2 - c^2) eps``, ``std = c = sigma_{i+1}
    sin(a pi / 2)``; and given the exact ``x0`` (data: a point) each step maps ``N(alpha_i mu, sigma_i^2)``
    onto ``N(alpha_{i+1} mu, sigma_{i+1}^2)`` exactly (``reference.assert_keeps_point_marginal``)."""
    den, x = gmm.denoiser(process), noise(5, 8)
    grid = make_grid(process, UNIFORM, 6)
    for i in range(grid.steps - 1):
        out = CPS(noise_level=a).step(Model(den), x, i, grid, {})
        pred, s_next = den(x, grid.t[i]), grid.sigma[i + 1]
        c = s_next * math.sin(a * math.pi / 2)
        mean = grid.alpha[i + 1] * pred.x0 + math.sqrt(max(s_next**2 - c**2, 0)) * pred.eps
        assert isinstance(out, Transition) and out.std == pytest.approx(c, rel=1e-15)
        assert torch.allclose(out.mean, mean, rtol=1e-12, atol=1e-12)
    assert_keeps_point_marginal(CPS(noise_level=a), process, "time_uniform")


def _point_noise_ratios(solver: FlowSDE, steps: int) -> list[float]:
    """Data a point: the state's noise std over the marginal's ``sigma`` at each node after the first,
    propagated exactly through the step table (the mean keeps ``alpha_{i+1} mu`` under rectified flow:
    ``(1 + f dt) alpha_i = alpha_{i+1}``)."""
    grid = make_grid(FLOW, UNIFORM, steps, final="none")
    var, out = grid.sigma[0] ** 2, []
    for i, (c_x, c_eps, std) in enumerate(solver.init_state(grid)["coefs"]):
        assert c_x * grid.alpha[i] == pytest.approx(grid.alpha[i + 1], rel=1e-12)
        var = (c_x + c_eps / grid.sigma[i]) ** 2 * var + std**2
        out.append(math.sqrt(var) / grid.sigma[i + 1])
    return out


def test_flow_sde_adds_excess_noise_that_cps_does_not():
    """The CPS paper's claim, measured where the exact ``x0`` is known (data a point, 10 time-uniform
    steps to ``t_min = 0.001``, ``final='none'``): Flow-GRPO's step leaves noise of std ``r sigma`` with
    ``r`` 1.06-1.19 over the grid at ``a = 0.7`` (1.18-1.30 at ``a = 1``), 1.38 at the last node before
    ``t_min``, and its last step (``s^2 = a^2 t / (1 - t)`` over ``dt = -0.1``) 82x the marginal's 0.001
    (std 0.082: the noise Flow-GRPO's last step into ``t = 0`` leaves, ``a t_{N-1} / sqrt(1 - t_{N-1})``);
    at 20 steps 1.33 and 40x. CPS keeps ``r = 1`` at every node and noise level
    (``test_cps_keeps_the_marginal_coefficients``); small ``a`` shrinks the excess (0.3: 1.10, 32x)."""
    r = _point_noise_ratios(FlowSDE(noise_level=0.7), 10)
    assert r[-2] == pytest.approx(1.376, abs=2e-3) and r[-1] == pytest.approx(82.35, abs=0.05)
    assert min(r[:-1]) > 1.06 and max(r[:-2]) < 1.2
    r1 = _point_noise_ratios(FlowSDE(noise_level=1.0), 10)
    assert r1[-2] == pytest.approx(1.646, abs=2e-3) and r1[-1] == pytest.approx(138.7, abs=0.1)
    r20 = _point_noise_ratios(FlowSDE(noise_level=0.7), 20)
    assert r20[-2] == pytest.approx(1.331, abs=2e-3) and r20[-1] == pytest.approx(39.51, abs=0.05)
    r03 = _point_noise_ratios(FlowSDE(noise_level=0.3), 10)
    assert r03[-2] == pytest.approx(1.098, abs=2e-3) and r03[-1] == pytest.approx(32.03, abs=0.05)


# --- the output law ------------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_flow_sde_samples_the_mixture(gmm, base, a):
    """100 time-uniform steps: within 1.35x the floor (measured 0.96 / 1.05 / 1.08x at a = 0.3 / 0.7 / 1.0,
    2 sets of 2000); without the first-step rule 3.2x at a = 0.7 (142x at 10 steps)."""
    assert _distance(gmm, FLOW, FlowSDE(noise_level=a), 100) < 1.35 * base


def test_flow_sde_samples_the_mixture_under_vp(gmm, base):
    """The same SDE on SD's VP process (s = a g / sqrt 2): 1.08x the floor at 100 steps, a = 0.7."""
    assert _distance(gmm, sd.VP.scaled_linear(), FlowSDE(noise_level=0.7), 100) < 1.35 * base


def test_cps_is_biased_at_any_step_count(gmm, base):
    """CPS's step is exact given the true ``x0``, not given the posterior mean the denoiser returns: it
    re-noises ``alpha_{i+1} E[x0 | x_i]`` and the ``x0`` coefficient of its mean, ``alpha_{i+1} - sigma_{i+1}
    cos(a pi / 2) alpha_i / sigma_i``, tends to ``alpha_{i+1} (1 - cos(a pi / 2))``, not to 0, as steps
    shrink, so each step drops a fixed share of ``Var(x0 | x_i)``. It does not converge: at ``a = 0.8``
    the sample variance / true is 0.65 / 0.73 / 0.83 / 0.83 at 10 / 20 / 100 / 400 steps (8192 draws;
    ``a = 0.3``: 0.76 / 0.87 / 0.96 / 0.96; flow_sde(0.7) 0.90 / 0.96 / 1.00 / 1.00; DDIM 0.78 / 0.89 / 0.97 /
    0.99), sliced W2 2.31x the floor at 100 steps, 1.15x at ``a = 0.3``."""
    far = _distance(gmm, FLOW, CPS(noise_level=0.8), 100)
    assert far > 2.0 * base
    assert _distance(gmm, FLOW, CPS(noise_level=0.3), 100) < 1.35 * base


@pytest.mark.parametrize("steps", [10, 20])
def test_flow_sde_against_cps_at_few_steps(gmm, base, steps):
    """At 10 / 20 time-uniform steps on the mixture, Flow-GRPO's SDE at its noise level 0.7 is closer to the
    exact law than CPS at its 0.8 (sliced W2 / floor, final='none', ending at t_min with Flow-GRPO's
    excess noise: 1.64 / 1.18 against 4.04 / 3.14, 2 sets of 2000; DDIM 2.56 / 1.65 over 3 sets; with
    final='zero' 1.57 / 1.10 against 4.03 / 3.23): the excess noise, std 0.082 at t_min, is small beside the
    data's 0.55-0.9, CPS's variance loss is not."""
    fs = _distance(gmm, FLOW, FlowSDE(noise_level=0.7), steps, final="none")
    cps = _distance(gmm, FLOW, CPS(noise_level=0.8), steps, final="none")
    assert fs < 1.8 * base < 2.5 * base < cps


# --- reproducibility -----------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["flow_sde", "cps"])
def test_per_sample_generators_make_a_sample_independent_of_its_batch(gmm, solver):
    den, x_T = gmm.denoiser(FLOW), noise(4, 8)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = {"steps": 8, "solver": solver, "schedule": "time_uniform"}
    whole, info = sd.sample(den, x_T, generator=gens([10, 11, 12, 13]), return_info=True, **kw)
    part = sd.sample(den, x_T[2:], generator=gens([12, 13]), **kw)  # the mixture's batched sums: 1.3e-14 off
    assert torch.allclose(whole[2:], part, rtol=0, atol=1e-13) and info.nfe == 8
    again = sd.sample(den, x_T, generator=gens([10, 11, 12, 13]), **kw)
    other = sd.sample(den, x_T, generator=gens([1, 2, 3, 4]), **kw)
    assert torch.equal(whole, again) and (whole - other).abs().min() > 1e-6
