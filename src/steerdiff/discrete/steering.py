r"""Particle steering of masked diffusion: Feynman-Kac steering and best-of-N over the discrete samplers.

Singhal, Horvitz, Teehan, Ren, Yu, McKeown & Ranganath 2025, "A General Framework for Inference-time
Scaling and Steering of Diffusion Models", whose text experiments steer MDLM; the discrete counterpart
of :func:`steerdiff.smc.fk_steering` / :func:`steerdiff.smc.best_of_n`, with the same potentials
(:func:`steerdiff.smc.fk_steering.increment`), resamplers (:mod:`steerdiff.smc.resample`) and result
(:class:`steerdiff.smc.Particles`).

Each batch row holds ``N`` particles, which follow the base sampler (``ancestral``, ``first_hitting``,
``remdm``: :class:`~steerdiff.discrete.Sampler`) unchanged. Step ``i`` (``i = 0..S-1``) calls the network
once at the particles' state ``x_i``, giving ``log p_theta(x_0 | x_i)``, and moves them to ``x_{i+1}``.
At a potential node ``i`` (every ``interval`` steps inside ``window``) each particle is scored by the
intermediate reward ``r_k = r(x0_hat)`` on the denoised estimate

    x0_hat^j = x_{i+1}^j where unmasked,  a draw from p_theta(x_0^j | x_i) where still masked,

weighted by the potential ``G_k`` (``difference``: ``exp(lam (r_k - r_{k-1}))``; ``max``, ``sum``,
``immediate``: see :mod:`steerdiff.smc.fk_steering`) and resampled per row when its ESS drops below
``ess_threshold * N`` (the default 1.0 resamples at every node, as the paper's sampler does). After the
last step the final correction ``exp(lam r(x_S)) / prod_k G_k`` makes every path's product of potentials
``exp(lam r(x_S))``: the weighted particles target ``p_S(x) exp(lam r(x)) / Z``, ``p_S`` the base
sampler's output law, and ``log Z`` (the running estimate of the trace) estimates ``log E_{p_S}[exp(lam
r)]``, unbiased for ``Z``. ``lam = 0`` is the base sampler: no estimates, no weights, the same draws.

The estimate: a draw, not the argmax, as the paper's MDLM code scores draws from ``p_theta(x_0 | x_t)``
(the copy of ``x_t``'s unmasked tokens kept): a reward sees sequences of the law it is defined on, while
the argmax of every masked position is one atypical sequence (the mode of each position, jointly
possibly of low probability) whose reward can be far from ``E[r(x_0) | x_t]``. The draw is taken from the
step's own network call (no extra NFE) at ``x_i``, which ignores the tokens unmasked in the step; it is
an extra variable of the particle's path, drawn from a known law that nothing later depends on, so the
final correction still makes the target exact (only the efficiency depends on the estimate). Scoring
``x_{i+1}``, not ``x_i``, lets the copies of a resampled particle diverge at the next step's draws (the
paper's code, too, weights the new states). With a per-row ``generator`` list the particles of row ``b``,
their estimates and their resampling draw from ``generator[b]`` alone.

Best-of-N draws ``N`` independent samples per row with the base sampler and keeps the one of highest
reward (a point mass: ``log_w = 0`` there, ``-inf`` elsewhere).

NFE per batch row: ``N`` times the base sampler's (``N * steps``; 2 per step for
:class:`~steerdiff.discrete.CFG`), as the continuous side counts them.

Ranks (``group=``, a ``torch.distributed`` process group; every rank makes the same call), as
:func:`steerdiff.smc.run_smc` spreads particles (its module's "Ranks"): rank ``r`` holds the particles
:meth:`Ranks.shard(N) <steerdiff.distributed.Ranks.shard>` of every batch row, so the network and ``reward``
see a rank's ``batch * n_r`` rows (``**cond`` and the denoiser's per-row state taken at them). Every draw of
the sampler and of the estimates is made for all ``batch * N`` particles and a rank keeps its own
(:class:`steerdiff.noise.Shard`), so the generators advance alike on every rank (their states are checked
alike at the start: a digest of them in the set-up's all_reduce, below); the rewards are gathered into
``(batch, N)``, and the weights, ``log Z``, ESS, the resampling draws and best-of-N's choice are computed from
them identically on every rank; at a resampling event (on the CPU, a node where a row resamples) every rank
gathers the particles' tokens and times (one all_gather, :meth:`~steerdiff.distributed.Ranks.gather_many`) and
takes its particles' ancestors; at the end every rank gathers and returns the whole system. The result equals
the one-process run's with the same generators on every rank (tokens and float64 weights bit for bit where the
network's output does not depend on how many rows it is called with, as on the CPU in float64). A NaN /
``+inf`` from any rank's network is raised by every rank (one all_reduce per step, of the flags and of the
rows the step moved, which the potentials read), with the message of the first rank that failed: one
process's where the failing rows share their time, as with ``ancestral`` and ``remdm``; a reward that is NaN
/ inf anywhere is raised by every rank, as the rewards are checked once gathered. Any other error on some
ranks, in a step (a user's network) or in a reward (a user's reward, a reward of the wrong shape), is raised
by those ranks, each its own, and every other rank raises a ``RuntimeError`` naming them
(:meth:`Ranks.fail_together <steerdiff.distributed.Ranks.fail_together>`: a flag per rank riding the step's
all_reduce or the rewards' all_gather, no further collective), so no rank waits at a collective for one that
is gone; where such an error and a NaN fall in the same step on different ranks, the other error is what is
raised. So is an error in the set-up (an argument refused on some ranks alone, as an ``interval`` or an
``x_T`` that differs between them): the set-up ends in the run's first collective, one all_reduce of every
rank's failure flag and the generators' digest (:meth:`Ranks.start <steerdiff.distributed.Ranks.start>`),
which a rank that failed before it makes too (:func:`~steerdiff.distributed.group.spread_run`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import boolean, integer, real
from ..denoiser import take_kwarg_rows
from ..distributed.group import Ranks, particle_ranks, spread_run
from ..noise import Draws, Shard, check_generators, repeat_rows
from ..smc import resample as _resample
from ..smc.fk_steering import check_arguments, increment, initial_state, potential_nodes
from ..smc.particles import Ancestors, Particles, Trace, Weights, check_weights
from ..solvers.base import NonFiniteError
from .base import Model, Sampler
from .categorical import draw
from .denoiser import MaskedDenoiser
from .sampling import get, start

__all__ = ["best_of_n", "fk_steering"]

Reward = Callable[[Tensor], Tensor]


class _Run:
    """A run of ``particles`` per row of a (partly) masked batch, from ``shape`` or ``x_T`` (exactly one):
    the flat particles ``x`` ``(batch * particles, length)`` (with ``group``: this rank's ``(batch *
    n_r, length)``, the particles ``shard`` of each row), their times, the model counting NFE and where
    the particles' draws come from."""

    def __init__(
        self,
        who: str,
        den: object,
        reward: object,
        shape: object,
        x_T: object,
        particles: object,
        steps: object,
        sampler: str | Sampler,
        generator: object,
        device: object,
        progress: object,
        group: object,
        cond: dict[str, Any],
    ) -> None:
        if (shape is None) == (x_T is None):
            raise ValueError(
                f"{who}: pass one of shape=(batch, length), for all-masked rows, or x_T, token ids (batch, "
                "length) whose unmasked tokens stay"
            )
        den, x = start(who, den, x_T, device) if shape is None else start(who, den, shape, device, "shape")
        if not callable(reward):
            raise ValueError(
                f"{who}: reward must be a callable, tokens (n, length) -> (n,), got {reward!r:.60}"
            )
        self.who, self.reward_fn, process = who, reward, den.process
        self.batch, self.n = len(x), integer(who, "particles", particles, lo=1)
        self.ranks: Ranks = particle_ranks(who, group, self.n)
        self.shard = self.ranks.shard(self.n)
        self.sampler = get(sampler, who)
        self.steps = self.sampler.num_steps(steps, (x == process.mask_id).sum(dim=1), who)
        self.generator = check_generators(who, generator, self.batch)
        self.rows: Draws = repeat_rows(self.generator, self.n)
        self.progress = boolean(who, "progress", progress)
        each = torch.arange(self.batch, device=x.device).repeat_interleave(self.n)
        if self.ranks.group is not None:  # this rank's flat rows of the whole system's batch * n
            mine = self.ranks.flat_rows(self.batch, self.n).to(x.device)
            self.rows, each = Shard(self.rows, self.batch * self.n, mine), each[mine]
        self.x = x[each]
        self.model = Model(den.take_rows(each, self.batch), take_kwarg_rows(cond, each, self.batch), who)
        self.mask_id = process.mask_id
        self.t = torch.ones(len(self.x), dtype=torch.float64, device=x.device)
        self.given = self.x != process.mask_id

    def start(self) -> None:
        """The set-up's end, after every argument's check (:meth:`Ranks.start
        <steerdiff.distributed.Ranks.start>`): whether any rank's set-up raised, and torch's global RNG or the
        generators alike on every rank (else each draws other noise), in one all_reduce."""
        self.ranks.start(self.who, self.generator, self.x.device)

    def nodes(self) -> Iterable[int]:
        """The steps ``0..steps - 1``, with a tqdm bar where ``progress``."""
        steps = range(self.steps)
        return tqdm(steps, desc=self.who, leave=False) if self.progress and self.ranks.rank == 0 else steps

    @property
    def n_local(self) -> int:
        """This rank's particles of each row, ``n_r`` (``N`` without ``group``)."""
        return len(range(self.n)[self.shard])

    def step(self, i: int) -> tuple[Tensor, Tensor]:
        """Step ``i`` of the base sampler on every particle: the step's ``log p_theta(x_0 | x_i)`` and the
        batch rows it could move, ``(batch,)``: those with a particle it moved or that was masked (a row whose
        particles were all clean and stayed, as a finished row of ``first_hitting`` does, is done), over
        every rank's particles with ``group``, agreed with whether any rank's step failed (:meth:`agreed`):
        a :class:`~steerdiff.NonFiniteError` is raised by every rank with the first failing rank's message,
        any other error by its rank, every other rank raising a ``RuntimeError`` naming it
        (:meth:`~steerdiff.distributed.Ranks.fail_together`)."""
        before = self.x
        if self.ranks.group is None:
            self.x, self.t, log_p = self.sampler.step(
                self.model, before, self.t, i, self.steps, self.rows, self.given
            )
            return log_p, self.moved(before, self.x)

        def work() -> tuple[tuple[Tensor, Tensor, Tensor] | None, NonFiniteError | None]:
            try:
                return self.sampler.step(
                    self.model, before, self.t, i, self.steps, self.rows, self.given
                ), None
            except NonFiniteError as e:
                return None, e

        (stepped, error), (live, nonfinite) = self.ranks.fail_together(
            self.who, work, lambda done: self.agreed(before, done)
        )
        if nonfinite:  # every rank raises the first failing rank's message, as one process would
            first = next(
                m for m in self.ranks.gather_objects(None if error is None else str(error)) if m is not None
            )
            raise NonFiniteError(first) from error
        assert stepped is not None  # no rank's step failed
        self.x, self.t, log_p = stepped
        return log_p, live

    def moved(self, before: Tensor, after: Tensor) -> Tensor:
        """The batch rows ``(batch,)`` with a particle of this rank that was masked at ``before`` or that
        changed."""
        moved = ((before == self.mask_id) | (before != after)).any(-1)
        return moved.reshape(self.batch, self.n_local).any(-1)

    def agreed(
        self,
        before: Tensor,
        done: tuple[tuple[Tensor, Tensor, Tensor] | None, NonFiniteError | None] | None,
    ) -> tuple[tuple[Tensor, bool], list[int]]:
        """What the ranks of ``group`` learn of this step (``done``: the step's tokens, times and ``log_p``,
        or the :class:`~steerdiff.NonFiniteError` it raised; ``None`` where it raised another error), in ONE
        all_reduce (each step, the maximum of one-hot rows): the batch rows it moved on any rank
        (:meth:`moved`), whether any rank's step was not finite, and which ranks' steps raised another error
        (in rank order, the flags :meth:`~steerdiff.distributed.Ranks.fail_together` reads), the flags read
        once. A rank whose step failed sends no moved rows."""
        size = self.ranks.size
        stepped = None if done is None else done[0]
        dev = before.device
        raised = torch.zeros(size, dtype=torch.int64, device=dev)
        raised[self.ranks.rank] = done is None
        nonfinite = torch.tensor([done is not None and stepped is None], device=dev)
        live = (
            before.new_zeros(self.batch, dtype=torch.bool)
            if stepped is None
            else self.moved(before, stepped[0])
        )
        every = self.ranks.max(torch.cat([raised, nonfinite, live]).long())
        flags = every[: size + 1].tolist()
        return (every[size + 1 :].bool(), bool(flags[size])), flags[:size]

    def estimate(self, log_p: Tensor, greedy: bool = False) -> Tensor:
        """``x0_hat``: the particles' tokens, at their masked positions a draw from ``log_p`` (``greedy``: its
        most likely token, no draw)."""
        masked = self.x == self.mask_id
        tokens = log_p.argmax(-1) if greedy else draw(log_p, self.rows)
        return torch.where(masked, tokens.to(self.x.dtype), self.x)

    def reward(self, x: Tensor, i: int) -> Tensor:
        """``r(x)`` of this rank's flat particles as float64 ``(batch, particles)``, every rank's joined with
        ``group``, checked: a ``ValueError`` naming the step ``i`` (``steps``: the final samples) for a wrong
        shape or a NaN / inf. Where the reward raised on some rank (the wrong shape included), every rank
        raises (:meth:`~steerdiff.distributed.Ranks.fail_together`, a flag riding the rewards' all_gather)."""
        at = "the final samples" if i == self.steps else f"step {i}"

        def work() -> Tensor:
            r = self.reward_fn(x)
            numeric = isinstance(r, Tensor) and not (r.is_complex() or r.dtype == torch.bool)
            if not numeric or tuple(r.shape) != (len(x),):
                got = f"{r.dtype} {tuple(r.shape)}" if isinstance(r, Tensor) else type(r).__name__
                raise ValueError(
                    f"{self.who}: reward must return a real tensor of shape (n,) = ({len(x)},) for the n "
                    f"particles it is given, got {got} at {at}"
                )
            return r.to(device=x.device, dtype=torch.float64)

        def share(r: Tensor | None) -> tuple[tuple[Tensor, bool], list[bool]]:
            """Every rank's rewards (zeros from a rank whose reward raised) and whether they are finite, and
            every rank's flag (its reward raised), in one all_gather and one read."""
            mine = torch.zeros(len(x), dtype=torch.float64, device=x.device) if r is None else r
            raised = torch.tensor([[r is None]], device=x.device)
            joined, every = self.ranks.gather_many(
                [mine.reshape(self.batch, self.n_local), raised], [self.n, self.ranks.size], dim=1
            )
            flags = torch.cat([every[0], torch.isfinite(joined).all()[None]]).tolist()
            return (joined, flags[-1]), flags[:-1]

        _, (r, finite) = self.ranks.fail_together(self.who, work, share)
        if not finite:
            raise ValueError(f"{self.who}: reward returned NaN or inf at {at} (rewards must be finite)")
        return r

    def take(self, anc: Tensor) -> None:
        """Keep the particles' ancestors ``anc`` ``(batch, N)`` (indices within each row; this rank's
        particles take theirs, ``anc[:, shard]``, from the whole system): tokens and times (the given tokens
        and the conditions are the row's, the same for its particles; with ``group`` one all_gather of
        both, :meth:`~steerdiff.distributed.Ranks.gather_many`)."""
        offsets = (torch.arange(self.batch, device=anc.device) * self.n)[:, None]
        flat = (anc[:, self.shard] + offsets).reshape(-1)
        mine = [v.reshape(self.batch, self.n_local, *v.shape[1:]) for v in (self.x, self.t)]
        x, t = self.ranks.gather_many(mine, self.n, dim=1)
        self.x, self.t = x.flatten(0, 1)[flat], t.flatten(0, 1)[flat]

    def result(self, log_w: Tensor, trace: Trace | None, reward: Tensor) -> Particles:
        """The final particles, every rank's with ``group``, as :class:`~steerdiff.smc.Particles` ``(batch,
        particles, length)``."""
        x = self.ranks.gather(self.x.reshape(self.batch, self.n_local, -1), self.n, dim=1)
        return Particles(x, log_w, self.model.nfe * self.n, trace, reward)


@spread_run
def fk_steering(
    den: MaskedDenoiser,
    reward: Reward,
    lam: float = 10.0,
    potential: str = "difference",
    *,
    shape: Sequence[int] | None = None,
    x_T: Tensor | Sequence[int] | None = None,
    particles: int = 16,
    steps: int | None = None,
    sampler: str | Sampler = "ancestral",
    interval: int = 1,
    window: tuple[int, int] | None = None,
    ess_threshold: float = 1.0,
    resampler: str | _resample.Resampler = "systematic",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    group: Any = None,
    **cond: Any,
) -> Particles:
    """Feynman-Kac steering of a masked diffusion model towards ``p_S(x) exp(lam r(x)) / Z`` with
    ``particles`` per batch row (module docstring).

    Args:
        den: a :class:`~steerdiff.discrete.MaskedDenoiser` (guided ones included).
        reward: ``r``, mapping clean token ids ``(n, length)`` (int64, or ``x_T``'s dtype) to finite reals
            ``(n,)``; gradient-free. Called on the estimates at the potential nodes and on the final samples.
        lam: the tilt ``lambda``, finite (0: the base sampler).
        potential: ``"difference"`` (default), ``"max"``, ``"sum"`` or ``"immediate"``.
        shape: ``(batch, length)``: all-masked rows, as :func:`steerdiff.smc.fk_steering`'s ``shape``; or
        x_T: token ids ``(batch, length)`` whose unmasked tokens stay (or a shape, as for
            :func:`~steerdiff.discrete.sample`); exactly one of the two. Each row's particles start from it.
        particles: ``N >= 1`` per batch row.
        steps, sampler: the base sampler's, as for :func:`~steerdiff.discrete.sample` (``first_hitting``:
            ``None``, one step per masked token).
        interval: weight (and resample) after every ``interval``-th step ...
        window: ... of the steps ``start..stop - 1`` (default all, ``(0, steps)``).
        ess_threshold: resample a row when ``ESS < ess_threshold * N``, in ``[0, 1]`` (default 1: at every
            potential node; 0: never).
        resampler: ``"systematic"`` (default), ``"multinomial"``, ``"stratified"``, ``"residual"`` or a
            callable ``(log_w, generator) -> indices`` (:mod:`steerdiff.smc.resample`).
        generator: ``None``, a ``torch.Generator`` or a list of ``batch`` of them (row ``b``'s particles,
            estimates and resampling from ``generator[b]`` alone: a row's result is the same in any batch).
        device: where the all-masked batch of a shape is made (default CPU); only with a shape.
        progress: show a tqdm bar.
        group: ``None`` (this process), or a ``torch.distributed`` process group to spread each batch
            row's particles over (module docstring, "Ranks"; ``particles`` at least its size): every rank
            returns the whole system, equal to this process's run with the same generators (in one state on
            every rank, torch's global RNG for ``generator=None``; a ``ValueError`` otherwise).
        **cond: passed to the network; tensors with ``batch`` rows are repeated for the particles, as
            are those the denoiser holds (:meth:`MaskedDenoiser.take_rows
            <steerdiff.discrete.MaskedDenoiser.take_rows>`: :class:`~steerdiff.discrete.CFG`'s
            ``uncond_kwargs``).

    Returns:
        :class:`~steerdiff.smc.Particles`: ``x`` ``(batch, particles, length)``, normalized ``log_w``,
        ``nfe`` (per batch row: ``particles`` times the network calls), ``reward`` ``r(x)`` of the final
        particles and the ``trace`` per node ``0..steps`` (node ``i < steps``: after step ``i``; node
        ``steps``: the final correction) of ESS, resampled rows and ``log Z``: ``out.log_z`` estimates
        ``log E_{p_S}[exp(lam r)]``.

    Example:
        >>> out = sd.discrete.fk_steering(den, reward, 2.0, shape=(4, L), particles=16, steps=32)
        >>> x = out.sample(generator=g)   # (4, L), one draw per batch row
    """
    who = "discrete.fk_steering"
    run = _Run(
        who, den, reward, shape, x_T, particles, steps, sampler, generator, device, progress, group, cond
    )
    interval = integer(who, "interval", interval, lo=1)  # checked where nothing is masked too
    nodes = potential_nodes(run.steps, interval, window, who) if run.steps else set()  # no steps: no window
    lam, potential, nodes = check_arguments(who, lam, potential, nodes)
    ess_threshold = real(who, "ess_threshold", ess_threshold, lo=0, hi=1)
    resample_fn = _resample.get(resampler, who)
    run.start()
    name = f"{who}: resampler {getattr(resample_fn, '__name__', type(resample_fn).__name__)!r}"
    batch, n, dev = run.batch, run.n, run.x.device
    source = "lam * reward (the potentials)"
    weights, ancestors = Weights(who, batch, n, dev, source), Ancestors(batch, n, dev)
    state = initial_state((batch, n), dev)
    arange = torch.arange(n, device=dev).expand(batch, n)
    no_resample = torch.zeros(batch, dtype=torch.bool, device=dev)
    for i in run.nodes():
        log_p, live = run.step(i)
        inc = None
        if lam != 0 and i in nodes:
            old = dict(state)
            inc = increment(potential, lam, run.reward(run.estimate(log_p), i), state)
            # a done row gets no potential: its result must not depend on the steps a batch with more
            # masked tokens takes (first_hitting), where max, sum and immediate would weight it again
            state = {k: torch.where(live[:, None], v, old[k]) for k, v in state.items()}
            inc = torch.where(live[:, None], inc, 0.0)
        ess = weights.reweight(inc)
        resampled = no_resample
        if inc is not None and ess_threshold > 0:
            # below the threshold by more than rounding: uniform weights read ESS = N (1 - 1e-16)
            resampled = ess < ess_threshold * n * (1 - 1e-9)
            idx = ancestors(name, resample_fn(weights.log_w, run.generator), i)
            anc = torch.where(resampled[:, None], idx, arange)
            if run.ranks.group is None or not anc.is_cpu or bool(resampled.any()):  # else: each keeps its own
                run.take(anc)
            state = {k: torch.take_along_dim(v, anc, dim=1) for k, v in state.items()}
            weights.reset(resampled)
        weights.record(resampled)
    r = run.reward(run.x, run.steps)
    weights.reweight(None if lam == 0 else lam * r - state["log_g"])
    weights.record(no_resample)
    trace = weights.trace()
    check_weights(who, trace.log_z, source)  # the checks a run off the CPU defers to its end, one read each
    ancestors.check()
    return run.result(weights.log_w, trace, r)


@spread_run
def best_of_n(
    den: MaskedDenoiser,
    reward: Reward,
    *,
    shape: Sequence[int] | None = None,
    x_T: Tensor | Sequence[int] | None = None,
    particles: int = 16,
    steps: int | None = None,
    sampler: str | Sampler = "ancestral",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    group: Any = None,
    **cond: Any,
) -> Particles:
    """The best of ``particles`` independent samples per batch row by ``reward`` (module docstring), as
    :func:`steerdiff.smc.best_of_n`.

    The arguments are :func:`fk_steering`'s; the ``N = particles`` samples of a row are the base sampler's
    draws for the ``N`` copies of the row (with one generator, those of :func:`~steerdiff.discrete.sample`
    on the ``batch * N`` rows). Returns :class:`~steerdiff.smc.Particles` with all ``N`` samples, a point
    mass on each row's best (``sample()`` returns it; ties: the first) and their ``reward``; no trace.
    """
    who = "discrete.best_of_n"
    run = _Run(
        who, den, reward, shape, x_T, particles, steps, sampler, generator, device, progress, group, cond
    )
    run.start()
    for i in run.nodes():
        run.step(i)
    r = run.reward(run.x, run.steps)
    log_w = torch.full_like(r, -math.inf).scatter_(1, r.argmax(-1, keepdim=True), 0.0)
    return run.result(log_w, None, r)
