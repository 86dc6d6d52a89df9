r"""The first-hitting sampler of masked diffusion: one token per step, at its exact unmasking time.

Zheng et al. 2024, "Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit
Inaccurate Categorical Sampling", their first-hitting sampler. Under the reverse process each of the
``n`` masked tokens of ``x_t`` is still masked at ``s < t`` with probability ``(1 - alpha_s) / (1 -
alpha_t)``, independently, so the first of them to unmask does so at the time ``s`` with

    alpha_s = 1 - (1 - alpha_t) u^{1/n},   u ~ U(0, 1),

(``P(all masked at s) = ((1 - alpha_s) / (1 - alpha_t))^n``), and it is any of the ``n`` with equal
probability. The step draws ``s``, one masked position uniformly, and its value from ``p_theta(x_0^i |
x_t)``, the network called at the new time ``s`` (the state until then is ``x_t``).

Each step unmasks one token from its conditional given all tokens unmasked before, so with an exact
denoiser ``L`` steps (one per masked token) sample the data exactly, whatever the schedule. One network
call per step: NFE = the number of masked tokens (of the row with most; a row with none left stays).
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import torch
from torch import Tensor

from ..noise import Draws, rand
from .base import Model, Sampler
from .categorical import draw

__all__ = ["FirstHitting"]


class FirstHitting(Sampler):
    """Zheng et al.'s first-hitting sampler (module docstring): one step per masked token."""

    name: ClassVar[str] = "first_hitting"

    def num_steps(self, steps: object, masked: Tensor, who: str = "discrete.sample") -> int:
        n = int(masked.max())
        if steps is not None and not (
            isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps == n
        ):
            raise ValueError(
                f"{who}: first_hitting unmasks one token per step, so it takes as many steps as "
                f"the most masked row has masked tokens ({n}); steps must be None or {n}, got {steps!r}"
            )
        return n

    def step(
        self, model: Model, x: Tensor, t: Tensor, i: int, steps: int, generator: Draws, given: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        process = model.masked
        masked = x == process.mask_id
        n = masked.sum(dim=1)
        u = rand(t.shape, generator, torch.float64, t.device)
        alpha_s = 1 - (1 - process.alpha(t)) * u ** (1 / n.clamp(min=1))
        s = torch.where(n > 0, process.t_of_alpha(alpha_s), t)
        log_p = model(x, s, i)
        # one masked position uniformly: the largest of i.i.d. uniforms over the masked ones
        position = torch.where(masked, rand(x.shape, generator, torch.float64, x.device), -1.0).argmax(dim=1)
        rows = torch.arange(len(x), device=x.device)
        token = draw(log_p[rows, position], generator).to(x.dtype)
        new = x.clone()
        new[rows, position] = torch.where(n > 0, token, x[rows, position])
        return new, s, log_p
