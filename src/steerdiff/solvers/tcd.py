r"""Multistep consistency sampling: TCD's strategic stochastic sampling (Zheng et al. 2024,
"Trajectory Consistency Distillation", Sec. 4.3 / Alg. 4), with LCM's sampler as ``gamma = 1``.

The few-step sampler of consistency-distilled models (LCM, LCM-LoRA, TCD, Hyper-SD). With
``(x0, eps) = D(x_i, t_i)``, a parameter ``gamma`` in ``[0, 1]`` and the intermediate time
``s = (1 - gamma) t_{i+1}``, a step goes by DDIM down to ``s`` and forward-noises back up to ``t_{i+1}``:

    x_s     = alpha_s x0 + sigma_s eps,
    x_{i+1} = (alpha_{i+1} / alpha_s) x_s + sqrt(sigma_{i+1}^2 - (alpha_{i+1} / alpha_s)^2 sigma_s^2) z,

a Gaussian transition with ``mean = alpha_{i+1} x0 + sigma_{i+1} e^{-(lam_s - lam_{i+1})} eps`` and
``std = sigma_{i+1} sqrt(1 - e^{-2 (lam_s - lam_{i+1})})``: DDIM's split of ``sigma_{i+1}`` into a
deterministic and a fresh-noise part (:func:`~steerdiff.solvers.ddim.ancestral_split`), set by
``lam_s`` instead of ``eta``. ``gamma = 0`` (``s = t_{i+1}``) is deterministic DDIM. ``gamma = 1``
puts ``s`` at the clean end (``alpha_s = 1``, ``sigma_s = 0``: the paper's ``t = 0``), the multistep
consistency sampling of Song et al. 2023 ("Consistency Models", Alg. 1) and of LCM (Luo et al.
2023, "Latent Consistency Models", Alg. 3):

    x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} z.

With the exact consistency function (``x0`` the probability-flow ODE's end point from ``x_i``)
``gamma = 1`` samples the data law exactly at any number of steps: ``x0`` is distributed as the
data if ``x_i`` is as the marginal at ``t_i``, and ``x_{i+1}`` then as the marginal at ``t_{i+1}``.

``s`` is a process time: ``(1 - gamma) t_{i+1}`` evaluated on the process, which is clean at ``t = 0``
for every continuous process here but :class:`~steerdiff.processes.VE` (``sigma_min``); on
:meth:`VP.discrete <steerdiff.processes.VP.discrete>` the time is the timestep index and ``s`` falls
between two (``lam`` is interpolated). diffusers' ``TCDScheduler`` takes the integer timestep
``floor((1 - gamma) t_{i+1})`` and evaluates it even at ``gamma = 1`` (timestep 0, where
``alphas_cumprod[0] < 1``: not LCM's step); ``floor_s=True`` does the same. So on these two processes
``gamma -> 1`` is not ``gamma = 1``: ``s`` tends to ``t = 0``, at ``sigma_s / alpha_s`` 0.01 (``VE()``) or
0.029 (SD's betas), and only ``gamma = 1`` itself takes LCM's clean end. One network evaluation per step;
into a clean end the step returns ``x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import boolean, real
from ._exp import noising
from .base import Grid, Model, Solver, Transition

__all__ = ["TCD"]


@dataclass
class TCD(Solver):
    """TCD's strategic stochastic sampling with ``gamma`` in ``[0, 1]`` (default 0.3, TCD's); ``gamma = 1``
    is LCM's multistep consistency sampling (the registry's ``lcm``). ``floor_s``: the intermediate time
    at TCDScheduler's integer timestep ``floor((1 - gamma) t_{i+1})``, on the process at ``gamma = 1`` too."""

    picard: ClassVar[str | None] = "step"

    gamma: float = 0.3
    floor_s: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gamma = real("TCD", "gamma", self.gamma, lo=0, hi=1)
        self.floor_s = boolean("TCD", "floor_s", self.floor_s)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``lcm`` for LCM's sampler (``gamma = 1``, ``s`` the clean end), else ``tcd``."""
        return "lcm" if self.gamma == 1 and not self.floor_s else "tcd"

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether steps draw noise: ``gamma > 0``, or ``floor_s``, whose ``s`` is below ``t_{i+1}`` at a
        fractional node even at ``gamma = 0``."""
        return self.gamma > 0 or self.floor_s

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """Nothing to keep; ``floor_s`` is refused on a process whose time is not a timestep index (on
        ``[0, 1]`` it would floor every intermediate time to 0, whatever ``gamma``; on EDM's sigmas it means
        nothing)."""
        if self.floor_s and getattr(grid.process, "num_train_timesteps", None) is None:
            raise ValueError(
                "TCD: floor_s=True floors the intermediate time to TCDScheduler's integer timestep, "
                "which needs a process timed by timestep indices (VP.discrete); got "
                f"{type(grid.process).__name__}, whose times are not (on [0, 1] every s would floor to 0, "
                "whatever gamma): use floor_s=False"
            )
        return {}

    def intermediate(self, grid: Grid, i: int) -> tuple[float, float]:
        """``(alpha_s, sigma_s)`` at the intermediate time ``s`` of step ``i`` (``s = t_{i+1}`` at
        ``gamma = 0``, the clean end at ``gamma = 1`` unless ``floor_s``)."""
        t_next = grid.t[i + 1]
        s = (1 - self.gamma) * t_next
        if self.floor_s:
            s = math.floor(s)
        elif self.gamma == 1:
            return 1.0, 0.0
        if s == t_next:
            return grid.alpha[i + 1], grid.sigma[i + 1]
        alpha_s, sigma_s, _ = grid.at(s)
        return alpha_s, sigma_s

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor | Transition:
        pred = model(x, grid.t[i], i)
        if grid.sigma[i + 1] == 0:
            return pred.x0
        alpha_s, sigma_s = self.intermediate(grid, i)
        ratio, std = noising((alpha_s, sigma_s), (grid.alpha[i + 1], grid.sigma[i + 1]))
        mean = pred.renoise(ratio * alpha_s, ratio * sigma_s)
        return Transition(mean, std) if std > 0 else mean
