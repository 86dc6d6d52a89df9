r"""The denoisers of discrete diffusion: a network's logits over the clean token, made a distribution.

The network is called as ``net(x_t, t, **cond)`` on a batch of token ids ``x_t`` ``(batch, length)``
(integers; masked positions hold the mask id) and one time per row, and returns logits ``(batch, length,
vocab_size)`` for ``x_0`` at every position. :class:`MaskedDenoiser` turns them into the
distribution ``p_theta(x_0 | x_t)`` with MDLM's SUBS parameterization (Sahoo et al. 2024):

* zero masking probabilities: the mask id gets probability 0 (its logit ``-inf`` where the logits
  cover it);
* carry-over unmasking: an unmasked position keeps its token, ``p_theta(x_0^i | x_t) = [x_0^i = x_t^i]``.

The log-probabilities are float64 (categorical draws from float32 probabilities are biased at large
vocabularies: Zheng et al. 2024, "Masked Diffusion Models are Secretly Time-Agnostic Masked Models and
Exploit Inaccurate Categorical Sampling").

:class:`UniformDenoiser` is the same contract under uniform noise
(:class:`~steerdiff.discrete.UniformProcess`): no mask and no carry-over, the softmax of the logits at every
position. What the two share (the call, the checks of the logits) is :class:`TokenDenoiser`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import caller
from ..solvers.base import NonFiniteError
from .process import MaskedProcess, UniformProcess

__all__ = ["MaskedDenoiser", "TokenDenoiser", "UniformDenoiser", "check_tokens"]

TimeMap = Callable[[Tensor], Tensor]


def _float32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def check_tokens(
    process: MaskedProcess | UniformProcess, x: object, who: str | None = None, name: str = "x_T"
) -> Tensor:
    """``x`` if it is a batched ``(batch, length)`` tensor (neither empty) of integer token ids, in a dtype
    that holds every id of ``process``, each a clean id (``0..vocab_size - 1``) or a masked process's
    ``mask_id``; else a
    ``ValueError`` naming ``name`` (after ``who:`` where given), the accepted ids and the first offending
    entry."""
    p = caller(who) + name
    if not isinstance(x, Tensor):
        raise ValueError(f"{p} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{p} must hold integer token ids (e.g. torch.long), got {x.dtype}")
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(
            f"{p} must be a batch of sequences, shape (batch, length) with both >= 1; got {tuple(x.shape)}"
        )
    mask_id = process.mask_id if isinstance(process, MaskedProcess) else None
    top = process.vocab_size - 1 if mask_id is None else max(process.vocab_size - 1, mask_id)
    if torch.iinfo(x.dtype).max < top:
        raise ValueError(
            f"{p} must have an integer dtype that holds the ids up to {top} (e.g. torch.long), got {x.dtype}"
        )
    valid = (x >= 0) & (x < process.vocab_size)
    if mask_id is not None:
        valid |= x == mask_id
    if not bool(valid.all()):
        b, i = (int(j) for j in torch.nonzero(~valid)[0])
        also = "" if mask_id is None else f" or the mask id {mask_id}"
        raise ValueError(
            f"{p} must hold ids in [0, {process.vocab_size - 1}]{also}, got {int(x[b, i])} at [{b}, {i}]"
        )
    return x


class TokenDenoiser:
    """What the denoisers of discrete diffusion share: a network over token ids and the process it was
    trained on, called as ``net(x_t, time_map(t), **cond) -> logits (batch, length, vocab_size)`` for
    ``x_0`` at every position, the logits checked and made float64 log-probabilities. A call of
    ``log_probs`` costs ``cost`` network evaluations (one here; a guided denoiser that calls several nets,
    :class:`~steerdiff.discrete.CFG`, says how many), which the samplers add up into
    :attr:`~steerdiff.discrete.SampleInfo.nfe`."""

    cost: int = 1
    process: MaskedProcess | UniformProcess
    process_type: ClassVar[type[MaskedProcess] | type[UniformProcess]]
    who: ClassVar[str]
    _nothing_left: ClassVar[str]  # the message where the logits leave a needed position nothing

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: MaskedProcess | UniformProcess,
        time_map: TimeMap | None = None,
    ) -> None:
        who = self.who
        if not callable(net):
            raise ValueError(f"{who}: net must be callable, got {type(net).__name__}")
        if not isinstance(process, self.process_type):
            raise ValueError(
                f"{who}: process must be a steerdiff.discrete.{self.process_type.__name__}, got "
                f"{type(process).__name__}"
            )
        if time_map is not None and not callable(time_map):
            raise ValueError(f"{who}: time_map must be None or callable, got {type(time_map).__name__}")
        self.net, self.process = net, process
        self.time_map: TimeMap = _float32 if time_map is None else time_map

    def _log_softmax(
        self, x_t: Tensor, t: Tensor, cond: dict[str, Any], drop: int | None, needed: Tensor
    ) -> Tensor:
        """``log_softmax`` of the network's logits at ``(x_t, t)``, float64 ``(batch, length, vocab_size)``,
        the id ``drop`` (where not ``None``) given logit ``-inf``. A ``ValueError`` for ``t`` neither a
        number nor one per row, or logits of another shape or a non-floating dtype; a
        :class:`~steerdiff.NonFiniteError` where they hold NaN or ``+inf``, or leave no id a probability at
        a position of ``needed`` (``(batch, length)``)."""
        who, vocab_size = self.who, self.process.vocab_size
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
        if t.ndim > 1 or (t.ndim == 1 and len(t) not in (1, len(x_t))):
            raise ValueError(
                f"{who}: t must be a number or one time per row of x_t ({len(x_t)}), got shape "
                f"{tuple(t.shape)}"
            )
        t = t.expand(len(x_t))
        logits = self.net(x_t, self.time_map(t), **cond)
        want = (*x_t.shape, vocab_size)
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or tuple(logits.shape) != want:
            got = (
                f"{logits.dtype} {tuple(logits.shape)}"
                if isinstance(logits, Tensor)
                else type(logits).__name__
            )
            raise ValueError(f"{who}: net must return floating logits of shape {want}, got {got}")
        peak = logits.amax(-1)  # NaN where a position's logits hold one (amax propagates it)
        logits = logits.to(torch.float64, copy=drop is not None)  # on a copy: the net's tensor is left as is
        if drop is not None:
            logits[..., drop] = -torch.inf
        checks = [~(peak.isnan() | peak.isposinf()).any(), ~((logits.amax(-1) == -torch.inf) & needed).any()]
        finite, something_left = torch.stack(checks).tolist()  # one device sync per call
        if not finite:
            raise NonFiniteError(f"{who}: the network returned NaN or +inf logits")
        if not something_left:
            raise NonFiniteError(f"{who}: {self._nothing_left}")
        return torch.log_softmax(logits, dim=-1)


class MaskedDenoiser(TokenDenoiser):
    """A network over token ids and its :class:`~steerdiff.discrete.MaskedProcess`.

    Args:
        net: ``net(x_t, t_model, **cond) -> logits (batch, length, vocab_size)`` (any floating dtype).
        process: the masked process it was trained on (its ``vocab_size`` and ``mask_id``).
        time_map: what the network takes as time, from the float64 times ``t`` ``(batch,)``: default
            ``t`` as float32; ``process.total_noise`` for a network conditioned on MDLM's total noise
            ``-log alpha(t)`` (``+inf`` at ``t = 1`` where ``alpha(1) = 0``, ``linear`` and ``cosine``:
            MDLM's nets use ``loglinear``, whose ``alpha(1) = eps``). The exact denoiser of a masked model
            does not depend on ``t`` (Zheng et al. 2024), but a trained network may.

    A call of :meth:`log_probs` costs ``cost`` network evaluations (:class:`TokenDenoiser`).
    """

    process: MaskedProcess
    process_type = MaskedProcess
    who = "MaskedDenoiser"
    _nothing_left = "at a masked position the network's logits are -inf for every clean token"

    def log_probs(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """``log p_theta(x_0 | x_t)``, float64 ``(batch, length, vocab_size)``, from one network call at
        times ``t`` (a number or ``(batch,)``), with SUBS's two rules (module docstring): the mask id has
        probability 0, an unmasked position is its own token. A ``ValueError`` for logits of another
        shape or a non-floating dtype; a :class:`~steerdiff.NonFiniteError` where they hold NaN or
        ``+inf``, or a masked position's logits leave no clean token a probability."""
        p = self.process
        masked = x_t == p.mask_id
        log_p = self._log_softmax(x_t, t, cond, p.mask_id if p.mask_id < p.vocab_size else None, masked)
        carried = torch.full_like(log_p, -torch.inf).scatter_(
            -1, x_t.clamp(max=p.vocab_size - 1).long()[..., None], 0.0
        )
        return torch.where(masked[..., None], log_p, carried)

    def take_rows(self, rows: Tensor | slice, n: int) -> MaskedDenoiser:
        """This denoiser for calls whose row ``k`` is row ``rows[k]`` of a batch of ``n``: the per-row
        tensors it holds of its own (:class:`~steerdiff.discrete.CFG`'s ``uncond_kwargs`` of ``n`` rows)
        taken at ``rows``, in a copy; itself where it holds none (here).
        :func:`steerdiff.discrete.fk_steering` and :func:`~steerdiff.discrete.best_of_n` call it with each
        batch row repeated for its particles, as they do with the tensors of ``**cond``."""
        return self


class UniformDenoiser(TokenDenoiser):
    """A network over token ids and its :class:`~steerdiff.discrete.UniformProcess`: its logits are
    ``log p_theta(x_0 | x_t)`` at every position (every token may be noise, so none carries over), as a
    D3PM / SEDD-uniform network's ``x_0`` prediction.

    Args:
        net: ``net(x_t, t_model, **cond) -> logits (batch, length, vocab_size)`` (any floating dtype).
        process: the uniform process it was trained on.
        time_map: what the network takes as time, from the float64 times ``t`` ``(batch,)``: default
            ``t`` as float32; ``process.total_noise`` for SEDD's ``sigma(t) = -log alpha(t)``. Unlike a
            masked model's, the exact denoiser depends on ``t``.

    A call of :meth:`log_probs` costs ``cost`` network evaluations (:class:`TokenDenoiser`).
    """

    process: UniformProcess
    process_type = UniformProcess
    who = "UniformDenoiser"
    _nothing_left = "at a position the network's logits are -inf for every token"

    def log_probs(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """``log p_theta(x_0 | x_t)``, float64 ``(batch, length, vocab_size)``, the softmax of one network
        call at times ``t`` (a number or ``(batch,)``). A ``ValueError`` for logits of another shape or a
        non-floating dtype; a :class:`~steerdiff.NonFiniteError` where they hold NaN or ``+inf``, or leave
        a position no token."""
        return self._log_softmax(x_t, t, cond, None, torch.ones_like(x_t, dtype=torch.bool))
