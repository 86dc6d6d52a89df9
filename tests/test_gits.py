"""GITS (Chen et al. 2024): the dynamic program against brute force, the cost against the library's DDIM
step, the grid's contract and cache, and held-out accuracy on an exact mixture."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import pickle
import re

import pytest
import torch

import steerdiff as sd
from steerdiff.gits import cost_matrix, optimal_path
from steerdiff.schedules import GITS
from steerdiff.solvers.base import make_grid

from .reference import exact_sample, noise, smooth_mixture

F64 = torch.float64


def _weighted(cost: torch.Tensor, path: list[int], coeff: float) -> float:
    return sum(coeff**m * float(cost[a, b]) for m, (a, b) in enumerate(itertools.pairwise(path)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.5, 3.0])
def test_optimal_path_is_the_brute_force_minimum(coeff, seed):
    # log-normal costs (spread over two decades), every step count over 9 nodes
    g = torch.Generator().manual_seed(seed)
    e = 8
    cost = torch.randn(e + 1, e + 1, generator=g, dtype=F64).mul(2).exp()
    cost[torch.ones(e + 1, e + 1).tril().bool()] = torch.inf
    for steps in range(1, e + 1):
        path = optimal_path(cost, steps, coeff)
        assert path[0] == 0 and path[-1] == e and len(path) == steps + 1
        assert all(a < b for a, b in itertools.pairwise(path))
        best = min(
            _weighted(cost, [0, *mid, e], coeff) for mid in itertools.combinations(range(1, e), steps - 1)
        )
        assert _weighted(cost, path, coeff) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("max_ratio", "free_last"), [(1.0, 1), (1.5, 2), (2.0, 1), (3.0, 2)])
def test_optimal_path_with_a_ratio_rule_is_the_brute_force_minimum(max_ratio, free_last, seed):
    # the same costs, increasing lam with random gaps: the least weighted cost over the paths whose steps but
    # the last free_last are at most max_ratio times the one before in lam; none such: a ValueError
    g = torch.Generator().manual_seed(seed)
    e = 8
    cost = torch.randn(e + 1, e + 1, generator=g, dtype=F64).mul(2).exp()
    cost[torch.ones(e + 1, e + 1).tril().bool()] = torch.inf
    lam = torch.rand(e + 1, generator=g, dtype=F64).mul(3).add(0.05).cumsum(0).tolist()

    def keeps(path):
        h = [lam[b] - lam[a] for a, b in itertools.pairwise(path)]
        return all(h[m] <= max_ratio * h[m - 1] for m in range(1, len(h) - free_last))

    infeasible = 0
    for steps in range(1, e + 1):
        paths = [[0, *mid, e] for mid in itertools.combinations(range(1, e), steps - 1)]
        paths = [p for p in paths if keeps(p)]
        if not paths:
            infeasible += 1
            with pytest.raises(ValueError, match=rf"no {steps}-step path from node 0 to node {e}"):
                optimal_path(cost, steps, 1.15, lam, max_ratio, free_last)
            continue
        path = optimal_path(cost, steps, 1.15, lam, max_ratio, free_last)
        assert keeps(path) and path[0] == 0 and path[-1] == e and len(path) == steps + 1
        best = min(_weighted(cost, p, 1.15) for p in paths)
        assert _weighted(cost, path, 1.15) == pytest.approx(best, rel=1e-12)
    assert infeasible < e - 2  # the rule leaves most step counts a path
    # a ratio no path comes near is the plain program
    for steps in range(1, e + 1):
        assert optimal_path(cost, steps, 1.15, lam, 1e9) == optimal_path(cost, steps, 1.15)


@pytest.fixture(scope="module")
def setup():
    gmm = smooth_mixture()
    proc = sd.VP.scaled_linear()
    return gmm, proc, gmm.denoiser(proc)


def _fit(den, seed=2, **kw):
    kw.setdefault("samples", 32)
    kw.setdefault("teacher_steps", 30)
    return GITS(den, generator=torch.Generator().manual_seed(seed), dtype=F64, **kw)


@pytest.mark.parametrize("final", ["zero", "none"])
def test_cost_is_the_ddim_step_from_the_teachers_state(setup, final):
    # teacher="ddim": its states are DDIM runs over the teacher's first nodes; c_ij is the mean distance
    # (in x / alpha) from one DDIM step i -> j of the library to the teacher's state at j
    _, proc, den = setup
    fit = _fit(den, teacher="ddim", final=final, teacher_steps=12)
    x_T = torch.randn(32, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = fit.teacher_times
    e = fit.cost.shape[0] - 1

    def teacher_state(i: int) -> torch.Tensor:
        if i == 0:
            return x_T
        if final == "zero" and i == e:
            return sd.sample(den, x_T, steps=e, solver="ddim", schedule=t)
        return sd.sample(den, x_T, steps=i, solver="ddim", schedule=t[: i + 1], final="none")

    for i, j in [(0, 1), (0, 5), (3, 4), (3, 9), (7, e), (e - 1, e)]:
        x_i, x_j = teacher_state(i), teacher_state(j)
        if final == "zero" and j == e:
            step, alpha = sd.sample(den, x_i, steps=1, solver="ddim", schedule=[t[i]]), 1.0
        else:
            step = sd.sample(den, x_i, steps=1, solver="ddim", schedule=[t[i], t[j]], final="none")
            alpha = float(proc.alpha(t[j]))
        want = ((step - x_j) / alpha).norm(dim=-1).mean()
        assert float(fit.cost[i, j]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
        if j == i + 1:
            assert float(fit.cost[i, j]) < 1e-12  # the teacher's own step
    assert bool(torch.isinf(fit.cost[torch.ones_like(fit.cost).tril().bool()]).all())  # no step i -> j <= i


def test_cost_matrix_formula():
    # two nodes and a clean end, one sample in 1-d: c_01 = |x0_0 + s_1 eps_0 - y_1|, c_02 = |x0_0 - y_2|
    y = torch.tensor([[[2.0]], [[1.0]], [[0.25]]], dtype=F64)
    x0 = torch.tensor([[[0.5]], [[0.3]]], dtype=F64)
    c = cost_matrix(y, x0, [4.0, 1.0, 0.0])
    eps0 = (2.0 - 0.5) / 4.0
    assert float(c[0, 1]) == pytest.approx(abs(0.5 + eps0 - 1.0))
    assert float(c[0, 2]) == pytest.approx(abs(0.5 - 0.25))
    assert float(c[1, 2]) == pytest.approx(abs(0.3 - 0.25))


@pytest.mark.parametrize("final", ["zero", "none"])
def test_grid_contract_and_cache(setup, final):
    _, proc, den = setup
    calls = []

    def net(x, t):
        calls.append(1)
        return den.net(x, t)

    counted = sd.Denoiser(net, proc, prediction="x0", shape=(8,))
    fit = _fit(counted, final=final)
    assert fit.nfe == 30 and len(calls) == 30
    teacher = set(fit.teacher_times)
    for n in (2, 3, 5, 8):
        t = fit(proc, n)
        assert t.numel() == n and float(t[0]) == proc.t_max
        assert bool((t[1:] < t[:-1]).all()) and set(t.tolist()) <= teacher
        if final == "none":
            assert float(t[-1]) == pytest.approx(proc.t_min)
        assert n in fit.grids
        assert torch.equal(fit(proc, n), t)
    assert len(calls) == 30  # the teacher ran once
    steps = 5 if final == "zero" else 4
    x = sd.sample(counted, noise(4, 8), steps=steps, solver="ddim", schedule=fit, final=final)
    assert x.shape == (4, 8)


def test_reproducible_per_generator(setup):
    _, proc, den = setup
    a, b, c = _fit(den, seed=5), _fit(den, seed=5), _fit(den, seed=6)
    assert torch.equal(a.cost, b.cost) and torch.equal(a(proc, 6), b(proc, 6))
    assert not torch.equal(a.cost, c.cost)


def test_held_out_error_below_time_uniform_for_ddim(setup):
    # fitted on 32 draws (seed 2), scored on 256 others: relative RMSE vs the exact ODE
    gmm, proc, den = setup
    fit = _fit(den, teacher_steps=60)
    x_T = noise(256, 8)
    ref = exact_sample(gmm, proc, x_T)

    def err(schedule, n):
        x = sd.sample(den, x_T, steps=n, solver="ddim", schedule=schedule)
        return float((x - ref).norm() / ref.norm())

    for n in (5, 6, 8):  # 0.180 / 0.225, 0.154 / 0.184, 0.119 / 0.137 (karras_capped 0.220, 0.187, 0.144)
        assert err(fit, n) < 0.95 * min(err("time_uniform", n), err("karras_capped", n))


def test_serves_its_process_by_value(setup):
    # a copy, an unpickled fit, and a fresh VP.scaled_linear() are the process it was fitted to (the same
    # grid); VP.discrete with other betas (the same repr), another kind and another range are refused
    gmm, proc, den = setup
    fit = _fit(den, teacher_steps=12)
    want = fit(proc, 5)
    for other in (copy.deepcopy(fit), pickle.loads(pickle.dumps(fit))):
        assert torch.equal(other(proc, 5), want) and torch.equal(other(copy.deepcopy(proc), 5), want)
    assert torch.equal(fit(sd.VP.scaled_linear(), 5), want)
    msg = r"process VP.discrete\(N=1000\) is not the one it was fitted to, VP.discrete\(N=1000\)"
    with pytest.raises(ValueError, match=msg):
        fit(sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64)), 5)
    with pytest.raises(ValueError, match=r"process EDM\(.*\) is not the one it was fitted to"):
        sd.sample(sd.Denoiser(den.net, sd.EDM(), prediction="x0"), noise(4, 8), steps=5, schedule=fit)
    # the same alpha and sigma over another range: the grid would start at the fitted t_max
    edm = _fit(gmm.denoiser(sd.EDM()), teacher_steps=12)
    assert torch.equal(edm(sd.EDM(), 5), edm(edm.process, 5)) and float(edm(sd.EDM(), 5)[0]) == 80
    with pytest.raises(
        ValueError, match=r"process EDM\(t_min=0.002, t_max=160\) is not the one it was fitted"
    ):
        edm(sd.EDM(sigma_max=160.0), 5)


def test_diffusers_scheduler_takes_the_grid_not_the_fit(setup):
    # the scheduler's config must rebuild the schedule: the fit is refused with the way to pass its grid,
    # which then gives the scheduler the fit's nodes
    from steerdiff.integrations.diffusers import SteerdiffScheduler

    gmm = setup[0]
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    proc = SteerdiffScheduler(**config).denoiser.process  # its own object, of the config
    fit = _fit(gmm.denoiser(proc), teacher_steps=12)
    with pytest.raises(
        ValueError, match=r"is fitted to a model .* schedule=gits\(process, steps\).tolist\(\)"
    ):
        SteerdiffScheduler(**config, schedule=fit)
    scheduler = SteerdiffScheduler(**config, schedule=fit(proc, 5).tolist())
    scheduler.set_timesteps(5)
    torch.testing.assert_close(
        scheduler.timesteps.to(F64), fit(scheduler.denoiser.process, 5), rtol=0, atol=1e-4
    )
    # a final="none" fit serves the final="none" (or inverse) scheduler with steps + 1 of its nodes: the
    # message said steps (a list of 5 nodes for 4 steps, whatever final the scheduler had), and gave no final
    none = _fit(gmm.denoiser(proc), teacher_steps=12, final="none")
    with pytest.raises(
        ValueError,
        match=r"schedule=gits\(process, steps \+ 1\).tolist\(\) .* for a scheduler of final='none' or "
        r"inverse=True only",
    ):
        SteerdiffScheduler(**config, schedule=none)
    with pytest.raises(
        ValueError, match=r"gits\(process, steps\).tolist\(\) .* of final='zero' \(not inverse\)"
    ):
        SteerdiffScheduler(**config, schedule=fit)
    scheduler = SteerdiffScheduler(**config, schedule=none(proc, 6).tolist(), final="none")
    scheduler.set_timesteps(5)
    torch.testing.assert_close(
        scheduler.timesteps.to(F64), none(scheduler.denoiser.process, 6)[:-1], rtol=0, atol=1e-4
    )


def test_not_a_name(setup):
    assert "gits" not in sd.schedules.available()
    with pytest.raises(ValueError, match=r"unknown schedule='gits'"):
        sd.schedules.get("gits")


def test_bad_input(setup):
    gmm, proc, den = setup
    with pytest.raises(ValueError, match=r"GITS: den must be a steerdiff Denoiser"):
        GITS(gmm)
    with pytest.raises(ValueError, match=r"GITS: shape"):
        GITS(sd.Denoiser(den.net, proc, prediction="x0"))
    for kw, msg in [
        ({"samples": 0}, r"GITS: samples"),
        ({"teacher": "heun"}, r"GITS: .*teacher"),
        ({"teacher_steps": 1}, r"GITS: teacher_steps"),
        ({"coeff": 0.0}, r"GITS: coeff"),
        ({"max_ratio": 0.5}, r"GITS: max_ratio must be"),
        ({"max_ratio": float("nan")}, r"GITS: max_ratio must be"),
        ({"final": "clean"}, r"GITS: .*final"),
        ({"generator": 3}, r"GITS: generator must be a torch.Generator"),
        ({"teacher_schedule": "nope"}, r"GITS: unknown schedule='nope'"),
        ({"device": "nope"}, r"GITS: device must be a torch.device"),
        ({"dtype": "float32"}, r"GITS: dtype must be float16, bfloat16, float32 or float64, got 'float32'"),
        ({"dtype": torch.int64}, r"GITS: dtype must be float16"),
    ]:
        with pytest.raises(ValueError, match=msg):
            GITS(den, **kw)
    fit = _fit(den, teacher_steps=6)
    with pytest.raises(ValueError, match=r"7 nodes asked; fitted with final='zero' it gives 1 to 6 nodes"):
        fit(proc, 7)
    with pytest.raises(ValueError, match=r"process VP.cosine\(s=0.008\) is not the one it was fitted to"):
        fit(sd.VP.cosine(), 3)
    with pytest.raises(ValueError, match=r"optimal_path: steps"):
        optimal_path(fit.cost, 0)
    for cost, coeff, msg in [
        (
            fit.cost[:, :-1],
            1.0,
            r"optimal_path: cost must be a square \(E \+ 1, E \+ 1\) tensor .* got \(7, 6\)",
        ),
        (fit.cost, -1.0, r"optimal_path: coeff"),
        (fit.cost, float("nan"), r"optimal_path: coeff"),
    ]:
        with pytest.raises(ValueError, match=msg):
            optimal_path(cost, 2, coeff)
    for lam, ratio, msg in [
        (None, 2.0, r"optimal_path: lam must be 7 increasing numbers .* got None"),
        (list(range(6)), 2.0, r"optimal_path: lam must be 7 increasing numbers"),
        ([0, 1, 2, 2, 3, 4, 5], 2.0, r"optimal_path: lam must be 7 increasing numbers"),
        (list(range(7)), 0.9, r"optimal_path: max_ratio must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            optimal_path(fit.cost, 2, 1.0, lam, ratio)
    y, x0 = torch.ones(4, 2, 3), torch.ones(3, 2, 3)
    for args in [(y, x0, [3.0, 2.0, 1.0]), (y, y, [3.0, 2.0, 1.0, 0.0]), (y[:1], x0[:0], [1.0])]:
        with pytest.raises(ValueError, match=r"cost_matrix: y must be \(E \+ 1, batch, ...\)"):
            cost_matrix(*args)


@pytest.mark.parametrize("teacher", sd.gits.TEACHERS)
def test_teachers_evaluate_once_at_each_node(setup, teacher):
    # the cost reads the denoised estimate of step i as the one at node i: each teacher calls the net once
    # per step, at the node's own state and time
    _, proc, den = setup
    calls = []

    def net(x, t):
        calls.append((x.clone(), float(t[0])))
        return den.net(x, t)

    counted = sd.Denoiser(net, proc, prediction="x0", shape=(8,))
    fit = _fit(counted, teacher=teacher, teacher_steps=10, final="none")
    x_T = torch.randn(32, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    states = [x_T]
    sd.sample(
        den,
        x_T,
        steps=10,
        solver=teacher,
        schedule=fit.teacher_times,
        final="none",
        callback=lambda d: states.append(d["x"].clone()),
    )
    assert len(calls) == 10
    for i, (x, t) in enumerate(calls):
        assert t == pytest.approx(fit.teacher_times[i]) and torch.equal(x, states[i])


@pytest.mark.parametrize(("fitted", "run"), [("zero", "none"), ("none", "zero")])
def test_a_fit_serves_runs_of_its_final_only(setup, fitted, run):
    # a final="zero" fit's n nodes lead into the clean state: a final="none" run of n - 1 steps would end at
    # the node before it, a path cut short; a final="none" fit's end at t_min, after which final="zero" would
    # add a step. Refused naming both, in sample and in invert (a final="none" grid) alike
    den = setup[2]
    fit = _fit(den, final=fitted, teacher_steps=12)
    msg = (
        rf"schedule GITS\(.*final='{fitted}'\) was fitted for final='{fitted}' \(its grids .*\), not for "
        rf"this run's final='{run}': fit it with final='{run}', or run with final='{fitted}'"
    )
    with pytest.raises(ValueError, match=msg):
        sd.sample(den, noise(4, 8), steps=5, solver="ddim", schedule=fit, final=run)
    if fitted == "zero":  # the inversions take final="none" only: named, and no other final offered
        for invert in (sd.invert, sd.ddpm_invert, sd.eta_invert):
            name = invert.__name__
            with pytest.raises(ValueError) as err:
                invert(den, noise(4, 8), steps=5, schedule=fit)
            assert re.fullmatch(
                rf"{name}: schedule GITS\(.*final='zero'\) was fitted for final='zero' \(its grids lead "
                r"into the clean state\), not for this run's final='none': fit it with final='none' "
                rf"\({name} runs the grid of final='none' only\)",
                str(err.value),
            ), str(err.value)
    x = sd.sample(den, noise(4, 8), steps=5, solver="ddim", schedule=fit, final=fitted)
    assert x.shape == (4, 8)


def test_serves_the_float32_table_of_its_schedule(setup):
    # SD's betas as diffusers forms them (float32 betas and cumulative product; 6.1e-7 of the scale off the
    # float64 process it was fitted to, sigma near t = 0 1.3e-5 relative): the same grid, where the old 1e-12
    # rule refused it. beta_end 0.0121 instead of 0.012 (2.1e-3 off) is refused, saying so
    _, proc, den = setup
    fit = _fit(den, teacher_steps=12)

    def table32(b1: float) -> sd.VPDiscrete:
        b = torch.linspace(0.00085**0.5, b1**0.5, 1000, dtype=torch.float32) ** 2
        return sd.VP.discrete(alphas_cumprod=torch.cumprod(1 - b, dim=0))

    assert torch.equal(fit(table32(0.012), 5), fit(proc, 5))
    with pytest.raises(
        ValueError,
        match=r"is not the one it was fitted to, VP.discrete\(N=1000\): alpha differs by up to 0.0021\d of "
        r"sqrt\(alpha\^2 \+ sigma\^2\), above rtol=0.0001 \(at t = .*\); fit a GITS with a denoiser",
    ):
        fit(table32(0.0121), 5)


def test_third_order_multistep_solvers_on_the_grid_of_the_ratio_rule():
    # the solver benchmark's 64-d mixture (SD betas), fitted on 64 draws, scored on 128 others: the plain
    # program's grids cross the band where the estimate settles in one step 3.6-5.6 times the one before, and
    # dpmpp_3m / unipc (order 3) without their step-ratio rule (max_ratio=inf) extrapolate their quadratic
    # over it: 0.70-0.82 at NFE 8-9 against dpmpp_2m's 0.15. With the default rule (max_ratio=2: no step but
    # the last into a noisy node over twice the one before) 0.045-0.11, at most dpmpp_2m's there; DDIM, whose
    # steps the cost prices, within 5%. The solvers' own rule (default max_ratio=2.5: a step over 2.5 times
    # the one before at second order) mends the plain program's grids too (steps 2.98 / 3.70 times the one
    # before): 0.101 / 0.093 (dpmpp_3m), 0.071 / 0.067 (unipc) at NFE 8 / 9
    from steerdiff.bench.solvers import default_model, initial_noise

    gmm, proc = default_model()
    den = gmm.denoiser(proc)
    x_T = initial_noise(128, gmm.dim, 0).to(F64)
    ref = gmm.reference_ode(x_T, proc, proc.t_max, proc.t_min, denoise=True)
    fits = {r: _fit(den, seed=1, samples=64, teacher_steps=60, max_ratio=r) for r in (2.0, None)}
    assert GITS(den, samples=1, teacher_steps=2).max_ratio == 2.0  # the default

    def err(solver, n, r):
        return float(
            (sd.sample(den, x_T, steps=n, solver=solver, schedule=fits[r]) - ref).norm() / ref.norm()
        )

    for n in (8, 9):
        lam = make_grid(proc, fits[2.0], n).lam[:-1]
        h = [b - a for a, b in itertools.pairwise(lam)]
        assert all(h[m] <= 2.0 * h[m - 1] for m in range(1, len(h) - 1)), h
        second = err("dpmpp_2m", n, 2.0)
        for solver in ("dpmpp_3m", "unipc"):
            bare = dataclasses.replace(sd.solvers.get(solver), max_ratio=math.inf)
            plain, ruled = err(bare, n, None), err(bare, n, 2.0)
            assert plain > 0.5 and plain > 3 * err("dpmpp_2m", n, None), (solver, n, plain)  # the defect
            assert ruled < 0.15 and ruled < 1.05 * second, (solver, n, ruled, second)
            assert err(solver, n, 2.0) == ruled  # no step there over 2.5 times the one before
            assert err(solver, n, None) < 0.15 and err(solver, n, None) < 1.05 * second
        assert err("ddim", n, 2.0) < 1.05 * err("ddim", n, None)


@pytest.mark.parametrize("final", ["zero", "none"])
def test_a_fit_pickled_before_the_ratio_rule_still_serves(setup, final):
    # a fit pickled before max_ratio (its state lacks max_ratio and teacher_lam) was an AttributeError at its
    # first grid and its repr; it is the authors' program it was made with: the grids of max_ratio=None
    _, proc, den = setup
    fit = _fit(den, teacher_steps=12, max_ratio=None, final=final)
    old = copy.copy(fit)
    del old.max_ratio, old.teacher_lam
    again = pickle.loads(pickle.dumps(old))
    assert again.max_ratio is None and again.teacher_lam == fit.teacher_lam
    assert repr(again) == repr(fit)
    for n in range(2, 8):
        assert torch.equal(again(proc, n), fit(proc, n))


def test_a_step_count_the_ratio_rule_leaves_no_grid_says_so(setup):
    # EDM (lam = -log sigma), a teacher grid whose steps in lam grow by over 2 (0.105, 0.306, 1.026, then
    # 9.16 to the end): after the free first step every ruled step is too long, so 4 and 5 nodes (1 and 2
    # ruled steps) have no grid, 2 and 3 have. Was optimal_path's "has a finite cost"
    # (every step has), naming neither GITS nor the rule nor a way out
    den = setup[0].denoiser(sd.EDM())
    kw = dict(teacher_steps=4, teacher_schedule=[80.0, 72.0, 53.0, 19.0, 0.002], final="none")
    fit, plain = _fit(den, **kw), _fit(den, max_ratio=None, **kw)
    assert fit(den.process, 2).tolist() == [80.0, 0.002] and fit(den.process, 3).shape == (3,)
    assert plain(den.process, 4).shape == (4,)
    for n in (4, 5):
        with pytest.raises(
            ValueError,
            match=rf"GITS\(.*max_ratio=2.*\): no grid of {n} nodes through the teacher's nodes keeps "
            rf"max_ratio=2 \(optimal_path: no {n - 1}-step path from node 0 to node 4 has a finite cost and "
            r"keeps max_ratio=2 .*\); fit it with max_ratio=None \(the authors' program\) or a larger one",
        ):
            sd.sample(den, noise(4, 8), steps=n - 1, solver="ddim", schedule=fit, final="none")


def test_a_list_teacher_schedule_sets_the_teacher_steps(setup):
    # teacher_steps=None counts a list teacher_schedule (as sd.sample's steps=None does): the fit equals the
    # one given the count; before, the default 60 was refused against the list's 12 times
    _, proc, den = setup
    times = sd.schedules.get("karras")(proc, 12).tolist()
    kw = {
        "samples": 16,
        "generator": torch.Generator().manual_seed(3),
        "dtype": F64,
        "teacher_schedule": times,
    }
    fit = GITS(den, teacher_steps=None, **kw)
    assert fit.teacher_steps == 12
    kw["generator"] = torch.Generator().manual_seed(3)
    given = GITS(den, teacher_steps=12, **kw)
    assert torch.equal(fit(proc, 5), given(proc, 5))
    assert GITS(den, samples=4, teacher_steps=None, dtype=F64).teacher_steps == 60
