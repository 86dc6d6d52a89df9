r"""Calibrating a pretrained diffusion model, as a denoiser (Pang, Lu, Du, Lin & Yan 2023, "On Calibrating
Diffusion Probabilistic Models", NeurIPS 2023; code: thudzj/Calibrated-DPMs).

The data score ``grad log q_t(x_t)`` of the forward process is a martingale along the reverse process, and
its mean over ``q_t`` is zero at every ``t``; with ``eps = -sigma(t) grad log q_t`` the exact noise predictor
satisfies ``E_{q_t}[eps(x_t, t)] = E[eps] = 0``. A trained ``eps_theta`` need not, and the paper's
calibration subtracts its mean (Sec. 4, noise prediction):

    eta_t = E_{x0 ~ data, eps ~ N(0, I)} [eps_theta(alpha_t x0 + sigma_t eps, t)],
    eps_cal(x_t, t) = eps_theta(x_t, t) - eta_t,

which lowers the score-matching loss at every ``t`` by ``||eta_t||^2`` (the loss is a variance plus the
squared mean). For a data-prediction model the same correction reads ``x0_cal = x0_theta - E[x0_theta] +
E[x0]`` (the paper's data-prediction case), which is the same model: ``x0 = (x - sigma eps) / alpha`` gives

    x0_cal = x0_theta + (sigma_t / alpha_t) eta_t,

computed in that form from a held ``x0`` (an ``x0``, ``v`` or ``flow`` net, or the exact oracle).

:func:`calibrate` estimates ``eta_t`` once by Monte Carlo over data at given times (the authors compute it
at their sampler's time steps over the training set, as the plain mean of ``eps_theta``) and returns
:class:`Calibrated`, the wrapper holding the table. The noise ``z`` of each draw is known and ``E[z] = 0``
exactly, so it serves as a control variate: ``eta_hat = mean(eps_theta) - b mean(z)``, ``b`` the per-element
regression coefficient of ``eps_theta`` on ``z`` (the same target; its variance is the plain mean's times
``1 - corr(eps_theta, z)^2``). That matters where the net's ``eps`` is mostly ``z`` (high noise): the plain
mean's Monte Carlo error, about ``1 / sqrt(draws)`` there, is a miscalibration of its own that ``x0`` carries
as ``(sigma / alpha) eta`` (under zero terminal SNR, ``sigma / alpha = 3e4`` at the last training step:
calibrating the exact model moved its samples from a sliced-W2 of 0.046 to 0.84,
``tests/test_calibration.py``). Between the table's times ``eta`` is interpolated linearly in ``t``, and held
constant outside them. ``cost`` is the base's: no extra network evaluation when sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import integer
from ..denoiser import Denoiser, Prediction
from ..sampling import check_x_T
from .base import Guided, with_estimate

__all__ = ["Calibrated", "calibrate"]

F64 = torch.float64


class Calibrated(Guided):
    """A denoiser whose noise estimate has its data mean ``eta_t`` removed: ``eps - eta(t)`` (``x0`` moved by
    ``(sigma / alpha) eta(t)``), ``eta`` linear in ``t`` between the table's times.

    Args:
        den: the denoiser to calibrate.
        times: the table's process times (1-D, strictly increasing, in ``den``'s time range).
        mean_eps: ``eta`` at those times, ``(len(times), *sample_shape)``.
        stderr: optional Monte Carlo standard errors of ``mean_eps`` (same shape; set by :func:`calibrate`).
    """

    base_arg = "den"

    def __init__(self, den: Denoiser, times: Tensor, mean_eps: Tensor, stderr: Tensor | None = None) -> None:
        super().__init__(den)
        who = "Calibrated"
        times = table_times(who, den, torch.as_tensor(times).to("cpu", F64))
        shape = (len(times), *den.shape) if den.shape is not None else None
        if mean_eps.shape[:1] != times.shape or (shape is not None and tuple(mean_eps.shape) != shape):
            want = shape if shape is not None else f"({len(times)}, *sample_shape)"
            raise ValueError(f"{who}: mean_eps must have shape {want}, got {tuple(mean_eps.shape)}")
        if stderr is not None and stderr.shape != mean_eps.shape:
            raise ValueError(
                f"{who}: stderr must have mean_eps's shape {tuple(mean_eps.shape)}, got {tuple(stderr.shape)}"
            )
        self.times, self.mean_eps, self.stderr = times, mean_eps, stderr

    def eta(self, t: float | Tensor, x: Tensor) -> Tensor:
        """``eta(t)`` in ``x``'s dtype and device: ``mean_eps`` interpolated linearly in ``t`` (constant
        outside the table), one row per sample for per-sample times, else one broadcasting row."""
        table, times = self.mean_eps.to(F64), self.times
        if len(times) == 1:
            return table.to(x.device, x.dtype)
        ts = torch.as_tensor(t).to("cpu", F64).reshape(-1).clamp(float(times[0]), float(times[-1]))
        j = torch.searchsorted(times, ts, right=True).clamp(1, len(times) - 1)
        w = ((ts - times[j - 1]) / (times[j] - times[j - 1])).reshape(-1, *[1] * (table.ndim - 1))
        j, w = j.to(table.device), w.to(table.device)  # from the CPU times to the table's device
        out = (1 - w) * table[j - 1] + w * table[j]
        return out.to(x.device, x.dtype)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        eta = self.eta(t, x)
        if not pred.x0_given:
            return with_estimate(pred, eps=pred.eps - eta)
        return with_estimate(pred, x0=pred.x0 + (pred.sigma / pred.alpha) * eta)

    def __repr__(self) -> str:
        return f"Calibrated({self.base!r}, times={len(self.times)})"


def table_times(who: str, den: Denoiser, times: Tensor) -> Tensor:
    """``times`` (float64, CPU) if it is a non-empty 1-D strictly increasing sequence of finite times in
    ``den``'s time range, else a ``ValueError`` naming ``who``."""
    p = den.process
    if times.ndim != 1 or len(times) < 1 or not bool((times[1:] > times[:-1]).all() & times.isfinite().all()):
        raise ValueError(
            f"{who}: times must be a non-empty 1-D strictly increasing sequence, got {times.tolist()}"
        )
    if times[0] < p.t_min or times[-1] > p.t_max:
        raise ValueError(
            f"{who}: times must lie in den's time range [{p.t_min:g}, {p.t_max:g}], got {times.tolist()}"
        )
    return times


def calibrate(
    den: Denoiser,
    data: Tensor,
    times: Sequence[float] | Tensor,
    samples: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
    **cond: Any,
) -> Calibrated:
    """Estimate ``eta_t = E[eps_theta(alpha_t x0 + sigma_t z, t)]`` at each of ``times`` and return
    :class:`Calibrated` (``den`` with it removed). Per time and element the estimate is ``mean(eps) - b
    mean(z)`` with ``b = cov(eps, z) / var(z)`` over the draws (``z`` as a control variate, ``E[z] = 0``); its
    ``stderr`` holds the Monte Carlo standard errors (the regression's residual standard deviation over
    ``sqrt(draws)``, with ``draws - 2`` degrees of freedom).

    ``data``: clean data of den's sample shape. ``times``: distinct finite times in den's time range, in any
    order (checked before any network call). ``samples``: draws per time, ``x0`` picked uniformly from
    ``data`` with replacement; ``None`` (default): every row of ``data`` once. ``z`` is fresh per draw and
    time. Randomness from ``generator``, drawn batch by batch (the same seed and ``batch_size`` give the same
    table); ``batch_size`` rows per network call; ``cond`` goes to every call
    as it is, so it must not be per-sample (an int label is fine). Cost: ``len(times) * draws`` network
    evaluations of rows, without gradients.
    """
    who = "calibrate"
    check_x_T(den, data, who, name="data")
    n = len(data) if samples is None else integer(who, "samples", samples, lo=3)
    if n < 3:
        raise ValueError(f"{who}: data must have at least 3 rows (for a standard error), got {len(data)}")
    batch_size = integer(who, "batch_size", batch_size, lo=1)
    ts = table_times(who, den, torch.as_tensor(times, dtype=F64).cpu().reshape(-1).sort().values)
    p, means, errs = den.process, [], []
    with torch.no_grad():
        for t in ts.tolist():
            a, s = float(p.alpha(t)), float(p.sigma(t))
            sums = torch.zeros(5, *data.shape[1:], dtype=F64, device=data.device)  # eps, z, eps^2, eps z, z^2
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                if samples is None:
                    x0 = data[start : start + m]
                else:
                    x0 = data[torch.randint(len(data), (m,), generator=generator).to(data.device)]
                z = torch.randn(x0.shape, generator=generator, dtype=data.dtype).to(data.device)
                eps = den(a * x0 + s * z, t, **cond).eps.to(F64)
                z = z.to(F64)
                sums += torch.stack([eps, z, eps * eps, eps * z, z * z], 1).sum(0)
            mean_eps, mean_z = sums[0] / n, sums[1] / n
            var_eps = (sums[2] / n - mean_eps * mean_eps).clamp(min=0)
            cov = sums[3] / n - mean_eps * mean_z
            var_z = sums[4] / n - mean_z * mean_z
            b = cov / var_z  # the regression coefficient of eps on z, per element
            means.append(mean_eps - b * mean_z)
            errs.append(((var_eps - b * cov).clamp(min=0) / (n - 2)).sqrt())
    return Calibrated(den, ts, torch.stack(means).to(data.dtype), torch.stack(errs).to(data.dtype))
