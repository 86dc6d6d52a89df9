"""Distances between a sampler's output and an exact answer."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["relative_rmse"]


def relative_rmse(x: Tensor, ref: Tensor) -> float:
    """``||x - ref|| / ||ref||`` over all entries, in float64: a solver's error against the exact
    solution from the same initial noise."""
    if x.shape != ref.shape:
        raise ValueError(f"relative_rmse: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    x, ref = x.to(torch.float64), ref.to(torch.float64)
    return float(((x - ref) ** 2).mean().sqrt() / (ref**2).mean().sqrt())
