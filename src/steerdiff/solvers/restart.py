r"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", Alg. 1).

The probability-flow ODE is solved along the grid with Heun's method (EDM Alg. 1,
:func:`~steerdiff.solvers.edm.heun_update`). A restart interval ``[s_min, s_max]`` (in
k-diffusion's ``s = sigma / alpha``, the paper's ``sigma`` for EDM) is entered where the main
solve reaches ``s_min``; there, ``K`` times,

    forward:   y <- y + sqrt(s_max^2 - s_min^2) z,       z ~ N(0, I)     (y = x / alpha)
    backward:  N Heun steps from s_max to s_min on Karras' rho = 7 grid (EDM Eq. 5),

i.e. the exact forward transition of the process from ``t_min`` to ``t_max``,
``x <- (alpha_max / alpha_min) x + alpha_max sqrt(s_max^2 - s_min^2) z``, followed by the ODE back.
As in the authors' code, ``s_min`` is moved to the nearest grid node that a step arrives at
(nodes ``1..`` the last noisy one); ``s_max`` is used as given.

``restart_info``: a sequence of ``(s_min, s_max, K, N)`` -- or a mapping ``{s_min: (s_max, K, N)}``
-- with ``0 < s_min < s_max``, ``K, N >= 1``. Intervals reaching outside the grid's range
(``s_min`` below its last noisy node, ``s_max`` above its first) are a ``ValueError``. ``None``
(default): the automatic choice of the authors' sampler for ComfyUI: no restart below 20 steps;
from 20 steps ``(0.1, 2, K=1, N=9)``; from 36 steps ``(0.1, 2, K=2, N=steps // 4)`` (the grid is
not shortened to compensate, unlike there), ``s_min`` moved to the nearest node also where the
grid ends above 0.1 (``trailing`` spacing: 0.22 at 20 steps under SD betas) and ``s_max`` to the
first node where the grid starts below 2 (a custom grid from partway, as img2img: the authors' code
moves ``s_max`` to the nearest node, the first one there).

Restarts contract only the errors made below ``s_max``: the output depends on ``x_T`` as the ODE's
does above it, so a prior ``x_T ~ N(0, I)`` that differs from the marginal at ``t_max`` (VP
``scaled_linear``: ``alpha_T = 0.068``) keeps the exact ODE's bias with the default ``s_max = 2``.

Noise: restart ``k`` of ``K`` draws ``model.noise(u_k, u_{k+1}, x)`` on the ``k``-th of ``K``
equal parts of ``[t_min, t_max]``, cut at the node of a restart made before (an interval that
overlaps an earlier one), so that a Brownian-tree source gives independent draws. The
restart noise is followed by the deterministic ODE solve inside the same step, so no step is
Gaussian given its start: every step returns the state (a Tensor), never a
:class:`~steerdiff.solvers.base.Transition`; the noise is drawn inside :meth:`Restart.step`.

NFE: those of :class:`~steerdiff.solvers.euler.Heun` (``2 steps - 1`` with a clean end) plus
``2 K N`` per interval (``K N`` with ``order=1``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import integer, real
from ..schedules import Karras
from ._exp import noising
from .base import Grid, Model, Solver
from .edm import Level, heun_update

__all__ = ["Restart"]

Interval = tuple[float, float, int, int]  # (s_min, s_max, K, N)


def _intervals(restart_info: Sequence[Sequence[float]] | Mapping[float, Sequence[float]]) -> list[Interval]:
    items: list[object]  # checked one by one below
    if isinstance(restart_info, Mapping):
        items = [(k, *v) if isinstance(v, Sequence) else (k, v) for k, v in restart_info.items()]
    elif isinstance(restart_info, Sequence) and not isinstance(restart_info, str):
        items = list(restart_info)
    else:
        raise ValueError(
            f"Restart: restart_info must be a sequence of (s_min, s_max, K, N) or a mapping "
            f"{{s_min: (s_max, K, N)}}, got {restart_info!r}"
        )
    out = []
    for item in items:
        if not isinstance(item, Sequence) or len(item) != 4:
            raise ValueError(
                f"Restart: restart_info: {item!r} is not (s_min, s_max, K, N) with 0 < s_min < s_max, "
                "integers K, N >= 1"
            )
        lo = real("Restart", "s_min in restart_info", item[0], lo=0, lo_open=True)
        hi = real("Restart", "s_max in restart_info (above its s_min)", item[1], lo=lo, lo_open=True)
        k = integer("Restart", "K in restart_info", item[2], lo=1)
        n = integer("Restart", "N in restart_info", item[3], lo=1)
        out.append((lo, hi, k, n))
    return out


@dataclass
class Restart(Solver):
    """Restart sampling with Heun's method (``order=2``) or Euler's (``order=1``) as ODE solver.

    Args:
        restart_info: the restart intervals ``(s_min, s_max, K, N)`` in ``sigma / alpha`` (see the
            module docstring); ``None``: the automatic choice by step count.
    """

    name: ClassVar[str] = "restart"
    picard: ClassVar[str | None] = "stages"
    stochastic: ClassVar[bool] = True
    staged: ClassVar[bool] = True
    static_state: ClassVar[bool] = True  # init_state: per-grid tables
    max_order: ClassVar[int] = 2
    order: int = 2
    restart_info: Sequence[Sequence[float]] | Mapping[float, Sequence[float]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restart_info is not None:
            _intervals(self.restart_info)

    def _plan(self, steps: int) -> list[Interval]:
        if self.restart_info is not None:
            return _intervals(self.restart_info)
        if steps < 20:
            return []
        return [(0.1, 2.0, 1, 9)] if steps < 36 else [(0.1, 2.0, 2, steps // 4)]

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """Place the intervals on the grid: ``{node j: (K, inner levels from s_max to s_j, top)}``, the noise
        drawn on ``[t_j, top]`` (module docstring)."""
        ratios = [s / a for s, a in zip(grid.sigma, grid.alpha, strict=True)]
        last = grid.steps - 1 if grid.clean_end else grid.steps  # last noisy node
        plan: dict[int, tuple[int, list[Level], float]] = {}
        given = self.restart_info is not None  # the automatic plan's s_min = 0.1 goes to the nearest node
        for lo, hi, k, n in self._plan(grid.steps):
            hi = hi if given else min(hi, ratios[0])  # and its s_max = 2 at most to the first
            if last < 1 or (given and lo < ratios[last] * (1 - 1e-9)) or hi > ratios[0] * (1 + 1e-9):
                raise ValueError(
                    f"Restart: restart_info: interval [{lo:g}, {hi:g}] (sigma/alpha) reaches outside the "
                    f"grid's range [{ratios[last]:g}, {ratios[0]:g}] (reached by steps 1..{last})"
                )
            j = min(range(1, last + 1), key=lambda m: abs(ratios[m] - lo))
            if ratios[j] >= hi or j in plan:
                raise ValueError(
                    f"Restart: restart_info: interval [{lo:g}, {hi:g}] starts at grid node {j} (sigma/alpha "
                    f"{ratios[j]:g}), which is not below s_max or already restarts; use a finer grid"
                )
            t = Karras(7.0, sigma_min=ratios[j], sigma_max=hi).nodes(grid.process, n + 1).tolist()
            levels = [(ti, *grid.at(ti)[:2]) for ti in t[:-1]]
            plan[j] = (k, [*levels, (grid.t[j], grid.alpha[j], grid.sigma[j])], t[0])
        # a Brownian-tree source's draws are independent on disjoint ranges of time: an interval reaching
        # above the node of a restart made before it draws its noise below that node
        prev: int | None = None
        for j in sorted(plan):
            k, levels, top = plan[j]
            plan[j] = (k, levels, top if prev is None else min(top, grid.t[prev]))
            prev = j
        return {"plan": plan}

    def noisy_on(self, grid: Grid) -> bool:
        """Whether some interval restarts on ``grid`` (between restarts the steps are Heun's ODE; the
        automatic plan restarts from 20 steps on)."""
        return bool(self.init_state(grid)["plan"])

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        second = self.order == 2
        frm = (grid.t[i], grid.alpha[i], grid.sigma[i])
        x = heun_update(model, x, i, frm, (grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1]), second)
        if i + 1 not in state["plan"]:
            return x
        k, levels, top = state["plan"][i + 1]
        (_, a_hi, s_hi), (t_lo, a_lo, s_lo) = levels[0], levels[-1]
        ratio, std = noising((a_lo, s_lo), (a_hi, s_hi))
        for r in range(k):
            u0, u1 = t_lo + r * (top - t_lo) / k, t_lo + (r + 1) * (top - t_lo) / k
            x = ratio * x + std * model.noise(u0, u1, x)
            for frm, to in itertools.pairwise(levels):
                x = heun_update(model, x, i, frm, to, second)
        return x

    def nfe(self, steps: int, clean_end: bool = True) -> int:
        restarts = sum(k * n for _, _, k, n in self._plan(steps))
        return super().nfe(steps, clean_end) + self.evals_per_step * restarts
