"""RF-Inversion (``sd.rf_inversion``; Rout et al. 2025): the controlled forward ODE (Eq. 8) and the controlled
reverse ODE (Eq. 15) as denoiser wrappers run by ``sd.invert`` and ``sd.sample``.

Exact answers: at ``gamma = 0`` / ``eta = 0`` the plain inversion / sampling, bit for bit; at ``gamma = 1`` /
``eta = 1`` the straight line to ``y_1`` / ``y_0`` (the controlled ODE's closed-form solution); in between the
controlled ODE integrated by DOP853 with the Gaussian-mixture oracle's exact velocity; the paper's drifts
written out by hand on a two-sample case.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import steerdiff as sd
from steerdiff.bench._ode import controlled_ode
from steerdiff.rf_inversion import ControlledEditing, ControlledInversion, rf_edit, rf_invert
from steerdiff.sampling import guided_solver
from steerdiff.solvers import UniPC

from .reference import noise, rel_rmse

F64 = torch.float64
FLOW = sd.RectifiedFlow()
SCHEDULE = "time_uniform"  # the paper's grid (Flux shifts it; any schedule runs)


@pytest.fixture(scope="module")
def den(gmm):
    return gmm.denoiser(FLOW)


@pytest.fixture(scope="module")
def eps_den(den):
    """The same exact model as an ``eps``-predicting denoiser: the wrappers then interpolate ``eps``."""
    return sd.Denoiser(lambda x, t: den(x, float(t[0])).eps, FLOW, prediction="eps")


@pytest.fixture(scope="module")
def x_0(gmm):
    return gmm.sample(16, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def y_1():
    return noise(16, 8, seed=3)


# --- the end points: plain ODE and straight line ------------------------------------------------------------


@pytest.mark.parametrize("solver", ["ddim", "heun", UniPC(prediction="noise")], ids=["ddim", "heun", "unipc"])
def test_zero_control_is_plain_inversion_and_sampling(den, eps_den, x_0, y_1, solver):
    """``gamma = 0`` is ``sd.invert`` and ``eta = 0`` is ``sd.sample``, bit for bit, with any deterministic
    solver and either estimate given (``x0`` by the oracle, ``eps`` by its eps form)."""
    for d in (den, eps_den):
        inv = rf_invert(d, x_0, y_1, gamma=0.0, steps=8, solver=solver, schedule=SCHEDULE)
        assert torch.equal(inv, sd.invert(d, x_0, 8, solver, SCHEDULE))
        out = rf_edit(d, y_1, x_0, eta=0.0, stop=1.0, steps=8, solver=solver, schedule=SCHEDULE)
        assert torch.equal(out, sd.sample(d, y_1, 8, solver, SCHEDULE))


@pytest.mark.parametrize(
    "solver", ["ddim", "dpmpp_2m", UniPC(prediction="noise")], ids=["ddim", "2m", "unipc"]
)
def test_full_control_inverts_onto_the_line_to_y_1(den, eps_den, x_0, y_1, solver):
    """At ``gamma = 1`` the ODE is ``dx/dt = (y_1 - x) / (1 - t)``, solved by the line through ``x_0`` at
    ``t_N`` and ``y_1`` at ``t = 1``: ``x(t_0) = y_1 - (1 - t_0) (y_1 - x_0) / (1 - t_N)``. Its predictions
    are constant (``eps = y_1``), so the exponential integrators land on it to rounding (measured 4.4e-16,
    max abs); it is ``y_1`` to ``1 - t_max`` (mean distance 0.0046 at ``t_max = 0.999``)."""
    for d in (den, eps_den):
        x_T, info = rf_invert(
            d, x_0, y_1, gamma=1.0, steps=10, solver=solver, schedule=SCHEDULE, return_info=True
        )
        t_N, t_0 = float(info.grid.t[0]), float(info.grid.t[-1])
        assert (t_N, t_0) == (FLOW.t_min, FLOW.t_max)
        line = y_1 - (1 - t_0) * (y_1 - x_0) / (1 - t_N)
        assert (x_T - line).abs().max() < 1e-12
        assert (x_T - y_1).norm(dim=1).mean() == pytest.approx(0.004604, rel=1e-3)


def test_round_trip_with_full_eta_returns_y_0(den, x_0, y_1):
    """Invert with ``gamma = 0.5``, sample back with ``eta = 1`` over all steps: the prediction is
    ``x0 = y_0`` throughout, so the run ends on ``y_0`` (``final="zero"``: measured max error 0) and at
    ``t_min`` on the line from ``y_0`` through ``x_T`` (``final="none"``)."""
    x_T = rf_invert(den, x_0, y_1, gamma=0.5, steps=10, schedule=SCHEDULE)
    back = rf_edit(den, x_T, x_0, eta=1.0, stop=1.0, steps=10, schedule=SCHEDULE)
    assert (back - x_0).abs().max() < 1e-12
    end, info = rf_edit(
        den, x_T, x_0, eta=1.0, stop=1.0, steps=10, schedule=SCHEDULE, final="none", return_info=True
    )
    t_0, t_N = float(info.grid.t[0]), float(info.grid.t[-1])
    line = (1 - t_N) * x_0 + t_N * (x_T - (1 - t_0) * x_0) / t_0
    assert (end - line).abs().max() < 1e-12


# --- in between: the exact controlled ODE, monotone in the control ------------------------------------------


def test_controlled_inversion_converges_to_the_exactcontrolled_ode(gmm, den, eps_den, x_0, y_1):
    """``gamma = 0.5``, ``ddim`` (the paper's Euler step) against DOP853 on Eq. 8: relative RMSE 0.201 /
    0.084 at 10 / 40 steps (measured; the drift's ``(1 - t)^gamma`` singularity at ``t = 1`` holds every
    solver below first order, module docstring); the eps-given denoiser integrates the same ODE (to 1e-12)."""
    exact = controlled_ode(gmm, x_0, y_1, 0.5, FLOW.t_min, FLOW.t_max, toward_noise=True)
    for steps, measured in ((10, 0.2007), (40, 0.08377)):
        x_T = rf_invert(den, x_0, y_1, gamma=0.5, steps=steps, schedule=SCHEDULE)
        assert rel_rmse(x_T, exact) == pytest.approx(measured, rel=0.01)
        assert rel_rmse(rf_invert(eps_den, x_0, y_1, gamma=0.5, steps=steps, schedule=SCHEDULE), x_T) < 1e-12


def test_controlled_editing_converges_to_the_exactcontrolled_ode(gmm, den, x_0, y_1):
    """Eq. 15 with ``eta = 0.7`` on the whole run (``final="none"``) against DOP853: ``ddim`` 0.0534 /
    0.0170 at 10 / 40 steps, ``unipc`` 0.0465 / 0.0146 (measured)."""
    exact = controlled_ode(gmm, y_1, x_0, 0.7, FLOW.t_max, FLOW.t_min, toward_noise=False)
    for solver, measured in (("ddim", (0.05343, 0.01696)), ("unipc", (0.04650, 0.01457))):
        for steps, m in zip((10, 40), measured, strict=True):
            out = rf_edit(
                den, y_1, x_0, eta=0.7, stop=1.0, steps=steps, solver=solver, schedule=SCHEDULE, final="none"
            )
            assert rel_rmse(out, exact) == pytest.approx(m, rel=0.01)


def test_multistep_solvers_restart_at_the_window_end_and_converge_past_ddim(gmm, den, x_0, y_1):
    """Eq. 15 with ``eta = 0.7`` on ``[0, 0.4)`` against the exact piecewise ODE (DOP853 on each piece): the
    drift jumps at ``tau = 0.4`` (``t = 0.6``, ``ControlledEditing.breaks()``), and ``sd.sample`` restarts a
    multistep solver's history after the step across it (``sampling.crossings``), so no extrapolation mixes
    the two drifts. The default (UniPC-3) then falls 0.0183 / 0.00568 / 0.00157 at 10 / 20 / 40 steps, 0.30 /
    0.18 / 0.10 of ``ddim``'s 0.0603 / 0.0308 / 0.0157, ``dpmpp_2m`` 0.0129 / 0.00454 / 0.00158 (measured;
    without the restart 0.138 / 0.104 / 0.0578 and 0.0989 / 0.0759 / 0.0399, behind ``ddim``). ``heun``'s
    step across mixes both drifts in its stages and stays at 0.164 / 0.110 / 0.0622."""
    stop = 0.4
    mid = controlled_ode(gmm, y_1, x_0, 0.7, FLOW.t_max, 1 - stop, toward_noise=False)
    exact = controlled_ode(gmm, mid, x_0, 0.0, 1 - stop, FLOW.t_min, toward_noise=False)
    measured = {
        None: (0.01826, 0.005679, 0.001568),
        "ddim": (0.06032, 0.03082, 0.01569),
        "dpmpp_2m": (0.01289, 0.004541, 0.001580),
        "heun": (0.1635, 0.1099, 0.06223),
    }
    errors = {}
    for solver, values in measured.items():
        errors[solver] = [
            rel_rmse(
                sd.sample(
                    ControlledEditing(den, x_0, 0.7, stop=stop), y_1, n, solver, SCHEDULE, final="none"
                ),
                exact,
            )
            for n in (10, 20, 40)
        ]
        assert errors[solver] == pytest.approx(values, rel=0.01), solver
    default, ddim = errors[None], errors["ddim"]
    assert default[0] > default[1] > default[2]
    assert all(d < 0.35 * e for d, e in zip(default, ddim, strict=True))


def test_the_controlled_odes_take_the_unguided_default_and_it_is_no_further_from_the_exact_ode(
    gmm, den, x_0, y_1
):
    """The control interpolates (``gamma``, ``eta`` in [0, 1]) towards a closed-form drift with no second net
    evaluation, not CFG's extrapolation the guided default is for: ``solver=None`` takes the base's default,
    UniPC-3 (its noise form up the grid) for the plain oracle, the guided one around CFG (was: the guided one
    always). Against the exact ODEs (``time_uniform``, 5 / 10 / 20 / 40 steps; measured): inversion ``gamma =
    0.5`` 0.2913 / 0.1833 / 0.1124 / 0.07007 (guided default 0.2915 / 0.1979 / 0.1164 / 0.06932), editing
    ``eta = 0.7`` over the whole run 0.08715 / 0.04650 / 0.02621 / 0.01457 (0.09236 / 0.05085 / 0.02591 /
    0.01418): unguided / guided 0.97 in geometric mean, at most 1.03. On the default window ``[0, 0.25)``,
    where both restart at the jump (``sampling.crossings``), 0.3337 / 0.1297 / 0.005383 / 0.001696 (0.3484 /
    0.1254 / 0.003386 / 0.001206: there the guided default is ahead from 20 steps, 1.4-1.6x; both were
    0.02-0.05 at 20-40 steps without the restart)."""
    inverse = ControlledInversion(den, y_1, 0.5)
    to_noise = controlled_ode(gmm, x_0, y_1, 0.5, FLOW.t_min, FLOW.t_max, toward_noise=True)
    whole = controlled_ode(gmm, y_1, x_0, 0.7, FLOW.t_max, FLOW.t_min, toward_noise=False)
    mid = controlled_ode(gmm, y_1, x_0, 0.7, FLOW.t_max, 0.75, toward_noise=False)
    window = controlled_ode(gmm, mid, x_0, 0.0, 0.75, FLOW.t_min, toward_noise=False)
    measured = {
        "inversion": ((0.2913, 0.1833, 0.1124, 0.07007), (0.2915, 0.1979, 0.1164, 0.06932)),
        "whole": ((0.08715, 0.04650, 0.02621, 0.01457), (0.09236, 0.05085, 0.02591, 0.01418)),
        "window": ((0.3337, 0.1297, 0.005383, 0.001696), (0.3484, 0.1254, 0.003386, 0.001206)),
    }
    ratios = []
    for case, (mine, guided) in measured.items():
        for steps, m, g in zip((5, 10, 20, 40), mine, guided, strict=True):
            if case == "inversion":
                out, info = sd.invert(inverse, x_0, steps, None, SCHEDULE, return_info=True)
                assert info.solver == UniPC(prediction="noise")
                other = sd.invert(
                    inverse, x_0, steps, guided_solver(steps, None, info.grid.reversed()), SCHEDULE
                )
                exact = to_noise
            else:
                stop = 1.0 if case == "whole" else 0.25
                edit = ControlledEditing(den, x_0, 0.7, stop=stop)
                out, info = sd.sample(edit, y_1, steps, None, SCHEDULE, final="none", return_info=True)
                assert info.solver == sd.solvers.get("unipc")
                guided_default = guided_solver(steps, None, info.grid)
                other = sd.sample(edit, y_1, steps, guided_default, SCHEDULE, final="none")
                exact = whole if case == "whole" else window
            assert rel_rmse(out, exact) == pytest.approx(m, rel=0.01), (case, steps)
            assert rel_rmse(other, exact) == pytest.approx(g, rel=0.01), (case, steps)
            if case != "window":
                ratios.append(rel_rmse(out, exact) / rel_rmse(other, exact))
    assert max(ratios) < 1.03 and math.prod(ratios) ** (1 / len(ratios)) < 0.98
    # around classifier-free guidance the guided default stays
    cfg = sd.guidance.CFG(den, den, 3.0)
    _, info = sd.invert(ControlledInversion(cfg, y_1, 0.5), x_0, 10, None, SCHEDULE, return_info=True)
    assert info.solver == guided_solver(10, 3.0, info.grid.reversed())
    _, info = sd.sample(ControlledEditing(cfg, x_0, 0.7), y_1, 10, None, SCHEDULE, return_info=True)
    assert info.solver == guided_solver(10, 3.0, info.grid)


def test_distance_to_the_target_falls_with_the_control(den, x_0, y_1):
    """Measured (16 samples of the 8-d mixture, ``ddim``, ``time_uniform``): the mean distance from the
    inverted noise to ``y_1`` at 10 steps is 3.63 / 1.58 / 0.61 / 0.17 / 0.0046 at ``gamma`` = 0 / 0.25 /
    0.5 / 0.75 / 1; editing that ``gamma = 0.5`` inversion (40 steps) back without a new prompt lands at a
    mean distance from ``y_0`` of 4.34 / 3.98 / 3.53 / 3.20 / 2.98 at ``eta`` = 0 / 0.25 / 0.5 / 0.75 / 1
    on the default window ``[0, 0.25)``, and 4.34 / 0.90 / 0.14 / 0.013 / 0 on all of it."""
    gammas = (0.0, 0.25, 0.5, 0.75, 1.0)
    to_noise = [
        float((rf_invert(den, x_0, y_1, g, 10, schedule=SCHEDULE) - y_1).norm(dim=1).mean()) for g in gammas
    ]
    assert to_noise == pytest.approx([3.6286, 1.5844, 0.60551, 0.17458, 0.0046043], rel=1e-3)
    x_T = rf_invert(den, x_0, y_1, gamma=0.5, steps=40, schedule=SCHEDULE)
    measured = {
        0.25: [4.3379, 3.9794, 3.5259, 3.2045, 2.9793],
        1.0: [4.3379, 0.90036, 0.14211, 0.013173, 0.0],
    }
    for stop, dists in measured.items():
        got = [
            float(
                (rf_edit(den, x_T, x_0, e, stop=stop, steps=40, schedule=SCHEDULE) - x_0).norm(dim=1).mean()
            )
            for e in gammas
        ]
        assert got == pytest.approx(dists, rel=1e-3, abs=1e-12)
    assert all(a > b for a, b in itertools.pairwise(to_noise))


# --- the paper's drifts, by hand ----------------------------------------------------------------------------


def _constant(prediction: str, value: list[float]) -> sd.Denoiser:
    """A flow denoiser whose net returns ``value`` whatever ``(x, t)``."""
    return sd.Denoiser(lambda x, t: torch.tensor(value, dtype=F64).expand_as(x), FLOW, prediction=prediction)


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_controlled_drifts_match_the_paper_by_hand(prediction):
    """At ``t = 1/4``, ``x = (1, -2)`` and a model with ``x0 = (1/2, 1/2)`` (``eps = (5/2, -19/2)``):
    ``u = eps - x0 = (2, -10)``. Eq. 8 with ``y_1 = (3, 1/2)``, ``gamma = 1/2``:
    ``u_cond = (y_1 - x) / (3/4) = (8/3, 10/3)``, the controlled drift
    ``u + (u_cond - u) / 2 = (7/3, -10/3)``. Eq. 15 at the paper's ``tau = 3/4`` with ``y_0 = (0, 1)``,
    ``eta = 1/2``: ``v = -u = (-2, 10)``,
    ``v_cond = (y_0 - x) / (1 - tau) = (-4, 12)``, ``v_hat = (-3, 11)``, so ``dx/dt = -v_hat = (3, -11)``
    inside the window, ``u`` outside."""
    x, t = torch.tensor([[1.0, -2.0]], dtype=F64), 0.25
    base = _constant("x0", [0.5, 0.5]) if prediction == "x0" else _constant("eps", [2.5, -9.5])

    def drift(d):
        p = d(x, t)
        return (p.eps - p.x0).reshape(-1).tolist()

    assert drift(base) == pytest.approx([2.0, -10.0], abs=1e-14)
    assert drift(ControlledInversion(base, torch.tensor([[3.0, 0.5]], dtype=F64), 0.5)) == pytest.approx(
        [7 / 3, -10 / 3], abs=1e-14
    )
    y_0 = torch.tensor([[0.0, 1.0]], dtype=F64)
    assert drift(ControlledEditing(base, y_0, 0.5, start=0.5, stop=1.0)) == pytest.approx(
        [3.0, -11.0], abs=1e-14
    )
    assert drift(ControlledEditing(base, y_0, 0.5, start=0.0, stop=0.75)) == pytest.approx(
        [2.0, -10.0], abs=1e-14
    )
    # one time per row: the window is read per sample
    xs, ts = x.expand(2, 2), torch.tensor([0.25, 0.9], dtype=F64)
    p = ControlledEditing(base, y_0, 0.5, start=0.5, stop=1.0)(xs, ts)
    assert (p.eps - p.x0)[0].tolist() == pytest.approx([3.0, -11.0], abs=1e-14)
    plain = base(xs[1:], 0.9)
    assert (p.eps - p.x0)[1].tolist() == pytest.approx((plain.eps - plain.x0)[0].tolist(), abs=1e-14)


def test_take_rows_takes_the_per_sample_target(den, x_0, y_1):
    """Particle methods and ``max_batch`` slice a wrapper's rows: a per-sample ``y_1`` follows them."""
    wrapped = ControlledInversion(den, y_1, 0.5)
    rows = torch.tensor([3, 7])
    taken = wrapped.take_rows(rows, 16)
    assert torch.equal(taken.target, y_1[rows]) and wrapped.target is y_1
    assert torch.allclose(taken(x_0[rows], 0.3).x0, wrapped(x_0, 0.3).x0[rows], rtol=0, atol=1e-14)
    shared = ControlledInversion(den, y_1[:1], 0.5)
    assert shared.take_rows(rows, 16) is shared


def test_per_row_times_give_the_float_time_s_prediction(den, x_0):
    """A tensor of per-row times (``sd.paradigms``' window, ``dpm_adaptive``'s rows) weighs the control in
    float64, as a float time does: the same prediction to rounding (before: ``eta`` in torch's default
    float32, 0.699999988, an ``x0`` off by 2.1e-8)."""
    edit = ControlledEditing(den, torch.zeros(1, 8, dtype=F64), 0.7, 0.0, 1.0)
    t = torch.tensor([0.8, 0.3, 0.8, 0.3], dtype=F64)
    assert edit.weight(t).tolist() == [0.7] * 4
    rows = edit(x_0[:4], t)
    for k in range(4):
        assert torch.allclose(rows.x0[k], edit(x_0[k : k + 1], float(t[k])).x0[0], rtol=0, atol=1e-15)


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_input(den, x_0, y_1):
    # named after the entry point (they read "ControlledInversion: gamma ...", the class it builds)
    for gamma in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"^rf_invert: gamma must be a finite number in \[0, 1\]"):
            rf_invert(den, x_0, y_1, gamma=gamma)
        with pytest.raises(ValueError, match=r"^ControlledInversion: gamma"):
            ControlledInversion(den, y_1, gamma)
    for kw, what in (({"eta": 1.2}, "eta"), ({"start": -0.1}, "start"), ({"stop": 1.5}, "stop")):
        with pytest.raises(ValueError, match=rf"^rf_edit: {what}"):
            rf_edit(den, y_1, x_0, **kw)
        with pytest.raises(ValueError, match=rf"^ControlledEditing: {what}"):
            ControlledEditing(den, x_0, **kw)
    with pytest.raises(ValueError, match=r"^rf_edit: the window needs start <= stop.*start=0\.5, stop=0\.25"):
        rf_edit(den, y_1, x_0, start=0.5, stop=0.25)
    with pytest.raises(ValueError, match=r"^rf_invert: y_1 must be a tensor of finite"):
        rf_invert(den, x_0, torch.full_like(y_1, float("nan")))
    edm = sd.toy.GaussianMixture(torch.zeros(1, 8), torch.ones(1, 8), torch.ones(1)).denoiser(sd.EDM())
    with pytest.raises(ValueError, match=r"^rf_edit: den must be a denoiser under sd\.RectifiedFlow"):
        rf_edit(edm, y_1, x_0)
    with pytest.raises(ValueError, match=r"^rf_invert: den must be a steerdiff Denoiser"):
        rf_invert("net", x_0, y_1)
    with pytest.raises(ValueError, match=r"rf_invert: y_1 must have x_0's shape \(16, 8\), got \(4, 8\)"):
        rf_invert(den, x_0, y_1[:4])
    with pytest.raises(ValueError, match=r"rf_edit: y_0 must have x_T's shape"):
        rf_edit(den, y_1, x_0[:, :4])
    # before: AttributeError ('list' object has no attribute 'shape') from the shape check
    with pytest.raises(ValueError, match=r"rf_invert: x_0 must be a torch\.Tensor, got list"):
        rf_invert(den, x_0.tolist(), y_1)
    with pytest.raises(ValueError, match=r"rf_edit: x_T must be a torch\.Tensor, got list"):
        rf_edit(den, y_1.tolist(), x_0)
    with pytest.raises(ValueError, match=r"ControlledInversion: y_1 must be a tensor of finite"):
        ControlledInversion(den, torch.full((1, 8), float("inf")), 0.5)
    with pytest.raises(
        ValueError, match=r"ControlledEditing: den must be a denoiser under sd\.RectifiedFlow"
    ):
        ControlledEditing(
            sd.toy.GaussianMixture(torch.zeros(1, 8), torch.ones(1, 8), torch.ones(1)).denoiser(
                sd.VP.cosine()
            ),
            x_0,
        )
    with pytest.raises(ValueError, match=r"^rf_invert: solver='ddpm' is stochastic.*accepted: \["):
        rf_invert(den, x_0, y_1, solver="ddpm")
    # solver=None: rf_edit refused it, rf_invert ran invert's default (UniPC's noise form), not its ddim
    with pytest.raises(ValueError, match=r"^rf_invert: unknown solver=None"):
        rf_invert(den, x_0, y_1, solver=None)
    with pytest.raises(ValueError, match=r"^rf_edit: unknown solver=None"):
        rf_edit(den, y_1, x_0, solver=None)
    with pytest.raises(ValueError, match=r"rf_edit: solver='ddpm' is stochastic.*accepted: \["):
        rf_edit(den, y_1, x_0, solver="ddpm")
