r"""Forward noising processes ``x_t = alpha(t) x_0 + sigma(t) eps``.

A :class:`Process` knows the signal scale ``alpha(t)``, the noise scale ``sigma(t)``, the half
log-SNR ``lam(t) = log(alpha / sigma)`` and its inverse ``t_of_lam``, the derivatives of
``alpha`` and ``sigma`` (for flow-matching parameterizations) and the time range over which one
samples. All schedule arithmetic is done in float64; every method accepts a Python float or a
tensor (or an array or sequence of reals) and returns a float64 tensor. Anything else -- ``None``, a
string, a ``bool`` -- and a NaN given as a number or a 0-d CPU tensor are a ``ValueError`` naming the
method and the argument; NaN entries of a tensor of times give NaN there (no check reads a device).

Kinds:

* :meth:`VP.discrete` -- a model trained on ``N`` integer timesteps from ``betas`` or
  ``alphas_cumprod`` (DDPM, Ho et al. 2020). Process time *is* the timestep index, a float in
  ``[0, N-1]`` passed to the net unchanged (diffusers' convention). Between integers
  ``log(sigma/alpha)`` is linear in ``t``, which is what diffusers' Karras-sigma mapping means by
  a fractional timestep.
* :meth:`VP.linear` -- continuous linear-beta VP SDE (Song et al. 2021), ``t in (0, 1]``.
* :meth:`VP.cosine` -- the cosine schedule of Improved DDPM (Nichol & Dhariwal 2021).
* :class:`SubVP` -- the sub-VP SDE (Song et al. 2021): :meth:`VP.linear`'s ``alpha``, ``sigma = 1 - alpha^2``.
* :class:`VE` -- ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` (Song et al. 2021).
* :class:`EDM` -- ``alpha = 1``, ``sigma = t`` (Karras et al. 2022).
* :class:`RectifiedFlow` -- ``alpha = 1 - t``, ``sigma = t`` (Liu et al. 2022; Lipman et al. 2022).
* :class:`MeanReverting` -- IR-SDE (Luo et al. 2023): ``y = x - mu`` with ``alpha = e^{-thetabar}``,
  ``sigma = lambda sqrt(1 - e^{-2 thetabar})``; linear ``theta_t`` on ``[t_min, 1]``, or with
  :meth:`MeanReverting.discrete` / :meth:`MeanReverting.cosine` (the released IR-SDE models) ``thetabar``
  at integer steps, the process time being the step index, ``thetabar`` linear between integers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._checks import Bounds, boolean, integer, ordered, real, real_array
from ._ops import kept

if TYPE_CHECKING:
    from .denoiser import Denoiser

__all__ = [
    "EDM",
    "EQUIVALENT_RTOL",
    "VE",
    "VP",
    "MeanReverting",
    "MeanRevertingDiscrete",
    "Process",
    "RectifiedFlow",
    "SubVP",
    "difference",
    "equivalent",
    "rescale_zero_terminal_snr",
]

F64 = torch.float64
TimeLike = float | Sequence[float] | Tensor


def _f64(t: TimeLike) -> Tensor:
    return torch.as_tensor(t, dtype=F64)


def _time(process: Process, method: str, value: object, name: str = "t", *, nonneg: bool = False) -> TimeLike:
    """``value``, the argument ``name`` of ``process.method``, checked: a real number (a Python or numpy
    scalar, not a ``bool``) or a tensor as it is, anything else that is an array or sequence of reals as a
    float64 tensor; else a ``ValueError`` naming ``{Process}.{method}`` and ``name``.

    NaN (and with ``nonneg`` a negative value) is refused where it costs no device read and next to no
    time: in a number and in a 0-d CPU tensor (a solver's node). In a tensor of times (per-sample times,
    perhaps on an accelerator) it is left to give NaN at its entries, as torch's elementwise functions do.
    """
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            got = f"a {value.dtype} tensor"
        elif value.ndim > 0 or not value.is_cpu or _admits(float(value), nonneg):
            return value
        else:
            got = repr(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if _admits(float(value), nonneg):
            return float(value)
        got = repr(value)
    else:
        try:
            kind = torch.as_tensor(value)  # for its dtype (a list's default is float32: converted again)
        except (TypeError, ValueError, RuntimeError):
            kind = None
        if (
            kind is not None
            and kind.dtype != torch.bool
            and not kind.is_complex()
            and (kind.ndim > 0 or _admits(float(kind), nonneg))
        ):
            return torch.as_tensor(value, dtype=F64)
        got = f"{value!r:.60}"
    number = "a real number >= 0" if nonneg else "a real number"
    raise ValueError(
        f"{type(process).__name__}.{method}: {name} must be {number} (not NaN) or a tensor, array or "
        f"sequence of real numbers, got {got}"
    )


def _admits(v: float, nonneg: bool) -> bool:
    """Whether a scalar argument ``v`` passes :func:`_time`: not NaN (and ``>= 0`` with ``nonneg``)."""
    return v >= 0 if nonneg else v == v


def _t64(process: Process, method: str, value: object, name: str = "t", *, nonneg: bool = False) -> Tensor:
    """:func:`_time` as a float64 tensor."""
    return _f64(_time(process, method, value, name, nonneg=nonneg))


_UNIT: Bounds = {"lo": 0, "hi": 1, "lo_open": True, "hi_open": True}  # the bounds of (0, 1)
_POSITIVE: Bounds = {"lo": 0, "lo_open": True}  # finite > 0


class Process:
    """Base class: subclasses define ``alpha``, ``sigma``, ``t_of_lam`` and the derivatives.

    Attributes:
        t_min: smallest sampling time (the clean end).
        t_max: largest sampling time (the noise end); ``lam(t_max)`` is finite.
    """

    t_min: float
    t_max: float

    def alpha(self, t: TimeLike) -> Tensor:
        """Signal scale ``alpha(t)`` of ``x_t = alpha x_0 + sigma eps`` (float64)."""
        raise NotImplementedError

    def sigma(self, t: TimeLike) -> Tensor:
        """Noise scale ``sigma(t)`` of ``x_t = alpha x_0 + sigma eps`` (float64)."""
        raise NotImplementedError

    def lam(self, t: TimeLike) -> Tensor:
        """Half log signal-to-noise ratio ``log(alpha / sigma)``."""
        t = _time(self, "lam", t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        """Inverse of :meth:`lam`."""
        raise NotImplementedError

    def coefficients(self, t: TimeLike) -> tuple[Tensor, Tensor, Tensor]:
        """``(alpha, sigma, lam)`` at ``t`` in one pass."""
        t = _time(self, "coefficients", t)
        a, s = self.alpha(t), self.sigma(t)
        return a, s, torch.log(a) - torch.log(s)

    def d_alpha(self, t: TimeLike) -> Tensor:
        """``d alpha / dt``."""
        raise NotImplementedError

    def d_sigma(self, t: TimeLike) -> Tensor:
        """``d sigma / dt``."""
        raise NotImplementedError

    def model_time(self, t: TimeLike) -> Tensor:
        """The time input the network was trained with (identity unless overridden)."""
        return _t64(self, "model_time", t)

    def sigma_ratio(self, t: TimeLike) -> Tensor:
        """``sigma / alpha = exp(-lam)`` at ``t`` (k-diffusion's sigma)."""
        return torch.exp(-self.lam(_time(self, "sigma_ratio", t)))

    def t_of_sigma_ratio(self, s: TimeLike) -> Tensor:
        """Time at which ``sigma / alpha`` equals ``s`` (k-diffusion's sigma): the inverse of
        :meth:`sigma_ratio`."""
        return self.t_of_lam(-torch.log(_t64(self, "t_of_sigma_ratio", s, "s", nonneg=True)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


class VP(Process):
    r"""Variance-preserving process: ``alpha^2 + sigma^2 = 1``.

    ``alpha = sqrt(sigmoid(2 lam))``, ``sigma = sqrt(sigmoid(-2 lam))``; subclasses define
    ``log alpha(t)`` (or ``lam(t)`` itself), ``t_of_lam`` and ``d log alpha / dt``. Build one with
    :meth:`discrete`, :meth:`linear` or :meth:`cosine`.
    """

    def _log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError("VP is built with VP.discrete, VP.linear, VP.cosine or VP.scaled_linear")

    def lam(self, t: TimeLike) -> Tensor:
        """``lam = log alpha - log sigma = log alpha - log(1 - alpha^2) / 2`` from ``log alpha(t)``."""
        la = self._log_alpha(_t64(self, "lam", t))
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def alpha(self, t: TimeLike) -> Tensor:
        return torch.sigmoid(2 * self.lam(_time(self, "alpha", t))).sqrt()

    def sigma(self, t: TimeLike) -> Tensor:
        return torch.sigmoid(-2 * self.lam(_time(self, "sigma", t))).sqrt()

    def coefficients(self, t: TimeLike) -> tuple[Tensor, Tensor, Tensor]:
        lam = self.lam(_time(self, "coefficients", t))
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt(), lam

    def _dlog_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: TimeLike) -> Tensor:
        t = _t64(self, "d_alpha", t)
        return self.alpha(t) * self._dlog_alpha(t)

    def d_sigma(self, t: TimeLike) -> Tensor:
        t = _t64(self, "d_sigma", t)
        a, s = self.alpha(t), self.sigma(t)
        return -a * self.d_alpha(t) / s

    @staticmethod
    def discrete(
        betas: TimeLike | None = None,
        alphas_cumprod: TimeLike | None = None,
        rescale_zero_snr: bool = False,
    ) -> VPDiscrete:
        """A model trained on ``N >= 2`` integer timesteps: give exactly one of ``betas`` (1-d, in
        ``(0, 1)``) or ``alphas_cumprod`` (1-d, in ``(0, 1)``, strictly decreasing)."""
        return VPDiscrete(betas=betas, alphas_cumprod=alphas_cumprod, rescale_zero_snr=rescale_zero_snr)

    @staticmethod
    def linear(beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> VPLinear:
        """Continuous linear-beta VP SDE (Song et al. 2021; DPM-Solver's ``linear``) on ``[t_min, 1]``.

        Accepted: finite ``0 < beta_min < beta_max``, ``0 < t_min < 1``."""
        return VPLinear(beta_min, beta_max, t_min)

    @staticmethod
    def cosine(s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> VPCosine:
        """Cosine schedule (Nichol & Dhariwal 2021) on ``[t_min, t_max]``: finite ``s >= 0``,
        ``0 < t_min < t_max < 1`` (``t_max < 1`` keeps ``lam`` finite)."""
        return VPCosine(s, t_min, t_max)

    @staticmethod
    def scaled_linear(
        beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
    ) -> VPDiscrete:
        """Stable Diffusion's ``scaled_linear`` betas: ``linspace(sqrt(b0), sqrt(b1), N)^2``.

        Accepted: ``0 < beta_start < beta_end < 1``, ``num_train_timesteps`` an integer ``N >= 2``."""
        who = "VP.scaled_linear"
        b0, b1 = ordered(who, "beta_start", beta_start, "beta_end", beta_end, **_UNIT)
        n = integer(who, "num_train_timesteps", num_train_timesteps, lo=2)
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=F64) ** 2
        return VPDiscrete(betas=betas)


# equivalent's default tolerance on alpha and sigma, relative to the state's scale sqrt(alpha^2 + sigma^2). A
# table formed in float32 (diffusers' alphas_cumprod, a cumulative product of float32 1 - betas) departs from
# the same schedule in float64 by 6.1e-7 (SD's scaled_linear betas), 8.3e-7 (DDPM's linear) and 2.3e-6
# (squaredcos_cap_v2) of it, and by up to N eps32 / 2 = 6e-5 in alpha^2 over N = 1000 steps in the worst case,
# while its sigma near t = 0 differs by 1.3e-5, 8.3e-5 and 2.6e-4 relative (1 - alphas_cumprod there is
# beta_0, a few float32 ulps of 1), and lam as much: a tolerance on the scale, not on sigma or lam alone.
# SD's betas with beta_end 0.0121 instead of 0.012 differ by 2.1e-3 of it, DDPM's from SD's by 0.25.
EQUIVALENT_RTOL = 1e-4
# and alpha to 1e-2 of itself (or rtol, where larger): near alpha = 0 (zero terminal SNR) the scale's
# tolerance is loose for it (alphas_cumprod[-1] 2^-26 against 2^-28, alpha 1.2e-4 against 6.1e-5, is 6.1e-5
# of the scale; lam at t_max -9.01 against -9.70) while an eps net's x0 = (x - sigma eps) / alpha takes it
# relative: an eps net of the one sampled as the other's is 2.7% off at 10 steps, CFG of an eps and a v net
# 1.3%. Float32 tables are off by 6.6e-6 of alpha at most (SD's, DDPM's and squaredcos_cap_v2 betas, also
# rescaled to zero terminal SNR). Not sigma: float32 puts it 2.6e-4 of itself off near t = 0 (1.9e-3 for
# squaredcos_cap_v2 rescaled), where it multiplies eps in x0 = (x - sigma eps) / alpha.
_ALPHA_RTOL = 1e-2


def difference(p: Process, q: Process, rtol: float = EQUIVALENT_RTOL) -> str | None:
    """How ``p`` differs from ``q`` as a noise process, in words with the size of the difference, or
    ``None`` where they are one (:func:`equivalent`): another kind, or ``alpha`` or ``sigma`` off by more
    than ``rtol`` (a finite number >= 0) times the larger ``sqrt(alpha^2 + sigma^2)`` of the two (``alpha``
    also by more than 1e-2 of itself, see :func:`equivalent`) at one of 257
    evenly spaced times over each one's range (the time of the largest difference named): the same either way
    round."""
    return _difference("difference", p, q, rtol)


def equivalent(p: Process, q: Process, rtol: float = EQUIVALENT_RTOL) -> bool:
    """Whether ``p`` and ``q`` are one noise process: the same object, or the same kind whose ``alpha`` and
    ``sigma`` agree to ``rtol`` (default :data:`EQUIVALENT_RTOL`, 1e-4) of ``sqrt(alpha^2 + sigma^2)`` (the
    larger of the two's) at 257 evenly spaced times over ``p``'s range and as many over ``q``'s: symmetric,
    so that a table cut short (``VP.discrete`` of the first 999 of 1000 ``alphas_cumprod``, whose ``alpha``
    at 999 is its last, at 998) is refused whichever is given first, as a grid over the longer one's range
    would meet it there (:func:`difference` says where and by how much they do not agree). A copy or an
    unpickled one is; so is a table formed in float32 (diffusers' ``alphas_cumprod``,
    :func:`steerdiff.integrations.diffusers.process_from_config`) beside the same schedule in float64, off by
    float32's rounding (6e-7 to 2.3e-6 of the scale measured, 6e-5 at worst; its ``sigma`` near ``t_min``
    1e-5 to 3e-4 relative, as its ``lam``: hence a tolerance on the scale, not on ``sigma`` or ``lam``
    alone); SD's betas with ``beta_end`` 0.0121 instead of 0.012 are not (2.1e-3). Two tables of
    ``VP.discrete`` or ``MeanReverting.discrete`` that differ at one step differ from there on (their
    ``alpha`` is a cumulative product). ``alpha`` must also agree to 1e-2 of itself (or ``rtol``, where
    larger): near ``alpha = 0`` (zero terminal SNR) ``x0 = (x - sigma eps) / alpha`` takes its error relative,
    and two tables whose last ``alphas_cumprod`` is ``2^-26`` and ``2^-28`` (6.1e-5 of the scale apart) are
    not one process (an eps net of one sampled as the other's: 2.7% off). ``rtol=0`` asks for equal floats.
    The time ranges themselves may
    differ where the formulas agree over both (``EDM(sigma_max=80)`` and ``EDM(sigma_max=160)``): a fitted
    grid, which starts at its process's ``t_max``, checks them too."""
    return _difference("equivalent", p, q, rtol) is None


def _difference(who: str, p: Process, q: Process, rtol: float) -> str | None:
    """:func:`difference`, its ``rtol`` checked as ``who``'s."""
    rtol = real(who, "rtol", rtol, lo=0)
    if p is q:
        return None
    if type(p) is not type(q):
        return f"another kind ({type(p).__name__} against {type(q).__name__})"
    ranges = sorted({(p.t_min, p.t_max), (q.t_min, q.t_max)})
    ts = torch.cat([torch.linspace(lo, hi, 257, dtype=F64) for lo, hi in ranges])
    a, b = (p.alpha(ts), p.sigma(ts)), (q.alpha(ts), q.sigma(ts))
    scale = torch.maximum(torch.hypot(*a), torch.hypot(*b))
    checks = [
        ("alpha", "sqrt(alpha^2 + sigma^2)", f"rtol={rtol:g}", rtol, a[0], b[0], scale),
        ("sigma", "sqrt(alpha^2 + sigma^2)", f"rtol={rtol:g}", rtol, a[1], b[1], scale),
        # near alpha = 0 (zero terminal SNR), where the scale's tolerance is loose for it: _ALPHA_RTOL
        ("alpha", "itself", f"{max(rtol, _ALPHA_RTOL):g}", max(rtol, _ALPHA_RTOL), a[0], b[0], None),
    ]
    for name, of, limit, tol, u, v, by in checks:
        diff = (u - v).abs()
        off = (diff / (torch.maximum(u.abs(), v.abs()) if by is None else by)).nan_to_num(nan=math.inf)
        off = torch.where(diff == 0, 0.0, off)
        k = int(off.argmax())
        if not off[k] <= tol:
            return (
                f"{name} differs by up to {float(off[k]):.3g} of {of}, above {limit} (at t = "
                f"{float(ts[k]):.6g}: {float(u[k]):.9g} against {float(v[k]):.9g})"
            )
    return None


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale ``sqrt(alphas_cumprod)`` so that the last is 0 and the first unchanged.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.
    """
    ab = alphas_cumprod.sqrt()
    first, last = ab[0].clone(), ab[-1].clone()
    ab = (ab - last) * first / (first - last)
    return ab**2


def _interval(table: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """For a ``table`` of values at the integer times ``0, ..., n-1``: the integer ``lo`` in ``[0, n-2]``
    below each time ``t`` (clamped to ``[0, n-1]``) and that clamped time (a NaN time: ``lo = 0``, not a bad
    index)."""
    last = table.numel() - 1
    t = t.clamp(0, last)
    return t.floor().nan_to_num(0.0).clamp(max=last - 1).long(), t


def _interpolate(table: Tensor, t: Tensor) -> Tensor:
    """``table`` (values at the integer times) linear between them, at the times ``t`` clamped to its
    range."""
    lo, t = _interval(table, t)
    frac = t - lo
    # torch.take: table[lo] of the 1-d table, without advanced indexing's overhead (0.8 us a gather)
    return (1 - frac) * torch.take(table, lo) + frac * torch.take(table, lo + 1)


def _slope(table: Tensor, t: Tensor) -> Tensor:
    """``d/dt`` of :func:`_interpolate`: ``table[lo + 1] - table[lo]`` on the interval of each time ``t``."""
    lo = _interval(table, t)[0]
    return torch.take(table, lo + 1) - torch.take(table, lo)  # table[lo + 1] - table[lo], as in _interpolate


def _inverse(table: Tensor, v: Tensor) -> Tensor:
    """The time at which :func:`_interpolate` of a strictly *decreasing* ``table`` equals ``v``, clamped to
    its range (``v`` above ``table[0]`` is time 0, below ``table[-1]`` the last time): its exact inverse
    there."""
    rev = table.flip(0)  # increasing
    v = v.clamp(rev[0], rev[-1])
    j = torch.searchsorted(rev, v, right=False).clamp(1, rev.numel() - 1)
    lo, hi = rev[j - 1], rev[j]
    w = (v - lo) / (hi - lo)
    idx = (rev.numel() - 1 - (j - 1)).to(F64)  # index of `lo` in the original order
    return idx - w


def _zero_snr_hint(values: Tensor, end: float) -> str:
    """The rest of :class:`VPDiscrete`'s range message where only the last of ``values`` is out of
    ``(0, 1)``, at ``end`` (1 for ``betas``, 0 for ``alphas_cumprod``): a schedule rescaled to zero terminal
    SNR already (diffusers' ``rescale_betas_zero_snr``), whose infinite last log-SNR no grid can use."""
    if (
        values.numel() < 2
        or float(values[-1]) != end
        or not bool(((values[:-1] > 0) & (values[:-1] < 1)).all())
    ):
        return ""
    return (
        f", got a last value of {end:g}: a schedule rescaled to zero terminal SNR (lam = -inf there) is "
        "built from the betas or alphas_cumprod before the rescaling, with rescale_zero_snr=True (which "
        "keeps the last lam finite)"
    )


class VPDiscrete(VP):
    """VP process of a model trained on ``N`` integer timesteps; ``t in [0, N-1]``.

    With ``rescale_zero_snr`` the betas are rescaled to zero terminal SNR (Lin et al. 2024), which
    makes the last ``alphas_cumprod`` 0 (``lam = -inf``). To keep ``lam`` finite it is then set to
    ``2**-24``, as diffusers' Euler, DPM-Solver and UniPC schedulers do (its DDIM/DDPM keep 0),
    when that is below the rescaled ``alphas_cumprod[N-2]`` (Stable Diffusion's ``scaled_linear``
    betas: 2.0e-7), else to ``alphas_cumprod[N-2] / 4``. The second case is DDPM's ``linear``
    betas (1e-4 to 0.02), rescaled to ``alphas_cumprod[N-2] = 4.2e-9 < 2**-24 = 6.0e-8``, where
    ``2**-24`` (diffusers) would put the last ``lam`` *above* the one before it (``lam[995:]`` =
    -8.24, -8.53, -8.94, -9.64, then -8.32): a non-monotone ``lam`` that ``t_of_lam`` cannot
    invert and on which a grid has steps with ``h < 0``. ``/ 4`` halves ``sqrt(alphas_cumprod)``,
    the midpoint of the last interval ``[0, sqrt(alphas_cumprod[N-2])]`` of the rescaled
    (linear-to-zero) ``sqrt(alphas_cumprod)``: ``lam`` drops by ``log 2`` there (to -10.34).
    ``alphas_cumprod`` is checked to be positive and strictly decreasing after all of this.
    """

    def __init__(
        self,
        betas: TimeLike | None = None,
        alphas_cumprod: TimeLike | None = None,
        rescale_zero_snr: bool = False,
    ) -> None:
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("VP.discrete: give exactly one of `betas` or `alphas_cumprod`")
        rescale_zero_snr = boolean("VP.discrete", "rescale_zero_snr", rescale_zero_snr)
        if betas is not None:
            b = real_array("VP.discrete", "betas", betas)
            if b.numel() < 2 or not bool(((b > 0) & (b < 1)).all()):
                raise ValueError(
                    "VP.discrete: `betas` must be a 1-D array of at least 2 values in (0, 1)"
                    + _zero_snr_hint(b, 1.0)
                )
            ac = torch.cumprod(1 - b, 0)
        else:
            ac = real_array("VP.discrete", "alphas_cumprod", alphas_cumprod)
            if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
                raise ValueError(
                    "VP.discrete: `alphas_cumprod` must be a 1-D array of at least 2 values in (0, 1)"
                    + _zero_snr_hint(ac, 0.0)
                )
            if not bool((ac[1:] < ac[:-1]).all()):
                raise ValueError("VP.discrete: `alphas_cumprod` must be strictly decreasing")
        if rescale_zero_snr:
            ac = rescale_zero_terminal_snr(ac)
            ac[-1] = 2.0**-24 if float(ac[-2]) > 2.0**-24 else float(ac[-2]) / 4
        if not bool((ac > 0).all() & (ac[1:] < ac[:-1]).all()):
            raise ValueError(
                "VP.discrete: alphas_cumprod must be positive and strictly decreasing"
                f"{' after the zero-SNR rescaling' if rescale_zero_snr else ''} (float64 underflow?): "
                f"it is not at index {int(((ac <= 0)[1:] | (ac[1:] >= ac[:-1])).nonzero()[0]) + 1}"
            )
        self.alphas_cumprod = ac
        self.num_train_timesteps = ac.numel()
        self._lams = 0.5 * (torch.log(ac) - torch.log1p(-ac))
        self._lams_on: dict[torch.device, Tensor] = {self._lams.device: self._lams}
        self._lam_list: list[float] = self._lams.tolist()  # for scalar times (about 20 us of tensor ops less)
        self.t_min = 0.0
        self.t_max = float(self.num_train_timesteps - 1)

    def _table(self, like: Tensor) -> Tensor:
        """``lam`` at the integer timesteps on ``like``'s device (per-sample times on an accelerator),
        copied once per device."""
        return kept(self._lams_on, like.device, lambda: self._lams.to(like.device))

    def lam(self, t: TimeLike) -> Tensor:
        # a solver's node: the same arithmetic in floats
        if isinstance(t, float | int) and not isinstance(t, bool) and math.isfinite(t):
            t = min(max(float(t), self.t_min), self.t_max)
            j = min(math.floor(t), self.num_train_timesteps - 2)
            w = t - j
            return torch.tensor((1 - w) * self._lam_list[j] + w * self._lam_list[j + 1], dtype=F64)
        t = _t64(self, "lam", t)
        return _interpolate(self._table(t), t)

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        lam = _t64(self, "t_of_lam", lam, "lam")
        return _inverse(self._table(lam), lam)

    def _dlog_alpha(self, t: Tensor) -> Tensor:
        return self.sigma(t) ** 2 * _slope(self._table(t), t)

    def __repr__(self) -> str:
        return f"VP.discrete(N={self.num_train_timesteps})"


class VPLinear(VP):
    """``log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2`` (Song et al. 2021)."""

    def __init__(self, beta_min: float, beta_max: float, t_min: float) -> None:
        who = "VP.linear"
        self.beta_min, self.beta_max = ordered(who, "beta_min", beta_min, "beta_max", beta_max, **_POSITIVE)
        self.t_min, self.t_max = real(who, "t_min", t_min, **_UNIT), 1.0

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        # Lu et al. 2022 (DPM-Solver), App. D: closed-form inverse of lam(t).
        lam = _t64(self, "t_of_lam", lam, "lam")
        d = self.beta_max - self.beta_min
        tmp = 2 * d * torch.logaddexp(-2 * lam, torch.zeros_like(lam))
        delta = self.beta_min**2 + tmp
        # lam = -inf (or e^{-2 lam} beyond float64) is the limit t = inf, where the quotient is inf / inf
        return torch.where(tmp.isinf(), math.inf, tmp / (delta.sqrt() + self.beta_min) / d)

    def _dlog_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def __repr__(self) -> str:
        return f"VP.linear(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"


class VPCosine(VP):
    """``alpha(t) = cos(theta) / cos(theta_0)``, ``theta = (t + s) c``, ``theta_0 = s c``,
    ``c = pi / (2 (1 + s))`` (Improved DDPM).

    Near ``t = 0`` ``alpha`` is within ``sigma^2 / 2`` of 1, so both directions avoid forming it:
    ``log alpha = log1p(-2 sin((t + 2s) c / 2) sin(t c / 2) / cos(theta_0))`` (the difference of
    cosines as a product), and ``t_of_lam`` takes ``theta = atan2(sqrt(sin^2 theta_0 + sigma^2
    cos^2 theta_0), alpha cos theta_0)`` from ``sigma^2 = sigmoid(-2 lam)``, then
    ``t = (theta - theta_0) / c``: relative precision ~1e-15 in both down to ``t = 1e-4`` at
    ``s = 0`` (``log cos(theta) - log cos(theta_0)`` and ``arccos`` lost ``eps / sigma^2``, 2e-10 there).
    """

    def __init__(self, s: float, t_min: float, t_max: float) -> None:
        who = "VP.cosine"
        self.s = real(who, "s", s, lo=0)
        self.t_min, self.t_max = ordered(who, "t_min", t_min, "t_max", t_max, **_UNIT)
        self._c = math.pi / (2 * (1 + self.s))
        self._theta_0 = self.s * self._c

    def _log_alpha(self, t: Tensor) -> Tensor:
        c = self._c
        return torch.log1p(
            -2 * torch.sin((t + 2 * self.s) * c / 2) * torch.sin(t * c / 2) / math.cos(self._theta_0)
        )

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        lam = _t64(self, "t_of_lam", lam, "lam")
        sin_0, cos_0 = math.sin(self._theta_0), math.cos(self._theta_0)
        sin_theta = torch.sqrt(sin_0**2 + torch.sigmoid(-2 * lam) * cos_0**2)
        theta = torch.atan2(sin_theta, torch.sigmoid(2 * lam).sqrt() * cos_0)
        return (theta - self._theta_0) / self._c

    def _dlog_alpha(self, t: Tensor) -> Tensor:
        return -self._c * torch.tan((t + self.s) * self._c)

    def __repr__(self) -> str:
        return f"VP.cosine(s={self.s:g})"


class SubVP(Process):
    r"""The sub-VP SDE (Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
    Equations", ICLR, Sec. 3.4, Eq. 12; Eq. 11 is the VP SDE), on ``t in [t_min, 1]``:

        dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - e^{-2 B(t)})) dW,

    ``beta(t) = beta_min + (beta_max - beta_min) t``, ``B(t) = int_0^t beta = beta_min t + (beta_max -
    beta_min) t^2 / 2``. Its perturbation kernel (App. B) has :meth:`VP.linear`'s mean and a smaller standard
    deviation:

        alpha(t) = e^{-B/2},   sigma(t) = 1 - e^{-B} = 1 - alpha^2   (sigma^2 <= 1 - alpha^2).

    Hence ``sigma / alpha = 2 sinh(B / 2)``: ``lam = -log(2 sinh(B / 2))`` and, inverted in closed form,
    ``B = 2 asinh(e^{-lam} / 2)``, ``t = 2 B / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) B))``.
    ``sigma`` is formed as ``-expm1(-B)`` (full precision near ``t = 0``). The net's time input is ``t``
    itself (the released score_sde models take ``999 t`` and predict ``eps``: ``Denoiser(net, SubVP(), "eps",
    time_map=lambda t: 999 * t)``).

    Accepted: finite ``0 < beta_min < beta_max``, ``0 < t_min < 1``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> None:
        who = "SubVP"
        self.beta_min, self.beta_max = ordered(who, "beta_min", beta_min, "beta_max", beta_max, **_POSITIVE)
        self.t_min, self.t_max = real(who, "t_min", t_min, **_UNIT), 1.0

    def beta(self, t: TimeLike) -> Tensor:
        """The SDE's ``beta(t) = beta_min + (beta_max - beta_min) t``."""
        return self.beta_min + (self.beta_max - self.beta_min) * _t64(self, "beta", t)

    def _integral(self, t: Tensor) -> Tensor:
        """``B(t) = int_0^t beta``."""
        return t * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * t)

    def alpha(self, t: TimeLike) -> Tensor:
        return torch.exp(-0.5 * self._integral(_t64(self, "alpha", t)))

    def sigma(self, t: TimeLike) -> Tensor:
        return -torch.expm1(-self._integral(_t64(self, "sigma", t)))

    def lam(self, t: TimeLike) -> Tensor:
        # log alpha - log sigma = -B/2 - log(1 - e^{-B}) = -log(2 sinh(B/2))
        b = self._integral(_t64(self, "lam", t))
        return -0.5 * b - torch.log(-torch.expm1(-b))

    def coefficients(self, t: TimeLike) -> tuple[Tensor, Tensor, Tensor]:
        b = self._integral(_t64(self, "coefficients", t))
        return torch.exp(-0.5 * b), -torch.expm1(-b), -0.5 * b - torch.log(-torch.expm1(-b))

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        # B / 2 = asinh(e^u / 2), u = -lam; for u > 0 as u + log((1 + sqrt(1 + 4 e^{-2u})) / 2), which keeps
        # e^u from overflowing (lam -> -inf: B -> inf, the limit t = inf)
        u = -_t64(self, "t_of_lam", lam, "lam")
        big = u.clamp(min=0)
        half = torch.where(
            u > 0,
            big + torch.log1p(torch.sqrt(1 + 4 * torch.exp(-2 * big))) - math.log(2),
            torch.asinh(torch.exp(u.clamp(max=0)) / 2),
        )
        b, d = 2 * half, self.beta_max - self.beta_min
        t = 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * b))
        return torch.where(b.isinf(), math.inf, t)

    def d_alpha(self, t: TimeLike) -> Tensor:
        t = _t64(self, "d_alpha", t)
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t: TimeLike) -> Tensor:
        # d/dt (1 - e^{-B}) = beta e^{-B} = beta alpha^2
        t = _t64(self, "d_sigma", t)
        return self.beta(t) * torch.exp(-self._integral(t))

    def __repr__(self) -> str:
        return f"SubVP(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"


class VE(Process):
    """Variance-exploding: ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``, t in [0, 1]."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        self.sigma_min, self.sigma_max = ordered(
            "VE", "sigma_min", sigma_min, "sigma_max", sigma_max, **_POSITIVE
        )
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.t_min, self.t_max = 0.0, 1.0

    def alpha(self, t: TimeLike) -> Tensor:
        return torch.ones_like(_t64(self, "alpha", t))

    def sigma(self, t: TimeLike) -> Tensor:
        return self.sigma_min * torch.exp(_t64(self, "sigma", t) * self._log_ratio)

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        return (-_t64(self, "t_of_lam", lam, "lam") - math.log(self.sigma_min)) / self._log_ratio

    def d_alpha(self, t: TimeLike) -> Tensor:
        return torch.zeros_like(_t64(self, "d_alpha", t))

    def d_sigma(self, t: TimeLike) -> Tensor:
        return self.sigma(_time(self, "d_sigma", t)) * self._log_ratio


class EDM(Process):
    """Karras et al. 2022: ``alpha = 1``, ``sigma = t``, ``t in [sigma_min, sigma_max]``."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        self.t_min, self.t_max = ordered("EDM", "sigma_min", sigma_min, "sigma_max", sigma_max, **_POSITIVE)

    def alpha(self, t: TimeLike) -> Tensor:
        return torch.ones_like(_t64(self, "alpha", t))

    def sigma(self, t: TimeLike) -> Tensor:
        return _t64(self, "sigma", t).clone()

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        return torch.exp(-_t64(self, "t_of_lam", lam, "lam"))

    def d_alpha(self, t: TimeLike) -> Tensor:
        return torch.zeros_like(_t64(self, "d_alpha", t))

    def d_sigma(self, t: TimeLike) -> Tensor:
        return torch.ones_like(_t64(self, "d_sigma", t))


class RectifiedFlow(Process):
    """Rectified flow / flow matching: ``alpha = 1 - t``, ``sigma = t``.

    The default range ``[1e-3, 0.999]`` keeps ``lam`` finite at both ends, as diffusers' flow
    DPM-Solver does (its first sigma is ``1 - 1/N``).
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999) -> None:
        self.t_min, self.t_max = ordered("RectifiedFlow", "t_min", t_min, "t_max", t_max, **_UNIT)

    def alpha(self, t: TimeLike) -> Tensor:
        return 1 - _t64(self, "alpha", t)

    def sigma(self, t: TimeLike) -> Tensor:
        return _t64(self, "sigma", t).clone()

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        return torch.sigmoid(-_t64(self, "t_of_lam", lam, "lam"))

    def d_alpha(self, t: TimeLike) -> Tensor:
        return -torch.ones_like(_t64(self, "d_alpha", t))

    def d_sigma(self, t: TimeLike) -> Tensor:
        return torch.ones_like(_t64(self, "d_sigma", t))


class MeanReverting(Process):
    r"""Mean-reverting diffusion (IR-SDE; Luo et al. 2023, "Image Restoration with Mean-Reverting
    Stochastic Differential Equations"): ``dx = theta_t (mu - x) dt + sigma_t dW`` towards the
    condition ``mu`` (the degraded input), with ``sigma_t^2 = 2 lambda^2 theta_t`` (their choice,
    which makes the stationary law ``N(mu, lambda^2 I)``).

    Its solution is ``x_t - mu = e^{-thetabar_t} (x_0 - mu) + lambda sqrt(1 - e^{-2 thetabar_t}) eps``,
    ``thetabar_t = int_0^t theta_s ds``: the process of ``y = x - mu`` is VP-like with

        alpha(t) = e^{-thetabar_t},   sigma(t) = lambda sqrt(1 - e^{-2 thetabar_t})

    (``alpha^2 + sigma^2 / lambda^2 = 1``), and this class *is* that process, so every solver
    samples ``y``; ``mu`` is added back by the user. The constructor gives ``theta_t = theta_min +
    (theta_max - theta_min) t`` on ``t in [t_min, 1]`` (constant for ``theta_min = theta_max``); with
    ``lambda = 1``, ``theta = beta / 2`` it is :meth:`VP.linear`. :meth:`discrete` and :meth:`cosine` give a
    model trained on integer steps (the released IR-SDE models). Usage::

        proc = sd.MeanReverting(theta_min=0.05, theta_max=10.0, stationary_std=0.2)
        den = proc.denoiser(net, mu, prediction="eps")     # net(x, t, mu=mu, **cond)
        y_T = proc.sigma(proc.t_max) * torch.randn_like(mu)  # x_T = mu + y_T
        x = mu + sd.sample(den, y_T, steps=20, solver="mrs")

    Everything follows from the schedule's :meth:`theta`, :meth:`theta_bar` and its inverse, which a
    subclass (:class:`MeanRevertingDiscrete`) redefines.

    Args:
        theta_min, theta_max: the mean-reversion rate at ``t = 0`` and ``t = 1``.
        stationary_std: ``lambda``, the stationary standard deviation.
        t_min: the clean end of sampling.
    """

    def __init__(
        self,
        theta_min: float = 0.05,
        theta_max: float = 10.0,
        stationary_std: float = 1.0,
        t_min: float = 1e-3,
    ) -> None:
        who = "MeanReverting"
        self.theta_min = real(who, "theta_min", theta_min, lo=0)
        self.theta_max = real(who, "theta_max", theta_max, **_POSITIVE)
        if not self.theta_min <= self.theta_max:
            raise ValueError(
                f"{who}: need theta_min <= theta_max, got theta_min={theta_min!r}, theta_max={theta_max!r}"
            )
        self.stationary_std = real(who, "stationary_std", stationary_std, **_POSITIVE)
        self.t_min, self.t_max = real(who, "t_min", t_min, **_UNIT), 1.0

    def theta(self, t: TimeLike) -> Tensor:
        """The mean-reversion rate ``theta_t``."""
        return self.theta_min + (self.theta_max - self.theta_min) * _t64(self, "theta", t)

    def theta_bar(self, t: TimeLike) -> Tensor:
        """``int_0^t theta_s ds``."""
        t = _t64(self, "theta_bar", t)
        return t * (self.theta_min + 0.5 * (self.theta_max - self.theta_min) * t)

    def _t_of_theta_bar(self, tb: Tensor) -> Tensor:
        """The inverse of :meth:`theta_bar` for ``tb >= 0`` (``tb = inf``: the limit): the quadratic's
        root ``2 tb / (a + sqrt(a^2 + c^2 tb))``, ``c^2 = 2 (theta_max - a)``, divided through by
        ``r = sqrt(tb)`` so that nothing overflows: ``2 r / (a / r + hypot(a / r, c))`` (``tb = 1e307``
        gave ``a^2 + c^2 tb = inf`` and so ``t = 0``)."""
        a, r = self.theta_min, tb.sqrt()
        t = 2 * r / (a / r + torch.hypot(a / r, torch.tensor(2 * (self.theta_max - a), dtype=F64).sqrt()))
        # thetabar = 0 (lam = inf, or e^{-2 lam} below float64's range) is t = 0, also where theta_min = 0
        # makes the quotient 0 / 0
        return torch.where(tb == 0, 0.0, t)

    def diffusion(self, t: TimeLike) -> Tensor:
        """The SDE's noise coefficient ``sigma_t = lambda sqrt(2 theta_t)`` (not :meth:`sigma`)."""
        return self.stationary_std * (2 * self.theta(_time(self, "diffusion", t))).sqrt()

    def alpha(self, t: TimeLike) -> Tensor:
        return torch.exp(-self.theta_bar(_time(self, "alpha", t)))

    def sigma(self, t: TimeLike) -> Tensor:
        return self.stationary_std * (-torch.expm1(-2 * self.theta_bar(_time(self, "sigma", t)))).sqrt()

    def lam(self, t: TimeLike) -> Tensor:
        tb = self.theta_bar(_time(self, "lam", t))
        return -tb - math.log(self.stationary_std) - 0.5 * torch.log(-torch.expm1(-2 * tb))

    def coefficients(self, t: TimeLike) -> tuple[Tensor, Tensor, Tensor]:
        t = _time(self, "coefficients", t)
        return self.alpha(t), self.sigma(t), self.lam(t)

    def t_of_lam(self, lam: TimeLike) -> Tensor:
        # e^{-2 lam} = lambda^2 (e^{2 thetabar} - 1), then the schedule's inverse of thetabar(t)
        u = _t64(self, "t_of_lam", lam, "lam") + math.log(self.stationary_std)
        return self._t_of_theta_bar(0.5 * torch.logaddexp(torch.zeros_like(u), -2 * u))

    def d_alpha(self, t: TimeLike) -> Tensor:
        t = _time(self, "d_alpha", t)
        return -self.theta(t) * self.alpha(t)

    def d_sigma(self, t: TimeLike) -> Tensor:
        # sigma^2 = lambda^2 (1 - alpha^2): sigma' = -lambda^2 alpha alpha' / sigma
        t = _time(self, "d_sigma", t)
        a = self.alpha(t)
        return self.stationary_std**2 * self.theta(t) * a * a / self.sigma(t)

    def denoiser(
        self,
        net: Callable[..., Tensor],
        mu: Tensor,
        prediction: str = "eps",
        shape: tuple[int, ...] | None = None,
    ) -> Denoiser:
        """The :class:`~steerdiff.denoiser.Denoiser` of ``y = x - mu`` for a net trained on ``x``.

        The net is called as ``net(x, t, mu=mu, **cond)`` with ``x = y + mu`` (it sees the state
        and the condition). ``mu``: finite, one for all samples, or one per sample (``(batch, *shape)``, at
        least 2-d; pass ``shape`` where a shared ``mu``'s first dimension may equal the batch), which particle
        methods repeat for each row's particles (:meth:`~steerdiff.denoiser.Denoiser.take_rows`); a ``mu``
        that does not broadcast to the samples without changing their shape, or a sampler condition named
        ``mu`` besides it, is a ``ValueError`` at the first call.
        ``prediction``: ``"eps"`` (the noise, the same for ``x`` and ``y``),
        ``"x0"`` (the clean ``x_0``; ``y_0 = x_0 - mu``), ``"v"`` (MRS's velocity
        ``v = lambda alpha eps - (sigma / lambda) (x_0 - mu)``, ``lambda`` times the usual ``v`` of
        ``y / lambda``),
        or ``"score"`` (``grad_x log p_t``).
        """
        from .denoiser import MeanRevertingDenoiser

        return MeanRevertingDenoiser(net, self, mu, prediction, shape)

    @staticmethod
    def discrete(theta_bar: TimeLike, stationary_std: float = 1.0) -> MeanRevertingDiscrete:
        """A model trained on integer steps: ``theta_bar`` is ``thetabar`` at the steps ``0, ..., N-1``
        (1-d, finite, ``>= 0``, strictly increasing, at least two values ``> 0``); see
        :class:`MeanRevertingDiscrete`. From the IR-SDE code's ``sde``: ``theta_bar=sde.thetas_cumsum *
        sde.dt, stationary_std=sde.max_sigma`` (any of its schedules)."""
        return MeanRevertingDiscrete(theta_bar, stationary_std)

    @staticmethod
    def cosine(
        num_train_timesteps: int = 100, eps: float = 0.005, stationary_std: float = 1.0, s: float = 0.008
    ) -> MeanRevertingDiscrete:
        """The released IR-SDE models' ``cosine`` theta schedule on ``T = num_train_timesteps`` steps (Luo
        et al. 2023; their code's ``IRSDE(max_sigma, T, schedule="cosine", eps)``), a :meth:`discrete`
        process.

        With ``f(u) = cos((u + s) / (1 + s) pi / 2)^2``, ``a_j = f(j / (T + 2)) / f(0)`` for ``j = 0, ...,
        T + 2``, the per-step rates are ``theta_i = 1 - a_{i+1}`` (a flipped cosine ``alphas_cumprod``) and

            thetabar_i = c sum_{j=1}^{i} theta_j,   c = -log(eps) / sum_{j=1}^{T} theta_j,   i = 0, ..., T,

        so ``thetabar_0 = 0`` (the clean image, where the net is never called) and ``e^{-thetabar_T} = eps``:
        the net sees steps ``1, ..., T`` (``t_min = 1``). ``stationary_std``: their ``max_sigma / 255`` for
        images in ``[0, 1]`` (e.g. 10 / 255 for deraining). Their code forms the table in float32; this one
        is float64: at ``T = 100``, ``eps = 0.005`` their ``thetabar`` is up to 3.3e-5 (relative) off it at
        the first steps (float32's ``1 - a_j`` where ``a_j ~ 1``), their ``sigma`` 6.8e-6.

        Accepted: an integer ``num_train_timesteps >= 2``, ``0 < eps < 1``, finite ``stationary_std > 0``,
        finite ``s >= 0``."""
        who = "MeanReverting.cosine"
        n = integer(who, "num_train_timesteps", num_train_timesteps, lo=2)
        eps = real(who, "eps", eps, **_UNIT)
        s = real(who, "s", s, lo=0)
        u = torch.arange(n + 3, dtype=F64) / (n + 2)
        a = torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2
        rates = 1 - a[2:-1] / a[0]  # theta_1, ..., theta_T
        cum = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(rates, 0)])
        return MeanRevertingDiscrete(cum * (-math.log(eps) / float(cum[-1])), stationary_std)

    def __repr__(self) -> str:
        return (
            f"MeanReverting(theta_min={self.theta_min:g}, theta_max={self.theta_max:g}, "
            f"stationary_std={self.stationary_std:g})"
        )


class MeanRevertingDiscrete(MeanReverting):
    r"""Mean-reverting process of a model trained on integer steps (the released IR-SDE models): ``thetabar``
    given at the steps ``0, ..., N-1``. Process time *is* the step index, passed to the net unchanged, a float
    in ``[t_min, N-1]``: ``t_min = 1`` where ``thetabar_0 = 0`` (step 0 is the clean ``x_0``: ``sigma = 0``,
    ``lam = inf``; IR-SDE trains and samples on steps ``1, ..., T``), else 0.

    Between integers ``thetabar`` is linear in ``t``: ``theta`` is constant on each step, ``theta_t =
    thetabar_i - thetabar_{i-1}`` on ``(i-1, i)``, which is the rate IR-SDE's own Euler-Maruyama step from
    ``i`` to ``i - 1`` uses (``thetas[i] * dt``), and ``diffusion = lambda sqrt(2 theta_t)`` its noise per
    unit step. ``lam`` is then strictly decreasing in ``t`` and :meth:`t_of_lam` its exact inverse:
    ``thetabar`` from ``lam`` in closed form, then the table inverted piecewise linearly. Outside ``[0, N-1]``
    times are clamped to it (``t_of_lam(inf) = 0``, ``t_of_lam(-inf) = N-1``), as for :meth:`VP.discrete`;
    at an integer :meth:`theta` is that of the step above it (the one below at ``N-1``).
    """

    def __init__(self, theta_bar: TimeLike, stationary_std: float = 1.0) -> None:
        who = "MeanReverting.discrete"
        tb = real_array(who, "theta_bar", theta_bar)
        if not (
            bool(torch.isfinite(tb).all())
            and float(tb[0]) >= 0
            and bool((tb[1:] > tb[:-1]).all())
            and int((tb > 0).sum()) >= 2
        ):
            raise ValueError(
                f"{who}: theta_bar must be finite, >= 0, strictly increasing and have at least 2 values > 0, "
                f"got {tb.numel()} values from {float(tb[0]):g} to {float(tb[-1]):g}"
            )
        self.stationary_std = real(who, "stationary_std", stationary_std, **_POSITIVE)
        self.theta_bars = tb
        # -thetabar, decreasing, for _interpolate / _inverse (as VP.discrete's lam); copied once per device
        self._down_on: dict[torch.device, Tensor] = {tb.device: -tb}
        self.t_min = 1.0 if float(tb[0]) == 0 else 0.0
        self.t_max = float(tb.numel() - 1)

    def _down(self, like: Tensor) -> Tensor:
        return kept(self._down_on, like.device, lambda: -self.theta_bars.to(like.device))

    def theta(self, t: TimeLike) -> Tensor:
        """The mean-reversion rate per step: ``thetabar_{i+1} - thetabar_i`` on ``[i, i+1)``."""
        t = _t64(self, "theta", t)
        return -_slope(self._down(t), t)

    def theta_bar(self, t: TimeLike) -> Tensor:
        """``thetabar`` at the steps, linear between them."""
        t = _t64(self, "theta_bar", t)
        return -_interpolate(self._down(t), t)

    def _t_of_theta_bar(self, tb: Tensor) -> Tensor:
        return _inverse(self._down(tb), -tb)

    def __repr__(self) -> str:
        return f"MeanReverting.discrete(N={self.theta_bars.numel()}, stationary_std={self.stationary_std:g})"
