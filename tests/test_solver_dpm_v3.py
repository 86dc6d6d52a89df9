"""DPM-Solver-v3 (Zheng et al. 2023): the EMS against their closed forms on Gaussian data, the solver exact
there, its reduction to multistep DPM-Solver++ at ``l = 1, s = b = 0``, convergence orders, bad input.

Gaussian data ``x0 ~ N(mu, v I)``: the denoiser is affine, ``D(x) = mu + (1 - l)(x - alpha mu) / alpha``
with ``l = sigma^2 / (alpha^2 v + sigma^2) = 1 / (1 + v e^{2 lam})``, so ``sigma grad_x eps = l I`` (the EMS
``l``),
``N = sigma eps - l x = -alpha mu l`` does not depend on ``x``, ``f = -mu l`` is the same for every draw
(``s`` is then free; the fit's ridge picks 0) and ``b = f' = -mu l' = 2 mu l (1 - l)``. With these EMS ``g``
is constant along every trajectory, so each step is exact: what is left is the EMS's interpolation between
their nodes (linear in ``lam``), O(spacing^2) and independent of the step count.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import steerdiff as sd
from steerdiff.solvers import EMS, DPMSolverV3, fit_ems
from steerdiff.solvers._exp import hphi

from .reference import exact_sample, rel_rmse, slope

F64 = torch.float64
MU = torch.tensor([[0.7, -1.2, 2.0, 0.3]], dtype=F64)
CONV_STEPS = [10, 20, 40, 80]


def gaussian(var: float) -> sd.toy.GaussianMixture:
    return sd.toy.GaussianMixture(MU, torch.full_like(MU, var), torch.ones(1, dtype=F64))


def closed_forms(lam: Tensor, var: float) -> tuple[Tensor, Tensor, Tensor]:
    """``l, s, b`` of ``N(MU, var I)`` at ``lam`` (module docstring)."""
    l = (1 / (1 + var * torch.exp(2 * lam)))[:, None].expand(-1, MU.shape[1])  # noqa: E741
    return l, torch.zeros_like(l), 2 * MU * l * (1 - l)


def draws(batch: int, dim: int, seed: int = 1) -> Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(scope="module")
def ems(gmm, sd_process) -> EMS:
    """EMS of the tests' 8-d mixture, fitted on 32 draws other than the scored ones."""
    return fit_ems(gmm.denoiser(sd_process), samples=32, generator=torch.Generator().manual_seed(5), nodes=50)


@pytest.mark.parametrize("var", [0.4, 2.5])
def test_fitted_ems_equal_gaussian_closed_forms(sd_process, var):
    """l to rounding (Hutchinson's estimator is exact on a diagonal Jacobian), s = 0, b to the finite
    differences' O(delta^2) (measured 2e-8 at var 0.4)."""
    den = gaussian(var).denoiser(sd_process)
    fit = fit_ems(den, samples=16, generator=torch.Generator().manual_seed(3), nodes=30)
    l, _, b = closed_forms(fit.lam, var)  # noqa: E741
    assert fit.nfe == 29 * 2 + 5 * 30
    assert float((fit.l - l).abs().max()) < 1e-12
    assert float(fit.s.abs().max()) < 1e-6
    assert float((fit.b - b).abs().max()) < 2e-7
    assert float(b.abs().max()) > 0.5  # not vacuous


def test_exact_ems_solve_the_gaussian_ode_at_any_step_count(sd_process):
    """With the closed-form EMS every order solves the ODE to the interpolation error of the EMS (measured
    <= 3.2e-7 at 2000 nodes, from 2 to 20 steps; 100 times that at 200 nodes), where DPM-Solver++(3M) is
    2e-4 to 0.23 off."""
    var = 0.4
    g = gaussian(var)
    den, x_T = g.denoiser(sd_process), draws(16, MU.shape[1])
    ode = g.reference_ode(x_T, sd_process, sd_process.t_max, sd_process.t_min, denoise=False)
    lo, hi = float(sd_process.lam(sd_process.t_max)), float(sd_process.lam(sd_process.t_min))

    def err(nodes: int, order: int, steps: int) -> float:
        lam = torch.linspace(lo, hi, nodes, dtype=F64)
        slv = DPMSolverV3(EMS(sd_process, lam, *closed_forms(lam, var)), order=order)
        return rel_rmse(
            sd.sample(den, x_T, steps=steps, solver=slv, schedule="logsnr_uniform", final="none"), ode
        )

    for steps in (2, 3, 5, 10, 20):
        base = rel_rmse(
            sd.sample(den, x_T, steps=steps, solver="dpmpp_3m", schedule="logsnr_uniform", final="none"), ode
        )
        assert base > 1e-4
        for order in (1, 2, 3):
            assert err(2000, order, steps) < 5e-7, (order, steps)
    assert 50 < err(200, 3, 5) / err(2000, 3, 5) < 200  # O(spacing^2)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_degenerate_ems_is_dpm_solver_pp(gmm, sd_process, x_T, order):
    """l = 1, s = b = 0: f = -x0 and the predictor integrates the polynomial through the denoised estimates
    exactly, warm-up included: DPM-Solver++ multistep with the exact phi_2 weight (the "heun" 2M of the SDE
    family at eta = 0, the same 3M's exact third-order weight)."""
    den = gmm.denoiser(sd_process)
    slv = DPMSolverV3(EMS.degenerate(sd_process, (8,)), order=order, corrector=False)
    ref = (
        sd.solvers.DPMSolverPPMultistep(order=1)
        if order == 1
        else sd.solvers.DPMSolverSDEMultistep(order=order, eta=0.0, solver_type="heun")
    )
    for steps in (3, 12, 25):
        x, info = sd.sample(den, x_T, steps=steps, solver=slv, return_info=True)
        assert info.nfe == steps
        assert rel_rmse(x, sd.sample(den, x_T, steps=steps, solver=ref)) < 1e-12


@pytest.mark.parametrize(
    "order,pseudo,corrector,corrector_pseudo,expected",
    [
        (1, False, False, False, 1),
        (2, False, False, False, 2),
        (3, False, False, False, 3),
        (3, True, False, False, 2),
        (1, False, True, True, 2),
    ],
    ids=["p1", "p2", "p3", "p3-pseudo", "p1-c-pseudo"],
)
def test_convergence_order(gmm, sd_process, x_T, ems, order, pseudo, corrector, corrector_pseudo, expected):
    """The predictor of order p converges with order p; the pseudo-order one (divided differences) with 2
    (g' from the newest two estimates); the pseudo corrector raises order 1 to 2. Measured slopes 1.06, 2.18,
    2.95, 2.28, 1.96."""
    solver = DPMSolverV3(
        ems,
        order,
        pseudo=pseudo,
        corrector=corrector,
        corrector_pseudo=corrector_pseudo,
        lower_order_final=False,
    )
    den, exact = gmm.denoiser(sd_process), exact_sample(gmm, sd_process, x_T)
    errors = [
        rel_rmse(sd.sample(den, x_T, steps=n, solver=solver, schedule="logsnr_uniform"), exact)
        for n in CONV_STEPS
    ]
    assert abs(slope(CONV_STEPS, errors) - expected) < 0.35, errors


def test_corrector_by_hand(gmm, sd_process, x_T):
    """Three steps of order 2 with the corrector at l = 1, s = b = 0, written out (``m_j`` the denoised
    estimates, ``W_k = hphi(k, h)``): DDIM, then 2M with the exact phi_2 weight; at node 2 the corrector
    redoes step 1 -> 2 with the line through ``m_1, m_2`` (order 2: the predictor's, two points), then 2M
    again from the corrected state. NFE = 3."""
    den = gmm.denoiser(sd_process)
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("logsnr_uniform"), 3, final="none")
    a, s, h = grid.alpha, grid.sigma, [grid.h(i) for i in range(3)]

    def step(x: Tensor, i: int, m0: Tensor, slope: Tensor | None, hh: float) -> Tensor:
        out = s[i + 1] / s[i] * x + a[i + 1] * hphi(1, hh) * m0
        return out if slope is None else out + a[i + 1] * hphi(2, hh) * slope

    m0 = den(x_T, grid.t[0]).x0
    x1 = step(x_T, 0, m0, None, h[0])
    m1 = den(x1, grid.t[1]).x0
    x2 = step(x1, 1, m1, (m1 - m0) / h[0], h[1])
    m2 = den(x2, grid.t[2]).x0
    x2 = step(x1, 1, m1, (m2 - m1) / h[1], h[1])  # the corrector: the line through m_1 and m_2
    x3 = step(x2, 2, m2, (m2 - m1) / h[1], h[2])
    slv = DPMSolverV3(EMS.degenerate(sd_process, (8,)), 2, lower_order_final=False)
    out, info = sd.sample(
        den, x_T, steps=3, solver=slv, schedule="logsnr_uniform", final="none", return_info=True
    )
    assert info.nfe == 3
    assert rel_rmse(out, x3) < 1e-12
    assert rel_rmse(out, sd.sample(den, x_T, steps=3, solver=DPMSolverV3(slv.ems, 2, corrector=False))) > 1e-4


def test_ems_and_corrector_lower_the_error(gmm, sd_process, x_T, ems):
    """The fitted EMS halve the first-order error of DPM-Solver++'s parameterization (measured 0.48 at 10 and
    20 steps); the corrector at orders 2 and 3 cuts the predictor's error (0.15-0.51)."""
    den, exact = gmm.denoiser(sd_process), exact_sample(gmm, sd_process, x_T)

    def err(slv: DPMSolverV3, n: int) -> float:
        return rel_rmse(sd.sample(den, x_T, steps=n, solver=slv, schedule="logsnr_uniform"), exact)

    deg = EMS.degenerate(sd_process, (8,))
    for n in (10, 20):
        assert err(DPMSolverV3(ems, 1), n) < 0.6 * err(DPMSolverV3(deg, 1), n)
        for order in (2, 3):
            on, off = DPMSolverV3(ems, order), DPMSolverV3(ems, order, corrector=False)
            assert err(on, n) < 0.7 * err(off, n), (order, n)


def test_half_corrector_corrects_the_noisy_half_only(gmm, sd_process, x_T, ems):
    """half=True: the corrector's run up to the time midpoint, then the predictor's."""
    den = gmm.denoiser(sd_process)
    runs = {}
    for name, slv in {
        "half": DPMSolverV3(ems, 3, half=True),
        "on": DPMSolverV3(ems, 3),
        "off": DPMSolverV3(ems, 3, corrector=False),
    }.items():
        xs: list[tuple[float, Tensor]] = []
        sd.sample(den, x_T, steps=10, solver=slv, callback=lambda d, xs=xs: xs.append((d["t"], d["x"])))
        runs[name] = xs
    mid = (sd_process.t_min + sd_process.t_max) / 2
    first_late = next(i for i, (t, _) in enumerate(runs["on"]) if t <= mid)
    assert 1 < first_late < 9
    for i in range(first_late):  # states predicted from corrected nodes above the midpoint
        assert rel_rmse(runs["half"][i][1], runs["on"][i][1]) < 1e-14
    assert rel_rmse(runs["half"][-1][1], runs["on"][-1][1]) > 1e-6
    assert rel_rmse(runs["half"][-1][1], runs["off"][-1][1]) > 1e-6


def test_bad_input(gmm, sd_process, x_T, ems):
    den = gmm.denoiser(sd_process)
    with pytest.raises(ValueError, match="ems"):
        DPMSolverV3(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        DPMSolverV3(ems, 4)
    with pytest.raises(ValueError, match="pseudo"):
        DPMSolverV3(ems, pseudo="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_h"):
        DPMSolverV3(ems, max_h=-1.0)
    with pytest.raises(ValueError, match="den"):
        fit_ems(gmm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nodes"):
        fit_ems(den, nodes=1)
    with pytest.raises(ValueError, match="x_T"):
        fit_ems(den, x_T=torch.zeros(8, dtype=F64))
    lam = torch.tensor([0.0, 1.0], dtype=F64)
    one = torch.ones(2, 8, dtype=F64)
    with pytest.raises(ValueError, match="lam"):
        EMS(sd_process, lam.flip(0), one, one, one)
    with pytest.raises(ValueError, match="s must be"):
        EMS(sd_process, lam, one, one[:1], one)
    with pytest.raises(ValueError, match="finite"):
        EMS(sd_process, lam, one, one, one * float("nan"))
    # another process, or a grid outside the fitted log-SNR range
    other = sd.VP.linear()
    with pytest.raises(ValueError, match="fitted to"):
        sd.sample(gmm.denoiser(other), x_T, steps=5, solver=DPMSolverV3(ems))
    with pytest.raises(ValueError, match="EMS range"):
        sd.sample(den, x_T, steps=5, solver=DPMSolverV3(EMS.degenerate(sd_process, (8,), lo=-1.0, hi=1.0)))


def test_not_a_registered_name():
    """It needs fitted EMS: an instance, not a name of ``solver=``."""
    assert "dpm_solver_v3" not in sd.solvers.available()
    with pytest.raises(ValueError, match="unknown solver"):
        sd.solvers.get("dpm_solver_v3")


def test_fit_draws_at_the_prior_scale():
    """Drawn teacher noise is the process's prior, ``sqrt(alpha^2 + sigma^2)`` at ``t_max`` times standard
    normal (about ``sigma_max`` for VE / EDM), as ``x_T`` passed by hand: fitted on unit draws (the
    trajectories of another start) the EMS of the mixture were 2.1 off at 5 steps on EDM, 16 times those of
    the right draws (0.13, DPM-Solver++(3M) 0.20)."""
    proc = sd.EDM()
    den = gaussian(0.4).denoiser(proc)
    drawn = fit_ems(den, samples=4, generator=torch.Generator().manual_seed(2), nodes=6)
    x_T = draws(4, MU.shape[1], seed=2) * math.hypot(
        float(proc.alpha(proc.t_max)), float(proc.sigma(proc.t_max))
    )
    by_hand = fit_ems(den, x_T, nodes=6)
    for name in ("l", "s", "b"):
        assert torch.equal(getattr(drawn, name), getattr(by_hand, name)), name


def test_paradigms_converge_to_the_sequential_run(gmm, sd_process, x_T, ems):
    """One evaluation per step at its own node: the Picard iteration takes it, and converged it is the
    sequential run (the corrector moving a guess by its move); window 1 is that run bit for bit."""
    den, slv = gmm.denoiser(sd_process), DPMSolverV3(ems, 3)
    ref = sd.sample(den, x_T, 20, solver=slv)
    tight, info = sd.paradigms(den, x_T, 20, solver=slv, tol=1e-12, return_info=True)
    assert float((tight - ref).abs().max() / ref.abs().max()) < 1e-10
    assert info.iterations < 20
    assert torch.equal(sd.paradigms(den, x_T, 20, solver=slv, window=1), ref)


def test_fit_needs_autograd(sd_process):
    """Jacobian-vector products: under inference_mode a ValueError saying so (no_grad is fine)."""
    den = gaussian(0.4).denoiser(sd_process)
    with torch.no_grad():
        fit = fit_ems(den, samples=2, nodes=3)
    assert float((fit.l - closed_forms(fit.lam, 0.4)[0]).abs().max()) < 1e-12
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        fit_ems(den, samples=2, nodes=3)


def test_fit_nfe_counts_a_guided_denoisers_evaluations(gmm, sd_process):
    """EMS.nfe: the network evaluations the fit made, a CFG's two per call (its ``cost``)."""
    cfg = sd.guidance.CFG(gmm.denoiser(sd_process), gmm.denoiser(sd_process), 2.0)
    fit = fit_ems(cfg, samples=2, nodes=4)
    assert fit.nfe == 2 * (3 * 2 + 5 * 4)


def test_fit_keeps_no_trajectory(sd_process):
    """The statistics of a node are taken when the teacher reaches it: the fit holds a few states at a
    time, not every node's (with their autograd graphs, for a net with parameters), whatever ``nodes``."""
    import weakref

    base = gaussian(0.4).denoiser(sd_process)
    weight = torch.nn.Parameter(torch.ones((), dtype=F64))
    seen: list[weakref.ref[Tensor]] = []
    alive = [0]

    def net(x: Tensor, t: Tensor) -> Tensor:
        seen.append(weakref.ref(x))
        alive[0] = max(alive[0], sum(r() is not None for r in seen))
        return weight * base.net(x, t)

    den = sd.Denoiser(net, sd_process, prediction=base.prediction)
    fit = fit_ems(den, shape=(4,), samples=2, nodes=40)
    assert float((fit.l - closed_forms(fit.lam, 0.4)[0]).abs().max()) < 1e-12
    assert alive[0] < 15, alive[0]


def test_coefficients_kept_for_the_latest_grid_only(gmm, sd_process, x_T, ems):
    """The per-step tables (``3k + 2`` sample-shaped tensors a step) are kept for the grid of the latest
    run: one solver reused over many grids holds one grid's, not every grid's (was 72 after 4 grids)."""
    den, slv = gmm.denoiser(sd_process), DPMSolverV3(ems, 3)
    sizes = []
    for steps in (6, 7, 8, 9, 6):
        x = sd.sample(den, x_T, steps=steps, solver=slv)
        sizes.append(len(slv._cache))
    assert rel_rmse(x, sd.sample(den, x_T, steps=6, solver=DPMSolverV3(ems, 3))) == 0.0
    assert max(sizes) <= 3 * 9, sizes
