r"""Approximation-free diffusion posterior sampler (AFDPS; Chen, Ren, Min, Ying & Izzo 2025, "Solving
Inverse Problems via Diffusion-Based Priors: An Approximation-Free Ensemble Sampling Approach",
arXiv:2506.03979), its SDE variant.

Target: the posterior ``p(x | y) ∝ p(x) exp(-mu_y(x))`` of a diffusion prior under a linear-Gaussian
observation ``y = A x + s n``, ``mu_y(x) = |A x - y|^2 / (2 s^2) + (m/2) log(2 pi s^2)``. In generation time
``tau`` (noise to data) the prior's marginals ``p_tau`` solve the Fokker-Planck equation of the reverse
process with any diffusion level ``V``,

    d_tau p = -div(c p) + V^2/2 Lap p,     c = -F x + (G^2 + V^2)/2 grad log p_tau,

(``F``, ``G`` the forward drift and diffusion coefficients; ``V = G`` the reverse SDE). The paper follows the
*unnormalized posterior along the diffusion*, ``Q(x, tau) = p_tau(x) exp(-mu_y(x))``: substituting
``p = Q exp(mu_y)`` gives the modified PDE

    d_tau Q = -div((c - V^2 grad mu_y) Q) + V^2/2 Lap Q + R Q,
    R(x, tau) = -c . grad mu_y + V^2/2 (|grad mu_y|^2 - Lap mu_y),

a drift moved along the likelihood and a reweighting (reaction) term ``R``, so that weighted particles
moving by ``dX = (c - V^2 grad mu_y) dtau + V dW`` with ``d log w = R(X, tau) dtau`` represent ``Q``
(Feynman-Kac); at the data end ``Q ∝ p(x | y)`` and the mean weight estimates the evidence. Only the
pre-trained score (in ``c``) and the likelihood enter: no approximation of ``p(y | x_t)``. (The retrieved
text of the paper gives the drift of the modified PDE; ``R`` is derived here from the substitution above.)

Discretization (ours, on the library's stochastic solvers): the solver's Gaussian step from node ``i``,
``N(m_i, std_i^2)``, is the prior's reverse process over the step, so ``c dtau = m_i - x_i`` and ``V^2 dtau =
std_i^2``. The particles are drawn from ``N(m_i - std_i^2 grad mu_y(x_i), std_i^2)`` and the step's weight is
``R dtau`` at its left end (Euler),

    log G_{i+1} = -(m_i - x_i) . grad mu_y(x_i) + std_i^2/2 (|grad mu_y(x_i)|^2 - tr(A^T A) / s^2)

(``std_i`` per entry: ``sum_j std_ij^2 (grad_j^2 - (A^T A)_jj / s^2) / 2``), resampling where the ESS falls
below ``ess_threshold N``. The start ``Q(., tau_0) = N(0, v_0 I) exp(-mu_y)`` (``v_0 = alpha_0^2 +
sigma_0^2``, the prior's noise, as every sampler takes it) is Gaussian and drawn exactly (the paper's first
stage), by Matheron's rule ``x = z + v_0 A^T C^{-1} (y - A z - s n)``, ``z ~ N(0, v_0 I)``,
``C = v_0 A A^T + s^2 I``; its mass ``log Q_0 = log N(y; 0, C)`` is the first node's increment, so the
engine's ``log Z`` estimates ``log p(y)``. With ``final="zero"`` the last, deterministic step to the denoised
estimate gets ``std = 0``: its weight is ``-(x0_hat - x) . grad mu_y(x)``.

The weight errors are ``O(step)``: the method is consistent as the steps and then the particles grow, with
the bias of an Euler quadrature of ``R`` at a fixed grid. (The exact weight of the discrete chain,
``mu_y(x_i) - mu_y(x_{i+1}) + log p(x_{i+1} | x_i) / q(x_{i+1} | x_i)``, has ``R dtau`` as its mean to first
order: that is :func:`~steerdiff.smc.tds` with the noise-conditional twist ``log N(y; A x_t, s^2 I)``.)
``log Z``'s spread over independent runs falls more slowly than ``N^{-1/2}``, with a right tail: the weights
of ``Q_tau``, where the likelihood acts on the noisy state, are heavy-tailed (``python bench/smc_log_z.py``:
3-d Gaussian prior, one observation, 100 ER-SDE steps, 128 rows; at ``N`` = 64 / 256 / 1024 the rows' SD of
``log Z_hat - log p(y)`` is 0.46 / 0.39 / 0.32, the median error 0.33 / 0.22 / 0.11, the largest +2.0 / +2.6 /
+2.1; TDS with the noise-conditional twist, the same ``Q_tau`` with exact weights, 0.50 / 0.31 / 0.27, and
TDS's linear-Gaussian twist 0.056 / 0.029 / 0.015). The Euler weights' bias shows in the mean: ``log Z_hat -
log p(y)`` -0.109 / -0.023 / +0.069 +- 0.03-0.04, rising past 0 at 1024 (an unbiased ``Z_hat`` keeps
``E[log Z_hat] <= log p(y)``: TDS's noise-conditional twist -0.24 / -0.13 / -0.06), ``E[Z_hat] / p(y) - 1``
+0.16 +- 0.07 at 1024.
``A`` enters through ``forward`` and ``adjoint`` during the run; ``tr(A^T A)``, its diagonal and the start's
Gaussian algebra come from the SVD of its dense ``(m, d)`` matrix, formed once (``d`` applications of ``A``:
an operator of moderate size).

NFE per batch row: ``steps * particles`` times the denoiser's ``cost`` (2 for a guiding CFG): the solver's one
evaluation per particle and step; the likelihood's gradient is ``A^T (A x - y) / s^2``, no network and no
backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import schedules as _schedules
from .._checks import choice, device_or_none, integer, real, sample_dtype
from ..denoiser import Denoiser, check_denoiser
from ..distributed.group import spread_run
from ..inverse.operators import LinearOperator
from ..noise import Generators, check_generators, randn
from ..schedules import ScheduleLike
from ..solvers.base import FINALS, Solver, Transition, make_grid
from . import resample as _resample
from .particles import (
    DEFAULT_SCHEDULE,
    DEFAULT_SOLVER,
    Particles,
    SMCAlgorithm,
    StepContext,
    _check_shape,
    refuse_x_T,
    run_smc,
)

__all__ = ["AFDPS", "afdps"]

F64 = torch.float64


class _Observation:
    """``y = A x + s n`` for a run: the likelihood's gradient at the particles and the Gaussian algebra of the
    start, from the thin SVD ``A = U diag(sv) V^T`` of the dense matrix (float64).

    ``y``: ``(batch, *shape_out)`` (one per batch row)."""

    def __init__(self, operator: LinearOperator, y: Tensor, s: float) -> None:
        self.operator, self.y, self.s2 = operator, y, s * s
        dense = operator.to_dense(F64, y.device)  # (m, d)
        self.dense = dense
        self.u, self.sv, _ = torch.linalg.svd(dense, full_matrices=False)
        # the Hessian of mu_y is A^T A / s^2: its diagonal (per-entry stds) and trace
        self.hess_diag = (dense * dense).sum(0).reshape(operator.shape_in) / self.s2
        self.hess_trace = float((self.sv * self.sv).sum()) / self.s2
        self.curvature = float(self.sv.max()) ** 2 / self.s2  # the largest eigenvalue of A^T A / s^2

    def grad(self, x: Tensor) -> Tensor:
        """``grad mu_y = A^T (A x - y) / s^2`` at ``x`` ``(batch, particles, *shape)``."""
        batch, n = x.shape[:2]
        ax = self.operator.forward(x.flatten(0, 1)).unflatten(0, (batch, n))
        r = (ax - self.y[:, None].to(ax)) / self.s2
        return self.operator.adjoint(r.flatten(0, 1)).unflatten(0, (batch, n))

    def _c_inv(self, r: Tensor, v0: float) -> Tensor:
        """``(v0 A A^T + s^2 I)^{-1} r`` for rows ``r`` ``(k, m)`` (float64)."""
        coef = r @ self.u
        return (coef / (v0 * self.sv**2 + self.s2)) @ self.u.T + (r - coef @ self.u.T) / self.s2

    def start(self, z: Tensor, n: Tensor, v0: float) -> Tensor:
        """Exact draws of ``N(0, v0 I) exp(-mu_y)`` from standard normal ``z`` ``(batch, N, *shape)`` and
        ``n`` ``(batch, N, *shape_out)`` (Matheron's rule, module docstring), in ``z``'s dtype."""
        x = math.sqrt(v0) * z.flatten(2).to(F64)  # (batch, N, d)
        resid = self.y.flatten(1)[:, None] - x @ self.dense.T - math.sqrt(self.s2) * n.flatten(2).to(F64)
        x = x + v0 * self._c_inv(resid, v0) @ self.dense
        return x.reshape(z.shape).to(z.dtype)

    def log_mass(self, v0: float) -> Tensor:
        """``log N(y; 0, v0 A A^T + s^2 I)`` per batch row ``(batch,)``: the start's normalizer."""
        y = self.y.flatten(1)
        m, k = y.shape[1], self.sv.shape[0]
        logdet = torch.log(v0 * self.sv**2 + self.s2).sum() + (m - k) * math.log(self.s2)
        quad = (y * self._c_inv(y, v0)).sum(-1)
        return -0.5 * (quad + logdet + m * math.log(2 * math.pi))


class AFDPS(SMCAlgorithm):
    """AFDPS as engine hooks (module docstring): the likelihood-moved proposal and the Euler weights of the
    reweighting term ``R``; the first node's increment is the start's mass ``log N(y; 0, C)``.

    Args:
        observation: the run's ``y = A x + s n`` (:class:`_Observation`).
        log_mass: ``(batch,)`` the start's ``log N(y; 0, v_0 A A^T + s^2 I)`` per batch row.
    """

    name = "afdps"
    needs_transition = True

    def __init__(self, observation: _Observation, log_mass: Tensor) -> None:
        self.obs, self.log_mass = observation, log_mass
        # (node, t, each particle's max std (batch, particles)) of the steps whose std is a tensor: gathered
        # over the ranks and read on the host once, at the last node
        self._tops: list[tuple[int, float, Tensor]] = []

    def init_state(self, x: Tensor) -> dict[str, Tensor]:
        """``grad``: ``grad mu_y`` at the particle's node (the proposal's shift and the next weight)."""
        return {"grad": torch.zeros_like(x)}

    def log_weight(self, ctx: StepContext) -> Tensor:
        s, x = ctx.state, ctx.x
        base, x_prev = ctx.base_prev, ctx.x_prev
        if base is None or x_prev is None:  # node 0: the start's mass, the same for every particle
            inc = self.log_mass.to(x.device)[:, None].expand(x.shape[:2])
        else:
            g = s["grad"]
            inc = -((base.mean - x_prev) * g).flatten(2).sum(-1, dtype=F64)
            std = base.std
            if isinstance(std, Tensor):
                var = torch.broadcast_to(std * std, g.shape)
                inc = inc + 0.5 * (var * (g * g - self.obs.hess_diag.to(g))).flatten(2).sum(-1, dtype=F64)
            elif std > 0:
                sq = (g * g).flatten(2).sum(-1, dtype=F64)
                inc = inc + 0.5 * std * std * (sq - self.obs.hess_trace)
        if not ctx.final:
            s["grad"] = self.obs.grad(x)
        elif self._tops:  # the run's per-entry maxima, read once and cleared (the instance may run again)
            kept, self._tops = self._tops, []
            # every rank's particles' (a collective: each rank has kept the same steps), so that every rank
            # refuses a step that one rank's particles make too noisy, as one process does, together
            mine = torch.stack([top for _, _, top in kept], dim=-1)  # (batch, particles, steps kept)
            tops = ctx.gather(mine, last=True).amax((0, 1)).tolist()
            for (i, t, _), top in zip(kept, tops, strict=True):
                self._check(ctx.grid.steps, i, t, top)
        return inc

    def _check(self, steps: int, i: int, t: float, top: float) -> None:
        """Refuse the step from node ``i`` if its largest ``std`` has ``std^2 |A|^2 / s^2 >= 1``."""
        ratio = top * top * self.obs.curvature
        if ratio >= 1:
            raise ValueError(
                f"afdps: steps={steps}: the step from node {i} (t = {t:.4g}) has std^2 |A|^2 / "
                f"s^2 = {ratio:.3g} >= 1: along A's top singular direction its weight "
                "exp(std^2 |grad mu_y|^2 / 2 - ...) has no finite mean under the likelihood (at >= 2 the "
                "explicit drift -std^2 grad mu_y also overshoots and the particles diverge). A step's std^2 "
                "falls about as 1 / steps, and the largest ratio may come at a later node: pass steps >= "
                f"{math.ceil(2 * steps * ratio)} (accurate weights need several times that: their error per "
                "step is second order in this ratio), or a schedule or solver with less noise per step at "
                "high noise"
            )

    def propose(self, ctx: StepContext, base: Transition) -> Transition:
        std = base.std
        if isinstance(std, float | int) and std == 0:  # a deterministic step: nothing to move
            return base
        if isinstance(std, Tensor):  # per entry: its maxima read at the last node (no device sync per step)
            top = torch.broadcast_to(std.detach(), base.mean.shape).flatten(2).amax(-1)  # (batch, particles)
            self._tops.append((ctx.i, ctx.t, top))
        else:
            self._check(ctx.grid.steps, ctx.i, ctx.t, std)
        return Transition(base.mean - std**2 * ctx.state["grad"].to(base.mean.dtype), std)


def _observations(operator: Any, y: Any, sample_shape: tuple[int, ...], batch: int) -> Tensor:
    """``y`` checked against ``operator`` and the samples, as ``(batch, *shape_out)`` float64."""
    if not isinstance(operator, LinearOperator):
        raise ValueError(
            f"afdps: operator must be a steerdiff.inverse.LinearOperator, got {type(operator).__name__}"
        )
    if tuple(operator.shape_in) != sample_shape:
        raise ValueError(
            f"afdps: operator acts on samples of shape {tuple(operator.shape_in)}, shape has samples of "
            f"shape {sample_shape}"
        )
    out = tuple(operator.shape_out)
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise ValueError(f"afdps: y must be a floating-point torch.Tensor, got {type(y).__name__}")
    if tuple(y.shape) == out:
        y = y.expand(batch, *out)
    elif tuple(y.shape) != (batch, *out):
        raise ValueError(
            f"afdps: y must have shape {out} (one observation) or (batch, *{out}) = {(batch, *out)}, got "
            f"{tuple(y.shape)}"
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError("afdps: y contains NaN or inf")
    return y.detach().to(F64)


@spread_run
def afdps(
    den: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    /,
    *,
    noise_std: float | None = None,
    shape: tuple[int, ...],
    particles: int = 16,
    steps: int | None = None,
    ess_threshold: float = 0.5,
    resampler: str | _resample.Resampler = "systematic",
    solver: str | Solver = DEFAULT_SOLVER,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    max_batch: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: Generators = None,
    progress: bool = False,
    **cond: Any,
) -> Particles:
    """AFDPS (Chen et al. 2025): ``particles`` weighted samples per batch row of ``p(x | y)`` for ``y = A x +
    s n``, from the prior's denoiser alone (see the module docstring).

    ``den``, ``operator`` and ``y`` are positional-only, so that ``**cond`` may hold any name (a class label
    ``y=`` for the net).

    Args:
        den: the prior's denoiser (no gradient through it is taken).
        operator: a :class:`~steerdiff.inverse.LinearOperator` on the sample shape (its dense matrix is formed
            once). ``y``: one observation (``operator.shape_out``, shared by all rows) or one per batch row
            (``(batch, *shape_out)``). ``noise_std``: ``s > 0`` (``None``: ``operator.noise_std``).
        shape: ``(batch, *sample_shape)``. ``particles``: ``N >= 1`` per row. ``steps``: solver steps
            (``None``: 100, or an explicit grid's count: :func:`~steerdiff.smc.run_smc`).
        ess_threshold: resample a row when ``ESS < ess_threshold * N``.
        solver: a stochastic solver with Gaussian steps (``ddpm``, the default, is the reverse SDE, ``V = G``;
            one adding less noise, such as ``er_sde`` or ``DDIM(eta < 1)``, is the same PDE with a smaller
            ``V``: less likelihood drift, more reweighting). A step with ``std^2 |A|^2 / s^2 >= 1`` is refused
            (``ValueError``): at once for a scalar ``std``; for one given per entry (DDPM's learned variance),
            whose maximum lives on the device, after the run, its maxima read once at the last node (with
            ``group=``, over every rank's particles, gathered there: every rank refuses the step that one
            rank's particles make too noisy, with one process's message).
        resampler, schedule, final, max_batch, dtype, device, generator, progress, cond: see
            :func:`~steerdiff.smc.run_smc` (``max_batch`` bounds the denoiser's calls; ``A`` sees all rows at
            once). The start is drawn from ``generator`` first (``z``, then ``n``), then the run. ``group=``
            (in ``cond``) spreads the particles over ranks as run_smc's does; an argument refused on some
            ranks alone is raised by every rank (:meth:`~steerdiff.distributed.Ranks.start`).

    Returns:
        :class:`~steerdiff.smc.Particles` with normalized ``log_w``, ``nfe = steps * particles`` (times
        ``den.cost``) and the ``trace``, whose final ``log_z`` estimates the evidence ``log p(y)`` (of the
        prior the sampler draws).

    Example:
        >>> out = sd.smc.afdps(den, sd.inverse.Matrix(A), y, noise_std=0.1, shape=(4, 16), generator=g)
        >>> x = out.sample(generator=g)   # (4, 16), one posterior draw per batch row
    """
    check_denoiser("afdps", "den", den)
    refuse_x_T("afdps", cond, "exact draws of N(0, v0 I) exp(-mu_y), the start its weights assume")
    batch, *rest = _check_shape(shape, "afdps")
    sample_shape = tuple(rest)
    n_part = integer("afdps", "particles", particles, lo=1)
    check_generators("afdps", generator, batch)
    y = _observations(operator, y, sample_shape, batch)
    s = real("afdps", "noise_std", operator.noise_std if noise_std is None else noise_std, lo=0, lo_open=True)
    dtype = None if dtype is None else sample_dtype("afdps", "dtype", dtype)
    device = device_or_none("afdps", "device", device)
    final = choice("afdps", "final", final, FINALS)
    grid = make_grid(den.process, _schedules.get(schedule, "afdps"), steps, final, who="afdps", default=100)
    v0 = grid.alpha[0] ** 2 + grid.sigma[0] ** 2
    z = randn((batch, n_part, *sample_shape), generator, dtype, device)
    n = randn((batch, n_part, *operator.shape_out), generator, dtype, device)
    obs = _Observation(operator, y.to(z.device), s)  # the run's device: device=, else where z is drawn
    x_T = obs.start(z, n, v0)
    return run_smc(
        den, AFDPS(obs, obs.log_mass(v0)), (batch, *sample_shape), particles=n_part, steps=grid.steps,
        solver=solver, schedule=schedule, final=final, ess_threshold=ess_threshold, resampler=resampler,
        max_batch=max_batch, x_T=x_T, generator=generator, progress=progress, **cond,
    )  # fmt: skip
