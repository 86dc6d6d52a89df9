"""DC-Solver: equal to UniPC at neutral ratios, the Lagrange compensation, fitted ratios against the exact ODE
on held-out draws, NFE, determinism of the search, CPR, bad input.

The ratios are fitted on 16 draws of ``x_T`` (seed 11) and scored on 64 others (seed 12) against the exact
probability-flow ODE of the 8-d test mixture under SD's betas (``karras_capped``, ``sd.sample``'s default).
"""

from __future__ import annotations

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers import CPR, DCSolver, ExactReference, SolverReference, search_ratios
from steerdiff.solvers.dc_solver import dc_weights

from .reference import noise, rel_rmse


@pytest.fixture(scope="module")
def den(gmm, sd_process):
    return gmm.denoiser(sd_process)


@pytest.fixture(scope="module")
def x_fit():
    return noise(16, 8, seed=11)


@pytest.fixture(scope="module")
def x_test():
    return noise(64, 8, seed=12)


@pytest.fixture(scope="module")
def exact_fit(gmm, sd_process, x_fit):
    return ExactReference(gmm, sd_process, x_fit)


@pytest.fixture(scope="module")
def exact_test(gmm, sd_process, x_test):
    return gmm.reference_ode(x_test, sd_process, sd_process.t_max, sd_process.t_min, denoise=True)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize(("steps", "final"), [(5, "zero"), (10, "zero"), (6, "none")])
def test_neutral_ratios_are_unipc(den, x_test, order, variant, steps, final):
    unipc = sd.sample(den, x_test, steps, sd.solvers.UniPC(order=order, variant=variant), final=final)
    for ratios in (None, [1.0] * steps):
        dc = DCSolver(ratios=ratios, order=order, variant=variant)
        assert torch.equal(sd.sample(den, x_test, steps, dc, final=final), unipc)


def test_the_compensation_is_the_lagrange_polynomial_at_the_shifted_time():
    # estimates on a quadratic in t: the compensated one is the quadratic at t* = rho t_i + (1 - rho) t_{i-1}
    times = [310.0, 420.0, 700.0]

    def q(t: float) -> float:
        return 0.5 - 3e-3 * t + 4e-6 * t * t

    for rho in (1.0, 0.5, 1.3, -0.2):
        w = dc_weights(times, rho)
        t_star = rho * times[0] + (1 - rho) * times[1]
        assert abs(sum(wk * q(t) for wk, t in zip(w, times, strict=True)) - q(t_star)) < 1e-14
    assert dc_weights(times, 1.0) == [1.0, 0.0, 0.0]
    assert dc_weights(times[:2], 0.0) == pytest.approx([0.0, 1.0], abs=1e-15)  # K = 1 at rho = 0: m_{i-1}


def test_a_ratio_changes_the_run_from_its_step_on(den, x_test):
    grid = sd.solvers.make_grid(den.process, sd.schedules.get("karras_capped"), 6)
    runs = {}
    for k in (2, 5):
        ratios = [1.0] * 6
        ratios[k] = 0.8
        states: list[torch.Tensor] = []
        sd.sample(den, x_test, 6, DCSolver(ratios=ratios), callback=lambda d, s=states: s.append(d["x"]))
        runs[k] = states
    base: list[torch.Tensor] = []
    sd.sample(den, x_test, 6, sd.solvers.UniPC(), callback=lambda d: base.append(d["x"]))
    assert grid.steps == 6
    for k, states in runs.items():  # the ratio of step k moves the state after step k, not before
        assert all(torch.equal(a, b) for a, b in zip(states[:k], base[:k], strict=True))
        assert rel_rmse(states[k], base[k]) > 1e-3


@pytest.mark.parametrize(
    ("variant", "steps", "bound"),
    # measured dc / unipc on the held-out draws: bh2 0.826 (5) and 0.522 (10), bh1 0.498 and 0.440
    [("bh2", 5, 0.9), ("bh2", 10, 0.6), ("bh1", 5, 0.6), ("bh1", 10, 0.55)],
)
def test_fitted_ratios_reduce_the_error_on_held_out_draws(
    den, x_fit, x_test, exact_fit, exact_test, variant, steps, bound
):
    unipc = sd.solvers.UniPC(order=3, variant=variant)
    fit = search_ratios(den, x_fit, steps, solver=DCSolver(variant=variant), reference=exact_fit)
    err_dc = rel_rmse(sd.sample(den, x_test, steps, fit.solver), exact_test)
    err_unipc = rel_rmse(sd.sample(den, x_test, steps, unipc), exact_test)
    assert err_dc / err_unipc < bound, (err_dc, err_unipc, fit.solver.ratios)
    assert fit.solver.ratios[:2] == [1.0, 1.0] and fit.solver.variant == variant


def test_nfe_is_the_step_count(den, x_test, x_fit, exact_fit):
    fit = search_ratios(den, x_fit, 7, reference=exact_fit, iters=5)
    _, info = sd.sample(den, x_test, 7, fit.solver, return_info=True)
    assert info.nfe == fit.solver.nfe(7) == 7
    # the search: the run's 7 plus 5 per compensated step that a correction follows (steps 2..4: the state
    # after step 5 goes into the clean end uncorrected, step 6 is the clean end)
    assert fit.nfe == 7 + 5 * 3


def test_the_search_is_deterministic_per_seed(den, x_fit, gmm, sd_process):
    # fresh references: a cached one's states depend, to the ODE solver's tolerance, on the grids it served
    a = search_ratios(den, x_fit, 6, reference=ExactReference(gmm, sd_process, x_fit)).solver.ratios
    b = search_ratios(den, x_fit.clone(), 6, reference=ExactReference(gmm, sd_process, x_fit)).solver.ratios
    other = noise(16, 8, seed=13)
    c = search_ratios(den, other, 6, reference=ExactReference(gmm, sd_process, other)).solver.ratios
    assert a == b
    assert max(abs(u - v) for u, v in zip(a, c, strict=True)) > 1e-3


def test_the_fine_run_reference_is_the_exact_trajectory(den, x_fit, exact_fit):
    grid = sd.solvers.make_grid(den.process, sd.schedules.get("karras_capped"), 8)
    fine = SolverReference(den, x_fit)(grid)
    exact = exact_fit(grid)
    assert max(rel_rmse(a, b) for a, b in zip(fine, exact, strict=True)) < 2e-6  # measured 2.2e-7 (10 steps)
    default = search_ratios(den, x_fit, 8).solver.ratios
    assert default == pytest.approx(search_ratios(den, x_fit, 8, reference=exact_fit).solver.ratios, abs=1e-4)


def test_cpr_recovers_its_polynomial_and_predicts_unseen_nfe(den, x_fit, x_test, exact_fit, exact_test):
    coef = ((0.9, 0.3, -0.2), (0.4, -1.0, 0.5), (-0.3, 0.6, 0.1))
    truth = CPR(coef)
    cpr = CPR.fit({n: truth(n) for n in (5, 8, 12, 20)})
    assert cpr(7) == pytest.approx(truth(7), abs=1e-10) and cpr(7)[:2] == [1.0, 1.0]
    # searched ratios at 5, 8, 12, 15 steps predict those of 6: measured dc / unipc 0.759 (searched: 0.612)
    table = {n: search_ratios(den, x_fit, n, reference=exact_fit).solver.ratios for n in (5, 8, 12, 15)}
    predicted = CPR.fit(table)(6)
    err_cpr = rel_rmse(sd.sample(den, x_test, 6, DCSolver(ratios=predicted)), exact_test)
    err_unipc = rel_rmse(sd.sample(den, x_test, 6), exact_test)
    assert err_cpr / err_unipc < 0.85, (err_cpr, err_unipc, predicted)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratios": [1.0, 0.9, 1.0]}, r"DCSolver: ratios\[:2\] must be 1"),
        ({"ratios": [1.0, 1.0, float("nan")]}, "DCSolver: ratios must be"),
        ({"ratios": "abc"}, "DCSolver: ratios must be a sequence"),
        ({"dc_order": 0}, "DCSolver: dc_order must be"),
        ({"dc_order": 4}, "DCSolver: dc_order must be"),
        ({"prediction": "noise"}, "DCSolver: prediction must be 'data'"),
        ({"grid_t": [999.0, 0.0]}, "DCSolver: grid_t must be None or, with ratios"),
        (
            {"ratios": [1.0] * 3, "grid_t": [999.0, 0.0]},
            r"DCSolver: grid_t must hold one time per node, len\(ratios\)",
        ),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DCSolver(**kwargs)


def test_bad_input(den, x_fit, x_test, exact_fit, gmm, sd_process):
    with pytest.raises(
        ValueError, match="DCSolver: ratios has 3 entries, one per step is needed: the run has 5"
    ):
        sd.sample(den, x_test, 5, DCSolver(ratios=[1.0, 1.0, 0.9]))
    for kwargs, message in [
        ({"iters": 0}, "search_ratios: iters must be"),
        ({"lr": 0.0}, "search_ratios: lr must be"),
        ({"solver": sd.solvers.UniPC()}, "search_ratios: solver must be a DCSolver"),
        ({"reference": 3}, "search_ratios: reference must be a callable"),
        ({"final": "clean"}, "search_ratios: final must be one of"),
        ({"reference": lambda grid: []}, r"search_ratios: reference must give 5 states"),
    ]:
        with pytest.raises(ValueError, match=message):
            search_ratios(den, x_fit, 5, **kwargs)
    with pytest.raises(ValueError, match="search_ratios: den must be a steerdiff Denoiser"):
        search_ratios(gmm, x_fit, 5)
    with pytest.raises(ValueError, match="search_ratios: x_T must be a tensor"):
        search_ratios(den, [1.0], 5)
    with pytest.raises(ValueError, match="ExactReference: gmm must be"):
        ExactReference(den, sd_process, x_fit)
    for t in (1500.0, -1.0, float("nan")):  # were: min()'s 'arg is an empty sequence'
        with pytest.raises(ValueError, match=r"ExactReference\.at: t must be"):
            exact_fit.at(t)
    with pytest.raises(ValueError, match="ExactReference: the grid starts at"):
        ExactReference(gmm, sd_process, x_fit, t_start=500.0)(
            sd.solvers.make_grid(sd_process, sd.schedules.get("karras"), 5)
        )
    with pytest.raises(ValueError, match=r"CPR\.fit: table must map at least 3 step counts"):
        CPR.fit({5: [1.0] * 5, 6: [1.0] * 6})
    with pytest.raises(ValueError, match=r"CPR\.fit: degree must be"):
        CPR.fit({5: [1.0] * 5, 6: [1.0] * 6, 7: [1.0] * 7}, degree=0)
    with pytest.raises(ValueError, match=r"CPR.fit: table\[6\] must hold 6 ratios, got 5"):
        CPR.fit({5: [1.0] * 5, 6: [1.0] * 5, 7: [1.0] * 7})


class _Trainable(torch.nn.Module):
    """The mixture's noise prediction times a parameter (1) that requires grad: a net as loaded."""

    def __init__(self, den: sd.Denoiser) -> None:
        super().__init__()
        self.den = den
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.den(x, t).eps * self.scale


def test_the_search_of_a_net_with_trainable_parameters(den, x_fit, exact_fit, sd_process):
    # the run's states carry no graph: each AdamW iteration differentiates its own loss, by rho alone
    net = _Trainable(den)
    trainable = sd.Denoiser(net, sd_process, "eps")
    got = search_ratios(trainable, x_fit, 6, reference=exact_fit, iters=5).solver.ratios
    assert got == pytest.approx(
        search_ratios(den, x_fit, 6, reference=exact_fit, iters=5).solver.ratios, abs=1e-9
    )
    assert net.scale.grad is None  # the net's parameters are left as they were


def test_the_search_in_half_precision(den, x_fit, exact_fit):
    # as sd.sample: the net runs in float16, the state and the ratio in float32 (was: all in float16, NaN)
    full = search_ratios(den, x_fit, 6, reference=exact_fit).solver.ratios
    half = search_ratios(den, x_fit.half(), 6, reference=exact_fit).solver.ratios
    assert max(abs(a - b) for a, b in zip(half, full, strict=True)) < 2e-3, (half, full)  # measured 2.2e-4


def test_the_search_needs_autograd(den, x_fit, exact_fit):
    with torch.inference_mode(), pytest.raises(ValueError, match="search_ratios: needs autograd"):
        search_ratios(den, x_fit, 6, reference=exact_fit)


def test_a_fitted_solver_refuses_another_grid(den, gmm, x_fit, x_test, exact_fit):
    # the ratios of a search belong to its grid: another schedule or final of the same step count is refused
    fit = search_ratios(den, x_fit, 6, reference=exact_fit, iters=2).solver
    sd.sample(den, x_test, 6, fit)  # its own grid
    # and the grid of an equivalent process: SD's betas as diffusers forms them (alphas_cumprod in float32),
    # whose karras_capped nodes differ by up to 3.5e-6 relative (1.2e-4 in t)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    float32 = sd.VP.discrete(alphas_cumprod=torch.cumprod(1 - betas, 0).double())
    sd.sample(gmm.denoiser(float32), x_test, 6, fit)
    for schedule, final in [("time_uniform", "zero"), ("karras_capped", "none")]:
        with pytest.raises(ValueError, match="DCSolver: the ratios were searched on the grid t = "):
            sd.sample(den, x_test, 6, fit, schedule, final=final)
    sd.sample(den, x_test, 6, DCSolver(ratios=fit.ratios), "time_uniform")  # ratios given alone: any grid
    refit = search_ratios(den, x_fit, 6, "time_uniform", solver=fit, reference=exact_fit, iters=2).solver
    sd.sample(den, x_test, 6, refit, "time_uniform")  # the options of a fitted solver, searched anew


def test_cpr_refuses_a_table_that_does_not_determine_it():
    # degree 4 in s/N: 5 coefficients per step count, of which NFE 5's 3 steps past dc_order leave 2 free; the
    # fit took the least-norm solution and missed its own polynomial by 1.3e-2 at NFE 30
    truth = CPR(((0.9, 0.3, -0.2), (0.4, -1.0, 0.5), (-0.3, 0.6, 0.1), (0.2, -0.1, 0.3), (-0.5, 0.2, 0.1)))
    with pytest.raises(ValueError, match=r"CPR\.fit: the table determines 13 of the 15 coefficients"):
        CPR.fit({n: truth(n) for n in (5, 8, 12)})
    assert CPR.fit({n: truth(n) for n in (8, 12, 20)})(30) == pytest.approx(truth(30), abs=1e-10)


@pytest.mark.parametrize(
    ("coef", "dc_order", "message"),
    [
        (((1.0, 2.0),), 2, r"CPR: coef must be"),
        ((), 2, r"CPR: coef must be"),
        (((1.0, 0.0, float("nan")),), 2, r"CPR: coef must be"),
        (((1.0, 0.0, 0.0),), 7, r"CPR: dc_order must be"),
    ],
)
def test_cpr_bad_coefficients(coef, dc_order, message):
    # were: zip's 'argument 2 is longer', all-zero ratios, NaN ratios, and dc_order=7 taken
    with pytest.raises(ValueError, match=message):
        CPR(coef, dc_order)


def test_the_search_restarts_the_history_at_a_break_as_sd_sample(gmm):
    """RF-Inversion's controlled field jumps at ``t = 1 - stop`` (``Denoiser.breaks``): the search restarts
    its run's history after the step across it (``sampling.crossings``), as ``sd.sample`` restarts the fitted
    solver's, and fits no correction there (the run makes none). So the fitted solver under ``sd.sample``
    evaluates the net at the very states the search's run did (measured: bit for bit). Before, the search's
    run carried controlled estimates past the jump: its states drifted off the sampled ones by up to 0.17
    (relative), and the ratios after the break were fitted to a run ``sd.sample`` never makes."""
    from steerdiff.rf_inversion import ControlledEditing
    from steerdiff.sampling import crossings

    flow = sd.RectifiedFlow()
    inner = gmm.denoiser(flow)
    calls: list[tuple[bool, torch.Tensor]] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append((torch.is_grad_enabled(), x.detach().clone()))
        return inner.net(x, t)

    y_0 = torch.zeros(1, 8)
    edit = ControlledEditing(sd.Denoiser(net, flow, prediction="x0"), y_0, 0.7, stop=0.4)
    teacher = SolverReference(ControlledEditing(inner, y_0, 0.7, stop=0.4), noise(8, 8, seed=11))
    x_T = noise(8, 8, seed=11)
    steps = 10
    grid = sd.solvers.make_grid(flow, sd.schedules.get("time_uniform"), steps)
    jumps = crossings(edit, grid)
    assert jumps == {3}  # the jump at t = 0.6 past the history's warm-up: steps after it are compensated
    fit = search_ratios(edit, x_T, steps, "time_uniform", reference=teacher, iters=5)
    searched = [x for grad, x in calls if not grad]  # the run's evaluations, not the fits' (under autograd)
    calls.clear()
    sd.sample(edit, x_T, steps, fit.solver, "time_uniform")
    sampled = [x for _, x in calls]
    assert len(searched) == len(sampled) == steps
    assert max(rel_rmse(a, b) for a, b in zip(searched, sampled, strict=True)) < 1e-12
    # the fits: 5 network calls per compensated step that a correction follows: steps 2, 6, 7 (3 is followed
    # by the restart, 8 by the clean end; the restart's warm-up leaves 4, 5 uncompensated)
    assert fit.nfe == steps + 5 * 3
    assert fit.solver.ratios[4:6] == [1.0, 1.0] and all(r != 1.0 for r in fit.solver.ratios[6:])


def test_ratios_in_the_warm_up_after_a_break_are_refused_not_ignored(gmm):
    """After the step across RF-Inversion's jump (``crossings``: step 3) the history restarts, so steps 4
    and 5 hold 1 and 2 estimates, too few for ``dc_order = 2``, as the run's steps 0 and 1. Before: their
    ratios were ignored (the run equal, bit for bit, to the one with 1 there: a CPR prediction or a hand-set
    ratio silently dropped). Now refused, naming the step; with 1 there the others compensate as before."""
    from steerdiff.rf_inversion import ControlledEditing
    from steerdiff.sampling import crossings

    flow = sd.RectifiedFlow()
    edit = ControlledEditing(gmm.denoiser(flow), torch.zeros(1, 8), 0.7, stop=0.4)
    x_T = noise(8, 8, seed=11)
    grid = sd.solvers.make_grid(flow, sd.schedules.get("time_uniform"), 10)
    assert crossings(edit, grid) == {3}
    smooth = [1.0, 1.0, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]  # as a CPR curve: != 1 from step 2 on
    with pytest.raises(ValueError, match=r"^DCSolver: ratios\[4\] = 0\.94, but step 4 holds 1 estimate\(s\)"):
        sd.sample(edit, x_T, 10, DCSolver(ratios=smooth), "time_uniform")
    warm = [*smooth[:4], 1.0, 1.0, *smooth[6:]]
    ours = sd.sample(edit, x_T, 10, DCSolver(ratios=warm), "time_uniform")
    unipc = sd.sample(edit, x_T, 10, DCSolver(), "time_uniform")
    assert rel_rmse(ours, unipc) > 1e-3  # steps 2, 3 and 6 on compensated
    only_5 = [*warm[:5], 0.9, *warm[6:]]  # the second warm-up step: 2 estimates, refused too
    with pytest.raises(ValueError, match=r"ratios\[5\] = 0\.9, but step 5 holds 2 estimate\(s\)"):
        sd.sample(edit, x_T, 10, DCSolver(ratios=only_5), "time_uniform")
    # a corrector's move restarts the history at every node: no step can be compensated
    with pytest.raises(ValueError, match=r"ratios\[2\] = 0\.9, but step 2 holds 1 estimate\(s\)"):
        sd.sample(gmm.denoiser(flow), x_T, 10, DCSolver(ratios=smooth), "time_uniform", corrector="ula")
