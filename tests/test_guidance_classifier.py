"""Classifier guidance, reward (universal) guidance and self-recurrence on the exact two-class mixture.

The exact noisy classifier of the mixture ``p(x) = (p(x|0) + p(x|1)) / 2`` is
``log p(y | x_t) = log(1/2) + log p_t(x|y) - log p_t(x)``: with it, classifier guidance at scale 1
is the exact conditional score, so a sampler must reach ``p(x|y)``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import ClassifierGuidance, RewardGuidance, SelfRecurrence
from steerdiff.solvers.base import advance

from .reference import smooth_v_net
from .test_guidance_cfg import affine_law, learned_variance, two_class

F64 = torch.float64


@pytest.fixture(scope="module")
def oracle(sd_process):
    _, c1, full = two_class()

    def log_prob_y(x: torch.Tensor, t: float) -> torch.Tensor:
        a, s = float(sd_process.alpha(t)), float(sd_process.sigma(t))
        return math.log(0.5) + c1.log_prob(x, a, s) - full.log_prob(x, a, s)

    return c1, full, full.denoiser(sd_process), log_prob_y


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- classifier guidance --------------------------------------------------------------------------


def test_classifier_guidance_is_the_conditional_score(sd_process, oracle):
    c1, _, den, log_prob_y = oracle
    x = 2 * torch.randn(32, 2, dtype=F64, generator=_gen(0))
    for t in (999.0, 500.0, 100.0, 10.0):
        pred = ClassifierGuidance(den, log_prob_y)(x, t)
        exact = sd.Prediction(x, pred.alpha, pred.sigma, x0=c1.denoise(x, pred.alpha, pred.sigma))
        assert torch.allclose(pred.eps, exact.eps, rtol=1e-10, atol=1e-12)  # measured 3.9e-13
        assert not pred.eps.requires_grad
    # so the guided probability-flow ODE is the conditional one, path by path
    x_T = torch.randn(64, 2, dtype=F64, generator=_gen(1))
    guided, info = sd.sample(ClassifierGuidance(den, log_prob_y), x_T, 30, "dpmpp_2m", return_info=True)
    assert float((guided - sd.sample(c1.denoiser(sd_process), x_T, 30, "dpmpp_2m")).abs().max()) < 1e-12
    assert info.nfe == 30


@pytest.mark.parametrize("scale", [0.0, 0.5, 3.0])
def test_classifier_scale_is_the_powered_score(sd_process, oracle, scale):
    """At scale ``s`` the guided score is ``grad log p_t(x) + s grad log p_t(y | x)``, that of
    ``p_t(x|y)^s p_t(x)^(1 - s)``: with the exact classifier, CFG's at the same scale (Dhariwal & Nichol
    2021, Sec. 4; Ho & Salimans 2022, Sec. 3.2), to rounding (scale 1 is the test above)."""
    c1, _, den, log_prob_y = oracle
    cfg = sd.guidance.CFG(c1.denoiser(sd_process), den, scale)
    x = 2 * torch.randn(16, 2, dtype=F64, generator=_gen(2))
    for t in (900.0, 300.0, 30.0):
        pred, ref = ClassifierGuidance(den, log_prob_y, scale)(x, t), cfg(x, t)
        torch.testing.assert_close(pred.eps, ref.eps, rtol=1e-9, atol=1e-11)


def test_classifier_guided_ddpm_reaches_the_class(oracle):
    """DDPM, 200 steps, from the unconditional denoiser: sliced W2 to exact class-1 samples within 1.5x
    the floor of two exact sets; the unguided sampler is ~40x the floor away."""
    c1, _, den, log_prob_y = oracle
    n = 2000

    def sw(a: torch.Tensor, b: torch.Tensor) -> float:  # 128 fixed directions: plenty in 2-D
        return sd.metrics.sliced_wasserstein(a, b, projections=128, generator=_gen(0))

    x_T = torch.randn(n, 2, dtype=F64, generator=_gen(100))
    ref = c1.sample(n, _gen(200))
    floor = sd.metrics.floor(c1.sample, n, metric=sw, repeats=8, generator=_gen(0))
    guided = sd.sample(ClassifierGuidance(den, log_prob_y), x_T, 200, "ddpm", generator=_gen(0))
    unguided = sd.sample(den, x_T, 200, "ddpm", generator=_gen(0))
    dist, far = sw(guided, ref), sw(unguided, ref)
    print(f"sliced W2: floor {floor:.4f}, guided {dist:.4f} ({dist / floor:.2f}x), unguided {far:.3f}")
    # measured: floor 0.037; guided 0.046 (1.25x; other seeds 1.30x, 1.05x, 1.22x); unguided 1.52 (41x)
    assert dist < 1.5 * floor and far > 20 * floor


# --- reward guidance ------------------------------------------------------------------------------

B = torch.tensor([1.0, 0.5], dtype=F64)


def _linear(x0: torch.Tensor) -> torch.Tensor:
    return x0 @ B


def test_reward_gradient_is_the_denoiser_jacobian_transpose(oracle):
    _, full, den, _ = oracle
    x = 2 * torch.randn(5, 2, dtype=F64, generator=_gen(2))
    for t in (900.0, 300.0, 30.0):
        pred, guided = den(x, t), RewardGuidance(den, _linear, scale=0.7)(x, t)
        a, s = pred.alpha, pred.sigma
        jac = torch.autograd.functional.jacobian(lambda y, a=a, s=s: full.denoise(y, a, s), x)  # (n, d, n, d)
        jtb = torch.einsum("nimj,i->mj", jac, B)  # rows are independent: J^T b per sample
        assert torch.allclose((pred.eps - guided.eps) / (0.7 * s), jtb, rtol=1e-10, atol=1e-12)


def test_reward_guidance_moves_the_reward(oracle):
    """Forward guidance with ``r = b.x`` approximates the tilted law ``p(x) exp(b.x) / Z``: it moves
    ``E[b.x]`` from the prior's in the tilt's direction (by how much is measured, not asserted)."""
    _, full, den, _ = oracle
    n = 2000
    x_T = torch.randn(n, 2, dtype=F64, generator=_gen(3))
    tilted = full.tilt(linear=B)
    exact_tilt = float((tilted.weights * (tilted.means @ B)).sum())
    exact_prior = float((full.weights * (full.means @ B)).sum())
    x, info = sd.sample(RewardGuidance(den, _linear), x_T, 100, "ddpm", generator=_gen(4), return_info=True)
    prior = sd.sample(den, x_T, 100, "ddpm", generator=_gen(4))
    r, r0 = x @ B, prior @ B
    se = float((r.var() / n + r0.var() / n).sqrt())
    # measured: prior 0.284 (exact 0.25), guided 2.749, exact tilt 2.590 (forward guidance overshoots
    # by 0.16, about 4 standard errors of its mean; another seed: 2.756); standard error 0.049
    assert float(r.mean() - r0.mean()) > 10 * se
    assert abs(float(r0.mean()) - exact_prior) < 4 * float(r0.std()) / math.sqrt(n)
    print(f"E[b.x]: prior {float(r0.mean()):.3f}, guided {float(r.mean()):.3f}, exact tilt {exact_tilt:.3f}")
    assert info.nfe == 100


# --- self-recurrence ------------------------------------------------------------------------------


def test_self_recurrence_nfe_and_identity(oracle):
    _, _, den, _ = oracle
    x_T = torch.randn(4, 2, dtype=F64, generator=_gen(5))
    guided = RewardGuidance(den, _linear)
    plain, info = sd.sample(guided, x_T, 8, "ddpm", generator=_gen(6), return_info=True)
    once, info_1 = sd.sample(guided, x_T, 8, SelfRecurrence("ddpm", 1), generator=_gen(6), return_info=True)
    assert torch.equal(once, plain) and info_1.nfe == info.nfe == 8
    for inner in ("ddim", "ddpm", "heun"):
        slv = SelfRecurrence(inner, repeats=3)
        x, info = sd.sample(guided, x_T, 8, slv, generator=_gen(6), return_info=True)
        assert info.nfe == slv.nfe(8) == 3 * sd.solvers.get(inner).nfe(8) and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("inner", ["ddim", "ddpm"])
def test_self_recurrence_keeps_a_point_mass_marginal(sd_process, inner):
    """Data = a point ``mu``: exact DDIM/DDPM steps map ``N(alpha_i mu, sigma_i^2)`` onto the next node's,
    and the re-noising maps it back, so with recurrence the output at ``t_min`` is still exactly
    ``N(alpha mu, sigma^2)`` (exact moments: the sampler is affine in its noise)."""
    mu = 0.7
    den = sd.Denoiser(lambda x, t: torch.full_like(x, mu), sd_process, prediction="x0")
    steps, k = 6, 3
    draws = steps * (k - 1) * (2 if inner == "ddpm" else 1) + (steps if inner == "ddpm" else 0)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("karras"), steps, "none")
    a0, s0 = grid.alpha[0], grid.sigma[0]

    def run(x: torch.Tensor, z) -> torch.Tensor:
        return sd.sample(
            den, a0 * mu + s0 * x, steps, SelfRecurrence(inner, k), "karras", final="none", generator=z
        )

    mean, var = affine_law(run, draws)
    assert math.isclose(float(mean), grid.alpha[-1] * mu, rel_tol=1e-12)
    assert math.isclose(float(var), grid.sigma[-1] ** 2, rel_tol=1e-10)


def test_self_recurrence_around_one_step_solvers_with_grid_tables(sd_process):
    """``euler_maruyama`` and ``edm_sde`` are one-step solvers whose :meth:`init_state` only tabulates the
    grid; they were refused as "keeping a history". Point-mass data ``mu`` (``eps`` exact): the churned
    EDM Heun step is exact, so the marginal ``N(alpha mu, sigma^2)`` is kept to float precision; the
    Euler-Maruyama step is not, and its law is propagated here from Song et al. Eq. 6 and the re-noising."""
    mu, steps, k = 0.7, 6, 3
    den = sd.Denoiser(lambda x, t: torch.full_like(x, mu), sd_process, prediction="x0")
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("karras"), steps, "none")
    a, s = grid.alpha, grid.sigma
    edm = sd.solvers.EDMStochasticHeun(s_churn=10.0, s_tmin=0.0, s_tmax=math.inf)
    for inner in (edm, "euler_maruyama"):
        slv = SelfRecurrence(inner, k)

        def run(x: torch.Tensor, z, slv=slv) -> torch.Tensor:
            return sd.sample(den, a[0] * mu + s[0] * x, steps, slv, "karras", final="none", generator=z)

        counted: list[int] = []

        def count(t0: float, t1: float, like: torch.Tensor, counted=counted) -> torch.Tensor:
            counted.append(1)
            return torch.zeros_like(like)

        run(torch.zeros(1, 1, dtype=F64), count)
        mean, var = affine_law(run, len(counted))
        if inner is edm:
            assert len(counted) > steps * (k - 1)  # churn draws besides the re-noising
            assert math.isclose(float(mean), a[-1] * mu, rel_tol=1e-12)
            assert math.isclose(float(var), s[-1] ** 2, rel_tol=1e-10)
            continue
        m, v = a[0] * mu, s[0] ** 2
        t = torch.tensor(grid.t, dtype=F64)
        f = (sd_process.d_alpha(t) / sd_process.alpha(t)).tolist()
        g2 = (
            2 * sd_process.sigma(t) * (sd_process.d_sigma(t) - torch.tensor(f) * sd_process.sigma(t))
        ).tolist()
        for i in range(steps):
            dt = grid.t[i + 1] - grid.t[i]
            for r in range(k):  # x' = x + (f x + g^2 (x - a mu) / s^2) dt + g sqrt(-dt) z
                c = 1 + (f[i] + g2[i] / s[i] ** 2) * dt
                m, v = c * m - g2[i] * a[i] * mu / s[i] ** 2 * dt, c * c * v - g2[i] * dt
                if r < k - 1:  # back to node i with the forward process
                    ratio = a[i] / a[i + 1]
                    m, v = ratio * m, ratio**2 * v + s[i] ** 2 - (ratio * s[i + 1]) ** 2
        assert len(counted) == steps * (2 * k - 1)
        assert math.isclose(float(mean), m, rel_tol=1e-12) and math.isclose(float(var), v, rel_tol=1e-10)


@pytest.mark.parametrize(
    "inner", [sd.solvers.DPMSolverSDE(), sd.solvers.DPMSolverSDE(eta=0.4, r=0.3)], ids=["default", "eta_r"]
)
def test_self_recurrence_around_singlestep_sde_dpmpp(sd_process, inner):
    """``dpmpp_sde``'s :meth:`init_state` only tabulates each step's intermediate node; it was refused as
    "keeping a history". Point-mass data ``mu``: its step (two draws) is exact given ``x0``, so with the
    re-noising the output keeps ``N(alpha mu, sigma^2)``: measured to 5e-14 (mean exact)."""
    mu, steps, k = 0.7, 6, 3
    den = sd.Denoiser(lambda x, t: torch.full_like(x, mu), sd_process, prediction="x0")
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("karras"), steps, "none")
    a, s = grid.alpha, grid.sigma

    def run(x: torch.Tensor, z) -> torch.Tensor:
        slv = SelfRecurrence(inner, k)
        return sd.sample(den, a[0] * mu + s[0] * x, steps, slv, "karras", final="none", generator=z)

    mean, var = affine_law(run, steps * (2 * k + k - 1))  # two draws per step, k - 1 re-noisings
    assert math.isclose(float(mean), a[-1] * mu, rel_tol=1e-12)
    assert math.isclose(float(var), s[-1] ** 2, rel_tol=1e-10)


def test_self_recurrence_is_stochastic_only_where_it_draws_noise(oracle):
    """Without recurrence around a deterministic solver (``SelfRecurrence()``: DDIM once) no step draws noise,
    so particle methods refuse it as they refuse DDIM. It claimed to be stochastic whatever it wrapped: FK
    steering ran with it, and copies never diverged (lam 5, 10 steps: 2 distinct of 8 particles per row)."""
    _, _, den, _ = oracle
    assert not SelfRecurrence().stochastic and not SelfRecurrence("heun", 1).stochastic
    assert SelfRecurrence("ddim", 2).stochastic and SelfRecurrence("ddpm", 1).stochastic
    with pytest.raises(ValueError, match="deterministic"):
        sd.smc.fk_steering(
            den,
            lambda x: x[:, 0],
            shape=(3, 2),
            particles=8,
            steps=10,
            solver=SelfRecurrence(),
            generator=_gen(1),
        )


def test_self_recurrence_refuses_history_and_brownian_noise(oracle):
    _, _, den, _ = oracle
    x_T = torch.randn(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="history"):
        sd.sample(den, x_T, 4, SelfRecurrence("dpmpp_2m", 2))
    tree = sd.noise.BrownianTreeNoise(x_T, den.process.t_min, den.process.t_max)
    with pytest.raises(ValueError, match="Brownian"):
        sd.sample(den, x_T, 4, SelfRecurrence("ddpm", 2), generator=tree)
    with pytest.raises(ValueError, match="repeats"):
        SelfRecurrence("ddim", 0)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), "1", True])
def test_bad_scale(oracle, scale):
    _, _, den, log_prob_y = oracle
    with pytest.raises(ValueError, match="ClassifierGuidance: scale"):
        ClassifierGuidance(den, log_prob_y, scale)
    with pytest.raises(ValueError, match="RewardGuidance: scale"):
        RewardGuidance(den, _linear, scale)


def test_bad_classifier_and_reward(oracle):
    _, _, den, log_prob_y = oracle
    x = torch.randn(3, 2, dtype=F64)
    cases = [
        (
            lambda x, t: log_prob_y(x, t)[:, None],
            ValueError,
            r"log_prob_y must return a \(3,\) tensor.*\(3, 1\)",
        ),
        (lambda x, t: log_prob_y(x, t).detach(), ValueError, "log_prob_y's output does not depend"),
        (lambda x, t: 1.0, ValueError, "log_prob_y must return"),
    ]
    for fn, err, words in cases:
        with pytest.raises(err, match=words):
            ClassifierGuidance(den, fn)(x, 500.0)
    with pytest.raises(ValueError, match="reward must return"):
        RewardGuidance(den, lambda x0: x0)(x, 500.0)
    with pytest.raises(ValueError, match="log_prob_y must be callable"):
        ClassifierGuidance(den, 3.0)


def test_guidance_needs_autograd(oracle):
    """Under an outer ``no_grad`` (pipelines sample under it) the gradient is taken all the same, the
    same samples; ``inference_mode`` is refused."""
    _, _, den, log_prob_y = oracle
    x = torch.randn(3, 2, dtype=F64)
    for guided in (ClassifierGuidance(den, log_prob_y), RewardGuidance(den, _linear)):
        with torch.no_grad():
            quiet = sd.sample(guided, x, 4, "ddim")
        torch.testing.assert_close(quiet, sd.sample(guided, x, 4, "ddim"), rtol=0, atol=0)
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            sd.sample(guided, x, 4, "ddim")
    detached = sd.Denoiser(lambda x, t: den.net(x, t).detach(), den.process, prediction="x0")
    with pytest.raises(ValueError, match="detached"):
        RewardGuidance(detached, _linear)(x, 500.0)


def test_a_backward_pass_through_guided_sampling_is_exact(sd_process, oracle):
    """Gradients through ``sd.sample`` with gradient guidance inside go through the guidance's own gradient
    (a second-order graph): with the exact classifier the guided sampler is class 1's, so is its gradient
    with respect to ``x_T``. Before, the guidance refused an ``x`` that requires grad ('x requires grad,
    and differentiating through ClassifierGuidance's own gradient is not supported')."""
    c1, _, den, log_prob_y = oracle
    x_T = torch.randn(8, 2, dtype=F64, generator=_gen(3))
    weights = torch.randn(8, 2, dtype=F64, generator=_gen(4))
    grads = []
    for model in (ClassifierGuidance(den, log_prob_y), c1.denoiser(sd_process)):
        xr = x_T.clone().requires_grad_(True)
        out = sd.sample(model, xr, 6, "dpmpp_2m")
        grads.append(torch.autograd.grad((out * weights).sum(), xr)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)


# --- non-finite values, device syncs, learned variance ---------------------------------------------


@pytest.mark.parametrize("kind", ["classifier", "reward"])
def test_non_finite_guidance_names_step_and_time(sd_process, oracle, kind):
    """A classifier (or reward) that turns NaN from node 3 on is reported once, by the sampler, as
    NonFiniteError naming step 3 and its time (the NaN flows into eps); no per-call check."""
    _, _, den, log_prob_y = oracle
    steps, bad = 8, 3
    t_bad = sd.solvers.make_grid(sd_process, sd.schedules.get("logsnr_uniform"), steps).t[bad]

    def spoil(t: float) -> float:
        return float("nan") if t <= t_bad else 1.0

    calls: list[int] = []

    def reward(x0: torch.Tensor) -> torch.Tensor:  # DDIM: call k is step k
        calls.append(len(calls))
        return _linear(x0) * (float("nan") if calls[-1] >= bad else 1.0)

    if kind == "classifier":
        guided = ClassifierGuidance(den, lambda x, t: log_prob_y(x, t) * spoil(t))
    else:
        guided = RewardGuidance(den, reward, scale=0.5)
    x_T = torch.randn(4, 2, dtype=F64, generator=_gen(8))
    with pytest.raises(sd.NonFiniteError) as err:
        sd.sample(guided, x_T, steps, "ddim", schedule="logsnr_uniform")
    msg = str(err.value)
    assert re.search(rf"\bstep {bad}\b", msg) and f"t={t_bad:.6g}" in msg, msg


def test_guidance_runs_on_the_meta_device(sd_process):
    """No device sync per evaluation: on ``meta`` (no values at all) the guided call and every
    registered solver's steps run (``sd.sample`` itself checks ``x_T``'s values, so the steps are
    driven here as it drives them)."""
    A = torch.tensor([[0.5, 0.1], [0.0, 0.7]], device="meta")
    den = sd.Denoiser(lambda x, t: x @ A, sd_process, "eps", shape=(2,))
    x = torch.randn(4, 2, device="meta")
    guided = [
        ClassifierGuidance(den, lambda x, t: -(x**2).sum(1), 2.0),
        RewardGuidance(den, lambda x0: -(x0**2).sum(1), 2.0),
    ]
    for g in guided:
        pred = g(x, 500.0)
        assert pred.eps.device.type == "meta" and pred.eps.shape == (4, 2)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("karras"), 3)
    for name in sd.solvers.available():
        solver, model = sd.solvers.get(name), sd.solvers.Model(guided[0])
        state, y = solver.init_state(grid), x
        for i in range(grid.steps):
            y = advance(solver.step(model, y, i, grid, state), model.noise, grid.t[i], grid.t[i + 1])
        assert y.device.type == "meta" and y.shape == (4, 2) and model.nfe == solver.nfe(3), name


def test_gradient_guidance_keeps_the_learned_variance(sd_process):
    """The guided prediction carries the base net's ``var_interp`` (detached, as the estimates)."""
    lv = learned_variance(sd_process)
    x = torch.randn(5, 2, dtype=F64, generator=_gen(9))
    for t in (900.0, 300.0, torch.tensor([900.0, 700.0, 500.0, 300.0, 10.0], dtype=F64)):
        ref = lv(x, t).var_interp
        for g in (ClassifierGuidance(lv, lambda x, t: -(x**2).sum(1), 2.0), RewardGuidance(lv, _linear, 0.5)):
            v = g(x, t).var_interp
            assert v is not None and torch.equal(v, ref) and not v.requires_grad, g
    # so DDPM with zero guidance is the unguided run (measured 0; fixed_small instead: 0.66 apart)
    x_T = torch.randn(8, 2, dtype=F64, generator=_gen(10))
    runs = [
        sd.sample(d, x_T, 10, "ddpm", generator=_gen(11))
        for d in (
            lv,
            ClassifierGuidance(lv, lambda x, t: 0 * x.sum(1)),
            RewardGuidance(lv, lambda x0: 0 * _linear(x0)),
        )
    ]
    assert all(float((r - runs[0]).abs().max()) < 1e-12 for r in runs[1:])


@pytest.mark.parametrize("kind", ["classifier", "reward"])
def test_gradient_guidance_keeps_float32_accuracy_near_zero_snr(kind):
    """The guided x0 of a v-prediction net on zero-terminal-SNR betas is steered where it is held, not
    taken x0 -> eps -> eps' -> x0' through x (which cancels where alpha is tiny): float32 against float64
    at one call. Measured <= 1.3e-7 relative, as the unguided net's 1.1e-7 (before: 7e-7 to 1.0e-6 for
    the classifier, 4e-6 to 6e-6 for the reward)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    proc = sd.VP.discrete(betas=betas, rescale_zero_snr=True)
    g = _gen(0)
    mu = torch.randn(16, generator=g, dtype=F64)
    w = torch.randn(16, 16, generator=g, dtype=F64) / 4
    b = torch.randn(16, generator=g, dtype=F64) / 4
    x = torch.randn(256, 16, generator=g, dtype=F64)

    den = sd.Denoiser(smooth_v_net(proc, mu, w), proc, "v")
    if kind == "classifier":
        guided = ClassifierGuidance(den, lambda v, t: v @ b.to(v.dtype))
    else:
        guided = RewardGuidance(den, lambda x0: x0 @ b.to(x0.dtype))
    for t in (999.0, 990.0, 900.0):
        ref, out = (guided(x.to(dtype), t).x0.double() for dtype in (F64, torch.float32))
        assert float((out - ref).abs().max() / ref.abs().max()) < 3e-7, t


@pytest.mark.parametrize("kind", ["classifier", "reward"])
def test_gradient_guidance_keeps_an_eps_nets_eps_near_the_clean_end(kind):
    """And an eps net's eps is steered where it is held, also after the reward has read x0 (which derives
    it): float32 against float64 at t = 0 and 5 of DDPM betas. Measured <= 2.5e-7 relative, as the
    unguided net (2.9e-4 when the reward's derived x0 was steered and eps derived back from it)."""
    proc = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    g = _gen(0)
    w = torch.randn(16, 16, generator=g, dtype=F64) / 4
    b = torch.randn(16, generator=g, dtype=F64) / 4
    x = 3 * torch.randn(256, 16, generator=g, dtype=F64)

    def net(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a smooth eps, in float64
        return (0.5 * torch.tanh(v.double() @ w) + 1e-5 * t.double()[:, None]).to(v.dtype)

    den = sd.Denoiser(net, proc, "eps")
    if kind == "classifier":
        guided = ClassifierGuidance(den, lambda v, t: v @ b.to(v.dtype))
    else:
        guided = RewardGuidance(den, lambda x0: x0 @ b.to(x0.dtype))
    for t in (0.0, 5.0):
        ref, out = (guided(x.to(dtype), t).eps.double() for dtype in (F64, torch.float32))
        assert float((out - ref).abs().max() / ref.abs().max()) < 5e-7, t


@pytest.mark.parametrize("cls", [ClassifierGuidance, RewardGuidance])
@pytest.mark.parametrize("bad", [None, "den", torch.zeros(2)])
def test_a_den_that_is_no_denoiser_is_named(cls, bad):
    """The message names ``den``, the argument's name here (it said "base")."""
    with pytest.raises(ValueError, match=f"{cls.__name__}: den must be a steerdiff Denoiser"):
        cls(bad, lambda x, *a: x.sum(-1))
