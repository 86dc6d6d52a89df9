r"""Ψ-Sampler (Yoon, Min, Yeo & Sung 2025, "Ψ-Sampler: Initial Particle Sampling for SMC-Based
Inference-Time Reward Alignment in Score Models"): FK steering whose initial particles are drawn from the
reward-aware posterior at the first node instead of the Gaussian prior.

Target, as :func:`~steerdiff.smc.fk_steering`'s: ``p_S(x) exp(lam r(x)) / Z`` for the base sampler's output
law ``p_S``. With ``r_0(x_T) = r(x0_hat(x_T))``, the reward of the denoiser's estimate at the first grid node
``t_0`` (Tweedie's ``E[x_0 | x_T]``), the initial particles are drawn from the twisted prior

    pi_T(x_T) ∝ N(x_T; 0, s^2 I) exp(lam r_0(x_T)),      s = sqrt(alpha_0^2 + sigma_0^2)  (1 for VP),

by preconditioned Crank-Nicolson Langevin chains (:class:`~steerdiff.mcmc.PCNL` with reference ``N(0, s^2
I)`` and ``Phi = lam r_0``, whose gradient is taken through the denoiser: ``r`` must be differentiable), and
then follow FK steering's ``difference`` potentials ``G_k = exp(lam (r_k - r_{k-1}))`` and its final
correction, with ``r_{-1} := r_0`` where FK steering has ``0``: the node-0 factor ``exp(lam r_0)`` is in the
initial law, so the node-0 weight is 1 (no reweighting, no resampling there). Every path's weight is then
``exp(lam (r(x_S) - r_0(x_T)))``, and ``pi_T(x_T) x base path x weight ∝ N(x_T; 0, s^2 I) x base path x
exp(lam r(x_S))``: with exact draws of ``pi_T`` the weighted particles target ``p_S exp(lam r) / Z`` exactly.
The chains' finite length is a bias the weights do not correct (the paper's, too).

Against the authors' code (KAIST-Visual-AI-Group/Psi-Sampler, ``src/runner.py``, ``src/mcmc.py``): its SMC
moves the particles with the reward-gradient-shifted proposal (mean ``+ sigma^2 lam grad r``, weighted by the
base-over-proposal ratio, as TDS), where this one keeps the base sampler's transitions (FK steering's); its
``init_weight_method="reward"`` (the default) weights node 0 by ``exp(lam r_0)`` again on top of the chains'
draws, double counting the factor ``pi_T`` holds (its ``"original"`` gives 1, as here); its pCNL step
``delta'`` (``rho = (1 - delta'/4) / (1 + delta'/4)``, MALA's convention) is ``2 step_size`` here (Cotter et
al.'s ``delta``, :class:`~steerdiff.mcmc.PCNL`): its ``step_size: 0.5`` is ``step_size=0.25``.

``log_z`` of the result estimates ``log E_{p_S}[exp(lam r)] - log E_{N(0, s^2 I)}[exp(lam r_0)]`` (the SMC
estimate of the normalizer relative to ``pi_T``'s, which the chains do not give): not ``log Z`` itself.

Chains (reconstructed, not taken from the paper: its burn-in, thinning and number of chains are not
reproduced here): one independent chain per particle, started at a prior draw (or at ``x_T``), run for
``mcmc_steps`` moves of step ``step_size``; its last state is the particle. The particles are then
independent, so no thinning is needed, and ``mcmc_steps`` is the burn-in. The defaults (25 moves of ``delta
= 0.2``) are not tuned; :func:`twisted_prior` returns the chains' acceptance rates.

NFE per batch row: the SMC run's (``steps * particles`` for DDPM) plus the chains', ``(mcmc_steps + 1) *
particles`` (a value and gradient of ``r_0`` per move and one at the start, each one network evaluation per
particle with a backward pass through it, counted as TDS counts its twists' gradients; a guided denoiser's
``cost`` per call; none at ``lam = 0``, where ``pi_T`` is the prior).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .. import solvers as _solvers
from .._checks import boolean, choice, device_or_none, integer, real, sample_dtype
from ..denoiser import Denoiser, check_denoiser, check_sample_shape
from ..mcmc.base import ChainInfo, MoveGuard, Point, Target, _value_and_grad, chain, fixed_time
from ..mcmc.pcnl import PCNL
from ..noise import Generators, NoiseSource, check_generators, make_noise, repeat_rows
from ..sampling import check_sample_only, check_seeded
from ..schedules import ScheduleLike
from ..schedules import get as get_schedule
from ..solvers.base import (
    FINALS,
    NonFiniteError,
    Solver,
    count_steps,
    data_scale,
    diverged_error,
    make_grid,
    state_bound,
    work_dtype,
)
from . import resample as _resample
from .fk_steering import FKSteering, potential_nodes
from .particles import (
    DEFAULT_SCHEDULE,
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    PARTICLE_SAMPLE_ONLY,
    PARTICLE_SAMPLE_ONLY_WHY,
    Particles,
    Reward,
    StepContext,
    _check_reward,
    _each_row,
    _initial_particles,
    _repeat_rows,
    _row_chunks,
    particle_shape,
    run_smc,
    stochastic_solvers,
)

__all__ = ["PsiSampler", "psi_sampler", "twisted_prior"]

WHO = "psi_sampler"
# twisted_prior's keyword arguments that would reach the net as conditions: sample's, and psi_sampler's solver
TWISTED_PRIOR_SAMPLE_ONLY = (*PARTICLE_SAMPLE_ONLY, "solver")
TWISTED_PRIOR_SAMPLE_ONLY_WHY = (
    "which draws the initial particles by pCNL chains at the first node alone (no solver steps, no callback, "
    "no corrector); the other keyword arguments are the net's conditions (**cond)"
)


class PsiSampler(FKSteering):
    """FK steering's ``difference`` potentials from particles drawn from ``pi_T`` (module docstring): at node
    0 the intermediate reward ``r_0`` is recorded as the previous one and as the product of potentials so
    far (``log_g = lam r_0``, the factor the initial law carries, which the final correction divides out),
    and the weights are left alone.

    Args:
        lam: the tilt ``lambda``. nodes: the grid nodes of the potentials after node 0
            (:class:`~steerdiff.smc.FKSteering`'s).
    """

    name = WHO

    def __init__(self, lam: float, nodes: set[int]) -> None:
        super().__init__(lam, "difference", nodes)

    def log_weight(self, ctx: StepContext) -> Tensor | None:
        if ctx.i == 0 and self.lam != 0:
            r = ctx.reward(ctx.x0)
            ctx.state["prev"], ctx.state["log_g"] = r, self.lam * r
            return None
        return super().log_weight(ctx)


class _TwistTarget(Target):
    """``Phi(x_T) = lam r(x0_hat(x_T, t_0))`` with its gradient through the denoiser, on slices of at most
    ``max_batch`` rows (each slice's graph freed before the next); ``calls`` counts the network evaluations
    per row (the denoiser's ``cost`` per call)."""

    def __init__(
        self,
        den: Denoiser,
        reward: Reward,
        lam: float,
        t: float,
        cond: dict[str, Any],
        max_batch: int | None,
        net_dtype: torch.dtype,
    ) -> None:
        super().__init__(log_prob=reward, name=f"{WHO}: reward(x0_hat(x_T))")
        self.den, self.reward, self.lam, self.t = den, reward, lam, t
        self.cond, self.max_batch, self.net_dtype = cond, max_batch, net_dtype
        self.calls, self._cost = 0, 0

    def _phi(self, rows: slice | None, n: int, cond: dict[str, Any], x: Tensor) -> Tensor:
        den = self.den if rows is None else self.den.take_rows(rows, n)
        x0 = den.evaluate(x, self.t, self.net_dtype, **cond).x0
        self._cost = den.cost
        r = self.reward(x0)
        if isinstance(r, Tensor) and not r.requires_grad:
            raise ValueError(
                f"{WHO}: reward(x0_hat(x_T)) is not differentiable in x_T (a reward computed under "
                "torch.no_grad(), detached or outside torch, or a denoiser whose output is detached); pCNL "
                "needs its gradient: use sd.smc.fk_steering for a reward without one"
            )
        return self.lam * r

    def value_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        parts = [
            _value_and_grad(partial(self._phi, sl, n, cs), xs, self.name)
            for sl, xs, _, cs in _row_chunks(self.max_batch, x, self.t, self.cond)
        ]
        self.calls += self._cost
        return torch.cat([v for v, _ in parts]), torch.cat([g for _, g in parts])


def twisted_prior(
    den: Denoiser,
    reward: Reward,
    lam: float,
    *,
    shape: tuple[int, ...] | None = None,
    particles: int,
    steps: int | None = None,
    mcmc_steps: int = 25,
    step_size: float = 0.2,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    max_batch: int | None = None,
    x_T: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: Generators = None,
    **cond: Any,
) -> tuple[Tensor, ChainInfo, int]:
    """Draws of ``pi_T(x_T) ∝ N(x_T; 0, s^2 I) exp(lam r(x0_hat(x_T)))`` at the first node of the grid of
    ``steps`` steps (``schedule``, ``final``): ``particles`` independent pCNL chains per batch row (see the
    module docstring; the arguments as :func:`psi_sampler`'s, ``x_T`` the chains' starts).

    The divergence guard: every chain state is bounded by :func:`~steerdiff.solvers.base.state_bound` at node
    0, ``D`` of the chains' start (``x_T``'s largest entry, or ``s`` for prior draws), read once after the
    chains; a state beyond it (a ``lam`` whose ``pi_T`` lies 1e8 times the noise's scale out: pCNL samples a
    linear reward's exactly) is a :class:`~steerdiff.NonFiniteError` naming the move. :func:`psi_sampler`'s
    particle run takes the chains' states as its ``x_T``, and with them its own data scale, so it could not
    see this.

    Returns:
        ``(x, info, nfe)``: the chains' last states ``(batch, particles, *shape)`` in ``x_T``'s dtype (or
        ``dtype``), their :class:`~steerdiff.mcmc.ChainInfo` (acceptance per chain, ``(batch * particles,)``),
        and the network evaluations per batch row.
    """
    check_denoiser(WHO, "den", den)
    check_sample_only("twisted_prior", cond, TWISTED_PRIOR_SAMPLE_ONLY, TWISTED_PRIOR_SAMPLE_ONLY_WHY)
    _check_reward(reward, WHO)
    lam = real(WHO, "lam", lam)
    batch, *sample = particle_shape(WHO, shape, x_T)
    n_part = integer(WHO, "particles", particles, lo=1)
    final = choice(WHO, "final", final, FINALS)
    sched = get_schedule(schedule, WHO)
    steps = count_steps(WHO, steps, sched, final, DEFAULT_STEPS, process=den.process)
    mcmc_steps = integer(WHO, "mcmc_steps", mcmc_steps, lo=1)
    step_size = real(WHO, "step_size", step_size, lo=0, lo_open=True)
    if max_batch is not None:
        max_batch = integer(WHO, "max_batch", max_batch, lo=1)
    check_generators(WHO, generator, batch)
    check_seeded(den, generator, WHO)
    if dtype is not None:
        dtype = sample_dtype(WHO, "dtype", dtype)
    device = device_or_none(WHO, "device", device)
    check_sample_shape(f"{WHO}: {'x_T' if shape is None else 'shape'}", den, tuple(sample))
    grid = make_grid(den.process, sched, steps, final)
    scale = math.hypot(grid.alpha[0], grid.sigma[0])
    full = (batch, n_part, *sample)
    flat, size = _initial_particles(WHO, den, grid, full, x_T, generator, dtype, device)
    in_dtype = flat.dtype
    per_row = den if n_part == 1 else den.take_rows(_each_row(batch, n_part), batch)
    target = _TwistTarget(
        per_row, reward, lam, grid.t[0], _repeat_rows(cond, batch, n_part), max_batch, in_dtype
    )
    source: NoiseSource = make_noise(repeat_rows(generator, n_part))
    normal = fixed_time(source, grid.t[0])
    # the divergence guard on the chains' states, at node 0 (D of the chains' start: state_bound), and whether
    # the reward was sound up to each move (which came first: a NaN gradient makes a proposal NaN); one read
    bound = state_bound(data_scale(size), grid.alpha[0], grid.sigma[0])
    guard = MoveGuard(bound, lambda: target.sound)
    out, info = chain(
        PCNL(scale=scale),
        Point(flat.to(work_dtype(in_dtype))),
        target,
        mcmc_steps,
        step_size,
        normal,
        grid.t[0],
        guard,
    )
    info.finite = guard.last()
    bad = guard.first_bad()
    if bad is not None and bad[1]:
        raise diverged_error(
            0,
            grid.t[0],
            who=f"{WHO}'s initial chains (pCNL, at their move {bad[0] + 1} of {mcmc_steps})",
            bound=bound,
            fix="lam may be too large for this reward: try less",
        )
    if bad is not None:
        raise NonFiniteError(
            f"{WHO}: reward(x0_hat(x_T)) or its gradient is NaN or inf at a point the initial chains visited "
            f"or proposed ({mcmc_steps} moves, step_size {step_size:g}); try a smaller step_size"
        )
    return out.to(in_dtype).reshape(full), info, target.calls * n_part


def psi_sampler(
    den: Denoiser,
    reward: Reward,
    lam: float = 10.0,
    *,
    shape: tuple[int, ...] | None = None,
    particles: int = 16,
    steps: int | None = None,
    mcmc_steps: int = 25,
    step_size: float = 0.2,
    interval: int = 1,
    window: tuple[int, int] | None = None,
    ess_threshold: float = 1.0,
    resampler: str | _resample.Resampler = "systematic",
    solver: str | Solver = DEFAULT_SOLVER,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    max_batch: int | None = None,
    x_T: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: Generators = None,
    progress: bool = False,
    group: Any = None,
    **cond: Any,
) -> Particles:
    """Ψ-Sampler: FK steering towards ``p(x) exp(lam r(x))`` from initial particles drawn by pCNL from the
    twisted prior ``pi_T`` (see the module docstring).

    Args:
        den: the denoiser, differentiable in ``x``.
        reward: ``r``, mapping a batch ``(n, *shape)`` to ``(n,)``, differentiable (pCNL follows ``grad r``
            through the denoiser); must be finite.
        lam: tilt ``lambda``; 0: the base sampler, :func:`~steerdiff.smc.fk_steering`'s at ``lam = 0`` (the
            same draws; no chains, ``pi_T`` being the prior, so ``r`` need not be differentiable then).
        shape: ``(batch, *sample_shape)``; may be left out where ``x_T`` is given (read off it; a shape given
            with it must agree). ``particles``: ``N >= 1`` per batch row. ``steps``: solver steps (``None``:
            100, or an explicit grid's count: :func:`~steerdiff.smc.run_smc`).
        mcmc_steps: pCNL moves per chain (one chain per particle; its burn-in). ``step_size``: pCNL's
            ``delta > 0``.
        x_T: the chains' starting points ``(batch, particles, *shape)`` (default: prior draws).
        interval, window, ess_threshold: as :func:`~steerdiff.smc.fk_steering`'s (potentials after node 0).
        resampler, solver, schedule, final, max_batch, dtype, device, generator, progress, cond: see
            :func:`~steerdiff.smc.run_smc`; the solver must be stochastic. ``generator`` draws the chains
            first, then the run. ``max_batch`` bounds the chains' evaluations (with their graphs) too.
        group: not supported (``None``): the chains are not spread over ranks.

    Returns:
        :class:`~steerdiff.smc.Particles` as :func:`~steerdiff.smc.fk_steering`'s, with ``nfe`` counting the
        chains' evaluations too and ``log_z`` relative to ``pi_T``'s normalizer (module docstring).

    Example:
        >>> out = sd.smc.psi_sampler(den, reward, lam=10.0, shape=(4, 2), particles=16, steps=50, generator=g)
        >>> x = out.sample(generator=g)   # (4, 2), one draw per batch row
    """
    if group is not None:
        raise ValueError(f"{WHO}: group: the initial chains are not spread over ranks; pass group=None")
    check_denoiser(WHO, "den", den)
    final = choice(WHO, "final", final, FINALS)
    sched = get_schedule(schedule, WHO)
    steps = count_steps(WHO, steps, sched, final, DEFAULT_STEPS, process=den.process)
    algorithm = PsiSampler(real(WHO, "lam", lam), potential_nodes(steps, interval, window, WHO))
    # the run's options that the chains would otherwise be run before refusing
    check_sample_only(WHO, cond, PARTICLE_SAMPLE_ONLY, PARTICLE_SAMPLE_ONLY_WHY)
    boolean(WHO, "progress", progress)
    integer(WHO, "mcmc_steps", mcmc_steps, lo=1)
    real(WHO, "step_size", step_size, lo=0, lo_open=True)
    real(WHO, "ess_threshold", ess_threshold, lo=0, hi=1)
    _resample.get(resampler, WHO)
    grid = make_grid(den.process, sched, steps, final)
    if not _solvers.get(solver, WHO).noisy_on(grid):
        raise ValueError(
            f"{WHO} needs a stochastic solver (resampled copies must diverge): solver={solver!r} draws no "
            f"noise on this grid of {steps} steps (Solver.noisy_on); accepted: {stochastic_solvers()} or "
            "e.g. DDIM(eta > 0)"
        )
    x, chain_nfe = x_T, 0  # lam = 0: pi_T is the prior, whose draws the run makes (fk_steering's at lam = 0)
    if algorithm.lam != 0:
        x, _, chain_nfe = twisted_prior(
            den, reward, lam, shape=shape, particles=particles, steps=steps, mcmc_steps=mcmc_steps,
            step_size=step_size, schedule=schedule, final=final, max_batch=max_batch, x_T=x_T, dtype=dtype,
            device=device, generator=generator, **cond,
        )  # fmt: skip
    out = run_smc(
        den, algorithm, shape, particles=particles, steps=steps, reward=reward, solver=solver,
        schedule=schedule, final=final, ess_threshold=ess_threshold, resampler=resampler,
        max_batch=max_batch, x_T=x, dtype=dtype, device=device, generator=generator, progress=progress,
        **cond,
    )  # fmt: skip
    return dataclasses.replace(out, nfe=out.nfe + chain_nfe)
