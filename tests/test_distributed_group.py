"""sd.distributed.group: shards and collectives, on 3 gloo ranks against the single-process answer."""

import datetime

import pytest
import torch

import steerdiff as sd
from steerdiff.distributed import Ranks

from .distributed import spawn


def _collectives(group, n: int):
    r = sd.distributed.ranks("test", group)
    items = torch.arange(n * 2, dtype=torch.float64).reshape(n, 2)
    mine = items[r.shard(n)]
    along1 = r.gather(mine.T.contiguous(), n, dim=1)
    assert r.device() is None  # gloo takes tensors anywhere; NCCL's default is the rank's GPU (test_cuda)
    return (
        r.rank,
        r.size,
        r.gather(mine, n),
        along1,
        r.max(torch.tensor([r.rank, -r.rank])),
        r.sum(torch.ones(2)),
        r.gather_objects(f"rank {r.rank}" if r.rank != 1 else None),
    )


def test_sizes_and_shards():
    r = Ranks(rank=1, size=3)
    assert r.sizes(7) == [3, 2, 2]
    assert r.sizes(2) == [1, 1, 0]
    shards = [Ranks(k, 3).shard(7) for k in range(3)]
    assert [list(range(7))[s] for s in shards] == [[0, 1, 2], [3, 4], [5, 6]]
    assert Ranks().shard(5) == slice(0, 5)
    # a particle method's flat rows (row b's particles b n .. b n + n - 1) of rank 1's shard [3, 4] of 7
    assert r.flat_rows(2, 7).tolist() == [3, 4, 10, 11]
    assert Ranks().flat_rows(2, 3).tolist() == list(range(6))
    # a rank outside the group: was rank -1 of 2 silently the last (slice(3, 5) of 5), rank 3 an IndexError
    for rank, size, said in ((-1, 2, "rank must be an integer in [0, 1], got -1"),
                             (2, 2, "rank must be an integer in [0, 1], got 2"),
                             (0, 0, "size must be an integer >= 1, got 0"),
                             (1.0, 2, "rank must be an integer in [0, 1], got 1.0")):  # fmt: skip
        with pytest.raises(ValueError) as err:
            Ranks(rank, size)  # type: ignore[arg-type]
        assert str(err.value) == f"Ranks: {said}"


def test_group_refused_before_init_and_wrong_type():
    assert sd.distributed.ranks("who", None) == Ranks()
    with pytest.raises(ValueError, match=r"who: group must be None .* got int"):
        sd.distributed.ranks("who", 3)


def test_collectives_on_three_ranks():
    n = 7  # shards 3, 2, 2: the gather pads
    out = spawn(_collectives, 3, n)
    items = torch.arange(n * 2, dtype=torch.float64).reshape(n, 2)
    for k, (rank, size, gathered, along1, mx, total, objects) in enumerate(out):
        assert (rank, size) == (k, 3)
        assert torch.equal(gathered, items)
        assert torch.equal(along1, items.T)
        assert mx.tolist() == [2, 0]
        assert total.tolist() == [3.0, 3.0]
        assert objects == ["rank 0", None, "rank 2"]


def _whole() -> list[tuple[torch.Tensor, int]]:
    """Tensors of mixed dtypes and strides, sharded along dim 1 over 7, 5 and 3 items (shards 3/2/2, 2/2/1,
    1/1/1)."""
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(2, 7, 3, generator=g, dtype=torch.float64), 7),
        (torch.randint(-(2**40), 2**40, (1, 7), generator=g), 7),
        (torch.rand(3, 5, generator=g) > 0.5, 5),
        (torch.randn(1, 3, 2, generator=g).to(torch.float16), 3),
        (torch.randn(2, 7, generator=g, dtype=torch.complex64), 7),
        # one element per rank at a stride of 4: contiguous to torch, refused by a view as bytes as it was
        (torch.randn(1, 3, 4, generator=g, dtype=torch.float64)[..., 0], 3),
    ]


def _packed(group):
    r = sd.distributed.ranks("test", group)
    mine = [x[:, r.shard(n)] for x, n in _whole()]
    calls = []
    gather = torch.distributed.all_gather

    def counted(*args, **kwargs):
        calls.append(1)
        return gather(*args, **kwargs)

    torch.distributed.all_gather = counted
    try:
        packed = r.gather_many(mine, [n for _, n in _whole()], dim=1)
        once = len(calls)
        one_by_one = [r.gather(x, n, dim=1) for x, (_, n) in zip(mine, _whole(), strict=True)]
    finally:
        torch.distributed.all_gather = gather
    with pytest.raises(ValueError) as err:
        r.gather_many(mine, [7, 7], dim=1)
    return packed, one_by_one, once, str(err.value)


def test_gather_many_packs_mixed_dtypes_and_uneven_shards_into_one_all_gather():
    for packed, one_by_one, once, said in spawn(_packed, 3):
        assert once == 1
        for got, alone, (want, _) in zip(packed, one_by_one, _whole(), strict=True):
            assert got.dtype == want.dtype
            assert torch.equal(got, want)
            assert torch.equal(alone, want)
        assert said == "Ranks.gather_many: n must be one count or one per tensor (6), got 2"
    mine = [x for x, _ in _whole()]
    alone = Ranks().gather_many(mine, 7, dim=1)  # one process: the tensors themselves
    assert all(a is b for a, b in zip(alone, mine, strict=True))


def _fail_together(group):
    """Ranks.fail_together on 3 ranks whose ``work`` returns ``10 * rank`` or raises ``ValueError`` (on the
    ranks ``failing``), ``share`` one gather of the values with the flags riding along; after each call
    every rank's outcome is gathered, a later collective that a rank left waiting in ``share`` would
    mismatch. The group's collectives time out after 20 s: a hang fails the test."""
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=20))
    r = sd.distributed.ranks("test", quick)
    calls = []

    def share(done: int | None) -> tuple[list[int], list[int]]:
        calls.append(done)
        every = r.gather(torch.tensor([[done is None, 0 if done is None else done]]), r.size)
        return every[:, 1].tolist(), every[:, 0].tolist()

    out = []
    for failing in ((), (1,), (0, 2)):

        def work(failing=failing) -> int:
            if r.rank in failing:
                raise ValueError(f"rank {r.rank}'s own failure")
            return 10 * r.rank

        try:
            said: object = r.fail_together("test", work, share)
        except (ValueError, RuntimeError) as e:
            said = f"{type(e).__name__}: {e}"
        out.append(r.gather_objects(said))
    return out, calls


def test_fail_together_raises_on_every_rank_when_one_fails():
    """Each rank gets the same outcomes, every rank's, gathered after each call (none was left waiting): no
    failure, the work's results and the gathered values; else the failing ranks their own ValueError and
    the others a RuntimeError naming them. Without fail_together a failing rank would raise before the
    gather and the others would wait there (the gathered outcomes below then misread, or time out)."""
    ok = [(0, [0, 10, 20]), (10, [0, 10, 20]), (20, [0, 10, 20])]

    def told(failing, k):
        if k in failing:
            return f"ValueError: rank {k}'s own failure"
        failed = f"rank(s) {list(failing)} of the group failed"
        return f"RuntimeError: test: {failed} (each raised its error); so stops rank {k}"

    for rank, (out, calls) in enumerate(spawn(_fail_together, 3)):
        assert out == [ok, [told((1,), k) for k in range(3)], [told((0, 2), k) for k in range(3)]]
        # share made on every rank in each call, given None where this rank's work raised
        assert calls == [10 * rank, None if rank == 1 else 10 * rank, None if rank in (0, 2) else 10 * rank]
    alone = Ranks().fail_together("test", lambda: 3, lambda done: (done, [False]))
    assert alone == (3, 3)


def test_rng_digest_tells_states_apart():
    """Ranks.check_generator's and Ranks.start's digest: one per state (a generator's, a list's in order, the
    global RNG's), another after a draw, for another seed or order; 62 bits (its negation fits in int64)."""
    cpu = torch.device("cpu")
    digest = sd.distributed.group.rng_digest
    seeded = [torch.Generator().manual_seed(s) for s in (0, 1)]
    first = digest(seeded[0], cpu)
    assert 0 <= first < 2**62
    assert digest(torch.Generator().manual_seed(0), cpu) == first
    assert digest(seeded[1], cpu) != first
    assert digest(seeded, cpu) != digest(seeded[::-1], cpu)
    torch.randn(1, generator=seeded[0])
    assert digest(seeded[0], cpu) != first
    torch.manual_seed(3)
    again = digest(None, cpu)
    torch.manual_seed(3)
    assert digest(None, cpu) == again
    torch.rand(1)
    assert digest(None, cpu) != again
