r"""Classifier-free guidance of masked diffusion, as a denoiser.

Schiff et al. 2025, "Simple Guidance Mechanisms for Discrete Diffusion Models", discrete classifier-free
guidance: the conditional and unconditional models' distributions are combined geometrically with the
guidance scale ``w`` and normalized per position,

    p_w(x_0^i = v | x_t, y)  ∝  p(x_0^i = v | x_t, y)^w  p(x_0^i = v | x_t)^{1 - w},

in log space: ``log_softmax_v(w log p_c + (1 - w) log p_u)``. ``w = 1`` is the conditional denoiser,
``w = 0`` the unconditional one, ``w > 1`` guidance. Unmasked positions carry over (both give their
token).

Schiff et al. combine the reverse *transitions* ``p(x_s^i | x_t)``, whose entry "stays masked" is the same
``(1 - alpha_s) / (1 - alpha_t)`` for both models (as we reconstruct their equations). Given that the
token unmasks, that law of its value is the one above; it differs in the chance of unmasking, which
becomes ``c Z / ((1 - c) + c Z)`` with ``c = (alpha_s - alpha_t) / (1 - alpha_t)`` and ``Z = sum_v p_c^w
p_u^{1-w} = exp((w - 1) D_w(p_c || p_u))`` (a Renyi divergence: ``Z >= 1`` for ``w > 1``, so tokens
unmask faster than under the process, the imbalance Rojas et al. 2025, "Improving Classifier-Free
Guidance in Masked Diffusion", point out). Here the guidance acts on
``x_0``'s law only, so the process keeps its unmasking times and every sampler (``ancestral``,
``first_hitting``, ``remdm``) takes it as a denoiser.

What it samples: at ``w = 1`` the conditional model's law (exact with ``first_hitting`` and an exact
conditional denoiser); for ``w != 1`` not the sequence-level ``p(x | y)^w p(x)^{1-w}`` -- the
geometric mixture is taken per position and per step, and the law depends on the sampler
(tests/test_discrete_guidance.py measures both on an exact oracle).

Support: a token either model gives probability 0 gets 0 (for ``w > 1`` the formula would give a token the
unconditional model rules out infinite weight; its support is kept as a constraint). Where the two leave
no common token at a masked position the call raises :class:`~steerdiff.NonFiniteError`.

NFE: ``cost`` is the network evaluations of the latest call, the sum of the branches' costs: 2 per
guided call, 1 at ``w = 1`` (the conditional branch only) and ``w = 0`` (the unconditional only).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from .._checks import real
from ..denoiser import override_kwargs, take_wrapped_rows
from ..guidance.cfg import same_branch
from ..solvers.base import NonFiniteError
from .denoiser import MaskedDenoiser
from .guided import Guided, check_masked

__all__ = ["CFG"]

log = logging.getLogger(__name__)


def _branch(name: str, den: MaskedDenoiser, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
    """``den.log_probs``, a NaN / ``+inf`` of its net named as the ``name`` branch's."""
    try:
        return den.log_probs(x_t, t, **cond)
    except NonFiniteError as e:
        raise NonFiniteError(f"CFG's {name} branch: {e}") from e


class CFG(Guided):
    """Discrete classifier-free guidance (Schiff et al. 2025; module docstring).

    Args:
        cond: the conditional :class:`~steerdiff.discrete.MaskedDenoiser`, called with the sampler's
            ``**cond`` keyword arguments.
        uncond: the unconditional one (the same process); may be ``cond`` itself.
        scale: ``w >= 0``: 1 is the conditional denoiser, 0 the unconditional one, > 1 guidance.
        uncond_kwargs: keyword arguments that override ``**cond`` for the unconditional call, as for
            :class:`steerdiff.guidance.CFG`: one net with a null label is ``CFG(den, den, 3.0,
            uncond_kwargs={"y": null})``, sampled as ``sd.discrete.sample(guided, x_T, y=labels)``. A
            tensor that overrides a per-sample condition must have one row per sample, or one for all.

    ``cost``: 2 per guided call, 1 at ``w`` = 0 or 1 (module docstring). ``CFG(den, den, w)`` without
    ``uncond_kwargs`` evaluates one call twice (the conditional prediction at twice the NFE): for ``w`` not
    0 or 1 it logs a warning (module :mod:`logging`, once, when made).
    """

    base_arg = "cond"

    def __init__(
        self,
        cond: MaskedDenoiser,
        uncond: MaskedDenoiser,
        scale: float,
        *,
        uncond_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cond)
        self.uncond = check_masked("CFG", "uncond", uncond, cond.process)
        if uncond_kwargs is not None and not isinstance(uncond_kwargs, dict):
            raise ValueError(f"CFG: uncond_kwargs must be a dict or None, got {type(uncond_kwargs).__name__}")
        self.uncond_kwargs = dict(uncond_kwargs or {})
        self.scale = real("CFG", "scale", scale, lo=0)
        if self.scale == 1:
            self.cost = cond.cost
        elif self.scale == 0:
            self.cost = uncond.cost
        else:
            self.cost = cond.cost + uncond.cost
            if message := same_branch("CFG", cond, uncond, self.uncond_kwargs):
                log.warning(message)

    def log_probs(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The guided ``log p_w(x_0 | x_t, y)``, float64 ``(batch, length, vocab_size)``."""
        if self.scale == 1:
            out = _branch("conditional", self.base, x_t, t, cond)
            self.cost = self.base.cost
            return out
        ukw = override_kwargs("CFG", "uncond_kwargs", cond, self.uncond_kwargs, x_t.shape[0])
        if self.scale == 0:
            out = _branch("unconditional", self.uncond, x_t, t, ukw)
            self.cost = self.uncond.cost
            return out
        lc = _branch("conditional", self.base, x_t, t, cond)
        cost = self.base.cost  # read now: cond and uncond may be one denoiser whose cost varies
        lu = _branch("unconditional", self.uncond, x_t, t, ukw)
        self.cost = cost + self.uncond.cost
        both = torch.isfinite(lc) & torch.isfinite(lu)
        mixed = torch.lerp(torch.where(both, lu, 0.0), torch.where(both, lc, 0.0), self.scale)
        out = torch.log_softmax(torch.where(both, mixed, -torch.inf), dim=-1)
        if bool(torch.isnan(out).any()):
            b, i = (int(j) for j in torch.nonzero(torch.isnan(out).any(-1))[0])
            raise NonFiniteError(
                f"CFG: at the masked position [{b}, {i}] the conditional and unconditional denoisers give no "
                "clean token positive probability together"
            )
        return out

    def take_rows(self, rows: Tensor | slice, n: int) -> MaskedDenoiser:
        """A copy with the tensors of ``n`` rows in ``uncond_kwargs`` taken at ``rows``, around the
        branches' ``take_rows``; itself where nothing changes."""
        return take_wrapped_rows(self, rows, n, ("base", "uncond"), ("uncond_kwargs",))

    def __repr__(self) -> str:
        return f"CFG({self.base!r}, {self.uncond!r}, scale={self.scale:g})"
