r"""The Time-Shift Sampler against exposure bias, as a denoiser (Li, Qu, Yao, Sun & Moens 2024, "Alleviating
Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps", ICLR 2024; code: TS-DPM,
TS-DPM-ADM).

A net trained on forward-noised data ``x_t = alpha(t) x0 + sigma(t) eps`` is sampled on the sampler's own
states, whose noise level drifts from the grid's (exposure bias). The Time-Shift Sampler evaluates the net
at the time whose noise level matches the state's instead: at a step from ``x_t`` with ``t > t_c`` (the
cutoff), per sample,

    v = Var(x_t)                           (the unbiased variance over the sample's elements),
    t_s = argmin_{tau in W(t)} | v - sigma(tau)^2 |,    W(t) = {t + j d : j = -w // 2, ..., w // 2},

the window ``W(t)`` of ``w // 2 * 2 + 1`` candidate times (``d`` one training timestep; the authors' ``w``,
``window``), and the step then proceeds with the net's estimate at ``t_s``: ``x0`` and ``eps`` are converted
at the shifted time, ``x0 = (x_t - sigma(t_s) eps_theta(x_t, t_s)) / alpha(t_s)``, as the authors'
``_predict_xstart_from_eps(x, next_t, ...)`` does, while the solver keeps its own grid. DDIM's step is
then (as read from their ``ddim_sample`` with ``do_time_shift``; a second reading of the ADM variant,
``tingyu215/TS-DPM-ADM``, had the net at the grid's ``t`` and only ``abar_{t-1}`` shifted: not settled):

    x_{t-1} = alpha_{t-1} x0_theta(x_t, t_s) + sigma_{t-1} eps_theta(x_t, t_s).

``sigma(tau)^2`` is the authors' target, ``1 - abar_tau`` (``all_timesteps = 1 - alphas_cumprod_all`` in
their ``respace.py``): the variance of the noise part alone. ``data_var`` adds the signal's,
``alpha(tau)^2 data_var + sigma(tau)^2``, which is ``E[Var(x_t)]`` of forward-noised data whose mean
per-sample variance is ``data_var``: with it, states that already have the training statistics are not
shifted on average (``data_var = 0``, the default, is the authors' rule). Under a VP process the target is
``1 - abar_tau (1 - data_var)``: it grows with ``tau`` for ``data_var < 1``, falls for ``data_var > 1`` (the
shift then goes the other way) and is flat at ``data_var = 1``, where the rule cannot tell times apart.

What the rule can resolve: ``Var(x_t)`` over ``d`` elements spreads by about ``sqrt(2 / (d - 1))`` relative
to its mean even on exact forward-noised states (and more with the content of each sample), while
``sigma^2`` moves by a few percent or less over a window of tens of timesteps. On the exact 64-d mixture,
forward-noised and with ``data_var`` its own, the rule sends 98-100% of the samples to an end of a
40-step window at ``t = 400 .. 900`` (``tests/test_time_shift.py``): per sample it is close to a random
``+-w / 2``, chosen by the side of the target the sample's variance falls on.

Where it lives: a wrapper (:class:`TimeShift` is a :class:`~steerdiff.guidance.Guided` denoiser) rather than
a solver option, because the rule needs only the state and the time a solver evaluates at, so every solver
takes it unchanged (the authors patch DDIM, DDPM, PNDM, DPM-Solver and DEIS one by one). The prediction it
returns is the base's at ``t_s``, carrying ``alpha(t_s)`` and ``sigma(t_s)`` (so ``x = alpha(t_s) x0 +
sigma(t_s) eps`` holds): a solver that reads ``x0`` (DPM-Solver++, DDPM's posterior mean) gets the
shifted-time ``x0``, one that reads ``eps`` (DPM-Solver) the net's ``eps`` at ``t_s``, and DDIM's renoising
both, the authors' step above. No extra network evaluation: ``cost`` is the base's.

:func:`~steerdiff.invert` refuses it (also wrapped, through the ``base`` chain): ``t_s`` jumps by up to a
window with the state's variance, and the steps up the grid, evaluated at other states, do not undo the
steps down (``sample(invert(x_0))`` on the 16-d mixture, DDIM: relative error 0.37 / 0.53 at 20 / 100 steps
with ``window = 20``, against 0.096 / 0.021 without).

A jump of the base at time ``b`` (:meth:`~steerdiff.Denoiser.breaks`: RF-Inversion's editing window) is met
where a sample's shifted time reaches it, ``t_s = b`` at ``t = b - j d`` for whichever ``j`` the sample takes
there: :meth:`TimeShift.breaks` declares the window's ``w // 2 * 2 + 1`` of them. A sample's ``t_s`` also
jumps across ``b`` at no fixed ``t``, moving to another candidate (from ``t + w/2 d`` at one node to ``t' -
w/2 d`` at the next, the rule's usual ends), so that a step shorter than ``d`` between two of those times
may cross too: :meth:`TimeShift.crosses` says so for every step whose windows reach both sides of ``b``, and
a multistep solver restarts its history after each of them (:func:`~steerdiff.sampling.crossings`).

Differences from the reference code: the shift is not applied at ``t = t_max`` (the authors skip their first
step, where the state is the prior's noise), and candidates are clipped to the process's time range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import integer, real
from .._ops import kept
from ..denoiser import Denoiser, Prediction
from .base import Guided

__all__ = ["TimeShift"]

F64 = torch.float64


class TimeShift(Guided):
    """The Time-Shift Sampler: the base evaluated at the time of the window around ``t`` whose noise level
    matches the state's variance (per sample), for ``t > cutoff``.

    Args:
        den: the denoiser to evaluate at the shifted times.
        window: the authors' window size ``w`` (an integer >= 0): the candidates are ``t + j spacing`` for
            ``j = -w // 2 .. w // 2``; ``0`` turns the shift off. Their settings: 5 at 100 PNDM steps, 30 at 5
            DPM-Solver steps, 10 at 5 DEIS steps.
        cutoff: the cutoff time ``t_c`` in process time: no shift at ``t <= cutoff``. Default: 0.3 of the
            time range above ``t_min`` (299.7 on 1,000 training timesteps; the authors use 300 to 900).
        spacing: the candidates' spacing ``d`` in process time (> 0). Default: one training timestep for a
            discrete process (``VP.discrete``: 1), else a thousandth of the time range.
        data_var: the mean per-sample variance of the data (>= 0), so that the target noise level is
            ``alpha(tau)^2 data_var + sigma(tau)^2``; 0 (default) is the authors' ``sigma(tau)^2``.
    """

    base_arg = "den"
    state_time = True  # refused by invert: t_s jumps with Var(x), the steps up the grid do not undo it

    def __init__(
        self,
        den: Denoiser,
        window: int = 10,
        cutoff: float | None = None,
        spacing: float | None = None,
        data_var: float = 0.0,
    ) -> None:
        super().__init__(den)
        who, p = "TimeShift", den.process
        span = p.t_max - p.t_min
        self.window = integer(who, "window", window, lo=0)
        self.cutoff = p.t_min + 0.3 * span if cutoff is None else real(who, "cutoff", cutoff)
        discrete = getattr(p, "num_train_timesteps", None) is not None
        default = 1.0 if discrete else span / 1000
        self.spacing = default if spacing is None else real(who, "spacing", spacing, lo=0, lo_open=True)
        self.data_var = real(who, "data_var", data_var, lo=0)
        self._offsets: dict[torch.device, Tensor] = {}  # j d, j = -w // 2 .. w // 2, made on each device

    def shifted_times(self, x: Tensor, t: float | Tensor) -> Tensor:
        """The time ``t_s`` each sample of ``x`` is evaluated at (float64 ``(n,)`` on ``x``'s device): ``t``
        itself where ``t <= cutoff`` or ``t = t_max``, else the candidate of the window minimizing
        ``|Var(x) - (alpha^2 data_var + sigma^2)|`` (the earliest on a tie). A ``ValueError`` where a sample
        has a single element (no variance) and ``window > 0``."""
        p, n = self.process, len(x)
        if self.window > 0 and x[0].numel() < 2:
            raise ValueError(
                "TimeShift: the rule compares each sample's variance over its elements with the noise level, "
                f"and x has {x[0].numel()} element per sample; it needs at least 2 (or window=0)"
            )
        # on x's device, a scalar t filled there: no host read nor copy per call (dpm_adaptive's row times)
        dev, half = x.device, self.window // 2
        if isinstance(t, Tensor) and t.ndim > 0:
            ts = t.to(dev, F64).reshape(n)
        else:
            ts = torch.full((1,), float(t), dtype=F64, device=dev)
        offsets = kept(
            self._offsets, dev, lambda: self.spacing * torch.arange(-half, half + 1, dtype=F64, device=dev)
        )
        cand = (ts[:, None] + offsets).clamp(p.t_min, p.t_max)
        target = p.alpha(cand) ** 2 * self.data_var + p.sigma(cand) ** 2
        var = x.detach().reshape(n, -1).to(F64).var(dim=1)
        j = (var[:, None] - target).abs().argmin(dim=1, keepdim=True)
        best = cand.expand(n, -1).gather(1, j)[:, 0]
        ts = ts.expand(n)
        return torch.where((ts <= self.cutoff) | (ts >= p.t_max), ts, best)

    def breaks(self) -> tuple[float, ...]:
        """The times at which the prediction may jump: where the shifted time meets a break ``b`` of the base
        (:meth:`~steerdiff.Denoiser.breaks`), the sample's ``t_s = t + j spacing`` equal to ``b``, at
        ``t = b - j spacing`` for each ``j`` of the window (whichever ``j`` a sample takes there) above the
        cutoff, at ``b`` itself at or below it, and at the cutoff where the shift turning on moves ``t_s``
        across ``b`` (a ``b - j spacing`` at or below the cutoff where ``b`` is above it, or above it where
        ``b`` is below); the base's own where
        the shift is off (``window = 0``). Not breaks: ``t_s`` moving to another candidate, or the shift
        turning on at the cutoff, over no break of the base: a change of the base's smooth prediction over a
        few ``spacing``; across one, that is a jump at no fixed time, which :meth:`crosses` covers (a step
        shorter than ``spacing`` between two of these times)."""
        inner = super().breaks()
        if self.window == 0:
            return inner
        c, top, half = self.cutoff, self.process.t_max, self.window // 2
        out: set[float] = set()
        for b in inner:
            hit = [b - j * self.spacing for j in range(-half, half + 1)]
            out.update(s for s in hit if c < s < top)
            if b <= c:
                out.add(b)
            # just above the cutoff t_s = t + j d is at or below b iff t <= s (so iff c < s), at it t_s = c
            if any((s <= c) != (b < c) for s in hit):
                out.add(c)
        return tuple(sorted(out))

    def reach(self, t: float) -> tuple[float, float]:
        """The lowest and highest time a sample's shifted time ``t_s`` may take at ``t``: ``(t, t)`` where
        the shift is off (``window = 0``, ``t <= cutoff``, ``t >= t_max``), else the window's ends
        ``t -+ (w // 2) spacing``, clipped to the process's range."""
        p, d = self.process, self.window // 2 * self.spacing
        if self.window == 0 or not self.cutoff < t < p.t_max:
            return t, t
        return max(t - d, p.t_min), min(t + d, p.t_max)

    def crosses(self, t_a: float, t_b: float) -> bool:
        """Whether the evaluations at ``t_a`` and ``t_b`` may lie on two pieces of the base's field: a break
        ``b`` of the base within the times they may take, ``min(reach) <= b < max(reach)`` over both
        :meth:`reach` ranges (one evaluation below or at ``b``, the other above). Unlike :meth:`breaks`,
        this holds for a step shorter than ``spacing`` between two of them, in which a sample's ``t_s`` may
        jump across ``b`` by moving to another candidate (``t + w/2 d`` at one node, ``t - w/2 d`` at the
        next): :func:`~steerdiff.sampling.crossings` restarts the solver's history after every step of
        the window ``b -+ (w // 2) spacing``."""
        (lo_a, hi_a), (lo_b, hi_b) = self.reach(t_a), self.reach(t_b)
        return self.base.crosses(min(lo_a, lo_b), max(hi_a, hi_b))

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        scalar = not isinstance(t, Tensor) or t.ndim == 0
        if self.window == 0 or (scalar and not self.cutoff < float(t) < self.process.t_max):
            return self.base.evaluate(x, t, net_dtype, **cond)  # no shift: the base's call as it is
        return self.base.evaluate(x, self.shifted_times(x, t), net_dtype, **cond)

    def __repr__(self) -> str:
        return (
            f"TimeShift({self.base!r}, window={self.window}, cutoff={self.cutoff:g}, "
            f"spacing={self.spacing:g}, data_var={self.data_var:g})"
        )
