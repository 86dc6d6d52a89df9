r"""Rollover Budget Forcing (RBF; Kim, Yoon, Hwang & Sung 2025, "Inference-Time Scaling for Flow Models via
Stochastic Generation and Rollover Budget Forcing", Sec. 6; their code's ``rbf/rbf.py``).

A search over the transitions of a stochastic solver under a total budget of ``B`` network evaluations per
batch row. The grid's nodes ``0..S`` are searched up to ``L = S - 1``, the node before the last step
(whose point the last step then takes once: the denoised estimate for ``final="zero"``). Candidates for
node ``k`` are drawn from the kept state's transition, ``x' ~ p(x_k | x_{k-1}) = N(mean, std^2)`` (at node
0 the initial noise ``N(0, (alpha_0^2 + sigma_0^2) I)``), and scored by the reward of their denoised
estimate, ``r(x0_hat(x'))`` (Tweedie's: the reward need not be differentiable). Scoring a candidate is the
solver's step at it, whose first evaluation gives ``x0_hat(x')`` and, for the one kept, its own next
transition: a candidate at node ``k`` costs ``c_k`` evaluations (the step's; 1 per step for ``ddpm``). Per
row, with the running best ``r*`` (the highest score a kept state had)::

    node 0:       draw ``initial`` candidates (all), keep the best;  r* = its score
    q = floor((B - initial c_0) / L)                               the uniform quota of nodes 1..L
    Q_1 = q
    node k < L:   draw candidates one at a time while the quota left covers one more:
                    r(x0_hat(x')) > r*:   keep x', r* = its score, Q_{k+1} = q + (Q_k - spent)  (rollover)
                  quota spent, none better: keep the best candidate drawn here, Q_{k+1} = q (r* unchanged)
    node L:       draw candidates while the budget left covers one more; keep the best

so a node whose first candidates already improve on the path passes its unused evaluations on, and the
last node spends what is left (its quota, what rolled into it, the division's remainder). With ``S = 1``
(and ``final="none"``) node 0 is the last and spends the whole budget. The returned sample is the last
step's point from the kept ``x_L``: ``x0_hat(x_L)`` for ``final="zero"`` (its reward is ``x_L``'s
score), a draw from ``x_L``'s transition for ``final="none"``.

The rule is the paper's (its project page: "when a high-reward particle is found early within the
allocated quota, the unused NFEs are carried over to the next step"), checked against the authors' code
(``RBF.train_single_step``): a candidate is kept at once when its reward exceeds ``best_rewards``, the
running maximum above (never lowered when a node ends on its quota with a worse candidate, so that node's
successor must beat the path's best, not the kept state's score); the unused quota rolls over
(``leftover + default_budget``), a node ended by its quota passes nothing on (``default_budget``), and the
last node (``step_counter = max_steps - 2``, the candidates of the last noisy time) never moves on: it
draws until the budget is spent and returns the best candidate's denoised estimate, ``final="zero"`` here.
Their initial candidates (``init_n_particles``) are chosen by ``pre_correct``, whose file was not read: taken
here to keep the best, as every other comparison of the loop does. Their ``batch_size`` chains share one
budget and the best chain's estimate is returned: ``rbf`` over that many rows with a share each, then the
row of highest reward. Two details differ: their quota is ``floor((B - initial) / S)`` per node for ``S``
steps (the last node then also gets the share of the node it never searches), here ``/ L``; and they stop
before a round of evaluations that would reach the budget (``nfe + batch_size >= max_nfe``), one round
short of it, where this spends it whole.

Cost. Exactly the evaluations drawn: ``row_nfe`` per row, at most ``B`` (each candidate's ``c_k`` is the
solver's evaluations at node ``k`` times the cost of one network call, :attr:`Denoiser.cost
<steerdiff.denoiser.Denoiser.cost>`, taken as the larger of ``den.cost`` before the run and the first
call's: 1 for a plain denoiser, 2 for a CFG even where its interval leaves some calls at 1, which then leave
part of the budget unspent; a call that costs more, so that a row passes ``B`` -- CharacteristicGuidance,
whose iterations vary -- is a ``ValueError``); the rows' searches end at different nodes at different times
and are batched by node: each iteration draws one candidate for every row still searching, one call of the
step (and of ``reward``) per node in use. Each control decision reads the device. No autograd graph is kept.
Every candidate drawn from a kept state's transition, and the returned sample, is bounded by the divergence
guard (:meth:`~steerdiff.solvers.base.Model.note_state`: ``1e8 (alpha D + sigma)``, ``D`` the initial noise's
std; no read, off the CPU compared at the run's end or at a reward's check), the error naming the step.

Solvers: the one-step stochastic ones that return their Gaussian transition (``ddpm``, ``euler_ancestral``,
``euler_maruyama``, ``flow_sde``, ``DDIM(eta > 0)``, ``dpm_2_ancestral``, ``dpmpp_2s_ancestral``, ``lcm``,
``tcd``, ``cps``); those that draw noise inside their step (``dpmpp_sde``, ``edm_sde``, ``restart``) and the
multistep ones (``dpmpp_2m_sde``, ``er_sde``, ``sa_solver``, whose step reads the trajectory's history) are
refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import schedules as _schedules
from .. import solvers as _solvers
from .._checks import boolean, choice, device_or_none, integer, sample_dtype
from ..denoiser import Denoiser, Prediction, check_denoiser, check_sample_shape, take_kwarg_rows
from ..noise import Generators, RefusedNoise, check_generators, randn, take_generator_rows
from ..sampling import check_sample_only, check_seeded, diverged_step
from ..schedules import ScheduleLike
from ..solvers.base import (
    FINALS,
    Grid,
    Model,
    Solver,
    Transition,
    count_steps,
    keeps_history,
    make_grid,
    to_sample_dtype,
    work_dtype,
)
from .particles import (
    DEFAULT_SCHEDULE,
    DEFAULT_SOLVER,
    PARTICLE_SAMPLE_ONLY,
    PARTICLE_SAMPLE_ONLY_WHY,
    Particles,
    Reward,
    RowSlice,
    _check_reward,
    _check_shape,
    _finite_reward,
    refuse_x_T,
)

__all__ = ["RolloverSamples", "rbf"]

F64 = torch.float64
FITTING = (
    "use a one-step stochastic solver that returns its Gaussian transition (ddpm, euler_ancestral, "
    "euler_maruyama, flow_sde, DDIM(eta > 0), dpm_2_ancestral, dpmpp_2s_ancestral, lcm, tcd, cps)"
)


@dataclass
class RolloverSamples(Particles):
    """The result of :func:`rbf`: ``x`` ``(batch, 1, *shape)``, one sample per row (``log_w = 0``), ``reward``
    its reward ``(batch, 1)``.

    ``nfe``: the most network evaluations a row spent; ``row_nfe``: each row's, ``(batch,)`` int64 (at most
    the budget). ``candidates``: ``(batch, S)`` int64, the candidates each row drew for nodes
    ``0..S - 1`` (node ``S``, the last step's, is not searched)."""

    row_nfe: Tensor | None = None
    candidates: Tensor | None = None


class _Steps:
    """The solver's step at chosen rows, on candidates: the step's Transition and its first prediction."""

    def __init__(
        self,
        who: str,
        den: Denoiser,
        slv: Solver,
        grid: Grid,
        cond: dict[str, Any],
        batch: int,
        dtype: torch.dtype,
    ) -> None:
        self.who, self.den, self.slv, self.grid, self.cond, self.batch = who, den, slv, grid, cond, batch
        self.state = slv.init_state(grid)  # grid tables only (no history: checked)
        # the divergence guard's data scale D: the initial noise's std (drawn per candidate: no read)
        self.model = _FirstCall(
            den, cond, None, net_dtype=dtype, scale=math.hypot(grid.alpha[0], grid.sigma[0])
        )

    def bound(self, x: Tensor, k: int, what: str = "candidate") -> None:
        """The divergence guard (:meth:`~steerdiff.solvers.base.Model.note_state`) on ``x``, states at grid
        node ``k >= 1`` made by step ``k - 1`` (``what`` they are: a candidate, or the last step's sample)."""
        grid, slv = self.grid, self.slv
        diverged = diverged_step(slv, self.model, f"{self.who}'s {what} (solver {slv.name!r})")
        self.model.note_state(x, k - 1, grid.t[k], grid.alpha[k], grid.sigma[k], diverged)

    def __call__(self, x: Tensor, k: int, rows: Tensor) -> tuple[Transition, Prediction, int]:
        """Step ``k`` from the candidates ``x`` of ``rows``: their transition (std broadcast to ``x``), their
        denoised estimate and the evaluations spent (per row)."""
        model = self.model
        model.denoiser = self.den.take_rows(rows, self.batch)
        model.cond = take_kwarg_rows(self.cond, rows, self.batch)
        model.noise = RefusedNoise(
            f"{self.who} draws candidates from the step's Gaussian transition, but solver {self.slv.name!r} "
            f"draws noise inside its step; {FITTING}"
        )
        model.first, before = None, model.nfe
        out = self.slv.step(model, x, k, self.grid, self.state)
        assert model.first is not None, "every step evaluates the denoiser"
        tr = out if isinstance(out, Transition) else Transition(out, 0.0)
        std = tr.std if isinstance(tr.std, Tensor) else torch.tensor(tr.std, dtype=x.dtype, device=x.device)
        return Transition(tr.mean, std.expand_as(tr.mean)), model.first, model.nfe - before


class _FirstCall(Model):
    """A :class:`~steerdiff.solvers.base.Model` that keeps the step's first prediction (at its input)."""

    first: Prediction | None = None

    def __call__(self, x: Tensor, t: float, step: int) -> Prediction:
        pred = super().__call__(x, t, step)
        if self.first is None:
            self.first = pred
        return pred


def _check_solver(who: str, solver: str | Solver, slv: Solver, grid: Grid) -> None:
    """A ``ValueError`` unless ``slv`` draws noise on ``grid`` and keeps no per-trajectory history (the
    in-step noise of the others is refused at their first step, :class:`~steerdiff.noise.RefusedNoise`)."""
    if not slv.noisy_on(grid):
        if grid.steps == 1 and grid.clean_end:  # the one step: the jump into the clean end, no solver's noise
            raise ValueError(
                f"{who}: steps=1 with final='zero' is the jump into the clean end alone, which adds no "
                "noise (a node's candidates must differ): take steps >= 2, or final='none'"
            )
        raise ValueError(
            f"{who} needs a stochastic solver (a node's candidates must differ); solver {solver!r} adds no "
            f"noise on this grid of {grid.steps} steps: {FITTING}"
        )
    if keeps_history(slv, grid):
        raise ValueError(
            f"{who}: solver {slv.name!r} keeps a per-trajectory history in its state, which a candidate does "
            f"not carry; {FITTING}"
        )


def rbf(
    den: Denoiser,
    reward: Reward,
    budget: int,
    *,
    shape: tuple[int, ...],
    initial: int = 1,
    steps: int | None = None,
    solver: str | Solver = DEFAULT_SOLVER,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: Generators = None,
    progress: bool = False,
    **cond: Any,
) -> RolloverSamples:
    """Rollover Budget Forcing: a search of ``budget`` network evaluations per batch row over the
    transitions of a stochastic solver, towards high ``reward`` (see the module docstring for the rule).

    Args:
        den: the denoiser (guided and :class:`~steerdiff.Reprocessed` ones included: the paper runs a
            rectified-flow model through its VP interpolant with ``ddpm``).
        reward: ``r``, mapping ``(n, *shape)`` to finite ``(n,)``; gradient-free; scores the denoised
            estimate of every candidate and the returned samples.
        budget: ``B``, the network evaluations each row may spend, at least ``initial`` candidates at node
            0 and one at each node ``1..S - 1``.
        shape: ``(batch, *sample_shape)``: ``batch`` independent searches.
        initial: candidates for the initial noise, the best kept (the authors' ``init_n_particles``, 25 in
            their configuration; default 1).
        steps, solver, schedule, final: the base sampler's grid and a one-step stochastic solver that
            returns its transition (``steps=None``: 10, or an explicit grid's count, as
            :func:`steerdiff.sample`'s).
        dtype, device: of the states (torch's default dtype, CPU).
        generator: ``None``, one ``torch.Generator``, or a list of one per batch row: row ``b``'s search
            then draws from ``generator[b]`` alone (the same search alone or in any batch).
        progress: a tqdm bar over the budget (of the row furthest behind).
        **cond: passed to the network; tensors with ``batch`` rows are taken at the rows of each call.

    Returns:
        :class:`RolloverSamples`: ``x`` ``(batch, 1, *shape)``, ``reward``, ``nfe`` / ``row_nfe`` and the
        candidates drawn per node.

    Example:
        >>> out = sd.smc.rbf(den, reward, 160, shape=(4, 2), steps=10, generator=g)
        >>> out.x[:, 0], out.reward[:, 0], out.row_nfe
    """
    who = "rbf"
    check_denoiser(who, "den", den)
    check_sample_only(who, cond, PARTICLE_SAMPLE_ONLY, PARTICLE_SAMPLE_ONLY_WHY)
    refuse_x_T(who, cond, "its node 0 draws ``initial`` candidates of the initial noise and keeps the best")
    _check_reward(reward, who)
    budget = integer(who, "budget", budget, lo=1)
    shape = _check_shape(shape, who)
    batch, sample_shape = shape[0], shape[1:]
    check_sample_shape(f"{who}: shape", den, sample_shape)
    initial = integer(who, "initial", initial, lo=1)
    final = choice(who, "final", final, FINALS)
    sched = _schedules.get(schedule, who)
    steps = count_steps(who, steps, sched, final, 10, process=den.process)
    progress = boolean(who, "progress", progress)
    in_dtype = torch.get_default_dtype() if dtype is None else sample_dtype(who, "dtype", dtype)
    device = device_or_none(who, "device", device)
    generator = check_generators(who, generator, batch)
    check_seeded(den, generator, who)
    slv = _solvers.get(solver, who)
    grid = make_grid(den.process, sched, steps, final)
    _check_solver(who, solver, slv, grid)
    last = steps - 1  # L: the last node searched

    def evals(k: int) -> int:  # the step's evaluations at node k (the jump into a clean end: one)
        return 1 if grid.is_final_clean(k) else slv.evals_per_step

    def quota_of(unit: int) -> int:
        """The quota ``q`` of nodes ``1..L`` at ``unit`` NFE per evaluation; a ``ValueError`` if ``budget``
        cannot pay ``initial`` candidates at node 0 and a quota of one candidate at every other node."""
        first = (initial if last > 0 else 1) * evals(0) * unit
        need = first + last * unit * max((evals(k) for k in range(1, last + 1)), default=0)
        if budget < need:
            raise ValueError(
                f"{who}: budget must be at least {need} network evaluations per row "
                f"({initial if last else 1} initial candidate(s) and a quota of one candidate at each of the "
                f"{last} other nodes searched: {steps} steps of {slv.name!r}), got {budget}"
            )
        return (budget - first) // last if last > 0 else 0

    unit = int(den.cost)  # before the first call: a CFG's inside its interval, its most
    quota = quota_of(unit)

    with torch.no_grad():
        wdtype = work_dtype(in_dtype)
        dev = torch.zeros((), device=device).device
        run = _Steps(who, den, slv, grid, cond, batch, in_dtype)
        lead = (-1, *[1] * len(sample_shape))
        # the kept state's transition, which the next node's candidates are drawn from (node 0: the noise)
        mean = torch.zeros(shape, dtype=wdtype, device=dev)
        std = torch.full(shape, math.hypot(grid.alpha[0], grid.sigma[0]), dtype=wdtype, device=dev)
        best = torch.full((batch,), -math.inf, dtype=F64, device=dev)  # r*, the path's best
        # the node's best candidate so far: its score, transition and denoised estimate
        cand_r = torch.full((batch,), -math.inf, dtype=F64, device=dev)
        cand_mean, cand_std, cand_x0 = torch.zeros_like(mean), torch.zeros_like(mean), torch.zeros_like(mean)
        # control on the CPU: the node each row's candidates are for, its budget and the node's quota left
        node = torch.zeros(batch, dtype=torch.long)
        left = torch.full((batch,), budget, dtype=torch.long)
        quota_left = torch.zeros(batch, dtype=torch.long)
        row_nfe = torch.zeros(batch, dtype=torch.long)
        drawn = torch.zeros(batch, steps, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        measured = False
        bar = tqdm(total=budget, desc=who, leave=False) if progress else None
        while not bool(done.all()):
            for k in sorted(set(node[~done].tolist())):
                rows = (~done & (node == k)).nonzero().flatten()
                on = rows.to(dev)
                z = randn(
                    (len(rows), *sample_shape), take_generator_rows(generator, rows, batch), wdtype, dev
                )
                x = mean[on] + std[on] * z
                if k > 0:  # a candidate of the kept state's transition (node 0's: the initial noise)
                    run.bound(x, k)
                tr, pred, spent = run(x, k, on)
                if not measured:  # one network call's cost, known after the first call (at least den.cost
                    # before it: a CFG outside its interval there costs 1 but 2 at the nodes inside it)
                    measured, unit = True, max(unit, -(-spent // evals(k)))
                    quota = quota_of(unit)
                r = _finite_reward(
                    who,
                    reward,
                    RowSlice(None, len(pred.x0), pred.x0, grid.t[k], take_kwarg_rows(cond, on, batch)),
                    run.model,
                )
                row_nfe[rows] += spent
                left[rows] -= spent
                if bool((left[rows] < 0).any()):
                    raise ValueError(
                        f"{who}: den's cost per evaluation grew to {spent / evals(k):g} at node {k}, past "
                        f"the {unit} the search was planned at, and a row spent more than budget={budget}: "
                        "give a denoiser whose calls cost at most its first (den.cost before the run)"
                    )
                quota_left[rows] -= spent
                drawn[rows, k] += 1
                up = r > cand_r[on]
                for table, new in ((cand_mean, tr.mean), (cand_std, tr.std), (cand_x0, pred.x0)):
                    table[on] = torch.where(up.reshape(lead), new, table[on])
                cand_r[on] = torch.where(up, r, cand_r[on])
                cost = evals(k) * unit
                if k == last:  # the last node: until the budget is spent
                    done[rows] = left[rows] < cost
                    continue
                if k == 0:  # all initial candidates, then the best
                    better, move = torch.zeros(len(rows), dtype=torch.bool), drawn[rows, 0] == initial
                else:  # a better one at once (its unused quota rolls over), else the best once quota is spent
                    better = (r > best[on]).cpu()
                    move = better | (quota_left[rows] < cost)
                if not bool(move.any()):
                    continue
                moved, gone = rows[move], on[move.to(dev)]
                mean[gone], std[gone] = cand_mean[gone], cand_std[gone]  # a better one is the node's best
                best[gone] = cand_r[gone] if k == 0 else torch.maximum(best[gone], cand_r[gone])
                quota_left[moved] = quota + torch.where(better[move], quota_left[moved], 0)
                cand_r[gone] = -math.inf
                node[moved] += 1
            if bar is not None:
                bar.update(int(row_nfe.min()) - bar.n)
        if bar is not None:
            bar.close()
        # the last step from the kept x_L: its denoised estimate (final="zero") or a draw of its transition
        x = cand_x0 if grid.clean_end else cand_mean + cand_std * randn(shape, generator, wdtype, dev)
        run.bound(x, steps, "last step")
        run.model.check_finite()
        out_r = _finite_reward(who, reward, RowSlice(None, len(x), x, grid.t[-1], cond), run.model)
        return RolloverSamples(
            to_sample_dtype(who, x, in_dtype)[:, None], torch.zeros(batch, 1, dtype=F64, device=dev),
            int(row_nfe.max()), None, out_r[:, None], row_nfe.to(dev), drawn.to(dev),
        )  # fmt: skip
