r"""Time grids: the nodes ``t_0 > t_1 > ... > t_{n-1}`` at which a solver evaluates the net.

A schedule is an object, ``schedule(process, n) -> Tensor`` of ``n`` float64 process times from
the process's noise end ``t_max`` to its clean end ``t_min``, both included except where a spacing
by definition does not: ``leading`` starts below ``t_max`` (at ``(n - 1) (T // n) + steps_offset``),
``trailing`` (below ``2/3`` of the training steps: ``round(N_train / n) - 1 > 0``), ``ays`` and, below
15 nodes, ``karras_jump`` and ``karras_capped`` end above ``t_min``, and ``vp`` and ``laplace``, whose
noise levels are their own, start below ``t_max`` or end above ``t_min`` where those lie inside the range.
:func:`steerdiff.sample` with ``steps=N`` asks for ``N`` nodes and appends the clean state ``sigma = 0``:
the last step returns the denoised estimate at ``t_min``, as k-diffusion (``sigmas`` ending in 0) and
diffusers' Euler/DDIM schedulers do. ``N`` steps of a first-order solver cost ``N`` network calls.

Every schedule is also reachable by name (``schedule="karras"``); :func:`available` lists them.

* ``time_uniform`` -- uniform in process time (DDPM/DDIM, Song et al. 2021).
* ``logsnr_uniform`` -- uniform in ``lam = log(alpha/sigma)`` (Lu et al. 2022, DPM-Solver).
  ``exponential`` is the same grid under k-diffusion's name (uniform in ``log(sigma/alpha)``).
* ``karras`` -- ``s_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho`` in
  ``s = sigma/alpha`` (Karras et al. 2022, Eq. 5).
* ``polyexponential`` -- k-diffusion's ramp in ``log s`` raised to ``rho`` (``rho = 1``: ``exponential``).
* ``vp`` -- k-diffusion's ``get_sigmas_vp``: the linear-beta VP SDE's ``s`` at uniform times (on
  ``VP.linear`` of the same betas, ``time_uniform``).
* ``laplace`` -- Hang et al. 2024: Laplace quantiles in ``log s``, clamped to the range (k-diffusion's).
* ``kl_optimal`` -- uniform in ``arctan s`` (ComfyUI's; attributed to Sabour et al. 2024's
  Gaussian-data analysis).
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
:mod:`steerdiff.gits`), a grid picked by dynamic programming along a teacher trajectory. So are two rules
kept out of the registry-wide sweeps:

* :class:`FlowShift` -- the timestep shift of flow-matching models (SD3's ``shift=3``, Flux's ``mu`` from
  :func:`calculate_shift`, Wan's ``flow_shift``, LTX-Video's ``shift_terminal``) on a grid uniform in flow
  time ``sigma / (alpha + sigma)`` (:func:`flow_time`), as diffusers' flow schedulers and pipelines space it.
* :class:`Beta` -- nodes at Beta(0.6, 0.6) quantiles in diffusers' sigma (``use_beta_sigmas``; Lee et al.
  2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.special import betaincinv
from torch import Tensor

from ._checks import boolean, caller, choice, integer, ordered, real, real_array
from .processes import MeanRevertingDiscrete, Process, RectifiedFlow, VPDiscrete

__all__ = [
    "AYS",
    "GITS",
    "LCM",
    "Beta",
    "Custom",
    "FlowShift",
    "KLOptimal",
    "Karras",
    "KarrasCapped",
    "KarrasJump",
    "Laplace",
    "Leading",
    "Linspace",
    "LogSNRUniform",
    "PolyExponential",
    "Schedule",
    "ScheduleLike",
    "SigmaRange",
    "TimeUniform",
    "Trailing",
    "VPUniform",
    "available",
    "calculate_shift",
    "flow_time",
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


class SigmaRange(Schedule):
    """Base of the schedules spaced in ``s = sigma/alpha`` (k-diffusion's sigma) between ``sigma_max`` and
    ``sigma_min``, each the process's own end where ``None``, the nodes mapped to process time by the
    process's inverse (:meth:`~steerdiff.processes.Process.t_of_sigma_ratio`).

    Accepted: ``sigma_min`` and ``sigma_max`` finite > 0 or ``None``, with ``sigma_max > sigma_min``
    (checked against the process's range where one is ``None``), each given one inside the process's range
    ``[s_min, s_max]`` (to a relative ``RANGE_RTOL = 1e-3``, within which the times are clamped to the
    range; beyond it the clamped times would repeat nodes). ``sigma_min = 0`` is refused: a node at
    ``s = 0`` has an infinite log-SNR, which no process time has (the step to the clean state ``s = 0`` is
    :func:`steerdiff.sample`'s ``final="zero"``).
    """

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None) -> None:
        who = type(self).__name__
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

    def span(self, process: Process, smin: float) -> float:
        """:meth:`ramp_top` for a ramp down to ``smin``, both checked: above ``smin``, and the given
        ``sigma_min`` / ``sigma_max`` inside the process's range (a ``ValueError`` naming them)."""
        smax = self.ramp_top(process, smin)
        if not smax > smin:
            raise ValueError(
                f"{type(self).__name__}: need sigma_max > sigma_min, got sigma_min={smin:.6g}, "
                f"sigma_max={smax:.6g} (a None is the range of {process!r} in sigma/alpha)"
            )
        self._check_range(process)
        return smax

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

    def _given(self) -> str:
        """``, sigma_min=..., sigma_max=...`` for those given (the repr's options)."""
        return "".join(
            f", {k}={v:g}"
            for k, v in (("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max))
            if v is not None
        )


def _times(process: Process, s: Tensor) -> Tensor:
    """The process times of the decreasing nodes ``s`` (in ``sigma/alpha``), clamped to the process's range;
    a first or last node at the range's end in ``s`` (to a relative 1e-12: ``tan(atan(s))``,
    ``exp(log(s))``) is that end exactly, whatever produced it (a given ``sigma_min`` / ``sigma_max`` equal to
    the end too). (Interior nodes are not moved: ``polyexponential`` with a large ``rho`` puts them within
    1e-12 of ``s_min``.) :meth:`Karras.ramp` sets its ends by construction instead, a rule this one cannot
    replace without moving nodes (docs/schedules.md, "Where a node is exactly t_max or t_min")."""
    lo, hi = _s(process, process.t_min), _s(process, process.t_max)
    t = process.t_of_sigma_ratio(s).clamp(process.t_min, process.t_max)
    if abs(float(s[0]) - hi) <= 1e-12 * hi:
        t[0] = process.t_max
    if abs(float(s[-1]) - lo) <= 1e-12 * lo:
        t[-1] = process.t_min
    return t


class Karras(SigmaRange):
    """Karras et al. 2022 (EDM), Eq. 5, in ``s = sigma/alpha``; ``rho = 7`` by default.

    ``sigma_min``/``sigma_max`` default to the process's range (in ``sigma/alpha`` units), as
    :class:`SigmaRange` accepts them; ``rho`` finite > 0. ``sigma_min = 0``, Eq. 5's ramp to 0, is refused:
    a node at ``s = 0`` has an infinite log-SNR, which no process time has (the step to the clean state
    ``s = 0`` is :func:`steerdiff.sample`'s ``final="zero"``).
    """

    name = "karras"

    def __init__(self, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None):
        self.rho = real(type(self).__name__, "rho", rho, lo=0, lo_open=True)
        super().__init__(sigma_min, sigma_max)

    def nodes(self, process: Process, n: int) -> Tensor:
        return self.ramp(process, n, self.ramp_bottom(process))

    def ramp(self, process: Process, n: int, smin: float) -> Tensor:
        """Eq. 5's ``n`` points from :meth:`ramp_top` down to ``smin``, in process time.

        The ends by construction, not by proximity as :func:`_times`: the first node is ``t_max`` wherever
        ``sigma_max`` is not given (:class:`KarrasJump`'s ``sigma_top`` included: the ramp's first point
        gives way to ``t_max``), the last ``t_min`` wherever ``sigma_min`` is not given and ``smin`` is the
        process's ``s_min``; a given one maps by the process's inverse even where it equals the end
        (``EDM()``'s 80: 79.99999999999997). Proximity here would move nodes: Eq. 5 at ``rho = 1`` on a wide
        range (DDPM's betas at zero terminal SNR, ``s`` to 3.1e4) ends 2.7e-10 above ``t_min``, beyond its
        1e-12 (docs/schedules.md, "Where a node is exactly t_max or t_min")."""
        smax = self.span(process, smin)
        ramp = torch.linspace(0, 1, n, dtype=F64)
        a, b = smax ** (1 / self.rho), smin ** (1 / self.rho)
        t = process.t_of_sigma_ratio((a + ramp * (b - a)) ** self.rho)
        t = t.clamp(process.t_min, process.t_max)
        if self.sigma_max is None:
            t[0] = process.t_max
        if self.sigma_min is None and n > 1 and smin == _s(process, process.t_min):
            t[-1] = process.t_min
        return t

    def __repr__(self) -> str:
        return f"Karras(rho={self.rho:g}{self._given()})"


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

    It fixes the step count, which :func:`steerdiff.sample`'s ``steps=None`` (the default) takes: with
    ``final="zero"`` (the default) ``len(times)`` (the nodes, then the clean state), with ``final="none"``
    ``len(times) - 1`` (the steps between the nodes); a ``steps`` given must equal it
    (:func:`~steerdiff.solvers.base.count_steps`).
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


def flow_time(process: Process, t: float) -> float:
    """Flow time ``s = sigma / (alpha + sigma) = r / (1 + r)``, ``r = sigma/alpha``, of ``process`` at ``t``:
    the process time of the rectified flow with the same ``sigma/alpha`` (``t`` itself on
    :class:`~steerdiff.processes.RectifiedFlow`; diffusers' flow ``sigma``)."""
    if isinstance(process, RectifiedFlow):
        return float(t)
    a, s = float(process.alpha(t)), float(process.sigma(t))
    return s / (a + s)


def _t_of_flow(process: Process, s: Tensor) -> Tensor:
    """The process times at flow times ``s`` (in ``(0, 1)``): the inverse of :func:`flow_time`."""
    if isinstance(process, RectifiedFlow):
        return s.clone()
    return process.t_of_sigma_ratio(s / (1 - s))


def calculate_shift(
    image_seq_len: float,
    base_seq_len: float = 256,
    max_seq_len: float = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's ``mu`` for an image of ``image_seq_len`` latent tokens: linear in the token count through
    ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``: ``mu = m image_seq_len + base_shift -
    m base_seq_len`` with ``m = (max_shift - base_shift) / (max_seq_len - base_seq_len)``
    (black-forest-labs/flux ``get_lin_function``; diffusers' ``calculate_shift``, which the Flux, SD3,
    LTX-Video and Lumina 2 pipelines call with their scheduler config's ``base_image_seq_len``,
    ``max_image_seq_len``, ``base_shift``, ``max_shift``; Flux: a 1024 x 1024 image is
    ``(1024 / 16)^2 = 4096`` tokens, ``mu = 1.15``). For :class:`FlowShift`'s ``mu``."""
    who = "calculate_shift"
    n = real(who, "image_seq_len", image_seq_len)
    lo, hi = ordered(who, "base_seq_len", base_seq_len, "max_seq_len", max_seq_len)
    y0, y1 = real(who, "base_shift", base_shift), real(who, "max_shift", max_shift)
    m = (y1 - y0) / (hi - lo)
    return n * m + (y0 - m * lo)


FLOW_SPACINGS = ("flowmatch", "flux", "unipc")
TIME_SHIFT_TYPES = ("exponential", "linear")
MU_BOUND = 700.0  # e^mu finite in float64


class FlowShift(Schedule):
    r"""The timestep shift of flow-matching models (SD3, Flux, Wan, LTX-Video, HunyuanVideo): ``n`` points
    uniform in flow time, moved toward the noise end; on any process.

    Flow time is ``s = r / (1 + r)`` with ``r = sigma/alpha`` (:func:`flow_time`; ``s = t`` on
    :class:`~steerdiff.processes.RectifiedFlow`, diffusers' flow ``sigma``). The shift multiplies ``r``
    by ``m``::

        s' = m s / (1 + (m - 1) s)

    (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", ICML,
    arXiv:2403.03206, Sec. 5.3.2: ``m = sqrt(pixels / base pixels)`` keeps the SNR a larger image sees;
    SD3 samples with ``m = 3``). ``m = shift``; with ``mu`` (diffusers' ``use_dynamic_shifting``, Flux's
    ``time_shift(mu, 1, s) = e^mu / (e^mu + 1/s - 1)``, ``mu`` from the image size by
    :func:`calculate_shift`) ``m = e^mu`` (``time_shift_type="exponential"``) or ``m = mu`` (``"linear"``:
    ``mu / (mu + 1/s - 1)``, CogView4). ``shift_terminal`` (LTX-Video, HaCohen et al. 2024,
    arXiv:2501.00103; diffusers' ``stretch_shift_to_terminal``) then stretches ``1 - s'`` so that the last
    node is at ``shift_terminal``: ``s'' = 1 - (1 - s') (1 - shift_terminal) / (1 - s'_{n-1})``.

    The unshifted points ``u_k``, ``k = 0..n-1`` (``spacing``), are diffusers' for ``n`` steps (``n``
    network calls; :func:`steerdiff.sample` appends the clean end, FlowMatchEuler's trailing sigma 0):

    * ``"flowmatch"`` -- ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` (SD3, SD3.5):
      ``linspace(1, b, n)``, ``b`` that scheduler's ``sigma_min``: the process's smallest flow time
      ``s_lo`` (``1/1000`` on the default ``RectifiedFlow``), shifted once already with ``shift``
      (diffusers takes it from its shifted training sigmas, so the last node is shifted twice),
      unshifted with ``mu``.
    * ``"flux"`` -- ``linspace(1, 0, n + 1)[:n]``: Flux's own sampler (black-forest-labs/flux,
      ``get_schedule``) and the diffusers pipelines that pass these sigmas (Flux, LTX-Video, Lumina 2,
      HunyuanVideo); the last point, 0, is the clean end.
    * ``"unipc"`` -- ``linspace(1, s_lo, n + 1)[:n]``: ``UniPCMultistepScheduler`` with
      ``use_flow_sigmas`` (Wan: ``flow_shift`` 3 or 5; SkyReels).

    A node above the process's largest flow time (``s = 1`` is pure noise, which no process time has) is
    ``t_max``, one below its smallest ``t_min``; where two would be (a large shift, many steps) a
    ``ValueError`` says so. ``shift_terminal`` must lie in the process's range of flow times (to a relative
    ``RANGE_RTOL``). One node is ``t_max``. On ``RectifiedFlow`` the nodes are diffusers' sigmas with the
    first, 1, at ``t_max = 0.999``: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``'s and Wan's UniPC's to
    their float32 rounding (diffusers shifts in float64), the Flux and LTX-Video pipelines' to 1.4 and 4.8
    float32 ulps (diffusers shifts and stretches their float32 sigmas).

    An object, not a name: the shift is the model's (3 for SD3, 5 for Wan 720p, ``mu`` per resolution for
    Flux), which a name cannot carry, and unshifted (``shift=1``, FlowMatchEuler's default) it is on rectified
    flow ``time_uniform`` to within ``1e-3`` (a linspace from 1, its first node taken to 0.999, against one
    from 0.999).

    Accepted: ``shift`` finite > 0; ``mu`` ``None`` or finite, ``|mu| <= 700`` (> 0 with ``"linear"``),
    not with a ``shift`` other than 1; ``time_shift_type`` ``"exponential"`` or ``"linear"``, the latter
    with ``mu``; ``shift_terminal`` ``None`` or in ``(0, 1)``; ``spacing`` one of ``"flowmatch"``,
    ``"flux"``, ``"unipc"``.
    """

    name = "flow_shift"

    def __init__(
        self,
        shift: float = 1.0,
        mu: float | None = None,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        spacing: str = "flowmatch",
    ) -> None:
        who = "FlowShift"
        self.shift = real(who, "shift", shift, lo=0, lo_open=True)
        self.mu = None if mu is None else real(who, "mu", mu, lo=-MU_BOUND, hi=MU_BOUND)
        self.time_shift_type = choice(who, "time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
        self.shift_terminal = (
            None
            if shift_terminal is None
            else real(who, "shift_terminal", shift_terminal, lo=0, hi=1, lo_open=True, hi_open=True)
        )
        self.spacing = choice(who, "spacing", spacing, FLOW_SPACINGS)
        if self.mu is None and self.time_shift_type != "exponential":
            raise ValueError(
                f"{who}: time_shift_type={time_shift_type!r} shifts by mu, and mu is None: pass mu (e.g. "
                "calculate_shift(image_seq_len, ...)), or a fixed shift without time_shift_type"
            )
        if self.mu is not None and self.shift != 1.0:
            raise ValueError(
                f"{who}: pass shift (a fixed shift) or mu (dynamic shifting), not both; got shift={shift!r}, "
                f"mu={mu!r}"
            )
        if self.mu is not None and self.time_shift_type == "linear" and not self.mu > 0:
            raise ValueError(
                f"{who}: mu must be > 0 with time_shift_type='linear' (the factor of sigma/alpha), got {mu!r}"
            )

    @property
    def factor(self) -> float:
        """``m``, the factor of ``sigma/alpha``: ``shift``, ``e^mu`` or ``mu``."""
        if self.mu is None:
            return self.shift
        return math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu

    def shifted(self, u: Tensor) -> Tensor:
        """The shifted flow times of the decreasing unshifted ones ``u`` (in ``[0, 1]``), stretched to
        ``shift_terminal`` where given (a grid whose last point is 1 is not stretched): the nodes of
        diffusers' ``set_timesteps(sigmas=u, mu=mu)``."""
        m = self.factor
        s = m * u / (1 + (m - 1) * u)
        if self.shift_terminal is not None and float(s[-1]) < 1:
            s = 1 - (1 - s) * (1 - self.shift_terminal) / (1 - s[-1])
        return s

    def unshifted(self, process: Process, n: int) -> Tensor:
        """``spacing``'s ``n`` points ``u_k`` in flow time, before the shift."""
        lo = flow_time(process, process.t_min)
        if self.spacing == "flowmatch":
            end = lo if self.mu is not None else self.shift * lo / (1 + (self.shift - 1) * lo)
            u = np.linspace(1.0, end, n)
        else:
            u = np.linspace(1.0, 0.0 if self.spacing == "flux" else lo, n + 1)[:n]
        return torch.from_numpy(u)

    def nodes(self, process: Process, n: int) -> Tensor:
        lo, hi = flow_time(process, process.t_min), flow_time(process, process.t_max)
        if self.shift_terminal is not None and not lo * (1 - RANGE_RTOL) <= self.shift_terminal <= hi:
            raise ValueError(
                f"{self!r}: shift_terminal={self.shift_terminal:g} is outside the flow times of {process!r}, "
                f"[{lo:.6g}, {hi:.6g}] (flow time sigma / (alpha + sigma)); give one inside it or None"
            )
        if n == 1:
            return torch.full((1,), process.t_max, dtype=F64)
        s = self.shifted(self.unshifted(process, n))
        above, below = s >= hi, s <= lo
        for out, side, end, fix in (
            (above, "above the largest", "t_max", "a smaller shift or mu, fewer steps, or a process "
             "that reaches closer to pure noise (e.g. RectifiedFlow(t_max=0.9999))"),
            (below, "below the smallest", "t_min", "a larger shift or shift_terminal, fewer steps, or "
             "spacing='flowmatch' or 'unipc' (whose unshifted points end at the smallest)"),
        ):  # fmt: skip
            if int(out.sum()) > 1:
                raise ValueError(
                    f"{self!r}: {int(out.sum())} of the {n} nodes are at or {side} flow time of {process!r} "
                    f"(its range: [{lo:.6g}, {hi:.6g}]); one is taken to {end}, the next would repeat it: "
                    f"ask for {fix}"
                )
        t = _t_of_flow(process, s.clamp(lo, hi))
        t[above], t[below] = process.t_max, process.t_min
        return t

    def __repr__(self) -> str:
        how = (
            f"shift={self.shift:g}"
            if self.mu is None
            else f"mu={self.mu:g}, time_shift_type={self.time_shift_type!r}"
        )
        end = "" if self.shift_terminal is None else f", shift_terminal={self.shift_terminal:g}"
        return f"FlowShift({how}{end}, spacing={self.spacing!r})"


class Beta(Schedule):
    r"""Beta sampling (Lee et al. 2024, "Beta Sampling is All You Need: Efficient Image Generation Strategy
    for Diffusion Models using Stepwise Spectral Analysis", arXiv:2407.12173) as diffusers places it
    (``use_beta_sigmas``, ``_convert_to_beta``): nodes at quantiles of a ``Beta(alpha, beta)`` distribution
    between the ends of diffusers' sigma,

        sigma_i = sigma_min + F^{-1}(1 - i / (n - 1); alpha, beta) (sigma_max - sigma_min),   i = 0..n-1,

    ``F^{-1}`` the Beta quantile function (``scipy.special.betaincinv``), ``alpha = beta = 0.6`` by default
    (the paper's and diffusers'): with ``alpha, beta < 1`` the nodes crowd at both ends, where the paper's
    spectral analysis finds the image changing most (low frequencies early, high late). diffusers' sigma is
    the flow time ``sigma / (alpha + sigma)`` on :class:`~steerdiff.processes.RectifiedFlow`
    (FlowMatchEuler's), ``sigma/alpha`` on every other process (Euler's, DPM-Solver's, UniPC's);
    ``sigma_max`` / ``sigma_min`` are the process's range. (The paper, and ComfyUI's beta scheduler, place
    the quantiles in timestep, not in sigma.) The first node is ``t_max``, the last ``t_min``.

    An object, not a name, as :class:`FlowShift`: a name would join every registry-wide sweep (the solver
    benchmark, ``bench longstep``, the solvers' step-ratio invariant, which it breaks: uniform in
    ``sigma/alpha`` near the top, its first steps are short in log-SNR, and at 3-5 steps the second is more
    than 2.5 times the first under Stable Diffusion's betas or EDM, where the rule lowers its order).

    Accepted: ``alpha`` and ``beta`` finite > 0.
    """

    name = "beta"

    def __init__(self, alpha: float = 0.6, beta: float = 0.6) -> None:
        self.alpha = real("Beta", "alpha", alpha, lo=0, lo_open=True)
        self.beta = real("Beta", "beta", beta, lo=0, lo_open=True)

    def nodes(self, process: Process, n: int) -> Tensor:
        flow = isinstance(process, RectifiedFlow)
        lo, hi = (flow_time(process, t) if flow else _s(process, t) for t in (process.t_min, process.t_max))
        q = betaincinv(self.alpha, self.beta, 1 - np.linspace(0, 1, n))
        s = torch.from_numpy(lo + q * (hi - lo))
        t = _t_of_flow(process, s) if flow else process.t_of_sigma_ratio(s)
        t[0] = process.t_max
        if n > 1:
            t[-1] = process.t_min
        return t

    def __repr__(self) -> str:
        return f"Beta(alpha={self.alpha:g}, beta={self.beta:g})"


class PolyExponential(SigmaRange):
    """k-diffusion's ``get_sigmas_polyexponential``: a ramp in ``log s`` raised to ``rho``,

        s_i = exp(r_i^rho (log s_max - log s_min) + log s_min),   r_i = 1 - i / (n - 1),

    in ``s = sigma/alpha``; ``rho = 1`` is :class:`Exponential` (uniform in ``log s``), ``rho > 1`` puts
    more nodes at low noise: with ``(1 / (n - 1))^rho log(s_max / s_min)`` below float64's resolution (``rho =
    10``, 39 nodes) the last two coincide, a ``ValueError``. ``rho`` finite > 0; ``sigma_min`` / ``sigma_max``
    as :class:`SigmaRange`."""

    name = "polyexponential"

    def __init__(self, rho: float = 1.0, sigma_min: float | None = None, sigma_max: float | None = None):
        self.rho = real(type(self).__name__, "rho", rho, lo=0, lo_open=True)
        super().__init__(sigma_min, sigma_max)

    def nodes(self, process: Process, n: int) -> Tensor:
        smin = self.ramp_bottom(process)
        smax = self.span(process, smin)
        ramp = torch.linspace(1, 0, n, dtype=F64) ** self.rho
        return _times(process, torch.exp(ramp * (math.log(smax) - math.log(smin)) + math.log(smin)))

    def __repr__(self) -> str:
        return f"PolyExponential(rho={self.rho:g}{self._given()})"


class VPUniform(Schedule):
    """k-diffusion's ``get_sigmas_vp``: the ``sigma/alpha`` of the continuous linear-beta VP SDE (Song et
    al. 2021) at ``n`` uniform times ``u_i`` from 1 down to ``eps_s``,

        s_i = sqrt(exp(beta_d u_i^2 / 2 + beta_min u_i) - 1),

    mapped to the process's time. On ``VP.linear(beta_min, beta_min + beta_d, t_min=eps_s)`` it is
    :class:`TimeUniform`; on another process the nodes are that SDE's noise levels, which the process's
    range must cover (to ``RANGE_RTOL``; ``s`` from 0.0105 to 152 at the defaults): a ``ValueError`` says
    where it does not (EDM's default ``[0.002, 80]``, Stable Diffusion's ``[0.029, 14.6]``). The first
    node is ``t_max`` only where the process's ``s_max`` is the SDE's (rectified flow's 999: 152).

    Accepted: finite ``beta_d > 0``, ``beta_min >= 0``, ``0 < eps_s < 1``."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> None:
        who = type(self).__name__
        self.beta_d = real(who, "beta_d", beta_d, lo=0, lo_open=True)
        self.beta_min = real(who, "beta_min", beta_min, lo=0)
        self.eps_s = real(who, "eps_s", eps_s, lo=0, hi=1, lo_open=True, hi_open=True)

    def nodes(self, process: Process, n: int) -> Tensor:
        u = torch.linspace(1, self.eps_s, n, dtype=F64)
        s = torch.expm1(self.beta_d * u**2 / 2 + self.beta_min * u).sqrt()
        lo, hi = _s(process, process.t_min), _s(process, process.t_max)
        top, bottom = float(s[0]), float(s[-1])
        if not (lo * (1 - RANGE_RTOL) <= bottom and top <= hi * (1 + RANGE_RTOL)):
            raise ValueError(
                f"{self!r}: its sigma/alpha span [{bottom:.6g}, {top:.6g}], outside the range of "
                f"{process!r}, [{lo:.6g}, {hi:.6g}]; choose beta_d, beta_min and eps_s inside it, or a "
                "schedule spaced over the process's own range (karras, polyexponential, kl_optimal, "
                "time_uniform)"
            )
        return _times(process, s.clamp(lo, hi))

    def __repr__(self) -> str:
        return f"VPUniform(beta_d={self.beta_d:g}, beta_min={self.beta_min:g}, eps_s={self.eps_s:g})"


LAPLACE_EPS = 1e-5  # k-diffusion's epsilon inside the Laplace quantile's log ("avoid log(0)")


class Laplace(SigmaRange):
    """Hang et al. 2024, "Improved Noise Schedule for Diffusion Training" (arXiv 2407.03297): nodes at the
    quantiles of a Laplace distribution of ``log s`` with location ``mu`` and scale ``beta``, as
    ``get_sigmas_laplace`` of ComfyUI's k-diffusion computes them: for ``x_i = i / (n - 1)``,

        log s_i = mu - beta sgn(1/2 - x_i) log(1 - 2 |1/2 - x_i| + eps),   eps = 1e-5,

    the Laplace quantile at ``1 - x_i`` (its inverse CDF, ``mu - beta sgn(p - 1/2) log(1 - 2|p - 1/2|)``,
    with ``eps`` keeping the ends finite: ``log s = mu +- 11.5 beta`` there), then clamped to
    ``[s_min, s_max]``: ``sigma_min`` / ``sigma_max``, the process's range where ``None``
    (:class:`SigmaRange`). The nodes crowd around ``s = e^mu``. The first node is ``t_max`` where the clamp
    reaches it (``e^{mu + 11.5 beta} >= s_max``, 317 at the defaults), the last ``t_min`` likewise (0.0032);
    a clamp that would repeat a node (too many steps for ``beta``: more than one quantile beyond an end) is
    a ``ValueError`` saying so.

    Accepted: finite ``mu``, finite ``beta > 0``."""

    name = "laplace"

    def __init__(
        self,
        mu: float = 0.0,
        beta: float = 0.5,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        who = type(self).__name__
        self.mu = real(who, "mu", mu)
        self.beta = real(who, "beta", beta, lo=0, lo_open=True)
        super().__init__(sigma_min, sigma_max)

    def nodes(self, process: Process, n: int) -> Tensor:
        smin = self.ramp_bottom(process)
        smax = self.span(process, smin)
        x = torch.linspace(0, 1, n, dtype=F64)
        d = 0.5 - x
        log_s = self.mu - self.beta * torch.sign(d) * torch.log(1 - 2 * d.abs() + LAPLACE_EPS)
        s = log_s.exp()
        for name, beyond, end in (("sigma_max", s >= smax, smax), ("sigma_min", s <= smin, smin)):
            if int(beyond.sum()) > 1:
                raise ValueError(
                    f"{self!r}: {int(beyond.sum())} of {n} nodes lie beyond {name} = {end:.6g} (the range "
                    f"of {process!r} where None) and would repeat once clamped; take fewer steps, a smaller "
                    "beta or a wider range"
                )
        return _times(process, s.clamp(smin, smax))

    def __repr__(self) -> str:
        return f"Laplace(mu={self.mu:g}, beta={self.beta:g}{self._given()})"


class KLOptimal(SigmaRange):
    """ComfyUI's ``kl_optimal`` (AUTOMATIC1111's "KL Optimal", PR #15608): uniform in ``arctan s``,

        s_i = tan(u_i arctan(s_min) + (1 - u_i) arctan(s_max)),   u_i = i / (n - 1),

    in ``s = sigma/alpha``. Its authors attribute it to Sabour, Fidler & Kreis 2024, "Align Your Steps" (ICML;
    arXiv 2404.14507), Sec. 3: the schedule minimizing their KL-divergence upper bound for the stochastic DDIM
    sampler on isotropic Gaussian data ``N(0, c^2 I)``, uniform in ``arctan(s / c)``; ``kl_optimal`` takes
    ``c = 1``. ``sigma_min`` / ``sigma_max`` as :class:`SigmaRange`; one node is ``t_max``."""

    name = "kl_optimal"

    def nodes(self, process: Process, n: int) -> Tensor:
        smin = self.ramp_bottom(process)
        smax = self.span(process, smin)
        u = torch.linspace(0, 1, n, dtype=F64)
        return _times(process, torch.tan(u * math.atan(smin) + (1 - u) * math.atan(smax)))

    def __repr__(self) -> str:
        return f"KLOptimal({self._given().removeprefix(', ')})"


_REGISTRY: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (
        TimeUniform,
        LogSNRUniform,
        Exponential,
        PolyExponential,
        VPUniform,
        Laplace,
        KLOptimal,
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
:class:`Custom` grid; with ``final="zero"`` ``steps`` is their number, and ``steps=None`` takes it)."""


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
