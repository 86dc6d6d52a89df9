"""The ranks a run is spread over, and the few ``torch.distributed`` collectives steerdiff uses.

A run is spread over processes (one per GPU, as ``torchrun`` starts them) by passing ``group=``: a
``torch.distributed`` process group (``torch.distributed.group.WORLD`` for every rank, or one made by
``torch.distributed.new_group``) once ``torch.distributed.init_process_group`` has run. ``None`` runs on
this process alone. Every rank of the group makes the same call with the same arguments and the same
generator state: the collectives below are matched by the order in which the ranks reach them.

Work of ``n`` items (samples, particles) is split into contiguous shards, rank ``r`` taking
``shard(n)``: sizes differ by at most one, the lower ranks taking the larger ones, so the shards in rank
order are the items in order.

If one rank raises, the others must not be left waiting for it at a collective (until the group's timeout):
:meth:`Ranks.fail_together` runs a rank's work and then the one collective that follows it on every rank,
so every rank raises or none does. A run's set-up (its argument checks, first draws and initial states, any
of which may fail on one rank alone: an argument that differs between the ranks) ends in one such collective
of a layout no argument changes, :meth:`Ranks.start`, which a rank whose set-up raised can always make.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import integer

__all__ = ["Ranks", "as_bytes", "particle_ranks", "ranks", "rng_digest", "spread_run"]

_T = TypeVar("_T")
_U = TypeVar("_U")
_P = ParamSpec("_P")
# the run being set up (Ranks.started) in this context: whether this rank has made its Ranks.start
_STARTING: ContextVar[list[bool] | None] = ContextVar("steerdiff_starting", default=None)


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``size`` ranks of the process group ``group`` (``None``: one process,
    ``rank = 0``, ``size = 1``, and every collective is the identity). A ``ValueError`` unless ``size >= 1``
    and ``0 <= rank < size`` are integers."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        size = integer("Ranks", "size", self.size, lo=1)
        integer("Ranks", "rank", self.rank, lo=0, hi=size - 1)

    def sizes(self, n: int) -> list[int]:
        """Each rank's share of ``n`` items, in rank order: ``n // size``, plus one for the first
        ``n % size`` ranks."""
        q, r = divmod(n, self.size)
        return [q + (k < r) for k in range(self.size)]

    def shard(self, n: int) -> slice:
        """This rank's items of ``n``: ``range(n)[shard(n)]``."""
        sizes = self.sizes(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def flat_rows(self, batch: int, n: int) -> Tensor:
        """The flat rows (of ``batch * n``, row ``b``'s items ``b n .. b n + n - 1``) of this rank's items
        ``range(n)[shard(n)]`` of every one of ``batch`` rows: a particle method's rows on this rank."""
        return (torch.arange(batch)[:, None] * n + torch.arange(n)[self.shard(n)]).reshape(-1)

    def gather(self, x: Tensor, n: int, dim: int = 0) -> Tensor:
        """Every rank's shard of ``n`` items along ``dim`` (``x`` is this rank's ``shard(n)``), concatenated
        in rank order on every rank: the ``n`` items. Shards are padded to the largest for the collective."""
        if self.group is None:
            return x
        sizes = self.sizes(n)
        if x.shape[dim] != sizes[self.rank]:
            raise ValueError(
                f"Ranks.gather: rank {self.rank} holds {x.shape[dim]} of {n} items along dim {dim}, its "
                f"shard is {sizes[self.rank]}"
            )
        top = max(sizes)
        x = x.movedim(dim, 0).contiguous()
        if x.shape[0] < top:
            x = torch.cat([x, x.new_zeros(top - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)]).movedim(0, dim)

    def gather_many(self, tensors: Sequence[Tensor], n: int | Sequence[int], dim: int = 0) -> list[Tensor]:
        """:meth:`gather` of each of ``tensors`` (this rank's shards of ``n`` items along ``dim``; ``n`` one
        count for all, or one per tensor) in ONE all_gather: each shard's bytes (``movedim(dim, 0)``, row
        major; any dtypes) are packed into one flat ``uint8`` buffer per device, padded to the largest rank's,
        and cut back out: what :meth:`gather` gives each, bit for bit, for one collective's latency instead
        of ``len(tensors)``. The shapes apart from ``dim`` must be alike on every rank. Detached (a
        collective has no gradient); the tensors themselves without ``group``."""
        if self.group is None:
            return list(tensors)
        counts = [n] * len(tensors) if isinstance(n, int) else list(n)
        if len(counts) != len(tensors):
            raise ValueError(
                f"Ranks.gather_many: n must be one count or one per tensor ({len(tensors)}), got "
                f"{len(counts)}"
            )
        out: list[Tensor] = list(tensors)
        by_device: dict[torch.device, list[int]] = {}
        for j, x in enumerate(tensors):
            by_device.setdefault(x.device, []).append(j)
        for which in by_device.values():
            for j, whole in zip(
                which,
                self._gather_bytes([tensors[j] for j in which], [counts[j] for j in which], dim),
                strict=True,
            ):
                out[j] = whole
        return out

    def device(self) -> torch.device | None:
        """Where this group's collectives need their tensors: the current CUDA device under NCCL (which
        takes no others), ``None`` (any) for gloo and for one process. The default device of what a rank
        makes for the group where the caller names none."""
        if self.group is None or dist.get_backend(self.group) != "nccl":
            return None
        return torch.device("cuda", torch.cuda.current_device())

    def max(self, x: Tensor) -> Tensor:
        """The elementwise maximum of ``x`` over the ranks (a new tensor)."""
        return self._reduce(x, dist.ReduceOp.MAX)

    def sum(self, x: Tensor) -> Tensor:
        """The elementwise sum of ``x`` over the ranks (a new tensor)."""
        return self._reduce(x, dist.ReduceOp.SUM)

    def alike(self, values: Tensor) -> list[bool]:
        """Whether each entry of the 1-d ``int64`` ``values`` (each in ``[0, 2**62)``) is the same on every
        rank (all ``True`` alone): one all_reduce, the maximum of ``values`` and of ``-values`` (the largest
        and minus the smallest over the ranks), and one read."""
        if self.group is None:
            return [True] * len(values)
        top = self.max(torch.cat([values, -values]))
        return (top[: len(values)] == -top[len(values) :]).tolist()

    def check_global_rng(self, who: str, device: torch.device) -> None:
        """Raise ``ValueError`` naming ``who`` on every rank unless torch's global RNG of ``device`` (where
        ``generator=None`` draws) is in one state on every rank: a run drawing from it equals the one-process
        run only then (a script that seeds each rank with its rank would otherwise give each rank other noise
        and other resampling draws, silently). One all_reduce of the state's digest (:func:`rng_digest`)."""
        self.check_generator(who, None, device)

    def check_generator(
        self, who: str, generator: torch.Generator | Sequence[torch.Generator] | None, device: torch.device
    ) -> None:
        """Raise ``ValueError`` naming ``who`` on every rank unless ``generator`` (one ``torch.Generator``, a
        list, or ``None``: torch's global RNG of ``device``) is in one state on every rank, as a run whose
        every rank draws the whole group's noise and resampling from it needs (one seeded with the rank, as
        data-parallel scripts seed theirs, would give a run equal to no one-process run, silently). One
        all_reduce of the states' digest (:func:`rng_digest`) and one read."""
        if self.group is None:
            return
        digest = rng_digest(generator, device)
        if not self.alike(torch.tensor([digest], device=self.device()))[0]:
            raise ValueError(_rng_differs(who, generator))

    def start(
        self,
        who: str,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        device: torch.device,
    ) -> None:
        """The end of a run's set-up on this rank, its first collective: ONE all_reduce of a row of ``size +
        2`` numbers, every rank's flag (:meth:`fail_together`'s: whether its set-up raised, :meth:`started`'s
        share) and :meth:`check_generator`'s digest of ``generator``'s states, read once. A ``RuntimeError``
        naming ``who`` and the failed ranks where some rank's set-up raised, else :meth:`check_generator`'s
        ``ValueError`` where the generators differ between the ranks. Nothing without ``group``.

        Its layout depends on the group alone, so a rank whose set-up raised before it, wherever (an argument
        of its own refused, a solver's or an algorithm's ``init_state`` raising, a wrapper's checks), makes it
        too (:meth:`started`), and every rank raises at once rather than the others waiting at the run's next
        collective."""
        if self.group is None:
            return
        made = _STARTING.get()
        if made is not None:  # the run started: a rank's error from here on is the run's business
            made[0] = True
            # and a spread run from here on (a wrapper's next run, one in a reward) is one of its own, with
            # its own set-up and start (Ranks.started restores the variable at the run's end)
            _STARTING.set(None)
        _, alike = self.fail_together(who, lambda: rng_digest(generator, device), self._start_share)
        if not alike:
            raise ValueError(_rng_differs(who, generator))

    def started(self, who: str, work: Callable[[], _T]) -> _T:
        """``work()``, a run whose set-up ends in :meth:`start`, so that a rank whose ``work`` raised before
        it made :meth:`start` makes it as well, its flag set (:meth:`fail_together`'s share), and every rank
        raises; an error after it is the run's own business (no further collective here). Nested calls
        before the start (a wrapper's run calling the engine's) make one :meth:`start` between them; a call
        after it (a wrapper's second run, a run inside a reward) is a run of its own, with its own
        :meth:`start`. ``work()`` itself without ``group``; :func:`spread_run` makes a function that takes
        ``group=`` one."""
        if self.group is None or _STARTING.get() is not None:
            return work()
        made = [False]
        token = _STARTING.set(made)
        try:
            return self.fail_together(
                who, work, lambda done: (True, []) if made[0] else self._start_share(None)
            )[0]
        finally:
            _STARTING.reset(token)

    def _start_share(self, digest: int | None) -> tuple[bool, list[int]]:
        """:meth:`start`'s all_reduce: whether the digests are alike, and every rank's flag (``digest`` is
        ``None`` where this rank's set-up raised: it sends its flag and no digest)."""
        row = torch.zeros(self.size + 2, dtype=torch.int64, device=self.device())
        row[self.rank] = digest is None
        if digest is not None:
            row[self.size :] = torch.tensor([digest, -digest])
        every = self.max(row).tolist()
        return every[self.size] == -every[self.size + 1], every[: self.size]

    def fail_together(
        self, who: str, work: Callable[[], _T], share: Callable[[_T | None], tuple[_U, Sequence[object]]]
    ) -> tuple[_T, _U]:
        """``work()`` on this rank, then ``share``, the collective that follows it, on every rank; both
        results. If any rank's ``work`` raised (any exception, a ``KeyboardInterrupt`` included), every rank
        raises: that rank its own error, the others a ``RuntimeError`` naming ``who`` and the failing
        ranks.

        ``share`` (a flag's own collective, or the gather of the work's results with a flag riding along) is
        given ``work()``'s result (never ``None``), or ``None`` on a rank whose work raised, which sends the
        others' layout (zeros); it returns its own result and every rank's flag in rank order, read on the
        host (true: that rank's work raised), or no flags (``[]``) where ``work`` made that exchange itself,
        by a nested call before a collective of its own (a run's step that gathers midway). A rank whose
        work raised makes the collective before it raises, so the collective is made on every rank, in the
        order it has without a failure, and every rank raises or none does: no rank waits at a later
        collective for one that is gone (until the group's timeout). It costs nothing beyond ``share``, which
        the caller makes in any case where the flag rides a collective it has. The others learn that a rank
        failed, not why: each rank's error is its own."""
        try:
            done = work()
        # raised once every rank knows; no reference kept (a traceback holds the group). Any exception: a
        # KeyboardInterrupt on one rank leaves the others waiting as well
        except BaseException:
            share(None)
            raise
        out, flags = share(done)
        if failed := [k for k, flag in enumerate(flags) if flag]:
            raise RuntimeError(
                f"{who}: rank(s) {failed} of the group failed (each raised its error); so stops rank "
                f"{self.rank}"
            )
        return done, out

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` alone)."""
        if self.group is None:
            return [obj]
        every: list[Any] = [None] * self.size
        dist.all_gather_object(every, obj, group=self.group)
        return every

    def _gather_bytes(self, tensors: list[Tensor], counts: list[int], dim: int) -> list[Tensor]:
        """:meth:`gather_many` of tensors on one device: one all_gather of their bytes."""
        moved, widths, sizes = [], [], []
        for x, n in zip(tensors, counts, strict=True):
            sizes.append(self.sizes(n))
            if x.shape[dim] != sizes[-1][self.rank]:
                raise ValueError(
                    f"Ranks.gather_many: rank {self.rank} holds {x.shape[dim]} of {n} items along dim {dim}, "
                    f"its shard is {sizes[-1][self.rank]}"
                )
            x = x.detach().movedim(dim, 0)
            moved.append(x)
            widths.append(math.prod(x.shape[1:]) * x.element_size())  # the bytes of one item
        # every rank's byte count, from the shard sizes: rank r's buffer holds its shard of each in turn
        lengths = [[s[r] * w for s, w in zip(sizes, widths, strict=True)] for r in range(self.size)]
        top = max(sum(each) for each in lengths)
        buf = torch.zeros(top, dtype=torch.uint8, device=tensors[0].device)
        torch.cat([as_bytes(x) for x in moved], out=buf[: sum(lengths[self.rank])])
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(parts, buf, group=self.group)
        starts = [0] * self.size
        out = []
        for j, x in enumerate(moved):
            pieces = []
            for r in range(self.size):
                pieces.append(parts[r][starts[r] : starts[r] + lengths[r][j]])
                starts[r] += lengths[r][j]
            whole = torch.cat(pieces).view(x.dtype)  # a fresh buffer: aligned for any dtype
            out.append(whole.reshape(counts[j], *x.shape[1:]).movedim(0, dim))
        return out

    def _reduce(self, x: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)  # NCCL refuses a non-contiguous tensor
        if self.group is not None:
            dist.all_reduce(x, op=op, group=self.group)
        return x


def as_bytes(x: Tensor) -> Tensor:
    """``x``'s elements in row-major order as a flat ``uint8`` tensor (a view where ``x`` is contiguous). A
    tensor of one element is contiguous to torch at any stride (``x0[..., 0]`` of one particle), which a
    view as bytes refuses: it is viewed at stride 1."""
    flat = x.contiguous().reshape(-1)
    if flat.numel() == 1:
        flat = flat.as_strided((1,), (1,))
    return flat.view(torch.uint8)


def rng_digest(generator: torch.Generator | Sequence[torch.Generator] | None, device: torch.device) -> int:
    """A 62-bit digest (blake2b) of ``generator``'s states, one ``torch.Generator`` or a list, or of torch's
    global RNG of ``device`` for ``None``: what :meth:`Ranks.check_generator` compares between the ranks (two
    states alike give one digest; two that differ, another but with probability ``2**-62``)."""
    if generator is None:
        if device.type == "cpu":
            states = [torch.get_rng_state()]
        else:
            states = [torch.get_device_module(device.type).get_rng_state(device)]
    else:
        gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
        states = [g.get_state() for g in gens]
    h = hashlib.blake2b(digest_size=8)
    for state in states:
        h.update(state.contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 2


def _rng_differs(who: str, generator: object) -> str:
    """:meth:`Ranks.check_generator`'s message."""
    if generator is None:
        return (
            f"{who}: generator=None draws from torch's global RNG, whose state differs between the group's "
            "ranks; seed it alike on every rank (torch.manual_seed) or pass a torch.Generator (one, or one "
            "per batch row) seeded alike"
        )
    return (
        f"{who}: generator: its state differs between the group's ranks; every rank must pass generators "
        "seeded alike (not with the rank): each rank draws the noise and the resampling of the whole group "
        "from them"
    )


def ranks(who: str, group: object) -> Ranks:
    """``group=`` checked: ``None`` (this process alone) or a ``torch.distributed.ProcessGroup`` this process
    belongs to, after ``torch.distributed.init_process_group``."""
    if group is None:
        return Ranks()
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            f"{who}: group must be None (this process alone) or a torch.distributed.ProcessGroup "
            "(torch.distributed.group.WORLD, or one from torch.distributed.new_group), got "
            f"{type(group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError(f"{who}: group needs torch.distributed.init_process_group to have run")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"{who}: group: this process (global rank {dist.get_rank()}) is not one of its ranks"
        )
    return Ranks(rank, dist.get_world_size(group), group)


def spread_run(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``fn``, a run that takes ``group=`` as a keyword and whose set-up ends in :meth:`Ranks.start`, run
    under :meth:`Ranks.started`: where its argument checks or set-up raise on some ranks before that, they
    make :meth:`Ranks.start` too, and every rank raises at once. A ``group`` that is no process group of this
    process is left to ``fn`` to refuse (on every rank alike)."""

    @wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        group = kwargs.get("group")
        if group is None or _STARTING.get() is not None:
            return fn(*args, **kwargs)
        try:
            spread = ranks(fn.__name__, group)
        except ValueError:
            return fn(*args, **kwargs)
        return spread.started(fn.__name__, lambda: fn(*args, **kwargs))

    return run


def particle_ranks(who: str, group: object, n: int) -> Ranks:
    """``group=`` of a particle method with ``n`` particles per batch row, checked (:func:`ranks`): every
    rank must hold at least one particle of each row."""
    spread = ranks(who, group)
    if n < spread.size:
        raise ValueError(
            f"{who}: group: particles = {n} is fewer than the group's {spread.size} ranks; every rank needs "
            "at least one particle of each batch row"
        )
    return spread
