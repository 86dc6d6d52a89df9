r"""The forward processes of discrete diffusion, absorbing ("masked") and uniform noise, on one set of
schedules.

Masked
------

Each token of a clean sequence ``x_0`` is kept with probability ``alpha(t)`` and replaced by the mask
token ``m`` otherwise, independently across positions (Austin et al. 2021, "Structured Denoising
Diffusion Models in Discrete State-Spaces", the absorbing-state D3PM; Sahoo et al. 2024, "Simple and
Effective Masked Diffusion Language Models" (MDLM); Shi et al. 2024, "Simplified and Generalized
Masked Diffusion for Discrete Data" (MD4)):

    q(x_t^i | x_0^i) = alpha(t) [x_t^i = x_0^i] + (1 - alpha(t)) [x_t^i = m],   t in [0, 1],

with ``alpha`` decreasing from ``alpha(0) = 1``. For ``s < t`` the reverse posterior of a masked token is

    q(x_s^i | x_t^i = m, x_0^i) = (alpha_s - alpha_t) / (1 - alpha_t) [x_s^i = x_0^i]
                                  + (1 - alpha_s) / (1 - alpha_t) [x_s^i = m],

and an unmasked token stays. Since masking does not look at the values, ``x_0`` given the all-masked
sequence is distributed as the data whatever ``alpha(1)``: sampling starts there.

Token ids: the network's logits cover ``vocab_size`` ids ``0..vocab_size - 1``. The mask id is either
one of them (``mask_id < vocab_size``: a tokenizer with a ``[MASK]`` token, or MDLM's vocabulary with
the mask appended, whose logit the denoiser sets to ``-inf``) or the id after them (``mask_id ==
vocab_size``, the default: the logits cover the clean tokens only). The clean tokens are the ids in
``0..vocab_size - 1`` other than ``mask_id``.

Uniform
-------
Each token is kept with probability ``alpha(t)`` and replaced by a uniformly random token otherwise
(Austin et al. 2021, D3PM's uniform transition; Lou et al. 2024, "Discrete Diffusion Modeling by
Estimating the Ratios of the Data Distribution" (SEDD), its uniform graph with total noise ``sigma(t) =
-log alpha(t)``):

    q(x_t^i | x_0^i) = alpha(t) [x_t^i = x_0^i] + (1 - alpha(t)) / V,

and from ``s`` to ``t > s`` the same with ``alpha_{t|s} = alpha_t / alpha_s``. The reverse posterior of
a token (Bayes' rule on the two kernels, D3PM's eq. 3) is

    q(x_s^i = k | x_t^i = j, x_0^i = v) = q(j | k; alpha_{t|s}) q(k | v; alpha_s) / q(j | v; alpha_t).

At ``alpha(1) = 0`` (``linear``, ``cosine``) ``x_1`` is uniform whatever ``x_0``: sampling starts
from uniform tokens (exact there; at ``alpha(1) > 0`` an approximation, as in SEDD).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import choice, integer, ordered, real
from ..noise import Generators, rand

__all__ = ["SCHEDULES", "MaskedProcess", "Schedule", "UniformProcess", "uniform_tokens"]

SCHEDULES = ("linear", "cosine", "loglinear", "geometric")


class Schedule:
    r"""``alpha(t)``, the probability that a token is still clean at time ``t`` in ``[0, 1]``: what the
    discrete processes share (:class:`MaskedProcess`, :class:`UniformProcess`).

    Schedules:

    * ``"linear"``: ``1 - t`` (MDLM, MD4).
    * ``"cosine"``: ``1 - sin(pi t / 2)``, MaskGIT's (Chang et al. 2022: the fraction ``cos(pi r / 2)``
      masked at decoding progress ``r = 1 - t``) and MD4's cosine, which unmasks few tokens in the first
      steps. The schedule sets the ``alpha`` of ``ancestral``'s time-uniform grid; of ``first_hitting``
      only the network's times.
    * ``"loglinear"``: ``1 - (1 - eps) t``, MDLM's log-linear noise (total noise ``-log(1 - (1 - eps) t)``,
      after Lou et al. 2024's SEDD); ``alpha(1) = eps`` (default ``1e-3``).
    * ``"geometric"``: ``exp(-sigma_min^{1 - t} sigma_max^t)``, a total noise geometric in ``t`` (Lou et al.
      2024's geometric noise); ``alpha(0) = exp(-sigma_min)``, ``alpha(1) = exp(-sigma_max)`` (defaults
      ``1e-3`` and ``20``).

    Args (of the processes):
        schedule: one of :data:`SCHEDULES`.
        eps: ``loglinear``'s ``alpha(1)``, in ``(0, 1)``.
        sigma_min, sigma_max: ``geometric``'s total noise at ``t = 0`` and ``1``,
            ``0 < sigma_min < sigma_max``.
    """

    def __init__(self, who: str, schedule: str, eps: float, sigma_min: float, sigma_max: float) -> None:
        self.schedule = choice(who, "schedule", schedule, SCHEDULES)
        self.eps = real(who, "eps", eps, lo=0, hi=1, lo_open=True, hi_open=True)
        self.sigma_min, self.sigma_max = ordered(
            who, "sigma_min", sigma_min, "sigma_max", sigma_max, lo=0, lo_open=True
        )

    def alpha(self, t: Tensor) -> Tensor:
        """``alpha(t)``, the probability that a token is still clean at time ``t`` (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.schedule == "linear":
            return 1 - t
        if self.schedule == "cosine":
            return 1 - torch.sin(0.5 * math.pi * t)
        if self.schedule == "loglinear":
            return 1 - (1 - self.eps) * t
        return torch.exp(-(self.sigma_min ** (1 - t)) * self.sigma_max**t)

    def t_of_alpha(self, alpha: Tensor) -> Tensor:
        """The time at which ``alpha(t) = alpha`` (float64), the inverse of :meth:`alpha`, clamped to
        ``[0, 1]`` where ``alpha`` lies outside the schedule's range."""
        a = torch.as_tensor(alpha, dtype=torch.float64)
        if self.schedule == "linear":
            t = 1 - a
        elif self.schedule == "cosine":
            t = torch.asin((1 - a).clamp(-1, 1)) * (2 / math.pi)
        elif self.schedule == "loglinear":
            t = (1 - a) / (1 - self.eps)
        else:
            t = torch.log(-torch.log(a) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return t.nan_to_num(0.0).clamp(0, 1)

    def total_noise(self, t: Tensor) -> Tensor:
        """``-log alpha(t)``, MDLM's / SEDD's "total noise" ``sigma(t)``, the time input of their networks
        (float64)."""
        return -torch.log(self.alpha(t))

    vocab_size: int  # the processes' token ids, 0..vocab_size - 1

    def _noise_args(self, x0: Tensor, t: float | Tensor, generator: Generators) -> tuple[Tensor, Tensor]:
        """``(alpha, u)`` of a draw of ``x_t`` from ``x0`` ``(batch, length)``: ``alpha(t)`` shaped to
        broadcast over ``x0`` (``t`` a number or one per row, in ``[0, 1]``) and uniforms like ``x0`` drawn
        as :func:`steerdiff.noise.rand` draws. A ``ValueError`` for ``x0`` not a batch of integer clean ids
        (``0..vocab_size - 1``, a masked process's ``mask_id`` not among them) or a bad ``t``."""
        who = f"{type(self).__name__}.noise"
        if not isinstance(x0, Tensor) or x0.dtype == torch.bool or x0.is_floating_point() or x0.is_complex():
            got = x0.dtype if isinstance(x0, Tensor) else type(x0).__name__
            raise ValueError(f"{who}: x0 must hold integer token ids (e.g. torch.long), got {got}")
        if x0.ndim != 2 or 0 in x0.shape:
            raise ValueError(
                f"{who}: x0 must be a batch of sequences, shape (batch, length) with both >= 1; got "
                f"{tuple(x0.shape)}"
            )
        mask_id = getattr(self, "mask_id", self.vocab_size)
        top = max(mask_id, self.vocab_size - 1) if hasattr(self, "mask_id") else self.vocab_size - 1
        if torch.iinfo(x0.dtype).max < top:
            raise ValueError(
                f"{who}: x0 must have an integer dtype that holds the ids up to {top} (e.g. torch.long), got "
                f"{x0.dtype}"
            )
        clean = (x0 >= 0) & (x0 < self.vocab_size) & (x0 != mask_id)
        if not bool(clean.all()):
            b, i = (int(j) for j in torch.nonzero(~clean)[0])
            other = f" other than the mask id {mask_id}" if mask_id < self.vocab_size else ""
            raise ValueError(
                f"{who}: x0 must hold clean ids in [0, {self.vocab_size - 1}]{other}, got {int(x0[b, i])} at "
                f"[{b}, {i}]"
            )
        t = torch.as_tensor(t, dtype=torch.float64)
        if (
            t.ndim > 1
            or (t.ndim == 1 and len(t) not in (1, len(x0)))
            or not bool(((t >= 0) & (t <= 1)).all())
        ):
            raise ValueError(
                f"{who}: t must be a time in [0, 1] or one per row of x0 ({len(x0)} "
                f"rows), got {t.tolist() if t.numel() < 8 else f'shape {tuple(t.shape)}'}"
            )
        alpha = self.alpha(t).to(x0.device)
        u = rand(x0.shape, generator, torch.float64, x0.device)
        return (alpha.reshape(-1, *[1] * (x0.ndim - 1)) if alpha.ndim else alpha), u

    def _extra(self) -> str:
        """The schedule's own parameters for ``repr``."""
        return {
            "loglinear": f", eps={self.eps:g}",
            "geometric": f", sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}",
        }.get(self.schedule, "")


class MaskedProcess(Schedule):
    r"""The absorbing process ``x_t``: each token kept with probability ``alpha(t)``, masked otherwise
    (schedules: :class:`Schedule`).

    Args:
        vocab_size: the ids the network's logits cover, an integer >= 1 (>= 2 with ``mask_id`` among them).
        mask_id: the mask token, an integer in ``[0, vocab_size]``; default ``vocab_size``.
        schedule, eps, sigma_min, sigma_max: the schedule (:class:`Schedule`).
    """

    def __init__(
        self,
        vocab_size: int,
        mask_id: int | None = None,
        schedule: str = "linear",
        *,
        eps: float = 1e-3,
        sigma_min: float = 1e-3,
        sigma_max: float = 20.0,
    ) -> None:
        who = "MaskedProcess"
        self.vocab_size = integer(who, "vocab_size", vocab_size, lo=1)
        self.mask_id = (
            self.vocab_size if mask_id is None else integer(who, "mask_id", mask_id, lo=0, hi=self.vocab_size)
        )
        if self.mask_id < self.vocab_size == 1:
            raise ValueError(
                f"{who}: vocab_size=1 with mask_id=0 leaves no clean token; the logits must cover at least "
                "one id other than the mask"
            )
        super().__init__(who, schedule, eps, sigma_min, sigma_max)

    @property
    def num_clean(self) -> int:
        """The number of clean token values: ``vocab_size``, less one where the mask is among the ids."""
        return self.vocab_size - (self.mask_id < self.vocab_size)

    def noise(self, x0: Tensor, t: float | Tensor, generator: Generators = None) -> Tensor:
        """A draw of ``x_t ~ q(x_t | x_0)``: each token of ``x0`` (batched, ``(batch, length)``) replaced
        by :attr:`mask_id` with probability ``1 - alpha(t)``; ``t`` a number or one time per row, in ``[0,
        1]``; a ``ValueError`` for another ``t``, or an ``x0`` that is no batch of integer clean ids (in a
        dtype that holds ``mask_id``). The uniforms are drawn as :func:`steerdiff.noise.rand` draws (one
        generator per row where a list)."""
        alpha, u = self._noise_args(x0, t, generator)
        return torch.where(u < alpha, x0, torch.full_like(x0, self.mask_id))

    def __repr__(self) -> str:
        return (
            f"MaskedProcess(vocab_size={self.vocab_size}, mask_id={self.mask_id}, "
            f"schedule={self.schedule!r}{self._extra()})"
        )


class UniformProcess(Schedule):
    r"""The uniform-noise process ``x_t``: each token kept with probability ``alpha(t)``, replaced by a
    uniformly random one of the ``vocab_size`` tokens otherwise (module docstring; schedules:
    :class:`Schedule`). No mask: every id ``0..vocab_size - 1`` is a token.

    Args:
        vocab_size: the number of tokens ``V``, an integer >= 2.
        schedule, eps, sigma_min, sigma_max: the schedule (:class:`Schedule`).
    """

    def __init__(
        self,
        vocab_size: int,
        schedule: str = "linear",
        *,
        eps: float = 1e-3,
        sigma_min: float = 1e-3,
        sigma_max: float = 20.0,
    ) -> None:
        who = "UniformProcess"
        self.vocab_size = integer(who, "vocab_size", vocab_size, lo=2)
        super().__init__(who, schedule, eps, sigma_min, sigma_max)

    def transition(self, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """``(q(same), q(other))`` of the kernel ``alpha [j = v] + (1 - alpha) / V`` (float64, shaped as
        ``alpha``): the probability that a token is the one it was, and that it is a given other one."""
        other = (1 - alpha) / self.vocab_size
        return alpha + other, other

    def noise(self, x0: Tensor, t: float | Tensor, generator: Generators = None) -> Tensor:
        """A draw of ``x_t ~ q(x_t | x_0)``: each token of ``x0`` (``(batch, length)``, ids in ``0..V -
        1``) kept with probability ``alpha(t)`` and replaced by a uniform token otherwise; ``t`` a number
        or one time per row, in ``[0, 1]``; a ``ValueError`` for another ``t``, or an ``x0`` that is no
        batch of integer ids in ``0..V - 1``. Two uniforms per token, drawn as
        :func:`steerdiff.noise.rand` draws (one generator per row where a list)."""
        alpha, u = self._noise_args(x0, t, generator)
        fresh = uniform_tokens(x0.shape, self.vocab_size, generator, x0.device).to(x0.dtype)
        return torch.where(u < alpha, x0, fresh)

    def reverse_log_probs(self, x_t: Tensor, log_p0: Tensor, alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
        r"""``log p(x_s^i = k | x_t)``, float64 ``(batch, length, V)``: the posterior ``q(x_s | x_t, x_0)``
        (module docstring) of every token averaged over ``p(x_0^i = v | x_t) = exp(log_p0)`` (D3PM's
        ``x_0``-parameterized reverse step, Austin et al. 2021, eq. 4; SEDD's Tweedie tau-leaping step with
        an exact denoiser, Lou et al. 2024, Sec. 4.2):

            p(x_s^i = k | x_t) = q(j | k; alpha_t / alpha_s) (alpha_s c_k + (1 - alpha_s) / V sum_v c_v),
            c_v = p(x_0^i = v | x_t) / q(j | v; alpha_t),   j = x_t^i,

        with ``alpha_t`` and ``alpha_s >= alpha_t`` one per row (``(batch,)``, ``alpha_s > 0``). At
        ``alpha_s = 1`` it is ``p(x_0 | x_t)`` itself."""
        a_t, a_s = alpha_t[:, None, None], alpha_s[:, None, None]
        j = torch.nn.functional.one_hot(x_t.long(), self.vocab_size).to(torch.bool)
        same_t, other_t = self.transition(a_t)
        c = log_p0 - torch.log(torch.where(j, same_t, other_t))  # log c_v
        mixed = torch.logaddexp(
            torch.log(a_s) + c, torch.log1p(-a_s) - math.log(self.vocab_size) + c.logsumexp(-1, keepdim=True)
        )
        same_ts, other_ts = self.transition(a_t / a_s)
        return torch.log(torch.where(j, same_ts, other_ts)) + mixed

    def __repr__(self) -> str:
        return f"UniformProcess(vocab_size={self.vocab_size}, schedule={self.schedule!r}{self._extra()})"


def uniform_tokens(
    shape: tuple[int, ...] | torch.Size, vocab_size: int, generator: Generators, device: torch.device
) -> Tensor:
    """Uniform token ids in ``0..vocab_size - 1``, int64 of ``shape``, ``floor(V u)`` of uniforms drawn as
    :func:`steerdiff.noise.rand` draws."""
    u = rand(shape, generator, torch.float64, device)
    return (u * vocab_size).long().clamp(max=vocab_size - 1)
