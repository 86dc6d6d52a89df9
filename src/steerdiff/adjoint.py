r"""Gradients through the sampler in memory independent of the number of steps: AdjointDEIS (Blasingame & Liu
2024, "AdjointDEIS: Efficient Gradients for Diffusion Models", NeurIPS 2024), the continuous adjoint equations
of the probability-flow ODE solved backwards alongside the state, with an integrating factor of the adjoint
(below) that keeps few steps accurate where the paper's form gave no gradient.

Given a scalar loss ``L(x_0)`` of the result of :func:`~steerdiff.sampling.sample` run from ``x_T``,
:func:`adjoint` returns ``dL/dx_T`` and ``dL/dz`` for the conditioning tensors ``z`` passed to the net
without keeping any step's autograd graph: autograd through ``sample`` (DRaFT-style) holds every step's graph
until the backward pass, ``O(N)`` in the steps ``N``; here one step's graph lives at a time.

**The adjoint ODE.** In the log-SNR ``lam = log(alpha / sigma)`` the probability-flow ODE in data
prediction is ``dx/dlam = (dlog sigma / dlam) x + alpha x0(x, z, lam)`` (Lu et al. 2022b; the noise form
``(dlog alpha / dlam) x - sigma eps`` is the same, as ``eps = (x - alpha x0) / sigma`` and ``dlog alpha / dlam
- dlog sigma / dlam = 1``). Its adjoint states ``a_x = dL/dx`` and ``a_z = dL/dz`` (the continuous adjoint
method, Chen et al. 2018, Eq. 4 and 51) solve, backwards from ``a_x = dL/dx_0``, ``a_z = 0`` at the last node,

    da_x/dlam = -(dlog sigma / dlam) a_x - alpha J^T a_x,      da_z/dlam = -alpha J_z^T a_x,

with ``J = d x0 / dx``, ``J_z = d x0 / dz``; ``dL/dx_T`` and ``dL/dz`` are their values at the first node.

**The integrating factor.** For any scalar ``phi(lam) > 0``, ``d = phi a_x`` solves
``dd/dlam = -(alpha J - rho I)^T d`` with ``rho = dlog phi / dlam - dlog sigma / dlam``: the scalar part
``rho`` is taken exactly and only the remainder ``alpha J - rho I`` is left to approximate. The paper's
choice, ``phi = alpha`` (its ``alpha a_x``; ``rho = 1``, remainder ``-sigma d eps / dx``, integrated against
``e^{-lam}`` with DEIS's weights), leaves ``-I`` at high noise, where ``x0`` tends to the data's mean and
``J`` to 0: there ``a_x`` is nearly constant (VP, flow) while ``alpha a_x`` and its integrand vary like
``e^{lam}`` and ``e^{2 lam}``, which a polynomial in ``lam`` fits badly over long steps (the OLD column
below); ``phi = sigma`` (the data form, ``rho = 0``) leaves ``I`` at low noise, where ``alpha J -> I``.
Here ``phi = sqrt(alpha^2 + sigma^2)``, whose ``rho`` (by ``dalpha/dlam = alpha (1 + dlog sigma / dlam)``)

    rho = alpha^2 / (alpha^2 + sigma^2)

is ``alpha J`` of unit-variance Gaussian data (``x0 = m + alpha (x - alpha m) / (alpha^2 + sigma^2)``), and
for any data the remainder vanishes at both ends (``alpha J -> 0`` at high noise, ``-> I`` at low). So

    dd/dlam = -E_d,   E_d = (alpha J - rho I)^T d,       da_z/dlam = -E_z,   E_z = (alpha / phi) J_z^T d,

with no exponential left, and ``dL/dx_T = d / phi`` at the first node. For data ``N(m, I)`` ``E_d = 0``: the
gradient ``(phi_N / phi_0) dL/dx_N`` is the flow map's exact one at any number of steps.

**The discretization.** The state is re-solved up the noise levels alongside the adjoints (a reversed grid,
``h = lam_{i+1} - lam_i < 0``) by DEIS's exponential Adams-Bashforth in ``lam``
(:class:`~steerdiff.solvers.deis.DEIS`, ``variant="log_rho"``; Zhang & Chen 2023), and the adjoints by
Adams-Bashforth in ``lam``, all three from the same evaluation at the node they leave: with the last ``k``
evaluations at ``lam_{i-j}``, ``theta_j = (lam_{i-j} - lam_i) / h``, and the weights of the ``theta_j``
``w_j`` = :func:`~steerdiff.solvers._poly.exp_adams_bashforth` and
``v_j`` = :func:`~steerdiff.solvers._poly.adams_bashforth`,

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} h sum_j w_j eps_{i-j},
    Q_{i+1} = Q_i - h sum_j v_j E_{Q, i-j}       (Q = d, a_z),

exact for ``E_Q`` polynomial of degree ``k - 1`` in ``lam``: order ``k``. The paper's AdjointDEIS-``k``
(``zblasingame/AdjointDEIS``, ``ode_single_step``) is this scheme with ``phi = alpha`` and DEIS's weights
for the adjoint too. The orders a step takes are DEIS's up the same grid (:func:`steerdiff.invert`: warm-up
at the first steps, ``lower_order_final`` below 15 steps, long steps up the grid at first order), so for
``k <= 2`` the re-solved state is ``invert(den, x, solver=DEIS(order=k))`` exactly, for a field without
jumps. Where ``den``'s field jumps (:meth:`~steerdiff.denoiser.Denoiser.breaks`: RF-Inversion's editing
window) ``invert`` (and the forward pass) restart DEIS's history after the step across the jump
(:func:`~steerdiff.sampling.crossings`); the backward pass keeps its Adams history there, so its state is
not ``invert``'s (a restart there was tried and did not make the gradient more accurate: the step across
the jump is first order either way and dominates the error).

**The start.** One step at first order (local error ``O(h^2)``) holds a method to second order, and at
``k = 3`` the warm-up's first step up, from the clean end, is one: under SD's betas, where the adjoint still
varies there, the backward pass was second order (slope 2.2 at 160-320 steps). So at ``k = 3`` step 0 is
taken twice: by the rule above, and again, once node 1 has been evaluated at the state it gave (the
evaluation and product step 1 needs anyway), from ``lam_0`` with the nodes ``theta = 1, 0`` (the
trapezoid, exponential for the state), ``Q_1 = Q_0 - (h / 2) (E_{Q,0} + E_{Q,1})``. Node 1's values, taken at
the first-order state, are ``O(h^2)`` off, which costs ``O(h^3)`` once: third order, at no extra evaluation
or product. The re-solved state is then no longer ``invert``'s, which keeps the first-order step and is
second order there (:mod:`steerdiff.inversion`): on the tests' Gaussian at 20 / 80 / 320 steps it lands
5.0e-4 / 2.3e-6 / 2.2e-8 from the exact inversion of the sample, ``invert`` with DEIS-3 7.3e-4 / 4.4e-5 /
2.6e-6.

The forward pass is ``sample`` with ``DEIS(order=k)`` (``"ddim"`` for ``k = 1``) on the same grid. The
backward pass converges at order ``k`` to the exact flow map's gradient at the sample the forward pass gave
(``A (x_0 - target)`` on the tests' Gaussian, order 3: slopes 3.1-3.3 at 40-320 steps under SD's betas,
``VP.linear``, flow and EDM); the forward pass's error reaches the gradient through ``dL/dx_0``, and DEIS-3's
own warm-up (its first step, at the noise end) holds sampling, autograd through it and so the adjoint to
second order under SD's betas, whose noise end (``lam = -2.7``) is not far enough out for it to vanish
(``tests/test_adjoint.py``). With ``final="zero"`` the last step returns
the denoised estimate ``x0(x_{N-1})``; its adjoint is the exact vector-Jacobian product of that estimate,
taken on the stored state ``x_{N-1}`` (the one state kept from the forward pass besides the result).

**Memory.** The nodes are recomputed, not stored: the backward pass holds the state, the adjoints and the
last ``k`` estimates of each (at ``k = 3`` also step 0's start, until step 1), and one evaluation's graph at a
time (freed by its vector-Jacobian product), whatever the number of steps. The re-solved state drifts from
the forward trajectory by the solver's error (``AdjointInfo.x_T_resolved`` is where it lands; the authors'
released code caches the forward nodes instead, their Appendix F.1).

**Cost.** Forward: ``sample``'s NFE (``N``). Backward: one evaluation and one vector-Jacobian product (of
``x0``, for ``x`` and ``z`` together) per node it leaves, ``N`` each with ``final="none"``; with
``final="zero"`` the evaluation at ``x_{N-1}`` serves both the clean step's product and the first backward
step's, so ``max(N - 1, 1)`` evaluations and ``N`` products (times ``den.cost`` for guided denoisers). A
product costs about two evaluations (one backward pass through the net).

**Accuracy.** Relative error of ``dL/dx_T`` at 20 / 80 / 320 ``logsnr_uniform`` steps, OLD (``phi = alpha``
with DEIS's weights, this module until this change) against NEW (the above). 8-d mixture of the tests,
``final="zero"``, against autograd through the same run (``ag``: autograd's own distance to the exact
gradient, taken as autograd through 1,500 steps of DEIS-3):

    process k | OLD                      | NEW                      | ag
    VP      1 | 0.36 / 9.5e-2 / 2.4e-2   | 5.2e-2 / 9.6e-3 / 2.5e-3 | 0.13 / 1.4e-2 / 6.3e-3
    VP      2 | 0.27 / 1.8e-2 / 1.2e-3   | 3.5e-2 / 3.6e-3 / 2.5e-4 | 3.7e-2 / 1.9e-3 / 1.3e-4
    VP      3 | 0.25 / 2.5e-3 / 3.8e-5   | 2.7e-2 / 8.8e-4 / 1.8e-5 | 1.4e-2 / 3.1e-4 / 3.6e-5
    flow    1 | 1.0 / 0.55 / 0.15        | 0.21 / 4.1e-2 / 8.1e-3   | 0.42 / 4.8e-2 / 6.1e-3
    flow    2 | 4.6e3 / 0.41 / 2.0e-2    | 0.14 / 1.8e-2 / 1.5e-3   | 0.14 / 2.6e-2 / 2.3e-3
    flow    3 | 6.8e5 / 7.7e-2 / 8.1e-4  | 0.12 / 9.2e-3 / 1.9e-4   | 2.1e-2 / 1.1e-2 / 2.1e-4
    EDM     1 | 0.93 / 0.17 / 3.7e-2     | 0.16 / 3.6e-2 / 8.1e-3   | 0.51 / 0.14 / 3.2e-2
    EDM     2 | 4.8 / 0.13 / 7.5e-3      | 0.12 / 1.6e-2 / 1.2e-3   | 0.24 / 5.8e-3 / 1.6e-4
    EDM     3 | 2.2e2 / 8.0e-3 / 1.2e-4  | 0.12 / 5.9e-3 / 1.1e-4   | 9.2e-2 / 9.1e-4 / 1.4e-5

Against the exact gradient NEW is as close as OLD or closer in every cell (at 20 steps flow order 2 3.0e-2
against 4.0e3, EDM order 2 0.15 against 3.4). On the Gaussian oracle of the tests (``N(m, diag(0.3, 1.5,
0.05))``, ``final="none"``), against the exact flow map's gradient:

    process k | autograd                 | OLD                      | NEW
    VP      1 | 0.11 / 2.8e-2 / 7.1e-3   | 0.59 / 0.16 / 4.1e-2     | 5.8e-2 / 1.5e-2 / 3.7e-3
    VP      2 | 1.4e-2 / 9.2e-4 / 5.8e-5 | 0.34 / 1.6e-2 / 9.6e-4   | 7.0e-3 / 4.7e-4 / 3.0e-5
    VP      3 | 1.2e-3 / 3.4e-5 / 1.8e-6 | 0.16 / 1.7e-3 / 2.4e-5   | 1.4e-3 / 2.1e-5 / 8.7e-7
    flow    1 | 0.22 / 6.2e-2 / 1.6e-2   | 1.0 / 0.73 / 0.25        | 0.13 / 3.2e-2 / 8.0e-3
    flow    2 | 6.0e-2 / 4.4e-3 / 2.9e-4 | 9.5e2 / 0.39 / 1.9e-2    | 3.0e-2 / 2.2e-3 / 1.4e-4
    flow    3 | 1.0e-2 / 6.2e-5 / 2.6e-7 | 6.2e5 / 0.11 / 1.4e-3    | 1.5e-2 / 1.6e-4 / 2.0e-6
    EDM     1 | 0.18 / 4.8e-2 / 1.2e-2   | 0.99 / 0.43 / 0.12       | 9.7e-2 / 2.5e-2 / 6.2e-3
    EDM     2 | 3.7e-2 / 2.6e-3 / 1.7e-4 | 3.8 / 0.11 / 5.9e-3      | 1.9e-2 / 1.3e-3 / 8.5e-5
    EDM     3 | 4.3e-3 / 2.5e-5 / 2.7e-7 | 1.0e2 / 2.4e-2 / 3.1e-4  | 6.9e-3 / 6.9e-5 / 8.8e-7

(NEW at order 3 includes the start above; without it VP 3 was 2.7e-2 / 8.5e-4 / 1.6e-5 from autograd on the
mixture and 2.0e-3 / 4.5e-5 / 2.0e-6 on the Gaussian.) So the adjoint, the gradient of the flow map rather
than of the discrete sampler (the two differ by the sampler's error, the ``ag`` column), is about as close to
the exact gradient as autograd through the same run at orders 1 and 2 (closer on the Gaussian and at few
steps), and further under EDM at order 2 from 80 steps (on the mixture 0.15 / 1.0e-2 / 1.1e-3 from the exact
gradient, autograd 0.24 / 5.8e-3 / 1.6e-4) and at order 3 from 80 steps under flow and EDM, up to 10x, where
autograd through DEIS-3 converges faster than third order and the adjoint at it (the Gaussian under flow at
80 / 160 / 320 steps: autograd 6.2e-5 / 4.0e-6 / 2.6e-7, slope 3.9, the adjoint 1.6e-4 / 1.7e-5 / 2.0e-6,
slope 3.2; the mixture under EDM at 320 steps: 1.3e-4 against 1.4e-5). Under SD's betas the forward pass's
error holds both to second order: on the Gaussian the adjoint is the closer (3.9e-6 / 8.7e-7 at 160 / 320
steps, autograd 7.6e-6 / 1.8e-6), on the mixture up to 4x further (1.2e-3 / 5.4e-5 at 80 / 320, autograd
3.1e-4 / 3.6e-5). ``python -m tests.test_adjoint`` prints the order-3 numbers. ``phi`` assumes data of about
unit variance (the usual scaling); data of another variance leaves a larger remainder in mid-noise, still 0 at
both ends: on the mixture,
``phi = sqrt(alpha^2 v + sigma^2)`` with ``v = 0.3`` or ``3`` stayed below OLD against autograd in every cell
at 20 / 80 steps but one (EDM order 3 at 80, ``v = 3``: 8.4e-3 against 8.0e-3;
flow order 2 at 20: 6.1e-2 and 0.31).

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
from .solvers._poly import adams_bashforth, exp_adams_bashforth
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


Entry = tuple[float, Tensor, Tensor, list[Tensor]]  # (lam, eps, E_d, E_z) at a node the backward pass left


def _advance(
    rgrid: Grid, k: int, nodes: list[float], entries: list[Entry], x: Tensor, d: Tensor, a_z: list[Tensor]
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Step ``k`` of the backward pass from ``(x, d, a_z)`` at ``lam_k``: the state by DEIS's exponential
    weights, the adjoints by Adams' weights, both of the ``entries`` at ``nodes`` (in units of ``h``)."""
    h = rgrid.h(k)
    w, ab = exp_adams_bashforth(nodes, h), adams_bashforth(nodes)
    c_x = rgrid.sigma[k + 1] * h
    x = x * (rgrid.alpha[k + 1] / rgrid.alpha[k])
    for j, (_, eps, e_d, e_z) in enumerate(entries):
        x = x.sub(eps, alpha=c_x * w[j])
        d = d.sub(e_d, alpha=h * ab[j])
        a_z = [z.sub(e, alpha=h * ab[j]) for z, e in zip(a_z, e_z, strict=True)]
    return x, d, a_z


@overload
def adjoint(
    den: Denoiser,
    x_T: Tensor,
    loss: Loss,
    steps: int | None = ...,
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
    steps: int | None = ...,
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
    steps: int | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    solver_order: int | None = None,
    solver: str | Solver | None = None,
    final: str = "zero",
    return_info: bool = False,
    **cond: Any,
) -> tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict[str, Tensor], AdjointInfo]:
    """Sample ``den`` from ``x_T`` and return the sample with the gradients of ``loss`` of it, by AdjointDEIS
    (module docstring: the adjoint ODE, its integrating factor, the order-``k`` discretization, memory, cost).

    Args:
        den: the :class:`~steerdiff.denoiser.Denoiser` (guided ones too, not one that draws noise itself;
            gradient guidance such as DPS differentiates its own gradient in the backward evaluations, a
            second-order graph: :func:`~steerdiff.guidance.grad_on`).
        x_T: initial noise, as for :func:`~steerdiff.sampling.sample`.
        loss: ``loss(x_0) -> scalar tensor``, differentiable (a batch of losses: sum or average them).
        steps: number of steps ``N``; default (``None``) 10, or the explicit grid's count (as ``sample``'s).
        schedule: as ``sample``'s.
        solver_order: ``k`` = 1, 2 or 3 (default 2): the forward pass is ``sample`` with ``DEIS(order=k)``,
            the backward pass the adjoint of order ``k``.
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
            f"{who}: den: {', '.join(dict.fromkeys(name for name, _ in own))} draws noise, and the "
            "adjoint is that of the deterministic probability-flow ODE; pass a denoiser that does not"
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
        unused = f"{who}: loss(x_0) does not depend on x_0 through autograd"
        if not value.requires_grad:
            raise ValueError(f"{unused} (detached or constant)")
        if not math.isfinite(loss_value := float(value.detach())):
            raise ValueError(f"{who}: loss(x_0) is {loss_value}; a finite loss is needed for its gradient")
        (g,) = torch.autograd.grad(value.reshape(()), out, allow_unused=True)
    if g is None:  # it requires grad through other tensors only (a reward net's parameters)
        raise ValueError(f"{unused}, only through other tensors (x_0 detached inside it?)")
    g = g.to(work)
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
    phi = [math.hypot(a, s) for a, s in zip(rgrid.alpha, rgrid.sigma, strict=True)]
    d = phi[0] * g  # phi a_x: the adjoint of x / phi
    hist: deque[Entry] = deque(maxlen=order)  # newest first
    # order 3: step 0, taken first by Euler, is taken again by the trapezoid once node 1 is evaluated
    # (module docstring: the start)
    start: tuple[Tensor, Tensor, list[Tensor]] | None = None
    for k in range(rgrid.steps):
        a, rho = rgrid.alpha[k], (rgrid.alpha[k] / phi[k]) ** 2
        with torch.enable_grad():
            if pending is None:
                x.requires_grad_(True)
                pending = model(x, rgrid.t[k], rgrid.steps - 1 - k)
            vx, *vz = _vjp(pending.x0, x, leaves, a * d, retain=False)  # alpha (d x0 / d(x, z))^T d
        products.add([vx, *vz], rgrid.steps - 1 - k, rgrid.t[k])
        e_z = [v / phi[k] for v in vz]
        hist.appendleft((rgrid.lam[k], pending.eps.detach(), vx.sub_(d, alpha=rho), e_z))
        pending = None
        if start is not None:  # the trapezoid over step 0: nodes lam_1 (at the predicted state) and lam_0
            x, d, a_z = _advance(rgrid, 0, [1.0, 0.0], [hist[0], hist[1]], *start)
            start = None
        q = step_order(k, rgrid, order, len(hist), lower_final, max_h, max_h_ratio)
        if k == 0 and order == 3 and rgrid.steps > 1:
            start = (x.detach(), d, a_z)
        nodes = [(hist[j][0] - rgrid.lam[k]) / rgrid.h(k) for j in range(q)]
        x, d, a_z = _advance(rgrid, k, nodes, [hist[j] for j in range(q)], x.detach(), d, a_z)
    model.check_finite()
    products.check()
    grads = {"x_T": (d / phi[-1]).to(x_T.dtype)}
    grads.update({name: z.to(cond[name].dtype) for name, z in zip(leaves, a_z, strict=True)})
    if return_info:
        vjps = grid.steps if grid.clean_end else rgrid.steps
        info = AdjointInfo(sinfo.nfe, model.nfe, vjps, grid, slv, x.detach().to(x_T.dtype))
        return x_0, grads, info
    return x_0, grads
