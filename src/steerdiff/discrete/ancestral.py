r"""The ancestral sampler of discrete diffusion (MDLM's / D3PM's reverse step), masked or uniform.

On the grid ``t_i = 1 - i / N`` (``i = 0..N``), from ``t = t_i`` to ``s = t_{i+1}`` every masked position
is unmasked with probability

    (alpha_s - alpha_t) / (1 - alpha_t),

its value drawn from the denoiser's ``p_theta(x_0^i | x_t)``, and stays masked otherwise; unmasked tokens
stay (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models", the reverse step with
the SUBS parameterization; Austin et al. 2021, D3PM's absorbing state). The last step takes ``alpha_s =
1``, so every token is unmasked (schedules with ``alpha(0) < 1``, such as ``geometric``, included).

With an exact denoiser each token's value is exact given the tokens unmasked at earlier steps, but the
tokens unmasked in one step are drawn independently of each other, so the joint law is biased; the bias
vanishes as ``N`` grows (at most one token per step). One network call per step: NFE = ``N``. Unlike
MDLM's code, a step whose state did not change still calls the network (a network that depends on ``t``
gives another law; skipping would make NFE depend on the draws), and the last step samples the tokens
still masked rather than taking the most likely ones.

Under uniform noise (:class:`~steerdiff.discrete.UniformProcess`) the step from ``t`` to ``s`` draws every
token from the process's posterior ``q(x_s | x_t, x_0)`` averaged over the denoiser's ``p_theta(x_0^i |
x_t)`` (:meth:`~steerdiff.discrete.UniformProcess.reverse_log_probs`: D3PM's ``x_0``-parameterized step,
Austin et al. 2021, eq. 4; SEDD's Tweedie tau-leaping, Lou et al. 2024), independently across positions,
on the same grid (the last step draws ``x_0`` itself). With an exact denoiser each token's law is exact
given the state, and the joint law's bias (tokens moved together in one step) vanishes as ``N`` grows.
NFE = ``N``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .._checks import integer
from ..noise import Draws, rand
from .base import Model, Sampler
from .categorical import draw
from .process import UniformProcess

__all__ = ["Ancestral", "uniform_step"]


def uniform_step(
    process: UniformProcess, x: Tensor, log_p: Tensor, alpha_t: Tensor, alpha_s: Tensor, generator: Draws
) -> Tensor:
    """The uniform-noise ancestral step from ``x`` (at ``alpha_t``) to ``alpha_s``, each token drawn from
    :meth:`~steerdiff.discrete.UniformProcess.reverse_log_probs` given the denoiser's ``log_p`` (a new
    tensor of ``x``'s dtype)."""
    return draw(process.reverse_log_probs(x, log_p, alpha_t, alpha_s), generator).to(x.dtype)


class Ancestral(Sampler):
    """MDLM's ancestral sampler on the time-uniform grid of ``steps`` steps, and D3PM's under uniform noise
    (module docstring)."""

    name: ClassVar[str] = "ancestral"
    uniform: ClassVar[bool] = True

    def num_steps(self, steps: object, masked: Tensor, who: str = "discrete.sample") -> int:
        return integer(who, "steps", steps, lo=1)

    def step(
        self, model: Model, x: Tensor, t: Tensor, i: int, steps: int, generator: Draws, given: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        s, alpha_t, alpha_s = self.interval(model, t, i, steps)
        log_p = model(x, t, i)
        process = model.den.process
        if isinstance(process, UniformProcess):
            return uniform_step(process, x, log_p, alpha_t, alpha_s, generator), s, log_p
        u = rand(x.shape, generator, torch.float64, x.device)
        tokens = draw(log_p, generator).to(x.dtype)
        chance = ((alpha_s - alpha_t) / (1 - alpha_t))[:, None]
        unmask = (x == process.mask_id) & (u < chance)
        return torch.where(unmask, tokens, x), s, log_p

    @staticmethod
    def interval(model: Model, t: Tensor, i: int, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """Step ``i``'s end ``s = 1 - (i + 1) / steps`` and ``(alpha_t, alpha_s)``, ``alpha_s = 1`` at the
        last step (every token unmasked there)."""
        process = model.den.process
        s = torch.full_like(t, 1 - (i + 1) / steps)
        return s, process.alpha(t), torch.ones_like(s) if i == steps - 1 else process.alpha(s)
