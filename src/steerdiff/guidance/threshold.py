r"""Thresholding of the denoised estimate, as a denoiser (Saharia et al. 2022, "Photorealistic
Text-to-Image Diffusion Models with Deep Language Understanding" (Imagen), Sec. 2.3).

Dynamic thresholding: per sample, ``s`` is the ``p``-quantile of ``|x0|`` over the sample's
entries, floored at 1 (and capped at ``max_value`` if given), and

    x0' = clip(x0, -s, s) / s,        eps' = (x - alpha x0') / sigma,

so the solver sees a consistent ``(x0', eps')`` pair. With ``s = 1`` (every entry already in
``[-1, 1]``) it is the identity on ``x0``. Static clipping (``percentile=None``) is
``x0' = clip(x0, -max_value, max_value)``. diffusers' ``thresholding=True`` with
``dynamic_thresholding_ratio=p, sample_max_value=m`` is ``DynamicThreshold(den, p, m)``, its
``clip_sample=True, clip_sample_range=m`` is ``DynamicThreshold(den, None, m)``. Under
``DDIMScheduler`` that holds with ``step(..., use_clipped_model_output=True)`` only: by default it steps
with the net's own ``eps`` beside the clipped ``x0`` (``tests/test_integration_diffusers.py``: 3.7e-7 with
the option, 1.87 without, 8 steps of a random net; ``SteerdiffScheduler`` takes the option for its ``ddim``
runs); DDPM's and DPM-Solver++'s steps read ``x0`` alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import real
from ..denoiser import Denoiser, Prediction
from .base import Guided, with_estimate

__all__ = ["DynamicThreshold"]


class DynamicThreshold(Guided):
    """Imagen's dynamic thresholding of ``x0`` (or static clipping with ``percentile=None``).

    Args:
        den: the denoiser whose ``x0`` is thresholded.
        percentile: the quantile ``p`` in ``(0, 1]`` of ``|x0|`` per sample (Imagen: 0.995, a
            fraction, not a percent); ``None``: static clipping at ``max_value``.
        max_value: the largest threshold ``s`` (diffusers' ``sample_max_value``); ``None``: no cap
            (Imagen). Required for static clipping.

    ``cost`` is ``den``'s: the threshold needs no further network evaluation.
    """

    base_arg = "den"

    def __init__(
        self, den: Denoiser, percentile: float | None = 0.995, max_value: float | None = None
    ) -> None:
        super().__init__(den)
        dynamic = percentile is not None
        if dynamic:
            percentile = real("DynamicThreshold", "percentile", percentile, lo=0, hi=1, lo_open=True)
        if max_value is not None:  # >= 1 with a percentile, > 0 for static clipping
            lo, lo_open = (1.0, False) if dynamic else (0.0, True)
            max_value = real("DynamicThreshold", "max_value", max_value, lo=lo, lo_open=lo_open)
        if percentile is None and max_value is None:
            raise ValueError("DynamicThreshold: give a percentile (dynamic) or a max_value (static clipping)")
        self.percentile, self.max_value = percentile, max_value

    def threshold(self, x0: Tensor) -> Tensor:
        """The thresholded ``x0`` (per sample; the quantile is computed in float32 at least). Non-finite
        entries are left as they are, for the sampler's NaN/inf check (clipped, an inf would pass it)."""
        if self.percentile is None:
            assert self.max_value is not None, "static clipping has a max_value (checked in __init__)"
            out = x0.clamp(-self.max_value, self.max_value)
        else:
            flat = x0.reshape(x0.shape[0], -1)
            work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            s = torch.quantile(work.abs(), self.percentile, dim=1).clamp(min=1.0, max=self.max_value)
            s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
            out = torch.maximum(torch.minimum(x0, s), -s) / s
        return torch.where(torch.isfinite(x0), out, x0)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        return with_estimate(pred, x0=self.threshold(pred.x0))

    def __repr__(self) -> str:
        return f"DynamicThreshold({self.base!r}, percentile={self.percentile}, max_value={self.max_value})"
