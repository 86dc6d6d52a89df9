r"""Confidence-ordered decoding of masked diffusion: MaskGIT's, LLaDA's and PC-Sampler's samplers.

At step ``i`` of ``N`` (grid ``t_i = 1 - i / N``, the network called at ``t_i``) the denoiser gives
``p_theta(x_0^j | x_t)`` at every position; each masked position ``j`` gets a token ``xhat^j``, drawn from
``p_theta(x_0^j | x_t)^{1/T}`` normalized (temperature ``T``; the argmax at ``T = 0``), and a score, and the
``k_i`` masked positions of highest score take their tokens; the others stay masked (Chang et al. 2022,
"MaskGIT: Masked Generative Image Transformer", its iterative decoding; Nie et al. 2025, "Large Language
Diffusion Models" (LLaDA), its low-confidence remasking). Scores, with ``p = p_theta(. | x_t)`` at ``j``:

    "confidence":  p(xhat^j)                    (LLaDA's and MaskGIT's; the largest p(v) at T = 0)
    "margin":      p_(1) - p_(2)                (the two largest p(v))
    "entropy":     sum_v p(v) log p(v)          (the negative entropy)
    "random":      u^j ~ U(0, 1)                (LLaDA's "random" remasking: a uniformly random k-subset)
    "pc":          exp(-lam j) min(-p(xhat^j) log f(xhat^j), clip)

``"pc"`` is PC-Sampler (Huang et al. 2025, "PC-Sampler: Position-Aware Calibration of Decoding Bias in
Masked Diffusion Models", their Algorithm 1 and ``pc_sampler_function``): a position-aware weight
``exp(-lam j)`` (``j`` the position; the paper counts from the first generated position, ``j - |p_0|``,
which multiplies every score by the same ``exp(lam |p_0|)`` and ranks alike) times a calibrated confidence
that discounts tokens frequent in a reference corpus, ``f`` (``frequencies``), clipped at ``clip`` (the
paper's ``alpha``). The weight is per token, not per fraction of the length: ``lam = 0.25`` (the
paper's setting for most tasks) already weighs the next position ``exp(-0.25) = 0.78`` times the one
before. It is ranked as ``log min(...) - lam j`` (the same order, and no underflow at large ``lam``).
Ties go to the leftmost position.

The counts ``k_i`` follow the process: from a row's ``M`` masked tokens at ``t = 1`` (the all-masked
start, whatever ``alpha(1)``), the number decoded after step ``i`` is the fewest that keeps at least the
schedule's fraction, ``n_i = ceil(M (alpha_s - alpha(1)) / (1 - alpha(1)))`` at ``s = t_{i+1}`` (``alpha_s =
1`` at the last step: ``n_{N-1} = M``), and ``k_i = n_i - n_{i-1}``: the ancestral sampler's expected
counts (:mod:`steerdiff.discrete.ancestral`), made exact. Where the row has a token a step (``N <= M``)
MaskGIT's rule applies (its ``mask_len = max(1, min(unknown - 1, ...))``, which leaves one masked token
for the next step; here one for each later step): every step decodes at least one token, the counts
``n'_i = min(M - (N - 1 - i), max(n_i, n'_{i-1} + 1))`` for ``i < N - 1``. It changes nothing under
``linear`` and ``loglinear``, whose counts already do both; under ``cosine`` and ``geometric`` the
schedule's counts alone left steps that decode nothing (53 of 256 at ``N = M = 256``, cosine) and others
that decode two tokens together. Under the linear schedule this is ``M / N`` tokens a step where ``N``
divides ``M``, LLaDA's counts; otherwise the ``M mod N`` extra tokens fall on other steps than LLaDA's
first ones (its ``get_num_transfer_tokens``). A step may decode no token only where ``N > M``; it still
calls the network. Tokens given in ``x_T`` stay. One network call per step: NFE = ``N``.

``"random"`` is a random-order sampler: at ``N = M`` (one token a step, every schedule) its law is the data's
with an exact denoiser, as :mod:`~steerdiff.discrete.first_hitting`'s; with ``k_i > 1`` the tokens of a step
are drawn independently given those decoded before, as the ancestral sampler's. ``"margin"`` and ``"entropy"``
choose the positions from the state alone, so at one token a step each token is still drawn from its exact
conditional and the law is the data's too; with several tokens a step they are further from it than
``"random"``. ``"confidence"`` and ``"pc"`` rank by the drawn token's own probability, which decodes first
where the draw came out likely: mode-seeking, and biased even at one token a step
(``tests/test_discrete_confidence.py`` measures how far). With an exact denoiser the orders only cost; they
are heuristics for networks that are wrong where they are unsure.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .._checks import choice, integer, real, real_array
from .._ops import host_to, kept
from ..noise import Draws, rand
from .base import Model, Sampler
from .categorical import draw
from .process import MaskedProcess

__all__ = ["SCORES", "Confidence"]

SCORES = ("confidence", "margin", "entropy", "random", "pc")


class Confidence(Sampler):
    """Confidence-ordered decoding (module docstring): each step decodes the ``k_i`` masked positions of
    highest score, ``k_i`` from the process's schedule.

    Args:
        score: one of :data:`SCORES`; default ``"confidence"`` (LLaDA's low-confidence remasking).
        temperature: the tokens are drawn from ``p_theta(x_0 | x_t)^{1 / temperature}`` normalized, the
            argmax at 0; a number >= 0, default 1 (the denoiser's law; LLaDA's code defaults to 0).
        lam: ``"pc"``'s position weight ``exp(-lam j)``, a number >= 0; default 0.25 (the paper's for most
            tasks; 0 for Sudoku, 0.5 for Countdown). Only with ``"pc"``.
        frequencies: ``"pc"``'s reference token frequencies ``f``, one per token id of the denoiser's
            vocabulary (``vocab_size``, checked at the first step), >= 0 and summing to 1 (normalize the
            counts); required with ``"pc"`` and only with it.
        clip: ``"pc"``'s cap on the calibrated confidence, a number > 0 (``inf`` for none); default 10 (the
            paper's). Only with ``"pc"``.
    """

    name: ClassVar[str] = "confidence"

    def __init__(
        self,
        score: str = "confidence",
        temperature: float = 1.0,
        *,
        lam: float | None = None,
        frequencies: object = None,
        clip: float | None = None,
    ) -> None:
        who = "Confidence"
        self.score = choice(who, "score", score, SCORES)
        self.temperature = real(who, "temperature", temperature, lo=0)
        if self.score != "pc" and any(v is not None for v in (lam, frequencies, clip)):
            raise ValueError(
                f"{who}: lam, frequencies and clip are the 'pc' score's settings, got score={self.score!r}"
            )
        self.lam = real(who, "lam", 0.25 if lam is None else lam, lo=0)
        self.clip = real(who, "clip", 10.0 if clip is None else clip, lo=0, lo_open=True, finite=False)
        self.frequencies: Tensor | None = None
        self._log_frequencies: dict[torch.device, Tensor] = {}
        if self.score == "pc":
            if frequencies is None:
                raise ValueError(f"{who}: score='pc' needs the reference token frequencies, frequencies=")
            f = real_array(who, "frequencies", frequencies)
            total = float(f.sum())
            if not bool(torch.isfinite(f).all() and (f >= 0).all()) or abs(total - 1) > 1e-6:
                got = "negative entries" if bool((f < 0).any()) else f"a sum of {total:.6g}"
                raise ValueError(
                    f"{who}: frequencies must be a distribution over the token ids (finite, >= 0, summing "
                    f"to 1; normalize the counts), got {got}"
                )
            self.frequencies = f

    def num_steps(self, steps: object, masked: Tensor, who: str = "discrete.sample") -> int:
        return integer(who, "steps", steps, lo=1)

    @staticmethod
    def counts(process: MaskedProcess, given: Tensor, masked: Tensor, i: int, steps: int) -> Tensor:
        """``k_i`` of each row ``(batch,)``: ``n_i`` (module docstring, MaskGIT's rule included) less the
        tokens decoded so far, for rows whose tokens not ``given`` are all masked at ``t = 1``."""
        m = (~given).sum(1)
        alpha_1 = float(process.alpha(torch.tensor(1.0, dtype=torch.float64)))
        s = torch.tensor(1 - (i + 1) / steps, dtype=torch.float64)
        alpha_s = 1.0 if i == steps - 1 else float(process.alpha(s))
        fraction = (alpha_s - alpha_1) / (1 - alpha_1)
        # 1e-9 absorbs alpha's float64 rounding where m * fraction is an integer (m * 1e-16 << 1e-9)
        decoded = torch.ceil(m.to(torch.float64) * fraction - 1e-9).long().clamp(min=0).minimum(m)
        before = m - masked.sum(1)
        if i < steps - 1:  # MaskGIT's rule where a row has a token a step: one at least, one left a step
            paced = torch.maximum(decoded, before + 1).minimum(m - (steps - 1 - i))
            decoded = torch.where(m >= steps, paced, decoded)
        return decoded - before

    def scores(self, log_p: Tensor, tokens: Tensor, generator: Draws) -> Tensor:
        """The score of every position ``(batch, length)`` (module docstring), from the step's
        ``log p_theta(x_0 | x_t)`` and its tokens (a larger score is decoded first)."""
        p = log_p.exp()
        if self.score == "random":
            return rand(tokens.shape, generator, torch.float64, tokens.device)
        if self.score == "margin":
            top = p.topk(min(2, p.shape[-1]), dim=-1).values
            return top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0)
        if self.score == "entropy":
            return -torch.special.entr(p).sum(-1)
        chosen = p.gather(-1, tokens[..., None]).squeeze(-1)
        if self.score == "confidence":
            return chosen
        assert self.frequencies is not None  # set with "pc"
        if len(self.frequencies) != log_p.shape[-1]:
            raise ValueError(
                f"Confidence: frequencies must hold one frequency per token id of the denoiser's vocabulary "
                f"(vocab_size = {log_p.shape[-1]}), got {len(self.frequencies)}"
            )
        frequencies, dev = self.frequencies, log_p.device
        # one copy to each device, not one a step, and without a sync (a copy from pageable memory syncs)
        log_f = kept(self._log_frequencies, dev, lambda: host_to(torch.log(frequencies), dev))
        calibrated = (-chosen * log_f[tokens]).clamp(max=self.clip)
        position = torch.arange(tokens.shape[-1], dtype=torch.float64, device=tokens.device)
        return torch.log(calibrated) - self.lam * position

    def step(
        self, model: Model, x: Tensor, t: Tensor, i: int, steps: int, generator: Draws, given: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        process = model.masked
        log_p = model(x, t, i)
        tokens = log_p.argmax(-1) if self.temperature == 0 else draw(log_p / self.temperature, generator)
        score = self.scores(log_p, tokens, generator)
        masked = x == process.mask_id
        # positions by score, highest first (stable: ties to the left), then the masked ones first
        order = score.sort(dim=1, descending=True, stable=True).indices
        order = order.gather(
            1, masked.gather(1, order).to(torch.uint8).sort(dim=1, descending=True, stable=True).indices
        )
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(x.shape[1], device=x.device).expand_as(order)
        )
        decode = rank < self.counts(process, given, masked, i, steps)[:, None]
        s = torch.full_like(t, 1 - (i + 1) / steps)
        return torch.where(decode, tokens.to(x.dtype), x), s, log_p

    def __repr__(self) -> str:
        pc = f", lam={self.lam:g}, clip={self.clip:g}" if self.score == "pc" else ""
        return f"Confidence(score={self.score!r}, temperature={self.temperature:g}{pc})"
