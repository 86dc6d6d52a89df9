r"""Weighted particle systems over a stochastic solver: the one sequential Monte Carlo engine.

Layout: ``x`` is ``(batch, particles, *shape)``; every batch row is an independent particle system
of ``N = particles`` particles with log-weights ``(batch, particles)``. The solver sees the
``batch * particles`` rows flattened (row ``b`` owns rows ``b N .. b N + N - 1``), and the denoiser
is evaluated on at most ``max_batch`` of them at a time.

The loop (Del Moral, Doucet & Jasra 2006, "Sequential Monte Carlo samplers"; Naesseth, Lindsten &
Schön 2019, "Elements of Sequential Monte Carlo", Alg. 2 with adaptive resampling), over the
solver's grid nodes ``i = 0..S`` (``S = steps``), per batch row::

    x_0 ~ N(0, (alpha_0^2 + sigma_0^2) I),  log W = -log N,  log Z = 0
    for i = 0..S-1:
        B_i = solver.step(model, x_i, i, grid, state)        # base transition N(mean, std^2)
        g = algorithm.log_weight(ctx_i)                      # hook (b); None: weights unchanged
        if g is not None:
            log Z += logsumexp(log W + g);  log W = normalize(log W + g)
        a = algorithm.resample(ctx_i, log W, generator)      # hook (c); None: the engine's rule
        if a is None and g is not None and ESS(W) < ess_threshold * N:
            a = resampler(log W, generator)                  # per row; rows above threshold keep a = id
        if a: x_i, B_i, solver state, ctx.state <- their rows a;  log W = -log N
        P_i = algorithm.propose(ctx_i, B_i)                  # hook (a); default P_i = B_i
        x_{i+1} = P_i.mean + P_i.std z,  z ~ N(0, I)
        if step i crosses a break of den: solver.moved(state)  # history restarted, as in sd.sample
    g = algorithm.log_weight(ctx_S); log Z += ...; log W = ...    # the final node; no resampling

``B_i`` is a deterministic function of ``x_i`` and the solver state, so it is computed once (the
step's network call also gives ``x0(x_i)``, the denoised estimate the hooks see) and resampled
with ``x_i``; fresh noise is drawn after resampling, so copies of a particle diverge at once.
Solvers that draw noise *inside* their step (``edm_sde``, ``restart``, ``dpmpp_sde``) return
``x_{i+1}`` already: resampling then moves the pair ``(x_i, x_{i+1})`` jointly (a valid SMC move,
but copies share that step's noise); those are refused by algorithms that need the transition
density (``needs_transition``). The running estimate ``log Z`` is the standard unbiased SMC
estimator of ``Z = E_{base path}[prod_i G_i]`` (unbiased for ``Z``, not ``log Z``).

**Hooks** (subclass :class:`SMCAlgorithm`; every hook gets a :class:`StepContext` ``ctx``):

* ``init_state(x) -> dict[str, Tensor]``: the algorithm's per-particle state, tensors
  ``(batch, particles, ...)``; the engine resamples them with the particles (ancestry is kept).
* ``check_steps(steps)``: refuse (``ValueError``) options a run of ``steps`` steps could never use,
  such as potential nodes outside ``0..steps - 1`` (:func:`check_nodes`); called before the run.
* (b) ``log_weight(ctx) -> Tensor | None``: the incremental log-weight ``(batch, particles)`` of the
  particles ``ctx.x`` at node ``ctx.i`` (``None``: weights unchanged). It may read ``ctx.x0``
  (denoised estimate, free at ``i < S``), ``ctx.reward(z)`` (the user's reward, chunked),
  ``ctx.map_rows(fn)`` (any function of the particles, chunked), ``ctx.value_grad(...)`` (values and
  gradients, chunked, through ``x0`` where asked: for ``grad`` algorithms),
  ``ctx.x_prev``, ``ctx.base_prev`` / ``ctx.proposal_prev`` (the transitions that produced
  ``ctx.x`` from ``ctx.x_prev``; :func:`transition_log_prob` gives their exact log-densities, so a
  twisted proposal adds ``log N(x; base) - log N(x; proposal)``) and read/write ``ctx.state``; work through
  the network that no call of the denoiser makes (backward passes) it counts with ``ctx.count(calls)``.
  At ``ctx.final`` (``i = S``) it returns the final correction (nothing is resampled after it).
  Increments are finite or ``-inf`` (a zero weight); NaN, ``+inf`` or ``-inf`` for every particle
  of a row is a ``ValueError`` naming the node (at once for CPU tensors, else at the end of the run).
* (c) ``resample(ctx, log_w, generator) -> Tensor | None``: integer ancestor indices
  ``(batch, particles)`` in ``[0, particles)`` (checked as a resampler's are,
  :mod:`~steerdiff.smc.resample`) to force a selection at this node (greedy methods: CoDe, SVDD);
  weights are reset to uniform (``log Z`` is then no longer an estimator of anything).
* (a) ``propose(ctx, base) -> Transition``: the Gaussian the next state is drawn from, given the
  (resampled) base transition ``base`` (mean ``(batch, particles, *shape)``, ``std`` a float or a
  tensor of that shape); default ``base``. Its ``ctx`` is the resampled one: ``x``, ``x0``,
  ``state`` and the ``*_prev`` fields all follow the ancestor indices. A step that returns a
  tensor (the clean last step of ``final="zero"``; solvers that draw noise inside their step) gives
  ``base = Transition(x_next, 0.0)``, a point mass: a proposal keeps it (``std = 0``, the same mean),
  and the correction of (b) is then 0 (:func:`transition_log_prob` of a point mass at its mean).
* Class flags: ``stochastic`` (a stochastic solver is required; default True), ``grad`` (the step is
  run with ``ctx.x`` a leaf requiring grad, so in ``log_weight`` ``ctx.x0`` is differentiable w.r.t.
  ``ctx.x``: take gradients there (``torch.autograd.grad`` or ``ctx.value_grad``) and keep what
  ``propose`` needs in ``ctx.state``; the engine detaches everything afterwards), ``sliced_grad`` (with
  ``grad``: ``log_weight`` takes its gradients with ``ctx.value_grad`` alone, so with ``max_batch`` below
  ``batch * particles`` the step runs without a graph, which would hold every row at once,
  ``log_weight`` is called before the step (it sees nothing of it) and ``value_grad`` evaluates the
  denoiser slice by slice, each slice's graph made and freed in turn, that prediction the step's own:
  no second evaluation; TDS's),
  ``needs_transition`` (refuse solvers that draw noise inside their step, whose ``x_{i+1}`` has no
  Gaussian density given ``x_i``), ``shardable`` (whether the hooks are right on one rank's share of
  a row's particles, ``group=`` below: ``True``, ``False``, or ``None``, the default: yes unless the
  class overrides ``resample``).

**Slices** (``max_batch``): the denoiser, ``ctx.reward``, ``ctx.map_rows`` and ``ctx.value_grad`` (their
functions and the graphs they differentiate) see at most ``max_batch`` of the flat rows at a time, with
the per-row tensors of ``**cond`` sliced alike (:class:`RowSlice`); a hook that calls a function of its
own on ``ctx.x`` or ``ctx.x0`` directly sees all ``batch * particles`` rows.

Per-particle solver state (multistep histories, SA-Solver's corrector term) is resampled with the
particles: every tensor in the solver's state dict whose first dimension is ``batch * particles`` is
permuted, nested in dicts, lists, tuples (namedtuples too), ``collections.deque``, dataclasses,
:class:`~steerdiff.solvers.base.History` and :class:`~steerdiff.denoiser.Prediction`; Python numbers
are schedule constants, and so are the tensors of ``Solver.init_state(grid)`` (made from the grid before
any particle exists: a table of the grid's ``steps + 1`` times is not permuted where that is the particles'
count) as long as the state holds them. Any other object holding a tensor (a user class) is refused with a
``ValueError``: its tensors would stay with the old particles.

**Ranks** (``group=``, a ``torch.distributed`` process group; every rank makes the same call): rank
``r`` holds the particles ``Ranks.shard(N)`` of every batch row (contiguous, the lower ranks one more
where ``N`` does not divide), so the solver, the denoiser, ``reward``, ``max_batch``'s slices and the hooks'
``ctx.x``, ``ctx.x0``, ``ctx.state`` are a rank's ``(batch, n_r, ...)``; ``**cond`` and a denoiser's
per-sample state are taken at its rows. The loop above then runs, on every rank::

    x_0, every step's z:  drawn for all N particles from the generator(s), the rank's shard kept
    g = all_gather(log_weight(ctx_i))            # (batch, n_r) -> (batch, N), in particle order
    log W, log Z, ESS, a = resampler(log W, generator):  on (batch, N), identical on every rank
    if a:  x_i, B_i, solver state, ctx.state <- all_gather(rows)[a[:, shard]]   # one gather for all
    at the end:  x, rewards <- all_gather;  every rank returns the whole system

so the generators advance alike on every rank and the run equals the one-process run with the same
generators (bitwise on the CPU in float64, where the net's arithmetic does not depend on how many rows
it is called with; rounding apart where it does, as ``max_batch`` slices of another size).
The generators' states (torch's global RNG's for ``generator=None``) are checked to be alike on every rank
(a digest of them in the set-up's all_reduce, below: a generator seeded with the rank would give a run
equal to no one-process run, silently); a denoiser that draws noise of its own for the rows it is called
with (``CADS``, ``RePaint``) is refused. The communication, one all_gather each (:meth:`Ranks.gather_many
<steerdiff.distributed.Ranks.gather_many>` packs every tensor of one into one buffer, as collectives cost a
latency each): the ``(batch, N)`` increments at each weighted node;
at each node where a row resamples (on the CPU; elsewhere at every weighted node, as which rows resample is
not read off the device) the per-particle tensors (the particles, their transition, the solver's history,
the algorithm's state), and the prediction and the parents when a hook reads them after it; and the
particles and rewards at the end; one all_reduce at the start, of the set-up's failure flags and the
generators' digest, and on the CPU one per node, of the failure flags (below). fk_steering on the CPU so
makes ``steps + 1`` (its weighted nodes) + its nodes with an event + 1 all_gathers and 1 + ``steps + 1``
all_reduces. Every
rank receives the whole system's state, where an exchange of the rows that move would send less. A
solver-state tensor is per-particle where its first dimension is the rank's ``batch * n_r`` rows, but for
the constants of ``init_state`` (alike on every rank): keep a constant tensor a step makes a Python number
(as every built-in solver does), for one of that length would be gathered by the ranks of that shard size
alone. Whether ``max_batch`` slices (``sliced_grad``)
is decided on the whole system's ``batch * N`` rows, alike on every rank; ``progress`` shows rank 0's bar.
Hooks that act across a row's particles read every rank's with :meth:`StepContext.gather` (and their own
share of a result with :attr:`StepContext.shard`): ``resample`` receives the global ``log_w`` ``(batch,
N)`` and returns global ancestors; SVDD, best-of-N and CoDe select so. A hook is a collective wherever it
gathers or reads ``ctx.reward`` (every rank must make the same calls in the same order, and ``log_weight``
return ``None`` on every rank or on none: its increments are gathered), and an algorithm that overrides
``resample`` without setting ``shardable = True`` is refused (its selection would see one rank's share).
Checks of the weights and the ancestors are on values every rank shares, and a NaN/inf from any rank's net
or reward is reported by every rank, so every rank raises alike: each rank's flags ride the run's next
gather (the increments', a hook's :meth:`StepContext.gather`, a resampling's, the last; a gather of the
flags alone ends a step that made none on the CPU), read there for CPU tensors, at the end otherwise, and
raised in one process's order (a net output before the rewards computed after it). A hook thus sees a
step's non-finite net output before it is raised. Any other error on some ranks (a user's net, reward
or hook raising, a ``log_weight`` of the wrong shape, an argument that differs between the ranks) is
raised by those ranks, each its own, and every other rank raises a ``RuntimeError`` naming them
(:meth:`Ranks.fail_together <steerdiff.distributed.Ranks.fail_together>`), never waiting at a collective
for a rank that is gone:

* in the set-up (the argument checks, a wrapper's included (fk_steering's, tds's, ...), the first draws, the
  solver's and the algorithm's ``init_state``), at its end: the run's first collective, one all_reduce of
  the ranks' flags and the generators' digest (:meth:`Ranks.start <steerdiff.distributed.Ranks.start>`),
  whose layout no argument changes, so a rank that failed anywhere before it makes it too; on any device;
* in a node, on the CPU: the flags are an all_reduce of a one-hot row per rank of their own, made where code
  that can fail on one rank alone ran since their last exchange (the step, the reward, the algorithm's own
  hooks; not the engine's work on the values every rank shares, nor a resampler, a function of them) and
  before the ranks' next collective (which depends on what the failing rank did not compute: whether the
  node has increments, which reward checks ride along, so the flags cannot ride it), read at once: before
  the node's first gather, or at its end where it made none (one per node); before a later gather of the
  node where a hook ran since (a ``resample`` hook's selection, a ``propose`` hook reading the resampled
  parents), and before the next gather after a hook's own :meth:`StepContext.gather` (the hook's code after
  it can fail on one rank alone; ``last=True`` says it cannot, as SVDD's, best-of-N's and CoDe's selections
  on the gathered rewards: none then). The tail of a node that made its exchange (a ``resample`` or
  ``propose`` hook after the increments' gather, as TDS's proposal) is carried into the next exchange,
  one node's step later, at no collective of its own: fk_steering, TDS, SVDD, best-of-N and CoDe make one
  per node, as they did when such errors were not covered. A rank whose node raised makes the exchange
  due, its flag set, then raises.

Off the CPU a node makes none (the run reads nothing from the device before its end, and the flags would
be a read, a sync, per node): there an error on one rank in a node leaves the others waiting at their next
collective until the process group's timeout. Where such an error and a NaN fall in the same node on
different ranks, the other error is what is raised.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import schedules as _schedules
from .. import solvers as _solvers
from .._checks import boolean, choice, device_or_none, integer, real, sample_dtype, sizes
from .._ops import first_false, kept
from ..denoiser import Denoiser, Prediction, check_denoiser, check_sample_shape, take_kwarg_rows
from ..distributed.group import Ranks, particle_ranks, spread_run
from ..guidance.base import Guided, value_grad
from ..noise import (
    GeneratorNoise,
    Generators,
    NoiseSource,
    PerSampleNoise,
    Shard,
    check_generators,
    rand,
    randn,
    repeat_rows,
)
from ..sampling import check_sample_only, check_seeded, check_x_T, crossings
from ..schedules import ScheduleLike
from ..solvers.base import (
    FINALS,
    Failure,
    Grid,
    Model,
    Solver,
    Transition,
    count_steps,
    diverged_error,
    make_grid,
    map_state,
    to_sample_dtype,
    work_dtype,
)
from . import resample as _resample

__all__ = [
    "DEFAULT_SCHEDULE",
    "DEFAULT_SOLVER",
    "PARTICLE_SAMPLE_ONLY",
    "Ancestors",
    "Particles",
    "RowSlice",
    "SMCAlgorithm",
    "StepContext",
    "Trace",
    "Weights",
    "check_nodes",
    "check_weights",
    "particle_shape",
    "refuse_x_T",
    "run_smc",
    "stochastic_solvers",
    "transition_log_prob",
]

DEFAULT_SOLVER = "ddpm"
DEFAULT_STEPS = 100  # the particle methods' steps=None without an explicit grid (count_steps)
DEFAULT_SCHEDULE = "karras_jump"  # not sd.sample's karras_capped: FK weights fail over its long top step
# sample's keyword arguments that the particle methods have none of: in **cond they would reach the net
PARTICLE_SAMPLE_ONLY = ("callback", "corrector", "corrector_steps", "snr")
PARTICLE_SAMPLE_ONLY_WHY = (
    "whose particles take the solver's steps alone, with no callback between them and no corrector moves; "
    "the other keyword arguments are the net's conditions (**cond)"
)
Reward = Callable[[Tensor], Tensor]
_T = TypeVar("_T")


# --- results --------------------------------------------------------------------------------------


@dataclass
class Trace:
    """Diagnostics per grid node ``i = 0..S``, each ``(S + 1, batch)``: ``ess`` after the node's
    reweighting (before resampling), ``resampled`` (a resampling or forced selection happened) and
    ``log_z``, the running log-normalizer estimate."""

    ess: Tensor
    resampled: Tensor
    log_z: Tensor

    @property
    def events(self) -> list[list[int]]:
        """The nodes at which each batch row was resampled."""
        return [row.nonzero().flatten().tolist() for row in self.resampled.T.cpu()]


@dataclass
class Particles:
    """A weighted particle system: ``x`` ``(batch, particles, *shape)`` and normalized log-weights
    ``log_w`` ``(batch, particles)`` (``logsumexp = 0`` per row, float64).

    ``nfe``: network evaluations spent per batch row (every particle's evaluations counted: ``steps *
    particles`` for a one-evaluation-per-step solver, ``(steps - 1) * particles + 1`` where node 0's step
    is the first particle's alone, :attr:`SMCAlgorithm.one_start`); ``trace``: the run's :class:`Trace`;
    ``reward``: the particles' rewards ``(batch, particles)`` where the algorithm computed them.
    """

    x: Tensor
    log_w: Tensor
    nfe: int = 0
    trace: Trace | None = None
    reward: Tensor | None = None

    @property
    def batch(self) -> int:
        """The number of independent particle systems (rows of ``x``)."""
        return self.x.shape[0]

    @property
    def particles(self) -> int:
        """The number of particles per system."""
        return self.x.shape[1]

    @property
    def weights(self) -> Tensor:
        """``W = exp(log_w)``, ``(batch, particles)``."""
        return torch.exp(self.log_w)

    def ess(self) -> Tensor:
        """Effective sample size ``1 / sum W^2`` per batch row, ``(batch,)``."""
        return _resample.ess(self.log_w)

    @property
    def log_z(self) -> Tensor:
        """The run's final log-normalizer estimate per row, ``(batch,)``."""
        if self.trace is None:
            raise ValueError("Particles.log_z: these particles carry no trace (no log Z estimate)")
        return self.trace.log_z[-1]

    def mean(self, values: Tensor | None = None) -> Tensor:
        """Self-normalized estimate ``sum_j W_j f_j`` per row of ``values`` ``(batch, particles, ...)``
        (default ``x``): the weighted estimate of ``E_target[f]``."""
        v = self.x if values is None else values
        if not isinstance(v, Tensor) or v.shape[:2] != self.log_w.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                "Particles.mean: values must be a tensor (batch, particles, ...) = "
                f"{tuple(self.log_w.shape)}, got {got}"
            )
        w = self.weights.to(v.dtype).reshape(*self.log_w.shape, *([1] * (v.ndim - 2)))
        return (w * v).sum(1)

    def resample(self, indices: Tensor) -> Particles:
        """The particles at ancestor ``indices`` ``(batch, n)``, integers in ``[0, particles)``, equally
        weighted (a ``ValueError`` otherwise: an index out of range wrapped to another particle)."""
        batch, n_part = self.log_w.shape
        shaped = _is_index_tensor(indices) and indices.ndim == 2 and indices.shape[0] == batch
        if not shaped or indices.shape[1] < 1:
            got = (
                f"{indices.dtype} {tuple(indices.shape)}"
                if isinstance(indices, Tensor)
                else type(indices).__name__
            )
            raise ValueError(
                "Particles.resample: indices must be integers of shape (batch, n) = "
                f"({batch}, n >= 1), got {got}"
            )
        indices = indices.to(self.x.device, torch.long)
        lo, hi = torch.aminmax(indices)
        if not (bool(lo >= 0) and bool(hi < n_part)):
            raise ValueError(
                f"Particles.resample: indices must lie in [0, particles) = [0, {n_part}), "
                f"got {int(lo)}..{int(hi)}"
            )
        x = torch.take_along_dim(self.x, indices.reshape(*indices.shape, *([1] * (self.x.ndim - 2))), dim=1)
        log_w = torch.full(
            indices.shape, -math.log(indices.shape[1]), dtype=self.log_w.dtype, device=x.device
        )
        reward = None if self.reward is None else torch.take_along_dim(self.reward, indices, dim=1)
        return Particles(x, log_w, self.nfe, self.trace, reward)

    def sample(self, generator: Generators = None) -> Tensor:
        """One draw per batch row from the weighted particles (multinomial): ``(batch, *shape)``;
        ``generator``: one, or one per batch row."""
        generator = check_generators("Particles.sample", generator, self.batch)
        u = rand((self.batch, 1), generator, torch.float64, self.log_w.device)
        idx = _resample._inverse_cdf(self.log_w, u)
        return self.resample(idx).x[:, 0]


def transition_log_prob(x: Tensor, tr: Transition) -> Tensor:
    """``log N(x; tr.mean, tr.std^2 I)`` summed over each particle's values: ``(batch, particles)``
    float64 for ``x`` ``(batch, particles, *shape)``. Exact for the Gaussian steps of stochastic
    solvers; a twisted proposal's weight is ``transition_log_prob(x, base) -
    transition_log_prob(x, proposal)``.

    Where ``std = 0`` (a deterministic step, such as the clean step of ``final="zero"``) the value is a
    point mass's: 0 at ``x = mean``, ``-inf`` elsewhere, so the correction between two point masses
    at the same mean is 0."""
    std = tr.std
    if not isinstance(std, Tensor):
        if not std >= 0:
            raise ValueError(f"transition_log_prob: std must be >= 0, got {std}")
        if std > 0:  # one scale for all; the squares accumulated in float64 (float32: 4e-3 nats off at 3e4)
            d = (x - tr.mean).flatten(2)
            ss = (d * d).sum(-1, dtype=torch.float64)
            return ss * (-0.5 / std**2) - d.shape[-1] * (math.log(std) + 0.5 * math.log(2 * math.pi))
        std = torch.full((), 0.0, dtype=x.dtype, device=x.device)  # a fill, not a host copy
    point = std == 0
    s = torch.where(point, torch.ones_like(std), std)  # no 0 / 0 (nor its NaN gradient) at point masses
    z = (x - tr.mean) / s
    lp = -0.5 * z * z - torch.log(s) - 0.5 * math.log(2 * math.pi)  # x's shape (std broadcasts)
    lp = torch.where(point, torch.where(z == 0, 0.0, -math.inf).to(lp.dtype), lp)
    return lp.sum(tuple(range(2, x.ndim)), dtype=torch.float64)


# --- the algorithm contract -----------------------------------------------------------------------


@dataclass
class RowSlice:
    """At most ``max_batch`` of the flat particle rows (``batch * particles``, row ``b N + j`` holding
    particle ``j`` of batch row ``b``): what the function of :meth:`StepContext.map_rows` and
    :meth:`StepContext.value_grad` is called on.

    ``rows``: the slice of the ``n`` flat rows (``None``: all of them, one piece); ``x``: the particles
    there, ``(k, *shape)``; ``t``: the node's process time (a float for the hooks' functions); ``cond``:
    the run's ``**cond`` at those rows; ``x0``: their denoised estimate, where asked for (else ``None``).
    """

    rows: slice | None
    n: int
    x: Tensor
    t: float | Tensor
    cond: dict[str, Any]
    x0: Tensor | None = None

    def take(self, value: Tensor) -> Tensor:
        """``value``'s rows here where it has one per flat row (``n``), else ``value`` (shared by all): the
        rule of ``cond``'s tensors (:func:`~steerdiff.denoiser.take_kwarg_rows`)."""
        return take_kwarg_rows({"v": value}, self.rows, self.n)["v"] if self.rows is not None else value


class StepContext:
    """What the hooks see at grid node ``i`` (see the module docstring).

    ``x`` ``(batch, particles, *shape)`` are the particles at node ``i``; ``x_prev``, ``base_prev``
    and ``proposal_prev`` the parents at node ``i - 1`` and the transitions ``x`` was drawn from
    (``None`` at node 0); ``state`` the algorithm's per-particle state (read and write).
    """

    def __init__(
        self,
        run: _Run,
        i: int,
        x: Tensor,
        pred: Prediction | None,
        prev: tuple[Tensor, Transition, Transition] | None,
        state: dict[str, Tensor],
        rows: Tensor | None = None,
        pending: Tensor | None = None,
    ) -> None:
        self._run, self.i, self._x, self._pred, self._prev, self.state = run, i, x, pred, prev, state
        self._rows = rows
        self._pending = pending  # ancestor rows of a take() not yet applied to _pred and _prev

    def _gather(self) -> None:
        """Apply a pending :meth:`take` to the prediction and the parents: on first use, as no built-in
        ``propose`` reads them (gathering them at every resampling cost fk_steering 11-33% of a step)."""
        if self._pending is not None:
            idx, self._pending = self._pending, None
            self._pred, self._prev = self._run.take((self._pred, self._prev), idx)

    @property
    def grid(self) -> Grid:
        """The run's grid of times and coefficients."""
        return self._run.grid

    @property
    def final(self) -> bool:
        """Whether this is the last node (``i = steps``): the algorithm's final correction."""
        return self.i == self._run.grid.steps

    @property
    def t(self) -> float:
        """The process time of this node, ``grid.t[i]``."""
        return self._run.grid.t[self.i]

    @property
    def log_w(self) -> Tensor:
        """The particles' normalized log-weights ``(batch, N)`` (float64): in ``log_weight`` those they carry
        into this node (before its increment; uniform after a resampling), in ``resample`` those after its
        reweighting, in ``propose`` after its resampling too. With ``group``, the whole system's (this rank's
        particles are ``[:, shard]``)."""
        assert self._run.weights is not None, "run_smc makes the weights before the first node"
        return self._run.weights.log_w

    @property
    def cond(self) -> dict[str, Any]:
        """The ``**cond`` keyword arguments of the run (per flat row where they are tensors)."""
        return self._run.model.cond

    @property
    def x(self) -> Tensor:
        """The particles ``(batch, particles, *shape)`` (with ``grad``: the leaf ``x0`` depends on)."""
        if self._rows is None:
            self._rows = self._run.rows(self._x)
        return self._rows

    @property
    def x_prev(self) -> Tensor | None:
        """The particles at the previous node, in the current ancestry; ``None`` at the first node."""
        self._gather()
        return None if self._prev is None else self._run.rows(self._prev[0])

    @property
    def base_prev(self) -> Transition | None:
        """The base solver's transition that led here from :attr:`x_prev`; ``None`` at the first node."""
        self._gather()
        return None if self._prev is None else _view(self._prev[1], self._run)

    @property
    def proposal_prev(self) -> Transition | None:
        """The transition the particles were drawn from (twisted or base); ``None`` at the first node."""
        self._gather()
        return None if self._prev is None else _view(self._prev[2], self._run)

    def prediction(self) -> Prediction:
        """The denoiser's prediction at ``(x_i, t_i)`` on the flattened rows ``(batch * particles, *shape)``:
        the one the solver's step computed, or one extra (counted) evaluation if it computed none there."""
        self._gather()
        if self._pred is None:
            if self.grid.sigma[self.i] == 0:
                raise ValueError("the clean node has no prediction; use ctx.x0 (= ctx.x there)")
            self._pred = self._run.model(self._x, self.t, self.i)
        return self._pred

    @property
    def x0(self) -> Tensor:
        """The denoised estimate ``E[x_0 | x_i]``, ``(batch, particles, *shape)`` (``x`` at a clean node)."""
        if self.grid.sigma[self.i] == 0:
            return self.x
        return self._run.rows(self.prediction().x0)

    def reward(self, z: Tensor) -> Tensor:
        """The user's reward on ``z`` ``(batch, particles, *shape)`` in chunks: ``(batch, particles)``."""
        return self._run.reward(z, self.i)

    def map_rows(self, fn: Callable[[RowSlice], Tensor], z: Tensor | None = None) -> Tensor:
        """``fn`` on slices of at most ``max_batch`` flat rows of ``z`` ``(batch, particles, *shape)``
        (default ``x``; one call for ``max_batch=None``): ``fn(rows)`` maps a :class:`RowSlice` to ``(k,)``
        values; returns them ``(batch, particles)``."""
        run = self._run
        flat = run.flat(self.x if z is None else z)
        return run.rows(_map_rows(run.max_batch, fn, flat, self.t, self.cond))

    def value_grad(
        self, who: str, what: str, fn: Callable[[RowSlice], tuple[Tensor, Tensor]], denoised: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``(v, grad_x sum(u))`` at the particles, ``(batch, particles)`` (detached) and ``x``'s shape:
        ``fn(rows)`` returns per-row values ``v`` and a differentiable objective ``u`` (often ``v``), both
        ``(k,)``, computed from ``rows.x`` and, with ``denoised``, ``rows.x0`` (differentiable w.r.t.
        ``rows.x``; ``denoised`` needs an algorithm with ``grad``).

        In one piece (``max_batch=None``, or no more rows than it, or an algorithm without ``sliced_grad``)
        this differentiates the step's own graph (no network evaluation; the algorithm's ``grad`` set).
        Without ``denoised`` no network is involved: ``fn`` is differentiated on a copy of ``x`` (one piece,
        or slices), and an algorithm whose only gradients are these needs no ``grad`` (its step's network then
        runs without a graph). In slices of ``max_batch`` rows (``sliced_grad``), where the step runs without
        a graph (it would hold every row at once), each slice's denoised estimate is evaluated with its graph,
        differentiated and freed before the next slice: neither ``fn`` nor a graph sees more than
        ``max_batch`` rows. Called in ``log_weight`` (before the step, in slices) that evaluation is the
        step's own; elsewhere it is one more, counted. ``ValueError`` naming ``who`` and ``what`` where ``u``
        does not depend on ``x`` differentiably."""
        _check_grad_mode(who, what)  # a gradient in x alone too (an algorithm without grad)
        run = self._run
        if not run.sliced_grad and denoised:
            flat = run.flat(self.x)
            v, u = fn(RowSlice(None, flat.shape[0], flat, self.t, self.cond, run.flat(self.x0)))
            return run.rows(v.detach()), value_grad(who, what, u, self.x)
        values: list[Tensor] = []
        grads: list[Tensor] = []

        def record(rows: RowSlice, x: Tensor, x0: Tensor | None) -> None:
            v, u = fn(RowSlice(rows.rows, rows.n, x, rows.t, rows.cond, x0))
            values.append(v.detach())
            grads.append(value_grad(who, what, u, x))

        def through(rows: RowSlice, net: Callable[[Tensor], Prediction]) -> Prediction:
            with torch.enable_grad():
                x = rows.x.detach().requires_grad_(True)
                pred = net(x)
                # the step's prediction as the net gave it, detached (the slice's graph is freed with
                # pred): before fn derives pred's other estimate, which the step would then read instead
                # of deriving it (an eps net's x0: x0_given, other rounding than the unsliced run's)
                step_pred = _detach(pred)
                record(rows, x, pred.x0)
            return step_pred

        flat = self._x.detach()
        if denoised and self.grid.sigma[self.i] > 0:
            run.evaluator.through = through
            try:
                pred = run.model(self._x, self.t, self.i)
            finally:
                run.evaluator.through = None
            if self._pred is None and self._pending is None:  # the step's own, when made before it
                self._pred = pred
        else:  # no network: the slices of x (the clean node's estimate is x itself)
            for sl, xs, _, cs in _row_chunks(run.max_batch, flat, self.t, self.cond):
                with torch.enable_grad():
                    x = xs.detach().requires_grad_(True)
                    record(RowSlice(sl, flat.shape[0], x, self.t, cs), x, x if denoised else None)
        return run.rows(torch.cat(values)), run.rows(torch.cat(grads))

    def count(self, calls: int) -> None:
        """Count ``calls`` more network evaluations of every particle in the run's ``nfe``: work through the
        network that the model's calls do not count, such as backward passes through the step's evaluation
        (:class:`~steerdiff.smc.DriftLite`'s divergences)."""
        self._run.model.nfe += calls

    def take(self, idx: Tensor, *others: Any) -> tuple[Any, ...]:
        """The context with particles (and everything per-particle) at flat ancestor rows ``idx``, and
        ``others`` (the transition, the solver state) taken with it (:meth:`_Run.take`: with ``group``, one
        all_gather for all of them); the prediction and the parents follow when first read."""
        run = self._run
        state = {k: run.flat(v) for k, v in self.state.items()}
        x, state, pending, *others = run.take((self._x, state, self._pending, *others), idx)
        state = {k: run.rows(v) for k, v in state.items()}
        pending = idx if pending is None else pending
        return StepContext(run, self.i, x, self._pred, self._prev, state, pending=pending), *others

    @property
    def shard(self) -> slice:
        """This rank's particles of each batch row, ``range(N)[shard]`` (all of them without ``group``):
        ``ctx.x`` holds ``(batch, len(shard), *shape)``."""
        return self._run.ranks.shard(self._run.n_all)

    def gather(self, values: Tensor, last: bool = False) -> Tensor:
        """Per-particle ``values`` ``(batch, len(shard), ...)`` of this rank's particles joined with every
        other rank's: ``(batch, N, ...)`` in particle order, on every rank (``values`` itself without
        ``group``). A collective: every rank must call it at the same point (for a selection over a row's
        particles, such as :func:`~steerdiff.smc.svdd`'s; ``gather(v)[:, ctx.shard]`` is ``v`` again).

        ``last``: the hook's work after it, and what it returns, reads the gathered values (alike on every
        rank) and nothing of this rank's own, so it cannot fail on one rank alone: on the CPU the failure
        flags' exchange before the run's next collective (an all_reduce) is then saved. Without it, an error
        the hook raises after the gather on one rank is raised by every rank as any other (see "Ranks" in
        the module docstring); with it wrongly, the others wait for that rank at their next collective."""
        return self._run.gather([values], last=last)[0]


class SMCAlgorithm:
    """Base class of particle algorithms: the hooks of the engine (see the module docstring).

    The defaults are the base sampler with no weights: ``log_weight`` and ``resample`` return
    ``None``, ``propose`` returns the base transition.
    """

    name: ClassVar[str] = "smc"
    stochastic: ClassVar[bool] = True
    grad: ClassVar[bool] = False
    sliced_grad: ClassVar[bool] = False
    needs_transition: ClassVar[bool] = False
    shardable: ClassVar[bool | None] = None
    # what a row's particles are where every one starts from the row's first particle (its resample at node
    # 0 selects it: SVDD's candidates, CoDe's branches); None: each from its own. run_smc then refuses an
    # x_T whose rows hold distinct particles, which would be discarded unread (check_one_start), draws one
    # x_T per row, and takes node 0's step on the first particle alone (the others' would be discarded)
    one_start: ClassVar[str | None] = None

    def check_steps(self, steps: int) -> None:
        """Refuse (a ``ValueError``) options that a run of ``steps`` steps could never use, before it
        starts: the hooks see the nodes ``ctx.i = 0..steps - 1`` and then the final node ``steps``
        (:func:`check_nodes`). Default: nothing to check."""

    def init_state(self, x: Tensor) -> dict[str, Tensor]:
        """Per-particle state ``(batch, particles, ...)`` at node 0 (``x``: the initial particles)."""
        return {}

    def log_weight(self, ctx: StepContext) -> Tensor | None:
        """Incremental log-weight ``(batch, particles)`` of ``ctx.x`` at node ``ctx.i``, or ``None``."""
        return None

    def resample(self, ctx: StepContext, log_w: Tensor, generator: Generators) -> Tensor | None:
        """Forced ancestor indices ``(batch, particles)`` at this node, or ``None`` (engine's rule)."""
        return None

    def propose(self, ctx: StepContext, base: Transition) -> Transition:
        """The transition ``x_{i+1}`` is drawn from (default: the solver's ``base``)."""
        return base


# --- the engine -----------------------------------------------------------------------------------


def _check_grad_mode(who: str, what: str) -> None:
    """A ``RuntimeError`` naming ``who`` and ``what`` it differentiates under ``torch.inference_mode()``,
    where no tensor made can be differentiated."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{who} differentiates {what}, which torch.inference_mode() forbids; run it outside "
            "(torch.no_grad() is fine)"
        )


def check_nodes(who: str, name: str, nodes: Iterable[int], steps: int) -> None:
    """Raise a ``ValueError`` naming ``who``, ``name`` and the values if any of the grid ``nodes`` is
    not one at which a run of ``steps`` steps calls the hooks before its end: ``0 <= node < steps``
    (node ``steps`` is the final node, :attr:`StepContext.final`, whose hook call is the final
    correction, not a node's potential). A node outside would be silently never used."""
    bad = sorted(v for v in nodes if not 0 <= v < steps)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        raise ValueError(
            f"{who}: {name} {{{shown}}} are never reached by a run of steps={steps}, which applies them "
            f"at grid nodes 0..{steps - 1} (0 <= node < steps; node {steps} is the final one, whose "
            "correction always applies); give nodes below steps, or more steps"
        )


def stochastic_solvers() -> list[str]:
    """Registered solver names whose default instance is stochastic (``Solver.stochastic``)."""
    return [n for n in _solvers.available() if _solvers.get(n).stochastic]


class _Evaluator(Guided):
    """The base denoiser evaluated on at most ``max_batch`` rows at a time; also remembers the first
    prediction a step computes at the step's own input (the particles' denoised estimate).

    The per-sample state the base holds of its own (:meth:`Denoiser.take_rows
    <steerdiff.denoiser.Denoiser.take_rows>`: CFG's ``uncond_kwargs``, DPS's ``y``) follows the particles
    as the sampler's ``**cond`` does: that of ``batch`` rows is repeated for the ``particles`` of each
    row, and sliced with the chunks. ``cost`` is the latest call's largest over its chunks, what one call on
    all its rows costs (a chunk's may vary: a CFG interval, characteristic guidance's iterations).

    ``first``: the calls evaluate each batch row's first particle alone and repeat its prediction over the
    row's particles (node 0's step of a :attr:`SMCAlgorithm.one_start` run, whose particles there are
    copies of the first and whose resample there selects it: the others' results are discarded).
    """

    def __init__(
        self, base: Denoiser, max_batch: int | None, batch: int, particles: int, mine: Tensor | None = None
    ) -> None:
        super().__init__(base)
        self.max_batch, self.batch, self.first = max_batch, batch, False
        self.watch: tuple[Tensor, float] | None = None
        self.seen: Prediction | None = None
        # StepContext.value_grad's: each slice's prediction made (with its gradient) by it
        self.through: Callable[[RowSlice, Callable[[Tensor], Prediction]], Prediction] | None = None
        self.made: Prediction | None = None  # made at the step's input before the step, counted then
        self.expanded = base if particles == 1 else base.take_rows(_each_row(batch, particles), batch)
        if mine is not None:  # a rank's particles (mine: its flat rows of batch * particles)
            self.expanded = self.expanded.take_rows(mine, batch * particles)
        # the expanded denoiser's rows per max_batch slice (its first row, of a call on n rows; "first": of
        # the first particles' rows, "first rows": those rows of n): made once, so what a copy keeps (DPS's y
        # on the device) lasts across steps
        self._slices: dict[tuple[str, int, int], Denoiser] = {}

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The base's :meth:`~steerdiff.denoiser.Denoiser.evaluate` per chunk: the net in ``net_dtype``,
        the prediction in ``x``'s dtype at ``x`` itself (so the step's own input is recognized); the
        prediction ``made`` there before the step, at no cost."""
        made = self.made
        if made is not None and made.x is x and self.watch is not None and _at(t, self.watch[1]):
            self.cost, self.seen = 0, made
            return made
        n = x.shape[0]
        k = n // self.batch  # this rank's particles per batch row
        if self.first and k > 1 and self.through is None:
            rows = slice(None, None, k)
            first = kept(self._slices, ("first rows", 0, n), partial(self.expanded.take_rows, rows, n))
            ts = t[rows] if isinstance(t, Tensor) and t.ndim > 0 else t
            one = self._chunks(first, "first", x[rows], ts, net_dtype, take_kwarg_rows(cond, rows, n))
            pred = _join_predictions([one], x, lambda v: v[0].repeat_interleave(k, 0))
        else:
            pred = self._chunks(self.expanded, "all", x, t, net_dtype, cond)
        if self.seen is None and self.watch is not None and x is self.watch[0] and _at(t, self.watch[1]):
            self.seen = pred
        return pred

    def _chunks(
        self,
        den: Denoiser,
        key: str,
        x: Tensor,
        t: float | Tensor,
        net_dtype: torch.dtype,
        cond: dict[str, Any],
    ) -> Prediction:
        """``den`` (the expanded denoiser's rows of ``x``; ``key`` names them) on ``x`` in chunks of at most
        ``max_batch`` rows, through :attr:`through` where set; sets :attr:`cost`."""
        parts, used, n, cost = [], den, x.shape[0], 0
        for sl, xs, ts, cs in _row_chunks(self.max_batch, x, t, cond):
            if sl is None:
                used = den
            else:
                used = kept(self._slices, (key, sl.start, n), partial(den.take_rows, sl, n))
            if self.through is None:
                parts.append(used.evaluate(xs, ts, net_dtype, **cs))
            else:
                parts.append(
                    self.through(RowSlice(sl, n, xs, ts, cs), partial(_net, used, ts, net_dtype, cs))
                )
            cost = max(cost, used.cost)  # read after each chunk's call: it may vary
        self.cost = cost
        # one piece through value_grad's net is at its own leaf, not x: rebuilt at x, so the step knows it
        # (a rank of group= whose rows fit in max_batch, where the whole system's do not)
        return parts[0] if len(parts) == 1 and self.through is None else _join_predictions(parts, x)


def _at(t: float | Tensor, node: float) -> bool:
    """Whether ``t`` is the node's time ``node`` (a float; not a per-sample tensor)."""
    return not isinstance(t, Tensor) and t == node


def _net(
    den: Denoiser, t: float | Tensor, net_dtype: torch.dtype, cond: dict[str, Any], x: Tensor
) -> Prediction:
    return den.evaluate(x, t, net_dtype, **cond)


def _map_rows(
    max_batch: int | None, fn: Callable[[RowSlice], Tensor], x: Tensor, t: float, cond: dict[str, Any]
) -> Tensor:
    """``fn`` on the :class:`RowSlice` s of at most ``max_batch`` flat rows of ``x`` (``cond`` sliced with
    them), their outputs concatenated: the chunked evaluation of user functions (one call for ``None``)."""
    out = [fn(RowSlice(sl, x.shape[0], xs, t, cs)) for sl, xs, _, cs in _row_chunks(max_batch, x, t, cond)]
    return out[0] if len(out) == 1 else torch.cat(out)


def _row_chunks(
    max_batch: int | None, x: Tensor, t: float | Tensor, cond: dict[str, Any]
) -> Iterator[tuple[slice | None, Tensor, float | Tensor, dict[str, Any]]]:
    """``(rows, x, t, cond)`` in slices ``rows`` of at most ``max_batch`` rows (one piece for ``None``,
    with ``rows = None``: all of them): a per-sample ``t`` and the tensors in ``cond`` with ``x``'s number
    of rows are sliced with ``x``."""
    n = x.shape[0]
    if max_batch is None or n <= max_batch:
        yield None, x, t, cond
        return
    for lo in range(0, n, max_batch):
        sl = slice(lo, lo + max_batch)
        yield (
            sl,
            x[sl],
            t[sl] if isinstance(t, Tensor) and t.ndim > 0 else t,
            take_kwarg_rows(cond, sl, n),
        )


def _each_row(batch: int, n: int) -> Tensor:
    """Flat particle row -> its batch row: ``[0] * n + [1] * n + ...``."""
    return torch.arange(batch).repeat_interleave(n)


def _repeat_rows(cond: dict[str, Any], batch: int, n: int, mine: Tensor | None = None) -> dict[str, Any]:
    """``cond`` with every tensor of ``batch`` rows repeated for the ``n`` particles of each row, then, with
    a rank's flat rows ``mine``, every tensor of ``batch * n`` rows (those repeated, and those given so)
    taken there."""
    cond = take_kwarg_rows(cond, _each_row(batch, n), batch)
    return cond if mine is None else take_kwarg_rows(cond, mine, batch * n)


def _join_chunks(values: list[float | Tensor | None], join: Callable[[list[Tensor]], Tensor]) -> Tensor:
    """The chunks' tensors joined, where the first chunk holds one (and so every chunk does)."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    assert len(tensors) == len(values), "the chunks of one evaluation (one t, one denoiser) are alike"
    return join(tensors)


def _join_predictions(
    parts: list[Prediction], x: Tensor, join: Callable[[list[Tensor]], Tensor] = torch.cat
) -> Prediction:
    """One prediction at ``x`` from per-chunk predictions (same ``t``), each tensor the parts' ``join``ed
    (concatenated; or one part's rows repeated, :attr:`_Evaluator.first`), keeping the estimate that was
    given (and a :class:`~steerdiff.smc.fk_correctors.ComposedPrediction`'s components, which its weights
    read)."""
    from .fk_correctors import ComposedPrediction  # which imports this module

    p0 = parts[0]
    alpha, sigma = p0.alpha, p0.sigma
    if isinstance(alpha, Tensor) and alpha.ndim > 0:  # per-sample coefficients
        alpha = _join_chunks([p.alpha for p in parts], join)
        sigma = _join_chunks([p.sigma for p in parts], join)
    if isinstance(p0, ComposedPrediction):
        chunks = [p for p in parts if isinstance(p, ComposedPrediction)]  # every chunk
        joined = tuple(join(list(e)) for e in zip(*(p.parts for p in chunks), strict=True))
        costs = tuple(max(c) for c in zip(*(p.costs for p in chunks), strict=True))
        return ComposedPrediction(x, alpha, sigma, join([p.eps for p in parts]), joined, costs)
    if p0._x0 is not None:
        pred = Prediction(x, alpha, sigma, x0=join([p.x0 for p in parts]))
    else:
        pred = Prediction(x, alpha, sigma, eps=join([p.eps for p in parts]))
    if p0.var_interp is not None:
        pred.var_interp = _join_chunks([p.var_interp for p in parts], join)
    return pred


def _map(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it: the solver-state containers rebuilt
    (:func:`~steerdiff.solvers.base.map_state`), a :class:`Transition` and a :class:`Prediction` too;
    any other object is kept, and refused if it holds a tensor (which would not follow the particles)."""
    if type(obj) is Transition:  # the engine's own, every step: no generic dataclass copy
        return Transition(_map(obj.mean, fn), _map(obj.std, fn))
    return map_state(obj, fn, lambda other: _other(other, fn))


def _other(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Prediction):
        x, alpha, sigma, given = fn(obj.x), _map(obj.alpha, fn), _map(obj.sigma, fn), fn(obj.given)
        p = Prediction(x, alpha, sigma, x0=given) if obj.x0_given else Prediction(x, alpha, sigma, eps=given)
        p.var_interp = _map(obj.var_interp, fn)
        return p
    if _holds_tensor(obj, set()):
        raise ValueError(
            f"the solver state holds a {type(obj).__name__} with tensors in it, which the particle engine "
            "cannot resample with the particles; keep per-particle tensors in a dict, list, tuple, "
            "namedtuple, collections.deque, dataclass or steerdiff.solvers.History"
        )
    return obj


def _holds_tensor(obj: Any, seen: set[int]) -> bool:
    """Whether a tensor is reachable from ``obj`` through containers and instance attributes
    (``seen``: the ids already visited)."""
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, str | bytes | type) or id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, dict):
        parts: Any = obj.values()
    elif isinstance(obj, list | tuple | set | frozenset | deque):
        parts = obj
    else:
        names = list(getattr(obj, "__dict__", ()))
        for cls in type(obj).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            names += [slots] if isinstance(slots, str) else list(slots)
        parts = [getattr(obj, n) for n in names if n not in ("__dict__", "__weakref__") and hasattr(obj, n)]
    return any(_holds_tensor(v, seen) for v in parts)


def _detach(obj: Any) -> Any:
    """``obj`` with its tensors detached; those without a graph kept as they are (the same objects: the
    constants :meth:`_Run.keep` marks stay marked)."""
    return _map(obj, lambda v: v.detach() if v.requires_grad else v)


class _Run:
    """One run's shared pieces: grid, counted model, reward evaluation and the flat/row views."""

    def __init__(
        self,
        who: str,
        grid: Grid,
        model: Model,
        evaluator: _Evaluator,
        reward: Reward | None,
        batch: int,
        particles: int,
        shape: tuple[int, ...],
        max_batch: int | None,
        spread: Ranks,
        n_all: int,
        device: torch.device,
    ) -> None:
        self.who, self.grid, self.model, self.evaluator, self._reward = who, grid, model, evaluator, reward
        self.batch, self.particles, self.shape, self.max_batch = batch, particles, shape, max_batch
        # particles: this rank's of each row (spread.shard(n_all)); n_all: the row's over every rank
        self.ranks, self.n_all, self.device = spread, n_all, device  # device: the particles'
        self.reward_ok: list[Tensor] = []
        self.reward_at: list[int] = []
        # group: each reward check's own-rank flag and the net evaluations and moved states (Model.note_move)
        # before it, until agreed (gather); and the evaluations and moved states already agreed finite
        self._unagreed: list[tuple[Tensor, int, int]] = []
        self._agreed_calls = self._agreed_moves = 0
        # group on the CPU (flagged): whether this rank may have run code that can fail on it alone (the
        # user's net, reward, hooks) since the ranks last exchanged their failure flags; whether this node's
        # were exchanged; how deep in the algorithm's hooks the run is (a collective there re-arms)
        self.flagged = spread.group is not None and device.type == "cpu"
        self._armed = self._exchanged = False
        self._hooks = 0
        self.sliced_grad = False  # the step runs without a graph; value_grad differentiates in slices
        self.weights: Weights | None = None  # the run's, once made (StepContext.log_w)
        self._constants: dict[int, Tensor] = {}  # by id, held so that no other tensor takes the id

    def keep(self, state: Any) -> None:
        """Mark the tensors of ``state`` (the solver's ``init_state(grid)``, made before any particle) as
        constants: :meth:`take` leaves them, whatever their first dimension. Else a table of the grid's
        ``steps + 1`` values would be permuted where that is the particles' count, and with ``group`` gathered
        by the ranks of that shard size alone (the others' packing then out of step with theirs)."""
        map_state(state, lambda v: self._constants.setdefault(id(v), v), lambda other: other)

    def _per_particle(self, v: Tensor) -> bool:
        """Whether ``v`` has one row per particle of this rank (``batch * particles``), not a constant."""
        return v.ndim > 0 and v.shape[0] == self.batch * self.particles and id(v) not in self._constants

    @property
    def chunked(self) -> bool:
        """Whether ``max_batch`` slices the whole system's ``batch * N`` rows (more than one piece): alike on
        every rank of ``group=``, whose shards may fall on either side of ``max_batch`` (the order of the
        hooks' collectives and the step's depends on it, :attr:`SMCAlgorithm.sliced_grad`)."""
        return self.max_batch is not None and self.batch * self.n_all > self.max_batch

    def flat(self, x: Tensor) -> Tensor:
        return x.reshape(self.batch * self.particles, *x.shape[2:])

    def rows(self, x: Tensor) -> Tensor:
        return x.reshape(self.batch, self.particles, *x.shape[1:])

    def gather(self, values: list[Tensor], final: bool = False, last: bool = False) -> list[Tensor]:
        """This rank's per-particle ``values`` ``(batch, particles, ...)`` joined with every rank's, ``(batch,
        n_all, ...)`` each, in ONE all_gather (:meth:`~steerdiff.distributed.Ranks.gather_many`; detached),
        which carries what the ranks must agree on: whether the net's outputs and the moved states
        (:meth:`Model.note_move <steerdiff.solvers.base.Model.note_move>`) were finite (on the CPU, where
        a one-process run raises at once, and at the ``final`` gather) and the reward checks made since the
        last gather. Every rank then raises alike, in one process's order: the non-finite net output or
        moved state that :meth:`Model.check_finite <steerdiff.solvers.base.Model.check_finite>` names
        (:meth:`~steerdiff.solvers.base.Model.first_error` on the ranks' joined flags) before the reward
        checks made after it (on the CPU; else first, as :func:`run_smc`'s end does), then the first
        non-finite reward. ``[]``: the flags alone. Without ``group``: ``values`` themselves.

        On the CPU the failure flags are exchanged first (:meth:`together`) where code that can fail on this
        rank alone ran since their last exchange; made from a hook, the hook's code after it is such code
        again, unless ``last`` (:meth:`StepContext.gather`)."""
        if self.ranks.group is None:
            return values
        if self._armed:  # the work since the last exchange went through on this rank: the flags first
            self.ranks.fail_together(self.who, lambda: True, lambda done: (None, self._exchange(False)))
        dev = values[0].device if values else self.device
        read = final or dev.type == "cpu"  # elsewhere no host read before the end
        pending, self._unagreed = self._unagreed, []
        if read:  # the model's first non-finite evaluation and moved state (Model.first_error's input)
            bad, moved = self.model.first_nonfinite(), self.model.first_bad_move()
            net = [math.inf, 0.0, 0.0] if bad is None else [bad[0], -bad[2], bad[1]]  # by step, then by time
            flags = torch.tensor(
                [*net, math.inf if moved is None else moved], dtype=torch.float64, device=dev
            )
            self._agreed_calls, self._agreed_moves = self.model.calls, self.model.moves
        else:  # not read before the final gather: no host value on the device (a sync on CUDA)
            flags = torch.zeros(4, dtype=torch.float64, device=dev)
        if pending:
            flags = torch.cat([flags, torch.stack([(~ok).to(flags) for ok, *_ in pending])])
        *joined, every = self.ranks.gather_many(
            [*values, flags[None, None]], [self.n_all] * len(values) + [self.ranks.size], dim=1
        )
        every = every[0]
        rewards_ok = (every[:, 4:] == 0).all(0)
        self.reward_ok.extend(rewards_ok.unbind())
        if read:  # the error one process raises: Model.check_finite's, on every rank's first of each
            step, neg_t, k = min(every[:, :3].tolist())
            m = float(every[:, 3].min())  # the first bad move's index; every rank records the same moves
            moved = None if m == math.inf or not self.model.moves else int(m)
            failure = self.model.first_error(None if step == math.inf else (int(step), int(k), -neg_t), moved)
            first = first_false(rewards_ok) if pending else None
            if failure is not None and (
                first is None or dev.type != "cpu" or _before(failure, pending[first])
            ):
                raise failure.error
            if first is not None:
                self.check_reward()
        self._armed = self.flagged and self._hooks > 0 and not last  # the hook goes on
        return joined

    def together(self, work: Callable[[], _T]) -> _T:
        """``work()``: a node of the run on this rank (the solver's step, the weights, the resampling, the
        proposal), where the user's net, reward and hooks run. With ``group`` on the CPU every rank raises
        if one's ``work`` raised (:meth:`Ranks.fail_together <steerdiff.distributed.Ranks.fail_together>`):
        that rank its own error, the others a ``RuntimeError`` naming it, at once, not at their next
        collective's timeout. The flags take an all_reduce of their own (:meth:`_exchange`), made where code
        that can fail on one rank alone (armed: the step, the reward, the hooks; not the engine's work on
        values every rank shares, nor a resampler, a function of those) ran since their last exchange, and
        the ranks' next collective comes: before a gather (:meth:`gather`), or at the node's end where it
        made none; a rank whose work raised armed makes it in their place, its flag set. What the others
        gather next after an error depends on what the failing rank did not compute, so the flags cannot
        ride it. The tail of a node that made its exchange (a ``resample`` or ``propose`` hook after the
        increments' gather) is armed into the next node's exchange, which so comes one node's step later,
        at no extra collective; a hook's code after a collective of its own is armed again (unless the hook
        says it reads shared values alone there, :meth:`StepContext.gather`'s ``last``). Off the CPU
        ``work()`` alone: the run reads nothing from the device before its end, and the flags would be a
        read (a sync) per node; without ``group`` no collective."""
        if not self.flagged:
            return work()
        self._armed, self._exchanged = True, False
        done, _ = self.ranks.fail_together(self.who, work, self._flags)
        return done

    def _flags(self, done: object | None) -> tuple[None, list[int]]:
        """:meth:`together`'s share: this rank's flag (its node's work raised: ``done`` is ``None``) in an
        exchange (:meth:`_exchange`) where armed, unless the node went through and made its exchange (a
        tail's arming carried to the next one); else none, and no collective."""
        if not self._armed or (done is not None and self._exchanged):
            return None, []
        return None, self._exchange(done is None)

    def _exchange(self, failed: bool) -> list[int]:
        """Every rank's failure flag, in rank order: ONE all_reduce of a one-hot row per rank and one
        read."""
        self._armed, self._exchanged = False, True
        raised = torch.zeros(self.ranks.size, dtype=torch.int64, device=self.device)
        raised[self.ranks.rank] = failed
        return self.ranks.max(raised).tolist()

    def hook(self, own: bool, fn: Callable[..., _T], *args: Any) -> _T:
        """The algorithm's hook ``fn(*args)``; ``own``: the algorithm's own (overridden), code that can fail
        on one rank alone (:meth:`together`: armed), not the base class's. A collective inside re-arms."""
        if own and self.flagged:
            self._armed = True
        self._hooks += 1
        try:
            return fn(*args)
        finally:
            self._hooks -= 1

    def agree(self) -> None:
        """With ``group`` on the CPU: the checks of the net evaluations and rewards since the last
        :meth:`gather` agreed by the ranks (a gather of the flags alone), where there are any."""
        spread, cpu = self.ranks.group is not None, self.device.type == "cpu"
        news = self.model.calls > self._agreed_calls or self.model.moves > self._agreed_moves
        if spread and cpu and (self._unagreed or news):
            self.gather([])

    def take(self, obj: Any, idx: Tensor) -> Any:
        """``obj`` (a transition, a prediction, solver state, a tuple of those) with every tensor of this
        rank's flat rows (:meth:`_per_particle`) taken at the system's flat rows ``idx`` (the whole system's
        ``batch * n_all``; with ``group`` every such tensor is gathered, all in one :meth:`gather`); other
        tensors are kept."""
        if self.ranks.group is None:
            return _map(obj, lambda v: v.index_select(0, idx) if self._per_particle(v) else v)
        mine: list[Tensor] = []

        def collect(v: Tensor) -> Tensor:
            if self._per_particle(v):
                mine.append(v)
            return v

        _map(obj, collect)
        whole = iter(self.gather([self.rows(v) for v in mine]))
        return _map(
            obj, lambda v: next(whole).flatten(0, 1).index_select(0, idx) if self._per_particle(v) else v
        )

    def reward(self, z: Tensor, i: int) -> Tensor:
        if self._reward is None:
            raise ValueError("ctx.reward: this run has no reward; pass reward= to run_smc")
        r = _map_rows(self.max_batch, partial(_call_reward, self.who, self._reward), self.flat(z), 0.0, {})
        ok = torch.isfinite(r).all()
        self.reward_at.append(i)
        if self.ranks.group is not None:  # agreed at the next gather (the increments'), raised there alike
            self._unagreed.append((ok, self.model.calls, self.model.moves))
            return self.rows(r)
        self.reward_ok.append(ok)
        if r.is_cpu and not bool(ok):  # no device read to save; before the weights it spoils
            self.check_reward()
        return self.rows(r)

    def check_reward(self) -> None:
        """Raise ``ValueError`` naming the first node at which the reward was NaN/inf (one sync)."""
        k = first_false(torch.stack(self.reward_ok)) if self.reward_ok else None
        if k is not None:
            raise ValueError(
                f"{self.who}: reward returned NaN or inf at node {self.reward_at[k]} (rewards must be finite)"
            )


def _before(failure: Failure, check: tuple[Tensor, int, int]) -> bool:
    """Whether ``failure`` (the net's non-finite evaluation, or a non-finite moved state) came before the
    reward ``check`` (its flag, and the evaluations and moved states made before it)."""
    return failure.at < (check[2] if failure.moved else check[1])


def _call_reward(who: str, reward: Reward, rows: RowSlice) -> Tensor:
    """``reward`` on the rows' particles, checked, as float64."""
    r = reward(rows.x)
    n = rows.x.shape[0]
    if not isinstance(r, Tensor) or tuple(r.shape) != (n,):
        got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(
            f"{who}: reward must map a batch (n, *shape) to rewards of shape (n,); for n = {n} it returned "
            f"{got}"
        )
    if r.is_complex():  # float64 would keep the real part alone (torch only warns)
        raise ValueError(f"{who}: reward must return real rewards, got {str(r.dtype).removeprefix('torch.')}")
    return r.to(torch.float64)


def _finite_reward(who: str, reward: Reward, rows: RowSlice, model: Model) -> Tensor:
    """:func:`_call_reward`, read from the device at once and required finite: a non-finite reward names the
    net's first NaN/inf where ``model``'s net made one (on a device the net's check is deferred, so the
    reward sees its NaN first), else a ``ValueError``. For methods that compare rewards on the host."""
    r = _call_reward(who, reward, rows)
    if not bool(torch.isfinite(r).all()):
        model.check_finite()
        raise ValueError(f"{who}: reward returned NaN or inf (rewards must be finite)")
    return r


def _check_reward(reward: Any, who: str) -> Reward:
    if not callable(reward):
        raise ValueError(f"{who}: reward must be a callable (n, *shape) -> (n,), got {type(reward).__name__}")
    return reward


def _check_shape(shape: Any, who: str) -> tuple[int, ...]:
    """``shape`` = ``(batch, *sample_shape)`` as a tuple of ``int``, its entries checked by
    :func:`~steerdiff._checks.sizes` (numpy integers too), else a ``ValueError`` naming ``who``."""
    if not isinstance(shape, tuple | list) or len(shape) < 2:
        raise ValueError(f"{who}: shape must be (batch, *sample_shape) of positive integers, got {shape!r}")
    return sizes(who, "shape", shape)


def particle_shape(who: str, shape: Any, x_T: Any) -> tuple[int, ...]:
    """``shape`` = ``(batch, *sample_shape)`` of a particle method, checked (:func:`_check_shape`), or, left
    ``None`` where ``x_T`` is given, read off ``x_T`` ``(batch, particles, *sample_shape)``; else a
    ``ValueError`` naming ``who``. A shape given with ``x_T`` must agree with it (a ``ValueError`` naming
    both; the particles, and an ``x_T`` of fewer dimensions, :func:`_initial_particles` checks)."""
    if shape is not None:
        shape = _check_shape(shape, who)
        if isinstance(x_T, Tensor) and x_T.ndim >= 3 and shape != (x_T.shape[0], *x_T.shape[2:]):
            raise ValueError(
                f"{who}: shape={shape} disagrees with x_T of shape {tuple(x_T.shape)} = (batch, particles, "
                f"*sample_shape), whose (batch, *sample_shape) is {(x_T.shape[0], *x_T.shape[2:])}; with x_T "
                "shape may be left out"
            )
        return shape
    if x_T is None:
        raise ValueError(
            f"{who}: pass shape=(batch, *sample_shape), or x_T (batch, particles, *sample_shape) to start "
            "from"
        )
    if not isinstance(x_T, Tensor) or x_T.ndim < 3:
        got = tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__
        raise ValueError(f"{who}: x_T must be a tensor (batch, particles, *sample_shape), got {got}")
    return (x_T.shape[0], *x_T.shape[2:])


def refuse_x_T(who: str, cond: dict[str, Any], start: str) -> None:
    """A ``ValueError`` for ``x_T=`` in the ``**cond`` of a particle method ``who`` that draws its own start
    (``start`` says how), where it would reach the net as a condition."""
    if "x_T" in cond:
        raise ValueError(
            f"{who}: x_T is not an argument of {who}, which draws its own start ({start}); give shape="
            "(batch, *sample_shape) and generator=; the other keyword arguments are the net's conditions"
        )


def check_one_start(who: str, x_T: Tensor, branches: str) -> None:
    """A ``ValueError`` naming ``x_T`` ``(batch, particles, ...)``, checked, of a method that starts all of a
    batch row's particles from one state, its first particle (``branches`` says what they are:
    :attr:`SMCAlgorithm.one_start`), where a row's particles differ: the others would be discarded unread."""
    differ = (x_T != x_T[:, :1]).flatten(1).any(1)
    if bool(differ.any()):
        b = int(differ.nonzero()[0])
        raise ValueError(
            f"{who}: x_T: the particles of batch row {b} differ, and {who} starts all {branches} of a row "
            f"from one state, its first particle (the rest would be discarded); pass one start per row "
            f"repeated over the particles, x_T[:, :1].expand_as(x_T), or x_T=None"
        )


def _view(tr: Transition, run: _Run) -> Transition:
    std = run.rows(tr.std) if isinstance(tr.std, Tensor) and tr.std.ndim > 0 else tr.std
    return Transition(run.rows(tr.mean), std)


def _flat_tr(tr: Transition, run: _Run) -> Transition:
    std = run.flat(tr.std) if isinstance(tr.std, Tensor) and tr.std.ndim > 1 else tr.std
    return Transition(run.flat(tr.mean), std)


def _is_index_tensor(idx: Any) -> bool:
    """Whether ``idx`` is a tensor of integers (not floating, complex or bool): ancestor indices."""
    if not isinstance(idx, Tensor):
        return False
    return not (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool)


class Ancestors:
    """Checks ancestor indices from a resampler or a ``resample`` hook: an integer ``(batch, N)``
    tensor (at once), entries in ``[0, N)`` (at once for CPU tensors; otherwise read with the run's
    other deferred checks by :meth:`check`, no device read per step, and until then an entry out of
    range is clamped into it, so it cannot take a particle of the next batch row)."""

    def __init__(self, batch: int, n: int, device: torch.device) -> None:
        self.batch, self.n, self.device = batch, n, device
        self.ok: list[Tensor] = []
        self.at: list[tuple[str, int]] = []

    def __call__(self, who: str, idx: Any, node: int) -> Tensor:
        """``idx`` checked, as int64 on the particles' device; ``who`` made it at ``node``."""
        shape = (self.batch, self.n)
        if not _is_index_tensor(idx) or tuple(idx.shape) != shape:
            got = (
                f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
            )
            raise ValueError(
                f"{who} must return integer ancestor indices of shape (batch, particles) = {shape}, got {got}"
            )
        idx = idx.to(device=self.device, dtype=torch.long)
        lo, hi = torch.aminmax(idx)
        ok = (lo >= 0) & (hi < self.n)
        if idx.is_cpu:
            if not bool(ok):
                raise self._error(who, node)
            return idx
        self.ok.append(ok)
        self.at.append((who, node))
        return idx.clamp(0, self.n - 1)

    def check(self) -> None:
        """Raise the ``ValueError`` of the first out-of-range index seen on the device (one read)."""
        k = first_false(torch.stack(self.ok)) if self.ok else None
        if k is not None:
            raise self._error(*self.at[k])

    def _error(self, who: str, node: int) -> ValueError:
        return ValueError(
            f"{who} returned an ancestor index outside [0, particles) = [0, {self.n}) at node {node}"
        )


def check_weights(who: str, log_z: Tensor, source: str = "log_weight") -> None:
    """Raise ``ValueError`` naming the first node (row of ``log_z``, ``(nodes, batch)``) whose running
    ``log Z`` is not finite: ``source``, what gave the weights' increments, returned NaN or ``+inf`` there,
    or ``-inf`` for every particle of a row (a non-finite ``log Z`` stays so: its first node is the
    culprit). One read."""
    k = first_false(torch.isfinite(log_z).all(-1))
    if k is None:
        return
    row = log_z[k].cpu()
    b = first_false(torch.isfinite(row))
    if row[b] < 0:
        raise ValueError(
            f"{who}: {source} gave every particle of batch row {b} weight zero (-inf) at node {k}; "
            "a row needs a particle of positive weight"
        )
    raise ValueError(
        f"{who}: {source} returned NaN or +inf at node {k} (batch row {b}); increments must be finite, "
        "or -inf for a zero weight"
    )


_HOOKS = ("log_weight", "resample", "propose")


@spread_run
def run_smc(
    den: Denoiser,
    algorithm: SMCAlgorithm,
    shape: tuple[int, ...] | None = None,
    *,
    particles: int,
    steps: int | None = None,
    reward: Reward | None = None,
    solver: str | Solver = DEFAULT_SOLVER,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    ess_threshold: float = 0.5,
    resampler: str | _resample.Resampler = "systematic",
    max_batch: int | None = None,
    x_T: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: Generators = None,
    progress: bool = False,
    group: Any = None,
    **cond: Any,
) -> Particles:
    """Run ``particles`` weighted copies of a stochastic sampler per batch row (see the module docstring).

    Args:
        den: the :class:`~steerdiff.denoiser.Denoiser` (guided denoisers included).
        algorithm: the :class:`SMCAlgorithm` whose hooks weight, select and propose.
        shape: ``(batch, *sample_shape)``; particles are ``(batch, particles, *sample_shape)``. May be left
            out where ``x_T`` is given (it is read off ``x_T``); a shape given with ``x_T`` must agree.
        particles: ``N >= 1`` per batch row.
        steps: solver steps ``S`` (grid nodes ``0..S``); default (``None``) 100 (``DEFAULT_STEPS``, as
            the particle methods'), or an explicit grid's count (as :func:`steerdiff.sample`'s: ``len(times)``
            with ``final="zero"``, ``len(times) - 1`` with ``"none"``; a ``steps`` that disagrees is refused).
        reward: ``reward(z)`` maps ``(n, *sample_shape)`` to ``(n,)``, for ``ctx.reward``.
        solver, schedule, final: as in :func:`steerdiff.sample`; the solver must be stochastic when
            ``algorithm.stochastic`` (:func:`stochastic_solvers`) and add noise on the grid
            (:meth:`~steerdiff.solvers.base.Solver.noisy_on`: ``restart`` by default from 20 steps on,
            ``edm_sde`` where a node is within ``[s_tmin, s_tmax]``, ``sa_solver`` where ``tau`` is not 0).
        ess_threshold: resample a row when its ESS falls below ``ess_threshold * N``, in ``[0, 1]``
            (0: never; 1: whenever its weights are not uniform).
        resampler: ``"systematic"`` (default), ``"stratified"``, ``"residual"``, ``"multinomial"`` or a
            callable ``(log_w, generator) -> indices`` (the contract in :mod:`~steerdiff.smc.resample`:
            integers ``(batch, particles)`` in ``[0, particles)``, checked on the CPU at once, else at
            the end of the run).
        max_batch: evaluate the denoiser, the reward and the algorithm's functions of the particles
            (:meth:`StepContext.map_rows`, :meth:`StepContext.value_grad`: TDS's twists, their gradients
            through the denoiser included) on at most this many of the ``batch * particles`` rows at a
            time (``None``: all at once); a gradient through the denoised estimate is then taken slice
            by slice, at the same NFE, for an algorithm with ``sliced_grad`` (TDS; another ``grad``
            algorithm's step keeps its graph over all rows, as ``torch.autograd.grad`` in its hooks needs).
        x_T: initial particles ``(batch, particles, *sample_shape)``; default
            ``sqrt(alpha_0^2 + sigma_0^2)`` times standard normal (standard normal for VP).
            ``Particles.x`` has its dtype. For float16/bfloat16 the particles, the solver and the
            hooks work in float32 and only the net runs in ``x_T``'s dtype, as in
            :func:`steerdiff.sample` (:func:`~steerdiff.solvers.base.work_dtype`): ``reward`` and
            the hooks see float32 particles and estimates.
        dtype, device: of the default ``x_T`` (torch's default dtype, CPU).
        generator: the only source of randomness (initial noise, step noise, resampling): ``None``
            (torch's global RNG), one ``torch.Generator``, or a list of ``batch`` of them, one per batch
            row: row ``b``'s particles, noise and resampling then come from ``generator[b]`` alone, so a
            row's result is the same whatever the batch it runs in (as :func:`steerdiff.sample`'s per-sample
            generators; :func:`steerdiff.noise.rand` / ``randn`` draw a list's rows so, and the
            resamplers and ``resample`` hooks receive it as given).
        progress: show a tqdm bar (with ``group``: on rank 0 alone).
        group: ``None`` (this process), or a ``torch.distributed`` process group to spread each batch
            row's particles over (see "Ranks" in the module docstring; ``particles`` at least its size):
            every rank makes the same call, ``x_T`` and ``**cond`` are the whole system's, and every rank
            returns the whole system's particles, equal to the one-process run with the same generators
            (the generators, torch's global RNG for ``generator=None``, must be in one state on every rank,
            a ``ValueError`` otherwise; a denoiser that draws noise of its own, such as ``CADS``, is refused).
            An error on one rank (an argument of its own refused, a user's net, reward or hook raising) is
            raised there, and every other rank raises a ``RuntimeError`` naming it, at once (in a node on
            the CPU only; "Ranks" in the module docstring).
        **cond: passed to the network; tensors with ``batch`` rows are repeated for the particles. So
            are those the denoiser holds of its own (:meth:`Denoiser.take_rows
            <steerdiff.denoiser.Denoiser.take_rows>`: :class:`~steerdiff.guidance.CFG`'s
            ``uncond_kwargs``; an inverse-problem wrapper's ``y`` of ``batch`` rows, so that the
            particles of batch row ``b`` are guided by row ``b``'s observation, while a ``y`` of ``batch
            x particles`` rows is taken as it is and other row counts are refused, naming ``y``), and
            all are sliced with ``max_batch``.

    Returns:
        :class:`Particles` with the final particles, normalized log-weights, the NFE and the trace. The
        run keeps no autograd graph across steps (resampling has no gradient; a graph through every
        step would grow the memory with them): the particles and rewards come back without one.
    """
    if not isinstance(algorithm, SMCAlgorithm):
        raise ValueError(f"run_smc: algorithm must be an SMCAlgorithm, got {type(algorithm).__name__}")
    # messages name the public algorithm that called (fk_steering, svdd, ...), or run_smc for one of
    # the user's that keeps the base class's name
    who = "run_smc" if algorithm.name == SMCAlgorithm.name else algorithm.name
    check_denoiser(who, "den", den)
    check_sample_only(who, cond, PARTICLE_SAMPLE_ONLY, PARTICLE_SAMPLE_ONLY_WHY)
    progress = boolean(who, "progress", progress)
    given = shape is not None
    shape = particle_shape(who, shape, x_T)
    batch, sample_shape = shape[0], shape[1:]
    check_generators(who, generator, batch)
    check_sample_shape(f"{who}: {'shape' if given else 'x_T'}", den, sample_shape)
    n_part = integer(who, "particles", particles, lo=1)
    final = choice(who, "final", final, FINALS)
    sched = _schedules.get(schedule, who)
    steps = count_steps(who, steps, sched, final, DEFAULT_STEPS, process=den.process)
    algorithm.check_steps(steps)
    ess_threshold = real(who, "ess_threshold", ess_threshold, lo=0, hi=1)
    if dtype is not None:
        dtype = sample_dtype(who, "dtype", dtype)
    device = device_or_none(who, "device", device)
    spread = _check_group(who, algorithm, group, n_part)
    n_mine = spread.sizes(n_part)[spread.rank]
    max_batch = _check_batching(who, [den], max_batch)
    if spread.group is not None:
        _refuse_own_noise(who, [den], "group", "a rank's share of the particles")
    if reward is not None:
        _check_reward(reward, who)
    resample_fn = _resample.get(resampler, who)
    slv = _solvers.get(solver, who)
    if algorithm.grad:
        _check_grad_mode(algorithm.name, "the denoised estimate")
    if algorithm.stochastic and not slv.stochastic:
        raise ValueError(
            f"{algorithm.name} needs a stochastic solver (resampled copies must diverge); solver "
            f"{solver!r} is deterministic. Accepted: {stochastic_solvers()} or e.g. DDIM(eta > 0)"
        )
    grid = make_grid(den.process, sched, steps, final)
    if algorithm.stochastic and not slv.noisy_on(grid):
        raise ValueError(
            f"{algorithm.name} needs a stochastic solver (resampled copies must diverge); solver "
            f"{slv.name!r} adds noise nowhere on this grid of {steps} steps (Solver.noisy_on: one step into "
            "the clean end only returns the denoised estimate; restart's automatic plan restarts from 20 "
            "steps on, give restart_info; edm_sde churns only within [s_tmin, s_tmax]; sa_solver's tau may "
            "vanish there)"
        )
    # a one_start algorithm's particles at node 0 are copies of each row's first: drawn once per row, and
    # node 0's step taken on the first alone (_Evaluator.first; not for a denoiser that draws noise of its
    # own per row called), its NFE counted once per row
    first = algorithm.one_start is not None and n_part > 1
    x, size = _initial_particles(
        who, den, grid, (batch, n_part, *sample_shape), x_T, generator, dtype, device, one=first
    )
    first = first and not den.own_noise()
    if x_T is not None and algorithm.one_start is not None:
        check_one_start(who, x_T, algorithm.one_start)
    # this rank's flat rows of the whole system's batch * n_part (all of them without group)
    mine = None if spread.group is None else spread.flat_rows(batch, n_part)
    if mine is not None:
        x = x.index_select(0, mine.to(x.device))
    in_dtype = x.dtype
    x = x.to(work_dtype(in_dtype))

    cond = _repeat_rows(cond, batch, n_part, mine)
    check_seeded(den, generator, who)
    evaluator = _Evaluator(den, max_batch, batch, n_part, mine)
    rows = repeat_rows(generator, n_part)
    noise: NoiseSource = (
        GeneratorNoise(Shard(rows, batch * n_part, mine))  # every rank draws all rows' noise, keeps its own
        if mine is not None
        else PerSampleNoise(rows)
        if isinstance(rows, list)
        else GeneratorNoise(rows)
    )
    inner = _InnerNoise(noise)
    model = Model(evaluator, cond, inner, net_dtype=in_dtype, scale=size)
    model.eager = mine is None  # spread over ranks: checked by every rank together, _Run.gather
    run = _Run(
        who, grid, model, evaluator, reward, batch, n_mine, sample_shape, max_batch, spread, n_part, x.device
    )
    solver_state = slv.init_state(grid)
    run.keep(solver_state)
    jumps = crossings(den, grid)
    alg_state = algorithm.init_state(run.rows(x))
    # the set-up's end (its checks, draws and initial states, which may fail on one rank alone): every rank's
    # failure flag and the generators' digest, after the draw of x (alike on every rank iff it was before)
    spread.start(who, generator, x.device)
    own = {h: getattr(type(algorithm), h) is not getattr(SMCAlgorithm, h) for h in _HOOKS}

    wdev = x.device
    weights = Weights(algorithm.name, batch, n_part, wdev)
    run.weights = weights
    arange = torch.arange(n_part, device=wdev).expand(batch, n_part)
    offsets = (torch.arange(batch, device=wdev) * n_part)[:, None]
    no_resample = torch.zeros(batch, dtype=torch.bool, device=wdev)
    every_row = torch.ones(batch, dtype=torch.bool, device=wdev)
    ancestors = Ancestors(batch, n_part, wdev)
    resampler_name = f"resampler {getattr(resample_fn, '__name__', type(resample_fn).__name__)!r}"
    prev: tuple[Tensor, Transition, Transition] | None = None
    # no graph across steps (memory would grow with them; resampling has no gradient): autograd only
    # inside a step of an algorithm that differentiates (and for guidance gradients, which turn it on),
    # and not in slices of max_batch rows for one that takes its gradients with value_grad alone
    # (sliced_grad): a step's graph would hold every row at once. There log_weight runs before the step
    # (it sees nothing of it), and value_grad differentiates slice by slice a prediction at x that is the
    # step's own: no second evaluation
    spared = 0  # the network evaluations per batch row that node 0's step on the first particle spared
    run.sliced_grad = early = algorithm.grad and algorithm.sliced_grad and run.chunked
    grad_step = algorithm.grad and not early
    grad_ctx = torch.enable_grad if grad_step else torch.no_grad

    def node(
        i: int,
        x: Tensor,
        prev: tuple[Tensor, Transition, Transition] | None,
        alg_state: dict[str, Tensor],
        solver_state: Any,
    ) -> tuple[Tensor, dict[str, Tensor], Any, Transition, Transition]:
        """Node ``i`` on this rank, from the particles ``x``: the solver's step, the weights, the resampling
        and the proposal; the particles, the algorithm's and the solver's state, the base transition and the
        proposal after it."""
        nonlocal spared
        leaf = None
        with grad_ctx():  # the leaf and x from it too: under an outer no_grad x would be cut off
            if grad_step:
                leaf = run.rows(x).detach().requires_grad_(True)
                x = run.flat(leaf)
            if early:  # log_weight first: a prediction it made at x (and counted) serves the step
                ctx = StepContext(run, i, x, None, prev, alg_state)
                inc = run.hook(own["log_weight"], algorithm.log_weight, ctx)
                evaluator.made = ctx._pred
            evaluator.watch, evaluator.seen = (x, grid.t[i]), None
            evaluator.first = first and i == 0
            inner.calls, calls = 0, model.nfe
            out = slv.step(model, x, i, grid, solver_state)
            if evaluator.first:  # the first particle's calls alone, the whole system's count (every rank's)
                spared = (model.nfe - calls) * (n_part - 1)
            evaluator.watch = evaluator.made = None
            evaluator.first = False
            if algorithm.needs_transition and inner.calls:
                run.agree()  # a non-finite net output first, as one process raises it in the step
                raise ValueError(
                    f"{algorithm.name} needs Gaussian transitions, but solver {slv.name!r} draws noise "
                    "inside its step; use one that returns a Transition (ddpm, euler_ancestral, "
                    "euler_maruyama, dpmpp_2m_sde, er_sde, sa_solver, DDIM(eta > 0))"
                )
            base = out if isinstance(out, Transition) else Transition(out, 0.0)
            if not early:
                ctx = StepContext(run, i, x, evaluator.seen, prev, alg_state, leaf)
                inc = run.hook(own["log_weight"], algorithm.log_weight, ctx)
            elif ctx._pred is None:  # log_weight made none: the step's serves resample and propose
                ctx._pred = evaluator.seen
            ess = weights.reweight(_joined(run, algorithm, inc))
            forced = run.hook(own["resample"], algorithm.resample, ctx, weights.log_w, generator)
            anc, mask = None, no_resample
            if forced is not None:
                anc, mask = ancestors(f"{algorithm.name}: resample", forced, i), every_row
            elif inc is not None and ess_threshold > 0:
                # below the threshold by more than rounding: uniform weights read ESS = N (1 - 1e-16)
                mask = ess < ess_threshold * n_part * (1 - 1e-9)
                anc = torch.where(
                    mask[:, None], ancestors(resampler_name, resample_fn(weights.log_w, generator), i), arange
                )
            # spread over ranks on the CPU, no row resampled: every particle keeps its own (no gather)
            if anc is not None and (mine is None or not x.is_cpu or bool(mask.any())):
                # this rank's particles' ancestors, as flat rows of the whole system
                flat_idx = (anc if mine is None else anc[:, spread.shard(n_part)]) + offsets
                ctx, base, solver_state = ctx.take(flat_idx.reshape(-1), base, solver_state)
                weights.reset(mask)
            weights.record(mask)
            prop = _flat_tr(run.hook(own["propose"], algorithm.propose, ctx, _view(base, run)), run)
            x, alg_state = ctx._x, ctx.state
            run.agree()  # the checks no gather carried this step (a step without increments)
        return x, alg_state, solver_state, base, prop

    diverged = partial(
        diverged_error,
        who=f"{algorithm.name}'s proposal (solver {slv.name!r})",
        fix="its drift (a guidance scale, lam, a twist) or the solver's noise (eta, s_noise) may be too "
        "large for this grid: try less, or more steps",
    )
    shown = progress and spread.rank == 0  # one bar: rank 0's
    indices = tqdm(range(steps), desc=algorithm.name, leave=False) if shown else range(steps)
    for i in indices:
        # the user's net, reward and hooks run here: with group, an error on one rank is raised by every
        # rank at once (_Run.together), not left for the others to wait at their next collective
        x, alg_state, solver_state, base, prop = run.together(
            partial(node, i, x, prev, alg_state, solver_state)
        )
        if grad_step:
            x, base, prop = x.detach(), _detach(base), _detach(prop)
            solver_state, alg_state = _detach(solver_state), _detach(alg_state)
        x_next = prop.draw(noise, grid.t[i], grid.t[i + 1])
        # the divergence guard, read with the net's flags (every rank records it: their flags are joined),
        # deferred to the run's checks: an algorithm's refusal of a step, read after the run, names the cause
        model.note_state(x_next, i, grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1], diverged, defer=True)
        prev = (x, base, prop)
        x = x_next
        if i in jumps:  # the next evaluation is across a jump of the field from the history's, as in run_grid
            slv.moved(solver_state)

    ctx = StepContext(run, steps, x, None, prev, alg_state)

    def last() -> Tensor:
        """The final node's weights on this rank: the algorithm's final correction."""
        with grad_ctx():
            inc = run.hook(own["log_weight"], algorithm.log_weight, ctx)
            return weights.reweight(_joined(run, algorithm, inc))

    run.together(last)
    weights.record(no_resample)
    final_reward = ctx.state.get("reward")
    if mine is None:
        model.check_finite()
    else:  # every rank returns the whole system; one gather, with the last checks (which may raise)
        got = run.gather([run.rows(x)] + ([] if final_reward is None else [final_reward]), final=True)
        x, final_reward = got[0], got[1] if len(got) > 1 else None
    run.check_reward()
    trace = weights.trace()
    check_weights(algorithm.name, trace.log_z)
    ancestors.check()
    x = to_sample_dtype(algorithm.name, x.reshape(batch, n_part, *sample_shape), in_dtype)
    return Particles(x, weights.log_w, model.nfe * n_part - spared, trace, final_reward)


def _check_batching(who: str, dens: Sequence[Denoiser], max_batch: int | None) -> int | None:
    """``max_batch`` (``None``, or an integer >= 1) checked against what ``dens`` draw per row: noise of
    their own, which slices of ``max_batch`` rows would change."""
    if max_batch is None:
        return None
    max_batch = integer(who, "max_batch", max_batch, lo=1)
    _refuse_own_noise(who, dens, "max_batch", "slices of max_batch rows")
    return max_batch


def _refuse_own_noise(who: str, dens: Sequence[Denoiser], name: str, split: str) -> None:
    """A ``ValueError`` naming ``who`` and the argument ``name`` if ``dens`` draw noise of their own for the
    rows they are called with, which the rows' ``split`` would change (other draws than the whole run's)."""
    drawn = [part for den in dens for part, _ in den.own_noise()]
    if drawn:
        raise ValueError(
            f"{who}: {name}: {', '.join(dict.fromkeys(drawn))} in the denoiser draws noise for the rows it "
            f"is called with, which {split} would change; pass {name}=None"
        )


def _check_group(who: str, algorithm: SMCAlgorithm, group: Any, n: int) -> Ranks:
    """``group=`` checked (:func:`~steerdiff.distributed.ranks`) with what a run spread over it needs:
    at least one of the ``n`` particles per rank, and an algorithm whose hooks are right on a rank's
    share (:attr:`SMCAlgorithm.shardable`)."""
    spread = particle_ranks(who, group, n)
    if spread.group is None:
        return spread
    shardable = algorithm.shardable
    if shardable is None:
        shardable = type(algorithm).resample is SMCAlgorithm.resample
    if not shardable:
        name = type(algorithm).__name__
        if algorithm.shardable is None:
            raise ValueError(
                f"{who}: group: {name} overrides resample (a selection across a row's particles, which would "
                "see one rank's share of them) and does not set shardable; pass group=None, or set the class "
                "attribute shardable = True once its hooks act across a row's particles through ctx.gather "
                "and ctx.shard"
            )
        raise ValueError(
            f"{who}: group: {name} sets shardable = False (its hooks need all of a row's "
            "particles on one process); pass group=None"
        )
    return spread


def _joined(run: _Run, algorithm: SMCAlgorithm, inc: Tensor | None) -> Tensor | None:
    """A rank's increments ``(batch, particles on this rank)`` joined into the whole system's ``(batch,
    N)`` (``inc`` itself without ``group``)."""
    if inc is None or run.ranks.group is None:
        return inc
    mine = (run.batch, run.particles)
    if not isinstance(inc, Tensor) or tuple(inc.shape) != mine:
        got = tuple(inc.shape) if isinstance(inc, Tensor) else type(inc).__name__
        raise ValueError(
            f"{run.who}: {algorithm.name}'s log_weight must return (batch, particles on this rank) = {mine} "
            f"with group=, got {got}"
        )
    return run.gather([inc.detach()])[0]


def _initial_particles(
    who: str,
    den: Denoiser,
    grid: Grid,
    shape: tuple[int, ...],
    x_T: Tensor | None,
    generator: Generators,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    one: bool = False,
) -> tuple[Tensor, float]:
    """The particles at node 0 as flat rows ``(batch * particles, *sample_shape)``: ``x_T`` checked, or
    ``sqrt(alpha_0^2 + sigma_0^2)`` times standard normal draws of ``shape = (batch, particles, ...)`` (with
    ``one``, of ``(batch, 1, ...)``, each row's draw repeated over its particles); and the scale of the
    divergence guard (:class:`~steerdiff.solvers.base.Model`'s ``scale``): ``x_T``'s largest ``|entry|``
    (:func:`~steerdiff.sampling.check_x_T`), or the draws' standard deviation (no host read)."""
    rows, sample_shape = shape[0] * shape[1], shape[2:]
    if x_T is None:
        scale = math.hypot(grid.alpha[0], grid.sigma[0])
        drawn = randn((shape[0], 1, *sample_shape) if one else shape, generator, dtype, device)
        x = drawn.expand(shape).reshape(rows, *sample_shape)
        return (x if math.isclose(scale, 1.0, rel_tol=1e-9) else x * scale), scale
    if not isinstance(x_T, Tensor) or tuple(x_T.shape) != shape:
        got = tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__
        raise ValueError(
            f"{who}: x_T must be (batch, particles, *shape) = {shape} for shape={(shape[0], *shape[2:])} and "
            f"particles={shape[1]}, got {got}"
        )
    x = x_T.reshape(rows, *sample_shape)
    size = check_x_T(den, x, who)
    where = None if device is None else torch.device(device)
    other_device = where is not None and (
        where.type != x_T.device.type or (None not in (where.index, x_T.device.index) and where != x_T.device)
    )
    for name, value, has, off in (
        ("dtype", dtype, x_T.dtype, dtype is not None and dtype != x_T.dtype),
        ("device", device, x_T.device, other_device),
    ):
        if off:  # was ignored: a run in another dtype or on another device than asked
            raise ValueError(
                f"{who}: {name}={value} is for the default x_T; x_T is {has}: leave {name} out, or give x_T "
                f"in the {name} wanted"
            )
    return x, size


class Weights:
    """A run's normalized log-weights ``(batch, particles)`` and running ``log Z`` per row, with their
    trace: the ESS after each node's reweighting, the rows resampled there and ``log Z``; ``source`` names
    what gives the increments, for messages (an :class:`SMCAlgorithm`'s ``log_weight``)."""

    def __init__(
        self, who: str, batch: int, n: int, device: torch.device, source: str = "log_weight"
    ) -> None:
        self.who, self.source, self.shape, self.uniform = who, source, (batch, n), -math.log(n)
        self.log_w = torch.full(self.shape, self.uniform, dtype=torch.float64, device=device)
        self.log_z = torch.zeros(batch, dtype=torch.float64, device=device)
        self.ess_log: list[Tensor] = []
        self.res_log: list[Tensor] = []
        self.z_log: list[Tensor] = []
        self._ess_of: Tensor | None = None  # the weights the last ESS is of: unchanged ones keep it
        self._ess = torch.empty(0)

    def reweight(self, inc: Tensor | None) -> Tensor:
        """Add the increments ``inc`` (``None``: none), renormalize, and return (and log) the ESS."""
        if inc is not None:
            if not isinstance(inc, Tensor) or tuple(inc.shape) != self.shape:
                got = tuple(inc.shape) if isinstance(inc, Tensor) else type(inc).__name__
                raise ValueError(
                    f"{self.who}: {self.source} must return (batch, particles) = {self.shape}, got {got}"
                )
            lw = self.log_w + inc.detach().to(torch.float64)
            # relative to each row's largest: a log-weight near 1e16 would lose the particles' differences
            # to rounding in lw - logsumexp(lw), and the weights would not sum to 1
            top = lw.amax(-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            lw = lw - top
            total = torch.logsumexp(lw, dim=-1)
            self.log_z = self.log_z + top[:, 0] + total
            self.log_w = lw - total[:, None]
            if self.log_z.is_cpu and not bool(torch.isfinite(self.log_z).all()):  # else read at the end
                check_weights(self.who, torch.stack([*self.z_log, self.log_z]), self.source)
        if self._ess_of is not self.log_w:
            self._ess_of, self._ess = self.log_w, _resample.ess(self.log_w)
        self.ess_log.append(self._ess)
        return self._ess

    def reset(self, rows: Tensor) -> None:
        """Uniform weights in the resampled ``rows`` (a ``(batch,)`` mask)."""
        self.log_w = torch.where(rows[:, None], torch.full_like(self.log_w, self.uniform), self.log_w)

    def record(self, resampled: Tensor) -> None:
        """Close the node: which rows were resampled, and ``log Z``."""
        self.res_log.append(resampled)
        self.z_log.append(self.log_z)

    def trace(self) -> Trace:
        return Trace(torch.stack(self.ess_log), torch.stack(self.res_log), torch.stack(self.z_log))


class _InnerNoise:
    """The model's noise source: the run's generator, counting draws made inside a solver step."""

    def __init__(self, noise: NoiseSource) -> None:
        self.noise, self.calls = noise, 0

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        self.calls += 1
        return self.noise(t_from, t_to, like)
