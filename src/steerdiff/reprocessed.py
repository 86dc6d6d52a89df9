r"""Interpolant conversion: a denoiser trained on one process, sampled as a denoiser of another.

A denoiser trained on the process ``P`` (``x_P = alpha_P(t) x0 + sigma_P(t) eps``) serves any other
process ``Q`` (``x_Q = alpha_Q(s) x0 + sigma_Q(s) eps``) on the log-SNR range the two share (Kingma et
al. 2021, "Variational Diffusion Models": the continuous-time loss and the optimal denoiser depend on
the schedule only through the SNR; Kim et al. 2025, "Inference-Time Scaling for Flow Models via Stochastic
Generation and Rollover Budget Forcing", Sec. 4, interpolant conversion, which runs a rectified-flow
model on a variance-preserving path so that VP-SDE samplers and particle methods apply). At ``Q``'s
time ``s`` take ``P``'s time ``t`` with the same half log-SNR and rescale the state::

    lam_P(t) = lam_Q(s),        x_P = (alpha_P(t) / alpha_Q(s)) x_Q.

Then ``x_P = alpha_P x0 + (alpha_P sigma_Q / alpha_Q) eps = alpha_P x0 + sigma_P eps``, as
``sigma_Q / alpha_Q = sigma_P / alpha_P`` at equal log-SNR: ``x_P`` is the same pair ``(x0, eps)`` seen
through ``P``, a bijective rescaling of ``x_Q``. Conditioning on ``x_P`` is conditioning on ``x_Q``, so
``E[x0 | x_Q] = E[x0 | x_P]`` and ``E[eps | x_Q] = E[eps | x_P]``: the base's estimates are the
converted denoiser's unchanged, only the point and the time the net sees move. The probability-flow
ODEs of the two processes then carry ``x_T`` to the same ``x0`` (each is the ODE of ``x / alpha`` in
``sigma / alpha``, the same for both), so any solver of ``Q`` approximates the answer of ``P``'s ODE
from the correspondingly scaled ``x_T``; stochastic samplers of ``Q`` (a VP-SDE's ``ddpm``) draw paths
that ``P``'s own would not.

``Q``'s times are kept to the log-SNR range both processes cover: where ``Q``'s reaches past ``P``'s (a
VP-linear model reprocessed onto rectified flow, whose ``[1e-3, 0.999]`` spans ``lam`` in ``+-6.9``
against VP-linear's ``[-5.03, 4.61]``), the converted denoiser's process is a copy of ``Q`` with ``t_min``
/ ``t_max`` moved in to where ``lam_Q`` meets ``P``'s ends; ranges that do not overlap are a
``ValueError``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor

from ._ops import kept
from .denoiser import (
    _CACHE_SIZE,
    CostOfBase,
    Denoiser,
    Prediction,
    check_call,
    check_denoiser,
    take_wrapped_rows,
)
from .processes import Process

__all__ = ["Reprocessed"]

F64 = torch.float64


def _lam_range(process: Process) -> tuple[float, float]:
    """``(lam(t_max), lam(t_min))``: the process's half log-SNR range, lowest first."""
    return float(process.lam(process.t_max)), float(process.lam(process.t_min))


class Reprocessed(CostOfBase, Denoiser):
    """``base`` (a denoiser of its process ``P``) as a denoiser of ``process`` (``Q``): at ``Q``'s time
    ``s`` the base is called at ``P``'s time ``t`` of equal log-SNR, ``lam_P(t) = lam_Q(s)``, and at
    ``x_P = (alpha_P(t) / alpha_Q(s)) x_Q``; its ``x0`` and ``eps`` are returned unchanged (module
    docstring). One base call per call (``cost`` is the base's).

    Args:
        base: any denoiser (guided ones included); its learned variance, if any, is not carried (it
            interpolates ``P``'s DDPM variances).
        process: the process ``Q`` to sample on; its time range is narrowed to the log-SNR range both
            processes cover (:attr:`process` is then a copy of it), and one that does not overlap
            ``base.process``'s is a ``ValueError``.

    Example:
        >>> rf = sd.Denoiser(net, sd.RectifiedFlow(), prediction="flow")
        >>> vp = sd.Reprocessed(rf, sd.VP.linear())          # the paper's VP interpolant
        >>> x0 = sd.sample(vp, torch.randn(4, 2), steps=50, solver="ddpm", generator=g)
    """

    def __init__(self, base: Denoiser, process: Process) -> None:
        who = "Reprocessed"
        check_denoiser(who, "base", base)
        if not isinstance(process, Process):
            raise ValueError(f"{who}: process must be a steerdiff Process, got {type(process).__name__}")
        source = base.process
        q_lo, q_hi = _lam_range(process)
        p_lo, p_hi = _lam_range(source)
        lo, hi = max(q_lo, p_lo), min(q_hi, p_hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(
                f"{who}: process {process!r} covers log-SNR lam = log(alpha / sigma) in [{q_lo:.4g}, "
                f"{q_hi:.4g}], base's process {source!r} covers [{p_lo:.4g}, {p_hi:.4g}]: they must overlap "
                "on a finite range (give a process whose times reach noise levels the base was trained on)"
            )
        target = process
        if (lo, hi) != (q_lo, q_hi):  # narrowed to the shared range, inside Q's own times
            target = copy.copy(process)
            if hi < q_hi:
                target.t_min = min(max(float(process.t_of_lam(hi)), process.t_min), process.t_max)
            if lo > q_lo:
                target.t_max = max(min(float(process.t_of_lam(lo)), process.t_max), target.t_min)
        super().__init__(base.net, target, base.prediction, self._base_net_time, base.shape)
        self.base = base
        self._at: dict[float, tuple[float, float]] = {}  # Q's time s -> (P's time t, alpha_P / alpha_Q)

    def base_time(self, s: float | Tensor) -> Tensor:
        """``P``'s time ``t`` of equal log-SNR to ``Q``'s time ``s`` (float64), kept in ``P``'s range
        (against rounding at its ends)."""
        p = self.base.process
        return p.t_of_lam(self.process.lam(s)).clamp(p.t_min, p.t_max)

    def _base_net_time(self, s: Tensor) -> Tensor:
        """The net's time input at ``Q``'s time ``s``: the base's time map at :meth:`base_time`."""
        return self.base.time_map(self.base_time(s))

    def _map(self, s: float | Tensor, x: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """``(t, alpha_P(t) / alpha_Q(s))``: floats for a scalar ``s`` (cached), else a ``(batch,)`` float64
        time tensor and per-sample ratios broadcasting against ``x``."""
        if isinstance(s, Tensor) and s.ndim > 0:
            s64 = s.to(F64)
            t = self.base_time(s64)
            ratio = self.base.process.alpha(t) / self.process.alpha(s64)
            return t, ratio.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

        def make() -> tuple[float, float]:
            t = self.base_time(float(s))
            return float(t), float(self.base.process.alpha(t) / self.process.alpha(float(s)))

        if len(self._at) > _CACHE_SIZE:  # bounded as Denoiser's own per-time caches
            self._at.clear()
        return kept(self._at, float(s), make)

    def __call__(self, x: Tensor, t: float | Tensor, /, **cond: Any) -> Prediction:
        """The prediction at ``x`` and ``Q``'s time ``t`` (a float, or one per row)."""
        check_call(type(self).__name__, x, t)
        return self.evaluate(x, t, x.dtype, **cond)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The base's prediction at ``(x_P, t_P)``, its nets in ``net_dtype``, as ``Q``'s at ``(x, t)``."""
        t_p, ratio = self._map(t, x)
        pred = self.base.evaluate(x * ratio, t_p, net_dtype, **cond)
        a, s, _, _ = self.coefficients(t, x)
        if pred.x0_given:
            return Prediction(x, a, s, x0=pred.x0)
        return Prediction(x, a, s, eps=pred.eps)

    @property
    def guidance_scale(self) -> float | None:
        """``base``'s."""
        return self.base.guidance_scale

    @property
    def guided(self) -> bool:  # type: ignore[override]
        """``base``'s: a reprocessed guided denoiser keeps the guided default solver."""
        return self.base.guided

    def describe_shape(self) -> str:
        """``base``'s (whose shape it has)."""
        return self.base.describe_shape()

    def inner_denoisers(self) -> tuple[Denoiser, ...]:
        """``(base,)``."""
        return (self.base,)

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy around ``base.take_rows(rows, n)``; itself where that is ``base``."""
        return take_wrapped_rows(self, rows, n)

    def __repr__(self) -> str:
        return f"Reprocessed({self.base!r}, process={self.process!r})"
