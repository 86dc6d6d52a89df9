r"""ReMDM: the ancestral sampler of masked diffusion with remasking.

Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time Scaling". The reverse step
from ``t`` to ``s`` draws from a posterior ``q_sigma(x_s | x_t, x_0)`` that may mask a decoded token again,
with probability ``sigma_t``, and unmasks masked tokens more often to compensate:

    x_t^i unmasked:  x_s^i = x_t^i with probability 1 - sigma_t, the mask with probability sigma_t;
    x_t^i masked:    x_s^i = x_0^i with probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t),
                     the mask with probability (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t),

``x_0^i`` drawn from the denoiser. Every ``0 <= sigma_t <= sigma_max = min(1, (1 - alpha_s) / alpha_t)``
keeps the process's marginals, ``P(x_s^i = x_0^i) = alpha_s``; ``sigma_t = 0`` is the ancestral step
(:mod:`steerdiff.discrete.ancestral`, whose grid, ``t_i = 1 - i / N`` with ``alpha_s = 1`` at the last
step, and draws it shares: equal bit for bit).
Strategies for ``sigma_t``: ``"cap"``, ``min(eta, sigma_max)``; ``"rescale"``, ``eta sigma_max``;
``"loop"`` (the paper's ReMDM-loop, its inference-time scaling), three phases on the same grid, with
``T`` the process time at which ``alpha(T) = alpha_on`` (:meth:`MaskedProcess.t_of_alpha`): the grid
time ``u`` in ``[t_on, 1]`` is the process time ``tau(u) = T + (u - t_on) (1 - T) / (1 - t_on)``, so
ancestral steps (``sigma_t = 0``) take alpha from ``alpha(1)`` to ``alpha_on`` through the schedule's own
shape on ``[T, 1]``; in the window ``[t_off, t_on]`` ``tau = T``, and a step (both ends in the window, not
the last step) keeps ``alpha_s = alpha_t = alpha_on`` and remasks with ``sigma_t = min(eta, sigma_max)``
(``sigma_max = (1 - alpha_on) / alpha_on``, 1/9 at ``alpha_on = 0.9``), its masked tokens unmasking with
probability ``sigma_t alpha_on / (1 - alpha_on)`` (the fraction unmasked stays ``alpha_on``: a Gibbs-like
re-draw of a fraction of the tokens given the others); on ``[0, t_off]`` ``tau(u) = u T / t_off``,
ancestral steps again from ``alpha_on`` to 1 through the schedule's shape on ``[0, T]``. Alpha is
continuous; the affine maps of ``u`` onto process time are our choice (the paper fixes alpha's values at
``t_on`` and ``t_off``, not the path to them; under the linear schedule both phases' alpha is linear in
``u``, as in the authors' code, whose window takes ``sigma_t = eta`` uncapped: a negative probability of
staying masked where ``eta > sigma_max``). The denoiser is called at ``tau``, the process time of the
current alpha, and the times a step returns are ``tau``'s. With ``eta = 0`` the loop steps change nothing
(they still call the network): the law is the ancestral sampler's on the other steps' process times (on
the uniform grid of ``N - k`` steps, ``k`` loop steps, where phases 1 and 3 have equal process-time
steps), not the plain ancestral sampler's on ``N`` steps (the other strategies with ``eta = 0`` are it,
draw for draw). Tokens given in ``x_T`` are never remasked. One network call per step: NFE =
``N``.

Remasking lets later steps correct tokens an imperfect denoiser got wrong. With an exact denoiser there is
nothing to correct and the remasked tokens are drawn again together with others, so the law is further
from the data at equal steps and approaches it more slowly (exact laws, ``tests/test_discrete_samplers.py``:
``"cap"`` with ``eta = 0.1`` at 16 / 64 steps 0.0245 / 0.0135 in total variation, ancestral 0.0192 /
0.0048; at 512 steps 0.0062). ``"loop"``'s re-draws do help against no re-draws on the same grid: with
``alpha_on = 0.9``, ``eta = 0.02`` the law is 18 % / 44 % closer than with ``eta = 0`` at 16 / 64 steps
(0.0305 / 0.0054 against 0.0370 / 0.0096, linear schedule). But at equal NFE it still loses to
ancestral, if by less: its window takes half the steps, and the best of the settings tried (``alpha_on``
0.8, 0.9, 0.95; ``eta`` 0.02, 0.1, 0.5) is 1.1 times ancestral's distance at 8 to 64 steps (linear:
0.0424 / 0.0214 / 0.0106 / 0.0054 against 0.0382 / 0.0192 / 0.0097 / 0.0048). Under the cosine
schedule it is within 1-5 % of ancestral at 16 to 64 steps and wins at 8 steps only, by 3 %
(``alpha_on = 0.8``, ``eta = 0.5``: 0.0436 against 0.0448). Holding alpha at ``alpha(t_on) = 0.45``
instead, with 55 % of the tokens still masked for the last 5 % of the grid, was 2.5-5 times ancestral's
distance (``alpha_on = 0.45``: 0.0857 / 0.0258 at 16 / 64).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .._checks import choice, real
from ..noise import Draws, rand
from .ancestral import Ancestral
from .base import Model
from .categorical import draw
from .process import MaskedProcess

__all__ = ["STRATEGIES", "ReMDM"]

STRATEGIES = ("cap", "rescale", "loop")


class ReMDM(Ancestral):
    """ReMDM's remasking sampler (module docstring).

    Args:
        eta: the remasking strength, in ``[0, 1]``: ``"cap"``'s largest ``sigma_t``, ``"rescale"``'s
            fraction of ``sigma_max``, ``"loop"``'s ``sigma_t`` in its window; default 0.02 (ours: the
            paper tunes it per task).
        strategy: ``"cap"`` (default), ``"rescale"`` or ``"loop"``.
        t_on, t_off: ``"loop"``'s window, ``0 <= t_off < t_on <= 1``; default 0.55 and 0.05 (the paper's
            ReMDM-loop settings). Only with ``"loop"``.
        alpha_on: ``"loop"``'s alpha in its window, in ``(0, 1)`` and strictly between the schedule's
            ``alpha(1)`` and ``alpha(0)`` (checked at the first step); default 0.9. Only with ``"loop"``.
    """

    name: ClassVar[str] = "remdm"
    uniform: ClassVar[bool] = False

    def __init__(
        self,
        eta: float = 0.02,
        strategy: str = "cap",
        t_on: float | None = None,
        t_off: float | None = None,
        alpha_on: float | None = None,
    ) -> None:
        self.eta = real("ReMDM", "eta", eta, lo=0, hi=1)
        self.strategy = choice("ReMDM", "strategy", strategy, STRATEGIES)
        if self.strategy != "loop" and (t_on, t_off, alpha_on) != (None, None, None):
            raise ValueError(
                "ReMDM: t_on, t_off and alpha_on are the 'loop' strategy's settings, got "
                f"strategy={self.strategy!r}"
            )
        self.t_on = real("ReMDM", "t_on", 0.55 if t_on is None else t_on, lo=0, hi=1)
        t_off = 0.05 if t_off is None else t_off
        self.t_off = real("ReMDM", "t_off", t_off, lo=0, hi=self.t_on, hi_open=True)
        alpha_on = 0.9 if alpha_on is None else alpha_on
        self.alpha_on = real("ReMDM", "alpha_on", alpha_on, lo=0, hi=1, lo_open=True, hi_open=True)

    def hold_time(self, process: MaskedProcess) -> float:
        """The process time ``T`` with ``alpha(T) = alpha_on``, where the loop holds; a ``ValueError`` if the
        schedule's ``alpha`` does not pass ``alpha_on`` strictly between ``alpha(1)`` and ``alpha(0)``."""
        lo, hi = (float(process.alpha(torch.tensor(t, dtype=torch.float64))) for t in (1.0, 0.0))
        if not lo < self.alpha_on < hi:
            raise ValueError(
                "ReMDM: alpha_on must lie strictly between the schedule's "
                f"alpha(1) = {lo:.7g} and alpha(0) = {hi:.7g} ({process!r}), got {self.alpha_on:g}"
            )
        return float(process.t_of_alpha(torch.tensor(self.alpha_on, dtype=torch.float64)))

    def time(self, u: float, process: MaskedProcess) -> float:
        """The process time ``tau(u)`` of the grid time ``u`` (``u`` itself but with ``"loop"``: module
        docstring)."""
        if self.strategy != "loop" or u == 0:
            return u
        hold = self.hold_time(process)
        if u > self.t_on:
            return hold + (u - self.t_on) * (1 - hold) / (1 - self.t_on)
        return hold if u >= self.t_off else u * hold / self.t_off

    @staticmethod
    def sigma_max(alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
        """``min(1, (1 - alpha_s) / alpha_t)``, the largest ``sigma_t`` of the step (1 where ``alpha_t = 0``:
        nothing to remask)."""
        return torch.where(alpha_t > 0, (1 - alpha_s) / alpha_t, torch.inf).clamp(max=1)

    def sigma(self, alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
        """``sigma_t`` of a ``"cap"`` or ``"rescale"`` step from ``alpha_t`` to ``alpha_s`` (``(batch,)``
        each)."""
        sigma_max = self.sigma_max(alpha_t, alpha_s)
        return sigma_max.clamp(max=self.eta) if self.strategy == "cap" else self.eta * sigma_max

    def step(
        self, model: Model, x: Tensor, t: Tensor, i: int, steps: int, generator: Draws, given: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        process = model.masked
        grid_t, grid_s = 1 - i / steps, 1 - (i + 1) / steps
        last = i == steps - 1
        s = torch.full_like(t, self.time(grid_s, process))
        alpha_t, alpha_s = process.alpha(t), torch.ones_like(s) if last else process.alpha(s)
        if self.strategy != "loop":
            sigma = self.sigma(alpha_t, alpha_s)
        elif self.t_off <= grid_s and grid_t <= self.t_on and not last:
            sigma = self.sigma_max(alpha_t, alpha_s).clamp(max=self.eta)
        else:
            sigma = torch.zeros_like(t)
        log_p = model(x, t, i)
        u = rand(x.shape, generator, torch.float64, x.device)
        tokens = draw(log_p, generator).to(x.dtype)
        chance = ((alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t))[:, None]
        masked = x == process.mask_id
        new = torch.where(masked & (u < chance), tokens, x)
        remask = ~masked & ~given & (u < sigma[:, None])
        return torch.where(remask, torch.full_like(x, process.mask_id), new), s, log_p

    def __repr__(self) -> str:
        window = f", t_on={self.t_on:g}, t_off={self.t_off:g}, alpha_on={self.alpha_on:g}"
        window = window if self.strategy == "loop" else ""
        return f"ReMDM(eta={self.eta:g}, strategy={self.strategy!r}{window})"
