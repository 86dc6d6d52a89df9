"""Tensor helpers for the per-step hot path: fused arithmetic, tensors kept per device, the one host read
of a run's deferred checks, and a result put back in its input's memory layout."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["axpby", "first_false", "kept", "laid_out_as", "lincomb"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def axpby(a: float | Tensor, x: Tensor, b: float | Tensor, y: Tensor) -> Tensor:
    """``a * x + b * y`` in two kernels and one allocation when ``a`` and ``b`` are Python floats.

    Per-sample tensor coefficients (shaped to broadcast against ``x``) take the plain expression.
    """
    if isinstance(a, float) and isinstance(b, float):
        return torch.mul(x, a).add_(y, alpha=b)
    return a * x + b * y


def lincomb(coefs: Iterable[float], tensors: Iterable[Tensor], start: Tensor | None = None) -> Tensor:
    """``start + sum_j coefs[j] * tensors[j]`` (``start`` omitted: the sum alone) with float ``coefs``: one
    kernel per term and at most one allocation, the terms added in place in their order.

    ``start`` is a tensor the caller owns (it is written in place and returned); without it the first
    term is the one allocation. ``tensors`` may be a generator, so that terms made on the fly (a
    difference) are freed as they are added.
    """
    terms = zip(coefs, tensors, strict=True)
    if start is None:
        c, v = next(terms)
        start = torch.mul(v, c)
    for c, v in terms:
        start.add_(v, alpha=c)
    return start


def kept(cache: dict[K, T], key: K, make: Callable[[], T]) -> T:
    """``cache[key]``, made by ``make()`` on first use (a table or a constant copied to a device once,
    not at every step, where a host-to-device copy is a sync). Made outside inference mode: a tensor
    made under ``torch.inference_mode`` and kept could not be saved for backward by a later run."""
    value = cache.get(key)
    if value is None:
        with torch.inference_mode(False):
            value = cache[key] = make()
    return value


def host_to(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """The CPU tensor ``t`` on ``device`` (in ``dtype``, default its own). To a CUDA device the copy is made
    from pinned memory without blocking: no device sync (a copy from pageable memory waits for the device),
    and the caching host allocator keeps the pinned source until the copy is done."""
    t = t if dtype is None else t.to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def first_false(ok: Tensor) -> int | None:
    """The index of the first ``False`` in the 1-d flags ``ok`` (``None`` if all hold), read from the
    device once: checks deferred over a run (non-finite outputs, rewards, step sizes) end here."""
    ok = ok.cpu()
    return None if bool(ok.all()) else int((~ok).nonzero()[0])


def laid_out_as(x: Tensor, like: Tensor) -> Tensor:
    """``x`` (``like``'s shape, dtype and device) in ``like``'s memory layout: ``x`` itself where its strides
    are ``like``'s, else a copy in ``torch.empty_like(like)`` (``like``'s strides where it is dense, such as
    ``channels_last``; contiguous otherwise). The layout :func:`steerdiff.sample` returns, ``x_T``'s,
    whatever the net's output or a stack or a gather of rows made of it."""
    return x if x.stride() == like.stride() else torch.empty_like(like).copy_(x)
