r"""PNDM and PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
ICLR 2022; diffusers' ``PNDMScheduler``, the default scheduler of Stable Diffusion 1.x).

A pseudo numerical method splits a step into a *transfer* part, the DDIM step

    phi(x_t, e, t -> t') = alpha' (x_t - sigma e) / alpha + sigma' e                      (Eq. 9)

-- Euler's step of ``dy/ds = eps`` in ``y = x / alpha``, ``s = sigma / alpha``: ``alpha' (y + (s' - s) e)``
-- and a *gradient* part, the ``e`` it transfers with. With ``d`` the step and ``e_t = eps(x_t, t)``:

* pseudo linear multistep (PLMS, Eq. 12): ``e' = (55 e_t - 59 e_{t-d} + 37 e_{t-2d} - 9 e_{t-3d}) / 24``,
  Adams-Bashforth with fixed (uniform-step) weights: :class:`~steerdiff.solvers.ipndm.IPNDM`'s step;
* pseudo Runge-Kutta (PRK, Eq. 13; 4 NFE): ``e1 = e_t``, ``x1 = phi(x_t, e1, t, t - d/2)``,
  ``e2 = eps(x1, t - d/2)``, ``x2 = phi(x_t, e2, t, t - d/2)``, ``e3 = eps(x2, t - d/2)``,
  ``x3 = phi(x_t, e3, t, t - d)``, ``e4 = eps(x3, t - d)``, ``e' = (e1 + 2 e2 + 2 e3 + e4) / 6``;
* pseudo improved Euler (2 NFE): ``e' = (e_t + eps(phi(x_t, e_t, t, t - d), t - d)) / 2``.

:class:`PNDM` takes ``x_{t-d} = phi(x_t, e', t, t - d)`` with a warm-up (``warmup``) followed by
Adams-Bashforth of order ``order``:

* ``warmup="prk"`` (``pndm``, the paper's F-PNDM; ``PNDMScheduler(skip_prk_steps=False)``): PRK while
  fewer than ``order - 1`` past estimates are held (the first 3 steps at order 4), then Adams-Bashforth
  with the estimate ``e1`` of each PRK step as history. PRK's half step is the midpoint in process
  time (the paper's ``t - d/2``; a fractional timestep of ``VP.discrete`` where the steps are odd).
* ``warmup="improved_euler"`` (``plms``, the PLMS sampler of the latent-diffusion code;
  ``PNDMScheduler(skip_prk_steps=True)``, Stable Diffusion's config): the pseudo improved Euler step
  first, then Adams-Bashforth of orders 2, 3, ... up to ``order`` (the lower-order warm-up of
  :class:`~steerdiff.solvers.ipndm.IPNDM`); the improved Euler step keeps only ``e_t``. At
  ``order=2`` this is the paper's S-PNDM.

A move between steps (:meth:`~steerdiff.solvers.base.Solver.moved`) clears the history, and the
warm-up starts again. The step into a clean end returns the denoised estimate (1 NFE), as
:class:`~steerdiff.solvers.ipndm.IPNDM`'s; diffusers takes a full Adams-Bashforth step to
``alphas_cumprod[0]`` there, or to ``alpha = 1`` with ``set_alpha_to_one``.

Computed, as :class:`~steerdiff.solvers.lms.LMS` does, from the net's own pair ``(x0, e_t)``:
``phi(x_t, e, t, t') = alpha' x0 + sigma' e_t + alpha' (s' - s) (e - e_t)``, which never forms ``x / alpha``;
the improved Euler step is :func:`~steerdiff.solvers.edm.heun_update` (Heun's method in ``(y, s)``).

Long steps: on a step dividing ``s`` by a large factor the weight ``alpha' (s' - s)`` is a large multiple of
the estimates' differences: PRK's stages transfer ``x_t`` with slopes from the end of the step and amplify
each other's errors, and the improved Euler trapezoid weighs the change of the slope by ``(s - s') / 2``.
There the improved Euler step takes Heun's exponential trapezoid in ``lam`` (above
:data:`~steerdiff.solvers.edm.HEUN_MAX_RATIO`, 20) and PRK combines its stages' ``x0`` estimates with the
same weights, ``phi`` in data form ``sigma'/sigma x_t + alpha' (1 - s'/s) x0'`` (the DDIM step again; the
weight of ``x0'`` stays below ``alpha'``), from a ratio of :data:`PRK_MAX_RATIO` (5) on: PRK's half step,
the midpoint in time, is off the midpoint in ``s`` by ``O(d)``, which at ratios of 5-20 alone ends runs at
up to 30 times ddim's error (VP cosine on ``time_uniform``, 12 steps: 2.63 against 0.087 before, 0.0083
with it). The first step of ``karras_capped`` from ``s >> 30`` (zero terminal SNR, rectified flow, ...)
is such a step; 16-d mixture, 10 steps, against the exact ODE: PNDM 2.25e4 -> 0.085 (zero terminal SNR)
and 3.41 -> 0.104 (flow), PLMS 3.35 -> 0.087 and 0.31 -> 0.104 (``tests/test_pndm.py``). On diffusers'
``leading`` grids (SD's or DDPM's betas) only runs of at most 4 steps take one (their step into ``t = 0``).

Orders: PRK is classical Runge-Kutta 4 in ``(y, s)`` where the midpoint in time is the midpoint in
``s`` (``alpha`` constant and ``sigma`` linear in ``t``, as EDM's), and with Adams-Bashforth 4 on steps
of equal length in ``s`` PNDM is then fourth order. Elsewhere the PRK node is off the midpoint of ``s``
by ``O(d)``, which leaves an ``O(d^3)`` error in each of the 3 PRK steps: third order. PLMS's improved
Euler and Adams-Bashforth-2 steps have ``O(d^3)`` local errors: third order at ``order >= 3``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._checks import choice
from .._ops import axpby, lincomb
from ..denoiser import Prediction
from .base import Grid, History, Model
from .edm import heun_update
from .ipndm import IPNDM

__all__ = ["PNDM", "WARMUPS"]

WARMUPS = ("prk", "improved_euler")
# PRK's stages transfer x_t in noise form with weights alpha' (s' - s), and its half step (the midpoint in
# process time) is off the midpoint in s by O(d): where the step divides s by more than this ratio, PRK
# combines the stages' x0 instead. Heun's HEUN_MAX_RATIO (20) is too lax here: a 16-d mixture, 64 samples,
# against the exact ODE, over the 194 cases of eight processes x every schedule x 3-30 steps whose PRK steps
# divide s by 3-20: 21 cases ended more than 3x ddim's error with 20 (VP.cosine time_uniform, 12 steps, a
# ratio of 17.9: 2.63 against ddim's 0.0873; flow logsnr_uniform, 6 steps, 15.8: 6.73 against 0.449; zero
# terminal SNR ays, 30 steps, 7.2: 0.121 against 0.0348), none with 5 (0.00827, 0.0514, 0.00142); of the
# 128 cases it changes 110 are better and 18 worse, by at most 3.0x and each still below ddim (EDM
# karras_capped, 4 steps, 8.8: 0.0405 -> 0.123, ddim 0.286); 10 leaves 3 cases above 3x ddim.
PRK_MAX_RATIO = 5.0
_PRK_WEIGHTS = (1 / 3, 1 / 3, 1 / 6)  # of e2, e3, e4 in e' (e1's 1/6 is implied: the weights sum to 1)


@dataclass
class PNDM(IPNDM):
    """PNDM (``warmup="prk"``, ``pndm``) or PLMS (``warmup="improved_euler"``, ``plms``): a pseudo
    Runge-Kutta or improved Euler warm-up, then fixed-weight Adams-Bashforth of order 1-4 (default 4)."""

    picard: ClassVar[str | None] = None  # the warm-up steps evaluate 2-4 times: neither kind (not staged)

    warmup: str = "prk"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.warmup = choice(type(self).__name__, "warmup", self.warmup, WARMUPS)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``pndm`` (PRK warm-up) or ``plms`` (improved Euler warm-up): the registry name of the warm-up."""
        return "pndm" if self.warmup == "prk" else "plms"

    @property
    def warmup_steps(self) -> int:
        """Steps taken by the warm-up method: ``order - 1`` for PRK, 1 for improved Euler."""
        return self.order - 1 if self.warmup == "prk" else 1

    def nfe(self, steps: int, clean_end: bool = True) -> int:
        """``N`` plus the warm-up's extra evaluations (3 per PRK step, 1 for improved Euler) on the warm-up
        steps into noisy nodes (the step into a clean end costs 1)."""
        extra = 3 if self.warmup == "prk" else 1
        return steps + extra * min(self.warmup_steps, steps - int(clean_end))

    def init_state(self, grid: Grid) -> dict[str, Any]:
        """The estimates' history, which after the warm-up holds ``warmup_steps`` of them between steps
        (:meth:`step` tells the warm-up by it): ``order`` entries, and 2 for ``order=1`` with
        ``improved_euler``, whose Euler steps read none of them."""
        return {"eps": History(max(self.order, self.warmup_steps + 1))}

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        hist = state["eps"]
        if grid.is_final_clean(i) or len(hist.values) >= self.warmup_steps:
            return super().step(model, x, i, grid, state)
        pred = model(x, grid.t[i], i)
        if self.warmup == "prk":
            out = _prk(model, pred, i, grid)
        else:  # before pred.eps is derived: renoise reads the estimate the net gave (x0: no x / alpha)
            frm, to = ((grid.t[j], grid.alpha[j], grid.sigma[j]) for j in (i, i + 1))
            out = heun_update(model, x, i, frm, to, pred=pred)
        hist.push(pred.eps, grid.sigma[i] / grid.alpha[i])
        hist.trim()
        return out


def _prk(model: Model, pred: Prediction, i: int, grid: Grid) -> Tensor:
    """PRK's step from node ``i`` (Eq. 13) from ``pred``, the net's at ``x_i``; the half step in time.

    On a step dividing ``s`` by more than :data:`PRK_MAX_RATIO` the estimates combined are the stages'
    ``x0`` (the DDIM step's data form, whose weight stays below ``alpha'``)."""
    t, t_next, s = grid.t[i], grid.t[i + 1], grid.sigma[i] / grid.alpha[i]
    data = s > PRK_MAX_RATIO * grid.sigma[i + 1] / grid.alpha[i + 1]

    def est(p: Prediction) -> Tensor:
        return p.x0 if data else p.eps

    e1 = est(pred)

    def phi(alpha: float, sigma: float, mix: list[tuple[float, Tensor]]) -> Tensor:
        """``phi(x_i, e1 + sum_k w_k (e_k - e1))`` at ``(alpha, sigma)`` for ``mix = [(w_k, e_k)]``."""
        c = alpha - sigma / s if data else sigma - alpha * s  # alpha (1 - s' / s), alpha (s' - s)
        start = axpby(alpha, pred.x0, sigma, pred.eps)  # the DDIM step from both estimates, as LMS's
        return lincomb([c * w for w, _ in mix], (e - e1 for _, e in mix), start=start)

    t_mid = (t + t_next) / 2
    mid, end = grid.at(t_mid)[:2], (grid.alpha[i + 1], grid.sigma[i + 1])
    e2 = est(model(phi(*mid, []), t_mid, i))
    e3 = est(model(phi(*mid, [(1.0, e2)]), t_mid, i))
    e4 = est(model(phi(*end, [(1.0, e3)]), t_next, i))
    return phi(*end, list(zip(_PRK_WEIGHTS, (e2, e3, e4), strict=True)))
