r"""Noise sources for stochastic solvers: where the ``z`` of ``x = mean + std * z`` comes from.

A source is called as ``noise(t_from, t_to, like)`` and returns standard normal noise shaped like
``like`` for the step from process time ``t_from`` to ``t_to``. :func:`steerdiff.sample` draws
every stochastic step's noise from one source (:func:`make_noise` builds it from the
``generator`` argument); solvers with stochastic sub-steps draw theirs from the same source
through ``model.noise``.

* :class:`GeneratorNoise` -- ``torch.randn`` from one generator (the default).
* :class:`PerSampleNoise` -- one generator per batch row: sample ``b``'s noise depends only on its
  own generator, so a sample is the same whatever the batch it is drawn in.
* :class:`ReplayNoise` -- given noise maps, one per step of a given grid, replayed (the edit-friendly
  noise of :func:`steerdiff.ddpm_inversion.ddpm_invert`), refused by a run of another grid, solver or
  batch.
* :class:`BrownianTreeNoise` -- increments of one Brownian path per sample,
  ``(W(t_to) - W(t_from)) / sqrt(|t_to - t_from|)``, queried on a Brownian tree (Li et al. 2020,
  torchsde's ``BrownianInterval``, whose paths it draws for the whole batch at once; k-diffusion's
  ``BrownianTreeNoiseSampler`` idea): runs with
  different step counts see the same path, so their samples are coupled and converge to the
  same SDE solution. Its increment over ``[t, t]`` is 0: moves at a fixed time (Langevin, MCMC)
  get no noise from it, which :func:`check_fixed_time` refuses.

:func:`rand` and :func:`randn` also draw from a :class:`Shard`: a rank's rows of a batch spread over the
ranks of a process group, drawn for the whole batch (so every rank's generators advance as one
process's) and kept at the rank's rows.

Wrappers and kernels that draw noise of their own hold a ``generator`` too (:func:`check_generators`);
a per-row run needs theirs per row as well (:func:`check_shared`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from ._brownian import BrownianBatch
from ._checks import caller, device_or_none, integer, ordered

if TYPE_CHECKING:  # solvers.base imports this module
    from .solvers.base import Grid, Solver

__all__ = [
    "BrownianTreeNoise",
    "Draws",
    "GeneratorNoise",
    "Generators",
    "NoiseSource",
    "PerSampleNoise",
    "RefusedNoise",
    "ReplayNoise",
    "Shard",
    "check_fixed_time",
    "check_generators",
    "check_rows",
    "check_shared",
    "make_noise",
    "rand",
    "randn",
    "repeat_rows",
    "take_generator_rows",
]


def _draw_on(
    generator: torch.Generator | None, device: torch.device | str | None
) -> torch.device | str | None:
    """The device to draw on: ``generator``'s (``device`` without one); a ``ValueError`` naming
    ``generator`` unless it is ``None`` or one ``torch.Generator`` (a list's entries included)."""
    if generator is None:
        return device
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be None, a torch.Generator or a list of them (one per row), got "
            f"{type(generator).__name__}"
        )
    return generator.device


Generators = torch.Generator | Sequence[torch.Generator] | None


class Shard:
    """The draws of the flat ``rows`` (an int64 index) of a batch of ``n`` rows: every draw is made for all
    ``n`` rows from ``generator`` (one, a list of ``n``, or ``None``, as :func:`randn` takes them) and the
    rows ``rows`` kept. On every rank of a particle method spread over a process group, with its rank's
    rows, the generators advance as one process's drawing the whole batch, and each rank's numbers are that
    process's at its rows (the cost: each rank draws the whole batch's numbers)."""

    def __init__(self, generator: Generators, n: int, rows: Tensor) -> None:
        self.generator, self.n, self.rows = generator, n, rows


Draws = Generators | Shard
"""Where :func:`rand` / :func:`randn` draw from: :data:`Generators`, or a :class:`Shard` of them."""


def check_rows(generators: Sequence[torch.Generator], rows: int, who: str | None = None) -> None:
    """A ``ValueError`` naming ``generator`` (after ``who:`` where given) unless the list holds one
    generator per row of ``rows``."""
    if len(generators) != rows:
        prefix = caller(who)
        raise ValueError(f"{prefix}generator: {len(generators)} generators for a batch of {rows} rows")


def _draw(
    fn: Callable[..., Tensor],
    shape: Sequence[int],
    generator: Draws,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> Tensor:
    """``fn(shape)`` on ``generator``'s device, moved to ``device``; a list of generators draws row
    ``b`` (of ``shape[0]``) from ``generator[b]``, consecutive rows of one generator (a particle
    method's rows of one batch row) in one call, the rows joined on the generators' device and moved
    once; a :class:`Shard` draws ``shape[0] = len(rows)`` rows as its docstring says."""
    if isinstance(generator, Shard):
        if shape[0] != len(generator.rows):
            raise ValueError(f"generator: a shard of {len(generator.rows)} rows asked for {shape[0]} rows")
        whole = _draw(fn, (generator.n, *shape[1:]), generator.generator, dtype, device)
        if generator.rows.device != whole.device:
            generator.rows = generator.rows.to(whole.device)
        return whole.index_select(0, generator.rows)
    if isinstance(generator, Sequence) and not isinstance(generator, str | bytes):
        check_rows(generator, shape[0])
        rows, start = [], 0
        while start < len(generator):
            g, stop = generator[start], start + 1
            while stop < len(generator) and generator[stop] is g:
                stop += 1
            rows.append(fn((stop - start, *shape[1:]), generator=g, dtype=dtype, device=_draw_on(g, device)))
            start = stop
        if len({r.device for r in rows}) > 1:
            rows = [r.to(device) for r in rows]
        return torch.cat(rows).to(device)
    return fn(tuple(shape), generator=generator, dtype=dtype, device=_draw_on(generator, device)).to(device)


def randn(
    shape: Sequence[int], generator: Draws, dtype: torch.dtype | None, device: torch.device | str | None
) -> Tensor:
    """``torch.randn(shape)`` drawn on ``generator``'s device, then moved to ``device`` (diffusers'
    ``randn_tensor`` convention): a CPU generator then gives the same numbers whatever the device
    of the sample, where torch itself refuses a generator of another device. A list of generators,
    one per row of ``shape[0]``: row ``b`` from ``generator[b]`` (the same numbers whatever the other
    rows). ``device``: a ``torch.device``, a device string torch accepts or ``None`` (a
    ``ValueError`` otherwise)."""
    if device is not None and not isinstance(device, torch.device):
        device = device_or_none("randn", "device", device)
    return _draw(torch.randn, shape, generator, dtype, device)


def rand(
    shape: Sequence[int], generator: Draws, dtype: torch.dtype | None, device: torch.device | str | None
) -> Tensor:
    """``torch.rand(shape)`` (uniform on [0, 1)) drawn as :func:`randn` draws."""
    if device is not None and not isinstance(device, torch.device):
        device = device_or_none("rand", "device", device)
    return _draw(torch.rand, shape, generator, dtype, device)


class NoiseSource(Protocol):
    """Where a sampler's Gaussian noise comes from: ``source(t_from, t_to, like)`` is called once per
    draw by a step going from process time ``t_from`` to ``t_to`` and returns standard normal noise
    of ``like``'s shape, dtype and device (independent across calls for :class:`GeneratorNoise` and
    :class:`PerSampleNoise`; the Brownian increment over ``[t_to, t_from]``, normalized, for
    :class:`BrownianTreeNoise`)."""

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor: ...


class GeneratorNoise:
    """``randn`` from one ``torch.Generator`` (``None``: torch's default generator), or a :class:`Shard`'s
    rows of the draws of a whole batch."""

    def __init__(self, generator: torch.Generator | Shard | None = None) -> None:
        self.generator = generator

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        return randn(like.shape, self.generator, like.dtype, like.device)


class PerSampleNoise:
    """One generator per batch row; row ``b`` draws ``randn(like.shape[1:])`` from ``generators[b]``."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        if isinstance(generators, str | bytes) or not isinstance(generators, Sequence):
            raise ValueError(
                f"generator: expected a list of torch.Generator, got {type(generators).__name__}"
            )
        bad = sorted({type(g).__name__ for g in generators if not isinstance(g, torch.Generator)})
        if not generators or bad:
            raise ValueError(
                "generator: a list must hold one torch.Generator per sample, got "
                + (f"items of type {', '.join(bad)}" if bad else "an empty list")
            )
        self.generators = list(generators)

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        return randn(like.shape, self.generators, like.dtype, like.device)


class RefusedNoise:
    """A noise source that refuses every draw with a ``ValueError`` carrying ``message``: the source of a
    step whose own noise must not be drawn, where the caller supplies the step's randomness itself (a
    search drawing candidates from the step's Gaussian transition, an extraction of the noise that led to a
    given state), so a solver that draws inside its step is refused at its first draw."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        raise ValueError(self.message)


class ReplayNoise:
    """Given noise maps replayed: the step from node ``i`` of ``grid`` to node ``i + 1`` gets ``z[i]``.

    The maps are those that make ``solver``, a one-step stochastic solver, go through a given chain of
    states on ``grid`` (:func:`steerdiff.ddpm_inversion.ddpm_invert`); they mean nothing on another grid or
    process, under another solver (another transition's mean and std) or for another batch, so each of those
    is a ``ValueError``: :func:`steerdiff.sample` and :func:`steerdiff.paradigms` check the whole run before
    the first step (:meth:`check_run`), and every call checks its step and shape (the other entry points
    that take a noise source). A run may start at a later node of the grid (nodes ``k..N``: the edit's
    ``skip``).

    Args:
        grid: the grid of ``N`` steps the maps were made on (no clean end).
        z: the ``N`` maps, ``z[i]`` of the batch's shape (each draw is moved to the dtype and device of
            the state it is added to).
        solver: the solver the maps belong to (compared with ``==``: a solver dataclass's type and options).
    """

    def __init__(self, grid: Grid, z: Sequence[Tensor], solver: Solver) -> None:
        self.grid = grid
        self.times = list(grid.t)
        self.z = list(z)
        self.solver = solver
        if len(self.z) != grid.steps or not self.z:
            raise ValueError(
                f"ReplayNoise: z must hold one map per step of grid, {grid.steps}, got {len(self.z)}"
            )
        self.index = {t: i for i, t in enumerate(self.times[:-1])}
        self.shape = tuple(self.z[0].shape)

    def _grid_text(self) -> str:
        return f"the {len(self.z)}-step grid t = [{self.times[0]:.6g}, ..., {self.times[-1]:.6g}]"

    def check_run(self, who: str, solver: Solver, grid: Grid, x: Tensor) -> None:
        """A ``ValueError`` (after ``who:``) unless a run of ``solver`` over ``grid`` from ``x`` replays the
        maps: the same solver, the grid's nodes a tail ``times[k:]`` of the maps' grid (no clean end), and
        ``x`` of the maps' shape."""
        fix = "run sample with the arguments of EditNoise.sample_kwargs(skip)"
        if solver != self.solver:
            raise ValueError(
                f"{who}: generator replays noise maps made for solver {self.solver!r}, and this run's solver "
                f"is {solver!r}: a map is the noise of one solver's transition; {fix}"
            )
        k = len(self.times) - len(grid.t)
        if grid.clean_end or k < 0 or grid.t != self.times[k:]:
            got = f"{grid.steps} steps t = [{grid.t[0]:.6g}, ..., {grid.t[-1]:.6g}]"
            if k >= 0 and not grid.clean_end:  # as many nodes as a tail, at other times: name the first
                j = next(j for j, (a, b) in enumerate(zip(grid.t, self.times[k:], strict=True)) if a != b)
                got += f" (its node {j} at t = {grid.t[j]!r}, the maps' at {self.times[k + j]!r})"
            raise ValueError(
                f"{who}: generator replays noise maps made on {self._grid_text()} (final='none'), and this "
                f"run's grid is {got}" + (" with a clean end" if grid.clean_end else "") + "; a run must "
                f"take its nodes or a tail of them (schedule=times[skip:], steps=len(times) - 1 - skip, "
                f"final='none'): {fix}"
            )
        if grid.alpha != self.grid.alpha[k:] or grid.sigma != self.grid.sigma[k:]:
            raise ValueError(
                f"{who}: generator replays noise maps made on {self._grid_text()} of {self.grid.process!r}, "
                f"and this run's process {grid.process!r} has another alpha or sigma at those times; sample "
                "a denoiser of the inversion's process"
            )
        if tuple(x.shape) != self.shape:
            raise ValueError(
                f"{who}: generator replays noise maps of shape {self.shape} (batch, *sample_shape), and the "
                f"run's x_T has shape {tuple(x.shape)}: a map is one sample's; start from the inverted batch"
            )

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        i = self.index.get(t_from)
        if i is None or self.times[i + 1] != t_to:
            raise ValueError(
                f"ReplayNoise: a draw for a step from t_from={t_from:.6g} to t_to={t_to:.6g}, which is no "
                f"step of {self._grid_text()} the maps were made on (another grid, or a solver that draws "
                "inside its step)"
            )
        if tuple(like.shape) != self.shape:
            raise ValueError(
                f"ReplayNoise: a draw of shape {tuple(like.shape)}, and the maps have shape {self.shape} "
                "(batch, *sample_shape): start from the inverted batch"
            )
        return self.z[i].to(dtype=like.dtype, device=like.device)


_TREE_DIGITS = 6  # BrownianTreeNoise's time resolution: torchsde's tol = 1e-6 rounds times to 6 decimals


class BrownianTreeNoise:
    """Normalized increments of one Brownian motion per sample over process time.

    The tree resolves times to 1e-6 (torchsde's ``tol``): the increment over ``[t_to, t_from]`` is
    the one between the two times rounded to 6 decimals, divided by the square root of that rounded
    length (standard normal), and 0 where both round to the same time.

    Sample ``b``'s path is that of ``torchsde.BrownianInterval(t_min, t_max, entropy=seed_b, tol=1e-6,
    halfway_tree=True)``, bit for bit, so it does not depend on the batch. The batch's paths share the
    tree's nodes and are queried together (:class:`steerdiff._brownian.BrownianBatch`), but each node a
    query splits still draws one ``randn`` per sample from that sample's own generator, so a query's cost
    is that count times the batch: on ``[0, 999]`` (a 30-step run, one CPU thread, 1000 samples of 64
    dimensions, float32) 52 nodes and 0.17 s per query with the default ``cache_size``, 23 nodes and 0.08 s
    with 128, against 3-4 s with a torchsde tree per sample (also 45 kept nodes, each sample's).

    Args:
        like: a batched tensor of the batch's shape and device; the path is kept in its work dtype
            (:func:`~steerdiff.solvers.base.work_dtype`: float32 for float16/bfloat16, where a run
            keeps its state), and each increment is returned in the dtype and device of the call's
            ``like`` (the state it is added to).
        t_min, t_max: the time interval the path is defined on, finite with ``t_min < t_max`` (a
            process's range: ``process.t_min, process.t_max``); a step leaving it by more than the
            resolution 1e-6 is refused (it would get no noise there).
        seed: one integer (sample ``b`` uses ``seed + b``) or one integer per sample.
        cache_size: the increments kept of the tree's nodes last used, each a copy of ``like`` (an integer
            >= 1; the draws do not depend on it): torchsde's default 45, the memory of the trees it
            replaces; ``4 (ceil(log2((t_max - t_min) 1e6)) + 2)`` (128 on ``[0, 999]``) holds about two
            queries' paths, for about one draw per new node.
    """

    def __init__(
        self, like: Tensor, t_min: float, t_max: float, seed: int | Sequence[int] = 0, cache_size: int = 45
    ) -> None:
        from .solvers.base import work_dtype  # solvers.base imports this module

        who = "BrownianTreeNoise"
        if not isinstance(like, Tensor) or like.ndim < 1 or not like.is_floating_point():
            got = (
                f"{like.dtype} of shape {tuple(like.shape)}"
                if isinstance(like, Tensor)
                else type(like).__name__
            )
            raise ValueError(
                f"{who}: like must be a batched floating tensor (batch, *sample_shape), got {got}"
            )
        self.t_min, self.t_max = ordered(who, "t_min", t_min, "t_max", t_max)
        self.shape = tuple(like.shape)
        if isinstance(seed, Sequence) and not isinstance(seed, str | bytes):
            seeds = [integer(who, f"seed[{b}]", s, lo=0) for b, s in enumerate(seed)]
        else:  # torchsde's entropy: a non-negative integer
            seeds = [integer(who, "seed", seed, lo=0) + b for b in range(like.shape[0])]
        if len(seeds) != like.shape[0]:
            raise ValueError(f"{who}: seed has {len(seeds)} seeds for a batch of {like.shape[0]} samples")
        self.paths = BrownianBatch(
            self.t_min,
            self.t_max,
            seeds,
            self.shape[1:],
            work_dtype(like.dtype),
            like.device,
            _TREE_DIGITS,
            integer(who, "cache_size", cache_size, lo=1),
        )

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        if tuple(like.shape) != self.shape:
            raise ValueError(
                f"BrownianTreeNoise: like has shape {tuple(like.shape)}, the tree was built for {self.shape} "
                "(one path per sample); build it from the run's x_T"
            )
        slack = 10.0**-_TREE_DIGITS
        if min(t_from, t_to) < self.t_min - slack or max(t_from, t_to) > self.t_max + slack:
            raise ValueError(
                f"BrownianTreeNoise: a step from t_from={t_from} to t_to={t_to} leaves the path's range "
                f"[t_min, t_max] = [{self.t_min}, {self.t_max}], where it would get no noise; build the "
                "tree over the process's times: BrownianTreeNoise(x_T, process.t_min, process.t_max)"
            )
        # the tree resolves times to _TREE_DIGITS decimals: normalize by the interval it resolves, and
        # give 0 where both ends round to one point (torchsde recursed without end on such a query)
        lo, hi = sorted(round(min(max(t, self.t_min), self.t_max), _TREE_DIGITS) for t in (t_from, t_to))
        if hi - lo <= 0:
            return torch.zeros_like(like)
        sign = 1.0 if t_to >= t_from else -1.0
        w = (sign / math.sqrt(hi - lo)) * self.paths.increment(lo, hi)
        return w.to(dtype=like.dtype, device=like.device)


def repeat_rows(generator: Generators, n: int) -> torch.Generator | list[torch.Generator] | None:
    """``generator`` for a batch whose rows are each repeated ``n`` times in a row (a particle method's
    ``n`` particles of one batch row): a list's generators each ``n`` times, one generator or ``None`` as
    it is. Row ``b n + j`` then draws from batch row ``b``'s generator, as :func:`randn` draws a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [g for g in generator for _ in range(n)]


def take_generator_rows(generator: Generators, rows: Tensor | slice, n: int) -> Generators:
    """``generator`` for the rows ``rows`` of a batch of ``n``: a list of ``n`` (one per row) taken at
    ``rows``, anything else as it is (one generator or ``None`` serves any rows; a list of another length,
    e.g. one per particle, is checked where it draws). What a denoiser that draws noise of its own per row
    returns from ``take_rows``."""
    if generator is None or isinstance(generator, torch.Generator) or len(generator) != n:
        return generator
    return list(generator[rows]) if isinstance(rows, slice) else [generator[int(i)] for i in rows.tolist()]


def check_generators(who: str, generator: object, rows: int | None = None) -> Generators:
    """``generator`` if it is ``None``, one ``torch.Generator`` or a non-empty list of them (one per
    row: row ``b`` draws from ``generator[b]``, as :func:`randn` draws a list; of ``rows`` of them
    where the batch is known); else a ``ValueError`` naming ``who``'s ``generator``."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, Sequence) and not isinstance(generator, str | bytes):
        listed = [g for g in generator if isinstance(g, torch.Generator)]
        if 0 < len(listed) == len(generator) and (rows is None or len(listed) == rows):
            return listed
    if rows is not None:
        got = type(generator).__name__
        if isinstance(generator, Sequence) and not isinstance(generator, str | bytes):  # a string is no list
            bad = next((i for i, g in enumerate(generator) if not isinstance(g, torch.Generator)), None)
            got = f"a list of {len(generator)}" + (
                "" if bad is None else f" whose [{bad}] is {type(generator[bad]).__name__}"
            )
        raise ValueError(
            f"{who}: generator must be None, one torch.Generator or a list of batch = {rows} of them (one "
            f"per batch row), got {got}"
        )
    raise ValueError(
        f"{who}: generator must be None, a torch.Generator or a non-empty list of them (one per row), "
        f"got {type(generator).__name__} {generator!r:.40}"
    )


def check_shared(noise: object, shared: Sequence[str], fix: str, who: str | None = None) -> None:
    """A ``ValueError`` naming ``generator`` and the parts in ``shared`` when ``noise`` (a sampler's
    ``generator=``, or the source made from it) is one generator per row -- a list, or a
    :class:`PerSampleNoise` -- while those parts draw the whole batch from one ``torch.Generator`` of
    their own: their draws for a row, and so the row, would depend on the batch it is drawn in.
    ``fix`` ends the message; ``who:``, the caller, begins it where given."""
    per_row = isinstance(noise, PerSampleNoise) or (
        isinstance(noise, Sequence) and not isinstance(noise, str | bytes)
    )
    if shared and per_row:
        prefix = caller(who)
        raise ValueError(
            f"{prefix}generator: one generator per row (a list) asks for each row to be the same whatever "
            f"the batch, but {', '.join(dict.fromkeys(shared))} draws the whole batch from one "
            f"torch.Generator of its own, so a row would depend on the batch it is drawn in; {fix}"
        )


def check_fixed_time(who: str, noise: object, fix: str) -> None:
    """A ``ValueError`` naming ``who`` when ``noise`` is a :class:`BrownianTreeNoise` or a
    :class:`ReplayNoise`, for moves at a fixed time ``t`` (Langevin, MCMC), which draw ``noise(t, t,
    like)``: a Brownian increment over ``[t, t]`` is 0, so the moves would silently have no noise; replayed
    maps hold one draw per solver step and none there (the replay would refuse the first move's draw, after
    the run's first step). ``fix`` ends the message."""
    if isinstance(noise, BrownianTreeNoise):
        raise ValueError(
            f"{who}: generator is a Brownian tree, which has no noise at a fixed time (its increment "
            f"over [t, t] is 0, so the Langevin moves would have none); {fix}"
        )
    if isinstance(noise, ReplayNoise):
        raise ValueError(
            f"{who}: generator replays noise maps, one per solver step, which hold no noise for moves at a "
            f"fixed time; {fix}"
        )


def make_noise(
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None, who: str | None = None
) -> NoiseSource:
    """The source behind ``sample(..., generator=...)``: a generator, a list of per-sample
    generators, or any :class:`NoiseSource` (e.g. a :class:`BrownianTreeNoise`); anything else is a
    ``ValueError`` naming ``generator`` (after ``who:`` where given)."""
    if generator is None or isinstance(generator, torch.Generator):
        return GeneratorNoise(generator)
    if isinstance(generator, Sequence) and not isinstance(generator, str | bytes):
        return PerSampleNoise(generator)
    if callable(generator):
        return generator
    prefix = caller(who)
    raise ValueError(
        f"{prefix}generator must be None, a torch.Generator, a list of them (one per sample) or a noise "
        f"source (a callable noise(t_from, t_to, like)), got {type(generator).__name__} {generator!r:.40}"
    )
