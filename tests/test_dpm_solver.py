"""Singlestep DPM-Solver(++): parity with diffusers, convergence order, NFE and the order split.

Grids. diffusers' ``DPMSolverSinglestepScheduler.set_timesteps(N)`` evaluates at the ``N`` integer
timesteps ``round(linspace(0, 999, N + 1))[::-1][:-1]`` and steps into a last sigma that is
``0`` (``final_sigmas_type="zero"``) or the sigma of timestep 0 (``"sigma_min"``). The first is
``Custom(nodes_of(sched))`` with our clean end (``final="zero"``); the second, which diffusers
requires for ``algorithm_type="dpmsolver"``, is the ``N + 1`` nodes ``nodes_of(sched) + [0]``
with ``final="none"``. The intermediate points of a macro-step are grid nodes in both libraries,
and diffusers' per-step ``order_list`` (``[1, 2, 3]`` per order-3 macro-step) gives the same
macro-step orders as :meth:`DPMSolver.macro_orders` (checked below). diffusers computes the
order-3 intermediate point ``u_2`` with the order-2 midpoint update, so parity uses
``second_stage="midpoint"``; the default (Lu et al. 2022, Alg. 2) is checked against the exact
solution.
"""

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers import DPMSolver
from steerdiff.solvers._exp import hphi_eps
from steerdiff.solvers.dpm_solver import ALGORITHMS

from .reference import (
    PARITY_BOUND,
    diffusers_sample,
    exact_sample,
    nodes_of,
    noise,
    rel_rmse,
    sd_betas_config,
    slope,
)


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def exact(gmm, sd_process, x_T):
    return exact_sample(gmm, sd_process, x_T)


def macro_of(order_list: list[int]) -> list[int]:
    """diffusers' per-step orders (``[1, 2, 3, 1, 2, 1]``) as macro-step orders (``[3, 2, 1]``)."""
    out: list[int] = []
    for k in order_list:
        if k == 1:
            out.append(1)
        else:
            out[-1] = k
    return out


@pytest.mark.parametrize("steps", [4, 5, 10, 15])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmsolverpp_matches_diffusers(diffusers, gmm, sd_process, x_T, exact, order, steps):
    sched = diffusers.DPMSolverSinglestepScheduler(**sd_betas_config(solver_order=order))
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps)
    solver = DPMSolver(order=order, algorithm="dpmsolver++", second_stage="midpoint")
    assert macro_of(sched.order_list) == solver.macro_orders(steps, clean_end=True)
    ours, info = sd.sample(
        gmm.denoiser(sd_process), x_T, steps=steps, solver=solver, schedule=nodes_of(sched), return_info=True
    )
    assert info.nfe == nfe == steps
    assert rel_rmse(ours, ref) < PARITY_BOUND["DPMSolverSinglestepScheduler"]
    assert rel_rmse(ours, exact) < 0.25


@pytest.mark.parametrize("steps", [4, 5, 10, 15])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmsolver_matches_diffusers(diffusers, gmm, sd_process, x_T, order, steps):
    # lower_order_final=False keeps order 2 at [2, ..., 2] for even N (odd N force it to True);
    # for order 3 with N % 3 == 0 the fast split [3, ..., 3, 2, 1] needs it True.
    cfg = sd_betas_config(
        solver_order=order,
        algorithm_type="dpmsolver",
        final_sigmas_type="sigma_min",
        lower_order_final=order == 3,
    )
    sched = diffusers.DPMSolverSinglestepScheduler(**cfg)
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, steps)
    solver = DPMSolver(order=order, algorithm="dpmsolver", second_stage="midpoint")
    assert macro_of(sched.order_list) == solver.macro_orders(steps, clean_end=False)
    grid = sd.schedules.Custom([*nodes_of(sched).grid.tolist(), 0.0])
    ours, info = sd.sample(
        gmm.denoiser(sd_process),
        x_T,
        steps=steps,
        solver=solver,
        schedule=grid,
        final="none",
        return_info=True,
    )
    assert info.nfe == nfe == steps
    # 1.0e-5 at order 3 and 4 steps: the noise form amplifies diffusers' float32 rounding more
    assert rel_rmse(ours, ref) < PARITY_BOUND["DPMSolverSinglestepScheduler(dpmsolver)"]


# Errors from 2.4e-3 down to 1.9e-6 (order 3), far above the reference ODE's 1e-10 tolerance.
# Below ~24 steps the large early steps are pre-asymptotic (noise prediction converges faster
# than h^3 there, data prediction slower). final="zero" keeps the order: the last step only
# applies the exact denoiser, and the macro-step before it is of order >= 2 on the noisy part.
ORDER_STEPS = [24, 48, 96, 192]


@pytest.mark.parametrize(
    ("algorithm", "order", "second_stage"),
    [
        ("dpmsolver++", 1, "paper"),
        ("dpmsolver++", 2, "paper"),
        ("dpmsolver++", 3, "paper"),
        ("dpmsolver++", 3, "midpoint"),
        ("dpmsolver", 1, "paper"),
        ("dpmsolver", 2, "paper"),
        ("dpmsolver", 3, "paper"),
    ],
)
def test_convergence_order(gmm, sd_process, x_T, exact, algorithm, order, second_stage):
    den = gmm.denoiser(sd_process)
    solver = DPMSolver(order=order, algorithm=algorithm, second_stage=second_stage)
    errors = [
        rel_rmse(sd.sample(den, x_T, steps=n, solver=solver, schedule="logsnr_uniform"), exact)
        for n in ORDER_STEPS
    ]
    assert errors[-1] > 1e-7
    assert abs(slope(ORDER_STEPS, errors) - order) < 0.35


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("steps", [1, 2])
def test_too_few_steps_lower_the_order(gmm, sd_process, x_T, algorithm, steps):
    # order 3 with 1 or 2 steps into a clean end: macro-steps [1] and [1, 1], i.e. DDIM.
    den = gmm.denoiser(sd_process)
    solver = DPMSolver(order=3, algorithm=algorithm)
    assert solver.macro_orders(steps) == [1] * steps
    ours, info = sd.sample(den, x_T, steps=steps, solver=solver, return_info=True)
    assert info.nfe == solver.nfe(steps) == steps
    assert rel_rmse(ours, sd.sample(den, x_T, steps=steps, solver="ddim")) < 1e-12
    if steps == 1:  # the denoised estimate at t_max
        t = sd_process.t_max
        x0 = gmm.denoise(x_T, float(sd_process.alpha(t)), float(sd_process.sigma(t)))
        assert rel_rmse(ours, x0) < 1e-12


@pytest.mark.parametrize(
    ("order", "second_stage", "bound"),
    [(1, "paper", 1e-5), (2, "paper", 1e-5), (3, "paper", 1e-3), (3, "midpoint", 1e-3)],
)
def test_noise_prediction_float32_keeps_float64_accuracy_at_zero_terminal_snr(order, second_stage, bound):
    """At zero terminal SNR (alpha_0 = 2**-12) ``(alpha_a / alpha_s) (x_s - sigma_s S)`` multiplied ``x_s`` by
    up to ~300 and cancelled it against ``eps_s`` in float32; DDIM from the net's ``x0`` plus the term in
    ``f_a - f_s`` does not. Measured (16-d mixture, 256 samples, 10 steps, time_uniform / trailing), float32
    vs float64 before: order 1 9.4e-4 / 6.6e-5, order 2 1.8e-3 / 1.3e-3, order 3 4.6e-2 / 4.8e-2 (midpoint
    6.0e-3 / 7.2e-3); now 1.8e-6 / 1.2e-6, 5.6e-6 / 5.6e-6, 3.4e-4 / 3.5e-5 (1.5e-5 / 2.3e-5). Order 3's
    rest is the method's: it amplifies eps's rounding by ``alpha_a sigma_s / alpha_s`` (a float64 run with
    its state perturbed by 2**-24 after every step moves 1.4e-4 / 2.6e-5 (6.2e-5 / 1.3e-5))."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    proc = sd.VP.discrete(alphas_cumprod=sd.VP.scaled_linear().alphas_cumprod, rescale_zero_snr=True)
    den, x_T = gmm.denoiser(proc), noise(256, 16, seed=0)
    solver = DPMSolver(order=order, algorithm="dpmsolver", second_stage=second_stage)
    for schedule in ("time_uniform", "trailing"):
        a = sd.sample(den, x_T, steps=10, solver=solver, schedule=schedule)
        b = sd.sample(den, x_T.float(), steps=10, solver=solver, schedule=schedule)
        assert b.dtype == torch.float32
        assert rel_rmse(b.double(), a) < bound, schedule


ZERO_SNR_SD = sd.VP.discrete(alphas_cumprod=sd.VP.scaled_linear().alphas_cumprod, rescale_zero_snr=True)


def alg_1_2(
    gmm: sd.toy.GaussianMixture, proc: sd.Process, x: torch.Tensor, t: list[float], orders: list[int]
) -> torch.Tensor:
    """Lu et al. 2022, Alg. 1 (DPM-Solver-2) and Alg. 2 (DPM-Solver-3) as printed, noise prediction,
    float64, the intermediate points ``s_1, s_2`` of a macro-step the grid nodes after its start
    (``r_1 = h_1 / h``, ``r_2 = h_2 / h``); then the exact denoiser at ``t[-1]``."""

    def eps(y, u):
        a, s = float(proc.alpha(u)), float(proc.sigma(u))
        return (y - a * gmm.denoise(y, a, s)) / s

    i = 0
    for k in orders:
        ts = t[i : i + k + 1]
        al, si, la = ([float(f(u)) for u in ts] for f in (proc.alpha, proc.sigma, proc.lam))
        h, e0 = la[k] - la[0], eps(x, ts[0])
        r1 = (la[1] - la[0]) / h
        ddim = al[k] / al[0] * x - si[k] * math.expm1(h) * e0
        if k == 1:
            x = ddim
        elif k == 2:
            d1 = eps(al[1] / al[0] * x - si[1] * math.expm1(r1 * h) * e0, ts[1]) - e0
            x = ddim - si[2] / (2 * r1) * math.expm1(h) * d1
        else:
            r2 = (la[2] - la[0]) / h
            d1 = eps(al[1] / al[0] * x - si[1] * math.expm1(r1 * h) * e0, ts[1]) - e0
            u2 = al[2] / al[0] * x - si[2] * math.expm1(r2 * h) * e0
            u2 = u2 - si[2] * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * d1
            d2 = eps(u2, ts[2]) - e0
            x = ddim - si[3] / r2 * (math.expm1(h) / h - 1) * d2
        i += k
    a, s = float(proc.alpha(t[-1])), float(proc.sigma(t[-1]))
    return gmm.denoise(x, a, s)


@pytest.mark.parametrize(("order", "steps", "bound"), [(2, 20, 0.05), (3, 10, 0.5)])
def test_noise_prediction_at_zero_terminal_snr_is_the_papers_update(order, steps, bound):
    """The noise form's large error out of zero terminal SNR (module docstring) is Alg. 1-2's own: the run
    equals the algorithm as printed (measured 4.5e-12 / 3.4e-11 at order 2, 20 steps / order 3, 10 steps) and
    is worse than DDIM (0.446 / 7.38 against 0.236 / 0.284), where the data form (0.0163 / 0.0253) and the
    noise form with the same macro-steps' intermediate points at the paper's ``r_1 = 1/2`` and ``r_1, r_2 =
    1/3, 2/3`` (0.0164 / 0.218) are not. 16-d mixture, 64 samples, SD betas rescaled to zero terminal SNR,
    karras_capped, float64, against the exact ODE to the last node and its exact denoiser."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    proc, x_T = ZERO_SNR_SD, noise(64, 16, seed=1)
    den = gmm.denoiser(proc)
    t = sd.schedules.get("karras_capped")(proc, steps).tolist()
    orders = DPMSolver(order=order).macro_orders(steps)
    assert orders[-1] == 1  # the last: the exact denoiser at t[-1]
    exact = gmm.reference_ode(x_T, proc, proc.t_max, t[-1], denoise=True)

    def run(algorithm: str, schedule) -> torch.Tensor:
        return sd.sample(den, x_T, steps, DPMSolver(order=order, algorithm=algorithm), schedule)

    noise_form = run("dpmsolver", "karras_capped")
    assert rel_rmse(noise_form, alg_1_2(gmm, proc, x_T, t, orders[:-1])) < 1e-9
    assert rel_rmse(noise_form, exact) > rel_rmse(sd.sample(den, x_T, steps, "ddim", "karras_capped"), exact)
    assert rel_rmse(run("dpmsolver++", "karras_capped"), exact) < 0.1
    # the paper's intermediate points: the same macro-step ends, s_a at lam_s + (a / k) h
    lam, moved, i = [float(proc.lam(u)) for u in t], [], 0
    for k in orders[:-1]:
        moved += [t[i], *(float(proc.t_of_lam(lam[i] + a / k * (lam[i + k] - lam[i]))) for a in range(1, k))]
        i += k
    assert rel_rmse(run("dpmsolver", sd.schedules.Custom(moved + t[-1:])), exact) < bound


def test_alg_2_is_third_order_only_where_r2_tends_to_two_thirds():
    """Alg. 2's last update weights ``(f_2 - f_s) / r_2`` alone: its ``h^3 f''`` term is off by
    ``(1/6 - r_2/4) h^3``. On lam-uniform macro-steps with ``r_1, r_2 = 1/10, 1/2`` (SD betas, 16-d
    mixture) the order is 2 (measured slopes 1.90 / 1.94 for the noise / data form over 97-385 steps);
    ``1/3, 2/3`` is test_convergence_order's logsnr_uniform."""
    gmm = sd.toy.default_benchmark_mixture(dim=16)
    proc, x_T = sd.VP.scaled_linear(), noise(64, 16, seed=1)
    exact = exact_sample(gmm, proc, x_T)
    l0, l1 = float(proc.lam(proc.t_max)), float(proc.lam(proc.t_min))
    ms = [32, 64, 128]
    for algorithm in ALGORITHMS:
        errors = []
        for m in ms:  # m order-3 macro-steps, then the step into the clean end
            lam = [l0 + (l1 - l0) * (q + f) / m for q in range(m) for f in (0.0, 0.1, 0.5)] + [l1]
            grid = sd.schedules.Custom(proc.t_of_lam(torch.tensor(lam, dtype=torch.float64)).tolist())
            solver = DPMSolver(order=3, algorithm=algorithm)
            errors.append(rel_rmse(sd.sample(gmm.denoiser(proc), x_T, 3 * m + 1, solver, grid), exact))
        assert abs(slope(ms, errors) - 2) < 0.25, (algorithm, errors)


def test_too_few_steps_without_clean_end(gmm, sd_process, x_T):
    # one order-2 macro-step over 2 steps (no clean end): 2 NFE, more accurate than DDIM.
    den = gmm.denoiser(sd_process)
    ref = gmm.reference_ode(x_T, sd_process, sd_process.t_max, sd_process.t_min)
    ours, info = sd.sample(den, x_T, steps=2, solver=DPMSolver(order=3), final="none", return_info=True)
    ddim = sd.sample(den, x_T, steps=2, solver="ddim", final="none")
    assert info.nfe == 2
    assert rel_rmse(ours, ref) < rel_rmse(ddim, ref)


@pytest.mark.parametrize(
    ("order", "steps", "clean_end", "expected"),
    [
        (3, 9, False, [3, 3, 2, 1]),  # DPM-Solver-fast, M % 3 == 0
        (3, 10, False, [3, 3, 3, 1]),
        (3, 11, False, [3, 3, 3, 2]),
        (3, 3, False, [2, 1]),
        (3, 2, False, [2]),
        (2, 10, False, [2, 2, 2, 2, 2]),
        (2, 11, False, [2, 2, 2, 2, 2, 1]),
        (1, 3, False, [1, 1, 1]),
        (3, 9, True, [3, 3, 2, 1]),
        (3, 11, True, [3, 3, 3, 1, 1]),  # the order-2 macro-step into the clean end splits
        (2, 10, True, [2, 2, 2, 2, 1, 1]),
        (3, 2, True, [1, 1]),
    ],
)
def test_macro_orders(order, steps, clean_end, expected):
    assert DPMSolver(order=order).macro_orders(steps, clean_end) == expected
    assert sum(expected) == steps


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"order must be an integer in \[1, 3\], got 4"):
        DPMSolver(order=4)
    with pytest.raises(ValueError, match=r"algorithm must be one of .*dpmsolver.*got 'ddim'"):
        DPMSolver(algorithm="ddim")
    with pytest.raises(ValueError, match="second_stage"):
        DPMSolver(second_stage="heun")


def test_registered():
    assert "dpm_solver" in sd.solvers.available()
    solver = sd.solvers.get("dpm_solver")
    assert isinstance(solver, DPMSolver)
    assert (solver.order, solver.algorithm) == (3, "dpmsolver++")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noise_weights_are_incomplete_gamma(k):
    # e^{-h} h^k phi_k(h) = int_0^h e^{-u} u^{k-1}/(k-1)! du = P(k, h), the regularized gamma
    special = pytest.importorskip("scipy.special")
    for h in [1e-4, 0.3, 0.7, 2.0, 10.0, 29.0, 31.0, 60.0]:
        assert hphi_eps(k, h) == pytest.approx(float(special.gammainc(k, h)), rel=1e-13)
    assert hphi_eps(k, math.inf) == 1.0
