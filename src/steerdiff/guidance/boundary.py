r"""The boundary condition of latent consistency models, as a denoiser (Luo et al. 2023, "Latent
Consistency Models", Eq. 5 / Sec. 4.1, after Song et al. 2023, "Consistency Models", Eq. 7).

An LCM (and an LCM-LoRA) is a diffusion net (eps, v or x0) whose consistency function is

    f(x, t) = c_skip(tau) x + c_out(tau) x0,     tau = timestep_scaling * t_net,
    c_skip  = s_d^2 / (tau^2 + s_d^2),           c_out = tau / sqrt(tau^2 + s_d^2),

with ``x0`` the net's denoised estimate at its time input ``t_net`` (the timestep) and ``s_d =
sigma_data = 0.5``: ``f -> x`` as ``tau -> 0``. :class:`ConsistencyBoundary` returns ``x0' = f`` with
``eps' = (x - alpha x0') / sigma``, so the solver (``lcm``, :class:`~steerdiff.solvers.TCD`) sees a
consistent pair. diffusers' ``LCMScheduler`` applies it with its ``timestep_scaling`` (default 10), after
its ``clip_sample`` / ``thresholding`` (``ConsistencyBoundary(DynamicThreshold(den, ...))``);
``TCDScheduler`` applies none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import real
from .._ops import axpby
from ..denoiser import Denoiser, Prediction
from .base import Guided, with_estimate

__all__ = ["ConsistencyBoundary"]

F64 = torch.float64


class ConsistencyBoundary(Guided):
    """LCM's boundary condition ``x0' = c_skip x + c_out x0`` at the net's time times ``timestep_scaling``.

    Args:
        den: the denoiser of the distilled net (its ``x0`` is the net's estimate).
        timestep_scaling: the factor on the net's time input (diffusers' ``timestep_scaling``, 10).
        sigma_data: ``s_d`` of ``c_skip``, ``c_out`` (0.5, as LCMScheduler fixes it).

    ``cost`` is ``den``'s: no further network evaluation. A ``den`` whose net time is negative somewhere
    on its process's range (an EDM net's ``0.25 log(sigma)``) is a ``ValueError``: ``c_out < 0`` there.
    """

    base_arg = "den"

    def __init__(self, den: Denoiser, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> None:
        super().__init__(den)
        who = "ConsistencyBoundary"
        self.timestep_scaling = real(who, "timestep_scaling", timestep_scaling, lo=0, lo_open=True)
        self.sigma_data = real(who, "sigma_data", sigma_data, lo=0, lo_open=True)
        p = den.process
        times = torch.linspace(p.t_min, p.t_max, 257, dtype=F64)
        negative = (self.time_map(times) < 0).nonzero()
        if len(negative):
            raise ValueError(
                f"{who}: den's net time is negative at t = {float(times[negative[0, 0]]):g} of its process "
                f"{p!r} (an EDM net's 0.25 log(sigma) below sigma = 1), where c_out < 0 flips the estimate; "
                "LCM's boundary condition takes the net's timestep >= 0 (a VP or flow model's denoiser)"
            )

    def scalings(self, t: float | Tensor, x: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """``(c_skip, c_out)`` at process time ``t``: floats for a scalar time (in float64, as diffusers
        computes them from its integer timestep), else per-sample tensors broadcasting against ``x``."""
        per_sample = isinstance(t, Tensor) and t.ndim > 0
        tau = self.time_map(torch.as_tensor(t, dtype=F64)) * self.timestep_scaling
        d2 = self.sigma_data**2
        c_skip, c_out = d2 / (tau * tau + d2), tau * (tau * tau + d2) ** -0.5
        if not per_sample:
            return float(c_skip), float(c_out)
        shape = (-1, *[1] * (x.ndim - 1))
        return c_skip.to(x.device, x.dtype).reshape(shape), c_out.to(x.device, x.dtype).reshape(shape)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        c_skip, c_out = self.scalings(t, x)
        if isinstance(c_skip, float) and isinstance(c_out, float):
            return with_estimate(pred, x0=axpby(c_skip, x, c_out, pred.x0))
        return with_estimate(pred, x0=c_skip * x + c_out * pred.x0)

    def __repr__(self) -> str:
        return (
            f"ConsistencyBoundary({self.base!r}, timestep_scaling={self.timestep_scaling:g}, "
            f"sigma_data={self.sigma_data:g})"
        )
