"""sd.distributed.group: shards and collectives, on 3 gloo ranks against the single-process answer."""

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
