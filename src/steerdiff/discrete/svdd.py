r"""Soft value-based decoding (SVDD) of masked diffusion.

Li, Zhao, Uehara et al. 2024, "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with
Soft Value-Based Decoding", whose discrete experiments decode masked diffusion models; the discrete
counterpart of :func:`steerdiff.smc.svdd`, with its selection (:func:`steerdiff.smc.svdd.select`) and
result (:class:`steerdiff.smc.Particles`), over the particles of :func:`steerdiff.discrete.fk_steering`.

Target: the reward-tilted law ``p(x) exp(r(x) / alpha)``, approached step by step through the soft value
``v(x_i) = alpha log E[exp(r(x_0) / alpha) | x_i]``. Each batch row holds ``M`` candidates of its next state,
drawn from the base sampler's transition (``ancestral``, ``first_hitting``, ``remdm``:
:class:`~steerdiff.discrete.Sampler`) from the one state kept; before step ``i`` (``i = 1..S-1``) the
network is called at every candidate ``x_i^j``, which scores it by SVDD-PM's value ``v(x_i^j) = r(x0_hat)``,

    x0_hat = x_i^j where unmasked,  argmax_v p_theta(x_0 = v | x_i^j) where masked     (their Alg. 1),

(``estimate="draw"``: a draw from ``p_theta(x_0 | x_i^j)`` there, as :func:`~steerdiff.discrete.fk_steering`
scores), and the row keeps one,

    k ~ Categorical(softmax_j(v(x_i^j) / alpha)),    ``k = argmax_j v(x_i^j)`` for ``alpha = 0``,

all ``M`` particles becoming copies of ``x_i^k``, whose step draws the next ``M`` candidates. The value call
is the kept candidate's call of the step (:meth:`Model.know <steerdiff.discrete.Model.know>`: the step's
call at the same tokens and times returns it), so ``ancestral`` and ``remdm`` cost one call a step;
``first_hitting`` calls the network at the next unmasking time, drawn in the step, so its step calls it
again (two calls a step). Step 0 starts all candidates from the row's one ``x_T`` (nothing to select); a
row whose candidates are all clean selects no more. After the last step the weights are ``r(x_S) / alpha``
(normalized; a point mass on the best for ``alpha = 0``), so ``out.sample()`` makes the last selection.

``alpha = inf`` selects uniformly, independently of the values: each step's kept state is a draw of the
base transition, so the output law is the base sampler's (other draws). ``M = 1`` selects nothing, calls
nothing more and draws nothing more: the base sampler's run, draw for draw. Unlike FK steering, nothing
corrects SVDD-PM's value approximation (``r(x0_hat)``, not ``alpha log E[exp(r / alpha)]``), so the
output law is not the tilted law at any ``M``: at small ``alpha`` it is biased towards high reward. With
``estimate="draw"`` the selection weight ``exp(r(x0_hat) / alpha)`` is unbiased for ``E[exp(r(x_0) /
alpha) | x_i]`` under the denoiser's per-position posteriors (drawn independently, where the exact soft
value takes the joint posterior), so as ``M`` grows the selection nears the soft-value transition (on the
tests' mixture: within the floor of the tilted law at ``M = 32``, where the argmax stays 0.05 above it).

NFE per batch row: ``M`` times the network calls (``steps * M`` for ``ancestral`` and ``remdm``, ``(2 S -
1) * M`` for ``first_hitting`` with ``S`` masked tokens; 2 per call for :class:`~steerdiff.discrete.CFG`).
With a per-row ``generator`` list row ``b``'s candidates, estimates and selections draw from
``generator[b]`` alone. ``group=`` (spreading the candidates over ranks) is refused: the kept candidate's
network output would have to cross ranks at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import choice, real
from ..smc.particles import Particles
from ..smc.svdd import select, selection_logits
from .base import Sampler
from .denoiser import MaskedDenoiser
from .steering import Reward, _Run

__all__ = ["ESTIMATES", "svdd"]

ESTIMATES = ("argmax", "draw")


def svdd(
    den: MaskedDenoiser,
    reward: Reward,
    alpha: float = 0.0,
    *,
    shape: Sequence[int] | None = None,
    x_T: Tensor | Sequence[int] | None = None,
    particles: int = 16,
    steps: int | None = None,
    sampler: str | Sampler = "ancestral",
    estimate: str = "argmax",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    group: Any = None,
    **cond: Any,
) -> Particles:
    """SVDD-PM over a masked diffusion sampler: ``particles = M`` candidates per step and batch row, one kept
    by ``softmax(v / alpha)`` (module docstring).

    Args:
        den: a :class:`~steerdiff.discrete.MaskedDenoiser` (guided ones included).
        reward: ``r``, mapping clean token ids ``(n, length)`` to finite reals ``(n,)``; gradient-free. Scores
            ``x0_hat`` of every candidate and the final samples themselves.
        alpha: temperature ``>= 0`` (default 0: greedy argmax, as the paper's main experiments; ``math.inf``:
            the base sampler's law).
        shape, x_T, steps, sampler, device, progress, cond: as for :func:`~steerdiff.discrete.fk_steering`.
        particles: ``M >= 1`` candidates.
        estimate: ``x0_hat`` at the masked positions: ``"argmax"`` (default, the paper's) or ``"draw"``.
        generator: ``None``, a ``torch.Generator`` or a list of ``batch`` of them (row ``b`` from
            ``generator[b]`` alone: a row's result is the same in any batch).
        group: ``None`` only (module docstring).

    Returns:
        :class:`~steerdiff.smc.Particles`: the final candidates ``(batch, M, length)`` with normalized
        log-weights ``r / alpha`` (``out.sample()`` draws the returned sample), ``reward`` their rewards,
        ``nfe`` per batch row; no trace.

    Example:
        >>> out = sd.discrete.svdd(den, reward, 0.5, shape=(4, L), particles=8, steps=32)
        >>> x = out.sample(generator=g)   # (4, L)
    """
    who = "discrete.svdd"
    if group is not None:
        raise ValueError(
            f"{who}: group must be None (one process): the kept candidate's network output would have to "
            "cross ranks at every step; spread the batch rows over ranks instead"
        )
    run = _Run(
        who, den, reward, shape, x_T, particles, steps, sampler, generator, device, progress, None, cond
    )
    alpha = real(who, "alpha", alpha, lo=0, finite=False)
    greedy = choice(who, "estimate", estimate, ESTIMATES) == "argmax"
    batch, n, dev = run.batch, run.n, run.x.device
    first = (torch.arange(batch, device=dev) * n)[:, None]
    own = torch.arange(n, device=dev).expand(batch, n)
    for i in run.nodes():
        if i > 0 and n > 1:
            log_p = run.model(run.x, run.t, i)
            v = run.reward(run.estimate(log_p, greedy), i)
            masked = (run.x == run.mask_id).any(-1).reshape(batch, n).any(-1)
            anc = torch.where(masked[:, None], select(v, alpha, run.generator)[:, None], own)
            run.take(anc)
            run.model.know(run.x, run.t, log_p[(anc + first).reshape(-1)])
        run.step(i)
    r = run.reward(run.x, run.steps)
    return run.result(torch.log_softmax(selection_logits(r, alpha), dim=-1), None, r)
