"""Sampling spread over many processes (one per GPU) through ``torch.distributed``.

Every entry point takes ``group=`` (a ``torch.distributed`` process group; ``None``: this process
alone, see :mod:`~steerdiff.distributed.group`), and every rank of the group makes the same call with
the same arguments.
"""

from .group import Ranks, ranks

__all__ = ["Ranks", "ranks"]
