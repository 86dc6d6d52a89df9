r"""LanPaint's Langevin moves (Zheng, Lan & Wang 2025, "LanPaint: Training-Free Diffusion Inpainting with
Asymptotically Exact and Fast Conditional Sampling", TMLR): the bidirectionally guided (BiG) score of
an inpainting target, followed by their fast Langevin dynamics, as a corrector of
:func:`steerdiff.sample` on :class:`~steerdiff.guidance.LanPaint`.

Setting. ``y = A x0`` observed exactly; ``P = A^+ A`` is the orthogonal projector onto the measured
component (for :class:`~steerdiff.inverse.Inpaint` the mask: the known pixels), ``I - P`` the unknown
one. At a node ``(alpha, sigma)`` the denoiser gives ``x0_hat(x_t)`` and its projection
``x0_p = x0_hat + A^+ (y - A x0_hat)`` (known part ``y``), which :class:`Projected` carries together.

BiG score (as their released code computes it; the paper's methods section could not be read here,
only its abstract). With ``lam >= 0``,

    unknown:  (I - P) grad log p_t(x_t)                     = (I - P) (alpha x0_hat - x_t) / sigma^2
    known:    (1 + lam) P grad log q(x_t | y) - lam P grad log p_t(x_t)
              = P [(1 + lam) (alpha y - x_t) - lam (alpha x0_hat - x_t)] / sigma^2,

``q(x_t | y) = N(alpha y, sigma^2)`` the forward process of the observation. The unknown part follows
the prior's score, i.e. ``p_t(x_unknown | x_known)``; the known part is pulled to the forward sample of
``y`` and pushed (``lam``) against what the model would make of it, which is how the unknown region
steers the known one's noise ("bidirectional"). With ``lam = 0`` the known part is an Ornstein-Uhlenbeck
process with stationary law ``q(. | y)`` and the pair's law is ``p_t(x_unknown | x_known) q(x_known | y)``
for slow known moves; as ``t -> 0``, ``q(. | y) -> delta_y`` and the unknown marginal tends to the exact
conditional ``p(x0_unknown | y)``: the "asymptotically exact" of the title. Langevin moves at the last
nodes then sample it whatever the solver did before, which is why the error falls with the number of
moves (``tests/test_lanpaint.py``).

Fast Langevin dynamics. The BiG score is ``(m(x) - x) / v`` with a Gaussian part made explicit:
``v = sigma^2 (I - P) + sigma^2 / (1 + lam) P`` and target mean

    m(x) = alpha x0_p + (lam / (1 + lam)) P (x - alpha x0_hat)

(unknown: ``alpha x0_hat``; known: ``(alpha (1 + lam) y - lam alpha x0_hat + lam x) / (1 + lam)``).
Langevin time is ``dt = eta sigma^2`` on the unknown part and ``beta eta sigma^2`` on the known part
(``eta = step_size``, their ``StepSize * (1 - alpha_bar)``; ``beta``, their ``Beta``), so in units of
the Gaussian part's relaxation the steps are ``h = eta`` and ``h = beta eta (1 + lam)``. With ``m``
frozen over a move, the linear SDE is solved exactly:

* overdamped (``friction=None``, the scheme their released code runs): the Ornstein-Uhlenbeck step
  ``x' = m + e^{-h} (x - m) + sqrt(v (1 - e^{-2h})) z``;
* underdamped (``friction = gamma``; the paper's "Langevin dynamics with momentum", reconstructed: their
  code's oscillator step is disabled and its friction is parameterized otherwise), in the Gaussian part's
  time: ``du = w dtau``, ``dw = -(u + gamma w) dtau + sqrt(2 gamma v) dW`` for ``u = x - m``, solved
  exactly, ``(u, w)' = E (u, w) + sqrt(v) L z`` with ``E = exp(h [[0, 1], [-1, -gamma]])`` and
  ``L L^T = I - E E^T`` (the stationary law ``N(0, v I)`` is kept). The velocity starts at a node from
  its stationary law ``N(0, v)`` and is carried across the node's moves.

The node's first move evaluates ``m`` at its start and takes the full step. Each later move takes half
the step with the previous ``m``, evaluates ``m_new`` there, kicks by the change of the drift over the
step, ``h (m_new - m)`` (the position overdamped, the velocity underdamped), and takes the second half
with the previous ``m`` (their second-order correction): one network evaluation per move, counted by the
sampler. The overdamped step, ``m`` and the kick are read off their released code (written here from the
equations, not copied).

Deviations, stated: their sampler also resets the known region to ``alpha y + sigma n`` (a fixed noise
``n``) at each node before the moves; here the known region is carried (the projected denoiser keeps it on
the forward path of ``y`` under a deterministic step, the moves keep it near ``q(. | y)``). The moves run
after each step into a noisy node (:func:`steerdiff.sample`'s corrector), so not at ``x_T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import real
from ..denoiser import Prediction
from ..solvers.base import Model
from .base import ChainInfo, Kernel, Normal, Point, StepSize, Target

__all__ = ["BiGLangevin", "Projected"]


class Projected(Prediction):
    """A :class:`~steerdiff.denoiser.Prediction` whose ``x0`` is projected onto ``{A x = y}``
    (``x0 = x0_hat + A^+ (y - A x0_hat)``), carrying the denoiser's own estimate ``unprojected`` and the
    projector ``measured(v) = A^+ A v`` onto the measured component (what :class:`BiGLangevin` needs)."""

    __slots__ = ("measured", "unprojected")

    def __init__(
        self,
        x: Tensor,
        alpha: Any,
        sigma: Any,
        x0: Tensor,
        unprojected: Tensor,
        measured: Callable[[Tensor], Tensor],
    ) -> None:
        super().__init__(x, alpha, sigma, x0=x0)
        self.unprojected = unprojected
        self.measured = measured


@dataclass
class _Moving(Point):
    """A chain state inside a node's moves: the target mean ``m`` of the last evaluation (frozen over the
    next move) and, underdamped, the velocity ``w``."""

    mean: Tensor | None = None
    velocity: Tensor | None = None


class _BiGTarget(Target):
    """The BiG score at one node; keeps the node's ``alpha``, ``sigma`` and projector from the predictions."""

    def __init__(self, model: Model, t: float, step: int, lam: float) -> None:
        super().__init__(score=self._score)
        self.model, self.t, self.step, self.lam = model, t, step, lam
        self.alpha = self.sigma = 1.0
        self.measured: Callable[[Tensor], Tensor] = lambda v: v

    def _score(self, x: Tensor) -> Tensor:
        pred = self.model(x, self.t, self.step)
        if not isinstance(pred, Projected):
            raise ValueError(
                "corrector BiGLangevin: the sampled denoiser must be sd.guidance.LanPaint(den, operator, y) "
                f"(a prediction projected onto the observation), got {type(self.model.denoiser).__name__}"
            )
        a, s = pred.alpha, pred.sigma
        self.alpha, self.sigma, self.measured = float(a), float(s), pred.measured
        # (m - x) / v with m = alpha x0_p + lam/(1+lam) P (x - alpha x0_hat): unknown (alpha x0_p - x) / s^2,
        # known (1 + lam) (alpha x0_p - x) / s^2 + lam P (x - alpha x0_hat) / s^2
        base = (a * pred.x0 - x) / (s * s)
        return base + self.measured(self.lam * base + self.lam * (x - a * pred.unprojected) / (s * s))

    def mean(self, p: Point) -> Tensor:
        """``m = x + v grad`` at an evaluated point."""
        assert p.grad is not None, "evaluated by Target.evaluate"
        vg = self.sigma**2 * p.grad
        return p.x + vg - self.measured(vg) * (self.lam / (1 + self.lam))


def _oscillator(
    h: float, gamma: float
) -> tuple[tuple[float, float, float, float], tuple[float, float, float]]:
    """``E = exp(h M)``, ``M = [[0, 1], [-1, -gamma]]``, and the Cholesky factor ``(l11, l21, l22)`` of
    ``I - E E^T``: ``E = c I + s (M + gamma / 2 I)`` with ``c = e^{-gamma h / 2} cosh(k h)``, ``s = e^{-gamma
    h / 2} sinh(k h) / k``, ``k = sqrt(gamma^2 / 4 - 1)`` (imaginary below critical damping, ``gamma < 2``:
    ``cos``, ``sin``). Over-damped, ``c`` and ``s`` are taken from the slow mode ``e^{(k - gamma / 2) h}``
    (``k - gamma / 2 = -1 / (gamma / 2 + k)``, free of cancellation) times ``(1 + e^{-2 k h}) / 2`` and
    ``(1 - e^{-2 k h}) / (2 k)``, so that no factor overflows however large ``gamma h``."""
    k2 = gamma * gamma / 4 - 1
    if k2 < 0:
        w, d = math.sqrt(-k2), math.exp(-gamma * h / 2)
        c, s = d * math.cos(w * h), d * math.sin(w * h) / w
    else:
        k = math.sqrt(k2)
        slow = math.exp(-h / (gamma / 2 + k))
        c = slow * (1 + math.exp(-2 * k * h)) / 2
        s = slow * (h if k == 0 else -math.expm1(-2 * k * h) / (2 * k))
    e11, e12, e21, e22 = c + gamma / 2 * s, s, -s, c - gamma / 2 * s
    s11, s12, s22 = 1 - e11 * e11 - e12 * e12, -(e11 * e21 + e12 * e22), 1 - e21 * e21 - e22 * e22
    l11 = math.sqrt(max(s11, 0.0))
    l21 = s12 / l11 if l11 > 0 else 0.0
    return (e11, e12, e21, e22), (l11, l21, math.sqrt(max(s22 - l21 * l21, 0.0)))


@dataclass
class BiGLangevin(Kernel):
    """LanPaint's moves (see the module): fast Langevin dynamics on the BiG score of the inpainting
    target, with :class:`~steerdiff.guidance.LanPaint` as the sampled denoiser.

    >>> lp = sd.guidance.LanPaint(den, sd.inverse.Inpaint(mask), y)
    >>> x0 = sd.sample(lp, x_T, 20, solver="ddim", corrector=sd.mcmc.BiGLangevin(), corrector_steps=5,
    ...                generator=g)

    Args:
        step_size: ``eta``, the Langevin time per move in units of ``sigma^2`` (their ``StepSize``, 0.15
            there). On the test mixture (DDIM, 10 steps; sliced W to exact posterior draws, floor 0.037)
            1 is the best of 0.2 / 0.5 / 1 / 2 / 4 at 10 and 20 moves (0.087, 0.054), 2 at 5 moves (0.133
            against 0.142; ``python -m tests.test_lanpaint``): larger steps stall above the floor (the
            frozen-mean step is biased), smaller ones need more moves.
        lam: ``lambda >= 0`` of the BiG score (0: the known region relaxes to the forward process of
            ``y`` alone; 1 and 4 are level there, ahead of 0: 0.087 / 0.087 / 0.106 at 10 moves).
        beta: ``beta > 0``, the known region's time step relative to the unknown one's (their ``Beta``).
        friction: ``None`` for the overdamped dynamics, or the friction ``gamma > 0`` of the underdamped
            (momentum) dynamics, in units of the Gaussian part's relaxation rate (2: critical damping).
        generator: as :class:`~steerdiff.mcmc.base.Kernel` (default: the run's noise).

    NFE: one network evaluation per move (``corrector_steps`` per noisy node: ``N + (N - 1) K`` for ``N``
    steps and ``K`` moves with ``final="zero"``).
    """

    name: ClassVar[str] = "lanpaint"

    step_size: float | None = 1.0
    lam: float = 1.0
    beta: float = 1.0
    friction: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step_size is None:
            raise ValueError("BiGLangevin: step_size must be a finite number > 0 (eta, in units of sigma^2)")
        if self.log_prob is not None:
            raise ValueError("BiGLangevin: takes no log_prob (its target is the BiG score of the denoiser)")
        self.lam = real("BiGLangevin", "lam", self.lam, lo=0)
        self.beta = real("BiGLangevin", "beta", self.beta, lo=0, lo_open=True)
        if self.friction is not None:
            self.friction = real("BiGLangevin", "friction", self.friction, lo=0, lo_open=True)

    def run(
        self,
        x: Tensor,
        log_prob: Callable[[Tensor], Tensor],
        steps: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        step_size: float | None = None,
    ) -> tuple[Tensor, ChainInfo]:
        """Refused (``ValueError``): the moves target the BiG score of a :class:`Projected` prediction,
        not a ``log_prob``; they run as :func:`steerdiff.sample`'s corrector on
        :class:`~steerdiff.guidance.LanPaint`."""
        raise ValueError(
            "BiGLangevin.run: BiGLangevin targets the BiG score of sd.guidance.LanPaint's predictions, not a "
            "log_prob; use sd.sample(sd.guidance.LanPaint(den, operator, y), x_T, steps, "
            "corrector=BiGLangevin(...)), or ULA / MALA / HMC for a log_prob"
        )

    def target(self, model: Model, t: float, sigma: float, step: int) -> Target:
        """The BiG score at node ``t`` from ``model``'s :class:`Projected` predictions (one call each)."""
        return _BiGTarget(model, t, step, self.lam)

    def _flow(
        self, target: _BiGTarget, p: _Moving, mean: Tensor, fraction: float, normal: Normal, eta: float
    ) -> _Moving:
        """``fraction`` of a move's exact linear flow towards the frozen ``mean``, on the unknown and the
        known part (one draw for both, split by the projector)."""
        u, z = p.x - mean, normal(p.x)
        z2 = None if self.friction is None else normal(p.x)
        ends: list[tuple[Tensor, Tensor | None]] = []
        for h, var in ((eta, 1.0), (self.beta * eta * (1 + self.lam), 1 / (1 + self.lam))):
            h, sd = fraction * h, target.sigma * math.sqrt(var)
            if self.friction is None:
                ends.append((mean + math.exp(-h) * u + sd * math.sqrt(-math.expm1(-2 * h)) * z, None))
                continue
            (e11, e12, e21, e22), (l11, l21, l22) = _oscillator(h, self.friction)
            assert p.velocity is not None and z2 is not None, "drawn at the node's first move"
            v = p.velocity
            ends.append(
                (mean + e11 * u + e12 * v + sd * l11 * z, e21 * u + e22 * v + sd * (l21 * z + l22 * z2))
            )
        (xu, wu), (xk, wk) = ends
        x = xu + target.measured(xk - xu)
        w = None if wu is None or wk is None else wu + target.measured(wk - wu)
        return _Moving(x, mean=p.mean, velocity=w)

    def move(
        self, p: Point, target: Target, step_size: StepSize, normal: Normal
    ) -> tuple[Point, Tensor | None]:
        assert isinstance(target, _BiGTarget), "made by BiGLangevin.target"
        eta = float(step_size)
        h_known = self.beta * eta * (1 + self.lam)
        if not isinstance(p, _Moving):  # the node's first move: the full step from the start's mean
            mean = target.mean(target.evaluate(p))
            velocity = None
            if self.friction is not None:  # stationary N(0, v) per part
                z = normal(p.x)
                velocity = target.sigma * (z + target.measured(z) * ((1 + self.lam) ** -0.5 - 1))
            return self._flow(
                target, _Moving(p.x, mean=mean, velocity=velocity), mean, 1.0, normal, eta
            ), None
        assert p.mean is not None, "set at the node's first move"
        half = self._flow(target, p, p.mean, 0.5, normal, eta)
        new = target.mean(target.evaluate(Point(half.x)))
        kick = eta * (new - p.mean)
        kick = kick + target.measured(kick) * (h_known / eta - 1)
        if self.friction is None:
            half.x = half.x + kick
        else:
            assert half.velocity is not None, "carried by _flow"
            half.velocity = half.velocity + kick
        out = self._flow(target, half, p.mean, 0.5, normal, eta)
        out.mean = new
        return out, None
