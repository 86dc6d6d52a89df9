"""Sampling spread over many processes (one per GPU) through ``torch.distributed``.

Every entry point takes ``group=`` (a ``torch.distributed`` process group; ``None``: this process
alone, see :mod:`~steerdiff.distributed.group`), and every rank of the group makes the same call with
the same arguments.

* :func:`sample` / :func:`sample_discrete` -- :func:`steerdiff.sample` / :func:`steerdiff.discrete.sample`
  of a batch split over the ranks (:mod:`~steerdiff.distributed.data`), the same samples for any number
  of ranks; :func:`seeded` the single-process equivalent of their ``shape=`` / ``seed=`` noise.
"""

from .data import sample, sample_discrete, seeded
from .group import Ranks, ranks

__all__ = ["Ranks", "ranks", "sample", "sample_discrete", "seeded"]
