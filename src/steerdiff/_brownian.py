"""A batch of torchsde ``BrownianInterval(..., tol=1e-6, halfway_tree=True)`` paths, one per seed, queried
together: the same numbers as one torchsde tree per sample, bit for bit, at a fraction of the cost.

torchsde's halfway tree splits every interval at its midpoint rounded to the tolerance, so its nodes -- and
the order in which an increment is assembled from them -- depend on the query times only; a sample's seed
enters only through the normal draw of each split node, ``randn`` from a generator seeded with the first
word of ``numpy.random.SeedSequence(seed, spawn_key=(node key, node depth), pool_size=8)``. Here the nodes
are shared by the batch, the seeds of a node are hashed for all samples at once (:class:`SeedHash`,
numpy's hash vectorized over the samples), the arithmetic runs on the whole batch, and a split node draws
its noise once for both children (torchsde draws it again for each); only the ``randn`` calls stay one
per sample, as the numbers must come from each sample's own generator.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BrownianBatch", "SeedHash"]

# numpy.random.SeedSequence's constants (O'Neill's seed_seq_fe hash) and torchsde's pool size
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _XSHIFT, _MASK = 0xCA01F9DD, 0x4973F715, 16, 0xFFFFFFFF
_POOL = 8


def _words(n: int) -> list[int]:
    """``n``'s little-endian 32-bit words, ``[0]`` for 0 (numpy's coercion of an entropy integer)."""
    out = [n & _MASK]
    while n > _MASK:
        n >>= 32
        out.append(n & _MASK)
    return out


class SeedHash:
    """``numpy.random.SeedSequence(seed, spawn_key=..., pool_size=8).generate_state(1)[0]`` for a batch of
    seeds at once. numpy hashes a seed's first 8 words (zeros where it has fewer) into a pool of 8, mixes
    the pool, then mixes in the words after them (the seed's beyond 8, then the spawn key's); the mixed
    pool of a seed is the same for every spawn key, so it is made once (seeds of one length in words
    together) and each spawn key costs only its own words' mixing."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.rows = len(seeds)
        by_length: dict[int, list[int]] = {}
        for b, s in enumerate(seeds):
            by_length.setdefault(len(_words(s)), []).append(b)
        # per length: the rows, their words beyond the pool (one column per seed), their mixed pool
        self.groups: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
        for length, rows in by_length.items():
            words = np.zeros((max(length, _POOL), len(rows)), dtype=np.uint32)
            for col, b in enumerate(rows):
                words[:length, col] = _words(seeds[b])
            hashmix = _Hashmix(_INIT_A, _MULT_A)
            pool = [hashmix(w) for w in words[:_POOL]]
            for src in range(_POOL):
                for dst in range(_POOL):
                    if src != dst:
                        pool[dst] = _mix(pool[dst], hashmix(pool[src]))
            self.groups.append((np.asarray(rows), words[_POOL:], pool))
        self.const = _INIT_A * pow(_MULT_A, _POOL * _POOL, 1 << 32) & _MASK  # after the pool's 64 hashmixes

    def first_words(self, spawn_key: tuple[int, ...] = ()) -> np.ndarray:
        """Each seed's first word of state under ``spawn_key``, a uint32 array."""
        out = np.empty(self.rows, dtype=np.uint32)
        spawn = np.asarray([w for k in spawn_key for w in _words(k)], dtype=np.uint32)[:, None]
        for rows, beyond, mixed in self.groups:
            hashmix, pool = _Hashmix(self.const, _MULT_A), list(mixed)
            for word in [*beyond, *spawn]:
                for dst in range(_POOL):
                    pool[dst] = _mix(pool[dst], hashmix(word))
            out[rows] = _Hashmix(_INIT_B, _MULT_B)(pool[0])  # generate_state's first output
        return out


class _Hashmix:
    """numpy's ``hashmix``: ``value`` hashed with the running constant, which then moves on."""

    def __init__(self, const: int, mult: int) -> None:
        self.const, self.mult = const, mult

    def __call__(self, value: np.ndarray) -> np.ndarray:
        value = value ^ np.uint32(self.const)
        self.const = (self.const * self.mult) & _MASK
        value = value * np.uint32(self.const)
        return value ^ (value >> np.uint32(_XSHIFT))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = np.uint32(_MIX_L) * x - np.uint32(_MIX_R) * y
    return r ^ (r >> np.uint32(_XSHIFT))


class _Node:
    """An interval of the halfway tree; ``key`` and ``depth`` are torchsde's spawn key of its split."""

    __slots__ = ("depth", "end", "key", "left", "mid", "parent", "right", "start")

    def __init__(self, start: float, end: float, parent: _Node | None, key: int, depth: int) -> None:
        self.start, self.end, self.parent, self.key, self.depth = start, end, parent, key, depth
        self.mid: float | None = None
        self.left: _Node | None = None
        self.right: _Node | None = None


class BrownianBatch:
    """Brownian paths on ``[t0, t1]``, one per seed, each that of
    ``torchsde.BrownianInterval(t0, t1, size=(1, *shape), dtype, device, entropy=seed, tol=10**-digits,
    halfway_tree=True)``; :meth:`increment` returns the rows' increments over ``[lo, hi]`` (times rounded
    to ``digits`` decimals, ``lo < hi``), as ``torch.cat`` of the trees' would be.

    The increments of the last ``cache`` nodes used are kept, each the batch's size (what is kept changes
    the cost, never the draws): a query reuses the nodes it shares with the last one instead of drawing them
    again; ``4 (depth + 2)`` nodes, ``depth = ceil(log2((t1 - t0) 10**digits))`` the tree's, hold about two
    queries' paths of a sampling run (one draw per new split then).
    """

    def __init__(
        self,
        t0: float,
        t1: float,
        seeds: Sequence[int],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        digits: int,
        cache: int,
    ) -> None:
        self.seeds, self.shape, self.dtype, self.device = SeedHash(seeds), shape, dtype, device
        self.digits, self.cache = digits, cache
        self.generator = torch.Generator(device)
        self.root = _Node(round(t0, digits), round(t1, digits), None, 0, 0)
        self.root_w = self._randn(self.seeds.first_words()) * math.sqrt(t1 - t0)
        self.cached: OrderedDict[_Node, Tensor] = OrderedDict()

    def _randn(self, seeds: np.ndarray) -> Tensor:
        """Row ``b``: ``randn(1, *shape)`` from a generator seeded with ``seeds[b]`` (torchsde's draw; randn
        is ``normal_`` on an empty tensor)."""
        out = torch.empty((len(seeds), *self.shape), dtype=self.dtype, device=self.device)
        for row, seed in zip(out, seeds.tolist(), strict=True):
            row.normal_(generator=self.generator.manual_seed(seed))
        return out

    def increment(self, lo: float, hi: float) -> Tensor:
        """``W(hi) - W(lo)`` for every row, summed over the tree's nodes that make up ``[lo, hi]`` from
        left to right (torchsde's sum)."""
        pieces: list[_Node] = []
        self._locate(self.root, lo, hi, pieces)
        w = self._w(pieces[0])
        for node in pieces[1:]:
            w = w + self._w(node)
        return w

    def _locate(self, node: _Node, lo: float, hi: float, out: list[_Node]) -> None:
        """Append the largest nodes under ``node`` inside ``[lo, hi]``, left to right, splitting the tree
        down to ``lo`` and ``hi``."""
        if lo == node.start and hi == node.end:
            out.append(node)
            return
        if node.mid is None:
            self._split(node, lo if lo > node.start else hi)
        assert node.mid is not None and node.left is not None and node.right is not None
        if hi <= node.mid:
            self._locate(node.left, lo, hi, out)
        elif lo >= node.mid:
            self._locate(node.right, lo, hi, out)
        else:
            self._locate(node.left, lo, node.mid, out)
            self._locate(node.right, node.mid, hi, out)

    def _split(self, node: _Node, t: float) -> None:
        """Split ``node`` at its rounded midpoint, and on the side of ``t`` on, until a split is at ``t``."""
        while True:
            mid = node.mid = round(0.5 * (node.end + node.start), self.digits)
            key, depth = 2 * node.key, node.depth + 1
            node.left = _Node(node.start, mid, node, key, depth)
            node.right = _Node(mid, node.end, node, key + 1, depth)
            if t == mid:
                return
            node = node.right if t > mid else node.left

    def _w(self, node: _Node) -> Tensor:
        """The rows' increments over ``node``: from its parent's and the parent's draw (a Brownian
        bridge at the midpoint), both children at once, the last ``cache`` nodes kept."""
        if node.parent is None:
            return self.root_w
        if node in self.cached:
            self.cached.move_to_end(node)
            return self.cached[node]
        parent = node.parent
        assert parent.mid is not None and parent.left is not None and parent.right is not None
        w = self._w(parent)
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff, right_diff = parent.mid - parent.start, parent.end - parent.mid
        mean = left_diff * w * h_reciprocal
        std = math.sqrt(left_diff * right_diff * h_reciprocal)
        left = mean + std * self._randn(self.seeds.first_words((parent.key, parent.depth)))
        right = w - left
        for child, value in ((parent.left, left), (parent.right, right)):
            self.cached[child] = value
            self.cached.move_to_end(child)
        while len(self.cached) > self.cache:
            self.cached.popitem(last=False)
        return left if node is parent.left else right
