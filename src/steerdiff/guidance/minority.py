r"""Minority sampling: steering a diffusion model toward the low-density regions of its data.

Both methods rest on the *minority score* (:func:`steerdiff.metrics.minority_score`): Tweedie's
reconstruction ``x0_hat`` of a noised sample is pulled toward where most data lie, so samples of
low-density regions are reconstructed worst.

* :class:`MinorityGuidance` (Um, Lee & Ye 2024, "Don't Play Favorites: Minority Guidance for
  Diffusion Models", ICLR, Sec. 3.3): classifier guidance toward a chosen level of the minority score.
  Label a data set by the quantile levels of its scores (:func:`steerdiff.metrics.minority_levels`),
  train a noise-conditional classifier ``p_psi(l | x_t, t)`` on them, and sample with

      grad log p_t(x_t) + w grad_x log p_psi(l* | x_t, t),

  the target level ``l*`` (the top one for the rarest samples; the authors, on LSUN-Bedrooms: ``l* = 99`` of
  100 levels, ``w = 3.5``).
* :class:`SelfGuidedMinority` (Um & Ye 2024, "Self-Guided Generation of Minority Samples Using
  Diffusion Models", ECCV, Sec. 3): no classifier. The minority score of the current estimate,
  ``x0_hat(x_t)`` re-noised to a fixed time ``s`` and denoised again,

      L(x_t) = E_{eps} d(x0_hat(x_t), sg[x0_hat(alpha_s x0_hat(x_t) + sigma_s eps, s)]),

  (``sg``: no gradient through the second reconstruction) is pushed up along its gradient,
  normalized per sample by its largest entry,

      grad log p_t(x_t) + w g / ||g||_inf,    g = grad_x L(x_t),

  at the guided steps only (the paper's intermittent time-scheduling: every few steps). Checked against
  the authors' code (``sg-minority``, ``GaussianDiffusion.compute_mg_grad``): their DDPM step adds
  ``Sigma_t w g / ||g||_inf`` to the mean (``mg_scale_type="var"``), the score form above; defaults
  ``s = 0.8 T`` (``p_ratio``), one draw of ``eps``, LPIPS or the Euclidean norm, guidance every 5th
  of 250 steps (``inter_rate``), ``w = 0.4`` (CelebA) or 0.2 with every 2nd step (ImageNet-64).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import boolean, held_by, integer, real
from ..denoiser import Denoiser, Prediction
from ..metrics import Distance, reconstruction_distance
from ..noise import Generators, check_generators, randn
from .base import Guided, add_score, denoise_with_grad, grad_on, hold, value_grad
from .classifier import ClassifierGuidance

__all__ = ["MinorityGuidance", "SelfGuidedMinority"]


class MinorityGuidance(ClassifierGuidance):
    """Minority guidance (Um, Lee & Ye 2024, Sec. 3.3): :class:`ClassifierGuidance` with a classifier of
    minority-score levels.

    Args:
        den: the denoiser.
        classifier: ``classifier(x_t, t, **cond) -> (n, L)`` logits over the ``L`` levels of
            :func:`~steerdiff.metrics.minority_levels`, noise-conditional (trained on ``x_t`` at every
            ``t``), differentiable in ``x_t``.
        level: the target level ``l*``; negative counts from the top (default ``-1``: ``L - 1``, the
            rarest samples).
        scale: ``w >= 0``.

    The guided score adds ``w grad_x log softmax(classifier(x_t, t))[l*]``; ``cost`` is ``den``'s.
    """

    def __init__(
        self, den: Denoiser, classifier: Callable[..., Tensor], level: int = -1, scale: float = 1.0
    ) -> None:
        if not callable(classifier):
            raise ValueError(
                "MinorityGuidance: classifier must be callable (x_t, t, **cond) -> (n, L) logits"
            )
        self.level = integer("MinorityGuidance", "level", level)
        self.classifier = classifier
        super().__init__(den, self._log_prob, scale)

    def _log_prob(self, x: Tensor, t: float | Tensor, **cond: Any) -> Tensor:
        logits = self.classifier(x, t, **cond)
        n = x.shape[0]
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"MinorityGuidance: classifier must return ({n}, L) logits, got {got}")
        levels = logits.shape[1]
        if not -levels <= self.level < levels:
            raise ValueError(
                f"MinorityGuidance: level must be in [-{levels}, {levels - 1}] for a classifier of {levels} "
                f"levels, got {self.level}"
            )
        return torch.log_softmax(logits, dim=1)[:, self.level]

    def __repr__(self) -> str:
        return f"MinorityGuidance({self.base!r}, level={self.level}, scale={self.scale})"


class SelfGuidedMinority(Guided):
    """Self-guided minority sampling (Um & Ye 2024, ECCV): ascend the reconstruction loss of the current
    estimate (the module docstring has the equations).

    Args:
        den: the denoiser; its net must be differentiable in ``x``.
        scale: ``w >= 0`` (0: ``den`` itself, bitwise).
        renoise: the time ``s`` the estimate is re-noised to; default ``t_min + 0.8 (t_max - t_min)``,
            the authors' ``p_ratio = 0.8``.
        distance: ``d``: ``"l2"`` (``||a - b||_2``, the authors' choice without LPIPS), ``"l1"`` or a
            callable ``(a, b) -> (n,)`` differentiable in ``a`` (the paper's LPIPS).
        samples: draws of ``eps`` averaged in ``L`` (the authors' ``num_mc_samples = 1``).
        normalize: divide each sample's gradient by its largest magnitude (the authors' default
            ``use_normed_grad``; a zero gradient stays zero).
        times: the process times at which to guide (matched to ``1e-9`` relative), e.g. every 5th node
            of the sampling grid (the paper's intermittent guidance),
            ``sd.solvers.make_grid(den.process, sd.schedules.get(name), steps).t[:-1][::5]``, or its nodes
            above some time (guidance in the early steps only); ``None``: every call. Under per-sample
            times, the rows whose time is listed are guided.
        generator: draws ``eps``: one ``torch.Generator``, a list with one per row (needed under a
            sampler's per-row list; under a particle method one per particle, batch-major), or ``None``
            (torch's global RNG; refused by a seeded sampler).

    ``cost``: ``(1 + samples)`` times ``den``'s at a guided call (one evaluation with its backward pass,
    ``samples`` without gradient), ``den``'s elsewhere.
    """

    base_arg = "den"
    noise_generators = ("generator",)

    def __init__(
        self,
        den: Denoiser,
        scale: float = 1.0,
        *,
        renoise: float | None = None,
        distance: Distance = "l2",
        samples: int = 1,
        normalize: bool = True,
        times: Sequence[float] | None = None,
        generator: Generators = None,
    ) -> None:
        super().__init__(den)
        who = "SelfGuidedMinority"
        p = den.process
        self.scale = real(who, "scale", scale, lo=0)
        self.renoise = (
            p.t_min + 0.8 * (p.t_max - p.t_min)
            if renoise is None
            else real(who, "renoise", renoise, lo=p.t_min, hi=p.t_max)
        )
        self.distance = reconstruction_distance(who, distance)
        self.samples = integer(who, "samples", samples, lo=1)
        self.normalize = boolean(who, "normalize", normalize)
        self.times = None if times is None else _times(who, times, p.t_min, p.t_max)
        self.generator = check_generators(who, generator)

    def _guided(self, t: float | Tensor) -> bool | Tensor:
        """Whether to guide at ``t``: a bool, or per sample for a tensor of several times."""
        if self.times is None:
            return True
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1).cpu()
        hit = ((tt - self.times).abs() <= 1e-9 * self.times.abs().clamp_min(1)).any(dim=1)
        n = int(hit.sum())
        return True if n == hit.numel() else (False if n == 0 else hit)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The base's nets in ``net_dtype``, the re-noising and the distance in ``x``'s dtype."""
        scale = held_by("SelfGuidedMinority", "scale", self.scale, x.dtype)
        guided = self._guided(t) if scale != 0 else False
        if guided is False:
            pred = self.base.evaluate(x, t, net_dtype, **cond)
            self.cost = self.base.cost
            return pred
        alpha, sigma = self.coefficients(self.renoise, x)[:2]
        with grad_on("SelfGuidedMinority", x) as nested:
            xr, pred = denoise_with_grad("SelfGuidedMinority", self.base, x, t, net_dtype, **cond)
            cost = self.base.cost
            x0_held = pred.x0_given  # before x0 is read (which derives it for an eps net)
            x0 = pred.x0.to(x.dtype)
            # g = J^T u, u = d_1 d(x0, sg[again]): the distance differentiated in its first argument alone,
            # through a zero shift of it; the reconstructions are a function of x only where x is itself
            # differentiated (nested), whose derivative of g then holds their dependence on x too
            shift = torch.zeros_like(x0, requires_grad=True)
            draws = []
            for _ in range(self.samples):
                with torch.set_grad_enabled(nested):
                    xs = alpha * x0 + sigma * randn(x.shape, self.generator, x.dtype, x.device)
                    again = self.base.evaluate(xs, self.renoise, net_dtype, **cond).x0.to(x.dtype)
                    cost += self.base.cost
                draws.append(self.distance(x0 + shift, again))
            loss = torch.stack(draws).mean(0)
            u = value_grad("SelfGuidedMinority", "the distance", loss, shift, create_graph=nested)
            (g,) = torch.autograd.grad(x0, xr, u, create_graph=nested)
        if self.normalize:
            top = g.abs().reshape(g.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (g.ndim - 1)))
            # a zero gradient stays zero; a NaN one (a NaN net output) stays NaN, for the sampler to report
            g = torch.where(top == 0, 0.0, g / top.clamp_min(torch.finfo(g.dtype).tiny))
        if isinstance(guided, Tensor):  # per-sample times, some not guided
            g = g * guided.to(device=g.device, dtype=g.dtype).reshape(-1, *([1] * (g.ndim - 1)))
        self.cost = cost
        return add_score(hold(pred, x0_held, nested), scale * g)

    def own_noise(self) -> list[tuple[str, Generators]]:
        """``base``'s and its re-noising's (none at scale 0)."""
        own = [("SelfGuidedMinority", self.generator)] if self.scale != 0 else []
        return [*super().own_noise(), *own]

    def __repr__(self) -> str:
        return f"SelfGuidedMinority({self.base!r}, scale={self.scale})"


def _times(who: str, times: object, lo: float, hi: float) -> Tensor:
    """``times`` as a float64 ``(1, k)`` row of process times in ``[lo, hi]``, else a ``ValueError``."""
    if not isinstance(times, Sequence | Tensor) or isinstance(times, str) or len(times) == 0:
        raise ValueError(
            f"{who}: times must be a non-empty sequence of process times or None, got {times!r:.60}"
        )
    return torch.tensor(
        [
            real(who, f"times[{i}]", float(v) if isinstance(v, Tensor) else v, lo=lo, hi=hi)
            for i, v in enumerate(times)
        ],
        dtype=torch.float64,
    ).reshape(1, -1)
