r"""What the guidance methods of masked diffusion share: a guided denoiser *is* a
:class:`~steerdiff.discrete.MaskedDenoiser`.

A guidance method wraps a base denoiser (same process) and returns, from :meth:`Guided.log_probs`, a
steered ``log p(x_0 | x_t)``: every sampler of :mod:`steerdiff.discrete` works with every guidance, as on
the continuous side (:mod:`steerdiff.guidance`), and the samplers' NaN check and NFE count apply (``cost``
network evaluations per call).

Masked diffusion guides the clean token of each masked position: a sampler's reverse step draws a masked
position's value, when it unmasks it, from ``p(x_0^i | x_t)`` alone (MDLM's SUBS reverse step, the
first-hitting step), so steering that law steers the sampler while the process keeps its unmasking
times. Unmasked positions carry over.
"""

from __future__ import annotations

from torch import Tensor

from ..denoiser import CostOfBase, take_wrapped_rows
from .denoiser import MaskedDenoiser
from .process import MaskedProcess

__all__ = ["Guided", "check_masked"]


def check_masked(who: str, name: str, den: object, process: MaskedProcess | None = None) -> MaskedDenoiser:
    """``den`` if it is a :class:`~steerdiff.discrete.MaskedDenoiser` (of a process equal to ``process``
    where given: the same vocabulary, mask id and schedule), else a ``ValueError`` naming ``who`` and
    ``name``."""
    if not isinstance(den, MaskedDenoiser):
        raise ValueError(
            f"{who}: {name} must be a steerdiff.discrete.MaskedDenoiser, got {type(den).__name__}"
        )
    if process is not None and den.process is not process and repr(den.process) != repr(process):
        raise ValueError(f"{who}: {name} must share the process {process!r}, got {den.process!r}")
    return den


class Guided(CostOfBase, MaskedDenoiser):
    """Base class of guided masked denoisers: a denoiser built on ``base``, sharing its net, process and
    time map. A subclass implements :meth:`log_probs`, calling ``self.base.log_probs``. ``cost``, the
    network evaluations of the latest call (the sampler reads it after each call), is ``base.cost`` unless
    the subclass assigns its own (``self.cost = ...``)."""

    base_arg = "base"  # the subclass's name for the wrapped denoiser, for the message

    def __init__(self, base: MaskedDenoiser) -> None:
        check_masked(type(self).__name__, self.base_arg, base)
        super().__init__(base.net, base.process, base.time_map)
        self.base = base

    def take_rows(self, rows: Tensor | slice, n: int) -> MaskedDenoiser:
        """A copy around ``base.take_rows(rows, n)``; itself where that is ``base``."""
        return take_wrapped_rows(self, rows, n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"
