"""The sampler contract of masked diffusion: a counted denoiser and one step at a time.

A :class:`Sampler` moves a batch of token sequences ``x`` (the mask id where still masked) and its
times ``t`` (float64, one per row) by one step in :meth:`Sampler.step`, calling the :class:`Model` once.
The times are per row because a first-hitting step jumps each row to its own random time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..noise import Draws
from ..solvers.base import NonFiniteError
from .denoiser import MaskedDenoiser, UniformDenoiser
from .process import MaskedProcess

__all__ = ["Model", "Sampler"]


class Model:
    """A :class:`~steerdiff.discrete.MaskedDenoiser` (or :class:`~steerdiff.discrete.UniformDenoiser`) with
    its ``cond``, counting network evaluations exactly
    (:attr:`nfe`: the denoiser's ``cost``, read after every call, 2 for a guided
    :class:`~steerdiff.discrete.CFG`) and naming the step at which the network returned NaN / ``+inf``
    (after ``who``, the entry point of the run)."""

    def __init__(
        self, den: MaskedDenoiser | UniformDenoiser, cond: dict[str, Any], who: str = "discrete.sample"
    ) -> None:
        self.den, self.cond, self.nfe, self.who = den, cond, 0, who
        self.known: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def masked(self) -> MaskedProcess:
        """The denoiser's process, for a sampler of masked diffusion (:func:`~steerdiff.discrete.sample`
        gives those only a :class:`~steerdiff.discrete.MaskedDenoiser`)."""
        process = self.den.process
        if not isinstance(process, MaskedProcess):
            raise TypeError(f"{self.who}: this sampler takes a masked process, got {process!r}")
        return process

    def know(self, x: Tensor, t: Tensor, log_p: Tensor) -> None:
        """Hold ``log_p``, the network's answer at ``(x, t)`` already computed (a particle method that
        evaluated the network at its candidates before a step): the next call, where it is made at exactly
        these tokens and times, returns it without calling the network (no NFE); any next call forgets it."""
        self.known = (x, t, log_p)

    def __call__(self, x: Tensor, t: Tensor, step: int) -> Tensor:
        """``log p_theta(x_0 | x)`` at times ``t`` (``(batch,)``), float64 ``(batch, length, vocab_size)``."""
        known, self.known = self.known, None
        if known is not None and torch.equal(x, known[0]) and torch.equal(t, known[1]):
            return known[2]
        try:
            log_p = self.den.log_probs(x, t, **self.cond)
        except NonFiniteError as e:
            first, cost = self.nfe + 1, self.den.cost
            which = f"evaluation {first}" if cost == 1 else f"evaluations {first}-{first + cost - 1}"
            raise NonFiniteError(
                f"{self.who}: at step {step} ({which}, t in [{float(t.min()):.6g}, "
                f"{float(t.max()):.6g}]): {e}"
            ) from e
        self.nfe += self.den.cost
        return log_p


class Sampler(ABC):
    """One reverse step of a discrete diffusion model at a time (of a masked one unless ``uniform``)."""

    name: ClassVar[str]
    uniform: ClassVar[bool] = False  # whether it also steps a UniformDenoiser

    @abstractmethod
    def num_steps(self, steps: object, masked: Tensor, who: str = "discrete.sample") -> int:
        """The number of steps a run takes, from the ``steps`` asked for (checked; a ``ValueError`` naming
        it after ``who``, the entry point) and the number of masked positions of each row, ``masked``
        ``(batch,)``."""

    @abstractmethod
    def step(
        self, model: Model, x: Tensor, t: Tensor, i: int, steps: int, generator: Draws, given: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Step ``i`` of ``steps`` from ``x`` at times ``t``: the new ``x`` (a new tensor), its times, and
        the log-probabilities of ``x_0`` the model gave. ``given`` marks the tokens the run started with
        (``x_T``'s unmasked positions), which a step must keep. Its randomness comes from ``generator``
        through :func:`steerdiff.noise.rand` and :func:`~steerdiff.discrete.categorical.draw` alone, each
        draw with one row per row of ``x`` first: a particle method spread over ranks passes a
        :class:`~steerdiff.noise.Shard`, which draws for every rank's rows and keeps this rank's."""
