r"""The absorbing ("masked") forward process of masked diffusion models.

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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import choice, integer, ordered, real
from ..noise import Generators, rand

__all__ = ["SCHEDULES", "MaskedProcess"]

SCHEDULES = ("linear", "cosine", "loglinear", "geometric")


class MaskedProcess:
    r"""The absorbing process ``x_t``: each token kept with probability ``alpha(t)``, masked otherwise.

    Schedules (``alpha(t)`` for ``t`` in ``[0, 1]``):

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

    Args:
        vocab_size: the ids the network's logits cover, an integer >= 1 (>= 2 with ``mask_id`` among them).
        mask_id: the mask token, an integer in ``[0, vocab_size]``; default ``vocab_size``.
        schedule: one of :data:`SCHEDULES`.
        eps: ``loglinear``'s ``alpha(1)``, in ``(0, 1)``.
        sigma_min, sigma_max: ``geometric``'s total noise at ``t = 0`` and ``1``,
            ``0 < sigma_min < sigma_max``.
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
        self.schedule = choice(who, "schedule", schedule, SCHEDULES)
        self.eps = real(who, "eps", eps, lo=0, hi=1, lo_open=True, hi_open=True)
        self.sigma_min, self.sigma_max = ordered(
            who, "sigma_min", sigma_min, "sigma_max", sigma_max, lo=0, lo_open=True
        )

    @property
    def num_clean(self) -> int:
        """The number of clean token values: ``vocab_size``, less one where the mask is among the ids."""
        return self.vocab_size - (self.mask_id < self.vocab_size)

    def alpha(self, t: Tensor) -> Tensor:
        """``alpha(t)``, the probability that a token is still unmasked at time ``t`` (float64)."""
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
        """``-log alpha(t)``, MDLM's "total noise" ``sigma(t)``, the time input of its networks (float64)."""
        return -torch.log(self.alpha(t))

    def noise(self, x0: Tensor, t: float | Tensor, generator: Generators = None) -> Tensor:
        """A draw of ``x_t ~ q(x_t | x_0)``: each token of ``x0`` (batched, ``(batch, length)``) replaced
        by :attr:`mask_id` with probability ``1 - alpha(t)``; ``t`` a number or one time per row, in ``[0,
        1]`` (else a ``ValueError``). The uniforms are drawn as :func:`steerdiff.noise.rand` draws (one
        generator per row where a list)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if (
            t.ndim > 1
            or (t.ndim == 1 and len(t) not in (1, len(x0)))
            or not bool(((t >= 0) & (t <= 1)).all())
        ):
            raise ValueError(
                f"MaskedProcess.noise: t must be a time in [0, 1] or one per row of x0 ({len(x0)} rows), got "
                f"{t.tolist() if t.numel() < 8 else f'shape {tuple(t.shape)}'}"
            )
        alpha = self.alpha(t).to(x0.device)
        u = rand(x0.shape, generator, torch.float64, x0.device)
        keep = u < (alpha.reshape(-1, *[1] * (x0.ndim - 1)) if alpha.ndim else alpha)
        return torch.where(keep, x0, torch.full_like(x0, self.mask_id))

    def __repr__(self) -> str:
        extra = {
            "loglinear": f", eps={self.eps:g}",
            "geometric": f", sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}",
        }
        return (
            f"MaskedProcess(vocab_size={self.vocab_size}, mask_id={self.mask_id}, "
            f"schedule={self.schedule!r}{extra.get(self.schedule, '')})"
        )
