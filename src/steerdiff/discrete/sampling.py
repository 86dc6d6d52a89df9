"""The entry point of discrete diffusion: :func:`sample` runs a sampler from a (partly) masked batch, or from
uniform noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import boolean, device_or_none, sizes
from ..noise import check_generators
from .ancestral import Ancestral
from .base import Model, Sampler
from .confidence import Confidence
from .denoiser import MaskedDenoiser, UniformDenoiser, check_tokens
from .first_hitting import FirstHitting
from .process import MaskedProcess, UniformProcess, uniform_tokens
from .remdm import ReMDM

__all__ = ["SampleInfo", "available", "batch", "get", "sample", "start"]

_REGISTRY: dict[str, type[Sampler]] = {cls.name: cls for cls in (Ancestral, Confidence, FirstHitting, ReMDM)}


def available() -> list[str]:
    """Names accepted by ``sampler=``."""
    return sorted(_REGISTRY)


def get(sampler: str | Sampler, who: str | None = None) -> Sampler:
    """A name from :func:`available` as its sampler, or a :class:`~steerdiff.discrete.base.Sampler` as it
    is; anything else is a ``ValueError`` naming ``sampler`` and the accepted values."""
    if isinstance(sampler, Sampler):
        return sampler
    if isinstance(sampler, str) and sampler in _REGISTRY:
        return _REGISTRY[sampler]()
    prefix = f"{who}: " if who else ""
    raise ValueError(f"{prefix}unknown sampler={sampler!r}; accepted: {available()} or a Sampler instance")


def start(
    who: str, den: object, x_T: object, device: object, name: str = "x_T"
) -> tuple[MaskedDenoiser, Tensor]:
    """``den``, checked (a :class:`~steerdiff.discrete.MaskedDenoiser`), and the batch its run starts from,
    a new tensor: a copy of the token ids ``x_T`` (checked) or, for a shape ``(batch, length)``, all masked
    on ``device`` (only with a shape); bad arguments a ``ValueError`` naming ``who`` and the argument
    (``name``: the caller's name for ``x_T``)."""
    if not isinstance(den, MaskedDenoiser):
        raise ValueError(f"{who}: den must be a steerdiff.discrete.MaskedDenoiser, got {type(den).__name__}")
    return den, batch(who, den.process, x_T, device, den.process.mask_id, name)


def batch(
    who: str,
    process: MaskedProcess | UniformProcess,
    x_T: object,
    device: object,
    fill: int,
    name: str = "x_T",
) -> Tensor:
    """A copy of the token ids ``x_T`` of ``process`` (checked), or for a shape ``(batch, length)`` that
    batch full of ``fill`` on ``device`` (only with a shape); bad arguments a ``ValueError`` naming ``who``
    and the argument (``name``: the caller's name for ``x_T``)."""
    if isinstance(x_T, Tensor):
        if device is not None:
            raise ValueError(
                f"{who}: device is for a shape x_T; a tensor x_T stays on its device ({x_T.device})"
            )
        return check_tokens(process, x_T, who).clone()  # a run with nothing to unmask returns a copy
    shape = sizes(who, name, x_T)
    if len(shape) != 2:
        what = "a shape (batch, length)" + (" or a tensor of token ids" if name == "x_T" else "")
        raise ValueError(f"{who}: {name} must be {what}, got {x_T!r}")
    where = device_or_none(who, "device", device)
    return torch.full(shape, fill, dtype=torch.long, device=where)


@dataclass
class SampleInfo:
    """What a run cost: the network evaluations (each on the whole batch), the steps and the sampler."""

    nfe: int
    steps: int
    sampler: Sampler


@overload
def sample(
    den: MaskedDenoiser | UniformDenoiser,
    x_T: Tensor | Sequence[int],
    steps: int | None = ...,
    sampler: str | Sampler = ...,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = ...,
    device: torch.device | str | None = ...,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    progress: bool = ...,
    return_info: Literal[False] = ...,
    **cond: Any,
) -> Tensor: ...


@overload
def sample(
    den: MaskedDenoiser | UniformDenoiser,
    x_T: Tensor | Sequence[int],
    steps: int | None = ...,
    sampler: str | Sampler = ...,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = ...,
    device: torch.device | str | None = ...,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    progress: bool = ...,
    return_info: Literal[True],
    **cond: Any,
) -> tuple[Tensor, SampleInfo]: ...


def sample(
    den: MaskedDenoiser | UniformDenoiser,
    x_T: Tensor | Sequence[int],
    steps: int | None = None,
    sampler: str | Sampler = "ancestral",
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    return_info: bool = False,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Sample a discrete diffusion model from ``t = 1`` to ``t = 0``.

    Args:
        den: a :class:`~steerdiff.discrete.MaskedDenoiser`, or a guided one (:class:`~steerdiff.discrete.CFG`,
            :class:`~steerdiff.discrete.ClassifierGuidance`); or a
            :class:`~steerdiff.discrete.UniformDenoiser` (uniform noise), whose run starts from uniform
            tokens drawn from ``generator`` (a shape) or from the tokens ``x_T``, all taken as noisy at
            ``t = 1``, and takes ``sampler="ancestral"`` only.
        x_T: a shape ``(batch, length)``, for the all-masked batch, or a batch of token ids (integers,
            ``(batch, length)``): its masked positions are sampled given its unmasked ones, which stay
            (infilling, prompts). Given the all-masked sequence the data is the model's whatever
            ``alpha(1)``, and given a partly masked one its exact conditional (the masking does not depend
            on the tokens), so with an exact denoiser every start is exact at ``t = 1``.
        steps: ``"ancestral"``, ``"remdm"`` and ``"confidence"``: the number of steps ``N`` on the grid
            ``t_i = 1 - i / N`` (required);
            ``"first_hitting"``: ``None`` or the number of masked tokens of the most masked row (one step
            per token).
        sampler: a name from :func:`available` or a :class:`~steerdiff.discrete.base.Sampler`.
        generator: ``None`` (torch's global RNG), a ``torch.Generator`` or a list of them, one per row (a
            row is then the same whatever the batch it is drawn in).
        device: where the all-masked batch of a shape is made (default CPU); only with a shape.
        callback: called after every step with ``{"i", "t", "x", "log_probs", "nfe"}`` (``t``: the rows'
            times, ``(batch,)``; ``log_probs``: the step's ``log p_theta(x_0 | x)``). Read-only.
        progress: show a tqdm bar.
        return_info: also return a :class:`SampleInfo`.
        **cond: passed to the network on every call.

    Returns the token ids ``(batch, length)`` (int64 from a shape, ``x_T``'s dtype otherwise), with no
    mask left.

    Raises:
        ValueError: bad arguments (the message names the argument and what is accepted).
        NonFiniteError: the network returned NaN / ``+inf`` logits (the message names the step).
    """
    who = "discrete.sample"
    uniform = isinstance(den, UniformDenoiser)
    if isinstance(den, UniformDenoiser):
        x = batch(who, den.process, x_T, device, 0)  # a shape's tokens drawn below, once generator is checked
        given = torch.zeros_like(x, dtype=torch.bool)  # every token noisy
    else:
        den, x = start(who, den, x_T, device)
        given = x != den.process.mask_id
    slv = get(sampler, who)
    if uniform and not slv.uniform:
        accepted = [name for name, cls in _REGISTRY.items() if cls.uniform]
        raise ValueError(
            f"{who}: a UniformDenoiser takes sampler in {accepted} (the others unmask tokens, masked "
            f"diffusion only), got {sampler!r}"
        )
    n = slv.num_steps(steps, (~given).sum(dim=1))
    rows = check_generators(who, generator, len(x))
    if uniform and not isinstance(x_T, Tensor):
        x = uniform_tokens(x.shape, den.process.vocab_size, rows, x.device)
    progress = boolean(who, "progress", progress)
    return_info = boolean(who, "return_info", return_info)
    if callback is not None and not callable(callback):
        raise ValueError(f"{who}: callback must be None or a callable(dict), got {type(callback).__name__}")
    model = Model(den, cond)
    t = torch.ones(len(x), dtype=torch.float64, device=x.device)
    for i in tqdm(range(n), desc=slv.name, leave=False) if progress else range(n):
        x, t, log_p = slv.step(model, x, t, i, n, rows, given)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "log_probs": log_p, "nfe": model.nfe})
    if return_info:
        return x, SampleInfo(model.nfe, n, slv)
    return x
