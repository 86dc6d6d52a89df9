r"""Diffusion Tree Sampling and Diffusion Tree Search (Jain, Sareen, Pedramfar & Ravanbakhsh 2025,
"Diffusion Tree Sampling: Scalable inference-time alignment of diffusion models", Alg. 1 and 2).

Target: ``pi(x) ∝ p_S(x) exp(lam r(x))`` for the base sampler's output law ``p_S``. The reverse chain
of a stochastic solver over the grid nodes ``i = 0..S`` is read as a tree: a node at grid node ``i`` holds
a state ``x_i``, a visit count ``N`` and a soft value ``v``; its children are draws
``x_{i+1} ~ p(. | x_i)`` of the solver's step (one or more network calls). A dummy root above node 0 has
the initial noise ``x_0 ~ N(0, (alpha_0^2 + sigma_0^2) I)`` as children. The soft value solves the soft
Bellman equation on the tree, in reward units,

    v(x_S) = r(x_S),     v(x_i) = (1 / lam) log( (1 / |C(x_i)|) sum_{c in C(x_i)} exp(lam v(c)) )

(``C``: the children; at ``lam = 0`` its limit, the children's mean), a Monte Carlo estimate of
``V_i(x_i) = (1 / lam) log E[exp(lam r(x_S)) | x_i]`` that is exact as the children grow.
Each rollout (one tree-building iteration, Alg. 1), per batch row:

    selection:  from the root, while |C(x)| >= C N(x)^alpha (widening; 1 off the ``branch`` nodes)
                and x is not terminal,
                go to a child: DTS draws it ∝ exp(lam v(c)) (Boltzmann); DTS* takes
                argmax_c v(c) + exploration sqrt(log N(x) / N(c))    (UCT)
    expansion:  at the first node x_i with fewer children (progressive widening), a new child
                x_{i+1} ~ p(. | x_i), and the rollout to x_S with the base sampler, every state a new
                node (v = 0, N = 1); none once selection reaches a terminal node
    backup:     v(x_S) = r(x_S); then v and N += 1 of every node on the path, from x_{S-1} to the root

Sampling (Alg. 2) descends from the root to a terminal node: DTS by the Boltzmann rule, ``samples``
draws per row whose law tends to ``pi`` as the rollouts grow (Prop. 1: each step picks ``x_{i+1}``
with probability ``∝ p(x_{i+1} | x_i) exp(lam v(x_{i+1}))``, the optimal policy once ``v = V``); DTS*
(``greedy=True``) by ``argmax_c v(c)``, one draw, the terminal node of the branch of most soft-value mass
(a marginal-MAP choice that guards against reward over-optimization, paper Sec. 4.3). The tree's
highest-reward terminal node is returned beside it (``best``, ``best_reward``): the best sample found.
The paper's widening ``(C, alpha) = (2, 0.8)`` branches every node for its first ~30 visits
(``2 N^0.8 >= N`` up to ``N = 32``): the first 31 rollouts are independent runs of the base sampler, and
the draws are those samples resampled by ``exp(lam r)`` (exact as they grow). Later rollouts revisit the
branches whose values came out high and average that luck away, while the branches that scored low are
rarely revisited and keep theirs: at finite budgets the draws under-weight the high-reward region (a
two-mode 1-D mixture whose tilted law puts 0.761 on one mode: 0.751 +- 0.005 at 64 rollouts of 10 DDPM
steps, 0.732 +- 0.004 at 256, 0.725 +- 0.004 at 1024; FK steering at the same NFE 0.765 +- 0.003 at 256;
widening (1, 0.5), whose trees branch deeper, 0.654 +- 0.009 and 0.668 +- 0.005). It is optional stopping:
how many children a node gets depends on the rewards its first ones got, and a mean over an
outcome-dependent number of draws is biased. With widening capped, ``(8, 0)`` and ``branch={0}``, the bias
shows while the trees fill (0.681 +- 0.010 at 24 rollouts) and is gone once every node has its 8 children,
a number fixed in advance (0.761 +- 0.006 at 160 rollouts: nested importance resampling). Neither other
backup removes it: children weighted by visits is this one where no node below grid node 0 is revisited
(all of the above at (2, 0.8)) and 0.671 / 0.667 at (1, 0.5); log-sum-exp, which weights each leaf by
``exp(lam r)`` alone however many leaves its region holds, overshoots in deep trees (0.781 +- 0.004 at
(1, 0.5), 256 rollouts). The bias vanishes only as every branch is revisited (Prop. 1 is asymptotic).

Cost. A rollout whose expansion is at grid node ``i`` takes the ``S - i`` solver steps from ``x_i``
(``S`` from the root, whose new child is the initial noise: no network call): ``S - i`` times the
solver's evaluations per step for that row (``nfe``, counted exactly per row in ``row_nfe``). The
trees of a batch's rows are independent and grown in lockstep, one rollout each per iteration; the
rows that expand are batched: the steps of an iteration run in grid order and step ``j`` evaluates the
network once (per solver stage) on the rows whose rollout covers it, so an iteration makes
``S - min_b i_b`` batched calls and one call of ``reward`` on the rows that expanded. Selection and
backup cost ``O(S R)`` tensor operations per row and iteration (each scans the nodes at one grid node),
``O(S R^2)`` over a run of ``R = rollouts``. Each control decision reads the device (which rows expand),
so on a GPU an iteration syncs ``O(S)`` times. Every new node's state is bounded by the divergence guard
(:meth:`~steerdiff.solvers.base.Model.note_state`: ``1e8 (alpha D + sigma)``, ``D`` the initial noise's
std): one reduction per step, no read (off the CPU compared at the run's end, or at a reward's check),
the error naming the rollout and the step.

Memory: the tree is kept as tensors, by grid node: at most one new node per grid node and rollout, so
``rollouts * (S + 1)`` states ``(batch, S + 1, rollouts, *shape)`` in the run's dtype, and four
``(batch, S + 2, rollouts)`` float64/int64 tables (parent, value, visits, children); allocated in full
at the start. No autograd graph is kept (the run is under ``torch.no_grad()``; gradient guidance turns
gradients on inside its own call).

Solvers: any stochastic one without per-trajectory state (a node's children are drawn from its state
alone): ``ddpm``, ``euler_ancestral``, ``euler_maruyama``, ``DDIM(eta > 0)``, ``dpm_2_ancestral``,
``dpmpp_2s_ancestral``, ``dpmpp_sde``, ``edm_sde``, ``restart``, ``lcm``, ``tcd``, ``flow_sde``, ``cps``; the
multistep ones (``dpmpp_2m_sde``, ``er_sde``, ``sa_solver``), whose step reads the trajectory's history, are
refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import schedules as _schedules
from .. import solvers as _solvers
from .._checks import boolean, choice, device_or_none, integer, real, sample_dtype
from ..denoiser import Denoiser, check_denoiser, check_sample_shape, take_kwarg_rows
from ..noise import Generators, check_generators, make_noise, rand, randn, take_generator_rows
from ..sampling import check_sample_only, check_seeded, diverged_step
from ..schedules import ScheduleLike
from ..solvers.base import (
    FINALS,
    Grid,
    Model,
    Solver,
    advance,
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
    stochastic_solvers,
)

__all__ = ["TreeSamples", "dts"]

F64 = torch.float64


@dataclass
class TreeSamples(Particles):
    """Draws from the trees of :func:`dts`: ``x`` ``(batch, samples, *shape)``, equally weighted (``log_w =
    -log samples``: exact draws of the tree's law, no importance weights), ``reward`` their rewards.

    ``nfe``: the most network evaluations a batch row spent (rows' trees grow apart, so their counts
    differ); ``row_nfe``: each row's, ``(batch,)`` int64. ``best`` ``(batch, *shape)`` and ``best_reward``
    ``(batch,)``: each tree's highest-reward terminal node. ``value``: the root's soft value ``(batch,)``;
    ``lam * value`` estimates ``log E_{p_S}[exp(lam r)]`` (consistent; biased low for small trees, by
    Jensen's inequality at every level)."""

    row_nfe: Tensor | None = None
    best: Tensor | None = None
    best_reward: Tensor | None = None
    value: Tensor | None = None


class _Forest:
    """One tree per batch row, stored by depth ``d = 0..S + 1`` (``d = 0`` the root, ``d = i + 1`` grid node
    ``i``), at most ``rollouts`` nodes per depth: ``x[b, d - 1, k]`` is node ``k`` at depth ``d`` of row
    ``b``; ``parent``, ``value`` (float64, reward units), ``visits`` and ``children`` are ``(batch, S + 2,
    rollouts)``, ``count`` ``(batch, S + 2)`` the nodes per depth; ``path`` ``(batch, S + 2)`` the node of
    the current rollout at each depth."""

    def __init__(
        self, batch: int, steps: int, rollouts: int, sample_shape: tuple[int, ...], x_like: Tensor
    ) -> None:
        depths, dev = steps + 2, x_like.device
        self.steps, self.lam = steps, 0.0
        self.x = x_like.new_zeros((batch, steps + 1, rollouts, *sample_shape))
        self.parent = torch.zeros(batch, depths, rollouts, dtype=torch.long, device=dev)
        self.value = torch.zeros(batch, depths, rollouts, dtype=F64, device=dev)
        self.visits = torch.zeros(batch, depths, rollouts, dtype=F64, device=dev)
        self.children = torch.zeros(batch, depths, rollouts, dtype=F64, device=dev)
        self.count = torch.zeros(batch, depths, dtype=torch.long, device=dev)
        self.count[:, 0] = 1
        self.visits[:, 0, 0] = 1.0  # the root: N = 1, v = 0 (Alg. 1, line 2)
        self.path = torch.zeros(batch, depths, dtype=torch.long, device=dev)
        self.slots = torch.arange(rollouts, device=dev)

    def at(self, table: Tensor, d: int, rows: Tensor | None = None) -> Tensor:
        """``table``'s entries at depth ``d`` of the current path, for ``rows`` (default all)."""
        rows = torch.arange(len(table), device=table.device) if rows is None else rows
        return table[rows, d, self.path[rows, d]]

    def state(self, d: int, rows: Tensor) -> Tensor:
        """The states of the current path's nodes at depth ``d >= 1`` for ``rows``."""
        return self.x[rows, d - 1, self.path[rows, d]]

    def is_child(self, d: int, node: Tensor) -> Tensor:
        """``(batch, ..., rollouts)``: which nodes at depth ``d + 1`` are children of ``node`` ``(batch,
        ...)`` (indices at depth ``d``)."""
        lead = node.ndim - 1
        parent = self.parent[:, d + 1].reshape(len(node), *([1] * lead), -1)
        live = (self.slots < self.count[:, d + 1, None]).reshape(len(node), *([1] * lead), -1)
        return (parent == node[..., None]) & live

    def add(self, rows: Tensor, d: int, x: Tensor) -> None:
        """New nodes ``x`` at depth ``d`` for ``rows``, children of their path's nodes at ``d - 1``
        (v = 0, N = 1), made the path's nodes at ``d``."""
        k, up = self.count[rows, d], self.path[rows, d - 1]
        self.x[rows, d - 1, k] = x
        self.parent[rows, d, k] = up
        self.value[rows, d, k] = 0.0
        self.visits[rows, d, k] = 1.0
        self.children[rows, d - 1, up] += 1.0
        self.count[rows, d] += 1
        self.path[rows, d] = k

    def soft_value(self, d: int) -> Tensor:
        """The soft Bellman backup of the path's nodes at depth ``d`` from their children, ``(batch,)``."""
        mine = self.is_child(d, self.path[:, d])
        v = self.value[:, d + 1]
        n = mine.sum(-1)
        if self.lam == 0:
            return torch.where(mine, v, 0.0).sum(-1) / n
        # top + log(mean exp(a - top)) as log1p(mean expm1(a - top)): exact as lam -> 0, where exp(a - top)
        # rounds to 1 and the log of the mean would give the largest child's value instead of the mean
        a = self.lam * v
        top = torch.where(mine, a, -math.inf).amax(-1)
        below = torch.where(mine, torch.expm1(a - top[:, None]), 0.0)
        return (torch.log1p(below.sum(-1) / n) + top) / self.lam

    def backup(self) -> None:
        """Alg. 1, lines 25-28: soft values and visits along the path, from depth ``S`` to the root."""
        rows = torch.arange(len(self.path), device=self.path.device)
        for d in range(self.steps, -1, -1):
            node = self.path[:, d]
            self.value[rows, d, node] = self.soft_value(d)
            self.visits[rows, d, node] += 1.0


def _select(forest: _Forest, d: int, node: Tensor, u: Tensor | None, exploration: float) -> Tensor:
    """The child (an index at depth ``d + 1``) of each ``node`` ``(batch, ...)`` at depth ``d``: the
    Boltzmann draw ``∝ exp(lam v)`` by the uniforms ``u`` (``node``'s shape), or for ``u = None`` (DTS*)
    the argmax of ``v`` plus ``exploration`` times the UCT bonus ``sqrt(log N(node) / N(child))``."""
    mine = forest.is_child(d, node)
    lead = (len(node), *([1] * (node.ndim - 1)), -1)
    v = forest.value[:, d + 1].reshape(lead)
    if u is None:
        score = v
        if exploration > 0:
            n_up = torch.gather(forest.visits[:, d], 1, node.reshape(len(node), -1)).reshape(node.shape)
            score = v + exploration * (n_up.log()[..., None] / forest.visits[:, d + 1].reshape(lead)).sqrt()
        return torch.where(mine, score, -math.inf).argmax(-1)
    anywhere = mine | ~mine.any(-1, keepdim=True)  # a row not descending here: any draw, discarded
    cum = _weights(forest.lam * v.expand(mine.shape), anywhere)[0].cumsum(-1)
    total = cum[..., -1:].contiguous()
    idx = torch.searchsorted(cum, u[..., None] * total, right=True)
    # u * total can round up to the total: the last child of positive weight then, not a slot after it
    return torch.minimum(idx, torch.searchsorted(cum, total)).squeeze(-1)


def _weights(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(logits - top)`` where ``mask`` (0 elsewhere) and ``top``, the largest logit there, ``(...)``:
    the stable unnormalized softmax over the last dimension (``mask`` holds one entry per row at least)."""
    top = torch.where(mask, logits, -math.inf).amax(-1)
    return torch.where(mask, torch.exp(logits - top[..., None]), 0.0), top


class _Rollouts:
    """The base sampler run on chosen rows of the forest (expansion and rollout, Alg. 1 lines 15-22)."""

    def __init__(
        self,
        who: str,
        den: Denoiser,
        slv: Solver,
        grid: Grid,
        reward: Reward,
        cond: dict[str, Any],
        generator: Generators,
        batch: int,
        in_dtype: torch.dtype,
    ) -> None:
        self.who, self.den, self.slv, self.grid, self.reward = who, den, slv, grid, reward
        self.cond, self.generator, self.batch = cond, generator, batch
        self.state = slv.init_state(grid)  # grid tables only (checked by dts)
        self.scale = math.hypot(grid.alpha[0], grid.sigma[0])
        # the divergence guard's data scale D: the initial noise's std (each rollout draws its own: no read)
        self.model = Model(den, cond, None, net_dtype=in_dtype, scale=self.scale)

    def run(self, forest: _Forest, start: Tensor, row_nfe: Tensor, rollout: int) -> Tensor:
        """Expand the rows whose new node is at depth ``start[b]`` (``> S + 1``: none) and roll them out to
        the terminal depth; their terminal rewards are stored. Returns the rows expanded. Each new node's
        state is bounded by the divergence guard (:meth:`~steerdiff.solvers.base.Model.note_state`), which
        names the ``rollout``-th rollout (from 1) and the step."""
        steps = self.grid.steps
        grid = self.grid
        diverged = diverged_step(
            self.slv, self.model, f"{self.who}'s rollout {rollout} (solver {self.slv.name!r})"
        )
        first = start == 1
        if bool(first.any()):
            rows = first.nonzero().flatten()
            x = randn(
                (len(rows), *forest.x.shape[3:]),
                take_generator_rows(self.generator, rows, self.batch),
                forest.x.dtype,
                forest.x.device,
            )
            forest.add(rows, 1, x if math.isclose(self.scale, 1.0, rel_tol=1e-9) else x * self.scale)
        for i in range(steps):  # from grid node i (depth i + 1) to i + 1
            rows = (start <= i + 2).nonzero().flatten()
            if len(rows) == 0:
                continue
            gens = take_generator_rows(self.generator, rows, self.batch)
            self.model.denoiser = self.den.take_rows(rows, self.batch)
            self.model.cond = take_kwarg_rows(self.cond, rows, self.batch)
            self.model.noise = noise = make_noise(gens)
            before = self.model.nfe
            out = self.slv.step(self.model, forest.state(i + 1, rows), i, self.grid, self.state)
            row_nfe[rows] += self.model.nfe - before
            x = advance(out, noise, grid.t[i], grid.t[i + 1])
            self.model.note_state(x, i, grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1], diverged)
            forest.add(rows, i + 2, x)
        rows = (start <= steps + 1).nonzero().flatten()
        if len(rows):
            x = forest.state(steps + 1, rows)
            r = _finite_reward(self.who, self.reward, RowSlice(None, len(x), x, 0.0, {}), self.model)
            forest.value[rows, steps + 1, forest.path[rows, steps + 1]] = r
        return rows


def _fits(slv: Solver, grid: Grid) -> bool:
    """Whether ``slv`` can grow trees over ``grid``: it draws noise there and keeps no history."""
    return slv.noisy_on(grid) and not keeps_history(slv, grid)


def _check_solver(who: str, solver: str | Solver, slv: Solver, grid: Grid) -> None:
    if not slv.noisy_on(grid):
        fits = [n for n in stochastic_solvers() if _fits(_solvers.get(n), grid)]
        accepted = f"{fits} or e.g. DDIM(eta > 0)" if fits else "none"
        if not fits and grid.steps == 1 and grid.clean_end:
            accepted += " (its one step is the jump to the clean end: use steps >= 2 or final='none')"
        raise ValueError(
            f"{who} needs a stochastic solver (a node's children must differ); solver {solver!r} adds no "
            f"noise on this grid of {grid.steps} steps. Accepted on it: {accepted}"
        )
    if keeps_history(slv, grid):
        raise ValueError(
            f"{who}: solver {slv.name!r} keeps a per-trajectory history in its state, which a tree node "
            "does not hold; use a one-step stochastic solver (ddpm, euler_ancestral, euler_maruyama, "
            "DDIM(eta > 0), dpmpp_sde, edm_sde, ...)"
        )


def _check_widening(who: str, widening: object) -> tuple[float, float]:
    if not isinstance(widening, tuple | list) or len(widening) != 2:
        raise ValueError(f"{who}: widening must be (C, alpha), C > 0 and alpha in [0, 1], got {widening!r}")
    return real(who, "widening[0]", widening[0], lo=0, lo_open=True), real(
        who, "widening[1]", widening[1], lo=0, hi=1
    )


def _check_branch(who: str, branch: object, steps: int) -> list[bool]:
    """Whether the nodes at each depth ``0..S`` may branch: the root, and the grid nodes of ``branch``."""
    if branch is None:
        return [True] * (steps + 1)
    if isinstance(branch, set | frozenset | list | tuple | range) and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= int(i) < steps for i in branch
    ):
        nodes = {int(i) for i in branch}
        return [True] + [i in nodes for i in range(steps)]
    raise ValueError(
        f"{who}: branch must be None or a set of grid nodes i, 0 <= i < steps = {steps}, got {branch!r:.60}"
    )


def dts(
    den: Denoiser,
    reward: Reward,
    lam: float = 1.0,
    *,
    shape: tuple[int, ...],
    rollouts: int = 64,
    samples: int = 1,
    greedy: bool = False,
    widening: tuple[float, float] = (2.0, 0.8),
    branch: Iterable[int] | None = None,
    exploration: float = 1.0,
    steps: int | None = None,
    solver: str | Solver = DEFAULT_SOLVER,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: Generators = None,
    progress: bool = False,
    **cond: Any,
) -> TreeSamples:
    """Diffusion Tree Sampling (``greedy=False``) or Diffusion Tree Search (``greedy=True``) towards
    ``p(x) exp(lam r(x))``, one tree of ``rollouts`` iterations per batch row (see the module docstring).

    Args:
        den: the denoiser (guided ones included).
        reward: ``r``, mapping ``(n, *shape)`` to finite ``(n,)``; gradient-free.
        lam: the tilt ``lambda >= 0`` (0: DTS samples the base sampler's law).
        shape: ``(batch, *sample_shape)``: ``batch`` independent trees.
        rollouts: tree-building iterations per row (the anytime budget), ``>= 1``.
        samples: draws per row from the finished tree (DTS); DTS* returns its one descent (``samples = 1``).
        greedy: DTS* (UCT selection, argmax descent) instead of DTS.
        widening: ``(C, alpha)`` of progressive widening, a node of ``N`` visits branching while it has
            fewer than ``C N^alpha`` children (``alpha = 0``: at most ``ceil(C)`` children); the paper's
            ``(2, 0.8)`` by default.
        branch: the grid nodes ``i`` (``0 <= i < steps``) whose states may have several children, the
            paper's branching schedule (its Sec. F.1 branches 100-step runs every 20 steps,
            ``branch=range(0, 100, 20)``); the others keep the one child their first rollout gave them.
            ``None``: every node. The root (the initial noise's parent) always branches.
        exploration: DTS*'s UCT constant ``c_uct >= 0`` (unused by DTS).
        steps, solver, schedule, final: the base sampler's grid and a stochastic solver without history
            (``steps=None``: 50, or an explicit grid's count, as :func:`steerdiff.sample`'s).
        dtype, device: of the states (torch's default dtype, CPU).
        generator: ``None``, one ``torch.Generator``, or a list of one per batch row: row ``b``'s tree then
            draws from ``generator[b]`` alone (the same tree alone or in any batch).
        progress: a tqdm bar over the rollouts.
        **cond: passed to the network; tensors with ``batch`` rows are taken at the rows of each call.

    Returns:
        :class:`TreeSamples`: ``x`` ``(batch, samples, *shape)``, ``reward``, ``nfe`` / ``row_nfe``,
        ``best`` / ``best_reward`` and the root's soft ``value``.

    Example:
        >>> out = sd.smc.dts(den, reward, lam=2.0, shape=(4, 2), rollouts=256, samples=16, steps=50)
        >>> best = sd.smc.dts(den, reward, lam=10.0, shape=(4, 2), rollouts=256, greedy=True).best
    """
    who = "dts"
    check_denoiser(who, "den", den)
    check_sample_only(who, cond, PARTICLE_SAMPLE_ONLY, PARTICLE_SAMPLE_ONLY_WHY)
    refuse_x_T(who, cond, "each rollout draws its node 0, the initial noise, from the generator")
    _check_reward(reward, who)
    lam = real(who, "lam", lam, lo=0)
    shape = _check_shape(shape, who)
    batch, sample_shape = shape[0], shape[1:]
    check_sample_shape(f"{who}: shape", den, sample_shape)
    rollouts = integer(who, "rollouts", rollouts, lo=1)
    greedy = boolean(who, "greedy", greedy)
    samples = integer(who, "samples", samples, lo=1)
    if greedy and samples != 1:
        raise ValueError(
            f"{who}: samples must be 1 with greedy=True (DTS* returns its argmax descent), got {samples}"
        )
    widen_c, widen_alpha = _check_widening(who, widening)
    exploration = real(who, "exploration", exploration, lo=0)
    final = choice(who, "final", final, FINALS)
    sched = _schedules.get(schedule, who)
    steps = count_steps(who, steps, sched, final, 50, process=den.process)
    branches = _check_branch(who, branch, steps)
    progress = boolean(who, "progress", progress)
    in_dtype = torch.get_default_dtype() if dtype is None else sample_dtype(who, "dtype", dtype)
    device = device_or_none(who, "device", device)
    generator = check_generators(who, generator, batch)
    check_seeded(den, generator, who)
    slv = _solvers.get(solver, who)
    grid = make_grid(den.process, sched, steps, final)
    _check_solver(who, solver, slv, grid)

    # no autograd graph: the tree's states are written into one table, so a graph would chain every
    # rollout's calls to the end (guided denoisers that need gradients turn them on inside their call)
    with torch.no_grad():
        x_like = torch.zeros((), dtype=work_dtype(in_dtype), device=device)
        forest = _Forest(batch, steps, rollouts, sample_shape, x_like)
        forest.lam = lam
        runner = _Rollouts(who, den, slv, grid, reward, cond, generator, batch, in_dtype)
        row_nfe = torch.zeros(batch, dtype=torch.long, device=x_like.device)
        best_reward = torch.full((batch,), -math.inf, dtype=F64, device=x_like.device)
        best = x_like.new_zeros((batch, *sample_shape))
        every = torch.arange(batch, device=x_like.device)
        for rollout in tqdm(range(rollouts), desc=who, leave=False) if progress else range(rollouts):
            u = None if greedy else rand((batch, steps + 1), generator, F64, x_like.device)
            start = torch.full((batch,), steps + 2, dtype=torch.long, device=x_like.device)
            going = torch.ones(batch, dtype=torch.bool, device=x_like.device)
            for d in range(steps + 1):  # selection (Alg. 1, lines 8-13) from the node at depth d
                limit = widen_c * forest.at(forest.visits, d) ** widen_alpha if branches[d] else 1.0
                widen = going & (forest.at(forest.children, d) < limit)
                start = torch.where(widen, d + 1, start)
                going &= ~widen
                if not bool(going.any()):
                    break
                child = _select(forest, d, forest.path[:, d], None if u is None else u[:, d], exploration)
                forest.path[:, d + 1] = torch.where(going, child, forest.path[:, d + 1])
            rows = runner.run(forest, start, row_nfe, rollout + 1)
            r = forest.at(forest.value, steps + 1, rows)
            better = r > best_reward[rows]
            best_reward[rows] = torch.where(better, r, best_reward[rows])
            best[rows] = torch.where(
                better.reshape(-1, *([1] * len(sample_shape))), forest.state(steps + 1, rows), best[rows]
            )
            forest.backup()
        runner.model.check_finite()

        # sampling (Alg. 2): descend from the root to a terminal node, `samples` times per row
        node = torch.zeros(batch, samples, dtype=torch.long, device=x_like.device)
        u = None if greedy else rand((batch, samples, steps + 1), generator, F64, x_like.device)
        for d in range(steps + 1):
            node = _select(forest, d, node, None if u is None else u[..., d], 0.0)
        x = forest.x[every[:, None], steps, node]
        out_reward = forest.value[every[:, None], steps + 1, node]
        log_w = torch.full((batch, samples), -math.log(samples), dtype=F64, device=x.device)
        return TreeSamples(
            to_sample_dtype(who, x, in_dtype), log_w, int(row_nfe.max()), None, out_reward, row_nfe,
            to_sample_dtype(who, best, in_dtype), best_reward, forest.value[:, 0, 0].clone(),
        )  # fmt: skip
