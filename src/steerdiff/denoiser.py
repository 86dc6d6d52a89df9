r"""A network together with how it was trained.

``Denoiser(net, process, prediction)`` turns one network call ``net(x, t_model, **cond)`` into
both the denoised estimate ``x0`` and the noise estimate ``eps`` of
``x_t = alpha x0 + sigma eps``. Solvers only ever see ``(x0, eps)``, never a parameterization.

With ``a = alpha(t)``, ``s = sigma(t)`` and the net output ``f``:

=============  ==============================  =========================================
prediction     meaning of ``f``                conversion
=============  ==============================  =========================================
``eps``        noise ``eps``                   ``x0 = (x - s f) / a``
``x0``         clean data ``x0``               ``eps = (x - a f) / s``
``v``          ``a eps - s x0`` (Salimans &    ``x0 = (a x - s f) / (a^2 + s^2)``,
               Ho 2022)                        ``eps = (s x + a f) / (a^2 + s^2)``
``score``      ``grad log p_t(x) = -eps / s``  ``eps = -s f``
``flow``       ``dx/dt = a' x0 + s' eps``      ``x0 = (s' x - s f) / (a s' - s a')``,
               (Lipman et al. 2022)            ``eps = (a f - a' x) / (a s' - s a')``
=============  ==============================  =========================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .processes import Process

__all__ = ["PREDICTIONS", "Denoiser", "Prediction"]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")


@dataclass
class Prediction:
    """The two estimates a denoiser returns at ``(x, t)``."""

    x0: Tensor
    eps: Tensor


def _per_sample(value: Tensor, x: Tensor) -> Tensor | float:
    """A float64 scalar or ``(batch,)`` tensor as something that broadcasts against ``x``."""
    if value.ndim == 0:
        return float(value)
    return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser:
    """A network, its noise process and its prediction type.

    Args:
        net: ``net(x, t_model, **cond) -> Tensor`` of ``x``'s shape.
        process: the :class:`~steerdiff.processes.Process` the net was trained on.
        prediction: one of ``"eps"``, ``"x0"``, ``"v"``, ``"score"``, ``"flow"``.
        time_map: maps process time (float64) to the net's time input; defaults to
            ``process.model_time`` (the identity: for ``VP.discrete`` the timestep index).
        shape: the shape of one sample, if known; :func:`steerdiff.sample` then checks ``x_T``.

    Calling ``den(x, t, **cond)`` with a float ``t`` (or a ``(batch,)`` tensor of times) returns a
    :class:`Prediction`; it costs exactly one net call.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: Process,
        prediction: str = "eps",
        time_map: Callable[[Tensor], Tensor] | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"Denoiser: unknown prediction={prediction!r}; accepted: {PREDICTIONS}")
        if not isinstance(process, Process):
            raise ValueError(f"Denoiser: `process` must be a steerdiff Process, got {type(process)}")
        self.net = net
        self.process = process
        self.prediction = prediction
        self.time_map = time_map if time_map is not None else process.model_time
        self.shape = tuple(shape) if shape is not None else None

    def net_time(self, t: float | Tensor, x: Tensor) -> Tensor:
        """The ``(batch,)`` time tensor handed to the net."""
        tm = self.time_map(torch.as_tensor(t, dtype=torch.float64))
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return tm.to(device=x.device, dtype=dtype).expand(x.shape[0])

    def __call__(self, x: Tensor, t: float | Tensor, **cond: Any) -> Prediction:
        f = self.net(x, self.net_time(t, x), **cond)
        if f.shape != x.shape:
            raise ValueError(f"Denoiser: net returned shape {tuple(f.shape)}, expected {tuple(x.shape)}")
        return self.convert(f, x, t)

    def convert(self, f: Tensor, x: Tensor, t: float | Tensor) -> Prediction:
        """Turn a raw net output ``f`` at ``(x, t)`` into ``(x0, eps)``."""
        p = self.process
        tt = torch.as_tensor(t, dtype=torch.float64)
        a, s = _per_sample(p.alpha(tt), x), _per_sample(p.sigma(tt), x)
        if self.prediction == "eps":
            return Prediction((x - s * f) / a, f)
        if self.prediction == "x0":
            return Prediction(f, (x - a * f) / s)
        if self.prediction == "v":
            n = a * a + s * s
            return Prediction((a * x - s * f) / n, (s * x + a * f) / n)
        if self.prediction == "score":
            eps = -s * f
            return Prediction((x - s * eps) / a, eps)
        da, ds = _per_sample(p.d_alpha(tt), x), _per_sample(p.d_sigma(tt), x)
        det = a * ds - s * da
        return Prediction((ds * x - s * f) / det, (a * f - da * x) / det)

    def __repr__(self) -> str:
        return f"Denoiser(prediction={self.prediction!r}, process={self.process!r})"
