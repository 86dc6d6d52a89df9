r"""Time grids: the nodes ``t_0 > t_1 > ... > t_{n-1}`` at which a solver evaluates the net.

A schedule is an object, ``schedule(process, n) -> Tensor`` of ``n`` float64 process times from
the process's noise end ``t_max`` to its clean end ``t_min``, both included except where a spacing
by definition does not: ``leading`` starts below ``t_max`` (at ``(n - 1) (T // n) + steps_offset``),
``trailing`` (below ``2/3`` of the training steps: ``round(N_train / n) - 1 > 0``), ``ays`` and, below
15 nodes, ``karras_jump`` and ``karras_capped`` end above ``t_min``. :func:`steerdiff.sample` with
``steps=N`` asks for ``N`` nodes and appends the clean state ``sigma = 0``: the last step returns
the denoised estimate at ``t_min``, as k-diffusion (``sigmas`` ending in 0) and diffusers'
Euler/DDIM schedulers do. ``N`` steps of a first-order solver cost ``N`` network calls.

Every schedule is also reachable by name (``schedule="karras"``); :func:`available` lists them.

* ``time_uniform`` -- uniform in process time (DDPM/DDIM, Song et al. 2021).
* ``logsnr_uniform`` -- uniform in ``lam = log(alpha/sigma)`` (Lu et al. 2022, DPM-Solver).
  ``exponential`` is the same grid under k-diffusion's name (uniform in ``log(sigma/alpha)``).
* ``karras`` -- ``s_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho`` in
  ``s = sigma/alpha`` (Karras et al. 2022, Eq. 5).
* ``karras_jump`` -- below 15 nodes, the first ``n`` points of the ``n + 1``-point Karras grid:
  the jump to the clean state replaces the node at ``s_min`` (as in the AYS lists).
* ``ays`` -- Align Your Steps (Sabour et al. 2024): the published 10-step lists, log-linearly
  interpolated to other step counts.
* ``linspace`` / ``leading`` / ``trailing`` -- the integer timestep spacings of diffusers' DDIM/DDPM
  schedulers (Lin et al. 2024, Table 2), for the processes of a model trained on integer steps:
  ``VP.discrete`` and ``MeanReverting.discrete`` (whose trained steps start at 1 where step 0 is the
  clean image: the spacing is shifted up by one, see :class:`Linspace`). diffusers' multistep schedulers
  (DPM-Solver, UniPC) share ``trailing`` only: their ``linspace`` and ``leading`` space ``n + 1``
  points and drop the last (10 steps: 999, 899, ..., 100 and 901, 811, ..., 91 with ``steps_offset=1``).
* ``lcm`` -- the timesteps a consistency-distilled net was distilled at (LCM, Luo et al. 2023; TCD,
  Hyper-SD), ``n`` of them evenly spaced by index, as diffusers' LCM/TCD schedulers take them, for
  ``VP.discrete``.
* :class:`Custom` -- an explicit grid.

A schedule fitted to a model is an object only, made with the model: :class:`GITS` (Chen et al. 2024,
:mod:`steerdiff.gits`), a grid picked by dynamic programming along a teacher trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._checks import boolean, caller, integer, real, real_array
from .processes import MeanRevertingDiscrete, Process, VPDiscrete

__all__ = [
    "AYS",
    "GITS",
    "LCM",
    "Custom",
    "Karras",
    "KarrasCapped",
    "KarrasJump",
    "Leading",
    "Linspace",
    "LogSNRUniform",
    "Schedule",
    "ScheduleLike",
    "TimeUniform",
    "Trailing",
    "available",
    "get",
]

F64 = torch.float64


def _s(process: Process, t: float) -> float:
    """``sigma/alpha`` of ``process`` at time ``t``, as a float."""
    return float(process.sigma_ratio(t))


class Schedule:
    """Base class. Subclasses implement :meth:`nodes`; ``__call__`` validates the result.

    :attr:`final` is the ``final=`` of the runs whose grids the schedule makes: ``None`` (a rule of spacing)
    for either; a fitted schedule (:class:`GITS`) fits its nodes to one end, ``"zero"`` (``n`` nodes, then
    the clean state) or ``"none"`` (``n`` nodes, the last the end), and
    :func:`~steerdiff.solvers.base.make_grid` refuses it for a run with the other."""

    name: str = ""
    final: str | None = None

    def nodes(self, process: Process, n: int) -> Tensor:
        """``n`` process times, decreasing from the noisy end, within ``process``'s range (a tensor or
        a sequence of numbers)."""
        raise NotImplementedError

    def most_nodes(self, process: Process) -> int | None:
        """The largest number of nodes this schedule gives ``process`` (``None``: no limit of its own)."""
        return None

    def __call__(self, process: Process, n: int) -> Tensor:
        n = integer(type(self).__name__, "steps", n, lo=1)
        if not isinstance(process, Process):
            raise ValueError(
                f"{type(self).__name__}: process must be a steerdiff Process, got {type(process).__name__}"
            )
        t = real_array(f"schedule {self!r}", "nodes", self.nodes(process, n))
        if t.ndim != 1 or t.numel() != n:
            raise ValueError(f"schedule {self!r} returned {t.numel()} nodes, {n} were asked")
        if not bool((t[1:] < t[:-1]).all()):
            k = int((t[1:] >= t[:-1]).nonzero()[0])
            most = self.most_nodes(process)
            why = "too many steps for this spacing?"
            if most is not None:
                why = f"too many: this spacing gives {process!r} at most {most} distinct nodes"
            raise ValueError(
                f"schedule {self!r} gave non-decreasing times for {n} nodes ({why}): t[{k}] = "
                f"{float(t[k]):.6g}, t[{k + 1}] = {float(t[k + 1]):.6g}"
            )
        lo, hi = process.t_min, process.t_max
        slack = 1e-6 * max(1.0, hi - lo)  # float32 times: RectifiedFlow's 0.999 is 0.99900001
        first, last = float(t[0]), float(t[-1])
        if first > hi + slack or last < lo - slack:
            hint = "; a k-diffusion sigmas list ends in 0: pass sigmas[:-1]" if last == 0 < lo else ""
            raise ValueError(
                f"schedule {self!r}: times must lie in the process range [{lo:g}, {hi:g}], got "
                f"{first:.9g} .. {last:.9g}{hint}"
            )
        return t.clamp(lo, hi)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TimeUniform(Schedule):
    """Uniform in process time from ``t_max`` to ``t_min``."""

    name = "time_uniform"

    def nodes(self, process: Process, n: int) -> Tensor:
        return torch.linspace(process.t_max, process.t_min, n, dtype=F64)


class LogSNRUniform(Schedule):
    """Uniform in half log-SNR ``lam`` between ``lam(t_max)`` and ``lam(t_min)`` (DPM-Solver)."""

    name = "logsnr_uniform"

    def nodes(self, process: Process, n: int) -> Tensor:
        lo, hi = process.lam(process.t_max), process.lam(process.t_min)
        t = process.t_of_lam(torch.linspace(float(lo), float(hi), n, dtype=F64))
        t[0] = process.t_max
        if n > 1:
            t[-1] = process.t_min
        return t


def _positive(who: str, name: str, value: float | None) -> float | None:
    """``None``, or ``value`` as a finite float > 0; the message for ``sigma_min = 0`` says why not."""
    if value is None:
        return None
    try:
        return real(who, name, value, lo=0, lo_open=True)
    except ValueError as err:
        if name == "sigma_min" and isinstance(value, int | float) and value == 0:  # a tensor's == is no bool
            raise ValueError(
                f"{err} (a node at sigma/alpha = 0 has an infinite log-SNR; the step to the clean state is "
                "sample's final='zero')"
            ) from None
        raise


# Karras: a given sigma_min / sigma_max this close outside the process's range is taken as its end (a
# value typed to a few digits: DDPM's s_min is 0.0100005); further out, clamped times would repeat nodes
RANGE_RTOL = 1e-3


class Karras(Schedule):
    """Karras et al. 2022 (EDM), Eq. 5, in ``s = sigma/alpha``; ``rho = 7`` by default.

    ``sigma_min``/``sigma_max`` default to the process's range (in ``sigma/alpha`` units). Accepted:
    ``rho`` finite > 0, ``sigma_min`` and ``sigma_max`` finite > 0 or ``None``, with
    ``sigma_max > sigma_min`` (checked against the process's range where one is ``None``), each given
    one inside the process's range ``[s_min, s_max]`` (to a relative ``RANGE_RTOL = 1e-3``, within which
    the times are clamped to the range; beyond it the clamped times would repeat nodes).
    ``sigma_min = 0``, Eq. 5's ramp to 0, is refused: a node at ``s = 0`` has an infinite log-SNR,
    which no process time has (the step to the clean state ``s = 0`` is
    :func:`steerdiff.sample`'s ``final="zero"``).
    """

    name = "karras"

    def __init__(self, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None):
        who = type(self).__name__
        self.rho = real(who, "rho", rho, lo=0, lo_open=True)
        self.sigma_min = _positive(who, "sigma_min", sigma_min)
        self.sigma_max = _positive(who, "sigma_max", sigma_max)
        if self.sigma_min is not None and self.sigma_max is not None and not self.sigma_max > self.sigma_min:
            raise ValueError(
                f"{who}: need sigma_max > sigma_min, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}"
            )

    def ramp_top(self, process: Process, smin: float) -> float:
        """Where the ramp starts: ``sigma_max``, or the process's ``s_max`` when that is ``None``."""
        return _s(process, process.t_max) if self.sigma_max is None else self.sigma_max

    def ramp_bottom(self, process: Process) -> float:
        """Where the ramp ends: ``sigma_min``, or the process's ``s_min`` when that is ``None``."""
        return _s(process, process.t_min) if self.sigma_min is None else self.sigma_min

    def nodes(self, process: Process, n: int) -> Tensor:
        return self.ramp(process, n, self.ramp_bottom(process))

    def ramp(self, process: Process, n: int, smin: float) -> Tensor:
        """Eq. 5's ``n`` points from :meth:`ramp_top` down to ``smin``."""
        smax = self.ramp_top(process, smin)
        if not smax > smin:
            raise ValueError(
                f"{type(self).__name__}: need sigma_max > sigma_min, got sigma_min={smin:.6g}, "
                f"sigma_max={smax:.6g} (a None is the range of {process!r} in sigma/alpha)"
            )
        self._check_range(process)
        ramp = torch.linspace(0, 1, n, dtype=F64)
        a, b = smax ** (1 / self.rho), smin ** (1 / self.rho)
        t = process.t_of_sigma_ratio((a + ramp * (b - a)) ** self.rho)
        t = t.clamp(process.t_min, process.t_max)
        if self.sigma_max is None:
            t[0] = process.t_max
        if self.sigma_min is None and n > 1 and smin == _s(process, process.t_min):
            t[-1] = process.t_min
        return t

    def _check_range(self, process: Process) -> None:
        """``ValueError`` naming ``sigma_min`` / ``sigma_max`` where a given one lies outside the
        process's range in ``sigma/alpha`` (beyond a relative ``RANGE_RTOL``)."""
        lo, hi = _s(process, process.t_min), _s(process, process.t_max)
        for name, v in (("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)):
            if v is not None and not lo * (1 - RANGE_RTOL) <= v <= hi * (1 + RANGE_RTOL):
                raise ValueError(
                    f"{type(self).__name__}: {name}={v:g} is outside the range of {process!r} in "
                    f"sigma/alpha, [{lo:.6g}, {hi:.6g}]; give one inside it or None (the range's end)"
                )

    def __repr__(self) -> str:
        return f"Karras(rho={self.rho:g}{self._given()})"

    def _given(self) -> str:
        """``, sigma_min=..., sigma_max=...`` for those given (the repr's options beside ``rho``)."""
        return "".join(
            f", {k}={v:g}"
            for k, v in (("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max))
            if v is not None
        )


TOP_EVERY = 50  # KarrasJump with sigma_top: one more step into the ramp per this many steps


class KarrasJump(Karras):
    r"""Karras nodes whose last point, ``s_min``, gives way to the final jump to ``sigma = 0``; with
    ``sigma_top``, also a jump from the pure-noise start into a ramp that begins at ``sigma_top``.

    *Top* (``sigma_top``: ``None`` here, 30 in :class:`KarrasCapped`, the sampler's default). Where
    the process's ``s_max`` exceeds ``sigma_top`` (``sigma_max`` not given) the ramp runs from
    ``sigma_top`` and ``1 + n // TOP_EVERY`` steps, log-uniform in ``s``, lead into it from ``t_max``
    (the ramp's own first point, ``sigma_top``, is no node). Eq. 5 from a large ``s_max`` spends its nodes
    where an unguided flow of unit-scale data is still nearly linear: zero terminal SNR
    (``rescale_zero_snr``, ``s_max`` = 4.1e3 / 3.1e4 from Stable Diffusion's / DDPM's betas) puts 7 / 8
    of 10 nodes above ``s = 30``, rectified flow (``s_max`` = 999) 5. With ``sigma_top=30`` the default
    solver's relative RMSE on a 16-d mixture (``tests/test_schedule_karras_jump.py``) goes from 0.52 to
    0.11 at 10 steps and from 0.53 to 9.2e-3 at 20 (zero-SNR DDPM betas), from 0.39 to 0.24 and from
    0.24 to 0.014 (rectified flow). One step would leave an error floor, ``O(sigma_data^2 /
    sigma_top^2)``; split as ``n`` grows, the top steps leave none. :mod:`steerdiff.smc` keeps
    ``karras_jump`` without a top: the Feynman-Kac correctors' weights degrade under a long step at
    high noise.

    *Bottom.* For ``n < max_nodes`` nodes: the first ``n`` points of the ``n + 1``-point ramp,
    ``s_i = (s_top^(1/rho) + i/n (s_min^(1/rho) - s_top^(1/rho)))^rho``, ``i = 0..n-1``; for
    ``n >= max_nodes`` the whole ramp, as :class:`Karras`. With :func:`steerdiff.sample`'s clean end
    the last step returns the denoised estimate at ``s_{n-1} > s_min`` instead of spending an
    evaluation at ``s_min``, the convention of the Align-Your-Steps lists (Sabour et al. 2024) and of
    diffusers' multistep ``linspace`` spacing: with few steps the nodes move to higher noise, where
    the trajectory chooses its mixture component. The price is a bias of order ``s_{n-1} - s_min``
    (the result is the denoised estimate at ``s_{n-1}``, not at ``s_min``), which dominates the
    solver error from about 15 steps on; hence ``max_nodes = 15`` (diffusers' threshold for
    ``lower_order_final``). Meant for ``final="zero"``.

    *Floor* (``sigma_floor``: ``None`` here, 0.03 in :class:`KarrasCapped`). Below ``max_nodes``
    nodes, where the result is already a denoised estimate at ``s_{n-1} > s_min``, the ramp ends at
    ``max(s_min, sigma_floor)`` instead of ``s_min`` (``sigma_min`` not given): Eq. 5 crowds its last
    nodes near ``s_min``, and from a process that goes down to ``s = 1e-3`` (rectified flow; EDM
    2e-3, DDPM's betas 1e-2) the few nodes of a short run are better spent above 0.03, about
    Stable Diffusion's own ``s_min`` (0.029). From ``max_nodes`` nodes on the ramp runs to ``s_min``,
    so the floor leaves no bias in the limit.
    """

    name = "karras_jump"

    def __init__(
        self,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        max_nodes: int = 15,
        sigma_top: float | None = None,
        sigma_floor: float | None = None,
    ) -> None:
        super().__init__(rho, sigma_min, sigma_max)
        self.max_nodes = integer(type(self).__name__, "max_nodes", max_nodes, lo=1)
        self.sigma_top = _positive(type(self).__name__, "sigma_top", sigma_top)
        self.sigma_floor = _positive(type(self).__name__, "sigma_floor", sigma_floor)

    def ramp_top(self, process: Process, smin: float) -> float:
        """``sigma_max``, or the process's ``s_max`` at most ``sigma_top`` (where that is above ``s_min``)."""
        smax = super().ramp_top(process, smin)
        if self.sigma_max is not None or self.sigma_top is None or self.sigma_top <= smin:
            return smax
        return min(smax, self.sigma_top)

    def top_steps(self, process: Process, n: int) -> int:
        """Steps from ``t_max`` into the ramp: ``1 + n // TOP_EVERY`` where the top applies
        (``s_min < sigma_top < s_max``, ``sigma_max`` not given), else 1."""
        if self.sigma_max is not None or self.sigma_top is None:
            return 1
        return (
            1 + n // TOP_EVERY
            if self.ramp_bottom(process) < self.sigma_top < _s(process, process.t_max)
            else 1
        )

    def jump_bottom(self, process: Process) -> float:
        """The ramp's end below ``max_nodes`` nodes: ``s_min``, raised to ``sigma_floor`` where that is
        higher and below the ramp's top (``sigma_min`` not given)."""
        smin = self.ramp_bottom(process)
        if self.sigma_floor is None or self.sigma_min is not None or self.sigma_floor <= smin:
            return smin
        return self.sigma_floor if self.sigma_floor < self.ramp_top(process, smin) else smin

    def nodes(self, process: Process, n: int) -> Tensor:
        m = self.top_steps(process, n)
        k = n - m + 1  # ramp nodes, the first of them t_max
        if k >= self.max_nodes:
            ramp = self.ramp(process, k, self.ramp_bottom(process))
        else:
            ramp = self.ramp(process, k + 1, self.jump_bottom(process))[:k]
        if m == 1:
            return ramp
        top, smax = self.sigma_top, _s(process, process.t_max)
        assert top is not None  # m > 1 only below a top
        between = torch.tensor([smax * (top / smax) ** (j / m) for j in range(1, m)], dtype=F64)
        return torch.cat([ramp[:1], process.t_of_sigma_ratio(between), ramp[1:]])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rho={self.rho:g}{self._given()}, max_nodes={self.max_nodes}, "
            f"sigma_top={self.sigma_top}, sigma_floor={self.sigma_floor})"
        )


class KarrasCapped(KarrasJump):
    """:class:`KarrasJump` with ``sigma_top=30`` and ``sigma_floor=0.03`` by default:
    :func:`steerdiff.sample`'s default schedule.

    Where the process's ``s_max`` is at most 30 (Stable Diffusion's betas: 14.6) it is
    ``karras_jump``; above (DDPM's betas 157, EDM 80, rectified flow 999, zero terminal SNR 3e4)
    the ramp starts at ``s = 30`` and ``1 + n // 50`` steps, log-uniform in ``s``, lead into it
    from ``t_max``. With the default solver on a 16-d mixture (``tests/test_schedule_karras_jump.py``)
    the relative RMSE against ``karras_jump``'s is 0.11 against 0.52 at 10 steps and 9.2e-3 against
    0.53 at 20 (zero SNR), 0.24 against 0.39 and 0.014 against 0.24 (rectified flow); at 800 steps
    5.0e-8 (rectified flow), where a single top step would stall at 1.2e-5.

    Below 15 nodes the ramp ends at ``s = 0.03`` where the process goes lower (Stable Diffusion's
    betas, ``s_min = 0.029``: the nodes move by at most 2.4% in ``s``). Default solver, 64-d
    benchmark mixture, 2 x 1024 samples, relative RMSE without / with the floor at 10 steps:
    rectified flow 0.149 / 0.071, EDM 0.135 / 0.071, DDPM's betas 0.086 / 0.073, zero terminal SNR
    0.086 / 0.077 (at 5 steps 0.36 / 0.18, 0.32 / 0.15, 0.22 / 0.17, 0.24 / 0.18); from 15 steps on
    the nodes are unchanged.
    """

    name = "karras_capped"

    def __init__(
        self,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        max_nodes: int = 15,
        sigma_top: float | None = 30.0,
        sigma_floor: float | None = 0.03,
    ) -> None:
        super().__init__(rho, sigma_min, sigma_max, max_nodes, sigma_top, sigma_floor)


# Published Align-Your-Steps 10-step lists (Sabour et al. 2024) for 1000-step VP models: ten
# timesteps, then the clean state; the sigma lists (in sigma/alpha) end at sigma_min.
AYS_TIMESTEPS = {
    "sd15": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
    "sdxl": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13],
}
AYS_SIGMAS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


class AYS(Schedule):
    """Align Your Steps (Sabour et al. 2024): published 10-step grids.

    For a 1000-step ``VP.discrete`` process the published timesteps are used (with ``t_min``
    closing the list); elsewhere the published ``sigma/alpha`` list, which the process's range
    must cover, with its first node moved up to ``t_max``: the grid starts where every other
    schedule does, so ``x_T`` is the noise of ``t_max`` (``sigma_max``-scaled for VE/EDM, standard
    normal for rectified flow); the list's own first node (sigma/alpha 14.6, Stable Diffusion's top)
    would take ``80 z`` for noise at 14.6.
    Other node counts ``n`` use the paper's log-linear interpolation (linear in ``log sigma``,
    i.e. in ``lam``, over a uniform index) of the 11-point list to ``n + 1`` points, the last
    (``t_min``) dropped: at ``n = 10`` that is the published list.
    """

    name = "ays"

    def __init__(self, model: str = "sd15") -> None:
        if not isinstance(model, str) or model not in AYS_TIMESTEPS:
            raise ValueError(f"AYS: unknown model={model!r}; accepted: {sorted(AYS_TIMESTEPS)}")
        self.model = model

    def nodes(self, process: Process, n: int) -> Tensor:
        if isinstance(process, VPDiscrete) and process.num_train_timesteps == 1000:
            base = torch.tensor(AYS_TIMESTEPS[self.model], dtype=F64)
            if n == 10:
                return base
            lam = process.lam(torch.cat([base, torch.zeros(1, dtype=F64)]))
        else:
            lo, hi = float(process.lam(process.t_max)), float(process.lam(process.t_min))
            lam = -torch.log(torch.tensor(AYS_SIGMAS[self.model], dtype=F64))
            if float(lam[0]) < lo - 1e-9 or float(lam[-1]) > hi + 1e-9:
                raise ValueError(
                    f"AYS({self.model!r}) spans sigma/alpha in [{AYS_SIGMAS[self.model][-1]}, "
                    f"{AYS_SIGMAS[self.model][0]}], outside the range of {process!r} "
                    f"([{_s(process, process.t_min):.4g}, {_s(process, process.t_max):.4g}]); use a schedule "
                    "spaced over the process's own range (karras, logsnr_uniform, time_uniform)"
                )
            lam[0] = lo
        xs = torch.linspace(0, 1, lam.numel(), dtype=F64)
        new = _interp(torch.linspace(0, 1, n + 1, dtype=F64), xs, lam)
        t = process.t_of_lam(new[:-1]).clamp(process.t_min, process.t_max)
        t[0] = process.t_max  # exactly, as the published lists start: t_of_lam(lam(t_max)) may be 1 ulp off
        return t

    def __repr__(self) -> str:
        return f"AYS(model={self.model!r})"


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (``numpy.interp``) for increasing ``xp``."""
    j = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    w = (x - xp[j - 1]) / (xp[j] - xp[j - 1])
    return fp[j - 1] + w * (fp[j] - fp[j - 1])


class _Discrete(Schedule):
    """Integer timesteps of a model trained on integer steps, spaced as in diffusers' DDIM/Euler schedulers.

    The trained steps are ``first, ..., first + N_train - 1`` (:meth:`_trained_steps`): ``0, ..., N - 1``
    for ``VP.discrete`` (``N_train = num_train_timesteps``), the same for ``MeanReverting.discrete`` where
    ``thetabar_0 > 0``, and ``1, ..., N - 1`` where ``thetabar_0 = 0`` (step 0 is the clean image, which
    the net never sees: IR-SDE trains and samples on ``1, ..., T``; ``MeanReverting.cosine(T)`` has
    ``N_train = T``). The spacing of diffusers' timesteps for ``N_train`` is shifted up by ``first``:
    diffusers' timestep ``i``, the ``(i + 1)``-th noise level, is step ``i + 1`` there.

    ``steps_offset``: an integer >= 0, as diffusers' config holds it (only ``leading`` adds it)."""

    def __init__(self, steps_offset: int = 0) -> None:
        self.steps_offset = integer(type(self).__name__, "steps_offset", steps_offset, lo=0)

    def _trained_steps(self, process: Process) -> tuple[int, int]:
        """``(first, N_train)`` of ``process``; a process without integer steps is a ``ValueError``."""
        if isinstance(process, VPDiscrete):
            return 0, process.num_train_timesteps
        if isinstance(process, MeanRevertingDiscrete):
            first = int(process.t_min)
            return first, int(process.t_max) - first + 1
        raise ValueError(
            f"schedule {self.name!r} needs a process of a model trained on integer steps (VP.discrete, "
            f"VP.scaled_linear, diffusers' VP configs; MeanReverting.discrete / .cosine), got {process!r}; "
            "for a continuous-time process use time_uniform, logsnr_uniform or karras"
        )

    def nodes(self, process: Process, n: int) -> Tensor:
        first, m = self._trained_steps(process)
        return first + self._spacing(m, n)

    def most_nodes(self, process: Process) -> int:
        """The largest ``n`` whose ``n`` timesteps are distinct trained steps (``N_train``, less
        ``steps_offset`` for ``leading``; 0 where none is): more nodes than trained steps repeat one."""
        _, m = self._trained_steps(process)
        for n in range(m, 0, -1):
            t = self._spacing(m, n)
            if bool((t[1:] < t[:-1]).all()) and float(t[-1]) >= 0 and float(t[0]) <= m - 1:
                return n
        return 0

    def _spacing(self, m: int, n: int) -> Tensor:
        """diffusers' ``n`` timesteps for ``m`` training steps (in ``0, ..., m - 1``), decreasing."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps_offset={self.steps_offset})"


class Linspace(_Discrete):
    """``round(linspace(N_train - 1, 0, n))``: ends at ``t = 0``; ``steps_offset`` is ignored.

    DDIM/DDPM/PNDM's ``linspace``. (Euler/Heun leave these times unrounded; DPM-Solver/UniPC/DEIS
    take the first ``n`` of ``n + 1`` points instead.) Computed as numpy's increasing ``linspace``,
    reversed, so that ties at ``.5`` round as in diffusers (``N_train = 999``, ``n = 29``: 749, where
    torch's decreasing ``linspace`` gave 748.4999...); one node is ``N_train - 1`` (diffusers: 0).
    Shifted by the first trained step (:class:`_Discrete`): ``MeanReverting.cosine(T)`` with
    ``n = T`` gives IR-SDE's own steps ``T, ..., 1``.
    """

    name = "linspace"

    def _spacing(self, m: int, n: int) -> Tensor:
        if n == 1:
            return torch.tensor([m - 1], dtype=F64)
        return torch.from_numpy(np.linspace(0, m - 1, n).round()[::-1].copy())


class Leading(_Discrete):
    """``k * (N_train // n) + steps_offset`` for ``k = n-1, ..., 0``: DDIM/DDPM/Euler's ``leading``
    (DPM-Solver/UniPC take the first ``n`` of ``n + 1`` points spaced ``N_train // (n + 1)`` instead),
    shifted by the first trained step (:class:`_Discrete`)."""

    name = "leading"

    def _spacing(self, m: int, n: int) -> Tensor:
        return torch.arange(n - 1, -1, -1, dtype=F64) * (m // n) + self.steps_offset


class Trailing(_Discrete):
    """``round(arange(N_train, 0, -N_train / n)) - 1``: starts at ``N_train - 1`` (the last trained step
    after the shift of :class:`_Discrete`).

    ``steps_offset`` is ignored, as in diffusers. The step is rounded as numpy's ``arange`` rounds
    it (``(N - N/n) - N``), so that ties at ``.5`` round exactly as in diffusers.
    """

    name = "trailing"

    def _spacing(self, m: int, n: int) -> Tensor:
        step = (m - m / n) - m
        return torch.tensor([round(m + k * step) - 1 for k in range(n)], dtype=F64)


class LCM(Schedule):
    r"""The timesteps of a consistency-distilled net (LCM, Luo et al. 2023, Sec. 4.3's skipping-step
    schedule; TCD, Zheng et al. 2024; Hyper-SD), as diffusers' ``LCMScheduler`` and ``TCDScheduler`` take
    them, for ``VP.discrete``.

    The net was distilled only at ``original_steps`` timesteps, ``k j - 1`` for ``j = 1, ...,
    original_steps`` with the skipping step ``k = N_train // original_steps`` (``N_train = 1000``,
    ``original_steps = 50``: 19, 39, ..., 999). ``strength`` (img2img, in ``(0, 1]``) keeps the lowest
    ``m = int(original_steps * strength)`` of them; the ``n`` nodes are those at the indices
    ``floor(i m / n)``, ``i = 0..n-1``, counted from the noisy end (4 steps: 999, 759, 499, 259). ``n``
    must be at most ``m``.

    ``clean_node=True``: the last of the ``n`` nodes is ``t_min`` (timestep 0) and the others are the
    ``n - 1``-step nodes: with ``final="none"`` the grid ``TCDScheduler`` runs (its last step goes to
    timestep 0 and returns the sample there); ``n >= 2``.
    """

    name = "lcm"

    def __init__(self, original_steps: int = 50, strength: float = 1.0, clean_node: bool = False) -> None:
        self.original_steps = integer("LCM", "original_steps", original_steps, lo=1)
        self.strength = real("LCM", "strength", strength, lo=0, hi=1, lo_open=True)
        self.clean_node = boolean("LCM", "clean_node", clean_node)

    def nodes(self, process: Process, n: int) -> Tensor:
        if not isinstance(process, VPDiscrete):
            raise ValueError(
                "schedule 'lcm' needs a VP.discrete process (integer timesteps: VP.discrete, "
                "VP.scaled_linear, diffusers' VP configs: the timesteps of a consistency-distilled VP net), "
                f"got {process!r}"
            )
        m = process.num_train_timesteps
        if self.original_steps > m:
            raise ValueError(
                f"{self!r}: original_steps must be at most the process's num_train_timesteps = {m} (the "
                f"skipping step k = {m} // original_steps), got {self.original_steps}"
            )
        if self.clean_node:
            if n < 2:
                raise ValueError(f"{self!r}: needs at least 2 nodes (final='none': steps >= 1), got {n}")
            return torch.cat([self._distilled(m, n - 1), torch.full((1,), process.t_min, dtype=F64)])
        return self._distilled(m, n)

    def _distilled(self, m: int, n: int) -> Tensor:
        """``n`` of the distillation timesteps, evenly spaced by index from the noisy end."""
        kept = int(self.original_steps * self.strength)  # as diffusers rounds it (50 * 0.3 = 15.000...02)
        if n > kept:
            fixes = [f"ask for at most {kept} (steps)"] if kept else []
            least = max(1, math.floor(n / self.strength))  # the original_steps that keep n, rounded as kept
            while int(least * self.strength) < n:
                least += 1
            if least <= m:
                fixes.append(f"raise original_steps (to {least} or above, at most num_train_timesteps = {m})")
            if n <= self.original_steps:  # strength is at most 1
                fixes.append(
                    f"raise strength (to {n} / original_steps = {n / self.original_steps:.4g} or above)"
                )
            raise ValueError(
                f"{self!r}: {n} nodes asked, more than the int(original_steps * strength) = {kept} "
                f"distillation timesteps they are taken from; {'' if kept else 'it keeps none: '}"
                + (", or ".join(fixes) or f"no lcm grid of a process of {m} timesteps has {n} nodes")
            )
        k = m // self.original_steps
        index = np.floor(np.linspace(0, kept, num=n, endpoint=False)).astype(np.int64)
        return torch.from_numpy((k * (kept - index) - 1).astype(np.float64))

    def __repr__(self) -> str:
        return (
            f"LCM(original_steps={self.original_steps}, strength={self.strength:g}, "
            f"clean_node={self.clean_node})"
        )


class Custom(Schedule):
    """An explicit grid: ``times``, a non-empty 1-d sequence of finite, strictly decreasing process
    times, checked here; that they lie in the process's range is checked when it is used.

    It fixes the step count: with :func:`steerdiff.sample`'s ``final="zero"`` (the default) ``steps``
    must be ``len(times)`` (the nodes, then the clean state), with ``final="none"`` ``len(times) - 1``
    (the steps between the nodes).
    """

    name = "custom"

    def __init__(self, times: Sequence[float] | Tensor | np.ndarray) -> None:
        self.grid = real_array("Custom", "times", times)
        if not bool(torch.isfinite(self.grid).all()):
            raise ValueError(f"Custom: times must be finite, got {self.grid.tolist()}")
        up = (self.grid[1:] >= self.grid[:-1]).nonzero()
        if up.numel():
            i = int(up[0])
            raise ValueError(
                f"Custom: times must be strictly decreasing, got times[{i}] = {float(self.grid[i]):g} <= "
                f"times[{i + 1}] = {float(self.grid[i + 1]):g}"
            )

    def nodes(self, process: Process, n: int) -> Tensor:
        m = self.grid.numel()
        if n != m:
            raise ValueError(
                f"Custom: steps must equal len(times) = {m} with final='zero' (the default), or "
                f"len(times) - 1 = {m - 1} with final='none'; the {m} times cannot give the {n} nodes asked "
                f"(steps={n} with final='zero', steps={n - 1} with final='none')"
            )
        return self.grid.clone()

    def __repr__(self) -> str:
        return f"Custom({self.grid.numel()} nodes)"


class Exponential(LogSNRUniform):
    """k-diffusion's ``exponential``: uniform in ``log(sigma/alpha) = -lam`` (= ``logsnr_uniform``)."""

    name = "exponential"


_REGISTRY: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (
        TimeUniform,
        LogSNRUniform,
        Exponential,
        Karras,
        KarrasJump,
        KarrasCapped,
        AYS,
        Linspace,
        Leading,
        Trailing,
        LCM,
    )
}


def available() -> list[str]:
    """Names accepted by ``schedule=``: the schedules that need no model (one fitted to a model, such as
    :class:`GITS`, is passed as the object)."""
    return sorted(_REGISTRY)


ScheduleLike = str | Schedule | Sequence[float] | Tensor | np.ndarray
"""What ``schedule=`` takes: a name, a :class:`Schedule`, or the process times of the nodes (a
:class:`Custom` grid; with ``final="zero"`` ``steps`` is their number)."""


def _times_like(value: object) -> bool:
    """Whether ``value`` is a list, tuple, tensor or array (anything with ``__array__``): the process times
    of a :class:`Custom` grid. A function, not an ``isinstance`` in :func:`get`: mypy would narrow that
    from ``ScheduleLike``, giving back the ``str`` already handled."""
    return isinstance(value, Sequence) or hasattr(value, "__array__")


def get(schedule: ScheduleLike, who: str | None = None) -> Schedule:
    """Resolve a name (see :func:`available`), pass a :class:`Schedule` through, or make a list,
    array or tensor of process times a :class:`Custom` grid; anything else is a ``ValueError`` naming
    ``schedule`` and the accepted values (after ``who:``, the caller, where given)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        if schedule in _REGISTRY:
            return _REGISTRY[schedule]()
    elif _times_like(schedule):
        try:
            return Custom(schedule)
        except ValueError as err:  # Custom names its argument times; here it is the caller's schedule
            raise ValueError(f"{caller(who)}schedule: {err}") from None
    prefix = caller(who)
    raise ValueError(
        f"{prefix}unknown schedule={schedule!r}; accepted: {available()}, a Schedule object or a list of "
        "process times"
    )


# last: GITS is a Schedule (defined above), fitted by running a solver, whose modules import this one
from .gits import GITS  # noqa: E402
