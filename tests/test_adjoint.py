"""AdjointDEIS (``sd.adjoint``) against the exact gradient of the probability-flow ODE's flow map and against
autograd through ``sd.sample``; memory, exact NFE / vector-Jacobian-product counts, bad input.

The oracle: a single Gaussian ``N(m, diag(v))`` under Stable Diffusion's betas. Its noised marginals are
``N(alpha m, alpha^2 v + sigma^2)``, so the flow map from node 0 to node N is affine,
``x_N = alpha_N m + A (x_T - alpha_0 m)`` with ``A = sqrt((alpha_N^2 v + sigma_N^2) / (alpha_0^2 v +
sigma_0^2))``: for ``L = |x_N - target|^2 / 2`` the exact ``dL/dx_T = A (x_N - target)`` and, for a mean shift
``m = mu + delta`` passed to the net as a condition, ``dL/d delta`` = the batch's sum of
``(alpha_N - alpha_0 A) (x_N - target)``. ``python -m tests.test_adjoint`` prints docs/adjoint.md's table and
the order-3 numbers of ``sd.adjoint``'s docstring.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers import make_grid
from steerdiff.solvers.deis import DEIS

from .reference import smooth_mixture

F64 = torch.float64
PROC = sd.VP.scaled_linear()
MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
VAR = torch.tensor([0.3, 1.5, 0.05], dtype=F64)
X_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
TARGET = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
SCHED = "logsnr_uniform"


def posterior_mean(
    x: torch.Tensor, t: torch.Tensor, m: torch.Tensor, var: torch.Tensor, process: sd.Process = PROC
) -> torch.Tensor:
    """The exact ``E[x0 | x_t]`` of ``N(m, diag(var))`` under ``process``."""
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    return m + a * var / (a**2 * var + s**2) * (x - a * m)


def gaussian_net(x: torch.Tensor, t: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """The exact ``E[x0 | x_t]`` of ``N(MU + shift, diag(VAR))``: differentiable in ``x`` and ``shift``."""
    return posterior_mean(x, t, MU if shift is None else MU + shift, VAR)


def gaussian_den(process: sd.Process, var: torch.Tensor = VAR) -> sd.Denoiser:
    """The exact denoiser of ``N(MU, diag(var))`` under ``process``."""
    return sd.Denoiser(lambda x, t: posterior_mean(x, t, MU, var, process), process, prediction="x0")


DEN = sd.Denoiser(gaussian_net, PROC, prediction="x0")


def loss(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x - TARGET).pow(2).sum()


def exact(
    steps: int,
    shift: torch.Tensor | None = None,
    process: sd.Process = PROC,
    x_T: torch.Tensor = X_T,
    var: torch.Tensor = VAR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx_T, dL/d shift)`` of the exact flow map over the grid of ``steps`` steps (``final="none"``)."""
    (a0, _), (an, _), amp = flow_map(steps, process, var)
    m = MU if shift is None else MU + shift
    resid = an * m + amp * (x_T - a0 * m) - TARGET
    return amp * resid, ((an - a0 * amp) * resid).sum(0)


def flow_map(
    steps: int, process: sd.Process, var: torch.Tensor
) -> tuple[tuple[float, float], tuple[float, float], torch.Tensor]:
    """``(alpha_0, sigma_0)``, ``(alpha_N, sigma_N)`` of the grid and the flow map's Jacobian ``A``."""
    grid = make_grid(process, sd.schedules.get(SCHED), steps, "none")
    (a0, s0), (an, sn) = (grid.alpha[0], grid.sigma[0]), (grid.alpha[-1], grid.sigma[-1])
    return (a0, s0), (an, sn), ((an**2 * var + sn**2) / (a0**2 * var + s0**2)).sqrt()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def slope(steps: list[int], errors: list[float]) -> float:
    return -math.log(errors[-1] / errors[0]) / math.log(steps[-1] / steps[0])


def autograd_grad(
    den: sd.Denoiser, steps: int, order: int, final: str, x_T: torch.Tensor = X_T, **cond: Any
) -> torch.Tensor:
    x_T = x_T.clone().requires_grad_(True)
    out = sd.sample(den, x_T, steps, DEIS(order=order), SCHED, final=final, **cond)
    (g,) = torch.autograd.grad(loss(out), x_T)
    return g


STEPS = [40, 80, 160]


@pytest.mark.parametrize("order", [1, 2])
def test_converges_to_the_exact_gradient_at_its_order(order: int) -> None:
    errors = []
    for n in STEPS:
        _, grads = sd.adjoint(DEN, X_T, loss, n, SCHED, solver_order=order, final="none")
        errors.append(rel(grads["x_T"], exact(n)[0]))
    # measured: order 1 2.9e-2 / 1.5e-2 / 7.4e-3 (slope 1.00), order 2 1.8e-3 / 4.7e-4 / 1.2e-4 (1.98); the
    # paper's form (phi = alpha) was 3.1e-1 / 1.6e-1 / 8.2e-2 and 7.1e-2 / 1.6e-2 / 3.9e-3
    assert abs(slope(STEPS, errors) - order) < 0.35, errors
    assert errors[-1] < (1e-2 if order == 1 else 2e-4), errors


def test_order_three_backward_pass_is_third_order_under_sd_betas() -> None:
    """The backward pass at order 3 against the exact flow map's gradient at the sample it was given,
    ``A (x_0 - target)`` (the forward pass's error left out): third order under SD's betas, where the first
    step up from the clean end, at first order, held it to second (2.5e-4 / 4.1e-5 / 8.3e-6 at 40 / 80 / 160
    steps, slope 2.5 falling to 2.2 at 320) before it was re-taken by the trapezoid. Against the exact
    gradient itself the forward pass's own warm-up (DEIS-3's first step, at first order at the noise end)
    holds autograd through the same run to second order, and the adjoint is now the closer of the two (it
    was the further: 2.6e-4 / 4.5e-5 / 9.1e-6)."""
    backward, adj, auto = [], [], []
    for n in STEPS:
        x0, grads = sd.adjoint(DEN, X_T, loss, n, SCHED, solver_order=3, final="none")
        backward.append(rel(grads["x_T"], flow_map(n, PROC, VAR)[2] * (x0 - TARGET)))
        adj.append(rel(grads["x_T"], exact(n)[0]))
        auto.append(rel(autograd_grad(DEN, n, 3, "none"), exact(n)[0]))
    # measured 1.3e-4 / 1.4e-5 / 1.6e-6 (slope 3.17); against the exact gradient the adjoint 1.5e-4 / 2.1e-5 /
    # 3.9e-6, autograd 1.7e-4 / 3.4e-5 / 7.6e-6 (slope 2.25)
    assert abs(slope(STEPS, backward) - 3) < 0.35, backward
    assert backward[-1] < 3e-6, backward
    assert abs(slope(STEPS, auto) - 2) < 0.35, auto
    assert all(a < b for a, b in zip(adj, auto, strict=True)) and adj[-1] < 0.6 * auto[-1], (adj, auto)


@pytest.mark.parametrize("order", [1, 2])
def test_matches_autograd_through_sample_as_steps_grow(order: int) -> None:
    diffs = []
    for n in STEPS:
        x0, grads = sd.adjoint(DEN, X_T, loss, n, SCHED, solver_order=order, final="none")
        assert torch.equal(x0, sd.sample(DEN, X_T, n, DEIS(order=order), SCHED, final="none"))
        diffs.append(rel(grads["x_T"], autograd_grad(DEN, n, order, "none")))
    # both converge to the exact gradient at order k (order 2: 2.9e-3 / 7.3e-4 / 1.9e-4 apart; autograd is
    # 3.6e-3 / 9.2e-4 / 2.3e-4 from the exact gradient; the paper's form was 4.1e-3 from autograd at 160)
    assert abs(slope(STEPS, diffs) - order) < 0.35, diffs
    assert diffs[-1] < (1.2e-2 if order == 1 else 3e-4), diffs


def test_conditioning_gradient_converges_to_the_exact_one() -> None:
    shift = torch.tensor([0.3, -0.2, 0.1], dtype=F64, requires_grad=True)
    errors = []
    for n in STEPS:
        _, grads = sd.adjoint(DEN, X_T, loss, n, SCHED, solver_order=2, final="none", shift=shift)
        g_x, g_shift = exact(n, shift.detach())
        assert grads["shift"].shape == shift.shape
        errors.append(rel(grads["shift"], g_shift))
        assert rel(grads["x_T"], g_x) < 2.5e-3  # measured 1.6e-3 at 40 (the paper's form: 7.1e-2)
    # measured 5.6e-4 / 1.4e-4 / 3.5e-5 (the paper's form: 3.4e-3 / 7.8e-4 / 1.9e-4)
    assert abs(slope(STEPS, errors) - 2) < 0.35, errors
    assert errors[-1] < 5e-5, errors
    assert shift.grad is None  # nothing is accumulated on the caller's tensor


def test_mixture_clean_end_matches_autograd() -> None:
    """A 4-component 8-d mixture (the denoiser is nonlinear), ``final="zero"`` (the clean step's exact VJP):
    the difference to autograd through ``sample`` falls at second order."""
    gmm = smooth_mixture()
    den = gmm.denoiser(PROC)
    x_T = torch.randn(6, gmm.dim, generator=torch.Generator().manual_seed(2), dtype=F64)

    def mloss(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * torch.arange(gmm.dim, dtype=F64)).sum()

    diffs = []
    for n in STEPS:
        _, grads = sd.adjoint(den, x_T, mloss, n, SCHED, solver_order=2)
        xt = x_T.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(mloss(sd.sample(den, xt, n, DEIS(order=2), SCHED)), xt)
        diffs.append(rel(grads["x_T"], ref))
    # measured 1.2e-2 / 3.6e-3 / 9.7e-4 (slope 1.81)
    assert abs(slope(STEPS, diffs) - 2) < 0.35, diffs
    assert diffs[-1] < 1.5e-3, diffs


FLOW_EDM = [(sd.RectifiedFlow(), 1.0), (sd.EDM(), 80.0)]  # (process, the scale of x_T)


def shifted_mixture_net(process: sd.Process) -> Any:
    """The exact ``E[x0 | x_t]`` of a 3-component 4-d mixture whose means move nonlinearly with a condition
    ``z`` (2-d): ``m_c(z) = M_c + tanh(z W_c)``; the weights depend on ``z`` too."""
    g = torch.Generator().manual_seed(0)
    means, var = (
        torch.randn(3, 4, generator=g, dtype=F64),
        0.3 + 0.5 * torch.rand(3, 4, generator=g, dtype=F64),
    )
    w = 0.7 * torch.randn(3, 2, 4, generator=g, dtype=F64)

    def net(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a, s = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
        m = means + torch.tanh(torch.einsum("z,kzd->kd", z, w))
        v = a**2 * var + s**2
        logp = -0.5 * ((x[:, None] - a * m) ** 2 / v + v.log()).sum(-1)
        post = m + a * var / v * (x[:, None] - a * m)
        return (torch.softmax(logp, -1)[..., None] * post).sum(1)

    return net


@pytest.mark.parametrize(("process", "scale"), [(PROC, 1.0), *FLOW_EDM])
def test_conditioning_gradient_of_a_nonlinear_condition_matches_autograd(
    process: sd.Process, scale: float
) -> None:
    """``dL/dz`` for a condition the net depends on nonlinearly (a mixture's means and weights),
    ``final="zero"``, order 2: the adjoint and autograd through the same run converge to each other at second
    order."""
    den = sd.Denoiser(shifted_mixture_net(process), process, prediction="x0")
    x_T = scale * torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    z0 = torch.tensor([0.4, -0.8], dtype=F64)

    def mloss(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * torch.arange(1, 5, dtype=F64)).sum()

    diffs = []
    for n in (20, 80):
        _, grads = sd.adjoint(den, x_T, mloss, n, SCHED, solver_order=2, z=z0.clone().requires_grad_(True))
        z = z0.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(mloss(sd.sample(den, x_T, n, DEIS(order=2), SCHED, z=z)), z)
        diffs.append(rel(grads["z"], ref))
    # measured 1.2e-3 / 5.7e-5 (VP), 1.3e-2 / 2.5e-4 (flow), 4.3e-3 / 1.5e-4 (EDM); against autograd through
    # 1,500 steps of DEIS-3 both are 1.3e-3 apart at 80 steps under flow, 6.8e-4 / 6.9e-4 under EDM
    assert 1.7 < slope([20, 80], diffs) < 3.3, diffs
    assert diffs[-1] < 5e-4, diffs


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize(("process", "scale"), FLOW_EDM)
def test_flow_and_edm_mixture_few_steps_match_autograd(process: sd.Process, scale: float, order: int) -> None:
    """The docstring's rectified-flow / EDM rows (8-d mixture, ``final="zero"``, against autograd through the
    same run at 20 / 80 / 320 steps): flow 0.14 / 1.8e-2 / 1.5e-3 (order 2), 0.12 / 9.2e-3 / 1.9e-4 (order 3);
    EDM 0.12 / 1.6e-2 / 1.2e-3, 0.12 / 5.9e-3 / 1.1e-4. The paper's form (``phi = alpha``) gave no gradient at
    20 steps: 4.6e3 and 6.8e5 (flow), 4.8 and 2.2e2 (EDM); autograd is itself 0.14 / 2.1e-2 (flow) and 0.24 /
    9.2e-2 (EDM) from the exact gradient there."""
    gmm = smooth_mixture()
    den = gmm.denoiser(process)
    x_T = scale * torch.randn(6, gmm.dim, generator=torch.Generator().manual_seed(2), dtype=F64)

    def mloss(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * torch.arange(gmm.dim, dtype=F64)).sum()

    diffs = []
    for n in (20, 80, 320):
        _, grads = sd.adjoint(den, x_T, mloss, n, SCHED, solver_order=order)
        xt = x_T.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(mloss(sd.sample(den, xt, n, DEIS(order=order), SCHED)), xt)
        diffs.append(rel(grads["x_T"], ref))
    assert diffs[0] < 0.2, diffs
    assert abs(slope([80, 320], diffs[1:]) - order) < 0.5, diffs


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize(("process", "scale"), FLOW_EDM)
def test_flow_and_edm_gaussian_few_steps_match_the_exact_gradient(
    process: sd.Process, scale: float, order: int
) -> None:
    """At 20 steps on the Gaussian oracle the adjoint is within 5% of the flow map's exact gradient and at
    most twice as far as autograd through the same run: measured flow 3.0e-2 / 1.5e-2 (orders 2 / 3;
    autograd 6.0e-2 / 1.0e-2), EDM 1.9e-2 / 6.9e-3 (3.7e-2 / 4.3e-3). The paper's form: flow 9.5e2 / 6.2e5,
    EDM 3.8 / 1.0e2."""
    den, x_T = gaussian_den(process), scale * X_T
    _, grads = sd.adjoint(den, x_T, loss, 20, SCHED, solver_order=order, final="none")
    ref = exact(20, process=process, x_T=x_T)[0]
    err, err_autograd = rel(grads["x_T"], ref), rel(autograd_grad(den, 20, order, "none", x_T), ref)
    assert err < 0.05 and err < 2 * err_autograd, (err, err_autograd)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(("process", "scale"), [(PROC, 1.0), *FLOW_EDM])
def test_unit_variance_gaussian_is_exact_at_any_step_count(
    process: sd.Process, scale: float, order: int
) -> None:
    """For data ``N(m, I)`` the integrating factor ``sqrt(alpha^2 + sigma^2)`` takes the whole Jacobian: at 3
    steps the gradient is the exact flow map's Jacobian ``A`` applied to ``dL/dx_0`` at the sample (the
    paper's form was 29 to 7.3e4 from it)."""
    ones = torch.ones(3, dtype=F64)
    den, x_T = gaussian_den(process, ones), scale * X_T
    x0, grads = sd.adjoint(den, x_T, loss, 3, SCHED, solver_order=order, final="none")
    assert rel(grads["x_T"], flow_map(3, process, ones)[2] * (x0 - TARGET)) < 1e-12


def test_resolved_state_is_the_inversion() -> None:
    """The state re-solved alongside the adjoint is ``sd.invert`` with the same DEIS up the same grid."""
    x0, _, info = sd.adjoint(DEN, X_T, loss, 20, SCHED, solver_order=2, final="none", return_info=True)
    back = sd.invert(DEN, x0, 20, DEIS(order=2), SCHED)
    assert torch.allclose(info.x_T_resolved, back, rtol=0, atol=1e-12)


class _Saved:
    """A saved tensor whose life is counted: how many a graph holds at once."""

    live = 0
    peak = 0

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        _Saved.live += 1
        _Saved.peak = max(_Saved.peak, _Saved.live)

    def __del__(self) -> None:
        _Saved.live -= 1


def peak_saved(run: Any) -> int:
    _Saved.live = _Saved.peak = 0
    with torch.autograd.graph.saved_tensors_hooks(_Saved, lambda s: s.t):
        run()
    return _Saved.peak


def test_no_graph_is_kept_across_steps() -> None:
    """The most tensors autograd holds at once is the same at 10 and 100 steps (through sample: 10x)."""
    gmm = smooth_mixture()
    den = gmm.denoiser(PROC)
    x_T = torch.randn(4, gmm.dim, generator=torch.Generator().manual_seed(3), dtype=F64)

    def mloss(x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).sum()

    def through_sample(n: int) -> None:
        xt = x_T.clone().requires_grad_(True)
        torch.autograd.grad(mloss(sd.sample(den, xt, n, DEIS(order=2), SCHED)), xt)

    peaks = [peak_saved(lambda n=n: sd.adjoint(den, x_T, mloss, n, SCHED)) for n in (10, 100)]
    assert peaks[0] == peaks[1] > 0  # measured 11 and 11; through sample 111 and 1101
    dto = [peak_saved(lambda n=n: through_sample(n)) for n in (10, 100)]
    assert dto[1] > 8 * dto[0] and dto[0] > peaks[0]


class _CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        _CountBackward.calls += 1
        return g


@pytest.mark.parametrize(("final", "steps"), [("none", 7), ("zero", 7), ("zero", 1), ("none", 1)])
@pytest.mark.parametrize("order", [1, 2])
def test_exact_nfe_and_vjp_counts(final: str, steps: int, order: int) -> None:
    calls = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return _CountBackward.apply(gaussian_net(x, t))

    den = sd.Denoiser(net, PROC, prediction="x0")
    _CountBackward.calls = 0
    _, _, info = sd.adjoint(den, X_T, loss, steps, SCHED, solver_order=order, final=final, return_info=True)
    backward = steps if final == "none" else max(steps - 1, 1)
    assert (info.forward_nfe, info.backward_nfe, info.vjps, info.nfe) == (
        steps,
        backward,
        steps,
        steps + backward,
    )
    assert len(calls) == info.nfe and calls.count(True) == backward  # the forward pass builds no graph
    assert _CountBackward.calls == steps


def test_ddim_is_order_one_and_unused_conditions_get_zero() -> None:
    shift = torch.zeros(3, dtype=F64, requires_grad=True)
    a = sd.adjoint(DEN, X_T, loss, 12, SCHED, solver="ddim", final="none")[1]["x_T"]
    b = sd.adjoint(DEN, X_T, loss, 12, SCHED, solver_order=1, final="none")[1]["x_T"]
    assert torch.allclose(a, b, rtol=1e-12, atol=0)
    grads = sd.adjoint(sd.Denoiser(lambda x, t, **_: gaussian_net(x, t), PROC, "x0"), X_T, loss, 5, z=shift)[
        1
    ]
    assert torch.equal(grads["z"], torch.zeros(3, dtype=F64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"solver": "ddpm"},
            r"solver='ddpm' draws noise; the adjoint here is that of the probability-flow ODE",
        ),
        ({"solver": "unipc"}, r"solver='unipc' is not one whose adjoint is implemented.*accepted: \['deis'"),
        ({"solver": DEIS(variant="tab")}, r"is not one whose adjoint is implemented"),
        ({"solver": "ddim", "solver_order": 2}, r"solver_order=2 contradicts solver='ddim' \(order 1\)"),
        ({"solver_order": 4}, r"solver_order must be 1, 2 or 3, got 4"),
        ({"solver_order": True}, r"solver_order must be 1, 2 or 3, got True"),
        ({"final": "end"}, r"final"),
        ({"steps": 0}, r"steps"),
        ({"generator": torch.Generator()}, r"generator is an argument of sample, not of adjoint"),
    ],
)
def test_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sd.adjoint(DEN, X_T, loss, **kwargs)


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (
            lambda x: x.pow(2).sum(1),
            r"loss must return a scalar tensor \(sum or average a batch\), got \(4,\)",
        ),
        (lambda x: 1.0, r"loss must return a scalar tensor .*got float"),
        (lambda x: x.sum() * math.nan, r"loss\(x_0\) is nan; a finite loss is needed"),
        (lambda x: x.detach().sum(), r"loss\(x_0\) does not depend on x_0 through autograd"),
        # through a parameter only (a reward net's, x_0 detached inside it): the gradient was zeros, silently
        (
            lambda x: (torch.ones(3, dtype=F64, requires_grad=True) * x.detach()).sum(),
            r"loss\(x_0\) does not depend on x_0 through autograd, only through other tensors",
        ),
        (lambda x: (x - x.detach()).sqrt().sum(), r"the gradient of loss at x_0 is not finite"),
        ("mse", r"loss must be a callable\(x_0\) -> scalar tensor, got str"),
    ],
)
def test_bad_loss(loss_fn: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sd.adjoint(DEN, X_T, loss_fn, 5)


class _NanBackward(torch.autograd.Function):
    """The identity, whose backward pass returns NaN: a net finite forwards and not backwards."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * math.nan


def test_nonfinite_vector_jacobian_product_names_its_step() -> None:
    """A net whose output is finite and whose backward pass is not above process time 500: the first product
    that is not finite is named, at the lowest such node ``j`` (the backward pass runs up the grid; its
    evaluation there is the one of forward step ``j - 1``, which ends at node ``j``). The gradient was
    returned as NaN before."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return gaussian_net(_NanBackward.apply(x) if float(t[0]) > 500 else x, t)

    grid = make_grid(PROC, sd.schedules.get(SCHED), 10, "none")
    j = max(i for i, t in enumerate(grid.t) if t > 500)
    with pytest.raises(
        sd.NonFiniteError,
        match=rf"model was NaN/inf at step {j - 1} .*t={grid.t[j]:.6g}\); the model's output there was",
    ):
        sd.adjoint(sd.Denoiser(net, PROC, "x0"), X_T, loss, 10, SCHED, final="none")


def test_bad_x_T_and_inference_mode() -> None:
    with pytest.raises(ValueError, match=r"adjoint: x_T must be batched"):
        sd.adjoint(DEN, X_T[0], loss, 5)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"call it outside inference_mode"):
        sd.adjoint(DEN, X_T, loss, 5)


def test_gradient_guidance_matches_autograd() -> None:
    """DPS inside the adjoint: its backward evaluations differentiate DPS's own gradient (a second-order
    graph, ``steerdiff.guidance.base.grad_on``'s ``nested``), so the adjoint converges to autograd through
    the same DPS run at its order instead of being refused."""
    dps = sd.guidance.DPS(DEN, sd.inverse.Matrix(torch.ones(1, 3, dtype=F64)), X_T[:, :1], noise_std=0.5)
    diffs = []
    for n in STEPS:
        _, grads = sd.adjoint(dps, X_T, loss, n, SCHED, solver_order=2, final="none")
        diffs.append(rel(grads["x_T"], autograd_grad(dps, n, 2, "none")))
    # measured 2.7e-3 / 6.9e-4 / 1.8e-4; the guidance moves the gradient: autograd through DPS is 0.61 from
    # autograd through the unguided run
    assert abs(slope(STEPS, diffs) - 2) < 0.35, diffs
    assert diffs[-1] < 1e-3, diffs
    assert rel(autograd_grad(dps, STEPS[0], 2, "none"), autograd_grad(DEN, STEPS[0], 2, "none")) > 0.3


def main() -> None:
    """docs/adjoint.md's table: relative error of dL/dx_T against the exact flow map's gradient, AdjointDEIS
    and autograd through sample (same DEIS, same grid), and the autograd graph's peak (saved tensors)."""
    print("steps  order  adjoint   autograd  | peak saved: adjoint  autograd")
    for k in (1, 2):
        for n in (10, 20, 40, 80, 160):

            def run(n: int = n, k: int = k) -> torch.Tensor:
                return sd.adjoint(DEN, X_T, loss, n, SCHED, solver_order=k, final="none")[1]["x_T"]

            ref = exact(n)[0]
            err, err_dto = rel(run(), ref), rel(autograd_grad(DEN, n, k, "none"), ref)
            pa, pd = peak_saved(run), peak_saved(lambda n=n, k=k: autograd_grad(DEN, n, k, "none"))
            print(f"{n:5d}  {k:5d}  {err:.2e}  {err_dto:.2e}  | {pa:8d}  {pd:8d}")
    order_three()


def order_three() -> None:
    """The docstring's order-3 numbers. The Gaussian (``final="none"``): the backward pass against the exact
    flow map's gradient at the sample it was given (``backward``), the adjoint and autograd through the same
    run against the exact gradient. The 8-d mixture (``final="zero"``): the adjoint against autograd through
    the same run, and both against autograd through 1,500 steps of DEIS-3."""
    procs = {"VP": (PROC, 1.0), "VP.linear": (sd.VP.linear(), 1.0), "flow": FLOW_EDM[0], "EDM": FLOW_EDM[1]}
    print("\norder 3, Gaussian   steps  backward  adjoint   autograd")
    for name, (process, scale) in procs.items():
        den, x_T = gaussian_den(process), scale * X_T
        for n in (20, 40, 80, 160, 320):
            x0, grads = sd.adjoint(den, x_T, loss, n, SCHED, solver_order=3, final="none")
            back = rel(grads["x_T"], flow_map(n, process, VAR)[2] * (x0 - TARGET))
            ref = exact(n, process=process, x_T=x_T)[0]
            err, err_dto = rel(grads["x_T"], ref), rel(autograd_grad(den, n, 3, "none", x_T), ref)
            print(f"{name:>18s}  {n:5d}  {back:.2e}  {err:.2e}  {err_dto:.2e}")
    gmm = smooth_mixture()

    def mloss(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * torch.arange(gmm.dim, dtype=F64)).sum()

    print("\norder 3, mixture    steps  adj-ag    adjoint   autograd")
    for name in ("VP", "flow", "EDM"):
        process, scale = procs[name]
        den = gmm.denoiser(process)
        x_T = scale * torch.randn(6, gmm.dim, generator=torch.Generator().manual_seed(2), dtype=F64)

        def through_sample(n: int, den: sd.Denoiser = den, x_T: torch.Tensor = x_T) -> torch.Tensor:
            xt = x_T.clone().requires_grad_(True)
            return torch.autograd.grad(mloss(sd.sample(den, xt, n, DEIS(order=3), SCHED)), xt)[0]

        ref = through_sample(1500)
        for n in (20, 80, 320):
            g = sd.adjoint(den, x_T, mloss, n, SCHED, solver_order=3)[1]["x_T"]
            ag = through_sample(n)
            print(f"{name:>18s}  {n:5d}  {rel(g, ag):.2e}  {rel(g, ref):.2e}  {rel(ag, ref):.2e}")


if __name__ == "__main__":
    main()
