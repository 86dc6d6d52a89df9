"""Tensor helpers for the per-step hot path: fused arithmetic, and the one host read of a run's
deferred checks."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["axpby", "first_false"]


def axpby(a: float | Tensor, x: Tensor, b: float | Tensor, y: Tensor) -> Tensor:
    """``a * x + b * y`` in two kernels and one allocation when ``a`` and ``b`` are Python floats.

    Per-sample tensor coefficients (shaped to broadcast against ``x``) take the plain expression.
    """
    if isinstance(a, float) and isinstance(b, float):
        return torch.mul(x, a).add_(y, alpha=b)
    return a * x + b * y


def first_false(ok: Tensor) -> int | None:
    """The index of the first ``False`` in the 1-d flags ``ok`` (``None`` if all hold), read from the
    device once: checks deferred over a run (non-finite outputs, rewards, step sizes) end here."""
    ok = ok.cpu()
    return None if bool(ok.all()) else int((~ok).nonzero()[0])
