r"""Mixtures of product-of-categoricals distributions: sequence data whose masked-diffusion denoiser is exact.

``p(x) = sum_k w_k prod_i P_k[i, x^i]`` over sequences ``x`` of length ``L`` with tokens in ``0..V-1``.
Given a partly masked sequence ``x_t`` (unmasked positions ``U``), the posterior over components is

    r_k(x_t) ∝ w_k prod_{i in U} P_k[i, x_t^i],

and a masked position's clean token has the exact conditional law

    p(x_0^j = v | x_t) = sum_k r_k(x_t) P_k[j, v],

which does not depend on ``t``: the exact denoiser of every absorbing process (its logits are the logs).
For a reward that is a sum of per-position terms, ``r(x) = sum_i f[i, x^i]``, the tilted law
``p(x) exp(lam r(x)) / Z`` is again such a mixture (:meth:`tilt`): each component's rows become
``P_k[i, v] exp(lam f[i, v]) / c_{k,i}`` with ``c_{k,i} = sum_v P_k[i, v] exp(lam f[i, v])``, its weight
``w_k prod_i c_{k,i}``, and ``Z = sum_k w_k prod_i c_{k,i}`` (:meth:`log_normalizer`): the exact target of
particle steering (:func:`steerdiff.discrete.fk_steering`).
With the component as a label ``y``, ``p(x | y = k) = prod_i P_k[i, x^i]`` (:meth:`component`), its
denoiser is ``P_k[j, v]`` whatever ``x_t`` (the net of :meth:`denoiser` given ``y=k``), and the exact
classifier of a partly masked sequence is ``p(y = k | x_t) = r_k(x_t)`` (:meth:`classifier`): the
oracles of guidance.
Under the process ``x_t`` has the closed-form law ``sum_k w_k prod_i (alpha P_k[i, x_t^i] if unmasked,
1 - alpha if masked)``. For small ``V^L`` the whole table of ``p`` gives exact distances to samples.

Under uniform noise (:class:`~steerdiff.discrete.UniformProcess`, ``q(u | v) = alpha [u = v] + (1 -
alpha) / V`` per token) each token's noise is independent given the component, so ``x_t`` is again such
a mixture, with rows ``m_k[i, u] = alpha P_k[i, u] + (1 - alpha) / V``, and the exact denoiser is

    p(x_0^j = v | x_t) = sum_k r_k(x_t) P_k[j, v] q(x_t^j | v) / m_k[j, x_t^j],
    r_k(x_t) ∝ w_k prod_i m_k[i, x_t^i],

the responsibilities times each component's per-position posterior; it depends on ``t`` through
``alpha``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

import torch
from torch import Tensor

from .._checks import integer, real, tensor
from ..discrete.categorical import draw
from ..discrete.denoiser import MaskedDenoiser, UniformDenoiser
from ..discrete.process import MaskedProcess, UniformProcess
from ..noise import Generators

__all__ = ["CategoricalMixture"]

F64 = torch.float64
MAX_TABLE = 2**20  # the largest V^L whose table is built


def _identity(t: Tensor) -> Tensor:
    return t


class CategoricalMixture:
    """A mixture of ``K`` product-of-categoricals distributions over sequences of length ``L``, vocabulary
    ``V`` (tokens ``0..V-1``).

    Args:
        weights: ``(K,)``, finite and > 0, normalized here.
        probs: ``(K, L, V)``, finite and >= 0, each ``probs[k, i]`` with a positive sum, normalized here.

    Attributes: ``weights``, ``probs`` (float64, normalized), ``K``, ``L``, ``V``.
    """

    def __init__(self, weights: Tensor, probs: Tensor) -> None:
        who = "CategoricalMixture"
        w = tensor(who, "weights", weights, F64)
        p = tensor(who, "probs", probs, F64)
        if w.ndim != 1 or not bool(torch.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"{who}: weights must be a 1-d array of finite numbers > 0, got {weights!r:.60}")
        if p.ndim != 3 or p.shape[0] != len(w) or p.shape[2] < 1:
            raise ValueError(
                f"{who}: probs must have shape (K, L, V) with K = len(weights) = {len(w)}, got "
                f"{tuple(p.shape)}"
            )
        if not bool(torch.isfinite(p).all() and (p >= 0).all() and (p.sum(-1) > 0).all()):
            raise ValueError(
                f"{who}: probs must be finite and >= 0 with a positive sum over the vocabulary at every "
                "(k, i)"
            )
        self.weights = w / w.sum()
        self.probs = p / p.sum(-1, keepdim=True)
        self.K, self.L, self.V = p.shape

    def _tokens(self, x: Tensor, name: str, mask_id: int | None = None) -> Tensor:
        """``x`` as int64 ``(n, L)``, its ids in ``0..V-1`` (or ``mask_id``), else a ``ValueError``."""
        if not isinstance(x, Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"CategoricalMixture: {name} must be an integer tensor of tokens (n, {self.L})")
        if x.ndim != 2 or x.shape[1] != self.L:
            raise ValueError(
                f"CategoricalMixture: {name} must have shape (n, {self.L}), got {tuple(x.shape)}"
            )
        ok = (x >= 0) & (x < self.V)
        if mask_id is not None:
            ok |= x == mask_id
        if not bool(ok.all()):
            also = "" if mask_id is None else f" or the mask id {mask_id}"
            raise ValueError(f"CategoricalMixture: {name} must hold tokens in [0, {self.V - 1}]{also}")
        return x.long()

    def _log_terms(self, x: Tensor, known: Tensor) -> Tensor:
        """``log w_k + sum_{i known} log P_k[i, x^i]`` ``(n, K)`` (``x``'s unknown entries ignored)."""
        log_p = torch.log(self.probs.to(x.device))  # (K, L, V)
        picked = log_p[:, torch.arange(self.L, device=x.device), x.clamp(0, self.V - 1)]  # (K, n, L)
        picked = torch.where(known, picked, 0.0)
        return torch.log(self.weights.to(x.device)) + picked.sum(-1).T

    def _check_possible(
        self, who: str, name: str, impossible: Tensor, tokens: str = "its unmasked tokens"
    ) -> None:
        """A ``ValueError`` naming the first row of ``name`` (``who``'s argument) flagged ``impossible``
        ``(n,)``: a state of probability zero, whose conditional law is undefined (one host read)."""
        if bool(impossible.any()):
            n = int(torch.nonzero(impossible)[0])
            raise ValueError(
                f"CategoricalMixture.{who}: {name} row {n} has probability zero: {tokens} are impossible "
                "under every component (the label's, where given), so the law given them is undefined"
            )

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` of clean ``x`` ``(n, L)``, float64 ``(n,)`` (``-inf`` where ``p(x) = 0``)."""
        x = self._tokens(x, "x")
        return torch.logsumexp(self._log_terms(x, torch.ones_like(x, dtype=torch.bool)), dim=-1)

    def sample(
        self, n: int, generator: Generators = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``n`` exact draws, int64 ``(n, L)``: a component from ``weights``, then each token from its row of
        ``probs`` (a list of generators: one per draw)."""
        n = integer("CategoricalMixture.sample", "n", n, lo=1)
        log_w = torch.log(self.weights.to(device)).expand(n, -1)
        k = draw(log_w, generator)
        return draw(torch.log(self.probs.to(device))[k], generator)

    def _label(self, y: object, n: int) -> Tensor:
        """``y`` as int64 ``(n,)``: a label in ``0..K-1`` for all rows, or an integer tensor of one per row
        (``(n,)``), ``-1`` for no label; else a ``ValueError``."""
        if isinstance(y, int) and not isinstance(y, bool) and -1 <= y < self.K:
            return torch.full((n,), y, dtype=torch.long)
        if (
            isinstance(y, Tensor)
            and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
            and tuple(y.shape) == (n,)
            and bool(((y >= -1) & (y < self.K)).all())
        ):
            return y.long()
        raise ValueError(
            f"CategoricalMixture: y must be a component in [0, {self.K - 1}] or -1 (no label), or an integer "
            f"tensor of shape ({n},) of them, got {y!r:.60}"
        )

    def _check_mask(self, mask_id: int) -> None:
        if 0 <= mask_id < self.V:
            raise ValueError(
                f"CategoricalMixture: mask_id must lie outside the tokens [0, {self.V - 1}], got {mask_id}"
            )

    def conditional_log_probs(self, x_t: Tensor, mask_id: int, y: int | Tensor | None = None) -> Tensor:
        """``log p(x_0^j = v | x_t)`` float64 ``(n, L, V)``: at every position the law of its clean token
        given ``x_t``'s unmasked tokens (those not ``mask_id``, an id outside ``0..V-1``). At an unmasked
        position it is the same mixture ``sum_k r_k P_k[j, v]`` (``r`` given its own token too), not a point
        mass on its token (the denoiser's carry-over sets that).
        ``y``: the component's law ``log P_k`` instead, ``k = y`` (an int for all rows, or one per row,
        ``-1`` for the mixture's), the law given the label (whatever ``x_t``: its positions are independent
        given the component). Unmasked tokens of probability zero (``r`` is ``0 / 0``) in a row given no
        label: a ``ValueError`` naming ``x_t``."""
        self._check_mask(mask_id)
        x_t = self._tokens(x_t, "x_t", mask_id)
        log_terms = self._log_terms(x_t, x_t != mask_id)  # (n, K)
        mixed = torch.ones(len(x_t), dtype=torch.bool, device=x_t.device)  # rows given the mixture's law
        r = torch.softmax(log_terms, dim=-1)
        if y is not None:
            k = self._label(y, len(x_t)).to(x_t.device)
            one_hot = torch.nn.functional.one_hot(k.clamp(min=0), self.K).to(F64)
            mixed = k < 0
            r = torch.where(mixed[:, None], r, one_hot)
        self._check_possible("conditional_log_probs", "x_t", mixed & torch.isneginf(log_terms).all(-1))
        return torch.log(torch.einsum("nk,klv->nlv", r, self.probs.to(x_t.device)))

    def component(self, k: int) -> CategoricalMixture:
        """Component ``k`` alone, the law ``p(x | y = k)`` given the label ``y = k`` (its :meth:`table`,
        its exact :meth:`denoiser`)."""
        k = integer("CategoricalMixture.component", "k", k, lo=0, hi=self.K - 1)
        return CategoricalMixture(torch.ones(1, dtype=F64), self.probs[k : k + 1])

    def classifier(self, y: int, mask_id: int) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact classifier ``(x, t) -> log p(y | x)`` float64 ``(n,)`` of partly masked sequences
        ``x`` ``(n, L)`` (``mask_id`` where masked): the log responsibility of component ``y`` given the
        unmasked tokens, the same at every ``t`` (for :class:`steerdiff.discrete.ClassifierGuidance`). A
        sequence of probability zero has none: a ``ValueError`` naming ``x``."""
        y = integer("CategoricalMixture.classifier", "y", y, lo=0, hi=self.K - 1)
        self._check_mask(mask_id)

        def log_prob_y(x: Tensor, t: Tensor) -> Tensor:
            x = self._tokens(x, "x", mask_id)
            log_terms = self._log_terms(x, x != mask_id)
            self._check_possible("classifier", "x", torch.isneginf(log_terms).all(-1))
            return torch.log_softmax(log_terms, dim=-1)[:, y]

        return log_prob_y

    def _tilt_terms(self, who: str, f: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """``(log w_k + sum_i log c_{k,i}`` ``(K,)``, the tilted rows ``(K, L, V)``) of :meth:`tilt`, the
        arguments checked (a ``ValueError`` naming ``who`` and the argument)."""
        lam = real(who, "lam", lam)
        f = tensor(who, "f", f, F64)
        if tuple(f.shape) != (self.L, self.V):
            raise ValueError(
                f"{who}: f must hold the per-position rewards, shape (L, V) = ({self.L}, {self.V}), got "
                f"{tuple(f.shape)}"
            )
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"{who}: f must be finite (NaN or inf in it)")
        log_tilted = torch.log(self.probs) + lam * f  # (K, L, V); a zero probability stays -inf
        log_c = torch.logsumexp(log_tilted, dim=-1)  # (K, L)
        return torch.log(self.weights) + log_c.sum(-1), torch.exp(log_tilted - log_c[..., None])

    def tilt(self, f: Tensor, lam: float) -> CategoricalMixture:
        """The tilted law ``p(x) exp(lam r(x)) / Z`` of the reward ``r(x) = sum_i f[i, x^i]`` (``f``
        ``(L, V)``, finite; ``lam`` finite), again a mixture (module docstring): each component's rows
        tilted and renormalized, its weight times its normalizer ``prod_i c_{k,i}``."""
        log_w, probs = self._tilt_terms("CategoricalMixture.tilt", f, lam)
        return CategoricalMixture(torch.exp(log_w - log_w.max()), probs)

    def log_normalizer(self, f: Tensor, lam: float) -> float:
        """``log Z = log E_p[exp(lam r(x))] = log sum_k w_k prod_i c_{k,i}`` of :meth:`tilt`'s law."""
        log_w, _ = self._tilt_terms("CategoricalMixture.log_normalizer", f, lam)
        return float(torch.logsumexp(log_w, dim=0))

    @overload
    def denoiser(self, process: MaskedProcess) -> MaskedDenoiser: ...

    @overload
    def denoiser(self, process: UniformProcess) -> UniformDenoiser: ...

    def denoiser(self, process: MaskedProcess | UniformProcess) -> MaskedDenoiser | UniformDenoiser:
        """The exact denoiser under ``process``, whose clean ids must be this mixture's tokens.

        A :class:`~steerdiff.discrete.MaskedProcess`: ``mask_id >= V`` with ``vocab_size`` ``V`` (the mask
        after them) or ``V + 1`` (the mask among the logits, at ``V``); its logits do not depend on ``t``.
        A :class:`~steerdiff.discrete.UniformProcess` of ``vocab_size`` ``V``: :meth:`uniform_log_probs` at
        ``alpha(t)``, the net given the float64 times (``time_map`` the identity).
        Its net takes an optional label, ``net(x_t, t, y=None)`` (as :meth:`conditional_log_probs`:
        ``sd.discrete.sample(den, x_T, y=k)`` samples component ``k``, ``y = -1`` is the null label of
        classifier-free guidance)."""
        if isinstance(process, UniformProcess) and process.vocab_size == self.V:

            def uniform_net(x_t: Tensor, t: Tensor, y: int | Tensor | None = None) -> Tensor:
                return self.uniform_log_probs(x_t, process.alpha(t), y)

            return UniformDenoiser(uniform_net, process, time_map=_identity)
        if not isinstance(process, MaskedProcess) or process.mask_id < self.V or process.num_clean != self.V:
            raise ValueError(
                "CategoricalMixture.denoiser: process must be a MaskedProcess whose clean ids are the "
                f"tokens 0..{self.V - 1} (vocab_size {self.V} or {self.V + 1}, mask_id {self.V}) or a "
                f"UniformProcess of vocab_size {self.V}, got {process!r}"
            )

        def net(x_t: Tensor, t: Tensor, y: int | Tensor | None = None) -> Tensor:
            log_p = self.conditional_log_probs(x_t, process.mask_id, y)
            pad = process.vocab_size - self.V  # the mask's column, which SUBS sets to -inf
            return torch.nn.functional.pad(log_p, (0, pad), value=-torch.inf)

        return MaskedDenoiser(net, process)

    def _uniform_terms(self, x_t: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """``(log w_k + sum_i log m_k[i, x_t^i]`` ``(n, K)``, ``log m_k[i, x_t^i]`` ``(n, K, L)``) under
        uniform noise at ``alpha`` (a number or one per row), module docstring."""
        a = torch.as_tensor(alpha, dtype=F64, device=x_t.device).reshape(-1, 1, 1)  # (n or 1, 1, 1)
        probs = self.probs.to(x_t.device)
        picked = probs[:, torch.arange(self.L, device=x_t.device), x_t].permute(1, 0, 2)  # (n, K, L)
        log_m = torch.log(a * picked + (1 - a) / self.V)
        return torch.log(self.weights.to(x_t.device)) + log_m.sum(-1), log_m

    def uniform_log_probs(self, x_t: Tensor, alpha: Tensor, y: int | Tensor | None = None) -> Tensor:
        """``log p(x_0^j = v | x_t)`` float64 ``(n, L, V)`` under uniform noise at ``alpha`` (a number or
        one per row, in ``[0, 1]``): the responsibilities ``r_k(x_t)`` times each component's per-position
        posterior (module docstring). ``y``: component ``y``'s posterior alone (an int for all rows, or one
        per row, ``-1`` for the mixture's), the law given the label. A row of probability zero (at ``alpha =
        1``, where ``x_0 = x_t``: a token impossible under every component, or under the label's) has no
        posterior: a ``ValueError`` naming ``x_t``."""
        x_t = self._tokens(x_t, "x_t")
        log_r, log_m = self._uniform_terms(x_t, alpha)
        impossible = torch.isneginf(log_r)  # (n, K): only at alpha = 1
        bad = impossible.all(-1)
        r = torch.softmax(log_r, dim=-1)
        if y is not None:
            k = self._label(y, len(x_t)).to(x_t.device)
            one_hot = torch.nn.functional.one_hot(k.clamp(min=0), self.K).to(F64)
            r = torch.where((k >= 0)[:, None], one_hot, r)
            bad = torch.where(k >= 0, impossible.gather(1, k.clamp(min=0)[:, None])[:, 0], bad)
        self._check_possible("uniform_log_probs", "x_t", bad, "at alpha = 1 (t = 0) its tokens")
        a = torch.as_tensor(alpha, dtype=F64, device=x_t.device).reshape(-1, 1, 1, 1)
        same = torch.nn.functional.one_hot(x_t, self.V).to(F64)[:, None]  # (n, 1, L, V)
        q = a * same + (1 - a) / self.V  # q(x_t^j | v)
        m = log_m.exp()[..., None]  # 0 only at alpha = 1 where P_k[j, x_t^j] = 0: then r_k = 0 and P_k q = 0
        post = torch.where(m > 0, self.probs.to(x_t.device)[None] * q / m, 0.0)  # (n, K, L, V)
        return torch.log(torch.einsum("nk,nklv->nlv", r, post))

    def noised_log_prob(self, x_t: Tensor, process: MaskedProcess | UniformProcess, t: float) -> Tensor:
        """``log q_t(x_t)``, float64 ``(n,)``: the law of ``x_t`` under ``process`` at time ``t``,
        ``sum_k w_k prod_i (alpha P_k[i, x_t^i] if unmasked, 1 - alpha if masked)`` (masked) or ``sum_k w_k
        prod_i m_k[i, x_t^i]`` (uniform, module docstring)."""
        alpha = process.alpha(torch.tensor(t, dtype=F64))
        if isinstance(process, UniformProcess):
            x_t = self._tokens(x_t, "x_t")
            return torch.logsumexp(self._uniform_terms(x_t, alpha)[0], dim=-1)
        x_t = self._tokens(x_t, "x_t", process.mask_id)
        alpha = alpha.to(x_t.device)
        known = x_t != process.mask_id
        m = known.sum(-1)
        # log(alpha^m (1 - alpha)^(L - m)), 0 log 0 = 0 at alpha = 0 or 1
        noise = torch.xlogy(m, alpha) + torch.xlogy(self.L - m, 1 - alpha)
        return torch.logsumexp(self._log_terms(x_t, known), dim=-1) + noise

    def table(self) -> Tensor:
        """``p(x)`` of every sequence, float64 ``(V^L,)``, in the order of :meth:`index` (for ``V^L`` up to
        2^20)."""
        if self.V**self.L > MAX_TABLE:
            raise ValueError(
                f"CategoricalMixture.table: V^L = {self.V}^{self.L} exceeds {MAX_TABLE} sequences"
            )
        codes = torch.arange(self.V**self.L)
        digits = torch.stack([codes // self.V ** (self.L - 1 - i) % self.V for i in range(self.L)], dim=1)
        return self.log_prob(digits).exp()

    def index(self, x: Tensor) -> Tensor:
        """The position of each sequence of ``x`` ``(n, L)`` in :meth:`table`: ``sum_i x^i V^{L - 1 - i}``."""
        x = self._tokens(x, "x")
        powers = self.V ** torch.arange(self.L - 1, -1, -1, device=x.device)
        return (x * powers).sum(-1)

    def total_variation(self, x: Tensor) -> float:
        """The total variation distance ``(1/2) sum_x |p_hat(x) - p(x)|`` between the empirical law of the
        samples ``x`` ``(n, L)`` and ``p``."""
        p = self.table()
        counts = torch.bincount(self.index(x).cpu(), minlength=len(p)).to(F64)
        return 0.5 * float((counts / len(x) - p).abs().sum())
