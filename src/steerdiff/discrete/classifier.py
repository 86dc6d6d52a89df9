r"""Classifier guidance of masked diffusion, as a denoiser.

Schiff et al. 2025, "Simple Guidance Mechanisms for Discrete Diffusion Models", discrete classifier-based
guidance in its first-order (per-position) form: with a classifier ``log p(y | x)`` over partly masked
sequences, a masked position's clean token is drawn from

    p_gamma(x_0^i = v | x_t, y)  ∝  p(x_0^i = v | x_t)  p(y | x_t^{i <- v})^gamma,

``x_t^{i <- v}`` the sequence ``x_t`` with position ``i`` set to ``v`` (the other masked positions stay
masked); ``gamma`` the guidance scale. It is Bayes' rule, so with the exact denoiser and the exact
classifier ``p(y | x_t)`` (which sees only the unmasked tokens: masking does not look at the values) and
``gamma = 1`` it is the exact conditional ``p(x_0^i | x_t, y)``, its normalizer ``p(y | x_t)``:
``first_hitting`` with one token per step then samples ``p(x_0 | y)`` exactly, and ``ancestral`` with the
bias of the tokens it unmasks together (tests/test_discrete_guidance.py checks both on an exact oracle).

Schiff et al. weigh the reverse transition ``p(x_s^i | x_t)`` by ``p(y | x_s)^gamma``, the entry "stays
masked" by ``p(y | x_t)^gamma`` (as we reconstruct their equations). Given that the token unmasks, its
value's law is the one above; at ``gamma = 1`` with an exact classifier the chance of unmasking is the
process's too (the normalizer is ``p(y | x_t)``), for ``gamma != 1`` theirs changes it. Here the
guidance acts on ``x_0``'s law only, so every sampler takes it as a denoiser.

Cost: the classifier is evaluated on every candidate ``x_t^{i <- v}`` whose token ``v`` has a positive
probability under the denoiser (the others are never drawn, and may be sequences of probability zero, on
which a classifier is undefined): up to ``C`` sequences (``C`` clean tokens) per masked position, up to
``batch x length x C`` per sampler step, called in batches of ``batch_size`` sequences (all in one call
by default). These are not network evaluations of the diffusion model: ``cost`` (and so
``SampleInfo.nfe``) is the denoiser's. Only differences of ``log p(y | .)``
between a position's candidates matter, so ``log_prob_y`` may be any log-potential (a reward: the
guided law is then the denoiser's tilted by ``exp(gamma r)`` one token at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import integer, real
from ..solvers.base import NonFiniteError
from .denoiser import MaskedDenoiser
from .guided import Guided

__all__ = ["ClassifierGuidance"]


class ClassifierGuidance(Guided):
    """Discrete classifier guidance (Schiff et al. 2025; module docstring).

    Args:
        den: the :class:`~steerdiff.discrete.MaskedDenoiser` (called with the sampler's ``**cond``).
        log_prob_y: ``log_prob_y(x, t) -> (n,)``: ``log p(y | x)`` of ``n`` partly masked sequences ``x``
            ``(n, length)`` (``x_t``'s dtype, the mask id where masked) at their process times ``t``
            (float64 ``(n,)``, those of the rows they come from); the label ``y`` is bound in it (e.g.
            :meth:`steerdiff.toy.CategoricalMixture.classifier`). A floating tensor of shape ``(n,)``;
            ``-inf`` rules a candidate out, NaN / ``+inf`` raise :class:`~steerdiff.NonFiniteError`.
            Called only on the candidates whose token has a positive probability under ``den``.
        scale: ``gamma >= 0``; 1 is Bayes' rule (exact with exact parts), 0 the denoiser alone.
        batch_size: the most candidate sequences per ``log_prob_y`` call, an integer >= 1; ``None``: all
            of a step's in one call.

    ``cost`` is ``den``'s.
    """

    base_arg = "den"

    def __init__(
        self,
        den: MaskedDenoiser,
        log_prob_y: Callable[[Tensor, Tensor], Tensor],
        scale: float = 1.0,
        *,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(den)
        if not callable(log_prob_y):
            raise ValueError(
                "ClassifierGuidance: log_prob_y must be callable (x, t) -> (n,), got "
                f"{type(log_prob_y).__name__}"
            )
        self.log_prob_y = log_prob_y
        self.scale = real("ClassifierGuidance", "scale", scale, lo=0)
        self.batch_size = (
            None if batch_size is None else integer("ClassifierGuidance", "batch_size", batch_size, lo=1)
        )

    def _classify(self, x: Tensor, t: Tensor) -> Tensor:
        """``log_prob_y`` on the candidates ``x`` ``(n, length)`` in batches, float64 ``(n,)``, checked."""
        size = len(x) if self.batch_size is None else self.batch_size
        out = []
        for lo in range(0, len(x), size):
            xb, tb = x[lo : lo + size], t[lo : lo + size]
            v = self.log_prob_y(xb, tb)
            if not isinstance(v, Tensor) or not v.is_floating_point() or tuple(v.shape) != (len(xb),):
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(
                    f"ClassifierGuidance: log_prob_y must return a floating tensor of shape ({len(xb)},), "
                    f"one log p(y | x) per sequence, got {got}"
                )
            if bool((torch.isnan(v) | torch.isposinf(v)).any()):
                raise NonFiniteError("ClassifierGuidance: log_prob_y returned NaN or +inf")
            out.append(v.to(torch.float64))
        return torch.cat(out)

    def log_probs(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The guided ``log p_gamma(x_0 | x_t, y)``, float64 ``(batch, length, vocab_size)``: the
        denoiser's, at each masked position tilted by the classifier on its candidates (module
        docstring)."""
        log_p = self.base.log_probs(x_t, t, **cond)
        p = self.process
        rows, pos = torch.nonzero(x_t == p.mask_id, as_tuple=True)
        if self.scale == 0 or len(rows) == 0:
            return log_p
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        clean = torch.tensor([v for v in range(p.vocab_size) if v != p.mask_id], device=x_t.device)
        prior = log_p[rows, pos][:, clean]  # (m, c)
        # candidate (a, b): position a with clean[b], where the denoiser gives it a positive probability:
        # the others are never drawn (and may be sequences of probability zero, without a p(y | x))
        a, b = torch.nonzero(prior > -torch.inf, as_tuple=True)
        candidates = x_t[rows[a]]
        candidates[torch.arange(len(a), device=x_t.device), pos[a]] = clean[b].to(x_t.dtype)
        score = torch.full_like(prior, -torch.inf)
        score[a, b] = self._classify(candidates, t[rows[a]])
        guided = torch.log_softmax(prior + self.scale * score, dim=-1)
        if bool(torch.isnan(guided).any()):
            k = int(torch.nonzero(torch.isnan(guided).any(-1))[0])
            raise NonFiniteError(
                f"ClassifierGuidance: at the masked position [{int(rows[k])}, {int(pos[k])}] no clean token "
                "has positive probability under both the denoiser and the classifier"
            )
        out = log_p.clone()
        out[rows[:, None], pos[:, None], clean] = guided
        return out

    def __repr__(self) -> str:
        return f"ClassifierGuidance({self.base!r}, scale={self.scale:g})"
