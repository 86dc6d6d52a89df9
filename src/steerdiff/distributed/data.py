r"""Data-parallel sampling: a batch split over the ranks of a process group, one shard per rank.

Every rank makes the same call. Rank ``r`` samples its contiguous shard of the batch's ``n`` samples
(:meth:`~steerdiff.distributed.group.Ranks.shard`: sizes differ by at most one, lower ranks larger) with
the single-process sampler -- :func:`steerdiff.sample` (:func:`sample`) or :func:`steerdiff.discrete.sample`
(:func:`sample_discrete`) -- and, with ``gather=True``, every rank gets the whole batch back in order
(one ``all_gather``).

The result does not depend on the number of ranks: sample ``i`` is what the single-process sampler gives
it in any batch (up to the rounding a batch's size makes in the net's arithmetic), because everything it
depends on is its own -- its initial noise, its generator (one per sample; torch's global RNG, or one
generator for the batch, would give every rank the same draws, and are refused where a run draws noise),
its rows of the per-sample conditions (the tensors of ``**cond`` with ``n`` rows,
:func:`~steerdiff.denoiser.take_kwarg_rows`) and of the state the denoiser holds
(:meth:`~steerdiff.denoiser.Denoiser.take_rows`: :class:`~steerdiff.guidance.CFG`'s ``uncond_kwargs``,
:class:`~steerdiff.guidance.DPS`'s ``y``). Equality with the single-process sampler, which is itself
checked against exact laws, is the oracle of ``tests/test_distributed_sample.py`` (2 and 3 gloo ranks,
uneven and empty shards): token ids equal, samples to 1e-12 in float64 with the exact mixture denoiser
(``sd.sample`` alone moves a sample by 5.6e-16 between batches of 7 and 3, the mixture's products
rounding by batch size).

The noise is given in one of two ways:

* ``x_T`` (:func:`sample`; the same tensor on every rank) and, where the run draws noise, ``generator=``
  a list of one ``torch.Generator`` per sample (rank ``r`` takes its shard's);
* ``shape=`` and ``seed=``: sample ``i`` (of the whole batch) has the generator
  ``torch.Generator(device).manual_seed(seed + i)``, its initial noise is ``randn(shape[1:])`` from it, and
  the solver's noise is drawn from it after that (:func:`seeded`). No rank materializes more than its
  shard's noise -- 50,000 samples for FID over 8 GPUs, each drawing 6,250.

The generators live on ``device`` (where the samples are), so the draws need no transfer, and a run's
numbers are those of that device type's generator, for any number of ranks: a CPU and a CUDA generator
seeded alike draw different numbers, so a GPU run is reproduced on GPUs, not on a CPU.

Every rank must pass the same noise: before sampling, the ranks compare a fingerprint of it in one
all_reduce of 7 or 8 numbers and a flag per rank (:func:`_agreed`), and where ``x_T``, the generators,
``shape``, ``seed`` or ``dtype`` differ between them (an ``x_T`` drawn per rank, generators or a seed
offset by the rank, as data-parallel scripts make theirs), every rank raises a ``ValueError`` naming them:
each would otherwise sample its shard of another batch, and the gathered batch would be no one-process
run's.

If a rank fails (bad arguments of its shard, a NaN its rows reached), every rank raises: the failing rank
its own error, the others a ``RuntimeError`` naming it, after one all-reduce of a flag per rank (so no
rank waits at the gather for one that is gone). So does a rank whose checks and set-up raised (an argument
refused on it alone): the set-up ends in the all_reduce of the arguments every rank must share, which
carries every rank's flag too (a layout no argument changes) and which a rank that failed before it makes
as well.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, overload

import torch
from torch import Tensor

from .. import mcmc as _mcmc
from .._checks import boolean, device_or_none, integer, sample_dtype, sizes
from .._ops import laid_out_as
from ..denoiser import Denoiser, check_denoiser, check_sample_shape, take_kwarg_rows
from ..discrete import sampling as _discrete
from ..discrete.denoiser import MaskedDenoiser
from ..discrete.first_hitting import FirstHitting
from ..noise import randn
from ..sampling import DEFAULT_SCHEDULE, SampleInfo, check_x_T, plan, sample_as
from ..schedules import Schedule, ScheduleLike
from ..solvers.base import Grid, Solver
from .group import Ranks, as_bytes, ranks

__all__ = ["sample", "sample_discrete", "seeded"]

_I = TypeVar("_I")
_S = TypeVar("_S")
# sample's set-up: progress, gather, return_info, the schedule, grid and solver, the batch's n, the device, an
# empty batch, and the initial noise and generators of a rank's rows
_SetUp = tuple[
    bool, bool, bool, Schedule, Grid, Solver, int, torch.device, Tensor,
    Callable[[range], tuple[Tensor, list[torch.Generator] | None]],
]  # fmt: skip
# sample_discrete's: progress, gather, return_info, the denoiser, the token ids (a row of them for a shape),
# the batch's shape, the sampler, its steps, the first seed, the generators
_DiscreteSetUp = tuple[
    bool, bool, bool, MaskedDenoiser, Tensor, tuple[int, ...], _discrete.Sampler, int, int,
    list[torch.Generator] | None,
]  # fmt: skip


def _generators(seed: int, rows: range, device: torch.device) -> list[torch.Generator]:
    """Sample ``i``'s generator for ``i`` in ``rows``: ``torch.Generator(device).manual_seed(seed + i)``."""
    return [torch.Generator(device).manual_seed(seed + i) for i in rows]


def _check_seeded(
    who: str, shape: object, seed: object, dtype: object, device: object
) -> tuple[tuple[int, ...], int, torch.dtype, torch.device]:
    """``shape`` (a batch's, ``(n, *sample_shape)``), ``seed`` (an integer >= 0), ``dtype`` (``None``: torch's
    default) and ``device`` (``None``: CPU), checked: a ``ValueError`` naming the argument after ``who``."""
    size = sizes(who, "shape", shape)
    if len(size) < 2:
        raise ValueError(f"{who}: shape must be a batch's, (batch, *sample_shape), got {shape!r}")
    where = device_or_none(who, "device", device)
    return (
        size,
        integer(who, "seed", seed, lo=0),
        torch.get_default_dtype() if dtype is None else sample_dtype(who, "dtype", dtype),
        torch.device("cpu") if where is None else where,
    )


def _draw_seeded(
    shape: tuple[int, ...], seed: int, rows: range, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, list[torch.Generator]]:
    """:func:`seeded`, its arguments checked."""
    gens = _generators(seed, rows, device)
    return randn((len(rows), *shape[1:]), gens, dtype, device), gens


def seeded(
    shape: Sequence[int],
    seed: int,
    rows: range | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, list[torch.Generator]]:
    """The initial noise of the samples ``rows`` (default: all) of a batch of ``shape`` under ``seed``, and
    their generators, having drawn it: sample ``i``'s generator is
    ``torch.Generator(device).manual_seed(seed + i)`` and its noise ``randn(shape[1:])`` from it, in
    ``dtype`` (default torch's) on ``device`` (default CPU).

    ``sample(den, shape=shape, seed=seed, group=group, **kw)`` is, on any number of ranks,
    ``x_T, g = seeded(shape, seed); steerdiff.sample(den, x_T, generator=g, **kw)`` on one process.
    """
    who = "distributed.seeded"
    size, seed, dtype, where = _check_seeded(who, shape, seed, dtype, device)
    if rows is None:
        rows = range(size[0])
    if not isinstance(rows, range) or rows.step != 1 or not 0 <= rows.start < rows.stop <= size[0]:
        raise ValueError(
            f"{who}: rows must be None or a non-empty range(start, stop) within range({size[0]}), "
            f"got {rows!r}"
        )
    return _draw_seeded(size, seed, rows, dtype, where)


def _check_list(who: str, generator: object, n: int, fix: str) -> list[torch.Generator] | None:
    """``generator``: ``None`` or a list of ``n`` torch.Generators, one per sample, else a ``ValueError``
    naming it (``fix`` ends the message)."""
    if generator is None:
        return None
    if isinstance(generator, Sequence) and not isinstance(generator, str | bytes):
        typed = all(isinstance(g, torch.Generator) for g in generator)
        if typed and len(generator) == n:
            return list(generator)
        got = f"a list of {len(generator)}" + ("" if typed else " with items not torch.Generator")
    else:
        got = type(generator).__name__
    raise ValueError(
        f"{who}: generator must be None or a list of one torch.Generator per sample ({n}), so that a "
        f"sample's noise is its own whatever the rank that draws it, got {got}; {fix}"
    )


def _digest(value: object) -> int:
    """A digest of ``repr(value)`` in ``[0, 2**62)``, the same in every process (``hash`` of a string is
    salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") >> 2


def _weights(k: int, device: torch.device) -> Tensor:
    """``k`` fixed pseudo-random ``int64`` weights in ``[1, 2**20)`` (a multiplicative hash of the index)."""
    return (torch.arange(k, dtype=torch.int64, device=device) * 2654435761 + 97) % 1048573 + 1


_CHUNK = 1 << 22  # bytes of x_T summed at once: the int64 sums take 8 times as much


def _fingerprint(x: Tensor) -> Tensor:
    """Four ``int64`` numbers in ``[0, 2**62)`` on ``x``'s device that tell the batch ``x`` from another: a
    digest of its shape and dtype, and three sums of its bytes in row-major order (of its values, whatever
    its memory layout) -- of all of them, weighted by a pseudo-random weight per sample, and weighted by one
    per byte position within a sample. Integer sums are exact, so the same on every device and for any
    number of threads (a float sum's rounding depends on its order); ``x`` and a batch of other values
    differ in them but by chance, one with samples or the positions within one permuted too, unless equal
    bytes are exchanged. Reads ``x`` once, in chunks of samples (no copy of it whole, as ``int64`` or in
    another layout)."""
    n = x.shape[0]
    width = math.prod(x.shape[1:]) * x.element_size()  # the bytes of one sample
    rows = torch.empty(n, dtype=torch.int64, device=x.device)
    cols = torch.zeros(width, dtype=torch.int64, device=x.device)
    step = max(1, _CHUNK // max(width, 1))
    for i in range(0, n, step):
        part = x[i : i + step]
        block = as_bytes(part).reshape(len(part), width)
        rows[i : i + step] = block.sum(1)
        cols += block.sum(0)
    sums = torch.stack(
        [rows.sum(), (rows * _weights(n, x.device)).sum(), (cols * _weights(width, x.device)).sum()]
    )
    head = torch.tensor([_digest((tuple(x.shape), x.dtype))], device=x.device)
    return torch.cat([head, sums & ((1 << 62) - 1)])


def _values(x_T: Tensor | None, **given: object) -> Tensor:
    """What :func:`_agreed` compares between the ranks: ``x_T``'s :func:`_fingerprint` (zeros for ``None``)
    and a digest of each of ``given``'s ``repr`` (a list of generators is given as their ``initial_seed()``s:
    a generator's state moves as its own rank draws from it, so a list passed to a second call is
    legitimately in other states on other ranks), on ``x_T``'s device (the CPU for ``None``)."""
    head = torch.zeros(4, dtype=torch.int64) if x_T is None else _fingerprint(x_T)
    rest = torch.tensor([_digest(v) for v in given.values()], dtype=torch.int64, device=head.device)
    return torch.cat([head, rest])


def _agreed(
    who: str, r: Ranks, names: Sequence[str], set_up: Callable[[], tuple[_S, Callable[[], Tensor]]]
) -> _S:
    """``set_up()``'s result on every rank of ``r``: the call's checks and set-up, which return it and the
    values every rank must share (:func:`_values`, one per entry of ``names``, the arguments they come
    from). Its end is ONE all_reduce of a layout no argument changes (every rank's failure flag, the values'
    largest and minus their smallest over the ranks) and one read, which a rank whose set-up raised makes
    too (:meth:`~steerdiff.distributed.group.Ranks.fail_together`): that rank raises its error, the others a
    ``RuntimeError`` naming it, at once (not at the run's next collective, the group's timeout). Else a
    ``ValueError`` on every rank naming the arguments that differ between the ranks. ``set_up()`` alone
    without a group."""
    if r.group is None:
        return set_up()[0]
    k = len(names)

    def share(done: tuple[_S, Callable[[], Tensor]] | None) -> tuple[list[bool], list[int]]:
        row = torch.zeros(r.size + 2 * k, dtype=torch.int64, device=r.device())
        row[r.rank] = done is None
        if done is not None:
            values = done[1]().to(row.device)
            row[r.size :] = torch.cat([values, -values])
        top = r.max(row).tolist()
        return [top[r.size + j] == -top[r.size + k + j] for j in range(k)], top[: r.size]

    (out, _), same = r.fail_together(who, set_up, share)
    if differ := list(dict.fromkeys(name for name, ok in zip(names, same, strict=True) if not ok)):
        raise ValueError(
            f"{who}: {', '.join(differ)} {'differs' if len(differ) == 1 else 'differ'} between the group's "
            "ranks; every rank must make the same "
            "call: the same x_T (the whole batch's), generators seeded alike (not with the rank), the same "
            "shape=, seed= and dtype=: each rank samples its shard of the batch it is given"
        )
    return out


def _seeds(gens: list[torch.Generator] | None) -> list[int] | None:
    """The generators' ``initial_seed()``s (what :func:`_agreed` compares of them)."""
    return None if gens is None else [g.initial_seed() for g in gens]


def _spread(
    who: str,
    r: Ranks,
    n: int,
    device: torch.device,
    run: Callable[[range], tuple[Tensor, _I]],
    empty: Callable[[], tuple[Tensor, _I]],
    gather: bool,
) -> tuple[Tensor, _I]:
    """``run(rows)`` on this rank's shard of ``n`` samples (``empty()`` for a rank with none, which calls
    no sampler), every rank told whether any failed (:meth:`~steerdiff.distributed.group.Ranks.fail_together`:
    a flag per rank, summed on ``device``), then, with ``gather``, the ranks' samples in order on every
    rank."""
    sl = r.shard(n)
    rows = range(sl.start, sl.stop)
    if r.group is None:
        x, info = run(rows)
        return x, info

    def flags(done: tuple[Tensor, _I] | None) -> tuple[None, list[int]]:
        """Every rank's flag (set where its run raised): one-hot rows summed on ``device``, one all_reduce."""
        mine = torch.zeros(r.size, dtype=torch.int64, device=device)
        mine[r.rank] = done is None
        return None, r.sum(mine).tolist()

    (x, info), _ = r.fail_together(who, lambda: run(rows) if rows else empty(), flags)
    return (r.gather(x, n) if gather else x), info


@overload
def sample(
    den: Denoiser,
    x_T: Tensor | None = ...,
    steps: int | None = ...,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    group: Any,
    shape: Sequence[int] | None = ...,
    seed: int | None = ...,
    generator: Sequence[torch.Generator] | None = ...,
    dtype: torch.dtype | None = ...,
    device: torch.device | str | None = ...,
    final: str = ...,
    corrector: str | _mcmc.Kernel | None = ...,
    progress: bool = ...,
    gather: bool = ...,
    return_info: Literal[False] = ...,
    **kwargs: Any,
) -> Tensor: ...


@overload
def sample(
    den: Denoiser,
    x_T: Tensor | None = ...,
    steps: int | None = ...,
    solver: str | Solver | None = ...,
    schedule: ScheduleLike = ...,
    *,
    group: Any,
    shape: Sequence[int] | None = ...,
    seed: int | None = ...,
    generator: Sequence[torch.Generator] | None = ...,
    dtype: torch.dtype | None = ...,
    device: torch.device | str | None = ...,
    final: str = ...,
    corrector: str | _mcmc.Kernel | None = ...,
    progress: bool = ...,
    gather: bool = ...,
    return_info: Literal[True],
    **kwargs: Any,
) -> tuple[Tensor, SampleInfo]: ...


def sample(
    den: Denoiser,
    x_T: Tensor | None = None,
    steps: int | None = None,
    solver: str | Solver | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    group: Any,
    shape: Sequence[int] | None = None,
    seed: int | None = None,
    generator: Sequence[torch.Generator] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    final: str = "zero",
    corrector: str | _mcmc.Kernel | None = None,
    progress: bool = False,
    gather: bool = True,
    return_info: bool = False,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """:func:`steerdiff.sample` of a batch spread over the ranks of ``group`` (module docstring); every rank
    makes the same call.

    Args:
        den, steps, solver, schedule, final: as :func:`steerdiff.sample` (``steps`` default ``None``: 10, or
            the explicit grid's count).
        x_T: the whole batch's initial noise ``(n, *sample_shape)``, the same on every rank (each rank
            samples its shard's rows; compared, as ``generator``, ``shape``, ``seed`` and ``dtype`` are:
            module docstring); or ``None`` with ``shape`` and ``seed``. The gathered batch is in its memory
            layout (``channels_last`` stays so).
        group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``) or ``None`` (this
            process alone: :func:`steerdiff.sample` itself); :func:`~steerdiff.distributed.group.ranks`.
        shape, seed: instead of ``x_T``: the batch's shape ``(n, *sample_shape)`` and an integer
            ``seed >= 0``; sample ``i`` of the batch draws its initial noise and then its solver noise from
            ``torch.Generator(device).manual_seed(seed + i)`` (:func:`seeded`: what one process does to
            give the same samples).
        generator: with ``x_T``: ``None`` (for a run that draws no noise: a deterministic solver) or a list
            of ``n`` ``torch.Generator``, one per sample. One generator, or torch's global RNG, would give
            every rank the same draws, so they are refused; so is a Brownian tree (not split over ranks).
        dtype, device: of the samples drawn from ``shape`` (default torch's default dtype; the rank's
            current CUDA device under NCCL, else the CPU), where their generators live too; only with
            ``shape`` (``x_T`` keeps its own).
        corrector: as :func:`steerdiff.sample`, but a :class:`~steerdiff.mcmc.Kernel` with a ``step_size``
            and no generator of its own (it then draws from the samples' generators): a step chosen by
            ``snr`` from batch means would depend on the shards.
        progress: show a tqdm bar of rank 0's run, on rank 0 alone (one bar for the group).
        gather: ``True``: every rank returns the whole batch, in order; ``False``: its shard, the samples
            ``range(n)[ranks("", group).shard(n)]`` (contiguous, lower ranks one more where ``n`` does not
            divide), possibly empty, with no gather.
        return_info: also return this rank's :class:`~steerdiff.sampling.SampleInfo`: its ``nfe`` counts
            the network evaluations this rank made, each on its shard -- the single-process count on every
            rank with samples (``n >= size`` ranks: all), 0 on a rank without; the group made the sum.
            Its corrector acceptance rates are of this rank's samples.
        **kwargs: the other arguments of :func:`steerdiff.sample` (``callback``, called with this rank's
            shard; ``corrector_steps``, ``snr``) and the net's conditions, whose tensors of ``n`` rows are
            per-sample (each rank passes its shard's rows).

    The denoiser is given each rank's rows (:meth:`~steerdiff.denoiser.Denoiser.take_rows`); one that
    draws noise of its own (``RePaint``, ``CADS``) is refused: its draws are not split over the ranks.

    Returns the samples (the batch, or this rank's shard with ``gather=False``), and the info with
    ``return_info``. Raises a ``ValueError`` naming the argument for bad ones.
    """
    who = "distributed.sample"
    r = ranks(who, group)

    def set_up() -> tuple[_SetUp, Callable[[], Tensor]]:
        """The checks and what the run needs, ending in the values every rank must share (:func:`_agreed`)."""
        check_denoiser(who, "den", den)
        shown = boolean(who, "progress", progress)
        whole = boolean(who, "gather", gather)
        with_info = boolean(who, "return_info", return_info)
        if (x_T is None) == (shape is None):
            raise ValueError(
                f"{who}: x_T, shape: give x_T (the whole batch's initial noise, the same on every rank) or "
                "shape= with seed= (each rank draws its samples' noise), "
                + ("not both" if x_T is not None else "got neither")
            )
        sched, grid, slv = plan(den, steps, solver, schedule, final, who)
        kernel = None if corrector is None else _mcmc.get(corrector, who)
        if kernel is not None and (kernel.generator is not None or kernel.step_size is None):
            raise ValueError(
                f"{who}: corrector must have a step_size and no generator of its own (it then draws from "
                "the samples' generators), e.g. sd.mcmc.ULA(step_size=1e-3): a step chosen by snr from batch "
                f"means, or one generator's draws, would depend on how the batch is split; got {kernel!r}"
            )
        if own := den.own_noise():
            raise ValueError(
                f"{who}: den: {', '.join(dict.fromkeys(name for name, _ in own))} draws noise of its own, "
                "which is not split over the ranks (each would draw its first rows' noise); sample it on one "
                "process"
            )
        if x_T is not None:
            for name, value in (("seed", seed), ("dtype", dtype), ("device", device)):
                if value is not None:
                    raise ValueError(
                        f"{who}: {name} goes with shape= (the initial noise is drawn from the seeds); with "
                        "x_T, pass its per-sample generators as generator=[...], one per sample"
                    )
            check_x_T(den, x_T, who)
            n, where, blank = len(x_T), x_T.device, x_T[:0]
            if n == 0:
                raise ValueError(f"{who}: x_T has no samples, shape {tuple(x_T.shape)}")
            gens = _check_list(who, generator, n, "or pass shape= with seed=")
            if gens is None and (slv.noisy_on(grid) or kernel is not None):
                raise ValueError(
                    f"{who}: generator: the run draws noise ({slv.name}"
                    + (f", corrector {type(kernel).__name__}" if kernel is not None else "")
                    + "): pass one generator per sample, or shape= with seed=; torch's global RNG would give "
                    "every rank the same draws"
                )

            def agree() -> Tensor:
                return _values(x_T, generator=_seeds(gens), shape=None, seed=None, dtype=None)

            def start(rows: range) -> tuple[Tensor, list[torch.Generator] | None]:
                sl = slice(rows.start, rows.stop)
                return x_T[sl], None if gens is None else gens[sl]
        else:
            if generator is not None:
                raise ValueError(
                    f"{who}: generator goes with x_T; with shape= the per-sample generators are made from "
                    "seed="
                )
            size, seed_, dtype_, where = _check_seeded(who, shape, seed, dtype, device or r.device())
            check_sample_shape(f"{who}: shape", den, size[1:])
            n, blank = size[0], torch.empty((0, *size[1:]), dtype=dtype_, device=where)

            def agree() -> Tensor:
                return _values(None, generator=None, shape=size, seed=seed_, dtype=dtype_)

            def start(rows: range) -> tuple[Tensor, list[torch.Generator] | None]:
                return _draw_seeded(size, seed_, rows, dtype_, where)

        return (shown, whole, with_info, sched, grid, slv, n, where, blank, start), agree

    progress, gather, return_info, sched, grid, slv, n, where, blank, start = _agreed(
        who, r, ["x_T"] * 4 + ["generator", "shape", "seed", "dtype"], set_up
    )

    def run(rows: range) -> tuple[Tensor, SampleInfo]:
        x, gens_ = start(rows)
        sl = slice(rows.start, rows.stop)
        out = sample_as(
            who,
            den.take_rows(sl, n),
            x,
            steps,
            solver,
            schedule,
            final=final,
            generator=gens_,
            corrector=corrector,
            progress=progress and r.rank == 0,
            return_info=True,
            **take_kwarg_rows(kwargs, sl, n),
        )
        assert isinstance(out, tuple), "return_info=True"
        return out

    def empty() -> tuple[Tensor, SampleInfo]:
        return blank, SampleInfo(0, grid, slv, sched)

    x, info = _spread(who, r, n, where, run, empty, gather)
    if x_T is not None and gather:  # the gather's rows are contiguous
        x = laid_out_as(x, x_T)
    return (x, info) if return_info else x


@overload
def sample_discrete(
    den: MaskedDenoiser,
    x_T: Tensor | Sequence[int],
    steps: int | None = ...,
    sampler: str | _discrete.Sampler = ...,
    *,
    group: Any,
    seed: int | None = ...,
    generator: Sequence[torch.Generator] | None = ...,
    device: torch.device | str | None = ...,
    progress: bool = ...,
    gather: bool = ...,
    return_info: Literal[False] = ...,
    **kwargs: Any,
) -> Tensor: ...


@overload
def sample_discrete(
    den: MaskedDenoiser,
    x_T: Tensor | Sequence[int],
    steps: int | None = ...,
    sampler: str | _discrete.Sampler = ...,
    *,
    group: Any,
    seed: int | None = ...,
    generator: Sequence[torch.Generator] | None = ...,
    device: torch.device | str | None = ...,
    progress: bool = ...,
    gather: bool = ...,
    return_info: Literal[True],
    **kwargs: Any,
) -> tuple[Tensor, _discrete.SampleInfo]: ...


def sample_discrete(
    den: MaskedDenoiser,
    x_T: Tensor | Sequence[int],
    steps: int | None = None,
    sampler: str | _discrete.Sampler = "ancestral",
    *,
    group: Any,
    seed: int | None = None,
    generator: Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    gather: bool = True,
    return_info: bool = False,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, _discrete.SampleInfo]:
    """:func:`steerdiff.discrete.sample` of a batch spread over the ranks of ``group`` (module docstring);
    every rank makes the same call.

    Args:
        den, steps, sampler, device: as :func:`steerdiff.discrete.sample` (``device``: where the all-masked
            rows of a shape are made, and their generators with ``seed``; default the rank's current CUDA
            device under NCCL, else the CPU).
        x_T: the whole batch: a shape ``(n, length)`` (each rank makes its shard's all-masked rows) or token
            ids ``(n, length)``, the same on every rank.
        group: as :func:`sample`.
        seed: sample ``i``'s generator is ``torch.Generator(device).manual_seed(seed + i)`` (the token ids'
            device for a tensor ``x_T``); or
        generator: a list of ``n`` ``torch.Generator``, one per sample. Every sampler draws, so one of the
            two is required.
        progress, gather, return_info: as :func:`sample` (the :class:`~steerdiff.discrete.SampleInfo` of
            this rank; its ``steps`` for ``first_hitting`` are its own rows' most masked count, which ends
            each row the same).
        **kwargs: ``callback`` and the net's conditions, whose tensors of ``n`` rows are per-sample.
    """
    who = "distributed.sample_discrete"
    r = ranks(who, group)

    def set_up() -> tuple[_DiscreteSetUp, Callable[[], Tensor]]:
        """The checks and what the run needs, ending in the values every rank must share (:func:`_agreed`)."""
        shown = boolean(who, "progress", progress)
        whole = boolean(who, "gather", gather)
        with_info = boolean(who, "return_info", return_info)
        if isinstance(x_T, Tensor):
            masked_den, tokens = _discrete.start(who, den, x_T, device)
            size, masked = tuple(tokens.shape), (tokens == masked_den.process.mask_id).sum(dim=1)
        else:  # checks den and the shape on one row; each rank makes its own rows
            size = sizes(who, "x_T", x_T)
            if len(size) != 2:
                raise ValueError(
                    f"{who}: x_T must be a shape (batch, length) or a tensor of token ids, got {x_T!r}"
                )
            masked_den, tokens = _discrete.start(who, den, [1, *size[1:]], device or r.device())
            masked = torch.full((size[0],), size[-1])
        slv = _discrete.get(sampler, who)
        total = slv.num_steps(steps, masked, who)
        if (seed is None) == (generator is None):
            raise ValueError(
                f"{who}: seed, generator: every sampler draws noise; give seed= (sample i's generator seeded "
                "seed + i) or generator=[one per sample], "
                + ("not both" if seed is not None else "got neither")
            )
        first = 0 if seed is None else integer(who, "seed", seed, lo=0)
        gens = _check_list(who, generator, size[0], "or pass seed=")

        def agree() -> Tensor:
            return _values(
                tokens if isinstance(x_T, Tensor) else None, shape=size, seed=seed, generator=_seeds(gens)
            )

        return (shown, whole, with_info, masked_den, tokens, size, slv, total, first, gens), agree

    progress, gather, return_info, den, tokens, size, slv, total, first, gens = _agreed(
        who, r, ["x_T"] * 4 + ["shape", "seed", "generator"], set_up
    )
    n, where = size[0], tokens.device

    def run(rows: range) -> tuple[Tensor, _discrete.SampleInfo]:
        sl = slice(rows.start, rows.stop)
        return _discrete.sample(
            den.take_rows(sl, n),
            tokens[sl] if isinstance(x_T, Tensor) else (len(rows), *size[1:]),
            None if isinstance(slv, FirstHitting) else steps,  # its steps: the shard's most masked row
            sampler,
            generator=_generators(first, rows, where) if gens is None else gens[sl],
            device=None if isinstance(x_T, Tensor) else where,
            progress=progress and r.rank == 0,
            return_info=True,
            **take_kwarg_rows(kwargs, sl, n),
        )

    def empty() -> tuple[Tensor, _discrete.SampleInfo]:
        return tokens[:0], _discrete.SampleInfo(0, total, slv)

    x, info = _spread(who, r, n, where, run, empty, gather)
    return (x, info) if return_info else x
