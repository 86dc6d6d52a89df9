r"""LanPaint (Zheng, Lan & Wang 2025, "LanPaint: Training-Free Diffusion Inpainting with Asymptotically
Exact and Fast Conditional Sampling", TMLR): gradient-free inpainting for the ODE solvers, by Langevin
moves on ``x_t`` at each node followed by the solver's step.

Two pieces, each in its contract:

* :class:`LanPaint`, this denoiser wrapper: the prior's ``x0_hat`` made consistent with the observation,
  ``x0 = x0_hat + A^+ (y - A x0_hat)`` (known pixels ``y``), a :class:`~steerdiff.mcmc.Projected`
  prediction that also carries ``x0_hat``. Every solver steps with it; under a deterministic step the
  known part of the state stays on the forward path ``alpha y + sigma n`` of its own noise, and the final
  step returns ``y`` on the known pixels exactly. No replacement of ``x_t`` and no noise of its own.
* :class:`~steerdiff.mcmc.BiGLangevin`, the corrector (``corrector="lanpaint"``): after each step into a
  noisy node, ``corrector_steps`` moves of their fast Langevin dynamics on the bidirectionally guided
  (BiG) score, one network evaluation each (the math in :mod:`steerdiff.mcmc.lanpaint`).

So a LanPaint run is

>>> lp = sd.guidance.LanPaint(den, sd.inverse.Inpaint(mask), y)
>>> x0 = sd.sample(lp, x_T, steps=20, solver="ddim", corrector="lanpaint", corrector_steps=5, generator=g)

with NFE ``N + (N - 1) K`` for ``N`` steps and ``K`` moves (:func:`lanpaint_nfe`); the moves restart what a
multistep solver carries (:meth:`~steerdiff.solvers.base.Solver.moved`). Without a corrector the wrapper
alone is the "replace x0" baseline. ``y`` is taken as exact (noiseless inpainting, as RePaint).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import integer
from ..denoiser import Denoiser, Prediction
from ..inverse.operators import LinearOperator
from ..mcmc.lanpaint import Projected
from ._measurement import MeasurementGuided

__all__ = ["LanPaint", "lanpaint_nfe"]


class LanPaint(MeasurementGuided):
    """The denoiser of a LanPaint run: ``x0`` projected onto ``{A x = y}``, carrying the prior's own
    estimate for :class:`~steerdiff.mcmc.BiGLangevin` (see the module).

    Args:
        base: the prior's denoiser.
        operator: the measurement; an :class:`~steerdiff.inverse.Inpaint` mask for the paper's setting
            (any operator with ``pinv``: the known part is then the row space of ``A``).
        y: the observation, ``operator.shape_out`` (broadcast over the batch) or one per sample, taken as
            exact.
    """

    def __init__(self, base: Denoiser, operator: LinearOperator, y: Tensor) -> None:
        super().__init__(base, operator, y)
        self.check_pinv()

    def measured(self, v: Tensor) -> Tensor:
        """``A^+ A v``: the measured component of ``v`` (the known pixels, the rest zero)."""
        return self.operator.pinv(self.operator.forward(v))

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The base prediction at ``x``, its ``x0`` projected (``x``'s dtype; the net in ``net_dtype``)."""
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        out = Projected(x, pred.alpha, pred.sigma, self.project(pred.x0), pred.x0, self.measured)
        out.var_interp = pred.var_interp
        return out


def lanpaint_nfe(steps: int, moves: int) -> int:
    """Denoiser calls of ``sd.sample(LanPaint(...), x_T, steps, corrector="lanpaint",
    corrector_steps=moves)`` (``final="zero"``, a one-evaluation-per-step solver): ``steps + (steps - 1)
    moves`` -- the moves run at every node but ``x_T`` and the clean end. The NFE is this times the
    base denoiser's ``cost`` (2 for a :class:`~steerdiff.guidance.CFG` that guides)."""
    steps = integer("lanpaint_nfe", "steps", steps, lo=1)
    moves = integer("lanpaint_nfe", "moves", moves, lo=0)
    return steps + (steps - 1) * moves
