r"""Gradients through the sampler in memory independent of the number of steps: AdjointDEIS (Blasingame & Liu
2024, "AdjointDEIS: Efficient Gradients for Diffusion Models", NeurIPS 2024), the continuous adjoint equations
of the probability-flow ODE solved backwards with exponential integrators.

Given a scalar loss ``L(x_0)`` of the result of :func:`~steerdiff.sampling.sample` run from ``x_T``,
:func:`adjoint` returns ``dL/dx_T`` and ``dL/dz`` for the conditioning tensors ``z`` passed to the net
without keeping any step's autograd graph: autograd through ``sample`` (DRaFT-style) holds every step's graph
until the backward pass, ``O(N)`` in the steps ``N``; here one step's graph lives at a time.

**The adjoint ODE.** In the log-SNR ``lam = log(alpha / sigma)`` and ``y = x / alpha`` the probability-flow
ODE in noise prediction is ``dy/dlam = -e^{-lam} eps(x, z, lam)`` (Lu et al. 2022, Eq. 3.4). Its adjoint
states ``b = dL/dy = alpha dL/dx`` and ``a_z = dL/dz`` (the continuous adjoint method, Chen et al. 2018,
Eq. 4 and 51, written as the paper does for ``alpha a_x``) solve, backwards from ``b = alpha dL/dx_0``,
``a_z = 0``:

    db/dlam   = e^{-lam} alpha (d eps / dx)^T b,
    da_z/dlam = e^{-lam} (d eps / dz)^T b,

and ``dL/dx_T = b / alpha`` at the first node. Each has the form of the state's own ODE,
``dQ/dlam = -e^{-lam} E_Q`` with ``E_y = eps``, ``E_b = -alpha (d eps/dx)^T b``, ``E_z = -(d eps/dz)^T b``:
the linear part ``d alpha / alpha`` of ``x`` is taken exactly by ``y = x / alpha``, and the integral of
``e^{-lam}`` against each ``E_Q`` is what an exponential integrator approximates.

**The discretization** (AdjointDEIS-k). The paper's scheme: the state ``y`` is re-solved down the noise
levels alongside the adjoint (a reversed grid, ``h = lam_{i+1} - lam_i < 0``), all three from
the same evaluation at the node they leave, with the weights of DEIS's exponential Adams-Bashforth in
``lam`` (:class:`~steerdiff.solvers.deis.DEIS`, ``variant="log_rho"``; Zhang & Chen 2023): with the last
``k`` estimates ``E_{i-j}`` at ``lam_{i-j}`` and ``w_j`` =
:func:`~steerdiff.solvers._poly.exp_adams_bashforth` of the nodes ``theta_j = (lam_{i-j} - lam_i) / h``,

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} h sum_j w_j eps_{i-j},
    Q_{i+1} = Q_i - (sigma_{i+1} / alpha_{i+1}) h sum_j w_j E_{Q, i-j}       (Q = b, a_z),

exact for ``E_Q`` polynomial of degree ``k - 1`` in ``lam``: order ``k`` (``k = 1``: AdjointDEIS-1,
``a_x(t) = (alpha_s / alpha_t) (a_x(s) + sigma_s (1 - e^{lam_s - lam_t}) (d eps/dx)^T a_x(s))`` from
``s`` to the noisier ``t``, as in the authors' code, ``zblasingame/AdjointDEIS``, ``ode_single_step``;
``k = 2``: a two-step method like the paper's AdjointDEIS-2M, whose weights could not be checked here: the
paper's body was out of reach and the authors' code has only the first-order step; these are DEIS's exact
ones). The orders a step takes are DEIS's up the same grid (:func:`steerdiff.invert`: warm-up
at the first steps, ``lower_order_final`` below 15 steps, long steps up the grid at first order), so the
re-solved state is ``invert(den, x, solver=DEIS(order=k))`` exactly. The forward pass is ``sample`` with
``DEIS(order=k)`` (``"ddim"`` for ``k = 1``) on the same grid; both passes converge to the exact gradient of
the ODE's flow map at order ``k`` (``tests/test_adjoint.py``). With ``final="zero"`` the last step returns
the denoised estimate ``x0(x_{N-1})``; its adjoint is the exact vector-Jacobian product of that estimate,
taken on the stored state ``x_{N-1}`` (the one state kept from the forward pass besides the result).

**Memory.** The nodes are recomputed, not stored: the backward pass holds the state, the adjoints and the
last ``k`` estimates of each, and one evaluation's graph at a time (freed by its vector-Jacobian product),
whatever the number of steps. The re-solved state drifts from the forward trajectory by the solver's error
(``AdjointInfo.x_T_resolved`` is where it lands; the authors' released code caches the forward nodes
instead, their Appendix F.1).

**Cost.** Forward: ``sample``'s NFE (``N``). Backward: one evaluation and one vector-Jacobian product per
node it leaves, ``N`` each with ``final="none"``; with ``final="zero"`` the evaluation at ``x_{N-1}`` serves
both the clean step's product and the first backward step's, so ``max(N - 1, 1)`` evaluations and ``N``
products (times ``den.cost`` for guided denoisers). A product costs about two evaluations (one backward pass
through the net).

**Accuracy.** At equal steps the adjoint is further from the exact gradient than autograd through the same
forward run (on the Gaussian oracle of ``tests/test_adjoint.py``, 40 / 80 / 160 steps at order 2: 7.1e-2 /
1.6e-2 / 3.9e-3 against 3.6e-3 / 9.2e-4 / 2.3e-4), and at few steps far more (0.55 against 0.051 at 10):
the integrating factor ``alpha_s / alpha_t`` takes the state's linear part exactly, but the adjoint's
Jacobian cancels most of it (at high noise ``sigma d eps/dx ~ I`` and ``d log alpha / d lam ~ 1``, so
``a_x`` is nearly constant while ``b = alpha a_x`` and ``E_b`` vary like ``e^{lam}`` and ``e^{2 lam}``), and
the polynomial in ``lam`` is a poor fit there at long steps. Under rectified flow and EDM few steps give no
gradient at all at orders 2 and 3 (the 8-d mixture, ``final="zero"``, against autograd through the same run at
20 / 80 / 320 ``logsnr_uniform`` steps: rectified flow order 1 1.0 / 0.55 / 0.15, order 2 4.6e3 / 0.41 /
2.0e-2, order 3 6.8e5 / 7.7e-2 / 8.1e-4; EDM order 2 4.8 / 0.13 / 7.5e-3, order 3 2.2e2 / 8.0e-3 / 1.2e-4;
VP order 2 0.27 / 1.8e-2 / 1.2e-3), though every case converges at its order. Where its memory is
affordable, autograd through ``sample`` (with activation checkpointing for a large net) is the more accurate
gradient.

The adjoint of the reverse SDE is an ODE too (the paper's Theorem 3.1); it is not implemented here:
stochastic solvers are refused.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor

from . import solvers as _solvers
from ._checks import boolean
from ._ops import first_false
from .denoiser import Denoiser, check_denoiser
from .sampling import DEFAULT_SCHEDULE, check_sample_only, check_x_T, plan, sample_as
from .schedules import ScheduleLike
from .solvers._poly import exp_adams_bashforth
from .solvers.base import Grid, MaxH, Model, NonFiniteError, Solver, step_order, work_dtype
from .solvers.ddim import DDIM
from .solvers.deis import DEIS

__all__ = ["AdjointInfo", "adjoint"]

DEFAULT_ORDER = 2
ACCEPTED = ("deis", "ddim")  # the forward solvers whose adjoint this is (DDIM = DEIS-1)
# sample's keyword arguments that adjoint has none of (they would reach the net as conditions)
SAMPLE_ONLY = ("generator", "corrector", "corrector_steps", "snr", "callback")

Loss = Callable[[Tensor], Tensor]


@dataclass
class AdjointInfo:
    """What :func:`adjoint` cost and where it went: network evaluations of the forward and backward passes,
    vector-Jacobian products of the backward pass, the sampling grid and forward solver, and ``x_T_resolved``,
    the state the backward pass re-solved to at the first node (its distance to ``x_T`` is the re-solve's
    error)."""

    forward_nfe: int
    backward_nfe: int
    vjps: int
    grid: Grid
    solver: Solver
    x_T_resolved: Tensor

    @property
    def nfe(self) -> int:
        """Network evaluations of both passes."""
        return self.forward_nfe + self.backward_nfe


def _forward_solver(solver: str | Solver | None, order: int | None) -> tuple[Solver, int]:
    """The forward solver and the adjoint's order for :func:`adjoint`'s ``solver`` and ``solver_order``."""
    if order is not None and (isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3):
        raise ValueError(f"adjoint: solver_order must be 1, 2 or 3, got {order!r}")
    if solver is None:
        k = DEFAULT_ORDER if order is None else order
        return DEIS(order=k), k
    slv = _solvers.get(solver, "adjoint")
    if slv.stochastic:
        raise ValueError(
            f"adjoint: solver={solver!r} draws noise; the adjoint here is that of the probability-flow "
            f"ODE: pass a deterministic one of {list(ACCEPTED)} (or solver_order alone)"
        )
    if isinstance(slv, DEIS) and slv.variant == "log_rho":
        k = slv.order
    elif isinstance(slv, DDIM):
        k = 1
    else:
        raise ValueError(
            f"adjoint: solver={solver!r} is not one whose adjoint is implemented: the backward pass is "
            f"DEIS's exponential integrator in lam; accepted: {list(ACCEPTED)}, DEIS(variant='log_rho') or "
            "DDIM(), or None with solver_order"
        )
    if order is not None and order != k:
        raise ValueError(f"adjoint: solver_order={order} contradicts solver={solver!r} (order {k}); give one")
    return slv, k


def _step_rule(slv: Solver) -> tuple[bool, MaxH, float]:
    """``(lower_order_final, max_h, max_h_ratio)`` of the forward solver: the orders the backward pass takes
    up the grid are those ``invert`` takes with it (DDIM: first order throughout)."""
    if isinstance(slv, DEIS):
        return slv.lower_order_final, slv.max_h, slv.max_h_ratio
    return False, math.inf, 0.0


def _grad_inputs(cond: dict[str, Any]) -> dict[str, Tensor]:
    """Leaf copies of the conditioning tensors that require grad (their gradients are returned)."""
    leaves = {}
    for name, value in cond.items():
        if isinstance(value, Tensor) and value.requires_grad:
            if not value.is_floating_point():
                raise ValueError(
                    f"adjoint: {name} requires grad but has dtype {value.dtype}; a float is needed"
                )
            leaves[name] = value.detach().requires_grad_(True)
    return leaves


def _noisy(grid: Grid) -> Grid:
    """``grid`` without its clean end: the nodes the backward pass runs up."""
    if not grid.clean_end:
        return grid
    return Grid(grid.process, grid.t[:-1], grid.alpha[:-1], grid.sigma[:-1], grid.lam[:-1], False)


def _vjp(out: Tensor, x: Tensor, leaves: dict[str, Tensor], v: Tensor, retain: bool) -> list[Tensor]:
    """``(d out / d input)^T v`` for ``x`` and each leaf (zeros where ``out`` does not depend on it)."""
    inputs = [x, *leaves.values()]
    grads = torch.autograd.grad(out, inputs, v, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads, strict=True)]


class _Products:
    """The backward pass's vector-Jacobian products, one sum per product (a NaN/inf anywhere makes it
    non-finite), tested together at the end: a :class:`NonFiniteError` naming the first step whose product
    through the net was not finite (its forward evaluation was, which :class:`Model` checks)."""

    def __init__(self) -> None:
        self.sums: list[Tensor] = []
        self.where: list[tuple[int, float]] = []

    def add(self, grads: list[Tensor], step: int, t: float) -> None:
        self.sums.append(torch.stack([v.detach().sum(dtype=torch.float64) for v in grads]).sum())
        self.where.append((step, t))

    def check(self) -> None:
        k = first_false(torch.isfinite(torch.stack(self.sums))) if self.sums else None
        if k is not None:
            step, t = self.where[k]
            raise NonFiniteError(
                f"adjoint: the vector-Jacobian product through the model was NaN/inf at step {step} "
                f"(backward product {k + 1}, process time t={t:.6g}); the model's output there was finite"
            )


@overload
def adjoint(
    den: Denoiser,
    x_T: Tensor,
    loss: Loss,
    steps: int = ...,
    schedule: ScheduleLike = ...,
    *,
    solver_order: int | None = ...,
    solver: str | Solver | None = ...,
    final: str = ...,
    return_info: Literal[False] = ...,
    **cond: Any,
) -> tuple[Tensor, dict[str, Tensor]]: ...


@overload
def adjoint(
    den: Denoiser,
    x_T: Tensor,
    loss: Loss,
    steps: int = ...,
    schedule: ScheduleLike = ...,
    *,
    solver_order: int | None = ...,
    solver: str | Solver | None = ...,
    final: str = ...,
    return_info: Literal[True],
    **cond: Any,
) -> tuple[Tensor, dict[str, Tensor], AdjointInfo]: ...


def adjoint(
    den: Denoiser,
    x_T: Tensor,
    loss: Loss,
    steps: int = 10,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    solver_order: int | None = None,
    solver: str | Solver | None = None,
    final: str = "zero",
    return_info: bool = False,
    **cond: Any,
) -> tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict[str, Tensor], AdjointInfo]:
    """Sample ``den`` from ``x_T`` and return the sample with the gradients of ``loss`` of it, by AdjointDEIS
    (module docstring: the adjoint ODE, its order-``k`` discretization, memory and cost).

    Args:
        den: the :class:`~steerdiff.denoiser.Denoiser` (guided ones too; not one that draws noise itself).
        x_T: initial noise, as for :func:`~steerdiff.sampling.sample`.
        loss: ``loss(x_0) -> scalar tensor``, differentiable (a batch of losses: sum or average them).
        steps: number of steps ``N``.
        schedule: as ``sample``'s.
        solver_order: ``k`` = 1, 2 or 3 (default 2): the forward pass is ``sample`` with ``DEIS(order=k)``,
            the backward pass AdjointDEIS-``k``.
        solver: instead of ``solver_order``, the forward solver itself: ``"deis"`` or ``"ddim"``, or an
            instance of :class:`~steerdiff.solvers.deis.DEIS` (``variant="log_rho"``) or ``DDIM(eta=0)``.
            Stochastic solvers are refused (``ValueError``).
        final: as ``sample``'s (``"zero"``: the result is the denoised estimate at the last node).
        return_info: also return an :class:`AdjointInfo`.
        **cond: passed to the net on every call; the gradient is returned for each tensor among them that
            requires grad (``cond`` may be a non-leaf: continue with ``cond.backward(grads[name])``).

    Returns:
        ``(x_0, grads)``: the sample (``sample``'s result) and a dict with ``grads["x_T"] = dL/dx_T`` and
        ``grads[name] = dL/d cond[name]`` for the conditioning tensors that require grad; with ``return_info``
        also the :class:`AdjointInfo`.

    Raises:
        ValueError: bad arguments (the message names the argument and the accepted values), a stochastic
            solver, or a ``loss`` that does not return a finite scalar tensor differentiable in ``x_0``
            (with a finite gradient).
        NonFiniteError: the network returned NaN/inf, or a vector-Jacobian product through it was (the step
            named).
    """
    who = "adjoint"
    check_denoiser(who, "den", den)
    check_x_T(den, x_T, who)
    if not callable(loss):
        raise ValueError(f"{who}: loss must be a callable(x_0) -> scalar tensor, got {type(loss).__name__}")
    own = den.own_noise()
    if own:
        raise ValueError(
            f"{who}: den: {', '.join(name for name, _ in own)} draws noise, and the adjoint is that of the "
            "deterministic probability-flow ODE; pass a denoiser that does not"
        )
    check_sample_only(who, cond, SAMPLE_ONLY, "which samples the probability-flow ODE deterministically")
    if torch.is_inference_mode_enabled():
        raise ValueError(
            f"{who}: needs autograd for its vector-Jacobian products; call it outside inference_mode"
        )
    return_info = boolean(who, "return_info", return_info)
    slv, order = _forward_solver(solver, solver_order)
    _, grid, _ = plan(den, steps, slv, schedule, final, who)
    leaves = _grad_inputs(cond)

    work = work_dtype(x_T.dtype)
    last = [x_T.to(work)]  # the state at the last noisy node (x_{N-1} for final="zero")

    def keep(info: dict[str, Any]) -> None:
        if info["sigma"] > 0:
            last[0] = info["x"]

    detached: dict[str, Any] = {k: v.detach() if isinstance(v, Tensor) else v for k, v in cond.items()}
    with torch.no_grad():
        x_0, sinfo = sample_as(
            who, den, x_T, steps, slv, schedule, final=final, callback=keep, return_info=True, **detached
        )
    with torch.enable_grad():
        out = x_0.detach().requires_grad_(True)
        value = loss(out)
        if not isinstance(value, Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{who}: loss must return a scalar tensor (sum or average a batch), got {got}")
        if not value.requires_grad:
            raise ValueError(
                f"{who}: loss(x_0) does not depend on x_0 through autograd (detached or constant)"
            )
        if not math.isfinite(loss_value := float(value.detach())):
            raise ValueError(f"{who}: loss(x_0) is {loss_value}; a finite loss is needed for its gradient")
        (g,) = torch.autograd.grad(value.reshape(()), out, allow_unused=True)
    g = torch.zeros(x_0.shape, dtype=work, device=x_0.device) if g is None else g.to(work)
    if not bool(torch.isfinite(g).all()):
        raise ValueError(
            f"{who}: the gradient of loss at x_0 is not finite (NaN/inf); a finite one is needed"
        )

    model = Model(den, {**detached, **leaves}, net_dtype=x_T.dtype)
    rgrid = _noisy(grid).reversed()
    lower_final, max_h, max_h_ratio = _step_rule(slv)
    x = last[0].detach()
    pending = None  # an evaluation at x whose graph is still alive
    a_z = [torch.zeros_like(v) for v in leaves.values()]
    products = _Products()
    if grid.clean_end:  # the exact vector-Jacobian product of x0(x_{N-1}); its evaluation serves step 0 too
        with torch.enable_grad():
            x.requires_grad_(True)
            pending = model(x, rgrid.t[0], grid.steps - 1)
            a_x, *a_z = _vjp(pending.x0, x, leaves, g, retain=rgrid.steps > 0)
        products.add([a_x, *a_z], grid.steps - 1, rgrid.t[0])
        g = a_x
    b = rgrid.alpha[0] * g  # the adjoint of y = x / alpha
    hist: deque[tuple[float, Tensor, Tensor, list[Tensor]]] = deque(maxlen=order)  # newest first
    for k in range(rgrid.steps):
        with torch.enable_grad():
            if pending is None:
                x.requires_grad_(True)
                pending = model(x, rgrid.t[k], rgrid.steps - 1 - k)
            vx, *vz = _vjp(pending.eps, x, leaves, b, retain=False)
        products.add([vx, *vz], rgrid.steps - 1 - k, rgrid.t[k])
        hist.appendleft((rgrid.lam[k], pending.eps.detach(), -rgrid.alpha[k] * vx, [-v for v in vz]))
        pending = None
        q = step_order(k, rgrid, order, len(hist), lower_final, max_h, max_h_ratio)
        h = rgrid.h(k)
        w = exp_adams_bashforth([(hist[j][0] - rgrid.lam[k]) / h for j in range(q)], h)
        c_x, c_q = rgrid.sigma[k + 1] * h, rgrid.sigma[k + 1] / rgrid.alpha[k + 1] * h
        x = x.detach() * (rgrid.alpha[k + 1] / rgrid.alpha[k])
        for j in range(q):
            x = x.sub_(hist[j][1], alpha=c_x * w[j])
            b = b.sub(hist[j][2], alpha=c_q * w[j])
            a_z = [z.sub(e, alpha=c_q * w[j]) for z, e in zip(a_z, hist[j][3], strict=True)]
    model.check_finite()
    products.check()
    grads = {"x_T": (b / rgrid.alpha[-1]).to(x_T.dtype)}
    grads.update({name: z.to(cond[name].dtype) for name, z in zip(leaves, a_z, strict=True)})
    if return_info:
        vjps = grid.steps if grid.clean_end else rgrid.steps
        info = AdjointInfo(sinfo.nfe, model.nfe, vjps, grid, slv, x.detach().to(x_T.dtype))
        return x_0, grads, info
    return x_0, grads
