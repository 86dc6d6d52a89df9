r"""Gradient guidance without an inverse problem: a noisy classifier, or a reward of the denoised
estimate.

* :class:`ClassifierGuidance` (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
  Synthesis", Sec. 4, Eq. 14 / Alg. 2): with a classifier ``log p(y | x_t, t)`` trained on noisy
  inputs, the conditional score is ``grad log p_t(x) + grad log p(y | x_t)``; with a scale ``s``,

      eps' = eps - s sigma grad_x log p(y | x_t, t).

  With the exact noisy classifier and ``s = 1`` this is the exact score of ``p_t(x | y)``.
* :class:`RewardGuidance` (Bansal et al. 2023, "Universal Guidance for Diffusion Models", forward
  guidance, Eq. 6): the classifier is replaced by a reward ``r`` of the denoised estimate,

      eps' = eps - s sigma grad_x r(x0_hat(x_t)),

  the gradient taken through the denoiser (their ``s(t)`` is ``s sigma_t``); an approximation of
  the tilted score ``grad log E[exp r(x0) | x_t]`` (exact when ``x0 | x_t`` is a point mass).

Universal guidance's per-step self-recurrence (Alg. 1) is a solver:
:class:`~steerdiff.solvers.self_recurrence.SelfRecurrence`.

Guided predictions are returned detached from the graph: these wrappers take their gradient with
autograd (switched on for it also under ``torch.no_grad()``; ``torch.inference_mode()`` is refused)
and do not stack under another gradient-guided wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import held_by, real
from ..denoiser import Denoiser, Prediction
from .base import Guided, add_score, denoise_with_grad, grad_leaf, grad_on, hold, value_grad

__all__ = ["ClassifierGuidance", "RewardGuidance"]


def _gradient(who: str, name: str, value: Tensor, x: Tensor, nested: bool) -> Tensor:
    """``grad_x value.sum()`` (a function of ``x`` if ``nested``, :func:`~steerdiff.guidance.grad_on`), after
    checking that ``value`` is a differentiable ``(n,)`` tensor.

    Values are not inspected (that would sync the device at every call): a NaN/inf value or gradient
    flows into ``eps`` and the sampler reports it once per run, with the step and time
    (:class:`~steerdiff.solvers.base.NonFiniteError`)."""
    n = x.shape[0]
    if not isinstance(value, Tensor) or tuple(value.shape) != (n,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{who}: {name} must return a ({n},) tensor (one value per sample), got {shape}")
    return value_grad(who, f"{name}'s output", value, x, create_graph=nested)


class ClassifierGuidance(Guided):
    """Classifier guidance: score ``+ scale * grad_x log p(y | x_t, t)`` (Dhariwal & Nichol 2021, Eq. 14).

    Args:
        den: the (unconditional or conditional) denoiser.
        log_prob_y: ``log_prob_y(x_t, t, **cond) -> (n,)``, the noise-conditional classifier's
            log-probability of the wanted labels (``t`` the process time; the labels in ``**cond``
            or in a closure), differentiable in ``x_t``.
        scale: ``s >= 0`` (Dhariwal & Nichol's classifier scale; 1 is the exact conditional score
            with an exact classifier).

    ``**cond`` goes to both the denoiser and the classifier. ``cost`` is ``den``'s (the classifier
    and its backward pass are not network evaluations of the diffusion model).
    """

    base_arg = "den"

    def __init__(self, den: Denoiser, log_prob_y: Callable[..., Tensor], scale: float = 1.0) -> None:
        super().__init__(den)
        if not callable(log_prob_y):
            raise ValueError("ClassifierGuidance: log_prob_y must be callable (x_t, t, **cond) -> (n,)")
        self.log_prob_y = log_prob_y
        self.scale = real("ClassifierGuidance", "scale", scale, lo=0)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The classifier, a network, sees ``x`` in ``net_dtype`` as the denoiser's net does."""
        scale = held_by("ClassifierGuidance", "scale", self.scale, x.dtype)
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        if scale == 0:
            return pred
        with grad_on("ClassifierGuidance", x) as nested:
            xr = grad_leaf(x)
            value = self.log_prob_y(xr.to(net_dtype), t, **cond)
            g = _gradient("ClassifierGuidance", "log_prob_y", value, xr, nested)
        return add_score(hold(pred, pred.x0_given, nested), scale * g)

    def __repr__(self) -> str:
        return f"ClassifierGuidance({self.base!r}, scale={self.scale})"


class RewardGuidance(Guided):
    """Forward universal guidance: score ``+ scale * grad_x r(x0_hat(x_t))`` (Bansal et al. 2023, Eq. 6).

    Args:
        den: the denoiser; its net must be differentiable in ``x``.
        reward: ``reward(x0) -> (n,)``, differentiable (e.g. ``-loss(c, f(x0))`` of Bansal et al.).
        scale: ``s >= 0``.

    ``cost`` is ``den``'s: one forward evaluation per call (plus one backward pass through the net).
    For Bansal et al.'s self-recurrence sample with ``solver=SelfRecurrence("ddim", repeats=k)``.
    """

    base_arg = "den"

    def __init__(self, den: Denoiser, reward: Callable[[Tensor], Tensor], scale: float = 1.0) -> None:
        super().__init__(den)
        if not callable(reward):
            raise ValueError("RewardGuidance: reward must be callable x0 -> (n,)")
        self.reward = reward
        self.scale = real("RewardGuidance", "scale", scale, lo=0)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The reward, a network, sees ``x0`` in ``net_dtype`` as the denoiser's net does."""
        scale = held_by("RewardGuidance", "scale", self.scale, x.dtype)
        if scale == 0:
            return self.base.evaluate(x, t, net_dtype, **cond)
        with grad_on("RewardGuidance", x) as nested:
            xr, pred = denoise_with_grad("RewardGuidance", self.base, x, t, net_dtype, **cond)
            x0_held = pred.x0_given  # before the reward reads x0 (which derives it for an eps net)
            g = _gradient("RewardGuidance", "reward", self.reward(pred.x0.to(net_dtype)), xr, nested)
        return add_score(hold(pred, x0_held, nested), scale * g)

    def __repr__(self) -> str:
        return f"RewardGuidance({self.base!r}, scale={self.scale})"
